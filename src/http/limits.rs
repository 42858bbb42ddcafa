//! Rate-limit answers: a 429 with `Retry-After` and the `RateLimit` / `RateLimit-Policy`
//! headers of the IETF draft (draft-ietf-httpapi-ratelimit-headers).

use axum::response::{IntoResponse, Response};
use http::{HeaderName, HeaderValue, StatusCode, header};

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, Request, State};
use axum::middleware::Next;

use super::AppState;
use super::error::ApiError;
use crate::ratelimit::{Decision, Policy, PolicyId, Subject};

fn ceil_secs(d: std::time::Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

/// Refuses a banned address (429 `banned` with `Retry-After`) and spends one request
/// of the `per_ip` policy, before any route runs. Fails closed: a request whose peer
/// address is unknown is refused. The health probes are exempt: a load balancer or a
/// monitor must learn whether the server is up even from an address that is banned or
/// busy, and their answers are constant and cheap.
pub(crate) async fn admit_address(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    let probe = matches!(request.uri().path(), "/healthz" | "/readyz");
    admit(&state, request, next, probe).await
}

/// `admit_address` for requests going to an app: no path is exempt there (an app's
/// own `/healthz` is the app's, not gatehouse's probe).
pub(crate) async fn admit_address_for_app(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    admit(&state, request, next, false).await
}

async fn admit(state: &AppState, request: Request, next: Next, probe: bool) -> Response {
    // Every connection `serve` accepts carries its peer address. A request without one
    // would skip the ban and the per-address limit, so it is refused instead.
    let Some(ConnectInfo(peer)) = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .copied()
    else {
        return ApiError::internal(&"no peer address on the request").into_response();
    };
    let ip = peer.ip();
    if probe {
        return next.run(request).await;
    }
    if let Some(left) = state.services.lockout.banned(ip) {
        let retry = ceil_secs(left).max(1);
        let mut response = ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "banned",
            format!(
                "this address is locked out after repeated failed credential checks; \
                 retry in {retry} s"
            ),
        )
        .into_response();
        if let Ok(value) = HeaderValue::from_str(&retry.to_string()) {
            response.headers_mut().insert(header::RETRY_AFTER, value);
        }
        return response;
    }
    if let Err(limited) = state
        .services
        .limits
        .limit(PolicyId::PerIp, &Subject::ip(ip))
    {
        return too_many(&limited.decision, &limited.policy);
    }
    next.run(request).await
}

/// The 429 for a refused decision.
pub(crate) fn too_many(decision: &Decision, policy: &Policy) -> Response {
    let retry = ceil_secs(decision.retry_after).max(1);
    let mut response = ApiError::new(
        StatusCode::TOO_MANY_REQUESTS,
        "rate_limited",
        format!(
            "too many requests: at most {} per {} s; retry in {retry} s",
            policy.limit,
            policy.window.as_secs()
        ),
    )
    .into_response();
    let headers = response.headers_mut();
    let mut set = |name: HeaderName, value: String| {
        if let Ok(value) = HeaderValue::from_str(&value) {
            headers.insert(name, value);
        }
    };
    set(header::RETRY_AFTER, retry.to_string());
    set(
        HeaderName::from_static("ratelimit-policy"),
        format!(
            "\"{}\";q={};w={}",
            policy.name,
            policy.limit,
            policy.window.as_secs()
        ),
    );
    set(
        HeaderName::from_static("ratelimit"),
        format!(
            "\"{}\";r={};t={}",
            policy.name,
            decision.remaining,
            ceil_secs(decision.reset)
        ),
    );
    response
}

/// A body this much over `server.max_body_bytes` is still read to its end over HTTP/2
/// before the 413, so that the stream ends cleanly...
const H2_DRAIN_MAX_BYTES: u64 = 8 * 1024 * 1024;
/// ...if it arrives within this time.
const H2_DRAIN_TIME: std::time::Duration = std::time::Duration::from_secs(5);

/// The 413 for an HTTP/2 request that announces a body over the limit, sent once the
/// body has been read and thrown away (up to `H2_DRAIN_MAX_BYTES`, within
/// `H2_DRAIN_TIME`). Answering at once would leave the client's upload half done and
/// the stream reset, and some clients (curl) then report the reset instead of the 413.
/// HTTP/1.1 gets the same effect from the lingering close in `serve`.
pub(crate) async fn drain_oversized_h2(
    State(limit): State<usize>,
    request: Request,
    next: Next,
) -> Response {
    if request.version() != http::Version::HTTP_2 {
        return next.run(request).await;
    }
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let limit = u64::try_from(limit).unwrap_or(u64::MAX);
    match declared {
        Some(length) if length > limit && length <= H2_DRAIN_MAX_BYTES => {
            use http_body_util::BodyExt;
            let mut body = request.into_body();
            let _ = tokio::time::timeout(H2_DRAIN_TIME, async {
                while let Some(Ok(_)) = body.frame().await {}
            })
            .await;
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                "the request body is too large",
            )
            .into_response()
        }
        _ => next.run(request).await,
    }
}
