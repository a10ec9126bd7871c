//! Field management for the fake API server: which field manager owns which field, how a
//! server-side apply merges, conflicts and prunes, and how other writes move ownership.
//!
//! Follows the documented behaviour (kubernetes.io, "Server-Side Apply"): an apply that drops a
//! field removes it only when no other manager owns it; changing a field another manager owns is
//! a conflict unless forced, and forcing takes the field over; any other write takes ownership of
//! the fields whose value it changes. Granularity is what tests need: maps are granular,
//! `status.conditions` and `metadata.ownerReferences` are list-maps keyed by `type` / `uid`,
//! `metadata.finalizers` is a set, every other list is atomic.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Map, Value, json};

/// A field path in `fieldsV1` notation: `f:name`, `k:{"type":"Ready"}` (a list-map entry),
/// `v:"x"` (a set element), and a trailing `.` for a list entry itself.
pub type FieldPath = Vec<String>;
pub type FieldSet = BTreeSet<FieldPath>;

/// Metadata the server maintains itself; no manager owns it.
const SYSTEM_METADATA: &[&str] = &[
    "name",
    "namespace",
    "generateName",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "managedFields",
    "selfLink",
];

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Operation {
    Apply,
    Update,
}

/// One `managedFields` entry's identity: the same manager applying and updating, or writing
/// the main resource and `/status`, owns fields through separate entries (as the real server).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ManagerKey {
    pub manager: String,
    pub operation: Operation,
    pub subresource: Option<String>,
}

#[derive(Clone, Debug, PartialEq)]
struct Entry {
    fields: FieldSet,
    time: String,
}

/// A field another manager owns and the apply would change.
#[derive(Debug)]
pub struct Conflict {
    pub manager: String,
    pub path: FieldPath,
}

impl Conflict {
    /// Like the real server's message: `conflict with "mgr": .spec.x`.
    pub fn describe(&self) -> String {
        let path: String = self
            .path
            .iter()
            .map(|s| match s.strip_prefix("f:") {
                Some(name) => format!(".{name}"),
                None => format!("[{s}]"),
            })
            .collect();
        format!("conflict with \"{}\": {path}", self.manager)
    }
}

/// The field ownership of one stored object.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ManagedFields {
    entries: BTreeMap<ManagerKey, Entry>,
}

#[derive(Clone, Copy)]
enum ListKind {
    Atomic,
    Set,
    Map(&'static [&'static str]),
}

/// The list semantics of the field at `names` (field names from the root, list entries skipped).
fn list_kind(names: &[String]) -> ListKind {
    match names {
        [a, b] if a == "metadata" && b == "finalizers" => ListKind::Set,
        [a, b] if a == "metadata" && b == "ownerReferences" => ListKind::Map(&["uid"]),
        [a, b] if a == "status" && b == "conditions" => ListKind::Map(&["type"]),
        _ => ListKind::Atomic,
    }
}

/// `k:{...}` segment of a list-map entry, `None` when a key field is missing.
fn entry_segment(item: &Value, keys: &[&str]) -> Option<String> {
    let mut m = Map::new();
    for k in keys {
        m.insert((*k).to_string(), item.get(*k)?.clone());
    }
    Some(format!("k:{}", Value::Object(m)))
}

/// Every owned-able field of `obj` (leaves, list entries, set elements), minus system fields.
pub fn field_set(obj: &Value) -> FieldSet {
    let mut out = FieldSet::new();
    if let Value::Object(m) = obj {
        walk_map(m, &mut Vec::new(), &mut Vec::new(), &mut out);
    }
    out.retain(|p| !is_system(p));
    out
}

fn is_system(p: &FieldPath) -> bool {
    match p.as_slice() {
        [f] => f == "f:apiVersion" || f == "f:kind",
        [m, f, ..] if m == "f:metadata" => f.strip_prefix("f:").is_some_and(|name| SYSTEM_METADATA.contains(&name)),
        _ => false,
    }
}

fn walk_map(m: &Map<String, Value>, path: &mut FieldPath, names: &mut Vec<String>, out: &mut FieldSet) {
    for (k, v) in m {
        path.push(format!("f:{k}"));
        names.push(k.clone());
        walk_value(v, path, names, out);
        names.pop();
        path.pop();
    }
}

fn walk_value(v: &Value, path: &mut FieldPath, names: &mut Vec<String>, out: &mut FieldSet) {
    match v {
        Value::Object(m) if !m.is_empty() => walk_map(m, path, names, out),
        Value::Array(items) if !items.is_empty() => match list_kind(names) {
            ListKind::Atomic => {
                out.insert(path.clone());
            }
            ListKind::Set => {
                for item in items {
                    path.push(format!("v:{item}"));
                    out.insert(path.clone());
                    path.pop();
                }
            }
            ListKind::Map(keys) => {
                for item in items {
                    let Some(seg) = entry_segment(item, keys) else {
                        continue;
                    };
                    path.push(seg);
                    path.push(".".into());
                    out.insert(path.clone());
                    path.pop();
                    if let Value::Object(m) = item {
                        walk_map(m, path, names, out);
                    }
                    path.pop();
                }
            }
        },
        _ => {
            out.insert(path.clone());
        }
    }
}

/// The value at `path`, if the object has it.
pub fn get<'a>(obj: &'a Value, path: &[String]) -> Option<&'a Value> {
    let mut cur = obj;
    for seg in path {
        cur = step(cur, seg)?;
    }
    Some(cur)
}

fn step<'a>(cur: &'a Value, seg: &str) -> Option<&'a Value> {
    if seg == "." {
        return Some(cur);
    }
    if let Some(name) = seg.strip_prefix("f:") {
        return cur.as_object()?.get(name);
    }
    let items = cur.as_array()?;
    items.get(position(items, seg)?)
}

/// Index of the list entry a `k:` or `v:` segment names.
fn position(items: &[Value], seg: &str) -> Option<usize> {
    if let Some(keys) = seg.strip_prefix("k:") {
        let keys: Map<String, Value> = serde_json::from_str(keys).ok()?;
        items
            .iter()
            .position(|item| keys.iter().all(|(k, v)| item.get(k) == Some(v)))
    } else {
        let want: Value = serde_json::from_str(seg.strip_prefix("v:")?).ok()?;
        items.iter().position(|item| *item == want)
    }
}

/// Remove the field at `path` (a whole list entry for a trailing `.`), then any map it leaves
/// empty below the top level, like the real server's pruning.
fn remove(obj: &mut Value, path: &[String]) {
    let path = match path.split_last() {
        Some((last, parent)) if last == "." => parent,
        _ => path,
    };
    let Some((last, parent)) = path.split_last() else {
        return;
    };
    let mut cur = &mut *obj;
    for seg in parent {
        let next = if let Some(name) = seg.strip_prefix("f:") {
            cur.as_object_mut().and_then(|m| m.get_mut(name))
        } else {
            let pos = cur.as_array().and_then(|items| position(items, seg));
            match (pos, cur.as_array_mut()) {
                (Some(i), Some(items)) => items.get_mut(i),
                _ => None,
            }
        };
        match next {
            Some(n) => cur = n,
            None => return,
        }
    }
    if let Some(name) = last.strip_prefix("f:") {
        if let Some(m) = cur.as_object_mut() {
            m.remove(name);
        }
    } else if let Some(i) = cur.as_array().and_then(|items| position(items, last))
        && let Some(items) = cur.as_array_mut()
    {
        items.remove(i);
    }
    if parent.len() >= 2 && get(obj, parent).is_some_and(|v| v.as_object().is_some_and(Map::is_empty)) {
        remove(obj, parent);
    }
}

/// Merge an applied configuration into the live object: maps field by field, list-maps entry by
/// entry, sets by union, atomic lists and scalars replaced.
fn merge(live: &mut Value, config: &Value, names: &mut Vec<String>) {
    match (live, config) {
        (Value::Object(l), Value::Object(c)) => {
            for (k, cv) in c {
                names.push(k.clone());
                match l.get_mut(k) {
                    Some(lv) => merge(lv, cv, names),
                    None => {
                        l.insert(k.clone(), cv.clone());
                    }
                }
                names.pop();
            }
        }
        (Value::Array(l), Value::Array(c)) => match list_kind(names) {
            ListKind::Atomic => *l = c.clone(),
            ListKind::Set => {
                for item in c {
                    if !l.contains(item) {
                        l.push(item.clone());
                    }
                }
            }
            ListKind::Map(keys) => {
                for item in c {
                    let at = entry_segment(item, keys).and_then(|seg| position(l, &seg));
                    match at {
                        Some(i) => merge(&mut l[i], item, names),
                        None => l.push(item.clone()),
                    }
                }
            }
        },
        (l, c) => *l = c.clone(),
    }
}

/// Whether `path` is a key field of a list-map entry still in `obj` (only removed with it).
fn is_key_of_kept_entry(path: &[String], obj: &Value) -> bool {
    let [entry @ .., field] = path else { return false };
    let (Some(keys), Some(name)) = (
        entry.last().and_then(|s| s.strip_prefix("k:")),
        field.strip_prefix("f:"),
    ) else {
        return false;
    };
    let is_key = serde_json::from_str::<Map<String, Value>>(keys).is_ok_and(|k| k.contains_key(name));
    is_key && get(obj, entry).is_some()
}

/// Whether a write changes the field at `path`; a list entry itself "changes" only when it
/// appears (its fields carry their own ownership).
fn changed(old: &Value, new: &Value, path: &[String]) -> bool {
    if path.last().is_some_and(|s| s == ".") {
        return get(old, path).is_none() && get(new, path).is_some();
    }
    get(old, path) != get(new, path)
}

impl ManagedFields {
    /// Server-side apply of `config` (already stripped of fields the endpoint resets) onto
    /// `live` by `key`. Returns the merged object, or the conflicts when not forced.
    pub fn apply(
        &mut self,
        live: &Value,
        config: &Value,
        key: &ManagerKey,
        force: bool,
        now: &str,
    ) -> Result<Value, Vec<Conflict>> {
        let applied = field_set(config);
        let mut merged = live.clone();
        merge(&mut merged, config, &mut Vec::new());

        let mut conflicts = Vec::new();
        for (other, entry) in self.entries.iter().filter(|(k, _)| *k != key) {
            for p in applied.intersection(&entry.fields) {
                if p.last().is_some_and(|s| s != ".") && changed(live, &merged, p) {
                    conflicts.push((other.clone(), p.clone()));
                }
            }
        }
        if !force && !conflicts.is_empty() {
            return Err(conflicts
                .into_iter()
                .map(|(k, path)| Conflict {
                    manager: k.manager,
                    path,
                })
                .collect());
        }
        for (other, p) in &conflicts {
            if let Some(e) = self.entries.get_mut(other) {
                e.fields.remove(p);
                e.time = now.to_string();
            }
        }
        self.entries.retain(|_, e| !e.fields.is_empty());

        let previous = self.entries.get(key).map(|e| e.fields.clone()).unwrap_or_default();
        // Whole list entries first (while their key fields still identify them); an entry
        // another manager owns any part of stays, and only this applier's fields leave it.
        let mut dropped: Vec<&FieldPath> = previous.difference(&applied).collect();
        dropped.sort_by_key(|p| p.last().is_none_or(|s| s != "."));
        for p in dropped {
            let prefix = if p.last().is_some_and(|s| s == ".") {
                &p[..p.len() - 1]
            } else {
                &p[..]
            };
            let owned_elsewhere = self
                .entries
                .iter()
                .filter(|(k, _)| *k != key)
                .any(|(_, e)| e.fields.iter().any(|q| q.starts_with(prefix)));
            if !owned_elsewhere && !is_key_of_kept_entry(p, &merged) {
                remove(&mut merged, p);
            }
        }
        self.set(key, applied, now);
        Ok(merged)
    }

    /// Any write other than an apply (create, update, patch): the writer takes the fields whose
    /// value it changed; fields it removed are nobody's any more.
    pub fn update(&mut self, old: &Value, new: &Value, key: &ManagerKey, now: &str) {
        let before = field_set(old);
        let after = field_set(new);
        let removed: FieldSet = before.difference(&after).cloned().collect();
        let taken: FieldSet = after.into_iter().filter(|p| changed(old, new, p)).collect();
        let keys: Vec<ManagerKey> = self.entries.keys().cloned().collect();
        for k in keys {
            let Some(e) = self.entries.get_mut(&k) else { continue };
            let kept: FieldSet = e
                .fields
                .iter()
                .filter(|p| !removed.contains(*p) && (k == *key || !taken.contains(*p)))
                .cloned()
                .collect();
            if kept != e.fields {
                self.set(&k, kept, now);
            }
        }
        if !taken.is_empty() {
            let mut fields = self.entries.get(key).map(|e| e.fields.clone()).unwrap_or_default();
            fields.extend(taken);
            self.set(key, fields, now);
        }
    }

    /// Replace an entry's fields; its time moves only when they change (as the real server,
    /// so a no-op write stays a no-op).
    fn set(&mut self, key: &ManagerKey, fields: FieldSet, now: &str) {
        if fields.is_empty() {
            self.entries.remove(key);
            return;
        }
        match self.entries.get_mut(key) {
            Some(e) if e.fields == fields => {}
            Some(e) => {
                e.fields = fields;
                e.time = now.to_string();
            }
            None => {
                self.entries.insert(
                    key.clone(),
                    Entry {
                        fields,
                        time: now.to_string(),
                    },
                );
            }
        }
    }

    /// `metadata.managedFields` as the API server returns it.
    pub fn render(&self, api_version: &str) -> Value {
        let entries: Vec<Value> = self
            .entries
            .iter()
            .map(|(k, e)| {
                let mut tree = json!({});
                for p in &e.fields {
                    let mut cur = &mut tree;
                    for seg in p {
                        cur = cur
                            .as_object_mut()
                            .expect("fieldsV1 node")
                            .entry(seg.clone())
                            .or_insert_with(|| json!({}));
                    }
                }
                let mut v = json!({
                    "manager": k.manager,
                    "operation": match k.operation {
                        Operation::Apply => "Apply",
                        Operation::Update => "Update",
                    },
                    "apiVersion": api_version,
                    "time": e.time,
                    "fieldsType": "FieldsV1",
                    "fieldsV1": tree,
                });
                if let Some(sub) = &k.subresource {
                    v["subresource"] = json!(sub);
                }
                v
            })
            .collect();
        Value::Array(entries)
    }
}
