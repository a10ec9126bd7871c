//! `BitbucketConnector`: one Bitbucket Cloud credential (a Secret in the same
//! namespace) whose workspaces the operator keeps in its inventory.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::model::SyncKind;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

/// Default sync interval when `spec.interval` is not set.
pub const DEFAULT_INTERVAL: &str = "1h";

fn default_interval() -> Option<String> {
    Some(DEFAULT_INTERVAL.to_owned())
}
fn default_true() -> bool {
    true
}
fn default_requests_per_hour() -> u32 {
    1000
}
fn default_max_in_flight() -> u32 {
    4
}

/// A connection to Bitbucket Cloud: the operator reads the credentials from a
/// Secret in the same namespace and keeps an inventory of accounts,
/// workspaces, groups, projects, repositories and every permission linking
/// them, in its embedded store. Status reports progress (`Syncing`, then
/// `Connected`) and health (`Ready`).
// kube(printcolumn(...)) repeats `type_ = ...` by design.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "connectors.dev",
    version = "v1alpha1",
    kind = "BitbucketConnector",
    namespaced,
    shortname = "bbc",
    category = "connectors",
    status = "BitbucketConnectorStatus",
    doc = "BitbucketConnector connects the operator to Bitbucket Cloud with the credentials of a Secret in the same namespace and keeps an inventory of who can access what.",
    printcolumn(
        name = "State",
        type_ = "string",
        json_path = ".status.state",
        description = "Pending, Syncing, Connected, Error or Suspended"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status",
        description = "Ready condition"
    ),
    printcolumn(
        name = "Last Sync",
        type_ = "date",
        json_path = ".status.lastSyncTime",
        description = "End of the last successful sync"
    ),
    printcolumn(
        name = "Progress",
        type_ = "string",
        json_path = ".status.progress.summary",
        description = "The sync run with the most work left: type done/total (percent), and how many more run"
    ),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct BitbucketConnectorSpec {
    /// The Secret holding the Bitbucket credentials (baton-bitbucket's format:
    /// BATON_USERNAME, BATON_APP_PASSWORD, ...). It must be in the same
    /// namespace as this resource: a connector can never read another
    /// namespace's Secret. Changes to the Secret take effect without restart.
    pub secret_ref: SecretRef,

    /// Overrides of the key names read from the Secret. Unset keys use
    /// baton-bitbucket's names (BATON_USERNAME, BATON_APP_PASSWORD, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_keys: Option<SecretKeys>,

    /// Workspace slugs to inventory. Overrides the Secret's BATON_WORKSPACES.
    /// When neither is set, every workspace the credential administers is
    /// synced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(max = 100),
        inner(regex(pattern = r"^[a-z0-9][a-z0-9_.-]*$"), length(min = 1, max = 62))
    )]
    pub workspaces: Option<Vec<String>>,

    /// Whether this connector grants access (BitbucketAccessGrant), and the
    /// policy every grant must satisfy. An object (the boolean form of
    /// earlier versions is refused). Absent: provisioning follows the
    /// Secret's BATON_PROVISIONING, under the default policy (grants of read
    /// or write, for at most 168h, only from this namespace). The Secret's
    /// explicit BATON_PROVISIONING=false is a veto that `enabled: true`
    /// cannot override. Revokes and expiries run whatever this says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provisioning: Option<ProvisioningPolicy>,

    /// Stop every sync loop and provisioning action. Data already synced is
    /// kept and still served. Set back to false to resume.
    #[serde(default)]
    pub suspend: bool,

    /// Default interval between two syncs of a resource type, as a Go
    /// duration (for example 30m, 1h, 2h30m). At least 1m. Default 1h.
    #[serde(default = "default_interval", skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$"), length(max = 32))]
    #[x_kube(validation = kube::core::Rule::new("duration(self) >= duration('1m')").message("interval must be at least 1m"))]
    pub interval: Option<String>,

    /// Per-resource-type overrides: each type (accounts, workspaces, groups,
    /// projects, repositories) syncs in its own loop, on its own interval,
    /// and can be turned off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceLoops>,

    /// Request pacing for this connector's credential. Bitbucket Cloud allows
    /// 1,000 requests per hour per credential; connectors sharing a
    /// credential share one budget.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,

    /// Base URL of the Bitbucket Cloud API, for tests and proxies. Default
    /// https://api.bitbucket.org.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^https?://"), length(max = 2048))]
    pub api_url: Option<String>,

    /// Rotation of the ConductorOne client credential (BATON_CLIENT_ID /
    /// BATON_CLIENT_SECRET): ConductorOne issues a new pair, the operator
    /// stores it in its own Secret (never the user's), proves it, switches
    /// the session to it and only then revokes the old credential. Triggers:
    /// `schedule`, `beforeExpiry`, and the annotation
    /// connectors.dev/rotate-requested-at. `suspend` pauses it.
    pub credential_rotation: Option<CredentialRotation>,

    /// Connect this connector to ConductorOne in service mode, with the
    /// client credential in the Secret (BATON_CLIENT_ID /
    /// BATON_CLIENT_SECRET). Only the leader runs the session.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conductor_one: Option<ConductorOneSpec>,
}

/// The ConductorOne service-mode session of a connector.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ConductorOneSpec {
    /// Run the session. Default: on when the Secret holds both
    /// BATON_CLIENT_ID and BATON_CLIENT_SECRET.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    /// host[:port] to send requests to instead of the tenant host of the
    /// client id (proxies, private tenants). It must be on the
    /// administrator's allow-list (--allowed-conductorone-urls).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[A-Za-z0-9.\[\]:-]+$"), length(min = 1, max = 261))]
    pub api_host: Option<String>,
    /// PEM certificates trusted in addition to the public roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 65536))]
    pub ca_bundle: Option<String>,
    /// Resource types whose data is older than this are synced again before
    /// an upload: 90s, 30m, 1h, 2d, or 0 to always sync. Default 1h.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9]{1,9}(s|m|h|d)?$"))]
    pub max_snapshot_age: Option<String>,
}

impl ConductorOneSpec {
    /// `maxSnapshotAge`, default one hour.
    pub fn max_snapshot_age(&self) -> Result<Duration, String> {
        match &self.max_snapshot_age {
            None => Ok(Duration::from_secs(3600)),
            Some(age) => {
                crate::conductorone::parse_age(age).map_err(|e| format!("spec.conductorOne.maxSnapshotAge: {e}"))
            }
        }
    }
}

/// Default `spec.provisioning.maxDuration`: one week.
pub const DEFAULT_MAX_GRANT_DURATION: &str = "168h";

fn default_max_grant_duration() -> String {
    DEFAULT_MAX_GRANT_DURATION.to_owned()
}

fn default_allowed_permissions() -> Vec<crate::model::Permission> {
    vec![crate::model::Permission::Read, crate::model::Permission::Write]
}

/// `spec.provisioning`: the switch and the policy of this connector's
/// grants, owned by whoever may edit the connector (not by those who create
/// grants). A grant outside it is `Denied` with the rule it broke and
/// nothing is written to Bitbucket. The defaults are the safe side: a
/// maximum of a week, an expiry required, no `admin`, `create-repo` or
/// group membership unless listed, only the connector's workspaces, only
/// grants from the connector's own namespace. The policy is checked when a
/// grant is made; tightening it later does not revoke held grants (they end
/// at their expiry, which the maximum bounded).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ProvisioningPolicy {
    /// Grant access through this connector. Absent: the Secret's
    /// BATON_PROVISIONING decides (off when that is absent too). The
    /// Secret's explicit `false` wins over `true` here (a veto, reported as
    /// ProvisioningConflict on the connector's `Provisioning` condition).
    /// Disabling stops new grants only: held grants still expire and are
    /// revoked on deletion.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    /// Longest access a grant may ask for, as a Go duration (at least 1m).
    /// A `duration` above it, or an `expiresAt` further than this from the
    /// grant's creation, is denied (DurationExceedsMaximum). Default 168h.
    #[serde(default = "default_max_grant_duration")]
    #[schemars(regex(pattern = r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$"), length(max = 32))]
    #[x_kube(validation = kube::core::Rule::new("duration(self) >= duration('1m')").message("provisioning.maxDuration must be at least 1m"))]
    pub max_duration: String,
    /// Every grant must set `duration` or `expiresAt` (DurationRequired).
    /// Default true; false allows grants that last until deleted.
    #[serde(default = "default_true")]
    pub require_duration: bool,
    /// Permissions a grant may ask for (PermissionNotAllowed). Default
    /// [read, write]: `admin`, `create-repo` and `member` (group membership,
    /// which carries whatever the group may do) are opt-in.
    #[serde(default = "default_allowed_permissions")]
    #[schemars(length(max = 5))]
    pub allowed_permissions: Vec<crate::model::Permission>,
    /// Workspace slugs a grant may target (WorkspaceNotAllowed). Default:
    /// the connector's workspaces (spec.workspaces, else the Secret's
    /// BATON_WORKSPACES); when those are empty too, every workspace the
    /// credential can reach.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(max = 100),
        inner(regex(pattern = r"^[a-z0-9][a-z0-9_.-]*$"), length(min = 1, max = 62))
    )]
    pub allowed_workspaces: Option<Vec<String>>,
    /// Name patterns of the targets a grant may name, per kind
    /// (TargetNotAllowed). Absent: every target. Present: a kind not listed
    /// allows no target of that kind.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed_targets: Option<AllowedTargets>,
    /// Other namespaces whose BitbucketAccessGrants may use this connector
    /// (their `spec.connectorRef.namespace` names this connector's
    /// namespace), like the Gateway API's ReferenceGrant. The connector's
    /// own namespace is always allowed. Default: none. The operator only
    /// sees the namespaces it watches (chart value watchNamespaces).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = 100),
        inner(regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"), length(min = 1, max = 63))
    )]
    pub grant_namespaces: Vec<String>,
}

impl Default for ProvisioningPolicy {
    fn default() -> Self {
        ProvisioningPolicy {
            enabled: None,
            max_duration: default_max_grant_duration(),
            require_duration: true,
            allowed_permissions: default_allowed_permissions(),
            allowed_workspaces: None,
            allowed_targets: None,
            grant_namespaces: Vec::new(),
        }
    }
}

/// Name patterns per target kind, each `<workspace>/<name>` where `*`
/// matches any run of characters (for example `acme/api-*`, `acme/PRJ*`,
/// `*/*`). Matching ignores ASCII case, as Bitbucket does for slugs and keys.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct AllowedTargets {
    /// Repository patterns, `<workspace>/<repository slug>`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = 100),
        inner(regex(pattern = r"^[A-Za-z0-9_.*-]+/[A-Za-z0-9_.*-]+$"), length(max = 256))
    )]
    pub repositories: Vec<String>,
    /// Project patterns, `<workspace>/<project key>`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = 100),
        inner(regex(pattern = r"^[A-Za-z0-9_.*-]+/[A-Za-z0-9_.*-]+$"), length(max = 256))
    )]
    pub projects: Vec<String>,
    /// Workspace group patterns, `<workspace>/<group slug>`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = 100),
        inner(regex(pattern = r"^[A-Za-z0-9_.*-]+/[A-Za-z0-9_.*-]+$"), length(max = 256))
    )]
    pub groups: Vec<String>,
}

/// Reference to a Secret in the same namespace.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct SecretRef {
    /// Name of the Secret, in this resource's namespace.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

pub use crate::settings::SecretKeys;

/// Per-resource-type sync settings. Only these five names are accepted.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ResourceLoops {
    /// Bitbucket user accounts (workspace members).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accounts: Option<ResourceLoop>,
    /// Workspaces and their members and owners.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workspaces: Option<ResourceLoop>,
    /// Workspace user groups and their members.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub groups: Option<ResourceLoop>,
    /// Projects and their user and group permissions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub projects: Option<ResourceLoop>,
    /// Repositories and their user and group permissions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repositories: Option<ResourceLoop>,
}

/// Sync settings of one resource type.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ResourceLoop {
    /// Interval between two syncs of this type, as a Go duration (at least
    /// 1m). Default: the connector's spec.interval.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$"), length(max = 32))]
    #[x_kube(validation = kube::core::Rule::new("duration(self) >= duration('1m')").message("interval must be at least 1m"))]
    pub interval: Option<String>,
    /// Sync this type. Default true. Turning it off keeps its last data.
    #[serde(default = "default_true")]
    pub enabled: bool,
}

impl Default for ResourceLoop {
    fn default() -> Self {
        Self {
            interval: None,
            enabled: true,
        }
    }
}

/// Request pacing.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct RateLimit {
    /// Requests per rolling hour for this credential (Bitbucket Cloud's limit
    /// is 1,000). Default 1000.
    #[serde(default = "default_requests_per_hour")]
    #[schemars(extend("format" = "int32", "minimum" = 1, "maximum" = 100000))]
    pub requests_per_hour: u32,
    /// Requests in flight at once for this connector. Default 4.
    #[serde(default = "default_max_in_flight")]
    #[schemars(extend("format" = "int32", "minimum" = 1, "maximum" = 64))]
    pub max_in_flight: u32,
}

impl Default for RateLimit {
    fn default() -> Self {
        Self {
            requests_per_hour: default_requests_per_hour(),
            max_in_flight: default_max_in_flight(),
        }
    }
}

/// Rotation of the ConductorOne client credential (see the README,
/// "Credential rotation").
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct CredentialRotation {
    /// Set to false to stop starting rotations (one in progress is still
    /// finished or rolled back). Default true.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    /// A Secret in this namespace with a ConductorOne API key
    /// (BATON_CLIENT_ID / BATON_CLIENT_SECRET of a personal or service
    /// client allowed to manage this connector) that calls the credential
    /// API. Without it the connector's own credential calls it; if
    /// ConductorOne refuses, the status says RotationNotAuthorized.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key_secret_ref: Option<SecretRef>,
    /// The ConductorOne app the connector belongs to.
    #[schemars(length(min = 1, max = 128))]
    pub app_id: String,
    /// The ConductorOne connector whose credential is rotated.
    #[schemars(length(min = 1, max = 128))]
    pub connector_id: String,
    /// ConductorOne's id of the credential in the Secret (shown next to it in
    /// ConductorOne), needed to revoke it after the first rotation; later
    /// rotations use the id the operator recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 128))]
    pub credential_id: Option<String>,
    /// The operator-owned Secret the rotated pair is written to. Default
    /// `<connector name>-conductorone`. Never the Secret of spec.secretRef.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"), length(min = 1, max = 253))]
    pub target_secret_name: Option<String>,
    /// Rotate this long after the last rotation, as a Go duration (at least
    /// 1h, for example 720h). Unset: no scheduled rotation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$"), length(max = 32))]
    #[x_kube(validation = kube::core::Rule::new("duration(self) >= duration('1h')").message("credentialRotation.schedule must be at least 1h"))]
    pub schedule: Option<String>,
    /// Rotate when the credential's expiresTime (read with GetCredentials)
    /// is this close, as a Go duration (for example 72h).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$"), length(max = 32))]
    pub before_expiry: Option<String>,
}

impl CredentialRotation {
    /// Whether new rotations may start.
    pub fn is_enabled(&self) -> bool {
        self.enabled.unwrap_or(true)
    }

    /// The operator-owned Secret of connector `name`.
    pub fn target_secret(&self, name: &str) -> String {
        self.target_secret_name
            .clone()
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| format!("{name}-conductorone"))
    }

    /// `schedule` parsed.
    pub fn schedule(&self) -> anyhow::Result<Option<Duration>> {
        self.schedule.as_deref().map(super::parse_duration).transpose()
    }

    /// `beforeExpiry` parsed.
    pub fn before_expiry(&self) -> anyhow::Result<Option<Duration>> {
        self.before_expiry.as_deref().map(super::parse_duration).transpose()
    }
}

/// What the last credential rotation did. Never holds a secret.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct CredentialRotationStatus {
    /// ConductorOne's id of the credential in use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential_id: Option<String>,
    /// When the credential in use expires, if it does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_time: Option<Time>,
    /// When the operator last rotated the credential.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_rotation_time: Option<Time>,
    /// When the next scheduled or expiry-driven rotation is due.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_rotation_time: Option<Time>,
    /// Short hash of the pair in use (never the secret).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<String>,
    /// The last connectors.dev/rotate-requested-at value handled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_handled_rotate_at: Option<String>,
    /// The step a rotation in progress reached (rotate, prove, promote,
    /// revoke-old, record, revoke-new).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<String>,
}

/// Observed state of a BitbucketConnector.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct BitbucketConnectorStatus {
    /// The metadata.generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Conditions: Connected, Syncing, Ready, and (kstatus, only while True)
    /// Reconciling and Stalled.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = kube::core::ListMerge::Map(vec!["type".to_owned()]))]
    pub conditions: Vec<Condition>,
    /// One word for people: Pending, Syncing, Connected, Error or Suspended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    /// When the last successful sync of every enabled resource type ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_sync_time: Option<Time>,
    /// Per-resource-type sync status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceStatuses>,
    /// The credentials in use (a fingerprint, never the secret) and rotation times.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials: Option<CredentialStatus>,
    /// The last reconcile.fluxcd.io/requestedAt annotation value handled
    /// (each new value triggers a full sync).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_handled_reconcile_at: Option<String>,
    /// The ConductorOne session (only when ConductorOne is configured).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conductor_one: Option<ConductorOneStatus>,
    /// The ConductorOne credential rotation (only with spec.credentialRotation).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential_rotation: Option<CredentialRotationStatus>,
    /// Live progress of the sync runs in progress; absent while none runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<SyncProgress>,
}

/// What the ConductorOne session did last. Never holds a secret.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ConductorOneStatus {
    /// The host id sent to ConductorOne (shown there for this connector).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_id: Option<String>,
    /// The last task ConductorOne gave this connector.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_task: Option<ConductorOneTask>,
    /// The last snapshot (c1z) uploaded to ConductorOne.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_upload: Option<ConductorOneUpload>,
    /// Tasks handled since the session started, per task type.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub task_counts: BTreeMap<String, ConductorOneTaskCounts>,
}

/// The last task ConductorOne gave this connector.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ConductorOneTask {
    /// hello, sync_full, grant, revoke or unsupported.
    #[serde(rename = "type")]
    pub type_: String,
    /// ConductorOne's task id.
    pub id: String,
    /// succeeded, failed, cancelled or dropped.
    pub result: String,
    /// One line: what was done, or why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// When the task ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<Time>,
}

/// The last c1z uploaded to ConductorOne.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ConductorOneUpload {
    /// When the upload finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<Time>,
    /// Size of the uploaded c1z file.
    pub bytes: i64,
    /// Resources in the uploaded snapshot.
    pub resources: i64,
}

/// Tasks of one type, by outcome.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ConductorOneTaskCounts {
    /// Tasks that succeeded.
    pub succeeded: i64,
    /// Tasks that failed, were cancelled or dropped.
    pub failed: i64,
}

/// One optional entry per resource type: the shape `status.resources` and
/// `status.progress` share, indexed by [`SyncKind`].
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PerKind<T> {
    /// User accounts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accounts: Option<T>,
    /// Workspaces.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workspaces: Option<T>,
    /// User groups.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub groups: Option<T>,
    /// Projects.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub projects: Option<T>,
    /// Repositories.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repositories: Option<T>,
}

impl<T> Default for PerKind<T> {
    fn default() -> Self {
        PerKind {
            accounts: None,
            workspaces: None,
            groups: None,
            projects: None,
            repositories: None,
        }
    }
}

impl<T> PerKind<T> {
    /// The slot of one resource type.
    pub fn get_mut(&mut self, t: SyncKind) -> &mut Option<T> {
        match t {
            SyncKind::Accounts => &mut self.accounts,
            SyncKind::Workspaces => &mut self.workspaces,
            SyncKind::Groups => &mut self.groups,
            SyncKind::Projects => &mut self.projects,
            SyncKind::Repositories => &mut self.repositories,
        }
    }

    /// The entry of one resource type, if any.
    pub fn get(&self, t: SyncKind) -> Option<&T> {
        match t {
            SyncKind::Accounts => self.accounts.as_ref(),
            SyncKind::Workspaces => self.workspaces.as_ref(),
            SyncKind::Groups => self.groups.as_ref(),
            SyncKind::Projects => self.projects.as_ref(),
            SyncKind::Repositories => self.repositories.as_ref(),
        }
    }

    /// The types with an entry, in type order.
    pub fn kinds(&self) -> Vec<SyncKind> {
        SyncKind::ALL.into_iter().filter(|k| self.get(*k).is_some()).collect()
    }
}

/// Sync status of each resource type.
pub type ResourceStatuses = PerKind<ResourceSyncStatus>;

/// Sync status of one resource type.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ResourceSyncStatus {
    /// Number of resources of this type in the current snapshot.
    #[serde(default)]
    pub count: i64,
    /// When the last sync run started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_sync_start: Option<Time>,
    /// When the last sync run ended (successfully or not).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_sync_end: Option<Time>,
    /// Duration of the last sync run, in seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_seconds: Option<f64>,
    /// Bitbucket API requests made by the last sync run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests: Option<i64>,
    /// Error of the last run, if it failed (the previous data is kept).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// When the last successful run ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_success: Option<Time>,
}

/// Credentials in use.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct CredentialStatus {
    /// Short hash identifying the credentials in use (never the secret
    /// itself); it changes when the Secret's credentials change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<String>,
    /// When the operator last saw the credentials change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_changed: Option<Time>,
}

/// Progress of the sync runs in progress. Figures are refreshed at most
/// every 30 seconds (a type starting or ending shows at once), so a long sync
/// does not turn into a stream of status writes.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct SyncProgress {
    /// One line for `kubectl get` (the Progress column): the running type
    /// with the most work left, as `repositories 1200/5000 (24%)`, then
    /// `+N more` when other types run too and `waiting for budget` while the
    /// hourly request budget is spent.
    pub summary: String,
    /// When these figures were taken.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_update_time: Option<Time>,
    /// Progress per running type.
    #[serde(flatten)]
    pub types: PerKind<TypeProgress>,
}

/// Progress of one resource type's run.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct TypeProgress {
    /// Starting (finding its work: workspaces, listings), Syncing, or
    /// WaitingForBudget (the hourly request budget is spent).
    pub phase: String,
    /// Units of work done: per workspace for accounts, workspaces and
    /// groups; per project or repository (its permissions) for the others.
    pub done: i64,
    /// Units known so far; grows while listings are read.
    pub total: i64,
    /// Units taken over from an interrupted run instead of read again.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub resumed: i64,
    /// When the run should end, at the pace of the units done so far.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub estimated_completion_time: Option<Time>,
    /// Requests wait for the hourly budget until then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting_for_budget_until: Option<Time>,
}

fn is_zero(n: &i64) -> bool {
    *n == 0
}

impl BitbucketConnectorSpec {
    /// The Secret key names in effect.
    pub fn secret_keys(&self) -> SecretKeys {
        self.secret_keys.clone().unwrap_or_default()
    }

    /// The per-type settings given in the spec, if any.
    pub fn resource_loop(&self, t: SyncKind) -> Option<&ResourceLoop> {
        let r = self.resources.as_ref()?;
        match t {
            SyncKind::Accounts => r.accounts.as_ref(),
            SyncKind::Workspaces => r.workspaces.as_ref(),
            SyncKind::Groups => r.groups.as_ref(),
            SyncKind::Projects => r.projects.as_ref(),
            SyncKind::Repositories => r.repositories.as_ref(),
        }
    }

    /// Whether the loop of `t` runs (default true).
    pub fn is_enabled(&self, t: SyncKind) -> bool {
        self.resource_loop(t).is_none_or(|l| l.enabled)
    }

    /// The default interval (spec.interval, else 1h).
    pub fn default_interval(&self) -> anyhow::Result<Duration> {
        super::parse_duration(self.interval.as_deref().unwrap_or(DEFAULT_INTERVAL))
    }

    /// The interval of `t`: its override, else spec.interval, else 1h.
    pub fn interval_for(&self, t: SyncKind) -> anyhow::Result<Duration> {
        match self.resource_loop(t).and_then(|l| l.interval.as_deref()) {
            Some(s) => super::parse_duration(s),
            None => self.default_interval(),
        }
    }

    /// Effective rate-limit settings.
    pub fn rate_limit(&self) -> RateLimit {
        self.rate_limit.clone().unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_connector_deserialises() {
        let text = include_str!("../../examples/connector.yaml");
        let c: BitbucketConnector = serde_yaml::from_str(text).expect("examples/connector.yaml");
        assert_eq!(c.spec.secret_ref.name, "bitbucket-credentials");
        assert!(!c.spec.suspend);
        assert!(c.spec.default_interval().unwrap() >= Duration::from_secs(60));
        for t in SyncKind::ALL {
            c.spec.interval_for(t).unwrap();
        }
        assert_eq!(c.spec.secret_keys().username(), crate::settings::secret_key::USERNAME);
    }

    #[test]
    fn defaults_apply_when_fields_are_missing() {
        let spec: BitbucketConnectorSpec =
            serde_json::from_value(serde_json::json!({"secretRef": {"name": "s"}})).unwrap();
        assert_eq!(spec.interval.as_deref(), Some("1h"));
        assert_eq!(spec.interval_for(SyncKind::Groups).unwrap(), Duration::from_secs(3600));
        assert!(SyncKind::ALL.iter().all(|t| spec.is_enabled(*t)));
        assert_eq!(
            spec.rate_limit(),
            RateLimit {
                requests_per_hour: 1000,
                max_in_flight: 4
            }
        );
        let keys = spec.secret_keys();
        assert_eq!(keys.app_password(), "BATON_APP_PASSWORD");
        assert_eq!(keys.client_secret(), "BATON_CLIENT_SECRET");

        let spec: BitbucketConnectorSpec = serde_json::from_value(serde_json::json!({
            "secretRef": {"name": "s"},
            "interval": "30m",
            "secretKeys": {"username": "USER"},
            "resources": {"repositories": {"interval": "2h"}, "groups": {"enabled": false}}
        }))
        .unwrap();
        assert_eq!(
            spec.interval_for(SyncKind::Repositories).unwrap(),
            Duration::from_secs(7200)
        );
        assert_eq!(
            spec.interval_for(SyncKind::Accounts).unwrap(),
            Duration::from_secs(1800)
        );
        assert!(!spec.is_enabled(SyncKind::Groups));
        assert!(spec.is_enabled(SyncKind::Repositories));
        assert_eq!(spec.secret_keys().username(), "USER");
        assert_eq!(spec.secret_keys().token(), "BATON_TOKEN");
    }
}
