//! The data API as its users meet it: the access-review CSV paged to the
//! same rows the CLI exports, `access-of` paged, and the serving layer's
//! connection limits (slowloris, idle keep-alive, the cap on open
//! connections, clients that stop reading) and graceful shutdown.

pub mod support;

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use axum::Router;
use axum::routing::get;
use axum::serve::Listener;
use bitbucket_operator::access;
use bitbucket_operator::api::{CONTINUE_HEADER, REMAINING_HEADER};
use bitbucket_operator::http::conn::{ConnectionLimits, ConnectionMetrics, serve_connections};
use bitbucket_operator::http::tls::{TlsFiles, TlsListener};
use bitbucket_operator::http::{self, HttpState};
use bitbucket_operator::metrics::Metrics;
use bitbucket_operator::model::ResourceType;
use serde_json::Value;
use support::data_api::{CONNECTOR, NS, TOKEN, start_with_limits as start};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::oneshot;

/// `access grants --csv` of the same store file, as a reviewer runs it.
fn cli_csv(db: &std::path::Path) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_bitbucket-operator"))
        .args(["access", "--db", db.to_str().unwrap(), "--connector"])
        .arg(format!("{NS}/{CONNECTOR}"))
        .args(["--csv", "grants"])
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

fn header<'a>(response: &'a reqwest::Response, name: &str) -> Option<&'a str> {
    response.headers().get(name).map(|v| v.to_str().unwrap())
}

#[tokio::test]
async fn csv_pages_concatenate_to_exactly_the_cli_export() {
    let api = start(ConnectionLimits::default()).await;
    let http = reqwest::Client::new();
    let expected = cli_csv(&api.db);
    let (cli_header, cli_rows) = expected.split_once('\n').unwrap();
    let rows = cli_rows.lines().count();
    assert!(rows > 25, "the fixture should span several pages: {rows}");

    // Follow the `Link: <…>; rel="next"` of each page, checking that the
    // `X-Continue` token is the one in it.
    let mut url = api.url("grants.csv?limit=10");
    let mut pages = Vec::new();
    loop {
        let response = http.get(&url).bearer_auth(TOKEN).send().await.unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(header(&response, "content-type"), Some("text/csv; charset=utf-8"));
        let next = header(&response, "link").map(str::to_owned);
        let token = header(&response, CONTINUE_HEADER).map(str::to_owned);
        let remaining = header(&response, REMAINING_HEADER).map(|r| r.parse::<usize>().unwrap());
        let body = response.text().await.unwrap();
        let (page_header, page_rows) = body.split_once('\n').unwrap();
        assert_eq!(page_header, cli_header, "every page opens with the header row");
        assert!(page_rows.lines().count() <= 10);
        pages.push(page_rows.to_owned());
        let seen: usize = pages.iter().map(|p| p.lines().count()).sum();
        match (next, token, remaining) {
            (Some(next), Some(token), Some(remaining)) => {
                assert_eq!(remaining, rows - seen);
                let target = next
                    .strip_prefix('<')
                    .and_then(|n| n.strip_suffix(">; rel=\"next\""))
                    .unwrap_or_else(|| panic!("a Link header with rel=next: {next}"));
                assert!(target.ends_with(&format!("limit=10&continue={token}")), "{target}");
                url = format!("{}{target}", api.base);
            }
            (None, None, None) => break,
            other => panic!("the last page has none of the paging headers, others all: {other:?}"),
        }
    }
    assert_eq!(pages.len(), rows.div_ceil(10));
    assert_eq!(
        format!("{cli_header}\n{}", pages.concat()),
        expected,
        "the pages are the CLI's rows, in its order, quoted alike"
    );

    // Without a limit the same export comes in one page (it is under the
    // default page size), byte for byte.
    let whole = http.get(api.url("grants.csv")).bearer_auth(TOKEN).send().await.unwrap();
    assert!(header(&whole, CONTINUE_HEADER).is_none());
    assert_eq!(whole.text().await.unwrap(), expected);
}

#[tokio::test]
async fn an_expired_or_foreign_continue_token_on_the_csv_is_refused() {
    let api = start(ConnectionLimits::default()).await;
    let http = reqwest::Client::new();
    let get = |url: String| {
        let http = http.clone();
        async move {
            let response = http.get(url).bearer_auth(TOKEN).send().await.unwrap();
            let status = response.status().as_u16();
            (status, response.text().await.unwrap())
        }
    };
    let first = http
        .get(api.url("grants.csv?limit=5"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    let token = header(&first, CONTINUE_HEADER).unwrap().to_owned();
    assert_eq!(
        get(api.url(&format!("grants.csv?limit=5&continue={token}"))).await.0,
        200
    );

    // A token of the JSON listing does not page the CSV (other rows, other
    // order), junk is a 400, and a limit of 0 too.
    let json: Value = http
        .get(api.url("grants?limit=5"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let json_token = json["metadata"]["continue"].as_str().unwrap();
    assert_eq!(get(api.url(&format!("grants.csv?continue={json_token}"))).await.0, 410);
    assert_eq!(get(api.url("grants.csv?continue=junk")).await.0, 400);
    assert_eq!(get(api.url("grants.csv?limit=0")).await.0, 400);

    // A sync in between expires it, with the listings' message.
    api.sync().await;
    let (status, body) = get(api.url(&format!("grants.csv?limit=5&continue={token}"))).await;
    assert_eq!(status, 410, "{body}");
    let body: Value = serde_json::from_str(&body).unwrap();
    assert!(
        body["message"].as_str().unwrap().contains("list again without it"),
        "{body}"
    );
}

#[tokio::test]
async fn access_of_pages_the_repositories_and_repeats_the_rest() {
    let api = start(ConnectionLimits::default()).await;
    let http = reqwest::Client::new();
    let connector = format!("{NS}/{CONNECTOR}");
    // The user who reaches the most repositories (a workspace owner).
    let (user, expected) = api
        .store
        .resources(&connector, Some(ResourceType::User))
        .unwrap()
        .into_iter()
        .filter_map(|u| Some((u.id.clone(), access::access_of(&api.store, &connector, &u.id).ok()?)))
        .max_by_key(|(_, a)| a.repositories.len())
        .unwrap();
    let total = expected.repositories.len();
    assert!(total > 6, "the fixture's top user should span pages: {total}");

    let mut repositories = Vec::new();
    let mut token: Option<String> = None;
    loop {
        let mut query = vec![("user", user.clone()), ("limit", "4".to_owned())];
        query.extend(token.iter().map(|t| ("continue", t.clone())));
        let response = http
            .get(api.url("access-of"))
            .query(&query)
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let mut page: Value = response.json().await.unwrap();
        let metadata = page.as_object_mut().unwrap().remove("metadata").unwrap();
        let items = page["repositories"].as_array().unwrap().clone();
        assert!(items.len() <= 4);
        repositories.extend(items);
        let mut whole = serde_json::to_value(&expected).unwrap();
        whole["repositories"] = page["repositories"].clone();
        assert_eq!(page, whole, "user, workspaces, groups and projects on every page");
        match metadata["continue"].as_str() {
            Some(next) => {
                assert_eq!(metadata["remainingItemCount"], total - repositories.len());
                token = Some(next.to_owned());
            }
            None => break,
        }
    }
    assert_eq!(
        Value::Array(repositories),
        serde_json::to_value(&expected.repositories).unwrap()
    );
}

/// Reads until the server closes the connection; what it sent, and when.
async fn read_until_closed(stream: &mut (impl AsyncReadExt + Unpin), within: Duration) -> (Vec<u8>, Instant) {
    let mut received = Vec::new();
    tokio::time::timeout(within, stream.read_to_end(&mut received))
        .await
        .expect("the server closes the connection")
        .ok();
    (received, Instant::now())
}

/// [`serve_connections`] in a task, its figures uncounted.
fn spawn_serving<L: Listener>(
    listener: L,
    app: Router,
    limits: ConnectionLimits,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(serve_connections(
        listener,
        app,
        limits,
        ConnectionMetrics::default(),
        shutdown,
    ))
}

#[tokio::test]
async fn a_connection_that_never_finishes_its_request_is_closed_and_others_are_served() {
    let timeout = Duration::from_millis(400);
    let api = start(ConnectionLimits {
        header_read_timeout: timeout,
        ..ConnectionLimits::default()
    })
    .await;
    let addr = api.base.strip_prefix("http://").unwrap().to_owned();

    // Half a request line, then nothing.
    let mut slow = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let opened = Instant::now();
    slow.write_all(b"GET /api/v1/namespa").await.unwrap();

    // Meanwhile a normal request on another connection is answered.
    let http = reqwest::Client::new();
    let answered = http.get(api.url("runs")).bearer_auth(TOKEN).send().await.unwrap();
    assert_eq!(answered.status(), 200);

    let (_, closed) = read_until_closed(&mut slow, Duration::from_secs(10)).await;
    let held = closed - opened;
    assert!(held >= timeout - Duration::from_millis(50), "closed too soon: {held:?}");
    assert!(held < Duration::from_secs(5), "held for {held:?}");

    // A keep-alive connection idle after its response is closed as well.
    let mut idle = tokio::net::TcpStream::connect(&addr).await.unwrap();
    idle.write_all(
        format!(
            "GET /api/v1/namespaces/{NS}/connectors/{CONNECTOR}/runs HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {TOKEN}\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let (received, _) = read_until_closed(&mut idle, Duration::from_secs(10)).await;
    assert!(
        received.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&received)
    );
}

#[tokio::test]
async fn the_tls_listener_closes_a_connection_that_stalls_after_the_handshake() {
    let timeout = Duration::from_millis(400);
    let dir = tempfile::tempdir().unwrap();
    let generated = rcgen::generate_simple_self_signed(vec!["127.0.0.1".into()]).unwrap();
    let files = TlsFiles {
        cert: dir.path().join("tls.crt"),
        key: dir.path().join("tls.key"),
    };
    std::fs::write(&files.cert, generated.cert.pem()).unwrap();
    std::fs::write(&files.key, generated.signing_key.serialize_pem()).unwrap();
    let listener = TlsListener::bind("127.0.0.1:0".parse().unwrap(), files).await.unwrap();
    let addr = axum::serve::Listener::local_addr(&listener).unwrap();
    let app = Router::new().route("/ok", get(|| async { "ok" }));
    let limits = ConnectionLimits {
        header_read_timeout: timeout,
        ..ConnectionLimits::default()
    };
    let server = spawn_serving(listener, app, limits, std::future::pending());

    let mut roots = rustls::RootCertStore::empty();
    roots.add(generated.cert.der().clone()).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut slow = connector.connect(name, tcp).await.unwrap();
    let opened = Instant::now();
    slow.write_all(b"GET /o").await.unwrap();
    slow.flush().await.unwrap();

    let trusted = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(generated.cert.pem().as_bytes()).unwrap())
        .build()
        .unwrap();
    let answered = trusted.get(format!("https://{addr}/ok")).send().await.unwrap();
    assert_eq!(answered.text().await.unwrap(), "ok");

    let (_, closed) = read_until_closed(&mut slow, Duration::from_secs(10)).await;
    let held = closed - opened;
    assert!(
        held >= timeout - Duration::from_millis(50) && held < Duration::from_secs(5),
        "{held:?}"
    );
    server.abort();
}

#[tokio::test]
async fn shutdown_finishes_requests_in_flight_closes_idle_connections_and_is_bounded() {
    let arrived = Arc::new(tokio::sync::Notify::new());
    let release = Arc::new(tokio::sync::Notify::new());
    let app = Router::new().route(
        "/slow",
        get({
            let (arrived, release) = (Arc::clone(&arrived), Arc::clone(&release));
            move || async move {
                arrived.notify_one();
                release.notified().await;
                "finished"
            }
        }),
    );
    let serve = |app: Router, grace: Duration| async move {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let limits = ConnectionLimits {
            // Long: an idle connection must not wait for it at shutdown.
            header_read_timeout: Duration::from_secs(60),
            shutdown_grace: grace,
            ..ConnectionLimits::default()
        };
        let server = spawn_serving(listener, app, limits, async move {
            let _ = stopped.await;
        });
        (addr, stop, server)
    };

    let (addr, stop, server) = serve(app.clone(), Duration::from_secs(30)).await;
    let mut idle = tokio::net::TcpStream::connect(addr).await.unwrap();
    let in_flight = tokio::spawn(reqwest::get(format!("http://{addr}/slow")));
    arrived.notified().await;
    stop.send(()).unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "no new connections after shutdown began"
    );
    assert!(!server.is_finished(), "waits for the request in flight");
    release.notify_one();
    let response = in_flight.await.unwrap().unwrap();
    assert_eq!(response.text().await.unwrap(), "finished");
    tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .expect("shutdown completes despite the idle connection")
        .unwrap();
    let (received, _) = read_until_closed(&mut idle, Duration::from_secs(5)).await;
    assert!(received.is_empty(), "the idle connection is closed without a response");

    // A request that never finishes holds shutdown no longer than the grace.
    let (addr, stop, server) = serve(app, Duration::from_millis(300)).await;
    let _stuck = tokio::spawn(reqwest::get(format!("http://{addr}/slow")));
    arrived.notified().await;
    let stopping = Instant::now();
    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .unwrap()
        .unwrap();
    assert!(
        stopping.elapsed() >= Duration::from_millis(250),
        "{:?}",
        stopping.elapsed()
    );
}

#[tokio::test]
async fn the_data_api_stops_gracefully() {
    let mut api = start(ConnectionLimits::default()).await;
    let http = reqwest::Client::new();
    assert_eq!(
        http.get(api.url("runs"))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    api.stop.take().unwrap().send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(5), &mut api.server)
        .await
        .expect("the server stops; the client's pooled keep-alive connection does not hold it")
        .unwrap();
    assert!(http.get(api.url("runs")).bearer_auth(TOKEN).send().await.is_err());
}

/// A raw `GET` of `rest` under the connector's API path, as the reviewer;
/// `close` asks the server to close the connection after answering.
fn raw_get(rest: &str, close: bool) -> String {
    let connection = if close { "connection: close\r\n" } else { "" };
    format!(
        "GET /api/v1/namespaces/{NS}/connectors/{CONNECTOR}/{rest} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {TOKEN}\r\n{connection}\r\n"
    )
}

/// Polls `done` every 10 ms until it holds; panics with `what` after 10 s.
async fn eventually(what: &str, done: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn connections_beyond_the_cap_wait_in_the_backlog_while_the_probes_answer() {
    let api = start(ConnectionLimits {
        max_connections: 2,
        // Long: the idle connections must hold their slots for the test.
        header_read_timeout: Duration::from_secs(60),
        ..ConnectionLimits::default()
    })
    .await;
    let addr = api.base.strip_prefix("http://").unwrap().to_owned();
    // The probe listener (`run --probe-addr`, as the chart runs it), on a
    // free port: its own limits, whatever the data API's.
    let probe_addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let probe_server = tokio::spawn(http::serve_probes(
        probe_addr,
        HttpState {
            metrics: Arc::new(Metrics::default()),
            ready: Arc::new(AtomicBool::new(true)),
            // Ignored: the probe listener never serves the data API.
            api: Some(api.state()),
        },
        std::future::pending(),
    ));

    while tokio::net::TcpStream::connect(probe_addr).await.is_err() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // The flood: as many idle connections as the cap.
    let mut idle = Vec::new();
    for _ in 0..2 {
        idle.push(tokio::net::TcpStream::connect(&addr).await.unwrap());
    }
    eventually("both idle connections are accepted", || api.connections.open.get() == 2).await;

    // One more: the kernel completes its handshake, but it is not served.
    let mut waiting = tokio::net::TcpStream::connect(&addr).await.unwrap();
    waiting.write_all(raw_get("runs", true).as_bytes()).await.unwrap();
    let mut first = [0u8; 1];
    assert!(
        tokio::time::timeout(Duration::from_millis(500), waiting.read(&mut first))
            .await
            .is_err(),
        "a connection beyond the cap is not served"
    );
    assert_eq!(api.connections.open.get(), 2);
    assert!(api.connections.deferred.get() >= 1);

    // Meanwhile the probes and metrics answer on their own listener.
    for (path, expected) in [
        ("healthz", "ok"),
        ("readyz", "ready"),
        ("metrics", "bitbucket_operator_http_connections{listener=\"probes\"}"),
    ] {
        let probe = reqwest::get(format!("http://{probe_addr}/{path}")).await.unwrap();
        assert_eq!(probe.status(), 200, "{path}");
        let body = probe.text().await.unwrap();
        assert!(body.contains(expected), "{path}: {body}");
    }

    let data = reqwest::Client::new()
        .get(format!(
            "http://{probe_addr}/api/v1/namespaces/{NS}/connectors/{CONNECTOR}/runs"
        ))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(data.status(), 404, "the probe listener serves no data");

    // One of the flood closes: the waiting connection is served at once.
    drop(idle.pop());
    let (received, _) = read_until_closed(&mut waiting, Duration::from_secs(5)).await;
    assert!(
        received.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&received)
    );
    probe_server.abort();
}

#[tokio::test]
async fn a_client_that_stops_reading_is_cut_off_after_the_write_timeout_and_others_are_served() {
    let write_timeout = Duration::from_millis(300);
    let api = start(ConnectionLimits {
        write_timeout,
        // Long: only the write timeout may end the stalled connection.
        header_read_timeout: Duration::from_secs(60),
        ..ConnectionLimits::default()
    })
    .await;
    let addr: std::net::SocketAddr = api.base.strip_prefix("http://").unwrap().parse().unwrap();
    // No pooled connections: each closes after its response.
    let http = reqwest::Client::builder().pool_max_idle_per_host(0).build().unwrap();
    let export = http
        .get(api.url("grants.csv?limit=5000"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap()
        .len();
    eventually("the first client's connection closes", || {
        api.connections.open.get() == 0
    })
    .await;

    // Enough pipelined exports that their answers overflow both sockets'
    // buffers (the client's kept small), and a client that never reads.
    let requests = (8 << 20) / export + 1;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stalled = socket.connect(addr).await.unwrap();
    let sent = Instant::now();
    stalled
        .write_all(raw_get("grants.csv?limit=5000", false).repeat(requests).as_bytes())
        .await
        .unwrap();

    // Another client is served meanwhile.
    let runs = http.get(api.url("runs")).bearer_auth(TOKEN).send().await.unwrap();
    assert_eq!(runs.status(), 200);
    drop(runs);

    // The server gives up on the stalled connection and frees its slot...
    eventually("the stalled connection is closed", || api.connections.open.get() == 0).await;
    let held = sent.elapsed();
    assert!(held >= write_timeout, "closed before the write timeout: {held:?}");

    // ...and the client, reading at last, finds the end far short of all
    // the answers it asked for.
    let (received, _) = read_until_closed(&mut stalled, Duration::from_secs(5)).await;
    assert!(
        received.len() < requests * export,
        "{} of {} bytes",
        received.len(),
        requests * export
    );
}
