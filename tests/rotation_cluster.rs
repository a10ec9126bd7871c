//! Credential rotation against a real cluster, ignored by default (the same
//! style as tests/cluster.rs). Run it with a cluster in `KUBECONFIG` where
//! you may create CRDs and namespaces:
//!
//! ```text
//! cargo test --test rotation_cluster -- --ignored --nocapture
//! ```
//!
//! The operator runs inside the test process against the cluster's API
//! server; the Bitbucket simulator and the fake ConductorOne tenant listen on
//! this machine's loopback, which only the in-process operator has to reach.
//! The same steps also run, not ignored, against the in-process fake API
//! server.

pub mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use bitbucket_operator::controller::Operator;
use bitbucket_operator::crd::{BitbucketConnector, find_condition};
use bitbucket_operator::egress::EgressArgs;
use bitbucket_operator::metrics::Metrics;
use bitbucket_operator::simulator::{SimConfig, Simulator};
use bitbucket_operator::store::Store;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::{Client, ResourceExt};
use serde_json::json;
use support::cluster::{on_real_cluster, poll, wait_deleted};
use support::fake_c1::{FakeC1, FakeOptions};
use support::running_operator::RunningOperator;

/// The field manager of "the GitOps tool" that applies the user's Secret.
const GITOPS: &str = "kustomize-controller";

fn rotated(c: &BitbucketConnector) -> bool {
    c.status.as_ref().is_some_and(|s| {
        find_condition(&s.conditions, "CredentialsRotated")
            .is_some_and(|r| r.status == "True" && r.reason == "RotationSucceeded")
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_on_the_fake_api_server() {
    let fake = support::fake_kube::FakeKube::start().await;
    rotation(fake.client(), "bbo-rotation".to_owned()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a Kubernetes cluster in KUBECONFIG"]
async fn rotation_on_a_real_cluster() {
    on_real_cluster(GITOPS, "bbo-rotation", rotation).await;
}

/// A GitOps-applied Secret, a connector asking for a rotation, and the checks
/// a cluster can make: the operator's Secret (owner, labels, keys), the
/// user's Secret unchanged, the old credential revoked.
async fn rotation(client: Client, namespace: String) {
    let sim = Simulator::start(SimConfig::default(), SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .unwrap();
    let c1 = FakeC1::start(FakeOptions::default()).await;
    let operator = Operator::new(
        client.clone(),
        Arc::new(Store::open_in_memory().unwrap()),
        Arc::new(Metrics::default()),
        vec![namespace.clone()],
        EgressArgs {
            allowed_api_urls: vec![sim.base_url()],
            allowed_conductorone_urls: vec![format!("https://{}", c1.api_host())],
        }
        .policy()
        .unwrap(),
    );
    let running = RunningOperator::spawn(operator, Duration::from_secs(60));

    let secrets: Api<Secret> = Api::namespaced(client.clone(), &namespace);
    let connectors: Api<BitbucketConnector> = Api::namespaced(client.clone(), &namespace);
    let creds = sim.credentials().clone();
    let b64 = |v: &str| base64::engine::general_purpose::STANDARD.encode(v);
    let user_secret = secrets
        .patch(
            "baton-bitbucket",
            &PatchParams::apply(GITOPS).force(),
            &Patch::Apply(json!({
                "apiVersion": "v1", "kind": "Secret",
                "metadata": {"name": "baton-bitbucket", "labels": {"connectors.dev/bitbucket-credentials": "true"}},
                "data": {
                    "BATON_USERNAME": b64(&creds.email), "BATON_APP_PASSWORD": b64(&creds.api_token),
                    "BATON_CLIENT_ID": b64(&c1.client_id), "BATON_CLIENT_SECRET": b64(&c1.client_secret),
                },
            })),
        )
        .await
        .expect("create the user's Secret");
    let connector = json!({
        "apiVersion": "connectors.dev/v1alpha1", "kind": "BitbucketConnector",
        "metadata": {"name": "acme", "annotations": {"connectors.dev/rotate-requested-at": "first"}},
        "spec": {
            "secretRef": {"name": "baton-bitbucket"}, "apiUrl": sim.base_url(), "interval": "1h",
            "conductorOne": {"apiHost": c1.api_host(), "caBundle": c1.ca_pem},
            "credentialRotation": {
                "appId": "app-1", "connectorId": "conn-1", "credentialId": c1.initial_credential_id(),
            },
        },
    });
    connectors
        .patch("acme", &PatchParams::apply(GITOPS).force(), &Patch::Apply(&connector))
        .await
        .expect("create connector (the CRD schema accepts credentialRotation)");

    let obj = poll("the rotation", Duration::from_secs(120), async || {
        connectors.get("acme").await.ok().filter(rotated)
    })
    .await;
    let status = obj.status.clone().unwrap().credential_rotation.unwrap();
    assert_eq!(status.last_handled_rotate_at.as_deref(), Some("first"));
    let new_id = status.credential_id.clone().unwrap();
    assert_eq!(c1.active_credentials(), vec![new_id], "the old credential is revoked");

    let target = secrets.get("acme-conductorone").await.expect("the operator's Secret");
    let owner = &target.owner_references()[0];
    assert_eq!(
        (owner.kind.as_str(), Some(&owner.uid)),
        ("BitbucketConnector", obj.uid().as_ref())
    );
    assert_eq!(target.labels()["app.kubernetes.io/managed-by"], "bitbucket-operator");
    let keys: Vec<&String> = target.data.iter().flat_map(|d| d.keys()).collect();
    assert_eq!(
        keys,
        ["BATON_CLIENT_ID", "BATON_CLIENT_SECRET", "rotation.json"],
        "no pending pair is left"
    );
    let after = secrets.get("baton-bitbucket").await.unwrap();
    assert_eq!(after.data, user_secret.data, "the user's Secret keeps its bytes");
    assert_eq!(
        after.resource_version(),
        user_secret.resource_version(),
        "and is never written"
    );

    connectors
        .delete("acme", &DeleteParams::default())
        .await
        .expect("delete connector");
    wait_deleted(&connectors, "acme", Duration::from_secs(60)).await;
    running.stop().await;
    sim.shutdown().await;
}
