//! The connector's grant policy (`spec.provisioning`) and revocation that is
//! always possible, end to end: the operator runs against the in-process
//! fake Kubernetes API and the Bitbucket simulator, and "nothing was
//! written" is checked against the simulator's ground truth (the whole
//! organisation, compared before and after).
//!
//! The CEL that makes a grant's request immutable is tested in
//! `tests/chart` (celpy); what the controller does with a change that got
//! through anyway is in `tests/access_grant.rs`.

pub mod support;

use std::sync::Arc;
use std::time::Duration;

use bitbucket_operator::simulator::SimulatorHandle;
use bitbucket_operator::store::Store;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use support::fake_kube::FakeKube;
use support::grant_env::{
    API, CONNECTOR, GRANT, bitbucket_client, events_about, explicit_level, fake_api_with_connector, in_secs,
    plain_members, set_level, start_simulator, wait_connector_ready,
};
use support::running_operator::RunningOperator;
use support::status::condition;

/// The connector's namespace.
const NS: &str = "bitbucket";
const WAIT: Duration = Duration::from_secs(30);

fn start_operator(fake: &FakeKube, store: &Arc<Store>, api_url: &str) -> RunningOperator {
    RunningOperator::spawn(support::grant_env::operator(fake, Arc::clone(store), api_url), WAIT)
}

struct Env {
    fake: FakeKube,
    sim: SimulatorHandle,
    store: Arc<Store>,
    /// Workspace 0 (the connector's), workspace 1 (not the connector's).
    ws: String,
    other_ws: String,
    /// Plain members of workspace 0: nickname and UUID.
    users: Vec<(String, String)>,
    /// Repositories of workspace 0.
    repos: Vec<String>,
    project: String,
}

/// Simulator, fake API, a Secret (`BATON_PROVISIONING` = `secret_switch`)
/// and the connector `bb` in `bitbucket` with `policy` as
/// `spec.provisioning`, workspace 0 only; the operator runs and the
/// connector is Ready.
async fn env(seed: u64, secret_switch: Option<&str>, policy: Value) -> (Env, RunningOperator) {
    let sim = start_simulator(seed).await;
    let org = sim.organisation();
    let w0 = &org.workspaces[0];
    let users: Vec<(String, String)> = plain_members(&org, 0).into_iter().take(3).collect();
    assert_eq!(users.len(), 3, "three plain members");
    let spec = json!({"workspaces": [w0.slug], "provisioning": policy});
    let fake = fake_api_with_connector(&sim, NS, secret_switch, spec).await;
    let store = Arc::new(Store::open_in_memory().unwrap());
    let running = start_operator(&fake, &store, &sim.base_url());
    wait_connector_ready(&fake, NS, "bb", Duration::from_secs(60)).await;
    let env = Env {
        ws: w0.slug.clone(),
        other_ws: org.workspaces[1].slug.clone(),
        users,
        repos: w0.repositories.iter().map(|r| r.slug.clone()).collect(),
        project: w0.projects[0].key.clone(),
        fake,
        sim,
        store,
    };
    (env, running)
}

impl Env {
    /// A grant of `permission` on repository `repo` to `user`, in `namespace`.
    fn grant(&self, name: &str, namespace: &str, user: &str, repo: &str, permission: &str, extra: Value) -> Value {
        let mut spec = json!({
            "connectorRef": {"name": "bb"},
            "principal": {"user": user},
            "target": {"workspace": self.ws, "repository": repo},
            "permission": permission,
        });
        if namespace != NS {
            spec["connectorRef"]["namespace"] = json!(NS);
        }
        spec.as_object_mut()
            .unwrap()
            .extend(extra.as_object().cloned().unwrap_or_default());
        json!({"apiVersion": API, "kind": GRANT, "metadata": {"name": name, "namespace": namespace}, "spec": spec})
    }

    async fn create(&self, obj: Value) {
        let namespace = obj["metadata"]["namespace"].as_str().unwrap().to_owned();
        Api::<bitbucket_operator::crd::BitbucketAccessGrant>::namespaced(self.fake.client(), &namespace)
            .create(&PostParams::default(), &serde_json::from_value(obj).unwrap())
            .await
            .unwrap();
    }

    async fn wait_state(&self, namespace: &str, name: &str, state: &str) -> Value {
        self.fake
            .wait_for(API, GRANT, Some(namespace), name, WAIT, |g| {
                g["status"]["state"] == state
            })
            .await
    }

    async fn delete(&self, namespace: &str, name: &str) {
        Api::<bitbucket_operator::crd::BitbucketAccessGrant>::namespaced(self.fake.client(), namespace)
            .delete(name, &DeleteParams::default())
            .await
            .unwrap();
        self.fake.wait_for_absent(API, GRANT, Some(namespace), name, WAIT).await;
    }

    /// Ground truth: the whole simulated organisation.
    fn truth_all(&self) -> Value {
        serde_json::to_value(self.sim.organisation()).unwrap()
    }

    /// Ground truth: a user's explicit level on a repository of workspace 0.
    fn level(&self, uuid: &str, repo: &str) -> Option<String> {
        explicit_level(&self.sim, &self.ws, repo, uuid)
    }

    /// Sets a user's explicit level on a repository, outside the operator.
    async fn set_level(&self, uuid: &str, repo: &str, level: &str) {
        set_level(&bitbucket_client(&self.sim), &self.ws, uuid, repo, Some(level)).await;
        assert_eq!(self.level(uuid, repo).as_deref(), Some(level));
    }

    fn events_of(&self, kind: &str, name: &str) -> Vec<(String, String, String)> {
        events_about(&self.fake, kind, name)
    }

    async fn wait_event(&self, kind: &str, name: &str, reason: &str) -> (String, String) {
        support::grant_env::wait_event(&self.fake, kind, name, reason, WAIT).await
    }

    /// Waits for `Denied` with `reason`, and checks Stalled and the Warning Event.
    async fn assert_denied(&self, namespace: &str, name: &str, reason: &str) -> String {
        let g = self.wait_state(namespace, name, "Denied").await;
        let ready = condition(&g, "Ready").unwrap();
        assert_eq!(
            (ready["status"].as_str(), ready["reason"].as_str()),
            (Some("False"), Some(reason)),
            "{name}: {ready}"
        );
        assert_eq!(condition(&g, "Stalled").unwrap()["reason"], reason);
        assert!(g["status"]["applied"].is_null() && g["status"]["grantedAt"].is_null());
        let (type_, note) = self.wait_event(GRANT, name, "Denied").await;
        assert_eq!(type_, "Warning");
        assert!(note.starts_with(reason), "{note}");
        ready["message"].as_str().unwrap().to_owned()
    }
}

/// Every rule of the policy denies, names itself, and nothing is written to
/// Bitbucket; a grant inside the policy is granted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_policy_rule_denies_and_writes_nothing() {
    let (e, op) = env(
        41,
        Some("true"),
        json!({
            "maxDuration": "2h",
            "allowedTargets": {"repositories": []},
            "grantNamespaces": ["team-a"],
        }),
    )
    .await;
    let allowed_repo = e.repos[0].clone();
    let other_repo = e.repos.iter().find(|r| !r.starts_with(&allowed_repo)).unwrap().clone();
    let connectors: Api<bitbucket_operator::crd::BitbucketConnector> = Api::namespaced(e.fake.client(), NS);
    connectors
        .patch(
            "bb",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"provisioning": {"allowedTargets": {
                "repositories": [format!("{}/{allowed_repo}*", e.ws)],
            }}}})),
        )
        .await
        .unwrap();
    let (user, _) = e.users[0].clone();
    let before = e.truth_all();

    let cases: Vec<(&str, Value, &str)> = vec![
        (
            "no-end",
            e.grant("no-end", NS, &user, &allowed_repo, "read", json!({})),
            "DurationRequired",
        ),
        (
            "too-long",
            e.grant("too-long", NS, &user, &allowed_repo, "read", json!({"duration": "3h"})),
            "DurationExceedsMaximum",
        ),
        (
            "too-late",
            e.grant(
                "too-late",
                NS,
                &user,
                &allowed_repo,
                "read",
                json!({"expiresAt": in_secs(5 * 3600)}),
            ),
            "DurationExceedsMaximum",
        ),
        (
            "admin",
            e.grant("admin", NS, &user, &allowed_repo, "admin", json!({"duration": "1h"})),
            "PermissionNotAllowed",
        ),
        (
            "other-repo",
            e.grant("other-repo", NS, &user, &other_repo, "read", json!({"duration": "1h"})),
            "TargetNotAllowed",
        ),
        (
            "project",
            {
                let mut g = e.grant("project", NS, &user, &allowed_repo, "read", json!({"duration": "1h"}));
                g["spec"]["target"] = json!({"workspace": e.ws, "project": e.project});
                g
            },
            "TargetNotAllowed",
        ),
        (
            "other-ws",
            {
                let mut g = e.grant("other-ws", NS, &user, &allowed_repo, "read", json!({"duration": "1h"}));
                g["spec"]["target"]["workspace"] = json!(e.other_ws);
                g
            },
            "WorkspaceNotAllowed",
        ),
        (
            "team-b",
            e.grant(
                "team-b",
                "team-b",
                &user,
                &allowed_repo,
                "read",
                json!({"duration": "1h"}),
            ),
            "NamespaceNotAllowed",
        ),
    ];
    for (_, obj, _) in &cases {
        e.create(obj.clone()).await;
    }
    for (name, obj, reason) in &cases {
        let namespace = obj["metadata"]["namespace"].as_str().unwrap();
        let message = e.assert_denied(namespace, name, reason).await;
        assert!(
            message.contains("spec.provisioning") || message.contains("grantNamespaces"),
            "{message}"
        );
    }
    assert_eq!(e.truth_all(), before, "nothing was written to Bitbucket");
    // Each denial is reported once, not on every retry.
    tokio::time::sleep(Duration::from_secs(2)).await;
    for (name, _, _) in &cases {
        let denials = e
            .events_of(GRANT, name)
            .iter()
            .filter(|(_, r, _)| r == "Denied")
            .count();
        assert_eq!(denials, 1, "{name}");
    }

    // Inside the policy: granted.
    e.create(e.grant("ok", NS, &user, &allowed_repo, "write", json!({"duration": "1h"})))
        .await;
    e.wait_state(NS, "ok", "Granted").await;
    assert_eq!(e.level(&e.users[0].1, &allowed_repo).as_deref(), Some("write"));
    op.stop().await;
}

/// A team namespace asks for access through a connector of another
/// namespace: allowed when the connector lists it, Denied otherwise (and a
/// missing connector there reads the same), and listing it later lets the
/// waiting grant through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_namespace_grants_follow_grant_namespaces() {
    let (e, op) = env(42, Some("true"), json!({"grantNamespaces": ["team-a"]})).await;
    let repo = e.repos[0].clone();
    let (alice, alice_uuid) = e.users[0].clone();
    let (bob, bob_uuid) = e.users[1].clone();

    e.create(e.grant("alice", "team-a", &alice, &repo, "write", json!({"duration": "1h"})))
        .await;
    let g = e.wait_state("team-a", "alice", "Granted").await;
    assert_eq!(e.level(&alice_uuid, &repo).as_deref(), Some("write"));
    assert_eq!(g["status"]["applied"]["connectorNamespace"], NS);

    let before = e.truth_all();
    e.create(e.grant("bob", "team-b", &bob, &repo, "write", json!({"duration": "1h"})))
        .await;
    let message = e.assert_denied("team-b", "bob", "NamespaceNotAllowed").await;
    assert!(message.contains("team-b"), "{message}");
    let mut ghost = e.grant("ghost", "team-b", &bob, &repo, "write", json!({"duration": "1h"}));
    ghost["spec"]["connectorRef"]["name"] = json!("no-such-connector");
    e.create(ghost).await;
    let ghost_message = e.assert_denied("team-b", "ghost", "NamespaceNotAllowed").await;
    assert!(
        ghost_message.contains("does not exist or does not list"),
        "a missing connector in another namespace reads the same: {ghost_message}"
    );
    assert_eq!(e.truth_all(), before, "nothing was written");

    // The connector's owner lists team-b: the waiting grant goes through.
    let connectors: Api<bitbucket_operator::crd::BitbucketConnector> = Api::namespaced(e.fake.client(), NS);
    connectors
        .patch(
            "bb",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"provisioning": {"grantNamespaces": ["team-a", "team-b"]}}})),
        )
        .await
        .unwrap();
    e.wait_state("team-b", "bob", "Granted").await;
    assert_eq!(e.level(&bob_uuid, &repo).as_deref(), Some("write"));

    e.delete("team-a", "alice").await;
    assert_eq!(
        e.level(&alice_uuid, &repo),
        None,
        "revoked through the other namespace's connector"
    );
    e.delete("team-b", "bob").await;
    assert_eq!(e.level(&bob_uuid, &repo), None);
    op.stop().await;
}

/// `BATON_PROVISIONING=false` in the Secret is a veto: `enabled: true` on
/// the connector does not override it, the conflict is reported naming
/// both (on the connector and the grant), and nothing is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_secrets_false_is_a_veto_the_connector_cannot_override() {
    let (e, op) = env(43, Some("false"), json!({"enabled": true})).await;
    let before = e.truth_all();
    let (user, _) = e.users[0].clone();
    e.create(e.grant("vetoed", NS, &user, &e.repos[0], "read", json!({"duration": "1h"})))
        .await;
    let g = e.wait_state(NS, "vetoed", "Failed").await;
    let ready = condition(&g, "Ready").unwrap();
    assert_eq!(ready["reason"], "ProvisioningDisabled");
    let message = ready["message"].as_str().unwrap();
    assert!(
        message.contains("spec.provisioning.enabled is true") && message.contains("BATON_PROVISIONING=false"),
        "{message}"
    );
    let c = e
        .fake
        .wait_for(API, CONNECTOR, Some(NS), "bb", WAIT, |c| {
            condition(c, "Provisioning").is_some()
        })
        .await;
    let p = condition(&c, "Provisioning").unwrap();
    assert_eq!(
        (p["status"].as_str(), p["reason"].as_str()),
        (Some("False"), Some("ProvisioningConflict"))
    );
    let (type_, note) = e.wait_event(CONNECTOR, "bb", "ProvisioningConflict").await;
    assert_eq!(type_, "Warning");
    assert!(note.contains("BATON_PROVISIONING=false"), "{note}");
    assert_eq!(
        condition(&c, "Ready").unwrap()["status"],
        "True",
        "syncing is unaffected"
    );
    assert_eq!(e.truth_all(), before, "nothing was written");
    op.stop().await;
}

/// Held grants outlive a provisioning switch turned off (by the Secret's
/// veto here): they still expire on time and restore exactly what was held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disabling_provisioning_with_live_grants_still_expires_them_exactly() {
    let (e, op) = env(44, Some("true"), json!({})).await;
    let repo = e.repos[0].clone();
    let (alice, alice_uuid) = e.users[0].clone();
    let (bob, bob_uuid) = e.users[1].clone();
    e.set_level(&alice_uuid, &repo, "read").await;
    e.create(e.grant("alice", NS, &alice, &repo, "write", json!({"expiresAt": in_secs(6)})))
        .await;
    e.create(e.grant("bob", NS, &bob, &repo, "read", json!({"expiresAt": in_secs(6)})))
        .await;
    e.wait_state(NS, "alice", "Granted").await;
    e.wait_state(NS, "bob", "Granted").await;
    assert_eq!(e.level(&alice_uuid, &repo).as_deref(), Some("write"));
    assert_eq!(e.level(&bob_uuid, &repo).as_deref(), Some("read"));

    Api::<Secret>::namespaced(e.fake.client(), NS)
        .patch(
            "bitbucket-credentials",
            &PatchParams::default(),
            &Patch::Merge(json!({"stringData": {"BATON_PROVISIONING": "false"}})),
        )
        .await
        .unwrap();
    // The switch is off for new grants.
    let (carol, _) = e.users[2].clone();
    e.create(e.grant("carol", NS, &carol, &repo, "read", json!({"duration": "1h"})))
        .await;
    e.wait_state(NS, "carol", "Failed").await;

    e.wait_state(NS, "alice", "Expired").await;
    e.wait_state(NS, "bob", "Expired").await;
    assert_eq!(
        e.level(&alice_uuid, &repo).as_deref(),
        Some("read"),
        "the previous level, exactly"
    );
    assert_eq!(e.level(&bob_uuid, &repo), None, "held nothing before");
    op.stop().await;
}

/// Deleting a connector whose grants hold access revokes them first: the
/// connector says why it waits, each grant ends as Revoked, and only then
/// is the connector gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_connector_revokes_its_live_grants_first() {
    let (e, op) = env(45, Some("true"), json!({"grantNamespaces": ["team-a"]})).await;
    let repo = e.repos[0].clone();
    let (alice, alice_uuid) = e.users[0].clone();
    let (bob, bob_uuid) = e.users[1].clone();
    e.set_level(&alice_uuid, &repo, "read").await;
    e.create(e.grant("alice", NS, &alice, &repo, "write", json!({"duration": "1h"})))
        .await;
    e.create(e.grant("bob", "team-a", &bob, &repo, "write", json!({"duration": "1h"})))
        .await;
    e.wait_state(NS, "alice", "Granted").await;
    e.wait_state("team-a", "bob", "Granted").await;

    let connectors: Api<bitbucket_operator::crd::BitbucketConnector> = Api::namespaced(e.fake.client(), NS);
    connectors.delete("bb", &DeleteParams::default()).await.unwrap();
    let (_, note) = e.wait_event(CONNECTOR, "bb", "RevokingGrants").await;
    assert!(
        note.contains("2 grant(s)") && note.contains("bitbucket/alice") && note.contains("team-a/bob"),
        "{note}"
    );
    let g = e.wait_state(NS, "alice", "Revoked").await;
    let ready = condition(&g, "Ready").unwrap();
    assert_eq!(ready["reason"], "ConnectorDeleted");
    assert!(g["status"]["applied"].is_null());
    e.wait_state("team-a", "bob", "Revoked").await;
    assert_eq!(
        e.level(&alice_uuid, &repo).as_deref(),
        Some("read"),
        "the previous level is back"
    );
    assert_eq!(e.level(&bob_uuid, &repo), None);
    e.fake.wait_for_absent(API, CONNECTOR, Some(NS), "bb", WAIT).await;

    // The grants stay (GitOps owns them), revoked for good; deleting them writes nothing.
    let before = e.truth_all();
    e.delete(NS, "alice").await;
    e.delete("team-a", "bob").await;
    assert_eq!(e.truth_all(), before);
    let store = Arc::clone(&e.store);
    let left = tokio::task::spawn_blocking(move || store.grants("bitbucket/bb"))
        .await
        .unwrap()
        .unwrap_or_default();
    assert!(left.is_empty(), "the connector's data is gone with it");
    op.stop().await;
}
