//! `BitbucketAccessGrant` end to end, without a cluster: the operator
//! (`Operator::run_controllers`) runs against the in-process fake Kubernetes
//! API and the Bitbucket simulator; every grant and revoke is checked against
//! the simulator's ground truth, and against the grant's status and Events.
//!
//! `real_cluster_grant_lifecycle` (ignored) runs the lifecycle against a real
//! cluster (`KUBECONFIG`), with the simulator or real Bitbucket.

pub mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bitbucket_operator::bitbucket::{Client, ClientConfig, Credentials};
use bitbucket_operator::controller::{Operator, wait_for};
use bitbucket_operator::metrics::Metrics;
use bitbucket_operator::provision::{AccessRequest, Permission, PrincipalRef, Provisioner, TargetRef};
use bitbucket_operator::simulator::{Organisation, SimConfig, Simulator, SimulatorHandle};
use bitbucket_operator::store::Store;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use support::fake_kube::FakeKube;
use support::grant_env::{
    API, CONNECTOR, GRANT, bitbucket_client, events_about, explicit_level, fake_api_with_connector, in_secs, set_level,
    start_simulator, wait_connector_ready,
};
use support::running_operator::{RunningOperator, allow_only};
use support::status::condition;
use tokio::sync::watch;

const NS: &str = "default";
const WAIT: Duration = Duration::from_secs(30);

// ---- fixtures -----------------------------------------------------------------

/// The operator, allowed to send credentials to `api_url` only (the
/// simulator on loopback must be listed, as an administrator would).
fn start_operator(fake: &FakeKube, store: &Arc<Store>, api_url: &str) -> RunningOperator {
    RunningOperator::spawn(support::grant_env::operator(fake, Arc::clone(store), api_url), WAIT)
}

/// Names in workspace 0: a plain member, a user of no workspace 0 membership,
/// a repository and a project.
struct Names {
    ws: String,
    user_nick: String,
    user_uuid: String,
    outsider_nick: String,
    repo: String,
}

fn names(org: &Organisation) -> Names {
    let ws = &org.workspaces[0];
    let plain = ws.members.iter().find(|m| !m.owner).unwrap();
    let user = org.users.iter().find(|u| u.uuid == plain.user_uuid).unwrap();
    let outsider = org
        .users
        .iter()
        .find(|u| !ws.members.iter().any(|m| m.user_uuid == u.uuid))
        .unwrap();
    Names {
        ws: ws.slug.clone(),
        user_nick: user.nickname.clone(),
        user_uuid: user.uuid.clone(),
        outsider_nick: outsider.nickname.clone(),
        repo: ws.repositories[0].slug.clone(),
    }
}

struct Env {
    fake: FakeKube,
    sim: SimulatorHandle,
    store: Arc<Store>,
    n: Names,
    bitbucket: Client,
}

/// Fake API + simulator (its own seed, so its own rate-limit budget) + a
/// Secret and a connector; the operator runs and the connector is Ready.
async fn env(seed: u64, provisioning: bool) -> (Env, RunningOperator) {
    let sim = start_simulator(seed).await;
    // These tests are about the grant lifecycle: a policy that allows
    // every level, without an end (tests/grant_policy.rs tests the rules).
    let spec = json!({"provisioning": {
        "requireDuration": false,
        "allowedPermissions": ["member", "read", "write", "create-repo", "admin"],
    }});
    let switch = if provisioning { "true" } else { "false" };
    let fake = fake_api_with_connector(&sim, NS, Some(switch), spec).await;
    let store = Arc::new(Store::open_in_memory().unwrap());
    let running = start_operator(&fake, &store, &sim.base_url());
    wait_connector_ready(&fake, NS, "bb", Duration::from_secs(60)).await;
    let n = names(&sim.organisation());
    let bitbucket = bitbucket_client(&sim);
    (
        Env {
            fake,
            sim,
            store,
            n,
            bitbucket,
        },
        running,
    )
}

fn grant_json(name: &str, user: &str, repo: &str, ws: &str, permission: &str, extra: Value) -> Value {
    let mut spec = json!({
        "connectorRef": {"name": "bb"},
        "principal": {"user": user},
        "target": {"workspace": ws, "repository": repo},
        "permission": permission,
    });
    if let (Some(spec), Some(extra)) = (spec.as_object_mut(), extra.as_object()) {
        spec.extend(extra.clone());
    }
    json!({
        "apiVersion": API,
        "kind": GRANT,
        "metadata": {"name": name, "namespace": NS},
        "spec": spec,
    })
}

impl Env {
    fn grants(&self) -> Api<bitbucket_operator::crd::BitbucketAccessGrant> {
        Api::namespaced(self.fake.client(), NS)
    }

    async fn create(&self, name: &str, permission: &str, extra: Value) {
        self.create_for(name, &self.n.user_nick.clone(), permission, extra)
            .await;
    }

    async fn create_for(&self, name: &str, user: &str, permission: &str, extra: Value) {
        let obj = grant_json(name, user, &self.n.repo, &self.n.ws, permission, extra);
        self.grants()
            .create(&PostParams::default(), &serde_json::from_value(obj).unwrap())
            .await
            .unwrap();
    }

    async fn delete(&self, name: &str) {
        self.grants().delete(name, &DeleteParams::default()).await.unwrap();
        self.fake.wait_for_absent(API, GRANT, Some(NS), name, WAIT).await;
    }

    async fn wait_state(&self, name: &str, state: &str) -> Value {
        self.fake
            .wait_for(API, GRANT, Some(NS), name, WAIT, |g| g["status"]["state"] == state)
            .await
    }

    /// Ground truth: the user's explicit level on the repository.
    fn truth(&self) -> Option<String> {
        self.truth_of(&self.n.user_uuid)
    }

    /// Ground truth: a user's (by UUID) explicit level on the repository.
    fn truth_of(&self, uuid: &str) -> Option<String> {
        explicit_level(&self.sim, &self.n.ws, &self.n.repo, uuid)
    }

    /// Sets the user's explicit level on the repository (`None`: removes it),
    /// straight through the provisioner, outside the operator.
    async fn set_level(&self, level: Option<&str>) {
        self.set_level_of(&self.n.user_uuid.clone(), level).await;
    }

    /// Sets a user's (by UUID) explicit level on the repository.
    async fn set_level_of(&self, uuid: &str, level: Option<&str>) {
        set_level(&self.bitbucket, &self.n.ws, uuid, &self.n.repo, level).await;
        assert_eq!(self.truth_of(uuid).as_deref(), level);
    }

    /// The nickname of another plain member of the workspace than the test user.
    fn other_member_nick(&self) -> String {
        let uuid = self.other_member_uuid();
        let org = self.sim.organisation();
        org.users.iter().find(|u| u.uuid == uuid).unwrap().nickname.clone()
    }

    /// Another plain member of the workspace than the test user.
    fn other_member_uuid(&self) -> String {
        let org = self.sim.organisation();
        let ws = org.workspaces.iter().find(|w| w.slug == self.n.ws).unwrap();
        ws.members
            .iter()
            .find(|m| !m.owner && m.user_uuid != self.n.user_uuid)
            .expect("a second plain member")
            .user_uuid
            .clone()
    }

    /// Events (reason, note) about one grant.
    fn events_of(&self, name: &str) -> Vec<(String, String)> {
        events_about(&self.fake, GRANT, name)
            .into_iter()
            .map(|(_, reason, note)| (reason, note))
            .collect()
    }

    async fn wait_event(&self, name: &str, reason: &str) -> String {
        support::grant_env::wait_event(&self.fake, GRANT, name, reason, WAIT)
            .await
            .1
    }
}

// ---- tests -----------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grant_lands_in_bitbucket_and_deletion_restores_the_previous_level() {
    let (e, op) = env(11, true).await;
    e.set_level(Some("read")).await;

    e.create("jdoe-write", "write", json!({})).await;
    let g = e.wait_state("jdoe-write", "Granted").await;
    assert_eq!(e.truth().as_deref(), Some("write"));
    let status = &g["status"];
    assert_eq!(status["previousPermission"], "read");
    assert_eq!(status["principalId"], e.n.user_uuid.as_str());
    assert_eq!(status["target"], format!("repository/{}", e.n.repo));
    assert!(status["grantedAt"].is_string());
    assert!(status["expiresAt"].is_null(), "no duration, no expiry");
    assert_eq!(status["observedGeneration"], 1);
    // What deletion will revoke: recorded in status, the user by UUID.
    assert_eq!(
        status["applied"],
        json!({
            "connector": "bb",
            "principal": {"kind": "user", "id": e.n.user_uuid, "requested": e.n.user_nick},
            "workspace": e.n.ws,
            "target": {"kind": "repository", "key": e.n.repo},
            "permission": "write",
        })
    );
    assert!(
        g["metadata"]["annotations"]["connectors.dev/applied-access"].is_null(),
        "no applied-access annotation any more"
    );
    let ready = condition(&g, "Ready").unwrap();
    assert_eq!(
        (ready["status"].as_str(), ready["reason"].as_str()),
        (Some("True"), Some("Granted"))
    );
    assert!(condition(&g, "Reconciling").is_none() && condition(&g, "Stalled").is_none());
    assert_eq!(
        g["metadata"]["finalizers"],
        json!(["connectors.dev/grant-revoke"]),
        "finalizer is on"
    );
    let note = e.wait_event("jdoe-write", "Granted").await;
    assert!(
        note.contains(&format!("granted write on repository {}/{}", e.n.ws, e.n.repo))
            && note.contains("(previously read)"),
        "{note}"
    );

    // The store was refreshed for this repository under "default/bb".
    let repo_uuid = e.sim.organisation().workspaces[0].repositories[0].uuid.clone();
    let store = Arc::clone(&e.store);
    let grants = tokio::task::spawn_blocking(move || store.grants("default/bb"))
        .await
        .unwrap()
        .unwrap();
    assert!(
        grants.iter().any(|g| g.principal_id == e.n.user_uuid
            && g.entitlement_id.contains(&repo_uuid)
            && g.entitlement_id.ends_with(":write")),
        "the store shows the new write grant"
    );

    e.delete("jdoe-write").await;
    assert_eq!(e.truth().as_deref(), Some("read"), "the previous level is back");
    let note = e.wait_event("jdoe-write", "Revoked").await;
    assert!(note.contains("restored the previous level read"), "{note}");
    // Grant reconciles are timed and counted under their own label.
    let metrics = op.operator.metrics.encode();
    for series in [
        "bitbucket_operator_reconciles_total{controller=\"grant\",result=\"ok\"}",
        "bitbucket_operator_reconcile_duration_seconds_count{controller=\"grant\"}",
        "bitbucket_operator_reconciles_total{controller=\"connector\",result=\"ok\"}",
    ] {
        assert!(metrics.contains(series), "{series} missing:\n{metrics}");
    }
    op.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jit_expiry_revokes_and_restores_on_time() {
    let (e, op) = env(12, true).await;
    e.set_level(None).await;
    e.create("jit", "admin", json!({"expiresAt": in_secs(4)})).await;
    let g = e.wait_state("jit", "Granted").await;
    assert_eq!(e.truth().as_deref(), Some("admin"));
    assert!(g["status"]["previousPermission"].is_null(), "held nothing before");
    assert!(g["status"]["expiresAt"].is_string());

    let g = e.wait_state("jit", "Expired").await;
    assert_eq!(e.truth(), None, "nothing held before: removed");
    let expired = condition(&g, "Expired").unwrap();
    assert_eq!(expired["status"], "True");
    let ready = condition(&g, "Ready").unwrap();
    assert_eq!(
        (ready["status"].as_str(), ready["reason"].as_str()),
        (Some("False"), Some("Expired"))
    );
    let note = e.wait_event("jit", "Expired").await;
    assert!(note.contains("revoked admin"), "{note}");

    // The object stays, and is not granted again.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(e.fake.get(API, GRANT, Some(NS), "jit").is_some());
    assert_eq!(e.truth(), None);
    // Deleting an expired grant writes nothing.
    e.set_level(Some("read")).await;
    e.delete("jit").await;
    assert_eq!(e.truth().as_deref(), Some("read"));
    op.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_happens_promptly_after_an_operator_restart() {
    let (e, op) = env(13, true).await;
    e.set_level(Some("read")).await;
    e.create("restart", "write", json!({"expiresAt": in_secs(4)})).await;
    e.wait_state("restart", "Granted").await;
    assert_eq!(e.truth().as_deref(), Some("write"));
    op.stop().await;

    // Nobody is watching when it expires.
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(e.truth().as_deref(), Some("write"));

    let started = std::time::Instant::now();
    let op = start_operator(&e.fake, &e.store, &e.sim.base_url());
    e.wait_state("restart", "Expired").await;
    assert_eq!(e.truth().as_deref(), Some("read"), "the previous level is restored");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "revoked {:?} after the restart",
        started.elapsed()
    );
    op.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provisioning_disabled_is_refused_without_a_write() {
    let (e, op) = env(14, false).await;
    e.set_level(Some("read")).await;
    e.create("off", "admin", json!({})).await;
    let g = e.wait_state("off", "Failed").await;
    let ready = condition(&g, "Ready").unwrap();
    assert_eq!(ready["reason"], "ProvisioningDisabled");
    assert_eq!(condition(&g, "Stalled").unwrap()["status"], "True");
    assert_eq!(e.truth().as_deref(), Some("read"), "nothing written");
    e.wait_event("off", "GrantFailed").await;
    // Never granted: deletion is not blocked.
    e.delete("off").await;
    assert_eq!(e.truth().as_deref(), Some("read"));
    op.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disabling_provisioning_stops_new_grants_but_deletion_still_revokes() {
    let (e, op) = env(18, true).await;
    e.set_level(None).await;
    e.create("held", "write", json!({})).await;
    e.wait_state("held", "Granted").await;
    assert_eq!(e.truth().as_deref(), Some("write"));
    let connectors: Api<bitbucket_operator::crd::BitbucketConnector> = Api::namespaced(e.fake.client(), NS);
    connectors
        .patch(
            "bb",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"provisioning": {"enabled": false}}})),
        )
        .await
        .unwrap();
    // A new grant is refused, without a write.
    e.create_for("new", &e.other_member_nick(), "read", json!({})).await;
    let g = e.wait_state("new", "Failed").await;
    assert_eq!(condition(&g, "Ready").unwrap()["reason"], "ProvisioningDisabled");
    // Deleting the held one revokes it: disabling stops new grants only.
    e.delete("held").await;
    let note = e.wait_event("held", "Revoked").await;
    assert!(note.contains("revoked write"), "{note}");
    assert_eq!(e.truth(), None, "revoked although provisioning is off");
    assert!(
        e.events_of("held").iter().all(|(r, _)| r != "RevokeSkipped"),
        "nothing is skipped any more"
    );
    op.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_membership_is_granted_and_removed_again() {
    let (e, op) = env(19, true).await;
    let org = e.sim.organisation();
    let ws = &org.workspaces[0];
    let group = ws
        .groups
        .iter()
        .find(|g| !g.members.contains(&e.n.user_uuid))
        .expect("a group the user is not in")
        .slug
        .clone();
    let member = |e: &Env| {
        let org = e.sim.organisation();
        let ws = org.workspaces.iter().find(|w| w.slug == e.n.ws).unwrap();
        ws.groups
            .iter()
            .find(|g| g.slug == group)
            .unwrap()
            .members
            .contains(&e.n.user_uuid)
    };
    let obj = json!({
        "apiVersion": API,
        "kind": GRANT,
        "metadata": {"name": "join", "namespace": NS},
        "spec": {
            "connectorRef": {"name": "bb"},
            "principal": {"user": e.n.user_uuid},
            "target": {"workspace": e.n.ws, "group": group},
            "permission": "member",
        },
    });
    e.grants()
        .create(&PostParams::default(), &serde_json::from_value(obj).unwrap())
        .await
        .unwrap();
    let g = e.wait_state("join", "Granted").await;
    assert!(member(&e));
    assert!(g["status"]["previousPermission"].is_null());
    assert_eq!(g["status"]["target"], format!("group/{group}"));
    assert_eq!(g["status"]["applied"]["permission"], "member");
    assert_eq!(g["status"]["applied"]["principal"]["id"], e.n.user_uuid.as_str());
    assert_eq!(g["status"]["applied"]["target"], json!({"kind": "group", "key": group}));
    e.delete("join").await;
    assert!(!member(&e), "membership removed again");
    op.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_member_user_is_refused() {
    let (e, op) = env(15, true).await;
    let outsider = e.n.outsider_nick.clone();
    e.create_for("outsider", &outsider, "read", json!({})).await;
    let g = e.wait_state("outsider", "Failed").await;
    let ready = condition(&g, "Ready").unwrap();
    assert_eq!(ready["reason"], "NotWorkspaceMember");
    assert!(ready["message"].as_str().unwrap().contains("invite"), "{ready}");
    assert_eq!(condition(&g, "Stalled").unwrap()["status"], "True");
    e.delete("outsider").await;
    op.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlapping_grants_higher_wins_and_removal_restores_the_other() {
    let (e, op) = env(16, true).await;
    e.set_level(Some("read")).await;

    e.create("low", "write", json!({})).await;
    e.wait_state("low", "Granted").await;
    e.create("high", "admin", json!({})).await;
    let high = e.wait_state("high", "Granted").await;
    assert_eq!(e.truth().as_deref(), Some("admin"), "the higher level wins");
    assert_eq!(
        high["status"]["previousPermission"], "read",
        "the level before any of them, not the other grant's write"
    );

    e.delete("high").await;
    assert_eq!(e.truth().as_deref(), Some("write"), "the remaining grant's level");
    e.delete("low").await;
    assert_eq!(e.truth().as_deref(), Some("read"), "the original level");

    // The other order: the lower one ends first, the higher one stays.
    e.create("a-admin", "admin", json!({})).await;
    e.wait_state("a-admin", "Granted").await;
    e.create("b-write", "write", json!({})).await;
    let b = e.wait_state("b-write", "Granted").await;
    assert_eq!(b["status"]["previousPermission"], "read");
    assert_eq!(e.truth().as_deref(), Some("admin"));
    e.delete("b-write").await;
    assert_eq!(e.truth().as_deref(), Some("admin"));
    e.delete("a-admin").await;
    assert_eq!(e.truth().as_deref(), Some("read"));
    op.stop().await;
}

/// The CRD makes the request immutable (CEL, tested in tests/chart); an
/// API server that lets a change through anyway (the fake here enforces no
/// CEL) changes nothing in Bitbucket: the held access stays exactly as
/// granted, its end never moves later, and the grant says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spec_change_the_api_server_let_through_never_widens_access() {
    let (e, op) = env(17, true).await;
    e.set_level(Some("read")).await;
    e.create("change", "write", json!({"duration": "1h"})).await;
    let granted = e.wait_state("change", "Granted").await;
    assert_eq!(e.truth().as_deref(), Some("write"));
    let expires = granted["status"]["expiresAt"].clone();
    assert!(expires.is_string());

    e.grants()
        .patch(
            "change",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"permission": "admin", "duration": "100h"}})),
        )
        .await
        .unwrap();
    let g = e
        .fake
        .wait_for(API, GRANT, Some(NS), "change", WAIT, |g| {
            g["status"]["observedGeneration"] == 2
        })
        .await;
    let ready = condition(&g, "Ready").unwrap();
    assert_eq!(
        (ready["status"].as_str(), ready["reason"].as_str()),
        (Some("False"), Some("SpecImmutable"))
    );
    assert!(ready["message"].as_str().unwrap().contains("write on"), "{ready}");
    assert_eq!(condition(&g, "Stalled").unwrap()["status"], "True");
    assert_eq!(g["status"]["state"], "Granted", "the access it holds is in place");
    assert_eq!(g["status"]["applied"]["permission"], "write");
    assert_eq!(
        g["status"]["expiresAt"], expires,
        "a longer duration does not extend it"
    );
    assert_eq!(e.truth().as_deref(), Some("write"), "nothing written");
    assert!(e.events_of("change").iter().all(|(r, _)| r != "Revoked"));

    // Back to the original request, with a shorter duration: held again, ending sooner.
    e.grants()
        .patch(
            "change",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"permission": "write", "duration": "30m"}})),
        )
        .await
        .unwrap();
    let g = e
        .fake
        .wait_for(API, GRANT, Some(NS), "change", WAIT, |g| {
            g["status"]["observedGeneration"] == 3
        })
        .await;
    assert_eq!(condition(&g, "Ready").unwrap()["status"], "True");
    let before: jiff::Timestamp = expires.as_str().unwrap().parse().unwrap();
    let now: jiff::Timestamp = g["status"]["expiresAt"].as_str().unwrap().parse().unwrap();
    assert_eq!(before.duration_since(now).as_secs(), 1800, "30 minutes sooner");

    e.delete("change").await;
    assert_eq!(e.truth().as_deref(), Some("read"));
    op.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tampered_applied_access_annotation_is_ignored() {
    let (e, op) = env(20, true).await;
    let victim = e.other_member_uuid();
    e.set_level(None).await;
    e.set_level_of(&victim, Some("admin")).await;

    e.create("tamper", "write", json!({})).await;
    let g = e.wait_state("tamper", "Granted").await;
    assert_eq!(e.truth().as_deref(), Some("write"));
    assert_eq!(g["status"]["applied"]["permission"], "write");
    assert_eq!(g["status"]["applied"]["principal"]["id"], e.n.user_uuid.as_str());

    // Someone with `patch` on the grant (not on its status) points the
    // annotation the previous version trusted at another user's access.
    let forged = json!({
        "connector": "bb",
        "principal": {"user": victim},
        "target": {"workspace": e.n.ws, "repository": e.n.repo},
        "permission": "admin",
    });
    e.grants()
        .patch(
            "tamper",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {"connectors.dev/applied-access": forged.to_string()}}})),
        )
        .await
        .unwrap();
    e.delete("tamper").await;
    assert_eq!(
        e.truth_of(&victim).as_deref(),
        Some("admin"),
        "the other user's access is untouched"
    );
    assert_eq!(e.truth(), None, "the real grantee's access is revoked");
    let note = e.wait_event("tamper", "Revoked").await;
    assert!(note.contains("write"), "{note}");
    op.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_of_the_previous_version_is_taken_to_hold_its_spec() {
    let (e, op) = env(21, true).await;
    let victim = e.other_member_uuid();
    e.set_level(Some("read")).await;
    e.set_level_of(&victim, Some("admin")).await;
    e.create("legacy", "write", json!({})).await;
    e.wait_state("legacy", "Granted").await;
    op.stop().await;

    // As the previous version left it: no status.applied, the access in an
    // annotation (here forged to name another user).
    let mut obj = e.fake.get(API, GRANT, Some(NS), "legacy").unwrap();
    obj["status"].as_object_mut().unwrap().remove("applied");
    obj["metadata"]["annotations"] = json!({"connectors.dev/applied-access": json!({
        "connector": "bb",
        "principal": {"user": victim},
        "target": {"workspace": e.n.ws, "repository": e.n.repo},
        "permission": "admin",
    }).to_string()});
    e.fake.put(obj);

    let op = start_operator(&e.fake, &e.store, &e.sim.base_url());
    let g = e
        .fake
        .wait_for(API, GRANT, Some(NS), "legacy", WAIT, |g| {
            g["status"]["applied"].is_object()
        })
        .await;
    assert_eq!(g["status"]["applied"]["principal"]["id"], e.n.user_uuid.as_str());
    assert_eq!(g["status"]["applied"]["permission"], "write");
    e.delete("legacy").await;
    assert_eq!(e.truth_of(&victim).as_deref(), Some("admin"));
    assert_eq!(e.truth().as_deref(), Some("read"), "the previous level is back");
    op.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_connector_is_reported_and_deletion_is_not_blocked() {
    let fake = FakeKube::start().await;
    let store = Arc::new(Store::open_in_memory().unwrap());
    let op = start_operator(&fake, &store, bitbucket_operator::bitbucket::DEFAULT_API_URL);
    fake.put(grant_json("orphan", "jdoe", "api", "acme", "read", json!({})));
    let g = fake
        .wait_for(API, GRANT, Some(NS), "orphan", WAIT, |g| {
            condition(g, "Ready").is_some_and(|r| r["reason"] == "ConnectorNotFound")
        })
        .await;
    assert_eq!(g["status"]["state"], "Pending");
    assert_eq!(condition(&g, "Stalled").unwrap()["status"], "True");

    // A connector in another namespace does not count.
    fake.put(json!({
        "apiVersion": API,
        "kind": CONNECTOR,
        "metadata": {"name": "bb", "namespace": "other"},
        "spec": {"secretRef": {"name": "x"}, "provisioning": {"enabled": true}},
    }));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let g = fake.get(API, GRANT, Some(NS), "orphan").unwrap();
    assert_eq!(condition(&g, "Ready").unwrap()["reason"], "ConnectorNotFound");

    // A connector appearing in the namespace re-triggers the grant at once
    // (it has no usable Secret: not ready).
    fake.put(json!({
        "apiVersion": API,
        "kind": CONNECTOR,
        "metadata": {"name": "bb", "namespace": NS},
        "spec": {"secretRef": {"name": "missing"}, "provisioning": {"enabled": true}},
    }));
    fake.wait_for(API, GRANT, Some(NS), "orphan", Duration::from_secs(10), |g| {
        condition(g, "Ready").is_some_and(|r| r["reason"] == "ConnectorNotReady")
    })
    .await;
    let api: Api<bitbucket_operator::crd::BitbucketAccessGrant> = Api::namespaced(fake.client(), NS);
    api.delete("orphan", &DeleteParams::default()).await.unwrap();
    fake.wait_for_absent(API, GRANT, Some(NS), "orphan", WAIT).await;
    op.stop().await;
}

/// The grant lifecycle against a real cluster.
///
/// Needs `KUBECONFIG` (a disposable cluster: it applies the CRDs from `crds/`
/// and creates a namespace). The operator runs in this process; Bitbucket is
/// the simulator on loopback, unless all of these point at real Bitbucket:
/// - `BITBUCKET_TEST_EMAIL`, `BITBUCKET_TEST_API_TOKEN`: an Atlassian API
///   token of a workspace admin (write:permission, delete:permission scopes);
/// - `BITBUCKET_TEST_WORKSPACE`, `BITBUCKET_TEST_REPOSITORY`: where to grant;
/// - `BITBUCKET_TEST_USER`: a workspace member (UUID, account id or nickname)
///   who holds no explicit permission on that repository.
///
/// Run: `cargo test --test access_grant -- --ignored real_cluster`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a Kubernetes cluster in KUBECONFIG"]
async fn real_cluster_grant_lifecycle() {
    let vars = [
        "BITBUCKET_TEST_EMAIL",
        "BITBUCKET_TEST_API_TOKEN",
        "BITBUCKET_TEST_WORKSPACE",
        "BITBUCKET_TEST_REPOSITORY",
        "BITBUCKET_TEST_USER",
    ];
    let values: Vec<Option<String>> = vars.iter().map(|v| std::env::var(v).ok()).collect();
    // Real Bitbucket when every variable is set, else the simulator (kept alive to the end).
    let (sim, api_url, [email, token, ws, repo, user]) = if values.iter().all(Option::is_some) {
        let values = <[Option<String>; 5]>::try_from(values).unwrap().map(Option::unwrap);
        (None, bitbucket_operator::bitbucket::DEFAULT_API_URL.to_owned(), values)
    } else {
        let sim = Simulator::start(SimConfig::default(), SocketAddr::from(([127, 0, 0, 1], 0)))
            .await
            .unwrap();
        let n = names(&sim.organisation());
        let c = sim.credentials().clone();
        let url = sim.base_url();
        (Some(sim), url, [c.email, c.api_token, n.ws, n.repo, n.user_nick])
    };
    let client = kube::Client::try_default().await.expect("KUBECONFIG");
    let ns = format!("bbag-test-{}", std::process::id());

    // CRDs, namespace, Secret, connector.
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for crd in bitbucket_operator::crd::crds() {
        let name = crd.metadata.name.clone().unwrap();
        crds.patch(
            &name,
            &PatchParams::apply("access-grant-test").force(),
            &Patch::Apply(&crd),
        )
        .await
        .unwrap();
    }
    // Wait until the API server serves the new types (Established), not a
    // fixed time: a slow cluster takes longer.
    for crd in bitbucket_operator::crd::crds() {
        let name = crd.metadata.name.clone().unwrap();
        let established = kube::runtime::wait::await_condition(
            crds.clone(),
            &name,
            kube::runtime::wait::conditions::is_crd_established(),
        );
        tokio::time::timeout(Duration::from_secs(60), established)
            .await
            .unwrap_or_else(|_| panic!("CRD {name} not Established within 60 s"))
            .unwrap();
    }
    let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
    namespaces
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": ns}})).unwrap(),
        )
        .await
        .unwrap();
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    secrets
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "metadata": {"name": "bitbucket-credentials",
                             "labels": {"connectors.dev/bitbucket-credentials": "true"}},
                "stringData": {"BATON_USERNAME": email, "BATON_APP_PASSWORD": token, "BATON_WORKSPACES": ws},
            }))
            .unwrap(),
        )
        .await
        .unwrap();
    let connectors: Api<bitbucket_operator::crd::BitbucketConnector> = Api::namespaced(client.clone(), &ns);
    connectors
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "metadata": {"name": "bb"},
                "spec": {"secretRef": {"name": "bitbucket-credentials"},
                         "provisioning": {"enabled": true, "requireDuration": false}, "apiUrl": api_url,
                         "resources": {"accounts": {"enabled": false}, "groups": {"enabled": false},
                                       "projects": {"enabled": false}}},
            }))
            .unwrap(),
        )
        .await
        .unwrap();

    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(&dir.path().join("store.db")).unwrap());
    let operator = Operator::new(
        client.clone(),
        store,
        Arc::new(Metrics::default()),
        vec![ns.clone()],
        allow_only(&api_url),
    );
    let (stop, rx) = watch::channel(false);
    let task = tokio::spawn(async move { operator.run_controllers(wait_for(rx)).await });

    let grants: Api<bitbucket_operator::crd::BitbucketAccessGrant> = Api::namespaced(client.clone(), &ns);
    let wait_state = async |name: &str, state: &str| {
        for _ in 0..120 {
            if let Some(g) = grants.get_opt(name).await.unwrap()
                && g.status.as_ref().and_then(|s| s.state.as_deref()) == Some(state)
            {
                return g;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        panic!("{name} never reached {state}");
    };
    let mut obj = grant_json("jit", &user, &repo, &ws, "read", json!({"expiresAt": in_secs(90)}));
    obj["metadata"]["namespace"] = json!(ns);
    grants
        .create(&PostParams::default(), &serde_json::from_value(obj).unwrap())
        .await
        .unwrap();
    let g = wait_state("jit", "Granted").await;
    assert!(g.status.unwrap().previous_permission.is_none());
    let bitbucket = Client::new(
        ClientConfig::new(&api_url).unwrap(),
        Credentials::ApiToken {
            username: email.clone(),
            token: token.clone(),
        },
    )
    .unwrap();
    let held = Provisioner::new(bitbucket, true)
        .inspect(&AccessRequest::new(
            ws.clone(),
            PrincipalRef::User(user.clone()),
            TargetRef::Repository(repo.clone()),
            Permission::Read,
        ))
        .await
        .unwrap();
    assert_eq!(held.level, Some(Permission::Read), "the grant landed in Bitbucket");
    wait_state("jit", "Expired").await;
    let mut obj = grant_json("deleted", &user, &repo, &ws, "read", json!({}));
    obj["metadata"]["namespace"] = json!(ns);
    grants
        .create(&PostParams::default(), &serde_json::from_value(obj).unwrap())
        .await
        .unwrap();
    wait_state("deleted", "Granted").await;
    grants.delete("deleted", &DeleteParams::default()).await.unwrap();
    for _ in 0..60 {
        if grants.get_opt("deleted").await.unwrap().is_none() {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    assert!(grants.get_opt("deleted").await.unwrap().is_none(), "finalizer released");

    grants.delete("jit", &DeleteParams::default()).await.unwrap();
    connectors.delete("bb", &DeleteParams::default()).await.unwrap();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let _ = stop.send(true);
    let _ = task.await;
    let _ = namespaces.delete(&ns, &DeleteParams::default()).await;
    if let Some(sim) = sim {
        sim.shutdown().await;
    }
}

/// The grant controller compares status with its own last write, not with
/// the watch cache: a reconcile that gets a copy older than that write (the
/// cache lags) neither writes the same status again nor decides from the
/// old one. (It used to compare with, and decide from, the cached copy.)
#[tokio::test]
async fn the_grant_status_writer_compares_with_its_own_last_write_not_a_stale_copy() {
    use bitbucket_operator::controller::common::Scaffold;
    use bitbucket_operator::controller::grant::is_held;
    use bitbucket_operator::crd::{BitbucketAccessGrant, BitbucketAccessGrantStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use kube::runtime::events::{Recorder, Reporter};

    let fake = FakeKube::start().await;
    fake.put(grant_json("g", "jdoe", "api", "acme", "write", json!({})));
    let api: Api<BitbucketAccessGrant> = Api::namespaced(fake.client(), NS);
    // What a lagging cache hands the reconcile: the grant before our write.
    let stale = Arc::new(api.get("g").await.unwrap());
    assert!(stale.status.is_none());
    let reporter = Reporter {
        controller: "test".into(),
        instance: None,
    };
    let scaffold = Scaffold::<BitbucketAccessGrant>::new(
        "grant",
        fake.client(),
        Recorder::new(fake.client(), reporter),
        Arc::new(Metrics::default()),
    );
    let granted = BitbucketAccessGrantStatus {
        state: Some("Granted".into()),
        granted_at: Some(Time(k8s_openapi::jiff::Timestamp::from_second(1_000).unwrap())),
        previous_permission: Some("read".into()),
        ..Default::default()
    };
    assert!(
        scaffold.write_status(&stale, &granted).await.unwrap(),
        "first write lands"
    );
    assert_eq!(api.get_status("g").await.unwrap().status.as_ref(), Some(&granted));
    let status_writes = || {
        fake.requests()
            .iter()
            .filter(|r| r.method == "PATCH" && r.path.ends_with("/g/status"))
            .count()
    };
    assert_eq!(status_writes(), 1);

    // The stale copy again: the same status is not written twice.
    assert!(!scaffold.write_status(&stale, &granted).await.unwrap());
    assert_eq!(status_writes(), 1, "no duplicate status write");
    // And the reconcile decides from what it wrote: the grant is held, so
    // it is not granted again (which would record the level it put in place
    // as `previousPermission`).
    let current = scaffold.with_current_status(Arc::clone(&stale));
    assert!(is_held(current.status.as_ref()));
    assert_eq!(current.status.as_ref(), Some(&granted));

    // A grant re-created under the same name (new uid) starts afresh.
    api.delete("g", &DeleteParams::default()).await.unwrap();
    fake.put(grant_json("g", "jdoe", "api", "acme", "write", json!({})));
    let recreated = Arc::new(api.get("g").await.unwrap());
    assert_ne!(recreated.metadata.uid, stale.metadata.uid);
    assert!(scaffold.with_current_status(recreated).status.is_none());
}

/// The grant controller reads the connector's Secret with the connector's
/// decoder: a provisioning switch whose bytes are not text is reported by
/// key (the connector is not ready), not silently read as "off" (which
/// used to fail the grant as ProvisioningDisabled, Stalled).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provisioning_switch_that_is_not_text_is_reported_not_read_as_off() {
    use k8s_openapi::ByteString;
    let (e, op) = env(22, true).await;
    let secrets: Api<Secret> = Api::namespaced(e.fake.client(), NS);
    let creds = e.sim.credentials().clone();
    secrets
        .delete("bitbucket-credentials", &DeleteParams::default())
        .await
        .unwrap();
    let binary = Secret {
        metadata: kube::api::ObjectMeta {
            name: Some("bitbucket-credentials".into()),
            namespace: Some(NS.into()),
            labels: Some([("connectors.dev/bitbucket-credentials".to_owned(), "true".to_owned())].into()),
            ..Default::default()
        },
        data: Some(
            [
                ("BATON_USERNAME".to_owned(), ByteString(creds.email.into_bytes())),
                (
                    "BATON_APP_PASSWORD".to_owned(),
                    ByteString(creds.api_token.into_bytes()),
                ),
                ("BATON_PROVISIONING".to_owned(), ByteString(vec![0xff, 0xfe, 0x00])),
            ]
            .into(),
        ),
        ..Default::default()
    };
    secrets.create(&PostParams::default(), &binary).await.unwrap();
    e.fake
        .wait_for(API, CONNECTOR, Some(NS), "bb", WAIT, |c| {
            condition(c, "Ready").is_some_and(|r| r["reason"] == "SecretKeyMissing")
        })
        .await;

    e.create("binary", "write", json!({})).await;
    let g = e
        .fake
        .wait_for(API, GRANT, Some(NS), "binary", WAIT, |g| {
            condition(g, "Ready").is_some()
        })
        .await;
    let ready = condition(&g, "Ready").unwrap();
    assert_eq!(ready["reason"], "ConnectorNotReady", "{g}");
    let message = ready["message"].as_str().unwrap();
    assert!(message.contains("BATON_PROVISIONING is not UTF-8 text"), "{message}");
    assert_eq!(g["status"]["state"], "Pending", "retried, not Failed");
    assert!(condition(&g, "Stalled").is_none());
    op.stop().await;
}

/// The grant controller reads the connector's Secret under the same opt-in
/// rule as the connector: once the label is removed, it does not read the
/// provisioning switch, says why by the label's name, and writes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secret_that_no_longer_opts_in_is_not_read_by_the_grant_controller() {
    let (e, op) = env(23, true).await;
    e.set_level(Some("read")).await;
    let mut secret = e.fake.get("v1", "Secret", Some(NS), "bitbucket-credentials").unwrap();
    secret["metadata"]["labels"] = json!({});
    e.fake.put(secret);
    e.create("unlabelled", "write", json!({})).await;
    let g = e
        .fake
        .wait_for(API, GRANT, Some(NS), "unlabelled", WAIT, |g| {
            condition(g, "Ready").is_some_and(|r| r["reason"] == "ConnectorNotReady")
        })
        .await;
    let message = condition(&g, "Ready").unwrap()["message"].as_str().unwrap();
    assert!(
        message.contains("connectors.dev/bitbucket-credentials"),
        "names the label: {message}"
    );
    assert!(!g.to_string().contains(&e.sim.credentials().api_token));
    assert_eq!(e.truth().as_deref(), Some("read"), "nothing written to Bitbucket");
    op.stop().await;
}
