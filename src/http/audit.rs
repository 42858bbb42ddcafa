//! `GET /v1/audit` (admin): the audit log, filtered and paged.

use axum::extract::{Query, State};
use axum::routing::get;
use axum::{Json, Router};
use http::StatusCode;
use serde::Deserialize;

use super::AppState;
use super::error::ApiError;
use super::extract::Admin;
use crate::audit::{self, EventPage};

pub(super) fn routes() -> Router<AppState> {
    Router::new().route("/v1/audit", get(list))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AuditQuery {
    after: Option<u64>,
    #[serde(rename = "type")]
    kind: Option<String>,
    device: Option<String>,
    limit: Option<usize>,
}

/// `GET /v1/audit?after=SEQ&type=T&device=ID&limit=N`, oldest first. `type` is an
/// event type (`device.revoked`) or a family (`device.*`).
async fn list(
    State(state): State<AppState>,
    _admin: Admin,
    query: Result<Query<AuditQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<EventPage>, ApiError> {
    let Query(query) = query
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", e.body_text()))?;
    let query = audit::Query::parse(query.after, query.kind, query.device, query.limit)?;
    let page = state.services.audit.query(&query)?;
    Ok(Json(page))
}
