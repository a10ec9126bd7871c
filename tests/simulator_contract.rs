//! Contract test for the Bitbucket Cloud simulator.
//!
//! Starts the simulator in-process, calls every 2.0 endpoint it serves with a
//! plain HTTP client, and validates each response body against the response
//! schema for that path, method and status in Atlassian's official OpenAPI
//! document (`tests/data/bitbucket-openapi.json`). On top of JSON-schema
//! validation, a strict pass reports every property the response carries that
//! the schema does not declare (the official schemas allow additional
//! properties almost everywhere, so validation alone would never notice).
//! Every such property must be on [`CONTRACT_DIFFERENCES`], where the contract
//! (`shared/bitbucket/API-CONTRACT.md`) wins over the schema.
//!
//! The remaining tests pin the behaviour clients rely on: the 1.0 groups API,
//! the retired `/2.0/workspaces`, the credential rules, paging errors, HTML
//! 404s, 429 with `Retry-After`, injected faults, writes, OAuth token
//! lifetime, latency and the CLI.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use base64::Engine;
use bitbucket_operator::simulator::{Organisation, RateLimit, SimConfig, SimCredentials, Simulator, SimulatorHandle};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

// ---------------------------------------------------------------------------
// Schema differences where the contract wins.

/// Properties the simulator returns that the official schema does not
/// declare, as `schema.property`. Each entry says why the contract wins.
const CONTRACT_DIFFERENCES: &[(&str, &str)] = &[
    (
        "repository.slug",
        "API-CONTRACT 3a: `slug` is returned in practice but missing from the `repository` schema",
    ),
    (
        "repository.workspace",
        "API-CONTRACT 3a: `workspace` replaced `owner` in 2020 and is returned, but is missing from the schema",
    ),
    (
        "workspace_membership.permission",
        "API-CONTRACT 3a: /workspaces/{ws}/permissions and /user/workspaces/{ws}/permission carry `permission` (owner|member)",
    ),
    (
        "workspace_membership.added_on",
        "API-CONTRACT 3a/8: `added_on` appears on permission listings (absent for admin.atlassian.com workspaces)",
    ),
    (
        "workspace_membership.last_accessed",
        "API-CONTRACT 3a/8: `last_accessed` appears on permission listings (absent for admin.atlassian.com workspaces)",
    ),
    (
        "user.email",
        "API-CONTRACT 2/3a: emails appear only with fields=+values.user.email on member listings",
    ),
    (
        "team.username",
        "Bitbucket returns the workspace slug as `username` on team-typed owner accounts",
    ),
];

/// Schema patches, also contract-wins differences: applied to the official
/// document before validation because the schema forbids the property
/// (`additionalProperties: false`).
const SCHEMA_PATCHES: &[(&str, &str)] = &[(
    "error.error.fields",
    "API-CONTRACT 7: 400 validation errors carry `error.fields` ({field: [messages]}); the official `error` schema closes `error` with additionalProperties:false and lacks `fields`",
)];

// ---------------------------------------------------------------------------
// OpenAPI loading, $ref resolution and nullable conversion.

struct Spec {
    doc: Value,
    /// components.schemas after nullable conversion and patches.
    components: Value,
    validators: Mutex<HashMap<String, std::sync::Arc<jsonschema::Validator>>>,
}

fn spec() -> &'static Spec {
    static SPEC: OnceLock<Spec> = OnceLock::new();
    SPEC.get_or_init(|| {
        let raw = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/data/bitbucket-openapi.json"
        ))
        .expect("read the OpenAPI document");
        let doc: Value = serde_json::from_str(&raw).expect("parse the OpenAPI document");
        let mut components = doc["components"]["schemas"].clone();
        convert_nullable(&mut components);
        // SCHEMA_PATCHES[0]: error.error.fields
        components["error"]["properties"]["error"]["properties"]["fields"] = json!({
            "type": "object",
            "additionalProperties": {"type": "array", "items": {"type": "string"}}
        });
        assert_eq!(SCHEMA_PATCHES.len(), 1, "apply every listed patch above");
        Spec {
            doc,
            components,
            validators: Mutex::new(HashMap::new()),
        }
    })
}

/// OpenAPI 3.0 `nullable: true` becomes a JSON-schema type union with null.
fn convert_nullable(v: &mut Value) {
    match v {
        Value::Object(map) => {
            if map.remove("nullable") == Some(Value::Bool(true)) {
                match map.get("type").cloned() {
                    Some(Value::String(t)) => {
                        map.insert("type".into(), json!([t, "null"]));
                    }
                    _ => {
                        let inner = Value::Object(std::mem::take(map));
                        map.insert("anyOf".into(), json!([inner, {"type": "null"}]));
                    }
                }
            }
            for (_, child) in map.iter_mut() {
                convert_nullable(child);
            }
        }
        Value::Array(items) => items.iter_mut().for_each(convert_nullable),
        _ => {}
    }
}

/// The response schema for `path` (an OpenAPI template), method and status.
fn response_schema(path: &str, method: &str, status: u16) -> Value {
    let op = &spec().doc["paths"][path][method];
    assert!(op.is_object(), "no operation {method} {path} in the OpenAPI doc");
    let resp = &op["responses"][status.to_string()];
    let schema = &resp["content"]["application/json"]["schema"];
    assert!(
        schema.is_object(),
        "no JSON schema for {method} {path} {status} in the OpenAPI doc"
    );
    let mut schema = schema.clone();
    convert_nullable(&mut schema);
    schema
}

fn validator(path: &str, method: &str, status: u16) -> std::sync::Arc<jsonschema::Validator> {
    let key = format!("{method} {path} {status}");
    let mut cache = spec().validators.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(v) = cache.get(&key) {
        return v.clone();
    }
    // The whole components section travels with the root so that every
    // `#/components/schemas/...` reference resolves in place.
    let mut root = json!({"allOf": [response_schema(path, method, status)]});
    root["components"] = json!({"schemas": spec().components.clone()});
    let v = std::sync::Arc::new(jsonschema::validator_for(&root).unwrap_or_else(|e| panic!("compile {key}: {e}")));
    cache.insert(key, v.clone());
    v
}

fn resolve(schema: &Value) -> (&Value, Option<String>) {
    if let Some(r) = schema.get("$ref").and_then(Value::as_str) {
        let name = r.trim_start_matches("#/components/schemas/");
        let target = &spec().components[name];
        let (t, inner) = resolve(target);
        return (t, inner.or_else(|| Some(name.to_string())));
    }
    (schema, None)
}

/// Whether component `name` is `base` or extends it through `allOf`.
fn extends(name: &str, base: &str) -> bool {
    if name == base {
        return true;
    }
    spec().components[name]["allOf"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| s.get("$ref").and_then(Value::as_str))
        .any(|r| extends(r.trim_start_matches("#/components/schemas/"), base))
}

/// Declared properties of a schema, merging `allOf`, with the component name
/// that declares each; the discriminator (`type`) picks a derived component.
fn declared(schema: &Value, instance: &Value, out: &mut HashMap<String, Vec<(Value, String)>>, owner: &str) {
    let (s, name) = resolve(schema);
    let mut owner = name.unwrap_or_else(|| owner.to_string());
    if let Some(t) = instance.get("type").and_then(Value::as_str)
        && t != owner
        && spec().components.get(t).is_some()
        && extends(t, &owner)
    {
        owner = t.to_string();
        let s = spec().components[t].clone();
        declared(&s, &Value::Null, out, &owner);
        return;
    }
    if let Some(props) = s.get("properties").and_then(Value::as_object) {
        for (k, v) in props {
            out.entry(k.clone()).or_default().push((v.clone(), owner.clone()));
        }
    }
    for part in ["allOf", "anyOf", "oneOf"] {
        for sub in s.get(part).and_then(Value::as_array).into_iter().flatten() {
            declared(sub, &Value::Null, out, &owner);
        }
    }
}

/// Reports `component.property` for every property in `instance` that the
/// schema does not declare.
fn undeclared(schemas: &[(Value, String)], instance: &Value, out: &mut BTreeSet<String>) {
    match instance {
        Value::Object(map) => {
            let mut decl = HashMap::new();
            let mut owners = Vec::new();
            let mut open_ended = false;
            for (s, owner) in schemas {
                let (r, name) = resolve(s);
                owners.push(name.clone().unwrap_or_else(|| owner.clone()));
                let no_props = r
                    .get("properties")
                    .and_then(Value::as_object)
                    .is_none_or(|p| p.is_empty());
                if no_props && r.get("allOf").is_none() && r.get("anyOf").is_none() && r.get("$ref").is_none() {
                    // A free-form object (e.g. `data`, `fields`).
                    open_ended = true;
                }
                declared(s, instance, &mut decl, owner);
            }
            if open_ended {
                return;
            }
            let owner = instance
                .get("type")
                .and_then(Value::as_str)
                .filter(|t| spec().components.get(*t).is_some())
                .map(str::to_string)
                .or_else(|| owners.last().cloned())
                .unwrap_or_default();
            for (k, v) in map {
                match decl.get(k) {
                    Some(subs) => undeclared(subs, v, out),
                    None => {
                        out.insert(format!("{owner}.{k}"));
                    }
                }
            }
        }
        Value::Array(items) => {
            let item_schemas: Vec<(Value, String)> = schemas
                .iter()
                .filter_map(|(s, o)| resolve(s).0.get("items").map(|i| (i.clone(), o.clone())))
                .collect();
            for it in items {
                undeclared(&item_schemas, it, out);
            }
        }
        _ => {}
    }
}

/// Which operations were validated, and all undeclared properties seen.
#[derive(Default)]
struct Coverage {
    operations: BTreeSet<String>,
    undeclared: BTreeSet<String>,
}

static COVERAGE: OnceLock<Mutex<Coverage>> = OnceLock::new();

fn coverage() -> &'static Mutex<Coverage> {
    COVERAGE.get_or_init(|| Mutex::new(Coverage::default()))
}

/// Validates an error body against the official `error` component (with
/// the `fields` patch).
fn check_error(body: &Value) {
    static ERROR: OnceLock<jsonschema::Validator> = OnceLock::new();
    let v = ERROR.get_or_init(|| {
        let mut root = json!({"$ref": "#/components/schemas/error"});
        root["components"] = json!({"schemas": spec().components.clone()});
        jsonschema::validator_for(&root).expect("compile the error schema")
    });
    let errors: Vec<String> = v.iter_errors(body).map(|e| e.to_string()).collect();
    assert!(
        errors.is_empty(),
        "error body {body} does not match the schema: {errors:?}"
    );
    assert_eq!(body["type"], "error");
    assert!(body["error"]["message"].is_string());
}

/// Validates `body` against the official schema and the allow-list.
fn check(path: &str, method: &str, status: u16, body: &Value) {
    let v = validator(path, method, status);
    let errors: Vec<String> = v
        .iter_errors(body)
        .map(|e| format!("{} at {}", e, e.instance_path()))
        .collect();
    assert!(
        errors.is_empty(),
        "{method} {path} {status}: body does not match the official schema:\n{}\nbody: {}",
        errors.join("\n"),
        serde_json::to_string_pretty(body).unwrap()
    );
    let mut extra = BTreeSet::new();
    undeclared(
        &[(response_schema(path, method, status), String::new())],
        body,
        &mut extra,
    );
    let allowed: HashSet<&str> = CONTRACT_DIFFERENCES.iter().map(|(k, _)| *k).collect();
    let unexpected: Vec<&String> = extra.iter().filter(|k| !allowed.contains(k.as_str())).collect();
    assert!(
        unexpected.is_empty(),
        "{method} {path} {status}: properties not in the official schema and not on CONTRACT_DIFFERENCES: {unexpected:?}"
    );
    let mut c = coverage().lock().unwrap_or_else(|e| e.into_inner());
    c.operations
        .insert(format!("{} {path} {status}", method.to_uppercase()));
    c.undeclared.extend(extra);
}

// ---------------------------------------------------------------------------
// HTTP helpers.

#[derive(Clone)]
enum Cred {
    Basic(String, String),
    Bearer(String),
    None,
}

struct Api {
    client: reqwest::Client,
    base: String,
}

struct Resp {
    status: StatusCode,
    headers: reqwest::header::HeaderMap,
    text: String,
}

impl Resp {
    fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text))
    }
}

impl Api {
    fn new(base: &str) -> Api {
        Api {
            client: reqwest::Client::new(),
            base: base.to_string(),
        }
    }

    async fn call(&self, method: Method, url: &str, cred: &Cred, body: Option<Value>) -> Resp {
        let url = if url.starts_with("http") {
            url.to_string()
        } else {
            format!("{}{url}", self.base)
        };
        let mut req = self.client.request(method, &url);
        req = match cred {
            Cred::Basic(u, p) => req.basic_auth(u, Some(p)),
            Cred::Bearer(t) => req.bearer_auth(t),
            Cred::None => req,
        };
        if let Some(b) = body {
            req = req.json(&b);
        }
        let r = req.send().await.expect("request");
        Resp {
            status: r.status(),
            headers: r.headers().clone(),
            text: r.text().await.expect("body"),
        }
    }

    async fn get(&self, url: &str, cred: &Cred) -> Resp {
        self.call(Method::GET, url, cred, None).await
    }

    /// GET, expect `status`, validate against the schema, return the body.
    async fn get_ok(&self, url: &str, cred: &Cred, template: &str) -> Value {
        let r = self.get(url, cred).await;
        assert_eq!(r.status, StatusCode::OK, "GET {url}: {}", r.text);
        let v = r.json();
        check(template, "get", 200, &v);
        v
    }

    /// Follows `next` from `url` and validates every page; returns all values.
    async fn walk(&self, url: &str, cred: &Cred, template: &str) -> Vec<Value> {
        let mut out = Vec::new();
        let mut next = Some(url.to_string());
        let mut size = None;
        let mut pages = 0;
        while let Some(u) = next {
            let page = self.get_ok(&u, cred, template).await;
            pages += 1;
            assert!(pages < 10_000, "pagination does not terminate");
            size = page["size"].as_u64().or(size);
            out.extend(page["values"].as_array().cloned().unwrap_or_default());
            next = page["next"].as_str().map(str::to_string);
            if let Some(n) = &next {
                assert!(n.starts_with(&self.base), "next must be absolute: {n}");
            }
        }
        if let Some(size) = size {
            assert_eq!(out.len() as u64, size, "walking {url} must yield `size` values");
        }
        out
    }
}

fn basic(c: &SimCredentials) -> Cred {
    Cred::Basic(c.email.clone(), c.api_token.clone())
}

fn enc(s: &str) -> String {
    urlencoding::encode(s).into_owned()
}

async fn start(config: SimConfig) -> (SimulatorHandle, Api) {
    let h = Simulator::start(config, "127.0.0.1:0".parse().unwrap())
        .await
        .expect("start simulator");
    let api = Api::new(&h.base_url());
    (h, api)
}

async fn oauth_token(api: &Api, c: &SimCredentials) -> Resp {
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{}:{}", c.consumer_key, c.consumer_secret));
    let r = api
        .client
        .post(format!("{}/site/oauth2/access_token", api.base))
        .header("Authorization", format!("Basic {auth}"))
        .form(&[("grant_type", "client_credentials")])
        .send()
        .await
        .unwrap();
    Resp {
        status: r.status(),
        headers: r.headers().clone(),
        text: r.text().await.unwrap(),
    }
}

// ---------------------------------------------------------------------------
// The contract walk.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_served_2_0_endpoint_matches_the_official_schema() {
    let (h, api) = start(SimConfig::default()).await;
    let c = h.credentials().clone();
    let b = basic(&c);
    let org = h.organisation();
    let ws = &org.workspaces[0];
    let slug = &ws.slug;

    // User and workspace discovery.
    let me = api.get_ok("/2.0/user", &b, "/user").await;
    assert_eq!(me["uuid"], c.admin_uuid.as_str());
    assert_eq!(me["account_status"], "active");
    let some_user = &org.users[1];
    let u = api
        .get_ok(
            &format!("/2.0/users/{}", enc(&some_user.uuid)),
            &b,
            "/users/{selected_user}",
        )
        .await;
    assert_eq!(u["account_id"], some_user.account_id.as_str());

    let access = api.walk("/2.0/user/workspaces?pagelen=1", &b, "/user/workspaces").await;
    assert_eq!(access.len(), org.workspaces.len());
    assert!(
        access
            .iter()
            .all(|a| a["administrator"] == true && a["type"] == "workspace_access")
    );
    let filtered = api
        .get_ok(
            &format!("/2.0/user/workspaces?q={}", enc(&format!("slug=\"{slug}\""))),
            &b,
            "/user/workspaces",
        )
        .await;
    assert_eq!(filtered["values"].as_array().unwrap().len(), 1);
    assert_eq!(filtered["values"][0]["workspace"]["slug"], slug.as_str());
    let none = api
        .get_ok("/2.0/user/workspaces?administrator=false", &b, "/user/workspaces")
        .await;
    assert_eq!(none["values"], json!([]));
    let perm = api
        .get_ok(
            &format!("/2.0/user/workspaces/{slug}/permission"),
            &b,
            "/user/workspaces/{workspace}/permission",
        )
        .await;
    assert_eq!(perm["permission"], "owner");

    // Workspace by slug and by {uuid}.
    let w = api
        .get_ok(&format!("/2.0/workspaces/{slug}"), &b, "/workspaces/{workspace}")
        .await;
    assert_eq!(w["uuid"], ws.uuid.as_str());
    let w2 = api
        .get_ok(
            &format!("/2.0/workspaces/{}", enc(&ws.uuid)),
            &b,
            "/workspaces/{workspace}",
        )
        .await;
    assert_eq!(w2["slug"], slug.as_str());
    let r = api.get("/2.0/workspaces/no-such-ws", &b).await;
    assert_eq!(r.status, 404);
    check("/workspaces/{workspace}", "get", 404, &r.json());

    // Members: multi-page walk, no permission field, email only on request.
    let members = api
        .walk(
            &format!("/2.0/workspaces/{slug}/members?pagelen=7"),
            &b,
            "/workspaces/{workspace}/members",
        )
        .await;
    assert_eq!(members.len(), ws.members.len());
    let uuids: HashSet<&str> = members.iter().map(|m| m["user"]["uuid"].as_str().unwrap()).collect();
    assert_eq!(uuids.len(), members.len(), "no duplicates across pages");
    assert!(
        members
            .iter()
            .all(|m| m.get("permission").is_none() && m["user"].get("email").is_none())
    );
    let with_email = api
        .walk(
            &format!("/2.0/workspaces/{slug}/members?pagelen=50&fields=%2Bvalues.user.email"),
            &b,
            "/workspaces/{workspace}/members",
        )
        .await;
    assert!(
        with_email
            .iter()
            .all(|m| m["user"]["email"].as_str().is_some_and(|e| e.contains('@')))
    );
    let member = &ws.members[1];
    let one = api
        .get_ok(
            &format!("/2.0/workspaces/{slug}/members/{}", enc(&member.user_uuid)),
            &b,
            "/workspaces/{workspace}/members/{member}",
        )
        .await;
    assert_eq!(one["user"]["uuid"], member.user_uuid.as_str());
    let acct = &org.user(&member.user_uuid).unwrap().account_id;
    api.get_ok(
        &format!("/2.0/workspaces/{slug}/members/{}", enc(acct)),
        &b,
        "/workspaces/{workspace}/members/{member}",
    )
    .await;
    let outsider = org
        .users
        .iter()
        .find(|u| !ws.members.iter().any(|m| m.user_uuid == u.uuid))
        .expect("a non-member");
    let r = api
        .get(&format!("/2.0/workspaces/{slug}/members/{}", enc(&outsider.uuid)), &b)
        .await;
    assert_eq!(r.status, 404);
    check("/workspaces/{workspace}/members/{member}", "get", 404, &r.json());

    // Workspace permissions with q=permission="owner".
    let perms = api
        .walk(
            &format!("/2.0/workspaces/{slug}/permissions?pagelen=100"),
            &b,
            "/workspaces/{workspace}/permissions",
        )
        .await;
    assert_eq!(perms.len(), ws.members.len());
    let owners = api
        .walk(
            &format!("/2.0/workspaces/{slug}/permissions?q={}", enc("permission=\"owner\"")),
            &b,
            "/workspaces/{workspace}/permissions",
        )
        .await;
    let expected_owners = ws.members.iter().filter(|m| m.owner).count();
    assert_eq!(owners.len(), expected_owners);
    assert!(owners.iter().all(|o| o["permission"] == "owner"));

    // Effective repository permissions.
    api.walk(
        &format!("/2.0/workspaces/{slug}/permissions/repositories?pagelen=100"),
        &b,
        "/workspaces/{workspace}/permissions/repositories",
    )
    .await;
    let repo = &ws.repositories[0];
    api.walk(
        &format!("/2.0/workspaces/{slug}/permissions/repositories/{}", repo.slug),
        &b,
        "/workspaces/{workspace}/permissions/repositories/{repo_slug}",
    )
    .await;

    // Projects and repositories.
    let projects = api
        .walk(
            &format!("/2.0/workspaces/{slug}/projects?pagelen=2"),
            &b,
            "/workspaces/{workspace}/projects",
        )
        .await;
    assert_eq!(projects.len(), ws.projects.len());
    let project = &ws.projects[0];
    let p = api
        .get_ok(
            &format!("/2.0/workspaces/{slug}/projects/{}", project.key),
            &b,
            "/workspaces/{workspace}/projects/{project_key}",
        )
        .await;
    assert_eq!(p["uuid"], project.uuid.as_str());
    let r = api.get(&format!("/2.0/workspaces/{slug}/projects/NOPE"), &b).await;
    assert_eq!(r.status, 404);
    check("/workspaces/{workspace}/projects/{project_key}", "get", 404, &r.json());

    let repos = api
        .walk(
            &format!("/2.0/repositories/{slug}?pagelen=4"),
            &b,
            "/repositories/{workspace}",
        )
        .await;
    assert_eq!(repos.len(), ws.repositories.len());
    for r in &repos {
        let s = r["slug"].as_str().unwrap();
        assert_eq!(r["full_name"], format!("{slug}/{s}").as_str());
        assert_eq!(r["workspace"]["slug"], slug.as_str());
        assert!(r["project"]["key"].is_string() && r["mainbranch"]["name"].is_string());
    }
    let in_project = api
        .walk(
            &format!(
                "/2.0/repositories/{slug}?q={}",
                enc(&format!("project.key=\"{}\"", project.key))
            ),
            &b,
            "/repositories/{workspace}",
        )
        .await;
    let expected = ws.repositories.iter().filter(|r| r.project_key == project.key).count();
    assert_eq!(in_project.len(), expected);
    let one_repo = api
        .get_ok(
            &format!("/2.0/repositories/{slug}/{}", repo.slug),
            &b,
            "/repositories/{workspace}/{repo_slug}",
        )
        .await;
    assert_eq!(one_repo["uuid"], repo.uuid.as_str());
    api.get_ok(
        &format!("/2.0/repositories/{}/{}", enc(&ws.uuid), enc(&repo.uuid)),
        &b,
        "/repositories/{workspace}/{repo_slug}",
    )
    .await;
    let r = api.get(&format!("/2.0/repositories/{slug}/nope"), &b).await;
    assert_eq!(r.status, 404);
    check("/repositories/{workspace}/{repo_slug}", "get", 404, &r.json());

    // Project permissions-config: list, single, PUT, DELETE, errors.
    let pbase = format!("/2.0/workspaces/{slug}/projects/{}/permissions-config", project.key);
    let pt = "/workspaces/{workspace}/projects/{project_key}/permissions-config";
    let users = api
        .walk(&format!("{pbase}/users?pagelen=1"), &b, &format!("{pt}/users"))
        .await;
    assert_eq!(users.len(), project.user_permissions.len());
    api.walk(&format!("{pbase}/groups"), &b, &format!("{pt}/groups")).await;
    let target = ws
        .members
        .iter()
        .find(|m| !m.owner && !project.user_permissions.iter().any(|p| p.principal == m.user_uuid))
        .expect("a non-owner member without a grant");
    let target_user = org.user(&target.user_uuid).unwrap();
    let put = api
        .call(
            Method::PUT,
            &format!("{pbase}/users/{}", enc(&target_user.account_id)),
            &b,
            Some(json!({"permission": "create-repo"})),
        )
        .await;
    assert_eq!(put.status, 200, "{}", put.text);
    check(&format!("{pt}/users/{{selected_user_id}}"), "put", 200, &put.json());
    assert_eq!(put.json()["permission"], "create-repo");
    assert_eq!(put.json()["user"]["uuid"], target_user.uuid.as_str());
    let single = api
        .get_ok(
            &format!("{pbase}/users/{}", enc(&target_user.uuid)),
            &b,
            &format!("{pt}/users/{{selected_user_id}}"),
        )
        .await;
    assert_eq!(single["permission"], "create-repo");
    // Usernames (nicknames) are accepted on project endpoints.
    api.get_ok(
        &format!("{pbase}/users/{}", target_user.nickname),
        &b,
        &format!("{pt}/users/{{selected_user_id}}"),
    )
    .await;
    let bad = api
        .call(
            Method::PUT,
            &format!("{pbase}/users/{}", enc(&target_user.uuid)),
            &b,
            Some(json!({"permission": "owner"})),
        )
        .await;
    assert_eq!(bad.status, 400);
    assert!(bad.json()["error"]["fields"]["permission"].is_array());
    check(&format!("{pt}/users/{{selected_user_id}}"), "put", 400, &bad.json());
    let extra = api
        .call(
            Method::PUT,
            &format!("{pbase}/users/{}", enc(&target_user.uuid)),
            &b,
            Some(json!({"permission": "read", "user": "x"})),
        )
        .await;
    assert_eq!(extra.status, 400);
    let group = &ws.groups[0];
    let gput = api
        .call(
            Method::PUT,
            &format!("{pbase}/groups/{}", group.slug),
            &b,
            Some(json!({"permission": "admin"})),
        )
        .await;
    assert_eq!(gput.status, 200, "{}", gput.text);
    check(&format!("{pt}/groups/{{group_slug}}"), "put", 200, &gput.json());
    api.get_ok(
        &format!("{pbase}/groups/{}", group.slug),
        &b,
        &format!("{pt}/groups/{{group_slug}}"),
    )
    .await;
    let del = api
        .call(
            Method::DELETE,
            &format!("{pbase}/users/{}", enc(&target_user.uuid)),
            &b,
            None,
        )
        .await;
    assert_eq!(del.status, 204);
    let gone = api.get(&format!("{pbase}/users/{}", enc(&target_user.uuid)), &b).await;
    assert_eq!(gone.status, 404);
    check(&format!("{pt}/users/{{selected_user_id}}"), "get", 404, &gone.json());
    let gdel = api
        .call(Method::DELETE, &format!("{pbase}/groups/{}", group.slug), &b, None)
        .await;
    assert_eq!(gdel.status, 204);
    let unknown = api.get(&format!("{pbase}/groups/no-such-group"), &b).await;
    assert_eq!(unknown.status, 404);

    // Repository permissions-config.
    let rbase = format!("/2.0/repositories/{slug}/{}/permissions-config", repo.slug);
    let rt = "/repositories/{workspace}/{repo_slug}/permissions-config";
    let rusers = api.walk(&format!("{rbase}/users"), &b, &format!("{rt}/users")).await;
    assert_eq!(rusers.len(), repo.user_permissions.len());
    api.walk(&format!("{rbase}/groups"), &b, &format!("{rt}/groups")).await;
    let rput = api
        .call(
            Method::PUT,
            &format!("{rbase}/users/{}", enc(&target_user.uuid)),
            &b,
            Some(json!({"permission": "write"})),
        )
        .await;
    assert_eq!(rput.status, 200, "{}", rput.text);
    check(&format!("{rt}/users/{{selected_user_id}}"), "put", 200, &rput.json());
    api.get_ok(
        &format!("{rbase}/users/{}", enc(&target_user.uuid)),
        &b,
        &format!("{rt}/users/{{selected_user_id}}"),
    )
    .await;
    let rbad = api
        .call(
            Method::PUT,
            &format!("{rbase}/users/{}", enc(&target_user.uuid)),
            &b,
            Some(json!({"permission": "create-repo"})),
        )
        .await;
    assert_eq!(rbad.status, 400, "create-repo is not a repository permission");
    check(&format!("{rt}/users/{{selected_user_id}}"), "put", 400, &rbad.json());
    let rgput = api
        .call(
            Method::PUT,
            &format!("{rbase}/groups/{}", group.slug),
            &b,
            Some(json!({"permission": "read"})),
        )
        .await;
    assert_eq!(rgput.status, 200);
    check(&format!("{rt}/groups/{{group_slug}}"), "put", 200, &rgput.json());
    api.get_ok(
        &format!("{rbase}/groups/{}", group.slug),
        &b,
        &format!("{rt}/groups/{{group_slug}}"),
    )
    .await;
    assert_eq!(
        api.call(Method::DELETE, &format!("{rbase}/groups/{}", group.slug), &b, None)
            .await
            .status,
        204
    );
    assert_eq!(
        api.call(
            Method::DELETE,
            &format!("{rbase}/users/{}", enc(&target_user.uuid)),
            &b,
            None
        )
        .await
        .status,
        204
    );

    // The retired /2.0/workspaces.
    let retired = api.get("/2.0/workspaces", &b).await;
    assert_eq!(retired.status, 410);
    check_error(&retired.json());
    assert_eq!(
        retired.json(),
        json!({"type": "error", "error": {
            "message": "CHANGE-2770 - Functionality has been deprecated",
            "detail": "Please read the changelog entry for more details.",
            "data": {"announcement_url": "https://developer.atlassian.com/cloud/bitbucket/changelog/#CHANGE-2770"}}})
    );

    // The other CHANGE-2770 retirements answer the same 410.
    for path in [
        "/2.0/user/permissions/workspaces",
        "/2.0/user/permissions/repositories",
        "/2.0/repositories",
    ] {
        let r = api.get(path, &b).await;
        assert_eq!(r.status, 410, "{path}");
        assert_eq!(r.json(), retired.json(), "{path}");
    }

    // 401 on /user is schema-described too.
    let unauth = api.get("/2.0/user", &Cred::None).await;
    assert_eq!(unauth.status, 401);
    check("/user", "get", 401, &unauth.json());

    {
        let cov = coverage().lock().unwrap_or_else(|e| e.into_inner());
        eprintln!(
            "validated {} operations against the official schema:\n  {}",
            cov.operations.len(),
            cov.operations.iter().cloned().collect::<Vec<_>>().join("\n  ")
        );
        eprintln!("contract differences seen: {:?}", cov.undeclared);
        let get_200: BTreeSet<&String> = cov
            .operations
            .iter()
            .filter(|o| o.starts_with("GET") && o.ends_with(" 200"))
            .collect();
        assert_eq!(get_200.len(), 22, "every served 2.0 GET endpoint: {get_200:?}");
        // Every allow-list entry is actually exercised (no stale entries).
        for (k, why) in CONTRACT_DIFFERENCES {
            assert!(
                cov.undeclared.contains(*k),
                "stale CONTRACT_DIFFERENCES entry {k} ({why})"
            );
        }
    }
    h.shutdown().await;
}

// ---------------------------------------------------------------------------
// Effective permissions.

fn rank(p: &str) -> u8 {
    match p {
        "read" => 1,
        "write" | "create-repo" => 2,
        "admin" => 3,
        _ => 0,
    }
}

/// The documented rule, computed independently from the ground truth.
fn expected_effective(org: &Organisation, w: usize) -> BTreeSet<(String, String, String)> {
    let ws = &org.workspaces[w];
    let mut out = BTreeSet::new();
    for repo in &ws.repositories {
        let project = ws.projects.iter().find(|p| p.key == repo.project_key).unwrap();
        let mut best: HashMap<&str, u8> = HashMap::new();
        let user_grants = repo.user_permissions.iter().chain(&project.user_permissions);
        for g in user_grants {
            let e = best.entry(g.principal.as_str()).or_default();
            *e = (*e).max(rank(&g.permission));
        }
        for g in repo.group_permissions.iter().chain(&project.group_permissions) {
            let group = ws.groups.iter().find(|x| x.slug == g.principal).unwrap();
            for m in &group.members {
                let e = best.entry(m.as_str()).or_default();
                *e = (*e).max(rank(&g.permission));
            }
        }
        for (u, r) in best {
            let name = ["none", "read", "write", "admin"][r as usize];
            if r > 0 {
                out.insert((repo.slug.clone(), u.to_string(), name.to_string()));
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn effective_repository_permissions_follow_the_documented_rule() {
    let (h, api) = start(SimConfig {
        users: 120,
        groups: 12,
        repositories: 40,
        ..SimConfig::default()
    })
    .await;
    let b = basic(h.credentials());
    let org = h.organisation();
    let slug = org.workspaces[0].slug.clone();
    let got: BTreeSet<(String, String, String)> = api
        .walk(
            &format!("/2.0/workspaces/{slug}/permissions/repositories?pagelen=100"),
            &b,
            "/workspaces/{workspace}/permissions/repositories",
        )
        .await
        .iter()
        .map(|v| {
            let full = v["repository"]["full_name"].as_str().unwrap();
            (
                full.split_once('/').unwrap().1.to_string(),
                v["user"]["uuid"].as_str().unwrap().to_string(),
                v["permission"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let want = expected_effective(&org, 0);
    assert!(!want.is_empty());
    assert_eq!(got, want);
    // Owners get no implicit entry: an owner appears only through grants.
    let ws0 = &org.workspaces[0];
    for m in ws0.members.iter().filter(|m| m.owner) {
        let listed = got.iter().any(|(_, u, _)| u == &m.user_uuid);
        let granted = want.iter().any(|(_, u, _)| u == &m.user_uuid);
        assert_eq!(listed, granted, "owner {}", m.user_uuid);
    }

    // A write changes the effective view.
    let ws = &org.workspaces[0];
    let repo = ws
        .repositories
        .iter()
        .find(|r| r.user_permissions.is_empty())
        .unwrap_or(&ws.repositories[0]);
    let m = ws.members.iter().find(|m| !m.owner).unwrap();
    let put = api
        .call(
            Method::PUT,
            &format!(
                "/2.0/repositories/{slug}/{}/permissions-config/users/{}",
                repo.slug,
                enc(&m.user_uuid)
            ),
            &b,
            Some(json!({"permission": "admin"})),
        )
        .await;
    assert_eq!(put.status, 200);
    let after = api
        .walk(
            &format!("/2.0/workspaces/{slug}/permissions/repositories/{}", repo.slug),
            &b,
            "/workspaces/{workspace}/permissions/repositories/{repo_slug}",
        )
        .await;
    assert!(
        after
            .iter()
            .any(|v| v["user"]["uuid"] == m.user_uuid.as_str() && v["permission"] == "admin")
    );
    assert!(expected_effective(&h.organisation(), 0).len() >= want.len());
    h.shutdown().await;
}

// ---------------------------------------------------------------------------
// 1.0 groups.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn groups_1_0_bare_array_and_member_writes() {
    let (h, api) = start(SimConfig::default()).await;
    let b = basic(h.credentials());
    let org = h.organisation();
    let ws = &org.workspaces[0];
    let slug = &ws.slug;
    let r = api.get(&format!("/1.0/groups/{slug}"), &b).await;
    assert_eq!(r.status, 200);
    let groups = r.json();
    let arr = groups.as_array().expect("a bare JSON array, no envelope");
    assert_eq!(arr.len(), ws.groups.len());
    for g in arr {
        for k in [
            "name",
            "slug",
            "permission",
            "auto_add",
            "email_forwarding_disabled",
            "owner",
            "members",
        ] {
            assert!(g.get(k).is_some(), "group lacks {k}: {g}");
        }
        for m in g["members"].as_array().unwrap() {
            for k in [
                "display_name",
                "account_id",
                "uuid",
                "nickname",
                "is_team",
                "is_staff",
                "is_active",
                "avatar",
                "resource_uri",
            ] {
                assert!(m.get(k).is_some(), "member lacks {k}: {m}");
            }
        }
    }
    // Inactive accounts show is_active:false.
    let inactive: HashSet<&str> = org
        .users
        .iter()
        .filter(|u| !u.active)
        .map(|u| u.uuid.as_str())
        .collect();
    for g in arr {
        for m in g["members"].as_array().unwrap() {
            assert_eq!(m["is_active"] == false, inactive.contains(m["uuid"].as_str().unwrap()));
        }
    }

    let group = &ws.groups[0];
    let newcomer = ws
        .members
        .iter()
        .find(|m| !group.members.contains(&m.user_uuid))
        .expect("a member outside the group");
    let murl = format!("/1.0/groups/{slug}/{}/members/{}", group.slug, enc(&newcomer.user_uuid));
    let put = api.call(Method::PUT, &murl, &b, Some(json!({}))).await;
    assert_eq!(put.status, 200, "{}", put.text);
    assert_eq!(put.json()["uuid"], newcomer.user_uuid.as_str());
    let again = api.call(Method::PUT, &murl, &b, Some(json!({}))).await;
    assert_eq!(again.status, 409, "already a member");
    let members = api
        .get(&format!("/1.0/groups/{slug}/{}/members", group.slug), &b)
        .await
        .json();
    assert!(
        members
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["uuid"] == newcomer.user_uuid.as_str())
    );
    assert!(
        h.organisation().workspaces[0].groups[0]
            .members
            .contains(&newcomer.user_uuid)
    );
    assert_eq!(api.call(Method::DELETE, &murl, &b, None).await.status, 204);
    assert_eq!(api.call(Method::DELETE, &murl, &b, None).await.status, 404);
    assert!(
        !h.organisation().workspaces[0].groups[0]
            .members
            .contains(&newcomer.user_uuid)
    );

    // Non-members of the workspace cannot join a group.
    let outsider = org
        .users
        .iter()
        .find(|u| !ws.members.iter().any(|m| m.user_uuid == u.uuid))
        .unwrap();
    let r = api
        .call(
            Method::PUT,
            &format!("/1.0/groups/{slug}/{}/members/{}", group.slug, enc(&outsider.uuid)),
            &b,
            Some(json!({})),
        )
        .await;
    assert_eq!(r.status, 404);
    // The repeatable ?group= filter.
    let filtered = api
        .get(
            &format!(
                "/1.0/groups?group={slug}/{}&group={slug}/nope&group=other/x",
                group.slug
            ),
            &b,
        )
        .await
        .json();
    assert_eq!(filtered.as_array().map(Vec::len), Some(1), "{filtered}");
    assert_eq!(filtered[0]["slug"], group.slug.as_str());
    // The 1.0 API needs the slug.
    assert_eq!(api.get(&format!("/1.0/groups/{}", enc(&ws.uuid)), &b).await.status, 404);
    // Bad JSON body is a 400, not a crash.
    let r = api
        .client
        .put(format!("{}{murl}", api.base))
        .basic_auth(&h.credentials().email, Some(&h.credentials().api_token))
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    // The 1.0 alias of project permissions-config.
    let p = &ws.projects[0];
    let r = api
        .get(
            &format!("/1.0/workspaces/{slug}/projects/{}/permissions-config/users", p.key),
            &b,
        )
        .await;
    assert_eq!(r.status, 200);
    h.shutdown().await;
}

// ---------------------------------------------------------------------------
// Credentials.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credential_rules_401_and_403() {
    let (h, api) = start(SimConfig {
        oauth_token_ttl: Duration::from_secs(1),
        ..SimConfig::default()
    })
    .await;
    let c = h.credentials().clone();
    let org = h.organisation();
    let ws = &org.workspaces[0];
    let slug = &ws.slug;
    let p = &ws.projects[0];
    let m = ws.members.iter().find(|m| !m.owner).unwrap();
    let perm_users = format!("/2.0/workspaces/{slug}/projects/{}/permissions-config/users", p.key);
    let perm_user = format!("{perm_users}/{}", enc(&m.user_uuid));

    // Missing or wrong credentials: 401 JSON envelope.
    for cred in [
        Cred::None,
        Cred::Basic(c.email.clone(), "wrong".into()),
        Cred::Basic("sim-admin".into(), c.api_token.clone()),
        Cred::Bearer("nope".into()),
    ] {
        let r = api.get("/2.0/user", &cred).await;
        assert_eq!(r.status, 401);
        check_error(&r.json());
    }
    let plain = api
        .get("/2.0/user", &Cred::Basic("sim-admin".into(), c.api_token.clone()))
        .await;
    assert!(plain.json()["error"]["message"].as_str().unwrap().contains("email"));

    // Access token: reads work, permission APIs are 403.
    let at = Cred::Bearer(c.access_token.clone());
    let me = api.get("/2.0/user", &at).await;
    assert_eq!(me.status, 200);
    assert_ne!(
        me.json()["uuid"],
        c.admin_uuid.as_str(),
        "access tokens are their own pseudo-user"
    );
    assert_eq!(api.get(&format!("/2.0/repositories/{slug}"), &at).await.status, 200);
    for url in [
        perm_users.clone(),
        format!(
            "/2.0/repositories/{slug}/{}/permissions-config/groups",
            ws.repositories[0].slug
        ),
        format!("/2.0/workspaces/{slug}/permissions"),
        format!("/2.0/workspaces/{slug}/permissions/repositories"),
        format!("/1.0/groups/{slug}"),
    ] {
        let r = api.get(&url, &at).await;
        assert_eq!(r.status, 403, "{url}");
        check(
            "/workspaces/{workspace}/projects/{project_key}/permissions-config/users",
            "get",
            403,
            &r.json(),
        );
    }

    // OAuth: issue, read permissions, cannot write, expire, revoke.
    let tok = oauth_token(&api, &c).await;
    assert_eq!(tok.status, 200, "{}", tok.text);
    let t = tok.json();
    assert_eq!(t["token_type"], "bearer");
    assert_eq!(t["expires_in"], 1);
    assert!(t["scopes"].is_string() && t["refresh_token"].is_string());
    let oauth = Cred::Bearer(t["access_token"].as_str().unwrap().to_string());
    let me = api.get("/2.0/user", &oauth).await;
    assert_eq!(me.json()["uuid"], c.admin_uuid.as_str(), "OAuth acts as the admin");
    assert_eq!(api.get(&perm_users, &oauth).await.status, 200);
    let w = api
        .call(Method::PUT, &perm_user, &oauth, Some(json!({"permission": "read"})))
        .await;
    assert_eq!(w.status, 403);
    check(
        "/workspaces/{workspace}/projects/{project_key}/permissions-config/users/{selected_user_id}",
        "put",
        403,
        &w.json(),
    );
    assert_eq!(api.call(Method::DELETE, &perm_user, &oauth, None).await.status, 403);
    assert_eq!(
        api.call(Method::PUT, &perm_user, &basic(&c), Some(json!({"permission": "read"})))
            .await
            .status,
        200
    );
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(api.get("/2.0/user", &oauth).await.status, 401, "expired");
    let fresh = Cred::Bearer(
        oauth_token(&api, &c).await.json()["access_token"]
            .as_str()
            .unwrap()
            .to_string(),
    );
    assert_eq!(api.get("/2.0/user", &fresh).await.status, 200);
    h.revoke_oauth_tokens();
    assert_eq!(api.get("/2.0/user", &fresh).await.status, 401, "revoked");
    let again = Cred::Bearer(
        oauth_token(&api, &c).await.json()["access_token"]
            .as_str()
            .unwrap()
            .to_string(),
    );
    assert_eq!(
        api.get("/2.0/user", &again).await.status,
        200,
        "a new token works after revocation"
    );

    // The refresh-token grant issues a working token.
    let issued = oauth_token(&api, &c).await.json();
    let refreshed = api
        .client
        .post(format!("{}/site/oauth2/access_token", api.base))
        .basic_auth(&c.consumer_key, Some(&c.consumer_secret))
        .form(&[
            ("grant_type", "refresh_token"),
            ("refresh_token", issued["refresh_token"].as_str().unwrap()),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(refreshed.status(), 200);
    let refreshed: Value = refreshed.json().await.unwrap();
    let rt = Cred::Bearer(refreshed["access_token"].as_str().unwrap().to_string());
    assert_eq!(api.get("/2.0/user", &rt).await.status, 200);

    // Token endpoint errors.
    let bad_client = api
        .client
        .post(format!("{}/site/oauth2/access_token", api.base))
        .basic_auth(&c.consumer_key, Some("wrong"))
        .form(&[("grant_type", "client_credentials")])
        .send()
        .await
        .unwrap();
    assert_eq!(bad_client.status(), 401);
    let bad_grant = api
        .client
        .post(format!("{}/site/oauth2/access_token", api.base))
        .basic_auth(&c.consumer_key, Some(&c.consumer_secret))
        .form(&[("grant_type", "password")])
        .send()
        .await
        .unwrap();
    assert_eq!(bad_grant.status(), 400);
    let stats = h.stats();
    assert!(stats.by_class.get("oauth").copied().unwrap_or(0) >= 5);
    assert!(stats.by_status.get(&401).copied().unwrap_or(0) >= 6);
    h.shutdown().await;
}

// ---------------------------------------------------------------------------
// Paging, partial responses and HTML 404s.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paging_errors_fields_and_html_404() {
    let (h, api) = start(SimConfig {
        max_pagelen: 50,
        ..SimConfig::default()
    })
    .await;
    let b = basic(h.credentials());
    let slug = h.organisation().workspaces[0].slug.clone();
    let r = api.get(&format!("/2.0/workspaces/{slug}/members?pagelen=51"), &b).await;
    assert_eq!(r.status, 400);
    assert_eq!(
        r.json(),
        json!({"type": "error", "error": {"message": "Invalid pagelen"}})
    );
    check("/workspaces/{workspace}/members", "get", 400, &r.json());
    assert_eq!(
        api.get(&format!("/2.0/workspaces/{slug}/members?pagelen=50"), &b)
            .await
            .status,
        200
    );

    let page = api.get(&format!("/2.0/repositories/{slug}"), &b).await.json();
    assert_eq!(page["pagelen"], 10);
    assert_eq!(page["values"].as_array().unwrap().len(), 10);
    let next = page["next"].as_str().unwrap();
    assert!(next.starts_with(&api.base) && next.contains("page=2"));
    let trimmed = api
        .get(
            &format!("/2.0/repositories/{slug}?pagelen=3&fields=values.slug,next"),
            &b,
        )
        .await
        .json();
    assert_eq!(trimmed.as_object().unwrap().len(), 2, "{trimmed}");
    assert!(
        trimmed["values"]
            .as_array()
            .unwrap()
            .iter()
            .all(|v| v.as_object().unwrap().len() == 1)
    );
    let next = trimmed["next"].as_str().unwrap();
    assert!(
        next.contains("fields=values.slug%2Cnext") && next.contains("pagelen=3"),
        "{next}"
    );
    let page2 = api.get(next, &b).await.json();
    assert!(page2["values"][0]["slug"].is_string() && page2["values"][0].get("uuid").is_none());
    let no_links = api
        .get(&format!("/2.0/repositories/{slug}?fields=-values.links"), &b)
        .await
        .json();
    assert!(no_links["values"][0].get("links").is_none() && no_links["values"][0].get("uuid").is_some());
    let star = api
        .get(&format!("/2.0/workspaces/{slug}/members?fields=values.user.*"), &b)
        .await
        .json();
    assert!(star["values"][0]["user"]["uuid"].is_string());
    assert!(
        star["values"][0]["user"].get("email").is_none(),
        "emails need +values.user.email"
    );
    assert!(star["values"][0].get("workspace").is_none());
    // sort= on one field, `-` for descending.
    let sorted = api
        .walk(
            &format!("/2.0/repositories/{slug}?sort=-slug&pagelen=4"),
            &b,
            "/repositories/{workspace}",
        )
        .await;
    let slugs: Vec<&str> = sorted.iter().map(|r| r["slug"].as_str().unwrap()).collect();
    let mut want = slugs.clone();
    want.sort_unstable_by(|a, b| b.cmp(a));
    assert_eq!(slugs, want);
    // Ordered comparisons on permissions rank them (read < write < admin).
    let strong = api
        .walk(
            &format!(
                "/2.0/workspaces/{slug}/permissions/repositories?pagelen=50&q={}",
                enc("permission>\"read\"")
            ),
            &b,
            "/workspaces/{workspace}/permissions/repositories",
        )
        .await;
    assert!(!strong.is_empty());
    assert!(
        strong
            .iter()
            .all(|p| p["permission"] == "write" || p["permission"] == "admin")
    );
    let r = api
        .get(&format!("/2.0/repositories/{slug}?q={}", enc("project.key=")), &b)
        .await;
    assert_eq!(r.status, 400);

    // Unknown routes: HTML 404, even without credentials.
    for path in ["/2.0/nope", "/", "/2.0/repositories/a/b/c/d/e/f", "/1.0/users/x"] {
        let r = api.get(path, &Cred::None).await;
        assert_eq!(r.status, 404, "{path}");
        let ct = r.headers.get("content-type").unwrap().to_str().unwrap();
        assert!(ct.starts_with("text/html"), "{path}: {ct}");
        assert!(serde_json::from_str::<Value>(&r.text).is_err());
    }
    assert_eq!(h.stats().by_class.get("unknown"), Some(&4));
    h.shutdown().await;
}

// ---------------------------------------------------------------------------
// Rate limits, faults, latency.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_answers_429_with_retry_after() {
    let (h, api) = start(SimConfig {
        rate_limit: Some("3/10s".parse::<RateLimit>().unwrap()),
        ..SimConfig::default()
    })
    .await;
    let c = h.credentials().clone();
    let b = basic(&c);
    for _ in 0..3 {
        assert_eq!(api.get("/2.0/user", &b).await.status, 200);
    }
    let r = api.get("/2.0/user", &b).await;
    assert_eq!(r.status, 429);
    check_error(&r.json());
    assert_eq!(
        r.json(),
        json!({"type": "error", "error": {"message": "Rate limit for this resource has been exceeded."}})
    );
    let retry: u64 = r
        .headers
        .get("retry-after")
        .expect("Retry-After")
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=10).contains(&retry), "{retry}");
    // Per credential: the access token has its own budget.
    assert_eq!(
        api.get("/2.0/user", &Cred::Bearer(c.access_token.clone())).await.status,
        200
    );
    let s = h.stats();
    assert_eq!(s.rate_limited, 1);
    assert_eq!(s.by_status.get(&429), Some(&1));
    assert_eq!(s.total, 5);
    h.reset_stats();
    assert_eq!(h.stats().total, 0);
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_window_rolls() {
    let (h, api) = start(SimConfig {
        rate_limit: Some("2/400ms".parse::<RateLimit>().unwrap()),
        ..SimConfig::default()
    })
    .await;
    let b = basic(h.credentials());
    assert_eq!(api.get("/2.0/user", &b).await.status, 200);
    assert_eq!(api.get("/2.0/user", &b).await.status, 200);
    let r = api.get("/2.0/user", &b).await;
    assert_eq!(r.status, 429);
    assert_eq!(r.headers.get("retry-after").unwrap(), "1", "rounded up to at least 1");
    tokio::time::sleep(Duration::from_millis(450)).await;
    assert_eq!(api.get("/2.0/user", &b).await.status, 200, "the window rolled on");
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injected_faults_and_runtime_fail_rate() {
    let (h, api) = start(SimConfig {
        fail_rate: 1.0,
        ..SimConfig::default()
    })
    .await;
    let b = basic(h.credentials());
    for _ in 0..10 {
        let r = api.get("/2.0/user", &b).await;
        assert!(r.status.is_server_error(), "{}", r.status);
        assert!([500, 502, 503].contains(&r.status.as_u16()));
        check_error(&r.json());
    }
    assert_eq!(h.stats().injected_faults, 10);
    h.set_fail_rate(0.0);
    assert_eq!(api.get("/2.0/user", &b).await.status, 200);
    h.set_fail_rate(1.0);
    assert!(api.get("/2.0/user", &b).await.status.is_server_error());
    h.shutdown().await;

    // Deterministic: the same seed fails the same requests.
    let mut runs = Vec::new();
    for _ in 0..2 {
        let (h, api) = start(SimConfig {
            fail_rate: 0.3,
            seed: 9,
            ..SimConfig::default()
        })
        .await;
        let b = basic(h.credentials());
        let mut statuses = Vec::new();
        for _ in 0..30 {
            statuses.push(api.get("/2.0/user", &b).await.status.as_u16());
        }
        runs.push(statuses);
        h.shutdown().await;
    }
    assert_eq!(runs[0], runs[1]);
    assert!(runs[0].contains(&200) && runs[0].iter().any(|s| *s >= 500));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latency_applies_per_request_and_overlaps() {
    let (h, api) = start(SimConfig {
        latency: Duration::from_millis(300),
        ..SimConfig::default()
    })
    .await;
    let b = basic(h.credentials());
    let t = Instant::now();
    let futs = (0..6).map(|_| api.get("/2.0/user", &b));
    let results = futures::future::join_all(futs).await;
    let elapsed = t.elapsed();
    assert!(results.iter().all(|r| r.status == 200));
    assert!(elapsed >= Duration::from_millis(300), "{elapsed:?}");
    assert!(
        elapsed < Duration::from_millis(1500),
        "requests must overlap: {elapsed:?}"
    );
    h.shutdown().await;
}

// ---------------------------------------------------------------------------
// Scale and the CLI.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_organisations_serve_quickly() {
    let t = Instant::now();
    let (h, api) = start(SimConfig {
        users: 10_000,
        groups: 300,
        projects: 500,
        repositories: 5_000,
        workspaces: 3,
        ..SimConfig::default()
    })
    .await;
    assert!(t.elapsed() < Duration::from_secs(5), "start took {:?}", t.elapsed());
    let b = basic(h.credentials());
    let slug = h.organisation().workspaces[0].slug.clone();
    let t = Instant::now();
    for url in [
        format!("/2.0/workspaces/{slug}/members?pagelen=100&page=20"),
        format!("/2.0/repositories/{slug}?pagelen=100&page=10"),
        format!("/2.0/workspaces/{slug}/permissions/repositories?pagelen=100&page=5"),
        format!("/2.0/workspaces/{slug}/permissions/repositories?pagelen=100&page=6"),
    ] {
        let r = api.get(&url, &b).await;
        assert_eq!(r.status, 200, "{url}: {}", r.text);
    }
    assert!(t.elapsed() < Duration::from_secs(5), "pages took {:?}", t.elapsed());
    h.shutdown().await;
}

#[test]
fn cli_prints_one_json_line_and_serves() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    let mut child = Command::new(env!("CARGO_BIN_EXE_bitbucket-operator"))
        .args(["simulate", "--listen", "127.0.0.1:0", "--seed", "3", "--users", "25"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let v: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"));
    let api_url = v["api_url"].as_str().unwrap().to_string();
    assert_eq!(api_url, format!("http://{}", v["listen"].as_str().unwrap()));
    let c = &v["credentials"];
    for k in ["email", "api_token", "access_token", "consumer_key", "consumer_secret"] {
        assert!(c[k].as_str().is_some_and(|s| !s.is_empty()), "{k}");
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let status = rt.block_on(async {
        reqwest::Client::new()
            .get(format!("{api_url}/2.0/user"))
            .basic_auth(c["email"].as_str().unwrap(), c["api_token"].as_str())
            .send()
            .await
            .unwrap()
            .status()
    });
    assert_eq!(status, 200);
    // SIGTERM shuts down gracefully with exit code 0.
    let term = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("run kill");
    assert!(term.success());
    let deadline = Instant::now() + Duration::from_secs(10);
    let exit = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > deadline {
            child.kill().unwrap();
            panic!("simulate did not exit on SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(exit.code(), Some(0));

    for bad in [vec!["--fail-rate", "2"], vec!["--rate-limit", "lots"]] {
        let out = Command::new(env!("CARGO_BIN_EXE_bitbucket-operator"))
            .arg("simulate")
            .args(&bad)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{bad:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(bad[0]), "{err}");
    }
}

// ---------------------------------------------------------------------------
// The validation machinery itself must be able to fail.

#[test]
fn schema_validation_is_not_vacuous() {
    let put = validator(
        "/workspaces/{workspace}/projects/{project_key}/permissions-config/users/{selected_user_id}",
        "put",
        200,
    );
    assert!(put.is_valid(&json!({"type": "project_user_permission", "permission": "admin"})));
    assert!(!put.is_valid(&json!({"type": "project_user_permission", "permission": "owner"})));
    assert!(!put.is_valid(&json!({"permission": "admin"})), "type is required");
    let repos = validator("/repositories/{workspace}", "get", 200);
    assert!(repos.is_valid(&json!({"values": [{"type": "repository", "is_private": true}]})));
    // Through $ref into the item schema.
    assert!(!repos.is_valid(&json!({"values": [{"type": "repository", "is_private": "yes"}]})));
    // Through nested $refs (repository -> project -> links).
    assert!(!repos.is_valid(
        &json!({"values": [{"type": "repository", "project": {"type": "project", "links": {"self": {"href": "x"}}}}]})
    ));
    // The envelope is closed.
    assert!(!repos.is_valid(&json!({"values": [], "extra": 1})));
    // The strict pass names undeclared properties by schema.
    let mut extra = BTreeSet::new();
    undeclared(
        &[(response_schema("/repositories/{workspace}", "get", 200), String::new())],
        &json!({"values": [{"type": "repository", "slug": "s", "owner": {"type": "team", "username": "u", "bogus": 1}}]}),
        &mut extra,
    );
    assert_eq!(
        extra.into_iter().collect::<Vec<_>>(),
        vec!["repository.slug", "team.bogus", "team.username"]
    );
    // nullable: true becomes a union with null.
    let mut s = json!({"type": "string", "nullable": true});
    convert_nullable(&mut s);
    assert_eq!(s, json!({"type": ["string", "null"]}));
    // The error patch admits `fields` but the error object stays closed.
    let err = validator("/workspaces/{workspace}/members", "get", 400);
    assert!(err.is_valid(&json!({"type": "error", "error": {"message": "m", "fields": {"permission": ["bad"]}}})));
    assert!(!err.is_valid(&json!({"type": "error", "error": {"message": "m", "other": 1}})));
}

// ---------------------------------------------------------------------------
// Member filters, write preconditions and hostile input.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn member_filters_and_write_preconditions() {
    let (h, api) = start(SimConfig::default()).await;
    let c = h.credentials().clone();
    let b = basic(&c);
    let org = h.organisation();
    let ws = &org.workspaces[0];
    let slug = &ws.slug;
    let m = ws.members.iter().find(|m| !m.owner).unwrap();
    let user = org.user(&m.user_uuid).unwrap();
    let members_url = format!("/2.0/workspaces/{slug}/members");

    let q = format!("user.email IN (\"{}\", \"nobody@example.com\")", user.email);
    let found = api
        .walk(
            &format!("{members_url}?q={}", enc(&q)),
            &b,
            "/workspaces/{workspace}/members",
        )
        .await;
    assert_eq!(found.len(), 1);
    assert_eq!(found[0]["user"]["uuid"], user.uuid.as_str());
    assert!(
        found[0]["user"].get("email").is_none(),
        "filtering by email does not reveal it"
    );
    let by_account = api
        .walk(
            &format!(
                "{members_url}?q={}",
                enc(&format!("user.account_id=\"{}\"", user.account_id))
            ),
            &b,
            "/workspaces/{workspace}/members",
        )
        .await;
    assert_eq!(by_account.len(), 1);
    let r = api
        .get(&format!("{members_url}?q={}", enc("user.display_name=\"x\"")), &b)
        .await;
    assert_eq!(r.status, 400, "display_name is not filterable");
    check("/workspaces/{workspace}/members", "get", 400, &r.json());
    let many: Vec<String> = (0..91).map(|i| format!("\"u{i}@example.com\"")).collect();
    let r = api
        .get(
            &format!(
                "{members_url}?q={}",
                enc(&format!("user.email IN ({})", many.join(",")))
            ),
            &b,
        )
        .await;
    assert_eq!(r.status, 400, "more than 90 emails");

    // Project user PUT: only non-owner workspace members.
    let p = &ws.projects[0];
    let base = format!("/2.0/workspaces/{slug}/projects/{}/permissions-config/users", p.key);
    let owner = ws.members.iter().find(|m| m.owner).unwrap();
    let r = api
        .call(
            Method::PUT,
            &format!("{base}/{}", enc(&owner.user_uuid)),
            &b,
            Some(json!({"permission": "read"})),
        )
        .await;
    assert_eq!(r.status, 400);
    assert!(r.json()["error"]["message"].as_str().unwrap().contains("owner"));
    let outsider = org
        .users
        .iter()
        .find(|u| !ws.members.iter().any(|m| m.user_uuid == u.uuid))
        .unwrap();
    let r = api
        .call(
            Method::PUT,
            &format!("{base}/{}", enc(&outsider.uuid)),
            &b,
            Some(json!({"permission": "read"})),
        )
        .await;
    assert_eq!(r.status, 400);
    assert!(r.json()["error"]["message"].as_str().unwrap().contains("not a member"));
    let r = api
        .call(
            Method::PUT,
            &format!("{base}/%7B00000000-0000-0000-0000-000000000000%7D"),
            &b,
            Some(json!({"permission": "read"})),
        )
        .await;
    assert_eq!(r.status, 404, "unknown user");
    // PUT is an upsert and later reads and the ground truth see it.
    for level in ["read", "admin"] {
        let r = api
            .call(
                Method::PUT,
                &format!("{base}/{}", enc(&user.uuid)),
                &b,
                Some(json!({"permission": level})),
            )
            .await;
        assert_eq!(r.status, 200);
    }
    let truth = h.organisation();
    let grants: Vec<_> = truth.workspaces[0].projects[0]
        .user_permissions
        .iter()
        .filter(|g| g.principal == user.uuid)
        .collect();
    assert_eq!(grants.len(), 1);
    assert_eq!(grants[0].permission, "admin");
    let listed = api
        .walk(
            &format!("{base}?pagelen=100"),
            &b,
            "/workspaces/{workspace}/projects/{project_key}/permissions-config/users",
        )
        .await;
    assert!(
        listed
            .iter()
            .any(|g| g["user"]["uuid"] == user.uuid.as_str() && g["permission"] == "admin")
    );
    let s = h.stats();
    assert!(
        s.by_class["members"] >= 4 && s.by_class["project-permissions"] >= 5,
        "{s:?}"
    );
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_input_gets_4xx_never_5xx() {
    let (h, api) = start(SimConfig::default()).await;
    let b = basic(h.credentials());
    let slug = h.organisation().workspaces[0].slug.clone();
    let key = h.organisation().workspaces[0].projects[0].key.clone();
    for url in [
        "/2.0/workspaces/%ZZ".to_string(),
        "/2.0/workspaces/%7B".to_string(),
        "/2.0/workspaces/%FF%FE/members".to_string(),
        format!("/2.0/repositories/{slug}?pagelen=99999999999999999999999"),
        format!("/2.0/repositories/{slug}?page=18446744073709551615"),
        format!("/2.0/repositories/{slug}?page=-1"),
        format!("/2.0/repositories/{slug}?q=%22"),
        format!("/2.0/repositories/{slug}?q=a%20IN%20(%22x%22"),
        format!("/2.0/repositories/{slug}?q=a%3E%3C%22b%22"),
        "/2.0/user/workspaces?administrator=maybe".to_string(),
        format!("/2.0/workspaces/{slug}/projects/{key}/permissions-config/users?q=x%3D%22y%22"),
        format!("/1.0/groups/{slug}/nope/members"),
    ] {
        let r = api.get(&url, &b).await;
        let head: String = r.text.chars().take(300).collect();
        assert!(r.status.is_client_error(), "{url}: {} {head}", r.status);
    }
    // A degenerate fields= spec is a no-op, not an error.
    let r = api
        .get(&format!("/2.0/repositories/{slug}?fields=,,,..,%2B,-"), &b)
        .await;
    assert_eq!(r.status, 200);
    assert!(r.json()["values"][0]["uuid"].is_string());
    let put_url = format!(
        "/2.0/workspaces/{slug}/projects/{key}/permissions-config/groups/{}",
        h.organisation().workspaces[0].groups[0].slug
    );
    for body in [
        "",
        "null",
        "[]",
        "\"admin\"",
        "{\"permission\": null}",
        "{\"permission\": \"admin\"",
        "\u{0}",
    ] {
        let r = api
            .client
            .put(format!("{}{put_url}", api.base))
            .basic_auth(&h.credentials().email, Some(&h.credentials().api_token))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "body {body:?}");
    }
    // Wrong methods are 405, not crashes.
    let r = api.call(Method::POST, "/2.0/user", &b, Some(json!({}))).await;
    assert_eq!(r.status, 405);
    let r = api
        .call(
            Method::DELETE,
            &format!("/2.0/workspaces/{slug}/projects/{key}/permissions-config/users"),
            &b,
            None,
        )
        .await;
    assert_eq!(r.status, 405);
    assert_eq!(h.stats().by_status.keys().filter(|s| **s >= 500).count(), 0);
    h.shutdown().await;
}
