//! `GET /v1/ratelimit/bans` and `DELETE /v1/ratelimit/bans/{key}` (admin): lockout bans.

use axum::extract::{Path, State};
use axum::routing::{delete, get};
use axum::{Json, Router};
use serde::Serialize;

use super::AppState;
use super::error::ApiError;
use super::extract::Admin;
use crate::ratelimit::{Ban, BanError};

pub(super) fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/ratelimit/bans", get(list))
        .route("/v1/ratelimit/bans/{key}", delete(lift))
}

#[derive(Debug, Serialize)]
struct BanList {
    bans: Vec<Ban>,
}

/// `GET /v1/ratelimit/bans`: active bans and those still remembered, newest first.
async fn list(State(state): State<AppState>, _admin: Admin) -> Json<BanList> {
    Json(BanList {
        bans: state.services.lockout.list(),
    })
}

/// `DELETE /v1/ratelimit/bans/{key}`: lifts a ban now (written with its audit record
/// before the answer). Bans are placed on client addresses only, so a key is `ip:…`;
/// any other is malformed (400), like one whose address does not parse.
async fn lift(
    State(state): State<AppState>,
    admin: Admin,
    Path(key): Path<String>,
) -> Result<Json<Ban>, ApiError> {
    if !key.starts_with("ip:") {
        return Err(BanError::BadKey(key).into());
    }
    Ok(Json(
        state.services.lockout.lift(&key, &admin.origin).await?,
    ))
}
