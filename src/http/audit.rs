//! `GET /v1/audit` (filtered, paged), `GET /v1/ratelimit/bans` and
//! `DELETE /v1/ratelimit/bans/{key}` (admin).

use axum::Json;
use axum::extract::{Path, Query, State};
use http::StatusCode;
use serde::{Deserialize, Serialize};

use super::AppState;
use super::error::ApiError;
use super::extract::Admin;
use crate::audit::{self, EventPage};
use crate::ratelimit::Ban;

/// Events per page when `limit` is not given.
const DEFAULT_PAGE: usize = 100;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct AuditQuery {
    after: Option<u64>,
    #[serde(rename = "type")]
    kind: Option<String>,
    device: Option<String>,
    limit: Option<usize>,
}

/// `GET /v1/audit?after=SEQ&type=T&device=ID&limit=N`, oldest first. `type` is an
/// event type (`device.revoked`) or a family (`device.*`).
pub(crate) async fn list(
    State(state): State<AppState>,
    _admin: Admin,
    query: Result<Query<AuditQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<EventPage>, ApiError> {
    let Query(query) = query
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", e.body_text()))?;
    let limit = query.limit.unwrap_or(DEFAULT_PAGE);
    if !(1..=audit::MAX_PAGE).contains(&limit) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            format!("`limit` must be between 1 and {}", audit::MAX_PAGE),
        ));
    }
    let bad = |what: &str| ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", what);
    if let Some(kind) = &query.kind
        && (kind.is_empty()
            || kind.len() > 64
            || !kind
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b"._*".contains(&b)))
    {
        return Err(bad(
            "`type` is an event type such as device.revoked, or a family such as device.*",
        ));
    }
    if let Some(device) = &query.device
        && crate::ids::DeviceId::parse(device).is_none()
    {
        return Err(bad(
            "`device` must be a device id (dev_ and 32 hex characters)",
        ));
    }
    let page = state.services.audit.query(&audit::Query {
        after: query.after.unwrap_or(0),
        kind: query.kind,
        device: query.device,
        limit,
    })?;
    Ok(Json(page))
}

#[derive(Debug, Serialize)]
pub(crate) struct BanList {
    bans: Vec<Ban>,
}

/// `GET /v1/ratelimit/bans`: active bans and those still remembered, newest first.
pub(crate) async fn bans(State(state): State<AppState>, _admin: Admin) -> Json<BanList> {
    Json(BanList {
        bans: state.services.lockout.list(),
    })
}

/// `DELETE /v1/ratelimit/bans/{key}`: lifts a ban now (written with its audit record
/// before the answer).
pub(crate) async fn lift(
    State(state): State<AppState>,
    admin: Admin,
    Path(key): Path<String>,
) -> Result<Json<Ban>, ApiError> {
    Ok(Json(
        state.services.lockout.lift(&key, &admin.origin).await?,
    ))
}
