//! The operator against an API double (an in-process fake Kubernetes API
//! server speaking the real wire format) and the Bitbucket simulator: the
//! BitbucketConnector lifecycle end to end, with no cluster.

pub mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bitbucket_operator::controller::{Operator, wait_for};
use bitbucket_operator::metrics::Metrics;
use bitbucket_operator::model::SyncKind;
use bitbucket_operator::simulator::{SimConfig, Simulator, SimulatorHandle};
use bitbucket_operator::store::Store;
use serde::Deserialize;
use serde_json::{Value, json};
use support::fake_kube::FakeKube;
use support::running_operator::allow_only;
use support::status::condition;
use tokio::sync::watch;

const API: &str = "connectors.dev/v1alpha1";
const KIND: &str = "BitbucketConnector";
const NS: &str = "identity";
const WAIT: Duration = Duration::from_secs(30);
/// The label a Secret needs for the operator to read it.
const OPT_IN_LABEL: &str = "connectors.dev/bitbucket-credentials";

struct Harness {
    kube: FakeKube,
    sim: SimulatorHandle,
    store: Arc<Store>,
    operator: Arc<Operator>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Harness {
    async fn start() -> Harness {
        let kube = FakeKube::start().await;
        let sim = Simulator::start(SimConfig::default(), SocketAddr::from(([127, 0, 0, 1], 0)))
            .await
            .unwrap();
        let store = Arc::new(Store::open_in_memory().unwrap());
        let (operator, stop, task) = start_operator(&kube, &store, &sim.base_url());
        Harness {
            kube,
            sim,
            store,
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

    /// A Secret that opts in (labelled for the operator).
    fn secret(&self, name: &str, data: Value) {
        self.kube.put(json!({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": name, "namespace": NS, "labels": {OPT_IN_LABEL: "true"}},
            "type": "Opaque",
            "stringData": data,
        }));
    }

    fn good_secret(&self, name: &str) {
        let c = self.sim.credentials();
        self.secret(
            name,
            json!({"BATON_USERNAME": c.email, "BATON_APP_PASSWORD": c.api_token}),
        );
    }

    fn connector(&self, name: &str, secret: &str) {
        self.kube.put(json!({
            "apiVersion": API, "kind": KIND,
            "metadata": {"name": name, "namespace": NS},
            "spec": {"secretRef": {"name": secret}, "apiUrl": self.sim.base_url(), "interval": "1h"},
        }));
    }

    fn update(&self, name: &str, change: impl FnOnce(&mut Value)) {
        let mut obj = self.kube.get(API, KIND, Some(NS), name).expect("connector exists");
        change(&mut obj);
        self.kube.put(obj);
    }

    /// Replaces the Secret's labels, keeping its data.
    fn update_secret_labels(&self, name: &str, labels: Value) {
        let mut secret = self.kube.get("v1", "Secret", Some(NS), name).expect("Secret exists");
        secret["metadata"]["labels"] = labels;
        self.kube.put(secret);
    }

    async fn wait(&self, name: &str, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let _ = what;
        self.kube.wait_for(API, KIND, Some(NS), name, WAIT, pred).await
    }

    /// `state` values written to the status subresource, in order.
    fn states_written(&self, name: &str) -> Vec<String> {
        self.kube
            .requests()
            .iter()
            .filter(|r| r.method == "PATCH" && r.path.ends_with(&format!("/{name}/status")))
            .filter_map(|r| r.json()["status"]["state"].as_str().map(str::to_owned))
            .collect()
    }
}

fn start_operator(
    kube: &FakeKube,
    store: &Arc<Store>,
    api_url: &str,
) -> (Arc<Operator>, watch::Sender<bool>, tokio::task::JoinHandle<()>) {
    let operator = Arc::new(Operator::new(
        kube.client(),
        Arc::clone(store),
        Arc::new(Metrics::default()),
        vec![],
        allow_only(api_url),
    ));
    let (stop, stopped) = watch::channel(false);
    let task = tokio::spawn({
        let operator = Arc::clone(&operator);
        async move { operator.run_controllers(wait_for(stopped)).await }
    });
    (operator, stop, task)
}

fn is(obj: &Value, type_: &str, status: &str) -> bool {
    condition(obj, type_).is_some_and(|c| c["status"] == status)
}

fn reason(obj: &Value, type_: &str) -> String {
    condition(obj, type_)
        .map(|c| c["reason"].as_str().unwrap_or_default().to_owned())
        .unwrap_or_default()
}

fn ready(obj: &Value) -> bool {
    is(obj, "Ready", "True") && obj["status"]["state"] == "Connected"
}

fn events_with_reason(kube: &FakeKube, reason: &str) -> usize {
    kube.events().iter().filter(|e| e["reason"] == reason).count()
}

#[tokio::test]
async fn a_new_connector_goes_pending_syncing_connected_with_counts_matching_bitbucket() {
    let h = Harness::start().await;
    h.good_secret("bb");
    h.connector("acme", "bb");
    let obj = h.wait("acme", "Ready", ready).await;

    let states = h.states_written("acme");
    assert_eq!(states.first().map(String::as_str), Some("Pending"), "{states:?}");
    assert!(states.iter().any(|s| s == "Syncing"), "{states:?}");
    assert_eq!(states.last().map(String::as_str), Some("Connected"), "{states:?}");

    assert!(is(&obj, "Connected", "True"));
    assert!(is(&obj, "Syncing", "False"));
    assert!(
        condition(&obj, "Reconciling").is_none() && condition(&obj, "Stalled").is_none(),
        "kstatus: absent when False"
    );
    assert_eq!(obj["status"]["observedGeneration"], obj["metadata"]["generation"]);
    assert!(
        obj["metadata"]["finalizers"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f == "connectors.dev/connector-cleanup")
    );

    // Counts on status equal the simulator's ground truth and the store.
    let org = h.sim.organisation();
    let users: std::collections::BTreeSet<_> = org
        .workspaces
        .iter()
        .flat_map(|w| w.members.iter().map(|m| m.user_uuid.clone()))
        .collect();
    let resources = &obj["status"]["resources"];
    assert_eq!(resources["accounts"]["count"], users.len());
    assert_eq!(resources["workspaces"]["count"], org.workspaces.len());
    assert_eq!(
        resources["groups"]["count"],
        org.workspaces.iter().map(|w| w.groups.len()).sum::<usize>()
    );
    assert_eq!(
        resources["projects"]["count"],
        org.workspaces.iter().map(|w| w.projects.len()).sum::<usize>()
    );
    assert_eq!(
        resources["repositories"]["count"],
        org.workspaces.iter().map(|w| w.repositories.len()).sum::<usize>()
    );
    for kind in SyncKind::ALL {
        let stored = h.store.counts(&format!("{NS}/acme"), kind).unwrap().resources;
        assert_eq!(resources[kind.as_str()]["count"], stored, "{kind}");
        assert!(resources[kind.as_str()]["requests"].as_i64().unwrap() >= 1);
    }
    assert!(obj["status"]["lastSyncTime"].is_string());
    let fingerprint = obj["status"]["credentials"]["fingerprint"].as_str().unwrap();
    assert_eq!(fingerprint.len(), 12);
    assert!(
        !obj.to_string().contains(&h.sim.credentials().api_token),
        "the token never reaches status"
    );
    assert_eq!(events_with_reason(&h.kube, "Connected"), 1);

    // Status writes must not trigger reconciles: once settled, nothing more is written.
    let writes = h.states_written("acme").len();
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(h.states_written("acme").len(), writes, "steady state writes nothing");
    h.stop().await;
}

#[tokio::test]
async fn a_missing_secret_stalls_and_recovers_when_it_appears() {
    let h = Harness::start().await;
    h.connector("acme", "later");
    let obj = h.wait("acme", "Stalled", |o| is(o, "Stalled", "True")).await;
    assert_eq!(reason(&obj, "Stalled"), "SecretNotFound");
    assert_eq!(reason(&obj, "Connected"), "SecretNotFound");
    assert_eq!(obj["status"]["state"], "Error");
    assert!(condition(&obj, "Reconciling").is_none());
    assert_eq!(events_with_reason(&h.kube, "SecretMissing"), 1);

    // The Secret watch maps the new Secret to the connector: no waiting for a requeue.
    h.good_secret("later");
    let obj = h.wait("acme", "Ready", ready).await;
    assert!(condition(&obj, "Stalled").is_none(), "recovery clears Stalled");
    h.stop().await;
}

#[tokio::test]
async fn a_secret_in_another_namespace_is_never_read() {
    let h = Harness::start().await;
    let c = h.sim.credentials();
    h.kube.put(json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "bb", "namespace": "other", "labels": {OPT_IN_LABEL: "true"}},
        "stringData": {"BATON_USERNAME": c.email, "BATON_APP_PASSWORD": c.api_token},
    }));
    h.connector("acme", "bb");
    let obj = h.wait("acme", "Stalled", |o| is(o, "Stalled", "True")).await;
    assert_eq!(reason(&obj, "Stalled"), "SecretNotFound");
    assert!(
        h.kube
            .requests()
            .iter()
            .all(|r| !r.path.contains("/namespaces/other/secrets")),
        "no request for another namespace's Secret"
    );
    h.stop().await;
}

#[tokio::test]
async fn a_secret_without_the_opt_in_label_is_not_read_until_labelled() {
    let h = Harness::start().await;
    let c = h.sim.credentials();
    // The Secret exists with good credentials, but has not opted in.
    h.kube.put(json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "bb", "namespace": NS},
        "stringData": {"BATON_USERNAME": c.email, "BATON_APP_PASSWORD": c.api_token},
    }));
    h.connector("acme", "bb");
    let obj = h.wait("acme", "Stalled", |o| is(o, "Stalled", "True")).await;
    assert_eq!(reason(&obj, "Connected"), "SecretNotOptedIn");
    assert_eq!(reason(&obj, "Stalled"), "SecretNotOptedIn");
    assert!(is(&obj, "Connected", "False"));
    let message = condition(&obj, "Connected").unwrap()["message"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        message.contains(OPT_IN_LABEL) && message.contains("kubectl label secret bb"),
        "{message}"
    );
    assert!(!obj.to_string().contains(&c.api_token) && !obj.to_string().contains(&c.email));
    let warnings: Vec<Value> = h
        .kube
        .events()
        .into_iter()
        .filter(|e| e["reason"] == "SecretNotOptedIn")
        .collect();
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert_eq!(warnings[0]["type"], "Warning");
    assert!(h.operator.manager.runtime(&format!("{NS}/acme")).is_none());
    assert_eq!(h.sim.stats().total, 0, "nothing was sent to Bitbucket");
    // Only the Secret's metadata was fetched, never its data.
    let secret_reads: Vec<_> = h
        .kube
        .requests()
        .into_iter()
        .filter(|r| r.method == "GET" && r.path.ends_with("/secrets/bb"))
        .collect();
    assert!(!secret_reads.is_empty());
    // The Secret watch asks for opted-in Secrets only.
    let watches: Vec<_> = h
        .kube
        .requests()
        .into_iter()
        .filter(|r| r.path.ends_with("/secrets") && r.param("watch").is_some())
        .collect();
    assert!(!watches.is_empty());
    for watch in &watches {
        assert_eq!(
            watch.param("labelSelector").as_deref(),
            Some("connectors.dev/bitbucket-credentials=true")
        );
    }

    // Labelling it is the opt-in: the filtered watch sees it appear.
    h.update_secret_labels("bb", json!({OPT_IN_LABEL: "true"}));
    h.wait("acme", "Ready", ready).await;
    // Removing the label withdraws it: the watch sees it go, loops stop.
    h.update_secret_labels("bb", json!({}));
    h.wait("acme", "not opted in again", |o| {
        reason(o, "Connected") == "SecretNotOptedIn"
    })
    .await;
    assert!(
        h.operator.manager.runtime(&format!("{NS}/acme")).is_none(),
        "loops stopped"
    );
    h.stop().await;
}

#[tokio::test]
async fn a_secret_key_rename_cannot_read_another_fields_value() {
    let h = Harness::start().await;
    h.good_secret("bb");
    // The attack: whoever may create a connector but not read the Secret maps
    // `workspaces` to the password's key, hoping for "<password> is not a
    // workspace slug" in status and Events.
    h.kube.put(json!({
        "apiVersion": API, "kind": KIND,
        "metadata": {"name": "acme", "namespace": NS},
        "spec": {"secretRef": {"name": "bb"}, "apiUrl": h.sim.base_url(),
                 "secretKeys": {"workspaces": "BATON_APP_PASSWORD"}},
    }));
    let obj = h.wait("acme", "Stalled", |o| is(o, "Stalled", "True")).await;
    assert_eq!(reason(&obj, "Connected"), "InvalidSecretKeys");
    let message = condition(&obj, "Connected").unwrap()["message"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        message.contains("secretKeys.workspaces") && message.contains("BATON_APP_PASSWORD"),
        "{message}"
    );
    let token = h.sim.credentials().api_token.clone();
    assert!(!obj.to_string().contains(&token), "{obj}");
    assert!(
        h.kube.events().iter().all(|e| !e.to_string().contains(&token)),
        "no Event carries the password"
    );
    assert_eq!(events_with_reason(&h.kube, "InvalidSecretKeys"), 1);
    assert_eq!(h.sim.stats().total, 0, "nothing was sent to Bitbucket");
    h.stop().await;
}

#[tokio::test]
async fn rejected_credentials_say_invalid_credentials_with_the_email_hint() {
    let h = Harness::start().await;
    h.secret(
        "bb",
        json!({"BATON_USERNAME": "jdoe", "BATON_APP_PASSWORD": "not-the-token"}),
    );
    h.connector("acme", "bb");
    let obj = h.wait("acme", "Connected=False", |o| is(o, "Connected", "False")).await;
    let connected = condition(&obj, "Connected").unwrap();
    assert_eq!(connected["reason"], "InvalidCredentials");
    assert!(connected["message"].as_str().unwrap().contains("email"), "{connected}");
    assert!(is(&obj, "Stalled", "True"));
    assert!(!obj.to_string().contains("not-the-token"));
    assert_eq!(events_with_reason(&h.kube, "CredentialsRejected"), 1);

    // Fixing the Secret recovers without touching the connector.
    h.good_secret("bb");
    h.wait("acme", "Ready", ready).await;
    h.stop().await;
}

#[tokio::test]
async fn a_missing_key_is_reported_by_name() {
    let h = Harness::start().await;
    h.secret("bb", json!({"BATON_USERNAME": "ops@example.com"}));
    h.connector("acme", "bb");
    let obj = h.wait("acme", "Stalled", |o| is(o, "Stalled", "True")).await;
    assert_eq!(reason(&obj, "Connected"), "SecretKeyMissing");
    assert!(
        condition(&obj, "Connected").unwrap()["message"]
            .as_str()
            .unwrap()
            .contains("BATON_APP_PASSWORD")
    );
    h.stop().await;
}

#[tokio::test]
async fn rotated_secret_is_used_without_restarting_loops() {
    let h = Harness::start().await;
    h.good_secret("bb");
    h.connector("acme", "bb");
    let before = h.wait("acme", "Ready", ready).await;
    let old_fingerprint = before["status"]["credentials"]["fingerprint"]
        .as_str()
        .unwrap()
        .to_owned();
    let runtime = h.operator.manager.runtime(&format!("{NS}/acme")).expect("runtime");

    // Rotate to the OAuth consumer: different credentials, both valid.
    assert_eq!(
        h.sim.stats().by_class.get("oauth"),
        None,
        "no OAuth before the rotation"
    );
    let c = h.sim.credentials();
    h.secret(
        "bb",
        json!({"BATON_CONSUMER_KEY": c.consumer_key, "BATON_CONSUMER_SECRET": c.consumer_secret}),
    );
    let after = h
        .wait("acme", "new fingerprint", |o| {
            o["status"]["credentials"]["fingerprint"]
                .as_str()
                .is_some_and(|f| f != old_fingerprint)
        })
        .await;
    assert!(after["status"]["credentials"]["lastChanged"].is_string());
    assert_eq!(events_with_reason(&h.kube, "CredentialsChanged"), 1);
    let same = h.operator.manager.runtime(&format!("{NS}/acme")).expect("runtime");
    assert!(Arc::ptr_eq(&runtime, &same), "same runtime: loops were not restarted");
    assert_eq!(same.engine().client().credentials().method(), "oauth-consumer");

    // A requested sync now goes through the new credentials.
    h.update("acme", |o| {
        o["metadata"]["annotations"] = json!({"reconcile.fluxcd.io/requestedAt": "rotated"})
    });
    h.wait("acme", "handled", |o| {
        o["status"]["lastHandledReconcileAt"] == "rotated" && ready(o)
    })
    .await;
    tokio::time::timeout(WAIT, async {
        while h.sim.stats().by_class.get("oauth").copied().unwrap_or(0) == 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the OAuth token endpoint was used after rotation");
    h.stop().await;
}

#[tokio::test]
async fn suspend_stops_loops_and_resume_restarts_them() {
    let h = Harness::start().await;
    h.good_secret("bb");
    h.connector("acme", "bb");
    h.wait("acme", "Ready", ready).await;
    h.update("acme", |o| o["spec"]["suspend"] = json!(true));
    let obj = h
        .wait("acme", "Suspended", |o| o["status"]["state"] == "Suspended")
        .await;
    assert!(is(&obj, "Ready", "False"));
    assert_eq!(reason(&obj, "Ready"), "Suspended");
    assert!(
        h.operator.manager.runtime(&format!("{NS}/acme")).is_none(),
        "loops stopped"
    );
    assert_eq!(
        obj["status"]["resources"]["groups"]["count"].as_i64().map(|c| c > 0),
        Some(true),
        "data kept"
    );

    h.update("acme", |o| o["spec"]["suspend"] = json!(false));
    h.wait("acme", "Ready again", ready).await;
    assert!(h.operator.manager.runtime(&format!("{NS}/acme")).is_some());
    h.stop().await;
}

#[tokio::test]
async fn deletion_stops_loops_and_removes_data() {
    let h = Harness::start().await;
    h.good_secret("bb");
    h.connector("acme", "bb");
    h.wait("acme", "Ready", ready).await;
    assert!(
        h.store
            .counts(&format!("{NS}/acme"), SyncKind::Accounts)
            .unwrap()
            .resources
            > 0
    );

    h.kube.delete(API, KIND, Some(NS), "acme");
    h.kube.wait_for_absent(API, KIND, Some(NS), "acme", WAIT).await;
    assert!(
        h.operator.manager.runtime(&format!("{NS}/acme")).is_none(),
        "loops stopped"
    );
    assert!(
        !h.store.connectors().unwrap().contains(&format!("{NS}/acme")),
        "data removed"
    );
    h.stop().await;
}

#[tokio::test]
async fn a_spec_change_bumps_observed_generation_and_retunes_only_that_loop() {
    let h = Harness::start().await;
    h.good_secret("bb");
    h.connector("acme", "bb");
    let obj = h.wait("acme", "Ready", ready).await;
    let generation = obj["metadata"]["generation"].as_i64().unwrap();
    let runtime = h.operator.manager.runtime(&format!("{NS}/acme")).unwrap();

    h.update("acme", |o| {
        o["spec"]["resources"] = json!({"repositories": {"enabled": false}, "groups": {"interval": "2h"}})
    });
    let obj = h
        .wait("acme", "new generation observed", |o| {
            o["status"]["observedGeneration"].as_i64() == Some(generation + 1) && is(o, "Ready", "True")
        })
        .await;
    assert!(condition(&obj, "Ready").unwrap()["observedGeneration"].as_i64() == Some(generation + 1));
    let kinds = runtime.loop_kinds();
    assert!(
        !kinds.contains(&SyncKind::Repositories),
        "disabled loop stopped: {kinds:?}"
    );
    assert!(kinds.contains(&SyncKind::Groups) && kinds.contains(&SyncKind::Accounts));
    h.stop().await;
}

#[tokio::test]
async fn the_flux_annotation_triggers_a_sync_of_every_type_and_is_recorded() {
    let h = Harness::start().await;
    h.good_secret("bb");
    h.connector("acme", "bb");
    h.wait("acme", "Ready", ready).await;
    let key = format!("{NS}/acme");
    let runs_before: Vec<usize> = SyncKind::ALL
        .iter()
        .map(|&k| h.store.runs_of_kind(&key, k, 100).unwrap().len())
        .collect();

    h.update("acme", |o| {
        o["metadata"]["annotations"] = json!({"reconcile.fluxcd.io/requestedAt": "2026-11-29T03:00:00Z"})
    });
    h.wait("acme", "recorded", |o| {
        o["status"]["lastHandledReconcileAt"] == "2026-11-29T03:00:00Z"
    })
    .await;
    tokio::time::timeout(WAIT, async {
        loop {
            let done = SyncKind::ALL
                .iter()
                .zip(&runs_before)
                .all(|(&k, &before)| h.store.runs_of_kind(&key, k, 100).unwrap().len() > before);
            if done {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("every type synced again");
    h.stop().await;
}

#[tokio::test]
async fn restarts_keep_the_cadence_instead_of_resyncing() {
    let kube = FakeKube::start().await;
    let sim = Simulator::start(SimConfig::default(), SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .unwrap();
    let store = Arc::new(Store::open_in_memory().unwrap());
    let c = sim.credentials();
    kube.put(json!({"apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "bb", "namespace": NS, "labels": {OPT_IN_LABEL: "true"}},
        "stringData": {"BATON_USERNAME": c.email, "BATON_APP_PASSWORD": c.api_token}}));
    kube.put(
        json!({"apiVersion": API, "kind": KIND, "metadata": {"name": "acme", "namespace": NS},
        "spec": {"secretRef": {"name": "bb"}, "apiUrl": sim.base_url(), "interval": "1h"}}),
    );
    let (_, stop, task) = start_operator(&kube, &store, &sim.base_url());
    kube.wait_for(API, KIND, Some(NS), "acme", WAIT, ready).await;
    let _ = stop.send(true);
    task.await.unwrap();

    let runs = store
        .runs_of_kind(&format!("{NS}/acme"), SyncKind::Groups, 100)
        .unwrap()
        .len();
    let (_, stop, task) = start_operator(&kube, &store, &sim.base_url());
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        store
            .runs_of_kind(&format!("{NS}/acme"), SyncKind::Groups, 100)
            .unwrap()
            .len(),
        runs,
        "a restart within the interval does not sync again"
    );
    let _ = stop.send(true);
    task.await.unwrap();
    sim.shutdown().await;
}

#[tokio::test]
async fn only_the_lease_holder_syncs_and_a_successor_takes_over_on_shutdown() {
    use bitbucket_operator::controller::Lease;
    let h = Harness::start().await; // a plain operator, stopped right away: replicas below
    let _ = h.stop.send(true);
    h.good_secret("bb");
    h.connector("acme", "bb");

    let replica = |identity: &str| {
        let operator = Arc::new(Operator::new(
            h.kube.client(),
            Arc::new(Store::open_in_memory().unwrap()),
            Arc::new(Metrics::default()),
            vec![],
            allow_only(&h.sim.base_url()),
        ));
        let lease = Lease {
            name: "bitbucket-operator".into(),
            namespace: NS.into(),
            identity: identity.into(),
            duration_seconds: 3,
        };
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn({
            let operator = Arc::clone(&operator);
            async move { operator.run_with_leader_election(&lease, stopped).await.unwrap() }
        });
        (operator, stop, task)
    };
    let (a, stop_a, task_a) = replica("replica-a");
    let (b, stop_b, task_b) = replica("replica-b");
    h.wait("acme", "Ready", ready).await;

    let leading = |op: &Operator| !op.manager.keys().is_empty();
    assert!(leading(&a) ^ leading(&b), "exactly one replica runs loops");
    let (leader, leader_id, leader_stop, leader_task, follower, follower_id) = if leading(&a) {
        (a, "replica-a", stop_a, task_a, b, "replica-b")
    } else {
        (b, "replica-b", stop_b, task_b, a, "replica-a")
    };

    // SIGTERM on the leader: loops stop and the lease is released.
    let _ = leader_stop.send(true);
    tokio::time::timeout(WAIT, leader_task)
        .await
        .expect("leader stops")
        .unwrap();
    assert!(leader.manager.keys().is_empty(), "the old leader's loops stopped");
    let lease = h
        .kube
        .get("coordination.k8s.io/v1", "Lease", Some(NS), "bitbucket-operator")
        .expect("lease exists");
    assert_ne!(lease["spec"]["holderIdentity"], leader_id, "the lease was released");

    tokio::time::timeout(WAIT, async {
        while !leading(&follower) {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("the other replica takes over");
    let lease = h
        .kube
        .get("coordination.k8s.io/v1", "Lease", Some(NS), "bitbucket-operator")
        .unwrap();
    assert_eq!(lease["spec"]["holderIdentity"], follower_id);
    h.sim.shutdown().await;
}

#[test]
fn the_plain_manifest_args_are_accepted_by_run() {
    // The Deployment's args, as rendered from the chart, must parse: with no
    // cluster reachable, `run` then fails connecting (exit 1), not on usage (exit 2).
    let manifest =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/bitbucket-operator.yaml")).unwrap();
    let deployment = serde_yaml::Deserializer::from_str(&manifest)
        .map(|doc| Value::deserialize(doc).unwrap())
        .find(|doc| doc["kind"] == "Deployment")
        .expect("a Deployment");
    let args: Vec<String> = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_owned())
        .collect();
    assert_eq!(args[0], "run");
    // The literal env values too (the data API's connection limits).
    let env: Vec<(String, String)> = deployment["spec"]["template"]["spec"]["containers"][0]["env"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["name"].as_str().is_some_and(|n| n.starts_with("DATA_API_")))
        .map(|e| {
            (
                e["name"].as_str().unwrap().to_owned(),
                e["value"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(env.len(), 3, "{env:?}");
    // The chart's optional data API flags (audience, TLS) parse too.
    let data_api = [
        "--data-api-audience",
        "auditors",
        "--data-api-addr",
        "0.0.0.0:8443",
        "--data-api-tls-cert",
        "/etc/bitbucket-operator/data-api-tls/tls.crt",
        "--data-api-tls-key",
        "/etc/bitbucket-operator/data-api-tls/tls.key",
    ];
    let with_data_api: Vec<String> = args.iter().cloned().chain(data_api.map(String::from)).collect();
    for args in [args, with_data_api] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_bitbucket-operator"))
            .args(&args)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .env("KUBECONFIG", "/nonexistent/kubeconfig")
            .env_remove("KUBERNETES_SERVICE_HOST")
            .env("POD_NAMESPACE", "bitbucket-operator")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(stderr.contains("connecting to the Kubernetes API"), "{stderr}");
    }
}

#[tokio::test]
async fn the_data_api_needs_a_reviewed_token_and_rbac_on_the_data_subresource() {
    use bitbucket_operator::api::ApiState;
    use bitbucket_operator::http::{HttpState, router};

    let h = Harness::start().await;
    h.good_secret("bb");
    h.connector("acme", "bb");
    h.wait("acme", "Ready", ready).await;

    h.kube.add_token("reviewer-token", "alice", &["auditors"]);
    h.kube.add_token("other-token", "mallory", &[]);
    h.kube.allow_data_reads("alice", NS);
    let state = HttpState {
        metrics: Arc::clone(&h.operator.metrics),
        ready: Arc::new(std::sync::atomic::AtomicBool::new(true)),
        api: Some(ApiState {
            kube: h.kube.client(),
            store: Arc::clone(&h.store),
            leading: Arc::clone(&h.operator.leading),
            decisions: Default::default(),
        }),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let server = tokio::spawn(async move { axum::serve(listener, router(state)).await.unwrap() });
    let http = reqwest::Client::new();
    let get = |path: &str, token: Option<&str>| {
        let mut request = http.get(format!("{base}{path}"));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        request.send()
    };
    let prefix = format!("/api/v1/namespaces/{NS}/connectors/acme");

    let anonymous = get(&format!("{prefix}/grants"), None).await.unwrap();
    assert_eq!(anonymous.status(), 401);
    assert_eq!(anonymous.headers()["www-authenticate"], "Bearer");
    assert_eq!(
        get(&format!("{prefix}/grants"), Some("forged")).await.unwrap().status(),
        401
    );
    assert_eq!(
        get(&format!("{prefix}/grants"), Some("other-token"))
            .await
            .unwrap()
            .status(),
        403,
        "no RBAC, no data"
    );
    assert_eq!(
        get("/metrics", None).await.unwrap().status(),
        200,
        "metrics stay open for scrapers"
    );

    let grants: Value = get(&format!("{prefix}/grants"), Some("reviewer-token"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let stored = h.store.grants(&format!("{NS}/acme")).unwrap();
    assert_eq!(grants["items"].as_array().unwrap().len(), stored.len());

    let csv = get(&format!("{prefix}/grants.csv"), Some("reviewer-token"))
        .await
        .unwrap();
    assert_eq!(csv.headers()["content-type"], "text/csv; charset=utf-8");
    let csv = csv.text().await.unwrap();
    assert!(csv.starts_with("resource_type,resource_id,resource_name,entitlement,principal_type"));
    assert_eq!(
        csv.lines().count(),
        stored.len() + 1,
        "one row per grant plus the header"
    );

    let repo = &h.sim.organisation().workspaces[0];
    let full_name = format!("{}/{}", repo.slug, repo.repositories[0].slug);
    let who: Value = get(
        &format!("{prefix}/who-can?repository={full_name}"),
        Some("reviewer-token"),
    )
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    let expected = bitbucket_operator::access::who_can(&h.store, &format!("{NS}/acme"), &full_name).unwrap();
    assert_eq!(who["items"].as_array().unwrap().len(), expected.len());
    let missing = get(
        &format!("{prefix}/who-can?repository=nope/nope"),
        Some("reviewer-token"),
    )
    .await
    .unwrap();
    assert_eq!(missing.status(), 404);
    let other = get(
        &format!("/api/v1/namespaces/{NS}/connectors/ghost/grants"),
        Some("reviewer-token"),
    )
    .await
    .unwrap();
    assert_eq!(
        other.status(),
        404,
        "allowed in the namespace, but nothing synced under that name"
    );

    // The SubjectAccessReview asked for exactly the data subresource of this connector.
    let review = h
        .kube
        .requests()
        .into_iter()
        .rev()
        .find(|r| r.path.ends_with("/subjectaccessreviews"))
        .expect("a SubjectAccessReview");
    let attrs = &review.json()["spec"]["resourceAttributes"];
    assert_eq!(attrs["subresource"], "data");
    assert_eq!(attrs["verb"], "get");

    // Decisions are remembered briefly: one TokenReview per token for all of
    // alice's calls above, whatever the connector (acme, the unknown "ghost").
    let reviews = h
        .kube
        .requests()
        .iter()
        .filter(|r| r.path.ends_with("/tokenreviews") && r.body.contains("reviewer-token"))
        .count();
    assert_eq!(reviews, 1, "repeated calls reuse the decision");

    // A replica that does not run the loops (a standby) does not serve data.
    h.operator.leading.store(false, std::sync::atomic::Ordering::Relaxed);
    let standby = get(&format!("{prefix}/grants"), Some("reviewer-token")).await.unwrap();
    assert_eq!(standby.status(), 503);
    server.abort();
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_run_binary_serves_probes_syncs_and_stops_cleanly_on_sigterm() {
    // The real `bitbucket-operator run`, as a child process, against the fake
    // API server (through a kubeconfig) and the simulator.
    let h = Harness::start().await;
    let _ = h.stop.send(true); // only the child process reconciles here
    h.good_secret("bb");
    h.connector("acme", "bb");

    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters: [{{name: fake, cluster: {{server: \"{}\"}}}}]\n\
             users: [{{name: fake, user: {{}}}}]\ncontexts: [{{name: fake, context: {{cluster: fake, user: fake, namespace: {NS}}}}}]\n\
             current-context: fake\n",
            h.kube.url()
        ),
    )
    .unwrap();
    let free_port = || {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    };
    let (port, probe_port) = (free_port(), free_port());
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_bitbucket-operator"))
        .args([
            "run",
            "--http-addr",
            &format!("127.0.0.1:{port}"),
            "--probe-addr",
            &format!("127.0.0.1:{probe_port}"),
            "--leader-election=true",
            "--lease-name",
            "bbo",
            "--allowed-api-urls",
            &format!("https://api.bitbucket.org,{}", h.sim.base_url()),
        ])
        .arg("--db")
        .arg(dir.path().join("store.db"))
        .env("KUBECONFIG", &kubeconfig)
        .env("POD_NAMESPACE", NS)
        .env("POD_NAME", "operator-0")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();

    h.wait("acme", "Ready", ready).await;
    let http = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{port}");
    assert_eq!(http.get(format!("{base}/healthz")).send().await.unwrap().status(), 200);
    assert_eq!(http.get(format!("{base}/readyz")).send().await.unwrap().status(), 200);
    // The probes also answer on their own listener, which serves no data.
    let probes = format!("http://127.0.0.1:{probe_port}");
    for (path, status) in [
        ("healthz".to_owned(), 200),
        ("readyz".to_owned(), 200),
        (format!("api/v1/namespaces/{NS}/connectors/acme/runs"), 404),
    ] {
        let answer = http.get(format!("{probes}/{path}")).send().await.unwrap();
        assert_eq!(answer.status(), status, "{path}");
    }
    let metrics = http
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains(&format!(
            "bitbucket_operator_connector_ready{{namespace=\"{NS}\",name=\"acme\"}} 1"
        )),
        "{metrics}"
    );
    assert!(metrics.contains("bitbucket_operator_sync_runs_total"), "{metrics}");
    let lease = h
        .kube
        .get("coordination.k8s.io/v1", "Lease", Some(NS), "bbo")
        .expect("the lease was taken");
    assert_eq!(lease["spec"]["holderIdentity"], "operator-0");

    // SIGTERM: loops stop, the lease is released, the process exits 0.
    let pid = child.id().unwrap() as i32;
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let status = tokio::time::timeout(WAIT, child.wait())
        .await
        .expect("exits after SIGTERM")
        .unwrap();
    assert!(status.success(), "{status:?}");
    let lease = h.kube.get("coordination.k8s.io/v1", "Lease", Some(NS), "bbo").unwrap();
    assert_ne!(lease["spec"]["holderIdentity"], "operator-0", "released on shutdown");
    h.sim.shutdown().await;
}
