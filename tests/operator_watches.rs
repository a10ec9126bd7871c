//! The operator's connector watches with `--watch-namespaces a,b,c`: one
//! watch per namespace, shared by the connector controllers, the grant
//! controllers and readiness (`src/controller/watches.rs`), not one per
//! consumer and namespace (N + N² before). Counted on the in-process fake
//! Kubernetes API, which records every request; grants are checked against
//! the Bitbucket simulator.

pub mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bitbucket_operator::controller::{Lease, Operator, wait_for};
use bitbucket_operator::egress::{EgressArgs, EgressPolicy};
use bitbucket_operator::metrics::Metrics;
use bitbucket_operator::simulator::{SimConfig, Simulator, SimulatorHandle};
use bitbucket_operator::store::Store;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use support::fake_kube::FakeKube;
use tokio::sync::watch;

const API: &str = "connectors.dev/v1alpha1";
const GRANT: &str = "BitbucketAccessGrant";
const CONNECTOR: &str = "BitbucketConnector";
const NAMESPACES: [&str; 3] = ["a", "b", "c"];
const WAIT: Duration = Duration::from_secs(30);

fn allow(api_url: &str) -> EgressPolicy {
    EgressArgs {
        allowed_api_urls: vec![api_url.to_owned()],
        ..EgressArgs::default()
    }
    .policy()
    .expect("a valid allow-list")
}

fn operator(fake: &FakeKube, sim: &SimulatorHandle) -> Operator {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    Operator::new(
        fake.client(),
        Arc::new(Store::open_in_memory().unwrap()),
        Arc::new(Metrics::default()),
        NAMESPACES.iter().map(|ns| (*ns).to_owned()).collect(),
        allow(&sim.base_url()),
    )
}

async fn simulator(seed: u64) -> SimulatorHandle {
    Simulator::start(
        SimConfig {
            seed,
            ..SimConfig::default()
        },
        SocketAddr::from(([127, 0, 0, 1], 0)),
    )
    .await
    .unwrap()
}

/// The opted-in Secret with the simulator's credentials, and the connector
/// `bb` in namespace `a` (workspace 0) that lets grants of `grant_namespaces` use it.
async fn connector_in_a(fake: &FakeKube, sim: &SimulatorHandle, grant_namespaces: &[&str]) {
    let creds = sim.credentials().clone();
    let secret: Secret = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "creds", "namespace": "a",
                     "labels": {"connectors.dev/bitbucket-credentials": "true"}},
        "stringData": {"BATON_USERNAME": creds.email, "BATON_APP_PASSWORD": creds.api_token},
    }))
    .unwrap();
    Api::<Secret>::namespaced(fake.client(), "a")
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();
    fake.put(json!({
        "apiVersion": API, "kind": CONNECTOR,
        "metadata": {"name": "bb", "namespace": "a"},
        "spec": {
            "secretRef": {"name": "creds"},
            "apiUrl": sim.base_url(),
            "workspaces": [sim.organisation().workspaces[0].slug],
            "rateLimit": {"requestsPerHour": 100000, "maxInFlight": 8},
            "provisioning": {"enabled": true, "grantNamespaces": grant_namespaces},
        },
    }));
}

fn condition<'a>(obj: &'a Value, type_: &str) -> Option<&'a Value> {
    obj["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)
}

/// WATCH requests on connectors, by namespace (`*`: cluster-wide).
fn connector_watches(fake: &FakeKube) -> Vec<String> {
    let mut scopes: Vec<String> = fake
        .requests()
        .into_iter()
        .filter(|r| r.method == "GET" && matches!(r.param("watch").as_deref(), Some("true" | "1")))
        .filter_map(|r| {
            let rest = r.path.strip_prefix("/apis/connectors.dev/v1alpha1/")?;
            match rest.strip_suffix("/bitbucketconnectors") {
                Some(scoped) => scoped.strip_prefix("namespaces/").map(str::to_owned),
                None => (rest == "bitbucketconnectors").then(|| "*".to_owned()),
            }
        })
        .collect();
    scopes.sort();
    scopes
}

async fn wait_until(flag: &AtomicBool, what: &str) {
    tokio::time::timeout(WAIT, async {
        while !flag.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{what}"));
}

/// N = 3 watched namespaces: 3 connector watches in all, one per namespace;
/// a connector change in `a` still re-triggers a grant of `b` at once (a
/// `Denied` grant is otherwise looked at again only after 5 minutes), and
/// readiness is reported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_namespaces_cost_three_connector_watches_and_grants_still_follow_connectors_across_them() {
    let sim = simulator(71).await;
    let fake = FakeKube::start().await;
    connector_in_a(&fake, &sim, &["c"]).await;
    let operator = operator(&fake, &sim);
    let ready = Arc::clone(&operator.ready);
    let (stop, stopped) = watch::channel(false);
    let task = tokio::spawn(async move { operator.run_controllers(wait_for(stopped)).await });
    fake.wait_for(API, CONNECTOR, Some("a"), "bb", Duration::from_secs(60), |c| {
        condition(c, "Ready").is_some_and(|r| r["status"] == "True")
    })
    .await;
    wait_until(&ready, "ready once every namespace has listed").await;

    // A grant of `b` on the connector of `a`, which does not list `b` yet.
    let org = sim.organisation();
    let ws = &org.workspaces[0];
    let member = ws.members.iter().find(|m| !m.owner).unwrap();
    let nickname = org
        .users
        .iter()
        .find(|u| u.uuid == member.user_uuid)
        .unwrap()
        .nickname
        .clone();
    fake.put(json!({
        "apiVersion": API, "kind": GRANT,
        "metadata": {"name": "g", "namespace": "b"},
        "spec": {
            "connectorRef": {"name": "bb", "namespace": "a"},
            "principal": {"user": nickname},
            "target": {"workspace": ws.slug, "repository": ws.repositories[0].slug},
            "permission": "write",
            "duration": "1h",
        },
    }));
    fake.wait_for(API, GRANT, Some("b"), "g", WAIT, |g| g["status"]["state"] == "Denied")
        .await;

    // The connector's owner lists `b`: the grant goes through, re-triggered
    // by the change of a connector of another namespace.
    Api::<bitbucket_operator::crd::BitbucketConnector>::namespaced(fake.client(), "a")
        .patch(
            "bb",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"provisioning": {"grantNamespaces": ["b", "c"]}}})),
        )
        .await
        .unwrap();
    fake.wait_for(API, GRANT, Some("b"), "g", Duration::from_secs(15), |g| {
        g["status"]["state"] == "Granted"
    })
    .await;

    assert_eq!(
        connector_watches(&fake),
        ["a", "b", "c"],
        "one connector watch per watched namespace, shared by every consumer"
    );
    let _ = stop.send(true);
    tokio::time::timeout(WAIT, task).await.expect("operator stops").unwrap();
}

/// A replica that does not hold the Lease runs no controller, yet reports
/// ready once its own connector watches (one per namespace) have listed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_is_ready_on_one_connector_watch_per_namespace() {
    let sim = simulator(72).await;
    let fake = FakeKube::start().await;
    connector_in_a(&fake, &sim, &[]).await;
    let now = jiff::Timestamp::now().to_string();
    fake.put(json!({
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": "bitbucket-operator", "namespace": "a"},
        "spec": {"holderIdentity": "the-leader", "leaseDurationSeconds": 300,
                 "acquireTime": now, "renewTime": now},
    }));
    let operator = Arc::new(operator(&fake, &sim));
    let lease = Lease {
        name: "bitbucket-operator".into(),
        namespace: "a".into(),
        identity: "standby".into(),
        duration_seconds: 300,
    };
    let (stop, stopped) = watch::channel(false);
    let task = tokio::spawn({
        let operator = Arc::clone(&operator);
        async move { operator.run_with_leader_election(&lease, stopped).await.unwrap() }
    });
    wait_until(&operator.ready, "a standby is ready").await;
    assert!(!operator.leading.load(Ordering::Relaxed), "the Lease is someone else's");
    assert_eq!(connector_watches(&fake), ["a", "b", "c"]);
    let connector = fake.get(API, CONNECTOR, Some("a"), "bb").unwrap();
    assert!(connector["status"].is_null(), "no controller ran: {connector}");
    let _ = stop.send(true);
    tokio::time::timeout(WAIT, task).await.expect("standby stops").unwrap();
}

/// What a grant controller is fed: changes of connectors of every watched
/// namespace, their deletions included (kube-runtime's subscriptions alone
/// do not carry deletions), and nothing from an unwatched namespace.
#[tokio::test]
async fn every_consumer_sees_changes_and_deletions_of_every_watched_namespace() {
    use bitbucket_operator::controller::watches::ConnectorWatches;
    use futures::StreamExt;

    let fake = FakeKube::start().await;
    let connector = |namespace: &str, name: &str| {
        json!({
            "apiVersion": API, "kind": CONNECTOR,
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"secretRef": {"name": "creds"}},
        })
    };
    fake.put(connector("a", "early"));
    let mut watches = ConnectorWatches::new(&fake.client(), &["a".to_owned(), "b".to_owned()]);
    // The scope's store only: its subscription is dropped, unread.
    let reader = watches.feed(Some("b")).expect("a scope per watched namespace").reader;
    assert!(
        watches.feed(None).is_none(),
        "no cluster-wide scope when namespaces are named"
    );
    let mut first = watches.all_changes().boxed();
    let mut second = watches.all_changes().boxed();
    let ready = Arc::new(AtomicBool::new(false));
    let (stop, stopped) = watch::channel(false);
    let task = tokio::spawn(watches.run(Arc::clone(&ready), wait_for(stopped)));
    // What existed before the watches started is announced once they list.
    assert_eq!(next(&mut first).await, "a/early");
    assert_eq!(next(&mut second).await, "a/early");
    wait_until(&ready, "ready once both namespaces have listed").await;

    fake.put(connector("elsewhere", "ignored"));
    fake.put(connector("b", "late"));
    for stream in [&mut first, &mut second] {
        assert_eq!(next(stream).await, "b/late", "unwatched namespaces never show up");
    }
    assert_eq!(
        reader
            .state()
            .iter()
            .map(|c| c.metadata.name.clone())
            .collect::<Vec<_>>(),
        [Some("late".to_owned())],
        "the scope's store holds its own namespace only"
    );

    fake.delete(API, CONNECTOR, Some("b"), "late");
    for stream in [&mut first, &mut second] {
        assert_eq!(next(stream).await, "b/late", "every consumer hears of the deletion");
    }
    let _ = stop.send(true);
    tokio::time::timeout(WAIT, task).await.expect("watches stop").unwrap();
}

/// `namespace/name` of the next connector `stream` delivers.
async fn next(
    stream: &mut futures::stream::BoxStream<'static, Arc<bitbucket_operator::crd::BitbucketConnector>>,
) -> String {
    use futures::StreamExt;
    let connector = tokio::time::timeout(WAIT, stream.next())
        .await
        .expect("a change arrives")
        .expect("the stream goes on");
    format!(
        "{}/{}",
        connector.metadata.namespace.as_deref().unwrap_or_default(),
        connector.metadata.name.as_deref().unwrap_or_default()
    )
}
