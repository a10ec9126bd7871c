//! A fake ConductorOne tenant for tests: the token endpoint and the
//! `BatonService` gRPC API on one TLS port (a test CA made with rcgen).
//!
//! - `POST /auth/v1/token` checks the form, verifies the assertion's EdDSA
//!   signature with the credential's public key and its claims (iss = sub =
//!   client id, aud = tenant host without port, a 240 s window around now,
//!   a 32-hex nonce), and issues a token; a revoked credential gets 401.
//! - Every gRPC call must carry `authorization: Bearer <issued token>`.
//! - Tasks are scripted ([`FakeC1::push_task`]); heartbeats answer
//!   `cancelled` for tasks marked with [`FakeC1::cancel`]; uploads are
//!   reassembled, checked against the eof sha256, and read back with the
//!   project's own c1z reader.
//! - [`FakeC1::stop_listening`] / [`FakeC1::start_listening`] make the port
//!   refuse connections for a while.
//! - The credential REST calls (PROTOCOL.md §4): RotateCredential issues a new
//!   connector credential (the old stays valid), GetCredentials describes one,
//!   RevokeCredential revokes it (its tokens stop working at once). They need
//!   a bearer token like the gRPC calls. The fake can refuse connector
//!   credentials or API keys as callers ([`FakeC1::set_refusals`]), fail a
//!   chosen call ([`FakeC1::fail_next`]), issue pairs that cannot
//!   authenticate ([`FakeC1::issue_broken_pairs`]), and say which
//!   credentials are active ([`FakeC1::active_credentials`]).

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::{Form, Path as AxumPath, State as AxumState};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use bitbucket_operator::conductorone::c1z::{self, C1z};
use bitbucket_operator::conductorone::credentials::{ClientCredentials, secret_from_seed, verify_assertion};
use bitbucket_operator::conductorone::proto::baton::baton_service_server::BatonServiceServer;
use bitbucket_operator::conductorone::proto::baton::{self, baton_service_server::BatonService};
use futures::StreamExt;
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tonic::{Request, Response, Status, Streaming};

/// One received upload.
#[derive(Debug, Clone)]
pub struct Upload {
    pub task_id: String,
    pub host_id: String,
    pub bytes: Vec<u8>,
    pub max_chunk: usize,
    pub sha256_ok: bool,
}

impl Upload {
    /// The file read back with the project's reader.
    pub fn c1z(&self) -> C1z {
        c1z::read_bytes(&self.bytes).expect("the upload is a readable c1z")
    }
}

/// Everything the fake saw and what it will answer.
#[derive(Debug, Default)]
pub struct Recorded {
    pub token_requests: u32,
    pub token_rejections: Vec<String>,
    pub issued: Vec<String>,
    pub hellos: Vec<baton::BatonServiceHelloRequest>,
    pub get_tasks: u32,
    pub heartbeats: Vec<String>,
    pub finished: Vec<baton::BatonServiceFinishTaskRequest>,
    pub uploads: Vec<Upload>,
    pub unauthenticated_calls: u32,
    /// Every credential the tenant knows, the initial connector one first.
    pub credentials: Vec<FakeCredential>,
    /// REST calls: (name, id of the calling credential, HTTP status answered).
    pub rest_calls: Vec<(RestCall, String, u16)>,
    tasks: VecDeque<baton::Task>,
    cancelled: HashSet<String>,
    /// Issued token → the credential it was issued to.
    token_owner: HashMap<String, String>,
    refuse_connector_callers: bool,
    refuse_api_keys: bool,
    broken_pairs: bool,
    /// Lifetime of issued credentials (`expiresTime`), if they expire.
    credential_lifetime: Option<jiff::SignedDuration>,
    failures: Vec<(RestCall, u16)>,
}

/// Which credential REST call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestCall {
    Rotate,
    Get,
    Revoke,
}

/// Who a credential belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CredentialKind {
    /// A connector credential (`…/ccc`).
    Connector,
    /// A personal API key (`…/pcc`).
    ApiKey,
}

/// A credential of the fake tenant.
#[derive(Debug, Clone)]
pub struct FakeCredential {
    pub id: String,
    pub client_id: String,
    pub kind: CredentialKind,
    pub revoked: bool,
    pub expires_time: Option<jiff::Timestamp>,
    kid: Option<String>,
    public_key: Vec<u8>,
}

impl Recorded {
    fn credential_by_client_id(&self, client_id: &str) -> Option<&FakeCredential> {
        self.credentials.iter().find(|c| c.client_id == client_id)
    }

    /// The live credential a bearer token was issued to.
    fn token_credential(&self, token: Option<&str>) -> Option<&FakeCredential> {
        let id = self.token_owner.get(token?)?;
        self.credentials.iter().find(|c| &c.id == id && !c.revoked)
    }
}

struct Shared {
    audience: String,
    next_poll: Duration,
    next_heartbeat: Duration,
    token_lifetime: u64,
    recorded: Mutex<Recorded>,
}

/// A running fake tenant.
pub struct FakeC1 {
    pub addr: SocketAddr,
    /// PEM of the CA that signed the server certificate.
    pub ca_pem: String,
    pub client_id: String,
    pub client_secret: String,
    shared: Arc<Shared>,
    tls: tokio_rustls::TlsAcceptor,
    server: Mutex<Option<JoinHandle<()>>>,
}

/// Options of [`FakeC1::start`].
pub struct FakeOptions {
    pub next_poll: Duration,
    pub next_heartbeat: Duration,
    pub token_lifetime: u64,
}

impl Default for FakeOptions {
    fn default() -> Self {
        FakeOptions {
            next_poll: Duration::from_millis(50),
            next_heartbeat: Duration::from_millis(200),
            token_lifetime: 3600,
        }
    }
}

impl FakeC1 {
    pub async fn start(options: FakeOptions) -> FakeC1 {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let (ca_pem, tls) = test_tls();
        let tenant = "acme.conductor.one";
        let client_id = format!("bitbucket-connector@{tenant}/ccc");
        let client_secret = secret_from_seed(&rand::random::<[u8; 32]>(), Some("key-1"));
        let initial = FakeCredential {
            id: format!("cred-initial-{:x}", rand::random::<u32>()),
            client_id: client_id.clone(),
            kind: CredentialKind::Connector,
            revoked: false,
            expires_time: None,
            kid: Some("key-1".into()),
            public_key: ClientCredentials::parse(&client_id, &client_secret)
                .unwrap()
                .public_key()
                .to_vec(),
        };
        let shared = Arc::new(Shared {
            audience: tenant.to_owned(),
            next_poll: options.next_poll,
            next_heartbeat: options.next_heartbeat,
            token_lifetime: options.token_lifetime,
            recorded: Mutex::new(Recorded {
                credentials: vec![initial],
                ..Recorded::default()
            }),
        });
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let fake = FakeC1 {
            addr,
            ca_pem,
            client_id,
            client_secret,
            shared,
            tls,
            server: Mutex::new(None),
        };
        fake.serve(listener);
        fake
    }

    /// `BATON_C1_API_HOST` for this fake.
    pub fn api_host(&self) -> String {
        self.addr.to_string()
    }

    pub fn recorded(&self) -> std::sync::MutexGuard<'_, Recorded> {
        self.shared.recorded.lock().unwrap()
    }

    pub fn push_task(&self, task: baton::Task) {
        self.recorded().tasks.push_back(task);
    }

    /// Heartbeats for this task answer `cancelled` from now on.
    pub fn cancel(&self, task_id: &str) {
        self.recorded().cancelled.insert(task_id.to_owned());
    }

    /// The initial credential is revoked: token requests get 401, issued tokens stop working.
    pub fn revoke_credential(&self) {
        self.recorded().credentials[0].revoked = true;
    }

    /// ConductorOne's id of the initial connector credential.
    pub fn initial_credential_id(&self) -> String {
        self.recorded().credentials[0].id.clone()
    }

    /// Registers a new credential of `kind` and returns its (client id, secret).
    pub fn add_credential(&self, kind: CredentialKind) -> (String, String) {
        let mut recorded = self.recorded();
        let n = recorded.credentials.len();
        let (name, suffix) = match kind {
            CredentialKind::Connector => (format!("bitbucket-connector-{n}"), "ccc"),
            CredentialKind::ApiKey => (format!("rotation-key-{n}"), "pcc"),
        };
        let client_id = format!("{name}@{}/{suffix}", self.shared.audience);
        let id = format!("cred-{n}-{:x}", rand::random::<u32>());
        let secret = secret_from_seed(&rand::random::<[u8; 32]>(), Some(&id));
        let public_key = ClientCredentials::parse(&client_id, &secret)
            .unwrap()
            .public_key()
            .to_vec();
        let expires_time = recorded.credential_lifetime.map(|d| jiff::Timestamp::now() + d);
        // The kid is the credential id (as ConductorOne's JWKs name their key).
        recorded.credentials.push(FakeCredential {
            kid: Some(id.clone()),
            id,
            client_id: client_id.clone(),
            kind,
            revoked: false,
            expires_time,
            public_key,
        });
        (client_id, secret)
    }

    /// Refuse REST calls from connector credentials and/or API keys (403, gRPC code 7).
    pub fn set_refusals(&self, connector_callers: bool, api_keys: bool) {
        let mut recorded = self.recorded();
        recorded.refuse_connector_callers = connector_callers;
        recorded.refuse_api_keys = api_keys;
    }

    /// The next `call` answers HTTP `status` (queued; each failure is used once).
    pub fn fail_next(&self, call: RestCall, status: u16) {
        self.recorded().failures.push((call, status));
    }

    /// RotateCredential issues pairs whose secret does not match the key
    /// ConductorOne holds: they cannot authenticate.
    pub fn issue_broken_pairs(&self, broken: bool) {
        self.recorded().broken_pairs = broken;
    }

    /// Credentials issued from now on expire this long after issue.
    pub fn set_credential_lifetime(&self, lifetime: Option<jiff::SignedDuration>) {
        self.recorded().credential_lifetime = lifetime;
    }

    /// Sets the expiry of a credential.
    pub fn set_expiry(&self, id: &str, expires_time: Option<jiff::Timestamp>) {
        if let Some(c) = self.recorded().credentials.iter_mut().find(|c| c.id == id) {
            c.expires_time = expires_time;
        }
    }

    /// Ids of the connector credentials not revoked.
    pub fn active_credentials(&self) -> Vec<String> {
        self.recorded()
            .credentials
            .iter()
            .filter(|c| c.kind == CredentialKind::Connector && !c.revoked)
            .map(|c| c.id.clone())
            .collect()
    }

    /// Whether `id` is known and not revoked.
    pub fn is_active(&self, id: &str) -> bool {
        self.recorded().credentials.iter().any(|c| c.id == id && !c.revoked)
    }

    /// Closes the port and every open connection.
    pub fn stop_listening(&self) {
        if let Some(server) = self.server.lock().unwrap().take() {
            server.abort();
        }
    }

    /// Listens again on the same port.
    pub async fn start_listening(&self) {
        let listener = TcpListener::bind(self.addr).await.unwrap();
        self.serve(listener);
    }

    fn serve(&self, listener: TcpListener) {
        let router = Router::new()
            .route("/auth/v1/token", post(token))
            .route("/api/v1/apps/connectors/credentials", post(rest_rotate))
            .route(
                "/api/v1/apps/{app}/connectors/{connector}/credentials/{id}",
                get(rest_get).post(rest_revoke),
            )
            .with_state(Arc::clone(&self.shared))
            .route_service(
                "/c1.connectorapi.baton.v1.BatonService/{*method}",
                BatonServiceServer::new(Service(Arc::clone(&self.shared))),
            );
        let tls = self.tls.clone();
        let handle = tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let (tls, router) = (tls.clone(), router.clone());
                connections.spawn(async move {
                    // A failed handshake (a client that does not trust the CA) just ends the connection.
                    let Ok(stream) = tls.accept(tcp).await else { return };
                    let service = hyper_util::service::TowerToHyperService::new(router);
                    let _ = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
                while connections.try_join_next().is_some() {}
            }
        });
        *self.server.lock().unwrap() = Some(handle);
    }

    /// Waits until `done` holds for what was recorded.
    pub async fn wait_for(&self, what: &str, timeout: Duration, done: impl Fn(&Recorded) -> bool) {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if done(&self.recorded()) {
                return;
            }
            if tokio::time::Instant::now() > deadline {
                panic!("timed out waiting for {what}: {:?}", self.summary());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn summary(&self) -> String {
        let r = self.recorded();
        format!(
            "tokens {} (rejected {:?}), hellos {}, get_tasks {}, heartbeats {}, finished {}, uploads {}",
            r.token_requests,
            r.token_rejections,
            r.hellos.len(),
            r.get_tasks,
            r.heartbeats.len(),
            r.finished.len(),
            r.uploads.len()
        )
    }
}

impl Drop for FakeC1 {
    fn drop(&mut self) {
        self.stop_listening();
    }
}

/// A test CA and a server certificate for localhost / 127.0.0.1 signed by it.
fn test_tls() -> (String, tokio_rustls::TlsAcceptor) {
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "fake ConductorOne test CA");
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).unwrap();
    let leaf_params = rcgen::CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap();
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let leaf = leaf_params.signed_by(&leaf_key, &ca).unwrap();
    let key = rustls::pki_types::PrivateKeyDer::try_from(leaf_key.serialize_der()).unwrap();
    let mut config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(vec![leaf.der().clone(), ca.der().clone()], key)
        .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    (ca.pem(), tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

#[derive(serde::Deserialize)]
struct TokenForm {
    client_id: String,
    grant_type: String,
    client_assertion_type: String,
    client_assertion: String,
}

async fn token(AxumState(shared): AxumState<Arc<Shared>>, Form(form): Form<TokenForm>) -> axum::response::Response {
    let mut recorded = shared.recorded.lock().unwrap();
    recorded.token_requests += 1;
    let reject = |recorded: &mut Recorded, status: StatusCode, why: String| {
        recorded.token_rejections.push(why.clone());
        (
            status,
            axum::Json(serde_json::json!({"error": "invalid_client", "error_description": why})),
        )
            .into_response()
    };
    if form.grant_type != "client_credentials"
        || form.client_assertion_type != "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
    {
        return reject(&mut recorded, StatusCode::BAD_REQUEST, "bad form".into());
    }
    let Some(credential) = recorded.credential_by_client_id(&form.client_id).cloned() else {
        return reject(
            &mut recorded,
            StatusCode::BAD_REQUEST,
            "bad form: unknown client".into(),
        );
    };
    if credential.revoked {
        return reject(&mut recorded, StatusCode::UNAUTHORIZED, "credential revoked".into());
    }
    let (header, claims) = match verify_assertion(&form.client_assertion, &credential.public_key) {
        Ok(v) => v,
        Err(why) => return reject(&mut recorded, StatusCode::UNAUTHORIZED, why),
    };
    let now = jiff::Timestamp::now().as_second();
    let claims_ok = claims.iss == credential.client_id
        && claims.sub == credential.client_id
        && claims.aud == shared.audience
        && claims.nbf <= now
        && now < claims.exp
        && claims.exp - claims.nbf == 240
        && (claims.iat - now).abs() < 10;
    let header_ok =
        header.nonce.len() == 32 && header.nonce.bytes().all(|b| b.is_ascii_hexdigit()) && header.kid == credential.kid;
    if !claims_ok || !header_ok {
        return reject(
            &mut recorded,
            StatusCode::UNAUTHORIZED,
            format!("bad claims {claims:?} or header {header:?}"),
        );
    }
    let token = format!("token-{}-{:x}", recorded.issued.len(), rand::random::<u64>());
    recorded.issued.push(token.clone());
    recorded.token_owner.insert(token.clone(), credential.id.clone());
    axum::Json(serde_json::json!({
        "access_token": token, "token_type": "Bearer", "expires_in": shared.token_lifetime,
    }))
    .into_response()
}

struct Service(Arc<Shared>);

impl Service {
    fn authorize<T>(&self, request: &Request<T>) -> Result<(), Status> {
        let mut recorded = self.0.recorded.lock().unwrap();
        let presented = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::to_owned);
        let valid = recorded
            .token_credential(presented.as_deref())
            .is_some_and(|c| c.kind == CredentialKind::Connector);
        if valid {
            Ok(())
        } else {
            recorded.unauthenticated_calls += 1;
            Err(Status::unauthenticated("invalid or missing bearer token"))
        }
    }

    fn duration(d: Duration) -> Option<prost_types::Duration> {
        Some(prost_types::Duration {
            seconds: d.as_secs() as i64,
            nanos: d.subsec_nanos() as i32,
        })
    }
}

type UploadResult = Result<Response<baton::BatonServiceUploadAssetResponse>, Status>;

#[tonic::async_trait]
impl BatonService for Service {
    async fn hello(
        &self,
        request: Request<baton::BatonServiceHelloRequest>,
    ) -> Result<Response<baton::BatonServiceHelloResponse>, Status> {
        self.authorize(&request)?;
        let hello = request.into_inner();
        if hello.host_id.is_empty()
            || hello
                .connector_metadata
                .as_ref()
                .is_none_or(|m| m.display_name.is_empty())
        {
            return Err(Status::invalid_argument(
                "host_id and connector_metadata.display_name are required",
            ));
        }
        self.0.recorded.lock().unwrap().hellos.push(hello);
        Ok(Response::new(Default::default()))
    }

    async fn get_task(
        &self,
        request: Request<baton::BatonServiceGetTaskRequest>,
    ) -> Result<Response<baton::BatonServiceGetTaskResponse>, Status> {
        self.authorize(&request)?;
        let mut recorded = self.0.recorded.lock().unwrap();
        recorded.get_tasks += 1;
        let task = recorded.tasks.pop_front();
        Ok(Response::new(baton::BatonServiceGetTaskResponse {
            task,
            next_poll: Self::duration(self.0.next_poll),
            next_heartbeat: Self::duration(self.0.next_heartbeat),
            annotations: Vec::new(),
        }))
    }

    async fn heartbeat(
        &self,
        request: Request<baton::BatonServiceHeartbeatRequest>,
    ) -> Result<Response<baton::BatonServiceHeartbeatResponse>, Status> {
        self.authorize(&request)?;
        let beat = request.into_inner();
        let mut recorded = self.0.recorded.lock().unwrap();
        recorded.heartbeats.push(beat.task_id.clone());
        Ok(Response::new(baton::BatonServiceHeartbeatResponse {
            next_heartbeat: Self::duration(self.0.next_heartbeat),
            cancelled: recorded.cancelled.contains(&beat.task_id),
            ..Default::default()
        }))
    }

    async fn finish_task(
        &self,
        request: Request<baton::BatonServiceFinishTaskRequest>,
    ) -> Result<Response<baton::BatonServiceFinishTaskResponse>, Status> {
        self.authorize(&request)?;
        let finish = request.into_inner();
        if finish.final_state.is_none() {
            return Err(Status::invalid_argument("final_state is required"));
        }
        self.0.recorded.lock().unwrap().finished.push(finish);
        Ok(Response::new(Default::default()))
    }

    async fn upload_asset(&self, request: Request<Streaming<baton::BatonServiceUploadAssetRequest>>) -> UploadResult {
        use baton::baton_service_upload_asset_request::Msg;
        self.authorize(&request)?;
        let mut stream = request.into_inner();
        let Some(Ok(baton::BatonServiceUploadAssetRequest {
            msg: Some(Msg::Metadata(meta)),
        })) = stream.next().await
        else {
            return Err(Status::invalid_argument("the first message must be metadata"));
        };
        let (mut bytes, mut max_chunk, mut hasher) = (Vec::new(), 0, Sha256::new());
        while let Some(message) = stream.next().await {
            match message?.msg {
                Some(Msg::Data(data)) => {
                    if data.data.is_empty() || data.data.len() > 1024 * 1024 {
                        return Err(Status::invalid_argument("data chunks must be 1 byte to 1 MiB"));
                    }
                    max_chunk = max_chunk.max(data.data.len());
                    hasher.update(&data.data);
                    bytes.extend_from_slice(&data.data);
                }
                Some(Msg::Eof(eof)) => {
                    let sha256_ok =
                        eof.sha256_checksum.len() == 32 && hasher.finalize().as_slice() == eof.sha256_checksum;
                    self.0.recorded.lock().unwrap().uploads.push(Upload {
                        task_id: meta.task_id,
                        host_id: meta.host_id,
                        bytes,
                        max_chunk,
                        sha256_ok,
                    });
                    return Ok(Response::new(Default::default()));
                }
                _ => return Err(Status::invalid_argument("unexpected message")),
            }
        }
        Err(Status::invalid_argument("the stream ended without eof"))
    }
}

/// Scripted task builders.
pub fn task_id() -> String {
    bitbucket_operator::conductorone::ksuid::new()
}

pub fn sync_full_task() -> baton::Task {
    baton::Task {
        id: task_id(),
        task_type: Some(baton::task::TaskType::SyncFull(Default::default())),
        ..Default::default()
    }
}

pub fn hello_task() -> baton::Task {
    baton::Task {
        id: task_id(),
        task_type: Some(baton::task::TaskType::Hello(Default::default())),
        ..Default::default()
    }
}

/// The REST caller: the credential of a valid bearer token, unless refused.
/// Records the call and applies a queued failure.
fn rest_caller(
    recorded: &mut Recorded,
    headers: &axum::http::HeaderMap,
    call: RestCall,
) -> Result<String, Box<axum::response::Response>> {
    let token = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let Some(caller) = recorded.token_credential(token).cloned() else {
        recorded.unauthenticated_calls += 1;
        recorded.rest_calls.push((call, String::new(), 401));
        return Err(Box::new(rest_error(
            StatusCode::UNAUTHORIZED,
            16,
            "invalid or missing bearer token",
        )));
    };
    let refused = match caller.kind {
        CredentialKind::Connector => recorded.refuse_connector_callers,
        CredentialKind::ApiKey => recorded.refuse_api_keys,
    };
    if refused {
        recorded.rest_calls.push((call, caller.id, 403));
        return Err(Box::new(rest_error(StatusCode::FORBIDDEN, 7, "permission denied")));
    }
    if let Some(i) = recorded.failures.iter().position(|(c, _)| *c == call) {
        let (_, status) = recorded.failures.remove(i);
        recorded.rest_calls.push((call, caller.id, status));
        let status = StatusCode::from_u16(status).unwrap();
        return Err(Box::new(rest_error(status, 14, "injected failure")));
    }
    recorded.rest_calls.push((call, caller.id.clone(), 200));
    Ok(caller.id)
}

fn rest_error(status: StatusCode, code: i32, message: &str) -> axum::response::Response {
    (
        status,
        axum::Json(serde_json::json!({"code": code, "message": message})),
    )
        .into_response()
}

fn credential_json(c: &FakeCredential, app: &str, connector: &str, secret: Option<&str>) -> serde_json::Value {
    let mut v = serde_json::json!({
        "id": c.id, "clientId": c.client_id, "appId": app, "connectorId": connector,
        "displayName": c.client_id, "createdAt": "2026-12-01T00:00:00Z",
        "expiresTime": c.expires_time.map(|t| t.to_string()),
        "deletedAt": c.revoked.then_some("2026-12-01T00:00:00Z"),
    });
    if let Some(secret) = secret {
        v["clientSecret"] = secret.into();
    }
    v
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct RotateBody {
    app_id: String,
    connector_id: String,
}

async fn rest_rotate(
    AxumState(shared): AxumState<Arc<Shared>>,
    headers: axum::http::HeaderMap,
    axum::Json(body): axum::Json<RotateBody>,
) -> axum::response::Response {
    let mut recorded = shared.recorded.lock().unwrap();
    if let Err(response) = rest_caller(&mut recorded, &headers, RestCall::Rotate) {
        return *response;
    }
    if body.app_id.is_empty() || body.connector_id.is_empty() {
        return rest_error(StatusCode::BAD_REQUEST, 3, "appId and connectorId are required");
    }
    let n = recorded.credentials.len();
    let client_id = format!("bitbucket-connector-{n}@{}/ccc", shared.audience);
    let id = format!("cred-{n}-{:x}", rand::random::<u32>());
    let secret = secret_from_seed(&rand::random::<[u8; 32]>(), Some(&id));
    // A broken pair: ConductorOne holds another key than the one handed out.
    let key_source = if recorded.broken_pairs {
        secret_from_seed(&rand::random::<[u8; 32]>(), Some(&id))
    } else {
        secret.clone()
    };
    let public_key = ClientCredentials::parse(&client_id, &key_source)
        .unwrap()
        .public_key()
        .to_vec();
    let credential = FakeCredential {
        kid: Some(id.clone()),
        id,
        client_id,
        kind: CredentialKind::Connector,
        revoked: false,
        expires_time: recorded.credential_lifetime.map(|d| jiff::Timestamp::now() + d),
        public_key,
    };
    let json = credential_json(&credential, &body.app_id, &body.connector_id, Some(&secret));
    recorded.credentials.push(credential);
    axum::Json(serde_json::json!({ "credential": json })).into_response()
}

async fn rest_get(
    AxumState(shared): AxumState<Arc<Shared>>,
    AxumPath((app, connector, id)): AxumPath<(String, String, String)>,
    headers: axum::http::HeaderMap,
) -> axum::response::Response {
    let mut recorded = shared.recorded.lock().unwrap();
    if let Err(response) = rest_caller(&mut recorded, &headers, RestCall::Get) {
        return *response;
    }
    match recorded.credentials.iter().find(|c| c.id == id) {
        Some(c) => {
            axum::Json(serde_json::json!({"credential": credential_json(c, &app, &connector, None)})).into_response()
        }
        None => rest_error(StatusCode::NOT_FOUND, 5, "credential not found"),
    }
}

async fn rest_revoke(
    AxumState(shared): AxumState<Arc<Shared>>,
    AxumPath((_app, _connector, id)): AxumPath<(String, String, String)>,
    headers: axum::http::HeaderMap,
) -> axum::response::Response {
    let mut recorded = shared.recorded.lock().unwrap();
    if let Err(response) = rest_caller(&mut recorded, &headers, RestCall::Revoke) {
        return *response;
    }
    match recorded.credentials.iter_mut().find(|c| c.id == id && !c.revoked) {
        Some(c) => {
            c.revoked = true;
            axum::Json(serde_json::json!({})).into_response()
        }
        None => rest_error(StatusCode::NOT_FOUND, 5, "credential not found"),
    }
}
