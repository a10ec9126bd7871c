//! JSON shapes shared by the API families: users, workspaces, memberships,
//! projects, repositories, groups (2.0 and 1.0), and the paged listing with
//! `q=` and `sort=` that every 2.0 collection uses.
//!
//! Everything is derived from the organisation; timestamps are synthesised
//! from ids so responses are stable across runs.

use serde_json::{Value, json};

use super::app::App;
use super::paging::{Bbql, paginate, param};
use super::pipeline::Ctx;
use super::reply::ApiError;
use super::state::OrgState;

pub(super) fn enc(s: &str) -> String {
    urlencoding::encode(s).into_owned()
}

pub(super) fn link(href: String) -> Value {
    json!({ "href": href })
}

/// A deterministic timestamp between 2018 and 2025 derived from an id.
pub(super) fn timestamp(id: &str, offset_days: u64) -> String {
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
    pub(super) fn user_json(&self, st: &OrgState, u: usize, with_email: bool) -> Value {
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

    pub(super) fn workspace_short(&self, st: &OrgState, w: usize) -> Value {
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

    pub(super) fn workspace_full(&self, st: &OrgState, w: usize) -> Value {
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
    pub(super) fn team_json(&self, st: &OrgState, w: usize) -> Value {
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

    pub(super) fn membership_json(&self, st: &OrgState, w: usize, u: usize, permission: bool) -> Value {
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

    pub(super) fn project_short(&self, st: &OrgState, w: usize, p: usize) -> Value {
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

    pub(super) fn project_json(&self, st: &OrgState, w: usize, p: usize) -> Value {
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

    pub(super) fn repo_short(&self, st: &OrgState, w: usize, r: usize) -> Value {
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

    pub(super) fn repo_json(&self, st: &OrgState, w: usize, r: usize) -> Value {
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

    pub(super) fn group_json(&self, st: &OrgState, w: usize, g: usize) -> Value {
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
    pub(super) fn member10_json(&self, st: &OrgState, u: usize) -> Value {
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

    pub(super) fn group10_json(&self, st: &OrgState, w: usize, g: usize) -> Value {
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

    pub(super) fn self_url(&self, ctx: &Ctx) -> String {
        format!("{}{}", ctx.origin, ctx.path)
    }

    /// Paginates `n` items rendered on demand; with `q=`, renders all, then
    /// filters. `filter_view` maps an item to the value `q` is evaluated on.
    pub(super) fn list(
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_iso8601() {
        let t = timestamp("{abc}", 0);
        assert_eq!(t.len(), "2020-01-01T00:00:00.000000+00:00".len(), "{t}");
        assert!(t.starts_with("20"));
    }
}
