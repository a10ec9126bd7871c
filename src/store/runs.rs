//! Sync run records: a run starts `running` (its workspace scope, its
//! owning process, what it resumed), and ends `ok` (with its generation,
//! [`Store::commit_run`]), `failed`, or `interrupted` when its process
//! stopped first ([`Store::close_dead_runs`] at open,
//! [`Store::fail_interrupted_runs`] at operator startup). Also the run
//! listing and [`Store::freshness`], which readers judge staleness by. Kept
//! apart from the generations: a run's record outlives its data (the newest
//! [`RUN_HISTORY`] runs stay) and a failed run has none.

use std::collections::HashMap;
use std::fmt;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};

use crate::model::SyncKind;

use super::checkpoints::resumable_run;
use super::{Counts, Generation, RunId, Store, StoreError, now_ms, parse_kind, to_i64, to_u64};

/// Finished runs kept per `(connector, kind)`.
pub const RUN_HISTORY: usize = 100;

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

impl Store {
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

pub(super) fn parse_workspaces(text: Option<&str>) -> Result<Option<Vec<String>>, StoreError> {
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

/// Loads a run and checks it is running: `(connector, kind, started_at)`.
pub(super) fn running_run(tx: &Connection, run: RunId) -> Result<(String, SyncKind, i64), StoreError> {
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

pub(super) fn prune_runs(tx: &Connection, connector: &str, kind: SyncKind) -> Result<(), StoreError> {
    tx.prepare_cached(
        "DELETE FROM runs WHERE connector = ?1 AND kind = ?2 AND status != 'running'
           AND id NOT IN (SELECT id FROM runs WHERE connector = ?1 AND kind = ?2 AND status != 'running'
                          ORDER BY id DESC LIMIT ?3)
           AND id NOT IN (SELECT run_id FROM generations WHERE run_id IS NOT NULL)",
    )?
    .execute(params![connector, kind.as_str(), to_i64(RUN_HISTORY)])?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::SyncBatch;

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
}
