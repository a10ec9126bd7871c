//! `bitbucket-operator`: the operator (`run`), the one-shot CLI (`sync`,
//! `access`, `grant`, `revoke`), the Bitbucket simulator (`simulate`) and the
//! CRD generator (`crd`). Each subcommand lives in the module that owns it.

use std::process::ExitCode;

use bitbucket_operator::{access, conductorone, controller, crd, provision, simulator, sync, telemetry};
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "bitbucket-operator", version, about)]
struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t, env = "LOG_FORMAT")]
    log_format: telemetry::LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the Kubernetes operator (reconciles BitbucketConnector resources).
    Run(controller::RunArgs),
    /// Sync Bitbucket into a SQLite file once (no cluster needed); `--demo`
    /// syncs the built-in simulator.
    Sync(sync::cli::SyncArgs),
    /// Serve a simulated Bitbucket Cloud API on loopback.
    #[cfg_attr(not(feature = "simulator"), command(hide = true))]
    Simulate(simulator::cli::SimulateArgs),
    /// Effective access from a store file: who can reach a repository, what a user can reach.
    Access(access::cli::AccessArgs),
    /// Print the CustomResourceDefinitions as multi-document YAML (or write
    /// them into crds/ and the chart with --write).
    Crd(crd::cli::CrdArgs),
    /// Grant a user or group access (group membership, project or repository
    /// permission) straight against Bitbucket; needs provisioning enabled.
    Grant(provision::cli::GrantArgs),
    /// Revoke access granted with `grant` (optionally restoring a previous level).
    Revoke(provision::cli::RevokeArgs),
    /// Write a ConductorOne c1z file from a store, without touching Bitbucket.
    Export(conductorone::cli::ExportArgs),
    /// Run as a ConductorOne service-mode connector until stopped.
    Connect(conductorone::connect::ConnectArgs),
    /// Rotate the ConductorOne client credential once (plain host): issue a
    /// new pair, prove it, then revoke the old one; resumable after a crash.
    RotateCredentials(conductorone::rotate_cli::RotateArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // One-shot commands keep stderr for their own progress lines; services
    // log at info.
    let default_level = match cli.command {
        Command::Sync(_)
        | Command::Access(_)
        | Command::Crd(_)
        | Command::Grant(_)
        | Command::Revoke(_)
        | Command::Export(_)
        | Command::RotateCredentials(_) => "warn",
        _ => "info",
    };
    telemetry::init(cli.log_format, default_level);
    let result = match cli.command {
        // Reading a store file and printing CRDs need no runtime: starting
        // one (worker threads, cgroup probes) was a tenth of an `access`
        // answer's time.
        Command::Access(args) => access::cli::run(args),
        Command::Crd(args) => crd::cli::run(args),
        command => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .map_err(anyhow::Error::from)
            .and_then(|runtime| runtime.block_on(run_async(command))),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// The commands that talk to a network or a cluster (`access` and `crd`
/// work here too; `main` runs them without a runtime).
async fn run_async(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Run(args) => controller::run(args).await,
        Command::Sync(args) => sync::cli::run(args).await,
        Command::Simulate(args) => simulator::cli::run(args).await,
        Command::Grant(args) => provision::cli::grant(args).await,
        Command::Revoke(args) => provision::cli::revoke(args).await,
        Command::Export(args) => conductorone::cli::run(args).await,
        Command::Connect(args) => conductorone::connect::run(args).await,
        Command::RotateCredentials(args) => conductorone::rotate_cli::run(args).await,
        Command::Access(args) => access::cli::run(args),
        Command::Crd(args) => crd::cli::run(args),
    }
}
