//! Intent before write: the [`IntentGate`] records a change in the store and
//! in `status.pendingChange` before the provisioner writes it to Bitbucket;
//! [`settle`] closes it once the result is recorded; [`resolve_pending`]
//! resolves a change a stopped process left behind (see the module docs of
//! [`super`] for the rules and why the store is written first).

use std::sync::{Arc, Mutex};

use futures::future::BoxFuture;
use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;

use super::audit::{self, outcome};
use super::decide;
use super::faults::FaultPoint;
use super::reconcile::{self as io, Blocker};
use super::status::{GrantRecord, Outcome};
use super::{GrantContext, GrantError};
use crate::crd::{
    AppliedAccess, AppliedPrincipal, AppliedPrincipalKind, AppliedTarget, AppliedTargetKind, BitbucketAccessGrant,
    EventReason, PendingChange, PendingOperation, Reason,
};
use crate::provision::{
    AccessRequest, ChangeOperation, Permission, PlannedWrite, ProvisionError, WriteGate, parse_level,
};
use crate::store::{AuditAction, AuditEntry, Intent, IntentState, NewIntent, Store, StoreError};

/// Why a change is made (recorded with it; decides how a resolved ending is recorded).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Trigger {
    Grant,
    Expiry,
    Deletion,
    /// The grant's connector is being deleted: its held grants end first.
    ConnectorDeletion,
}

impl Trigger {
    fn as_str(self) -> &'static str {
        match self {
            Trigger::Grant => "grant",
            Trigger::Expiry => "expiry",
            Trigger::Deletion => "deletion",
            Trigger::ConnectorDeletion => "connector-deletion",
        }
    }

    fn parse(text: &str) -> Trigger {
        match text {
            "expiry" => Trigger::Expiry,
            "deletion" => Trigger::Deletion,
            "connector-deletion" => Trigger::ConnectorDeletion,
            _ => Trigger::Grant,
        }
    }
}

/// An intent as recorded in both places.
#[derive(Debug, Clone)]
pub(super) struct Recorded {
    pub intent_id: i64,
    pub change: PendingChange,
}

impl Recorded {
    pub fn operation(&self) -> ChangeOperation {
        operation_of(self.change.operation)
    }
}

fn operation_of(op: PendingOperation) -> ChangeOperation {
    match op {
        PendingOperation::Grant => ChangeOperation::Grant,
        PendingOperation::Revoke => ChangeOperation::Revoke,
        PendingOperation::Restore => ChangeOperation::Restore,
    }
}

fn pending_operation(op: ChangeOperation) -> PendingOperation {
    match op {
        ChangeOperation::Grant => PendingOperation::Grant,
        ChangeOperation::Revoke => PendingOperation::Revoke,
        ChangeOperation::Restore => PendingOperation::Restore,
    }
}

async fn blocking<T: Send + 'static>(
    store: &Arc<Store>,
    f: impl FnOnce(&Store) -> Result<T, StoreError> + Send + 'static,
) -> Result<T, GrantError> {
    let store = Arc::clone(store);
    tokio::task::spawn_blocking(move || f(&store))
        .await
        .map_err(|e| GrantError::Store(e.to_string()))?
        .map_err(|e| GrantError::Store(e.to_string()))
}

/// Records the intent before each write the provisioner makes for one grant.
pub(super) struct IntentGate<'a> {
    ctx: &'a GrantContext,
    trigger: Trigger,
    connector: &'a str,
    request: &'a AccessRequest,
    /// The access being ended (revoke, restore); `None` for a grant.
    known: Option<&'a AppliedAccess>,
    /// The grant, with the status this gate wrote.
    current: Mutex<BitbucketAccessGrant>,
    recorded: Mutex<Option<Recorded>>,
    stopped: Mutex<Option<GrantError>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl<'a> IntentGate<'a> {
    pub fn new(
        ctx: &'a GrantContext,
        obj: &BitbucketAccessGrant,
        trigger: Trigger,
        connector: &'a str,
        request: &'a AccessRequest,
        known: Option<&'a AppliedAccess>,
    ) -> Self {
        IntentGate {
            ctx,
            trigger,
            connector,
            request,
            known,
            current: Mutex::new(obj.clone()),
            recorded: Mutex::new(None),
            stopped: Mutex::new(None),
        }
    }

    /// The grant with the newest status (its `pendingChange` once recorded).
    pub fn current(&self) -> BitbucketAccessGrant {
        lock(&self.current).clone()
    }

    pub fn recorded(&self) -> Option<Recorded> {
        lock(&self.recorded).clone()
    }

    /// Why the gate stopped the write, if it did.
    pub fn take_stop(&self) -> Option<GrantError> {
        lock(&self.stopped).take()
    }

    async fn record(&self, write: PlannedWrite<'_>) -> Result<(), GrantError> {
        let access = match self.known {
            Some(access) => access.clone(),
            None => {
                let connector_namespace = self.current().spec.connector_ref.namespace.clone();
                decide::applied_access(
                    (connector_namespace.as_deref(), self.connector),
                    self.request,
                    &write.principal.key,
                )
            }
            .map_err(|e| GrantError::Store(e.to_string()))?,
        };
        let obj = self.current();
        let new = NewIntent {
            grant_uid: obj.uid().unwrap_or_default(),
            grant_namespace: obj.namespace().unwrap_or_default(),
            grant_name: obj.name_any(),
            connector: super::overlap::connector_key(&obj, self.connector),
            workspace: access.workspace.clone(),
            target: access.target.display(),
            principal_kind: principal_kind(access.principal.kind).to_owned(),
            principal: access.principal.id.clone(),
            operation: write.operation,
            trigger: self.trigger.as_str().to_owned(),
            level_before: write.from.map(|p| p.as_str().to_owned()),
            level_after: write.to.map(|p| p.as_str().to_owned()),
        };
        let store = self.ctx.manager.store();
        let intent = blocking(store, move |s| s.record_intent(&new)).await?;
        self.ctx
            .faults
            .pass(write.operation, FaultPoint::IntentInStore)
            .map_err(GrantError::Crashed)?;
        let change = PendingChange {
            operation: pending_operation(write.operation),
            trigger: self.trigger.as_str().to_owned(),
            from: write.from,
            to: write.to,
            started_at: Time(Timestamp::from_millisecond(intent.started_at).unwrap_or_else(|_| Timestamp::now())),
            access,
        };
        let mut status = obj.status.clone().unwrap_or_default();
        status.pending_change = Some(change.clone());
        if let Err(err) = self.ctx.scaffold.write_status(&obj, &status).await {
            // Bitbucket is not written: the store's intent is closed as such.
            let message = format!("the intent could not be recorded on status: {err}");
            let id = intent.id;
            blocking(store, move |s| {
                s.finish_intent(id, IntentState::NotWritten, &message, None)
            })
            .await?;
            return Err(err.into());
        }
        lock(&self.current).status = Some(status);
        *lock(&self.recorded) = Some(Recorded {
            intent_id: intent.id,
            change,
        });
        self.ctx
            .faults
            .pass(write.operation, FaultPoint::IntentInStatus)
            .map_err(GrantError::Crashed)
    }
}

impl WriteGate for IntentGate<'_> {
    fn before_write<'b>(&'b self, write: PlannedWrite<'b>) -> BoxFuture<'b, Result<(), ProvisionError>> {
        Box::pin(async move {
            self.record(write).await.map_err(|err| {
                let message = err.to_string();
                *lock(&self.stopped) = Some(err);
                ProvisionError::Aborted { message }
            })
        })
    }
}

fn principal_kind(kind: AppliedPrincipalKind) -> &'static str {
    match kind {
        AppliedPrincipalKind::User => "user",
        AppliedPrincipalKind::Group => "group",
    }
}

/// After the result is in status: closes the intent (with `entry`, in one
/// store transaction), or, when nothing was written, appends `entry`.
pub(super) async fn settle(
    ctx: &GrantContext,
    recorded: Option<&Recorded>,
    entry: AuditEntry,
) -> Result<(), GrantError> {
    let Some(recorded) = recorded else {
        audit::append(ctx.manager.store(), entry).await;
        return Ok(());
    };
    ctx.faults
        .pass(recorded.operation(), FaultPoint::ResultRecorded)
        .map_err(GrantError::Crashed)?;
    let state = match entry.outcome.as_str() {
        outcome::CHANGED_EXTERNALLY => IntentState::ChangedExternally,
        outcome::FAILED => IntentState::Failed,
        outcome::NOT_WRITTEN => IntentState::NotWritten,
        _ => IntentState::Done,
    };
    let id = recorded.intent_id;
    blocking(ctx.manager.store(), move |s| {
        s.finish_intent(id, state, &entry.message, Some(&entry))
    })
    .await
}

// ---- resolution after a stop ------------------------------------------------------

/// What a reconcile does after looking for a pending change.
pub(super) enum Resolution {
    /// Nothing pending (any more): carry on with this grant (newest status).
    Continue(Arc<BitbucketAccessGrant>),
    /// Resolution needs to wait or ended the reconcile.
    Done(Action),
    /// The connector cannot be used to read the level: nothing resolved.
    Blocked(Blocker, Arc<BitbucketAccessGrant>),
}

/// A pending change of `obj`, from its status, else from the store; a
/// store-only intent whose outcome the status already records is closed.
async fn pending(
    ctx: &GrantContext,
    obj: &BitbucketAccessGrant,
) -> Result<Option<(PendingChange, Option<i64>)>, GrantError> {
    let uid = obj.uid().unwrap_or_default();
    let stored = blocking(ctx.manager.store(), move |s| s.pending_intent(&uid)).await?;
    let status = obj.status.as_ref();
    if let Some(change) = status.and_then(|s| s.pending_change.clone()) {
        return Ok(Some((change, stored.map(|i| i.id))));
    }
    let Some(intent) = stored else {
        return Ok(None);
    };
    let held = decide::is_held(status);
    let recorded_already = match intent.change.operation {
        // A held grant never grants again (Hold), so its record is this one's.
        ChangeOperation::Grant => {
            held && status
                .and_then(|s| s.applied.as_ref())
                .is_some_and(|a| same_target(a, &intent))
        }
        ChangeOperation::Revoke | ChangeOperation::Restore => !held,
    };
    if recorded_already {
        let entry = audit::entry(
            obj,
            AuditAction::Recover,
            outcome::SUCCEEDED,
            status.and_then(|s| s.applied.as_ref()),
            (level(&intent.change.level_before), level(&intent.change.level_after)),
            format!(
                "{} interrupted after its result was recorded in status; closed",
                intent.change.operation
            ),
        );
        let id = intent.id;
        let message = entry.message.clone();
        blocking(ctx.manager.store(), move |s| {
            s.finish_intent(id, IntentState::Done, &message, Some(&entry))
        })
        .await?;
        return Ok(None);
    }
    Ok(change_from_intent(&intent, obj).map(|change| (change, Some(intent.id))))
}

fn same_target(applied: &AppliedAccess, intent: &Intent) -> bool {
    applied.principal.id == intent.change.principal
        && applied.workspace == intent.change.workspace
        && applied.target.display() == intent.change.target
}

fn level(text: &Option<String>) -> Option<Permission> {
    text.as_deref().and_then(|t| parse_level(t).ok().flatten())
}

/// The pending change a store intent describes (the status never had it).
fn change_from_intent(intent: &Intent, obj: &BitbucketAccessGrant) -> Option<PendingChange> {
    let c = &intent.change;
    let (from, to) = (level(&c.level_before), level(&c.level_after));
    let kind = match c.principal_kind.as_str() {
        "group" => AppliedPrincipalKind::Group,
        _ => AppliedPrincipalKind::User,
    };
    let (target_kind, key) = c.target.split_once('/')?;
    let target_kind = match target_kind {
        "group" => AppliedTargetKind::Group,
        "project" => AppliedTargetKind::Project,
        "repository" => AppliedTargetKind::Repository,
        _ => return None,
    };
    let requested = obj
        .status
        .as_ref()
        .and_then(|s| s.applied.as_ref())
        .filter(|a| a.principal.id == c.principal)
        .map(|a| a.principal.requested.clone())
        .or_else(|| {
            obj.spec
                .principal
                .user
                .clone()
                .or_else(|| obj.spec.principal.group.clone())
        })
        .unwrap_or_else(|| c.principal.clone());
    let permission = match c.operation {
        ChangeOperation::Grant => to?,
        ChangeOperation::Revoke | ChangeOperation::Restore => from?,
    };
    Some(PendingChange {
        operation: pending_operation(c.operation),
        trigger: c.trigger.clone(),
        from,
        to,
        started_at: Time(Timestamp::from_millisecond(intent.started_at).ok()?),
        access: AppliedAccess {
            connector: c.connector.rsplit('/').next().unwrap_or_default().to_owned(),
            // Recorded as `namespace/name`; the namespace only when it is not the grant's.
            connector_namespace: c
                .connector
                .split_once('/')
                .map(|(ns, _)| ns)
                .filter(|ns| Some(*ns) != obj.namespace().as_deref())
                .map(str::to_owned),
            principal: AppliedPrincipal {
                kind,
                id: c.principal.clone(),
                requested,
            },
            workspace: c.workspace.clone(),
            target: AppliedTarget {
                kind: target_kind,
                key: key.to_owned(),
            },
            permission,
        },
    })
}

/// Resolves a change a stopped reconcile left pending by reading the level
/// now: `to` → it was written (recorded with `previous` = its `from`);
/// `from` → it was not (the step is redone by the caller); anything else →
/// changed by someone else (recorded, nothing written). Runs before
/// anything else a reconcile does.
// One decision over operation × level read; kept whole so the rule reads in one place.
pub(super) async fn resolve_pending(
    obj: Arc<BitbucketAccessGrant>,
    ctx: &GrantContext,
    namespace: &str,
) -> Result<Resolution, GrantError> {
    let Some((change, intent_id)) = pending(ctx, &obj).await? else {
        return Ok(Resolution::Continue(obj));
    };
    let access = change.access.clone();
    let connector_namespace = access.connector_namespace.as_deref().unwrap_or(namespace);
    let provisioner = match super::lookup::for_revoke(ctx, connector_namespace, &access.connector).await? {
        Ok(p) => p,
        // Nothing can be read through the connector now: the change stays
        // pending; the caller reports it (or, for a deletion, may give up).
        Err(blocker) => return Ok(Resolution::Blocked(blocker, obj)),
    };
    let request = decide::revoke_request(&access);
    let now_level = match provisioner.inspect(&request).await {
        Ok(held) => Some((held.level, held.principal.id)),
        Err(ProvisionError::TargetNotFound { .. }) => None,
        Err(err) => return io::report_provision_error(&obj, ctx, &err).await.map(Resolution::Done),
    };
    let op = operation_of(change.operation);
    let trigger = Trigger::parse(&change.trigger);
    let levels = (change.from, change.to);
    let (state, verdict) = match &now_level {
        Some((level, _)) if *level == change.to => (IntentState::Done, Verdict::Written),
        Some((level, _)) if *level == change.from => (IntentState::NotWritten, Verdict::NotWritten),
        // The target is gone: so is the access; nothing was granted.
        None if op == ChangeOperation::Grant => (IntentState::NotWritten, Verdict::NotWritten),
        None => (IntentState::Done, Verdict::Written),
        Some(_) => (IntentState::ChangedExternally, Verdict::ChangedExternally),
    };
    let found = match &now_level {
        Some((Some(level), _)) => level.as_str().to_owned(),
        Some((None, _)) => "nothing".to_owned(),
        None => "the target gone".to_owned(),
    };
    let describe = |what: &str| {
        format!(
            "interrupted {op} ({} → {}) resolved after a restart: found {found} on {}, {what}",
            show(change.from),
            show(change.to),
            access.target.display()
        )
    };
    let mut obj = (*obj).clone();
    if let Some(status) = obj.status.as_mut() {
        status.pending_change = None;
    }
    let (message, outcome_text, next) = match (op, verdict) {
        (ChangeOperation::Grant, Verdict::Written) => {
            let message = describe(&format!(
                "the grant was made: recorded with previous level {}",
                show(change.from)
            ));
            let principal_id = now_level
                .map(|(_, id)| id)
                .unwrap_or_else(|| access.principal.id.clone());
            let identity = provisioner.credential_identity();
            record_granted(ctx, &mut obj, &change, principal_id, &identity, &message).await?;
            (message, outcome::SUCCEEDED, None)
        }
        (_, Verdict::NotWritten) => {
            let message = describe("the write was not made: the step is done again");
            let status = obj.status.clone().unwrap_or_default();
            io::write_result(&obj, ctx, &status).await?;
            (message, outcome::NOT_WRITTEN, None)
        }
        (ChangeOperation::Grant, Verdict::ChangedExternally) => {
            let message = describe(
                "someone else changed it: not recorded as granted, nothing written (retried later as a new grant)",
            );
            let problem = (Reason::Conflict, message.as_str());
            io::report_problem_audited(&obj, ctx, problem, true, crate::crd::GrantState::Failed, false).await?;
            (
                message,
                outcome::CHANGED_EXTERNALLY,
                Some(Action::requeue(io::SLOW_RETRY)),
            )
        }
        (_, verdict) => {
            // The access ended (by this write, or someone else changed it
            // and it is left as is): record the end the trigger asked for.
            let what = if verdict == Verdict::Written {
                "the access was ended"
            } else {
                "someone else changed it: left as is, the access is no longer this grant's"
            };
            let message = describe(what);
            let next = record_ended(ctx, &mut obj, trigger, &message).await?;
            let outcome_text = if verdict == Verdict::Written {
                outcome::SUCCEEDED
            } else {
                outcome::CHANGED_EXTERNALLY
            };
            (message, outcome_text, next)
        }
    };
    tracing::info!(grant = %obj.name_any(), "{message}");
    let entry = audit::entry(
        &obj,
        AuditAction::Recover,
        outcome_text,
        Some(&access),
        levels,
        message.clone(),
    );
    match intent_id {
        Some(id) => {
            blocking(ctx.manager.store(), move |s| {
                s.finish_intent(id, state, &message, Some(&entry))
            })
            .await?;
        }
        None => audit::append(ctx.manager.store(), entry).await,
    }
    Ok(match next {
        Some(action) => Resolution::Done(action),
        None => Resolution::Continue(Arc::new(obj)),
    })
}

/// A grant found written after a stop: recorded as granted when the
/// change started, with the level from before it as previous.
async fn record_granted(
    ctx: &GrantContext,
    obj: &mut BitbucketAccessGrant,
    change: &PendingChange,
    principal_id: String,
    identity: &str,
    message: &str,
) -> Result<(), GrantError> {
    let peers = super::overlap::peers(ctx, obj, &change.access, &principal_id, identity).await?;
    let granted_at = change.started_at.clone();
    let record = GrantRecord {
        previous: decide::previous_to_record(change.from, &peers),
        expires_at: obj.spec.expiry(&granted_at).ok().flatten(),
        granted_at,
        principal_id,
        applied: change.access.clone(),
    };
    let outcome = Outcome::Granted {
        record,
        message: message.to_owned(),
    };
    let status = io::next_status(obj, outcome);
    io::write_result(obj, ctx, &status).await?;
    obj.status = Some(status);
    let reason = EventReason::Granted.as_str();
    io::publish(ctx, obj, EventType::Normal, reason, message.to_owned()).await;
    Ok(())
}

/// An ending found done after a stop: recorded as the trigger asked
/// (expired; else released, so deletion or the new spec carries on).
async fn record_ended(
    ctx: &GrantContext,
    obj: &mut BitbucketAccessGrant,
    trigger: Trigger,
    message: &str,
) -> Result<Option<Action>, GrantError> {
    if trigger != Trigger::Expiry {
        let status = io::next_status(obj, Outcome::Released);
        io::write_result(obj, ctx, &status).await?;
        obj.status = Some(status);
        return Ok(None);
    }
    let expires_at = obj.status.as_ref().and_then(|s| s.expires_at.clone());
    let outcome = Outcome::Expired {
        expires_at,
        message: message.to_owned(),
    };
    let status = io::next_status(obj, outcome);
    io::write_result(obj, ctx, &status).await?;
    obj.status = Some(status);
    let reason = EventReason::Expired.as_str();
    io::publish(ctx, obj, EventType::Normal, reason, message.to_owned()).await;
    Ok(Some(Action::await_change()))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Written,
    NotWritten,
    ChangedExternally,
}

fn show(level: Option<Permission>) -> String {
    level.map_or_else(|| "nothing".to_owned(), |l| l.as_str().to_owned())
}
