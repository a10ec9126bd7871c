//! The operator runs one ConductorOne service-mode session per connector
//! whose Secret holds BATON_CLIENT_ID / BATON_CLIENT_SECRET: against the
//! fake API server (tests/support/fake_kube.rs), the Bitbucket simulator and
//! the fake ConductorOne tenant (tests/support/fake_c1.rs).

pub mod support;

use std::time::Duration;

use serde_json::{Value, json};
use support::c1_operator::{API, Harness, KIND, NS, OPT_IN_LABEL, WAIT};
use support::fake_c1::sync_full_task;
use support::status::condition;

impl Harness {
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
