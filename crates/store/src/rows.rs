//! The byte-level operations a storage engine gives one transaction, which the typed
//! records (`tx.rs`) and the audit chain (`audit_chain.rs`) are built on.
//!
//! Tables are named by their `tables.rs` names; their keys are text compared byte by
//! byte, their values opaque bytes. The audit log is the one table keyed by a sequence
//! number, with its own operations. An engine implements `Rows` for a read transaction
//! and `RowsMut` for a write transaction: `redb_rows.rs` for the data file. Nothing
//! above this module names an engine, so a second one is a new implementation of these
//! two traits and nothing else.

use std::ops::Bound;

use super::StoreError;

/// Which rows of a table a scan returns: keys from `start` on that begin with
/// `prefix`, in key order, at most `max`. The scan ends at the first key past the prefix.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Scan<'k> {
    pub(crate) start: Bound<&'k str>,
    pub(crate) prefix: &'k str,
    pub(crate) max: usize,
}

impl<'k> Scan<'k> {
    /// Every row.
    pub(crate) fn all() -> Self {
        Self::first(usize::MAX)
    }

    /// The first `max` rows.
    pub(crate) fn first(max: usize) -> Self {
        Self {
            start: Bound::Unbounded,
            prefix: "",
            max,
        }
    }

    /// Up to `max` rows whose key starts with `prefix` and sorts after `after` (from the
    /// prefix's first key when `after` is `None` or before the prefix).
    pub(crate) fn prefix(prefix: &'k str, after: Option<&'k str>, max: usize) -> Self {
        let start = match after {
            Some(after) if after >= prefix => Bound::Excluded(after),
            _ => Bound::Included(prefix),
        };
        Self { start, prefix, max }
    }

    /// The same scan continued after `key` (for reading a table in chunks).
    pub(crate) fn after(self, key: &'k str) -> Self {
        Self {
            start: Bound::Excluded(key),
            ..self
        }
    }
}

/// One transaction's view of the tables.
pub(crate) trait Rows {
    /// The value stored under `key`.
    fn get(&self, table: &'static str, key: &str) -> Result<Option<Vec<u8>>, StoreError>;
    /// The values stored under `keys`, in their order: one round trip on an engine
    /// that has them.
    fn get_many(
        &self,
        table: &'static str,
        keys: &[String],
    ) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
        keys.iter().map(|key| self.get(table, key)).collect()
    }
    /// The rows `scan` selects, in key order.
    fn scan(
        &self,
        table: &'static str,
        scan: Scan<'_>,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError>;
    /// How many rows a table holds (the audit log's included).
    fn count(&self, table: &'static str) -> Result<u64, StoreError>;
    /// Up to `max` audit rows from sequence number `from` on, oldest first.
    fn log_from(&self, from: u64, max: usize) -> Result<Vec<(u64, Vec<u8>)>, StoreError>;
    /// The newest `max` audit rows, newest first.
    fn log_newest(&self, max: usize) -> Result<Vec<(u64, Vec<u8>)>, StoreError>;
}

/// A write transaction's view: reads see its own writes.
pub(crate) trait RowsMut: Rows {
    /// Inserts or replaces one row.
    fn put(&self, table: &'static str, key: &str, value: &[u8]) -> Result<(), StoreError>;
    /// Removes one row; whether it was there.
    fn remove(&self, table: &'static str, key: &str) -> Result<bool, StoreError>;
    /// Inserts one audit row.
    fn log_put(&self, seq: u64, value: &[u8]) -> Result<(), StoreError>;
    /// Removes every audit row up to and including `last`.
    fn log_remove_through(&self, last: u64) -> Result<(), StoreError>;
    /// Where this node's own audit chain stands in this transaction, for an engine that
    /// gives each node one (PostgreSQL, where several nodes append at once); `None` for
    /// an engine whose log is one chain (a data file).
    fn node_chain(&self) -> Result<Option<NodeHead>, StoreError>;
    /// Appends `row`, the record after `node_chain`'s, which is now `head`. The engine
    /// gives it its sequence number as it commits, so numbers follow commit order.
    fn node_append(&self, head: NodeHead, row: &[u8]) -> Result<(), StoreError>;
}

/// The last record of a node's audit chain: the chain, its place, its tag and time.
/// `n` is 0 (and `tag` zeros) for a chain with no record yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct NodeHead {
    pub(crate) chain: u64,
    pub(crate) n: u64,
    pub(crate) tag: [u8; 32],
    pub(crate) time_ms: u64,
}

/// How many rows a chunked walk of a table reads at a time: bounds the memory of a
/// whole-table pass (pruning, verification, copies) on any engine.
pub(crate) const CHUNK: usize = 1024;
