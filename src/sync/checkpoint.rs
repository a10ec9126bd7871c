//! Checkpoints of a running sync: each finished unit of work (the explicit
//! permissions of one project or repository, the bulk of a sync's requests)
//! is written to the store as it completes, so a run that fails or is killed
//! can be resumed by the next one without asking Bitbucket again. Writes are
//! batched by a background task (a few per second, not one per unit), which
//! also keeps the run's request count current in the store.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;

use crate::bitbucket::Client;
use crate::store::{RunId, Store};

/// How often pending checkpoints are written.
const FLUSH_EVERY: Duration = Duration::from_millis(100);

/// Units restored from a resumed run, and the channel new ones go to.
#[derive(Debug, Default)]
pub(super) struct Checkpoints {
    restored: HashMap<String, String>,
    sink: Option<mpsc::UnboundedSender<(String, String)>>,
}

impl Checkpoints {
    /// No restored units, nothing recorded (a run without a store).
    pub fn none() -> Self {
        Checkpoints::default()
    }

    /// A restored unit, if the resumed run finished it and it still reads.
    pub fn restored<T: DeserializeOwned>(&self, unit: &str) -> Option<T> {
        serde_json::from_str(self.restored.get(unit)?).ok()
    }

    /// Records a finished unit (best effort: a lost checkpoint costs only
    /// its requests again on resume).
    pub fn record<T: Serialize>(&self, unit: String, value: &T) {
        if let (Some(sink), Ok(data)) = (&self.sink, serde_json::to_string(value)) {
            let _ = sink.send((unit, data));
        }
    }
}

/// The background writer of one run's checkpoints.
pub(super) struct CheckpointWriter {
    task: tokio::task::JoinHandle<()>,
}

impl CheckpointWriter {
    /// Starts writing `run`'s checkpoints and request count; returns the
    /// checkpoints handle for the syncers (with `restored` units) and the writer.
    pub fn start(
        store: &Arc<Store>,
        run: RunId,
        client: &Client,
        restored: HashMap<String, String>,
    ) -> (Checkpoints, CheckpointWriter) {
        let (sink, mut units) = mpsc::unbounded_channel::<(String, String)>();
        let store = Arc::clone(store);
        let client = client.clone();
        let task = tokio::spawn(async move {
            let mut open = true;
            let mut recorded = 0;
            while open {
                let mut batch = Vec::new();
                let deadline = tokio::time::sleep(FLUSH_EVERY);
                tokio::pin!(deadline);
                loop {
                    tokio::select! {
                        unit = units.recv() => match unit {
                            Some(unit) => batch.push(unit),
                            None => { open = false; break; }
                        },
                        _ = &mut deadline => break,
                    }
                }
                let requests = client.request_count();
                if batch.is_empty() && requests == recorded {
                    continue;
                }
                recorded = requests;
                let store = Arc::clone(&store);
                let written = tokio::task::spawn_blocking(move || {
                    store.checkpoint(run, &batch)?;
                    store.record_requests(run, requests)
                })
                .await;
                if let Ok(Err(err)) = written {
                    tracing::debug!(run, error = %err, "checkpoint not written");
                }
            }
        });
        (
            Checkpoints {
                restored,
                sink: Some(sink),
            },
            CheckpointWriter { task },
        )
    }

    /// Writes what is pending and stops. `checkpoints` must be the handle
    /// [`CheckpointWriter::start`] returned (dropping it closes the channel).
    pub async fn finish(self, checkpoints: Checkpoints) {
        drop(checkpoints);
        let _ = self.task.await;
    }
}
