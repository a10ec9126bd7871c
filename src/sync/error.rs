//! Why a sync failed: [`SyncError`] keeps the cause, [`FailureClass`] says
//! what kind of failure it is. The sync layer only classifies; turning a
//! class into a Kubernetes condition reason, a metric label or an exit code
//! is each caller's business.

use std::sync::Arc;

use serde::Serialize;

use crate::bitbucket::{Error as ApiError, ErrorKind};
use crate::store::StoreError;

/// Why a sync failed, with its cause. Each message includes its cause's
/// text and no variant reports it again as `source()`, so printers that walk
/// the chain (`anyhow`'s `{:#}`) show every cause exactly once.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SyncError {
    /// Bitbucket refused the credentials (401).
    #[error("credentials rejected: {0}")]
    InvalidCredentials(ApiError),
    /// Authenticated, but not allowed (403): missing scope, not an admin, or
    /// a credential type that cannot read permissions.
    #[error("insufficient permissions: {0}")]
    InsufficientScopes(ApiError),
    /// A configured workspace does not exist or is not visible.
    #[error("workspace {slug:?} not found or not visible to these credentials")]
    WorkspaceNotFound { slug: String },
    /// The credential administers no workspace, and none was configured.
    #[error("the credentials administer no workspace; set the workspaces to sync explicitly")]
    NoWorkspaces,
    /// Throttled beyond the retry budget.
    #[error("rate limited: {0}")]
    RateLimited(ApiError),
    /// 5xx or transport failures beyond the retry horizon.
    #[error("Bitbucket unavailable: {0}")]
    Unavailable(ApiError),
    /// Anything else Bitbucket answered.
    #[error("{0}")]
    Api(ApiError),
    /// The store failed.
    #[error("store: {0}")]
    Store(Arc<StoreError>),
}

/// What kind of failure a [`SyncError`] is: a closed set callers map to
/// their own vocabulary (condition reasons, exit codes, metric labels).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FailureClass {
    /// 401: the credentials are wrong.
    InvalidCredentials,
    /// 403: the credentials may not read what the sync needs.
    InsufficientScopes,
    /// A configured workspace is missing, or none is administered.
    WorkspaceNotFound,
    /// Throttled beyond the retry budget.
    RateLimited,
    /// Bitbucket failing or unreachable beyond the retry horizon.
    Unavailable,
    /// Another answer from Bitbucket the sync cannot use.
    Api,
    /// The local store failed.
    Store,
}

impl FailureClass {
    /// A stable lowercase name (CLI JSON, logs).
    pub fn as_str(self) -> &'static str {
        match self {
            FailureClass::InvalidCredentials => "invalid-credentials",
            FailureClass::InsufficientScopes => "insufficient-scopes",
            FailureClass::WorkspaceNotFound => "workspace-not-found",
            FailureClass::RateLimited => "rate-limited",
            FailureClass::Unavailable => "unavailable",
            FailureClass::Api => "api",
            FailureClass::Store => "store",
        }
    }

    /// Failures that will not go away by retrying with the same settings.
    pub fn is_configuration_error(self) -> bool {
        matches!(
            self,
            FailureClass::InvalidCredentials | FailureClass::InsufficientScopes | FailureClass::WorkspaceNotFound
        )
    }

    /// Failures worth resuming later: the data fetched so far is still good.
    pub fn is_transient(self) -> bool {
        matches!(self, FailureClass::RateLimited | FailureClass::Unavailable)
    }
}

impl std::fmt::Display for FailureClass {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl SyncError {
    /// What kind of failure this is.
    pub fn class(&self) -> FailureClass {
        match self {
            SyncError::InvalidCredentials(_) => FailureClass::InvalidCredentials,
            SyncError::InsufficientScopes(_) => FailureClass::InsufficientScopes,
            SyncError::WorkspaceNotFound { .. } | SyncError::NoWorkspaces => FailureClass::WorkspaceNotFound,
            SyncError::RateLimited(_) => FailureClass::RateLimited,
            SyncError::Unavailable(_) => FailureClass::Unavailable,
            SyncError::Api(_) => FailureClass::Api,
            SyncError::Store(_) => FailureClass::Store,
        }
    }

    /// Failures that will not go away by retrying with the same settings.
    pub fn is_configuration_error(&self) -> bool {
        self.class().is_configuration_error()
    }
}

/// `error: cause: cause`, skipping a cause whose text its parent already ends with.
pub fn full_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !text.is_empty() && !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = cause.source();
    }
    out
}

impl From<ApiError> for SyncError {
    fn from(err: ApiError) -> Self {
        match err.kind {
            ErrorKind::Unauthorized => SyncError::InvalidCredentials(err),
            ErrorKind::Forbidden => SyncError::InsufficientScopes(err),
            ErrorKind::RateLimited => SyncError::RateLimited(err),
            ErrorKind::Server | ErrorKind::Transport => SyncError::Unavailable(err),
            _ => SyncError::Api(err),
        }
    }
}

impl From<StoreError> for SyncError {
    fn from(err: StoreError) -> Self {
        SyncError::Store(Arc::new(err))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bitbucket::EndpointClass;

    #[test]
    fn classes_and_messages_keep_the_cause_once() {
        let api = ApiError::new(EndpointClass::User, ErrorKind::Server, Some(503), "service unavailable");
        let err = SyncError::from(api.clone());
        assert_eq!(err.class(), FailureClass::Unavailable);
        assert!(err.class().is_transient() && !err.is_configuration_error());
        assert_eq!(err.to_string(), format!("Bitbucket unavailable: {api}"));
        assert_eq!(full_chain(&err), err.to_string(), "the cause is not repeated");
        assert_eq!(
            serde_json::to_value(FailureClass::WorkspaceNotFound).unwrap(),
            "workspace-not-found"
        );
        assert!(SyncError::NoWorkspaces.is_configuration_error());
    }
}
