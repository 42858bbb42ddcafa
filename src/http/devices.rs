//! `GET /v1/devices` (filtered, paged), `GET`, `PATCH` and `DELETE /v1/devices/{id}`
//! (admin).

use axum::Json;
use axum::Router;
use axum::extract::{Path, Query, State};
use axum::routing::get;
use http::StatusCode;
use serde::Deserialize;

use super::AppState;
use super::error::ApiError;
use super::extract::{Admin, ApiJson};
use crate::devices::{DeviceError, DeviceFilter, DevicePage, DeviceView};
use crate::ids::DeviceId;

/// This resource's routes.
pub(super) fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/devices", get(list))
        .route("/v1/devices/{id}", get(show).patch(rename).delete(revoke))
}

fn device_id(text: &str) -> Result<DeviceId, ApiError> {
    DeviceId::parse(text).ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            "no such device (device ids read dev_ and 32 hex characters)",
        )
    })
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ListQuery {
    status: Option<String>,
    name: Option<String>,
    after: Option<String>,
    limit: Option<usize>,
}

/// `GET /v1/devices?status=active|revoked&name=TEXT&after=ID&limit=N`, oldest first.
/// A malformed `after` is a 400; one that names no device a 404.
async fn list(
    State(state): State<AppState>,
    _admin: Admin,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<DevicePage>, ApiError> {
    let Query(query) = query
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", e.body_text()))?;
    let after = match query.after.as_deref() {
        Some(text) => Some(DeviceId::parse(text).ok_or_else(|| {
            ApiError::from(DeviceError::BadFilter(
                "`after` must be a device id from a previous page's `next`".into(),
            ))
        })?),
        None => None,
    };
    // A cursor is the id of a device a previous page listed, and devices are never
    // deleted: one that names no device is an unknown resource (404), not a malformed
    // request.
    if let Some(id) = &after
        && state.services.devices.get(id)?.is_none()
    {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            "the `after` cursor names no device",
        ));
    }
    let filter = DeviceFilter {
        status: query.status,
        name: query.name,
        after,
        limit: query.limit,
    };
    Ok(Json(state.services.devices.page(&filter)?))
}

async fn show(
    State(state): State<AppState>,
    _admin: Admin,
    Path(id): Path<String>,
) -> Result<Json<DeviceView>, ApiError> {
    let id = device_id(&id)?;
    state
        .services
        .devices
        .get(&id)?
        .map(Json)
        .ok_or_else(|| DeviceError::NotFound(id.to_string()).into())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Rename {
    name: String,
}

/// `PATCH /v1/devices/{id}` with `{"name": …}`.
async fn rename(
    State(state): State<AppState>,
    admin: Admin,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<Rename>,
) -> Result<Json<DeviceView>, ApiError> {
    let id = device_id(&id)?;
    Ok(Json(
        state
            .services
            .devices
            .rename(&id, &body.name, &admin.origin)
            .await?,
    ))
}

/// Revokes the device and every token it holds, durably, before answering.
async fn revoke(
    State(state): State<AppState>,
    admin: Admin,
    Path(id): Path<String>,
) -> Result<Json<DeviceView>, ApiError> {
    let id = device_id(&id)?;
    Ok(Json(
        state.services.devices.revoke(&id, &admin.origin).await?,
    ))
}
