//! `bitbucket-operator rotate-credentials`: one rotation of the connector's
//! ConductorOne client credential on a plain host (the operator does the
//! same by itself, `crate::controller::rotation`).
//!
//! RotateCredential → the pending pair into the journal file → a token
//! exchange and a Hello with it → `--out FILE` (mode 0600) gets the new pair
//! → RevokeCredential on the old id → the new pair is printed (without
//! `--out`) and the journal removed. The journal (`--journal`, default
//! `<out>.journal.json`, else `bitbucket-operator-rotation.journal.json`)
//! holds the secrets ConductorOne shows once, so running the same command
//! again after a crash or a failure finishes or rolls back that rotation
//! instead of starting another.
//!
//! Exit codes: 0 rotated; 2 usage (flags, files); 7 the pair is malformed;
//! 9 ConductorOne refused the caller (`RotationNotAuthorized`); 10 a step
//! failed, run again to resume; 11 the new pair failed its proof and was
//! revoked, the old one is still in use.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use super::credential_api::ConnectorRef;
use super::credentials::ClientCredentials;
use super::rotation::{
    Authority, BaseCredential, Caller, FailureKind, Outcome, Pair, RotationState, RotationStore, Rotator, StoreError,
};
use super::rotation_file::{FileStore, write_private};
use super::session::default_host_id;
use super::token::C1Endpoint;

#[derive(Debug, clap::Args)]
pub struct RotateArgs {
    /// The connector's ConductorOne client id.
    #[arg(long, env = "BATON_CLIENT_ID")]
    client_id: String,
    /// The connector's ConductorOne client secret.
    #[arg(long, env = "BATON_CLIENT_SECRET", hide_env_values = true)]
    client_secret: String,
    /// ConductorOne's id of that credential (shown next to it in the UI;
    /// written by a previous rotation into --out).
    #[arg(long, env = "BATON_C1_CREDENTIAL_ID")]
    credential_id: Option<String>,
    /// The ConductorOne app the connector belongs to.
    #[arg(long, env = "BATON_C1_APP_ID")]
    app_id: String,
    /// The ConductorOne connector id.
    #[arg(long, env = "BATON_C1_CONNECTOR_ID")]
    connector_id: String,
    /// Client id of a ConductorOne API key allowed to manage the connector;
    /// without one the connector's own credential calls the API.
    #[arg(long, env = "BATON_C1_API_KEY_CLIENT_ID", requires = "api_key_client_secret")]
    api_key_client_id: Option<String>,
    /// Client secret of that API key.
    #[arg(
        long,
        env = "BATON_C1_API_KEY_CLIENT_SECRET",
        hide_env_values = true,
        requires = "api_key_client_id"
    )]
    api_key_client_secret: Option<String>,
    /// `host[:port]` to use instead of the tenant host (never the JWT audience).
    #[arg(long, env = "BATON_C1_API_HOST")]
    c1_api_host: Option<String>,
    /// PEM file of CA certificates trusted in addition to the public roots.
    #[arg(long, env = "BATON_C1_CA_FILE", value_name = "FILE")]
    c1_ca_file: Option<PathBuf>,
    /// Host id of the proof's Hello; default: `BATON_HOST_ID`, else the host name.
    #[arg(long)]
    host_id: Option<String>,
    /// Write the new pair here (mode 0600, `KEY=value` lines) instead of stdout.
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
    /// The journal that makes an interrupted rotation resumable.
    #[arg(long, value_name = "FILE")]
    journal: Option<PathBuf>,
}

/// The journal file, which also writes `--out` as soon as a pair is active
/// (before the old one is revoked).
struct CliStore {
    journal: FileStore,
    out: Option<PathBuf>,
}

impl RotationStore for CliStore {
    async fn load(&self) -> Result<RotationState, StoreError> {
        self.journal.load().await
    }

    async fn save(&self, state: &RotationState) -> Result<(), StoreError> {
        if let (Some(out), Some(active)) = (&self.out, &state.active) {
            write_private(out, env_lines(&active.pair, &active.info.credential_id).as_bytes())
                .map_err(|e| StoreError(format!("cannot write {}: {e}", out.display())))?;
        }
        self.journal.save(state).await
    }
}

fn env_lines(pair: &Pair, credential_id: &str) -> String {
    format!(
        "BATON_CLIENT_ID={}\nBATON_CLIENT_SECRET={}\nBATON_C1_CREDENTIAL_ID={credential_id}\n",
        pair.client_id, pair.client_secret
    )
}

/// Attempts of a failing step in one run before giving up (the journal keeps it).
const ATTEMPTS: u32 = 3;

// Long: one linear sequence with an exit code per outcome.
pub async fn run(args: RotateArgs) -> anyhow::Result<ExitCode> {
    let pair = Pair::new(args.client_id.trim(), args.client_secret.trim());
    let credentials = match ClientCredentials::parse(&pair.client_id, &pair.client_secret) {
        Ok(c) => c,
        Err(err) => {
            eprintln!("error: {err}");
            return Ok(ExitCode::from(7));
        }
    };
    let extra_ca_pem = match super::connect::read_extra_ca(args.c1_ca_file.as_deref()) {
        Ok(pem) => pem,
        Err(code) => return Ok(code),
    };
    let caller = match (args.api_key_client_id, args.api_key_client_secret) {
        (Some(id), Some(secret)) => Caller::ApiKey(Pair::new(id.trim(), secret.trim())),
        _ => Caller::Own,
    };
    let journal_path = args.journal.clone().unwrap_or_else(|| match &args.out {
        Some(out) => {
            let mut name = out.file_name().unwrap_or_default().to_os_string();
            name.push(".journal.json");
            out.with_file_name(name)
        }
        None => PathBuf::from("bitbucket-operator-rotation.journal.json"),
    });
    let journal = FileStore::new(journal_path);
    let rotator = Rotator {
        store: CliStore {
            journal: journal.clone(),
            out: args.out.clone(),
        },
        authority: Authority {
            endpoint: C1Endpoint {
                tenant_host: credentials.client_id().host.clone(),
                api_host_override: args.c1_api_host.filter(|h| !h.trim().is_empty()),
                extra_ca_pem,
            },
            connector: ConnectorRef {
                app_id: args.app_id,
                connector_id: args.connector_id,
            },
            caller,
            host_id: args.host_id.unwrap_or_else(default_host_id),
        },
        base: BaseCredential {
            credential_id: args.credential_id.filter(|id| !id.trim().is_empty()),
            pair,
        },
    };
    let state = rotator.store.load().await?;
    // A rotation that finished but was not handed over yet is handed over, not repeated.
    let finished = state.journal.is_none() && state.active.is_some();
    let mut failures = 0;
    let outcome = loop {
        let trigger = (!finished).then_some("cli");
        match rotator.run(trigger, jiff::Timestamp::now()).await? {
            Outcome::Interrupted { message } => eprintln!("warning: {message}"),
            Outcome::Failed(failure) if failure.kind == FailureKind::Failed && failures + 1 < ATTEMPTS => {
                failures += 1;
                eprintln!("warning: {failure}; retrying");
                tokio::time::sleep(Duration::from_secs(2u64.pow(failures))).await;
            }
            other => break other,
        }
    };
    let state = rotator.store.load().await?;
    match outcome {
        Outcome::Completed(_) | Outcome::Idle => {
            let Some(active) = state.active else {
                eprintln!("error: nothing to do");
                return Ok(ExitCode::from(2));
            };
            let record = state.last.as_ref().map(|r| &r.credential);
            match &args.out {
                Some(out) => eprintln!("wrote the new pair to {}", out.display()),
                None => print!("{}", env_lines(&active.pair, &active.info.credential_id)),
            }
            if let Some(record) = record {
                eprintln!(
                    "rotated: credential {} (fingerprint {}{}) is in use; the old one is revoked",
                    record.credential_id,
                    record.fingerprint,
                    record
                        .expires_time
                        .map(|t| format!(", expires {t}"))
                        .unwrap_or_default()
                );
            }
            journal.remove()?;
            Ok(ExitCode::SUCCESS)
        }
        Outcome::RolledBack { reason } => {
            eprintln!("error: {reason}; the new credential was revoked and the old pair is still in use");
            journal.remove()?;
            Ok(ExitCode::from(11))
        }
        Outcome::Failed(failure) => {
            eprintln!("error: {failure}");
            if state == RotationState::default() {
                // Nothing was issued: no journal to keep.
                journal.remove()?;
            }
            if state.journal.is_some() {
                eprintln!(
                    "the rotation is recorded in {}; run the same command again to finish it",
                    journal.path().display()
                );
            }
            Ok(ExitCode::from(if failure.kind == FailureKind::NotAuthorized {
                9
            } else {
                10
            }))
        }
        Outcome::Advanced(_) | Outcome::Interrupted { .. } => Ok(ExitCode::from(10)),
    }
}
