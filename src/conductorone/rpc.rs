//! The `BatonService` client: a TLS gRPC channel (rustls, public roots plus
//! an optional extra CA bundle), a bearer token on every call, and one
//! method per RPC this connector uses.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};
use std::io::Read as _;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

use super::credentials::ClientCredentials;
use super::proto::baton::{self, baton_service_client::BatonServiceClient};
use super::proto::google::rpc::Status as RpcStatus;
use super::status::ConnectionReason;
use super::token::{C1Endpoint, TokenError, TokenSource, error_chain, is_tls_error, looks_like_tls};

/// Bytes per `UploadData` message (the SDK's size; the limit is 1 MiB).
pub const UPLOAD_CHUNK: usize = 512 * 1024;
/// Timeout of every unary call.
const CALL_TIMEOUT: Duration = Duration::from_secs(60);

/// A failed call: no token, or a gRPC status.
#[derive(Debug, thiserror::Error)]
pub enum RpcError {
    #[error(transparent)]
    Token(#[from] TokenError),
    #[error("ConductorOne answered {}: {}", .0.code(), .0.message())]
    Status(tonic::Status),
}

impl RpcError {
    /// What the failure says about the connection.
    pub fn reason(&self) -> ConnectionReason {
        match self {
            RpcError::Token(TokenError::Rejected { .. }) => ConnectionReason::InvalidClientCredentials,
            RpcError::Token(TokenError::Tls { .. }) => ConnectionReason::TlsError,
            RpcError::Token(_) => ConnectionReason::Unreachable,
            RpcError::Status(status) => match status.code() {
                tonic::Code::Unauthenticated | tonic::Code::PermissionDenied => {
                    ConnectionReason::InvalidClientCredentials
                }
                tonic::Code::InvalidArgument
                | tonic::Code::Unimplemented
                | tonic::Code::FailedPrecondition
                | tonic::Code::NotFound => ConnectionReason::HelloRejected,
                _ if is_tls_error(status) || looks_like_tls(&self.describe()) => ConnectionReason::TlsError,
                _ => ConnectionReason::Unreachable,
            },
        }
    }

    /// Whether retrying the same call with the same credential cannot help
    /// (the SDK's startup Hello stops on these).
    pub fn is_permanent(&self) -> bool {
        matches!(
            self.reason(),
            ConnectionReason::InvalidClientCredentials | ConnectionReason::HelloRejected
        )
    }

    /// A message for logs and status: the cause chain, never a token.
    pub fn describe(&self) -> String {
        match self {
            RpcError::Token(err) => err.to_string(),
            RpcError::Status(status) => {
                let mut text = format!("{}: {}", status.code(), status.message());
                if let Some(source) = std::error::Error::source(status) {
                    text.push_str(": ");
                    text.push_str(&error_chain(source));
                }
                text
            }
        }
    }
}

/// How a task ends, as sent in FinishTask.
#[derive(Debug, Clone)]
pub enum Finish {
    Success {
        response: Option<prost_types::Any>,
    },
    Error {
        code: tonic::Code,
        message: String,
        non_retryable: bool,
    },
}

/// An authenticated `BatonService` client for one host id.
#[derive(Clone)]
pub struct C1Client {
    grpc: BatonServiceClient<Channel>,
    tokens: Arc<TokenSource>,
    host_id: String,
}

impl std::fmt::Debug for C1Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("C1Client")
            .field("tokens", &self.tokens)
            .field("host_id", &self.host_id)
            .finish()
    }
}

impl C1Client {
    /// Builds the channel (connected lazily, so an unreachable server is an
    /// error of the first call, not of construction). Fails on a bad extra
    /// CA bundle or an unusable host.
    pub fn new(
        credentials: Arc<ClientCredentials>,
        endpoint: C1Endpoint,
        host_id: &str,
        token_counter: Option<prometheus_client::metrics::counter::Counter>,
    ) -> Result<Self, String> {
        let mut tls = ClientTlsConfig::new().with_webpki_roots();
        if let Some(pem) = &endpoint.extra_ca_pem {
            tls = tls.ca_certificate(Certificate::from_pem(pem));
        }
        let channel = Endpoint::from_shared(endpoint.grpc_uri())
            .map_err(|e| format!("ConductorOne API host {:?}: {e}", endpoint.api_host()))?
            .tls_config(tls)
            .map_err(|e| format!("TLS setup: {}", error_chain(&e)))?
            .connect_timeout(Duration::from_secs(10))
            .tcp_keepalive(Some(Duration::from_secs(30)))
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_while_idle(true)
            .connect_lazy();
        let mut tokens = TokenSource::new(credentials, endpoint)?;
        if let Some(counter) = token_counter {
            tokens = tokens.with_counter(counter);
        }
        let tokens = Arc::new(tokens);
        Ok(C1Client {
            grpc: BatonServiceClient::new(channel),
            tokens,
            host_id: host_id.to_owned(),
        })
    }

    pub fn host_id(&self) -> &str {
        &self.host_id
    }

    pub fn tokens(&self) -> &TokenSource {
        &self.tokens
    }

    /// A request carrying `authorization: Bearer …` and a timeout.
    async fn request<T>(&self, message: T, timeout: Option<Duration>) -> Result<tonic::Request<T>, RpcError> {
        let token = self.tokens.token().await?;
        let mut request = tonic::Request::new(message);
        let value = format!("Bearer {}", token.secret())
            .parse()
            .map_err(|_| RpcError::Token(TokenError::BadResponse("the access token is not a valid header".into())))?;
        request.metadata_mut().insert("authorization", value);
        if let Some(timeout) = timeout {
            request.set_timeout(timeout);
        }
        Ok(request)
    }

    /// Maps a status, dropping the cached token when the server refused it
    /// (the next call fetches a new one).
    async fn status(&self, status: tonic::Status) -> RpcError {
        if status.code() == tonic::Code::Unauthenticated {
            self.tokens.invalidate().await;
        }
        RpcError::Status(status)
    }

    /// Hello, at start (empty `task_id`) or answering a `hello` task.
    pub async fn hello(&self, task_id: &str) -> Result<(), RpcError> {
        let request = self
            .request(hello_request(&self.host_id, task_id), Some(CALL_TIMEOUT))
            .await?;
        match self.grpc.clone().hello(request).await {
            Ok(_) => Ok(()),
            Err(status) => Err(self.status(status).await),
        }
    }

    pub async fn get_task(&self) -> Result<baton::BatonServiceGetTaskResponse, RpcError> {
        let message = baton::BatonServiceGetTaskRequest {
            host_id: self.host_id.clone(),
        };
        let request = self.request(message, Some(CALL_TIMEOUT)).await?;
        match self.grpc.clone().get_task(request).await {
            Ok(response) => Ok(response.into_inner()),
            Err(status) => Err(self.status(status).await),
        }
    }

    pub async fn heartbeat(&self, task_id: &str) -> Result<baton::BatonServiceHeartbeatResponse, RpcError> {
        let message = baton::BatonServiceHeartbeatRequest {
            host_id: self.host_id.clone(),
            task_id: task_id.to_owned(),
            ..Default::default()
        };
        let request = self.request(message, Some(CALL_TIMEOUT)).await?;
        match self.grpc.clone().heartbeat(request).await {
            Ok(response) => Ok(response.into_inner()),
            Err(status) => Err(self.status(status).await),
        }
    }

    pub async fn finish(&self, task_id: &str, finish: Finish) -> Result<(), RpcError> {
        let request = self
            .request(finish_request(&self.host_id, task_id, finish), Some(CALL_TIMEOUT))
            .await?;
        match self.grpc.clone().finish_task(request).await {
            Ok(_) => Ok(()),
            Err(status) => Err(self.status(status).await),
        }
    }

    /// Streams the file: metadata, 512 KiB data chunks, eof with its sha256.
    /// Returns the bytes sent.
    pub async fn upload(&self, task_id: &str, path: &Path) -> Result<u64, RpcError> {
        let file = std::fs::File::open(path)
            .map_err(|e| RpcError::Status(tonic::Status::internal(format!("cannot open {}: {e}", path.display()))))?;
        let size = file.metadata().map(|m| m.len()).unwrap_or_default();
        let metadata = baton::BatonServiceUploadAssetRequest {
            msg: Some(baton::baton_service_upload_asset_request::Msg::Metadata(
                baton::baton_service_upload_asset_request::UploadMetadata {
                    host_id: self.host_id.clone(),
                    task_id: task_id.to_owned(),
                    annotations: Vec::new(),
                },
            )),
        };
        let stream = futures::stream::once(async { metadata }).chain(upload_chunks(file));
        let request = self.request(stream, None).await?;
        match self.grpc.clone().upload_asset(request).await {
            Ok(_) => Ok(size),
            Err(status) => Err(self.status(status).await),
        }
    }
}

use futures::StreamExt as _;

/// The data messages of a file, then its eof. A read error ends the stream
/// without eof, which the server rejects (the upload is retried). Reads are
/// plain blocking reads of a local file, 512 KiB at a time: short enough for
/// an async task, and no extra tokio feature.
fn upload_chunks(file: std::fs::File) -> impl futures::Stream<Item = baton::BatonServiceUploadAssetRequest> {
    use baton::baton_service_upload_asset_request::{Msg, UploadData, UploadEof};
    futures::stream::unfold(Some((file, Sha256::new())), |state| async move {
        let (mut file, mut hasher) = state?;
        let mut buf = vec![0u8; UPLOAD_CHUNK];
        let mut filled = 0;
        while filled < UPLOAD_CHUNK {
            match file.read(&mut buf[filled..]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(err) => {
                    tracing::warn!(error = %err, "reading the c1z for upload failed");
                    return None;
                }
            }
        }
        if filled == 0 {
            let eof = Msg::Eof(UploadEof {
                sha256_checksum: hasher.finalize().to_vec(),
                annotations: Vec::new(),
            });
            return Some((baton::BatonServiceUploadAssetRequest { msg: Some(eof) }, None));
        }
        buf.truncate(filled);
        hasher.update(&buf);
        let data = Msg::Data(UploadData { data: buf });
        Some((
            baton::BatonServiceUploadAssetRequest { msg: Some(data) },
            Some((file, hasher)),
        ))
    })
}

fn hello_request(host_id: &str, task_id: &str) -> baton::BatonServiceHelloRequest {
    use baton::baton_service_hello_request::{BuildInfo, OsInfo};
    let hostname = hostname::get()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_default();
    baton::BatonServiceHelloRequest {
        host_id: host_id.to_owned(),
        task_id: task_id.to_owned(),
        build_info: Some(BuildInfo {
            lang_version: "rust".into(),
            package: env!("CARGO_PKG_NAME").into(),
            package_version: env!("CARGO_PKG_VERSION").into(),
        }),
        os_info: Some(OsInfo {
            hostname: hostname.chars().take(256).collect(),
            os: std::env::consts::OS.into(),
            platform: std::env::consts::OS.into(),
            kernel_arch: std::env::consts::ARCH.into(),
            ..Default::default()
        }),
        connector_metadata: Some(super::proto::connector::ConnectorMetadata {
            display_name: "Bitbucket".into(),
            description: "Bitbucket Cloud workspaces, groups, projects and repositories (bitbucket-operator)".into(),
        }),
        annotations: Vec::new(),
    }
}

fn finish_request(host_id: &str, task_id: &str, finish: Finish) -> baton::BatonServiceFinishTaskRequest {
    use baton::baton_service_finish_task_request::{Error, FinalState, Success};
    let (status, state) = match finish {
        Finish::Success { response } => (
            None,
            FinalState::Success(Success {
                annotations: Vec::new(),
                response,
            }),
        ),
        Finish::Error {
            code,
            message,
            non_retryable,
        } => (
            Some(RpcStatus {
                code: code as i32,
                message,
                details: Vec::new(),
            }),
            FinalState::Error(Error {
                non_retryable,
                annotations: Vec::new(),
                response: None,
            }),
        ),
    };
    baton::BatonServiceFinishTaskRequest {
        host_id: host_id.to_owned(),
        task_id: task_id.to_owned(),
        status,
        final_state: Some(state),
    }
}
