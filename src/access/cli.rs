//! `bitbucket-operator access`: effective-access queries on a store file.
//!
//! ```text
//! bitbucket-operator access --db FILE [--connector default] [--json] who-can WORKSPACE/REPO
//! bitbucket-operator access --db FILE [--connector default] [--json] access-of USER
//! bitbucket-operator access --db FILE [--connector default] [--json] changes [--type repositories]
//! ```
//!
//! Reads only: the file is opened read-only and never created, so it is safe
//! to run next to an operator that is syncing into the same file.

use std::path::PathBuf;
use std::process::ExitCode;

use serde_json::json;

use super::{AccessEntry, AccessPath, ResourceAccess, UserAccess};
use crate::model::SyncKind;
use crate::store::{GrantDiff, Store};

#[derive(Debug, clap::Args)]
pub struct AccessArgs {
    /// The store file to read (never created by this command).
    #[arg(long, value_name = "FILE")]
    pub db: PathBuf,
    /// Connector whose data to read: `default` for `sync`, `namespace/name` for the operator.
    #[arg(long, default_value = "default", global = true)]
    pub connector: String,
    /// Print one JSON document instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub query: AccessQuery,
}

#[derive(Debug, clap::Subcommand)]
pub enum AccessQuery {
    /// Users who can access a repository: effective permission and every path.
    WhoCan {
        /// `workspace/slug`, or a repository resource id.
        repository: String,
    },
    /// Workspaces, groups, projects and repositories a user can access.
    AccessOf {
        /// User uuid, account id or nickname.
        user: String,
    },
    /// Grants added and removed between the last two synced generations of
    /// each resource type (or of `--type` only).
    Changes {
        /// accounts, workspaces, groups, projects or repositories.
        #[arg(long = "type", value_parser = parse_kind)]
        kind: Option<SyncKind>,
    },
}

fn parse_kind(value: &str) -> Result<SyncKind, String> {
    SyncKind::parse(value).ok_or_else(|| {
        format!("unknown type {value:?}; expected accounts, workspaces, groups, projects or repositories")
    })
}

pub fn run(args: AccessArgs) -> anyhow::Result<ExitCode> {
    let store = Store::open_read_only(&args.db)?;
    let out = match &args.query {
        AccessQuery::WhoCan { repository } => {
            let repo = super::find_repository(&store, &args.connector, repository)?;
            let entries = super::who_can(&store, &args.connector, &repo.id)?;
            let profile = repo.profile.repository();
            if args.json {
                serde_json::to_string_pretty(&json!({
                    "connector": args.connector,
                    "repository": {
                        "id": repo.id,
                        "full_name": profile.map(|p| &p.full_name),
                        "name": repo.display_name,
                        "project_key": profile.map(|p| &p.project_key),
                        "workspace": profile.map(|p| &p.workspace_slug),
                    },
                    "access": entries,
                }))?
            } else {
                let name = profile.map_or(repo.id.as_str(), |p| p.full_name.as_str());
                format!(
                    "Repository {name} ({}), connector {}\n\n{}",
                    repo.id,
                    args.connector,
                    who_can_table(&entries)
                )
            }
        }
        AccessQuery::AccessOf { user } => {
            let access = super::access_of(&store, &args.connector, user)?;
            if args.json {
                let mut doc = serde_json::to_value(&access)?;
                doc["connector"] = json!(args.connector);
                serde_json::to_string_pretty(&doc)?
            } else {
                access_of_text(&access, &args.connector)
            }
        }
        AccessQuery::Changes { kind } => {
            let kinds = match kind {
                Some(kind) => vec![*kind],
                None => SyncKind::ALL.to_vec(),
            };
            let mut changes = Vec::new();
            for kind in kinds {
                // Newest first: compare the current generation with the one before.
                let generations = store.generations(&args.connector, kind)?;
                if let [to, from, ..] = generations.as_slice() {
                    changes.push((
                        kind,
                        store.diff_grants(&args.connector, kind, from.generation, to.generation)?,
                    ));
                }
            }
            if args.json {
                let doc: Vec<_> = changes
                    .iter()
                    .map(|(kind, diff)| json!({"type": kind, "from": diff.from, "to": diff.to, "added": diff.added, "removed": diff.removed}))
                    .collect();
                serde_json::to_string_pretty(&json!({"connector": args.connector, "changes": doc}))?
            } else {
                changes_text(&changes, &args.connector)
            }
        }
    };
    println!("{}", out.trim_end());
    Ok(ExitCode::SUCCESS)
}

fn changes_text(changes: &[(SyncKind, GrantDiff)], connector: &str) -> String {
    if changes.is_empty() {
        return format!("Connector {connector}: fewer than two synced generations of any type; nothing to compare.\n");
    }
    let mut out = format!("Grant changes between the last two syncs, connector {connector}\n");
    for (kind, diff) in changes {
        out.push_str(&format!(
            "\n{kind} (generation {} -> {}): {} added, {} removed\n",
            diff.from,
            diff.to,
            diff.added.len(),
            diff.removed.len()
        ));
        let rows: Vec<Vec<String>> = diff
            .added
            .iter()
            .map(|g| ("+", g))
            .chain(diff.removed.iter().map(|g| ("-", g)))
            .map(|(sign, g)| {
                vec![
                    sign.to_owned(),
                    g.entitlement_id.clone(),
                    format!("{}:{}", g.principal_type, g.principal_id),
                ]
            })
            .collect();
        if !rows.is_empty() {
            out.push_str(&table(&["", "ENTITLEMENT", "PRINCIPAL"], &rows));
        }
    }
    out
}

fn via_text(via: &[AccessPath]) -> String {
    via.iter()
        .map(|p| format!("{} ({})", p.via, p.permission))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Left-aligned columns separated by two spaces, no trailing blanks.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let header: Vec<String> = headers.iter().map(|h| h.to_string()).collect();
    for row in std::iter::once(&header).chain(rows) {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i > 0 {
                line.push_str("  ");
            }
            line.push_str(cell);
            if i + 1 < row.len() {
                line.extend(std::iter::repeat_n(' ', widths[i] - cell.chars().count()));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

fn who_can_table(entries: &[AccessEntry]) -> String {
    if entries.is_empty() {
        return "No user has access.\n".into();
    }
    let rows: Vec<Vec<String>> = entries
        .iter()
        .map(|e| {
            vec![
                e.permission.to_string(),
                e.nickname.clone().unwrap_or_else(|| "?".into()),
                match (&e.display_name, e.unknown_principal) {
                    (Some(d), false) => d.clone(),
                    (Some(d), true) => format!("{d} (unknown principal)"),
                    (None, _) => "(unknown principal)".into(),
                },
                e.user_id.clone(),
                via_text(&e.via),
            ]
        })
        .collect();
    table(&["PERMISSION", "USER", "DISPLAY NAME", "ID", "VIA"], &rows)
}

fn resource_rows(items: &[ResourceAccess]) -> Vec<Vec<String>> {
    items
        .iter()
        .map(|r| vec![r.name.clone(), r.permission.to_string(), via_text(&r.via)])
        .collect()
}

fn access_of_text(a: &UserAccess, connector: &str) -> String {
    let u = &a.user;
    let mut facts = vec![u.id.clone()];
    if let Some(d) = &u.display_name {
        facts.insert(0, d.clone());
    }
    if let Some(acc) = &u.account_id {
        facts.push(format!("account id {acc}"));
    }
    if let Some(s) = &u.status {
        facts.push(s.clone());
    }
    if u.unknown_principal {
        facts.push("unknown principal".into());
    }
    let mut out = format!(
        "User {} ({}), connector {connector}\n",
        u.nickname.as_deref().unwrap_or(&u.id),
        facts.join(", ")
    );
    let section = |out: &mut String, title: &str, headers: &[&str], rows: Vec<Vec<String>>| {
        out.push_str(&format!("\n{title}\n"));
        if rows.is_empty() {
            out.push_str("(none)\n");
        } else {
            out.push_str(&table(headers, &rows));
        }
    };
    section(
        &mut out,
        "Workspaces",
        &["WORKSPACE", "NAME", "ROLES"],
        a.workspaces
            .iter()
            .map(|w| vec![w.slug.clone(), w.name.clone(), w.roles.join(", ")])
            .collect(),
    );
    section(
        &mut out,
        "Groups",
        &["WORKSPACE", "GROUP", "NAME"],
        a.groups
            .iter()
            .map(|g| vec![g.workspace.clone(), g.slug.clone(), g.name.clone()])
            .collect(),
    );
    section(
        &mut out,
        "Projects",
        &["PROJECT", "PERMISSION", "VIA"],
        resource_rows(&a.projects),
    );
    section(
        &mut out,
        "Repositories",
        &["REPOSITORY", "PERMISSION", "VIA"],
        resource_rows(&a.repositories),
    );
    out
}
