//! What both controllers share, so that they cannot drift apart again:
//! per-object exponential backoff, a status writer that compares with what
//! it last wrote itself (not with the watch cache, which lags behind our own
//! writes), the one `error_policy`, a reconcile timer recording duration and
//! result per controller, and Event publishing.
//!
//! A controller holds a [`Scaffold`] for its resource type and wraps each
//! reconcile in [`Scaffold::timed`]; its errors implement [`MetricLabel`].

use std::collections::HashMap;
use std::fmt::{Debug, Display};
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use kube::api::{Api, Patch, PatchParams};
use kube::core::NamespaceResourceScope;
use kube::core::object::HasStatus;
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, Recorder};
use kube::runtime::finalizer;
use kube::{Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::metrics::Metrics;

/// The field manager of every write the controllers make.
pub const FIELD_MANAGER: &str = "bitbucket-operator";

/// A bounded label for the `reconcile_errors` metric.
pub trait MetricLabel {
    fn metric_label(&self) -> &'static str;
}

impl<E: MetricLabel + std::error::Error + 'static> MetricLabel for finalizer::Error<E> {
    fn metric_label(&self) -> &'static str {
        match self {
            finalizer::Error::ApplyFailed(e) | finalizer::Error::CleanupFailed(e) => e.metric_label(),
            _ => "finalizer",
        }
    }
}

/// `namespace/name`: the per-object key of backoff and status memory.
pub fn object_key<K: ResourceExt>(obj: &K) -> String {
    format!("{}/{}", obj.namespace().unwrap_or_default(), obj.name_any())
}

/// Per-object exponential backoff with jitter: 5 s, 10 s, 20 s … capped at 5 min.
pub fn backoff(failures: u32) -> Duration {
    crate::backoff::exponential(Duration::from_secs(5), Duration::from_secs(300), failures)
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// Consecutive failures per object.
#[derive(Debug, Default)]
pub struct Failures(Mutex<HashMap<String, u32>>);

impl Failures {
    /// Counts one more failure; returns how many in a row.
    pub fn failed(&self, key: &str) -> u32 {
        let mut failures = lock(&self.0);
        let n = failures.entry(key.to_owned()).or_default();
        *n = n.saturating_add(1);
        *n
    }

    pub fn succeeded(&self, key: &str) {
        lock(&self.0).remove(key);
    }
}

/// The status a controller last wrote, per object key and tied to the
/// object's uid (a re-created object starts afresh).
#[derive(Debug)]
pub struct StatusMemory<S>(Mutex<HashMap<String, (Option<String>, S)>>);

impl<S> Default for StatusMemory<S> {
    fn default() -> Self {
        StatusMemory(Mutex::default())
    }
}

impl<S: Clone> StatusMemory<S> {
    /// The newest status known: what we wrote for this very object, else the
    /// cached one. A reconcile that sees a cache older than our own write
    /// must neither write the same status again (moving transition times)
    /// nor decide from the stale one.
    pub fn newest(&self, key: &str, uid: Option<&str>, cached: Option<&S>) -> Option<S> {
        lock(&self.0)
            .get(key)
            .filter(|(written_uid, _)| written_uid.as_deref() == uid)
            .map(|(_, status)| status.clone())
            .or_else(|| cached.cloned())
    }

    pub fn remember(&self, key: &str, uid: Option<&str>, status: S) {
        lock(&self.0).insert(key.to_owned(), (uid.map(str::to_owned), status));
    }

    pub fn forget(&self, key: &str) {
        lock(&self.0).remove(key);
    }
}

/// What one controller keeps across reconciles of its resource type `K`.
pub struct Scaffold<K: HasStatus> {
    /// The `controller` metric label (`connector`, `grant`).
    pub controller: &'static str,
    pub client: Client,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    failures: Failures,
    written: StatusMemory<K::Status>,
}

impl<K> Scaffold<K>
where
    K: Resource<DynamicType = (), Scope = NamespaceResourceScope> + HasStatus + Clone + DeserializeOwned + Debug,
    K::Status: Clone + PartialEq + Serialize,
{
    pub fn new(controller: &'static str, client: Client, recorder: Recorder, metrics: Arc<Metrics>) -> Self {
        Scaffold {
            controller,
            client,
            recorder,
            metrics,
            failures: Failures::default(),
            written: StatusMemory::default(),
        }
    }

    /// The newest status known for `obj` (see [`StatusMemory::newest`]).
    pub fn current_status(&self, obj: &K) -> Option<K::Status> {
        self.written
            .newest(&object_key(obj), obj.meta().uid.as_deref(), obj.status())
    }

    /// `obj` with [`Self::current_status`] in place of the cached status, so
    /// every decision of a reconcile starts from the newest one.
    pub fn with_current_status(&self, obj: Arc<K>) -> Arc<K> {
        let current = self.current_status(&obj);
        if current.as_ref() == obj.status() {
            return obj;
        }
        let mut newer = (*obj).clone();
        *newer.status_mut() = current;
        Arc::new(newer)
    }

    /// Server-side apply of the whole status on `/status`, only when it
    /// differs from the newest status known. Returns whether it wrote.
    pub async fn write_status(&self, obj: &K, status: &K::Status) -> Result<bool, kube::Error> {
        if self.current_status(obj).as_ref() == Some(status) {
            return Ok(false);
        }
        let api: Api<K> = Api::namespaced(self.client.clone(), &obj.namespace().unwrap_or_default());
        let patch = serde_json::json!({
            "apiVersion": K::api_version(&()),
            "kind": K::kind(&()),
            "status": status,
        });
        api.patch_status(
            &obj.name_any(),
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await?;
        self.written
            .remember(&object_key(obj), obj.meta().uid.as_deref(), status.clone());
        Ok(true)
    }

    /// Counts one more failure of `key` (for a controller's own retry pacing).
    pub fn failed(&self, key: &str) -> u32 {
        self.failures.failed(key)
    }

    /// Resets `key`'s backoff.
    pub fn succeeded(&self, key: &str) {
        self.failures.succeeded(key);
    }

    /// Drops everything kept for a deleted object.
    pub fn forget(&self, key: &str) {
        self.failures.succeeded(key);
        self.written.forget(key);
    }

    /// Runs one reconcile and records its duration and result.
    pub async fn timed<E>(&self, reconcile: impl Future<Output = Result<Action, E>>) -> Result<Action, E> {
        let clock = Instant::now();
        let result = reconcile.await;
        self.metrics
            .record_reconcile(self.controller, result.is_ok(), clock.elapsed().as_secs_f64());
        result
    }

    /// The error policy of both controllers: count the error by label, log
    /// it, and requeue with the object's [`backoff`].
    pub fn error_policy<E: MetricLabel + Display>(&self, obj: &K, err: &E) -> Action {
        let key = object_key(obj);
        self.metrics.record_reconcile_error(self.controller, err.metric_label());
        let failures = self.failed(&key);
        tracing::warn!(controller = self.controller, object = %key, failures, error = %err, "reconcile failed");
        Action::requeue(backoff(failures))
    }

    /// Publishes an Event about `obj`; a failure is logged, never fatal.
    pub async fn publish(&self, obj: &K, event: Event) {
        if let Err(err) = self.recorder.publish(&event, &obj.object_ref(&())).await {
            tracing::warn!(error = %err, reason = %event.reason, "could not publish an event");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_bounded() {
        assert!(backoff(1) <= Duration::from_secs(6));
        assert!(backoff(20) <= Duration::from_secs(360));
        assert!(backoff(3) >= Duration::from_secs(16));
    }

    #[test]
    fn failures_count_per_object_until_success() {
        let failures = Failures::default();
        assert_eq!(failures.failed("ns/a"), 1);
        assert_eq!(failures.failed("ns/a"), 2);
        assert_eq!(failures.failed("ns/b"), 1);
        failures.succeeded("ns/a");
        assert_eq!(failures.failed("ns/a"), 1);
    }

    #[test]
    fn the_newest_status_is_our_own_write_not_a_lagging_cache() {
        let memory = StatusMemory::<&str>::default();
        // Nothing written yet: the cache is all we know.
        assert_eq!(memory.newest("ns/g", Some("uid-1"), Some(&"Pending")), Some("Pending"));
        // We wrote Granted; a late reconcile still sees Pending in the cache.
        memory.remember("ns/g", Some("uid-1"), "Granted");
        assert_eq!(memory.newest("ns/g", Some("uid-1"), Some(&"Pending")), Some("Granted"));
        assert_eq!(memory.newest("ns/g", Some("uid-1"), None), Some("Granted"));
        // A re-created object of the same name (new uid) starts afresh.
        assert_eq!(memory.newest("ns/g", Some("uid-2"), None), None);
        assert_eq!(memory.newest("ns/g", Some("uid-2"), Some(&"Pending")), Some("Pending"));
        memory.forget("ns/g");
        assert_eq!(memory.newest("ns/g", Some("uid-1"), Some(&"Pending")), Some("Pending"));
    }

    #[derive(Debug, thiserror::Error)]
    #[error("inner")]
    struct Inner;

    impl MetricLabel for Inner {
        fn metric_label(&self) -> &'static str {
            "inner"
        }
    }

    #[test]
    fn finalizer_errors_keep_the_label_of_their_cause() {
        assert_eq!(finalizer::Error::ApplyFailed(Inner).metric_label(), "inner");
        assert_eq!(finalizer::Error::CleanupFailed(Inner).metric_label(), "inner");
        assert_eq!(finalizer::Error::<Inner>::UnnamedObject.metric_label(), "finalizer");
    }
}
