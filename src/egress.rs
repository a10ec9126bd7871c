//! Where the operator may send credentials: the administrator's allow-list
//! of base URLs, checked before any request.
//!
//! A `BitbucketConnector` is written by a tenant, but the credential it names
//! may be worth more than the tenant's own access (a Secret the tenant cannot
//! read, a service-account token). Letting `spec.apiUrl` point anywhere would
//! hand that credential to whoever runs the server, so the operator only
//! talks to the base URLs the administrator lists (`run --allowed-api-urls`,
//! default `https://api.bitbucket.org`); the same rule covers the
//! ConductorOne host override (`--allowed-conductorone-urls`).
//!
//! Rules, all pure functions of the strings (no DNS):
//!
//! - An entry is an absolute `https` URL, or `http` to a loopback IP literal
//!   (`127.0.0.0/8`, `[::1]`) so that tests and the simulator work. No user
//!   info, query or fragment. `localhost` is not loopback here: it is a name
//!   that the resolver decides.
//! - A URL is allowed when its scheme, host and port (default ports filled
//!   in) equal an entry's, and its path is the entry's path or below it
//!   (segment-wise: `/bb` allows `/bb/2.0`, not `/bbevil`).
//! - Hosts compare after WHATWG parsing (lower case, IDNA, numeric IPv4
//!   forms), and otherwise exactly: `api.bitbucket.org.` (trailing dot) is
//!   not `api.bitbucket.org`.
//! - An entry host may start with `*.`: any host with at least one more
//!   label in front matches (`*.conductor.one` allows `acme.conductor.one`,
//!   not `conductor.one` or `evilconductor.one`). Only for `https`.
//! - A URL with user info (`https://api.bitbucket.org@evil.com` has host
//!   `evil.com`; `https://u:p@api.bitbucket.org` carries a password) is
//!   refused whatever its host; messages never repeat user info.

use std::fmt;
use std::net::IpAddr;

use url::{Host, Url};

/// Bitbucket Cloud's API root: the default and usually only entry.
pub const DEFAULT_ALLOWED_API_URL: &str = crate::bitbucket::DEFAULT_API_URL;
/// ConductorOne tenants live at `https://<tenant>.conductor.one`.
pub const DEFAULT_ALLOWED_CONDUCTORONE_URL: &str = "https://*.conductor.one";

/// Condition reason for a connector whose `apiUrl` is refused.
pub const REASON_API_URL_NOT_ALLOWED: &str = "ApiUrlNotAllowed";

/// The `run` flags, for `#[command(flatten)]` into the controller's args.
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct EgressArgs {
    /// Bitbucket API base URLs a connector's `spec.apiUrl` may use
    /// (comma-separated). `https` anywhere; plain `http` only to a loopback
    /// IP (tests, the simulator). A path limits to that prefix.
    #[arg(
        long,
        env = "ALLOWED_API_URLS",
        value_delimiter = ',',
        default_value = DEFAULT_ALLOWED_API_URL
    )]
    pub allowed_api_urls: Vec<String>,
    /// ConductorOne base URLs a host override may use (comma-separated;
    /// `https://*.example.com` allows every subdomain).
    #[arg(
        long,
        env = "ALLOWED_CONDUCTORONE_URLS",
        value_delimiter = ',',
        default_value = DEFAULT_ALLOWED_CONDUCTORONE_URL
    )]
    pub allowed_conductorone_urls: Vec<String>,
}

impl Default for EgressArgs {
    fn default() -> Self {
        EgressArgs {
            allowed_api_urls: vec![DEFAULT_ALLOWED_API_URL.to_owned()],
            allowed_conductorone_urls: vec![DEFAULT_ALLOWED_CONDUCTORONE_URL.to_owned()],
        }
    }
}

impl EgressArgs {
    /// Parses both lists; an unusable entry is a startup error naming it.
    pub fn policy(&self) -> Result<EgressPolicy, EgressError> {
        Ok(EgressPolicy {
            bitbucket: AllowList::parse(&self.allowed_api_urls)?,
            conductorone: AllowList::parse(&self.allowed_conductorone_urls)?,
        })
    }
}

/// Both allow-lists, parsed once at startup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EgressPolicy {
    pub bitbucket: AllowList,
    pub conductorone: AllowList,
}

impl Default for EgressPolicy {
    fn default() -> Self {
        EgressArgs::default().policy().expect("the default entries are valid")
    }
}

impl EgressPolicy {
    /// Checks a connector's Bitbucket `apiUrl`; returns it parsed.
    pub fn check_bitbucket_url(&self, api_url: &str) -> Result<Url, EgressError> {
        self.bitbucket.check(api_url)
    }

    /// Checks a ConductorOne host override (`host[:port]`, as in
    /// `BATON_C1_API_HOST`): always reached over TLS, so it is checked as
    /// `https://host[:port]`. A full `https://` URL is accepted too.
    pub fn check_conductorone_host(&self, host: &str) -> Result<Url, EgressError> {
        let trimmed = host.trim();
        if trimmed.contains("://") {
            return self.conductorone.check(trimmed);
        }
        if trimmed.is_empty() || trimmed.contains(['/', '?', '#', '@', '\\']) {
            return Err(EgressError::Invalid {
                url: redact(trimmed),
                reason: "a host override is host[:port], nothing else".into(),
            });
        }
        self.conductorone.check(&format!("https://{trimmed}"))
    }
}

/// A parsed allow-list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowList {
    entries: Vec<AllowedBase>,
}

/// One allowed base: scheme, host (or `*.` suffix), port, path prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
struct AllowedBase {
    scheme: String,
    host: HostPattern,
    port: u16,
    /// Without a trailing `/`; empty for the root.
    path: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum HostPattern {
    Exact(String),
    /// `*.suffix`: stored as `.suffix`.
    AnySubdomainOf(String),
}

impl AllowList {
    /// Parses entries, ignoring blanks; at least one is required.
    pub fn parse<S: AsRef<str>>(entries: &[S]) -> Result<Self, EgressError> {
        let entries = entries
            .iter()
            .map(|e| e.as_ref().trim())
            .filter(|e| !e.is_empty())
            .map(AllowedBase::parse)
            .collect::<Result<Vec<_>, _>>()?;
        if entries.is_empty() {
            return Err(EgressError::Invalid {
                url: String::new(),
                reason: "the allow-list is empty; list at least one base URL".into(),
            });
        }
        Ok(AllowList { entries })
    }

    /// The entries as they are compared (for logs and docs).
    pub fn entries(&self) -> Vec<String> {
        self.entries.iter().map(AllowedBase::to_string).collect()
    }

    /// Allowed: returns the URL parsed; refused: says why, without user info.
    pub fn check(&self, candidate: &str) -> Result<Url, EgressError> {
        let url = parse_absolute(candidate)?;
        if self.entries.iter().any(|entry| entry.allows(&url)) {
            // Belt and braces: an `http` entry is loopback by construction,
            // so a match is too.
            if url.scheme() == "http" && !is_loopback(&url) {
                return Err(EgressError::PlainHttpNotLoopback { url: redact(candidate) });
            }
            return Ok(url);
        }
        if url.scheme() == "http" && !is_loopback(&url) {
            return Err(EgressError::PlainHttpNotLoopback { url: redact(candidate) });
        }
        Err(EgressError::NotAllowed {
            url: redact(candidate),
            allowed: self.entries(),
        })
    }

    pub fn allows(&self, candidate: &str) -> bool {
        self.check(candidate).is_ok()
    }
}

impl AllowedBase {
    fn parse(entry: &str) -> Result<Self, EgressError> {
        let wildcard = entry
            .split_once("://")
            .and_then(|(_, rest)| rest.strip_prefix("*."))
            .is_some();
        // `*` is not a valid host character: parse with a placeholder label.
        let parsable = if wildcard {
            entry.replacen("://*.", "://wildcard.", 1)
        } else {
            entry.to_owned()
        };
        let invalid = |reason: &str| EgressError::Invalid {
            url: redact(entry),
            reason: reason.to_owned(),
        };
        let url = parse_absolute(&parsable).map_err(|e| match e {
            EgressError::Invalid { reason, .. } => invalid(&reason),
            other => other,
        })?;
        if url.query().is_some() || url.fragment().is_some() {
            return Err(invalid("an allowed base URL has no query or fragment"));
        }
        let Some(host) = url.host_str() else {
            return Err(invalid("an allowed base URL needs a host"));
        };
        let host = if wildcard {
            let suffix = host.strip_prefix("wildcard").unwrap_or(host);
            if url.scheme() != "https" || suffix.matches('.').count() < 2 {
                return Err(invalid(
                    "a wildcard is only allowed as `https://*.domain.tld` (at least two labels after `*.`)",
                ));
            }
            HostPattern::AnySubdomainOf(suffix.to_owned())
        } else {
            HostPattern::Exact(host.to_owned())
        };
        if url.scheme() == "http" && !is_loopback(&url) {
            return Err(invalid(
                "plain http is only allowed to a loopback IP (127.0.0.1, [::1]); use https",
            ));
        }
        Ok(AllowedBase {
            scheme: url.scheme().to_owned(),
            host,
            port: url.port_or_known_default().unwrap_or(0),
            path: url.path().trim_end_matches('/').to_owned(),
        })
    }

    fn allows(&self, url: &Url) -> bool {
        if url.scheme() != self.scheme || url.port_or_known_default() != Some(self.port) {
            return false;
        }
        if url.query().is_some() || url.fragment().is_some() {
            return false;
        }
        let Some(host) = url.host_str() else { return false };
        let host_ok = match &self.host {
            HostPattern::Exact(exact) => host == exact,
            HostPattern::AnySubdomainOf(suffix) => {
                matches!(url.host(), Some(Host::Domain(_)))
                    && host.len() > suffix.len()
                    && host.ends_with(suffix.as_str())
                    && !host[..host.len() - suffix.len()].ends_with('.')
            }
        };
        if !host_ok {
            return false;
        }
        let path = url.path();
        self.path.is_empty() || path == self.path || path.starts_with(&format!("{}/", self.path))
    }
}

impl fmt::Display for AllowedBase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let host = match &self.host {
            HostPattern::Exact(host) => host.clone(),
            HostPattern::AnySubdomainOf(suffix) => format!("*{suffix}"),
        };
        let default_port = match self.scheme.as_str() {
            "https" => 443,
            _ => 80,
        };
        write!(f, "{}://{host}", self.scheme)?;
        if self.port != default_port {
            write!(f, ":{}", self.port)?;
        }
        f.write_str(&self.path)
    }
}

/// Parses an absolute http(s) URL and refuses user info.
fn parse_absolute(candidate: &str) -> Result<Url, EgressError> {
    let invalid = |reason: String| EgressError::Invalid {
        url: redact(candidate),
        reason,
    };
    let url = Url::parse(candidate.trim()).map_err(|e| invalid(format!("not an absolute URL: {e}")))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(invalid(format!("scheme {:?} is not http or https", url.scheme())));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(invalid(
            "user info (`user@` or `user:password@`) is not allowed in the URL".into(),
        ));
    }
    if url.host().is_none() {
        return Err(invalid("the URL has no host".into()));
    }
    Ok(url)
}

/// Loopback by IP literal only: names are resolved elsewhere, later.
fn is_loopback(url: &Url) -> bool {
    match url.host() {
        Some(Host::Ipv4(ip)) => ip.is_loopback(),
        Some(Host::Ipv6(ip)) => IpAddr::V6(ip).is_loopback() || ip.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback()),
        _ => false,
    }
}

/// The URL for messages: user info replaced, so a password typed into a URL
/// is never repeated; long input cut.
fn redact(candidate: &str) -> String {
    let shown = match candidate.split_once("://") {
        Some((scheme, rest)) => {
            let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
            let (authority, tail) = rest.split_at(authority_end);
            match authority.rfind('@') {
                Some(at) => format!("{scheme}://<redacted>@{}{tail}", &authority[at + 1..]),
                None => candidate.to_owned(),
            }
        }
        None if candidate.contains('@') => "<redacted>".to_owned(),
        None => candidate.to_owned(),
    };
    let mut shown: String = shown.chars().filter(|c| !c.is_control()).collect();
    if shown.len() > 200 {
        let mut cut = 200;
        while !shown.is_char_boundary(cut) {
            cut -= 1;
        }
        shown.truncate(cut);
        shown.push('…');
    }
    shown
}

/// Why a URL may not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EgressError {
    #[error("{url:?} is not a usable base URL: {reason}")]
    Invalid { url: String, reason: String },
    #[error("plain http to {url:?} is refused: http is only allowed to a loopback IP the allow-list names")]
    PlainHttpNotLoopback { url: String },
    #[error("{url:?} is not on the operator's allow-list ({})", allowed.join(", "))]
    NotAllowed { url: String, allowed: Vec<String> },
}

impl EgressError {
    /// The condition reason a refused connector reports.
    pub fn reason(&self) -> &'static str {
        REASON_API_URL_NOT_ALLOWED
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(entries: &[&str]) -> AllowList {
        AllowList::parse(entries).unwrap()
    }

    #[test]
    fn default_allows_bitbucket_only() {
        let policy = EgressPolicy::default();
        for ok in [
            "https://api.bitbucket.org",
            "https://api.bitbucket.org/",
            "HTTPS://API.BITBUCKET.ORG",
            "https://api.bitbucket.org:443",
            "https://api.bitbucket.org/2.0",
        ] {
            assert!(policy.check_bitbucket_url(ok).is_ok(), "{ok}");
        }
        for refused in [
            "http://api.bitbucket.org",
            "https://api.bitbucket.org:8443",
            "https://api.bitbucket.org.",
            "https://api.bitbucket.org.evil.com",
            "https://evil.com/api.bitbucket.org",
            "https://api.bitbucket.org@evil.com",
            "https://user:pass@api.bitbucket.org",
            "https://bitbucket.org",
            "https://api.bitbucket.org/?x=1",
            "ftp://api.bitbucket.org",
            "api.bitbucket.org",
            "",
        ] {
            assert!(policy.check_bitbucket_url(refused).is_err(), "{refused}");
        }
    }

    #[test]
    fn plain_http_only_to_listed_loopback() {
        let allowed = list(&[
            "https://api.bitbucket.org",
            "http://127.0.0.1:7990",
            "http://[::1]:8080",
        ]);
        assert!(allowed.allows("http://127.0.0.1:7990"));
        assert!(allowed.allows("http://127.0.0.1:7990/prefix"));
        assert!(allowed.allows("http://[::1]:8080"));
        assert!(
            allowed.allows("http://[0:0:0:0:0:0:0:1]:8080"),
            "IPv6 spellings compare equal"
        );
        assert!(
            allowed.allows("http://0x7f.0.0.1:7990"),
            "numeric IPv4 forms are normalised"
        );
        assert!(!allowed.allows("http://127.0.0.1:7991"), "other port");
        assert!(
            !allowed.allows("http://127.0.0.2:7990"),
            "other loopback address, not listed"
        );
        assert!(!allowed.allows("http://localhost:7990"), "a name, not an IP");
        assert!(!allowed.allows("https://127.0.0.1:7990"), "other scheme");
        let err = allowed.check("http://127.0.0.1.evil.com:7990").unwrap_err();
        assert!(matches!(err, EgressError::PlainHttpNotLoopback { .. }), "{err}");
        let err = allowed.check("http://10.0.0.1").unwrap_err();
        assert!(matches!(err, EgressError::PlainHttpNotLoopback { .. }), "{err}");
        // Not listed: loopback alone is not enough.
        assert!(!list(&["https://api.bitbucket.org"]).allows("http://127.0.0.1:7990"));
    }

    #[test]
    fn entries_refuse_plain_http_elsewhere_and_junk() {
        for bad in [
            "http://api.bitbucket.org",
            "http://localhost:7990",
            "http://127.0.0.1.evil.com",
            "http://10.1.2.3",
            "https://u:p@api.bitbucket.org",
            "https://api.bitbucket.org?x=1",
            "https://api.bitbucket.org#f",
            "file:///etc/passwd",
            "not a url",
            "http://*.example.com",
            "https://*.com",
        ] {
            let err = AllowList::parse(&[bad]).unwrap_err();
            assert!(matches!(err, EgressError::Invalid { .. }), "{bad}: {err}");
        }
        assert!(AllowList::parse::<&str>(&[]).is_err());
        assert!(AllowList::parse(&[" ", ""]).is_err());
        assert!(
            AllowList::parse(&["http://[::ffff:127.0.0.1]:1"]).is_ok(),
            "v4-mapped loopback"
        );
    }

    #[test]
    fn path_prefix_is_segment_wise() {
        let allowed = list(&["https://proxy.example.com/bitbucket/"]);
        assert!(allowed.allows("https://proxy.example.com/bitbucket"));
        assert!(allowed.allows("https://proxy.example.com/bitbucket/"));
        assert!(allowed.allows("https://proxy.example.com/bitbucket/2.0"));
        assert!(!allowed.allows("https://proxy.example.com/bitbucketevil"));
        assert!(!allowed.allows("https://proxy.example.com/"));
        assert!(!allowed.allows("https://proxy.example.com/bitbucket/../admin"));
        assert!(!allowed.allows("https://proxy.example.com/bitbucket/%2e%2e/admin"));
        assert!(
            !allowed.allows("https://proxy.example.com/Bitbucket"),
            "paths are case-sensitive"
        );
    }

    #[test]
    fn wildcard_matches_subdomains_only() {
        let policy = EgressPolicy::default();
        assert!(policy.check_conductorone_host("acme.conductor.one").is_ok());
        assert!(policy.check_conductorone_host("ACME.Conductor.One:443").is_ok());
        assert!(policy.check_conductorone_host("https://a.b.conductor.one").is_ok());
        for refused in [
            "conductor.one",
            "evilconductor.one",
            "acme.conductor.one.evil.com",
            "acme.conductor.one:8443",
            "acme.conductor.one.",
            "127.0.0.1",
            "u@acme.conductor.one",
            "acme.conductor.one/path",
            "http://acme.conductor.one",
            "",
        ] {
            assert!(policy.check_conductorone_host(refused).is_err(), "{refused}");
        }
    }

    #[test]
    fn messages_never_repeat_user_info() {
        let policy = EgressPolicy::default();
        for url in [
            "https://user:hunter2@evil.com/x",
            "https://hunter2@api.bitbucket.org",
            "http://a:hunter2@127.0.0.1:1",
        ] {
            let err = policy.check_bitbucket_url(url).unwrap_err();
            assert!(!format!("{err} {err:?}").contains("hunter2"), "{err}");
            assert_eq!(err.reason(), "ApiUrlNotAllowed");
        }
        let err = AllowList::parse(&["https://a:hunter2@x.example"]).unwrap_err();
        assert!(!err.to_string().contains("hunter2"), "{err}");
    }

    #[test]
    fn refusal_names_url_and_list() {
        let err = EgressPolicy::default()
            .check_bitbucket_url("https://attacker.example/capture")
            .unwrap_err();
        let text = err.to_string();
        assert!(text.contains("https://attacker.example/capture"), "{text}");
        assert!(text.contains("https://api.bitbucket.org"), "{text}");
    }

    #[test]
    fn args_parse_from_flags_and_defaults() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            egress: EgressArgs,
        }
        let cli = Cli::parse_from(["x"]);
        assert_eq!(cli.egress, EgressArgs::default());
        let cli = Cli::parse_from([
            "x",
            "--allowed-api-urls",
            "https://api.bitbucket.org,http://127.0.0.1:7990",
        ]);
        let policy = cli.egress.policy().unwrap();
        assert!(policy.check_bitbucket_url("http://127.0.0.1:7990").is_ok());
        let cli = Cli::parse_from(["x", "--allowed-api-urls", "http://bitbucket.internal"]);
        assert!(
            cli.egress.policy().is_err(),
            "plain http to a non-loopback host is a startup error"
        );
    }

    #[test]
    fn entries_display_normalised() {
        let allowed = list(&[
            "HTTPS://API.Bitbucket.org:443/",
            "http://127.0.0.1:7990/x/",
            "https://*.Conductor.One",
        ]);
        assert_eq!(
            allowed.entries(),
            [
                "https://api.bitbucket.org",
                "http://127.0.0.1:7990/x",
                "https://*.conductor.one"
            ]
        );
    }
}
