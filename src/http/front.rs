//! The front door's HTTP side: a request for the app takes a route (`[[routes]]`, or
//! `upstream.url` for every path gatehouse does not own), is authenticated as its route
//! says, limited, and handed to `crate::front` to be forwarded.
//!
//! - `device`: a valid device access token. None, or one that is not valid now
//!   (expired, revoked with its device, family or key — all checked in memory, no store
//!   read), is a 401 with `WWW-Authenticate: Bearer`; the app sees nothing of it.
//! - `admin`: an admin token or the admin UI's session cookie (a change needs our own
//!   origin); else 401.
//! - `public`: anyone; the per-address limit applies as everywhere.
//!
//! Routes bound to a host go before gatehouse's own paths on that host (`by_host`);
//! the others take what gatehouse's router does not answer (`router`). These requests
//! skip the API's body limit and request timeout (the app sets its own, and bodies are
//! streamed), but not the ban and the per-address limit.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{ConnectInfo, FromRequestParts, Request, State};
use axum::response::{IntoResponse, Response};
use http::request::Parts;
use http::{HeaderValue, StatusCode, header};

use super::AppState;
use super::error::ApiError;
use super::extract::{
    Presented, admin_for_app, admin_required, dpop_header, holder_checked, holder_refusal,
    presented, request_uris,
};
use super::metrics::{HttpCounters, metric};
use super::security::RequestId;
use crate::audit::{Actor, Event, Origin};
use crate::config::RouteAuth;
use crate::front::{Caller, Credential, FrontDoor, FrontError, Target, Who, ambiguous};
use crate::ratelimit::Subject;
use crate::tokens::{Rejection, TokenAuthority, Verified};

/// This resource's routes: what the front door is doing, for admins.
pub(super) fn routes() -> Router<AppState> {
    Router::new().route("/v1/front", axum::routing::get(overview))
}

/// `GET /v1/front`: every route with its app's health and its open sockets, and the
/// devices holding relayed sockets now.
async fn overview(_admin: super::extract::Admin, State(state): State<AppState>) -> Response {
    let Some(front) = state.front.clone() else {
        return axum::Json(serde_json::json!({"enabled": false, "routes": [], "sockets": []}))
            .into_response();
    };
    let unreachable = front.unreachable().await;
    let routes: Vec<serde_json::Value> = front
        .targets()
        .iter()
        .map(|target| {
            let counters = state.front_counters.route(&front, target.position);
            let load = |pick: fn(&RouteCounters) -> u64| counters.map_or(0, pick);
            let error = unreachable
                .iter()
                .find(|(upstream, _)| *upstream == target.upstream)
                .map(|(_, err)| err.clone());
            serde_json::json!({
                "route": target.label,
                "path": target.route.path,
                "host": target.route.host,
                "auth": target.auth().as_str(),
                "upstream": target.upstream.to_string(),
                "rate": match target.route.rate {
                    crate::config::Rate::Off => None,
                    crate::config::Rate::Limit { requests, window } => Some(format!(
                        "{requests}/{}",
                        humantime::format_duration(window)
                    )),
                },
                "reachable": error.is_none(),
                "error": error,
                "requests": load(|c| c.http.total()),
                "upstream_errors": load(|c| c.upstream_errors.load(Ordering::Relaxed)),
                "sockets": load(|c| c.sockets.load(Ordering::Relaxed)),
            })
        })
        .collect();
    let sockets: Vec<serde_json::Value> = front
        .open_sockets()
        .into_iter()
        .map(|(device, open)| serde_json::json!({"device_id": device, "open": open}))
        .collect();
    axum::Json(serde_json::json!({"enabled": true, "routes": routes, "sockets": sockets}))
        .into_response()
}

/// The front door as a router of its own, mounted as the API router's fallback.
pub(super) fn router(state: AppState) -> Router {
    Router::new()
        .fallback(proxy)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            super::limits::admit_address_for_app,
        ))
        .with_state(state)
}

/// Whether a route bound to the request's host takes it: then the front door gets it
/// before gatehouse's own routes see it (on an app's host, the app's paths are the
/// app's).
pub(super) fn bound_to_host(state: &AppState, request: &Request) -> bool {
    state.front.as_ref().is_some_and(|front| {
        front
            .host_route(host(request), request.uri().path())
            .is_some()
    })
}

/// The `outcome` labels of `gatehouse_front_requests_total`, by slot.
const OUTCOMES: [&str; 9] = [
    "forwarded",
    "no_token",
    "invalid_token",
    "invalid_request",
    "bad_gateway",
    "gateway_timeout",
    "forbidden",
    "rate_limited",
    "too_many_connections",
];

/// What the front door did since start: outcomes, and per route its responses,
/// durations, upstream errors and open sockets. Atomics only.
#[derive(Debug, Default)]
pub(crate) struct FrontCounters {
    outcomes: [AtomicU64; OUTCOMES.len()],
    /// By the route's position in `[[routes]]` (the `upstream.url` route last).
    routes: std::sync::OnceLock<Vec<RouteCounters>>,
}

#[derive(Debug, Default)]
struct RouteCounters {
    http: HttpCounters,
    upstream_errors: AtomicU64,
    sockets: AtomicU64,
}

impl FrontCounters {
    fn count(&self, outcome: &str) {
        if let Some(slot) = OUTCOMES.iter().position(|o| *o == outcome) {
            self.outcomes[slot].fetch_add(1, Ordering::Relaxed);
        }
    }

    fn route(&self, front: &FrontDoor, position: usize) -> Option<&RouteCounters> {
        self.routes
            .get_or_init(|| {
                let count = front.targets().iter().map(|t| t.position + 1).max();
                (0..count.unwrap_or(0))
                    .map(|_| RouteCounters::default())
                    .collect()
            })
            .get(position)
    }

    /// `{outcome="…"}` samples for `/metrics`.
    pub(crate) fn samples(&self) -> Vec<(String, f64)> {
        super::authz::samples("outcome", &OUTCOMES, &self.outcomes)
    }

    /// The per-route metrics, labelled `route="host/path"`.
    pub(crate) fn render_routes(&self, out: &mut String, front: &FrontDoor) {
        let (mut responses, mut durations, mut errors, mut sockets) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for target in front.targets() {
            let Some(route) = self.route(front, target.position) else {
                continue;
            };
            let label = target.label.replace(['\\', '"', '\n'], "_");
            let labels = format!("route=\"{label}\",");
            responses.extend(route.http.class_samples(&labels));
            durations.extend(route.http.duration_samples(&labels));
            let alone = format!("{{route=\"{label}\"}}");
            errors.push((
                alone.clone(),
                route.upstream_errors.load(Ordering::Relaxed) as f64,
            ));
            sockets.push((alone, route.sockets.load(Ordering::Relaxed) as f64));
        }
        metric(
            out,
            "gatehouse_front_route_responses_total",
            "counter",
            "Responses to requests for the app since start, by route and status class.",
            &responses,
        );
        metric(
            out,
            "gatehouse_front_route_duration_seconds",
            "histogram",
            "Time from a request's arrival to the app's response head, by route.",
            &durations,
        );
        metric(
            out,
            "gatehouse_front_route_upstream_errors_total",
            "counter",
            "Requests the app could not answer (502, 504) since start, by route.",
            &errors,
        );
        metric(
            out,
            "gatehouse_front_route_sockets",
            "gauge",
            "Relayed WebSockets open now, by route.",
            &sockets,
        );
    }
}

/// The challenges, and the reading of `Authorization`, are `/v1/authz`'s: one header
/// with one Bearer credential, or none taken.
const NO_TOKEN: &str = super::extract::BEARER_CHALLENGE;
const BAD_TOKEN: &str = super::extract::BEARER_CHALLENGE_INVALID;

fn host(request: &Request) -> Option<&str> {
    request
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| request.uri().authority().map(|a| a.as_str()))
}

async fn proxy(State(state): State<AppState>, request: Request) -> Response {
    let not_found = || ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such resource");
    let Some(front) = state.front.clone() else {
        return not_found().into_response();
    };
    let Some(target) = front.route(host(&request), request.uri().path()) else {
        return not_found().into_response();
    };
    let started = Instant::now();
    let response = through(&state, &front, target, request).await;
    if let Some(counters) = state.front_counters.route(&front, target.position) {
        counters
            .http
            .record(response.status(), started.elapsed().as_secs_f64());
        if matches!(
            response.status(),
            StatusCode::BAD_GATEWAY | StatusCode::GATEWAY_TIMEOUT
        ) && response
            .extensions()
            .get::<crate::front::Proxied>()
            .is_none()
        {
            counters.upstream_errors.fetch_add(1, Ordering::Relaxed);
        }
    }
    response
}

/// One request down `target`: the path checked, the caller authenticated as the route
/// says and limited by the route's rate, then forwarded or relayed.
async fn through(
    state: &AppState,
    front: &FrontDoor,
    target: &Target,
    request: Request,
) -> Response {
    let address = client_address(request.extensions());
    if let Some(reason) = ambiguous(request.uri().path()) {
        refusal(state, "invalid_request", &target.label, address);
        return ApiError::from(FrontError::AmbiguousPath(reason)).into_response();
    }
    let websocket = is_websocket_upgrade(request.headers());
    let (mut parts, body) = request.into_parts();
    let (who, token) = match authenticate(state, target, &mut parts, websocket).await {
        Ok(found) => found,
        Err(refused) => {
            refusal(state, refused.outcome, &target.label, address);
            return *refused.answer;
        }
    };
    if let Some(policy) = &target.rate {
        let subject = match &who {
            Who::Device(device) => Subject::Device(*device),
            Who::Admin(_) | Who::Anyone => Subject::ip(address),
        };
        if let Err(limited) = state
            .services
            .limits
            .limit_route(target.position, policy, &subject)
        {
            state.front_counters.count("rate_limited");
            return super::limits::too_many(&limited.decision, &limited.policy);
        }
    }
    if let Who::Device(device) = &who {
        state.services.devices.seen(*device);
    }
    let mut caller = caller_of(state, &parts.extensions, who);
    if front.asserts() {
        let subject = match &caller.who {
            Who::Device(device) => Some(device.to_string()),
            Who::Admin(admin) => Some(format!("admin:{admin}")),
            Who::Anyone => None,
        };
        let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        match state.services.tokens.assertion(
            target.upstream.to_string(),
            subject,
            parts.method.as_str(),
            path,
            &caller.request_id,
        ) {
            Ok(assertion) => caller.assertion = Some(assertion),
            Err(err) => return ApiError::internal(&err).into_response(),
        }
    }
    if websocket {
        return relay(state, front, target, parts, caller, token).await;
    }
    match front
        .forward(target, Request::from_parts(parts, body), &caller)
        .await
    {
        Ok(response) => {
            state.front_counters.count("forwarded");
            response
        }
        Err(err) => {
            state
                .front_counters
                .count(crate::error_kind::Classify::code(&err));
            ApiError::from(err).into_response()
        }
    }
}

/// A refused request: counted for `/metrics` by `outcome`, and for the audit log's
/// coalesced `front.refused` record by outcome, route and address.
fn refusal(state: &AppState, outcome: &'static str, route: &str, address: std::net::IpAddr) {
    state.front_counters.count(outcome);
    state
        .services
        .audit
        .count_refusal("front.refused", outcome, route, address);
}

/// Why a caller is refused: the `/metrics` outcome, and the answer (boxed: it is large,
/// and the refused path is the rare one).
struct Refused {
    outcome: &'static str,
    answer: Box<Response>,
}

impl Refused {
    fn new(outcome: &'static str, answer: Response) -> Self {
        Self {
            outcome,
            answer: Box::new(answer),
        }
    }
}

/// Who the caller is, as `target`'s `auth` asks; with a device's verified token.
async fn authenticate(
    state: &AppState,
    target: &Target,
    parts: &mut Parts,
    websocket: bool,
) -> Result<(Who, Option<(String, Verified)>), Refused> {
    match target.auth() {
        RouteAuth::Public => Ok((Who::Anyone, None)),
        RouteAuth::Admin => match admin_for_app(parts, state)
            .await
            .map_err(|answer| Refused::new("invalid_token", answer))?
        {
            Some(admin) => {
                let identity = match admin.origin.actor {
                    Actor::Admin(identity) => identity,
                    _ => "admin".to_string(),
                };
                Ok((Who::Admin(identity), None))
            }
            None => Err(Refused::new("no_token", admin_required())),
        },
        RouteAuth::Device => {
            let (token, as_dpop) = device_token(parts, websocket)?;
            match state.services.tokens.verify(&token) {
                Ok(verified) => {
                    // A bearer token that is not bound, the common case, needs no URL.
                    let uris = if as_dpop || verified.claims.cnf.is_some() {
                        request_uris(parts, &state.services.tokens.settings().issuer)
                    } else {
                        Vec::new()
                    };
                    let uris: Vec<&str> = uris.iter().map(String::as_str).collect();
                    if let Err(why) = holder_checked(
                        state,
                        &verified,
                        &token,
                        as_dpop,
                        dpop_header(&parts.headers),
                        parts.method.as_str(),
                        &uris,
                    ) {
                        tracing::debug!(
                            why = why.message,
                            "front door: token used without its key"
                        );
                        return Err(Refused::new("invalid_token", holder_refusal(state, &why)));
                    }
                    Ok((Who::Device(verified.claims.sub), Some((token, verified))))
                }
                Err(reason) => {
                    tracing::debug!(reason = reason.code(), "front door: token refused");
                    let message = match reason {
                        Rejection::Expired => "the access token has expired: refresh it",
                        _ => "the access token is not valid",
                    };
                    Err(Refused::new(
                        "invalid_token",
                        refused(BAD_TOKEN, "invalid_token", message),
                    ))
                }
            }
        }
    }
}

/// The device token a request presents, and whether as DPoP: `Authorization: Bearer` or
/// `DPoP`, or for a browser's WebSocket (which cannot set headers) a
/// `gatehouse.bearer.<token>` subprotocol.
fn device_token(parts: &Parts, websocket: bool) -> Result<(String, bool), Refused> {
    let from_protocol = websocket
        .then(|| {
            offered_protocols(parts)
                .iter()
                .find_map(|p| p.strip_prefix(crate::front::BEARER_PROTOCOL))
                .map(str::to_string)
        })
        .flatten();
    match (presented(&parts.headers), from_protocol) {
        (Presented::Bearer(token), _) => Ok((token.to_string(), false)),
        (Presented::Dpop(token), _) => Ok((token.to_string(), true)),
        (Presented::Nothing, Some(token)) => Ok((token, false)),
        (Presented::Unreadable, _) => Err(Refused::new(
            "invalid_token",
            refused(BAD_TOKEN, "invalid_token", "the access token is not valid"),
        )),
        (Presented::Nothing, None) => {
            let how = if websocket {
                "a device access token is required (Authorization: Bearer, or a \
                 gatehouse.bearer.<token> subprotocol)"
            } else {
                "a device access token is required (Authorization: Bearer)"
            };
            Err(Refused::new(
                "no_token",
                refused(NO_TOKEN, "unauthorized", how),
            ))
        }
    }
}

fn offered_protocols(parts: &Parts) -> Vec<String> {
    parts
        .headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|p| p.trim().to_string())
        .filter(|p| !p.is_empty())
        .collect()
}

/// A WebSocket opening handshake (RFC 6455 section 4.1): `Upgrade: websocket` with
/// `Connection: upgrade`.
fn is_websocket_upgrade(headers: &http::HeaderMap) -> bool {
    let has = |name, token: &str| {
        headers.get_all(name).iter().any(|v| {
            v.to_str().is_ok_and(|v| {
                v.split(',')
                    .any(|part| part.trim().eq_ignore_ascii_case(token))
            })
        })
    };
    has(header::UPGRADE, "websocket") && has(header::CONNECTION, "upgrade")
}

/// A device's token as a relayed socket's credential: it stands while neither it, its
/// family, its device nor its key is revoked, and at its expiry the socket stays on
/// if the device refreshed its family meanwhile (re-authenticated).
struct DeviceCredential {
    tokens: std::sync::Arc<TokenAuthority>,
    verified: Verified,
}

impl Credential for DeviceCredential {
    fn stands(&self) -> bool {
        self.tokens.stands(&self.verified)
    }

    async fn renewed(&mut self) -> Option<Duration> {
        if !self.tokens.stands(&self.verified) {
            return None;
        }
        let (jti, left) = self.tokens.family_renewed(&self.verified)?;
        // From now on the socket stands on the newer token: its id is the one a
        // revocation of that token names.
        self.verified.claims.jti = jti;
        Some(left)
    }
}

/// An admin's or anyone's socket: nothing to revoke; it ends with its maximum duration.
struct Standing;

impl Credential for Standing {
    fn stands(&self) -> bool {
        true
    }

    async fn renewed(&mut self) -> Option<Duration> {
        None
    }
}

/// A WebSocket through the front door: a browser's `Origin` must be allowed
/// (`cors.allowed_origins`); the bearer subprotocol entries are removed before the app
/// sees the list. The app's socket is opened first, so that the client is answered with
/// the subprotocol the app chose (or `gatehouse` when the client offered it and the app
/// chose none), never with the token.
async fn relay(
    state: &AppState,
    front: &FrontDoor,
    target: &Target,
    mut parts: Parts,
    caller: Caller,
    token: Option<(String, Verified)>,
) -> Response {
    if let Some(origin) = parts
        .headers
        .get(header::ORIGIN)
        .and_then(|v| v.to_str().ok())
        && !front.origin_allowed(origin)
    {
        refusal(state, "forbidden", &target.label, caller.address);
        return ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "this origin may not open a WebSocket here (cors.allowed_origins)",
        )
        .into_response();
    }
    let upgrade =
        match axum::extract::ws::WebSocketUpgrade::from_request_parts(&mut parts, state).await {
            Ok(upgrade) => upgrade,
            Err(rejection) => return rejection.into_response(),
        };
    // Relayed sockets count toward the same caps as gatehouse's own channel, and a
    // device's toward its own.
    let slot = match state.services.live.admit(caller.address) {
        Ok(slot) => slot,
        Err(refused) => {
            refusal(state, "too_many_connections", &target.label, caller.address);
            return super::ws::refusal(refused);
        }
    };
    let place = match front.socket_place(&caller.who) {
        Ok(place) => place,
        Err(err) => {
            state.front_counters.count("rate_limited");
            let origin = audit_origin(&caller);
            state
                .services
                .audit
                .record_or_log(
                    &origin,
                    Event::failure("front.socket_refused")
                        .detail("route", target.label.clone())
                        .detail("reason", "too_many_sockets"),
                )
                .await;
            let mut response = ApiError::from(err).into_response();
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("10"));
            return response;
        }
    };
    let host = parts
        .headers
        .get(header::HOST)
        .cloned()
        .unwrap_or_else(|| HeaderValue::from_static("localhost"));
    let offered = offered_protocols(&parts);
    let to_app: Vec<String> = offered
        .iter()
        .filter(|p| !p.starts_with(crate::front::BEARER_PROTOCOL) && *p != "gatehouse")
        .cloned()
        .collect();
    let path = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_string();
    let app = match front
        .open_socket(target, &path, &caller, &host, &to_app)
        .await
    {
        Ok(app) => app,
        Err(err) => {
            state
                .front_counters
                .count(crate::error_kind::Classify::code(&err));
            return ApiError::from(err).into_response();
        }
    };
    let answer = match &app.protocol {
        Some(chosen) => Some(chosen.clone()),
        None if offered.iter().any(|p| p == "gatehouse") => Some("gatehouse".to_string()),
        None => None,
    };
    let upgrade = match answer {
        Some(protocol) => upgrade.protocols([protocol]),
        None => upgrade,
    };
    state.front_counters.count("forwarded");
    let now_s = state.services.clock.now_ms() / 1000;
    let (max_message, max_duration) = front.ws_limits();
    let budget = match &caller.who {
        Who::Device(device) => front.budget(*device),
        // Others' sockets each have a budget of their own.
        Who::Admin(_) | Who::Anyone => front.budget_of_one(),
    };
    let limits = crate::front::Limits {
        changes: state.services.changes.subscribe(),
        closing: state.services.live.closing(),
        expires_in: token
            .as_ref()
            .map(|(_, v)| Duration::from_secs(v.claims.exp.saturating_sub(now_s))),
        max: max_duration,
        budget,
    };
    let credential = token.map(|(_, verified)| DeviceCredential {
        tokens: state.services.tokens.clone(),
        verified,
    });
    let audit = state.services.audit.clone();
    let origin = audit_origin(&caller);
    let device = match &caller.who {
        Who::Device(device) => Some(*device),
        Who::Admin(_) | Who::Anyone => None,
    };
    let counters = state.front_counters.clone();
    let front = front.clone();
    let position = target.position;
    let route = target.label.clone();
    upgrade
        .read_buffer_size(crate::front::READ_BUFFER_BYTES)
        .write_buffer_size(0)
        .max_message_size(max_message)
        .max_frame_size(max_message)
        .on_upgrade(move |socket| async move {
            let _held = (slot, place);
            let open = counters.route(&front, position).map(|c| &c.sockets);
            if let Some(open) = open {
                open.fetch_add(1, Ordering::Relaxed);
            }
            let event = |name: &'static str| {
                let mut event = Event::new(name)
                    .detail("path", path.clone())
                    .detail("route", route.clone());
                if let Some(device) = device {
                    event = event.device(device);
                }
                event
            };
            audit
                .record_or_log(&origin, event("front.socket_opened"))
                .await;
            let ended = match credential {
                Some(credential) => crate::front::relay(socket, app, limits, credential).await,
                None => crate::front::relay(socket, app, limits, Standing).await,
            };
            if let Some(open) = open {
                open.fetch_sub(1, Ordering::Relaxed);
            }
            audit
                .record_or_log(
                    &origin,
                    event("front.socket_closed").detail("reason", ended.as_str()),
                )
                .await;
        })
}

/// The audit origin of a caller: its address and request, as itself.
fn audit_origin(caller: &Caller) -> Origin {
    let origin = Origin::request(caller.address, Some(caller.request_id.clone()));
    match &caller.who {
        Who::Device(device) => origin.as_actor(Actor::Device(device.to_string())),
        Who::Admin(admin) => origin.as_actor(Actor::Admin(admin.clone())),
        Who::Anyone => origin,
    }
}

fn client_address(extensions: &http::Extensions) -> std::net::IpAddr {
    extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map_or(std::net::IpAddr::from([0, 0, 0, 0]), |c| c.0.ip())
}

fn caller_of(state: &AppState, extensions: &http::Extensions, who: Who) -> Caller {
    Caller {
        who,
        address: client_address(extensions),
        scheme: if state.tls_mode == crate::config::TlsMode::Off {
            "http"
        } else {
            "https"
        },
        request_id: extensions
            .get::<RequestId>()
            .map(|id| id.as_str().to_string())
            .unwrap_or_default(),
        assertion: None,
    }
}

/// A 401 with the same codes `/v1/authz` uses: `unauthorized` without a token,
/// `invalid_token` with one that is not valid now.
fn refused(challenge: &'static str, code: &'static str, message: &str) -> Response {
    let mut response = ApiError::new(StatusCode::UNAUTHORIZED, code, message).into_response();
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static(challenge),
    );
    response
}

#[cfg(test)]
mod tests {
    use crate::config::GATEHOUSE_PATHS;

    /// `[[routes]]` refuses a host-less route that overlaps gatehouse's own paths, by the
    /// list in config; every path gatehouse answers must be on it.
    #[test]
    fn every_path_gatehouse_answers_is_one_routes_may_not_take() {
        let openapi = include_str!("../../schema/openapi.yaml");
        let mut paths: Vec<&str> = openapi
            .lines()
            .filter_map(|line| line.strip_prefix("  /"))
            .filter_map(|rest| rest.strip_suffix(':'))
            .collect();
        paths.extend(["admin", "admin/", "admin/app.js", "admin/app.css"]);
        assert!(paths.len() > 20, "{paths:?}");
        for path in paths {
            let path = format!("/{path}");
            assert!(
                GATEHOUSE_PATHS
                    .iter()
                    .any(|ours| crate::config::under(ours, &path)),
                "{path} is not in GATEHOUSE_PATHS"
            );
        }
    }
}
