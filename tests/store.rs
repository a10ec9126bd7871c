//! The store (generations, history, isolation, concurrency, files), effective
//! access, and the `access` CLI, on an organisation built here.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bitbucket_operator::access::{self, AccessError, Permission};
use bitbucket_operator::model::{
    Entitlement, Grant, GroupProfile, Profile, ProjectProfile, RepositoryProfile, Resource, ResourceType, SyncBatch,
    SyncKind, UserProfile, WorkspaceProfile, group_id, project_id, repository_id,
};
use bitbucket_operator::store::{RunOptions, RunStatus, Store, StoreError};

const WS: &str = "{ws-acme}";

fn user(uuid: &str, nickname: &str, name: &str, status: &str) -> Resource {
    Resource {
        resource_type: ResourceType::User,
        id: uuid.into(),
        display_name: name.into(),
        parent_id: None,
        profile: Profile::User(UserProfile {
            nickname: Some(nickname.into()),
            account_id: Some(format!("acc-{nickname}")),
            status: status.into(),
            email: Some(format!("{nickname}@acme.example")),
            workspaces: vec![WS.into()],
        }),
    }
}

fn ent(t: ResourceType, rid: &str, slug: &str) -> Entitlement {
    Entitlement::new(t, rid, slug, format!("{t} {slug}"))
}

fn grant(e: &Entitlement, t: ResourceType, pid: &str) -> Grant {
    Grant::new(e, t, pid)
}

/// All five batches of a small organisation `acme`.
///
/// - alice: workspace owner
/// - bob: direct read on api, member of devs (devs: write on api)
/// - carol: member of devs, admin on project API
/// - dave: member of readers (readers: create-repo on project API)
/// - erin: read on project API, inactive
/// - ghost: direct admin on api, not a known member (unknown principal)
/// - devs: read on project WEB (repo web)
struct Org {
    batches: Vec<(SyncKind, SyncBatch)>,
}

fn api_id() -> String {
    repository_id(WS, "{p-api}", "API", "{r-api}")
}

fn org() -> Org {
    use ResourceType::*;
    let users = ["alice", "bob", "carol", "dave", "erin"];
    let accounts = SyncBatch {
        resources: users
            .iter()
            .map(|n| {
                let status = if *n == "erin" { "inactive" } else { "active" };
                let mut name = n.to_string();
                name[..1].make_ascii_uppercase();
                user(&format!("{{u-{n}}}"), n, &name, status)
            })
            .collect(),
        ..Default::default()
    };
    let u = |n: &str| format!("{{u-{n}}}");

    let ws_member = ent(Workspace, WS, "member");
    let ws_owner = ent(Workspace, WS, "owner");
    let mut ws_grants: Vec<Grant> = users.iter().map(|n| grant(&ws_member, User, &u(n))).collect();
    ws_grants.push(grant(&ws_owner, User, &u("alice")));
    let workspaces = SyncBatch {
        resources: vec![Resource {
            resource_type: Workspace,
            id: WS.into(),
            display_name: "Acme Corp".into(),
            parent_id: None,
            profile: Profile::Workspace(WorkspaceProfile {
                slug: "acme".into(),
                name: "Acme Corp".into(),
            }),
        }],
        entitlements: vec![ws_member, ws_owner],
        grants: ws_grants,
    };

    let group = |slug: &str, name: &str| Resource {
        resource_type: UserGroup,
        id: group_id(WS, slug),
        display_name: name.into(),
        parent_id: Some(WS.into()),
        profile: Profile::Group(GroupProfile {
            slug: slug.into(),
            name: name.into(),
            workspace_slug: "acme".into(),
        }),
    };
    let devs_member = ent(UserGroup, &group_id(WS, "devs"), "member");
    let readers_member = ent(UserGroup, &group_id(WS, "readers"), "member");
    let groups = SyncBatch {
        resources: vec![group("devs", "Developers"), group("readers", "Readers")],
        grants: vec![
            grant(&devs_member, User, &u("bob")),
            grant(&devs_member, User, &u("carol")),
            grant(&readers_member, User, &u("dave")),
        ],
        entitlements: vec![devs_member, readers_member],
    };

    let project = |uuid: &str, key: &str| Resource {
        resource_type: Project,
        id: project_id(WS, uuid, key),
        display_name: format!("Project {key}"),
        parent_id: Some(WS.into()),
        profile: Profile::Project(ProjectProfile {
            key: key.into(),
            name: format!("Project {key}"),
            uuid: uuid.into(),
            workspace_slug: "acme".into(),
        }),
    };
    let api_p = project_id(WS, "{p-api}", "API");
    let web_p = project_id(WS, "{p-web}", "WEB");
    let mut p_ents = Vec::new();
    for p in [&api_p, &web_p] {
        for slug in ["read", "write", "create-repo", "admin"] {
            p_ents.push(ent(Project, p, slug));
        }
    }
    let pe = |p: &str, slug: &str| {
        p_ents
            .iter()
            .find(|e| e.resource_id == p && e.slug == slug)
            .unwrap()
            .clone()
    };
    let projects = SyncBatch {
        resources: vec![project("{p-api}", "API"), project("{p-web}", "WEB")],
        grants: vec![
            grant(&pe(&api_p, "admin"), User, &u("carol")),
            grant(&pe(&api_p, "create-repo"), UserGroup, &group_id(WS, "readers")),
            grant(&pe(&api_p, "read"), User, &u("erin")),
            grant(&pe(&web_p, "read"), UserGroup, &group_id(WS, "devs")),
        ],
        entitlements: p_ents.clone(),
    };

    let repo = |puuid: &str, key: &str, ruuid: &str, slug: &str| Resource {
        resource_type: Repository,
        id: repository_id(WS, puuid, key, ruuid),
        // As the sync stores it: the full name.
        display_name: format!("acme/{slug}"),
        parent_id: Some(WS.into()),
        profile: Profile::Repository(RepositoryProfile {
            slug: slug.into(),
            full_name: format!("acme/{slug}"),
            name: slug.into(),
            uuid: ruuid.into(),
            project_id: project_id(WS, puuid, key),
            project_key: key.into(),
            workspace_slug: "acme".into(),
        }),
    };
    let api = api_id();
    let web = repository_id(WS, "{p-web}", "WEB", "{r-web}");
    let mut r_ents = Vec::new();
    for r in [&api, &web] {
        for slug in ["read", "write", "admin"] {
            r_ents.push(ent(Repository, r, slug));
        }
    }
    let re = |r: &str, slug: &str| {
        r_ents
            .iter()
            .find(|e| e.resource_id == r && e.slug == slug)
            .unwrap()
            .clone()
    };
    let mut ghost = grant(&re(&api, "admin"), User, "{u-ghost}");
    ghost.unknown_principal = true;
    let repositories = SyncBatch {
        resources: vec![
            repo("{p-api}", "API", "{r-api}", "api"),
            repo("{p-web}", "WEB", "{r-web}", "web"),
        ],
        grants: vec![
            grant(&re(&api, "read"), User, &u("bob")),
            grant(&re(&api, "write"), UserGroup, &group_id(WS, "devs")),
            ghost,
        ],
        entitlements: r_ents.clone(),
    };
    Org {
        batches: vec![
            (SyncKind::Accounts, accounts),
            (SyncKind::Workspaces, workspaces),
            (SyncKind::Groups, groups),
            (SyncKind::Projects, projects),
            (SyncKind::Repositories, repositories),
        ],
    }
}

impl Org {
    fn batch(&self, kind: SyncKind) -> SyncBatch {
        self.batches.iter().find(|(k, _)| *k == kind).unwrap().1.clone()
    }
}

fn sync(store: &Store, connector: &str, kind: SyncKind, batch: &SyncBatch) -> i64 {
    let run = store.start_run(connector, kind).unwrap();
    store.commit_run(run, batch, 7).unwrap()
}

fn sync_all(store: &Store, connector: &str) {
    for (kind, batch) in org().batches {
        sync(store, connector, kind, &batch);
    }
}

/// `n` repositories with three grants each, named with a `tag`.
fn repo_batch(tag: &str, n: usize) -> SyncBatch {
    let mut b = SyncBatch::default();
    for i in 0..n {
        let id = repository_id(WS, "{p}", "P", &format!("{{r{i}}}"));
        b.resources.push(Resource {
            resource_type: ResourceType::Repository,
            id: id.clone(),
            display_name: format!("acme/r{i}"),
            parent_id: Some(WS.into()),
            profile: Profile::Repository(RepositoryProfile {
                full_name: format!("acme/r{i}"),
                name: tag.into(),
                ..Default::default()
            }),
        });
        for slug in ["read", "write", "admin"] {
            let e = ent(ResourceType::Repository, &id, slug);
            b.grants
                .push(grant(&e, ResourceType::User, &format!("{{u-{tag}-{slug}}}")));
            b.entitlements.push(e);
        }
    }
    b
}

fn sorted(mut b: SyncBatch) -> SyncBatch {
    b.resources.sort_by(|x, y| x.id.cmp(&y.id));
    b.entitlements.sort_by(|x, y| x.id.cmp(&y.id));
    b.grants.sort_by(|x, y| x.id.cmp(&y.id));
    b
}

#[test]
fn failed_and_abandoned_runs_leave_the_previous_generation_whole() {
    let store = Store::open_in_memory().unwrap();
    let good = repo_batch("good", 20);
    let g1 = sync(&store, "default", SyncKind::Repositories, &good);

    // A failed run: data untouched, run recorded with its error.
    let run = store.start_run("default", SyncKind::Repositories).unwrap();
    store.fail_run(run, "Bitbucket answered 503", 12).unwrap();
    assert_eq!(
        store.current_generation("default", SyncKind::Repositories).unwrap(),
        Some(g1)
    );
    assert_eq!(
        store.batch("default", SyncKind::Repositories).unwrap(),
        sorted(good.clone())
    );
    let runs = store.runs("default", 10).unwrap();
    assert_eq!(runs[0].id, run);
    assert_eq!(runs[0].status, RunStatus::Failed);
    assert_eq!(runs[0].error.as_deref(), Some("Bitbucket answered 503"));
    assert_eq!(runs[0].requests, 12);
    assert!(runs[0].finished_at.is_some());
    // It cannot be committed afterwards.
    assert!(matches!(
        store.commit_run(run, &repo_batch("late", 1), 1),
        Err(StoreError::RunNotRunning { .. })
    ));

    // A run that is never committed is invisible.
    let abandoned = store.start_run("default", SyncKind::Repositories).unwrap();
    assert_eq!(
        store.batch("default", SyncKind::Repositories).unwrap(),
        sorted(good.clone())
    );

    // A refused commit (a grant of an entitlement outside the batch) changes
    // nothing. (A commit dying after writing everything is covered by the
    // store's unit tests.)
    let mut bad = repo_batch("bad", 30);
    bad.grants.push(Grant {
        id: "dangling".into(),
        entitlement_id: "repository:{nope}:read".into(),
        principal_type: ResourceType::User,
        principal_id: "{u}".into(),
        unknown_principal: false,
    });
    let err = store.commit_run(abandoned, &bad, 3).unwrap_err();
    assert!(err.to_string().contains("not in the batch"), "{err}");
    assert_eq!(
        store.current_generation("default", SyncKind::Repositories).unwrap(),
        Some(g1)
    );
    assert_eq!(store.batch("default", SyncKind::Repositories).unwrap(), sorted(good));
    assert_eq!(store.generations("default", SyncKind::Repositories).unwrap().len(), 1);

    // Interrupted runs of a previous process are closed as failed.
    assert_eq!(store.fail_interrupted_runs(Some("default"), None).unwrap(), 1);
    let runs = store.runs("default", 10).unwrap();
    assert!(runs.iter().all(|r| r.status != RunStatus::Running));
    assert!(matches!(
        store.fail_run(9999, "x", 0),
        Err(StoreError::UnknownRun(9999))
    ));
}

#[test]
fn history_keeps_the_last_n_generations() {
    let store = Store::open_in_memory().unwrap().with_history(3);
    let gens: Vec<i64> = (0..5)
        .map(|i| {
            sync(
                &store,
                "default",
                SyncKind::Repositories,
                &repo_batch(&format!("t{i}"), 2),
            )
        })
        .collect();
    let kept = store.generations("default", SyncKind::Repositories).unwrap();
    assert_eq!(
        kept.iter().map(|g| g.generation).collect::<Vec<_>>(),
        vec![gens[4], gens[3], gens[2]]
    );
    assert!(kept[0].current && !kept[1].current);
    assert_eq!(kept[0].counts.grants, 6);
    assert!(kept[0].run_id.is_some());
    // A pruned generation cannot be diffed; a kept one can.
    assert!(matches!(
        store.diff_grants("default", SyncKind::Repositories, gens[0], gens[4]),
        Err(StoreError::UnknownGeneration { .. })
    ));
    store
        .diff_grants("default", SyncKind::Repositories, gens[2], gens[4])
        .unwrap();
    // Pruned rows are gone from the older generation's batch too.
    assert!(
        store
            .generation_batch("default", SyncKind::Repositories, gens[1])
            .is_err()
    );
}

#[test]
fn diff_between_generations_lists_added_and_removed_grants() {
    let store = Store::open_in_memory().unwrap();
    let first = repo_batch("a", 2);
    let mut second = first.clone();
    let removed = second.grants.remove(0);
    let e = second.entitlements[3].clone();
    let added = grant(&e, ResourceType::User, "{u-new}");
    second.grants.push(added.clone());
    let g1 = sync(&store, "default", SyncKind::Repositories, &first);
    let g2 = sync(&store, "default", SyncKind::Repositories, &second);
    let diff = store.diff_grants("default", SyncKind::Repositories, g1, g2).unwrap();
    assert_eq!(diff.added, vec![added.clone()]);
    assert_eq!(diff.removed, vec![removed.clone()]);
    let back = store.diff_grants("default", SyncKind::Repositories, g2, g1).unwrap();
    assert_eq!((back.added, back.removed), (vec![removed], vec![added]));
}

#[test]
fn connectors_are_isolated_and_delete_connector_removes_one() {
    let store = Store::open_in_memory().unwrap();
    sync(&store, "ns/a", SyncKind::Repositories, &repo_batch("a", 3));
    sync(&store, "ns/b", SyncKind::Repositories, &repo_batch("b", 1));
    assert_eq!(store.connectors().unwrap(), vec!["ns/a", "ns/b"]);
    assert_eq!(store.resources("ns/a", None).unwrap().len(), 3);
    assert_eq!(
        store.resources("ns/b", Some(ResourceType::Repository)).unwrap().len(),
        1
    );
    assert!(
        store
            .grants("ns/b")
            .unwrap()
            .iter()
            .all(|g| g.principal_id.contains("-b-"))
    );

    store.delete_connector("ns/a").unwrap();
    assert_eq!(store.connectors().unwrap(), vec!["ns/b"]);
    assert!(
        store
            .batch("ns/a", SyncKind::Repositories)
            .unwrap()
            .resources
            .is_empty()
    );
    assert!(store.runs("ns/a", 10).unwrap().is_empty());
    assert_eq!(store.current_generation("ns/a", SyncKind::Repositories).unwrap(), None);
    assert_eq!(store.counts("ns/b", SyncKind::Repositories).unwrap().grants, 3);
    store.delete_connector("ns/a").unwrap(); // idempotent
}

#[test]
fn kinds_are_independent() {
    let store = Store::open_in_memory().unwrap();
    let o = org();
    sync(&store, "default", SyncKind::Projects, &o.batch(SyncKind::Projects));
    let projects = store.batch("default", SyncKind::Projects).unwrap();
    let gp = store.current_generation("default", SyncKind::Projects).unwrap();
    for _ in 0..3 {
        sync(&store, "default", SyncKind::Groups, &o.batch(SyncKind::Groups));
    }
    assert_eq!(store.batch("default", SyncKind::Projects).unwrap(), projects);
    assert_eq!(store.current_generation("default", SyncKind::Projects).unwrap(), gp);
    assert_eq!(store.generations("default", SyncKind::Groups).unwrap().len(), 3);
    let c = store.counts("default", SyncKind::Projects).unwrap();
    assert_eq!((c.resources, c.entitlements, c.grants), (2, 8, 4));
    // A batch of the wrong type is refused.
    let run = store.start_run("default", SyncKind::Groups).unwrap();
    let err = store.commit_run(run, &o.batch(SyncKind::Projects), 0).unwrap_err();
    assert!(matches!(err, StoreError::InvalidBatch { .. }), "{err}");
}

#[test]
fn interleaved_runs_of_one_kind_both_complete_and_the_later_commit_wins() {
    let store = Store::open_in_memory().unwrap();
    let first = store.start_run("default", SyncKind::Repositories).unwrap();
    let second = store.start_run("default", SyncKind::Repositories).unwrap();
    store.commit_run(second, &repo_batch("second", 1), 1).unwrap();
    let g = store.commit_run(first, &repo_batch("first", 2), 1).unwrap();
    assert_eq!(
        store.current_generation("default", SyncKind::Repositories).unwrap(),
        Some(g)
    );
    assert_eq!(store.counts("default", SyncKind::Repositories).unwrap().resources, 2);
    assert!(
        store
            .runs("default", 10)
            .unwrap()
            .iter()
            .all(|r| r.status == RunStatus::Ok)
    );
}

#[test]
fn reader_in_another_connection_sees_whole_generations_while_the_writer_commits() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.db");
    let writer = Store::open(&path).unwrap();
    let small = repo_batch("small", 50);
    let large = repo_batch("large", 2000);
    sync(&writer, "default", SyncKind::Repositories, &small);

    let done = Arc::new(AtomicBool::new(false));
    let w = {
        let (writer, done, small, large) = (writer.clone(), done.clone(), small.clone(), large.clone());
        std::thread::spawn(move || {
            for i in 0..10 {
                let b = if i % 2 == 0 { &large } else { &small };
                sync(&writer, "default", SyncKind::Repositories, b);
            }
            done.store(true, Ordering::SeqCst);
        })
    };
    // The reader is a separate read-only handle, as the `access` CLI would be.
    let reader = Store::open_read_only(&path).unwrap();
    let mut reads = 0;
    while !done.load(Ordering::SeqCst) || reads < 5 {
        let b = reader.batch("default", SyncKind::Repositories).unwrap();
        let tags: std::collections::HashSet<_> = b
            .resources
            .iter()
            .map(|r| r.profile.repository().unwrap().name.clone())
            .collect();
        assert_eq!(tags.len(), 1, "a read mixed two generations");
        assert!(b.resources.len() == 50 || b.resources.len() == 2000);
        assert_eq!(b.grants.len(), b.resources.len() * 3);
        if reads == 1 {
            // A second process reads the file mid-sync too.
            let out = cli(&["--db", path.to_str().unwrap(), "--json", "who-can", "acme/r0"]);
            // Only repositories are synced here: answered, flagged incomplete.
            assert_eq!(out.status.code(), Some(8), "{}", String::from_utf8_lossy(&out.stderr));
            let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            assert_eq!(doc["access"].as_array().unwrap().len(), 3);
        }
        reads += 1;
    }
    w.join().unwrap();
    assert_eq!(reader.counts("default", SyncKind::Repositories).unwrap().resources, 50);
    assert!(matches!(
        reader.start_run("default", SyncKind::Accounts),
        Err(StoreError::ReadOnly)
    ));
}

#[test]
fn reopening_the_file_keeps_data_and_runs() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.db");
    let batch = repo_batch("x", 5);
    let g = {
        let store = Store::open(&path).unwrap();
        sync(&store, "default", SyncKind::Repositories, &batch)
    };
    let store = Store::open(&path).unwrap();
    assert_eq!(
        store.current_generation("default", SyncKind::Repositories).unwrap(),
        Some(g)
    );
    assert_eq!(store.batch("default", SyncKind::Repositories).unwrap(), sorted(batch));
    let runs = store.runs("default", 5).unwrap();
    assert_eq!(runs.len(), 1);
    assert_eq!(runs[0].status, RunStatus::Ok);
    assert_eq!(runs[0].requests, 7);
    assert_eq!(runs[0].generation, Some(g));
    assert_eq!(runs[0].counts.unwrap().grants, 15);
    assert!(runs[0].duration_ms.is_some());
}

#[test]
fn a_file_that_is_not_a_store_gives_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join("notes.txt");
    std::fs::write(
        &text,
        "this is not a database, just some text that is long enough ".repeat(20),
    )
    .unwrap();
    for err in [
        Store::open(&text).unwrap_err(),
        Store::open_read_only(&text).unwrap_err(),
    ] {
        assert!(matches!(err, StoreError::NotAStore { .. }), "{err:?}");
        assert!(err.to_string().contains("is not a bitbucket-operator store"), "{err}");
    }
    // Another application's SQLite file is refused, and left alone.
    let foreign = dir.path().join("other.db");
    {
        let c = rusqlite::Connection::open(&foreign).unwrap();
        c.execute_batch("CREATE TABLE t (x); INSERT INTO t VALUES (1);")
            .unwrap();
    }
    let err = Store::open(&foreign).unwrap_err();
    assert!(err.to_string().contains("another application"), "{err}");
    let c = rusqlite::Connection::open(&foreign).unwrap();
    let mode: String = c.query_row("PRAGMA journal_mode", [], |r| r.get(0)).unwrap();
    assert_eq!(mode, "delete");
    // A missing file is not created by a read-only open.
    let missing = dir.path().join("missing.db");
    let err = Store::open_read_only(&missing).unwrap_err();
    assert!(err.to_string().contains("does not exist"), "{err}");
    assert!(!missing.exists());
}

#[test]
fn a_50k_grant_batch_commits_and_prunes_old_generations() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("store.db")).unwrap().with_history(2);
    let big = repo_batch("big", 50_000 / 3 + 1);
    assert!(big.grants.len() >= 50_000);
    let mut worst = Duration::ZERO;
    for _ in 0..3 {
        // The third commit also prunes a 50k-grant generation.
        let t = Instant::now();
        sync(&store, "default", SyncKind::Repositories, &big);
        eprintln!("50k-grant commit: {:?}", t.elapsed());
        worst = worst.max(t.elapsed());
    }
    // Speed is the benchmark's job (a wall-clock limit here failed under CI
    // load); this test keeps the size and the pruning honest.
    eprintln!("50k-grant commit: worst {worst:?}");
    assert_eq!(store.generations("default", SyncKind::Repositories).unwrap().len(), 2);
}

#[test]
fn replace_resource_grants_refreshes_one_resource_in_place() {
    let store = Store::open_in_memory().unwrap();
    let o = org();
    sync_all(&store, "default");
    let g = store.current_generation("default", SyncKind::Repositories).unwrap();
    let api = api_id();
    let admin = ent(ResourceType::Repository, &api, "admin");
    let new = grant(&admin, ResourceType::User, "{u-dave}");
    store
        .replace_resource_grants("default", SyncKind::Repositories, &api, std::slice::from_ref(&new))
        .unwrap();
    assert_eq!(store.current_generation("default", SyncKind::Repositories).unwrap(), g);
    let on_api: Vec<_> = store
        .grants_on("default", &api)
        .unwrap()
        .into_iter()
        .map(|h| h.grant)
        .collect();
    assert_eq!(on_api, vec![new]);
    // Other resources' grants are untouched; counts follow.
    let web = repository_id(WS, "{p-web}", "WEB", "{r-web}");
    assert_eq!(store.counts("default", SyncKind::Repositories).unwrap().grants, 1);
    assert!(store.grants_on("default", &web).unwrap().is_empty());
    assert_eq!(
        store.batch("default", SyncKind::Projects).unwrap(),
        sorted(o.batch(SyncKind::Projects))
    );
    // A grant of another resource's entitlement is refused.
    let other = grant(
        &ent(ResourceType::Repository, &web, "read"),
        ResourceType::User,
        "{u-bob}",
    );
    assert!(
        store
            .replace_resource_grants("default", SyncKind::Repositories, &api, &[other])
            .is_err()
    );
    assert!(matches!(
        store.replace_resource_grants("default", SyncKind::Repositories, "{nope}", &[]),
        Err(StoreError::UnknownResource { .. })
    ));
}

fn entry<'a>(entries: &'a [access::AccessEntry], nick: &str) -> &'a access::AccessEntry {
    entries
        .iter()
        .find(|e| e.nickname.as_deref() == Some(nick))
        .unwrap_or_else(|| panic!("{nick} missing in {entries:#?}"))
}

fn vias(e: &access::AccessEntry) -> Vec<(String, Permission)> {
    e.via.iter().map(|p| (p.via.clone(), p.permission)).collect()
}

#[test]
fn who_can_combines_every_path() {
    let store = Store::open_in_memory().unwrap();
    sync_all(&store, "default");
    let entries = access::who_can(&store, "default", "acme/api").unwrap();
    let order: Vec<_> = entries
        .iter()
        .map(|e| (e.nickname.clone().unwrap_or_else(|| e.user_id.clone()), e.permission))
        .collect();
    use Permission::*;
    assert_eq!(
        order,
        vec![
            ("alice".into(), Admin),
            ("carol".into(), Admin),
            ("{u-ghost}".into(), Admin),
            ("bob".into(), Write),
            ("dave".into(), Write),
            ("erin".into(), Read),
        ]
    );
    // Workspace owner.
    assert_eq!(vias(entry(&entries, "alice")), vec![("workspace owner".into(), Admin)]);
    // Max of a project grant and a group grant.
    assert_eq!(
        vias(entry(&entries, "carol")),
        vec![("project API".into(), Admin), ("group devs".into(), Write)]
    );
    // Max of a group grant and a direct grant.
    assert_eq!(
        vias(entry(&entries, "bob")),
        vec![("group devs".into(), Write), ("direct".into(), Read)]
    );
    // create-repo on the project, via a group, is write on the repository.
    assert_eq!(
        vias(entry(&entries, "dave")),
        vec![("project API via group readers".into(), Write)]
    );
    // Project user grant; profile data carried.
    let erin = entry(&entries, "erin");
    assert_eq!(vias(erin), vec![("project API".into(), Read)]);
    assert_eq!(erin.status.as_deref(), Some("inactive"));
    assert_eq!(erin.display_name.as_deref(), Some("Erin"));
    // Unknown principal kept and flagged.
    let ghost = &entries[2];
    assert!(ghost.unknown_principal && ghost.nickname.is_none());
    assert_eq!(vias(ghost), vec![("direct".into(), Admin)]);
    assert!(
        entries
            .iter()
            .filter(|e| e.user_id != "{u-ghost}")
            .all(|e| !e.unknown_principal)
    );

    // By resource id, and the other repository (project group grant).
    assert_eq!(access::who_can(&store, "default", &api_id()).unwrap(), entries);
    let web = access::who_can(&store, "default", "ACME/web").unwrap();
    assert_eq!(
        web.iter()
            .map(|e| (e.nickname.clone().unwrap(), e.permission))
            .collect::<Vec<_>>(),
        vec![("alice".into(), Admin), ("bob".into(), Read), ("carol".into(), Read)]
    );
    assert_eq!(vias(&web[1]), vec![("project WEB via group devs".into(), Read)]);

    let err = access::who_can(&store, "default", "acme/nope").unwrap_err();
    assert!(matches!(err, AccessError::UnknownRepository { .. }));
    assert!(access::who_can(&store, "other", "acme/api").is_err());
}

#[test]
fn access_of_lists_workspaces_groups_projects_and_repositories() {
    let store = Store::open_in_memory().unwrap();
    sync_all(&store, "default");
    use Permission::*;
    // By nickname, account id and uuid (braces optional): same answer.
    let carol = access::access_of(&store, "default", "carol").unwrap();
    assert_eq!(access::access_of(&store, "default", "acc-carol").unwrap(), carol);
    assert_eq!(access::access_of(&store, "default", "u-carol").unwrap(), carol);
    assert_eq!(carol.user.id, "{u-carol}");
    assert_eq!(carol.workspaces.len(), 1);
    assert_eq!(
        (carol.workspaces[0].slug.as_str(), carol.workspaces[0].roles.clone()),
        ("acme", vec!["member".to_string()])
    );
    assert_eq!(
        carol.groups.iter().map(|g| g.slug.as_str()).collect::<Vec<_>>(),
        vec!["devs"]
    );
    let projects: Vec<_> = carol.projects.iter().map(|p| (p.name.as_str(), p.permission)).collect();
    assert_eq!(projects, vec![("acme/API", Admin), ("acme/WEB", Read)]);
    assert_eq!(carol.projects[1].via[0].via, "group devs");
    let repos: Vec<_> = carol
        .repositories
        .iter()
        .map(|r| (r.name.as_str(), r.permission))
        .collect();
    assert_eq!(repos, vec![("acme/api", Admin), ("acme/web", Read)]);
    assert_eq!(
        carol.repositories[0]
            .via
            .iter()
            .map(|p| p.via.as_str())
            .collect::<Vec<_>>(),
        vec!["project API", "group devs"]
    );

    // The owner administers everything in the workspace.
    let alice = access::access_of(&store, "default", "alice").unwrap();
    assert_eq!(alice.workspaces[0].roles, vec!["member", "owner"]);
    assert!(
        alice
            .repositories
            .iter()
            .all(|r| r.permission == Admin && r.via[0].via == "workspace owner")
    );
    assert_eq!(
        alice.repositories.iter().map(|r| r.name.as_str()).collect::<Vec<_>>(),
        vec!["acme/api", "acme/web"]
    );
    assert_eq!(alice.projects.len(), 2);

    // create-repo stays create-repo on the project, write on its repositories.
    let dave = access::access_of(&store, "default", "dave").unwrap();
    assert_eq!(dave.projects[0].permission, CreateRepo);
    assert_eq!(
        dave.repositories.iter().map(|r| r.permission).collect::<Vec<_>>(),
        vec![Write]
    );

    // A principal known only from a grant.
    let ghost = access::access_of(&store, "default", "{u-ghost}").unwrap();
    assert!(ghost.user.unknown_principal);
    assert_eq!(ghost.repositories[0].permission, Admin);

    let err = access::access_of(&store, "default", "nobody").unwrap_err();
    assert!(matches!(err, AccessError::UnknownUser { .. }));
    assert!(err.to_string().contains("nobody"), "{err}");
}

fn filled_db(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("store.db");
    let store = Store::open(&path).unwrap();
    sync_all(&store, "default");
    path
}

fn cli(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_bitbucket-operator"))
        .arg("access")
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap()
}

#[test]
fn cli_who_can_prints_an_aligned_table() {
    let dir = tempfile::tempdir().unwrap();
    let db = filled_db(dir.path());
    let out = cli(&["--db", db.to_str().unwrap(), "who-can", "acme/api"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let header = lines.iter().position(|l| l.starts_with("PERMISSION")).expect(&text);
    let rows = &lines[header + 1..];
    assert_eq!(rows.len(), 6, "{text}");
    assert!(rows[0].starts_with("admin") && rows[0].contains("alice") && rows[0].contains("workspace owner"));
    assert!(rows[3].starts_with("write") && rows[3].contains("bob") && rows[3].contains("group devs (write)"));
    assert!(text.contains("unknown principal"));
    // Columns align: every row's USER column starts where the header's does.
    let col = lines[header].find("USER").unwrap();
    for row in rows {
        assert_ne!(row.as_bytes()[col], b' ', "{row}");
        assert_eq!(row.as_bytes()[col - 1], b' ', "{row}");
    }
}

#[test]
fn cli_json_is_one_document() {
    let dir = tempfile::tempdir().unwrap();
    let db = filled_db(dir.path());
    let out = cli(&["--db", db.to_str().unwrap(), "--json", "who-can", "acme/web"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["repository"]["full_name"], "acme/web");
    assert_eq!(doc["access"][0]["nickname"], "alice");
    assert_eq!(doc["access"][0]["permission"], "admin");
    assert_eq!(doc["access"][1]["via"][0]["via"], "project WEB via group devs");

    let out = cli(&["--db", db.to_str().unwrap(), "access-of", "dave", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["user"]["nickname"], "dave");
    assert_eq!(doc["projects"][0]["permission"], "create-repo");
    assert_eq!(doc["repositories"][0]["permission"], "write");

    let out = cli(&["--db", db.to_str().unwrap(), "access-of", "carol"]);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("Repositories") && text.contains("acme/api") && text.contains("project API (admin)"),
        "{text}"
    );
}

#[test]
fn cli_fails_with_a_reason_on_unknown_repository_user_or_missing_db() {
    let dir = tempfile::tempdir().unwrap();
    let db = filled_db(dir.path());
    let db = db.to_str().unwrap();
    let out = cli(&["--db", db, "who-can", "acme/nope"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("acme/nope") && err.contains("not found"), "{err}");
    assert!(out.stdout.is_empty());

    let out = cli(&["--db", db, "--connector", "ns/x", "who-can", "acme/api"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("connectors in the store: default"));

    let out = cli(&["--db", db, "access-of", "nobody"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("nobody"));

    let missing = dir.path().join("missing.db");
    let out = cli(&["--db", missing.to_str().unwrap(), "who-can", "acme/api"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("does not exist"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(!missing.exists(), "the CLI created the db file");
}

// ---- issue 14: honest readers, read-only opening, new commands --------------

#[test]
fn readers_say_data_as_of_warn_about_missing_types_and_exit_8() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("partial.db");
    let store = Store::open(&path).unwrap();
    let org = org();
    sync(
        &store,
        "default",
        SyncKind::Repositories,
        &org.batch(SyncKind::Repositories),
    );
    sync(&store, "default", SyncKind::Projects, &org.batch(SyncKind::Projects));
    let failed = store.start_run("default", SyncKind::Groups).unwrap();
    store.fail_run(failed, "Bitbucket unavailable: HTTP 503", 12).unwrap();
    drop(store);
    let db = path.to_str().unwrap();

    let out = cli(&["--db", db, "who-can", "acme/api"]);
    assert_eq!(out.status.code(), Some(8), "incomplete data has its own exit code");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("warning: accounts were never synced"), "{err}");
    assert!(
        err.contains("groups were never synced") && err.contains("HTTP 503"),
        "{err}"
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("Data as of:") && text.contains("groups never synced"),
        "{text}"
    );

    let out = cli(&["--db", db, "--json", "who-can", "acme/api"]);
    assert_eq!(out.status.code(), Some(8));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["data"]["complete"], false);
    let types = doc["data"]["types"].as_array().unwrap();
    let repos = types.iter().find(|t| t["type"] == "repositories").unwrap();
    assert!(repos["data_as_of"].as_str().unwrap().starts_with("20"), "{repos}");
    assert_eq!(repos["never_synced"], false);
    let groups = types.iter().find(|t| t["type"] == "groups").unwrap();
    assert_eq!(
        (groups["never_synced"].clone(), groups["last_run_status"].clone()),
        (true.into(), "failed".into())
    );

    // Complete data: exit 0, no warnings; data older than --max-age warns but answers.
    let full = filled_db(dir.path());
    let out = cli(&["--db", full.to_str().unwrap(), "who-can", "acme/api"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(out.stderr.is_empty(), "{}", String::from_utf8_lossy(&out.stderr));
    std::thread::sleep(Duration::from_millis(1100));
    let out = cli(&["--db", full.to_str().unwrap(), "--max-age", "1s", "who-can", "acme/api"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stderr).contains("older than --max-age"));
}

#[test]
fn readers_leave_no_file_behind_and_work_in_a_read_only_directory() {
    let dir = tempfile::tempdir().unwrap();
    let path = filled_db(dir.path());
    let listing = |d: &Path| {
        let mut names: Vec<String> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    };
    // The writer closed cleanly: only the main file is left.
    assert_eq!(listing(dir.path()), ["store.db"]);
    let ro = dir.path().join("ro");
    std::fs::create_dir(&ro).unwrap();
    std::fs::copy(&path, ro.join("store.db")).unwrap();
    let mut perms = std::fs::metadata(&ro).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o555);
    std::fs::set_permissions(&ro, perms).unwrap();
    let db = ro.join("store.db");
    for args in [&["who-can", "acme/api"][..], &["access-of", "bob"], &["runs"]] {
        let mut all = vec!["--db", db.to_str().unwrap()];
        all.extend_from_slice(args);
        let out = cli(&all);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert_eq!(listing(&ro), ["store.db"], "a reader created files");
    // And a writer opens it afterwards as if no reader had been there.
    let writer = Store::open(&path).unwrap();
    sync(&writer, "default", SyncKind::Groups, &org().batch(SyncKind::Groups));
}

#[test]
fn a_writer_reopening_closes_runs_of_a_dead_process_as_interrupted() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.db");
    let store = Store::open(&path).unwrap();
    let live = store.start_run("default", SyncKind::Groups).unwrap();
    drop(store);
    // A run owned by a process that no longer exists (pid far beyond pid_max).
    {
        let c = rusqlite_like_update(&path);
        assert_eq!(c, 1);
    }
    let store = Store::open(&path).unwrap();
    let runs = store.runs("default", 10).unwrap();
    let dead = runs.iter().find(|r| r.id != live).unwrap();
    assert_eq!(dead.status, RunStatus::Interrupted);
    assert!(dead.error.as_deref().unwrap().contains("interrupted"));
    // This process's own run is alive and stays running.
    assert_eq!(runs.iter().find(|r| r.id == live).unwrap().status, RunStatus::Running);
}

/// Adds a running run owned by a process that no longer exists: what a
/// killed `sync` leaves.
fn rusqlite_like_update(path: &Path) -> usize {
    let store = Store::open(path).unwrap();
    let run = store.start_run("default", SyncKind::Projects).unwrap();
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    // Beyond any pid_max, so certainly not alive.
    store
        .set_run_owner(run, &format!("{}:4294967295", host.trim()))
        .unwrap();
    1
}

#[test]
fn cli_lists_resources_grants_and_runs_and_suggests_names() {
    let dir = tempfile::tempdir().unwrap();
    let db = filled_db(dir.path());
    let db = db.to_str().unwrap();
    let out = cli(&["--db", db, "--csv", "grants"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let csv = String::from_utf8(out.stdout).unwrap();
    let mut lines = csv.lines();
    assert_eq!(
        lines.next().unwrap(),
        "resource_type,resource_id,resource_name,entitlement,principal_type,principal_id,principal_name,unknown_principal"
    );
    assert!(
        csv.lines()
            .any(|l| l.starts_with("repository,") && l.contains(",acme/api,read,user,{u-bob},bob,false")),
        "{csv}"
    );
    let out = cli(&["--db", db, "--csv", "resources", "--type", "repository"]);
    let csv = String::from_utf8(out.stdout).unwrap();
    assert_eq!(csv.lines().count(), 3, "header and two repositories: {csv}");
    let out = cli(&["--db", db, "--json", "resources", "--type", "user_group"]);
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["items"].as_array().unwrap().len(), 2);
    let out = cli(&["--db", db, "runs"]);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.starts_with("ID") && text.contains("repositories  ok"), "{text}");
    // Email and did-you-mean.
    let out = cli(&["--db", db, "--json", "access-of", "CAROL@acme.example"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["user"]["nickname"], "carol");
    let out = cli(&["--db", db, "who-can", "acme/apj"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("did you mean acme/api?"));
    let out = cli(&["--db", db, "access-of", "bobb"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("did you mean bob?"));
}

/// A store file whose workspace owner (alice) reaches `n` more repositories.
fn owner_db(dir: &Path, n: usize) -> std::path::PathBuf {
    let path = dir.join("store.db");
    let store = Store::open(&path).unwrap();
    for (kind, mut batch) in org().batches {
        if kind == SyncKind::Repositories {
            let more = repo_batch("more", n);
            batch.resources.extend(more.resources);
            batch.entitlements.extend(more.entitlements);
            batch.grants.extend(more.grants);
        }
        sync(&store, "default", kind, &batch);
    }
    path
}

#[test]
fn an_owners_access_of_is_the_same_with_or_without_the_read_indexes() {
    let dir = tempfile::tempdir().unwrap();
    let db = owner_db(dir.path(), 40);
    let indexed = Store::open_read_only(&db).unwrap();
    assert!(indexed.indexed());
    let with = access::access_of(&indexed, "default", "alice").unwrap();
    assert_eq!(with.repositories.len(), 42);
    assert!(
        with.repositories
            .iter()
            .all(|r| r.name.starts_with("acme/") && r.display_name == r.name)
    );
    drop(indexed);

    // A file an older binary wrote lacks the covering index: readers fall
    // back to the rows, and the next writer creates it and drops the one it replaces.
    let conn = rusqlite::Connection::open(&db).unwrap();
    conn.execute_batch(
        "DROP INDEX resources_names_by_parent;
         CREATE INDEX resources_by_parent ON resources (parent_id, generation);",
    )
    .unwrap();
    drop(conn);
    let plain = Store::open_read_only(&db).unwrap();
    assert!(!plain.indexed());
    assert_eq!(access::access_of(&plain, "default", "alice").unwrap(), with);
    drop(plain);
    drop(Store::open(&db).unwrap());
    let conn = rusqlite::Connection::open(&db).unwrap();
    let index = |name: &str| -> i64 {
        conn.query_row(
            "SELECT count(*) FROM sqlite_master WHERE type = 'index' AND name = ?1",
            [name],
            |r| r.get(0),
        )
        .unwrap()
    };
    assert_eq!(
        (index("resources_names_by_parent"), index("resources_by_parent")),
        (1, 0)
    );
    assert!(Store::open_read_only(&db).unwrap().indexed());
}

#[test]
fn a_closed_pipe_ends_a_streamed_access_of_quietly() {
    let dir = tempfile::tempdir().unwrap();
    // Far more than a pipe holds, so the reader goes away mid-stream.
    let db = owner_db(dir.path(), 3000);
    ends_quietly_when_the_reader_leaves(&db, &["access-of", "alice"], 5);
    // Read whole, it is one JSON document with every repository.
    let out = cli(&["--db", db.to_str().unwrap(), "--json", "access-of", "alice"]);
    assert_eq!(out.status.code(), Some(0));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["repositories"].as_array().unwrap().len(), 3002);
    assert!(out.stdout.ends_with(b"}\n"));
}

/// Runs `access --json QUERY` `times` times, reading one byte of its
/// answer and closing the pipe: each run must exit 0 and print nothing on stderr.
fn ends_quietly_when_the_reader_leaves(db: &Path, query: &[&str], times: usize) {
    for _ in 0..times {
        let mut child = Command::new(env!("CARGO_BIN_EXE_bitbucket-operator"))
            .args(["access", "--db", db.to_str().unwrap(), "--json"])
            .args(query)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdout = child.stdout.take().unwrap();
        let mut first = [0u8; 1];
        std::io::Read::read_exact(&mut stdout, &mut first).unwrap();
        drop(stdout);
        let out = child.wait_with_output().unwrap();
        assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
        assert!(out.stderr.is_empty(), "{}", String::from_utf8_lossy(&out.stderr));
    }
}

#[test]
fn a_closed_pipe_ends_the_command_quietly() {
    let dir = tempfile::tempdir().unwrap();
    ends_quietly_when_the_reader_leaves(&filled_db(dir.path()), &["grants"], 10);
}

#[test]
fn scoped_commits_replace_only_their_workspaces() {
    let store = Store::open_in_memory().unwrap();
    let other = "{ws-globex}";
    let mut both = repo_batch("a", 3);
    let mut globex = repo_batch("g", 2);
    for r in &mut globex.resources {
        r.id = r.id.replace(WS, other);
        r.parent_id = Some(other.into());
    }
    for e in &mut globex.entitlements {
        e.id = e.id.replace(WS, other);
        e.resource_id = e.resource_id.replace(WS, other);
    }
    for g in &mut globex.grants {
        g.id = g.id.replace(WS, other);
        g.entitlement_id = g.entitlement_id.replace(WS, other);
    }
    both.resources.extend(globex.resources.clone());
    both.entitlements.extend(globex.entitlements.clone());
    both.grants.extend(globex.grants.clone());
    let g1 = sync(&store, "default", SyncKind::Repositories, &both);

    // A run over acme only, where one acme repository went away.
    let acme_only = repo_batch("a", 2);
    let run = store
        .start_run_with(
            "default",
            SyncKind::Repositories,
            &RunOptions {
                workspaces: Some(vec![WS.into()]),
                resume: false,
                ..RunOptions::default()
            },
        )
        .unwrap();
    let g2 = store.commit_run(run.id, &acme_only, 1).unwrap();
    let now = store.batch("default", SyncKind::Repositories).unwrap();
    assert_eq!(now.resources.len(), 4, "2 acme + 2 globex");
    assert!(
        now.resources
            .iter()
            .filter(|r| r.parent_id.as_deref() == Some(other))
            .count()
            == 2
    );
    let diff = store.diff_grants("default", SyncKind::Repositories, g1, g2).unwrap();
    assert!(diff.added.is_empty());
    assert_eq!(diff.removed.len(), 3, "only the vanished acme repository's grants");
    assert!(diff.removed.iter().all(|g| g.id.contains(WS) && !g.id.contains(other)));
    let runs = store.runs("default", 1).unwrap();
    assert_eq!(runs[0].workspaces, Some(vec![WS.to_owned()]));
}

// ---- issue 14: per-workspace "data as of", staleness by the sync interval ---

/// The acme workspace plus globex, as the workspaces type syncs them.
fn two_workspaces() -> SyncBatch {
    let ws = |id: &str, slug: &str| Resource {
        resource_type: ResourceType::Workspace,
        id: id.into(),
        display_name: slug.into(),
        parent_id: None,
        profile: Profile::Workspace(WorkspaceProfile {
            slug: slug.into(),
            name: slug.into(),
        }),
    };
    SyncBatch {
        resources: vec![ws(WS, "acme"), ws("{ws-globex}", "globex")],
        ..Default::default()
    }
}

/// Repositories of acme and globex.
fn repos_of_both() -> SyncBatch {
    let mut both = repo_batch("a", 2);
    let mut globex = repo_batch("g", 1);
    for r in &mut globex.resources {
        r.id = r.id.replace(WS, "{ws-globex}");
        r.parent_id = Some("{ws-globex}".into());
        if let Profile::Repository(p) = &mut r.profile {
            p.full_name = p.full_name.replace("acme/", "globex/");
        }
    }
    for e in &mut globex.entitlements {
        e.id = e.id.replace(WS, "{ws-globex}");
        e.resource_id = e.resource_id.replace(WS, "{ws-globex}");
    }
    for g in &mut globex.grants {
        g.id = g.id.replace(WS, "{ws-globex}");
        g.entitlement_id = g.entitlement_id.replace(WS, "{ws-globex}");
    }
    both.resources.extend(globex.resources);
    both.entitlements.extend(globex.entitlements);
    both.grants.extend(globex.grants);
    both
}

#[test]
fn after_a_run_scoped_to_one_workspace_readers_report_data_as_of_per_workspace() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("scoped.db");
    let store = Store::open(&path).unwrap();
    sync(&store, "default", SyncKind::Workspaces, &two_workspaces());
    sync(&store, "default", SyncKind::Repositories, &repos_of_both());
    std::thread::sleep(Duration::from_millis(1300));
    let run = store
        .start_run_with(
            "default",
            SyncKind::Repositories,
            &RunOptions {
                workspaces: Some(vec![WS.into()]),
                ..RunOptions::default()
            },
        )
        .unwrap();
    store.commit_run(run.id, &repo_batch("a", 2), 1).unwrap();

    let fresh = store.freshness("default").unwrap();
    let repos = fresh.iter().find(|f| f.kind == SyncKind::Repositories).unwrap();
    let by_slug = |slug: &str| {
        repos
            .workspaces
            .iter()
            .find(|w| w.slug.as_deref() == Some(slug))
            .and_then(|w| w.data_as_of)
            .unwrap()
    };
    assert!(by_slug("acme") >= by_slug("globex") + 1300, "{repos:?}");
    assert_eq!(
        repos.data_as_of,
        Some(by_slug("globex")),
        "the type is as old as its oldest workspace"
    );
    let workspaces = fresh.iter().find(|f| f.kind == SyncKind::Workspaces).unwrap();
    assert!(
        workspaces.workspaces.is_empty(),
        "one run read every workspace: one age"
    );
    drop(store);
    let db = path.to_str().unwrap();

    let out = cli(&["--db", db, "resources", "--type", "repository"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("repositories (acme 20") && text.contains(", globex 20"),
        "{text}"
    );

    // Staleness goes by the oldest workspace, not by the newest run.
    let out = cli(&[
        "--db",
        db,
        "--max-age",
        "1s",
        "--json",
        "resources",
        "--type",
        "repository",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("repositories data is") && err.contains("per workspace: acme"),
        "{err}"
    );
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let repos = &doc["data"]["types"][0];
    assert_eq!(repos["stale"], true, "{repos}");
    let slugs: Vec<&str> = repos["workspaces"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["slug"].as_str().unwrap())
        .collect();
    assert_eq!(slugs, ["acme", "globex"]);
}

#[test]
fn staleness_is_judged_by_the_interval_the_data_was_synced_at() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("interval.db");
    // Schema v3 records each run's interval (`runs.interval_ms`).
    let store = Store::open(&path).unwrap();
    assert!(store.records_intervals());
    let run = store
        .start_run_with(
            "default",
            SyncKind::Repositories,
            &RunOptions {
                interval: Some(Duration::from_secs(1)),
                ..RunOptions::default()
            },
        )
        .unwrap();
    store.commit_run(run.id, &repo_batch("a", 2), 1).unwrap();
    let repos = store
        .freshness("default")
        .unwrap()
        .into_iter()
        .find(|f| f.kind == SyncKind::Repositories)
        .unwrap();
    assert_eq!(repos.interval_ms, Some(1000));
    drop(store);
    let db = path.to_str().unwrap();
    let args = ["--db", db, "resources", "--type", "repository"];
    let out = cli(&args);
    assert!(out.stderr.is_empty(), "fresh: {}", String::from_utf8_lossy(&out.stderr));
    std::thread::sleep(Duration::from_millis(1500));
    let out = cli(&args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("older than its sync interval 1s allows"), "{err}");

    // Without a recorded interval (`sync` runs), the 24h default applies.
    let plain = filled_db(dir.path());
    let out = cli(&["--db", plain.to_str().unwrap(), "resources"]);
    assert!(out.stderr.is_empty(), "{}", String::from_utf8_lossy(&out.stderr));
}
