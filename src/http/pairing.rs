//! `POST /v1/pairing/sessions` and the session's QR code (admin), and `POST /v1/pair`
//! (the app).

use axum::Router;
use axum::routing::{get, post};
use std::time::Duration;

use axum::Json;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use http::{StatusCode, header};
use serde::{Deserialize, Serialize};

use super::AppState;
use super::error::ApiError;
use super::extract::{Admin, ApiJson, DpopBinding, RequestOrigin, with_dpop_nonce};
use crate::clock::format_rfc3339;
use crate::ids::{DeviceId, SessionId};
use crate::pairing::{DeviceInfo, PairingError};
use crate::tokens::TokenPair;

/// This resource's routes.
pub(super) fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/pairing/sessions", post(create_session))
        .route("/v1/pairing/sessions/{id}/qr.svg", get(qr_svg))
        .route("/v1/pairing/sessions/{id}/qr.png", get(qr_png))
        .route("/v1/pair", post(pair))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct CreateSession {
    name: Option<String>,
    ttl_seconds: Option<u64>,
    /// Pair this existing device again (see `PairingSessions::create`).
    device_id: Option<String>,
}

#[derive(Debug, Serialize)]
pub(crate) struct CreatedSession {
    session_id: SessionId,
    pairing_uri: String,
    secret: String,
    expires_at: String,
}

/// Opens a pairing session. The secret is in this answer and nowhere else.
async fn create_session(
    State(state): State<AppState>,
    admin: Admin,
    ApiJson(request): ApiJson<CreateSession>,
) -> Result<(StatusCode, Json<CreatedSession>), ApiError> {
    let again = match request.device_id {
        None => None,
        // A malformed id is answered like an unknown device, as on /v1/devices/{id}.
        Some(id) => Some(DeviceId::parse(&id).ok_or(PairingError::UnknownDevice(id))?),
    };
    let session = state
        .services
        .pairing
        .create(
            request.name.as_deref(),
            request.ttl_seconds.map(Duration::from_secs),
            again,
            &admin.origin,
        )
        .await?;
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
pub(crate) struct PairRequest {
    session_id: String,
    secret: String,
    device: DeviceInfo,
}

/// Claims a pairing session: the device and its first token pair.
async fn pair(
    State(state): State<AppState>,
    RequestOrigin(origin): RequestOrigin,
    DpopBinding(binding): DpopBinding,
    ApiJson(request): ApiJson<PairRequest>,
) -> Response {
    let paired = state
        .services
        .pairing
        .pair(
            &request.session_id,
            &request.secret,
            &request.device,
            binding,
            &origin,
        )
        .await;
    match paired {
        Ok(pair) => with_dpop_nonce(&state, Json::<TokenPair>(pair).into_response()),
        Err(PairingError::RateLimited(limited)) => {
            super::limits::too_many(&limited.decision, &limited.policy)
        }
        Err(err) => ApiError::from(err).into_response(),
    }
}

/// Which picture of the pairing URI to render.
#[derive(Debug, Clone, Copy)]
pub(crate) enum QrFormat {
    Svg,
    Png,
}

fn session_id(text: &str) -> Result<SessionId, ApiError> {
    SessionId::parse(text).ok_or_else(|| PairingError::UnknownSession.into())
}

/// The QR code of an open session's pairing URI (admin): 404 for an unknown session,
/// 410 once it is used or expired, or when the secret is no longer held.
pub(crate) async fn qr(state: &AppState, id: &str, format: QrFormat) -> Result<Response, ApiError> {
    let id = session_id(id)?;
    let uri = state.services.pairing.open_uri(&id)?;
    let response = match format {
        QrFormat::Svg => {
            let svg = crate::qr::svg(&uri)?;
            ([(header::CONTENT_TYPE, "image/svg+xml")], svg).into_response()
        }
        QrFormat::Png => {
            let png = crate::qr::png(&uri)?;
            ([(header::CONTENT_TYPE, "image/png")], png).into_response()
        }
    };
    Ok(response)
}

async fn qr_svg(
    State(state): State<AppState>,
    _admin: Admin,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    qr(&state, &id, QrFormat::Svg).await
}

async fn qr_png(
    State(state): State<AppState>,
    _admin: Admin,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    qr(&state, &id, QrFormat::Png).await
}
