//! The `BitbucketConnector` reconciler.
//!
//! One pass: honour `suspend`; refuse an `apiUrl` off the administrator's
//! allow-list before anything else; read the referenced Secret from the
//! connector's own namespace, only if it opts in ([`super::secret`]); configure the connector's runtime (hot-reloading
//! credentials); check the credentials when anything they depend on changed;
//! start, retune or stop the sync loops; handle Flux's
//! `reconcile.fluxcd.io/requestedAt`; compute the status
//! ([`super::status::compute`]) and write it only when it changed; emit
//! Events on transitions only. Deletion (finalizer) stops the loops and
//! deletes the connector's data. Backoff, the status writer, the error policy
//! and metrics come from [`super::common::Scaffold`]; [`controller`] wires
//! the watches.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;
use kube::api::Api;
use kube::core::PartialObjectMeta;
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::finalizer::{self, finalizer};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::utils::Predicate;
use kube::runtime::{Controller, WatchStreamExt, predicates, watcher};
use tokio::sync::mpsc;

use super::common::{MetricLabel, Scaffold};
use super::conductorone::reconcile_session;
use super::loops::{ConfigureError, ConnectorRuntime, EngineSettings, Manager, loop_statuses, runtime_key};
use super::rotation::{RotationView, reconcile_rotation};
use super::secret::{SecretRead, read_opted_in};
use super::status::{self, C1Health, Health, Observation, ProgressObservation};
use super::watches::ScopeFeed;
use crate::bitbucket::{DEFAULT_API_URL, Limits};
use crate::crd::{
    BitbucketConnector, BitbucketConnectorStatus, CONNECTOR_FINALIZER, ConditionStatus, EventReason,
    RECONCILE_REQUESTED_AT_ANNOTATION, Reason, condition_status, condition_type as ct,
};
use crate::metrics::{ConnectorLabels, Metrics, ObjectLabels};
use crate::model::SyncKind;
use crate::settings::{ConnectorSettings, SecretValues, SettingsError, not_opted_in_message, opt_in_selector};
use crate::store::{Store, StoreError};
use crate::sync::{FailureClass, SyncError};

pub use super::common::FIELD_MANAGER;

/// Shared by every reconcile.
pub struct Context {
    pub scaffold: Scaffold<BitbucketConnector>,
    pub manager: Arc<Manager>,
    /// The watched namespaces (empty: all), where a deleted connector's grants are looked for.
    pub(super) watched: Vec<String>,
}

impl Context {
    pub fn new(client: kube::Client, manager: Arc<Manager>, recorder: Recorder, metrics: Arc<Metrics>) -> Self {
        Context {
            scaffold: Scaffold::new("connector", client, recorder, metrics),
            manager,
            watched: Vec::new(),
        }
    }

    /// Scopes the context to the watched namespaces (`run --watch-namespaces`; empty: all).
    pub fn watching(mut self, namespaces: Vec<String>) -> Self {
        self.watched = namespaces;
        self
    }

    fn store(&self) -> &Arc<Store> {
        self.manager.store()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// Bitbucket is unavailable or throttling: status says so, retry with backoff.
    #[error("Bitbucket: {0}")]
    Bitbucket(#[source] SyncError),
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("background task: {0}")]
    Task(#[from] tokio::task::JoinError),
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<finalizer::Error<ReconcileError>>),
    #[error("object has no namespace")]
    NotNamespaced,
}

impl MetricLabel for ReconcileError {
    fn metric_label(&self) -> &'static str {
        match self {
            ReconcileError::Kube(_) => "kubernetes",
            ReconcileError::Bitbucket(_) => "bitbucket",
            ReconcileError::Store(_) | ReconcileError::Task(_) => "store",
            ReconcileError::Finalizer(inner) => inner.metric_label(),
            ReconcileError::NotNamespaced => "invalid",
        }
    }
}

impl From<FailureClass> for Reason {
    /// The condition reason of a failed credential check or sync: the sync
    /// layer classifies, only the controller speaks Kubernetes.
    fn from(class: FailureClass) -> Self {
        match class {
            FailureClass::InvalidCredentials => Reason::InvalidCredentials,
            FailureClass::InsufficientScopes => Reason::InsufficientScopes,
            FailureClass::WorkspaceNotFound => Reason::WorkspaceNotFound,
            FailureClass::RateLimited => Reason::RateLimited,
            FailureClass::Unavailable => Reason::BitbucketUnavailable,
            FailureClass::Api => Reason::SyncFailed,
            FailureClass::Store => Reason::StoreError,
        }
    }
}

impl From<&SyncError> for Reason {
    fn from(err: &SyncError) -> Self {
        Reason::from(err.class())
    }
}

/// Runs the connector controller for one namespace scope (`None`: all)
/// until `shutdown`, on that scope's shared connector watch (`feed`, see
/// [`super::watches`]). Sync loops ask for reconciles through the trigger
/// channel registered with the manager.
pub async fn controller(
    ctx: Arc<Context>,
    namespace: Option<String>,
    feed: ScopeFeed,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let client = ctx.scaffold.client.clone();
    let secrets: Api<PartialObjectMeta<Secret>> = match &namespace {
        Some(ns) => Api::namespaced(client, ns),
        None => Api::all(client),
    };
    let (trigger_tx, trigger_rx) = mpsc::unbounded_channel::<ObjectRef<BitbucketConnector>>();
    ctx.manager.register_trigger(namespace, trigger_tx);
    let ScopeFeed { reader, changes } = feed;
    // Generation (spec, deletion), annotation (Flux) and finalizer changes
    // only: status writes do not come back as reconciles. (The predicate
    // filter works on owned objects: the shared ones are copied in and out.)
    let connector_changes = changes
        .map(|connector| Ok((*connector).clone()))
        .predicate_filter(
            (predicates::generation as fn(&BitbucketConnector) -> Option<u64>)
                .combine(predicates::annotations as fn(&BitbucketConnector) -> Option<u64>)
                // The finalizer helper waits for its own write to come back.
                .combine(predicates::finalizers as fn(&BitbucketConnector) -> Option<u64>),
            Default::default(),
        )
        .filter_map(|changed: Result<BitbucketConnector, watcher::Error>| {
            std::future::ready(changed.ok().map(Arc::new))
        });
    let mapper_reader = reader.clone();
    // Metadata only, and only Secrets that opted in: Secret data never sits
    // in this cache. Labelling a Secret arrives as an add, unlabelling as a
    // delete; both reconcile the connectors that name it.
    let secret_changes = watcher(secrets, watcher::Config::default().labels(&opt_in_selector()))
        .default_backoff()
        .touched_objects();
    Controller::for_shared_stream(connector_changes, reader)
        .watches_stream(secret_changes, move |secret| {
            let namespace = secret.namespace();
            let name = secret.name_any();
            mapper_reader
                .state()
                .into_iter()
                .filter(|c| c.namespace() == namespace && c.spec.secret_ref.name == name)
                .map(|c| ObjectRef::from_obj(c.as_ref()))
                .collect::<Vec<_>>()
        })
        .reconcile_on(futures::stream::poll_fn({
            let mut triggers = trigger_rx;
            move |cx| triggers.poll_recv(cx)
        }))
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            if let Err(err) = result {
                tracing::debug!(error = %err, "controller event");
            }
        })
        .await;
}

/// The controller's entry point for one connector.
pub async fn reconcile(obj: Arc<BitbucketConnector>, ctx: Arc<Context>) -> Result<Action, ReconcileError> {
    let namespace = obj.namespace().ok_or(ReconcileError::NotNamespaced)?;
    let span = tracing::info_span!("reconcile", namespace = %namespace, name = %obj.name_any());
    let api: Api<BitbucketConnector> = Api::namespaced(ctx.scaffold.client.clone(), &namespace);
    // Held grants are revoked before the finalizer's cleanup may run.
    if let Some(action) = super::connector_deletion::hold_for_grants(&obj, &ctx, &namespace).await? {
        return Ok(action);
    }
    let pass = finalizer(&api, CONNECTOR_FINALIZER, obj, |event| async {
        match event {
            finalizer::Event::Apply(obj) => apply(obj, &ctx).await,
            finalizer::Event::Cleanup(obj) => cleanup(obj, &ctx).await,
        }
    });
    ctx.scaffold
        .timed(tracing::Instrument::instrument(pass, span))
        .await
        .map_err(|e| ReconcileError::Finalizer(Box::new(e)))
}

/// Per-object exponential backoff ([`super::common::backoff`]).
pub fn error_policy(obj: Arc<BitbucketConnector>, err: &ReconcileError, ctx: Arc<Context>) -> Action {
    ctx.scaffold.error_policy(obj.as_ref(), err)
}

/// What the Secret gave, or why it could not.
pub(super) enum SecretOutcome {
    /// The settings, the values read (to scrub) and the provisioning switch.
    Settings(ConnectorSettings, SecretValues, super::grant::policy::Switch),
    Problem {
        reason: Reason,
        message: String,
    },
}

pub(super) async fn read_settings(
    obj: &BitbucketConnector,
    ctx: &Context,
    namespace: &str,
) -> Result<SecretOutcome, ReconcileError> {
    let secret_name = &obj.spec.secret_ref.name;
    // Only the connector's own namespace: a connector can never read another
    // namespace's Secret.
    let secret = match read_opted_in(&ctx.scaffold.client, namespace, secret_name).await? {
        SecretRead::Found(secret) => secret,
        SecretRead::NotFound => {
            return Ok(SecretOutcome::Problem {
                reason: Reason::SecretNotFound,
                message: format!("Secret {namespace}/{secret_name} not found"),
            });
        }
        SecretRead::NotOptedIn => {
            return Ok(SecretOutcome::Problem {
                reason: Reason::SecretNotOptedIn,
                message: not_opted_in_message(namespace, secret_name),
            });
        }
    };
    let read = settings_for(obj, &secret)
        .and_then(|(settings, values)| Ok((settings, values, super::grant::lookup::switch_of(obj, &secret)?)));
    Ok(match read {
        Ok((settings, values, switch)) => SecretOutcome::Settings(settings, values, switch),
        Err(err) => SecretOutcome::Problem {
            reason: settings_reason(&err),
            message: format!("Secret {secret_name}: {err}"),
        },
    })
}

/// The condition reason of a Secret that cannot be turned into settings.
pub(crate) fn settings_reason(err: &SettingsError) -> Reason {
    match err {
        SettingsError::InvalidSecretKeys { .. } => Reason::InvalidSecretKeys,
        SettingsError::Invalid { .. } => Reason::InvalidSpec,
        SettingsError::NoCredentials { .. } | SettingsError::KeyMissing { .. } | SettingsError::NotText { .. } => {
            Reason::SecretKeyMissing
        }
    }
}

/// The connector's settings: its Secret, read with its key names, and the
/// spec's overrides. The grant controller reads provisioning the same way.
pub(crate) fn settings_for(
    obj: &BitbucketConnector,
    secret: &Secret,
) -> Result<(ConnectorSettings, SecretValues), SettingsError> {
    let (mut settings, values) = ConnectorSettings::read_secret(secret, &obj.spec.secret_keys())?;
    if let Some(workspaces) = &obj.spec.workspaces {
        settings.workspaces = workspaces.clone();
    }
    // The one rule for the CR's switch against the Secret's (a Secret's
    // explicit false is a veto): see `grant::policy::resolve_switch`.
    settings.provisioning = super::grant::lookup::switch_of(obj, secret)?.enabled;
    Ok((settings, values))
}

/// Interval per enabled kind; `None` for disabled ones. At least a minute,
/// whatever the schema let through.
fn desired_loops(obj: &BitbucketConnector) -> Result<BTreeMap<SyncKind, Option<Duration>>, String> {
    SyncKind::ALL
        .iter()
        .map(|&kind| {
            if !obj.spec.is_enabled(kind) {
                return Ok((kind, None));
            }
            let interval = obj.spec.interval_for(kind).map_err(|e| format!("{kind}: {e}"))?;
            Ok((kind, Some(interval.max(Duration::from_secs(60)))))
        })
        .collect()
}

/// What one pass found, before the status is computed from it.
struct Pass {
    health: Health,
    requeue: Duration,
    fingerprint: Option<(String, jiff::Timestamp)>,
    credentials_changed: bool,
    /// A transient Bitbucket failure: status says so, and the reconcile
    /// returns it as an error so the controller backs off.
    transient: Option<SyncError>,
    running: BTreeSet<SyncKind>,
    conductor_one: C1Health,
    rotation: RotationView,
    /// The provisioning switch, when the Secret could be read.
    provisioning: Option<super::grant::policy::Switch>,
}

impl Pass {
    fn new(health: Health, requeue: Duration) -> Self {
        Pass {
            health,
            requeue,
            fingerprint: None,
            credentials_changed: false,
            transient: None,
            running: BTreeSet::new(),
            conductor_one: C1Health::Unobserved,
            rotation: RotationView::Unobserved,
            provisioning: None,
        }
    }

    /// A pass after which no ConductorOne session runs, and why.
    fn without_session(mut self, why: &str) -> Self {
        self.conductor_one = C1Health::Stopped {
            message: format!("The ConductorOne session is not running: {why}"),
        };
        self
    }
}

const DEFAULT_REQUEUE: Duration = Duration::from_secs(600);
const STALLED_REQUEUE: Duration = Duration::from_secs(300);

async fn apply(obj: Arc<BitbucketConnector>, ctx: &Context) -> Result<Action, ReconcileError> {
    let namespace = obj.namespace().ok_or(ReconcileError::NotNamespaced)?;
    let key = runtime_key(&ObjectRef::from_obj(obj.as_ref()));
    // The newest status we know of: ours if the cache has not caught up yet.
    let current = ctx.scaffold.current_status(&obj);
    let requested = obj.annotations().get(RECONCILE_REQUESTED_AT_ANNOTATION).cloned();
    let already_handled = current.as_ref().and_then(|s| s.last_handled_reconcile_at.clone());
    // Flux waits for its request to be acknowledged: record it whatever the
    // outcome (a stalled connector must say so rather than time out).
    let newly_requested = requested.is_some() && requested != already_handled;

    if current.is_none() && !obj.spec.suspend {
        // Say "Pending" at once, before the credential check talks to Bitbucket.
        let pending = status::compute(&Observation {
            generation: obj.metadata.generation,
            spec: &obj.spec,
            previous: None,
            health: Health::Connecting,
            loops: BTreeMap::new(),
            fingerprint: None,
            handled_reconcile_at: None,
            conductor_one: C1Health::Unobserved,
            progress: ProgressObservation::idle(),
        });
        ctx.scaffold.write_status(&obj, &pending).await?;
    }

    let mut pass = if obj.spec.suspend {
        ctx.manager.remove(&key).await;
        Pass::new(Health::Suspended, DEFAULT_REQUEUE).without_session("spec.suspend is true")
    } else {
        observe(&obj, ctx, &namespace, &key, newly_requested, current.as_ref()).await?
    };
    let loops = current_loops(&obj, ctx, &key).await?;
    if let Health::Connected { .. } = pass.health {
        pass.requeue = next_due(&obj, &loops, &pass.running).unwrap_or(pass.requeue);
    }
    if let Some(due) = pass.rotation.requeue() {
        pass.requeue = pass.requeue.min(due);
    }
    let mut new_status = status::compute(&Observation {
        generation: obj.metadata.generation,
        spec: &obj.spec,
        previous: current.as_ref(),
        health: pass.health,
        loops,
        fingerprint: pass.fingerprint,
        handled_reconcile_at: if newly_requested { requested } else { None },
        conductor_one: pass.conductor_one,
        progress: ctx
            .manager
            .runtime(&key)
            .map_or_else(ProgressObservation::idle, |runtime| runtime.progress()),
    });
    pass.rotation.apply_status(&mut new_status, obj.metadata.generation);
    if let Some(switch) = &pass.provisioning {
        set_provisioning_condition(&mut new_status, switch, obj.metadata.generation);
    }
    publish_transitions(&obj, current.as_ref(), &new_status, pass.credentials_changed, ctx).await;
    record_gauges(&obj, &namespace, &new_status, &ctx.scaffold.metrics);
    ctx.scaffold.write_status(&obj, &new_status).await?;
    if let Some(err) = pass.transient {
        return Err(ReconcileError::Bitbucket(err));
    }
    ctx.scaffold.succeeded(&key);
    Ok(if obj.spec.suspend {
        Action::await_change()
    } else {
        Action::requeue(pass.requeue)
    })
}

/// Refuses an `apiUrl` off the allow-list, then reads the Secret and, when
/// it is usable, configures the runtime and checks the connection.
async fn observe(
    obj: &Arc<BitbucketConnector>,
    ctx: &Context,
    namespace: &str,
    key: &str,
    newly_requested: bool,
    current: Option<&BitbucketConnectorStatus>,
) -> Result<Pass, ReconcileError> {
    let problem = |reason, message| Health::SecretProblem { reason, message };
    let api_url = obj.spec.api_url.clone().unwrap_or_else(|| DEFAULT_API_URL.to_owned());
    // Before the Secret is even read: a refused connector sends nothing anywhere.
    if let Err(err) = ctx.manager.egress().check_bitbucket_url(&api_url) {
        ctx.manager.remove(key).await;
        let message = format!("spec.apiUrl: {err}; an administrator allows base URLs with --allowed-api-urls");
        return Ok(Pass::new(problem(Reason::ApiUrlNotAllowed, message), STALLED_REQUEUE)
            .without_session("spec.apiUrl is not allowed"));
    }
    match (read_settings(obj, ctx, namespace).await?, desired_loops(obj)) {
        (_, Err(message)) => {
            ctx.manager.remove(key).await;
            Ok(
                Pass::new(problem(Reason::InvalidSpec, message), DEFAULT_REQUEUE)
                    .without_session("the spec is invalid"),
            )
        }
        (SecretOutcome::Problem { reason, message }, _) => {
            ctx.manager.remove(key).await;
            Ok(Pass::new(problem(reason, message), STALLED_REQUEUE).without_session("the Secret is not usable"))
        }
        (SecretOutcome::Settings(settings, values, switch), Ok(desired)) => {
            let engine_settings = engine_settings(obj, &settings, api_url);
            match ctx.manager.configure(
                ObjectRef::from_obj(obj.as_ref()),
                &settings,
                values,
                engine_settings.clone(),
            ) {
                Err(err) => {
                    ctx.manager.remove(key).await;
                    let reason = match err {
                        ConfigureError::NotAllowed(_) => Reason::ApiUrlNotAllowed,
                        ConfigureError::Client(_) => Reason::InvalidSpec,
                    };
                    Ok(Pass::new(problem(reason, err.to_string()), DEFAULT_REQUEUE)
                        .without_session("the Bitbucket client cannot be built"))
                }
                Ok((runtime, changed)) => {
                    let mut pass = connect(&runtime, &desired, newly_requested).await;
                    // Before the session: a promoted pair is what the session must use.
                    pass.rotation = reconcile_rotation(ctx, obj, &settings, current).await;
                    let session_settings = pass.rotation.session_settings(&settings);
                    pass.provisioning = Some(switch);
                    pass.conductor_one =
                        reconcile_session(&ctx.manager, &runtime, &obj.spec, &session_settings, &engine_settings).await;
                    pass.credentials_changed = changed;
                    pass.fingerprint = Some(runtime.fingerprint());
                    Ok(pass)
                }
            }
        }
    }
}

/// What the connector's engine is built from: its URL, workspaces and pacing.
pub(super) fn engine_settings(
    obj: &BitbucketConnector,
    settings: &ConnectorSettings,
    api_url: String,
) -> EngineSettings {
    let limits = obj.spec.rate_limit();
    EngineSettings {
        api_url,
        workspaces: settings.workspaces.clone(),
        limits: Limits {
            max_requests: limits.requests_per_hour.max(1),
            window: Duration::from_secs(3600),
            max_in_flight: limits.max_in_flight.max(1) as usize,
        },
    }
}

/// Checks the credentials when needed, then starts or stops the loops.
async fn connect(
    runtime: &Arc<ConnectorRuntime>,
    desired: &BTreeMap<SyncKind, Option<Duration>>,
    newly_requested: bool,
) -> Pass {
    let connection = match runtime.connection() {
        Some(last) if !runtime.needs_connection_check() => last,
        _ => runtime.check_connection().await,
    };
    match connection.result {
        Ok(workspaces) => {
            let started = runtime.ensure_loops(desired).await;
            if newly_requested {
                runtime.trigger_all(&started);
            }
            let mut pass = match runtime.refusal() {
                // Loops keep retrying; recovery clears it.
                Some(err) => Pass::new(
                    Health::ConnectFailed {
                        reason: Reason::from(&err),
                        message: runtime.scrub(&err.to_string()),
                        stalled: true,
                    },
                    STALLED_REQUEUE,
                ),
                None => Pass::new(Health::Connected { workspaces }, DEFAULT_REQUEUE),
            };
            pass.running = runtime.loop_kinds();
            pass
        }
        Err(err) => {
            runtime.stop_loops().await;
            let stalled = err.is_configuration_error();
            let health = Health::ConnectFailed {
                reason: Reason::from(&err),
                message: runtime.scrub(&err.to_string()),
                stalled,
            };
            let mut pass = Pass::new(health, if stalled { STALLED_REQUEUE } else { DEFAULT_REQUEUE });
            if !stalled {
                pass.transient = Some(err);
            }
            pass
        }
    }
}

/// Every loop's status, from the runtime when there is one, else from the store.
async fn current_loops(
    obj: &BitbucketConnector,
    ctx: &Context,
    key: &str,
) -> Result<BTreeMap<SyncKind, status::LoopStatus>, ReconcileError> {
    let enabled: BTreeMap<SyncKind, bool> = SyncKind::ALL.iter().map(|&k| (k, obj.spec.is_enabled(k))).collect();
    let store = Arc::clone(ctx.store());
    let runtime = ctx.manager.runtime(key);
    let key = key.to_owned();
    Ok(tokio::task::spawn_blocking(move || match runtime {
        Some(runtime) => runtime.loop_statuses(&store, &enabled),
        None => loop_statuses(&store, &key, &enabled, &BTreeSet::new()),
    })
    .await?)
}

/// The `Provisioning` condition: whether this connector grants access, and
/// why (a Secret's veto of `enabled: true` is `ProvisioningConflict`, never
/// silent). Informational: it does not affect `Ready`.
fn set_provisioning_condition(
    status: &mut BitbucketConnectorStatus,
    switch: &super::grant::policy::Switch,
    generation: Option<i64>,
) {
    crate::crd::set_condition(
        &mut status.conditions,
        crate::crd::new_condition(
            ct::PROVISIONING,
            switch.enabled,
            switch.reason,
            switch.message.clone(),
            generation,
        ),
    );
}

/// When the next loop run is due, so a requeue lands right after it.
fn next_due(
    obj: &BitbucketConnector,
    loops: &BTreeMap<SyncKind, status::LoopStatus>,
    running: &BTreeSet<SyncKind>,
) -> Option<Duration> {
    let now = jiff::Timestamp::now();
    loops
        .iter()
        .filter(|(kind, l)| l.enabled && running.contains(kind))
        .filter_map(|(kind, l)| {
            let interval = obj.spec.interval_for(*kind).ok()?;
            let end = l.last_end?;
            let due = end.checked_add(jiff::SignedDuration::try_from(interval).ok()?).ok()?;
            let wait = due.duration_since(now);
            Some(Duration::try_from(wait).unwrap_or_default())
        })
        .min()
        .map(|d| (d + Duration::from_secs(5)).clamp(Duration::from_secs(10), Duration::from_secs(3600)))
}

async fn cleanup(obj: Arc<BitbucketConnector>, ctx: &Context) -> Result<Action, ReconcileError> {
    let target = ObjectRef::from_obj(obj.as_ref());
    let key = runtime_key(&target);
    ctx.manager.remove(&key).await;
    super::rotation::forget_expiry(ctx, &obj);
    let store = Arc::clone(ctx.store());
    let store_key = key.clone();
    tokio::task::spawn_blocking(move || store.delete_connector(&store_key)).await??;
    ctx.scaffold
        .metrics
        .forget_connector(target.namespace.as_deref().unwrap_or_default(), &target.name);
    ctx.scaffold.forget(&key);
    tracing::info!(connector = %key, "connector deleted: loops stopped, data removed");
    Ok(Action::await_change())
}

fn record_gauges(obj: &BitbucketConnector, namespace: &str, status: &BitbucketConnectorStatus, metrics: &Metrics) {
    let ready = condition_status(&status.conditions, ct::READY) == Some(ConditionStatus::True);
    metrics
        .connector_ready
        .get_or_create(&ConnectorLabels {
            namespace: namespace.to_owned(),
            name: obj.name_any(),
        })
        .set(i64::from(ready));
    if let Some(resources) = &status.resources {
        for kind in SyncKind::ALL {
            if let Some(r) = resources.get(kind) {
                metrics
                    .objects
                    .get_or_create(&ObjectLabels {
                        namespace: namespace.to_owned(),
                        name: obj.name_any(),
                        resource_type: kind.as_str(),
                    })
                    .set(r.count);
            }
        }
    }
}

/// Events for what changed between two statuses: transitions only, so a
/// steady state never repeats an Event.
pub fn transition_events(
    previous: Option<&BitbucketConnectorStatus>,
    new: &BitbucketConnectorStatus,
    credentials_changed: bool,
) -> Vec<Event> {
    let mut events = Vec::new();
    let before = typed_condition(previous, ct::CONNECTED);
    let after = typed_condition(Some(new), ct::CONNECTED);
    if after != before
        && let Some((status, why, message)) = &after
    {
        let was = before.as_ref().map(|b| (b.0, b.1.as_str()));
        if *status == Some(ConditionStatus::True) && was.map(|w| w.0) != Some(Some(ConditionStatus::True)) {
            events.push(event(
                EventType::Normal,
                EventReason::Connected.as_str(),
                message.clone(),
            ));
        } else if *status == Some(ConditionStatus::False) && was != Some((Some(ConditionStatus::False), why.as_str())) {
            let name = match Reason::parse(why) {
                Some(reason) => EventReason::for_connection_failure(reason),
                None => why.as_str(),
            };
            events.push(event(EventType::Warning, name, message.clone()));
        }
    }
    let ready_before = typed_condition(previous, ct::READY);
    if let Some((status, why, message)) = typed_condition(Some(new), ct::READY)
        && status == Some(ConditionStatus::False)
        && why == Reason::SyncFailed.as_str()
        && ready_before.as_ref().map(|r| r.1.as_str()) != Some(Reason::SyncFailed.as_str())
    {
        events.push(event(EventType::Warning, EventReason::SyncFailed.as_str(), message));
    }
    events.extend(conductorone_event(previous, new));
    let conflict = |s: Option<&BitbucketConnectorStatus>| {
        typed_condition(s, ct::PROVISIONING).is_some_and(|c| c.1 == Reason::ProvisioningConflict.as_str())
    };
    if conflict(Some(new))
        && !conflict(previous)
        && let Some((_, _, message)) = typed_condition(Some(new), ct::PROVISIONING)
    {
        events.push(event(
            EventType::Warning,
            EventReason::ProvisioningConflict.as_str(),
            message,
        ));
    }
    if credentials_changed {
        let fingerprint = new
            .credentials
            .as_ref()
            .and_then(|c| c.fingerprint.clone())
            .unwrap_or_default();
        events.push(event(
            EventType::Normal,
            EventReason::CredentialsChanged.as_str(),
            format!("Credentials reloaded from the Secret (fingerprint {fingerprint})"),
        ));
    }
    events
}

/// `ConductorOneConnected` became True, or became False (or changed reason).
fn conductorone_event(previous: Option<&BitbucketConnectorStatus>, new: &BitbucketConnectorStatus) -> Option<Event> {
    let before = typed_condition(previous, ct::CONDUCTORONE_CONNECTED);
    let (status, why, message) = typed_condition(Some(new), ct::CONDUCTORONE_CONNECTED)?;
    let was = before.as_ref().map(|b| (b.0, b.1.as_str()));
    match status {
        Some(ConditionStatus::True) if was.map(|w| w.0) != Some(Some(ConditionStatus::True)) => Some(event(
            EventType::Normal,
            EventReason::ConductorOneConnected.as_str(),
            message,
        )),
        Some(ConditionStatus::False) if was != Some((Some(ConditionStatus::False), why.as_str())) => Some(event(
            EventType::Warning,
            EventReason::ConductorOneDisconnected.as_str(),
            format!("{why}: {message}"),
        )),
        _ => None,
    }
}

fn event(type_: EventType, reason: &str, note: String) -> Event {
    Event {
        type_,
        reason: reason.to_owned(),
        note: Some(note),
        action: "Reconcile".to_owned(),
        secondary: None,
    }
}

/// A condition's status (typed), reason and message.
fn typed_condition(
    status: Option<&BitbucketConnectorStatus>,
    type_: &str,
) -> Option<(Option<ConditionStatus>, String, String)> {
    let condition = status.and_then(|s| crate::crd::find_condition(&s.conditions, type_))?;
    Some((
        ConditionStatus::parse(&condition.status),
        condition.reason.clone(),
        condition.message.clone(),
    ))
}

async fn publish_transitions(
    obj: &BitbucketConnector,
    previous: Option<&BitbucketConnectorStatus>,
    new: &BitbucketConnectorStatus,
    credentials_changed: bool,
    ctx: &Context,
) {
    for event in transition_events(previous, new, credentials_changed) {
        ctx.scaffold.publish(obj, event).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{new_condition, set_condition};

    fn with(conditions: &[(&str, bool, Reason)]) -> BitbucketConnectorStatus {
        let mut status = BitbucketConnectorStatus::default();
        for (t, s, r) in conditions {
            set_condition(
                &mut status.conditions,
                new_condition(t, *s, *r, format!("{r} message"), Some(1)),
            );
        }
        status
    }

    fn reasons(events: &[Event]) -> Vec<&str> {
        events.iter().map(|e| e.reason.as_str()).collect()
    }

    #[test]
    fn events_fire_on_transitions_only() {
        let connected = with(&[
            ("Connected", true, Reason::Connected),
            ("Ready", true, Reason::SyncSucceeded),
        ]);
        assert_eq!(reasons(&transition_events(None, &connected, false)), ["Connected"]);
        assert!(
            transition_events(Some(&connected), &connected, false).is_empty(),
            "steady state is quiet"
        );

        let rejected = with(&[("Connected", false, Reason::InvalidCredentials)]);
        assert_eq!(
            reasons(&transition_events(Some(&connected), &rejected, false)),
            ["CredentialsRejected"]
        );
        assert!(transition_events(Some(&rejected), &rejected, false).is_empty());

        let missing = with(&[("Connected", false, Reason::SecretNotFound)]);
        assert_eq!(
            reasons(&transition_events(Some(&rejected), &missing, false)),
            ["SecretMissing"]
        );

        let failed = with(&[
            ("Connected", true, Reason::Connected),
            ("Ready", false, Reason::SyncFailed),
        ]);
        assert_eq!(
            reasons(&transition_events(Some(&connected), &failed, false)),
            ["SyncFailed"]
        );
        assert!(transition_events(Some(&failed), &failed, false).is_empty());

        assert_eq!(
            reasons(&transition_events(Some(&connected), &connected, true)),
            ["CredentialsChanged"]
        );
    }

    #[test]
    fn conductorone_events_fire_on_transitions_only() {
        let c1 = |status: bool, reason| with(&[(ct::CONDUCTORONE_CONNECTED, status, reason)]);
        let connected = c1(true, Reason::Connected);
        assert_eq!(
            reasons(&transition_events(None, &connected, false)),
            ["ConductorOneConnected"]
        );
        assert!(transition_events(Some(&connected), &connected, false).is_empty());
        let tls = c1(false, Reason::TlsError);
        assert_eq!(
            reasons(&transition_events(Some(&connected), &tls, false)),
            ["ConductorOneDisconnected"]
        );
        assert!(transition_events(Some(&tls), &tls, false).is_empty());
        let unreachable = c1(false, Reason::Unreachable);
        assert_eq!(
            reasons(&transition_events(Some(&tls), &unreachable, false)),
            ["ConductorOneDisconnected"],
            "a new reason is a new Event"
        );
    }

    #[test]
    fn sync_failures_map_to_the_reasons_status_always_had() {
        use crate::bitbucket::{EndpointClass, Error as ApiError, ErrorKind};
        let api = |kind| ApiError {
            class: EndpointClass::Members,
            kind,
            status: None,
            message: "m".into(),
            retry_after: None,
        };
        for (err, reason) in [
            (SyncError::from(api(ErrorKind::Unauthorized)), "InvalidCredentials"),
            (SyncError::from(api(ErrorKind::Forbidden)), "InsufficientScopes"),
            (SyncError::from(api(ErrorKind::RateLimited)), "RateLimited"),
            (SyncError::from(api(ErrorKind::Server)), "BitbucketUnavailable"),
            (SyncError::from(api(ErrorKind::Decode)), "SyncFailed"),
            (SyncError::WorkspaceNotFound { slug: "x".into() }, "WorkspaceNotFound"),
            (SyncError::NoWorkspaces, "WorkspaceNotFound"),
            (
                SyncError::Store(std::sync::Arc::new(crate::store::StoreError::ReadOnly)),
                "StoreError",
            ),
        ] {
            // The typed reason keeps the spelling status always had.
            assert_eq!(Reason::from(&err).as_str(), reason, "{err}");
        }
    }

    #[test]
    fn errors_keep_their_source_and_a_bounded_label() {
        use std::error::Error as _;
        let err = ReconcileError::Bitbucket(SyncError::NoWorkspaces);
        assert_eq!(err.metric_label(), "bitbucket");
        assert!(
            err.source()
                .is_some_and(|s| s.to_string().contains("administer no workspace"))
        );
        let wrapped = ReconcileError::Finalizer(Box::new(finalizer::Error::ApplyFailed(err)));
        assert_eq!(wrapped.metric_label(), "bitbucket");
        assert_eq!(ReconcileError::NotNamespaced.metric_label(), "invalid");
    }
}
