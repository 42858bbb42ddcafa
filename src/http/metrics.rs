//! `GET /metrics`: Prometheus text, for a scraper on the same host (loopback) or with
//! an admin token.
//!
//! Every value is read from state the services keep anyway (counters, in-memory tables,
//! the jobs' stored state); answering costs one read transaction and no write. The HTTP
//! responses and their durations are counted here (`HttpCounters`, the outermost
//! middleware), with atomics only: counting adds no lock to any request.

use axum::Router;
use axum::routing::get;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::extract::{FromRequestParts, Request, State};
use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode, header};

use super::AppState;
use super::error::ApiError;
use super::extract::{Admin, Peer};
use crate::config::JobName;

/// This resource's routes.
pub(super) fn routes() -> Router<AppState> {
    Router::new().route("/metrics", get(metrics))
}

const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Upper bounds (seconds) of the request-duration histogram's buckets; `+Inf` follows.
const DURATION_BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

/// Responses by status class, and how long requests took until their response.
#[derive(Debug, Default)]
pub(crate) struct HttpCounters {
    /// 1xx to 5xx.
    by_class: [AtomicU64; 5],
    /// Requests per duration bucket (not cumulative; the last is beyond every bound).
    buckets: [AtomicU64; DURATION_BUCKETS.len() + 1],
    duration_micros: AtomicU64,
    /// Connections open now, and how many of them rest between requests (see `serve`).
    pub(super) connections_open: AtomicU64,
    pub(super) connections_resting: AtomicU64,
}

impl HttpCounters {
    /// Counts one response (`super::edge` calls it for every response, those of other
    /// middleware included: timeouts, body limits, bans, CORS preflights).
    pub(super) fn record(&self, status: StatusCode, seconds: f64) {
        let class = usize::from(status.as_u16() / 100).clamp(1, 5) - 1;
        self.by_class[class].fetch_add(1, Ordering::Relaxed);
        let bucket = DURATION_BUCKETS
            .iter()
            .position(|bound| seconds <= *bound)
            .unwrap_or(DURATION_BUCKETS.len());
        self.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        self.duration_micros
            .fetch_add((seconds * 1e6) as u64, Ordering::Relaxed);
    }

    /// Responses counted since start.
    pub(super) fn total(&self) -> u64 {
        self.by_class
            .iter()
            .map(|n| n.load(Ordering::Relaxed))
            .sum()
    }

    /// `{class="2xx"}` samples, after `labels` (`route="/api",`, or empty).
    pub(super) fn class_samples(&self, labels: &str) -> Vec<(String, f64)> {
        self.by_class
            .iter()
            .enumerate()
            .map(|(i, n)| {
                let count = n.load(Ordering::Relaxed) as f64;
                (format!("{{{labels}class=\"{}xx\"}}", i + 1), count)
            })
            .collect()
    }

    /// A histogram's `_bucket`, `_sum` and `_count` samples, after `labels` (as above).
    pub(super) fn duration_samples(&self, labels: &str) -> Vec<(String, f64)> {
        let mut samples = Vec::with_capacity(DURATION_BUCKETS.len() + 3);
        let mut cumulative = 0u64;
        for (i, n) in self.buckets.iter().enumerate() {
            cumulative += n.load(Ordering::Relaxed);
            let bound = DURATION_BUCKETS
                .get(i)
                .map_or_else(|| "+Inf".to_string(), |b| b.to_string());
            samples.push((
                format!("_bucket{{{labels}le=\"{bound}\"}}"),
                cumulative as f64,
            ));
        }
        let alone = match labels.strip_suffix(',') {
            Some(labels) => format!("{{{labels}}}"),
            None => String::new(),
        };
        let sum = self.duration_micros.load(Ordering::Relaxed) as f64 / 1e6;
        samples.push((format!("_sum{alone}"), sum));
        samples.push((format!("_count{alone}"), cumulative as f64));
        samples
    }

    fn render(&self, out: &mut String) {
        metric(
            out,
            "gatehouse_http_responses_total",
            "counter",
            "HTTP responses since start, by status class.",
            &self.class_samples(""),
        );
        metric(
            out,
            "gatehouse_http_request_duration_seconds",
            "histogram",
            "Time from a request's arrival to its response head, since start.",
            &self.duration_samples(""),
        );
        metric(
            out,
            "gatehouse_http_connections_open",
            "gauge",
            "Client connections open now (after their TLS handshake began).",
            &[(
                String::new(),
                self.connections_open.load(Ordering::Relaxed) as f64,
            )],
        );
        metric(
            out,
            "gatehouse_http_connections_resting",
            "gauge",
            "Kept-alive HTTP/1 connections waiting for their next request with only their TLS state held.",
            &[(
                String::new(),
                self.connections_resting.load(Ordering::Relaxed) as f64,
            )],
        );
    }
}

/// Loopback callers need nothing more; others need an admin token. The caller is the
/// real client (behind a trusted proxy, the address it forwarded). A loopback peer that
/// is not a trusted proxy but sends forwarding headers is a proxy nobody declared: the
/// client is somewhere else, so it needs the token too.
async fn metrics(State(state): State<AppState>, request: Request) -> Response {
    let (mut parts, _) = request.into_parts();
    let undeclared_proxy = parts
        .extensions
        .get::<super::client_addr::ForwardedBy>()
        .is_none()
        && (parts.headers.contains_key("forwarded")
            || parts.headers.contains_key("x-forwarded-for"));
    let loopback = match Peer::from_request_parts(&mut parts, &state).await {
        Ok(Peer(peer)) => peer.ip().to_canonical().is_loopback() && !undeclared_proxy,
        Err(err) => return err.into_response(),
    };
    if !loopback && let Err(refusal) = Admin::from_request_parts(&mut parts, &state).await {
        return refusal;
    }
    match render(&state) {
        Ok(text) => {
            let mut response = (StatusCode::OK, text).into_response();
            response
                .headers_mut()
                .insert(header::CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE));
            response
        }
        Err(err) => err.into_response(),
    }
}

pub(super) fn metric(
    out: &mut String,
    name: &str,
    kind: &str,
    help: &str,
    samples: &[(String, f64)],
) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
    for (labels, value) in samples {
        let _ = writeln!(out, "{name}{labels} {value}");
    }
}

fn job_label(job: JobName) -> String {
    format!("{{job=\"{}\"}}", job.as_str())
}

fn render(state: &AppState) -> Result<String, ApiError> {
    let services = &state.services;
    let mut out = String::with_capacity(4096);
    state.http_counters.render(&mut out);
    let single = |value: f64| vec![(String::new(), value)];
    metric(
        &mut out,
        "gatehouse_build_info",
        "gauge",
        "Always 1; the version is a label.",
        &[(
            format!("{{version=\"{}\"}}", env!("CARGO_PKG_VERSION")),
            1.0,
        )],
    );
    metric(
        &mut out,
        "gatehouse_ratelimit_refused_total",
        "counter",
        "Requests refused by a rate limit since start.",
        &single(services.limits.refused_total() as f64),
    );
    metric(
        &mut out,
        "gatehouse_ratelimit_tracked_subjects",
        "gauge",
        "Subjects whose rate-limit window is held in memory.",
        &single(services.limits.tracked() as f64),
    );
    metric(
        &mut out,
        "gatehouse_bans_active",
        "gauge",
        "Addresses banned by lockout now.",
        &single(services.lockout.active() as f64),
    );
    metric(
        &mut out,
        "gatehouse_authz_checks_total",
        "counter",
        "Forward-auth checks (GET /v1/authz) since start, by outcome.",
        &state.authz.outcome_samples(),
    );
    metric(
        &mut out,
        "gatehouse_authz_checks_by_method_total",
        "counter",
        "Forward-auth checks since start, by the original method a trusted proxy forwarded.",
        &state.authz.method_samples(),
    );
    if let Some(front) = &state.front {
        metric(
            &mut out,
            "gatehouse_front_requests_total",
            "counter",
            "Requests for the app behind the front door since start, by outcome.",
            &state.front_counters.samples(),
        );
        state.front_counters.render_routes(&mut out, front);
    }
    let (tokens, families, devices) = services.revocations.counts();
    metric(
        &mut out,
        "gatehouse_revocations",
        "gauge",
        "Revocations held in memory, by kind.",
        &[
            ("{kind=\"token\"}".into(), tokens as f64),
            ("{kind=\"family\"}".into(), families as f64),
            ("{kind=\"device\"}".into(), devices as f64),
        ],
    );
    metric(
        &mut out,
        "gatehouse_revocation_journal_families",
        "gauge",
        "Families revoked in the revocation journal and not yet folded into their rows.",
        &single(services.revocations.journaled().len() as f64),
    );
    metric(
        &mut out,
        "gatehouse_store_commits_total",
        "counter",
        "Write transactions committed to the data file since start.",
        &single(services.store.commits() as f64),
    );
    let audit_records = services
        .store
        .read(|tx| tx.audit_len())
        .map_err(|e| ApiError::internal(&e))?;
    metric(
        &mut out,
        "gatehouse_audit_records",
        "gauge",
        "Records in the audit log.",
        &single(audit_records as f64),
    );
    let jobs = services.jobs.list()?;
    let mut runs = Vec::new();
    let mut failures = Vec::new();
    let mut running = Vec::new();
    let mut last_success = Vec::new();
    let mut duration = Vec::new();
    for job in JobName::ALL {
        let (ok, failed) = services.jobs.run_counts(job);
        runs.push((
            format!("{{job=\"{}\",outcome=\"success\"}}", job.as_str()),
            ok as f64,
        ));
        runs.push((
            format!("{{job=\"{}\",outcome=\"failure\"}}", job.as_str()),
            failed as f64,
        ));
        if let Some(view) = jobs.iter().find(|v| v.name == job.as_str()) {
            failures.push((job_label(job), f64::from(view.failures)));
            running.push((job_label(job), if view.running { 1.0 } else { 0.0 }));
            if let Some(ms) = view.last_duration_ms {
                duration.push((job_label(job), ms as f64 / 1000.0));
            }
            if let Some(at) = view
                .last_success
                .as_deref()
                .and_then(|t| humantime::parse_rfc3339(t).ok())
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            {
                last_success.push((job_label(job), at.as_secs_f64()));
            }
        }
    }
    metric(
        &mut out,
        "gatehouse_job_runs_total",
        "counter",
        "Runs of each scheduled job since start, by outcome.",
        &runs,
    );
    metric(
        &mut out,
        "gatehouse_job_failures_in_a_row",
        "gauge",
        "Failed runs in a row of each job (0 after a success).",
        &failures,
    );
    metric(
        &mut out,
        "gatehouse_job_running",
        "gauge",
        "1 while the job runs.",
        &running,
    );
    metric(
        &mut out,
        "gatehouse_job_last_duration_seconds",
        "gauge",
        "How long the job's last run took.",
        &duration,
    );
    metric(
        &mut out,
        "gatehouse_job_last_success_timestamp_seconds",
        "gauge",
        "When the job last succeeded (Unix time).",
        &last_success,
    );
    if let Some(tls) = &state.services.tls {
        render_tls(&mut out, &tls.status());
    }
    Ok(out)
}

fn render_tls(out: &mut String, status: &crate::tls::TlsStatus) {
    let seconds = |ms: u64| ms as f64 / 1000.0;
    if let Some(cert) = &status.certificate {
        metric(
            out,
            "gatehouse_tls_certificate_expiry_timestamp_seconds",
            "gauge",
            "When the served certificate expires (Unix time).",
            &[(
                format!("{{mode=\"{}\"}}", status.mode),
                seconds(cert.not_after_ms),
            )],
        );
    }
    let Some(acme) = &status.acme else { return };
    let one = |v: f64| [(String::new(), v)];
    metric(
        out,
        "gatehouse_acme_certificate_issued",
        "gauge",
        "1 once a certificate from the ACME CA is served (0: the self-signed stand-in).",
        &one(f64::from(u8::from(acme.issued))),
    );
    metric(
        out,
        "gatehouse_acme_orders_total",
        "counter",
        "ACME orders started since start.",
        &one(acme.orders_started as f64),
    );
    metric(
        out,
        "gatehouse_acme_certificates_issued_total",
        "counter",
        "Certificates obtained from the ACME CA since start.",
        &one(acme.certificates_issued as f64),
    );
    metric(
        out,
        "gatehouse_acme_failures_total",
        "counter",
        "Failed ACME orders since start.",
        &one(acme.failures_total as f64),
    );
    metric(
        out,
        "gatehouse_acme_failures_in_a_row",
        "gauge",
        "Failed ACME orders in a row (0 after a success).",
        &one(f64::from(acme.failures_in_row)),
    );
    if let Some(at) = acme.next_attempt_at_ms {
        metric(
            out,
            "gatehouse_acme_next_attempt_timestamp_seconds",
            "gauge",
            "When the next ACME order is due after a failure (Unix time).",
            &one(seconds(at)),
        );
    }
    if let Some(at) = acme.renew_at_ms {
        metric(
            out,
            "gatehouse_acme_renewal_timestamp_seconds",
            "gauge",
            "When the served certificate is due for renewal (Unix time).",
            &one(seconds(at)),
        );
    }
}
