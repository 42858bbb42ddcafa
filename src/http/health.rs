//! Liveness and readiness.
//!
//! `/healthz` answers while the process can answer at all. `/readyz` answers 200 only
//! when the data file is readable, its writer is healthy and the server is not draining
//! for shutdown, so a load balancer stops sending traffic before the process stops.

use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::routing::get;
use serde::Serialize;

use super::AppState;
use super::error::ApiError;

/// This resource's routes.
pub(super) fn routes() -> Router<AppState> {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
}

#[derive(Debug, Serialize)]
pub(crate) struct Health {
    status: &'static str,
}

async fn healthz() -> Json<Health> {
    Json(Health { status: "ok" })
}

#[derive(Debug, Serialize)]
pub(crate) struct Ready {
    status: &'static str,
    tls: &'static str,
    format_version: u32,
    /// The served certificate (absent with TLS off).
    #[serde(skip_serializing_if = "Option::is_none")]
    certificate: Option<CertificateView>,
    /// `acme` mode: orders and renewals.
    #[serde(skip_serializing_if = "Option::is_none")]
    acme: Option<AcmeView>,
}

#[derive(Debug, Serialize)]
struct CertificateView {
    names: Vec<String>,
    issuer: String,
    not_after: String,
}

#[derive(Debug, Serialize)]
struct AcmeView {
    state: crate::tls::acme::AcmePhase,
    issued: bool,
    failures_in_row: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    last_error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    next_attempt: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    renew_at: Option<String>,
    /// The node that holds the order lease (this one while it orders or retries).
    #[serde(skip_serializing_if = "Option::is_none")]
    ordering_node: Option<String>,
}

async fn readyz(State(state): State<AppState>) -> Result<Json<Ready>, ApiError> {
    if state.draining() {
        return Err(ApiError::unavailable("the server is shutting down"));
    }
    let (unwritable, unreadable) = if state.store.is_postgres() {
        (
            "the database cannot be written",
            "the database cannot be reached",
        )
    } else {
        (
            "the data file cannot be written",
            "the data file cannot be read",
        )
    };
    if !state.store.is_healthy() {
        return Err(ApiError::unavailable(unwritable));
    }
    // A real read: proves the store is still readable (the database still reachable),
    // not just that it was at start. One row, so it costs the same with any data.
    let store = state.store.clone();
    let readable = tokio::task::spawn_blocking(move || store.read(|tx| tx.issuer()))
        .await
        .map_err(|e| ApiError::internal(&e))?;
    if let Err(err) = readable {
        tracing::error!(error = %err, "readiness check: store not readable");
        return Err(ApiError::unavailable(unreadable));
    }
    let tls = state.services.tls.as_ref().map(|tls| tls.status());
    if let Some(reason) = tls
        .as_ref()
        .and_then(|tls| tls.unready_reason(state.services.clock.now_ms()))
    {
        return Err(ApiError::unavailable(reason));
    }
    if let Some(front) = &state.front
        && let Some((upstream, err)) = front.unreachable().await.into_iter().next()
    {
        tracing::warn!(%upstream, error = %err, "readiness check: an app cannot be reached");
        return Err(ApiError::unavailable(
            "an app behind the front door cannot be reached",
        ));
    }
    let rfc3339 = crate::clock::format_rfc3339;
    Ok(Json(Ready {
        status: "ready",
        tls: state.tls_mode.as_str(),
        format_version: state.store.info().format_version,
        certificate: tls
            .as_ref()
            .and_then(|tls| tls.certificate.as_ref())
            .map(|cert| CertificateView {
                names: cert.names.clone(),
                issuer: cert.issuer.clone(),
                not_after: rfc3339(cert.not_after_ms),
            }),
        acme: tls.and_then(|tls| tls.acme).map(|acme| AcmeView {
            state: acme.phase,
            issued: acme.issued,
            failures_in_row: acme.failures_in_row,
            last_error: acme.last_error,
            next_attempt: acme.next_attempt_at_ms.map(rfc3339),
            renew_at: acme.renew_at_ms.map(rfc3339),
            ordering_node: acme.ordering_node,
        }),
    }))
}
