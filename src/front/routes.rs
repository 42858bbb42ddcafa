//! Which route a request takes, and which paths no route may take: a path that the
//! app could read differently from gatehouse (dot segments, encoded slashes, a
//! backslash, an empty segment) is refused before any route is chosen, so that no
//! request reaches a route whose policy it skipped.

use axum::body::Body;
use hyper_util::client::legacy::Client;

use super::Upstream;
use super::connect::UpstreamConnector;
use crate::config::{Rate, Route, RouteAuth};
use crate::ratelimit::Policy;

/// A route with the app it goes to and the pooled client to that app.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    /// The route's place in `[[routes]]` (the implicit `upstream.url` route comes last).
    pub(crate) position: usize,
    pub(crate) route: Route,
    pub(crate) upstream: Upstream,
    pub(super) client: Client<UpstreamConnector, Body>,
    /// `route.label()`, made once.
    pub(crate) label: String,
    /// The route's own rate as a policy named after it (`route /api`), made once.
    pub(crate) rate: Option<Policy>,
}

impl Target {
    pub(super) fn new(
        position: usize,
        route: Route,
        upstream: Upstream,
        client: Client<UpstreamConnector, Body>,
    ) -> Self {
        let label = route.label();
        let rate = match route.rate {
            Rate::Off => None,
            Rate::Limit { requests, window } => {
                Some(Policy::new(&format!("route {label}"), requests, window))
            }
        };
        Self {
            position,
            label,
            rate,
            route,
            upstream,
            client,
        }
    }

    /// Sort key: host-bound routes first, then the longest prefix.
    pub(super) fn precedence(&self) -> (bool, std::cmp::Reverse<usize>) {
        (
            self.route.host.is_none(),
            std::cmp::Reverse(self.route.path.len()),
        )
    }

    /// Whether a request for `path` on `host` (lower case, no port) takes this route.
    pub(super) fn matches(&self, host: Option<&str>, path: &str) -> bool {
        let host_fits = match &self.route.host {
            None => true,
            Some(bound) => host == Some(bound.as_str()),
        };
        host_fits && self.route.covers(path)
    }

    pub(crate) fn auth(&self) -> RouteAuth {
        self.route.auth
    }
}

/// The host of a `Host` header or `:authority`, lower case, without port or final dot.
pub(super) fn host_of(authority: &str) -> String {
    let host = match authority.strip_prefix('[') {
        // An IPv6 literal keeps its brackets off; no route names one, so it matches none.
        Some(rest) => rest.split(']').next().unwrap_or_default(),
        None => authority.split(':').next().unwrap_or_default(),
    };
    host.trim_end_matches('.').to_ascii_lowercase()
}

/// Why `path` (without its query) could be read two ways, if it could: by the router here
/// and by the app, or by two apps. `None` for a path with one reading.
pub(crate) fn ambiguous(path: &str) -> Option<&'static str> {
    let lower = path.to_ascii_lowercase();
    if path.contains('\\') || lower.contains("%5c") {
        return Some("a backslash");
    }
    if lower.contains("%2f") {
        return Some("an encoded slash");
    }
    if lower.contains("%00") {
        return Some("an encoded NUL");
    }
    if path.contains("//") {
        return Some("an empty segment (//)");
    }
    // `.` and `..`, also percent-encoded (`%2e`), also with a `;parameter` as some
    // servers allow (`..;x`).
    let dot_segment = lower.split('/').any(|segment| {
        let bare = segment.split(';').next().unwrap_or_default();
        matches!(bare.replace("%2e", ".").as_str(), "." | "..")
    });
    dot_segment.then_some("a . or .. segment")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_with_two_readings_are_named() {
        for path in [
            "/a/../admin",
            "/%2e%2e/admin",
            "/%2E./x",
            "/a/./b",
            "/a/..;x/b",
            "//v1/keys",
            "/a%2Fb",
            "/a\\b",
            "/a%5cb",
            "/a%00b",
            "/a/..",
        ] {
            assert!(ambiguous(path).is_some(), "{path}");
        }
        for path in [
            "/",
            "/api/x",
            "/a.b/c..d",
            "/.well-known-ish",
            "/a%20b",
            "/..a",
        ] {
            assert_eq!(ambiguous(path), None, "{path}");
        }
    }

    #[test]
    fn hosts_are_compared_without_port_case_or_final_dot() {
        assert_eq!(host_of("App.Example.com:8443"), "app.example.com");
        assert_eq!(host_of("app.example.com."), "app.example.com");
        assert_eq!(host_of("[::1]:8443"), "::1");
    }
}
