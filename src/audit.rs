//! The audit log: event types, who caused them, appending, queries, chain checks and
//! retention.
//!
//! Every security-relevant action appends an `Event` with its `Origin` (who, from
//! where, which request). An action that writes to the data file appends its event in
//! the same transaction (`append`), so the record is durable exactly when the action
//! is, and before the action is acknowledged; an event that stands alone (a refused
//! secret, a start or stop) goes through `AuditLog::record`, which shares the
//! group-commit writer with everything else. The event catalogue is
//! `schema/audit-events.md`; the storage and its tag chain are `store::audit_chain`.
//!
//! This module must not decide policy: it records what other modules report.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use serde_json::{Map, Value};

use crate::clock::{SharedClock, format_rfc3339, millis};
use crate::error_kind::{Classify, ErrorKind};
use crate::store::records::{AuditEntry, ChainPlace};
use crate::store::{AuditPage, ChainReport, Store, StoreError, WriteTx};

/// Records pruned per write transaction: small enough that other writes queued behind
/// a chunk wait a few milliseconds at most.
pub const PRUNE_CHUNK: u64 = 5_000;
/// Largest page of `GET /v1/audit` and `audit search`.
pub const MAX_PAGE: usize = 1_000;
/// Rows a query looks at before answering with a cursor, whatever its filter.
const MAX_SCAN: usize = 50_000;

/// How much an event matters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Severity {
    Info,
    Notice,
    Warning,
    High,
}

impl Severity {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Info => "info",
            Self::Notice => "notice",
            Self::Warning => "warning",
            Self::High => "high",
        }
    }
}

/// Whether the action happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Outcome {
    Success,
    Failure,
}

impl Outcome {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Success => "success",
            Self::Failure => "failure",
        }
    }
}

/// Who caused an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Actor {
    /// An admin token, by its id.
    Admin(String),
    /// A command on the admin socket or run on the data file directly (the local
    /// operator; the socket admits only the server's own user and root).
    Operator,
    Device(String),
    Client(String),
    /// gatehouse itself: start, stop, scheduled jobs, pruning.
    System,
    /// A caller not (yet) identified, e.g. a refused credential.
    Anonymous,
}

impl Actor {
    /// The stored text form: `admin:<id>`, `operator`, `device:<id>`, `client:<id>`,
    /// `system`, `anonymous`.
    pub(crate) fn to_text(&self) -> String {
        match self {
            Self::Admin(id) => format!("admin:{id}"),
            Self::Operator => "operator".into(),
            Self::Device(id) => format!("device:{id}"),
            Self::Client(id) => format!("client:{id}"),
            Self::System => "system".into(),
            Self::Anonymous => "anonymous".into(),
        }
    }
}

/// Who caused an event, from where, in which request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub(crate) actor: Actor,
    pub(crate) source: Option<IpAddr>,
    pub(crate) request_id: Option<String>,
}

impl Origin {
    pub fn system() -> Self {
        Self {
            actor: Actor::System,
            source: None,
            request_id: None,
        }
    }

    pub fn operator() -> Self {
        Self {
            actor: Actor::Operator,
            source: None,
            request_id: None,
        }
    }

    /// A request over the network, before anyone is identified.
    pub fn request(source: IpAddr, request_id: Option<String>) -> Self {
        Self {
            actor: Actor::Anonymous,
            source: Some(source),
            request_id,
        }
    }

    /// The same request, now known to come from `actor`.
    #[must_use]
    pub fn as_actor(&self, actor: Actor) -> Self {
        Self {
            actor,
            ..self.clone()
        }
    }
}

/// One thing that happened, before it is stamped with a time and an origin.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub(crate) kind: &'static str,
    pub(crate) severity: Severity,
    pub(crate) outcome: Outcome,
    pub(crate) device: Option<String>,
    pub(crate) details: Map<String, Value>,
}

impl Event {
    /// A successful event at `info`.
    pub fn new(kind: &'static str) -> Self {
        Self {
            kind,
            severity: Severity::Info,
            outcome: Outcome::Success,
            device: None,
            details: Map::new(),
        }
    }

    /// A failed attempt, at `warning` unless raised later.
    pub(crate) fn failure(kind: &'static str) -> Self {
        Self {
            outcome: Outcome::Failure,
            severity: Severity::Warning,
            ..Self::new(kind)
        }
    }

    #[must_use]
    pub(crate) fn severity(mut self, severity: Severity) -> Self {
        self.severity = severity;
        self
    }

    /// The device this event concerns (found by the `device` filter).
    #[must_use]
    pub fn device(mut self, id: impl std::fmt::Display) -> Self {
        self.device = Some(id.to_string());
        self
    }

    #[must_use]
    pub fn detail(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.details.insert(key.to_string(), value.into());
        self
    }

    /// The stored form of this event, stamped with `origin` and `time_ms`; the store
    /// sets `prev` when it appends.
    fn to_entry(&self, origin: &Origin, time_ms: u64) -> AuditEntry {
        AuditEntry {
            time_ms,
            kind: self.kind.to_string(),
            severity: self.severity.as_str().to_string(),
            actor: origin.actor.to_text(),
            source: origin.source.map(|ip| ip.to_canonical().to_string()),
            request_id: origin.request_id.clone(),
            outcome: self.outcome.as_str().to_string(),
            device: self.device.clone(),
            // A map of strings to JSON values always serialises; the compact form is the
            // same as `Value::Object(..).to_string()`.
            details: serde_json::to_string(&self.details).unwrap_or_default(),
            prev: [0; 32],
        }
    }
}

/// Appends `event` inside a write transaction the caller is already running, so the
/// record commits with the action it describes. The event is borrowed because the
/// writer may run the job again if it retries it.
pub fn append(
    tx: &WriteTx<'_>,
    origin: &Origin,
    event: &Event,
    now_ms: u64,
) -> Result<(), StoreError> {
    tx.append_audit(&mut event.to_entry(origin, now_ms))
}

/// One event as the API, the CLI and exports show it.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct EventView {
    pub seq: u64,
    pub time: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub severity: String,
    pub actor: String,
    pub source: Option<String>,
    pub(crate) request_id: Option<String>,
    pub outcome: String,
    pub device: Option<String>,
    pub details: Value,
}

impl EventView {
    fn from_entry(seq: u64, entry: AuditEntry) -> Self {
        let details = serde_json::from_str(&entry.details)
            .unwrap_or_else(|_| Value::String(entry.details.clone()));
        Self {
            seq,
            time: format_rfc3339(entry.time_ms),
            kind: entry.kind,
            severity: entry.severity,
            actor: entry.actor,
            source: entry.source,
            request_id: entry.request_id,
            outcome: entry.outcome,
            device: entry.device,
            details,
        }
    }
}

/// A query over the log.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Query {
    /// Only events with a sequence number above this.
    pub after: u64,
    /// Only this event type (`device.revoked`) or type family (`device.` or `device.*`).
    pub kind: Option<String>,
    /// Only events concerning this device.
    pub device: Option<String>,
    pub limit: usize,
}

/// A query the caller got wrong: which parameter, and what it must be.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error("`limit` must be between 1 and {MAX_PAGE}")]
    Limit,
    #[error("`type` is an event type such as device.revoked, or a family such as device.*")]
    Kind,
    #[error("`device` must be a device id (dev_ and 32 hex characters)")]
    Device,
}

impl Classify for QueryError {
    fn kind(&self) -> ErrorKind {
        match self {
            Self::Limit | Self::Kind | Self::Device => ErrorKind::Invalid,
        }
    }
}

/// Events per page when a query names no limit.
pub(crate) const DEFAULT_PAGE: usize = 100;

impl Query {
    /// A query from what a caller sent (the API's parameters, the CLI's flags): `kind`
    /// is an event type or a family (`device.*`), `device` a device id.
    pub(crate) fn parse(
        after: Option<u64>,
        kind: Option<String>,
        device: Option<String>,
        limit: Option<usize>,
    ) -> Result<Self, QueryError> {
        let limit = limit.unwrap_or(DEFAULT_PAGE);
        if !(1..=MAX_PAGE).contains(&limit) {
            return Err(QueryError::Limit);
        }
        if let Some(kind) = &kind
            && (kind.is_empty()
                || kind.len() > 64
                || !kind
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b"._*".contains(&b)))
        {
            return Err(QueryError::Kind);
        }
        if device
            .as_deref()
            .is_some_and(|d| crate::ids::DeviceId::parse(d).is_none())
        {
            return Err(QueryError::Device);
        }
        Ok(Self {
            after: after.unwrap_or(0),
            kind,
            device,
            limit,
        })
    }

    fn matches(&self, entry: &AuditEntry) -> bool {
        let kind_ok = match self.kind.as_deref() {
            None => true,
            Some(kind) => match kind
                .strip_suffix('*')
                .or_else(|| kind.ends_with('.').then_some(kind))
            {
                Some(prefix) => entry.kind.starts_with(prefix),
                None => entry.kind == kind,
            },
        };
        kind_ok
            && self
                .device
                .as_deref()
                .is_none_or(|device| entry.device.as_deref() == Some(device))
    }
}

/// A page of events and the cursor for the next one.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct EventPage {
    pub events: Vec<EventView>,
    /// Pass as `after` to continue; `null` when nothing more matched yet.
    pub next: Option<u64>,
}

/// The result of `audit verify`, as the API and the CLI show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct VerifyReport {
    /// True when every record's tag and link checked out.
    pub ok: bool,
    pub records: u64,
    pub first_seq: Option<u64>,
    pub last_seq: Option<u64>,
    /// The last record's tag (hex): keep it elsewhere to detect removal from the end.
    pub head_tag: Option<String>,
    /// Records pruned before the first one kept.
    pub pruned: u64,
    /// The first bad sequence number, when `ok` is false.
    pub bad_seq: Option<u64>,
    pub problem: Option<String>,
    /// On PostgreSQL, each node's own chain: where it ends (keep these too).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub chains: Vec<ChainTipView>,
    /// Checkpoint records that vouched for other nodes' chains, all checked.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub checkpoints: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// The end of one node's audit chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct ChainTipView {
    /// The chain's number, 16 hex digits.
    pub chain: String,
    /// How many records it holds in all (pruned ones included).
    pub records: u64,
    /// Its last record's tag (hex).
    pub head_tag: String,
}

impl From<ChainReport> for VerifyReport {
    fn from(report: ChainReport) -> Self {
        Self {
            ok: report.broken.is_none(),
            records: report.records,
            first_seq: report.first_seq,
            last_seq: report.head.as_ref().map(|(seq, _)| *seq),
            head_tag: report.head.map(|(_, tag)| tag),
            pruned: report.checkpoint.map_or(0, |cp| cp.pruned),
            bad_seq: report.broken.as_ref().map(|b| b.seq),
            problem: report.broken.map(|b| b.reason),
            chains: report
                .chains
                .into_iter()
                .map(|tip| ChainTipView {
                    chain: format!("{:016x}", tip.chain),
                    records: tip.n,
                    head_tag: tip.tag,
                })
                .collect(),
            checkpoints: report.bindings,
        }
    }
}

/// What a retention run did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct PruneSummary {
    pub removed: u64,
    pub chunks: u64,
}

/// The audit log of one instance.
#[derive(Debug, Clone)]
pub struct AuditLog {
    store: Store,
    clock: SharedClock,
    retention: Duration,
    /// Refusals counted since the last coalesced write.
    refusals: Arc<Mutex<Refusals>>,
}

/// Refusals kept apart in one interval at most; the rest are counted together.
const MAX_REFUSAL_KEYS: usize = 1024;

/// Refused requests of one interval, by event, reason, where and from whom: a flood of
/// refusals costs a counter each, and one record per class a minute.
#[derive(Debug, Default)]
struct Refusals {
    by_key: HashMap<(&'static str, &'static str, String, IpAddr), u64>,
    /// Refusals beyond `MAX_REFUSAL_KEYS` classes, by event.
    overflow: HashMap<&'static str, u64>,
}

impl AuditLog {
    pub fn new(store: Store, clock: SharedClock, retention: Duration) -> Self {
        Self {
            store,
            clock,
            retention,
            refusals: Arc::default(),
        }
    }

    /// Counts one refused request (`event`, e.g. `front.refused`) for the coalesced
    /// record: why, where (a route), and from which address.
    pub(crate) fn count_refusal(
        &self,
        event: &'static str,
        reason: &'static str,
        place: &str,
        source: IpAddr,
    ) {
        let mut refusals = self.refusals.lock().unwrap_or_else(|p| p.into_inner());
        let full = refusals.by_key.len() >= MAX_REFUSAL_KEYS;
        let key = (event, reason, place.to_string(), source);
        match refusals.by_key.get_mut(&key) {
            Some(count) => *count += 1,
            None if full => *refusals.overflow.entry(event).or_default() += 1,
            None => {
                refusals.by_key.insert(key, 1);
            }
        }
    }

    /// Writes one record per class of refusal counted since the last call (`refused`:
    /// how many, `since`: from when), all in one transaction. Called every minute and at
    /// stop, with the rate-limit refusals.
    pub async fn write_refusals(&self, since_ms: u64) -> Result<usize, StoreError> {
        let taken = std::mem::take(&mut *self.refusals.lock().unwrap_or_else(|p| p.into_inner()));
        let since = format_rfc3339(since_ms);
        let mut events: Vec<(Origin, Event)> = taken
            .by_key
            .into_iter()
            .map(|((event, reason, place, source), count)| {
                let record = Event::failure(event)
                    .severity(Severity::Notice)
                    .detail("reason", reason)
                    .detail("route", place)
                    .detail("refused", count)
                    .detail("since", since.clone());
                (Origin::request(source, None), record)
            })
            .collect();
        for (event, count) in taken.overflow {
            events.push((
                Origin::system(),
                Event::failure(event)
                    .severity(Severity::Notice)
                    .detail("reason", "other classes")
                    .detail("refused", count)
                    .detail("since", since.clone()),
            ));
        }
        if events.is_empty() {
            return Ok(0);
        }
        let count = events.len();
        self.record_many(events).await?;
        Ok(count)
    }

    /// Appends one event in a transaction of its own (batched with whatever else the
    /// writer has waiting) and answers once it is durable.
    pub async fn record(&self, origin: &Origin, event: Event) -> Result<(), StoreError> {
        // Built here, on the caller's task, so the writer only stamps the time, links
        // and tags the record; the time is read when the job runs, so times follow the
        // order of the log.
        let mut entry = event.to_entry(origin, 0);
        let clock = self.clock.clone();
        self.store
            .write(move |tx| {
                entry.time_ms = clock.now_ms();
                tx.append_audit(&mut entry)
            })
            .await
    }

    /// Appends several events in one transaction.
    pub async fn record_many(&self, events: Vec<(Origin, Event)>) -> Result<(), StoreError> {
        let clock = self.clock.clone();
        self.store
            .write(move |tx| {
                let now = clock.now_ms();
                for (origin, event) in &events {
                    append(tx, origin, event, now)?;
                }
                Ok::<_, StoreError>(())
            })
            .await
    }

    /// Like `record`, for events whose loss must not fail the caller (a stop, a refused
    /// request): a failure to write is logged instead.
    pub(crate) async fn record_or_log(&self, origin: &Origin, event: Event) {
        let kind = event.kind;
        if let Err(err) = self.record(origin, event).await {
            tracing::error!(error = %err, event = kind, "cannot write an audit record");
        }
    }

    /// Writes a checkpoint (`audit.checkpoint`) that vouches for where every other
    /// node's audit chain stands, when any moved since the last one this process wrote
    /// (`bound` remembers them). Returns how many chains it bound (0: nothing written).
    /// The checkpoint is what makes a node's chain cut short fail `audit verify`.
    pub(crate) async fn bind_chains(
        &self,
        bound: &mut HashMap<u64, u64>,
    ) -> Result<usize, StoreError> {
        let own = self.store.own_audit_chain();
        let heads = self.store.read(|tx| tx.audit_chain_heads())?;
        let places: Vec<ChainPlace> = heads
            .into_iter()
            .filter(|(chain, head)| Some(*chain) != own && bound.get(chain) != Some(&head.n))
            .map(|(chain, head)| ChainPlace { chain, n: head.n })
            .collect();
        if places.is_empty() {
            return Ok(0);
        }
        let event = Event::new("audit.checkpoint").detail("chains", places.len());
        let mut entry = event.to_entry(&Origin::system(), 0);
        let clock = self.clock.clone();
        let binding = places.clone();
        self.store
            .write(move |tx| {
                entry.time_ms = clock.now_ms();
                tx.append_audit_binding(&mut entry, &binding)
            })
            .await?;
        bound.extend(places.iter().map(|place| (place.chain, place.n)));
        Ok(places.len())
    }

    /// A page of matching events, oldest first.
    pub fn query(&self, query: &Query) -> Result<EventPage, StoreError> {
        let limit = query.limit.clamp(1, MAX_PAGE);
        let AuditPage { entries, next } = self
            .store
            .read(|tx| tx.audit_page(query.after, limit, MAX_SCAN, &|e| query.matches(e)))?;
        Ok(EventPage {
            events: entries
                .into_iter()
                .map(|(seq, entry)| EventView::from_entry(seq, entry))
                .collect(),
            next,
        })
    }

    /// The newest `count` events, oldest first.
    pub(crate) fn tail(&self, count: usize) -> Result<Vec<EventView>, StoreError> {
        let entries = self.store.read(|tx| tx.audit_last(count.min(MAX_PAGE)))?;
        Ok(entries
            .into_iter()
            .map(|(seq, entry)| EventView::from_entry(seq, entry))
            .collect())
    }

    /// Checks every tag and link of the log; blocking (call from `spawn_blocking`).
    pub fn verify(&self, progress: &mut dyn FnMut(u64, u64)) -> Result<ChainReport, StoreError> {
        self.store.read(|tx| tx.audit_verify(progress))
    }

    /// `verify`, as a report for the API and the CLI.
    pub fn verify_report(
        &self,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<VerifyReport, StoreError> {
        self.verify(progress).map(VerifyReport::from)
    }

    /// Removes events older than the retention period, `PRUNE_CHUNK` per transaction,
    /// yielding between chunks so requests keep flowing. The last chunk records an
    /// `audit.pruned` event in the same transaction.
    pub async fn prune(&self) -> Result<PruneSummary, StoreError> {
        let cutoff = self.clock.now_ms().saturating_sub(millis(self.retention));
        let mut summary = PruneSummary::default();
        loop {
            let clock = self.clock.clone();
            let total_before = summary.removed;
            let retention_days = self.retention.as_secs() / 86_400;
            let pruned = self
                .store
                .write(move |tx| {
                    let pruned = tx.prune_audit(cutoff, PRUNE_CHUNK)?;
                    if !pruned.more && total_before + pruned.removed > 0 {
                        let event = Event::new("audit.pruned")
                            .detail("removed", total_before + pruned.removed)
                            .detail("before", format_rfc3339(cutoff))
                            .detail("retention_days", retention_days);
                        append(tx, &Origin::system(), &event, clock.now_ms())?;
                    }
                    Ok::<_, StoreError>(pruned)
                })
                .await?;
            summary.removed += pruned.removed;
            summary.chunks += 1;
            if !pruned.more {
                return Ok(summary);
            }
            tokio::task::yield_now().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(kind: &str, device: Option<&str>) -> AuditEntry {
        let mut e = Event::new("x").to_entry(&Origin::system(), 1);
        e.kind = kind.into();
        e.device = device.map(str::to_string);
        e
    }

    #[test]
    fn kind_filter_exact_and_family() {
        let q = |kind: &str| Query {
            kind: Some(kind.into()),
            ..Query::default()
        };
        let revoked = entry("device.revoked", None);
        assert!(q("device.revoked").matches(&revoked));
        assert!(!q("device.renamed").matches(&revoked));
        assert!(q("device.*").matches(&revoked));
        assert!(q("device.").matches(&revoked));
        assert!(!q("device").matches(&revoked));
        assert!(!q("token.*").matches(&revoked));
    }

    #[test]
    fn device_filter() {
        let q = Query {
            device: Some("dev_a".into()),
            ..Query::default()
        };
        assert!(q.matches(&entry("x", Some("dev_a"))));
        assert!(!q.matches(&entry("x", Some("dev_b"))));
        assert!(!q.matches(&entry("x", None)));
    }

    #[test]
    fn entries_carry_origin_and_details() {
        let origin = Origin::request(
            "::ffff:192.0.2.1".parse().unwrap_or(IpAddr::from([0; 4])),
            Some("r1".into()),
        )
        .as_actor(Actor::Admin("adm_1".into()));
        let e = Event::failure("login.failed")
            .detail("method", "admin_token")
            .to_entry(&origin, 7);
        assert_eq!(e.actor, "admin:adm_1");
        assert_eq!(e.source.as_deref(), Some("192.0.2.1"));
        assert_eq!(e.outcome, "failure");
        assert_eq!(e.severity, "warning");
        assert_eq!(e.details, r#"{"method":"admin_token"}"#);
    }
}
