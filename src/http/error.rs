//! The one error shape every client sees: `{"error", "message", "request_id"}`.
//!
//! Handlers return `ApiError`; its `IntoResponse` only records the code and message in
//! the response extensions. `render_errors` (run on every response) then writes every error
//! response, ours and those of layers such as the body limit or timeout, as that JSON
//! with the request id, so there is exactly one renderer and no plain-text error leaks.

use axum::body::Body;
use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode, header};

use super::security::RequestId;
use crate::error_kind::{Classify, ErrorKind};

/// An error on its way to a client. `message` must never carry internals (paths,
/// database details): 5xx messages are fixed text, details go to the log.
#[derive(Debug, Clone)]
pub(crate) struct ApiError {
    pub(crate) status: StatusCode,
    pub(crate) code: &'static str,
    pub(crate) message: String,
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }

    /// A 500 whose cause is logged, not shown.
    pub(crate) fn internal(cause: &dyn std::fmt::Display) -> Self {
        tracing::error!(error = %cause, "internal error");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal_error",
            "the server failed to handle this request; it has been logged",
        )
    }

    pub(crate) fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message)
    }
}

/// The one mapping from a domain error to an answer: its kind gives the status, its code
/// the `error` field. An internal failure is logged and answered with fixed text.
impl<E: Classify> From<E> for ApiError {
    fn from(err: E) -> Self {
        let status = match err.kind() {
            ErrorKind::Invalid => StatusCode::BAD_REQUEST,
            ErrorKind::Unauthenticated => StatusCode::UNAUTHORIZED,
            ErrorKind::NotFound => StatusCode::NOT_FOUND,
            ErrorKind::Conflict => StatusCode::CONFLICT,
            ErrorKind::Gone => StatusCode::GONE,
            ErrorKind::Banned | ErrorKind::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            ErrorKind::Upstream => StatusCode::BAD_GATEWAY,
            ErrorKind::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            ErrorKind::Unavailable => {
                tracing::warn!(error = %err, "the store cannot be reached");
                return Self::unavailable(
                    "the database cannot be reached; the request was not completed, try again",
                );
            }
            ErrorKind::Internal => return Self::internal(&err),
        };
        Self::new(status, err.code(), err.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = self.status.into_response();
        response.extensions_mut().insert(self);
        response
    }
}

/// The code and message for an error response that carries no `ApiError`.
fn default_error(status: StatusCode) -> ApiError {
    let (code, message) = match status {
        StatusCode::BAD_REQUEST => ("bad_request", "the request is malformed"),
        StatusCode::UNAUTHORIZED => ("unauthorized", "authentication is required"),
        StatusCode::FORBIDDEN => ("forbidden", "not allowed"),
        StatusCode::NOT_FOUND => ("not_found", "no such resource"),
        StatusCode::METHOD_NOT_ALLOWED => ("method_not_allowed", "method not allowed here"),
        StatusCode::REQUEST_TIMEOUT => ("request_timeout", "the request took too long"),
        StatusCode::PAYLOAD_TOO_LARGE => ("payload_too_large", "the request body is too large"),
        StatusCode::UNSUPPORTED_MEDIA_TYPE => {
            ("unsupported_media_type", "unsupported content type")
        }
        StatusCode::UNPROCESSABLE_ENTITY => ("invalid_request", "the request body is invalid"),
        StatusCode::TOO_MANY_REQUESTS => ("rate_limited", "too many requests"),
        StatusCode::SERVICE_UNAVAILABLE => ("unavailable", "the service is unavailable"),
        s if s.is_server_error() => ("internal_error", "the server failed to handle this request"),
        _ => ("error", "the request failed"),
    };
    ApiError::new(status, code, message)
}

#[derive(serde::Serialize)]
struct ErrorBody<'a> {
    error: &'a str,
    message: &'a str,
    request_id: &'a str,
}

/// Renders a 4xx/5xx response as the JSON error body (called by `super::edge` for
/// every response). `http1`: the request came over HTTP/1.
pub(crate) fn render_errors(
    response: Response,
    http1: bool,
    request_id: Option<&RequestId>,
) -> Response {
    let status = response.status();
    // The app's own answers through the front door stay as the app wrote them.
    if !(status.is_client_error() || status.is_server_error())
        || response
            .extensions()
            .get::<crate::front::Proxied>()
            .is_some()
    {
        return response;
    }
    let (mut parts, _) = response.into_parts();
    let error = parts
        .extensions
        .remove::<ApiError>()
        .unwrap_or_else(|| default_error(status));
    let body = serde_json::to_vec(&ErrorBody {
        error: error.code,
        message: &error.message,
        request_id: request_id.map_or("", RequestId::as_str),
    })
    .unwrap_or_default();
    parts.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    parts.headers.remove(header::CONTENT_LENGTH);
    if status != StatusCode::METHOD_NOT_ALLOWED {
        parts.headers.remove(header::ALLOW);
    }
    // A body refused unread leaves the HTTP/1 connection unusable; say so, so that the
    // client does not send its next request into a closing socket.
    if http1 && status == StatusCode::PAYLOAD_TOO_LARGE {
        parts
            .headers
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    Response::from_parts(parts, Body::from(body))
}
