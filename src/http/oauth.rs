//! The OAuth endpoints: `/v1/token` (the refresh grant, and the device code grant of
//! RFC 8628), `/v1/revoke` (RFC 7009),
//! `/v1/introspect` (RFC 7662), the JWKS and the RFC 8414 metadata document.

use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use http::{HeaderValue, StatusCode, header};
use serde::Deserialize;

use super::AppState;
use super::error::ApiError;
use super::extract::{
    ApiForm, DpopBinding, Introspector, RequestOrigin, TokenForm, with_dpop_nonce,
};
use crate::device_grants::DEVICE_CODE_GRANT;
use crate::dpop::DPOP_ALGORITHMS;
use crate::keys::JWKS_MAX_AGE_SECS;
use crate::tokens::{Introspection, TokenError, TokenPair};

/// This resource's routes.
pub(super) fn routes() -> Router<AppState> {
    Router::new()
        .route("/.well-known/jwks.json", get(jwks))
        .route("/.well-known/oauth-authorization-server", get(metadata))
        .route("/v1/token", post(token))
        .route("/v1/revoke", post(revoke))
        .route("/v1/introspect", post(introspect))
}

/// The longest `token` parameter read; longer ones cannot be ours.
const MAX_TOKEN_PARAM: usize = crate::jwt::MAX_TOKEN_BYTES;

/// Unknown parameters are ignored (RFC 6749 section 3.2); repeated ones are refused.
#[derive(Debug, Deserialize)]
pub(crate) struct TokenRequest {
    grant_type: String,
    refresh_token: Option<String>,
    /// The device code grant's (RFC 8628 section 3.4).
    device_code: Option<String>,
    /// Public clients may send it; it is not checked (devices are not OAuth clients).
    #[serde(default)]
    #[allow(dead_code)]
    client_id: Option<String>,
}

/// `POST /v1/token`: the refresh grant (RFC 6749 section 6) and the device code grant
/// (RFC 8628 section 3.4).
async fn token(
    State(state): State<AppState>,
    RequestOrigin(origin): RequestOrigin,
    DpopBinding(binding): DpopBinding,
    ApiForm(request): ApiForm<TokenRequest>,
) -> Result<Response, ApiError> {
    match request.grant_type.as_str() {
        "refresh_token" => {
            let presented = request
                .refresh_token
                .ok_or_else(|| missing("refresh_token"))?;
            match state
                .services
                .tokens
                .refresh(&presented, binding.as_ref(), &origin)
                .await
            {
                Ok(pair) => Ok(with_dpop_nonce(
                    &state,
                    Json::<TokenPair>(pair).into_response(),
                )),
                Err(TokenError::RateLimited(limited)) => {
                    Ok(super::limits::too_many(&limited.decision, &limited.policy))
                }
                Err(crowded @ TokenError::Crowded(retry_after_s)) => {
                    let mut response = ApiError::from(crowded).into_response();
                    response
                        .headers_mut()
                        .insert(header::RETRY_AFTER, HeaderValue::from(retry_after_s));
                    Ok(response)
                }
                Err(err) => Err(err.into()),
            }
        }
        DEVICE_CODE_GRANT => {
            let code = request.device_code.ok_or_else(|| missing("device_code"))?;
            let pair = state
                .services
                .device_grants
                .poll(&code, binding, &origin)
                .await?;
            Ok(with_dpop_nonce(
                &state,
                Json::<TokenPair>(pair).into_response(),
            ))
        }
        _ => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
            "grant_type must be refresh_token or urn:ietf:params:oauth:grant-type:device_code; \
             devices get their first tokens from /v1/pair or the device code grant",
        )),
    }
}

fn missing(parameter: &str) -> ApiError {
    ApiError::new(
        StatusCode::BAD_REQUEST,
        "invalid_request",
        format!("the {parameter} parameter is missing"),
    )
}

fn bounded(token: &str) -> Option<&str> {
    (token.len() <= MAX_TOKEN_PARAM).then_some(token)
}

/// `POST /v1/revoke`: RFC 7009. Holding a token is the right to revoke it; unknown or
/// invalid tokens get the same 200, so nothing is learnt by trying.
async fn revoke(
    State(state): State<AppState>,
    RequestOrigin(origin): RequestOrigin,
    request: TokenForm,
) -> Result<StatusCode, ApiError> {
    if let Some(token) = bounded(&request.token) {
        state.services.tokens.revoke(token, &origin).await?;
    }
    Ok(StatusCode::OK)
}

/// `POST /v1/introspect`: RFC 7662, for admins and registered clients.
async fn introspect(
    State(state): State<AppState>,
    _caller: Introspector,
    request: TokenForm,
) -> Json<Introspection> {
    let Some(token) = bounded(&request.token) else {
        return Json(Introspection::default());
    };
    let answer = state.services.tokens.introspect(token);
    // An app asking about a device's token means the device is in use.
    if let Some(device) = answer
        .sub
        .as_deref()
        .filter(|_| answer.active)
        .and_then(crate::ids::DeviceId::parse)
    {
        state.services.devices.seen(device);
    }
    Json(answer)
}

/// `GET /.well-known/jwks.json`: the public keys, cacheable for a few minutes (the key
/// ring publishes a next key well before it signs, see `keys`).
async fn jwks(State(state): State<AppState>) -> Response {
    let now_ms = state.services.clock.now_ms();
    let body = state.services.keys.snapshot().jwks(now_ms);
    let mut response = (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/jwk-set+json"),
        )],
        body.to_string(),
    )
        .into_response();
    if let Ok(value) = HeaderValue::from_str(&format!(
        "public, max-age={JWKS_MAX_AGE_SECS}, stale-while-revalidate=60"
    )) {
        response.headers_mut().insert(header::CACHE_CONTROL, value);
    }
    response
}

/// `GET /.well-known/oauth-authorization-server`: RFC 8414 metadata.
async fn metadata(State(state): State<AppState>) -> Response {
    let issuer = &state.services.tokens.settings().issuer;
    let document = serde_json::json!({
        "issuer": issuer,
        "token_endpoint": format!("{issuer}/v1/token"),
        "jwks_uri": format!("{issuer}/.well-known/jwks.json"),
        "revocation_endpoint": format!("{issuer}/v1/revoke"),
        "introspection_endpoint": format!("{issuer}/v1/introspect"),
        "grant_types_supported": ["refresh_token", DEVICE_CODE_GRANT],
        "device_authorization_endpoint": format!("{issuer}/v1/device_authorization"),
        "response_types_supported": [],
        "token_endpoint_auth_methods_supported": ["none"],
        "revocation_endpoint_auth_methods_supported": ["none"],
        "introspection_endpoint_auth_methods_supported": ["client_secret_basic"],
        "pairing_endpoint": format!("{issuer}/v1/pair"),
        "dpop_signing_alg_values_supported": DPOP_ALGORITHMS,
    });
    let mut response = Json(document).into_response();
    response.headers_mut().insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=3600"),
    );
    response
}
