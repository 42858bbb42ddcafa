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
//! On PostgreSQL several nodes append at once, and one chain would make them take turns
//! at its head. There each node appends to a chain of its own instead (`NodeRecord`: a
//! random chain number, the place in that chain, and `prev` within it), tagged over the
//! record alone, and the database numbers the rows as they commit, so sequence order is
//! still commit order. The leader's checkpoint records (`heads`) bind every chain that
//! advanced to its place at that moment, so a chain cut short before a checkpoint fails
//! verification like a record removed from the middle; a data file's records and a
//! node's can follow each other in one log (a cluster's backup served by one node).
//!
//! This module knows nothing of event types: `audit.rs` owns them.

use std::cell::RefCell;
use std::collections::BTreeMap;

use ring::hmac;

use super::StoreError;
use super::records::{
    self, AuditCheckpoint, AuditEntry, ChainHead, ChainPlace, ChainStart, DecodedAuditEntry,
    NodeRecord,
};
use super::rows::{CHUNK, NodeHead, Rows, RowsMut, Scan};
use super::seal::{SealError, Sealer};
use super::tables::{AUDIT_CHECKPOINT_KEY, AUDIT_CHECKPOINT_NAME, AUDIT_EVENTS_NAME, SECRETS_NAME};

/// The name of the chain key in the secrets table.
pub(crate) const SECRET_AUDIT_CHAIN_KEY: &str = "audit/chain-key";

const RECORD_LABEL: &[u8] = b"gatehouse audit record v1";
const NODE_RECORD_LABEL: &[u8] = b"gatehouse audit node record v2";
const CHECKPOINT_LABEL: &[u8] = b"gatehouse audit checkpoint v1";
const NODE_CHECKPOINT_LABEL: &[u8] = b"gatehouse audit checkpoint v2";
/// Keys of `audit_checkpoint.v1` that hold a node chain's head: this, then the chain
/// number in 16 hex digits.
const HEAD_PREFIX: &str = "head/";
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

    /// A node's record carries its own place (chain and `n`); its sequence number is
    /// given at commit and so is not covered.
    fn node_record_tag(&self, record: &[u8]) -> [u8; TAG_LEN] {
        let mut ctx = hmac::Context::with_key(&self.0);
        ctx.update(NODE_RECORD_LABEL);
        ctx.update(record);
        to_array(ctx.sign().as_ref())
    }

    fn checkpoint_tag(&self, cp: &AuditCheckpoint) -> [u8; TAG_LEN] {
        let mut ctx = hmac::Context::with_key(&self.0);
        // A checkpoint with no node chain is tagged as before node chains existed.
        ctx.update(if cp.chains.is_empty() {
            CHECKPOINT_LABEL
        } else {
            NODE_CHECKPOINT_LABEL
        });
        ctx.update(&cp.next_seq.to_be_bytes());
        ctx.update(&cp.prev);
        ctx.update(&cp.pruned.to_be_bytes());
        ctx.update(&cp.pruned_through_ms.to_be_bytes());
        for start in &cp.chains {
            ctx.update(&start.chain.to_be_bytes());
            ctx.update(&start.next_n.to_be_bytes());
            ctx.update(&start.prev);
        }
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

fn decode_record(seq: u64, record: &[u8]) -> Result<DecodedAuditEntry, StoreError> {
    records::decode_audit_record(record).map_err(|e| StoreError::Decode {
        table: "audit_events.v1",
        key: seq.to_string(),
        reason: e.to_string(),
    })
}

fn decode_entry(seq: u64, record: &[u8]) -> Result<AuditEntry, StoreError> {
    decode_record(seq, record).map(DecodedAuditEntry::into_entry)
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
    /// The last record of each node's chain (none for a data file's one chain), by
    /// chain number: with `head`, what to compare with a copy kept elsewhere.
    pub chains: Vec<ChainTip>,
    /// Records that vouched for other chains' places (checkpoints), all checked.
    pub bindings: u64,
    /// The first problem found, if any.
    pub broken: Option<ChainBreak>,
}

/// The last record of one node's chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainTip {
    pub chain: u64,
    pub n: u64,
    /// Its tag, in hex.
    pub tag: String,
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

/// Appends `entry` to this node's chain after `head`, vouching for `heads` (a
/// checkpoint; empty for an ordinary record). Returns the chain's new head.
pub(super) fn append_node(
    chain: &ChainKey,
    rows: &dyn RowsMut,
    head: NodeHead,
    entry: &mut AuditEntry,
    heads: &[ChainPlace],
) -> Result<NodeHead, StoreError> {
    entry.prev = head.tag;
    let record = records::encode_audit_node_record(&NodeRecord {
        chain: head.chain,
        n: head.n + 1,
        heads: heads.to_vec(),
        entry: entry.clone(),
    });
    let tag = chain.node_record_tag(&record);
    let mut row = Vec::with_capacity(TAG_LEN + record.len());
    row.extend_from_slice(&tag);
    row.extend_from_slice(&record);
    let next = NodeHead {
        chain: head.chain,
        n: head.n + 1,
        tag,
        time_ms: entry.time_ms,
    };
    rows.node_append(next, &row)?;
    Ok(next)
}

/// The key of a node chain's head in `audit_checkpoint.v1`.
pub(crate) fn head_key(chain: u64) -> String {
    format!("{HEAD_PREFIX}{chain:016x}")
}

/// The head of every node chain, as the engine recorded it at each commit.
pub(super) fn chain_heads(rows: &dyn Rows) -> Result<Vec<(u64, ChainHead)>, StoreError> {
    let mut heads = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let scan = Scan::prefix(HEAD_PREFIX, after.as_deref(), CHUNK);
        let chunk = rows.scan(AUDIT_CHECKPOINT_NAME, scan)?;
        let done = chunk.len() < CHUNK;
        for (key, value) in chunk {
            let bad = |reason: String| StoreError::Decode {
                table: "audit_checkpoint.v1",
                key: key.clone(),
                reason,
            };
            let chain = u64::from_str_radix(&key[HEAD_PREFIX.len()..], 16)
                .map_err(|e| bad(format!("not a chain number: {e}")))?;
            let head = records::decode_chain_head(&value).map_err(|e| bad(e.to_string()))?;
            heads.push((chain, head));
            after = Some(key);
        }
        if done {
            return Ok(heads);
        }
    }
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
    // Where each node chain goes on after the records removed.
    let mut chains: BTreeMap<u64, ([u8; TAG_LEN], u64)> = BTreeMap::new();
    let mut removed = 0u64;
    let mut more = false;
    let mut from = 0;
    'walk: loop {
        let chunk = rows.log_from(from, CHUNK)?;
        let done = chunk.len() < CHUNK;
        for (seq, value) in chunk {
            let (tag, record) = split_row(seq, &value)?;
            let record = decode_record(seq, record)?;
            if record.entry().time_ms >= before_ms {
                break 'walk;
            }
            if removed == max {
                more = true;
                break 'walk;
            }
            if let DecodedAuditEntry::Node(node) = &record {
                chains.insert(node.chain, (tag, node.n + 1));
            }
            last = Some((seq, tag, record.entry().time_ms));
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
    let before = checkpoint(rows)?.unwrap_or_default();
    let mut starts: BTreeMap<u64, ChainStart> =
        before.chains.iter().map(|s| (s.chain, *s)).collect();
    for (id, (prev, next_n)) in chains {
        starts.insert(
            id,
            ChainStart {
                chain: id,
                next_n,
                prev,
            },
        );
    }
    let mut cp = AuditCheckpoint {
        next_seq: last_seq + 1,
        prev: last_tag,
        pruned: before.pruned + removed,
        pruned_through_ms: last_time,
        chains: starts.into_values().collect(),
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
        chains: Vec::new(),
        bindings: 0,
        broken: None,
    };
    let mut walk = match &checkpoint {
        Some(cp) => {
            if chain.checkpoint_tag(cp) != cp.tag {
                report.broken = Some(ChainBreak {
                    seq: cp.next_seq,
                    reason: "the pruning checkpoint was altered".into(),
                });
                return Ok(report);
            }
            Walk::after(cp)
        }
        None => Walk::default(),
    };
    let mut from = 0;
    loop {
        let chunk = rows.log_from(from, CHUNK)?;
        let done = chunk.len() < CHUNK;
        for (seq, bytes) in chunk {
            from = seq.saturating_add(1);
            report.first_seq.get_or_insert(seq);
            match walk.step(chain, seq, &bytes) {
                Ok(bound) => report.bindings += u64::from(bound),
                Err(broken) => {
                    report.broken = Some(broken);
                    report.chains = walk.tips();
                    return Ok(report);
                }
            }
            report.records += 1;
            report.head = Some((seq, data_encoding::HEXLOWER.encode(&walk.prev)));
            if report.records.is_multiple_of(4096) {
                progress(report.records, total);
            }
        }
        if done {
            break;
        }
    }
    report.chains = walk.tips();
    progress(report.records, total);
    Ok(report)
}

/// What verification expects next: the row before (any record links a data file's
/// next record), and where each node chain stands.
struct Walk {
    /// The sequence number a data file's record must have next.
    next_seq: u64,
    /// The tag of the row before (or of the last one pruned).
    prev: [u8; TAG_LEN],
    /// Each node chain's last place and tag.
    chains: BTreeMap<u64, (u64, [u8; TAG_LEN])>,
}

impl Default for Walk {
    fn default() -> Self {
        Self {
            next_seq: 1,
            prev: [0; TAG_LEN],
            chains: BTreeMap::new(),
        }
    }
}

impl Walk {
    fn after(cp: &AuditCheckpoint) -> Self {
        Self {
            next_seq: cp.next_seq,
            prev: cp.prev,
            chains: cp
                .chains
                .iter()
                .map(|s| (s.chain, (s.next_n - 1, s.prev)))
                .collect(),
        }
    }

    fn tips(&self) -> Vec<ChainTip> {
        self.chains
            .iter()
            .map(|(chain, (n, tag))| ChainTip {
                chain: *chain,
                n: *n,
                tag: data_encoding::HEXLOWER.encode(tag),
            })
            .collect()
    }

    /// Checks the row `seq` and moves past it; answers whether it vouched for other
    /// chains (a checkpoint record).
    fn step(&mut self, chain: &ChainKey, seq: u64, bytes: &[u8]) -> Result<bool, ChainBreak> {
        let broken = |reason: String| ChainBreak { seq, reason };
        if seq < self.next_seq {
            return Err(broken(format!(
                "record {seq} precedes the pruning checkpoint"
            )));
        }
        let Ok((tag, record)) = split_row(seq, bytes) else {
            return Err(broken(format!("record {seq} is truncated")));
        };
        // The version is the record's first byte (postcard's variant index): a data
        // file's record (0) is tagged with its sequence number, a node's (1) without.
        let single = record.first() != Some(&1);
        if single && seq != self.next_seq {
            // A data file's records are numbered one after the other, also after a
            // node's (a data file appends after the last row, whoever wrote it).
            return Err(ChainBreak {
                seq: self.next_seq,
                reason: if seq == self.next_seq + 1 {
                    format!("record {} is missing", self.next_seq)
                } else {
                    format!("records {} to {} are missing", self.next_seq, seq - 1)
                },
            });
        }
        let expected = if single {
            chain.record_tag(seq, record)
        } else {
            chain.node_record_tag(record)
        };
        if expected != tag {
            return Err(broken(format!(
                "record {seq} was altered (its tag does not match)"
            )));
        }
        let decoded = records::decode_audit_record(record)
            .map_err(|err| broken(format!("record {seq} does not decode: {err}")))?;
        let bound = match decoded {
            DecodedAuditEntry::Single(entry) => {
                if entry.prev != self.prev {
                    return Err(broken(format!(
                        "record {seq} does not follow the record before it"
                    )));
                }
                false
            }
            DecodedAuditEntry::Node(node) => self.step_node(seq, &node, tag)?,
        };
        self.next_seq = seq + 1;
        self.prev = tag;
        Ok(bound)
    }

    /// Checks a node's record against its chain, and the places it vouches for.
    fn step_node(
        &mut self,
        seq: u64,
        node: &NodeRecord,
        tag: [u8; TAG_LEN],
    ) -> Result<bool, ChainBreak> {
        let broken = |reason: String| ChainBreak { seq, reason };
        let id = node.chain;
        let (last_n, last_tag) = self.chains.get(&id).copied().unwrap_or((0, [0; TAG_LEN]));
        if node.n != last_n + 1 {
            return Err(broken(if node.n > last_n + 1 {
                format!(
                    "records {} to {} of chain {id:016x} are missing before record {seq}",
                    last_n + 1,
                    node.n - 1
                )
            } else {
                format!("record {seq} repeats place {} of chain {id:016x}", node.n)
            }));
        }
        if node.entry.prev != last_tag {
            return Err(broken(format!(
                "record {seq} does not follow the record before it in chain {id:016x}"
            )));
        }
        for place in &node.heads {
            let reached = self.chains.get(&place.chain).map_or(0, |(n, _)| *n);
            if reached < place.n {
                return Err(broken(format!(
                    "chain {:016x} ends at its record {reached}, but the checkpoint in \
                     record {seq} saw {} of them",
                    place.chain, place.n
                )));
            }
        }
        self.chains.insert(id, (node.n, tag));
        Ok(!node.heads.is_empty())
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
            chains: Vec::new(),
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

    /// A log in memory that numbers node records as PostgreSQL does (with gaps), so
    /// logs of several chains can be built and damaged row by row.
    #[derive(Default)]
    struct MemLog {
        tables: RefCell<BTreeMap<(String, String), Vec<u8>>>,
        log: RefCell<BTreeMap<u64, Vec<u8>>>,
        /// The chain a node record goes to; switched by the test.
        head: std::cell::Cell<Option<NodeHead>>,
        /// Rows a node appended, numbered by `commit`.
        appended: RefCell<Vec<Vec<u8>>>,
        next_seq: std::cell::Cell<u64>,
    }

    impl MemLog {
        /// Numbers what was appended, skipping one number first (a rolled-back
        /// transaction's), as the database's sequence may.
        fn commit(&self) {
            for row in self.appended.take() {
                let seq = self.next_seq.get() + 2;
                self.next_seq.set(seq);
                self.log.borrow_mut().insert(seq, row);
            }
        }
    }

    impl Rows for MemLog {
        fn get(&self, table: &'static str, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
            Ok(self
                .tables
                .borrow()
                .get(&(table.into(), key.into()))
                .cloned())
        }
        fn scan(
            &self,
            table: &'static str,
            scan: Scan<'_>,
        ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
            Ok(self
                .tables
                .borrow()
                .iter()
                .filter(|((t, k), _)| {
                    t == table
                        && k.starts_with(scan.prefix)
                        && match scan.start {
                            std::ops::Bound::Included(s) => k.as_str() >= s,
                            std::ops::Bound::Excluded(s) => k.as_str() > s,
                            std::ops::Bound::Unbounded => true,
                        }
                })
                .take(scan.max)
                .map(|((_, k), v)| (k.clone(), v.clone()))
                .collect())
        }
        fn count(&self, _: &'static str) -> Result<u64, StoreError> {
            Ok(self.log.borrow().len() as u64)
        }
        fn log_from(&self, from: u64, max: usize) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
            Ok(self
                .log
                .borrow()
                .range(from..)
                .take(max)
                .map(|(k, v)| (*k, v.clone()))
                .collect())
        }
        fn log_newest(&self, max: usize) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
            Ok(self
                .log
                .borrow()
                .iter()
                .rev()
                .take(max)
                .map(|(k, v)| (*k, v.clone()))
                .collect())
        }
    }

    impl RowsMut for MemLog {
        fn put(&self, table: &'static str, key: &str, value: &[u8]) -> Result<(), StoreError> {
            self.tables
                .borrow_mut()
                .insert((table.into(), key.into()), value.to_vec());
            Ok(())
        }
        fn remove(&self, table: &'static str, key: &str) -> Result<bool, StoreError> {
            Ok(self
                .tables
                .borrow_mut()
                .remove(&(table.into(), key.into()))
                .is_some())
        }
        fn log_put(&self, seq: u64, value: &[u8]) -> Result<(), StoreError> {
            self.log.borrow_mut().insert(seq, value.to_vec());
            self.next_seq.set(self.next_seq.get().max(seq));
            Ok(())
        }
        fn log_remove_through(&self, last: u64) -> Result<(), StoreError> {
            self.log.borrow_mut().retain(|seq, _| *seq > last);
            Ok(())
        }
        fn node_chain(&self) -> Result<Option<NodeHead>, StoreError> {
            Ok(self.head.get())
        }
        fn node_append(&self, head: NodeHead, row: &[u8]) -> Result<(), StoreError> {
            self.appended.borrow_mut().push(row.to_vec());
            self.head.set(Some(head));
            Ok(())
        }
    }

    fn event(time_ms: u64) -> AuditEntry {
        AuditEntry {
            time_ms,
            kind: "test.event".into(),
            severity: "info".into(),
            actor: "system".into(),
            source: None,
            request_id: None,
            outcome: "success".into(),
            device: None,
            details: "{}".into(),
            prev: [0; 32],
        }
    }

    fn fresh(chain: u64) -> NodeHead {
        NodeHead {
            chain,
            n: 0,
            tag: [0; 32],
            time_ms: 0,
        }
    }

    /// Appends one record to `chain` (continuing where it stood), committed at once;
    /// returns its sequence number.
    fn append_to(log: &MemLog, heads: &mut BTreeMap<u64, NodeHead>, chain: u64, time: u64) -> u64 {
        let k = key(7);
        let head = heads.get(&chain).copied().unwrap_or(fresh(chain));
        let next = append_node(&k, log, head, &mut event(time), &[]).unwrap();
        heads.insert(chain, next);
        log.commit();
        log.next_seq.get()
    }

    fn verified(log: &MemLog) -> ChainReport {
        verify(log, &key(7), &mut |_, _| {}).unwrap()
    }

    /// Two nodes' chains interleaved, numbered with gaps, then a checkpoint by a
    /// third: the whole log verifies, and each chain's end is reported.
    fn cluster_log() -> (MemLog, BTreeMap<u64, NodeHead>, BTreeMap<u64, u64>) {
        let log = MemLog::default();
        let mut heads = BTreeMap::new();
        let mut seqs = BTreeMap::new();
        for i in 0..6 {
            let chain = if i % 2 == 0 { 0xa } else { 0xb };
            seqs.insert(i, append_to(&log, &mut heads, chain, 100 + i));
        }
        let k = key(7);
        let places = [
            ChainPlace { chain: 0xa, n: 3 },
            ChainPlace { chain: 0xb, n: 3 },
        ];
        let next = append_node(&k, &log, fresh(0xc), &mut event(200), &places).unwrap();
        heads.insert(0xc, next);
        log.commit();
        (log, heads, seqs)
    }

    #[test]
    fn node_chains_interleaved_with_gaps_verify() {
        let (log, _, _) = cluster_log();
        let report = verified(&log);
        assert_eq!(report.broken, None);
        assert_eq!(report.records, 7);
        assert_eq!(report.bindings, 1);
        let tips: Vec<_> = report.chains.iter().map(|t| (t.chain, t.n)).collect();
        assert_eq!(tips, [(0xa, 3), (0xb, 3), (0xc, 1)]);
    }

    #[test]
    fn a_record_removed_from_a_node_chain_is_found() {
        let (log, _, seqs) = cluster_log();
        log.log.borrow_mut().remove(&seqs[&2]);
        let broken = verified(&log).broken.unwrap();
        assert!(
            broken
                .reason
                .contains("records 2 to 2 of chain 000000000000000a are missing"),
            "{broken:?}"
        );
    }

    #[test]
    fn a_node_chain_cut_before_a_checkpoint_is_found() {
        let (log, _, seqs) = cluster_log();
        // The last record of chain b, which the checkpoint saw.
        log.log.borrow_mut().remove(&seqs[&5]);
        let broken = verified(&log).broken.unwrap();
        assert!(broken.reason.contains("saw 3 of them"), "{broken:?}");
    }

    #[test]
    fn an_altered_node_record_is_found() {
        let (log, _, seqs) = cluster_log();
        let mut rows = log.log.borrow_mut();
        let row = rows.get_mut(&seqs[&3]).unwrap();
        let last = row.len() - 1;
        row[last] ^= 1;
        drop(rows);
        let broken = verified(&log).broken.unwrap();
        assert!(broken.reason.contains("was altered"), "{broken:?}");
    }

    #[test]
    fn a_record_moved_to_another_chain_place_is_found() {
        let (log, _, seqs) = cluster_log();
        // Swapping the numbers of two records of one chain reorders it.
        let mut rows = log.log.borrow_mut();
        let first = rows.remove(&seqs[&0]).unwrap();
        let second = rows.remove(&seqs[&2]).unwrap();
        rows.insert(seqs[&0], second);
        rows.insert(seqs[&2], first);
        drop(rows);
        assert!(verified(&log).broken.is_some());
    }

    #[test]
    fn pruning_node_chains_keeps_the_rest_verifiable() {
        let (log, mut heads, _) = cluster_log();
        let pruned = prune(&log, &key(7), 103, 100).unwrap();
        assert_eq!(pruned.removed, 3);
        let report = verified(&log);
        assert_eq!(report.broken, None, "{report:?}");
        let cp = report.checkpoint.unwrap();
        assert_eq!(cp.pruned, 3);
        let starts: Vec<_> = cp.chains.iter().map(|s| (s.chain, s.next_n)).collect();
        assert_eq!(starts, [(0xa, 3), (0xb, 2)]);
        // The chains go on after pruning, and prune again.
        append_to(&log, &mut heads, 0xa, 300);
        prune(&log, &key(7), 104, 100).unwrap();
        assert_eq!(verified(&log).broken, None);
        // A checkpoint altered (a chain's start moved) no longer verifies.
        let mut tampered = decode_checkpoint(
            &log.get(AUDIT_CHECKPOINT_NAME, AUDIT_CHECKPOINT_KEY)
                .unwrap()
                .unwrap(),
        )
        .unwrap();
        tampered.chains[0].next_n += 1;
        log.put(
            AUDIT_CHECKPOINT_NAME,
            AUDIT_CHECKPOINT_KEY,
            &records::encode_audit_checkpoint(&tampered),
        )
        .unwrap();
        let broken = verified(&log).broken.unwrap();
        assert!(
            broken.reason.contains("checkpoint was altered"),
            "{broken:?}"
        );
    }

    #[test]
    fn a_data_file_goes_on_after_a_clusters_records() {
        // A cluster's backup served by one node: its records follow the last row.
        let (log, _, _) = cluster_log();
        let k = key(7);
        let mut cache = head(&log).unwrap();
        for time in 300..303 {
            cache = append(&k, &log, cache, &mut event(time)).unwrap().1;
        }
        assert_eq!(verified(&log).broken, None);
        // A data file's record that does not follow on is found.
        let last = *log.log.borrow().keys().last().unwrap();
        let row = log.log.borrow_mut().remove(&(last - 1)).unwrap();
        log.log.borrow_mut().insert(last + 5, row);
        assert!(verified(&log).broken.is_some());
    }

    #[test]
    fn short_rows_are_errors() {
        assert!(split_row(1, &[0; 31]).is_err());
        assert!(split_row(1, &[0; 32]).is_ok());
    }
}
