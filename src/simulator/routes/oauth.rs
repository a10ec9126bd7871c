//! `POST /site/oauth2/access_token`: client credentials and refresh tokens
//! (see [`Auth::token_endpoint`](crate::simulator::auth::Auth::token_endpoint)).
//! No API credentials and no rate limit; any other method is 405.

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, header};
use axum::response::{IntoResponse, Response};

use crate::simulator::app::App;
use crate::simulator::pipeline::token_endpoint;
use crate::simulator::reply::{ApiError, json_response};

pub(super) fn router(app: &Arc<App>) -> Router<Arc<App>> {
    Router::new().route("/site/oauth2/access_token", token_endpoint(app, "oauth", token))
}

async fn token(State(app): State<Arc<App>>, method: Method, headers: HeaderMap, body: Bytes) -> Response {
    if method != Method::POST {
        return ApiError::new(405, "Method not allowed").into_response();
    }
    let authorization = headers.get(header::AUTHORIZATION).and_then(|h| h.to_str().ok());
    let form: Vec<(String, String)> = url::form_urlencoded::parse(&body).into_owned().collect();
    let (status, v) = app.auth.token_endpoint(authorization, &form);
    json_response(status, &v)
}
