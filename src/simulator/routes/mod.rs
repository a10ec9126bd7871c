//! One axum router per API family, merged into the simulator's service:
//!
//! - [`reads`]: the 2.0 read endpoints (user, workspaces, members,
//!   permissions, projects, repositories);
//! - [`permissions`]: explicit grants, `permissions-config` on projects and
//!   repositories (GET, PUT, DELETE; also under `/1.0/workspaces`);
//! - [`groups`]: the 1.0 groups API (bare arrays, membership writes);
//! - [`oauth`]: the OAuth token endpoint;
//! - [`retired`]: endpoints Bitbucket removed (410 CHANGE-2770).
//!
//! Each route is wrapped in the shared [`pipeline`](super::pipeline) with its
//! statistics class and methods; anything else is the HTML 404.

mod groups;
mod oauth;
mod permissions;
mod reads;
mod retired;

use std::sync::Arc;

use axum::Router;
use axum::extract::Request;
use tower::Layer;
use tower::util::{MapRequest, MapRequestLayer};

use super::app::App;
use super::pipeline::{canonical_path, unknown_path};

/// What the simulator serves: every family's router, paths canonicalised
/// before routing.
pub(super) type Service = MapRequest<Router, fn(Request) -> Request>;

pub(super) fn service(app: Arc<App>) -> Service {
    let router = Router::new()
        .merge(reads::router(&app))
        .merge(permissions::router(&app))
        .merge(groups::router(&app))
        .merge(oauth::router(&app))
        .merge(retired::router(&app))
        .fallback(unknown_path)
        .with_state(app);
    MapRequestLayer::new(canonical_path as fn(Request) -> Request).layer(router)
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use tower::ServiceExt as _;

    use super::*;
    use crate::simulator::SimConfig;
    use crate::simulator::auth::{Auth, SimCredentials};
    use crate::simulator::org::Organisation;

    /// Every path lands in its family and is counted under its class, odd
    /// spellings included; what no family serves is `unknown`.
    #[tokio::test]
    async fn paths_reach_their_family() {
        let config = SimConfig::default();
        let org = Organisation::generate(&config);
        let creds = SimCredentials::generate(config.seed, &org.users[0].email, &org.users[0].uuid);
        let auth = Auth::new(creds, config.oauth_token_ttl);
        let app = Arc::new(App::new(&config, "http://sim".into(), org, auth));
        let cases = [
            ("/2.0//user/", "user", 401),
            ("/2.0/%75sers/x", "user", 401),
            ("/2.0/user/workspaces", "user-workspaces", 401),
            ("/2.0/user/workspaces/acme/permission", "user-workspaces", 401),
            ("/2.0/workspaces", "workspace", 401),
            ("/2.0/workspaces/%7Bw%7D", "workspace", 401),
            ("/2.0/user/permissions/repositories", "retired", 401),
            ("/2.0/repositories", "retired", 401),
            ("/2.0/workspaces/acme/members/x", "members", 401),
            ("/2.0/workspaces/acme/permissions", "workspace-permissions", 401),
            (
                "/2.0/workspaces/acme/permissions/repositories/r",
                "repository-permissions-effective",
                401,
            ),
            ("/2.0/workspaces/acme/projects/K", "projects", 401),
            (
                "/1.0/workspaces/acme/projects/K/permissions-config/groups",
                "project-permissions",
                401,
            ),
            (
                "/2.0/repositories/acme/r/permissions-config/users/x",
                "repository-permissions",
                401,
            ),
            ("/2.0/repositories/acme/r", "repositories", 401),
            ("/1.0/groups/acme/devs/members/x", "groups-1.0", 401),
            ("/site/oauth2/access_token", "oauth", 405),
            ("/2.0/repositories/acme/r/permissions-config/other", "unknown", 404),
            ("/nope", "unknown", 404),
        ];
        for (path, class, status) in cases {
            let before = app.stats.lock().unwrap().by_class.get(class).copied().unwrap_or(0);
            let request = Request::builder().uri(path).body(Body::empty()).unwrap();
            let response = service(app.clone()).oneshot(request).await.unwrap();
            assert_eq!(response.status().as_u16(), status, "{path}");
            let after = app.stats.lock().unwrap().by_class.get(class).copied().unwrap_or(0);
            assert_eq!(after, before + 1, "{path} counted as {class}");
        }
    }
}
