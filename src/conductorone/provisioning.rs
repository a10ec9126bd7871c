//! ConductorOne `grant` / `revoke` tasks mapped onto the existing
//! [`Provisioner`]: the entitlement and principal are looked up in the
//! store (they are ids ConductorOne got from our c1z), turned into an
//! [`AccessRequest`], and executed with the provisioner's idempotence and
//! precision (a grant ensures at least the level; a revoke removes only the
//! level it names).
//!
//! Anything that does not map (an entitlement or principal the store does not
//! know, a principal of another workspace, an entitlement nobody can write:
//! workspace `member`/`owner`, project `repository`) is refused before any
//! request to Bitbucket.

use super::proto::connector as pb;
use crate::model::{self, Permission, ResourceType};
use crate::provision::{
    AccessRequest, GrantMode, GrantOutcome, PrincipalRef, ProvisionError, Provisioner, RevokeOutcome, TargetRef,
};
use crate::store::Store;

/// Why a task could not be carried out, with the gRPC code ConductorOne gets.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TaskRefusal {
    /// The entitlement or principal is not in this connector's data.
    #[error("{0}")]
    NotFound(String),
    /// The request is malformed or cannot be provisioned.
    #[error("{0}")]
    Invalid(String),
    /// The provisioner refused or failed.
    #[error("{0}")]
    Provision(#[from] ProvisionError),
    /// The store could not be read.
    #[error("store: {0}")]
    Store(String),
}

impl TaskRefusal {
    /// The `google.rpc.Code` for FinishTask's status.
    pub fn code(&self) -> tonic::Code {
        match self {
            TaskRefusal::NotFound(_) => tonic::Code::NotFound,
            TaskRefusal::Invalid(_) => tonic::Code::InvalidArgument,
            TaskRefusal::Store(_) => tonic::Code::Internal,
            TaskRefusal::Provision(err) => match err {
                ProvisionError::ProvisioningDisabled
                | ProvisionError::NotWorkspaceMember { .. }
                | ProvisionError::NotProvisionable { .. } => tonic::Code::FailedPrecondition,
                ProvisionError::PrincipalNotFound { .. } | ProvisionError::TargetNotFound { .. } => {
                    tonic::Code::NotFound
                }
                ProvisionError::InvalidPermission { .. } | ProvisionError::InvalidRequest { .. } => {
                    tonic::Code::InvalidArgument
                }
                ProvisionError::Conflict(_) => tonic::Code::Aborted,
                ProvisionError::InvalidCredentials(_) => tonic::Code::Unauthenticated,
                ProvisionError::Forbidden(_) => tonic::Code::PermissionDenied,
                ProvisionError::BitbucketUnavailable(_) => tonic::Code::Unavailable,
                ProvisionError::RateLimited(_) => tonic::Code::ResourceExhausted,
                ProvisionError::Api(_) => tonic::Code::Unknown,
                ProvisionError::LeaseLost => tonic::Code::Unavailable,
                ProvisionError::Aborted { .. } => tonic::Code::Aborted,
            },
        }
    }
}

/// The provisioner's request for an entitlement and a principal of `connector`.
pub fn access_request(
    store: &Store,
    connector: &str,
    entitlement: &pb::Entitlement,
    principal: &pb::Resource,
) -> Result<AccessRequest, TaskRefusal> {
    let store_err = |e: crate::store::StoreError| TaskRefusal::Store(e.to_string());
    let on = entitlement
        .resource
        .as_ref()
        .and_then(|r| r.id.clone())
        .ok_or_else(|| TaskRefusal::Invalid(format!("entitlement {:?} names no resource", entitlement.id)))?;
    let resource_type = ResourceType::parse(&on.resource_type)
        .ok_or_else(|| TaskRefusal::NotFound(format!("unknown resource type {:?}", on.resource_type)))?;
    let slug = entitlement_slug(entitlement, resource_type, &on.resource)?;
    let resource = store
        .resource(connector, &on.resource)
        .map_err(store_err)?
        .filter(|r| r.resource_type == resource_type)
        .ok_or_else(|| {
            TaskRefusal::NotFound(format!(
                "unknown entitlement {}: {resource_type} {} is not in this connector's data",
                model::entitlement_id(resource_type, &on.resource, &slug),
                on.resource
            ))
        })?;
    let permission = Permission::parse(&slug).filter(|_| resource_type.entitlement_slugs().contains(&slug.as_str()));
    let workspace_slug = text(resource.profile.workspace_slug());
    let (target, permission) = match (resource_type, permission) {
        (ResourceType::Workspace, _) => (TargetRef::Workspace, Permission::Member),
        (ResourceType::UserGroup, Some(p)) => (TargetRef::Group(text(resource.profile.slug())), p),
        (ResourceType::Project, Some(p)) => (TargetRef::Project(text(resource.profile.slug())), p),
        (ResourceType::Repository, Some(p)) => (TargetRef::Repository(text(resource.profile.slug())), p),
        _ => {
            return Err(TaskRefusal::Invalid(format!(
                "entitlement {slug:?} of {resource_type} {} cannot be granted or revoked through the Bitbucket API",
                on.resource
            )));
        }
    };
    let principal = principal_ref(store, connector, principal, &resource)?;
    let request = AccessRequest::new(workspace_slug, principal, target, permission);
    request.validate()?;
    Ok(request)
}

/// The slug from the entitlement message, or from its id `<type>:<resource>:<slug>`.
fn entitlement_slug(e: &pb::Entitlement, t: ResourceType, resource: &str) -> Result<String, TaskRefusal> {
    if !e.slug.is_empty() {
        return Ok(e.slug.clone());
    }
    e.id.strip_prefix(&format!("{}:{resource}:", t.as_str()))
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .ok_or_else(|| TaskRefusal::NotFound(format!("unknown entitlement {:?}", e.id)))
}

fn text(value: Option<&str>) -> String {
    value.unwrap_or_default().to_owned()
}

/// A user by UUID (the provisioner checks membership), or a group of the
/// target's workspace by slug; both must be in the store.
fn principal_ref(
    store: &Store,
    connector: &str,
    principal: &pb::Resource,
    target: &model::Resource,
) -> Result<PrincipalRef, TaskRefusal> {
    let id = principal
        .id
        .clone()
        .ok_or_else(|| TaskRefusal::Invalid("the task names no principal".into()))?;
    let unknown = || TaskRefusal::NotFound(format!("unknown principal {}:{}", id.resource_type, id.resource));
    match ResourceType::parse(&id.resource_type) {
        Some(ResourceType::User) => {
            let known = store
                .resource(connector, &id.resource)
                .map_err(|e| TaskRefusal::Store(e.to_string()))?
                .is_some_and(|r| r.resource_type == ResourceType::User);
            let held = !known
                && store
                    .grants_held_by(connector, &id.resource)
                    .map_err(|e| TaskRefusal::Store(e.to_string()))?
                    .iter()
                    .any(|g| g.grant.principal_type == ResourceType::User);
            // A former member who still holds a permission is in the c1z and may be revoked.
            if known || held {
                Ok(PrincipalRef::User(id.resource))
            } else {
                Err(unknown())
            }
        }
        Some(ResourceType::UserGroup) => {
            let group = store
                .resource(connector, &id.resource)
                .map_err(|e| TaskRefusal::Store(e.to_string()))?
                .filter(|r| r.resource_type == ResourceType::UserGroup)
                .ok_or_else(unknown)?;
            let workspace_of_target = match target.resource_type {
                ResourceType::Workspace => Some(target.id.as_str()),
                _ => target.parent_id.as_deref(),
            };
            if group.parent_id.as_deref() != workspace_of_target {
                return Err(TaskRefusal::Invalid(format!(
                    "group {} belongs to another workspace than {}",
                    id.resource, target.id
                )));
            }
            Ok(PrincipalRef::Group(text(group.profile.slug())))
        }
        _ => Err(TaskRefusal::Invalid(format!(
            "a {} cannot be given access in Bitbucket (only users and groups)",
            id.resource_type
        ))),
    }
}

/// Runs a grant task: at least the level, as the CLI's default.
pub async fn grant(provisioner: &Provisioner, request: &AccessRequest) -> Result<GrantOutcome, TaskRefusal> {
    Ok(provisioner.grant(request, GrantMode::AtLeast).await?)
}

/// Runs a revoke task: only the level named.
pub async fn revoke(provisioner: &Provisioner, request: &AccessRequest) -> Result<RevokeOutcome, TaskRefusal> {
    Ok(provisioner.revoke(request).await?)
}
