//! The store: an embedded SQLite database holding, per connector, the access
//! inventory (resources, entitlements, grants) in generations, and the sync
//! runs that produced them.
//!
//! # Concurrency
//!
//! [`Store`] is `Send + Sync` and cheap to clone (an `Arc` inside). All writes
//! go through one writer connection behind a mutex, each in one
//! `BEGIN IMMEDIATE` transaction, so the file has a single writer at a time
//! even across processes (`busy_timeout` waits for another process's writer).
//! Reads use a small pool of separate connections, each read in its own
//! transaction, so a reader sees one consistent snapshot and never blocks
//! the writer (WAL mode). A second process may open the same file with
//! [`Store::open_read_only`] (the `access` CLI does) while the operator syncs.
//! Methods are synchronous and short; async callers use `spawn_blocking`.
//!
//! # Generations
//!
//! Each syncer run of one connector and one kind ([`SyncKind`]) writes its
//! whole [`SyncBatch`] into a NEW generation and switches the
//! `(connector, kind)` pointer to it, all in the single transaction of
//! [`Store::commit_run`]. The current generation's rows are never touched by
//! a run, so a failed ([`Store::fail_run`]), interrupted or never-committed
//! run leaves the previous generation in place, whole. Generation numbers come
//! from one `AUTOINCREMENT` sequence shared by the whole file: they are never
//! reused, and for one `(connector, kind)` a later commit always has a larger
//! number and becomes current (two interleaved runs both complete; the later
//! commit wins). The same transaction prunes that `(connector, kind)`'s
//! generations beyond the newest `keep` (default 5, [`Store::with_history`]),
//! so two runs can be compared with [`Store::diff_grants`]. Kinds are
//! independent: committing `groups` never touches `projects`.
//!
//! The one in-place change is [`Store::replace_resource_grants`], used by
//! provisioning to refresh one resource's grants in the current generation
//! without waiting for a full sync.
//!
//! # Schema (version 1, `PRAGMA user_version = 1`, `PRAGMA application_id = 0x42424f50`)
//!
//! | table          | key                         | columns                                                                                          |
//! |----------------|-----------------------------|--------------------------------------------------------------------------------------------------|
//! | `runs`         | `id` (autoincrement)        | `connector`, `kind`, `status` (`running`/`ok`/`failed`), `started_at`, `finished_at` (Unix ms), `error`, `requests`, `resources`, `entitlements`, `grants`, `generation` |
//! | `generations`  | `id` (autoincrement)        | `connector`, `kind`, `run_id` → `runs`, `committed_at` (Unix ms), `resources`, `entitlements`, `grants` (counts) |
//! | `current`      | `(connector, kind)`         | `generation` → `generations`                                                                    |
//! | `resources`    | `(generation, id)`          | `display_name`, `parent_id`, `profile` (JSON text); `generation` → `generations`                 |
//! | `entitlements` | `(generation, id)`          | `resource_id`, `slug`, `display_name`; `generation` → `generations`                              |
//! | `grants`       | `(generation, id)`          | `entitlement_id`, `resource_id`, `slug` (copied from the entitlement), `principal_type`, `principal_id`, `unknown_principal`; `generation` → `generations` |
//!
//! Indexes: `runs (connector, kind, id)`, `generations (connector, kind, id)`,
//! `generations (run_id)`, `current (generation)`,
//! `entitlements (generation, resource_id)`, `grants (generation, resource_id)`,
//! `grants (generation, principal_id)`. Data tables are `WITHOUT ROWID`,
//! clustered by generation, so a generation is one contiguous range and
//! pruning one is a range delete. The resource type of a row is its
//! generation's kind ([`SyncKind::resource_type`]); a batch whose rows have
//! another type is rejected. Foreign keys are enforced (`PRAGMA foreign_keys`)
//! from every row to its generation; the links entitlement → resource and
//! grant → entitlement (same generation) are checked when a batch is
//! committed ([`StoreError::InvalidBatch`]) rather than by SQLite, which
//! would need one more index on the hot insert path.
//!
//! Version 3 adds `grant_intents` (the grant controller's record of a
//! Bitbucket write before it is made, [`Store::record_intent`]) and the
//! append-only `audit` log ([`Store::append_audit`]).
//!
//! Run history: per `(connector, kind)` the newest [`RUN_HISTORY`] finished
//! runs are kept, plus any run that produced a kept generation.
//!
//! Opening a file creates the schema when the file is new or empty, migrates
//! an older version (`user_version`), and refuses a file of another
//! application, a newer schema, or a file that is not SQLite
//! ([`StoreError::NotAStore`]). Durability: WAL with `synchronous = NORMAL`
//! (a power loss may drop the last commits, never corrupts). Pages freed by
//! pruning are reused by later generations; the file does not shrink.
//!
//! Startup: the operator calls [`Store::fail_interrupted_runs`] once, so runs
//! a killed process left `running` are recorded as failed.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, ErrorCode, OpenFlags, OptionalExtension, TransactionBehavior, params};
use serde::{Deserialize, Serialize};

use crate::model::{Entitlement, Grant, Profile, ProfileField, Resource, ResourceType, SyncBatch, SyncKind};

mod audit;
mod intent;

pub use audit::{AuditAction, AuditEntry};
pub use intent::{ChangeOperation, Intent, IntentState, NewIntent};

/// Id of a sync run (`runs.id`).
pub type RunId = i64;
/// Id of a generation (`generations.id`), unique across the whole file.
pub type Generation = i64;

/// Schema version written to `PRAGMA user_version`.
pub const SCHEMA_VERSION: i64 = 3;
/// `PRAGMA application_id` of a store file ("BBOP").
pub const APPLICATION_ID: i64 = 0x4242_4f50;
/// Generations kept per `(connector, kind)` unless [`Store::with_history`] says otherwise.
pub const DEFAULT_HISTORY: usize = 5;
/// Finished runs kept per `(connector, kind)`.
pub const RUN_HISTORY: usize = 100;
/// How long a statement waits for another connection's write lock.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(10);
/// Idle read connections kept open.
const READ_POOL: usize = 4;

/// Errors of the store. Messages are meant for people.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database file {} does not exist", path.display())]
    NotFound { path: PathBuf },
    #[error("database file {} is not a bitbucket-operator store: {reason}", path.display())]
    NotAStore { path: PathBuf, reason: String },
    #[error(
        "database file {} has schema version {found}, newer than this binary supports ({supported}); upgrade bitbucket-operator",
        path.display()
    )]
    TooNew { path: PathBuf, found: i64, supported: i64 },
    #[error(
        "database file {} has schema version {found}, older than {supported}; let the operator (or `sync`) open it once to migrate it",
        path.display()
    )]
    NeedsMigration { path: PathBuf, found: i64, supported: i64 },
    #[error("cannot open database file {}: {reason}", path.display())]
    CannotOpen { path: PathBuf, reason: String },
    #[error(
        "database file {} is damaged ({details}); restore it from a backup or move it aside and sync again",
        path.display()
    )]
    Damaged { path: PathBuf, details: String },
    #[error("the store was opened read-only")]
    ReadOnly,
    #[error("sync run {0} does not exist")]
    UnknownRun(RunId),
    #[error("sync run {run} is {status}, not running")]
    RunNotRunning { run: RunId, status: RunStatus },
    #[error("invalid {kind} batch: {reason}")]
    InvalidBatch { kind: SyncKind, reason: String },
    #[error("generation {generation} is not a {kind} generation of connector {connector:?}")]
    UnknownGeneration {
        connector: String,
        kind: SyncKind,
        generation: Generation,
    },
    #[error("connector {connector:?} has no current {kind} data")]
    NoCurrentGeneration { connector: String, kind: SyncKind },
    #[error("resource {resource_id} is not in connector {connector:?}'s current {kind} data")]
    UnknownResource {
        connector: String,
        kind: SyncKind,
        resource_id: String,
    },
    #[error("unexpected data in the store: {0}")]
    Corrupt(String),
    /// The message carries SQLite's text; it is deliberately not also the
    /// `source()`, so chain printers show it once.
    #[error("database error: {0}")]
    Sqlite(rusqlite::Error),
    #[error("store task failed: {0}")]
    Task(String),
}

impl From<rusqlite::Error> for StoreError {
    fn from(err: rusqlite::Error) -> Self {
        StoreError::Sqlite(err)
    }
}

/// Outcome of a sync run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunStatus {
    Running,
    Ok,
    Failed,
    /// Its process stopped before it finished (killed, crashed, restarted).
    Interrupted,
}

impl RunStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Running => "running",
            RunStatus::Ok => "ok",
            RunStatus::Failed => "failed",
            RunStatus::Interrupted => "interrupted",
        }
    }

    fn parse(s: &str) -> Result<Self, StoreError> {
        match s {
            "running" => Ok(RunStatus::Running),
            "ok" => Ok(RunStatus::Ok),
            "failed" => Ok(RunStatus::Failed),
            "interrupted" => Ok(RunStatus::Interrupted),
            other => Err(StoreError::Corrupt(format!("unknown run status {other:?}"))),
        }
    }
}

impl fmt::Display for RunStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Row counts of one generation (or one run).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    pub resources: u64,
    pub entitlements: u64,
    pub grants: u64,
}

/// One kept generation of a `(connector, kind)`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GenerationInfo {
    pub generation: Generation,
    pub connector: String,
    pub kind: SyncKind,
    /// The run that wrote it.
    pub run_id: Option<RunId>,
    /// Unix epoch milliseconds.
    pub committed_at: i64,
    pub counts: Counts,
    /// Whether this is the generation readers see.
    pub current: bool,
}

/// A sync run, as recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncRun {
    pub id: RunId,
    pub connector: String,
    pub kind: SyncKind,
    pub status: RunStatus,
    /// Unix epoch milliseconds.
    pub started_at: i64,
    /// Unix epoch milliseconds; `None` while running.
    pub finished_at: Option<i64>,
    pub duration_ms: Option<u64>,
    pub error: Option<String>,
    /// Bitbucket API requests the run used.
    pub requests: u64,
    /// What the run committed (`None` unless `ok`).
    pub counts: Option<Counts>,
    /// The generation the run committed (`None` unless `ok`; it may since have been pruned).
    pub generation: Option<Generation>,
    /// Workspace ids the run covered; `None`: every workspace (it replaced all data).
    pub workspaces: Option<Vec<String>>,
    /// The failed or interrupted run whose finished work this run took over.
    pub resumed_from: Option<RunId>,
    /// Unix epoch milliseconds: when the oldest data of this run was read
    /// (its own start, or the start of the run it resumed).
    pub data_from: i64,
}

/// How a run starts: its workspace scope, and whether it may take over the
/// finished work of an unfinished earlier run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunOptions {
    /// Workspace ids this run covers. `None`: every workspace; the commit
    /// replaces all data of the kind. `Some`: the commit replaces only these
    /// workspaces' data and keeps the rest of the current generation.
    pub workspaces: Option<Vec<String>>,
    /// Resume the newest failed or interrupted run of the same connector,
    /// kind and scope (newer than the last successful one): its checkpoints
    /// move to the new run.
    pub resume: bool,
    /// The interval the run is repeated at (the operator's per-type
    /// interval), so readers can tell stale data by it. Recorded when the
    /// file's `runs` table has an `interval_ms` column ([`Store::records_intervals`]).
    pub interval: Option<Duration>,
}

/// A started run and what it resumed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StartedRun {
    pub id: RunId,
    pub resumed_from: Option<RunId>,
    /// Finished units of work (unit name → data) taken over from the resumed run.
    pub checkpoints: HashMap<String, String>,
}

/// How current one kind's data is, for readers that must say so.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Freshness {
    pub kind: SyncKind,
    /// Unix epoch milliseconds the current data was read from Bitbucket
    /// (the start of the run that committed it, or of the run it resumed);
    /// `None`: never synced.
    pub data_as_of: Option<i64>,
    /// When the current data was committed.
    pub committed_at: Option<i64>,
    /// The newest run, finished or not.
    pub last_run: Option<SyncRun>,
    /// The interval the current data's run was repeated at (the operator's
    /// per-type interval), if recorded; `None` for `sync` runs.
    #[serde(default)]
    pub interval_ms: Option<u64>,
    /// Per workspace, when its data was read, if that differs between
    /// workspaces (runs scoped to some workspaces replaced only theirs);
    /// empty when one run read them all. `data_as_of` is then the oldest.
    #[serde(default)]
    pub workspaces: Vec<WorkspaceFreshness>,
}

/// When one workspace's data of one kind was read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkspaceFreshness {
    /// Workspace resource id (uuid).
    pub workspace_id: String,
    /// Its slug, when the workspaces type is synced.
    pub slug: Option<String>,
    /// Unix epoch milliseconds; `None`: not in this kind's data (never
    /// synced for this workspace, or older than the kept run history).
    pub data_as_of: Option<i64>,
}

/// Grants that differ between two generations.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrantDiff {
    pub from: Generation,
    pub to: Generation,
    /// In `to`, not in `from` (by grant id), sorted by id.
    pub added: Vec<Grant>,
    /// In `from`, not in `to`, sorted by id.
    pub removed: Vec<Grant>,
}

/// A current grant with what it is on (for effective-access queries).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldGrant {
    pub grant: Grant,
    pub resource_type: ResourceType,
    pub resource_id: String,
    /// The entitlement's slug (`member`, `read`, `admin`, ...).
    pub slug: String,
}

/// Handle on a store file. Clones share connections.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    /// `None` for an in-memory store (reads then use the writer connection).
    path: Option<PathBuf>,
    /// `None` when opened read-only.
    writer: Option<Mutex<Connection>>,
    readers: Mutex<Vec<Connection>>,
    keep: AtomicUsize,
    /// The file has [`READ_INDEXES`]: lookups may rely on them.
    indexed: AtomicBool,
    /// `runs` has an `interval_ms` column (see [`Store::records_intervals`]).
    intervals: AtomicBool,
}

impl Drop for Inner {
    /// Read connections close before the writer: the last connection to
    /// close checkpoints the WAL and removes `-wal`/`-shm`, and a read-only
    /// connection cannot, which would leave them behind.
    fn drop(&mut self) {
        lock(&self.readers).clear();
    }
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Store")
            .field("path", &self.inner.path)
            .field("read_only", &self.inner.writer.is_none())
            .field("keep", &self.history())
            .finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock leaves the connection usable: an open
    // transaction is rolled back when its guard drops.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn to_i64(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn to_u64(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

/// Maps "not a database" errors met while opening to [`StoreError::NotAStore`].
fn classify(path: &Path, err: rusqlite::Error) -> StoreError {
    match err.sqlite_error_code() {
        Some(ErrorCode::NotADatabase) => StoreError::NotAStore {
            path: path.to_owned(),
            reason: "the file is not a SQLite database".into(),
        },
        Some(ErrorCode::DatabaseCorrupt) => StoreError::Damaged {
            path: path.to_owned(),
            details: err.to_string(),
        },
        Some(ErrorCode::CannotOpen | ErrorCode::PermissionDenied | ErrorCode::ReadOnly) => StoreError::CannotOpen {
            path: path.to_owned(),
            reason: err.to_string(),
        },
        _ => StoreError::Sqlite(err),
    }
}

fn configure(conn: &Connection) -> rusqlite::Result<()> {
    conn.busy_timeout(BUSY_TIMEOUT)?;
    conn.pragma_update(None, "foreign_keys", true)?;
    conn.set_prepared_statement_cache_capacity(64);
    Ok(())
}

const SCHEMA_V1: &str = r#"
CREATE TABLE runs (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    connector    TEXT NOT NULL,
    kind         TEXT NOT NULL,
    status       TEXT NOT NULL CHECK (status IN ('running', 'ok', 'failed')),
    started_at   INTEGER NOT NULL,
    finished_at  INTEGER,
    error        TEXT,
    requests     INTEGER NOT NULL DEFAULT 0,
    resources    INTEGER,
    entitlements INTEGER,
    grants       INTEGER,
    generation   INTEGER
);
CREATE INDEX runs_by_connector ON runs (connector, kind, id);

CREATE TABLE generations (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    connector    TEXT NOT NULL,
    kind         TEXT NOT NULL,
    run_id       INTEGER REFERENCES runs (id),
    committed_at INTEGER NOT NULL,
    resources    INTEGER NOT NULL DEFAULT 0,
    entitlements INTEGER NOT NULL DEFAULT 0,
    grants       INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX generations_by_connector ON generations (connector, kind, id);
CREATE INDEX generations_by_run ON generations (run_id);

CREATE TABLE current (
    connector  TEXT NOT NULL,
    kind       TEXT NOT NULL,
    generation INTEGER NOT NULL REFERENCES generations (id),
    PRIMARY KEY (connector, kind)
) WITHOUT ROWID;
CREATE INDEX current_by_generation ON current (generation);

CREATE TABLE resources (
    generation   INTEGER NOT NULL REFERENCES generations (id),
    id           TEXT NOT NULL,
    display_name TEXT NOT NULL,
    parent_id    TEXT,
    profile      TEXT NOT NULL,
    PRIMARY KEY (generation, id)
) WITHOUT ROWID;

CREATE TABLE entitlements (
    generation   INTEGER NOT NULL REFERENCES generations (id),
    id           TEXT NOT NULL,
    resource_id  TEXT NOT NULL,
    slug         TEXT NOT NULL,
    display_name TEXT NOT NULL,
    PRIMARY KEY (generation, id)
) WITHOUT ROWID;
CREATE INDEX entitlements_by_resource ON entitlements (generation, resource_id);

CREATE TABLE grants (
    generation        INTEGER NOT NULL REFERENCES generations (id),
    id                TEXT NOT NULL,
    entitlement_id    TEXT NOT NULL,
    resource_id       TEXT NOT NULL,
    slug              TEXT NOT NULL,
    principal_type    TEXT NOT NULL,
    principal_id      TEXT NOT NULL,
    unknown_principal INTEGER NOT NULL,
    PRIMARY KEY (generation, id)
) WITHOUT ROWID;
CREATE INDEX grants_by_resource ON grants (generation, resource_id);
CREATE INDEX grants_by_principal ON grants (generation, principal_id);
"#;

/// Version 2: runs can be `interrupted`, record their workspace scope, their
/// owning process and what they resumed; `checkpoints` hold a run's finished
/// units of work so an interrupted run can resume. SQLite cannot change a
/// CHECK constraint in place, so `runs` is rebuilt (foreign keys are off
/// during migrations, see [`migrate`]).
const SCHEMA_V2: &str = r#"
CREATE TABLE runs_v2 (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    connector    TEXT NOT NULL,
    kind         TEXT NOT NULL,
    status       TEXT NOT NULL CHECK (status IN ('running', 'ok', 'failed', 'interrupted')),
    started_at   INTEGER NOT NULL,
    finished_at  INTEGER,
    error        TEXT,
    requests     INTEGER NOT NULL DEFAULT 0,
    resources    INTEGER,
    entitlements INTEGER,
    grants       INTEGER,
    generation   INTEGER,
    workspaces   TEXT,
    owner        TEXT,
    resumed_from INTEGER,
    data_from    INTEGER
);
INSERT INTO runs_v2 (id, connector, kind, status, started_at, finished_at, error, requests, resources,
                     entitlements, grants, generation, data_from)
    SELECT id, connector, kind, status, started_at, finished_at, error, requests, resources,
           entitlements, grants, generation, started_at FROM runs;
DROP TABLE runs;
ALTER TABLE runs_v2 RENAME TO runs;
CREATE INDEX runs_by_connector ON runs (connector, kind, id);

CREATE TABLE checkpoints (
    run_id INTEGER NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    unit   TEXT NOT NULL,
    data   TEXT NOT NULL,
    PRIMARY KEY (run_id, unit)
) WITHOUT ROWID;
"#;

/// Indexes for the readers' lookups (`access who-can`, `access-of`, the
/// data API): resources by name, by project and by workspace, grants by
/// resource and entitlement slug. Not part of a schema version: the writer
/// creates any missing one when it opens a file (once, on an older file),
/// and readers use them only when present ([`Store::indexed`]), so a file
/// written by an older binary still reads, only slower.
const READ_INDEXES: &[(&str, &str)] = &[
    (
        "resources_by_full_name",
        "CREATE INDEX IF NOT EXISTS resources_by_full_name ON resources (lower(json_extract(profile, '$.full_name')))",
    ),
    (
        "resources_by_nickname",
        "CREATE INDEX IF NOT EXISTS resources_by_nickname ON resources (lower(json_extract(profile, '$.nickname')))",
    ),
    (
        "resources_by_account_id",
        "CREATE INDEX IF NOT EXISTS resources_by_account_id ON resources (lower(json_extract(profile, '$.account_id')))",
    ),
    (
        "resources_by_email",
        "CREATE INDEX IF NOT EXISTS resources_by_email ON resources (lower(json_extract(profile, '$.email')))",
    ),
    (
        "resources_by_project",
        "CREATE INDEX IF NOT EXISTS resources_by_project ON resources (json_extract(profile, '$.project_id'))",
    ),
    (
        "resources_by_parent",
        "CREATE INDEX IF NOT EXISTS resources_by_parent ON resources (parent_id, generation)",
    ),
    (
        // `grants_by_principal` leads with the generation, and SQLite then
        // prefers scanning the whole generation by its primary key.
        "grants_of_principal",
        "CREATE INDEX IF NOT EXISTS grants_of_principal ON grants (principal_id, generation)",
    ),
    (
        "grants_by_resource_slug",
        "CREATE INDEX IF NOT EXISTS grants_by_resource_slug ON grants (resource_id, slug, generation)",
    ),
];

/// Creates the missing [`READ_INDEXES`] (the writer, at open).
fn create_read_indexes(conn: &Connection) -> rusqlite::Result<()> {
    for (_, sql) in READ_INDEXES {
        conn.execute_batch(sql)?;
    }
    Ok(())
}

/// Whether the file has every [`READ_INDEXES`] entry.
fn has_read_indexes(conn: &Connection) -> rusqlite::Result<bool> {
    let mut stmt = conn.prepare("SELECT count(*) FROM sqlite_master WHERE type = 'index' AND name = ?1")?;
    for (name, _) in READ_INDEXES {
        if stmt.query_row(params![name], |r| r.get::<_, i64>(0))? == 0 {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Whether `runs` has the `interval_ms` column (schema v3 adds it; a reader
/// of an older file finds none and judges staleness by its default).
fn has_interval_column(conn: &Connection) -> rusqlite::Result<bool> {
    let mut stmt = conn.prepare("SELECT count(*) FROM pragma_table_info('runs') WHERE name = 'interval_ms'")?;
    Ok(stmt.query_row([], |r| r.get::<_, i64>(0))? > 0)
}

/// Per workspace, when the current data of `(connector, kind)` committed
/// by `run` was read: a run scoped to some workspaces replaced only theirs
/// and kept the rest from the data before it, so each workspace's data is
/// as old as the newest successful run that covered it. Walks back the
/// successful runs until one covered every workspace. Empty when `run`
/// itself covered every workspace (the data is of one age).
fn workspace_freshness(
    c: &Connection,
    connector: &str,
    kind: SyncKind,
    run: RunId,
) -> Result<Vec<WorkspaceFreshness>, StoreError> {
    let mut stmt = c.prepare_cached(
        "SELECT workspaces, coalesce(data_from, started_at) FROM runs
         WHERE connector = ?1 AND kind = ?2 AND status = 'ok' AND id <= ?3 ORDER BY id DESC",
    )?;
    let mut rows = stmt.query(params![connector, kind.as_str(), run])?;
    let mut scoped: Vec<(String, i64)> = Vec::new();
    let mut rest: Option<i64> = None;
    let mut first = true;
    while let Some(row) = rows.next()? {
        let (scope, from): (Option<String>, i64) = (row.get(0)?, row.get(1)?);
        match parse_workspaces(scope.as_deref())? {
            None if first => return Ok(Vec::new()),
            None => {
                rest = Some(from);
                break;
            }
            Some(ids) => {
                for id in ids {
                    if !scoped.iter().any(|(known, _)| *known == id) {
                        scoped.push((id, from));
                    }
                }
            }
        }
        first = false;
    }
    let mut slugs: HashMap<String, String> = HashMap::new();
    let mut stmt = c.prepare_cached(
        "SELECT r.id, json_extract(r.profile, '$.slug') FROM current c JOIN resources r ON r.generation = c.generation
         WHERE c.connector = ?1 AND c.kind = 'workspaces'",
    )?;
    for row in stmt.query_map(params![connector], |r| {
        Ok((r.get::<_, String>(0)?, r.get::<_, Option<String>>(1)?))
    })? {
        let (id, slug) = row?;
        slugs.insert(id, slug.unwrap_or_default());
    }
    let mut out: Vec<WorkspaceFreshness> = scoped
        .into_iter()
        .map(|(id, from)| WorkspaceFreshness {
            slug: slugs.get(&id).cloned(),
            workspace_id: id,
            data_as_of: Some(from),
        })
        .collect();
    for (id, slug) in slugs {
        if !out.iter().any(|w| w.workspace_id == id) {
            out.push(WorkspaceFreshness {
                workspace_id: id,
                slug: Some(slug),
                data_as_of: rest,
            });
        }
    }
    if out.windows(2).all(|w| w[0].data_as_of == w[1].data_as_of) && out.iter().all(|w| w.data_as_of.is_some()) {
        return Ok(Vec::new());
    }
    out.sort_by(|a, b| (&a.slug, &a.workspace_id).cmp(&(&b.slug, &b.workspace_id)));
    Ok(out)
}

/// Schema steps: `MIGRATIONS[i]` takes version `i` to `i + 1`.
const MIGRATIONS: &[&str] = &[SCHEMA_V1, SCHEMA_V2, intent::SCHEMA_V3];

/// What the file's header says about it.
fn identify(conn: &Connection, path: &Path) -> Result<(i64, i64, i64), StoreError> {
    let app: i64 = conn
        .pragma_query_value(None, "application_id", |r| r.get(0))
        .map_err(|e| classify(path, e))?;
    let version: i64 = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .map_err(|e| classify(path, e))?;
    let objects: i64 = conn
        .query_row("SELECT count(*) FROM sqlite_master", [], |r| r.get(0))
        .map_err(|e| classify(path, e))?;
    Ok((app, version, objects))
}

/// Checks that the file is ours (or empty) and returns its schema version.
fn check_identity(conn: &Connection, path: &Path) -> Result<i64, StoreError> {
    let (app, version, objects) = identify(conn, path)?;
    if app == APPLICATION_ID {
        if version > SCHEMA_VERSION {
            return Err(StoreError::TooNew {
                path: path.to_owned(),
                found: version,
                supported: SCHEMA_VERSION,
            });
        }
        Ok(version)
    } else if app == 0 && version == 0 && objects == 0 {
        Ok(0)
    } else {
        Err(StoreError::NotAStore {
            path: path.to_owned(),
            reason: format!(
                "it is a SQLite database of another application (application_id {app:#x}, {objects} schema objects)"
            ),
        })
    }
}

fn migrate(conn: &mut Connection, path: &Path) -> Result<(), StoreError> {
    if check_identity(conn, path)? == SCHEMA_VERSION {
        return Ok(());
    }
    // Rebuilding a referenced table needs foreign keys off (they cannot be
    // switched inside a transaction); they are back on before any data write.
    conn.pragma_update(None, "foreign_keys", false)?;
    let migrated = migrate_tx(conn, path);
    conn.pragma_update(None, "foreign_keys", true)?;
    migrated
}

fn migrate_tx(conn: &mut Connection, path: &Path) -> Result<(), StoreError> {
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(|e| classify(path, e))?;
    // Re-check under the write lock: another process may have migrated.
    let mut version = check_identity(&tx, path)?;
    while version < SCHEMA_VERSION {
        tx.execute_batch(MIGRATIONS[version as usize])?;
        version += 1;
        tracing::info!(path = %path.display(), version, "store schema migrated");
    }
    tx.pragma_update(None, "application_id", APPLICATION_ID)?;
    tx.pragma_update(None, "user_version", SCHEMA_VERSION)?;
    tx.commit()?;
    Ok(())
}

fn open_flags(create: bool) -> OpenFlags {
    let mut flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX | OpenFlags::SQLITE_OPEN_URI;
    if create {
        flags |= OpenFlags::SQLITE_OPEN_CREATE;
    }
    flags
}

fn read_only_flags() -> OpenFlags {
    OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX | OpenFlags::SQLITE_OPEN_URI
}

/// `file:` URI of a path, with `query` appended (`mode=ro`, `immutable=1`).
fn file_uri(path: &Path, query: &str) -> String {
    let text = path.to_string_lossy();
    let mut encoded = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '%' | '?' | '#' => encoded.push_str(&format!("%{:02X}", c as u32)),
            c => encoded.push(c),
        }
    }
    format!("file:{encoded}?{query}")
}

fn side_file(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// Opens a connection that never writes and never creates a file, for the
/// writer of this handle (in-process readers share its WAL) or for a
/// separate reading process:
/// - with a writer's WAL present (`-wal` and `-shm` exist), `mode=ro` shares
///   them, so the reader sees committed data and creates nothing;
/// - without (no writer since the last clean close, or a read-only
///   directory), `immutable=1`: SQLite reads the main file with no lock and
///   no side files, which a later writer could not have used (another user's
///   `-shm`, say).
fn open_reader(path: &Path, beside_writer: bool) -> Result<Connection, StoreError> {
    let live_wal = beside_writer || (side_file(path, "-wal").exists() && side_file(path, "-shm").exists());
    let uri = file_uri(path, if live_wal { "mode=ro" } else { "immutable=1" });
    let conn = Connection::open_with_flags(&uri, read_only_flags()).map_err(|e| classify(path, e))?;
    configure(&conn).map_err(|e| classify(path, e))?;
    conn.pragma_update(None, "query_only", true)?;
    Ok(conn)
}

fn quick_check(conn: &Connection, path: &Path) -> Result<(), StoreError> {
    let mut stmt = conn.prepare("PRAGMA quick_check(5)").map_err(|e| classify(path, e))?;
    let problems: Vec<String> = stmt
        .query_map([], |r| r.get::<_, String>(0))
        .and_then(|rows| rows.collect())
        .map_err(|e| classify(path, e))?;
    if problems.len() == 1 && problems[0] == "ok" {
        return Ok(());
    }
    Err(StoreError::Damaged {
        path: path.to_owned(),
        details: problems.join("; "),
    })
}

impl Store {
    /// Opens (creating if missing) a store file, migrating its schema and
    /// switching it to WAL mode.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let mut conn = Connection::open_with_flags(path, open_flags(true)).map_err(|e| classify(path, e))?;
        configure(&conn).map_err(|e| classify(path, e))?;
        migrate(&mut conn, path)?;
        let mode: String = conn
            .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
            .map_err(|e| classify(path, e))?;
        if !mode.eq_ignore_ascii_case("wal") {
            tracing::warn!(path = %path.display(), mode, "store could not switch to WAL mode; readers may wait for the writer");
        }
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        // Truncate the WAL file back to 64 MiB after checkpoints: a 50k-grant
        // commit writes tens of MiB, which should not stay on disk forever.
        conn.pragma_update(None, "journal_size_limit", 64 * 1024 * 1024)?;
        // 32 MiB of page cache for the writer, so a big batch's indexes stay in memory.
        conn.pragma_update(None, "cache_size", -32_000)?;
        create_read_indexes(&conn).map_err(|e| classify(path, e))?;
        let intervals = has_interval_column(&conn).map_err(|e| classify(path, e))?;
        let store = Store::new(Some(path.to_owned()), Some(conn));
        store.inner.indexed.store(true, Ordering::Relaxed);
        store.inner.intervals.store(intervals, Ordering::Relaxed);
        let closed = store.close_dead_runs()?;
        if closed > 0 {
            tracing::info!(path = %path.display(), closed, "runs of a stopped process closed as interrupted");
        }
        Ok(store)
    }

    /// Like [`Store::open`], after SQLite's `quick_check` of an existing
    /// file: a damaged store is refused ([`StoreError::Damaged`]) before
    /// anything is spent on filling it. What `sync` uses.
    pub fn open_checked(path: &Path) -> Result<Store, StoreError> {
        if path.exists() {
            let conn = Connection::open_with_flags(path, read_only_flags()).map_err(|e| classify(path, e))?;
            configure(&conn).map_err(|e| classify(path, e))?;
            quick_check(&conn, path)?;
        }
        Store::open(path)
    }

    /// SQLite's `quick_check` of the open file (both kinds of handle).
    pub fn quick_check(&self) -> Result<(), StoreError> {
        let path = self.inner.path.clone().unwrap_or_else(|| PathBuf::from(":memory:"));
        self.read(|c| quick_check(c, &path))
    }

    /// Opens an existing store file for reading only: never creates the file,
    /// never migrates it. Write methods return [`StoreError::ReadOnly`].
    pub fn open_read_only(path: &Path) -> Result<Store, StoreError> {
        if !path.is_file() {
            return Err(StoreError::NotFound { path: path.to_owned() });
        }
        let conn = open_reader(path, false)?;
        let version = check_identity(&conn, path)?;
        if version == 0 {
            return Err(StoreError::NotAStore {
                path: path.to_owned(),
                reason: "the file holds no store schema".into(),
            });
        }
        if version < SCHEMA_VERSION {
            return Err(StoreError::NeedsMigration {
                path: path.to_owned(),
                found: version,
                supported: SCHEMA_VERSION,
            });
        }
        let indexed = has_read_indexes(&conn).map_err(|e| classify(path, e))?;
        let intervals = has_interval_column(&conn).map_err(|e| classify(path, e))?;
        let store = Store::new(Some(path.to_owned()), None);
        store.inner.indexed.store(indexed, Ordering::Relaxed);
        store.inner.intervals.store(intervals, Ordering::Relaxed);
        lock(&store.inner.readers).push(conn);
        Ok(store)
    }

    /// A private in-memory store (tests, `sync` without `--db`).
    pub fn open_in_memory() -> Result<Store, StoreError> {
        let mut conn = Connection::open_in_memory()?;
        configure(&conn)?;
        migrate(&mut conn, Path::new(":memory:"))?;
        create_read_indexes(&conn)?;
        let intervals = has_interval_column(&conn)?;
        let store = Store::new(None, Some(conn));
        store.inner.indexed.store(true, Ordering::Relaxed);
        store.inner.intervals.store(intervals, Ordering::Relaxed);
        Ok(store)
    }

    fn new(path: Option<PathBuf>, writer: Option<Connection>) -> Store {
        Store {
            inner: Arc::new(Inner {
                path,
                writer: writer.map(Mutex::new),
                readers: Mutex::new(Vec::new()),
                keep: AtomicUsize::new(DEFAULT_HISTORY),
                indexed: AtomicBool::new(false),
                intervals: AtomicBool::new(false),
            }),
        }
    }

    /// Keeps the newest `keep` generations per `(connector, kind)` (at least
    /// 1, the current one). Applies to all clones of this store.
    pub fn with_history(self, keep: usize) -> Self {
        self.inner.keep.store(keep.max(1), Ordering::Relaxed);
        self
    }

    /// Generations kept per `(connector, kind)`.
    pub fn history(&self) -> usize {
        self.inner.keep.load(Ordering::Relaxed)
    }

    /// The file path (`None` in memory).
    pub fn path(&self) -> Option<&Path> {
        self.inner.path.as_deref()
    }

    /// Runs `f` in one write transaction (`BEGIN IMMEDIATE`), committing if
    /// it returns `Ok`.
    fn write<T>(&self, f: impl FnOnce(&rusqlite::Transaction<'_>) -> Result<T, StoreError>) -> Result<T, StoreError> {
        let writer = self.inner.writer.as_ref().ok_or(StoreError::ReadOnly)?;
        let mut conn = lock(writer);
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let out = f(&tx)?;
        tx.commit()?;
        Ok(out)
    }

    /// Runs `f` in one read transaction: one consistent snapshot.
    fn read<T>(&self, f: impl FnOnce(&Connection) -> Result<T, StoreError>) -> Result<T, StoreError> {
        let Some(path) = &self.inner.path else {
            let writer = self.inner.writer.as_ref().ok_or(StoreError::ReadOnly)?;
            let mut conn = lock(writer);
            let tx = conn.transaction()?;
            return f(&tx);
        };
        let pooled = lock(&self.inner.readers).pop();
        let mut conn = match pooled {
            Some(c) => c,
            None => open_reader(path, self.inner.writer.is_some())?,
        };
        let out = {
            let tx = conn.transaction()?;
            f(&tx)
        };
        let mut pool = lock(&self.inner.readers);
        if pool.len() < READ_POOL {
            pool.push(conn);
        }
        out
    }

    /// Records a run of `kind` for `connector` as running, covering every
    /// workspace, starting from nothing.
    pub fn start_run(&self, connector: &str, kind: SyncKind) -> Result<RunId, StoreError> {
        Ok(self.start_run_with(connector, kind, &RunOptions::default())?.id)
    }

    /// Records a run as running with its scope; with `resume`, takes over the
    /// checkpoints of the newest unfinished run of the same connector, kind
    /// and scope (one that failed or was interrupted after the last success).
    pub fn start_run_with(
        &self,
        connector: &str,
        kind: SyncKind,
        options: &RunOptions,
    ) -> Result<StartedRun, StoreError> {
        let workspaces = workspaces_text(&options.workspaces);
        self.write(|tx| {
            let now = now_ms();
            let previous = if options.resume {
                resumable_run(tx, connector, kind, workspaces.as_deref())?
            } else {
                None
            };
            let data_from = previous.map_or(now, |(_, from)| from);
            tx.execute(
                "INSERT INTO runs (connector, kind, status, started_at, workspaces, owner, resumed_from, data_from)
                 VALUES (?1, ?2, 'running', ?3, ?4, ?5, ?6, ?7)",
                params![
                    connector,
                    kind.as_str(),
                    now,
                    workspaces,
                    process_owner(),
                    previous.map(|(id, _)| id),
                    data_from
                ],
            )?;
            let id = tx.last_insert_rowid();
            if let Some(interval) = options.interval.filter(|_| self.records_intervals()) {
                let ms = i64::try_from(interval.as_millis()).unwrap_or(i64::MAX);
                tx.execute("UPDATE runs SET interval_ms = ?2 WHERE id = ?1", params![id, ms])?;
            }
            let mut checkpoints = HashMap::new();
            if let Some((old, _)) = previous {
                tx.execute("UPDATE checkpoints SET run_id = ?2 WHERE run_id = ?1", params![old, id])?;
                let mut stmt = tx.prepare_cached("SELECT unit, data FROM checkpoints WHERE run_id = ?1")?;
                for row in stmt.query_map(params![id], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))? {
                    let (unit, data) = row?;
                    checkpoints.insert(unit, data);
                }
            }
            Ok(StartedRun {
                id,
                resumed_from: previous.map(|(id, _)| id),
                checkpoints,
            })
        })
    }

    /// Records finished units of work of a running run (unit name → data),
    /// so that a later run can resume after them. Replaces a unit written before.
    pub fn checkpoint(&self, run: RunId, units: &[(String, String)]) -> Result<(), StoreError> {
        if units.is_empty() {
            return Ok(());
        }
        self.write(|tx| {
            running_run(tx, run)?;
            let mut stmt =
                tx.prepare_cached("INSERT OR REPLACE INTO checkpoints (run_id, unit, data) VALUES (?1, ?2, ?3)")?;
            for (unit, data) in units {
                stmt.execute(params![run, unit, data])?;
            }
            Ok(())
        })
    }

    /// Checkpointed units of a run (tests, diagnostics).
    pub fn checkpoint_count(&self, run: RunId) -> Result<u64, StoreError> {
        self.read(|c| {
            let n: i64 = c.query_row(
                "SELECT count(*) FROM checkpoints WHERE run_id = ?1",
                params![run],
                |r| r.get(0),
            )?;
            Ok(to_u64(n))
        })
    }

    /// Records which process owns a running run (`host:pid`). Runs get
    /// their owner when they start; this hands one over (tests simulate a
    /// killed process with it).
    #[doc(hidden)]
    pub fn set_run_owner(&self, run: RunId, owner: &str) -> Result<(), StoreError> {
        self.write(|tx| {
            tx.execute("UPDATE runs SET owner = ?2 WHERE id = ?1", params![run, owner])?;
            Ok(())
        })
    }

    /// Adds requests to a running run's count as they happen, so that a run
    /// killed mid-way still reports what it spent.
    pub fn record_requests(&self, run: RunId, requests: u64) -> Result<(), StoreError> {
        self.write(|tx| {
            tx.execute(
                "UPDATE runs SET requests = ?2 WHERE id = ?1 AND status = 'running'",
                params![run, requests as i64],
            )?;
            Ok(())
        })
    }

    /// Writes `batch` as a new generation of the run's `(connector, kind)`,
    /// makes it current, marks the run ok and prunes old generations: one
    /// transaction. On error nothing changes and the run stays running (the
    /// caller reports it with [`Store::fail_run`]).
    ///
    /// The batch must hold only resources of the kind's type, entitlements on
    /// those resources and grants of those entitlements. Rows repeating an
    /// id are stored once (the last wins).
    pub fn commit_run(&self, run: RunId, batch: &SyncBatch, requests: u64) -> Result<Generation, StoreError> {
        let keep = self.history();
        self.write(|tx| commit_tx(tx, run, batch, requests, keep))
    }

    /// Marks a running run failed with `error`. Data is untouched: the
    /// previous generation stays current.
    pub fn fail_run(&self, run: RunId, error: &str, requests: u64) -> Result<(), StoreError> {
        self.write(|tx| {
            let (connector, kind, started_at) = running_run(tx, run)?;
            tx.execute(
                "UPDATE runs SET status = 'failed', finished_at = ?2, requests = ?3, error = ?4 WHERE id = ?1",
                params![run, now_ms().max(started_at), requests as i64, error],
            )?;
            prune_runs(tx, &connector, kind)?;
            Ok(())
        })
    }

    /// Marks every run still `running` (of `connector` and `kind`, or of all)
    /// as failed: runs whose loop was stopped, or whose process stopped,
    /// before they finished. Call it when no run of that scope can still be
    /// going (at startup, or after awaiting the stopped loops). Returns how many.
    pub fn fail_interrupted_runs(&self, connector: Option<&str>, kind: Option<SyncKind>) -> Result<usize, StoreError> {
        self.write(|tx| {
            let n = tx.execute(
                "UPDATE runs SET status = 'interrupted', finished_at = max(started_at, ?3),
                   error = 'interrupted: stopped before the run finished'
                 WHERE status = 'running' AND (?1 IS NULL OR connector = ?1) AND (?2 IS NULL OR kind = ?2)",
                params![connector, kind.map(|k| k.as_str()), now_ms()],
            )?;
            Ok(n)
        })
    }

    /// Closes as `interrupted` the running runs whose process is known to be
    /// gone (same host, pid no longer alive), keeping their checkpoints so
    /// that the next run resumes them. Runs of a live process are left alone,
    /// so this is safe while another process syncs into the same file.
    pub fn close_dead_runs(&self) -> Result<usize, StoreError> {
        self.write(|tx| {
            let dead = {
                let mut stmt = tx.prepare_cached("SELECT id, owner FROM runs WHERE status = 'running'")?;
                stmt.query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, Option<String>>(1)?)))?
                    .collect::<Result<Vec<_>, _>>()?
                    .into_iter()
                    .filter(|(_, owner)| owner_is_gone(owner.as_deref()))
                    .map(|(id, _)| id)
                    .collect::<Vec<_>>()
            };
            for id in &dead {
                tx.execute(
                    "UPDATE runs SET status = 'interrupted', finished_at = max(started_at, ?2),
                       error = 'interrupted: its process stopped before the run finished' WHERE id = ?1",
                    params![id, now_ms()],
                )?;
            }
            Ok(dead.len())
        })
    }

    /// Per kind: when its current data was read (per workspace where runs
    /// scoped to some workspaces made it differ), the interval it was synced
    /// at, and its newest run.
    pub fn freshness(&self, connector: &str) -> Result<Vec<Freshness>, StoreError> {
        let intervals = self.records_intervals();
        self.read(|c| {
            let mut out = Vec::with_capacity(SyncKind::ALL.len());
            for kind in SyncKind::ALL {
                let current = c
                    .prepare_cached(
                        "SELECT g.committed_at, r.data_from, r.started_at, r.id FROM current c
                         JOIN generations g ON g.id = c.generation LEFT JOIN runs r ON r.id = g.run_id
                         WHERE c.connector = ?1 AND c.kind = ?2",
                    )?
                    .query_row(params![connector, kind.as_str()], |r| {
                        Ok((
                            r.get::<_, i64>(0)?,
                            r.get::<_, Option<i64>>(1)?,
                            r.get::<_, Option<i64>>(2)?,
                            r.get::<_, Option<i64>>(3)?,
                        ))
                    })
                    .optional()?;
                let last_run = c
                    .prepare_cached(&format!(
                        "{RUN_SELECT} WHERE connector = ?1 AND kind = ?2 ORDER BY id DESC LIMIT 1"
                    ))?
                    .query_row(params![connector, kind.as_str()], run_row)
                    .optional()?
                    .map(RawRun::into_run)
                    .transpose()?;
                let run_id = current.and_then(|(_, _, _, id)| id);
                let workspaces = match run_id {
                    Some(run) => workspace_freshness(c, connector, kind, run)?,
                    None => Vec::new(),
                };
                let interval_ms = match (run_id, intervals) {
                    (Some(run), true) => c
                        .query_row("SELECT interval_ms FROM runs WHERE id = ?1", params![run], |r| {
                            r.get::<_, Option<i64>>(0)
                        })?
                        .map(to_u64),
                    _ => None,
                };
                let run_as_of = current.map(|(committed, from, started, _)| from.or(started).unwrap_or(committed));
                let oldest = workspaces.iter().filter_map(|w| w.data_as_of).min();
                out.push(Freshness {
                    kind,
                    data_as_of: oldest.or(run_as_of),
                    committed_at: current.map(|(committed, ..)| committed),
                    last_run,
                    interval_ms,
                    workspaces,
                });
            }
            Ok(out)
        })
    }

    /// Whether runs record their interval (the file's `runs` table has an
    /// `interval_ms` column).
    pub fn records_intervals(&self) -> bool {
        self.inner.intervals.load(Ordering::Relaxed)
    }

    /// The current generation of `(connector, kind)`, if any run committed.
    pub fn current_generation(&self, connector: &str, kind: SyncKind) -> Result<Option<Generation>, StoreError> {
        self.read(|c| current_of(c, connector, kind))
    }

    /// Kept generations of `(connector, kind)`, newest first.
    pub fn generations(&self, connector: &str, kind: SyncKind) -> Result<Vec<GenerationInfo>, StoreError> {
        self.read(|c| {
            let current = current_of(c, connector, kind)?;
            let mut stmt = c.prepare_cached(
                "SELECT id, run_id, committed_at, resources, entitlements, grants FROM generations
                 WHERE connector = ?1 AND kind = ?2 ORDER BY id DESC",
            )?;
            let rows = stmt.query_map(params![connector, kind.as_str()], |r| {
                Ok(GenerationInfo {
                    generation: r.get(0)?,
                    connector: connector.to_owned(),
                    kind,
                    run_id: r.get(1)?,
                    committed_at: r.get(2)?,
                    counts: Counts {
                        resources: to_u64(r.get(3)?),
                        entitlements: to_u64(r.get(4)?),
                        grants: to_u64(r.get(5)?),
                    },
                    current: false,
                })
            })?;
            let mut out = rows.collect::<Result<Vec<_>, _>>()?;
            for g in &mut out {
                g.current = Some(g.generation) == current;
            }
            Ok(out)
        })
    }

    /// The current generation's data of `(connector, kind)`, each list
    /// sorted by id; empty if nothing was committed yet.
    pub fn batch(&self, connector: &str, kind: SyncKind) -> Result<SyncBatch, StoreError> {
        self.read(|c| match current_of(c, connector, kind)? {
            Some(g) => generation_batch(c, kind, g),
            None => Ok(SyncBatch::default()),
        })
    }

    /// Like [`Store::batch`] for any kept generation.
    pub fn generation_batch(
        &self,
        connector: &str,
        kind: SyncKind,
        generation: Generation,
    ) -> Result<SyncBatch, StoreError> {
        self.read(|c| {
            check_generation(c, connector, kind, generation)?;
            generation_batch(c, kind, generation)
        })
    }

    /// Current resources of `connector`, of one type or all, sorted by id.
    pub fn resources(&self, connector: &str, resource_type: Option<ResourceType>) -> Result<Vec<Resource>, StoreError> {
        self.read(|c| {
            let mut stmt = c.prepare_cached(
                "SELECT c.kind, r.id, r.display_name, r.parent_id, r.profile
                 FROM current c JOIN resources r ON r.generation = c.generation
                 WHERE c.connector = ?1 AND (?2 IS NULL OR c.kind = ?2) ORDER BY r.id",
            )?;
            let kind = resource_type.map(|t| kind_of(t).as_str());
            let rows = stmt.query_map(params![connector, kind], resource_row)?;
            collect_resources(rows)
        })
    }

    /// One current resource of `connector` by id, of any type.
    pub fn resource(&self, connector: &str, id: &str) -> Result<Option<Resource>, StoreError> {
        self.read(|c| {
            let mut stmt = c.prepare_cached(
                "SELECT c.kind, r.id, r.display_name, r.parent_id, r.profile
                 FROM current c JOIN resources r ON r.generation = c.generation
                 WHERE c.connector = ?1 AND r.id = ?2 ORDER BY c.kind",
            )?;
            let rows = stmt.query_map(params![connector, id], resource_row)?;
            Ok(collect_resources(rows)?.into_iter().next())
        })
    }

    /// Current resources whose profile `field` equals `value`, ignoring
    /// ASCII case (e.g. a repository by full name, a user by nickname).
    /// Sorted by id.
    pub fn find_resources(
        &self,
        connector: &str,
        field: ProfileField,
        value: &str,
    ) -> Result<Vec<Resource>, StoreError> {
        let resource_type = field.resource_type();
        // `+r.generation` keeps SQLite from scanning the generation by its
        // primary key when the name index can find the few rows at once.
        let join = if self.indexed() {
            "+r.generation"
        } else {
            "r.generation"
        };
        let sql = format!(
            "SELECT c.kind, r.id, r.display_name, r.parent_id, r.profile
             FROM current c JOIN resources r ON {join} = c.generation
             WHERE c.connector = ?1 AND c.kind = ?2 AND lower(json_extract(r.profile, '$.{}')) = lower(?3)
             ORDER BY r.id",
            field.json_key()
        );
        self.read(|c| {
            let mut stmt = c.prepare_cached(&sql)?;
            let rows = stmt.query_map(params![connector, kind_of(resource_type).as_str(), value], resource_row)?;
            collect_resources(rows)
        })
    }

    /// Whether the file has the readers' lookup indexes (always, once a
    /// writer of this version opened it).
    pub fn indexed(&self) -> bool {
        self.inner.indexed.load(Ordering::Relaxed)
    }

    /// Current resources of `connector` with these ids (any kind), sorted by id.
    pub fn resources_by_ids(&self, connector: &str, ids: &[&str]) -> Result<Vec<Resource>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let ids = serde_json::Value::from(ids.to_vec()).to_string();
        self.read(|c| {
            let mut stmt = c.prepare_cached(
                "SELECT c.kind, r.id, r.display_name, r.parent_id, r.profile
                 FROM current c JOIN resources r ON r.generation = c.generation
                 WHERE c.connector = ?1 AND r.id IN (SELECT value FROM json_each(?2)) ORDER BY r.id",
            )?;
            let rows = stmt.query_map(params![connector, ids], resource_row)?;
            collect_resources(rows)
        })
    }

    /// Current resources of one type whose parent is one of `workspaces`
    /// (projects and repositories of the workspaces a user owns), sorted by id.
    pub fn resources_in_workspaces(
        &self,
        connector: &str,
        resource_type: ResourceType,
        workspaces: &[&str],
    ) -> Result<Vec<Resource>, StoreError> {
        if workspaces.is_empty() {
            return Ok(Vec::new());
        }
        let workspaces = serde_json::Value::from(workspaces.to_vec()).to_string();
        self.read(|c| {
            let mut stmt = c.prepare_cached(
                "SELECT c.kind, r.id, r.display_name, r.parent_id, r.profile
                 FROM current c JOIN resources r ON r.generation = c.generation
                 WHERE c.connector = ?1 AND c.kind = ?2 AND r.parent_id IN (SELECT value FROM json_each(?3))
                 ORDER BY r.id",
            )?;
            let rows = stmt.query_map(
                params![connector, kind_of(resource_type).as_str(), workspaces],
                resource_row,
            )?;
            collect_resources(rows)
        })
    }

    /// Current repositories of `connector` in one of `projects` (project
    /// resource ids), sorted by id.
    pub fn repositories_of_projects(&self, connector: &str, projects: &[&str]) -> Result<Vec<Resource>, StoreError> {
        if projects.is_empty() {
            return Ok(Vec::new());
        }
        let projects = serde_json::Value::from(projects.to_vec()).to_string();
        let join = if self.indexed() {
            "+r.generation"
        } else {
            "r.generation"
        };
        let sql = format!(
            "SELECT c.kind, r.id, r.display_name, r.parent_id, r.profile
             FROM current c JOIN resources r ON {join} = c.generation
             WHERE c.connector = ?1 AND c.kind = ?2
               AND json_extract(r.profile, '$.project_id') IN (SELECT value FROM json_each(?3))
             ORDER BY r.id"
        );
        self.read(|c| {
            let mut stmt = c.prepare_cached(&sql)?;
            let rows = stmt.query_map(
                params![connector, SyncKind::Repositories.as_str(), projects],
                resource_row,
            )?;
            collect_resources(rows)
        })
    }

    /// All current grants of `connector`, across kinds, sorted by id.
    pub fn grants(&self, connector: &str) -> Result<Vec<Grant>, StoreError> {
        self.read(|c| {
            let mut stmt = c.prepare_cached(&format!("{HELD_SELECT} WHERE c.connector = ?1 ORDER BY g.id"))?;
            let rows = stmt.query_map(params![connector], held_row)?;
            Ok(collect_held(rows)?.into_iter().map(|h| h.grant).collect())
        })
    }

    /// Current grants on one resource (any kind), sorted by id.
    pub fn grants_on(&self, connector: &str, resource_id: &str) -> Result<Vec<HeldGrant>, StoreError> {
        self.read(|c| {
            let mut stmt = c.prepare_cached(&format!(
                "{HELD_SELECT} WHERE c.connector = ?1 AND g.resource_id = ?2 ORDER BY g.id"
            ))?;
            let rows = stmt.query_map(params![connector, resource_id], held_row)?;
            collect_held(rows)
        })
    }

    /// Current grants of one entitlement slug on one resource (the owners
    /// of a workspace, the members of a group), sorted by id.
    pub fn grants_on_with_slug(
        &self,
        connector: &str,
        resource_id: &str,
        slug: &str,
    ) -> Result<Vec<HeldGrant>, StoreError> {
        self.read(|c| {
            let mut stmt = c.prepare_cached(&format!(
                "{HELD_SELECT} WHERE c.connector = ?1 AND g.resource_id = ?2 AND g.slug = ?3 ORDER BY g.id"
            ))?;
            let rows = stmt.query_map(params![connector, resource_id, slug], held_row)?;
            collect_held(rows)
        })
    }

    /// Current grants held by one principal (user or group id), sorted by id.
    pub fn grants_held_by(&self, connector: &str, principal_id: &str) -> Result<Vec<HeldGrant>, StoreError> {
        self.read(|c| {
            let mut stmt = c.prepare_cached(&format!(
                "{HELD_SELECT} WHERE c.connector = ?1 AND g.principal_id = ?2 ORDER BY g.id"
            ))?;
            let rows = stmt.query_map(params![connector, principal_id], held_row)?;
            collect_held(rows)
        })
    }

    /// Row counts of the current generation (zeros if none).
    pub fn counts(&self, connector: &str, kind: SyncKind) -> Result<Counts, StoreError> {
        self.read(|c| {
            let row = c
                .query_row(
                    "SELECT g.resources, g.entitlements, g.grants FROM current c
                     JOIN generations g ON g.id = c.generation WHERE c.connector = ?1 AND c.kind = ?2",
                    params![connector, kind.as_str()],
                    |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?, r.get::<_, i64>(2)?)),
                )
                .optional()?;
            Ok(row
                .map(|(r, e, g)| Counts {
                    resources: to_u64(r),
                    entitlements: to_u64(e),
                    grants: to_u64(g),
                })
                .unwrap_or_default())
        })
    }

    /// Grants added and removed going from generation `from` to `to` (both
    /// kept generations of `(connector, kind)`).
    pub fn diff_grants(
        &self,
        connector: &str,
        kind: SyncKind,
        from: Generation,
        to: Generation,
    ) -> Result<GrantDiff, StoreError> {
        self.read(|c| {
            check_generation(c, connector, kind, from)?;
            check_generation(c, connector, kind, to)?;
            let mut stmt = c.prepare_cached(
                "SELECT g.id, g.entitlement_id, g.principal_type, g.principal_id, g.unknown_principal
                 FROM grants g WHERE g.generation = ?1
                   AND NOT EXISTS (SELECT 1 FROM grants h WHERE h.generation = ?2 AND h.id = g.id)
                 ORDER BY g.id",
            )?;
            let added = collect_grants(stmt.query_map(params![to, from], grant_row)?)?;
            let removed = collect_grants(stmt.query_map(params![from, to], grant_row)?)?;
            Ok(GrantDiff {
                from,
                to,
                added,
                removed,
            })
        })
    }

    /// The newest `limit` runs of `connector`, all kinds, newest first.
    pub fn runs(&self, connector: &str, limit: usize) -> Result<Vec<SyncRun>, StoreError> {
        self.runs_filtered(connector, None, limit)
    }

    /// The newest `limit` runs of one `(connector, kind)`, newest first
    /// (status reporting: last start/end, duration, requests, last error).
    pub fn runs_of_kind(&self, connector: &str, kind: SyncKind, limit: usize) -> Result<Vec<SyncRun>, StoreError> {
        self.runs_filtered(connector, Some(kind), limit)
    }

    fn runs_filtered(&self, connector: &str, kind: Option<SyncKind>, limit: usize) -> Result<Vec<SyncRun>, StoreError> {
        self.read(|c| {
            let mut stmt = c.prepare_cached(&format!(
                "{RUN_SELECT} WHERE connector = ?1 AND (?3 IS NULL OR kind = ?3) ORDER BY id DESC LIMIT ?2"
            ))?;
            let kind = kind.map(SyncKind::as_str);
            let rows = stmt.query_map(params![connector, to_i64(limit), kind], run_row)?;
            rows.map(|row| row?.into_run()).collect()
        })
    }

    /// Provisioning: replaces the grants on one resource in the CURRENT
    /// generation of `(connector, kind)`, in place and in one transaction,
    /// without a full sync. Every grant must be of an entitlement of that
    /// resource. The next sync's generation supersedes this.
    pub fn replace_resource_grants(
        &self,
        connector: &str,
        kind: SyncKind,
        resource_id: &str,
        grants: &[Grant],
    ) -> Result<(), StoreError> {
        self.write(|tx| {
            let generation = current_of(tx, connector, kind)?.ok_or_else(|| StoreError::NoCurrentGeneration {
                connector: connector.to_owned(),
                kind,
            })?;
            let exists: bool = tx.query_row(
                "SELECT EXISTS (SELECT 1 FROM resources WHERE generation = ?1 AND id = ?2)",
                params![generation, resource_id],
                |r| r.get(0),
            )?;
            if !exists {
                return Err(StoreError::UnknownResource {
                    connector: connector.to_owned(),
                    kind,
                    resource_id: resource_id.to_owned(),
                });
            }
            let mut stmt =
                tx.prepare_cached("SELECT id, slug FROM entitlements WHERE generation = ?1 AND resource_id = ?2")?;
            let ents = stmt
                .query_map(params![generation, resource_id], |r| {
                    Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
                })?
                .collect::<Result<Vec<_>, _>>()?;
            let slugs: HashMap<&str, (&str, &str)> = ents
                .iter()
                .map(|(id, slug)| (id.as_str(), (resource_id, slug.as_str())))
                .collect();
            let grants = dedup(grants, |g| &g.id);
            for g in &grants {
                if !slugs.contains_key(g.entitlement_id.as_str()) {
                    return Err(StoreError::InvalidBatch {
                        kind,
                        reason: format!(
                            "grant {} is of entitlement {}, which is not an entitlement of resource {resource_id}",
                            g.id, g.entitlement_id
                        ),
                    });
                }
            }
            let removed = tx.execute(
                "DELETE FROM grants WHERE generation = ?1 AND resource_id = ?2",
                params![generation, resource_id],
            )?;
            insert_grants(tx, generation, &grants, &slugs)?;
            tx.execute(
                "UPDATE generations SET grants = grants - ?2 + ?3 WHERE id = ?1",
                params![generation, to_i64(removed), to_i64(grants.len())],
            )?;
            Ok(())
        })
    }

    /// Removes everything of `connector`: generations, data, runs. Idempotent.
    pub fn delete_connector(&self, connector: &str) -> Result<(), StoreError> {
        self.write(|tx| {
            tx.execute("DELETE FROM current WHERE connector = ?1", params![connector])?;
            let gens = {
                let mut stmt = tx.prepare_cached("SELECT id FROM generations WHERE connector = ?1")?;
                stmt.query_map(params![connector], |r| r.get::<_, i64>(0))?
                    .collect::<Result<Vec<_>, _>>()?
            };
            for g in gens {
                delete_generation(tx, g)?;
            }
            tx.execute("DELETE FROM runs WHERE connector = ?1", params![connector])?;
            Ok(())
        })
    }

    /// Connectors with any runs or data, sorted.
    pub fn connectors(&self) -> Result<Vec<String>, StoreError> {
        self.read(|c| {
            let mut stmt =
                c.prepare_cached("SELECT connector FROM runs UNION SELECT connector FROM generations ORDER BY 1")?;
            let rows = stmt.query_map([], |r| r.get::<_, String>(0))?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
    }
}

const RUN_SELECT: &str = "SELECT id, connector, kind, status, started_at, finished_at, error, requests,
        resources, entitlements, grants, generation, workspaces, resumed_from, data_from FROM runs";

/// One `runs` row as SQLite gives it.
struct RawRun {
    id: i64,
    connector: String,
    kind: String,
    status: String,
    started_at: i64,
    finished_at: Option<i64>,
    error: Option<String>,
    requests: i64,
    counts: (Option<i64>, Option<i64>, Option<i64>),
    generation: Option<i64>,
    workspaces: Option<String>,
    resumed_from: Option<i64>,
    data_from: Option<i64>,
}

fn run_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<RawRun> {
    Ok(RawRun {
        id: r.get(0)?,
        connector: r.get(1)?,
        kind: r.get(2)?,
        status: r.get(3)?,
        started_at: r.get(4)?,
        finished_at: r.get(5)?,
        error: r.get(6)?,
        requests: r.get(7)?,
        counts: (r.get(8)?, r.get(9)?, r.get(10)?),
        generation: r.get(11)?,
        workspaces: r.get(12)?,
        resumed_from: r.get(13)?,
        data_from: r.get(14)?,
    })
}

impl RawRun {
    fn into_run(self) -> Result<SyncRun, StoreError> {
        let status = RunStatus::parse(&self.status)?;
        let workspaces = parse_workspaces(self.workspaces.as_deref())?;
        Ok(SyncRun {
            id: self.id,
            kind: parse_kind(&self.kind)?,
            connector: self.connector,
            status,
            started_at: self.started_at,
            finished_at: self.finished_at,
            duration_ms: self.finished_at.map(|f| to_u64(f - self.started_at)),
            error: self.error,
            requests: to_u64(self.requests),
            counts: match (status, self.counts) {
                (RunStatus::Ok, (Some(r), Some(e), Some(g))) => Some(Counts {
                    resources: to_u64(r),
                    entitlements: to_u64(e),
                    grants: to_u64(g),
                }),
                _ => None,
            },
            generation: self.generation,
            workspaces,
            resumed_from: self.resumed_from,
            data_from: self.data_from.unwrap_or(self.started_at),
        })
    }
}

fn parse_workspaces(text: Option<&str>) -> Result<Option<Vec<String>>, StoreError> {
    text.map(|t| serde_json::from_str(t).map_err(|e| StoreError::Corrupt(format!("run workspaces: {e}"))))
        .transpose()
}

fn workspaces_text(workspaces: &Option<Vec<String>>) -> Option<String> {
    workspaces.as_ref().map(|w| {
        let mut w = w.clone();
        w.sort();
        w.dedup();
        serde_json::Value::from(w).to_string()
    })
}

/// Who owns a running run: `host:pid`, so a later open on the same host can
/// tell a run whose process is gone from one still going.
fn process_owner() -> String {
    format!("{}:{}", host_name(), std::process::id())
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .or_else(|_| std::env::var("HOSTNAME"))
        .unwrap_or_default()
}

/// Whether a run's owner is a process known to be gone: on this host, and no
/// such pid (Linux `/proc`). Unknown owners (another host, no `/proc`) are
/// assumed alive; the operator closes those at startup instead.
fn owner_is_gone(owner: Option<&str>) -> bool {
    let Some((host, pid)) = owner.and_then(|o| o.rsplit_once(':')) else {
        return false;
    };
    if host != host_name() || !Path::new("/proc/self").exists() {
        return false;
    }
    match pid.parse::<u32>() {
        Ok(pid) => pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists(),
        Err(_) => false,
    }
}

// Long: one transaction's steps (generation row, batch inserts, scope
// carry-over, switch, prune) must stay in this order.
/// The body of [`Store::commit_run`], inside its transaction.
fn commit_tx(
    tx: &Connection,
    run: RunId,
    batch: &SyncBatch,
    requests: u64,
    keep: usize,
) -> Result<Generation, StoreError> {
    let (connector, kind, started_at) = running_run(tx, run)?;
    let scope: Option<String> =
        tx.query_row("SELECT workspaces FROM runs WHERE id = ?1", params![run], |r| r.get(0))?;
    let merged;
    let batch = match parse_workspaces(scope.as_deref())? {
        Some(scope) => match current_of(tx, &connector, kind)? {
            Some(previous) => {
                let previous = generation_batch(tx, kind, previous)?;
                merged = keep_outside_scope(previous, batch, &scope.into_iter().collect());
                &merged
            }
            None => batch,
        },
        None => batch,
    };
    let valid = validate_batch(kind, batch)?;
    let now = now_ms();
    tx.execute(
        "INSERT INTO generations (connector, kind, run_id, committed_at) VALUES (?1, ?2, ?3, ?4)",
        params![connector, kind.as_str(), run, now],
    )?;
    let generation = tx.last_insert_rowid();
    {
        let mut stmt = tx.prepare_cached(
            "INSERT INTO resources (generation, id, display_name, parent_id, profile) VALUES (?1, ?2, ?3, ?4, ?5)",
        )?;
        for r in &valid.resources {
            let profile = serde_json::to_string(&r.profile)
                .map_err(|e| StoreError::Corrupt(format!("resource {}: profile: {e}", r.id)))?;
            stmt.execute(params![generation, r.id, r.display_name, r.parent_id, profile])?;
        }
        let mut stmt = tx.prepare_cached(
            "INSERT INTO entitlements (generation, id, resource_id, slug, display_name) VALUES (?1, ?2, ?3, ?4, ?5)",
        )?;
        for e in &valid.entitlements {
            stmt.execute(params![generation, e.id, e.resource_id, e.slug, e.display_name])?;
        }
    }
    let slugs: HashMap<&str, (&str, &str)> = valid
        .entitlements
        .iter()
        .map(|e| (e.id.as_str(), (e.resource_id.as_str(), e.slug.as_str())))
        .collect();
    insert_grants(tx, generation, &valid.grants, &slugs)?;
    let counts = Counts {
        resources: valid.resources.len() as u64,
        entitlements: valid.entitlements.len() as u64,
        grants: valid.grants.len() as u64,
    };
    tx.execute(
        "UPDATE generations SET resources = ?2, entitlements = ?3, grants = ?4 WHERE id = ?1",
        params![
            generation,
            to_i64(valid.resources.len()),
            to_i64(valid.entitlements.len()),
            to_i64(valid.grants.len())
        ],
    )?;
    tx.execute(
        "INSERT INTO current (connector, kind, generation) VALUES (?1, ?2, ?3)
             ON CONFLICT (connector, kind) DO UPDATE SET generation = excluded.generation",
        params![connector, kind.as_str(), generation],
    )?;
    tx.execute(
        "UPDATE runs SET status = 'ok', finished_at = ?2, requests = ?3, resources = ?4,
               entitlements = ?5, grants = ?6, generation = ?7, error = NULL WHERE id = ?1",
        params![
            run,
            now.max(started_at),
            requests as i64,
            counts.resources as i64,
            counts.entitlements as i64,
            counts.grants as i64,
            generation
        ],
    )?;
    tx.execute("DELETE FROM checkpoints WHERE run_id = ?1", params![run])?;
    prune_generations(tx, &connector, kind, keep)?;
    prune_runs(tx, &connector, kind)?;
    tracing::debug!(run, connector, %kind, generation, ?counts, "generation committed");
    Ok(generation)
}

/// The workspaces a resource belongs to: itself for a workspace, its
/// parent for groups, projects and repositories, its memberships for users.
fn resource_workspaces(r: &Resource) -> Vec<&str> {
    match (&r.profile, &r.parent_id) {
        (Profile::Workspace(_), _) => vec![r.id.as_str()],
        (Profile::User(u), _) => u.workspaces.iter().map(String::as_str).collect(),
        (_, Some(parent)) => vec![parent.as_str()],
        (_, None) => Vec::new(),
    }
}

/// A scoped run's batch plus what of `previous` lies outside `scope`: the
/// run replaces only its workspaces' data. A user who is also a member of
/// workspaces outside the scope stays, with those memberships.
fn keep_outside_scope(previous: SyncBatch, batch: &SyncBatch, scope: &HashSet<String>) -> SyncBatch {
    let mut merged = batch.clone();
    let fresh: HashMap<&str, usize> = batch
        .resources
        .iter()
        .enumerate()
        .map(|(i, r)| (r.id.as_str(), i))
        .collect();
    let mut kept: HashSet<String> = HashSet::new();
    for mut r in previous.resources {
        let outside: Vec<String> = resource_workspaces(&r)
            .into_iter()
            .filter(|w| !scope.contains(*w))
            .map(str::to_owned)
            .collect();
        if outside.is_empty() {
            continue;
        }
        match (fresh.get(r.id.as_str()), &mut r.profile) {
            (Some(&i), Profile::User(_)) => {
                if let Profile::User(user) = &mut merged.resources[i].profile {
                    user.workspaces.extend(outside);
                    user.workspaces.sort();
                    user.workspaces.dedup();
                }
            }
            (Some(_), _) => {}
            (None, profile) => {
                if let Profile::User(user) = profile {
                    user.workspaces = outside;
                }
                kept.insert(r.id.clone());
                merged.resources.push(r);
            }
        }
    }
    merged.entitlements.extend(
        previous
            .entitlements
            .into_iter()
            .filter(|e| kept.contains(&e.resource_id)),
    );
    let kept_entitlements: HashSet<&str> = merged
        .entitlements
        .iter()
        .filter(|e| kept.contains(&e.resource_id))
        .map(|e| e.id.as_str())
        .collect();
    let carried: Vec<Grant> = previous
        .grants
        .into_iter()
        .filter(|g| kept_entitlements.contains(g.entitlement_id.as_str()))
        .collect();
    merged.grants.extend(carried);
    merged
}

/// The kind whose generations hold resources of `t`.
fn kind_of(t: ResourceType) -> SyncKind {
    match t {
        ResourceType::User => SyncKind::Accounts,
        ResourceType::Workspace => SyncKind::Workspaces,
        ResourceType::UserGroup => SyncKind::Groups,
        ResourceType::Project => SyncKind::Projects,
        ResourceType::Repository => SyncKind::Repositories,
    }
}

fn parse_kind(s: &str) -> Result<SyncKind, StoreError> {
    SyncKind::parse(s).ok_or_else(|| StoreError::Corrupt(format!("unknown sync kind {s:?}")))
}

fn parse_type(s: &str) -> Result<ResourceType, StoreError> {
    ResourceType::parse(s).ok_or_else(|| StoreError::Corrupt(format!("unknown resource type {s:?}")))
}

/// The run a new run of `(connector, kind)` over `workspaces` may resume:
/// the newest one, if it failed or was interrupted, has checkpoints and has
/// the same scope. Returns `(id, data_from)`.
fn resumable_run(
    tx: &Connection,
    connector: &str,
    kind: SyncKind,
    workspaces: Option<&str>,
) -> Result<Option<(RunId, i64)>, StoreError> {
    let newest = tx
        .prepare_cached(
            "SELECT id, status, workspaces, coalesce(data_from, started_at),
                    EXISTS (SELECT 1 FROM checkpoints k WHERE k.run_id = runs.id)
             FROM runs WHERE connector = ?1 AND kind = ?2 AND status != 'running' ORDER BY id DESC LIMIT 1",
        )?
        .query_row(params![connector, kind.as_str()], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, Option<String>>(2)?,
                r.get::<_, i64>(3)?,
                r.get::<_, bool>(4)?,
            ))
        })
        .optional()?;
    Ok(match newest {
        Some((id, status, scope, from, true)) if status != "ok" && scope.as_deref() == workspaces => Some((id, from)),
        _ => None,
    })
}

/// Loads a run and checks it is running: `(connector, kind, started_at)`.
fn running_run(tx: &Connection, run: RunId) -> Result<(String, SyncKind, i64), StoreError> {
    let row = tx
        .query_row(
            "SELECT connector, kind, status, started_at FROM runs WHERE id = ?1",
            params![run],
            |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, i64>(3)?,
                ))
            },
        )
        .optional()?;
    let (connector, kind, status, started_at) = row.ok_or(StoreError::UnknownRun(run))?;
    let status = RunStatus::parse(&status)?;
    if status != RunStatus::Running {
        return Err(StoreError::RunNotRunning { run, status });
    }
    Ok((connector, parse_kind(&kind)?, started_at))
}

fn current_of(c: &Connection, connector: &str, kind: SyncKind) -> Result<Option<Generation>, StoreError> {
    Ok(
        c.prepare_cached("SELECT generation FROM current WHERE connector = ?1 AND kind = ?2")?
            .query_row(params![connector, kind.as_str()], |r| r.get(0))
            .optional()?,
    )
}

fn check_generation(c: &Connection, connector: &str, kind: SyncKind, generation: Generation) -> Result<(), StoreError> {
    let ok: bool = c.query_row(
        "SELECT EXISTS (SELECT 1 FROM generations WHERE id = ?1 AND connector = ?2 AND kind = ?3)",
        params![generation, connector, kind.as_str()],
        |r| r.get(0),
    )?;
    if ok {
        Ok(())
    } else {
        Err(StoreError::UnknownGeneration {
            connector: connector.to_owned(),
            kind,
            generation,
        })
    }
}

fn generation_batch(c: &Connection, kind: SyncKind, generation: Generation) -> Result<SyncBatch, StoreError> {
    let t = kind.resource_type();
    let mut stmt = c.prepare_cached(
        "SELECT ?2, id, display_name, parent_id, profile FROM resources WHERE generation = ?1 ORDER BY id",
    )?;
    let resources = collect_resources(stmt.query_map(params![generation, kind.as_str()], resource_row)?)?;
    let mut stmt = c.prepare_cached(
        "SELECT id, resource_id, slug, display_name FROM entitlements WHERE generation = ?1 ORDER BY id",
    )?;
    let entitlements = stmt
        .query_map(params![generation], |r| {
            Ok(Entitlement {
                id: r.get(0)?,
                resource_type: t,
                resource_id: r.get(1)?,
                slug: r.get(2)?,
                display_name: r.get(3)?,
            })
        })?
        .collect::<Result<Vec<_>, _>>()?;
    let mut stmt = c.prepare_cached(
        "SELECT id, entitlement_id, principal_type, principal_id, unknown_principal
         FROM grants WHERE generation = ?1 ORDER BY id",
    )?;
    let grants = collect_grants(stmt.query_map(params![generation], grant_row)?)?;
    Ok(SyncBatch {
        resources,
        entitlements,
        grants,
    })
}

type RawResource = (String, String, String, Option<String>, String);

fn resource_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<RawResource> {
    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
}

fn collect_resources(rows: impl Iterator<Item = rusqlite::Result<RawResource>>) -> Result<Vec<Resource>, StoreError> {
    rows.map(|row| {
        let (kind, id, display_name, parent_id, profile) = row?;
        let resource_type = parse_kind(&kind)?.resource_type();
        let profile = Profile::from_json(resource_type, &profile)
            .map_err(|e| StoreError::Corrupt(format!("resource {id}: unreadable profile: {e}")))?;
        Ok(Resource {
            resource_type,
            id,
            display_name,
            parent_id,
            profile,
        })
    })
    .collect()
}

type RawGrant = (String, String, String, String, bool);

fn grant_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<RawGrant> {
    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
}

fn collect_grants(rows: impl Iterator<Item = rusqlite::Result<RawGrant>>) -> Result<Vec<Grant>, StoreError> {
    rows.map(|row| {
        let (id, entitlement_id, principal_type, principal_id, unknown_principal) = row?;
        Ok(Grant {
            id,
            entitlement_id,
            principal_type: parse_type(&principal_type)?,
            principal_id,
            unknown_principal,
        })
    })
    .collect()
}

const HELD_SELECT: &str = "SELECT c.kind, g.resource_id, g.slug, g.id, g.entitlement_id, g.principal_type,
        g.principal_id, g.unknown_principal
 FROM current c JOIN grants g ON g.generation = c.generation";

type RawHeld = (String, String, String, String, String, String, String, bool);

fn held_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<RawHeld> {
    Ok((
        r.get(0)?,
        r.get(1)?,
        r.get(2)?,
        r.get(3)?,
        r.get(4)?,
        r.get(5)?,
        r.get(6)?,
        r.get(7)?,
    ))
}

fn collect_held(rows: impl Iterator<Item = rusqlite::Result<RawHeld>>) -> Result<Vec<HeldGrant>, StoreError> {
    rows.map(|row| {
        let (kind, resource_id, slug, id, entitlement_id, principal_type, principal_id, unknown_principal) = row?;
        Ok(HeldGrant {
            grant: Grant {
                id,
                entitlement_id,
                principal_type: parse_type(&principal_type)?,
                principal_id,
                unknown_principal,
            },
            resource_type: parse_kind(&kind)?.resource_type(),
            resource_id,
            slug,
        })
    })
    .collect()
}

fn insert_grants(
    tx: &Connection,
    generation: Generation,
    grants: &[&Grant],
    entitlements: &HashMap<&str, (&str, &str)>,
) -> Result<(), StoreError> {
    let mut stmt = tx.prepare_cached(
        "INSERT INTO grants (generation, id, entitlement_id, resource_id, slug, principal_type, principal_id, unknown_principal)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
    )?;
    for g in grants {
        let (resource_id, slug) = entitlements
            .get(g.entitlement_id.as_str())
            .copied()
            .ok_or_else(|| StoreError::Corrupt(format!("grant {} lost its entitlement", g.id)))?;
        stmt.execute(params![
            generation,
            g.id,
            g.entitlement_id,
            resource_id,
            slug,
            g.principal_type.as_str(),
            g.principal_id,
            g.unknown_principal
        ])?;
    }
    Ok(())
}

/// Keeps the last occurrence of each id, in first-seen order.
fn dedup<'a, T>(items: &'a [T], id: impl Fn(&'a T) -> &'a str) -> Vec<&'a T> {
    let mut last: HashMap<&str, usize> = HashMap::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        last.insert(id(item), i);
    }
    if last.len() == items.len() {
        return items.iter().collect();
    }
    let mut seen = HashSet::with_capacity(last.len());
    let mut out = Vec::with_capacity(last.len());
    for item in items {
        let key = id(item);
        if seen.insert(key) {
            out.push(&items[last[key]]);
        }
    }
    out
}

struct ValidBatch<'a> {
    resources: Vec<&'a Resource>,
    entitlements: Vec<&'a Entitlement>,
    grants: Vec<&'a Grant>,
}

fn validate_batch(kind: SyncKind, batch: &SyncBatch) -> Result<ValidBatch<'_>, StoreError> {
    let t = kind.resource_type();
    let invalid = |reason: String| StoreError::InvalidBatch { kind, reason };
    let resources = dedup(&batch.resources, |r| &r.id);
    let entitlements = dedup(&batch.entitlements, |e| &e.id);
    let grants = dedup(&batch.grants, |g| &g.id);
    let ids: HashSet<&str> = resources.iter().map(|r| r.id.as_str()).collect();
    for r in &resources {
        if r.resource_type != t || r.profile.resource_type() != t {
            return Err(invalid(format!(
                "resource {} is a {} with a {} profile, not a {t}",
                r.id,
                r.resource_type,
                r.profile.resource_type()
            )));
        }
    }
    for e in &entitlements {
        if e.resource_type != t {
            return Err(invalid(format!(
                "entitlement {} is on a {}, not a {t}",
                e.id, e.resource_type
            )));
        }
        if !ids.contains(e.resource_id.as_str()) {
            return Err(invalid(format!(
                "entitlement {} is on resource {}, which is not in the batch",
                e.id, e.resource_id
            )));
        }
    }
    let ents: HashSet<&str> = entitlements.iter().map(|e| e.id.as_str()).collect();
    for g in &grants {
        if !ents.contains(g.entitlement_id.as_str()) {
            return Err(invalid(format!(
                "grant {} is of entitlement {}, which is not in the batch",
                g.id, g.entitlement_id
            )));
        }
    }
    // Inserting in key order fills B-tree pages sequentially: much faster
    // for big batches than random order.
    let (mut resources, mut entitlements, mut grants) = (resources, entitlements, grants);
    resources.sort_unstable_by(|a, b| a.id.cmp(&b.id));
    entitlements.sort_unstable_by(|a, b| a.id.cmp(&b.id));
    grants.sort_unstable_by(|a, b| a.id.cmp(&b.id));
    Ok(ValidBatch {
        resources,
        entitlements,
        grants,
    })
}

fn delete_generation(tx: &Connection, generation: Generation) -> Result<(), StoreError> {
    for sql in [
        "DELETE FROM grants WHERE generation = ?1",
        "DELETE FROM entitlements WHERE generation = ?1",
        "DELETE FROM resources WHERE generation = ?1",
        "DELETE FROM generations WHERE id = ?1",
    ] {
        tx.prepare_cached(sql)?.execute(params![generation])?;
    }
    Ok(())
}

fn prune_generations(tx: &Connection, connector: &str, kind: SyncKind, keep: usize) -> Result<(), StoreError> {
    let old = tx
        .prepare_cached(
            "SELECT id FROM generations WHERE connector = ?1 AND kind = ?2
               AND id NOT IN (SELECT generation FROM current)
             ORDER BY id DESC LIMIT -1 OFFSET ?3",
        )?
        .query_map(params![connector, kind.as_str(), to_i64(keep.max(1) - 1)], |r| {
            r.get::<_, i64>(0)
        })?
        .collect::<Result<Vec<_>, _>>()?;
    for g in old {
        delete_generation(tx, g)?;
        tracing::debug!(connector, %kind, generation = g, "generation pruned");
    }
    Ok(())
}

fn prune_runs(tx: &Connection, connector: &str, kind: SyncKind) -> Result<(), StoreError> {
    tx.prepare_cached(
        "DELETE FROM runs WHERE connector = ?1 AND kind = ?2 AND status != 'running'
           AND id NOT IN (SELECT id FROM runs WHERE connector = ?1 AND kind = ?2 AND status != 'running'
                          ORDER BY id DESC LIMIT ?3)
           AND id NOT IN (SELECT run_id FROM generations WHERE run_id IS NOT NULL)",
    )?
    .execute(params![connector, kind.as_str(), to_i64(RUN_HISTORY)])?;
    Ok(())
}

/// Formats Unix epoch milliseconds as RFC 3339 UTC (`2024-05-01T12:00:00.000Z`).
pub fn format_timestamp(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let millis = ms.rem_euclid(1000);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Grant, repository_id};

    fn batch(tag: &str, n: usize) -> SyncBatch {
        let mut b = SyncBatch::default();
        for i in 0..n {
            let id = repository_id("{w}", "{p}", "P", &format!("{{r{i}}}"));
            b.resources.push(Resource {
                resource_type: ResourceType::Repository,
                id: id.clone(),
                display_name: format!("{tag}{i}"),
                parent_id: Some("{w}".into()),
                profile: Profile::Repository(crate::model::RepositoryProfile {
                    name: tag.to_owned(),
                    ..Default::default()
                }),
            });
            let e = Entitlement::new(ResourceType::Repository, &id, "read", "read".into());
            b.grants
                .push(Grant::new(&e, ResourceType::User, &format!("{{u-{tag}}}")));
            b.entitlements.push(e);
        }
        b
    }

    #[test]
    fn store_is_send_sync_and_clones_share_data() {
        fn assert_send_sync<T: Send + Sync + Clone + 'static>() {}
        assert_send_sync::<Store>();
        let a = Store::open_in_memory().unwrap();
        let b = a.clone().with_history(2);
        let run = a.start_run("c", SyncKind::Repositories).unwrap();
        a.commit_run(run, &batch("x", 1), 0).unwrap();
        assert_eq!(b.counts("c", SyncKind::Repositories).unwrap().resources, 1);
        assert_eq!(a.history(), 2);
    }

    #[test]
    fn a_commit_interrupted_after_writing_everything_leaves_no_trace() {
        let store = Store::open_in_memory().unwrap().with_history(1);
        let run = store.start_run("c", SyncKind::Repositories).unwrap();
        let first = batch("first", 3);
        let g1 = store.commit_run(run, &first, 1).unwrap();
        let run = store.start_run("c", SyncKind::Repositories).unwrap();
        // The whole commit (insert, switch, prune of g1) runs, then the
        // transaction dies before COMMIT.
        let err = store
            .write(|tx| {
                commit_tx(tx, run, &batch("second", 5), 2, 1)?;
                Err::<(), _>(StoreError::Corrupt("injected crash".into()))
            })
            .unwrap_err();
        assert!(err.to_string().contains("injected crash"));
        assert_eq!(store.current_generation("c", SyncKind::Repositories).unwrap(), Some(g1));
        assert_eq!(store.batch("c", SyncKind::Repositories).unwrap(), first);
        assert_eq!(store.generations("c", SyncKind::Repositories).unwrap().len(), 1);
        let runs = store.runs("c", 1).unwrap();
        assert_eq!((runs[0].id, runs[0].status), (run, RunStatus::Running));
        // The run can still commit.
        let g2 = store.commit_run(run, &batch("second", 5), 2).unwrap();
        assert!(g2 > g1);
        assert_eq!(store.generations("c", SyncKind::Repositories).unwrap().len(), 1);
    }

    #[test]
    fn repeated_ids_in_a_batch_are_stored_once_last_wins() {
        let store = Store::open_in_memory().unwrap();
        let mut b = batch("x", 2);
        let mut again = b.resources[0].clone();
        again.display_name = "renamed".into();
        b.resources.push(again);
        b.grants.push(b.grants[1].clone());
        let run = store.start_run("c", SyncKind::Repositories).unwrap();
        store.commit_run(run, &b, 0).unwrap();
        let stored = store.batch("c", SyncKind::Repositories).unwrap();
        assert_eq!(stored.resources.len(), 2);
        assert_eq!(stored.grants.len(), 2);
        assert!(stored.resources.iter().any(|r| r.display_name == "renamed"));
        let c = store.counts("c", SyncKind::Repositories).unwrap();
        assert_eq!((c.resources, c.entitlements, c.grants), (2, 2, 2));
    }

    #[test]
    fn run_history_is_bounded_but_keeps_runs_of_kept_generations() {
        let store = Store::open_in_memory().unwrap();
        let run = store.start_run("c", SyncKind::Groups).unwrap();
        store.commit_run(run, &SyncBatch::default(), 0).unwrap();
        for i in 0..(RUN_HISTORY + 10) {
            let r = store.start_run("c", SyncKind::Groups).unwrap();
            store.fail_run(r, &format!("failure {i}"), 0).unwrap();
        }
        let runs = store.runs_of_kind("c", SyncKind::Groups, 1000).unwrap();
        assert_eq!(runs.len(), RUN_HISTORY + 1);
        assert_eq!(runs.last().unwrap().id, run);
        assert!(store.runs_of_kind("c", SyncKind::Projects, 10).unwrap().is_empty());
    }

    #[test]
    fn a_newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        drop(Store::open(&path).unwrap());
        {
            let c = Connection::open(&path).unwrap();
            let (app, version): (i64, i64) = (
                c.pragma_query_value(None, "application_id", |r| r.get(0)).unwrap(),
                c.pragma_query_value(None, "user_version", |r| r.get(0)).unwrap(),
            );
            assert_eq!((app, version), (APPLICATION_ID, SCHEMA_VERSION));
            c.pragma_update(None, "user_version", 99).unwrap();
        }
        let err = Store::open(&path).unwrap_err();
        assert!(matches!(err, StoreError::TooNew { found: 99, .. }), "{err}");
        assert!(err.to_string().contains("upgrade"), "{err}");
    }

    #[test]
    fn an_unopenable_path_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("no-such-dir").join("s.db");
        let err = Store::open(&path).unwrap_err();
        assert!(matches!(err, StoreError::CannotOpen { .. }), "{err:?}");
        assert!(err.to_string().contains("no-such-dir"), "{err}");
    }

    #[test]
    fn timestamps_format_as_rfc3339() {
        assert_eq!(format_timestamp(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(format_timestamp(1_700_000_000_123), "2023-11-14T22:13:20.123Z");
        assert_eq!(format_timestamp(951_782_400_000), "2000-02-29T00:00:00.000Z");
    }
}
