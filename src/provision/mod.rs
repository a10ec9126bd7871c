//! Provisioning: grant and revoke Bitbucket access, precisely and
//! idempotently, for the `grant` / `revoke` CLI and the
//! `BitbucketAccessGrant` controller.
//!
//! # What can be provisioned
//!
//! | target (in one workspace)      | principal      | permissions                               | API |
//! |--------------------------------|----------------|-------------------------------------------|-----|
//! | a user group (by slug)         | user           | `member`                                  | 1.0 `PUT/DELETE /1.0/groups/{ws}/{slug}/members/{uuid}` |
//! | a project (by key)             | user or group  | `read`, `write`, `create-repo`, `admin`   | 2.0 project `permissions-config` |
//! | a repository (by slug)         | user or group  | `read`, `write`, `admin`                  | 2.0 repository `permissions-config` |
//! | the workspace itself           | –              | refused: [`ProvisionError::NotProvisionable`] (there is no API to add or remove workspace members; invitations go through the UI) |
//!
//! Principals: a user by UUID (`{…}`), Atlassian account id, nickname or
//! email, checked with the single-member lookup (a nickname or email is
//! first resolved to a UUID by the [`Inventory`]; only a name nothing else
//! identifies falls back to the member listing; see
//! `provisioner/members.rs`) (a user who is not a workspace member is
//! refused with
//! [`ProvisionError::NotWorkspaceMember`]: invite them first); a group by
//! slug (never a composite id), checked against the 1.0 group listing
//! ([`ProvisionError::PrincipalNotFound`]). Unknown workspaces, projects,
//! repositories and target groups are [`ProvisionError::TargetNotFound`].
//!
//! # Rules
//!
//! - **Provisioning must be enabled** (`BATON_PROVISIONING=true`, the
//!   connector's `spec.provisioning`, or the CLI's `--allow-provisioning`);
//!   otherwise every write is refused with
//!   [`ProvisionError::ProvisioningDisabled`] before any request is made.
//! - **Read before write.** Each operation first reads the principal's
//!   current explicit level with one GET of the permissions-config entry (a
//!   404 or `none` means nothing is held), or the group's member list, and
//!   writes only when something must change. Granting what is held and
//!   revoking what is not held succeed without a write; a 409 from the 1.0
//!   member PUT (someone added the user in between) is success too.
//! - **One explicit level.** Bitbucket holds one explicit level per principal
//!   on a project or repository; a PUT replaces it. So:
//!   - a grant records the level it replaced ([`GrantOutcome::previous`]);
//!   - **ensure-at-least** ([`GrantMode::AtLeast`], the default): a grant
//!     ensures the principal holds *at least* the level. Holding `admin`
//!     already satisfies `write`: no write, [`GrantResult::AlreadySatisfied`]
//!     with the level held. A grant never lowers access by accident;
//!   - **exact** ([`GrantMode::Exact`], CLI `--exact`): sets exactly the
//!     level, lowering if needed; used to restore a previous level;
//!   - revoking `write` from a principal who holds `admin` (or any other
//!     level than the one named) leaves that level in place and says so:
//!     [`RevokeResult::LeftInPlace`], not an error. A revoke removes only the
//!     level it names.
//!   - Levels rank `read < write < create-repo < admin` (`create-repo` exists
//!     on projects only).
//! - **Restore** ([`Provisioner::revoke_and_restore`], CLI `--restore`): for
//!   just-in-time access, when a grant ends, put back the level held before
//!   it (`previous`, as recorded by the grant): if the current level is still
//!   the one granted, PUT `previous` ([`RevokeResult::Restored`]) or DELETE
//!   when nothing was held ([`RevokeResult::Revoked`]); if the current level
//!   already equals `previous` (the grant changed nothing), nothing is
//!   written ([`RevokeResult::LeftInPlace`] / [`RevokeResult::NotHeld`]); if
//!   someone changed it since (another level, or removed), it is left alone
//!   and reported as [`RevokeResult::ChangedExternally`].
//! - **Overlapping grants** (two `BitbucketAccessGrant`s for the same
//!   principal and target): the higher level wins while both exist; removing
//!   one restores the other's level. The controller computes the level to
//!   restore with [`level_to_restore`] ([`effective_level`] over the levels
//!   of the grants that remain plus the level held before the first of
//!   them).
//! - **Fenced, announced writes.** Right before each write the provisioner
//!   checks its [`Fence`] (with leader election: this replica still holds the
//!   lease; else [`ProvisionError::LeaseLost`] and no write) and calls the
//!   caller's [`WriteGate`] with the exact [`PlannedWrite`] (principal as
//!   resolved, level read just before, level after): the grant controller
//!   records its intent there, and an error from the gate stops the write.
//! - **Former members.** A grant needs a workspace member. A revoke also
//!   accepts a user who has left the workspace, named by UUID: Bitbucket keeps
//!   their explicit permissions, and removing them is what an access review
//!   asks for.
//! - **Store refresh.** With an [`Inventory`] attached
//!   ([`Provisioner::with_inventory`]; [`StoreInventory`] over the store's
//!   own API, CLI `--db`), a change re-reads that one resource's explicit
//!   user and group permissions (or the group's members), builds its grants
//!   with the syncers' own code (so ids and flags equal the next full
//!   sync's), and hands them to the inventory, which replaces them in the
//!   current generation ([`crate::store::Store::replace_resource_grants`])
//!   and then calls its [`AfterRefresh`] hook (the operator's narrow callback
//!   into the sync loops). A resource the store has not synced yet is skipped
//!   and reported ([`StoreRefresh::Skipped`]); the Bitbucket change stands
//!   either way.
//! - **Its own shapes.** Provisioning knows nothing of the custom resources:
//!   a request is an [`AccessRequest`], what happened a [`GrantOutcome`] or
//!   [`RevokeOutcome`]; the grant controller converts its spec and status.
//! - Errors are one enum, [`ProvisionError`], whose [`ProvisionError::reason`]
//!   is the CamelCase condition reason the controller reports. Messages carry
//!   Bitbucket's message, never a secret.
//!
//! # CLI (`grant` / `revoke`)
//!
//! ```text
//! bitbucket-operator grant  --workspace WS (--user U | --group G) \
//!     (--group-target SLUG | --project KEY | --repository SLUG) --permission P \
//!     [--exact] [--db FILE --connector NAME] [--json] [--allow-provisioning]
//! bitbucket-operator revoke … (same) [--restore LEVEL|none]
//! ```
//!
//! Straight against Bitbucket, no cluster; credentials exactly as `sync`
//! (flags, `BATON_*` variables or `--secret-file`, `--api-url`). Provisioning
//! must be enabled by `BATON_PROVISIONING=true` (environment or Secret file)
//! or by `--allow-provisioning`. One line on stdout says what happened; with
//! `--json`, one JSON object (the outcome, or `{"ok":false,"reason":…}`).
//!
//! Exit codes (consistent with `sync`):
//! - 0: done (granted, revoked, restored, or nothing to do).
//! - 1: another failure (a conflict Bitbucket refused, an unexpected answer).
//! - 2: usage error (bad flags, a permission the target does not take).
//! - 3: credentials missing or rejected, or not allowed (403).
//! - 4: workspace, principal or target not found; user not a workspace member.
//! - 5: Bitbucket unreachable, failing, or rate limiting beyond the retry budget.
//! - 6: provisioning disabled, or the access is not provisionable.

pub mod cli;
mod fence;
mod provisioner;

use serde::Serialize;

use crate::bitbucket::Error as ApiError;
pub use crate::model::Permission;

pub use fence::{ChangeOperation, Fence, PlannedWrite, WriteGate};
pub use provisioner::{AfterRefresh, Inventory, Provisioner, StoreInventory, credential_identity};

/// Who receives (or loses) the access, as given by a person or a spec.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PrincipalRef {
    /// `{uuid}`, Atlassian account id, or nickname.
    User(String),
    /// A group slug of the target workspace.
    Group(String),
}

/// Where the access applies, inside [`AccessRequest::workspace`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TargetRef {
    /// Workspace membership itself: not provisionable (always refused).
    Workspace,
    /// A user group, by slug (permission `member`).
    Group(String),
    /// A project, by key.
    Project(String),
    /// A repository, by slug.
    Repository(String),
}

/// One grant or revoke: principal, target and permission in one workspace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AccessRequest {
    /// Workspace slug.
    pub workspace: String,
    pub principal: PrincipalRef,
    pub target: TargetRef,
    pub permission: Permission,
}

impl AccessRequest {
    pub fn new(
        workspace: impl Into<String>,
        principal: PrincipalRef,
        target: TargetRef,
        permission: Permission,
    ) -> Self {
        AccessRequest {
            workspace: workspace.into(),
            principal,
            target,
            permission,
        }
    }

    /// Checks, without any request, that the permission fits the target and
    /// the principal kind: `member` on groups for users only; project and
    /// repository levels on projects and repositories; nothing on the
    /// workspace itself.
    pub fn validate(&self) -> Result<(), ProvisionError> {
        let invalid = |allowed: &str| ProvisionError::InvalidPermission {
            permission: self.permission,
            message: format!(
                "{} takes {allowed}, not {}",
                self.target_kind_name(),
                self.permission.as_str()
            ),
        };
        match (&self.target, self.permission) {
            (TargetRef::Workspace, _) => Err(ProvisionError::NotProvisionable {
                message: format!(
                    "workspace membership of {} cannot be granted or revoked through the Bitbucket API (there is no \
                     2.0 API to add or remove workspace members; invite users in the Bitbucket UI)",
                    self.workspace
                ),
            }),
            (TargetRef::Group(_), _) if matches!(self.principal, PrincipalRef::Group(_)) => {
                Err(ProvisionError::NotProvisionable {
                    message: "Bitbucket groups cannot be members of other groups".into(),
                })
            }
            (TargetRef::Group(_), Permission::Member) => Ok(()),
            (TargetRef::Group(_), _) => Err(invalid("only member")),
            (TargetRef::Project(_), Permission::Member) => Err(invalid("read, write, create-repo or admin")),
            (TargetRef::Project(_), _) => Ok(()),
            (TargetRef::Repository(_), Permission::Read | Permission::Write | Permission::Admin) => Ok(()),
            (TargetRef::Repository(_), _) => Err(invalid("read, write or admin")),
        }
    }

    fn target_kind_name(&self) -> &'static str {
        match self.target {
            TargetRef::Workspace => "a workspace",
            TargetRef::Group(_) => "a group",
            TargetRef::Project(_) => "a project",
            TargetRef::Repository(_) => "a repository",
        }
    }
}

/// How a grant treats a level already held.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum GrantMode {
    /// Ensure at least the level: a higher level held already satisfies it.
    #[default]
    AtLeast,
    /// Set exactly the level, lowering a higher one.
    Exact,
}

/// The level in effect while several grants of one principal on one target
/// overlap: the highest (levels rank `read < write < create-repo < admin`);
/// `None` when there are none.
pub fn effective_level(levels: &[Permission]) -> Option<Permission> {
    levels.iter().copied().max()
}

/// The level to restore when one of several overlapping grants of one
/// principal on one target ends: the highest of the grants that `remaining`
/// and the level held `before` the first of them (`None`: delete). Pass it
/// as `previous` to [`Provisioner::revoke_and_restore`]; when it equals the
/// level in place (another grant is higher), nothing is written.
pub fn level_to_restore(before: Option<Permission>, remaining: &[Permission]) -> Option<Permission> {
    let mut levels: Vec<Permission> = remaining.to_vec();
    levels.extend(before);
    effective_level(&levels)
}

/// A permission by its Bitbucket slug (`member`, `read`, `write`,
/// `create-repo`, `admin`); `none`/empty is `None`; anything else `Err`.
pub fn parse_level(value: &str) -> Result<Option<Permission>, String> {
    match value.trim().to_ascii_lowercase().as_str() {
        "" | "none" => Ok(None),
        "member" => Ok(Some(Permission::Member)),
        "read" => Ok(Some(Permission::Read)),
        "write" => Ok(Some(Permission::Write)),
        "create-repo" => Ok(Some(Permission::CreateRepo)),
        "admin" => Ok(Some(Permission::Admin)),
        other => Err(format!(
            "unknown permission {other:?}; expected member, read, write, create-repo or admin"
        )),
    }
}

/// Kind of a resolved principal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PrincipalKind {
    User,
    Group,
}

/// The principal as Bitbucket knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ResolvedPrincipal {
    pub kind: PrincipalKind,
    /// What goes into URLs: the user's UUID (`{…}`) or the group slug.
    pub key: String,
    /// The principal id in the access model (grants' `principal_id`): the
    /// user UUID, or `{workspaceUUID}:{groupSlug}`.
    pub id: String,
    /// For people: the nickname (or display name) of a user, the slug of a group.
    pub name: String,
}

impl std::fmt::Display for ResolvedPrincipal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.kind {
            PrincipalKind::User => write!(f, "user {}", self.name),
            PrincipalKind::Group => write!(f, "group {}", self.name),
        }
    }
}

/// Kind of a resolved target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TargetKind {
    Group,
    Project,
    Repository,
}

/// The target as Bitbucket knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ResolvedTarget {
    pub kind: TargetKind,
    /// Workspace slug.
    pub workspace: String,
    /// Workspace UUID.
    pub workspace_uuid: String,
    /// Group slug, project key or repository slug.
    pub key: String,
    /// The resource id in the access model (`user_group`, `project` or
    /// `repository` id), as the syncers build it.
    pub resource_id: String,
}

impl std::fmt::Display for ResolvedTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self.kind {
            TargetKind::Group => "group",
            TargetKind::Project => "project",
            TargetKind::Repository => "repository",
        };
        write!(f, "{kind} {}/{}", self.workspace, self.key)
    }
}

/// What a grant did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum GrantResult {
    /// The level was written (see [`GrantOutcome::previous`] for what it replaced).
    Granted,
    /// Exactly this level was held already: nothing written.
    AlreadyHeld,
    /// A higher level is held, which includes the one asked for (ensure-at-least): nothing written.
    AlreadySatisfied { held: Permission },
}

/// What a revoke did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum RevokeResult {
    /// The explicit level was removed; nothing explicit is held now.
    Revoked,
    /// The level held before the grant was put back.
    Restored { level: Permission },
    /// Nothing explicit was held: nothing written.
    NotHeld,
    /// Another level is held (for a plain revoke: not the one named; for a
    /// restore: the previous level is still in place): left as is.
    LeftInPlace { held: Permission },
    /// Restore only: the level is no longer the one granted (someone changed
    /// or removed it since): left as is.
    ChangedExternally { held: Option<Permission> },
}

/// What the store refresh after a change did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "store", rename_all = "snake_case")]
pub enum StoreRefresh {
    /// The resource's grants were replaced with a fresh read.
    Refreshed { connector: String, grants: usize },
    /// Not refreshed (the resource was never synced, or the store failed);
    /// the next full sync brings it up to date.
    Skipped { connector: String, reason: String },
}

/// The result of [`Provisioner::grant`]: everything a status or Event needs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GrantOutcome {
    #[serde(flatten)]
    pub result: GrantResult,
    /// The level asked for.
    pub permission: Permission,
    pub mode: GrantMode,
    /// The explicit level held before this grant (`None`: nothing). For
    /// group targets, `Some(Member)` when already a member.
    pub previous: Option<Permission>,
    /// The explicit level held now.
    pub current: Option<Permission>,
    pub principal: ResolvedPrincipal,
    pub target: ResolvedTarget,
    /// Set when a store is attached and something was written.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub store: Option<StoreRefresh>,
}

impl GrantOutcome {
    /// True when Bitbucket was changed.
    pub fn changed(&self) -> bool {
        self.result == GrantResult::Granted
    }

    /// One line for people (CLI output, Event message).
    pub fn message(&self) -> String {
        let (p, t, level) = (&self.principal, &self.target, self.permission);
        match self.result {
            GrantResult::Granted => {
                let previously = match self.previous {
                    Some(prev) => format!(" (previously {prev})"),
                    None if t.kind == TargetKind::Group => String::new(),
                    None => " (previously nothing)".to_owned(),
                };
                format!("granted {level} on {t} to {p}{previously}")
            }
            GrantResult::AlreadyHeld => format!("already held: {p} has {level} on {t}; nothing changed"),
            GrantResult::AlreadySatisfied { held } => {
                format!("already satisfied: {p} holds {held} on {t}, which includes {level}; nothing changed")
            }
        }
    }
}

/// The result of [`Provisioner::revoke`] / [`Provisioner::revoke_and_restore`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RevokeOutcome {
    #[serde(flatten)]
    pub result: RevokeResult,
    /// The level revoked (the one granted, for a restore).
    pub permission: Permission,
    /// For a restore: the level to put back (`None`: nothing was held).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub restore: Option<Option<Permission>>,
    /// The explicit level held before this call.
    pub previous: Option<Permission>,
    /// The explicit level held now.
    pub current: Option<Permission>,
    pub principal: ResolvedPrincipal,
    pub target: ResolvedTarget,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub store: Option<StoreRefresh>,
}

impl RevokeOutcome {
    /// True when Bitbucket was changed.
    pub fn changed(&self) -> bool {
        matches!(self.result, RevokeResult::Revoked | RevokeResult::Restored { .. })
    }

    /// One line for people (CLI output, Event message).
    pub fn message(&self) -> String {
        let (p, t, level) = (&self.principal, &self.target, self.permission);
        match self.result {
            RevokeResult::Revoked => format!("revoked {level} on {t} from {p}"),
            RevokeResult::Restored { level: restored } => {
                format!("revoked {level} on {t} from {p} and restored the previous level {restored}")
            }
            RevokeResult::NotHeld => format!("not held: {p} has no explicit {level} on {t}; nothing changed"),
            RevokeResult::LeftInPlace { held } if self.restore.is_some() => {
                format!("left {held} in place: {p} held {held} on {t} before the grant; nothing changed")
            }
            RevokeResult::LeftInPlace { held } => {
                format!("left {held} in place: revoking {level} from a holder of {held} changes nothing ({p} on {t})")
            }
            RevokeResult::ChangedExternally { held } => {
                let now = held.map(|h| h.to_string()).unwrap_or_else(|| "nothing".to_owned());
                format!(
                    "changed externally: {p} now holds {now} on {t}, not the granted {level}; left as is, previous \
                     level not restored"
                )
            }
        }
    }
}

/// The current explicit level of a principal on a target
/// ([`Provisioner::inspect`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Held {
    pub principal: ResolvedPrincipal,
    pub target: ResolvedTarget,
    pub level: Option<Permission>,
}

/// Why a grant or revoke failed. [`ProvisionError::reason`] is the
/// condition reason.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ProvisionError {
    /// Provisioning is not enabled for this connector (or CLI run).
    #[error(
        "provisioning is disabled: set BATON_PROVISIONING=true (or spec.provisioning.enabled: true; the CLI also takes \
         --allow-provisioning)"
    )]
    ProvisioningDisabled,
    /// The principal group does not exist in the workspace.
    #[error("{principal} not found in workspace {workspace}")]
    PrincipalNotFound { principal: String, workspace: String },
    /// The user is not a member of the workspace (or does not exist).
    #[error(
        "user {user} is not a member of workspace {workspace}: only workspace members can be given access; invite \
         them in Bitbucket first"
    )]
    NotWorkspaceMember { user: String, workspace: String },
    /// The workspace, group, project or repository does not exist or is not visible.
    #[error("{target} not found or not visible to these credentials")]
    TargetNotFound { target: String },
    /// This access cannot be provisioned through the Bitbucket API.
    #[error("not provisionable: {message}")]
    NotProvisionable { message: String },
    /// The permission does not fit the target.
    #[error("invalid permission {permission}: {message}")]
    InvalidPermission { permission: Permission, message: String },
    /// The request itself is malformed (no principal, two targets, ...).
    #[error("invalid request: {message}")]
    InvalidRequest { message: String },
    /// Bitbucket refused the change (400/402/409): a workspace owner's
    /// permissions, the plan's user limit, ...
    #[error("Bitbucket refused the change: {0}")]
    Conflict(ApiError),
    /// 401: the credentials were rejected.
    #[error("credentials rejected: {0}")]
    InvalidCredentials(ApiError),
    /// 403: not allowed (not an admin, missing scopes, or a credential type
    /// that cannot write permissions: only API tokens can).
    #[error(
        "not allowed: {0} (permission writes need an API token (email + token) of a workspace admin with \
         admin:project, admin:repository, write:permission and delete:permission scopes)"
    )]
    Forbidden(ApiError),
    /// 5xx or transport failures beyond the retry budget.
    #[error("Bitbucket unavailable: {0}")]
    BitbucketUnavailable(ApiError),
    /// Throttled beyond the retry budget.
    #[error("rate limited: {0}")]
    RateLimited(ApiError),
    /// Anything else Bitbucket answered.
    #[error("{0}")]
    Api(ApiError),
    /// This replica no longer holds the leader lease ([`Fence`]): the write
    /// was not made. Not a Bitbucket failure; the new leader carries on.
    #[error("this replica no longer holds the leader lease: the Bitbucket write was not made")]
    LeaseLost,
    /// The [`WriteGate`] refused (the intent could not be recorded, or the
    /// reconcile was stopped): the write was not made.
    #[error("the Bitbucket write was not made: {message}")]
    Aborted { message: String },
}

impl ProvisionError {
    /// The condition reason (CamelCase).
    pub fn reason(&self) -> &'static str {
        match self {
            ProvisionError::ProvisioningDisabled => "ProvisioningDisabled",
            ProvisionError::PrincipalNotFound { .. } => "PrincipalNotFound",
            ProvisionError::NotWorkspaceMember { .. } => "NotWorkspaceMember",
            ProvisionError::TargetNotFound { .. } => "TargetNotFound",
            ProvisionError::NotProvisionable { .. } => "NotProvisionable",
            ProvisionError::InvalidPermission { .. } => "InvalidPermission",
            ProvisionError::InvalidRequest { .. } => "InvalidSpec",
            ProvisionError::Conflict(_) => "Conflict",
            ProvisionError::InvalidCredentials(_) => "InvalidCredentials",
            ProvisionError::Forbidden(_) => "Forbidden",
            ProvisionError::BitbucketUnavailable(_) => "BitbucketUnavailable",
            ProvisionError::RateLimited(_) => "RateLimited",
            ProvisionError::Api(_) | ProvisionError::Aborted { .. } => "GrantFailed",
            ProvisionError::LeaseLost => "LeaseLost",
        }
    }

    /// Failures that retrying with the same spec and settings will not fix
    /// (the controller marks these Stalled instead of requeueing quickly).
    pub fn is_permanent(&self) -> bool {
        !matches!(
            self,
            ProvisionError::BitbucketUnavailable(_)
                | ProvisionError::RateLimited(_)
                | ProvisionError::Api(_)
                | ProvisionError::LeaseLost
                | ProvisionError::Aborted { .. }
        )
    }

    /// The CLI exit code (see the module docs).
    pub fn exit_code(&self) -> u8 {
        match self {
            ProvisionError::Conflict(_)
            | ProvisionError::Api(_)
            | ProvisionError::LeaseLost
            | ProvisionError::Aborted { .. } => 1,
            ProvisionError::InvalidPermission { .. } | ProvisionError::InvalidRequest { .. } => 2,
            ProvisionError::InvalidCredentials(_) | ProvisionError::Forbidden(_) => 3,
            ProvisionError::PrincipalNotFound { .. }
            | ProvisionError::NotWorkspaceMember { .. }
            | ProvisionError::TargetNotFound { .. } => 4,
            ProvisionError::BitbucketUnavailable(_) | ProvisionError::RateLimited(_) => 5,
            ProvisionError::ProvisioningDisabled | ProvisionError::NotProvisionable { .. } => 6,
        }
    }
}

impl From<ApiError> for ProvisionError {
    fn from(err: ApiError) -> Self {
        use crate::bitbucket::ErrorKind;
        match err.kind {
            ErrorKind::Unauthorized => ProvisionError::InvalidCredentials(err),
            ErrorKind::Forbidden => ProvisionError::Forbidden(err),
            ErrorKind::RateLimited => ProvisionError::RateLimited(err),
            ErrorKind::Server | ErrorKind::Transport => ProvisionError::BitbucketUnavailable(err),
            ErrorKind::BadRequest | ErrorKind::PaymentRequired | ErrorKind::Conflict => ProvisionError::Conflict(err),
            _ => ProvisionError::Api(err),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_highest_overlapping_level_wins() {
        assert_eq!(effective_level(&[]), None);
        assert_eq!(
            effective_level(&[Permission::Write, Permission::Admin, Permission::Read]),
            Some(Permission::Admin)
        );
        assert_eq!(
            effective_level(&[Permission::CreateRepo, Permission::Write]),
            Some(Permission::CreateRepo)
        );
        assert_eq!(effective_level(&[Permission::Member]), Some(Permission::Member));
    }

    #[test]
    fn ending_one_of_overlapping_grants_restores_the_other() {
        // read before; grants of write (A) and admin (B) overlap.
        let before = Some(Permission::Read);
        assert_eq!(level_to_restore(before, &[Permission::Write]), Some(Permission::Write));
        assert_eq!(level_to_restore(before, &[Permission::Admin]), Some(Permission::Admin));
        assert_eq!(level_to_restore(before, &[]), before);
        assert_eq!(level_to_restore(None, &[]), None);
    }

    #[test]
    fn levels_parse_from_bitbucket_slugs() {
        assert_eq!(parse_level("none"), Ok(None));
        assert_eq!(parse_level("create-repo"), Ok(Some(Permission::CreateRepo)));
        assert_eq!(parse_level("Admin"), Ok(Some(Permission::Admin)));
        assert!(parse_level("owner").is_err());
    }

    #[test]
    fn permissions_must_fit_the_target() {
        let user = || PrincipalRef::User("jdoe".into());
        let req = |target, permission| AccessRequest::new("acme", user(), target, permission);
        assert!(
            req(TargetRef::Project("P".into()), Permission::CreateRepo)
                .validate()
                .is_ok()
        );
        assert!(
            req(TargetRef::Repository("r".into()), Permission::Admin)
                .validate()
                .is_ok()
        );
        assert!(req(TargetRef::Group("g".into()), Permission::Member).validate().is_ok());
        for (target, permission) in [
            (TargetRef::Repository("r".into()), Permission::CreateRepo),
            (TargetRef::Repository("r".into()), Permission::Member),
            (TargetRef::Project("P".into()), Permission::Member),
            (TargetRef::Group("g".into()), Permission::Admin),
        ] {
            let err = req(target, permission).validate().unwrap_err();
            assert_eq!(err.reason(), "InvalidPermission", "{err}");
        }
        let err = req(TargetRef::Workspace, Permission::Member).validate().unwrap_err();
        assert_eq!(err.reason(), "NotProvisionable");
        let group_in_group = AccessRequest::new(
            "acme",
            PrincipalRef::Group("devs".into()),
            TargetRef::Group("ops".into()),
            Permission::Member,
        );
        assert_eq!(group_in_group.validate().unwrap_err().reason(), "NotProvisionable");
    }
}
