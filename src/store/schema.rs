//! The schema: each version's SQL, the migrations that take an older file
//! to [`SCHEMA_VERSION`], the check that a file is a store of ours, and the
//! readers' lookup indexes (kept outside the versions). One place to read
//! and review when the file format changes.

use std::path::Path;

use rusqlite::{Connection, TransactionBehavior, params};

use super::{StoreError, classify, intent};

/// Schema version written to `PRAGMA user_version`.
pub const SCHEMA_VERSION: i64 = 3;
/// `PRAGMA application_id` of a store file ("BBOP").
pub const APPLICATION_ID: i64 = 0x4242_4f50;

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
/// and readers use them only when present ([`Store::indexed`](super::Store::indexed)), so a file
/// written by an older binary still reads, only slower.
pub(super) const READ_INDEXES: &[(&str, &str)] = &[
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
        // Covers a workspace owner's `access-of` (id and name of every
        // repository in a workspace, [`Store::repository_names_in_workspaces`](super::Store::repository_names_in_workspaces))
        // without reading the rows and their profiles.
        "resources_names_by_parent",
        "CREATE INDEX IF NOT EXISTS resources_names_by_parent ON resources (parent_id, generation, display_name)",
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

/// Read indexes an older binary created that a [`READ_INDEXES`] entry now
/// covers: dropped so the writer does not keep them up to date for nothing.
const RETIRED_READ_INDEXES: &[&str] = &["resources_by_parent"];

/// Creates the missing [`READ_INDEXES`] and drops the retired ones (the
/// writer, at open).
pub(super) fn create_read_indexes(conn: &Connection) -> rusqlite::Result<()> {
    for (_, sql) in READ_INDEXES {
        conn.execute_batch(sql)?;
    }
    for name in RETIRED_READ_INDEXES {
        conn.execute_batch(&format!("DROP INDEX IF EXISTS {name}"))?;
    }
    Ok(())
}

/// Whether the file has every [`READ_INDEXES`] entry.
pub(super) fn has_read_indexes(conn: &Connection) -> rusqlite::Result<bool> {
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
pub(super) fn has_interval_column(conn: &Connection) -> rusqlite::Result<bool> {
    let mut stmt = conn.prepare("SELECT count(*) FROM pragma_table_info('runs') WHERE name = 'interval_ms'")?;
    Ok(stmt.query_row([], |r| r.get::<_, i64>(0))? > 0)
}

/// Schema steps: `MIGRATIONS[i]` takes version `i` to `i + 1`.
pub(super) const MIGRATIONS: &[&str] = &[SCHEMA_V1, SCHEMA_V2, intent::SCHEMA_V3];

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
pub(super) fn check_identity(conn: &Connection, path: &Path) -> Result<i64, StoreError> {
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

pub(super) fn migrate(conn: &mut Connection, path: &Path) -> Result<(), StoreError> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Store;

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
}
