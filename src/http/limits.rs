//! Rate-limit answers: a 429 with `Retry-After` and the `RateLimit` / `RateLimit-Policy`
//! headers of the IETF draft (draft-ietf-httpapi-ratelimit-headers).

use axum::response::{IntoResponse, Response};
use http::{HeaderName, HeaderValue, StatusCode, header};

use super::error::ApiError;
use crate::ratelimit::{Decision, Policy};

fn ceil_secs(d: std::time::Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

/// The 429 for a refused decision.
pub fn too_many(decision: &Decision, policy: &Policy) -> Response {
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
