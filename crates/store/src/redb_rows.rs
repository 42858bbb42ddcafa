//! `Rows` and `RowsMut` on redb transactions: the data file's engine.
//!
//! A write transaction keeps the audit table open from its first use to its end: a
//! batch of the group-commit writer appends dozens of events, and opening a redb table
//! looks it up and closing it writes its root back, each time.

use std::cell::RefCell;
use std::ops::Bound;

use redb::{ReadableTable, ReadableTableMetadata, TableDefinition};

use super::StoreError;
use super::rows::{NodeHead, Rows, RowsMut, Scan};
use super::tables::{AUDIT_EVENTS, AUDIT_EVENTS_NAME};

fn def(table: &str) -> TableDefinition<'_, &'static str, &'static [u8]> {
    TableDefinition::new(table)
}

fn get_in(
    table: &impl ReadableTable<&'static str, &'static [u8]>,
    key: &str,
) -> Result<Option<Vec<u8>>, StoreError> {
    Ok(table.get(key)?.map(|value| value.value().to_vec()))
}

fn scan_in(
    table: &impl ReadableTable<&'static str, &'static [u8]>,
    scan: Scan<'_>,
) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
    let mut out = Vec::new();
    if scan.max == 0 {
        return Ok(out);
    }
    for row in table.range::<&str>((scan.start, Bound::Unbounded))? {
        let (key, value) = row?;
        let key = key.value();
        if !key.starts_with(scan.prefix) {
            break;
        }
        out.push((key.to_string(), value.value().to_vec()));
        if out.len() == scan.max {
            break;
        }
    }
    Ok(out)
}

fn log_from_in(
    table: &impl ReadableTable<u64, &'static [u8]>,
    from: u64,
    max: usize,
) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
    let mut out = Vec::new();
    for row in table.range(from..)?.take(max) {
        let (seq, value) = row?;
        out.push((seq.value(), value.value().to_vec()));
    }
    Ok(out)
}

fn log_newest_in(
    table: &impl ReadableTable<u64, &'static [u8]>,
    max: usize,
) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
    let mut out = Vec::new();
    for row in table.iter()?.rev().take(max) {
        let (seq, value) = row?;
        out.push((seq.value(), value.value().to_vec()));
    }
    Ok(out)
}

/// A read transaction of a writable or a read-only data file.
pub(crate) struct RedbRead<'a>(pub &'a redb::ReadTransaction);

impl Rows for RedbRead<'_> {
    fn get(&self, table: &'static str, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        get_in(&self.0.open_table(def(table))?, key)
    }

    fn scan(
        &self,
        table: &'static str,
        scan: Scan<'_>,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        scan_in(&self.0.open_table(def(table))?, scan)
    }

    fn count(&self, table: &'static str) -> Result<u64, StoreError> {
        Ok(self.0.open_untyped_table(def(table))?.len()?)
    }

    fn log_from(&self, from: u64, max: usize) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        log_from_in(&self.0.open_table(AUDIT_EVENTS)?, from, max)
    }

    fn log_newest(&self, max: usize) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        log_newest_in(&self.0.open_table(AUDIT_EVENTS)?, max)
    }
}

/// A write transaction, with its audit table kept open (see the module docs).
pub(crate) struct RedbWrite<'a> {
    tx: &'a redb::WriteTransaction,
    log: RefCell<Option<redb::Table<'a, u64, &'static [u8]>>>,
}

impl<'a> RedbWrite<'a> {
    pub(crate) fn new(tx: &'a redb::WriteTransaction) -> Self {
        Self {
            tx,
            log: RefCell::new(None),
        }
    }

    fn with_log<R>(
        &self,
        f: impl FnOnce(&mut redb::Table<'a, u64, &'static [u8]>) -> Result<R, StoreError>,
    ) -> Result<R, StoreError> {
        let mut slot = self.log.borrow_mut();
        let table = match &mut *slot {
            Some(table) => table,
            None => slot.insert(self.tx.open_table(AUDIT_EVENTS)?),
        };
        f(table)
    }
}

impl Rows for RedbWrite<'_> {
    fn get(&self, table: &'static str, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        get_in(&self.tx.open_table(def(table))?, key)
    }

    fn scan(
        &self,
        table: &'static str,
        scan: Scan<'_>,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        scan_in(&self.tx.open_table(def(table))?, scan)
    }

    fn count(&self, table: &'static str) -> Result<u64, StoreError> {
        if table == AUDIT_EVENTS_NAME {
            return self.with_log(|log| Ok(log.len()?));
        }
        Ok(self.tx.open_table(def(table))?.len()?)
    }

    fn log_from(&self, from: u64, max: usize) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        self.with_log(|log| log_from_in(log, from, max))
    }

    fn log_newest(&self, max: usize) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        self.with_log(|log| log_newest_in(log, max))
    }
}

impl RowsMut for RedbWrite<'_> {
    fn put(&self, table: &'static str, key: &str, value: &[u8]) -> Result<(), StoreError> {
        self.tx.open_table(def(table))?.insert(key, value)?;
        Ok(())
    }

    fn remove(&self, table: &'static str, key: &str) -> Result<bool, StoreError> {
        Ok(self.tx.open_table(def(table))?.remove(key)?.is_some())
    }

    fn log_put(&self, seq: u64, value: &[u8]) -> Result<(), StoreError> {
        self.with_log(|log| {
            log.insert(seq, value)?;
            Ok(())
        })
    }

    fn log_remove_through(&self, last: u64) -> Result<(), StoreError> {
        self.with_log(|log| {
            log.retain_in(..=last, |_, _| false)?;
            Ok(())
        })
    }

    fn node_chain(&self) -> Result<Option<NodeHead>, StoreError> {
        Ok(None)
    }

    fn node_append(&self, _: NodeHead, _: &[u8]) -> Result<(), StoreError> {
        Err(StoreError::Database(
            "a data file keeps one audit chain, not one per node".into(),
        ))
    }
}
