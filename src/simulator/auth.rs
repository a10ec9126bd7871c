//! Credentials and authentication: API token (Basic), access token (Bearer)
//! and OAuth client-credentials tokens (Bearer, expiring, revocable).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use serde_json::{Value, json};

/// The credentials the simulator accepts. All belong to the admin user
/// (`admin_uuid`) except `access_token`, which is its own pseudo-user.
#[derive(Debug, Clone, Serialize)]
pub struct SimCredentials {
    /// Basic-auth user name for the API token (the admin's email).
    pub email: String,
    /// Atlassian API token for Basic `email:api_token`.
    pub api_token: String,
    /// A workspace access token (Bearer).
    pub access_token: String,
    /// OAuth consumer key (client id) for the client-credentials grant.
    pub consumer_key: String,
    /// OAuth consumer secret.
    pub consumer_secret: String,
    /// UUID of the admin user, owner of every workspace.
    pub admin_uuid: String,
}

impl SimCredentials {
    pub(crate) fn generate(seed: u64, email: &str, admin_uuid: &str) -> SimCredentials {
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5eed_c4ed);
        let mut token = |prefix: &str, len: usize| -> String {
            const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
            let body: String = (0..len)
                .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
                .collect();
            format!("{prefix}{body}")
        };
        SimCredentials {
            email: email.to_string(),
            api_token: token("ATATT3x", 40),
            access_token: token("ATCTT3x", 40),
            consumer_key: token("", 18),
            consumer_secret: token("", 32),
            admin_uuid: admin_uuid.to_string(),
        }
    }
}

/// Who is calling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Principal {
    /// Basic `email:api_token`: the admin user, full rights.
    ApiToken,
    /// Bearer workspace access token: a pseudo-user without permission APIs.
    AccessToken,
    /// Bearer OAuth token: acts as the admin, but cannot write permissions.
    OAuth,
}

/// Authentication failure (always answered with 401).
#[derive(Debug)]
pub struct Unauthorized(pub &'static str);

#[derive(Debug)]
pub struct Auth {
    pub creds: SimCredentials,
    ttl: Duration,
    /// access token -> expiry
    tokens: Mutex<HashMap<String, Instant>>,
    refresh_tokens: Mutex<HashMap<String, ()>>,
}

impl Auth {
    pub fn new(creds: SimCredentials, ttl: Duration) -> Auth {
        Auth {
            creds,
            ttl,
            tokens: Mutex::new(HashMap::new()),
            refresh_tokens: Mutex::new(HashMap::new()),
        }
    }

    /// Authenticates a request from its `Authorization` header. Returns the
    /// principal and the rate-limit key (per user, token or consumer).
    pub fn authenticate(&self, authorization: Option<&str>) -> Result<(Principal, String), Unauthorized> {
        let header = authorization.ok_or(Unauthorized("Authentication required"))?;
        if let Some(b64) = strip_scheme(header, "Basic") {
            let (user, pass) = decode_basic(b64).ok_or(Unauthorized("Invalid credentials"))?;
            if user == self.creds.email && pass == self.creds.api_token {
                return Ok((Principal::ApiToken, format!("user:{user}")));
            }
            if !user.contains('@') {
                return Err(Unauthorized(
                    "Invalid credentials: API tokens need the Atlassian account email as the user name",
                ));
            }
            return Err(Unauthorized("Invalid credentials"));
        }
        if let Some(token) = strip_scheme(header, "Bearer") {
            let token = token.trim();
            if token == self.creds.access_token {
                return Ok((Principal::AccessToken, format!("token:{token}")));
            }
            let tokens = self.tokens.lock().unwrap_or_else(|e| e.into_inner());
            return match tokens.get(token) {
                Some(exp) if Instant::now() < *exp => {
                    Ok((Principal::OAuth, format!("consumer:{}", self.creds.consumer_key)))
                }
                Some(_) => Err(Unauthorized("Access token expired.")),
                None => Err(Unauthorized("Invalid access token")),
            };
        }
        Err(Unauthorized("Unsupported authorization scheme"))
    }

    /// `POST /site/oauth2/access_token`. Returns (status, OAuth 2 body).
    pub fn token_endpoint(&self, authorization: Option<&str>, form: &[(String, String)]) -> (u16, Value) {
        let oauth_err = |status: u16, error: &str, description: &str| {
            (status, json!({"error": error, "error_description": description}))
        };
        let client = authorization
            .and_then(|h| strip_scheme(h, "Basic"))
            .and_then(decode_basic)
            .or_else(|| {
                let get = |k: &str| form.iter().find(|(a, _)| a == k).map(|(_, v)| v.clone());
                Some((get("client_id")?, get("client_secret")?))
            });
        match client {
            Some((id, secret)) if id == self.creds.consumer_key && secret == self.creds.consumer_secret => {}
            Some(_) => return oauth_err(401, "invalid_client", "Invalid OAuth client credentials"),
            None => {
                return oauth_err(
                    401,
                    "invalid_client",
                    "Client credentials missing; this request needs HTTP basic auth",
                );
            }
        }
        let grant = form.iter().find(|(k, _)| k == "grant_type").map(|(_, v)| v.as_str());
        match grant {
            Some("client_credentials") => {}
            Some("refresh_token") => {
                let rt = form
                    .iter()
                    .find(|(k, _)| k == "refresh_token")
                    .map(|(_, v)| v.as_str())
                    .unwrap_or("");
                let known = self
                    .refresh_tokens
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .contains_key(rt);
                if !known {
                    return oauth_err(400, "invalid_grant", "Invalid refresh_token");
                }
            }
            Some(other) => {
                return oauth_err(
                    400,
                    "unsupported_grant_type",
                    &format!("Unsupported grant type: {other}"),
                );
            }
            None => return oauth_err(400, "invalid_request", "Missing grant_type parameter"),
        }
        let mut rng = rand::rng();
        let random = |rng: &mut rand::rngs::ThreadRng, n: usize| -> String {
            let bytes: Vec<u8> = (0..n).map(|_| rng.random()).collect();
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
        };
        let access = random(&mut rng, 48);
        let refresh = random(&mut rng, 24);
        self.tokens
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(access.clone(), Instant::now() + self.ttl);
        self.refresh_tokens
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(refresh.clone(), ());
        (
            200,
            json!({
                "access_token": access,
                "token_type": "bearer",
                "expires_in": self.ttl.as_secs(),
                "scopes": "account project project:admin repository repository:admin",
                "refresh_token": refresh,
                "state": "client_credentials",
            }),
        )
    }

    /// Every issued OAuth access token answers 401 from now on.
    pub fn revoke_oauth_tokens(&self) {
        self.tokens.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }
}

fn strip_scheme<'a>(header: &'a str, scheme: &str) -> Option<&'a str> {
    let (s, rest) = header.trim().split_once(' ')?;
    s.eq_ignore_ascii_case(scheme).then_some(rest.trim())
}

fn decode_basic(b64: &str) -> Option<(String, String)> {
    let raw = STANDARD.decode(b64.trim()).ok()?;
    let s = String::from_utf8(raw).ok()?;
    let (u, p) = s.split_once(':')?;
    Some((u.to_string(), p.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn basic(u: &str, p: &str) -> String {
        format!("Basic {}", STANDARD.encode(format!("{u}:{p}")))
    }

    #[test]
    fn credential_types() {
        let creds = SimCredentials::generate(1, "a@x.com", "{u}");
        let auth = Auth::new(creds.clone(), Duration::from_secs(60));
        let ok = auth.authenticate(Some(&basic("a@x.com", &creds.api_token)));
        assert_eq!(ok.unwrap().0, Principal::ApiToken);
        assert!(auth.authenticate(Some(&basic("a@x.com", "nope"))).is_err());
        assert!(
            auth.authenticate(Some(&basic("admin", &creds.api_token)))
                .unwrap_err()
                .0
                .contains("email")
        );
        assert!(auth.authenticate(None).is_err());
        assert!(auth.authenticate(Some("Basic !!!")).is_err());
        let at = auth.authenticate(Some(&format!("Bearer {}", creds.access_token)));
        assert_eq!(at.unwrap().0, Principal::AccessToken);
        let form = vec![("grant_type".to_string(), "client_credentials".to_string())];
        let (status, body) = auth.token_endpoint(Some(&basic(&creds.consumer_key, &creds.consumer_secret)), &form);
        assert_eq!(status, 200);
        let bearer = format!("Bearer {}", body["access_token"].as_str().unwrap());
        assert_eq!(auth.authenticate(Some(&bearer)).unwrap().0, Principal::OAuth);
        auth.revoke_oauth_tokens();
        assert!(auth.authenticate(Some(&bearer)).is_err());
        assert_eq!(auth.token_endpoint(Some(&basic("x", "y")), &form).0, 401);
        let bad_grant = vec![("grant_type".to_string(), "password".to_string())];
        let c = basic(&creds.consumer_key, &creds.consumer_secret);
        assert_eq!(auth.token_endpoint(Some(&c), &bad_grant).0, 400);
    }
}
