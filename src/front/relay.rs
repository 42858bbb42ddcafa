//! The WebSocket relay: a client's socket, upgraded by gatehouse, joined to a socket that
//! gatehouse opens to the app, frames relayed both ways. gatehouse opens the app's socket
//! first, so that the subprotocol the app chose is the one the client is answered with.
//!
//! The relay ends, closing both sides, when either side closes, when the credential the
//! socket was opened with no longer stands after a revocation, or expires without being
//! renewed (the client gets 1008), or when the session has lasted its maximum.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::ws::{self, CloseFrame, Utf8Bytes, WebSocket};
use futures_util::{SinkExt, StreamExt};
use http::header::{self, HeaderValue};
use tokio::sync::watch;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::{self, handshake::client::generate_key};

use super::connect::{UpstreamStream, authority, open};
use super::{Caller, FrontDoor, FrontError};
use crate::live::MessageBudget;

/// The socket to the app, and the subprotocol it chose.
pub(crate) struct AppSocket {
    socket: WebSocketStream<UpstreamStream>,
    pub(crate) protocol: Option<String>,
}

impl std::fmt::Debug for AppSocket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppSocket")
            .field("protocol", &self.protocol)
            .finish()
    }
}

/// Why a relay ended, for the log and the audit record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ended {
    ClientClosed,
    AppClosed,
    Revoked,
    /// The credential expired and the client did not renew it.
    Expired,
    MaxDuration,
    /// The device spent its message budget (`upstream.ws_messages_per_second`).
    RateLimited,
    /// The client sent a message over `upstream.ws_max_message`.
    TooBig,
    /// The server is stopping.
    Shutdown,
}

impl Ended {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::ClientClosed => "client_closed",
            Self::AppClosed => "app_closed",
            Self::Revoked => "revoked",
            Self::Expired => "expired",
            Self::MaxDuration => "max_duration",
            Self::RateLimited => "rate_limited",
            Self::TooBig => "message_too_big",
            Self::Shutdown => "shutdown",
        }
    }
}

impl FrontDoor {
    /// Opens a WebSocket to the app of `target` at `path` for `caller`, offering `protocols` (the
    /// client's list without its bearer entries).
    pub(crate) async fn open_socket(
        &self,
        target: &super::Target,
        path: &str,
        caller: &Caller,
        host: &HeaderValue,
        protocols: &[String],
    ) -> Result<AppSocket, FrontError> {
        let uri = format!("ws://{}{path}", authority(&target.upstream));
        let mut request = http::Request::builder()
            .uri(uri)
            .body(())
            .map_err(|_| FrontError::BadRequest("its path cannot be forwarded"))?;
        let headers = request.headers_mut();
        headers.insert(header::HOST, host.clone());
        headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        headers.insert(
            header::SEC_WEBSOCKET_VERSION,
            HeaderValue::from_static("13"),
        );
        headers.insert(
            header::SEC_WEBSOCKET_KEY,
            super::header_value(&generate_key()),
        );
        if !protocols.is_empty() {
            headers.insert(
                header::SEC_WEBSOCKET_PROTOCOL,
                super::header_value(&protocols.join(", ")),
            );
        }
        super::strip_credentials(headers, &caller.who);
        super::identify(headers, caller, host.clone());
        let stream = open(&target.upstream, self.config.connect_timeout)
            .await
            .map_err(|err| FrontError::Unreachable(err.to_string()))?;
        let config = tungstenite::protocol::WebSocketConfig::default()
            .read_buffer_size(READ_BUFFER_BYTES)
            .write_buffer_size(0);
        let handshake = tokio_tungstenite::client_async_with_config(request, stream, Some(config));
        let (socket, response) =
            match tokio::time::timeout(self.config.response_timeout, handshake).await {
                Err(_) => return Err(FrontError::Timeout),
                Ok(Err(err)) => return Err(FrontError::Unreachable(err.to_string())),
                Ok(Ok(done)) => done,
            };
        let protocol = response
            .headers()
            .get(header::SEC_WEBSOCKET_PROTOCOL)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        Ok(AppSocket { socket, protocol })
    }
}

/// The credential a relayed socket was opened with, as the relay asks about it.
pub(crate) trait Credential: Send {
    /// Whether it still stands after a change (a revocation, a key change), its expiry
    /// aside.
    fn stands(&self) -> bool;
    /// At its expiry: how much longer the socket may stay, if the client renewed it
    /// meanwhile.
    fn renewed(&mut self) -> impl std::future::Future<Output = Option<Duration>> + Send;
}

/// What ends a relay besides its two sides.
pub(crate) struct Limits {
    /// Bumped on every revocation and key change.
    pub(crate) changes: watch::Receiver<u64>,
    /// Turns true when the server stops.
    pub(crate) closing: watch::Receiver<bool>,
    /// When the credential expires (`None`: it does not).
    pub(crate) expires_in: Option<Duration>,
    /// `upstream.ws_max_duration`.
    pub(crate) max: Duration,
    /// The device's message budget, shared by its relayed sockets.
    pub(crate) budget: Arc<Mutex<MessageBudget>>,
}

/// Relays frames between `client` and `app` until one of them closes, the credential no
/// longer stands after a change (a revocation, a key change) or expires unrenewed, the
/// message budget runs out, the maximum duration passes or the server stops.
pub(crate) async fn relay(
    mut client: WebSocket,
    app: AppSocket,
    limits: Limits,
    mut credential: impl Credential,
) -> Ended {
    let Limits {
        mut changes,
        mut closing,
        expires_in,
        max,
        budget,
    } = limits;
    let mut app = app.socket;
    // Without an expiry, the deadline comes first anyway.
    let expiry = tokio::time::sleep(expires_in.unwrap_or(max));
    let deadline = tokio::time::sleep(max);
    tokio::pin!(expiry, deadline);
    // A side that did not take a frame in time gets no close frame either: waiting for
    // it twice would only hold the relay longer.
    let (mut client_stuck, mut app_stuck) = (false, false);
    let ended = loop {
        tokio::select! {
            from_client = client.recv() => match from_client {
                Some(Err(err)) if too_big(&err) => break Ended::TooBig,
                None | Some(Err(_)) => break Ended::ClientClosed,
                Some(Ok(ws::Message::Close(frame))) => {
                    let frame = frame.map(|f| tungstenite::protocol::CloseFrame {
                        code: f.code.into(),
                        reason: f.reason.as_str().into(),
                    });
                    within(app.send(tungstenite::Message::Close(frame))).await;
                    break Ended::ClientClosed;
                }
                Some(Ok(message)) => {
                    let data = matches!(message, ws::Message::Text(_) | ws::Message::Binary(_));
                    if data
                        && !budget
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .spend(std::time::Instant::now())
                    {
                        break Ended::RateLimited;
                    }
                    if !within(app.send(to_app(message))).await {
                        app_stuck = true;
                        break Ended::AppClosed;
                    }
                }
            },
            from_app = app.next() => match from_app {
                None | Some(Err(_)) => break Ended::AppClosed,
                Some(Ok(tungstenite::Message::Close(frame))) => {
                    let frame = frame.map(|f| CloseFrame {
                        code: f.code.into(),
                        reason: Utf8Bytes::from(f.reason.as_str()),
                    });
                    within(client.send(ws::Message::Close(frame))).await;
                    return Ended::AppClosed;
                }
                Some(Ok(message)) => {
                    if let Some(message) = to_client(message)
                        && !within(client.send(message)).await
                    {
                        client_stuck = true;
                        break Ended::ClientClosed;
                    }
                }
            },
            Ok(()) = changes.changed() => {
                if !credential.stands() {
                    break Ended::Revoked;
                }
            }
            Ok(()) = closing.changed() => {
                if *closing.borrow() {
                    break Ended::Shutdown;
                }
            }
            () = &mut expiry => match credential.renewed().await {
                Some(more) => expiry.as_mut().reset(tokio::time::Instant::now() + more),
                None => break Ended::Expired,
            },
            () = &mut deadline => break Ended::MaxDuration,
        }
    };
    let (code, reason) = match ended {
        Ended::Revoked => (
            ws::close_code::POLICY,
            "the access token is no longer valid",
        ),
        Ended::Expired => (
            ws::close_code::POLICY,
            "the access token expired: refresh it and reconnect",
        ),
        Ended::RateLimited => (ws::close_code::POLICY, "too many messages; slow down"),
        Ended::TooBig => (
            ws::close_code::SIZE,
            "message too big (upstream.ws_max_message)",
        ),
        Ended::MaxDuration => (ws::close_code::AWAY, "the session lasted its maximum"),
        Ended::Shutdown => (ws::close_code::AWAY, "server shutting down"),
        Ended::ClientClosed | Ended::AppClosed => (ws::close_code::AWAY, "closed"),
    };
    if !client_stuck {
        within(client.send(ws::Message::Close(Some(CloseFrame {
            code,
            reason: Utf8Bytes::from_static(reason),
        }))))
        .await;
    }
    if !app_stuck {
        within(app.close(None)).await;
    }
    ended
}

/// Whether a read failed on a message or frame over the size limit.
fn too_big(err: &axum::Error) -> bool {
    matches!(
        std::error::Error::source(err).and_then(|e| e.downcast_ref::<tungstenite::Error>()),
        Some(tungstenite::Error::Capacity(_))
    )
}

/// How long a frame may wait to be taken by the other side: a peer that stops reading
/// must not hold the relay, and with it the revocation checks, for ever.
const SEND_TIMEOUT: Duration = Duration::from_secs(10);

/// Whether `send` completed within `SEND_TIMEOUT`.
async fn within<T, E>(send: impl std::future::Future<Output = Result<T, E>>) -> bool {
    matches!(tokio::time::timeout(SEND_TIMEOUT, send).await, Ok(Ok(_)))
}

fn to_app(message: ws::Message) -> tungstenite::Message {
    match message {
        ws::Message::Text(text) => tungstenite::Message::text(text.as_str()),
        ws::Message::Binary(bytes) => tungstenite::Message::Binary(bytes),
        ws::Message::Ping(bytes) => tungstenite::Message::Ping(bytes),
        ws::Message::Pong(bytes) => tungstenite::Message::Pong(bytes),
        // Handled before: a close ends the relay.
        ws::Message::Close(_) => tungstenite::Message::Close(None),
    }
}

fn to_client(message: tungstenite::Message) -> Option<ws::Message> {
    Some(match message {
        tungstenite::Message::Text(text) => ws::Message::Text(Utf8Bytes::from(text.as_str())),
        tungstenite::Message::Binary(bytes) => ws::Message::Binary(bytes),
        tungstenite::Message::Ping(bytes) => ws::Message::Ping(bytes),
        tungstenite::Message::Pong(bytes) => ws::Message::Pong(bytes),
        tungstenite::Message::Close(_) | tungstenite::Message::Frame(_) => return None,
    })
}

/// The initial read buffer of each side of a relay: small, so that an idle relayed
/// socket costs little (the default, 128 KiB a side, is zero-filled and so resident); it
/// grows for large messages. Writes go out at once, without a buffer of their own.
pub(crate) const READ_BUFFER_BYTES: usize = 1024;

/// The prefix of the subprotocol entry that carries a browser's token.
pub(crate) const BEARER_PROTOCOL: &str = "gatehouse.bearer.";
