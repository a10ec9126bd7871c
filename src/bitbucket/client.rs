//! The HTTP client: authentication, pacing, retries, pagination and the typed
//! endpoints of the contract (`shared/bitbucket/API-CONTRACT.md`).
//!
//! Retry policy: 429 waits for `Retry-After` when given (and pauses every
//! caller sharing the credential), else backs off exponentially with jitter;
//! 5xx and transport failures back off up to `max_retries`; every other 4xx is
//! final. An OAuth token is refreshed before it expires and once more after a
//! 401. Every attempt takes a slot from the shared [`Limiter`], because
//! Bitbucket counts every request, in the client's [`Lane`]: sync clients
//! leave a reserved share of the budget to provisioning clients
//! ([`Client::for_lane`]), which also go first.
//!
//! Never used, by design: `/2.0/workspaces` (retired, CHANGE-2770) and
//! per-member `/2.0/users/{id}` calls (the membership listings carry the user).

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use base64::Engine;
use futures::Stream;
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue, RETRY_AFTER};
use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;
use tokio::time::Instant;
use url::Url;

use super::credentials::Credentials;
use super::error::{EMAIL_HINT, EndpointClass, Error, ErrorKind};
use super::limiter::{Lane, Limiter, LimiterShare, Limits};
use super::models::*;

/// Bitbucket Cloud's API root (`/2.0` and `/1.0` live below it).
pub const DEFAULT_API_URL: &str = "https://api.bitbucket.org";
/// Where OAuth consumers exchange their key and secret for a token.
pub const DEFAULT_TOKEN_URL: &str = "https://bitbucket.org/site/oauth2/access_token";

/// Tunables; `ClientConfig::new` gives production defaults.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// API root, e.g. `https://api.bitbucket.org` or a simulator's base URL.
    pub api_url: Url,
    /// OAuth token endpoint. `None`: Bitbucket's for the default API root,
    /// else `{api_url}/site/oauth2/access_token` (simulators, proxies).
    pub token_url: Option<Url>,
    pub limits: Limits,
    pub request_timeout: Duration,
    /// Retries for 5xx and transport failures.
    pub max_retries: u32,
    /// When set, 5xx and transport failures are retried (capped exponential
    /// backoff) for as long as this since the first failure of a request,
    /// instead of `max_retries` times: a short Bitbucket outage then costs a
    /// wait, not a failed sync.
    pub outage_tolerance: Option<Duration>,
    /// Retries for 429 answers.
    pub max_rate_limit_retries: u32,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// `pagelen` for listings; Bitbucket's maximum is 100.
    pub page_len: u32,
    /// Largest 2xx body read, in bytes: a bigger one (or one that never
    /// ends) is an error naming the cap and the URL path, never buffered.
    pub max_body_bytes: usize,
    /// Most pages one listing may take before it ends in an error: a server
    /// that keeps handing out `next` links must not walk (and hold the
    /// credential's budget) for ever.
    pub max_pages: u32,
}

/// 32 MiB: a 1.0 groups answer (every group with its members, one array)
/// for tens of thousands of users fits; a 100-item page is about 100 KiB.
pub const DEFAULT_MAX_BODY_BYTES: usize = 32 * 1024 * 1024;
/// 1,000 pages of 100: 100,000 members, repositories or grants per listing.
pub const DEFAULT_MAX_PAGES: u32 = 1000;
/// Error bodies are read only for Bitbucket's message: the rest is dropped.
const MAX_ERROR_BODY_BYTES: usize = 64 * 1024;

impl ClientConfig {
    pub fn new(api_url: &str) -> Result<Self, Error> {
        let mut api_url = Url::parse(api_url)
            .map_err(|e| Error::invalid(EndpointClass::User, format!("invalid API URL {api_url:?}: {e}")))?;
        if !matches!(api_url.scheme(), "http" | "https") {
            return Err(Error::invalid(EndpointClass::User, "the API URL must be http or https"));
        }
        // Treat the root as a directory so that joins keep any path prefix.
        if !api_url.path().ends_with('/') {
            let path = format!("{}/", api_url.path());
            api_url.set_path(&path);
        }
        Ok(ClientConfig {
            api_url,
            token_url: None,
            limits: Limits::default(),
            request_timeout: Duration::from_secs(30),
            max_retries: 4,
            outage_tolerance: None,
            max_rate_limit_retries: 8,
            backoff_base: Duration::from_millis(250),
            backoff_max: Duration::from_secs(30),
            page_len: 100,
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            max_pages: DEFAULT_MAX_PAGES,
        })
    }

    fn resolved_token_url(&self) -> Url {
        if let Some(url) = &self.token_url {
            return url.clone();
        }
        if self.api_url.as_str().trim_end_matches('/') == DEFAULT_API_URL {
            Url::parse(DEFAULT_TOKEN_URL).expect("constant URL parses")
        } else {
            self.api_url.join("site/oauth2/access_token").expect("relative join")
        }
    }
}

/// Called once per HTTP attempt with the endpoint class and the status
/// (`None` for a transport failure): the hook for metrics.
pub type RequestObserver = Arc<dyn Fn(EndpointClass, Option<u16>) + Send + Sync>;

/// Outcome of adding a user to a 1.0 group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MembershipChange {
    Added,
    /// Bitbucket answered 409: the user was already a member.
    AlreadyMember,
}

/// A Bitbucket Cloud client. Cheap to clone; clones share credentials,
/// limiter and counters.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    http: reqwest::Client,
    config: ClientConfig,
    /// Shared by scoped clones, so a credential swap reaches all of them.
    auth: Arc<RwLock<Arc<Auth>>>,
    /// The pacing in force (starts as `config.limits`); shared by scoped
    /// clones and used for new credentials, so a swap keeps the latest limits.
    limits: Arc<RwLock<Limits>>,
    /// The limiter lane this client's requests wait in.
    lane: Lane,
    requests: AtomicU64,
    by_class: Mutex<BTreeMap<(EndpointClass, u16), u64>>,
    observer: Option<RequestObserver>,
}

struct Auth {
    credentials: Credentials,
    /// This client's share of the limiter of its whole credential.
    limiter: LimiterShare,
    /// Cached OAuth access token; a tokio mutex so that one refresh serves
    /// every waiting request.
    oauth: tokio::sync::Mutex<Option<CachedToken>>,
}

#[derive(Clone)]
struct CachedToken {
    token: String,
    refresh_at: Instant,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("api_url", &self.inner.config.api_url.as_str())
            .field("credentials", &self.auth().credentials)
            .finish()
    }
}

impl Client {
    pub fn new(config: ClientConfig, credentials: Credentials) -> Result<Self, Error> {
        Self::with_observer(config, credentials, None)
    }

    pub fn with_observer(
        config: ClientConfig,
        credentials: Credentials,
        observer: Option<RequestObserver>,
    ) -> Result<Self, Error> {
        let http = reqwest::Client::builder()
            .user_agent(concat!("bitbucket-operator/", env!("CARGO_PKG_VERSION")))
            .timeout(config.request_timeout)
            .connect_timeout(Duration::from_secs(10))
            // Never follow redirects: they could carry the Authorization
            // header somewhere else.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| Error::invalid(EndpointClass::User, format!("cannot build the HTTP client: {e}")))?;
        let limits = config.limits;
        let auth = Arc::new(Auth::new(credentials, &config, limits));
        Ok(Client {
            inner: Arc::new(Inner {
                http,
                config,
                auth: Arc::new(RwLock::new(auth)),
                limits: Arc::new(RwLock::new(limits)),
                lane: Lane::Sync,
                requests: AtomicU64::new(0),
                by_class: Mutex::new(BTreeMap::new()),
                observer,
            }),
        })
    }

    /// A client sharing this one's connection pool, credentials and limiter,
    /// with its own request counters: one per sync run, so concurrent runs
    /// each report the requests they made.
    pub fn scoped(&self) -> Client {
        self.for_lane(self.inner.lane)
    }

    /// A scoped client (see [`Client::scoped`]) whose requests wait in
    /// `lane` of the same shared limiter: [`Lane::Provisioning`] for grants,
    /// revokes and expiries, which then pass sync requests (limiter module
    /// docs). New clients are in [`Lane::Sync`].
    pub fn for_lane(&self, lane: Lane) -> Client {
        Client {
            inner: Arc::new(Inner {
                http: self.inner.http.clone(),
                config: self.inner.config.clone(),
                auth: Arc::clone(&self.inner.auth),
                limits: Arc::clone(&self.inner.limits),
                lane,
                requests: AtomicU64::new(0),
                by_class: Mutex::new(BTreeMap::new()),
                observer: self.inner.observer.clone(),
            }),
        }
    }

    /// The pacing in force (the latest of `config.limits` and [`Client::set_limits`]).
    pub fn limits(&self) -> Limits {
        *self.inner.limits.read().unwrap_or_else(|e| e.into_inner())
    }

    pub fn config(&self) -> &ClientConfig {
        &self.inner.config
    }

    /// The credentials in use (secrets redacted in `Debug`).
    pub fn credentials(&self) -> Credentials {
        self.auth().credentials.clone()
    }

    /// Swaps credentials for the next request (hot reload after a Secret
    /// change). Requests in flight finish with the old ones. No-op when
    /// nothing changed, so an unchanged Secret keeps the cached OAuth token.
    pub fn set_credentials(&self, credentials: Credentials) {
        let mut auth = self.inner.auth.write().unwrap_or_else(|e| e.into_inner());
        if auth.credentials != credentials {
            *auth = Arc::new(Auth::new(credentials, &self.inner.config, self.limits()));
        }
    }

    /// Replaces this client's pacing settings. The shared limiter applies
    /// the strictest settings of the clients presenting the same credential.
    pub fn set_limits(&self, limits: Limits) {
        *self.inner.limits.write().unwrap_or_else(|e| e.into_inner()) = limits;
        self.auth().limiter.set_limits(limits);
    }

    /// The pacing actually in force for this credential (see [`Client::set_limits`]).
    pub fn effective_limits(&self) -> Limits {
        self.auth().limiter.limiter().limits()
    }

    /// The limiter lane this client's requests wait in.
    pub fn lane(&self) -> Lane {
        self.inner.lane
    }

    /// How long until the shared limiter lets this client's next request
    /// start, if it is holding its lane back (its share of the budget spent,
    /// or paused after a 429).
    pub fn budget_wait(&self) -> Option<Duration> {
        let at = self.auth().limiter.limiter().next_free_slot_in(self.inner.lane)?;
        Some(at.saturating_duration_since(Instant::now()))
    }

    /// HTTP attempts made by this client (retries included).
    pub fn request_count(&self) -> u64 {
        self.inner.requests.load(Ordering::Relaxed)
    }

    /// Attempts by endpoint class and status (0 for transport failures).
    pub fn request_breakdown(&self) -> BTreeMap<(EndpointClass, u16), u64> {
        self.inner.by_class.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn auth(&self) -> Arc<Auth> {
        Arc::clone(&self.inner.auth.read().unwrap_or_else(|e| e.into_inner()))
    }

    fn url(&self, segments: &[&str], query: &[(&str, &str)]) -> Url {
        let mut url = self.inner.config.api_url.clone();
        {
            let mut path = url.path_segments_mut().expect("http(s) URLs have paths");
            path.pop_if_empty();
            for segment in segments {
                path.push(segment);
            }
        }
        if !query.is_empty() {
            let mut pairs = url.query_pairs_mut();
            for (key, value) in query {
                pairs.append_pair(key, value);
            }
        }
        url
    }

    fn list_url(&self, segments: &[&str], query: &[(&str, &str)]) -> Url {
        let page_len = self.inner.config.page_len.to_string();
        let mut all: Vec<(&str, &str)> = vec![("pagelen", &page_len)];
        all.extend_from_slice(query);
        self.url(segments, &all)
    }

    // ---- transport -------------------------------------------------------

    // Long: the retry loop keeps every rule of one attempt (limiter slot, 401
    // refresh, 429 pause, 5xx backoff, outage horizon) in one visible order.
    /// Sends one logical request with retries, returning the 2xx body.
    async fn execute(
        &self,
        class: EndpointClass,
        method: Method,
        url: Url,
        body: Option<&serde_json::Value>,
    ) -> Result<(StatusCode, bytes::Bytes), Error> {
        let config = &self.inner.config;
        let mut failures = 0u32;
        let mut throttled = 0u32;
        let mut refreshed_after_401 = false;
        let mut first_failure: Option<Instant> = None;
        let mut give_up = |failures: u32| {
            let since = *first_failure.get_or_insert_with(Instant::now);
            match config.outage_tolerance {
                Some(tolerance) => since.elapsed() >= tolerance,
                None => failures > config.max_retries,
            }
        };
        loop {
            let auth = self.auth();
            let authorization = auth.authorization(self).await?;
            let permit = auth.limiter.limiter().acquire_in(self.inner.lane).await;
            let mut request = self
                .inner
                .http
                .request(method.clone(), url.clone())
                .header(AUTHORIZATION, authorization);
            if let Some(body) = body {
                request = request.json(body);
            }
            self.inner.requests.fetch_add(1, Ordering::Relaxed);
            let sent = request.send().await;
            drop(permit);
            let response = match sent {
                Ok(response) => response,
                Err(err) => {
                    self.observe(class, None);
                    let error = Error::new(class, ErrorKind::Transport, None, transport_message(&err));
                    failures += 1;
                    if give_up(failures) {
                        return Err(error);
                    }
                    tracing::debug!(%class, attempt = failures, error = %error, "retrying after a transport failure");
                    tokio::time::sleep(backoff(config, failures)).await;
                    continue;
                }
            };
            let status = response.status();
            self.observe(class, Some(status.as_u16()));
            if status.is_success() {
                let bytes = read_capped(response, config.max_body_bytes)
                    .await
                    .map_err(|e| e.into_error(class, status, &url, config.max_body_bytes))?;
                return Ok((status, bytes));
            }
            let retry_after = parse_retry_after(response.headers().get(RETRY_AFTER));
            let content_type = response
                .headers()
                .get(CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned();
            let body = read_truncated(response, MAX_ERROR_BODY_BYTES).await;
            let mut error = error_from_response(class, status, &content_type, &body);
            error.retry_after = retry_after;

            match status.as_u16() {
                429 => {
                    throttled += 1;
                    if throttled > config.max_rate_limit_retries {
                        return Err(error);
                    }
                    let wait = retry_after.unwrap_or_else(|| backoff(config, throttled));
                    auth.limiter.limiter().pause_until(Instant::now() + wait);
                    tracing::warn!(%class, wait_ms = wait.as_millis() as u64, "Bitbucket rate limit hit; waiting");
                    tokio::time::sleep(wait).await;
                }
                500..=599 => {
                    failures += 1;
                    if give_up(failures) {
                        return Err(error);
                    }
                    tracing::debug!(%class, status = status.as_u16(), attempt = failures, "retrying after a server error");
                    tokio::time::sleep(backoff(config, failures)).await;
                }
                401 if matches!(auth.credentials, Credentials::OAuthConsumer { .. }) && !refreshed_after_401 => {
                    // The cached token may have been revoked early: get a new
                    // one and try once more.
                    refreshed_after_401 = true;
                    auth.invalidate_token().await;
                }
                401 => {
                    if auth.credentials.username_is_not_email() {
                        error.message = format!("{}. {EMAIL_HINT}", error.message.trim_end_matches('.'));
                    }
                    return Err(error);
                }
                _ => return Err(error),
            }
        }
    }

    fn observe(&self, class: EndpointClass, status: Option<u16>) {
        *self
            .inner
            .by_class
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry((class, status.unwrap_or(0)))
            .or_default() += 1;
        if let Some(observer) = &self.inner.observer {
            observer(class, status);
        }
    }

    async fn get_json<T: DeserializeOwned>(&self, class: EndpointClass, url: Url) -> Result<T, Error> {
        let (status, body) = self.execute(class, Method::GET, url, None).await?;
        decode(class, status, &body)
    }

    /// Streams a paginated listing page by page, following `next` exactly as
    /// given until it is absent. A `next` on another origin is refused (it
    /// would receive our credentials); a `next` seen twice, or more than
    /// `max_pages` pages, ends with an error instead of walking for ever.
    /// Nothing accumulates here beyond the links seen (at most `max_pages`).
    pub fn pages<T>(
        &self,
        class: EndpointClass,
        first: Url,
    ) -> impl Stream<Item = Result<Vec<T>, Error>> + Send + 'static
    where
        T: DeserializeOwned + Send + 'static,
    {
        let client = self.clone();
        let origin = first.origin();
        let max_pages = self.inner.config.max_pages.max(1);
        let listing = first.path().to_owned();
        let api_root = self.inner.config.api_url.path().to_owned();
        let state = (Some(first), HashSet::new());
        futures::stream::try_unfold(state, move |(next, mut seen)| {
            let client = client.clone();
            let origin = origin.clone();
            let listing = listing.clone();
            let api_root = api_root.clone();
            async move {
                let Some(url) = next else { return Ok(None) };
                if seen.len() >= max_pages as usize {
                    return Err(Error::invalid(
                        class,
                        format!(
                            "the listing {listing} still links to more pages after {max_pages} pages (the page cap); stopping"
                        ),
                    ));
                }
                if !seen.insert(url.to_string()) {
                    return Err(Error::invalid(class, format!("pagination loops back to {url}")));
                }
                let page: Page<T> = client.get_json(class, url).await?;
                let next = page.next.as_deref().filter(|n| !n.is_empty());
                // An empty page that still points further would walk forever
                // at the limiter's pace: stop instead.
                if page.values.is_empty() && next.is_some() {
                    return Err(Error::invalid(
                        class,
                        "an empty page still links to a next page; stopping",
                    ));
                }
                let next = match next {
                    None => None,
                    Some(next) => {
                        let next = Url::parse(next)
                            .map_err(|e| Error::invalid(class, format!("unusable next link {next:?}: {e}")))?;
                        if next.origin() != origin {
                            return Err(Error::invalid(
                                class,
                                format!(
                                    "refusing to follow a next link to another origin: {}",
                                    next.origin().ascii_serialization()
                                ),
                            ));
                        }
                        // Nor out of the API root's path (the allow-list
                        // may name a prefix, e.g. a proxy's /bitbucket/).
                        if !next.path().starts_with(&api_root) || next.username() != "" || next.password().is_some() {
                            return Err(Error::invalid(
                                class,
                                format!("refusing to follow a next link outside the API root {api_root}"),
                            ));
                        }
                        Some(next)
                    }
                };
                Ok(Some((page.values, (next, seen))))
            }
        })
    }

    // ---- reads (sync) ------------------------------------------------------

    /// `GET /2.0/user`: who the credential acts as.
    pub async fn current_user(&self) -> Result<User, Error> {
        self.get_json(EndpointClass::User, self.url(&["2.0", "user"], &[]))
            .await
    }

    /// `GET /2.0/user/workspaces`, the replacement for the retired
    /// `/2.0/workspaces`. `administrator`: only workspaces the caller
    /// administers (or only those it does not).
    pub fn user_workspaces(
        &self,
        administrator: Option<bool>,
    ) -> impl Stream<Item = Result<Vec<WorkspaceAccess>, Error>> + Send + 'static {
        let mut query = vec![(
            "fields",
            "next,values.administrator,values.workspace.uuid,values.workspace.slug,values.workspace.name",
        )];
        let flag;
        if let Some(admin) = administrator {
            flag = admin.to_string();
            query.push(("administrator", &flag));
        }
        self.pages(
            EndpointClass::UserWorkspaces,
            self.list_url(&["2.0", "user", "workspaces"], &query),
        )
    }

    /// `GET /2.0/user/workspaces/{ws}/permission`: the caller's own role.
    pub async fn workspace_self_permission(&self, workspace: &str) -> Result<WorkspaceSelfPermission, Error> {
        let url = self.url(&["2.0", "user", "workspaces", workspace, "permission"], &[]);
        self.get_json(EndpointClass::UserWorkspaces, url).await
    }

    /// `GET /2.0/workspaces/{ws}`.
    pub async fn workspace(&self, workspace: &str) -> Result<Workspace, Error> {
        let url = self.url(
            &["2.0", "workspaces", workspace],
            &[("fields", "uuid,slug,name,is_private")],
        );
        self.get_json(EndpointClass::Workspace, url).await
    }

    /// `GET /2.0/workspaces/{ws}/members`, with emails (visible to admins).
    pub fn workspace_members(
        &self,
        workspace: &str,
    ) -> impl Stream<Item = Result<Vec<WorkspaceMembership>, Error>> + Send + 'static {
        let url = self.list_url(
            &["2.0", "workspaces", workspace, "members"],
            &[(
                "fields",
                "-values.links,-values.workspace,-values.user.links,+values.user.email",
            )],
        );
        self.pages(EndpointClass::Members, url)
    }

    /// `GET /2.0/workspaces/{ws}/members/{member}` (UUID or account id): one
    /// membership, with the email when the caller may see it; a 404 means
    /// not a member.
    pub async fn workspace_member(&self, workspace: &str, member: &str) -> Result<WorkspaceMembership, Error> {
        let url = self.url(
            &["2.0", "workspaces", workspace, "members", member],
            &[("fields", "-links,-workspace,-user.links,+user.email")],
        );
        self.get_json(EndpointClass::Members, url).await
    }

    /// `GET /2.0/workspaces/{ws}/permissions`, optionally owners only
    /// (`q=permission="owner"`).
    pub fn workspace_permissions(
        &self,
        workspace: &str,
        owners_only: bool,
    ) -> impl Stream<Item = Result<Vec<WorkspaceMembership>, Error>> + Send + 'static {
        let mut query = vec![("fields", "-values.links,-values.workspace,-values.user.links")];
        if owners_only {
            query.push(("q", "permission=\"owner\""));
        }
        let url = self.list_url(&["2.0", "workspaces", workspace, "permissions"], &query);
        self.pages(EndpointClass::WorkspacePermissions, url)
    }

    /// `GET /2.0/workspaces/{ws}/permissions/repositories[/{repo}]`: effective
    /// access (direct and group grants merged), for cross-checks.
    pub fn effective_repository_permissions(
        &self,
        workspace: &str,
        repository: Option<&str>,
    ) -> impl Stream<Item = Result<Vec<EffectiveRepositoryPermission>, Error>> + Send + 'static {
        let mut segments = vec!["2.0", "workspaces", workspace, "permissions", "repositories"];
        segments.extend(repository);
        let url = self.list_url(
            &segments,
            &[("fields", "-values.links,-values.user.links,-values.repository.links")],
        );
        self.pages(EndpointClass::EffectiveRepositoryPermissions, url)
    }

    /// `GET /2.0/workspaces/{ws}/projects`.
    pub fn projects(&self, workspace: &str) -> impl Stream<Item = Result<Vec<Project>, Error>> + Send + 'static {
        let url = self.list_url(
            &["2.0", "workspaces", workspace, "projects"],
            &[("fields", "next,values.uuid,values.key,values.name,values.is_private")],
        );
        self.pages(EndpointClass::Projects, url)
    }

    /// `GET /2.0/workspaces/{ws}/projects/{key}`.
    pub async fn project(&self, workspace: &str, key: &str) -> Result<Project, Error> {
        let url = self.url(
            &["2.0", "workspaces", workspace, "projects", key],
            &[("fields", "uuid,key,name,is_private")],
        );
        self.get_json(EndpointClass::Projects, url).await
    }

    /// `GET /2.0/repositories/{ws}`: every repository, each with its project.
    pub fn repositories(&self, workspace: &str) -> impl Stream<Item = Result<Vec<Repository>, Error>> + Send + 'static {
        let url = self.list_url(
            &["2.0", "repositories", workspace],
            &[(
                "fields",
                "next,values.uuid,values.slug,values.full_name,values.name,values.is_private,values.project.uuid,values.project.key,values.project.name",
            )],
        );
        self.pages(EndpointClass::Repositories, url)
    }

    /// `GET /2.0/repositories/{ws}/{repo}`.
    pub async fn repository(&self, workspace: &str, slug: &str) -> Result<Repository, Error> {
        let url = self.url(
            &["2.0", "repositories", workspace, slug],
            &[(
                "fields",
                "uuid,slug,full_name,name,is_private,project.uuid,project.key,project.name",
            )],
        );
        self.get_json(EndpointClass::Repositories, url).await
    }

    /// Explicit user permissions on a project or repository (permissions-config).
    pub fn explicit_user_permissions(
        &self,
        scope: PermissionScope<'_>,
    ) -> impl Stream<Item = Result<Vec<UserPermission>, Error>> + Send + 'static {
        let url = self.list_url(&scope.segments("users"), &[("fields", PERMISSION_FIELDS_USER)]);
        self.pages(scope.class(), url)
    }

    /// Explicit group permissions on a project or repository.
    pub fn explicit_group_permissions(
        &self,
        scope: PermissionScope<'_>,
    ) -> impl Stream<Item = Result<Vec<GroupPermission>, Error>> + Send + 'static {
        let url = self.list_url(&scope.segments("groups"), &[("fields", PERMISSION_FIELDS_GROUP)]);
        self.pages(scope.class(), url)
    }

    /// One principal's explicit level on a project or repository, as
    /// Bitbucket spells it (`none` when there is none; a 404 is an error the
    /// caller may read as "nothing held").
    pub async fn explicit_permission(
        &self,
        scope: PermissionScope<'_>,
        holder: Holder<'_>,
    ) -> Result<Option<String>, Error> {
        let entry: PermissionEntry = self
            .get_json(scope.class(), self.url(&scope.holder_segments(holder), &[]))
            .await?;
        Ok(entry.permission)
    }

    /// `GET /1.0/groups/{ws}`: every group with its members, in one call (a
    /// bare array). The 1.0 API needs the workspace slug, not its UUID.
    pub async fn groups(&self, workspace_slug: &str) -> Result<Vec<Group>, Error> {
        self.get_json(EndpointClass::Groups, self.url(&["1.0", "groups", workspace_slug], &[]))
            .await
    }

    /// `GET /1.0/groups/{ws}/{slug}/members`.
    pub async fn group_members(&self, workspace_slug: &str, group_slug: &str) -> Result<Vec<GroupMember>, Error> {
        let url = self.url(&["1.0", "groups", workspace_slug, group_slug, "members"], &[]);
        self.get_json(EndpointClass::Groups, url).await
    }

    // ---- writes (provisioning) ------------------------------------------

    /// Grants or changes a principal's explicit level on a project or
    /// repository (PUT is an upsert). Returns the level Bitbucket reports.
    pub async fn set_explicit_permission(
        &self,
        scope: PermissionScope<'_>,
        holder: Holder<'_>,
        permission: &str,
    ) -> Result<Option<String>, Error> {
        let body = serde_json::json!({ "permission": permission });
        let url = self.url(&scope.holder_segments(holder), &[]);
        let (status, bytes) = self.execute(scope.class(), Method::PUT, url, Some(&body)).await?;
        let entry: PermissionEntry = decode(scope.class(), status, &bytes)?;
        Ok(entry.permission)
    }

    /// Removes a principal's explicit level on a project or repository.
    pub async fn delete_explicit_permission(
        &self,
        scope: PermissionScope<'_>,
        holder: Holder<'_>,
    ) -> Result<(), Error> {
        self.delete(scope.class(), &scope.holder_segments(holder)).await
    }

    /// `PUT /1.0/groups/{ws}/{slug}/members/{uuid}` with `{}`. A 409 (already a
    /// member) is reported as [`MembershipChange::AlreadyMember`], not an error.
    pub async fn add_group_member(
        &self,
        workspace_slug: &str,
        group_slug: &str,
        user_uuid: &str,
    ) -> Result<MembershipChange, Error> {
        let url = self.url(
            &["1.0", "groups", workspace_slug, group_slug, "members", user_uuid],
            &[],
        );
        match self
            .execute(EndpointClass::Groups, Method::PUT, url, Some(&serde_json::json!({})))
            .await
        {
            Ok(_) => Ok(MembershipChange::Added),
            Err(err) if err.kind == ErrorKind::Conflict => Ok(MembershipChange::AlreadyMember),
            Err(err) => Err(err),
        }
    }

    /// `DELETE /1.0/groups/{ws}/{slug}/members/{uuid}`.
    pub async fn remove_group_member(
        &self,
        workspace_slug: &str,
        group_slug: &str,
        user_uuid: &str,
    ) -> Result<(), Error> {
        self.delete(
            EndpointClass::Groups,
            &["1.0", "groups", workspace_slug, group_slug, "members", user_uuid],
        )
        .await
    }

    async fn delete(&self, class: EndpointClass, segments: &[&str]) -> Result<(), Error> {
        self.execute(class, Method::DELETE, self.url(segments, &[]), None)
            .await
            .map(|_| ())
    }

    // ---- OAuth -------------------------------------------------------------

    async fn fetch_oauth_token(&self, key: &str, secret: &str) -> Result<CachedToken, Error> {
        let class = EndpointClass::OAuth;
        let url = self.inner.config.resolved_token_url();
        let basic = base64::engine::general_purpose::STANDARD.encode(format!("{key}:{secret}"));
        let mut failures = 0;
        let response = loop {
            self.inner.requests.fetch_add(1, Ordering::Relaxed);
            let sent = self
                .inner
                .http
                .post(url.clone())
                .header(AUTHORIZATION, format!("Basic {basic}"))
                .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
                .body("grant_type=client_credentials")
                .send()
                .await;
            match sent {
                Ok(response) if response.status().is_server_error() && failures < self.inner.config.max_retries => {
                    self.observe(class, Some(response.status().as_u16()));
                    failures += 1;
                    tokio::time::sleep(backoff(&self.inner.config, failures)).await;
                }
                Ok(response) => {
                    self.observe(class, Some(response.status().as_u16()));
                    break response;
                }
                Err(err) => {
                    self.observe(class, None);
                    failures += 1;
                    if failures > self.inner.config.max_retries {
                        return Err(Error::new(class, ErrorKind::Transport, None, transport_message(&err)));
                    }
                    tokio::time::sleep(backoff(&self.inner.config, failures)).await;
                }
            }
        };
        let status = response.status();
        let content_type = response
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        if !status.is_success() {
            let body = read_truncated(response, MAX_ERROR_BODY_BYTES).await;
            let mut error = error_from_response(class, status, &content_type, &body);
            error.message = format!("OAuth consumer token exchange failed: {}", error.message);
            return Err(error);
        }
        // A token answer is a few hundred bytes.
        let body = read_capped(response, MAX_ERROR_BODY_BYTES)
            .await
            .map_err(|e| e.into_error(class, status, &url, MAX_ERROR_BODY_BYTES))?;
        let token: TokenResponse = decode(class, status, &body)?;
        // Refresh at 90% of the lifetime, and at least a minute early. The
        // lifetime is clamped so that a nonsensical answer can neither
        // overflow the clock nor force a token fetch per request.
        let ttl = Duration::from_secs(token.expires_in.unwrap_or(3600).clamp(2, 86_400));
        let early = (ttl / 10).max(Duration::from_secs(60)).min(ttl / 2);
        Ok(CachedToken {
            token: token.access_token,
            refresh_at: Instant::now() + ttl - early,
        })
    }
}

impl Auth {
    fn new(credentials: Credentials, config: &ClientConfig, limits: Limits) -> Self {
        let key = credentials.limiter_key(&config.api_url.origin().ascii_serialization());
        Auth {
            limiter: Limiter::share(&key, limits),
            credentials,
            oauth: tokio::sync::Mutex::new(None),
        }
    }

    async fn authorization(&self, client: &Client) -> Result<HeaderValue, Error> {
        let value = match &self.credentials {
            Credentials::ApiToken { username, token } => {
                format!(
                    "Basic {}",
                    base64::engine::general_purpose::STANDARD.encode(format!("{username}:{token}"))
                )
            }
            Credentials::AccessToken { token } => format!("Bearer {token}"),
            Credentials::OAuthConsumer { key, secret } => {
                let mut cached = self.oauth.lock().await;
                let fresh = cached.as_ref().filter(|t| Instant::now() < t.refresh_at).cloned();
                let token = match fresh {
                    Some(token) => token,
                    None => {
                        let token = client.fetch_oauth_token(key, secret).await?;
                        *cached = Some(token.clone());
                        token
                    }
                };
                format!("Bearer {}", token.token)
            }
        };
        let mut header = HeaderValue::from_str(&value).map_err(|_| {
            Error::invalid(
                EndpointClass::User,
                "credentials contain characters not allowed in an HTTP header",
            )
        })?;
        header.set_sensitive(true);
        Ok(header)
    }

    async fn invalidate_token(&self) {
        *self.oauth.lock().await = None;
    }
}

const PERMISSION_FIELDS_USER: &str =
    "next,values.permission,values.user.uuid,values.user.account_id,values.user.nickname,values.user.display_name";
const PERMISSION_FIELDS_GROUP: &str =
    "next,values.permission,values.group.slug,values.group.name,values.group.full_slug";

/// Where an explicit permission is held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PermissionScope<'a> {
    Project { workspace: &'a str, key: &'a str },
    Repository { workspace: &'a str, slug: &'a str },
}

/// Who holds an explicit permission: a user (UUID or account id) or a group
/// (slug; never a composite id).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Holder<'a> {
    User(&'a str),
    Group(&'a str),
}

impl<'a> PermissionScope<'a> {
    fn class(self) -> EndpointClass {
        match self {
            PermissionScope::Project { .. } => EndpointClass::ProjectPermissions,
            PermissionScope::Repository { .. } => EndpointClass::RepositoryPermissions,
        }
    }

    /// `…/permissions-config/{users|groups}`
    fn segments(self, kind: &'a str) -> Vec<&'a str> {
        match self {
            PermissionScope::Project { workspace, key } => {
                vec![
                    "2.0",
                    "workspaces",
                    workspace,
                    "projects",
                    key,
                    "permissions-config",
                    kind,
                ]
            }
            PermissionScope::Repository { workspace, slug } => {
                vec!["2.0", "repositories", workspace, slug, "permissions-config", kind]
            }
        }
    }

    /// `…/permissions-config/users/{id}` or `…/groups/{slug}`
    fn holder_segments(self, holder: Holder<'a>) -> Vec<&'a str> {
        let (kind, id) = match holder {
            Holder::User(id) => ("users", id),
            Holder::Group(slug) => ("groups", slug),
        };
        let mut segments = self.segments(kind);
        segments.push(id);
        segments
    }
}

/// Decodes a 2xx body. serde's message can quote a whole string from the
/// body, so it is cut short: an error never carries the body.
fn decode<T: DeserializeOwned>(class: EndpointClass, status: StatusCode, body: &[u8]) -> Result<T, Error> {
    serde_json::from_slice(body).map_err(|e| {
        Error::new(
            class,
            ErrorKind::Decode,
            Some(status.as_u16()),
            truncate(format!("unexpected response body: {e}"), 300),
        )
    })
}

/// Bitbucket's message from the JSON envelope; for anything else (an HTML 404
/// page, an empty body) a plain description, never the raw body.
fn error_from_response(class: EndpointClass, status: StatusCode, content_type: &str, body: &[u8]) -> Error {
    let from_envelope = serde_json::from_slice::<ErrorEnvelope>(body).ok().and_then(|envelope| {
        let message = envelope.error.message.filter(|m| !m.trim().is_empty())?;
        Some(match envelope.error.detail.filter(|d| !d.trim().is_empty()) {
            Some(detail) => format!("{message} ({detail})"),
            None => message,
        })
    });
    let message = from_envelope.unwrap_or_else(|| {
        let reason = status.canonical_reason().unwrap_or("error");
        if content_type.starts_with("text/html") {
            format!("{reason} (non-JSON {content_type} body)")
        } else {
            reason.to_owned()
        }
    });
    Error::new(
        class,
        Error::kind_for_status(status.as_u16()),
        Some(status.as_u16()),
        truncate(message, 500),
    )
}

/// Why a body could not be read whole.
enum BodyError {
    TooLarge,
    Transport(reqwest::Error),
}

impl BodyError {
    /// The error names the cap and the URL path, never the body (nor the
    /// query, which may be long).
    fn into_error(self, class: EndpointClass, status: StatusCode, url: &Url, cap: usize) -> Error {
        match self {
            BodyError::TooLarge => Error::invalid(
                class,
                format!(
                    "the response body of {} is larger than the {cap}-byte cap; not read",
                    url.path()
                ),
            ),
            BodyError::Transport(e) => Error::new(
                class,
                ErrorKind::Transport,
                Some(status.as_u16()),
                transport_message(&e),
            ),
        }
    }
}

/// Reads a body chunk by chunk, refusing at once a declared length over
/// `cap` and stopping as soon as the bytes read pass it: a huge or endless
/// body costs at most `cap` bytes of memory.
async fn read_capped(mut response: reqwest::Response, cap: usize) -> Result<bytes::Bytes, BodyError> {
    if response.content_length().is_some_and(|len| len > cap as u64) {
        return Err(BodyError::TooLarge);
    }
    let mut body = bytes::BytesMut::new();
    while let Some(chunk) = response.chunk().await.map_err(BodyError::Transport)? {
        if body.len() + chunk.len() > cap {
            return Err(BodyError::TooLarge);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body.freeze())
}

/// At most `cap` bytes of an error body (the rest is dropped with the
/// connection); a body that fails halfway gives what arrived.
async fn read_truncated(mut response: reqwest::Response, cap: usize) -> bytes::Bytes {
    let mut body = bytes::BytesMut::new();
    while let Ok(Some(chunk)) = response.chunk().await {
        let room = cap - body.len();
        body.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if body.len() >= cap {
            break;
        }
    }
    body.freeze()
}

fn truncate(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut cut = max;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
        text.push('…');
    }
    text
}

fn transport_message(err: &reqwest::Error) -> String {
    // reqwest's Display includes the URL, which holds no secret (credentials
    // travel in headers only).
    // reqwest's own text omits the cause (refused, DNS, TLS): add the chain.
    let mut text = if err.is_timeout() {
        format!("timed out: {err}")
    } else {
        err.to_string()
    };
    let mut source = std::error::Error::source(err);
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// `Retry-After` in seconds (what Bitbucket sends) or as an HTTP date;
/// capped at an hour.
fn parse_retry_after(value: Option<&HeaderValue>) -> Option<Duration> {
    let text = value?.to_str().ok()?.trim();
    let wait = match text.parse::<f64>() {
        Ok(seconds) if seconds.is_finite() && seconds >= 0.0 => Duration::from_secs_f64(seconds.min(3600.0)),
        Ok(_) => return None,
        Err(_) => {
            let at = httpdate::parse_http_date(text).ok()?;
            at.duration_since(std::time::SystemTime::now()).unwrap_or_default()
        }
    };
    Some(wait.min(Duration::from_secs(3600)))
}

fn backoff(config: &ClientConfig, attempt: u32) -> Duration {
    crate::backoff::exponential(config.backoff_base, config.backoff_max, attempt)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn html_404_gives_a_plain_message() {
        let err = error_from_response(
            EndpointClass::Repositories,
            StatusCode::NOT_FOUND,
            "text/html; charset=utf-8",
            b"<!DOCTYPE html><html><body>Not found</body></html>",
        );
        assert_eq!(err.kind, ErrorKind::NotFound);
        assert_eq!(err.status, Some(404));
        assert!(!err.message.contains('<'), "{}", err.message);
    }

    #[test]
    fn envelope_message_and_detail() {
        let err = error_from_response(
            EndpointClass::Members,
            StatusCode::GONE,
            "application/json",
            br#"{"type":"error","error":{"message":"CHANGE-2770 - Functionality has been deprecated","detail":"Please read the changelog entry for more details."}}"#,
        );
        assert_eq!(err.kind, ErrorKind::Gone);
        assert!(err.message.starts_with("CHANGE-2770"));
        assert!(err.message.contains("changelog"));
    }

    #[test]
    fn retry_after_parsing() {
        assert_eq!(
            parse_retry_after(Some(&HeaderValue::from_static("3"))),
            Some(Duration::from_secs(3))
        );
        assert_eq!(parse_retry_after(Some(&HeaderValue::from_static("junk"))), None);
        assert_eq!(
            parse_retry_after(Some(&HeaderValue::from_static("99999"))),
            Some(Duration::from_secs(3600))
        );
        assert_eq!(parse_retry_after(None), None);
        let soon = httpdate::fmt_http_date(std::time::SystemTime::now() + Duration::from_secs(30));
        let wait = parse_retry_after(Some(&HeaderValue::from_str(&soon).unwrap())).unwrap();
        assert!(
            wait > Duration::from_secs(27) && wait <= Duration::from_secs(30),
            "{wait:?}"
        );
        let past = httpdate::fmt_http_date(std::time::SystemTime::now() - Duration::from_secs(30));
        assert_eq!(
            parse_retry_after(Some(&HeaderValue::from_str(&past).unwrap())),
            Some(Duration::ZERO)
        );
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let config = ClientConfig::new("http://127.0.0.1:1").unwrap();
        for attempt in 1..20 {
            let wait = backoff(&config, attempt);
            assert!(wait <= config.backoff_max);
            let expected = config
                .backoff_base
                .saturating_mul(1 << (attempt - 1).min(16))
                .min(config.backoff_max);
            assert!(wait >= expected / 2, "attempt {attempt}: {wait:?} < {expected:?}/2");
        }
    }

    #[test]
    fn urls_encode_braced_uuids_and_keep_prefixes() {
        let mut config = ClientConfig::new("http://proxy.local/bitbucket").unwrap();
        config.page_len = 100;
        let client = Client::new(config, Credentials::AccessToken { token: "t".into() }).unwrap();
        let url = client.list_url(
            &["2.0", "workspaces", "{abc}", "members"],
            &[("q", "permission=\"owner\"")],
        );
        assert_eq!(
            url.as_str(),
            "http://proxy.local/bitbucket/2.0/workspaces/%7Babc%7D/members?pagelen=100&q=permission%3D%22owner%22"
        );
    }

    mod fuzz {
        //! Arbitrary bytes and arbitrary JSON through every decoder of a
        //! Bitbucket answer: no panic, and no message that grows with the
        //! body.
        use super::super::*;
        use proptest::prelude::*;

        /// JSON built from the field names the models read, so that the
        /// decoders get past the first `{` and meet wrong types deep inside.
        fn json() -> impl Strategy<Value = serde_json::Value> {
            let key = prop_oneof![
                prop::sample::select(vec![
                    "values",
                    "next",
                    "size",
                    "pagelen",
                    "uuid",
                    "account_id",
                    "nickname",
                    "display_name",
                    "account_status",
                    "email",
                    "slug",
                    "name",
                    "is_private",
                    "administrator",
                    "workspace",
                    "permission",
                    "user",
                    "key",
                    "full_name",
                    "project",
                    "group",
                    "full_slug",
                    "repository",
                    "members",
                    "is_active",
                    "error",
                    "message",
                    "detail",
                    "access_token",
                    "expires_in",
                    "type",
                ])
                .prop_map(str::to_owned),
                ".{0,8}",
            ];
            let leaf = prop_oneof![
                Just(serde_json::Value::Null),
                any::<bool>().prop_map(serde_json::Value::from),
                any::<i64>().prop_map(serde_json::Value::from),
                any::<u64>().prop_map(serde_json::Value::from),
                any::<f64>().prop_map(serde_json::Value::from),
                ".{0,40}".prop_map(serde_json::Value::from),
            ];
            leaf.prop_recursive(5, 64, 8, move |inner| {
                prop_oneof![
                    prop::collection::vec(inner.clone(), 0..8).prop_map(serde_json::Value::Array),
                    prop::collection::btree_map(key.clone(), inner, 0..8)
                        .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
                ]
            })
        }

        /// Every decoder the client applies to a body.
        fn decode_all(body: &[u8]) {
            let status = StatusCode::OK;
            let class = EndpointClass::Members;
            fn check<T: DeserializeOwned>(body: &[u8]) {
                if let Err(err) = decode::<T>(EndpointClass::Members, StatusCode::OK, body) {
                    assert!(err.message.len() <= 304, "{}", err.message.len());
                    assert_eq!(err.kind, ErrorKind::Decode);
                }
            }
            check::<User>(body);
            check::<Workspace>(body);
            check::<WorkspaceSelfPermission>(body);
            check::<Project>(body);
            check::<Repository>(body);
            check::<PermissionEntry>(body);
            check::<TokenResponse>(body);
            check::<Vec<Group>>(body);
            check::<Vec<GroupMember>>(body);
            check::<Page<WorkspaceAccess>>(body);
            check::<Page<WorkspaceMembership>>(body);
            check::<Page<Project>>(body);
            check::<Page<Repository>>(body);
            check::<Page<UserPermission>>(body);
            check::<Page<GroupPermission>>(body);
            check::<Page<EffectiveRepositoryPermission>>(body);
            if let Ok(repo) = serde_json::from_slice::<Repository>(body) {
                let _ = repo.slug();
            }
            for code in [400u16, 401, 403, 404, 409, 410, 429, 500, 503] {
                let status = StatusCode::from_u16(code).unwrap();
                for content_type in ["application/json", "text/html; charset=utf-8", ""] {
                    let err = error_from_response(class, status, content_type, body);
                    assert_eq!(err.status, Some(code));
                    assert!(err.message.len() <= 503, "{}", err.message.len());
                }
            }
            let _ = status;
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(512))]

            #[test]
            fn arbitrary_bytes_never_panic(body in prop::collection::vec(any::<u8>(), 0..512)) {
                decode_all(&body);
            }

            #[test]
            fn arbitrary_json_never_panics(value in json()) {
                decode_all(&serde_json::to_vec(&value).unwrap());
            }

            #[test]
            fn retry_after_is_bounded(text in ".{0,40}") {
                if let Ok(header) = HeaderValue::from_str(&text)
                    && let Some(wait) = parse_retry_after(Some(&header))
                {
                    prop_assert!(wait <= Duration::from_secs(3600));
                }
            }
        }

        #[test]
        fn a_long_string_in_a_body_is_not_echoed() {
            let body = format!("{{\"uuid\": {{\"x\": \"{}\"}}}}", "S".repeat(100_000));
            let err = decode::<User>(EndpointClass::User, StatusCode::OK, body.as_bytes()).unwrap_err();
            assert!(err.message.len() <= 304);
            // Deep nesting hits serde_json's recursion limit, not the stack.
            let nested = "[".repeat(100_000);
            let err = decode::<serde_json::Value>(EndpointClass::User, StatusCode::OK, nested.as_bytes()).unwrap_err();
            assert!(err.message.contains("recursion limit"), "{}", err.message);
        }
    }

    #[test]
    fn token_url_follows_api_url() {
        let default = ClientConfig::new(DEFAULT_API_URL).unwrap();
        assert_eq!(default.resolved_token_url().as_str(), DEFAULT_TOKEN_URL);
        let sim = ClientConfig::new("http://127.0.0.1:7990").unwrap();
        assert_eq!(
            sim.resolved_token_url().as_str(),
            "http://127.0.0.1:7990/site/oauth2/access_token"
        );
    }
}
