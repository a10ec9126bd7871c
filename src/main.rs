//! `bitbucket-operator`: the operator (`run`), the one-shot CLI (`sync`,
//! `access`, `grant`, `revoke`), the Bitbucket simulator (`simulate`) and the
//! CRD generator (`crd`). Each subcommand lives in the module that owns it.

use std::process::ExitCode;

use bitbucket_operator::{crd, simulator, telemetry};
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
    /// Serve a simulated Bitbucket Cloud API on loopback.
    Simulate(simulator::cli::SimulateArgs),
    /// Print the CustomResourceDefinitions as multi-document YAML (or write
    /// them into crds/ and the chart with --write).
    Crd(crd::cli::CrdArgs),
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    telemetry::init(cli.log_format, "info");
    let result = match cli.command {
        Command::Simulate(args) => simulator::cli::run(args).await,
        Command::Crd(args) => crd::cli::run(args),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
