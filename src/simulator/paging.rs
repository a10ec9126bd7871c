//! Pagination envelope, `fields=` partial responses and a small BBQL (`q=`)
//! filter, all applied generically to JSON values.

use serde_json::{Map, Value, json};

use super::reply::ApiError;

/// Query parameters in request order (decoded).
pub type Query = Vec<(String, String)>;

pub fn param<'a>(query: &'a Query, name: &str) -> Option<&'a str> {
    query.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

/// Builds one page of the 2.0 envelope
/// `{size, page, pagelen, next?, previous?, values}`.
///
/// `self_url` is the absolute URL of the request without its query string;
/// `next`/`previous` keep every other query parameter and replace `page`.
pub fn paginate(items: Vec<Value>, query: &Query, self_url: &str, max_pagelen: usize) -> Result<Value, ApiError> {
    let pagelen = match param(query, "pagelen") {
        None => 10usize.min(max_pagelen.max(1)),
        Some(s) => match s.trim().parse::<usize>() {
            Ok(n) if n >= 1 && n <= max_pagelen => n,
            _ => return Err(ApiError::bad_request("Invalid pagelen")),
        },
    };
    let page = match param(query, "page") {
        None => 1usize,
        Some(s) => match s.trim().parse::<usize>() {
            Ok(n) if n >= 1 => n,
            _ => return Err(ApiError::bad_request("Invalid page")),
        },
    };
    let size = items.len();
    let pages = size.div_ceil(pagelen).max(1);
    if page > pages {
        return Err(ApiError::new(404, "Invalid page"));
    }
    let start = (page - 1) * pagelen;
    let values: Vec<Value> = items.into_iter().skip(start).take(pagelen).collect();
    let mut env = Map::new();
    env.insert("size".into(), json!(size));
    env.insert("page".into(), json!(page));
    env.insert("pagelen".into(), json!(pagelen));
    if page < pages {
        env.insert("next".into(), json!(page_url(self_url, query, page + 1)));
    }
    if page > 1 {
        env.insert("previous".into(), json!(page_url(self_url, query, page - 1)));
    }
    env.insert("values".into(), Value::Array(values));
    Ok(Value::Object(env))
}

fn page_url(self_url: &str, query: &Query, page: usize) -> String {
    let mut ser = url::form_urlencoded::Serializer::new(String::new());
    let mut replaced = false;
    for (k, v) in query {
        if k == "page" {
            if !replaced {
                ser.append_pair("page", &page.to_string());
                replaced = true;
            }
        } else {
            ser.append_pair(k, v);
        }
    }
    if !replaced {
        ser.append_pair("page", &page.to_string());
    }
    format!("{self_url}?{}", ser.finish())
}

/// A parsed `fields=` parameter.
#[derive(Debug, Default, PartialEq)]
pub struct FieldSpec {
    pub include: Vec<Vec<String>>,
    pub add: Vec<Vec<String>>,
    pub remove: Vec<Vec<String>>,
}

impl FieldSpec {
    pub fn parse(spec: &str) -> FieldSpec {
        let mut out = FieldSpec::default();
        for raw in spec.split(',') {
            // An unencoded `+` arrives as a space: treat it as `+`.
            let raw = raw.trim_end();
            if raw.trim().is_empty() {
                continue;
            }
            let (list, path) = if let Some(p) = raw.strip_prefix('+').or_else(|| raw.strip_prefix(' ')) {
                (&mut out.add, p)
            } else if let Some(p) = raw.strip_prefix('-') {
                (&mut out.remove, p)
            } else {
                (&mut out.include, raw)
            };
            let segs: Vec<String> = path
                .trim()
                .split('.')
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect();
            if !segs.is_empty() {
                list.push(segs);
            }
        }
        out
    }
}

/// Applies a `fields=` spec to a response body.
///
/// `hidden` lists paths present in `value` that Bitbucket only returns when
/// asked for by name (for example `values.user.email`): they are removed
/// unless an include or `+` path names them. Then, if there are include paths,
/// only those (and the `+` paths) are kept; `*` matches any key, and arrays
/// are transparent. Finally `-` paths are removed.
pub fn apply_fields(value: Value, spec: &FieldSpec, hidden: &[&str]) -> Value {
    let mut value = value;
    for h in hidden {
        let hp: Vec<String> = h.split('.').map(str::to_string).collect();
        let named = spec.include.iter().chain(spec.add.iter()).any(|p| path_matches(p, &hp));
        if !named {
            remove_path(&mut value, &hp);
        }
    }
    if !spec.include.is_empty() {
        let keep: Vec<&Vec<String>> = spec.include.iter().chain(spec.add.iter()).collect();
        value = project(&value, &keep).unwrap_or(Value::Object(Map::new()));
    }
    for r in &spec.remove {
        remove_path(&mut value, r);
    }
    value
}

/// Whether `p` names the hidden path `h` explicitly (`*` does not).
fn path_matches(p: &[String], h: &[String]) -> bool {
    p == h
}

fn project(value: &Value, paths: &[&Vec<String>]) -> Option<Value> {
    if paths.iter().any(|p| p.is_empty()) {
        return Some(value.clone());
    }
    match value {
        Value::Array(items) => Some(Value::Array(items.iter().filter_map(|v| project(v, paths)).collect())),
        Value::Object(map) => {
            let mut out = Map::new();
            for (k, v) in map {
                let sub: Vec<Vec<String>> = paths
                    .iter()
                    .filter(|p| p[0] == "*" || &p[0] == k)
                    .map(|p| p[1..].to_vec())
                    .collect();
                if sub.is_empty() {
                    continue;
                }
                let refs: Vec<&Vec<String>> = sub.iter().collect();
                if let Some(pv) = project(v, &refs) {
                    out.insert(k.clone(), pv);
                }
            }
            // Objects where no requested field exists are dropped.
            (!out.is_empty()).then_some(Value::Object(out))
        }
        _ => None,
    }
}

fn remove_path(value: &mut Value, path: &[String]) {
    if path.is_empty() {
        return;
    }
    match value {
        Value::Array(items) => {
            for v in items {
                remove_path(v, path);
            }
        }
        Value::Object(map) => {
            if path.len() == 1 {
                if path[0] == "*" {
                    map.clear();
                } else {
                    map.remove(&path[0]);
                }
            } else {
                for (k, v) in map.iter_mut() {
                    if path[0] == "*" || &path[0] == k {
                        remove_path(v, &path[1..]);
                    }
                }
            }
        }
        _ => {}
    }
}

/// One BBQL comparison.
#[derive(Debug, Clone, PartialEq)]
struct Clause {
    path: Vec<String>,
    op: String,
    values: Vec<String>,
}

/// A BBQL query: clauses joined by `OR` of `AND`s (no parentheses).
#[derive(Debug, Clone, PartialEq)]
pub struct Bbql {
    any_of: Vec<Vec<Clause>>,
}

impl Bbql {
    /// Parses `field op "value"` clauses joined with `AND`/`OR`. Supported
    /// operators: `=`, `!=`, `~`, `!~`, `IN (…)`, `NOT IN (…)`. Values are
    /// double-quoted strings, `true`/`false`, `null` or numbers.
    pub fn parse(q: &str) -> Result<Bbql, ApiError> {
        let tokens = tokenize(q).ok_or_else(invalid_query)?;
        let mut any_of = vec![Vec::new()];
        let mut i = 0;
        while i < tokens.len() {
            let field = match &tokens[i] {
                Tok::Word(w) => w.clone(),
                _ => return Err(invalid_query()),
            };
            i += 1;
            let mut op = parse_operator(&tokens, &mut i)?;
            let values = parse_values(&tokens, &mut i, op == "IN" || op == "NOT IN")?;
            if !["=", "!=", "~", "!~", ">", ">=", "<", "<=", "IN", "NOT IN"].contains(&op.as_str()) {
                return Err(ApiError::bad_request(&format!(
                    "Operator {op} is not supported by the simulator"
                )));
            }
            if op == "==" {
                op = "=".into();
            }
            any_of.last_mut().expect("any_of is never empty").push(Clause {
                path: field.split('.').map(str::to_string).collect(),
                op,
                values,
            });
            match tokens.get(i) {
                None => break,
                Some(Tok::Word(w)) if w.eq_ignore_ascii_case("and") => i += 1,
                Some(Tok::Word(w)) if w.eq_ignore_ascii_case("or") => {
                    any_of.push(Vec::new());
                    i += 1;
                }
                _ => return Err(invalid_query()),
            }
            if i >= tokens.len() {
                return Err(invalid_query());
            }
        }
        if any_of.iter().any(Vec::is_empty) {
            return Err(invalid_query());
        }
        Ok(Bbql { any_of })
    }

    /// Every clause as `(field path, number of values)`, to reject fields an
    /// endpoint cannot filter on and over-long `IN` lists.
    pub fn clauses(&self) -> Vec<(String, usize)> {
        self.any_of
            .iter()
            .flatten()
            .map(|c| (c.path.join("."), c.values.len()))
            .collect()
    }

    pub fn matches(&self, item: &Value) -> bool {
        self.any_of
            .iter()
            .any(|all| all.iter().all(|c| clause_matches(c, item)))
    }
}

/// The operator at `tokens[*i]` (`IN` and `NOT IN` are words), advancing
/// past it.
fn parse_operator(tokens: &[Tok], i: &mut usize) -> Result<String, ApiError> {
    let op = match tokens.get(*i) {
        Some(Tok::Op(o)) => o.clone(),
        Some(Tok::Word(w)) if w.eq_ignore_ascii_case("in") => "IN".into(),
        Some(Tok::Word(w)) if w.eq_ignore_ascii_case("not") => match tokens.get(*i + 1) {
            Some(Tok::Word(w2)) if w2.eq_ignore_ascii_case("in") => {
                *i += 1;
                "NOT IN".into()
            }
            _ => return Err(invalid_query()),
        },
        _ => return Err(invalid_query()),
    };
    *i += 1;
    Ok(op)
}

/// One value, or a parenthesised list of them when `list`, advancing past
/// it.
fn parse_values(tokens: &[Tok], i: &mut usize, list: bool) -> Result<Vec<String>, ApiError> {
    let value = |tok: Option<&Tok>| match tok {
        Some(Tok::Str(s)) | Some(Tok::Word(s)) => Ok(s.clone()),
        _ => Err(invalid_query()),
    };
    if !list {
        let v = value(tokens.get(*i))?;
        *i += 1;
        return Ok(vec![v]);
    }
    if tokens.get(*i) != Some(&Tok::Open) {
        return Err(invalid_query());
    }
    *i += 1;
    let mut values = Vec::new();
    loop {
        values.push(value(tokens.get(*i))?);
        *i += 1;
        match tokens.get(*i) {
            Some(Tok::Comma) => *i += 1,
            Some(Tok::Close) => {
                *i += 1;
                return Ok(values);
            }
            _ => return Err(invalid_query()),
        }
    }
}

fn invalid_query() -> ApiError {
    ApiError::bad_request("Invalid query: could not parse the q parameter")
}

fn clause_matches(c: &Clause, item: &Value) -> bool {
    let mut cur = item;
    for seg in &c.path {
        match cur.get(seg) {
            Some(v) => cur = v,
            None => {
                cur = &Value::Null;
                break;
            }
        }
    }
    let actual = match cur {
        Value::String(s) => s.clone(),
        Value::Null => "null".into(),
        other => other.to_string(),
    };
    let v0 = c.values.first().map(String::as_str).unwrap_or("");
    match c.op.as_str() {
        "=" => actual == v0,
        "!=" => actual != v0,
        "~" => actual.to_lowercase().contains(&v0.to_lowercase()),
        "!~" => !actual.to_lowercase().contains(&v0.to_lowercase()),
        ">" | ">=" | "<" | "<=" => {
            let o = ordered(&actual, v0);
            match c.op.as_str() {
                ">" => o.is_gt(),
                ">=" => o.is_ge(),
                "<" => o.is_lt(),
                _ => o.is_le(),
            }
        }
        "IN" => c.values.contains(&actual),
        "NOT IN" => !c.values.contains(&actual),
        _ => false,
    }
}

/// Ordered comparison: permission names by rank (`none < read < write <
/// create-repo < admin`, `member < owner`), numbers numerically, otherwise
/// strings (ISO timestamps order correctly as strings).
fn ordered(a: &str, b: &str) -> std::cmp::Ordering {
    let perm = |s: &str| match s {
        "none" => Some(0),
        "read" | "member" => Some(1),
        "write" | "create-project" => Some(2),
        "create-repo" => Some(3),
        "admin" | "owner" => Some(4),
        _ => None,
    };
    if let (Some(x), Some(y)) = (perm(a), perm(b)) {
        return x.cmp(&y);
    }
    if let (Ok(x), Ok(y)) = (a.parse::<f64>(), b.parse::<f64>()) {
        return x.total_cmp(&y);
    }
    a.cmp(b)
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Word(String),
    Str(String),
    Op(String),
    Open,
    Close,
    Comma,
}

fn tokenize(q: &str) -> Option<Vec<Tok>> {
    let chars: Vec<char> = q.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c.is_whitespace() {
            i += 1;
        } else if c == '"' {
            let mut s = String::new();
            i += 1;
            loop {
                let ch = *chars.get(i)?;
                i += 1;
                match ch {
                    '"' => break,
                    '\\' => {
                        s.push(*chars.get(i)?);
                        i += 1;
                    }
                    _ => s.push(ch),
                }
            }
            out.push(Tok::Str(s));
        } else if c == '(' {
            out.push(Tok::Open);
            i += 1;
        } else if c == ')' {
            out.push(Tok::Close);
            i += 1;
        } else if c == ',' {
            out.push(Tok::Comma);
            i += 1;
        } else if "=!~<>".contains(c) {
            let mut op = String::from(c);
            i += 1;
            while i < chars.len() && "=~".contains(chars[i]) {
                op.push(chars[i]);
                i += 1;
            }
            out.push(Tok::Op(op));
        } else {
            let mut w = String::new();
            while i < chars.len() && !chars[i].is_whitespace() && !"\"()=,!~<>".contains(chars[i]) {
                w.push(chars[i]);
                i += 1;
            }
            out.push(Tok::Word(w));
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(pairs: &[(&str, &str)]) -> Query {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn pagination_math_and_next_links() {
        let items: Vec<Value> = (0..25).map(|i| json!(i)).collect();
        let query = q(&[("fields", "+values.user.email"), ("pagelen", "10")]);
        let p1 = paginate(items.clone(), &query, "http://h/2.0/x", 100).unwrap();
        assert_eq!(p1["size"], 25);
        assert_eq!(p1["values"].as_array().unwrap().len(), 10);
        assert!(p1.get("previous").is_none());
        assert_eq!(
            p1["next"],
            "http://h/2.0/x?fields=%2Bvalues.user.email&pagelen=10&page=2"
        );
        let query3 = q(&[("page", "3"), ("pagelen", "10")]);
        let p3 = paginate(items.clone(), &query3, "http://h/x", 100).unwrap();
        assert_eq!(p3["values"], json!([20, 21, 22, 23, 24]));
        assert!(p3.get("next").is_none());
        assert_eq!(p3["previous"], "http://h/x?page=2&pagelen=10");
        // Default pagelen is 10; exactly one page has no next.
        let one = paginate(items[..10].to_vec(), &q(&[]), "http://h/x", 100).unwrap();
        assert_eq!(one["pagelen"], 10);
        assert!(one.get("next").is_none());
        // Empty lists are one empty page.
        let empty = paginate(vec![], &q(&[]), "http://h/x", 100).unwrap();
        assert_eq!(empty["values"], json!([]));
        for bad in ["101", "0", "x", "-1"] {
            let err = paginate(items.clone(), &q(&[("pagelen", bad)]), "u", 100).unwrap_err();
            assert_eq!(err.status, 400);
            assert_eq!(err.message, "Invalid pagelen");
        }
        assert_eq!(paginate(items, &q(&[("page", "4")]), "u", 100).unwrap_err().status, 404);
    }

    #[test]
    fn fields_include_add_remove_and_hidden() {
        let body = json!({
            "size": 1, "next": "n",
            "values": [{"type": "workspace_membership",
                        "user": {"uuid": "u", "email": "e", "links": {"self": 1}},
                        "links": {"self": 2}}]
        });
        let hidden = ["values.user.email"];
        let default = apply_fields(body.clone(), &FieldSpec::parse(""), &hidden);
        assert!(default["values"][0]["user"].get("email").is_none());
        let plus = apply_fields(body.clone(), &FieldSpec::parse("+values.user.email"), &hidden);
        assert_eq!(plus["values"][0]["user"]["email"], "e");
        assert_eq!(plus["size"], 1);
        let only = apply_fields(body.clone(), &FieldSpec::parse("values.user.uuid,next"), &hidden);
        assert_eq!(only, json!({"next": "n", "values": [{"user": {"uuid": "u"}}]}));
        let minus = apply_fields(body.clone(), &FieldSpec::parse("-values.links"), &hidden);
        assert!(minus["values"][0].get("links").is_none());
        assert!(minus["values"][0]["user"].get("links").is_some());
        let star = apply_fields(body.clone(), &FieldSpec::parse("values.*.uuid"), &hidden);
        assert_eq!(star, json!({"values": [{"user": {"uuid": "u"}}]}));
        let star_minus = apply_fields(body, &FieldSpec::parse("-values.*.links"), &hidden);
        assert!(star_minus["values"][0]["user"].get("links").is_none());
    }

    #[test]
    fn bbql_subset() {
        let item = json!({"slug": "acme", "project": {"key": "K"}, "user": {"email": "a@x"}});
        assert!(Bbql::parse(r#"slug="acme""#).unwrap().matches(&item));
        assert!(!Bbql::parse(r#"slug = "other""#).unwrap().matches(&item));
        assert!(Bbql::parse(r#"project.key="K" AND slug~"ac""#).unwrap().matches(&item));
        assert!(Bbql::parse(r#"slug="zz" OR project.key="K""#).unwrap().matches(&item));
        assert!(Bbql::parse(r#"user.email IN ("b@x", "a@x")"#).unwrap().matches(&item));
        assert!(!Bbql::parse(r#"user.email NOT IN ("a@x")"#).unwrap().matches(&item));
        let perm = json!({"permission": "write", "size": 5});
        assert!(Bbql::parse(r#"permission>"read""#).unwrap().matches(&perm));
        assert!(!Bbql::parse(r#"permission>"write""#).unwrap().matches(&perm));
        assert!(Bbql::parse(r#"permission>="write""#).unwrap().matches(&perm));
        assert!(Bbql::parse("size < 10").unwrap().matches(&perm));
        for bad in ["", "slug", "slug=", r#"slug="x" AND"#, r#"slug="x"#, "a >< \"b\""] {
            assert_eq!(Bbql::parse(bad).unwrap_err().status, 400, "{bad}");
        }
    }
}
