//! `bitbucket-operator access`: effective-access queries on a store file.
//!
//! ```text
//! bitbucket-operator access [--db FILE] [--connector default] [--json] who-can WORKSPACE/REPO
//! bitbucket-operator access [--db FILE] [--connector default] [--json] access-of USER
//! bitbucket-operator access [--db FILE] [--connector default] [--json] changes [--type repositories]
//! bitbucket-operator access [--db FILE] [--json|--csv] resources [--type repository]
//! bitbucket-operator access [--db FILE] [--json|--csv] grants
//! bitbucket-operator access [--db FILE] [--json] runs [--limit 20]
//! bitbucket-operator access [--db FILE] [--connector NS/NAME] [--json|--csv] audit [--since 24h|RFC3339]
//! ```
//!
//! Reads only: the file is opened read-only and never created, so it is safe
//! to run next to an operator that is syncing into the same file.
//!
//! Honest about its data: every answer says per resource type when its data
//! was read ("data as of"), per workspace when scoped runs left workspaces
//! of different ages; a type the answer needs that was never synced (or
//! never for some workspace), or whose data is stale ([`max_age_for`]),
//! gets a warning on stderr (and in `--json`), and a never-synced type
//! makes the exit code 8.
//!
//! Exit codes: 0 answered from complete data; 1 an error (unknown
//! repository or user, store error); 2 usage error; 7 the store file is
//! damaged, not a store, or too new; 8 answered, but a type it needs was
//! never synced, so the answer may be missing people or access.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use serde_json::json;

use super::{AccessEntry, AccessPath, NameIndex, ResourceAccess, ReviewRow, UserAccess};
use crate::model::{ResourceType, SyncKind};
use crate::store::{Freshness, GrantDiff, Store, StoreError, SyncRun, format_timestamp};
use crate::sync::cli::{DEFAULT_DB, EXIT_BAD_STORE, parse_duration};
use crate::sync::progress_view::human;

/// Exit code of an answer from incomplete data (a needed type never synced).
pub const EXIT_INCOMPLETE: u8 = 8;

#[derive(Debug, clap::Args)]
pub struct AccessArgs {
    /// The store file to read (never created by this command); `sync`'s default.
    #[arg(long, value_name = "FILE", default_value = DEFAULT_DB, global = true)]
    pub db: PathBuf,
    /// Connector whose data to read: `default` for `sync`, `namespace/name` for the operator.
    #[arg(long, default_value = "default", global = true, value_parser = non_empty_connector)]
    pub connector: String,
    /// Print one JSON document instead of a table.
    #[arg(long, global = true, conflicts_with = "csv")]
    pub json: bool,
    /// Print CSV (`resources`, `grants`).
    #[arg(long, global = true)]
    pub csv: bool,
    /// Data older than this gets a warning: `1h`, `24h`. Default: per type,
    /// the interval its data was synced at (an operator's per-type interval)
    /// plus twice the time its run took, else 24h (`sync` runs).
    #[arg(long, value_parser = parse_duration, global = true)]
    pub max_age: Option<Duration>,
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
        /// User uuid, account id, nickname or email.
        user: String,
    },
    /// Grants added and removed between the last two synced generations of
    /// each resource type (or of `--type` only), with names.
    Changes {
        /// accounts, workspaces, groups, projects or repositories.
        #[arg(long = "type", value_parser = parse_kind)]
        kind: Option<SyncKind>,
    },
    /// Synced resources, of one type or all.
    Resources {
        /// user, workspace, user_group, project or repository.
        #[arg(long = "type", value_parser = parse_type)]
        resource_type: Option<ResourceType>,
    },
    /// Every grant with resource and principal names (`--csv` for access reviews).
    Grants,
    /// The last sync runs, newest first, with their errors.
    Runs {
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
    /// The audit log of just-in-time access (grants, revokes, restores,
    /// expiries, denials, recoveries), oldest first; every connector's
    /// unless `--connector NS/NAME` is given.
    Audit {
        /// Only entries since then: a duration back from now (`24h`, `90m`)
        /// or an RFC 3339 time (`2026-12-01T00:00:00Z`).
        #[arg(long, value_parser = parse_since)]
        since: Option<i64>,
    },
}

/// `--since`: a duration back from now, or an RFC 3339 time; Unix milliseconds.
fn parse_since(value: &str) -> Result<i64, String> {
    if let Ok(at) = value.trim().parse::<jiff::Timestamp>() {
        return Ok(at.as_millisecond());
    }
    let back = parse_duration(value)
        .map_err(|_| format!("expected a duration such as 24h or an RFC 3339 time, got {value:?}"))?;
    let back = i64::try_from(back.as_millis()).map_err(|_| format!("{value:?} is too far back"))?;
    Ok(jiff::Timestamp::now().as_millisecond().saturating_sub(back))
}

fn non_empty_connector(value: &str) -> Result<String, String> {
    if value.trim().is_empty() {
        Err("--connector must not be empty".into())
    } else {
        Ok(value.to_owned())
    }
}

fn parse_kind(value: &str) -> Result<SyncKind, String> {
    SyncKind::parse(value).ok_or_else(|| {
        format!("unknown type {value:?}; expected accounts, workspaces, groups, projects or repositories")
    })
}

fn parse_type(value: &str) -> Result<ResourceType, String> {
    ResourceType::parse(value)
        .or_else(|| SyncKind::parse(value).map(SyncKind::resource_type))
        .ok_or_else(|| format!("unknown type {value:?}; expected user, workspace, user_group, project or repository"))
}

/// Writes to stdout; a closed pipe (`| head -1`) is not an error: the reader
/// has what it wanted, so the command ends quietly.
pub fn print_stdout(text: &str) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => other,
    }
}

/// Writes `value` as pretty JSON and a newline to stdout while it is
/// serialized, through a buffer of a pipe's size: a reader starts on the
/// first 64 KiB instead of waiting for the whole document, and no copy of
/// it is ever held. A closed pipe ends quietly, as in [`print_stdout`].
fn print_json_stdout(value: &impl serde::Serialize) -> std::io::Result<()> {
    let mut out = std::io::BufWriter::with_capacity(64 * 1024, std::io::stdout().lock());
    let written = serde_json::to_writer_pretty(&mut out, value)
        .map_err(std::io::Error::from)
        .and_then(|()| out.write_all(b"\n"))
        .and_then(|()| out.flush());
    match written {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => other,
    }
}

/// The types an answer depends on.
fn needed_kinds(query: &AccessQuery) -> Vec<SyncKind> {
    match query {
        AccessQuery::WhoCan { .. } | AccessQuery::AccessOf { .. } | AccessQuery::Grants => SyncKind::ALL.to_vec(),
        AccessQuery::Changes { kind } => kind.map_or_else(|| SyncKind::ALL.to_vec(), |k| vec![k]),
        AccessQuery::Resources { resource_type } => resource_type.map_or_else(
            || SyncKind::ALL.to_vec(),
            |t| SyncKind::ALL.into_iter().filter(|k| k.resource_type() == t).collect(),
        ),
        AccessQuery::Runs { .. } | AccessQuery::Audit { .. } => Vec::new(),
    }
}

/// The age past which `sync` data (no recorded interval) gets a warning.
pub const DEFAULT_MAX_AGE: Duration = Duration::from_secs(24 * 3600);

/// How old one type's data may be before it is stale: `--max-age` when
/// given; else the interval it was synced at, plus a tenth of it for
/// timers, plus twice the time its run took (the next run starts one
/// interval after the last one ended, and its data lands when it
/// finishes); else [`DEFAULT_MAX_AGE`].
pub fn max_age_for(f: &Freshness, flag: Option<Duration>) -> Duration {
    if let Some(max_age) = flag {
        return max_age;
    }
    match (f.interval_ms, f.committed_at, f.data_as_of) {
        (Some(interval), committed, from) => {
            let run = match (committed, from) {
                (Some(committed), Some(from)) => Duration::from_millis(u64::try_from(committed - from).unwrap_or(0)),
                _ => Duration::ZERO,
            };
            let interval = Duration::from_millis(interval);
            interval + interval / 10 + run * 2
        }
        _ => DEFAULT_MAX_AGE,
    }
}

/// What an answer's data is worth: per needed type, when it was read, and
/// the warnings that go with it.
struct DataReport {
    types: Vec<Freshness>,
    warnings: Vec<String>,
    incomplete: bool,
    max_age: Option<Duration>,
}

fn age_of(now: i64, at: i64) -> Duration {
    Duration::from_millis(u64::try_from(now - at).unwrap_or(0))
}

/// `acme 2026-12-01T10:00:00.000Z, globex never synced`.
fn workspaces_text(f: &Freshness) -> String {
    f.workspaces
        .iter()
        .map(|w| {
            format!(
                "{} {}",
                w.slug.as_deref().unwrap_or(&w.workspace_id),
                w.data_as_of.map_or_else(|| "never synced".to_owned(), format_timestamp)
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

impl DataReport {
    // One warning per way data can fall short (never synced, per workspace,
    // stale, last run failed), in the order a reader should see them.
    fn new(store: &Store, connector: &str, needed: &[SyncKind], max_age: Option<Duration>) -> Result<Self, StoreError> {
        let now = jiff::Timestamp::now().as_millisecond();
        let types: Vec<Freshness> = store
            .freshness(connector)?
            .into_iter()
            .filter(|f| needed.contains(&f.kind))
            .collect();
        let mut warnings = Vec::new();
        let mut incomplete = false;
        for f in &types {
            let Some(at) = f.data_as_of else {
                incomplete = true;
                let why = match &f.last_run {
                    Some(run) => format!(
                        "its last run {} ({})",
                        run.status,
                        run.error.as_deref().unwrap_or("no error recorded")
                    ),
                    None => "no run yet".to_owned(),
                };
                warnings.push(format!(
                    "{} were never synced for connector {connector:?} ({why}): the answer may be missing access",
                    f.kind
                ));
                continue;
            };
            let missing: Vec<&str> = f
                .workspaces
                .iter()
                .filter(|w| w.data_as_of.is_none())
                .map(|w| w.slug.as_deref().unwrap_or(&w.workspace_id))
                .collect();
            if !missing.is_empty() {
                incomplete = true;
                warnings.push(format!(
                    "{} were never synced for workspace(s) {}: the answer may be missing access there",
                    f.kind,
                    missing.join(", ")
                ));
            }
            let allowed = max_age_for(f, max_age);
            let age = age_of(now, at);
            if age > allowed {
                let rule = match (max_age, f.interval_ms) {
                    (Some(_), _) => format!("--max-age {}", human(allowed)),
                    (None, Some(interval)) => format!(
                        "its sync interval {} allows {}",
                        human(Duration::from_millis(interval)),
                        human(allowed)
                    ),
                    (None, None) => format!("the default --max-age {}", human(allowed)),
                };
                let per_workspace = if f.workspaces.is_empty() {
                    String::new()
                } else {
                    format!("; per workspace: {}", workspaces_text(f))
                };
                warnings.push(format!(
                    "{} data is {} old (as of {}), older than {rule}{per_workspace}",
                    f.kind,
                    human(age),
                    format_timestamp(at),
                ));
            }
            if let Some(run) = f
                .last_run
                .as_ref()
                .filter(|r| r.status.as_str() != "ok" && r.status.as_str() != "running")
            {
                warnings.push(format!(
                    "the last {} run {}: {}; showing the data as of {}",
                    f.kind,
                    run.status,
                    run.error.as_deref().unwrap_or("no error recorded"),
                    format_timestamp(at)
                ));
            }
        }
        Ok(DataReport {
            types,
            warnings,
            incomplete,
            max_age,
        })
    }

    fn text(&self) -> String {
        if self.types.is_empty() {
            return String::new();
        }
        let parts: Vec<String> = self
            .types
            .iter()
            .map(|f| match (f.data_as_of, f.workspaces.is_empty()) {
                (None, _) => format!("{} never synced", f.kind),
                (Some(at), true) => format!("{} {}", f.kind, format_timestamp(at)),
                (Some(_), false) => format!("{} ({})", f.kind, workspaces_text(f)),
            })
            .collect();
        format!("Data as of: {}\n", parts.join(", "))
    }

    fn json(&self) -> serde_json::Value {
        let now = jiff::Timestamp::now().as_millisecond();
        let types: Vec<_> = self
            .types
            .iter()
            .map(|f| {
                let allowed = max_age_for(f, self.max_age);
                let workspaces: Vec<_> = f
                    .workspaces
                    .iter()
                    .map(|w| {
                        json!({
                            "id": w.workspace_id,
                            "slug": w.slug,
                            "data_as_of": w.data_as_of.map(format_timestamp),
                            "never_synced": w.data_as_of.is_none(),
                        })
                    })
                    .collect();
                json!({
                    "type": f.kind,
                    "data_as_of": f.data_as_of.map(format_timestamp),
                    "never_synced": f.data_as_of.is_none(),
                    "stale": f.data_as_of.is_some_and(|at| age_of(now, at) > allowed),
                    "max_age_seconds": allowed.as_secs(),
                    "interval_seconds": f.interval_ms.map(|ms| ms / 1000),
                    "workspaces": workspaces,
                    "last_run_status": f.last_run.as_ref().map(|r| r.status),
                    "last_error": f.last_run.as_ref().and_then(|r| r.error.clone()),
                })
            })
            .collect();
        json!({ "complete": !self.incomplete, "types": types, "warnings": self.warnings })
    }
}

pub fn run(args: AccessArgs) -> anyhow::Result<ExitCode> {
    let store = match Store::open_read_only(&args.db) {
        Ok(store) => store,
        Err(err) => {
            let code = match err {
                StoreError::Damaged { .. } | StoreError::NotAStore { .. } | StoreError::TooNew { .. } => EXIT_BAD_STORE,
                _ => 1,
            };
            eprintln!("error: {err}");
            return Ok(ExitCode::from(code));
        }
    };
    let report = DataReport::new(&store, &args.connector, &needed_kinds(&args.query), args.max_age)?;
    for warning in &report.warnings {
        eprintln!("warning: {warning}");
    }
    match answer(&store, &args, &report)? {
        Answer::Text(mut out) => {
            out.truncate(out.trim_end().len());
            out.push('\n');
            print_stdout(&out)?;
        }
        Answer::AccessOfJson(access) => print_json_stdout(&DirectAnswer {
            connector: &args.connector,
            answer: &access,
            data: report.json(),
        })?,
    }
    Ok(if report.incomplete {
        ExitCode::from(EXIT_INCOMPLETE)
    } else {
        ExitCode::SUCCESS
    })
}

/// Adds the data report to a JSON answer.
fn with_data(mut doc: serde_json::Value, report: &DataReport) -> serde_json::Value {
    doc["data"] = report.json();
    doc
}

/// What a query prints.
enum Answer {
    /// A table, CSV, or a JSON document of modest size.
    Text(String),
    /// `access-of --json`, streamed to stdout as it is serialized (see
    /// [`print_json_stdout`]): a workspace owner's answer runs to megabytes.
    AccessOfJson(UserAccess),
}

/// A JSON answer serialized straight from its typed value: a workspace
/// owner's `access-of` lists thousands of repositories, and building a
/// `serde_json::Value` of it first doubled the time to answer.
#[derive(serde::Serialize)]
struct DirectAnswer<'a, T: serde::Serialize> {
    connector: &'a str,
    #[serde(flatten)]
    answer: &'a T,
    data: serde_json::Value,
}

// One arm per subcommand, each a few lines of query and formatting.
fn answer(store: &Store, args: &AccessArgs, report: &DataReport) -> anyhow::Result<Answer> {
    let connector = args.connector.as_str();
    let text = match &args.query {
        AccessQuery::WhoCan { repository } => {
            let repo = super::find_repository(store, connector, repository)?;
            let entries = super::who_can(store, connector, &repo.id)?;
            let profile = repo.profile.repository();
            if args.json {
                serde_json::to_string_pretty(&with_data(
                    json!({
                        "connector": connector,
                        "repository": {
                            "id": repo.id,
                            "full_name": profile.map(|p| &p.full_name),
                            "name": repo.display_name,
                            "project_key": profile.map(|p| &p.project_key),
                            "workspace": profile.map(|p| &p.workspace_slug),
                        },
                        "access": entries,
                    }),
                    report,
                ))?
            } else {
                let name = profile.map_or(repo.id.as_str(), |p| p.full_name.as_str());
                format!(
                    "Repository {name} ({}), connector {connector}\n{}\n{}",
                    repo.id,
                    report.text(),
                    who_can_table(&entries)
                )
            }
        }
        AccessQuery::AccessOf { user } => {
            let access = super::access_of(store, connector, user)?;
            if args.json {
                return Ok(Answer::AccessOfJson(access));
            }
            access_of_text(&access, connector, &report.text())
        }
        AccessQuery::Changes { kind } => {
            let kinds = kind.map_or_else(|| SyncKind::ALL.to_vec(), |k| vec![k]);
            let mut changes = Vec::new();
            let mut names = NameIndex::current(store, connector)?;
            for kind in kinds {
                // Newest first: compare the current generation with the one before.
                let generations = store.generations(connector, kind)?;
                if let [to, from, ..] = generations.as_slice() {
                    names.add(store.generation_batch(connector, kind, from.generation)?.resources);
                    changes.push((
                        kind,
                        store.diff_grants(connector, kind, from.generation, to.generation)?,
                    ));
                }
            }
            if args.json {
                let named = |g: &crate::model::Grant| {
                    let mut v = serde_json::to_value(g).unwrap_or_default();
                    v["resource_name"] = json!(names.name(entitlement_resource(&g.entitlement_id)));
                    v["principal_name"] = json!(names.name(&g.principal_id));
                    v
                };
                let doc: Vec<_> = changes
                    .iter()
                    .map(|(kind, diff)| {
                        json!({
                            "type": kind, "from": diff.from, "to": diff.to,
                            "added": diff.added.iter().map(named).collect::<Vec<_>>(),
                            "removed": diff.removed.iter().map(named).collect::<Vec<_>>(),
                        })
                    })
                    .collect();
                serde_json::to_string_pretty(&with_data(json!({"connector": connector, "changes": doc}), report))?
            } else {
                format!("{}{}", report.text(), changes_text(&changes, connector, &names))
            }
        }
        AccessQuery::Resources { resource_type } => {
            let resources = store.resources(connector, *resource_type)?;
            let rows: Vec<Vec<String>> = resources
                .iter()
                .map(|r| {
                    vec![
                        r.resource_type.to_string(),
                        r.profile.slug().unwrap_or_default().to_owned(),
                        r.display_name.clone(),
                        r.id.clone(),
                        r.parent_id.clone().unwrap_or_default(),
                    ]
                })
                .collect();
            if args.json {
                serde_json::to_string_pretty(&with_data(json!({"connector": connector, "items": resources}), report))?
            } else if args.csv {
                csv(&["resource_type", "slug", "display_name", "id", "parent_id"], &rows)
            } else {
                format!(
                    "{}{}",
                    report.text(),
                    table(&["TYPE", "SLUG", "NAME", "ID", "PARENT"], &rows)
                )
            }
        }
        AccessQuery::Grants => {
            let rows = super::review_rows(store, connector)?;
            if args.json {
                serde_json::to_string_pretty(&with_data(json!({"connector": connector, "items": rows}), report))?
            } else if args.csv {
                csv(&super::REVIEW_COLUMNS, &review_cells(&rows))
            } else {
                let cells: Vec<Vec<String>> = review_cells(&rows).into_iter().map(|r| r[..7].to_vec()).collect();
                format!(
                    "{}{}",
                    report.text(),
                    table(
                        &[
                            "TYPE",
                            "RESOURCE ID",
                            "RESOURCE",
                            "ENTITLEMENT",
                            "PRINCIPAL TYPE",
                            "PRINCIPAL ID",
                            "PRINCIPAL"
                        ],
                        &cells
                    )
                )
            }
        }
        AccessQuery::Audit { since } => audit_answer(store, args, *since)?,
        AccessQuery::Runs { limit } => {
            let runs = store.runs(connector, *limit)?;
            if args.json {
                serde_json::to_string_pretty(&json!({"connector": connector, "runs": runs}))?
            } else {
                runs_table(&runs)
            }
        }
    };
    Ok(Answer::Text(text))
}

const AUDIT_HEADER: &[&str] = &[
    "time",
    "action",
    "outcome",
    "requester",
    "grant_namespace",
    "grant_name",
    "grant_uid",
    "connector",
    "workspace",
    "target",
    "principal",
    "level_before",
    "level_after",
    "message",
];

/// `access audit`: the log of one connector (`--connector`), or of all
/// when it is left at `default` (the CLI's own connector never grants).
fn audit_answer(store: &Store, args: &AccessArgs, since: Option<i64>) -> anyhow::Result<String> {
    let connector = (args.connector != "default").then_some(args.connector.as_str());
    let entries = store.audit(since, connector)?;
    if args.json {
        return Ok(serde_json::to_string_pretty(&json!({ "items": entries }))?);
    }
    let level = |l: &Option<String>| l.clone().unwrap_or_else(|| "none".into());
    let rows: Vec<Vec<String>> = entries
        .iter()
        .map(|e| {
            vec![
                format_timestamp(e.at),
                e.action.clone(),
                e.outcome.clone(),
                e.requester.clone(),
                e.grant_namespace.clone(),
                e.grant_name.clone(),
                e.grant_uid.clone(),
                e.connector.clone(),
                e.workspace.clone(),
                e.target.clone(),
                e.principal.clone(),
                level(&e.level_before),
                level(&e.level_after),
                e.message.clone(),
            ]
        })
        .collect();
    if args.csv {
        return Ok(csv(AUDIT_HEADER, &rows));
    }
    let cells: Vec<Vec<String>> = rows
        .into_iter()
        .map(|r| {
            vec![
                r[0].clone(),
                r[1].clone(),
                r[2].clone(),
                r[3].clone(),
                format!("{}/{}", r[4], r[5]),
                format!("{}/{}", r[8], r[9]),
                r[10].clone(),
                format!("{} -> {}", r[11], r[12]),
                r[13].clone(),
            ]
        })
        .collect();
    Ok(table(
        &[
            "TIME",
            "ACTION",
            "OUTCOME",
            "REQUESTER",
            "GRANT",
            "TARGET",
            "PRINCIPAL",
            "LEVEL",
            "MESSAGE",
        ],
        &cells,
    ))
}

/// The resource id inside an entitlement id `{type}:{resource id}:{slug}`.
fn entitlement_resource(entitlement_id: &str) -> &str {
    let rest = entitlement_id.split_once(':').map_or(entitlement_id, |(_, r)| r);
    rest.rsplit_once(':').map_or(rest, |(r, _)| r)
}

fn review_cells(rows: &[ReviewRow]) -> Vec<Vec<String>> {
    rows.iter().map(|r| r.cells().to_vec()).collect()
}

/// RFC 4180 CSV; a cell starting with `=`, `+`, `-`, `@`, tab or CR gets a
/// leading `'` so a spreadsheet never evaluates a name as a formula.
pub fn csv(headers: &[&str], rows: &[Vec<String>]) -> String {
    let field = |value: &str| {
        let value = if value.starts_with(['=', '+', '-', '@', '\t', '\r']) {
            format!("'{value}")
        } else {
            value.to_owned()
        };
        if value.contains([',', '"', '\n', '\r']) {
            format!("\"{}\"", value.replace('"', "\"\""))
        } else {
            value
        }
    };
    let mut out = headers.join(",");
    out.push('\n');
    for row in rows {
        out.push_str(&row.iter().map(|c| field(c)).collect::<Vec<_>>().join(","));
        out.push('\n');
    }
    out
}

fn runs_table(runs: &[SyncRun]) -> String {
    if runs.is_empty() {
        return "No sync runs recorded.\n".into();
    }
    let rows: Vec<Vec<String>> = runs
        .iter()
        .map(|r| {
            vec![
                r.id.to_string(),
                r.kind.to_string(),
                r.status.to_string(),
                format_timestamp(r.started_at),
                r.duration_ms
                    .map_or_else(String::new, |d| format!("{:.1}s", d as f64 / 1000.0)),
                r.requests.to_string(),
                r.resumed_from.map_or_else(String::new, |id| id.to_string()),
                r.error.clone().unwrap_or_default(),
            ]
        })
        .collect();
    table(
        &[
            "ID",
            "TYPE",
            "STATUS",
            "STARTED",
            "DURATION",
            "REQUESTS",
            "RESUMED FROM",
            "ERROR",
        ],
        &rows,
    )
}

fn changes_text(changes: &[(SyncKind, GrantDiff)], connector: &str, names: &NameIndex) -> String {
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
                let resource = entitlement_resource(&g.entitlement_id);
                let slug = g.entitlement_id.rsplit_once(':').map_or("", |(_, s)| s);
                vec![
                    sign.to_owned(),
                    names.name(resource),
                    slug.to_owned(),
                    names.name(&g.principal_id),
                    format!("{}:{}", g.principal_type, g.principal_id),
                    g.entitlement_id.clone(),
                ]
            })
            .collect();
        if !rows.is_empty() {
            out.push_str(&table(
                &["", "RESOURCE", "PERMISSION", "PRINCIPAL", "PRINCIPAL ID", "ENTITLEMENT"],
                &rows,
            ));
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

fn access_of_text(a: &UserAccess, connector: &str, data: &str) -> String {
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
        "User {} ({}), connector {connector}\n{data}",
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
