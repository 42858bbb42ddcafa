//! The front door's HTTP side: every request whose path gatehouse does not own goes to the
//! app (`upstream.url`) once its device access token is verified. No token, or one that
//! is not valid now (expired, revoked with its device, family or key — all checked in
//! memory, no store read), is a 401 with `WWW-Authenticate: Bearer` and the usual JSON
//! error; the app sees nothing of it. Forwarding itself is `crate::front`'s.
//!
//! These requests skip the API's body limit and request timeout (the app sets its own,
//! and bodies are streamed), but not the ban and per-address limit.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::Router;
use axum::extract::{ConnectInfo, Request, State};
use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode, header};

use super::AppState;
use super::error::ApiError;
use super::security::RequestId;
use crate::front::Caller;
use crate::tokens::Rejection;

/// The front door as a router of its own, mounted as the API router's fallback.
pub(super) fn router(state: AppState) -> Router {
    Router::new()
        .fallback(proxy)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            super::limits::admit_address,
        ))
        .with_state(state)
}

/// The `outcome` labels of `gatehouse_front_requests_total`, by slot.
const OUTCOMES: [&str; 6] = [
    "forwarded",
    "no_token",
    "invalid_token",
    "invalid_request",
    "bad_gateway",
    "gateway_timeout",
];

/// Requests the front door handled since start, by outcome. Atomics only.
#[derive(Debug, Default)]
pub(crate) struct FrontCounters {
    outcomes: [AtomicU64; OUTCOMES.len()],
}

impl FrontCounters {
    fn count(&self, outcome: &str) {
        if let Some(slot) = OUTCOMES.iter().position(|o| *o == outcome) {
            self.outcomes[slot].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// `{outcome="…"}` samples for `/metrics`.
    pub(crate) fn samples(&self) -> Vec<(String, f64)> {
        super::authz::samples("outcome", &OUTCOMES, &self.outcomes)
    }
}

/// RFC 6750 section 3: the challenge, with `invalid_token` when a token was presented.
const NO_TOKEN: &str = r#"Bearer realm="gatehouse""#;
const BAD_TOKEN: &str = r#"Bearer realm="gatehouse", error="invalid_token""#;

async fn proxy(State(state): State<AppState>, request: Request) -> Response {
    let Some(front) = state.front.clone() else {
        return ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such resource")
            .into_response();
    };
    let token = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, token) = v.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
        });
    let Some(token) = token else {
        state.front_counters.count("no_token");
        return refused(
            NO_TOKEN,
            "unauthorized",
            "a device access token is required (Authorization: Bearer)",
        );
    };
    let verified = match state.services.tokens.verify(token) {
        Ok(verified) => verified,
        Err(reason) => {
            tracing::debug!(reason = reason.code(), "front door: token refused");
            let message = match reason {
                Rejection::Expired => "the access token has expired: refresh it",
                _ => "the access token is not valid",
            };
            state.front_counters.count("invalid_token");
            return refused(BAD_TOKEN, "invalid_token", message);
        }
    };
    let device = verified.claims.sub;
    state.services.devices.seen(device);
    let caller = Caller {
        device,
        address: request
            .extensions()
            .get::<ConnectInfo<SocketAddr>>()
            .map_or(std::net::IpAddr::from([0, 0, 0, 0]), |c| c.0.ip()),
        scheme: if state.tls_mode == crate::config::TlsMode::Off {
            "http"
        } else {
            "https"
        },
        request_id: request
            .extensions()
            .get::<RequestId>()
            .map(|id| id.0.clone())
            .unwrap_or_default(),
    };
    match front.forward(request, &caller).await {
        Ok(response) => {
            state.front_counters.count("forwarded");
            response
        }
        Err(err) => {
            state
                .front_counters
                .count(crate::error_kind::Classify::code(&err));
            ApiError::from(err).into_response()
        }
    }
}

/// A 401 with the same codes `/v1/authz` uses: `unauthorized` without a token,
/// `invalid_token` with one that is not valid now.
fn refused(challenge: &'static str, code: &'static str, message: &str) -> Response {
    let mut response = ApiError::new(StatusCode::UNAUTHORIZED, code, message).into_response();
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static(challenge),
    );
    response
}
