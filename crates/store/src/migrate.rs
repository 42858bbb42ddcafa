//! Migrations between data-file format versions.
//!
//! An ordered list: step `n` turns a format-`n` file into a format-`n + 1` file. All
//! steps needed run inside one write transaction together with the version bump, before
//! any socket accepts traffic, so a crash mid-migration leaves the old format intact.
//! There is no downgrade: a file newer than this build is refused before anything runs.

use redb::ReadableTable;

use super::StoreError;
use super::records::{self, AdminTokenRecord};
use super::tables::{
    ADMIN_TOKENS, AUDIT_CHECKPOINT, AUDIT_EVENTS, BANS, CLIENTS, DEVICE_FAMILIES,
    DEVICE_GRANT_CODES, DEVICE_GRANTS, DEVICES, DEVICES_BY_AGE, FAMILY_BINDINGS,
    FAMILY_REVOCATIONS, FORMAT_VERSION, JOBS, META, META_FORMAT_VERSION, PAIRING_SESSIONS,
    RATE_WINDOWS, REFRESH_TOKENS, REVOKED_TOKENS, SIGNING_KEYS, STATUS_ALLOCATION, STATUS_REVOKED,
    TOKEN_FAMILIES,
};
use super::tx::{device_age_key, device_family_key};

type Step = fn(&redb::WriteTransaction) -> Result<(), StoreError>;

/// `(from_version, description, step)`, in order.
const STEPS: &[(u32, &str, Step)] = &[
    (
        1,
        "admin tokens gain last-used and revoked times",
        admin_tokens_v1_to_v2,
    ),
    (
        2,
        "tables for signing keys, pairing sessions, devices, refresh tokens, revocations and clients",
        create_token_tables,
    ),
    (
        3,
        "a table for rate-limit windows",
        create_rate_window_table,
    ),
    (
        4,
        "tables for the audit log, its pruning checkpoint and lockout bans",
        create_audit_tables,
    ),
    (5, "a table for scheduled jobs", create_jobs_table),
    (
        6,
        "a journal of refresh-token family revocations",
        create_revocation_journal,
    ),
    (
        7,
        "indexes of each device's token families and of devices by pairing time",
        create_device_indexes,
    ),
    (
        8,
        "a table for device authorization grants and its index by user code",
        create_device_grant_tables,
    ),
    (
        9,
        "a table for the keys token families are bound to (DPoP)",
        create_family_binding_table,
    ),
    (
        10,
        "tables for revoked token status-list indices and their allocation counter",
        create_status_list_tables,
    ),
];

/// The first format from which every step only adds tables: a PostgreSQL database at
/// that format or later is brought up to date by creating the missing tables (which
/// every start does) and writing the new format version.
pub(crate) const TABLES_ONLY_FROM: u32 = 8;

/// What a migration did, for the log and the audit trail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Migrated {
    pub from: u32,
    pub to: u32,
    pub steps: Vec<&'static str>,
}

/// Runs every step from `found` to the current version in `tx` and records the new version.
pub(super) fn run(tx: &redb::WriteTransaction, found: u32) -> Result<Option<Migrated>, StoreError> {
    if found == FORMAT_VERSION {
        return Ok(None);
    }
    let mut steps = Vec::new();
    let mut version = found;
    while version < FORMAT_VERSION {
        let (_, description, step) = STEPS
            .iter()
            .find(|(from, _, _)| *from == version)
            .ok_or(StoreError::NoMigration { from: version })?;
        step(tx)?;
        steps.push(*description);
        version += 1;
    }
    tx.open_table(META)?
        .insert(META_FORMAT_VERSION, FORMAT_VERSION.to_le_bytes().as_slice())?;
    Ok(Some(Migrated {
        from: found,
        to: FORMAT_VERSION,
        steps,
    }))
}

/// What the steps from format `from` to the current one do, in order.
pub(crate) fn descriptions(from: u32) -> Vec<&'static str> {
    STEPS
        .iter()
        .filter(|(step, _, _)| *step >= from)
        .map(|(_, description, _)| *description)
        .collect()
}

/// Format 1 → 2: rewrite every admin token as a version-2 record, so that only
/// `records.rs` and this step ever see version 1.
fn admin_tokens_v1_to_v2(tx: &redb::WriteTransaction) -> Result<(), StoreError> {
    let mut table = tx.open_table(ADMIN_TOKENS)?;
    let mut rows = Vec::new();
    for row in table.iter()? {
        let (key, value) = row?;
        let id = key.value().to_string();
        let record: AdminTokenRecord =
            records::decode(value.value()).map_err(|e| StoreError::Decode {
                table: "admin_tokens.v1",
                key: id.clone(),
                reason: e.to_string(),
            })?;
        rows.push((id, record.into_current()));
    }
    for (id, token) in rows {
        table.insert(id.as_str(), records::encode_admin_token(&token).as_slice())?;
    }
    Ok(())
}

/// Format 2 → 3: the token authority's tables, created empty so that every table of
/// the format exists in every file (counts, backups and checks rely on it).
fn create_token_tables(tx: &redb::WriteTransaction) -> Result<(), StoreError> {
    for def in [
        SIGNING_KEYS,
        PAIRING_SESSIONS,
        DEVICES,
        TOKEN_FAMILIES,
        REFRESH_TOKENS,
        REVOKED_TOKENS,
        CLIENTS,
    ] {
        tx.open_table(def)?;
    }
    Ok(())
}

/// Format 3 → 4: the rate-limit windows table, created empty.
fn create_rate_window_table(tx: &redb::WriteTransaction) -> Result<(), StoreError> {
    tx.open_table(RATE_WINDOWS)?;
    Ok(())
}

/// Format 4 → 5: the audit log, its checkpoint and the bans, created empty. The audit
/// chain key is created when the store opens (it needs the master key).
fn create_audit_tables(tx: &redb::WriteTransaction) -> Result<(), StoreError> {
    tx.open_table(AUDIT_EVENTS)?;
    tx.open_table(AUDIT_CHECKPOINT)?;
    tx.open_table(BANS)?;
    Ok(())
}

/// Format 5 → 6: the scheduled jobs' table, created empty (every job then counts as
/// never run).
fn create_jobs_table(tx: &redb::WriteTransaction) -> Result<(), StoreError> {
    tx.open_table(JOBS)?;
    Ok(())
}

/// Format 6 → 7: the revocation journal, created empty (every revoked family of a format-6
/// file is already marked in its row).
fn create_revocation_journal(tx: &redb::WriteTransaction) -> Result<(), StoreError> {
    tx.open_table(FAMILY_REVOCATIONS)?;
    Ok(())
}

/// Format 7 → 8: the two indexes, filled from every device and family row, in one pass
/// each.
fn create_device_indexes(tx: &redb::WriteTransaction) -> Result<(), StoreError> {
    let mut by_age = tx.open_table(DEVICES_BY_AGE)?;
    for row in tx.open_table(DEVICES)?.iter()? {
        let (key, value) = row?;
        let device = records::decode_device(value.value()).map_err(|e| StoreError::Decode {
            table: "devices.v1",
            key: key.value().to_string(),
            reason: e.to_string(),
        })?;
        by_age.insert(
            device_age_key(device.created_at_ms, key.value()).as_str(),
            [].as_slice(),
        )?;
    }
    let mut device_families = tx.open_table(DEVICE_FAMILIES)?;
    for row in tx.open_table(TOKEN_FAMILIES)?.iter()? {
        let (key, value) = row?;
        let family =
            records::decode_token_family(value.value()).map_err(|e| StoreError::Decode {
                table: "token_families.v1",
                key: key.value().to_string(),
                reason: e.to_string(),
            })?;
        device_families.insert(
            device_family_key(&family.device_id, key.value()).as_str(),
            [].as_slice(),
        )?;
    }
    Ok(())
}

/// Format 8 → 9: the device grant table and its index, empty.
fn create_device_grant_tables(tx: &redb::WriteTransaction) -> Result<(), StoreError> {
    tx.open_table(DEVICE_GRANTS)?;
    tx.open_table(DEVICE_GRANT_CODES)?;
    Ok(())
}

/// Format 9 → 10: the family binding table, empty (no family was bound before).
fn create_family_binding_table(tx: &redb::WriteTransaction) -> Result<(), StoreError> {
    tx.open_table(FAMILY_BINDINGS)?;
    Ok(())
}

/// Format 10 → 11: the status-list tables, empty. Token family rows of format 10 decode
/// as version-1 records with no status-list places, which is what they are.
fn create_status_list_tables(tx: &redb::WriteTransaction) -> Result<(), StoreError> {
    tx.open_table(STATUS_REVOKED)?;
    tx.open_table(STATUS_ALLOCATION)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_are_contiguous_and_reach_the_current_version() {
        for (i, (from, _, _)) in STEPS.iter().enumerate() {
            assert_eq!(*from, 1 + i as u32);
        }
        let last = STEPS.last().map_or(1, |(from, _, _)| from + 1);
        assert_eq!(last, FORMAT_VERSION);
    }
}
