//! The world a `BitbucketAccessGrant` test runs in: the Bitbucket simulator, the fake API
//! server holding an opted-in credentials Secret and the connector `bb` pointed at the
//! simulator, an operator over a store, and the simulator's ground truth to check
//! Bitbucket against. What differs between the grant test files (namespace, the Secret's
//! provisioning switch, the connector's policy, faults, the store) is a parameter.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bitbucket_operator::bitbucket::{Client, ClientConfig, Credentials};
use bitbucket_operator::controller::Operator;
use bitbucket_operator::metrics::Metrics;
use bitbucket_operator::provision::{
    AccessRequest, GrantMode, Permission, PrincipalRef, Provisioner, TargetRef, parse_level,
};
use bitbucket_operator::simulator::{Organisation, SimConfig, Simulator, SimulatorHandle};
use bitbucket_operator::store::Store;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, PostParams};
use serde_json::{Value, json};

use super::fake_kube::FakeKube;
use super::running_operator::allow_only;
use super::status::condition;

pub const API: &str = "connectors.dev/v1alpha1";
pub const GRANT: &str = "BitbucketAccessGrant";
pub const CONNECTOR: &str = "BitbucketConnector";
/// The connector every grant test grants through.
pub const CONNECTOR_NAME: &str = "bb";
/// The connector's credentials Secret.
pub const SECRET_NAME: &str = "bitbucket-credentials";

/// The simulator with its own `seed` (so its own rate-limit budget), on loopback.
pub async fn start_simulator(seed: u64) -> SimulatorHandle {
    Simulator::start(
        SimConfig {
            seed,
            ..SimConfig::default()
        },
        SocketAddr::from(([127, 0, 0, 1], 0)),
    )
    .await
    .unwrap()
}

/// The fake API server with, in `namespace`, the opted-in Secret holding the simulator's
/// credential (`BATON_PROVISIONING` = `provisioning`, absent for `None`) and the
/// [`connector`] `bb` at the simulator with `spec`.
pub async fn fake_api_with_connector(
    sim: &SimulatorHandle,
    namespace: &str,
    provisioning: Option<&str>,
    spec: Value,
) -> FakeKube {
    let fake = FakeKube::start().await;
    let creds = sim.credentials();
    let mut data = json!({"BATON_USERNAME": creds.email, "BATON_APP_PASSWORD": creds.api_token});
    if let Some(switch) = provisioning {
        data["BATON_PROVISIONING"] = json!(switch);
    }
    let secret: Secret = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": SECRET_NAME, "namespace": namespace,
                     "labels": {"connectors.dev/bitbucket-credentials": "true"}},
        "stringData": data,
    }))
    .unwrap();
    Api::<Secret>::namespaced(fake.client(), namespace)
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();
    fake.put(connector(CONNECTOR_NAME, namespace, &sim.base_url(), spec));
    fake
}

/// A connector `name` in `namespace` reading the Secret `bitbucket-credentials`, at
/// `api_url` with a rate limit no test reaches, and the fields of `spec` on top.
pub fn connector(name: &str, namespace: &str, api_url: &str, spec: Value) -> Value {
    let mut full = json!({
        "secretRef": {"name": SECRET_NAME},
        "apiUrl": api_url,
        "rateLimit": {"requestsPerHour": 100000, "maxInFlight": 8},
    });
    if let (Some(base), Some(extra)) = (full.as_object_mut(), spec.as_object()) {
        base.extend(extra.clone());
    }
    json!({
        "apiVersion": API, "kind": CONNECTOR,
        "metadata": {"name": name, "namespace": namespace},
        "spec": full,
    })
}

/// An operator watching every namespace of `fake`, allowed to reach only `api_url`; its
/// tracing goes to the test's output.
pub fn operator(fake: &FakeKube, store: Arc<Store>, api_url: &str) -> Operator {
    super::running_operator::trace_to_test_output();
    Operator::new(
        fake.client(),
        store,
        Arc::new(Metrics::default()),
        vec![],
        allow_only(api_url),
    )
}

/// Waits until connector `name` in `namespace` is Ready (the operator read its Secret).
pub async fn wait_connector_ready(fake: &FakeKube, namespace: &str, name: &str, within: Duration) {
    fake.wait_for(API, CONNECTOR, Some(namespace), name, within, |c| {
        condition(c, "Ready").is_some_and(|r| r["status"] == "True")
    })
    .await;
}

/// The plain (not owner) members of workspace `ws`: nickname and UUID.
pub fn plain_members(org: &Organisation, ws: usize) -> Vec<(String, String)> {
    org.workspaces[ws]
        .members
        .iter()
        .filter(|m| !m.owner)
        .map(|m| {
            let u = org.users.iter().find(|u| u.uuid == m.user_uuid).unwrap();
            (u.nickname.clone(), u.uuid.clone())
        })
        .collect()
}

/// A Bitbucket client with the simulator's API-token credential, for writes outside the
/// operator.
pub fn bitbucket_client(sim: &SimulatorHandle) -> Client {
    let creds = sim.credentials();
    Client::new(
        ClientConfig::new(&sim.base_url()).unwrap(),
        Credentials::ApiToken {
            username: creds.email.clone(),
            token: creds.api_token.clone(),
        },
    )
    .unwrap()
}

/// Ground truth: the explicit level the user `uuid` holds on repository `repo` of
/// workspace `ws`.
pub fn explicit_level(sim: &SimulatorHandle, ws: &str, repo: &str, uuid: &str) -> Option<String> {
    let org = sim.organisation();
    let ws = org.workspaces.iter().find(|w| w.slug == ws).unwrap();
    let repo = ws.repositories.iter().find(|r| r.slug == repo).unwrap();
    repo.user_permissions
        .iter()
        .find(|p| p.principal == uuid)
        .map(|p| p.permission.clone())
}

/// Sets the explicit level of user `uuid` on `repo` straight through the provisioner,
/// outside the operator (`None`: removes whatever level is held).
pub async fn set_level(bitbucket: &Client, ws: &str, uuid: &str, repo: &str, level: Option<&str>) {
    let provisioner = Provisioner::new(bitbucket.clone(), true);
    let request = |permission| {
        AccessRequest::new(
            ws.to_owned(),
            PrincipalRef::User(uuid.to_owned()),
            TargetRef::Repository(repo.to_owned()),
            permission,
        )
    };
    match level.map(|l| parse_level(l).unwrap().unwrap()) {
        Some(permission) => {
            provisioner.grant(&request(permission), GrantMode::Exact).await.unwrap();
        }
        None => {
            let held = provisioner.inspect(&request(Permission::Read)).await.unwrap().level;
            if let Some(held) = held {
                provisioner.revoke(&request(held)).await.unwrap();
            }
        }
    }
}

/// Events about the object `kind`/`name`: (type, reason, note).
pub fn events_about(fake: &FakeKube, kind: &str, name: &str) -> Vec<(String, String, String)> {
    fake.events()
        .into_iter()
        .filter(|e| e["regarding"]["name"] == name && e["regarding"]["kind"] == kind)
        .map(|e| {
            let s = |v: &Value| v.as_str().unwrap_or_default().to_owned();
            (s(&e["type"]), s(&e["reason"]), s(&e["note"]))
        })
        .collect()
}

/// Waits for an Event with `reason` about `kind`/`name`; returns its type and note.
pub async fn wait_event(fake: &FakeKube, kind: &str, name: &str, reason: &str, within: Duration) -> (String, String) {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Some((type_, _, note)) = events_about(fake, kind, name).into_iter().find(|(_, r, _)| r == reason) {
            return (type_, note);
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no {reason} event for {name}; events: {:?}",
            events_about(fake, kind, name)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `secs` from now, whole seconds, as an RFC 3339 timestamp (a grant's `expiresAt`).
pub fn in_secs(secs: i64) -> String {
    jiff::Timestamp::now()
        .checked_add(jiff::SignedDuration::from_secs(secs))
        .unwrap()
        .round(jiff::Unit::Second)
        .unwrap()
        .to_string()
}
