//! Liveness and readiness.
//!
//! `/healthz` answers while the process can answer at all. `/readyz` answers 200 only
//! when the data file is readable, its writer is healthy and the server is not draining
//! for shutdown, so a load balancer stops sending traffic before the process stops.

use axum::Json;
use axum::extract::State;
use serde::Serialize;

use super::AppState;
use super::error::ApiError;

#[derive(Debug, Serialize)]
pub struct Health {
    status: &'static str,
}

pub async fn healthz() -> Json<Health> {
    Json(Health { status: "ok" })
}

#[derive(Debug, Serialize)]
pub struct Ready {
    status: &'static str,
    tls: &'static str,
    format_version: u32,
}

pub async fn readyz(State(state): State<AppState>) -> Result<Json<Ready>, ApiError> {
    if state.draining() {
        return Err(ApiError::unavailable("the server is shutting down"));
    }
    if !state.store.is_healthy() {
        return Err(ApiError::unavailable("the data file cannot be written"));
    }
    // A real read: proves the file is still readable, not just that it was at start.
    let store = state.store.clone();
    let readable = tokio::task::spawn_blocking(move || store.read(|tx| tx.table_counts()))
        .await
        .map_err(|e| ApiError::internal(&e))?;
    if let Err(err) = readable {
        tracing::error!(error = %err, "readiness check: data file not readable");
        return Err(ApiError::unavailable("the data file cannot be read"));
    }
    Ok(Json(Ready {
        status: "ready",
        tls: state.tls_mode.as_str(),
        format_version: state.store.info().format_version,
    }))
}
