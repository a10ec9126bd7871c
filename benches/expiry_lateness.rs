//! Expiry lateness under a busy sync: how late grants end when a sync has
//! spent its share of the hourly budget, and when Bitbucket answers 429
//! mid-run.
//!
//! ```text
//! cargo bench --bench expiry_lateness
//! cargo bench --bench expiry_lateness -- --grants 24 --window-secs 20 --retry-after-secs 10
//! cargo bench --bench expiry_lateness -- --json     # one JSON object per scenario
//! ```
//!
//! # What runs
//!
//! Without `--bench` (as `cargo test --all-targets` runs it) only a small
//! `lane` run is made (the `small` organisation, 100 requests per 4 s, 4
//! grants), a smoke test of the benchmark, not a measurement.
//!
//! Everything in this process, against the simulator with 30 ms latency per
//! request: the full sync of the benchmark's `medium` organisation (2
//! workspaces, 1,000 users, 1,000 repositories; about 2,150 requests), every
//! resource type at once as the operator's loops run them, through one
//! client in the sync lane; and `N` grants (default 24) that expire 1.5 s
//! apart from 1 s after the start, each ended by
//! [`Provisioner::revoke_and_restore`] in the provisioning lane at its
//! expiry time, as the grant reconciler does (the reconciler's own
//! scheduling is not measured). Principals are given by UUID, so one expiry
//! costs 4 or 5 requests (workspace, repository, the member, the level, the
//! write).
//!
//! The hour is scaled down so that a run takes a minute: the budget is
//! 1,000 requests per `--window-secs` (default 20 s) with 4 in flight and
//! the default 10 % reserve. The sync alone needs more than two windows, so
//! it spends its share (900) in about 7 s and then waits for the window, the
//! state the issue describes ("revokes wait behind syncs"). The grants are
//! set up before the run through another spelling of the simulator's origin
//! (`localhost` for `127.0.0.1`), which gives them a limiter of their own:
//! the measured budget starts empty.
//!
//! # Scenarios
//!
//! - `lane`: the provisioning lane as built.
//! - `lane+429`: the same, and `--retry-after-secs` (default 10 s) after
//!   the first third of the expiries the simulator answers every request
//!   429 with `Retry-After` for that long.
//! - `no-lane`: the behaviour before the lane, for contrast: no reserve and
//!   the expiries in the sync lane.
//!
//! # Measurements and targets
//!
//! Lateness is the time from an expiry's due time to the end of its
//! `revoke_and_restore` call (p50, p99 and max over the grants), with the
//! sync's requests, its wall time and the 429s seen. Targets:
//!
//! - `lane`: p99 under 5 s while the sync has spent its share;
//! - `lane+429`: p99 under Retry-After + 5 s (the lane honours Retry-After,
//!   see the limiter's module docs);
//! - `no-lane`: none (it shows what the lane fixes).
//!
//! A missed target prints `MISS`; the exit status is non-zero only when
//! something fails to run (an expiry or the sync ending in an error).
//! Figures are in `BENCHMARKS.md`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use bitbucket_operator::bitbucket::{
    Client, ClientConfig, Credentials, Lane, Limits, ProvisioningReserve, set_default_provisioning_reserve,
};
use bitbucket_operator::model::SyncKind;
use bitbucket_operator::provision::{AccessRequest, GrantMode, Permission, PrincipalRef, Provisioner, TargetRef};
use bitbucket_operator::simulator::{SimConfig, Simulator, SimulatorHandle};
use bitbucket_operator::store::Store;
use bitbucket_operator::sync::{SyncEngine, run_into_store};
use serde_json::json;

const LATENCY: Duration = Duration::from_millis(30);
const IN_FLIGHT: usize = 4;
const FIRST_EXPIRY: Duration = Duration::from_secs(1);
const EXPIRY_SPACING: Duration = Duration::from_millis(1500);
const LANE_TARGET: Duration = Duration::from_secs(5);

struct Options {
    /// `cargo test --all-targets` runs this binary without `--bench`: then
    /// only a small `lane` run, as a smoke test that keeps it working.
    smoke: bool,
    /// Requests per window.
    budget: u32,
    grants: usize,
    window: Duration,
    retry_after: Duration,
    json: bool,
}

fn parse_args() -> anyhow::Result<Options> {
    let smoke = !std::env::args().any(|a| a == "--bench");
    let mut options = Options {
        smoke,
        budget: if smoke { 100 } else { 1000 },
        grants: if smoke { 4 } else { 24 },
        window: Duration::from_secs(if smoke { 4 } else { 20 }),
        retry_after: Duration::from_secs(10),
        json: false,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut number = |name: &str| -> anyhow::Result<u64> {
            let value = args.next().with_context(|| format!("{name} needs a value"))?;
            value.parse().with_context(|| format!("{name}: not a number: {value}"))
        };
        match arg.as_str() {
            "--grants" => options.grants = number("--grants")?.clamp(1, 200) as usize,
            "--window-secs" => options.window = Duration::from_secs(number("--window-secs")?.clamp(5, 3600)),
            "--retry-after-secs" => {
                options.retry_after = Duration::from_secs(number("--retry-after-secs")?.clamp(1, 600))
            }
            "--json" => options.json = true,
            // `cargo bench` passes --bench to every benchmark binary.
            "--bench" => {}
            other => bail!("unknown argument {other:?}"),
        }
    }
    Ok(options)
}

#[derive(Clone, Copy, PartialEq)]
enum Scenario {
    Lane,
    LaneWith429,
    NoLane,
}

impl Scenario {
    fn name(self) -> &'static str {
        match self {
            Scenario::Lane => "lane",
            Scenario::LaneWith429 => "lane+429",
            Scenario::NoLane => "no-lane",
        }
    }

    fn target(self, options: &Options) -> Option<Duration> {
        match self {
            Scenario::Lane => Some(LANE_TARGET),
            Scenario::LaneWith429 => Some(options.retry_after + LANE_TARGET),
            Scenario::NoLane => None,
        }
    }
}

struct Outcome {
    scenario: Scenario,
    lateness: Vec<Duration>,
    sync_requests: u64,
    sync_wall: Duration,
    provisioning_requests: u64,
    throttled: u64,
    target: Option<Duration>,
}

impl Outcome {
    fn percentile(&self, p: f64) -> Duration {
        let mut sorted = self.lateness.clone();
        sorted.sort();
        let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
        sorted[rank - 1]
    }

    fn verdict(&self) -> &'static str {
        match self.target {
            None => "-",
            Some(target) if self.percentile(0.99) < target => "PASS",
            Some(_) => "MISS",
        }
    }

    fn json(&self) -> serde_json::Value {
        json!({
            "scenario": self.scenario.name(),
            "grants": self.lateness.len(),
            "lateness_p50_s": self.percentile(0.5).as_secs_f64(),
            "lateness_p99_s": self.percentile(0.99).as_secs_f64(),
            "lateness_max_s": self.percentile(1.0).as_secs_f64(),
            "target_p99_s": self.target.map(|t| t.as_secs_f64()),
            "verdict": self.verdict(),
            "sync_requests": self.sync_requests,
            "sync_wall_s": self.sync_wall.as_secs_f64(),
            "provisioning_requests": self.provisioning_requests,
            "responses_429": self.throttled,
        })
    }
}

fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("expiry lateness benchmark failed: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<()> {
    let options = parse_args()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let mut outcomes = Vec::new();
    let scenarios = if options.smoke {
        vec![Scenario::Lane]
    } else {
        vec![Scenario::Lane, Scenario::LaneWith429, Scenario::NoLane]
    };
    for scenario in scenarios {
        eprintln!("expiry lateness: {} ...", scenario.name());
        let outcome = runtime.block_on(bench(scenario, &options))?;
        if options.json {
            println!("{}", outcome.json());
        }
        outcomes.push(outcome);
    }
    if !options.json {
        println!(
            "budget {} per {} s window (scaled hour), {IN_FLIGHT} in flight, reserve {}, latency {} ms, {} grants",
            options.budget,
            options.window.as_secs(),
            ProvisioningReserve::default(),
            LATENCY.as_millis(),
            options.grants
        );
        println!(
            "{:<9} {:>7} {:>7} {:>7} {:>9} {:>7} {:>9} {:>7} {:>5}",
            "SCENARIO", "P50 s", "P99 s", "MAX s", "TARGET s", "", "SYNC REQ", "SYNC s", "429s"
        );
        for o in &outcomes {
            println!(
                "{:<9} {:>7.2} {:>7.2} {:>7.2} {:>9} {:>7} {:>9} {:>7.1} {:>5}",
                o.scenario.name(),
                o.percentile(0.5).as_secs_f64(),
                o.percentile(0.99).as_secs_f64(),
                o.percentile(1.0).as_secs_f64(),
                o.target
                    .map(|t| format!("< {:.0}", t.as_secs_f64()))
                    .unwrap_or_else(|| "-".into()),
                o.verdict(),
                o.sync_requests,
                o.sync_wall.as_secs_f64(),
                o.throttled,
            );
        }
    }
    Ok(())
}

fn client(base_url: &str, sim: &SimulatorHandle, limits: Limits) -> anyhow::Result<Client> {
    let mut config = ClientConfig::new(base_url)?;
    config.limits = limits;
    // The sync must ride out the injected 429 whatever its length.
    config.max_rate_limit_retries = 50;
    let creds = sim.credentials();
    Ok(Client::new(
        config,
        Credentials::ApiToken {
            username: creds.email.clone(),
            token: creds.api_token.clone(),
        },
    )?)
}

/// One expiring grant: what to end, and the level to restore.
struct Expiring {
    request: AccessRequest,
    previous: Option<Permission>,
    due: Duration,
}

/// Grants `admin` to plain members on distinct repositories of workspace 0
/// and records what each replaced.
async fn set_up_grants(p: &Provisioner, sim: &SimulatorHandle, count: usize) -> anyhow::Result<Vec<Expiring>> {
    let org = sim.organisation();
    let ws = &org.workspaces[0];
    let members: Vec<&str> = ws
        .members
        .iter()
        .filter(|m| !m.owner)
        .map(|m| m.user_uuid.as_str())
        .collect();
    if members.len() < count || ws.repositories.len() < count {
        bail!("the organisation is too small for {count} grants");
    }
    let mut grants = Vec::new();
    for (i, (member, repository)) in members.iter().zip(&ws.repositories).take(count).enumerate() {
        let request = AccessRequest::new(
            ws.slug.clone(),
            PrincipalRef::User((*member).to_owned()),
            TargetRef::Repository(repository.slug.clone()),
            Permission::Admin,
        );
        let outcome = p.grant(&request, GrantMode::Exact).await?;
        grants.push(Expiring {
            request,
            previous: outcome.previous,
            due: FIRST_EXPIRY + EXPIRY_SPACING * i as u32,
        });
    }
    Ok(grants)
}

async fn bench(scenario: Scenario, options: &Options) -> anyhow::Result<Outcome> {
    let reserve = if scenario == Scenario::NoLane {
        ProvisioningReserve::new(0.0).map_err(anyhow::Error::msg)?
    } else {
        ProvisioningReserve::default()
    };
    // Before the clients exist: their limiter starts with it.
    set_default_provisioning_reserve(reserve);
    let sim = Simulator::start(
        SimConfig {
            // `medium` of the sync benchmark; `small` for the smoke test.
            seed: if options.smoke { 42 } else { 7 },
            workspaces: 2,
            users: if options.smoke { 120 } else { 1000 },
            groups: if options.smoke { 12 } else { 40 },
            projects: if options.smoke { 10 } else { 60 },
            repositories: if options.smoke { 80 } else { 1000 },
            latency: LATENCY,
            ..SimConfig::default()
        },
        SocketAddr::from(([127, 0, 0, 1], 0)),
    )
    .await?;
    let setup_url = sim.base_url().replace("127.0.0.1", "localhost");
    let setup = Provisioner::new(client(&setup_url, &sim, Limits::default())?, true);
    let grants = set_up_grants(&setup, &sim, options.grants).await?;
    sim.reset_stats();

    let limits = Limits {
        max_requests: options.budget,
        window: options.window,
        max_in_flight: IN_FLIGHT,
    };
    let sync_client = client(&sim.base_url(), &sim, limits)?;
    let lane = if scenario == Scenario::NoLane {
        Lane::Sync
    } else {
        Lane::Provisioning
    };
    let provisioner = Provisioner::new(sync_client.clone(), true).in_lane(lane);

    let start = Instant::now();
    let sync = {
        let engine = SyncEngine::new(sync_client.clone(), vec![]);
        tokio::spawn(async move {
            let store = Arc::new(Store::open_in_memory()?);
            let scope = engine.connect().await?;
            let runs = SyncKind::ALL
                .into_iter()
                .map(|kind| run_into_store(&engine, &store, "bench", kind, &scope));
            futures::future::try_join_all(runs).await?;
            anyhow::Ok(Instant::now())
        })
    };
    // The 429: every request answered 429 with Retry-After for that long,
    // starting shortly before the first third of the expiries.
    let throttle = async {
        if scenario == Scenario::LaneWith429 {
            let at = grants[grants.len() / 3].due - Duration::from_millis(500);
            tokio::time::sleep_until((start + at).into()).await;
            sim.throttle_for(options.retry_after);
        }
    };
    let provisioner = &provisioner;
    let expiries = grants.iter().map(|grant| async move {
        let due = start + grant.due;
        tokio::time::sleep_until(due.into()).await;
        provisioner
            .revoke_and_restore(&grant.request, grant.previous)
            .await
            .with_context(|| format!("expiring {:?}", grant.request.principal))?;
        anyhow::Ok(Instant::now().saturating_duration_since(due))
    });
    let (lateness, ()) = tokio::join!(futures::future::try_join_all(expiries), throttle);
    let lateness = lateness?;
    let sync_done = sync.await.context("the sync task")??;
    let stats = sim.stats();
    let provisioning_requests = provisioner.client().request_count();
    sim.shutdown().await;
    Ok(Outcome {
        scenario,
        lateness,
        sync_requests: stats.total.saturating_sub(provisioning_requests),
        sync_wall: sync_done - start,
        provisioning_requests,
        throttled: stats.rate_limited,
        target: scenario.target(options),
    })
}
