//! Headers every response carries, and the request id (both by way of `super::edge`).
//!
//! The API serves JSON only, so its Content-Security-Policy forbids everything; HSTS is
//! sent whenever the listener speaks TLS (two years, subdomains included).

use axum::extract::Request;
use axum::response::Response;
use http::header::{self, HeaderName, HeaderValue};
use ring::rand::{SecureRandom, SystemRandom};

/// The id of one request: in logs, in `x-request-id`, in every error body. Held as the
/// header value it is sent as, so that each copy of it is a reference count.
#[derive(Debug, Clone)]
pub(crate) struct RequestId(HeaderValue);

impl RequestId {
    pub(crate) fn as_str(&self) -> &str {
        // Made of hex digits only (`new_request_id`): always visible ASCII.
        self.0.to_str().unwrap_or_default()
    }
}

pub(crate) const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Two years, as HSTS preload lists ask.
pub(crate) const HSTS: &str = "max-age=63072000; includeSubDomains";
pub const API_CSP: &str =
    "default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'";
pub(crate) const PERMISSIONS_POLICY: &str = "accelerometer=(), camera=(), geolocation=(), gyroscope=(), \
     magnetometer=(), microphone=(), payment=(), usb=(), interest-cohort=()";

/// A new request id: 24 hex digits, a random 64-bit prefix drawn once per process and a
/// 32-bit counter, so that ids are unique within a run and across restarts without a
/// system call per request. The id is for correlation, not security: nothing may rely on
/// it being unpredictable.
fn new_request_id() -> RequestId {
    static PREFIX: std::sync::OnceLock<[u8; 8]> = std::sync::OnceLock::new();
    static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let prefix = PREFIX.get_or_init(|| {
        let mut bytes = [0u8; 8];
        // A failing system RNG leaves zeros: ids stay unique within the run.
        let _ = SystemRandom::new().fill(&mut bytes);
        bytes
    });
    let count = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut bytes = [0u8; 12];
    bytes[..8].copy_from_slice(prefix);
    bytes[8..].copy_from_slice(&count.to_be_bytes());
    let hex = data_encoding::HEXLOWER.encode(&bytes);
    RequestId(HeaderValue::from_str(&hex).unwrap_or_else(|_| HeaderValue::from_static("0")))
}

/// Whether HSTS is sent (the listener speaks TLS).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Hsts(pub bool);

/// What the debug line says of a request, read only when that line is written.
pub(crate) struct Logged {
    method: http::Method,
    path: String,
    client: Option<std::net::IpAddr>,
    proxy: Option<std::net::IpAddr>,
}

/// Gives `request` its id, and reads what the debug line will say of it (only when
/// debug logging is on).
pub(crate) fn start(request: &mut Request) -> (RequestId, Option<Logged>) {
    let id = new_request_id();
    request.extensions_mut().insert(id.clone());
    let logged = tracing::enabled!(tracing::Level::DEBUG).then(|| Logged {
        method: request.method().clone(),
        path: request.uri().path().to_string(),
        client: request
            .extensions()
            .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
            .map(|c| c.0.ip()),
        proxy: request
            .extensions()
            .get::<super::client_addr::ForwardedBy>()
            .map(|p| p.0.ip()),
    });
    (id, logged)
}

/// Sets the security headers and the request id on the way out, and writes the debug
/// line.
pub(crate) fn finish(
    mut response: Response,
    hsts: Hsts,
    id: RequestId,
    logged: Option<Logged>,
) -> Response {
    if let Some(Logged {
        method,
        path,
        client,
        proxy,
    }) = logged
    {
        tracing::debug!(request_id = id.as_str(), %method, %path, client = ?client, proxy = ?proxy, status = response.status().as_u16(), "request");
    }
    let proxied = response
        .extensions()
        .get::<crate::front::Proxied>()
        .is_some();
    let headers = response.headers_mut();
    let set = |headers: &mut http::HeaderMap, name: HeaderName, value: &'static str| {
        headers.insert(name, HeaderValue::from_static(value));
    };
    if hsts.0 {
        set(headers, header::STRICT_TRANSPORT_SECURITY, HSTS);
    }
    // The app's answers keep the app's own policies (a CSP of `default-src 'none'` would
    // break its pages); they get HSTS and the request id only.
    if proxied {
        headers.insert(REQUEST_ID, id.0);
        return response;
    }
    if !headers.contains_key(header::CONTENT_SECURITY_POLICY) {
        set(headers, header::CONTENT_SECURITY_POLICY, API_CSP);
    }
    set(headers, header::X_CONTENT_TYPE_OPTIONS, "nosniff");
    set(headers, header::X_FRAME_OPTIONS, "DENY");
    set(headers, header::REFERRER_POLICY, "no-referrer");
    set(
        headers,
        HeaderName::from_static("permissions-policy"),
        PERMISSIONS_POLICY,
    );
    set(
        headers,
        HeaderName::from_static("cross-origin-opener-policy"),
        "same-origin",
    );
    set(
        headers,
        HeaderName::from_static("cross-origin-resource-policy"),
        "same-origin",
    );
    if !headers.contains_key(header::CACHE_CONTROL) {
        set(headers, header::CACHE_CONTROL, "no-store");
    }
    headers.insert(REQUEST_ID, id.0);
    response
}
