//! `GET /v1/keys`, `POST /v1/keys/rotate` and `POST /v1/keys/{kid}/revoke` (admin).

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::routing::{get, post};
use http::StatusCode;
use serde::{Deserialize, Serialize};

use super::AppState;
use super::error::ApiError;
use super::extract::Admin;
use super::json::StrictObject;
use crate::keys::{KeyInfo, Rotation, RotationReport};

/// This resource's routes.
pub(super) fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/keys", get(list))
        .route("/v1/keys/rotate", post(rotate))
        .route("/v1/keys/{kid}/revoke", post(revoke))
}

#[derive(Debug, Serialize)]
pub(crate) struct KeyList {
    keys: Vec<KeyInfo>,
}

async fn list(State(state): State<AppState>, _admin: Admin) -> Json<KeyList> {
    Json(KeyList {
        keys: state.services.keys.list(),
    })
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RotateRequest {
    /// Rotate even if the next key was published only moments ago.
    #[serde(default)]
    now: bool,
}

/// The body is optional: none (or `{}`) is an ordinary rotation, `{"now": true}` an
/// emergency one.
async fn rotate(
    State(state): State<AppState>,
    admin: Admin,
    body: Bytes,
) -> Result<Json<RotationReport>, ApiError> {
    let request: RotateRequest = if body.is_empty() {
        RotateRequest::default()
    } else {
        // An object only (serde would also fill the struct from a JSON array), with no
        // member named twice.
        StrictObject::parse(&body)
            .and_then(StrictObject::into_type)
            .map_err(|e| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    format!("the body must be empty or {{\"now\": true|false}}: {e}"),
                )
            })?
    };
    let mode = if request.now {
        Rotation::Now
    } else {
        Rotation::Scheduled
    };
    Ok(Json(state.services.keys.rotate(mode, &admin.origin).await?))
}

async fn revoke(
    State(state): State<AppState>,
    admin: Admin,
    Path(kid): Path<String>,
) -> Result<Json<KeyInfo>, ApiError> {
    Ok(Json(state.services.keys.revoke(&kid, &admin.origin).await?))
}
