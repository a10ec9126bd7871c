//! `bitbucket-operator sync`: one full sync into the SQLite store, without a
//! cluster, against Bitbucket or (with `--demo`) the built-in simulator.
//!
//! Exit codes (documented in the README):
//! - 0: every selected syncer succeeded.
//! - 1: a syncer or the store failed for another reason.
//! - 2: usage error (bad flags).
//! - 3: credentials missing, rejected, or not allowed to read permissions.
//! - 4: a configured workspace does not exist (or none is administered).
//! - 5: Bitbucket unreachable, failing (beyond `--outage-tolerance`), or rate
//!   limiting beyond the retry budget.
//! - 7: the store file is damaged (SQLite `quick_check`), not a store, or of
//!   a newer schema.

use std::collections::BTreeMap;
#[cfg(feature = "simulator")]
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[cfg(feature = "simulator")]
use anyhow::Context as _;
use futures::StreamExt;

use super::progress_view::{ProgressView, ViewMode};
use super::{FailureClass, RunOutcome, SyncEngine, SyncError, run_into_store_with_cost};
use crate::bitbucket::{Client, ClientConfig, Limits};
use crate::model::SyncKind;
use crate::settings::{ConnectorSettings, CredentialArgs, parse_workspaces};
#[cfg(feature = "simulator")]
use crate::settings::{SecretKeys, secret_key};
#[cfg(feature = "simulator")]
use crate::simulator::{SimConfig, Simulator, SimulatorHandle};
use crate::store::{Store, StoreError};

#[derive(Debug, clap::Args)]
pub struct SyncArgs {
    /// Run against the built-in simulator with a generated organisation: no
    /// credentials, no network.
    #[arg(long, conflicts_with_all = ["secret_file", "api_url", "username", "app_password", "token", "consumer_key", "consumer_secret"])]
    #[cfg_attr(not(feature = "simulator"), arg(hide = true))]
    demo: bool,
    /// Workspace slugs to sync (comma-separated); default: every workspace the
    /// credentials administer. Only these workspaces' data is replaced.
    #[arg(long, value_delimiter = ',')]
    workspaces: Vec<String>,
    /// SQLite database file (created if missing).
    #[arg(long, default_value = DEFAULT_DB)]
    db: PathBuf,
    /// Name the data is stored under (one file can hold several connectors).
    #[arg(long, default_value = "default", value_parser = non_empty("--connector"))]
    connector: String,
    /// Only these resource types (accounts, workspaces, groups, projects,
    /// repositories); default: all.
    #[arg(long, value_delimiter = ',', value_parser = parse_kind)]
    only: Vec<SyncKind>,
    /// Print the summary as one JSON object on stdout.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    credentials: CredentialArgs,
    /// Requests per rolling hour allowed for these credentials.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..))]
    requests_per_hour: u32,
    /// Requests in flight at once (1 to 256).
    #[arg(long, default_value_t = 4, value_parser = in_flight)]
    max_in_flight: usize,
    /// How long Bitbucket may fail (5xx, timeouts, resets) before the run
    /// gives up: `90s`, `15m`, `1h`. The run stays resumable either way.
    #[arg(long, default_value = "15m", value_parser = parse_duration)]
    outage_tolerance: Duration,
    /// Seconds between plain progress lines when stderr is not a terminal.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..), hide = true)]
    progress_every: u64,
    /// After a successful sync, also write the data as a ConductorOne c1z file.
    #[arg(long, value_name = "FILE")]
    c1z: Option<PathBuf>,
}

/// Where `sync` writes, and where `access` reads, unless told otherwise.
pub const DEFAULT_DB: &str = "bitbucket-operator.db";

/// A clap value parser refusing an empty (or blank) value for `flag`.
fn non_empty(flag: &'static str) -> impl Fn(&str) -> Result<String, String> + Clone {
    move |value: &str| {
        if value.trim().is_empty() {
            Err(format!("{flag} must not be empty"))
        } else {
            Ok(value.to_owned())
        }
    }
}

fn in_flight(value: &str) -> Result<usize, String> {
    match value.parse::<usize>() {
        Ok(n @ 1..=256) => Ok(n),
        _ => Err(format!("expected a number from 1 to 256, got {value:?}")),
    }
}

/// `90`, `90s`, `15m`, `1h`, `1h30m`.
pub fn parse_duration(value: &str) -> Result<Duration, String> {
    let bad = || format!("expected a duration such as 90s, 15m or 1h, got {value:?}");
    let text = value.trim();
    if let Ok(seconds) = text.parse::<u64>() {
        return Ok(Duration::from_secs(seconds));
    }
    let mut total = 0u64;
    let mut number = String::new();
    for c in text.chars() {
        if c.is_ascii_digit() {
            number.push(c);
            continue;
        }
        let n: u64 = number.parse().map_err(|_| bad())?;
        number.clear();
        total += n * match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            _ => return Err(bad()),
        };
    }
    if !number.is_empty() || text.is_empty() {
        return Err(bad());
    }
    Ok(Duration::from_secs(total))
}

fn parse_kind(value: &str) -> Result<SyncKind, String> {
    SyncKind::parse(value.trim()).ok_or_else(|| {
        format!("unknown resource type {value:?}; expected accounts, workspaces, groups, projects or repositories")
    })
}

/// The demo organisation: big enough to look like a company, small enough to
/// sync in about a second.
#[cfg(feature = "simulator")]
pub fn demo_config() -> SimConfig {
    SimConfig {
        seed: 42,
        workspaces: 2,
        users: 120,
        groups: 12,
        projects: 10,
        repositories: 80,
        ..SimConfig::default()
    }
}

/// `--demo`: the in-process simulator and the admin credential it issued.
#[cfg(feature = "simulator")]
struct Demo(SimulatorHandle);

#[cfg(feature = "simulator")]
impl Demo {
    async fn start() -> anyhow::Result<Demo> {
        let sim = Simulator::start(demo_config(), SocketAddr::from(([127, 0, 0, 1], 0)))
            .await
            .context("starting the simulator")?;
        eprintln!("demo: simulated Bitbucket at {}", sim.base_url());
        Ok(Demo(sim))
    }

    fn api_url(&self) -> String {
        self.0.base_url()
    }

    fn settings(&self) -> anyhow::Result<ConnectorSettings> {
        let creds = self.0.credentials();
        let mut data = BTreeMap::new();
        data.insert(secret_key::USERNAME.to_owned(), creds.email.clone());
        data.insert(secret_key::APP_PASSWORD.to_owned(), creds.api_token.clone());
        Ok(ConnectorSettings::from_map(&data, &SecretKeys::default())?)
    }

    async fn shutdown(self) {
        self.0.shutdown().await;
    }
}

/// A build without the simulator has no demo: `start` says how to get one.
#[cfg(not(feature = "simulator"))]
enum Demo {}

#[cfg(not(feature = "simulator"))]
impl Demo {
    async fn start() -> anyhow::Result<Demo> {
        anyhow::bail!(crate::simulator::UNAVAILABLE)
    }

    fn api_url(&self) -> String {
        match *self {}
    }

    fn settings(&self) -> anyhow::Result<ConnectorSettings> {
        match *self {}
    }

    async fn shutdown(self) {
        match self {}
    }
}

// The command's whole story in order (simulator, settings, store check,
// connect, runs with progress, summary); each step is a few lines.
pub async fn run(args: SyncArgs) -> anyhow::Result<ExitCode> {
    let demo = if args.demo { Some(Demo::start().await?) } else { None };
    let (api_url, settings) = match &demo {
        Some(demo) => (demo.api_url(), demo.settings()?),
        None => match args.credentials.settings() {
            Ok(settings) => (args.credentials.api_url(), settings),
            Err(message) => {
                eprintln!("error: {message}");
                return Ok(ExitCode::from(3));
            }
        },
    };
    let explicit_workspaces = !args.workspaces.is_empty() || !settings.workspaces.is_empty();
    let workspaces = if args.workspaces.is_empty() {
        settings.workspaces.clone()
    } else {
        parse_workspaces(&args.workspaces.join(",")).map_err(anyhow::Error::msg)?
    };

    // An existing file is checked before anything is spent on filling it; a
    // new one is created only once the credentials work.
    let mut store = if args.db.exists() {
        match open_store(&args.db).await {
            Ok(store) => Some(store),
            Err(code) => return Ok(code),
        }
    } else {
        None
    };

    let mut config = ClientConfig::new(&api_url)?;
    config.limits = Limits {
        max_requests: args.requests_per_hour,
        max_in_flight: args.max_in_flight,
        ..Limits::default()
    };
    // Connecting fails fast (a wrong URL or credential should not wait out
    // an outage); the runs ride out outages up to the tolerance. Both
    // clients share the credential's limiter.
    let connecting = SyncEngine::new(
        Client::new(config.clone(), settings.credentials.clone())?,
        workspaces.clone(),
    );
    config.outage_tolerance = Some(args.outage_tolerance);
    config.backoff_max = config
        .backoff_max
        .min(args.outage_tolerance.max(Duration::from_secs(1)));
    let client = Client::new(config, settings.credentials.clone())?;
    let engine = SyncEngine::new(client, workspaces).replacing_only_scope(explicit_workspaces);

    let clock = Instant::now();
    let scope = match connecting.connect().await {
        Ok(scope) => scope,
        Err(err) => {
            eprintln!("error: {err}");
            return Ok(exit_code(&err));
        }
    };
    let slugs: Vec<&str> = scope.workspaces.iter().map(|w| w.slug.as_str()).collect();
    eprintln!("connected: {} workspace(s): {}", slugs.len(), slugs.join(", "));

    let store = match store.take() {
        Some(store) => store,
        None => match open_store(&args.db).await {
            Ok(store) => store,
            Err(code) => return Ok(code),
        },
    };
    let kinds = if args.only.is_empty() {
        SyncKind::ALL.to_vec()
    } else {
        args.only.clone()
    };
    let connect_requests = connecting.client().request_count();
    let view = ProgressView::start(
        engine.progress().clone(),
        engine.client().clone(),
        ViewMode::detect(Duration::from_secs(args.progress_every)),
    );

    // Every syncer runs at once; the shared limiter paces them together.
    let mut runs = futures::stream::iter(kinds.iter().copied())
        .map(|kind| {
            let engine = &engine;
            let store = &store;
            let scope = &scope;
            let connector = args.connector.as_str();
            async move { run_into_store_with_cost(engine, store, connector, kind, scope).await }
        })
        .buffer_unordered(kinds.len());
    let mut outcomes: BTreeMap<SyncKind, RunOutcome> = BTreeMap::new();
    while let Some(outcome) = runs.next().await {
        let kind = outcome.kind;
        match &outcome.result {
            Ok(r) => eprintln!(
                "{:<13} done: {} resources, {} entitlements, {} grants, {} requests, {:.2}s{}",
                kind.as_str(),
                r.resources,
                r.entitlements,
                r.grants,
                r.requests,
                r.duration.as_secs_f64(),
                match r.resumed_from {
                    Some(run) => format!(" (resumed run {run}: {} units reused)", r.resumed_units),
                    None => String::new(),
                }
            ),
            Err(err) => eprintln!(
                "{:<13} FAILED after {} requests: {err} (previous data kept; the next sync resumes this run)",
                kind.as_str(),
                outcome.requests
            ),
        }
        outcomes.insert(kind, outcome);
    }
    drop(runs);
    view.stop().await;
    let elapsed = clock.elapsed();
    if let Some(demo) = demo {
        demo.shutdown().await;
    }

    let summary = Summary::new(&args, &slugs, &outcomes, connect_requests, elapsed);
    let mut out = if args.json {
        format!("{}\n", serde_json::to_string(&summary)?)
    } else {
        summary.table()
    };
    if args.demo
        && !args.json
        && let Some(repository) = example_repository(&store, &args.connector)
    {
        out.push_str(&format!(
            "\nTry: bitbucket-operator access --db {} who-can {repository}\n",
            args.db.display()
        ));
    }
    crate::access::cli::print_stdout(&out)?;
    let first_error = outcomes.values().find_map(|o| o.result.as_ref().err());
    if let (None, Some(path)) = (first_error, &args.c1z) {
        crate::conductorone::cli::write_after_sync(&store, &args.connector, path).await?;
    }
    Ok(first_error.map(exit_code).unwrap_or(ExitCode::SUCCESS))
}

/// Exit code for a store that is damaged or not a store at all.
pub const EXIT_BAD_STORE: u8 = 7;

/// Opens (creating if missing) and checks the store; on failure prints why
/// and returns the exit code.
async fn open_store(path: &std::path::Path) -> Result<Arc<Store>, ExitCode> {
    let path = path.to_owned();
    let opened = tokio::task::spawn_blocking(move || Store::open_checked(&path)).await;
    match opened {
        Ok(Ok(store)) => Ok(Arc::new(store)),
        Ok(Err(err)) => {
            eprintln!("error: {err}");
            Err(ExitCode::from(match err {
                StoreError::Damaged { .. } | StoreError::NotAStore { .. } | StoreError::TooNew { .. } => EXIT_BAD_STORE,
                _ => 1,
            }))
        }
        Err(err) => {
            eprintln!("error: opening the store: {err}");
            Err(ExitCode::FAILURE)
        }
    }
}

/// A repository full name from the store, for the demo's hint.
fn example_repository(store: &Store, connector: &str) -> Option<String> {
    let repositories = store
        .resources(connector, Some(crate::model::ResourceType::Repository))
        .ok()?;
    Some(repositories.first()?.profile.repository()?.full_name.clone())
}

fn exit_code(err: &SyncError) -> ExitCode {
    ExitCode::from(match err {
        SyncError::InvalidCredentials(_) | SyncError::InsufficientScopes(_) => 3,
        SyncError::WorkspaceNotFound { .. } | SyncError::NoWorkspaces => 4,
        SyncError::Unavailable(_) | SyncError::RateLimited(_) => 5,
        SyncError::Api(_) | SyncError::Store(_) => 1,
    })
}

/// The end-of-run summary, as a table or JSON.
#[derive(Debug, serde::Serialize)]
struct Summary {
    connector: String,
    database: String,
    workspaces: Vec<String>,
    ok: bool,
    /// Requests spent checking credentials and finding workspaces.
    connect_requests: u64,
    total_requests: u64,
    seconds: f64,
    resource_types: Vec<KindSummary>,
}

#[derive(Debug, serde::Serialize)]
struct KindSummary {
    resource_type: SyncKind,
    ok: bool,
    resources: usize,
    entitlements: usize,
    grants: usize,
    unknown_principals: usize,
    requests: u64,
    seconds: f64,
    /// The unfinished run this one resumed.
    #[serde(skip_serializing_if = "Option::is_none")]
    resumed_from: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    /// The failure's class (`unavailable`, `invalid-credentials`, ...).
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<FailureClass>,
}

impl Summary {
    fn new(
        args: &SyncArgs,
        workspaces: &[&str],
        outcomes: &BTreeMap<SyncKind, RunOutcome>,
        connect_requests: u64,
        elapsed: Duration,
    ) -> Self {
        let resource_types: Vec<KindSummary> = outcomes
            .iter()
            .map(|(&kind, outcome)| match &outcome.result {
                Ok(r) => KindSummary {
                    resource_type: kind,
                    ok: true,
                    resources: r.resources,
                    entitlements: r.entitlements,
                    grants: r.grants,
                    unknown_principals: r.unknown_principals,
                    requests: r.requests,
                    seconds: round3(r.duration.as_secs_f64()),
                    resumed_from: r.resumed_from,
                    error: None,
                    reason: None,
                },
                Err(err) => KindSummary {
                    resource_type: kind,
                    ok: false,
                    resources: 0,
                    entitlements: 0,
                    grants: 0,
                    unknown_principals: 0,
                    requests: outcome.requests,
                    seconds: round3(outcome.duration.as_secs_f64()),
                    resumed_from: None,
                    error: Some(err.to_string()),
                    reason: Some(err.class()),
                },
            })
            .collect();
        Summary {
            connector: args.connector.clone(),
            database: args.db.display().to_string(),
            workspaces: workspaces.iter().map(|s| s.to_string()).collect(),
            ok: resource_types.iter().all(|k| k.ok),
            connect_requests,
            total_requests: connect_requests + resource_types.iter().map(|k| k.requests).sum::<u64>(),
            seconds: round3(elapsed.as_secs_f64()),
            resource_types,
        }
    }

    fn table(&self) -> String {
        let mut out = format!(
            "\n{:<14}{:>11}{:>14}{:>9}{:>10}{:>9}  {}\n",
            "TYPE", "RESOURCES", "ENTITLEMENTS", "GRANTS", "REQUESTS", "SECONDS", "STATUS"
        );
        for k in &self.resource_types {
            let status = if k.ok {
                "ok".to_owned()
            } else {
                format!("failed ({})", k.reason.map_or("error", FailureClass::as_str))
            };
            out.push_str(&format!(
                "{:<14}{:>11}{:>14}{:>9}{:>10}{:>9.2}  {status}\n",
                k.resource_type.as_str(),
                k.resources,
                k.entitlements,
                k.grants,
                k.requests,
                k.seconds
            ));
        }
        out.push_str(&format!(
            "{:<14}{:>11}{:>14}{:>9}{:>10}{:>9.2}\n",
            "total",
            self.resource_types.iter().map(|k| k.resources).sum::<usize>(),
            self.resource_types.iter().map(|k| k.entitlements).sum::<usize>(),
            self.resource_types.iter().map(|k| k.grants).sum::<usize>(),
            self.total_requests,
            self.seconds
        ));
        out.push_str(&format!(
            "\nstored in {} (connector {:?})\n",
            self.database, self.connector
        ));
        out
    }
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}
