//! TLS for the data API: a listener for [`super::conn::serve_connections`]
//! that terminates TLS with a certificate and key from PEM files (a
//! Kubernetes TLS Secret, e.g. one cert-manager keeps renewed), reloaded
//! when the files change.
//!
//! Handshakes run in their own tasks, at most [`MAX_HANDSHAKES`] at once and
//! each within [`HANDSHAKE_TIMEOUT`], so a client that never finishes its
//! handshake holds neither the accept loop nor memory for long. rustls with
//! the `ring` provider, TLS 1.2 and 1.3, HTTP/1.1 by ALPN.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::crypto::CryptoProvider;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::{ClientHello, ResolvesServerCert};
use tokio_rustls::rustls::sign::CertifiedKey;
use tokio_rustls::rustls::{ServerConfig, crypto::ring};
use tokio_rustls::server::TlsStream;

/// Handshakes in progress at once; more connections wait in the kernel's
/// backlog.
pub const MAX_HANDSHAKES: usize = 256;
/// A handshake not finished by then is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the files are checked for a renewed certificate.
pub const RELOAD_INTERVAL: Duration = Duration::from_secs(30);

/// Where the PEM certificate chain and private key are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A TLS listener (an `axum::serve::Listener`) for [`super::conn::serve_connections`].
pub struct TlsListener {
    accepted: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for TlsListener {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl TlsListener {
    /// Loads the certificate (a bad one is an error now, not at the first
    /// handshake) and starts accepting on `addr`; the files are checked for
    /// a renewal every [`RELOAD_INTERVAL`].
    pub async fn bind(addr: SocketAddr, files: TlsFiles) -> anyhow::Result<Self> {
        Self::bind_reloading_every(addr, files, RELOAD_INTERVAL).await
    }

    /// [`TlsListener::bind`] with another reload interval (tests).
    pub async fn bind_reloading_every(addr: SocketAddr, files: TlsFiles, every: Duration) -> anyhow::Result<Self> {
        let provider = Arc::new(ring::default_provider());
        let resolver = Arc::new(ReloadingCert::load(files, Arc::clone(&provider))?);
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .context("TLS protocol versions")?
            .with_no_client_auth()
            .with_cert_resolver(Arc::clone(&resolver) as Arc<dyn ResolvesServerCert>);
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind(addr).await?;
        let local = listener.local_addr()?;
        let (tx, accepted) = mpsc::channel(64);
        let accept = tokio::spawn(accept_loop(listener, acceptor, tx));
        let reload = tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.tick().await;
            loop {
                tick.tick().await;
                let resolver = Arc::clone(&resolver);
                let _ = tokio::task::spawn_blocking(move || resolver.reload_if_changed()).await;
            }
        });
        Ok(TlsListener {
            accepted,
            local,
            tasks: vec![accept, reload],
        })
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.accepted.recv().await {
            Some(connection) => connection,
            // The accept loop only ends when the listener is dropped.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}

async fn accept_loop(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    accepted: mpsc::Sender<(TlsStream<TcpStream>, SocketAddr)>,
) {
    let handshakes = Arc::new(Semaphore::new(MAX_HANDSHAKES));
    loop {
        let Ok(slot) = Arc::clone(&handshakes).acquire_owned().await else {
            return;
        };
        let (tcp, peer) = match listener.accept().await {
            Ok(connection) => connection,
            Err(err) => {
                // Out of file descriptors and the like: wait, then go on.
                tracing::warn!(error = %err, "accepting a data API connection failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let acceptor = acceptor.clone();
        let accepted = accepted.clone();
        tokio::spawn(async move {
            let _slot = slot;
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(stream)) => {
                    let _ = accepted.send((stream, peer)).await;
                }
                Ok(Err(err)) => tracing::debug!(%peer, error = %err, "TLS handshake failed"),
                Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
            }
        });
    }
}

/// The certificate in force, replaced when the files change; a renewal
/// that does not load keeps the old one (and says so).
struct ReloadingCert {
    files: TlsFiles,
    provider: Arc<CryptoProvider>,
    current: RwLock<(Arc<CertifiedKey>, Option<SystemTime>)>,
}

impl ReloadingCert {
    fn load(files: TlsFiles, provider: Arc<CryptoProvider>) -> anyhow::Result<Self> {
        let key = load_certified_key(&files, &provider)?;
        let modified = modified(&files);
        Ok(ReloadingCert {
            files,
            provider,
            current: RwLock::new((Arc::new(key), modified)),
        })
    }

    fn reload_if_changed(&self) {
        let modified = modified(&self.files);
        if modified == self.current.read().unwrap_or_else(|e| e.into_inner()).1 {
            return;
        }
        match load_certified_key(&self.files, &self.provider) {
            Ok(key) => {
                *self.current.write().unwrap_or_else(|e| e.into_inner()) = (Arc::new(key), modified);
                tracing::info!(cert = %self.files.cert.display(), "reloaded the data API's TLS certificate");
            }
            Err(err) => {
                tracing::warn!(error = %format!("{err:#}"), "a changed TLS certificate did not load; keeping the previous one")
            }
        }
    }
}

/// Names the files only: never key material.
impl std::fmt::Debug for ReloadingCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReloadingCert")
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(&self.current.read().unwrap_or_else(|e| e.into_inner()).0))
    }
}

/// The later of the two files' modification times (a Secret volume swaps
/// both at once through a symlink).
fn modified(files: &TlsFiles) -> Option<SystemTime> {
    let time = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    time(&files.cert).max(time(&files.key))
}

/// Parses the chain and key; errors name the file, never its content.
fn load_certified_key(files: &TlsFiles, provider: &CryptoProvider) -> anyhow::Result<CertifiedKey> {
    let cert_pem = std::fs::read(&files.cert).with_context(|| format!("reading {}", files.cert.display()))?;
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow::anyhow!("{} is not a PEM certificate chain: {e}", files.cert.display()))?;
    anyhow::ensure!(!chain.is_empty(), "{} holds no certificate", files.cert.display());
    let key_pem = std::fs::read(&files.key).with_context(|| format!("reading {}", files.key.display()))?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem)
        .map_err(|_| anyhow::anyhow!("{} holds no usable PEM private key", files.key.display()))?;
    CertifiedKey::from_der(chain, key, provider)
        .map_err(|e| anyhow::anyhow!("the key in {} does not fit the certificate: {e}", files.key.display()))
}
