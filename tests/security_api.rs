//! Attacks on the data API, against the fake API server (TokenReview and
//! SubjectAccessReview) and a store synced from the simulator: junk-token
//! floods, tokens for another audience, unbounded listings, and TLS.

pub mod support;

use std::time::Duration;

use bitbucket_operator::api::{DataApiSettings, router};
use bitbucket_operator::http::tls::{TlsFiles, TlsListener};
use serde_json::Value;
use support::data_api::{CONNECTOR, NS, start};
use support::fake_kube::FakeKube;

fn token_reviews(kube: &FakeKube) -> Vec<Value> {
    kube.requests()
        .into_iter()
        .filter(|r| r.method == "POST" && r.path.ends_with("/tokenreviews"))
        .map(|r| r.json())
        .collect()
}

async fn get(http: &reqwest::Client, url: &str, token: &str) -> (u16, Value) {
    let response = http.get(url).bearer_auth(token).send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn a_junk_token_flood_costs_one_review_per_distinct_token() {
    let api = start(DataApiSettings {
        cache_entries: 64,
        max_concurrent: 256,
        ..DataApiSettings::default()
    })
    .await;
    let http = reqwest::Client::new();
    assert!(
        token_reviews(&api.kube).is_empty(),
        "no review before the first request"
    );

    // One junk token, 64 requests at once, over 16 different connector paths.
    let flood = (0..64).map(|i| {
        let url = format!("{}/api/v1/namespaces/{NS}/connectors/c{}/grants", api.base, i % 16);
        let http = http.clone();
        async move { get(&http, &url, "junk-token").await.0 }
    });
    let statuses = futures::future::join_all(flood).await;
    assert!(statuses.iter().all(|&s| s == 401), "{statuses:?}");
    assert_eq!(token_reviews(&api.kube).len(), 1, "one TokenReview for one junk token");

    // Many distinct junk tokens: one review each, and the caches stay capped.
    for i in 0..300 {
        let url = format!("{}/api/v1/namespaces/{NS}/connectors/{CONNECTOR}/grants", api.base);
        assert_eq!(get(&http, &url, &format!("junk-{i}")).await.0, 401);
    }
    assert_eq!(token_reviews(&api.kube).len(), 301);
    let (identities, permissions) = api.gate.cached_decisions();
    assert!(identities <= 64 && permissions <= 64, "{identities} {permissions}");
    assert_eq!(
        api.gate.reviews_sent().1,
        0,
        "no access review for a token that is not accepted"
    );

    // The reviewer still gets in, at the price of one review each.
    let url = format!("{}/api/v1/namespaces/{NS}/connectors/{CONNECTOR}/grants", api.base);
    for _ in 0..5 {
        assert_eq!(get(&http, &url, "reviewer-token").await.0, 200);
    }
    assert_eq!(api.gate.reviews_sent(), (302, 1));
}

#[tokio::test]
async fn tokens_are_reviewed_for_the_operator_audience_only() {
    let api = start(DataApiSettings::default()).await;
    let http = reqwest::Client::new();
    let url = format!("{}/api/v1/namespaces/{NS}/connectors/{CONNECTOR}/runs", api.base);
    assert_eq!(get(&http, &url, "reviewer-token").await.0, 200);
    let reviews = token_reviews(&api.kube);
    assert_eq!(
        reviews[0]["spec"]["audiences"],
        serde_json::json!(["bitbucket-operator"])
    );

    // A token for the API server (no audience of ours) is refused.
    api.kube.add_token("apiserver-token", "alice", &["auditors"]);
    api.kube.set_token_audiences("apiserver-token", &[]);
    let (status, body) = get(&http, &url, "apiserver-token").await;
    assert_eq!(status, 401);
    let message = body["message"].as_str().unwrap();
    assert!(message.contains("--audience bitbucket-operator"), "{message}");
    assert!(!message.contains("apiserver-token"), "never echo the token");

    // A configured audience is the one asked for.
    let custom = start(DataApiSettings {
        audience: "inventory.example.com".into(),
        ..DataApiSettings::default()
    })
    .await;
    custom
        .kube
        .set_token_audiences("reviewer-token", &["bitbucket-operator"]);
    let url = format!("{}/api/v1/namespaces/{NS}/connectors/{CONNECTOR}/runs", custom.base);
    assert_eq!(get(&http, &url, "reviewer-token").await.0, 401);
    custom.kube.add_token("scoped", "alice", &[]);
    custom.kube.set_token_audiences("scoped", &["inventory.example.com"]);
    assert_eq!(get(&http, &url, "scoped").await.0, 200);
}

#[tokio::test]
async fn listings_are_paged_with_limit_and_continue() {
    let api = start(DataApiSettings::default()).await;
    let http = reqwest::Client::new();
    let all = api.store.grants(&format!("{NS}/{CONNECTOR}")).unwrap();
    assert!(all.len() > 25, "the fixture should span several pages: {}", all.len());
    let first = format!(
        "{}/api/v1/namespaces/{NS}/connectors/{CONNECTOR}/grants?limit=10",
        api.base
    );

    let mut seen = Vec::new();
    let mut url = first.clone();
    let mut pages = 0;
    loop {
        let (status, body) = get(&http, &url, "reviewer-token").await;
        assert_eq!(status, 200, "{body}");
        let items = body["items"].as_array().unwrap();
        assert!(items.len() <= 10);
        seen.extend(items.iter().cloned());
        pages += 1;
        match body["metadata"]["continue"].as_str() {
            Some(token) => {
                assert_eq!(body["metadata"]["remainingItemCount"], all.len() - seen.len());
                url = format!("{first}&continue={token}");
            }
            None => break,
        }
    }
    assert_eq!(seen.len(), all.len(), "every grant once");
    assert_eq!(pages, all.len().div_ceil(10));

    // Without a limit a page is still bounded; junk limits and tokens are 400.
    let unbounded = format!("{}/api/v1/namespaces/{NS}/connectors/{CONNECTOR}/resources", api.base);
    let (_, body) = get(&http, &unbounded, "reviewer-token").await;
    assert!(body["items"].as_array().unwrap().len() <= 1000);
    for bad in ["?limit=0", "?limit=-1", "?continue=not-a-token"] {
        let (status, _) = get(&http, &format!("{unbounded}{bad}"), "reviewer-token").await;
        assert_eq!(status, 400, "{bad}");
    }

    // A token from one listing does not page another, and a new sync
    // expires it (410) rather than skipping or repeating items.
    let (_, body) = get(&http, &first, "reviewer-token").await;
    let token = body["metadata"]["continue"].as_str().unwrap().to_owned();
    let (status, _) = get(&http, &format!("{unbounded}?continue={token}"), "reviewer-token").await;
    assert_eq!(status, 410);
    api.sync().await;
    let (status, body) = get(&http, &format!("{first}&continue={token}"), "reviewer-token").await;
    assert_eq!(status, 410, "{body}");
}

#[tokio::test]
async fn the_data_api_serves_tls_with_a_given_certificate() {
    let api = start(DataApiSettings::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let generated = rcgen::generate_simple_self_signed(vec!["127.0.0.1".into(), "localhost".into()]).unwrap();
    let cert_pem = generated.cert.pem();
    let files = TlsFiles {
        cert: dir.path().join("tls.crt"),
        key: dir.path().join("tls.key"),
    };
    std::fs::write(&files.cert, &cert_pem).unwrap();
    std::fs::write(&files.key, generated.signing_key.serialize_pem()).unwrap();

    let state = api.state();
    let listener = TlsListener::bind("127.0.0.1:0".parse().unwrap(), files.clone())
        .await
        .unwrap();
    let addr = axum::serve::Listener::local_addr(&listener).unwrap();
    let server = tokio::spawn(async move { axum::serve(listener, router(state)).await.unwrap() });

    let trusted = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(cert_pem.as_bytes()).unwrap())
        .build()
        .unwrap();
    let url = format!("https://{addr}/api/v1/namespaces/{NS}/connectors/{CONNECTOR}/runs");
    let (status, body) = get(&trusted, &url, "reviewer-token").await;
    assert_eq!(status, 200, "{body}");
    assert!(body["items"].as_array().is_some_and(|runs| !runs.is_empty()));

    // An untrusting client and plain HTTP get nothing.
    assert!(reqwest::Client::new().get(&url).send().await.is_err());
    let plain = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let answered = plain
        .get(format!(
            "http://{addr}/api/v1/namespaces/{NS}/connectors/{CONNECTOR}/runs"
        ))
        .send()
        .await;
    assert!(answered.is_err() || !answered.unwrap().status().is_success());
    server.abort();

    // A key that is not PEM fails at startup, naming the file, not the content.
    std::fs::write(&files.key, "hunter2-not-a-key").unwrap();
    let err = TlsListener::bind("127.0.0.1:0".parse().unwrap(), files.clone())
        .await
        .err()
        .expect("a broken key is refused");
    let text = format!("{err:#}");
    assert!(text.contains("tls.key"), "{text}");
    assert!(!text.contains("hunter2"), "{text}");
}

#[tokio::test]
async fn a_renewed_certificate_is_served_without_a_restart() {
    let api = start(DataApiSettings::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let files = TlsFiles {
        cert: dir.path().join("tls.crt"),
        key: dir.path().join("tls.key"),
    };
    let issue = || {
        let generated = rcgen::generate_simple_self_signed(vec!["127.0.0.1".into()]).unwrap();
        std::fs::write(&files.cert, generated.cert.pem()).unwrap();
        std::fs::write(&files.key, generated.signing_key.serialize_pem()).unwrap();
        generated.cert.pem()
    };
    let first = issue();
    let state = api.state();
    let listener = TlsListener::bind_reloading_every(
        "127.0.0.1:0".parse().unwrap(),
        files.clone(),
        Duration::from_millis(100),
    )
    .await
    .unwrap();
    let addr = axum::serve::Listener::local_addr(&listener).unwrap();
    let server = tokio::spawn(async move { axum::serve(listener, router(state)).await.unwrap() });
    let url = format!("https://{addr}/api/v1/namespaces/{NS}/connectors/{CONNECTOR}/runs");
    let trusting = |pem: &str| {
        reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(pem.as_bytes()).unwrap())
            .build()
            .unwrap()
    };
    assert_eq!(get(&trusting(&first), &url, "reviewer-token").await.0, 200);

    // cert-manager renews: new key, new certificate, same files.
    tokio::time::sleep(Duration::from_millis(20)).await;
    let second = issue();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let renewed = trusting(&second).get(&url).bearer_auth("reviewer-token").send().await;
        if renewed.is_ok_and(|r| r.status() == 200) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the renewed certificate was never served"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        trusting(&first).get(&url).send().await.is_err(),
        "the old certificate is no longer served"
    );

    // A broken renewal keeps the last good certificate.
    std::fs::write(&files.key, "not a key").unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(get(&trusting(&second), &url, "reviewer-token").await.0, 200);
    server.abort();
}
