//! `BitbucketAccessGrant`: provisioning as a resource. The operator grants the
//! permission through a connector with provisioning enabled, revokes it at
//! expiry or on deletion (finalizer), and restores what the principal held
//! before, if anything.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

/// A permission for a Bitbucket user or group on a workspace group, project or
/// repository, granted through a BitbucketConnector with provisioning
/// enabled, optionally only for a time (just-in-time access).
// kube(printcolumn(...)) repeats `type_ = ...` by design.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "connectors.dev",
    version = "v1alpha1",
    kind = "BitbucketAccessGrant",
    namespaced,
    shortname = "bbag",
    category = "connectors",
    status = "BitbucketAccessGrantStatus",
    doc = "BitbucketAccessGrant grants a Bitbucket user or group a permission on a workspace group, project or repository, through a BitbucketConnector with provisioning enabled, and revokes it at expiry or on deletion.",
    printcolumn(
        name = "Principal",
        type_ = "string",
        json_path = ".spec.principal.*",
        description = "User or group receiving the permission"
    ),
    printcolumn(
        name = "Workspace",
        type_ = "string",
        json_path = ".spec.target.workspace",
        description = "Workspace slug"
    ),
    printcolumn(
        name = "Target",
        type_ = "string",
        json_path = ".status.target",
        description = "group/<slug>, project/<KEY> or repository/<slug>"
    ),
    printcolumn(name = "Permission", type_ = "string", json_path = ".spec.permission"),
    printcolumn(
        name = "State",
        type_ = "string",
        json_path = ".status.state",
        description = "Pending, Granted, Expired, Revoked, Denied or Failed"
    ),
    printcolumn(
        name = "Expires",
        type_ = "date",
        json_path = ".status.expiresAt",
        description = "When the permission is revoked"
    ),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = kube::core::Rule::new("!has(self.target.group) || (self.permission == 'member' && has(self.principal.user))").message("a group target takes permission 'member' and a user principal"),
    validation = kube::core::Rule::new("!has(self.target.project) || self.permission in ['read', 'write', 'create-repo', 'admin']").message("a project target takes permission read, write, create-repo or admin"),
    validation = kube::core::Rule::new("!has(self.target.repository) || self.permission in ['read', 'write', 'admin']").message("a repository target takes permission read, write or admin"),
    validation = kube::core::Rule::new("!(has(self.duration) && has(self.expiresAt))").message("set duration or expiresAt, not both"),
    // The request is immutable (transition rules, checked on update only;
    // expiresAt has format date-time, so CEL compares it as a timestamp):
    // the access a grant holds can never be redirected or widened by an
    // edit, and its end can only come sooner.
    validation = kube::core::Rule::new("self.principal == oldSelf.principal").message("spec.principal is immutable: create a new grant"),
    validation = kube::core::Rule::new("self.target == oldSelf.target").message("spec.target is immutable: create a new grant"),
    validation = kube::core::Rule::new("self.permission == oldSelf.permission").message("spec.permission is immutable: create a new grant"),
    validation = kube::core::Rule::new("self.connectorRef == oldSelf.connectorRef").message("spec.connectorRef is immutable: create a new grant"),
    validation = kube::core::Rule::new("!has(oldSelf.duration) || (has(self.duration) && duration(self.duration) <= duration(oldSelf.duration))").message("spec.duration may only shrink: it cannot grow or be removed"),
    validation = kube::core::Rule::new("!has(oldSelf.expiresAt) || (has(self.expiresAt) && self.expiresAt <= oldSelf.expiresAt)").message("spec.expiresAt may only move earlier: it cannot move later or be removed")
)]
pub struct BitbucketAccessGrantSpec {
    /// The BitbucketConnector that performs the grant: in this namespace, or
    /// in `namespace` when that connector lists this namespace in its
    /// `spec.provisioning.grantNamespaces`. It must have provisioning
    /// enabled, and its policy decides what may be granted. Immutable.
    pub connector_ref: ConnectorRef,

    /// Who receives the permission: exactly one of user or group.
    pub principal: Principal,

    /// Where the permission applies: a workspace and exactly one of group,
    /// project or repository.
    pub target: Target,

    /// The permission: `member` (group target only), `read`, `write`,
    /// `create-repo` (project target only) or `admin` (project or repository).
    pub permission: Permission,

    /// Revoke the permission this long after it was granted (Go duration, at
    /// least 1m, for example 8h). Not together with expiresAt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$"), length(max = 32))]
    #[x_kube(validation = kube::core::Rule::new("duration(self) >= duration('1m')").message("duration must be at least 1m"))]
    pub duration: Option<String>,

    /// Revoke the permission at this time (RFC 3339). Not together with duration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<Time>,
}

impl BitbucketAccessGrantSpec {
    /// When the permission must be revoked, given when it was granted:
    /// `expiresAt`, else `grantedAt + duration`, else never (`None`).
    pub fn expiry(&self, granted_at: &Time) -> anyhow::Result<Option<Time>> {
        if let Some(at) = &self.expires_at {
            return Ok(Some(at.clone()));
        }
        let Some(d) = self.duration.as_deref() else {
            return Ok(None);
        };
        let d = crate::crd::parse_duration(d)?;
        let at = granted_at
            .0
            .checked_add(d)
            .map_err(|e| anyhow::anyhow!("grant expiry out of range: {e}"))?;
        Ok(Some(Time(at)))
    }
}

/// Reference to a BitbucketConnector.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ConnectorRef {
    /// Name of the BitbucketConnector.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Namespace of the BitbucketConnector. Default: this grant's
    /// namespace. Another namespace is allowed only when that connector
    /// lists this grant's namespace in `spec.provisioning.grantNamespaces`
    /// (else the grant is Denied, reason NamespaceNotAllowed); no right on
    /// the connector's namespace is needed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"), length(min = 1, max = 63))]
    pub namespace: Option<String>,
}

impl ConnectorRef {
    /// The connector's namespace, for a grant in `grant_namespace`.
    pub fn namespace_or<'a>(&'a self, grant_namespace: &'a str) -> &'a str {
        self.namespace.as_deref().unwrap_or(grant_namespace)
    }
}

/// Annotation naming who asked for a grant: the chart's
/// ValidatingAdmissionPolicy requires it to equal the creating user's name
/// (`request.userInfo.username`) and forbids changing it, so it cannot be
/// forged; the audit trail reads the requester from it.
pub const REQUESTED_BY_ANNOTATION: &str = "connectors.dev/requested-by";

/// The principal: exactly one of user or group.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new("has(self.user) != has(self.group)").message("set exactly one of user or group"))]
pub struct Principal {
    /// A Bitbucket user: UUID in braces ("{…}"), Atlassian account ID, or nickname.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256))]
    pub user: Option<String>,
    /// A workspace user group, by slug (in the target workspace).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256))]
    pub group: Option<String>,
}

/// The target: a workspace and exactly one of group, project or repository.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new("(has(self.group) ? 1 : 0) + (has(self.project) ? 1 : 0) + (has(self.repository) ? 1 : 0) == 1").message("set exactly one of group, project or repository"))]
pub struct Target {
    /// Workspace slug.
    #[schemars(length(min = 1, max = 62), regex(pattern = r"^[a-z0-9][a-z0-9_.-]*$"))]
    pub workspace: String,
    /// A user group of the workspace, by slug (permission `member`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256))]
    pub group: Option<String>,
    /// A project of the workspace, by key (for example PROJ).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256))]
    pub project: Option<String>,
    /// A repository of the workspace, by slug.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256))]
    pub repository: Option<String>,
}

impl Target {
    /// Human-readable target for `status.target`: `group/<slug>`,
    /// `project/<KEY>` or `repository/<slug>`.
    pub fn display(&self) -> String {
        if let Some(g) = &self.group {
            format!("group/{g}")
        } else if let Some(p) = &self.project {
            format!("project/{p}")
        } else if let Some(r) = &self.repository {
            format!("repository/{r}")
        } else {
            String::new()
        }
    }
}

pub use crate::model::Permission;

/// Observed state of a BitbucketAccessGrant.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct BitbucketAccessGrantStatus {
    /// The metadata.generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Conditions: Ready (the permission is in place), and (kstatus, only
    /// while True) Reconciling and Stalled.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = kube::core::ListMerge::Map(vec!["type".to_owned()]))]
    pub conditions: Vec<Condition>,
    /// One word for people: Pending, Granted, Expired, Revoked (its
    /// connector was deleted), Denied (outside the connector's policy) or
    /// Failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    /// The target as shown by kubectl: group/<slug>, project/<KEY> or repository/<slug>.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// The permission the principal held on the target before this grant
    /// (restored on revoke); absent when it held nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_permission: Option<String>,
    /// When the permission was granted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub granted_at: Option<Time>,
    /// When the permission will be (or was) revoked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<Time>,
    /// The principal's resolved Bitbucket UUID.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub principal_id: Option<String>,
    /// The access the operator granted in Bitbucket, recorded in the same
    /// status write as `grantedAt`: expiry, deletion and a spec change
    /// revoke exactly this, never what the spec (or any annotation) says.
    /// Present while the grant holds (state Granted). Only the operator
    /// writes status, so people who may edit the grant cannot redirect a
    /// revoke at someone else's access.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub applied: Option<AppliedAccess>,
    /// A Bitbucket change the operator recorded before making it: present
    /// from just before the write until its result is recorded. An operator
    /// that stopped in between finds it here after a restart (or on another
    /// replica) and resolves it by reading the level in Bitbucket.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending_change: Option<PendingChange>,
}

/// A change announced before the Bitbucket write (`status.pendingChange`).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PendingChange {
    /// The write: `grant`, `revoke` (remove the level) or `restore` (put the
    /// level held before back).
    pub operation: PendingOperation,
    /// Why: `grant`, `expiry`, `deletion` or `spec-change`.
    pub trigger: String,
    /// The level read just before the write; absent when nothing was held.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<Permission>,
    /// The level the write leaves; absent when it removes the level.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<Permission>,
    /// When the change was recorded.
    pub started_at: Time,
    /// The access written, with the principal as resolved.
    pub access: AppliedAccess,
}

/// The Bitbucket write of a [`PendingChange`].
#[derive(Serialize, Deserialize, schemars::JsonSchema, Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum PendingOperation {
    Grant,
    Revoke,
    Restore,
}

/// The access the operator put in place for a grant (`status.applied`):
/// what expiry, deletion or a spec change will revoke.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct AppliedAccess {
    /// The BitbucketConnector that granted it.
    pub connector: String,
    /// The connector's namespace; absent: the grant's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connector_namespace: Option<String>,
    /// The principal that received the permission.
    pub principal: AppliedPrincipal,
    /// Workspace slug.
    pub workspace: String,
    /// The group, project or repository the permission was granted on.
    pub target: AppliedTarget,
    /// The permission granted (at least this level was ensured).
    pub permission: Permission,
}

/// The principal of an applied access, as resolved when it was granted.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct AppliedPrincipal {
    /// `user` or `group`.
    pub kind: AppliedPrincipalKind,
    /// What the operator used in Bitbucket: the user's UUID (`{…}`) or the
    /// group slug. The revoke names the principal by this.
    pub id: String,
    /// The principal as the spec named it (nickname, account ID, UUID or
    /// group slug): tells a spec change apart from the same access.
    pub requested: String,
}

/// Kind of an applied principal.
#[derive(Serialize, Deserialize, schemars::JsonSchema, Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum AppliedPrincipalKind {
    User,
    Group,
}

/// The target of an applied access (in [`AppliedAccess::workspace`]).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "camelCase")]
pub struct AppliedTarget {
    /// `group`, `project` or `repository`.
    pub kind: AppliedTargetKind,
    /// The group slug, project key or repository slug, as the spec named it.
    pub key: String,
}

/// Kind of an applied target.
#[derive(Serialize, Deserialize, schemars::JsonSchema, Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum AppliedTargetKind {
    Group,
    Project,
    Repository,
}

impl AppliedTarget {
    /// `group/<slug>`, `project/<KEY>` or `repository/<slug>` (as [`Target::display`]).
    pub fn display(&self) -> String {
        let kind = match self.kind {
            AppliedTargetKind::Group => "group",
            AppliedTargetKind::Project => "project",
            AppliedTargetKind::Repository => "repository",
        };
        format!("{kind}/{}", self.key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_grant_deserialises() {
        let text = include_str!("../../examples/accessgrant.yaml");
        let g: BitbucketAccessGrant = serde_yaml::from_str(text).expect("examples/accessgrant.yaml");
        assert!(g.spec.duration.is_some());
        assert!(g.spec.expires_at.is_none());
        assert!(crate::crd::parse_duration(g.spec.duration.as_deref().unwrap()).is_ok());
    }

    #[test]
    fn expiry_comes_from_expires_at_or_duration() {
        let text = include_str!("../../examples/accessgrant.yaml");
        let mut g: BitbucketAccessGrant = serde_yaml::from_str(text).unwrap();
        let granted = Time(k8s_openapi::jiff::Timestamp::from_second(1_000_000).unwrap());
        g.spec.duration = Some("8h".into());
        let at = g.spec.expiry(&granted).unwrap().unwrap();
        assert_eq!(at.0.as_second(), 1_000_000 + 8 * 3600);
        g.spec.duration = None;
        assert_eq!(g.spec.expiry(&granted).unwrap(), None);
        let fixed = Time(k8s_openapi::jiff::Timestamp::from_second(2_000_000).unwrap());
        g.spec.expires_at = Some(fixed.clone());
        assert_eq!(g.spec.expiry(&granted).unwrap(), Some(fixed));
    }

    #[test]
    fn permissions_use_bitbucket_slugs() {
        let p: Permission = serde_json::from_value(serde_json::json!("create-repo")).unwrap();
        assert_eq!(p, Permission::CreateRepo);
        assert_eq!(p.to_string(), "create-repo");
        assert!(serde_json::from_value::<Permission>(serde_json::json!("owner")).is_err());
        let t = Target {
            workspace: "acme".into(),
            repository: Some("api".into()),
            ..Default::default()
        };
        assert_eq!(t.display(), "repository/api");
    }
}
