//! Issue 12, credential capture through `spec.apiUrl`: whoever may create a
//! `BitbucketConnector` must not be able to point it at a server of their own
//! and receive the Secret's credential. A loopback listener records every
//! request it gets; a connector aimed at it is refused before any request
//! unless the administrator lists it (`run --allowed-api-urls`).

pub mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bitbucket_operator::controller::{Operator, wait_for};
use bitbucket_operator::egress::{EgressArgs, EgressPolicy};
use bitbucket_operator::metrics::Metrics;
use bitbucket_operator::store::Store;
use serde_json::{Value, json};
use support::fake_kube::FakeKube;
use support::status::condition;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

const API: &str = "connectors.dev/v1alpha1";
const KIND: &str = "BitbucketConnector";
const NS: &str = "tenant";
const WAIT: Duration = Duration::from_secs(30);
const TOKEN: &str = "captured-service-account-token-7f3a";

/// A plain TCP listener on loopback that keeps the head of every request
/// it receives and answers 401.
struct Recorder {
    url: String,
    heads: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Recorder {
    async fn start() -> Recorder {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let heads = Arc::new(Mutex::new(Vec::new()));
        let task = tokio::spawn({
            let heads = Arc::clone(&heads);
            async move {
                while let Ok((mut stream, _)) = listener.accept().await {
                    let heads = Arc::clone(&heads);
                    tokio::spawn(async move {
                        let mut head = Vec::new();
                        let mut buf = [0u8; 4096];
                        // Bounded: a head is small, and this listener only records.
                        while head.len() < 64 * 1024 && !head.windows(4).any(|w| w == b"\r\n\r\n") {
                            match tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await {
                                Ok(Ok(n)) if n > 0 => head.extend_from_slice(&buf[..n]),
                                _ => break,
                            }
                        }
                        heads.lock().unwrap().push(String::from_utf8_lossy(&head).into_owned());
                        let _ = stream
                            .write_all(b"HTTP/1.1 401 Unauthorized\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                            .await;
                    });
                }
            }
        });
        Recorder { url, heads, task }
    }

    fn heads(&self) -> Vec<String> {
        self.heads.lock().unwrap().clone()
    }

    fn authorizations(&self) -> Vec<String> {
        self.heads()
            .iter()
            .flat_map(|h| h.lines().map(str::to_owned).collect::<Vec<_>>())
            .filter(|l| l.to_ascii_lowercase().starts_with("authorization:"))
            .collect()
    }
}

fn policy(urls: &[&str]) -> EgressPolicy {
    EgressArgs {
        allowed_api_urls: urls.iter().map(|u| u.to_string()).collect(),
        ..EgressArgs::default()
    }
    .policy()
    .unwrap()
}

fn start(kube: &FakeKube, egress: EgressPolicy) -> (watch::Sender<bool>, tokio::task::JoinHandle<()>) {
    let operator = Arc::new(Operator::new(
        kube.client(),
        Arc::new(Store::open_in_memory().unwrap()),
        Arc::new(Metrics::default()),
        vec![],
        egress,
    ));
    let (stop, stopped) = watch::channel(false);
    let task = tokio::spawn(async move { operator.run_controllers(wait_for(stopped)).await });
    (stop, task)
}

async fn stop(stop: watch::Sender<bool>, task: tokio::task::JoinHandle<()>) {
    let _ = stop.send(true);
    tokio::time::timeout(WAIT, task).await.expect("stops").unwrap();
}

fn reason(obj: &Value, type_: &str) -> String {
    condition(obj, type_)
        .and_then(|c| c["reason"].as_str())
        .unwrap_or_default()
        .to_owned()
}

fn setup(kube: &FakeKube, connectors: &[(&str, &str)]) {
    kube.put(json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "bb", "namespace": NS, "labels": {"connectors.dev/bitbucket-credentials": "true"}},
        "stringData": {"BATON_TOKEN": TOKEN},
    }));
    for (name, url) in connectors {
        kube.put(json!({
            "apiVersion": API, "kind": KIND,
            "metadata": {"name": name, "namespace": NS},
            "spec": {"secretRef": {"name": "bb"}, "apiUrl": url},
        }));
    }
}

#[tokio::test]
async fn a_connector_cannot_send_the_credential_to_a_server_the_administrator_did_not_allow() {
    let capture = Recorder::start().await;
    let port = capture.url.rsplit(':').next().unwrap().to_owned();
    let kube = FakeKube::start().await;
    // Every spelling aims at the same recording listener.
    let attempts = [
        ("direct", capture.url.clone()),
        ("userinfo", format!("http://api.bitbucket.org@127.0.0.1:{port}")),
        ("localhost", format!("http://localhost:{port}")),
        ("https-port", format!("https://127.0.0.1:{port}")),
    ];
    let pairs: Vec<(&str, &str)> = attempts.iter().map(|(n, u)| (*n, u.as_str())).collect();
    setup(&kube, &pairs);
    // The default allow-list: Bitbucket Cloud only.
    let (stop_tx, task) = start(&kube, EgressPolicy::default());

    for (name, url) in &attempts {
        let obj = kube
            .wait_for(API, KIND, Some(NS), name, WAIT, |o| {
                reason(o, "Connected") == "ApiUrlNotAllowed"
            })
            .await;
        assert_eq!(condition(&obj, "Connected").unwrap()["status"], "False");
        assert_eq!(condition(&obj, "Stalled").unwrap()["status"], "True", "{name}: stalled");
        assert_eq!(reason(&obj, "Stalled"), "ApiUrlNotAllowed");
        let message = condition(&obj, "Connected").unwrap()["message"]
            .as_str()
            .unwrap()
            .to_owned();
        assert!(message.contains("--allowed-api-urls"), "{message}");
        assert!(!obj.to_string().contains(TOKEN), "{name}: {obj}");
        if *name == "direct" {
            assert!(message.contains(url.as_str()), "names the refused URL: {message}");
            assert!(
                message.contains("https://api.bitbucket.org"),
                "names the allow-list: {message}"
            );
        }
    }
    let warnings = kube
        .events()
        .into_iter()
        .filter(|e| e["reason"] == "ApiUrlNotAllowed" && e["type"] == "Warning")
        .count();
    assert_eq!(warnings, attempts.len(), "one Warning Event per refused connector");
    // Give any stray request time to arrive.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        capture.heads().is_empty(),
        "nothing may reach a server that is not allowed: {:?}",
        capture.heads()
    );
    stop(stop_tx, task).await;

    // The administrator lists it: now (and only now) the credential goes there.
    let (stop_tx, task) = start(&kube, policy(&["https://api.bitbucket.org", &capture.url]));
    let obj = kube
        .wait_for(API, KIND, Some(NS), "direct", WAIT, |o| {
            reason(o, "Connected") == "InvalidCredentials"
        })
        .await;
    assert!(!obj.to_string().contains(TOKEN));
    let authorizations = capture.authorizations();
    assert!(
        authorizations.iter().any(|a| a.contains(TOKEN)),
        "an allowed URL receives the credential: {authorizations:?}"
    );
    // The other spellings stay refused: they are not what was listed.
    for name in ["userinfo", "localhost", "https-port"] {
        let obj = kube.get(API, KIND, Some(NS), name).unwrap();
        assert_eq!(reason(&obj, "Connected"), "ApiUrlNotAllowed", "{name}");
    }
    stop(stop_tx, task).await;
    capture.task.abort();
}

#[test]
fn run_takes_the_allow_list_from_the_flag_and_refuses_a_bad_one_at_startup() {
    // Plain http to a host that is not a loopback IP cannot be allowed: `run`
    // stops with a usage-like error before connecting to anything.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_bitbucket-operator"))
        .args(["run", "--allowed-api-urls", "http://bitbucket.internal"])
        .env("KUBECONFIG", "/nonexistent/kubeconfig")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("--allowed-api-urls"), "{stderr}");
    assert!(stderr.contains("plain http"), "{stderr}");
    assert!(
        !stderr.contains("connecting to the Kubernetes API"),
        "refused before connecting: {stderr}"
    );

    // The environment variable works like the flag.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_bitbucket-operator"))
        .args(["run"])
        .env("ALLOWED_API_URLS", "https://api.bitbucket.org,http://127.0.0.1:7990")
        .env("KUBECONFIG", "/nonexistent/kubeconfig")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("connecting to the Kubernetes API"), "{stderr}");
}
