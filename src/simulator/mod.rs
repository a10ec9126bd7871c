//! Bitbucket Cloud simulator: a real HTTP server on loopback that serves the
//! slice of the Bitbucket Cloud REST API this project depends on
//! (`shared/bitbucket/API-CONTRACT.md`), over a generated organisation.
//!
//! Tests, benchmarks and `sync --demo` run against it. It is written against
//! the contract only and shares no types with the client in
//! [`crate::bitbucket`]: responses are built as JSON here and the contract
//! test (`tests/simulator_contract.rs`) validates them against Atlassian's
//! official OpenAPI document.
//!
//! Behind the `simulator` cargo feature (on by default); production builds
//! use `--no-default-features` and get `absent.rs` in its place.
//!
//! # Shape
//!
//! - `routes`: one axum router per API family: `reads` (2.0 reads),
//!   `permissions` (permissions-config), `groups` (1.0 groups), `oauth`
//!   (token endpoint), `retired` (410 CHANGE-2770). Each route names its
//!   statistics class and methods; handlers hold no HTTP plumbing.
//! - `pipeline`: what every request goes through, once: path
//!   canonicalisation, latency, fault injection, credentials, rate limit,
//!   method check, statistics; and the `Ctx`/`Ids` extractors.
//! - `reply`: the JSON error envelope, `fields=`, the HTML 404.
//! - `app` (shared state and counters), `state` (the organisation's lookup
//!   indices and effective permissions), `render` (JSON shapes), `paging`
//!   (pagination, `fields=`, BBQL), `auth`, `limits`, `org` (generation).
//!
//! # What it simulates
//!
//! - `/2.0/user`, `/2.0/users/{id}`, `/2.0/user/workspaces` (`administrator`,
//!   `q=slug="…"`, `sort`), `/2.0/user/workspaces/{ws}/permission`.
//! - `/2.0/workspaces`, `/2.0/user/permissions/{workspaces,repositories}` and the
//!   cross-workspace `/2.0/repositories` answer **410** with the CHANGE-2770 body.
//! - `/2.0/workspaces/{ws}`, `/members[/{member}]` (emails only with
//!   `fields=+values.user.email`; `q` on `user.email` (at most 90 in an
//!   `IN`), `user.uuid`, `user.account_id`, `user.nickname`, anything else is
//!   400), `/permissions` (`owner`|`member`, also `q=permission="owner"`),
//!   `/permissions/repositories[/{repo}]` (effective permissions, below),
//!   `/projects[/{key}]`.
//! - `/2.0/repositories/{ws}` (`q=project.key="K"`), `/2.0/repositories/{ws}/{repo}`.
//! - Explicit grants: `GET|PUT|DELETE` on
//!   `/2.0/workspaces/{ws}/projects/{key}/permissions-config/{users|groups}[/{id}]`
//!   (also under `/1.0/workspaces/…`, as baton-bitbucket calls it) and
//!   `/2.0/repositories/{ws}/{repo}/permissions-config/{users|groups}[/{id}]`.
//! - 1.0 groups: `GET /1.0/groups/{ws}` (bare array), `GET /1.0/groups?group={ws}/{slug}`
//!   (repeatable; unknown entries skipped), `GET
//!   /1.0/groups/{ws}/{group}/members`, `PUT|DELETE
//!   /1.0/groups/{ws}/{group}/members/{user}` (409 when already a member).
//! - `POST /site/oauth2/access_token` (client credentials and refresh token).
//! - `{ws}` is a slug or a `{uuid}` (URL-encoded braces), except on 1.0 groups
//!   which need the slug. Unknown paths answer 404 with a `text/html` body.
//! - Pagination (`pagelen` default 10, max [`SimConfig::max_pagelen`], `page`,
//!   absolute `next`/`previous` that keep the other query parameters),
//!   `fields=` partial responses (`a.b,c`, `*`, `+path`, `-path`), a BBQL
//!   subset for `q=` (`=`, `!=`, `~`, `!~`, `>`, `>=`, `<`, `<=`, `IN`, `NOT IN`,
//!   `AND`, `OR`), `sort=` (one field, `-` for descending), and the
//!   2.0 error envelope.
//! - Auth: Basic `email:api_token` (the admin, full rights); Bearer access
//!   token (a pseudo-user: 403 on permissions-config, `/workspaces/{ws}/permissions*`
//!   and 1.0 groups); Bearer OAuth token (the admin; 401 once expired or
//!   revoked; 403 on permissions-config writes). Anything else: 401.
//! - Per-credential rolling-window rate limit (429 with `Retry-After`),
//!   latency on every request, deterministic fault injection (500/502/503).
//!
//! # Effective repository permissions
//!
//! `/2.0/workspaces/{ws}/permissions/repositories` lists, for every repository
//! and every user with any access, the **maximum** of:
//! the user's explicit repository grant; the repository grants of every group
//! the user is in; the user's explicit grant on the repository's project; and
//! the project grants of the user's groups. Ranks are `read < write < admin`;
//! project `create-repo` counts as `write` on repositories; `none` grants
//! nothing. Workspace owners get no implicit entry, and users with only a
//! `none` (or no) grant are not listed. Explicit grants held by users who are
//! no longer workspace members still count (Bitbucket keeps them).
//!
//! # Known deviations from real Bitbucket
//!
//! - Only the endpoints above exist; others answer the HTML 404.
//! - `account_status` is included on every user object (real Bitbucket may
//!   return it only on `/2.0/user`).
//! - The access token may read every workspace (a real workspace access token
//!   is bound to one) and is never an administrator in `/user/workspaces`.
//! - `q=` has no parentheses; ordered comparisons rank permission names
//!   (`read < write < create-repo < admin`, `member < owner`), then compare
//!   numbers, then strings. `sort=` works on any field of any listing
//!   (Bitbucket limits it per endpoint); `/user/workspaces` accepts only `slug`.
//! - A page past the end answers 404 `Invalid page`.
//! - GET of a single permissions-config entry without an explicit grant
//!   answers 404. User PUTs for non-members and workspace owners answer 400
//!   with an explanatory message. DELETE of an absent grant answers 204.
//! - 1.0 group member PUT requires workspace membership (404 otherwise);
//!   group creation/deletion and `/1.0/group-privileges` are not simulated.
//! - Rate limiting counts every authenticated request against one budget per
//!   credential; no scaled limits or `X-RateLimit-*` headers. Unauthenticated
//!   requests and the token endpoint are not rate limited.
//! - Faults are decided before authentication, so any request (the token
//!   endpoint included) can fail; a faulted request is not counted by the
//!   rate limiter. `next`/`previous` links use the request's `Host` header.
//! - `added_on`/`last_accessed` on `/workspaces/{ws}/permissions` are
//!   synthesised from the user's UUID.
//! - Where the contract (`API-CONTRACT.md`) and the OpenAPI schema disagree
//!   the contract wins; the contract test names every such difference.
//!
//! # Ground truth and credentials
//!
//! [`Organisation::generate`] is deterministic for the seed and sizes, and so
//! are the credentials ([`SimCredentials`]); only OAuth access tokens are
//! random. The admin (`users[0]`, the API-token user) owns every workspace;
//! a few other members are owners; ~5% of accounts are inactive; ~2% of users
//! belong to no workspace but keep explicit grants (former members); ~4% of
//! explicit grants are `none`; ~15% of repositories have no explicit grants.
//! [`SimulatorHandle::organisation`] returns the current state, writes
//! included, so tests can compare a sync against it.
//!
//! # Running it
//!
//! ```text
//! bitbucket-operator simulate --listen 127.0.0.1:7990 --seed 1 --users 40 \
//!     [--latency-ms 20] [--rate-limit 1000/1h] [--fail-rate 0.01]
//! ```
//! prints one JSON line with the URL and credentials, then serves until
//! SIGINT/SIGTERM. In Rust: `Simulator::start(SimConfig::default(),
//! "127.0.0.1:0".parse()?)`, then use [`SimulatorHandle::base_url`] and
//! [`SimulatorHandle::credentials`].

mod app;
mod auth;
pub mod cli;
mod limits;
mod org;
mod paging;
mod pipeline;
mod render;
mod reply;
mod routes;
mod state;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::ServiceExt as _;

pub use app::RequestStats;
pub use auth::SimCredentials;
pub use limits::RateLimit;
pub use org::{Group, Member, Organisation, Permission, Project, Repository, User, Workspace};

/// Simulator settings. Sizes are totals across all workspaces.
#[derive(Debug, Clone)]
pub struct SimConfig {
    pub seed: u64,
    pub workspaces: usize,
    pub users: usize,
    pub groups: usize,
    pub projects: usize,
    pub repositories: usize,
    /// Added to every request before it is answered.
    pub latency: Duration,
    pub rate_limit: Option<RateLimit>,
    /// Probability in `0.0..=1.0` that a request answers 500/502/503.
    pub fail_rate: f64,
    pub max_pagelen: usize,
    pub oauth_token_ttl: Duration,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            seed: 1,
            workspaces: 2,
            users: 40,
            groups: 8,
            projects: 6,
            repositories: 30,
            latency: Duration::ZERO,
            rate_limit: None,
            fail_rate: 0.0,
            max_pagelen: 100,
            oauth_token_ttl: Duration::from_secs(3600),
        }
    }
}

/// Entry point: see [`Simulator::start`].
pub struct Simulator;

impl Simulator {
    /// Generates the organisation, binds `listen` (port 0 picks a free port)
    /// and serves in a background task until [`SimulatorHandle::shutdown`].
    pub async fn start(config: SimConfig, listen: SocketAddr) -> anyhow::Result<SimulatorHandle> {
        anyhow::ensure!(
            (0.0..=1.0).contains(&config.fail_rate),
            "fail_rate must be within 0.0..=1.0"
        );
        let org = Organisation::generate(&config);
        let admin = &org.users[0];
        let creds = SimCredentials::generate(config.seed, &admin.email, &admin.uuid);
        let listener = tokio::net::TcpListener::bind(listen).await?;
        let local = listener.local_addr()?;
        // A wildcard bind is reached through loopback by local clients;
        // `next` links follow the request's Host header anyway.
        let mut reachable = local;
        if reachable.ip().is_unspecified() {
            reachable.set_ip(match local {
                SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
                SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
            });
        }
        let base_url = format!("http://{reachable}");
        let auth = auth::Auth::new(creds, config.oauth_token_ttl);
        let app = Arc::new(app::App::new(&config, base_url.clone(), org, auth));
        let service = routes::service(app.clone());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let result = axum::serve(listener, service.into_make_service())
                .with_graceful_shutdown(async {
                    let _ = rx.await;
                })
                .await;
            if let Err(err) = result {
                tracing::error!(%err, "simulator server failed");
            }
        });
        tracing::debug!(%base_url, "simulator listening");
        Ok(SimulatorHandle {
            app,
            local,
            base_url,
            shutdown: tx,
            task,
        })
    }
}

/// A running simulator.
pub struct SimulatorHandle {
    app: Arc<app::App>,
    local: SocketAddr,
    base_url: String,
    shutdown: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl SimulatorHandle {
    /// `http://127.0.0.1:PORT`: the API is under `/2.0` and `/1.0`, the OAuth
    /// token endpoint at `/site/oauth2/access_token`.
    pub fn base_url(&self) -> String {
        self.base_url.clone()
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    pub fn credentials(&self) -> &SimCredentials {
        &self.app.auth.creds
    }

    /// A snapshot of the ground truth, including every write so far.
    pub fn organisation(&self) -> Organisation {
        self.app.state.read().unwrap_or_else(|e| e.into_inner()).org.clone()
    }

    pub fn stats(&self) -> RequestStats {
        self.app.stats.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn reset_stats(&self) {
        *self.app.stats.lock().unwrap_or_else(|e| e.into_inner()) = RequestStats::default();
    }

    /// Every OAuth access token issued so far answers 401 from now on.
    pub fn revoke_oauth_tokens(&self) {
        self.app.auth.revoke_oauth_tokens();
    }

    /// Changes the fault-injection probability (clamped to `0.0..=1.0`).
    pub fn set_fail_rate(&self, rate: f64) {
        let rate = if rate.is_nan() { 0.0 } else { rate.clamp(0.0, 1.0) };
        self.app.fail_rate_bits.store(rate.to_bits(), Ordering::Relaxed);
    }

    /// Answers every authenticated request with 429 and a `Retry-After` of
    /// the time left, for `duration` from now: Bitbucket saying stop
    /// mid-run, whatever the client's own pacing.
    pub fn throttle_for(&self, duration: Duration) {
        *self.app.throttled_until.lock().unwrap_or_else(|e| e.into_inner()) =
            Some(std::time::Instant::now() + duration);
    }

    /// Stops accepting connections and waits for in-flight requests.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(());
        let _ = self.task.await;
    }
}
