//! Status of a `BitbucketConnector`, computed as a pure function of what the
//! controller observed, so every rule is unit-tested without a cluster.
//!
//! Conditions follow the Kubernetes API conventions and kstatus:
//! - `Connected`: credentials accepted and workspaces reachable (`Unknown`
//!   while the first check runs).
//! - `Syncing`: True while any resource loop runs.
//! - `Ready`: connected and every enabled resource type has a current
//!   successful sync (its latest run succeeded).
//! - `Reconciling` / `Stalled`: present only while True. `Stalled` means
//!   retrying will not help until someone changes something (a missing Secret,
//!   rejected credentials, an unknown workspace); `Reconciling` means the
//!   operator is still working towards Ready (first syncs, transient failures).
//!
//! `state` is the one word for people: `Suspended`, `Error`, `Syncing` (a loop
//! runs), `Connected` (Ready), or `Pending`.
//!
//! `progress` shows each running type's done/total, ETA and budget wait
//! while runs are in progress and is removed when none is. Its figures are
//! refreshed only when the set of running types changes or
//! [`ProgressObservation::min_interval`] (30 s) has passed, so with the
//! status writer's compare-before-write a long sync costs at most a couple
//! of writes a minute.
//!
//! Each [`Health`] gives a `Verdict` (state, conditions, kstatus) in its own
//! small function; [`compute`] merges it into the previous status.

use std::collections::BTreeMap;

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use crate::conductorone::{ConnectionReason, SessionStatus};
use crate::crd::{
    BitbucketConnectorSpec, BitbucketConnectorStatus, ConditionStatus, ConductorOneStatus, ConductorOneTask,
    ConductorOneTaskCounts, ConductorOneUpload, ConnectorState, CredentialStatus, Reason, ResourceStatuses,
    ResourceSyncStatus, SyncProgress, TypeProgress, condition_type as ct, new_condition, remove_condition,
    set_condition,
};
use crate::model::SyncKind;
use crate::sync::ProgressSnapshot;

/// Where the connector stands, as the reconciler found it.
#[derive(Debug, Clone, PartialEq)]
pub enum Health {
    Suspended,
    /// The connector cannot be used as configured: the Secret is missing,
    /// not opted in or unusable, or `apiUrl` is not allowed. Stalled.
    SecretProblem {
        reason: Reason,
        message: String,
    },
    /// The first credential check has not finished.
    Connecting,
    /// The credential check failed; `stalled` when retrying cannot help.
    ConnectFailed {
        reason: Reason,
        message: String,
        stalled: bool,
    },
    /// Credentials accepted; these workspaces are synced.
    Connected {
        workspaces: Vec<String>,
    },
}

/// The connector's ConductorOne session, as the reconciler found it.
#[derive(Debug, Clone, PartialEq)]
pub enum C1Health {
    /// Not configured: no `ConductorOneConnected` condition, no `status.conductorOne`.
    NotConfigured,
    /// Not looked at in this pass: the status keeps what it said.
    Unobserved,
    /// Not running because of the connector (suspended, Secret unusable):
    /// `Unknown`, if ConductorOne was configured.
    Stopped { message: String },
    /// Cannot run as configured: `False` with this reason.
    Refused { reason: Reason, message: String },
    /// The running session's published state.
    Session(SessionStatus),
}

/// One resource loop as the status reports it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LoopStatus {
    pub enabled: bool,
    pub running: bool,
    /// Resources in the current snapshot.
    pub count: i64,
    pub last_start: Option<Timestamp>,
    pub last_end: Option<Timestamp>,
    pub duration_seconds: Option<f64>,
    pub requests: Option<i64>,
    /// The latest run failed with this message (the previous data is kept).
    pub last_error: Option<String>,
    pub last_success: Option<Timestamp>,
}

impl LoopStatus {
    /// The latest run succeeded (and one has run).
    fn current(&self) -> bool {
        self.last_success.is_some() && self.last_error.is_none()
    }
}

/// Everything the status is computed from.
#[derive(Debug, Clone)]
pub struct Observation<'a> {
    pub generation: Option<i64>,
    pub spec: &'a BitbucketConnectorSpec,
    pub previous: Option<&'a BitbucketConnectorStatus>,
    pub health: Health,
    pub loops: BTreeMap<SyncKind, LoopStatus>,
    pub fingerprint: Option<(String, Timestamp)>,
    /// The Flux `reconcile.fluxcd.io/requestedAt` value handled in this pass.
    pub handled_reconcile_at: Option<String>,
    pub conductor_one: C1Health,
    /// The sync runs in progress, for `status.progress`.
    pub progress: ProgressObservation,
}

/// The runs in progress as the reconciler found them.
#[derive(Debug, Clone, PartialEq)]
pub struct ProgressObservation {
    pub now: Timestamp,
    /// Figures of types that keep running are refreshed at most this often
    /// (a type starting or ending shows at once): bounded status writes.
    pub min_interval: std::time::Duration,
    /// One snapshot per type whose run is in progress.
    pub running: Vec<ProgressSnapshot>,
    /// Requests wait this long for the hourly budget.
    pub budget_wait: Option<std::time::Duration>,
}

impl ProgressObservation {
    /// No run in progress: `status.progress` is cleared.
    pub fn idle() -> Self {
        ProgressObservation {
            now: Timestamp::now(),
            min_interval: std::time::Duration::ZERO,
            running: Vec::new(),
            budget_wait: None,
        }
    }
}

/// The conditions and state one [`Health`] gives, before kstatus and resources.
struct Verdict {
    state: ConnectorState,
    /// Conditions to set: type, status, reason, message.
    conditions: Vec<(&'static str, ConditionStatus, Reason, String)>,
    /// kstatus `Stalled` (progress needs a human), present only while True.
    stalled: Option<(Reason, String)>,
    /// kstatus `Reconciling` (the operator is working on it), present only while True.
    reconciling: Option<(Reason, String)>,
}

impl Verdict {
    fn new(state: ConnectorState) -> Self {
        Verdict {
            state,
            conditions: Vec::new(),
            stalled: None,
            reconciling: None,
        }
    }

    fn set(mut self, type_: &'static str, status: ConditionStatus, reason: Reason, message: impl Into<String>) -> Self {
        self.conditions.push((type_, status, reason, message.into()));
        self
    }
}

/// Computes the new status. Conditions whose status does not change keep
/// their `lastTransitionTime`.
pub fn compute(obs: &Observation<'_>) -> BitbucketConnectorStatus {
    let previous = obs.previous.cloned().unwrap_or_default();
    let mut conditions: Vec<Condition> = previous.conditions.clone();
    let generation = obs.generation;
    let verdict = match &obs.health {
        Health::Suspended => suspended(),
        Health::SecretProblem { reason, message } => secret_problem(*reason, message),
        Health::Connecting => connecting(),
        Health::ConnectFailed {
            reason,
            message,
            stalled,
        } => connect_failed(*reason, message, *stalled),
        Health::Connected { workspaces } => connected(workspaces, &obs.loops),
    };
    for (type_, status, reason, message) in verdict.conditions {
        set_condition(
            &mut conditions,
            new_condition(type_, status, reason, message, generation),
        );
    }
    for (type_, value) in [(ct::STALLED, verdict.stalled), (ct::RECONCILING, verdict.reconciling)] {
        match value {
            Some((reason, message)) => set_condition(
                &mut conditions,
                new_condition(type_, ConditionStatus::True, reason, message, generation),
            ),
            None => {
                remove_condition(&mut conditions, type_);
            }
        }
    }
    let conductor_one = conductor_one(obs, &previous, &mut conditions);
    conditions.sort_by_key(|c| condition_order(&c.type_));

    let last_sync_time = obs
        .loops
        .values()
        .filter_map(|l| l.last_success)
        .max()
        .map(Time)
        .or(previous.last_sync_time.clone());
    let credentials = match &obs.fingerprint {
        Some((fingerprint, changed)) => Some(CredentialStatus {
            fingerprint: Some(fingerprint.clone()),
            last_changed: Some(Time(*changed)),
        }),
        None => previous.credentials.clone(),
    };
    BitbucketConnectorStatus {
        observed_generation: generation,
        conditions,
        state: Some(verdict.state.as_str().to_owned()),
        last_sync_time,
        resources: resources(previous.resources.clone().unwrap_or_default(), &obs.loops),
        credentials,
        last_handled_reconcile_at: obs.handled_reconcile_at.clone().or(previous.last_handled_reconcile_at),
        conductor_one,
        // The rotation's part is written by `super::rotation` after this.
        credential_rotation: previous.credential_rotation.clone(),
        progress: progress(&obs.progress, previous.progress.as_ref()),
    }
}

/// `status.progress`: absent while nothing runs; otherwise fresh figures
/// when the set of running types changed or `min_interval` has passed since
/// the last ones, else the previous figures unchanged (so the status writer,
/// which compares with its last write, writes nothing).
fn progress(obs: &ProgressObservation, previous: Option<&SyncProgress>) -> Option<SyncProgress> {
    if obs.running.is_empty() {
        return None;
    }
    let fresh = sync_progress(obs);
    if let Some(previous) = previous {
        let updated = previous.last_update_time.as_ref().map(|t| t.0);
        let recent = updated.is_some_and(|at| {
            obs.now.duration_since(at) < jiff::SignedDuration::try_from(obs.min_interval).unwrap_or_default()
        });
        if recent && previous.types.kinds() == fresh.types.kinds() {
            return Some(previous.clone());
        }
    }
    Some(fresh)
}

fn sync_progress(obs: &ProgressObservation) -> SyncProgress {
    let now = obs.now.round(jiff::Unit::Second).unwrap_or(obs.now);
    let at = |d: std::time::Duration| {
        let d = jiff::SignedDuration::try_from(d).unwrap_or_default();
        now.checked_add(d)
            .ok()
            .and_then(|t| t.round(jiff::Unit::Second).ok())
            .map(Time)
    };
    let waiting = obs.budget_wait.filter(|w| *w >= std::time::Duration::from_secs(1));
    let mut out = SyncProgress {
        last_update_time: Some(Time(now)),
        ..SyncProgress::default()
    };
    for p in &obs.running {
        let phase = match (waiting, p.total) {
            (Some(_), _) => "WaitingForBudget",
            (None, 0) => "Starting",
            (None, _) => "Syncing",
        };
        *out.types.get_mut(p.kind) = Some(TypeProgress {
            phase: phase.to_owned(),
            done: i64::try_from(p.done).unwrap_or(i64::MAX),
            total: i64::try_from(p.total).unwrap_or(i64::MAX),
            resumed: i64::try_from(p.resumed).unwrap_or(i64::MAX),
            estimated_completion_time: p.eta.and_then(at),
            waiting_for_budget_until: waiting.and_then(at),
        });
    }
    out.summary = progress_summary(&obs.running, waiting.is_some());
    out
}

/// `repositories 1200/5000 (24%), +2 more, waiting for budget`: the type
/// with the most work left decides when the sync ends, so it leads.
fn progress_summary(running: &[ProgressSnapshot], waiting: bool) -> String {
    let Some(lead) = running
        .iter()
        .max_by_key(|p| (p.total.saturating_sub(p.done), p.total, std::cmp::Reverse(p.kind)))
    else {
        return String::new();
    };
    let mut summary = if lead.total == 0 {
        format!("{} starting", lead.kind)
    } else {
        format!(
            "{} {}/{} ({}%)",
            lead.kind,
            lead.done,
            lead.total,
            lead.done.saturating_mul(100) / lead.total
        )
    };
    if running.len() > 1 {
        summary.push_str(&format!(", +{} more", running.len() - 1));
    }
    if waiting {
        summary.push_str(", waiting for budget");
    }
    summary
}

/// Sets or removes `ConductorOneConnected` and gives `status.conductorOne`.
fn conductor_one(
    obs: &Observation<'_>,
    previous: &BitbucketConnectorStatus,
    conditions: &mut Vec<Condition>,
) -> Option<ConductorOneStatus> {
    let generation = obs.generation;
    let mut set = |status, reason, message: &str| {
        set_condition(
            conditions,
            new_condition(
                ct::CONDUCTORONE_CONNECTED,
                status,
                reason,
                message.to_owned(),
                generation,
            ),
        )
    };
    match &obs.conductor_one {
        C1Health::NotConfigured => {
            remove_condition(conditions, ct::CONDUCTORONE_CONNECTED);
            None
        }
        C1Health::Unobserved => previous.conductor_one.clone(),
        C1Health::Stopped { message } => {
            let configured = obs.spec.conductor_one.is_some()
                || crate::crd::find_condition(&previous.conditions, ct::CONDUCTORONE_CONNECTED).is_some();
            if configured {
                set(ConditionStatus::Unknown, Reason::Stopped, message);
            }
            previous.conductor_one.clone()
        }
        C1Health::Refused { reason, message } => {
            set(ConditionStatus::False, *reason, message);
            previous.conductor_one.clone()
        }
        C1Health::Session(session) => {
            let view = session.condition();
            let status = ConditionStatus::parse(view.status).unwrap_or(ConditionStatus::Unknown);
            set(status, c1_reason(session.reason), &view.message);
            Some(session_status(session))
        }
    }
}

/// The condition reason of a session state.
fn c1_reason(reason: ConnectionReason) -> Reason {
    match reason {
        ConnectionReason::Connecting => Reason::Connecting,
        ConnectionReason::Connected => Reason::Connected,
        ConnectionReason::InvalidClientCredentials => Reason::InvalidClientCredentials,
        ConnectionReason::TlsError => Reason::TlsError,
        ConnectionReason::Unreachable => Reason::Unreachable,
        ConnectionReason::HelloRejected => Reason::HelloRejected,
        ConnectionReason::Stopped => Reason::Stopped,
    }
}

fn ms_time(ms: i64) -> Option<Time> {
    Timestamp::from_millisecond(ms).ok().map(Time)
}

fn session_status(session: &SessionStatus) -> ConductorOneStatus {
    ConductorOneStatus {
        host_id: Some(session.host_id.clone()),
        last_task: session.last_task.as_ref().map(|t| ConductorOneTask {
            type_: t.task_type.as_str().to_owned(),
            id: t.id.clone(),
            result: t.result.as_str().to_owned(),
            message: Some(t.message.clone()).filter(|m| !m.is_empty()),
            time: ms_time(t.finished_at),
        }),
        last_upload: session.last_upload.as_ref().map(|u| ConductorOneUpload {
            time: ms_time(u.at),
            bytes: i64::try_from(u.bytes).unwrap_or(i64::MAX),
            resources: i64::try_from(u.resources).unwrap_or(i64::MAX),
        }),
        task_counts: session
            .task_counts
            .iter()
            .map(|(k, c)| {
                (
                    k.clone(),
                    ConductorOneTaskCounts {
                        succeeded: i64::try_from(c.succeeded).unwrap_or(i64::MAX),
                        failed: i64::try_from(c.failed).unwrap_or(i64::MAX),
                    },
                )
            })
            .collect(),
    }
}

fn suspended() -> Verdict {
    Verdict::new(ConnectorState::Suspended)
        .set(
            ct::CONNECTED,
            ConditionStatus::Unknown,
            Reason::Suspended,
            "Not checked while suspended",
        )
        .set(
            ct::SYNCING,
            ConditionStatus::False,
            Reason::Suspended,
            "Sync loops are stopped: spec.suspend is true",
        )
        .set(ct::READY, ConditionStatus::False, Reason::Suspended, "Suspended")
}

fn secret_problem(reason: Reason, message: &str) -> Verdict {
    let mut verdict = Verdict::new(ConnectorState::Error)
        .set(ct::CONNECTED, ConditionStatus::False, reason, message)
        .set(
            ct::SYNCING,
            ConditionStatus::False,
            reason,
            match reason {
                Reason::ApiUrlNotAllowed => "Sync loops are stopped until spec.apiUrl is on the allow-list",
                _ => "Sync loops are stopped until the Secret is usable",
            },
        )
        .set(ct::READY, ConditionStatus::False, reason, message);
    verdict.stalled = Some((reason, message.to_owned()));
    verdict
}

fn connecting() -> Verdict {
    const CHECKING: &str = "Checking the credentials with Bitbucket";
    let mut verdict = Verdict::new(ConnectorState::Pending)
        .set(ct::CONNECTED, ConditionStatus::Unknown, Reason::Progressing, CHECKING)
        .set(ct::READY, ConditionStatus::False, Reason::Progressing, CHECKING);
    verdict.reconciling = Some((Reason::Progressing, CHECKING.to_owned()));
    verdict
}

fn connect_failed(reason: Reason, message: &str, stalled: bool) -> Verdict {
    let mut verdict = Verdict::new(ConnectorState::Error)
        .set(ct::CONNECTED, ConditionStatus::False, reason, message)
        .set(
            ct::SYNCING,
            ConditionStatus::False,
            reason,
            format!("No sync can succeed until this is fixed: {message}"),
        )
        .set(ct::READY, ConditionStatus::False, reason, message);
    if stalled {
        verdict.stalled = Some((reason, message.to_owned()));
    } else {
        verdict.reconciling = Some((reason, format!("Retrying: {message}")));
    }
    verdict
}

fn connected(workspaces: &[String], loops: &BTreeMap<SyncKind, LoopStatus>) -> Verdict {
    let enabled: Vec<(SyncKind, &LoopStatus)> = loops.iter().filter(|(_, l)| l.enabled).map(|(k, l)| (*k, l)).collect();
    let running: Vec<&str> = enabled
        .iter()
        .filter(|(_, l)| l.running)
        .map(|(k, _)| k.as_str())
        .collect();
    let failed: Vec<String> = enabled
        .iter()
        .filter_map(|(k, l)| l.last_error.as_ref().map(|e| format!("{k}: {e}")))
        .collect();
    let waiting: Vec<&str> = enabled
        .iter()
        .filter(|(_, l)| l.last_success.is_none())
        .map(|(k, _)| k.as_str())
        .collect();
    let ready = enabled.iter().all(|(_, l)| l.current());
    let state = if !running.is_empty() {
        ConnectorState::Syncing
    } else if ready {
        ConnectorState::Connected
    } else if !failed.is_empty() {
        ConnectorState::Error
    } else {
        ConnectorState::Pending
    };
    let mut verdict = Verdict::new(state).set(
        ct::CONNECTED,
        ConditionStatus::True,
        Reason::Connected,
        format!(
            "Credentials accepted; {} workspace(s) reachable: {}",
            workspaces.len(),
            workspaces.join(", ")
        ),
    );
    verdict = if running.is_empty() {
        verdict.set(ct::SYNCING, ConditionStatus::False, Reason::Idle, "No sync is running")
    } else {
        let message = format!("Syncing {}", running.join(", "));
        verdict.set(ct::SYNCING, ConditionStatus::True, Reason::SyncInProgress, message)
    };
    if ready {
        let message = "Every enabled resource type is synced";
        return verdict.set(ct::READY, ConditionStatus::True, Reason::SyncSucceeded, message);
    }
    let (reason, message) = if failed.is_empty() {
        (
            Reason::Progressing,
            format!("Waiting for the first sync of {}", waiting.join(", ")),
        )
    } else {
        let message = format!("Last sync failed (previous data kept): {}", failed.join("; "));
        (Reason::SyncFailed, message)
    };
    verdict.reconciling = Some((reason, message.clone()));
    verdict.set(ct::READY, ConditionStatus::False, reason, message)
}

/// Per-type status: every enabled type, and disabled ones that have run.
fn resources(mut resources: ResourceStatuses, loops: &BTreeMap<SyncKind, LoopStatus>) -> Option<ResourceStatuses> {
    for (kind, l) in loops {
        *resources.get_mut(*kind) = if l.enabled || l.last_end.is_some() {
            Some(resource_status(l))
        } else {
            None
        };
    }
    if resources.kinds().is_empty() {
        None
    } else {
        Some(resources)
    }
}

fn resource_status(l: &LoopStatus) -> ResourceSyncStatus {
    ResourceSyncStatus {
        count: l.count,
        last_sync_start: l.last_start.map(Time),
        last_sync_end: l.last_end.map(Time),
        duration_seconds: l.duration_seconds,
        requests: l.requests,
        last_error: l.last_error.clone(),
        last_success: l.last_success.map(Time),
    }
}

fn condition_order(type_: &str) -> usize {
    [
        ct::READY,
        ct::CONNECTED,
        ct::SYNCING,
        ct::RECONCILING,
        ct::STALLED,
        ct::CONDUCTORONE_CONNECTED,
    ]
    .iter()
    .position(|t| *t == type_)
    .unwrap_or(usize::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{SecretRef, find_condition};

    fn spec() -> BitbucketConnectorSpec {
        BitbucketConnectorSpec {
            secret_ref: SecretRef { name: "s".into() },
            secret_keys: None,
            workspaces: None,
            provisioning: None,
            suspend: false,
            interval: None,
            resources: None,
            rate_limit: None,
            api_url: None,
            credential_rotation: None,
            conductor_one: None,
        }
    }

    #[test]
    fn conductorone_condition_follows_the_session_and_is_absent_when_not_configured() {
        use crate::conductorone::{ConnectionReason, SessionStatus};
        let spec = spec();
        let mut session = SessionStatus::new("identity/c");
        let mut o = obs(&spec, connected(), BTreeMap::new());
        o.conductor_one = C1Health::Session(session.clone());
        let s = compute(&o);
        assert_eq!(status_of(&s, ct::CONDUCTORONE_CONNECTED), Some("Unknown"));
        assert_eq!(s.conductor_one.as_ref().unwrap().host_id.as_deref(), Some("identity/c"));

        session.set_connection(ConnectionReason::TlsError, "unknown CA");
        o.conductor_one = C1Health::Session(session.clone());
        o.previous = Some(&s);
        let failed = compute(&o);
        let c = find_condition(&failed.conditions, ct::CONDUCTORONE_CONNECTED).unwrap();
        assert_eq!((c.status.as_str(), c.reason.as_str()), ("False", "TLSError"));

        let mut o = obs(&spec, connected(), BTreeMap::new());
        o.previous = Some(&failed);
        o.conductor_one = C1Health::Refused {
            reason: Reason::ApiUrlNotAllowed,
            message: "no".into(),
        };
        let refused = compute(&o);
        let c = find_condition(&refused.conditions, ct::CONDUCTORONE_CONNECTED).unwrap();
        assert_eq!(c.reason, "ApiUrlNotAllowed");

        o.previous = Some(&refused);
        o.conductor_one = C1Health::Unobserved;
        assert_eq!(status_of(&compute(&o), ct::CONDUCTORONE_CONNECTED), Some("False"));
        o.conductor_one = C1Health::NotConfigured;
        let gone = compute(&o);
        assert_eq!(status_of(&gone, ct::CONDUCTORONE_CONNECTED), None);
        assert!(gone.conductor_one.is_none());
    }

    fn synced(at: i64) -> LoopStatus {
        let t = Timestamp::from_second(at).unwrap();
        LoopStatus {
            enabled: true,
            count: 3,
            last_start: Some(t),
            last_end: Some(t),
            last_success: Some(t),
            ..LoopStatus::default()
        }
    }

    fn obs(spec: &BitbucketConnectorSpec, health: Health, loops: BTreeMap<SyncKind, LoopStatus>) -> Observation<'_> {
        Observation {
            generation: Some(2),
            spec,
            previous: None,
            health,
            loops,
            fingerprint: None,
            handled_reconcile_at: None,
            conductor_one: C1Health::NotConfigured,
            progress: ProgressObservation::idle(),
        }
    }

    fn status_of<'a>(s: &'a BitbucketConnectorStatus, t: &str) -> Option<&'a str> {
        find_condition(&s.conditions, t).map(|c| c.status.as_str())
    }

    fn connected() -> Health {
        Health::Connected {
            workspaces: vec!["acme".into()],
        }
    }

    #[test]
    fn all_synced_is_ready_and_connected_without_kstatus_conditions() {
        let spec = spec();
        let loops = SyncKind::ALL.iter().map(|&k| (k, synced(100))).collect();
        let s = compute(&obs(&spec, connected(), loops));
        assert_eq!(s.state.as_deref(), Some("Connected"));
        assert_eq!(status_of(&s, "Ready"), Some("True"));
        assert_eq!(status_of(&s, "Connected"), Some("True"));
        assert_eq!(status_of(&s, "Syncing"), Some("False"));
        assert_eq!(status_of(&s, "Reconciling"), None, "absent unless True");
        assert_eq!(status_of(&s, "Stalled"), None, "absent unless True");
        assert_eq!(s.observed_generation, Some(2));
        assert!(s.conditions.iter().all(|c| c.observed_generation == Some(2)));
        assert_eq!(s.resources.as_ref().unwrap().groups.as_ref().unwrap().count, 3);
        assert_eq!(s.last_sync_time, Some(Time(Timestamp::from_second(100).unwrap())));
    }

    #[test]
    fn a_running_loop_shows_syncing_and_first_syncs_are_reconciling() {
        let spec = spec();
        let mut loops: BTreeMap<_, _> = SyncKind::ALL
            .iter()
            .map(|&k| {
                (
                    k,
                    LoopStatus {
                        enabled: true,
                        ..Default::default()
                    },
                )
            })
            .collect();
        loops.get_mut(&SyncKind::Groups).unwrap().running = true;
        let s = compute(&obs(&spec, connected(), loops));
        assert_eq!(s.state.as_deref(), Some("Syncing"));
        assert_eq!(status_of(&s, "Syncing"), Some("True"));
        assert_eq!(status_of(&s, "Ready"), Some("False"));
        assert_eq!(status_of(&s, "Reconciling"), Some("True"));
        assert!(
            find_condition(&s.conditions, "Syncing")
                .unwrap()
                .message
                .contains("groups")
        );
    }

    #[test]
    fn a_failed_run_is_not_ready_but_keeps_counts() {
        let spec = spec();
        let mut loops: BTreeMap<_, _> = SyncKind::ALL.iter().map(|&k| (k, synced(100))).collect();
        loops.get_mut(&SyncKind::Repositories).unwrap().last_error = Some("Bitbucket unavailable".into());
        let s = compute(&obs(&spec, connected(), loops));
        let ready = find_condition(&s.conditions, "Ready").unwrap();
        assert_eq!((ready.status.as_str(), ready.reason.as_str()), ("False", "SyncFailed"));
        assert!(ready.message.contains("repositories: Bitbucket unavailable"));
        assert_eq!(s.state.as_deref(), Some("Error"));
        assert_eq!(
            s.resources.as_ref().unwrap().repositories.as_ref().unwrap().count,
            3,
            "previous data kept"
        );
    }

    #[test]
    fn disabled_types_do_not_block_ready() {
        let spec = spec();
        let mut loops: BTreeMap<_, _> = SyncKind::ALL.iter().map(|&k| (k, synced(100))).collect();
        loops.insert(
            SyncKind::Repositories,
            LoopStatus {
                enabled: false,
                ..Default::default()
            },
        );
        let s = compute(&obs(&spec, connected(), loops));
        assert_eq!(status_of(&s, "Ready"), Some("True"));
        assert!(s.resources.as_ref().unwrap().repositories.is_none());
    }

    #[test]
    fn secret_problems_and_rejected_credentials_stall() {
        let spec = spec();
        let s = compute(&obs(
            &spec,
            Health::SecretProblem {
                reason: Reason::SecretNotFound,
                message: "Secret s not found".into(),
            },
            BTreeMap::new(),
        ));
        let stalled = find_condition(&s.conditions, "Stalled").unwrap();
        assert_eq!(
            (stalled.status.as_str(), stalled.reason.as_str()),
            ("True", "SecretNotFound")
        );
        assert_eq!(status_of(&s, "Reconciling"), None);
        assert_eq!(s.state.as_deref(), Some("Error"));

        let s = compute(&obs(
            &spec,
            Health::ConnectFailed {
                reason: Reason::InvalidCredentials,
                message: "401: use the email".into(),
                stalled: true,
            },
            BTreeMap::new(),
        ));
        let connected = find_condition(&s.conditions, "Connected").unwrap();
        assert_eq!(
            (connected.status.as_str(), connected.reason.as_str()),
            ("False", "InvalidCredentials")
        );
        assert!(connected.message.contains("email"));
        assert_eq!(status_of(&s, "Stalled"), Some("True"));
    }

    #[test]
    fn transient_failures_reconcile_instead_of_stalling() {
        let spec = spec();
        let s = compute(&obs(
            &spec,
            Health::ConnectFailed {
                reason: Reason::BitbucketUnavailable,
                message: "503".into(),
                stalled: false,
            },
            BTreeMap::new(),
        ));
        assert_eq!(status_of(&s, "Stalled"), None);
        assert_eq!(status_of(&s, "Reconciling"), Some("True"));
    }

    #[test]
    fn recovery_clears_stalled_and_transition_times_are_kept_when_unchanged() {
        let spec = spec();
        let failed = compute(&obs(
            &spec,
            Health::SecretProblem {
                reason: Reason::SecretNotFound,
                message: "missing".into(),
            },
            BTreeMap::new(),
        ));
        let loops: BTreeMap<_, _> = SyncKind::ALL.iter().map(|&k| (k, synced(100))).collect();
        let mut o = obs(&spec, connected(), loops);
        o.previous = Some(&failed);
        let recovered = compute(&o);
        assert_eq!(status_of(&recovered, "Stalled"), None);
        assert_eq!(status_of(&recovered, "Ready"), Some("True"));
        // Same status again: lastTransitionTime must not move.
        let mut again = o.clone();
        again.previous = Some(&recovered);
        let later = compute(&again);
        assert_eq!(
            find_condition(&later.conditions, "Ready").unwrap().last_transition_time,
            find_condition(&recovered.conditions, "Ready")
                .unwrap()
                .last_transition_time
        );
    }

    #[test]
    fn suspended_and_fingerprint_and_flux_handled() {
        let spec = spec();
        let mut o = obs(&spec, Health::Suspended, BTreeMap::new());
        o.fingerprint = Some(("abc123def456".into(), Timestamp::from_second(5).unwrap()));
        o.handled_reconcile_at = Some("2026-11-29T00:00:00Z".into());
        let s = compute(&o);
        assert_eq!(s.state.as_deref(), Some("Suspended"));
        assert_eq!(status_of(&s, "Ready"), Some("False"));
        assert_eq!(status_of(&s, "Connected"), Some("Unknown"));
        let connecting = compute(&obs(&spec, Health::Connecting, BTreeMap::new()));
        assert_eq!(status_of(&connecting, "Connected"), Some("Unknown"));
        assert_eq!(status_of(&connecting, "Reconciling"), Some("True"));
        assert_eq!(connecting.state.as_deref(), Some("Pending"));
        assert_eq!(
            s.credentials.as_ref().unwrap().fingerprint.as_deref(),
            Some("abc123def456")
        );
        assert_eq!(s.last_handled_reconcile_at.as_deref(), Some("2026-11-29T00:00:00Z"));
    }

    fn snapshot(kind: SyncKind, done: u64, total: u64, eta_s: Option<u64>) -> ProgressSnapshot {
        ProgressSnapshot {
            kind,
            done,
            total,
            resumed: 0,
            finished: false,
            elapsed: std::time::Duration::from_secs(10),
            eta: eta_s.map(std::time::Duration::from_secs),
        }
    }

    fn running(at: i64, snapshots: Vec<ProgressSnapshot>) -> ProgressObservation {
        ProgressObservation {
            now: Timestamp::from_second(at).unwrap(),
            min_interval: std::time::Duration::from_secs(30),
            running: snapshots,
            budget_wait: None,
        }
    }

    #[test]
    fn progress_shows_each_running_type_and_the_type_with_most_work_left_leads_the_column() {
        let spec = spec();
        let mut o = obs(&spec, connected(), BTreeMap::new());
        o.progress = running(
            1_000,
            vec![
                snapshot(SyncKind::Groups, 1, 2, None),
                snapshot(SyncKind::Repositories, 1200, 5000, Some(600)),
            ],
        );
        let s = compute(&o);
        let p = s.progress.as_ref().expect("progress while runs are in progress");
        assert_eq!(p.summary, "repositories 1200/5000 (24%), +1 more");
        let repos = p.types.repositories.as_ref().unwrap();
        assert_eq!((repos.phase.as_str(), repos.done, repos.total), ("Syncing", 1200, 5000));
        assert_eq!(
            repos.estimated_completion_time,
            Some(Time(Timestamp::from_second(1_600).unwrap()))
        );
        assert!(p.types.groups.is_some() && p.types.accounts.is_none());

        o.progress.budget_wait = Some(std::time::Duration::from_secs(90));
        o.progress.running = vec![snapshot(SyncKind::Projects, 0, 0, None)];
        let s = compute(&o);
        let p = s.progress.unwrap();
        assert_eq!(p.summary, "projects starting, waiting for budget");
        let projects = p.types.projects.unwrap();
        assert_eq!(projects.phase, "WaitingForBudget");
        assert_eq!(
            projects.waiting_for_budget_until,
            Some(Time(Timestamp::from_second(1_090).unwrap()))
        );
    }

    #[test]
    fn progress_figures_refresh_at_most_every_interval_and_clear_when_runs_end() {
        let spec = spec();
        let mut o = obs(&spec, connected(), BTreeMap::new());
        o.progress = running(1_000, vec![snapshot(SyncKind::Repositories, 10, 100, Some(90))]);
        let first = compute(&o);

        // 20 s later, more done: the figures stay, so nothing is written.
        o.previous = Some(&first);
        o.progress = running(1_020, vec![snapshot(SyncKind::Repositories, 40, 100, Some(30))]);
        let second = compute(&o);
        assert_eq!(second, first, "no status change inside the interval");

        // A type starting shows at once.
        o.progress.running.push(snapshot(SyncKind::Groups, 0, 0, None));
        let third = compute(&o);
        assert_eq!(
            third.progress.as_ref().unwrap().types.kinds(),
            [SyncKind::Groups, SyncKind::Repositories]
        );
        assert_eq!(
            third
                .progress
                .as_ref()
                .unwrap()
                .types
                .repositories
                .as_ref()
                .unwrap()
                .done,
            40
        );

        // Past the interval: fresh figures.
        o.previous = Some(&third);
        o.progress = running(
            1_051,
            vec![
                snapshot(SyncKind::Repositories, 70, 100, Some(10)),
                snapshot(SyncKind::Groups, 2, 2, None),
            ],
        );
        let fourth = compute(&o);
        assert_eq!(
            fourth
                .progress
                .as_ref()
                .unwrap()
                .types
                .repositories
                .as_ref()
                .unwrap()
                .done,
            70
        );

        // Nothing runs: progress is cleared.
        o.previous = Some(&fourth);
        o.progress = ProgressObservation::idle();
        assert_eq!(compute(&o).progress, None);
    }
}
