//! The sync engine and the `sync` command against the simulator: what lands in
//! the store must equal the simulator's ground truth exactly.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::net::SocketAddr;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use bitbucket_operator::bitbucket::{Client, ClientConfig, Credentials, Holder, PermissionScope};
use bitbucket_operator::model::{
    PROJECT_PERMISSIONS, REPOSITORY_PERMISSIONS, ResourceType, SyncKind, entitlement_id, grant_id, group_id,
    project_id, repository_id,
};
use bitbucket_operator::simulator::{Organisation, SimConfig, Simulator, SimulatorHandle};
use bitbucket_operator::store::Store;
use bitbucket_operator::sync::{FailureClass, SyncEngine, SyncError, run_into_store, run_into_store_with_cost};

/// What the store should hold for one resource type: resource ids,
/// entitlement ids, and grant ids with their unknown-principal flag.
#[derive(Debug, Default, PartialEq, Eq)]
struct Expected {
    resources: BTreeSet<String>,
    entitlements: BTreeSet<String>,
    grants: BTreeMap<String, bool>,
}

/// The oracle: derived from the simulator's ground truth with the access
/// model's rules, independently of the syncers' code.
fn expected(org: &Organisation, kind: SyncKind) -> Expected {
    let mut out = Expected::default();
    let mut users = BTreeSet::new();
    for ws in &org.workspaces {
        let members: HashSet<&str> = ws.members.iter().map(|m| m.user_uuid.as_str()).collect();
        match kind {
            SyncKind::Accounts => users.extend(members.iter().map(|s| s.to_string())),
            SyncKind::Workspaces => {
                out.resources.insert(ws.uuid.clone());
                for slug in ["member", "owner"] {
                    out.entitlements
                        .insert(entitlement_id(ResourceType::Workspace, &ws.uuid, slug));
                }
                for m in &ws.members {
                    let member = entitlement_id(ResourceType::Workspace, &ws.uuid, "member");
                    out.grants
                        .insert(grant_id(&member, ResourceType::User, &m.user_uuid), false);
                    if m.owner {
                        let owner = entitlement_id(ResourceType::Workspace, &ws.uuid, "owner");
                        out.grants
                            .insert(grant_id(&owner, ResourceType::User, &m.user_uuid), false);
                    }
                }
            }
            SyncKind::Groups => {
                for g in &ws.groups {
                    let id = group_id(&ws.uuid, &g.slug);
                    let ent = entitlement_id(ResourceType::UserGroup, &id, "member");
                    for u in &g.members {
                        out.grants.insert(grant_id(&ent, ResourceType::User, u), false);
                    }
                    out.resources.insert(id);
                    out.entitlements.insert(ent);
                }
            }
            SyncKind::Projects => {
                for p in &ws.projects {
                    let id = project_id(&ws.uuid, &p.uuid, &p.key);
                    add_permissions(
                        &mut out,
                        ResourceType::Project,
                        &id,
                        &ws.uuid,
                        &members,
                        &p.user_permissions,
                        &p.group_permissions,
                        &PROJECT_PERMISSIONS,
                    );
                    out.resources.insert(id);
                }
            }
            SyncKind::Repositories => {
                for r in &ws.repositories {
                    let project = ws
                        .projects
                        .iter()
                        .find(|p| p.key == r.project_key)
                        .expect("repo's project exists");
                    let id = repository_id(&ws.uuid, &project.uuid, &project.key, &r.uuid);
                    add_permissions(
                        &mut out,
                        ResourceType::Repository,
                        &id,
                        &ws.uuid,
                        &members,
                        &r.user_permissions,
                        &r.group_permissions,
                        &REPOSITORY_PERMISSIONS,
                    );
                    out.resources.insert(id);
                }
            }
        }
    }
    if kind == SyncKind::Accounts {
        out.resources = users;
    }
    out
}

#[allow(clippy::too_many_arguments)]
fn add_permissions(
    out: &mut Expected,
    rt: ResourceType,
    id: &str,
    ws_uuid: &str,
    members: &HashSet<&str>,
    users: &[bitbucket_operator::simulator::Permission],
    groups: &[bitbucket_operator::simulator::Permission],
    levels: &[&str],
) {
    for level in levels {
        out.entitlements.insert(entitlement_id(rt, id, level));
    }
    for p in users.iter().filter(|p| p.permission != "none") {
        let ent = entitlement_id(rt, id, &p.permission);
        out.grants.insert(
            grant_id(&ent, ResourceType::User, &p.principal),
            !members.contains(p.principal.as_str()),
        );
    }
    for p in groups.iter().filter(|p| p.permission != "none") {
        let ent = entitlement_id(rt, id, &p.permission);
        out.grants.insert(
            grant_id(&ent, ResourceType::UserGroup, &group_id(ws_uuid, &p.principal)),
            false,
        );
    }
}

fn actual(store: &Store, connector: &str, kind: SyncKind) -> Expected {
    let batch = store.batch(connector, kind).unwrap();
    Expected {
        resources: batch.resources.iter().map(|r| r.id.clone()).collect(),
        entitlements: batch.entitlements.iter().map(|e| e.id.clone()).collect(),
        grants: batch
            .grants
            .iter()
            .map(|g| (g.id.clone(), g.unknown_principal))
            .collect(),
    }
}

async fn start(config: SimConfig) -> SimulatorHandle {
    Simulator::start(config, SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .unwrap()
}

fn engine(sim: &SimulatorHandle, max_retries: u32) -> SyncEngine {
    let mut config = ClientConfig::new(&sim.base_url()).unwrap();
    // Every simulator has the same admin, so tests share one hourly budget.
    config.limits.max_requests = 1_000_000;
    config.max_retries = max_retries;
    config.backoff_base = Duration::from_millis(5);
    config.backoff_max = Duration::from_millis(50);
    config.limits.max_in_flight = 8;
    let creds = sim.credentials();
    let credentials = Credentials::ApiToken {
        username: creds.email.clone(),
        token: creds.api_token.clone(),
    };
    SyncEngine::new(Client::new(config, credentials).unwrap(), Vec::new())
}

async fn full_sync(engine: &SyncEngine, store: &Arc<Store>, connector: &str) {
    let scope = engine.connect().await.unwrap();
    for kind in SyncKind::ALL {
        run_into_store(engine, store, connector, kind, &scope).await.unwrap();
    }
}

#[tokio::test]
async fn synced_inventory_equals_ground_truth_for_several_shapes() {
    let shapes = [
        SimConfig {
            seed: 1,
            ..SimConfig::default()
        },
        SimConfig {
            seed: 2,
            workspaces: 1,
            users: 5,
            groups: 1,
            projects: 1,
            repositories: 2,
            ..SimConfig::default()
        },
        SimConfig {
            seed: 3,
            workspaces: 3,
            users: 260,
            groups: 15,
            projects: 12,
            repositories: 140,
            ..SimConfig::default()
        },
        // Faults on a third of the requests: retries must hide them.
        SimConfig {
            seed: 4,
            workspaces: 2,
            users: 120,
            groups: 6,
            projects: 5,
            repositories: 40,
            fail_rate: 0.3,
            ..SimConfig::default()
        },
    ];
    for shape in shapes {
        let label = format!("{shape:?}");
        let sim = start(shape).await;
        let store = Arc::new(Store::open_in_memory().unwrap());
        let engine = engine(&sim, 10);
        full_sync(&engine, &store, "c").await;
        let org = sim.organisation();
        let mut saw_unknown = false;
        for kind in SyncKind::ALL {
            let want = expected(&org, kind);
            let got = actual(&store, "c", kind);
            assert_eq!(got.resources, want.resources, "{kind} resources, {label}");
            assert_eq!(got.entitlements, want.entitlements, "{kind} entitlements, {label}");
            assert_eq!(got.grants, want.grants, "{kind} grants, {label}");
            saw_unknown |= got.grants.values().any(|&unknown| unknown);
        }
        if org.users.len() > 100 {
            assert!(
                saw_unknown,
                "large shapes include grants to non-members, flagged: {label}"
            );
        }
        sim.shutdown().await;
    }
}

#[tokio::test]
async fn user_profiles_carry_what_access_reviews_show() {
    let sim = start(SimConfig::default()).await;
    let store = Arc::new(Store::open_in_memory().unwrap());
    let engine = engine(&sim, 2);
    full_sync(&engine, &store, "c").await;
    let org = sim.organisation();
    let users = store.resources("c", Some(ResourceType::User)).unwrap();
    let inactive = users
        .iter()
        .filter(|u| u.profile.user().unwrap().status == "inactive")
        .count();
    for user in &users {
        let truth = org.users.iter().find(|u| u.uuid == user.id).unwrap();
        let profile = user.profile.user().expect("a user profile");
        assert_eq!(user.display_name, truth.display_name);
        assert_eq!(profile.nickname.as_deref(), Some(truth.nickname.as_str()));
        assert_eq!(profile.account_id.as_deref(), Some(truth.account_id.as_str()));
        assert_eq!(profile.status == "active", truth.active);
    }
    let truth_inactive = org
        .users
        .iter()
        .filter(|u| !u.active && users.iter().any(|r| r.id == u.uuid))
        .count();
    assert_eq!(inactive, truth_inactive);
    let repos = store.resources("c", Some(ResourceType::Repository)).unwrap();
    for repo in repos {
        let profile = repo.profile.repository().expect("a repository profile");
        let full_name = &profile.full_name;
        assert!(full_name.contains('/'), "{full_name}");
        // A workspace owner's `access-of` reads the name from this column.
        assert_eq!(&repo.display_name, full_name);
        let project = profile.project_id.as_str();
        assert!(
            store.resource("c", project).unwrap().is_some(),
            "repository's project {project} is stored"
        );
    }
    sim.shutdown().await;
}

#[tokio::test]
async fn each_syncer_alone_updates_only_its_type() {
    let sim = start(SimConfig::default()).await;
    let store = Arc::new(Store::open_in_memory().unwrap());
    let engine = engine(&sim, 2);
    full_sync(&engine, &store, "c").await;
    let before: BTreeMap<SyncKind, Option<i64>> = SyncKind::ALL
        .iter()
        .map(|&k| (k, store.current_generation("c", k).unwrap()))
        .collect();
    let scope = engine.discover().await.unwrap();
    for kind in SyncKind::ALL {
        let report = run_into_store(&engine, &store, "c", kind, &scope).await.unwrap();
        for other in SyncKind::ALL {
            let generation = store.current_generation("c", other).unwrap();
            if other == kind {
                assert_eq!(generation, Some(report.generation));
                assert_ne!(generation, before[&other], "{kind} wrote a new generation");
            } else if other > kind {
                assert_eq!(generation, before[&other], "syncing {kind} left {other} alone");
            }
        }
    }
    sim.shutdown().await;
}

#[tokio::test]
async fn a_failed_run_keeps_the_previous_generation_whole() {
    let sim = start(SimConfig {
        repositories: 60,
        ..SimConfig::default()
    })
    .await;
    let store = Arc::new(Store::open_in_memory().unwrap());
    let engine = engine(&sim, 1);
    full_sync(&engine, &store, "c").await;
    let good = store.batch("c", SyncKind::Repositories).unwrap();
    let generation = store.current_generation("c", SyncKind::Repositories).unwrap();

    // Change Bitbucket, then fail mid-run: the new data must not leak in.
    let client = engine.client().clone();
    let ws = &sim.organisation().workspaces[0];
    let member = ws.members.iter().find(|m| !m.owner).unwrap().user_uuid.clone();
    let repository = PermissionScope::Repository {
        workspace: &ws.slug,
        slug: &ws.repositories[0].slug,
    };
    client
        .set_explicit_permission(repository, Holder::User(&member), "admin")
        .await
        .unwrap();
    let scope = engine.discover().await.unwrap();
    sim.set_fail_rate(0.5);
    let err = run_into_store(&engine, &store, "c", SyncKind::Repositories, &scope)
        .await
        .unwrap_err();
    assert!(matches!(err, SyncError::Unavailable(_)), "{err}");
    assert_eq!(err.class(), FailureClass::Unavailable);
    assert_eq!(
        store.current_generation("c", SyncKind::Repositories).unwrap(),
        generation
    );
    assert_eq!(
        store.batch("c", SyncKind::Repositories).unwrap(),
        good,
        "last good data intact"
    );
    let last = &store.runs("c", 1).unwrap()[0];
    assert_eq!(last.kind, SyncKind::Repositories);
    assert!(
        last.error.as_deref().unwrap_or_default().contains("unavailable"),
        "{last:?}"
    );

    // Recovery: the next good run switches to the new data, and the diff shows the change.
    sim.set_fail_rate(0.0);
    let report = run_into_store(&engine, &store, "c", SyncKind::Repositories, &scope)
        .await
        .unwrap();
    let diff = store
        .diff_grants("c", SyncKind::Repositories, generation.unwrap(), report.generation)
        .unwrap();
    assert!(
        diff.added
            .iter()
            .any(|g| g.principal_id == member && g.entitlement_id.ends_with(":admin")),
        "{diff:?}"
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn configured_workspaces_limit_the_scope_and_unknown_ones_fail() {
    let sim = start(SimConfig {
        workspaces: 3,
        ..SimConfig::default()
    })
    .await;
    let org = sim.organisation();
    let mut config = ClientConfig::new(&sim.base_url()).unwrap();
    // Every simulator has the same admin, so tests share one hourly budget.
    config.limits.max_requests = 1_000_000;
    config.max_retries = 0;
    let c = sim.credentials();
    let creds = Credentials::ApiToken {
        username: c.email.clone(),
        token: c.api_token.clone(),
    };
    let client = Client::new(config, creds).unwrap();

    let one = SyncEngine::new(client.clone(), vec![org.workspaces[1].slug.clone()]);
    let scope = one.connect().await.unwrap();
    assert_eq!(scope.workspaces.len(), 1);
    assert_eq!(scope.workspaces[0].uuid, org.workspaces[1].uuid);

    let missing = SyncEngine::new(client, vec!["no-such-ws".into()]);
    let err = missing.connect().await.unwrap_err();
    assert!(
        matches!(err, SyncError::WorkspaceNotFound { ref slug } if slug == "no-such-ws"),
        "{err}"
    );
    sim.shutdown().await;
}

// ---- the `sync` command ------------------------------------------------------

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
    ] {
        cmd.env_remove(key);
    }
    cmd
}

#[test]
fn demo_syncs_the_simulator_into_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("demo.db");
    let out = bin()
        .args(["sync", "--demo", "--json", "--db"])
        .arg(&db)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).expect("--json prints one JSON object");
    assert_eq!(summary["ok"], true);
    let kinds = summary["resource_types"].as_array().unwrap();
    assert_eq!(kinds.len(), 5);
    for kind in kinds {
        assert_eq!(kind["ok"], true, "{kind}");
        assert!(kind["resources"].as_u64().unwrap() > 0, "{kind}");
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    for kind in SyncKind::ALL {
        assert!(
            stderr.contains(&format!("{:<13} done", kind.as_str())),
            "progress line for {kind}: {stderr}"
        );
    }
    let store = Store::open(&db).unwrap();
    let total: u64 = SyncKind::ALL
        .iter()
        .map(|&k| store.counts("default", k).unwrap().resources)
        .sum();
    assert_eq!(
        total,
        kinds.iter().map(|k| k["resources"].as_u64().unwrap()).sum::<u64>()
    );

    // The human summary is a table with one row per type.
    let out = bin().args(["sync", "--demo", "--db"]).arg(&db).output().unwrap();
    assert!(out.status.success());
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("RESOURCES") && table.contains("repositories") && table.contains("total"),
        "{table}"
    );
}

fn run_sim_in_thread(config: SimConfig) -> (tokio::runtime::Runtime, SimulatorHandle) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let sim = rt.block_on(start(config));
    (rt, sim)
}

#[test]
fn secret_file_in_the_seed_format_works() {
    let (_rt, sim) = run_sim_in_thread(SimConfig::default());
    let dir = tempfile::tempdir().unwrap();
    let c = sim.credentials();
    let ws = sim.organisation().workspaces[0].slug.clone();
    let secret = format!(
        "apiVersion: v1\nkind: Secret\nmetadata:\n  name: baton-bitbucket\ntype: Opaque\nstringData:\n  BATON_USERNAME: {}\n  BATON_APP_PASSWORD: {}\n  BATON_WORKSPACES: {ws}\n  BATON_PROVISIONING: \"true\"\n",
        c.email, c.api_token
    );
    let secret_path = dir.path().join("secret.yaml");
    std::fs::write(&secret_path, secret).unwrap();
    let db = dir.path().join("s.db");
    let out = bin()
        .args(["sync", "--json", "--api-url", &sim.base_url(), "--secret-file"])
        .arg(&secret_path)
        .arg("--db")
        .arg(&db)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        summary["workspaces"],
        serde_json::json!([ws]),
        "BATON_WORKSPACES applied"
    );
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains(&c.api_token),
        "the token is never printed"
    );
}

#[test]
fn bad_credentials_exit_3_with_the_email_hint() {
    let (_rt, sim) = run_sim_in_thread(SimConfig::default());
    let dir = tempfile::tempdir().unwrap();
    let out = bin()
        .args(["sync", "--api-url", &sim.base_url(), "--db"])
        .arg(dir.path().join("x.db"))
        .env("BATON_USERNAME", "jdoe")
        .env("BATON_APP_PASSWORD", "definitely-wrong")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let line = stderr
        .lines()
        .find(|l| l.starts_with("error:"))
        .expect("a one-line reason");
    assert!(line.contains("401") && line.contains("email"), "{line}");
    assert!(!stderr.contains("definitely-wrong"));
    assert!(!dir.path().join("x.db").exists(), "nothing written on a failed connect");
}

#[test]
fn unknown_workspace_exits_4_and_unreachable_api_exits_5() {
    let (_rt, sim) = run_sim_in_thread(SimConfig::default());
    let c = sim.credentials().clone();
    let dir = tempfile::tempdir().unwrap();
    let out = bin()
        .args(["sync", "--api-url", &sim.base_url(), "--workspaces", "nope", "--db"])
        .arg(dir.path().join("x.db"))
        .env("BATON_USERNAME", &c.email)
        .env("BATON_APP_PASSWORD", &c.api_token)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(4), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("workspace \"nope\" not found"));

    // Nothing listens on port 9 of loopback.
    let out = bin()
        .args(["sync", "--api-url", "http://127.0.0.1:9", "--db"])
        .arg(dir.path().join("y.db"))
        .env("BATON_USERNAME", &c.email)
        .env("BATON_APP_PASSWORD", &c.api_token)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(5), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn missing_credentials_exit_3_naming_the_keys() {
    let out = bin()
        .args(["sync", "--api-url", "http://127.0.0.1:9"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains("BATON_USERNAME"));
}

#[test]
fn access_changes_lists_grants_added_and_removed_between_syncs() {
    let (rt, sim) = run_sim_in_thread(SimConfig::default());
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("c.db");
    let c = sim.credentials().clone();
    let sync = || {
        let out = bin()
            .args(["sync", "--api-url", &sim.base_url(), "--only", "repositories", "--db"])
            .arg(&db)
            .env("BATON_USERNAME", &c.email)
            .env("BATON_APP_PASSWORD", &c.api_token)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    };
    sync();
    // Someone grants admin on a repository in Bitbucket between two syncs.
    let org = sim.organisation();
    let ws = &org.workspaces[0];
    let member = ws.members.iter().find(|m| !m.owner).unwrap().user_uuid.clone();
    let client = Client::new(
        ClientConfig::new(&sim.base_url()).unwrap(),
        Credentials::ApiToken {
            username: c.email.clone(),
            token: c.api_token.clone(),
        },
    )
    .unwrap();
    let repository = PermissionScope::Repository {
        workspace: &ws.slug,
        slug: &ws.repositories[0].slug,
    };
    rt.block_on(client.set_explicit_permission(repository, Holder::User(&member), "admin"))
        .unwrap();
    sync();

    let out = bin()
        .args(["access", "--json", "--db"])
        .arg(&db)
        .args(["changes", "--type", "repositories"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let change = &doc["changes"][0];
    assert_eq!(change["type"], "repositories");
    let added = change["added"].as_array().unwrap();
    assert!(
        added
            .iter()
            .any(|g| g["principal_id"] == member.as_str() && g["entitlement_id"].as_str().unwrap().ends_with(":admin")),
        "{doc}"
    );
    let table = bin().args(["access", "--db"]).arg(&db).arg("changes").output().unwrap();
    assert!(
        String::from_utf8_lossy(&table.stdout).contains("repositories (generation"),
        "human output names the type"
    );
}

// ---- issue 14: outages, resumable runs, scoped generations, CLI hygiene -----

mod proxy {
    //! A test proxy in front of the simulator that can play an outage: while
    //! it is on, every request gets a 503 without reaching the simulator.
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

    use axum::body::Body;
    use axum::extract::Request;
    use axum::response::{IntoResponse, Response};

    #[derive(Clone)]
    pub struct Proxy {
        pub url: String,
        target: String,
        outage: Arc<AtomicBool>,
        pub forwarded: Arc<AtomicU64>,
        pub refused: Arc<AtomicU64>,
    }

    impl Proxy {
        pub async fn start(target: String) -> Proxy {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let url = format!("http://{}", listener.local_addr().unwrap());
            let proxy = Proxy {
                url,
                target,
                outage: Arc::new(AtomicBool::new(false)),
                forwarded: Arc::new(AtomicU64::new(0)),
                refused: Arc::new(AtomicU64::new(0)),
            };
            let client = reqwest::Client::new();
            let state = proxy.clone();
            let app = axum::Router::new().fallback(move |req: Request| {
                let (state, client) = (state.clone(), client.clone());
                async move { state.forward(&client, req).await }
            });
            tokio::spawn(async move { axum::serve(listener, app).await });
            proxy
        }

        pub fn outage(&self, on: bool) {
            self.outage.store(on, Ordering::SeqCst);
        }

        pub fn attempts(&self) -> u64 {
            self.forwarded.load(Ordering::SeqCst) + self.refused.load(Ordering::SeqCst)
        }

        async fn forward(&self, client: &reqwest::Client, req: Request) -> Response {
            if self.outage.load(Ordering::SeqCst) {
                self.refused.fetch_add(1, Ordering::SeqCst);
                return (axum::http::StatusCode::SERVICE_UNAVAILABLE, "outage").into_response();
            }
            self.forwarded.fetch_add(1, Ordering::SeqCst);
            let path = req
                .uri()
                .path_and_query()
                .map(|p| p.as_str().to_owned())
                .unwrap_or_default();
            let mut out = client.request(req.method().clone(), format!("{}{path}", self.target));
            for (name, value) in req.headers() {
                if name != axum::http::header::HOST {
                    out = out.header(name, value);
                }
            }
            let body = axum::body::to_bytes(req.into_body(), usize::MAX).await.unwrap();
            let answer = out.body(body).send().await.unwrap();
            let mut response = Response::builder().status(answer.status().as_u16());
            for (name, value) in answer.headers() {
                if name != axum::http::header::CONTENT_LENGTH {
                    response = response.header(name, value);
                }
            }
            // Links point at the simulator: point them at the proxy.
            let text = answer.text().await.unwrap().replace(&self.target, &self.url);
            response.body(Body::from(text)).unwrap()
        }
    }
}

fn engine_via(url: &str, sim: &SimulatorHandle, tolerance: Duration) -> SyncEngine {
    let mut config = ClientConfig::new(url).unwrap();
    config.outage_tolerance = Some(tolerance);
    config.backoff_base = Duration::from_millis(20);
    config.backoff_max = Duration::from_millis(500);
    config.limits.max_in_flight = 4;
    // Tests share the simulator admin's credential, hence its hourly budget.
    config.limits.max_requests = 1_000_000;
    let c = sim.credentials();
    let credentials = Credentials::ApiToken {
        username: c.email.clone(),
        token: c.api_token.clone(),
    };
    SyncEngine::new(Client::new(config, credentials).unwrap(), Vec::new())
}

async fn wait_for_units(engine: &SyncEngine, kind: SyncKind, units: u64) {
    for _ in 0..3000 {
        if engine.progress().of(kind).is_some_and(|p| p.done >= units) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{kind} never reached {units} units");
}

fn slow_org() -> SimConfig {
    SimConfig {
        seed: 14,
        workspaces: 2,
        users: 60,
        groups: 4,
        projects: 4,
        repositories: 120,
        latency: Duration::from_millis(15),
        ..SimConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_20_second_outage_mid_run_is_ridden_out_and_every_attempt_counted() {
    let sim = start(slow_org()).await;
    let proxy = proxy::Proxy::start(sim.base_url()).await;
    let engine = engine_via(&proxy.url, &sim, Duration::from_secs(120));
    let store = Arc::new(Store::open_in_memory().unwrap());
    let scope = engine.connect().await.unwrap();
    let before = proxy.attempts();
    let run = {
        let (engine, store, scope) = (engine.clone(), Arc::clone(&store), scope.clone());
        tokio::spawn(
            async move { run_into_store_with_cost(&engine, &store, "c", SyncKind::Repositories, &scope).await },
        )
    };
    wait_for_units(&engine, SyncKind::Repositories, 30).await;
    proxy.outage(true);
    tokio::time::sleep(Duration::from_secs(20)).await;
    proxy.outage(false);
    let outcome = run.await.unwrap();
    let report = outcome.result.expect("the run outlasts a 20 s outage");
    assert!(
        proxy.refused.load(std::sync::atomic::Ordering::SeqCst) > 0,
        "the outage was hit"
    );
    assert_eq!(
        report.requests,
        proxy.attempts() - before,
        "every attempt counted, failures included"
    );
    assert_eq!(
        actual(&store, "c", SyncKind::Repositories),
        expected(&sim.organisation(), SyncKind::Repositories)
    );
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_beyond_the_tolerance_fails_with_its_requests_and_the_next_run_resumes() {
    let sim = start(slow_org()).await;
    // A clean run's cost, for comparison.
    let clean = {
        let engine = engine(&sim, 2);
        let store = Arc::new(Store::open_in_memory().unwrap());
        let scope = engine.connect().await.unwrap();
        run_into_store(&engine, &store, "c", SyncKind::Repositories, &scope)
            .await
            .unwrap()
            .requests
    };
    let proxy = proxy::Proxy::start(sim.base_url()).await;
    let engine = engine_via(&proxy.url, &sim, Duration::from_secs(2));
    let store = Arc::new(Store::open_in_memory().unwrap());
    let scope = engine.connect().await.unwrap();
    let before = proxy.attempts();
    let run = {
        let (engine, store, scope) = (engine.clone(), Arc::clone(&store), scope.clone());
        tokio::spawn(
            async move { run_into_store_with_cost(&engine, &store, "c", SyncKind::Repositories, &scope).await },
        )
    };
    wait_for_units(&engine, SyncKind::Repositories, 40).await;
    proxy.outage(true);
    let failed = run.await.unwrap();
    let err = failed.result.unwrap_err();
    assert_eq!(err.class(), FailureClass::Unavailable, "{err}");
    assert_eq!(
        failed.requests,
        proxy.attempts() - before,
        "a failed run reports its requests"
    );
    let recorded = &store.runs("c", 1).unwrap()[0];
    assert_eq!(
        (recorded.status.as_str(), recorded.requests),
        ("failed", failed.requests)
    );
    let forwarded_first = proxy.forwarded.load(std::sync::atomic::Ordering::SeqCst);

    proxy.outage(false);
    let report = run_into_store(&engine, &store, "c", SyncKind::Repositories, &scope)
        .await
        .unwrap();
    assert_eq!(report.resumed_from, Some(recorded.id));
    assert!(report.resumed_units >= 40, "{report:?}");
    assert_eq!(
        actual(&store, "c", SyncKind::Repositories),
        expected(&sim.organisation(), SyncKind::Repositories)
    );
    // What reached Bitbucket over both runs stays close to one clean run.
    let served = proxy.forwarded.load(std::sync::atomic::Ordering::SeqCst) - before;
    assert!(forwarded_first > before);
    assert!(
        (served as f64) <= clean as f64 * 1.05 + 8.0,
        "resumed runs asked {served} times, a clean run {clean}"
    );
    let runs = store.runs("c", 2).unwrap();
    assert_eq!(runs[0].resumed_from, Some(runs[1].id));
    assert!(
        runs[0].data_from <= runs[1].started_at + 1,
        "the data's age is the resumed run's start"
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn a_run_over_some_workspaces_keeps_the_others_and_reports_no_removals() {
    let sim = start(SimConfig {
        workspaces: 2,
        ..SimConfig::default()
    })
    .await;
    let store = Arc::new(Store::open_in_memory().unwrap());
    let all = engine(&sim, 2);
    full_sync(&all, &store, "c").await;
    let org = sim.organisation();
    let first = org.workspaces[0].slug.clone();
    let mut config = ClientConfig::new(&sim.base_url()).unwrap();
    // Every simulator has the same admin, so tests share one hourly budget.
    config.limits.max_requests = 1_000_000;
    config.max_retries = 2;
    let c = sim.credentials();
    let creds = Credentials::ApiToken {
        username: c.email.clone(),
        token: c.api_token.clone(),
    };
    let one = SyncEngine::new(Client::new(config, creds).unwrap(), vec![first]).replacing_only_scope(true);
    let scope = one.connect().await.unwrap();
    for kind in SyncKind::ALL {
        let before = store.current_generation("c", kind).unwrap().unwrap();
        let report = run_into_store(&one, &store, "c", kind, &scope).await.unwrap();
        let diff = store.diff_grants("c", kind, before, report.generation).unwrap();
        assert!(diff.removed.is_empty() && diff.added.is_empty(), "{kind}: {diff:?}");
        assert_eq!(
            actual(&store, "c", kind),
            expected(&org, kind),
            "{kind}: both workspaces still there"
        );
    }
    sim.shutdown().await;
}

#[test]
fn conflicting_or_out_of_range_flags_are_usage_errors_naming_both() {
    let cases: &[(&[&str], &[&str])] = &[
        (
            &["--secret-file", "s.yaml", "--username", "a@b.c"],
            &["--secret-file", "--username"],
        ),
        (&["--demo", "--api-url", "http://127.0.0.1:9"], &["--demo", "--api-url"]),
        (&["--token", "t", "--username", "a@b.c"], &["--token", "--username"]),
        (&["--max-in-flight", "0"], &["--max-in-flight"]),
        (&["--connector", ""], &["--connector"]),
        (&["--api-url", "not-a-url"], &["--api-url"]),
        (&["--outage-tolerance", "soon"], &["--outage-tolerance"]),
        (&["--requests-per-hour", "0"], &["--requests-per-hour"]),
    ];
    for (args, named) in cases {
        let out = bin().arg("sync").args(*args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        for flag in *named {
            assert!(err.contains(flag), "{args:?} should name {flag}: {err}");
        }
    }
    let out = bin().args(["access", "--connector", "", "runs"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn a_stray_env_credential_does_not_spoil_an_explicit_token() {
    let (_rt, sim) = run_sim_in_thread(SimConfig::default());
    let dir = tempfile::tempdir().unwrap();
    let out = bin()
        .args(["sync", "--api-url", &sim.base_url(), "--only", "groups", "--token"])
        .arg(&sim.credentials().access_token)
        .arg("--db")
        .arg(dir.path().join("t.db"))
        .env("BATON_USERNAME", "someone@example.com")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !err.contains("BATON_APP_PASSWORD") && !err.contains("BATON_USERNAME"),
        "the env username was used: {err}"
    );
    assert!(sim.stats().total > 0, "the token was tried against Bitbucket: {err}");
}

#[test]
fn a_damaged_store_is_refused_before_syncing_with_exit_7() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("d.db");
    let out = bin().args(["sync", "--demo", "--db"]).arg(&db).output().unwrap();
    assert!(out.status.success());
    let mut bytes = std::fs::read(&db).unwrap();
    let page = 4096 * 3;
    assert!(bytes.len() > page + 4096);
    bytes[page..page + 4096].fill(0xff);
    std::fs::write(&db, bytes).unwrap();
    let out = bin().args(["sync", "--demo", "--db"]).arg(&db).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(7), "{err}");
    assert!(err.contains("damaged") && err.contains("d.db"), "{err}");
    assert_eq!(err.lines().filter(|l| l.starts_with("error:")).count(), 1, "{err}");
}

#[test]
fn progress_lines_without_a_terminal_have_counts_eta_and_no_colour() {
    let (_rt, sim) = run_sim_in_thread(SimConfig {
        latency: Duration::from_millis(20),
        repositories: 150,
        ..SimConfig::default()
    });
    let c = sim.credentials().clone();
    let dir = tempfile::tempdir().unwrap();
    let out = bin()
        .args([
            "sync",
            "--api-url",
            &sim.base_url(),
            "--only",
            "repositories",
            "--max-in-flight",
            "2",
        ])
        .args(["--progress-every", "1", "--db"])
        .arg(dir.path().join("p.db"))
        .env("BATON_USERNAME", &c.email)
        .env("BATON_APP_PASSWORD", &c.api_token)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let err = String::from_utf8_lossy(&out.stderr);
    let line = err
        .lines()
        .find(|l| l.starts_with("repositories ") && l.contains('/') && l.contains("elapsed"))
        .unwrap_or_else(|| panic!("a periodic progress line: {err}"));
    assert!(line.contains("ETA"), "{line}");
    assert!(!err.contains('\u{1b}'), "no escape codes when stderr is not a terminal");
}

#[test]
fn a_sync_killed_mid_run_resumes_to_the_same_data_for_about_the_same_requests() {
    let (_rt, sim) = run_sim_in_thread(SimConfig {
        seed: 9,
        workspaces: 2,
        users: 80,
        groups: 4,
        projects: 6,
        repositories: 300,
        latency: Duration::from_millis(20),
        ..SimConfig::default()
    });
    let c = sim.credentials().clone();
    let dir = tempfile::tempdir().unwrap();
    let sync = |db: &std::path::Path| {
        let mut cmd = bin();
        cmd.args([
            "sync",
            "--api-url",
            &sim.base_url(),
            "--only",
            "repositories",
            "--max-in-flight",
            "4",
            "--db",
        ])
        .arg(db)
        .env("BATON_USERNAME", &c.email)
        .env("BATON_APP_PASSWORD", &c.api_token)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
        cmd
    };
    let clean_db = dir.path().join("clean.db");
    sim.reset_stats();
    assert!(sync(&clean_db).status().unwrap().success());
    let clean = sim.stats().total;

    let db = dir.path().join("killed.db");
    sim.reset_stats();
    let mut child = sync(&db).spawn().unwrap();
    // Kill it once a third of the clean run's requests are spent.
    while sim.stats().total < clean / 3 {
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(400)); // let a checkpoint land
    unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
    child.wait().unwrap();
    assert!(sync(&db).status().unwrap().success());
    let total = sim.stats().total;
    assert!(
        (total as f64) <= clean as f64 * 1.05,
        "killed + resumed runs: {total} requests, a clean run {clean}"
    );
    let resumed = Store::open_read_only(&db).unwrap();
    let runs = resumed.runs("default", 2).unwrap();
    assert_eq!(runs[1].status.as_str(), "interrupted", "{runs:?}");
    assert_eq!(runs[0].resumed_from, Some(runs[1].id));
    assert!(
        runs[1].requests > 0,
        "the killed run's requests were recorded as it went"
    );
    let clean_store = Store::open_read_only(&clean_db).unwrap();
    assert_eq!(
        resumed.batch("default", SyncKind::Repositories).unwrap(),
        clean_store.batch("default", SyncKind::Repositories).unwrap()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outages_beyond_the_tolerance_at_several_points_of_a_run_resume_to_the_same_data() {
    let sim = start(slow_org()).await;
    let proxy = proxy::Proxy::start(sim.base_url()).await;
    // Right at the start (the listing), mid-way, and late in the 120 repositories.
    for units in [0, 60, 90] {
        let engine = engine_via(&proxy.url, &sim, Duration::from_secs(2));
        let store = Arc::new(Store::open_in_memory().unwrap());
        let scope = engine.connect().await.unwrap();
        let run = {
            let (engine, store, scope) = (engine.clone(), Arc::clone(&store), scope.clone());
            tokio::spawn(
                async move { run_into_store_with_cost(&engine, &store, "c", SyncKind::Repositories, &scope).await },
            )
        };
        wait_for_units(&engine, SyncKind::Repositories, units).await;
        proxy.outage(true);
        let failed = run.await.unwrap();
        proxy.outage(false);
        let err = failed
            .result
            .expect_err("an outage longer than the tolerance fails the run");
        assert_eq!(err.class(), FailureClass::Unavailable, "at {units} units: {err}");
        let report = run_into_store(&engine, &store, "c", SyncKind::Repositories, &scope)
            .await
            .unwrap();
        if units > 0 {
            assert_eq!(
                report.resumed_from,
                Some(store.runs("c", 2).unwrap()[1].id),
                "at {units} units"
            );
            assert!(report.resumed_units >= units, "at {units} units: {report:?}");
        }
        assert_eq!(
            actual(&store, "c", SyncKind::Repositories),
            expected(&sim.organisation(), SyncKind::Repositories),
            "at {units} units"
        );
    }
    sim.shutdown().await;
}
