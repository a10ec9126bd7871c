//! The 1.0 groups API, as baton-bitbucket calls it: bare JSON arrays (no
//! pagination envelope), workspaces by slug only, and membership writes
//! (`PUT` answers 409 when the user is already a member). Access tokens get
//! 403, as on every permission API.

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::Method;
use serde_json::Value;

use crate::simulator::app::App;
use crate::simulator::pipeline::{Ctx, GET, Ids, PUT_DELETE, api};
use crate::simulator::reply::{Answer, ApiError, Reply};
use crate::simulator::state::OrgState;

const CLASS: &str = "groups-1.0";

pub(super) fn router(app: &Arc<App>) -> Router<Arc<App>> {
    Router::new()
        .route("/1.0/groups", api(app, CLASS, GET, groups_by_name))
        .route("/1.0/groups/{ws}", api(app, CLASS, GET, groups_of_workspace))
        .route("/1.0/groups/{ws}/{group}/members", api(app, CLASS, GET, members))
        .route(
            "/1.0/groups/{ws}/{group}/members/{member}",
            api(app, CLASS, PUT_DELETE, membership),
        )
}

/// The 1.0 API needs the slug: `{uuid}` workspaces are not found.
fn workspace_by_slug(st: &OrgState, ws: &str) -> Result<usize, ApiError> {
    if ws.starts_with('{') {
        return Err(ApiError::not_found(
            "The 1.0 groups API needs the workspace slug, not its UUID.",
        ));
    }
    st.workspace_or_404(ws)
}

/// `GET /1.0/groups?group={ws}/{slug}` (repeatable); unknown workspaces or
/// groups are skipped, like Bitbucket.
async fn groups_by_name(State(app): State<Arc<App>>, ctx: Ctx) -> Reply {
    ctx.deny_access_token()?;
    let st = app.read();
    let mut out = Vec::new();
    for (k, v) in &ctx.query {
        if k != "group" {
            continue;
        }
        let Some((ws, g)) = v.split_once('/') else {
            return Err(ApiError::bad_request("group must be {workspace}/{group_slug}"));
        };
        let found = st
            .workspace(ws)
            .filter(|_| !ws.starts_with('{'))
            .and_then(|w| st.ws[w].groups.get(g).map(|&gi| (w, gi)));
        if let Some((w, gi)) = found {
            out.push(app.group10_json(&st, w, gi));
        }
    }
    Ok(ctx.json(Value::Array(out)))
}

async fn groups_of_workspace(State(app): State<Arc<App>>, ctx: Ctx, Ids([ws]): Ids<1>) -> Reply {
    ctx.deny_access_token()?;
    let st = app.read();
    let w = workspace_by_slug(&st, &ws)?;
    let groups: Vec<Value> = (0..st.org.workspaces[w].groups.len())
        .map(|g| app.group10_json(&st, w, g))
        .collect();
    Ok(ctx.json(Value::Array(groups)))
}

async fn members(State(app): State<Arc<App>>, ctx: Ctx, Ids([ws, g]): Ids<2>) -> Reply {
    ctx.deny_access_token()?;
    let st = app.read();
    let w = workspace_by_slug(&st, &ws)?;
    let gi = st.group_or_404(w, &g)?;
    let members: Vec<Value> = st.org.workspaces[w].groups[gi]
        .members
        .iter()
        .filter_map(|uu| st.user_by_uuid.get(uu))
        .map(|&u| app.member10_json(&st, u))
        .collect();
    Ok(ctx.json(Value::Array(members)))
}

/// `PUT` adds a workspace member to the group (409 if already in it);
/// `DELETE` removes one (404 if not in it).
async fn membership(State(app): State<Arc<App>>, ctx: Ctx, Ids([ws, g, m]): Ids<3>, body: Bytes) -> Reply {
    ctx.deny_access_token()?;
    let mut st = app.write();
    let w = workspace_by_slug(&st, &ws)?;
    let gi = st.group_or_404(w, &g)?;
    let u = st
        .user(&m, false)
        .ok_or_else(|| ApiError::not_found(&format!("User {m} not found")))?;
    let uuid = st.org.users[u].uuid.clone();
    let is_member = st.org.workspaces[w].groups[gi].members.contains(&uuid);
    if ctx.method == Method::PUT {
        if !body.iter().all(u8::is_ascii_whitespace) {
            serde_json::from_slice::<Value>(&body).map_err(|_| ApiError::bad_request("Invalid JSON body"))?;
        }
        if !st.ws[w].members.contains_key(&u) {
            return Err(ApiError::not_found(&format!("{m} is not a member of workspace {ws}")));
        }
        if is_member {
            return Err(ApiError::new(409, &format!("{m} is already a member of group {g}")));
        }
        st.org.workspaces[w].groups[gi].members.push(uuid);
        st.generation += 1;
        Ok(ctx.json(app.member10_json(&st, u)))
    } else {
        if !is_member {
            return Err(ApiError::not_found(&format!("{m} is not a member of group {g}")));
        }
        st.org.workspaces[w].groups[gi].members.retain(|x| *x != uuid);
        st.generation += 1;
        Ok(Answer::NoContent)
    }
}
