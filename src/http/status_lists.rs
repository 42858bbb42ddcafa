//! `GET /v1/statuslists/{list}`: a token status list (draft-ietf-oauth-status-list), the
//! signed `statuslist+jwt` an app that verifies tokens offline fetches to see which of
//! them are revoked. Public, like the JWKS: a list says only which indices are revoked.

use axum::Router;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use http::{HeaderValue, StatusCode, header};

use super::AppState;
use super::error::ApiError;
use crate::status_list::STATUS_LIST_MEDIA_TYPE;

/// This resource's routes.
pub(super) fn routes() -> Router<AppState> {
    Router::new().route("/v1/statuslists/{list}", get(list))
}

/// A list's number as its URI spells it: decimal, no sign, no leading zero, so that one
/// list has one URI (and one entry in any cache on the way); at most 20 digits. `None`
/// when it is not spelt so; `Some(None)` when it is, but above any list there can be.
fn parse_list(text: &str) -> Option<Option<u64>> {
    let canonical = !text.is_empty()
        && text.len() <= 20
        && text.bytes().all(|b| b.is_ascii_digit())
        && (text == "0" || !text.starts_with('0'));
    canonical.then(|| text.parse().ok())
}

async fn list(
    State(state): State<AppState>,
    Path(list): Path<String>,
) -> Result<Response, ApiError> {
    let Some(number) = parse_list(&list) else {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "a status list is named by its number in decimal, as the token's status.status_list.uri gives it",
        ));
    };
    let Some(number) = number else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no status list {list}: no token names it"),
        ));
    };
    let served = state.services.tokens.status_lists().serve(number).await?;
    let mut response = (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static(STATUS_LIST_MEDIA_TYPE),
        )],
        served.token.to_string(),
    )
        .into_response();
    // `private`: a shared cache on the way would keep it for `ttl` and the app then
    // for another `ttl`, twice the bound `tokens.status_list_ttl` promises.
    let cache = format!("private, max-age={}", served.ttl.as_secs());
    if let Ok(value) = HeaderValue::from_str(&cache) {
        response.headers_mut().insert(header::CACHE_CONTROL, value);
    }
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_canonical_decimal_names_a_list() {
        assert_eq!(parse_list("0"), Some(Some(0)));
        assert_eq!(parse_list("17"), Some(Some(17)));
        assert_eq!(parse_list("17592186044415"), Some(Some(17_592_186_044_415)));
        assert_eq!(parse_list("18446744073709551615"), Some(Some(u64::MAX)));
        // Spelt right, but past any number: no such list, not a bad request.
        assert_eq!(parse_list("99999999999999999999"), Some(None));
        for bad in [
            "",
            "01",
            "-1",
            "+1",
            "1.0",
            "0x1",
            "1 ",
            "100000000000000000000",
            "١",
        ] {
            assert_eq!(parse_list(bad), None, "{bad:?}");
        }
    }
}
