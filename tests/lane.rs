//! The provisioning lane end to end against the simulator: what one grant
//! or revoke costs in requests (the single-member lookup instead of the
//! member listing), and that provisioning is not held back by a sync that
//! spent its share of the budget, nor earlier than Bitbucket's Retry-After.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bitbucket_operator::bitbucket::{Client, ClientConfig, Credentials, Lane, Limits};
use bitbucket_operator::model::SyncKind;
use bitbucket_operator::provision::{
    AccessRequest, GrantMode, GrantResult, Permission, PrincipalRef, ProvisionError, Provisioner, RevokeResult,
    StoreRefresh, TargetRef,
};
use bitbucket_operator::simulator::{Organisation, SimConfig, Simulator, SimulatorHandle};
use bitbucket_operator::store::Store;
use bitbucket_operator::sync::{SyncEngine, run_into_store};

async fn start(config: SimConfig) -> SimulatorHandle {
    Simulator::start(config, SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .unwrap()
}

fn client(sim: &SimulatorHandle, limits: Limits) -> Client {
    let mut config = ClientConfig::new(&sim.base_url()).unwrap();
    config.limits = limits;
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

/// A workspace with several pages of members (so a listing costs more than
/// one request) and a plain member, an outsider and a repository in it.
struct Case {
    ws: String,
    member_pages: u64,
    user: bitbucket_operator::simulator::User,
    other: bitbucket_operator::simulator::User,
    outsider_uuid: String,
    repo: String,
}

fn case(org: &Organisation) -> Case {
    let ws = &org.workspaces[0];
    let user_of = |uuid: &str| org.users.iter().find(|u| u.uuid == uuid).unwrap().clone();
    let mut plain = ws.members.iter().filter(|m| !m.owner);
    let user = user_of(&plain.next().unwrap().user_uuid);
    let other = user_of(&plain.next().unwrap().user_uuid);
    let outsider = org
        .users
        .iter()
        .find(|u| !ws.members.iter().any(|m| m.user_uuid == u.uuid))
        .unwrap();
    Case {
        ws: ws.slug.clone(),
        member_pages: ws.members.len().div_ceil(100) as u64,
        user,
        other,
        outsider_uuid: outsider.uuid.clone(),
        repo: ws.repositories[0].slug.clone(),
    }
}

fn members_requests(sim: &SimulatorHandle) -> u64 {
    sim.stats().by_class.get("members").copied().unwrap_or(0)
}

fn repo_request(c: &Case, who: &str, permission: Permission) -> AccessRequest {
    AccessRequest::new(
        c.ws.clone(),
        PrincipalRef::User(who.to_owned()),
        TargetRef::Repository(c.repo.clone()),
        permission,
    )
}

/// Users with an explicit level on the case's repository, from the ground truth.
fn explicit_holders(sim: &SimulatorHandle, c: &Case) -> Vec<String> {
    let org = sim.organisation();
    let ws = org.workspaces.iter().find(|w| w.slug == c.ws).unwrap();
    let repo = ws.repositories.iter().find(|r| r.slug == c.repo).unwrap();
    let mut holders: Vec<String> = repo.user_permissions.iter().map(|p| p.principal.clone()).collect();
    holders.sort();
    holders.dedup();
    holders
}

fn big_workspace() -> SimConfig {
    SimConfig {
        workspaces: 1,
        users: 800,
        ..SimConfig::default()
    }
}

#[tokio::test]
async fn one_grant_by_uuid_or_account_id_looks_up_one_member_instead_of_listing() {
    let sim = start(big_workspace()).await;
    let c = case(&sim.organisation());
    assert!(c.member_pages >= 3, "the listing must cost several pages");
    let p = Provisioner::new(client(&sim, Limits::default()), true);
    assert_eq!(p.client().lane(), Lane::Provisioning);

    // Without a store: workspace, repository, the member, the level, the PUT.
    sim.reset_stats();
    let granted = p
        .grant(&repo_request(&c, &c.user.uuid, Permission::Admin), GrantMode::Exact)
        .await
        .unwrap();
    assert_eq!(granted.result, GrantResult::Granted);
    assert_eq!(granted.principal.id, c.user.uuid);
    assert_eq!(sim.stats().total, 5, "{:?}", sim.stats().by_class);
    assert_eq!(members_requests(&sim), 1);

    sim.reset_stats();
    let ended = p
        .revoke_and_restore(&repo_request(&c, &c.user.account_id, Permission::Admin), None)
        .await
        .unwrap();
    assert_eq!(ended.result, RevokeResult::Revoked);
    assert_eq!(sim.stats().total, 5, "{:?}", sim.stats().by_class);
    assert_eq!(members_requests(&sim), 1);

    // A nickname with nothing else to go by: the listing, every page.
    sim.reset_stats();
    p.grant(&repo_request(&c, &c.user.nickname, Permission::Read), GrantMode::Exact)
        .await
        .unwrap();
    assert_eq!(members_requests(&sim), c.member_pages);
    assert_eq!(sim.stats().total, 4 + c.member_pages);
    sim.shutdown().await;
}

#[tokio::test]
async fn a_404_from_the_member_lookup_means_not_a_member() {
    let sim = start(big_workspace()).await;
    let c = case(&sim.organisation());
    let p = Provisioner::new(client(&sim, Limits::default()), true);
    sim.reset_stats();
    let err = p
        .grant(&repo_request(&c, &c.outsider_uuid, Permission::Read), GrantMode::Exact)
        .await
        .unwrap_err();
    assert!(matches!(err, ProvisionError::NotWorkspaceMember { .. }), "{err:?}");
    assert_eq!(members_requests(&sim), 1, "one lookup, no listing");
    assert_eq!(sim.stats().by_status.get(&404), Some(&1));
    assert!(!sim.stats().by_class.keys().any(|k| k.contains("permission")));
    sim.shutdown().await;
}

#[tokio::test]
async fn with_a_store_a_nickname_or_email_is_resolved_there_and_the_refresh_matches_a_sync() {
    let sim = start(big_workspace()).await;
    let c = case(&sim.organisation());
    let store = Arc::new(Store::open_in_memory().unwrap());
    let engine = SyncEngine::new(client(&sim, Limits::default()), vec![c.ws.clone()]);
    let sync_all = |connector: &'static str| {
        let (engine, store) = (engine.clone(), Arc::clone(&store));
        async move {
            let scope = engine.connect().await.unwrap();
            for kind in [SyncKind::Accounts, SyncKind::Repositories] {
                run_into_store(&engine, &store, connector, kind, &scope).await.unwrap();
            }
        }
    };
    sync_all("prov").await;
    let p = Provisioner::new(client(&sim, Limits::default()), true).with_store(Arc::clone(&store), "prov");

    for (who, level) in [
        (&c.user.nickname, Permission::Write),
        (&c.other.email, Permission::Read),
    ] {
        sim.reset_stats();
        let outcome = p.grant(&repo_request(&c, who, level), GrantMode::Exact).await.unwrap();
        assert!(
            matches!(outcome.store, Some(StoreRefresh::Refreshed { .. })),
            "{outcome:?}"
        );
        // The principal's lookup, then one lookup per other holder of a
        // level on the repository (the refresh flags non-members), or one
        // listing when there are many.
        let others = explicit_holders(&sim, &c)
            .into_iter()
            .filter(|h| *h != outcome.principal.id)
            .count() as u64;
        let expected = 1 + if others <= 8 { others } else { c.member_pages };
        assert_eq!(members_requests(&sim), expected, "{who}: {:?}", sim.stats().by_class);
        assert!(expected < c.member_pages, "the case must tell a lookup from a listing");
    }
    let (id, first) = {
        let outcome = p
            .revoke(&repo_request(&c, &c.other.email, Permission::Read))
            .await
            .unwrap();
        assert_eq!(outcome.result, RevokeResult::Revoked);
        (outcome.target.resource_id.clone(), outcome)
    };
    assert_eq!(first.principal.id, c.other.uuid);

    sync_all("fresh").await;
    let grants = |connector| {
        store
            .grants_on(connector, &id)
            .unwrap()
            .into_iter()
            .map(|h| h.grant)
            .collect::<Vec<_>>()
    };
    assert!(!grants("fresh").is_empty());
    assert_eq!(
        grants("prov"),
        grants("fresh"),
        "the refreshed grants equal a fresh sync's"
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn provisioning_proceeds_when_sync_has_spent_its_share_of_the_window() {
    let sim = start(SimConfig::default()).await;
    // 20 an hour with the default 10% reserve: sync may use 18.
    let limits = Limits {
        max_requests: 20,
        window: Duration::from_secs(3600),
        max_in_flight: 4,
    };
    let sync = client(&sim, limits);
    let provisioning = sync.for_lane(Lane::Provisioning);
    for _ in 0..18 {
        sync.current_user().await.unwrap();
    }
    let wait = sync.budget_wait().expect("sync has spent its share");
    assert!(wait > Duration::from_secs(3000), "{wait:?}");
    assert_eq!(provisioning.budget_wait(), None);
    let held = tokio::time::timeout(Duration::from_millis(300), sync.current_user()).await;
    assert!(held.is_err(), "a 19th sync request started inside the reserve");

    let clock = Instant::now();
    for _ in 0..2 {
        tokio::time::timeout(Duration::from_secs(10), provisioning.current_user())
            .await
            .expect("provisioning does not wait for the window")
            .unwrap();
    }
    assert!(clock.elapsed() < Duration::from_secs(10));
    assert_eq!(provisioning.request_count(), 2);
    assert_eq!(sim.stats().total, 20);
    assert_eq!(sim.stats().rate_limited, 0);
    sim.shutdown().await;
}

#[tokio::test]
async fn after_a_429_provisioning_waits_for_retry_after_and_then_goes_before_sync() {
    let sim = start(SimConfig::default()).await;
    let limits = Limits {
        max_requests: 1000,
        window: Duration::from_secs(3600),
        max_in_flight: 1,
    };
    let sync = client(&sim, limits);
    let provisioning = sync.for_lane(Lane::Provisioning);
    sim.throttle_for(Duration::from_secs(2));
    let clock = Instant::now();
    // A sync request meets the 429 and pauses everyone for Retry-After.
    let first = tokio::spawn({
        let sync = sync.clone();
        async move { sync.current_user().await.map(|_| Instant::now()) }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let later_sync: Vec<_> = (0..3)
        .map(|_| {
            let sync = sync.clone();
            tokio::spawn(async move { sync.current_user().await.map(|_| Instant::now()) })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let done = provisioning.current_user().await.map(|_| Instant::now()).unwrap();
    assert!(
        done.duration_since(clock) >= Duration::from_secs(2),
        "not before Retry-After"
    );
    // Even the sync request that met the 429 retries after it.
    let first = first.await.unwrap().unwrap();
    assert!(first >= done, "the throttled sync request went first");
    for task in later_sync {
        let at = task.await.unwrap().unwrap();
        assert!(at >= done, "a sync request waiting with it went first");
    }
    assert_eq!(provisioning.request_count(), 1, "no early probe");
    sim.shutdown().await;
}
