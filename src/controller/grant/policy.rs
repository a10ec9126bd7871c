//! The grant policy of a connector (`spec.provisioning`) as pure rules:
//! whether the connector grants at all ([`resolve_switch`]: the one rule
//! for the CR's `enabled` against the Secret's `BATON_PROVISIONING`), and
//! whether one grant is within its policy ([`check`], which names the rule
//! broken). No I/O: the grant controller feeds them what it read, and every
//! rule is unit-tested here.
//!
//! **The switch.** The Secret's explicit `false` is a veto: a connector's
//! `enabled: true` cannot override it (the Secret's owner holds the
//! credential and said no), and the conflict is reported with reason
//! `ProvisioningConflict`, naming both, never silently. Otherwise
//! `enabled` decides when set, else the Secret's `true`, else off. The
//! switch only gates *new* grants: revokes, restores and expiries run
//! whatever it says, so access granted earlier always ends.

use std::time::Duration;

use jiff::Timestamp;

use crate::crd::{AllowedTargets, BitbucketAccessGrantSpec, ProvisioningPolicy, Reason};
use crate::model::Permission;

/// Whether a connector grants access, and why, for people.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Switch {
    pub enabled: bool,
    /// `ProvisioningEnabled`, `ProvisioningDisabled` or `ProvisioningConflict`.
    pub reason: Reason,
    pub message: String,
}

/// The rule for the provisioning switch (module docs): `spec_enabled` is
/// `spec.provisioning.enabled`, `secret` the Secret's value of `key` as
/// written (`None`: absent).
pub fn resolve_switch(spec_enabled: Option<bool>, secret: Option<bool>, key: &str) -> Switch {
    let (enabled, reason, message) = match (spec_enabled, secret) {
        (Some(true), Some(false)) => (
            false,
            Reason::ProvisioningConflict,
            format!(
                "spec.provisioning.enabled is true but the Secret sets {key}=false: the Secret's false is a veto, so \
                 provisioning is off (set {key}=true or remove it in the Secret to enable)"
            ),
        ),
        (Some(true), _) => (
            true,
            Reason::ProvisioningEnabled,
            "enabled by spec.provisioning.enabled".to_owned(),
        ),
        (Some(false), _) => (
            false,
            Reason::ProvisioningDisabled,
            "disabled by spec.provisioning.enabled: new grants are refused, held ones still expire and are revoked"
                .to_owned(),
        ),
        (None, Some(true)) => (
            true,
            Reason::ProvisioningEnabled,
            format!("enabled by {key}=true in the Secret"),
        ),
        (None, Some(false)) => (
            false,
            Reason::ProvisioningDisabled,
            format!(
                "disabled by {key}=false in the Secret: new grants are refused, held ones still expire and are revoked"
            ),
        ),
        (None, None) => (
            false,
            Reason::ProvisioningDisabled,
            format!("off: set spec.provisioning.enabled: true, or {key}=true in the Secret"),
        ),
    };
    Switch {
        enabled,
        reason,
        message,
    }
}

/// The rule a grant broke.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Violation {
    /// The grant's namespace is neither the connector's nor listed in `grantNamespaces`.
    NamespaceNotAllowed {
        namespace: String,
        connector: String,
    },
    PermissionNotAllowed {
        permission: Permission,
        allowed: Vec<Permission>,
    },
    WorkspaceNotAllowed {
        workspace: String,
        allowed: Vec<String>,
    },
    TargetNotAllowed {
        target: String,
        kind: &'static str,
    },
    DurationRequired,
    DurationExceedsMaximum {
        requested: String,
        maximum: String,
    },
}

impl Violation {
    /// The condition reason: the rule's name.
    pub fn reason(&self) -> Reason {
        match self {
            Violation::NamespaceNotAllowed { .. } => Reason::NamespaceNotAllowed,
            Violation::PermissionNotAllowed { .. } => Reason::PermissionNotAllowed,
            Violation::WorkspaceNotAllowed { .. } => Reason::WorkspaceNotAllowed,
            Violation::TargetNotAllowed { .. } => Reason::TargetNotAllowed,
            Violation::DurationRequired => Reason::DurationRequired,
            Violation::DurationExceedsMaximum { .. } => Reason::DurationExceedsMaximum,
        }
    }
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Violation::NamespaceNotAllowed { namespace, connector } => write!(
                f,
                "BitbucketConnector {connector} does not exist or does not list namespace {namespace} in \
                 spec.provisioning.grantNamespaces"
            ),
            Violation::PermissionNotAllowed { permission, allowed } => write!(
                f,
                "permission {permission} is not in the connector's spec.provisioning.allowedPermissions [{}]",
                join(allowed.iter().map(|p| p.as_str()))
            ),
            Violation::WorkspaceNotAllowed { workspace, allowed } => write!(
                f,
                "workspace {workspace} is not one the connector allows [{}] (spec.provisioning.allowedWorkspaces, \
                 default the connector's workspaces)",
                join(allowed.iter().map(String::as_str))
            ),
            Violation::TargetNotAllowed { target, kind } => write!(
                f,
                "{target} matches no pattern of the connector's spec.provisioning.allowedTargets.{kind}"
            ),
            Violation::DurationRequired => f.write_str(
                "the connector requires an end to every grant (spec.provisioning.requireDuration): set duration or \
                 expiresAt",
            ),
            Violation::DurationExceedsMaximum { requested, maximum } => write!(
                f,
                "the grant asks for {requested}, more than the connector's spec.provisioning.maxDuration {maximum}"
            ),
        }
    }
}

fn join<'a>(items: impl Iterator<Item = &'a str>) -> String {
    items.collect::<Vec<_>>().join(", ")
}

/// Where a grant comes from and what the connector works on, for [`check`].
#[derive(Debug, Clone)]
pub struct Context<'a> {
    /// The grant's namespace.
    pub grant_namespace: &'a str,
    /// The connector's namespace and name.
    pub connector_namespace: &'a str,
    pub connector_name: &'a str,
    /// The connector's workspaces (spec, else Secret); empty: every one.
    pub connector_workspaces: &'a [String],
    /// The grant's creation: an `expiresAt` is measured from it, so a grant
    /// that waited cannot stretch the maximum.
    pub created: Timestamp,
}

/// Whether `spec` is within `policy`; the first rule broken otherwise, in
/// the order namespace, permission, workspace, target, duration.
pub fn check(policy: &ProvisioningPolicy, ctx: &Context<'_>, spec: &BitbucketAccessGrantSpec) -> Result<(), Violation> {
    if ctx.grant_namespace != ctx.connector_namespace
        && !policy.grant_namespaces.iter().any(|n| n == ctx.grant_namespace)
    {
        return Err(Violation::NamespaceNotAllowed {
            namespace: ctx.grant_namespace.to_owned(),
            connector: format!("{}/{}", ctx.connector_namespace, ctx.connector_name),
        });
    }
    if !policy.allowed_permissions.contains(&spec.permission) {
        return Err(Violation::PermissionNotAllowed {
            permission: spec.permission,
            allowed: policy.allowed_permissions.clone(),
        });
    }
    let workspaces = policy.allowed_workspaces.as_deref().unwrap_or(ctx.connector_workspaces);
    let workspace = &spec.target.workspace;
    // An explicit empty allowedWorkspaces allows none; the connector's empty list means every one.
    let any_workspace = policy.allowed_workspaces.is_none() && workspaces.is_empty();
    if !any_workspace && !workspaces.iter().any(|w| w.eq_ignore_ascii_case(workspace)) {
        return Err(Violation::WorkspaceNotAllowed {
            workspace: workspace.clone(),
            allowed: workspaces.to_vec(),
        });
    }
    if let Some(targets) = &policy.allowed_targets {
        check_target(targets, spec)?;
    }
    check_duration(policy, ctx.created, spec)
}

fn check_target(targets: &AllowedTargets, spec: &BitbucketAccessGrantSpec) -> Result<(), Violation> {
    let t = &spec.target;
    let (kind, name, patterns) = if let Some(r) = &t.repository {
        ("repositories", r, &targets.repositories)
    } else if let Some(p) = &t.project {
        ("projects", p, &targets.projects)
    } else if let Some(g) = &t.group {
        ("groups", g, &targets.groups)
    } else {
        // The schema requires one; nothing named, nothing allowed.
        ("repositories", &t.workspace, &targets.repositories)
    };
    let full = format!("{}/{name}", t.workspace);
    if patterns.iter().any(|p| glob_matches(p, &full)) {
        Ok(())
    } else {
        Err(Violation::TargetNotAllowed { target: full, kind })
    }
}

fn check_duration(
    policy: &ProvisioningPolicy,
    created: Timestamp,
    spec: &BitbucketAccessGrantSpec,
) -> Result<(), Violation> {
    let exceeds = |requested: String| Violation::DurationExceedsMaximum {
        requested,
        maximum: policy.max_duration.clone(),
    };
    // A maximum that cannot be read allows nothing (the schema prevents it).
    let maximum = crate::crd::parse_duration(&policy.max_duration).unwrap_or(Duration::ZERO);
    if let Some(d) = &spec.duration {
        let wanted = crate::crd::parse_duration(d).map_err(|_| exceeds(format!("duration {d}")))?;
        return if wanted > maximum {
            Err(exceeds(format!("duration {d}")))
        } else {
            Ok(())
        };
    }
    if let Some(at) = &spec.expires_at {
        let span = at.0.duration_since(created);
        let within = Duration::try_from(span).map_or(true, |span| span <= maximum);
        return if within {
            Ok(())
        } else {
            Err(exceeds(format!(
                "expiresAt {} ({} after creation)",
                at.0,
                fmt_span(span)
            )))
        };
    }
    if policy.require_duration {
        Err(Violation::DurationRequired)
    } else {
        Ok(())
    }
}

fn fmt_span(span: jiff::SignedDuration) -> String {
    let secs = span.as_secs().max(0);
    format!("{}h{:02}m", secs / 3600, (secs % 3600) / 60)
}

/// `*` matches any run of characters; everything else itself, ignoring
/// ASCII case. Linear in practice: one backtrack point (the last `*`).
pub fn glob_matches(pattern: &str, text: &str) -> bool {
    let (p, t): (Vec<u8>, Vec<u8>) = (
        pattern.bytes().map(|b| b.to_ascii_lowercase()).collect(),
        text.bytes().map(|b| b.to_ascii_lowercase()).collect(),
    );
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, ti));
            pi += 1;
        } else if pi < p.len() && p[pi] == t[ti] {
            pi += 1;
            ti += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&b| b == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::grant::{ConnectorRef, Principal, Target};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    fn spec(permission: Permission, duration: Option<&str>) -> BitbucketAccessGrantSpec {
        BitbucketAccessGrantSpec {
            connector_ref: ConnectorRef {
                name: "bb".into(),
                namespace: None,
            },
            principal: Principal {
                user: Some("alice".into()),
                group: None,
            },
            target: Target {
                workspace: "acme".into(),
                repository: Some("api-gateway".into()),
                ..Default::default()
            },
            permission,
            duration: duration.map(str::to_owned),
            expires_at: None,
        }
    }

    fn ctx<'a>(grant_ns: &'a str, workspaces: &'a [String]) -> Context<'a> {
        Context {
            grant_namespace: grant_ns,
            connector_namespace: "bitbucket",
            connector_name: "bb",
            connector_workspaces: workspaces,
            created: Timestamp::from_second(1_000_000).unwrap(),
        }
    }

    fn reason(r: Result<(), Violation>) -> Option<Reason> {
        r.err().map(|v| v.reason())
    }

    #[test]
    fn the_default_policy_allows_read_and_write_for_a_week_from_the_own_namespace() {
        let policy = ProvisioningPolicy::default();
        let none: Vec<String> = vec![];
        let c = ctx("bitbucket", &none);
        assert_eq!(check(&policy, &c, &spec(Permission::Write, Some("8h"))), Ok(()));
        assert_eq!(check(&policy, &c, &spec(Permission::Read, Some("168h"))), Ok(()));
        assert_eq!(
            reason(check(&policy, &c, &spec(Permission::Admin, Some("1h")))),
            Some(Reason::PermissionNotAllowed),
            "admin is opt-in"
        );
        assert_eq!(
            reason(check(&policy, &c, &spec(Permission::Write, Some("169h")))),
            Some(Reason::DurationExceedsMaximum)
        );
        assert_eq!(
            reason(check(&policy, &c, &spec(Permission::Write, None))),
            Some(Reason::DurationRequired)
        );
        assert_eq!(
            reason(check(
                &policy,
                &ctx("team-a", &none),
                &spec(Permission::Write, Some("1h"))
            )),
            Some(Reason::NamespaceNotAllowed),
            "no other namespace by default"
        );
    }

    #[test]
    fn every_rule_names_itself() {
        let mut policy = ProvisioningPolicy {
            grant_namespaces: vec!["team-a".into()],
            require_duration: false,
            allowed_permissions: vec![Permission::Read, Permission::Write, Permission::Admin],
            ..Default::default()
        };
        let ws = vec!["acme".to_owned()];
        assert_eq!(
            check(&policy, &ctx("team-a", &ws), &spec(Permission::Admin, None)),
            Ok(())
        );
        assert_eq!(
            reason(check(&policy, &ctx("team-b", &ws), &spec(Permission::Read, None))),
            Some(Reason::NamespaceNotAllowed)
        );
        let other_ws = vec!["globex".to_owned()];
        let err = check(&policy, &ctx("team-a", &other_ws), &spec(Permission::Read, None)).unwrap_err();
        assert_eq!(err.reason(), Reason::WorkspaceNotAllowed);
        assert!(
            err.to_string().contains("workspace acme") && err.to_string().contains("globex"),
            "{err}"
        );
        policy.allowed_workspaces = Some(vec!["acme".into()]);
        assert_eq!(
            check(&policy, &ctx("team-a", &other_ws), &spec(Permission::Read, None)),
            Ok(()),
            "allowedWorkspaces overrides the connector's workspaces"
        );
        policy.allowed_workspaces = Some(vec![]);
        assert_eq!(
            reason(check(&policy, &ctx("team-a", &ws), &spec(Permission::Read, None))),
            Some(Reason::WorkspaceNotAllowed),
            "an explicit empty list allows no workspace"
        );
        policy.allowed_workspaces = None;
        policy.allowed_targets = Some(AllowedTargets {
            repositories: vec!["acme/api-*".into()],
            ..Default::default()
        });
        assert_eq!(
            check(&policy, &ctx("team-a", &ws), &spec(Permission::Read, None)),
            Ok(())
        );
        let mut s = spec(Permission::Read, None);
        s.target.repository = Some("billing".into());
        let err = check(&policy, &ctx("team-a", &ws), &s).unwrap_err();
        assert_eq!(err.reason(), Reason::TargetNotAllowed);
        assert!(err.to_string().contains("acme/billing"), "{err}");
        s.target.repository = None;
        s.target.project = Some("PRJ1".into());
        assert_eq!(
            reason(check(&policy, &ctx("team-a", &ws), &s)),
            Some(Reason::TargetNotAllowed),
            "a kind not listed allows nothing"
        );
    }

    #[test]
    fn expires_at_is_measured_from_the_grants_creation() {
        let policy = ProvisioningPolicy {
            max_duration: "8h".into(),
            ..Default::default()
        };
        let ws: Vec<String> = vec![];
        let c = ctx("bitbucket", &ws);
        let mut s = spec(Permission::Read, None);
        s.expires_at = Some(Time(
            c.created.checked_add(jiff::SignedDuration::from_hours(8)).unwrap(),
        ));
        assert_eq!(check(&policy, &c, &s), Ok(()));
        s.expires_at = Some(Time(
            c.created.checked_add(jiff::SignedDuration::from_hours(9)).unwrap(),
        ));
        let err = check(&policy, &c, &s).unwrap_err();
        assert_eq!(err.reason(), Reason::DurationExceedsMaximum);
        assert!(err.to_string().contains("9h00m"), "{err}");
        // In the past: not longer than the maximum (it expires without a grant).
        s.expires_at = Some(Time(Timestamp::from_second(10).unwrap()));
        assert_eq!(check(&policy, &c, &s), Ok(()));
    }

    #[test]
    fn the_secret_false_is_a_veto_and_the_conflict_names_both() {
        let key = "BATON_PROVISIONING";
        let veto = resolve_switch(Some(true), Some(false), key);
        assert!(!veto.enabled);
        assert_eq!(veto.reason, Reason::ProvisioningConflict);
        assert!(
            veto.message.contains("spec.provisioning.enabled") && veto.message.contains("BATON_PROVISIONING=false"),
            "{}",
            veto.message
        );
        assert!(resolve_switch(Some(true), None, key).enabled);
        assert!(resolve_switch(Some(true), Some(true), key).enabled);
        assert!(
            !resolve_switch(Some(false), Some(true), key).enabled,
            "the CR may turn it off"
        );
        assert!(
            resolve_switch(None, Some(true), key).enabled,
            "absent: the Secret decides"
        );
        assert!(!resolve_switch(None, Some(false), key).enabled);
        let off = resolve_switch(None, None, key);
        assert!(!off.enabled);
        assert_eq!(off.reason, Reason::ProvisioningDisabled);
    }

    #[test]
    fn globs_match_whole_names_ignoring_case() {
        assert!(glob_matches("acme/api-*", "acme/api-gateway"));
        assert!(glob_matches("acme/api-*", "ACME/API-"));
        assert!(!glob_matches("acme/api-*", "acme/billing-api-x"));
        assert!(!glob_matches("acme/api", "acme/api-gateway"));
        assert!(glob_matches("*/*", "globex/x"));
        assert!(glob_matches("acme/PRJ*", "acme/prj42"));
        assert!(glob_matches("a*b*c", "aXbYbZc"));
        assert!(!glob_matches("a*b*c", "aXbYbZ"));
        assert!(!glob_matches("acme/*", "globex/acme"));
    }
}
