//! The admin web UI under `/admin/`: three static files compiled into the binary
//! (`ui/index.html`, `ui/app.js`, `ui/app.css`), served as they are.
//!
//! The page holds no secret and no data: it signs in with `/v1/session` and then calls
//! the same JSON API as any admin client, with the session cookie and the CSRF token.
//! Opened as `/admin/#setup=<admin token>` (the link the first start prints with the
//! bootstrap token), it offers to create the first admin user (`POST /v1/admin-users`
//! with that token); the token travels in the fragment, which no request carries.
//! These responses carry their own Content-Security-Policy (scripts, styles and
//! connections to this origin only; no inline code, no eval), which the security-headers
//! middleware keeps. This module must not read state or serve anything but these files.

use axum::Router;

use super::AppState;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use http::header::{self, HeaderValue};

/// This resource's routes.
pub(super) fn routes() -> Router<AppState> {
    Router::new()
        .route("/admin", get(redirect))
        .route("/admin/", get(index))
        .route("/admin/device", get(index))
        .route("/admin/app.js", get(script))
        .route("/admin/app.css", get(style))
}

/// The page's policy: only our own script, style and API; images may be `data:` URIs.
pub(crate) const UI_CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     img-src 'self' data:; connect-src 'self'; form-action 'self'; \
     frame-ancestors 'none'; base-uri 'none'";

const INDEX_HTML: &str = include_str!("ui/index.html");
const APP_JS: &str = include_str!("ui/app.js");
const APP_CSS: &str = include_str!("ui/app.css");

/// One embedded file with its type, revalidated on every load (`no-cache`) so an
/// upgraded binary serves its new UI at once.
fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
            (
                header::CONTENT_SECURITY_POLICY,
                HeaderValue::from_static(UI_CSP),
            ),
        ],
        body,
    )
        .into_response()
}

/// `GET /admin`: the UI lives under `/admin/`, so relative links resolve there.
async fn redirect() -> Redirect {
    Redirect::permanent("/admin/")
}

/// `GET /admin/`: the page; also at `/admin/device`, the device grant's verification
/// URI (RFC 8628), where it opens on the page that approves a user code. Its relative
/// links resolve under `/admin/` from either.
async fn index() -> Response {
    asset("text/html; charset=utf-8", INDEX_HTML)
}

/// `GET /admin/app.js`: the page's one ES module.
async fn script() -> Response {
    asset("text/javascript; charset=utf-8", APP_JS)
}

/// `GET /admin/app.css`: the page's one style sheet.
async fn style() -> Response {
    asset("text/css; charset=utf-8", APP_CSS)
}

#[cfg(test)]
mod tests {
    use super::INDEX_HTML;
    use crate::admin_users::{MAX_PASSWORD_CHARS, MIN_PASSWORD_CHARS};

    #[test]
    fn the_setup_form_states_the_servers_password_rules() {
        for needed in [
            format!(
                r#"id="setup-password" name="password" type="password" autocomplete="new-password" minlength="{MIN_PASSWORD_CHARS}""#
            ),
            format!("At least {MIN_PASSWORD_CHARS} characters"),
            format!("at most {MAX_PASSWORD_CHARS} characters"),
        ] {
            assert!(INDEX_HTML.contains(&needed), "index.html lacks {needed}");
        }
    }
}
