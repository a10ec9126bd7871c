//! The grant controller's I/O: the watch wiring ([`controller`]), the
//! connector's provisioner (through [`super::lookup`]), the peer listing, Bitbucket
//! writes through the provisioner, status writes and Events. Every decision
//! is [`super::decide`]'s, every status [`super::status::compute`]'s.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;
use kube::api::Api;
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::runtime::finalizer::{self, finalizer};
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::utils::Predicate;
use kube::runtime::{Controller, WatchStreamExt, predicates, watcher};

use super::audit::{self, outcome};
use super::decide::{self, Step};
use super::faults::FaultPoint;
use super::intent::{self, IntentGate, Recorded, Resolution, Trigger};
use super::lookup::{self, Refusal};
use super::overlap;
use super::policy::Violation;
use super::status::{self, GrantRecord, Outcome};
use super::{GrantContext, GrantError};
use crate::crd::{
    AppliedAccess, BitbucketAccessGrant, BitbucketAccessGrantStatus, BitbucketConnector, EventReason, GRANT_FINALIZER,
    GrantState, Reason, condition_type as ct, find_condition,
};
use crate::provision::{AccessRequest, GrantMode, Permission, ProvisionError};
use crate::store::AuditAction;

/// Deletion waits at most this long for an unusable connector.
const DELETION_GRACE: Duration = Duration::from_secs(600);
pub(super) const SLOW_RETRY: Duration = Duration::from_secs(300);
const NOT_READY_RETRY: Duration = Duration::from_secs(30);
/// A held grant without expiry is looked at again this often (cheap: no Bitbucket call).
const HOLD_RECHECK: Duration = Duration::from_secs(3600);

/// Why the connector cannot act for a grant now.
#[derive(Debug, Clone, PartialEq)]
pub enum Blocker {
    NotFound(String),
    NotReady(String),
    Disabled(String),
}

impl Blocker {
    pub fn reason(&self) -> Reason {
        match self {
            Blocker::NotFound(_) => Reason::ConnectorNotFound,
            Blocker::NotReady(_) => Reason::ConnectorNotReady,
            Blocker::Disabled(_) => Reason::ProvisioningDisabled,
        }
    }

    pub fn message(&self) -> &str {
        match self {
            Blocker::NotFound(m) | Blocker::NotReady(m) | Blocker::Disabled(m) => m,
        }
    }
}

// ---- wiring -------------------------------------------------------------------

/// Runs the grant controller for one namespace scope (`None`: all) until
/// `shutdown`. `connector_changes`: every connector change of every watched
/// namespace (a grant may use a connector of another one), from the shared
/// connector watches ([`crate::controller::watches`]).
pub async fn controller(
    ctx: Arc<GrantContext>,
    namespace: Option<String>,
    connector_changes: impl futures::Stream<Item = Arc<BitbucketConnector>> + Send + 'static,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let client = ctx.scaffold.client.clone();
    let grants: Api<BitbucketAccessGrant> = match &namespace {
        Some(ns) => Api::namespaced(client, ns),
        None => Api::all(client),
    };
    let (reader, writer) = reflector::store();
    // Generation (spec, deletion) and finalizer changes only (the finalizer
    // helper waits for its own patch to come back): status writes do not
    // come back as reconciles.
    let grant_changes = watcher(grants, watcher::Config::default().any_semantic())
        .default_backoff()
        .reflect(writer)
        .applied_objects()
        .predicate_filter(
            (predicates::generation as fn(&BitbucketAccessGrant) -> Option<u64>)
                .combine(predicates::finalizers as fn(&BitbucketAccessGrant) -> Option<u64>),
            Default::default(),
        );
    let mapper_reader = reader.clone();
    Controller::for_stream(grant_changes, reader)
        // Any connector change (a status write included: becoming connected),
        // or its deletion, re-triggers the grants that reference it.
        .watches_shared_stream(connector_changes, move |connector| {
            let namespace = connector.namespace().unwrap_or_default();
            let name = connector.name_any();
            mapper_reader
                .state()
                .into_iter()
                .filter(|g| super::lookup::references(g, &namespace, &name))
                .map(|g| ObjectRef::from_obj(g.as_ref()))
                .collect::<Vec<_>>()
        })
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            if let Err(err) = result {
                tracing::debug!(error = %err, "grant controller event");
            }
        })
        .await;
}

/// The controller's entry point for one grant.
pub async fn reconcile(obj: Arc<BitbucketAccessGrant>, ctx: Arc<GrantContext>) -> Result<Action, GrantError> {
    // A context whose injected crash fired is a dead process: it does nothing.
    if let Some(point) = ctx.faults.crashed_at() {
        return Err(GrantError::Crashed(point));
    }
    // Without the lease this replica acts on nothing, status included.
    if !ctx.fence.holds() {
        return Err(GrantError::LeaseLost);
    }
    let namespace = obj.namespace().ok_or(GrantError::NotNamespaced)?;
    let span = tracing::info_span!("reconcile_grant", namespace = %namespace, name = %obj.name_any());
    let api: Api<BitbucketAccessGrant> = Api::namespaced(ctx.scaffold.client.clone(), &namespace);
    let pass = finalizer(&api, GRANT_FINALIZER, obj, |event| async {
        match event {
            // Decide from the newest status: ours when the cache lags.
            finalizer::Event::Apply(obj) => apply(ctx.scaffold.with_current_status(obj), &ctx).await,
            finalizer::Event::Cleanup(obj) => cleanup(ctx.scaffold.with_current_status(obj), &ctx).await,
        }
    });
    ctx.scaffold
        .timed(tracing::Instrument::instrument(pass, span))
        .await
        .map_err(|e| GrantError::Finalizer(Box::new(e)))
}

/// Per-object exponential backoff ([`crate::controller::common::backoff`]);
/// a lost lease is not retried here (the new leader carries on).
pub fn error_policy(obj: Arc<BitbucketAccessGrant>, err: &GrantError, ctx: Arc<GrantContext>) -> Action {
    let action = ctx.scaffold.error_policy(obj.as_ref(), err);
    if stops_this_replica(err) {
        return Action::await_change();
    }
    action
}

/// Errors after which this replica must not act on the grant again.
fn stops_this_replica(err: &GrantError) -> bool {
    match err {
        GrantError::LeaseLost | GrantError::Crashed(_) => true,
        GrantError::Finalizer(inner) => match inner.as_ref() {
            finalizer::Error::ApplyFailed(e) | finalizer::Error::CleanupFailed(e) => stops_this_replica(e),
            _ => false,
        },
        _ => false,
    }
}

// ---- status and Events ----------------------------------------------------------

/// The status after `outcome`. Outcomes that record a result (granted,
/// released, expired, revoked) also clear `pendingChange`: the result and the end of
/// the intent land in one write.
pub(super) fn next_status(obj: &BitbucketAccessGrant, outcome: Outcome) -> BitbucketAccessGrantStatus {
    let settles = matches!(
        outcome,
        Outcome::Granted { .. } | Outcome::Released | Outcome::Expired { .. } | Outcome::Revoked { .. }
    );
    let mut status = status::compute(
        obj.status.as_ref(),
        obj.metadata.generation,
        obj.spec.target.display(),
        outcome,
    );
    if settles {
        status.pending_change = None;
    }
    status
}

pub(super) async fn publish(ctx: &GrantContext, obj: &BitbucketAccessGrant, type_: EventType, why: &str, note: String) {
    let event = Event {
        type_,
        reason: why.to_owned(),
        note: Some(note),
        action: "Provision".to_owned(),
        secondary: None,
    };
    ctx.scaffold.publish(obj, event).await;
}

/// Whether the Ready condition changes from `before` to `after` (status or reason).
fn ready_transition(before: Option<&BitbucketAccessGrantStatus>, after: &BitbucketAccessGrantStatus) -> bool {
    let ready = |s: Option<&BitbucketAccessGrantStatus>| {
        s.and_then(|s| find_condition(&s.conditions, ct::READY))
            .map(|c| (c.status.clone(), c.reason.clone()))
    };
    ready(before) != ready(Some(after))
}

/// Reports a problem on status (an Event on transitions only).
pub(super) async fn report_problem(
    obj: &BitbucketAccessGrant,
    ctx: &GrantContext,
    reason: Reason,
    message: &str,
    stalled: bool,
    state_if_not_held: GrantState,
) -> Result<(), kube::Error> {
    report_problem_audited(obj, ctx, (reason, message), stalled, state_if_not_held, true).await
}

/// [`report_problem`]; `audited`: a refusal is appended to the audit log
/// (off when the caller writes its own entry).
pub(super) async fn report_problem_audited(
    obj: &BitbucketAccessGrant,
    ctx: &GrantContext,
    (reason, message): (Reason, &str),
    stalled: bool,
    state_if_not_held: GrantState,
    audited: bool,
) -> Result<(), kube::Error> {
    let status = next_status(
        obj,
        Outcome::Problem {
            reason,
            message: message.to_owned(),
            stalled,
            state_if_not_held,
        },
    );
    if ready_transition(obj.status.as_ref(), &status) {
        let event_reason = match reason {
            Reason::ConnectorNotFound => EventReason::ConnectorNotFound,
            Reason::ConnectorNotReady => EventReason::ConnectorNotReady,
            _ => EventReason::GrantFailed,
        };
        let note = format!("{reason}: {message}");
        publish(ctx, obj, EventType::Warning, event_reason.as_str(), note.clone()).await;
        // A grant refused (by policy, or for good) is audited once per transition.
        if audited && !decide::is_held(obj.status.as_ref()) && state_if_not_held != GrantState::Pending {
            let (action, result) = match (state_if_not_held, reason) {
                (GrantState::Failed, Reason::ProvisioningDisabled | Reason::InvalidSpec) => {
                    (AuditAction::Deny, outcome::DENIED)
                }
                (GrantState::Failed, _) => (AuditAction::Grant, outcome::FAILED),
                // Any other terminal state a refusal leads to (a policy denial).
                _ => (AuditAction::Deny, outcome::DENIED),
            };
            let entry = audit::entry(obj, action, result, None, (None, None), note);
            audit::append(ctx.manager.store(), entry).await;
        }
    }
    ctx.scaffold.write_status(obj, &status).await.map(drop)
}

pub(super) async fn report_blocker(
    obj: &BitbucketAccessGrant,
    ctx: &GrantContext,
    blocker: &Blocker,
) -> Result<Action, GrantError> {
    let key = crate::controller::common::object_key(obj);
    let (stalled, state, retry) = match blocker {
        Blocker::NotFound(_) => (true, GrantState::Pending, SLOW_RETRY),
        // 2 s, 4 s … 30 s: right after an operator restart the connector's
        // runtime appears within seconds, and a due expiry must not wait.
        Blocker::NotReady(_) => {
            let n = ctx.scaffold.failed(&key);
            let retry = Duration::from_secs(2).saturating_mul(1 << n.saturating_sub(1).min(4));
            (false, GrantState::Pending, retry.min(NOT_READY_RETRY))
        }
        Blocker::Disabled(_) => (true, GrantState::Failed, SLOW_RETRY),
    };
    report_problem(obj, ctx, blocker.reason(), blocker.message(), stalled, state).await?;
    Ok(Action::requeue(retry))
}

pub(super) async fn report_provision_error(
    obj: &BitbucketAccessGrant,
    ctx: &GrantContext,
    err: &ProvisionError,
) -> Result<Action, GrantError> {
    let key = crate::controller::common::object_key(obj);
    let permanent = err.is_permanent();
    let state = if permanent {
        GrantState::Failed
    } else {
        GrantState::Pending
    };
    report_problem(obj, ctx, Reason::from(err), &err.to_string(), permanent, state).await?;
    if permanent {
        ctx.scaffold.succeeded(&key);
        Ok(Action::requeue(SLOW_RETRY))
    } else {
        Ok(Action::requeue(crate::controller::common::backoff(
            ctx.scaffold.failed(&key),
        )))
    }
}

fn requeue_until(until: Option<Timestamp>, now: Timestamp) -> Action {
    match until {
        None => Action::requeue(HOLD_RECHECK),
        Some(at) => {
            let wait = Duration::try_from(at.duration_since(now)).unwrap_or_default();
            Action::requeue(wait.clamp(Duration::from_millis(200), HOLD_RECHECK))
        }
    }
}

// ---- apply ----------------------------------------------------------------------

async fn apply(obj: Arc<BitbucketAccessGrant>, ctx: &GrantContext) -> Result<Action, GrantError> {
    let namespace = obj.namespace().ok_or(GrantError::NotNamespaced)?;
    // A change a stopped reconcile left pending is resolved before anything else.
    let obj = match intent::resolve_pending(obj, ctx, &namespace).await? {
        Resolution::Continue(obj) => obj,
        Resolution::Done(action) => return Ok(action),
        Resolution::Blocked(blocker, obj) => return report_blocker(&obj, ctx, &blocker).await,
    };
    let key = crate::controller::common::object_key(obj.as_ref());
    let now = Timestamp::now();
    // Only a held grant has applied anything.
    let applied = decide::is_held(obj.status.as_ref()).then(|| decide::held_access(&obj));
    if let Some(Ok(held)) = &applied
        && lookup::connector_deleting(ctx, &namespace, held).await?
    {
        return revoke_for_deleted_connector(&obj, ctx, &namespace, held).await;
    }
    let step = decide::decide(
        &obj.spec,
        obj.status.as_ref(),
        applied.as_ref().and_then(|a| a.as_ref().ok()),
        now,
    );
    tracing::debug!(?step, "grant step");
    match step {
        Step::Done => {
            // Keep observedGeneration current; nothing else changes.
            ctx.scaffold
                .write_status(&obj, &next_status(&obj, Outcome::Unchanged))
                .await?;
            ctx.scaffold.succeeded(&key);
            Ok(Action::await_change())
        }
        Step::Invalid(message) => {
            report_problem(&obj, ctx, Reason::InvalidSpec, &message, true, GrantState::Failed).await?;
            Ok(Action::await_change())
        }
        Step::Hold { until } => hold(&obj, ctx, until, applied.and_then(Result::ok), now).await,
        Step::ExpireUngranted => {
            let message = "expired before it was granted: nothing was changed in Bitbucket".to_owned();
            let expires_at = obj.spec.expires_at.clone();
            let status = next_status(
                &obj,
                Outcome::Expired {
                    expires_at,
                    message: message.clone(),
                },
            );
            ctx.scaffold.write_status(&obj, &status).await?;
            let entry = audit::entry(
                &obj,
                AuditAction::Expire,
                outcome::UNCHANGED,
                None,
                (None, None),
                &message,
            );
            audit::append(ctx.manager.store(), entry).await;
            publish(ctx, &obj, EventType::Normal, EventReason::Expired.as_str(), message).await;
            Ok(Action::await_change())
        }
        Step::Expire => match required(applied) {
            Ok(applied) => expire(&obj, ctx, &namespace, &applied).await,
            Err(err) => report_provision_error(&obj, ctx, &err).await,
        },
        Step::KeepDespiteChange { until } => {
            let message = format!(
                "the spec was changed but the request is immutable: the access stays as granted ({}); delete this \
                 grant and create a new one to ask for another",
                describe(applied.and_then(Result::ok).as_ref())
            );
            report_problem(&obj, ctx, Reason::SpecImmutable, &message, true, GrantState::Granted).await?;
            ctx.scaffold.succeeded(&key);
            Ok(requeue_until(until, now))
        }
        Step::Grant => grant(&obj, ctx, &namespace, now).await,
    }
}

/// The applied access of a held grant (`None`: not held, which
/// [`decide::decide`] never pairs with Expire or Regrant).
fn required(applied: Option<Result<AppliedAccess, ProvisionError>>) -> Result<AppliedAccess, ProvisionError> {
    applied.unwrap_or_else(|| {
        Err(ProvisionError::InvalidRequest {
            message: "the grant holds no access".into(),
        })
    })
}

/// Held and current: no Bitbucket call; keep status fresh and look again at expiry.
async fn hold(
    obj: &BitbucketAccessGrant,
    ctx: &GrantContext,
    until: Option<Timestamp>,
    applied: Option<AppliedAccess>,
    now: Timestamp,
) -> Result<Action, GrantError> {
    let outcome = Outcome::Held {
        expires_at: until.map(Time),
        message: format!("{} held on {}", obj.spec.permission, obj.spec.target.display()),
        // Granted by an earlier version: record what it is taken to hold.
        backfill: applied,
    };
    ctx.scaffold.write_status(obj, &next_status(obj, outcome)).await?;
    ctx.scaffold.succeeded(&crate::controller::common::object_key(obj));
    Ok(requeue_until(until, now))
}

async fn expire(
    obj: &BitbucketAccessGrant,
    ctx: &GrantContext,
    namespace: &str,
    applied: &AppliedAccess,
) -> Result<Action, GrantError> {
    match end_access(obj, ctx, namespace, applied, Trigger::Expiry).await? {
        Ended::Done(done) => {
            let obj = &done.obj;
            let expires_at = obj.status.as_ref().and_then(|s| s.expires_at.clone());
            if let Some(due) = &expires_at {
                let lateness = crate::metrics::Metrics::expiry_lateness(due.0, Timestamp::now());
                ctx.scaffold.metrics.observe_grant_expiry_lateness(lateness);
            }
            let at = expires_at.as_ref().map(|t| t.0.to_string()).unwrap_or_default();
            let message = format!("expired at {at}: {}", done.note);
            let status = next_status(
                obj,
                Outcome::Expired {
                    expires_at,
                    message: message.clone(),
                },
            );
            write_result(obj, ctx, &status).await?;
            let entry = done.audit(obj, AuditAction::Expire, applied, &message);
            intent::settle(ctx, done.recorded.as_ref(), entry).await?;
            publish(ctx, obj, EventType::Normal, EventReason::Expired.as_str(), message).await;
            ctx.scaffold.succeeded(&crate::controller::common::object_key(obj));
            Ok(Action::await_change())
        }
        Ended::Blocked(blocker) => report_blocker(obj, ctx, &blocker).await,
        Ended::Failed(err, current) => report_provision_error(&current, ctx, &err).await,
    }
}

/// One line naming an applied access, for messages.
fn describe(applied: Option<&AppliedAccess>) -> String {
    applied.map_or_else(
        || "nothing applied".to_owned(),
        |a| format!("{} on {} {}", a.permission, a.workspace, a.target.display()),
    )
}

/// The grant's connector is being deleted: end the access first (its
/// finalizer waits for this), then the grant is Revoked for good.
async fn revoke_for_deleted_connector(
    obj: &BitbucketAccessGrant,
    ctx: &GrantContext,
    namespace: &str,
    applied: &AppliedAccess,
) -> Result<Action, GrantError> {
    match end_access(obj, ctx, namespace, applied, Trigger::ConnectorDeletion).await? {
        Ended::Done(done) => {
            let message = format!("the connector is being deleted: {}", done.note);
            let status = next_status(
                &done.obj,
                Outcome::Revoked {
                    message: message.clone(),
                },
            );
            write_result(&done.obj, ctx, &status).await?;
            let entry = done.audit(&done.obj, done.ending_action(), applied, &message);
            intent::settle(ctx, done.recorded.as_ref(), entry).await?;
            publish(ctx, obj, EventType::Normal, EventReason::Revoked.as_str(), message).await;
            ctx.scaffold.succeeded(&crate::controller::common::object_key(obj));
            Ok(Action::await_change())
        }
        Ended::Blocked(blocker) => report_blocker(obj, ctx, &blocker).await,
        Ended::Failed(err, current) => report_provision_error(&current, ctx, &err).await,
    }
}

/// Outside the connector's policy: `Denied`, Stalled, and a Warning Event
/// and an audit entry on the transition only ([`status::is_new_denial`]). Nothing was written to Bitbucket. Looked at again
/// when the connector changes (its policy may allow it then).
async fn report_denied(
    obj: &BitbucketAccessGrant,
    ctx: &GrantContext,
    violation: &Violation,
) -> Result<Action, GrantError> {
    let reason = violation.reason();
    let message = format!("denied by the connector's policy: {violation}");
    let outcome = Outcome::Problem {
        reason,
        message: message.clone(),
        stalled: true,
        state_if_not_held: GrantState::Denied,
    };
    let status = next_status(obj, outcome);
    if status::is_new_denial(obj.status.as_ref(), &status) {
        let note = format!("{reason}: {message}");
        publish(ctx, obj, EventType::Warning, EventReason::Denied.as_str(), note.clone()).await;
        let entry = audit::entry(obj, AuditAction::Deny, outcome::DENIED, None, (None, None), note);
        audit::append(ctx.manager.store(), entry).await;
    }
    ctx.scaffold.write_status(obj, &status).await?;
    ctx.scaffold.succeeded(&crate::controller::common::object_key(obj));
    Ok(Action::requeue(SLOW_RETRY))
}

// The steps of intent-before-write in order; split, their order would be hidden.
/// Grants the spec (the grant is not held) and records it: intent (store,
/// then status), Bitbucket, result in status, intent closed with an audit entry.
async fn grant(
    obj: &BitbucketAccessGrant,
    ctx: &GrantContext,
    namespace: &str,
    now: Timestamp,
) -> Result<Action, GrantError> {
    let connector = obj.spec.connector_ref.name.as_str();
    let request = match decide::request_for(&obj.spec) {
        Ok(request) => request,
        Err(err) => return report_provision_error(obj, ctx, &err).await,
    };
    // The connector's switch and policy: a denied grant writes nothing.
    let provisioner = match lookup::for_grant(ctx, obj, namespace).await? {
        Ok(p) => p,
        Err(Refusal::Blocked(blocker)) => return report_blocker(obj, ctx, &blocker).await,
        Err(Refusal::Denied(violation)) => return report_denied(obj, ctx, &violation).await,
    };
    let identity = provisioner.credential_identity();
    let lock = ctx.lock_for(&identity, &request);
    let _guard = lock.lock().await;
    let gate = IntentGate::new(ctx, obj, Trigger::Grant, connector, &request, None);
    let result = provisioner.grant_with(&request, GrantMode::AtLeast, &gate).await;
    let current = gate.current();
    let obj = &current;
    let recorded = gate.recorded();
    let outcome = match result {
        Ok(outcome) => outcome,
        Err(err) => {
            let current = write_failed(ctx, &gate, err.clone()).await?;
            return report_provision_error(&current, ctx, &err).await;
        }
    };
    if let Some(recorded) = &recorded {
        ctx.faults
            .pass(recorded.operation(), FaultPoint::BitbucketWritten)
            .map_err(GrantError::Crashed)?;
    }
    // What expiry and deletion will revoke: the principal as Bitbucket
    // resolved it now. Recorded in the same write as `grantedAt`.
    let connector_ref = (obj.spec.connector_ref.namespace.as_deref(), connector);
    let applied = match decide::applied_access(connector_ref, &request, &outcome.principal.key) {
        Ok(applied) => applied,
        Err(err) => return report_provision_error(obj, ctx, &err).await,
    };
    let peers = overlap::peers(ctx, obj, &applied, &outcome.principal.id, &identity).await?;
    // The access starts when the write was announced (the same time a
    // resolution after a stop would record).
    let granted_at = recorded
        .as_ref()
        .map(|r| r.change.started_at.clone())
        .unwrap_or(Time(now));
    let expires_at = obj.spec.expiry(&granted_at).ok().flatten();
    let mut message = outcome.message();
    if !peers.is_empty() {
        message.push_str(&format!(
            " ({} other grant(s) of this principal and target hold; the highest level wins)",
            peers.len()
        ));
    }
    let record = GrantRecord {
        previous: decide::previous_to_record(outcome.previous, &peers),
        granted_at,
        expires_at: expires_at.clone(),
        principal_id: outcome.principal.id.clone(),
        applied: applied.clone(),
    };
    let status = next_status(
        obj,
        Outcome::Granted {
            record,
            message: message.clone(),
        },
    );
    write_result(obj, ctx, &status).await?;
    let result = if outcome.changed() {
        outcome::SUCCEEDED
    } else {
        outcome::UNCHANGED
    };
    let levels = (outcome.previous, outcome.current);
    let entry = audit::entry(obj, AuditAction::Grant, result, Some(&applied), levels, &message);
    intent::settle(ctx, recorded.as_ref(), entry).await?;
    publish(ctx, obj, EventType::Normal, EventReason::Granted.as_str(), message).await;
    ctx.scaffold.succeeded(&crate::controller::common::object_key(obj));
    Ok(requeue_until(expires_at.map(|t| t.0), now))
}

/// A grant, revoke or restore failed. The gate's own stop (store, status,
/// injected fault) and a lost lease end the reconcile as they are. With an
/// intent recorded, a refusal (permanent: nothing was written) closes it
/// and clears `pendingChange`; a transient failure (maybe written: a
/// timeout after Bitbucket applied it) leaves it for the next reconcile to
/// resolve by reading the level. Returns the grant to report on.
async fn write_failed(
    ctx: &GrantContext,
    gate: &IntentGate<'_>,
    err: ProvisionError,
) -> Result<BitbucketAccessGrant, GrantError> {
    if let Some(stop) = gate.take_stop() {
        return Err(stop);
    }
    if matches!(err, ProvisionError::LeaseLost) {
        return Err(GrantError::LeaseLost);
    }
    let mut current = gate.current();
    if let (Some(recorded), true) = (gate.recorded(), err.is_permanent()) {
        if let Some(status) = current.status.as_mut() {
            status.pending_change = None;
        }
        let access = recorded.change.access.clone();
        let levels = (recorded.change.from, recorded.change.to);
        let action = match recorded.operation() {
            crate::store::ChangeOperation::Grant => AuditAction::Grant,
            crate::store::ChangeOperation::Revoke => AuditAction::Revoke,
            crate::store::ChangeOperation::Restore => AuditAction::Restore,
        };
        let entry = audit::entry(
            &current,
            action,
            outcome::FAILED,
            Some(&access),
            levels,
            err.to_string(),
        );
        // Settled without the fault point: nothing was written.
        let id = recorded.intent_id;
        let store = Arc::clone(ctx.manager.store());
        let message = entry.message.clone();
        tokio::task::spawn_blocking(move || {
            store.finish_intent(id, crate::store::IntentState::Failed, &message, Some(&entry))
        })
        .await
        .map_err(|e| GrantError::Store(e.to_string()))?
        .map_err(|e| GrantError::Store(e.to_string()))?;
    }
    Ok(current)
}

/// Bitbucket has changed (or a resolution decided): the record must land,
/// so a failed write is retried a few times before giving up (the pending
/// change then stays, and the next reconcile resolves it).
pub(super) async fn write_result(
    obj: &BitbucketAccessGrant,
    ctx: &GrantContext,
    status: &BitbucketAccessGrantStatus,
) -> Result<(), GrantError> {
    let mut attempt = 0u32;
    while let Err(err) = ctx.scaffold.write_status(obj, status).await {
        attempt += 1;
        if attempt >= 4 {
            return Err(err.into());
        }
        tracing::warn!(error = %err, attempt, "recording a grant on status failed; retrying");
        tokio::time::sleep(Duration::from_millis(250) * attempt).await;
    }
    Ok(())
}

// ---- ending access ----------------------------------------------------------------

/// An access ended (or nothing was left to do).
struct EndedAccess {
    /// For people.
    note: String,
    /// The grant with the newest status (its `pendingChange`, if recorded).
    obj: BitbucketAccessGrant,
    recorded: Option<Recorded>,
    /// Level before and after the call.
    levels: (Option<Permission>, Option<Permission>),
    changed: bool,
    changed_externally: bool,
}

impl EndedAccess {
    /// Revoke (nothing put back) or restore (a level put back).
    fn ending_action(&self) -> AuditAction {
        if self.levels.1.is_some() {
            AuditAction::Restore
        } else {
            AuditAction::Revoke
        }
    }

    fn audit(
        &self,
        obj: &BitbucketAccessGrant,
        action: AuditAction,
        applied: &AppliedAccess,
        message: &str,
    ) -> crate::store::AuditEntry {
        let result = if self.changed_externally {
            outcome::CHANGED_EXTERNALLY
        } else if self.changed {
            outcome::SUCCEEDED
        } else {
            outcome::UNCHANGED
        };
        audit::entry(obj, action, result, Some(applied), self.levels, message)
    }
}

enum Ended {
    Done(Box<EndedAccess>),
    Blocked(Blocker),
    /// The error, and the grant to report it on.
    Failed(ProvisionError, Box<BitbucketAccessGrant>),
}

/// Ends the held access `applied` of `obj`: revoke and restore the level
/// the overlap rule gives (across every connector on the credential), with
/// the intent recorded before the write.
async fn end_access(
    obj: &BitbucketAccessGrant,
    ctx: &GrantContext,
    namespace: &str,
    applied: &AppliedAccess,
    trigger: Trigger,
) -> Result<Ended, GrantError> {
    let request: AccessRequest = decide::revoke_request(applied);
    let connector_namespace = applied.connector_namespace.as_deref().unwrap_or(namespace);
    // Revocation is always possible: neither the switch nor the policy counts here.
    let provisioner = match lookup::for_revoke(ctx, connector_namespace, &applied.connector).await? {
        Ok(p) => p,
        Err(blocker) => return Ok(Ended::Blocked(blocker)),
    };
    let identity = provisioner.credential_identity();
    let lock = ctx.lock_for(&identity, &request);
    let _guard = lock.lock().await;
    let status = obj.status.clone().unwrap_or_default();
    let principal_id = status.principal_id.clone().unwrap_or_default();
    let peers = overlap::peers(ctx, obj, applied, &principal_id, &identity).await?;
    let granted_at = status.granted_at.as_ref().map(|t| t.0);
    let restore = decide::restore_level(decide::parse_previous(&status), granted_at, &peers);
    let gate = IntentGate::new(ctx, obj, trigger, &applied.connector, &request, Some(applied));
    let result = provisioner.revoke_and_restore_with(&request, restore, &gate).await;
    let recorded = gate.recorded();
    let ended = |note: String, levels, changed, changed_externally| {
        Ok(Ended::Done(Box::new(EndedAccess {
            note,
            obj: gate.current(),
            recorded: recorded.clone(),
            levels,
            changed,
            changed_externally,
        })))
    };
    match result {
        Ok(outcome) => {
            if let Some(recorded) = &recorded {
                ctx.faults
                    .pass(recorded.operation(), FaultPoint::BitbucketWritten)
                    .map_err(GrantError::Crashed)?;
            }
            let external = matches!(outcome.result, crate::provision::RevokeResult::ChangedExternally { .. });
            ended(
                outcome.message(),
                (outcome.previous, outcome.current),
                outcome.changed(),
                external,
            )
        }
        // The target (or workspace) is gone: so is the access.
        Err(ProvisionError::TargetNotFound { target }) => ended(
            format!("{target} no longer exists; nothing left to revoke"),
            (Some(applied.permission), None),
            false,
            false,
        ),
        Err(err) => {
            let current = write_failed(ctx, &gate, err.clone()).await?;
            Ok(Ended::Failed(err, Box::new(current)))
        }
    }
}

async fn cleanup(obj: Arc<BitbucketAccessGrant>, ctx: &GrantContext) -> Result<Action, GrantError> {
    let namespace = obj.namespace().ok_or(GrantError::NotNamespaced)?;
    let waited_long = obj.metadata.deletion_timestamp.as_ref().is_some_and(|t| {
        Timestamp::now()
            .duration_since(t.0)
            .try_into()
            .is_ok_and(|d: Duration| d >= DELETION_GRACE)
    });
    // Deletion waits for a pending change to be resolved, as long as it
    // would wait for a revoke (the same give-up rules).
    let blocker = match intent::resolve_pending(obj, ctx, &namespace).await? {
        Resolution::Continue(obj) => return end_on_deletion(obj, ctx, &namespace, waited_long).await,
        Resolution::Blocked(blocker, obj) => (blocker, obj),
        Resolution::Done(_) => {
            let message = "a change interrupted by a stop could not be resolved yet".to_owned();
            return Err(GrantError::Blocked(Blocker::NotReady(message)));
        }
    };
    match blocker {
        (blocker @ (Blocker::NotFound(_) | Blocker::Disabled(_)), obj) => {
            let why = format!("{}: {}", blocker.reason(), blocker.message());
            give_up(&obj, ctx, &obj.spec.target.display(), why).await
        }
        (blocker, obj) if waited_long => {
            let why = format!("{}: {}", blocker.reason(), blocker.message());
            give_up(&obj, ctx, &obj.spec.target.display(), why).await
        }
        (blocker, _) => Err(GrantError::Blocked(blocker)),
    }
}

/// Deletion with nothing pending: ends the held access, if any.
async fn end_on_deletion(
    obj: Arc<BitbucketAccessGrant>,
    ctx: &GrantContext,
    namespace: &str,
    waited_long: bool,
) -> Result<Action, GrantError> {
    let key = crate::controller::common::object_key(obj.as_ref());
    if !decide::is_held(obj.status.as_ref()) {
        close_intents(ctx, &obj).await;
        ctx.scaffold.forget(&key);
        return Ok(Action::await_change());
    }
    let applied = match decide::held_access(&obj) {
        Ok(applied) => applied,
        Err(err) => {
            let why = format!("{}: {err}", Reason::from(&err));
            return give_up(&obj, ctx, &obj.spec.target.display(), why).await;
        }
    };
    let what = format!(
        "{} on {} {}",
        applied.permission,
        applied.workspace,
        applied.target.display()
    );
    match end_access(&obj, ctx, namespace, &applied, Trigger::Deletion).await? {
        Ended::Done(done) => {
            let note = format!("grant deleted: {}", done.note);
            // Recorded before the finalizer goes: a stop here resolves to "ended".
            let status = next_status(&done.obj, Outcome::Released);
            write_result(&done.obj, ctx, &status).await?;
            let entry = done.audit(&done.obj, done.ending_action(), &applied, &note);
            intent::settle(ctx, done.recorded.as_ref(), entry).await?;
            publish(ctx, &obj, EventType::Normal, EventReason::Revoked.as_str(), note).await;
            ctx.scaffold.forget(&key);
            Ok(Action::await_change())
        }
        Ended::Blocked(blocker @ Blocker::NotFound(_)) => {
            let why = format!("{}: {}", blocker.reason(), blocker.message());
            give_up(&obj, ctx, &what, why).await
        }
        Ended::Blocked(blocker) if waited_long => {
            let minutes = DELETION_GRACE.as_secs() / 60;
            let why = format!("{}: {} (waited {minutes} minutes)", blocker.reason(), blocker.message());
            give_up(&obj, ctx, &what, why).await
        }
        Ended::Blocked(blocker) => Err(GrantError::Blocked(blocker)),
        Ended::Failed(err, current) if err.is_permanent() || waited_long => {
            let why = format!("{}: {err}", Reason::from(&err));
            give_up(&current, ctx, &what, why).await
        }
        Ended::Failed(err, _) => Err(GrantError::Revoke(err)),
    }
}

/// The grant is going: intents the store still holds for it are closed.
async fn close_intents(ctx: &GrantContext, obj: &BitbucketAccessGrant) {
    let Some(uid) = obj.uid() else { return };
    let store = Arc::clone(ctx.manager.store());
    let closed = tokio::task::spawn_blocking(move || {
        store.close_intents_of(&uid, crate::store::IntentState::NotWritten, "the grant was deleted")
    })
    .await;
    if let Ok(Err(err)) = closed {
        tracing::warn!(error = %err, "could not close the intents of a deleted grant");
    }
}

/// Lets a deletion go without revoking: a Warning Event says what was left and why.
async fn give_up(
    obj: &BitbucketAccessGrant,
    ctx: &GrantContext,
    what: &str,
    why: String,
) -> Result<Action, GrantError> {
    let note = format!(
        "the access could not be revoked ({what}): {why}; the grant is deleted anyway, remove the permission in \
         Bitbucket by hand if it is still there"
    );
    let applied = decide::held_access(obj).ok();
    let entry = audit::entry(
        obj,
        AuditAction::Revoke,
        outcome::SKIPPED,
        applied.as_ref(),
        (None, None),
        &note,
    );
    audit::append(ctx.manager.store(), entry).await;
    close_intents(ctx, obj).await;
    publish(ctx, obj, EventType::Warning, EventReason::RevokeSkipped.as_str(), note).await;
    ctx.scaffold.forget(&crate::controller::common::object_key(obj));
    Ok(Action::await_change())
}
