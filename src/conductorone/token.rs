//! Where ConductorOne is ([`C1Endpoint`]) and the access-token exchange
//! ([`TokenSource`], PROTOCOL.md §1): a signed assertion is POSTed to
//! `/auth/v1/token`; the token is cached until shortly before it expires and
//! fetched again when it does, or when the server says it is no longer valid.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::Deserialize;

use super::credentials::ClientCredentials;

/// How long before its expiry a token is replaced.
const REFRESH_MARGIN: Duration = Duration::from_secs(60);
/// Timeout of one token request.
const TOKEN_TIMEOUT: Duration = Duration::from_secs(30);

/// Where to reach ConductorOne, and which extra roots to trust.
#[derive(Clone)]
pub struct C1Endpoint {
    /// The tenant host from the client id (the JWT audience comes from it, always).
    pub tenant_host: String,
    /// `BATON_C1_API_HOST`: `host[:port]` used instead of the tenant host for
    /// the token URL and the gRPC target.
    pub api_host_override: Option<String>,
    /// PEM certificates trusted in addition to the public roots (proxies,
    /// private tenants, tests).
    pub extra_ca_pem: Option<Vec<u8>>,
}

impl std::fmt::Debug for C1Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("C1Endpoint")
            .field("tenant_host", &self.tenant_host)
            .field("api_host_override", &self.api_host_override)
            .field("extra_ca", &self.extra_ca_pem.as_ref().map(|p| p.len()))
            .finish()
    }
}

impl C1Endpoint {
    /// The `host[:port]` requests go to.
    pub fn api_host(&self) -> &str {
        self.api_host_override
            .as_deref()
            .filter(|h| !h.is_empty())
            .unwrap_or(&self.tenant_host)
    }

    pub fn token_url(&self) -> String {
        format!("https://{}/auth/v1/token", self.api_host())
    }

    /// The gRPC target (`https://host[:port]`, port 443 by default).
    pub fn grpc_uri(&self) -> String {
        format!("https://{}", self.api_host())
    }
}

/// An HTTPS client for ConductorOne: public roots plus the endpoint's extra
/// CA bundle (the token exchange and the credential REST calls share it).
/// Fails only on an unreadable extra CA bundle.
pub fn http_client(endpoint: &C1Endpoint, timeout: Duration) -> Result<reqwest::Client, String> {
    let mut http = reqwest::Client::builder()
        .timeout(timeout)
        .user_agent(concat!("bitbucket-operator/", env!("CARGO_PKG_VERSION")));
    if let Some(pem) = &endpoint.extra_ca_pem {
        let certs = reqwest::Certificate::from_pem_bundle(pem)
            .map_err(|e| format!("the extra CA bundle is not PEM certificates: {e}"))?;
        if certs.is_empty() {
            return Err("the extra CA bundle holds no certificate".into());
        }
        for cert in certs {
            http = http.add_root_certificate(cert);
        }
    }
    http.build().map_err(|e| format!("HTTP client: {e}"))
}

/// Why no token could be had.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TokenError {
    /// The tenant refused the credential (HTTP 400/401/403): revoked, deleted,
    /// or for another tenant. Retrying the same credential cannot help.
    #[error("ConductorOne refused the client credentials (HTTP {status}){}", detail(.message))]
    Rejected { status: u16, message: String },
    /// The TLS handshake failed (unknown CA, wrong name, ...).
    #[error("TLS with {host} failed: {message}")]
    Tls { host: String, message: String },
    /// Connection refused, DNS, timeout, 5xx.
    #[error("ConductorOne at {host} is unreachable: {message}")]
    Unreachable { host: String, message: String },
    /// A 2xx that is not a token.
    #[error("unexpected answer from the token endpoint: {0}")]
    BadResponse(String),
}

fn detail(message: &str) -> String {
    if message.is_empty() {
        String::new()
    } else {
        format!(": {message}")
    }
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
    #[serde(default)]
    expires_in: Option<u64>,
}

/// A bearer token. `Debug` redacts it.
#[derive(Clone)]
pub struct AccessToken(Arc<str>);

impl AccessToken {
    pub fn secret(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for AccessToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AccessToken(<redacted>)")
    }
}

struct Cached {
    token: AccessToken,
    refresh_at: Instant,
}

/// Fetches and caches access tokens for one credential.
pub struct TokenSource {
    credentials: Arc<ClientCredentials>,
    endpoint: C1Endpoint,
    http: reqwest::Client,
    cache: tokio::sync::Mutex<Option<Cached>>,
    fetched: AtomicU64,
    /// Also counts fetches (the operator's `conductorone_token_refreshes`).
    counter: Option<prometheus_client::metrics::counter::Counter>,
}

impl std::fmt::Debug for TokenSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenSource")
            .field("credentials", &self.credentials)
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

impl TokenSource {
    /// Fails only on an unreadable extra CA bundle.
    pub fn new(credentials: Arc<ClientCredentials>, endpoint: C1Endpoint) -> Result<Self, String> {
        let http = http_client(&endpoint, TOKEN_TIMEOUT)?;
        Ok(TokenSource {
            credentials,
            endpoint,
            http,
            cache: tokio::sync::Mutex::new(None),
            fetched: AtomicU64::new(0),
            counter: None,
        })
    }

    /// Counts every fetched token into `counter` too.
    pub fn with_counter(mut self, counter: prometheus_client::metrics::counter::Counter) -> Self {
        self.counter = Some(counter);
        self
    }

    /// How many tokens were fetched (the first and every refresh).
    pub fn fetch_count(&self) -> u64 {
        self.fetched.load(Ordering::Relaxed)
    }

    /// A valid token: the cached one, or a fresh one when it is due.
    pub async fn token(&self) -> Result<AccessToken, TokenError> {
        let mut cache = self.cache.lock().await;
        if let Some(cached) = cache.as_ref()
            && Instant::now() < cached.refresh_at
        {
            return Ok(cached.token.clone());
        }
        let (token, lifetime) = self.fetch().await?;
        self.fetched.fetch_add(1, Ordering::Relaxed);
        if let Some(counter) = &self.counter {
            counter.inc();
        }
        let refresh_in = lifetime.saturating_sub(REFRESH_MARGIN.min(lifetime / 2));
        *cache = Some(Cached {
            token: token.clone(),
            refresh_at: Instant::now() + refresh_in,
        });
        Ok(token)
    }

    /// Drops the cached token (the server said UNAUTHENTICATED).
    pub async fn invalidate(&self) {
        *self.cache.lock().await = None;
    }

    async fn fetch(&self) -> Result<(AccessToken, Duration), TokenError> {
        let host = self.endpoint.api_host().to_owned();
        let assertion = self.credentials.assertion(jiff::Timestamp::now().as_second());
        let form = [
            ("client_id", self.credentials.client_id().full.as_str()),
            ("grant_type", "client_credentials"),
            (
                "client_assertion_type",
                "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            ),
            ("client_assertion", assertion.as_str()),
        ];
        let body = form
            .iter()
            .map(|(k, v)| format!("{k}={}", urlencoding::encode(v)))
            .collect::<Vec<_>>()
            .join("&");
        let response = self
            .http
            .post(self.endpoint.token_url())
            .header("content-type", "application/x-www-form-urlencoded")
            .header("accept", "application/json")
            .body(body)
            .send()
            .await
            .map_err(|e| classify_transport(&host, &e))?;
        let status = response.status();
        let text = response.text().await.map_err(|e| classify_transport(&host, &e))?;
        if matches!(status.as_u16(), 400 | 401 | 403) {
            return Err(TokenError::Rejected {
                status: status.as_u16(),
                message: error_message(&text),
            });
        }
        if !status.is_success() {
            return Err(TokenError::Unreachable {
                host,
                message: format!("token endpoint answered HTTP {status}"),
            });
        }
        let parsed: TokenResponse =
            serde_json::from_str(&text).map_err(|e| TokenError::BadResponse(format!("not a token response: {e}")))?;
        if parsed.access_token.is_empty() {
            return Err(TokenError::BadResponse("empty access_token".into()));
        }
        // A token without a lifetime is used for 5 minutes, then replaced.
        let lifetime = Duration::from_secs(parsed.expires_in.unwrap_or(300).clamp(1, 86_400));
        Ok((AccessToken(parsed.access_token.into()), lifetime))
    }
}

/// The server's own error text, short and without anything we sent.
pub(crate) fn error_message(body: &str) -> String {
    let parsed: Option<serde_json::Value> = serde_json::from_str(body).ok();
    let message = parsed
        .as_ref()
        .and_then(|v| {
            v.get("error_description")
                .or_else(|| v.get("message"))
                .or_else(|| v.get("error"))
        })
        .and_then(|v| v.as_str())
        .unwrap_or_default();
    message.chars().take(200).collect()
}

/// TLS failures are told apart from other transport failures, because the
/// fix differs (a CA bundle, not patience).
pub(crate) fn classify_transport(host: &str, err: &reqwest::Error) -> TokenError {
    let message = error_chain(err);
    if is_tls_error(err) || looks_like_tls(&message) {
        TokenError::Tls {
            host: host.to_owned(),
            message,
        }
    } else {
        TokenError::Unreachable {
            host: host.to_owned(),
            message,
        }
    }
}

/// An error and its causes, `: `-joined.
pub fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

/// Transport stacks do not always keep the rustls error as a typed source;
/// its text is the fallback.
pub fn looks_like_tls(message: &str) -> bool {
    [
        "invalid peer certificate",
        "certificate verify",
        "UnknownIssuer",
        "tls handshake",
        "TLS handshake",
    ]
    .iter()
    .any(|needle| message.contains(needle))
}

/// Whether a rustls error is anywhere in the chain.
pub fn is_tls_error(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(s) = source {
        if s.downcast_ref::<rustls::Error>().is_some() {
            return true;
        }
        if let Some(io) = s.downcast_ref::<std::io::Error>()
            && io
                .get_ref()
                .is_some_and(|inner| inner.downcast_ref::<rustls::Error>().is_some())
        {
            return true;
        }
        source = s.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn override_replaces_the_host_of_urls_only() {
        let mut endpoint = C1Endpoint {
            tenant_host: "acme.conductor.one".into(),
            api_host_override: None,
            extra_ca_pem: None,
        };
        assert_eq!(endpoint.token_url(), "https://acme.conductor.one/auth/v1/token");
        endpoint.api_host_override = Some("127.0.0.1:8443".into());
        assert_eq!(endpoint.token_url(), "https://127.0.0.1:8443/auth/v1/token");
        assert_eq!(endpoint.grpc_uri(), "https://127.0.0.1:8443");
    }

    #[test]
    fn error_messages_come_from_the_body_and_are_short() {
        assert_eq!(
            error_message(r#"{"error":"invalid_client","error_description":"revoked"}"#),
            "revoked"
        );
        assert_eq!(error_message("<html>"), "");
        assert_eq!(
            error_message(&format!(r#"{{"message":"{}"}}"#, "x".repeat(500))).len(),
            200
        );
    }
}
