//! The audit log's storage: an append-only, tag-chained table.
//!
//! Each row is `tag ‖ record`, where `record` is the postcard `AuditEntryRecord` (which
//! holds `prev`, the tag of the record before it) and `tag` is HMAC-SHA256 under the
//! chain key over a domain label, the sequence number and `record`. Altering a record
//! breaks its own tag; removing or reordering one breaks the next record's `prev`. The
//! chain key is random, made once per data file and sealed under the master key in
//! `secrets.v1`, so someone who can edit the file but does not hold the master key
//! cannot forge a tag (a plain hash chain could simply be recomputed).
//!
//! Pruning removes the oldest rows and writes a checkpoint, tagged the same way, that
//! names the first kept sequence number and the tag the first kept record must carry,
//! so verification still proves the remaining log is whole. Removing records from the
//! end leaves a shorter valid chain; `audit verify` prints the head (sequence and tag)
//! so it can be compared with an earlier copy kept elsewhere.
//!
//! This module knows nothing of event types: `audit.rs` owns them.

use std::cell::RefCell;

use ring::hmac;

use super::StoreError;
use super::records::{self, AuditCheckpoint, AuditEntry};
use super::rows::{CHUNK, Rows, RowsMut};
use super::seal::{SealError, Sealer};
use super::tables::{AUDIT_CHECKPOINT_KEY, AUDIT_CHECKPOINT_NAME, AUDIT_EVENTS_NAME, SECRETS_NAME};

/// The name of the chain key in the secrets table.
pub(crate) const SECRET_AUDIT_CHAIN_KEY: &str = "audit/chain-key";

const RECORD_LABEL: &[u8] = b"gatehouse audit record v1";
const CHECKPOINT_LABEL: &[u8] = b"gatehouse audit checkpoint v1";
const TAG_LEN: usize = 32;

/// The HMAC key that tags audit records and checkpoints.
pub(crate) struct ChainKey(hmac::Key);

impl std::fmt::Debug for ChainKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ChainKey(..)")
    }
}

fn sealed_err(source: SealError) -> StoreError {
    StoreError::SealedValue {
        table: "secrets.v1",
        key: SECRET_AUDIT_CHAIN_KEY.into(),
        source,
    }
}

impl ChainKey {
    /// Reads the chain key from `secrets.v1`, if the store has one.
    pub(super) fn read(rows: &dyn Rows, sealer: &Sealer) -> Result<Option<Self>, StoreError> {
        let Some(sealed) = rows.get(SECRETS_NAME, SECRET_AUDIT_CHAIN_KEY)? else {
            return Ok(None);
        };
        let raw = sealer
            .open(SECRETS_NAME, SECRET_AUDIT_CHAIN_KEY.as_bytes(), &sealed)
            .map_err(sealed_err)?;
        Self::from_raw(&raw).map(Some)
    }

    /// Reads the chain key of a store that must have one already (opened read-only).
    pub(super) fn load(rows: &dyn Rows, sealer: &Sealer) -> Result<Self, StoreError> {
        Self::read(rows, sealer)?.ok_or_else(|| StoreError::Decode {
            table: "secrets.v1",
            key: SECRET_AUDIT_CHAIN_KEY.into(),
            reason: "the audit chain key is missing".into(),
        })
    }

    /// Reads the chain key, or makes a new one and stores it in `rows` (durable when
    /// their transaction commits).
    pub(super) fn read_or_create(rows: &dyn RowsMut, sealer: &Sealer) -> Result<Self, StoreError> {
        if let Some(key) = Self::read(rows, sealer)? {
            return Ok(key);
        }
        let mut raw = vec![0u8; 32];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut raw)
            .map_err(|_| sealed_err(SealError::Random))?;
        let sealed = sealer
            .seal(SECRETS_NAME, SECRET_AUDIT_CHAIN_KEY.as_bytes(), &raw)
            .map_err(sealed_err)?;
        rows.put(SECRETS_NAME, SECRET_AUDIT_CHAIN_KEY, &sealed)?;
        Self::from_raw(&raw)
    }

    fn from_raw(raw: &[u8]) -> Result<Self, StoreError> {
        if raw.len() != 32 {
            return Err(StoreError::Decode {
                table: "secrets.v1",
                key: SECRET_AUDIT_CHAIN_KEY.into(),
                reason: format!("the chain key is {} bytes, not 32", raw.len()),
            });
        }
        Ok(Self(hmac::Key::new(hmac::HMAC_SHA256, raw)))
    }

    fn record_tag(&self, seq: u64, record: &[u8]) -> [u8; TAG_LEN] {
        let mut ctx = hmac::Context::with_key(&self.0);
        ctx.update(RECORD_LABEL);
        ctx.update(&seq.to_be_bytes());
        ctx.update(record);
        to_array(ctx.sign().as_ref())
    }

    fn checkpoint_tag(&self, cp: &AuditCheckpoint) -> [u8; TAG_LEN] {
        let mut ctx = hmac::Context::with_key(&self.0);
        ctx.update(CHECKPOINT_LABEL);
        ctx.update(&cp.next_seq.to_be_bytes());
        ctx.update(&cp.prev);
        ctx.update(&cp.pruned.to_be_bytes());
        ctx.update(&cp.pruned_through_ms.to_be_bytes());
        to_array(ctx.sign().as_ref())
    }
}

fn to_array(bytes: &[u8]) -> [u8; TAG_LEN] {
    let mut out = [0u8; TAG_LEN];
    out.copy_from_slice(&bytes[..TAG_LEN]);
    out
}

/// Where the next record goes: its sequence number and the `prev` it must carry.
#[derive(Debug, Clone, Copy)]
pub(super) struct Head {
    next_seq: u64,
    prev: [u8; TAG_LEN],
}

/// The per-transaction cache of the head; dropped with the transaction, so an aborted
/// batch never leaves a stale head behind.
pub(super) type HeadCache = RefCell<Option<Head>>;

fn split_row(seq: u64, bytes: &[u8]) -> Result<([u8; TAG_LEN], &[u8]), StoreError> {
    if bytes.len() < TAG_LEN {
        return Err(StoreError::Decode {
            table: "audit_events.v1",
            key: seq.to_string(),
            reason: format!("the row is {} bytes, shorter than its tag", bytes.len()),
        });
    }
    let (tag, record) = bytes.split_at(TAG_LEN);
    Ok((to_array(tag), record))
}

fn decode_entry(seq: u64, record: &[u8]) -> Result<AuditEntry, StoreError> {
    records::decode_audit_entry(record).map_err(|e| StoreError::Decode {
        table: "audit_events.v1",
        key: seq.to_string(),
        reason: e.to_string(),
    })
}

fn decode_checkpoint(bytes: &[u8]) -> Result<AuditCheckpoint, StoreError> {
    records::decode_audit_checkpoint(bytes).map_err(|e| StoreError::Decode {
        table: "audit_checkpoint.v1",
        key: AUDIT_CHECKPOINT_KEY.into(),
        reason: e.to_string(),
    })
}

/// What pruning did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Pruned {
    pub removed: u64,
    /// True when older records remain (the chunk limit was reached).
    pub more: bool,
}

/// One page of a query: the matching entries and where to continue.
#[derive(Debug, Clone, Default)]
pub struct AuditPage {
    pub entries: Vec<(u64, AuditEntry)>,
    /// The sequence number to pass as `after` for the next page; `None` at the end.
    pub next: Option<u64>,
}

/// The outcome of walking the whole chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainReport {
    pub records: u64,
    pub first_seq: Option<u64>,
    /// The last record's sequence number and tag (hex), to compare with a copy kept
    /// elsewhere: removal from the end can only be seen that way.
    pub head: Option<(u64, String)>,
    pub checkpoint: Option<AuditCheckpoint>,
    /// The first problem found, if any.
    pub broken: Option<ChainBreak>,
}

/// Where and why the chain does not verify.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainBreak {
    /// The first sequence number that is wrong (altered, missing or out of place).
    pub seq: u64,
    pub reason: String,
}

/// Where the next record goes, read from the log's last row, else from the pruning
/// checkpoint, else the start of a new log.
pub(super) fn head(rows: &dyn Rows) -> Result<Head, StoreError> {
    if let Some((seq, value)) = rows.log_newest(1)?.pop() {
        let (tag, _) = split_row(seq, &value)?;
        return Ok(Head {
            next_seq: seq + 1,
            prev: tag,
        });
    }
    Ok(match checkpoint(rows)? {
        Some(cp) => Head {
            next_seq: cp.next_seq,
            prev: cp.prev,
        },
        None => Head {
            next_seq: 1,
            prev: [0; TAG_LEN],
        },
    })
}

fn checkpoint(rows: &dyn Rows) -> Result<Option<AuditCheckpoint>, StoreError> {
    rows.get(AUDIT_CHECKPOINT_NAME, AUDIT_CHECKPOINT_KEY)?
        .map(|value| decode_checkpoint(&value))
        .transpose()
}

/// Appends `entry` at `head`: sets its `prev`, tags it and inserts it. Returns its
/// sequence number and the head after it.
pub(super) fn append(
    chain: &ChainKey,
    rows: &dyn RowsMut,
    head: Head,
    entry: &mut AuditEntry,
) -> Result<(u64, Head), StoreError> {
    entry.prev = head.prev;
    let record = records::encode_audit_entry(entry);
    let tag = chain.record_tag(head.next_seq, &record);
    let mut row = Vec::with_capacity(TAG_LEN + record.len());
    row.extend_from_slice(&tag);
    row.extend_from_slice(&record);
    rows.log_put(head.next_seq, &row)?;
    Ok((
        head.next_seq,
        Head {
            next_seq: head.next_seq + 1,
            prev: tag,
        },
    ))
}

/// Removes up to `max` of the oldest records whose time is before `before_ms`, and
/// moves the checkpoint past them. Stops at the first record that is recent enough.
pub(super) fn prune(
    rows: &dyn RowsMut,
    chain: &ChainKey,
    before_ms: u64,
    max: u64,
) -> Result<Pruned, StoreError> {
    let mut last: Option<(u64, [u8; TAG_LEN], u64)> = None;
    let mut removed = 0u64;
    let mut more = false;
    let mut from = 0;
    'walk: loop {
        let chunk = rows.log_from(from, CHUNK)?;
        let done = chunk.len() < CHUNK;
        for (seq, value) in chunk {
            let (tag, record) = split_row(seq, &value)?;
            let entry = decode_entry(seq, record)?;
            if entry.time_ms >= before_ms {
                break 'walk;
            }
            if removed == max {
                more = true;
                break 'walk;
            }
            last = Some((seq, tag, entry.time_ms));
            removed += 1;
            from = seq + 1;
        }
        if done {
            break;
        }
    }
    let Some((last_seq, last_tag, last_time)) = last else {
        return Ok(Pruned { removed: 0, more });
    };
    rows.log_remove_through(last_seq)?;
    let pruned_before = checkpoint(rows)?.map_or(0, |cp| cp.pruned);
    let mut cp = AuditCheckpoint {
        next_seq: last_seq + 1,
        prev: last_tag,
        pruned: pruned_before + removed,
        pruned_through_ms: last_time,
        tag: [0; TAG_LEN],
    };
    cp.tag = chain.checkpoint_tag(&cp);
    rows.put(
        AUDIT_CHECKPOINT_NAME,
        AUDIT_CHECKPOINT_KEY,
        &records::encode_audit_checkpoint(&cp),
    )?;
    Ok(Pruned { removed, more })
}

/// Decides whether a row passes a query filter.
pub type AuditFilter<'f> = &'f dyn Fn(&AuditEntry) -> bool;

/// Up to `limit` entries after `after` that pass `filter`, looking at no more than
/// `scan` rows (so a filter that matches rarely still answers quickly; the caller
/// continues from `next`).
pub(super) fn page(
    rows: &dyn Rows,
    after: u64,
    limit: usize,
    scan: usize,
    filter: AuditFilter<'_>,
) -> Result<AuditPage, StoreError> {
    let mut page = AuditPage::default();
    let mut last_seen = None;
    let mut scanned = 0;
    let mut from = after.saturating_add(1);
    loop {
        // One row past the scan budget tells whether the page ends the log.
        let want = (scan - scanned).saturating_add(1).min(CHUNK);
        let chunk = rows.log_from(from, want)?;
        let done = chunk.len() < want;
        for (seq, value) in chunk {
            if page.entries.len() == limit || scanned == scan {
                page.next = last_seen;
                return Ok(page);
            }
            scanned += 1;
            last_seen = Some(seq);
            from = seq.saturating_add(1);
            let (_, record) = split_row(seq, &value)?;
            let entry = decode_entry(seq, record)?;
            if filter(&entry) {
                page.entries.push((seq, entry));
            }
        }
        if done {
            return Ok(page);
        }
    }
}

/// The newest `count` entries, oldest first (for `audit tail`).
pub(super) fn last(rows: &dyn Rows, count: usize) -> Result<Vec<(u64, AuditEntry)>, StoreError> {
    let mut out = Vec::with_capacity(count.min(1024));
    for (seq, value) in rows.log_newest(count)? {
        let (_, record) = split_row(seq, &value)?;
        out.push((seq, decode_entry(seq, record)?));
    }
    out.reverse();
    Ok(out)
}

/// Walks the whole log and checks every tag and link; `progress` is called with the
/// number of records checked so far and the total.
pub(super) fn verify(
    rows: &dyn Rows,
    chain: &ChainKey,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<ChainReport, StoreError> {
    let total = rows.count(AUDIT_EVENTS_NAME)?;
    let checkpoint = checkpoint(rows)?;
    let mut report = ChainReport {
        records: 0,
        first_seq: None,
        head: None,
        checkpoint: checkpoint.clone(),
        broken: None,
    };
    let (mut expected_seq, mut expected_prev) = match &checkpoint {
        Some(cp) => {
            if chain.checkpoint_tag(cp) != cp.tag {
                report.broken = Some(ChainBreak {
                    seq: cp.next_seq,
                    reason: "the pruning checkpoint was altered".into(),
                });
                return Ok(report);
            }
            (cp.next_seq, cp.prev)
        }
        None => (1, [0; TAG_LEN]),
    };
    let mut from = 0;
    loop {
        let chunk = rows.log_from(from, CHUNK)?;
        let done = chunk.len() < CHUNK;
        for (seq, bytes) in chunk {
            from = seq.saturating_add(1);
            report.first_seq.get_or_insert(seq);
            if let Some(broken) = check_link(chain, seq, &bytes, expected_seq, &expected_prev) {
                report.broken = Some(broken);
                return Ok(report);
            }
            let (tag, _) = split_row(seq, &bytes)?;
            report.records += 1;
            report.head = Some((seq, data_encoding::HEXLOWER.encode(&tag)));
            expected_seq = seq + 1;
            expected_prev = tag;
            if report.records.is_multiple_of(4096) {
                progress(report.records, total);
            }
        }
        if done {
            break;
        }
    }
    progress(report.records, total);
    Ok(report)
}

/// Why the row `seq` does not continue the chain at `expected_seq` after a record
/// tagged `expected_prev`, if it does not.
fn check_link(
    chain: &ChainKey,
    seq: u64,
    bytes: &[u8],
    expected_seq: u64,
    expected_prev: &[u8; TAG_LEN],
) -> Option<ChainBreak> {
    let broken = |reason: String| Some(ChainBreak { seq, reason });
    if seq != expected_seq {
        return if seq > expected_seq {
            Some(ChainBreak {
                seq: expected_seq,
                reason: if seq == expected_seq + 1 {
                    format!("record {expected_seq} is missing")
                } else {
                    format!("records {expected_seq} to {} are missing", seq - 1)
                },
            })
        } else {
            broken(format!("record {seq} precedes the pruning checkpoint"))
        };
    }
    let Ok((tag, record)) = split_row(seq, bytes) else {
        return broken(format!("record {seq} is truncated"));
    };
    if chain.record_tag(seq, record) != tag {
        return broken(format!("record {seq} was altered (its tag does not match)"));
    }
    match records::decode_audit_entry(record) {
        Ok(entry) if entry.prev == *expected_prev => None,
        Ok(_) => broken(format!("record {seq} does not follow the record before it")),
        Err(err) => broken(format!("record {seq} does not decode: {err}")),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn key(byte: u8) -> ChainKey {
        ChainKey(hmac::Key::new(hmac::HMAC_SHA256, &[byte; 32]))
    }

    #[test]
    fn tags_depend_on_key_seq_and_bytes() {
        let a = key(1).record_tag(1, b"x");
        assert_ne!(a, key(2).record_tag(1, b"x"));
        assert_ne!(a, key(1).record_tag(2, b"x"));
        assert_ne!(a, key(1).record_tag(1, b"y"));
        assert_eq!(a, key(1).record_tag(1, b"x"));
    }

    #[test]
    fn checkpoint_tag_covers_every_field() {
        let k = key(1);
        let cp = AuditCheckpoint {
            next_seq: 5,
            prev: [1; 32],
            pruned: 4,
            pruned_through_ms: 9,
            tag: [0; 32],
        };
        let base = k.checkpoint_tag(&cp);
        for changed in [
            AuditCheckpoint {
                next_seq: 6,
                ..cp.clone()
            },
            AuditCheckpoint {
                prev: [2; 32],
                ..cp.clone()
            },
            AuditCheckpoint {
                pruned: 5,
                ..cp.clone()
            },
            AuditCheckpoint {
                pruned_through_ms: 10,
                ..cp.clone()
            },
        ] {
            assert_ne!(k.checkpoint_tag(&changed), base);
        }
    }

    #[test]
    fn short_rows_are_errors() {
        assert!(split_row(1, &[0; 31]).is_err());
        assert!(split_row(1, &[0; 32]).is_ok());
    }
}
