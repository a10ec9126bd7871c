//! Provisioning against the simulator: every grant and revoke lands in the
//! simulator's ground truth exactly, writes happen only when needed, levels
//! are never lost by accident, and failures are typed.

use std::net::SocketAddr;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use bitbucket_operator::bitbucket::{Client, ClientConfig, Credentials, EndpointClass, Holder, PermissionScope};
use bitbucket_operator::model::SyncKind;
use bitbucket_operator::provision::{
    AccessRequest, AfterRefresh, GrantMode, GrantResult, Permission, PrincipalRef, ProvisionError, Provisioner,
    RevokeResult, StoreInventory, StoreRefresh, TargetRef, level_to_restore,
};
use bitbucket_operator::simulator::{Organisation, SimConfig, Simulator, SimulatorHandle};
use bitbucket_operator::store::Store;
use bitbucket_operator::sync::{SyncEngine, run_into_store};

// ---- fixtures -----------------------------------------------------------------

async fn start(config: SimConfig) -> SimulatorHandle {
    Simulator::start(config, SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .unwrap()
}

fn client(sim: &SimulatorHandle) -> Client {
    let mut config = ClientConfig::new(&sim.base_url()).unwrap();
    config.max_retries = 1;
    config.backoff_base = Duration::from_millis(5);
    config.backoff_max = Duration::from_millis(20);
    let creds = sim.credentials();
    Client::new(
        config,
        Credentials::ApiToken {
            username: creds.email.clone(),
            token: creds.api_token.clone(),
        },
    )
    .unwrap()
}

fn provisioner(sim: &SimulatorHandle) -> Provisioner {
    Provisioner::new(client(sim), true)
}

/// Names in workspace 0 to provision with: a plain (non-owner) member, the
/// owner, a user of another workspace only, a group, another group, a
/// project and a repository.
struct Names {
    ws: String,
    user_nick: String,
    user_uuid: String,
    user_account: String,
    owner_nick: String,
    outsider_nick: String,
    group: String,
    target_group: String,
    project: String,
    repo: String,
}

fn names(org: &Organisation) -> Names {
    let ws = &org.workspaces[0];
    let user_of = |uuid: &str| org.users.iter().find(|u| u.uuid == uuid).unwrap();
    let plain = ws.members.iter().find(|m| !m.owner).unwrap();
    let owner = ws.members.iter().find(|m| m.owner).unwrap();
    let outsider = org
        .users
        .iter()
        .find(|u| !ws.members.iter().any(|m| m.user_uuid == u.uuid))
        .unwrap();
    let user = user_of(&plain.user_uuid);
    Names {
        ws: ws.slug.clone(),
        user_nick: user.nickname.clone(),
        user_uuid: user.uuid.clone(),
        user_account: user.account_id.clone(),
        owner_nick: user_of(&owner.user_uuid).nickname.clone(),
        outsider_nick: outsider.nickname.clone(),
        group: ws.groups[0].slug.clone(),
        target_group: ws.groups[1].slug.clone(),
        project: ws.projects[0].key.clone(),
        repo: ws.repositories[0].slug.clone(),
    }
}

/// Removes any explicit level `principal` holds on `target`, and the user's
/// membership of the target group, straight through the client, so a test
/// starts from "nothing held".
async fn clear(client: &Client, n: &Names, principal: &PrincipalRef, target: &TargetRef) {
    let (user, who) = match principal {
        PrincipalRef::User(_) => (true, n.user_uuid.as_str()),
        PrincipalRef::Group(g) => (false, g.as_str()),
    };
    let holder = if user { Holder::User(who) } else { Holder::Group(who) };
    let result = match target {
        TargetRef::Project(key) => {
            client
                .delete_explicit_permission(PermissionScope::Project { workspace: &n.ws, key }, holder)
                .await
        }
        TargetRef::Repository(slug) => {
            client
                .delete_explicit_permission(PermissionScope::Repository { workspace: &n.ws, slug }, holder)
                .await
        }
        TargetRef::Group(g) => client.remove_group_member(&n.ws, g, who).await,
        TargetRef::Workspace => Ok(()),
    };
    // 404: was not a group member.
    if let Err(err) = result {
        assert_eq!(err.status, Some(404), "{err}");
    }
}

/// Ground truth: the explicit level `principal` holds on `target`.
fn truth(sim: &SimulatorHandle, n: &Names, principal: &PrincipalRef, target: &TargetRef) -> Option<String> {
    let org = sim.organisation();
    let ws = org.workspaces.iter().find(|w| w.slug == n.ws).unwrap();
    let key = match principal {
        PrincipalRef::User(_) => n.user_uuid.clone(),
        PrincipalRef::Group(g) => g.clone(),
    };
    let perms = match target {
        TargetRef::Project(k) => &ws.projects.iter().find(|p| &p.key == k).unwrap().user_permissions,
        TargetRef::Repository(r) => &ws.repositories.iter().find(|x| &x.slug == r).unwrap().user_permissions,
        TargetRef::Group(g) => {
            let group = ws.groups.iter().find(|x| &x.slug == g).unwrap();
            return group.members.contains(&key).then(|| "member".to_owned());
        }
        TargetRef::Workspace => unreachable!(),
    };
    let perms = match (principal, target) {
        (PrincipalRef::Group(_), TargetRef::Project(k)) => {
            &ws.projects.iter().find(|p| &p.key == k).unwrap().group_permissions
        }
        (PrincipalRef::Group(_), TargetRef::Repository(r)) => {
            &ws.repositories.iter().find(|x| &x.slug == r).unwrap().group_permissions
        }
        _ => perms,
    };
    perms.iter().find(|p| p.principal == key).map(|p| p.permission.clone())
}

fn request(n: &Names, principal: &PrincipalRef, target: &TargetRef, permission: Permission) -> AccessRequest {
    AccessRequest::new(n.ws.clone(), principal.clone(), target.clone(), permission)
}

fn user(n: &Names) -> PrincipalRef {
    PrincipalRef::User(n.user_nick.clone())
}

fn group(n: &Names) -> PrincipalRef {
    PrincipalRef::Group(n.group.clone())
}

/// Requests of one endpoint class a client made.
fn requests_of(client: &Client, class: EndpointClass) -> u64 {
    client
        .request_breakdown()
        .iter()
        .filter(|((c, _), _)| *c == class)
        .map(|(_, count)| count)
        .sum()
}

// ---- grant and revoke ---------------------------------------------------------------

#[tokio::test]
async fn every_grant_and_revoke_combination_lands_in_bitbucket() {
    let sim = start(SimConfig::default()).await;
    let n = names(&sim.organisation());
    let p = provisioner(&sim);
    let project = TargetRef::Project(n.project.clone());
    let repo = TargetRef::Repository(n.repo.clone());
    let project_levels = [
        Permission::Read,
        Permission::Write,
        Permission::CreateRepo,
        Permission::Admin,
    ];
    let repo_levels = [Permission::Read, Permission::Write, Permission::Admin];
    // A user may be named by nickname, account id or UUID.
    let principals = [
        user(&n),
        PrincipalRef::User(n.user_account.clone()),
        PrincipalRef::User(n.user_uuid.clone()),
        group(&n),
    ];
    let mut cases: Vec<(PrincipalRef, TargetRef, Permission)> = Vec::new();
    for (i, principal) in principals.iter().enumerate() {
        if i == 1 || i == 2 {
            // Other spellings of the same user: one level each is enough.
            cases.push((principal.clone(), project.clone(), Permission::Write));
            cases.push((principal.clone(), repo.clone(), Permission::Admin));
            continue;
        }
        cases.extend(project_levels.iter().map(|&l| (principal.clone(), project.clone(), l)));
        cases.extend(repo_levels.iter().map(|&l| (principal.clone(), repo.clone(), l)));
    }
    cases.push((user(&n), TargetRef::Group(n.target_group.clone()), Permission::Member));

    for (principal, target, level) in cases {
        clear(p.client(), &n, &principal, &target).await;
        let req = request(&n, &principal, &target, level);
        let granted = p.grant(&req, GrantMode::AtLeast).await.unwrap();
        assert_eq!(granted.result, GrantResult::Granted, "{req:?}");
        assert_eq!(granted.previous, None);
        assert_eq!(granted.current, Some(level));
        assert_eq!(
            truth(&sim, &n, &principal, &target).as_deref(),
            Some(level.as_str()),
            "{req:?}"
        );
        if let PrincipalRef::User(_) = principal {
            assert_eq!(granted.principal.key, n.user_uuid, "users resolve to their UUID");
        }

        let revoked = p.revoke(&req).await.unwrap();
        assert_eq!(revoked.result, RevokeResult::Revoked, "{req:?}");
        assert_eq!(revoked.previous, Some(level));
        assert_eq!(revoked.current, None);
        assert_eq!(truth(&sim, &n, &principal, &target), None, "{req:?}");
        assert!(revoked.message().starts_with(&format!("revoked {level} on ")));
    }
}

#[tokio::test]
async fn granting_what_is_held_and_revoking_what_is_not_write_nothing() {
    let sim = start(SimConfig::default()).await;
    let n = names(&sim.organisation());
    let setup = provisioner(&sim);
    let cases = [
        (user(&n), TargetRef::Project(n.project.clone()), Permission::Write),
        (group(&n), TargetRef::Repository(n.repo.clone()), Permission::Read),
        (user(&n), TargetRef::Group(n.target_group.clone()), Permission::Member),
    ];
    for (principal, target, level) in cases {
        clear(setup.client(), &n, &principal, &target).await;
        let req = request(&n, &principal, &target, level);
        assert_eq!(
            setup.grant(&req, GrantMode::AtLeast).await.unwrap().result,
            GrantResult::Granted
        );

        // A second grant, with a client of its own so its requests can be counted.
        let again = Provisioner::new(setup.client().scoped(), true);
        let before = sim.stats();
        let outcome = again.grant(&req, GrantMode::AtLeast).await.unwrap();
        assert_eq!(outcome.result, GrantResult::AlreadyHeld, "{req:?}");
        assert!(!outcome.changed());
        assert_eq!(outcome.previous, Some(level));
        assert!(outcome.message().starts_with("already held"), "{}", outcome.message());
        // Exactly one read of the permission (or member list), no PUT.
        let class = match target {
            TargetRef::Project(_) => EndpointClass::ProjectPermissions,
            TargetRef::Repository(_) => EndpointClass::RepositoryPermissions,
            _ => EndpointClass::Groups,
        };
        assert_eq!(requests_of(again.client(), class), 1, "{req:?}");
        assert_eq!(truth(&sim, &n, &principal, &target).as_deref(), Some(level.as_str()));

        // Revoke twice: the second one finds nothing and deletes nothing.
        assert_eq!(setup.revoke(&req).await.unwrap().result, RevokeResult::Revoked);
        let deletes = sim.stats().by_status.get(&204).copied().unwrap_or(0);
        let again = Provisioner::new(setup.client().scoped(), true);
        let outcome = again.revoke(&req).await.unwrap();
        assert_eq!(outcome.result, RevokeResult::NotHeld, "{req:?}");
        assert!(!outcome.changed());
        assert_eq!(requests_of(again.client(), class), 1, "{req:?}");
        assert_eq!(sim.stats().by_status.get(&204).copied().unwrap_or(0), deletes);
        assert!(sim.stats().total > before.total);
    }
}

#[tokio::test]
async fn a_409_from_concurrent_member_adds_is_success() {
    // Latency keeps both reads ahead of both PUTs, so one PUT meets a 409.
    let sim = start(SimConfig {
        latency: Duration::from_millis(60),
        ..SimConfig::default()
    })
    .await;
    let n = names(&sim.organisation());
    let p = provisioner(&sim);
    let target = TargetRef::Group(n.target_group.clone());
    clear(p.client(), &n, &user(&n), &target).await;
    let req = request(&n, &user(&n), &target, Permission::Member);
    let (a, b) = tokio::join!(p.grant(&req, GrantMode::AtLeast), p.grant(&req, GrantMode::AtLeast));
    let mut results = [a.unwrap().result, b.unwrap().result];
    results.sort_by_key(|r| format!("{r:?}"));
    assert_eq!(results, [GrantResult::AlreadyHeld, GrantResult::Granted]);
    assert_eq!(sim.stats().by_status.get(&409), Some(&1), "one PUT was answered 409");
    let org = sim.organisation();
    let group = org.workspaces[0]
        .groups
        .iter()
        .find(|g| g.slug == n.target_group)
        .unwrap();
    assert_eq!(group.members.iter().filter(|m| **m == n.user_uuid).count(), 1);
}

#[tokio::test]
async fn one_explicit_level_revoking_write_leaves_admin_and_grants_record_what_they_replaced() {
    let sim = start(SimConfig::default()).await;
    let n = names(&sim.organisation());
    let p = provisioner(&sim);
    for (principal, target) in [
        (user(&n), TargetRef::Repository(n.repo.clone())),
        (group(&n), TargetRef::Project(n.project.clone())),
    ] {
        clear(p.client(), &n, &principal, &target).await;
        let at = |level| request(&n, &principal, &target, level);

        let first = p.grant(&at(Permission::Read), GrantMode::AtLeast).await.unwrap();
        assert_eq!(first.previous, None);
        let second = p.grant(&at(Permission::Admin), GrantMode::AtLeast).await.unwrap();
        assert_eq!(second.result, GrantResult::Granted);
        assert_eq!(
            second.previous,
            Some(Permission::Read),
            "the grant records the level it replaced"
        );
        assert!(second.message().ends_with("(previously read)"), "{}", second.message());

        // Ensure-at-least: admin satisfies write; nothing is lowered.
        let lower = p.grant(&at(Permission::Write), GrantMode::AtLeast).await.unwrap();
        assert_eq!(
            lower.result,
            GrantResult::AlreadySatisfied {
                held: Permission::Admin
            }
        );
        assert_eq!(lower.previous, Some(Permission::Admin));
        assert_eq!(truth(&sim, &n, &principal, &target).as_deref(), Some("admin"));

        // Revoking write from an admin changes nothing, and says so.
        let revoke = p.revoke(&at(Permission::Write)).await.unwrap();
        assert_eq!(
            revoke.result,
            RevokeResult::LeftInPlace {
                held: Permission::Admin
            }
        );
        assert!(!revoke.changed());
        assert!(
            revoke
                .message()
                .starts_with("left admin in place: revoking write from a holder of admin"),
            "{}",
            revoke.message()
        );
        assert_eq!(truth(&sim, &n, &principal, &target).as_deref(), Some("admin"));

        // Exact mode lowers, recording admin as the previous level.
        let exact = p.grant(&at(Permission::Write), GrantMode::Exact).await.unwrap();
        assert_eq!(exact.result, GrantResult::Granted);
        assert_eq!(exact.previous, Some(Permission::Admin));
        assert_eq!(truth(&sim, &n, &principal, &target).as_deref(), Some("write"));
    }
}

#[tokio::test]
async fn revoke_and_restore_puts_back_the_previous_level_or_leaves_external_changes() {
    let sim = start(SimConfig::default()).await;
    let n = names(&sim.organisation());
    let p = provisioner(&sim);
    let target = TargetRef::Project(n.project.clone());
    let principal = user(&n);
    let at = |level| request(&n, &principal, &target, level);

    // Held read; JIT admin; on expiry read comes back.
    clear(p.client(), &n, &principal, &target).await;
    p.grant(&at(Permission::Read), GrantMode::AtLeast).await.unwrap();
    let jit = p.grant(&at(Permission::Admin), GrantMode::AtLeast).await.unwrap();
    assert_eq!(jit.previous, Some(Permission::Read));
    let end = p
        .revoke_and_restore(&at(Permission::Admin), jit.previous)
        .await
        .unwrap();
    assert_eq!(
        end.result,
        RevokeResult::Restored {
            level: Permission::Read
        }
    );
    assert!(end.changed());
    assert_eq!(truth(&sim, &n, &principal, &target).as_deref(), Some("read"));

    // Held nothing; JIT write; on expiry it is deleted.
    clear(p.client(), &n, &principal, &target).await;
    let jit = p.grant(&at(Permission::Write), GrantMode::AtLeast).await.unwrap();
    assert_eq!(jit.previous, None);
    let end = p
        .revoke_and_restore(&at(Permission::Write), jit.previous)
        .await
        .unwrap();
    assert_eq!(end.result, RevokeResult::Revoked);
    assert_eq!(truth(&sim, &n, &principal, &target), None);

    // Changed by someone else in between: left alone.
    let jit = p.grant(&at(Permission::Write), GrantMode::AtLeast).await.unwrap();
    p.client()
        .set_explicit_permission(
            PermissionScope::Project {
                workspace: &n.ws,
                key: &n.project,
            },
            Holder::User(&n.user_uuid),
            "create-repo",
        )
        .await
        .unwrap();
    let end = p
        .revoke_and_restore(&at(Permission::Write), jit.previous)
        .await
        .unwrap();
    assert_eq!(
        end.result,
        RevokeResult::ChangedExternally {
            held: Some(Permission::CreateRepo)
        }
    );
    assert!(!end.changed());
    assert!(end.message().starts_with("changed externally"), "{}", end.message());
    assert_eq!(truth(&sim, &n, &principal, &target).as_deref(), Some("create-repo"));

    // A grant that changed nothing (admin already held) restores nothing.
    p.grant(&at(Permission::Admin), GrantMode::Exact).await.unwrap();
    let jit = p.grant(&at(Permission::Write), GrantMode::AtLeast).await.unwrap();
    assert_eq!(
        jit.result,
        GrantResult::AlreadySatisfied {
            held: Permission::Admin
        }
    );
    let end = p
        .revoke_and_restore(&at(Permission::Write), jit.previous)
        .await
        .unwrap();
    assert_eq!(
        end.result,
        RevokeResult::LeftInPlace {
            held: Permission::Admin
        }
    );
    assert_eq!(truth(&sim, &n, &principal, &target).as_deref(), Some("admin"));

    // Overlapping grants: read before, A = write, B = admin. Ending A while B
    // lasts keeps admin; ending B then restores read.
    p.grant(&at(Permission::Read), GrantMode::Exact).await.unwrap();
    let before = Some(Permission::Read);
    let a = p.grant(&at(Permission::Write), GrantMode::AtLeast).await.unwrap();
    assert_eq!(a.previous, before);
    p.grant(&at(Permission::Admin), GrantMode::AtLeast).await.unwrap();
    let end_a = p
        .revoke_and_restore(&at(Permission::Write), level_to_restore(before, &[Permission::Admin]))
        .await
        .unwrap();
    assert_eq!(
        end_a.result,
        RevokeResult::LeftInPlace {
            held: Permission::Admin
        }
    );
    assert_eq!(truth(&sim, &n, &principal, &target).as_deref(), Some("admin"));
    let end_b = p
        .revoke_and_restore(&at(Permission::Admin), level_to_restore(before, &[]))
        .await
        .unwrap();
    assert_eq!(
        end_b.result,
        RevokeResult::Restored {
            level: Permission::Read
        }
    );
    assert_eq!(truth(&sim, &n, &principal, &target).as_deref(), Some("read"));

    // Group membership: removed at expiry when the user was not a member before.
    let group_target = TargetRef::Group(n.target_group.clone());
    clear(p.client(), &n, &principal, &group_target).await;
    let member = request(&n, &principal, &group_target, Permission::Member);
    let jit = p.grant(&member, GrantMode::AtLeast).await.unwrap();
    let end = p.revoke_and_restore(&member, jit.previous).await.unwrap();
    assert_eq!(end.result, RevokeResult::Revoked);
    assert_eq!(truth(&sim, &n, &principal, &group_target), None);
}

// ---- refusals -------------------------------------------------------------------------

#[tokio::test]
async fn provisioning_disabled_is_refused_before_any_request() {
    let sim = start(SimConfig::default()).await;
    let n = names(&sim.organisation());
    let p = Provisioner::new(client(&sim), false);
    let req = request(&n, &user(&n), &TargetRef::Project(n.project.clone()), Permission::Admin);
    for result in [
        p.grant(&req, GrantMode::AtLeast).await.map(|_| ()),
        p.revoke(&req).await.map(|_| ()),
        p.revoke_and_restore(&req, None).await.map(|_| ()),
    ] {
        let err = result.unwrap_err();
        assert!(matches!(err, ProvisionError::ProvisioningDisabled), "{err}");
        assert_eq!(err.reason(), "ProvisioningDisabled");
        assert!(err.to_string().contains("BATON_PROVISIONING"), "{err}");
    }
    assert_eq!(p.client().request_count(), 0);
    assert_eq!(sim.stats().total, 0);
}

#[tokio::test]
async fn unknown_or_unprovisionable_access_is_refused_with_typed_reasons() {
    let sim = start(SimConfig::default()).await;
    let n = names(&sim.organisation());
    let p = provisioner(&sim);
    let before = serde_json::to_value(sim.organisation()).unwrap();
    let project = TargetRef::Project(n.project.clone());
    let cases: Vec<(AccessRequest, &str)> = vec![
        (
            request(
                &n,
                &PrincipalRef::User(n.outsider_nick.clone()),
                &project,
                Permission::Read,
            ),
            "NotWorkspaceMember",
        ),
        (
            request(
                &n,
                &PrincipalRef::User("nobody-at-all".into()),
                &project,
                Permission::Read,
            ),
            "NotWorkspaceMember",
        ),
        (
            request(
                &n,
                &PrincipalRef::Group("no-such-group".into()),
                &project,
                Permission::Read,
            ),
            "PrincipalNotFound",
        ),
        (
            request(&n, &user(&n), &TargetRef::Project("NOPE".into()), Permission::Read),
            "TargetNotFound",
        ),
        (
            request(
                &n,
                &user(&n),
                &TargetRef::Repository("no-repo".into()),
                Permission::Read,
            ),
            "TargetNotFound",
        ),
        (
            request(&n, &user(&n), &TargetRef::Group("no-group".into()), Permission::Member),
            "TargetNotFound",
        ),
        (
            AccessRequest::new("no-such-workspace", user(&n), project.clone(), Permission::Read),
            "TargetNotFound",
        ),
        (
            request(&n, &user(&n), &TargetRef::Workspace, Permission::Member),
            "NotProvisionable",
        ),
        (
            request(
                &n,
                &group(&n),
                &TargetRef::Group(n.target_group.clone()),
                Permission::Member,
            ),
            "NotProvisionable",
        ),
        (
            request(
                &n,
                &user(&n),
                &TargetRef::Repository(n.repo.clone()),
                Permission::CreateRepo,
            ),
            "InvalidPermission",
        ),
        // Bitbucket refuses explicit permissions for workspace owners.
        (
            request(
                &n,
                &PrincipalRef::User(n.owner_nick.clone()),
                &project,
                Permission::Write,
            ),
            "Conflict",
        ),
    ];
    for (req, reason) in cases {
        let err = p.grant(&req, GrantMode::AtLeast).await.unwrap_err();
        assert_eq!(err.reason(), reason, "{req:?}: {err}");
        if reason == "NotWorkspaceMember" {
            assert!(err.to_string().contains("invite"), "{err}");
        }
        if reason == "Conflict" {
            assert!(err.to_string().contains("owner"), "Bitbucket's message is kept: {err}");
        }
        if reason == "NotProvisionable" && req.target == TargetRef::Workspace {
            assert!(err.to_string().contains("no 2.0 API"), "{err}");
        }
    }
    assert_eq!(
        serde_json::to_value(sim.organisation()).unwrap(),
        before,
        "nothing changed"
    );
}

#[tokio::test]
async fn leftover_permissions_of_former_members_can_be_revoked_by_uuid() {
    // An explicit repository permission held by someone who is not (or no
    // longer) a member of the workspace: the simulator generates a few, as
    // Bitbucket keeps them. Pick a seed whose organisation has one.
    let leftover = |org: &Organisation| {
        org.workspaces.iter().find_map(|w| {
            w.repositories.iter().find_map(|r| {
                r.user_permissions
                    .iter()
                    .find(|g| g.permission != "none" && !w.members.iter().any(|m| m.user_uuid == g.principal))
                    .map(|g| {
                        (
                            w.slug.clone(),
                            r.slug.clone(),
                            g.principal.clone(),
                            g.permission.clone(),
                        )
                    })
            })
        })
    };
    let config = (1..200)
        .map(|seed| SimConfig {
            seed,
            repositories: 80,
            ..SimConfig::default()
        })
        .find(|config| leftover(&Organisation::generate(config)).is_some())
        .expect("the simulator generates leftover grants of former members");
    let sim = start(config).await;
    let (ws, slug, uuid, level) = leftover(&sim.organisation()).unwrap();
    let level = bitbucket_operator::provision::parse_level(&level).unwrap().unwrap();
    let p = provisioner(&sim);
    let req = AccessRequest::new(
        ws.clone(),
        PrincipalRef::User(uuid.clone()),
        TargetRef::Repository(slug.clone()),
        level,
    );

    // Granting to a non-member is refused...
    let err = p.grant(&req, GrantMode::AtLeast).await.unwrap_err();
    assert_eq!(err.reason(), "NotWorkspaceMember");
    // ...but the leftover permission can be revoked by UUID.
    let outcome = p.revoke(&req).await.unwrap();
    assert_eq!(outcome.result, RevokeResult::Revoked);
    assert_eq!(outcome.previous, Some(level));
    let org = sim.organisation();
    let repository = org
        .workspaces
        .iter()
        .find(|w| w.slug == ws)
        .unwrap()
        .repositories
        .iter()
        .find(|r| r.slug == slug)
        .unwrap();
    assert!(!repository.user_permissions.iter().any(|g| g.principal == uuid));
}

// ---- store refresh ------------------------------------------------------------------------

#[tokio::test]
async fn store_refresh_equals_what_a_fresh_sync_stores() {
    let sim = start(SimConfig::default()).await;
    let n = names(&sim.organisation());
    let store = Arc::new(Store::open_in_memory().unwrap());
    let engine = SyncEngine::new(client(&sim), vec![n.ws.clone()]);
    let sync_all = |connector: &'static str| {
        let (engine, store) = (engine.clone(), Arc::clone(&store));
        async move {
            let scope = engine.connect().await.unwrap();
            for kind in [SyncKind::Groups, SyncKind::Projects, SyncKind::Repositories] {
                run_into_store(&engine, &store, connector, kind, &scope).await.unwrap();
            }
        }
    };
    sync_all("prov").await;
    let refreshed = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = Arc::clone(&refreshed);
    let hook = AfterRefresh(Arc::new(move |kind| seen.lock().unwrap().push(kind)));
    let p = provisioner(&sim).with_inventory(Arc::new(
        StoreInventory::new(Arc::clone(&store), "prov").after_refresh(hook),
    ));
    let cases = [
        (user(&n), TargetRef::Project(n.project.clone()), Permission::CreateRepo),
        (group(&n), TargetRef::Repository(n.repo.clone()), Permission::Write),
        (user(&n), TargetRef::Group(n.target_group.clone()), Permission::Member),
    ];
    let mut resources = Vec::new();
    for (principal, target, level) in &cases {
        clear(p.client(), &n, principal, target).await;
        let outcome = p
            .grant(&request(&n, principal, target, *level), GrantMode::Exact)
            .await
            .unwrap();
        assert!(
            matches!(outcome.store, Some(StoreRefresh::Refreshed { .. })),
            "{outcome:?}"
        );
        // The store shows the new grant right away.
        let held = store.grants_on("prov", &outcome.target.resource_id).unwrap();
        assert!(
            held.iter()
                .any(|h| h.grant.principal_id == outcome.principal.id && h.slug == level.as_str()),
            "{outcome:?}"
        );
        resources.push(outcome.target.resource_id.clone());
    }
    assert_eq!(
        *refreshed.lock().unwrap(),
        [SyncKind::Projects, SyncKind::Repositories, SyncKind::Groups],
        "the operator hears which type each change refreshed"
    );
    // A revoke refreshes too.
    let (principal, target, level) = &cases[0];
    let revoked = p.revoke(&request(&n, principal, target, *level)).await.unwrap();
    assert!(matches!(revoked.store, Some(StoreRefresh::Refreshed { .. })));
    assert!(
        !store
            .grants_on("prov", &revoked.target.resource_id)
            .unwrap()
            .iter()
            .any(|h| h.grant.principal_id == n.user_uuid)
    );

    sync_all("fresh").await;
    for id in resources {
        let grants = |connector| {
            store
                .grants_on(connector, &id)
                .unwrap()
                .into_iter()
                .map(|h| h.grant)
                .collect::<Vec<_>>()
        };
        assert!(!grants("fresh").is_empty());
        assert_eq!(grants("prov"), grants("fresh"), "grants on {id}");
    }
    // A resource the store never synced is skipped, and the grant stands.
    let unsynced = provisioner(&sim).with_store(Arc::clone(&store), "never-synced");
    let outcome = unsynced
        .grant(
            &request(&n, &user(&n), &TargetRef::Project(n.project.clone()), Permission::Read),
            GrantMode::Exact,
        )
        .await
        .unwrap();
    assert!(
        matches!(outcome.store, Some(StoreRefresh::Skipped { .. })),
        "{outcome:?}"
    );
    assert_eq!(
        truth(&sim, &n, &user(&n), &TargetRef::Project(n.project.clone())).as_deref(),
        Some("read")
    );
}

// ---- the CLI --------------------------------------------------------------------------------

fn bin() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_bitbucket-operator"));
    for key in [
        "BATON_USERNAME",
        "BATON_APP_PASSWORD",
        "BATON_TOKEN",
        "BATON_CONSUMER_KEY",
        "BATON_CONSUMER_SECRET",
        "BATON_WORKSPACES",
        "BATON_PROVISIONING",
        "BITBUCKET_API_URL",
    ] {
        cmd.env_remove(key);
    }
    cmd
}

#[test]
fn cli_grants_revokes_and_refuses_with_exit_codes() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let sim = rt.block_on(start(SimConfig::default()));
    let n = names(&sim.organisation());
    let repo = TargetRef::Repository(n.repo.clone());
    rt.block_on(clear(&client(&sim), &n, &user(&n), &repo));
    let creds = sim.credentials().clone();
    let cli = |args: &[&str], provisioning: bool| {
        let mut cmd = bin();
        cmd.args(args)
            .args(["--api-url", &sim.base_url(), "--workspace", &n.ws])
            .env("BATON_USERNAME", &creds.email)
            .env("BATON_APP_PASSWORD", &creds.api_token);
        if provisioning {
            cmd.env("BATON_PROVISIONING", "true");
        }
        let out = cmd.output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!stderr.contains(&creds.api_token), "the token is never printed");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr,
        )
    };

    let (code, stdout, stderr) = cli(
        &[
            "grant",
            "--user",
            &n.user_nick,
            "--repository",
            &n.repo,
            "--permission",
            "write",
        ],
        true,
    );
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(
        stdout.trim(),
        format!(
            "granted write on repository {}/{} to user {} (previously nothing)",
            n.ws, n.repo, n.user_nick
        )
    );
    assert_eq!(truth(&sim, &n, &user(&n), &repo).as_deref(), Some("write"));

    // Again: already held, still exit 0.
    let (code, stdout, _) = cli(
        &[
            "grant",
            "--user",
            &n.user_nick,
            "--repository",
            &n.repo,
            "--permission",
            "write",
        ],
        true,
    );
    assert_eq!(code, Some(0));
    assert!(stdout.starts_with("already held"), "{stdout}");

    // Revoke with --json and the explicit flag instead of BATON_PROVISIONING.
    let (code, stdout, stderr) = cli(
        &[
            "revoke",
            "--user",
            &n.user_nick,
            "--repository",
            &n.repo,
            "--permission",
            "write",
            "--json",
            "--allow-provisioning",
        ],
        false,
    );
    assert_eq!(code, Some(0), "{stderr}");
    let json: serde_json::Value = serde_json::from_str(stdout.trim()).expect("one JSON object");
    assert_eq!(json["ok"], true);
    assert_eq!(json["result"], "revoked");
    assert_eq!(json["previous"], "write");
    assert_eq!(json["principal"]["key"], n.user_uuid.as_str());
    assert_eq!(truth(&sim, &n, &user(&n), &repo), None);

    // Refused: provisioning not enabled (6), not a workspace member (4), bad level (2).
    let (code, _, stderr) = cli(
        &[
            "grant",
            "--user",
            &n.user_nick,
            "--repository",
            &n.repo,
            "--permission",
            "admin",
        ],
        false,
    );
    assert_eq!(code, Some(6), "{stderr}");
    assert!(stderr.contains("provisioning is disabled"), "{stderr}");
    assert_eq!(truth(&sim, &n, &user(&n), &repo), None);
    let (code, stdout, _) = cli(
        &[
            "grant",
            "--user",
            &n.outsider_nick,
            "--repository",
            &n.repo,
            "--permission",
            "read",
            "--json",
        ],
        true,
    );
    assert_eq!(code, Some(4));
    let json: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(json["reason"], "NotWorkspaceMember");
    let (code, _, _) = cli(
        &[
            "grant",
            "--user",
            &n.user_nick,
            "--repository",
            &n.repo,
            "--permission",
            "create-repo",
        ],
        true,
    );
    assert_eq!(code, Some(2));
    rt.block_on(sim.shutdown());
}
