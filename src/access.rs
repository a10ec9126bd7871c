//! Effective access, derived from the store's current data of one connector.
//!
//! Bitbucket grants permissions explicitly on repositories and projects, to
//! users and to groups; workspace owners administer everything. A user's
//! effective permission on a repository is the highest of:
//!
//! - a grant on the repository to the user (`direct`);
//! - grants on the repository to groups the user is a member of (`group devs`);
//! - a grant on the repository's project to the user (`project KEY`);
//! - grants on the project to the user's groups (`project KEY via group devs`);
//! - owning the repository's workspace (`workspace owner`, always `admin`).
//!
//! A project's `create-repo` counts as `write` on its repositories. Project
//! permissions order `read < write < create-repo < admin`; repository
//! permissions `read < write < admin`. Every path is reported (`via`), so a
//! reviewer sees why a user has access, not only that they have it.
//!
//! Principals the sync could not match to a workspace member (a former member,
//! a deleted account) are kept and flagged `unknown_principal`.

pub mod cli;

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::{Deserialize, Serialize};

use crate::model::{ProfileField, Resource, ResourceType};
use crate::store::{HeldGrant, RepositoryName, Store, StoreError};

pub use crate::model::Permission;

/// One reason a principal holds access.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct AccessPath {
    /// `direct`, `group devs`, `project KEY`, `project KEY via group devs`, `workspace owner`.
    pub via: String,
    pub permission: Permission,
}

/// A user with access to one repository.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessEntry {
    pub user_id: String,
    pub nickname: Option<String>,
    pub display_name: Option<String>,
    pub account_id: Option<String>,
    /// `active` / `inactive`, from the accounts sync.
    pub status: Option<String>,
    /// The effective (highest) permission.
    pub permission: Permission,
    /// Every path, highest permission first.
    pub via: Vec<AccessPath>,
    /// The user is not a known workspace member (see module docs).
    pub unknown_principal: bool,
}

/// Who a user is, as far as the store knows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserRef {
    pub id: String,
    pub nickname: Option<String>,
    pub display_name: Option<String>,
    pub account_id: Option<String>,
    pub status: Option<String>,
    pub unknown_principal: bool,
}

/// A workspace a user belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkspaceAccess {
    pub id: String,
    pub slug: String,
    pub name: String,
    /// `member`, `owner`.
    pub roles: Vec<String>,
}

/// A group a user is a member of.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupAccess {
    pub id: String,
    pub slug: String,
    pub name: String,
    pub workspace: String,
}

/// Effective access to one project or repository.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResourceAccess {
    pub id: String,
    /// `workspace/KEY` for projects, `workspace/slug` for repositories.
    pub name: String,
    pub display_name: String,
    pub permission: Permission,
    pub via: Vec<AccessPath>,
}

/// Everything one user can reach.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserAccess {
    pub user: UserRef,
    pub workspaces: Vec<WorkspaceAccess>,
    pub groups: Vec<GroupAccess>,
    pub projects: Vec<ResourceAccess>,
    pub repositories: Vec<ResourceAccess>,
}

/// Errors of access queries.
#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    #[error("repository {repository:?} not found in connector {connector:?}{hint}")]
    UnknownRepository {
        connector: String,
        repository: String,
        hint: String,
    },
    #[error("user {user:?} not found in connector {connector:?} (give a uuid, account id, nickname or email){hint}")]
    UnknownUser {
        connector: String,
        user: String,
        hint: String,
    },
    #[error("user {user:?} is ambiguous in connector {connector:?}: it matches {matches}")]
    AmbiguousUser {
        connector: String,
        user: String,
        matches: String,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The last `:`-separated part of a group id `{ws}:{slug}`.
fn id_suffix(id: &str) -> &str {
    id.rsplit_once(':').map_or(id, |(_, s)| s)
}

/// A hint for "not found" errors: is the connector empty? which exist?
fn connector_hint(store: &Store, connector: &str, kind: crate::model::SyncKind) -> Result<String, StoreError> {
    if store.current_generation(connector, kind)?.is_some() {
        return Ok(String::new());
    }
    let known = store.connectors()?;
    Ok(if known.is_empty() {
        format!(" (the store holds no synced {kind})")
    } else {
        format!(
            " (connector {connector:?} has no synced {kind}; connectors in the store: {})",
            known.join(", ")
        )
    })
}

/// Finds a repository by full name `workspace/slug` (any case) or by resource id.
pub fn find_repository(store: &Store, connector: &str, repository: &str) -> Result<Resource, AccessError> {
    if let Some(r) = store.resource(connector, repository)?
        && r.resource_type == ResourceType::Repository
    {
        return Ok(r);
    }
    if let Some(r) = store
        .find_resources(connector, ProfileField::RepositoryFullName, repository)?
        .into_iter()
        .next()
    {
        return Ok(r);
    }
    let names: Vec<String> = store
        .resources(connector, Some(ResourceType::Repository))?
        .into_iter()
        .filter_map(|r| r.profile.repository().map(|p| p.full_name.clone()))
        .collect();
    let mut hint = connector_hint(store, connector, crate::model::SyncKind::Repositories)?;
    hint.push_str(&did_you_mean(repository, &names));
    Err(AccessError::UnknownRepository {
        connector: connector.to_owned(),
        repository: repository.to_owned(),
        hint,
    })
}

/// `; did you mean a, b?` for the candidates closest to `wanted` (edit
/// distance at most a third of its length, or containing it), or nothing.
pub fn did_you_mean(wanted: &str, candidates: &[String]) -> String {
    let wanted_lower = wanted.to_lowercase();
    let limit = (wanted.chars().count() / 3).max(1);
    let mut close: Vec<(usize, &String)> = candidates
        .iter()
        .filter_map(|c| {
            let lower = c.to_lowercase();
            let distance = edit_distance(&wanted_lower, &lower);
            let contains = wanted_lower.len() >= 3 && lower.contains(&wanted_lower);
            (distance <= limit || contains).then_some((distance, c))
        })
        .collect();
    close.sort();
    close.dedup_by(|a, b| a.1 == b.1);
    if close.is_empty() {
        return String::new();
    }
    let names: Vec<&str> = close.iter().take(3).map(|(_, c)| c.as_str()).collect();
    format!("; did you mean {}?", names.join(", "))
}

/// Levenshtein distance over characters.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut previous = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let substitution = previous + usize::from(ca != *cb);
            previous = row[j + 1];
            row[j + 1] = substitution.min(row[j] + 1).min(previous + 1);
        }
    }
    row[b.len()]
}

/// Finds a user by uuid (braces optional), account id, nickname or email. A uuid
/// that only appears as a grant principal gives an unknown-principal user.
pub fn find_user(store: &Store, connector: &str, user: &str) -> Result<UserRef, AccessError> {
    let braced = if user.starts_with('{') {
        user.to_owned()
    } else {
        format!("{{{user}}}")
    };
    for id in [user, braced.as_str()] {
        if let Some(r) = store.resource(connector, id)?
            && r.resource_type == ResourceType::User
        {
            return Ok(user_ref(&r));
        }
    }
    for field in [
        ProfileField::UserAccountId,
        ProfileField::UserNickname,
        ProfileField::UserEmail,
    ] {
        let found = store.find_resources(connector, field, user)?;
        match found.len() {
            0 => {}
            1 => return Ok(user_ref(&found[0])),
            _ => {
                return Err(AccessError::AmbiguousUser {
                    connector: connector.to_owned(),
                    user: user.to_owned(),
                    matches: found.iter().map(|r| r.id.as_str()).collect::<Vec<_>>().join(", "),
                });
            }
        }
    }
    for id in [user, braced.as_str()] {
        if store
            .grants_held_by(connector, id)?
            .iter()
            .any(|g| g.grant.principal_type == ResourceType::User)
        {
            return Ok(unknown_user(id));
        }
    }
    let nicknames: Vec<String> = store
        .resources(connector, Some(ResourceType::User))?
        .into_iter()
        .filter_map(|r| r.profile.user().and_then(|p| p.nickname.clone()))
        .collect();
    let mut hint = connector_hint(store, connector, crate::model::SyncKind::Accounts)?;
    hint.push_str(&did_you_mean(user, &nicknames));
    Err(AccessError::UnknownUser {
        connector: connector.to_owned(),
        user: user.to_owned(),
        hint,
    })
}

fn user_ref(r: &Resource) -> UserRef {
    let profile = r.profile.user();
    UserRef {
        id: r.id.clone(),
        nickname: profile.and_then(|p| p.nickname.clone()),
        display_name: Some(r.display_name.clone()),
        account_id: profile.and_then(|p| p.account_id.clone()),
        status: profile.map(|p| p.status.clone()),
        unknown_principal: false,
    }
}

fn unknown_user(id: &str) -> UserRef {
    UserRef {
        id: id.to_owned(),
        nickname: None,
        display_name: None,
        account_id: None,
        status: None,
        unknown_principal: true,
    }
}

/// Paths collected per key (user id or resource id).
#[derive(Default)]
struct Paths {
    // A key has a handful of paths: a list beats a set per key (a workspace
    // owner's answer has thousands of keys).
    by_key: BTreeMap<String, (Vec<AccessPath>, bool)>,
}

impl Paths {
    fn add(&mut self, key: &str, via: String, permission: Permission, unknown: bool) {
        let entry = match self.by_key.get_mut(key) {
            Some(entry) => entry,
            None => self.by_key.entry(key.to_owned()).or_default(),
        };
        let path = AccessPath { via, permission };
        if !entry.0.contains(&path) {
            entry.0.push(path);
        }
        entry.1 |= unknown;
    }
}

/// Sorts paths highest first, then by name; returns the effective permission.
fn rank(mut via: Vec<AccessPath>) -> (Permission, Vec<AccessPath>) {
    via.sort_by(|a, b| b.permission.cmp(&a.permission).then_with(|| a.via.cmp(&b.via)));
    (via[0].permission, via)
}

/// Caches group slugs and group memberships for one query.
struct Groups<'a> {
    store: &'a Store,
    connector: &'a str,
    members: HashMap<String, Vec<(String, bool)>>,
    slugs: HashMap<String, String>,
}

impl<'a> Groups<'a> {
    fn new(store: &'a Store, connector: &'a str) -> Self {
        Groups {
            store,
            connector,
            members: HashMap::new(),
            slugs: HashMap::new(),
        }
    }

    /// `(user id, unknown principal)` of each member.
    fn members(&mut self, group: &str) -> Result<&[(String, bool)], StoreError> {
        if !self.members.contains_key(group) {
            let members = self
                .store
                .grants_on_with_slug(self.connector, group, "member")?
                .into_iter()
                .filter(|g| g.grant.principal_type == ResourceType::User)
                .map(|g| (g.grant.principal_id, g.grant.unknown_principal))
                .collect();
            self.members.insert(group.to_owned(), members);
        }
        Ok(&self.members[group])
    }

    fn slug(&mut self, group: &str) -> Result<String, StoreError> {
        if let Some(s) = self.slugs.get(group) {
            return Ok(s.clone());
        }
        let slug = self
            .store
            .resource(self.connector, group)?
            .and_then(|r| r.profile.group().map(|p| p.slug.clone()))
            .unwrap_or_else(|| id_suffix(group).to_owned());
        self.slugs.insert(group.to_owned(), slug.clone());
        Ok(slug)
    }
}

fn permission_of(g: &HeldGrant) -> Option<Permission> {
    Permission::parse(&g.slug).filter(|p| *p != Permission::Member)
}

/// Every user with access to `repository` (full name `workspace/slug` or
/// repository resource id), highest permission first, then by nickname.
// Long: the four paths to a repository (owner, project, group, direct) in
// one place, so the precedence between them reads top to bottom.
pub fn who_can(store: &Store, connector: &str, repository: &str) -> Result<Vec<AccessEntry>, AccessError> {
    let repo = find_repository(store, connector, repository)?;
    let mut paths = Paths::default();
    let mut groups = Groups::new(store, connector);
    // `prefix` names the project for project grants.
    let mut add_grants = |grants: Vec<HeldGrant>, prefix: Option<&str>| -> Result<(), StoreError> {
        for g in grants {
            let Some(p) = permission_of(&g) else { continue };
            let p = p.on_repository();
            match g.grant.principal_type {
                ResourceType::User => {
                    let via = prefix.map_or_else(|| "direct".to_owned(), str::to_owned);
                    paths.add(&g.grant.principal_id, via, p, g.grant.unknown_principal);
                }
                ResourceType::UserGroup => {
                    let slug = groups.slug(&g.grant.principal_id)?;
                    let via = match prefix {
                        Some(project) => format!("{project} via group {slug}"),
                        None => format!("group {slug}"),
                    };
                    for (user, unknown) in groups.members(&g.grant.principal_id)?.to_vec() {
                        paths.add(&user, via.clone(), p, unknown);
                    }
                }
                _ => {}
            }
        }
        Ok(())
    };
    add_grants(store.grants_on(connector, &repo.id)?, None)?;
    if let Some(profile) = repo.profile.repository().filter(|p| !p.project_id.is_empty()) {
        let key = if profile.project_key.is_empty() {
            id_suffix(&profile.project_id)
        } else {
            &profile.project_key
        };
        add_grants(
            store.grants_on(connector, &profile.project_id)?,
            Some(&format!("project {key}")),
        )?;
    }
    if let Some(ws) = &repo.parent_id {
        for g in store.grants_on_with_slug(connector, ws, "owner")? {
            if g.grant.principal_type == ResourceType::User {
                paths.add(
                    &g.grant.principal_id,
                    "workspace owner".into(),
                    Permission::Admin,
                    g.grant.unknown_principal,
                );
            }
        }
    }
    // The users, in one lookup by id.
    let ids: Vec<&str> = paths.by_key.keys().map(String::as_str).collect();
    let users: HashMap<String, Resource> = store
        .resources_by_ids(connector, &ids)?
        .into_iter()
        .filter(|r| r.resource_type == ResourceType::User)
        .map(|r| (r.id.clone(), r))
        .collect();
    let mut out = Vec::with_capacity(paths.by_key.len());
    for (user_id, (set, unknown)) in paths.by_key {
        let user = match users.get(&user_id) {
            Some(r) => user_ref(r),
            None => unknown_user(&user_id),
        };
        let (permission, via) = rank(set);
        out.push(AccessEntry {
            unknown_principal: unknown || user.unknown_principal,
            user_id,
            nickname: user.nickname,
            display_name: user.display_name,
            account_id: user.account_id,
            status: user.status,
            permission,
            via,
        });
    }
    out.sort_by(|a, b| {
        b.permission
            .cmp(&a.permission)
            .then_with(|| a.nickname.is_none().cmp(&b.nickname.is_none()))
            .then_with(|| a.nickname.cmp(&b.nickname))
            .then_with(|| a.user_id.cmp(&b.user_id))
    });
    Ok(out)
}

/// Everything `user` (uuid, account id or nickname) can reach.
// Long: one pass per path kind (workspace, groups, projects, repositories),
// each reading the previous ones' results; split, they would pass five maps around.
pub fn access_of(store: &Store, connector: &str, user: &str) -> Result<UserAccess, AccessError> {
    let user = find_user(store, connector, user)?;
    let held = store.grants_held_by(connector, &user.id)?;
    let mut groups = Groups::new(store, connector);

    // Workspaces and groups.
    let mut workspaces: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut group_ids = Vec::new();
    for g in held.iter().filter(|g| g.grant.principal_type == ResourceType::User) {
        match g.resource_type {
            ResourceType::Workspace => workspaces
                .entry(g.resource_id.clone())
                .or_default()
                .push(g.slug.clone()),
            ResourceType::UserGroup if g.slug == "member" => group_ids.push(g.resource_id.clone()),
            _ => {}
        }
    }
    let owned: HashSet<String> = workspaces
        .iter()
        .filter(|(_, roles)| roles.iter().any(|r| r == "owner"))
        .map(|(ws, _)| ws.clone())
        .collect();

    // Explicit project and repository grants: the user's, then each group's.
    let mut explicit: Vec<(HeldGrant, Option<String>)> = held.into_iter().map(|g| (g, None)).collect();
    for gid in &group_ids {
        let slug = groups.slug(gid)?;
        for g in store.grants_held_by(connector, gid)? {
            explicit.push((g, Some(slug.clone())));
        }
    }

    // Only the projects and repositories the answer names: those granted
    // explicitly, those of granted projects, those of owned workspaces.
    let owned_ids: Vec<&str> = owned.iter().map(String::as_str).collect();
    let granted = |t: ResourceType| -> Vec<&str> {
        let mut ids: Vec<&str> = explicit
            .iter()
            .filter(|(g, _)| g.resource_type == t && permission_of(g).is_some())
            .map(|(g, _)| g.resource_id.as_str())
            .collect();
        ids.sort_unstable();
        ids.dedup();
        ids
    };
    let (granted_projects, granted_repos) = (granted(ResourceType::Project), granted(ResourceType::Repository));
    let mut projects_all = store.resources_by_ids(connector, &granted_projects)?;
    projects_all.extend(store.resources_in_workspaces(connector, ResourceType::Project, &owned_ids)?);
    let mut repos_all = store.resources_by_ids(connector, &granted_repos)?;
    repos_all.extend(store.repositories_of_projects(connector, &granted_projects)?);
    for all in [&mut projects_all, &mut repos_all] {
        all.sort_by(|a, b| a.id.cmp(&b.id));
        all.dedup_by(|a, b| a.id == b.id);
    }
    let mut repos_by_project: HashMap<&str, Vec<&Resource>> = HashMap::new();
    for r in &repos_all {
        if let Some(p) = r.profile.repository().filter(|p| !p.project_id.is_empty()) {
            repos_by_project.entry(p.project_id.as_str()).or_default().push(r);
        }
    }
    let project_index: HashMap<&str, &Resource> = projects_all.iter().map(|p| (p.id.as_str(), p)).collect();
    let repo_index: HashMap<&str, &Resource> = repos_all.iter().map(|r| (r.id.as_str(), r)).collect();
    let key_of = |project_id: &str| -> String {
        project_index
            .get(project_id)
            .and_then(|p| p.profile.project().map(|p| p.key.clone()))
            .unwrap_or_else(|| id_suffix(project_id).to_owned())
    };

    let mut projects = Paths::default();
    let mut repos = Paths::default();
    for (g, group) in &explicit {
        let Some(p) = permission_of(g) else { continue };
        let via_group = group.as_ref().map(|s| format!("group {s}"));
        match g.resource_type {
            ResourceType::Project => {
                projects.add(
                    &g.resource_id,
                    via_group.clone().unwrap_or_else(|| "direct".into()),
                    p,
                    false,
                );
                let key = key_of(&g.resource_id);
                let via = match group {
                    Some(s) => format!("project {key} via group {s}"),
                    None => format!("project {key}"),
                };
                for r in repos_by_project.get(g.resource_id.as_str()).into_iter().flatten() {
                    repos.add(&r.id, via.clone(), p.on_repository(), false);
                }
            }
            ResourceType::Repository => {
                repos.add(
                    &g.resource_id,
                    via_group.unwrap_or_else(|| "direct".into()),
                    p.on_repository(),
                    false,
                );
            }
            _ => {}
        }
    }
    for p in projects_all
        .iter()
        .filter(|p| p.parent_id.as_ref().is_some_and(|ws| owned.contains(ws)))
    {
        projects.add(&p.id, "workspace owner".into(), Permission::Admin, false);
    }

    let ws_resources = store.resources(connector, Some(ResourceType::Workspace))?;
    let ws_slug = |id: &str| -> String {
        ws_resources
            .iter()
            .find(|w| w.id == id)
            .and_then(|w| w.profile.workspace().map(|p| p.slug.clone()))
            .unwrap_or_else(|| id.to_owned())
    };

    let workspaces = workspaces
        .into_iter()
        .map(|(id, mut roles)| {
            roles.sort();
            roles.dedup();
            let ws = ws_resources.iter().find(|w| w.id == id);
            WorkspaceAccess {
                slug: ws_slug(&id),
                name: ws.map(|w| w.display_name.clone()).unwrap_or_default(),
                id,
                roles,
            }
        })
        .collect();

    let mut group_list = Vec::new();
    for gid in group_ids {
        let r = store.resource(connector, &gid)?;
        let workspace = r
            .as_ref()
            .and_then(|r| {
                r.profile
                    .group()
                    .map(|p| p.workspace_slug.clone())
                    .or_else(|| r.parent_id.as_deref().map(&ws_slug))
            })
            .unwrap_or_default();
        group_list.push(GroupAccess {
            slug: groups.slug(&gid)?,
            name: r.map(|r| r.display_name).unwrap_or_default(),
            workspace,
            id: gid,
        });
    }
    group_list.sort_by(|a, b| (&a.workspace, &a.slug).cmp(&(&b.workspace, &b.slug)));

    let finish = |paths: Paths, all: &HashMap<&str, &Resource>, name_of: &dyn Fn(&Resource) -> String| {
        let mut out: Vec<ResourceAccess> = paths
            .by_key
            .into_iter()
            .map(|(id, (set, _))| {
                let r = all.get(id.as_str()).copied();
                let (permission, via) = rank(set);
                ResourceAccess {
                    name: r.map_or_else(|| id.clone(), name_of),
                    display_name: r.map(|r| r.display_name.clone()).unwrap_or_default(),
                    id,
                    permission,
                    via,
                }
            })
            .collect();
        sort_resource_access(&mut out);
        out
    };
    let project_name = |p: &Resource| {
        let profile = p.profile.project();
        let ws = profile
            .map(|p| p.workspace_slug.clone())
            .unwrap_or_else(|| p.parent_id.as_deref().map(&ws_slug).unwrap_or_default());
        let key = profile.map_or_else(|| id_suffix(&p.id).to_owned(), |p| p.key.clone());
        format!("{ws}/{key}")
    };
    let repo_name = |r: &Resource| {
        r.profile
            .repository()
            .map_or_else(|| r.id.clone(), |p| p.full_name.clone())
    };
    Ok(UserAccess {
        user,
        workspaces,
        groups: group_list,
        projects: finish(projects, &project_index, &project_name),
        repositories: with_owned_repositories(
            finish(repos, &repo_index, &repo_name),
            store.repository_names_in_workspaces(connector, &owned_ids)?,
        ),
    })
}

/// Highest permission first, then by name (then id, so the order is total).
fn sort_resource_access(out: &mut [ResourceAccess]) {
    out.sort_unstable_by(|a, b| {
        b.permission
            .cmp(&a.permission)
            .then_with(|| a.name.cmp(&b.name))
            .then_with(|| a.id.cmp(&b.id))
    });
}

/// Adds the `workspace owner` path (admin) to every repository of the
/// workspaces the user owns. An owner reaches thousands of repositories, so
/// they are read by name only and joined here, instead of one full resource
/// and one path set each through the general path.
fn with_owned_repositories(mut out: Vec<ResourceAccess>, owned: Vec<RepositoryName>) -> Vec<ResourceAccess> {
    if owned.is_empty() {
        return out;
    }
    let owner = AccessPath {
        via: "workspace owner".into(),
        permission: Permission::Admin,
    };
    let explicit: HashMap<String, usize> = out.iter().enumerate().map(|(i, r)| (r.id.clone(), i)).collect();
    for repo in owned {
        match explicit.get(&repo.id) {
            Some(&i) => {
                let mut via = std::mem::take(&mut out[i].via);
                if !via.contains(&owner) {
                    via.push(owner.clone());
                }
                (out[i].permission, out[i].via) = rank(via);
            }
            None => out.push(ResourceAccess {
                id: repo.id,
                display_name: repo.full_name.clone(),
                name: repo.full_name,
                permission: Permission::Admin,
                via: vec![owner.clone()],
            }),
        }
    }
    sort_resource_access(&mut out);
    out
}

/// One grant with names, for access reviews (CSV, tables).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReviewRow {
    pub resource_type: ResourceType,
    pub resource_id: String,
    pub resource_name: String,
    pub entitlement: String,
    pub principal_type: ResourceType,
    pub principal_id: String,
    pub principal_name: String,
    pub unknown_principal: bool,
}

/// The CSV columns of a [`ReviewRow`], in [`ReviewRow::cells`] order: the
/// CLI's `access grants --csv` and the data API's `grants.csv` share them.
pub const REVIEW_COLUMNS: [&str; 8] = [
    "resource_type",
    "resource_id",
    "resource_name",
    "entitlement",
    "principal_type",
    "principal_id",
    "principal_name",
    "unknown_principal",
];

impl ReviewRow {
    /// The row as text, one cell per [`REVIEW_COLUMNS`] entry.
    pub fn cells(&self) -> [String; 8] {
        [
            self.resource_type.to_string(),
            self.resource_id.clone(),
            self.resource_name.clone(),
            self.entitlement.clone(),
            self.principal_type.to_string(),
            self.principal_id.clone(),
            self.principal_name.clone(),
            self.unknown_principal.to_string(),
        ]
    }
}

/// Every current grant of `connector` with resource and principal names,
/// sorted by resource type, resource name, entitlement and principal name.
pub fn review_rows(store: &Store, connector: &str) -> Result<Vec<ReviewRow>, StoreError> {
    let names = NameIndex::current(store, connector)?;
    let mut rows = Vec::new();
    for kind in crate::model::SyncKind::ALL {
        let batch = store.batch(connector, kind)?;
        let slugs: HashMap<&str, (&str, &str)> = batch
            .entitlements
            .iter()
            .map(|e| (e.id.as_str(), (e.resource_id.as_str(), e.slug.as_str())))
            .collect();
        for g in &batch.grants {
            let Some((resource_id, slug)) = slugs.get(g.entitlement_id.as_str()) else {
                continue;
            };
            rows.push(ReviewRow {
                resource_type: kind.resource_type(),
                resource_id: (*resource_id).to_owned(),
                resource_name: names.name(resource_id),
                entitlement: (*slug).to_owned(),
                principal_type: g.principal_type,
                principal_id: g.principal_id.clone(),
                principal_name: names.name(&g.principal_id),
                unknown_principal: g.unknown_principal,
            });
        }
    }
    rows.sort_by(|a, b| {
        (a.resource_type, &a.resource_name, &a.entitlement, &a.principal_name).cmp(&(
            b.resource_type,
            &b.resource_name,
            &b.entitlement,
            &b.principal_name,
        ))
    });
    Ok(rows)
}

/// Human names of resources by id: repositories and projects as
/// `workspace/slug`, users by nickname, others by display name.
#[derive(Debug, Default)]
pub struct NameIndex {
    names: HashMap<String, String>,
}

impl NameIndex {
    /// The names of every current resource of `connector`.
    pub fn current(store: &Store, connector: &str) -> Result<NameIndex, StoreError> {
        let mut index = NameIndex::default();
        index.add(store.resources(connector, None)?);
        Ok(index)
    }

    /// Adds names (already known ids keep theirs).
    pub fn add(&mut self, resources: impl IntoIterator<Item = Resource>) {
        for r in resources {
            let name = match &r.profile {
                crate::model::Profile::Repository(p) if !p.full_name.is_empty() => p.full_name.clone(),
                crate::model::Profile::Project(p) if !p.key.is_empty() => format!("{}/{}", p.workspace_slug, p.key),
                crate::model::Profile::Group(p) if !p.slug.is_empty() => format!("{}/{}", p.workspace_slug, p.slug),
                crate::model::Profile::User(p) => p.nickname.clone().unwrap_or_else(|| r.display_name.clone()),
                _ => r.display_name.clone(),
            };
            self.names.entry(r.id).or_insert(name);
        }
    }

    /// The name of `id`, or `""` when unknown.
    pub fn name(&self, id: &str) -> String {
        self.names.get(id).cloned().unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggestions_are_close_names_only() {
        let names: Vec<String> = ["acme/api", "acme/web", "globex/billing"].map(String::from).to_vec();
        assert_eq!(did_you_mean("acme/apj", &names), "; did you mean acme/api?");
        assert_eq!(did_you_mean("billing", &names), "; did you mean globex/billing?");
        assert_eq!(did_you_mean("zzzzzz", &names), "");
        assert_eq!(edit_distance("kitten", "sitting"), 3);
    }

    #[test]
    fn permissions_rank_and_create_repo_is_write_on_repositories() {
        use Permission::*;
        assert!(Read < Write && Write < CreateRepo && CreateRepo < Admin);
        assert_eq!(CreateRepo.on_repository(), Write);
        assert_eq!(Admin.on_repository(), Admin);
        for p in [Read, Write, CreateRepo, Admin] {
            assert_eq!(Permission::parse(p.as_str()), Some(p));
        }
        assert_eq!(Permission::parse("none"), None);
        assert_eq!(serde_json::to_value(CreateRepo).unwrap(), "create-repo");
    }

    #[test]
    fn rank_takes_the_highest_path_and_lists_all() {
        let set: Vec<AccessPath> = [
            ("direct", Permission::Read),
            ("group devs", Permission::Admin),
            ("project P", Permission::Write),
        ]
        .into_iter()
        .map(|(v, p)| AccessPath {
            via: v.into(),
            permission: p,
        })
        .collect();
        let (best, via) = rank(set);
        assert_eq!(best, Permission::Admin);
        let names: Vec<_> = via.iter().map(|p| p.via.as_str()).collect();
        assert_eq!(names, ["group devs", "project P", "direct"]);
    }

    #[test]
    fn an_owner_keeps_explicit_paths_beside_ownership_and_reaches_every_owned_repository() {
        let access = |id: &str, permission: Permission, via: &str| ResourceAccess {
            id: id.into(),
            name: format!("acme/{id}"),
            display_name: id.into(),
            permission,
            via: vec![AccessPath {
                via: via.into(),
                permission,
            }],
        };
        let explicit = vec![
            access("x", Permission::Write, "direct"),
            access("y", Permission::Read, "group devs"),
        ];
        let owned = ["z", "x"]
            .map(|id| RepositoryName {
                id: id.into(),
                full_name: format!("acme/{id}"),
            })
            .to_vec();
        let out = with_owned_repositories(explicit, owned);
        let summary: Vec<(&str, Permission, Vec<&str>)> = out
            .iter()
            .map(|r| {
                (
                    r.name.as_str(),
                    r.permission,
                    r.via.iter().map(|p| p.via.as_str()).collect(),
                )
            })
            .collect();
        assert_eq!(
            summary,
            vec![
                ("acme/x", Permission::Admin, vec!["workspace owner", "direct"]),
                ("acme/z", Permission::Admin, vec!["workspace owner"]),
                ("acme/y", Permission::Read, vec!["group devs"]),
            ]
        );
    }

    #[test]
    fn tables_align_columns() {
        let t = cli::table(
            &["A", "LONGER"],
            &[vec!["wide cell".into(), "x".into()], vec!["é".into(), "y".into()]],
        );
        let lines: Vec<_> = t.lines().collect();
        assert_eq!(lines[0], "A          LONGER");
        assert_eq!(lines[1], "wide cell  x");
        assert_eq!(lines[2], "é          y");
    }
}
