//! `bitbucket-operator export`: a c1z from a store file, without touching
//! Bitbucket.
//!
//! Exit codes: 0 written; 1 the store or the file failed; 4 the connector
//! has no complete data in the store (sync every resource type first).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;

use super::{ExportError, InventoryError, export};
use crate::store::Store;

#[derive(Debug, clap::Args)]
pub struct ExportArgs {
    /// Store file written by `sync` or the operator (opened read-only).
    #[arg(long)]
    db: PathBuf,
    /// Connector whose data to export; default: the only one in the file.
    #[arg(long)]
    connector: Option<String>,
    /// Output file (`.c1z`).
    #[arg(long, value_name = "OUT")]
    c1z: PathBuf,
    /// Print what was written as one JSON object.
    #[arg(long)]
    json: bool,
}

pub async fn run(args: ExportArgs) -> anyhow::Result<ExitCode> {
    tokio::task::spawn_blocking(move || run_blocking(args)).await?
}

fn run_blocking(args: ExportArgs) -> anyhow::Result<ExitCode> {
    let store = Store::open_read_only(&args.db).with_context(|| format!("opening {}", args.db.display()))?;
    let connector = match args.connector {
        Some(name) => name,
        None => {
            let names = store.connectors()?;
            match names.as_slice() {
                [one] => one.clone(),
                [] => {
                    eprintln!("error: {} holds no connector data", args.db.display());
                    return Ok(ExitCode::from(4));
                }
                many => {
                    eprintln!(
                        "error: {} holds several connectors ({}); pick one with --connector",
                        args.db.display(),
                        many.join(", ")
                    );
                    return Ok(ExitCode::from(2));
                }
            }
        }
    };
    match export(&store, &connector, &args.c1z) {
        Ok(report) => {
            if args.json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                println!(
                    "wrote {} ({} bytes, sync {}): {} resource types, {} resources, {} entitlements, {} grants",
                    args.c1z.display(),
                    report.file.bytes,
                    report.file.sync_id,
                    report.file.resource_types,
                    report.file.resources,
                    report.file.entitlements,
                    report.file.grants
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(ExportError::Inventory(err @ InventoryError::Incomplete { .. })) => {
            eprintln!("error: {err}");
            Ok(ExitCode::from(4))
        }
        Err(err) => Err(err).with_context(|| format!("writing {}", args.c1z.display())),
    }
}

/// `sync --c1z FILE`: writes the c1z once the sync succeeded, with one line on stderr.
pub async fn write_after_sync(
    store: &std::sync::Arc<Store>,
    connector: &str,
    path: &std::path::Path,
) -> anyhow::Result<()> {
    let (store, connector, out) = (std::sync::Arc::clone(store), connector.to_owned(), path.to_owned());
    let report = tokio::task::spawn_blocking(move || export(&store, &connector, &out))
        .await?
        .with_context(|| format!("writing {}", path.display()))?;
    eprintln!(
        "c1z: wrote {} ({} bytes): {} resources, {} entitlements, {} grants",
        path.display(),
        report.file.bytes,
        report.file.resources,
        report.file.entitlements,
        report.file.grants
    );
    Ok(())
}
