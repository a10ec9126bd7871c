//! Connector settings from a Secret in the format of ConductorOne's
//! `baton-bitbucket` deployment (`BATON_*` keys), or from the CLI's flags and
//! environment, or from a Secret manifest file. One module for every path:
//! the key names ([`secret_key`], spelled only here), their per-connector
//! overrides ([`SecretKeys`], also the CRD's `spec.secretKeys`), one decoder
//! of a Secret's entries ([`decode_entries`]: a value that is not UTF-8 is
//! reported, never dropped), one parser ([`ConnectorSettings::from_map`]), and
//! the CLI's credential flags ([`CredentialArgs`]). So the operator, the grant
//! controller and the CLI accept exactly the same Secret.
//!
//! Credential choice when several are present: an API token
//! (`BATON_USERNAME` + `BATON_APP_PASSWORD`) first, because it is the only
//! credential that can read and write permissions; then an access token
//! (`BATON_TOKEN`); then an OAuth consumer (`BATON_CONSUMER_KEY` +
//! `BATON_CONSUMER_SECRET`).

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

use base64::Engine;
use k8s_openapi::api::core::v1::Secret;
use kube::KubeSchema;
use serde::{Deserialize, Serialize};

use crate::bitbucket::{Credentials, DEFAULT_API_URL};

/// Default Secret key names: those of baton-bitbucket, so its Secret works
/// unchanged. The only place they are spelled.
pub mod secret_key {
    pub const USERNAME: &str = "BATON_USERNAME";
    pub const APP_PASSWORD: &str = "BATON_APP_PASSWORD";
    pub const TOKEN: &str = "BATON_TOKEN";
    pub const CONSUMER_KEY: &str = "BATON_CONSUMER_KEY";
    pub const CONSUMER_SECRET: &str = "BATON_CONSUMER_SECRET";
    pub const WORKSPACES: &str = "BATON_WORKSPACES";
    pub const PROVISIONING: &str = "BATON_PROVISIONING";
    pub const CLIENT_ID: &str = "BATON_CLIENT_ID";
    pub const CLIENT_SECRET: &str = "BATON_CLIENT_SECRET";
}

/// Names of the Secret's keys. Every field is optional; unset ones use
/// baton-bitbucket's key names.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeys {
    /// Key of the Bitbucket login (for an Atlassian API token, the account's
    /// email). Default BATON_USERNAME.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// Key of the API token or legacy app password. Default BATON_APP_PASSWORD.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_password: Option<String>,
    /// Key of a workspace, project or repository access token (Bearer), used
    /// instead of username and app password; it cannot read or change
    /// permissions. Default BATON_TOKEN.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// Key of an OAuth consumer key (client-credentials grant). Default
    /// BATON_CONSUMER_KEY.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consumer_key: Option<String>,
    /// Key of the OAuth consumer secret. Default BATON_CONSUMER_SECRET.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consumer_secret: Option<String>,
    /// Key of the comma-separated workspace slugs. Default BATON_WORKSPACES.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workspaces: Option<String>,
    /// Key of the provisioning switch ("true" allows grants and revokes).
    /// Default BATON_PROVISIONING.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provisioning: Option<String>,
    /// Key of the platform client ID. Default BATON_CLIENT_ID.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    /// Key of the platform client secret. Default BATON_CLIENT_SECRET.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_secret: Option<String>,
}

impl SecretKeys {
    fn pick<'a>(value: &'a Option<String>, default: &'static str) -> &'a str {
        value.as_deref().filter(|s| !s.is_empty()).unwrap_or(default)
    }
    pub fn username(&self) -> &str {
        Self::pick(&self.username, secret_key::USERNAME)
    }
    pub fn app_password(&self) -> &str {
        Self::pick(&self.app_password, secret_key::APP_PASSWORD)
    }
    pub fn token(&self) -> &str {
        Self::pick(&self.token, secret_key::TOKEN)
    }
    pub fn consumer_key(&self) -> &str {
        Self::pick(&self.consumer_key, secret_key::CONSUMER_KEY)
    }
    pub fn consumer_secret(&self) -> &str {
        Self::pick(&self.consumer_secret, secret_key::CONSUMER_SECRET)
    }
    pub fn workspaces(&self) -> &str {
        Self::pick(&self.workspaces, secret_key::WORKSPACES)
    }
    pub fn provisioning(&self) -> &str {
        Self::pick(&self.provisioning, secret_key::PROVISIONING)
    }
    pub fn client_id(&self) -> &str {
        Self::pick(&self.client_id, secret_key::CLIENT_ID)
    }
    pub fn client_secret(&self) -> &str {
        Self::pick(&self.client_secret, secret_key::CLIENT_SECRET)
    }

    /// Every key name the connector reads.
    pub fn all(&self) -> [&str; 9] {
        [
            self.username(),
            self.app_password(),
            self.token(),
            self.consumer_key(),
            self.consumer_secret(),
            self.workspaces(),
            self.provisioning(),
            self.client_id(),
            self.client_secret(),
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
    /// A key the connector reads holds bytes that are not UTF-8 text.
    #[error("key {key} is not UTF-8 text")]
    NotText { key: String },
}

impl SettingsError {
    /// The key a `SecretKeyMissing` status reason should name.
    pub fn missing_key(&self) -> Option<&str> {
        match self {
            SettingsError::KeyMissing { missing, .. } => Some(missing),
            SettingsError::NoCredentials { username, .. } => Some(username),
            SettingsError::NotText { key } => Some(key),
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
        let credentials = if let Some((username, token)) = pair(keys.username(), keys.app_password())? {
            Credentials::ApiToken { username, token }
        } else if let Some(token) = get(keys.token()) {
            Credentials::AccessToken {
                token: token.to_owned(),
            }
        } else if let Some((key, secret)) = pair(keys.consumer_key(), keys.consumer_secret())? {
            Credentials::OAuthConsumer { key, secret }
        } else {
            return Err(SettingsError::NoCredentials {
                username: keys.username().to_owned(),
                app_password: keys.app_password().to_owned(),
                token: keys.token().to_owned(),
                consumer_key: keys.consumer_key().to_owned(),
                consumer_secret: keys.consumer_secret().to_owned(),
            });
        };
        let workspaces = match get(keys.workspaces()) {
            Some(list) => parse_workspaces(list).map_err(|reason| SettingsError::Invalid {
                key: keys.workspaces().to_owned(),
                reason,
            })?,
            None => Vec::new(),
        };
        let provisioning = match get(keys.provisioning()) {
            Some(value) => parse_bool(value).ok_or_else(|| SettingsError::Invalid {
                key: keys.provisioning().to_owned(),
                reason: "must be true or false".into(),
            })?,
            None => false,
        };
        // The platform credentials are not used for syncing: half a pair is
        // reported but does not stop the connector.
        let platform = match pair(keys.client_id(), keys.client_secret()) {
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

    /// Reads a Kubernetes Secret (`data` overlaid by `stringData`, as the
    /// API server merges them).
    pub fn from_secret(secret: &Secret, keys: &SecretKeys) -> Result<Self, SettingsError> {
        let data = secret.data.iter().flatten().map(|(k, v)| (k.clone(), v.0.clone()));
        let string_data = secret.string_data.iter().flatten().map(|(k, v)| (k.clone(), v.clone()));
        Self::from_map(&decode_entries(data, string_data, keys)?, keys)
    }
}

/// The one decoder of a Secret's entries: the keys the connector reads
/// (other entries, a binary CA bundle say, are none of its business), with
/// `stringData` overlaying `data`. A read key whose bytes are not UTF-8 text
/// is an error naming the key (never its value), on every path.
pub fn decode_entries(
    data: impl IntoIterator<Item = (String, Vec<u8>)>,
    string_data: impl IntoIterator<Item = (String, String)>,
    keys: &SecretKeys,
) -> Result<BTreeMap<String, String>, SettingsError> {
    let wanted = keys.all();
    let mut out = BTreeMap::new();
    for (key, bytes) in data.into_iter().filter(|(k, _)| wanted.contains(&k.as_str())) {
        match String::from_utf8(bytes) {
            Ok(text) => out.insert(key, text),
            Err(_) => return Err(SettingsError::NotText { key }),
        };
    }
    out.extend(string_data.into_iter().filter(|(k, _)| wanted.contains(&k.as_str())));
    Ok(out)
}

/// Reads settings from a Kubernetes Secret manifest (YAML or JSON), with the
/// default key names. Messages name keys, never values.
pub fn settings_from_manifest(manifest: &str) -> Result<ConnectorSettings, String> {
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
    let mut data = Vec::new();
    for (key, value) in manifest.data {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(value.trim())
            .map_err(|_| format!("data.{key} is not valid base64"))?;
        data.push((key, bytes));
    }
    let keys = SecretKeys::default();
    let entries = decode_entries(data, manifest.string_data, &keys).map_err(|e| e.to_string())?;
    ConnectorSettings::from_map(&entries, &keys).map_err(|e| e.to_string())
}

/// Bitbucket credentials and API root, shared by every command that talks to
/// Bitbucket without a cluster (`sync`, `grant`, `revoke`): flags, `BATON_*`
/// variables, or a Secret manifest in the seed format.
#[derive(Debug, Clone, clap::Args)]
pub struct CredentialArgs {
    /// Bitbucket API root.
    #[arg(long, env = "BITBUCKET_API_URL", default_value = DEFAULT_API_URL)]
    pub api_url: String,
    /// Read credentials from a Kubernetes Secret manifest (stringData or
    /// base64 data, `BATON_*` keys).
    #[arg(long, value_name = "FILE")]
    pub secret_file: Option<PathBuf>,
    /// Atlassian account email for an API token.
    #[arg(long, env = secret_key::USERNAME, hide_env_values = true)]
    pub username: Option<String>,
    /// API token (or legacy app password).
    #[arg(long, env = secret_key::APP_PASSWORD, hide_env_values = true)]
    pub app_password: Option<String>,
    /// Workspace, project or repository access token.
    #[arg(long, env = secret_key::TOKEN, hide_env_values = true)]
    pub token: Option<String>,
    /// OAuth consumer key.
    #[arg(long, env = secret_key::CONSUMER_KEY, hide_env_values = true)]
    pub consumer_key: Option<String>,
    /// OAuth consumer secret.
    #[arg(long, env = secret_key::CONSUMER_SECRET, hide_env_values = true)]
    pub consumer_secret: Option<String>,
}

impl CredentialArgs {
    /// Settings from `--secret-file`, else from flags and `BATON_*`
    /// variables (`BATON_WORKSPACES` and `BATON_PROVISIONING` from the
    /// environment). Messages name keys, never values.
    pub fn settings(&self) -> Result<ConnectorSettings, String> {
        if let Some(path) = &self.secret_file {
            let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
            return settings_from_manifest(&text).map_err(|e| format!("{}: {e}", path.display()));
        }
        let keys = SecretKeys::default();
        let flags = [
            (keys.username(), &self.username),
            (keys.app_password(), &self.app_password),
            (keys.token(), &self.token),
            (keys.consumer_key(), &self.consumer_key),
            (keys.consumer_secret(), &self.consumer_secret),
        ];
        let mut data: BTreeMap<String, String> = flags
            .into_iter()
            .filter_map(|(key, value)| value.clone().map(|v| (key.to_owned(), v)))
            .collect();
        for key in [keys.workspaces(), keys.provisioning()] {
            if let Ok(value) = std::env::var(key) {
                data.insert(key.to_owned(), value);
            }
        }
        ConnectorSettings::from_map(&data, &keys).map_err(|e| e.to_string())
    }
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
            token: Some("BB_TOKEN".into()),
            ..SecretKeys::default()
        };
        let settings = ConnectorSettings::from_map(&map(&[("BB_TOKEN", "tok")]), &keys).unwrap();
        assert_eq!(settings.credentials, Credentials::AccessToken { token: "tok".into() });
    }

    #[test]
    fn manifest_with_data_and_string_data() {
        let yaml = "apiVersion: v1\nkind: Secret\nmetadata:\n  name: s\ndata:\n  BATON_USERNAME: b3BzQGV4YW1wbGUuY29t\nstringData:\n  BATON_APP_PASSWORD: tok\n";
        let settings = settings_from_manifest(yaml).unwrap();
        assert_eq!(
            settings.credentials,
            Credentials::ApiToken {
                username: "ops@example.com".into(),
                token: "tok".into()
            }
        );
        assert!(settings_from_manifest("kind: ConfigMap\n").is_err());
        assert!(settings_from_manifest("kind: Secret\ndata:\n  K: '!!!'\n").is_err());
        // A read key that is not text is reported by name, like the operator does.
        let binary = "kind: Secret\ndata:\n  BATON_TOKEN: //79\n";
        let err = settings_from_manifest(binary).unwrap_err();
        assert!(err.contains("BATON_TOKEN is not UTF-8"), "{err}");
        assert!(!err.contains("//79"));
    }

    fn secret(data: &[(&str, &[u8])], string_data: &[(&str, &str)]) -> Secret {
        Secret {
            data: Some(
                data.iter()
                    .map(|(k, v)| (k.to_string(), k8s_openapi::ByteString(v.to_vec())))
                    .collect(),
            ),
            string_data: Some(
                string_data
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            ),
            ..Secret::default()
        }
    }

    #[test]
    fn one_decoder_reports_binary_values_of_read_keys_and_ignores_other_keys() {
        let keys = SecretKeys::default();
        // A binary CA bundle next to the credentials is none of our business.
        let ok = secret(&[("BATON_TOKEN", b"tok"), ("ca.crt", &[0xff, 0xfe])], &[]);
        let settings = ConnectorSettings::from_secret(&ok, &keys).unwrap();
        assert_eq!(settings.credentials, Credentials::AccessToken { token: "tok".into() });
        // A read key that is not text: an error naming the key, on every path
        // (the grant controller used to drop it and read provisioning as off).
        let bad = secret(&[("BATON_TOKEN", b"tok"), ("BATON_PROVISIONING", &[0xff, 0x00])], &[]);
        let err = ConnectorSettings::from_secret(&bad, &keys).unwrap_err();
        assert_eq!(
            err,
            SettingsError::NotText {
                key: "BATON_PROVISIONING".into()
            }
        );
        assert_eq!(err.to_string(), "key BATON_PROVISIONING is not UTF-8 text");
        // stringData wins over data, as the API server merges them.
        let both = secret(&[("BATON_TOKEN", b"old")], &[("BATON_TOKEN", "new")]);
        let settings = ConnectorSettings::from_secret(&both, &keys).unwrap();
        assert_eq!(settings.credentials, Credentials::AccessToken { token: "new".into() });
    }

    #[test]
    fn key_overrides_fall_back_to_baton_names() {
        let keys = SecretKeys {
            username: Some("USER".into()),
            token: Some(String::new()),
            ..SecretKeys::default()
        };
        assert_eq!(keys.username(), "USER");
        assert_eq!(keys.token(), secret_key::TOKEN, "empty means default");
        assert_eq!(SecretKeys::default().all()[0], "BATON_USERNAME");
        assert_eq!(SecretKeys::default().all()[8], "BATON_CLIENT_SECRET");
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
