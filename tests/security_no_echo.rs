//! Issue 12, no Secret value ever echoed: every key of every Secret holds a
//! distinct marker (renamed keys, invalid values, keys pointed at other
//! fields' keys, a Secret that has not opted in), the operator runs against
//! the fake API server and the simulator, and everything it emits is
//! searched: status and conditions, Events, every request it sent to the
//! API server, its logs, its metrics, and the Display and Debug text of the
//! errors its parsers return.

pub mod support;

use std::io::Write;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bitbucket_operator::controller::{Operator, wait_for};
use bitbucket_operator::crd::BitbucketConnector;
use bitbucket_operator::egress::EgressArgs;
use bitbucket_operator::metrics::Metrics;
use bitbucket_operator::settings::{ConnectorSettings, SecretKeys};
use bitbucket_operator::simulator::{SimConfig, Simulator};
use bitbucket_operator::store::Store;
use k8s_openapi::api::core::v1::Secret;
use serde_json::{Value, json};
use support::fake_kube::FakeKube;
use tokio::sync::watch;

const API: &str = "connectors.dev/v1alpha1";
const NS: &str = "tenant";
const WAIT: Duration = Duration::from_secs(30);
const LABEL: &str = "connectors.dev/bitbucket-credentials";

/// The log lines of this test binary, in memory.
#[derive(Clone, Default)]
struct LogBuffer(Arc<Mutex<Vec<u8>>>);

impl Write for LogBuffer {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl LogBuffer {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

/// A distinct marker: `qzxNNqzx` plus a tail that makes it fit (or break)
/// the field it is put in. Searched case-insensitively by its core.
fn marker(n: u32, tail: &str) -> String {
    format!("qzx{n:02}qzx{tail}")
}

fn secret(name: &str, labelled: bool, data: &[(&str, String)]) -> Value {
    let labels = if labelled { json!({LABEL: "true"}) } else { json!({}) };
    let data: serde_json::Map<String, Value> = data.iter().map(|(k, v)| ((*k).to_owned(), json!(v))).collect();
    json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": name, "namespace": NS, "labels": labels},
        "stringData": data,
    })
}

fn connector(name: &str, secret: &str, api_url: &str, extra: Value) -> Value {
    let mut spec = json!({"secretRef": {"name": secret}, "apiUrl": api_url, "interval": "1h"});
    spec.as_object_mut()
        .unwrap()
        .extend(extra.as_object().cloned().unwrap_or_default());
    json!({
        "apiVersion": API, "kind": "BitbucketConnector",
        "metadata": {"name": name, "namespace": NS},
        "spec": spec,
    })
}

fn reason(obj: &Value, type_: &str) -> String {
    obj["status"]["conditions"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["type"] == type_))
        .and_then(|c| c["reason"].as_str())
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_value_appears_in_anything_the_operator_emits() {
    let logs = LogBuffer::default();
    let writer = logs.clone();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(
            "info,bitbucket_operator=trace,bitbucket_operator::simulator=off",
        ))
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .init();

    let sim = Simulator::start(SimConfig::default(), SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .unwrap();
    let creds = sim.credentials().clone();
    let url = sim.base_url();
    let kube = FakeKube::start().await;

    // 1. Every default key, each a marker; the workspace list is not a slug
    //    and the provisioning switch not a boolean.
    let every_key: Vec<(&str, String)> = vec![
        ("BATON_USERNAME", marker(1, "@example.com")),
        ("BATON_APP_PASSWORD", marker(2, "-ATATT")),
        ("BATON_TOKEN", marker(3, "-token")),
        ("BATON_CONSUMER_KEY", marker(4, "-ck")),
        ("BATON_CONSUMER_SECRET", marker(5, "-cs")),
        ("BATON_WORKSPACES", marker(6, " Not A Slug")),
        ("BATON_PROVISIONING", marker(7, "-maybe")),
        ("BATON_CLIENT_ID", marker(8, "@tenant.conductor.one/x")),
        ("BATON_CLIENT_SECRET", marker(9, "-c1secret")),
    ];
    kube.put(secret("every-key", true, &every_key));
    kube.put(connector("every-key", "every-key", &url, json!({})));

    // 2. The attack: `workspaces` (and `provisioning`) pointed at credential keys.
    kube.put(connector(
        "attack",
        "every-key",
        &url,
        json!({"secretKeys": {"workspaces": "BATON_APP_PASSWORD", "provisioning": "BATON_TOKEN"}}),
    ));

    // 3. Every field renamed; the provisioning switch not a boolean. Then
    //    (`renamed-creds`) the workspace list a valid slug and the
    //    credentials sent to Bitbucket, which rejects them.
    let renamed: Vec<(&str, String)> = vec![
        ("login", marker(10, "@example.com")),
        ("pw", marker(11, "-ATATT")),
        ("tok", marker(12, "-token")),
        ("ck", marker(13, "-ck")),
        ("cs", marker(14, "-cs")),
        ("ws", marker(15, "")),
        ("prov", marker(16, "-nope")),
        ("cid", marker(17, "@tenant.conductor.one/y")),
        ("csec", marker(18, "-c1secret")),
        // Not named by any field: never read.
        ("BATON_USERNAME", marker(19, "@unread.example.com")),
    ];
    kube.put(secret("renamed", true, &renamed));
    let renames = json!({"secretKeys": {
        "username": "login", "appPassword": "pw", "token": "tok", "consumerKey": "ck",
        "consumerSecret": "cs", "workspaces": "ws", "provisioning": "prov",
        "clientId": "cid", "clientSecret": "csec",
    }});
    kube.put(connector("renamed", "renamed", &url, renames.clone()));
    // The same without the provisioning rename, so the renamed credentials
    // and workspace list reach Bitbucket.
    let mut to_bitbucket = renames.clone();
    to_bitbucket["secretKeys"]
        .as_object_mut()
        .unwrap()
        .remove("provisioning");
    kube.put(connector("renamed-creds", "renamed", &url, to_bitbucket));

    // 4. Good credentials, a workspace that does not exist (a valid slug
    //    Bitbucket answers "not found" for), platform credentials as markers.
    let ghost: Vec<(&str, String)> = vec![
        ("BATON_USERNAME", creds.email.clone()),
        ("BATON_APP_PASSWORD", creds.api_token.clone()),
        ("BATON_WORKSPACES", marker(20, "")),
        ("BATON_CLIENT_ID", marker(21, "@tenant.conductor.one/z")),
        ("BATON_CLIENT_SECRET", marker(22, "-c1secret")),
    ];
    kube.put(secret("ghost", true, &ghost));
    kube.put(connector("ghost", "ghost", &url, json!({})));

    // 5. A connector that syncs fully, with provisioning and platform markers.
    let good: Vec<(&str, String)> = vec![
        ("BATON_USERNAME", creds.email.clone()),
        ("BATON_APP_PASSWORD", creds.api_token.clone()),
        ("BATON_PROVISIONING", "true".into()),
        ("BATON_CLIENT_ID", marker(23, "@tenant.conductor.one/w")),
        ("BATON_CLIENT_SECRET", marker(24, "-c1secret")),
    ];
    kube.put(secret("good", true, &good));
    kube.put(connector("good", "good", &url, json!({})));

    // 6. A Secret that has not opted in: nothing of it is read.
    let unlabelled: Vec<(&str, String)> = vec![
        ("BATON_TOKEN", marker(25, "-token")),
        ("BATON_WORKSPACES", marker(26, " Bad")),
    ];
    kube.put(secret("unlabelled", false, &unlabelled));
    kube.put(connector("unlabelled", "unlabelled", &url, json!({})));

    // 7. A URL carrying a marker as user info, refused by the allow-list.
    let userinfo_url = format!("https://{}:{}@evil.example", marker(27, ""), marker(28, ""));
    kube.put(connector("userinfo", "good", &userinfo_url, json!({})));

    // A grant whose connector's Secret has an unreadable provisioning switch.
    kube.put(json!({
        "apiVersion": API, "kind": "BitbucketAccessGrant",
        "metadata": {"name": "g", "namespace": NS},
        "spec": {"connectorRef": {"name": "every-key"}, "principal": {"user": "jdoe"},
                 "target": {"workspace": "acme", "repository": "api"}, "permission": "read"},
    }));

    let egress = EgressArgs {
        allowed_api_urls: vec!["https://api.bitbucket.org".into(), url.clone()],
        ..EgressArgs::default()
    }
    .policy()
    .unwrap();
    let operator = Arc::new(Operator::new(
        kube.client(),
        Arc::new(Store::open_in_memory().unwrap()),
        Arc::new(Metrics::default()),
        vec![],
        egress.clone(),
    ));
    let (stop, stopped) = watch::channel(false);
    let task = tokio::spawn({
        let operator = Arc::clone(&operator);
        async move { operator.run_controllers(wait_for(stopped)).await }
    });

    let expect = [
        ("every-key", "InvalidSpec"),
        ("attack", "InvalidSecretKeys"),
        ("renamed", "InvalidSpec"),
        ("renamed-creds", "InvalidCredentials"),
        ("ghost", "WorkspaceNotFound"),
        ("good", "Connected"),
        ("unlabelled", "SecretNotOptedIn"),
        ("userinfo", "ApiUrlNotAllowed"),
    ];
    for (name, expected) in expect {
        kube.wait_for(API, "BitbucketConnector", Some(NS), name, WAIT, |o| {
            reason(o, "Connected") == expected
        })
        .await;
    }
    kube.wait_for(API, "BitbucketConnector", Some(NS), "good", WAIT, |o| {
        reason(o, "Ready") == "SyncSucceeded"
    })
    .await;
    kube.wait_for(API, "BitbucketAccessGrant", Some(NS), "g", WAIT, |o| {
        o["status"]["conditions"].is_array()
    })
    .await;
    // Let Events and logs of the last transitions land.
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Everything emitted.
    let mut emitted: Vec<(String, String)> = Vec::new();
    for kind in ["BitbucketConnector", "BitbucketAccessGrant"] {
        for obj in kube.list(API, kind, Some(NS)) {
            // The status is what the operator writes (the spec is the test's).
            emitted.push((
                format!("{kind} {} status", obj["metadata"]["name"]),
                obj["status"].to_string(),
            ));
        }
    }
    for event in kube.events() {
        emitted.push(("Event".into(), event.to_string()));
    }
    for request in kube.requests() {
        emitted.push((
            format!("request {} {}", request.method, request.path),
            format!("{}?{} {}", request.path, request.query, request.body),
        ));
    }
    emitted.push(("metrics".into(), operator.metrics.encode()));
    // The parsers' errors, as any caller would print them.
    let connectors: Vec<BitbucketConnector> = kube
        .list(API, "BitbucketConnector", Some(NS))
        .into_iter()
        .map(|c| serde_json::from_value(c).unwrap())
        .collect();
    for obj in &connectors {
        let Some(stored) = kube.get("v1", "Secret", Some(NS), &obj.spec.secret_ref.name) else {
            continue;
        };
        let stored: Secret = serde_json::from_value(stored).unwrap();
        if let Err(err) = ConnectorSettings::from_secret(&stored, &obj.spec.secret_keys()) {
            emitted.push((
                format!("settings error of {}", obj.spec.secret_ref.name),
                format!("{err} {err:?}"),
            ));
        }
    }
    let attack_keys = SecretKeys {
        workspaces: Some("BATON_APP_PASSWORD".into()),
        ..SecretKeys::default()
    };
    let err = bitbucket_operator::settings::settings_from_manifest(
        &serde_json::to_string(&secret("every-key", true, &every_key)).unwrap(),
    )
    .unwrap_err();
    emitted.push(("manifest error".into(), err));
    let every_key_map = every_key.iter().map(|(k, v)| ((*k).to_owned(), v.clone())).collect();
    let err = ConnectorSettings::from_map(&every_key_map, &attack_keys).unwrap_err();
    emitted.push(("attack error".into(), format!("{err} {err:?}")));
    let err = egress.check_bitbucket_url(&userinfo_url).unwrap_err();
    emitted.push(("egress error".into(), format!("{err} {err:?}")));

    let _ = stop.send(true);
    tokio::time::timeout(WAIT, task).await.expect("stops").unwrap();
    sim.shutdown().await;
    emitted.push(("logs".into(), logs.text()));
    assert!(logs.text().contains("reconcile"), "logs were captured");

    // Search: every marker by its core, the real credentials in full.
    let mut needles: Vec<String> = (1..=28).map(|n| format!("qzx{n:02}qzx")).collect();
    needles.push(creds.api_token.clone());
    needles.push(creds.email.clone());
    let mut leaks = Vec::new();
    for (place, text) in &emitted {
        let lower = text.to_lowercase();
        for needle in &needles {
            if lower.contains(&needle.to_lowercase()) {
                let at = lower.find(&needle.to_lowercase()).unwrap();
                let start = text[..at].char_indices().rev().nth(120).map_or(0, |(i, _)| i);
                let end = (at + needle.len() + 80).min(text.len());
                let end = (end..=text.len())
                    .find(|i| text.is_char_boundary(*i))
                    .unwrap_or(text.len());
                leaks.push(format!("{needle} in {place}: …{}…", &text[start..end]));
            }
        }
    }
    assert!(leaks.is_empty(), "Secret values leaked:\n{}", leaks.join("\n"));
}
