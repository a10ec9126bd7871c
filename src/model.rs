//! The access model: what the connector knows about Bitbucket, as resources,
//! entitlements and grants.
//!
//! Identifiers follow ConductorOne's `baton-bitbucket` so that data synced here
//! lines up with an existing ConductorOne app (see `DESIGN.md`, "The access
//! model"). The workspace `owner` entitlement is new: baton-bitbucket does not
//! report owners.
//!
//! | type         | id                                                    |
//! |--------------|-------------------------------------------------------|
//! | `workspace`  | workspace UUID `{…}`                                  |
//! | `user`       | user UUID `{…}`                                       |
//! | `user_group` | `{workspaceUUID}:{groupSlug}`                         |
//! | `project`    | `{workspaceUUID}:{projectUUID}:{projectKey}`          |
//! | `repository` | `{workspaceUUID}:{projectUUID}:{projectKey}:{repoUUID}` |
//!
//! Entitlement id: `{resourceType}:{resourceId}:{slug}`.
//! Grant id: `{entitlementId}:{principalType}:{principalId}`.

use serde::{Deserialize, Serialize};
use std::fmt;

/// The five resource types of the access model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResourceType {
    User,
    Workspace,
    UserGroup,
    Project,
    Repository,
}

impl ResourceType {
    pub const ALL: [ResourceType; 5] = [
        ResourceType::User,
        ResourceType::Workspace,
        ResourceType::UserGroup,
        ResourceType::Project,
        ResourceType::Repository,
    ];

    /// The wire name used in ids (`user`, `workspace`, `user_group`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            ResourceType::User => "user",
            ResourceType::Workspace => "workspace",
            ResourceType::UserGroup => "user_group",
            ResourceType::Project => "project",
            ResourceType::Repository => "repository",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.as_str() == s)
    }

    /// Entitlement slugs a resource of this type offers.
    pub fn entitlement_slugs(self) -> &'static [&'static str] {
        match self {
            ResourceType::User => &[],
            ResourceType::Workspace => &["member", "owner"],
            ResourceType::UserGroup => &["member"],
            ResourceType::Project => &PROJECT_PERMISSIONS,
            ResourceType::Repository => &REPOSITORY_PERMISSIONS,
        }
    }
}

impl fmt::Display for ResourceType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A permission level, lowest first: the derived order is the ranking used
/// wherever levels are compared (effective access, overlapping grants).
/// `member` is membership of a group; the others are project and repository
/// levels (`create-repo` exists on projects only).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Permission {
    /// Membership of a workspace group.
    Member,
    /// Read access.
    Read,
    /// Write access.
    Write,
    /// Create repositories in a project.
    CreateRepo,
    /// Admin access.
    Admin,
}

impl Permission {
    /// The entitlement slug (`member`, `read`, `write`, `create-repo`, `admin`).
    pub fn as_str(self) -> &'static str {
        match self {
            Permission::Member => "member",
            Permission::Read => "read",
            Permission::Write => "write",
            Permission::CreateRepo => "create-repo",
            Permission::Admin => "admin",
        }
    }

    /// Parses an entitlement slug; `None` for anything else (including
    /// Bitbucket's `none`).
    pub fn parse(slug: &str) -> Option<Self> {
        [
            Permission::Member,
            Permission::Read,
            Permission::Write,
            Permission::CreateRepo,
            Permission::Admin,
        ]
        .into_iter()
        .find(|p| p.as_str() == slug)
    }

    /// What a project level means on the project's repositories
    /// (`create-repo` includes `write`).
    pub fn on_repository(self) -> Self {
        match self {
            Permission::CreateRepo => Permission::Write,
            p => p,
        }
    }
}

impl fmt::Display for Permission {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Explicit project permission levels, lowest first.
pub const PROJECT_PERMISSIONS: [&str; 4] = ["read", "write", "create-repo", "admin"];
/// Explicit repository permission levels, lowest first.
pub const REPOSITORY_PERMISSIONS: [&str; 3] = ["read", "write", "admin"];

/// One sync loop per resource type. The names are the ones used on the
/// `BitbucketConnector` spec (`accounts`, `workspaces`, ...).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SyncKind {
    Accounts,
    Workspaces,
    Groups,
    Projects,
    Repositories,
}

impl SyncKind {
    pub const ALL: [SyncKind; 5] = [
        SyncKind::Accounts,
        SyncKind::Workspaces,
        SyncKind::Groups,
        SyncKind::Projects,
        SyncKind::Repositories,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            SyncKind::Accounts => "accounts",
            SyncKind::Workspaces => "workspaces",
            SyncKind::Groups => "groups",
            SyncKind::Projects => "projects",
            SyncKind::Repositories => "repositories",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == s)
    }

    /// The resource type this loop emits.
    pub fn resource_type(self) -> ResourceType {
        match self {
            SyncKind::Accounts => ResourceType::User,
            SyncKind::Workspaces => ResourceType::Workspace,
            SyncKind::Groups => ResourceType::UserGroup,
            SyncKind::Projects => ResourceType::Project,
            SyncKind::Repositories => ResourceType::Repository,
        }
    }
}

impl fmt::Display for SyncKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `{workspaceUUID}:{groupSlug}`
pub fn group_id(workspace_uuid: &str, group_slug: &str) -> String {
    format!("{workspace_uuid}:{group_slug}")
}

/// `{workspaceUUID}:{projectUUID}:{projectKey}`
pub fn project_id(workspace_uuid: &str, project_uuid: &str, project_key: &str) -> String {
    format!("{workspace_uuid}:{project_uuid}:{project_key}")
}

/// `{workspaceUUID}:{projectUUID}:{projectKey}:{repoUUID}`
pub fn repository_id(workspace_uuid: &str, project_uuid: &str, project_key: &str, repo_uuid: &str) -> String {
    format!("{workspace_uuid}:{project_uuid}:{project_key}:{repo_uuid}")
}

/// `{resourceType}:{resourceId}:{slug}`
pub fn entitlement_id(resource_type: ResourceType, resource_id: &str, slug: &str) -> String {
    format!("{}:{resource_id}:{slug}", resource_type.as_str())
}

/// `{entitlementId}:{principalType}:{principalId}`
pub fn grant_id(entitlement_id: &str, principal_type: ResourceType, principal_id: &str) -> String {
    format!("{entitlement_id}:{}:{principal_id}", principal_type.as_str())
}

/// A thing access can be held on, or a principal (users).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Resource {
    pub resource_type: ResourceType,
    pub id: String,
    pub display_name: String,
    /// The id of the workspace resource this belongs to; `None` for
    /// workspaces and users (users can belong to several workspaces).
    pub parent_id: Option<String>,
    /// Type-specific attributes (nickname, account id, status, slug, key,
    /// full name, ...), kept as JSON so the store needs no column per type.
    pub profile: serde_json::Value,
}

/// Something that can be granted on a resource (`member`, `admin`, ...).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entitlement {
    pub id: String,
    pub resource_type: ResourceType,
    pub resource_id: String,
    pub slug: String,
    pub display_name: String,
}

impl Entitlement {
    pub fn new(resource_type: ResourceType, resource_id: &str, slug: &str, display_name: String) -> Self {
        Entitlement {
            id: entitlement_id(resource_type, resource_id, slug),
            resource_type,
            resource_id: resource_id.to_owned(),
            slug: slug.to_owned(),
            display_name,
        }
    }
}

/// A principal holding an entitlement.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    pub id: String,
    pub entitlement_id: String,
    pub principal_type: ResourceType,
    pub principal_id: String,
    /// Set when the principal appears in a grant but not in the workspace's
    /// member list (a former member, a deleted account): kept, and flagged.
    pub unknown_principal: bool,
}

impl Grant {
    pub fn new(entitlement: &Entitlement, principal_type: ResourceType, principal_id: &str) -> Self {
        Grant {
            id: grant_id(&entitlement.id, principal_type, principal_id),
            entitlement_id: entitlement.id.clone(),
            principal_type,
            principal_id: principal_id.to_owned(),
            unknown_principal: false,
        }
    }
}

/// Everything one syncer run produced for its resource type.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SyncBatch {
    pub resources: Vec<Resource>,
    pub entitlements: Vec<Entitlement>,
    pub grants: Vec<Grant>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_follow_baton_bitbucket() {
        let ws = "{w}";
        let repo = repository_id(ws, "{p}", "KEY", "{r}");
        assert_eq!(repo, "{w}:{p}:KEY:{r}");
        let ent = entitlement_id(ResourceType::Repository, &repo, "admin");
        assert_eq!(ent, "repository:{w}:{p}:KEY:{r}:admin");
        assert_eq!(
            grant_id(&ent, ResourceType::UserGroup, &group_id(ws, "devs")),
            "repository:{w}:{p}:KEY:{r}:admin:user_group:{w}:devs"
        );
    }

    #[test]
    fn permission_levels_rank_and_round_trip() {
        assert!(Permission::Member < Permission::Read && Permission::Write < Permission::CreateRepo);
        assert!(Permission::CreateRepo < Permission::Admin);
        for slug in PROJECT_PERMISSIONS
            .iter()
            .chain(&REPOSITORY_PERMISSIONS)
            .chain(&["member"])
        {
            assert_eq!(Permission::parse(slug).map(Permission::as_str), Some(*slug));
        }
        assert_eq!(Permission::parse("none"), None);
        assert_eq!(Permission::CreateRepo.on_repository(), Permission::Write);
    }

    #[test]
    fn names_round_trip() {
        for t in ResourceType::ALL {
            assert_eq!(ResourceType::parse(t.as_str()), Some(t));
        }
        for k in SyncKind::ALL {
            assert_eq!(SyncKind::parse(k.as_str()), Some(k));
        }
    }
}
