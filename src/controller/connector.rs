//! The `BitbucketConnector` reconciler.
//!
//! One pass: honour `suspend`; read the referenced Secret from the
//! connector's own namespace; configure the connector's runtime (hot-reloading
//! credentials); check the credentials when anything they depend on changed;
//! start, retune or stop the sync loops; handle Flux's
//! `reconcile.fluxcd.io/requestedAt`; compute the status and write it with
//! server-side apply only when it changed; emit Events on transitions only.
//! Deletion (finalizer) stops the loops and deletes the connector's data.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::finalizer::{self, finalizer};
use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};

use super::loops::{EngineSettings, Manager, loop_statuses, runtime_key};
use super::status::{self, Health, Observation};
use crate::bitbucket::{DEFAULT_API_URL, Limits};
use crate::crd::{
    BitbucketConnector, BitbucketConnectorStatus, CONNECTOR_FINALIZER, RECONCILE_REQUESTED_AT_ANNOTATION,
    condition_type as ct, find_condition, reason,
};
use crate::metrics::{ConnectorLabels, Metrics, ObjectLabels, ResultLabels};
use crate::model::SyncKind;
use crate::settings::{ConnectorSettings, SecretKeys, SettingsError};
use crate::store::Store;

/// The field manager of every write this controller makes.
pub const FIELD_MANAGER: &str = "bitbucket-operator";

/// Shared by every reconcile.
pub struct Context {
    pub client: kube::Client,
    pub manager: Arc<Manager>,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    /// Consecutive failures per connector, for exponential backoff.
    failures: Mutex<HashMap<String, u32>>,
    /// The status this controller last wrote, per connector (and object uid).
    /// The watch cache can lag behind our own writes; comparing with what we
    /// wrote keeps a late reconcile from writing the same status again or
    /// moving a condition's lastTransitionTime.
    written: Mutex<HashMap<String, (Option<String>, BitbucketConnectorStatus)>>,
}

impl Context {
    pub fn new(client: kube::Client, manager: Arc<Manager>, recorder: Recorder, metrics: Arc<Metrics>) -> Self {
        Context {
            client,
            manager,
            recorder,
            metrics,
            failures: Mutex::default(),
            written: Mutex::default(),
        }
    }

    /// What we last wrote for this object, if it is the same object (uid).
    fn last_written(&self, key: &str, uid: &Option<String>) -> Option<BitbucketConnectorStatus> {
        let written = self.written.lock().unwrap_or_else(|e| e.into_inner());
        written
            .get(key)
            .filter(|(written_uid, _)| written_uid == uid)
            .map(|(_, status)| status.clone())
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
    #[error("{0}")]
    Transient(String),
    #[error("store: {0}")]
    Store(String),
    #[error("finalizer: {0}")]
    Finalizer(Box<finalizer::Error<ReconcileError>>),
    #[error("object has no namespace")]
    NotNamespaced,
}

impl ReconcileError {
    /// A bounded label for metrics.
    pub fn metric_reason(&self) -> &'static str {
        match self {
            ReconcileError::Kube(_) => "kubernetes",
            ReconcileError::Transient(_) => "bitbucket",
            ReconcileError::Store(_) => "store",
            ReconcileError::Finalizer(inner) => match inner.as_ref() {
                finalizer::Error::ApplyFailed(e) | finalizer::Error::CleanupFailed(e) => e.metric_reason(),
                _ => "finalizer",
            },
            ReconcileError::NotNamespaced => "invalid",
        }
    }
}

/// The controller's entry point for one connector.
pub async fn reconcile(obj: Arc<BitbucketConnector>, ctx: Arc<Context>) -> Result<Action, ReconcileError> {
    let clock = std::time::Instant::now();
    let namespace = obj.namespace().ok_or(ReconcileError::NotNamespaced)?;
    let span = tracing::info_span!("reconcile", namespace = %namespace, name = %obj.name_any());
    let api: Api<BitbucketConnector> = Api::namespaced(ctx.client.clone(), &namespace);
    let result = tracing::Instrument::instrument(
        finalizer(&api, CONNECTOR_FINALIZER, obj, |event| async {
            match event {
                finalizer::Event::Apply(obj) => apply(obj, &ctx).await,
                finalizer::Event::Cleanup(obj) => cleanup(obj, &ctx).await,
            }
        }),
        span,
    )
    .await
    .map_err(|e| ReconcileError::Finalizer(Box::new(e)));
    ctx.metrics.reconcile_duration.observe(clock.elapsed().as_secs_f64());
    let label = if result.is_ok() { "ok" } else { "error" };
    ctx.metrics
        .reconciles
        .get_or_create(&ResultLabels { result: label })
        .inc();
    result
}

/// Per-object exponential backoff with jitter: 5 s, 10 s, 20 s … capped at 5 min.
pub fn error_policy(obj: Arc<BitbucketConnector>, err: &ReconcileError, ctx: Arc<Context>) -> Action {
    let key = format!("{}/{}", obj.namespace().unwrap_or_default(), obj.name_any());
    ctx.metrics
        .reconcile_errors
        .get_or_create(&crate::metrics::ReasonLabels {
            reason: err.metric_reason(),
        })
        .inc();
    let failures = {
        let mut failures = ctx.failures.lock().unwrap_or_else(|e| e.into_inner());
        let n = failures.entry(key.clone()).or_default();
        *n = n.saturating_add(1);
        *n
    };
    tracing::warn!(connector = %key, failures, error = %err, "reconcile failed");
    Action::requeue(backoff(failures))
}

fn backoff(failures: u32) -> Duration {
    crate::backoff::exponential(Duration::from_secs(5), Duration::from_secs(300), failures)
}

/// What the Secret gave, or why it could not.
enum SecretOutcome {
    Settings(ConnectorSettings),
    Problem { reason: &'static str, message: String },
}

async fn read_settings(
    obj: &BitbucketConnector,
    ctx: &Context,
    namespace: &str,
) -> Result<SecretOutcome, ReconcileError> {
    let secret_name = &obj.spec.secret_ref.name;
    // Only the connector's own namespace: a connector can never read another
    // namespace's Secret.
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), namespace);
    let Some(secret) = secrets.get_opt(secret_name).await? else {
        return Ok(SecretOutcome::Problem {
            reason: reason::SECRET_NOT_FOUND,
            message: format!("Secret {namespace}/{secret_name} not found"),
        });
    };
    let keys = secret_keys(obj);
    let wanted = keys.all();
    let mut data = BTreeMap::new();
    // Only the keys the connector reads: other entries (a binary CA bundle,
    // say) are none of its business.
    for (key, value) in secret
        .data
        .unwrap_or_default()
        .into_iter()
        .filter(|(k, _)| wanted.contains(&k.as_str()))
    {
        match String::from_utf8(value.0) {
            Ok(text) => {
                data.insert(key, text);
            }
            Err(_) => {
                return Ok(SecretOutcome::Problem {
                    reason: reason::SECRET_KEY_MISSING,
                    message: format!("Secret {secret_name}: key {key} is not UTF-8 text"),
                });
            }
        }
    }
    data.extend(secret.string_data.unwrap_or_default());
    match ConnectorSettings::from_map(&data, &keys) {
        Ok(mut settings) => {
            if let Some(workspaces) = &obj.spec.workspaces {
                settings.workspaces = workspaces.clone();
            }
            if let Some(provisioning) = obj.spec.provisioning {
                settings.provisioning = provisioning;
            }
            Ok(SecretOutcome::Settings(settings))
        }
        Err(err) => Ok(SecretOutcome::Problem {
            reason: match err {
                SettingsError::Invalid { .. } => reason::INVALID_SPEC,
                _ => reason::SECRET_KEY_MISSING,
            },
            message: format!("Secret {secret_name}: {err}"),
        }),
    }
}

pub(crate) fn secret_keys(obj: &BitbucketConnector) -> SecretKeys {
    let k = obj.spec.secret_keys();
    SecretKeys {
        username: k.username().to_owned(),
        app_password: k.app_password().to_owned(),
        token: k.token().to_owned(),
        consumer_key: k.consumer_key().to_owned(),
        consumer_secret: k.consumer_secret().to_owned(),
        workspaces: k.workspaces().to_owned(),
        provisioning: k.provisioning().to_owned(),
        client_id: k.client_id().to_owned(),
        client_secret: k.client_secret().to_owned(),
    }
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

async fn apply(obj: Arc<BitbucketConnector>, ctx: &Context) -> Result<Action, ReconcileError> {
    let namespace = obj.namespace().ok_or(ReconcileError::NotNamespaced)?;
    let target = ObjectRef::from_obj(obj.as_ref());
    let key = runtime_key(&target);
    let enabled: BTreeMap<SyncKind, bool> = SyncKind::ALL.iter().map(|&k| (k, obj.spec.is_enabled(k))).collect();
    let requested = obj.annotations().get(RECONCILE_REQUESTED_AT_ANNOTATION).cloned();
    // The newest status we know of: ours if the cache has not caught up yet.
    let current = ctx.last_written(&key, &obj.metadata.uid).or_else(|| obj.status.clone());
    let already_handled = current.as_ref().and_then(|s| s.last_handled_reconcile_at.clone());

    let mut handled = None;
    let mut fingerprint = None;
    let mut credentials_changed = false;
    let mut transient: Option<String> = None;
    let mut running = BTreeSet::new();
    let mut requeue = Duration::from_secs(600);

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
        });
        write_status(ctx, &obj, &key, &pending).await?;
    }

    let health = if obj.spec.suspend {
        ctx.manager.remove(&key).await;
        Health::Suspended
    } else {
        match (read_settings(&obj, ctx, &namespace).await?, desired_loops(&obj)) {
            (_, Err(message)) => {
                ctx.manager.remove(&key).await;
                Health::SecretProblem {
                    reason: reason::INVALID_SPEC,
                    message,
                }
            }
            (SecretOutcome::Problem { reason, message }, _) => {
                ctx.manager.remove(&key).await;
                requeue = Duration::from_secs(300);
                Health::SecretProblem { reason, message }
            }
            (SecretOutcome::Settings(settings), Ok(desired)) => {
                let limits = obj.spec.rate_limit();
                let engine = EngineSettings {
                    api_url: obj.spec.api_url.clone().unwrap_or_else(|| DEFAULT_API_URL.to_owned()),
                    workspaces: settings.workspaces.clone(),
                    limits: Limits {
                        max_requests: limits.requests_per_hour.max(1),
                        window: Duration::from_secs(3600),
                        max_in_flight: limits.max_in_flight.max(1) as usize,
                    },
                };
                match ctx.manager.configure(target.clone(), &settings, engine) {
                    Err(err) => {
                        ctx.manager.remove(&key).await;
                        Health::SecretProblem {
                            reason: reason::INVALID_SPEC,
                            message: err.to_string(),
                        }
                    }
                    Ok((runtime, changed)) => {
                        credentials_changed = changed;
                        fingerprint = Some(runtime.fingerprint());
                        let connection = match runtime.connection() {
                            Some(last) if !runtime.needs_connection_check() => last,
                            _ => runtime.check_connection().await,
                        };
                        match connection.result {
                            Ok(workspaces) => {
                                let started = runtime.ensure_loops(&desired).await;
                                if requested.is_some() && requested != already_handled {
                                    runtime.trigger_all(&started);
                                }
                                running = runtime.loop_kinds();
                                match runtime.refusal() {
                                    // Loops keep retrying; recovery clears it.
                                    Some(err) => {
                                        requeue = Duration::from_secs(300);
                                        Health::ConnectFailed {
                                            reason: err.reason(),
                                            message: err.to_string(),
                                            stalled: true,
                                        }
                                    }
                                    None => Health::Connected { workspaces },
                                }
                            }
                            Err(err) => {
                                runtime.stop_loops().await;
                                let stalled = err.is_configuration_error();
                                if stalled {
                                    requeue = Duration::from_secs(300);
                                } else {
                                    transient = Some(err.to_string());
                                }
                                Health::ConnectFailed {
                                    reason: err.reason(),
                                    message: err.to_string(),
                                    stalled,
                                }
                            }
                        }
                    }
                }
            }
        }
    };

    // Flux waits for its request to be acknowledged: record it whatever the
    // outcome (a stalled connector must say so rather than time out).
    if requested.is_some() && requested != already_handled {
        handled = requested.clone();
    }

    let loops = {
        let store = Arc::clone(ctx.store());
        let runtime = ctx.manager.runtime(&key);
        let key = key.clone();
        let enabled = enabled.clone();
        tokio::task::spawn_blocking(move || match runtime {
            Some(runtime) => runtime.loop_statuses(&store, &enabled),
            None => loop_statuses(&store, &key, &enabled, &BTreeSet::new()),
        })
        .await
        .map_err(|e| ReconcileError::Store(e.to_string()))?
    };
    if let Health::Connected { .. } = health {
        requeue = next_due(&obj, &loops, &running).unwrap_or(requeue);
    }

    let new_status = status::compute(&Observation {
        generation: obj.metadata.generation,
        spec: &obj.spec,
        previous: current.as_ref(),
        health,
        loops,
        fingerprint,
        handled_reconcile_at: handled,
    });
    publish_transitions(&obj, current.as_ref(), &new_status, credentials_changed, ctx).await;
    let new_generation = current.as_ref().and_then(|s| s.observed_generation) != obj.metadata.generation;
    if new_generation && obj.spec.credential_rotation.as_ref().is_some_and(|r| r.enabled) {
        let event = Event {
            type_: EventType::Warning,
            reason: "RotationNotImplemented".into(),
            note: Some("spec.credentialRotation is accepted but not acted on by this version".into()),
            action: "Reconcile".into(),
            secondary: None,
        };
        if let Err(err) = ctx.recorder.publish(&event, &obj.object_ref(&())).await {
            tracing::warn!(error = %err, "could not publish an event");
        }
    }
    record_gauges(&obj, &namespace, &new_status, &ctx.metrics);
    if current.as_ref() != Some(&new_status) {
        write_status(ctx, &obj, &key, &new_status).await?;
    }
    if let Some(message) = transient {
        return Err(ReconcileError::Transient(message));
    }
    ctx.failures.lock().unwrap_or_else(|e| e.into_inner()).remove(&key);
    Ok(if obj.spec.suspend {
        Action::await_change()
    } else {
        Action::requeue(requeue)
    })
}

/// Server-side apply of the whole status on the status subresource.
async fn write_status(
    ctx: &Context,
    obj: &BitbucketConnector,
    key: &str,
    status: &BitbucketConnectorStatus,
) -> Result<(), ReconcileError> {
    let namespace = obj.namespace().ok_or(ReconcileError::NotNamespaced)?;
    let name = obj.name_any();
    let api: Api<BitbucketConnector> = Api::namespaced(ctx.client.clone(), &namespace);
    let patch = serde_json::json!({
        "apiVersion": BitbucketConnector::api_version(&()),
        "kind": BitbucketConnector::kind(&()),
        "status": status,
    });
    api.patch_status(&name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&patch))
        .await?;
    ctx.written
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(key.to_owned(), (obj.metadata.uid.clone(), status.clone()));
    Ok(())
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
    let store = Arc::clone(ctx.store());
    let store_key = key.clone();
    tokio::task::spawn_blocking(move || store.delete_connector(&store_key))
        .await
        .map_err(|e| ReconcileError::Store(e.to_string()))?
        .map_err(|e| ReconcileError::Store(e.to_string()))?;
    ctx.metrics
        .forget_connector(target.namespace.as_deref().unwrap_or_default(), &target.name);
    ctx.failures.lock().unwrap_or_else(|e| e.into_inner()).remove(&key);
    ctx.written.lock().unwrap_or_else(|e| e.into_inner()).remove(&key);
    tracing::info!(connector = %key, "connector deleted: loops stopped, data removed");
    Ok(Action::await_change())
}

fn record_gauges(obj: &BitbucketConnector, namespace: &str, status: &BitbucketConnectorStatus, metrics: &Metrics) {
    let ready = find_condition(&status.conditions, ct::READY).is_some_and(|c| c.status == "True");
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
    let condition = |s: Option<&BitbucketConnectorStatus>, t: &str| {
        s.and_then(|s| find_condition(&s.conditions, t))
            .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
    };
    let mut events = Vec::new();
    let event = |type_, reason: &str, note: String| Event {
        type_,
        reason: reason.to_owned(),
        note: Some(note),
        action: "Reconcile".to_owned(),
        secondary: None,
    };
    let before = condition(previous, ct::CONNECTED);
    let after = condition(Some(new), ct::CONNECTED);
    if after != before
        && let Some((status, why, message)) = &after
    {
        let was = before.as_ref().map(|b| (b.0.as_str(), b.1.as_str()));
        if status == "True" && was.map(|w| w.0) != Some("True") {
            events.push(event(EventType::Normal, "Connected", message.clone()));
        } else if status == "False" && was != Some(("False", why.as_str())) {
            let name = match why.as_str() {
                reason::SECRET_NOT_FOUND => "SecretMissing",
                reason::INVALID_CREDENTIALS => "CredentialsRejected",
                other => other,
            };
            events.push(event(EventType::Warning, name, message.clone()));
        }
    }
    let ready_before = condition(previous, ct::READY);
    if let Some((status, why, message)) = condition(Some(new), ct::READY)
        && status == "False"
        && why == reason::SYNC_FAILED
        && ready_before.as_ref().map(|r| r.1.as_str()) != Some(reason::SYNC_FAILED)
    {
        events.push(event(EventType::Warning, "SyncFailed", message));
    }
    if credentials_changed {
        let fingerprint = new
            .credentials
            .as_ref()
            .and_then(|c| c.fingerprint.clone())
            .unwrap_or_default();
        events.push(event(
            EventType::Normal,
            "CredentialsChanged",
            format!("Credentials reloaded from the Secret (fingerprint {fingerprint})"),
        ));
    }
    events
}

async fn publish_transitions(
    obj: &BitbucketConnector,
    previous: Option<&BitbucketConnectorStatus>,
    new: &BitbucketConnectorStatus,
    credentials_changed: bool,
    ctx: &Context,
) {
    let reference = obj.object_ref(&());
    for event in transition_events(previous, new, credentials_changed) {
        if let Err(err) = ctx.recorder.publish(&event, &reference).await {
            tracing::warn!(error = %err, reason = %event.reason, "could not publish an event");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{new_condition, set_condition};

    fn with(conditions: &[(&str, bool, &str)]) -> BitbucketConnectorStatus {
        let mut status = BitbucketConnectorStatus::default();
        for (t, s, r) in conditions {
            set_condition(
                &mut status.conditions,
                new_condition(t, *s, r, format!("{r} message"), Some(1)),
            );
        }
        status
    }

    fn reasons(events: &[Event]) -> Vec<&str> {
        events.iter().map(|e| e.reason.as_str()).collect()
    }

    #[test]
    fn events_fire_on_transitions_only() {
        let connected = with(&[("Connected", true, "Connected"), ("Ready", true, "SyncSucceeded")]);
        assert_eq!(reasons(&transition_events(None, &connected, false)), ["Connected"]);
        assert!(
            transition_events(Some(&connected), &connected, false).is_empty(),
            "steady state is quiet"
        );

        let rejected = with(&[("Connected", false, "InvalidCredentials")]);
        assert_eq!(
            reasons(&transition_events(Some(&connected), &rejected, false)),
            ["CredentialsRejected"]
        );
        assert!(transition_events(Some(&rejected), &rejected, false).is_empty());

        let missing = with(&[("Connected", false, "SecretNotFound")]);
        assert_eq!(
            reasons(&transition_events(Some(&rejected), &missing, false)),
            ["SecretMissing"]
        );

        let failed = with(&[("Connected", true, "Connected"), ("Ready", false, "SyncFailed")]);
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
    fn backoff_is_bounded() {
        assert!(backoff(1) <= Duration::from_secs(6));
        assert!(backoff(20) <= Duration::from_secs(360));
        assert!(backoff(3) >= Duration::from_secs(16));
    }
}
