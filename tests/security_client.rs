//! Attacks on the Bitbucket client from a hostile (or broken) server and from
//! another tenant, each against a real HTTP server on loopback: a huge or
//! endless body, endless `next` links, and a rate-limiter takeover through a
//! shared username.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use bitbucket_operator::bitbucket::{
    Client, ClientConfig, Credentials, DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_PAGES, ErrorKind, Limits,
};
use futures::{StreamExt, TryStreamExt};
use serde_json::json;

/// A hostile Bitbucket: counts the requests it answers.
#[derive(Clone)]
struct Hostile {
    base: String,
    requests: Arc<AtomicU64>,
}

async fn hostile() -> (Hostile, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .unwrap();
    let state = Hostile {
        base: format!("http://{}", listener.local_addr().unwrap()),
        requests: Arc::new(AtomicU64::new(0)),
    };
    let app = Router::new()
        .route("/2.0/user", get(endless_body))
        .route("/big/2.0/user", get(declared_huge))
        .route("/2.0/workspaces/{ws}/projects", get(endless_pages))
        .route("/ok/2.0/user", get(user))
        .with_state(state.clone());
    let server = tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (state, server)
}

/// A 200 whose JSON string never ends (chunked, no length).
async fn endless_body(State(s): State<Hostile>) -> Response {
    s.requests.fetch_add(1, Ordering::Relaxed);
    let head = futures::stream::iter([Ok::<_, Infallible>(bytes::Bytes::from_static(b"{\"uuid\":\""))]);
    let chunk = bytes::Bytes::from(vec![b'A'; 64 * 1024]);
    let tail = futures::stream::repeat_with(move || Ok::<_, Infallible>(chunk.clone()));
    Response::new(Body::from_stream(head.chain(tail)))
}

/// A 200 that declares (and sends) more than a small cap.
async fn declared_huge(State(s): State<Hostile>) -> Response {
    s.requests.fetch_add(1, Ordering::Relaxed);
    let body = format!("{{\"uuid\":\"{}\"}}", "B".repeat(4096));
    ([("content-type", "application/json")], body).into_response()
}

/// Every page has one project and a fresh `next` link: it never ends.
async fn endless_pages(
    State(s): State<Hostile>,
    axum::extract::Path(ws): axum::extract::Path<String>,
    Query(q): Query<std::collections::HashMap<String, String>>,
) -> Response {
    s.requests.fetch_add(1, Ordering::Relaxed);
    let page: u64 = q.get("page").and_then(|p| p.parse().ok()).unwrap_or(1);
    axum::Json(json!({
        "values": [{"uuid": format!("{{p{page}}}"), "key": format!("P{page}")}],
        "next": format!("{}/2.0/workspaces/{ws}/projects?pagelen=100&page={}", s.base, page + 1),
    }))
    .into_response()
}

async fn user(State(s): State<Hostile>) -> Response {
    s.requests.fetch_add(1, Ordering::Relaxed);
    axum::Json(json!({"uuid": "{victim}", "nickname": "victim"})).into_response()
}

/// Production defaults, except a limiter far above what the tests send, so
/// that only the caps under test can stop them.
fn config(base: &str) -> ClientConfig {
    let mut config = ClientConfig::new(base).unwrap();
    config.limits = Limits {
        max_requests: 1_000_000,
        window: Duration::from_secs(1),
        max_in_flight: 4,
    };
    config.backoff_base = Duration::from_millis(5);
    config.backoff_max = Duration::from_millis(20);
    config
}

fn token(value: &str) -> Credentials {
    Credentials::AccessToken { token: value.into() }
}

#[tokio::test]
async fn an_endless_body_ends_in_an_error_naming_the_cap_and_path() {
    let (server, task) = hostile().await;
    let client = Client::new(config(&server.base), token("t-endless")).unwrap();
    let err = tokio::time::timeout(Duration::from_secs(60), client.current_user())
        .await
        .expect("the client stops reading at the cap instead of reading for ever")
        .unwrap_err();
    assert_eq!(err.kind, ErrorKind::Invalid, "{err}");
    assert!(!err.is_retryable(), "an oversized body is not retried");
    let text = err.to_string();
    assert!(text.contains(&format!("{DEFAULT_MAX_BODY_BYTES}-byte cap")), "{text}");
    assert!(text.contains("/2.0/user"), "{text}");
    assert!(!text.contains("AAAA"), "the body is never echoed: {text}");
    assert_eq!(server.requests.load(Ordering::Relaxed), 1);
    task.abort();
}

#[tokio::test]
async fn a_declared_length_over_the_cap_is_refused_before_reading() {
    let (server, task) = hostile().await;
    let mut config = config(&format!("{}/big", server.base));
    config.max_body_bytes = 1024;
    let client = Client::new(config, token("t-declared")).unwrap();
    let err = client.current_user().await.unwrap_err();
    assert_eq!(err.kind, ErrorKind::Invalid);
    assert!(err.message.contains("1024-byte cap"), "{}", err.message);
    assert!(err.message.contains("/big/2.0/user"), "{}", err.message);
    assert!(!err.message.contains("BBBB"));
    // The same answer under the cap decodes.
    let mut roomy = ClientConfig::new(&format!("{}/big", server.base)).unwrap();
    roomy.max_body_bytes = 8192;
    let user = Client::new(roomy, token("t-declared"))
        .unwrap()
        .current_user()
        .await
        .unwrap();
    assert_eq!(user.uuid.len(), 4096);
    task.abort();
}

#[tokio::test]
async fn endless_next_links_stop_at_the_page_cap() {
    let (server, task) = hostile().await;
    let client = Client::new(config(&server.base), token("t-pages")).unwrap();
    let mut pages = 0u32;
    let stream = client.projects("acme");
    futures::pin_mut!(stream);
    let outcome = tokio::time::timeout(Duration::from_secs(120), async {
        loop {
            match stream.try_next().await {
                Ok(Some(page)) => {
                    assert_eq!(page.len(), 1);
                    pages += 1;
                }
                Ok(None) => return None,
                Err(err) => return Some(err),
            }
        }
    })
    .await
    .expect("the listing ends instead of following next links for ever");
    let err = outcome.expect("an endless listing is an error, not a silent truncation");
    assert_eq!(err.kind, ErrorKind::Invalid);
    assert!(err.message.contains("page cap"), "{}", err.message);
    assert!(err.message.contains("/2.0/workspaces/acme/projects"), "{}", err.message);
    assert_eq!(pages, DEFAULT_MAX_PAGES);
    assert_eq!(server.requests.load(Ordering::Relaxed), u64::from(DEFAULT_MAX_PAGES));
    task.abort();
}

#[tokio::test]
async fn a_configured_page_cap_is_exact() {
    let (server, task) = hostile().await;
    let mut config = config(&server.base);
    config.max_pages = 3;
    let client = Client::new(config, token("t-pages-3")).unwrap();
    let err = client.projects("acme").try_concat().await.unwrap_err();
    assert!(err.message.contains("after 3 pages"), "{}", err.message);
    assert_eq!(server.requests.load(Ordering::Relaxed), 3);
    task.abort();
}

#[tokio::test]
async fn another_tenant_with_the_same_username_cannot_throttle_the_victim() {
    let (server, task) = hostile().await;
    let base = format!("{}/ok", server.base);
    let username = "victim@example.com".to_owned();
    let victim = Client::new(
        config(&base),
        Credentials::ApiToken {
            username: username.clone(),
            token: "the-real-token".into(),
        },
    )
    .unwrap();
    // The attacker knows the username only; its connector asks for one
    // request per hour.
    let mut starve = config(&base);
    starve.limits = Limits {
        max_requests: 1,
        window: Duration::from_secs(3600),
        max_in_flight: 1,
    };
    let attacker = Client::new(
        starve,
        Credentials::ApiToken {
            username,
            token: "a-fake-token".into(),
        },
    )
    .unwrap();
    attacker.current_user().await.unwrap();
    let burst = async {
        for _ in 0..5 {
            victim.current_user().await.unwrap();
        }
    };
    tokio::time::timeout(Duration::from_secs(10), burst)
        .await
        .expect("the victim's requests are not held back by the attacker's budget");
    assert_eq!(victim.effective_limits().max_requests, 1_000_000);
    assert_eq!(attacker.effective_limits().max_requests, 1);
    task.abort();
}

#[tokio::test]
async fn the_same_credential_twice_gets_the_lowest_budget() {
    let (server, task) = hostile().await;
    let base = format!("{}/ok", server.base);
    let creds = || Credentials::ApiToken {
        username: "shared@example.com".into(),
        token: "one-real-token".into(),
    };
    let generous = Client::new(config(&base), creds()).unwrap();
    let mut careful = config(&base);
    careful.limits.max_requests = 2;
    careful.limits.window = Duration::from_secs(3600);
    let careful = Client::new(careful, creds()).unwrap();
    assert_eq!(generous.effective_limits().max_requests, 2, "the lowest budget wins");
    generous.current_user().await.unwrap();
    careful.current_user().await.unwrap();
    let third = tokio::time::timeout(Duration::from_millis(300), generous.current_user()).await;
    assert!(third.is_err(), "a third request within the hour waits");
    drop(careful);
    assert_eq!(
        generous.effective_limits().max_requests,
        1_000_000,
        "a dropped connector's budget stops counting"
    );
    task.abort();
}
