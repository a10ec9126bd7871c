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
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Resource {
    pub resource_type: ResourceType,
    pub id: String,
    pub display_name: String,
    /// The id of the workspace resource this belongs to; `None` for
    /// workspaces and users (users can belong to several workspaces).
    pub parent_id: Option<String>,
    /// Type-specific attributes (nickname, account id, status, slug, key,
    /// full name, ...). The store keeps it as JSON text, so it needs no
    /// column per type; the shape is typed here, once, for every layer.
    pub profile: Profile,
}

impl<'de> Deserialize<'de> for Resource {
    /// The profile's shape depends on `resource_type`, so it is read after it.
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        struct Raw {
            resource_type: ResourceType,
            id: String,
            display_name: String,
            parent_id: Option<String>,
            #[serde(default)]
            profile: serde_json::Value,
        }
        let raw = Raw::deserialize(deserializer)?;
        let profile = Profile::from_value(raw.resource_type, raw.profile).map_err(serde::de::Error::custom)?;
        Ok(Resource {
            resource_type: raw.resource_type,
            id: raw.id,
            display_name: raw.display_name,
            parent_id: raw.parent_id,
            profile,
        })
    }
}

/// The type-specific attributes of a resource, one struct per type. Written
/// by the syncers, stored as JSON by the store, read by the access queries:
/// the JSON keys are the field names below and nowhere else.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Profile {
    User(UserProfile),
    Workspace(WorkspaceProfile),
    Group(GroupProfile),
    Project(ProjectProfile),
    Repository(RepositoryProfile),
}

/// A Bitbucket account.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct UserProfile {
    pub nickname: Option<String>,
    pub account_id: Option<String>,
    /// `active` or `inactive`.
    pub status: String,
    /// Only when Bitbucket shows it (rarely: it is private by default).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
    /// Ids of the synced workspaces the user is a member of (a sync over
    /// some workspaces replaces only those memberships).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub workspaces: Vec<String>,
}

/// A workspace.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct WorkspaceProfile {
    pub slug: String,
    pub name: String,
}

/// A workspace group (1.0 API).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct GroupProfile {
    pub slug: String,
    pub name: String,
    pub workspace_slug: String,
}

/// A project.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ProjectProfile {
    pub key: String,
    pub name: String,
    pub uuid: String,
    pub workspace_slug: String,
}

/// A repository, with the project it belongs to.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct RepositoryProfile {
    pub slug: String,
    /// `workspace/slug`.
    pub full_name: String,
    pub name: String,
    pub uuid: String,
    /// The project resource's id.
    pub project_id: String,
    pub project_key: String,
    pub workspace_slug: String,
}

impl Profile {
    /// Reads a stored profile of a resource of type `t`. Unknown keys are
    /// ignored and missing ones take their default, so older rows still read.
    pub fn from_value(t: ResourceType, value: serde_json::Value) -> Result<Profile, serde_json::Error> {
        let value = if value.is_null() {
            serde_json::Value::Object(Default::default())
        } else {
            value
        };
        Ok(match t {
            ResourceType::User => Profile::User(serde_json::from_value(value)?),
            ResourceType::Workspace => Profile::Workspace(serde_json::from_value(value)?),
            ResourceType::UserGroup => Profile::Group(serde_json::from_value(value)?),
            ResourceType::Project => Profile::Project(serde_json::from_value(value)?),
            ResourceType::Repository => Profile::Repository(serde_json::from_value(value)?),
        })
    }

    /// Like [`Profile::from_value`] from JSON text, read straight into the
    /// typed profile (every store read goes through here; a detour through
    /// `serde_json::Value` cost as much as the SQL).
    pub fn from_json(t: ResourceType, text: &str) -> Result<Profile, serde_json::Error> {
        fn read<T: serde::de::DeserializeOwned + Default>(text: &str) -> Result<T, serde_json::Error> {
            Ok(serde_json::from_str::<Option<T>>(text)?.unwrap_or_default())
        }
        Ok(match t {
            ResourceType::User => Profile::User(read(text)?),
            ResourceType::Workspace => Profile::Workspace(read(text)?),
            ResourceType::UserGroup => Profile::Group(read(text)?),
            ResourceType::Project => Profile::Project(read(text)?),
            ResourceType::Repository => Profile::Repository(read(text)?),
        })
    }

    /// The resource type this profile describes.
    pub fn resource_type(&self) -> ResourceType {
        match self {
            Profile::User(_) => ResourceType::User,
            Profile::Workspace(_) => ResourceType::Workspace,
            Profile::Group(_) => ResourceType::UserGroup,
            Profile::Project(_) => ResourceType::Project,
            Profile::Repository(_) => ResourceType::Repository,
        }
    }

    pub fn user(&self) -> Option<&UserProfile> {
        match self {
            Profile::User(p) => Some(p),
            _ => None,
        }
    }

    pub fn workspace(&self) -> Option<&WorkspaceProfile> {
        match self {
            Profile::Workspace(p) => Some(p),
            _ => None,
        }
    }

    pub fn group(&self) -> Option<&GroupProfile> {
        match self {
            Profile::Group(p) => Some(p),
            _ => None,
        }
    }

    pub fn project(&self) -> Option<&ProjectProfile> {
        match self {
            Profile::Project(p) => Some(p),
            _ => None,
        }
    }

    pub fn repository(&self) -> Option<&RepositoryProfile> {
        match self {
            Profile::Repository(p) => Some(p),
            _ => None,
        }
    }

    /// The slug of the workspace this resource lives in (its own, for a
    /// workspace; none for a user, who may be in several).
    pub fn workspace_slug(&self) -> Option<&str> {
        match self {
            Profile::User(_) => None,
            Profile::Workspace(p) => Some(&p.slug),
            Profile::Group(p) => Some(&p.workspace_slug),
            Profile::Project(p) => Some(&p.workspace_slug),
            Profile::Repository(p) => Some(&p.workspace_slug),
        }
    }

    /// The slug a person would type: workspace, group and repository slug,
    /// project key, user nickname.
    pub fn slug(&self) -> Option<&str> {
        match self {
            Profile::User(p) => p.nickname.as_deref(),
            Profile::Workspace(p) => Some(&p.slug),
            Profile::Group(p) => Some(&p.slug),
            Profile::Project(p) => Some(&p.key),
            Profile::Repository(p) => Some(&p.slug),
        }
    }
}

/// Profile fields resources can be looked up by ([`crate::store::Store::find_resources`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProfileField {
    /// A repository's `workspace/slug`.
    RepositoryFullName,
    UserNickname,
    UserAccountId,
    UserEmail,
}

impl ProfileField {
    /// The type of resource that has this field.
    pub fn resource_type(self) -> ResourceType {
        match self {
            ProfileField::RepositoryFullName => ResourceType::Repository,
            _ => ResourceType::User,
        }
    }

    /// The JSON key, as the profile structs serialize it.
    pub fn json_key(self) -> &'static str {
        match self {
            ProfileField::RepositoryFullName => "full_name",
            ProfileField::UserNickname => "nickname",
            ProfileField::UserAccountId => "account_id",
            ProfileField::UserEmail => "email",
        }
    }
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
    fn profiles_serialize_with_the_keys_lookups_use_and_read_back_by_type() {
        let repo = Profile::Repository(RepositoryProfile {
            slug: "api".into(),
            full_name: "acme/api".into(),
            project_key: "CORE".into(),
            ..Default::default()
        });
        let value = serde_json::to_value(&repo).unwrap();
        assert_eq!(value[ProfileField::RepositoryFullName.json_key()], "acme/api");
        assert_eq!(Profile::from_value(ResourceType::Repository, value).unwrap(), repo);
        let user = Profile::User(UserProfile {
            nickname: Some("jdoe".into()),
            account_id: Some("acc".into()),
            status: "active".into(),
            email: Some("j@example.com".into()),
            workspaces: vec!["{w}".into()],
        });
        let value = serde_json::to_value(&user).unwrap();
        for field in [
            ProfileField::UserNickname,
            ProfileField::UserAccountId,
            ProfileField::UserEmail,
        ] {
            assert!(value[field.json_key()].is_string(), "{field:?}");
        }
        // Older rows with missing or extra keys still read.
        let old = Profile::from_json(ResourceType::Project, r#"{"key":"K","extra":1}"#).unwrap();
        assert_eq!(old.project().unwrap().key, "K");
        assert_eq!(old.resource_type(), ResourceType::Project);
        // JSON text reads exactly as the same value does, null included.
        let text = serde_json::to_string(&repo).unwrap();
        assert_eq!(Profile::from_json(ResourceType::Repository, &text).unwrap(), repo);
        let empty = Profile::from_json(ResourceType::UserGroup, "null").unwrap();
        assert_eq!(
            empty,
            Profile::from_value(ResourceType::UserGroup, serde_json::Value::Null).unwrap()
        );
        assert!(Profile::from_json(ResourceType::User, "[1]").is_err());
        assert!(Profile::from_json(ResourceType::User, r#"{"status":7}"#).is_err());
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
