//! `GET /v1/devices`, `GET /v1/devices/{id}` and `DELETE /v1/devices/{id}` (admin).

use axum::Json;
use axum::extract::{Path, State};
use http::StatusCode;
use serde::Serialize;

use super::AppState;
use super::error::ApiError;
use super::extract::Admin;
use crate::devices::{DeviceError, DeviceView};
use crate::ids::DeviceId;

fn device_error(err: DeviceError) -> ApiError {
    match err {
        DeviceError::NotFound(_) => {
            ApiError::new(StatusCode::NOT_FOUND, "not_found", err.to_string())
        }
        DeviceError::Store(e) => ApiError::internal(&e),
    }
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

#[derive(Debug, Serialize)]
pub struct DeviceList {
    devices: Vec<DeviceView>,
    next: Option<String>,
}

pub async fn list(
    State(state): State<AppState>,
    _admin: Admin,
) -> Result<Json<DeviceList>, ApiError> {
    let devices = state.services.devices.list().map_err(device_error)?;
    Ok(Json(DeviceList {
        devices,
        next: None,
    }))
}

pub async fn show(
    State(state): State<AppState>,
    _admin: Admin,
    Path(id): Path<String>,
) -> Result<Json<DeviceView>, ApiError> {
    let id = device_id(&id)?;
    state
        .services
        .devices
        .get(&id)
        .map_err(device_error)?
        .map(Json)
        .ok_or_else(|| device_error(DeviceError::NotFound(id.to_string())))
}

/// Revokes the device and every token it holds, durably, before answering.
pub async fn revoke(
    State(state): State<AppState>,
    _admin: Admin,
    Path(id): Path<String>,
) -> Result<Json<DeviceView>, ApiError> {
    let id = device_id(&id)?;
    Ok(Json(
        state
            .services
            .devices
            .revoke(&id)
            .await
            .map_err(device_error)?,
    ))
}
