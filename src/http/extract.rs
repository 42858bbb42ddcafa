//! Extractors: request bodies with clear errors, and who is calling.
//!
//! `ApiJson` and `ApiForm` wrap axum's extractors so a bad body is a 400 (or 415) with a
//! message that says what is wrong, in our error shape. `Admin` accepts
//! `Authorization: Bearer <admin token>`, or the admin UI's session cookie; with the
//! cookie, a request that changes anything must also come from our own origin
//! (`Sec-Fetch-Site`, `Origin`) and carry the session's CSRF token in `X-CSRF-Token`,
//! else it is refused with 403 and audited. `Introspector` accepts an admin token or a
//! registered client's HTTP Basic credentials. Every failed credential check is the same
//! 401, with `WWW-Authenticate`, whatever the reason.

use std::net::SocketAddr;

use axum::extract::rejection::{FormRejection, JsonRejection};
use axum::extract::{ConnectInfo, FromRequest, FromRequestParts, Request};
use axum::response::{IntoResponse, Response};
use http::request::Parts;
use http::{HeaderMap, HeaderValue, StatusCode, header};
use serde::de::DeserializeOwned;

use super::AppState;
use super::error::ApiError;
use super::json::StrictObject;
use super::limits::too_many;
use super::security::RequestId;
use crate::admin_tokens::AdminTokenError;
use crate::audit::{Actor, Event, Origin};
use crate::dpop::{DpopError, Expected, Jkt};
use crate::ratelimit::{FailedCheck, PolicyId, Subject};
use crate::tokens::Verified;

/// A JSON body; a bad one is a 400 that says why.
#[derive(Debug)]
pub(crate) struct ApiJson<T>(pub T);

impl<T: DeserializeOwned> FromRequest<AppState> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, ApiError> {
        // Every body of the API is a JSON object: read it as one first, since serde would
        // also fill a struct from an array (`["name", 300]`), and with no member named twice
        // (serde would keep the last).
        let object = match axum::Json::<StrictObject>::from_request(req, state).await {
            Ok(axum::Json(object)) => object,
            Err(rejection) => return Err(json_rejection(&rejection)),
        };
        object
            .into_type()
            .map(Self)
            .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", e.to_string()))
    }
}

fn json_rejection(rejection: &JsonRejection) -> ApiError {
    match rejection {
        JsonRejection::MissingJsonContentType(_) => ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "send the body as JSON with Content-Type: application/json",
        ),
        JsonRejection::JsonDataError(e) => {
            ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", e.body_text())
        }
        JsonRejection::JsonSyntaxError(e) => {
            ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", e.body_text())
        }
        other => passthrough(other.status(), other.body_text()),
    }
}

/// Any other rejection keeps its status; a body over the limit keeps its own code.
fn passthrough(status: StatusCode, text: String) -> ApiError {
    if status == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::new(status, "payload_too_large", "the request body is too large")
    } else {
        ApiError::new(status, "invalid_request", text)
    }
}

/// An `application/x-www-form-urlencoded` body (the OAuth endpoints).
#[derive(Debug)]
pub(crate) struct ApiForm<T>(pub T);

impl<T: DeserializeOwned> FromRequest<AppState> for ApiForm<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, ApiError> {
        match axum::Form::<T>::from_request(req, state).await {
            Ok(axum::Form(value)) => Ok(Self(value)),
            Err(FormRejection::InvalidFormContentType(_)) => Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "send the body with Content-Type: application/x-www-form-urlencoded",
            )),
            Err(FormRejection::FailedToDeserializeForm(e)) => Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                e.body_text(),
            )),
            // A missing, repeated or mistyped parameter: 400 (RFC 6749 section 5.2).
            Err(FormRejection::FailedToDeserializeFormBody(e)) => Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                e.body_text(),
            )),
            Err(other) => Err(passthrough(other.status(), other.body_text())),
        }
    }
}

/// The form of `/v1/introspect` and `/v1/revoke` (RFC 7662, RFC 7009): its `token`.
/// `token_type_hint` is a hint only (the token's own shape decides) and other
/// parameters (such as `client_id`) are ignored; a repeated `token` or hint is refused.
///
/// Parsed here rather than through serde: these bodies are a JWT or an opaque token,
/// base64url with nothing to decode, and the generic decoder percent-decodes and checks
/// UTF-8 character by character, which cost more than the token check itself. A pair
/// with `%` or `+` in it is decoded by `form_urlencoded`, as before.
#[derive(Debug)]
pub(crate) struct TokenForm {
    pub(crate) token: String,
}

impl FromRequest<AppState> for TokenForm {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, ApiError> {
        let form = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .is_some_and(|v| {
                v.trim()
                    .eq_ignore_ascii_case("application/x-www-form-urlencoded")
            });
        if !form {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "send the body with Content-Type: application/x-www-form-urlencoded",
            ));
        }
        let body = axum::body::Bytes::from_request(req, state)
            .await
            .map_err(|rejection| passthrough(rejection.status(), rejection.body_text()))?;
        parse_token_form(&body)
    }
}

fn parse_token_form(body: &[u8]) -> Result<TokenForm, ApiError> {
    let refused =
        |message: &str| ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", message);
    let mut token = None;
    let mut hint = false;
    for pair in body.split(|b| *b == b'&').filter(|pair| !pair.is_empty()) {
        let (key, value) = form_pair(pair);
        match &*key {
            "token" if token.is_some() => return Err(refused("duplicate field `token`")),
            "token" => token = Some(value.into_owned()),
            "token_type_hint" if hint => {
                return Err(refused("duplicate field `token_type_hint`"));
            }
            "token_type_hint" => hint = true,
            _ => {}
        }
    }
    match token {
        Some(token) => Ok(TokenForm { token }),
        None => Err(refused("missing field `token`")),
    }
}

/// One `key=value` pair of a form body, decoded.
fn form_pair(pair: &[u8]) -> (std::borrow::Cow<'_, str>, std::borrow::Cow<'_, str>) {
    use std::borrow::Cow;
    if !pair.iter().any(|b| *b == b'%' || *b == b'+')
        && let Ok(text) = std::str::from_utf8(pair)
    {
        let (key, value) = text.split_once('=').unwrap_or((text, ""));
        return (Cow::Borrowed(key), Cow::Borrowed(value));
    }
    form_urlencoded::parse(pair)
        .next()
        .unwrap_or((Cow::Borrowed(""), Cow::Borrowed("")))
}

/// Who is calling (not yet identified), from where, in which request: the start of
/// every audit record a request writes.
#[derive(Debug, Clone)]
pub(crate) struct RequestOrigin(pub Origin);

fn origin_of(parts: &Parts) -> Result<Origin, ApiError> {
    let peer = parts
        .extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(addr)| addr.ip())
        .ok_or_else(|| ApiError::internal(&"no peer address on the request"))?;
    let request_id = parts
        .extensions
        .get::<RequestId>()
        .map(|id| id.as_str().to_string());
    Ok(Origin::request(peer, request_id))
}

impl FromRequestParts<AppState> for RequestOrigin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &AppState) -> Result<Self, ApiError> {
        origin_of(parts).map(Self)
    }
}

/// The `DPoP` header's proof (RFC 9449), checked against this request (its method, and
/// its URL as the issuer names it or as the `Host` header does; no access token): the
/// thumbprint of the key that signed it, to bind what the request issues to. `None`
/// without the header. A bad proof is refused (400 `invalid_dpop_proof`).
#[derive(Debug, Clone)]
pub(crate) struct DpopBinding(pub Option<Jkt>);

impl FromRequestParts<AppState> for DpopBinding {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Response> {
        let refuse = |err: DpopError| with_dpop_nonce(state, ApiError::from(err).into_response());
        // Most requests carry no proof: they need no URL worked out.
        let Some(proof) = dpop_header(&parts.headers).map_err(refuse)? else {
            return Ok(Self(None));
        };
        let uris = request_uris(parts, &state.services.tokens.settings().issuer);
        let uris: Vec<&str> = uris.iter().map(String::as_str).collect();
        binding_of(state, Some(proof), parts.method.as_str(), &uris)
            .map(Self)
            .map_err(refuse)
    }
}

/// `response` with the `DPoP-Nonce` header, when nonces are on (`tokens.dpop_nonce`):
/// every answer of an endpoint that takes proofs carries the nonce to use next.
pub(crate) fn with_dpop_nonce(state: &AppState, mut response: Response) -> Response {
    if let Some(nonce) = state.services.proofs.nonce()
        && let Ok(value) = HeaderValue::from_str(&nonce)
    {
        response.headers_mut().insert("dpop-nonce", value);
    }
    response
}

/// The key a request's proof binds what it issues to: the proof (if any) checked for
/// `method` and one of `uris`, without an access token.
pub(super) fn binding_of(
    state: &AppState,
    proof: Option<&str>,
    method: &str,
    uris: &[&str],
) -> Result<Option<Jkt>, DpopError> {
    let Some(proof) = proof else {
        return Ok(None);
    };
    let expected = Expected {
        method,
        uris,
        access_token: None,
    };
    state.services.proofs.check(proof, &expected).map(Some)
}

/// The one `DPoP` header's value, if there is one.
pub(crate) fn dpop_header(headers: &HeaderMap) -> Result<Option<&str>, DpopError> {
    let mut values = headers.get_all("dpop").iter();
    let (Some(value), None) = (values.next(), values.next()) else {
        return if headers.contains_key("dpop") {
            Err(DpopError::Header)
        } else {
            Ok(None)
        };
    };
    value.to_str().map(Some).map_err(|_| DpopError::Header)
}

/// The URLs a proof for this request may name: under the issuer, and under the host the
/// request was sent to (the `Host` header, or HTTP/2's `:authority`), with the issuer's
/// scheme. Path only: `htu` has no query.
pub(crate) fn request_uris(parts: &Parts, issuer: &str) -> Vec<String> {
    let path = parts.uri.path();
    let mut uris = vec![format!("{issuer}{path}")];
    let host = parts
        .headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| parts.uri.authority().map(|a| a.as_str()));
    if let Some(host) = host {
        let scheme = issuer.split("://").next().unwrap_or("https");
        uris.push(format!("{scheme}://{host}{path}"));
    }
    uris
}

/// The client's address as the TCP connection shows it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Peer(pub SocketAddr);

impl FromRequestParts<AppState> for Peer {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &AppState) -> Result<Self, ApiError> {
        parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map(|ConnectInfo(addr)| Self(*addr))
            .ok_or_else(|| ApiError::internal(&"no peer address on the request"))
    }
}

/// A 401 that tells the client which schemes we take.
#[derive(Debug)]
pub(crate) struct Unauthorized {
    error: ApiError,
    challenge: &'static str,
}

impl Unauthorized {
    fn new(message: &str, challenge: &'static str) -> Self {
        Self {
            error: ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message),
            challenge,
        }
    }
}

impl IntoResponse for Unauthorized {
    fn into_response(self) -> Response {
        let mut response = self.error.into_response();
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static(self.challenge),
        );
        response
    }
}

/// RFC 6750 section 3: the challenge for a device token, with `invalid_token` when one
/// was presented and refused.
pub(super) const BEARER_CHALLENGE: &str = r#"Bearer realm="gatehouse""#;
pub(super) const BEARER_CHALLENGE_INVALID: &str =
    r#"Bearer realm="gatehouse", error="invalid_token""#;

/// The challenge for a DPoP-bound token refused (RFC 9449 section 7.1).
pub(super) const DPOP_CHALLENGE_INVALID: &str =
    r#"DPoP algs="EdDSA ES256", error="invalid_dpop_proof""#;
/// The challenge when a proof lacked a fresh nonce (RFC 9449 section 8).
pub(super) const DPOP_CHALLENGE_NONCE: &str = r#"DPoP algs="EdDSA ES256", error="use_dpop_nonce""#;

/// What a request presents as a device's credentials (`GET /v1/authz`, the front door).
pub(super) enum Presented<'a> {
    /// No `Authorization` header, or another scheme than Bearer or DPoP.
    Nothing,
    /// One Bearer credential.
    Bearer(&'a str),
    /// One DPoP credential (RFC 9449 section 7.1): a bound token, with its proof in the
    /// `DPoP` header.
    Dpop(&'a str),
    /// Several `Authorization` headers, or one that is not visible ASCII: a proxy and
    /// gatehouse could read different ones, so none is taken.
    Unreadable,
}

pub(super) fn presented(headers: &HeaderMap) -> Presented<'_> {
    let mut values = headers.get_all(header::AUTHORIZATION).iter();
    let Some(value) = values.next() else {
        return Presented::Nothing;
    };
    if values.next().is_some() {
        return Presented::Unreadable;
    }
    let Ok(text) = value.to_str() else {
        return Presented::Unreadable;
    };
    let (scheme, token) = text.split_once(' ').unwrap_or((text, ""));
    if scheme.eq_ignore_ascii_case("bearer") {
        Presented::Bearer(token.trim())
    } else if scheme.eq_ignore_ascii_case("dpop") {
        Presented::Dpop(token.trim())
    } else {
        Presented::Nothing
    }
}

/// Whether a verified device token is used as its binding says (RFC 9449 section 7): a
/// token bound to a key (`cnf.jkt`) only as `Authorization: DPoP` with a proof by that
/// key for this request (`method`, one of `uris`, `ath` of the token); an unbound token
/// only as Bearer. The reason, for the client, when it is not.
pub(super) fn holder_checked(
    state: &AppState,
    verified: &Verified,
    token: &str,
    as_dpop: bool,
    proof: Result<Option<&str>, DpopError>,
    method: &str,
    uris: &[&str],
) -> Result<(), HolderRefused> {
    let refused = |message: &str| HolderRefused {
        use_nonce: false,
        message: message.to_string(),
    };
    let Some(cnf) = &verified.claims.cnf else {
        return if as_dpop {
            Err(refused(
                "this token is not bound to a key: present it without a DPoP proof (as Bearer)",
            ))
        } else {
            Ok(())
        };
    };
    if !as_dpop {
        return Err(refused(
            "this token is bound to a key (DPoP): present it with a DPoP proof by that key \
             (over HTTP: Authorization: DPoP and the DPoP header)",
        ));
    }
    let proof = proof
        .map_err(HolderRefused::from)?
        .ok_or_else(|| refused("a DPoP proof is required with this token"))?;
    let expected = Expected {
        method,
        uris,
        access_token: Some(token),
    };
    let jkt = state
        .services
        .proofs
        .check(proof, &expected)
        .map_err(HolderRefused::from)?;
    if jkt != cnf.jkt {
        return Err(DpopError::WrongKey.into());
    }
    Ok(())
}

/// Why a bound (or unbound) token was not used as its binding says.
#[derive(Debug)]
pub(super) struct HolderRefused {
    /// The proof lacked a fresh nonce (`use_dpop_nonce`): the answer carries one.
    pub(super) use_nonce: bool,
    pub(super) message: String,
}

impl From<DpopError> for HolderRefused {
    fn from(err: DpopError) -> Self {
        Self {
            use_nonce: err == DpopError::UseNonce,
            message: err.to_string(),
        }
    }
}

/// The 401 for a token not used as its binding says: a DPoP challenge with the RFC 9449
/// error, and the nonce to use when that was what was missing.
pub(super) fn holder_refusal(state: &AppState, refused: &HolderRefused) -> Response {
    let (code, challenge) = if refused.use_nonce {
        ("use_dpop_nonce", DPOP_CHALLENGE_NONCE)
    } else {
        ("invalid_dpop_proof", DPOP_CHALLENGE_INVALID)
    };
    let mut response =
        ApiError::new(StatusCode::UNAUTHORIZED, code, refused.message.clone()).into_response();
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static(challenge),
    );
    with_dpop_nonce(state, response)
}

const ADMIN_CHALLENGE: &str = r#"Bearer realm="gatehouse admin""#;
const INTROSPECT_CHALLENGE: &str = r#"Basic realm="gatehouse", Bearer realm="gatehouse admin""#;

fn authorization(parts: &Parts) -> Option<(&str, &str)> {
    let value = parts.headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, credentials) = value.split_once(' ')?;
    Some((scheme, credentials.trim()))
}

/// An admin caller: the request's origin with that admin as its actor (the admin token's
/// id, or `user:<name>` for a session opened with a password).
#[derive(Debug, Clone)]
pub(crate) struct Admin {
    pub(crate) origin: Origin,
}

/// A failed credential check: counted toward the `admin_login` policy and lockout,
/// and recorded as `login.failed`, before the 401 is sent.
pub(super) async fn credential_refused(
    state: &AppState,
    origin: &Origin,
    check: FailedCheck,
    challenge: &'static str,
    message: &'static str,
) -> Response {
    let services = &state.services;
    if let Some(ip) = origin.source
        && matches!(check, FailedCheck::AdminToken | FailedCheck::AdminPassword)
    {
        // The budget only counts failures; its refusals are answered before checking.
        let _ = services
            .limits
            .limit(PolicyId::AdminLogin, &Subject::ip(ip));
    }
    let event = Event::failure("login.failed").detail("method", check.as_str());
    if let Err(err) = services
        .lockout
        .record_failure(&services.limits, origin, check, event)
        .await
    {
        return ApiError::internal(&err).into_response();
    }
    Unauthorized::new(message, challenge).into_response()
}

/// The header a page sends its session's CSRF token in.
pub(crate) const CSRF_HEADER: &str = "x-csrf-token";

/// Whether a browser request comes from our own origin: `Sec-Fetch-Site` (when the
/// browser sends it) must be `same-origin` or `none`, and `Origin` (when sent) must name
/// this server's host. Non-browser clients send neither and pass; they cannot carry the
/// session cookie by accident either.
pub(super) fn same_origin(headers: &http::HeaderMap, uri: &http::Uri) -> Result<(), &'static str> {
    if let Some(site) = headers.get("sec-fetch-site")
        && !matches!(site.to_str(), Ok("same-origin" | "none"))
    {
        return Err("the request comes from another site (Sec-Fetch-Site)");
    }
    if let Some(origin) = headers.get(header::ORIGIN) {
        let host = headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .or_else(|| uri.authority().map(|a| a.as_str()));
        let origin_host = origin.to_str().ok().and_then(|o| {
            o.strip_prefix("https://")
                .or_else(|| o.strip_prefix("http://"))
        });
        match (origin_host, host) {
            (Some(o), Some(h)) if o.eq_ignore_ascii_case(h) => {}
            _ => return Err("the request's Origin is not this server"),
        }
    }
    Ok(())
}

/// A cross-site or token-less change with the session cookie: 403, audited.
async fn csrf_refused(state: &AppState, origin: &Origin, reason: &'static str) -> Response {
    state
        .services
        .audit
        .record_or_log(
            origin,
            Event::failure("csrf.refused").detail("reason", reason),
        )
        .await;
    ApiError::new(StatusCode::FORBIDDEN, "csrf", reason).into_response()
}

/// What a change made with the session cookie must show besides the cookie.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CsrfProof {
    /// Our own origin and the session's CSRF token: gatehouse's API.
    OriginAndToken,
    /// Our own origin (`Sec-Fetch-Site`, `Origin`): an app behind an `admin` route,
    /// which cannot know the token; the cookie is `SameSite=Strict` as well.
    Origin,
}

/// The admin behind the session cookie, if the request carries a live one.
async fn admin_from_session(
    parts: &Parts,
    state: &AppState,
    proof: CsrfProof,
) -> Result<Option<Admin>, Response> {
    let Some(cookie) = parts
        .headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(crate::admin_sessions::cookie_value)
    else {
        return Ok(None);
    };
    let Some(session) = state.services.admin_sessions.check(cookie) else {
        return Ok(None);
    };
    let identity = session.who.identity();
    let origin = origin_of(parts)
        .map_err(IntoResponse::into_response)?
        .as_actor(Actor::Admin(identity.clone()));
    if !parts.method.is_safe() {
        if let Err(reason) = same_origin(&parts.headers, &parts.uri) {
            return Err(csrf_refused(state, &origin, reason).await);
        }
        if proof == CsrfProof::Origin {
            return Ok(Some(Admin { origin }));
        }
        let presented = parts
            .headers
            .get(CSRF_HEADER)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        if !crate::admin_sessions::same_secret(presented, &session.csrf) {
            return Err(csrf_refused(
                state,
                &origin,
                "the CSRF token is missing or wrong (send it in X-CSRF-Token)",
            )
            .await);
        }
    }
    Ok(Some(Admin { origin }))
}

async fn admin_from(
    parts: &Parts,
    state: &AppState,
    challenge: &'static str,
) -> Result<Option<Admin>, Response> {
    admin_with(parts, state, challenge, CsrfProof::OriginAndToken).await
}

/// The admin calling an app behind an `admin` route: an admin token, or the session
/// cookie (a change then needs only our own origin). `Ok(None)`: no credential at all.
pub(super) async fn admin_for_app(
    parts: &Parts,
    state: &AppState,
) -> Result<Option<Admin>, Response> {
    admin_with(parts, state, ADMIN_CHALLENGE, CsrfProof::Origin).await
}

/// The 401 of an admin-only resource called without any credential.
pub(super) fn admin_required() -> Response {
    Unauthorized::new(
        "this needs an admin: an admin token (Authorization: Bearer gha_...) or a signed-in \
         admin UI session",
        ADMIN_CHALLENGE,
    )
    .into_response()
}

async fn admin_with(
    parts: &Parts,
    state: &AppState,
    challenge: &'static str,
    proof: CsrfProof,
) -> Result<Option<Admin>, Response> {
    let Some((scheme, credentials)) = authorization(parts) else {
        return admin_from_session(parts, state, proof).await;
    };
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Ok(None);
    }
    let origin = origin_of(parts).map_err(IntoResponse::into_response)?;
    if let Some(ip) = origin.source
        && let Err(limited) = state
            .services
            .limits
            .has_budget(PolicyId::AdminLogin, &Subject::ip(ip))
    {
        return Err(too_many(&limited.decision, &limited.policy));
    }
    match state.services.admin_tokens.verify(credentials) {
        Ok(token_id) => {
            let origin = origin.as_actor(Actor::Admin(token_id.clone()));
            state.services.admin_tokens.note_used(&token_id, &origin);
            Ok(Some(Admin { origin }))
        }
        // The check itself failed (the store cannot be read): no verdict on the
        // token, so no failure is counted against the caller.
        Err(err @ AdminTokenError::Store(_)) => Err(ApiError::from(err).into_response()),
        Err(err) => {
            tracing::debug!(error = %err, "admin token refused");
            Err(credential_refused(
                state,
                &origin,
                FailedCheck::AdminToken,
                challenge,
                "the admin token is invalid or revoked",
            )
            .await)
        }
    }
}

impl FromRequestParts<AppState> for Admin {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Response> {
        admin_from(parts, state, ADMIN_CHALLENGE)
            .await?
            .ok_or_else(|| {
                Unauthorized::new(
                    "this endpoint needs an admin token: Authorization: Bearer gha_...",
                    ADMIN_CHALLENGE,
                )
                .into_response()
            })
    }
}

/// A caller allowed to introspect: an admin, or a registered client. Its
/// `introspection` budget (per client; per address for an admin) is spent here.
#[derive(Debug, Clone)]
pub(crate) enum Introspector {
    Admin,
    Client,
}

const INTROSPECT_REFUSED: &str =
    "introspection needs client credentials (HTTP Basic) or an admin token";

impl FromRequestParts<AppState> for Introspector {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Response> {
        let limits = &state.services.limits;
        // The refusal, if `subject` has no introspection budget left.
        let spend = |subject: Subject| -> Option<Response> {
            limits
                .limit(PolicyId::Introspection, &subject)
                .err()
                .map(|limited| too_many(&limited.decision, &limited.policy))
        };
        if let Some(admin) = admin_from(parts, state, INTROSPECT_CHALLENGE).await? {
            if let Some(refusal) = admin.origin.source.and_then(|ip| spend(Subject::ip(ip))) {
                return Err(refusal);
            }
            return Ok(Self::Admin);
        }
        let refused =
            || Unauthorized::new(INTROSPECT_REFUSED, INTROSPECT_CHALLENGE).into_response();
        let (scheme, credentials) = authorization(parts).ok_or_else(refused)?;
        if !scheme.eq_ignore_ascii_case("basic") {
            return Err(refused());
        }
        let decoded = data_encoding::BASE64
            .decode(credentials.as_bytes())
            .ok()
            .and_then(|bytes| String::from_utf8(bytes).ok());
        // RFC 6749 section 2.3.1: the id and the secret are form-encoded, then joined.
        let form_decoded = |part: &str| -> String {
            form_urlencoded::parse(format!("v={part}").as_bytes())
                .next()
                .map(|(_, value)| value.into_owned())
                .unwrap_or_default()
        };
        let verified = decoded
            .as_deref()
            .and_then(|text| text.split_once(':'))
            .map(|(id, secret)| {
                state
                    .services
                    .clients
                    .verify(&form_decoded(id), &form_decoded(secret))
            });
        match verified {
            Some(Ok(id)) => match spend(Subject::Client(id)) {
                Some(refusal) => Err(refusal),
                None => Ok(Self::Client),
            },
            // The check itself failed: no verdict, no failure counted.
            Some(Err(err @ crate::clients::ClientError::Store(_))) => {
                Err(ApiError::from(err).into_response())
            }
            failed => {
                if let Some(Err(err)) = failed {
                    tracing::debug!(error = %err, "client credentials refused");
                }
                let origin = origin_of(parts).map_err(IntoResponse::into_response)?;
                Err(credential_refused(
                    state,
                    &origin,
                    FailedCheck::ClientCredential,
                    INTROSPECT_CHALLENGE,
                    INTROSPECT_REFUSED,
                )
                .await)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// What the generic form decoder (axum's `Form`, serde_urlencoded) makes of a body.
    #[derive(Debug, serde::Deserialize)]
    struct Reference {
        token: String,
        #[serde(default)]
        #[allow(dead_code)]
        token_type_hint: Option<String>,
    }

    async fn reference(body: &'static [u8]) -> Option<String> {
        let request = Request::post("/")
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body(axum::body::Body::from(body))
            .unwrap();
        axum::Form::<Reference>::from_request(request, &())
            .await
            .ok()
            .map(|form| form.0.token)
    }

    /// The token form reads every body as the generic decoder does: the same token, or
    /// a refusal where it refuses.
    #[tokio::test]
    async fn the_token_form_agrees_with_the_generic_decoder() {
        let bodies: &[&'static [u8]] = &[
            b"token=eyJhbGciOiJFZERTQSJ9.eyJzdWIiOiJ4In0.c2ln",
            b"token=abc&token_type_hint=access_token",
            b"token_type_hint=refresh_token&token=abc&client_id=x",
            b"token=a%2Eb%20c",
            b"token=a+b",
            b"token=%E2%82%AC",
            b"token=%FF%FE",
            b"token=\xff",
            b"token=",
            b"token",
            b"&&token=abc&&",
            b"token=a=b",
            b"tok%65n=abc",
            b"",
            b"client_id=x",
            b"token=a&token=b",
            b"token=a&token_type_hint=x&token_type_hint=y",
            b"token=%zz",
        ];
        for body in bodies {
            let ours = parse_token_form(body).map(|form| form.token).ok();
            assert_eq!(
                ours,
                reference(body).await,
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }
}
