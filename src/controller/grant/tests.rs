use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use super::decide::*;
use super::status::{Outcome, compute};
use super::*;
use crate::crd::{
    AppliedAccess, AppliedPrincipalKind, BitbucketAccessGrant, BitbucketAccessGrantSpec, BitbucketAccessGrantStatus,
    GrantState, condition_type as ct, find_condition,
};
use crate::provision::{Permission, PrincipalRef, TargetRef};

const GRANTED: &str = "Granted";

fn ts(secs: i64) -> Timestamp {
    Timestamp::from_second(secs).unwrap()
}

fn spec() -> BitbucketAccessGrantSpec {
    serde_json::from_value(serde_json::json!({
        "connectorRef": {"name": "c"},
        "principal": {"user": "jdoe"},
        "target": {"workspace": "acme", "repository": "api"},
        "permission": "write",
    }))
    .unwrap()
}

fn granted(at: i64, expires: Option<i64>) -> BitbucketAccessGrantStatus {
    BitbucketAccessGrantStatus {
        state: Some(GRANTED.into()),
        granted_at: Some(Time(ts(at))),
        expires_at: expires.map(|e| Time(ts(e))),
        previous_permission: Some("read".into()),
        principal_id: Some("{u}".into()),
        ..Default::default()
    }
}

#[test]
fn decide_grants_holds_and_expires_on_status_timestamps() {
    let mut spec = spec();
    // Not granted yet: grant.
    assert_eq!(decide(&spec, None, None, ts(100)), Step::Grant);
    let failed = BitbucketAccessGrantStatus {
        state: Some("Failed".into()),
        ..Default::default()
    };
    assert_eq!(decide(&spec, Some(&failed), None, ts(100)), Step::Grant);
    // Held without expiry: hold for ever.
    let status = granted(100, None);
    assert_eq!(decide(&spec, Some(&status), None, ts(200)), Step::Hold { until: None });
    // Duration counts from grantedAt, even after a restart.
    spec.duration = Some("1m".into());
    assert_eq!(
        decide(&spec, Some(&status), None, ts(150)),
        Step::Hold { until: Some(ts(160)) }
    );
    assert_eq!(decide(&spec, Some(&status), None, ts(160)), Step::Expire);
    assert_eq!(decide(&spec, Some(&status), None, ts(10_000)), Step::Expire);
    // expiresAt wins over nothing; duration and expiresAt are exclusive.
    spec.duration = None;
    spec.expires_at = Some(Time(ts(300)));
    assert_eq!(
        decide(&spec, Some(&status), None, ts(299)),
        Step::Hold { until: Some(ts(300)) }
    );
    assert_eq!(decide(&spec, Some(&status), None, ts(300)), Step::Expire);
    // Expired is terminal, whatever the spec says now.
    let expired = BitbucketAccessGrantStatus {
        state: Some("Expired".into()),
        ..status.clone()
    };
    spec.expires_at = Some(Time(ts(99_999)));
    assert_eq!(decide(&spec, Some(&expired), None, ts(400)), Step::Done);
    // An expiresAt already past before granting: expire without a write.
    spec.expires_at = Some(Time(ts(50)));
    assert_eq!(decide(&spec, None, None, ts(100)), Step::ExpireUngranted);
    // An unparsable duration (the schema forbids it, but be safe).
    spec.expires_at = None;
    spec.duration = Some("soon".into());
    assert!(matches!(decide(&spec, Some(&status), None, ts(100)), Step::Invalid(_)));
}

#[test]
fn decide_never_widens_a_held_grant_on_a_spec_change() {
    let mut spec = spec();
    let status = granted(100, None);
    let applied = applied(&spec, "{u}");
    assert_eq!(
        decide(&spec, Some(&status), Some(&applied), ts(200)),
        Step::Hold { until: None }
    );
    // A new expiry alone writes nothing.
    spec.duration = Some("1h".into());
    assert_eq!(
        decide(&spec, Some(&status), Some(&applied), ts(200)),
        Step::Hold { until: Some(ts(3700)) }
    );
    // Another permission or target (the CRD refuses it; an API server
    // that did not): the held access stays as applied, nothing is written.
    spec.permission = Permission::Admin;
    assert_eq!(
        decide(&spec, Some(&status), Some(&applied), ts(200)),
        Step::KeepDespiteChange { until: Some(ts(3700)) }
    );
    let mut spec2 = self::spec();
    spec2.target.repository = Some("web".into());
    assert_eq!(
        decide(&spec2, Some(&status), Some(&applied), ts(200)),
        Step::KeepDespiteChange { until: None }
    );
    // Past expiry, expiry wins over a pending change.
    spec.duration = Some("1m".into());
    assert_eq!(decide(&spec, Some(&status), Some(&applied), ts(200)), Step::Expire);
}

#[test]
fn an_edit_can_bring_the_end_forward_never_push_it_back() {
    let mut spec = spec();
    spec.duration = Some("1h".into());
    // Granted at 100 for an hour: recorded expiry 3700.
    let status = granted(100, Some(3700));
    let applied = applied(&spec, "{u}");
    spec.duration = Some("10h".into());
    assert_eq!(
        decide(&spec, Some(&status), Some(&applied), ts(200)),
        Step::Hold { until: Some(ts(3700)) },
        "a longer duration does not extend"
    );
    spec.duration = None;
    assert_eq!(
        decide(&spec, Some(&status), Some(&applied), ts(200)),
        Step::Hold { until: Some(ts(3700)) },
        "removing the duration does not remove the end"
    );
    assert_eq!(decide(&spec, Some(&status), Some(&applied), ts(3700)), Step::Expire);
    spec.duration = Some("30m".into());
    assert_eq!(
        decide(&spec, Some(&status), Some(&applied), ts(200)),
        Step::Hold { until: Some(ts(1900)) },
        "a shorter one does"
    );
    // A grant revoked with its connector is done, whatever its spec.
    let mut revoked = granted(100, None);
    revoked.state = Some(GrantState::Revoked.as_str().into());
    assert_eq!(decide(&spec, Some(&revoked), None, ts(200)), Step::Done);
}

#[test]
fn overlapping_grants_restore_the_others_level_then_the_original() {
    use Permission::*;
    let peer = |permission, previous, at| Peer {
        permission,
        previous,
        granted_at: ts(at),
    };
    // read before; A (write, t=10) then B (admin, t=20).
    // B records A's previous (read), not the write A put in place.
    assert_eq!(
        previous_to_record(Some(Write), &[peer(Write, Some(Read), 10)]),
        Some(Read)
    );
    assert_eq!(previous_to_record(Some(Write), &[]), Some(Write));
    // Ending B while A holds: write stays.
    assert_eq!(
        restore_level(Some(Read), Some(ts(20)), &[peer(Write, Some(Read), 10)]),
        Some(Write)
    );
    // Ending A while B holds: admin stays (nothing written: admin is current).
    assert_eq!(
        restore_level(Some(Read), Some(ts(10)), &[peer(Admin, Some(Read), 20)]),
        Some(Admin)
    );
    // The last one out restores the original level, or removes it.
    assert_eq!(restore_level(Some(Read), Some(ts(20)), &[]), Some(Read));
    assert_eq!(restore_level(None, Some(ts(20)), &[]), None);
    // The earliest record wins even when a later one saw something else.
    assert_eq!(
        restore_level(Some(Admin), Some(ts(20)), &[peer(Read, None, 10)]),
        Some(Read)
    );
}

fn problem(reason: Reason, stalled: bool, state_if_not_held: GrantState) -> Outcome {
    Outcome::Problem {
        reason,
        message: "m".into(),
        stalled,
        state_if_not_held,
    }
}

#[test]
fn problems_keep_a_held_grant_granted_and_kstatus_only_while_true() {
    let target = || "repository/api".to_owned();
    let status = compute(
        None,
        Some(1),
        target(),
        problem(Reason::ProvisioningDisabled, true, GrantState::Failed),
    );
    assert_eq!(status.state.as_deref(), Some("Failed"));
    assert!(crate::crd::is_condition_true(&status.conditions, ct::STALLED));
    assert!(find_condition(&status.conditions, ct::RECONCILING).is_none());
    let held = Outcome::Held {
        expires_at: None,
        message: "ok".into(),
        backfill: None,
    };
    let status = compute(Some(&status), Some(1), target(), held);
    assert_eq!(status.state.as_deref(), Some("Granted"));
    assert!(find_condition(&status.conditions, ct::STALLED).is_none());
    assert!(crate::crd::is_condition_true(&status.conditions, ct::READY));
    assert_eq!(status.target.as_deref(), Some("repository/api"));

    let held = granted(100, None);
    let held = compute(
        Some(&held),
        Some(2),
        target(),
        problem(Reason::ConnectorNotReady, false, GrantState::Pending),
    );
    assert_eq!(held.state.as_deref(), Some(GRANTED));
    assert!(crate::crd::is_condition_true(&held.conditions, ct::RECONCILING));
    assert_eq!(held.observed_generation, Some(2));

    let expired = Outcome::Expired {
        expires_at: held.expires_at.clone(),
        message: "gone".into(),
    };
    let held = compute(Some(&held), Some(2), target(), expired);
    assert_eq!(held.state.as_deref(), Some("Expired"));
    assert!(crate::crd::is_condition_true(&held.conditions, EXPIRED_CONDITION));
    let ready = find_condition(&held.conditions, ct::READY).unwrap();
    assert_eq!((ready.status.as_str(), ready.reason.as_str()), ("False", "Expired"));
    assert!(find_condition(&held.conditions, ct::RECONCILING).is_none());
    assert!(held.applied.is_none());
}

#[test]
fn a_held_grant_keeps_its_ready_message_and_a_release_clears_the_record() {
    let target = || "repository/api".to_owned();
    let granted_now = Outcome::Granted {
        record: status::GrantRecord {
            previous: Some(Permission::Read),
            granted_at: Time(ts(100)),
            expires_at: Some(Time(ts(200))),
            principal_id: "{u}".into(),
            applied: applied(&spec(), "{u}"),
        },
        message: "granted write".into(),
    };
    let status = compute(None, Some(1), target(), granted_now);
    assert_eq!(status.previous_permission.as_deref(), Some("read"));
    assert_eq!(status.principal_id.as_deref(), Some("{u}"));
    assert!(is_held(Some(&status)));
    let held = Outcome::Held {
        expires_at: Some(Time(ts(300))),
        message: "write held on repository/api".into(),
        backfill: None,
    };
    let again = compute(Some(&status), Some(2), target(), held);
    let ready = find_condition(&again.conditions, ct::READY).unwrap();
    assert_eq!(ready.message, "granted write", "the grant's message stays");
    assert_eq!(again.expires_at, Some(Time(ts(300))));
    assert_eq!(again.applied, status.applied);
    let released = compute(Some(&again), Some(3), target(), Outcome::Released);
    assert_eq!(released.state.as_deref(), Some("Pending"));
    assert!(!is_held(Some(&released)));
    assert!(released.applied.is_none() && released.previous_permission.is_none() && released.granted_at.is_none());
    let unchanged = compute(Some(&again), Some(4), target(), Outcome::Unchanged);
    assert_eq!(unchanged.conditions, again.conditions);
    assert_eq!(unchanged.observed_generation, Some(4));
}

fn applied(spec: &BitbucketAccessGrantSpec, id: &str) -> AppliedAccess {
    let connector = (
        spec.connector_ref.namespace.as_deref(),
        spec.connector_ref.name.as_str(),
    );
    applied_access(connector, &request_for(spec).unwrap(), id).unwrap()
}

#[test]
fn applied_access_lives_in_status_and_names_the_resolved_principal() {
    let applied = applied(&spec(), "{u}");
    let status = BitbucketAccessGrantStatus {
        applied: Some(applied.clone()),
        ..granted(100, None)
    };
    let json = serde_json::to_value(&status).unwrap();
    assert_eq!(
        json["applied"],
        serde_json::json!({
            "connector": "c",
            "principal": {"kind": "user", "id": "{u}", "requested": "jdoe"},
            "workspace": "acme",
            "target": {"kind": "repository", "key": "api"},
            "permission": "write",
        })
    );
    let back: BitbucketAccessGrantStatus = serde_json::from_value(json).unwrap();
    assert_eq!(back.applied.as_ref(), Some(&applied));
    // The revoke names the principal by the resolved id.
    let request = revoke_request(&applied);
    assert_eq!(request.principal, PrincipalRef::User("{u}".into()));
    assert_eq!(request.target, TargetRef::Repository("api".into()));
    assert_eq!(request.permission, Permission::Write);
    // Resolving the principal is not a spec change.
    assert!(same_access(&applied, &spec()));
    assert_eq!(
        decide(&spec(), Some(&status), Some(&applied), ts(200)),
        Step::Hold { until: None }
    );
}

#[test]
fn held_access_comes_from_status_never_from_the_annotation() {
    let mut obj = BitbucketAccessGrant::new("g", spec());
    let forged = serde_json::json!({
        "connector": "c",
        "principal": {"user": "victim"},
        "target": {"workspace": "acme", "repository": "secret"},
        "permission": "admin",
    });
    obj.metadata.annotations = Some([("connectors.dev/applied-access".to_owned(), forged.to_string())].into());
    let mut other = spec();
    other.permission = Permission::Read;
    let recorded = applied(&other, "{u}");
    obj.status = Some(BitbucketAccessGrantStatus {
        applied: Some(recorded.clone()),
        ..granted(100, None)
    });
    assert_eq!(held_access(&obj).unwrap(), recorded);

    // Granted by the previous version (annotation only): the current
    // spec, with the user named by status.principalId.
    obj.status = Some(granted(100, None));
    let legacy = held_access(&obj).unwrap();
    assert_eq!(legacy, applied(&spec(), "{u}"));
    assert_eq!(legacy.principal.requested, "jdoe");
    // A group principal is named by its slug.
    let mut group = spec();
    group.principal = crate::crd::grant::Principal {
        user: None,
        group: Some("devs".into()),
    };
    obj.spec = group;
    let legacy = held_access(&obj).unwrap();
    assert_eq!(
        (legacy.principal.kind, legacy.principal.id.as_str()),
        (AppliedPrincipalKind::Group, "devs")
    );
}

#[test]
fn the_example_access_grant_becomes_a_request() {
    let grant: BitbucketAccessGrant = serde_yaml::from_str(include_str!("../../../examples/accessgrant.yaml")).unwrap();
    let request = request_for(&grant.spec).unwrap();
    assert_eq!(request.workspace, "example-workspace");
    assert_eq!(
        request.principal,
        PrincipalRef::User("{5f1c2a44-8d1e-4c1b-9f6e-0a2b3c4d5e6f}".into())
    );
    assert_eq!(request.target, TargetRef::Repository("api".into()));
    assert_eq!(request.permission, Permission::Write);
    request.validate().unwrap();

    let mut two_targets = grant.spec.clone();
    two_targets.target.project = Some("P".into());
    let err = request_for(&two_targets).unwrap_err();
    assert_eq!(Reason::from(&err), Reason::InvalidSpec);
    assert_eq!(err.reason(), "InvalidSpec");
}

#[test]
fn provision_errors_map_to_the_reasons_the_cli_reports() {
    use crate::bitbucket::{EndpointClass, Error as ApiError, ErrorKind};
    let api = |kind| ApiError {
        class: EndpointClass::Members,
        kind,
        status: None,
        message: "m".into(),
        retry_after: None,
    };
    let errors = [
        ProvisionError::ProvisioningDisabled,
        ProvisionError::PrincipalNotFound {
            principal: "p".into(),
            workspace: "w".into(),
        },
        ProvisionError::NotWorkspaceMember {
            user: "u".into(),
            workspace: "w".into(),
        },
        ProvisionError::TargetNotFound { target: "t".into() },
        ProvisionError::NotProvisionable { message: "m".into() },
        ProvisionError::InvalidPermission {
            permission: Permission::Read,
            message: "m".into(),
        },
        ProvisionError::InvalidRequest { message: "m".into() },
        ProvisionError::from(api(ErrorKind::Conflict)),
        ProvisionError::from(api(ErrorKind::Unauthorized)),
        ProvisionError::from(api(ErrorKind::Forbidden)),
        ProvisionError::from(api(ErrorKind::Server)),
        ProvisionError::from(api(ErrorKind::RateLimited)),
        ProvisionError::from(api(ErrorKind::Decode)),
    ];
    for err in &errors {
        assert_eq!(Reason::from(err).as_str(), err.reason(), "{err}");
    }
}

#[test]
fn grant_errors_keep_their_source_and_a_bounded_label() {
    use crate::controller::common::MetricLabel;
    use std::error::Error as _;
    let err = GrantError::Revoke(ProvisionError::TargetNotFound { target: "t".into() });
    assert_eq!(err.metric_label(), "bitbucket");
    assert!(err.source().is_some());
    let blocked = GrantError::Blocked(Blocker::NotReady("connecting".into()));
    assert_eq!(blocked.metric_label(), "connector_not_ready");
    assert_eq!(blocked.to_string(), "cannot revoke yet: connecting");
}

#[test]
fn provisioning_is_read_with_the_connector_decoder() {
    use k8s_openapi::ByteString;
    use k8s_openapi::api::core::v1::Secret;
    let connector: crate::crd::BitbucketConnector =
        serde_yaml::from_str(include_str!("../../../examples/connector.yaml")).unwrap();
    let secret = |value: &[u8]| Secret {
        data: Some(
            [
                ("BATON_TOKEN".to_owned(), ByteString(b"tok".to_vec())),
                ("BATON_PROVISIONING".to_owned(), ByteString(value.to_vec())),
            ]
            .into(),
        ),
        ..Secret::default()
    };
    let mut connector = connector;
    connector.spec.provisioning = None;
    let switch = |c: &crate::crd::BitbucketConnector, v: &[u8]| super::lookup::switch_of(c, &secret(v));
    assert!(switch(&connector, b"true").unwrap().enabled);
    assert!(!switch(&connector, b"false").unwrap().enabled);
    // The Secret's explicit false is a veto the spec cannot override, and says so.
    connector.spec.provisioning = Some(crate::crd::ProvisioningPolicy {
        enabled: Some(true),
        ..Default::default()
    });
    let vetoed = switch(&connector, b"false").unwrap();
    assert!(!vetoed.enabled);
    assert_eq!(vetoed.reason, Reason::ProvisioningConflict);
    assert!(
        switch(&connector, b"").unwrap().enabled,
        "absent in the Secret: the spec decides"
    );
    // Not text: reported (the connector says SecretKeyMissing), where this
    // path used to drop the key and read provisioning as off.
    let err = switch(&connector, &[0xff, 0xfe]).unwrap_err();
    assert_eq!(err.to_string(), "key BATON_PROVISIONING is not UTF-8 text");
}

#[test]
fn a_denial_is_new_once_per_rule_and_a_revoked_grant_holds_nothing() {
    let denied = |reason| {
        compute(
            None,
            Some(1),
            "repository/api".into(),
            problem(reason, true, GrantState::Denied),
        )
    };
    let by_permission = denied(Reason::PermissionNotAllowed);
    assert_eq!(by_permission.state.as_deref(), Some("Denied"));
    assert!(super::status::is_new_denial(None, &by_permission));
    assert!(
        !super::status::is_new_denial(Some(&by_permission), &by_permission),
        "the same denial again is not new"
    );
    let by_duration = denied(Reason::DurationExceedsMaximum);
    assert!(
        super::status::is_new_denial(Some(&by_permission), &by_duration),
        "another rule is"
    );
    let failed = compute(
        None,
        Some(1),
        "repository/api".into(),
        problem(Reason::ProvisioningDisabled, true, GrantState::Failed),
    );
    assert!(
        !super::status::is_new_denial(None, &failed),
        "a failure is not a denial"
    );

    let held = granted(100, None);
    let revoked = compute(
        Some(&held),
        Some(1),
        "repository/api".into(),
        Outcome::Revoked {
            message: "the connector is being deleted".into(),
        },
    );
    assert_eq!(revoked.state.as_deref(), Some("Revoked"));
    assert!(!is_held(Some(&revoked)) && revoked.applied.is_none());
    let ready = find_condition(&revoked.conditions, ct::READY).unwrap();
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("False", "ConnectorDeleted")
    );
}

#[test]
fn grants_reference_a_connector_by_namespace_and_name() {
    let grant = |ns: &str, connector_ns: Option<&str>| {
        let mut g = BitbucketAccessGrant::new("g", spec());
        g.metadata.namespace = Some(ns.into());
        g.spec.connector_ref.namespace = connector_ns.map(str::to_owned);
        g
    };
    assert!(super::lookup::references(&grant("bitbucket", None), "bitbucket", "c"));
    assert!(!super::lookup::references(&grant("team-a", None), "bitbucket", "c"));
    assert!(super::lookup::references(
        &grant("team-a", Some("bitbucket")),
        "bitbucket",
        "c"
    ));
    assert!(!super::lookup::references(
        &grant("team-a", Some("bitbucket")),
        "bitbucket",
        "other"
    ));
}
