//! `bitbucket-operator grant` / `revoke`: one grant or revoke straight
//! against Bitbucket, without a cluster (scripts, break-glass). Rules and exit
//! codes: see the [module docs](super).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use clap::ArgGroup;
use serde::Serialize;

use super::{AccessRequest, GrantMode, Permission, PrincipalRef, ProvisionError, Provisioner, TargetRef, parse_level};
use crate::bitbucket::{Client, ClientConfig};
use crate::settings::CredentialArgs;
use crate::store::Store;

/// What to grant or revoke, and how to report it.
#[derive(Debug, Clone, clap::Args)]
#[command(group(ArgGroup::new("principal").required(true).multiple(false)))]
#[command(group(ArgGroup::new("target").required(true).multiple(false)))]
pub struct AccessArgs {
    /// Workspace slug.
    #[arg(long)]
    workspace: String,
    /// The user: UUID `{…}`, Atlassian account id, or nickname (must be a
    /// workspace member).
    #[arg(long, group = "principal")]
    user: Option<String>,
    /// The group, by slug.
    #[arg(long, group = "principal")]
    group: Option<String>,
    /// Target: membership of this group (slug); permission `member`.
    #[arg(long, value_name = "SLUG", group = "target")]
    group_target: Option<String>,
    /// Target: this project (key).
    #[arg(long, value_name = "KEY", group = "target")]
    project: Option<String>,
    /// Target: this repository (slug).
    #[arg(long, value_name = "SLUG", group = "target")]
    repository: Option<String>,
    /// `read`, `write`, `create-repo` (projects), `admin`, or `member`
    /// (groups; the default for --group-target).
    #[arg(long)]
    permission: Option<String>,
    /// Also refresh the changed resource's grants in this store file.
    #[arg(long, value_name = "FILE")]
    db: Option<PathBuf>,
    /// The connector name the data is stored under in --db.
    #[arg(long, default_value = "default")]
    connector: String,
    /// Print the outcome as one JSON object on stdout.
    #[arg(long)]
    json: bool,
    /// Allow this write even when BATON_PROVISIONING is not `true`.
    #[arg(long)]
    allow_provisioning: bool,
    #[command(flatten)]
    credentials: CredentialArgs,
}

#[derive(Debug, clap::Args)]
pub struct GrantArgs {
    #[command(flatten)]
    access: AccessArgs,
    /// Set exactly this level, lowering a higher one (default: ensure at
    /// least this level; a higher level held is left alone).
    #[arg(long)]
    exact: bool,
}

#[derive(Debug, clap::Args)]
pub struct RevokeArgs {
    #[command(flatten)]
    access: AccessArgs,
    /// Put back this level (or `none`) if the current level is still the one
    /// revoked; a level changed by someone else is left alone.
    #[arg(long, value_name = "LEVEL")]
    restore: Option<String>,
}

pub async fn grant(args: GrantArgs) -> anyhow::Result<ExitCode> {
    let mode = if args.exact {
        GrantMode::Exact
    } else {
        GrantMode::AtLeast
    };
    let json = args.access.json;
    let (provisioner, request) = match prepare(&args.access).await? {
        Ok(ready) => ready,
        Err(code) => return Ok(code),
    };
    match provisioner.grant(&request, mode).await {
        Ok(outcome) => {
            report_store(&outcome.store);
            print_ok(json, &outcome, outcome.message())?;
            Ok(ExitCode::SUCCESS)
        }
        Err(err) => fail(json, &err),
    }
}

pub async fn revoke(args: RevokeArgs) -> anyhow::Result<ExitCode> {
    let json = args.access.json;
    let restore = match args.restore.as_deref().map(parse_level).transpose() {
        Ok(restore) => restore,
        Err(message) => return usage(json, &format!("--restore: {message}")),
    };
    let (provisioner, request) = match prepare(&args.access).await? {
        Ok(ready) => ready,
        Err(code) => return Ok(code),
    };
    let result = match restore {
        Some(previous) => provisioner.revoke_and_restore(&request, previous).await,
        None => provisioner.revoke(&request).await,
    };
    match result {
        Ok(outcome) => {
            report_store(&outcome.store);
            print_ok(json, &outcome, outcome.message())?;
            Ok(ExitCode::SUCCESS)
        }
        Err(err) => fail(json, &err),
    }
}

/// Builds the request and the provisioner, or the exit code of a usage or
/// credentials problem (already reported).
async fn prepare(args: &AccessArgs) -> anyhow::Result<Result<(Provisioner, AccessRequest), ExitCode>> {
    let request = match request(args) {
        Ok(request) => request,
        Err(message) => return Ok(Err(usage(args.json, &message)?)),
    };
    let settings = match args.credentials.settings() {
        Ok(settings) => settings,
        Err(message) => {
            return Ok(Err(report_error(
                args.json,
                "InvalidCredentials",
                &format!("credentials: {message}"),
                3,
            )?));
        }
    };
    let client = Client::new(
        ClientConfig::new(&args.credentials.api_url)?,
        settings.credentials.clone(),
    )?;
    let mut provisioner = Provisioner::new(client, settings.provisioning || args.allow_provisioning);
    if let Some(db) = &args.db {
        let store = tokio::task::spawn_blocking({
            let db = db.clone();
            move || Store::open(&db)
        })
        .await?
        .with_context(|| format!("opening {}", db.display()))?;
        provisioner = provisioner.with_store(Arc::new(store), args.connector.clone());
    }
    Ok(Ok((provisioner, request)))
}

fn request(args: &AccessArgs) -> Result<AccessRequest, String> {
    let principal = match (&args.user, &args.group) {
        (Some(user), None) => PrincipalRef::User(user.clone()),
        (None, Some(group)) => PrincipalRef::Group(group.clone()),
        _ => return Err("give exactly one of --user or --group".into()),
    };
    let target = match (&args.group_target, &args.project, &args.repository) {
        (Some(g), None, None) => TargetRef::Group(g.clone()),
        (None, Some(p), None) => TargetRef::Project(p.clone()),
        (None, None, Some(r)) => TargetRef::Repository(r.clone()),
        _ => return Err("give exactly one of --group-target, --project or --repository".into()),
    };
    let permission = match (args.permission.as_deref(), &target) {
        (None, TargetRef::Group(_)) => Permission::Member,
        (None, _) => return Err("--permission is required for a project or repository".into()),
        (Some(text), _) => parse_level(text)?.ok_or_else(|| "--permission cannot be none".to_owned())?,
    };
    let request = AccessRequest::new(args.workspace.clone(), principal, target, permission);
    request.validate().map_err(|e| e.to_string())?;
    Ok(request)
}

fn report_store(store: &Option<super::StoreRefresh>) {
    match store {
        Some(super::StoreRefresh::Refreshed { connector, grants }) => {
            eprintln!("store: refreshed the resource's grants ({grants}) for connector {connector:?}");
        }
        Some(super::StoreRefresh::Skipped { connector, reason }) => {
            eprintln!("store: not refreshed for connector {connector:?}: {reason}");
        }
        None => {}
    }
}

fn print_ok<T: Serialize>(json: bool, outcome: &T, line: String) -> anyhow::Result<()> {
    if json {
        let mut value = serde_json::to_value(outcome)?;
        value["ok"] = serde_json::Value::Bool(true);
        value["message"] = serde_json::Value::String(line);
        println!("{}", serde_json::to_string(&value)?);
    } else {
        println!("{line}");
    }
    Ok(())
}

fn fail(json: bool, err: &ProvisionError) -> anyhow::Result<ExitCode> {
    report_error(json, err.reason(), &err.to_string(), err.exit_code())
}

fn usage(json: bool, message: &str) -> anyhow::Result<ExitCode> {
    report_error(json, "InvalidRequest", message, 2)
}

fn report_error(json: bool, reason: &str, message: &str, code: u8) -> anyhow::Result<ExitCode> {
    eprintln!("error: {message}");
    if json {
        let value = serde_json::json!({ "ok": false, "reason": reason, "error": message });
        println!("{}", serde_json::to_string(&value)?);
    }
    Ok(ExitCode::from(code))
}
