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
