//! The audit log through the data API: `GET …/connectors/{name}/audit`
//! answers a connector's entries only, since `since`, to a caller with a
//! token for the operator's audience and `get` on `bitbucketconnectors/data`
//! of that namespace — the same gate as the inventory endpoints.

pub mod support;

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use bitbucket_operator::api::{AccessGate, ApiState, DataApiSettings, router};
use bitbucket_operator::store::{AuditAction, AuditEntry, Store};
use serde_json::Value;
use support::fake_kube::FakeKube;

const NS: &str = "team-a";

fn entry(at: i64, connector: &str, name: &str, action: AuditAction) -> AuditEntry {
    AuditEntry {
        at,
        action: action.as_str().into(),
        outcome: "succeeded".into(),
        requester: "alice@example.com".into(),
        grant_namespace: NS.into(),
        grant_name: name.into(),
        grant_uid: format!("uid-{name}"),
        connector: connector.into(),
        workspace: "acme".into(),
        target: "repository/api".into(),
        principal: "{u1}".into(),
        level_before: Some("read".into()),
        level_after: Some("write".into()),
        message: format!("{action} {name}"),
        ..AuditEntry::default()
    }
}

async fn get(url: &str, token: Option<&str>) -> (u16, Value) {
    let mut request = reqwest::Client::new().get(url);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn the_audit_endpoint_is_gated_and_filters_by_connector_and_time() {
    let kube = FakeKube::start().await;
    let store = Arc::new(Store::open_in_memory().unwrap());
    let now = jiff::Timestamp::now().as_millisecond();
    let two_days_ago = now - 48 * 3_600_000;
    store
        .append_audit(&entry(two_days_ago, &format!("{NS}/acme"), "old", AuditAction::Grant))
        .unwrap();
    store
        .append_audit(&entry(now - 1_000, &format!("{NS}/acme"), "new", AuditAction::Expire))
        .unwrap();
    store
        .append_audit(&entry(
            now - 500,
            &format!("{NS}/other"),
            "elsewhere",
            AuditAction::Deny,
        ))
        .unwrap();
    kube.add_token("reviewer-token", "alice", &["auditors"]);
    kube.allow_data_reads("alice", NS);
    kube.add_token("stranger-token", "mallory", &[]);
    let state = ApiState {
        kube: kube.client(),
        store: Arc::clone(&store),
        leading: Arc::new(AtomicBool::new(true)),
        decisions: Arc::new(AccessGate::new(DataApiSettings::default())),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let server = tokio::spawn(async move { axum::serve(listener, router(state)).await.unwrap() });
    let url = format!("{base}/api/v1/namespaces/{NS}/connectors/acme/audit");

    // Everything of this connector, oldest first; not the other connector's.
    let (status, body) = get(&url, Some("reviewer-token")).await;
    assert_eq!(status, 200, "{body}");
    let names: Vec<&str> = body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["grant_name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["old", "new"]);
    assert_eq!(body["items"][1]["requester"], "alice@example.com");
    assert_eq!(body["items"][1]["action"], "expire");

    // since: a duration back from now, or an RFC 3339 time.
    let (_, body) = get(&format!("{url}?since=24h"), Some("reviewer-token")).await;
    assert_eq!(body["items"].as_array().unwrap().len(), 1);
    let (_, body) = get(&format!("{url}?since=2999-01-01T00:00:00Z"), Some("reviewer-token")).await;
    assert_eq!(body["items"], serde_json::json!([]));
    let (status, body) = get(&format!("{url}?since=last-week"), Some("reviewer-token")).await;
    assert_eq!(status, 400, "{body}");

    // The same gate as the inventory: no token, or no RBAC rule, no entries.
    assert_eq!(get(&url, None).await.0, 401);
    let (status, body) = get(&url, Some("stranger-token")).await;
    assert_eq!(status, 403, "{body}");
    assert!(!body.to_string().contains("elsewhere"));
    server.abort();
}
