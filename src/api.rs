//! The read-only data API: the store's inventory over HTTP, for dashboards
//! and access reviews, on the operator's port beside the probes and metrics,
//! or on its own TLS port when given a certificate ([`DataApiArgs`]).
//!
//! ```text
//! GET /api/v1/namespaces/{ns}/connectors/{name}/resources[?type=repository]   (paged)
//! GET /api/v1/namespaces/{ns}/connectors/{name}/grants                        (paged)
//! GET /api/v1/namespaces/{ns}/connectors/{name}/grants.csv   (paged CSV, for access reviews)
//! GET /api/v1/namespaces/{ns}/connectors/{name}/who-can?repository=ws/slug    (paged)
//! GET /api/v1/namespaces/{ns}/connectors/{name}/access-of?user=nickname (repositories paged)
//! GET /api/v1/namespaces/{ns}/connectors/{name}/runs
//! GET /api/v1/namespaces/{ns}/connectors/{name}/audit[?since=24h|RFC3339]   (the grant audit log)
//! ```
//!
//! Paged listings take `limit` and `continue` and answer
//! `{"items": [...], "metadata": {"continue": "...", "remainingItemCount": n}}`
//! (see [`paging`]). `access-of` answers the user's access with the same
//! `metadata`; its `repositories` (about 2,500 for a workspace owner) are
//! the paged list, the rest comes whole on every page.
//!
//! `grants.csv` is the CLI's `access grants --csv` (the same rows from
//! [`access::review_rows`], the same columns and order), paged the same way
//! because a CSV body has nowhere to put metadata: every page starts with
//! the header row, so each page opens on its own in a spreadsheet, and while
//! more rows follow the response carries
//!
//! ```text
//! X-Continue: <token>                  (pass back as ?continue=<token>)
//! X-Remaining-Item-Count: <rows after this page>
//! Link: </api/v1/…/grants.csv?limit=N&continue=<token>>; rel="next"
//! ```
//!
//! The last page has none of them. A script follows `X-Continue` (or the
//! RFC 8288 `next` link) and drops the header line of every page but the
//! first; a spreadsheet user asks for `?limit=5000` and gets the whole
//! review in one file up to that size. A sync between pages expires the token (410), as for the JSON listings,
//! so concatenated pages are always one consistent export. Fields are
//! quoted so a spreadsheet never evaluates one as a formula.
//!
//! Every request needs `Authorization: Bearer <Kubernetes token>` issued for
//! the data API's audience (`bitbucket-operator` by default:
//! `kubectl create token <sa> --audience bitbucket-operator`). The token is
//! checked with a TokenReview for that audience, so a token for the API
//! server is refused here and a token for the data API is useless against
//! the API server. The caller must then be allowed `get` on the
//! `bitbucketconnectors/data` subresource of that connector (a
//! SubjectAccessReview). `data` is not served by the API server; it exists so
//! that RBAC can grant reading the inventory separately from reading the
//! resource, e.g.:
//!
//! ```yaml
//! rules:
//!   - apiGroups: [connectors.dev]
//!     resources: [bitbucketconnectors/data]
//!     verbs: [get]
//! ```
//!
//! Only the replica holding the leader-election lease serves data (others
//! answer 503): each replica keeps its own store and only the leader's is
//! current.
//!
//! Bounded: decisions are cached (positive and negative, per token hash,
//! size-capped, single-flight), so a flood of junk tokens costs at most one
//! TokenReview per distinct token per TTL; requests in progress are capped
//! (429 beyond); responses are paged; connections are capped in number and
//! bounded in time (`--data-api-max-connections`, `--data-api-write-timeout`,
//! `--data-api-header-read-timeout`; [`crate::http::conn`]). TLS:
//! [`crate::http::serve_data_api`].

mod cache;
pub mod paging;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, UserInfo};
use k8s_openapi::api::authorization::v1::{ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec};
use kube::api::{Api, PostParams};
use serde::{Deserialize, Serialize};
use serde_json::json;
use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;

use crate::access::{self, AccessError};
use crate::crd::GROUP;
use crate::http::conn::{ConnectionLimits, DEFAULT_MAX_CONNECTIONS};
use crate::http::tls::TlsFiles;
use crate::model::{ResourceType, SyncKind};
use crate::store::Store;
use cache::TtlCache;
use paging::{PageError, PageQuery, Paged};

/// The audience callers' tokens must be issued for, unless configured.
pub const DEFAULT_AUDIENCE: &str = "bitbucket-operator";

/// The `run` flags of the data API, for `#[command(flatten)]`.
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct DataApiArgs {
    /// Audience callers' tokens must be issued for
    /// (`kubectl create token <sa> --audience <this>`).
    #[arg(long = "data-api-audience", env = "DATA_API_AUDIENCE", default_value = DEFAULT_AUDIENCE)]
    pub audience: String,
    /// PEM certificate chain: with --data-api-tls-key, the data API is served
    /// over TLS on --data-api-addr (and no longer on the plain HTTP port).
    #[arg(long = "data-api-tls-cert", env = "DATA_API_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for --data-api-tls-cert.
    #[arg(long = "data-api-tls-key", env = "DATA_API_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Address of the TLS listener.
    #[arg(long = "data-api-addr", env = "DATA_API_ADDR", default_value = "0.0.0.0:8443")]
    pub addr: SocketAddr,
    /// Data API requests served at once; more get 429.
    #[arg(long = "data-api-max-concurrent", env = "DATA_API_MAX_CONCURRENT", default_value_t = DataApiSettings::default().max_concurrent)]
    pub max_concurrent: usize,
    /// Authorization decisions remembered (each cache), oldest dropped first.
    #[arg(long = "data-api-cache-entries", env = "DATA_API_CACHE_ENTRIES", default_value_t = DataApiSettings::default().cache_entries)]
    pub cache_entries: usize,
    /// A connection must send a request's headers within this (from accept,
    /// or from the previous response: also the keep-alive idle limit), or
    /// it is closed. Applies to the port serving the data API.
    #[arg(long = "data-api-header-read-timeout", env = "DATA_API_HEADER_READ_TIMEOUT", default_value = "10s", value_parser = positive_duration)]
    pub header_read_timeout: Duration,
    /// Connections the port serving the data API keeps open at once
    /// (1..=65536); further clients wait in the listen backlog until one
    /// closes. A probe-only port has its own limit.
    #[arg(long = "data-api-max-connections", env = "DATA_API_MAX_CONNECTIONS", default_value_t = DEFAULT_MAX_CONNECTIONS, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=MAX_CONNECTIONS_CEILING))]
    pub max_connections: usize,
    /// A response write that the client's socket takes no byte of for this
    /// long (a client reading slowly or not at all) closes the connection.
    #[arg(long = "data-api-write-timeout", env = "DATA_API_WRITE_TIMEOUT", default_value = "30s", value_parser = positive_duration)]
    pub write_timeout: Duration,
}

/// Highest `--data-api-max-connections`: beyond it a file-descriptor limit
/// or memory gives out first.
pub const MAX_CONNECTIONS_CEILING: u64 = 65536;

/// A duration above zero: a zero timeout would close every connection at
/// once.
fn positive_duration(text: &str) -> Result<Duration, String> {
    let duration = crate::sync::cli::parse_duration(text)?;
    if duration.is_zero() {
        return Err("must be longer than zero".into());
    }
    Ok(duration)
}

impl DataApiArgs {
    pub fn settings(&self) -> DataApiSettings {
        DataApiSettings {
            audience: self.audience.clone(),
            cache_entries: self.cache_entries,
            max_concurrent: self.max_concurrent,
            connections: ConnectionLimits {
                header_read_timeout: self.header_read_timeout,
                write_timeout: self.write_timeout,
                max_connections: self.max_connections,
                ..ConnectionLimits::default()
            },
            ..DataApiSettings::default()
        }
    }

    /// The certificate files, when TLS is configured.
    pub fn tls(&self) -> Option<TlsFiles> {
        Some(TlsFiles {
            cert: self.tls_cert.clone()?,
            key: self.tls_key.clone()?,
        })
    }
}

/// How callers are authenticated and how much they may ask at once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataApiSettings {
    /// TokenReview audience; tokens for other audiences are refused.
    pub audience: String,
    /// How long a decision is remembered: an RBAC change or a revoked token
    /// applies within this.
    pub cache_ttl: Duration,
    /// Entries per decision cache (tokens; token × connector).
    pub cache_entries: usize,
    /// Requests in progress at once.
    pub max_concurrent: usize,
    /// How long a connection may take to send a request, idle or stall a
    /// response, and how many the port keeps open.
    pub connections: ConnectionLimits,
}

impl Default for DataApiSettings {
    fn default() -> Self {
        DataApiSettings {
            audience: DEFAULT_AUDIENCE.to_owned(),
            cache_ttl: Duration::from_secs(10),
            cache_entries: 4096,
            max_concurrent: 32,
            connections: ConnectionLimits::default(),
        }
    }
}

/// What the data API needs: the Kubernetes client for reviews, the store,
/// whether this replica runs the sync loops, and the gate deciding who may
/// read.
#[derive(Clone)]
pub struct ApiState {
    pub kube: kube::Client,
    pub store: Arc<Store>,
    /// True while this replica holds the lease (always, without leader
    /// election). A standby's store is not kept current, so it answers 503
    /// rather than stale or empty data.
    pub leading: Arc<std::sync::atomic::AtomicBool>,
    /// Authentication, authorization and admission (see [`AccessGate`]);
    /// `Default::default()` uses [`DataApiSettings::default`].
    pub decisions: Arc<AccessGate>,
}

pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/api/v1/namespaces/{ns}/connectors/{name}/resources", get(resources))
        .route("/api/v1/namespaces/{ns}/connectors/{name}/grants", get(grants))
        .route("/api/v1/namespaces/{ns}/connectors/{name}/grants.csv", get(grants_csv))
        .route("/api/v1/namespaces/{ns}/connectors/{name}/who-can", get(who_can))
        .route("/api/v1/namespaces/{ns}/connectors/{name}/access-of", get(access_of))
        .route("/api/v1/namespaces/{ns}/connectors/{name}/runs", get(runs))
        .route("/api/v1/namespaces/{ns}/connectors/{name}/audit", get(audit))
        .route_layer(middleware::from_fn_with_state(Arc::clone(&state.decisions), admit))
        .with_state(state)
}

/// Refuses a request beyond `max_concurrent` at once with 429, before any
/// review or store read: a flood queues nowhere.
async fn admit(State(gate): State<Arc<AccessGate>>, request: Request, next: Next) -> Response {
    let Ok(_permit) = Arc::clone(&gate.in_flight).try_acquire_owned() else {
        let mut response = ApiError(
            StatusCode::TOO_MANY_REQUESTS,
            "too many data API requests in progress; try again shortly".into(),
        )
        .into_response();
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
        return response;
    };
    next.run(request).await
}

/// An API failure as a Kubernetes-style JSON error; never carries a token.
#[derive(Debug, Clone)]
struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.0, axum::Json(json!({"code": self.0.as_u16(), "message": self.1}))).into_response();
        if self.0 == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
        }
        response
    }
}

impl From<AccessError> for ApiError {
    fn from(err: AccessError) -> Self {
        match err {
            AccessError::Store(e) => ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
            AccessError::AmbiguousUser { .. } => ApiError(StatusCode::BAD_REQUEST, err.to_string()),
            other => ApiError(StatusCode::NOT_FOUND, other.to_string()),
        }
    }
}

/// Decides who may read, remembering decisions so that a dashboard polling
/// the API, or a flood of junk tokens, costs at most one TokenReview per
/// distinct token and one SubjectAccessReview per token and connector within
/// the TTL. Both caches are size-capped and keyed by a SHA-256 of the token;
/// the token itself is never stored. Also caps requests in progress.
pub struct AccessGate {
    settings: DataApiSettings,
    /// Token hash → who it is, or the refusal.
    identities: TtlCache<[u8; 32], Result<UserInfo, ApiError>>,
    /// (token hash, namespace, connector) → allowed, or the refusal.
    permissions: TtlCache<([u8; 32], String, String), Result<(), ApiError>>,
    in_flight: Arc<Semaphore>,
    token_reviews: AtomicU64,
    access_reviews: AtomicU64,
}

impl Default for AccessGate {
    fn default() -> Self {
        AccessGate::new(DataApiSettings::default())
    }
}

impl AccessGate {
    pub fn new(settings: DataApiSettings) -> Self {
        AccessGate {
            identities: TtlCache::new(settings.cache_entries, settings.cache_ttl),
            permissions: TtlCache::new(settings.cache_entries, settings.cache_ttl),
            in_flight: Arc::new(Semaphore::new(settings.max_concurrent.max(1))),
            token_reviews: AtomicU64::new(0),
            access_reviews: AtomicU64::new(0),
            settings,
        }
    }

    pub fn settings(&self) -> &DataApiSettings {
        &self.settings
    }

    /// Decisions held (identities, permissions): never above the capacity.
    pub fn cached_decisions(&self) -> (usize, usize) {
        (self.identities.len(), self.permissions.len())
    }

    /// TokenReviews and SubjectAccessReviews sent so far (for metrics).
    pub fn reviews_sent(&self) -> (u64, u64) {
        (
            self.token_reviews.load(Ordering::Relaxed),
            self.access_reviews.load(Ordering::Relaxed),
        )
    }
}

/// Longest bearer token sent for review; service-account tokens are about
/// 1 KiB.
const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// TokenReview, then SubjectAccessReview for `get bitbucketconnectors/data`,
/// each remembered (see [`AccessGate`]).
async fn authorize(state: &ApiState, headers: &HeaderMap, ns: &str, name: &str) -> Result<(), ApiError> {
    check_names(ns, name)?;
    let token = bearer(headers)?;
    let gate = &state.decisions;
    let hash: [u8; 32] = Sha256::digest(token.as_bytes()).into();
    let user = gate
        .identities
        .get_or_decide(hash, || authenticate(state, token))
        .await??;
    gate.permissions
        .get_or_decide((hash, ns.to_owned(), name.to_owned()), || {
            may_read(state, user, ns, name)
        })
        .await?
}

/// Names are checked before anything else so that cache keys stay small and
/// a junk path costs no review.
fn check_names(ns: &str, name: &str) -> Result<(), ApiError> {
    let dns = |s: &str, max: usize, dots: bool| {
        !s.is_empty()
            && s.len() <= max
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || (dots && b == b'.'))
            && !s.starts_with(['-', '.'])
            && !s.ends_with(['-', '.'])
    };
    if !dns(ns, 63, false) || !dns(name, 253, true) {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            "the namespace or connector name is not a valid Kubernetes name".into(),
        ));
    }
    Ok(())
}

fn bearer(headers: &HeaderMap) -> Result<&str, ApiError> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty() && t.len() <= MAX_TOKEN_BYTES)
        .ok_or_else(|| ApiError(StatusCode::UNAUTHORIZED, "a bearer token is required".into()))
}

/// The outer `Err` is a failed review (not remembered); the inner one a
/// refusal (remembered).
type Reviewed<T> = Result<Result<T, ApiError>, ApiError>;

async fn authenticate(state: &ApiState, token: &str) -> Reviewed<UserInfo> {
    let audience = &state.decisions.settings.audience;
    let review = TokenReview {
        spec: TokenReviewSpec {
            token: Some(token.to_owned()),
            audiences: Some(vec![audience.clone()]),
        },
        ..Default::default()
    };
    state.decisions.token_reviews.fetch_add(1, Ordering::Relaxed);
    let reviewed = Api::<TokenReview>::all(state.kube.clone())
        .create(&PostParams::default(), &review)
        .await
        .map_err(|e| ApiError(StatusCode::SERVICE_UNAVAILABLE, format!("token review failed: {e}")))?;
    let status = reviewed.status.unwrap_or_default();
    // An audience-unaware authenticator answers without audiences: the token
    // is then one for the API server, not for us.
    let for_us = status.audiences.as_ref().is_some_and(|a| a.contains(audience));
    Ok(match (status.authenticated, status.user) {
        (Some(true), Some(user)) if for_us => Ok(user),
        (Some(true), Some(_)) => Err(ApiError(
            StatusCode::UNAUTHORIZED,
            format!(
                "the token was not issued for the audience {audience:?} (kubectl create token … --audience {audience})"
            ),
        )),
        _ => Err(ApiError(StatusCode::UNAUTHORIZED, "the token was not accepted".into())),
    })
}

async fn may_read(state: &ApiState, user: UserInfo, ns: &str, name: &str) -> Reviewed<()> {
    let access = SubjectAccessReview {
        spec: SubjectAccessReviewSpec {
            user: user.username.clone(),
            groups: user.groups.clone(),
            uid: user.uid.clone(),
            extra: user.extra.clone(),
            resource_attributes: Some(ResourceAttributes {
                namespace: Some(ns.to_owned()),
                verb: Some("get".into()),
                group: Some(GROUP.into()),
                resource: Some("bitbucketconnectors".into()),
                subresource: Some("data".into()),
                name: Some(name.to_owned()),
                ..Default::default()
            }),
            ..Default::default()
        },
        ..Default::default()
    };
    state.decisions.access_reviews.fetch_add(1, Ordering::Relaxed);
    let decided = Api::<SubjectAccessReview>::all(state.kube.clone())
        .create(&PostParams::default(), &access)
        .await
        .map_err(|e| ApiError(StatusCode::SERVICE_UNAVAILABLE, format!("access review failed: {e}")))?;
    Ok(if decided.status.is_some_and(|s| s.allowed) {
        Ok(())
    } else {
        let who = user.username.unwrap_or_else(|| "the caller".into());
        Err(ApiError(
            StatusCode::FORBIDDEN,
            format!("{who} may not get bitbucketconnectors/data of {ns}/{name}"),
        ))
    })
}

/// Authorizes, then runs a store read off the async runtime.
async fn read<T, F>(state: ApiState, headers: HeaderMap, ns: String, name: String, f: F) -> Result<T, ApiError>
where
    T: Send + 'static,
    F: FnOnce(&Store, &str) -> Result<T, ApiError> + Send + 'static,
{
    authorize(&state, &headers, &ns, &name).await?;
    if !state.leading.load(std::sync::atomic::Ordering::Relaxed) {
        return Err(ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            "this replica is a standby; the data API is served by the lease holder".into(),
        ));
    }
    let connector = format!("{ns}/{name}");
    tokio::task::spawn_blocking(move || {
        if !state.store.connectors().map_err(internal)?.contains(&connector) {
            return Err(ApiError(
                StatusCode::NOT_FOUND,
                format!("no synced data for connector {connector}"),
            ));
        }
        f(&state.store, &connector)
    })
    .await
    .map_err(internal)?
}

/// Authorizes, reads a whole listing, and cuts one page out of it, with a
/// `continue` token bound to the listing (`what`) and the store's current
/// generations of the connector.
async fn read_listing<T, F>(
    state: ApiState,
    headers: HeaderMap,
    (ns, name): (String, String),
    what: String,
    query: &PageQuery,
    f: F,
) -> Result<Paged<T>, ApiError>
where
    T: Send + 'static,
    F: FnOnce(&Store, &str) -> Result<Vec<T>, ApiError> + Send + 'static,
{
    let (items, snapshot) = read(state, headers, ns, name, move |store, c| {
        // Generations first: a sync committing in between then expires the
        // token instead of binding newer generations to older items.
        let snapshot = listing_snapshot(store, c, what)?;
        Ok((f(store, c)?, snapshot))
    })
    .await?;
    paging::page(items, query, snapshot).map_err(page_error)
}

/// [`read_listing`], answered as `{"items": [...], "metadata": {...}}`.
async fn read_page<T, F>(
    state: ApiState,
    headers: HeaderMap,
    path: (String, String),
    what: String,
    query: PageQuery,
    f: F,
) -> Result<Response, ApiError>
where
    T: Serialize + Send + 'static,
    F: FnOnce(&Store, &str) -> Result<Vec<T>, ApiError> + Send + 'static,
{
    let page = read_listing(state, headers, path, what, &query, f).await?;
    let metadata = list_metadata(&page);
    Ok(axum::Json(json!({ "items": page.items, "metadata": metadata })).into_response())
}

/// What a continue token is bound to: the listing with its filters, and the
/// connector's current generation of every sync kind, so a sync in between
/// pages expires the token.
fn listing_snapshot(store: &Store, connector: &str, what: String) -> Result<[u8; 8], ApiError> {
    let mut parts = vec![what];
    for kind in SyncKind::ALL {
        let generation = store.current_generation(connector, kind).map_err(internal)?;
        parts.push(format!("{kind:?}={generation:?}"));
    }
    let parts: Vec<&str> = parts.iter().map(String::as_str).collect();
    Ok(paging::snapshot(&parts))
}

fn page_error(err: PageError) -> ApiError {
    match err {
        PageError::Invalid(message) => ApiError(StatusCode::BAD_REQUEST, message),
        PageError::Expired => ApiError(
            StatusCode::GONE,
            "the continue token has expired: the data changed since the first page; list again without it".into(),
        ),
    }
}

/// Kubernetes list metadata: `continue` and `remainingItemCount` while more
/// pages follow, empty on the last.
fn list_metadata<T>(page: &Paged<T>) -> serde_json::Map<String, serde_json::Value> {
    let mut metadata = serde_json::Map::new();
    if let Some(token) = &page.continue_token {
        metadata.insert("continue".into(), json!(token));
        metadata.insert("remainingItemCount".into(), json!(page.remaining));
    }
    metadata
}

fn internal(err: impl std::fmt::Display) -> ApiError {
    ApiError(StatusCode::INTERNAL_SERVER_ERROR, err.to_string())
}

#[derive(Deserialize)]
struct TypeQuery {
    #[serde(rename = "type")]
    resource_type: Option<String>,
}

async fn resources(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path((ns, name)): Path<(String, String)>,
    Query(query): Query<TypeQuery>,
    Query(paged): Query<PageQuery>,
) -> Result<Response, ApiError> {
    let resource_type = match query.resource_type.as_deref() {
        None => None,
        Some(t) => Some(ResourceType::parse(t).ok_or_else(|| {
            ApiError(
                StatusCode::BAD_REQUEST,
                format!("unknown type {t:?}: user, workspace, user_group, project or repository"),
            )
        })?),
    };
    let what = format!("resources?type={}", query.resource_type.unwrap_or_default());
    read_page(state, headers, (ns, name), what, paged, move |store, c| {
        store.resources(c, resource_type).map_err(internal)
    })
    .await
}

async fn grants(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path(path): Path<(String, String)>,
    Query(paged): Query<PageQuery>,
) -> Result<Response, ApiError> {
    read_page(state, headers, path, "grants".into(), paged, |store, c| {
        store.grants(c).map_err(internal)
    })
    .await
}

/// The access-review CSV, paged like the JSON listings (see the module
/// doc): every page starts with the header row, so each page opens on its
/// own in a spreadsheet, and the next page's token travels in headers.
async fn grants_csv(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path((ns, name)): Path<(String, String)>,
    Query(paged): Query<PageQuery>,
) -> Result<Response, ApiError> {
    let path = (ns.clone(), name.clone());
    let page = read_listing(state, headers, path, "grants.csv".into(), &paged, |store, c| {
        access::review_rows(store, c).map_err(internal)
    })
    .await?;
    let mut csv = csv_line(&access::REVIEW_COLUMNS);
    for row in &page.items {
        csv.push_str(&csv_line(&row.cells()));
    }
    let mut response = ([(header::CONTENT_TYPE, "text/csv; charset=utf-8")], csv).into_response();
    if let Some(token) = &page.continue_token {
        let limit = paged.limit.map(|l| format!("limit={l}&")).unwrap_or_default();
        let next =
            format!("</api/v1/namespaces/{ns}/connectors/{name}/grants.csv?{limit}continue={token}>; rel=\"next\"");
        let response_headers = response.headers_mut();
        for (name, value) in [
            (CONTINUE_HEADER, token.clone()),
            (REMAINING_HEADER, page.remaining.to_string()),
            (header::LINK.as_str(), next),
        ] {
            // The token is URL-safe base64 and the names are checked: always
            // a valid header value.
            if let Ok(value) = header::HeaderValue::from_str(&value) {
                response_headers.insert(name, value);
            }
        }
    }
    Ok(response)
}

/// Response header of a paged CSV with the `continue` token of the next
/// page (absent on the last page).
pub const CONTINUE_HEADER: &str = "x-continue";
/// Response header of a paged CSV with the rows after this page.
pub const REMAINING_HEADER: &str = "x-remaining-item-count";

/// One CSV record (with its line end) of `fields`, each [`csv_field`]-quoted.
fn csv_line<S: AsRef<str>>(fields: &[S]) -> String {
    let mut line = fields
        .iter()
        .map(|f| csv_field(f.as_ref()))
        .collect::<Vec<_>>()
        .join(",");
    line.push('\n');
    line
}

/// RFC 4180 quoting; a leading `=`, `+`, `-`, `@`, tab or carriage return is
/// prefixed with `'` so a spreadsheet never evaluates a name as a formula.
fn csv_field(value: &str) -> String {
    let value = if value.starts_with(['=', '+', '-', '@', '\t', '\r']) {
        format!("'{value}")
    } else {
        value.to_owned()
    };
    if value.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", value.replace('"', "\"\""))
    } else {
        value
    }
}

#[derive(Deserialize)]
struct RepositoryQuery {
    repository: String,
}

async fn who_can(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path(path): Path<(String, String)>,
    Query(query): Query<RepositoryQuery>,
    Query(paged): Query<PageQuery>,
) -> Result<Response, ApiError> {
    let what = format!("who-can?repository={}", query.repository);
    read_page(state, headers, path, what, paged, move |store, c| {
        Ok(access::who_can(store, c, &query.repository)?)
    })
    .await
}

#[derive(Deserialize)]
struct UserQuery {
    user: String,
}

/// A user's access; `repositories` (thousands for a workspace owner) is
/// paged with `limit`/`continue` and `metadata` as in the listings, while
/// the user, workspaces, groups and projects come whole on every page.
async fn access_of(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path((ns, name)): Path<(String, String)>,
    Query(query): Query<UserQuery>,
    Query(paged): Query<PageQuery>,
) -> Result<Response, ApiError> {
    let what = format!("access-of?user={}", query.user);
    let (mut access, snapshot) = read(state, headers, ns, name, move |store, c| {
        let snapshot = listing_snapshot(store, c, what)?;
        Ok((access::access_of(store, c, &query.user)?, snapshot))
    })
    .await?;
    let page = paging::page(std::mem::take(&mut access.repositories), &paged, snapshot).map_err(page_error)?;
    let metadata = list_metadata(&page);
    access.repositories = page.items;
    let mut body = serde_json::to_value(access).map_err(internal)?;
    body["metadata"] = serde_json::Value::Object(metadata);
    Ok(axum::Json(body).into_response())
}

async fn runs(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path((ns, name)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let runs = read(state, headers, ns, name, |store, c| store.runs(c, 50).map_err(internal)).await?;
    Ok(axum::Json(json!({ "items": runs })).into_response())
}

#[derive(Deserialize)]
struct AuditQuery {
    /// RFC 3339 time, or a duration back from now (`24h`).
    since: Option<String>,
}

/// The connector's audit log (oldest first), since `since`. Unlike the
/// inventory it needs no synced data: a connector that only granted has one.
async fn audit(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path((ns, name)): Path<(String, String)>,
    Query(query): Query<AuditQuery>,
) -> Result<Response, ApiError> {
    authorize(&state, &headers, &ns, &name).await?;
    if !state.leading.load(std::sync::atomic::Ordering::Relaxed) {
        return Err(ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            "this replica is a standby; the data API is served by the lease holder".into(),
        ));
    }
    let since = match query.since.as_deref() {
        None => None,
        Some(text) => Some(since_ms(text).map_err(|message| ApiError(StatusCode::BAD_REQUEST, message))?),
    };
    let connector = format!("{ns}/{name}");
    let entries = tokio::task::spawn_blocking(move || state.store.audit(since, Some(&connector)))
        .await
        .map_err(internal)?
        .map_err(internal)?;
    Ok(axum::Json(json!({ "items": entries })).into_response())
}

/// `since`: RFC 3339, or a duration back from now; Unix milliseconds.
fn since_ms(text: &str) -> Result<i64, String> {
    if let Ok(at) = text.trim().parse::<jiff::Timestamp>() {
        return Ok(at.as_millisecond());
    }
    let back = crate::sync::cli::parse_duration(text)
        .map_err(|_| format!("since: expected an RFC 3339 time or a duration such as 24h, got {text:?}"))?;
    let back = i64::try_from(back.as_millis()).map_err(|_| format!("since: {text:?} is too far back"))?;
    Ok(jiff::Timestamp::now().as_millisecond().saturating_sub(back))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn audit_since_takes_a_time_or_a_duration() {
        assert_eq!(since_ms("2026-12-01T00:00:00Z"), Ok(1_796_083_200_000));
        let an_hour_ago = since_ms("1h").unwrap();
        let expected = jiff::Timestamp::now().as_millisecond() - 3_600_000;
        assert!((an_hour_ago - expected).abs() < 5_000);
        assert!(since_ms("yesterday").unwrap_err().contains("RFC 3339"));
    }

    #[tokio::test]
    async fn requests_beyond_the_concurrency_cap_get_429_at_once() {
        let gate = Arc::new(AccessGate::new(DataApiSettings {
            max_concurrent: 2,
            ..DataApiSettings::default()
        }));
        let release = Arc::new(tokio::sync::Notify::new());
        let app = Router::new()
            .route(
                "/slow",
                get({
                    let release = Arc::clone(&release);
                    move || async move {
                        release.notified().await;
                        "done"
                    }
                }),
            )
            .route_layer(middleware::from_fn_with_state(Arc::clone(&gate), admit));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/slow", listener.local_addr().unwrap());
        let server = tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        let http = reqwest::Client::new();
        let held: Vec<_> = (0..2).map(|_| tokio::spawn(http.get(&url).send())).collect();
        while gate.in_flight.available_permits() > 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let refused = http.get(&url).send().await.unwrap();
        assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(refused.headers()[header::RETRY_AFTER], "1");
        release.notify_waiters();
        for request in held {
            assert_eq!(request.await.unwrap().unwrap().status(), StatusCode::OK);
        }
        assert_eq!(gate.in_flight.available_permits(), 2, "slots come back");
        server.abort();
    }

    #[test]
    fn names_are_checked_before_any_review() {
        assert!(check_names("team-a", "acme.v2").is_ok());
        for (ns, name) in [
            ("", "a"),
            ("a", ""),
            ("Team", "a"),
            ("a", "-x"),
            ("a.b", "x"),
            ("a", "x/y"),
        ] {
            assert!(check_names(ns, name).is_err(), "{ns}/{name}");
        }
        assert!(check_names(&"a".repeat(64), "x").is_err());
        assert!(check_names("a", &"b".repeat(254)).is_err());
    }

    #[test]
    fn data_api_args_parse() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            api: DataApiArgs,
        }
        let cli = Cli::parse_from(["x"]);
        assert_eq!(cli.api.settings(), DataApiSettings::default());
        assert_eq!(cli.api.tls(), None);
        let cli = Cli::parse_from([
            "x",
            "--data-api-audience",
            "aud",
            "--data-api-tls-cert",
            "/c",
            "--data-api-tls-key",
            "/k",
        ]);
        assert_eq!(cli.api.settings().audience, "aud");
        let timed = Cli::parse_from(["x", "--data-api-header-read-timeout", "3s"]);
        assert_eq!(
            timed.api.settings().connections.header_read_timeout,
            Duration::from_secs(3)
        );
        assert_eq!(cli.api.tls().unwrap().key, PathBuf::from("/k"));
        assert!(
            Cli::try_parse_from(["x", "--data-api-tls-cert", "/c"]).is_err(),
            "a cert needs its key"
        );
    }

    #[test]
    fn connection_limits_parse_with_defaults_and_ranges() {
        use clap::Parser;
        #[derive(Parser, Debug)]
        struct Cli {
            #[command(flatten)]
            api: DataApiArgs,
        }
        let defaults = Cli::parse_from(["x"]).api.settings().connections;
        assert_eq!(defaults.max_connections, 512);
        assert_eq!(defaults.write_timeout, Duration::from_secs(30));
        assert_eq!(defaults.header_read_timeout, Duration::from_secs(10));

        let set = Cli::parse_from([
            "x",
            "--data-api-max-connections",
            "65536",
            "--data-api-write-timeout",
            "2m",
        ])
        .api
        .settings()
        .connections;
        assert_eq!(set.max_connections, 65536);
        assert_eq!(set.write_timeout, Duration::from_secs(120));
        let one = Cli::parse_from(["x", "--data-api-max-connections", "1"]);
        assert_eq!(one.api.settings().connections.max_connections, 1);

        // Out of range or malformed: a usage error naming the flag.
        for bad in [
            ["--data-api-max-connections", "0"],
            ["--data-api-max-connections", "65537"],
            ["--data-api-max-connections", "-1"],
            ["--data-api-max-connections", "many"],
            ["--data-api-write-timeout", "0s"],
            ["--data-api-header-read-timeout", "0"],
            ["--data-api-write-timeout", "soon"],
        ] {
            let arg = format!("{}={}", bad[0], bad[1]);
            let err = Cli::try_parse_from(["x", arg.as_str()]).unwrap_err();
            assert_eq!(err.kind(), clap::error::ErrorKind::ValueValidation, "{bad:?}");
            assert!(err.to_string().contains(bad[0]), "{bad:?}: {err}");
        }
    }

    #[test]
    fn csv_fields_are_quoted_and_formula_safe() {
        assert_eq!(csv_field("plain"), "plain");
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(csv_field("=cmd()"), "'=cmd()");
        assert_eq!(csv_field("-1,2"), "\"'-1,2\"");
        assert_eq!(csv_field("\tx"), "'\tx");
        assert_eq!(csv_line(&["a", "=b", "c,d"]), "a,'=b,\"c,d\"\n");
        assert_eq!(
            csv_line(&access::REVIEW_COLUMNS),
            format!("{}\n", access::REVIEW_COLUMNS.join(","))
        );
    }
}
