//! Runs one syncer into the store as one recorded run: the run is started,
//! the syncer reads Bitbucket, and the batch becomes the new generation in one
//! transaction, or the run is marked failed and the previous generation stays.

use std::sync::Arc;
use std::time::{Duration, Instant};

use jiff::Timestamp;
use serde::Serialize;

use super::{SyncEngine, SyncError, SyncScope};
use crate::model::SyncKind;
use crate::store::Store;

/// What one run did.
#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    pub kind: SyncKind,
    pub resources: usize,
    pub entitlements: usize,
    pub grants: usize,
    /// Grants to principals missing from the member lists.
    pub unknown_principals: usize,
    /// HTTP requests this run made, retries included.
    pub requests: u64,
    #[serde(serialize_with = "as_seconds")]
    pub duration: Duration,
    pub started_at: Timestamp,
    pub finished_at: Timestamp,
    pub generation: i64,
}

fn as_seconds<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64((d.as_secs_f64() * 1000.0).round() / 1000.0)
}

/// Syncs `kind` for `connector` over `scope` and stores the result. On
/// failure the run is recorded as failed with the error, and the last good
/// data stays in place.
pub async fn run_into_store(
    engine: &SyncEngine,
    store: &Arc<Store>,
    connector: &str,
    kind: SyncKind,
    scope: &SyncScope,
) -> Result<RunReport, SyncError> {
    run(engine, store, connector, kind, Some(scope)).await
}

/// Like [`run_into_store`], discovering the workspaces first as part of the
/// run, so that a discovery failure is recorded as the run's failure (what a
/// sync loop wants: its status then shows the error).
pub async fn discover_and_run_into_store(
    engine: &SyncEngine,
    store: &Arc<Store>,
    connector: &str,
    kind: SyncKind,
) -> Result<RunReport, SyncError> {
    run(engine, store, connector, kind, None).await
}

async fn run(
    engine: &SyncEngine,
    store: &Arc<Store>,
    connector: &str,
    kind: SyncKind,
    scope: Option<&SyncScope>,
) -> Result<RunReport, SyncError> {
    let engine = engine.scoped();
    let started_at = Timestamp::now();
    let clock = Instant::now();
    let run = blocking(store, {
        let connector = connector.to_owned();
        move |store| store.start_run(&connector, kind)
    })
    .await?;
    let span = tracing::info_span!("sync_run", connector, kind = kind.as_str(), run);
    let work = async {
        match scope {
            Some(scope) => engine.sync(kind, scope).await,
            None => engine.sync(kind, &engine.discover().await?).await,
        }
    };
    let result = tracing::Instrument::instrument(work, span.clone()).await;
    let requests = engine.client().request_count();
    match result {
        Ok(batch) => {
            let resources = batch.resources.len();
            let entitlements = batch.entitlements.len();
            let grants = batch.grants.len();
            let unknown_principals = batch.grants.iter().filter(|g| g.unknown_principal).count();
            let generation = blocking(store, move |store| store.commit_run(run, &batch, requests)).await?;
            let report = RunReport {
                kind,
                resources,
                entitlements,
                grants,
                unknown_principals,
                requests,
                duration: clock.elapsed(),
                started_at,
                finished_at: Timestamp::now(),
                generation,
            };
            span.in_scope(|| {
                tracing::info!(
                    resources,
                    entitlements,
                    grants,
                    requests,
                    generation,
                    "sync run committed"
                );
            });
            Ok(report)
        }
        Err(err) => {
            let message = err.to_string();
            span.in_scope(|| tracing::warn!(error = %message, requests, "sync run failed; previous data kept"));
            // Recording the failure is best effort: the sync error matters more.
            if let Err(store_err) = blocking(store, move |store| store.fail_run(run, &message, requests)).await {
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
        .map_err(|e| SyncError::Store(format!("store task failed: {e}")))?
        .map_err(|e| SyncError::Store(e.to_string()))
}
