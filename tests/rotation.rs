//! Crash-safe rotation of the ConductorOne client credential
//! (src/conductorone/rotation.rs) against the fake ConductorOne
//! (tests/support/fake_c1.rs): the happy path, a crash after each persisted
//! step, a new pair that cannot authenticate, refusals of the caller, failed
//! revokes, and the `rotate-credentials` command.

pub mod support;

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use bitbucket_operator::conductorone::credential_api::ConnectorRef;
use bitbucket_operator::conductorone::rotation::{
    Authority, BaseCredential, Caller, FailureKind, Outcome, Pair, RotationState, RotationStore, Rotator, Step,
    StoreError,
};
use bitbucket_operator::conductorone::rotation_file::FileStore;
use bitbucket_operator::conductorone::rpc::C1Client;
use bitbucket_operator::conductorone::{C1Endpoint, ClientCredentials};
use support::fake_c1::{CredentialKind, FakeC1, FakeOptions, RestCall};

fn endpoint(fake: &FakeC1) -> C1Endpoint {
    C1Endpoint {
        tenant_host: "acme.conductor.one".into(),
        api_host_override: Some(fake.api_host()),
        extra_ca_pem: Some(fake.ca_pem.clone().into_bytes()),
    }
}

fn authority(fake: &FakeC1, caller: Caller) -> Authority {
    Authority {
        endpoint: endpoint(fake),
        connector: ConnectorRef {
            app_id: "app-1".into(),
            connector_id: "conn-1".into(),
        },
        caller,
        host_id: "rotation-test".into(),
    }
}

fn base(fake: &FakeC1) -> BaseCredential {
    BaseCredential {
        credential_id: Some(fake.initial_credential_id()),
        pair: Pair::new(fake.client_id.clone(), fake.client_secret.clone()),
    }
}

fn rotator<S: RotationStore>(fake: &FakeC1, store: S, caller: Caller) -> Rotator<S> {
    Rotator {
        store,
        authority: authority(fake, caller),
        base: base(fake),
    }
}

/// Whether `pair` can exchange a token and say Hello.
async fn works(fake: &FakeC1, pair: &Pair) -> bool {
    let Ok(credentials) = ClientCredentials::parse(&pair.client_id, &pair.client_secret) else {
        return false;
    };
    let client = C1Client::new(Arc::new(credentials), endpoint(fake), "probe", None).unwrap();
    client.hello("").await.is_ok()
}

/// The pair the connector uses: the stored active one, else the user's.
fn in_use(fake: &FakeC1, state: &RotationState) -> (String, Pair) {
    match &state.active {
        Some(a) => (a.info.credential_id.clone(), a.pair.clone()),
        None => (fake.initial_credential_id(), base(fake).pair),
    }
}

fn now() -> jiff::Timestamp {
    jiff::Timestamp::now()
}

#[tokio::test]
async fn happy_path_issues_proves_promotes_revokes_and_records() {
    let fake = FakeC1::start(FakeOptions::default()).await;
    fake.set_credential_lifetime(Some(jiff::SignedDuration::from_hours(24 * 90)));
    let dir = tempfile::tempdir().unwrap();
    let store = FileStore::new(dir.path().join("j.json"));
    let r = rotator(&fake, store.clone(), Caller::Own);
    let Outcome::Completed(record) = r.run(Some("test"), now()).await.unwrap() else {
        panic!("not completed: {:?}", store.load().await);
    };
    let state = store.load().await.unwrap();
    let active = state.active.clone().expect("an active pair is stored");
    assert_eq!(state.journal, None);
    assert_eq!(state.pending, None);
    assert_eq!(state.last.as_ref(), Some(&record));
    assert_eq!(record.credential, active.info);
    assert_eq!(record.revoked_credential_id, fake.initial_credential_id());
    assert_eq!(record.credential.fingerprint, active.pair.fingerprint());
    assert!(
        record.credential.expires_time.is_some(),
        "expiresTime from RotateCredential"
    );
    assert_eq!(fake.active_credentials(), vec![active.info.credential_id.clone()]);
    assert!(works(&fake, &active.pair).await);
    assert!(!works(&fake, &base(&fake).pair).await, "the old pair is revoked");
    // The proof said Hello with the new pair before the old one was revoked.
    let calls: Vec<RestCall> = fake.recorded().rest_calls.iter().map(|c| c.0).collect();
    assert_eq!(calls, vec![RestCall::Rotate, RestCall::Revoke]);
    assert!(fake.recorded().hellos.iter().any(|h| h.host_id == "rotation-test"));
    // The expiry is read back with GetCredentials.
    assert_eq!(r.current_expiry().await.unwrap(), record.credential.expires_time);
    // A second run without a trigger does nothing.
    assert_eq!(r.run(None, now()).await.unwrap(), Outcome::Idle);
}

/// Crash after each persisted step (`advance` k times, then a new process):
/// the resume finishes, there is always a working pair, and exactly one
/// active connector credential is left.
#[tokio::test]
async fn a_crash_after_each_step_is_finished_by_the_resume() {
    let expected_steps = [Step::PendingStored, Step::Proven, Step::Promoted, Step::OldRevoked];
    for crash_after in 1..=expected_steps.len() {
        let fake = FakeC1::start(FakeOptions::default()).await;
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::new(dir.path().join("j.json"));
        {
            let first = rotator(&fake, store.clone(), Caller::Own);
            for (i, step) in expected_steps.iter().enumerate().take(crash_after) {
                let outcome = first.advance(Some("test"), now()).await.unwrap();
                assert_eq!(outcome, Outcome::Advanced(*step), "advance {i}");
            }
        }
        // The process is gone; what is persisted must leave a working pair.
        let state = store.load().await.unwrap();
        assert_eq!(
            state.journal.as_ref().map(|j| j.step),
            Some(expected_steps[crash_after - 1])
        );
        let (_, pair) = in_use(&fake, &state);
        assert!(
            works(&fake, &pair).await,
            "crash after {crash_after}: the pair in use works"
        );
        // A restart, without a new trigger, finishes the rotation.
        let second = rotator(&fake, store.clone(), Caller::Own);
        let outcome = second.run(None, now()).await.unwrap();
        assert!(
            matches!(outcome, Outcome::Completed(_)),
            "crash after {crash_after}: {outcome:?}"
        );
        let state = store.load().await.unwrap();
        let (id, pair) = in_use(&fake, &state);
        assert_ne!(id, fake.initial_credential_id());
        assert!(works(&fake, &pair).await);
        assert_eq!(
            fake.active_credentials(),
            vec![id],
            "crash after {crash_after}: one active credential"
        );
        assert_eq!(state.journal, None);
    }
}

/// A store that fails its `fail_at`-th save: the process dies after the
/// ConductorOne call of that step but before recording it.
struct FailingStore {
    inner: FileStore,
    saves: AtomicU32,
    fail_at: u32,
}

impl RotationStore for FailingStore {
    async fn load(&self) -> Result<RotationState, StoreError> {
        self.inner.load().await
    }

    async fn save(&self, state: &RotationState) -> Result<(), StoreError> {
        if self.saves.fetch_add(1, Ordering::SeqCst) + 1 == self.fail_at {
            return Err(StoreError("injected crash".into()));
        }
        self.inner.save(state).await
    }
}

/// A crash between RotateCredential's answer and its record: the only point
/// that leaves something behind (an issued credential nobody holds).
#[tokio::test]
async fn a_crash_around_rotate_keeps_the_old_pair_and_reports_the_orphan() {
    let fake = FakeC1::start(FakeOptions::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let store = FileStore::new(dir.path().join("j.json"));
    let failing = FailingStore {
        inner: store.clone(),
        saves: AtomicU32::new(0),
        fail_at: 2,
    };
    let err = rotator(&fake, failing, Caller::Own)
        .run(Some("test"), now())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("injected crash"));
    assert_eq!(fake.active_credentials().len(), 2, "ConductorOne issued a credential");
    let resume = rotator(&fake, store.clone(), Caller::Own);
    let Outcome::Interrupted { message } = resume.run(None, now()).await.unwrap() else {
        panic!("the resume reports the interruption");
    };
    assert!(
        message.contains("revoke it in ConductorOne") && message.contains("app-1"),
        "{message}"
    );
    assert!(message.contains(&fake.initial_credential_id()), "{message}");
    let state = store.load().await.unwrap();
    assert_eq!(state, RotationState::default(), "nothing half-done is kept");
    assert!(works(&fake, &base(&fake).pair).await, "the old pair still works");
    // The next trigger rotates normally.
    assert!(matches!(
        resume.run(Some("again"), now()).await.unwrap(),
        Outcome::Completed(_)
    ));
}

/// A crash after the revoke but before it was recorded: the resume revokes
/// again, ConductorOne says 404, and that counts as done.
#[tokio::test]
async fn a_crash_after_revoke_before_its_record_finishes_on_404() {
    let fake = FakeC1::start(FakeOptions::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let store = FileStore::new(dir.path().join("j.json"));
    // Saves: Started, PendingStored, Proven, Promoted, OldRevoked (fails).
    let failing = FailingStore {
        inner: store.clone(),
        saves: AtomicU32::new(0),
        fail_at: 5,
    };
    assert!(
        rotator(&fake, failing, Caller::Own)
            .run(Some("t"), now())
            .await
            .is_err()
    );
    assert_eq!(
        store.load().await.unwrap().journal.map(|j| j.step),
        Some(Step::Promoted)
    );
    let outcome = rotator(&fake, store.clone(), Caller::Own)
        .run(None, now())
        .await
        .unwrap();
    assert!(matches!(outcome, Outcome::Completed(_)), "{outcome:?}");
    assert_eq!(fake.active_credentials().len(), 1);
}

#[tokio::test]
async fn a_new_pair_that_cannot_authenticate_is_revoked_and_the_old_kept() {
    let fake = FakeC1::start(FakeOptions::default()).await;
    fake.issue_broken_pairs(true);
    let dir = tempfile::tempdir().unwrap();
    let store = FileStore::new(dir.path().join("j.json"));
    let outcome = rotator(&fake, store.clone(), Caller::Own)
        .run(Some("t"), now())
        .await
        .unwrap();
    let Outcome::RolledBack { reason } = outcome else {
        panic!("{outcome:?}");
    };
    assert!(reason.contains("refused the new pair"), "{reason}");
    assert_eq!(store.load().await.unwrap(), RotationState::default());
    assert_eq!(fake.active_credentials(), vec![fake.initial_credential_id()]);
    assert!(works(&fake, &base(&fake).pair).await);
}

#[tokio::test]
async fn a_refused_connector_credential_is_not_authorized_and_says_what_to_create() {
    let fake = FakeC1::start(FakeOptions::default()).await;
    fake.set_refusals(true, false);
    let dir = tempfile::tempdir().unwrap();
    let store = FileStore::new(dir.path().join("j.json"));
    let outcome = rotator(&fake, store.clone(), Caller::Own)
        .run(Some("t"), now())
        .await
        .unwrap();
    let Outcome::Failed(failure) = outcome else {
        panic!("{outcome:?}")
    };
    assert_eq!(failure.kind, FailureKind::NotAuthorized);
    assert_eq!(failure.step, "rotate");
    assert!(failure.message.contains("apiKeySecretRef") && failure.message.contains("API key"));
    assert!(
        failure.message.contains("permission denied"),
        "ConductorOne's message: {}",
        failure.message
    );
    assert!(!failure.message.contains(&fake.client_secret));
    assert_eq!(store.load().await.unwrap(), RotationState::default());
    assert_eq!(fake.active_credentials(), vec![fake.initial_credential_id()]);

    // The same connector with an API key rotates; the key made every call.
    let (key_id, key_secret) = fake.add_credential(CredentialKind::ApiKey);
    let r = rotator(&fake, store.clone(), Caller::ApiKey(Pair::new(&key_id, &key_secret)));
    assert!(matches!(r.run(Some("t"), now()).await.unwrap(), Outcome::Completed(_)));
    let key_cred = fake
        .recorded()
        .credentials
        .iter()
        .find(|c| c.client_id == key_id)
        .unwrap()
        .id
        .clone();
    let callers: Vec<String> = fake.recorded().rest_calls.iter().skip(1).map(|c| c.1.clone()).collect();
    assert!(callers.iter().all(|c| *c == key_cred), "{callers:?}");
    assert!(fake.is_active(&key_cred), "the API key is never revoked");
}

#[tokio::test]
async fn a_refused_api_key_is_not_authorized() {
    let fake = FakeC1::start(FakeOptions::default()).await;
    fake.set_refusals(false, true);
    let (key_id, key_secret) = fake.add_credential(CredentialKind::ApiKey);
    let dir = tempfile::tempdir().unwrap();
    let r = rotator(
        &fake,
        FileStore::new(dir.path().join("j.json")),
        Caller::ApiKey(Pair::new(key_id, key_secret)),
    );
    let Outcome::Failed(failure) = r.run(Some("t"), now()).await.unwrap() else {
        panic!()
    };
    assert_eq!(failure.kind, FailureKind::NotAuthorized);
    assert!(failure.message.contains("refused the API key"), "{}", failure.message);
    assert_eq!(fake.active_credentials(), vec![fake.initial_credential_id()]);
}

#[tokio::test]
async fn a_failed_revoke_is_kept_reported_and_retried() {
    let fake = FakeC1::start(FakeOptions::default()).await;
    fake.fail_next(RestCall::Revoke, 503);
    let dir = tempfile::tempdir().unwrap();
    let store = FileStore::new(dir.path().join("j.json"));
    let r = rotator(&fake, store.clone(), Caller::Own);
    let Outcome::Failed(failure) = r.run(Some("t"), now()).await.unwrap() else {
        panic!()
    };
    assert_eq!((failure.step, failure.kind), ("revoke-old", FailureKind::Failed));
    assert!(failure.message.contains("503"), "{}", failure.message);
    let journal = store.load().await.unwrap().journal.unwrap();
    assert_eq!((journal.step, journal.attempts), (Step::Promoted, 1));
    assert!(journal.last_error.unwrap().contains("injected failure"));
    // Both still work until the retry; the new one is already in use.
    assert_eq!(fake.active_credentials().len(), 2);
    assert!(matches!(r.run(None, now()).await.unwrap(), Outcome::Completed(_)));
    assert_eq!(fake.active_credentials().len(), 1);
}

#[tokio::test]
async fn a_failed_rollback_revoke_is_retried_until_the_new_credential_is_gone() {
    let fake = FakeC1::start(FakeOptions::default()).await;
    fake.issue_broken_pairs(true);
    fake.fail_next(RestCall::Revoke, 500);
    let dir = tempfile::tempdir().unwrap();
    let store = FileStore::new(dir.path().join("j.json"));
    let r = rotator(&fake, store.clone(), Caller::Own);
    let Outcome::Failed(failure) = r.run(Some("t"), now()).await.unwrap() else {
        panic!()
    };
    assert_eq!(failure.step, "revoke-new");
    assert_eq!(store.load().await.unwrap().journal.unwrap().step, Step::RollingBack);
    assert!(matches!(r.run(None, now()).await.unwrap(), Outcome::RolledBack { .. }));
    assert_eq!(fake.active_credentials(), vec![fake.initial_credential_id()]);
}

#[tokio::test]
async fn without_the_current_credential_id_nothing_is_issued() {
    let fake = FakeC1::start(FakeOptions::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let mut r = rotator(&fake, FileStore::new(dir.path().join("j.json")), Caller::Own);
    r.base.credential_id = None;
    let Outcome::Failed(failure) = r.run(Some("t"), now()).await.unwrap() else {
        panic!()
    };
    assert!(failure.message.contains("credentialId"), "{}", failure.message);
    assert!(fake.recorded().rest_calls.is_empty());
}

fn bin(fake: &FakeC1, dir: &std::path::Path) -> Command {
    let ca = dir.join("ca.pem");
    std::fs::write(&ca, &fake.ca_pem).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_bitbucket-operator"));
    cmd.arg("rotate-credentials")
        .env_clear()
        .env("BATON_CLIENT_ID", &fake.client_id)
        .env("BATON_CLIENT_SECRET", &fake.client_secret)
        .env("BATON_C1_CREDENTIAL_ID", fake.initial_credential_id())
        .env("BATON_C1_APP_ID", "app-1")
        .env("BATON_C1_CONNECTOR_ID", "conn-1")
        .env("BATON_C1_API_HOST", fake.api_host())
        .env("BATON_C1_CA_FILE", &ca)
        .current_dir(dir);
    cmd
}

fn parse_env(text: &str) -> std::collections::BTreeMap<String, String> {
    text.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

#[tokio::test]
async fn the_cli_writes_the_new_pair_0600_then_revokes_the_old() {
    let fake = FakeC1::start(FakeOptions::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("c1.env");
    let output = tokio::task::spawn_blocking({
        let mut cmd = bin(&fake, dir.path());
        cmd.arg("--out").arg(&out);
        move || cmd.output().unwrap()
    })
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    assert!(output.stdout.is_empty(), "the pair goes to --out only");
    assert!(!stderr.contains("secret-token"), "{stderr}");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        assert_eq!(std::fs::metadata(&out).unwrap().permissions().mode() & 0o777, 0o600);
    }
    let written = parse_env(&std::fs::read_to_string(&out).unwrap());
    let pair = Pair::new(&written["BATON_CLIENT_ID"], &written["BATON_CLIENT_SECRET"]);
    assert!(works(&fake, &pair).await);
    assert_eq!(
        fake.active_credentials(),
        vec![written["BATON_C1_CREDENTIAL_ID"].clone()]
    );
    assert!(
        !dir.path().join("c1.env.journal.json").exists(),
        "the journal is removed"
    );
}

#[tokio::test]
async fn the_cli_prints_once_and_resumes_an_interrupted_journal() {
    let fake = FakeC1::start(FakeOptions::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let journal = dir.path().join("bitbucket-operator-rotation.journal.json");
    // A previous run got as far as the proof, then died.
    let first = rotator(&fake, FileStore::new(&journal), Caller::Own);
    first.advance(Some("cli"), now()).await.unwrap();
    first.advance(None, now()).await.unwrap();
    assert_eq!(fake.recorded().rest_calls.len(), 1);
    let output = tokio::task::spawn_blocking({
        let mut cmd = bin(&fake, dir.path());
        move || cmd.output().unwrap()
    })
    .await
    .unwrap();
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let printed = parse_env(&String::from_utf8(output.stdout).unwrap());
    let pair = Pair::new(&printed["BATON_CLIENT_ID"], &printed["BATON_CLIENT_SECRET"]);
    assert!(works(&fake, &pair).await);
    let calls: Vec<RestCall> = fake.recorded().rest_calls.iter().map(|c| c.0).collect();
    assert_eq!(
        calls,
        vec![RestCall::Rotate, RestCall::Revoke],
        "the journal's rotation was finished, not repeated"
    );
    assert_eq!(
        fake.active_credentials(),
        vec![printed["BATON_C1_CREDENTIAL_ID"].clone()]
    );
    assert!(!journal.exists());
}

#[tokio::test]
async fn the_cli_exits_9_when_conductorone_refuses_the_caller() {
    let fake = FakeC1::start(FakeOptions::default()).await;
    fake.set_refusals(true, false);
    let dir = tempfile::tempdir().unwrap();
    let output = tokio::task::spawn_blocking({
        let mut cmd = bin(&fake, dir.path());
        move || cmd.output().unwrap()
    })
    .await
    .unwrap();
    assert_eq!(output.status.code(), Some(9));
    assert!(String::from_utf8_lossy(&output.stderr).contains("API key"));
    assert!(output.stdout.is_empty());
    assert!(
        !dir.path().join("bitbucket-operator-rotation.journal.json").exists(),
        "nothing was issued: no journal is left"
    );
    assert_eq!(fake.active_credentials(), vec![fake.initial_credential_id()]);
}

#[tokio::test]
async fn the_cli_refuses_an_unreadable_ca_bundle_before_calling_conductorone() {
    let fake = FakeC1::start(FakeOptions::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-ca.pem");
    let output = tokio::task::spawn_blocking({
        let mut cmd = bin(&fake, dir.path());
        cmd.env("BATON_C1_CA_FILE", &missing);
        move || cmd.output().unwrap()
    })
    .await
    .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("cannot read") && stderr.contains("no-such-ca.pem"),
        "{stderr}"
    );
    assert!(!stderr.contains(&fake.client_secret), "no secret in the error");
    assert!(
        fake.recorded().rest_calls.is_empty(),
        "nothing was asked of ConductorOne"
    );
    assert_eq!(fake.active_credentials(), vec![fake.initial_credential_id()]);
}
