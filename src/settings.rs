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
//! Which Secrets and keys are read (issue 12: the operator must never be a
//! way around RBAC): only Secrets labelled [`OPT_IN_LABEL`]`: "true"`, and
//! in them only the nine keys [`SecretKeys`] names. A rename
//! (`spec.secretKeys`) must be a valid Secret key name, and the nine names in
//! effect must be distinct ([`SecretKeys::validate`], also a CEL rule in the
//! CRD): no field can be pointed at another field's value, so
//! `workspaces: BATON_APP_PASSWORD` is refused instead of parsing a
//! password as a workspace list. And no message ever repeats a value: errors
//! name the key and the rule ([`SettingsError`]), and [`SecretValues`]
//! scrubs what was read from any text that may carry a value back (a
//! workspace slug echoed by Bitbucket's "not found").
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

/// The label a Secret must carry (value `"true"`) for the operator to read
/// it: whoever may label a Secret opts it in; whoever may only create a
/// `BitbucketConnector` cannot make the operator read any other Secret.
pub const OPT_IN_LABEL: &str = "connectors.dev/bitbucket-credentials";
/// The value of [`OPT_IN_LABEL`] that opts a Secret in.
pub const OPT_IN_VALUE: &str = "true";

/// Whether a Secret's metadata opts it in to being read.
pub fn opted_in(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> bool {
    meta.labels
        .as_ref()
        .and_then(|labels| labels.get(OPT_IN_LABEL))
        .is_some_and(|value| value == OPT_IN_VALUE)
}

/// The label selector of opted-in Secrets (for list and watch requests).
pub fn opt_in_selector() -> String {
    format!("{OPT_IN_LABEL}={OPT_IN_VALUE}")
}

/// The status message of a Secret that has not opted in: names the label and
/// how to set it, nothing of the Secret's content.
pub fn not_opted_in_message(namespace: &str, name: &str) -> String {
    format!(
        "Secret {namespace}/{name} is not labelled {OPT_IN_LABEL}: \"{OPT_IN_VALUE}\"; the operator reads only Secrets that opt in (kubectl label secret {name} -n {namespace} {OPT_IN_LABEL}={OPT_IN_VALUE})"
    )
}

/// Pattern of a Secret key name (Kubernetes: `[-._a-zA-Z0-9]+`); empty
/// means "the default name".
pub const SECRET_KEY_PATTERN: &str = r"^[-._a-zA-Z0-9]*$";
/// Longest Secret key name Kubernetes accepts.
pub const SECRET_KEY_MAX_LEN: usize = 253;

/// The CRD's CEL rule for `spec.secretKeys`: the nine key names in effect
/// (a rename, else the default) are pairwise distinct. Generated from the
/// same table as the code's check, so they cannot drift apart.
pub fn distinct_secret_keys_rule() -> kube::core::Rule {
    let names: Vec<String> = SecretKeys::FIELDS
        .iter()
        .map(|(field, default)| format!("(has(self.{field}) && self.{field} != '' ? self.{field} : '{default}')"))
        .collect();
    let list = format!("[{}]", names.join(", "));
    kube::core::Rule::new(format!("{list}.all(k, {list}.exists_one(j, j == k))")).message(
        "secretKeys: every key name in effect (a rename, else its BATON_* default) must be distinct: a field may not read another field's key",
    )
}

/// Names of the Secret's keys. Every field is optional; unset ones use
/// baton-bitbucket's key names. A rename must be a valid Secret key name and
/// the nine names in effect must be distinct (so no field reads another
/// field's value).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = distinct_secret_keys_rule())]
pub struct SecretKeys {
    /// Key of the Bitbucket login (for an Atlassian API token, the account's
    /// email). Default BATON_USERNAME.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[-._a-zA-Z0-9]*$"), length(max = 253))]
    pub username: Option<String>,
    /// Key of the API token or legacy app password. Default BATON_APP_PASSWORD.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[-._a-zA-Z0-9]*$"), length(max = 253))]
    pub app_password: Option<String>,
    /// Key of a workspace, project or repository access token (Bearer), used
    /// instead of username and app password; it cannot read or change
    /// permissions. Default BATON_TOKEN.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[-._a-zA-Z0-9]*$"), length(max = 253))]
    pub token: Option<String>,
    /// Key of an OAuth consumer key (client-credentials grant). Default
    /// BATON_CONSUMER_KEY.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[-._a-zA-Z0-9]*$"), length(max = 253))]
    pub consumer_key: Option<String>,
    /// Key of the OAuth consumer secret. Default BATON_CONSUMER_SECRET.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[-._a-zA-Z0-9]*$"), length(max = 253))]
    pub consumer_secret: Option<String>,
    /// Key of the comma-separated workspace slugs. Default BATON_WORKSPACES.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[-._a-zA-Z0-9]*$"), length(max = 253))]
    pub workspaces: Option<String>,
    /// Key of the provisioning switch ("true" allows grants and revokes).
    /// Default BATON_PROVISIONING.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[-._a-zA-Z0-9]*$"), length(max = 253))]
    pub provisioning: Option<String>,
    /// Key of the platform client ID. Default BATON_CLIENT_ID.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[-._a-zA-Z0-9]*$"), length(max = 253))]
    pub client_id: Option<String>,
    /// Key of the platform client secret. Default BATON_CLIENT_SECRET.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[-._a-zA-Z0-9]*$"), length(max = 253))]
    pub client_secret: Option<String>,
}

impl SecretKeys {
    /// Each field's name in `spec.secretKeys` and its default key, in the
    /// order of [`SecretKeys::all`].
    pub const FIELDS: [(&'static str, &'static str); 9] = [
        ("username", secret_key::USERNAME),
        ("appPassword", secret_key::APP_PASSWORD),
        ("token", secret_key::TOKEN),
        ("consumerKey", secret_key::CONSUMER_KEY),
        ("consumerSecret", secret_key::CONSUMER_SECRET),
        ("workspaces", secret_key::WORKSPACES),
        ("provisioning", secret_key::PROVISIONING),
        ("clientId", secret_key::CLIENT_ID),
        ("clientSecret", secret_key::CLIENT_SECRET),
    ];

    /// The rule of renames, checked again here whatever the API server
    /// enforced (an older CRD, a CLI path): each rename is a valid Secret
    /// key name, and the nine names in effect are distinct. Messages name
    /// fields and keys (the spec's own text), never a Secret value.
    pub fn validate(&self) -> Result<(), SettingsError> {
        let set = [
            &self.username,
            &self.app_password,
            &self.token,
            &self.consumer_key,
            &self.consumer_secret,
            &self.workspaces,
            &self.provisioning,
            &self.client_id,
            &self.client_secret,
        ];
        for ((field, _), rename) in Self::FIELDS.iter().zip(set) {
            let Some(rename) = rename.as_deref().filter(|r| !r.is_empty()) else {
                continue;
            };
            let valid = rename.len() <= SECRET_KEY_MAX_LEN
                && rename
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'));
            if !valid {
                return Err(SettingsError::InvalidSecretKeys {
                    message: format!(
                        "secretKeys.{field} is not a valid Secret key name (letters, digits, '-', '_' and '.', at most {SECRET_KEY_MAX_LEN})"
                    ),
                });
            }
        }
        let names = self.all();
        for (i, name) in names.iter().enumerate() {
            if let Some(j) = names[..i].iter().position(|other| other == name) {
                return Err(SettingsError::InvalidSecretKeys {
                    message: format!(
                        "secretKeys.{} and secretKeys.{} both read the key {name}: every field must read its own key",
                        Self::FIELDS[j].0,
                        Self::FIELDS[i].0
                    ),
                });
            }
        }
        Ok(())
    }

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
    /// `spec.secretKeys` breaks the rename rule ([`SecretKeys::validate`]).
    #[error("{message}")]
    InvalidSecretKeys { message: String },
}

impl SettingsError {
    /// The key a `SecretKeyMissing` status reason should name.
    pub fn missing_key(&self) -> Option<&str> {
        match self {
            SettingsError::KeyMissing { missing, .. } => Some(missing),
            SettingsError::NoCredentials { username, .. } => Some(username),
            SettingsError::NotText { key } => Some(key),
            SettingsError::Invalid { .. } | SettingsError::InvalidSecretKeys { .. } => None,
        }
    }
}

impl ConnectorSettings {
    /// Reads settings from key/value pairs (a Secret's decoded data, or the
    /// environment). Empty values count as absent.
    pub fn from_map(data: &BTreeMap<String, String>, keys: &SecretKeys) -> Result<Self, SettingsError> {
        keys.validate()?;
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
        Self::read_secret(secret, keys).map(|(settings, _)| settings)
    }

    /// [`Self::from_secret`], also returning the values read, to scrub them
    /// from texts that may carry one back.
    pub fn read_secret(secret: &Secret, keys: &SecretKeys) -> Result<(Self, SecretValues), SettingsError> {
        let data = secret.data.iter().flatten().map(|(k, v)| (k.clone(), v.0.clone()));
        let string_data = secret.string_data.iter().flatten().map(|(k, v)| (k.clone(), v.clone()));
        let entries = decode_entries(data, string_data, keys)?;
        let values = SecretValues::from_entries(&entries, keys);
        Ok((Self::from_map(&entries, keys)?, values))
    }
}

/// The Secret's provisioning switch as written: `Some(false)` for an
/// explicit "off" (a veto the connector's spec cannot override), `None`
/// when the key is absent or empty. A value that is not a boolean, or not
/// text, is an error (never read as off).
pub fn provisioning_switch(secret: &Secret, keys: &SecretKeys) -> Result<Option<bool>, SettingsError> {
    let data = secret.data.iter().flatten().map(|(k, v)| (k.clone(), v.0.clone()));
    let string_data = secret.string_data.iter().flatten().map(|(k, v)| (k.clone(), v.clone()));
    let entries = decode_entries(data, string_data, keys)?;
    match entries
        .get(keys.provisioning())
        .map(|v| v.trim())
        .filter(|v| !v.is_empty())
    {
        None => Ok(None),
        Some(value) => parse_bool(value).map(Some).ok_or_else(|| SettingsError::Invalid {
            key: keys.provisioning().to_owned(),
            reason: "must be true or false".into(),
        }),
    }
}

/// The values read from a Secret, kept only to scrub them out of texts that
/// come back from elsewhere and may repeat one (Bitbucket's "workspace x not
/// found", a sync error). Debug shows none of them.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct SecretValues(Vec<String>);

impl fmt::Debug for SecretValues {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretValues(<{} redacted>)", self.0.len())
    }
}

/// Shorter values are scrubbed only where they stand alone (between
/// characters that cannot be part of a slug or token), so a short workspace
/// slug does not garble every word that contains it.
const SCRUB_ANYWHERE_LEN: usize = 8;
/// What a scrubbed value is replaced with.
pub const REDACTED: &str = "<redacted>";

impl SecretValues {
    /// Every value read, each workspace of a list on its own too; a
    /// provisioning switch that reads as true or false is not a secret.
    pub fn from_entries(entries: &BTreeMap<String, String>, keys: &SecretKeys) -> Self {
        let mut values = Vec::new();
        for (key, value) in entries {
            let value = value.trim();
            if value.is_empty() || (key == keys.provisioning() && parse_bool(value).is_some()) {
                continue;
            }
            values.push(value.to_owned());
            if key == keys.workspaces() {
                values.extend(
                    value
                        .split(',')
                        .map(str::trim)
                        .filter(|s| !s.is_empty())
                        .map(str::to_owned),
                );
            }
        }
        values.sort_by(|a, b| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
        values.dedup();
        SecretValues(values)
    }

    /// `text` with every value replaced by [`REDACTED`].
    pub fn scrub(&self, text: &str) -> String {
        let mut out = text.to_owned();
        for value in &self.0 {
            out = if value.len() >= SCRUB_ANYWHERE_LEN {
                out.replace(value.as_str(), REDACTED)
            } else {
                replace_standalone(&out, value)
            };
        }
        out
    }
}

/// Replaces `needle` where it is not part of a longer slug or token.
fn replace_standalone(text: &str, needle: &str) -> String {
    let part_of_word = |c: char| c.is_alphanumeric() || matches!(c, '-' | '_' | '@' | '+' | '/' | '=');
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find(needle) {
        let before = rest[..at].chars().next_back();
        let after = rest[at + needle.len()..].chars().next();
        out.push_str(&rest[..at]);
        if before.is_some_and(part_of_word) || after.is_some_and(part_of_word) {
            out.push_str(needle);
        } else {
            out.push_str(REDACTED);
        }
        rest = &rest[at + needle.len()..];
    }
    out.push_str(rest);
    out
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
    keys.validate()?;
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
/// variables, or a Secret manifest in the seed format. Flags of one
/// credential kind win over variables of another (a stray `BATON_USERNAME`
/// does not spoil an explicit `--token`); flags of two kinds, or flags with
/// `--secret-file`, are a usage error.
#[derive(Debug, Clone, clap::Args)]
pub struct CredentialArgs {
    /// Bitbucket API root [env: BITBUCKET_API_URL] [default: https://api.bitbucket.org].
    #[arg(long, value_parser = parse_api_url)]
    pub api_url: Option<String>,
    /// Read credentials from a Kubernetes Secret manifest (stringData or
    /// base64 data, `BATON_*` keys).
    #[arg(long, value_name = "FILE", conflicts_with_all = ["username", "app_password", "token", "consumer_key", "consumer_secret"])]
    pub secret_file: Option<PathBuf>,
    /// Atlassian account email for an API token [env: BATON_USERNAME].
    #[arg(long, conflicts_with_all = ["token", "consumer_key", "consumer_secret"])]
    pub username: Option<String>,
    /// API token (or legacy app password) [env: BATON_APP_PASSWORD].
    #[arg(long, conflicts_with_all = ["token", "consumer_key", "consumer_secret"])]
    pub app_password: Option<String>,
    /// Workspace, project or repository access token [env: BATON_TOKEN].
    #[arg(long, conflicts_with_all = ["consumer_key", "consumer_secret"])]
    pub token: Option<String>,
    /// OAuth consumer key [env: BATON_CONSUMER_KEY].
    #[arg(long)]
    pub consumer_key: Option<String>,
    /// OAuth consumer secret [env: BATON_CONSUMER_SECRET].
    #[arg(long)]
    pub consumer_secret: Option<String>,
}

impl CredentialArgs {
    /// The API root: `--api-url`, else `BITBUCKET_API_URL`, else Bitbucket Cloud.
    pub fn api_url(&self) -> String {
        self.api_url
            .clone()
            .or_else(|| std::env::var("BITBUCKET_API_URL").ok().filter(|v| !v.trim().is_empty()))
            .unwrap_or_else(|| DEFAULT_API_URL.to_owned())
    }

    /// Settings from `--secret-file`, else from flags and `BATON_*`
    /// variables (`BATON_WORKSPACES` and `BATON_PROVISIONING` from the
    /// environment). Messages name keys, never values.
    pub fn settings(&self) -> Result<ConnectorSettings, String> {
        if let Some(path) = &self.secret_file {
            let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
            return settings_from_manifest(&text).map_err(|e| format!("{}: {e}", path.display()));
        }
        let keys = SecretKeys::default();
        let data = self.flags_and_env(&keys);
        ConnectorSettings::from_map(&data, &keys).map_err(|e| e.to_string())
    }

    /// Credential keys from flags; a key without its flag comes from the
    /// environment only when no flag of another credential kind was given.
    fn flags_and_env(&self, keys: &SecretKeys) -> BTreeMap<String, String> {
        let kinds: [(&[KeyAndFlag], bool); 3] = [
            (
                &[
                    (keys.username(), &self.username),
                    (keys.app_password(), &self.app_password),
                ],
                self.username.is_some() || self.app_password.is_some(),
            ),
            (&[(keys.token(), &self.token)], self.token.is_some()),
            (
                &[
                    (keys.consumer_key(), &self.consumer_key),
                    (keys.consumer_secret(), &self.consumer_secret),
                ],
                self.consumer_key.is_some() || self.consumer_secret.is_some(),
            ),
        ];
        let any_flag = kinds.iter().any(|(_, given)| *given);
        let mut data = BTreeMap::new();
        for (pairs, given) in kinds {
            if any_flag && !given {
                continue;
            }
            for (key, flag) in pairs {
                let value = (*flag).clone().or_else(|| std::env::var(key).ok());
                if let Some(value) = value {
                    data.insert((*key).to_owned(), value);
                }
            }
        }
        for key in [keys.workspaces(), keys.provisioning()] {
            if let Ok(value) = std::env::var(key) {
                data.insert(key.to_owned(), value);
            }
        }
        data
    }
}

/// A `BATON_*` key and its flag's value.
type KeyAndFlag<'a> = (&'a str, &'a Option<String>);

pub fn parse_api_url(value: &str) -> Result<String, String> {
    let url =
        url::Url::parse(value).map_err(|e| format!("not a URL ({e}); expected e.g. https://api.bitbucket.org"))?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none_or(str::is_empty) {
        return Err("expected an http(s) URL with a host, e.g. https://api.bitbucket.org".into());
    }
    Ok(value.to_owned())
}

/// Splits `a, b,c` into validated workspace slugs. The error names the
/// entry's position and the rule, never its text: the list may come from a
/// Secret, and a mistaken key mapping must not echo what that key holds.
pub fn parse_workspaces(list: &str) -> Result<Vec<String>, String> {
    let mut slugs = Vec::new();
    for (position, slug) in list.split(',').map(str::trim).filter(|s| !s.is_empty()).enumerate() {
        let valid = slug
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '_' | '.'))
            || (slug.starts_with('{') && slug.ends_with('}'));
        if !valid {
            return Err(format!(
                "entry {} is not a workspace slug (lowercase letters, digits, '-', '_', '.', or a {{uuid}})",
                position + 1
            ));
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
    fn renames_must_be_key_names_and_distinct() {
        assert!(SecretKeys::default().validate().is_ok());
        let ok = SecretKeys {
            username: Some("login".into()),
            app_password: Some("bb.api-token_1".into()),
            ..SecretKeys::default()
        };
        assert!(ok.validate().is_ok());
        // The attack: read the password through the workspaces field.
        let attack = SecretKeys {
            workspaces: Some("BATON_APP_PASSWORD".into()),
            ..SecretKeys::default()
        };
        let err = attack.validate().unwrap_err();
        assert!(matches!(err, SettingsError::InvalidSecretKeys { .. }));
        assert_eq!(
            err.to_string(),
            "secretKeys.appPassword and secretKeys.workspaces both read the key BATON_APP_PASSWORD: every field must read its own key"
        );
        // Two renames onto one key, and a rename onto a renamed key.
        let twice = SecretKeys {
            provisioning: Some("shared".into()),
            client_id: Some("shared".into()),
            ..SecretKeys::default()
        };
        assert!(twice.validate().is_err());
        let swapped = SecretKeys {
            token: Some("BATON_CONSUMER_SECRET".into()),
            consumer_secret: Some("other".into()),
            ..SecretKeys::default()
        };
        assert!(swapped.validate().is_ok(), "a default given up by its field is free");
        for bad in ["with space", "slash/key", "ünï", &"k".repeat(254)] {
            let keys = SecretKeys {
                token: Some(bad.to_owned()),
                ..SecretKeys::default()
            };
            let err = keys.validate().unwrap_err().to_string();
            assert!(
                err.starts_with("secretKeys.token is not a valid Secret key name"),
                "{err}"
            );
        }
        // Every path refuses before reading anything.
        let data = map(&[("BATON_TOKEN", "t"), ("BATON_APP_PASSWORD", "pw-value")]);
        assert!(matches!(
            ConnectorSettings::from_map(&data, &attack),
            Err(SettingsError::InvalidSecretKeys { .. })
        ));
        assert!(decode_entries(vec![], vec![], &attack).is_err());
    }

    #[test]
    fn the_cel_rule_lists_every_field_with_its_default() {
        let rule = serde_json::to_value(distinct_secret_keys_rule()).unwrap();
        let text = rule["rule"].as_str().unwrap();
        for (field, default) in SecretKeys::FIELDS {
            assert!(text.contains(&format!("has(self.{field})")), "{text}");
            assert!(text.contains(&format!("'{default}'")), "{text}");
        }
        assert!(text.contains("exists_one"));
    }

    #[test]
    fn invalid_values_are_never_echoed() {
        let keys = SecretKeys::default();
        let err = ConnectorSettings::from_map(
            &map(&[("BATON_TOKEN", "t"), ("BATON_WORKSPACES", "acme, Hunter2-Secret")]),
            &keys,
        )
        .unwrap_err()
        .to_string();
        assert!(!err.contains("Hunter2"), "{err}");
        assert!(err.contains("BATON_WORKSPACES") && err.contains("entry 2"), "{err}");
        let err = ConnectorSettings::from_map(&map(&[("BATON_TOKEN", "t"), ("BATON_PROVISIONING", "hunter2")]), &keys)
            .unwrap_err()
            .to_string();
        assert!(!err.contains("hunter2"), "{err}");
    }

    #[test]
    fn secret_values_are_scrubbed_and_never_debugged() {
        let keys = SecretKeys::default();
        let entries = map(&[
            ("BATON_TOKEN", "tok-0123456789"),
            ("BATON_WORKSPACES", "acme, ws"),
            ("BATON_PROVISIONING", "true"),
        ]);
        let values = SecretValues::from_entries(&entries, &keys);
        assert!(!format!("{values:?}").contains("tok-"));
        assert_eq!(
            values.scrub("workspace ws not found; token tok-0123456789x; wsx true"),
            "workspace <redacted> not found; token <redacted>x; wsx true"
        );
        assert_eq!(values.scrub("acme-labs and acme."), "acme-labs and <redacted>.");
    }

    #[test]
    fn opt_in_is_the_label_with_value_true() {
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
        let meta = |value: Option<&str>| ObjectMeta {
            labels: value.map(|v| [(OPT_IN_LABEL.to_owned(), v.to_owned())].into()),
            ..ObjectMeta::default()
        };
        assert!(opted_in(&meta(Some("true"))));
        assert!(!opted_in(&meta(Some("True"))));
        assert!(!opted_in(&meta(Some("false"))));
        assert!(!opted_in(&meta(None)));
        assert_eq!(opt_in_selector(), "connectors.dev/bitbucket-credentials=true");
        let message = not_opted_in_message("ns", "bb");
        assert!(message.contains("connectors.dev/bitbucket-credentials") && message.contains("kubectl label"));
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
