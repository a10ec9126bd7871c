//! The data API's test world: a connector synced from the Bitbucket simulator into a store
//! file (so the CLI can read it too), a reviewer allowed to read it on the fake API server
//! (TokenReview and SubjectAccessReview), and the data API on loopback behind
//! [`serve_connections`], the serving layer the operator runs. What differs between the
//! data-API test files (the settings, the connection limits) is a parameter.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use bitbucket_operator::api::{AccessGate, ApiState, DataApiSettings, router};
use bitbucket_operator::http::conn::{ConnectionLimits, ConnectionMetrics, serve_connections};
use bitbucket_operator::model::SyncKind;
use bitbucket_operator::simulator::{SimConfig, Simulator, SimulatorHandle};
use bitbucket_operator::store::Store;
use bitbucket_operator::sync::{SyncEngine, run_into_store};
use tokio::sync::oneshot;

use super::fake_kube::FakeKube;
use super::grant_env::bitbucket_client;

/// The namespace of the connector every data-API test reads.
pub const NS: &str = "team-a";
/// The connector every data-API test reads.
pub const CONNECTOR: &str = "acme";
/// The bearer token of `alice`, who may `get bitbucketconnectors/data` in [`NS`].
pub const TOKEN: &str = "reviewer-token";

/// A running data API over a synced connector; the server stops when dropped.
pub struct DataApi {
    pub kube: FakeKube,
    /// Kept alive for the syncs.
    _sim: SimulatorHandle,
    /// Holds the store file.
    _dir: tempfile::TempDir,
    pub db: PathBuf,
    pub store: Arc<Store>,
    pub engine: SyncEngine,
    pub gate: Arc<AccessGate>,
    /// `http://127.0.0.1:port`.
    pub base: String,
    /// The listener's open connections and deferred accepts.
    pub connections: ConnectionMetrics,
    /// Sending stops the server gracefully.
    pub stop: Option<oneshot::Sender<()>>,
    pub server: tokio::task::JoinHandle<()>,
}

impl Drop for DataApi {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// The data API with `settings`, its connections bounded by `settings.connections`.
pub async fn start(settings: DataApiSettings) -> DataApi {
    let kube = FakeKube::start().await;
    let sim = Simulator::start(SimConfig::default(), "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("store.db");
    let store = Arc::new(Store::open(&db).unwrap());
    let engine = SyncEngine::new(bitbucket_client(&sim), Vec::new());
    sync(&engine, &store).await;
    kube.add_token(TOKEN, "alice", &["auditors"]);
    kube.allow_data_reads("alice", NS);
    let limits = settings.connections;
    let gate = Arc::new(AccessGate::new(settings));
    let state = ApiState {
        kube: kube.client(),
        store: Arc::clone(&store),
        leading: Arc::new(AtomicBool::new(true)),
        decisions: Arc::clone(&gate),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let connections = ConnectionMetrics::default();
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(serve_connections(
        listener,
        router(state),
        limits,
        connections.clone(),
        async move {
            let _ = stopped.await;
        },
    ));
    DataApi {
        kube,
        _sim: sim,
        _dir: dir,
        db,
        store,
        engine,
        gate,
        base,
        connections,
        stop: Some(stop),
        server,
    }
}

/// [`start`] with default settings but these connection limits.
pub async fn start_with_limits(limits: ConnectionLimits) -> DataApi {
    start(DataApiSettings {
        connections: limits,
        ..DataApiSettings::default()
    })
    .await
}

impl DataApi {
    /// The URL of `rest` (`grants?limit=5`) under the connector's API path.
    pub fn url(&self, rest: &str) -> String {
        format!("{}/api/v1/namespaces/{NS}/connectors/{CONNECTOR}/{rest}", self.base)
    }

    /// Syncs every resource type again (new generations: continue tokens expire).
    pub async fn sync(&self) {
        sync(&self.engine, &self.store).await;
    }

    /// Another [`ApiState`] over the same API server double and store, with a fresh gate,
    /// for serving the data API on another listener.
    pub fn state(&self) -> ApiState {
        ApiState {
            kube: self.kube.client(),
            store: Arc::clone(&self.store),
            leading: Arc::new(AtomicBool::new(true)),
            decisions: Arc::new(AccessGate::default()),
        }
    }
}

async fn sync(engine: &SyncEngine, store: &Arc<Store>) {
    let scope = engine.connect().await.unwrap();
    for kind in SyncKind::ALL {
        run_into_store(engine, store, &format!("{NS}/{CONNECTOR}"), kind, &scope)
            .await
            .unwrap();
    }
}
