//! Endpoints Bitbucket retired in CHANGE-2770: they still authenticate and
//! then answer 410 with the changelog link, which clients must recognise.

use std::sync::Arc;

use axum::Router;
use serde_json::json;

use crate::simulator::app::App;
use crate::simulator::pipeline::{GET, api};
use crate::simulator::reply::{ApiError, Reply};

pub(super) fn router(app: &Arc<App>) -> Router<Arc<App>> {
    Router::new()
        // Counted with the workspace endpoints it used to serve.
        .route("/2.0/workspaces", api(app, "workspace", GET, gone))
        .route("/2.0/user/permissions/workspaces", api(app, "retired", GET, gone))
        .route("/2.0/user/permissions/repositories", api(app, "retired", GET, gone))
        .route("/2.0/repositories", api(app, "retired", GET, gone))
}

async fn gone() -> Reply {
    let mut e = ApiError::new(410, "CHANGE-2770 - Functionality has been deprecated");
    e.detail = Some("Please read the changelog entry for more details.".into());
    e.data =
        Some(json!({"announcement_url": "https://developer.atlassian.com/cloud/bitbucket/changelog/#CHANGE-2770"}));
    Err(e)
}
