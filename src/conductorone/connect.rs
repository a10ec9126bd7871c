//! `bitbucket-operator connect`: service mode on a plain host, like
//! `baton-bitbucket --client-id … --client-secret …`. Runs until SIGTERM or
//! Ctrl-C, then finishes or fails the current task cleanly.
//!
//! Exit codes:
//! - 0: stopped by a signal.
//! - 1: another failure (the store, the work directory).
//! - 2: usage error (flags, an unreadable CA file, a bad `--max-snapshot-age`).
//! - 3: Bitbucket credentials missing, rejected or not allowed.
//! - 4: a configured workspace does not exist (or none is administered).
//! - 5: Bitbucket unreachable at start.
//! - 7: ConductorOne client id or secret malformed, or refused by the tenant.
//! - 8: ConductorOne refused Hello for another reason (see the message).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio_util::sync::CancellationToken;

use super::credentials::ClientCredentials;
use super::session::{Backend, OnRejected, ServiceSession, ServiceSettings, SessionError, Timing, default_host_id};
use super::status::ConnectionReason;
use super::token::C1Endpoint;
use crate::bitbucket::{Client, ClientConfig, Limits};
use crate::provision::Provisioner;
use crate::settings::CredentialArgs;
use crate::settings::parse_workspaces;
use crate::store::Store;
use crate::sync::{SyncEngine, SyncError};

#[derive(Debug, clap::Args)]
pub struct ConnectArgs {
    #[command(flatten)]
    credentials: CredentialArgs,
    /// Workspace slugs (comma-separated); default: `BATON_WORKSPACES`, else
    /// every workspace the credentials administer.
    #[arg(long, value_delimiter = ',')]
    workspaces: Vec<String>,
    /// ConductorOne client id (`<name>@<tenant host>/<suffix>`).
    #[arg(long, env = "BATON_CLIENT_ID")]
    client_id: Option<String>,
    /// ConductorOne client secret (`secret-token:conductorone.com:v1:…`).
    #[arg(long, env = "BATON_CLIENT_SECRET", hide_env_values = true)]
    client_secret: Option<String>,
    /// `host[:port]` to use instead of the tenant host (token URL and gRPC; never the JWT audience).
    #[arg(long, env = "BATON_C1_API_HOST")]
    c1_api_host: Option<String>,
    /// PEM file of CA certificates trusted in addition to the public roots.
    #[arg(long, env = "BATON_C1_CA_FILE", value_name = "FILE")]
    c1_ca_file: Option<PathBuf>,
    /// Host id sent to ConductorOne; default: `BATON_HOST_ID`, else the host name.
    #[arg(long)]
    host_id: Option<String>,
    /// SQLite store (created if missing); its data answers sync_full tasks.
    #[arg(long, default_value = "bitbucket-operator.db")]
    db: PathBuf,
    /// Name the data is stored under in the store.
    #[arg(long, default_value = "default")]
    connector: String,
    /// Refresh a resource type before an upload when its data is older than
    /// this (`90s`, `30m`, `1h`, `2d`; `0`: always refresh).
    #[arg(long, default_value = "1h", value_parser = parse_age)]
    max_snapshot_age: Duration,
    /// Requests per rolling hour allowed for the Bitbucket credentials.
    #[arg(long, default_value_t = 1000)]
    requests_per_hour: u32,
    /// Bitbucket requests in flight at once.
    #[arg(long, default_value_t = 4)]
    max_in_flight: usize,
}

/// `90s`, `30m`, `1h`, `2d`, or plain seconds.
pub fn parse_age(value: &str) -> Result<Duration, String> {
    let value = value.trim();
    let (number, unit) = value.split_at(value.find(|c: char| !c.is_ascii_digit()).unwrap_or(value.len()));
    let n: u64 = number
        .parse()
        .map_err(|_| format!("invalid duration {value:?}; use e.g. 90s, 30m, 1h, 2d or 0"))?;
    let seconds = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("invalid duration unit in {value:?}; use s, m, h or d")),
    };
    Ok(Duration::from_secs(n.saturating_mul(seconds)))
}

// Long: one linear setup sequence with an exit code per failure; splitting it would scatter them.
pub async fn run(args: ConnectArgs) -> anyhow::Result<ExitCode> {
    let settings = match args.credentials.settings() {
        Ok(s) => s,
        Err(message) => {
            eprintln!("error: {message}");
            return Ok(ExitCode::from(3));
        }
    };
    let (client_id, client_secret) = match (&args.client_id, &args.client_secret, &settings.platform) {
        (Some(id), Some(secret), _) => (id.clone(), secret.clone()),
        (None, None, Some(p)) => (p.client_id.clone(), p.client_secret.clone()),
        _ => {
            eprintln!("error: set both --client-id and --client-secret (or BATON_CLIENT_ID and BATON_CLIENT_SECRET)");
            return Ok(ExitCode::from(7));
        }
    };
    let credentials = match ClientCredentials::parse(&client_id, &client_secret) {
        Ok(c) => c,
        Err(err) => {
            eprintln!("error: {err}");
            return Ok(ExitCode::from(7));
        }
    };
    let extra_ca_pem = match read_extra_ca(args.c1_ca_file.as_deref()) {
        Ok(pem) => pem,
        Err(code) => return Ok(code),
    };
    let workspaces = if args.workspaces.is_empty() {
        settings.workspaces.clone()
    } else {
        parse_workspaces(&args.workspaces.join(",")).map_err(anyhow::Error::msg)?
    };
    let mut config = ClientConfig::new(&args.credentials.api_url())?;
    config.limits = Limits {
        max_requests: args.requests_per_hour,
        max_in_flight: args.max_in_flight,
        ..Limits::default()
    };
    let client = Client::new(config, settings.credentials.clone())?;
    let engine = SyncEngine::new(client.clone(), workspaces);
    if let Err(err) = engine.connect().await {
        eprintln!("error: {err}");
        return Ok(ExitCode::from(bitbucket_exit_code(&err)));
    }
    let db = args.db.clone();
    let store = Arc::new(
        tokio::task::spawn_blocking(move || Store::open(&db))
            .await?
            .with_context(|| format!("opening {}", args.db.display()))?,
    );
    let work_dir = match args.db.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let service = ServiceSettings {
        connector: args.connector.clone(),
        host_id: args.host_id.clone().unwrap_or_else(default_host_id),
        endpoint: C1Endpoint {
            tenant_host: credentials.client_id().host.clone(),
            api_host_override: args.c1_api_host.clone().filter(|h| !h.trim().is_empty()),
            extra_ca_pem,
        },
        max_snapshot_age: args.max_snapshot_age,
        work_dir,
        on_rejected: OnRejected::Stop,
        timing: Timing::default(),
    };
    let backend = Backend {
        store: Arc::clone(&store),
        engine,
        provisioner: Provisioner::new(client, settings.provisioning).with_store(Arc::clone(&store), &args.connector),
    };
    let session = match ServiceSession::new(service, credentials, backend, None) {
        Ok(s) => s,
        Err(err) => {
            eprintln!("error: {err}");
            return Ok(ExitCode::from(2));
        }
    };
    let shutdown = CancellationToken::new();
    tokio::spawn(stop_on_signal(shutdown.clone()));
    eprintln!(
        "connect: host id {:?}, ConductorOne {}; stop with SIGTERM or Ctrl-C",
        session.status().borrow().host_id,
        session_host(&args, &client_id)
    );
    match session.run(shutdown).await {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(SessionError::Rejected { reason, message }) => {
            eprintln!("error: {message}");
            Ok(ExitCode::from(match reason {
                ConnectionReason::InvalidClientCredentials => 7,
                _ => 8,
            }))
        }
        Err(SessionError::Setup(message)) => {
            eprintln!("error: {message}");
            Ok(ExitCode::from(2))
        }
    }
}

/// The `--c1-ca-file` bundle, read once for the CLI commands that talk to
/// ConductorOne; an unreadable file is a usage error (exit 2), said on stderr.
pub(super) fn read_extra_ca(path: Option<&std::path::Path>) -> Result<Option<Vec<u8>>, ExitCode> {
    let Some(path) = path else { return Ok(None) };
    std::fs::read(path).map(Some).map_err(|err| {
        eprintln!("error: cannot read {}: {err}", path.display());
        ExitCode::from(2)
    })
}

fn session_host(args: &ConnectArgs, client_id: &str) -> String {
    args.c1_api_host
        .clone()
        .or_else(|| super::credentials::ClientId::parse(client_id).ok().map(|c| c.host))
        .unwrap_or_default()
}

fn bitbucket_exit_code(err: &SyncError) -> u8 {
    match err {
        SyncError::InvalidCredentials(_) | SyncError::InsufficientScopes(_) => 3,
        SyncError::WorkspaceNotFound { .. } | SyncError::NoWorkspaces => 4,
        SyncError::Unavailable(_) | SyncError::RateLimited(_) => 5,
        SyncError::Api(_) | SyncError::Store(_) => 1,
    }
}

/// Cancels `shutdown` on SIGTERM or Ctrl-C.
async fn stop_on_signal(shutdown: CancellationToken) {
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(err) => {
                tracing::warn!(error = %err, "cannot listen for SIGTERM");
                let _ = tokio::signal::ctrl_c().await;
                shutdown.cancel();
                return;
            }
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
    tracing::info!("stopping: finishing or failing the current task");
    shutdown.cancel();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_parse() {
        assert_eq!(parse_age("0"), Ok(Duration::ZERO));
        assert_eq!(parse_age("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_age("30m"), Ok(Duration::from_secs(1800)));
        assert_eq!(parse_age("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_age("2d"), Ok(Duration::from_secs(172_800)));
        assert!(parse_age("1w").is_err() && parse_age("h").is_err() && parse_age("").is_err());
    }
}
