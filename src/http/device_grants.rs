//! `POST /v1/device_authorization` (RFC 8628 section 3.1, for devices) and the
//! operator's side of a device grant: `POST /v1/device_grants/lookup`, `/approve` and
//! `/deny` (admin). The device's poll is a grant of `/v1/token` (`oauth.rs`).

use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde::Deserialize;

use super::AppState;
use super::error::ApiError;
use super::extract::{Admin, ApiForm, ApiJson, RequestOrigin};
use crate::device_grants::{DeviceGrantError, GrantView, NewGrant};

/// This resource's routes.
pub(super) fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/device_authorization", post(start))
        .route("/v1/device_grants/lookup", post(lookup))
        .route("/v1/device_grants/approve", post(approve))
        .route("/v1/device_grants/deny", post(deny))
}

/// RFC 8628 section 3.1. Unknown parameters are ignored (RFC 6749 section 3.2); `scope`
/// is accepted and not used: gatehouse issues no scopes.
#[derive(Debug, Deserialize)]
pub(crate) struct DeviceAuthorizationRequest {
    client_id: Option<String>,
    #[serde(default)]
    #[allow(dead_code)]
    scope: Option<String>,
}

/// `POST /v1/device_authorization`: a device asks to be let in.
async fn start(
    State(state): State<AppState>,
    RequestOrigin(origin): RequestOrigin,
    ApiForm(request): ApiForm<DeviceAuthorizationRequest>,
) -> Response {
    let grant = state
        .services
        .device_grants
        .start(request.client_id.as_deref(), &origin)
        .await;
    match grant {
        Ok(grant) => Json::<NewGrant>(grant).into_response(),
        Err(DeviceGrantError::RateLimited(limited)) => {
            super::limits::too_many(&limited.decision, &limited.policy)
        }
        Err(err) => ApiError::from(err).into_response(),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct UserCodeRequest {
    user_code: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ApproveRequest {
    user_code: String,
    /// The new device's name; the client id (or the grant's id) when absent.
    name: Option<String>,
}

/// `POST /v1/device_grants/lookup`: what is waiting behind a user code.
async fn lookup(
    State(state): State<AppState>,
    admin: Admin,
    ApiJson(request): ApiJson<UserCodeRequest>,
) -> Result<Json<GrantView>, ApiError> {
    Ok(Json(
        state
            .services
            .device_grants
            .lookup(&request.user_code, &admin.origin)
            .await?,
    ))
}

/// `POST /v1/device_grants/approve`: creates the device; its tokens go to its next poll.
async fn approve(
    State(state): State<AppState>,
    admin: Admin,
    ApiJson(request): ApiJson<ApproveRequest>,
) -> Result<Json<GrantView>, ApiError> {
    Ok(Json(
        state
            .services
            .device_grants
            .approve(&request.user_code, request.name.as_deref(), &admin.origin)
            .await?,
    ))
}

/// `POST /v1/device_grants/deny`: the device's next poll gets `access_denied`.
async fn deny(
    State(state): State<AppState>,
    admin: Admin,
    ApiJson(request): ApiJson<UserCodeRequest>,
) -> Result<Json<GrantView>, ApiError> {
    Ok(Json(
        state
            .services
            .device_grants
            .deny(&request.user_code, &admin.origin)
            .await?,
    ))
}
