//! The front door: gatehouse in front of the app. Owns where requests gatehouse does not
//! answer go (`upstream.url`: `http://HOST:PORT` or `unix:/PATH`), the pooled connections
//! to it, what a forwarded request carries and how the app's failures read.
//!
//! What the app receives: the request as the client sent it (method, path and query
//! unchanged, body streamed), minus the hop-by-hop headers (RFC 9110 section 7.6.1, and
//! any header the `Connection` header names) and minus every header named
//! `X-Gatehouse-*` the client sent, plus `X-Gatehouse-Device-Id` (the token's `sub`),
//! `X-Forwarded-For` (the client's real address), `X-Forwarded-Proto`,
//! `X-Forwarded-Host` and `X-Request-Id`. The answer is streamed back, minus its
//! hop-by-hop headers. An app that cannot be reached is a 502, one that sends no answer
//! head within `upstream.response_timeout` a 504.
//!
//! Deciding who may pass is not this module's job: the HTTP layer verifies the device's
//! token and hands over the device id. This module must not know axum's state or tokens.

mod body;
mod connect;
mod relay;
mod routes;

pub(crate) use relay::{BEARER_PROTOCOL, Credential, Limits, READ_BUFFER_BYTES, relay};
pub(crate) use routes::{Target, ambiguous};

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, Uri, Version};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use crate::config::Route;
use crate::error_kind::{Classify, ErrorKind};
use crate::ids::DeviceId;
use crate::live::MessageBudget;

pub(crate) use crate::config::Upstream;
use connect::UpstreamConnector;

/// Where the apps are and how long to wait for them (`upstream.*`, `[[routes]]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct UpstreamConfig {
    /// `upstream.url`: where requests no route names go, as a device route for `/`.
    pub(crate) upstream: Option<Upstream>,
    pub(crate) routes: Vec<Route>,
    pub(crate) connect_timeout: Duration,
    pub(crate) response_timeout: Duration,
    /// The longest silence while a body streams between client and app, either way.
    pub(crate) idle_timeout: Duration,
    /// Whether requests for the app carry a signed assertion (`X-Gatehouse-Assertion`).
    pub(crate) assertion: bool,
    /// Browser origins allowed to open a WebSocket to the app (`cors.allowed_origins`).
    pub(crate) allowed_origins: Vec<String>,
    /// The largest client message on a relayed WebSocket, and its longest life.
    pub(crate) ws_max_message: usize,
    pub(crate) ws_max_duration: Duration,
    /// Messages a device may send a second through its relayed sockets together.
    pub(crate) ws_messages_per_second: u32,
    /// Relayed sockets one device may hold open at once.
    pub(crate) ws_max_connections_per_device: usize,
}

/// Set on every response that came from the app, so that gatehouse's own error
/// rendering and API headers leave it as the app wrote it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Proxied;

#[derive(Debug, thiserror::Error)]
pub(crate) enum FrontError {
    #[error("the app behind gatehouse cannot be reached")]
    Unreachable(String),
    #[error("the app behind gatehouse did not answer in time")]
    Timeout,
    #[error("the request cannot be forwarded: {0}")]
    BadRequest(&'static str),
    #[error("the path has {0}, which gatehouse and the app could read differently")]
    AmbiguousPath(&'static str),
    #[error("this device has {0} relayed WebSockets open, the most allowed")]
    TooManySockets(usize),
}

impl Classify for FrontError {
    fn kind(&self) -> ErrorKind {
        match self {
            Self::Unreachable(_) => ErrorKind::Upstream,
            Self::Timeout => ErrorKind::UpstreamTimeout,
            Self::BadRequest(_) | Self::AmbiguousPath(_) => ErrorKind::Invalid,
            Self::TooManySockets(_) => ErrorKind::RateLimited,
        }
    }
}

/// Who a request comes from, as the HTTP layer established it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Who {
    /// A paired device, by its verified access token.
    Device(DeviceId),
    /// An admin, by admin token (its id) or session (`user:<name>`).
    Admin(String),
    /// Nobody in particular: a `public` route.
    Anyone,
}

/// A request's caller: who, from where, over what.
#[derive(Debug, Clone)]
pub(crate) struct Caller {
    pub(crate) who: Who,
    /// The client's real address (behind a trusted proxy, the one it forwarded).
    pub(crate) address: IpAddr,
    /// `https` when the client reached gatehouse over TLS.
    pub(crate) scheme: &'static str,
    pub(crate) request_id: String,
    /// The signed assertion for the app, with `upstream.assertion`.
    pub(crate) assertion: Option<String>,
}

/// The front door: the route table, one pooled client per app.
#[derive(Debug, Clone)]
pub(crate) struct FrontDoor {
    /// In match order: host-bound routes first, then longer prefixes first.
    targets: Arc<[Target]>,
    config: Arc<UpstreamConfig>,
    /// Each device's message budget on relayed sockets, shared by its sockets.
    budgets: Arc<Mutex<HashMap<DeviceId, Arc<Mutex<MessageBudget>>>>>,
    /// Relayed sockets open now, by device.
    sockets: Arc<Mutex<HashMap<DeviceId, usize>>>,
}

/// Headers that describe one connection, not the message (RFC 9110 section 7.6.1, and
/// the older ones still seen).
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

const DEVICE_ID: HeaderName = HeaderName::from_static("x-gatehouse-device-id");
const ADMIN: HeaderName = HeaderName::from_static("x-gatehouse-admin");
const FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const ASSERTION: HeaderName = HeaderName::from_static("x-gatehouse-assertion");

/// Holds one of a device's relayed-socket places until dropped.
#[derive(Debug)]
pub(crate) struct SocketPlace {
    sockets: Arc<Mutex<HashMap<DeviceId, usize>>>,
    device: Option<DeviceId>,
}

impl Drop for SocketPlace {
    fn drop(&mut self) {
        let Some(device) = self.device else { return };
        let mut sockets = self.sockets.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(open) = sockets.get_mut(&device) {
            *open = open.saturating_sub(1);
            if *open == 0 {
                sockets.remove(&device);
            }
        }
    }
}

impl FrontDoor {
    pub(crate) fn new(config: UpstreamConfig) -> Self {
        let mut clients: HashMap<Upstream, Client<UpstreamConnector, Body>> = HashMap::new();
        let mut routes = config.routes.clone();
        if let Some(default) = &config.upstream
            && !routes.iter().any(|r| r.host.is_none() && r.path == "/")
        {
            routes.push(Route::catch_all(default.clone()));
        }
        let mut targets: Vec<Target> = routes
            .into_iter()
            .enumerate()
            .filter_map(|(position, route)| {
                let upstream = route.upstream.clone().or_else(|| config.upstream.clone())?;
                let client = clients
                    .entry(upstream.clone())
                    .or_insert_with(|| {
                        let connector =
                            UpstreamConnector::new(upstream.clone(), config.connect_timeout);
                        Client::builder(TokioExecutor::new())
                            // Idle connections to the app are kept a while and reused.
                            .pool_idle_timeout(Duration::from_secs(60))
                            .pool_max_idle_per_host(64)
                            .build(connector)
                    })
                    .clone();
                Some(Target::new(position, route, upstream, client))
            })
            .collect();
        targets.sort_by_key(|t| t.precedence());
        Self {
            targets: targets.into(),
            config: Arc::new(config),
            budgets: Arc::default(),
            sockets: Arc::default(),
        }
    }

    /// Every route, in match order.
    pub(crate) fn targets(&self) -> &[Target] {
        &self.targets
    }

    /// The route a request for `path` on `host` takes, if any: a route bound to the host
    /// before one for any host, the longest prefix first.
    pub(crate) fn route(&self, host: Option<&str>, path: &str) -> Option<&Target> {
        let host = host.map(routes::host_of);
        self.targets
            .iter()
            .find(|t| t.matches(host.as_deref(), path))
    }

    /// The route bound to `host` that takes `path`, if any: such a route goes before
    /// gatehouse's own paths on that host.
    pub(crate) fn host_route(&self, host: Option<&str>, path: &str) -> Option<&Target> {
        // Host-bound routes sort first: without one, no request pays for reading its host.
        self.targets.first()?.route.host.as_ref()?;
        let host = routes::host_of(host?);
        self.targets
            .iter()
            .find(|t| t.route.host.is_some() && t.matches(Some(&host), path))
    }

    /// The message budget of `device` on relayed sockets, shared by all of them.
    pub(crate) fn budget(&self, device: DeviceId) -> Arc<Mutex<MessageBudget>> {
        let mut budgets = self.budgets.lock().unwrap_or_else(|p| p.into_inner());
        // Budgets of devices with no socket left go as the map grows.
        if budgets.len() > 4096 {
            budgets.retain(|_, b| Arc::strong_count(b) > 1);
        }
        budgets
            .entry(device)
            .or_insert_with(|| {
                Arc::new(Mutex::new(MessageBudget::new(
                    self.config.ws_messages_per_second,
                )))
            })
            .clone()
    }

    /// A message budget for one socket alone (an admin's, or a public route's).
    pub(crate) fn budget_of_one(&self) -> Arc<Mutex<MessageBudget>> {
        Arc::new(Mutex::new(MessageBudget::new(
            self.config.ws_messages_per_second,
        )))
    }

    /// A relayed-socket place for `who`: a device has `upstream.ws_max_connections_per_device`.
    pub(crate) fn socket_place(&self, who: &Who) -> Result<SocketPlace, FrontError> {
        let Who::Device(device) = who else {
            return Ok(SocketPlace {
                sockets: self.sockets.clone(),
                device: None,
            });
        };
        let mut sockets = self.sockets.lock().unwrap_or_else(|p| p.into_inner());
        let open = sockets.entry(*device).or_insert(0);
        let most = self.config.ws_max_connections_per_device;
        if *open >= most {
            return Err(FrontError::TooManySockets(most));
        }
        *open += 1;
        Ok(SocketPlace {
            sockets: self.sockets.clone(),
            device: Some(*device),
        })
    }

    /// Relayed sockets open now, by device, most first.
    pub(crate) fn open_sockets(&self) -> Vec<(DeviceId, usize)> {
        let sockets = self.sockets.lock().unwrap_or_else(|p| p.into_inner());
        let mut open: Vec<(DeviceId, usize)> = sockets.iter().map(|(d, n)| (*d, *n)).collect();
        open.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        open
    }

    /// Whether requests for the app carry a signed assertion.
    pub(crate) fn asserts(&self) -> bool {
        self.config.assertion
    }

    /// The largest client message on a relayed WebSocket, and its longest life.
    pub(crate) fn ws_limits(&self) -> (usize, Duration) {
        (self.config.ws_max_message, self.config.ws_max_duration)
    }

    /// Whether a browser page from `origin` may open a WebSocket to the app: only the
    /// origins of `cors.allowed_origins` (or any, with `*`).
    pub(crate) fn origin_allowed(&self, origin: &str) -> bool {
        self.config
            .allowed_origins
            .iter()
            .any(|allowed| allowed == "*" || allowed.eq_ignore_ascii_case(origin))
    }

    /// The apps that cannot be reached now (no connection within
    /// `upstream.connect_timeout`), with the reason, for `/readyz` and the admin UI.
    pub(crate) async fn unreachable(&self) -> Vec<(Upstream, String)> {
        let mut upstreams: Vec<Upstream> =
            self.targets.iter().map(|t| t.upstream.clone()).collect();
        upstreams.sort_by_key(ToString::to_string);
        upstreams.dedup();
        let checks = upstreams.into_iter().map(|upstream| async move {
            let reached = connect::open(&upstream, self.config.connect_timeout).await;
            reached.err().map(|err| (upstream, err.to_string()))
        });
        futures_util::future::join_all(checks)
            .await
            .into_iter()
            .flatten()
            .collect()
    }

    /// Forwards `request` from `caller` to the app of `target` and streams its answer
    /// back.
    pub(crate) async fn forward(
        &self,
        target: &Target,
        request: Request<Body>,
        caller: &Caller,
    ) -> Result<Response<Body>, FrontError> {
        let (mut parts, body) = request.into_parts();
        let host = parts
            .headers
            .get(header::HOST)
            .cloned()
            .or_else(|| {
                parts
                    .uri
                    .authority()
                    .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
            })
            .ok_or(FrontError::BadRequest("it names no host"))?;
        let path = parts
            .uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_string();
        parts.uri = Uri::builder()
            .scheme("http")
            .authority(connect::authority(&target.upstream))
            .path_and_query(path)
            .build()
            .map_err(|_| FrontError::BadRequest("its path cannot be forwarded"))?;
        // The app speaks HTTP/1.1 to us whatever the client spoke to gatehouse.
        parts.version = Version::HTTP_11;
        strip_hop_by_hop(&mut parts.headers);
        strip_gatehouse_headers(&mut parts.headers);
        strip_credentials(&mut parts.headers, &caller.who);
        identify(&mut parts.headers, caller, host);

        // A body the client breaks off, frames wrongly or stops sending fails the
        // forwarding too; that is the client's fault (400), not the app's (502). The
        // wait for the app's answer starts once the body has all gone: a slow upload is
        // no slow app.
        let body_failed = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (ended, body_ended) = tokio::sync::oneshot::channel();
        let body =
            body::Guarded::request(body, self.config.idle_timeout, ended, body_failed.clone());
        let sent = target
            .client
            .request(Request::from_parts(parts, Body::new(body)));
        let response_timeout = self.config.response_timeout;
        let answer_due = async move {
            // Also when the body is dropped unfinished: the request has failed then.
            let _ = body_ended.await;
            tokio::time::sleep(response_timeout).await;
        };
        let answer = tokio::select! {
            sent = sent => sent,
            () = answer_due => return Err(FrontError::Timeout),
        };
        let answer = match answer {
            Err(_) if body_failed.load(std::sync::atomic::Ordering::Relaxed) => {
                return Err(FrontError::BadRequest("its body could not be read"));
            }
            Err(err) => {
                tracing::warn!(upstream = %target.upstream, error = %err, "the app could not be reached");
                return Err(FrontError::Unreachable(err.to_string()));
            }
            Ok(answer) => answer,
        };
        let (mut parts, body) = answer.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        parts.extensions.insert(Proxied);
        let body = body::Guarded::response(Body::new(body), self.config.idle_timeout);
        Ok(Response::from_parts(parts, Body::new(body)))
    }
}

/// Adds what gatehouse tells the app about a request: the host asked for, the device,
/// the client's address and scheme, and the request id.
fn identify(headers: &mut HeaderMap, caller: &Caller, host: HeaderValue) {
    headers.insert(header::HOST, host.clone());
    match &caller.who {
        Who::Device(device) => {
            headers.insert(DEVICE_ID, header_value(&device.to_string()));
        }
        Who::Admin(admin) => {
            headers.insert(ADMIN, header_value(admin));
        }
        Who::Anyone => {}
    }
    headers.insert(FORWARDED_FOR, header_value(&caller.address.to_string()));
    headers.insert(FORWARDED_PROTO, HeaderValue::from_static(caller.scheme));
    headers.insert(FORWARDED_HOST, host);
    headers.insert(REQUEST_ID, header_value(&caller.request_id));
    if let Some(assertion) = &caller.assertion {
        headers.insert(ASSERTION, header_value(assertion));
    }
}

/// Removes the hop-by-hop headers, and every header the `Connection` header names.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
    // `Upgrade` goes only with the WebSocket relay, which sets it itself.
    headers.remove(header::UPGRADE);
}

/// Removes every `X-Gatehouse-*` header: only gatehouse may say who a request is from.
fn strip_gatehouse_headers(headers: &mut HeaderMap) {
    let ours: Vec<HeaderName> = headers
        .keys()
        .filter(|name| name.as_str().starts_with("x-gatehouse-"))
        .cloned()
        .collect();
    for name in ours {
        headers.remove(name);
    }
}

/// Removes what proves who the caller is to gatehouse and is no business of the app's:
/// the admin UI's session cookie always, and an admin's `Authorization` header. A
/// device's bearer token goes on, so that an app may verify it again.
fn strip_credentials(headers: &mut HeaderMap, who: &Who) {
    if matches!(who, Who::Admin(_)) {
        headers.remove(header::AUTHORIZATION);
    }
    let name = crate::admin_sessions::COOKIE.as_bytes();
    if !headers
        .get_all(header::COOKIE)
        .iter()
        .any(|v| v.as_bytes().windows(name.len()).any(|w| w == name))
    {
        return;
    }
    let cookies: Vec<HeaderValue> = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|value| {
            let text = value.to_str().ok()?;
            let kept: Vec<&str> = text
                .split(';')
                .map(str::trim)
                .filter(|pair| {
                    pair.split_once('=')
                        .is_none_or(|(name, _)| name.trim() != crate::admin_sessions::COOKIE)
                })
                .filter(|pair| !pair.is_empty())
                .collect();
            (!kept.is_empty()).then(|| HeaderValue::from_str(&kept.join("; ")).ok())?
        })
        .collect();
    headers.remove(header::COOKIE);
    for cookie in cookies {
        headers.append(header::COOKIE, cookie);
    }
}

/// A header value from text gatehouse made (ids, addresses): always visible ASCII.
fn header_value(text: &str) -> HeaderValue {
    HeaderValue::from_str(text).unwrap_or_else(|_| HeaderValue::from_static(""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_and_client_sent_gatehouse_headers_are_removed() {
        let mut headers = HeaderMap::new();
        for (name, value) in [
            ("connection", "keep-alive, x-secret"),
            ("x-secret", "1"),
            ("keep-alive", "timeout=5"),
            ("transfer-encoding", "chunked"),
            ("te", "trailers"),
            ("upgrade", "h2c"),
            ("x-gatehouse-device-id", "dev_forged"),
            ("X-Gatehouse-Anything", "x"),
            ("x-app", "kept"),
        ] {
            headers.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap_or(header::ACCEPT),
                HeaderValue::from_static(value),
            );
        }
        strip_hop_by_hop(&mut headers);
        strip_gatehouse_headers(&mut headers);
        let left: Vec<&str> = headers.keys().map(HeaderName::as_str).collect();
        assert_eq!(left, ["x-app"]);
    }

    #[test]
    fn the_session_cookie_never_reaches_the_app_nor_an_admin_token() {
        let mut headers = HeaderMap::new();
        headers.append(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer gha_x"),
        );
        headers.append(
            header::COOKIE,
            HeaderValue::from_static("a=1; __Host-gatehouse_session=secret; b=2"),
        );
        headers.append(
            header::COOKIE,
            HeaderValue::from_static("__Host-gatehouse_session=secret"),
        );
        let mut device = headers.clone();
        strip_credentials(&mut device, &Who::Device(DeviceId::from_bytes([1; 16])));
        assert!(device.contains_key(header::AUTHORIZATION));
        let cookies: Vec<&HeaderValue> = device.get_all(header::COOKIE).iter().collect();
        assert_eq!(cookies, [&HeaderValue::from_static("a=1; b=2")]);
        strip_credentials(&mut headers, &Who::Admin("user:ann".into()));
        assert!(!headers.contains_key(header::AUTHORIZATION));
    }
}
