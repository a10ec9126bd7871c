//! HTTP server: one fallback handler that routes on decoded path segments,
//! so Bitbucket's URL forms (`{uuid}` workspaces, `/1.0` aliases, HTML 404s)
//! are all under our control and no input can panic a handler.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use axum::body::{Body, to_bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::response::Response;
use serde::Serialize;
use serde_json::{Map, Value, json};

use super::SimConfig;
use super::auth::{Auth, Principal};
use super::limits::{RateLimiter, fault_for, retry_after_secs};
use super::org::{Organisation, Permission, rank, rank_name};
use super::paging::{Bbql, FieldSpec, Query, apply_fields, paginate, param};

/// Request counters, see [`super::SimulatorHandle::stats`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct RequestStats {
    /// Every request received.
    pub total: u64,
    /// Requests per endpoint class (`user`, `members`, `groups-1.0`, …).
    pub by_class: BTreeMap<String, u64>,
    /// Responses per HTTP status.
    pub by_status: BTreeMap<u16, u64>,
    /// Requests answered 429.
    pub rate_limited: u64,
    /// Requests answered with an injected 5xx.
    pub injected_faults: u64,
}

/// A Bitbucket error, rendered as the 2.0 JSON envelope.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: u16,
    pub message: String,
    pub detail: Option<String>,
    pub fields: Option<Value>,
    pub data: Option<Value>,
}

impl ApiError {
    pub fn new(status: u16, message: &str) -> ApiError {
        ApiError {
            status,
            message: message.to_string(),
            detail: None,
            fields: None,
            data: None,
        }
    }
    pub fn bad_request(message: &str) -> ApiError {
        ApiError::new(400, message)
    }
    fn not_found(message: &str) -> ApiError {
        ApiError::new(404, message)
    }
    fn forbidden(message: &str) -> ApiError {
        ApiError::new(403, message)
    }
    fn body(&self) -> Value {
        let mut e = Map::new();
        e.insert("message".into(), json!(self.message));
        if let Some(d) = &self.detail {
            e.insert("detail".into(), json!(d));
        }
        if let Some(f) = &self.fields {
            e.insert("fields".into(), f.clone());
        }
        if let Some(d) = &self.data {
            e.insert("data".into(), d.clone());
        }
        json!({"type": "error", "error": Value::Object(e)})
    }
}

/// Ground truth plus lookup maps. Writes only touch permissions and group
/// membership, so the maps never go stale.
pub struct OrgState {
    pub org: Organisation,
    user_by_uuid: HashMap<String, usize>,
    user_by_account: HashMap<String, usize>,
    user_by_nick: HashMap<String, usize>,
    ws_by_slug: HashMap<String, usize>,
    ws_by_uuid: HashMap<String, usize>,
    ws: Vec<WsIndex>,
    generation: u64,
}

struct WsIndex {
    /// user idx -> owner
    members: HashMap<usize, bool>,
    /// member user indices in listing order
    member_order: Vec<usize>,
    groups: HashMap<String, usize>,
    projects: HashMap<String, usize>,
    repos: HashMap<String, usize>,
    repos_by_uuid: HashMap<String, usize>,
}

impl OrgState {
    pub fn new(org: Organisation) -> OrgState {
        let mut user_by_uuid = HashMap::new();
        let mut user_by_account = HashMap::new();
        let mut user_by_nick = HashMap::new();
        for (i, u) in org.users.iter().enumerate() {
            user_by_uuid.insert(u.uuid.clone(), i);
            user_by_account.insert(u.account_id.clone(), i);
            user_by_nick.insert(u.nickname.clone(), i);
        }
        let mut ws_by_slug = HashMap::new();
        let mut ws_by_uuid = HashMap::new();
        let mut ws = Vec::new();
        for (w, wsp) in org.workspaces.iter().enumerate() {
            ws_by_slug.insert(wsp.slug.clone(), w);
            ws_by_uuid.insert(wsp.uuid.clone(), w);
            let mut members = HashMap::new();
            let mut member_order = Vec::new();
            for m in &wsp.members {
                if let Some(&u) = user_by_uuid.get(&m.user_uuid) {
                    members.insert(u, m.owner);
                    member_order.push(u);
                }
            }
            ws.push(WsIndex {
                members,
                member_order,
                groups: wsp
                    .groups
                    .iter()
                    .enumerate()
                    .map(|(i, g)| (g.slug.clone(), i))
                    .collect(),
                projects: wsp
                    .projects
                    .iter()
                    .enumerate()
                    .map(|(i, p)| (p.key.clone(), i))
                    .collect(),
                repos: wsp
                    .repositories
                    .iter()
                    .enumerate()
                    .map(|(i, r)| (r.slug.clone(), i))
                    .collect(),
                repos_by_uuid: wsp
                    .repositories
                    .iter()
                    .enumerate()
                    .map(|(i, r)| (r.uuid.clone(), i))
                    .collect(),
            });
        }
        OrgState {
            org,
            user_by_uuid,
            user_by_account,
            user_by_nick,
            ws_by_slug,
            ws_by_uuid,
            ws,
            generation: 0,
        }
    }

    fn workspace(&self, id: &str) -> Option<usize> {
        if id.starts_with('{') {
            self.ws_by_uuid.get(id).copied()
        } else {
            self.ws_by_slug.get(id).copied()
        }
    }

    /// A user by UUID or account id (and nickname when `by_nick`).
    fn user(&self, id: &str, by_nick: bool) -> Option<usize> {
        self.user_by_uuid
            .get(id)
            .or_else(|| self.user_by_account.get(id))
            .or_else(|| by_nick.then(|| self.user_by_nick.get(id)).flatten())
            .copied()
    }

    fn repo(&self, w: usize, id: &str) -> Option<usize> {
        if id.starts_with('{') {
            self.ws[w].repos_by_uuid.get(id).copied()
        } else {
            self.ws[w].repos.get(id).copied()
        }
    }

    /// Effective repository permissions of a workspace: `(repo, user, rank)`
    /// sorted by repository order then user order. See the module docs.
    fn effective(&self, w: usize) -> Vec<(usize, usize, u8)> {
        let wsp = &self.org.workspaces[w];
        let idx = &self.ws[w];
        let mut out = Vec::new();
        for (ri, repo) in wsp.repositories.iter().enumerate() {
            let mut m: BTreeMap<usize, u8> = BTreeMap::new();
            let mut add_users = |perms: &[Permission]| {
                for p in perms {
                    let r = rank(&p.permission);
                    if let (true, Some(&u)) = (r > 0, self.user_by_uuid.get(&p.principal)) {
                        let e = m.entry(u).or_insert(0);
                        *e = (*e).max(r);
                    }
                }
            };
            add_users(&repo.user_permissions);
            let project = idx.projects.get(&repo.project_key).map(|&p| &wsp.projects[p]);
            if let Some(p) = project {
                add_users(&p.user_permissions);
            }
            let group_perms = repo
                .group_permissions
                .iter()
                .chain(project.into_iter().flat_map(|p| p.group_permissions.iter()));
            for gp in group_perms {
                let r = rank(&gp.permission);
                let Some(&g) = idx.groups.get(&gp.principal) else {
                    continue;
                };
                if r == 0 {
                    continue;
                }
                for uu in &wsp.groups[g].members {
                    if let Some(&u) = self.user_by_uuid.get(uu) {
                        let e = m.entry(u).or_insert(0);
                        *e = (*e).max(r);
                    }
                }
            }
            out.extend(m.into_iter().map(|(u, r)| (ri, u, r)));
        }
        out
    }
}

/// `(repository, user, rank)` triples of a workspace.
type Effective = Arc<Vec<(usize, usize, u8)>>;

/// Shared server state.
pub struct App {
    pub base_url: String,
    pub seed: u64,
    pub max_pagelen: usize,
    pub latency: std::time::Duration,
    pub state: RwLock<OrgState>,
    pub auth: Auth,
    pub limiter: Option<RateLimiter>,
    pub fail_rate_bits: AtomicU64,
    pub counter: AtomicU64,
    pub stats: Mutex<RequestStats>,
    effective_cache: Mutex<HashMap<usize, (u64, Effective)>>,
    pseudo_user: Value,
}

impl App {
    pub fn new(config: &SimConfig, base_url: String, org: Organisation, auth: Auth) -> App {
        let pseudo_uuid = {
            use rand::SeedableRng;
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(config.seed ^ 0xacce55);
            super::org::random_uuid(&mut rng)
        };
        App {
            pseudo_user: json!({
                "type": "user",
                "uuid": pseudo_uuid,
                "display_name": "Simulator access token",
                "nickname": "access-token",
                "account_status": "active",
                "links": {"avatar": {"href": "https://bitbucket.org/account/avatar/access-token"}},
            }),
            base_url,
            seed: config.seed,
            max_pagelen: config.max_pagelen.max(1),
            latency: config.latency,
            state: RwLock::new(OrgState::new(org)),
            auth,
            limiter: config.rate_limit.map(RateLimiter::new),
            fail_rate_bits: AtomicU64::new(config.fail_rate.to_bits()),
            counter: AtomicU64::new(0),
            stats: Mutex::new(RequestStats::default()),
            effective_cache: Mutex::new(HashMap::new()),
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, OrgState> {
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, OrgState> {
        self.state.write().unwrap_or_else(|e| e.into_inner())
    }

    fn effective(&self, st: &OrgState, w: usize) -> Effective {
        let mut cache = self.effective_cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((g, v)) = cache.get(&w)
            && *g == st.generation
        {
            return v.clone();
        }
        let v = Arc::new(st.effective(w));
        cache.insert(w, (st.generation, v.clone()));
        v
    }

    fn record(&self, class: &str, status: u16) {
        let mut s = self.stats.lock().unwrap_or_else(|e| e.into_inner());
        s.total += 1;
        *s.by_class.entry(class.to_string()).or_default() += 1;
        *s.by_status.entry(status).or_default() += 1;
        if status == 429 {
            s.rate_limited += 1;
        }
    }
}

/// Parsed route. Workspace, repository and user ids are decoded segments.
#[derive(Debug, Clone)]
enum Route {
    OAuthToken,
    User,
    UserById(String),
    UserWorkspaces,
    UserWorkspacePermission(String),
    WorkspacesRetired,
    /// Other CHANGE-2770 retirements: `/2.0/user/permissions/{workspaces,repositories}`
    /// and the cross-workspace `/2.0/repositories`.
    Retired,
    Workspace(String),
    Members(String),
    Member(String, String),
    WsPermissions(String),
    EffectiveRepos(String, Option<String>),
    Projects(String),
    Project(String, String),
    ProjectPerms(String, String, Kind, Option<String>),
    Repos(String),
    Repo(String, String),
    RepoPerms(String, String, Kind, Option<String>),
    Groups10(String),
    /// `GET /1.0/groups?group={ws}/{slug}` (repeatable).
    Groups10Filter,
    Group10Members(String, String),
    Group10Member(String, String, String),
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Users,
    Groups,
}

impl Route {
    fn class(&self) -> &'static str {
        match self {
            Route::OAuthToken => "oauth",
            Route::User | Route::UserById(_) => "user",
            Route::UserWorkspaces | Route::UserWorkspacePermission(_) => "user-workspaces",
            Route::WorkspacesRetired | Route::Workspace(_) => "workspace",
            Route::Retired => "retired",
            Route::Members(_) | Route::Member(..) => "members",
            Route::WsPermissions(_) => "workspace-permissions",
            Route::EffectiveRepos(..) => "repository-permissions-effective",
            Route::Projects(_) | Route::Project(..) => "projects",
            Route::ProjectPerms(..) => "project-permissions",
            Route::Repos(_) | Route::Repo(..) => "repositories",
            Route::RepoPerms(..) => "repository-permissions",
            Route::Groups10(_) | Route::Groups10Filter | Route::Group10Members(..) | Route::Group10Member(..) => {
                "groups-1.0"
            }
        }
    }

    fn parse(segs: &[String]) -> Option<Route> {
        let s: Vec<&str> = segs.iter().map(String::as_str).collect();
        let o = |x: &str| x.to_string();
        let kind = |k: &str| match k {
            "users" => Some(Kind::Users),
            "groups" => Some(Kind::Groups),
            _ => None,
        };
        Some(match s.as_slice() {
            ["site", "oauth2", "access_token"] => Route::OAuthToken,
            ["2.0", "user"] => Route::User,
            ["2.0", "users", id] => Route::UserById(o(id)),
            ["2.0", "user", "workspaces"] => Route::UserWorkspaces,
            ["2.0", "user", "workspaces", ws, "permission"] => Route::UserWorkspacePermission(o(ws)),
            ["2.0", "workspaces"] => Route::WorkspacesRetired,
            ["2.0", "user", "permissions", "workspaces" | "repositories"] | ["2.0", "repositories"] => Route::Retired,
            ["2.0", "workspaces", ws] => Route::Workspace(o(ws)),
            ["2.0", "workspaces", ws, "members"] => Route::Members(o(ws)),
            ["2.0", "workspaces", ws, "members", m] => Route::Member(o(ws), o(m)),
            ["2.0", "workspaces", ws, "permissions"] => Route::WsPermissions(o(ws)),
            ["2.0", "workspaces", ws, "permissions", "repositories"] => Route::EffectiveRepos(o(ws), None),
            ["2.0", "workspaces", ws, "permissions", "repositories", r] => Route::EffectiveRepos(o(ws), Some(o(r))),
            ["2.0", "workspaces", ws, "projects"] => Route::Projects(o(ws)),
            ["2.0", "workspaces", ws, "projects", k] => Route::Project(o(ws), o(k)),
            ["2.0" | "1.0", "workspaces", ws, "projects", k, "permissions-config", kd] => {
                Route::ProjectPerms(o(ws), o(k), kind(kd)?, None)
            }
            [
                "2.0" | "1.0",
                "workspaces",
                ws,
                "projects",
                k,
                "permissions-config",
                kd,
                id,
            ] => Route::ProjectPerms(o(ws), o(k), kind(kd)?, Some(o(id))),
            ["2.0", "repositories", ws] => Route::Repos(o(ws)),
            ["2.0", "repositories", ws, r] => Route::Repo(o(ws), o(r)),
            ["2.0", "repositories", ws, r, "permissions-config", kd] => Route::RepoPerms(o(ws), o(r), kind(kd)?, None),
            ["2.0", "repositories", ws, r, "permissions-config", kd, id] => {
                Route::RepoPerms(o(ws), o(r), kind(kd)?, Some(o(id)))
            }
            ["1.0", "groups"] => Route::Groups10Filter,
            ["1.0", "groups", ws] => Route::Groups10(o(ws)),
            ["1.0", "groups", ws, g, "members"] => Route::Group10Members(o(ws), o(g)),
            ["1.0", "groups", ws, g, "members", m] => Route::Group10Member(o(ws), o(g), o(m)),
            _ => return None,
        })
    }
}

/// Per-request context.
struct Ctx<'a> {
    /// `http://host:port` as the client addressed us (for `next` links).
    origin: String,
    method: Method,
    path: String,
    query: Query,
    principal: Principal,
    body: &'a [u8],
}

type Reply = Result<(u16, Value, Vec<&'static str>), ApiError>;

fn ok(v: Value) -> Reply {
    Ok((200, v, Vec::new()))
}

pub async fn handle(State(app): State<Arc<App>>, req: Request) -> Response {
    if !app.latency.is_zero() {
        tokio::time::sleep(app.latency).await;
    }
    let n = app.counter.fetch_add(1, Ordering::Relaxed);
    let (parts, body) = req.into_parts();
    let raw_path = parts.uri.path().to_string();
    let segs: Vec<String> = raw_path
        .split('/')
        .filter(|s| !s.is_empty())
        .map(|s| {
            urlencoding::decode(s)
                .map(|c| c.into_owned())
                .unwrap_or_else(|_| s.to_string())
        })
        .collect();
    let query: Query = url::form_urlencoded::parse(parts.uri.query().unwrap_or("").as_bytes())
        .into_owned()
        .collect();
    let Some(route) = Route::parse(&segs) else {
        app.record("unknown", 404);
        return html_404();
    };
    let class = route.class();
    let authorization = parts
        .headers
        .get(header::AUTHORIZATION)
        .and_then(|h| h.to_str().ok())
        .map(str::to_string);
    let body = match to_bytes(body, 1 << 20).await {
        Ok(b) => b,
        Err(_) => {
            let e = ApiError::bad_request("Request body too large or unreadable");
            app.record(class, e.status);
            return json_response(e.status, &e.body());
        }
    };

    let response = {
        let fail_rate = f64::from_bits(app.fail_rate_bits.load(Ordering::Relaxed));
        if let Some(status) = fault_for(app.seed, n, fail_rate) {
            app.stats.lock().unwrap_or_else(|e| e.into_inner()).injected_faults += 1;
            let msg = match status {
                500 => "Something went wrong",
                502 => "Bad gateway",
                _ => "Service unavailable",
            };
            let e = ApiError::new(status, msg);
            json_response(status, &e.body())
        } else if let Route::OAuthToken = route {
            if parts.method != Method::POST {
                let e = ApiError::new(405, "Method not allowed");
                json_response(405, &e.body())
            } else {
                let form: Vec<(String, String)> = url::form_urlencoded::parse(&body).into_owned().collect();
                let (status, v) = app.auth.token_endpoint(authorization.as_deref(), &form);
                json_response(status, &v)
            }
        } else {
            match app.auth.authenticate(authorization.as_deref()) {
                Err(e) => {
                    let mut r = json_response(401, &ApiError::new(401, e.0).body());
                    r.headers_mut().insert(
                        header::WWW_AUTHENTICATE,
                        HeaderValue::from_static("Basic realm=\"Bitbucket.org HTTP\""),
                    );
                    r
                }
                Ok((principal, key)) => {
                    let limited = app.limiter.as_ref().and_then(|l| l.check(&key, Instant::now()).err());
                    if let Some(wait) = limited {
                        let e = ApiError::new(429, "Rate limit for this resource has been exceeded.");
                        let mut r = json_response(429, &e.body());
                        r.headers_mut()
                            .insert(header::RETRY_AFTER, HeaderValue::from(retry_after_secs(wait)));
                        r
                    } else {
                        let origin = parts
                            .headers
                            .get(header::HOST)
                            .and_then(|h| h.to_str().ok())
                            .filter(|h| {
                                !h.is_empty() && h.chars().all(|c| c.is_ascii_alphanumeric() || ".-:[]".contains(c))
                            })
                            .map(|h| format!("http://{h}"))
                            .unwrap_or_else(|| app.base_url.clone());
                        let ctx = Ctx {
                            origin,
                            method: parts.method.clone(),
                            path: raw_path.clone(),
                            query,
                            principal,
                            body: &body,
                        };
                        match dispatch(&app, &route, &ctx) {
                            Ok((204, _, _)) => empty_response(204),
                            Ok((status, v, hidden)) => {
                                let v = match param(&ctx.query, "fields") {
                                    Some(f) => apply_fields(v, &FieldSpec::parse(f), &hidden),
                                    None => apply_fields(v, &FieldSpec::default(), &hidden),
                                };
                                json_response(status, &v)
                            }
                            Err(e) => json_response(e.status, &e.body()),
                        }
                    }
                }
            }
        }
    };
    app.record(class, response.status().as_u16());
    response
}

fn json_response(status: u16, v: &Value) -> Response {
    let mut r = Response::new(Body::from(serde_json::to_vec(v).unwrap_or_default()));
    *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=utf-8"),
    );
    r
}

fn empty_response(status: u16) -> Response {
    let mut r = Response::new(Body::empty());
    *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::NO_CONTENT);
    r
}

fn html_404() -> Response {
    let mut r = Response::new(Body::from(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><title>Bitbucket</title></head>\
         <body><h1>Resource not found</h1><p>You may not have access to this page, \
         or it doesn't exist.</p></body></html>\n",
    ));
    *r.status_mut() = StatusCode::NOT_FOUND;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    r
}

// ---------------------------------------------------------------------------
// Rendering helpers

fn enc(s: &str) -> String {
    urlencoding::encode(s).into_owned()
}

fn link(href: String) -> Value {
    json!({ "href": href })
}

/// A deterministic timestamp between 2018 and 2025 derived from an id.
fn timestamp(id: &str, offset_days: u64) -> String {
    let h = id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    });
    let secs = 1_514_764_800 + (h % (8 * 365 * 86_400)) + offset_days * 86_400;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil-from-days (Howard Hinnant).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:06}+00:00",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        h % 1_000_000
    )
}

impl App {
    fn user_json(&self, st: &OrgState, u: usize, with_email: bool) -> Value {
        let user = &st.org.users[u];
        let mut v = json!({
            "type": "user",
            "uuid": user.uuid,
            "account_id": user.account_id,
            "nickname": user.nickname,
            "display_name": user.display_name,
            "account_status": if user.active { "active" } else { "inactive" },
            "links": {
                "self": link(format!("{}/2.0/users/{}", self.base_url, enc(&user.uuid))),
                "avatar": link(format!("https://avatar-management.services.atlassian.com/{}/128", user.account_id)),
                "html": link(format!("https://bitbucket.org/{}/", enc(&user.uuid))),
            },
        });
        if with_email {
            v["email"] = json!(user.email);
        }
        v
    }

    fn workspace_short(&self, st: &OrgState, w: usize) -> Value {
        let ws = &st.org.workspaces[w];
        json!({
            "type": "workspace",
            "uuid": ws.uuid,
            "slug": ws.slug,
            "name": ws.name,
            "links": {
                "avatar": link(format!("https://bitbucket.org/workspaces/{}/avatar/", ws.slug)),
                "html": link(format!("https://bitbucket.org/{}/", ws.slug)),
                "self": link(format!("{}/2.0/workspaces/{}", self.base_url, ws.slug)),
            },
        })
    }

    fn workspace_full(&self, st: &OrgState, w: usize) -> Value {
        let ws = &st.org.workspaces[w];
        let b = format!("{}/2.0", self.base_url);
        json!({
            "type": "workspace",
            "uuid": ws.uuid,
            "name": ws.name,
            "slug": ws.slug,
            "is_private": ws.is_private,
            "is_privacy_enforced": false,
            "forking_mode": "allow_forks",
            "created_on": timestamp(&ws.uuid, 0),
            "updated_on": timestamp(&ws.uuid, 30),
            "links": {
                "avatar": link(format!("https://bitbucket.org/workspaces/{}/avatar/", ws.slug)),
                "html": link(format!("https://bitbucket.org/{}/", ws.slug)),
                "members": link(format!("{b}/workspaces/{}/members", ws.slug)),
                "owners": link(format!("{b}/workspaces/{}/members?q=permission%3D%22owner%22", ws.slug)),
                "projects": link(format!("{b}/workspaces/{}/projects", ws.slug)),
                "repositories": link(format!("{b}/repositories/{}", ws.slug)),
                "snippets": link(format!("{b}/snippets/{}", ws.slug)),
                "self": link(format!("{b}/workspaces/{}", ws.slug)),
            },
        })
    }

    /// The workspace as an account (`team`), used as project/repo owner.
    fn team_json(&self, st: &OrgState, w: usize) -> Value {
        let ws = &st.org.workspaces[w];
        json!({
            "type": "team",
            "uuid": ws.uuid,
            "username": ws.slug,
            "display_name": ws.name,
            "links": {
                "self": link(format!("{}/2.0/workspaces/{}", self.base_url, enc(&ws.uuid))),
                "html": link(format!("https://bitbucket.org/{}/", enc(&ws.uuid))),
                "avatar": link(format!("https://bitbucket.org/account/{}/avatar/", ws.slug)),
            },
        })
    }

    fn membership_json(&self, st: &OrgState, w: usize, u: usize, permission: bool) -> Value {
        let ws = &st.org.workspaces[w];
        let user = &st.org.users[u];
        let mut v = json!({
            "type": "workspace_membership",
            "user": self.user_json(st, u, true),
            "workspace": self.workspace_short(st, w),
            "links": {"self": link(format!("{}/2.0/workspaces/{}/members/{}", self.base_url, ws.slug, enc(&user.uuid)))},
        });
        if permission {
            let owner = st.ws[w].members.get(&u).copied().unwrap_or(false);
            v["permission"] = json!(if owner { "owner" } else { "member" });
            v["added_on"] = json!(timestamp(&user.uuid, 1));
            v["last_accessed"] = json!(timestamp(&user.uuid, 400));
        }
        v
    }

    fn project_short(&self, st: &OrgState, w: usize, p: usize) -> Value {
        let ws = &st.org.workspaces[w];
        let pr = &ws.projects[p];
        json!({
            "type": "project",
            "key": pr.key,
            "uuid": pr.uuid,
            "name": pr.name,
            "links": {
                "html": link(format!("https://bitbucket.org/{}/workspace/projects/{}", ws.slug, pr.key)),
                "avatar": link(format!("https://bitbucket.org/{}/workspace/projects/{}/avatar/32", ws.slug, pr.key)),
            },
        })
    }

    fn project_json(&self, st: &OrgState, w: usize, p: usize) -> Value {
        let ws = &st.org.workspaces[w];
        let pr = &ws.projects[p];
        let public_repos = ws.repositories.iter().any(|r| r.project_key == pr.key && !r.is_private);
        let mut v = self.project_short(st, w, p);
        let o = v.as_object_mut().expect("object");
        o.insert(
            "description".into(),
            json!(format!("{} projects of {}", pr.name, ws.name)),
        );
        o.insert("is_private".into(), json!(!public_repos));
        o.insert("has_publicly_visible_repos".into(), json!(public_repos));
        o.insert("created_on".into(), json!(timestamp(&pr.uuid, 0)));
        o.insert("updated_on".into(), json!(timestamp(&pr.uuid, 10)));
        o.insert("owner".into(), self.team_json(st, w));
        v
    }

    fn repo_short(&self, st: &OrgState, w: usize, r: usize) -> Value {
        let ws = &st.org.workspaces[w];
        let repo = &ws.repositories[r];
        json!({
            "type": "repository",
            "name": repo.name,
            "full_name": format!("{}/{}", ws.slug, repo.slug),
            "uuid": repo.uuid,
            "links": {
                "self": link(format!("{}/2.0/repositories/{}/{}", self.base_url, ws.slug, repo.slug)),
                "html": link(format!("https://bitbucket.org/{}/{}", ws.slug, repo.slug)),
                "avatar": link(format!("https://bytebucket.org/ravatar/{}?ts=default", enc(&repo.uuid))),
            },
        })
    }

    fn repo_json(&self, st: &OrgState, w: usize, r: usize) -> Value {
        let ws = &st.org.workspaces[w];
        let repo = &ws.repositories[r];
        let p = st.ws[w].projects.get(&repo.project_key).copied().unwrap_or(0);
        let b = format!("{}/2.0/repositories/{}/{}", self.base_url, ws.slug, repo.slug);
        json!({
            "type": "repository",
            "uuid": repo.uuid,
            "full_name": format!("{}/{}", ws.slug, repo.slug),
            "name": repo.name,
            "slug": repo.slug,
            "description": "",
            "scm": "git",
            "is_private": repo.is_private,
            "fork_policy": if repo.is_private { "no_public_forks" } else { "allow_forks" },
            "language": "rust",
            "has_issues": false,
            "has_wiki": false,
            "size": 1024 * (r as u64 + 1),
            "created_on": timestamp(&repo.uuid, 0),
            "updated_on": timestamp(&repo.uuid, 20),
            "mainbranch": {"type": "branch", "name": "main"},
            "owner": self.team_json(st, w),
            "workspace": self.workspace_short(st, w),
            "project": self.project_short(st, w, p),
            "links": {
                "self": link(b.clone()),
                "html": link(format!("https://bitbucket.org/{}/{}", ws.slug, repo.slug)),
                "avatar": link(format!("https://bytebucket.org/ravatar/{}?ts=default", enc(&repo.uuid))),
                "pullrequests": link(format!("{b}/pullrequests")),
                "commits": link(format!("{b}/commits")),
                "forks": link(format!("{b}/forks")),
                "watchers": link(format!("{b}/watchers")),
                "downloads": link(format!("{b}/downloads")),
                "hooks": link(format!("{b}/hooks")),
                "clone": [
                    {"name": "https", "href": format!("https://bitbucket.org/{}/{}.git", ws.slug, repo.slug)},
                    {"name": "ssh", "href": format!("ssh://git@bitbucket.org/{}/{}.git", ws.slug, repo.slug)},
                ],
            },
        })
    }

    fn group_json(&self, st: &OrgState, w: usize, g: usize) -> Value {
        let ws = &st.org.workspaces[w];
        let gr = &ws.groups[g];
        json!({
            "type": "group",
            "name": gr.name,
            "slug": gr.slug,
            "full_slug": format!("{}:{}", ws.slug, gr.slug),
        })
    }

    /// A 1.0 member object.
    fn member10_json(&self, st: &OrgState, u: usize) -> Value {
        let user = &st.org.users[u];
        json!({
            "display_name": user.display_name,
            "account_id": user.account_id,
            "uuid": user.uuid,
            "nickname": user.nickname,
            "is_team": false,
            "is_staff": false,
            "is_active": user.active,
            "avatar": format!("https://avatar-management.services.atlassian.com/{}/128", user.account_id),
            "resource_uri": format!("/1.0/users/{}", enc(&user.uuid)),
        })
    }

    fn group10_json(&self, st: &OrgState, w: usize, g: usize) -> Value {
        let ws = &st.org.workspaces[w];
        let gr = &ws.groups[g];
        let members: Vec<Value> = gr
            .members
            .iter()
            .filter_map(|uu| st.user_by_uuid.get(uu))
            .map(|&u| self.member10_json(st, u))
            .collect();
        json!({
            "name": gr.name,
            "slug": gr.slug,
            "permission": gr.permission,
            "auto_add": false,
            "email_forwarding_disabled": false,
            "owner": {
                "display_name": ws.name,
                "uuid": ws.uuid,
                "nickname": ws.slug,
                "username": ws.slug,
                "is_team": true,
                "is_staff": false,
                "is_active": true,
                "avatar": format!("https://bitbucket.org/account/{}/avatar/32/", ws.slug),
                "resource_uri": format!("/1.0/users/{}", ws.slug),
            },
            "members": members,
        })
    }

    fn self_url(&self, ctx: &Ctx) -> String {
        format!("{}{}", ctx.origin, ctx.path)
    }

    /// Paginates `n` items rendered on demand; with `q=`, renders all, then
    /// filters. `filter_view` maps an item to the value `q` is evaluated on.
    fn list(
        &self,
        ctx: &Ctx,
        n: usize,
        render: impl Fn(usize) -> Value,
        filter_view: Option<&dyn Fn(&Value) -> Value>,
    ) -> Result<Value, ApiError> {
        let url = self.self_url(ctx);
        let q = param(&ctx.query, "q").filter(|q| !q.trim().is_empty());
        let sort = param(&ctx.query, "sort").filter(|s| !s.trim().is_empty());
        if q.is_some() || sort.is_some() {
            let bbql = q.map(Bbql::parse).transpose()?;
            let view = |v: &Value| match filter_view {
                Some(f) => f(v),
                None => v.clone(),
            };
            let mut items: Vec<(Value, Value)> = (0..n)
                .map(&render)
                .map(|v| (view(&v), v))
                .filter(|(view, _)| bbql.as_ref().is_none_or(|b| b.matches(view)))
                .collect();
            if let Some(sort) = sort {
                let (desc, field) = match sort.trim().strip_prefix('-') {
                    Some(f) => (true, f),
                    None => (false, sort.trim()),
                };
                items.sort_by(|a, b| {
                    let o = compare_at(&a.0, &b.0, field);
                    if desc { o.reverse() } else { o }
                });
            }
            let items = items.into_iter().map(|(_, v)| v).collect();
            return paginate(items, &ctx.query, &url, self.max_pagelen);
        }
        // Validate paging on the count, then render only one page.
        let placeholders: Vec<Value> = (0..n).map(|i| json!(i)).collect();
        let mut page = paginate(placeholders, &ctx.query, &url, self.max_pagelen)?;
        if let Some(values) = page.get_mut("values").and_then(Value::as_array_mut) {
            for v in values.iter_mut() {
                let i = v.as_u64().unwrap_or(0) as usize;
                *v = render(i);
            }
        }
        Ok(page)
    }
}

/// Orders two values by the dotted `field` (numbers numerically, strings
/// lexically; absent values first).
fn compare_at(a: &Value, b: &Value, field: &str) -> std::cmp::Ordering {
    let get = |v: &Value| {
        field
            .split('.')
            .try_fold(v, |cur, seg| cur.get(seg))
            .cloned()
            .unwrap_or(Value::Null)
    };
    match (get(a), get(b)) {
        (Value::Number(x), Value::Number(y)) => x.as_f64().unwrap_or(0.0).total_cmp(&y.as_f64().unwrap_or(0.0)),
        (Value::Null, Value::Null) => std::cmp::Ordering::Equal,
        (Value::Null, _) => std::cmp::Ordering::Less,
        (_, Value::Null) => std::cmp::Ordering::Greater,
        (x, y) => {
            let s = |v: Value| match v {
                Value::String(s) => s,
                other => other.to_string(),
            };
            s(x).cmp(&s(y))
        }
    }
}

/// Member listings filter only on these fields; `user.email IN (…)` takes at
/// most 90 addresses (API-CONTRACT 3a).
fn check_member_query(ctx: &Ctx, extra: &[&str]) -> Result<(), ApiError> {
    let Some(q) = param(&ctx.query, "q").filter(|q| !q.trim().is_empty()) else {
        return Ok(());
    };
    let allowed = ["user.email", "user.uuid", "user.account_id", "user.nickname"];
    for (field, n) in Bbql::parse(q)?.clauses() {
        if !allowed.contains(&field.as_str()) && !extra.contains(&field.as_str()) {
            return Err(ApiError::bad_request(&format!("'{field}' is not a filterable field")));
        }
        if field == "user.email" && n > 90 {
            return Err(ApiError::bad_request(
                "Too many email addresses: at most 90 can be queried at once",
            ));
        }
    }
    Ok(())
}

fn require(ctx: &Ctx, allowed: &[Method]) -> Result<(), ApiError> {
    if allowed.contains(&ctx.method) {
        Ok(())
    } else {
        Err(ApiError::new(405, &format!("Method {} not allowed", ctx.method)))
    }
}

fn deny_access_token(ctx: &Ctx) -> Result<(), ApiError> {
    if ctx.principal == Principal::AccessToken {
        Err(ApiError::forbidden(
            "Access tokens cannot query or manipulate repository, project or workspace permissions.",
        ))
    } else {
        Ok(())
    }
}

fn dispatch(app: &App, route: &Route, ctx: &Ctx) -> Reply {
    match route {
        Route::OAuthToken => Err(ApiError::new(405, "Method not allowed")),
        Route::User => {
            require(ctx, &[Method::GET])?;
            if ctx.principal == Principal::AccessToken {
                return ok(app.pseudo_user.clone());
            }
            let st = app.read();
            let admin = st.user_by_uuid.get(&app.auth.creds.admin_uuid).copied().unwrap_or(0);
            let mut v = app.user_json(&st, admin, false);
            v["created_on"] = json!(timestamp(&st.org.users[admin].uuid, 0));
            v["has_2fa_enabled"] = json!(true);
            v["is_staff"] = json!(false);
            ok(v)
        }
        Route::UserById(id) => {
            require(ctx, &[Method::GET])?;
            let st = app.read();
            let u = st
                .user(id, false)
                .ok_or_else(|| ApiError::not_found(&format!("User {id} not found")))?;
            ok(app.user_json(&st, u, false))
        }
        Route::WorkspacesRetired | Route::Retired => {
            require(ctx, &[Method::GET])?;
            let mut e = ApiError::new(410, "CHANGE-2770 - Functionality has been deprecated");
            e.detail = Some("Please read the changelog entry for more details.".into());
            e.data = Some(
                json!({"announcement_url": "https://developer.atlassian.com/cloud/bitbucket/changelog/#CHANGE-2770"}),
            );
            Err(e)
        }
        Route::UserWorkspaces => {
            require(ctx, &[Method::GET])?;
            let st = app.read();
            let admin_flag = ctx.principal != Principal::AccessToken;
            let filter = match param(&ctx.query, "administrator") {
                None => None,
                Some("true") => Some(true),
                Some("false") => Some(false),
                Some(_) => {
                    return Err(ApiError::bad_request("administrator must be true or false"));
                }
            };
            let mut order: Vec<usize> = (0..st.org.workspaces.len()).collect();
            // Only `slug` can be sorted on (API-CONTRACT 3a); `list` sorts.
            match param(&ctx.query, "sort") {
                None | Some("slug") | Some("-slug") => {}
                Some(other) => {
                    return Err(ApiError::bad_request(&format!("Invalid sort field: {other}")));
                }
            }
            order.sort_by(|a, b| st.org.workspaces[*a].slug.cmp(&st.org.workspaces[*b].slug));
            if let Some(f) = filter {
                order.retain(|_| admin_flag == f);
            }
            let render = |i: usize| {
                let ws = &st.org.workspaces[order[i]];
                json!({
                    "type": "workspace_access",
                    "administrator": admin_flag,
                    "workspace": {
                        "type": "workspace_base",
                        "uuid": ws.uuid,
                        "slug": ws.slug,
                        "links": {
                            "avatar": link(format!("https://bitbucket.org/workspaces/{}/avatar/", ws.slug)),
                            "self": link(format!("{}/2.0/workspaces/{}", app.base_url, ws.slug)),
                        },
                    },
                })
            };
            // `q` filters on workspace fields (`slug="x"`).
            let view = |v: &Value| {
                let mut f = v["workspace"].clone();
                f["workspace"] = v["workspace"].clone();
                f["administrator"] = v["administrator"].clone();
                f
            };
            ok(app.list(ctx, order.len(), render, Some(&view))?)
        }
        Route::UserWorkspacePermission(ws) => {
            require(ctx, &[Method::GET])?;
            let st = app.read();
            let w = st
                .workspace(ws)
                .ok_or_else(|| ApiError::forbidden("You do not have access to this workspace"))?;
            if ctx.principal == Principal::AccessToken {
                return ok(json!({
                    "type": "workspace_membership",
                    "permission": "member",
                    "user": app.pseudo_user,
                    "workspace": app.workspace_full(&st, w),
                }));
            }
            let admin = st.user_by_uuid.get(&app.auth.creds.admin_uuid).copied().unwrap_or(0);
            let mut v = app.membership_json(&st, w, admin, true);
            v["workspace"] = app.workspace_full(&st, w);
            Ok((200, v, vec!["user.email"]))
        }
        Route::Workspace(ws) => {
            require(ctx, &[Method::GET])?;
            let st = app.read();
            let w = ws_or_404(&st, ws)?;
            ok(app.workspace_full(&st, w))
        }
        Route::Members(ws) => {
            require(ctx, &[Method::GET])?;
            let st = app.read();
            let w = ws_or_404(&st, ws)?;
            check_member_query(ctx, &[])?;
            let order = &st.ws[w].member_order;
            let v = app.list(ctx, order.len(), |i| app.membership_json(&st, w, order[i], false), None)?;
            Ok((200, v, vec!["values.user.email"]))
        }
        Route::Member(ws, m) => {
            require(ctx, &[Method::GET])?;
            let st = app.read();
            let w = ws_or_404(&st, ws)?;
            let u = st
                .user(m, false)
                .filter(|u| st.ws[w].members.contains_key(u))
                .ok_or_else(|| ApiError::not_found(&format!("{m} is not a member of {ws}")))?;
            Ok((200, app.membership_json(&st, w, u, false), vec!["user.email"]))
        }
        Route::WsPermissions(ws) => {
            require(ctx, &[Method::GET])?;
            deny_access_token(ctx)?;
            let st = app.read();
            let w = ws_or_404(&st, ws)?;
            check_member_query(ctx, &["permission"])?;
            let order = &st.ws[w].member_order;
            let v = app.list(ctx, order.len(), |i| app.membership_json(&st, w, order[i], true), None)?;
            Ok((200, v, vec!["values.user.email"]))
        }
        Route::EffectiveRepos(ws, repo) => {
            require(ctx, &[Method::GET])?;
            deny_access_token(ctx)?;
            let st = app.read();
            let w = ws_or_404(&st, ws)?;
            let all = app.effective(&st, w);
            let entries: Vec<(usize, usize, u8)> = match repo {
                None => all.to_vec(),
                Some(slug) => {
                    let r = st
                        .repo(w, slug)
                        .ok_or_else(|| ApiError::not_found(&format!("Repository {ws}/{slug} not found")))?;
                    all.iter().copied().filter(|e| e.0 == r).collect()
                }
            };
            let render = |i: usize| {
                let (r, u, rk) = entries[i];
                json!({
                    "type": "repository_permission",
                    "permission": rank_name(rk),
                    "user": app.user_json(&st, u, false),
                    "repository": app.repo_short(&st, w, r),
                })
            };
            ok(app.list(ctx, entries.len(), render, None)?)
        }
        Route::Projects(ws) => {
            require(ctx, &[Method::GET])?;
            let st = app.read();
            let w = ws_or_404(&st, ws)?;
            let n = st.org.workspaces[w].projects.len();
            ok(app.list(ctx, n, |i| app.project_json(&st, w, i), None)?)
        }
        Route::Project(ws, key) => {
            require(ctx, &[Method::GET])?;
            let st = app.read();
            let w = ws_or_404(&st, ws)?;
            let p = project_or_404(&st, w, key)?;
            ok(app.project_json(&st, w, p))
        }
        Route::Repos(ws) => {
            require(ctx, &[Method::GET])?;
            let st = app.read();
            let w = ws_or_404(&st, ws)?;
            if let Some(role) = param(&ctx.query, "role")
                && !["member", "contributor", "admin", "owner"].contains(&role)
            {
                return Err(ApiError::bad_request(&format!("Invalid role: {role}")));
            }
            let n = st.org.workspaces[w].repositories.len();
            ok(app.list(ctx, n, |i| app.repo_json(&st, w, i), None)?)
        }
        Route::Repo(ws, slug) => {
            require(ctx, &[Method::GET])?;
            let st = app.read();
            let w = ws_or_404(&st, ws)?;
            let r = st
                .repo(w, slug)
                .ok_or_else(|| ApiError::not_found(&format!("Repository {ws}/{slug} not found")))?;
            ok(app.repo_json(&st, w, r))
        }
        Route::ProjectPerms(ws, key, kind, id) => {
            permissions_config(app, ctx, ws, Target::Project(key), *kind, id.as_deref())
        }
        Route::RepoPerms(ws, slug, kind, id) => {
            permissions_config(app, ctx, ws, Target::Repo(slug), *kind, id.as_deref())
        }
        Route::Groups10Filter => {
            require(ctx, &[Method::GET])?;
            deny_access_token(ctx)?;
            let st = app.read();
            let mut out = Vec::new();
            for (k, v) in &ctx.query {
                if k != "group" {
                    continue;
                }
                let Some((ws, g)) = v.split_once('/') else {
                    return Err(ApiError::bad_request("group must be {workspace}/{group_slug}"));
                };
                // Unknown workspaces or groups are skipped, like Bitbucket.
                let found = st
                    .workspace(ws)
                    .filter(|_| !ws.starts_with('{'))
                    .and_then(|w| st.ws[w].groups.get(g).map(|&gi| (w, gi)));
                if let Some((w, gi)) = found {
                    out.push(app.group10_json(&st, w, gi));
                }
            }
            ok(Value::Array(out))
        }
        Route::Groups10(ws) => {
            require(ctx, &[Method::GET])?;
            deny_access_token(ctx)?;
            let st = app.read();
            let w = ws10_or_404(&st, ws)?;
            let groups: Vec<Value> = (0..st.org.workspaces[w].groups.len())
                .map(|g| app.group10_json(&st, w, g))
                .collect();
            ok(Value::Array(groups))
        }
        Route::Group10Members(ws, g) => {
            require(ctx, &[Method::GET])?;
            deny_access_token(ctx)?;
            let st = app.read();
            let w = ws10_or_404(&st, ws)?;
            let gi = group_or_404(&st, w, g)?;
            let members: Vec<Value> = st.org.workspaces[w].groups[gi]
                .members
                .iter()
                .filter_map(|uu| st.user_by_uuid.get(uu))
                .map(|&u| app.member10_json(&st, u))
                .collect();
            ok(Value::Array(members))
        }
        Route::Group10Member(ws, g, m) => {
            require(ctx, &[Method::PUT, Method::DELETE])?;
            deny_access_token(ctx)?;
            let mut st = app.write();
            let w = ws10_or_404(&st, ws)?;
            let gi = group_or_404(&st, w, g)?;
            let u = st
                .user(m, false)
                .ok_or_else(|| ApiError::not_found(&format!("User {m} not found")))?;
            let uuid = st.org.users[u].uuid.clone();
            let is_member = st.org.workspaces[w].groups[gi].members.contains(&uuid);
            if ctx.method == Method::PUT {
                if !ctx.body.iter().all(u8::is_ascii_whitespace) {
                    serde_json::from_slice::<Value>(ctx.body)
                        .map_err(|_| ApiError::bad_request("Invalid JSON body"))?;
                }
                if !st.ws[w].members.contains_key(&u) {
                    return Err(ApiError::not_found(&format!("{m} is not a member of workspace {ws}")));
                }
                if is_member {
                    return Err(ApiError::new(409, &format!("{m} is already a member of group {g}")));
                }
                st.org.workspaces[w].groups[gi].members.push(uuid);
                st.generation += 1;
                ok(app.member10_json(&st, u))
            } else {
                if !is_member {
                    return Err(ApiError::not_found(&format!("{m} is not a member of group {g}")));
                }
                st.org.workspaces[w].groups[gi].members.retain(|x| *x != uuid);
                st.generation += 1;
                Ok((204, Value::Null, Vec::new()))
            }
        }
    }
}

fn ws_or_404(st: &OrgState, ws: &str) -> Result<usize, ApiError> {
    st.workspace(ws)
        .ok_or_else(|| ApiError::not_found(&format!("No workspace with identifier '{ws}'.")))
}

/// The 1.0 API needs the slug: `{uuid}` workspaces are not found.
fn ws10_or_404(st: &OrgState, ws: &str) -> Result<usize, ApiError> {
    if ws.starts_with('{') {
        return Err(ApiError::not_found(
            "The 1.0 groups API needs the workspace slug, not its UUID.",
        ));
    }
    ws_or_404(st, ws)
}

fn project_or_404(st: &OrgState, w: usize, key: &str) -> Result<usize, ApiError> {
    let by_key = st.ws[w].projects.get(key).copied();
    by_key
        .or_else(|| st.org.workspaces[w].projects.iter().position(|p| p.uuid == key))
        .ok_or_else(|| ApiError::not_found(&format!("Project {key} not found")))
}

fn group_or_404(st: &OrgState, w: usize, g: &str) -> Result<usize, ApiError> {
    st.ws[w]
        .groups
        .get(g)
        .copied()
        .ok_or_else(|| ApiError::not_found(&format!("Group {g} not found")))
}

/// A read guard for GETs, a write guard for PUT/DELETE.
enum Guard<'a> {
    Read(std::sync::RwLockReadGuard<'a, OrgState>),
    Write(std::sync::RwLockWriteGuard<'a, OrgState>),
}

impl std::ops::Deref for Guard<'_> {
    type Target = OrgState;
    fn deref(&self) -> &OrgState {
        match self {
            Guard::Read(g) => g,
            Guard::Write(g) => g,
        }
    }
}

impl Guard<'_> {
    fn get_mut(&mut self) -> Result<&mut OrgState, ApiError> {
        match self {
            Guard::Write(g) => Ok(g),
            Guard::Read(_) => Err(ApiError::new(500, "internal error: write under a read lock")),
        }
    }
}

enum Target<'a> {
    Project(&'a str),
    Repo(&'a str),
}

fn permissions_config(app: &App, ctx: &Ctx, ws: &str, target: Target, kind: Kind, id: Option<&str>) -> Reply {
    let writing = ctx.method == Method::PUT || ctx.method == Method::DELETE;
    if id.is_some() {
        require(ctx, &[Method::GET, Method::PUT, Method::DELETE])?;
    } else {
        require(ctx, &[Method::GET])?;
    }
    deny_access_token(ctx)?;
    if writing && ctx.principal == Principal::OAuth {
        return Err(ApiError::forbidden(
            "This API is only accessible with the following authentication types: api-token",
        ));
    }
    let is_project = matches!(target, Target::Project(_));
    let mut st = if writing {
        Guard::Write(app.write())
    } else {
        Guard::Read(app.read())
    };
    let w = ws_or_404(&st, ws)?;
    let (t, base) = match target {
        Target::Project(key) => {
            let p = project_or_404(&st, w, key)?;
            let pk = &st.org.workspaces[w].projects[p].key;
            (
                p,
                format!(
                    "{}/2.0/workspaces/{}/projects/{}/permissions-config",
                    app.base_url, st.org.workspaces[w].slug, pk
                ),
            )
        }
        Target::Repo(slug) => {
            let r = st
                .repo(w, slug)
                .ok_or_else(|| ApiError::not_found(&format!("Repository {ws}/{slug} not found")))?;
            let rs = &st.org.workspaces[w].repositories[r].slug;
            (
                r,
                format!(
                    "{}/2.0/repositories/{}/{}/permissions-config",
                    app.base_url, st.org.workspaces[w].slug, rs
                ),
            )
        }
    };
    let type_name = match (is_project, kind) {
        (true, Kind::Users) => "project_user_permission",
        (true, Kind::Groups) => "project_group_permission",
        (false, Kind::Users) => "repository_user_permission",
        (false, Kind::Groups) => "repository_group_permission",
    };
    let render = |st: &OrgState, perm: &Permission| -> Value {
        let mut v = json!({"type": type_name, "permission": perm.permission});
        match kind {
            Kind::Users => {
                let u = st.user_by_uuid.get(&perm.principal).copied().unwrap_or(0);
                v["user"] = app.user_json(st, u, false);
                v["links"] = json!({"self": link(format!("{base}/users/{}", enc(&perm.principal)))});
            }
            Kind::Groups => {
                let g = st.ws[w].groups.get(&perm.principal).copied().unwrap_or(0);
                v["group"] = app.group_json(st, w, g);
                v["links"] = json!({"self": link(format!("{base}/groups/{}", enc(&perm.principal)))});
            }
        }
        if is_project {
            v["project"] = app.project_short(st, w, t);
        } else {
            v["repository"] = app.repo_short(st, w, t);
        }
        v
    };
    let perms = |st: &OrgState| -> Vec<Permission> {
        let wsp = &st.org.workspaces[w];
        match (is_project, kind) {
            (true, Kind::Users) => wsp.projects[t].user_permissions.clone(),
            (true, Kind::Groups) => wsp.projects[t].group_permissions.clone(),
            (false, Kind::Users) => wsp.repositories[t].user_permissions.clone(),
            (false, Kind::Groups) => wsp.repositories[t].group_permissions.clone(),
        }
    };

    let Some(id) = id else {
        if param(&ctx.query, "q").is_some() {
            return Err(ApiError::bad_request("This endpoint does not support BBQL filtering"));
        }
        let list = perms(&st);
        let url = app.self_url(ctx);
        let items: Vec<Value> = (0..list.len()).map(|i| json!(i)).collect();
        let mut page = paginate(items, &ctx.query, &url, app.max_pagelen)?;
        if let Some(values) = page.get_mut("values").and_then(Value::as_array_mut) {
            for v in values.iter_mut() {
                let i = v.as_u64().unwrap_or(0) as usize;
                *v = render(&st, &list[i]);
            }
        }
        return ok(page);
    };

    // Resolve the principal.
    let principal = match kind {
        Kind::Users => {
            let u = st
                .user(id, is_project)
                .ok_or_else(|| ApiError::not_found(&format!("User {id} not found")))?;
            st.org.users[u].uuid.clone()
        }
        Kind::Groups => {
            let g = group_or_404(&st, w, id)?;
            st.org.workspaces[w].groups[g].slug.clone()
        }
    };

    if ctx.method == Method::GET {
        let found = perms(&st).into_iter().find(|p| p.principal == principal);
        return match found {
            Some(p) => ok(render(&st, &p)),
            None => Err(ApiError::not_found(&format!(
                "No explicit permission for {id} on this {}",
                if is_project { "project" } else { "repository" }
            ))),
        };
    }

    if ctx.method == Method::PUT {
        let allowed: &[&str] = if is_project {
            &["read", "write", "create-repo", "admin"]
        } else {
            &["read", "write", "admin"]
        };
        let permission = validate_permission_body(ctx.body, allowed)?;
        if kind == Kind::Users {
            let u = st.user_by_uuid.get(&principal).copied().unwrap_or(0);
            match st.ws[w].members.get(&u) {
                None => {
                    return Err(ApiError::bad_request(&format!(
                        "User {id} is not a member of workspace {}; only workspace members can be granted permissions",
                        st.org.workspaces[w].slug
                    )));
                }
                Some(true) => {
                    return Err(ApiError::bad_request(&format!(
                        "User {id} is an owner of workspace {}; the permissions of workspace owners cannot be changed",
                        st.org.workspaces[w].slug
                    )));
                }
                Some(false) => {}
            }
        }
        let list = perms_mut(st.get_mut()?, w, t, is_project, kind);
        let perm = Permission {
            principal: principal.clone(),
            permission,
        };
        match list.iter_mut().find(|p| p.principal == principal) {
            Some(p) => p.permission = perm.permission.clone(),
            None => list.push(perm.clone()),
        }
        st.get_mut()?.generation += 1;
        return ok(render(&st, &perm));
    }

    // DELETE
    let list = perms_mut(st.get_mut()?, w, t, is_project, kind);
    list.retain(|p| p.principal != principal);
    st.get_mut()?.generation += 1;
    Ok((204, Value::Null, Vec::new()))
}

fn perms_mut(st: &mut OrgState, w: usize, t: usize, is_project: bool, kind: Kind) -> &mut Vec<Permission> {
    let wsp = &mut st.org.workspaces[w];
    match (is_project, kind) {
        (true, Kind::Users) => &mut wsp.projects[t].user_permissions,
        (true, Kind::Groups) => &mut wsp.projects[t].group_permissions,
        (false, Kind::Users) => &mut wsp.repositories[t].user_permissions,
        (false, Kind::Groups) => &mut wsp.repositories[t].group_permissions,
    }
}

/// `{"permission": …}` with nothing else; 400 with `fields` otherwise.
fn validate_permission_body(body: &[u8], allowed: &[&str]) -> Result<String, ApiError> {
    let invalid = |field: &str, msg: String| {
        let mut e = ApiError::bad_request(&msg);
        e.fields = Some(json!({ field: [msg] }));
        e
    };
    let v: Value = serde_json::from_slice(body)
        .map_err(|_| invalid("permission", "The request body must be a JSON object".into()))?;
    let obj = v
        .as_object()
        .ok_or_else(|| invalid("permission", "The request body must be a JSON object".into()))?;
    if let Some(extra) = obj.keys().find(|k| k.as_str() != "permission") {
        return Err(invalid(extra, format!("Unexpected property '{extra}'")));
    }
    match obj.get("permission").and_then(Value::as_str) {
        Some(p) if allowed.contains(&p) => Ok(p.to_string()),
        Some(p) => Err(invalid(
            "permission",
            format!(
                "'{p}' is not a valid permission; expected one of {}",
                allowed.join(", ")
            ),
        )),
        None => Err(invalid("permission", "This field is required.".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn effective_permission_rule() {
        use super::super::org::{Group, Member, Project, Repository, User, Workspace};
        let user = |n: usize| User {
            uuid: format!("{{u{n}}}"),
            account_id: format!("557058:u{n}"),
            nickname: format!("u{n}"),
            display_name: format!("U {n}"),
            email: format!("u{n}@x"),
            active: true,
        };
        let grant = |p: &str, perm: &str| Permission {
            principal: p.to_string(),
            permission: perm.to_string(),
        };
        let org = Organisation {
            users: (0..6).map(user).collect(),
            workspaces: vec![Workspace {
                uuid: "{w}".into(),
                slug: "w".into(),
                name: "W".into(),
                is_private: true,
                members: (0..5)
                    .map(|n| Member {
                        user_uuid: format!("{{u{n}}}"),
                        owner: n == 0,
                    })
                    .collect(),
                groups: vec![Group {
                    slug: "devs".into(),
                    name: "Devs".into(),
                    permission: None,
                    members: vec!["{u1}".into(), "{u2}".into()],
                }],
                projects: vec![Project {
                    uuid: "{p}".into(),
                    key: "P".into(),
                    name: "P".into(),
                    // create-repo counts as write on repositories.
                    user_permissions: vec![grant("{u3}", "create-repo"), grant("{u4}", "none")],
                    group_permissions: vec![grant("devs", "read")],
                }],
                repositories: vec![Repository {
                    uuid: "{r}".into(),
                    slug: "r".into(),
                    name: "r".into(),
                    project_key: "P".into(),
                    is_private: true,
                    // `none` on the repository does not cancel the group grant;
                    // u5 is not a workspace member but keeps the grant.
                    user_permissions: vec![grant("{u1}", "none"), grant("{u2}", "admin"), grant("{u5}", "read")],
                    group_permissions: vec![grant("devs", "write")],
                }],
            }],
        };
        let st = OrgState::new(org);
        let got: Vec<(usize, usize, &str)> = st
            .effective(0)
            .into_iter()
            .map(|(r, u, rk)| (r, u, rank_name(rk)))
            .collect();
        // u0 (owner, no grants) and u4 (`none` only) are absent.
        assert_eq!(
            got,
            vec![(0, 1, "write"), (0, 2, "admin"), (0, 3, "write"), (0, 5, "read")]
        );
    }

    #[test]
    fn timestamps_are_iso8601() {
        let t = timestamp("{abc}", 0);
        assert_eq!(t.len(), "2020-01-01T00:00:00.000000+00:00".len(), "{t}");
        assert!(t.starts_with("20"));
    }

    #[test]
    fn routes() {
        let p = |s: &str| {
            let segs: Vec<String> = s.split('/').filter(|x| !x.is_empty()).map(str::to_string).collect();
            Route::parse(&segs).map(|r| r.class())
        };
        assert_eq!(p("/2.0/user"), Some("user"));
        assert_eq!(
            p("/2.0/workspaces/a/projects/K/permissions-config/users/x"),
            Some("project-permissions")
        );
        assert_eq!(
            p("/1.0/workspaces/a/projects/K/permissions-config/groups"),
            Some("project-permissions")
        );
        assert_eq!(p("/2.0/repositories/a/b/permissions-config/other"), None);
        assert_eq!(p("/nope"), None);
    }

    #[test]
    fn permission_body_validation() {
        let allowed = &["read", "write", "admin"];
        assert_eq!(
            validate_permission_body(br#"{"permission":"write"}"#, allowed).unwrap(),
            "write"
        );
        for bad in [
            &br#"{"permission":"create-repo"}"#[..],
            br#"{}"#,
            br#"{"permission":"read","x":1}"#,
            b"nope",
            b"[]",
            br#"{"permission":3}"#,
        ] {
            let e = validate_permission_body(bad, allowed).unwrap_err();
            assert_eq!(e.status, 400);
            assert!(e.fields.is_some());
        }
    }
}
