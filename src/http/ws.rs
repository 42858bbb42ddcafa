//! `GET /v1/ws`: one authenticated WebSocket per app, the protocol of
//! `schema/websocket.md`.
//!
//! A connection is admitted within the total and per-address caps, then must
//! authenticate within 10 s (`pair`, `auth` or `refresh`). Text frames of JSON only, at
//! most 64 KiB (larger closes with 1009, binary with 1003). The server pings every 30 s
//! and drops a peer that did not answer the previous ping. Every message spends from the
//! device's budget (before authentication, the connection's own). Bad messages get an
//! `error` reply and a strike; five strikes close the socket with 1008. When anything
//! is revoked or a key changes, every authenticated socket re-verifies its token, so a
//! revoked device or token, or an expired one, is closed at once with 1008.

use axum::Router;
use axum::routing::get;
use futures_util::SinkExt;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade, close_code};
use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode, header};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::AppState;
use super::error::ApiError;
use super::extract::{Peer, binding_of, holder_checked, with_dpop_nonce};
use super::json::StrictObject;
use crate::audit::{Actor, Origin};
use crate::dpop::{DpopError, Jkt};
use crate::error_kind::{Classify, ErrorKind};
use crate::ids::DeviceId;
use crate::live::{MessageBudget, Refused, Slot};
use crate::pairing::DeviceInfo;
use crate::ratelimit::{PolicyId, Subject};
use crate::tokens::{Rejection, TokenPair, Verified};

/// This resource's routes.
pub(super) fn routes() -> Router<AppState> {
    Router::new().route("/v1/ws", get(upgrade))
}

/// Time a new connection has to authenticate.
pub(crate) const AUTH_TIMEOUT: Duration = Duration::from_secs(10);
/// Interval of the server's pings; a peer that misses one is dropped at the next.
pub(crate) const PING_EVERY: Duration = Duration::from_secs(30);
/// Largest message (and frame) accepted.
pub(crate) const MAX_MESSAGE_BYTES: usize = 64 * 1024;
/// Bad messages tolerated before the socket is closed.
pub(crate) const MAX_STRIKES: u32 = 5;
/// Initial read buffer: small, so an idle connection costs little; it grows for large
/// messages.
const READ_BUFFER_BYTES: usize = 1024;
/// How long a frame may wait to be taken by the peer.
const SEND_TIMEOUT: Duration = Duration::from_secs(10);
/// Close code for "message too big" (RFC 6455 section 7.4.1).
const TOO_BIG: u16 = 1009;

/// What a client sends.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
enum ClientMessage {
    /// `dpop`: a proof as for `POST /v1/pair` (htm `POST`, htu `{issuer}/v1/pair`).
    Pair {
        session_id: String,
        secret: String,
        device: DeviceInfo,
        #[serde(default)]
        dpop: Option<String>,
    },
    /// `dpop`: for a bound token, a proof for `GET {issuer}/v1/ws` with its `ath`.
    Auth {
        access_token: String,
        #[serde(default)]
        dpop: Option<String>,
    },
    /// `dpop`: a proof as for `POST /v1/token`.
    Refresh {
        refresh_token: String,
        #[serde(default)]
        dpop: Option<String>,
    },
    /// A struct variant, so that unknown fields are refused here too.
    Ping {},
}

const KNOWN_TYPES: &[&str] = &["pair", "auth", "refresh", "ping"];

/// What the server sends.
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum ServerMessage<'a> {
    AuthSuccess {
        device_id: DeviceId,
        expires_in: u64,
        #[serde(skip_serializing_if = "Option::is_none")]
        access_token: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        refresh_token: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        token_type: Option<&'a str>,
    },
    Error {
        code: &'a str,
        message: &'a str,
    },
    Pong,
}

/// `GET /v1/ws`: admits the connection within the caps, then upgrades it.
async fn upgrade(
    State(state): State<AppState>,
    Peer(peer): Peer,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    // Anything but an HTTP/1.1 GET with the upgrade headers is no upgrade: a 400 that says
    // what is missing. That includes a HEAD, which answers as its GET would, and a GET
    // over HTTP/2 (where a WebSocket would need an extended CONNECT, RFC 8441, which this
    // server does not offer): the path does take GET, so neither is a 405.
    let upgrade = match upgrade {
        Ok(upgrade) => upgrade,
        Err(rejection) => {
            let message = match rejection {
                WebSocketUpgradeRejection::MethodNotGet(_)
                | WebSocketUpgradeRejection::MethodNotConnect(_) => {
                    "a WebSocket opens with an HTTP/1.1 GET and the upgrade headers".to_string()
                }
                other => other.body_text(),
            };
            return ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", message)
                .into_response();
        }
    };
    let slot = match state.services.live.admit(peer.ip()) {
        Ok(slot) => slot,
        Err(refused) => return refusal(refused),
    };
    let nonce_state = state.clone();
    let response = upgrade
        .read_buffer_size(READ_BUFFER_BYTES)
        .write_buffer_size(0)
        .max_message_size(MAX_MESSAGE_BYTES)
        .max_frame_size(MAX_MESSAGE_BYTES)
        .on_upgrade(move |socket| async move {
            Connection::new(state, peer, slot).run(socket).await;
        });
    // The nonce the socket's proofs must carry, when nonces are on.
    with_dpop_nonce(&nonce_state, response)
}

/// The answer to a connection over the caps (shared with the front door's relay).
pub(super) fn refusal(refused: Refused) -> Response {
    match refused {
        Refused::Full => {
            ApiError::unavailable("the server holds its maximum number of live connections")
                .into_response()
        }
        Refused::PerAddressFull => {
            let mut response = ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                "this address holds its maximum number of live connections",
            )
            .into_response();
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("10"));
            response
        }
    }
}

/// Who the socket speaks for, once authenticated.
struct Authenticated {
    device: DeviceId,
    access_token: String,
    budget: Arc<Mutex<MessageBudget>>,
}

/// What to do after handling one event.
enum Next {
    Continue,
    Close(u16, &'static str),
    /// The client closed: send the answer tungstenite queued (its own code echoed, RFC
    /// 6455 section 5.5.1), then end.
    Answered,
    /// Drop without a closing handshake (a dead peer).
    Drop,
}

struct Connection {
    state: AppState,
    peer: SocketAddr,
    _slot: Slot,
    auth: Option<Authenticated>,
    /// Before authentication, the connection spends from its own budget.
    own_budget: MessageBudget,
    strikes: u32,
    awaiting_pong: bool,
    /// Counts successful authentications, so the loop sees when the token changed.
    renewals: u64,
}

impl Connection {
    fn new(state: AppState, peer: SocketAddr, slot: Slot) -> Self {
        let rate = state.services.live.messages_per_second();
        Self {
            state,
            peer,
            _slot: slot,
            auth: None,
            own_budget: MessageBudget::new(rate),
            strikes: 0,
            awaiting_pong: false,
            renewals: 0,
        }
    }

    async fn run(mut self, mut socket: WebSocket) {
        let mut changes = self.state.services.changes.subscribe();
        let mut closing = self.state.services.live.closing();
        let auth_deadline = tokio::time::sleep(AUTH_TIMEOUT);
        tokio::pin!(auth_deadline);
        let expiry = tokio::time::sleep(Duration::from_secs(365 * 24 * 3600));
        tokio::pin!(expiry);
        let start = tokio::time::Instant::now();
        let mut ping = tokio::time::interval_at(start + PING_EVERY, PING_EVERY);
        loop {
            let next = tokio::select! {
                received = socket.recv() => match received {
                    None => Next::Drop,
                    Some(Err(err)) => read_error(err),
                    Some(Ok(message)) => {
                        let renewals = self.renewals;
                        let next = self.on_message(message, &mut socket).await;
                        // A new or renewed token moves the expiry timer to its own end.
                        if self.renewals != renewals
                            && let Some(remaining) = self.token_lifetime()
                        {
                            expiry.as_mut().reset(tokio::time::Instant::now() + remaining);
                        }
                        next
                    }
                },
                () = &mut auth_deadline, if self.auth.is_none() => {
                    Next::Close(close_code::POLICY, "authentication timeout")
                }
                _ = ping.tick() => {
                    if self.awaiting_pong {
                        tracing::debug!(peer = %self.peer, "websocket: no pong, dropping the peer");
                        Next::Drop
                    } else {
                        self.awaiting_pong = true;
                        send_within(&mut socket, Message::Ping(Default::default())).await
                    }
                }
                Ok(()) = changes.changed(), if self.auth.is_some() => self.recheck(),
                () = &mut expiry, if self.auth.is_some() => self.recheck(),
                Ok(()) = closing.changed() => Next::Close(close_code::AWAY, "server shutting down"),
            };
            match next {
                Next::Continue => {}
                Next::Close(code, reason) => {
                    let frame = CloseFrame {
                        code,
                        reason: Utf8Bytes::from_static(reason),
                    };
                    let _ = send_within(&mut socket, Message::Close(Some(frame))).await;
                    break;
                }
                Next::Answered => {
                    let _ = tokio::time::timeout(SEND_TIMEOUT, SinkExt::flush(&mut socket)).await;
                    break;
                }
                Next::Drop => break,
            }
        }
    }

    /// How long the authenticated token stays valid, by the server's clock.
    fn token_lifetime(&self) -> Option<Duration> {
        let auth = self.auth.as_ref()?;
        let verified = self.state.services.tokens.verify(&auth.access_token).ok()?;
        let now = self.state.services.clock.now_ms();
        let leeway = self.state.services.tokens.settings().leeway;
        let until = verified
            .claims
            .exp
            .saturating_mul(1000)
            .saturating_add(crate::clock::millis(leeway));
        Some(Duration::from_millis(until.saturating_sub(now)))
    }

    /// Re-verifies the token the socket authenticated with (after a revocation, a key
    /// change, or when it should have expired).
    fn recheck(&self) -> Next {
        let Some(auth) = &self.auth else {
            return Next::Continue;
        };
        match self.state.services.tokens.verify(&auth.access_token) {
            Ok(_) => Next::Continue,
            Err(Rejection::Expired) => Next::Close(close_code::POLICY, "token expired"),
            Err(reason) => {
                tracing::debug!(device = %auth.device, reason = reason.code(), "websocket closed: token no longer valid");
                Next::Close(close_code::POLICY, "token revoked")
            }
        }
    }

    async fn send(&self, socket: &mut WebSocket, message: &ServerMessage<'_>) -> Next {
        let text = serde_json::to_string(message).unwrap_or_default();
        send_within(socket, Message::Text(text.into())).await
    }

    async fn refuse(&mut self, socket: &mut WebSocket, code: &str, message: &str) -> Next {
        self.strikes += 1;
        if self
            .send(socket, &ServerMessage::Error { code, message })
            .await
            == Next::Drop
        {
            return Next::Drop;
        }
        if self.strikes >= MAX_STRIKES {
            tracing::debug!(peer = %self.peer, "websocket: too many bad messages");
            return Next::Close(close_code::POLICY, "too many bad messages");
        }
        Next::Continue
    }

    /// Spends one message: from the burst guard (per device, in memory; before
    /// authentication, the connection's own) and from the `ws_messages` policy (per
    /// device; per address before authentication).
    fn spend(&mut self) -> bool {
        let now = std::time::Instant::now();
        let (burst_ok, subject) = match &self.auth {
            Some(auth) => (
                auth.budget
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .spend(now),
                Subject::Device(auth.device),
            ),
            None => (self.own_budget.spend(now), Subject::ip(self.peer.ip())),
        };
        burst_ok
            && self
                .state
                .services
                .limits
                .limit(PolicyId::WsMessages, &subject)
                .is_ok()
    }

    async fn on_message(&mut self, message: Message, socket: &mut WebSocket) -> Next {
        let text = match message {
            Message::Text(text) => text,
            Message::Binary(_) => return Next::Close(close_code::UNSUPPORTED, "text frames only"),
            Message::Pong(_) => {
                self.awaiting_pong = false;
                return Next::Continue;
            }
            // tungstenite answers pings itself; a close is answered and ends the socket.
            Message::Ping(_) => return Next::Continue,
            Message::Close(_) => return Next::Answered,
        };
        if !self.spend() {
            return self
                .refuse(socket, "rate_limited", "too many messages; slow down")
                .await;
        }
        if let Some(auth) = &self.auth {
            self.state.services.devices.seen(auth.device);
        }
        // Through a strict object first: a member named twice is refused, not overwritten.
        let parsed = StrictObject::parse(text.as_bytes()).and_then(StrictObject::into_type);
        let parsed: ClientMessage = match parsed {
            Ok(parsed) => parsed,
            Err(err) => {
                let (code, detail) = classify(text.as_str(), &err);
                return self.refuse(socket, code, &detail).await;
            }
        };
        match parsed {
            ClientMessage::Ping {} => self.send(socket, &ServerMessage::Pong).await,
            ClientMessage::Auth { access_token, dpop } => {
                self.authenticate(socket, access_token, dpop).await
            }
            ClientMessage::Pair {
                session_id,
                secret,
                device,
                dpop,
            } => {
                // A socket speaks for one device: it cannot claim a session for another.
                if self.auth.is_some() {
                    return self.mismatch(socket).await;
                }
                let binding = match self.binding(dpop.as_deref(), "/v1/pair") {
                    Ok(binding) => binding,
                    Err(err) => return self.refuse_for(socket, &err).await,
                };
                let paired = self
                    .state
                    .services
                    .pairing
                    .pair(&session_id, &secret, &device, binding, &self.origin())
                    .await;
                match paired {
                    Ok(pair) => self.accept_pair(socket, pair).await,
                    Err(err) => self.refuse_for(socket, &err).await,
                }
            }
            ClientMessage::Refresh {
                refresh_token,
                dpop,
            } => {
                // Checked before the token is spent: another device's refresh token
                // presented here must not be rotated (or reuse-detected) by a refusal.
                if let Some(current) = &self.auth {
                    // Only a live token of another device is refused here; a spent or
                    // unknown one goes on to the refresh, which detects reuse.
                    let answer = self.state.services.tokens.introspect(&refresh_token);
                    let device = current.device.to_string();
                    if answer.active && answer.sub.as_deref() != Some(device.as_str()) {
                        return self.mismatch(socket).await;
                    }
                }
                let binding = match self.binding(dpop.as_deref(), "/v1/token") {
                    Ok(binding) => binding,
                    Err(err) => return self.refuse_for(socket, &err).await,
                };
                match self
                    .state
                    .services
                    .tokens
                    .refresh(&refresh_token, binding.as_ref(), &self.origin())
                    .await
                {
                    Ok(pair) => self.accept_pair(socket, pair).await,
                    Err(err) => self.refuse_for(socket, &err).await,
                }
            }
        }
    }

    /// The key of a message's proof, made as for `POST {issuer}{path}`.
    fn binding(&self, proof: Option<&str>, path: &str) -> Result<Option<Jkt>, DpopError> {
        let uri = format!("{}{path}", self.state.services.tokens.settings().issuer);
        binding_of(&self.state, proof, "POST", &[uri.as_str()])
    }

    /// This connection as the origin of an audit record: its address, and its device
    /// once authenticated.
    fn origin(&self) -> Origin {
        let origin = Origin::request(self.peer.ip(), None);
        match &self.auth {
            Some(auth) => origin.as_actor(Actor::Device(auth.device.to_string())),
            None => origin,
        }
    }

    /// Credentials of another device on a socket that already speaks for one.
    async fn mismatch(&mut self, socket: &mut WebSocket) -> Next {
        self.refuse(
            socket,
            "device_mismatch",
            "this socket speaks for another device",
        )
        .await
    }

    /// A domain error, answered with the code its kind gives (the same as over HTTP).
    async fn refuse_for<E: Classify>(&mut self, socket: &mut WebSocket, err: &E) -> Next {
        match err.kind() {
            ErrorKind::Internal | ErrorKind::Unavailable => {
                self.internal(socket, err.to_string()).await
            }
            ErrorKind::Invalid
            | ErrorKind::Unauthenticated
            | ErrorKind::NotFound
            | ErrorKind::Conflict
            | ErrorKind::Gone
            | ErrorKind::Banned
            | ErrorKind::RateLimited
            | ErrorKind::Upstream
            | ErrorKind::UpstreamTimeout => self.refuse(socket, err.code(), &err.to_string()).await,
        }
    }

    async fn internal(&mut self, socket: &mut WebSocket, err: String) -> Next {
        tracing::error!(error = %err, "websocket: internal error");
        self.send(
            socket,
            &ServerMessage::Error {
                code: "internal_error",
                message: "the server failed to handle this message; it has been logged",
            },
        )
        .await
    }

    /// A pair or refresh succeeded: the socket now speaks for that device.
    async fn accept_pair(&mut self, socket: &mut WebSocket, pair: TokenPair) -> Next {
        if let Some(current) = &self.auth
            && current.device != pair.device_id
        {
            return self.mismatch(socket).await;
        }
        self.become_device(pair.device_id, pair.access_token.clone());
        self.send(
            socket,
            &ServerMessage::AuthSuccess {
                device_id: pair.device_id,
                expires_in: pair.expires_in,
                access_token: Some(&pair.access_token),
                refresh_token: Some(&pair.refresh_token),
                token_type: Some(&pair.token_type),
            },
        )
        .await
    }

    async fn authenticate(
        &mut self,
        socket: &mut WebSocket,
        access_token: String,
        dpop: Option<String>,
    ) -> Next {
        let verified = match self.state.services.tokens.verify(&access_token) {
            Ok(verified) => verified,
            Err(reason) => {
                tracing::debug!(reason = reason.code(), "websocket: token refused");
                return self
                    .refuse(
                        socket,
                        "invalid_token",
                        "the access token is invalid, expired or revoked",
                    )
                    .await;
            }
        };
        let uri = format!("{}/v1/ws", self.state.services.tokens.settings().issuer);
        if let Err(why) = holder_checked(
            &self.state,
            &verified,
            &access_token,
            dpop.is_some(),
            Ok(dpop.as_deref()),
            "GET",
            &[uri.as_str()],
        ) {
            let code = if why.use_nonce {
                "use_dpop_nonce"
            } else {
                "invalid_dpop_proof"
            };
            return self.refuse(socket, code, &why.message).await;
        }
        let Verified { claims, .. } = verified;
        if let Some(current) = &self.auth
            && current.device != claims.sub
        {
            return self.mismatch(socket).await;
        }
        let now_s = self.state.services.clock.now_ms() / 1000;
        self.become_device(claims.sub, access_token);
        self.send(
            socket,
            &ServerMessage::AuthSuccess {
                device_id: claims.sub,
                expires_in: claims.exp.saturating_sub(now_s),
                access_token: None,
                refresh_token: None,
                token_type: None,
            },
        )
        .await
    }

    fn become_device(&mut self, device: DeviceId, access_token: String) {
        self.state.services.devices.seen(device);
        let budget = self.state.services.live.budget(device);
        self.renewals += 1;
        self.auth = Some(Authenticated {
            device,
            access_token,
            budget,
        });
    }
}

impl PartialEq for Next {
    fn eq(&self, other: &Self) -> bool {
        matches!(
            (self, other),
            (Self::Continue, Self::Continue) | (Self::Drop, Self::Drop)
        ) || matches!((self, other), (Self::Close(a, _), Self::Close(b, _)) if a == b)
    }
}

/// Sends one frame; a peer that does not take it within `SEND_TIMEOUT` (it stopped
/// reading) is dropped instead of holding the connection's task forever.
async fn send_within(socket: &mut WebSocket, message: Message) -> Next {
    match tokio::time::timeout(SEND_TIMEOUT, socket.send(message)).await {
        Ok(Ok(())) => Next::Continue,
        Ok(Err(_)) | Err(_) => Next::Drop,
    }
}

/// A read error: over the size limits closes with 1009; anything else is a broken peer.
fn read_error(err: axum::Error) -> Next {
    let inner = err.into_inner();
    match inner.downcast_ref::<tungstenite::Error>() {
        Some(tungstenite::Error::Capacity(_)) => {
            Next::Close(TOO_BIG, "message too big (64 KiB at most)")
        }
        _ => {
            tracing::debug!(error = %inner, "websocket read error");
            Next::Drop
        }
    }
}

/// Sorts a message that did not parse into "not JSON", "unknown type" or "bad fields".
fn classify(text: &str, err: &serde_json::Error) -> (&'static str, String) {
    match serde_json::from_str::<Value>(text) {
        Err(_) => (
            "bad_message",
            "messages are JSON objects with a \"type\"".into(),
        ),
        Ok(value) => match value.get("type").and_then(Value::as_str) {
            Some(kind) if KNOWN_TYPES.contains(&kind) => ("invalid_request", err.to_string()),
            Some(_) | None => (
                "unknown_type",
                format!("\"type\" must be one of {}", KNOWN_TYPES.join(", ")),
            ),
        },
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn client_messages_parse_strictly() {
        assert!(matches!(
            serde_json::from_str::<ClientMessage>(r#"{"type":"ping"}"#),
            Ok(ClientMessage::Ping {})
        ));
        assert!(serde_json::from_str::<ClientMessage>(r#"{"type":"ping","x":1}"#).is_err());
        assert!(serde_json::from_str::<ClientMessage>(r#"{"type":"auth"}"#).is_err());
        let e = serde_json::from_str::<ClientMessage>(r#"{"type":"nope"}"#).unwrap_err();
        assert_eq!(classify(r#"{"type":"nope"}"#, &e).0, "unknown_type");
        let e = serde_json::from_str::<ClientMessage>("{").unwrap_err();
        assert_eq!(classify("{", &e).0, "bad_message");
        let e = serde_json::from_str::<ClientMessage>(r#"{"type":"auth"}"#).unwrap_err();
        assert_eq!(classify(r#"{"type":"auth"}"#, &e).0, "invalid_request");
    }

    #[test]
    fn server_messages_serialise_as_documented() {
        let json = serde_json::to_string(&ServerMessage::Error {
            code: "bad_message",
            message: "m",
        })
        .unwrap_or_default();
        assert_eq!(
            json,
            r#"{"type":"error","code":"bad_message","message":"m"}"#
        );
        assert_eq!(
            serde_json::to_string(&ServerMessage::Pong).unwrap_or_default(),
            r#"{"type":"pong"}"#
        );
    }
}
