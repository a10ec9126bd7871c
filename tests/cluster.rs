//! Real-cluster tests, ignored by default. Run them with a cluster in
//! `KUBECONFIG` (kind, k3d, minikube, or a real one where you may create
//! CRDs and namespaces):
//!
//! ```text
//! cargo test --test cluster -- --ignored --nocapture
//! ```
//!
//! The operator runs inside the test process against the cluster's API
//! server, and the Bitbucket simulator on this machine's loopback, so no
//! image, registry or Bitbucket account is needed. The test applies the CRDs
//! from `crds/` (server-side apply), works in a fresh namespace, and deletes
//! that namespace at the end, also when a step fails.
//!
//! The same steps also run, not ignored, against the in-process fake API
//! server, which follows the real server's write rules (server-side apply
//! field ownership, Secret `stringData`), so a step that cannot work on a real
//! cluster fails here first.

pub mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bitbucket_operator::controller::Operator;
use bitbucket_operator::crd::{BitbucketConnector, find_condition};
use bitbucket_operator::metrics::Metrics;
use bitbucket_operator::model::SyncKind;
use bitbucket_operator::simulator::{SimConfig, Simulator};
use bitbucket_operator::store::Store;
use k8s_openapi::api::core::v1::Secret;
use kube::Client;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use serde_json::json;
use support::cluster::{on_real_cluster, poll, wait_deleted};
use support::running_operator::{RunningOperator, allow_only};

const MANAGER: &str = "bitbucket-operator-e2e";

/// The Secret as a server-side apply configuration of `data`. Not `stringData`: that field is
/// write-only, the API server merges it into `data` and never stores it, so the applier owns
/// only `stringData` keys, and leaving a key out of a later apply cannot remove the `data` key
/// it produced (the old API token would stay, and win). Owning `data` keys makes that work.
fn secret_config(data: &[(&str, &str)]) -> serde_json::Value {
    use base64::Engine as _;
    let data: serde_json::Map<String, serde_json::Value> = data
        .iter()
        .map(|(k, v)| {
            (
                (*k).to_owned(),
                json!(base64::engine::general_purpose::STANDARD.encode(v)),
            )
        })
        .collect();
    json!({"apiVersion": "v1", "kind": "Secret",
           "metadata": {"name": "baton-bitbucket", "labels": {"connectors.dev/bitbucket-credentials": "true"}},
           "data": data})
}

fn ready(c: &BitbucketConnector) -> bool {
    c.status.as_ref().is_some_and(|s| {
        find_condition(&s.conditions, "Ready").is_some_and(|r| r.status == "True")
            && s.observed_generation == c.metadata.generation
    })
}

#[tokio::test]
async fn connector_lifecycle_on_the_fake_api_server() {
    let fake = support::fake_kube::FakeKube::start().await;
    lifecycle(fake.client(), "bbo-e2e".to_owned()).await;
}

#[tokio::test]
#[ignore = "needs a Kubernetes cluster in KUBECONFIG"]
async fn connector_lifecycle_on_a_real_cluster() {
    on_real_cluster(MANAGER, "bbo-e2e", lifecycle).await;
}

/// Create, sync, rotate the credentials of, and delete a connector in `namespace`.
async fn lifecycle(client: Client, namespace: String) {
    let sim = Simulator::start(SimConfig::default(), SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .unwrap();
    let store = Arc::new(Store::open_in_memory().unwrap());
    let operator = Operator::new(
        client.clone(),
        Arc::clone(&store),
        Arc::new(Metrics::default()),
        vec![namespace.clone()],
        // The simulator listens on loopback: allowed as an administrator would.
        allow_only(&sim.base_url()),
    );
    let running = RunningOperator::spawn(operator, Duration::from_secs(60));

    let secrets: Api<Secret> = Api::namespaced(client.clone(), &namespace);
    let connectors: Api<BitbucketConnector> = Api::namespaced(client.clone(), &namespace);
    let creds = sim.credentials().clone();
    secrets
        .patch(
            "baton-bitbucket",
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(secret_config(&[
                ("BATON_USERNAME", creds.email.as_str()),
                ("BATON_APP_PASSWORD", creds.api_token.as_str()),
            ])),
        )
        .await
        .expect("create Secret");
    let connector = json!({
        "apiVersion": "connectors.dev/v1alpha1", "kind": "BitbucketConnector",
        "metadata": {"name": "acme"},
        "spec": {"secretRef": {"name": "baton-bitbucket"}, "apiUrl": sim.base_url(), "interval": "1h"},
    });
    connectors
        .patch("acme", &PatchParams::apply(MANAGER).force(), &Patch::Apply(&connector))
        .await
        .expect("create connector (the CRD schema accepts it)");

    let obj = poll("connector Ready", Duration::from_secs(120), async || {
        connectors.get("acme").await.ok().filter(ready)
    })
    .await;
    let status = obj.status.clone().unwrap();
    assert_eq!(status.state.as_deref(), Some("Connected"));
    let org = sim.organisation();
    let repositories: usize = org.workspaces.iter().map(|w| w.repositories.len()).sum();
    assert_eq!(
        status.resources.as_ref().unwrap().repositories.as_ref().unwrap().count,
        repositories as i64
    );
    let key = format!("{namespace}/acme");
    assert!(store.counts(&key, SyncKind::Accounts).unwrap().resources > 0);

    // Rotate: the OAuth consumer replaces the API token; the fingerprint changes. This apply
    // owns every `data` key it names, so the API-token keys it leaves out are removed.
    let old = status.credentials.unwrap().fingerprint.unwrap();
    let rotated = secrets
        .patch(
            "baton-bitbucket",
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(secret_config(&[
                ("BATON_CONSUMER_KEY", creds.consumer_key.as_str()),
                ("BATON_CONSUMER_SECRET", creds.consumer_secret.as_str()),
            ])),
        )
        .await
        .expect("rotate Secret");
    let keys: Vec<&String> = rotated.data.iter().flat_map(|d| d.keys()).collect();
    assert_eq!(
        keys,
        ["BATON_CONSUMER_KEY", "BATON_CONSUMER_SECRET"],
        "the rotation removed the API token"
    );
    poll("new fingerprint", Duration::from_secs(60), async || {
        let c = connectors.get("acme").await.ok()?;
        let fingerprint = c.status?.credentials?.fingerprint?;
        (fingerprint != old).then_some(())
    })
    .await;

    // Delete: the finalizer stops the loops and removes the data.
    connectors
        .delete("acme", &DeleteParams::default())
        .await
        .expect("delete connector");
    wait_deleted(&connectors, "acme", Duration::from_secs(60)).await;
    assert!(!store.connectors().unwrap().contains(&key), "data removed");
    assert!(running.operator.manager.runtime(&key).is_none(), "loops stopped");

    running.stop().await;
    sim.shutdown().await;
}
