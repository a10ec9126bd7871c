//! The Bitbucket client against the simulator: pagination, retries, rate
//! limits, typed errors and OAuth, over real HTTP on loopback.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bitbucket_operator::bitbucket::{
    Client, ClientConfig, Credentials, EMAIL_HINT, EndpointClass, ErrorKind, Holder, Limits, MembershipChange,
    PermissionScope,
};
use bitbucket_operator::simulator::{RateLimit, SimConfig, Simulator, SimulatorHandle};
use futures::TryStreamExt;

fn loopback() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

async fn start(config: SimConfig) -> SimulatorHandle {
    Simulator::start(config, loopback()).await.expect("simulator starts")
}

fn api_token(sim: &SimulatorHandle) -> Credentials {
    let c = sim.credentials();
    Credentials::ApiToken {
        username: c.email.clone(),
        token: c.api_token.clone(),
    }
}

fn config(sim: &SimulatorHandle) -> ClientConfig {
    let mut config = ClientConfig::new(&sim.base_url()).unwrap();
    config.backoff_base = Duration::from_millis(10);
    config.backoff_max = Duration::from_millis(200);
    config
}

fn client(sim: &SimulatorHandle) -> Client {
    Client::new(config(sim), api_token(sim)).unwrap()
}

fn first_workspace(sim: &SimulatorHandle) -> String {
    sim.organisation().workspaces[0].slug.clone()
}

#[tokio::test]
async fn pagination_walks_every_page_following_next() {
    let sim = start(SimConfig {
        users: 450,
        workspaces: 1,
        ..SimConfig::default()
    })
    .await;
    let client = client(&sim);
    let ws = first_workspace(&sim);
    let expected = sim.organisation().workspaces[0].members.len();
    assert!(expected > 300, "fixture should span several pages, has {expected}");

    let pages: Vec<_> = client.workspace_members(&ws).try_collect().await.unwrap();
    let members: Vec<_> = pages.iter().flatten().collect();
    assert_eq!(members.len(), expected);
    assert_eq!(
        pages.len(),
        expected.div_ceil(100),
        "pagelen=100 gives the fewest pages"
    );
    assert!(pages.iter().all(|p| p.len() <= 100));
    let mut uuids: Vec<_> = members.iter().map(|m| m.user.uuid.clone()).collect();
    uuids.sort();
    uuids.dedup();
    assert_eq!(uuids.len(), expected, "no member twice, none missing");
    assert_eq!(client.request_count(), pages.len() as u64);
    assert_eq!(sim.stats().by_class.get("members").copied(), Some(pages.len() as u64));
    sim.shutdown().await;
}

#[tokio::test]
async fn listings_stream_page_by_page() {
    let sim = start(SimConfig {
        users: 350,
        workspaces: 1,
        ..SimConfig::default()
    })
    .await;
    let client = client(&sim);
    let ws = first_workspace(&sim);
    let stream = client.workspace_members(&ws);
    futures::pin_mut!(stream);
    let first = stream.try_next().await.unwrap().unwrap();
    assert_eq!(first.len(), 100);
    // Only one page has been fetched so far: the rest waits for the caller.
    assert_eq!(client.request_count(), 1);
    sim.shutdown().await;
}

#[tokio::test]
async fn rate_limited_request_waits_for_retry_after_then_succeeds() {
    let sim = start(SimConfig {
        rate_limit: Some(RateLimit {
            max_requests: 3,
            window: Duration::from_secs(2),
        }),
        ..SimConfig::default()
    })
    .await;
    // The client's own limiter is far above the simulator's, so the server
    // throttles and the client must honour Retry-After.
    let mut config = config(&sim);
    config.limits = Limits {
        max_requests: 10_000,
        window: Duration::from_secs(1),
        max_in_flight: 1,
    };
    let client = Client::new(config, api_token(&sim)).unwrap();
    let clock = Instant::now();
    for _ in 0..5 {
        client.current_user().await.expect("succeeds after waiting");
    }
    assert!(sim.stats().rate_limited >= 1, "the simulator throttled at least once");
    assert!(clock.elapsed() >= Duration::from_secs(1), "waited for Retry-After");
    sim.shutdown().await;
}

#[tokio::test]
async fn server_errors_are_retried_until_success() {
    let sim = start(SimConfig {
        fail_rate: 0.5,
        seed: 7,
        ..SimConfig::default()
    })
    .await;
    let mut config = config(&sim);
    config.max_retries = 12;
    let client = Client::new(config, api_token(&sim)).unwrap();
    let ws = first_workspace(&sim);
    for _ in 0..10 {
        client.workspace(&ws).await.expect("retries hide transient 5xx");
    }
    let stats = sim.stats();
    assert!(stats.injected_faults > 0, "faults were injected");
    assert_eq!(client.request_count(), 10 + stats.injected_faults);
    sim.shutdown().await;
}

#[tokio::test]
async fn server_errors_give_up_after_the_retry_budget() {
    let sim = start(SimConfig {
        fail_rate: 1.0,
        ..SimConfig::default()
    })
    .await;
    let mut config = config(&sim);
    config.max_retries = 2;
    let client = Client::new(config, api_token(&sim)).unwrap();
    let err = client.current_user().await.unwrap_err();
    assert_eq!(err.kind, ErrorKind::Server);
    assert!(matches!(err.status, Some(500..=599)));
    assert_eq!(client.request_count(), 3, "one try plus two retries");
    sim.shutdown().await;
}

#[tokio::test]
async fn client_errors_are_not_retried_and_are_typed() {
    let sim = start(SimConfig::default()).await;
    let ws = first_workspace(&sim);

    // 401: wrong token.
    let bad = Credentials::ApiToken {
        username: sim.credentials().email.clone(),
        token: "wrong".into(),
    };
    let client = Client::new(config(&sim), bad).unwrap();
    let err = client.current_user().await.unwrap_err();
    assert_eq!(
        (err.kind, err.status, err.class),
        (ErrorKind::Unauthorized, Some(401), EndpointClass::User)
    );
    assert!(!err.message.contains(EMAIL_HINT), "an email username needs no hint");
    assert_eq!(client.request_count(), 1);

    // 403: an access token cannot read permissions.
    let token = Credentials::AccessToken {
        token: sim.credentials().access_token.clone(),
    };
    let client = Client::new(config(&sim), token).unwrap();
    let project = sim.organisation().workspaces[0].projects[0].key.clone();
    let err = client
        .explicit_user_permissions(PermissionScope::Project {
            workspace: &ws,
            key: &project,
        })
        .try_concat()
        .await
        .unwrap_err();
    assert_eq!((err.kind, err.status), (ErrorKind::Forbidden, Some(403)));
    assert_eq!(err.class, EndpointClass::ProjectPermissions);
    assert!(!err.message.is_empty());
    assert_eq!(client.request_count(), 1);

    // 404: unknown workspace, with Bitbucket's message.
    let client = self::client(&sim);
    let err = client.workspace("no-such-workspace").await.unwrap_err();
    assert_eq!((err.kind, err.status), (ErrorKind::NotFound, Some(404)));
    assert!(err.to_string().contains("workspace"), "{err}");
    assert_eq!(client.request_count(), 1);

    // 410: the retired endpoint is never used by the client, but a 410 from
    // anywhere is final too: shown here through a listing of a removed path.
    sim.shutdown().await;
}

#[tokio::test]
async fn a_plain_username_gets_the_email_hint() {
    let sim = start(SimConfig::default()).await;
    let creds = Credentials::ApiToken {
        username: "jdoe".into(),
        token: sim.credentials().api_token.clone(),
    };
    let client = Client::new(config(&sim), creds).unwrap();
    let err = client.current_user().await.unwrap_err();
    assert_eq!(err.kind, ErrorKind::Unauthorized);
    assert!(err.message.contains(EMAIL_HINT), "{}", err.message);
    sim.shutdown().await;
}

#[tokio::test]
async fn an_html_404_body_does_not_break_parsing() {
    let sim = start(SimConfig::default()).await;
    // Under an unknown prefix every path is the simulator's HTML 404 page.
    let mut config = ClientConfig::new(&format!("{}/not-the-api", sim.base_url())).unwrap();
    config.backoff_base = Duration::from_millis(10);
    let client = Client::new(config, api_token(&sim)).unwrap();
    let err = client.current_user().await.unwrap_err();
    assert_eq!((err.kind, err.status), (ErrorKind::NotFound, Some(404)));
    assert!(
        !err.message.contains('<'),
        "no raw HTML in the message: {}",
        err.message
    );
    assert_eq!(client.request_count(), 1);
    sim.shutdown().await;
}

#[tokio::test]
async fn oauth_token_is_cached_refreshed_before_expiry_and_after_a_401() {
    let sim = start(SimConfig {
        oauth_token_ttl: Duration::from_secs(2),
        ..SimConfig::default()
    })
    .await;
    let c = sim.credentials();
    let creds = Credentials::OAuthConsumer {
        key: c.consumer_key.clone(),
        secret: c.consumer_secret.clone(),
    };
    let client = Client::new(config(&sim), creds).unwrap();
    let oauth = |sim: &SimulatorHandle| sim.stats().by_class.get("oauth").copied().unwrap_or(0);

    client.current_user().await.unwrap();
    client.current_user().await.unwrap();
    assert_eq!(oauth(&sim), 1, "the token is cached");

    // Past 50% of a 2 s lifetime the client refreshes before using it.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    client.current_user().await.unwrap();
    assert_eq!(oauth(&sim), 2, "refreshed before expiry");

    // A token revoked early answers 401: the client gets a new one, once.
    sim.revoke_oauth_tokens();
    client.current_user().await.expect("recovers with a fresh token");
    assert_eq!(oauth(&sim), 3);
    assert_eq!(sim.stats().by_status.get(&401).copied(), Some(1));
    sim.shutdown().await;
}

#[tokio::test]
async fn wrong_oauth_consumer_is_a_clear_error() {
    let sim = start(SimConfig::default()).await;
    let creds = Credentials::OAuthConsumer {
        key: "nope".into(),
        secret: "nope".into(),
    };
    let client = Client::new(config(&sim), creds).unwrap();
    let err = client.current_user().await.unwrap_err();
    assert_eq!(err.class, EndpointClass::OAuth);
    assert!(
        err.message.contains("OAuth consumer token exchange failed"),
        "{}",
        err.message
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn the_shared_limiter_keeps_a_burst_under_the_server_limit() {
    let limit = RateLimit {
        max_requests: 12,
        window: Duration::from_secs(1),
    };
    let sim = start(SimConfig {
        rate_limit: Some(limit),
        ..SimConfig::default()
    })
    .await;
    // Two independent clients with the same credential share one limiter.
    let limits = Limits {
        max_requests: 12,
        window: Duration::from_secs(1),
        max_in_flight: 8,
    };
    let mut cfg = config(&sim);
    cfg.limits = limits;
    let a = Client::new(cfg.clone(), api_token(&sim)).unwrap();
    let b = Client::new(cfg, api_token(&sim)).unwrap();
    let clock = Instant::now();
    let burst = |client: Client| async move {
        let calls = (0..15).map(|_| client.current_user());
        futures::future::try_join_all(calls).await
    };
    let (ra, rb) = tokio::join!(burst(a), burst(b));
    ra.unwrap();
    rb.unwrap();
    let stats = sim.stats();
    assert_eq!(stats.rate_limited, 0, "no 429: the limiter paced the burst");
    assert_eq!(stats.total, 30);
    // 30 requests at 12 per second need at least two full windows.
    assert!(clock.elapsed() >= Duration::from_secs(2), "{:?}", clock.elapsed());
    sim.shutdown().await;
}

#[tokio::test]
async fn credentials_can_be_swapped_without_a_new_client() {
    let sim = start(SimConfig::default()).await;
    let bad = Credentials::ApiToken {
        username: sim.credentials().email.clone(),
        token: "old".into(),
    };
    let client = Client::new(config(&sim), bad).unwrap();
    assert!(client.current_user().await.is_err());
    client.set_credentials(api_token(&sim));
    client
        .current_user()
        .await
        .expect("the new credentials apply to the next request");
    sim.shutdown().await;
}

#[tokio::test]
async fn permission_writes_and_group_membership_round_trip() {
    let sim = start(SimConfig::default()).await;
    let client = client(&sim);
    let org = sim.organisation();
    let ws = &org.workspaces[0];
    let repo = &ws.repositories[0];
    let project = &ws.projects[0];
    let member = ws.members.iter().find(|m| !m.owner).unwrap().user_uuid.clone();
    let group = ws.groups[0].slug.clone();

    let repository = PermissionScope::Repository {
        workspace: &ws.slug,
        slug: &repo.slug,
    };
    let granted = client
        .set_explicit_permission(repository, Holder::User(&member), "write")
        .await
        .unwrap();
    assert_eq!(granted.as_deref(), Some("write"));
    let read = client
        .explicit_permission(repository, Holder::User(&member))
        .await
        .unwrap();
    assert_eq!(read.as_deref(), Some("write"));
    client
        .delete_explicit_permission(repository, Holder::User(&member))
        .await
        .unwrap();
    let err = client
        .explicit_permission(repository, Holder::User(&member))
        .await
        .unwrap_err();
    assert_eq!(err.kind, ErrorKind::NotFound, "no explicit grant left");

    let project = PermissionScope::Project {
        workspace: &ws.slug,
        key: &project.key,
    };
    let granted = client
        .set_explicit_permission(project, Holder::Group(&group), "create-repo")
        .await
        .unwrap();
    assert_eq!(granted.as_deref(), Some("create-repo"));
    let groups: Vec<_> = client.explicit_group_permissions(project).try_concat().await.unwrap();
    assert!(
        groups
            .iter()
            .any(|g| g.group.slug == group && g.permission.as_deref() == Some("create-repo"))
    );
    let err = client
        .set_explicit_permission(project, Holder::Group(&group), "owner")
        .await
        .unwrap_err();
    assert_eq!(err.kind, ErrorKind::BadRequest);

    let outsider = ws.groups[0].members.first().cloned();
    if let Some(existing) = outsider {
        assert_eq!(
            client.add_group_member(&ws.slug, &group, &existing).await.unwrap(),
            MembershipChange::AlreadyMember,
            "409 means already a member"
        );
        client.remove_group_member(&ws.slug, &group, &existing).await.unwrap();
        assert_eq!(
            client.add_group_member(&ws.slug, &group, &existing).await.unwrap(),
            MembershipChange::Added
        );
    }
    let one = client.workspace_member(&ws.slug, &member).await.unwrap();
    assert_eq!(one.user.uuid, member);
    let err = client
        .workspace_member(&ws.slug, "{00000000-0000-0000-0000-000000000000}")
        .await
        .unwrap_err();
    assert_eq!(err.kind, ErrorKind::NotFound, "not a member");

    let groups = client.groups(&ws.slug).await.unwrap();
    assert_eq!(groups.len(), ws.groups.len());
    sim.shutdown().await;
}
