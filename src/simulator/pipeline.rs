//! The request pipeline every endpoint shares, in one place and in the order
//! clients can observe:
//!
//! 1. the path is canonicalised before routing ([`canonical_path`]): empty
//!    segments dropped, each segment percent-decoded and re-encoded, so
//!    `/2.0//user/` and `/2.0/%75ser` reach `/2.0/user`;
//! 2. latency, then a request number (which decides fault injection), for
//!    every request, known path or not;
//! 3. the body is read (1 MiB at most, else 400);
//! 4. an injected 500/502/503, before authentication;
//! 5. credentials (401 with `WWW-Authenticate`), then the per-credential
//!    rate limit (429 with `Retry-After`), then the endpoint's methods (405);
//! 6. the handler, with a [`Ctx`] saying who called;
//! 7. the status is counted under the endpoint's class ([`super::RequestStats`]).
//!
//! The OAuth token endpoint skips step 5: it authenticates the client itself
//! and is not rate limited. Unknown paths stop after step 2 with the HTML 404.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::{Body, to_bytes};
use axum::extract::{FromRequestParts, RawPathParams, Request, State};
use axum::handler::Handler;
use axum::http::request::Parts;
use axum::http::uri::PathAndQuery;
use axum::http::{HeaderMap, HeaderValue, Method, Uri, header};
use axum::middleware::{Next, from_fn_with_state};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, any};
use serde_json::Value;

use super::app::App;
use super::auth::Principal;
use super::limits::retry_after_secs;
use super::paging::{FieldSpec, Query, param};
use super::reply::{Answer, ApiError, html_404};

/// The largest request body read; larger ones answer 400.
const MAX_BODY: usize = 1 << 20;

pub(super) const GET: &[Method] = &[Method::GET];
pub(super) const GET_PUT_DELETE: &[Method] = &[Method::GET, Method::PUT, Method::DELETE];
pub(super) const PUT_DELETE: &[Method] = &[Method::PUT, Method::DELETE];

/// Who may call an endpoint.
#[derive(Debug, Clone, Copy)]
enum Access {
    /// API credentials, rate limited, these methods only.
    Credentials(&'static [Method]),
    /// The OAuth token endpoint: the handler authenticates the client.
    TokenEndpoint,
}

/// What the pipeline knows about one endpoint.
#[derive(Clone)]
struct Endpoint {
    app: Arc<App>,
    /// The [`super::RequestStats::by_class`] key.
    class: &'static str,
    access: Access,
}

/// An API endpoint: `handler` behind the whole pipeline, answering only
/// `methods` (anything else, HEAD included, is 405 after authentication).
pub(super) fn api<H, T>(
    app: &Arc<App>,
    class: &'static str,
    methods: &'static [Method],
    handler: H,
) -> MethodRouter<Arc<App>>
where
    H: Handler<T, Arc<App>>,
    T: 'static,
{
    endpoint(app, class, Access::Credentials(methods), handler)
}

/// The OAuth token endpoint: the pipeline without credentials or rate limit.
pub(super) fn token_endpoint<H, T>(app: &Arc<App>, class: &'static str, handler: H) -> MethodRouter<Arc<App>>
where
    H: Handler<T, Arc<App>>,
    T: 'static,
{
    endpoint(app, class, Access::TokenEndpoint, handler)
}

/// Methods are checked by the pipeline, not by axum's method router, so a
/// 405 comes after authentication and carries the JSON envelope, as on
/// Bitbucket.
fn endpoint<H, T>(app: &Arc<App>, class: &'static str, access: Access, handler: H) -> MethodRouter<Arc<App>>
where
    H: Handler<T, Arc<App>>,
    T: 'static,
{
    let endpoint = Endpoint {
        app: app.clone(),
        class,
        access,
    };
    any(handler).layer(from_fn_with_state(endpoint, pipeline))
}

async fn pipeline(State(endpoint): State<Endpoint>, request: Request, next: Next) -> Response {
    let n = endpoint.app.admit().await;
    let response = match gate(&endpoint, n, request).await {
        Ok(request) => next.run(request).await,
        Err(refused) => refused,
    };
    endpoint.app.record(endpoint.class, response.status().as_u16());
    response
}

/// Steps 3 to 5: the request to hand to the handler, or the answer that
/// replaces it.
async fn gate(endpoint: &Endpoint, n: u64, request: Request) -> Result<Request, Response> {
    let app = &endpoint.app;
    let (mut parts, body) = request.into_parts();
    let body = to_bytes(body, MAX_BODY)
        .await
        .map_err(|_| ApiError::bad_request("Request body too large or unreadable").into_response())?;
    if let Some(fault) = app.injected_fault(n) {
        return Err(fault.into_response());
    }
    if let Access::Credentials(methods) = endpoint.access {
        let principal = authorize(app, &parts.headers).map_err(IntoResponse::into_response)?;
        if !methods.contains(&parts.method) {
            let message = format!("Method {} not allowed", parts.method);
            return Err(ApiError::new(405, &message).into_response());
        }
        let ctx = Ctx::new(app, &parts, principal);
        parts.extensions.insert(ctx);
    }
    Ok(Request::from_parts(parts, Body::from(body)))
}

/// Why [`authorize`] turned a request away.
enum Refusal {
    /// 401 with `WWW-Authenticate`.
    Unauthorized(&'static str),
    /// 429 with `Retry-After`.
    RateLimited(Duration),
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        match self {
            Refusal::Unauthorized(message) => {
                let mut r = ApiError::new(401, message).into_response();
                r.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Basic realm=\"Bitbucket.org HTTP\""),
                );
                r
            }
            Refusal::RateLimited(wait) => {
                let mut r = ApiError::new(429, "Rate limit for this resource has been exceeded.").into_response();
                r.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(retry_after_secs(wait)));
                r
            }
        }
    }
}

/// Credentials, then the caller's rate-limit budget.
fn authorize(app: &App, headers: &HeaderMap) -> Result<Principal, Refusal> {
    let authorization = headers.get(header::AUTHORIZATION).and_then(|h| h.to_str().ok());
    let (principal, key) = app
        .auth
        .authenticate(authorization)
        .map_err(|e| Refusal::Unauthorized(e.0))?;
    let now = Instant::now();
    let throttled = *app.throttled_until.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(until) = throttled.filter(|until| now < *until) {
        return Err(Refusal::RateLimited(until - now));
    }
    if let Some(limiter) = &app.limiter {
        limiter.check(&key, now).map_err(Refusal::RateLimited)?;
    }
    Ok(principal)
}

/// Paths no family serves: Bitbucket's HTML page, counted as `unknown`.
pub(super) async fn unknown_path(State(app): State<Arc<App>>) -> Response {
    app.admit().await;
    app.record("unknown", 404);
    html_404()
}

/// Per-request context of an authenticated call.
#[derive(Debug, Clone)]
pub(super) struct Ctx {
    /// `http://host:port` as the client addressed us (for `next` links).
    pub origin: String,
    pub method: Method,
    /// The path as sent, before canonicalisation (for `next` links).
    pub path: String,
    pub query: Query,
    pub principal: Principal,
}

impl Ctx {
    fn new(app: &App, parts: &Parts, principal: Principal) -> Ctx {
        let origin = parts
            .headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .filter(|h| !h.is_empty() && h.chars().all(|c| c.is_ascii_alphanumeric() || ".-:[]".contains(c)))
            .map(|h| format!("http://{h}"))
            .unwrap_or_else(|| app.base_url.clone());
        let path = match parts.extensions.get::<SentPath>() {
            Some(SentPath(p)) => p.clone(),
            None => parts.uri.path().to_string(),
        };
        let query = url::form_urlencoded::parse(parts.uri.query().unwrap_or("").as_bytes())
            .into_owned()
            .collect();
        Ctx {
            origin,
            method: parts.method.clone(),
            path,
            query,
            principal,
        }
    }

    /// A 200 answer with this request's `fields=` applied.
    pub fn json(&self, value: Value) -> Answer {
        let fields = match param(&self.query, "fields") {
            Some(f) => FieldSpec::parse(f),
            None => FieldSpec::default(),
        };
        Answer::Json {
            value,
            fields,
            hidden: Vec::new(),
        }
    }

    /// Access tokens may not touch permission APIs (API-CONTRACT 1).
    pub fn deny_access_token(&self) -> Result<(), ApiError> {
        if self.principal == Principal::AccessToken {
            Err(ApiError::forbidden(
                "Access tokens cannot query or manipulate repository, project or workspace permissions.",
            ))
        } else {
            Ok(())
        }
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Ctx {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Ctx, ApiError> {
        parts
            .extensions
            .remove::<Ctx>()
            .ok_or_else(|| ApiError::new(500, "internal error: request context missing"))
    }
}

/// The route's `{…}` segments, percent-decoded (canonicalisation made sure
/// they decode).
pub(super) struct Ids<const N: usize>(pub [String; N]);

impl<S: Send + Sync, const N: usize> FromRequestParts<S> for Ids<N> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Ids<N>, ApiError> {
        let internal = || ApiError::new(500, "internal error: path parameters");
        let params = RawPathParams::from_request_parts(parts, state)
            .await
            .map_err(|_| internal())?;
        let ids: Vec<String> = params.iter().map(|(_, v)| v.to_string()).collect();
        ids.try_into().map(Ids).map_err(|_| internal())
    }
}

/// The path the client sent, kept for `next`/`previous` links.
#[derive(Debug, Clone)]
struct SentPath(String);

/// Step 1: rewrites the request path to its canonical form before routing.
pub(super) fn canonical_path(mut request: Request) -> Request {
    let sent = request.uri().path().to_string();
    let canonical = canonical(&sent);
    if canonical != sent {
        let path_and_query = match request.uri().query() {
            Some(q) => format!("{canonical}?{q}"),
            None => canonical,
        };
        let mut parts = request.uri().clone().into_parts();
        if let Ok(pq) = PathAndQuery::try_from(path_and_query) {
            parts.path_and_query = Some(pq);
            if let Ok(uri) = Uri::from_parts(parts) {
                *request.uri_mut() = uri;
            }
        }
    }
    request.extensions_mut().insert(SentPath(sent));
    request
}

/// Each segment decoded as Bitbucket would (one that does not decode to
/// UTF-8 is taken as sent), then encoded so the router decodes it back to
/// exactly that.
fn canonical(path: &str) -> String {
    let segments: Vec<String> = path
        .split('/')
        .filter(|s| !s.is_empty())
        .map(|s| {
            let decoded = urlencoding::decode(s).map_or_else(|_| s.to_string(), |d| d.into_owned());
            urlencoding::encode(&decoded).into_owned()
        })
        .collect();
    format!("/{}", segments.join("/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_paths() {
        assert_eq!(canonical("/2.0/user"), "/2.0/user");
        assert_eq!(canonical("//2.0//user/"), "/2.0/user");
        assert_eq!(canonical("/2.0/%75ser"), "/2.0/user");
        assert_eq!(canonical("/2.0/workspaces/%7babc%7d"), "/2.0/workspaces/%7Babc%7D");
        // An encoded slash stays inside its segment; a segment that does not
        // decode reaches the handler as sent.
        assert_eq!(canonical("/2.0/workspaces/a%2Fb"), "/2.0/workspaces/a%2Fb");
        assert_eq!(canonical("/2.0/workspaces/%FF"), "/2.0/workspaces/%25FF");
        assert_eq!(canonical("/2.0/users/557058:ab"), "/2.0/users/557058%3Aab");
        assert_eq!(canonical("/"), "/");
    }
}
