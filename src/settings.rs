//! Connector settings from a Secret in the format of ConductorOne's
//! `baton-bitbucket` deployment (`BATON_*` keys), from the environment, or
//! from a Secret manifest file. One parser for the operator and the CLI, so
//! both accept exactly the same Secret.
//!
//! Credential choice when several are present: an API token
//! (`BATON_USERNAME` + `BATON_APP_PASSWORD`) first, because it is the only
//! credential that can read and write permissions; then an access token
//! (`BATON_TOKEN`); then an OAuth consumer (`BATON_CONSUMER_KEY` +
//! `BATON_CONSUMER_SECRET`).

use std::collections::BTreeMap;
use std::fmt;

use base64::Engine;

use crate::bitbucket::Credentials;

/// The Secret's key names; each can be overridden per connector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretKeys {
    pub username: String,
    pub app_password: String,
    pub token: String,
    pub consumer_key: String,
    pub consumer_secret: String,
    pub workspaces: String,
    pub provisioning: String,
    pub client_id: String,
    pub client_secret: String,
}

impl Default for SecretKeys {
    fn default() -> Self {
        SecretKeys {
            username: "BATON_USERNAME".into(),
            app_password: "BATON_APP_PASSWORD".into(),
            token: "BATON_TOKEN".into(),
            consumer_key: "BATON_CONSUMER_KEY".into(),
            consumer_secret: "BATON_CONSUMER_SECRET".into(),
            workspaces: "BATON_WORKSPACES".into(),
            provisioning: "BATON_PROVISIONING".into(),
            client_id: "BATON_CLIENT_ID".into(),
            client_secret: "BATON_CLIENT_SECRET".into(),
        }
    }
}

impl SecretKeys {
    /// Every key name the connector reads.
    pub fn all(&self) -> [&str; 9] {
        [
            &self.username,
            &self.app_password,
            &self.token,
            &self.consumer_key,
            &self.consumer_secret,
            &self.workspaces,
            &self.provisioning,
            &self.client_id,
            &self.client_secret,
        ]
    }
}

/// The identity-governance platform's client credentials (ConductorOne).
#[derive(Clone, PartialEq, Eq)]
pub struct PlatformCredentials {
    pub client_id: String,
    pub client_secret: String,
}

impl fmt::Debug for PlatformCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PlatformCredentials")
            .field("client_id", &self.client_id)
            .field("client_secret", &"<redacted>")
            .finish()
    }
}

/// Everything a connector reads from its Secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectorSettings {
    pub credentials: Credentials,
    /// Workspace slugs; empty means every workspace the credential administers.
    pub workspaces: Vec<String>,
    pub provisioning: bool,
    pub platform: Option<PlatformCredentials>,
}

/// Why a Secret could not be turned into settings. Messages name keys, never
/// values.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SettingsError {
    #[error(
        "no Bitbucket credentials: set {username} and {app_password} (API token), or {token} (access token), or {consumer_key} and {consumer_secret} (OAuth consumer)"
    )]
    NoCredentials {
        username: String,
        app_password: String,
        token: String,
        consumer_key: String,
        consumer_secret: String,
    },
    #[error("{present} is set but {missing} is missing")]
    KeyMissing { present: String, missing: String },
    #[error("{key}: {reason}")]
    Invalid { key: String, reason: String },
}

impl SettingsError {
    /// The key a `SecretKeyMissing` status reason should name.
    pub fn missing_key(&self) -> Option<&str> {
        match self {
            SettingsError::KeyMissing { missing, .. } => Some(missing),
            SettingsError::NoCredentials { username, .. } => Some(username),
            SettingsError::Invalid { .. } => None,
        }
    }
}

impl ConnectorSettings {
    /// Reads settings from key/value pairs (a Secret's decoded data, or the
    /// environment). Empty values count as absent.
    pub fn from_map(data: &BTreeMap<String, String>, keys: &SecretKeys) -> Result<Self, SettingsError> {
        let get = |key: &str| data.get(key).map(|v| v.trim()).filter(|v| !v.is_empty());
        let pair = |a: &str, b: &str| -> Result<Option<(String, String)>, SettingsError> {
            match (get(a), get(b)) {
                (Some(x), Some(y)) => Ok(Some((x.to_owned(), y.to_owned()))),
                (Some(_), None) => Err(SettingsError::KeyMissing {
                    present: a.into(),
                    missing: b.into(),
                }),
                (None, Some(_)) => Err(SettingsError::KeyMissing {
                    present: b.into(),
                    missing: a.into(),
                }),
                (None, None) => Ok(None),
            }
        };
        let credentials = if let Some((username, token)) = pair(&keys.username, &keys.app_password)? {
            Credentials::ApiToken { username, token }
        } else if let Some(token) = get(&keys.token) {
            Credentials::AccessToken {
                token: token.to_owned(),
            }
        } else if let Some((key, secret)) = pair(&keys.consumer_key, &keys.consumer_secret)? {
            Credentials::OAuthConsumer { key, secret }
        } else {
            return Err(SettingsError::NoCredentials {
                username: keys.username.clone(),
                app_password: keys.app_password.clone(),
                token: keys.token.clone(),
                consumer_key: keys.consumer_key.clone(),
                consumer_secret: keys.consumer_secret.clone(),
            });
        };
        let workspaces = match get(&keys.workspaces) {
            Some(list) => parse_workspaces(list).map_err(|reason| SettingsError::Invalid {
                key: keys.workspaces.clone(),
                reason,
            })?,
            None => Vec::new(),
        };
        let provisioning = match get(&keys.provisioning) {
            Some(value) => parse_bool(value).ok_or_else(|| SettingsError::Invalid {
                key: keys.provisioning.clone(),
                reason: "must be true or false".into(),
            })?,
            None => false,
        };
        // The platform credentials are not used for syncing: half a pair is
        // reported but does not stop the connector.
        let platform = match pair(&keys.client_id, &keys.client_secret) {
            Ok(pair) => pair.map(|(client_id, client_secret)| PlatformCredentials {
                client_id,
                client_secret,
            }),
            Err(err) => {
                tracing::warn!(error = %err, "ignoring incomplete platform client credentials");
                None
            }
        };
        Ok(ConnectorSettings {
            credentials,
            workspaces,
            provisioning,
            platform,
        })
    }

    /// Reads the `keys` from the process environment.
    pub fn from_env(keys: &SecretKeys) -> Result<Self, SettingsError> {
        let data = keys
            .all()
            .into_iter()
            .filter_map(|key| std::env::var(key).ok().map(|value| (key.to_owned(), value)))
            .collect();
        Self::from_map(&data, keys)
    }
}

/// Decodes a Kubernetes Secret manifest (YAML or JSON) into key/value pairs:
/// `data` (base64) overlaid by `stringData`, as the API server would merge them.
pub fn secret_manifest_data(manifest: &str) -> Result<BTreeMap<String, String>, String> {
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Manifest {
        kind: Option<String>,
        #[serde(default)]
        data: BTreeMap<String, String>,
        #[serde(default)]
        string_data: BTreeMap<String, String>,
    }
    let manifest: Manifest =
        serde_yaml::from_str(manifest).map_err(|e| format!("not a Kubernetes Secret manifest: {e}"))?;
    if let Some(kind) = &manifest.kind
        && kind != "Secret"
    {
        return Err(format!("expected kind Secret, found {kind}"));
    }
    let mut out = BTreeMap::new();
    for (key, value) in manifest.data {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(value.trim())
            .map_err(|_| format!("data.{key} is not valid base64"))?;
        let text = String::from_utf8(bytes).map_err(|_| format!("data.{key} is not UTF-8 text"))?;
        out.insert(key, text);
    }
    out.extend(manifest.string_data);
    Ok(out)
}

/// Splits `a, b,c` into validated workspace slugs.
pub fn parse_workspaces(list: &str) -> Result<Vec<String>, String> {
    let mut slugs = Vec::new();
    for slug in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let valid = slug
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '_' | '.'))
            || (slug.starts_with('{') && slug.ends_with('}'));
        if !valid {
            return Err(format!("{slug:?} is not a workspace slug"));
        }
        if !slugs.iter().any(|s| s == slug) {
            slugs.push(slug.to_owned());
        }
    }
    Ok(slugs)
}

fn parse_bool(value: &str) -> Option<bool> {
    match value.to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Some(true),
        "false" | "0" | "no" | "off" => Some(false),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn seed_secret_format() {
        let settings = ConnectorSettings::from_map(
            &map(&[
                ("BATON_USERNAME", "ops@example.com"),
                ("BATON_APP_PASSWORD", "ATATT-secret"),
                ("BATON_WORKSPACES", "acme, acme-labs"),
                ("BATON_PROVISIONING", "true"),
            ]),
            &SecretKeys::default(),
        )
        .unwrap();
        assert_eq!(
            settings.credentials,
            Credentials::ApiToken {
                username: "ops@example.com".into(),
                token: "ATATT-secret".into()
            }
        );
        assert_eq!(settings.workspaces, vec!["acme", "acme-labs"]);
        assert!(settings.provisioning);
        assert!(settings.platform.is_none());
    }

    #[test]
    fn half_a_pair_names_the_missing_key() {
        let err = ConnectorSettings::from_map(&map(&[("BATON_USERNAME", "ops@example.com")]), &SecretKeys::default())
            .unwrap_err();
        assert_eq!(
            err,
            SettingsError::KeyMissing {
                present: "BATON_USERNAME".into(),
                missing: "BATON_APP_PASSWORD".into()
            }
        );
        assert_eq!(err.missing_key(), Some("BATON_APP_PASSWORD"));
    }

    #[test]
    fn other_credential_types_and_errors() {
        let keys = SecretKeys::default();
        let token = ConnectorSettings::from_map(&map(&[("BATON_TOKEN", "tok")]), &keys).unwrap();
        assert_eq!(token.credentials, Credentials::AccessToken { token: "tok".into() });
        let oauth = ConnectorSettings::from_map(
            &map(&[
                ("BATON_CONSUMER_KEY", "k"),
                ("BATON_CONSUMER_SECRET", "s"),
                ("BATON_USERNAME", ""),
            ]),
            &keys,
        )
        .unwrap();
        assert_eq!(
            oauth.credentials,
            Credentials::OAuthConsumer {
                key: "k".into(),
                secret: "s".into()
            }
        );
        assert!(matches!(
            ConnectorSettings::from_map(&map(&[]), &keys),
            Err(SettingsError::NoCredentials { .. })
        ));
        let bad = ConnectorSettings::from_map(&map(&[("BATON_TOKEN", "t"), ("BATON_PROVISIONING", "maybe")]), &keys);
        assert!(matches!(bad, Err(SettingsError::Invalid { .. })));
        let bad = ConnectorSettings::from_map(&map(&[("BATON_TOKEN", "t"), ("BATON_WORKSPACES", "Bad Slug")]), &keys);
        assert!(matches!(bad, Err(SettingsError::Invalid { .. })));
    }

    #[test]
    fn overridden_key_names() {
        let keys = SecretKeys {
            token: "BB_TOKEN".into(),
            ..SecretKeys::default()
        };
        let settings = ConnectorSettings::from_map(&map(&[("BB_TOKEN", "tok")]), &keys).unwrap();
        assert_eq!(settings.credentials, Credentials::AccessToken { token: "tok".into() });
    }

    #[test]
    fn manifest_with_data_and_string_data() {
        let yaml = "apiVersion: v1\nkind: Secret\nmetadata:\n  name: s\ndata:\n  BATON_USERNAME: b3BzQGV4YW1wbGUuY29t\nstringData:\n  BATON_APP_PASSWORD: tok\n";
        let data = secret_manifest_data(yaml).unwrap();
        assert_eq!(data["BATON_USERNAME"], "ops@example.com");
        assert_eq!(data["BATON_APP_PASSWORD"], "tok");
        assert!(secret_manifest_data("kind: ConfigMap\n").is_err());
        assert!(secret_manifest_data("kind: Secret\ndata:\n  K: '!!!'\n").is_err());
    }

    #[test]
    fn half_a_platform_pair_does_not_block_syncing() {
        let settings = ConnectorSettings::from_map(
            &map(&[("BATON_TOKEN", "t"), ("BATON_CLIENT_ID", "name@tenant.conductor.one/x")]),
            &SecretKeys::default(),
        )
        .unwrap();
        assert!(settings.platform.is_none());
    }

    #[test]
    fn platform_secret_is_redacted() {
        let p = PlatformCredentials {
            client_id: "id".into(),
            client_secret: "topsecret".into(),
        };
        assert!(!format!("{p:?}").contains("topsecret"));
    }
}
