//! Fault injection for the crash-safety tests: a [`Faults`] handle in the
//! grant context stops a reconcile at one [`FaultPoint`] of one operation as
//! if the process had died there. Compiled in always (integration tests
//! drive the real operator) and inert unless a test arms it: the default
//! handle holds nothing and every check is one `Option` test.
//!
//! After a crash the context behaves as a dead process: every later
//! reconcile of it stops at once, before any write, so the test can stop
//! the operator and start a fresh one ("restart") over the same store file
//! and API server.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::store::ChangeOperation;

/// Where a grant, revoke or restore can be stopped, in the order it passes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FaultPoint {
    /// The intent is in the store; the status does not have it yet.
    IntentInStore,
    /// The intent is in the store and in the status; Bitbucket not written.
    IntentInStatus,
    /// Bitbucket was written; nothing recorded about the result yet.
    BitbucketWritten,
    /// The result is in the status; the store's intent is still pending.
    ResultRecorded,
}

impl FaultPoint {
    pub const ALL: [FaultPoint; 4] = [
        FaultPoint::IntentInStore,
        FaultPoint::IntentInStatus,
        FaultPoint::BitbucketWritten,
        FaultPoint::ResultRecorded,
    ];
}

impl std::fmt::Display for FaultPoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let text = match self {
            FaultPoint::IntentInStore => "after the intent was recorded in the store",
            FaultPoint::IntentInStatus => "after the intent was recorded in the status",
            FaultPoint::BitbucketWritten => "after the Bitbucket write",
            FaultPoint::ResultRecorded => "after the result was recorded",
        };
        f.write_str(text)
    }
}

/// What happens at the armed point.
#[derive(Clone)]
pub enum FaultAction {
    /// Stop the reconcile there, and every later one (a dead process).
    Crash,
    /// Run this and carry on (for example: take the lease away).
    Run(Arc<dyn Fn() + Send + Sync>),
}

/// A one-shot fault at one point of one operation; the default is inert.
#[derive(Clone, Default)]
pub struct Faults {
    armed: Option<Arc<Armed>>,
}

struct Armed {
    operation: ChangeOperation,
    point: FaultPoint,
    action: FaultAction,
    fired: AtomicBool,
    crashed: AtomicBool,
}

impl std::fmt::Debug for Faults {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.armed {
            None => f.write_str("Faults(none)"),
            Some(a) => write!(f, "Faults({} {:?})", a.operation, a.point),
        }
    }
}

impl Faults {
    /// Crash the first `operation` that reaches `point`.
    pub fn crash_at(operation: ChangeOperation, point: FaultPoint) -> Self {
        Self::arm(operation, point, FaultAction::Crash)
    }

    /// Run `action` when the first `operation` reaches `point`, then carry on.
    pub fn run_at(operation: ChangeOperation, point: FaultPoint, action: impl Fn() + Send + Sync + 'static) -> Self {
        Self::arm(operation, point, FaultAction::Run(Arc::new(action)))
    }

    fn arm(operation: ChangeOperation, point: FaultPoint, action: FaultAction) -> Self {
        Faults {
            armed: Some(Arc::new(Armed {
                operation,
                point,
                action,
                fired: AtomicBool::new(false),
                crashed: AtomicBool::new(false),
            })),
        }
    }

    /// Whether the armed point was reached.
    pub fn fired(&self) -> bool {
        self.armed.as_ref().is_some_and(|a| a.fired.load(Ordering::SeqCst))
    }

    /// Whether the context is dead (a crash fired).
    pub fn crashed(&self) -> bool {
        self.armed.as_ref().is_some_and(|a| a.crashed.load(Ordering::SeqCst))
    }

    /// Where the context died, if a crash fired.
    pub fn crashed_at(&self) -> Option<FaultPoint> {
        self.armed
            .as_ref()
            .filter(|a| a.crashed.load(Ordering::SeqCst))
            .map(|a| a.point)
    }

    /// Passes `point` of `operation`: `Err(point)` when the reconcile must
    /// stop there (the armed crash, or any point after it).
    pub(super) fn pass(&self, operation: ChangeOperation, point: FaultPoint) -> Result<(), FaultPoint> {
        let Some(armed) = &self.armed else {
            return Ok(());
        };
        if armed.crashed.load(Ordering::SeqCst) {
            return Err(point);
        }
        if armed.operation != operation || armed.point != point || armed.fired.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        match &armed.action {
            FaultAction::Crash => {
                armed.crashed.store(true, Ordering::SeqCst);
                tracing::warn!(%operation, %point, "injected crash");
                Err(point)
            }
            FaultAction::Run(action) => {
                action();
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_armed_crash_fires_once_at_its_point_and_then_stops_everything() {
        let none = Faults::default();
        assert!(none.pass(ChangeOperation::Grant, FaultPoint::IntentInStore).is_ok());
        let faults = Faults::crash_at(ChangeOperation::Revoke, FaultPoint::BitbucketWritten);
        assert!(
            faults
                .pass(ChangeOperation::Grant, FaultPoint::BitbucketWritten)
                .is_ok()
        );
        assert!(faults.pass(ChangeOperation::Revoke, FaultPoint::IntentInStatus).is_ok());
        assert!(!faults.fired());
        assert!(
            faults
                .pass(ChangeOperation::Revoke, FaultPoint::BitbucketWritten)
                .is_err()
        );
        assert!(faults.fired() && faults.crashed());
        assert!(faults.pass(ChangeOperation::Grant, FaultPoint::IntentInStore).is_err());
    }

    #[test]
    fn a_run_action_fires_once_and_carries_on() {
        let count = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let seen = Arc::clone(&count);
        let faults = Faults::run_at(ChangeOperation::Grant, FaultPoint::IntentInStatus, move || {
            seen.fetch_add(1, Ordering::SeqCst);
        });
        for _ in 0..3 {
            assert!(faults.pass(ChangeOperation::Grant, FaultPoint::IntentInStatus).is_ok());
        }
        assert_eq!(count.load(Ordering::SeqCst), 1);
        assert!(faults.fired() && !faults.crashed());
    }
}
