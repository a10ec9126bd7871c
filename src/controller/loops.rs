//! Sync loops: one tokio task per connector and resource type, each on its own
//! interval, owned by a [`ConnectorRuntime`]. The reconciler starts, retunes
//! and stops them; they never write Kubernetes status themselves. When a run
//! starts or ends they ask for a reconcile of their connector, and the
//! reconciler (the only status writer) reads the outcome from the store.
//!
//! - Credentials are swapped in the shared [`Client`] (hot reload): loops keep
//!   running and the next request uses the new Secret.
//! - A loop's first run after a restart is due at the end of its last
//!   recorded run plus its interval, so restarts keep the cadence.
//! - A failed run is retried with exponential backoff (capped by the interval);
//!   the previous data stays in the store.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use jiff::Timestamp;
use kube::runtime::reflector::ObjectRef;
use tokio::sync::{Notify, mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::conductorone::Sessions;
use super::status::{LoopStatus, ProgressObservation};
use crate::bitbucket::{Client, ClientConfig, Limits};
use crate::crd::BitbucketConnector;
use crate::egress::{EgressError, EgressPolicy};
use crate::metrics::Metrics;
use crate::model::SyncKind;
use crate::settings::{ConnectorSettings, SecretValues};
use crate::store::{RunStatus, Store};
use crate::sync::{ProgressSnapshot, SyncEngine, SyncError, discover_and_run_into_store};

/// What the engine is built from; a change to `api_url` builds a new client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineSettings {
    pub api_url: String,
    pub workspaces: Vec<String>,
    pub limits: Limits,
}

/// The last credential check.
#[derive(Debug, Clone)]
pub struct Connection {
    /// Workspace slugs, or why the check failed.
    pub result: Result<Vec<String>, SyncError>,
    /// Settings and credential fingerprint the check was made with.
    pub checked: (EngineSettings, String),
    pub at: Instant,
}

/// Sends reconcile requests to one controller.
pub type ReconcileTrigger = mpsc::UnboundedSender<ObjectRef<BitbucketConnector>>;

/// Why a connector's runtime could not be configured.
#[derive(Debug, thiserror::Error)]
pub enum ConfigureError {
    /// `apiUrl` is not on the administrator's allow-list: no client is built.
    #[error(transparent)]
    NotAllowed(#[from] EgressError),
    #[error(transparent)]
    Client(#[from] crate::bitbucket::Error),
}

/// All connectors' runtimes.
pub struct Manager {
    store: Arc<Store>,
    metrics: Arc<Metrics>,
    /// Where credentials may be sent: checked before any client is built.
    egress: Arc<EgressPolicy>,
    runtimes: Mutex<HashMap<String, Arc<ConnectorRuntime>>>,
    /// Reconcile triggers, one channel per controller (by namespace; `None`
    /// watches every namespace).
    triggers: Mutex<Vec<(Option<String>, ReconcileTrigger)>>,
    /// ConductorOne sessions, one per connector that has it configured.
    sessions: Sessions,
    /// GetCredentials answers of the credential rotation.
    rotation_cache: super::rotation::DescribeCache,
    /// While a run is in progress its connector is reconciled this often,
    /// so `status.progress` moves (see [`Manager::set_progress_period`]).
    progress_period: Mutex<Duration>,
}

/// How often a running sync refreshes `status.progress` by default.
pub const DEFAULT_PROGRESS_PERIOD: Duration = Duration::from_secs(30);

impl Manager {
    pub fn new(store: Arc<Store>, metrics: Arc<Metrics>, egress: Arc<EgressPolicy>) -> Arc<Self> {
        Arc::new(Manager {
            store,
            metrics,
            egress,
            runtimes: Mutex::default(),
            triggers: Mutex::default(),
            sessions: Sessions::default(),
            rotation_cache: Default::default(),
            progress_period: Mutex::new(DEFAULT_PROGRESS_PERIOD),
        })
    }

    /// How often `status.progress` is refreshed while a run is in progress
    /// (default 30 s; at least 100 ms). Also the least time between two
    /// progress-only status writes.
    pub fn set_progress_period(&self, period: Duration) {
        *lock(&self.progress_period) = period.max(Duration::from_millis(100));
    }

    pub fn progress_period(&self) -> Duration {
        *lock(&self.progress_period)
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The connectors' ConductorOne sessions.
    pub fn sessions(&self) -> &Sessions {
        &self.sessions
    }

    /// GetCredentials answers of the credential rotation, per credential.
    pub fn rotation_cache(&self) -> &super::rotation::DescribeCache {
        &self.rotation_cache
    }

    /// The administrator's allow-list of Bitbucket base URLs.
    pub fn egress(&self) -> &EgressPolicy {
        &self.egress
    }

    /// Registers the trigger channel of a controller watching `namespace`.
    pub fn register_trigger(&self, namespace: Option<String>, sender: ReconcileTrigger) {
        let mut triggers = lock(&self.triggers);
        triggers.retain(|(_, s)| !s.is_closed());
        triggers.push((namespace, sender));
    }

    fn request_reconcile(&self, target: &ObjectRef<BitbucketConnector>) {
        for (namespace, sender) in lock(&self.triggers).iter() {
            if namespace.is_none() || namespace.as_deref() == target.namespace.as_deref() {
                let _ = sender.send(target.clone());
            }
        }
    }

    pub fn runtime(&self, key: &str) -> Option<Arc<ConnectorRuntime>> {
        lock(&self.runtimes).get(key).cloned()
    }

    /// Creates the connector's runtime, or applies new settings to it. Returns
    /// whether the credentials changed (hot reload; loops keep running). An
    /// `api_url` off the allow-list is refused here too, whatever the caller
    /// checked: no client for it is ever built.
    pub fn configure(
        self: &Arc<Self>,
        target: ObjectRef<BitbucketConnector>,
        settings: &ConnectorSettings,
        values: SecretValues,
        engine: EngineSettings,
    ) -> Result<(Arc<ConnectorRuntime>, bool), ConfigureError> {
        self.egress.check_bitbucket_url(&engine.api_url)?;
        let key = runtime_key(&target);
        let existing = self.runtime(&key);
        let fingerprint = settings.credentials.fingerprint();
        match existing {
            None => {
                let client = self.build_client(&engine, settings)?;
                let runtime = Arc::new(ConnectorRuntime {
                    key: key.clone(),
                    target,
                    manager: Arc::downgrade(self),
                    engine: RwLock::new((engine.clone(), SyncEngine::new(client, engine.workspaces.clone()))),
                    fingerprint: Mutex::new((fingerprint, Timestamp::now())),
                    secret_values: Mutex::new(values),
                    connection: Mutex::new(None),
                    loops: Mutex::default(),
                    running: Mutex::default(),
                    config_errors: Mutex::default(),
                });
                lock(&self.runtimes).insert(key, Arc::clone(&runtime));
                Ok((runtime, false))
            }
            Some(runtime) => {
                let changed = {
                    let mut current = lock(&runtime.fingerprint);
                    let changed = current.0 != fingerprint;
                    if changed {
                        *current = (fingerprint, Timestamp::now());
                    }
                    changed
                };
                *lock(&runtime.secret_values) = values;
                let mut guard = runtime.engine.write().unwrap_or_else(|e| e.into_inner());
                // Runs in flight keep reporting on the same board.
                let board = guard.1.progress().clone();
                if guard.0.api_url != engine.api_url {
                    let client = self.build_client(&engine, settings)?;
                    let rebuilt = SyncEngine::new(client, engine.workspaces.clone()).with_progress_board(board);
                    *guard = (engine.clone(), rebuilt);
                } else {
                    let client = guard.1.client().clone();
                    client.set_credentials(settings.credentials.clone());
                    if guard.0 != engine {
                        client.set_limits(engine.limits);
                        let rebuilt = SyncEngine::new(client, engine.workspaces.clone()).with_progress_board(board);
                        *guard = (engine.clone(), rebuilt);
                    }
                }
                drop(guard);
                Ok((runtime, changed))
            }
        }
    }

    fn build_client(
        &self,
        engine: &EngineSettings,
        settings: &ConnectorSettings,
    ) -> Result<Client, crate::bitbucket::Error> {
        let mut config = ClientConfig::new(&engine.api_url)?;
        config.limits = engine.limits;
        Client::with_observer(
            config,
            settings.credentials.clone(),
            Some(self.metrics.request_observer()),
        )
    }

    /// Stops the connector's ConductorOne session and loops, and forgets it.
    pub async fn remove(&self, key: &str) {
        self.sessions.stop(key).await;
        let runtime = lock(&self.runtimes).remove(key);
        if let Some(runtime) = runtime {
            runtime.stop_loops().await;
        }
    }

    /// Stops every ConductorOne session and loop (lost leadership, shutdown).
    pub async fn stop_all(&self) {
        self.sessions.stop_all().await;
        let runtimes: Vec<_> = lock(&self.runtimes).drain().map(|(_, r)| r).collect();
        for runtime in runtimes {
            runtime.stop_loops().await;
        }
    }

    /// Keys of connectors with a runtime, for tests and diagnostics.
    pub fn keys(&self) -> Vec<String> {
        let mut keys: Vec<_> = lock(&self.runtimes).keys().cloned().collect();
        keys.sort();
        keys
    }
}

/// The store key of a connector: `namespace/name`.
pub fn runtime_key(target: &ObjectRef<BitbucketConnector>) -> String {
    format!("{}/{}", target.namespace.as_deref().unwrap_or_default(), target.name)
}

struct LoopHandle {
    interval: watch::Sender<Duration>,
    trigger: Arc<Notify>,
    task: JoinHandle<()>,
}

/// One connector: its client and engine, last credential check, and loops.
pub struct ConnectorRuntime {
    pub key: String,
    target: ObjectRef<BitbucketConnector>,
    manager: std::sync::Weak<Manager>,
    engine: RwLock<(EngineSettings, SyncEngine)>,
    /// Credential fingerprint and when it last changed.
    fingerprint: Mutex<(String, Timestamp)>,
    /// What the Secret held, to scrub from errors before they are reported.
    secret_values: Mutex<SecretValues>,
    connection: Mutex<Option<Connection>>,
    loops: Mutex<BTreeMap<SyncKind, LoopHandle>>,
    running: Mutex<BTreeSet<SyncKind>>,
    /// Configuration-class failures (credentials, scopes, workspace) of each
    /// loop's latest run; a successful run clears its entry.
    config_errors: Mutex<BTreeMap<SyncKind, (SyncError, Instant)>>,
}

impl ConnectorRuntime {
    pub fn engine(&self) -> SyncEngine {
        self.engine.read().unwrap_or_else(|e| e.into_inner()).1.clone()
    }

    pub fn fingerprint(&self) -> (String, Timestamp) {
        lock(&self.fingerprint).clone()
    }

    /// `text` without any value read from the Secret.
    pub fn scrub(&self, text: &str) -> String {
        lock(&self.secret_values).scrub(text)
    }

    /// Whether the credential check must run again: never ran, settings or
    /// credentials changed, it failed last time, or a loop has since been
    /// refused with rejected credentials or an unknown workspace (the check
    /// can see those; missing permission scopes it cannot, see
    /// [`ConnectorRuntime::refusal`]).
    pub fn needs_connection_check(&self) -> bool {
        let connection = lock(&self.connection);
        let Some(connection) = connection.as_ref() else {
            return true;
        };
        let current = (
            self.engine.read().unwrap_or_else(|e| e.into_inner()).0.clone(),
            self.fingerprint().0,
        );
        if connection.checked != current || connection.result.is_err() {
            return true;
        }
        lock(&self.config_errors)
            .values()
            .any(|(err, at)| *at > connection.at && !matches!(err, SyncError::InsufficientScopes(_)))
    }

    /// A loop's latest run was refused for a reason retrying with the same
    /// settings cannot fix (typically a 403 on the permission endpoints, which
    /// the credential check does not call): the connector is stalled on it
    /// while the loops keep retrying on their interval.
    pub fn refusal(&self) -> Option<SyncError> {
        lock(&self.config_errors).values().map(|(err, _)| err.clone()).next()
    }

    /// Checks the credentials and finds the workspaces (`GET /2.0/user`, then
    /// workspace discovery).
    pub async fn check_connection(&self) -> Connection {
        let (settings, engine) = {
            let guard = self.engine.read().unwrap_or_else(|e| e.into_inner());
            (guard.0.clone(), guard.1.clone())
        };
        let fingerprint = self.fingerprint().0;
        let result = engine
            .connect()
            .await
            .map(|scope| scope.workspaces.iter().map(|w| w.slug.clone()).collect::<Vec<_>>());
        let connection = Connection {
            result,
            checked: (settings, fingerprint),
            at: Instant::now(),
        };
        *lock(&self.connection) = Some(connection.clone());
        connection
    }

    pub fn connection(&self) -> Option<Connection> {
        lock(&self.connection).clone()
    }

    /// Starts, retunes or stops loops to match `desired` (`None`: disabled).
    /// Only loops whose interval changed are touched. Returns the kinds that
    /// were started now (their first run is already due or scheduled).
    pub async fn ensure_loops(self: &Arc<Self>, desired: &BTreeMap<SyncKind, Option<Duration>>) -> BTreeSet<SyncKind> {
        let mut started = BTreeSet::new();
        let mut stopped = Vec::new();
        {
            let mut loops = lock(&self.loops);
            for (&kind, interval) in desired {
                match (interval, loops.get(&kind)) {
                    (None, Some(_)) => stopped.extend(loops.remove(&kind).map(|handle| (kind, handle))),
                    (Some(interval), Some(handle)) => {
                        if *handle.interval.borrow() != *interval {
                            let _ = handle.interval.send(*interval);
                        }
                    }
                    (Some(interval), None) => {
                        let (tx, rx) = watch::channel(*interval);
                        let trigger = Arc::new(Notify::new());
                        let task = tokio::spawn(run_loop(Arc::clone(self), kind, rx, Arc::clone(&trigger)));
                        loops.insert(
                            kind,
                            LoopHandle {
                                interval: tx,
                                trigger,
                                task,
                            },
                        );
                        started.insert(kind);
                    }
                    (None, None) => {}
                }
            }
        }
        for (kind, handle) in stopped {
            self.stop_loop(kind, handle).await;
        }
        started
    }

    /// Cancels a loop, waits until it is gone, then closes the run it may
    /// have left open: nothing can be half-way through a run afterwards.
    async fn stop_loop(&self, kind: SyncKind, handle: LoopHandle) {
        handle.task.abort();
        let _ = handle.task.await;
        lock(&self.running).remove(&kind);
        if let Some(manager) = self.manager.upgrade() {
            let store = Arc::clone(&manager.store);
            let key = self.key.clone();
            let closed = tokio::task::spawn_blocking(move || store.fail_interrupted_runs(Some(&key), Some(kind))).await;
            if let Ok(Err(err)) = closed {
                tracing::warn!(connector = %self.key, kind = kind.as_str(), error = %err, "could not close a stopped run");
            }
        }
    }

    /// Runs `kind` again as soon as its current run ends, if one is running
    /// (a change made meanwhile is not in what that run read).
    pub fn resync_if_running(&self, kind: SyncKind) {
        if lock(&self.running).contains(&kind)
            && let Some(handle) = lock(&self.loops).get(&kind)
        {
            handle.trigger.notify_one();
        }
    }

    /// Runs every loop now, except those in `skip` (just started).
    pub fn trigger_all(&self, skip: &BTreeSet<SyncKind>) {
        for (kind, handle) in lock(&self.loops).iter() {
            if !skip.contains(kind) {
                handle.trigger.notify_one();
            }
        }
    }

    pub async fn stop_loops(&self) {
        let loops = std::mem::take(&mut *lock(&self.loops));
        for (kind, handle) in loops {
            self.stop_loop(kind, handle).await;
        }
    }

    /// Kinds with a loop.
    pub fn loop_kinds(&self) -> BTreeSet<SyncKind> {
        lock(&self.loops).keys().copied().collect()
    }

    /// Each loop's status, from the store's run history plus what runs now.
    pub fn loop_statuses(&self, store: &Store, enabled: &BTreeMap<SyncKind, bool>) -> BTreeMap<SyncKind, LoopStatus> {
        let running = lock(&self.running).clone();
        let mut statuses = loop_statuses(store, &self.key, enabled, &running);
        for status in statuses.values_mut() {
            status.last_error = status.last_error.as_deref().map(|e| self.scrub(e));
        }
        statuses
    }

    /// The runs in progress and the budget wait, for `status.progress`.
    pub fn progress(&self) -> ProgressObservation {
        let running = lock(&self.running).clone();
        let engine = self.engine();
        let board = engine.progress();
        ProgressObservation {
            now: Timestamp::now(),
            min_interval: self
                .manager
                .upgrade()
                .map_or(DEFAULT_PROGRESS_PERIOD, |m| m.progress_period()),
            // The loop resets a type's counters when its run starts.
            running: running
                .into_iter()
                .map(|kind| board.of(kind).unwrap_or_else(|| ProgressSnapshot::starting(kind)))
                .collect(),
            budget_wait: engine.client().budget_wait(),
        }
    }

    /// Asks for a reconcile of this connector.
    pub(crate) fn notify(&self) {
        if let Some(manager) = self.manager.upgrade() {
            manager.request_reconcile(&self.target);
        }
    }
}

/// Loop statuses from the store alone (also used when no runtime exists, e.g.
/// while suspended or before the Secret is usable).
pub fn loop_statuses(
    store: &Store,
    key: &str,
    enabled: &BTreeMap<SyncKind, bool>,
    running: &BTreeSet<SyncKind>,
) -> BTreeMap<SyncKind, LoopStatus> {
    let ms = |ms: i64| Timestamp::from_millisecond(ms).ok();
    enabled
        .iter()
        .map(|(&kind, &enabled)| {
            let mut status = LoopStatus {
                enabled,
                running: running.contains(&kind),
                ..LoopStatus::default()
            };
            if let Ok(Some(current)) = store
                .generations(key, kind)
                .map(|generations| generations.into_iter().find(|g| g.current))
            {
                status.count = current.counts.resources as i64;
                status.last_success = ms(current.committed_at);
            }
            // The latest finished run describes the last attempt; a run still
            // marked running without a live loop was interrupted.
            if let Ok(runs) = store.runs_of_kind(key, kind, 2) {
                let finished = runs.iter().find(|r| r.status != RunStatus::Running);
                if let Some(run) = runs.first() {
                    status.last_start = ms(run.started_at);
                }
                if let Some(run) = finished {
                    status.last_end = run.finished_at.and_then(ms);
                    status.duration_seconds = run.duration_ms.map(|d| d as f64 / 1000.0);
                    status.requests = Some(run.requests as i64);
                    if run.status == RunStatus::Failed {
                        status.last_error = run.error.clone();
                    }
                }
            }
            (kind, status)
        })
        .collect()
}

async fn run_loop(
    runtime: Arc<ConnectorRuntime>,
    kind: SyncKind,
    mut interval: watch::Receiver<Duration>,
    trigger: Arc<Notify>,
) {
    let store = match runtime.manager.upgrade() {
        Some(manager) => Arc::clone(&manager.store),
        None => return,
    };
    let metrics = runtime.manager.upgrade().map(|m| Arc::clone(&m.metrics));
    // Keep the cadence across restarts: the first run is due one interval
    // after the last recorded run ended.
    let last_end = {
        let store = Arc::clone(&store);
        let key = runtime.key.clone();
        tokio::task::spawn_blocking(move || store.runs_of_kind(&key, kind, 1))
            .await
            .ok()
            .and_then(Result::ok)
            .and_then(|runs| runs.first().and_then(|r| r.finished_at.or(Some(r.started_at))))
    };
    let mut last_end_instant = last_end.map(|ms| {
        let age = Duration::from_millis((Timestamp::now().as_millisecond() - ms).max(0) as u64);
        Instant::now().checked_sub(age).unwrap_or_else(Instant::now)
    });
    let mut failures: u32 = 0;
    loop {
        let period = *interval.borrow_and_update();
        let due = match (last_end_instant, failures) {
            (None, _) => Instant::now(),
            (Some(end), 0) => end + period,
            (Some(end), n) => end + retry_backoff(n).min(period),
        };
        tokio::select! {
            _ = tokio::time::sleep_until(due) => {}
            _ = trigger.notified() => {}
            changed = interval.changed() => {
                if changed.is_err() {
                    return;
                }
                continue;
            }
        }

        let engine = runtime.engine().with_interval(Some(period));
        // Fresh counters before the run shows as running: never the last run's.
        engine.progress().start(kind);
        lock(&runtime.running).insert(kind);
        runtime.notify();
        let clock = Instant::now();
        let outcome = with_progress_ticks(
            &runtime,
            discover_and_run_into_store(&engine, &store, &runtime.key, kind),
        )
        .await
        .map(|_| ());
        if let Some(metrics) = &metrics {
            metrics.record_sync(kind, outcome.is_ok(), clock.elapsed().as_secs_f64());
        }
        match outcome {
            Ok(()) => {
                failures = 0;
                lock(&runtime.config_errors).remove(&kind);
            }
            Err(err) => {
                failures = failures.saturating_add(1);
                if err.is_configuration_error() {
                    lock(&runtime.config_errors).insert(kind, (err.clone(), Instant::now()));
                } else {
                    lock(&runtime.config_errors).remove(&kind);
                }
                let error = runtime.scrub(&err.to_string());
                tracing::warn!(connector = %runtime.key, kind = kind.as_str(), %error, "sync run failed");
            }
        }
        last_end_instant = Some(Instant::now());
        lock(&runtime.running).remove(&kind);
        runtime.notify();
    }
}

/// Awaits `run`, asking for a reconcile of the connector every progress
/// period meanwhile, so its status shows how far the run got.
async fn with_progress_ticks<T>(runtime: &ConnectorRuntime, run: impl std::future::Future<Output = T>) -> T {
    let period = runtime
        .manager
        .upgrade()
        .map_or(DEFAULT_PROGRESS_PERIOD, |m| m.progress_period());
    let mut ticks = tokio::time::interval_at(Instant::now() + period, period);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(run);
    loop {
        tokio::select! {
            out = &mut run => return out,
            _ = ticks.tick() => runtime.notify(),
        }
    }
}

/// 10 s, 20 s, 40 s … capped at 10 minutes, with jitter.
fn retry_backoff(failures: u32) -> Duration {
    crate::backoff::exponential(Duration::from_secs(10), Duration::from_secs(600), failures)
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_then_caps() {
        assert!(retry_backoff(1) >= Duration::from_secs(8) && retry_backoff(1) <= Duration::from_secs(12));
        assert!(retry_backoff(3) >= Duration::from_secs(32));
        assert!(retry_backoff(30) <= Duration::from_secs(720));
    }
}
