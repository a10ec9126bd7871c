//! `bitbucket-operator sync`: one full sync into the SQLite store, without a
//! cluster, against Bitbucket or (with `--demo`) the built-in simulator.
//!
//! Exit codes (documented in the README):
//! - 0: every selected syncer succeeded.
//! - 1: a syncer or the store failed for another reason.
//! - 2: usage error (bad flags).
//! - 3: credentials missing, rejected, or not allowed to read permissions.
//! - 4: a configured workspace does not exist (or none is administered).
//! - 5: Bitbucket unreachable, failing, or rate limiting beyond the retry budget.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use futures::StreamExt;

use super::{RunReport, SyncEngine, SyncError, run_into_store};
use crate::bitbucket::{Client, ClientConfig, Limits};
use crate::model::SyncKind;
use crate::settings::{ConnectorSettings, CredentialArgs, SecretKeys, parse_workspaces, secret_key};
use crate::simulator::{SimConfig, Simulator};
use crate::store::Store;

#[derive(Debug, clap::Args)]
pub struct SyncArgs {
    /// Run against the built-in simulator with a generated organisation: no
    /// credentials, no network.
    #[arg(long, conflicts_with = "secret_file")]
    demo: bool,
    /// Workspace slugs to sync (comma-separated); default: every workspace the
    /// credentials administer.
    #[arg(long, value_delimiter = ',')]
    workspaces: Vec<String>,
    /// SQLite database file (created if missing).
    #[arg(long, default_value = "bitbucket-operator.db")]
    db: PathBuf,
    /// Name the data is stored under (one file can hold several connectors).
    #[arg(long, default_value = "default")]
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
    #[arg(long, default_value_t = 1000)]
    requests_per_hour: u32,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 4)]
    max_in_flight: usize,
    /// After a successful sync, also write the data as a ConductorOne c1z file.
    #[arg(long, value_name = "FILE")]
    c1z: Option<PathBuf>,
}

fn parse_kind(value: &str) -> Result<SyncKind, String> {
    SyncKind::parse(value.trim()).ok_or_else(|| {
        format!("unknown resource type {value:?}; expected accounts, workspaces, groups, projects or repositories")
    })
}

/// The demo organisation: big enough to look like a company, small enough to
/// sync in about a second.
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

pub async fn run(args: SyncArgs) -> anyhow::Result<ExitCode> {
    let demo = if args.demo {
        let sim = Simulator::start(demo_config(), SocketAddr::from(([127, 0, 0, 1], 0)))
            .await
            .context("starting the simulator")?;
        eprintln!("demo: simulated Bitbucket at {}", sim.base_url());
        Some(sim)
    } else {
        None
    };
    let (api_url, settings) = match &demo {
        Some(sim) => {
            let creds = sim.credentials();
            let mut data = BTreeMap::new();
            data.insert(secret_key::USERNAME.to_owned(), creds.email.clone());
            data.insert(secret_key::APP_PASSWORD.to_owned(), creds.api_token.clone());
            (
                sim.base_url(),
                ConnectorSettings::from_map(&data, &SecretKeys::default())?,
            )
        }
        None => match args.credentials.settings() {
            Ok(settings) => (args.credentials.api_url.clone(), settings),
            Err(message) => {
                eprintln!("error: {message}");
                return Ok(ExitCode::from(3));
            }
        },
    };
    let workspaces = if args.workspaces.is_empty() {
        settings.workspaces.clone()
    } else {
        parse_workspaces(&args.workspaces.join(",")).map_err(anyhow::Error::msg)?
    };

    let mut config = ClientConfig::new(&api_url)?;
    config.limits = Limits {
        max_requests: args.requests_per_hour,
        max_in_flight: args.max_in_flight,
        ..Limits::default()
    };
    let client = Client::new(config, settings.credentials.clone())?;
    let engine = SyncEngine::new(client, workspaces);

    let clock = Instant::now();
    let scope = match engine.connect().await {
        Ok(scope) => scope,
        Err(err) => {
            eprintln!("error: {err}");
            return Ok(exit_code(&err));
        }
    };
    let slugs: Vec<&str> = scope.workspaces.iter().map(|w| w.slug.as_str()).collect();
    eprintln!("connected: {} workspace(s): {}", slugs.len(), slugs.join(", "));

    let store = Arc::new(
        tokio::task::spawn_blocking({
            let db = args.db.clone();
            move || Store::open(&db)
        })
        .await?
        .with_context(|| format!("opening {}", args.db.display()))?,
    );
    let kinds = if args.only.is_empty() {
        SyncKind::ALL.to_vec()
    } else {
        args.only.clone()
    };
    let connect_requests = engine.client().request_count();

    // Every syncer runs at once; the shared limiter paces them together.
    let mut runs = futures::stream::iter(kinds.iter().copied())
        .map(|kind| {
            let engine = &engine;
            let store = &store;
            let scope = &scope;
            let connector = args.connector.as_str();
            async move { (kind, run_into_store(engine, store, connector, kind, scope).await) }
        })
        .buffer_unordered(kinds.len());
    let mut outcomes: BTreeMap<SyncKind, Result<RunReport, SyncError>> = BTreeMap::new();
    while let Some((kind, outcome)) = runs.next().await {
        match &outcome {
            Ok(r) => eprintln!(
                "{:<13} done: {} resources, {} entitlements, {} grants, {} requests, {:.2}s",
                kind.as_str(),
                r.resources,
                r.entitlements,
                r.grants,
                r.requests,
                r.duration.as_secs_f64()
            ),
            Err(err) => eprintln!("{:<13} FAILED: {err} (previous data kept)", kind.as_str()),
        }
        outcomes.insert(kind, outcome);
    }
    drop(runs);
    let elapsed = clock.elapsed();
    if let Some(sim) = demo {
        sim.shutdown().await;
    }

    let summary = Summary::new(&args, &slugs, &outcomes, connect_requests, elapsed);
    if args.json {
        println!("{}", serde_json::to_string(&summary)?);
    } else {
        print!("{}", summary.table());
        if args.demo
            && let Some(repository) = example_repository(&store, &args.connector)
        {
            println!(
                "\nTry: bitbucket-operator access --db {} who-can {repository}",
                args.db.display()
            );
        }
    }
    let first_error = outcomes.values().find_map(|o| o.as_ref().err());
    if let (None, Some(path)) = (first_error, &args.c1z) {
        crate::conductorone::cli::write_after_sync(&store, &args.connector, path).await?;
    }
    Ok(first_error.map(exit_code).unwrap_or(ExitCode::SUCCESS))
}

/// A repository full name from the store, for the demo's hint.
fn example_repository(store: &Store, connector: &str) -> Option<String> {
    let repositories = store
        .resources(connector, Some(crate::model::ResourceType::Repository))
        .ok()?;
    repositories
        .first()?
        .profile
        .get("full_name")?
        .as_str()
        .map(str::to_owned)
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
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'static str>,
}

impl Summary {
    fn new(
        args: &SyncArgs,
        workspaces: &[&str],
        outcomes: &BTreeMap<SyncKind, Result<RunReport, SyncError>>,
        connect_requests: u64,
        elapsed: Duration,
    ) -> Self {
        let resource_types: Vec<KindSummary> = outcomes
            .iter()
            .map(|(&kind, outcome)| match outcome {
                Ok(r) => KindSummary {
                    resource_type: kind,
                    ok: true,
                    resources: r.resources,
                    entitlements: r.entitlements,
                    grants: r.grants,
                    unknown_principals: r.unknown_principals,
                    requests: r.requests,
                    seconds: round3(r.duration.as_secs_f64()),
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
                    requests: 0,
                    seconds: 0.0,
                    error: Some(err.to_string()),
                    reason: Some(err.reason()),
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
                format!("failed ({})", k.reason.unwrap_or("error"))
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
