//! The HTTP layer: thin. Parse, call the domain, map errors. No redb type appears here.
//!
//! Layers, outermost first: `App` (request id, error rendering, security headers,
//! response counting for `/metrics`), CORS, `ByHost` (host-bound front-door routes),
//! then the router: request timeout and body limits, the ban and per-address limit, the
//! routes, and the front door as its fallback. `serve.rs` owns the connections: TLS
//! handshake, header-read and idle timeouts, header caps, the connection caps, resting
//! idle connections and graceful shutdown.

mod admin_users;
mod audit;
mod authz;
mod bans;
mod client_addr;
mod device_grants;
mod devices;
pub(crate) mod error;
pub(crate) mod extract;
mod front;
mod health;
mod jobs;
mod json;
mod keys;
pub(crate) mod limits;
pub(crate) mod metrics;
mod oauth;
mod pairing;
pub(crate) mod redirect;
pub mod security;
pub(crate) mod serve;
mod session;
mod status;
mod status_lists;
mod ui;
mod ws;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::DefaultBodyLimit;
use http::{HeaderName, HeaderValue, StatusCode};
use tower::{Layer, Service};
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::timeout::TimeoutLayer;

use crate::config::{CorsConfig, ServerConfig, TlsMode};
use crate::services::Services;
use crate::store::Store;

/// Shared state of every handler: one `Arc`, so that the copies axum and every
/// middleware layer make for each request cost one reference count, not one per field
/// (with two cores, each count is a cache line both of them write).
#[derive(Debug, Clone)]
pub struct AppState(Arc<Shared>);

/// What `AppState` shares.
#[derive(Debug)]
pub struct Shared {
    pub(crate) services: Arc<Services>,
    pub(crate) store: Store,
    pub(crate) tls_mode: TlsMode,
    pub(crate) http_counters: Arc<metrics::HttpCounters>,
    pub(crate) authz: Arc<authz::AuthzCounters>,
    /// What the front door did with the requests it handled.
    pub(crate) front_counters: Arc<front::FrontCounters>,
    draining: AtomicBool,
    /// The front door, when `upstream.url` is set.
    pub(crate) front: Option<crate::front::FrontDoor>,
}

impl std::ops::Deref for AppState {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}

impl AppState {
    /// The state of a server without the front door.
    pub fn new(services: Services, tls_mode: TlsMode) -> Self {
        Self::serving(services, tls_mode, None)
    }

    /// With the front door: paths gatehouse does not own go to the app.
    pub(crate) fn serving(
        services: Services,
        tls_mode: TlsMode,
        front: Option<crate::front::FrontDoor>,
    ) -> Self {
        Self(Arc::new(Shared {
            store: services.store.clone(),
            services: Arc::new(services),
            tls_mode,
            http_counters: Arc::default(),
            authz: Arc::default(),
            front_counters: Arc::default(),
            draining: AtomicBool::new(false),
            front,
        }))
    }
}

impl Shared {
    /// From now on `/readyz` answers 503.
    pub(crate) fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    pub(crate) fn draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }
}

/// Every route with its middleware: the service each connection calls (`serve`).
pub fn router(state: AppState, limits: &ServerConfig, cors_config: &CorsConfig) -> App {
    let hsts = security::Hsts(state.tls_mode != TlsMode::Off);
    let counters = state.http_counters.clone();
    let front = state.front.is_some().then(|| front::router(state.clone()));
    // The API's limits as one layer: axum boxes each layer of a router once per route
    // and clones every box for every request.
    let api_limits = tower::ServiceBuilder::new()
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            limits.request_timeout,
        ))
        .layer(axum::middleware::from_fn_with_state(
            limits.max_body_bytes,
            limits::drain_oversized_h2,
        ))
        .layer(RequestBodyLimitLayer::new(limits.max_body_bytes))
        .layer(DefaultBodyLimit::max(limits.max_body_bytes));
    let routes = Router::new()
        .merge(ui::routes())
        .merge(health::routes())
        .merge(metrics::routes())
        .merge(oauth::routes())
        .merge(pairing::routes())
        .merge(device_grants::routes())
        .merge(keys::routes())
        .merge(ws::routes())
        .merge(devices::routes())
        .merge(audit::routes())
        .merge(bans::routes())
        .merge(jobs::routes())
        .merge(status::routes())
        .merge(status_lists::routes())
        .merge(session::routes())
        .merge(admin_users::routes())
        .merge(authz::routes())
        .merge(front::routes())
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            limits::admit_address,
        ))
        .with_state(state.clone())
        .layer(api_limits);
    // The front door is the fallback, added after the API's limits so that proxied
    // requests keep their own (the app's); routes bound to a host go first (`ByHost`).
    let api = match &front {
        Some(front) => routes.fallback_service(front.clone()),
        None => routes,
    };
    let by_host = ByHost {
        api,
        front: front.map(|front| (state, front)),
    };
    App {
        inner: cors(cors_config).layer(by_host),
        edge: Edge { hsts, counters },
    }
}

/// The whole HTTP service. Its outer layers are plain services around the router, not
/// router layers: a request is handed down through them without copying any.
#[derive(Clone)]
pub struct App {
    inner: tower_http::cors::Cors<ByHost>,
    edge: Edge,
}

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("App").finish_non_exhaustive()
    }
}

/// What the outermost layer needs.
#[derive(Clone)]
struct Edge {
    hsts: security::Hsts,
    counters: Arc<metrics::HttpCounters>,
}

/// The outermost layer, for what every response gets: a request id, the JSON error body
/// for a 4xx/5xx (`error`), the security headers (`security`), and a count in
/// `/metrics` (`metrics`), for the answers of every other layer too (timeouts, body
/// limits, bans, CORS preflights).
impl<B> Service<http::Request<B>> for App
where
    B: http_body::Body<Data = axum::body::Bytes> + Send + 'static,
    B::Error: Into<axum::BoxError>,
{
    type Response = axum::response::Response;
    type Error = std::convert::Infallible;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let started = std::time::Instant::now();
        let mut request = request.map(axum::body::Body::new);
        let http1 = request.version() < http::Version::HTTP_2;
        let (id, logged) = security::start(&mut request);
        let answer = self.inner.call(request);
        let edge = self.edge.clone();
        Box::pin(async move {
            let response = answer.await?;
            let response = error::render_errors(response, http1, Some(&id));
            let response = security::finish(response, edge.hsts, id, logged);
            edge.counters
                .record(response.status(), started.elapsed().as_secs_f64());
            Ok(response)
        })
    }
}

/// Routes bound to a host take their requests before the API's router sees them.
#[derive(Clone)]
struct ByHost {
    api: Router,
    /// With the front door: the state to look routes up in, and its router.
    front: Option<(AppState, Router)>,
}

impl Service<axum::extract::Request> for ByHost {
    type Response = axum::response::Response;
    type Error = std::convert::Infallible;
    type Future = axum::routing::future::RouteFuture<std::convert::Infallible>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        // Both are routers, which are always ready.
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: axum::extract::Request) -> Self::Future {
        match &mut self.front {
            Some((state, front)) if front::bound_to_host(state, &request) => front.call(request),
            _ => self.api.call(request),
        }
    }
}

/// CORS from `cors.allowed_origins`: an origin on the list gets the headers (and a
/// preflight its answer); any other gets none, so the browser keeps the response from
/// the page. An empty list (the default) adds nothing to any response.
fn cors(config: &crate::config::CorsConfig) -> tower_http::cors::CorsLayer {
    use tower_http::cors::{AllowOrigin, CorsLayer};
    let origins: Vec<HeaderValue> = config
        .allowed_origins
        .iter()
        .filter_map(|o| HeaderValue::from_str(o).ok())
        .collect();
    let allow = if config.allowed_origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(origins)
    };
    CorsLayer::new()
        .allow_origin(allow)
        .allow_methods([
            http::Method::GET,
            http::Method::POST,
            http::Method::PATCH,
            http::Method::DELETE,
        ])
        .allow_headers([
            http::header::AUTHORIZATION,
            http::header::CONTENT_TYPE,
            HeaderName::from_static(extract::CSRF_HEADER),
        ])
        .allow_credentials(config.allow_credentials)
        .max_age(std::time::Duration::from_secs(600))
}
