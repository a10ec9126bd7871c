//! The read-only data API: the store's inventory over HTTP, for dashboards
//! and access reviews, on the operator's port beside the probes and metrics.
//!
//! ```text
//! GET /api/v1/namespaces/{ns}/connectors/{name}/resources[?type=repository]
//! GET /api/v1/namespaces/{ns}/connectors/{name}/grants          (JSON)
//! GET /api/v1/namespaces/{ns}/connectors/{name}/grants.csv      (CSV, for access reviews)
//! GET /api/v1/namespaces/{ns}/connectors/{name}/who-can?repository=ws/slug
//! GET /api/v1/namespaces/{ns}/connectors/{name}/access-of?user=nickname
//! GET /api/v1/namespaces/{ns}/connectors/{name}/runs
//! ```
//!
//! Every request needs `Authorization: Bearer <Kubernetes token>`. The token
//! is checked with a TokenReview, and the caller must be allowed `get` on the
//! `bitbucketconnectors/data` subresource of that connector (a
//! SubjectAccessReview). `data` is not served by the API server; it exists so
//! that RBAC can grant reading the inventory separately from reading the
//! resource, e.g.:
//!
//! Only the replica holding the leader-election lease serves data (others
//! answer 503): each replica keeps its own store and only the leader's is
//! current.
//!
//! ```yaml
//! rules:
//!   - apiGroups: [connectors.dev]
//!     resources: [bitbucketconnectors/data]
//!     verbs: [get]
//! ```

use std::collections::HashMap;
use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::authorization::v1::{ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec};
use kube::api::{Api, PostParams};
use serde::Deserialize;
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::access::{self, AccessError};
use crate::crd::GROUP;
use crate::model::{ResourceType, SyncKind};
use crate::store::Store;

/// What the data API needs: the Kubernetes client for reviews, the store,
/// and whether this replica runs the sync loops.
#[derive(Clone)]
pub struct ApiState {
    pub kube: kube::Client,
    pub store: Arc<Store>,
    /// True while this replica holds the lease (always, without leader
    /// election). A standby's store is not kept current, so it answers 503
    /// rather than stale or empty data.
    pub leading: Arc<std::sync::atomic::AtomicBool>,
    pub decisions: Arc<DecisionCache>,
}

pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/api/v1/namespaces/{ns}/connectors/{name}/resources", get(resources))
        .route("/api/v1/namespaces/{ns}/connectors/{name}/grants", get(grants))
        .route("/api/v1/namespaces/{ns}/connectors/{name}/grants.csv", get(grants_csv))
        .route("/api/v1/namespaces/{ns}/connectors/{name}/who-can", get(who_can))
        .route("/api/v1/namespaces/{ns}/connectors/{name}/access-of", get(access_of))
        .route("/api/v1/namespaces/{ns}/connectors/{name}/runs", get(runs))
        .with_state(state)
}

/// An API failure as a Kubernetes-style JSON error; never carries a token.
#[derive(Debug)]
struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.0, axum::Json(json!({"code": self.0.as_u16(), "message": self.1}))).into_response();
        if self.0 == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
        }
        response
    }
}

impl From<AccessError> for ApiError {
    fn from(err: AccessError) -> Self {
        match err {
            AccessError::Store(e) => ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
            AccessError::AmbiguousUser { .. } => ApiError(StatusCode::BAD_REQUEST, err.to_string()),
            other => ApiError(StatusCode::NOT_FOUND, other.to_string()),
        }
    }
}

/// Recent authorization decisions, keyed by a hash of the token and the
/// connector, so a dashboard polling the API does not cost two API-server
/// reviews per request, and junk tokens cannot make it review them as fast as
/// they arrive. Ten seconds: an RBAC change or a revoked token applies within
/// that. The token itself is never stored.
#[derive(Default)]
pub struct DecisionCache {
    entries: std::sync::Mutex<HashMap<DecisionKey, (std::time::Instant, Decision)>>,
}

/// SHA-256 of the token, namespace, connector name.
type DecisionKey = (Vec<u8>, String, String);
/// Allowed, or the refusal to repeat.
type Decision = Result<(), (StatusCode, String)>;

const DECISION_TTL: std::time::Duration = std::time::Duration::from_secs(10);

impl DecisionCache {
    fn get(&self, key: &DecisionKey) -> Option<Result<(), ApiError>> {
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let (at, decision) = entries.get(key)?;
        (at.elapsed() < DECISION_TTL).then(|| decision.clone().map_err(|(code, message)| ApiError(code, message)))
    }

    fn put(&self, key: DecisionKey, decision: &Result<(), ApiError>) {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if entries.len() >= 1024 {
            entries.retain(|_, (at, _)| at.elapsed() < DECISION_TTL);
            if entries.len() >= 1024 {
                entries.clear();
            }
        }
        let stored = match decision {
            Ok(()) => Ok(()),
            Err(ApiError(code, message)) => Err((*code, message.clone())),
        };
        entries.insert(key, (std::time::Instant::now(), stored));
    }
}

/// TokenReview, then SubjectAccessReview for `get bitbucketconnectors/data`,
/// remembered for a few seconds (see [`DecisionCache`]).
async fn authorize(state: &ApiState, headers: &HeaderMap, ns: &str, name: &str) -> Result<(), ApiError> {
    let token = bearer(headers)?;
    let key = (
        Sha256::digest(token.as_bytes()).to_vec(),
        ns.to_owned(),
        name.to_owned(),
    );
    if let Some(decision) = state.decisions.get(&key) {
        return decision;
    }
    let decision = review(state, token, ns, name).await;
    // Review failures (the API server unavailable) are not remembered.
    if decision
        .as_ref()
        .err()
        .is_none_or(|e| e.0 != StatusCode::SERVICE_UNAVAILABLE)
    {
        state.decisions.put(key, &decision);
    }
    decision
}

fn bearer(headers: &HeaderMap) -> Result<&str, ApiError> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| ApiError(StatusCode::UNAUTHORIZED, "a bearer token is required".into()))
}

async fn review(state: &ApiState, token: &str, ns: &str, name: &str) -> Result<(), ApiError> {
    let review = TokenReview {
        spec: TokenReviewSpec {
            token: Some(token.to_owned()),
            ..Default::default()
        },
        ..Default::default()
    };
    let reviewed = Api::<TokenReview>::all(state.kube.clone())
        .create(&PostParams::default(), &review)
        .await
        .map_err(|e| ApiError(StatusCode::SERVICE_UNAVAILABLE, format!("token review failed: {e}")))?;
    let status = reviewed.status.unwrap_or_default();
    let user = match (status.authenticated, status.user) {
        (Some(true), Some(user)) => user,
        _ => return Err(ApiError(StatusCode::UNAUTHORIZED, "the token was not accepted".into())),
    };
    let access = SubjectAccessReview {
        spec: SubjectAccessReviewSpec {
            user: user.username.clone(),
            groups: user.groups.clone(),
            uid: user.uid.clone(),
            extra: user.extra.clone(),
            resource_attributes: Some(ResourceAttributes {
                namespace: Some(ns.to_owned()),
                verb: Some("get".into()),
                group: Some(GROUP.into()),
                resource: Some("bitbucketconnectors".into()),
                subresource: Some("data".into()),
                name: Some(name.to_owned()),
                ..Default::default()
            }),
            ..Default::default()
        },
        ..Default::default()
    };
    let decided = Api::<SubjectAccessReview>::all(state.kube.clone())
        .create(&PostParams::default(), &access)
        .await
        .map_err(|e| ApiError(StatusCode::SERVICE_UNAVAILABLE, format!("access review failed: {e}")))?;
    if decided.status.is_some_and(|s| s.allowed) {
        Ok(())
    } else {
        let who = user.username.unwrap_or_else(|| "the caller".into());
        Err(ApiError(
            StatusCode::FORBIDDEN,
            format!("{who} may not get bitbucketconnectors/data of {ns}/{name}"),
        ))
    }
}

/// Authorizes, then runs a store read off the async runtime.
async fn read<T, F>(state: ApiState, headers: HeaderMap, ns: String, name: String, f: F) -> Result<T, ApiError>
where
    T: Send + 'static,
    F: FnOnce(&Store, &str) -> Result<T, ApiError> + Send + 'static,
{
    authorize(&state, &headers, &ns, &name).await?;
    if !state.leading.load(std::sync::atomic::Ordering::Relaxed) {
        return Err(ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            "this replica is a standby; the data API is served by the lease holder".into(),
        ));
    }
    let connector = format!("{ns}/{name}");
    tokio::task::spawn_blocking(move || {
        if !state.store.connectors().map_err(internal)?.contains(&connector) {
            return Err(ApiError(
                StatusCode::NOT_FOUND,
                format!("no synced data for connector {connector}"),
            ));
        }
        f(&state.store, &connector)
    })
    .await
    .map_err(internal)?
}

fn internal(err: impl std::fmt::Display) -> ApiError {
    ApiError(StatusCode::INTERNAL_SERVER_ERROR, err.to_string())
}

#[derive(Deserialize)]
struct TypeQuery {
    #[serde(rename = "type")]
    resource_type: Option<String>,
}

async fn resources(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path((ns, name)): Path<(String, String)>,
    Query(query): Query<TypeQuery>,
) -> Result<Response, ApiError> {
    let resource_type = match query.resource_type.as_deref() {
        None => None,
        Some(t) => Some(ResourceType::parse(t).ok_or_else(|| {
            ApiError(
                StatusCode::BAD_REQUEST,
                format!("unknown type {t:?}: user, workspace, user_group, project or repository"),
            )
        })?),
    };
    let resources = read(state, headers, ns, name, move |store, c| {
        store.resources(c, resource_type).map_err(internal)
    })
    .await?;
    Ok(axum::Json(json!({ "items": resources })).into_response())
}

async fn grants(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path((ns, name)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let grants = read(state, headers, ns, name, |store, c| store.grants(c).map_err(internal)).await?;
    Ok(axum::Json(json!({ "items": grants })).into_response())
}

async fn grants_csv(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path((ns, name)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let csv = read(state, headers, ns, name, |store, c| {
        access_review_csv(store, c).map_err(internal)
    })
    .await?;
    Ok(([(header::CONTENT_TYPE, "text/csv; charset=utf-8")], csv).into_response())
}

/// One row per grant with names resolved, for people reviewing access.
fn access_review_csv(store: &Store, connector: &str) -> Result<String, crate::store::StoreError> {
    let mut names = HashMap::new();
    let mut entitlements = HashMap::new();
    let mut grants = Vec::new();
    for kind in SyncKind::ALL {
        let batch = store.batch(connector, kind)?;
        for r in batch.resources {
            names.insert(r.id.clone(), r.display_name.clone());
        }
        for e in batch.entitlements {
            entitlements.insert(e.id.clone(), e);
        }
        grants.extend(batch.grants);
    }
    let mut out = String::from(
        "resource_type,resource_id,resource_name,entitlement,principal_type,principal_id,principal_name,unknown_principal\n",
    );
    for g in grants {
        let Some(e) = entitlements.get(&g.entitlement_id) else {
            continue;
        };
        let row = [
            e.resource_type.as_str(),
            &e.resource_id,
            names.get(&e.resource_id).map(String::as_str).unwrap_or_default(),
            &e.slug,
            g.principal_type.as_str(),
            &g.principal_id,
            names.get(&g.principal_id).map(String::as_str).unwrap_or_default(),
            if g.unknown_principal { "true" } else { "false" },
        ];
        out.push_str(&row.iter().map(|f| csv_field(f)).collect::<Vec<_>>().join(","));
        out.push('\n');
    }
    Ok(out)
}

/// RFC 4180 quoting; a leading `=`, `+`, `-`, `@`, tab or carriage return is
/// prefixed with `'` so a spreadsheet never evaluates a name as a formula.
fn csv_field(value: &str) -> String {
    let value = if value.starts_with(['=', '+', '-', '@', '\t', '\r']) {
        format!("'{value}")
    } else {
        value.to_owned()
    };
    if value.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", value.replace('"', "\"\""))
    } else {
        value
    }
}

#[derive(Deserialize)]
struct RepositoryQuery {
    repository: String,
}

async fn who_can(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path((ns, name)): Path<(String, String)>,
    Query(query): Query<RepositoryQuery>,
) -> Result<Response, ApiError> {
    let entries = read(state, headers, ns, name, move |store, c| {
        Ok(access::who_can(store, c, &query.repository)?)
    })
    .await?;
    Ok(axum::Json(json!({ "items": entries })).into_response())
}

#[derive(Deserialize)]
struct UserQuery {
    user: String,
}

async fn access_of(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path((ns, name)): Path<(String, String)>,
    Query(query): Query<UserQuery>,
) -> Result<Response, ApiError> {
    let access = read(state, headers, ns, name, move |store, c| {
        Ok(access::access_of(store, c, &query.user)?)
    })
    .await?;
    Ok(axum::Json(access).into_response())
}

async fn runs(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path((ns, name)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let runs = read(state, headers, ns, name, |store, c| store.runs(c, 50).map_err(internal)).await?;
    Ok(axum::Json(json!({ "items": runs })).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_fields_are_quoted_and_formula_safe() {
        assert_eq!(csv_field("plain"), "plain");
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(csv_field("=cmd()"), "'=cmd()");
        assert_eq!(csv_field("-1,2"), "\"'-1,2\"");
        assert_eq!(csv_field("\tx"), "'\tx");
    }
}
