//! Deleting a connector that still holds access: its held grants are
//! revoked first. The connector's finalizer is not released while any
//! grant of a watched namespace still holds access it granted (matched by
//! `status.applied`, so a namespace dropped from `grantNamespaces` since
//! still counts); meanwhile the
//! connector reports `Ready=False`, reason `RevokingGrants`, with their
//! count and names, and its Bitbucket client stays alive (sync loops and
//! the ConductorOne session stop) so that the grant controller can revoke
//! through it. Each such grant ends as `Revoked` (terminal).
//!
//! A grant whose revoke cannot succeed (credentials rejected for good)
//! keeps the connector waiting, and the condition says so; deleting that
//! grant lets it go with a `RevokeSkipped` Event (the grant's own rule),
//! after which the connector is released.

use std::sync::Arc;
use std::time::Duration;

use kube::ResourceExt;
use kube::api::{Api, ListParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::runtime::reflector::ObjectRef;

use super::connector::{Context, ReconcileError, SecretOutcome, engine_settings, read_settings};
use super::grant::{held_access, is_held};
use super::loops::runtime_key;
use crate::bitbucket::DEFAULT_API_URL;
use crate::crd::{
    BitbucketAccessGrant, BitbucketConnector, CONNECTOR_FINALIZER, ConditionStatus, EventReason, Reason,
    condition_type as ct, find_condition, new_condition, set_condition,
};

/// How often a held deletion looks at its grants again.
const RECHECK: Duration = Duration::from_secs(2);

/// While the connector is being deleted and grants it made still hold
/// access: keeps its client, reports why on status, and asks to be looked
/// at again (`Some`). `None`: nothing holds, the finalizer may run.
pub(super) async fn hold_for_grants(
    obj: &Arc<BitbucketConnector>,
    ctx: &Context,
    namespace: &str,
) -> Result<Option<Action>, ReconcileError> {
    if obj.metadata.deletion_timestamp.is_none() || !obj.finalizers().iter().any(|f| f == CONNECTOR_FINALIZER) {
        return Ok(None);
    }
    let holding = held_grants(ctx, namespace, &obj.name_any()).await?;
    if holding.is_empty() {
        return Ok(None);
    }
    let client_note = keep_client(obj, ctx, namespace).await?;
    let message = format!(
        "deletion waits until {} grant(s) made through this connector are revoked: {}{client_note}",
        holding.len(),
        holding.join(", ")
    );
    report(obj, ctx, &message).await?;
    Ok(Some(Action::requeue(RECHECK)))
}

/// `namespace/name` of every grant whose held access came from this connector.
async fn held_grants(ctx: &Context, namespace: &str, name: &str) -> Result<Vec<String>, ReconcileError> {
    let client = &ctx.scaffold.client;
    let apis: Vec<Api<BitbucketAccessGrant>> = if ctx.watched.is_empty() {
        vec![Api::all(client.clone())]
    } else {
        ctx.watched
            .iter()
            .map(|ns| Api::namespaced(client.clone(), ns))
            .collect()
    };
    let mut found = Vec::new();
    for api in apis {
        for grant in api.list(&ListParams::default()).await?.items {
            let grant_namespace = grant.namespace().unwrap_or_default();
            if !is_held(grant.status.as_ref()) {
                continue;
            }
            let Ok(applied) = held_access(&grant) else { continue };
            let from = applied.connector_namespace.as_deref().unwrap_or(&grant_namespace);
            if applied.connector == name && from == namespace {
                found.push(format!("{grant_namespace}/{}", grant.name_any()));
            }
        }
    }
    found.sort();
    Ok(found)
}

/// Keeps (or, after a restart, rebuilds) the connector's Bitbucket client
/// for the revokes, without sync loops or a ConductorOne session. Returns
/// a note for the condition when the client cannot be had.
async fn keep_client(obj: &Arc<BitbucketConnector>, ctx: &Context, namespace: &str) -> Result<String, ReconcileError> {
    let key = runtime_key(&ObjectRef::from_obj(obj.as_ref()));
    ctx.manager.sessions().stop(&key).await;
    if let Some(runtime) = ctx.manager.runtime(&key) {
        runtime.stop_loops().await;
        if runtime.connection().is_some_and(|c| c.result.is_ok()) {
            return Ok(String::new());
        }
    }
    let api_url = obj.spec.api_url.clone().unwrap_or_else(|| DEFAULT_API_URL.to_owned());
    if let Err(err) = ctx.manager.egress().check_bitbucket_url(&api_url) {
        return Ok(format!("; they cannot be revoked: spec.apiUrl: {err}"));
    }
    let (settings, values) = match read_settings(obj, ctx, namespace).await? {
        SecretOutcome::Settings(settings, values, _) => (settings, values),
        SecretOutcome::Problem { reason, message } => {
            return Ok(format!("; they cannot be revoked yet ({reason}: {message})"));
        }
    };
    let engine = engine_settings(obj, &settings, api_url);
    match ctx
        .manager
        .configure(ObjectRef::from_obj(obj.as_ref()), &settings, values, engine)
    {
        Ok((runtime, _)) => {
            let connection = runtime.check_connection().await;
            Ok(match connection.result {
                Ok(_) => String::new(),
                Err(err) => format!("; they cannot be revoked yet: {}", runtime.scrub(&err.to_string())),
            })
        }
        Err(err) => Ok(format!("; they cannot be revoked: {err}")),
    }
}

/// `Ready=False`/`RevokingGrants` and `Reconciling=True` on status, and an
/// Event when the wait begins.
async fn report(obj: &BitbucketConnector, ctx: &Context, message: &str) -> Result<(), ReconcileError> {
    let mut status = ctx.scaffold.current_status(obj).unwrap_or_default();
    let generation = obj.metadata.generation;
    let waiting_before =
        find_condition(&status.conditions, ct::READY).is_some_and(|c| c.reason == Reason::RevokingGrants.as_str());
    for type_ in [ct::READY, ct::RECONCILING] {
        let on = ConditionStatus::from(type_ == ct::RECONCILING);
        set_condition(
            &mut status.conditions,
            new_condition(type_, on, Reason::RevokingGrants, message, generation),
        );
    }
    if !waiting_before {
        let event = Event {
            type_: EventType::Normal,
            reason: EventReason::RevokingGrants.as_str().to_owned(),
            note: Some(message.to_owned()),
            action: "Delete".to_owned(),
            secondary: None,
        };
        ctx.scaffold.publish(obj, event).await;
    }
    ctx.scaffold.write_status(obj, &status).await?;
    Ok(())
}
