//! `GET /v1/status` (admin): what an operator should fix (see `crate::status`).

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;

use super::AppState;
use super::error::ApiError;
use super::extract::Admin;
use crate::config::TlsMode;
use crate::status::Warning;

/// This resource's routes.
pub(super) fn routes() -> Router<AppState> {
    Router::new().route("/v1/status", get(status))
}

#[derive(Debug, Serialize)]
struct Status {
    warnings: Vec<Warning>,
}

async fn status(State(state): State<AppState>, _admin: Admin) -> Result<Json<Status>, ApiError> {
    let warnings = crate::status::warnings(&state.services, state.tls_mode == TlsMode::Off)?;
    Ok(Json(Status { warnings }))
}
