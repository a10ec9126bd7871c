//! Serving a router on a listener, one HTTP/1.1 connection per task, with
//! hyper's connection builder instead of `axum::serve`: `axum::serve` sets
//! no header-read timeout, so a client that opens a connection and sends its
//! request line slowly, or nothing at all (slowloris), holds a socket and a
//! task forever.
//!
//! Here every connection must deliver a request's headers in full within
//! [`ConnectionLimits::header_read_timeout`], counted from when it is ready
//! for a request: on accept, and again after each response. So the same
//! limit also caps how long a keep-alive connection may sit idle between
//! requests. A client that asks and then reads the answer slowly or never
//! (a full socket buffer) is cut off once the socket has taken no bytes for
//! [`ConnectionLimits::write_timeout`]. Shutdown stops accepting, lets
//! requests in flight finish (idle connections close at once) and waits at
//! most [`ConnectionLimits::shutdown_grace`] for them.
//!
//! Each call of [`serve_connections`] keeps at most
//! [`ConnectionLimits::max_connections`] connections open: a slot is taken
//! *before* `accept`, so once all are taken the listener stops accepting and
//! further clients wait in the kernel's listen backlog, costing no task and
//! no memory here, until a connection ends. Queueing rather than refusing
//! (accept-then-close) keeps a burst of legitimate clients working (they are
//! served late, not failed) and gives a flood nothing to make us do.
//! Behind [`super::tls::TlsListener`] the TLS layer's own bounded stages
//! (handshakes in progress, and a short queue of finished ones) also hold
//! connections ahead of this cap; they are bounded too.
//!
//! The limit belongs to the listener, never to the process: every call has
//! its own slots. So when the data API has its own (TLS) listener, a flood
//! there cannot take the probe/metrics listener's slots, and the kubelet's
//! probes are still answered. When the data API shares the plain port with
//! the probes (no certificate), they share that port's one limit too, so
//! the kubelet's probes go to a probes-only listener of their own
//! (`run --probe-addr`, which the chart sets) that no data API client can
//! reach.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::serve::Listener;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio_io_timeout::TimeoutStream;

/// A request's headers must have arrived this long after the connection is
/// ready for it, unless configured.
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a socket may take no bytes of a response, unless configured.
pub const DEFAULT_WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// Connections open at once per listener, unless configured.
pub const DEFAULT_MAX_CONNECTIONS: usize = 512;
/// How long shutdown waits for requests in flight, unless configured.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(20);

/// What one connection may cost in time, and how many a listener keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Longest wait for a complete request head (request line and headers),
    /// from accept or from the end of the previous response: a slow,
    /// silent or idle keep-alive connection is closed after it.
    pub header_read_timeout: Duration,
    /// Longest time a write may wait for the socket to take any byte: a
    /// client that stops reading its response is closed after it.
    pub write_timeout: Duration,
    /// Connections open at once on one listener; more wait in the backlog.
    pub max_connections: usize,
    /// Longest wait, at shutdown, for requests in flight to finish.
    pub shutdown_grace: Duration,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits {
            header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
            write_timeout: DEFAULT_WRITE_TIMEOUT,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
        }
    }
}

/// A listener's connection figures; unregistered by default (they still
/// count), or a listener's series of [`crate::metrics::Metrics`].
#[derive(Debug, Clone, Default)]
pub struct ConnectionMetrics {
    /// Connections open now.
    pub open: Gauge,
    /// Times the listener stopped accepting because every slot was taken
    /// (clients then wait in the backlog).
    pub deferred: Counter,
}

/// A connection's slot: frees it and counts the connection closed when the
/// connection's task ends, however it ends.
struct Slot {
    _permit: OwnedSemaphorePermit,
    open: Gauge,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.open.dec();
    }
}

/// Serves `app` on every connection `listener` accepts until `shutdown`
/// resolves, then shuts down gracefully (see the module doc). Works for
/// plain TCP and for [`super::tls::TlsListener`].
pub async fn serve_connections<L>(
    mut listener: L,
    app: Router,
    limits: ConnectionLimits,
    metrics: ConnectionMetrics,
    shutdown: impl Future<Output = ()>,
) where
    L: Listener,
{
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .keep_alive(true);
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    // Each connection task holds a receiver: the sender sees when all ended.
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let permit = match Arc::clone(&slots).try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                metrics.deferred.inc();
                tokio::select! {
                    permit = Arc::clone(&slots).acquire_owned() => match permit {
                        Ok(permit) => permit,
                        // Never closed; stop serving rather than spin if it were.
                        Err(_) => break,
                    },
                    () = &mut shutdown => break,
                }
            }
        };
        let (io, _peer) = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut shutdown => break,
        };
        metrics.open.inc();
        let slot = Slot {
            _permit: permit,
            open: metrics.open.clone(),
        };
        let mut io = TimeoutStream::new(io);
        io.set_write_timeout(Some(limits.write_timeout));
        let connection = builder.serve_connection(TokioIo::new(Box::pin(io)), TowerToHyperService::new(app.clone()));
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let mut connection = std::pin::pin!(connection);
            let stopping = async move {
                // An error means the server is gone: stop as well.
                let _ = stop.wait_for(|stopping| *stopping).await;
                stop
            };
            let _stop = tokio::select! {
                result = connection.as_mut() => return finished(result),
                stop = stopping => stop,
            };
            connection.as_mut().graceful_shutdown();
            finished(connection.await);
        });
    }
    drop(listener);
    drop(stop_rx);
    let _ = stop_tx.send(true);
    if tokio::time::timeout(limits.shutdown_grace, stop_tx.closed())
        .await
        .is_err()
    {
        tracing::warn!(
            grace = ?limits.shutdown_grace,
            "HTTP connections still open after the shutdown grace period; leaving them"
        );
    }
}

/// A connection's end; a client going away or timing out is routine.
fn finished(result: Result<(), hyper::Error>) {
    if let Err(err) = result {
        tracing::debug!(error = %err, "HTTP connection ended");
    }
}
