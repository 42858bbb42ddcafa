//! `GET /v1/jobs`, `POST /v1/jobs/{name}/run` and `POST /v1/backup` (admin).

use axum::Json;
use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use http::{HeaderValue, StatusCode, header};
use serde::Serialize;

use super::AppState;
use super::error::ApiError;
use super::extract::Admin;
use crate::config::JobName;
use crate::schedule::JobView;

/// This resource's routes.
pub(super) fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/jobs", get(list))
        .route("/v1/jobs/{name}/run", post(run))
        .route("/v1/backup", post(backup))
}

#[derive(Debug, Serialize)]
pub(crate) struct JobList {
    jobs: Vec<JobView>,
}

/// Every job with its schedule, last run and next run.
async fn list(State(state): State<AppState>, _admin: Admin) -> Result<Json<JobList>, ApiError> {
    let services = &state.services;
    Ok(Json(JobList {
        jobs: services.jobs.list()?,
    }))
}

/// Runs a job now and answers when it has finished (200 whether it succeeded or
/// failed: the outcome is in the body); 409 while it is already running.
async fn run(
    State(state): State<AppState>,
    _admin: Admin,
    Path(name): Path<String>,
) -> Result<Json<JobView>, ApiError> {
    let job: JobName = name
        .parse()
        .map_err(|m: String| ApiError::new(StatusCode::NOT_FOUND, "not_found", m))?;
    let services = &state.services;
    Ok(Json(services.jobs.run(job).await?))
}

/// Streams a fresh, checked backup (a redb data file, sealed under the server's master
/// key); see `Backups::download`.
async fn backup(State(state): State<AppState>, admin: Admin) -> Result<Response, ApiError> {
    let download = state.services.backups.download(&admin.origin).await?;
    let mut response =
        Body::from_stream(tokio_util::io::ReaderStream::new(download.file)).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    if let Ok(value) = HeaderValue::from_str(&download.bytes.to_string()) {
        headers.insert(header::CONTENT_LENGTH, value);
    }
    headers.insert(
        header::CONTENT_DISPOSITION,
        HeaderValue::from_static("attachment; filename=\"gatehouse-backup.redb\""),
    );
    Ok(response)
}
