//! Label and field selectors of list, watch and delete-collection requests.

use std::collections::BTreeMap;

use serde_json::Value;

use super::meta;

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

pub(super) struct Filter {
    ns: Option<String>,
    labels: Vec<LabelReq>,
    fields: Vec<(String, bool, String)>,
}

impl Filter {
    pub(super) fn from_query(ns: Option<String>, q: &BTreeMap<String, String>) -> Self {
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

    pub(super) fn matches(&self, ns: &str, obj: &Value) -> bool {
        self.ns.as_deref().is_none_or(|n| n == ns) && labels_match(&self.labels, obj) && fields_match(&self.fields, obj)
    }
}
