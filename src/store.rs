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
//!
//! Layout: this file holds the handle, opening, connection handling, errors
//! and the readers' queries; `schema` the SQL of each version and the
//! migrations; `runs` the run records; `checkpoints` resuming;
//! `generations` writing, switching and comparing generations; `intent`
//! and `audit` the grant controller's records.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, ErrorCode, OpenFlags, TransactionBehavior, params};
use serde::{Deserialize, Serialize};

use crate::model::{Grant, Profile, ProfileField, Resource, ResourceType, SyncBatch, SyncKind};

mod audit;
mod checkpoints;
mod generations;
mod intent;
mod runs;
mod schema;

pub use audit::{AuditAction, AuditEntry};
pub use generations::{Counts, GenerationInfo, GrantDiff};
pub use intent::{ChangeOperation, Intent, IntentState, NewIntent};
pub use runs::{Freshness, RUN_HISTORY, RunOptions, RunStatus, StartedRun, SyncRun, WorkspaceFreshness};
pub use schema::{APPLICATION_ID, SCHEMA_VERSION};

use generations::{current_of, delete_generation, generation_batch};
use schema::{check_identity, create_read_indexes, has_interval_column, has_read_indexes, migrate};

/// Id of a sync run (`runs.id`).
pub type RunId = i64;
/// Id of a generation (`generations.id`), unique across the whole file.
pub type Generation = i64;

/// Generations kept per `(connector, kind)` unless [`Store::with_history`] says otherwise.
pub const DEFAULT_HISTORY: usize = 5;
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
    /// The file has [`READ_INDEXES`](schema::READ_INDEXES): lookups may rely on them.
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

/// How much of the store file a reader maps into memory.
const READER_MMAP_BYTES: i64 = 256 * 1024 * 1024;

/// A repository as an answer names it (see
/// [`Store::repository_names_in_workspaces`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepositoryName {
    pub id: String,
    /// `workspace/slug`, which is also the repository's display name.
    pub full_name: String,
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
    // Read pages straight from a read-only mapping instead of copying each
    // into the page cache: a query answering thousands of rows (a workspace
    // owner's `access-of`) spent a third of its time there. Safe because
    // the writer never shrinks the main file (no VACUUM, no auto_vacuum).
    conn.pragma_update(None, "mmap_size", READER_MMAP_BYTES)?;
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

    /// The current generation's data of `(connector, kind)`, each list
    /// sorted by id; empty if nothing was committed yet.
    pub fn batch(&self, connector: &str, kind: SyncKind) -> Result<SyncBatch, StoreError> {
        self.read(|c| match current_of(c, connector, kind)? {
            Some(g) => generation_batch(c, kind, g),
            None => Ok(SyncBatch::default()),
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

    /// Id and full name of the current repositories in one of `workspaces`,
    /// in no particular order: what a workspace owner's `access-of` lists
    /// for each of thousands of repositories. The sync stores a repository's
    /// full name as its display name (`sync::syncers`), so both come from
    /// the `resources_names_by_parent` index alone, without reading the
    /// rows and parsing their profiles (a third of the time to answer).
    pub fn repository_names_in_workspaces(
        &self,
        connector: &str,
        workspaces: &[&str],
    ) -> Result<Vec<RepositoryName>, StoreError> {
        if workspaces.is_empty() {
            return Ok(Vec::new());
        }
        let workspaces = serde_json::Value::from(workspaces.to_vec()).to_string();
        // Without statistics (no ANALYZE) SQLite would rather scan the
        // generation by its primary key: name the index when it is there.
        let indexed_by = if self.indexed() {
            "INDEXED BY resources_names_by_parent"
        } else {
            ""
        };
        let sql = format!(
            "SELECT r.id, r.display_name
             FROM current c JOIN resources r {indexed_by} ON r.generation = c.generation
             WHERE c.connector = ?1 AND c.kind = ?2 AND r.parent_id IN (SELECT value FROM json_each(?3))"
        );
        self.read(|c| {
            let mut stmt = c.prepare_cached(&sql)?;
            let rows = stmt.query_map(params![connector, SyncKind::Repositories.as_str(), workspaces], |r| {
                Ok(RepositoryName {
                    id: r.get(0)?,
                    full_name: r.get(1)?,
                })
            })?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
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
    use crate::model::{Entitlement, Grant, repository_id};

    pub(super) fn batch(tag: &str, n: usize) -> SyncBatch {
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
