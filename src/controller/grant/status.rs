//! Status of a `BitbucketAccessGrant`, computed as a pure function of the
//! previous status and what the reconcile did ([`Outcome`]), as the
//! connector's is. Conditions: `Ready` (the permission is in place),
//! `Expired` (True once expired), and kstatus `Reconciling` / `Stalled`,
//! present only while True. Conditions whose status does not change keep
//! their `lastTransitionTime`.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use super::decide::is_held;
use crate::crd::{
    AppliedAccess, BitbucketAccessGrantStatus, ConditionStatus, GrantState, Reason, condition_type as ct,
    new_condition, remove_condition, set_condition,
};
use crate::provision::Permission;

/// Condition type set True once the grant expired.
pub const EXPIRED_CONDITION: &str = "Expired";

/// What a grant recorded when it was granted: everything expiry, deletion
/// and a spec change need, written together.
#[derive(Debug, Clone, PartialEq)]
pub struct GrantRecord {
    /// What the principal held before (restored on revoke).
    pub previous: Option<Permission>,
    pub granted_at: Time,
    pub expires_at: Option<Time>,
    /// The principal id in the access model, as Bitbucket resolved it.
    pub principal_id: String,
    pub applied: AppliedAccess,
}

/// What the reconcile did, as the status reports it.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Nothing changes but the observed generation and target (expired: terminal).
    Unchanged,
    /// The access is held and current. `message` is used unless Ready
    /// already says True (its message then stays); `backfill` records the
    /// access of a grant made by an earlier version.
    Held {
        expires_at: Option<Time>,
        message: String,
        backfill: Option<AppliedAccess>,
    },
    /// Just granted.
    Granted { record: GrantRecord, message: String },
    /// The old access ended on a spec change: nothing is held, nothing applied.
    Released,
    /// `Ready=False`; `Stalled` when retrying will not help, else
    /// `Reconciling`. A held grant stays `Granted` (its access is in place).
    Problem {
        reason: Reason,
        message: String,
        stalled: bool,
        state_if_not_held: GrantState,
    },
    /// Expired: nothing applied any more.
    Expired { expires_at: Option<Time>, message: String },
    /// Revoked because its connector is being deleted: terminal, nothing
    /// applied any more.
    Revoked { message: String },
}

/// Computes the new status from the previous one.
pub fn compute(
    previous: Option<&BitbucketAccessGrantStatus>,
    generation: Option<i64>,
    target: String,
    outcome: Outcome,
) -> BitbucketAccessGrantStatus {
    let mut status = previous.cloned().unwrap_or_default();
    status.observed_generation = generation;
    status.target = Some(target);
    match outcome {
        Outcome::Unchanged => {}
        Outcome::Held {
            expires_at,
            message,
            backfill,
        } => {
            let message = ready_message(&status.conditions).unwrap_or(message);
            status.expires_at = expires_at;
            if status.applied.is_none() {
                status.applied = backfill;
            }
            mark_granted(&mut status, generation, message);
        }
        Outcome::Granted { record, message } => {
            status.previous_permission = record.previous.map(|p| p.as_str().to_owned());
            status.granted_at = Some(record.granted_at);
            status.expires_at = record.expires_at;
            status.principal_id = Some(record.principal_id);
            status.applied = Some(record.applied);
            mark_granted(&mut status, generation, message);
        }
        Outcome::Released => {
            status.state = Some(GrantState::Pending.as_str().to_owned());
            status.granted_at = None;
            status.previous_permission = None;
            status.expires_at = None;
            status.principal_id = None;
            status.applied = None;
        }
        Outcome::Problem {
            reason,
            message,
            stalled,
            state_if_not_held,
        } => mark_problem(&mut status, generation, reason, &message, stalled, state_if_not_held),
        Outcome::Expired { expires_at, message } => {
            status.expires_at = expires_at;
            status.applied = None;
            mark_expired(&mut status, generation, &message);
        }
        Outcome::Revoked { message } => {
            status.applied = None;
            status.state = Some(GrantState::Revoked.as_str().to_owned());
            set_condition(
                &mut status.conditions,
                new_condition(
                    ct::READY,
                    ConditionStatus::False,
                    Reason::ConnectorDeleted,
                    message,
                    generation,
                ),
            );
            remove_condition(&mut status.conditions, ct::RECONCILING);
            remove_condition(&mut status.conditions, ct::STALLED);
        }
    }
    status
}

/// Whether `after` is a denial that `before` was not (or a denial by
/// another rule): the one point where a denial is reported (Warning Event,
/// audit entry), so a grant that stays denied is reported once.
pub fn is_new_denial(before: Option<&BitbucketAccessGrantStatus>, after: &BitbucketAccessGrantStatus) -> bool {
    let denial = |s: &BitbucketAccessGrantStatus| {
        (s.state.as_deref() == Some(GrantState::Denied.as_str()))
            .then(|| crate::crd::find_condition(&s.conditions, ct::READY).map(|c| c.reason.clone()))
            .flatten()
    };
    let now = denial(after);
    now.is_some() && before.and_then(denial) != now
}

/// The message of a Ready condition that is True.
fn ready_message(conditions: &[Condition]) -> Option<String> {
    crate::crd::find_condition(conditions, ct::READY)
        .filter(|c| ConditionStatus::parse(&c.status) == Some(ConditionStatus::True))
        .map(|c| c.message.clone())
}

/// Ready=True (reason Granted), no kstatus conditions.
fn mark_granted(status: &mut BitbucketAccessGrantStatus, generation: Option<i64>, message: String) {
    status.state = Some(GrantState::Granted.as_str().to_owned());
    set_condition(
        &mut status.conditions,
        new_condition(ct::READY, ConditionStatus::True, Reason::Granted, message, generation),
    );
    for gone in [ct::RECONCILING, ct::STALLED, EXPIRED_CONDITION] {
        remove_condition(&mut status.conditions, gone);
    }
}

fn mark_problem(
    status: &mut BitbucketAccessGrantStatus,
    generation: Option<i64>,
    reason: Reason,
    message: &str,
    stalled: bool,
    state_if_not_held: GrantState,
) {
    if !is_held(Some(status)) {
        status.state = Some(state_if_not_held.as_str().to_owned());
    }
    set_condition(
        &mut status.conditions,
        new_condition(ct::READY, ConditionStatus::False, reason, message, generation),
    );
    let (on, off) = if stalled {
        (ct::STALLED, ct::RECONCILING)
    } else {
        (ct::RECONCILING, ct::STALLED)
    };
    set_condition(
        &mut status.conditions,
        new_condition(on, ConditionStatus::True, reason, message, generation),
    );
    remove_condition(&mut status.conditions, off);
}

fn mark_expired(status: &mut BitbucketAccessGrantStatus, generation: Option<i64>, message: &str) {
    status.state = Some(GrantState::Expired.as_str().to_owned());
    set_condition(
        &mut status.conditions,
        new_condition(
            EXPIRED_CONDITION,
            ConditionStatus::True,
            Reason::Expired,
            message,
            generation,
        ),
    );
    set_condition(
        &mut status.conditions,
        new_condition(ct::READY, ConditionStatus::False, Reason::Expired, message, generation),
    );
    remove_condition(&mut status.conditions, ct::RECONCILING);
    remove_condition(&mut status.conditions, ct::STALLED);
}
