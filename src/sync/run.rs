//! Runs one syncer into the store as one recorded run: the run is started,
//! the syncer reads Bitbucket, and the batch becomes the new generation in one
//! transaction, or the run is marked failed and the previous generation stays.

use std::sync::Arc;
use std::time::{Duration, Instant};

use jiff::Timestamp;
use serde::Serialize;

use super::checkpoint::CheckpointWriter;
use super::{SyncEngine, SyncError, SyncScope};
use crate::model::SyncKind;
use crate::store::{RunId, RunOptions, Store};

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
    /// The unfinished run this one resumed, if any.
    pub resumed_from: Option<RunId>,
    /// Units of work taken over from that run instead of asked again.
    pub resumed_units: u64,
}

/// A run's result with what it cost, failed or not.
#[derive(Debug)]
pub struct RunOutcome {
    pub kind: SyncKind,
    pub result: Result<RunReport, SyncError>,
    /// Requests made, retries included, also when the run failed.
    pub requests: u64,
    pub duration: Duration,
}

fn as_seconds<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64((d.as_secs_f64() * 1000.0).round() / 1000.0)
}

/// Syncs `kind` for `connector` over `scope` and stores the result. On
/// failure the run is recorded as failed with the error, and the last good
/// data stays in place. An unfinished earlier run of the same kind and scope
/// is resumed: its finished units are not asked again.
pub async fn run_into_store(
    engine: &SyncEngine,
    store: &Arc<Store>,
    connector: &str,
    kind: SyncKind,
    scope: &SyncScope,
) -> Result<RunReport, SyncError> {
    run(engine, store, connector, kind, Some(scope)).await.result
}

/// Like [`run_into_store`], with the cost of a failed run too.
pub async fn run_into_store_with_cost(
    engine: &SyncEngine,
    store: &Arc<Store>,
    connector: &str,
    kind: SyncKind,
    scope: &SyncScope,
) -> RunOutcome {
    run(engine, store, connector, kind, Some(scope)).await
}

/// Like [`run_into_store`], discovering the workspaces first as part of the
/// run, so that a discovery failure is recorded as the run's failure (what a
/// sync loop wants: its status then shows the error). Resumes like it too,
/// so a loop restarted with the operator continues an interrupted run.
pub async fn discover_and_run_into_store(
    engine: &SyncEngine,
    store: &Arc<Store>,
    connector: &str,
    kind: SyncKind,
) -> Result<RunReport, SyncError> {
    run(engine, store, connector, kind, None).await.result
}

// One linear story (start or resume, sync with checkpoints, commit or fail);
// splitting it would only pass its half-dozen locals around.
async fn run(
    engine: &SyncEngine,
    store: &Arc<Store>,
    connector: &str,
    kind: SyncKind,
    scope: Option<&SyncScope>,
) -> RunOutcome {
    let engine = engine.scoped();
    let started_at = Timestamp::now();
    let clock = Instant::now();
    let outcome = |result: Result<RunReport, SyncError>, engine: &SyncEngine| RunOutcome {
        kind,
        result,
        requests: engine.client().request_count(),
        duration: clock.elapsed(),
    };
    let options = RunOptions {
        workspaces: match scope {
            Some(scope) if engine.scope_only => Some(scope.workspaces.iter().map(|w| w.uuid.clone()).collect()),
            _ => None,
        },
        resume: true,
        interval: engine.interval,
    };
    let started = match blocking(store, {
        let connector = connector.to_owned();
        move |store| store.start_run_with(&connector, kind, &options)
    })
    .await
    {
        Ok(started) => started,
        Err(err) => return outcome(Err(err), &engine),
    };
    let run = started.id;
    let span = tracing::info_span!("sync_run", connector, kind = kind.as_str(), run);
    if let Some(from) = started.resumed_from {
        span.in_scope(|| {
            tracing::info!(
                resumed_from = from,
                units = started.checkpoints.len(),
                "resuming an unfinished run"
            )
        });
    }
    let (checkpoints, writer) = CheckpointWriter::start(store, run, engine.client(), started.checkpoints);
    let work = async {
        match scope {
            Some(scope) => engine.sync_with(kind, scope, &checkpoints).await,
            None => engine.sync_with(kind, &engine.discover().await?, &checkpoints).await,
        }
    };
    let result = tracing::Instrument::instrument(work, span.clone()).await;
    writer.finish(checkpoints).await;
    let requests = engine.client().request_count();
    let resumed_units = engine.progress().of(kind).map_or(0, |p| p.resumed);
    match result {
        Ok(batch) => {
            let resources = batch.resources.len();
            let entitlements = batch.entitlements.len();
            let grants = batch.grants.len();
            let unknown_principals = batch.grants.iter().filter(|g| g.unknown_principal).count();
            let generation = match blocking(store, move |store| store.commit_run(run, &batch, requests)).await {
                Ok(generation) => generation,
                Err(err) => {
                    record_failure(store, &span, run, &err, requests).await;
                    return outcome(Err(err), &engine);
                }
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
            outcome(
                Ok(RunReport {
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
                    resumed_from: started.resumed_from,
                    resumed_units,
                }),
                &engine,
            )
        }
        Err(err) => {
            record_failure(store, &span, run, &err, requests).await;
            outcome(Err(err), &engine)
        }
    }
}

/// Marks the run failed (best effort: the sync error matters more). Its
/// checkpoints stay for the next run to resume.
async fn record_failure(store: &Arc<Store>, span: &tracing::Span, run: RunId, err: &SyncError, requests: u64) {
    let message = err.to_string();
    span.in_scope(|| tracing::warn!(error = %message, requests, "sync run failed; previous data kept"));
    if let Err(store_err) = blocking(store, move |store| store.fail_run(run, &message, requests)).await {
        tracing::warn!(error = %store_err, "could not record the failed run");
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
