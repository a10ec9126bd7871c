//! Resume checkpoints: a running run records its finished units of work
//! (unit name → data), so that after it failed or its process stopped the
//! next run of the same connector, kind and scope takes them over
//! ([`RunOptions::resume`](super::RunOptions::resume)) instead of reading
//! them from Bitbucket again. A commit deletes the run's checkpoints.

use rusqlite::{Connection, OptionalExtension, params};

use crate::model::SyncKind;

use super::runs::running_run;
use super::{RunId, Store, StoreError, to_u64};

impl Store {
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
}

/// The run a new run of `(connector, kind)` over `workspaces` may resume:
/// the newest one, if it failed or was interrupted, has checkpoints and has
/// the same scope. Returns `(id, data_from)`.
pub(super) fn resumable_run(
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
