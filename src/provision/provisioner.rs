//! The [`Provisioner`]: resolves a request, reads the current level, writes
//! only what must change, and refreshes the store.

use std::collections::HashSet;
use std::sync::Arc;

use futures::TryStreamExt;

mod members;
use members::Members;

use super::fence::{ChangeOperation, Fence, PlannedWrite, WriteGate};
use super::{
    AccessRequest, GrantMode, GrantOutcome, GrantResult, Held, Permission, PrincipalKind, PrincipalRef, ProvisionError,
    ResolvedPrincipal, ResolvedTarget, RevokeOutcome, RevokeResult, StoreRefresh, TargetKind, TargetRef, parse_level,
};
use crate::bitbucket::models::{Group, User, Workspace};
use crate::bitbucket::{
    Client, EndpointClass, Error as ApiError, ErrorKind, Holder, Lane, MembershipChange, PermissionScope,
};
use crate::model::{Grant, ResourceType, SyncKind, group_id, project_id, repository_id};
use crate::store::Store;

/// Grants and revokes access through one Bitbucket client. Cheap to clone.
#[derive(Clone)]
pub struct Provisioner {
    client: Client,
    enabled: bool,
    inventory: Option<Arc<dyn Inventory>>,
    fence: Fence,
}

impl std::fmt::Debug for Provisioner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Provisioner")
            .field("client", &self.client)
            .field("enabled", &self.enabled)
            .field("fenced", &!self.fence.holds())
            .field("inventory", &self.inventory.as_ref().map(|i| i.connector().to_owned()))
            .finish()
    }
}

/// Where a change's effect on the inventory goes: the narrow interface
/// between provisioning and the store (provisioning reads Bitbucket and
/// builds the grants; it never writes the store's tables itself).
pub trait Inventory: Send + Sync {
    /// The connector the data is stored under (for reports).
    fn connector(&self) -> &str;
    /// Replaces one resource's grants in the current snapshot. Blocking
    /// (called on a blocking thread). Messages never carry a secret.
    fn replace_resource_grants(&self, kind: SyncKind, resource_id: &str, grants: &[Grant]) -> Result<(), String>;
    /// The UUID of the one stored user named `needle` (account id, nickname
    /// or email), so that provisioning can look up that member alone
    /// instead of listing every member. Blocking. `None`: unknown or
    /// ambiguous.
    fn find_user(&self, needle: &str) -> Option<String> {
        let _ = needle;
        None
    }
}

/// Called with the resource type whose stored grants a change refreshed.
#[derive(Clone)]
pub struct AfterRefresh(pub Arc<dyn Fn(SyncKind) + Send + Sync>);

impl std::fmt::Debug for AfterRefresh {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AfterRefresh")
    }
}

/// The store as an [`Inventory`], through its public API, with an optional
/// hook after each refresh.
pub struct StoreInventory {
    store: Arc<Store>,
    connector: String,
    after_refresh: Option<AfterRefresh>,
}

impl StoreInventory {
    pub fn new(store: Arc<Store>, connector: impl Into<String>) -> Self {
        StoreInventory {
            store,
            connector: connector.into(),
            after_refresh: None,
        }
    }

    /// Calls `hook` after each refresh. The operator uses it to sync the
    /// type again when a run was already in flight: that run read Bitbucket
    /// before the change and would otherwise replace the refreshed grants
    /// with stale ones until the next interval.
    pub fn after_refresh(mut self, hook: AfterRefresh) -> Self {
        self.after_refresh = Some(hook);
        self
    }
}

impl Inventory for StoreInventory {
    fn connector(&self) -> &str {
        &self.connector
    }

    fn replace_resource_grants(&self, kind: SyncKind, resource_id: &str, grants: &[Grant]) -> Result<(), String> {
        self.store
            .replace_resource_grants(&self.connector, kind, resource_id, grants)
            .map_err(|e| e.to_string())?;
        if let Some(hook) = &self.after_refresh {
            (hook.0)(kind);
        }
        Ok(())
    }

    fn find_user(&self, needle: &str) -> Option<String> {
        crate::access::find_user(&self.store, &self.connector, needle)
            .ok()
            .filter(|user| !user.unknown_principal)
            .map(|user| user.id)
    }
}

/// Why a request is resolved: a grant needs a workspace member; a revoke
/// also accepts a former member named by UUID.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Purpose {
    Grant,
    Revoke,
}

/// A request resolved against Bitbucket, with the listings fetched on the way
/// (reused by the store refresh).
struct Resolved {
    workspace: Workspace,
    principal: ResolvedPrincipal,
    target: ResolvedTarget,
    /// The principal's current explicit level.
    current: Option<Permission>,
    members: Members,
}

impl Provisioner {
    /// `provisioning_enabled`: the connector's setting
    /// ([`crate::settings::ConnectorSettings::provisioning`] or its spec
    /// override). When false, [`Provisioner::grant`] and the revokes refuse
    /// with [`ProvisionError::ProvisioningDisabled`] before any request.
    /// Requests go in the limiter's provisioning lane: ahead of sync, with
    /// the budget's reserve.
    pub fn new(client: Client, provisioning_enabled: bool) -> Self {
        Provisioner {
            client: client.for_lane(Lane::Provisioning),
            enabled: provisioning_enabled,
            inventory: None,
            fence: Fence::unfenced(),
        }
    }

    /// Checks `fence` right before every Bitbucket write: without the lease,
    /// the write fails with [`ProvisionError::LeaseLost`] and is not made.
    pub fn with_fence(mut self, fence: Fence) -> Self {
        self.fence = fence;
        self
    }

    /// Who the writes are made as: the credential's rate-limiter key (a
    /// SHA-256 of the API origin and the whole credential, never logged).
    /// Connectors with equal identities change the same access in the same
    /// Bitbucket, so overlapping grants are computed across them.
    pub fn credential_identity(&self) -> String {
        credential_identity(&self.client)
    }

    /// Hand the changed resource's fresh grants to `inventory` after every change.
    pub fn with_inventory(mut self, inventory: Arc<dyn Inventory>) -> Self {
        self.inventory = Some(inventory);
        self
    }

    /// Shorthand: refresh the changed resource's grants in `store` under
    /// `connector` after every change.
    pub fn with_store(self, store: Arc<Store>, connector: impl Into<String>) -> Self {
        self.with_inventory(Arc::new(StoreInventory::new(store, connector)))
    }

    /// The same provisioner with its requests in `lane` (benchmarks compare
    /// against the sync lane; the operator keeps the provisioning lane).
    pub fn in_lane(mut self, lane: Lane) -> Self {
        self.client = self.client.for_lane(lane);
        self
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    pub fn provisioning_enabled(&self) -> bool {
        self.enabled
    }

    /// Ensures the principal holds the permission (see [`GrantMode`]).
    /// Writes only when the current level does not already satisfy it.
    pub async fn grant(&self, request: &AccessRequest, mode: GrantMode) -> Result<GrantOutcome, ProvisionError> {
        self.grant_gated(request, mode, None).await
    }

    /// [`Provisioner::grant`], calling `gate` with the planned change after
    /// the current level is read and before the write.
    pub async fn grant_with(
        &self,
        request: &AccessRequest,
        mode: GrantMode,
        gate: &dyn WriteGate,
    ) -> Result<GrantOutcome, ProvisionError> {
        self.grant_gated(request, mode, Some(gate)).await
    }

    async fn grant_gated(
        &self,
        request: &AccessRequest,
        mode: GrantMode,
        gate: Option<&dyn WriteGate>,
    ) -> Result<GrantOutcome, ProvisionError> {
        self.check_enabled()?;
        let r = self.resolve(request, Purpose::Grant).await?;
        let wanted = request.permission;
        let previous = r.current;
        let (result, previous, current) = if r.target.kind == TargetKind::Group {
            if previous == Some(Permission::Member) {
                (GrantResult::AlreadyHeld, previous, previous)
            } else {
                self.before_write(gate, &r, ChangeOperation::Grant, Some(Permission::Member))
                    .await?;
                match self
                    .client
                    .add_group_member(&r.workspace.slug, &r.target.key, &r.principal.key)
                    .await
                    .map_err(group_write_error)?
                {
                    MembershipChange::Added => (GrantResult::Granted, None, Some(Permission::Member)),
                    // Added by someone else since we read: already held.
                    MembershipChange::AlreadyMember => (
                        GrantResult::AlreadyHeld,
                        Some(Permission::Member),
                        Some(Permission::Member),
                    ),
                }
            }
        } else {
            match previous {
                Some(held) if held == wanted => (GrantResult::AlreadyHeld, previous, previous),
                Some(held) if mode == GrantMode::AtLeast && held > wanted => {
                    (GrantResult::AlreadySatisfied { held }, previous, previous)
                }
                _ => {
                    self.before_write(gate, &r, ChangeOperation::Grant, Some(wanted))
                        .await?;
                    self.put_level(&r, wanted).await?;
                    (GrantResult::Granted, previous, Some(wanted))
                }
            }
        };
        let store = if result == GrantResult::Granted {
            self.refresh(&r).await
        } else {
            None
        };
        let outcome = GrantOutcome {
            result,
            permission: wanted,
            mode,
            previous,
            current,
            principal: r.principal,
            target: r.target,
            store,
        };
        tracing::info!(
            principal = %outcome.principal,
            target = %outcome.target,
            permission = %wanted,
            changed = outcome.changed(),
            "{}",
            outcome.message()
        );
        Ok(outcome)
    }

    /// Removes exactly the named level: deletes it when it is the level held;
    /// leaves any other level in place ([`RevokeResult::LeftInPlace`]);
    /// nothing held is success without a write.
    pub async fn revoke(&self, request: &AccessRequest) -> Result<RevokeOutcome, ProvisionError> {
        self.check_enabled()?;
        let r = self.resolve(request, Purpose::Revoke).await?;
        let wanted = request.permission;
        let (result, current) = match r.current {
            None => (RevokeResult::NotHeld, None),
            Some(held) if held == wanted => {
                self.before_write(None, &r, ChangeOperation::Revoke, None).await?;
                if self.remove(&r).await? {
                    (RevokeResult::Revoked, None)
                } else {
                    (RevokeResult::NotHeld, None)
                }
            }
            Some(held) => (RevokeResult::LeftInPlace { held }, Some(held)),
        };
        self.finish_revoke(r, wanted, None, result, current).await
    }

    /// Ends a grant of `request.permission` and puts back `previous`, the
    /// level held before the grant (as recorded in
    /// [`GrantOutcome::previous`]): PUT `previous`, or DELETE when it is
    /// `None`, but only while the current level is still the one granted.
    /// A level changed since is left alone
    /// ([`RevokeResult::ChangedExternally`]); a level already equal to
    /// `previous` is not written.
    pub async fn revoke_and_restore(
        &self,
        request: &AccessRequest,
        previous: Option<Permission>,
    ) -> Result<RevokeOutcome, ProvisionError> {
        self.revoke_and_restore_gated(request, previous, None).await
    }

    /// [`Provisioner::revoke_and_restore`], calling `gate` with the planned
    /// change after the current level is read and before the write.
    pub async fn revoke_and_restore_with(
        &self,
        request: &AccessRequest,
        previous: Option<Permission>,
        gate: &dyn WriteGate,
    ) -> Result<RevokeOutcome, ProvisionError> {
        self.revoke_and_restore_gated(request, previous, Some(gate)).await
    }

    async fn revoke_and_restore_gated(
        &self,
        request: &AccessRequest,
        previous: Option<Permission>,
        gate: Option<&dyn WriteGate>,
    ) -> Result<RevokeOutcome, ProvisionError> {
        self.check_enabled()?;
        if let Some(level) = previous {
            AccessRequest {
                permission: level,
                ..request.clone()
            }
            .validate()
            .map_err(|err| match err {
                ProvisionError::InvalidPermission { permission, message } => ProvisionError::InvalidPermission {
                    permission,
                    message: format!("cannot restore it: {message}"),
                },
                other => other,
            })?;
        }
        let r = self.resolve(request, Purpose::Revoke).await?;
        let granted = request.permission;
        let (result, current) = match (r.current, previous) {
            (current, previous) if current == previous => match current {
                None => (RevokeResult::NotHeld, None),
                Some(held) => (RevokeResult::LeftInPlace { held }, Some(held)),
            },
            (Some(held), Some(level)) if held == granted => {
                self.before_write(gate, &r, ChangeOperation::Restore, Some(level))
                    .await?;
                self.put_level(&r, level).await?;
                (RevokeResult::Restored { level }, Some(level))
            }
            (Some(held), None) if held == granted => {
                self.before_write(gate, &r, ChangeOperation::Revoke, None).await?;
                if self.remove(&r).await? {
                    (RevokeResult::Revoked, None)
                } else {
                    (RevokeResult::ChangedExternally { held: None }, None)
                }
            }
            (held, _) => (RevokeResult::ChangedExternally { held }, held),
        };
        self.finish_revoke(r, granted, Some(previous), result, current).await
    }

    /// The principal's current explicit level on the target (reads only;
    /// allowed with provisioning disabled; a former member may be named by
    /// UUID, as for a revoke).
    pub async fn inspect(&self, request: &AccessRequest) -> Result<Held, ProvisionError> {
        let r = self.resolve(request, Purpose::Revoke).await?;
        Ok(Held {
            principal: r.principal,
            target: r.target,
            level: r.current,
        })
    }

    fn check_enabled(&self) -> Result<(), ProvisionError> {
        if self.enabled {
            Ok(())
        } else {
            Err(ProvisionError::ProvisioningDisabled)
        }
    }

    async fn finish_revoke(
        &self,
        r: Resolved,
        permission: Permission,
        restore: Option<Option<Permission>>,
        result: RevokeResult,
        current: Option<Permission>,
    ) -> Result<RevokeOutcome, ProvisionError> {
        let changed = matches!(result, RevokeResult::Revoked | RevokeResult::Restored { .. });
        let store = if changed { self.refresh(&r).await } else { None };
        let outcome = RevokeOutcome {
            result,
            permission,
            restore,
            previous: r.current,
            current,
            principal: r.principal,
            target: r.target,
            store,
        };
        tracing::info!(
            principal = %outcome.principal,
            target = %outcome.target,
            permission = %permission,
            changed = outcome.changed(),
            "{}",
            outcome.message()
        );
        Ok(outcome)
    }

    // ---- resolution ----------------------------------------------------------

    async fn resolve(&self, request: &AccessRequest, purpose: Purpose) -> Result<Resolved, ProvisionError> {
        request.validate()?;
        let workspace = match self.client.workspace(&request.workspace).await {
            Ok(w) if !w.uuid.is_empty() => w,
            Ok(_) => return Err(workspace_not_found(&request.workspace)),
            Err(err) if matches!(err.kind, ErrorKind::NotFound | ErrorKind::Gone) => {
                return Err(workspace_not_found(&request.workspace));
            }
            Err(err) => return Err(err.into()),
        };
        let (target, mut groups) = self.resolve_target(&workspace, &request.target).await?;
        let (principal, members) = match &request.principal {
            PrincipalRef::User(needle) => {
                members::resolve_user(&self.client, self.inventory.as_ref(), &workspace.slug, needle, purpose).await?
            }
            PrincipalRef::Group(slug) => {
                if groups.is_none() {
                    groups = Some(self.client.groups(&workspace.slug).await?);
                }
                let all = groups.as_deref().unwrap_or_default();
                let group = find_group(all, slug).ok_or_else(|| ProvisionError::PrincipalNotFound {
                    principal: format!("group {slug}"),
                    workspace: workspace.slug.clone(),
                })?;
                let principal = ResolvedPrincipal {
                    kind: PrincipalKind::Group,
                    key: group.slug.clone(),
                    id: group_id(&workspace.uuid, &group.slug),
                    name: group.slug.clone(),
                };
                (principal, Members::Unknown)
            }
        };
        let current = self.current_level(&target, &principal, groups.as_deref()).await?;
        Ok(Resolved {
            workspace,
            principal,
            target,
            current,
            members,
        })
    }

    /// The target, with the group listing when it was fetched on the way.
    async fn resolve_target(
        &self,
        workspace: &Workspace,
        target: &TargetRef,
    ) -> Result<(ResolvedTarget, Option<Vec<Group>>), ProvisionError> {
        let ws = workspace.slug.clone();
        let resolved = |kind, key: String, resource_id| ResolvedTarget {
            kind,
            workspace: ws.clone(),
            workspace_uuid: workspace.uuid.clone(),
            key,
            resource_id,
        };
        match target {
            TargetRef::Workspace => Err(ProvisionError::NotProvisionable {
                message: "workspace membership cannot be provisioned".into(),
            }),
            TargetRef::Group(slug) => {
                let all = self.client.groups(&ws).await?;
                let group = find_group(&all, slug).ok_or_else(|| ProvisionError::TargetNotFound {
                    target: format!("group {ws}/{slug}"),
                })?;
                let id = group_id(&workspace.uuid, &group.slug);
                let target = resolved(TargetKind::Group, group.slug.clone(), id);
                Ok((target, Some(all)))
            }
            TargetRef::Project(key) => {
                let project = self.client.project(&ws, key).await.map_err(|err| {
                    not_found_as(err, || ProvisionError::TargetNotFound {
                        target: format!("project {ws}/{key}"),
                    })
                })?;
                let key = if project.key.is_empty() {
                    key.clone()
                } else {
                    project.key
                };
                let id = project_id(&workspace.uuid, &project.uuid, &key);
                Ok((resolved(TargetKind::Project, key, id), None))
            }
            TargetRef::Repository(slug) => {
                let repository = self.client.repository(&ws, slug).await.map_err(|err| {
                    not_found_as(err, || ProvisionError::TargetNotFound {
                        target: format!("repository {ws}/{slug}"),
                    })
                })?;
                let project = repository.project.clone().unwrap_or_default();
                let key = match repository.slug() {
                    "" => slug.clone(),
                    s => s.to_owned(),
                };
                let id = repository_id(&workspace.uuid, &project.uuid, &project.key, &repository.uuid);
                Ok((resolved(TargetKind::Repository, key, id), None))
            }
        }
    }

    /// One read of the principal's explicit level: the permissions-config
    /// entry (404 or `none`: nothing), or membership from the group listing.
    async fn current_level(
        &self,
        target: &ResolvedTarget,
        principal: &ResolvedPrincipal,
        groups: Option<&[Group]>,
    ) -> Result<Option<Permission>, ProvisionError> {
        let Some(scope) = permission_scope(target) else {
            let group = groups.and_then(|all| find_group(all, &target.key));
            let member = group.is_some_and(|g| g.members.iter().any(|m| m.uuid.eq_ignore_ascii_case(&principal.key)));
            return Ok(member.then_some(Permission::Member));
        };
        let level = absent_on_404(self.client.explicit_permission(scope, holder(principal)).await)?.flatten();
        let class = if target.kind == TargetKind::Project {
            EndpointClass::ProjectPermissions
        } else {
            EndpointClass::RepositoryPermissions
        };
        match level {
            None => Ok(None),
            Some(text) => parse_level(&text).map_err(|e| {
                ProvisionError::Api(ApiError {
                    class,
                    kind: ErrorKind::Decode,
                    status: None,
                    message: format!("Bitbucket reported a permission this connector does not know: {e}"),
                    retry_after: None,
                })
            }),
        }
    }

    // ---- writes ----------------------------------------------------------------

    /// Right before a write: the gate (the caller records its intent), then
    /// the fence, so a lease lost while the gate ran still stops the write.
    async fn before_write(
        &self,
        gate: Option<&dyn WriteGate>,
        r: &Resolved,
        operation: ChangeOperation,
        to: Option<Permission>,
    ) -> Result<(), ProvisionError> {
        self.fence.check()?;
        if let Some(gate) = gate {
            let planned = PlannedWrite {
                operation,
                principal: &r.principal,
                target: &r.target,
                from: r.current,
                to,
            };
            gate.before_write(planned).await?;
        }
        self.fence.check()
    }

    /// PUT the explicit level (an upsert).
    async fn put_level(&self, r: &Resolved, level: Permission) -> Result<(), ProvisionError> {
        let scope = permission_scope(&r.target).expect("group membership is not a level");
        self.client
            .set_explicit_permission(scope, holder(&r.principal), level.as_str())
            .await?;
        Ok(())
    }

    /// Removes the explicit level or membership. `false`: it was already gone
    /// (a 404 from the 1.0 member DELETE).
    async fn remove(&self, r: &Resolved) -> Result<bool, ProvisionError> {
        let (ws, key, who) = (
            r.target.workspace.as_str(),
            r.target.key.as_str(),
            r.principal.key.as_str(),
        );
        let result = match permission_scope(&r.target) {
            None => self.client.remove_group_member(ws, key, who).await,
            Some(scope) => {
                self.client
                    .delete_explicit_permission(scope, holder(&r.principal))
                    .await
            }
        };
        match result {
            Ok(()) => Ok(true),
            Err(err) if err.kind == ErrorKind::NotFound => Ok(false),
            Err(err) if r.target.kind == TargetKind::Group => Err(group_write_error(err)),
            Err(err) => Err(err.into()),
        }
    }

    // ---- store refresh -----------------------------------------------------------

    async fn refresh(&self, r: &Resolved) -> Option<StoreRefresh> {
        let inventory = self.inventory.as_ref()?;
        let connector = inventory.connector().to_owned();
        let skipped = |reason: String| {
            tracing::warn!(connector = %connector, resource = %r.target.resource_id, %reason, "store not refreshed");
            Some(StoreRefresh::Skipped {
                connector: connector.clone(),
                reason,
            })
        };
        let (kind, grants) = match self.fresh_grants(r).await {
            Ok(fresh) => fresh,
            Err(err) => return skipped(format!("re-reading {} failed: {err}", r.target)),
        };
        let count = grants.len();
        let resource_id = r.target.resource_id.clone();
        let task = {
            let inventory = Arc::clone(inventory);
            tokio::task::spawn_blocking(move || inventory.replace_resource_grants(kind, &resource_id, &grants))
        };
        match task.await {
            Ok(Ok(())) => Some(StoreRefresh::Refreshed {
                connector: connector.clone(),
                grants: count,
            }),
            Ok(Err(err)) => skipped(err),
            Err(err) => skipped(format!("store task failed: {err}")),
        }
    }

    /// The resource's grants read afresh, built by the syncers' code.
    async fn fresh_grants(&self, r: &Resolved) -> Result<(SyncKind, Vec<Grant>), ApiError> {
        let ws = &r.workspace;
        let key = r.target.key.as_str();
        if r.target.kind == TargetKind::Group {
            let groups = self.client.groups(&ws.slug).await?;
            let grants = find_group(&groups, key)
                .map(|g| crate::sync::group_member_grants(ws, g))
                .unwrap_or_default();
            return Ok((SyncKind::Groups, grants));
        }
        let (kind, resource_type) = if r.target.kind == TargetKind::Project {
            (SyncKind::Projects, ResourceType::Project)
        } else {
            (SyncKind::Repositories, ResourceType::Repository)
        };
        let scope = permission_scope(&r.target).expect("only projects and repositories hold levels");
        let users = self.client.explicit_user_permissions(scope).try_concat();
        let groups = self.client.explicit_group_permissions(scope).try_concat();
        let (users, groups) = futures::try_join!(users, groups)?;
        let holders: Vec<String> = users.iter().map(|p| p.user.uuid.clone()).collect();
        let members: HashSet<String> = r.members.among(&self.client, &ws.slug, &holders).await?;
        let grants =
            crate::sync::permission_grants(resource_type, &r.target.resource_id, ws, &members, &users, &groups);
        Ok((kind, grants))
    }
}

/// The identity a client writes as (see [`Provisioner::credential_identity`]).
pub fn credential_identity(client: &Client) -> String {
    let origin = client.config().api_url.origin().ascii_serialization();
    client.credentials().limiter_key(&origin)
}

/// Where the target's explicit levels live; `None` for group membership.
fn permission_scope(target: &ResolvedTarget) -> Option<PermissionScope<'_>> {
    let (workspace, key) = (target.workspace.as_str(), target.key.as_str());
    match target.kind {
        TargetKind::Project => Some(PermissionScope::Project { workspace, key }),
        TargetKind::Repository => Some(PermissionScope::Repository { workspace, slug: key }),
        TargetKind::Group => None,
    }
}

fn holder(principal: &ResolvedPrincipal) -> Holder<'_> {
    match principal.kind {
        PrincipalKind::User => Holder::User(&principal.key),
        PrincipalKind::Group => Holder::Group(&principal.key),
    }
}

/// Workspaces administered at admin.atlassian.com allow only GET on the 1.0
/// groups API (405 on writes): membership there is managed in Atlassian
/// Administration.
fn group_write_error(err: ApiError) -> ProvisionError {
    if err.status == Some(405) {
        ProvisionError::NotProvisionable {
            message: format!(
                "Bitbucket does not allow group membership changes through the 1.0 groups API for this workspace \
                 (workspaces administered at admin.atlassian.com): manage the group in Atlassian Administration \
                 ({})",
                err.message
            ),
        }
    } else {
        err.into()
    }
}

fn workspace_not_found(slug: &str) -> ProvisionError {
    ProvisionError::TargetNotFound {
        target: format!("workspace {slug}"),
    }
}

fn not_found_as(err: ApiError, f: impl FnOnce() -> ProvisionError) -> ProvisionError {
    if err.kind == ErrorKind::NotFound {
        f()
    } else {
        err.into()
    }
}

fn absent_on_404<T>(result: Result<T, ApiError>) -> Result<Option<T>, ProvisionError> {
    match result {
        Ok(value) => Ok(Some(value)),
        Err(err) if err.kind == ErrorKind::NotFound => Ok(None),
        Err(err) => Err(err.into()),
    }
}

fn find_group<'a>(groups: &'a [Group], slug: &str) -> Option<&'a Group> {
    let slug = slug.trim();
    groups
        .iter()
        .find(|g| g.slug == slug)
        .or_else(|| groups.iter().find(|g| g.slug.eq_ignore_ascii_case(slug)))
}

/// `{uuid}` for a UUID given with or without braces; `None` for anything else.
fn braced_uuid(text: &str) -> Option<String> {
    let text = text.trim();
    let bare = text.strip_prefix('{').and_then(|t| t.strip_suffix('}')).unwrap_or(text);
    let is_uuid = bare.len() == 36
        && bare.chars().enumerate().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => c == '-',
            _ => c.is_ascii_hexdigit(),
        });
    is_uuid.then(|| format!("{{{}}}", bare.to_ascii_lowercase()))
}

/// A member by UUID (with or without braces), account id, nickname, or
/// email (when the listing shows emails, as it does to admins).
fn find_member<'a>(members: &'a [User], needle: &str) -> Option<&'a User> {
    let needle = needle.trim();
    if needle.is_empty() {
        return None;
    }
    let uuid = braced_uuid(needle).unwrap_or_else(|| needle.to_owned());
    members
        .iter()
        .find(|u| !u.uuid.is_empty() && u.uuid.eq_ignore_ascii_case(&uuid))
        .or_else(|| members.iter().find(|u| u.account_id.as_deref() == Some(needle)))
        .or_else(|| {
            members
                .iter()
                .find(|u| u.nickname.as_deref().is_some_and(|n| n.eq_ignore_ascii_case(needle)))
        })
        .or_else(|| {
            members
                .iter()
                .find(|u| u.email.as_deref().is_some_and(|e| e.eq_ignore_ascii_case(needle)))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_match_by_uuid_account_id_nickname_or_email() {
        let users = vec![User {
            uuid: "{0a1b2c3d-0000-4000-8000-000000000001}".into(),
            account_id: Some("557058:abc".into()),
            nickname: Some("JDoe".into()),
            email: Some("jdoe@example.com".into()),
            ..User::default()
        }];
        for needle in [
            "JDoe@Example.com",
            "{0a1b2c3d-0000-4000-8000-000000000001}",
            "0a1b2c3d-0000-4000-8000-000000000001",
            "557058:abc",
            "jdoe",
        ] {
            assert!(find_member(&users, needle).is_some(), "{needle}");
        }
        assert!(find_member(&users, "someone").is_none());
        assert_eq!(
            braced_uuid("0A1B2C3D-0000-4000-8000-000000000001").as_deref(),
            Some("{0a1b2c3d-0000-4000-8000-000000000001}")
        );
        assert_eq!(braced_uuid("557058:abc"), None);
        assert_eq!(braced_uuid("jdoe"), None);
        assert!(find_member(&users, "").is_none());
    }
}
