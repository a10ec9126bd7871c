//! Crash-safe rotation of a connector's ConductorOne client credential.
//!
//! The sequence (issue 11), each step persisted before the next begins:
//!
//! ```text
//! (no journal) --trigger--> Started --RotateCredential--> PendingStored --token+Hello--> Proven
//!      --promote--> Promoted --RevokeCredential(old)--> OldRevoked --record--> (no journal, `last` set)
//! PendingStored --the new pair is refused, or 5 proofs failed--> RollingBack
//!      --RevokeCredential(new)--> (no journal, old pair kept)
//! ```
//!
//! Decisions:
//! - *Rotated and PendingStored are one write.* ConductorOne shows the new
//!   secret only in RotateCredential's answer, so the journal entry naming
//!   the new credential and the pending pair are persisted together. A crash
//!   between that answer and the write cannot be undone: there is no list
//!   call, so the new credential's id is lost with the process. The journal
//!   then still says `Started`, and the resume reports
//!   [`Outcome::Interrupted`] with the start time, so a person can revoke a
//!   credential created then in ConductorOne's UI. The old pair keeps working.
//! - *Never the only working pair.* The old credential is revoked only in
//!   `Promoted`, reached only through `Proven`; the new one is revoked only
//!   while it is still pending. A rotation does not start without the old
//!   credential's id, since the old credential could not be revoked after it.
//! - *Failures are kept, not forgotten.* A failed revoke stays in the journal
//!   (`attempts`, `last_error`) and is retried on every [`Rotator::run`]; a
//!   pending pair ConductorOne cannot reach yet is proved again, and rolled
//!   back after [`MAX_PROOF_ATTEMPTS`].
//! - *Who calls the API.* An API key when one is configured, else the
//!   connector's own active pair (PROTOCOL.md §4 leaves open whether that is
//!   allowed). A refusal is [`FailureKind::NotAuthorized`], with what to create.
//! - The state machine does no I/O of its own besides ConductorOne calls: where
//!   the state lives is a [`RotationStore`] (a Secret in the operator, a file
//!   on a plain host).

use std::future::Future;
use std::sync::Arc;

use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::credential_api::{ApiError, ConnectorRef, CredentialApi, CredentialInfo};
use super::credentials::ClientCredentials;
use super::rpc::C1Client;
use super::token::{C1Endpoint, TokenSource};

/// Proof attempts of a pending pair that fail for transport reasons before
/// the pending pair is given up and revoked.
pub const MAX_PROOF_ATTEMPTS: u32 = 5;

/// A client id and secret. `Debug` redacts the secret.
#[derive(Clone, PartialEq, Eq)]
pub struct Pair {
    pub client_id: String,
    pub client_secret: String,
}

impl std::fmt::Debug for Pair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pair")
            .field("client_id", &self.client_id)
            .field("client_secret", &"<redacted>")
            .finish()
    }
}

impl Pair {
    pub fn new(client_id: impl Into<String>, client_secret: impl Into<String>) -> Self {
        Pair {
            client_id: client_id.into(),
            client_secret: client_secret.into(),
        }
    }

    /// A short hash naming the pair in status and logs (never the secret).
    pub fn fingerprint(&self) -> String {
        let mut hash = Sha256::new();
        hash.update(self.client_id.as_bytes());
        hash.update([0]);
        hash.update(self.client_secret.as_bytes());
        hash.finalize().iter().take(8).map(|b| format!("{b:02x}")).collect()
    }
}

/// A credential without its secret, as journals and records name it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CredentialRef {
    pub credential_id: String,
    pub client_id: String,
    pub fingerprint: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_time: Option<Timestamp>,
}

/// The step a rotation reached (persisted before the next one starts).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Step {
    /// About to call RotateCredential (or crashed around it).
    Started,
    /// A new credential was issued and its pair stored as pending.
    PendingStored,
    /// The pending pair exchanged a token and said Hello.
    Proven,
    /// The new pair is the active one; the old is still valid.
    Promoted,
    /// The old credential was revoked.
    OldRevoked,
    /// The pending pair is being revoked; the old stays active.
    RollingBack,
}

impl Step {
    /// Lower-case name for messages and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Step::Started => "rotate",
            Step::PendingStored => "prove",
            Step::Proven => "promote",
            Step::Promoted => "revoke-old",
            Step::OldRevoked => "record",
            Step::RollingBack => "revoke-new",
        }
    }
}

/// A rotation in progress. Holds no secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RotationJournal {
    pub step: Step,
    /// Why it started (`schedule`, `beforeExpiry`, `annotation:<value>`, `cli`).
    pub trigger: String,
    pub started_at: Timestamp,
    pub old: CredentialRef,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub new: Option<CredentialRef>,
    /// Failed attempts of the current step.
    #[serde(default)]
    pub attempts: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// Why the pending pair is being rolled back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollback_reason: Option<String>,
}

/// The last completed rotation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RotationRecord {
    pub credential: CredentialRef,
    pub rotated_at: Timestamp,
    pub revoked_credential_id: String,
    pub trigger: String,
}

/// The active credential the rotation wrote (takes precedence over the
/// user's pair once present).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredCredential {
    pub info: CredentialRef,
    pub pair: Pair,
}

/// Everything a [`RotationStore`] persists, in one write.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RotationState {
    pub active: Option<StoredCredential>,
    /// The pending pair; its id is in `journal.new`.
    pub pending: Option<Pair>,
    pub journal: Option<RotationJournal>,
    pub last: Option<RotationRecord>,
}

/// A store could not be read or written: the rotation stops where it is.
#[derive(Debug, Clone, thiserror::Error)]
#[error("rotation state: {0}")]
pub struct StoreError(pub String);

/// Where the rotation state persists. `save` must be atomic (all of the
/// state or none), since each step is one save.
pub trait RotationStore: Send + Sync {
    fn load(&self) -> impl Future<Output = Result<RotationState, StoreError>> + Send;
    fn save(&self, state: &RotationState) -> impl Future<Output = Result<(), StoreError>> + Send;
}

/// The credential the user configured (used while no active one is stored).
#[derive(Debug, Clone)]
pub struct BaseCredential {
    /// ConductorOne's id of it; needed to revoke it after a rotation.
    pub credential_id: Option<String>,
    pub pair: Pair,
}

/// How a step failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// ConductorOne refused the caller (`RotationNotAuthorized`).
    NotAuthorized,
    /// Anything else (`RotationFailed`); retried later.
    Failed,
}

/// A failed step: which, and ConductorOne's message (never a secret).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub step: &'static str,
    pub kind: FailureKind,
    pub message: String,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "step {}: {}", self.step, self.message)
    }
}

/// What one [`Rotator::advance`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// No rotation in progress and none asked for.
    Idle,
    /// One step done; more to do.
    Advanced(Step),
    Completed(RotationRecord),
    /// The pending pair was revoked; the old pair is still active.
    RolledBack {
        reason: String,
    },
    /// A journal stuck at `Started` was cleared (see the module doc).
    Interrupted {
        message: String,
    },
    /// The step failed; the state says where to resume.
    Failed(Failure),
}

impl Outcome {
    /// Whether [`Rotator::run`] stops here.
    fn is_final(&self) -> bool {
        !matches!(self, Outcome::Advanced(_))
    }
}

/// Who calls the credential API.
#[derive(Debug, Clone)]
pub enum Caller {
    /// A separate ConductorOne API key (`apiKeySecretRef`).
    ApiKey(Pair),
    /// The connector's own active pair.
    Own,
}

/// ConductorOne as the rotation sees it: the REST calls and the proof.
#[derive(Debug, Clone)]
pub struct Authority {
    pub endpoint: C1Endpoint,
    pub connector: ConnectorRef,
    pub caller: Caller,
    /// Host id of the proof's Hello.
    pub host_id: String,
}

/// Why a pending pair did not prove itself.
enum ProofError {
    /// ConductorOne refused it: it will never work.
    Refused(String),
    /// Unreachable, TLS, a 5xx: it may work later.
    Unavailable(String),
}

impl Authority {
    fn api(&self, own: &Pair) -> Result<CredentialApi, Failure> {
        let (pair, whose) = match &self.caller {
            Caller::ApiKey(key) => (key, "API key"),
            Caller::Own => (own, "connector credential"),
        };
        let bad = |message: String| Failure {
            step: "start",
            kind: FailureKind::Failed,
            message,
        };
        let credentials = ClientCredentials::parse(&pair.client_id, &pair.client_secret)
            .map_err(|e| bad(format!("the {whose} is malformed: {e}")))?;
        let tokens = TokenSource::new(Arc::new(credentials), self.endpoint.clone()).map_err(bad)?;
        CredentialApi::new(Arc::new(tokens), self.endpoint.clone()).map_err(bad)
    }

    /// A [`Failure`] of `step`; refusals say what to create.
    fn failure(&self, step: Step, err: &ApiError) -> Failure {
        if err.is_not_authorized() {
            let advice = match &self.caller {
                Caller::Own => format!(
                    "ConductorOne does not let the connector's own credential manage its credentials ({err}); create \
                     a ConductorOne API key (a personal or service client allowed to manage app {} connector {}), \
                     put its BATON_CLIENT_ID and BATON_CLIENT_SECRET in a Secret and name it in \
                     spec.credentialRotation.apiKeySecretRef",
                    self.connector.app_id, self.connector.connector_id
                ),
                Caller::ApiKey(_) => format!(
                    "ConductorOne refused the API key ({err}); give it a role that may manage app {} connector {}, \
                     or create a new one",
                    self.connector.app_id, self.connector.connector_id
                ),
            };
            return Failure {
                step: step.as_str(),
                kind: FailureKind::NotAuthorized,
                message: advice,
            };
        }
        Failure {
            step: step.as_str(),
            kind: FailureKind::Failed,
            message: err.to_string(),
        }
    }

    /// GetCredentials of `id`, as `own` (or the API key).
    pub async fn describe(&self, own: &Pair, id: &str) -> Result<CredentialInfo, Failure> {
        let api = self.api(own)?;
        api.get(&self.connector, id)
            .await
            .map_err(|e| self.failure(Step::Started, &e))
            .map_err(|f| Failure { step: "describe", ..f })
    }

    /// A token exchange and a Hello with `pair`.
    async fn prove(&self, pair: &Pair) -> Result<(), ProofError> {
        let credentials = ClientCredentials::parse(&pair.client_id, &pair.client_secret)
            .map_err(|e| ProofError::Refused(format!("the new pair is malformed: {e}")))?;
        let client = C1Client::new(Arc::new(credentials), self.endpoint.clone(), &self.host_id, None)
            .map_err(ProofError::Unavailable)?;
        match client.hello("").await {
            Ok(()) => Ok(()),
            Err(err) if err.is_permanent() => Err(ProofError::Refused(err.describe())),
            Err(err) => Err(ProofError::Unavailable(err.describe())),
        }
    }
}

/// Runs rotations of one connector credential against a store.
pub struct Rotator<S> {
    pub store: S,
    pub authority: Authority,
    pub base: BaseCredential,
}

impl<S: RotationStore> Rotator<S> {
    /// The pair in use and its id: the stored active one, else the base.
    fn current(&self, state: &RotationState) -> (Option<String>, Pair) {
        match &state.active {
            Some(active) => (Some(active.info.credential_id.clone()), active.pair.clone()),
            None => (self.base.credential_id.clone(), self.base.pair.clone()),
        }
    }

    /// Advances until a final outcome: a new rotation starts only when
    /// `trigger` is given and none is in progress; one in progress is always
    /// continued.
    pub async fn run(&self, trigger: Option<&str>, now: Timestamp) -> Result<Outcome, StoreError> {
        loop {
            let outcome = self.advance(trigger, now).await?;
            if outcome.is_final() {
                return Ok(outcome);
            }
        }
    }

    /// Does one step and persists it.
    pub async fn advance(&self, trigger: Option<&str>, now: Timestamp) -> Result<Outcome, StoreError> {
        let mut state = self.store.load().await?;
        let Some(journal) = state.journal.clone() else {
            return match trigger {
                Some(trigger) => self.start(state, trigger, now).await,
                None => Ok(Outcome::Idle),
            };
        };
        match journal.step {
            Step::Started => {
                state.journal = None;
                self.store.save(&state).await?;
                Ok(Outcome::Interrupted {
                    message: format!(
                        "a rotation started at {} was interrupted around RotateCredential; if ConductorOne issued a \
                         credential then, nobody holds its secret: revoke it in ConductorOne (app {}, connector {}); \
                         credential {} is still in use",
                        journal.started_at,
                        self.authority.connector.app_id,
                        self.authority.connector.connector_id,
                        journal.old.credential_id
                    ),
                })
            }
            Step::PendingStored => self.prove(state, journal).await,
            Step::Proven => self.promote(state, journal).await,
            Step::Promoted => self.revoke_old(state, journal).await,
            Step::OldRevoked => self.record(state, journal, now).await,
            Step::RollingBack => self.roll_back(state, journal).await,
        }
    }

    /// Steps 1 and 2: RotateCredential, then the pending pair and the journal in one write.
    async fn start(&self, mut state: RotationState, trigger: &str, now: Timestamp) -> Result<Outcome, StoreError> {
        let (old_id, own) = self.current(&state);
        let Some(old_id) = old_id.filter(|id| !id.is_empty()) else {
            return Ok(Outcome::Failed(Failure {
                step: "start",
                kind: FailureKind::Failed,
                message: "the current credential's ConductorOne id is unknown, so it could not be revoked after a \
                          rotation: set spec.credentialRotation.credentialId (or --credential-id)"
                    .into(),
            }));
        };
        let api = match self.authority.api(&own) {
            Ok(api) => api,
            Err(failure) => return Ok(Outcome::Failed(failure)),
        };
        let mut journal = RotationJournal {
            step: Step::Started,
            trigger: trigger.to_owned(),
            started_at: now,
            old: CredentialRef {
                credential_id: old_id,
                client_id: own.client_id.clone(),
                fingerprint: own.fingerprint(),
                expires_time: state.active.as_ref().and_then(|a| a.info.expires_time),
            },
            new: None,
            attempts: 0,
            last_error: None,
            rollback_reason: None,
        };
        state.journal = Some(journal.clone());
        self.store.save(&state).await?;
        let issued = match api.rotate(&self.authority.connector).await {
            Ok(issued) => issued,
            Err(err) => {
                // Nothing was issued: no rotation is in progress.
                state.journal = None;
                self.store.save(&state).await?;
                return Ok(Outcome::Failed(self.authority.failure(Step::Started, &err)));
            }
        };
        let pending = Pair::new(issued.info.client_id.clone(), issued.client_secret.clone());
        journal.step = Step::PendingStored;
        journal.new = Some(CredentialRef {
            credential_id: issued.info.id.clone(),
            client_id: issued.info.client_id.clone(),
            fingerprint: pending.fingerprint(),
            expires_time: issued.info.expires_time,
        });
        state.pending = Some(pending);
        state.journal = Some(journal);
        self.store.save(&state).await?;
        Ok(Outcome::Advanced(Step::PendingStored))
    }

    /// Step 3: a token exchange and a Hello with the pending pair.
    async fn prove(&self, mut state: RotationState, mut journal: RotationJournal) -> Result<Outcome, StoreError> {
        let Some(pending) = state.pending.clone() else {
            // The pair is gone (the store was edited): only revoking is left.
            journal.step = Step::RollingBack;
            journal.rollback_reason = Some("the pending pair was missing from the store".into());
            state.journal = Some(journal);
            self.store.save(&state).await?;
            return Ok(Outcome::Advanced(Step::RollingBack));
        };
        let rollback = match self.authority.prove(&pending).await {
            Ok(()) => None,
            Err(ProofError::Refused(message)) => Some(format!("ConductorOne refused the new pair: {message}")),
            Err(ProofError::Unavailable(message)) => {
                journal.attempts += 1;
                if journal.attempts >= MAX_PROOF_ATTEMPTS {
                    Some(format!(
                        "the new pair could not be proved in {MAX_PROOF_ATTEMPTS} attempts: {message}"
                    ))
                } else {
                    journal.last_error = Some(message.clone());
                    state.journal = Some(journal);
                    self.store.save(&state).await?;
                    return Ok(Outcome::Failed(Failure {
                        step: Step::PendingStored.as_str(),
                        kind: FailureKind::Failed,
                        message,
                    }));
                }
            }
        };
        journal.attempts = 0;
        journal.last_error = None;
        if let Some(reason) = rollback {
            journal.step = Step::RollingBack;
            journal.rollback_reason = Some(reason);
        } else {
            journal.step = Step::Proven;
        }
        let step = journal.step;
        state.journal = Some(journal);
        self.store.save(&state).await?;
        Ok(Outcome::Advanced(step))
    }

    /// Step 4: the pending pair becomes the active one (one write).
    async fn promote(&self, mut state: RotationState, mut journal: RotationJournal) -> Result<Outcome, StoreError> {
        let (Some(pending), Some(new)) = (state.pending.take(), journal.new.clone()) else {
            journal.step = Step::RollingBack;
            journal.rollback_reason = Some("the proven pair was missing from the store".into());
            state.journal = Some(journal);
            self.store.save(&state).await?;
            return Ok(Outcome::Advanced(Step::RollingBack));
        };
        state.active = Some(StoredCredential {
            info: new,
            pair: pending,
        });
        journal.step = Step::Promoted;
        state.journal = Some(journal);
        self.store.save(&state).await?;
        Ok(Outcome::Advanced(Step::Promoted))
    }

    /// Step 5: RevokeCredential on the old id (already gone counts as done).
    async fn revoke_old(&self, mut state: RotationState, mut journal: RotationJournal) -> Result<Outcome, StoreError> {
        let (_, own) = self.current(&state);
        let result = match self.authority.api(&own) {
            Ok(api) => api
                .revoke(&self.authority.connector, &journal.old.credential_id)
                .await
                .or_else(|e| {
                    if matches!(e, ApiError::NotFound { .. }) {
                        Ok(())
                    } else {
                        Err(e)
                    }
                })
                .map_err(|e| self.authority.failure(Step::Promoted, &e)),
            Err(failure) => Err(failure),
        };
        if let Err(failure) = result {
            journal.attempts += 1;
            journal.last_error = Some(failure.message.clone());
            state.journal = Some(journal);
            self.store.save(&state).await?;
            return Ok(Outcome::Failed(Failure {
                step: Step::Promoted.as_str(),
                ..failure
            }));
        }
        journal.step = Step::OldRevoked;
        journal.attempts = 0;
        journal.last_error = None;
        state.journal = Some(journal);
        self.store.save(&state).await?;
        Ok(Outcome::Advanced(Step::OldRevoked))
    }

    /// Step 6: the record replaces the journal.
    async fn record(
        &self,
        mut state: RotationState,
        journal: RotationJournal,
        now: Timestamp,
    ) -> Result<Outcome, StoreError> {
        let credential = journal
            .new
            .clone()
            .or_else(|| state.active.as_ref().map(|a| a.info.clone()))
            .ok_or_else(|| StoreError("the journal names no new credential".into()))?;
        let record = RotationRecord {
            credential,
            rotated_at: now,
            revoked_credential_id: journal.old.credential_id.clone(),
            trigger: journal.trigger.clone(),
        };
        state.journal = None;
        state.last = Some(record.clone());
        self.store.save(&state).await?;
        Ok(Outcome::Completed(record))
    }

    /// Revokes the pending credential and forgets it; the old pair stays.
    async fn roll_back(&self, mut state: RotationState, mut journal: RotationJournal) -> Result<Outcome, StoreError> {
        let reason = journal.rollback_reason.clone().unwrap_or_default();
        if let Some(new) = journal.new.clone() {
            let (_, own) = self.current(&state);
            let result = match self.authority.api(&own) {
                Ok(api) => api
                    .revoke(&self.authority.connector, &new.credential_id)
                    .await
                    .or_else(|e| {
                        if matches!(e, ApiError::NotFound { .. }) {
                            Ok(())
                        } else {
                            Err(e)
                        }
                    })
                    .map_err(|e| self.authority.failure(Step::RollingBack, &e)),
                Err(failure) => Err(failure),
            };
            if let Err(failure) = result {
                journal.attempts += 1;
                journal.last_error = Some(failure.message.clone());
                state.journal = Some(journal);
                self.store.save(&state).await?;
                return Ok(Outcome::Failed(Failure {
                    step: Step::RollingBack.as_str(),
                    ..failure
                }));
            }
        }
        state.pending = None;
        state.journal = None;
        self.store.save(&state).await?;
        Ok(Outcome::RolledBack { reason })
    }

    /// GetCredentials of the credential in use (its expiry and issue time).
    pub async fn describe_current(&self) -> Result<Option<CredentialInfo>, Failure> {
        let state = self.store.load().await.map_err(|e| Failure {
            step: "describe",
            kind: FailureKind::Failed,
            message: e.to_string(),
        })?;
        let (id, own) = self.current(&state);
        let Some(id) = id else { return Ok(None) };
        Ok(Some(self.authority.describe(&own, &id).await?))
    }

    /// GetCredentials of the credential in use: its expiry, if any.
    pub async fn current_expiry(&self) -> Result<Option<Timestamp>, Failure> {
        let state = self.store.load().await.map_err(|e| Failure {
            step: "describe",
            kind: FailureKind::Failed,
            message: e.to_string(),
        })?;
        let (id, own) = self.current(&state);
        let Some(id) = id else { return Ok(None) };
        Ok(self.authority.describe(&own, &id).await?.expires_time)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn journals_hold_no_secret_and_round_trip() {
        let pair = Pair::new("x@acme.conductor.one/ccc", "secret-token:conductorone.com:v1:TOPSECRET");
        let journal = RotationJournal {
            step: Step::Promoted,
            trigger: "schedule".into(),
            started_at: Timestamp::UNIX_EPOCH,
            old: CredentialRef {
                credential_id: "old".into(),
                client_id: pair.client_id.clone(),
                fingerprint: pair.fingerprint(),
                expires_time: None,
            },
            new: None,
            attempts: 2,
            last_error: Some("HTTP 503".into()),
            rollback_reason: None,
        };
        let text = serde_json::to_string(&journal).unwrap();
        assert!(!text.contains("TOPSECRET"), "{text}");
        assert_eq!(serde_json::from_str::<RotationJournal>(&text).unwrap(), journal);
        assert!(!format!("{pair:?}").contains("TOPSECRET"));
        assert_eq!(pair.fingerprint().len(), 16);
        assert_ne!(
            pair.fingerprint(),
            Pair::new(pair.client_id.clone(), "other").fingerprint()
        );
    }
}
