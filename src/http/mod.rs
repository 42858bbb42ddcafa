//! The HTTP layer: thin. Parse, call the domain, map errors. No redb type appears here.
//!
//! Middleware order, outermost first: security headers and request id, error rendering,
//! request timeout, body limit, then the routes. `serve.rs` owns the connections:
//! TLS handshake, header-read and idle timeouts, header caps, the connection cap and
//! graceful shutdown.

pub mod error;
pub mod health;
pub mod security;
pub mod serve;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::get;
use http::StatusCode;
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::timeout::TimeoutLayer;

use crate::config::{ServerConfig, TlsMode};
use crate::store::Store;

/// Shared state of every handler.
#[derive(Debug, Clone)]
pub struct AppState {
    pub store: Store,
    pub tls_mode: TlsMode,
    draining: Arc<AtomicBool>,
}

impl AppState {
    pub fn new(store: Store, tls_mode: TlsMode) -> Self {
        Self {
            store,
            tls_mode,
            draining: Arc::new(AtomicBool::new(false)),
        }
    }

    /// From now on `/readyz` answers 503.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }
}

/// Every route with its middleware.
pub fn router(state: AppState, limits: &ServerConfig) -> Router {
    let hsts = security::Hsts(state.tls_mode != TlsMode::Off);
    Router::new()
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .with_state(state)
        .layer(DefaultBodyLimit::max(limits.max_body_bytes))
        .layer(RequestBodyLimitLayer::new(limits.max_body_bytes))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            limits.request_timeout,
        ))
        .layer(axum::middleware::from_fn(error::render_errors))
        .layer(axum::middleware::from_fn_with_state(
            hsts,
            security::secure_headers,
        ))
}
