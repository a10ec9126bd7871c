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
//! requests. Shutdown stops accepting, lets requests in flight finish
//! (idle connections close at once) and waits at most
//! [`ConnectionLimits::shutdown_grace`] for them.

use std::future::Future;
use std::time::Duration;

use axum::Router;
use axum::serve::Listener;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::sync::watch;

/// A request's headers must have arrived this long after the connection is
/// ready for it, unless configured.
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How long shutdown waits for requests in flight, unless configured.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(20);

/// What one connection may cost in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Longest wait for a complete request head (request line and headers),
    /// from accept or from the end of the previous response: a slow,
    /// silent or idle keep-alive connection is closed after it.
    pub header_read_timeout: Duration,
    /// Longest wait, at shutdown, for requests in flight to finish.
    pub shutdown_grace: Duration,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits {
            header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
            shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
        }
    }
}

/// Serves `app` on every connection `listener` accepts until `shutdown`
/// resolves, then shuts down gracefully (see the module doc). Works for
/// plain TCP and for [`super::tls::TlsListener`].
pub async fn serve_connections<L>(
    mut listener: L,
    app: Router,
    limits: ConnectionLimits,
    shutdown: impl Future<Output = ()>,
) where
    L: Listener,
{
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .keep_alive(true);
    // Each connection task holds a receiver: the sender sees when all ended.
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (io, _peer) = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut shutdown => break,
        };
        let connection = builder.serve_connection(TokioIo::new(io), TowerToHyperService::new(app.clone()));
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
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
