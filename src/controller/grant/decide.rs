//! The grant controller's pure decisions: what a reconcile must do
//! ([`decide`]), when a grant expires ([`expiry`]), which level to put back
//! when one of overlapping grants ends ([`restore_level`]) and which to
//! record when one starts ([`previous_to_record`]), and the conversions
//! between the resource's shapes and the provisioner's: the spec becomes an
//! [`AccessRequest`] ([`request_for`]); a grant records what it applied as
//! [`AppliedAccess`] ([`applied_access`]); ending it revokes exactly that
//! ([`revoke_request`]). No I/O here: every rule is unit-tested.

use jiff::Timestamp;

use crate::crd::{
    AppliedAccess, AppliedPrincipal, AppliedPrincipalKind, AppliedTarget, AppliedTargetKind, BitbucketAccessGrant,
    BitbucketAccessGrantSpec, BitbucketAccessGrantStatus, GrantState, grant::Principal, grant::Target,
};
use crate::provision::{
    AccessRequest, Permission, PrincipalRef, ProvisionError, TargetRef, level_to_restore, parse_level,
};

/// The request a `BitbucketAccessGrant` spec describes: exactly one
/// principal and exactly one of group, project or repository.
pub fn request_for(spec: &BitbucketAccessGrantSpec) -> Result<AccessRequest, ProvisionError> {
    let principal = match &spec.principal {
        Principal {
            user: Some(user),
            group: None,
        } => PrincipalRef::User(user.clone()),
        Principal {
            user: None,
            group: Some(group),
        } => PrincipalRef::Group(group.clone()),
        _ => return Err(invalid("set exactly one of principal.user or principal.group")),
    };
    let target = match &spec.target {
        Target {
            group: Some(g),
            project: None,
            repository: None,
            ..
        } => TargetRef::Group(g.clone()),
        Target {
            group: None,
            project: Some(p),
            repository: None,
            ..
        } => TargetRef::Project(p.clone()),
        Target {
            group: None,
            project: None,
            repository: Some(r),
            ..
        } => TargetRef::Repository(r.clone()),
        _ => {
            return Err(invalid(
                "set exactly one of target.group, target.project or target.repository",
            ));
        }
    };
    Ok(AccessRequest::new(
        spec.target.workspace.clone(),
        principal,
        target,
        spec.permission,
    ))
}

fn invalid(message: &str) -> ProvisionError {
    ProvisionError::InvalidRequest {
        message: message.to_owned(),
    }
}

/// What a grant records in `status.applied`: the access of `request`
/// through `connector` (`spec.connectorRef`'s namespace, if set, and
/// name), its principal named `resolved` as Bitbucket resolved it (user
/// UUID or group slug).
pub fn applied_access(
    connector: (Option<&str>, &str),
    request: &AccessRequest,
    resolved: &str,
) -> Result<AppliedAccess, ProvisionError> {
    let (kind, requested) = match &request.principal {
        PrincipalRef::User(user) => (AppliedPrincipalKind::User, user),
        PrincipalRef::Group(group) => (AppliedPrincipalKind::Group, group),
    };
    let (target_kind, key) = match &request.target {
        TargetRef::Group(g) => (AppliedTargetKind::Group, g),
        TargetRef::Project(p) => (AppliedTargetKind::Project, p),
        TargetRef::Repository(r) => (AppliedTargetKind::Repository, r),
        TargetRef::Workspace => {
            return Err(invalid(
                "set exactly one of target.group, target.project or target.repository",
            ));
        }
    };
    Ok(AppliedAccess {
        connector: connector.1.to_owned(),
        connector_namespace: connector.0.map(str::to_owned),
        principal: AppliedPrincipal {
            kind,
            id: resolved.to_owned(),
            requested: requested.clone(),
        },
        workspace: request.workspace.clone(),
        target: AppliedTarget {
            kind: target_kind,
            key: key.clone(),
        },
        permission: request.permission,
    })
}

/// The request that ends an applied access: the principal named by the id
/// resolved at grant time.
pub fn revoke_request(applied: &AppliedAccess) -> AccessRequest {
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

/// `group/<slug>`, `project/<KEY>` or `repository/<slug>`, as
/// [`AppliedTarget::display`] spells it.
pub fn target_path(target: &TargetRef) -> String {
    match target {
        TargetRef::Workspace => "workspace".to_owned(),
        TargetRef::Group(g) => format!("group/{g}"),
        TargetRef::Project(p) => format!("project/{p}"),
        TargetRef::Repository(r) => format!("repository/{r}"),
    }
}

/// Whether `spec` still asks for the access `applied` (only
/// `duration`/`expiresAt` may differ; resolving the principal is no change).
pub fn same_access(applied: &AppliedAccess, spec: &BitbucketAccessGrantSpec) -> bool {
    request_for(spec)
        .and_then(|request| applied_access(spec_connector(spec), &request, &applied.principal.id))
        .is_ok_and(|wanted| &wanted == applied)
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
    let request = request_for(&obj.spec)?;
    let resolved = match (&request.principal, status.and_then(|s| s.principal_id.as_deref())) {
        (PrincipalRef::User(_), Some(id)) if !id.is_empty() => id.to_owned(),
        (PrincipalRef::User(name) | PrincipalRef::Group(name), _) => name.clone(),
    };
    applied_access(spec_connector(&obj.spec), &request, &resolved)
}

/// `spec.connectorRef` as [`applied_access`] takes it.
fn spec_connector(spec: &BitbucketAccessGrantSpec) -> (Option<&str>, &str) {
    (
        spec.connector_ref.namespace.as_deref(),
        spec.connector_ref.name.as_str(),
    )
}

/// The state of a status, typed (`None`: absent or unknown).
pub fn state_of(status: Option<&BitbucketAccessGrantStatus>) -> Option<GrantState> {
    status.and_then(|s| s.state.as_deref()).and_then(GrantState::parse)
}

/// The grant's access is in place: state Granted with a grant time.
pub fn is_held(status: Option<&BitbucketAccessGrantStatus>) -> bool {
    state_of(status) == Some(GrantState::Granted) && status.is_some_and(|s| s.granted_at.is_some())
}

/// What a reconcile must do, decided from spec, status and the clock alone.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// Not held: grant the spec.
    Grant,
    /// Held, but the spec now names another access. The request is
    /// immutable (CEL on the CRD); an API server that did not enforce it
    /// changes nothing: the held access stays exactly as applied, and ends
    /// at `until` as before.
    KeepDespiteChange { until: Option<Timestamp> },
    /// Held and `now >= expiresAt`: revoke and restore.
    Expire,
    /// `spec.expiresAt` passed before anything was granted: mark Expired, no write.
    ExpireUngranted,
    /// Held and current: nothing to write; look again at `until` (expiry), if any.
    Hold { until: Option<Timestamp> },
    /// Expired, or revoked with its connector: terminal.
    Done,
    /// The spec cannot be interpreted (an unparsable duration).
    Invalid(String),
}

/// When a held grant expires: `spec.expiresAt`, else `grantedAt + duration`,
/// else never, but never later than the expiry recorded in status: an
/// edit can bring the end forward, never push it back or remove it (the
/// CRD refuses such edits; this holds when the API server did not).
/// Before a grant, only an explicit `expiresAt` counts.
pub fn expiry(
    spec: &BitbucketAccessGrantSpec,
    status: Option<&BitbucketAccessGrantStatus>,
) -> Result<Option<Timestamp>, String> {
    match status.and_then(|s| s.granted_at.as_ref()) {
        Some(granted_at) if is_held(status) => {
            let from_spec = spec.expiry(granted_at).map_err(|e| e.to_string())?.map(|t| t.0);
            let recorded = status.and_then(|s| s.expires_at.as_ref()).map(|t| t.0);
            Ok(match (from_spec, recorded) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            })
        }
        _ => Ok(spec.expires_at.as_ref().map(|t| t.0)),
    }
}

/// The decision table (see the module docs of [`super`]).
pub fn decide(
    spec: &BitbucketAccessGrantSpec,
    status: Option<&BitbucketAccessGrantStatus>,
    applied: Option<&AppliedAccess>,
    now: Timestamp,
) -> Step {
    if matches!(state_of(status), Some(GrantState::Expired | GrantState::Revoked)) {
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
        return Step::KeepDespiteChange { until: expires };
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

/// The peer `other` is to a grant of `access` (through the connector in
/// `connector_namespace`) by `principal_id`: live (held, not being
/// deleted), same resolved principal, connector, workspace and target.
/// `None` otherwise.
pub fn as_peer(
    other: &BitbucketAccessGrant,
    connector_namespace: &str,
    access: &AppliedAccess,
    principal_id: &str,
) -> Option<Peer> {
    let status = other.status.as_ref()?;
    if other.metadata.deletion_timestamp.is_some()
        || !is_held(Some(status))
        || status.principal_id.as_deref() != Some(principal_id)
    {
        return None;
    }
    let applied = held_access(other).ok()?;
    let other_namespace = other.metadata.namespace.as_deref().unwrap_or_default();
    if applied.connector != access.connector
        || applied.connector_namespace.as_deref().unwrap_or(other_namespace) != connector_namespace
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

/// `status.previousPermission`, parsed (`None`: nothing, or unreadable).
pub fn parse_previous(status: &BitbucketAccessGrantStatus) -> Option<Permission> {
    status
        .previous_permission
        .as_deref()
        .and_then(|p| parse_level(p).ok().flatten())
}
