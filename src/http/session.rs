//! `/v1/session`: signing in to the admin UI (with an admin token or a user name and
//! password), reading the session, signing out.
//!
//! Sign-in is a secret check like any other: refused attempts spend the `admin_login`
//! budget and count toward lockout, and are audited; the answer to a wrong name and a
//! wrong password is the same. A sign-in from another site is refused (login CSRF).

use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use serde::{Deserialize, Serialize};

use super::AppState;
use super::error::ApiError;
use super::extract::{Admin, ApiJson, RequestOrigin, credential_refused, same_origin};
use super::limits::too_many;
use crate::admin_sessions::{SessionView, SignedIn, clear_cookie, cookie_value, set_cookie};
use crate::audit::{Actor, Event};
use crate::clock::format_rfc3339;
use crate::ratelimit::{FailedCheck, PolicyId, Subject};

/// This resource's routes.
pub(super) fn routes() -> Router<AppState> {
    Router::new().route("/v1/session", post(sign_in).get(current).delete(sign_out))
}

const CHALLENGE: &str = r#"Bearer realm="gatehouse admin""#;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct SignIn {
    token: Option<String>,
    username: Option<String>,
    password: Option<String>,
}

#[derive(Debug, Serialize)]
pub(crate) struct SessionBody {
    admin: SignedIn,
    csrf_token: String,
    expires_at: String,
    idle_timeout_seconds: u64,
}

fn body(state: &AppState, view: SessionView) -> SessionBody {
    SessionBody {
        admin: view.who,
        csrf_token: view.csrf,
        expires_at: format_rfc3339(view.expires_at_ms),
        idle_timeout_seconds: state.services.admin_sessions.idle().as_secs(),
    }
}

fn no_store(response: &mut Response) {
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
}

async fn sign_in(
    State(state): State<AppState>,
    RequestOrigin(origin): RequestOrigin,
    headers: HeaderMap,
    uri: Uri,
    ApiJson(request): ApiJson<SignIn>,
) -> Response {
    let services = &state.services;
    if let Err(reason) = same_origin(&headers, &uri) {
        services
            .audit
            .record_or_log(
                &origin,
                Event::failure("csrf.refused").detail("reason", reason),
            )
            .await;
        return ApiError::new(StatusCode::FORBIDDEN, "csrf", reason).into_response();
    }
    if let Some(ip) = origin.source
        && let Err(limited) = services
            .limits
            .has_budget(PolicyId::AdminLogin, &Subject::ip(ip))
    {
        return too_many(&limited.decision, &limited.policy);
    }
    let (who, check) = match (&request.token, &request.username, &request.password) {
        (Some(token), None, None) => (
            match services.admin_tokens.verify(token) {
                Ok(id) => Some(SignedIn::AdminToken { id }),
                // The check itself failed: no verdict, no failure counted.
                Err(err @ crate::admin_tokens::AdminTokenError::Store(_)) => {
                    return ApiError::from(err).into_response();
                }
                Err(_) => None,
            },
            FailedCheck::AdminToken,
        ),
        (None, Some(user), Some(password)) => (
            match services.admin_users.verify(user, password).await {
                Ok(user) => Some(SignedIn::Password { user }),
                Err(err @ crate::admin_users::AdminUserError::Store(_)) => {
                    return ApiError::from(err).into_response();
                }
                Err(_) => None,
            },
            FailedCheck::AdminPassword,
        ),
        _ => {
            return ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "send either {\"token\"} or {\"username\", \"password\"}",
            )
            .into_response();
        }
    };
    let Some(who) = who else {
        return credential_refused(
            &state,
            &origin,
            check,
            CHALLENGE,
            "the credentials are wrong, or the token is revoked",
        )
        .await;
    };
    let origin = origin.as_actor(Actor::Admin(who.identity()));
    let method = match &who {
        SignedIn::AdminToken { .. } => "session_admin_token",
        SignedIn::Password { .. } => "session_password",
    };
    if let Err(err) = services
        .audit
        .record(
            &origin,
            Event::new("login.succeeded").detail("method", method),
        )
        .await
    {
        return ApiError::internal(&err).into_response();
    }
    let Some(session) = services.admin_sessions.start(who) else {
        return ApiError::internal(&"no randomness for a session id").into_response();
    };
    let max = services.admin_sessions.max();
    let mut response = (StatusCode::CREATED, Json(body(&state, session.view))).into_response();
    if let Ok(cookie) = HeaderValue::try_from(set_cookie(&session.cookie, max)) {
        response.headers_mut().insert(header::SET_COOKIE, cookie);
    }
    no_store(&mut response);
    response
}

fn session_cookie(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(cookie_value)
}

async fn current(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let session = session_cookie(&headers).and_then(|c| state.services.admin_sessions.check(c));
    match session {
        Some(view) => {
            let mut response = Json(body(&state, view)).into_response();
            no_store(&mut response);
            response
        }
        None => ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "no live session: sign in with POST /v1/session",
        )
        .into_response(),
    }
}

/// Ends the session (the extractor has checked its CSRF token and origin).
async fn sign_out(State(state): State<AppState>, admin: Admin, headers: HeaderMap) -> Response {
    if let Some(cookie) = session_cookie(&headers)
        && state.services.admin_sessions.end(cookie)
    {
        state
            .services
            .audit
            .record_or_log(&admin.origin, Event::new("logout"))
            .await;
    }
    let mut response = StatusCode::NO_CONTENT.into_response();
    if let Ok(clear) = HeaderValue::try_from(clear_cookie()) {
        response.headers_mut().insert(header::SET_COOKIE, clear);
    }
    no_store(&mut response);
    response
}
