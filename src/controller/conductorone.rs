//! The ConductorOne service-mode session of each connector: started by the
//! reconciler (leader only, since only the leader reconciles), restarted when
//! what it was built from changes, stopped on suspend, deletion, disable and
//! when the controllers stop. It shares the connector's Bitbucket client, so
//! its snapshot refreshes and provisioning spend the same rate-limit budget.
//!
//! The session never writes Kubernetes status: each change of its published
//! [`SessionStatus`] asks for a reconcile, and the reconciler (the only status
//! writer) reads it back through [`C1Health::Session`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::loops::{ConnectorRuntime, EngineSettings, Manager};
use super::status::C1Health;
use crate::conductorone::{
    Backend, C1Endpoint, ClientCredentials, OnRejected, ServiceSession, ServiceSettings, SessionStatus, Timing,
};
use crate::crd::{BitbucketConnectorSpec, Reason};
use crate::provision::{AfterRefresh, Provisioner, StoreInventory};
use crate::settings::{ConnectorSettings, PlatformCredentials};

/// How long a stopping session may take to finish its grants and revokes.
const STOP_GRACE: Duration = Duration::from_secs(30);

/// What a session was built from: any change restarts it.
#[derive(Debug, Clone, PartialEq)]
struct SessionConfig {
    /// Kept in memory only to compare (its Debug redacts the secret).
    credentials: PlatformCredentials,
    api_host: Option<String>,
    ca_bundle: Option<String>,
    max_snapshot_age: Duration,
    provisioning: bool,
    /// A new `apiUrl` builds a new Bitbucket client; the session must use it.
    engine: EngineSettings,
}

struct SessionHandle {
    config: SessionConfig,
    cancel: CancellationToken,
    status: tokio::sync::watch::Receiver<SessionStatus>,
    task: JoinHandle<()>,
}

/// The running sessions, by connector key.
#[derive(Default)]
pub struct Sessions {
    running: Mutex<HashMap<String, SessionHandle>>,
}

impl Sessions {
    /// Stops `key`'s session, if any, and waits for it to end.
    pub async fn stop(&self, key: &str) {
        let handle = lock(&self.running).remove(key);
        if let Some(handle) = handle {
            stop_handle(key, handle).await;
        }
    }

    /// Stops every session (lost leadership, shutdown).
    pub async fn stop_all(&self) {
        let handles: Vec<_> = lock(&self.running).drain().collect();
        for (key, handle) in handles {
            stop_handle(&key, handle).await;
        }
    }

    /// Whether `key` has a session that still runs (tests, diagnostics).
    pub fn is_running(&self, key: &str) -> bool {
        lock(&self.running).get(key).is_some_and(|h| !h.task.is_finished())
    }

    /// The status of `key`'s session when it runs with `config`.
    fn current(&self, key: &str, config: &SessionConfig) -> Option<SessionStatus> {
        let running = lock(&self.running);
        let handle = running.get(key)?;
        (handle.config == *config && !handle.task.is_finished()).then(|| handle.status.borrow().clone())
    }
}

async fn stop_handle(key: &str, handle: SessionHandle) {
    handle.cancel.cancel();
    let mut task = handle.task;
    if tokio::time::timeout(STOP_GRACE, &mut task).await.is_err() {
        tracing::warn!(connector = %key, "ConductorOne session did not stop in time; aborted");
        task.abort();
    }
}

/// Starts, keeps, restarts or stops the connector's session to match its
/// spec and Secret, and says what the `ConductorOneConnected` condition shows.
/// Nothing is sent anywhere unless the effective ConductorOne host is on
/// the administrator's allow-list.
pub async fn reconcile_session(
    manager: &Arc<Manager>,
    runtime: &Arc<ConnectorRuntime>,
    spec: &BitbucketConnectorSpec,
    settings: &ConnectorSettings,
    engine: &EngineSettings,
) -> C1Health {
    let key = runtime.key.clone();
    let (config, credentials, endpoint) = match desired_session(manager, runtime, spec, settings, engine) {
        Ok(desired) => desired,
        Err(health) => {
            manager.sessions().stop(&key).await;
            return *health;
        }
    };
    if let Some(status) = manager.sessions().current(&key, &config) {
        return C1Health::Session(scrubbed(runtime, status));
    }
    // New, changed or ended: replace it.
    manager.sessions().stop(&key).await;
    let service = ServiceSettings {
        connector: key.clone(),
        host_id: key.chars().take(256).collect(),
        endpoint,
        max_snapshot_age: config.max_snapshot_age,
        work_dir: std::env::temp_dir(),
        on_rejected: OnRejected::Retry,
        timing: Timing::default(),
    };
    let session = match ServiceSession::new(
        service,
        credentials,
        backend(manager, runtime, config.provisioning),
        Some(manager.metrics().c1.clone()),
    ) {
        Ok(session) => session,
        Err(err) => {
            return C1Health::Refused {
                reason: Reason::InvalidSpec,
                message: runtime.scrub(&format!("spec.conductorOne: {err}")),
            };
        }
    };
    let status = session.status();
    let cancel = CancellationToken::new();
    let task = tokio::spawn(run_session(Arc::clone(runtime), session, cancel.clone()));
    let first = status.borrow().clone();
    tracing::info!(connector = %key, "ConductorOne session started");
    lock(&manager.sessions().running).insert(
        key,
        SessionHandle {
            config,
            cancel,
            status,
            task,
        },
    );
    C1Health::Session(scrubbed(runtime, first))
}

/// What the session must be built from, or why none may run
/// ([`C1Health::NotConfigured`] or [`C1Health::Refused`]).
fn desired_session(
    manager: &Manager,
    runtime: &ConnectorRuntime,
    spec: &BitbucketConnectorSpec,
    settings: &ConnectorSettings,
    engine: &EngineSettings,
) -> Result<(SessionConfig, ClientCredentials, C1Endpoint), Box<C1Health>> {
    let c1 = spec.conductor_one.clone().unwrap_or_default();
    if !c1.enabled.unwrap_or(settings.platform.is_some()) {
        return Err(Box::new(C1Health::NotConfigured));
    }
    let refuse = |reason, message: String| {
        Box::new(C1Health::Refused {
            reason,
            message: runtime.scrub(&message),
        })
    };
    let Some(platform) = settings.platform.clone() else {
        let keys = spec.secret_keys();
        return Err(refuse(
            Reason::SecretKeyMissing,
            format!(
                "spec.conductorOne.enabled is true but the Secret lacks {} or {}",
                keys.client_id(),
                keys.client_secret()
            ),
        ));
    };
    let credentials = ClientCredentials::parse(&platform.client_id, &platform.client_secret)
        .map_err(|err| refuse(Reason::InvalidClientCredentials, err.to_string()))?;
    let max_snapshot_age = c1
        .max_snapshot_age()
        .map_err(|message| refuse(Reason::InvalidSpec, message))?;
    let endpoint = C1Endpoint {
        tenant_host: credentials.client_id().host.clone(),
        api_host_override: c1.api_host.clone().filter(|h| !h.trim().is_empty()),
        extra_ca_pem: c1.ca_bundle.clone().map(String::into_bytes),
    };
    // Before any request: a refused host is never contacted.
    if let Err(err) = manager.egress().check_conductorone_host(endpoint.api_host()) {
        return Err(refuse(
            Reason::ApiUrlNotAllowed,
            format!(
                "ConductorOne host {}: {err}; an administrator allows hosts with --allowed-conductorone-urls",
                endpoint.api_host()
            ),
        ));
    }
    let config = SessionConfig {
        credentials: platform,
        api_host: c1.api_host,
        ca_bundle: c1.ca_bundle,
        max_snapshot_age,
        provisioning: settings.provisioning,
        engine: engine.clone(),
    };
    Ok((config, credentials, endpoint))
}

/// The Bitbucket side: the connector's own client (and limiter), and a
/// provisioner that refuses when the connector's provisioning is off.
fn backend(manager: &Manager, runtime: &Arc<ConnectorRuntime>, provisioning: bool) -> Backend {
    let engine = runtime.engine();
    let resync = Arc::clone(runtime);
    let hook = AfterRefresh(Arc::new(move |kind| resync.resync_if_running(kind)));
    let inventory = StoreInventory::new(Arc::clone(manager.store()), runtime.key.clone()).after_refresh(hook);
    Backend {
        store: Arc::clone(manager.store()),
        provisioner: Provisioner::new(engine.client().clone(), provisioning).with_inventory(Arc::new(inventory)),
        engine,
    }
}

/// Runs the session, asking for a reconcile on each status change.
async fn run_session(runtime: Arc<ConnectorRuntime>, session: ServiceSession, cancel: CancellationToken) {
    let mut status = session.status();
    let watcher = {
        let runtime = Arc::clone(&runtime);
        tokio::spawn(async move {
            while status.changed().await.is_ok() {
                runtime.notify();
            }
        })
    };
    if let Err(err) = session.run(cancel).await {
        let error = runtime.scrub(&err.to_string());
        tracing::warn!(connector = %runtime.key, %error, "ConductorOne session ended");
    }
    // The session's sender is gone: the watcher has seen the last change.
    let _ = watcher.await;
    runtime.notify();
}

fn scrubbed(runtime: &ConnectorRuntime, mut status: SessionStatus) -> SessionStatus {
    status.message = runtime.scrub(&status.message);
    if let Some(task) = status.last_task.as_mut() {
        task.message = runtime.scrub(&task.message);
    }
    status
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}
