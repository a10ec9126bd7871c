//! Bitbucket credentials. `Debug` never shows a secret; the fingerprint is a
//! short one-way hash that status and logs may carry to show that a credential
//! changed without revealing it.

use sha2::{Digest, Sha256};
use std::fmt;

/// How the connector authenticates to Bitbucket.
#[derive(Clone, PartialEq, Eq)]
pub enum Credentials {
    /// Atlassian API token (or a legacy app password): HTTP Basic with the
    /// account email (the Bitbucket username for app passwords).
    ApiToken { username: String, token: String },
    /// A repository, project or workspace access token, sent as Bearer. It
    /// cannot read or change permissions.
    AccessToken { token: String },
    /// An OAuth consumer using the client-credentials grant.
    OAuthConsumer { key: String, secret: String },
}

impl Credentials {
    /// Short human name of the method, safe to show anywhere.
    pub fn method(&self) -> &'static str {
        match self {
            Credentials::ApiToken { .. } => "api-token",
            Credentials::AccessToken { .. } => "access-token",
            Credentials::OAuthConsumer { .. } => "oauth-consumer",
        }
    }

    /// The key under which clients share a rate limiter: SHA-256 of the API
    /// origin and the *whole* credential (username and secret, token, or
    /// consumer key and secret), hex. Only someone holding the same secret
    /// can share (and so tighten) a limiter; a username alone is not enough.
    /// Never logged: a hash of a low-entropy secret is still worth guarding.
    pub fn limiter_key(&self, origin: &str) -> String {
        let mut hasher = Sha256::new();
        hasher.update(b"limiter\0");
        hasher.update(origin.as_bytes());
        hasher.update(b"\0");
        match self {
            Credentials::ApiToken { username, token } => {
                hasher.update(b"api-token\0");
                hasher.update(username.to_lowercase().as_bytes());
                hasher.update(b"\0");
                hasher.update(token.as_bytes());
            }
            Credentials::AccessToken { token } => {
                hasher.update(b"access-token\0");
                hasher.update(token.as_bytes());
            }
            Credentials::OAuthConsumer { key, secret } => {
                hasher.update(b"oauth-consumer\0");
                hasher.update(key.as_bytes());
                hasher.update(b"\0");
                hasher.update(secret.as_bytes());
            }
        }
        hex_prefix(&hasher.finalize(), 64)
    }

    /// A 12-hex-digit SHA-256 fingerprint of the whole credential, secret
    /// included: changes whenever any part changes, reveals nothing.
    pub fn fingerprint(&self) -> String {
        let mut hasher = Sha256::new();
        match self {
            Credentials::ApiToken { username, token } => {
                hasher.update(b"api-token\0");
                hasher.update(username.as_bytes());
                hasher.update(b"\0");
                hasher.update(token.as_bytes());
            }
            Credentials::AccessToken { token } => {
                hasher.update(b"access-token\0");
                hasher.update(token.as_bytes());
            }
            Credentials::OAuthConsumer { key, secret } => {
                hasher.update(b"oauth-consumer\0");
                hasher.update(key.as_bytes());
                hasher.update(b"\0");
                hasher.update(secret.as_bytes());
            }
        }
        hex_prefix(&hasher.finalize(), 12)
    }

    /// True for Basic credentials whose username is not an email address:
    /// Atlassian API tokens only work with the account email.
    pub fn username_is_not_email(&self) -> bool {
        matches!(self, Credentials::ApiToken { username, .. } if !username.contains('@'))
    }
}

fn hex_prefix(bytes: &[u8], len: usize) -> String {
    let mut out = String::with_capacity(len);
    for byte in bytes {
        if out.len() >= len {
            break;
        }
        out.push_str(&format!("{byte:02x}"));
    }
    out.truncate(len);
    out
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Credentials::ApiToken { username, .. } => f
                .debug_struct("ApiToken")
                .field("username", username)
                .field("token", &"<redacted>")
                .finish(),
            Credentials::AccessToken { .. } => f.debug_struct("AccessToken").field("token", &"<redacted>").finish(),
            Credentials::OAuthConsumer { key, .. } => f
                .debug_struct("OAuthConsumer")
                .field("key", key)
                .field("secret", &"<redacted>")
                .finish(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_redacts_secrets() {
        let all = [
            Credentials::ApiToken {
                username: "a@b.c".into(),
                token: "s3cr3t-token".into(),
            },
            Credentials::AccessToken {
                token: "s3cr3t-token".into(),
            },
            Credentials::OAuthConsumer {
                key: "key".into(),
                secret: "s3cr3t-token".into(),
            },
        ];
        for creds in all {
            let shown = format!("{creds:?} {creds:#?}");
            assert!(!shown.contains("s3cr3t"), "{shown}");
            assert!(shown.contains("<redacted>"));
        }
    }

    #[test]
    fn fingerprint_changes_with_secret_and_is_short() {
        let a = Credentials::ApiToken {
            username: "a@b.c".into(),
            token: "one".into(),
        };
        let b = Credentials::ApiToken {
            username: "a@b.c".into(),
            token: "two".into(),
        };
        assert_ne!(a.fingerprint(), b.fingerprint());
        assert_eq!(a.fingerprint().len(), 12);
        assert_eq!(a.fingerprint(), a.clone().fingerprint());
        // Same user, other token: another limiter (a fake token must not
        // share, and so tighten, the real one's).
        let origin = "https://api.bitbucket.org";
        assert_ne!(a.limiter_key(origin), b.limiter_key(origin));
        assert_eq!(a.limiter_key(origin), a.clone().limiter_key(origin));
        assert_ne!(a.limiter_key(origin), a.limiter_key("http://127.0.0.1:1"));
        assert_eq!(a.limiter_key(origin).len(), 64);
        let upper = Credentials::ApiToken {
            username: "A@B.C".into(),
            token: "one".into(),
        };
        assert_eq!(
            a.limiter_key(origin),
            upper.limiter_key(origin),
            "emails compare case-insensitively"
        );
    }

    #[test]
    fn detects_plain_username() {
        assert!(
            Credentials::ApiToken {
                username: "jdoe".into(),
                token: "t".into()
            }
            .username_is_not_email()
        );
        assert!(
            !Credentials::ApiToken {
                username: "j@x.io".into(),
                token: "t".into()
            }
            .username_is_not_email()
        );
    }
}
