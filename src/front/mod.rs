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

mod connect;
mod relay;

pub(crate) use relay::{BEARER_PROTOCOL, Limits, relay};

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, Uri, Version};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use crate::error_kind::{Classify, ErrorKind};
use crate::ids::DeviceId;
use crate::live::MessageBudget;

pub(crate) use crate::config::Upstream;
use connect::UpstreamConnector;

/// Where the app is and how long to wait for it (`upstream.*`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct UpstreamConfig {
    pub(crate) upstream: Upstream,
    pub(crate) connect_timeout: Duration,
    pub(crate) response_timeout: Duration,
    /// Browser origins allowed to open a WebSocket to the app (`cors.allowed_origins`).
    pub(crate) allowed_origins: Vec<String>,
    /// The largest client message on a relayed WebSocket, and its longest life.
    pub(crate) ws_max_message: usize,
    pub(crate) ws_max_duration: Duration,
    /// Messages a device may send a second through its relayed sockets together.
    pub(crate) ws_messages_per_second: u32,
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
}

impl Classify for FrontError {
    fn kind(&self) -> ErrorKind {
        match self {
            Self::Unreachable(_) => ErrorKind::Upstream,
            Self::Timeout => ErrorKind::UpstreamTimeout,
            Self::BadRequest(_) => ErrorKind::Invalid,
        }
    }
}

/// Who a request comes from, as the HTTP layer established it.
#[derive(Debug, Clone)]
pub(crate) struct Caller {
    pub(crate) device: DeviceId,
    /// The client's real address (behind a trusted proxy, the one it forwarded).
    pub(crate) address: IpAddr,
    /// `https` when the client reached gatehouse over TLS.
    pub(crate) scheme: &'static str,
    pub(crate) request_id: String,
}

/// The front door: one pooled client to the app.
#[derive(Debug, Clone)]
pub(crate) struct FrontDoor {
    client: Client<UpstreamConnector, Body>,
    config: UpstreamConfig,
    /// Each device's message budget on relayed sockets, shared by its sockets.
    budgets: Arc<Mutex<HashMap<DeviceId, Arc<Mutex<MessageBudget>>>>>,
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
const FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

impl FrontDoor {
    pub(crate) fn new(config: UpstreamConfig) -> Self {
        let connector = UpstreamConnector::new(config.upstream.clone(), config.connect_timeout);
        let client = Client::builder(TokioExecutor::new())
            // Idle connections to the app are kept a while and reused.
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(64)
            .build(connector);
        Self {
            client,
            config,
            budgets: Arc::default(),
        }
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

    /// Whether a connection to the app opens now (within `upstream.connect_timeout`),
    /// for `/readyz`: a front door whose app is down cannot serve its traffic.
    pub(crate) async fn reachable(&self) -> std::io::Result<()> {
        let mut connector =
            UpstreamConnector::new(self.config.upstream.clone(), self.config.connect_timeout);
        tower::Service::call(&mut connector, Uri::from_static("http://localhost/"))
            .await
            .map(drop)
    }

    /// Forwards `request` from `caller` to the app and streams its answer back.
    pub(crate) async fn forward(
        &self,
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
            .authority(connect::authority(&self.config.upstream))
            .path_and_query(path)
            .build()
            .map_err(|_| FrontError::BadRequest("its path cannot be forwarded"))?;
        // The app speaks HTTP/1.1 to us whatever the client spoke to gatehouse.
        parts.version = Version::HTTP_11;
        strip_hop_by_hop(&mut parts.headers);
        strip_gatehouse_headers(&mut parts.headers);
        identify(&mut parts.headers, caller, host);

        // A body the client breaks off or frames wrongly fails the forwarding too; that is
        // the client's fault (400), not the app's (502).
        let body_failed = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = body_failed.clone();
        let body = Body::new(http_body_util::BodyExt::map_err(body, move |err| {
            flag.store(true, std::sync::atomic::Ordering::Relaxed);
            err
        }));
        let sent = self.client.request(Request::from_parts(parts, body));
        let answer = match tokio::time::timeout(self.config.response_timeout, sent).await {
            Err(_) => return Err(FrontError::Timeout),
            Ok(Err(_)) if body_failed.load(std::sync::atomic::Ordering::Relaxed) => {
                return Err(FrontError::BadRequest("its body could not be read"));
            }
            Ok(Err(err)) => {
                tracing::warn!(upstream = %self.config.upstream, error = %err, "the app could not be reached");
                return Err(FrontError::Unreachable(err.to_string()));
            }
            Ok(Ok(answer)) => answer,
        };
        let (mut parts, body) = answer.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        parts.extensions.insert(Proxied);
        Ok(Response::from_parts(parts, Body::new(body)))
    }
}

/// Adds what gatehouse tells the app about a request: the host asked for, the device,
/// the client's address and scheme, and the request id.
fn identify(headers: &mut HeaderMap, caller: &Caller, host: HeaderValue) {
    headers.insert(header::HOST, host.clone());
    headers.insert(DEVICE_ID, header_value(&caller.device.to_string()));
    headers.insert(FORWARDED_FOR, header_value(&caller.address.to_string()));
    headers.insert(FORWARDED_PROTO, HeaderValue::from_static(caller.scheme));
    headers.insert(FORWARDED_HOST, host);
    headers.insert(REQUEST_ID, header_value(&caller.request_id));
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
}
