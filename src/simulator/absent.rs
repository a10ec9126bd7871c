//! Stands in for the simulator in a build without the `simulator` feature
//! (`cargo build --no-default-features`, the production image): no server
//! code, only a clear answer when someone asks for `simulate` or
//! `sync --demo`.

/// What `simulate` and `sync --demo` print in this build.
pub const UNAVAILABLE: &str = "this build has no simulator; rebuild with --features simulator";

/// The `simulate` subcommand of a build without the simulator.
pub mod cli {
    use std::process::ExitCode;

    /// Accepts whatever `simulate` would, so the answer is always the
    /// explanation, never a usage error about some flag.
    #[derive(Debug, clap::Args)]
    pub struct SimulateArgs {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, hide = true)]
        args: Vec<String>,
    }

    /// Fails with [`super::UNAVAILABLE`] (exit code 1).
    pub async fn run(_args: SimulateArgs) -> anyhow::Result<ExitCode> {
        anyhow::bail!(super::UNAVAILABLE)
    }
}
