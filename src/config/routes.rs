//! The front door's route table: `[[routes]]` in the config file. Each route sends the
//! requests under a path prefix (on one host, or on any) to an app, and says who may send
//! them: a paired device, an admin, or anyone (still limited per address).
//!
//! Read strictly: an unknown field, a path that could be read two ways, a route that
//! would take requests gatehouse answers itself (unless it is bound to a host of its
//! own), or two routes for the same host and path are errors that name the route.

use super::values::{Parser, Rate, RateSpec, Upstream, upstream_url};

/// Routes at most: each route's rate windows are stored under a policy number of its
/// own, 128 and up.
pub(crate) const MAX_ROUTES: usize = 100;

/// The paths gatehouse answers itself, as path prefixes that end at a `/`. A route
/// without a host must not cover any of them, nor lie under one.
pub(crate) const GATEHOUSE_PATHS: [&str; 6] = [
    "/v1",
    "/.well-known",
    "/admin",
    "/healthz",
    "/readyz",
    "/metrics",
];

/// Who may send a request down a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteAuth {
    /// A paired device's access token (`Authorization: Bearer`).
    Device,
    /// An admin token, or the admin UI's session cookie.
    Admin,
    /// Anyone; the per-address limit still applies.
    Public,
}

impl RouteAuth {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Device => "device",
            Self::Admin => "admin",
            Self::Public => "public",
        }
    }
}

/// One route of the table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// The path prefix, starting with `/`, without a trailing `/` (except `/` itself).
    pub(crate) path: String,
    /// The host the route is bound to, lower case, without a port; `None`: any host.
    pub(crate) host: Option<String>,
    /// Where its requests go; `None`: `upstream.url`.
    pub(crate) upstream: Option<Upstream>,
    pub(crate) auth: RouteAuth,
    /// Requests per window: per device for `device` routes, per address otherwise.
    pub(crate) rate: Rate,
}

impl Route {
    /// The route's name in errors, metrics and the admin UI: `host/path` or `path`.
    pub(crate) fn label(&self) -> String {
        match &self.host {
            Some(host) => format!("{host}{}", self.path),
            None => self.path.clone(),
        }
    }

    /// The route `upstream.url` stands for when no `[[routes]]` entry takes `/`: every
    /// path gatehouse does not answer, for a paired device.
    pub(crate) fn catch_all(upstream: Upstream) -> Self {
        Self {
            path: "/".into(),
            host: None,
            upstream: Some(upstream),
            auth: RouteAuth::Device,
            rate: Rate::Off,
        }
    }

    /// Whether a request for `path` falls under this route's prefix: the prefix itself,
    /// or below it at a `/`.
    pub(crate) fn covers(&self, path: &str) -> bool {
        under(&self.path, path)
    }
}

/// Whether `path` is `prefix` or lies below it at a segment boundary.
pub(crate) fn under(prefix: &str, path: &str) -> bool {
    prefix == "/"
        || path == prefix
        || path
            .strip_prefix(prefix)
            .is_some_and(|rest| rest.starts_with('/'))
}

/// Reads the `routes` array of the config file.
pub(super) fn parse(value: &toml::Value) -> Result<Vec<Route>, String> {
    let toml::Value::Array(items) = value else {
        return Err("`routes` is a list of tables: write each route as [[routes]]".into());
    };
    if items.len() > MAX_ROUTES {
        return Err(format!("{} routes; at most {MAX_ROUTES}", items.len()));
    }
    let mut routes: Vec<Route> = Vec::with_capacity(items.len());
    for (n, item) in items.iter().enumerate() {
        let route =
            parse_one(item).map_err(|e| format!("route {} ([[routes]] #{}): {e}", n + 1, n + 1))?;
        if let Some(same) = routes
            .iter()
            .find(|r| r.host == route.host && r.path == route.path)
        {
            return Err(format!(
                "route {} repeats the host and path of an earlier route ({})",
                n + 1,
                same.label()
            ));
        }
        routes.push(route);
    }
    Ok(routes)
}

fn parse_one(item: &toml::Value) -> Result<Route, String> {
    let toml::Value::Table(table) = item else {
        return Err("a route is a table with path, upstream, auth".into());
    };
    let text = |key: &str| -> Result<Option<&str>, String> {
        match table.get(key) {
            None => Ok(None),
            Some(toml::Value::String(s)) => Ok(Some(s.as_str())),
            Some(other) => Err(format!("`{key}` is a string, not a {}", other.type_str())),
        }
    };
    for key in table.keys() {
        if !["path", "host", "upstream", "auth", "rate"].contains(&key.as_str()) {
            return Err(format!(
                "unknown field `{key}`; a route has path, host, upstream, auth and rate"
            ));
        }
    }
    let path = route_path(text("path")?.ok_or("`path` is missing (a prefix such as \"/api\")")?)?;
    let host = text("host")?.map(route_host).transpose()?;
    let upstream = text("upstream")?.map(upstream_url).transpose()?;
    let auth = match text("auth")? {
        None => {
            return Err(
                "`auth` is missing: \"device\", \"admin\" or \"public\" (say it, so that no \
                 route is open by mistake)"
                    .into(),
            );
        }
        Some("device") => RouteAuth::Device,
        Some("admin") => RouteAuth::Admin,
        Some("public") => RouteAuth::Public,
        Some(other) => {
            return Err(format!(
                "`auth` {other:?}: expected \"device\", \"admin\" or \"public\""
            ));
        }
    };
    let rate = match text("rate")? {
        None => Rate::Off,
        Some(rate) => RateSpec
            .parse(rate)
            .map_err(|e| format!("`rate` {rate:?}: {e}"))?,
    };
    let route = Route {
        path,
        host,
        upstream,
        auth,
        rate,
    };
    if route.host.is_none()
        && route.path != "/"
        && let Some(ours) = GATEHOUSE_PATHS
            .iter()
            .find(|ours| under(&route.path, ours) || under(ours, &route.path))
    {
        return Err(format!(
            "path {:?} overlaps {ours}, which gatehouse answers itself, so one side would \
             shadow the other; bind the route to the app's own host (host = \
             \"app.example.com\") and serve gatehouse on another (auth.example.com)",
            route.path
        ));
    }
    Ok(route)
}

/// A route's path prefix: absolute, one reading only (no `.` or `..` segments, no empty
/// segments, no percent-encoding, no backslash), without a trailing `/`.
fn route_path(text: &str) -> Result<String, String> {
    let allowed = "a path prefix such as \"/api\": starting with /, without //, . or .. \
                   segments, %, \\, ?, # or spaces";
    if !text.starts_with('/')
        || text.len() > 1024
        || text.contains("//")
        || text
            .chars()
            .any(|c| c.is_control() || c.is_whitespace() || "%\\?#".contains(c))
        || text
            .split('/')
            .any(|segment| segment == "." || segment == "..")
    {
        return Err(format!("`path` {text:?}: expected {allowed}"));
    }
    let trimmed = text.trim_end_matches('/');
    Ok(if trimmed.is_empty() { "/" } else { trimmed }.to_string())
}

/// A route's host: a DNS name (letters, digits, `-`, `.`), lower case, no port.
fn route_host(text: &str) -> Result<String, String> {
    let host = text.trim().trim_end_matches('.').to_ascii_lowercase();
    let valid = !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        });
    if !valid {
        return Err(format!(
            "`host` {text:?}: expected a DNS name such as \"app.example.com\" (no port, no \
             scheme)"
        ));
    }
    Ok(host)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(text: &str) -> Result<Route, String> {
        let doc: toml::Table = toml::from_str(text).map_err(|e| e.to_string())?;
        parse(doc.get("routes").ok_or("no routes")?).map(|mut r| r.remove(0))
    }

    #[test]
    fn a_route_is_read_with_its_defaults() {
        let r = route(
            "[[routes]]\npath = \"/api/\"\nupstream = \"http://127.0.0.1:3000\"\nauth = \"device\"\n",
        );
        assert_eq!(
            r,
            Ok(Route {
                path: "/api".into(),
                host: None,
                upstream: Some(Upstream::Tcp("127.0.0.1:3000".into())),
                auth: RouteAuth::Device,
                rate: Rate::Off,
            })
        );
        let r = route(
            "[[routes]]\npath = \"/\"\nhost = \"App.Example.com.\"\nauth = \"public\"\nrate = \"10/1s\"\n",
        );
        assert_eq!(r.as_ref().map(|r| r.label()), Ok("app.example.com/".into()));
    }

    #[test]
    fn bad_routes_are_refused_with_the_reason() {
        for (text, says) in [
            ("path = \"/api\"", "`auth` is missing"),
            (
                "path = \"/api\"\nauth = \"everyone\"",
                "expected \"device\"",
            ),
            ("path = \"api\"\nauth = \"public\"", "`path`"),
            ("path = \"/a/../b\"\nauth = \"public\"", "`path`"),
            ("path = \"/a%2fb\"\nauth = \"public\"", "`path`"),
            ("path = \"/a//b\"\nauth = \"public\"", "`path`"),
            ("path = \"/v1/app\"\nauth = \"public\"", "overlaps /v1"),
            ("path = \"/admin\"\nauth = \"admin\"", "overlaps /admin"),
            (
                "path = \"/api\"\nauth = \"public\"\nport = 1",
                "unknown field `port`",
            ),
            (
                "path = \"/api\"\nauth = \"public\"\nhost = \"a b\"",
                "`host`",
            ),
            (
                "path = \"/api\"\nauth = \"public\"\nhost = \"a.example:443\"",
                "`host`",
            ),
            (
                "path = \"/api\"\nauth = \"public\"\nrate = \"fast\"",
                "`rate`",
            ),
            (
                "path = \"/api\"\nauth = \"public\"\nupstream = \"https://x:1\"",
                "plain http",
            ),
            ("path = 1\nauth = \"public\"", "`path` is a string"),
        ] {
            let result = route(&format!("[[routes]]\n{text}\n"));
            assert!(
                result.as_ref().is_err_and(|e| e.contains(says)),
                "{text}: {result:?}"
            );
        }
        // Bound to a host of its own, a route may take gatehouse's paths there.
        assert!(
            route("[[routes]]\npath = \"/v1\"\nhost = \"app.example\"\nauth = \"device\"\n")
                .is_ok()
        );
        let twice = "[[routes]]\npath = \"/a\"\nauth = \"public\"\n[[routes]]\npath = \"/a/\"\nauth = \"device\"\n";
        assert!(route(twice).is_err_and(|e| e.contains("repeats")));
    }

    #[test]
    fn prefixes_match_at_segment_boundaries() {
        assert!(under("/api", "/api"));
        assert!(under("/api", "/api/x"));
        assert!(!under("/api", "/apix"));
        assert!(under("/", "/anything"));
        assert!(!under("/admin", "/adm"));
    }
}
