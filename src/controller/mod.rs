//! `bitbucket-operator run`: the Kubernetes controllers.
//!
//! Shape: two controllers on one scaffold ([`common`]: per-object backoff,
//! the status writer that compares with its own last write, the error
//! policy, reconcile metrics labelled per controller). Each has its own
//! `controller()` constructor, run once per watched namespace (or once for
//! all): [`connector`] reconciles `BitbucketConnector`s (status from the pure
//! [`status::compute`]; sync loops in [`loops`] ask for reconciles through a
//! channel when runs start and end; Secrets are watched by metadata only and
//! mapped to the connectors that reference them), and [`grant`] reconciles
//! `BitbucketAccessGrant`s (pure decisions, pure status, I/O apart). Both
//! watch on generation, annotation or finalizer changes only, so their own
//! status writes never trigger a reconcile. Connectors are watched once per
//! scope and shared by both controllers and readiness ([`watches`]).
//!
//! With `--leader-election`, a `Lease` (kube-lease-manager) decides which
//! replica runs the controllers and loops; the other replicas serve probes and
//! metrics and wait. Losing the lease stops the loops; SIGTERM stops them and
//! releases the lease. Bitbucket writes are fenced: the provisioner checks
//! the lease ([`crate::provision::Fence`]) right before each write, so a
//! replica that lost it makes no write even in a reconcile still running.

pub mod common;
pub mod conductorone;
pub mod connector;
mod connector_deletion;
pub mod grant;
pub mod loops;
pub mod rotation;
pub mod secret;
pub mod status;
pub mod watches;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context as _;
use futures::FutureExt;
use futures::future::BoxFuture;
use kube::Client;
use kube::runtime::events::{Recorder, Reporter};
use tokio::sync::watch;

use crate::api::{AccessGate, ApiState, DataApiArgs};
use crate::egress::{EgressArgs, EgressPolicy};
use crate::http::{self, HttpState};
use crate::metrics::Metrics;
use crate::provision::Fence;
use crate::store::Store;
use connector::Context;
use loops::Manager;
use watches::ConnectorWatches;

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Address of the HTTP endpoints (/healthz, /readyz, /metrics).
    #[arg(long, env = "HTTP_ADDR", default_value = "0.0.0.0:8080")]
    pub http_addr: SocketAddr,
    /// Also serve /healthz, /readyz and /metrics alone here, a listener with
    /// its own connection limit: a connection flood on the port serving the
    /// data API then never starves the kubelet's probes (the chart points
    /// them here).
    #[arg(long, env = "PROBE_ADDR")]
    pub probe_addr: Option<SocketAddr>,
    /// SQLite store file; its directory is created when missing. Default:
    /// `/var/lib/bitbucket-operator/store.db` in a pod (the chart's volume),
    /// `bitbucket-operator-store.db` in the working directory elsewhere (a
    /// laptop against kind).
    #[arg(long, env = "STORE_DB")]
    pub db: Option<PathBuf>,
    /// Run controllers only while holding the Lease (for several replicas).
    #[arg(long, env = "LEADER_ELECTION", num_args = 0..=1, default_value_t = false, default_missing_value = "true", action = clap::ArgAction::Set)]
    pub leader_election: bool,
    /// Name of the leader-election Lease.
    #[arg(long, env = "LEASE_NAME", default_value = "bitbucket-operator")]
    pub lease_name: String,
    /// How long a Lease is valid without renewal; a new leader takes over at
    /// most this long after the old one died without releasing it.
    #[arg(long, env = "LEASE_DURATION_SECONDS", default_value_t = 15, value_parser = clap::value_parser!(u64).range(2..=300))]
    pub lease_duration_seconds: u64,
    /// Namespace of the Lease (default: the pod's namespace).
    #[arg(long, env = "POD_NAMESPACE")]
    pub lease_namespace: Option<String>,
    /// This replica's identity in the Lease (default: the pod name).
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
    /// Only watch these namespaces (comma-separated); default: all.
    #[arg(long, env = "WATCH_NAMESPACES", value_delimiter = ',')]
    pub watch_namespaces: Vec<String>,
    /// Where connectors may send credentials (`--allowed-api-urls`).
    #[command(flatten)]
    pub egress: EgressArgs,
    /// The authenticated data API: audience, TLS, limits.
    #[command(flatten)]
    pub data_api: DataApiArgs,
    /// Share of each credential's hourly request budget that sync leaves to
    /// grants, revokes and expiries (0 to 0.5, e.g. 0.1 or 10%).
    #[arg(long, env = "PROVISIONING_RESERVE", default_value = "0.1")]
    pub provisioning_reserve: crate::bitbucket::ProvisioningReserve,
}

/// The store file `run` uses: the flag, else the pod's volume when running
/// in a pod, else a file in the working directory.
pub fn store_path(flag: Option<&Path>, in_pod: bool) -> PathBuf {
    match flag {
        Some(path) => path.to_owned(),
        None if in_pod => PathBuf::from("/var/lib/bitbucket-operator/store.db"),
        None => PathBuf::from("bitbucket-operator-store.db"),
    }
}

/// Opens (creating its directory if needed) the operator's store; the error
/// says in one line which path failed and why.
async fn open_store(db: PathBuf) -> anyhow::Result<Store> {
    tokio::task::spawn_blocking(move || {
        if let Some(dir) = db.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| anyhow::anyhow!("cannot create the store directory {}: {e}", dir.display()))?;
        }
        Store::open(&db).map_err(|e| anyhow::anyhow!("{e}"))
    })
    .await?
}

pub async fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    // A bad allow-list is a usage error found before anything starts.
    let egress = args
        .egress
        .policy()
        .context("--allowed-api-urls / --allowed-conductorone-urls")?;
    tracing::info!(allowed_api_urls = ?egress.bitbucket.entries(), "egress allow-list");
    // Before any client (and so any limiter) exists.
    crate::bitbucket::set_default_provisioning_reserve(args.provisioning_reserve);
    let client = Client::try_default()
        .await
        .context("connecting to the Kubernetes API (kubeconfig or in-cluster)")?;
    let in_pod = std::env::var_os("KUBERNETES_SERVICE_HOST").is_some();
    let store = Arc::new(open_store(store_path(args.db.as_deref(), in_pod)).await?);
    let metrics = Arc::new(Metrics::default());
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    tokio::spawn(async move {
        shutdown_signal().await;
        tracing::info!("shutdown requested");
        let _ = shutdown_tx.send(true);
    });
    let operator = Operator::new(client, store, metrics, args.watch_namespaces.clone(), egress);
    let http = serve_endpoints(&args, &operator, &shutdown_rx);

    if args.leader_election {
        let namespace = args
            .lease_namespace
            .clone()
            .unwrap_or_else(|| operator.client.default_namespace().to_owned());
        let identity = args
            .identity
            .clone()
            .unwrap_or_else(|| format!("bitbucket-operator-{}", std::process::id()));
        operator
            .run_with_leader_election(
                &Lease {
                    name: args.lease_name.clone(),
                    namespace,
                    identity,
                    duration_seconds: args.lease_duration_seconds,
                },
                shutdown_rx,
            )
            .await?;
    } else {
        operator.run_controllers(wait_for(shutdown_rx)).await;
    }
    let _ = http.await;
    tracing::info!("stopped");
    Ok(ExitCode::SUCCESS)
}

/// Starts the probe/metrics listener and the data API (on the plain port, or
/// with a certificate on its own TLS listener, leaving the plain port to
/// probes and metrics), and with `--probe-addr` a probes-only listener.
fn serve_endpoints(
    args: &RunArgs,
    operator: &Operator,
    shutdown_rx: &watch::Receiver<bool>,
) -> tokio::task::JoinHandle<anyhow::Result<()>> {
    let api = ApiState {
        kube: operator.client.clone(),
        store: Arc::clone(operator.manager.store()),
        leading: Arc::clone(&operator.leading),
        decisions: Arc::new(AccessGate::new(args.data_api.settings())),
    };
    let tls = args.data_api.tls();
    let plain_api = if tls.is_some() { None } else { Some(api.clone()) };
    if let Some(files) = tls {
        let (addr, shutdown) = (args.data_api.addr, wait_for(shutdown_rx.clone()));
        let connections = operator.metrics.connection_metrics("data_api");
        tokio::spawn(async move {
            if let Err(err) = http::serve_data_api(addr, api, Some(files), connections, shutdown).await {
                tracing::error!(error = %format!("{err:#}"), "data API listener failed");
            }
        });
    }
    let state = |api| HttpState {
        metrics: Arc::clone(&operator.metrics),
        ready: Arc::clone(&operator.ready),
        api,
    };
    if let Some(addr) = args.probe_addr {
        let (probes, shutdown) = (state(None), wait_for(shutdown_rx.clone()));
        tokio::spawn(async move {
            if let Err(err) = http::serve_probes(addr, probes, shutdown).await {
                tracing::error!(error = %format!("{err:#}"), "probe listener failed");
            }
        });
    }
    tokio::spawn(http::serve(
        args.http_addr,
        state(plain_api),
        wait_for(shutdown_rx.clone()),
    ))
}

/// The controllers and what they share; tests drive it against an API double.
pub struct Operator {
    pub client: Client,
    pub manager: Arc<Manager>,
    pub metrics: Arc<Metrics>,
    /// True while the controllers run (this replica leads).
    pub leading: Arc<AtomicBool>,
    /// True once the connector watches have listed every watched namespace
    /// (leading or standby): `/readyz`.
    pub ready: Arc<AtomicBool>,
    namespaces: Vec<String>,
    /// Bitbucket writes without leader election (tests may fence them).
    fence: Fence,
    /// Fault injection for the grant controller (tests; inert by default).
    grant_faults: grant::Faults,
}

impl Operator {
    /// `egress`: the administrator's allow-list; a connector whose `apiUrl`
    /// is not on it is refused before any request.
    pub fn new(
        client: Client,
        store: Arc<Store>,
        metrics: Arc<Metrics>,
        namespaces: Vec<String>,
        egress: EgressPolicy,
    ) -> Self {
        let manager = Manager::new(store, Arc::clone(&metrics), Arc::new(egress));
        // A namespace named twice is still one scope (one watch, one controller).
        let mut namespaces = namespaces;
        let mut seen = std::collections::HashSet::new();
        namespaces.retain(|ns| seen.insert(ns.clone()));
        Operator {
            client,
            manager,
            metrics,
            leading: Arc::new(AtomicBool::new(false)),
            ready: Arc::new(AtomicBool::new(false)),
            namespaces,
            fence: Fence::unfenced(),
            grant_faults: grant::Faults::default(),
        }
    }

    /// Fences Bitbucket writes of [`Operator::run_controllers`] (leader
    /// election passes the lease's own fence instead).
    pub fn with_fence(mut self, fence: Fence) -> Self {
        self.fence = fence;
        self
    }

    /// Arms a fault in the grant controller (crash-safety tests).
    pub fn with_grant_faults(mut self, faults: grant::Faults) -> Self {
        self.grant_faults = faults;
        self
    }

    /// Runs the connector controllers until `shutdown`, then stops every loop.
    pub async fn run_controllers(&self, shutdown: impl std::future::Future<Output = ()> + Send + 'static) {
        self.run_controllers_fenced(shutdown, self.fence.clone()).await;
    }

    /// [`Operator::run_controllers`], Bitbucket writes allowed only while `fence` holds.
    async fn run_controllers_fenced(
        &self,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
        fence: Fence,
    ) {
        // Only the replica that runs loops may close runs left `running` by a
        // previous leader or process; a standby must not touch them.
        let store = Arc::clone(self.manager.store());
        match tokio::task::spawn_blocking(move || store.fail_interrupted_runs(None, None)).await {
            Ok(Ok(0)) => {}
            Ok(Ok(interrupted)) => {
                tracing::info!(interrupted, "marked runs interrupted by the last shutdown as failed")
            }
            Ok(Err(err)) => tracing::warn!(error = %err, "could not close interrupted runs"),
            Err(err) => tracing::warn!(error = %err, "could not close interrupted runs"),
        }
        let shutdown = shutdown.shared();
        let reporter = Reporter {
            controller: "bitbucket-operator".into(),
            instance: std::env::var("POD_NAME").ok(),
        };
        let ctx = Arc::new(
            Context::new(
                self.client.clone(),
                Arc::clone(&self.manager),
                Recorder::new(self.client.clone(), reporter.clone()),
                Arc::clone(&self.metrics),
            )
            .watching(self.namespaces.clone()),
        );
        let scopes: Vec<Option<String>> = if self.namespaces.is_empty() {
            vec![None]
        } else {
            self.namespaces.iter().cloned().map(Some).collect()
        };
        let grant_ctx = Arc::new(
            grant::GrantContext::new(
                self.client.clone(),
                Arc::clone(&self.manager),
                Recorder::new(self.client.clone(), reporter),
                Arc::clone(&self.metrics),
            )
            .with_fence(fence)
            .with_faults(self.grant_faults.clone())
            .watching(self.namespaces.clone()),
        );
        // One connector watch per scope, shared by all (module `watches`):
        // every subscription is taken before the watches start.
        let mut watches = ConnectorWatches::new(&self.client, &self.namespaces);
        // One connector and one grant controller per scope.
        let controllers: Vec<_> = scopes
            .iter()
            .filter_map(|namespace| {
                let feed = watches.feed(namespace.as_deref())?;
                Some(connector::controller(
                    Arc::clone(&ctx),
                    namespace.clone(),
                    feed,
                    shutdown.clone(),
                ))
            })
            .collect();
        let grant_controllers: Vec<_> = scopes
            .into_iter()
            .map(|namespace| {
                let connector_changes = watches.all_changes();
                grant::controller(Arc::clone(&grant_ctx), namespace, connector_changes, shutdown.clone())
            })
            .collect();
        let watching = watches.run(Arc::clone(&self.ready), shutdown.clone());
        self.leading.store(true, Ordering::Relaxed);
        futures::future::join3(
            watching,
            futures::future::join_all(controllers),
            futures::future::join_all(grant_controllers),
        )
        .await;
        self.leading.store(false, Ordering::Relaxed);
        self.manager.stop_all().await;
    }

    /// Waits for the Lease, runs the controllers while holding it, stops them
    /// when it is lost, and releases it on shutdown.
    pub async fn run_with_leader_election(
        &self,
        lease: &Lease,
        mut shutdown: watch::Receiver<bool>,
    ) -> anyhow::Result<()> {
        let (lease_name, namespace, identity) =
            (lease.name.as_str(), lease.namespace.as_str(), lease.identity.as_str());
        let manager = kube_lease_manager::LeaseManagerBuilder::new(self.client.clone(), lease_name)
            .with_namespace(namespace)
            .with_identity(identity)
            .with_duration(lease.duration_seconds)
            // Renew a third of the way before expiry.
            .with_grace((lease.duration_seconds / 3).max(1))
            .build()
            .await
            .context("setting up leader election")?;
        let (mut leader, lease_task) = manager.watch().await;
        tracing::info!(lease = lease_name, namespace, identity, "waiting for leadership");
        // A standby watches connectors for readiness only; the leader's
        // controllers run their own watches (module `watches`).
        let mut standby = Some(self.standby_watches());
        while !*shutdown.borrow() {
            let standing_by = async {
                match standby.as_mut() {
                    Some(watching) => watching.await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                changed = leader.changed() => { if changed.is_err() { break; } }
                _ = shutdown.changed() => { break; }
                _ = standing_by => {}
            }
            if !*leader.borrow_and_update() {
                continue;
            }
            // Stops the standby watches: the term runs its own.
            drop(standby.take());
            tracing::info!(identity, "became leader: starting controllers");
            let (stop_tx, stop_rx) = watch::channel(false);
            let mut lost = leader.clone();
            // Every Bitbucket write checks the lease itself: in-flight
            // reconciles stop writing the moment it is lost, not when they end.
            let controllers = self.run_controllers_fenced(wait_for(stop_rx), Fence::lease(leader.clone()));
            tokio::pin!(controllers);
            tokio::select! {
                _ = &mut controllers => {}
                _ = async { while lost.changed().await.is_ok() { if !*lost.borrow() { break; } } } => {
                    tracing::warn!(identity, "lost leadership: stopping controllers");
                    let _ = stop_tx.send(true);
                    controllers.await;
                }
                _ = shutdown.changed() => {
                    let _ = stop_tx.send(true);
                    controllers.await;
                }
            }
            standby = Some(self.standby_watches());
        }
        drop(standby);
        // Dropping the receiver makes the lease task release the Lease.
        drop(leader);
        match lease_task.await {
            Ok(Ok(_)) => tracing::info!("lease released"),
            Ok(Err(err)) => tracing::warn!(error = %err, "releasing the lease failed"),
            Err(err) => tracing::warn!(error = %err, "lease task failed"),
        }
        Ok(())
    }
}

impl Operator {
    /// The connector watches of a replica that does not lead: no controller
    /// consumes them, they only report readiness. Run until dropped.
    fn standby_watches(&self) -> BoxFuture<'static, ()> {
        ConnectorWatches::new(&self.client, &self.namespaces)
            .run(Arc::clone(&self.ready), std::future::pending())
            .boxed()
    }
}

/// The leader-election Lease and this replica's identity in it.
#[derive(Debug, Clone)]
pub struct Lease {
    pub name: String,
    pub namespace: String,
    pub identity: String,
    pub duration_seconds: u64,
}

/// Resolves when the flag turns true (or its sender is gone).
pub async fn wait_for(mut flag: watch::Receiver<bool>) {
    while !*flag.borrow_and_update() {
        if flag.changed().await.is_err() {
            return;
        }
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(term) => term,
            Err(_) => {
                let _ = ctrl_c.await;
                return;
            }
        };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_store_defaults_to_the_pod_volume_in_a_pod_and_a_local_file_elsewhere() {
        assert_eq!(
            store_path(None, true),
            Path::new("/var/lib/bitbucket-operator/store.db")
        );
        assert_eq!(store_path(None, false), Path::new("bitbucket-operator-store.db"));
        assert_eq!(store_path(Some(Path::new("/x/y.db")), true), Path::new("/x/y.db"));
    }

    #[tokio::test]
    async fn the_store_directory_is_created_or_the_error_says_why_in_one_line() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("a/b/store.db");
        open_store(db.clone()).await.unwrap();
        assert!(db.exists());
        let blocker = dir.path().join("file");
        std::fs::write(&blocker, b"x").unwrap();
        let err = open_store(blocker.join("sub/store.db")).await.unwrap_err().to_string();
        assert!(err.starts_with("cannot create the store directory"), "{err}");
        assert!(!err.contains('\n'), "{err}");
    }
}
