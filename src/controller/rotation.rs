//! The operator side of ConductorOne credential rotation
//! ([`crate::conductorone::rotation`] does the crash-safe sequence).
//!
//! Decisions:
//! - *Where the pairs live.* An operator-owned Secret
//!   (`spec.credentialRotation.targetSecretName`, default
//!   `<connector>-conductorone`), owned by the connector (garbage-collected
//!   with it), labelled [`MANAGED_BY_LABEL`] and [`ROTATED_FOR_LABEL`], and
//!   written only by server-side apply with this operator's field manager.
//!   Keys: `BATON_CLIENT_ID` / `BATON_CLIENT_SECRET` (the active pair),
//!   `PENDING_CLIENT_ID` / `PENDING_CLIENT_SECRET` (a pair being proved) and
//!   `rotation.json` (the journal, the active credential's id and the last
//!   rotation; no secret). The user's Secret is never written. A Secret of
//!   that name that the operator does not own is never touched.
//! - *Precedence.* Once the target Secret holds an active pair (it was proved
//!   before it got there), the ConductorOne session uses it instead of the
//!   user's pair; the session restarts with it (its config changed). Removing
//!   `spec.credentialRotation` or deleting the target Secret goes back to the
//!   user's pair.
//! - *Triggers.* `schedule` (from the last rotation, else from the
//!   credential's `createdAt`), `beforeExpiry` (from GetCredentials'
//!   `expiresTime`) and a new value of [`ROTATE_REQUESTED_AT_ANNOTATION`]
//!   (acknowledged in `status.credentialRotation.lastHandledRotateAt` whatever
//!   the outcome, like Flux's `lastHandledReconcileAt`). `enabled: false` and
//!   `suspend` start nothing; a rotation in progress is still finished (not
//!   while suspended: suspend pauses everything).
//! - *kstatus.* The `CredentialsRotated` condition is not folded into `Ready`
//!   or `Stalled`: a failed rotation leaves the old, working pair in use and
//!   syncs go on, so the connector stays Ready; the condition (False with
//!   `RotationFailed`, `RotationNotAuthorized` or `CredentialExpiringSoon`)
//!   and a Warning Event say what needs attention.
//! - The rotation runs inline in the reconcile (a handful of calls, each with
//!   a timeout); GetCredentials is asked at most every [`DESCRIBE_EVERY`] per
//!   credential.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use jiff::Timestamp;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::{Event, EventType};
use serde::{Deserialize, Serialize};

use super::common::FIELD_MANAGER;
use super::connector::Context;
use super::secret::{SecretRead, read_opted_in};
use crate::conductorone::C1Endpoint;
use crate::conductorone::credential_api::{ConnectorRef, CredentialInfo};
use crate::conductorone::metrics::ConnectorKey;
use crate::conductorone::rotation::{
    Authority, BaseCredential, Caller, CredentialRef, Failure, FailureKind, Outcome, Pair, RotationJournal,
    RotationRecord, RotationState, RotationStore, Rotator, StoreError, StoredCredential,
};
use crate::crd::{
    BitbucketConnector, BitbucketConnectorStatus, ConditionStatus, CredentialRotation, CredentialRotationStatus,
    EventReason, ROTATE_REQUESTED_AT_ANNOTATION, Reason, condition_type as ct, find_condition, new_condition,
    remove_condition, set_condition,
};
use crate::settings::{ConnectorSettings, OPT_IN_LABEL, PlatformCredentials};

/// Marks the target Secret as written by the operator.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
pub const MANAGED_BY: &str = "bitbucket-operator";
/// Names the connector whose rotated pair the target Secret holds.
pub const ROTATED_FOR_LABEL: &str = "connectors.dev/rotated-for";
/// The journal key of the target Secret.
const JOURNAL_KEY: &str = "rotation.json";
const ACTIVE_ID: &str = "BATON_CLIENT_ID";
const ACTIVE_SECRET: &str = "BATON_CLIENT_SECRET";
const PENDING_ID: &str = "PENDING_CLIENT_ID";
const PENDING_SECRET: &str = "PENDING_CLIENT_SECRET";
/// How often GetCredentials is asked about one credential.
pub const DESCRIBE_EVERY: Duration = Duration::from_secs(600);
/// The expiry warning window when `beforeExpiry` is not set.
const DEFAULT_EXPIRY_WARNING: Duration = Duration::from_secs(7 * 86_400);
/// Retry of a failed step.
const RETRY_AFTER: Duration = Duration::from_secs(60);

/// GetCredentials answers, per credential, kept for [`DESCRIBE_EVERY`].
#[derive(Default)]
pub struct DescribeCache(Mutex<HashMap<String, (Instant, Described)>>);

/// One GetCredentials answer.
type Described = Result<CredentialInfo, Failure>;

impl DescribeCache {
    fn get(&self, key: &str) -> Option<Result<CredentialInfo, Failure>> {
        let cache = self.0.lock().unwrap_or_else(|e| e.into_inner());
        cache
            .get(key)
            .filter(|(at, _)| at.elapsed() < DESCRIBE_EVERY)
            .map(|(_, r)| r.clone())
    }

    fn put(&self, key: String, value: Result<CredentialInfo, Failure>) {
        let mut cache = self.0.lock().unwrap_or_else(|e| e.into_inner());
        cache.retain(|_, (at, _)| at.elapsed() < DESCRIBE_EVERY);
        cache.insert(key, (Instant::now(), value));
    }
}

/// The journal key's content: everything but the secrets.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct JournalDoc {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    active: Option<CredentialRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    journal: Option<RotationJournal>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    last: Option<RotationRecord>,
}

/// The rotation state in the operator-owned target Secret.
pub struct SecretStore {
    api: Api<Secret>,
    name: String,
    connector: BitbucketConnector,
}

impl SecretStore {
    pub fn new(client: kube::Client, connector: &BitbucketConnector, name: String) -> Self {
        SecretStore {
            api: Api::namespaced(client, &connector.namespace().unwrap_or_default()),
            name,
            connector: connector.clone(),
        }
    }

    /// Whether `secret` was written by this operator for this connector.
    fn ours(&self, secret: &Secret) -> bool {
        let uid = self.connector.uid();
        secret.labels().get(MANAGED_BY_LABEL).map(String::as_str) == Some(MANAGED_BY)
            && secret
                .owner_references()
                .iter()
                .any(|o| Some(&o.uid) == uid.as_ref() && o.kind == "BitbucketConnector")
    }
}

fn text(data: &BTreeMap<String, ByteString>, key: &str) -> Option<String> {
    data.get(key)
        .and_then(|v| String::from_utf8(v.0.clone()).ok())
        .filter(|v| !v.trim().is_empty())
}

impl RotationStore for SecretStore {
    async fn load(&self) -> Result<RotationState, StoreError> {
        let secret = self
            .api
            .get_opt(&self.name)
            .await
            .map_err(|e| StoreError(format!("reading Secret {}: {e}", self.name)))?;
        let Some(secret) = secret else {
            return Ok(RotationState::default());
        };
        if !self.ours(&secret) {
            return Err(StoreError(format!(
                "Secret {} exists and was not created by the operator for this connector; it is left alone: set \
                 spec.credentialRotation.targetSecretName to another name",
                self.name
            )));
        }
        let data = secret.data.unwrap_or_default();
        let doc: JournalDoc = match data.get(JOURNAL_KEY) {
            Some(bytes) => serde_json::from_slice(&bytes.0)
                .map_err(|e| StoreError(format!("Secret {} key {JOURNAL_KEY}: {e}", self.name)))?,
            None => JournalDoc::default(),
        };
        let pair = |id, secret| Some(Pair::new(text(&data, id)?, text(&data, secret)?));
        Ok(RotationState {
            active: match (doc.active, pair(ACTIVE_ID, ACTIVE_SECRET)) {
                (Some(info), Some(pair)) => Some(StoredCredential { info, pair }),
                _ => None,
            },
            pending: pair(PENDING_ID, PENDING_SECRET),
            journal: doc.journal,
            last: doc.last,
        })
    }

    /// One server-side apply of the whole Secret: keys left out are removed.
    async fn save(&self, state: &RotationState) -> Result<(), StoreError> {
        let mut data = BTreeMap::new();
        let mut put = |key: &str, value: &str| {
            data.insert(key.to_owned(), ByteString(value.as_bytes().to_vec()));
        };
        if let Some(active) = &state.active {
            put(ACTIVE_ID, &active.pair.client_id);
            put(ACTIVE_SECRET, &active.pair.client_secret);
        }
        if let Some(pending) = &state.pending {
            put(PENDING_ID, &pending.client_id);
            put(PENDING_SECRET, &pending.client_secret);
        }
        let doc = JournalDoc {
            active: state.active.as_ref().map(|a| a.info.clone()),
            journal: state.journal.clone(),
            last: state.last.clone(),
        };
        let doc = serde_json::to_string(&doc).map_err(|e| StoreError(e.to_string()))?;
        put(JOURNAL_KEY, &doc);
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some(self.name.clone()),
                namespace: self.connector.namespace(),
                labels: Some(BTreeMap::from([
                    (MANAGED_BY_LABEL.to_owned(), MANAGED_BY.to_owned()),
                    (ROTATED_FOR_LABEL.to_owned(), self.connector.name_any()),
                    (OPT_IN_LABEL.to_owned(), "true".to_owned()),
                ])),
                owner_references: kube::Resource::controller_owner_ref(&self.connector, &()).map(|o| vec![o]),
                ..ObjectMeta::default()
            },
            type_: Some("Opaque".into()),
            data: Some(data),
            ..Secret::default()
        };
        self.api
            .patch(
                &self.name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&secret),
            )
            .await
            .map(drop)
            .map_err(|e| StoreError(format!("writing Secret {}: {e}", self.name)))
    }
}

/// What the rotation contributes to a reconcile pass.
#[derive(Debug, Default)]
pub enum RotationView {
    /// No `spec.credentialRotation`: no condition, no status.
    #[default]
    NotConfigured,
    /// Not looked at in this pass: the status keeps what it said.
    Unobserved,
    Observed(Box<Observed>),
}

/// The observed rotation state.
#[derive(Debug)]
pub struct Observed {
    /// The condition to set; `None` keeps the previous one.
    pub condition: Option<(ConditionStatus, Reason, String)>,
    pub status: CredentialRotationStatus,
    /// The pair the session should use, when the rotation provides one.
    pub session_pair: Option<PlatformCredentials>,
    /// Come back this soon (a retry, the next due rotation).
    pub requeue: Option<Duration>,
}

impl RotationView {
    /// The settings the ConductorOne session is built from: the rotated pair
    /// takes precedence over the user's.
    pub fn session_settings(&self, settings: &ConnectorSettings) -> ConnectorSettings {
        let mut settings = settings.clone();
        if let RotationView::Observed(observed) = self
            && let Some(pair) = &observed.session_pair
        {
            settings.platform = Some(pair.clone());
        }
        settings
    }

    pub fn requeue(&self) -> Option<Duration> {
        match self {
            RotationView::Observed(observed) => observed.requeue,
            _ => None,
        }
    }

    /// Writes the condition and `status.credentialRotation` into `status`.
    pub fn apply_status(&self, status: &mut BitbucketConnectorStatus, generation: Option<i64>) {
        match self {
            RotationView::NotConfigured => {
                remove_condition(&mut status.conditions, ct::CREDENTIALS_ROTATED);
                status.credential_rotation = None;
            }
            RotationView::Unobserved => {}
            RotationView::Observed(observed) => {
                if let Some((state, reason, message)) = &observed.condition {
                    set_condition(
                        &mut status.conditions,
                        new_condition(ct::CREDENTIALS_ROTATED, *state, *reason, message.clone(), generation),
                    );
                } else if let Some(c) = status
                    .conditions
                    .iter_mut()
                    .find(|c| c.type_ == ct::CREDENTIALS_ROTATED)
                {
                    c.observed_generation = generation;
                }
                status.credential_rotation = Some(observed.status.clone());
            }
        }
    }
}

/// What should start a rotation now, and when the next one is due.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Due {
    pub trigger: Option<String>,
    pub next: Option<Timestamp>,
}

/// The inputs of [`due`]: a pure decision, tested with a fixed clock.
#[derive(Debug, Clone, Default)]
pub struct DueInputs<'a> {
    pub now: Timestamp,
    pub enabled: bool,
    pub schedule: Option<Duration>,
    pub before_expiry: Option<Duration>,
    pub requested: Option<&'a str>,
    pub handled: Option<&'a str>,
    /// The last rotation, else when the credential in use was issued.
    pub since: Option<Timestamp>,
    pub expires: Option<Timestamp>,
}

fn minus(t: Timestamp, d: Duration) -> Option<Timestamp> {
    t.checked_sub(jiff::SignedDuration::try_from(d).ok()?).ok()
}

fn plus(t: Timestamp, d: Duration) -> Option<Timestamp> {
    t.checked_add(jiff::SignedDuration::try_from(d).ok()?).ok()
}

/// Which trigger fires now (the annotation first), and the next due time.
pub fn due(inputs: &DueInputs<'_>) -> Due {
    let scheduled = inputs
        .schedule
        .and_then(|s| inputs.since.and_then(|since| plus(since, s)));
    let expiry = inputs
        .before_expiry
        .and_then(|b| inputs.expires.and_then(|e| minus(e, b)));
    let next = [scheduled, expiry].into_iter().flatten().min();
    if !inputs.enabled {
        return Due { trigger: None, next };
    }
    let trigger = match inputs.requested {
        Some(value) if Some(value) != inputs.handled => Some(format!("annotation:{value}")),
        _ if expiry.is_some_and(|t| t <= inputs.now) => Some("beforeExpiry".to_owned()),
        _ if scheduled.is_some_and(|t| t <= inputs.now) => Some("schedule".to_owned()),
        _ => None,
    };
    Due { trigger, next }
}

/// Whether `expires` is within the warning window.
pub fn expiring_soon(expires: Option<Timestamp>, before_expiry: Option<Duration>, now: Timestamp) -> bool {
    let window = before_expiry.unwrap_or(DEFAULT_EXPIRY_WARNING);
    expires.and_then(|e| minus(e, window)).is_some_and(|t| t <= now)
}

fn time(t: Option<Timestamp>) -> Option<Time> {
    t.map(Time)
}

fn failed(message: String) -> (ConditionStatus, Reason, String) {
    (ConditionStatus::False, Reason::RotationFailed, message)
}

/// Everything the pass needs that comes from the spec and the Secrets.
struct Setup {
    rotator: Rotator<SecretStore>,
    rotation: CredentialRotation,
}

/// Builds the rotator, or the condition saying why none can run.
async fn setup(
    ctx: &Context,
    obj: &BitbucketConnector,
    rotation: &CredentialRotation,
    settings: &ConnectorSettings,
) -> Result<Setup, String> {
    let namespace = obj.namespace().unwrap_or_default();
    let Some(platform) = &settings.platform else {
        return Err("the Secret has no BATON_CLIENT_ID and BATON_CLIENT_SECRET to rotate".into());
    };
    let target = rotation.target_secret(&obj.name_any());
    if target == obj.spec.secret_ref.name {
        return Err(format!(
            "spec.credentialRotation.targetSecretName {target} is the user's Secret (spec.secretRef); the operator \
             never writes it: choose another name"
        ));
    }
    let tenant_host = crate::conductorone::credentials::ClientId::parse(&platform.client_id)
        .map_err(|e| e.to_string())?
        .host;
    let c1 = obj.spec.conductor_one.clone().unwrap_or_default();
    let endpoint = C1Endpoint {
        tenant_host,
        api_host_override: c1.api_host.clone().filter(|h| !h.trim().is_empty()),
        extra_ca_pem: c1.ca_bundle.clone().map(String::into_bytes),
    };
    if let Err(err) = ctx.manager.egress().check_conductorone_host(endpoint.api_host()) {
        return Err(format!("ConductorOne host {}: {err}", endpoint.api_host()));
    }
    let caller = match &rotation.api_key_secret_ref {
        None => Caller::Own,
        Some(reference) => {
            let secret = match read_opted_in(&ctx.scaffold.client, &namespace, &reference.name).await {
                Ok(SecretRead::Found(secret)) => secret,
                Ok(SecretRead::NotFound) => return Err(format!("API key Secret {} not found", reference.name)),
                Ok(SecretRead::NotOptedIn) => {
                    return Err(format!(
                        "API key Secret {} does not carry the label {OPT_IN_LABEL}: \"true\"",
                        reference.name
                    ));
                }
                Err(err) => return Err(format!("reading API key Secret {}: {err}", reference.name)),
            };
            let data = secret.data.unwrap_or_default();
            match (text(&data, ACTIVE_ID), text(&data, ACTIVE_SECRET)) {
                (Some(id), Some(key)) => Caller::ApiKey(Pair::new(id.trim(), key.trim())),
                _ => {
                    return Err(format!(
                        "API key Secret {} lacks BATON_CLIENT_ID or BATON_CLIENT_SECRET",
                        reference.name
                    ));
                }
            }
        }
    };
    let rotator = Rotator {
        store: SecretStore::new(ctx.scaffold.client.clone(), obj, target),
        authority: Authority {
            endpoint,
            connector: ConnectorRef {
                app_id: rotation.app_id.clone(),
                connector_id: rotation.connector_id.clone(),
            },
            caller,
            host_id: runtime_host_id(obj),
        },
        base: BaseCredential {
            credential_id: rotation.credential_id.clone(),
            pair: Pair::new(platform.client_id.trim(), platform.client_secret.trim()),
        },
    };
    Ok(Setup {
        rotator,
        rotation: rotation.clone(),
    })
}

/// The session's host id (`namespace/name`), so the proof's Hello is this connector's.
fn runtime_host_id(obj: &BitbucketConnector) -> String {
    format!("{}/{}", obj.namespace().unwrap_or_default(), obj.name_any())
        .chars()
        .take(256)
        .collect()
}

/// One pass: reads the target Secret, decides, runs or resumes a rotation,
/// and says what the status shows.
pub async fn reconcile_rotation(
    ctx: &Context,
    obj: &BitbucketConnector,
    settings: &ConnectorSettings,
    previous: Option<&BitbucketConnectorStatus>,
) -> RotationView {
    let Some(rotation) = obj.spec.credential_rotation.clone() else {
        forget_expiry(ctx, obj);
        return RotationView::NotConfigured;
    };
    let previous_status = previous.and_then(|s| s.credential_rotation.clone()).unwrap_or_default();
    let requested = obj.annotations().get(ROTATE_REQUESTED_AT_ANNOTATION).cloned();
    let mut status = CredentialRotationStatus {
        last_handled_rotate_at: previous_status.last_handled_rotate_at.clone(),
        ..CredentialRotationStatus::default()
    };
    let setup = match setup(ctx, obj, &rotation, settings).await {
        Ok(setup) => setup,
        Err(message) => {
            status.last_handled_rotate_at = requested.or(status.last_handled_rotate_at);
            return RotationView::Observed(Box::new(Observed {
                condition: Some(failed(format!("step start: {message}"))),
                status,
                session_pair: None,
                requeue: None,
            }));
        }
    };
    run_pass(ctx, obj, setup, previous, requested, status).await
}

// Long: the pass reads, decides, runs and reports in one sequence; each part is a call.
async fn run_pass(
    ctx: &Context,
    obj: &BitbucketConnector,
    setup: Setup,
    previous: Option<&BitbucketConnectorStatus>,
    requested: Option<String>,
    mut status: CredentialRotationStatus,
) -> RotationView {
    let Setup { rotator, rotation } = setup;
    let now = Timestamp::now();
    let state = match rotator.store.load().await {
        Ok(state) => state,
        Err(err) => {
            return RotationView::Observed(Box::new(Observed {
                condition: Some(failed(format!("step store: {}", err.0))),
                status,
                session_pair: None,
                requeue: Some(RETRY_AFTER),
            }));
        }
    };
    let info = describe(ctx, &rotator, &state).await;
    let schedule = rotation.schedule().ok().flatten();
    let before_expiry = rotation.before_expiry().ok().flatten();
    let handled = status.last_handled_rotate_at.clone();
    let decision = due(&DueInputs {
        now,
        enabled: rotation.is_enabled(),
        schedule,
        before_expiry,
        requested: requested.as_deref(),
        handled: handled.as_deref(),
        since: state
            .last
            .as_ref()
            .map(|l| l.rotated_at)
            .or_else(|| info.as_ref().ok().and_then(|i| i.created_at)),
        expires: info.as_ref().ok().and_then(|i| i.expires_time),
    });
    if requested.is_some() {
        status.last_handled_rotate_at = requested.clone();
    }
    let mut condition = None;
    let mut requeue = decision.next.map(|t| until(now, t));
    if state.journal.is_some() || decision.trigger.is_some() {
        let trigger = if state.journal.is_none() {
            decision.trigger.as_deref()
        } else {
            None
        };
        let outcome = match rotator.run(trigger, now).await {
            Ok(outcome) => outcome,
            Err(err) => Outcome::Failed(Failure {
                step: "store",
                kind: FailureKind::Failed,
                message: err.0,
            }),
        };
        let (c, retry) = report(ctx, obj, previous, &outcome).await;
        condition = c;
        if retry {
            requeue = Some(requeue.map_or(RETRY_AFTER, |r| r.min(RETRY_AFTER)));
        }
    }
    // What is in use after the pass (a promotion switches it).
    let state = rotator.store.load().await.unwrap_or(state);
    let (credential_id, pair) = match &state.active {
        Some(a) => (Some(a.info.credential_id.clone()), a.pair.clone()),
        None => (rotator.base.credential_id.clone(), rotator.base.pair.clone()),
    };
    let info = if credential_id.as_ref() != info.as_ref().ok().map(|i| &i.id) {
        describe(ctx, &rotator, &state).await
    } else {
        info
    };
    let expires = info.as_ref().ok().and_then(|i| i.expires_time);
    record_expiry(ctx, obj, expires);
    status.credential_id = credential_id;
    status.fingerprint = Some(pair.fingerprint());
    fill_times(&mut status, &state, &info, schedule, before_expiry, now);
    if condition.is_none() {
        condition = standing_condition(&state, &info, expires, before_expiry, now, previous);
        if let Some((ConditionStatus::False, Reason::CredentialExpiringSoon, message)) = &condition
            && previous_reason(previous) != Some(Reason::CredentialExpiringSoon.as_str())
        {
            publish(
                ctx,
                obj,
                EventType::Warning,
                EventReason::CredentialExpiringSoon,
                message,
            )
            .await;
        }
    }
    RotationView::Observed(Box::new(Observed {
        condition,
        status,
        session_pair: state.active.map(|a| PlatformCredentials {
            client_id: a.pair.client_id,
            client_secret: a.pair.client_secret,
        }),
        requeue,
    }))
}

/// The times of `status.credentialRotation` and the step in progress.
fn fill_times(
    status: &mut CredentialRotationStatus,
    state: &RotationState,
    info: &Described,
    schedule: Option<Duration>,
    before_expiry: Option<Duration>,
    now: Timestamp,
) {
    let expires = info.as_ref().ok().and_then(|i| i.expires_time);
    status.expires_time = time(expires);
    status.last_rotation_time = time(state.last.as_ref().map(|l| l.rotated_at));
    status.step = state.journal.as_ref().map(|j| j.step.as_str().to_owned());
    let since = state
        .last
        .as_ref()
        .map(|l| l.rotated_at)
        .or_else(|| info.as_ref().ok().and_then(|i| i.created_at));
    let next = due(&DueInputs {
        now,
        enabled: true,
        schedule,
        before_expiry,
        since,
        expires,
        ..DueInputs::default()
    })
    .next;
    status.next_rotation_time = time(next);
}

fn until(now: Timestamp, t: Timestamp) -> Duration {
    Duration::try_from(t.duration_since(now))
        .unwrap_or_default()
        .max(Duration::from_secs(10))
}

/// GetCredentials of the credential in use, cached.
async fn describe(
    ctx: &Context,
    rotator: &Rotator<SecretStore>,
    state: &RotationState,
) -> Result<CredentialInfo, Failure> {
    let id = match &state.active {
        Some(a) => Some(a.info.credential_id.clone()),
        None => rotator.base.credential_id.clone(),
    };
    let Some(id) = id else {
        return Err(Failure {
            step: "describe",
            kind: FailureKind::Failed,
            message: "no credential id".into(),
        });
    };
    // The caller is part of the key: a new API key is asked afresh.
    let caller = match &rotator.authority.caller {
        Caller::ApiKey(key) => key.fingerprint(),
        Caller::Own => "own".to_owned(),
    };
    let key = format!("{}/{id}/{caller}", rotator.authority.endpoint.api_host());
    if let Some(cached) = ctx.manager.rotation_cache().get(&key) {
        return cached;
    }
    let result = rotator.describe_current().await.and_then(|i| {
        i.ok_or_else(|| Failure {
            step: "describe",
            kind: FailureKind::Failed,
            message: "no credential id".into(),
        })
    });
    ctx.manager.rotation_cache().put(key, result.clone());
    result
}

/// The condition when no rotation ran in this pass.
fn standing_condition(
    state: &RotationState,
    info: &Result<CredentialInfo, Failure>,
    expires: Option<Timestamp>,
    before_expiry: Option<Duration>,
    now: Timestamp,
    previous: Option<&BitbucketConnectorStatus>,
) -> Option<(ConditionStatus, Reason, String)> {
    if let Some(journal) = &state.journal
        && let Some(error) = &journal.last_error
    {
        return Some(failed(format!("step {}: {error}", journal.step.as_str())));
    }
    if expiring_soon(expires, before_expiry, now) {
        return Some((
            ConditionStatus::False,
            Reason::CredentialExpiringSoon,
            format!(
                "the ConductorOne credential in use expires at {}",
                expires.map(|e| e.to_string()).unwrap_or_default()
            ),
        ));
    }
    if let Err(failure) = info
        && failure.kind == FailureKind::NotAuthorized
    {
        return Some((
            ConditionStatus::False,
            Reason::RotationNotAuthorized,
            format!("step describe: {}", failure.message),
        ));
    }
    match previous_reason(previous) {
        // The last attempt's failure stands until a rotation succeeds.
        Some(r) if r == Reason::RotationFailed.as_str() || r == Reason::RotationNotAuthorized.as_str() => None,
        _ => state.last.as_ref().map(succeeded),
    }
}

fn previous_reason(previous: Option<&BitbucketConnectorStatus>) -> Option<&str> {
    previous
        .and_then(|s| find_condition(&s.conditions, ct::CREDENTIALS_ROTATED))
        .map(|c| c.reason.as_str())
}

fn succeeded(record: &RotationRecord) -> (ConditionStatus, Reason, String) {
    (
        ConditionStatus::True,
        Reason::RotationSucceeded,
        format!(
            "rotated at {} ({}): credential {} (fingerprint {}) is in use, credential {} is revoked",
            record.rotated_at,
            record.trigger,
            record.credential.credential_id,
            record.credential.fingerprint,
            record.revoked_credential_id
        ),
    )
}

/// The condition, Event and metric of a run's outcome; whether to retry soon.
async fn report(
    ctx: &Context,
    obj: &BitbucketConnector,
    previous: Option<&BitbucketConnectorStatus>,
    outcome: &Outcome,
) -> (Option<(ConditionStatus, Reason, String)>, bool) {
    let metrics = &ctx.manager.metrics().c1;
    match outcome {
        Outcome::Idle | Outcome::Advanced(_) => (None, false),
        Outcome::Completed(record) => {
            metrics.rotation("succeeded");
            let condition = succeeded(record);
            publish(
                ctx,
                obj,
                EventType::Normal,
                EventReason::CredentialsRotated,
                &condition.2,
            )
            .await;
            (Some(condition), false)
        }
        Outcome::RolledBack { reason } => {
            metrics.rotation("rolled_back");
            let message =
                format!("step prove: {reason}; the new credential was revoked and the old one is still in use");
            publish(ctx, obj, EventType::Warning, EventReason::RotationFailed, &message).await;
            (Some(failed(message)), false)
        }
        Outcome::Interrupted { message } => {
            publish(ctx, obj, EventType::Warning, EventReason::RotationFailed, message).await;
            (Some(failed(format!("step rotate: {message}"))), true)
        }
        Outcome::Failed(failure) => {
            let (reason, event, result) = match failure.kind {
                FailureKind::NotAuthorized => (
                    Reason::RotationNotAuthorized,
                    EventReason::RotationNotAuthorized,
                    "not_authorized",
                ),
                FailureKind::Failed => (Reason::RotationFailed, EventReason::RotationFailed, "failed"),
            };
            metrics.rotation(result);
            let message = failure.to_string();
            let same = previous
                .and_then(|s| find_condition(&s.conditions, ct::CREDENTIALS_ROTATED))
                .is_some_and(|c| c.reason == reason.as_str() && c.message == message);
            if !same {
                publish(ctx, obj, EventType::Warning, event, &message).await;
            }
            // A step of a rotation in progress is retried soon; a refused start waits for the next trigger.
            let retry = failure.kind == FailureKind::Failed && failure.step != "rotate" && failure.step != "start";
            (Some((ConditionStatus::False, reason, message)), retry)
        }
    }
}

async fn publish(ctx: &Context, obj: &BitbucketConnector, type_: EventType, reason: EventReason, note: &str) {
    let event = Event {
        type_,
        reason: reason.as_str().into(),
        note: Some(note.chars().take(1000).collect()),
        action: "RotateCredentials".into(),
        secondary: None,
    };
    ctx.scaffold.publish(obj, event).await;
}

fn connector_key(obj: &BitbucketConnector) -> ConnectorKey {
    ConnectorKey {
        namespace: obj.namespace().unwrap_or_default(),
        name: obj.name_any(),
    }
}

fn record_expiry(ctx: &Context, obj: &BitbucketConnector, expires: Option<Timestamp>) {
    let family = &ctx.manager.metrics().c1.credential_expiry;
    match expires {
        Some(t) => {
            family.get_or_create(&connector_key(obj)).set(t.as_second());
        }
        None => {
            family.remove(&connector_key(obj));
        }
    }
}

/// Drops the expiry gauge of a connector without rotation (or deleted).
pub fn forget_expiry(ctx: &Context, obj: &BitbucketConnector) {
    ctx.manager.metrics().c1.credential_expiry.remove(&connector_key(obj));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    const H: Duration = Duration::from_secs(3600);

    #[test]
    fn the_annotation_fires_once_per_new_value() {
        let mut inputs = DueInputs {
            now: t("2027-01-01T00:00:00Z"),
            enabled: true,
            requested: Some("a"),
            handled: None,
            ..DueInputs::default()
        };
        assert_eq!(due(&inputs).trigger.as_deref(), Some("annotation:a"));
        inputs.handled = Some("a");
        assert_eq!(due(&inputs).trigger, None);
        inputs.requested = Some("b");
        assert_eq!(due(&inputs).trigger.as_deref(), Some("annotation:b"));
        inputs.enabled = false;
        assert_eq!(due(&inputs).trigger, None, "enabled: false starts nothing");
    }

    #[test]
    fn schedule_counts_from_the_last_rotation_with_a_fixed_clock() {
        let mut inputs = DueInputs {
            now: t("2027-01-30T23:00:00Z"),
            enabled: true,
            schedule: Some(720 * H),
            since: Some(t("2027-01-01T00:00:00Z")),
            ..DueInputs::default()
        };
        let d = due(&inputs);
        assert_eq!(d.trigger, None);
        assert_eq!(d.next, Some(t("2027-01-31T00:00:00Z")));
        inputs.now = t("2027-01-31T00:00:00Z");
        assert_eq!(due(&inputs).trigger.as_deref(), Some("schedule"));
        inputs.since = None;
        assert_eq!(
            due(&inputs),
            Due {
                trigger: None,
                next: None
            },
            "no base time, no schedule"
        );
    }

    #[test]
    fn before_expiry_fires_inside_the_window_and_warns_by_default_at_7_days() {
        let expires = t("2027-03-01T00:00:00Z");
        let mut inputs = DueInputs {
            now: t("2027-02-25T00:00:00Z"),
            enabled: true,
            before_expiry: Some(72 * H),
            expires: Some(expires),
            ..DueInputs::default()
        };
        assert_eq!(due(&inputs).trigger, None);
        assert_eq!(due(&inputs).next, Some(t("2027-02-26T00:00:00Z")));
        inputs.now = t("2027-02-26T00:00:01Z");
        assert_eq!(due(&inputs).trigger.as_deref(), Some("beforeExpiry"));
        assert!(!expiring_soon(Some(expires), None, t("2027-02-21T00:00:00Z")));
        assert!(expiring_soon(Some(expires), None, t("2027-02-22T00:00:00Z")));
        assert!(!expiring_soon(None, None, t("2027-02-22T00:00:00Z")));
    }

    #[test]
    fn the_view_writes_condition_and_status_or_removes_them() {
        let mut status = BitbucketConnectorStatus::default();
        let view = RotationView::Observed(Box::new(Observed {
            condition: Some(failed("step prove: refused".into())),
            status: CredentialRotationStatus {
                credential_id: Some("c1".into()),
                ..CredentialRotationStatus::default()
            },
            session_pair: None,
            requeue: None,
        }));
        view.apply_status(&mut status, Some(3));
        let c = find_condition(&status.conditions, ct::CREDENTIALS_ROTATED).unwrap();
        assert_eq!((c.status.as_str(), c.reason.as_str()), ("False", "RotationFailed"));
        assert_eq!(c.observed_generation, Some(3));
        RotationView::Unobserved.apply_status(&mut status, Some(4));
        assert!(status.credential_rotation.is_some());
        RotationView::NotConfigured.apply_status(&mut status, Some(4));
        assert!(status.credential_rotation.is_none());
        assert!(find_condition(&status.conditions, ct::CREDENTIALS_ROTATED).is_none());
    }
}
