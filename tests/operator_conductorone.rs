//! The operator runs one ConductorOne service-mode session per connector
//! whose Secret holds BATON_CLIENT_ID / BATON_CLIENT_SECRET: against the
//! fake API server (tests/support/fake_kube.rs), the Bitbucket simulator and
//! the fake ConductorOne tenant (tests/support/fake_c1.rs).

pub mod support;

#[path = "support/fake_c1.rs"]
mod fake_c1;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bitbucket_operator::controller::{Operator, wait_for};
use bitbucket_operator::egress::EgressArgs;
use bitbucket_operator::metrics::Metrics;
use bitbucket_operator::simulator::{SimConfig, Simulator, SimulatorHandle};
use bitbucket_operator::store::Store;
use fake_c1::{FakeC1, FakeOptions, sync_full_task};
use serde_json::{Value, json};
use support::fake_kube::FakeKube;
use tokio::sync::watch;

const API: &str = "connectors.dev/v1alpha1";
const KIND: &str = "BitbucketConnector";
const NS: &str = "identity";
const WAIT: Duration = Duration::from_secs(30);
const OPT_IN_LABEL: &str = "connectors.dev/bitbucket-credentials";

struct Harness {
    kube: FakeKube,
    sim: SimulatorHandle,
    c1: FakeC1,
    operator: Arc<Operator>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Harness {
    /// `allow_c1`: whether the administrator lists the fake tenant's host.
    async fn start(allow_c1: bool) -> Harness {
        let kube = FakeKube::start().await;
        let sim = Simulator::start(SimConfig::default(), SocketAddr::from(([127, 0, 0, 1], 0)))
            .await
            .unwrap();
        let c1 = FakeC1::start(FakeOptions::default()).await;
        let mut egress = EgressArgs {
            allowed_api_urls: vec![sim.base_url()],
            ..EgressArgs::default()
        };
        if allow_c1 {
            egress.allowed_conductorone_urls = vec![format!("https://{}", c1.api_host())];
        }
        let operator = Arc::new(Operator::new(
            kube.client(),
            Arc::new(Store::open_in_memory().unwrap()),
            Arc::new(Metrics::default()),
            vec![],
            egress.policy().expect("a valid allow-list"),
        ));
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn({
            let operator = Arc::clone(&operator);
            async move { operator.run_controllers(wait_for(stopped)).await }
        });
        Harness {
            kube,
            sim,
            c1,
            operator,
            stop,
            task,
        }
    }

    async fn stop(self) {
        let _ = self.stop.send(true);
        tokio::time::timeout(WAIT, self.task)
            .await
            .expect("controllers stop on shutdown")
            .unwrap();
        self.sim.shutdown().await;
    }

    /// An opted-in Secret with the simulator's Bitbucket credential and this client secret.
    fn secret(&self, client_secret: &str) {
        let c = self.sim.credentials();
        self.kube.put(json!({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": "bb", "namespace": NS, "labels": {OPT_IN_LABEL: "true"}},
            "type": "Opaque",
            "stringData": {
                "BATON_USERNAME": c.email, "BATON_APP_PASSWORD": c.api_token,
                "BATON_CLIENT_ID": self.c1.client_id, "BATON_CLIENT_SECRET": client_secret,
            },
        }));
    }

    /// A connector pointed at the fake tenant (its host and CA).
    fn connector(&self, name: &str) {
        self.kube.put(json!({
            "apiVersion": API, "kind": KIND,
            "metadata": {"name": name, "namespace": NS},
            "spec": {
                "secretRef": {"name": "bb"}, "apiUrl": self.sim.base_url(), "interval": "1h",
                "conductorOne": {"apiHost": self.c1.api_host(), "caBundle": self.c1.ca_pem, "maxSnapshotAge": "1h"},
            },
        }));
    }

    async fn wait(&self, name: &str, pred: impl Fn(&Value) -> bool) -> Value {
        self.kube.wait_for(API, KIND, Some(NS), name, WAIT, pred).await
    }
}

fn condition<'a>(obj: &'a Value, type_: &str) -> Option<&'a Value> {
    obj["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)
}

fn c1_condition(obj: &Value) -> (String, String) {
    condition(obj, "ConductorOneConnected")
        .map(|c| {
            (
                c["status"].as_str().unwrap_or_default().to_owned(),
                c["reason"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .unwrap_or_default()
}

fn c1_is(obj: &Value, status: &str, reason: &str) -> bool {
    c1_condition(obj) == (status.to_owned(), reason.to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valid_client_credentials_connect_and_a_sync_full_task_is_uploaded() {
    let h = Harness::start(true).await;
    h.secret(&h.c1.client_secret.clone());
    h.connector("acme");
    h.wait("acme", |o| c1_is(o, "True", "Connected")).await;
    assert!(
        h.c1.recorded()
            .hellos
            .iter()
            .all(|hello| hello.host_id == format!("{NS}/acme")),
        "the host id names the connector"
    );

    h.c1.push_task(sync_full_task());
    let obj = h
        .wait("acme", |o| !o["status"]["conductorOne"]["lastUpload"].is_null())
        .await;
    let status = &obj["status"]["conductorOne"];
    assert_eq!(status["hostId"], format!("{NS}/acme"));
    assert!(status["lastUpload"]["bytes"].as_i64().unwrap() > 0);
    assert!(status["lastUpload"]["resources"].as_i64().unwrap() > 0);
    let obj = h
        .wait("acme", |o| {
            o["status"]["conductorOne"]["lastTask"]["type"] == "sync_full"
        })
        .await;
    let status = &obj["status"]["conductorOne"];
    assert_eq!(status["lastTask"]["result"], "succeeded");
    assert_eq!(status["taskCounts"]["sync_full"]["succeeded"], 1);
    {
        let recorded = h.c1.recorded();
        assert_eq!(recorded.uploads.len(), 1);
        let file = recorded.uploads[0].c1z();
        assert!(file.verify().is_ok(), "the upload is a consistent c1z");
        assert!(file.resources.iter().any(|r| r.resource_type_id == "workspace"));
    }
    assert_eq!(
        h.kube
            .events()
            .iter()
            .filter(|e| e["reason"] == "ConductorOneConnected")
            .count(),
        1,
        "one Event for the transition"
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_client_secret_is_reported_without_its_text() {
    let h = Harness::start(true).await;
    const SECRET_TEXT: &str = "Zm9vYmFyLXRvcC1zZWNyZXQtdmFsdWUtOTk5";
    h.secret(&format!("secret-token:conductorone.com:v1:{SECRET_TEXT}!!"));
    h.connector("acme");
    let obj = h.wait("acme", |o| c1_is(o, "False", "InvalidClientCredentials")).await;
    assert!(
        condition(&obj, "Connected").is_some_and(|c| c["status"] == "True"),
        "Bitbucket syncing is not held back by ConductorOne"
    );
    let sent = {
        let c1 = h.c1.recorded();
        (c1.token_requests, c1.hellos.len())
    };
    assert_eq!(sent, (0, 0), "nothing is sent");
    tokio::time::sleep(Duration::from_millis(300)).await;
    for request in h.kube.requests() {
        assert!(
            !request.body.contains(SECRET_TEXT),
            "{} {}",
            request.method,
            request.path
        );
    }
    let events = serde_json::to_string(&h.kube.events()).unwrap();
    assert!(!events.contains(SECRET_TEXT));
    assert!(events.contains("ConductorOneDisconnected"), "a Warning Event says why");
    assert!(!h.operator.manager.metrics().encode().contains(SECRET_TEXT));
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_host_off_the_allow_list_is_never_contacted() {
    let h = Harness::start(false).await;
    h.secret(&h.c1.client_secret.clone());
    h.connector("acme");
    let obj = h.wait("acme", |o| c1_is(o, "False", "ApiUrlNotAllowed")).await;
    let message = condition(&obj, "ConductorOneConnected").unwrap()["message"].clone();
    assert!(
        message.as_str().unwrap().contains("--allowed-conductorone-urls"),
        "{message}"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let sent = {
        let c1 = h.c1.recorded();
        (c1.token_requests, c1.hellos.len(), c1.get_tasks)
    };
    assert_eq!(sent, (0, 0, 0));
    assert!(!h.operator.manager.sessions().is_running(&format!("{NS}/acme")));
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_the_connector_or_disabling_conductorone_stops_the_session() {
    let h = Harness::start(true).await;
    h.secret(&h.c1.client_secret.clone());
    h.connector("acme");
    h.connector("beta");
    h.wait("acme", |o| c1_is(o, "True", "Connected")).await;
    h.wait("beta", |o| c1_is(o, "True", "Connected")).await;

    // Disabling removes the condition and the status, and stops polling.
    let mut beta = h.kube.get(API, KIND, Some(NS), "beta").unwrap();
    beta["spec"]["conductorOne"]["enabled"] = json!(false);
    h.kube.put(beta);
    let obj = h
        .wait("beta", |o| condition(o, "ConductorOneConnected").is_none())
        .await;
    assert!(obj["status"]["conductorOne"].is_null());
    assert!(!h.operator.manager.sessions().is_running(&format!("{NS}/beta")));

    h.kube.delete(API, KIND, Some(NS), "acme");
    h.kube.wait_for_absent(API, KIND, Some(NS), "acme", WAIT).await;
    assert!(!h.operator.manager.sessions().is_running(&format!("{NS}/acme")));
    let polls = h.c1.recorded().get_tasks;
    // The fake asks for a poll every 50 ms, clamped to 1 s: a live session would poll again.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(h.c1.recorded().get_tasks, polls, "no session polls any more");
    h.stop().await;
}
