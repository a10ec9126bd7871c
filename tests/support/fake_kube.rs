//! In-process fake Kubernetes API server for integration tests.
//!
//! Speaks enough of the real wire format (JSON objects, `Status` errors, chunked watch streams)
//! for `kube::Client`, `kube::runtime` watchers/reflectors/controllers, the finalizer helper,
//! the events `Recorder`, server-side apply and `kube-lease-manager`.
//!
//! Strict where the real API server is strict and tests depend on it (see `writes` and
//! `fields`): Secret `stringData` is merged into `data` on write and never stored; server-side
//! apply tracks `managedFields` per manager, prunes only fields the applier alone owned, and
//! conflicts unless forced; a stale `metadata.resourceVersion` is a 409; `/status` and the main
//! resource each change only their part; `generation` moves only on spec changes.
//!
//! Known simplifications: strategic merge patch is a JSON merge patch; list semantics are known
//! only for `status.conditions` (map by `type`), `metadata.ownerReferences` (map by `uid`) and
//! `metadata.finalizers` (set), other lists are atomic; `limit`/`continue`/`resourceVersionMatch`
//! are ignored (lists return everything at the current RV); metadata-only
//! (`as=PartialObjectMetadata`) requests get full objects; no admission, schema validation,
//! defaulting, RBAC, ownerReference garbage collection or namespace lifecycle; BOOKMARKs are sent
//! every 2s on idle watches that allow them.

mod fields;
mod selectors;
mod watch;
mod writes;

use selectors::Filter;
use watch::watch;
use writes::{create, delete, patch, replace};

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State as AxState;
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use fields::{ManagedFields, ManagerKey, Operation};
use serde_json::{Map, Value, json};

/// Maximum number of watch events kept for resuming watches; older resourceVersions get a 410.
const DEFAULT_HISTORY_LIMIT: usize = 50_000;
/// Interval of BOOKMARK events on idle watches that asked for them.
const BOOKMARK_INTERVAL: Duration = Duration::from_secs(2);
/// Field manager of objects written with [`FakeKube::put`].
const TEST_MANAGER: &str = "fake-kube-test";

/// A resource kind served by the fake.
#[derive(Clone, Debug)]
pub struct KindInfo {
    pub group: String,
    pub version: String,
    pub kind: String,
    pub plural: String,
    pub namespaced: bool,
    pub status_subresource: bool,
    /// Maintain `metadata.generation` (bumped on changes outside metadata and a status
    /// subresource, and when deletion starts).
    /// Defaults to true for kinds outside the core group that have a status subresource (i.e. CRs).
    pub generation: bool,
}

impl KindInfo {
    pub fn new(group: &str, version: &str, kind: &str, plural: &str, namespaced: bool, status: bool) -> Self {
        KindInfo {
            group: group.to_string(),
            version: version.to_string(),
            kind: kind.to_string(),
            plural: plural.to_string(),
            namespaced,
            status_subresource: status,
            generation: status && !group.is_empty(),
        }
    }

    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.clone()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    fn resource_key(&self) -> String {
        format!("{}/{}/{}", self.group, self.version, self.plural)
    }
}

/// One HTTP request as received by the fake.
#[derive(Clone, Debug)]
pub struct RecordedRequest {
    pub method: String,
    pub path: String,
    pub query: String,
    pub content_type: Option<String>,
    pub body: String,
}

impl RecordedRequest {
    /// Value of a query parameter (decoded).
    pub fn param(&self, key: &str) -> Option<String> {
        url::form_urlencoded::parse(self.query.as_bytes())
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.into_owned())
    }

    /// Body parsed as JSON (YAML for apply patches), `Null` when empty or unparsable.
    pub fn json(&self) -> Value {
        parse_body(self.body.as_bytes()).unwrap_or(Value::Null)
    }
}

type Key = (String, String, String);

struct Stored {
    obj: Value,
    managed: ManagedFields,
}

struct WatchEvent {
    rv: u64,
    resource: String,
    ns: String,
    typ: &'static str,
    object: Value,
    /// Previous state for MODIFIED events, so selector watches can turn them into ADDED/DELETED.
    previous: Option<Value>,
}

struct State {
    kinds: Vec<KindInfo>,
    objects: BTreeMap<Key, Stored>,
    history: VecDeque<WatchEvent>,
    history_floor: u64,
    history_limit: usize,
    rv: u64,
    requests: Vec<RecordedRequest>,
    closed: bool,
    /// TokenReview: bearer token -> (username, groups).
    tokens: BTreeMap<String, (String, Vec<String>)>,
    /// TokenReview: audiences a token is limited to (absent: any requested).
    token_audiences: BTreeMap<String, Vec<String>>,
    /// SubjectAccessReview: (user, verb, group, resource, subresource, namespace) that are allowed.
    rbac: Vec<AccessRule>,
}

/// One allowed (user, verb, resource) for SubjectAccessReviews; empty
/// subresource or namespace match only empty.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessRule {
    pub user: String,
    pub verb: String,
    pub group: String,
    pub resource: String,
    pub subresource: String,
    pub namespace: String,
}

struct Shared {
    state: Mutex<State>,
    notify: tokio::sync::watch::Sender<u64>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn notify(&self) {
        let rv = self.lock().rv;
        self.notify.send_replace(rv);
    }
}

/// The fake API server. Dropping it ends all open watch streams and stops the listener.
pub struct FakeKube {
    shared: Arc<Shared>,
    addr: SocketAddr,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for FakeKube {
    fn drop(&mut self) {
        self.shared.lock().closed = true;
        self.shared.notify();
        self.server.abort();
    }
}

#[derive(Debug)]
struct ApiErr {
    code: u16,
    reason: &'static str,
    message: String,
}

impl ApiErr {
    fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        ApiErr {
            code,
            reason,
            message: message.into(),
        }
    }

    fn not_found(ki: &KindInfo, name: &str) -> Self {
        Self::new(
            404,
            "NotFound",
            format!("{}.{} \"{name}\" not found", ki.plural, ki.group),
        )
    }

    fn status_json(&self) -> Value {
        json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        })
    }
}

impl IntoResponse for ApiErr {
    fn into_response(self) -> Response {
        json_response(
            StatusCode::from_u16(self.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            &self.status_json(),
        )
    }
}

fn json_response(code: StatusCode, v: &Value) -> Response {
    (code, [(header::CONTENT_TYPE, "application/json")], v.to_string()).into_response()
}

fn now_rfc3339() -> String {
    jiff::Timestamp::now().strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

fn new_uid() -> String {
    let n: u128 = rand::random();
    let h = format!("{n:032x}");
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

fn random_suffix() -> String {
    const CHARS: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    (0..5)
        .map(|_| CHARS[rand::random_range(0..CHARS.len())] as char)
        .collect()
}

fn parse_body(body: &[u8]) -> Option<Value> {
    if body.is_empty() {
        return None;
    }
    serde_json::from_slice(body)
        .ok()
        .or_else(|| serde_yaml::from_slice::<Value>(body).ok())
}

fn meta(obj: &Value) -> &Value {
    obj.get("metadata").unwrap_or(&Value::Null)
}

fn meta_str<'a>(obj: &'a Value, field: &str) -> Option<&'a str> {
    meta(obj).get(field).and_then(Value::as_str)
}

fn meta_mut(obj: &mut Value) -> &mut Map<String, Value> {
    if !obj.is_object() {
        *obj = json!({});
    }
    let o = obj.as_object_mut().expect("object");
    let m = o.entry("metadata").or_insert_with(|| json!({}));
    if !m.is_object() {
        *m = json!({});
    }
    m.as_object_mut().expect("metadata object")
}

fn has_finalizers(obj: &Value) -> bool {
    meta(obj)
        .get("finalizers")
        .and_then(Value::as_array)
        .is_some_and(|f| !f.is_empty())
}

fn set_or_remove(obj: &mut Value, field: &str, v: Option<Value>) {
    if let Some(o) = obj.as_object_mut() {
        match v {
            Some(v) => {
                o.insert(field.to_string(), v);
            }
            None => {
                o.remove(field);
            }
        }
    }
}

// ---------- state operations ----------

impl State {
    fn kind_by_path(&self, group: &str, version: &str, plural: &str) -> Option<KindInfo> {
        self.kinds
            .iter()
            .find(|k| k.group == group && k.version == version && k.plural == plural)
            .cloned()
    }

    fn kind_by_type(&self, api_version: &str, kind: &str) -> Option<KindInfo> {
        self.kinds
            .iter()
            .find(|k| k.api_version() == api_version && k.kind == kind)
            .cloned()
    }

    fn key(ki: &KindInfo, ns: Option<&str>, name: &str) -> Key {
        let ns = if ki.namespaced { ns.unwrap_or("default") } else { "" };
        (ki.resource_key(), ns.to_string(), name.to_string())
    }

    fn emit(&mut self, ki: &KindInfo, ns: &str, typ: &'static str, object: Value, previous: Option<Value>) {
        self.history.push_back(WatchEvent {
            rv: self.rv,
            resource: ki.resource_key(),
            ns: ns.to_string(),
            typ,
            object,
            previous,
        });
        while self.history.len() > self.history_limit {
            if let Some(ev) = self.history.pop_front() {
                self.history_floor = ev.rv;
            }
        }
    }

    /// Persist `new` under `key`, maintaining system metadata, resourceVersion, generation,
    /// finalizer-driven removal and watch events. No-op writes leave the object untouched.
    fn store(&mut self, ki: &KindInfo, key: &Key, mut new: Value, managed: Option<ManagedFields>) -> Value {
        let old = self.objects.get(key).map(|s| s.obj.clone());
        let managed = managed
            .or_else(|| self.objects.get(key).map(|s| s.managed.clone()))
            .unwrap_or_default();
        {
            let o = new.as_object_mut().expect("object");
            o.insert("apiVersion".into(), json!(ki.api_version()));
            o.insert("kind".into(), json!(ki.kind));
        }
        if ki.kind == "Secret" && ki.group.is_empty() {
            writes::normalize_secret(&mut new);
        }
        system_metadata(ki, key, old.as_ref(), &mut new);
        let rendered = managed.render(&ki.api_version());
        if rendered.as_array().is_some_and(|a| !a.is_empty()) {
            meta_mut(&mut new).insert("managedFields".into(), rendered);
        }
        if let Some(old) = &old {
            if ki.generation && spec_changed(ki, old, &new) {
                let g = meta(&new).get("generation").and_then(Value::as_i64).unwrap_or(1);
                meta_mut(&mut new).insert("generation".into(), json!(g + 1));
            }
            if *old == new {
                return new;
            }
        }
        self.rv += 1;
        meta_mut(&mut new).insert("resourceVersion".into(), json!(self.rv.to_string()));
        let terminating = meta(&new).get("deletionTimestamp").is_some();
        if terminating && !has_finalizers(&new) {
            self.objects.remove(key);
            if old.is_some() {
                self.emit(ki, &key.1, "DELETED", new.clone(), None);
            }
            return new;
        }
        self.objects.insert(
            key.clone(),
            Stored {
                obj: new.clone(),
                managed,
            },
        );
        self.emit(
            ki,
            &key.1,
            if old.is_some() { "MODIFIED" } else { "ADDED" },
            new.clone(),
            old,
        );
        new
    }

    /// Delete honouring finalizers. Returns the final object and whether it is gone.
    fn delete(&mut self, ki: &KindInfo, key: &Key) -> Option<(Value, bool)> {
        let cur = self.objects.get(key)?.obj.clone();
        if has_finalizers(&cur) {
            if meta(&cur).get("deletionTimestamp").is_some() {
                return Some((cur, false));
            }
            let mut new = cur.clone();
            let m = meta_mut(&mut new);
            m.insert("deletionTimestamp".into(), json!(now_rfc3339()));
            m.insert("deletionGracePeriodSeconds".into(), json!(0));
            let stored = self.store(ki, key, new, None);
            return Some((stored, false));
        }
        self.objects.remove(key);
        self.rv += 1;
        let mut gone = cur;
        meta_mut(&mut gone).insert("resourceVersion".into(), json!(self.rv.to_string()));
        self.emit(ki, &key.1, "DELETED", gone.clone(), None);
        Some((gone, true))
    }
}

/// Server-maintained metadata: name/namespace from the URL, uid and creationTimestamp set once,
/// deletionTimestamp only through DELETE, generation carried over (bumped by `store`).
fn system_metadata(ki: &KindInfo, key: &Key, old: Option<&Value>, new: &mut Value) {
    let m = meta_mut(new);
    m.insert("name".into(), json!(key.2));
    if ki.namespaced {
        m.insert("namespace".into(), json!(key.1));
    } else {
        m.remove("namespace");
    }
    m.remove("generateName");
    m.remove("managedFields");
    if m.get("finalizers")
        .and_then(Value::as_array)
        .is_some_and(|f| f.is_empty())
    {
        m.remove("finalizers");
    }
    match old {
        None => {
            m.insert("uid".into(), json!(new_uid()));
            m.insert("creationTimestamp".into(), json!(now_rfc3339()));
            m.remove("deletionTimestamp");
            if ki.generation {
                m.insert("generation".into(), json!(1));
            } else {
                m.remove("generation");
            }
        }
        Some(old) => {
            let om = meta(old);
            // A new deletionTimestamp comes from `State::delete`; API writes cannot set one
            // (`writes::restrict`).
            for f in ["uid", "creationTimestamp", "resourceVersion", "deletionTimestamp"] {
                if let Some(v) = om.get(f) {
                    m.insert(f.into(), v.clone());
                }
            }
            if ki.generation {
                let g = om.get("generation").and_then(Value::as_i64).unwrap_or(1);
                m.insert("generation".into(), json!(g));
            } else {
                m.remove("generation");
            }
        }
    }
}

/// Whether `metadata.generation` moves: like the real server for custom resources, on any change
/// outside metadata (and outside status when it is a subresource), and when deletion starts.
fn spec_changed(ki: &KindInfo, old: &Value, new: &Value) -> bool {
    let desired = |obj: &Value| {
        let mut o = obj.as_object().cloned().unwrap_or_default();
        o.remove("metadata");
        if ki.status_subresource {
            o.remove("status");
        }
        o
    };
    let deleting = meta(old).get("deletionTimestamp").is_none() && meta(new).get("deletionTimestamp").is_some();
    deleting || desired(old) != desired(new)
}

// ---------- public API ----------

impl FakeKube {
    pub async fn start() -> FakeKube {
        let kinds = vec![
            KindInfo::new("", "v1", "Secret", "secrets", true, false),
            KindInfo::new("", "v1", "ConfigMap", "configmaps", true, false),
            KindInfo::new("", "v1", "Namespace", "namespaces", false, true),
            KindInfo::new("", "v1", "Event", "events", true, false),
            KindInfo::new("", "v1", "Pod", "pods", true, true),
            KindInfo::new(
                "connectors.dev",
                "v1alpha1",
                "BitbucketConnector",
                "bitbucketconnectors",
                true,
                true,
            ),
            KindInfo::new(
                "connectors.dev",
                "v1alpha1",
                "BitbucketAccessGrant",
                "bitbucketaccessgrants",
                true,
                true,
            ),
            KindInfo::new("events.k8s.io", "v1", "Event", "events", true, false),
            KindInfo::new("coordination.k8s.io", "v1", "Lease", "leases", true, false),
            KindInfo::new(
                "authentication.k8s.io",
                "v1",
                "TokenReview",
                "tokenreviews",
                false,
                false,
            ),
            KindInfo::new(
                "authorization.k8s.io",
                "v1",
                "SubjectAccessReview",
                "subjectaccessreviews",
                false,
                false,
            ),
        ];
        let (tx, _) = tokio::sync::watch::channel(0);
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                kinds,
                objects: BTreeMap::new(),
                history: VecDeque::new(),
                history_floor: 0,
                history_limit: DEFAULT_HISTORY_LIMIT,
                rv: 1,
                requests: Vec::new(),
                closed: false,
                tokens: BTreeMap::new(),
                token_audiences: BTreeMap::new(),
                rbac: Vec::new(),
            }),
            notify: tx,
        });
        let app = Router::new().fallback(handle).with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind fake kube");
        let addr = listener.local_addr().expect("local addr");
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        FakeKube { shared, addr, server }
    }

    /// Keep only the last `limit` watch events; watches resuming from older resourceVersions get
    /// an ERROR event with a 410 `Expired` Status (like etcd compaction).
    pub fn set_history_limit(&self, limit: usize) {
        let mut st = self.shared.lock();
        st.history_limit = limit;
        while st.history.len() > limit {
            if let Some(ev) = st.history.pop_front() {
                st.history_floor = ev.rv;
            }
        }
    }

    /// Current global resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.shared.lock().rv
    }

    /// Register an additional kind (replaces an existing registration of the same group/version/plural).
    pub fn register(&self, kind: KindInfo) {
        let mut st = self.shared.lock();
        st.kinds
            .retain(|k| !(k.group == kind.group && k.version == kind.version && k.plural == kind.plural));
        st.kinds.push(kind);
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn client(&self) -> kube::Client {
        let uri: Uri = self.url().parse().expect("uri");
        let mut config = kube::Config::new(uri);
        config.default_namespace = "default".to_string();
        kube::Client::try_from(config).expect("kube client")
    }

    fn kind(&self, api_version: &str, kind: &str) -> KindInfo {
        self.shared
            .lock()
            .kind_by_type(api_version, kind)
            .unwrap_or_else(|| panic!("fake kube: kind {api_version}/{kind} not registered"))
    }

    /// Create or replace an object (status included, no conflict checks), as field manager
    /// `fake-kube-test`. Emits watch events.
    pub fn put(&self, obj: Value) {
        let api_version = obj["apiVersion"].as_str().expect("apiVersion").to_string();
        let kind = obj["kind"].as_str().expect("kind").to_string();
        let ki = self.kind(&api_version, &kind);
        let name = meta_str(&obj, "name").expect("metadata.name").to_string();
        let ns = meta_str(&obj, "namespace").map(str::to_string);
        {
            let mut st = self.shared.lock();
            let key = State::key(&ki, ns.as_deref(), &name);
            let (old, mut managed) = match st.objects.get(&key) {
                Some(s) => (s.obj.clone(), s.managed.clone()),
                None => (json!({}), ManagedFields::default()),
            };
            let writer = ManagerKey {
                manager: TEST_MANAGER.into(),
                operation: Operation::Update,
                subresource: None,
            };
            managed.update(&old, &obj, &writer, &now_rfc3339());
            st.store(&ki, &key, obj, Some(managed));
        }
        self.shared.notify();
    }

    pub fn get(&self, api_version: &str, kind: &str, ns: Option<&str>, name: &str) -> Option<Value> {
        let ki = self.kind(api_version, kind);
        let st = self.shared.lock();
        st.objects.get(&State::key(&ki, ns, name)).map(|s| s.obj.clone())
    }

    /// Delete like the API server: finalizers -> deletionTimestamp, else removal.
    pub fn delete(&self, api_version: &str, kind: &str, ns: Option<&str>, name: &str) {
        let ki = self.kind(api_version, kind);
        {
            let mut st = self.shared.lock();
            let key = State::key(&ki, ns, name);
            st.delete(&ki, &key);
        }
        self.shared.notify();
    }

    pub fn list(&self, api_version: &str, kind: &str, ns: Option<&str>) -> Vec<Value> {
        let ki = self.kind(api_version, kind);
        let rk = ki.resource_key();
        let st = self.shared.lock();
        st.objects
            .iter()
            .filter(|((r, n, _), _)| *r == rk && ns.is_none_or(|ns| ns == n))
            .map(|(_, s)| s.obj.clone())
            .collect()
    }

    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.shared.lock().requests.clone()
    }

    /// `events.k8s.io/v1` Events currently stored (all namespaces).
    pub fn events(&self) -> Vec<Value> {
        self.list("events.k8s.io/v1", "Event", None)
    }

    /// Makes `token` authenticate (TokenReview) as `username` in `groups`.
    pub fn add_token(&self, token: &str, username: &str, groups: &[&str]) {
        let groups = groups.iter().map(|g| g.to_string()).collect();
        self.shared
            .lock()
            .tokens
            .insert(token.to_owned(), (username.to_owned(), groups));
    }

    /// Limits `token` to `audiences` (by default a token suits whatever
    /// audience a TokenReview asks for); empty: an API-server-only token.
    pub fn set_token_audiences(&self, token: &str, audiences: &[&str]) {
        let audiences = audiences.iter().map(|a| a.to_string()).collect();
        self.shared.lock().token_audiences.insert(token.to_owned(), audiences);
    }

    /// Allows a SubjectAccessReview matching `rule`.
    pub fn allow(&self, rule: AccessRule) {
        self.shared.lock().rbac.push(rule);
    }

    /// Allows `user` to read the data API in `namespace`: `get` on
    /// `bitbucketconnectors/data`, the rule an auditor is bound to.
    pub fn allow_data_reads(&self, user: &str, namespace: &str) {
        self.allow(AccessRule {
            user: user.into(),
            verb: "get".into(),
            group: "connectors.dev".into(),
            resource: "bitbucketconnectors".into(),
            subresource: "data".into(),
            namespace: namespace.into(),
        });
    }

    /// Wait until the object exists and satisfies `pred`; panics with the last seen object on timeout.
    pub async fn wait_for<F: Fn(&Value) -> bool>(
        &self,
        api_version: &str,
        kind: &str,
        ns: Option<&str>,
        name: &str,
        timeout: Duration,
        pred: F,
    ) -> Value {
        let mut rx = self.shared.notify.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            rx.borrow_and_update();
            let cur = self.get(api_version, kind, ns, name);
            if let Some(v) = &cur
                && pred(v)
            {
                return v.clone();
            }
            if tokio::time::timeout_at(deadline, rx.changed()).await.is_err() {
                panic!(
                    "fake kube: timed out after {timeout:?} waiting for {kind} {ns:?}/{name}; last seen: {}",
                    cur.map(|v| serde_json::to_string_pretty(&v).unwrap_or_default())
                        .unwrap_or_else(|| "<absent>".into())
                );
            }
        }
    }

    /// Wait until the object no longer exists; panics with the last seen object on timeout.
    pub async fn wait_for_absent(
        &self,
        api_version: &str,
        kind: &str,
        ns: Option<&str>,
        name: &str,
        timeout: Duration,
    ) {
        let mut rx = self.shared.notify.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            rx.borrow_and_update();
            let Some(cur) = self.get(api_version, kind, ns, name) else {
                return;
            };
            if tokio::time::timeout_at(deadline, rx.changed()).await.is_err() {
                panic!("fake kube: timed out waiting for {kind} {ns:?}/{name} to be deleted; last seen: {cur:#}");
            }
        }
    }
}

// ---------- HTTP layer ----------

enum Route {
    Resource {
        ki: KindInfo,
        ns: Option<String>,
        name: Option<String>,
        sub: Option<String>,
    },
    Discovery(Value),
    Unknown,
}

fn route(st: &State, path: &str) -> Route {
    let segs: Vec<&str> = path.trim_matches('/').split('/').filter(|s| !s.is_empty()).collect();
    let (group, version, rest) = match segs.as_slice() {
        ["version"] => {
            return Route::Discovery(json!({"major": "1", "minor": "33", "gitVersion": "v1.33.0-fake"}));
        }
        ["api"] => {
            return Route::Discovery(
                json!({"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []}),
            );
        }
        ["apis"] => {
            let mut groups: BTreeMap<String, Vec<String>> = BTreeMap::new();
            for k in st.kinds.iter().filter(|k| !k.group.is_empty()) {
                let v = groups.entry(k.group.clone()).or_default();
                if !v.contains(&k.version) {
                    v.push(k.version.clone());
                }
            }
            let groups: Vec<Value> = groups
                .into_iter()
                .map(|(g, vs)| {
                    let versions: Vec<Value> = vs
                        .iter()
                        .map(|v| json!({"groupVersion": format!("{g}/{v}"), "version": v}))
                        .collect();
                    json!({"name": g, "versions": versions, "preferredVersion": versions[0]})
                })
                .collect();
            return Route::Discovery(json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}));
        }
        ["api", v, rest @ ..] => ("", *v, rest),
        ["apis", g, v, rest @ ..] => (*g, *v, rest),
        _ => return Route::Unknown,
    };
    if rest.is_empty() {
        let resources: Vec<Value> = st
            .kinds
            .iter()
            .filter(|k| k.group == group && k.version == version)
            .flat_map(|k| {
                let mut r = vec![json!({
                    "name": k.plural, "singularName": k.kind.to_lowercase(), "namespaced": k.namespaced, "kind": k.kind,
                    "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"],
                })];
                if k.status_subresource {
                    r.push(
                        json!({"name": format!("{}/status", k.plural), "singularName": "", "namespaced": k.namespaced,
                        "kind": k.kind, "verbs": ["get", "patch", "update"]}),
                    );
                }
                r
            })
            .collect();
        let gv = if group.is_empty() {
            version.to_string()
        } else {
            format!("{group}/{version}")
        };
        return Route::Discovery(
            json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": resources}),
        );
    }
    let s = |i: usize| rest.get(i).map(|s| s.to_string());
    if rest[0] == "namespaces"
        && rest.len() >= 3
        && let Some(ki) = st.kind_by_path(group, version, rest[2]).filter(|k| k.namespaced)
    {
        if rest.len() > 5 {
            return Route::Unknown;
        }
        return Route::Resource {
            ki,
            ns: s(1),
            name: s(3),
            sub: s(4),
        };
    }
    match st.kind_by_path(group, version, rest[0]) {
        Some(ki) if rest.len() <= 3 => Route::Resource {
            ki,
            ns: None,
            name: s(1),
            sub: s(2),
        },
        _ => Route::Unknown,
    }
}

async fn handle(
    AxState(shared): AxState<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let query_str = uri.query().unwrap_or("").to_string();
    let mut query: BTreeMap<String, String> = url::form_urlencoded::parse(query_str.as_bytes()).into_owned().collect();
    let applying = content_type
        .as_deref()
        .is_some_and(|ct| ct.starts_with("application/apply-patch"));
    if !applying && !query.contains_key("fieldManager") {
        let agent = headers
            .get(header::USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .and_then(|ua| ua.split('/').next())
            .filter(|m| !m.is_empty())
            .unwrap_or("unknown");
        query.insert("fieldManager".into(), agent.to_string());
    }
    let route = {
        let mut st = shared.lock();
        st.requests.push(RecordedRequest {
            method: method.to_string(),
            path: uri.path().to_string(),
            query: query_str,
            content_type: content_type.clone(),
            body: String::from_utf8_lossy(&body).into_owned(),
        });
        route(&st, uri.path())
    };
    let (ki, ns, name, sub) = match route {
        Route::Discovery(v) => return json_response(StatusCode::OK, &v),
        Route::Unknown => {
            return ApiErr::new(
                404,
                "NotFound",
                format!("the server could not find the requested resource ({})", uri.path()),
            )
            .into_response();
        }
        Route::Resource { ki, ns, name, sub } => (ki, ns, name, sub),
    };
    if let Some(sub) = &sub
        && !(sub == "status" && ki.status_subresource)
    {
        return ApiErr::new(404, "NotFound", format!("subresource {sub} not found")).into_response();
    }
    let is_watch = matches!(query.get("watch").map(String::as_str), Some("1" | "true"));
    let result = match (&method, &name) {
        (&Method::GET, None) if is_watch => return watch(shared, ki, ns, &query),
        (&Method::GET, None) => Ok((StatusCode::OK, list(&shared.lock(), &ki, ns, &query))),
        (&Method::GET, Some(name)) => {
            let st = shared.lock();
            st.objects
                .get(&State::key(&ki, ns.as_deref(), name))
                .map(|s| (StatusCode::OK, s.obj.clone()))
                .ok_or_else(|| ApiErr::not_found(&ki, name))
        }
        (&Method::POST, None) if ki.kind == "TokenReview" || ki.kind == "SubjectAccessReview" => {
            review(&shared.lock(), &ki, &body)
        }
        (&Method::POST, None) => create(&mut shared.lock(), &ki, ns, &query, &body),
        (&Method::PUT, Some(name)) => replace(&mut shared.lock(), &ki, ns, name, sub.as_deref(), &query, &body),
        (&Method::PATCH, Some(name)) => patch(
            &mut shared.lock(),
            &ki,
            ns,
            name,
            sub.as_deref(),
            &query,
            content_type.as_deref().unwrap_or(""),
            &body,
        ),
        (&Method::DELETE, Some(name)) => delete(&mut shared.lock(), &ki, ns, name, &body),
        (&Method::DELETE, None) => {
            let mut st = shared.lock();
            let filter = Filter::from_query(ns, &query);
            let rk = ki.resource_key();
            let keys: Vec<Key> = st
                .objects
                .iter()
                .filter(|((r, n, _), s)| *r == rk && filter.matches(n, &s.obj))
                .map(|(k, _)| k.clone())
                .collect();
            let items: Vec<Value> = keys.iter().filter_map(|k| st.delete(&ki, k)).map(|(o, _)| o).collect();
            Ok((
                StatusCode::OK,
                json!({
                    "kind": format!("{}List", ki.kind),
                    "apiVersion": ki.api_version(),
                    "metadata": {"resourceVersion": st.rv.to_string()},
                    "items": items,
                }),
            ))
        }
        _ => Err(ApiErr::new(
            405,
            "MethodNotAllowed",
            format!("{method} not supported here"),
        )),
    };
    shared.notify();
    match result {
        Ok((code, v)) => json_response(code, &v),
        Err(e) => e.into_response(),
    }
}

fn list(st: &State, ki: &KindInfo, ns: Option<String>, q: &BTreeMap<String, String>) -> Value {
    let rk = ki.resource_key();
    let filter = Filter::from_query(ns, q);
    let items: Vec<Value> = st
        .objects
        .iter()
        .filter(|((r, n, _), s)| *r == rk && filter.matches(n, &s.obj))
        .map(|(_, s)| s.obj.clone())
        .collect();
    json!({
        "kind": format!("{}List", ki.kind),
        "apiVersion": ki.api_version(),
        "metadata": {"resourceVersion": st.rv.to_string()},
        "items": items,
    })
}

fn body_json(body: &[u8]) -> Result<Value, ApiErr> {
    let v = parse_body(body).ok_or_else(|| ApiErr::new(400, "BadRequest", "unparsable request body"))?;
    if !v.is_object() {
        return Err(ApiErr::new(400, "BadRequest", "request body must be an object"));
    }
    Ok(v)
}

fn check_ns(ki: &KindInfo, ns: &Option<String>, obj: &Value) -> Result<(), ApiErr> {
    if ki.namespaced {
        if ns.is_none() {
            return Err(ApiErr::new(
                404,
                "NotFound",
                "namespaced resource requires a namespace in the path",
            ));
        }
        if let Some(bns) = meta_str(obj, "namespace")
            && Some(bns) != ns.as_deref()
        {
            return Err(ApiErr::new(
                400,
                "BadRequest",
                "the namespace of the provided object does not match the namespace sent on the request",
            ));
        }
    }
    Ok(())
}

/// TokenReview and SubjectAccessReview: answered from the tokens and rules
/// the test registered, never stored (like the real API server).
fn review(st: &State, ki: &KindInfo, body: &[u8]) -> Result<(StatusCode, Value), ApiErr> {
    let mut obj = body_json(body)?;
    let spec = obj.get("spec").cloned().unwrap_or(Value::Null);
    let status = if ki.kind == "TokenReview" {
        let token = spec["token"].as_str().unwrap_or_default();
        // Like the API server: the audiences both the review asked for and
        // the token carries; a token without audiences is for the API server.
        let requested: Vec<String> = spec["audiences"]
            .as_array()
            .map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect())
            .unwrap_or_default();
        let audiences: Vec<String> = match st.token_audiences.get(token) {
            Some(own) => requested.into_iter().filter(|a| own.contains(a)).collect(),
            None => requested,
        };
        match st.tokens.get(token) {
            Some((username, groups)) => {
                json!({"authenticated": true, "user": {"username": username, "groups": groups}, "audiences": audiences})
            }
            None => json!({"authenticated": false, "error": "invalid bearer token"}),
        }
    } else {
        let attrs = &spec["resourceAttributes"];
        let field = |v: &Value, k: &str| v[k].as_str().unwrap_or_default().to_owned();
        let user = field(&spec, "user");
        let allowed = st.rbac.iter().any(|r| {
            r.user == user
                && r.verb == field(attrs, "verb")
                && r.group == field(attrs, "group")
                && r.resource == field(attrs, "resource")
                && r.subresource == field(attrs, "subresource")
                && r.namespace == field(attrs, "namespace")
        });
        json!({"allowed": allowed})
    };
    obj["status"] = status;
    Ok((StatusCode::CREATED, obj))
}
