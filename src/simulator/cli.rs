//! `bitbucket-operator simulate`: serve the simulator until SIGINT/SIGTERM.

use std::io::Write;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use serde::Serialize;

use super::{RateLimit, SimConfig, Simulator};

/// Serve a simulated Bitbucket Cloud API. Prints one JSON line with the URL
/// and credentials on stdout once listening.
#[derive(Debug, clap::Args)]
pub struct SimulateArgs {
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:7990")]
    pub listen: SocketAddr,
    /// Seed of the generated organisation.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Number of workspaces.
    #[arg(long, default_value_t = 2)]
    pub workspaces: usize,
    /// Number of users (total; users may belong to several workspaces).
    #[arg(long, default_value_t = 40)]
    pub users: usize,
    /// Number of groups (total across workspaces).
    #[arg(long, default_value_t = 8)]
    pub groups: usize,
    /// Number of projects (total across workspaces).
    #[arg(long, default_value_t = 6)]
    pub projects: usize,
    /// Number of repositories (total across workspaces).
    #[arg(long, default_value_t = 30)]
    pub repositories: usize,
    /// Latency added to every request, in milliseconds.
    #[arg(long, default_value_t = 0)]
    pub latency_ms: u64,
    /// Per-credential rolling-window rate limit, e.g. 1000/1h, 50/10s, 100/1m.
    #[arg(long, value_parser = parse_rate_limit)]
    pub rate_limit: Option<RateLimit>,
    /// Probability (0..=1) that a request fails with 500/502/503.
    #[arg(long, default_value_t = 0.0, value_parser = parse_fail_rate)]
    pub fail_rate: f64,
    /// Largest accepted `pagelen`.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_pagelen: u64,
}

fn parse_rate_limit(s: &str) -> Result<RateLimit, String> {
    s.parse()
}

fn parse_fail_rate(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|_| format!("{s:?} is not a number"))?;
    if (0.0..=1.0).contains(&v) {
        Ok(v)
    } else {
        Err(format!("{s} is outside 0..=1"))
    }
}

impl SimulateArgs {
    pub fn config(&self) -> SimConfig {
        SimConfig {
            seed: self.seed,
            workspaces: self.workspaces,
            users: self.users,
            groups: self.groups,
            projects: self.projects,
            repositories: self.repositories,
            latency: Duration::from_millis(self.latency_ms),
            rate_limit: self.rate_limit,
            fail_rate: self.fail_rate,
            max_pagelen: self.max_pagelen as usize,
            ..SimConfig::default()
        }
    }
}

/// The line printed on start, fields in this order.
#[derive(Serialize)]
struct StartLine<'a> {
    listen: String,
    api_url: String,
    credentials: StartCredentials<'a>,
}

#[derive(Serialize)]
struct StartCredentials<'a> {
    email: &'a str,
    api_token: &'a str,
    access_token: &'a str,
    consumer_key: &'a str,
    consumer_secret: &'a str,
}

pub async fn run(args: SimulateArgs) -> anyhow::Result<ExitCode> {
    let handle = Simulator::start(args.config(), args.listen).await?;
    let signal = shutdown_signal()?;
    let creds = handle.credentials();
    let line = serde_json::to_string(&StartLine {
        listen: handle.local_addr().to_string(),
        api_url: handle.base_url(),
        credentials: StartCredentials {
            email: &creds.email,
            api_token: &creds.api_token,
            access_token: &creds.access_token,
            consumer_key: &creds.consumer_key,
            consumer_secret: &creds.consumer_secret,
        },
    })?;
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "{line}")?;
        out.flush()?;
    }
    signal.await;
    tracing::info!("simulator shutting down");
    handle.shutdown().await;
    Ok(ExitCode::SUCCESS)
}

/// Installs the SIGINT/SIGTERM handlers now (before the start line is
/// printed, so a supervisor that signals right after reading it is honoured)
/// and returns a future that resolves on the first signal.
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        Ok(async move {
            tokio::select! {
                _ = term.recv() => {},
                _ = int.recv() => {},
            }
        })
    }
    #[cfg(not(unix))]
    {
        Ok(async {
            let _ = tokio::signal::ctrl_c().await;
        })
    }
}
