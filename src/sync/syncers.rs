//! The five syncers. Each reads only what its resource type needs and returns
//! the resources, their entitlements and the grants on them.

use std::collections::{BTreeMap, HashSet};

use futures::{Stream, TryStreamExt};

use super::SyncScope;
use super::checkpoint::Checkpoints;
use super::progress::KindProgress;
use crate::bitbucket::models::{Group, GroupPermission, Project, Repository, UserPermission, Workspace};
use crate::bitbucket::{Client, Error as ApiError, PermissionScope};
use crate::model::{
    Entitlement, Grant, GroupProfile, PROJECT_PERMISSIONS, Profile, ProjectProfile, REPOSITORY_PERMISSIONS,
    RepositoryProfile, Resource, ResourceType, SyncBatch, UserProfile, WorkspaceProfile, group_id, project_id,
    repository_id,
};

pub(super) struct Context<'a> {
    pub client: &'a Client,
    pub scope: &'a SyncScope,
    pub concurrency: usize,
    pub checkpoints: &'a Checkpoints,
    pub progress: &'a KindProgress,
}

/// The explicit permissions of one project or repository: the unit of work
/// that is checkpointed (`(uuid, permission)` and `(group slug, permission)`).
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
pub(crate) struct Explicit {
    users: Vec<(String, String)>,
    groups: Vec<(String, String)>,
}

impl Explicit {
    pub(crate) fn new(users: &[UserPermission], groups: &[GroupPermission]) -> Self {
        let level = |p: &Option<String>| p.clone().unwrap_or_default();
        Explicit {
            users: users
                .iter()
                .map(|u| (u.user.uuid.clone(), level(&u.permission)))
                .collect(),
            groups: groups
                .iter()
                .map(|g| (g.group.slug.clone(), level(&g.permission)))
                .collect(),
        }
    }
}

/// The explicit permissions on `scope`, from a resumed run's checkpoint or
/// from Bitbucket (then checkpointed).
async fn explicit_permissions(
    ctx: &Context<'_>,
    unit: String,
    scope: PermissionScope<'_>,
) -> Result<Explicit, ApiError> {
    if let Some(found) = ctx.checkpoints.restored::<Explicit>(&unit) {
        ctx.progress.resumed_one();
        return Ok(found);
    }
    let users = ctx.client.explicit_user_permissions(scope);
    let groups = ctx.client.explicit_group_permissions(scope);
    let (users, groups) = futures::try_join!(users.try_concat(), groups.try_concat())?;
    let explicit = Explicit::new(&users, &groups);
    ctx.checkpoints.record(unit, &explicit);
    ctx.progress.done_one();
    Ok(explicit)
}

/// Users: the union of every workspace's members.
pub(super) async fn accounts(ctx: &Context<'_>) -> Result<SyncBatch, ApiError> {
    let listings = futures::future::try_join_all(
        ctx.scope
            .workspaces
            .iter()
            .map(|workspace| ctx.scope.members(ctx.client, workspace)),
    )
    .await?;
    let mut users: BTreeMap<String, Resource> = BTreeMap::new();
    for (workspace, members) in ctx.scope.workspaces.iter().zip(&listings) {
        for user in members.iter() {
            if user.uuid.is_empty() {
                continue;
            }
            let resource = users.entry(user.uuid.clone()).or_insert_with(|| {
                let profile = Profile::User(UserProfile {
                    nickname: user.nickname.clone(),
                    account_id: user.account_id.clone(),
                    status: user.account_status.clone().unwrap_or_else(|| "active".into()),
                    email: user.email.clone(),
                    workspaces: Vec::new(),
                });
                Resource {
                    resource_type: ResourceType::User,
                    id: user.uuid.clone(),
                    display_name: user
                        .display_name
                        .clone()
                        .or_else(|| user.nickname.clone())
                        .unwrap_or_else(|| user.uuid.clone()),
                    parent_id: None,
                    profile,
                }
            });
            if let Profile::User(profile) = &mut resource.profile {
                profile.workspaces.push(workspace.uuid.clone());
            }
        }
    }
    Ok(SyncBatch {
        resources: users.into_values().collect(),
        ..SyncBatch::default()
    })
}

/// Workspaces with `member` and `owner` grants.
pub(super) async fn workspaces(ctx: &Context<'_>) -> Result<SyncBatch, ApiError> {
    per_workspace(ctx, workspace_grants).await
}

async fn workspace_grants(ctx: &Context<'_>, workspace: &Workspace) -> Result<SyncBatch, ApiError> {
    let mut batch = SyncBatch::default();
    let name = workspace.name.clone().unwrap_or_else(|| workspace.slug.clone());
    batch.resources.push(Resource {
        resource_type: ResourceType::Workspace,
        id: workspace.uuid.clone(),
        display_name: name.clone(),
        parent_id: None,
        profile: Profile::Workspace(WorkspaceProfile {
            slug: workspace.slug.clone(),
            name: name.clone(),
        }),
    });
    let member = Entitlement::new(
        ResourceType::Workspace,
        &workspace.uuid,
        "member",
        format!("{name} member"),
    );
    let owner = Entitlement::new(
        ResourceType::Workspace,
        &workspace.uuid,
        "owner",
        format!("{name} owner"),
    );
    let (members, owners) = futures::try_join!(
        ctx.scope.members(ctx.client, workspace),
        ctx.client.workspace_permissions(&workspace.slug, true).try_concat(),
    )?;
    let member_ids: HashSet<&str> = members.iter().map(|u| u.uuid.as_str()).collect();
    for user in members.iter().filter(|u| !u.uuid.is_empty()) {
        batch.grants.push(Grant::new(&member, ResourceType::User, &user.uuid));
    }
    for owner_entry in owners {
        // The filter is server-side; check again in case it was ignored.
        if owner_entry.permission.as_deref().is_some_and(|p| p != "owner") || owner_entry.user.uuid.is_empty() {
            continue;
        }
        let mut grant = Grant::new(&owner, ResourceType::User, &owner_entry.user.uuid);
        grant.unknown_principal = !member_ids.contains(owner_entry.user.uuid.as_str());
        batch.grants.push(grant);
    }
    batch.entitlements.push(member);
    batch.entitlements.push(owner);
    Ok(batch)
}

/// Groups with their members, one 1.0 call per workspace.
pub(super) async fn groups(ctx: &Context<'_>) -> Result<SyncBatch, ApiError> {
    per_workspace(ctx, workspace_groups).await
}

async fn workspace_groups(ctx: &Context<'_>, workspace: &Workspace) -> Result<SyncBatch, ApiError> {
    let mut batch = SyncBatch::default();
    for group in ctx.client.groups(&workspace.slug).await? {
        if group.slug.is_empty() {
            continue;
        }
        let id = group_id(&workspace.uuid, &group.slug);
        let name = group.name.clone().unwrap_or_else(|| group.slug.clone());
        batch.resources.push(Resource {
            resource_type: ResourceType::UserGroup,
            id: id.clone(),
            display_name: name.clone(),
            parent_id: Some(workspace.uuid.clone()),
            profile: Profile::Group(GroupProfile {
                slug: group.slug.clone(),
                name: name.clone(),
                workspace_slug: workspace.slug.clone(),
            }),
        });
        let member = Entitlement::new(ResourceType::UserGroup, &id, "member", format!("{name} member"));
        batch.grants.extend(group_member_grants(workspace, &group));
        batch.entitlements.push(member);
    }
    Ok(batch)
}

/// Projects with explicit user and group permissions.
pub(super) async fn projects(ctx: &Context<'_>) -> Result<SyncBatch, ApiError> {
    per_workspace(ctx, workspace_projects).await
}

async fn workspace_projects(ctx: &Context<'_>, workspace: &Workspace) -> Result<SyncBatch, ApiError> {
    let mut batch = SyncBatch::default();
    // Permission listings start as soon as the first listing page is in.
    let fetched = flatten_pages(ctx, ctx.client.projects(&workspace.slug))
        .map_ok(|project| async move {
            let scope = PermissionScope::Project {
                workspace: &workspace.slug,
                key: &project.key,
            };
            let unit = format!("{}/project/{}/{}", workspace.uuid, project.uuid, project.key);
            let explicit = explicit_permissions(ctx, unit, scope).await?;
            Ok::<_, ApiError>((project, explicit))
        })
        .try_buffer_unordered(ctx.concurrency)
        .try_collect::<Vec<(Project, Explicit)>>();
    let (members, fetched) = futures::try_join!(ctx.scope.member_ids(ctx.client, workspace), fetched)?;
    for (project, explicit) in fetched {
        if project.uuid.is_empty() || project.key.is_empty() {
            continue;
        }
        let id = project_id(&workspace.uuid, &project.uuid, &project.key);
        let name = project.name.clone().unwrap_or_else(|| project.key.clone());
        batch.resources.push(Resource {
            resource_type: ResourceType::Project,
            id: id.clone(),
            display_name: name.clone(),
            parent_id: Some(workspace.uuid.clone()),
            profile: Profile::Project(ProjectProfile {
                key: project.key.clone(),
                name: name.clone(),
                uuid: project.uuid.clone(),
                workspace_slug: workspace.slug.clone(),
            }),
        });
        let entitlements = permission_entitlements(ResourceType::Project, &id, &name, &PROJECT_PERMISSIONS);
        add_permission_grants(&mut batch, &entitlements, workspace, &members, &explicit);
        batch.entitlements.extend(entitlements.into_values());
    }
    Ok(batch)
}

/// Repositories (listed once per workspace, each with its project) with
/// explicit user and group permissions.
pub(super) async fn repositories(ctx: &Context<'_>) -> Result<SyncBatch, ApiError> {
    per_workspace(ctx, workspace_repositories).await
}

async fn workspace_repositories(ctx: &Context<'_>, workspace: &Workspace) -> Result<SyncBatch, ApiError> {
    let mut batch = SyncBatch::default();
    // Permission listings start as soon as the first listing page is in.
    let fetched = flatten_pages(ctx, ctx.client.repositories(&workspace.slug))
        .map_ok(|repository| async move {
            let slug = repository.slug().to_owned();
            let scope = PermissionScope::Repository {
                workspace: &workspace.slug,
                slug: &slug,
            };
            let unit = format!("{}/repository/{}", workspace.uuid, repository.uuid);
            let explicit = explicit_permissions(ctx, unit, scope).await?;
            Ok::<_, ApiError>((repository, explicit))
        })
        .try_buffer_unordered(ctx.concurrency)
        .try_collect::<Vec<(Repository, Explicit)>>();
    let (members, fetched) = futures::try_join!(ctx.scope.member_ids(ctx.client, workspace), fetched)?;
    for (repository, explicit) in fetched {
        if repository.uuid.is_empty() {
            continue;
        }
        // Every Bitbucket Cloud repository belongs to a project; keep one
        // without (should the API ever omit it) under an empty project.
        let project = repository.project.clone().unwrap_or_default();
        let project_resource = project_id(&workspace.uuid, &project.uuid, &project.key);
        let id = repository_id(&workspace.uuid, &project.uuid, &project.key, &repository.uuid);
        let slug = repository.slug().to_owned();
        let full_name = if repository.full_name.is_empty() {
            format!("{}/{slug}", workspace.slug)
        } else {
            repository.full_name.clone()
        };
        let name = repository.name.clone().unwrap_or_else(|| slug.clone());
        batch.resources.push(Resource {
            resource_type: ResourceType::Repository,
            id: id.clone(),
            display_name: full_name.clone(),
            parent_id: Some(workspace.uuid.clone()),
            profile: Profile::Repository(RepositoryProfile {
                slug,
                full_name: full_name.clone(),
                name,
                uuid: repository.uuid.clone(),
                project_id: project_resource,
                project_key: project.key.clone(),
                workspace_slug: workspace.slug.clone(),
            }),
        });
        let entitlements = permission_entitlements(ResourceType::Repository, &id, &full_name, &REPOSITORY_PERMISSIONS);
        add_permission_grants(&mut batch, &entitlements, workspace, &members, &explicit);
        batch.entitlements.extend(entitlements.into_values());
    }
    Ok(batch)
}

/// Runs `sync` for every workspace of the scope at once (the shared limiter
/// bounds the requests) and merges the batches in workspace order.
async fn per_workspace<'a, F, Fut>(ctx: &'a Context<'a>, sync: F) -> Result<SyncBatch, ApiError>
where
    F: Fn(&'a Context<'a>, &'a Workspace) -> Fut,
    Fut: Future<Output = Result<SyncBatch, ApiError>>,
{
    ctx.progress.add_total(ctx.scope.workspaces.len() as u64);
    let batches = futures::future::try_join_all(ctx.scope.workspaces.iter().map(|workspace| {
        let work = sync(ctx, workspace);
        async move {
            let batch = work.await?;
            ctx.progress.done_one();
            Ok::<_, ApiError>(batch)
        }
    }))
    .await?;
    let mut merged = SyncBatch::default();
    for batch in batches {
        merged.resources.extend(batch.resources);
        merged.entitlements.extend(batch.entitlements);
        merged.grants.extend(batch.grants);
    }
    Ok(merged)
}

/// A paginated listing as a stream of items; each page's items count as
/// units of work still to do.
fn flatten_pages<'a, T: 'a>(
    ctx: &'a Context<'a>,
    pages: impl Stream<Item = Result<Vec<T>, ApiError>> + 'a,
) -> impl Stream<Item = Result<T, ApiError>> + 'a {
    pages
        .map_ok(move |page| {
            ctx.progress.add_total(page.len() as u64);
            futures::stream::iter(page.into_iter().map(Ok))
        })
        .try_flatten()
}

fn permission_entitlements(
    resource_type: ResourceType,
    id: &str,
    name: &str,
    levels: &[&'static str],
) -> BTreeMap<&'static str, Entitlement> {
    levels
        .iter()
        .map(|&level| {
            (
                level,
                Entitlement::new(resource_type, id, level, format!("{name} {level}")),
            )
        })
        .collect()
}

/// Turns permissions-config entries into grants. `none` and values this
/// resource type does not have are no grant.
fn add_permission_grants(
    batch: &mut SyncBatch,
    entitlements: &BTreeMap<&'static str, Entitlement>,
    workspace: &Workspace,
    members: &HashSet<String>,
    explicit: &Explicit,
) {
    for (uuid, level) in &explicit.users {
        let Some(entitlement) = entitlements.get(level.as_str()) else {
            continue;
        };
        if uuid.is_empty() {
            continue;
        }
        let mut grant = Grant::new(entitlement, ResourceType::User, uuid);
        grant.unknown_principal = !members.contains(uuid);
        batch.grants.push(grant);
    }
    for (slug, level) in &explicit.groups {
        let Some(entitlement) = entitlements.get(level.as_str()) else {
            continue;
        };
        if slug.is_empty() {
            continue;
        }
        let principal = group_id(&workspace.uuid, slug);
        batch
            .grants
            .push(Grant::new(entitlement, ResourceType::UserGroup, &principal));
    }
}

/// The `member` grants of one 1.0 group, exactly as the groups syncer builds
/// them (provisioning refreshes one group with this).
pub(crate) fn group_member_grants(workspace: &Workspace, group: &Group) -> Vec<Grant> {
    let id = group_id(&workspace.uuid, &group.slug);
    let member = Entitlement::new(ResourceType::UserGroup, &id, "member", String::new());
    group
        .members
        .iter()
        .filter(|m| !m.uuid.is_empty())
        .map(|user| Grant::new(&member, ResourceType::User, &user.uuid))
        .collect()
}

/// The grants on one project or repository from its permissions-config
/// listings, exactly as the projects and repositories syncers build them
/// (provisioning refreshes one resource with this). `members`: the
/// workspace's member UUIDs, to flag grants to non-members.
pub(crate) fn permission_grants(
    resource_type: ResourceType,
    resource_id: &str,
    workspace: &Workspace,
    members: &HashSet<String>,
    users: &[UserPermission],
    groups: &[GroupPermission],
) -> Vec<Grant> {
    let levels: &[&'static str] = match resource_type {
        ResourceType::Project => &PROJECT_PERMISSIONS,
        _ => &REPOSITORY_PERMISSIONS,
    };
    let entitlements = permission_entitlements(resource_type, resource_id, "", levels);
    let mut batch = SyncBatch::default();
    add_permission_grants(
        &mut batch,
        &entitlements,
        workspace,
        members,
        &Explicit::new(users, groups),
    );
    batch.grants
}
