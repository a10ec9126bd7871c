//! Crash safety of `BitbucketAccessGrant`, end to end against the fake
//! Kubernetes API and the Bitbucket simulator's ground truth.
//!
//! For each operation (grant; revoke at expiry, nothing held before;
//! restore at expiry, `read` held before) and each point of it (intent in
//! the store, intent in status, Bitbucket written, result recorded), the
//! operator is stopped there as if killed ([`Faults::crash_at`]), then a
//! fresh operator ("restart") runs over the same store file and the same
//! API server. The access must end on time and the previous level must be
//! restored exactly. Also: a lease lost mid-reconcile makes no write;
//! overlapping grants of two connectors on one credential; the audit log
//! survives restarts and is read by `access audit`.

pub mod support;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bitbucket_operator::bitbucket::Client;
use bitbucket_operator::controller::Operator;
use bitbucket_operator::controller::grant::{FaultPoint, Faults};
use bitbucket_operator::metrics::Metrics;
use bitbucket_operator::provision::{ChangeOperation, Fence};
use bitbucket_operator::simulator::SimulatorHandle;
use bitbucket_operator::store::{AuditEntry, Store};
use kube::api::{Api, PostParams};
use serde_json::{Value, json};
use support::fake_kube::FakeKube;
use support::grant_env::{
    API, GRANT, bitbucket_client, explicit_level, fake_api_with_connector, in_secs, plain_members, set_level,
    start_simulator, wait_connector_ready,
};
use support::running_operator::{RunningOperator, allow_only};
use support::status::condition;
use tokio::sync::watch;

const NS: &str = "default";
const WAIT: Duration = Duration::from_secs(45);
const REQUESTER: &str = "alice@example.com";

// ---- fixtures -----------------------------------------------------------------

struct Env {
    fake: FakeKube,
    sim: SimulatorHandle,
    _dir: tempfile::TempDir,
    db: PathBuf,
    ws: String,
    user_uuid: String,
    user_nick: String,
    repo: String,
    bitbucket: Client,
}

/// The policy of every connector here: the Secret's BATON_PROVISIONING=true
/// switches it on; admin is opt-in.
fn provisioning_spec() -> Value {
    json!({"provisioning": {"allowedPermissions": ["read", "write", "admin"]}})
}

fn connector_json(name: &str, api_url: &str) -> Value {
    support::grant_env::connector(name, NS, api_url, provisioning_spec())
}

/// Simulator (own seed), fake API, an opted-in Secret with provisioning on
/// and the connector `bb`; the store is a file in a temporary directory.
async fn env(seed: u64) -> Env {
    let sim = start_simulator(seed).await;
    let fake = fake_api_with_connector(&sim, NS, Some("true"), provisioning_spec()).await;
    let org = sim.organisation();
    let ws = &org.workspaces[0];
    let (user_nick, user_uuid) = plain_members(&org, 0).swap_remove(0);
    let dir = tempfile::tempdir().unwrap();
    let bitbucket = bitbucket_client(&sim);
    Env {
        db: dir.path().join("store.db"),
        _dir: dir,
        ws: ws.slug.clone(),
        user_uuid,
        user_nick,
        repo: ws.repositories[0].slug.clone(),
        fake,
        sim,
        bitbucket,
    }
}

impl Env {
    /// Starts an operator over the store file (`fence`: writes only while it holds).
    async fn start(&self, faults: Faults, fence: Option<Fence>) -> RunningOperator {
        let store = Arc::new(Store::open(&self.db).unwrap());
        let mut operator =
            support::grant_env::operator(&self.fake, store, &self.sim.base_url()).with_grant_faults(faults);
        if let Some(fence) = fence {
            operator = operator.with_fence(fence);
        }
        let running = RunningOperator::spawn(operator, WAIT);
        wait_connector_ready(&self.fake, NS, "bb", WAIT).await;
        running
    }

    async fn create(&self, name: &str, connector: &str, permission: &str, expires_in: i64) {
        let obj = json!({
            "apiVersion": API,
            "kind": GRANT,
            "metadata": {"name": name, "namespace": NS,
                         "annotations": {"connectors.dev/requested-by": REQUESTER}},
            "spec": {
                "connectorRef": {"name": connector},
                "principal": {"user": self.user_nick},
                "target": {"workspace": self.ws, "repository": self.repo},
                "permission": permission,
                "expiresAt": in_secs(expires_in),
            },
        });
        Api::<bitbucket_operator::crd::BitbucketAccessGrant>::namespaced(self.fake.client(), NS)
            .create(&PostParams::default(), &serde_json::from_value(obj).unwrap())
            .await
            .unwrap();
    }

    fn grant(&self, name: &str) -> Value {
        self.fake.get(API, GRANT, Some(NS), name).expect("the grant exists")
    }

    async fn wait_state(&self, name: &str, state: &str) -> Value {
        self.fake
            .wait_for(API, GRANT, Some(NS), name, WAIT, |g| g["status"]["state"] == state)
            .await
    }

    /// Ground truth: the user's explicit level on the repository.
    fn truth(&self) -> Option<String> {
        explicit_level(&self.sim, &self.ws, &self.repo, &self.user_uuid)
    }

    /// Sets the user's explicit level outside the operator (`None`: removes it).
    async fn set_level(&self, level: Option<&str>) {
        set_level(&self.bitbucket, &self.ws, &self.user_uuid, &self.repo, level).await;
        assert_eq!(self.truth().as_deref(), level);
    }

    /// The store file, read-only (as `access audit` opens it).
    fn store(&self) -> Store {
        Store::open_read_only(&self.db).unwrap()
    }

    fn audit_of(&self, uid: &str) -> Vec<AuditEntry> {
        self.store()
            .audit(None, None)
            .unwrap()
            .into_iter()
            .filter(|e| e.grant_uid == uid)
            .collect()
    }
}

async fn wait_until(what: &str, check: impl Fn() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn uid(obj: &Value) -> String {
    obj["metadata"]["uid"].as_str().unwrap().to_owned()
}

// ---- crash at each point, then restart --------------------------------------------

/// Whether Bitbucket was written when the operator died at `point`.
fn written_at(point: FaultPoint) -> bool {
    matches!(point, FaultPoint::BitbucketWritten | FaultPoint::ResultRecorded)
}

/// Runs one crash scenario: `before` held, a grant of `permission` that
/// expires after `expires_in` seconds, a crash at `point` of `operation`,
/// a restart; the access must end on time with `before` back.
async fn crash_and_restart(seed: u64, operation: ChangeOperation, point: FaultPoint, before: Option<&str>) {
    let e = env(seed).await;
    e.set_level(before).await;
    let (permission, expires_in) = match operation {
        ChangeOperation::Grant => ("write", 12),
        ChangeOperation::Revoke => ("admin", 5),
        ChangeOperation::Restore => ("write", 5),
    };
    let faults = Faults::crash_at(operation, point);
    let first = e.start(faults.clone(), None).await;
    e.create("jit", "bb", permission, expires_in).await;
    let expires_at = jiff::Timestamp::now() + jiff::SignedDuration::from_secs(expires_in);
    wait_until("the injected crash", || faults.crashed()).await;
    let at_crash = e.grant("jit");
    let truth_at_crash = e.truth();
    first.stop().await;

    // What the dead operator left behind.
    let granting = operation == ChangeOperation::Grant;
    let expected_at_crash = if written_at(point) == granting {
        Some(permission)
    } else {
        before
    };
    assert_eq!(truth_at_crash.as_deref(), expected_at_crash, "Bitbucket at the crash");
    let pending_in_status = !at_crash["status"]["pendingChange"].is_null();
    assert_eq!(
        pending_in_status,
        matches!(point, FaultPoint::IntentInStatus | FaultPoint::BitbucketWritten),
        "status.pendingChange at the crash: {}",
        at_crash["status"]
    );
    if pending_in_status {
        let change = &at_crash["status"]["pendingChange"];
        assert_eq!(change["operation"], operation.as_str());
        assert_eq!(change["access"]["principal"]["id"], e.user_uuid.as_str());
        let expected_from = if granting { before } else { Some(permission) };
        assert_eq!(change["from"].as_str(), expected_from, "{change}");
    }
    let grant_uid = uid(&at_crash);
    let intent = e
        .store()
        .pending_intent(&grant_uid)
        .unwrap()
        .expect("a pending intent in the store");
    assert_eq!(intent.change.operation, operation);

    // Restart: a fresh operator over the same store file and API server.
    let restarted = jiff::Timestamp::now();
    let second = e.start(Faults::default(), None).await;
    if granting {
        let g = e.wait_state("jit", "Granted").await;
        assert_eq!(
            g["status"]["previousPermission"].as_str(),
            before,
            "the previous level is the one before the grant, never the grant's own"
        );
        assert_eq!(e.truth().as_deref(), Some(permission));
    }
    let g = e.wait_state("jit", "Expired").await;
    let ended = jiff::Timestamp::now();
    assert_eq!(e.truth().as_deref(), before, "the previous level is restored exactly");
    assert_eq!(g["status"]["previousPermission"].as_str(), before);
    assert!(g["status"]["pendingChange"].is_null(), "{}", g["status"]);
    assert_eq!(condition(&g, "Expired").unwrap()["status"], "True");
    // On time: at expiry, or at once after the restart when it was due.
    let late = ended.duration_since(std::cmp::max(expires_at, restarted));
    assert!(late < jiff::SignedDuration::from_secs(10), "expired {late:?} late");
    // Nothing left pending (a store-only intent is closed by the first reconcile).
    wait_until("the store's intent to be closed", || {
        e.store().pending_intent(&grant_uid).unwrap().is_none()
    })
    .await;
    second.stop().await;

    // Every step of this grant is in the audit log.
    let entries = e.audit_of(&grant_uid);
    assert!(entries.iter().all(|x| x.requester == REQUESTER), "{entries:?}");
    let actions: Vec<&str> = entries.iter().map(|x| x.action.as_str()).collect();
    assert!(
        actions.contains(&"recover"),
        "the interrupted change is audited: {actions:?}"
    );
    assert!(actions.contains(&"grant") || granting, "{actions:?}");
}

macro_rules! crash_tests {
    ($($name:ident: $seed:expr, $op:ident, $point:ident, $before:expr;)*) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            crash_and_restart($seed, ChangeOperation::$op, FaultPoint::$point, $before).await;
        }
    )*};
}

crash_tests! {
    grant_crash_after_intent_in_store: 201, Grant, IntentInStore, Some("read");
    grant_crash_after_intent_in_status: 202, Grant, IntentInStatus, Some("read");
    grant_crash_after_bitbucket_write: 203, Grant, BitbucketWritten, Some("read");
    grant_crash_after_result_recorded: 204, Grant, ResultRecorded, Some("read");
    revoke_crash_after_intent_in_store: 205, Revoke, IntentInStore, None;
    revoke_crash_after_intent_in_status: 206, Revoke, IntentInStatus, None;
    revoke_crash_after_bitbucket_write: 207, Revoke, BitbucketWritten, None;
    revoke_crash_after_result_recorded: 208, Revoke, ResultRecorded, None;
    restore_crash_after_intent_in_store: 209, Restore, IntentInStore, Some("read");
    restore_crash_after_intent_in_status: 210, Restore, IntentInStatus, Some("read");
    restore_crash_after_bitbucket_write: 211, Restore, BitbucketWritten, Some("read");
    restore_crash_after_result_recorded: 212, Restore, ResultRecorded, Some("read");
}

// ---- fencing --------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_lost_mid_reconcile_makes_no_bitbucket_write() {
    let e = env(220).await;
    e.set_level(Some("read")).await;
    let (lease, holding) = watch::channel(true);
    // The lease goes while the grant is being made: after its intent is
    // recorded, right before the write.
    let faults = Faults::run_at(ChangeOperation::Grant, FaultPoint::IntentInStatus, move || {
        let _ = lease.send(false);
    });
    let first = e.start(faults.clone(), Some(Fence::lease(holding))).await;
    e.create("fenced", "bb", "write", 60).await;
    wait_until("the lease to be lost", || faults.fired()).await;
    let g = e
        .fake
        .wait_for(API, GRANT, Some(NS), "fenced", WAIT, |g| {
            !g["status"]["pendingChange"].is_null()
        })
        .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(e.truth().as_deref(), Some("read"), "no write without the lease");
    assert_ne!(e.grant("fenced")["status"]["state"], "Granted");
    first.stop().await;
    assert_eq!(e.truth().as_deref(), Some("read"));

    // The next leader resolves the change (not written) and grants.
    let second = e.start(Faults::default(), None).await;
    let g2 = e.wait_state("fenced", "Granted").await;
    assert_eq!(g2["status"]["previousPermission"], "read");
    assert!(g2["status"]["pendingChange"].is_null());
    assert_eq!(e.truth().as_deref(), Some("write"));
    second.stop().await;
    let outcomes: Vec<(String, String)> = e
        .audit_of(&uid(&g))
        .into_iter()
        .map(|x| (x.action, x.outcome))
        .collect();
    assert!(
        outcomes.contains(&("recover".into(), "not_written".into())),
        "{outcomes:?}"
    );
}

// ---- overlap across connectors ------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlapping_grants_of_two_connectors_on_one_credential_restore_the_level_before_both() {
    let e = env(230).await;
    e.fake.put(connector_json("bb2", &e.sim.base_url()));
    e.set_level(Some("read")).await;
    let op = e.start(Faults::default(), None).await;
    wait_connector_ready(&e.fake, NS, "bb2", WAIT).await;
    e.create("through-bb", "bb", "write", 6).await;
    let a = e.wait_state("through-bb", "Granted").await;
    assert_eq!(a["status"]["previousPermission"], "read");
    e.create("through-bb2", "bb2", "write", 10).await;
    let b = e.wait_state("through-bb2", "Granted").await;
    assert_eq!(
        b["status"]["previousPermission"], "read",
        "the other connector's grant is a peer: its own write is not taken as previous"
    );
    e.wait_state("through-bb", "Expired").await;
    assert_eq!(e.truth().as_deref(), Some("write"), "the other grant still holds");
    e.wait_state("through-bb2", "Expired").await;
    assert_eq!(
        e.truth().as_deref(),
        Some("read"),
        "not write: the level before both is back"
    );
    op.stop().await;
}

// ---- the audit log ----------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_log_survives_restarts_and_is_read_by_access_audit() {
    let e = env(240).await;
    e.set_level(Some("read")).await;
    let op = e.start(Faults::default(), None).await;
    e.create("audited", "bb", "admin", 4).await;
    let g = e.wait_state("audited", "Expired").await;
    op.stop().await;
    // The operator is gone; the log is in the file (read by a new handle
    // here and by another process below).

    let entries = e.audit_of(&uid(&g));
    let summary: Vec<(&str, &str, Option<&str>, Option<&str>)> = entries
        .iter()
        .map(|x| {
            (
                x.action.as_str(),
                x.outcome.as_str(),
                x.level_before.as_deref(),
                x.level_after.as_deref(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            ("grant", "succeeded", Some("read"), Some("admin")),
            ("expire", "succeeded", Some("admin"), Some("read")),
        ]
    );
    for x in &entries {
        assert_eq!(x.requester, REQUESTER);
        assert_eq!((x.grant_namespace.as_str(), x.grant_name.as_str()), (NS, "audited"));
        assert_eq!(x.connector, format!("{NS}/bb"));
        assert_eq!(x.principal, e.user_uuid);
        assert_eq!(x.target, format!("repository/{}", e.repo));
        assert_eq!(x.workspace, e.ws);
    }

    // The CLI reads the same file, read-only.
    let bin = env!("CARGO_BIN_EXE_bitbucket-operator");
    let out = std::process::Command::new(bin)
        .args(["access", "--db"])
        .arg(&e.db)
        .args(["--json", "audit", "--since", "1h"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
    let actions: Vec<&str> = doc["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["action"].as_str().unwrap())
        .collect();
    assert_eq!(actions, ["grant", "expire"]);
    let out = std::process::Command::new(bin)
        .args(["access", "--db"])
        .arg(&e.db)
        .args(["--csv", "--connector", "default/bb", "audit"])
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    let mut lines = text.lines();
    assert!(lines.next().unwrap().starts_with("time,action,outcome,requester,"));
    assert_eq!(lines.count(), 2, "{text}");
    // In the future: nothing.
    let out = std::process::Command::new(bin)
        .args(["access", "--db"])
        .arg(&e.db)
        .args(["--json", "audit", "--since", "2999-01-01T00:00:00Z"])
        .output()
        .unwrap();
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["items"], json!([]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_denied_grant_is_audited_once_and_writes_nothing() {
    let e = env(250).await;
    let mut off = connector_json("off", &e.sim.base_url());
    off["spec"]["provisioning"]["enabled"] = json!(false);
    e.fake.put(off);
    e.set_level(Some("read")).await;
    let op = e.start(Faults::default(), None).await;
    e.create("refused", "off", "admin", 600).await;
    let g = e.wait_state("refused", "Failed").await;
    assert_eq!(condition(&g, "Ready").unwrap()["reason"], "ProvisioningDisabled");
    // Retries do not repeat the entry.
    tokio::time::sleep(Duration::from_secs(2)).await;
    op.stop().await;
    assert_eq!(e.truth().as_deref(), Some("read"), "nothing written");
    let entries = e.audit_of(&uid(&g));
    let summary: Vec<(&str, &str, &str)> = entries
        .iter()
        .map(|x| (x.action.as_str(), x.outcome.as_str(), x.requester.as_str()))
        .collect();
    assert_eq!(summary, [("deny", "denied", REQUESTER)]);
    assert!(
        entries[0].message.contains("ProvisioningDisabled"),
        "{}",
        entries[0].message
    );
    assert_eq!(entries[0].connector, format!("{NS}/off"));
}

// ---- a crash while a deletion restores ----------------------------------------------

/// `read` held, `write` granted, the grant deleted, a crash at `point` of
/// the restore; after a restart the deletion completes with `read` back.
async fn deletion_crash(seed: u64, point: FaultPoint) {
    let e = env(seed).await;
    e.set_level(Some("read")).await;
    let faults = Faults::crash_at(ChangeOperation::Restore, point);
    let first = e.start(faults.clone(), None).await;
    e.create("deleted", "bb", "write", 600).await;
    let g = e.wait_state("deleted", "Granted").await;
    Api::<bitbucket_operator::crd::BitbucketAccessGrant>::namespaced(e.fake.client(), NS)
        .delete("deleted", &Default::default())
        .await
        .unwrap();
    wait_until("the injected crash", || faults.crashed()).await;
    let expected = if written_at(point) { "read" } else { "write" };
    assert_eq!(e.truth().as_deref(), Some(expected), "Bitbucket at the crash");
    assert!(
        e.fake.get(API, GRANT, Some(NS), "deleted").is_some(),
        "held by its finalizer"
    );
    first.stop().await;

    let second = e.start(Faults::default(), None).await;
    e.fake.wait_for_absent(API, GRANT, Some(NS), "deleted", WAIT).await;
    assert_eq!(
        e.truth().as_deref(),
        Some("read"),
        "the previous level is restored exactly"
    );
    wait_until("the store's intent to be closed", || {
        e.store().pending_intent(&uid(&g)).unwrap().is_none()
    })
    .await;
    second.stop().await;
    let actions: Vec<String> = e.audit_of(&uid(&g)).into_iter().map(|x| x.action).collect();
    assert!(actions.contains(&"recover".to_owned()), "{actions:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deletion_crash_after_intent_in_status() {
    deletion_crash(260, FaultPoint::IntentInStatus).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deletion_crash_after_bitbucket_write() {
    deletion_crash(261, FaultPoint::BitbucketWritten).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_lease_taken_over_mid_reconcile_stops_the_write() {
    use bitbucket_operator::controller::Lease;
    use std::sync::Mutex;
    use std::sync::mpsc;
    support::running_operator::trace_to_test_output();
    let e = env(270).await;
    e.set_level(Some("read")).await;
    // Mid-grant (intent recorded, write next) another replica takes the
    // Lease; the reconcile is held until this replica's lease manager has
    // had time to notice (a renewal), as a slow reconcile would be.
    let (steal_tx, steal_rx) = mpsc::channel::<()>();
    let (resume_tx, resume_rx) = mpsc::channel::<()>();
    let resume_rx = Mutex::new(resume_rx);
    let faults = Faults::run_at(ChangeOperation::Grant, FaultPoint::IntentInStatus, move || {
        let _ = steal_tx.send(());
        // Off the runtime's worker, so the lease manager keeps running.
        tokio::task::block_in_place(|| {
            let _ = resume_rx.lock().unwrap().recv_timeout(Duration::from_secs(30));
        });
    });
    let store = Arc::new(Store::open(&e.db).unwrap());
    let operator = Arc::new(
        Operator::new(
            e.fake.client(),
            store,
            Arc::new(Metrics::default()),
            vec![],
            allow_only(&e.sim.base_url()),
        )
        .with_grant_faults(faults.clone()),
    );
    let lease = Lease {
        name: "bitbucket-operator".into(),
        namespace: NS.into(),
        identity: "replica-a".into(),
        duration_seconds: 3,
    };
    let (stop, stopped) = watch::channel(false);
    let task = tokio::spawn({
        let operator = Arc::clone(&operator);
        async move { operator.run_with_leader_election(&lease, stopped).await.unwrap() }
    });
    wait_connector_ready(&e.fake, NS, "bb", WAIT).await;
    e.create("taken-over", "bb", "write", 600).await;
    let deadline = Instant::now() + WAIT;
    while steal_rx.try_recv().is_err() {
        assert!(Instant::now() < deadline, "the grant never reached its write");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // replica-b holds the Lease and renews it; replica-a notices at its
    // next renewal and the reconcile then resumes.
    let hold_for = |secs: u64| {
        let until = Instant::now() + Duration::from_secs(secs);
        let fake = &e.fake;
        async move {
            while Instant::now() < until {
                let mut lease = fake
                    .get("coordination.k8s.io/v1", "Lease", Some(NS), "bitbucket-operator")
                    .expect("the lease");
                let now = jiff::Timestamp::now().strftime("%Y-%m-%dT%H:%M:%S%.6fZ").to_string();
                lease["spec"]["holderIdentity"] = json!("replica-b");
                lease["spec"]["leaseDurationSeconds"] = json!(3600);
                lease["spec"]["renewTime"] = json!(now);
                fake.put(lease);
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    hold_for(4).await;
    resume_tx.send(()).unwrap();
    hold_for(2).await;
    assert_eq!(e.truth().as_deref(), Some("read"), "no write after the lease was lost");
    let g = e.grant("taken-over");
    assert_ne!(g["status"]["state"], "Granted");
    assert!(!g["status"]["pendingChange"].is_null(), "left for the new leader");
    let _ = stop.send(true);
    tokio::time::timeout(WAIT, task).await.expect("stops").unwrap();
}
