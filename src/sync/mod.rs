//! The sync engine: five independent syncers, one per resource type, that
//! turn Bitbucket into resources, entitlements and grants (see
//! [`crate::model`]).
//!
//! Requests per syncer and workspace (pages of 100):
//! - accounts: the member listing.
//! - workspaces: the member listing (`member`) and the owner listing
//!   (`/permissions?q=permission="owner"`).
//! - groups: one `/1.0/groups/{ws}` call, members included.
//! - projects: the project listing, then per project the user and group
//!   permissions-config listings (plus the member listing, to flag grants to
//!   principals who are not members).
//! - repositories: the repository listing (each carries its project), then
//!   per repository the user and group permissions-config listings (plus the
//!   member listing, as above).
//!
//! Workspaces are discovered once per run through `/2.0/user/workspaces`
//! (administered ones) or taken from the configured slugs. A [`SyncScope`]
//! memoises the member listing, so a full sync that runs every syncer fetches
//! it once per workspace; a loop running alone fetches what it needs.
//! Workspaces are synced concurrently; within one, per-project and
//! per-repository calls start as soon as the first listing page arrives and
//! run concurrently, alongside the member listing (needed only to flag
//! grants). The client's shared limiter bounds requests in flight and per
//! hour, so this only keeps its in-flight slots busy: `benches/sync.rs`
//! measures how close a full sync gets to `requests x latency / in-flight`.
//!
//! Permission `none` is no grant. A grant to a user missing from the
//! workspace's member list is kept and flagged (`unknown_principal`): it is
//! exactly what an access review wants to see.

pub mod cli;
mod run;
mod syncers;

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use futures::TryStreamExt;
use tokio::sync::OnceCell;

use crate::bitbucket::models::{User, Workspace};
use crate::bitbucket::{Client, Error as ApiError, ErrorKind};
use crate::model::{SyncBatch, SyncKind};

pub use run::{RunReport, discover_and_run_into_store, run_into_store};
pub(crate) use syncers::{group_member_grants, permission_grants};

/// Why a sync failed, classified the way status conditions report it.
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
    /// 5xx or transport failures beyond the retry budget.
    #[error("Bitbucket unavailable: {0}")]
    Unavailable(ApiError),
    /// Anything else Bitbucket answered.
    #[error("{0}")]
    Api(ApiError),
    /// The store failed.
    #[error("store: {0}")]
    Store(String),
}

impl SyncError {
    /// The status-condition reason (CamelCase) for this failure.
    pub fn reason(&self) -> &'static str {
        match self {
            SyncError::InvalidCredentials(_) => "InvalidCredentials",
            SyncError::InsufficientScopes(_) => "InsufficientScopes",
            SyncError::WorkspaceNotFound { .. } | SyncError::NoWorkspaces => "WorkspaceNotFound",
            SyncError::RateLimited(_) => "RateLimited",
            SyncError::Unavailable(_) => "BitbucketUnavailable",
            SyncError::Api(_) => "SyncFailed",
            SyncError::Store(_) => "StoreError",
        }
    }

    /// Failures that will not go away by retrying with the same settings.
    pub fn is_configuration_error(&self) -> bool {
        matches!(
            self,
            SyncError::InvalidCredentials(_)
                | SyncError::InsufficientScopes(_)
                | SyncError::WorkspaceNotFound { .. }
                | SyncError::NoWorkspaces
        )
    }
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

/// Runs syncers against one Bitbucket client.
#[derive(Debug, Clone)]
pub struct SyncEngine {
    client: Client,
    /// Configured workspace slugs; empty means every administered workspace.
    workspaces: Vec<String>,
    /// Per-project / per-repository calls started at once.
    concurrency: usize,
}

impl SyncEngine {
    pub fn new(client: Client, workspaces: Vec<String>) -> Self {
        let concurrency = (client.limits().max_in_flight * 2).max(1);
        SyncEngine {
            client,
            workspaces,
            concurrency,
        }
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Checks the credentials (`GET /2.0/user`) and finds the workspaces to
    /// sync. This is the "connected" check. Both run at once (one round trip
    /// instead of two); a failed credential check is reported first.
    pub async fn connect(&self) -> Result<SyncScope, SyncError> {
        let (user, scope) = futures::join!(self.client.current_user(), self.discover());
        user?;
        scope
    }

    /// Finds the workspaces to sync: the configured slugs (each must be one
    /// of the caller's workspaces), or every workspace the credential
    /// administers.
    pub async fn discover(&self) -> Result<SyncScope, SyncError> {
        // One listing of the caller's workspaces serves both cases: it is the
        // replacement for the retired `/2.0/workspaces`, needs one request per
        // 100 workspaces however many are configured, and avoids
        // `/2.0/workspaces/{ws}`, which has been seen answering intermittent
        // 410s (API-CONTRACT.md).
        let administered_only = self.workspaces.is_empty();
        let access: Vec<_> = self
            .client
            .user_workspaces(administered_only.then_some(true))
            .try_concat()
            .await?;
        let mut known: Vec<(bool, Workspace)> = access
            .into_iter()
            .map(|a| (a.administrator, a.workspace))
            .filter(|(_, w)| !w.uuid.is_empty() && !w.slug.is_empty())
            .collect();
        known.sort_by(|a, b| a.1.slug.cmp(&b.1.slug));
        known.dedup_by(|a, b| a.1.uuid == b.1.uuid);
        let workspaces = if administered_only {
            let workspaces: Vec<Workspace> = known.into_iter().filter(|(admin, _)| *admin).map(|(_, w)| w).collect();
            if workspaces.is_empty() {
                return Err(SyncError::NoWorkspaces);
            }
            workspaces
        } else {
            let mut workspaces = Vec::with_capacity(self.workspaces.len());
            for wanted in &self.workspaces {
                let found = known
                    .iter()
                    .find(|(_, w)| w.slug == *wanted || w.uuid.eq_ignore_ascii_case(wanted));
                match found {
                    Some((_, w)) => workspaces.push(w.clone()),
                    None => return Err(SyncError::WorkspaceNotFound { slug: wanted.clone() }),
                }
            }
            workspaces
        };
        Ok(SyncScope::new(workspaces))
    }

    /// Runs one syncer over the scope's workspaces.
    pub async fn sync(&self, kind: SyncKind, scope: &SyncScope) -> Result<SyncBatch, SyncError> {
        let ctx = syncers::Context {
            client: &self.client,
            scope,
            concurrency: self.concurrency,
        };
        let mut batch = match kind {
            SyncKind::Accounts => syncers::accounts(&ctx).await?,
            SyncKind::Workspaces => syncers::workspaces(&ctx).await?,
            SyncKind::Groups => syncers::groups(&ctx).await?,
            SyncKind::Projects => syncers::projects(&ctx).await?,
            SyncKind::Repositories => syncers::repositories(&ctx).await?,
        };
        batch.resources.sort_by(|a, b| a.id.cmp(&b.id));
        batch.entitlements.sort_by(|a, b| a.id.cmp(&b.id));
        batch.grants.sort_by(|a, b| a.id.cmp(&b.id));
        batch.grants.dedup_by(|a, b| a.id == b.id);
        Ok(batch)
    }

    /// The same engine with a client that counts its own requests (see
    /// [`Client::scoped`]).
    pub fn scoped(&self) -> SyncEngine {
        SyncEngine {
            client: self.client.scoped(),
            ..self.clone()
        }
    }
}

/// The workspaces of one sync, plus listings memoised for the syncers that
/// share them.
#[derive(Debug, Clone)]
pub struct SyncScope {
    pub workspaces: Vec<Workspace>,
    members: Arc<BTreeMap<String, OnceCell<Arc<Vec<User>>>>>,
}

impl SyncScope {
    pub fn new(workspaces: Vec<Workspace>) -> Self {
        let members = workspaces.iter().map(|w| (w.uuid.clone(), OnceCell::new())).collect();
        SyncScope {
            workspaces,
            members: Arc::new(members),
        }
    }

    /// The workspace's members, fetched at most once per scope.
    async fn members(&self, client: &Client, workspace: &Workspace) -> Result<Arc<Vec<User>>, ApiError> {
        let fetch = || async {
            let memberships: Vec<_> = client.workspace_members(&workspace.slug).try_concat().await?;
            Ok::<_, ApiError>(Arc::new(memberships.into_iter().map(|m| m.user).collect::<Vec<_>>()))
        };
        match self.members.get(&workspace.uuid) {
            Some(cell) => cell.get_or_try_init(fetch).await.cloned(),
            None => fetch().await,
        }
    }

    async fn member_ids(&self, client: &Client, workspace: &Workspace) -> Result<HashSet<String>, ApiError> {
        Ok(self
            .members(client, workspace)
            .await?
            .iter()
            .map(|u| u.uuid.clone())
            .collect())
    }
}
