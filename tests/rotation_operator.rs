//! The operator rotates a connector's ConductorOne credential: against the
//! fake API server (tests/support/fake_kube.rs), the Bitbucket simulator and
//! the fake ConductorOne tenant (tests/support/fake_c1.rs). The pair goes to
//! an operator-owned Secret; the user's (GitOps-managed) Secret is never
//! written.

pub mod support;

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use bitbucket_operator::conductorone::credential_api::ConnectorRef;
use bitbucket_operator::conductorone::rotation::{
    Authority, BaseCredential, Caller, Outcome, Pair, RotationStore, Rotator, Step,
};
use bitbucket_operator::conductorone::{C1Endpoint, ClientCredentials};
use bitbucket_operator::controller::rotation::SecretStore;
use bitbucket_operator::crd::BitbucketConnector;
use serde_json::{Value, json};
use support::c1_operator::{API, Harness, KIND, NS, OPT_IN_LABEL, WAIT};
use support::fake_c1;
use support::fake_c1::{CredentialKind, FakeC1, hello_task};
use support::status::condition;

const ROTATE: &str = "connectors.dev/rotate-requested-at";

impl Harness {
    /// The user's Secret, as a GitOps tool would have applied it.
    fn user_secret(&self) {
        let c = self.sim.credentials();
        self.kube.put(json!({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": {
                "name": "bb", "namespace": NS,
                "labels": {OPT_IN_LABEL: "true", "kustomize.toolkit.fluxcd.io/name": "identity"},
                "annotations": {"kustomize.toolkit.fluxcd.io/checksum": "abc123"},
            },
            "type": "Opaque",
            "stringData": {
                "BATON_USERNAME": c.email, "BATON_APP_PASSWORD": c.api_token,
                "BATON_CLIENT_ID": self.c1.client_id, "BATON_CLIENT_SECRET": self.c1.client_secret,
            },
        }));
    }

    fn connector(&self, name: &str, rotation: Value, suspend: bool) {
        self.kube.put(json!({
            "apiVersion": API, "kind": KIND,
            "metadata": {"name": name, "namespace": NS},
            "spec": {
                "secretRef": {"name": "bb"}, "apiUrl": self.sim.base_url(), "interval": "1h",
                "suspend": suspend,
                "conductorOne": {"apiHost": self.c1.api_host(), "caBundle": self.c1.ca_pem},
                "credentialRotation": rotation,
            },
        }));
    }

    fn rotation(&self, extra: Value) -> Value {
        let mut r = json!({
            "appId": "app-1", "connectorId": "conn-1",
            "credentialId": self.c1.initial_credential_id(),
        });
        for (k, v) in extra.as_object().unwrap() {
            r[k] = v.clone();
        }
        r
    }

    fn annotate(&self, name: &str, value: &str) {
        let mut obj = self.kube.get(API, KIND, Some(NS), name).unwrap();
        obj["metadata"]["annotations"] = json!({ ROTATE: value });
        self.kube.put(obj);
    }

    fn secret_data(&self, name: &str) -> Option<std::collections::BTreeMap<String, String>> {
        let secret = self.kube.get("v1", "Secret", Some(NS), name)?;
        Some(
            secret["data"]
                .as_object()?
                .iter()
                .map(|(k, v)| {
                    let bytes = base64::engine::general_purpose::STANDARD
                        .decode(v.as_str().unwrap())
                        .unwrap();
                    (k.clone(), String::from_utf8(bytes).unwrap())
                })
                .collect(),
        )
    }
}

fn is(obj: &Value, type_: &str, status: &str, reason: &str) -> bool {
    condition(obj, type_).is_some_and(|c| c["status"] == status && c["reason"] == reason)
}

/// Whether `pair` can exchange a token and say Hello.
async fn works(fake: &FakeC1, pair: &Pair) -> bool {
    let Ok(credentials) = ClientCredentials::parse(&pair.client_id, &pair.client_secret) else {
        return false;
    };
    let endpoint = C1Endpoint {
        tenant_host: "acme.conductor.one".into(),
        api_host_override: Some(fake.api_host()),
        extra_ca_pem: Some(fake.ca_pem.clone().into_bytes()),
    };
    let client =
        bitbucket_operator::conductorone::rpc::C1Client::new(Arc::new(credentials), endpoint, "probe", None).unwrap();
    client.hello("").await.is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_annotation_rotates_into_the_operator_secret_and_the_user_secret_is_untouched() {
    let h = Harness::start(true).await;
    h.user_secret();
    let before = h.kube.get("v1", "Secret", Some(NS), "bb").unwrap();
    h.connector("acme", h.rotation(json!({})), false);
    h.wait("acme", |o| is(o, "ConductorOneConnected", "True", "Connected"))
        .await;
    assert!(
        condition(&h.wait("acme", |o| !o["status"].is_null()).await, "CredentialsRotated").is_none(),
        "no condition before any rotation"
    );
    assert!(
        h.c1.recorded()
            .rest_calls
            .iter()
            .all(|c| c.0 != fake_c1::RestCall::Rotate)
    );

    h.annotate("acme", "2026-12-01T12:00:00Z");
    let obj = h
        .wait("acme", |o| {
            o["status"]["credentialRotation"]["lastHandledRotateAt"] == "2026-12-01T12:00:00Z"
                && is(o, "CredentialsRotated", "True", "RotationSucceeded")
        })
        .await;
    let data = h.secret_data("acme-conductorone").expect("the operator's Secret");
    let new_pair = Pair::new(&data["BATON_CLIENT_ID"], &data["BATON_CLIENT_SECRET"]);
    let status = &obj["status"]["credentialRotation"];
    let new_id = status["credentialId"].as_str().unwrap().to_owned();
    assert_eq!(
        h.c1.active_credentials(),
        vec![new_id.clone()],
        "the old credential is revoked"
    );
    assert_eq!(status["fingerprint"], new_pair.fingerprint());
    assert!(status["lastRotationTime"].is_string());
    assert!(!data.contains_key("PENDING_CLIENT_SECRET"), "no pending pair is left");
    assert!(works(&h.c1, &new_pair).await);
    // The operator's Secret: owned by the connector, labelled, opted in.
    let target = h.kube.get("v1", "Secret", Some(NS), "acme-conductorone").unwrap();
    let uid = h.kube.get(API, KIND, Some(NS), "acme").unwrap()["metadata"]["uid"].clone();
    assert_eq!(target["metadata"]["ownerReferences"][0]["uid"], uid);
    assert_eq!(
        target["metadata"]["labels"]["app.kubernetes.io/managed-by"],
        "bitbucket-operator"
    );
    assert_eq!(target["metadata"]["labels"]["connectors.dev/rotated-for"], "acme");
    // The user's Secret is byte-for-byte what GitOps applied.
    assert_eq!(h.kube.get("v1", "Secret", Some(NS), "bb").unwrap(), before);
    assert!(
        h.kube
            .requests()
            .iter()
            .filter(|r| r.path.contains("/secrets/bb"))
            .all(|r| r.method == "GET"),
        "the user's Secret is only read"
    );
    // The session reconnected with the new pair (the old one is revoked).
    h.wait("acme", |o| is(o, "ConductorOneConnected", "True", "Connected"))
        .await;
    let hello = hello_task();
    h.c1.push_task(hello.clone());
    h.c1.wait_for("the hello task's answer", WAIT, |r| {
        r.hellos.iter().any(|x| x.task_id == hello.id)
    })
    .await;
    // Nothing secret is in status, events or metrics.
    let secret_part = new_pair.client_secret.rsplit(':').next().unwrap().to_owned();
    assert!(!obj.to_string().contains(&secret_part));
    assert!(!serde_json::to_string(&h.kube.events()).unwrap().contains(&secret_part));
    assert!(h.kube.events().iter().any(|e| e["reason"] == "CredentialsRotated"));
    let metrics = h.operator.manager.metrics().encode();
    assert!(
        metrics.contains("bitbucket_operator_credential_rotations_total{result=\"succeeded\"} 1"),
        "{metrics}"
    );
    assert!(!metrics.contains(&secret_part));
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_own_credential_says_not_authorized_then_an_api_key_rotates() {
    let h = Harness::start(true).await;
    h.c1.set_refusals(true, false);
    h.user_secret();
    h.connector("acme", h.rotation(json!({})), false);
    h.annotate("acme", "one");
    let obj = h
        .wait("acme", |o| {
            is(o, "CredentialsRotated", "False", "RotationNotAuthorized")
        })
        .await;
    let message = condition(&obj, "CredentialsRotated").unwrap()["message"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        message.contains("apiKeySecretRef") && message.contains("app-1"),
        "{message}"
    );
    assert_eq!(obj["status"]["credentialRotation"]["lastHandledRotateAt"], "one");
    assert!(
        condition(&obj, "Stalled").is_none(),
        "a refused rotation does not stall a connector whose old pair works"
    );
    assert!(h.kube.events().iter().any(|e| e["reason"] == "RotationNotAuthorized"));
    assert_eq!(h.c1.active_credentials(), vec![h.c1.initial_credential_id()]);

    let (key_id, key_secret) = h.c1.add_credential(CredentialKind::ApiKey);
    h.kube.put(json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "c1-api-key", "namespace": NS, "labels": {OPT_IN_LABEL: "true"}},
        "stringData": {"BATON_CLIENT_ID": key_id, "BATON_CLIENT_SECRET": key_secret},
    }));
    let mut connector = h.kube.get(API, KIND, Some(NS), "acme").unwrap();
    connector["spec"]["credentialRotation"]["apiKeySecretRef"] = json!({"name": "c1-api-key"});
    connector["metadata"]["annotations"] = json!({ ROTATE: "two" });
    h.kube.put(connector);
    let obj = h
        .wait("acme", |o| is(o, "CredentialsRotated", "True", "RotationSucceeded"))
        .await;
    let id = obj["status"]["credentialRotation"]["credentialId"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(h.c1.active_credentials(), vec![id]);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_credential_close_to_expiry_is_rotated_before_it_expires() {
    let h = Harness::start(true).await;
    // The clock: the credential in use expires in an hour; rotate 72h before expiry.
    let expires = jiff::Timestamp::now() + jiff::SignedDuration::from_hours(1);
    h.c1.set_expiry(&h.c1.initial_credential_id(), Some(expires));
    h.c1.set_credential_lifetime(Some(jiff::SignedDuration::from_hours(24 * 90)));
    h.user_secret();
    h.connector("acme", h.rotation(json!({"beforeExpiry": "72h"})), false);
    let obj = h
        .wait("acme", |o| is(o, "CredentialsRotated", "True", "RotationSucceeded"))
        .await;
    let status = &obj["status"]["credentialRotation"];
    let message = condition(&obj, "CredentialsRotated").unwrap()["message"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(message.contains("beforeExpiry"), "{message}");
    let new_expiry: jiff::Timestamp = status["expiresTime"].as_str().unwrap().parse().unwrap();
    assert!(new_expiry > expires + jiff::SignedDuration::from_hours(24 * 80));
    let next: jiff::Timestamp = status["nextRotationTime"].as_str().unwrap().parse().unwrap();
    assert_eq!(next, new_expiry - jiff::SignedDuration::from_hours(72));
    let metrics = h.operator.manager.metrics().encode();
    assert!(
        metrics.contains(&format!(
            "bitbucket_operator_credential_expiry_timestamp_seconds{{namespace=\"{NS}\",name=\"acme\"}} {}",
            new_expiry.as_second()
        )),
        "{metrics}"
    );
    // One rotation, not a loop.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(h.c1.recorded().credentials.len(), 2);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_rotation_in_the_secret_is_finished_by_the_operator() {
    let h = Harness::start(true).await;
    h.user_secret();
    // Suspended: the operator does nothing while "the previous process" works.
    h.connector("acme", h.rotation(json!({})), true);
    let obj = h.wait("acme", |o| o["status"]["state"] == "Suspended").await;
    let connector: BitbucketConnector = serde_json::from_value(obj).unwrap();
    let previous = Rotator {
        store: SecretStore::new(h.kube.client(), &connector, "acme-conductorone".into()),
        authority: Authority {
            endpoint: C1Endpoint {
                tenant_host: "acme.conductor.one".into(),
                api_host_override: Some(h.c1.api_host()),
                extra_ca_pem: Some(h.c1.ca_pem.clone().into_bytes()),
            },
            connector: ConnectorRef {
                app_id: "app-1".into(),
                connector_id: "conn-1".into(),
            },
            caller: Caller::Own,
            host_id: "previous".into(),
        },
        base: BaseCredential {
            credential_id: Some(h.c1.initial_credential_id()),
            pair: Pair::new(h.c1.client_id.clone(), h.c1.client_secret.clone()),
        },
    };
    assert_eq!(
        previous
            .advance(Some("annotation:x"), jiff::Timestamp::now())
            .await
            .unwrap(),
        Outcome::Advanced(Step::PendingStored)
    );
    // It crashed here: a pending pair in the Secret, both credentials active.
    let state = previous.store.load().await.unwrap();
    assert!(state.pending.is_some() && state.active.is_none());
    assert_eq!(h.c1.active_credentials().len(), 2);

    let mut obj = h.kube.get(API, KIND, Some(NS), "acme").unwrap();
    obj["spec"]["suspend"] = json!(false);
    h.kube.put(obj);
    let obj = h
        .wait("acme", |o| is(o, "CredentialsRotated", "True", "RotationSucceeded"))
        .await;
    assert!(obj["status"]["credentialRotation"]["step"].is_null());
    let state = previous.store.load().await.unwrap();
    let active = state.active.expect("promoted");
    assert_eq!(h.c1.active_credentials(), vec![active.info.credential_id.clone()]);
    assert!(works(&h.c1, &active.pair).await);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secret_of_the_target_name_not_owned_by_the_operator_is_left_alone() {
    let h = Harness::start(true).await;
    h.user_secret();
    h.kube.put(json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "acme-conductorone", "namespace": NS},
        "stringData": {"unrelated": "value"},
    }));
    let before = h.kube.get("v1", "Secret", Some(NS), "acme-conductorone").unwrap();
    h.connector("acme", h.rotation(json!({})), false);
    h.annotate("acme", "go");
    let obj = h
        .wait("acme", |o| is(o, "CredentialsRotated", "False", "RotationFailed"))
        .await;
    let message = condition(&obj, "CredentialsRotated").unwrap()["message"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(message.contains("targetSecretName"), "{message}");
    assert_eq!(
        h.kube.get("v1", "Secret", Some(NS), "acme-conductorone").unwrap(),
        before
    );
    assert!(
        h.c1.recorded()
            .rest_calls
            .iter()
            .all(|c| c.0 != fake_c1::RestCall::Rotate)
    );
    h.stop().await;
}
