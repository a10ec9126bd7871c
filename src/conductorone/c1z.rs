//! The c1z v1 file ConductorOne ingests (PROTOCOL.md §2): `C1ZF\0`, then one
//! zstd frame of a SQLite database with baton-sdk's v1 tables, holding one
//! finished `full` sync run.
//!
//! The writer builds the database in a temporary file next to the output,
//! checkpoints and closes it (no WAL left behind), compresses it in one
//! frame and renames the result into place, so a reader never sees half a
//! file. The reader ([`read`]) is this project's own check of that contract:
//! the tests and the fake ConductorOne decode every blob and verify the
//! invariants the SDK's ingestion relies on ([`C1z::verify`]).

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use prost::Message;
use rusqlite::{Connection, OpenFlags, params};
use serde::Serialize;

use super::inventory::{Inventory, TypeAge};
use super::ksuid;
use super::proto::connector as pb;

/// The v1 header.
pub const MAGIC: &[u8; 5] = b"C1ZF\0";
/// The SDK reader's limits: zstd window ≤ 128 MiB, decoded size ≤ 10 GiB.
const MAX_WINDOW_LOG: u32 = 27;
pub const MAX_DECODED: u64 = 10 * 1024 * 1024 * 1024;

/// The v1 schema, column for column as baton-sdk creates it (each table has
/// an integer `id` key; object tables carry `sync_id` and `discovered_at`;
/// `(external_id, sync_id)` is unique).
const SCHEMA: &str = "
CREATE TABLE v1_resource_types (id INTEGER PRIMARY KEY, external_id TEXT NOT NULL, data BLOB NOT NULL,
  sync_id TEXT NOT NULL, discovered_at DATETIME NOT NULL);
CREATE UNIQUE INDEX idx_resource_types_external_sync_v1 ON v1_resource_types (external_id, sync_id);
CREATE TABLE v1_resources (id INTEGER PRIMARY KEY, resource_type_id TEXT NOT NULL, external_id TEXT NOT NULL,
  parent_resource_type_id TEXT, parent_resource_id TEXT, data BLOB NOT NULL, sync_id TEXT NOT NULL,
  discovered_at DATETIME NOT NULL);
CREATE INDEX idx_resources_resource_type_id_v1 ON v1_resources (resource_type_id);
CREATE INDEX idx_resources_parent_resource_id_v1 ON v1_resources (parent_resource_type_id, parent_resource_id);
CREATE UNIQUE INDEX idx_resources_external_sync_v1 ON v1_resources (external_id, sync_id);
CREATE TABLE v1_entitlements (id INTEGER PRIMARY KEY, resource_type_id TEXT NOT NULL, resource_id TEXT NOT NULL,
  external_id TEXT NOT NULL, data BLOB NOT NULL, sync_id TEXT NOT NULL, discovered_at DATETIME NOT NULL);
CREATE INDEX idx_entitlements_resource_id_v1 ON v1_entitlements (resource_type_id, resource_id);
CREATE UNIQUE INDEX idx_entitlements_external_sync_v1 ON v1_entitlements (external_id, sync_id);
CREATE TABLE v1_grants (id INTEGER PRIMARY KEY, resource_type_id TEXT NOT NULL, resource_id TEXT NOT NULL,
  entitlement_id TEXT NOT NULL, principal_resource_type_id TEXT NOT NULL, principal_resource_id TEXT NOT NULL,
  external_id TEXT NOT NULL, expansion BLOB, needs_expansion INTEGER NOT NULL DEFAULT 0, data BLOB NOT NULL,
  sync_id TEXT NOT NULL, discovered_at DATETIME NOT NULL);
CREATE INDEX idx_grants_resource_type_id_resource_id_v1 ON v1_grants (resource_type_id, resource_id);
CREATE INDEX idx_grants_principal_id_v1 ON v1_grants (principal_resource_type_id, principal_resource_id);
CREATE INDEX idx_grants_entitlement_id_principal_id_v1 ON v1_grants
  (entitlement_id, principal_resource_type_id, principal_resource_id);
CREATE UNIQUE INDEX idx_grants_external_sync_v1 ON v1_grants (external_id, sync_id);
CREATE INDEX idx_grants_entitlement_id_sync_id_id_v1 ON v1_grants (entitlement_id, sync_id, id);
CREATE TABLE v1_sync_runs (id INTEGER PRIMARY KEY, sync_id TEXT NOT NULL, started_at DATETIME NOT NULL,
  ended_at DATETIME, sync_token TEXT NOT NULL, sync_type TEXT NOT NULL DEFAULT 'full',
  parent_sync_id TEXT NOT NULL DEFAULT '', linked_sync_id TEXT NOT NULL DEFAULT '',
  supports_diff INTEGER NOT NULL DEFAULT 0, grants_backfilled INTEGER NOT NULL DEFAULT 0, stats TEXT,
  ingest_invariant_generation TEXT NOT NULL DEFAULT '', ingest_invariant_coverage TEXT NOT NULL DEFAULT '',
  ingest_invariant_mode TEXT NOT NULL DEFAULT '');
CREATE UNIQUE INDEX idx_sync_runs_sync_id_v1 ON v1_sync_runs (sync_id);
CREATE TABLE v1_assets (id INTEGER PRIMARY KEY, external_id TEXT NOT NULL, content_type TEXT NOT NULL,
  data BLOB NOT NULL, sync_id TEXT NOT NULL, discovered_at DATETIME NOT NULL);
CREATE UNIQUE INDEX idx_assets_external_sync_v1 ON v1_assets (external_id, sync_id);
CREATE TABLE v1_connector_sessions (id INTEGER PRIMARY KEY, sync_id TEXT NOT NULL, key TEXT NOT NULL,
  value BLOB NOT NULL);
CREATE UNIQUE INDEX idx_connector_sessions_sync_id_key_v1 ON v1_connector_sessions (sync_id, key);
";

/// Errors writing or reading a c1z. Messages are for people.
#[derive(Debug, thiserror::Error)]
pub enum C1zError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("c1z database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("not a c1z v1 file: {0}")]
    Format(String),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> C1zError + '_ {
    move |source| C1zError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// What a written file holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WriteSummary {
    pub sync_id: String,
    pub resource_types: usize,
    pub resources: usize,
    pub entitlements: usize,
    pub grants: usize,
    /// Size of the file written.
    pub bytes: u64,
}

/// baton-sdk's timestamp text: `YYYY-MM-DD HH:MM:SS.fffffffff`, no zone (UTC here).
pub fn sdk_timestamp(unix_ms: i64) -> String {
    let ts = jiff::Timestamp::from_millisecond(unix_ms).unwrap_or(jiff::Timestamp::UNIX_EPOCH);
    let dt = ts.to_zoned(jiff::tz::TimeZone::UTC).datetime();
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}.{:09}",
        dt.year(),
        dt.month(),
        dt.day(),
        dt.hour(),
        dt.minute(),
        dt.second(),
        dt.subsec_nanosecond()
    )
}

/// Writes `inventory` as a c1z at `out` (replacing it atomically). `now_ms`
/// is the run's start; the run ends when the rows are in.
pub fn write(inventory: &Inventory, out: &Path, now_ms: i64) -> Result<WriteSummary, C1zError> {
    let sync_id = ksuid::new_at(now_ms.div_euclid(1000));
    let db_path = sibling(out, "db");
    let packed_path = sibling(out, "part");
    let result = (|| {
        write_database(inventory, &db_path, &sync_id, now_ms)?;
        compress(&db_path, &packed_path)?;
        std::fs::rename(&packed_path, out).map_err(io_err(out))?;
        std::fs::metadata(out).map_err(io_err(out)).map(|m| m.len())
    })();
    for path in [&db_path, &packed_path] {
        let _ = std::fs::remove_file(path);
    }
    let bytes = result?;
    Ok(WriteSummary {
        sync_id,
        resource_types: inventory.resource_types.len(),
        resources: inventory.resources.len(),
        entitlements: inventory.entitlements.len(),
        grants: inventory.grants.len(),
        bytes,
    })
}

/// A temporary path next to `out`, unique to this process and call.
fn sibling(out: &Path, suffix: &str) -> PathBuf {
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let name = out.file_name().and_then(|n| n.to_str()).unwrap_or("c1z");
    out.with_file_name(format!(".{name}.{}.{n}.{suffix}", std::process::id()))
}

fn write_database(inventory: &Inventory, path: &Path, sync_id: &str, now_ms: i64) -> Result<(), C1zError> {
    let _ = std::fs::remove_file(path);
    let mut conn = Connection::open(path)?;
    // WAL like the SDK's files; checkpointed and removed on close below.
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.execute_batch(SCHEMA)?;
    let tx = conn.transaction()?;
    let started = sdk_timestamp(now_ms);
    tx.execute(
        "INSERT INTO v1_sync_runs (sync_id, started_at, ended_at, sync_token, sync_type, grants_backfilled)
         VALUES (?1, ?2, NULL, '', 'full', 1)",
        params![sync_id, started],
    )?;
    insert_rows(&tx, inventory, sync_id, &started)?;
    let ended = sdk_timestamp(jiff::Timestamp::now().as_millisecond().max(now_ms));
    tx.execute(
        "UPDATE v1_sync_runs SET ended_at = ?2, stats = ?3 WHERE sync_id = ?1",
        params![sync_id, ended, stats_json(inventory, now_ms)],
    )?;
    tx.commit()?;
    conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
    conn.pragma_update(None, "journal_mode", "DELETE")?;
    conn.close().map_err(|(_, e)| e)?;
    Ok(())
}

fn insert_rows(tx: &Connection, inv: &Inventory, sync_id: &str, started: &str) -> Result<(), C1zError> {
    let mut stmt = tx
        .prepare("INSERT INTO v1_resource_types (external_id, data, sync_id, discovered_at) VALUES (?1, ?2, ?3, ?4)")?;
    for rt in &inv.resource_types {
        stmt.execute(params![rt.id, rt.encode_to_vec(), sync_id, started])?;
    }
    let mut stmt = tx.prepare(
        "INSERT INTO v1_resources (resource_type_id, external_id, parent_resource_type_id, parent_resource_id, data,
         sync_id, discovered_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    )?;
    for row in &inv.resources {
        let r = &row.resource;
        let id = r.id.clone().unwrap_or_default();
        let parent = r.parent_resource_id.as_ref();
        stmt.execute(params![
            id.resource_type,
            resource_external_id(&id),
            parent.map(|p| p.resource_type.as_str()),
            parent.map(|p| p.resource.as_str()),
            r.encode_to_vec(),
            sync_id,
            sdk_timestamp(row.observed_at),
        ])?;
    }
    let mut stmt = tx.prepare(
        "INSERT INTO v1_entitlements (resource_type_id, resource_id, external_id, data, sync_id, discovered_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?;
    for row in &inv.entitlements {
        let e = &row.entitlement;
        let id = e.resource.as_ref().and_then(|r| r.id.clone()).unwrap_or_default();
        stmt.execute(params![
            id.resource_type,
            id.resource,
            e.id,
            e.encode_to_vec(),
            sync_id,
            sdk_timestamp(row.observed_at)
        ])?;
    }
    let mut stmt = tx.prepare(
        "INSERT INTO v1_grants (resource_type_id, resource_id, entitlement_id, principal_resource_type_id,
         principal_resource_id, external_id, expansion, needs_expansion, data, sync_id, discovered_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, NULL, 0, ?7, ?8, ?9)",
    )?;
    for row in &inv.grants {
        let g = &row.grant;
        let entitlement = g.entitlement.clone().unwrap_or_default();
        let on = entitlement.resource.and_then(|r| r.id).unwrap_or_default();
        let principal = g.principal.as_ref().and_then(|p| p.id.clone()).unwrap_or_default();
        stmt.execute(params![
            on.resource_type,
            on.resource,
            entitlement.id,
            principal.resource_type,
            principal.resource,
            g.id,
            g.encode_to_vec(),
            sync_id,
            sdk_timestamp(row.observed_at)
        ])?;
    }
    Ok(())
}

/// `v1_resources.external_id`: `<type>:<resource>`.
pub fn resource_external_id(id: &pb::ResourceId) -> String {
    format!("{}:{}", id.resource_type, id.resource)
}

/// The run's stats as baton-sdk's `reader.v2.SyncStats` JSON (Go field names),
/// with each type's data age in `step_durations_ms` under `data_age_<type>`.
fn stats_json(inv: &Inventory, now_ms: i64) -> String {
    let mut resources_by: HashMap<&str, i64> = HashMap::new();
    for r in &inv.resources {
        *resources_by
            .entry(r.resource.id.as_ref().map_or("", |i| i.resource_type.as_str()))
            .or_default() += 1;
    }
    let mut entitlements_by: HashMap<&str, i64> = HashMap::new();
    for e in &inv.entitlements {
        let t = e.entitlement.resource.as_ref().and_then(|r| r.id.as_ref());
        *entitlements_by
            .entry(t.map_or("", |i| i.resource_type.as_str()))
            .or_default() += 1;
    }
    let mut grants_by: HashMap<&str, i64> = HashMap::new();
    for g in &inv.grants {
        let t = g
            .grant
            .entitlement
            .as_ref()
            .and_then(|e| e.resource.as_ref())
            .and_then(|r| r.id.as_ref());
        *grants_by.entry(t.map_or("", |i| i.resource_type.as_str())).or_default() += 1;
    }
    let ages: HashMap<String, i64> = inv
        .ages
        .iter()
        .map(|TypeAge { kind, committed_at }| {
            (
                format!("data_age_{}", kind.resource_type().as_str()),
                (now_ms - committed_at).max(0),
            )
        })
        .collect();
    serde_json::json!({
        "resource_types": inv.resource_types.len(),
        "resources": inv.resources.len(),
        "entitlements": inv.entitlements.len(),
        "grants": inv.grants.len(),
        "resources_by_resource_type": resources_by,
        "entitlements_by_resource_type": entitlements_by,
        "grants_by_resource_type": grants_by,
        "assets": 0,
        "step_durations_ms": ages,
    })
    .to_string()
}

/// `MAGIC` + one zstd frame (level 1, the SDK's "fastest") of the database.
fn compress(db: &Path, out: &Path) -> Result<(), C1zError> {
    let mut input = BufReader::new(File::open(db).map_err(io_err(db))?);
    let file = File::create(out).map_err(io_err(out))?;
    let mut writer = BufWriter::new(file);
    writer.write_all(MAGIC).map_err(io_err(out))?;
    let size = std::fs::metadata(db).map_err(io_err(db))?.len();
    let mut encoder = zstd::stream::Encoder::new(writer, 1).map_err(io_err(out))?;
    encoder.set_pledged_src_size(Some(size)).map_err(io_err(out))?;
    std::io::copy(&mut input, &mut encoder).map_err(io_err(out))?;
    let writer = encoder.finish().map_err(io_err(out))?;
    let file = writer.into_inner().map_err(|e| io_err(out)(e.into_error()))?;
    file.sync_all().map_err(io_err(out))
}

// ---------------------------------------------------------------------------
// Reader

/// One sync run row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncRunRow {
    pub sync_id: String,
    pub started_at: String,
    pub ended_at: Option<String>,
    pub sync_type: String,
    pub parent_sync_id: String,
    pub stats: Option<String>,
}

/// A decoded c1z: every row of the object tables with its indexed columns.
#[derive(Debug, Clone, Default)]
pub struct C1z {
    pub sync_runs: Vec<SyncRunRow>,
    /// (external_id, sync_id, decoded)
    pub resource_types: Vec<(String, String, pb::ResourceType)>,
    pub resources: Vec<ResourceColumns>,
    /// (resource_type_id, resource_id, external_id, sync_id, decoded)
    pub entitlements: Vec<(String, String, String, String, pb::Entitlement)>,
    /// (resource_type_id, resource_id, entitlement_id, principal type, principal id, external_id, sync_id, decoded)
    pub grants: Vec<GrantColumns>,
}

/// The indexed columns of one `v1_resources` row and its decoded blob.
#[derive(Debug, Clone)]
pub struct ResourceColumns {
    pub resource_type_id: String,
    pub external_id: String,
    pub parent_resource_type_id: Option<String>,
    pub parent_resource_id: Option<String>,
    pub sync_id: String,
    pub resource: pb::Resource,
}

/// The indexed columns of one `v1_grants` row and its decoded blob.
#[derive(Debug, Clone)]
pub struct GrantColumns {
    pub resource_type_id: String,
    pub resource_id: String,
    pub entitlement_id: String,
    pub principal_resource_type_id: String,
    pub principal_resource_id: String,
    pub external_id: String,
    pub sync_id: String,
    pub grant: pb::Grant,
}

/// Counts of a verified file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct C1zCounts {
    pub resource_types: usize,
    pub resources: usize,
    pub entitlements: usize,
    pub grants: usize,
}

/// Reads a c1z file from disk (see [`read_bytes`]).
pub fn read(path: &Path) -> Result<C1z, C1zError> {
    let mut bytes = Vec::new();
    File::open(path)
        .and_then(|mut f| f.read_to_end(&mut bytes))
        .map_err(io_err(path))?;
    read_bytes(&bytes)
}

/// Decodes a c1z v1 held in memory: checks the magic, decompresses the one
/// frame within the SDK reader's limits, and decodes every table's rows and
/// blobs. Any input gives an error, never a panic.
pub fn read_bytes(bytes: &[u8]) -> Result<C1z, C1zError> {
    let body = bytes
        .strip_prefix(MAGIC.as_slice())
        .ok_or_else(|| C1zError::Format("missing the C1ZF\\0 header".into()))?;
    let mut decoder = zstd::stream::Decoder::new(body).map_err(|e| C1zError::Format(format!("zstd: {e}")))?;
    decoder
        .window_log_max(MAX_WINDOW_LOG)
        .map_err(|e| C1zError::Format(format!("zstd: {e}")))?;
    let temp = TempFile::new()?;
    let mut out = File::create(&temp.0).map_err(io_err(&temp.0))?;
    let copied = std::io::copy(&mut decoder.take(MAX_DECODED + 1), &mut out)
        .map_err(|e| C1zError::Format(format!("zstd: {e}")))?;
    if copied > MAX_DECODED {
        return Err(C1zError::Format("decoded database is larger than 10 GiB".into()));
    }
    drop(out);
    let conn = Connection::open_with_flags(&temp.0, OpenFlags::SQLITE_OPEN_READ_ONLY)
        .map_err(|e| C1zError::Format(format!("not a SQLite database: {e}")))?;
    read_tables(&conn)
}

/// A file in the temp directory, deleted on drop.
struct TempFile(PathBuf);

impl TempFile {
    fn new() -> Result<Self, C1zError> {
        static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let nonce: u64 = rand::random();
        let path = std::env::temp_dir().join(format!("c1z-read-{}-{n}-{nonce:x}.db", std::process::id()));
        Ok(TempFile(path))
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn decode<M: Message + Default>(table: &str, id: &str, blob: &[u8]) -> Result<M, C1zError> {
    M::decode(blob).map_err(|e| C1zError::Format(format!("{table} row {id:?}: data is not a valid protobuf: {e}")))
}

// One query and row mapping per table, in schema order: long, but flat.
fn read_tables(conn: &Connection) -> Result<C1z, C1zError> {
    let mut out = C1z::default();
    let mut stmt = conn.prepare(
        "SELECT sync_id, started_at, ended_at, sync_type, parent_sync_id, stats FROM v1_sync_runs ORDER BY id",
    )?;
    out.sync_runs = stmt
        .query_map([], |r| {
            Ok(SyncRunRow {
                sync_id: r.get(0)?,
                started_at: r.get(1)?,
                ended_at: r.get(2)?,
                sync_type: r.get(3)?,
                parent_sync_id: r.get(4)?,
                stats: r.get(5)?,
            })
        })?
        .collect::<Result<_, _>>()?;
    let mut stmt = conn.prepare("SELECT external_id, sync_id, data FROM v1_resource_types ORDER BY id")?;
    let rows = stmt.query_map([], |r| {
        Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, Vec<u8>>(2)?))
    })?;
    for row in rows {
        let (id, sync, data) = row?;
        let decoded = decode("v1_resource_types", &id, &data)?;
        out.resource_types.push((id, sync, decoded));
    }
    let mut stmt = conn.prepare(
        "SELECT resource_type_id, external_id, parent_resource_type_id, parent_resource_id, sync_id, data
         FROM v1_resources ORDER BY id",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok((
            r.get(0)?,
            r.get(1)?,
            r.get(2)?,
            r.get(3)?,
            r.get(4)?,
            r.get::<_, Vec<u8>>(5)?,
        ))
    })?;
    for row in rows {
        let (t, id, pt, pid, sync, data): (String, String, Option<String>, Option<String>, String, Vec<u8>) = row?;
        let resource = decode("v1_resources", &id, &data)?;
        out.resources.push(ResourceColumns {
            resource_type_id: t,
            external_id: id,
            parent_resource_type_id: pt,
            parent_resource_id: pid,
            sync_id: sync,
            resource,
        });
    }
    let mut stmt = conn
        .prepare("SELECT resource_type_id, resource_id, external_id, sync_id, data FROM v1_entitlements ORDER BY id")?;
    let rows = stmt.query_map([], |r| {
        Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get::<_, Vec<u8>>(4)?))
    })?;
    for row in rows {
        let (t, rid, id, sync, data): (String, String, String, String, Vec<u8>) = row?;
        let decoded = decode("v1_entitlements", &id, &data)?;
        out.entitlements.push((t, rid, id, sync, decoded));
    }
    let mut stmt = conn.prepare(
        "SELECT resource_type_id, resource_id, entitlement_id, principal_resource_type_id, principal_resource_id,
         external_id, sync_id, data FROM v1_grants ORDER BY id",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok((
            [
                r.get(0)?,
                r.get(1)?,
                r.get(2)?,
                r.get(3)?,
                r.get(4)?,
                r.get(5)?,
                r.get(6)?,
            ],
            r.get::<_, Vec<u8>>(7)?,
        ))
    })?;
    for row in rows {
        let ([t, rid, eid, pt, pid, id, sync], data): ([String; 7], Vec<u8>) = row?;
        let grant = decode("v1_grants", &id, &data)?;
        out.grants.push(GrantColumns {
            resource_type_id: t,
            resource_id: rid,
            entitlement_id: eid,
            principal_resource_type_id: pt,
            principal_resource_id: pid,
            external_id: id,
            sync_id: sync,
            grant,
        });
    }
    Ok(out)
}

impl C1z {
    /// Checks what ConductorOne's ingestion relies on: exactly one finished
    /// `full` run with a KSUID id and no parent; every row under it; unique
    /// external ids per table; columns equal to the blobs; every parent,
    /// entitlement resource, grant entitlement and grant principal present;
    /// annotations decodable. Returns every problem found.
    pub fn verify(&self) -> Result<C1zCounts, Vec<String>> {
        let mut problems = Vec::new();
        let sync_id = self.verify_run(&mut problems);
        let mut seen: HashSet<(&str, &str)> = HashSet::new();
        let mut types = HashSet::new();
        for (id, sync, rt) in &self.resource_types {
            self.check_row("v1_resource_types", id, sync, &sync_id, &mut seen, &mut problems);
            if rt.id != *id {
                problems.push(format!("resource type {id}: blob id is {:?}", rt.id));
            }
            types.insert(id.as_str());
        }
        let mut resources = HashSet::new();
        for row in &self.resources {
            let (t, id, r) = (&row.resource_type_id, &row.external_id, &row.resource);
            self.check_row("v1_resources", id, &row.sync_id, &sync_id, &mut seen, &mut problems);
            let rid = r.id.clone().unwrap_or_default();
            if rid.resource_type != *t || super::c1z::resource_external_id(&rid) != *id || rid.resource.is_empty() {
                problems.push(format!("resource {id}: columns do not match the blob's id {rid:?}"));
            }
            if !types.contains(t.as_str()) {
                problems.push(format!("resource {id}: unknown resource type {t}"));
            }
            verify_annotations(id, &r.annotations, &mut problems);
            resources.insert((rid.resource_type, rid.resource));
        }
        for row in &self.resources {
            let r = &row.resource;
            let blob_parent = r
                .parent_resource_id
                .as_ref()
                .map(|p| (p.resource_type.clone(), p.resource.clone()));
            let columns = row.parent_resource_type_id.clone().zip(row.parent_resource_id.clone());
            if blob_parent != columns {
                problems.push(format!("resource {:?}: parent columns differ from the blob", r.id));
            } else if let Some(parent) = columns
                && !resources.contains(&parent)
            {
                problems.push(format!("resource {:?}: parent {parent:?} is missing", r.id));
            }
        }
        let mut entitlements = HashMap::new();
        for (t, rid, id, sync, e) in &self.entitlements {
            self.check_row("v1_entitlements", id, sync, &sync_id, &mut seen, &mut problems);
            let on = e.resource.as_ref().and_then(|r| r.id.clone()).unwrap_or_default();
            if e.id != *id || on.resource_type != *t || on.resource != *rid {
                problems.push(format!("entitlement {id}: columns do not match the blob"));
            }
            if !resources.contains(&(t.clone(), rid.clone())) {
                problems.push(format!("entitlement {id}: resource {t}:{rid} is missing"));
            }
            if e.slug.is_empty() || e.grantable_to.is_empty() {
                problems.push(format!("entitlement {id}: no slug or no grantable_to"));
            }
            entitlements.insert(id.as_str(), e);
        }
        for g in &self.grants {
            self.check_row(
                "v1_grants",
                &g.external_id,
                &g.sync_id,
                &sync_id,
                &mut seen,
                &mut problems,
            );
            verify_grant(g, &entitlements, &resources, &mut problems);
        }
        if problems.is_empty() {
            Ok(C1zCounts {
                resource_types: self.resource_types.len(),
                resources: self.resources.len(),
                entitlements: self.entitlements.len(),
                grants: self.grants.len(),
            })
        } else {
            Err(problems)
        }
    }

    fn verify_run(&self, problems: &mut Vec<String>) -> String {
        match self.sync_runs.as_slice() {
            [run] => {
                if !ksuid::is_valid(&run.sync_id) {
                    problems.push(format!("sync id {:?} is not a KSUID", run.sync_id));
                }
                if run.ended_at.is_none() || run.sync_type != "full" || !run.parent_sync_id.is_empty() {
                    problems.push("the sync run is not a finished full run".into());
                }
                if let Some(stats) = &run.stats
                    && serde_json::from_str::<serde_json::Value>(stats).is_err()
                {
                    problems.push("the sync run's stats are not JSON".into());
                }
                run.sync_id.clone()
            }
            runs => {
                problems.push(format!("expected one sync run, found {}", runs.len()));
                String::new()
            }
        }
    }

    fn check_row<'a>(
        &self,
        table: &'a str,
        id: &'a str,
        sync: &str,
        sync_id: &str,
        seen: &mut HashSet<(&'a str, &'a str)>,
        problems: &mut Vec<String>,
    ) {
        if sync != sync_id {
            problems.push(format!("{table} {id}: sync id {sync:?} is not the run's"));
        }
        if !seen.insert((table, id)) {
            problems.push(format!("{table}: external id {id} appears twice"));
        }
    }
}

fn verify_grant(
    g: &GrantColumns,
    entitlements: &HashMap<&str, &pb::Entitlement>,
    resources: &HashSet<(String, String)>,
    problems: &mut Vec<String>,
) {
    let id = &g.external_id;
    let blob_entitlement = g.grant.entitlement.clone().unwrap_or_default();
    let on = blob_entitlement.resource.and_then(|r| r.id).unwrap_or_default();
    let principal = g
        .grant
        .principal
        .as_ref()
        .and_then(|p| p.id.clone())
        .unwrap_or_default();
    if g.grant.id != *id
        || blob_entitlement.id != g.entitlement_id
        || on.resource_type != g.resource_type_id
        || on.resource != g.resource_id
        || principal.resource_type != g.principal_resource_type_id
        || principal.resource != g.principal_resource_id
    {
        problems.push(format!("grant {id}: columns do not match the blob"));
    }
    match entitlements.get(g.entitlement_id.as_str()) {
        None => problems.push(format!("grant {id}: entitlement {} is missing", g.entitlement_id)),
        Some(e) => {
            if !e.grantable_to.iter().any(|t| t.id == principal.resource_type) {
                problems.push(format!(
                    "grant {id}: a {} cannot hold {}",
                    principal.resource_type, g.entitlement_id
                ));
            }
        }
    }
    if !resources.contains(&(principal.resource_type.clone(), principal.resource.clone())) {
        problems.push(format!("grant {id}: principal {principal:?} is missing"));
    }
}

/// Every annotation this connector writes must decode as what its type says.
fn verify_annotations(id: &str, annotations: &[prost_types::Any], problems: &mut Vec<String>) {
    for a in annotations {
        let ok = match a.type_url.as_str() {
            "type.googleapis.com/c1.connector.v2.ChildResourceType" => {
                pb::ChildResourceType::decode(a.value.as_slice()).is_ok_and(|c| !c.resource_type_id.is_empty())
            }
            "type.googleapis.com/c1.connector.v2.UserTrait" => pb::UserTrait::decode(a.value.as_slice()).is_ok(),
            "type.googleapis.com/c1.connector.v2.GroupTrait" => pb::GroupTrait::decode(a.value.as_slice()).is_ok(),
            _ => false,
        };
        if !ok {
            problems.push(format!("resource {id}: annotation {} does not decode", a.type_url));
        }
    }
}
