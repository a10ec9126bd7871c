//! Audit entries of the grant controller: who asked (the annotation
//! `connectors.dev/requested-by`), which grant, what changed from which
//! level to which, and how it ended, appended to the store's audit log
//! ([`crate::store::Store::append_audit`]). An audit write that fails is
//! logged and does not stop a revoke: ending access matters more than its
//! record, and the Event still says what happened.

use std::sync::Arc;

use kube::ResourceExt;

use crate::crd::{AppliedAccess, BitbucketAccessGrant, Permission};
use crate::store::{AuditAction, AuditEntry, Store, StoreError};

/// Who requested a grant (a ValidatingAdmissionPolicy makes it the creator).
pub const REQUESTED_BY: &str = "connectors.dev/requested-by";

/// Outcomes written to the audit log.
pub mod outcome {
    pub const SUCCEEDED: &str = "succeeded";
    pub const UNCHANGED: &str = "unchanged";
    pub const FAILED: &str = "failed";
    pub const DENIED: &str = "denied";
    pub const CHANGED_EXTERNALLY: &str = "changed_externally";
    pub const NOT_WRITTEN: &str = "not_written";
    pub const SKIPPED: &str = "skipped";
}

/// The requester annotation, empty when absent.
pub fn requester(obj: &BitbucketAccessGrant) -> String {
    obj.annotations().get(REQUESTED_BY).cloned().unwrap_or_default()
}

/// An entry about `obj`; `access` (the access as applied or about to be)
/// names the connector, workspace, target and resolved principal, else the
/// spec does.
pub fn entry(
    obj: &BitbucketAccessGrant,
    action: AuditAction,
    outcome: &str,
    access: Option<&AppliedAccess>,
    levels: (Option<Permission>, Option<Permission>),
    message: impl Into<String>,
) -> AuditEntry {
    let namespace = obj.namespace().unwrap_or_default();
    let (connector, workspace, target, principal) = match access {
        Some(a) => (
            a.connector.clone(),
            a.workspace.clone(),
            a.target.display(),
            a.principal.id.clone(),
        ),
        None => (
            obj.spec.connector_ref.name.clone(),
            obj.spec.target.workspace.clone(),
            obj.spec.target.display(),
            obj.spec
                .principal
                .user
                .clone()
                .or_else(|| obj.spec.principal.group.clone())
                .unwrap_or_default(),
        ),
    };
    AuditEntry {
        action: action.as_str().to_owned(),
        outcome: outcome.to_owned(),
        requester: requester(obj),
        grant_namespace: namespace.clone(),
        grant_name: obj.name_any(),
        grant_uid: obj.uid().unwrap_or_default(),
        connector: super::overlap::connector_key(obj, &connector),
        workspace,
        target,
        principal,
        level_before: levels.0.map(|p| p.as_str().to_owned()),
        level_after: levels.1.map(|p| p.as_str().to_owned()),
        message: message.into(),
        ..AuditEntry::default()
    }
}

/// Records that `obj` was refused by policy (`rule`: the rule it broke);
/// nothing was written to Bitbucket. Blocking; call it when a reconcile
/// moves a grant into a denied state (once per transition).
pub fn record_denial(store: &Store, obj: &BitbucketAccessGrant, rule: &str, message: &str) -> Result<(), StoreError> {
    let entry = entry(
        obj,
        AuditAction::Deny,
        outcome::DENIED,
        None,
        (None, None),
        format!("{rule}: {message}"),
    );
    store.append_audit(&entry).map(drop)
}

/// Appends `entry` off the async runtime; a failure is logged.
pub async fn append(store: &Arc<Store>, entry: AuditEntry) {
    let store = Arc::clone(store);
    let what = format!("{} {}/{}", entry.action, entry.grant_namespace, entry.grant_name);
    match tokio::task::spawn_blocking(move || store.append_audit(&entry)).await {
        Ok(Ok(_)) => {}
        Ok(Err(err)) => tracing::error!(error = %err, %what, "could not append to the audit log"),
        Err(err) => tracing::error!(error = %err, %what, "could not append to the audit log"),
    }
}
