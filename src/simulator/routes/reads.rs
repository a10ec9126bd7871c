//! The 2.0 read endpoints: the caller, workspaces and their members,
//! workspace and effective repository permissions, projects and
//! repositories. Listings use the shared paging (`pagelen`, `page`, `q=`,
//! `sort=`); emails appear only when `fields=` asks for them.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use serde_json::{Value, json};

use crate::simulator::app::App;
use crate::simulator::auth::Principal;
use crate::simulator::org::rank_name;
use crate::simulator::paging::{Bbql, param};
use crate::simulator::pipeline::{Ctx, GET, Ids, api};
use crate::simulator::render::{link, timestamp};
use crate::simulator::reply::{ApiError, Reply};

pub(super) fn router(app: &Arc<App>) -> Router<Arc<App>> {
    let effective = "repository-permissions-effective";
    Router::new()
        .route("/2.0/user", api(app, "user", GET, current_user))
        .route("/2.0/users/{id}", api(app, "user", GET, user))
        .route(
            "/2.0/user/workspaces",
            api(app, "user-workspaces", GET, user_workspaces),
        )
        .route(
            "/2.0/user/workspaces/{ws}/permission",
            api(app, "user-workspaces", GET, user_workspace_permission),
        )
        .route("/2.0/workspaces/{ws}", api(app, "workspace", GET, workspace))
        .route("/2.0/workspaces/{ws}/members", api(app, "members", GET, members))
        .route(
            "/2.0/workspaces/{ws}/members/{member}",
            api(app, "members", GET, member),
        )
        .route(
            "/2.0/workspaces/{ws}/permissions",
            api(app, "workspace-permissions", GET, workspace_permissions),
        )
        .route(
            "/2.0/workspaces/{ws}/permissions/repositories",
            api(app, effective, GET, effective_permissions),
        )
        .route(
            "/2.0/workspaces/{ws}/permissions/repositories/{repo}",
            api(app, effective, GET, effective_permissions_of_repository),
        )
        .route("/2.0/workspaces/{ws}/projects", api(app, "projects", GET, projects))
        .route(
            "/2.0/workspaces/{ws}/projects/{key}",
            api(app, "projects", GET, project),
        )
        .route("/2.0/repositories/{ws}", api(app, "repositories", GET, repositories))
        .route(
            "/2.0/repositories/{ws}/{repo}",
            api(app, "repositories", GET, repository),
        )
}

/// The admin for API tokens and OAuth; the pseudo-user for access tokens.
async fn current_user(State(app): State<Arc<App>>, ctx: Ctx) -> Reply {
    if ctx.principal == Principal::AccessToken {
        return Ok(ctx.json(app.pseudo_user.clone()));
    }
    let st = app.read();
    let admin = st.user_by_uuid.get(&app.auth.creds.admin_uuid).copied().unwrap_or(0);
    let mut v = app.user_json(&st, admin, false);
    v["created_on"] = json!(timestamp(&st.org.users[admin].uuid, 0));
    v["has_2fa_enabled"] = json!(true);
    v["is_staff"] = json!(false);
    Ok(ctx.json(v))
}

async fn user(State(app): State<Arc<App>>, ctx: Ctx, Ids([id]): Ids<1>) -> Reply {
    let st = app.read();
    let u = st
        .user(&id, false)
        .ok_or_else(|| ApiError::not_found(&format!("User {id} not found")))?;
    Ok(ctx.json(app.user_json(&st, u, false)))
}

/// Workspaces of the caller, `administrator=` filtered; only `slug` sorts.
async fn user_workspaces(State(app): State<Arc<App>>, ctx: Ctx) -> Reply {
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
    Ok(ctx.json(app.list(&ctx, order.len(), render, Some(&view))?))
}

/// The caller's membership of one workspace (403, not 404, when unknown).
async fn user_workspace_permission(State(app): State<Arc<App>>, ctx: Ctx, Ids([ws]): Ids<1>) -> Reply {
    let st = app.read();
    let w = st
        .workspace(&ws)
        .ok_or_else(|| ApiError::forbidden("You do not have access to this workspace"))?;
    if ctx.principal == Principal::AccessToken {
        return Ok(ctx.json(json!({
            "type": "workspace_membership",
            "permission": "member",
            "user": app.pseudo_user,
            "workspace": app.workspace_full(&st, w),
        })));
    }
    let admin = st.user_by_uuid.get(&app.auth.creds.admin_uuid).copied().unwrap_or(0);
    let mut v = app.membership_json(&st, w, admin, true);
    v["workspace"] = app.workspace_full(&st, w);
    Ok(ctx.json(v).hiding(&["user.email"]))
}

async fn workspace(State(app): State<Arc<App>>, ctx: Ctx, Ids([ws]): Ids<1>) -> Reply {
    let st = app.read();
    let w = st.workspace_or_404(&ws)?;
    Ok(ctx.json(app.workspace_full(&st, w)))
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

async fn members(State(app): State<Arc<App>>, ctx: Ctx, Ids([ws]): Ids<1>) -> Reply {
    let st = app.read();
    let w = st.workspace_or_404(&ws)?;
    check_member_query(&ctx, &[])?;
    let order = &st.ws[w].member_order;
    let v = app.list(
        &ctx,
        order.len(),
        |i| app.membership_json(&st, w, order[i], false),
        None,
    )?;
    Ok(ctx.json(v).hiding(&["values.user.email"]))
}

async fn member(State(app): State<Arc<App>>, ctx: Ctx, Ids([ws, m]): Ids<2>) -> Reply {
    let st = app.read();
    let w = st.workspace_or_404(&ws)?;
    let u = st
        .user(&m, false)
        .filter(|u| st.ws[w].members.contains_key(u))
        .ok_or_else(|| ApiError::not_found(&format!("{m} is not a member of {ws}")))?;
    Ok(ctx.json(app.membership_json(&st, w, u, false)).hiding(&["user.email"]))
}

/// Members with `owner`/`member`; filterable on `permission` too.
async fn workspace_permissions(State(app): State<Arc<App>>, ctx: Ctx, Ids([ws]): Ids<1>) -> Reply {
    ctx.deny_access_token()?;
    let st = app.read();
    let w = st.workspace_or_404(&ws)?;
    check_member_query(&ctx, &["permission"])?;
    let order = &st.ws[w].member_order;
    let v = app.list(&ctx, order.len(), |i| app.membership_json(&st, w, order[i], true), None)?;
    Ok(ctx.json(v).hiding(&["values.user.email"]))
}

async fn effective_permissions(State(app): State<Arc<App>>, ctx: Ctx, Ids([ws]): Ids<1>) -> Reply {
    effective_listing(&app, &ctx, &ws, None)
}

async fn effective_permissions_of_repository(State(app): State<Arc<App>>, ctx: Ctx, Ids([ws, repo]): Ids<2>) -> Reply {
    effective_listing(&app, &ctx, &ws, Some(&repo))
}

/// Effective repository permissions (see the module docs of
/// [`crate::simulator`]), of the workspace or of one repository.
fn effective_listing(app: &App, ctx: &Ctx, ws: &str, repo: Option<&str>) -> Reply {
    ctx.deny_access_token()?;
    let st = app.read();
    let w = st.workspace_or_404(ws)?;
    let all = app.effective(&st, w);
    let entries: Vec<(usize, usize, u8)> = match repo {
        None => all.to_vec(),
        Some(slug) => {
            let r = st.repo_or_404(w, ws, slug)?;
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
    Ok(ctx.json(app.list(ctx, entries.len(), render, None)?))
}

async fn projects(State(app): State<Arc<App>>, ctx: Ctx, Ids([ws]): Ids<1>) -> Reply {
    let st = app.read();
    let w = st.workspace_or_404(&ws)?;
    let n = st.org.workspaces[w].projects.len();
    Ok(ctx.json(app.list(&ctx, n, |i| app.project_json(&st, w, i), None)?))
}

async fn project(State(app): State<Arc<App>>, ctx: Ctx, Ids([ws, key]): Ids<2>) -> Reply {
    let st = app.read();
    let w = st.workspace_or_404(&ws)?;
    let p = st.project_or_404(w, &key)?;
    Ok(ctx.json(app.project_json(&st, w, p)))
}

/// Repositories of a workspace; `role=` is validated but every repository
/// is visible to the admin.
async fn repositories(State(app): State<Arc<App>>, ctx: Ctx, Ids([ws]): Ids<1>) -> Reply {
    let st = app.read();
    let w = st.workspace_or_404(&ws)?;
    if let Some(role) = param(&ctx.query, "role")
        && !["member", "contributor", "admin", "owner"].contains(&role)
    {
        return Err(ApiError::bad_request(&format!("Invalid role: {role}")));
    }
    let n = st.org.workspaces[w].repositories.len();
    Ok(ctx.json(app.list(&ctx, n, |i| app.repo_json(&st, w, i), None)?))
}

async fn repository(State(app): State<Arc<App>>, ctx: Ctx, Ids([ws, slug]): Ids<2>) -> Reply {
    let st = app.read();
    let w = st.workspace_or_404(&ws)?;
    let r = st.repo_or_404(w, &ws, &slug)?;
    Ok(ctx.json(app.repo_json(&st, w, r)))
}
