//! The write endpoints of the fake API server (create, update, patch, apply, delete), with the
//! real server's rules: optimistic concurrency on `metadata.resourceVersion`, the main resource
//! and `/status` each changing only their own part, field ownership (`fields`), and Secret
//! `stringData` folded into `data` on every write.

use std::collections::BTreeMap;

use axum::http::StatusCode;
use serde_json::{Value, json};

use super::fields::{ManagedFields, ManagerKey, Operation};
use super::{
    ApiErr, KindInfo, State, body_json, check_ns, meta, meta_mut, meta_str, now_rfc3339, parse_body, random_suffix,
    set_or_remove,
};

/// Field manager of a non-apply write: `?fieldManager=` (`handle` fills in the client's
/// User-Agent up to its first `/` when absent, like the real server).
fn writer(q: &BTreeMap<String, String>, sub: Option<&str>) -> ManagerKey {
    ManagerKey {
        manager: q.get("fieldManager").cloned().unwrap_or_else(|| "unknown".into()),
        operation: Operation::Update,
        subresource: sub.map(str::to_string),
    }
}

/// 409 when the request names a resourceVersion other than the stored one; an empty or missing
/// one is an unconditional write (allowed for every kind the fake serves).
fn check_resource_version(ki: &KindInfo, name: &str, requested: &Value, current: &Value) -> Result<(), ApiErr> {
    match meta_str(requested, "resourceVersion") {
        Some(rv) if !rv.is_empty() && Some(rv) != meta_str(current, "resourceVersion") => Err(ApiErr::new(
            409,
            "Conflict",
            format!(
                "Operation cannot be fulfilled on {}.{} \"{name}\": the object has been modified; please apply your changes to the latest version and try again",
                ki.plural, ki.group
            ),
        )),
        _ => Ok(()),
    }
}

/// Secret `data` values must be base64 and `stringData` values strings, or the real server
/// cannot decode the object: 400 for a request body, 422 for the result of a patch (its
/// `patch` field is invalid). Rejected before anything is stored.
fn validate_secret(ki: &KindInfo, obj: &Value, code: u16) -> Result<(), ApiErr> {
    use base64::Engine as _;
    if ki.kind != "Secret" || !ki.group.is_empty() {
        return Ok(());
    }
    let invalid = |field: String, why: &str| {
        ApiErr::new(
            code,
            if code == 422 { "Invalid" } else { "BadRequest" },
            format!(
                "Secret \"{}\" is invalid: {field}: {why}",
                meta_str(obj, "name").unwrap_or_default()
            ),
        )
    };
    for (k, v) in obj.get("data").and_then(Value::as_object).into_iter().flatten() {
        let decodes = v
            .as_str()
            .is_some_and(|s| base64::engine::general_purpose::STANDARD.decode(s).is_ok());
        if !decodes && !v.is_null() {
            return Err(invalid(format!("data[{k}]"), "illegal base64 data"));
        }
    }
    for (k, v) in obj.get("stringData").and_then(Value::as_object).into_iter().flatten() {
        if !v.is_string() {
            return Err(invalid(format!("stringData[{k}]"), "must be a string"));
        }
    }
    Ok(())
}

/// `stringData` is write-only: its keys are merged into `data` (overwriting), then it is dropped.
pub(super) fn normalize_secret(obj: &mut Value) {
    use base64::Engine as _;
    let Some(o) = obj.as_object_mut() else { return };
    if let Some(Value::Object(sd)) = o.remove("stringData") {
        let data = o.entry("data").or_insert_with(|| json!({}));
        if !data.is_object() {
            *data = json!({});
        }
        for (k, v) in sd {
            if let Some(s) = v.as_str() {
                data[k.as_str()] = json!(base64::engine::general_purpose::STANDARD.encode(s));
            }
        }
    }
    if let Some(data) = o.get_mut("data").and_then(Value::as_object_mut) {
        data.retain(|_, v| !v.is_null());
    }
    o.entry("type").or_insert_with(|| json!("Opaque"));
}

pub(super) fn create(
    st: &mut State,
    ki: &KindInfo,
    ns: Option<String>,
    q: &BTreeMap<String, String>,
    body: &[u8],
) -> Result<(StatusCode, Value), ApiErr> {
    let mut obj = body_json(body)?;
    check_ns(ki, &ns, &obj)?;
    validate_secret(ki, &obj, 400)?;
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
    let mut managed = ManagedFields::default();
    managed.update(&json!({}), &obj, &writer(q, None), &now_rfc3339());
    let stored = st.store(ki, &key, obj, Some(managed));
    Ok((StatusCode::CREATED, stored))
}

/// Restrict a candidate new object to what the endpoint may change: `/status` only the status
/// (metadata included, as for custom resources), the main resource everything but a status
/// subresource; `deletionTimestamp` only through DELETE.
pub(super) fn restrict(ki: &KindInfo, sub: Option<&str>, old: &Value, mut candidate: Value) -> Value {
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

/// Finish a non-apply write of an existing object: restrict, move field ownership, store.
fn update_existing(
    st: &mut State,
    ki: &KindInfo,
    key: &(String, String, String),
    sub: Option<&str>,
    q: &BTreeMap<String, String>,
    candidate: Value,
) -> Result<(StatusCode, Value), ApiErr> {
    let old = st.objects.get(key).ok_or_else(|| ApiErr::not_found(ki, &key.2))?;
    check_resource_version(ki, &key.2, &candidate, &old.obj)?;
    let new = restrict(ki, sub, &old.obj, candidate);
    let mut managed = old.managed.clone();
    managed.update(&old.obj, &new, &writer(q, sub), &now_rfc3339());
    let stored = st.store(ki, key, new, Some(managed));
    Ok((StatusCode::OK, stored))
}

pub(super) fn replace(
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
    validate_secret(ki, &obj, 400)?;
    let key = State::key(ki, ns.as_deref(), name);
    update_existing(st, ki, &key, sub, q, obj)
}

#[allow(clippy::too_many_arguments)]
pub(super) fn patch(
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
    match ct {
        "application/apply-patch+yaml" => apply(st, ki, ns, name, sub, q, body),
        "application/merge-patch+json" | "application/strategic-merge-patch+json" => {
            let old = st.objects.get(&key).ok_or_else(|| ApiErr::not_found(ki, name))?;
            let mut merged = old.obj.clone();
            json_patch::merge(&mut merged, &body_json(body)?);
            validate_secret(ki, &merged, 422)?;
            update_existing(st, ki, &key, sub, q, merged)
        }
        "application/json-patch+json" => {
            let old = st.objects.get(&key).ok_or_else(|| ApiErr::not_found(ki, name))?;
            let mut patched = old.obj.clone();
            let mut ops: Vec<Value> = serde_json::from_slice(body)
                .map_err(|e| ApiErr::new(400, "BadRequest", format!("invalid json patch: {e}")))?;
            // Like the API server (evanphx/json-patch), `test` of a missing path against null succeeds.
            ops.retain(|op| {
                !(op["op"] == "test"
                    && op["value"].is_null()
                    && op["path"].as_str().is_some_and(|p| patched.pointer(p).is_none()))
            });
            let p: json_patch::Patch = serde_json::from_value(Value::Array(ops))
                .map_err(|e| ApiErr::new(400, "BadRequest", format!("invalid json patch: {e}")))?;
            json_patch::patch(&mut patched, &p)
                .map_err(|e| ApiErr::new(422, "Invalid", format!("the server rejected our request: {e}")))?;
            if !patched.is_object() {
                return Err(ApiErr::new(422, "Invalid", "patch produced a non-object"));
            }
            validate_secret(ki, &patched, 422)?;
            update_existing(st, ki, &key, sub, q, patched)
        }
        other => Err(ApiErr::new(
            415,
            "UnsupportedMediaType",
            format!("the body of the request was in an unknown format: {other}"),
        )),
    }
}

/// Server-side apply: validate the configuration, keep only what the endpoint may set, then let
/// the field manager merge, detect conflicts and prune (`fields::ManagedFields::apply`).
fn apply(
    st: &mut State,
    ki: &KindInfo,
    ns: Option<String>,
    name: &str,
    sub: Option<&str>,
    q: &BTreeMap<String, String>,
    body: &[u8],
) -> Result<(StatusCode, Value), ApiErr> {
    let bad = |msg: &str| ApiErr::new(400, "BadRequest", msg.to_string());
    let Some(manager) = q.get("fieldManager").cloned() else {
        return Err(bad(
            "PatchOptions.meta.k8s.io \"\" is invalid: fieldManager: Required value: is required for apply patch",
        ));
    };
    let force = matches!(q.get("force").map(String::as_str), Some("true" | "1"));
    let mut config = body_json(body)?;
    if config["apiVersion"] != json!(ki.api_version()) || config["kind"] != json!(ki.kind) {
        return Err(bad("apply patch apiVersion/kind do not match the resource"));
    }
    if meta_str(&config, "name").is_some_and(|n| n != name) {
        return Err(bad("the name of the object does not match the name on the URL"));
    }
    if meta(&config).get("managedFields").is_some_and(|m| !m.is_null()) {
        return Err(bad("metadata.managedFields must be nil"));
    }
    check_ns(ki, &ns, &config)?;
    validate_secret(ki, &config, 400)?;
    // Fields the endpoint resets are not applied, so not owned either.
    match sub {
        Some(_) => {
            let status = config.get("status").cloned();
            config = json!({"apiVersion": ki.api_version(), "kind": ki.kind});
            set_or_remove(&mut config, "status", status);
        }
        None if ki.status_subresource => set_or_remove(&mut config, "status", None),
        None => {}
    }
    let key = State::key(ki, ns.as_deref(), name);
    let applier = ManagerKey {
        manager,
        operation: Operation::Apply,
        subresource: sub.map(str::to_string),
    };
    let now = now_rfc3339();
    let Some(old) = st.objects.get(&key) else {
        if sub.is_some() {
            return Err(ApiErr::not_found(ki, name));
        }
        let mut managed = ManagedFields::default();
        let obj = managed
            .apply(&json!({}), &config, &applier, force, &now)
            .map_err(|_| ApiErr::new(500, "InternalError", "conflict on an empty object"))?;
        let stored = st.store(ki, &key, obj, Some(managed));
        return Ok((StatusCode::CREATED, stored));
    };
    check_resource_version(ki, name, &config, &old.obj)?;
    let mut managed = old.managed.clone();
    let merged = managed
        .apply(&old.obj, &config, &applier, force, &now)
        .map_err(|conflicts| {
            let list: Vec<String> = conflicts.iter().map(|c| c.describe()).collect();
            ApiErr::new(
                409,
                "Conflict",
                format!("Apply failed with {} conflict(s): {}", list.len(), list.join(", ")),
            )
        })?;
    let new = restrict(ki, sub, &old.obj, merged);
    let stored = st.store(ki, &key, new, Some(managed));
    Ok((StatusCode::OK, stored))
}

pub(super) fn delete(
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
