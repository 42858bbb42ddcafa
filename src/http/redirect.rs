//! The plain-HTTP listener (port 80 with a domain): every request is sent to HTTPS with
//! a 308, nothing else is served.
//!
//! The target host is the request's `Host` only when it is one of the configured domains;
//! any other (or none) goes to the first domain, so the redirect cannot be pointed at a
//! host of an attacker's choosing. Without domains, a `Host` that is a plain name or
//! address is kept. ACME's HTTP-01 is not offered: validation is TLS-ALPN-01 on the HTTPS
//! port, so `/.well-known/acme-challenge/` gets a 404 like any unknown challenge.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use http::{StatusCode, header};

use crate::config::Config;

#[derive(Debug)]
struct Target {
    domains: Vec<String>,
    /// `:port` when HTTPS is not on 443.
    port_suffix: String,
}

/// The redirecting router for `config`, whose HTTPS listener is `https_addr`.
pub(crate) fn router(config: &Config, https_addr: SocketAddr) -> Router {
    let target = Arc::new(Target {
        domains: config.tls.domains.clone(),
        port_suffix: match https_addr.port() {
            443 => String::new(),
            port => format!(":{port}"),
        },
    });
    Router::new()
        .fallback(redirect)
        .with_state(target)
        .layer(axum::middleware::from_fn(
            |request: Request, next: axum::middleware::Next| async move {
                let mut response = next.run(request).await;
                let headers = response.headers_mut();
                headers.insert(
                    header::X_CONTENT_TYPE_OPTIONS,
                    http::HeaderValue::from_static("nosniff"),
                );
                headers.insert(
                    header::REFERRER_POLICY,
                    http::HeaderValue::from_static("no-referrer"),
                );
                response
            },
        ))
}

async fn redirect(State(target): State<Arc<Target>>, request: Request) -> Response {
    let path = request
        .uri()
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    if path.starts_with("/.well-known/acme-challenge/") {
        return (StatusCode::NOT_FOUND, "HTTP-01 is not offered; use HTTPS\n").into_response();
    }
    let asked = request
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(host_without_port)
        .map(str::to_ascii_lowercase);
    let host = match (asked, target.domains.first()) {
        (Some(asked), _) if target.domains.contains(&asked) => asked,
        (_, Some(first)) => first.clone(),
        (Some(asked), None) if is_plain_host(&asked) => asked,
        _ => {
            return (
                StatusCode::BAD_REQUEST,
                "a Host header naming this server is required; use HTTPS\n",
            )
                .into_response();
        }
    };
    let location = format!("https://{host}{}{path}", target.port_suffix);
    match http::HeaderValue::try_from(location) {
        Ok(location) => (
            StatusCode::PERMANENT_REDIRECT,
            [(header::LOCATION, location)],
            "use HTTPS\n",
        )
            .into_response(),
        Err(_) => (StatusCode::BAD_REQUEST, "a bad request target\n").into_response(),
    }
}

fn host_without_port(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        // [v6]:port keeps its brackets.
        return match rest.find(']') {
            Some(end) => &host[..end + 2],
            None => host,
        };
    }
    host.rsplit_once(':').map_or(host, |(name, _)| name)
}

/// A DNS name, an IPv4 address or a bracketed IPv6 address: nothing that could change
/// the URL's shape.
fn is_plain_host(host: &str) -> bool {
    if let Some(inner) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        return inner.parse::<std::net::Ipv6Addr>().is_ok();
    }
    !host.is_empty()
        && host.len() <= 253
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_lose_their_port_only() {
        assert_eq!(host_without_port("a.example:80"), "a.example");
        assert_eq!(host_without_port("a.example"), "a.example");
        assert_eq!(host_without_port("[::1]:80"), "[::1]");
        assert_eq!(host_without_port("[::1]"), "[::1]");
    }

    #[test]
    fn only_plain_hosts_are_kept() {
        assert!(is_plain_host("a.example"));
        assert!(is_plain_host("127.0.0.1"));
        assert!(is_plain_host("[::1]"));
        for bad in ["", "evil.example/x", "a@b", "[zz]", "a b"] {
            assert!(!is_plain_host(bad), "{bad}");
        }
    }
}
