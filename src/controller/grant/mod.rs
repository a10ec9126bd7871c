//! The `BitbucketAccessGrant` reconciler: provisioning as a resource, with
//! just-in-time expiry.
//!
//! # Rules
//!
//! - **The connector** is `spec.connectorRef.name` in
//!   `spec.connectorRef.namespace` (default: the grant's namespace). Another
//!   namespace is allowed only when that connector lists the grant's
//!   namespace in `spec.provisioning.grantNamespaces` (like the Gateway
//!   API's ReferenceGrant): otherwise, and when there is no such connector
//!   there (the two read the same, so a grant's author learns nothing of
//!   other namespaces), the grant is `Denied`, reason `NamespaceNotAllowed`.
//!   Missing in the grant's own namespace: `Ready=False`, reason
//!   `ConnectorNotFound` (Stalled, retried every 5 minutes and whenever a
//!   connector changes). Present but suspended, being deleted, or not
//!   connected yet (no runtime with accepted credentials):
//!   `ConnectorNotReady`, retried every 30 s and whenever the connector's
//!   status changes (connectors of every watched namespace are watched and
//!   mapped to the grants that reference them). The operator sees only the
//!   namespaces it watches (`run --watch-namespaces`).
//! - **Provisioning must be enabled** for a new grant
//!   ([`policy::resolve_switch`]: `spec.provisioning.enabled`, else the
//!   Secret's `BATON_PROVISIONING`, whose explicit `false` is a veto):
//!   otherwise `Ready=False`, reason `ProvisioningDisabled`, state `Failed`
//!   (Stalled), and nothing is written to Bitbucket. The switch gates new
//!   grants only: expiry, deletion and a deleted connector revoke whatever
//!   it says ([`lookup::for_revoke`]).
//! - **Policy.** A new grant must be within the connector's
//!   `spec.provisioning` ([`policy::check`]): otherwise state `Denied`,
//!   `Ready=False` with the rule as reason (`NamespaceNotAllowed`,
//!   `PermissionNotAllowed`, `WorkspaceNotAllowed`, `TargetNotAllowed`,
//!   `DurationRequired`, `DurationExceedsMaximum`), `Stalled=True`, one
//!   Warning Event `Denied` per transition ([`status::is_new_denial`]),
//!   nothing written. A denied grant is looked at again when the connector
//!   changes (a wider policy lets it through). The policy is checked when a
//!   grant is made; a held grant is not re-checked.
//! - **Grant.** The finalizer goes on first; then the provisioner ensures *at
//!   least* the permission ([`GrantMode::AtLeast`]: a higher level already
//!   held is left alone). On success the status records `previousPermission`
//!   (what the principal held before; absent when nothing), `grantedAt`,
//!   `expiresAt` (`spec.expiresAt`, or `grantedAt + spec.duration`),
//!   `principalId`, `target`, `applied` (below), state `Granted`, `Ready=True`
//!   reason `Granted`, and a `Granted` Event names what changed ("granted
//!   write on repository acme/api to user jdoe (previously read)"). Failures
//!   set `Ready=False` with [`ProvisionError::reason`] (`PrincipalNotFound`,
//!   `NotWorkspaceMember`, `TargetNotFound`, `Conflict`, `NotProvisionable`,
//!   …); permanent ones are `Stalled` (state `Failed`, retried every 5
//!   minutes), transient ones `Reconciling` with exponential backoff. A
//!   `GrantFailed` Warning Event is emitted on the transition only.
//! - **`previousPermission` is recorded once.** It is written when the grant
//!   goes from not-held to held, and never rewritten while the grant holds:
//!   a later reconcile does not call Bitbucket at all (the grant holds until
//!   expiry, deletion or a spec change), so it can never record the level the
//!   grant itself put in place.
//! - **Intent before write** ([`intent`]). Before any Bitbucket write
//!   (grant, revoke, restore) the change is recorded durably — first in the
//!   store (`grant_intents`), then in `status.pendingChange` — and only then
//!   written; the result is recorded in status (clearing `pendingChange`),
//!   then the store's intent is closed with an audit entry. Store first: it
//!   is local and cheap, so a status write that fails leaves only a
//!   store-side orphan, which nobody else sees and the next reconcile closes
//!   as not written; status second, because it is what survives the store
//!   (another replica, a lost volume). A reconcile that finds a pending
//!   change (status first, else the store) resolves it before anything else
//!   by reading the level in Bitbucket: equal to the change's `to`, the write
//!   happened and is recorded with `previousPermission` = its `from` (never
//!   the level read now); equal to `from`, it did not happen and the step is
//!   redone; anything else, someone else changed it: recorded and reported,
//!   access never widened. So a stop at any point resolves to exactly one
//!   of: not granted, or granted and recorded; and a due expiry still
//!   happens on the first reconcile after the restart.
//! - **Fencing.** With leader election the provisioner checks the lease
//!   ([`crate::provision::Fence`]) right before each Bitbucket write: a
//!   replica that lost it makes no further write (`LeaseLost`, not retried
//!   as a failure; the pending change is left for the new leader).
//! - **The applied access** (`status.applied`: connector, principal as
//!   resolved — user UUID or group slug —, workspace, target, permission) is
//!   recorded in the same status write that marks the grant held, before
//!   the reconcile returns. Expiry, deletion and spec changes end *that*
//!   access, not whatever the spec says now, and the revoke names the
//!   principal by the resolved id. It lives in status, not metadata, on
//!   purpose: status is written only by the operator (`/status` RBAC is
//!   separate), whereas annotations can be rewritten by anyone who may patch
//!   the grant — an earlier version kept it in the annotation
//!   `connectors.dev/applied-access`, which let such a person point the
//!   operator's revoke at someone else's access. That annotation is ignored.
//!   A held grant recorded by that version (no `status.applied`) is taken to
//!   hold its current spec, its user named by `status.principalId`; the next
//!   reconcile records that as `status.applied`.
//! - **Expiry** is driven by `status` timestamps, so it survives restarts:
//!   a held grant is requeued at `expiresAt`, and any reconcile at or after
//!   `expiresAt` revokes it and restores the previous level
//!   ([`Provisioner::revoke_and_restore`]). The state becomes `Expired`,
//!   condition `Expired=True`, `Ready=False` reason `Expired`, an `Expired`
//!   Event is emitted. The object stays (GitOps owns its lifecycle) and is
//!   never granted again, whatever its spec becomes: to grant again, create a
//!   new grant (or delete and re-apply this one). A grant whose `expiresAt`
//!   has passed before it was ever granted goes straight to `Expired` with no
//!   Bitbucket write.
//! - **The request is immutable.** CEL on the CRD refuses a change of
//!   principal, target, permission or connector, and lets `duration` and
//!   `expiresAt` only shrink. Should an API server let a change through
//!   anyway, a held grant never widens: another access in the spec is
//!   ignored (`Ready=False`, reason `SpecImmutable`, Stalled; the access
//!   stays exactly as applied), and the expiry is never later than the one
//!   recorded in status ([`decide::expiry`]); a shorter one applies.
//! - **Deletion** (finalizer): a held grant is revoked and the previous level
//!   restored (a `Revoked` Event), then the finalizer is removed, also when
//!   provisioning was disabled since. *Deletion is never blocked for ever*:
//!   when the connector is gone, the revoke fails permanently (credentials
//!   rejected, target deleted, …), or the connector has not been usable for
//!   10 minutes since the deletion was requested, a Warning Event
//!   `RevokeSkipped` says that the access could not be revoked and why, and
//!   the finalizer is removed anyway. Removing the finalizer by hand skips
//!   the revoke entirely: the operator cannot prevent that (RBAC on
//!   `bitbucketaccessgrants` update can).
//! - **A connector being deleted** keeps its client and its finalizer until
//!   every grant it made holds nothing (`connector_deletion`): such a held
//!   grant is revoked and restored like an expiry, and ends as `Revoked`
//!   (`Ready=False`, reason `ConnectorDeleted`; terminal, like `Expired`). Rationale: a finalizer that can never be satisfied
//!   blocks namespace deletion and GitOps pruning; the Event (and the
//!   connector's inventory, which still shows the permission) is the audit
//!   trail for a person to finish the job. Transient failures are retried
//!   until then.
//! - **Overlapping grants** (several live grants of one connector, principal
//!   and target): the highest level wins while they coexist (each grant
//!   ensures *at least* its level); ending one restores
//!   [`level_to_restore`]`(before, levels of the others)`, so the others'
//!   highest level stays and the last one out restores `before`. `before` is
//!   the `previousPermission` of the earliest grant (by `grantedAt`): a grant
//!   made while others hold copies the earliest one's `previousPermission`
//!   instead of recording the level the others put in place, so every grant
//!   of the set carries the level held before any of them. "Live" means
//!   state `Granted` and not being deleted; peers are matched by connector,
//!   target and the resolved principal id (`status.principalId`) **across
//!   every connector on the same credential** ([`overlap`]: the rate
//!   limiter's credential identity, so two connectors writing the same
//!   Bitbucket see each other's grants) and by the connector's namespace, from a fresh list of the watched
//!   namespaces' grants (each peer's access from its `status.applied`).
//!   Operations on one credential/workspace/target are serialised
//!   in-process.
//! - **Audit** ([`audit`]): every grant, revoke, restore, expiry, denial and
//!   recovery is appended to the store's audit log (requester from the
//!   annotation `connectors.dev/requested-by`).
//! - **Store refresh.** Every change refreshes the connector's store
//!   (`namespace/connector`) through the provisioner's narrow
//!   [`Inventory`](crate::provision::Inventory) interface.
//! - **Events** (`events.k8s.io`), on transitions only:
//!   `Granted` (what was granted to whom, and what was held before),
//!   `Revoked` (deletion or connector deletion: what was revoked and
//!   restored), `Expired`, and Warnings `Denied`, `GrantFailed`,
//!   `ConnectorNotFound`, `ConnectorNotReady` (when the Ready reason
//!   changes, not on every retry) and `RevokeSkipped`.
//! - **Status** is written by server-side apply on `/status` (field manager
//!   `bitbucket-operator`) only when it changed; kstatus `Reconciling` and
//!   `Stalled` are present only while True. Grants are watched on generation
//!   and finalizer changes only, so status writes never loop. It is compared
//!   with the status this controller last wrote (not the lagging watch
//!   cache), and every reconcile decides from that newest status.
//!
//! # Shape
//!
//! - [`decide`]: the pure rules (decision table, expiry, overlap levels,
//!   spec → request → applied access conversions).
//! - [`policy`]: the connector's switch and policy, pure.
//! - [`lookup`]: the connector for a new grant (switch, policy) or a revoke.
//! - [`status`]: the status as a pure function of what happened ([`status::Outcome`]).
//! - `reconcile`: the I/O (Secret, peers, Bitbucket through the
//!   provisioner, Events) and [`controller`], the watch wiring.
//!
//! Backoff, the status writer, the error policy and metrics are the shared
//! [`super::common::Scaffold`].
//!
//!
//! [`GrantMode::AtLeast`]: crate::provision::GrantMode::AtLeast
//! [`ProvisionError::reason`]: crate::provision::ProvisionError::reason
//! [`Provisioner::revoke_and_restore`]: crate::provision::Provisioner::revoke_and_restore
//! [`level_to_restore`]: crate::provision::level_to_restore

pub mod audit;
pub mod decide;
pub mod faults;
mod intent;
pub mod lookup;
mod overlap;
pub mod policy;
mod reconcile;
pub mod status;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use kube::runtime::events::Recorder;
use kube::runtime::finalizer;

use super::common::{MetricLabel, Scaffold};
use super::loops::Manager;
use crate::crd::{BitbucketAccessGrant, Reason};
use crate::metrics::Metrics;
use crate::provision::{Fence, ProvisionError};
pub use faults::{FaultAction, FaultPoint, Faults};

pub use decide::{
    Peer, Step, applied_access, decide, expiry, held_access, is_held, previous_to_record, request_for, restore_level,
    revoke_request, same_access,
};
pub use policy::{Violation, resolve_switch};
pub use reconcile::{Blocker, controller, error_policy, reconcile};
pub use status::EXPIRED_CONDITION;

/// Shared by every grant reconcile.
pub struct GrantContext {
    pub scaffold: Scaffold<BitbucketAccessGrant>,
    pub manager: Arc<Manager>,
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// The namespaces the operator watches (empty: all). A grant may use a
    /// connector of any of them, so connectors and peers are looked for there.
    watched: Vec<String>,
    /// Checked before each Bitbucket write (leader election).
    fence: Fence,
    /// Inert unless a test arms it.
    faults: Faults,
}

impl GrantContext {
    pub fn new(client: kube::Client, manager: Arc<Manager>, recorder: Recorder, metrics: Arc<Metrics>) -> Self {
        GrantContext {
            scaffold: Scaffold::new("grant", client, recorder, metrics),
            manager,
            locks: Mutex::default(),
            watched: Vec::new(),
            fence: Fence::unfenced(),
            faults: Faults::default(),
        }
    }

    /// Scopes the context to the watched namespaces (`run --watch-namespaces`; empty: all).
    pub fn watching(mut self, namespaces: Vec<String>) -> Self {
        self.watched = namespaces;
        self
    }

    fn apis<K>(&self) -> Vec<kube::Api<K>>
    where
        K: kube::Resource<Scope = kube::core::NamespaceResourceScope>,
        K::DynamicType: Default,
    {
        let client = &self.scaffold.client;
        if self.watched.is_empty() {
            vec![kube::Api::all(client.clone())]
        } else {
            self.watched
                .iter()
                .map(|ns| kube::Api::namespaced(client.clone(), ns))
                .collect()
        }
    }

    /// Grants in every watched namespace.
    fn grant_apis(&self) -> Vec<kube::Api<BitbucketAccessGrant>> {
        self.apis()
    }

    /// Bitbucket writes only while `fence` holds.
    pub fn with_fence(mut self, fence: Fence) -> Self {
        self.fence = fence;
        self
    }

    /// Test-only fault injection (see [`faults`]).
    pub fn with_faults(mut self, faults: Faults) -> Self {
        self.faults = faults;
        self
    }

    /// One lock per credential/workspace/target: overlapping grants, of any
    /// connector on that credential, are granted and revoked one at a time.
    /// (Not per principal: before a grant the principal is not resolved
    /// yet, and one user may be named by nickname, account ID or UUID.)
    fn lock_for(&self, credential: &str, request: &crate::provision::AccessRequest) -> Arc<tokio::sync::Mutex<()>> {
        let key = format!(
            "{credential}/{}/{}",
            request.workspace,
            decide::target_path(&request.target)
        );
        let mut locks = self.locks.lock().unwrap_or_else(|e| e.into_inner());
        Arc::clone(locks.entry(key).or_default())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum GrantError {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// During deletion, the connector cannot act yet: retried with backoff.
    #[error("cannot revoke yet: {}", .0.message())]
    Blocked(Blocker),
    /// A revoke failed transiently (Bitbucket unavailable, rate limited).
    #[error("revoke failed: {0}")]
    Revoke(#[source] ProvisionError),
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<finalizer::Error<GrantError>>),
    #[error("object has no namespace")]
    NotNamespaced,
    /// This replica lost the lease: no Bitbucket write was made; the new
    /// leader resolves any pending change. Not retried here.
    #[error("lease lost: the Bitbucket write was not made")]
    LeaseLost,
    /// The store failed while recording an intent or an audit entry.
    #[error("store: {0}")]
    Store(String),
    /// A test stopped the reconcile here as if the process had died.
    #[error("stopped {0} (injected fault)")]
    Crashed(FaultPoint),
}

impl MetricLabel for GrantError {
    fn metric_label(&self) -> &'static str {
        match self {
            GrantError::Kube(_) => "kubernetes",
            GrantError::Blocked(_) => "connector_not_ready",
            GrantError::Revoke(_) => "bitbucket",
            GrantError::Finalizer(inner) => inner.metric_label(),
            GrantError::NotNamespaced => "invalid",
            GrantError::LeaseLost => "lease_lost",
            GrantError::Store(_) => "store",
            GrantError::Crashed(_) => "injected_fault",
        }
    }
}

impl From<&ProvisionError> for Reason {
    /// The condition reason of a failed grant or revoke.
    fn from(err: &ProvisionError) -> Self {
        match err {
            ProvisionError::ProvisioningDisabled => Reason::ProvisioningDisabled,
            ProvisionError::PrincipalNotFound { .. } => Reason::PrincipalNotFound,
            ProvisionError::NotWorkspaceMember { .. } => Reason::NotWorkspaceMember,
            ProvisionError::TargetNotFound { .. } => Reason::TargetNotFound,
            ProvisionError::NotProvisionable { .. } => Reason::NotProvisionable,
            ProvisionError::InvalidPermission { .. } => Reason::InvalidPermission,
            ProvisionError::InvalidRequest { .. } => Reason::InvalidSpec,
            ProvisionError::Conflict(_) => Reason::Conflict,
            ProvisionError::InvalidCredentials(_) => Reason::InvalidCredentials,
            ProvisionError::Forbidden(_) => Reason::Forbidden,
            ProvisionError::BitbucketUnavailable(_) => Reason::BitbucketUnavailable,
            ProvisionError::RateLimited(_) => Reason::RateLimited,
            ProvisionError::Api(_) | ProvisionError::LeaseLost | ProvisionError::Aborted { .. } => Reason::GrantFailed,
        }
    }
}

#[cfg(test)]
mod tests;
