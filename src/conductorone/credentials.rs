//! ConductorOne client credentials (PROTOCOL.md §1): the client id names the
//! tenant, the client secret carries an Ed25519 private key as a JWK, and a
//! short-lived EdDSA JWT signed with it is the assertion exchanged for an
//! access token.
//!
//! Nothing here ever formats the secret or the key: errors say what is wrong
//! with the shape, and `Debug` redacts.

use base64::Engine as _;
use base64::engine::general_purpose::{URL_SAFE, URL_SAFE_NO_PAD};
use ring::signature::{Ed25519KeyPair, KeyPair as _};
use serde::{Deserialize, Serialize};

/// What is wrong with the client id or secret. Never contains the secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CredentialError {
    #[error("malformed ConductorOne client id {client_id:?}: {reason} (expected <name>@<tenant host>/<suffix>)")]
    MalformedClientId { client_id: String, reason: &'static str },
    #[error(
        "malformed ConductorOne client secret: {reason} (expected secret-token:conductorone.com:v1:<key>, as \
         ConductorOne showed it when the credential was created)"
    )]
    MalformedClientSecret { reason: &'static str },
    #[error("the ConductorOne client secret's key is not an Ed25519 private key: {reason}")]
    NotEd25519 { reason: &'static str },
}

/// The pieces of a client id `<name>@<host>/<suffix>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientId {
    /// The whole id, as sent in `client_id`, `iss` and `sub`.
    pub full: String,
    /// The tenant host (`acme.conductor.one`), possibly with a port.
    pub host: String,
    /// `ccc` for connector credentials, `pcc` for personal API keys.
    pub suffix: String,
}

impl ClientId {
    /// Splits at the first `@`, then the first `/`.
    pub fn parse(value: &str) -> Result<Self, CredentialError> {
        let value = value.trim();
        let bad = |reason| CredentialError::MalformedClientId {
            client_id: value.to_owned(),
            reason,
        };
        if value.is_empty() {
            return Err(bad("it is empty"));
        }
        let (name, rest) = value.split_once('@').ok_or_else(|| bad("no '@'"))?;
        let (host, suffix) = rest.split_once('/').ok_or_else(|| bad("no '/' after the host"))?;
        if name.is_empty() {
            return Err(bad("nothing before '@'"));
        }
        if host.is_empty() || host.contains(|c: char| c.is_whitespace() || c == '@') {
            return Err(bad("no tenant host between '@' and '/'"));
        }
        if suffix.is_empty() {
            return Err(bad("nothing after '/'"));
        }
        Ok(ClientId {
            full: value.to_owned(),
            host: host.to_owned(),
            suffix: suffix.to_owned(),
        })
    }

    /// The JWT audience: the tenant host without a port.
    pub fn audience(&self) -> &str {
        host_without_port(&self.host)
    }
}

/// `host[:port]` → `host` (IPv6 literals in brackets keep their brackets).
pub fn host_without_port(host: &str) -> &str {
    if host.starts_with('[') {
        return host.split_once(']').map_or(host, |(h, _)| &host[..h.len() + 1]);
    }
    match host.rsplit_once(':') {
        Some((h, port)) if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    }
}

#[derive(Deserialize)]
struct Jwk {
    kty: Option<String>,
    crv: Option<String>,
    x: Option<String>,
    d: Option<String>,
    kid: Option<String>,
}

/// A parsed client id and the signing key from its secret.
pub struct ClientCredentials {
    id: ClientId,
    key: Ed25519KeyPair,
    kid: Option<String>,
}

impl std::fmt::Debug for ClientCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientCredentials")
            .field("client_id", &self.id.full)
            .field("client_secret", &"<redacted>")
            .finish()
    }
}

impl ClientCredentials {
    /// Parses both values; the error names what is malformed, never the secret.
    pub fn parse(client_id: &str, client_secret: &str) -> Result<Self, CredentialError> {
        let id = ClientId::parse(client_id)?;
        let bad = |reason| CredentialError::MalformedClientSecret { reason };
        let secret = client_secret.trim();
        if secret.is_empty() {
            return Err(bad("it is empty"));
        }
        let parts: Vec<&str> = secret.split(':').collect();
        let [prefix, _issuer, version, encoded] = parts.as_slice() else {
            return Err(bad("it does not have 4 ':'-separated parts"));
        };
        if *prefix != "secret-token" {
            return Err(bad("it does not start with secret-token:"));
        }
        if *version != "v1" {
            return Err(bad("its version is not v1"));
        }
        let json = URL_SAFE_NO_PAD
            .decode(encoded.trim_end_matches('='))
            .or_else(|_| URL_SAFE.decode(encoded))
            .map_err(|_| bad("the key part is not base64url"))?;
        let jwk: Jwk = serde_json::from_slice(&json).map_err(|_| bad("the key part is not a JSON Web Key"))?;
        let not_ed = |reason| CredentialError::NotEd25519 { reason };
        if jwk.kty.as_deref() != Some("OKP") || jwk.crv.as_deref() != Some("Ed25519") {
            return Err(not_ed("the key type is not OKP/Ed25519"));
        }
        let decode32 = |v: Option<String>, what| {
            let bytes = URL_SAFE_NO_PAD
                .decode(v.unwrap_or_default().trim_end_matches('='))
                .map_err(|_| not_ed(what))?;
            (bytes.len() == 32).then_some(bytes).ok_or_else(|| not_ed(what))
        };
        let d = decode32(jwk.d, "the private part (d) is missing or not 32 bytes")?;
        let x = decode32(jwk.x, "the public part (x) is missing or not 32 bytes")?;
        let key = Ed25519KeyPair::from_seed_and_public_key(&d, &x)
            .map_err(|_| not_ed("the public part does not belong to the private part"))?;
        Ok(ClientCredentials {
            id,
            key,
            kid: jwk.kid.filter(|k| !k.is_empty()),
        })
    }

    pub fn client_id(&self) -> &ClientId {
        &self.id
    }

    /// The raw Ed25519 public key (what ConductorOne holds for this client).
    pub fn public_key(&self) -> &[u8] {
        self.key.public_key().as_ref()
    }

    /// The client assertion: a compact EdDSA JWS valid from 120 s before
    /// `now` to 120 s after (PROTOCOL.md §1: header `alg`, a 32-hex `nonce`,
    /// `kid` only when the JWK has one; claims `iss`=`sub`=client id, `aud`
    /// the tenant host without port, `iat`, `nbf`, `exp`).
    pub fn assertion(&self, now_unix: i64) -> String {
        let nonce: [u8; 16] = rand::random();
        let header = AssertionHeader {
            alg: "EdDSA",
            nonce: nonce.iter().map(|b| format!("{b:02x}")).collect(),
            kid: self.kid.clone(),
        };
        let claims = AssertionClaims {
            iss: self.id.full.clone(),
            sub: self.id.full.clone(),
            aud: self.id.audience().to_owned(),
            iat: now_unix,
            nbf: now_unix - 120,
            exp: now_unix + 120,
        };
        let signing_input = format!("{}.{}", b64_json(&header), b64_json(&claims));
        let signature = self.key.sign(signing_input.as_bytes());
        format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(signature.as_ref()))
    }
}

/// The JWS protected header of an assertion.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AssertionHeader {
    pub alg: &'static str,
    pub nonce: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kid: Option<String>,
}

/// The claims of an assertion.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AssertionClaims {
    pub iss: String,
    pub sub: String,
    pub aud: String,
    pub iat: i64,
    pub nbf: i64,
    pub exp: i64,
}

/// Base64url (unpadded) of a value's JSON.
fn b64_json<T: Serialize>(value: &T) -> String {
    URL_SAFE_NO_PAD.encode(serde_json::to_vec(value).unwrap_or_default())
}

/// Builds a client secret from a 32-byte seed, as ConductorOne issues them
/// (for tests, the fake ConductorOne and documentation examples).
pub fn secret_from_seed(seed: &[u8; 32], kid: Option<&str>) -> String {
    let pair = Ed25519KeyPair::from_seed_unchecked(seed).expect("any 32-byte seed is an Ed25519 key");
    let mut jwk = serde_json::json!({
        "kty": "OKP",
        "crv": "Ed25519",
        "x": URL_SAFE_NO_PAD.encode(pair.public_key().as_ref()),
        "d": URL_SAFE_NO_PAD.encode(seed),
    });
    if let Some(kid) = kid {
        jwk["kid"] = kid.into();
    }
    format!(
        "secret-token:conductorone.com:v1:{}",
        URL_SAFE_NO_PAD.encode(jwk.to_string())
    )
}

/// Checks a compact EdDSA JWS against a raw Ed25519 public key and returns
/// its header and claims (used by the fake ConductorOne; any input gives an
/// error, never a panic).
pub fn verify_assertion(jws: &str, public_key: &[u8]) -> Result<(AssertionHeader, AssertionClaims), String> {
    let mut parts = jws.split('.');
    let (Some(h), Some(c), Some(s), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return Err("not a compact JWS".into());
    };
    let signature = URL_SAFE_NO_PAD.decode(s).map_err(|_| "signature is not base64url")?;
    ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, public_key)
        .verify(format!("{h}.{c}").as_bytes(), &signature)
        .map_err(|_| "bad signature")?;
    let header: serde_json::Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(h).map_err(|_| "header is not base64url")?)
            .map_err(|_| "header is not JSON")?;
    if header.get("alg").and_then(|a| a.as_str()) != Some("EdDSA") {
        return Err("alg is not EdDSA".into());
    }
    if header.get("typ").is_some() {
        return Err("unexpected typ header".into());
    }
    let header = AssertionHeader {
        alg: "EdDSA",
        nonce: header
            .get("nonce")
            .and_then(|n| n.as_str())
            .unwrap_or_default()
            .to_owned(),
        kid: header.get("kid").and_then(|k| k.as_str()).map(str::to_owned),
    };
    let claims: AssertionClaims =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(c).map_err(|_| "claims are not base64url")?)
            .map_err(|e| format!("claims: {e}"))?;
    Ok((header, claims))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEED: [u8; 32] = [7; 32];

    #[test]
    fn client_id_splits_at_first_at_and_slash() {
        let id = ClientId::parse("bitbucket-1@acme.conductor.one:8443/ccc").unwrap();
        assert_eq!(id.host, "acme.conductor.one:8443");
        assert_eq!(id.audience(), "acme.conductor.one");
        assert_eq!(id.suffix, "ccc");
        for bad in ["", "no-at-sign", "a@/ccc", "a@host", "@host/ccc", "a@host/"] {
            assert!(ClientId::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn malformed_secrets_are_refused_without_echoing_them() {
        let id = "c@acme.conductor.one/ccc";
        let good = secret_from_seed(&SEED, None);
        assert!(ClientCredentials::parse(id, &good).is_ok());
        let wrong_kty = format!(
            "secret-token:conductorone.com:v1:{}",
            URL_SAFE_NO_PAD.encode(r#"{"kty":"EC","crv":"P-256","x":"AAAA","d":"SECRETVALUE"}"#)
        );
        let mismatched = {
            let other = secret_from_seed(&[8; 32], None);
            let jwk = URL_SAFE_NO_PAD.decode(other.rsplit(':').next().unwrap()).unwrap();
            let mut jwk: serde_json::Value = serde_json::from_slice(&jwk).unwrap();
            jwk["d"] = URL_SAFE_NO_PAD.encode(SEED).into();
            format!(
                "secret-token:conductorone.com:v1:{}",
                URL_SAFE_NO_PAD.encode(jwk.to_string())
            )
        };
        for (secret, want) in [
            ("", "empty"),
            ("SECRETVALUE", "4 ':'-separated"),
            ("secret-token:conductorone.com:v2:SECRETVALUE", "version"),
            ("secret-token:conductorone.com:v1:!!SECRETVALUE", "base64url"),
            (wrong_kty.as_str(), "OKP/Ed25519"),
            (mismatched.as_str(), "does not belong"),
        ] {
            let err = ClientCredentials::parse(id, secret).unwrap_err().to_string();
            assert!(err.contains(want), "{err}");
            assert!(!err.contains("SECRETVALUE"), "the secret leaked: {err}");
        }
        let debug = format!("{:?}", ClientCredentials::parse(id, &good).unwrap());
        assert!(debug.contains("<redacted>") && !debug.contains(good.rsplit(':').next().unwrap()));
    }

    #[test]
    fn assertion_verifies_with_exact_header_and_claims() {
        let creds =
            ClientCredentials::parse("c@acme.conductor.one:8443/ccc", &secret_from_seed(&SEED, Some("k1"))).unwrap();
        let jws = creds.assertion(1_000_000);
        let (header, claims) = verify_assertion(&jws, creds.public_key()).unwrap();
        assert_eq!(header.kid.as_deref(), Some("k1"));
        assert_eq!(header.nonce.len(), 32);
        assert!(header.nonce.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_eq!(claims.aud, "acme.conductor.one");
        assert_eq!(
            (claims.iss.as_str(), claims.sub.as_str()),
            ("c@acme.conductor.one:8443/ccc", "c@acme.conductor.one:8443/ccc")
        );
        assert_eq!((claims.nbf, claims.iat, claims.exp), (999_880, 1_000_000, 1_000_120));
        let other = ClientCredentials::parse("c@x/ccc", &secret_from_seed(&[9; 32], None)).unwrap();
        assert!(verify_assertion(&jws, other.public_key()).is_err());
        let no_kid = ClientCredentials::parse("c@x/ccc", &secret_from_seed(&SEED, None)).unwrap();
        let header = no_kid.assertion(0).split('.').next().unwrap().to_owned();
        let header: serde_json::Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(header).unwrap()).unwrap();
        assert_eq!(header.as_object().unwrap().len(), 2, "only alg and nonce: {header}");
    }
}
