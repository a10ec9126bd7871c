//! The custom resources (`connectors.dev/v1alpha1`): [`BitbucketConnector`]
//! and [`BitbucketAccessGrant`], the pure helpers the controllers use to
//! maintain their status conditions, and the `crd` subcommand that prints the
//! generated CustomResourceDefinitions.
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
}

/// Condition reasons (CamelCase, as the API conventions require).
pub mod reason {
    pub const SECRET_NOT_FOUND: &str = "SecretNotFound";
    pub const SECRET_KEY_MISSING: &str = "SecretKeyMissing";
    pub const INVALID_CREDENTIALS: &str = "InvalidCredentials";
    pub const INSUFFICIENT_SCOPES: &str = "InsufficientScopes";
    pub const WORKSPACE_NOT_FOUND: &str = "WorkspaceNotFound";
    pub const BITBUCKET_UNAVAILABLE: &str = "BitbucketUnavailable";
    pub const RATE_LIMITED: &str = "RateLimited";
    pub const CONNECTED: &str = "Connected";
    pub const SYNC_STARTED: &str = "SyncStarted";
    pub const SYNC_IN_PROGRESS: &str = "SyncInProgress";
    pub const SYNC_SUCCEEDED: &str = "SyncSucceeded";
    pub const SYNC_FAILED: &str = "SyncFailed";
    pub const IDLE: &str = "Idle";
    pub const SUSPENDED: &str = "Suspended";
    pub const PROGRESSING: &str = "Progressing";
    pub const RECONCILED: &str = "Reconciled";
    pub const INVALID_SPEC: &str = "InvalidSpec";
    pub const ROTATION_FAILED: &str = "RotationFailed";
    // BitbucketAccessGrant
    pub const CONNECTOR_NOT_FOUND: &str = "ConnectorNotFound";
    pub const CONNECTOR_NOT_READY: &str = "ConnectorNotReady";
    pub const PROVISIONING_DISABLED: &str = "ProvisioningDisabled";
    pub const PRINCIPAL_NOT_FOUND: &str = "PrincipalNotFound";
    pub const TARGET_NOT_FOUND: &str = "TargetNotFound";
    pub const GRANTED: &str = "Granted";
    pub const GRANT_FAILED: &str = "GrantFailed";
    pub const EXPIRED: &str = "Expired";
    pub const REVOKED: &str = "Revoked";
}

/// Builds a condition stamped with the current time. `status` maps to
/// `"True"`/`"False"`.
pub fn new_condition(
    type_: &str,
    status: bool,
    reason: &str,
    message: impl Into<String>,
    observed_generation: Option<i64>,
) -> Condition {
    Condition {
        type_: type_.to_owned(),
        status: if status { "True" } else { "False" }.to_owned(),
        reason: reason.to_owned(),
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

/// Whether the condition of `type_` is present with status `"True"`.
pub fn is_condition_true(conditions: &[Condition], type_: &str) -> bool {
    find_condition(conditions, type_).is_some_and(|c| c.status == "True")
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
        let mut c = new_condition(condition_type::READY, false, reason::PROGRESSING, "a", Some(1));
        c.last_transition_time = at(100);
        set_condition(&mut conds, c);
        let mut c = new_condition(condition_type::READY, false, reason::SYNC_FAILED, "b", Some(2));
        c.last_transition_time = at(200);
        set_condition(&mut conds, c);
        assert_eq!(conds.len(), 1);
        assert_eq!(conds[0].last_transition_time, at(100));
        assert_eq!(conds[0].reason, reason::SYNC_FAILED);
        assert_eq!(conds[0].message, "b");
        assert_eq!(conds[0].observed_generation, Some(2));

        let mut c = new_condition(condition_type::READY, true, reason::SYNC_SUCCEEDED, "c", Some(2));
        c.last_transition_time = at(300);
        set_condition(&mut conds, c);
        assert_eq!(conds[0].status, "True");
        assert_eq!(conds[0].last_transition_time, at(300));

        set_condition(
            &mut conds,
            new_condition(condition_type::STALLED, true, reason::INVALID_SPEC, "x", None),
        );
        assert_eq!(conds.len(), 2);
        assert!(is_condition_true(&conds, condition_type::STALLED));
        assert!(remove_condition(&mut conds, condition_type::STALLED));
        assert!(!remove_condition(&mut conds, condition_type::STALLED));
        assert!(find_condition(&conds, condition_type::STALLED).is_none());
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
