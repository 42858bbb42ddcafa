//! `GET /v1/authz`: forward authentication for a reverse proxy that already fronts the app
//! (Caddy `forward_auth`, nginx `auth_request`, Traefik `ForwardAuth`). This module owns
//! that decision, its two answers and its counters for `/metrics`.
//!
//! The decision is the device access token alone (`Authorization: Bearer`), checked by
//! `TokenAuthority::verify`: signature, claims and the in-memory revocation list, so a
//! revoked device, family, token or key is refused on its next request and no answer
//! reads or writes the data file. A valid token is 200 with `X-Gatehouse-Device-Id` (its
//! `sub`) for the proxy to copy to the app; anything else is 401 with an RFC 6750
//! challenge (`error="invalid_token"` when a token was presented). The answer is built
//! fresh: no request header is reflected, and the token is never echoed.
//!
//! The original request's method, URI and host come from `X-Forwarded-Method`, `-Uri` and
//! `-Host` (Caddy, Traefik) or `X-Original-Method`, `-URI` and `-Host` (nginx). They are
//! read only when the TCP peer is a trusted proxy (`ForwardedBy`), and only for the log
//! and the per-method counter: whoever can reach this endpoint directly could write them.
//!
//! Limits: the request spends one `per_ip` request of its client, as every request does
//! (`limits::admit_address`; behind a trusted proxy that is the client the proxy names,
//! not the proxy). A refusal is not a lockout failure and writes no audit record: an
//! expired token is ordinary traffic, a proxy repeats the check on every request, and
//! banning the address would ban a client for its app's clock. A refusal is a debug log
//! line and a counter (by class: no token, invalid, expired, revoked).

use std::borrow::Cow;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::Router;
use axum::extract::{ConnectInfo, Request, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};

use super::AppState;
use super::client_addr::ForwardedBy;
use super::error::ApiError;
use super::extract::{
    BEARER_CHALLENGE as CHALLENGE, BEARER_CHALLENGE_INVALID as CHALLENGE_INVALID,
    DPOP_CHALLENGE_INVALID, DPOP_CHALLENGE_NONCE, Presented, dpop_header, holder_checked,
    presented, with_dpop_nonce,
};
use super::security::RequestId;
use crate::ids::DeviceId;
use crate::tokens::{Rejection, Verified};

/// This resource's routes. `get` answers HEAD too, which some proxies send.
pub(super) fn routes() -> Router<AppState> {
    Router::new().route("/v1/authz", get(authz))
}

/// The header that carries the verified device id to the proxy (and from it to the app).
pub(crate) const DEVICE_ID_HEADER: HeaderName = HeaderName::from_static("x-gatehouse-device-id");

/// Longest forwarded method, URI or host written to the log.
const LOGGED_MAX: usize = 256;

/// Why a check failed, as counted. The exact `Rejection` goes to the debug log only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refused {
    NoToken,
    Invalid,
    Expired,
    Revoked,
    /// A DPoP-bound token without a valid proof by its key, or an unbound one sent as
    /// DPoP.
    Unbound,
    /// A proof without a fresh nonce, while nonces are on.
    Nonce,
}

impl Refused {
    fn of(rejection: Rejection) -> Self {
        // Exhaustive: a new rejection does not compile until it is given a class.
        match rejection {
            Rejection::Expired => Self::Expired,
            Rejection::Revoked => Self::Revoked,
            Rejection::Malformed(_)
            | Rejection::WrongType
            | Rejection::UnknownKey
            | Rejection::AlgorithmMismatch
            | Rejection::KeyNotUsable
            | Rejection::BadSignature
            | Rejection::WrongIssuer
            | Rejection::WrongAudience
            | Rejection::NotYetValid
            | Rejection::IssuedInFuture
            | Rejection::LifetimeTooLong
            | Rejection::UnknownFamily => Self::Invalid,
        }
    }

    fn slot(self) -> usize {
        match self {
            Self::NoToken => 1,
            Self::Invalid => 2,
            Self::Expired => 3,
            Self::Revoked => 4,
            Self::Unbound => 5,
            Self::Nonce => 6,
        }
    }
}

/// The `outcome` labels, by slot (0 is a success).
const OUTCOMES: [&str; 7] = [
    "allowed",
    "no_token",
    "invalid_token",
    "expired",
    "revoked",
    "invalid_dpop_proof",
    "use_dpop_nonce",
];

/// The original methods counted by name; any other is `other`, none (or one from a peer
/// that is not a trusted proxy) `unknown`.
const METHODS: [&str; 9] = [
    "GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "other", "unknown",
];

/// Checks since start, by outcome and by the original request's method. Atomics only:
/// counting adds no lock to a check.
#[derive(Debug, Default)]
pub(crate) struct AuthzCounters {
    outcomes: [AtomicU64; OUTCOMES.len()],
    methods: [AtomicU64; METHODS.len()],
}

impl AuthzCounters {
    fn count(&self, outcome: usize, method: Option<&str>) {
        self.outcomes[outcome].fetch_add(1, Ordering::Relaxed);
        let slot = match method {
            None => METHODS.len() - 1,
            Some(m) => METHODS[..7]
                .iter()
                .position(|known| *known == m)
                .unwrap_or(METHODS.len() - 2),
        };
        self.methods[slot].fetch_add(1, Ordering::Relaxed);
    }

    /// `{outcome="…"}` samples for `/metrics`.
    pub(crate) fn outcome_samples(&self) -> Vec<(String, f64)> {
        samples("outcome", &OUTCOMES, &self.outcomes)
    }

    /// `{method="…"}` samples for `/metrics`.
    pub(crate) fn method_samples(&self) -> Vec<(String, f64)> {
        samples("method", &METHODS, &self.methods)
    }
}

pub(super) fn samples(label: &str, names: &[&str], counters: &[AtomicU64]) -> Vec<(String, f64)> {
    names
        .iter()
        .zip(counters)
        .map(|(name, n)| {
            (
                format!("{{{label}=\"{name}\"}}"),
                n.load(Ordering::Relaxed) as f64,
            )
        })
        .collect()
}

/// The original request as a trusted proxy described it.
#[derive(Debug, Default)]
struct Original<'a> {
    method: Option<&'a str>,
    uri: Option<&'a str>,
    host: Option<&'a str>,
}

impl<'a> Original<'a> {
    fn of(request: &'a Request) -> Self {
        if request.extensions().get::<ForwardedBy>().is_none() {
            return Self::default();
        }
        let headers = request.headers();
        let read = |forwarded: &str, original: &str| {
            headers
                .get(forwarded)
                .or_else(|| headers.get(original))
                .and_then(|v| v.to_str().ok())
                // Visible ASCII (`to_str`), so any byte is a character boundary.
                .map(|v| &v[..v.len().min(LOGGED_MAX)])
        };
        Self {
            method: read("x-forwarded-method", "x-original-method"),
            uri: read("x-forwarded-uri", "x-original-uri"),
            host: read("x-forwarded-host", "x-original-host"),
        }
    }
}

/// `GET /v1/authz`.
async fn authz(State(state): State<AppState>, request: Request) -> Response {
    let original = Original::of(&request);
    let client = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(addr)| addr.ip());
    let request_id = request
        .extensions()
        .get::<RequestId>()
        .map(RequestId::as_str);
    let checked = match presented(request.headers()) {
        Presented::Nothing => Err((Refused::NoToken, "no bearer token".into())),
        Presented::Unreadable => Err((Refused::Invalid, "unreadable authorization".into())),
        Presented::Bearer(token) => check(&state, &request, token, false),
        Presented::Dpop(token) => check(&state, &request, token, true),
    };
    match checked {
        Ok(verified) => {
            let device = verified.claims.sub;
            state.authz.count(0, original.method);
            // An app reached through the proxy means the device is in use; the time is
            // kept in memory and written behind, with every other last-seen time.
            state.services.devices.seen(device);
            tracing::trace!(
                %device,
                request_id,
                client = ?client,
                method = original.method,
                uri = original.uri,
                host = original.host,
                "authz: allowed"
            );
            allowed(device)
        }
        Err((refused, reason)) => {
            state.authz.count(refused.slot(), original.method);
            tracing::debug!(
                reason = %reason,
                request_id,
                client = ?client,
                method = original.method,
                uri = original.uri,
                host = original.host,
                "authz: refused"
            );
            refusal(&state, refused)
        }
    }
}

/// Verifies `token`, then that it is used as its binding says: a DPoP-bound token with a
/// proof for the original request, which only a trusted proxy can describe.
fn check(
    state: &AppState,
    request: &Request,
    token: &str,
    as_dpop: bool,
) -> Result<Verified, (Refused, Cow<'static, str>)> {
    let verified = state
        .services
        .tokens
        .verify(token)
        .map_err(|rejection| (Refused::of(rejection), rejection.code().into()))?;
    // A bearer token that is not bound, the common case, needs nothing more.
    if !as_dpop && verified.claims.cnf.is_none() {
        return Ok(verified);
    }
    let forwarded = request.extensions().get::<ForwardedBy>().is_some();
    let headers = request.headers();
    let read = |forwarded: &str, original: &str| {
        headers
            .get(forwarded)
            .or_else(|| headers.get(original))
            .and_then(|v| v.to_str().ok())
    };
    let method = read("x-forwarded-method", "x-original-method").filter(|_| forwarded);
    let uri = match (
        forwarded,
        read("x-forwarded-host", "x-original-host"),
        read("x-forwarded-uri", "x-original-uri"),
    ) {
        (true, Some(host), Some(uri)) => {
            let proto = read("x-forwarded-proto", "x-original-proto").unwrap_or("https");
            Some(format!("{proto}://{host}{uri}"))
        }
        _ => None,
    };
    let uris: Vec<&str> = uri.as_deref().into_iter().collect();
    holder_checked(
        state,
        &verified,
        token,
        as_dpop,
        dpop_header(headers),
        method.unwrap_or_default(),
        &uris,
    )
    .map_err(|why| {
        let refused = if why.use_nonce {
            Refused::Nonce
        } else {
            Refused::Unbound
        };
        (refused, why.message.into())
    })?;
    Ok(verified)
}

fn no_store(headers: &mut HeaderMap) {
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
}

fn allowed(device: DeviceId) -> Response {
    // `dev_` and 32 hex digits, written without a temporary string.
    let mut text = [0u8; DeviceId::TEXT_LEN];
    let (prefix, hex) = text.split_at_mut(DeviceId::PREFIX.len());
    prefix.copy_from_slice(DeviceId::PREFIX.as_bytes());
    data_encoding::HEXLOWER.encode_mut(device.as_bytes(), hex);
    let mut response = StatusCode::OK.into_response();
    let headers = response.headers_mut();
    match HeaderValue::from_bytes(&text) {
        Ok(value) => {
            headers.insert(DEVICE_ID_HEADER, value);
        }
        // Unreachable (ASCII by construction); refuse rather than allow without the id.
        Err(err) => return ApiError::internal(&err).into_response(),
    }
    no_store(headers);
    response
}

fn refusal(state: &AppState, refused: Refused) -> Response {
    let (code, message, challenge) = match refused {
        Refused::NoToken => (
            "unauthorized",
            "this endpoint needs a device access token: Authorization: Bearer <access token>",
            CHALLENGE,
        ),
        Refused::Invalid | Refused::Expired | Refused::Revoked => (
            "invalid_token",
            "the access token is invalid, expired or revoked",
            CHALLENGE_INVALID,
        ),
        Refused::Unbound => (
            "invalid_dpop_proof",
            "this token is bound to a key (DPoP): send it as Authorization: DPoP with a proof \
             by that key for the original request (its method and URL, which the proxy gives \
             in X-Forwarded-Method, -Proto, -Host and -Uri), or an unbound token as Bearer",
            DPOP_CHALLENGE_INVALID,
        ),
        Refused::Nonce => (
            "use_dpop_nonce",
            "this server needs a nonce in DPoP proofs: use the one in the DPoP-Nonce header",
            DPOP_CHALLENGE_NONCE,
        ),
    };
    let mut response = ApiError::new(StatusCode::UNAUTHORIZED, code, message).into_response();
    if refused == Refused::Nonce {
        response = with_dpop_nonce(state, response);
    }
    let headers = response.headers_mut();
    headers.insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static(challenge),
    );
    no_store(headers);
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(values: &[&'static str]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for value in values {
            map.append(header::AUTHORIZATION, HeaderValue::from_static(value));
        }
        map
    }

    #[test]
    fn only_one_bearer_credential_is_taken() {
        assert!(matches!(presented(&headers(&[])), Presented::Nothing));
        assert!(matches!(
            presented(&headers(&["Basic dXNlcjpwYXNz"])),
            Presented::Nothing
        ));
        assert!(matches!(
            presented(&headers(&["bearer  abc "])),
            Presented::Bearer("abc")
        ));
        assert!(matches!(
            presented(&headers(&["Bearer"])),
            Presented::Bearer("")
        ));
        assert!(matches!(
            presented(&headers(&["Bearer a", "Bearer b"])),
            Presented::Unreadable
        ));
    }

    #[test]
    fn methods_are_counted_by_name_other_or_unknown() {
        let counters = AuthzCounters::default();
        for method in [
            Some("GET"),
            Some("POST"),
            Some("PROPFIND"),
            Some("get"),
            None,
        ] {
            counters.count(0, method);
        }
        let got: Vec<(String, f64)> = counters
            .method_samples()
            .into_iter()
            .filter(|(_, n)| *n > 0.0)
            .collect();
        let want = [
            ("{method=\"GET\"}", 1.0),
            ("{method=\"POST\"}", 1.0),
            ("{method=\"other\"}", 2.0),
            ("{method=\"unknown\"}", 1.0),
        ];
        assert_eq!(got, want.map(|(label, n)| (label.to_string(), n)).to_vec());
    }
}
