//! The custom resources (`connectors.dev/v1alpha1`): [`BitbucketConnector`]
//! and [`BitbucketAccessGrant`], the typed contracts of their status and
//! Events (wire enums [`ConditionStatus`], [`Reason`], [`EventReason`],
//! [`ConnectorState`], [`GrantState`]: each value spelled once, tested), the
//! pure helpers the controllers use to maintain their status conditions, and
//! the `crd` subcommand that prints the generated CustomResourceDefinitions.
//! The status fields stay strings on the wire (the schema is unchanged); the
//! controllers write them only through these enums.
//!
//! Conditions follow the Kubernetes API conventions (`metav1.Condition`, with
//! `observedGeneration`) and kstatus: `Reconciling` and `Stalled` are present
//! only while True, so Flux, Argo CD and `kubectl wait --for=condition=Ready`
//! read health correctly.

pub mod cli;
pub mod connector;
pub mod grant;

pub use connector::*;
pub use grant::*;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::CustomResourceExt;

/// API group of every custom resource of this operator.
pub const GROUP: &str = "connectors.dev";
/// API version served and stored.
pub const VERSION: &str = "v1alpha1";

/// Annotation (Flux convention) whose new value triggers an immediate full sync.
pub const RECONCILE_REQUESTED_AT_ANNOTATION: &str = "reconcile.fluxcd.io/requestedAt";
/// Annotation whose new value asks for one rotation of the ConductorOne
/// credential (acknowledged in `status.credentialRotation.lastHandledRotateAt`).
pub const ROTATE_REQUESTED_AT_ANNOTATION: &str = "connectors.dev/rotate-requested-at";

/// Finalizer on BitbucketConnector: the operator stops its loops and removes
/// its data from the store before the resource goes.
pub const CONNECTOR_FINALIZER: &str = "connectors.dev/connector-cleanup";
/// Finalizer on BitbucketAccessGrant: the operator revokes the permission (and
/// restores the previous one) before the resource goes.
pub const GRANT_FINALIZER: &str = "connectors.dev/grant-revoke";

/// Go-style duration as accepted by the API server's CEL `duration()`:
/// one or more `<number><unit>` groups, units `ns`, `us`, `µs`, `ms`, `s`, `m`, `h`.
pub const DURATION_PATTERN: &str = r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$";
/// Workspace slug.
pub const SLUG_PATTERN: &str = r"^[a-z0-9][a-z0-9_.-]*$";

/// Condition types.
pub mod condition_type {
    /// The credentials were accepted and the workspaces are reachable.
    pub const CONNECTED: &str = "Connected";
    /// True while any resource loop runs.
    pub const SYNCING: &str = "Syncing";
    /// Summary: connected and every enabled resource type has a current
    /// successful sync (connector); the permission is in place (grant).
    pub const READY: &str = "Ready";
    /// kstatus: present (True) only while the operator works towards the spec.
    pub const RECONCILING: &str = "Reconciling";
    /// kstatus: present (True) only while progress needs a human.
    pub const STALLED: &str = "Stalled";
    /// The ConductorOne session's Hello was accepted and polling works
    /// (present only when ConductorOne is configured).
    pub const CONDUCTORONE_CONNECTED: &str = "ConductorOneConnected";
    /// The last ConductorOne credential rotation and the credential's expiry
    /// (present only with `spec.credentialRotation`; not part of `Ready`).
    pub const CREDENTIALS_ROTATED: &str = "CredentialsRotated";
    /// Whether the connector grants access, and why (connector only).
    pub const PROVISIONING: &str = "Provisioning";
}

/// Declares an enum whose values have one fixed wire spelling: `as_str`
/// gives it, `parse` reads it back, `ALL` lists every value.
macro_rules! wire_enum {
    ($(#[$meta:meta])* pub enum $name:ident { $($(#[$vmeta:meta])* $variant:ident = $text:literal,)* }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$vmeta])* $variant,)*
        }

        impl $name {
            /// Every value, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant,)*];

            /// The spelling on the wire (status, Events).
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text,)*
                }
            }

            /// The value of a wire spelling, if it is one.
            pub fn parse(text: &str) -> Option<Self> {
                match text {
                    $($text => Some($name::$variant),)*
                    _ => None,
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

wire_enum! {
    /// A condition's `status` (metav1.ConditionStatus).
    pub enum ConditionStatus {
        True = "True",
        False = "False",
        /// Not known yet (the first credential check runs) or not checked (suspended).
        Unknown = "Unknown",
    }
}

impl From<bool> for ConditionStatus {
    fn from(value: bool) -> Self {
        if value {
            ConditionStatus::True
        } else {
            ConditionStatus::False
        }
    }
}

wire_enum! {
    /// Condition reasons (CamelCase, as the API conventions require). Both
    /// resources' conditions use these; `Connected=False` takes the ones
    /// DESIGN.md lists (`SecretNotFound` … `RateLimited`).
    pub enum Reason {
        SecretNotFound = "SecretNotFound",
        /// The Secret exists but lacks the opt-in label: it is not read.
        SecretNotOptedIn = "SecretNotOptedIn",
        SecretKeyMissing = "SecretKeyMissing",
        /// `spec.secretKeys` breaks the rename rule (distinct key names).
        InvalidSecretKeys = "InvalidSecretKeys",
        /// `spec.apiUrl` is not on the administrator's allow-list.
        ApiUrlNotAllowed = "ApiUrlNotAllowed",
        InvalidCredentials = "InvalidCredentials",
        InsufficientScopes = "InsufficientScopes",
        WorkspaceNotFound = "WorkspaceNotFound",
        BitbucketUnavailable = "BitbucketUnavailable",
        RateLimited = "RateLimited",
        /// The store failed during the credential check.
        StoreError = "StoreError",
        Connected = "Connected",
        SyncInProgress = "SyncInProgress",
        SyncSucceeded = "SyncSucceeded",
        SyncFailed = "SyncFailed",
        Idle = "Idle",
        Suspended = "Suspended",
        Progressing = "Progressing",
        InvalidSpec = "InvalidSpec",
        // BitbucketAccessGrant
        ConnectorNotFound = "ConnectorNotFound",
        ConnectorNotReady = "ConnectorNotReady",
        ProvisioningDisabled = "ProvisioningDisabled",
        PrincipalNotFound = "PrincipalNotFound",
        NotWorkspaceMember = "NotWorkspaceMember",
        TargetNotFound = "TargetNotFound",
        NotProvisionable = "NotProvisionable",
        InvalidPermission = "InvalidPermission",
        Conflict = "Conflict",
        Forbidden = "Forbidden",
        Granted = "Granted",
        GrantFailed = "GrantFailed",
        Expired = "Expired",
        /// The connector is being deleted: its held grants are revoked
        /// first (connector), or were (grant, state Revoked).
        RevokingGrants = "RevokingGrants",
        ConnectorDeleted = "ConnectorDeleted",
        /// The spec of a held grant changed although the request is
        /// immutable (CEL not enforced): the change is ignored.
        SpecImmutable = "SpecImmutable",
        // Grant policy (`spec.provisioning` of the connector): the rule broken.
        DurationRequired = "DurationRequired",
        DurationExceedsMaximum = "DurationExceedsMaximum",
        PermissionNotAllowed = "PermissionNotAllowed",
        WorkspaceNotAllowed = "WorkspaceNotAllowed",
        TargetNotAllowed = "TargetNotAllowed",
        NamespaceNotAllowed = "NamespaceNotAllowed",
        // Provisioning condition of a connector
        ProvisioningEnabled = "ProvisioningEnabled",
        /// The CR says enabled, the Secret's BATON_PROVISIONING=false vetoes it.
        ProvisioningConflict = "ProvisioningConflict",
        // ConductorOneConnected
        /// No Hello answered yet.
        Connecting = "Connecting",
        /// The client id or secret is malformed, or the tenant refused it.
        InvalidClientCredentials = "InvalidClientCredentials",
        /// The TLS handshake with ConductorOne failed.
        TlsError = "TLSError",
        /// ConductorOne cannot be reached.
        Unreachable = "Unreachable",
        /// ConductorOne refused Hello for another reason.
        HelloRejected = "HelloRejected",
        /// The session is not running (suspended, or the connector is unusable).
        Stopped = "Stopped",
        // CredentialsRotated
        RotationSucceeded = "RotationSucceeded",
        /// A step failed (the message names it); retried.
        RotationFailed = "RotationFailed",
        /// ConductorOne refused the caller of the credential API.
        RotationNotAuthorized = "RotationNotAuthorized",
        /// The credential in use expires within `beforeExpiry` (or 7 days).
        CredentialExpiringSoon = "CredentialExpiringSoon",
    }
}

wire_enum! {
    /// Event reasons (`events.k8s.io`): the audit trail, emitted on
    /// transitions only. Documented in the README.
    pub enum EventReason {
        // BitbucketConnector
        Connected = "Connected",
        SecretMissing = "SecretMissing",
        CredentialsRejected = "CredentialsRejected",
        CredentialsChanged = "CredentialsChanged",
        SyncFailed = "SyncFailed",
        CredentialsRotated = "CredentialsRotated",
        RotationFailed = "RotationFailed",
        RotationNotAuthorized = "RotationNotAuthorized",
        CredentialExpiringSoon = "CredentialExpiringSoon",
        ConductorOneConnected = "ConductorOneConnected",
        ConductorOneDisconnected = "ConductorOneDisconnected",
        // BitbucketAccessGrant
        Granted = "Granted",
        Revoked = "Revoked",
        Expired = "Expired",
        GrantFailed = "GrantFailed",
        ConnectorNotFound = "ConnectorNotFound",
        ConnectorNotReady = "ConnectorNotReady",
        RevokeSkipped = "RevokeSkipped",
        /// Outside the connector's policy: nothing written.
        Denied = "Denied",
        /// A connector being deleted waits for its held grants to be revoked.
        RevokingGrants = "RevokingGrants",
        /// The connector's `Provisioning` condition reports a conflict.
        ProvisioningConflict = "ProvisioningConflict",
    }
}

impl EventReason {
    /// The Event for a connector's `Connected=False` reason: the two a person
    /// most often fixes get their own name; the others keep the condition's
    /// reason.
    pub fn for_connection_failure(reason: Reason) -> &'static str {
        match reason {
            Reason::SecretNotFound => EventReason::SecretMissing.as_str(),
            Reason::InvalidCredentials => EventReason::CredentialsRejected.as_str(),
            other => other.as_str(),
        }
    }
}

wire_enum! {
    /// `status.state` of a `BitbucketConnector`: one word for people.
    pub enum ConnectorState {
        Pending = "Pending",
        Syncing = "Syncing",
        Connected = "Connected",
        Error = "Error",
        Suspended = "Suspended",
    }
}

wire_enum! {
    /// `status.state` of a `BitbucketAccessGrant`: one word for people.
    pub enum GrantState {
        Pending = "Pending",
        Granted = "Granted",
        Expired = "Expired",
        /// Its connector was deleted: the access was revoked first. Terminal.
        Revoked = "Revoked",
        Failed = "Failed",
        /// Outside the connector's policy (`spec.provisioning`); nothing was
        /// written. Looked at again when the connector changes.
        Denied = "Denied",
    }
}

/// Builds a condition stamped with the current time.
pub fn new_condition(
    type_: &str,
    status: impl Into<ConditionStatus>,
    reason: Reason,
    message: impl Into<String>,
    observed_generation: Option<i64>,
) -> Condition {
    Condition {
        type_: type_.to_owned(),
        status: status.into().as_str().to_owned(),
        reason: reason.as_str().to_owned(),
        message: message.into(),
        observed_generation,
        last_transition_time: Time(k8s_openapi::jiff::Timestamp::now()),
    }
}

/// Inserts or replaces the condition of `new.type_`. When the status does not
/// change, the existing `lastTransitionTime` is kept (reason, message and
/// observedGeneration are updated); otherwise `new`'s time is used.
pub fn set_condition(conditions: &mut Vec<Condition>, mut new: Condition) {
    match conditions.iter_mut().find(|c| c.type_ == new.type_) {
        Some(existing) => {
            if existing.status == new.status {
                new.last_transition_time = existing.last_transition_time.clone();
            }
            *existing = new;
        }
        None => conditions.push(new),
    }
}

/// Removes the condition of `type_` (used for kstatus `Reconciling`/`Stalled`,
/// which are present only while True). Returns whether one was removed.
pub fn remove_condition(conditions: &mut Vec<Condition>, type_: &str) -> bool {
    let before = conditions.len();
    conditions.retain(|c| c.type_ != type_);
    conditions.len() != before
}

/// The condition of `type_`, if present.
pub fn find_condition<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

/// The status of the condition of `type_`, if present and well-formed.
pub fn condition_status(conditions: &[Condition], type_: &str) -> Option<ConditionStatus> {
    find_condition(conditions, type_).and_then(|c| ConditionStatus::parse(&c.status))
}

/// Whether the condition of `type_` is present with status `True`.
pub fn is_condition_true(conditions: &[Condition], type_: &str) -> bool {
    condition_status(conditions, type_) == Some(ConditionStatus::True)
}

/// Parses a Go-style duration (`90s`, `1h30m`) as used by `interval`,
/// `duration` and the rotation settings.
pub fn parse_duration(s: &str) -> anyhow::Result<std::time::Duration> {
    let d: kube::core::Duration = s.parse().map_err(|e| anyhow::anyhow!("invalid duration {s:?}: {e}"))?;
    anyhow::ensure!(!d.is_negative(), "invalid duration {s:?}: negative");
    Ok(d.into())
}

/// Both CRDs, in the order `crd` prints them (alphabetical by file name in
/// `crds/`, so that `cat crds/*.yaml` equals the output), with descriptions
/// reflowed for `kubectl explain`.
pub fn crds() -> Vec<CustomResourceDefinition> {
    vec![
        tidy_descriptions(BitbucketAccessGrant::crd()),
        tidy_descriptions(BitbucketConnector::crd()),
    ]
}

/// Doc comments are hard-wrapped; `kubectl explain` wraps text itself. Joins
/// the lines of each paragraph (paragraphs stay separated by a blank line).
fn tidy_descriptions(crd: CustomResourceDefinition) -> CustomResourceDefinition {
    fn walk(v: &mut serde_json::Value) {
        match v {
            serde_json::Value::Object(map) => {
                for (k, child) in map.iter_mut() {
                    match child {
                        serde_json::Value::String(s) if k == "description" => *s = reflow(s),
                        _ => walk(child),
                    }
                }
            }
            serde_json::Value::Array(items) => items.iter_mut().for_each(walk),
            _ => {}
        }
    }
    fn reflow(s: &str) -> String {
        s.split("\n\n")
            .map(|p| p.split_whitespace().collect::<Vec<_>>().join(" "))
            .filter(|p| !p.is_empty())
            .collect::<Vec<_>>()
            .join("\n\n")
    }
    let mut v = serde_json::to_value(&crd).expect("a CRD serialises");
    walk(&mut v);
    serde_json::from_value(v).expect("a CRD deserialises")
}

/// One CRD as a YAML document starting with `---`.
pub fn crd_yaml(crd: &CustomResourceDefinition) -> anyhow::Result<String> {
    Ok(format!("---\n{}", serde_yaml::to_string(crd)?))
}

/// File name of a CRD under `crds/`: `<plural>.<group>.yaml`.
pub fn crd_file_name(crd: &CustomResourceDefinition) -> String {
    format!("{}.yaml", crd.metadata.name.as_deref().unwrap_or("unnamed"))
}

/// Every CRD as multi-document YAML, exactly what `bitbucket-operator crd` prints.
pub fn all_crds_yaml() -> anyhow::Result<String> {
    let mut out = String::new();
    for crd in crds() {
        out.push_str(&crd_yaml(&crd)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: i64) -> Time {
        Time(k8s_openapi::jiff::Timestamp::from_second(secs).unwrap())
    }

    #[test]
    fn set_condition_keeps_transition_time_when_status_unchanged() {
        let mut conds = vec![];
        let mut c = new_condition(condition_type::READY, false, Reason::Progressing, "a", Some(1));
        c.last_transition_time = at(100);
        set_condition(&mut conds, c);
        let mut c = new_condition(condition_type::READY, false, Reason::SyncFailed, "b", Some(2));
        c.last_transition_time = at(200);
        set_condition(&mut conds, c);
        assert_eq!(conds.len(), 1);
        assert_eq!(conds[0].last_transition_time, at(100));
        assert_eq!(conds[0].reason, "SyncFailed");
        assert_eq!(conds[0].message, "b");
        assert_eq!(conds[0].observed_generation, Some(2));

        let mut c = new_condition(condition_type::READY, true, Reason::SyncSucceeded, "c", Some(2));
        c.last_transition_time = at(300);
        set_condition(&mut conds, c);
        assert_eq!(conds[0].status, "True");
        assert_eq!(conds[0].last_transition_time, at(300));

        set_condition(
            &mut conds,
            new_condition(condition_type::STALLED, true, Reason::InvalidSpec, "x", None),
        );
        assert_eq!(conds.len(), 2);
        assert!(is_condition_true(&conds, condition_type::STALLED));
        assert!(remove_condition(&mut conds, condition_type::STALLED));
        assert!(!remove_condition(&mut conds, condition_type::STALLED));
        assert!(find_condition(&conds, condition_type::STALLED).is_none());
    }

    #[test]
    fn contract_enums_have_their_wire_spelling() {
        assert_eq!(
            ConditionStatus::ALL.iter().map(|s| s.as_str()).collect::<Vec<_>>(),
            ["True", "False", "Unknown"]
        );
        assert_eq!(ConditionStatus::from(true), ConditionStatus::True);
        assert_eq!(ConditionStatus::from(false), ConditionStatus::False);
        // The states the printcolumns and DESIGN.md promise, in that order.
        assert_eq!(
            ConnectorState::ALL.iter().map(|s| s.as_str()).collect::<Vec<_>>(),
            ["Pending", "Syncing", "Connected", "Error", "Suspended"]
        );
        assert_eq!(
            GrantState::ALL.iter().map(|s| s.as_str()).collect::<Vec<_>>(),
            ["Pending", "Granted", "Expired", "Revoked", "Failed", "Denied"]
        );
        assert_eq!(GrantState::parse("Denied"), Some(GrantState::Denied));
        // The rules a grant policy denies by, spelled as the README documents them.
        for (reason, text) in [
            (Reason::DurationRequired, "DurationRequired"),
            (Reason::DurationExceedsMaximum, "DurationExceedsMaximum"),
            (Reason::PermissionNotAllowed, "PermissionNotAllowed"),
            (Reason::WorkspaceNotAllowed, "WorkspaceNotAllowed"),
            (Reason::TargetNotAllowed, "TargetNotAllowed"),
            (Reason::NamespaceNotAllowed, "NamespaceNotAllowed"),
            (Reason::RevokingGrants, "RevokingGrants"),
            (Reason::ProvisioningConflict, "ProvisioningConflict"),
        ] {
            assert_eq!(reason.as_str(), text);
        }
        assert_eq!(EventReason::Denied.as_str(), "Denied");
        // DESIGN.md's Connected=False reasons, spelled as documented.
        for (reason, text) in [
            (Reason::SecretNotFound, "SecretNotFound"),
            (Reason::SecretKeyMissing, "SecretKeyMissing"),
            (Reason::SecretNotOptedIn, "SecretNotOptedIn"),
            (Reason::InvalidSecretKeys, "InvalidSecretKeys"),
            (Reason::ApiUrlNotAllowed, "ApiUrlNotAllowed"),
            (Reason::InvalidCredentials, "InvalidCredentials"),
            (Reason::InsufficientScopes, "InsufficientScopes"),
            (Reason::WorkspaceNotFound, "WorkspaceNotFound"),
            (Reason::BitbucketUnavailable, "BitbucketUnavailable"),
            (Reason::RateLimited, "RateLimited"),
            (Reason::SyncFailed, "SyncFailed"),
            (Reason::Granted, "Granted"),
            (Reason::ConnectorNotReady, "ConnectorNotReady"),
        ] {
            assert_eq!(reason.as_str(), text);
            assert_eq!(Reason::parse(text), Some(reason));
        }
        // Every reason is CamelCase (API conventions) and reads back as itself.
        for reason in Reason::ALL {
            let text = reason.as_str();
            assert!(text.chars().next().is_some_and(|c| c.is_ascii_uppercase()), "{text}");
            assert!(text.chars().all(|c| c.is_ascii_alphanumeric()), "{text}");
            assert_eq!(Reason::parse(text), Some(*reason));
        }
        for reason in EventReason::ALL {
            assert_eq!(EventReason::parse(reason.as_str()), Some(*reason));
        }
        assert_eq!(
            EventReason::for_connection_failure(Reason::SecretNotFound),
            "SecretMissing"
        );
        assert_eq!(
            EventReason::for_connection_failure(Reason::InvalidCredentials),
            "CredentialsRejected"
        );
        assert_eq!(EventReason::for_connection_failure(Reason::RateLimited), "RateLimited");
        assert_eq!(ConnectorState::parse("Bogus"), None);
        // The credential rotation's condition reasons and Events (README).
        for (reason, text) in [
            (Reason::RotationSucceeded, "RotationSucceeded"),
            (Reason::RotationFailed, "RotationFailed"),
            (Reason::RotationNotAuthorized, "RotationNotAuthorized"),
            (Reason::CredentialExpiringSoon, "CredentialExpiringSoon"),
        ] {
            assert_eq!((reason.as_str(), Reason::parse(text)), (text, Some(reason)));
        }
        for (reason, text) in [
            (EventReason::CredentialsRotated, "CredentialsRotated"),
            (EventReason::RotationFailed, "RotationFailed"),
            (EventReason::RotationNotAuthorized, "RotationNotAuthorized"),
            (EventReason::CredentialExpiringSoon, "CredentialExpiringSoon"),
        ] {
            assert_eq!((reason.as_str(), EventReason::parse(text)), (text, Some(reason)));
        }
    }

    #[test]
    fn conditions_carry_typed_status_and_reason() {
        let c = new_condition(
            condition_type::CONNECTED,
            ConditionStatus::Unknown,
            Reason::Suspended,
            "m",
            None,
        );
        assert_eq!((c.status.as_str(), c.reason.as_str()), ("Unknown", "Suspended"));
        let conds = vec![c];
        assert_eq!(
            condition_status(&conds, condition_type::CONNECTED),
            Some(ConditionStatus::Unknown)
        );
        assert!(!is_condition_true(&conds, condition_type::CONNECTED));
    }

    #[test]
    fn parses_go_durations() {
        assert_eq!(parse_duration("1h30m").unwrap().as_secs(), 5400);
        assert_eq!(parse_duration("90s").unwrap().as_secs(), 90);
        assert!(parse_duration("1 hour").is_err());
        let re = DURATION_PATTERN;
        assert!(re.starts_with('^') && re.ends_with('$'));
    }

    #[test]
    fn crd_descriptions_are_reflowed_paragraphs() {
        let yaml = all_crds_yaml().unwrap();
        let v: Vec<serde_json::Value> = yaml
            .split("---\n")
            .filter(|d| !d.trim().is_empty())
            .map(|d| serde_yaml::from_str(d).unwrap())
            .collect();
        let spec = &v[1]["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
        let d = spec["properties"]["secretRef"]["description"].as_str().unwrap();
        assert!(!d.contains('\n'), "{d:?}");
        assert!(d.contains("same namespace"));
    }

    #[test]
    fn crd_output_is_multi_document_in_file_order() {
        let out = all_crds_yaml().unwrap();
        assert!(out.starts_with("---\n"));
        let names: Vec<String> = crds().iter().map(crd_file_name).collect();
        let mut sorted = names.clone();
        sorted.sort();
        assert_eq!(names, sorted, "crd must print in glob (file name) order");
        assert_eq!(out.matches("\n---\n").count() + 1, names.len());
    }
}
