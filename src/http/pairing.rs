//! `POST /v1/pairing/sessions` (admin) and `POST /v1/pair` (the app).

use std::time::Duration;

use axum::Json;
use axum::extract::State;
use http::StatusCode;
use serde::{Deserialize, Serialize};

use super::AppState;
use super::error::ApiError;
use super::extract::{Admin, ApiJson, Peer};
use crate::clock::format_rfc3339;
use crate::ids::SessionId;
use crate::pairing::{DeviceInfo, PairingError};
use crate::tokens::TokenPair;

fn pairing_error(err: PairingError) -> ApiError {
    match err {
        PairingError::Rejected => ApiError::new(
            StatusCode::UNAUTHORIZED,
            "pairing_failed",
            "pairing failed: the session does not exist, has expired or was already used, \
             or the secret is wrong",
        ),
        PairingError::BadTtl(m) => ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            format!("ttl_seconds {m}"),
        ),
        PairingError::BadName(m) | PairingError::BadDevice(m) => {
            ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", m)
        }
        other => ApiError::internal(&other),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateSession {
    name: Option<String>,
    ttl_seconds: Option<u64>,
}

#[derive(Debug, Serialize)]
pub struct CreatedSession {
    session_id: SessionId,
    pairing_uri: String,
    secret: String,
    expires_at: String,
}

/// Opens a pairing session. The secret is in this answer and nowhere else.
pub async fn create_session(
    State(state): State<AppState>,
    admin: Admin,
    ApiJson(request): ApiJson<CreateSession>,
) -> Result<(StatusCode, Json<CreatedSession>), ApiError> {
    let session = state
        .services
        .pairing
        .create(
            request.name.as_deref(),
            request.ttl_seconds.map(Duration::from_secs),
            &admin.token_id,
        )
        .await
        .map_err(pairing_error)?;
    Ok((
        StatusCode::CREATED,
        Json(CreatedSession {
            session_id: session.session_id,
            pairing_uri: session.pairing_uri,
            secret: session.secret,
            expires_at: format_rfc3339(session.expires_at_ms),
        }),
    ))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PairRequest {
    session_id: String,
    secret: String,
    device: DeviceInfo,
}

/// Claims a pairing session: the device and its first token pair.
pub async fn pair(
    State(state): State<AppState>,
    Peer(peer): Peer,
    ApiJson(request): ApiJson<PairRequest>,
) -> Result<Json<TokenPair>, ApiError> {
    let pair = state
        .services
        .pairing
        .pair(
            &request.session_id,
            &request.secret,
            &request.device,
            &peer.ip().to_string(),
        )
        .await
        .map_err(pairing_error)?;
    Ok(Json(pair))
}
