//! What handlers answer, rendered in one place: the 2.0 JSON error envelope
//! ([`ApiError`]), JSON bodies with `fields=` applied ([`Answer`]), `204`, and
//! the HTML 404 Bitbucket serves on unknown paths.

use axum::body::Body;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};

use super::paging::{FieldSpec, apply_fields};

/// A handler's result.
pub type Reply = Result<Answer, ApiError>;

/// A Bitbucket error, rendered as the 2.0 JSON envelope.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: u16,
    pub message: String,
    pub detail: Option<String>,
    pub fields: Option<Value>,
    pub data: Option<Value>,
}

impl ApiError {
    pub fn new(status: u16, message: &str) -> ApiError {
        ApiError {
            status,
            message: message.to_string(),
            detail: None,
            fields: None,
            data: None,
        }
    }
    pub fn bad_request(message: &str) -> ApiError {
        ApiError::new(400, message)
    }
    pub fn not_found(message: &str) -> ApiError {
        ApiError::new(404, message)
    }
    pub fn forbidden(message: &str) -> ApiError {
        ApiError::new(403, message)
    }
    /// `{"type": "error", "error": {"message", "detail"?, "fields"?, "data"?}}`.
    pub fn body(&self) -> Value {
        let mut e = Map::new();
        e.insert("message".into(), json!(self.message));
        if let Some(d) = &self.detail {
            e.insert("detail".into(), json!(d));
        }
        if let Some(f) = &self.fields {
            e.insert("fields".into(), f.clone());
        }
        if let Some(d) = &self.data {
            e.insert("data".into(), d.clone());
        }
        json!({"type": "error", "error": Value::Object(e)})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        json_response(self.status, &self.body())
    }
}

/// A successful answer. Built through [`super::pipeline::Ctx::json`] so the
/// request's `fields=` is always applied.
#[derive(Debug)]
pub enum Answer {
    /// 200 with `value` after `fields`; `hidden` paths are left out unless
    /// `fields` asks for them by name (`+values.user.email`).
    Json {
        value: Value,
        fields: FieldSpec,
        hidden: Vec<&'static str>,
    },
    /// 204, no body.
    NoContent,
}

impl Answer {
    /// Leaves these paths out unless `fields=` names them.
    pub fn hiding(self, paths: &[&'static str]) -> Answer {
        match self {
            Answer::Json { value, fields, .. } => Answer::Json {
                value,
                fields,
                hidden: paths.to_vec(),
            },
            Answer::NoContent => Answer::NoContent,
        }
    }
}

impl IntoResponse for Answer {
    fn into_response(self) -> Response {
        match self {
            Answer::Json { value, fields, hidden } => json_response(200, &apply_fields(value, &fields, &hidden)),
            Answer::NoContent => {
                let mut r = Response::new(Body::empty());
                *r.status_mut() = StatusCode::NO_CONTENT;
                r
            }
        }
    }
}

/// `application/json; charset=utf-8` with this status.
pub fn json_response(status: u16, v: &Value) -> Response {
    let mut r = Response::new(Body::from(serde_json::to_vec(v).unwrap_or_default()));
    *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=utf-8"),
    );
    r
}

/// Bitbucket answers unknown paths with an HTML page, not the JSON envelope.
pub fn html_404() -> Response {
    let mut r = Response::new(Body::from(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><title>Bitbucket</title></head>\
         <body><h1>Resource not found</h1><p>You may not have access to this page, \
         or it doesn't exist.</p></body></html>\n",
    ));
    *r.status_mut() = StatusCode::NOT_FOUND;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    r
}
