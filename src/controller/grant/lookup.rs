//! The connector a grant acts through, and whether it may act: for a new
//! grant ([`for_grant`]) the connector must exist, accept the grant's
//! namespace, have provisioning switched on and the grant must be within
//! its policy ([`super::policy`]); for ending an access ([`for_revoke`])
//! only a connected runtime is needed, whatever the switch and the policy
//! say, and also while the connector is being deleted (its finalizer keeps
//! the runtime alive until its held grants are revoked). So access granted
//! earlier always ends.

use std::sync::Arc;

use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;
use kube::api::Api;

use super::GrantContext;
use super::policy::{self, Switch, Violation};
use super::reconcile::Blocker;
use crate::controller::secret::{SecretRead, read_opted_in};
use crate::crd::{BitbucketAccessGrant, BitbucketConnector};
use crate::provision::{AfterRefresh, Provisioner, StoreInventory};
use crate::settings::not_opted_in_message;

/// Why a new grant cannot be made now.
#[derive(Debug, Clone, PartialEq)]
pub enum Refusal {
    /// The connector cannot act (missing, not ready, switched off): retried.
    Blocked(Blocker),
    /// Outside the connector's policy: the grant is Denied.
    Denied(Violation),
}

/// The connector's provisioner for a new grant of `grant`, or why not.
pub async fn for_grant(
    ctx: &GrantContext,
    grant: &BitbucketAccessGrant,
    grant_namespace: &str,
) -> Result<Result<Provisioner, Refusal>, kube::Error> {
    let connector_namespace = grant.spec.connector_ref.namespace_or(grant_namespace);
    let connector_name = grant.spec.connector_ref.name.as_str();
    let name = format!("BitbucketConnector {connector_namespace}/{connector_name}");
    let api: Api<BitbucketConnector> = Api::namespaced(ctx.scaffold.client.clone(), connector_namespace);
    let cross_namespace = connector_namespace != grant_namespace;
    let Some(connector) = api.get_opt(connector_name).await? else {
        // Across namespaces, "missing" and "not shared with you" read the
        // same: a grant's author learns nothing of other namespaces.
        if cross_namespace {
            return Ok(Err(Refusal::Denied(Violation::NamespaceNotAllowed {
                namespace: grant_namespace.to_owned(),
                connector: format!("{connector_namespace}/{connector_name}"),
            })));
        }
        return Ok(Err(Refusal::Blocked(Blocker::NotFound(format!("{name} not found")))));
    };
    let policy = connector.spec.provisioning.clone().unwrap_or_default();
    if cross_namespace && !policy.grant_namespaces.iter().any(|n| n == grant_namespace) {
        return Ok(Err(Refusal::Denied(Violation::NamespaceNotAllowed {
            namespace: grant_namespace.to_owned(),
            connector: format!("{connector_namespace}/{connector_name}"),
        })));
    }
    if connector.metadata.deletion_timestamp.is_some() {
        return Ok(Err(Refusal::Blocked(Blocker::NotReady(format!(
            "{name} is being deleted"
        )))));
    }
    if connector.spec.suspend {
        return Ok(Err(Refusal::Blocked(Blocker::NotReady(format!("{name} is suspended")))));
    }
    let facts = match read_facts(ctx, &connector, connector_namespace).await? {
        Ok(facts) => facts,
        Err(message) => return Ok(Err(Refusal::Blocked(Blocker::NotReady(message)))),
    };
    if !facts.switch.enabled {
        let message = format!("provisioning is off for {name}: {}", facts.switch.message);
        return Ok(Err(Refusal::Blocked(Blocker::Disabled(message))));
    }
    let created = grant
        .metadata
        .creation_timestamp
        .as_ref()
        .map_or_else(jiff::Timestamp::now, |t| t.0);
    let check = policy::Context {
        grant_namespace,
        connector_namespace,
        connector_name,
        connector_workspaces: &facts.workspaces,
        created,
    };
    if let Err(violation) = policy::check(&policy, &check, &grant.spec) {
        return Ok(Err(Refusal::Denied(violation)));
    }
    Ok(runtime_provisioner(ctx, connector_namespace, connector_name).map_err(Refusal::Blocked))
}

/// The connector's provisioner for ending an access it granted, or why not.
/// Neither the switch nor the policy is consulted, and a connector being
/// deleted still revokes (module docs).
pub async fn for_revoke(
    ctx: &GrantContext,
    connector_namespace: &str,
    connector_name: &str,
) -> Result<Result<Provisioner, Blocker>, kube::Error> {
    let api: Api<BitbucketConnector> = Api::namespaced(ctx.scaffold.client.clone(), connector_namespace);
    let name = format!("BitbucketConnector {connector_namespace}/{connector_name}");
    let Some(connector) = api.get_opt(connector_name).await? else {
        return Ok(Err(Blocker::NotFound(format!("{name} not found"))));
    };
    // Being deleted, even a suspended connector keeps a client for its revokes.
    if connector.spec.suspend && connector.metadata.deletion_timestamp.is_none() {
        return Ok(Err(Blocker::NotReady(format!("{name} is suspended"))));
    }
    Ok(runtime_provisioner(ctx, connector_namespace, connector_name))
}

/// Whether the connector that granted `applied` (for a grant in
/// `grant_namespace`) is being deleted: its held grants are revoked first.
pub async fn connector_deleting(
    ctx: &GrantContext,
    grant_namespace: &str,
    applied: &crate::crd::AppliedAccess,
) -> Result<bool, kube::Error> {
    let namespace = applied.connector_namespace.as_deref().unwrap_or(grant_namespace);
    let api: Api<BitbucketConnector> = Api::namespaced(ctx.scaffold.client.clone(), namespace);
    Ok(api
        .get_opt(&applied.connector)
        .await?
        .is_some_and(|c| c.metadata.deletion_timestamp.is_some()))
}

/// What the grant controller reads from the connector's Secret.
struct Facts {
    switch: Switch,
    /// The connector's workspaces (spec, else Secret); empty: every one.
    workspaces: Vec<String>,
}

/// Reads the connector's Secret (its own namespace, opted in only) with the
/// connector's decoder.
async fn read_facts(
    ctx: &GrantContext,
    connector: &BitbucketConnector,
    namespace: &str,
) -> Result<Result<Facts, String>, kube::Error> {
    let name = &connector.spec.secret_ref.name;
    let secret = match read_opted_in(&ctx.scaffold.client, namespace, name).await? {
        SecretRead::Found(secret) => secret,
        SecretRead::NotFound => return Ok(Err(format!("Secret {namespace}/{name} of the connector not found"))),
        SecretRead::NotOptedIn => return Ok(Err(not_opted_in_message(namespace, name))),
    };
    Ok(facts_from_secret(connector, &secret).map_err(|e| format!("Secret {namespace}/{name}: {e}")))
}

/// The switch and workspaces of a connector and its Secret.
fn facts_from_secret(connector: &BitbucketConnector, secret: &Secret) -> Result<Facts, crate::settings::SettingsError> {
    let (settings, _) = crate::controller::connector::settings_for(connector, secret)?;
    Ok(Facts {
        switch: switch_of(connector, secret)?,
        workspaces: settings.workspaces,
    })
}

/// The provisioning switch of a connector, from its spec and Secret ([`policy::resolve_switch`]).
pub fn switch_of(connector: &BitbucketConnector, secret: &Secret) -> Result<Switch, crate::settings::SettingsError> {
    let keys = connector.spec.secret_keys();
    let from_secret = crate::settings::provisioning_switch(secret, &keys)?;
    let enabled = connector.spec.provisioning.as_ref().and_then(|p| p.enabled);
    Ok(policy::resolve_switch(enabled, from_secret, keys.provisioning()))
}

/// A provisioner on the connector's running client (`namespace/name`).
fn runtime_provisioner(ctx: &GrantContext, namespace: &str, connector: &str) -> Result<Provisioner, Blocker> {
    let name = format!("BitbucketConnector {namespace}/{connector}");
    let key = format!("{namespace}/{connector}");
    let Some(runtime) = ctx.manager.runtime(&key) else {
        return Err(Blocker::NotReady(format!("{name} is not connected yet")));
    };
    match runtime.connection().map(|c| c.result) {
        Some(Ok(_)) => {}
        Some(Err(err)) => return Err(Blocker::NotReady(format!("{name} is not connected: {err}"))),
        None => return Err(Blocker::NotReady(format!("{name} is still checking its credentials"))),
    }
    let client = runtime.engine().client().clone();
    // The narrow callback into the sync loops: sync a type again when a run
    // in flight read Bitbucket before this change.
    let resync = Arc::clone(&runtime);
    let hook = AfterRefresh(Arc::new(move |kind| resync.resync_if_running(kind)));
    let inventory = StoreInventory::new(Arc::clone(ctx.manager.store()), key).after_refresh(hook);
    Ok(Provisioner::new(client, true)
        .with_inventory(Arc::new(inventory))
        .with_fence(ctx.fence.clone()))
}

/// Whether `grant` (in `grant_namespace`) references the connector `namespace/name`.
pub fn references(grant: &BitbucketAccessGrant, namespace: &str, name: &str) -> bool {
    grant.spec.connector_ref.name == name
        && grant
            .namespace()
            .is_some_and(|ns| grant.spec.connector_ref.namespace_or(&ns) == namespace)
}
