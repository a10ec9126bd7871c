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

mod checkpoint;
pub mod cli;
mod error;
pub mod progress;
pub mod progress_view;
mod run;
mod syncers;

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use futures::TryStreamExt;
use tokio::sync::OnceCell;

use crate::bitbucket::models::{User, Workspace};
use crate::bitbucket::{Client, Error as ApiError};
use crate::model::{SyncBatch, SyncKind};

pub use error::{FailureClass, SyncError, full_chain};
pub use progress::{ProgressBoard, ProgressSnapshot};
pub use run::{RunOutcome, RunReport, discover_and_run_into_store, run_into_store, run_into_store_with_cost};
pub(crate) use syncers::{group_member_grants, permission_grants};

/// Runs syncers against one Bitbucket client.
#[derive(Debug, Clone)]
pub struct SyncEngine {
    client: Client,
    /// Configured workspace slugs; empty means every administered workspace.
    workspaces: Vec<String>,
    /// Per-project / per-repository calls started at once.
    concurrency: usize,
    /// Whether a run replaces only its workspaces' data (see [`SyncEngine::replacing_only_scope`]).
    scope_only: bool,
    /// Live progress of every type this engine (and its scoped clones) syncs.
    progress: ProgressBoard,
    /// The interval runs are repeated at, recorded with each run (readers
    /// judge staleness by it); `None` for one-off `sync` runs.
    interval: Option<std::time::Duration>,
}

impl SyncEngine {
    pub fn new(client: Client, workspaces: Vec<String>) -> Self {
        let concurrency = (client.limits().max_in_flight * 2).max(1);
        SyncEngine {
            client,
            workspaces,
            concurrency,
            scope_only: false,
            progress: ProgressBoard::default(),
            interval: None,
        }
    }

    /// Runs of this engine replace only the data of the workspaces they
    /// cover and keep the rest (`sync --workspaces a` on a store that also
    /// holds `b`). Without it, a run's workspaces are all there is: data of
    /// workspaces no longer synced goes (what the operator wants when a
    /// connector's workspace list shrinks).
    pub fn replacing_only_scope(mut self, yes: bool) -> Self {
        self.scope_only = yes;
        self
    }

    /// Runs of this engine are repeated every `interval` (the operator's
    /// per-type interval): recorded with each run for readers.
    pub fn with_interval(mut self, interval: Option<std::time::Duration>) -> Self {
        self.interval = interval;
        self
    }

    /// Reports progress on `board` instead of a board of its own, so that
    /// whoever watches it (the operator's status) keeps seeing runs across a
    /// rebuilt engine.
    pub fn with_progress_board(mut self, board: ProgressBoard) -> Self {
        self.progress = board;
        self
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Live progress per resource type (done/total units, ETA), for
    /// progress bars and status.
    pub fn progress(&self) -> &ProgressBoard {
        &self.progress
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

    /// Runs one syncer over the scope's workspaces (no checkpoints).
    pub async fn sync(&self, kind: SyncKind, scope: &SyncScope) -> Result<SyncBatch, SyncError> {
        self.sync_with(kind, scope, &checkpoint::Checkpoints::none()).await
    }

    async fn sync_with(
        &self,
        kind: SyncKind,
        scope: &SyncScope,
        checkpoints: &checkpoint::Checkpoints,
    ) -> Result<SyncBatch, SyncError> {
        let progress = self.progress.start(kind);
        let ctx = syncers::Context {
            client: &self.client,
            scope,
            concurrency: self.concurrency,
            checkpoints,
            progress: &progress,
        };
        let result = match kind {
            SyncKind::Accounts => syncers::accounts(&ctx).await,
            SyncKind::Workspaces => syncers::workspaces(&ctx).await,
            SyncKind::Groups => syncers::groups(&ctx).await,
            SyncKind::Projects => syncers::projects(&ctx).await,
            SyncKind::Repositories => syncers::repositories(&ctx).await,
        };
        // Finished either way: a failed type must not show as still running.
        progress.finish();
        let mut batch = result?;
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
