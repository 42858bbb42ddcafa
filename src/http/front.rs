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
use axum::extract::{ConnectInfo, FromRequestParts, Request, State};
use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode, header};

use super::AppState;
use super::error::ApiError;
use super::extract::{Presented, presented};
use super::security::RequestId;
use crate::audit::{Actor, Event, Origin};
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

/// The challenges, and the reading of `Authorization`, are `/v1/authz`'s: one header
/// with one Bearer credential, or none taken.
const NO_TOKEN: &str = super::extract::BEARER_CHALLENGE;
const BAD_TOKEN: &str = super::extract::BEARER_CHALLENGE_INVALID;

async fn proxy(State(state): State<AppState>, request: Request) -> Response {
    let Some(front) = state.front.clone() else {
        return ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such resource")
            .into_response();
    };
    if is_websocket_upgrade(request.headers()) {
        return relay(state, front, request).await;
    }
    let token = match presented(request.headers()) {
        Presented::Bearer(token) => token,
        Presented::Nothing => {
            state.front_counters.count("no_token");
            return refused(
                NO_TOKEN,
                "unauthorized",
                "a device access token is required (Authorization: Bearer)",
            );
        }
        Presented::Unreadable => {
            state.front_counters.count("invalid_token");
            return refused(BAD_TOKEN, "invalid_token", "the access token is not valid");
        }
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
    let caller = caller_of(&state, request.extensions(), device);
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

/// A WebSocket opening handshake (RFC 6455 section 4.1): `Upgrade: websocket` with
/// `Connection: upgrade`.
fn is_websocket_upgrade(headers: &http::HeaderMap) -> bool {
    let has = |name, token: &str| {
        headers.get_all(name).iter().any(|v| {
            v.to_str().is_ok_and(|v| {
                v.split(',')
                    .any(|part| part.trim().eq_ignore_ascii_case(token))
            })
        })
    };
    has(header::UPGRADE, "websocket") && has(header::CONNECTION, "upgrade")
}

/// A WebSocket through the front door: the token from `Authorization`, or for browsers
/// (which cannot set headers on a WebSocket) from a `gatehouse.bearer.<token>` entry of
/// `Sec-WebSocket-Protocol`, which is removed before the app sees the list; a browser's
/// `Origin` must be allowed (`cors.allowed_origins`). The app's socket is opened first,
/// so the client is answered with the subprotocol the app chose (or `gatehouse` when the
/// client offered it and the app chose none), never with the token.
async fn relay(state: AppState, front: crate::front::FrontDoor, request: Request) -> Response {
    let (mut parts, _body) = request.into_parts();
    let offered: Vec<String> = parts
        .headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|p| p.trim().to_string())
        .filter(|p| !p.is_empty())
        .collect();
    let from_protocol = offered
        .iter()
        .find_map(|p| p.strip_prefix(crate::front::BEARER_PROTOCOL))
        .map(str::to_string);
    let from_header = match presented(&parts.headers) {
        Presented::Bearer(token) => Some(token.to_string()),
        Presented::Nothing => None,
        Presented::Unreadable => {
            state.front_counters.count("invalid_token");
            return refused(BAD_TOKEN, "invalid_token", "the access token is not valid");
        }
    };
    let Some(token) = from_header.or(from_protocol) else {
        state.front_counters.count("no_token");
        return refused(
            NO_TOKEN,
            "unauthorized",
            "a device access token is required (Authorization: Bearer, or a \
             gatehouse.bearer.<token> subprotocol)",
        );
    };
    if let Some(origin) = parts
        .headers
        .get(header::ORIGIN)
        .and_then(|v| v.to_str().ok())
        && !front.origin_allowed(origin)
    {
        return ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "this origin may not open a WebSocket here (cors.allowed_origins)",
        )
        .into_response();
    }
    let verified = match state.services.tokens.verify(&token) {
        Ok(verified) => verified,
        Err(reason) => {
            tracing::debug!(
                reason = reason.code(),
                "front door: WebSocket token refused"
            );
            state.front_counters.count("invalid_token");
            return refused(BAD_TOKEN, "invalid_token", "the access token is not valid");
        }
    };
    let upgrade =
        match axum::extract::ws::WebSocketUpgrade::from_request_parts(&mut parts, &state).await {
            Ok(upgrade) => upgrade,
            Err(rejection) => return rejection.into_response(),
        };
    let device = verified.claims.sub;
    let caller = caller_of(&state, &parts.extensions, device);
    // Relayed sockets count toward the same caps as gatehouse's own channel.
    let slot = match state.services.live.admit(caller.address) {
        Ok(slot) => slot,
        Err(refused) => return super::ws::refusal(refused),
    };
    state.services.devices.seen(device);
    let host = parts
        .headers
        .get(header::HOST)
        .cloned()
        .unwrap_or_else(|| HeaderValue::from_static("localhost"));
    let to_app: Vec<String> = offered
        .iter()
        .filter(|p| !p.starts_with(crate::front::BEARER_PROTOCOL) && *p != "gatehouse")
        .cloned()
        .collect();
    let path = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_string();
    let app = match front.open_socket(&path, &caller, &host, &to_app).await {
        Ok(app) => app,
        Err(err) => {
            state
                .front_counters
                .count(crate::error_kind::Classify::code(&err));
            return ApiError::from(err).into_response();
        }
    };
    let answer = match &app.protocol {
        Some(chosen) => Some(chosen.clone()),
        None if offered.iter().any(|p| p == "gatehouse") => Some("gatehouse".to_string()),
        None => None,
    };
    let upgrade = match answer {
        Some(protocol) => upgrade.protocols([protocol]),
        None => upgrade,
    };
    state.front_counters.count("forwarded");
    let tokens = state.services.tokens.clone();
    let changes = state.services.changes.subscribe();
    let expires_in = std::time::Duration::from_secs(
        verified
            .claims
            .exp
            .saturating_sub(state.services.clock.now_ms() / 1000),
    );
    let (max_message, max_duration) = front.ws_limits();
    let budget = front.budget(device);
    let closing = state.services.live.closing();
    let audit = state.services.audit.clone();
    let origin = Origin::request(caller.address, Some(caller.request_id.clone()))
        .as_actor(Actor::Device(device.to_string()));
    upgrade
        .max_message_size(max_message)
        .max_frame_size(max_message)
        .on_upgrade(move |socket| async move {
            let _slot = slot;
            audit
                .record_or_log(
                    &origin,
                    Event::new("front.socket_opened")
                        .device(device)
                        .detail("path", path.clone()),
                )
                .await;
            let still_valid = || tokens.verify(&token).is_ok();
            let limits = crate::front::Limits {
                changes,
                closing,
                expires_in,
                max: max_duration,
                budget,
            };
            let ended = crate::front::relay(socket, app, limits, still_valid).await;
            audit
                .record_or_log(
                    &origin,
                    Event::new("front.socket_closed")
                        .device(device)
                        .detail("path", path)
                        .detail("reason", ended.as_str()),
                )
                .await;
        })
}

fn caller_of(
    state: &AppState,
    extensions: &http::Extensions,
    device: crate::ids::DeviceId,
) -> Caller {
    Caller {
        device,
        address: extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map_or(std::net::IpAddr::from([0, 0, 0, 0]), |c| c.0.ip()),
        scheme: if state.tls_mode == crate::config::TlsMode::Off {
            "http"
        } else {
            "https"
        },
        request_id: extensions
            .get::<RequestId>()
            .map(|id| id.0.clone())
            .unwrap_or_default(),
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
