//! `GET /v1/status` (admin): what an operator should fix, as a list of warnings the admin
//! UI's overview shows. Each has a stable `code` and a sentence saying what to do.

use axum::Json;
use axum::extract::State;
use serde::Serialize;

use super::AppState;
use super::error::ApiError;
use super::extract::Admin;
use crate::config::KeyOrigin;

/// A certificate this close to expiry is worth a warning.
const EXPIRY_WARNING_MS: u64 = 14 * 24 * 3600 * 1000;

#[derive(Debug, Serialize)]
pub(crate) struct Warning {
    code: &'static str,
    message: String,
}

#[derive(Debug, Serialize)]
pub(crate) struct Status {
    warnings: Vec<Warning>,
}

pub(crate) async fn status(
    State(state): State<AppState>,
    _admin: Admin,
) -> Result<Json<Status>, ApiError> {
    let services = &state.services;
    let mut warnings = Vec::new();
    let mut warn = |code, message: String| warnings.push(Warning { code, message });
    if services.master_key.origin == KeyOrigin::BesideDataFile {
        warn(
            "master_key_beside_data",
            format!(
                "the master key ({}) sits beside the data file: whoever copies that directory \
                 has both. Move it and hand it over as a systemd credential or \
                 GATEHOUSE_MASTER_KEY_FILE",
                services.master_key.path.display()
            ),
        );
    }
    let tokens = services
        .admin_tokens
        .list()
        .map_err(|e| ApiError::internal(&e))?;
    if tokens
        .iter()
        .any(|t| t.name == "bootstrap" && t.revoked_at_ms.is_none())
    {
        warn(
            "bootstrap_token_active",
            "the bootstrap admin token, printed at the first start, is still active: create a \
             named token or an admin user, then revoke it"
                .into(),
        );
    }
    let now = services.clock.now_ms();
    match services.tls.as_ref().map(|tls| tls.status()) {
        None => warn(
            "tls_off",
            "TLS is off: this server must sit behind a TLS proxy on the same host".into(),
        ),
        Some(tls) => {
            if let Some(cert) = &tls.certificate
                && cert.not_after_ms.saturating_sub(now) < EXPIRY_WARNING_MS
            {
                warn(
                    "certificate_expiring",
                    format!(
                        "the certificate expires at {}",
                        crate::clock::format_rfc3339(cert.not_after_ms)
                    ),
                );
            }
            if let Some(acme) = &tls.acme
                && acme.failures_in_row > 0
            {
                warn(
                    "acme_failing",
                    format!(
                        "{} ACME order(s) failed in a row; last error: {}",
                        acme.failures_in_row,
                        acme.last_error.as_deref().unwrap_or("unknown")
                    ),
                );
            }
        }
    }
    let jobs = services.jobs.list()?;
    for job in jobs {
        if job.name == "backup" && job.schedule == "off" {
            warn(
                "backups_off",
                "scheduled backups are off (jobs.backup): take backups another way".into(),
            );
        }
        if job.failures > 0 {
            warn(
                "job_failing",
                format!(
                    "the {} job failed {} time(s) in a row",
                    job.name, job.failures
                ),
            );
        }
    }
    Ok(Json(Status { warnings }))
}
