//! The `BitbucketAccessGrant` reconciler: provisioning as a resource, with
//! just-in-time expiry.
//!
//! # Rules
//!
//! - **Same namespace.** `spec.connectorRef.name` is looked up in the grant's
//!   own namespace only. Missing: `Ready=False`, reason `ConnectorNotFound`
//!   (Stalled, retried every 5 minutes and whenever a connector changes).
//!   Present but suspended, being deleted, or not connected yet (no runtime
//!   with accepted credentials): `ConnectorNotReady`, retried every 30 s and
//!   whenever the connector's status changes (connectors are watched and
//!   mapped to the grants that reference them).
//! - **Provisioning must be enabled** for the connector (`spec.provisioning`,
//!   else the Secret's `BATON_PROVISIONING`): otherwise `Ready=False`, reason
//!   `ProvisioningDisabled`, state `Failed` (Stalled), and nothing is written
//!   to Bitbucket.
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
//!   One window remains: if the status cannot be written (after a few
//!   retries, or the operator stops) right after Bitbucket was changed, the
//!   grant is not recorded as held: the next reconcile grants again, finds
//!   the level already held and records *that* as previous, so expiry
//!   leaves the access in place rather than guessing (and a deletion before
//!   then revokes nothing).
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
//! - **Spec change** (new generation) of a held grant: if the access
//!   (connector, principal, target, permission) is unchanged (only
//!   `duration`/`expiresAt` changed), nothing is written and the expiry is
//!   recomputed from the original `grantedAt`. Otherwise the old access is
//!   ended exactly as on deletion (revoke and restore, honouring overlapping
//!   grants; a `Revoked` Event) and the new spec is granted as a new grant
//!   (new `grantedAt`, `previousPermission` recorded afresh — for the same
//!   target this is the restored level, i.e. the same value). The principal
//!   may briefly hold the restored level in between.
//! - **Deletion** (finalizer): a held grant is revoked and the previous level
//!   restored (a `Revoked` Event), then the finalizer is removed. *Deletion
//!   is never blocked for ever*: when the connector is gone, provisioning was
//!   disabled since, the revoke fails permanently (credentials rejected,
//!   target deleted, …), or the connector has not been usable for 10 minutes
//!   since the deletion was requested, a Warning Event `RevokeSkipped` says
//!   that the access could not be revoked and why, and the finalizer is
//!   removed anyway. Rationale: a finalizer that can never be satisfied
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
//!   target and the resolved principal id (`status.principalId`), from a
//!   fresh list of the namespace's grants (each peer's access from its
//!   `status.applied`). Operations on one connector/target are serialised
//!   in-process.
//! - **Store refresh.** Every change refreshes the connector's store
//!   (`namespace/connector`) through [`Provisioner::with_store`].
//! - **Events** (`events.k8s.io`, the audit trail), on transitions only:
//!   `Granted` (what was granted to whom, and what was held before),
//!   `Revoked` (deletion or spec change: what was revoked and restored),
//!   `Expired`, and Warnings `GrantFailed`, `ConnectorNotFound`,
//!   `ConnectorNotReady` (when the Ready reason changes, not on every retry)
//!   and `RevokeSkipped`.
//! - **Status** is written by server-side apply on `/status` (field manager
//!   `bitbucket-operator`) only when it changed; kstatus `Reconciling` and
//!   `Stalled` are present only while True. Grants are watched on generation
//!   and finalizer changes only, so status writes never loop.
//!
//! [`GrantMode::AtLeast`]: crate::provision::GrantMode::AtLeast

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use jiff::Timestamp;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::finalizer::{self, finalizer};
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::utils::Predicate;
use kube::runtime::{Controller, WatchStreamExt, predicates, watcher};
use kube::{Resource, ResourceExt};

use super::connector::FIELD_MANAGER;
use super::loops::Manager;
use crate::crd::{
    AppliedAccess, AppliedPrincipal, AppliedPrincipalKind, AppliedTarget, AppliedTargetKind, BitbucketAccessGrant,
    BitbucketAccessGrantSpec, BitbucketAccessGrantStatus, BitbucketConnector, GRANT_FINALIZER, condition_type as ct,
    find_condition, grant_state as st, new_condition, reason, remove_condition, set_condition,
};
use crate::metrics::Metrics;
use crate::provision::{
    AccessRequest, AfterRefresh, GrantMode, Permission, PrincipalRef, ProvisionError, Provisioner, TargetRef,
    level_to_restore, parse_level,
};
use crate::settings::ConnectorSettings;

/// Condition type set True once the grant expired.
pub const EXPIRED_CONDITION: &str = "Expired";
/// Deletion waits at most this long for an unusable connector.
const DELETION_GRACE: Duration = Duration::from_secs(600);
const SLOW_RETRY: Duration = Duration::from_secs(300);
const NOT_READY_RETRY: Duration = Duration::from_secs(30);
/// A held grant without expiry is looked at again this often (cheap: no Bitbucket call).
const HOLD_RECHECK: Duration = Duration::from_secs(3600);

/// Shared by every grant reconcile.
pub struct GrantContext {
    pub client: kube::Client,
    pub manager: Arc<Manager>,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    failures: Mutex<HashMap<String, u32>>,
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl GrantContext {
    pub fn new(client: kube::Client, manager: Arc<Manager>, recorder: Recorder, metrics: Arc<Metrics>) -> Self {
        GrantContext {
            client,
            manager,
            recorder,
            metrics,
            failures: Mutex::default(),
            locks: Mutex::default(),
        }
    }

    /// One lock per namespace/connector/target: overlapping grants are
    /// granted and revoked one at a time. (Not per principal: before a
    /// grant the principal is not resolved yet, and one user may be named
    /// by nickname, account ID or UUID.)
    fn lock_for(&self, namespace: &str, access: &AppliedAccess) -> Arc<tokio::sync::Mutex<()>> {
        let key = format!(
            "{namespace}/{}/{}/{}",
            access.connector,
            access.workspace,
            access.target.display()
        );
        let mut locks = self.locks.lock().unwrap_or_else(|e| e.into_inner());
        Arc::clone(locks.entry(key).or_default())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum GrantError {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// Retry with backoff (Bitbucket unavailable, connector not usable yet during deletion).
    #[error("{0}")]
    Transient(String),
    #[error("finalizer: {0}")]
    Finalizer(Box<finalizer::Error<GrantError>>),
    #[error("object has no namespace")]
    NotNamespaced,
}

/// The access `spec` asks for, with the principal not resolved yet
/// (`principal.id` is what the spec names; `grant` fills in the id
/// Bitbucket resolved).
pub fn wanted_access(spec: &BitbucketAccessGrantSpec) -> Result<AppliedAccess, ProvisionError> {
    let request = AccessRequest::from_spec(spec)?;
    let (kind, requested) = match request.principal {
        PrincipalRef::User(user) => (AppliedPrincipalKind::User, user),
        PrincipalRef::Group(group) => (AppliedPrincipalKind::Group, group),
    };
    let (kind_of_target, key) = match request.target {
        TargetRef::Group(g) => (AppliedTargetKind::Group, g),
        TargetRef::Project(p) => (AppliedTargetKind::Project, p),
        TargetRef::Repository(r) => (AppliedTargetKind::Repository, r),
        TargetRef::Workspace => {
            return Err(ProvisionError::InvalidRequest {
                message: "set exactly one of target.group, target.project or target.repository".into(),
            });
        }
    };
    Ok(AppliedAccess {
        connector: spec.connector_ref.name.clone(),
        principal: AppliedPrincipal {
            kind,
            id: requested.clone(),
            requested,
        },
        workspace: request.workspace,
        target: AppliedTarget {
            kind: kind_of_target,
            key,
        },
        permission: request.permission,
    })
}

/// Whether `spec` still asks for the access `applied` (only
/// `duration`/`expiresAt` may differ).
pub fn same_access(applied: &AppliedAccess, spec: &BitbucketAccessGrantSpec) -> bool {
    wanted_access(spec).is_ok_and(|wanted| {
        wanted.connector == applied.connector
            && wanted.principal.kind == applied.principal.kind
            && wanted.principal.requested == applied.principal.requested
            && wanted.workspace == applied.workspace
            && wanted.target == applied.target
            && wanted.permission == applied.permission
    })
}

/// The request for an access: for an applied one (revoke), the principal is
/// named by the id resolved at grant time.
fn access_request(applied: &AppliedAccess) -> AccessRequest {
    let principal = match applied.principal.kind {
        AppliedPrincipalKind::User => PrincipalRef::User(applied.principal.id.clone()),
        AppliedPrincipalKind::Group => PrincipalRef::Group(applied.principal.id.clone()),
    };
    let target = match applied.target.kind {
        AppliedTargetKind::Group => TargetRef::Group(applied.target.key.clone()),
        AppliedTargetKind::Project => TargetRef::Project(applied.target.key.clone()),
        AppliedTargetKind::Repository => TargetRef::Repository(applied.target.key.clone()),
    };
    AccessRequest::new(applied.workspace.clone(), principal, target, applied.permission)
}

/// The access a held grant put in place: `status.applied`. A grant recorded
/// by an earlier version (which kept it in an annotation, never read now:
/// anyone who may patch the grant can write one) is taken to hold its
/// current spec, with a user named by the `status.principalId` resolved at
/// grant time.
pub fn held_access(obj: &BitbucketAccessGrant) -> Result<AppliedAccess, ProvisionError> {
    let status = obj.status.as_ref();
    if let Some(applied) = status.and_then(|s| s.applied.as_ref()) {
        return Ok(applied.clone());
    }
    let mut applied = wanted_access(&obj.spec)?;
    if applied.principal.kind == AppliedPrincipalKind::User
        && let Some(id) = status
            .and_then(|s| s.principal_id.as_deref())
            .filter(|id| !id.is_empty())
    {
        applied.principal.id = id.to_owned();
    }
    Ok(applied)
}

/// The grant's access is in place: state Granted with a grant time.
pub fn is_held(status: Option<&BitbucketAccessGrantStatus>) -> bool {
    status.is_some_and(|s| s.state.as_deref() == Some(st::GRANTED) && s.granted_at.is_some())
}

/// What a reconcile must do, decided from spec, status and the clock alone.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// Not held: grant the spec.
    Grant,
    /// Held, but the spec now names another access: end the old one, grant the new.
    Regrant,
    /// Held and `now >= expiresAt`: revoke and restore.
    Expire,
    /// `spec.expiresAt` passed before anything was granted: mark Expired, no write.
    ExpireUngranted,
    /// Held and current: nothing to write; look again at `until` (expiry), if any.
    Hold { until: Option<Timestamp> },
    /// Expired: terminal.
    Done,
    /// The spec cannot be interpreted (an unparsable duration).
    Invalid(String),
}

/// When a held grant expires: `spec.expiresAt`, else `grantedAt + duration`,
/// else never. Before a grant, only an explicit `expiresAt` counts.
pub fn expiry(
    spec: &BitbucketAccessGrantSpec,
    status: Option<&BitbucketAccessGrantStatus>,
) -> Result<Option<Timestamp>, String> {
    match status.and_then(|s| s.granted_at.as_ref()) {
        Some(granted_at) if is_held(status) => spec
            .expiry(granted_at)
            .map(|at| at.map(|t| t.0))
            .map_err(|e| e.to_string()),
        _ => Ok(spec.expires_at.as_ref().map(|t| t.0)),
    }
}

/// The decision table (see the module docs).
pub fn decide(
    spec: &BitbucketAccessGrantSpec,
    status: Option<&BitbucketAccessGrantStatus>,
    applied: Option<&AppliedAccess>,
    now: Timestamp,
) -> Step {
    if status.and_then(|s| s.state.as_deref()) == Some(st::EXPIRED) {
        return Step::Done;
    }
    let expires = match expiry(spec, status) {
        Ok(at) => at,
        Err(message) => return Step::Invalid(message),
    };
    let expired = expires.is_some_and(|at| now >= at);
    if !is_held(status) {
        return if expired { Step::ExpireUngranted } else { Step::Grant };
    }
    if expired {
        return Step::Expire;
    }
    if applied.is_some_and(|a| !same_access(a, spec)) {
        return Step::Regrant;
    }
    Step::Hold { until: expires }
}

/// Another live grant of the same connector, principal and target.
#[derive(Debug, Clone, PartialEq)]
pub struct Peer {
    pub permission: Permission,
    pub previous: Option<Permission>,
    pub granted_at: Timestamp,
}

/// The level to put back when a grant (holding since `granted_at`, having
/// recorded `previous`) ends while `peers` remain: the peers' highest level,
/// or the level held before the earliest grant of the set.
pub fn restore_level(
    previous: Option<Permission>,
    granted_at: Option<Timestamp>,
    peers: &[Peer],
) -> Option<Permission> {
    let before = earliest_previous(peers, granted_at.map(|at| (at, previous)));
    let remaining: Vec<Permission> = peers.iter().map(|p| p.permission).collect();
    level_to_restore(before, &remaining)
}

/// What a new grant records as `previousPermission`: the earliest live
/// peer's record when others hold, else what the provisioner saw.
pub fn previous_to_record(observed: Option<Permission>, peers: &[Peer]) -> Option<Permission> {
    if peers.is_empty() {
        observed
    } else {
        earliest_previous(peers, None)
    }
}

fn earliest_previous(peers: &[Peer], own: Option<(Timestamp, Option<Permission>)>) -> Option<Permission> {
    peers
        .iter()
        .map(|p| (p.granted_at, p.previous))
        .chain(own)
        .min_by_key(|(at, _)| *at)
        .and_then(|(_, previous)| previous)
}

fn parse_previous(status: &BitbucketAccessGrantStatus) -> Option<Permission> {
    status
        .previous_permission
        .as_deref()
        .and_then(|p| parse_level(p).ok().flatten())
}

/// Why the connector cannot act for a grant now.
#[derive(Debug, Clone, PartialEq)]
enum Blocker {
    NotFound(String),
    NotReady(String),
    Disabled(String),
}

impl Blocker {
    fn reason(&self) -> &'static str {
        match self {
            Blocker::NotFound(_) => reason::CONNECTOR_NOT_FOUND,
            Blocker::NotReady(_) => reason::CONNECTOR_NOT_READY,
            Blocker::Disabled(_) => reason::PROVISIONING_DISABLED,
        }
    }

    fn message(&self) -> &str {
        match self {
            Blocker::NotFound(m) | Blocker::NotReady(m) | Blocker::Disabled(m) => m,
        }
    }
}

/// The connector's provisioner, or why there is none.
async fn provisioner_for(
    ctx: &GrantContext,
    namespace: &str,
    connector: &str,
) -> Result<Result<Provisioner, Blocker>, kube::Error> {
    let api: Api<BitbucketConnector> = Api::namespaced(ctx.client.clone(), namespace);
    let Some(obj) = api.get_opt(connector).await? else {
        return Ok(Err(Blocker::NotFound(format!(
            "BitbucketConnector {namespace}/{connector} not found (it must be in the grant's namespace)"
        ))));
    };
    if obj.metadata.deletion_timestamp.is_some() {
        return Ok(Err(Blocker::NotReady(format!(
            "BitbucketConnector {namespace}/{connector} is being deleted"
        ))));
    }
    if obj.spec.suspend {
        return Ok(Err(Blocker::NotReady(format!(
            "BitbucketConnector {namespace}/{connector} is suspended"
        ))));
    }
    match provisioning_enabled(&obj, ctx, namespace).await? {
        Ok(true) => {}
        Ok(false) => {
            return Ok(Err(Blocker::Disabled(format!(
                "provisioning is disabled for BitbucketConnector {namespace}/{connector}: set spec.provisioning: \
                 true or BATON_PROVISIONING=true in its Secret"
            ))));
        }
        Err(message) => return Ok(Err(Blocker::NotReady(message))),
    }
    let key = format!("{namespace}/{connector}");
    let Some(runtime) = ctx.manager.runtime(&key) else {
        return Ok(Err(Blocker::NotReady(format!(
            "BitbucketConnector {namespace}/{connector} is not connected yet"
        ))));
    };
    match runtime.connection().map(|c| c.result) {
        Some(Ok(_)) => {}
        Some(Err(err)) => {
            return Ok(Err(Blocker::NotReady(format!(
                "BitbucketConnector {namespace}/{connector} is not connected: {err}"
            ))));
        }
        None => {
            return Ok(Err(Blocker::NotReady(format!(
                "BitbucketConnector {namespace}/{connector} is still checking its credentials"
            ))));
        }
    }
    let client = runtime.engine().client().clone();
    let resync = Arc::clone(&runtime);
    let hook = AfterRefresh(Arc::new(move |kind| resync.resync_if_running(kind)));
    Ok(Ok(Provisioner::new(client, true)
        .with_store(Arc::clone(ctx.manager.store()), key)
        .after_refresh(hook)))
}

/// `spec.provisioning`, else the Secret's provisioning key (same namespace).
async fn provisioning_enabled(
    obj: &BitbucketConnector,
    ctx: &GrantContext,
    namespace: &str,
) -> Result<Result<bool, String>, kube::Error> {
    if let Some(enabled) = obj.spec.provisioning {
        return Ok(Ok(enabled));
    }
    let name = &obj.spec.secret_ref.name;
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), namespace);
    let Some(secret) = secrets.get_opt(name).await? else {
        return Ok(Err(format!("Secret {namespace}/{name} of the connector not found")));
    };
    let mut data: std::collections::BTreeMap<String, String> = secret
        .data
        .unwrap_or_default()
        .into_iter()
        .filter_map(|(k, v)| String::from_utf8(v.0).ok().map(|v| (k, v)))
        .collect();
    data.extend(secret.string_data.unwrap_or_default());
    let keys = super::connector::secret_keys(obj);
    Ok(ConnectorSettings::from_map(&data, &keys)
        .map(|s| s.provisioning)
        .map_err(|e| format!("Secret {namespace}/{name}: {e}")))
}

/// The other live grants of the same connector, principal and target.
async fn peers(
    ctx: &GrantContext,
    namespace: &str,
    own_name: &str,
    access: &AppliedAccess,
    principal_id: &str,
) -> Result<Vec<Peer>, kube::Error> {
    let api: Api<BitbucketAccessGrant> = Api::namespaced(ctx.client.clone(), namespace);
    let all = api.list(&ListParams::default()).await?;
    Ok(all
        .items
        .iter()
        .filter(|g| g.name_any() != own_name && g.metadata.deletion_timestamp.is_none())
        .filter_map(|g| {
            let status = g.status.as_ref()?;
            if !is_held(Some(status)) || status.principal_id.as_deref() != Some(principal_id) {
                return None;
            }
            let applied = held_access(g).ok()?;
            if applied.connector != access.connector
                || applied.workspace != access.workspace
                || applied.target != access.target
            {
                return None;
            }
            Some(Peer {
                permission: applied.permission,
                previous: parse_previous(status),
                granted_at: status.granted_at.as_ref()?.0,
            })
        })
        .collect())
}

// ---- controller -------------------------------------------------------------

/// Runs the grant controller for one namespace scope (`None`: all) until `shutdown`.
pub async fn run(
    client: kube::Client,
    namespace: Option<String>,
    ctx: Arc<GrantContext>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let (grants, connectors): (Api<BitbucketAccessGrant>, Api<BitbucketConnector>) = match &namespace {
        Some(ns) => (Api::namespaced(client.clone(), ns), Api::namespaced(client.clone(), ns)),
        None => (Api::all(client.clone()), Api::all(client.clone())),
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
        // Any connector change (a status write included: becoming connected)
        // re-triggers the grants that reference it.
        .watches(connectors, watcher::Config::default(), move |connector| {
            let namespace = connector.namespace();
            let name = connector.name_any();
            mapper_reader
                .state()
                .into_iter()
                .filter(|g| g.namespace() == namespace && g.spec.connector_ref.name == name)
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
    let namespace = obj.namespace().ok_or(GrantError::NotNamespaced)?;
    let span = tracing::info_span!("reconcile_grant", namespace = %namespace, name = %obj.name_any());
    let api: Api<BitbucketAccessGrant> = Api::namespaced(ctx.client.clone(), &namespace);
    tracing::Instrument::instrument(
        finalizer(&api, GRANT_FINALIZER, obj, |event| async {
            match event {
                finalizer::Event::Apply(obj) => apply(obj, &ctx).await,
                finalizer::Event::Cleanup(obj) => cleanup(obj, &ctx).await,
            }
        }),
        span,
    )
    .await
    .map_err(|e| GrantError::Finalizer(Box::new(e)))
}

/// Exponential backoff with jitter: 5 s, 10 s, 20 s … capped at 5 min.
pub fn error_policy(obj: Arc<BitbucketAccessGrant>, err: &GrantError, ctx: Arc<GrantContext>) -> Action {
    let key = format!("{}/{}", obj.namespace().unwrap_or_default(), obj.name_any());
    let reason = match err {
        GrantError::Kube(_) => "grant_kubernetes",
        GrantError::Transient(_) => "grant_bitbucket",
        _ => "grant_other",
    };
    ctx.metrics
        .reconcile_errors
        .get_or_create(&crate::metrics::ReasonLabels { reason })
        .inc();
    let failures = bump_failures(&ctx, &key);
    tracing::warn!(grant = %key, failures, error = %err, "grant reconcile failed");
    Action::requeue(backoff(failures))
}

fn bump_failures(ctx: &GrantContext, key: &str) -> u32 {
    let mut failures = ctx.failures.lock().unwrap_or_else(|e| e.into_inner());
    let n = failures.entry(key.to_owned()).or_default();
    *n = n.saturating_add(1);
    *n
}

fn clear_failures(ctx: &GrantContext, key: &str) {
    ctx.failures.lock().unwrap_or_else(|e| e.into_inner()).remove(key);
}

fn backoff(failures: u32) -> Duration {
    crate::backoff::exponential(Duration::from_secs(5), Duration::from_secs(300), failures)
}

/// The status to start from: the current one with generation and target refreshed.
fn base_status(obj: &BitbucketAccessGrant) -> BitbucketAccessGrantStatus {
    let mut status = obj.status.clone().unwrap_or_default();
    status.observed_generation = obj.metadata.generation;
    status.target = Some(obj.spec.target.display());
    status
}

/// Ready=True (reason Granted), no kstatus conditions.
fn mark_granted(status: &mut BitbucketAccessGrantStatus, generation: Option<i64>, message: String) {
    status.state = Some(st::GRANTED.to_owned());
    set_condition(
        &mut status.conditions,
        new_condition(ct::READY, true, reason::GRANTED, message, generation),
    );
    remove_condition(&mut status.conditions, ct::RECONCILING);
    remove_condition(&mut status.conditions, ct::STALLED);
    remove_condition(&mut status.conditions, EXPIRED_CONDITION);
}

/// Ready=False with `why`; Stalled when `stalled`, else Reconciling. A held
/// grant stays `Granted` (its access is still in place).
fn mark_problem(
    status: &mut BitbucketAccessGrantStatus,
    generation: Option<i64>,
    why: &str,
    message: &str,
    stalled: bool,
    state_if_not_held: &str,
) {
    if !is_held(Some(status)) {
        status.state = Some(state_if_not_held.to_owned());
    }
    set_condition(
        &mut status.conditions,
        new_condition(ct::READY, false, why, message, generation),
    );
    let (on, off) = if stalled {
        (ct::STALLED, ct::RECONCILING)
    } else {
        (ct::RECONCILING, ct::STALLED)
    };
    set_condition(
        &mut status.conditions,
        new_condition(on, true, why, message, generation),
    );
    remove_condition(&mut status.conditions, off);
}

fn mark_expired(status: &mut BitbucketAccessGrantStatus, generation: Option<i64>, message: &str) {
    status.state = Some(st::EXPIRED.to_owned());
    set_condition(
        &mut status.conditions,
        new_condition(EXPIRED_CONDITION, true, reason::EXPIRED, message, generation),
    );
    set_condition(
        &mut status.conditions,
        new_condition(ct::READY, false, reason::EXPIRED, message, generation),
    );
    remove_condition(&mut status.conditions, ct::RECONCILING);
    remove_condition(&mut status.conditions, ct::STALLED);
}

async fn write_status(
    obj: &BitbucketAccessGrant,
    status: &BitbucketAccessGrantStatus,
    ctx: &GrantContext,
) -> Result<(), kube::Error> {
    if obj.status.as_ref() == Some(status) {
        return Ok(());
    }
    let api: Api<BitbucketAccessGrant> = Api::namespaced(ctx.client.clone(), &obj.namespace().unwrap_or_default());
    let patch = serde_json::json!({
        "apiVersion": BitbucketAccessGrant::api_version(&()),
        "kind": BitbucketAccessGrant::kind(&()),
        "status": status,
    });
    api.patch_status(
        &obj.name_any(),
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await?;
    Ok(())
}

async fn publish(ctx: &GrantContext, obj: &BitbucketAccessGrant, type_: EventType, why: &str, note: String) {
    let event = Event {
        type_,
        reason: why.to_owned(),
        note: Some(note),
        action: "Provision".to_owned(),
        secondary: None,
    };
    if let Err(err) = ctx.recorder.publish(&event, &obj.object_ref(&())).await {
        tracing::warn!(error = %err, reason = why, "could not publish an event");
    }
}

/// Whether the Ready condition changes from `before` to `after` (status or reason).
fn ready_transition(before: Option<&BitbucketAccessGrantStatus>, after: &BitbucketAccessGrantStatus) -> bool {
    let ready = |s: Option<&BitbucketAccessGrantStatus>| {
        s.and_then(|s| find_condition(&s.conditions, ct::READY))
            .map(|c| (c.status.clone(), c.reason.clone()))
    };
    ready(before) != ready(Some(after))
}

/// Reports a problem on status (Event on transitions) and returns when to retry.
async fn report_problem(
    obj: &BitbucketAccessGrant,
    ctx: &GrantContext,
    mut status: BitbucketAccessGrantStatus,
    why: &str,
    message: &str,
    stalled: bool,
    state_if_not_held: &str,
) -> Result<(), kube::Error> {
    mark_problem(
        &mut status,
        obj.metadata.generation,
        why,
        message,
        stalled,
        state_if_not_held,
    );
    if ready_transition(obj.status.as_ref(), &status) {
        let event_reason = match why {
            reason::CONNECTOR_NOT_FOUND | reason::CONNECTOR_NOT_READY => why,
            _ => reason::GRANT_FAILED,
        };
        publish(ctx, obj, EventType::Warning, event_reason, format!("{why}: {message}")).await;
    }
    write_status(obj, &status, ctx).await
}

async fn report_blocker(
    obj: &BitbucketAccessGrant,
    ctx: &GrantContext,
    status: BitbucketAccessGrantStatus,
    blocker: &Blocker,
) -> Result<Action, GrantError> {
    let key = format!("{}/{}", obj.namespace().unwrap_or_default(), obj.name_any());
    let (stalled, state, retry) = match blocker {
        Blocker::NotFound(_) => (true, st::PENDING, SLOW_RETRY),
        // 2 s, 4 s … 30 s: right after an operator restart the connector's
        // runtime appears within seconds, and a due expiry must not wait.
        Blocker::NotReady(_) => {
            let n = bump_failures(ctx, &key);
            let retry = Duration::from_secs(2).saturating_mul(1 << n.saturating_sub(1).min(4));
            (false, st::PENDING, retry.min(NOT_READY_RETRY))
        }
        Blocker::Disabled(_) => (true, st::FAILED, SLOW_RETRY),
    };
    report_problem(obj, ctx, status, blocker.reason(), blocker.message(), stalled, state).await?;
    Ok(Action::requeue(retry))
}

async fn report_provision_error(
    obj: &BitbucketAccessGrant,
    ctx: &GrantContext,
    status: BitbucketAccessGrantStatus,
    err: &ProvisionError,
) -> Result<Action, GrantError> {
    let key = format!("{}/{}", obj.namespace().unwrap_or_default(), obj.name_any());
    let permanent = err.is_permanent();
    let state = if permanent { st::FAILED } else { st::PENDING };
    report_problem(obj, ctx, status, err.reason(), &err.to_string(), permanent, state).await?;
    if permanent {
        clear_failures(ctx, &key);
        Ok(Action::requeue(SLOW_RETRY))
    } else {
        Ok(Action::requeue(backoff(bump_failures(ctx, &key))))
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

async fn apply(obj: Arc<BitbucketAccessGrant>, ctx: &GrantContext) -> Result<Action, GrantError> {
    let namespace = obj.namespace().ok_or(GrantError::NotNamespaced)?;
    let key = format!("{namespace}/{}", obj.name_any());
    let now = Timestamp::now();
    // Only a held grant has applied anything.
    let applied = is_held(obj.status.as_ref()).then(|| held_access(&obj));
    let step = decide(
        &obj.spec,
        obj.status.as_ref(),
        applied.as_ref().and_then(|a| a.as_ref().ok()),
        now,
    );
    tracing::debug!(?step, "grant step");
    let generation = obj.metadata.generation;
    let action = match step {
        Step::Done => {
            // Keep observedGeneration current; nothing else changes.
            let status = base_status(&obj);
            write_status(&obj, &status, ctx).await?;
            clear_failures(ctx, &key);
            Action::await_change()
        }
        Step::Invalid(message) => {
            report_problem(
                &obj,
                ctx,
                base_status(&obj),
                reason::INVALID_SPEC,
                &message,
                true,
                st::FAILED,
            )
            .await?;
            Action::await_change()
        }
        Step::Hold { until } => {
            let mut status = base_status(&obj);
            status.expires_at = until.map(Time);
            let message = obj
                .status
                .as_ref()
                .and_then(|s| find_condition(&s.conditions, ct::READY))
                .filter(|c| c.status == "True")
                .map(|c| c.message.clone())
                .unwrap_or_else(|| format!("{} held on {}", obj.spec.permission, obj.spec.target.display()));
            mark_granted(&mut status, generation, message);
            // Granted by an earlier version: record what it is taken to hold.
            if status.applied.is_none()
                && let Some(Ok(applied)) = applied
            {
                status.applied = Some(applied);
            }
            write_status(&obj, &status, ctx).await?;
            clear_failures(ctx, &key);
            requeue_until(until, now)
        }
        Step::ExpireUngranted => {
            let mut status = base_status(&obj);
            status.expires_at = obj.spec.expires_at.clone();
            let message = "expired before it was granted: nothing was changed in Bitbucket".to_owned();
            mark_expired(&mut status, generation, &message);
            write_status(&obj, &status, ctx).await?;
            publish(ctx, &obj, EventType::Normal, reason::EXPIRED, message).await;
            Action::await_change()
        }
        Step::Expire => {
            let applied = match required(applied) {
                Ok(applied) => applied,
                Err(err) => return report_provision_error(&obj, ctx, base_status(&obj), &err).await,
            };
            match end_access(&obj, ctx, &namespace, &applied).await? {
                Ended::Done(note) => {
                    let mut status = base_status(&obj);
                    status.applied = None;
                    let at = status.expires_at.as_ref().map(|t| t.0.to_string()).unwrap_or_default();
                    let message = format!("expired at {at}: {note}");
                    mark_expired(&mut status, generation, &message);
                    write_status(&obj, &status, ctx).await?;
                    publish(ctx, &obj, EventType::Normal, reason::EXPIRED, message).await;
                    clear_failures(ctx, &key);
                    Action::await_change()
                }
                Ended::Blocked(blocker) => report_blocker(&obj, ctx, base_status(&obj), &blocker).await?,
                Ended::Failed(err) => report_provision_error(&obj, ctx, base_status(&obj), &err).await?,
            }
        }
        Step::Regrant => {
            let applied = match required(applied) {
                Ok(applied) => applied,
                Err(err) => return report_provision_error(&obj, ctx, base_status(&obj), &err).await,
            };
            match end_access(&obj, ctx, &namespace, &applied).await? {
                Ended::Done(note) => {
                    publish(
                        ctx,
                        &obj,
                        EventType::Normal,
                        reason::REVOKED,
                        format!("spec changed: {note}"),
                    )
                    .await;
                    // The old access is gone: start over as a new grant.
                    // Recorded first (no longer held, nothing applied), so
                    // an interruption here re-grants rather than holds.
                    let mut status = base_status(&obj);
                    status.state = Some(st::PENDING.to_owned());
                    status.granted_at = None;
                    status.previous_permission = None;
                    status.expires_at = None;
                    status.principal_id = None;
                    status.applied = None;
                    write_status(&obj, &status, ctx).await?;
                    let mut refreshed = (*obj).clone();
                    refreshed.status = Some(status.clone());
                    grant(&refreshed, ctx, &namespace, status, now).await?
                }
                Ended::Blocked(blocker) => report_blocker(&obj, ctx, base_status(&obj), &blocker).await?,
                Ended::Failed(err) => report_provision_error(&obj, ctx, base_status(&obj), &err).await?,
            }
        }
        Step::Grant => grant(&obj, ctx, &namespace, base_status(&obj), now).await?,
    };
    Ok(action)
}

/// The applied access of a held grant (`None`: not held, which
/// [`decide`] never pairs with Expire or Regrant).
fn required(applied: Option<Result<AppliedAccess, ProvisionError>>) -> Result<AppliedAccess, ProvisionError> {
    applied.unwrap_or_else(|| {
        Err(ProvisionError::InvalidRequest {
            message: "the grant holds no access".into(),
        })
    })
}

/// Grants the spec (the grant is not held) and records it.
async fn grant(
    obj: &BitbucketAccessGrant,
    ctx: &GrantContext,
    namespace: &str,
    mut status: BitbucketAccessGrantStatus,
    now: Timestamp,
) -> Result<Action, GrantError> {
    let key = format!("{namespace}/{}", obj.name_any());
    let mut access = match wanted_access(&obj.spec) {
        Ok(access) => access,
        Err(err) => return report_provision_error(obj, ctx, status, &err).await,
    };
    let request = access_request(&access);
    let lock = ctx.lock_for(namespace, &access);
    let _guard = lock.lock().await;
    let provisioner = match provisioner_for(ctx, namespace, &access.connector).await? {
        Ok(p) => p,
        Err(blocker) => return report_blocker(obj, ctx, status, &blocker).await,
    };
    let outcome = match provisioner.grant(&request, GrantMode::AtLeast).await {
        Ok(outcome) => outcome,
        Err(err) => return report_provision_error(obj, ctx, status, &err).await,
    };
    let peers = peers(ctx, namespace, &obj.name_any(), &access, &outcome.principal.id).await?;
    let previous = previous_to_record(outcome.previous, &peers);
    let granted_at = Time(now);
    let expires = obj.spec.expiry(&granted_at).ok().flatten();
    status.previous_permission = previous.map(|p| p.as_str().to_owned());
    status.granted_at = Some(granted_at);
    status.expires_at = expires.clone();
    status.principal_id = Some(outcome.principal.id.clone());
    // What expiry and deletion will revoke: the principal as Bitbucket
    // resolved it now. Recorded in the same write as `grantedAt`.
    access.principal.id = outcome.principal.key.clone();
    status.applied = Some(access);
    let mut message = outcome.message();
    if !peers.is_empty() {
        message.push_str(&format!(
            " ({} other grant(s) of this principal and target hold; the highest level wins)",
            peers.len()
        ));
    }
    mark_granted(&mut status, obj.metadata.generation, message.clone());
    // Bitbucket has changed: the record of what was applied and what was
    // held before must land, so a failed write is retried a few times before
    // giving up.
    let mut attempt = 0u32;
    while let Err(err) = write_status(obj, &status, ctx).await {
        attempt += 1;
        if attempt >= 4 {
            return Err(err.into());
        }
        tracing::warn!(error = %err, attempt, "recording a grant on status failed; retrying");
        tokio::time::sleep(Duration::from_millis(250) * attempt).await;
    }
    publish(ctx, obj, EventType::Normal, reason::GRANTED, message).await;
    clear_failures(ctx, &key);
    Ok(requeue_until(expires.map(|t| t.0), now))
}

enum Ended {
    /// Revoked (or nothing to do); a note for people.
    Done(String),
    Blocked(Blocker),
    Failed(ProvisionError),
}

/// Ends the held access `applied` of `obj`: revoke and restore the level
/// the overlap rule gives.
async fn end_access(
    obj: &BitbucketAccessGrant,
    ctx: &GrantContext,
    namespace: &str,
    applied: &AppliedAccess,
) -> Result<Ended, GrantError> {
    let request = access_request(applied);
    let lock = ctx.lock_for(namespace, applied);
    let _guard = lock.lock().await;
    let provisioner = match provisioner_for(ctx, namespace, &applied.connector).await? {
        Ok(p) => p,
        Err(blocker) => return Ok(Ended::Blocked(blocker)),
    };
    let status = obj.status.clone().unwrap_or_default();
    let principal_id = status.principal_id.clone().unwrap_or_default();
    let peers = peers(ctx, namespace, &obj.name_any(), applied, &principal_id).await?;
    let restore = restore_level(parse_previous(&status), status.granted_at.as_ref().map(|t| t.0), &peers);
    match provisioner.revoke_and_restore(&request, restore).await {
        Ok(outcome) => Ok(Ended::Done(outcome.message())),
        // The target (or workspace) is gone: so is the access.
        Err(ProvisionError::TargetNotFound { target }) => Ok(Ended::Done(format!(
            "{target} no longer exists; nothing left to revoke"
        ))),
        Err(err) => Ok(Ended::Failed(err)),
    }
}

async fn cleanup(obj: Arc<BitbucketAccessGrant>, ctx: &GrantContext) -> Result<Action, GrantError> {
    let namespace = obj.namespace().ok_or(GrantError::NotNamespaced)?;
    let key = format!("{namespace}/{}", obj.name_any());
    if !is_held(obj.status.as_ref()) {
        clear_failures(ctx, &key);
        return Ok(Action::await_change());
    }
    let applied = match held_access(&obj) {
        Ok(applied) => applied,
        Err(err) => {
            return give_up(
                &obj,
                ctx,
                &obj.spec.target.display(),
                &key,
                format!("{}: {err}", err.reason()),
            )
            .await;
        }
    };
    let what = format!(
        "{} on {} {}",
        applied.permission,
        applied.workspace,
        applied.target.display()
    );
    let waited_long = obj.metadata.deletion_timestamp.as_ref().is_some_and(|t| {
        Timestamp::now()
            .duration_since(t.0)
            .try_into()
            .is_ok_and(|d: Duration| d >= DELETION_GRACE)
    });
    match end_access(&obj, ctx, &namespace, &applied).await? {
        Ended::Done(note) => {
            publish(
                ctx,
                &obj,
                EventType::Normal,
                reason::REVOKED,
                format!("grant deleted: {note}"),
            )
            .await;
            clear_failures(ctx, &key);
            Ok(Action::await_change())
        }
        Ended::Blocked(blocker @ (Blocker::NotFound(_) | Blocker::Disabled(_))) => {
            give_up(
                &obj,
                ctx,
                &what,
                &key,
                format!("{}: {}", blocker.reason(), blocker.message()),
            )
            .await
        }
        Ended::Blocked(blocker) if waited_long => {
            let why = format!(
                "{}: {} (waited {} minutes)",
                blocker.reason(),
                blocker.message(),
                DELETION_GRACE.as_secs() / 60
            );
            give_up(&obj, ctx, &what, &key, why).await
        }
        Ended::Blocked(blocker) => Err(GrantError::Transient(format!(
            "cannot revoke yet: {}",
            blocker.message()
        ))),
        Ended::Failed(err) if err.is_permanent() || waited_long => {
            give_up(&obj, ctx, &what, &key, format!("{}: {err}", err.reason())).await
        }
        Ended::Failed(err) => Err(GrantError::Transient(format!("revoke failed: {err}"))),
    }
}

/// Lets a deletion go without revoking: a Warning Event says what was left and why.
async fn give_up(
    obj: &BitbucketAccessGrant,
    ctx: &GrantContext,
    what: &str,
    key: &str,
    why: String,
) -> Result<Action, GrantError> {
    publish(
        ctx,
        obj,
        EventType::Warning,
        "RevokeSkipped",
        format!(
            "the access could not be revoked ({what}): {why}; the grant is deleted anyway, remove the permission \
             in Bitbucket by hand if it is still there"
        ),
    )
    .await;
    clear_failures(ctx, key);
    Ok(Action::await_change())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(secs: i64) -> Timestamp {
        Timestamp::from_second(secs).unwrap()
    }

    fn spec() -> BitbucketAccessGrantSpec {
        serde_json::from_value(serde_json::json!({
            "connectorRef": {"name": "c"},
            "principal": {"user": "jdoe"},
            "target": {"workspace": "acme", "repository": "api"},
            "permission": "write",
        }))
        .unwrap()
    }

    fn granted(at: i64, expires: Option<i64>) -> BitbucketAccessGrantStatus {
        BitbucketAccessGrantStatus {
            state: Some(st::GRANTED.into()),
            granted_at: Some(Time(ts(at))),
            expires_at: expires.map(|e| Time(ts(e))),
            previous_permission: Some("read".into()),
            principal_id: Some("{u}".into()),
            ..Default::default()
        }
    }

    #[test]
    fn decide_grants_holds_and_expires_on_status_timestamps() {
        let mut spec = spec();
        // Not granted yet: grant.
        assert_eq!(decide(&spec, None, None, ts(100)), Step::Grant);
        let failed = BitbucketAccessGrantStatus {
            state: Some(st::FAILED.into()),
            ..Default::default()
        };
        assert_eq!(decide(&spec, Some(&failed), None, ts(100)), Step::Grant);
        // Held without expiry: hold for ever.
        let status = granted(100, None);
        assert_eq!(decide(&spec, Some(&status), None, ts(200)), Step::Hold { until: None });
        // Duration counts from grantedAt, even after a restart.
        spec.duration = Some("1m".into());
        assert_eq!(
            decide(&spec, Some(&status), None, ts(150)),
            Step::Hold { until: Some(ts(160)) }
        );
        assert_eq!(decide(&spec, Some(&status), None, ts(160)), Step::Expire);
        assert_eq!(decide(&spec, Some(&status), None, ts(10_000)), Step::Expire);
        // expiresAt wins over nothing; duration and expiresAt are exclusive.
        spec.duration = None;
        spec.expires_at = Some(Time(ts(300)));
        assert_eq!(
            decide(&spec, Some(&status), None, ts(299)),
            Step::Hold { until: Some(ts(300)) }
        );
        assert_eq!(decide(&spec, Some(&status), None, ts(300)), Step::Expire);
        // Expired is terminal, whatever the spec says now.
        let expired = BitbucketAccessGrantStatus {
            state: Some(st::EXPIRED.into()),
            ..status.clone()
        };
        spec.expires_at = Some(Time(ts(99_999)));
        assert_eq!(decide(&spec, Some(&expired), None, ts(400)), Step::Done);
        // An expiresAt already past before granting: expire without a write.
        spec.expires_at = Some(Time(ts(50)));
        assert_eq!(decide(&spec, None, None, ts(100)), Step::ExpireUngranted);
        // An unparsable duration (the schema forbids it, but be safe).
        spec.expires_at = None;
        spec.duration = Some("soon".into());
        assert!(matches!(decide(&spec, Some(&status), None, ts(100)), Step::Invalid(_)));
    }

    #[test]
    fn decide_regrants_only_when_the_access_changes() {
        let mut spec = spec();
        let status = granted(100, None);
        let applied = applied(&spec, "{u}");
        assert_eq!(
            decide(&spec, Some(&status), Some(&applied), ts(200)),
            Step::Hold { until: None }
        );
        // A new expiry alone writes nothing.
        spec.duration = Some("1h".into());
        assert_eq!(
            decide(&spec, Some(&status), Some(&applied), ts(200)),
            Step::Hold { until: Some(ts(3700)) }
        );
        // Another permission or target: end the old access, grant the new.
        spec.permission = Permission::Admin;
        assert_eq!(decide(&spec, Some(&status), Some(&applied), ts(200)), Step::Regrant);
        let mut spec2 = self::spec();
        spec2.target.repository = Some("web".into());
        assert_eq!(decide(&spec2, Some(&status), Some(&applied), ts(200)), Step::Regrant);
        // Past expiry, expiry wins over a pending change.
        spec.duration = Some("1m".into());
        assert_eq!(decide(&spec, Some(&status), Some(&applied), ts(200)), Step::Expire);
    }

    #[test]
    fn overlapping_grants_restore_the_others_level_then_the_original() {
        use Permission::*;
        let peer = |permission, previous, at| Peer {
            permission,
            previous,
            granted_at: ts(at),
        };
        // read before; A (write, t=10) then B (admin, t=20).
        // B records A's previous (read), not the write A put in place.
        assert_eq!(
            previous_to_record(Some(Write), &[peer(Write, Some(Read), 10)]),
            Some(Read)
        );
        assert_eq!(previous_to_record(Some(Write), &[]), Some(Write));
        // Ending B while A holds: write stays.
        assert_eq!(
            restore_level(Some(Read), Some(ts(20)), &[peer(Write, Some(Read), 10)]),
            Some(Write)
        );
        // Ending A while B holds: admin stays (nothing written: admin is current).
        assert_eq!(
            restore_level(Some(Read), Some(ts(10)), &[peer(Admin, Some(Read), 20)]),
            Some(Admin)
        );
        // The last one out restores the original level, or removes it.
        assert_eq!(restore_level(Some(Read), Some(ts(20)), &[]), Some(Read));
        assert_eq!(restore_level(None, Some(ts(20)), &[]), None);
        // The earliest record wins even when a later one saw something else.
        assert_eq!(
            restore_level(Some(Admin), Some(ts(20)), &[peer(Read, None, 10)]),
            Some(Read)
        );
    }

    #[test]
    fn problems_keep_a_held_grant_granted_and_kstatus_only_while_true() {
        let mut status = BitbucketAccessGrantStatus::default();
        mark_problem(
            &mut status,
            Some(1),
            reason::PROVISIONING_DISABLED,
            "off",
            true,
            st::FAILED,
        );
        assert_eq!(status.state.as_deref(), Some(st::FAILED));
        assert!(crate::crd::is_condition_true(&status.conditions, ct::STALLED));
        assert!(find_condition(&status.conditions, ct::RECONCILING).is_none());
        mark_granted(&mut status, Some(1), "ok".into());
        assert!(find_condition(&status.conditions, ct::STALLED).is_none());
        assert!(crate::crd::is_condition_true(&status.conditions, ct::READY));

        let mut held = granted(100, None);
        mark_problem(
            &mut held,
            Some(2),
            reason::CONNECTOR_NOT_READY,
            "wait",
            false,
            st::PENDING,
        );
        assert_eq!(held.state.as_deref(), Some(st::GRANTED));
        assert!(crate::crd::is_condition_true(&held.conditions, ct::RECONCILING));

        mark_expired(&mut held, Some(2), "gone");
        assert_eq!(held.state.as_deref(), Some(st::EXPIRED));
        assert!(crate::crd::is_condition_true(&held.conditions, EXPIRED_CONDITION));
        let ready = find_condition(&held.conditions, ct::READY).unwrap();
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("False", reason::EXPIRED)
        );
        assert!(find_condition(&held.conditions, ct::RECONCILING).is_none());
    }

    fn applied(spec: &BitbucketAccessGrantSpec, id: &str) -> AppliedAccess {
        let mut applied = wanted_access(spec).unwrap();
        applied.principal.id = id.into();
        applied
    }

    #[test]
    fn applied_access_lives_in_status_and_names_the_resolved_principal() {
        let applied = applied(&spec(), "{u}");
        let status = BitbucketAccessGrantStatus {
            applied: Some(applied.clone()),
            ..granted(100, None)
        };
        let json = serde_json::to_value(&status).unwrap();
        assert_eq!(
            json["applied"],
            serde_json::json!({
                "connector": "c",
                "principal": {"kind": "user", "id": "{u}", "requested": "jdoe"},
                "workspace": "acme",
                "target": {"kind": "repository", "key": "api"},
                "permission": "write",
            })
        );
        let back: BitbucketAccessGrantStatus = serde_json::from_value(json).unwrap();
        assert_eq!(back.applied.as_ref(), Some(&applied));
        // The revoke names the principal by the resolved id.
        let request = access_request(&applied);
        assert_eq!(request.principal, PrincipalRef::User("{u}".into()));
        assert_eq!(request.target, TargetRef::Repository("api".into()));
        assert_eq!(request.permission, Permission::Write);
        // Resolving the principal is not a spec change.
        assert!(same_access(&applied, &spec()));
        assert_eq!(
            decide(&spec(), Some(&status), Some(&applied), ts(200)),
            Step::Hold { until: None }
        );
    }

    #[test]
    fn held_access_comes_from_status_never_from_the_annotation() {
        let mut obj = BitbucketAccessGrant::new("g", spec());
        let forged = serde_json::json!({
            "connector": "c",
            "principal": {"user": "victim"},
            "target": {"workspace": "acme", "repository": "secret"},
            "permission": "admin",
        });
        obj.metadata.annotations = Some([("connectors.dev/applied-access".to_owned(), forged.to_string())].into());
        let mut other = spec();
        other.permission = Permission::Read;
        let recorded = applied(&other, "{u}");
        obj.status = Some(BitbucketAccessGrantStatus {
            applied: Some(recorded.clone()),
            ..granted(100, None)
        });
        assert_eq!(held_access(&obj).unwrap(), recorded);

        // Granted by the previous version (annotation only): the current
        // spec, with the user named by status.principalId.
        obj.status = Some(granted(100, None));
        let legacy = held_access(&obj).unwrap();
        assert_eq!(legacy, applied(&spec(), "{u}"));
        assert_eq!(legacy.principal.requested, "jdoe");
        // A group principal is named by its slug.
        let mut group = spec();
        group.principal = crate::crd::grant::Principal {
            user: None,
            group: Some("devs".into()),
        };
        obj.spec = group;
        let legacy = held_access(&obj).unwrap();
        assert_eq!(
            (legacy.principal.kind, legacy.principal.id.as_str()),
            (AppliedPrincipalKind::Group, "devs")
        );
    }
}
