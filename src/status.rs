//! What an operator should fix: a list of warnings, each with a stable `code` and a
//! sentence saying what to do, read from the services of one instance. The admin UI's
//! overview shows them (`GET /v1/status`) and `gatehouse doctor` prints them.

use serde::{Deserialize, Serialize};

use crate::admin_tokens::AdminTokenError;
use crate::config::KeyOrigin;
use crate::services::Services;
use crate::store::StoreError;

/// A certificate this close to expiry is worth a warning.
const EXPIRY_WARNING_MS: u64 = 14 * 24 * 3600 * 1000;

/// One thing to fix.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Warning {
    pub(crate) code: String,
    pub(crate) message: String,
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum StatusError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    AdminTokens(#[from] AdminTokenError),
}

impl crate::error_kind::Classify for StatusError {
    fn kind(&self) -> crate::error_kind::ErrorKind {
        match self {
            Self::Store(err) => err.kind(),
            Self::AdminTokens(err) => err.kind(),
        }
    }
}

/// Every warning that applies now. `tls_off` says whether the configuration turns TLS
/// off: with no listener in `services` (a command run while no server runs) and TLS
/// configured, TLS is not judged here.
pub(crate) fn warnings(services: &Services, tls_off: bool) -> Result<Vec<Warning>, StatusError> {
    let mut warnings = Vec::new();
    let mut warn = |code: &str, message: String| {
        warnings.push(Warning {
            code: code.into(),
            message,
        })
    };
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
    let server = services.pairing.server();
    if let Err(err) = server.reachable_from(None) {
        warn("pairing_uri_unreachable", err.to_string());
    }
    let tokens = services.admin_tokens.list()?;
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
        // Without a listener (a command run while no server runs) there is nothing to say.
        None if !tls_off => {}
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
    Ok(warnings)
}
