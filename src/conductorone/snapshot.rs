//! Budget-aware snapshots for `sync_full`. Bitbucket allows 1,000 requests
//! per hour per credential and a large workspace needs over 10,000 for a full
//! pass, so a `sync_full` answers from the store and first refreshes only the
//! resource types whose data is older than `max_snapshot_age` (0: all).
//!
//! Each refresh is a normal recorded sync run. When the task is cancelled the
//! future is dropped mid-run; a guard then records that run as failed, so
//! the previous generation stays current and nothing is left `running`.

use std::sync::Arc;
use std::time::Duration;

use crate::model::SyncKind;
use crate::store::{RunId, Store};
use crate::sync::{SyncEngine, SyncError};

/// How old one type's data was when the task started, and whether it was refreshed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TypeFreshness {
    pub kind: SyncKind,
    /// `None`: never synced.
    pub age: Option<Duration>,
    pub refreshed: bool,
}

/// The types to refresh: never synced, or older than `max_age` (`0`: every type).
pub fn stale_kinds(store: &Store, connector: &str, max_age: Duration) -> Result<Vec<TypeFreshness>, SyncError> {
    let now = jiff::Timestamp::now().as_millisecond();
    SyncKind::ALL
        .into_iter()
        .map(|kind| {
            let current = store
                .generations(connector, kind)
                .map_err(SyncError::from)?
                .into_iter()
                .find(|g| g.current);
            let age = current.map(|g| Duration::from_millis((now - g.committed_at).max(0) as u64));
            let refreshed = max_age.is_zero() || age.is_none_or(|a| a > max_age);
            Ok(TypeFreshness { kind, age, refreshed })
        })
        .collect()
}

/// Refreshes the types marked `refreshed`, all at once (the client's limiter
/// paces them), over one discovery of the workspaces.
pub async fn refresh(
    engine: &SyncEngine,
    store: &Arc<Store>,
    connector: &str,
    plan: &[TypeFreshness],
) -> Result<(), SyncError> {
    let kinds: Vec<SyncKind> = plan.iter().filter(|t| t.refreshed).map(|t| t.kind).collect();
    if kinds.is_empty() {
        return Ok(());
    }
    let scope = engine.connect().await?;
    let runs = kinds
        .iter()
        .map(|&kind| run_one(engine, store, connector, kind, &scope));
    futures::future::try_join_all(runs).await?;
    Ok(())
}

/// Marks its run failed unless it was committed (see the module doc).
struct RunGuard {
    store: Arc<Store>,
    run: RunId,
    done: bool,
}

impl Drop for RunGuard {
    fn drop(&mut self) {
        if !self.done
            && let Err(err) = self
                .store
                .fail_run(self.run, "cancelled: the ConductorOne task ended", 0)
        {
            tracing::warn!(error = %err, run = self.run, "could not record the cancelled run");
        }
    }
}

async fn run_one(
    engine: &SyncEngine,
    store: &Arc<Store>,
    connector: &str,
    kind: SyncKind,
    scope: &crate::sync::SyncScope,
) -> Result<(), SyncError> {
    let engine = engine.scoped();
    let run = blocking(store, {
        let connector = connector.to_owned();
        move |s| s.start_run(&connector, kind)
    })
    .await?;
    let mut guard = RunGuard {
        store: Arc::clone(store),
        run,
        done: false,
    };
    let result = engine.sync(kind, scope).await;
    let requests = engine.client().request_count();
    match result {
        Ok(batch) => {
            let generation = blocking(store, move |s| s.commit_run(run, &batch, requests)).await?;
            guard.done = true;
            tracing::info!(kind = kind.as_str(), generation, requests, "refreshed for ConductorOne");
            Ok(())
        }
        Err(err) => {
            guard.done = true;
            let message = err.to_string();
            if let Err(store_err) = blocking(store, move |s| s.fail_run(run, &message, requests)).await {
                tracing::warn!(error = %store_err, "could not record the failed run");
            }
            Err(err)
        }
    }
}

async fn blocking<T, F>(store: &Arc<Store>, f: F) -> Result<T, SyncError>
where
    T: Send + 'static,
    F: FnOnce(&Store) -> Result<T, crate::store::StoreError> + Send + 'static,
{
    let store = Arc::clone(store);
    tokio::task::spawn_blocking(move || f(&store))
        .await
        .map_err(|e| SyncError::from(crate::store::StoreError::Task(e.to_string())))?
        .map_err(SyncError::from)
}
