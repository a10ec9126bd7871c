//! One service-mode session: the connector's side of ConductorOne's task
//! protocol (PROTOCOL.md §1), run until cancelled.
//!
//! - **Hello** at start; retried from 1 s doubling to 5 min; a permanent
//!   refusal (bad credential, UNAUTHENTICATED, PERMISSION_DENIED,
//!   INVALID_ARGUMENT, UNIMPLEMENTED, FAILED_PRECONDITION, NOT_FOUND) stops
//!   the session ([`OnRejected::Stop`], the CLI) or waits
//!   [`Timing::rejected_retry`] and starts over ([`OnRejected::Retry`], the
//!   operator), never a tight loop.
//! - **GetTask** polling: no task → sleep the server's `next_poll` (clamped
//!   to 1 s–5 min); an RPC error → n² s after n errors in a row (≤ 60 s).
//!   Up to 3 tasks run at once, like the SDK's runner.
//! - Tasks: `hello` (a Hello with the task id, no FinishTask), `sync_full`
//!   (heartbeats, budget-aware snapshot, upload, FinishTask), `grant` and
//!   `revoke` (the provisioner; every failure non-retryable). Any other type
//!   is finished as UNIMPLEMENTED.
//! - **Shutdown** (the token is cancelled): polling stops; a running
//!   `sync_full` is cancelled and finished as CANCELLED (retryable); grants
//!   and revokes run to their end and are finished normally.
//!
//! The session publishes a [`SessionStatus`] on a watch channel for the
//! operator's status and Events, and counts into [`C1Metrics`].

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::credentials::ClientCredentials;
use super::metrics::C1Metrics;
use super::proto::baton::{self, task::TaskType as Kind};
use super::proto::{connector as pb, to_any};
use super::provisioning::{self, TaskRefusal};
use super::rpc::{C1Client, Finish, RpcError};
use super::snapshot::{self, TypeFreshness};
use super::status::{ConnectionReason, SessionStatus, TaskRecord, TaskResult, TaskType, UploadRecord, now_ms};
use super::token::C1Endpoint;
use super::{ExportError, export};
use crate::model::{self, ResourceType};
use crate::provision::Provisioner;
use crate::store::Store;
use crate::store::StoreError;
use crate::sync::{SyncEngine, SyncError};

/// Tasks run at once (the SDK's runner has 3 slots).
const TASK_SLOTS: usize = 3;
/// Failed heartbeats in a row that cancel a sync.
const MAX_HEARTBEAT_FAILURES: u32 = 10;

/// Waits and limits of the protocol. The defaults are the SDK's; tests
/// shorten them.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// Unit of the n² backoff after failed polls.
    pub error_unit: Duration,
    pub max_error_backoff: Duration,
    pub hello_first_retry: Duration,
    pub hello_max_retry: Duration,
    /// Bounds of the server's `next_poll`.
    pub min_poll: Duration,
    pub max_poll: Duration,
    /// Used when the server's `next_heartbeat` is 0.
    pub default_heartbeat: Duration,
    /// Lower bound of `next_heartbeat` (the SDK's is 1 s).
    pub min_heartbeat: Duration,
    /// With [`OnRejected::Retry`], the wait before trying a refused credential again.
    pub rejected_retry: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            error_unit: Duration::from_secs(1),
            max_error_backoff: Duration::from_secs(60),
            hello_first_retry: Duration::from_secs(1),
            hello_max_retry: Duration::from_secs(300),
            min_poll: Duration::from_secs(1),
            max_poll: Duration::from_secs(300),
            default_heartbeat: Duration::from_secs(30),
            min_heartbeat: Duration::from_secs(1),
            rejected_retry: Duration::from_secs(300),
        }
    }
}

/// What to do when ConductorOne refuses the credential or Hello for good.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnRejected {
    /// Return [`SessionError::Rejected`] (the CLI exits).
    Stop,
    /// Report it and try again after [`Timing::rejected_retry`] (the
    /// operator: the Secret may be fixed meanwhile).
    Retry,
}

/// Everything a session needs besides the Bitbucket side.
#[derive(Debug, Clone)]
pub struct ServiceSettings {
    /// The store connector name whose data is uploaded.
    pub connector: String,
    /// Sent in every call (1–256 characters); see [`default_host_id`].
    pub host_id: String,
    pub endpoint: C1Endpoint,
    /// Types with older data are refreshed before a `sync_full` upload (0: always).
    pub max_snapshot_age: Duration,
    /// Where c1z files are written before upload (removed afterwards).
    pub work_dir: PathBuf,
    pub on_rejected: OnRejected,
    pub timing: Timing,
}

/// The connector's Bitbucket side, shared with the rest of the process.
#[derive(Debug, Clone)]
pub struct Backend {
    pub store: Arc<Store>,
    /// Syncs stale types (shares the connector's client and limiter).
    pub engine: SyncEngine,
    /// Carries out grants and revokes (disabled provisioning refuses them).
    pub provisioner: Provisioner,
}

/// Why a session ended on its own.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SessionError {
    #[error("{message}")]
    Rejected { reason: ConnectionReason, message: String },
    #[error("{0}")]
    Setup(String),
}

/// `BATON_HOST_ID`, else the host name, else `baton-sdk` (as the SDK), cut to 256 characters.
pub fn default_host_id() -> String {
    let id = std::env::var("BATON_HOST_ID")
        .ok()
        .filter(|v| !v.trim().is_empty())
        .or_else(|| hostname::get().ok().and_then(|h| h.into_string().ok()))
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| "baton-sdk".to_owned());
    id.chars().take(256).collect()
}

/// A service-mode session; [`ServiceSession::run`] drives it.
pub struct ServiceSession {
    settings: ServiceSettings,
    client: C1Client,
    backend: Backend,
    status: watch::Sender<SessionStatus>,
    metrics: C1Metrics,
    /// One sync_full at a time: two would refresh and export the same data twice.
    sync_lock: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for ServiceSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceSession")
            .field("settings", &self.settings)
            .field("client", &self.client)
            .finish_non_exhaustive()
    }
}

enum HelloEnd {
    Accepted,
    Shutdown,
    Rejected(RpcError),
}

impl ServiceSession {
    /// Fails only on an unusable endpoint or CA bundle.
    pub fn new(
        settings: ServiceSettings,
        credentials: ClientCredentials,
        backend: Backend,
        metrics: Option<C1Metrics>,
    ) -> Result<Self, SessionError> {
        if settings.host_id.is_empty() || settings.host_id.chars().count() > 256 {
            return Err(SessionError::Setup("the host id must be 1 to 256 characters".into()));
        }
        let metrics = metrics.unwrap_or_default();
        let client = C1Client::new(
            Arc::new(credentials),
            settings.endpoint.clone(),
            &settings.host_id,
            Some(metrics.token_refreshes.clone()),
        )
        .map_err(SessionError::Setup)?;
        let (status, _) = watch::channel(SessionStatus::new(&settings.host_id));
        Ok(ServiceSession {
            settings,
            client,
            backend,
            status,
            metrics,
            sync_lock: tokio::sync::Mutex::new(()),
        })
    }

    /// The published status; changes whenever the connection or a task does.
    pub fn status(&self) -> watch::Receiver<SessionStatus> {
        self.status.subscribe()
    }

    /// Runs until `shutdown` is cancelled (then `Ok`), or until ConductorOne
    /// refuses us for good under [`OnRejected::Stop`].
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), SessionError> {
        let session = Arc::new(self);
        let result = session.run_inner(&shutdown).await;
        session.status.send_modify(|s| {
            if result.is_ok() {
                s.set_connection(ConnectionReason::Stopped, "stopped");
            }
        });
        result
    }

    async fn run_inner(self: &Arc<Self>, shutdown: &CancellationToken) -> Result<(), SessionError> {
        loop {
            let refused = match self.hello_until_accepted(shutdown).await {
                HelloEnd::Shutdown => return Ok(()),
                HelloEnd::Rejected(err) => err,
                HelloEnd::Accepted => match self.poll(shutdown).await {
                    None => return Ok(()),
                    Some(err) => err,
                },
            };
            let reason = refused.reason();
            let message = refused.describe();
            tracing::error!(reason = reason.as_str(), error = %message, "ConductorOne refused this connector");
            self.status.send_modify(|s| s.set_connection(reason, message.clone()));
            if self.settings.on_rejected == OnRejected::Stop {
                return Err(SessionError::Rejected { reason, message });
            }
            if sleep_or_shutdown(self.settings.timing.rejected_retry, shutdown).await {
                return Ok(());
            }
        }
    }

    /// The startup Hello, retried from `hello_first_retry` doubling to `hello_max_retry`.
    async fn hello_until_accepted(&self, shutdown: &CancellationToken) -> HelloEnd {
        let timing = self.settings.timing;
        let mut delay = timing.hello_first_retry;
        loop {
            let result = tokio::select! {
                _ = shutdown.cancelled() => return HelloEnd::Shutdown,
                r = self.client.hello("") => r,
            };
            match result {
                Ok(()) => {
                    tracing::info!(host_id = %self.settings.host_id, "ConductorOne accepted Hello");
                    self.status.send_modify(|s| {
                        s.set_connection(ConnectionReason::Connected, "Hello accepted; polling for tasks")
                    });
                    return HelloEnd::Accepted;
                }
                Err(err) if err.is_permanent() => return HelloEnd::Rejected(err),
                Err(err) => {
                    let message = err.describe();
                    tracing::warn!(error = %message, retry_in = ?delay, "Hello failed");
                    self.status
                        .send_modify(|s| s.set_connection(err.reason(), message.clone()));
                    if sleep_or_shutdown(delay, shutdown).await {
                        return HelloEnd::Shutdown;
                    }
                    delay = (delay * 2).min(timing.hello_max_retry);
                }
            }
        }
    }

    /// Polls and starts tasks until shutdown (`None`, after the running
    /// tasks ended) or a permanent refusal.
    async fn poll(self: &Arc<Self>, shutdown: &CancellationToken) -> Option<RpcError> {
        let timing = self.settings.timing;
        let slots = Arc::new(Semaphore::new(TASK_SLOTS));
        let mut tasks = JoinSet::new();
        let mut errors: u32 = 0;
        let end = loop {
            while tasks.try_join_next().is_some() {}
            let permit = tokio::select! {
                _ = shutdown.cancelled() => break None,
                p = Arc::clone(&slots).acquire_owned() => p.expect("the semaphore is never closed"),
            };
            let result = tokio::select! {
                _ = shutdown.cancelled() => break None,
                r = self.client.get_task() => r,
            };
            let wait = match result {
                // A token refused mid-session is dropped by the client; one more
                // try with a fresh token tells an expired token from a revoked credential.
                Err(err) if err.is_permanent() && errors > 0 => break Some(err),
                Err(err) => {
                    errors = errors.saturating_add(1);
                    let wait = (timing.error_unit * errors.saturating_mul(errors)).min(timing.max_error_backoff);
                    let message = err.describe();
                    tracing::warn!(error = %message, errors, retry_in = ?wait, "GetTask failed");
                    self.status
                        .send_modify(|s| s.set_connection(err.reason(), message.clone()));
                    wait
                }
                Ok(response) => {
                    errors = 0;
                    self.mark_connected();
                    match response.task.filter(|t| !matches!(t.task_type, Some(Kind::None(_)))) {
                        Some(task) => {
                            let heartbeat = duration(response.next_heartbeat.as_ref());
                            let session = Arc::clone(self);
                            let shutdown = shutdown.clone();
                            tasks.spawn(async move {
                                session.handle(task, heartbeat, &shutdown).await;
                                drop(permit);
                            });
                            continue;
                        }
                        None => duration(response.next_poll.as_ref())
                            .unwrap_or_default()
                            .clamp(timing.min_poll, timing.max_poll),
                    }
                }
            };
            if sleep_or_shutdown(wait, shutdown).await {
                break None;
            }
        };
        while tasks.join_next().await.is_some() {}
        end
    }

    fn mark_connected(&self) {
        self.status.send_if_modified(|s| {
            if s.reason == ConnectionReason::Connected {
                return false;
            }
            s.set_connection(ConnectionReason::Connected, "Hello accepted; polling for tasks");
            true
        });
    }

    /// Runs one task and records how it ended.
    async fn handle(&self, task: baton::Task, heartbeat: Option<Duration>, shutdown: &CancellationToken) {
        let id = task.id.clone();
        let (task_type, result, message) = match task.task_type {
            Some(Kind::Hello(_)) => match self.client.hello(&id).await {
                Ok(()) => (TaskType::Hello, TaskResult::Succeeded, "Hello sent".to_owned()),
                Err(err) => (TaskType::Hello, TaskResult::Failed, err.describe()),
            },
            Some(Kind::SyncFull(options)) => {
                // Always a complete v1 snapshot; say what was asked for and not honoured.
                tracing::info!(
                    task_id = %id,
                    storage_engine = %options.storage_engine,
                    targeted_resources = options.targeted_sync_resources.len(),
                    resource_type_filter = ?options.sync_resource_type_ids,
                    skip_grants = options.skip_grants || options.skip_entitlements_and_grants,
                    "sync_full: writing a complete c1z v1 whatever the options"
                );
                let (result, message) = self.sync_full(&id, heartbeat, shutdown).await;
                (TaskType::SyncFull, result, message)
            }
            Some(Kind::Grant(grant)) => {
                let (result, message) = self.grant(&id, grant).await;
                (TaskType::Grant, result, message)
            }
            Some(Kind::Revoke(revoke)) => {
                let (result, message) = self.revoke(&id, revoke).await;
                (TaskType::Revoke, result, message)
            }
            Some(Kind::None(_)) | None => {
                let message = "this connector does not support this task type".to_owned();
                self.finish(&id, error(tonic::Code::Unimplemented, &message, true))
                    .await;
                (TaskType::Unsupported, TaskResult::Failed, message)
            }
        };
        match result {
            TaskResult::Succeeded => tracing::info!(task_id = %id, task_type = task_type.as_str(), "{message}"),
            _ => tracing::warn!(task_id = %id, task_type = task_type.as_str(), result = result.as_str(), "{message}"),
        }
        self.metrics.task(task_type, result);
        self.status.send_modify(|s| {
            s.record_task(TaskRecord {
                task_type,
                id,
                result,
                message,
                finished_at: now_ms(),
            })
        });
    }

    /// FinishTask, retried 3 times: the task's outcome is worth a few seconds.
    async fn finish(&self, task_id: &str, finish: Finish) {
        for attempt in 1..=3u32 {
            match self.client.finish(task_id, finish.clone()).await {
                Ok(()) => return,
                Err(err) => {
                    tracing::warn!(task_id, attempt, error = %err.describe(), "FinishTask failed");
                    tokio::time::sleep(self.settings.timing.error_unit * attempt).await;
                }
            }
        }
    }

    /// `sync_full`: heartbeats around the snapshot and upload (see the module doc).
    async fn sync_full(
        &self,
        task_id: &str,
        heartbeat: Option<Duration>,
        shutdown: &CancellationToken,
    ) -> (TaskResult, String) {
        let mut every = match self.client.heartbeat(task_id).await {
            Err(err) => {
                return (
                    TaskResult::Dropped,
                    format!("first heartbeat failed: {}", err.describe()),
                );
            }
            Ok(r) if r.cancelled => {
                self.finish(
                    task_id,
                    error(tonic::Code::Cancelled, "cancelled by ConductorOne", false),
                )
                .await;
                return (
                    TaskResult::Cancelled,
                    "cancelled by ConductorOne before it started".into(),
                );
            }
            Ok(r) => self.heartbeat_interval(duration(r.next_heartbeat.as_ref()).or(heartbeat)),
        };
        let _one_at_a_time = self.sync_lock.lock().await;
        // Boxed so that dropping it (below) really cancels it before FinishTask.
        let mut work = Box::pin(self.snapshot_and_upload(task_id));
        let mut failures = 0;
        let outcome = loop {
            tokio::select! {
                result = &mut work => break Ok(result),
                _ = shutdown.cancelled() => break Err("cancelled: the connector is shutting down".to_owned()),
                _ = tokio::time::sleep(every) => match self.client.heartbeat(task_id).await {
                    Ok(r) if r.cancelled => break Err("cancelled by ConductorOne".to_owned()),
                    Ok(r) => {
                        failures = 0;
                        every = self.heartbeat_interval(duration(r.next_heartbeat.as_ref()));
                    }
                    Err(err) => {
                        failures += 1;
                        tracing::warn!(task_id, failures, error = %err.describe(), "heartbeat failed");
                        if failures >= MAX_HEARTBEAT_FAILURES {
                            break Err(format!("cancelled after {failures} failed heartbeats"));
                        }
                    }
                },
            }
        };
        // Dropping the work cancels it; an interrupted refresh is recorded as failed.
        drop(work);
        match outcome {
            Ok(Ok((upload, freshness))) => {
                self.finish(task_id, Finish::Success { response: None }).await;
                self.metrics.upload_bytes.inc_by(upload.bytes);
                let message = format!(
                    "uploaded {} bytes ({} resources); {}",
                    upload.bytes,
                    upload.resources,
                    describe_freshness(&freshness)
                );
                self.status.send_modify(|s| s.last_upload = Some(upload));
                (TaskResult::Succeeded, message)
            }
            Ok(Err(err)) => {
                let (code, non_retryable) = err.code();
                self.finish(task_id, error(code, &err.to_string(), non_retryable)).await;
                (TaskResult::Failed, err.to_string())
            }
            Err(why) => {
                self.finish(task_id, error(tonic::Code::Cancelled, &why, false)).await;
                (TaskResult::Cancelled, why)
            }
        }
    }

    fn heartbeat_interval(&self, from_server: Option<Duration>) -> Duration {
        let timing = self.settings.timing;
        match from_server {
            None => timing.default_heartbeat,
            Some(d) if d.is_zero() => timing.default_heartbeat,
            Some(d) => d.clamp(timing.min_heartbeat, Duration::from_secs(300)),
        }
    }

    /// Refreshes stale types, writes the c1z and uploads it (3 attempts).
    async fn snapshot_and_upload(&self, task_id: &str) -> Result<(UploadRecord, Vec<TypeFreshness>), SyncTaskError> {
        let Backend { store, engine, .. } = &self.backend;
        let connector = self.settings.connector.clone();
        let max_age = self.settings.max_snapshot_age;
        let plan = {
            let (store, connector) = (Arc::clone(store), connector.clone());
            tokio::task::spawn_blocking(move || snapshot::stale_kinds(&store, &connector, max_age))
                .await
                .map_err(|e| SyncTaskError::Sync(SyncError::from(StoreError::Task(e.to_string()))))??
        };
        tracing::info!(task_id, max_snapshot_age = ?max_age, "{}", describe_freshness(&plan));
        snapshot::refresh(engine, store, &connector, &plan).await?;
        let path = self
            .settings
            .work_dir
            .join(format!(".c1-{task_id}-{}.c1z", std::process::id()));
        let _cleanup = RemoveOnDrop(path.clone());
        let report = {
            let (store, path) = (Arc::clone(store), path.clone());
            tokio::task::spawn_blocking(move || export(&store, &connector, &path))
                .await
                .map_err(|e| SyncTaskError::Sync(SyncError::from(StoreError::Task(e.to_string()))))??
        };
        tracing::info!(task_id, data_age_seconds = ?report.data_age_seconds, bytes = report.file.bytes, "c1z written");
        let mut attempt = 0;
        let bytes = loop {
            attempt += 1;
            match self.client.upload(task_id, &path).await {
                Ok(bytes) => break bytes,
                Err(err) if attempt < 3 => {
                    tracing::warn!(task_id, attempt, error = %err.describe(), "upload failed; retrying");
                    tokio::time::sleep(self.settings.timing.error_unit * attempt).await;
                }
                Err(err) => return Err(SyncTaskError::Upload(err)),
            }
        };
        let upload = UploadRecord {
            at: now_ms(),
            bytes,
            resources: report.file.resources as u64,
        };
        Ok((upload, plan))
    }

    async fn grant(&self, task_id: &str, task: baton::task::GrantTask) -> (TaskResult, String) {
        let (Some(entitlement), Some(principal)) = (task.entitlement, task.principal) else {
            let message = "the grant task names no entitlement or no principal";
            self.finish(task_id, error(tonic::Code::InvalidArgument, message, true))
                .await;
            return (TaskResult::Failed, message.to_owned());
        };
        let outcome = async {
            let request = self.access_request(&entitlement, &principal).await?;
            provisioning::grant(&self.backend.provisioner, &request).await
        }
        .await;
        match outcome {
            Ok(done) => {
                let response = pb::GrantManagerServiceGrantResponse {
                    annotations: Vec::new(),
                    grants: vec![granted(&entitlement, &principal)],
                };
                let any = to_any("c1.connector.v2.GrantManagerServiceGrantResponse", &response);
                self.finish(task_id, Finish::Success { response: Some(any) }).await;
                (TaskResult::Succeeded, done.message())
            }
            Err(refusal) => self.refuse(task_id, refusal).await,
        }
    }

    async fn revoke(&self, task_id: &str, task: baton::task::RevokeTask) -> (TaskResult, String) {
        let grant = task.grant.unwrap_or_default();
        let (Some(entitlement), Some(principal)) = (grant.entitlement, grant.principal) else {
            let message = "the revoke task names no grant entitlement or principal";
            self.finish(task_id, error(tonic::Code::InvalidArgument, message, true))
                .await;
            return (TaskResult::Failed, message.to_owned());
        };
        let outcome = async {
            let request = self.access_request(&entitlement, &principal).await?;
            provisioning::revoke(&self.backend.provisioner, &request).await
        }
        .await;
        match outcome {
            Ok(done) => {
                let response = pb::GrantManagerServiceRevokeResponse::default();
                let any = to_any("c1.connector.v2.GrantManagerServiceRevokeResponse", &response);
                self.finish(task_id, Finish::Success { response: Some(any) }).await;
                (TaskResult::Succeeded, done.message())
            }
            Err(refusal) => self.refuse(task_id, refusal).await,
        }
    }

    async fn access_request(
        &self,
        entitlement: &pb::Entitlement,
        principal: &pb::Resource,
    ) -> Result<crate::provision::AccessRequest, TaskRefusal> {
        let (store, connector) = (Arc::clone(&self.backend.store), self.settings.connector.clone());
        let (entitlement, principal) = (entitlement.clone(), principal.clone());
        tokio::task::spawn_blocking(move || provisioning::access_request(&store, &connector, &entitlement, &principal))
            .await
            .map_err(|e| TaskRefusal::Store(e.to_string()))?
    }

    /// Grant and revoke failures are final (the SDK marks them non-retryable).
    async fn refuse(&self, task_id: &str, refusal: TaskRefusal) -> (TaskResult, String) {
        let message = refusal.to_string();
        self.finish(task_id, error(refusal.code(), &message, true)).await;
        (TaskResult::Failed, message)
    }
}

/// The grant ConductorOne asked for, as the response's `grants`.
fn granted(entitlement: &pb::Entitlement, principal: &pb::Resource) -> pb::Grant {
    let principal_id = principal.id.clone().unwrap_or_default();
    let principal_type = ResourceType::parse(&principal_id.resource_type).unwrap_or(ResourceType::User);
    pb::Grant {
        id: model::grant_id(&entitlement.id, principal_type, &principal_id.resource),
        entitlement: Some(entitlement.clone()),
        principal: Some(principal.clone()),
        annotations: Vec::new(),
    }
}

fn error(code: tonic::Code, message: &str, non_retryable: bool) -> Finish {
    Finish::Error {
        code,
        message: message.to_owned(),
        non_retryable,
    }
}

/// Why a sync_full failed.
#[derive(Debug, thiserror::Error)]
enum SyncTaskError {
    #[error("refreshing from Bitbucket failed: {0}")]
    Sync(#[from] SyncError),
    #[error("writing the c1z failed: {0}")]
    Export(#[from] ExportError),
    #[error("uploading the c1z failed: {}", .0.describe())]
    Upload(RpcError),
}

impl SyncTaskError {
    /// The FinishTask code, and whether a retry cannot help.
    fn code(&self) -> (tonic::Code, bool) {
        match self {
            SyncTaskError::Sync(err) if err.is_configuration_error() => (tonic::Code::FailedPrecondition, true),
            SyncTaskError::Sync(SyncError::RateLimited(_)) => (tonic::Code::ResourceExhausted, false),
            SyncTaskError::Sync(SyncError::Unavailable(_)) => (tonic::Code::Unavailable, false),
            SyncTaskError::Sync(_) | SyncTaskError::Export(_) => (tonic::Code::Internal, false),
            SyncTaskError::Upload(_) => (tonic::Code::Unavailable, false),
        }
    }
}

struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// `accounts 12m (kept), groups never synced (refreshed), ...`
fn describe_freshness(plan: &[TypeFreshness]) -> String {
    let parts: Vec<String> = plan
        .iter()
        .map(|t| {
            let age = match t.age {
                Some(a) => format!("{}s old", a.as_secs()),
                None => "never synced".to_owned(),
            };
            let action = if t.refreshed { "refreshed" } else { "kept" };
            format!("{} {age} ({action})", t.kind.resource_type())
        })
        .collect();
    format!("data age: {}", parts.join(", "))
}

fn duration(d: Option<&prost_types::Duration>) -> Option<Duration> {
    let d = d?;
    let nanos = u32::try_from(d.nanos).unwrap_or(0).min(999_999_999);
    u64::try_from(d.seconds).ok().map(|s| Duration::new(s, nanos))
}

/// Sleeps; `true` when cancelled first.
async fn sleep_or_shutdown(wait: Duration, shutdown: &CancellationToken) -> bool {
    tokio::select! {
        _ = shutdown.cancelled() => true,
        _ = tokio::time::sleep(wait) => false,
    }
}
