//! ConductorOne: the c1z written from a synced store, and the whole
//! service-mode loop against a fake ConductorOne (tests/support/fake_c1.rs)
//! and the Bitbucket simulator.

pub mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use bitbucket_operator::bitbucket::{Client, ClientConfig, Credentials};
use bitbucket_operator::conductorone::c1z::{self, C1z};
use bitbucket_operator::conductorone::proto::{baton, connector as pb};
use bitbucket_operator::conductorone::{
    Backend, C1Endpoint, ClientCredentials, ConnectionReason, OnRejected, ServiceSession, ServiceSettings,
    SessionError, SessionStatus, Timing, export,
};
use bitbucket_operator::model::{SyncKind, project_id, repository_id};
use bitbucket_operator::provision::Provisioner;
use bitbucket_operator::simulator::{Organisation, SimConfig, Simulator, SimulatorHandle};
use bitbucket_operator::store::Store;
use bitbucket_operator::sync::cli::demo_config;
use bitbucket_operator::sync::{SyncEngine, run_into_store};
use prost::Message;
use support::fake_c1;
use support::fake_c1::{FakeC1, FakeOptions, sync_full_task};
use tokio_util::sync::CancellationToken;

const CONNECTOR: &str = "c1-test";

async fn start_sim(config: SimConfig) -> SimulatorHandle {
    Simulator::start(config, SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .unwrap()
}

fn engine(sim: &SimulatorHandle) -> SyncEngine {
    let mut config = ClientConfig::new(&sim.base_url()).unwrap();
    config.backoff_base = Duration::from_millis(5);
    config.backoff_max = Duration::from_millis(50);
    config.limits.max_in_flight = 8;
    let c = sim.credentials();
    let credentials = Credentials::ApiToken {
        username: c.email.clone(),
        token: c.api_token.clone(),
    };
    SyncEngine::new(Client::new(config, credentials).unwrap(), Vec::new())
}

async fn full_sync(engine: &SyncEngine, store: &Arc<Store>) {
    let scope = engine.connect().await.unwrap();
    for kind in SyncKind::ALL {
        run_into_store(engine, store, CONNECTOR, kind, &scope).await.unwrap();
    }
}

fn count_by_type(c: &C1z) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for r in &c.resources {
        *out.entry(r.resource_type_id.clone()).or_default() += 1;
    }
    out
}

/// What the simulator's organisation says the c1z must hold.
struct Truth {
    users: BTreeSet<String>,
    resources_by_type: BTreeMap<String, usize>,
}

fn truth(org: &Organisation) -> Truth {
    let mut users = BTreeSet::new();
    let mut by_type: BTreeMap<String, usize> = BTreeMap::new();
    for ws in &org.workspaces {
        users.extend(ws.members.iter().map(|m| m.user_uuid.clone()));
        // Explicit permissions of non-members make a user resource too.
        for perms in ws
            .projects
            .iter()
            .map(|p| &p.user_permissions)
            .chain(ws.repositories.iter().map(|r| &r.user_permissions))
        {
            users.extend(
                perms
                    .iter()
                    .filter(|p| p.permission != "none")
                    .map(|p| p.principal.clone()),
            );
        }
        *by_type.entry("workspace".into()).or_default() += 1;
        *by_type.entry("user_group".into()).or_default() += ws.groups.len();
        *by_type.entry("project".into()).or_default() += ws.projects.len();
        *by_type.entry("repository".into()).or_default() += ws.repositories.len();
    }
    by_type.insert("user".into(), users.len());
    Truth {
        users,
        resources_by_type: by_type,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c1z_of_the_demo_organisation_is_complete_and_consistent() {
    let sim = start_sim(demo_config()).await;
    let store = Arc::new(Store::open_in_memory().unwrap());
    full_sync(&engine(&sim), &store).await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("demo.c1z");
    let report = export(&store, CONNECTOR, &out).unwrap();

    let bytes = std::fs::read(&out).unwrap();
    assert_eq!(&bytes[..5], b"C1ZF\0");
    // Exactly one zstd frame after the header.
    assert_eq!(&bytes[5..9], &[0x28, 0xb5, 0x2f, 0xfd]);
    let file = c1z::read(&out).unwrap();
    let counts = file.verify().unwrap_or_else(|p| panic!("c1z problems: {p:#?}"));
    println!(
        "demo c1z counts: {counts:?}, by type {:?}, {} bytes",
        count_by_type(&file),
        report.file.bytes
    );

    let org = sim.organisation();
    let truth = truth(&org);
    assert_eq!(count_by_type(&file), truth.resources_by_type);
    let users: BTreeSet<String> = file
        .resources
        .iter()
        .filter(|r| r.resource_type_id == "user")
        .map(|r| r.resource.id.clone().unwrap().resource)
        .collect();
    assert_eq!(users, truth.users, "every user exactly once");
    assert_eq!(counts.resource_types, 5);

    // Entitlements: baton-bitbucket's slugs plus the workspace owner.
    let slugs: BTreeMap<String, BTreeSet<String>> = file.entitlements.iter().fold(BTreeMap::new(), |mut m, e| {
        m.entry(e.0.clone()).or_default().insert(e.4.slug.clone());
        m
    });
    let want = |s: &[&str]| s.iter().map(|x| x.to_string()).collect::<BTreeSet<_>>();
    assert_eq!(slugs["workspace"], want(&["member", "owner"]));
    assert_eq!(slugs["user_group"], want(&["member"]));
    assert_eq!(
        slugs["project"],
        want(&["repository", "read", "write", "create-repo", "admin"])
    );
    assert_eq!(slugs["repository"], want(&["read", "write", "admin"]));

    // Repositories sit under their project; the project lists repositories as children.
    let ws = &org.workspaces[0];
    let repo = &ws.repositories[0];
    let project = ws.projects.iter().find(|p| p.key == repo.project_key).unwrap();
    let pid = project_id(&ws.uuid, &project.uuid, &project.key);
    let rid = repository_id(&ws.uuid, &project.uuid, &project.key, &repo.uuid);
    let row = file
        .resources
        .iter()
        .find(|r| r.external_id == format!("repository:{rid}"))
        .unwrap();
    assert_eq!(
        (
            row.parent_resource_type_id.as_deref(),
            row.parent_resource_id.as_deref()
        ),
        (Some("project"), Some(pid.as_str()))
    );
    let project_row = file
        .resources
        .iter()
        .find(|r| r.external_id == format!("project:{pid}"))
        .unwrap();
    let children: Vec<String> = project_row
        .resource
        .annotations
        .iter()
        .filter(|a| a.type_url.ends_with("ChildResourceType"))
        .map(|a| {
            pb::ChildResourceType::decode(a.value.as_slice())
                .unwrap()
                .resource_type_id
        })
        .collect();
    assert_eq!(children, vec!["repository"]);
    let repo_grant = format!("project:{pid}:repository:repository:{rid}");
    assert!(
        file.grants.iter().any(|g| g.external_id == repo_grant),
        "project repository grant"
    );

    // A user's trait carries email, login and status from the simulator.
    let user = &org
        .users
        .iter()
        .find(|u| ws.members.iter().any(|m| m.user_uuid == u.uuid))
        .unwrap();
    let row = file
        .resources
        .iter()
        .find(|r| r.external_id == format!("user:{}", user.uuid))
        .unwrap();
    let trait_ = row
        .resource
        .annotations
        .iter()
        .find(|a| a.type_url.ends_with("UserTrait"))
        .unwrap();
    let trait_ = pb::UserTrait::decode(trait_.value.as_slice()).unwrap();
    assert_eq!(trait_.login, user.nickname);
    assert_eq!(
        trait_.emails.first().map(|e| e.address.as_str()),
        Some(user.email.as_str())
    );
    let enabled = pb::user_trait::status::Status::Enabled as i32;
    assert_eq!(trait_.status.unwrap().status == enabled, user.active);

    // Owner grants match the simulator's owners.
    let owners: BTreeSet<String> = file
        .grants
        .iter()
        .filter(|g| g.entitlement_id.ends_with(":owner"))
        .map(|g| g.principal_resource_id.clone())
        .collect();
    let want_owners: BTreeSet<String> = org
        .workspaces
        .iter()
        .flat_map(|w| w.members.iter().filter(|m| m.owner).map(|m| m.user_uuid.clone()))
        .collect();
    assert_eq!(owners, want_owners);

    // Stats: Go-readable JSON with each type's data age.
    let stats: serde_json::Value = serde_json::from_str(file.sync_runs[0].stats.as_deref().unwrap()).unwrap();
    assert_eq!(stats["resources"], counts.resources);
    assert!(stats["step_durations_ms"]["data_age_repository"].is_number());
    sim.shutdown().await;
}

#[test]
fn a_corrupt_or_foreign_file_is_an_error_not_a_panic() {
    for bytes in [&b""[..], b"C1ZF", b"C1ZF\0garbage", b"SQLite format 3\0"] {
        assert!(c1z::read_bytes(bytes).is_err());
    }
    let not_sqlite = [&b"C1ZF\0"[..], &zstd::encode_all(&b"hello"[..], 1).unwrap()].concat();
    assert!(c1z::read_bytes(&not_sqlite).is_err());
}

fn bin() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_bitbucket-operator"));
    for key in [
        "BATON_USERNAME",
        "BATON_APP_PASSWORD",
        "BATON_TOKEN",
        "BATON_CONSUMER_KEY",
        "BATON_CONSUMER_SECRET",
        "BATON_WORKSPACES",
        "BITBUCKET_API_URL",
        "BATON_CLIENT_ID",
        "BATON_CLIENT_SECRET",
        "BATON_C1_API_HOST",
        "BATON_C1_CA_FILE",
    ] {
        cmd.env_remove(key);
    }
    cmd
}

#[test]
fn sync_c1z_and_export_write_the_same_inventory() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("store.db");
    let synced = dir.path().join("synced.c1z");
    let exported = dir.path().join("exported.c1z");
    let out = bin()
        .args(["sync", "--demo", "--db"])
        .arg(&db)
        .arg("--c1z")
        .arg(&synced)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = bin()
        .args(["export", "--db"])
        .arg(&db)
        .arg("--c1z")
        .arg(&exported)
        .arg("--json")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let a = c1z::read(&synced).unwrap().verify().unwrap();
    let b = c1z::read(&exported).unwrap().verify().unwrap();
    assert_eq!(a, b);
    assert_eq!(report["resources"], a.resources);

    // A store without data, or a type never synced, is refused with exit 4.
    let partial = dir.path().join("partial.db");
    let out = bin()
        .args(["sync", "--demo", "--only", "accounts", "--db"])
        .arg(&partial)
        .output()
        .unwrap();
    assert!(out.status.success());
    let out = bin()
        .args(["export", "--db"])
        .arg(&partial)
        .arg("--c1z")
        .arg(dir.path().join("x.c1z"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(4));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no workspaces data"));
    assert!(!dir.path().join("x.c1z").exists());
}

// ---- service mode --------------------------------------------------------------

fn fast_timing() -> Timing {
    Timing {
        error_unit: Duration::from_millis(50),
        max_error_backoff: Duration::from_millis(400),
        hello_first_retry: Duration::from_millis(50),
        hello_max_retry: Duration::from_millis(400),
        min_poll: Duration::from_millis(20),
        max_poll: Duration::from_millis(200),
        default_heartbeat: Duration::from_millis(200),
        min_heartbeat: Duration::from_millis(50),
        rejected_retry: Duration::from_millis(1000),
    }
}

struct Harness {
    sim: SimulatorHandle,
    store: Arc<Store>,
    engine: SyncEngine,
    dir: tempfile::TempDir,
}

async fn harness(config: SimConfig, synced: bool) -> Harness {
    let sim = start_sim(config).await;
    let store = Arc::new(Store::open_in_memory().unwrap());
    let engine = engine(&sim);
    if synced {
        full_sync(&engine, &store).await;
    }
    Harness {
        sim,
        store,
        engine,
        dir: tempfile::tempdir().unwrap(),
    }
}

fn settings(h: &Harness, fake: &FakeC1, ca: bool, max_age: Duration) -> ServiceSettings {
    ServiceSettings {
        connector: CONNECTOR.into(),
        host_id: "test-host".into(),
        endpoint: C1Endpoint {
            tenant_host: "acme.conductor.one".into(),
            api_host_override: Some(fake.api_host()),
            extra_ca_pem: ca.then(|| fake.ca_pem.clone().into_bytes()),
        },
        max_snapshot_age: max_age,
        work_dir: h.dir.path().to_path_buf(),
        on_rejected: OnRejected::Retry,
        timing: fast_timing(),
    }
}

fn session(h: &Harness, fake: &FakeC1, settings: ServiceSettings, provisioning: bool) -> ServiceSession {
    let credentials = ClientCredentials::parse(&fake.client_id, &fake.client_secret).unwrap();
    let backend = Backend {
        store: Arc::clone(&h.store),
        engine: h.engine.clone(),
        provisioner: Provisioner::new(h.engine.client().clone(), provisioning)
            .with_store(Arc::clone(&h.store), CONNECTOR),
    };
    ServiceSession::new(settings, credentials, backend, None).unwrap()
}

/// Runs the session in the background; returns its status, a stop switch and the join handle.
fn spawn(
    session: ServiceSession,
) -> (
    tokio::sync::watch::Receiver<SessionStatus>,
    CancellationToken,
    tokio::task::JoinHandle<Result<(), SessionError>>,
) {
    let status = session.status();
    let stop = CancellationToken::new();
    let handle = tokio::spawn(session.run(stop.clone()));
    (status, stop, handle)
}

async fn wait_status(
    status: &mut tokio::sync::watch::Receiver<SessionStatus>,
    what: &str,
    done: impl Fn(&SessionStatus) -> bool,
) -> SessionStatus {
    let result = tokio::time::timeout(Duration::from_secs(30), status.wait_for(|s| done(s)))
        .await
        .map(|r| r.unwrap().clone());
    result.unwrap_or_else(|_| panic!("timed out waiting for {what}: {:?}", status.borrow()))
}

fn finished(fake: &FakeC1, task_id: &str) -> baton::BatonServiceFinishTaskRequest {
    fake.recorded()
        .finished
        .iter()
        .find(|f| f.task_id == task_id)
        .cloned()
        .unwrap()
}

fn error_of(f: &baton::BatonServiceFinishTaskRequest) -> (i32, String, bool) {
    use baton::baton_service_finish_task_request::FinalState;
    match &f.final_state {
        Some(FinalState::Error(e)) => {
            let status = f.status.clone().unwrap_or_default();
            (status.code, status.message, e.non_retryable)
        }
        other => panic!("expected an error, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_full_uploads_a_verified_c1z_from_fresh_data_without_bitbucket_requests() {
    let h = harness(demo_config(), true).await;
    let fake = FakeC1::start(FakeOptions::default()).await;
    let (mut status, stop, handle) = spawn(session(
        &h,
        &fake,
        settings(&h, &fake, true, Duration::from_secs(3600)),
        false,
    ));
    wait_status(&mut status, "connected", |s| s.connected).await;
    h.sim.reset_stats();
    let task = sync_full_task();
    fake.push_task(task.clone());
    fake.wait_for("the upload and finish", Duration::from_secs(30), |r| {
        r.finished.iter().any(|f| f.task_id == task.id)
    })
    .await;

    let upload = fake.recorded().uploads[0].clone();
    assert_eq!(
        (upload.task_id.as_str(), upload.host_id.as_str()),
        (task.id.as_str(), "test-host")
    );
    assert!(upload.sha256_ok, "eof carries the sha256 of the data");
    assert!(upload.max_chunk <= 512 * 1024);
    let counts = upload.c1z().verify().unwrap();
    let local = c1z::read(&{
        let p = h.dir.path().join("local.c1z");
        export(&h.store, CONNECTOR, &p).unwrap();
        p
    })
    .unwrap()
    .verify()
    .unwrap();
    assert_eq!(counts, local);
    assert!(matches!(
        finished(&fake, &task.id).final_state,
        Some(baton::baton_service_finish_task_request::FinalState::Success(_))
    ));
    assert_eq!(h.sim.stats().total, 0, "fresh data is uploaded as is");
    {
        let recorded = fake.recorded();
        assert!(recorded.heartbeats.contains(&task.id), "a heartbeat before the work");
        assert_eq!(recorded.hellos[0].host_id, "test-host");
        assert_eq!(recorded.hellos[0].task_id, "");
        assert_eq!(recorded.token_requests, 1, "the token is cached");
    }
    let s = wait_status(&mut status, "the recorded upload", |s| s.last_upload.is_some()).await;
    assert_eq!(s.last_upload.unwrap().bytes as usize, upload.bytes.len());
    assert_eq!(s.task_counts["sync_full"].succeeded, 1);
    stop.cancel();
    handle.await.unwrap().unwrap();
    assert_eq!(status.borrow().reason, ConnectionReason::Stopped);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_full_refreshes_stale_types_and_answers_hello_tasks() {
    let h = harness(demo_config(), false).await;
    let fake = FakeC1::start(FakeOptions::default()).await;
    let (mut status, stop, handle) = spawn(session(&h, &fake, settings(&h, &fake, true, Duration::ZERO), false));
    wait_status(&mut status, "connected", |s| s.connected).await;
    let hello = fake_c1::hello_task();
    let task = sync_full_task();
    fake.push_task(hello.clone());
    fake.push_task(task.clone());
    fake.wait_for("the upload", Duration::from_secs(30), |r| {
        r.finished.iter().any(|f| f.task_id == task.id)
    })
    .await;
    assert!(h.sim.stats().total > 0, "an empty store is synced first");
    let c1z = fake.recorded().uploads[0].c1z();
    c1z.verify().unwrap();
    assert_eq!(count_by_type(&c1z), truth(&h.sim.organisation()).resources_by_type);
    assert!(
        fake.recorded().hellos.iter().any(|h| h.task_id == hello.id),
        "hello task answered with its id"
    );
    assert!(
        fake.recorded().finished.iter().all(|f| f.task_id != hello.id),
        "no FinishTask for hello"
    );
    stop.cancel();
    handle.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelling_heartbeat_stops_the_sync_and_keeps_the_previous_data() {
    let mut config = demo_config();
    config.latency = Duration::from_millis(40);
    let h = harness(config, true).await;
    let before = h.store.counts(CONNECTOR, SyncKind::Repositories).unwrap();
    let fake = FakeC1::start(FakeOptions::default()).await;
    let (mut status, stop, handle) = spawn(session(&h, &fake, settings(&h, &fake, true, Duration::ZERO), false));
    wait_status(&mut status, "connected", |s| s.connected).await;
    let task = sync_full_task();
    fake.push_task(task.clone());
    // Cancel once the work has started (after the first heartbeat).
    fake.wait_for("the first heartbeat", Duration::from_secs(10), |r| {
        r.heartbeats.contains(&task.id)
    })
    .await;
    fake.cancel(&task.id);
    fake.wait_for("the finish", Duration::from_secs(20), |r| {
        r.finished.iter().any(|f| f.task_id == task.id)
    })
    .await;
    let (code, message, non_retryable) = error_of(&finished(&fake, &task.id));
    assert_eq!(code, tonic::Code::Cancelled as i32);
    assert!(message.contains("cancelled by ConductorOne"), "{message}");
    assert!(!non_retryable);
    assert!(fake.recorded().uploads.is_empty());
    let s = wait_status(&mut status, "the cancelled task", |s| s.last_task.is_some()).await;
    assert_eq!(
        s.last_task.unwrap().result,
        bitbucket_operator::conductorone::status::TaskResult::Cancelled
    );
    // The interrupted refreshes are recorded as failed; the data is whole.
    assert_eq!(h.store.counts(CONNECTOR, SyncKind::Repositories).unwrap(), before);
    for kind in SyncKind::ALL {
        let runs = h.store.runs_of_kind(CONNECTOR, kind, 10).unwrap();
        assert!(
            runs.iter()
                .all(|r| r.status != bitbucket_operator::store::RunStatus::Running),
            "{kind}: {runs:?}"
        );
    }
    stop.cancel();
    handle.await.unwrap().unwrap();
}

fn resource(t: &str, id: &str) -> pb::Resource {
    pb::Resource {
        id: Some(pb::ResourceId {
            resource_type: t.into(),
            resource: id.into(),
        }),
        ..Default::default()
    }
}

fn grant_task(t: &str, resource_id: &str, slug: &str, principal: pb::Resource) -> baton::Task {
    baton::Task {
        id: fake_c1::task_id(),
        task_type: Some(baton::task::TaskType::Grant(baton::task::GrantTask {
            entitlement: Some(pb::Entitlement {
                id: format!("{t}:{resource_id}:{slug}"),
                resource: Some(resource(t, resource_id)),
                slug: slug.into(),
                ..Default::default()
            }),
            principal: Some(principal),
            ..Default::default()
        })),
        ..Default::default()
    }
}

fn revoke_task(t: &str, resource_id: &str, slug: &str, principal: pb::Resource) -> baton::Task {
    let Some(baton::task::TaskType::Grant(g)) = grant_task(t, resource_id, slug, principal).task_type else {
        unreachable!()
    };
    baton::Task {
        id: fake_c1::task_id(),
        task_type: Some(baton::task::TaskType::Revoke(baton::task::RevokeTask {
            grant: Some(pb::Grant {
                entitlement: g.entitlement,
                principal: g.principal,
                ..Default::default()
            }),
            ..Default::default()
        })),
        ..Default::default()
    }
}

async fn run_task(fake: &FakeC1, task: &baton::Task) -> baton::BatonServiceFinishTaskRequest {
    fake.push_task(task.clone());
    fake.wait_for("the task's finish", Duration::from_secs(20), |r| {
        r.finished.iter().any(|f| f.task_id == task.id)
    })
    .await;
    finished(fake, &task.id)
}

fn repo_level(org: &Organisation, repo_uuid: &str, user: &str) -> Option<String> {
    org.workspaces
        .iter()
        .flat_map(|w| &w.repositories)
        .find(|r| r.uuid == repo_uuid)
        .and_then(|r| r.user_permissions.iter().find(|p| p.principal == user))
        .map(|p| p.permission.clone())
        .filter(|p| p != "none")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grant_and_revoke_tasks_change_bitbucket_and_refuse_what_does_not_map() {
    use baton::baton_service_finish_task_request::FinalState;
    let h = harness(demo_config(), true).await;
    let fake = FakeC1::start(FakeOptions::default()).await;
    let (mut status, stop, handle) = spawn(session(
        &h,
        &fake,
        settings(&h, &fake, true, Duration::from_secs(3600)),
        true,
    ));
    wait_status(&mut status, "connected", |s| s.connected).await;

    let org = h.sim.organisation();
    let ws = &org.workspaces[0];
    let repo = ws
        .repositories
        .iter()
        .find(|r| r.user_permissions.is_empty())
        .unwrap_or(&ws.repositories[0]);
    let project = ws.projects.iter().find(|p| p.key == repo.project_key).unwrap();
    let rid = repository_id(&ws.uuid, &project.uuid, &project.key, &repo.uuid);
    let member = ws
        .members
        .iter()
        .find(|m| !m.owner && repo_level(&org, &repo.uuid, &m.user_uuid).is_none())
        .unwrap()
        .user_uuid
        .clone();

    let done = run_task(
        &fake,
        &grant_task("repository", &rid, "write", resource("user", &member)),
    )
    .await;
    let Some(FinalState::Success(success)) = &done.final_state else {
        panic!("{done:?}")
    };
    let any = success.response.clone().unwrap();
    assert_eq!(
        any.type_url,
        "type.googleapis.com/c1.connector.v2.GrantManagerServiceGrantResponse"
    );
    let response = pb::GrantManagerServiceGrantResponse::decode(any.value.as_slice()).unwrap();
    assert_eq!(response.grants[0].id, format!("repository:{rid}:write:user:{member}"));
    assert_eq!(
        repo_level(&h.sim.organisation(), &repo.uuid, &member).as_deref(),
        Some("write")
    );
    // The store was refreshed for that repository at once.
    let held = h.store.grants_held_by(CONNECTOR, &member).unwrap();
    assert!(
        held.iter()
            .any(|g| g.grant.id == format!("repository:{rid}:write:user:{member}"))
    );

    let done = run_task(
        &fake,
        &revoke_task("repository", &rid, "write", resource("user", &member)),
    )
    .await;
    let Some(FinalState::Success(success)) = &done.final_state else {
        panic!("{done:?}")
    };
    assert_eq!(
        success.response.as_ref().unwrap().type_url,
        "type.googleapis.com/c1.connector.v2.GrantManagerServiceRevokeResponse"
    );
    assert_eq!(repo_level(&h.sim.organisation(), &repo.uuid, &member), None);

    // Group membership through the user_group member entitlement.
    let group = &ws.groups.iter().find(|g| !g.members.contains(&member)).unwrap();
    let gid = format!("{}:{}", ws.uuid, group.slug);
    let done = run_task(
        &fake,
        &grant_task("user_group", &gid, "member", resource("user", &member)),
    )
    .await;
    assert!(matches!(done.final_state, Some(FinalState::Success(_))), "{done:?}");
    let org_now = h.sim.organisation();
    let group_now = org_now.workspaces[0]
        .groups
        .iter()
        .find(|g| g.slug == group.slug)
        .unwrap();
    assert!(group_now.members.contains(&member));

    // Refusals: nothing changes in Bitbucket, each is non-retryable with a clear message.
    let before = serde_json::to_string(&h.sim.organisation()).unwrap();
    let outsider = org.users.iter().find(|u| {
        org.workspaces
            .iter()
            .all(|w| w.members.iter().all(|m| m.user_uuid != u.uuid))
    });
    let mut cases = vec![
        (
            grant_task(
                "repository",
                "{nope}:{nope}:X:{nope}",
                "write",
                resource("user", &member),
            ),
            tonic::Code::NotFound,
            "unknown entitlement",
        ),
        (
            grant_task(
                "repository",
                &rid,
                "write",
                resource("user", "{00000000-0000-0000-0000-000000000000}"),
            ),
            tonic::Code::NotFound,
            "unknown principal",
        ),
        (
            grant_task("workspace", &ws.uuid, "member", resource("user", &member)),
            tonic::Code::FailedPrecondition,
            "not provisionable",
        ),
        (
            grant_task(
                "project",
                &project_id(&ws.uuid, &project.uuid, &project.key),
                "repository",
                resource("repository", &rid),
            ),
            tonic::Code::InvalidArgument,
            "cannot be granted",
        ),
    ];
    if let Some(outsider) = outsider {
        // A non-member is in the c1z only when they kept an explicit permission:
        // then the provisioner refuses them as a non-member, else they are unknown.
        let known = !h.store.grants_held_by(CONNECTOR, &outsider.uuid).unwrap().is_empty();
        let (code, text) = if known {
            (tonic::Code::FailedPrecondition, "is not a member of workspace")
        } else {
            (tonic::Code::NotFound, "unknown principal")
        };
        cases.push((
            grant_task("repository", &rid, "read", resource("user", &outsider.uuid)),
            code,
            text,
        ));
    }
    for (task, code, text) in cases {
        let done = run_task(&fake, &task).await;
        let (got, message, non_retryable) = error_of(&done);
        assert_eq!(got, code as i32, "{message}");
        assert!(message.contains(text), "{message}");
        assert!(non_retryable);
    }
    assert_eq!(
        serde_json::to_string(&h.sim.organisation()).unwrap(),
        before,
        "nothing changed in Bitbucket"
    );
    stop.cancel();
    handle.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grants_are_refused_when_provisioning_is_disabled() {
    let h = harness(demo_config(), true).await;
    let fake = FakeC1::start(FakeOptions::default()).await;
    let (mut status, stop, handle) = spawn(session(
        &h,
        &fake,
        settings(&h, &fake, true, Duration::from_secs(3600)),
        false,
    ));
    wait_status(&mut status, "connected", |s| s.connected).await;
    let org = h.sim.organisation();
    let ws = &org.workspaces[0];
    let group = &ws.groups[0];
    let user = ws
        .members
        .iter()
        .find(|m| !group.members.contains(&m.user_uuid))
        .unwrap();
    let task = grant_task(
        "user_group",
        &format!("{}:{}", ws.uuid, group.slug),
        "member",
        resource("user", &user.user_uuid),
    );
    let (code, message, non_retryable) = error_of(&run_task(&fake, &task).await);
    assert_eq!(code, tonic::Code::FailedPrecondition as i32);
    assert!(
        message.contains("provisioning is disabled") && non_retryable,
        "{message}"
    );
    let org_now = h.sim.organisation();
    assert!(!org_now.workspaces[0].groups[0].members.contains(&user.user_uuid));
    let s = status.borrow().clone();
    assert_eq!(s.task_counts["grant"].failed, 1);
    stop.cancel();
    handle.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_credential_is_reported_and_retried_slowly() {
    let h = harness(SimConfig::default(), false).await;
    let fake = FakeC1::start(FakeOptions::default()).await;
    fake.revoke_credential();
    // The CLI policy: stop with a clear error after one token request.
    let mut cli = settings(&h, &fake, true, Duration::from_secs(3600));
    cli.on_rejected = OnRejected::Stop;
    let err = session(&h, &fake, cli, false)
        .run(CancellationToken::new())
        .await
        .unwrap_err();
    let SessionError::Rejected { reason, message } = err else {
        panic!()
    };
    assert_eq!(reason, ConnectionReason::InvalidClientCredentials);
    assert!(
        message.contains("refused the client credentials (HTTP 401)"),
        "{message}"
    );
    assert!(!message.contains(fake.client_secret.rsplit(':').next().unwrap()));
    assert_eq!(fake.recorded().token_requests, 1);

    // The operator policy: report it, retry after rejected_retry (1 s here), no tight loop.
    let (mut status, stop, handle) = spawn(session(
        &h,
        &fake,
        settings(&h, &fake, true, Duration::from_secs(3600)),
        false,
    ));
    let s = wait_status(&mut status, "the refusal", |s| {
        s.reason == ConnectionReason::InvalidClientCredentials
    })
    .await;
    assert!(!s.connected);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let requests = fake.recorded().token_requests - 1;
    assert!(
        (1..=4).contains(&requests),
        "{requests} token requests in 2.5 s: retried, slowly"
    );
    stop.cancel();
    handle.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_needs_the_custom_ca_and_is_reported_as_such() {
    let h = harness(SimConfig::default(), false).await;
    let fake = FakeC1::start(FakeOptions::default()).await;
    let (mut status, stop, handle) = spawn(session(
        &h,
        &fake,
        settings(&h, &fake, false, Duration::from_secs(3600)),
        false,
    ));
    let s = wait_status(&mut status, "a TLS error", |s| s.reason == ConnectionReason::TlsError).await;
    assert!(
        s.message.contains("TLS") || s.message.contains("certificate"),
        "{}",
        s.message
    );
    assert_eq!(
        fake.recorded().token_requests,
        0,
        "nothing was sent without a trusted handshake"
    );
    stop.cancel();
    handle.await.unwrap().unwrap();

    let (mut status, stop, handle) = spawn(session(
        &h,
        &fake,
        settings(&h, &fake, true, Duration::from_secs(3600)),
        false,
    ));
    wait_status(&mut status, "connected with the CA", |s| s.connected).await;
    stop.cancel();
    handle.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_server_is_reported_and_the_session_recovers() {
    let h = harness(demo_config(), true).await;
    let fake = FakeC1::start(FakeOptions::default()).await;
    fake.stop_listening();
    let (mut status, stop, handle) = spawn(session(
        &h,
        &fake,
        settings(&h, &fake, true, Duration::from_secs(3600)),
        false,
    ));
    let s = wait_status(&mut status, "unreachable", |s| {
        s.reason == ConnectionReason::Unreachable
    })
    .await;
    assert!(!s.connected);
    tokio::time::sleep(Duration::from_millis(500)).await;
    fake.start_listening().await;
    wait_status(&mut status, "connected again", |s| s.connected).await;
    let task = sync_full_task();
    fake.push_task(task.clone());
    fake.wait_for("the upload", Duration::from_secs(30), |r| {
        r.finished.iter().any(|f| f.task_id == task.id)
    })
    .await;
    fake.recorded().uploads[0].c1z().verify().unwrap();

    // Down again while polling: the session backs off and comes back.
    fake.stop_listening();
    wait_status(&mut status, "unreachable while polling", |s| {
        s.reason == ConnectionReason::Unreachable
    })
    .await;
    let polls = fake.recorded().get_tasks;
    fake.start_listening().await;
    wait_status(&mut status, "connected after the outage", |s| s.connected).await;
    assert!(fake.recorded().get_tasks > polls);
    stop.cancel();
    handle.await.unwrap().unwrap();
}

#[test]
fn connect_refuses_malformed_client_credentials_with_exit_7_and_no_echo() {
    let out = bin()
        .args([
            "connect",
            "--username",
            "a@b.c",
            "--app-password",
            "x",
            "--client-id",
            "nope",
        ])
        .args(["--client-secret", "secret-token:conductorone.com:v1:TOPSECRETVALUE"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(7));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("malformed ConductorOne client id"), "{stderr}");
    let out = bin()
        .args([
            "connect",
            "--username",
            "a@b.c",
            "--app-password",
            "x",
            "--client-id",
            "c@acme.conductor.one/ccc",
        ])
        .env("BATON_CLIENT_SECRET", "secret-token:conductorone.com:v1:TOPSECRETVALUE")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(7));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("client secret") && !stderr.contains("TOPSECRETVALUE"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_runs_the_loop_until_sigterm() {
    let h = harness(demo_config(), false).await;
    let fake = FakeC1::start(FakeOptions::default()).await;
    let ca = h.dir.path().join("ca.pem");
    std::fs::write(&ca, &fake.ca_pem).unwrap();
    let db = h.dir.path().join("store.db");
    let c = h.sim.credentials().clone();
    let mut child = tokio::process::Command::from({
        let mut cmd = bin();
        cmd.args([
            "connect",
            "--api-url",
            &h.sim.base_url(),
            "--connector",
            "cli",
            "--max-snapshot-age",
            "0",
        ])
        .arg("--db")
        .arg(&db)
        .env("BATON_USERNAME", &c.email)
        .env("BATON_APP_PASSWORD", &c.api_token)
        .env("BATON_CLIENT_ID", &fake.client_id)
        .env("BATON_CLIENT_SECRET", &fake.client_secret)
        .env("BATON_C1_API_HOST", fake.api_host())
        .env("BATON_C1_CA_FILE", &ca)
        .env("BATON_HOST_ID", "cli-host");
        cmd
    })
    .stderr(std::process::Stdio::piped())
    .spawn()
    .unwrap();
    let task = sync_full_task();
    fake.push_task(task.clone());
    fake.wait_for("the CLI's upload", Duration::from_secs(60), |r| {
        r.finished.iter().any(|f| f.task_id == task.id)
    })
    .await;
    assert_eq!(fake.recorded().uploads[0].host_id, "cli-host");
    fake.recorded().uploads[0].c1z().verify().unwrap();
    let pid = child.id().unwrap() as i32;
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let status = tokio::time::timeout(Duration::from_secs(20), child.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_refreshed_before_expiry_and_counted_in_metrics() {
    let h = harness(demo_config(), true).await;
    let fake = FakeC1::start(FakeOptions {
        token_lifetime: 2,
        ..FakeOptions::default()
    })
    .await;
    let mut registry = prometheus_client::registry::Registry::with_prefix("bitbucket_operator");
    let metrics = bitbucket_operator::conductorone::C1Metrics::register(&mut registry);
    let credentials = ClientCredentials::parse(&fake.client_id, &fake.client_secret).unwrap();
    let backend = Backend {
        store: Arc::clone(&h.store),
        engine: h.engine.clone(),
        provisioner: Provisioner::new(h.engine.client().clone(), false),
    };
    let session = ServiceSession::new(
        settings(&h, &fake, true, Duration::from_secs(3600)),
        credentials,
        backend,
        Some(metrics),
    )
    .unwrap();
    let (mut status, stop, handle) = spawn(session);
    wait_status(&mut status, "connected", |s| s.connected).await;
    let task = sync_full_task();
    fake.push_task(task.clone());
    fake.wait_for("the upload", Duration::from_secs(30), |r| {
        r.finished.iter().any(|f| f.task_id == task.id)
    })
    .await;
    // A 2 s token is replaced after 1 s; polling goes on with fresh tokens.
    tokio::time::sleep(Duration::from_millis(2600)).await;
    let issued = fake.recorded().token_requests;
    assert!(
        (2..=5).contains(&issued),
        "{issued} tokens in about 3 s: refreshed, not per call"
    );
    assert_eq!(fake.recorded().unauthenticated_calls, 0, "never an expired token");
    stop.cancel();
    handle.await.unwrap().unwrap();
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    assert!(
        text.contains(r#"bitbucket_operator_conductorone_tasks_total{task_type="sync_full",result="succeeded"} 1"#),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "bitbucket_operator_conductorone_token_refreshes_total {issued}"
        )),
        "{text}"
    );
    let bytes = fake.recorded().uploads[0].bytes.len();
    assert!(
        text.contains(&format!("bitbucket_operator_conductorone_upload_bytes_total {bytes}")),
        "{text}"
    );
    assert!(
        !text.contains(&fake.client_secret) && !text.contains("token-"),
        "no secrets in metrics"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_credential_revoked_while_connected_is_detected_without_a_tight_loop() {
    let h = harness(SimConfig::default(), false).await;
    let fake = FakeC1::start(FakeOptions::default()).await;
    let (mut status, stop, handle) = spawn(session(
        &h,
        &fake,
        settings(&h, &fake, true, Duration::from_secs(3600)),
        false,
    ));
    wait_status(&mut status, "connected", |s| s.connected).await;
    fake.revoke_credential();
    let s = wait_status(&mut status, "the refusal", |s| {
        s.reason == ConnectionReason::InvalidClientCredentials
    })
    .await;
    assert!(!s.connected);
    let (calls, tokens) = {
        let r = fake.recorded();
        (r.unauthenticated_calls + r.get_tasks, r.token_requests)
    };
    tokio::time::sleep(Duration::from_millis(1500)).await;
    {
        let r = fake.recorded();
        assert!(
            r.unauthenticated_calls + r.get_tasks - calls <= 3,
            "no tight polling loop"
        );
        assert!(
            r.token_requests - tokens <= 2,
            "{} token requests",
            r.token_requests - tokens
        );
    }
    stop.cancel();
    handle.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_c1z_files_never_panic_the_reader() {
    let h = harness(SimConfig::default(), true).await;
    let path = h.dir.path().join("small.c1z");
    export(&h.store, CONNECTOR, &path).unwrap();
    let good = std::fs::read(&path).unwrap();
    c1z::read_bytes(&good).unwrap().verify().unwrap();
    let mut rng = rand::rng();
    let mut rejected = 0;
    for round in 0..150 {
        let mut bad = good.clone();
        if round % 3 == 0 {
            bad.truncate(rand::Rng::random_range(&mut rng, 0..good.len()));
        } else {
            for _ in 0..1 + round % 5 {
                let i = rand::Rng::random_range(&mut rng, 0..bad.len());
                bad[i] ^= rand::Rng::random_range(&mut rng, 1..=255u8);
            }
        }
        // Either an error, or a file whose problems verify() lists: never a panic.
        match c1z::read_bytes(&bad) {
            Err(_) => rejected += 1,
            Ok(file) => {
                let _ = file.verify();
            }
        }
    }
    assert!(rejected > 0, "corruption is detected");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_during_a_sync_fails_the_task_as_cancelled_and_retryable() {
    let mut config = demo_config();
    config.latency = Duration::from_millis(40);
    let h = harness(config, true).await;
    let fake = FakeC1::start(FakeOptions::default()).await;
    let (mut status, stop, handle) = spawn(session(&h, &fake, settings(&h, &fake, true, Duration::ZERO), false));
    wait_status(&mut status, "connected", |s| s.connected).await;
    let task = sync_full_task();
    fake.push_task(task.clone());
    fake.wait_for("the first heartbeat", Duration::from_secs(10), |r| {
        r.heartbeats.contains(&task.id)
    })
    .await;
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(20), handle)
        .await
        .expect("the session stops promptly")
        .unwrap()
        .unwrap();
    let (code, message, non_retryable) = error_of(&finished(&fake, &task.id));
    assert_eq!(code, tonic::Code::Cancelled as i32);
    assert!(message.contains("shutting down") && !non_retryable, "{message}");
    assert!(fake.recorded().uploads.is_empty());
}
