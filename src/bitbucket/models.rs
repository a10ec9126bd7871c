//! Typed Bitbucket Cloud payloads: only the fields the connector uses.
//!
//! Unknown fields are ignored and every field Bitbucket may leave out is an
//! `Option` or defaults, so a new or trimmed (`fields=`) payload never breaks
//! decoding.

use serde::{Deserialize, Serialize};

/// The 2.0 pagination envelope. Only `values` is guaranteed; `next` is present
/// on every page but the last.
#[derive(Debug, Clone, Deserialize)]
pub struct Page<T> {
    #[serde(default = "Vec::new")]
    pub values: Vec<T>,
    #[serde(default)]
    pub next: Option<String>,
    #[serde(default)]
    pub size: Option<u64>,
    #[serde(default)]
    pub pagelen: Option<u64>,
}

/// A user (`type: "user"`) as embedded in memberships and permission objects,
/// or returned by `/2.0/user`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    #[serde(default)]
    pub uuid: String,
    #[serde(default)]
    pub account_id: Option<String>,
    #[serde(default)]
    pub nickname: Option<String>,
    #[serde(default)]
    pub display_name: Option<String>,
    /// `active` today; Bitbucket may add values, so it stays a string.
    #[serde(default)]
    pub account_status: Option<String>,
    /// Only with `fields=+values.user.email`, and only for admins.
    #[serde(default)]
    pub email: Option<String>,
}

/// `workspace_base` / `workspace`: the parts the connector needs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Workspace {
    #[serde(default)]
    pub uuid: String,
    #[serde(default)]
    pub slug: String,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub is_private: Option<bool>,
}

/// An entry of `/2.0/user/workspaces`.
#[derive(Debug, Clone, Deserialize)]
pub struct WorkspaceAccess {
    #[serde(default)]
    pub administrator: bool,
    pub workspace: Workspace,
}

/// `/2.0/user/workspaces/{ws}/permission`.
#[derive(Debug, Clone, Deserialize)]
pub struct WorkspaceSelfPermission {
    /// `owner`, `create-project`, `member` or (deprecated) `collaborator`.
    #[serde(default)]
    pub permission: Option<String>,
    #[serde(default)]
    pub workspace: Option<Workspace>,
}

/// `workspace_membership` from `/members` (no `permission`) and from
/// `/permissions` (`permission` is `owner` or `member`).
#[derive(Debug, Clone, Deserialize)]
pub struct WorkspaceMembership {
    pub user: User,
    #[serde(default)]
    pub permission: Option<String>,
}

/// A project as listed by `/2.0/workspaces/{ws}/projects`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Project {
    #[serde(default)]
    pub uuid: String,
    #[serde(default)]
    pub key: String,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub is_private: Option<bool>,
}

/// A repository as listed by `/2.0/repositories/{ws}`. `slug` and `workspace`
/// are returned in practice but missing from the official schema.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Repository {
    #[serde(default)]
    pub uuid: String,
    #[serde(default)]
    pub slug: Option<String>,
    #[serde(default)]
    pub full_name: String,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub is_private: Option<bool>,
    #[serde(default)]
    pub project: Option<Project>,
}

impl Repository {
    /// The slug, from the `slug` field or else the part of `full_name` after
    /// the `/`.
    pub fn slug(&self) -> &str {
        match &self.slug {
            Some(slug) if !slug.is_empty() => slug,
            _ => self.full_name.rsplit('/').next().unwrap_or_default(),
        }
    }
}

/// The group object embedded in permissions-config responses.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupRef {
    #[serde(default)]
    pub slug: String,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub full_slug: Option<String>,
}

/// `project_user_permission` / `repository_user_permission`.
#[derive(Debug, Clone, Deserialize)]
pub struct UserPermission {
    /// `read`, `write`, `create-repo` (projects), `admin`, or `none`.
    #[serde(default)]
    pub permission: Option<String>,
    pub user: User,
}

/// Any single permissions-config entry, user or group: only its level.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct PermissionEntry {
    #[serde(default)]
    pub permission: Option<String>,
}

/// `project_group_permission` / `repository_group_permission`.
#[derive(Debug, Clone, Deserialize)]
pub struct GroupPermission {
    #[serde(default)]
    pub permission: Option<String>,
    pub group: GroupRef,
}

/// `repository_permission` from `/workspaces/{ws}/permissions/repositories`:
/// effective access, direct and group grants merged.
#[derive(Debug, Clone, Deserialize)]
pub struct EffectiveRepositoryPermission {
    #[serde(default)]
    pub permission: Option<String>,
    pub user: User,
    #[serde(default)]
    pub repository: Option<Repository>,
}

/// A group from the 1.0 groups API (a bare array, no envelope).
#[derive(Debug, Clone, Deserialize)]
pub struct Group {
    #[serde(default)]
    pub slug: String,
    #[serde(default)]
    pub name: Option<String>,
    /// Default permission for new repositories: `read`, `write`, `admin` or null.
    #[serde(default)]
    pub permission: Option<String>,
    #[serde(default)]
    pub members: Vec<GroupMember>,
}

/// A member object of the 1.0 groups API.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupMember {
    #[serde(default)]
    pub uuid: String,
    #[serde(default)]
    pub account_id: Option<String>,
    #[serde(default)]
    pub nickname: Option<String>,
    #[serde(default)]
    pub display_name: Option<String>,
    #[serde(default)]
    pub is_active: Option<bool>,
}

/// The 2.0 error envelope: `{"type":"error","error":{"message":…,"detail":…}}`.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct ErrorEnvelope {
    pub error: ErrorBody,
}

#[derive(Debug, Clone, Deserialize)]
pub(crate) struct ErrorBody {
    #[serde(default)]
    pub message: Option<String>,
    #[serde(default)]
    pub detail: Option<String>,
}

/// The OAuth token endpoint's answer.
#[derive(Deserialize)]
pub(crate) struct TokenResponse {
    pub access_token: String,
    #[serde(default)]
    pub expires_in: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tolerates_missing_and_unknown_fields() {
        let page: Page<WorkspaceMembership> = serde_json::from_str(
            r#"{"values":[{"type":"workspace_membership","user":{"uuid":"{u}","surprise":1}}],"extra":true}"#,
        )
        .unwrap();
        assert_eq!(page.values[0].user.uuid, "{u}");
        assert!(page.next.is_none());
        assert!(page.values[0].user.nickname.is_none());
    }

    #[test]
    fn repository_slug_falls_back_to_full_name() {
        let repo: Repository = serde_json::from_str(r#"{"full_name":"ws/my-repo","uuid":"{r}"}"#).unwrap();
        assert_eq!(repo.slug(), "my-repo");
    }
}
