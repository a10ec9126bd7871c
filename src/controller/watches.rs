//! The operator's `BitbucketConnector` watches, shared by every consumer.
//!
//! Three things follow connectors: the connector controller of each scope,
//! the grant controller of each scope (a grant may name a connector of any
//! watched namespace, `connectorRef.namespace`), and readiness. Each used to
//! open its own watches, so `--watch-namespaces a,b,c` (N namespaces) cost
//! N + N² + N connector watches on the API server. Now there is exactly one
//! watch per scope (one per watched namespace, or one cluster-wide when all
//! namespaces are watched), whatever N:
//!
//! - Each scope has one kube-runtime *shared* reflector
//!   (`reflector::store_shared`): one watcher feeds one store, and the store
//!   hands the objects it caches to every subscriber (`Writer::subscribe`).
//!   One store per scope, never one store fed by several watchers: each
//!   watcher's relist (`Init`..`InitDone`) replaces its whole store, and would
//!   wipe the other scopes' objects.
//! - The connector controller of a scope runs on that scope's subscription
//!   and store (`Controller::for_shared_stream`), with the same predicates as
//!   before (generation, annotations, finalizers), so its own status writes
//!   still do not come back as reconciles; its Secret mapper reads the same
//!   store.
//! - Each grant controller subscribes to every scope
//!   (`Controller::watches_shared_stream`): any connector change, a status
//!   write included (becoming Ready), re-triggers the grants that reference
//!   it, across namespaces.
//! - Readiness is set once every scope's store has listed.
//!
//! Nothing is dropped: a subscription applies backpressure to its watch
//! instead of losing an event (the channel waits for its slowest reader,
//! `SUBSCRIBER_BUFFER` events deep; both controllers drain their triggers
//! continuously, even while a reconcile runs), and a relist re-announces
//! every object.
//! Deletions are the one thing kube-runtime's subscriptions do not carry
//! (they only announce objects still in the store), so this module forwards
//! each `Delete` event of the scope's watch to the grant controllers itself,
//! through unbounded channels (a deletion is never lost to a full buffer).
//!
//! Subscriptions are taken before [`ConnectorWatches::run`] starts the
//! watches: a late subscriber would only see later changes, and its
//! controller would never reconcile what already exists. So the watches live
//! exactly as long as the controllers that consume them (one leadership
//! term). A standby replica runs the same watches without subscribers,
//! for readiness only; it stops them when it becomes leader and starts the
//! term's own, so a replica never holds more than one watch per scope.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use futures::{Stream, StreamExt, TryStreamExt};
use kube::Client;
use kube::api::Api;
use kube::runtime::reflector::{ReflectHandle, Store, store::Writer};
use kube::runtime::{WatchStreamExt, watcher};
use tokio::sync::mpsc;

use crate::crd::BitbucketConnector;

/// How many connector changes a slow subscriber may lag behind before the
/// watch waits for it (backpressure, never loss).
const SUBSCRIBER_BUFFER: usize = 1024;

/// One watch, one store per scope; subscriptions handed out before [`run`](Self::run).
pub struct ConnectorWatches {
    scopes: Vec<Scope>,
}

/// A scope: one namespace, or all (`None`).
struct Scope {
    namespace: Option<String>,
    api: Api<BitbucketConnector>,
    writer: Writer<BitbucketConnector>,
    /// Grant controllers told of this scope's deletions.
    deletions: Vec<mpsc::UnboundedSender<Arc<BitbucketConnector>>>,
}

/// One scope's connectors, for the connector controller of that scope.
pub struct ScopeFeed {
    /// The scope's cache (the controller's store, the Secret mapper's lookup).
    pub reader: Store<BitbucketConnector>,
    /// Every connector the store caches or re-caches (adds, changes, relists).
    pub changes: ReflectHandle<BitbucketConnector>,
}

impl ConnectorWatches {
    /// The scopes of `namespaces` (empty: one cluster-wide scope). Nothing is
    /// watched until [`run`](Self::run).
    pub fn new(client: &Client, namespaces: &[String]) -> Self {
        let scopes: Vec<Option<String>> = if namespaces.is_empty() {
            vec![None]
        } else {
            namespaces.iter().cloned().map(Some).collect()
        };
        let scopes = scopes
            .into_iter()
            .map(|namespace| Scope {
                api: match &namespace {
                    Some(ns) => Api::namespaced(client.clone(), ns),
                    None => Api::all(client.clone()),
                },
                namespace,
                writer: Writer::new_shared(SUBSCRIBER_BUFFER, ()),
                deletions: Vec::new(),
            })
            .collect();
        ConnectorWatches { scopes }
    }

    /// The scope watching `namespace` exactly (`None`: the cluster-wide one),
    /// or `None` when there is no such scope.
    pub fn feed(&self, namespace: Option<&str>) -> Option<ScopeFeed> {
        let scope = self.scopes.iter().find(|s| s.namespace.as_deref() == namespace)?;
        Some(ScopeFeed {
            reader: scope.writer.as_reader(),
            changes: subscribe(&scope.writer),
        })
    }

    /// Every connector change of every scope, deletions included: what a
    /// grant controller maps to the grants that reference the connector.
    pub fn all_changes(&mut self) -> impl Stream<Item = Arc<BitbucketConnector>> + Send + use<> {
        let (deleted_tx, mut deleted_rx) = mpsc::unbounded_channel();
        let applied = futures::stream::select_all(self.scopes.iter_mut().map(|scope| {
            scope.deletions.push(deleted_tx.clone());
            subscribe(&scope.writer)
        }));
        let deleted = futures::stream::poll_fn(move |cx| deleted_rx.poll_recv(cx));
        futures::stream::select(applied, deleted)
    }

    /// Watches every scope until `shutdown`; sets `ready` once every scope
    /// has listed. Subscriptions taken before this call see everything.
    pub async fn run(self, ready: Arc<AtomicBool>, shutdown: impl Future<Output = ()>) {
        let readers: Vec<_> = self.scopes.iter().map(|s| s.writer.as_reader()).collect();
        let listed = async move {
            for reader in &readers {
                if reader.wait_until_ready().await.is_err() {
                    return;
                }
            }
            ready.store(true, Ordering::Relaxed);
        };
        let watching = futures::future::join_all(self.scopes.into_iter().map(Scope::watch));
        tokio::select! {
            _ = futures::future::join(watching, listed) => {}
            _ = shutdown => {}
        }
    }
}

impl Scope {
    /// Drives the scope's one watch: store, subscribers, deletions.
    async fn watch(self) {
        let Scope {
            namespace,
            api,
            writer,
            deletions,
        } = self;
        watcher(api, watcher::Config::default().any_semantic())
            .default_backoff()
            .reflect_shared(writer)
            .inspect_ok(|event| {
                if let watcher::Event::Delete(connector) = event {
                    let connector = Arc::new(connector.clone());
                    for tx in &deletions {
                        // A receiver gone means its controller stopped: nothing to tell.
                        let _ = tx.send(Arc::clone(&connector));
                    }
                }
            })
            .for_each(|event| {
                if let Err(err) = event {
                    tracing::debug!(namespace = namespace.as_deref().unwrap_or("*"), error = %err, "connector watch");
                }
                std::future::ready(())
            })
            .await;
    }
}

/// A subscription to a store made by [`Writer::new_shared`] (always one).
fn subscribe(writer: &Writer<BitbucketConnector>) -> ReflectHandle<BitbucketConnector> {
    writer.subscribe().expect("connector stores are created shared")
}
