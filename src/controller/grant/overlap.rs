//! Overlapping grants across connectors. Two connectors that present the
//! same credential to the same Bitbucket change the same access, so the
//! level to leave when one grant ends (and the level to record when one
//! starts) is computed over the live grants of *every* such connector, per
//! workspace, target and principal — not only the grant's own connector.
//! The credential identity is the rate limiter's key
//! ([`crate::provision::credential_identity`]), never logged.

use kube::ResourceExt;
use kube::api::ListParams;

use super::GrantContext;
use super::decide::{self, Peer};
use crate::crd::{AppliedAccess, BitbucketAccessGrant};

/// `namespace/name` of the connector a grant's access goes through: its
/// `connectorRef.namespace` (immutable), else the grant's own namespace.
pub(super) fn connector_key(grant: &BitbucketAccessGrant, connector: &str) -> String {
    let own = grant.namespace().unwrap_or_default();
    format!("{}/{connector}", grant.spec.connector_ref.namespace_or(&own))
}

/// The credential identity of a connector's runtime (`None`: not running).
fn identity_of(ctx: &GrantContext, key: &str) -> Option<String> {
    let runtime = ctx.manager.runtime(key)?;
    Some(crate::provision::credential_identity(runtime.engine().client()))
}

/// The other live grants of the same principal (resolved id), workspace and
/// target, through any connector on credential `identity` (or through the
/// same connector, whatever its state).
pub(super) async fn peers(
    ctx: &GrantContext,
    own: &BitbucketAccessGrant,
    access: &AppliedAccess,
    principal_id: &str,
    identity: &str,
) -> Result<Vec<Peer>, kube::Error> {
    let own_connector = connector_key(own, &access.connector);
    let mut peers = Vec::new();
    for api in ctx.grant_apis() {
        for other in api.list(&ListParams::default()).await?.items {
            if other.namespace() == own.namespace() && other.name_any() == own.name_any() {
                continue;
            }
            let Some(peer) = as_peer(ctx, &other, access, principal_id, &own_connector, identity) else {
                continue;
            };
            peers.push(peer);
        }
    }
    Ok(peers)
}

fn as_peer(
    ctx: &GrantContext,
    other: &BitbucketAccessGrant,
    access: &AppliedAccess,
    principal_id: &str,
    own_connector: &str,
    identity: &str,
) -> Option<Peer> {
    let status = other.status.as_ref()?;
    if other.metadata.deletion_timestamp.is_some()
        || !decide::is_held(Some(status))
        || status.principal_id.as_deref() != Some(principal_id)
    {
        return None;
    }
    let applied = decide::held_access(other).ok()?;
    if applied.workspace != access.workspace || applied.target != access.target {
        return None;
    }
    let connector = connector_key(other, &applied.connector);
    if connector != own_connector && identity_of(ctx, &connector).as_deref() != Some(identity) {
        return None;
    }
    Some(Peer {
        permission: applied.permission,
        previous: decide::parse_previous(status),
        granted_at: status.granted_at.as_ref()?.0,
    })
}
