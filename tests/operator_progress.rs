//! `status.progress` of a `BitbucketConnector` against the API double and a
//! slow simulator: per-type progress appears while a sync runs, is cleared
//! when it ends, and its status writes stay bounded.

pub mod support;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bitbucket_operator::controller::{Operator, wait_for};
use bitbucket_operator::egress::{EgressArgs, EgressPolicy};
use bitbucket_operator::metrics::Metrics;
use bitbucket_operator::simulator::{SimConfig, Simulator};
use bitbucket_operator::store::Store;
use serde_json::{Value, json};
use support::fake_kube::FakeKube;
use tokio::sync::watch;

const API: &str = "connectors.dev/v1alpha1";
const KIND: &str = "BitbucketConnector";
const NS: &str = "identity";
const KINDS: [&str; 5] = ["accounts", "workspaces", "groups", "projects", "repositories"];

/// Every `status.progress` the operator wrote for `name`, in order.
fn progress_written(kube: &FakeKube, name: &str) -> Vec<Option<Value>> {
    kube.requests()
        .iter()
        .filter(|r| r.method == "PATCH" && r.path.ends_with(&format!("/{name}/status")))
        .map(|r| r.json()["status"].get("progress").cloned())
        .collect()
}

fn kinds_of(progress: &Value) -> BTreeSet<&'static str> {
    KINDS.into_iter().filter(|k| progress.get(*k).is_some()).collect()
}

fn seconds(time: &Value) -> i64 {
    let text = time.as_str().expect("a timestamp");
    text.parse::<jiff::Timestamp>().expect("RFC 3339").as_second()
}

#[tokio::test]
async fn a_slow_sync_shows_per_type_progress_in_status_and_clears_it_with_bounded_writes() {
    let kube = FakeKube::start().await;
    let sim = Simulator::start(
        SimConfig {
            repositories: 60,
            latency: Duration::from_millis(25),
            ..SimConfig::default()
        },
        SocketAddr::from(([127, 0, 0, 1], 0)),
    )
    .await
    .unwrap();
    let store = Arc::new(Store::open_in_memory().unwrap());
    let policy: EgressPolicy = EgressArgs {
        allowed_api_urls: vec![sim.base_url()],
        ..EgressArgs::default()
    }
    .policy()
    .unwrap();
    let operator = Arc::new(Operator::new(
        kube.client(),
        Arc::clone(&store),
        Arc::new(Metrics::default()),
        vec![],
        policy,
    ));
    let period = Duration::from_secs(1);
    operator.manager.set_progress_period(period);
    let (stop, stopped) = watch::channel(false);
    let task = tokio::spawn({
        let operator = Arc::clone(&operator);
        async move { operator.run_controllers(wait_for(stopped)).await }
    });

    let c = sim.credentials();
    kube.put(json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "bb", "namespace": NS, "labels": {"connectors.dev/bitbucket-credentials": "true"}},
        "type": "Opaque",
        "stringData": {"BATON_USERNAME": c.email, "BATON_APP_PASSWORD": c.api_token},
    }));
    let started = Instant::now();
    // One request in flight at 25 ms each: a sync of a few seconds.
    kube.put(json!({
        "apiVersion": API, "kind": KIND,
        "metadata": {"name": "acme", "namespace": NS},
        "spec": {"secretRef": {"name": "bb"}, "apiUrl": sim.base_url(), "interval": "1h",
                 "rateLimit": {"maxInFlight": 1}},
    }));
    let ready = kube
        .wait_for(API, KIND, Some(NS), "acme", Duration::from_secs(60), |o| {
            o["status"]["state"] == "Connected"
        })
        .await;
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_secs(3),
        "the sync must be slow enough to watch: {elapsed:?}"
    );

    // Cleared at the end.
    assert!(ready["status"].get("progress").is_none(), "{}", ready["status"]);
    let written = progress_written(&kube, "acme");
    assert_eq!(written.last(), Some(&None), "the last write clears progress");

    // Seen during the run: repositories part-way, with a summary for the Progress column.
    let during: Vec<&Value> = written.iter().flatten().collect();
    let part_way = during.iter().find(|p| {
        let r = &p["repositories"];
        r["phase"] == "Syncing" && r["done"].as_i64() > Some(0) && r["done"].as_i64() < r["total"].as_i64()
    });
    let part_way = part_way.unwrap_or_else(|| panic!("no part-way repositories progress in {during:?}"));
    let summary = part_way["summary"].as_str().unwrap();
    assert!(
        summary.starts_with("repositories ") || summary.contains("+"),
        "{summary}"
    );
    assert!(
        part_way["repositories"]["estimatedCompletionTime"].is_string(),
        "{part_way}"
    );

    // Bounded: while the same types run, figures change at most once per period.
    for pair in during.windows(2) {
        if kinds_of(pair[0]) == kinds_of(pair[1]) && pair[0] != pair[1] {
            let gap = seconds(&pair[1]["lastUpdateTime"]) - seconds(&pair[0]["lastUpdateTime"]);
            assert!(
                gap >= 1,
                "progress rewritten after {gap} s: {} then {}",
                pair[0],
                pair[1]
            );
        }
    }
    // Each type starts and ends once (two writes), the rest is one per period at most.
    let limit = elapsed.as_secs() as usize / period.as_secs() as usize + 2 * KINDS.len() + 2;
    assert!(
        written.len() <= limit,
        "{} status writes in {elapsed:?} (limit {limit})",
        written.len()
    );

    let _ = stop.send(true);
    tokio::time::timeout(Duration::from_secs(30), task)
        .await
        .unwrap()
        .unwrap();
    sim.shutdown().await;
}
