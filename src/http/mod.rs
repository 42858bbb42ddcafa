//! The HTTP layer: thin. Parse, call the domain, map errors. No redb type appears here.
//!
//! Middleware order, outermost first: `edge` (request id, error rendering, security
//! headers, response counting for `/metrics`), CORS, request timeout, body limit, the
//! ban and per-address limit, then the routes. `serve.rs` owns the connections: TLS
//! handshake, header-read and idle timeouts, header caps, the connection caps, resting
//! idle connections and graceful shutdown.

mod admin_users;
mod audit;
mod authz;
mod bans;
mod client_addr;
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
mod ui;
mod ws;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::DefaultBodyLimit;
use http::{HeaderName, HeaderValue, StatusCode};
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

/// Every route with its middleware.
pub fn router(state: AppState, limits: &ServerConfig, cors_config: &CorsConfig) -> Router {
    let hsts = security::Hsts(state.tls_mode != TlsMode::Off);
    let counters = state.http_counters.clone();
    let front = state.front.is_some().then(|| front::router(state.clone()));
    let front_state = state.clone();
    let routes = Router::new()
        .merge(ui::routes())
        .merge(health::routes())
        .merge(metrics::routes())
        .merge(oauth::routes())
        .merge(pairing::routes())
        .merge(keys::routes())
        .merge(ws::routes())
        .merge(devices::routes())
        .merge(audit::routes())
        .merge(bans::routes())
        .merge(jobs::routes())
        .merge(status::routes())
        .merge(session::routes())
        .merge(admin_users::routes())
        .merge(authz::routes())
        .merge(front::routes())
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            limits::admit_address,
        ))
        .with_state(state)
        .layer(DefaultBodyLimit::max(limits.max_body_bytes))
        .layer(RequestBodyLimitLayer::new(limits.max_body_bytes))
        .layer(axum::middleware::from_fn_with_state(
            limits.max_body_bytes,
            limits::drain_oversized_h2,
        ))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            limits.request_timeout,
        ));
    // Added after the API's limits, so that proxied requests keep their own (the app's);
    // routes bound to a host go first, before gatehouse's own paths on that host.
    let routes = match front {
        Some(front) => {
            routes
                .fallback_service(front.clone())
                .layer(axum::middleware::from_fn_with_state(
                    (front_state, front),
                    front::by_host,
                ))
        }
        None => routes,
    };
    routes
        .layer(cors(cors_config))
        .layer(axum::middleware::from_fn_with_state(
            Edge { hsts, counters },
            edge,
        ))
}

/// What the outermost middleware needs.
#[derive(Clone)]
struct Edge {
    hsts: security::Hsts,
    counters: Arc<metrics::HttpCounters>,
}

/// The outermost middleware, one layer for what every response gets: a request id,
/// the JSON error body for a 4xx/5xx (`error`), the security headers (`security`), and
/// a count in `/metrics` (`metrics`), for the answers of every other layer too
/// (timeouts, body limits, bans, CORS preflights).
async fn edge(
    axum::extract::State(edge): axum::extract::State<Edge>,
    mut request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let started = std::time::Instant::now();
    let http1 = request.version() < http::Version::HTTP_2;
    let (id, logged) = security::start(&mut request);
    let response = next.run(request).await;
    let response = error::render_errors(response, http1, Some(&id));
    let response = security::finish(response, edge.hsts, id, logged);
    edge.counters
        .record(response.status(), started.elapsed().as_secs_f64());
    response
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
