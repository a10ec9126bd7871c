//! The client's one error type: what failed (endpoint class), how (kind and
//! HTTP status) and Bitbucket's own message.

use std::fmt;
use std::time::Duration;

/// Endpoint families, for errors, metrics and request accounting. Bounded, so
/// safe as a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum EndpointClass {
    User,
    UserWorkspaces,
    Workspace,
    Members,
    WorkspacePermissions,
    EffectiveRepositoryPermissions,
    Projects,
    Repositories,
    ProjectPermissions,
    RepositoryPermissions,
    Groups,
    OAuth,
}

impl EndpointClass {
    pub const ALL: [EndpointClass; 12] = [
        EndpointClass::User,
        EndpointClass::UserWorkspaces,
        EndpointClass::Workspace,
        EndpointClass::Members,
        EndpointClass::WorkspacePermissions,
        EndpointClass::EffectiveRepositoryPermissions,
        EndpointClass::Projects,
        EndpointClass::Repositories,
        EndpointClass::ProjectPermissions,
        EndpointClass::RepositoryPermissions,
        EndpointClass::Groups,
        EndpointClass::OAuth,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EndpointClass::User => "user",
            EndpointClass::UserWorkspaces => "user-workspaces",
            EndpointClass::Workspace => "workspace",
            EndpointClass::Members => "members",
            EndpointClass::WorkspacePermissions => "workspace-permissions",
            EndpointClass::EffectiveRepositoryPermissions => "repository-permissions-effective",
            EndpointClass::Projects => "projects",
            EndpointClass::Repositories => "repositories",
            EndpointClass::ProjectPermissions => "project-permissions",
            EndpointClass::RepositoryPermissions => "repository-permissions",
            EndpointClass::Groups => "groups-1.0",
            EndpointClass::OAuth => "oauth",
        }
    }
}

impl fmt::Display for EndpointClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What went wrong, coarsely: enough to decide on retries and status reasons.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// 400: the request was invalid (bad permission value, bad pagelen, ...).
    BadRequest,
    /// 401: credentials missing, wrong, or expired.
    Unauthorized,
    /// 402: the plan's user limit.
    PaymentRequired,
    /// 403: authenticated, but not allowed (not an admin, missing scope, wrong
    /// credential type for the endpoint).
    Forbidden,
    /// 404: unknown or not visible.
    NotFound,
    /// 409: conflict (a 1.0 group member already present).
    Conflict,
    /// 410: a retired endpoint.
    Gone,
    /// 429 after the retry budget.
    RateLimited,
    /// 5xx after the retry budget.
    Server,
    /// Connection failure or timeout after the retry budget.
    Transport,
    /// A 2xx whose body could not be decoded.
    Decode,
    /// Any other status.
    Other,
    /// The client refused to act (invalid input, a `next` URL on another host).
    Invalid,
}

/// A failed Bitbucket call.
#[derive(Debug, Clone)]
pub struct Error {
    pub class: EndpointClass,
    pub kind: ErrorKind,
    /// HTTP status, when a response arrived.
    pub status: Option<u16>,
    /// Bitbucket's message from the JSON envelope, or a description.
    pub message: String,
    /// Set on 429 when Bitbucket said how long to wait.
    pub retry_after: Option<Duration>,
}

impl Error {
    pub(crate) fn new(class: EndpointClass, kind: ErrorKind, status: Option<u16>, message: impl Into<String>) -> Self {
        Error {
            class,
            kind,
            status,
            message: message.into(),
            retry_after: None,
        }
    }

    pub(crate) fn invalid(class: EndpointClass, message: impl Into<String>) -> Self {
        Error::new(class, ErrorKind::Invalid, None, message)
    }

    /// The kind a status code maps to.
    pub fn kind_for_status(status: u16) -> ErrorKind {
        match status {
            400 => ErrorKind::BadRequest,
            401 => ErrorKind::Unauthorized,
            402 => ErrorKind::PaymentRequired,
            403 => ErrorKind::Forbidden,
            404 => ErrorKind::NotFound,
            409 => ErrorKind::Conflict,
            410 => ErrorKind::Gone,
            429 => ErrorKind::RateLimited,
            500..=599 => ErrorKind::Server,
            _ => ErrorKind::Other,
        }
    }

    /// 429, 5xx and transport failures are worth another try; 4xx answers
    /// (400/401/403/404/410 ...) are final.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self.kind,
            ErrorKind::RateLimited | ErrorKind::Server | ErrorKind::Transport
        )
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.status {
            Some(status) => write!(
                f,
                "Bitbucket {} request failed with HTTP {status}: {}",
                self.class, self.message
            ),
            None => write!(f, "Bitbucket {} request failed: {}", self.class, self.message),
        }
    }
}

impl std::error::Error for Error {}

/// Added to a 401's message when Basic auth used a username that is not an
/// email address.
pub const EMAIL_HINT: &str = "Atlassian API tokens authenticate with the account's email address as the username, \
     not the Bitbucket username: set BATON_USERNAME to the Atlassian account email";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_transient_failures_retry() {
        for status in [400, 401, 402, 403, 404, 409, 410] {
            let err = Error::new(
                EndpointClass::Members,
                Error::kind_for_status(status),
                Some(status),
                "x",
            );
            assert!(!err.is_retryable(), "{status} must not be retried");
        }
        for status in [429, 500, 502, 503, 504] {
            let err = Error::new(
                EndpointClass::Members,
                Error::kind_for_status(status),
                Some(status),
                "x",
            );
            assert!(err.is_retryable(), "{status} must be retried");
        }
    }

    #[test]
    fn display_names_class_status_and_message() {
        let err = Error::new(
            EndpointClass::Projects,
            ErrorKind::NotFound,
            Some(404),
            "No workspace with identifier 'x'",
        );
        assert_eq!(
            err.to_string(),
            "Bitbucket projects request failed with HTTP 404: No workspace with identifier 'x'"
        );
    }
}
