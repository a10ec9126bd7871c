//! What stands between the provisioner and a Bitbucket write:
//!
//! - the [`Fence`]: with leader election, only the replica that holds the
//!   lease may write. It is checked right before each write (not once per
//!   reconcile), so a replica that loses the lease mid-reconcile makes no
//!   further write; the write fails with [`ProvisionError::LeaseLost`].
//! - a [`WriteGate`]: called with the exact change ([`PlannedWrite`]: the
//!   principal as resolved, the level before and after) once the provisioner
//!   has read the current level and before it writes. The grant controller
//!   records its intent there; an error from the gate stops the write.

use futures::future::BoxFuture;
use tokio::sync::watch;

use super::{Permission, ProvisionError, ResolvedPrincipal, ResolvedTarget};
pub use crate::store::ChangeOperation;

/// Whether this replica may write to Bitbucket. Cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct Fence {
    /// `None`: no leader election (one replica), always open.
    lease: Option<watch::Receiver<bool>>,
}

impl Fence {
    /// No leader election: writes are always allowed.
    pub fn unfenced() -> Self {
        Fence { lease: None }
    }

    /// Open while `holding` says true; closed when it says false or its
    /// sender is gone (the lease task ended).
    pub fn lease(holding: watch::Receiver<bool>) -> Self {
        Fence { lease: Some(holding) }
    }

    /// Whether writes are allowed now.
    pub fn holds(&self) -> bool {
        match &self.lease {
            None => true,
            Some(rx) => rx.has_changed().is_ok() && *rx.borrow(),
        }
    }

    /// `Err(LeaseLost)` unless writes are allowed now.
    pub fn check(&self) -> Result<(), ProvisionError> {
        if self.holds() {
            Ok(())
        } else {
            Err(ProvisionError::LeaseLost)
        }
    }
}

/// The write the provisioner is about to make.
#[derive(Debug, Clone, Copy)]
pub struct PlannedWrite<'a> {
    pub operation: ChangeOperation,
    pub principal: &'a ResolvedPrincipal,
    pub target: &'a ResolvedTarget,
    /// The level read just before (`None`: nothing held).
    pub from: Option<Permission>,
    /// The level the write leaves (`None`: removed).
    pub to: Option<Permission>,
}

/// Called before each Bitbucket write; an error stops the write and is
/// returned by the provisioner as is.
pub trait WriteGate: Send + Sync {
    fn before_write<'a>(&'a self, write: PlannedWrite<'a>) -> BoxFuture<'a, Result<(), ProvisionError>>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fence_follows_the_lease_and_closes_when_its_task_is_gone() {
        assert!(Fence::unfenced().holds());
        let (tx, rx) = watch::channel(true);
        let fence = Fence::lease(rx);
        assert!(fence.check().is_ok());
        tx.send(false).unwrap();
        assert!(matches!(fence.check(), Err(ProvisionError::LeaseLost)));
        tx.send(true).unwrap();
        assert!(fence.holds());
        drop(tx);
        assert!(!fence.holds(), "no lease task, no lease");
    }
}
