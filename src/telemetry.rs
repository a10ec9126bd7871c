//! Logging setup: `tracing` with an env filter (`RUST_LOG`), as text for people
//! or JSON for log pipelines. Logs go to stderr so that stdout stays free for
//! machine-readable output (`simulate`'s JSON line, `sync --json`, `crd`).

use clap::ValueEnum;
use tracing_subscriber::{EnvFilter, fmt};

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Installs the global subscriber. Safe to call once per process.
pub fn init(format: LogFormat, default_level: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level));
    let builder = fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(true).try_init(),
    };
}
