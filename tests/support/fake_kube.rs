//! In-process fake Kubernetes API server for integration tests.
//!
//! Speaks enough of the real wire format (JSON objects, `Status` errors, chunked watch streams)
//! for `kube::Client`, `kube::runtime` watchers/reflectors/controllers, the finalizer helper,
//! the events `Recorder`, server-side apply and `kube-lease-manager`.
//!
//! Known simplifications: strategic merge patch is a JSON merge patch; server-side apply is a deep
//! merge of the applied fields with a per-field owner table used only for conflict detection
//! (no `managedFields`, no removal of fields dropped from an apply, lists replaced atomically);
//! `limit`/`continue`/`resourceVersionMatch` are ignored (lists return everything at the current RV);
//! metadata-only (`as=PartialObjectMetadata`) requests get full objects; no admission, validation,
//! defaulting (except Secret `stringData`), RBAC, ownerReference garbage collection or namespace
//! lifecycle; BOOKMARKs are sent every 2s on idle watches that allow them.
#![allow(dead_code)]

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State as AxState;
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};

/// Maximum number of watch events kept for resuming watches; older resourceVersions get a 410.
const DEFAULT_HISTORY_LIMIT: usize = 50_000;
/// Interval of BOOKMARK events on idle watches that asked for them.
const BOOKMARK_INTERVAL: Duration = Duration::from_secs(2);

/// A resource kind served by the fake.
#[derive(Clone, Debug)]
pub struct KindInfo {
    pub group: String,
    pub version: String,
    pub kind: String,
    pub plural: String,
    pub namespaced: bool,
    pub status_subresource: bool,
    /// Maintain `metadata.generation` (bumped on `.spec` changes and on deletion).
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

    pub fn with_generation(self, generation: bool) -> Self {
        KindInfo { generation, ..self }
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
    /// JSON pointer of a leaf field -> field manager that last set it.
    owners: BTreeMap<String, String>,
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

/// Leaf fields of `v` as JSON pointers (arrays and scalars are leaves; empty objects too).
fn leaf_paths(v: &Value, prefix: &str, out: &mut Vec<(String, Value)>) {
    match v {
        Value::Object(m) if !m.is_empty() => {
            for (k, child) in m {
                let esc = k.replace('~', "~0").replace('/', "~1");
                leaf_paths(child, &format!("{prefix}/{esc}"), out);
            }
        }
        _ => out.push((prefix.to_string(), v.clone())),
    }
}

/// Deep merge for server-side apply: objects merge recursively, everything else replaces.
fn deep_merge(target: &mut Value, patch: &Value) {
    match (target, patch) {
        (Value::Object(t), Value::Object(p)) => {
            for (k, pv) in p {
                match t.get_mut(k) {
                    Some(tv) if tv.is_object() && pv.is_object() => deep_merge(tv, pv),
                    _ => {
                        t.insert(k.clone(), pv.clone());
                    }
                }
            }
        }
        (t, p) => *t = p.clone(),
    }
}

const SYSTEM_PATHS: &[&str] = &[
    "/apiVersion",
    "/kind",
    "/metadata/name",
    "/metadata/namespace",
    "/metadata/resourceVersion",
    "/metadata/uid",
    "/metadata/generation",
    "/metadata/creationTimestamp",
    "/metadata/managedFields",
];

// ---------- selectors ----------

#[derive(Debug)]
enum LabelReq {
    Eq(String, String),
    Ne(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

fn split_top_level(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut depth = 0;
    let mut cur = String::new();
    for c in s.chars() {
        match c {
            '(' => {
                depth += 1;
                cur.push(c)
            }
            ')' => {
                depth -= 1;
                cur.push(c)
            }
            ',' if depth == 0 => out.push(std::mem::take(&mut cur)),
            _ => cur.push(c),
        }
    }
    out.push(cur);
    out.into_iter()
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty())
        .collect()
}

fn parse_set(s: &str) -> Vec<String> {
    s.trim()
        .trim_start_matches('(')
        .trim_end_matches(')')
        .split(',')
        .map(|v| v.trim().to_string())
        .collect()
}

fn parse_label_selector(s: &str) -> Vec<LabelReq> {
    split_top_level(s)
        .into_iter()
        .map(|t| {
            if let Some(k) = t.strip_prefix('!') {
                LabelReq::NotExists(k.trim().to_string())
            } else if let Some((k, v)) = t.split_once(" notin ") {
                LabelReq::NotIn(k.trim().to_string(), parse_set(v))
            } else if let Some((k, v)) = t.split_once(" in ") {
                LabelReq::In(k.trim().to_string(), parse_set(v))
            } else if let Some((k, v)) = t.split_once("!=") {
                LabelReq::Ne(k.trim().to_string(), v.trim().to_string())
            } else if let Some((k, v)) = t.split_once("==") {
                LabelReq::Eq(k.trim().to_string(), v.trim().to_string())
            } else if let Some((k, v)) = t.split_once('=') {
                LabelReq::Eq(k.trim().to_string(), v.trim().to_string())
            } else {
                LabelReq::Exists(t.trim().to_string())
            }
        })
        .collect()
}

fn labels_match(reqs: &[LabelReq], obj: &Value) -> bool {
    let labels = meta(obj).get("labels");
    let get = |k: &str| labels.and_then(|l| l.get(k)).and_then(Value::as_str);
    reqs.iter().all(|r| match r {
        LabelReq::Eq(k, v) => get(k) == Some(v.as_str()),
        LabelReq::Ne(k, v) => get(k) != Some(v.as_str()),
        LabelReq::In(k, vs) => get(k).is_some_and(|x| vs.iter().any(|v| v == x)),
        LabelReq::NotIn(k, vs) => get(k).is_none_or(|x| vs.iter().all(|v| v != x)),
        LabelReq::Exists(k) => get(k).is_some(),
        LabelReq::NotExists(k) => get(k).is_none(),
    })
}

fn parse_field_selector(s: &str) -> Vec<(String, bool, String)> {
    split_top_level(s)
        .into_iter()
        .filter_map(|t| {
            if let Some((k, v)) = t.split_once("!=") {
                Some((k.trim().to_string(), false, v.trim().to_string()))
            } else if let Some((k, v)) = t.split_once("==") {
                Some((k.trim().to_string(), true, v.trim().to_string()))
            } else {
                t.split_once('=')
                    .map(|(k, v)| (k.trim().to_string(), true, v.trim().to_string()))
            }
        })
        .collect()
}

fn fields_match(reqs: &[(String, bool, String)], obj: &Value) -> bool {
    reqs.iter().all(|(path, eq, want)| {
        let mut cur = obj;
        for part in path.split('.') {
            cur = cur.get(part).unwrap_or(&Value::Null);
        }
        let got = match cur {
            Value::Null => String::new(),
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        (got == *want) == *eq
    })
}

struct Filter {
    ns: Option<String>,
    labels: Vec<LabelReq>,
    fields: Vec<(String, bool, String)>,
}

impl Filter {
    fn from_query(ns: Option<String>, q: &BTreeMap<String, String>) -> Self {
        Filter {
            ns,
            labels: q
                .get("labelSelector")
                .map(|s| parse_label_selector(s))
                .unwrap_or_default(),
            fields: q
                .get("fieldSelector")
                .map(|s| parse_field_selector(s))
                .unwrap_or_default(),
        }
    }

    fn matches(&self, ns: &str, obj: &Value) -> bool {
        self.ns.as_deref().is_none_or(|n| n == ns) && labels_match(&self.labels, obj) && fields_match(&self.fields, obj)
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
    fn store(&mut self, ki: &KindInfo, key: &Key, mut new: Value, owners: Option<BTreeMap<String, String>>) -> Value {
        let old = self.objects.get(key).map(|s| s.obj.clone());
        {
            let o = new.as_object_mut().expect("object");
            o.insert("apiVersion".into(), json!(ki.api_version()));
            o.insert("kind".into(), json!(ki.kind));
        }
        if ki.kind == "Secret" && ki.group.is_empty() {
            normalize_secret(&mut new);
        }
        {
            let m = meta_mut(&mut new);
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
            match &old {
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
                    for f in ["uid", "creationTimestamp", "resourceVersion"] {
                        if let Some(v) = om.get(f) {
                            m.insert(f.into(), v.clone());
                        }
                    }
                    if let Some(dt) = om.get("deletionTimestamp") {
                        m.insert("deletionTimestamp".into(), dt.clone());
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
        if let Some(old) = &old {
            if ki.generation {
                let spec_changed = old.get("spec") != new.get("spec");
                let deleting =
                    meta(old).get("deletionTimestamp").is_none() && meta(&new).get("deletionTimestamp").is_some();
                if spec_changed || deleting {
                    let g = meta(&new).get("generation").and_then(Value::as_i64).unwrap_or(1);
                    meta_mut(&mut new).insert("generation".into(), json!(g + 1));
                }
            }
            if *old == new {
                if let Some(owners) = owners
                    && let Some(s) = self.objects.get_mut(key)
                {
                    s.owners = owners;
                }
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
        let owners = owners
            .or_else(|| self.objects.get(key).map(|s| s.owners.clone()))
            .unwrap_or_default();
        self.objects.insert(
            key.clone(),
            Stored {
                obj: new.clone(),
                owners,
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

fn normalize_secret(obj: &mut Value) {
    use base64::Engine as _;
    let Some(o) = obj.as_object_mut() else { return };
    if let Some(Value::Object(sd)) = o.remove("stringData") {
        let data = o.entry("data").or_insert_with(|| json!({}));
        if !data.is_object() {
            *data = json!({});
        }
        for (k, v) in sd {
            let s = v.as_str().map(str::to_string).unwrap_or_else(|| v.to_string());
            data[k.as_str()] = json!(base64::engine::general_purpose::STANDARD.encode(s));
        }
    }
    o.entry("type").or_insert_with(|| json!("Opaque"));
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

    /// Create or replace an object (status included, no conflict checks). Emits watch events.
    pub fn put(&self, obj: Value) {
        let api_version = obj["apiVersion"].as_str().expect("apiVersion").to_string();
        let kind = obj["kind"].as_str().expect("kind").to_string();
        let ki = self.kind(&api_version, &kind);
        let name = meta_str(&obj, "name").expect("metadata.name").to_string();
        let ns = meta_str(&obj, "namespace").map(str::to_string);
        {
            let mut st = self.shared.lock();
            let key = State::key(&ki, ns.as_deref(), &name);
            st.store(&ki, &key, obj, None);
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

    pub fn clear_requests(&self) {
        self.shared.lock().requests.clear();
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
    let query: BTreeMap<String, String> = url::form_urlencoded::parse(query_str.as_bytes()).into_owned().collect();
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

fn owners_after_update(old: &Stored, new: &Value, manager: &str) -> BTreeMap<String, String> {
    let mut paths = Vec::new();
    leaf_paths(new, "", &mut paths);
    let mut owners = BTreeMap::new();
    for (p, v) in paths {
        if SYSTEM_PATHS.contains(&p.as_str()) {
            continue;
        }
        let prev = old.obj.pointer(&p);
        match old.owners.get(&p) {
            Some(o) if prev == Some(&v) => {
                owners.insert(p, o.clone());
            }
            _ => {
                owners.insert(p, manager.to_string());
            }
        }
    }
    owners
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

fn create(
    st: &mut State,
    ki: &KindInfo,
    ns: Option<String>,
    q: &BTreeMap<String, String>,
    body: &[u8],
) -> Result<(StatusCode, Value), ApiErr> {
    let mut obj = body_json(body)?;
    check_ns(ki, &ns, &obj)?;
    let name = match meta_str(&obj, "name").filter(|s| !s.is_empty()) {
        Some(n) => n.to_string(),
        None => match meta_str(&obj, "generateName") {
            Some(g) => format!("{g}{}", random_suffix()),
            None => return Err(ApiErr::new(422, "Invalid", "metadata.name: Required value")),
        },
    };
    let key = State::key(ki, ns.as_deref(), &name);
    if st.objects.contains_key(&key) {
        return Err(ApiErr::new(
            409,
            "AlreadyExists",
            format!("{}.{} \"{name}\" already exists", ki.plural, ki.group),
        ));
    }
    if ki.status_subresource {
        set_or_remove(&mut obj, "status", None);
    }
    for f in ["resourceVersion", "deletionTimestamp", "uid"] {
        meta_mut(&mut obj).remove(f);
    }
    let manager = q.get("fieldManager").cloned().unwrap_or_else(|| "unknown".into());
    let empty = Stored {
        obj: Value::Null,
        owners: BTreeMap::new(),
    };
    let owners = owners_after_update(&empty, &obj, &manager);
    let stored = st.store(ki, &key, obj, Some(owners));
    Ok((StatusCode::CREATED, stored))
}

/// Restrict a candidate new object to what the endpoint may change.
fn restrict(ki: &KindInfo, sub: Option<&str>, old: &Value, mut candidate: Value) -> Value {
    // deletionTimestamp can only be set through DELETE
    let dt = meta(old).get("deletionTimestamp").cloned();
    match dt {
        Some(dt) => meta_mut(&mut candidate).insert("deletionTimestamp".into(), dt),
        None => meta_mut(&mut candidate).remove("deletionTimestamp"),
    };
    if sub == Some("status") {
        let mut out = old.clone();
        set_or_remove(&mut out, "status", candidate.get("status").cloned());
        return out;
    }
    if ki.status_subresource {
        set_or_remove(&mut candidate, "status", old.get("status").cloned());
    }
    candidate
}

fn replace(
    st: &mut State,
    ki: &KindInfo,
    ns: Option<String>,
    name: &str,
    sub: Option<&str>,
    q: &BTreeMap<String, String>,
    body: &[u8],
) -> Result<(StatusCode, Value), ApiErr> {
    let obj = body_json(body)?;
    check_ns(ki, &ns, &obj)?;
    let key = State::key(ki, ns.as_deref(), name);
    let Some(old) = st.objects.get(&key) else {
        return Err(ApiErr::not_found(ki, name));
    };
    if let Some(rv) = meta_str(&obj, "resourceVersion")
        && Some(rv) != meta_str(&old.obj, "resourceVersion")
    {
        return Err(ApiErr::new(
            409,
            "Conflict",
            format!(
                "Operation cannot be fulfilled on {}.{} \"{name}\": the object has been modified; please apply your changes to the latest version and try again",
                ki.plural, ki.group
            ),
        ));
    }
    let new = restrict(ki, sub, &old.obj, obj);
    let manager = q.get("fieldManager").cloned().unwrap_or_else(|| "unknown".into());
    let owners = owners_after_update(old, &new, &manager);
    let stored = st.store(ki, &key, new, Some(owners));
    Ok((StatusCode::OK, stored))
}

#[allow(clippy::too_many_arguments)]
fn patch(
    st: &mut State,
    ki: &KindInfo,
    ns: Option<String>,
    name: &str,
    sub: Option<&str>,
    q: &BTreeMap<String, String>,
    content_type: &str,
    body: &[u8],
) -> Result<(StatusCode, Value), ApiErr> {
    let ct = content_type.split(';').next().unwrap_or("").trim();
    let key = State::key(ki, ns.as_deref(), name);
    let manager = q.get("fieldManager").cloned();
    let force = matches!(q.get("force").map(String::as_str), Some("true" | "1"));
    let conflict_rv = |patch: &Value, old: &Value| -> Result<(), ApiErr> {
        match meta_str(patch, "resourceVersion") {
            Some(rv) if Some(rv) != meta_str(old, "resourceVersion") => Err(ApiErr::new(
                409,
                "Conflict",
                format!(
                    "Operation cannot be fulfilled on {}.{} \"{name}\": the object has been modified",
                    ki.plural, ki.group
                ),
            )),
            _ => Ok(()),
        }
    };
    match ct {
        "application/apply-patch+yaml" => {
            let Some(manager) = manager else {
                return Err(ApiErr::new(
                    400,
                    "BadRequest",
                    "PatchOptions.meta.k8s.io \"\" is invalid: fieldManager: Required value: is required for apply patch",
                ));
            };
            let applied = body_json(body)?;
            if applied.get("apiVersion").is_none() || applied.get("kind").is_none() {
                return Err(ApiErr::new(
                    400,
                    "BadRequest",
                    "apply patch requires apiVersion and kind",
                ));
            }
            if applied["apiVersion"] != json!(ki.api_version()) || applied["kind"] != json!(ki.kind) {
                return Err(ApiErr::new(
                    400,
                    "BadRequest",
                    "apply patch apiVersion/kind do not match the resource",
                ));
            }
            if let Some(n) = meta_str(&applied, "name")
                && n != name
            {
                return Err(ApiErr::new(
                    400,
                    "BadRequest",
                    "the name of the object does not match the name on the URL",
                ));
            }
            check_ns(ki, &ns, &applied)?;
            let mut applied_paths = Vec::new();
            leaf_paths(&applied, "", &mut applied_paths);
            applied_paths.retain(|(p, _)| {
                let in_status = p == "/status" || p.starts_with("/status/");
                !SYSTEM_PATHS.contains(&p.as_str())
                    && match sub {
                        Some(_) => in_status,
                        None => !(ki.status_subresource && in_status),
                    }
            });
            let Some(old) = st.objects.get(&key) else {
                if sub.is_some() {
                    return Err(ApiErr::not_found(ki, name));
                }
                let mut obj = applied;
                if ki.status_subresource {
                    set_or_remove(&mut obj, "status", None);
                }
                let owners = applied_paths
                    .iter()
                    .map(|(p, _)| (p.clone(), manager.clone()))
                    .collect();
                meta_mut(&mut obj).remove("resourceVersion");
                let stored = st.store(ki, &key, obj, Some(owners));
                return Ok((StatusCode::CREATED, stored));
            };
            conflict_rv(&applied, &old.obj)?;
            if !force {
                let conflicts: Vec<String> = applied_paths
                    .iter()
                    .filter(|(p, v)| {
                        old.obj.pointer(p).is_some_and(|cur| cur != v)
                            && old.owners.get(p).is_some_and(|o| *o != manager)
                    })
                    .map(|(p, _)| format!("conflict with \"{}\": {p}", old.owners[p]))
                    .collect();
                if !conflicts.is_empty() {
                    return Err(ApiErr::new(
                        409,
                        "Conflict",
                        format!(
                            "Apply failed with {} conflicts: {}",
                            conflicts.len(),
                            conflicts.join(", ")
                        ),
                    ));
                }
            }
            let mut merged = old.obj.clone();
            deep_merge(&mut merged, &applied);
            let new = restrict(ki, sub, &old.obj, merged);
            let mut owners = old.owners.clone();
            for (p, _) in &applied_paths {
                if new.pointer(p).is_some() {
                    owners.insert(p.clone(), manager.clone());
                }
            }
            owners.retain(|p, _| new.pointer(p).is_some());
            let stored = st.store(ki, &key, new, Some(owners));
            Ok((StatusCode::OK, stored))
        }
        "application/merge-patch+json" | "application/strategic-merge-patch+json" | "application/json-patch+json" => {
            let Some(old) = st.objects.get(&key) else {
                return Err(ApiErr::not_found(ki, name));
            };
            let mut merged = old.obj.clone();
            if ct == "application/json-patch+json" {
                let mut ops: Vec<Value> = serde_json::from_slice(body)
                    .map_err(|e| ApiErr::new(400, "BadRequest", format!("invalid json patch: {e}")))?;
                // Like the API server (evanphx/json-patch), `test` of a missing path against null succeeds.
                ops.retain(|op| {
                    !(op["op"] == "test"
                        && op["value"].is_null()
                        && op["path"].as_str().is_some_and(|p| merged.pointer(p).is_none()))
                });
                let p: json_patch::Patch = serde_json::from_value(Value::Array(ops))
                    .map_err(|e| ApiErr::new(400, "BadRequest", format!("invalid json patch: {e}")))?;
                json_patch::patch(&mut merged, &p)
                    .map_err(|e| ApiErr::new(422, "Invalid", format!("the server rejected our request: {e}")))?;
            } else {
                let p = body_json(body)?;
                conflict_rv(&p, &old.obj)?;
                json_patch::merge(&mut merged, &p);
            }
            if !merged.is_object() {
                return Err(ApiErr::new(422, "Invalid", "patch produced a non-object"));
            }
            let new = restrict(ki, sub, &old.obj, merged);
            let owners = owners_after_update(old, &new, manager.as_deref().unwrap_or("unknown"));
            let stored = st.store(ki, &key, new, Some(owners));
            Ok((StatusCode::OK, stored))
        }
        other => Err(ApiErr::new(
            415,
            "UnsupportedMediaType",
            format!("the body of the request was in an unknown format: {other}"),
        )),
    }
}

fn delete(
    st: &mut State,
    ki: &KindInfo,
    ns: Option<String>,
    name: &str,
    body: &[u8],
) -> Result<(StatusCode, Value), ApiErr> {
    let key = State::key(ki, ns.as_deref(), name);
    let Some(cur) = st.objects.get(&key) else {
        return Err(ApiErr::not_found(ki, name));
    };
    if let Some(pre) = parse_body(body).and_then(|b| b.get("preconditions").cloned()) {
        let uid_ok = pre
            .get("uid")
            .and_then(Value::as_str)
            .is_none_or(|u| Some(u) == meta_str(&cur.obj, "uid"));
        let rv_ok = pre
            .get("resourceVersion")
            .and_then(Value::as_str)
            .is_none_or(|r| Some(r) == meta_str(&cur.obj, "resourceVersion"));
        if !uid_ok || !rv_ok {
            return Err(ApiErr::new(409, "Conflict", "Precondition failed"));
        }
    }
    let (obj, gone) = st.delete(ki, &key).ok_or_else(|| ApiErr::not_found(ki, name))?;
    if gone {
        Ok((
            StatusCode::OK,
            json!({
                "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
                "details": {"name": name, "group": ki.group, "kind": ki.plural, "uid": meta_str(&obj, "uid")},
            }),
        ))
    } else {
        Ok((StatusCode::OK, obj))
    }
}

// ---------- watch ----------

struct WatchCtx {
    shared: Arc<Shared>,
    resource: String,
    ki: KindInfo,
    filter: Filter,
    last_rv: u64,
    deadline: tokio::time::Instant,
    bookmarks: bool,
    pending: VecDeque<Bytes>,
    done: bool,
    rx: tokio::sync::watch::Receiver<u64>,
}

fn line(typ: &str, object: &Value) -> Bytes {
    let mut s = json!({"type": typ, "object": object}).to_string();
    s.push('\n');
    Bytes::from(s)
}

fn bookmark(ki: &KindInfo, rv: u64, initial_end: bool) -> Value {
    let mut m = json!({"resourceVersion": rv.to_string()});
    if initial_end {
        m["annotations"] = json!({"k8s.io/initial-events-end": "true"});
    }
    json!({"kind": ki.kind, "apiVersion": ki.api_version(), "metadata": m})
}

fn watch(shared: Arc<Shared>, ki: KindInfo, ns: Option<String>, q: &BTreeMap<String, String>) -> Response {
    let timeout = q
        .get("timeoutSeconds")
        .and_then(|s| s.parse::<u64>().ok())
        .unwrap_or(1800);
    let bookmarks = matches!(q.get("allowWatchBookmarks").map(String::as_str), Some("true" | "1"));
    let send_initial = matches!(q.get("sendInitialEvents").map(String::as_str), Some("true" | "1"));
    let rv_param = q.get("resourceVersion").cloned().unwrap_or_default();
    let mut rx = shared.notify.subscribe();
    rx.borrow_and_update();
    let mut ctx = WatchCtx {
        shared: shared.clone(),
        resource: ki.resource_key(),
        filter: Filter::from_query(ns, q),
        ki: ki.clone(),
        last_rv: 0,
        deadline: tokio::time::Instant::now() + Duration::from_secs(timeout),
        bookmarks,
        pending: VecDeque::new(),
        done: false,
        rx,
    };
    {
        let st = shared.lock();
        if send_initial || rv_param.is_empty() || rv_param == "0" {
            for ((r, n, _), s) in st.objects.iter() {
                if *r == ctx.resource && ctx.filter.matches(n, &s.obj) {
                    ctx.pending.push_back(line("ADDED", &s.obj));
                }
            }
            ctx.last_rv = st.rv;
            if send_initial && bookmarks {
                ctx.pending.push_back(line("BOOKMARK", &bookmark(&ki, st.rv, true)));
            }
        } else {
            match rv_param.parse::<u64>() {
                Ok(rv) if rv >= st.history_floor => ctx.last_rv = rv,
                _ => {
                    let status = ApiErr::new(410, "Expired", format!("too old resource version: {rv_param}"));
                    ctx.pending.push_back(line("ERROR", &status.status_json()));
                    ctx.done = true;
                }
            }
        }
    }
    let stream = futures::stream::unfold(ctx, |mut ctx| async move {
        loop {
            if let Some(b) = ctx.pending.pop_front() {
                return Some((Ok::<Bytes, std::convert::Infallible>(b), ctx));
            }
            if ctx.done {
                return None;
            }
            ctx.rx.borrow_and_update();
            {
                let st = ctx.shared.lock();
                if st.closed {
                    return None;
                }
                for ev in st.history.iter().filter(|e| e.rv > ctx.last_rv) {
                    if ev.resource != ctx.resource {
                        continue;
                    }
                    let now = ctx.filter.matches(&ev.ns, &ev.object);
                    let before = ev.previous.as_ref().map(|p| ctx.filter.matches(&ev.ns, p));
                    // like the watch cache: objects entering/leaving a selector are ADDED/DELETED
                    let typ = match (ev.typ, before, now) {
                        ("MODIFIED", Some(false), true) => "ADDED",
                        ("MODIFIED", Some(true), false) => "DELETED",
                        (t, _, true) => t,
                        _ => continue,
                    };
                    ctx.pending.push_back(line(typ, &ev.object));
                }
                ctx.last_rv = ctx.last_rv.max(st.rv);
            }
            if !ctx.pending.is_empty() {
                continue;
            }
            let bookmark_sleep = if ctx.bookmarks {
                BOOKMARK_INTERVAL
            } else {
                Duration::from_secs(3600)
            };
            tokio::select! {
                r = ctx.rx.changed() => {
                    if r.is_err() {
                        return None;
                    }
                }
                _ = tokio::time::sleep_until(ctx.deadline) => return None,
                _ = tokio::time::sleep(bookmark_sleep) => {
                    if ctx.bookmarks {
                        ctx.pending.push_back(line("BOOKMARK", &bookmark(&ctx.ki, ctx.last_rv, false)));
                    }
                }
            }
        }
    });
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from_stream(stream))
        .expect("watch response")
}
