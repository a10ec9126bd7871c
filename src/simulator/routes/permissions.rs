//! Explicit grants: `permissions-config` on projects and repositories, for
//! users and groups. `GET` lists or reads one grant, `PUT` sets the level
//! (only for workspace members who are not owners), `DELETE` removes it.
//! Project routes also answer under `/1.0/workspaces/…`, as baton-bitbucket
//! calls them. Access tokens get 403; OAuth tokens may read but not write.

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::Method;
use serde_json::{Value, json};

use crate::simulator::app::App;
use crate::simulator::auth::Principal;
use crate::simulator::org::Permission;
use crate::simulator::paging::{paginate, param};
use crate::simulator::pipeline::{Ctx, GET, GET_PUT_DELETE, Ids, api};
use crate::simulator::render::{enc, link};
use crate::simulator::reply::{Answer, ApiError, Reply};
use crate::simulator::state::OrgState;

/// Whose grants: a project's or a repository's.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Target {
    Project,
    Repository,
}

/// Which grants: user or group grants.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Users,
    Groups,
}

/// One family of grant routes.
#[derive(Debug, Clone, Copy)]
struct Scope {
    target: Target,
    kind: Kind,
}

pub(super) fn router(app: &Arc<App>) -> Router<Arc<App>> {
    let prefixes = [
        ("/2.0/workspaces/{ws}/projects/{target}", Target::Project),
        ("/1.0/workspaces/{ws}/projects/{target}", Target::Project),
        ("/2.0/repositories/{ws}/{target}", Target::Repository),
    ];
    let mut router = Router::new();
    for (prefix, target) in prefixes {
        let class = match target {
            Target::Project => "project-permissions",
            Target::Repository => "repository-permissions",
        };
        for (segment, kind) in [("users", Kind::Users), ("groups", Kind::Groups)] {
            let scope = Scope { target, kind };
            let collection = format!("{prefix}/permissions-config/{segment}");
            let list = move |State(app): State<Arc<App>>, ctx: Ctx, Ids([ws, t]): Ids<2>| async move {
                list(&app, &ctx, scope, &ws, &t)
            };
            let entry = move |State(app): State<Arc<App>>, ctx: Ctx, Ids(ids): Ids<3>, body: Bytes| async move {
                entry(&app, &ctx, scope, &ids, &body)
            };
            router = router
                .route(&collection, api(app, class, GET, list))
                .route(&format!("{collection}/{{id}}"), api(app, class, GET_PUT_DELETE, entry));
        }
    }
    router
}

/// The explicit grants of one kind on one project or repository.
struct Grants {
    scope: Scope,
    /// Workspace index.
    w: usize,
    /// Project or repository index.
    t: usize,
    /// `…/permissions-config`, for `self` links.
    base: String,
}

impl Grants {
    fn resolve(app: &App, st: &OrgState, scope: Scope, ws: &str, target: &str) -> Result<Grants, ApiError> {
        let w = st.workspace_or_404(ws)?;
        let slug = &st.org.workspaces[w].slug;
        let (t, base) = match scope.target {
            Target::Project => {
                let p = st.project_or_404(w, target)?;
                let key = &st.org.workspaces[w].projects[p].key;
                let base = format!(
                    "{}/2.0/workspaces/{slug}/projects/{key}/permissions-config",
                    app.base_url
                );
                (p, base)
            }
            Target::Repository => {
                let r = st.repo_or_404(w, ws, target)?;
                let repo = &st.org.workspaces[w].repositories[r].slug;
                let base = format!("{}/2.0/repositories/{slug}/{repo}/permissions-config", app.base_url);
                (r, base)
            }
        };
        Ok(Grants { scope, w, t, base })
    }

    fn of<'a>(&self, st: &'a OrgState) -> &'a [Permission] {
        let ws = &st.org.workspaces[self.w];
        match (self.scope.target, self.scope.kind) {
            (Target::Project, Kind::Users) => &ws.projects[self.t].user_permissions,
            (Target::Project, Kind::Groups) => &ws.projects[self.t].group_permissions,
            (Target::Repository, Kind::Users) => &ws.repositories[self.t].user_permissions,
            (Target::Repository, Kind::Groups) => &ws.repositories[self.t].group_permissions,
        }
    }

    fn of_mut<'a>(&self, st: &'a mut OrgState) -> &'a mut Vec<Permission> {
        let ws = &mut st.org.workspaces[self.w];
        match (self.scope.target, self.scope.kind) {
            (Target::Project, Kind::Users) => &mut ws.projects[self.t].user_permissions,
            (Target::Project, Kind::Groups) => &mut ws.projects[self.t].group_permissions,
            (Target::Repository, Kind::Users) => &mut ws.repositories[self.t].user_permissions,
            (Target::Repository, Kind::Groups) => &mut ws.repositories[self.t].group_permissions,
        }
    }

    /// The grantee as stored: a user UUID (by UUID or account id; project
    /// routes also take the nickname) or a group slug.
    fn principal(&self, st: &OrgState, id: &str) -> Result<String, ApiError> {
        match self.scope.kind {
            Kind::Users => {
                let u = st
                    .user(id, self.scope.target == Target::Project)
                    .ok_or_else(|| ApiError::not_found(&format!("User {id} not found")))?;
                Ok(st.org.users[u].uuid.clone())
            }
            Kind::Groups => {
                let g = st.group_or_404(self.w, id)?;
                Ok(st.org.workspaces[self.w].groups[g].slug.clone())
            }
        }
    }

    fn render(&self, app: &App, st: &OrgState, perm: &Permission) -> Value {
        let type_name = match (self.scope.target, self.scope.kind) {
            (Target::Project, Kind::Users) => "project_user_permission",
            (Target::Project, Kind::Groups) => "project_group_permission",
            (Target::Repository, Kind::Users) => "repository_user_permission",
            (Target::Repository, Kind::Groups) => "repository_group_permission",
        };
        let mut v = json!({"type": type_name, "permission": perm.permission});
        let base = &self.base;
        match self.scope.kind {
            Kind::Users => {
                let u = st.user_by_uuid.get(&perm.principal).copied().unwrap_or(0);
                v["user"] = app.user_json(st, u, false);
                v["links"] = json!({"self": link(format!("{base}/users/{}", enc(&perm.principal)))});
            }
            Kind::Groups => {
                let g = st.ws[self.w].groups.get(&perm.principal).copied().unwrap_or(0);
                v["group"] = app.group_json(st, self.w, g);
                v["links"] = json!({"self": link(format!("{base}/groups/{}", enc(&perm.principal)))});
            }
        }
        match self.scope.target {
            Target::Project => v["project"] = app.project_short(st, self.w, self.t),
            Target::Repository => v["repository"] = app.repo_short(st, self.w, self.t),
        }
        v
    }
}

/// `GET …/permissions-config/{users|groups}`: paged, no `q=`.
fn list(app: &App, ctx: &Ctx, scope: Scope, ws: &str, target: &str) -> Reply {
    ctx.deny_access_token()?;
    let st = app.read();
    let grants = Grants::resolve(app, &st, scope, ws, target)?;
    if param(&ctx.query, "q").is_some() {
        return Err(ApiError::bad_request("This endpoint does not support BBQL filtering"));
    }
    let list = grants.of(&st);
    let url = app.self_url(ctx);
    let items: Vec<Value> = (0..list.len()).map(|i| json!(i)).collect();
    let mut page = paginate(items, &ctx.query, &url, app.max_pagelen)?;
    if let Some(values) = page.get_mut("values").and_then(Value::as_array_mut) {
        for v in values.iter_mut() {
            let i = v.as_u64().unwrap_or(0) as usize;
            *v = grants.render(app, &st, &list[i]);
        }
    }
    Ok(ctx.json(page))
}

/// `GET|PUT|DELETE …/permissions-config/{users|groups}/{id}`; `ids` are
/// workspace, project or repository, and grantee.
fn entry(app: &App, ctx: &Ctx, scope: Scope, ids: &[String; 3], body: &[u8]) -> Reply {
    ctx.deny_access_token()?;
    let writing = ctx.method == Method::PUT || ctx.method == Method::DELETE;
    if writing && ctx.principal == Principal::OAuth {
        return Err(ApiError::forbidden(
            "This API is only accessible with the following authentication types: api-token",
        ));
    }
    let [ws, target, id] = ids;
    if !writing {
        let st = app.read();
        let grants = Grants::resolve(app, &st, scope, ws, target)?;
        let principal = grants.principal(&st, id)?;
        return match grants.of(&st).iter().find(|p| p.principal == principal) {
            Some(p) => Ok(ctx.json(grants.render(app, &st, p))),
            None => Err(ApiError::not_found(&format!(
                "No explicit permission for {id} on this {}",
                if scope.target == Target::Project {
                    "project"
                } else {
                    "repository"
                }
            ))),
        };
    }
    let mut st = app.write();
    let grants = Grants::resolve(app, &st, scope, ws, target)?;
    let principal = grants.principal(&st, id)?;
    if ctx.method == Method::DELETE {
        grants.of_mut(&mut st).retain(|p| p.principal != principal);
        st.generation += 1;
        return Ok(Answer::NoContent);
    }
    let allowed: &[&str] = match scope.target {
        Target::Project => &["read", "write", "create-repo", "admin"],
        Target::Repository => &["read", "write", "admin"],
    };
    let permission = validate_permission_body(body, allowed)?;
    if scope.kind == Kind::Users {
        check_grantable(&st, grants.w, &principal, id)?;
    }
    let perm = Permission { principal, permission };
    let list = grants.of_mut(&mut st);
    match list.iter_mut().find(|p| p.principal == perm.principal) {
        Some(p) => p.permission = perm.permission.clone(),
        None => list.push(perm.clone()),
    }
    st.generation += 1;
    Ok(ctx.json(grants.render(app, &st, &perm)))
}

/// Only workspace members who are not owners can be granted permissions.
fn check_grantable(st: &OrgState, w: usize, user_uuid: &str, id: &str) -> Result<(), ApiError> {
    let u = st.user_by_uuid.get(user_uuid).copied().unwrap_or(0);
    let slug = &st.org.workspaces[w].slug;
    match st.ws[w].members.get(&u) {
        None => Err(ApiError::bad_request(&format!(
            "User {id} is not a member of workspace {slug}; only workspace members can be granted permissions"
        ))),
        Some(true) => Err(ApiError::bad_request(&format!(
            "User {id} is an owner of workspace {slug}; the permissions of workspace owners cannot be changed"
        ))),
        Some(false) => Ok(()),
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
