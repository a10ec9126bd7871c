//! ConductorOne's connector-credential REST calls (PROTOCOL.md §4):
//! RotateCredential, GetCredentials and RevokeCredential, authenticated with
//! the same token exchange, `BATON_C1_API_HOST` override and extra CA bundle
//! as the gRPC session.
//!
//! Decisions:
//! - The caller is a [`TokenSource`] of whichever credential was chosen (an
//!   API key, or the connector's own credential): whether a connector
//!   credential may call these is not established, so a refusal (HTTP 401 or
//!   403, or a gRPC-gateway body with code 7 `PermissionDenied` / 16
//!   `Unauthenticated`) is its own error, [`ApiError::NotAuthorized`], which
//!   the rotation reports as `RotationNotAuthorized`.
//! - Errors carry ConductorOne's own message (at most 200 characters) and
//!   never a token or a client secret; [`IssuedCredential`]'s `Debug` redacts
//!   the secret.

use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use super::token::{C1Endpoint, TokenError, TokenSource, classify_transport, error_message, http_client};

/// Timeout of one REST call.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// The ConductorOne connector whose credentials are managed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectorRef {
    pub app_id: String,
    pub connector_id: String,
}

/// A credential as ConductorOne describes it (no secret).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CredentialInfo {
    pub id: String,
    pub client_id: String,
    /// When it was issued (the schedule counts from here before the first rotation).
    pub created_at: Option<jiff::Timestamp>,
    /// When the credential stops working, if it expires.
    pub expires_time: Option<jiff::Timestamp>,
    /// Set once it was revoked (soft delete).
    pub deleted_at: Option<jiff::Timestamp>,
}

/// A credential just issued by RotateCredential: the only time its secret is
/// ever shown.
#[derive(Clone)]
pub struct IssuedCredential {
    pub info: CredentialInfo,
    pub client_secret: String,
}

impl std::fmt::Debug for IssuedCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuedCredential")
            .field("info", &self.info)
            .field("client_secret", &"<redacted>")
            .finish()
    }
}

/// Why a call failed. Never contains a secret.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ApiError {
    /// The caller may not manage this connector's credentials (or its token
    /// was refused): retrying with the same caller cannot help.
    #[error("ConductorOne refused the call (HTTP {status}){}", detail(.message))]
    NotAuthorized { status: u16, message: String },
    /// The app, connector or credential does not exist.
    #[error("ConductorOne has no such credential (HTTP 404){}", detail(.message))]
    NotFound { message: String },
    /// The caller's own token exchange failed.
    #[error(transparent)]
    Token(#[from] TokenError),
    /// Any other HTTP failure (5xx, 400, a transport error).
    #[error("ConductorOne answered HTTP {status}{}", detail(.message))]
    Http { status: u16, message: String },
    #[error("{0}")]
    Transport(String),
    /// A 2xx whose body is not what the API documents.
    #[error("unexpected answer from ConductorOne: {0}")]
    BadResponse(String),
}

impl ApiError {
    /// Whether ConductorOne refused the caller (maps to `RotationNotAuthorized`).
    pub fn is_not_authorized(&self) -> bool {
        matches!(
            self,
            ApiError::NotAuthorized { .. } | ApiError::Token(TokenError::Rejected { .. })
        )
    }
}

fn detail(message: &str) -> String {
    if message.is_empty() {
        String::new()
    } else {
        format!(": {message}")
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireCredential {
    #[serde(default)]
    id: String,
    #[serde(default)]
    client_id: String,
    #[serde(default)]
    client_secret: Option<String>,
    #[serde(default)]
    created_at: Option<String>,
    #[serde(default)]
    expires_time: Option<String>,
    #[serde(default)]
    deleted_at: Option<String>,
}

#[derive(Deserialize)]
struct CredentialEnvelope {
    credential: Option<WireCredential>,
}

/// Parses an RFC 3339 time; an unparsable one is treated as absent rather
/// than failing the call (it only informs scheduling).
fn timestamp(value: Option<&str>) -> Option<jiff::Timestamp> {
    value.filter(|v| !v.is_empty()).and_then(|v| v.parse().ok())
}

impl WireCredential {
    fn info(&self) -> CredentialInfo {
        CredentialInfo {
            id: self.id.clone(),
            client_id: self.client_id.clone(),
            created_at: timestamp(self.created_at.as_deref()),
            expires_time: timestamp(self.expires_time.as_deref()),
            deleted_at: timestamp(self.deleted_at.as_deref()),
        }
    }
}

/// A REST client acting as one caller credential.
pub struct CredentialApi {
    http: reqwest::Client,
    endpoint: C1Endpoint,
    tokens: Arc<TokenSource>,
}

impl std::fmt::Debug for CredentialApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CredentialApi")
            .field("endpoint", &self.endpoint)
            .field("tokens", &self.tokens)
            .finish()
    }
}

impl CredentialApi {
    /// Fails only on an unreadable extra CA bundle.
    pub fn new(tokens: Arc<TokenSource>, endpoint: C1Endpoint) -> Result<Self, String> {
        Ok(CredentialApi {
            http: http_client(&endpoint, CALL_TIMEOUT)?,
            endpoint,
            tokens,
        })
    }

    fn url(&self, path: &str) -> String {
        format!("https://{}{path}", self.endpoint.api_host())
    }

    fn credential_path(connector: &ConnectorRef, id: &str) -> String {
        format!(
            "/api/v1/apps/{}/connectors/{}/credentials/{}",
            urlencoding::encode(&connector.app_id),
            urlencoding::encode(&connector.connector_id),
            urlencoding::encode(id)
        )
    }

    /// RotateCredential: ConductorOne issues a new credential for the
    /// connector; the old one stays valid until revoked.
    pub async fn rotate(&self, connector: &ConnectorRef) -> Result<IssuedCredential, ApiError> {
        let body = serde_json::json!({"appId": connector.app_id, "connectorId": connector.connector_id});
        let text = self
            .call(reqwest::Method::POST, "/api/v1/apps/connectors/credentials", Some(body))
            .await?;
        let wire = credential(&text)?;
        let Some(secret) = wire.client_secret.clone().filter(|s| !s.is_empty()) else {
            return Err(ApiError::BadResponse("the new credential has no clientSecret".into()));
        };
        if wire.id.is_empty() || wire.client_id.is_empty() {
            return Err(ApiError::BadResponse("the new credential has no id or clientId".into()));
        }
        Ok(IssuedCredential {
            info: wire.info(),
            client_secret: secret,
        })
    }

    /// GetCredentials: the credential's description (its expiry, mostly).
    pub async fn get(&self, connector: &ConnectorRef, id: &str) -> Result<CredentialInfo, ApiError> {
        let text = self
            .call(reqwest::Method::GET, &Self::credential_path(connector, id), None)
            .await?;
        Ok(credential(&text)?.info())
    }

    /// RevokeCredential: the credential stops working.
    pub async fn revoke(&self, connector: &ConnectorRef, id: &str) -> Result<(), ApiError> {
        self.call(
            reqwest::Method::POST,
            &Self::credential_path(connector, id),
            Some(serde_json::json!({})),
        )
        .await
        .map(drop)
    }

    /// One authenticated call; a 401 drops the cached token first, so the
    /// next call exchanges again.
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<String, ApiError> {
        let token = self.tokens.token().await?;
        let host = self.endpoint.api_host().to_owned();
        let mut request = self
            .http
            .request(method, self.url(path))
            .bearer_auth(token.secret())
            .header("accept", "application/json");
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request
            .send()
            .await
            .map_err(|e| ApiError::Transport(classify_transport(&host, &e).to_string()))?;
        let status = response.status().as_u16();
        let text = response
            .text()
            .await
            .map_err(|e| ApiError::Transport(classify_transport(&host, &e).to_string()))?;
        if (200..300).contains(&status) {
            return Ok(text);
        }
        if status == 401 {
            self.tokens.invalidate().await;
        }
        Err(classify_status(status, &text))
    }
}

/// Maps an HTTP failure to an [`ApiError`]. gRPC-gateway bodies carry the
/// gRPC code, which wins over the HTTP status when it says "refused".
fn classify_status(status: u16, body: &str) -> ApiError {
    let message = error_message(body);
    let grpc_code = serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.get("code").and_then(|c| c.as_i64()));
    match (status, grpc_code) {
        (401 | 403, _) | (_, Some(7 | 16)) => ApiError::NotAuthorized { status, message },
        (404, _) | (_, Some(5)) => ApiError::NotFound { message },
        _ => ApiError::Http { status, message },
    }
}

fn credential(text: &str) -> Result<WireCredential, ApiError> {
    let envelope: CredentialEnvelope =
        serde_json::from_str(text).map_err(|e| ApiError::BadResponse(format!("not a credential answer: {e}")))?;
    envelope
        .credential
        .ok_or_else(|| ApiError::BadResponse("no credential in the answer".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_told_apart_from_other_failures() {
        assert!(classify_status(403, r#"{"code":7,"message":"permission denied"}"#).is_not_authorized());
        assert!(classify_status(401, "").is_not_authorized());
        assert!(classify_status(400, r#"{"code":7,"message":"no"}"#).is_not_authorized());
        assert!(matches!(classify_status(404, "{}"), ApiError::NotFound { .. }));
        let other = classify_status(503, r#"{"message":"try later"}"#);
        assert!(!other.is_not_authorized());
        assert_eq!(other.to_string(), "ConductorOne answered HTTP 503: try later");
    }

    #[test]
    fn issued_credentials_redact_the_secret() {
        let issued = IssuedCredential {
            info: CredentialInfo {
                id: "c1".into(),
                client_id: "x@acme.conductor.one/ccc".into(),
                created_at: None,
                expires_time: None,
                deleted_at: None,
            },
            client_secret: "secret-token:conductorone.com:v1:TOPSECRET".into(),
        };
        let debug = format!("{issued:?}");
        assert!(debug.contains("<redacted>") && !debug.contains("TOPSECRET"), "{debug}");
    }

    #[test]
    fn credential_answers_parse_and_tolerate_bad_times() {
        let wire = credential(
            r#"{"credential":{"id":"c1","clientId":"x@h/ccc","expiresTime":"2027-01-01T00:00:00Z","deletedAt":"junk"}}"#,
        )
        .unwrap();
        let info = wire.info();
        assert_eq!(info.expires_time.unwrap().to_string(), "2027-01-01T00:00:00Z");
        assert_eq!(info.deleted_at, None);
        assert!(credential("{}").is_err());
        assert!(credential("not json").is_err());
    }
}
