//! Every redb table of the data file, in one place.
//!
//! A table's name carries its layout version (`"admin_tokens.v1"`): a change to a key
//! or value layout gets a new name and a migration, never an in-place reinterpretation.
//! Values are postcard-encoded versioned records (see `records.rs`) or sealed bytes
//! (see `seal.rs`). `schema/data-file.md` documents each table; keep the two in step.

use redb::TableDefinition;

/// The format version this build writes. Files with a higher version are refused.
pub const FORMAT_VERSION: u32 = 11;

/// Instance facts: format version, instance id, creation time, master-key check value.
/// Keys are the `META_*` constants. `format_version` is 4 bytes little-endian so that it
/// can be read by any future build without knowing postcard; other values are postcard.
pub(crate) const META: TableDefinition<&str, &[u8]> = TableDefinition::new(META_NAME);
pub(crate) const META_NAME: &str = "meta";

pub(crate) const META_FORMAT_VERSION: &str = "format_version";
pub(crate) const META_INSTANCE_ID: &str = "instance_id";
pub(crate) const META_CREATED_AT: &str = "created_at_ms";
/// A constant sealed under the master key: opens only with the right key.
pub(crate) const META_MASTER_KEY_CHECK: &str = "master_key_check";
/// The issuer the server last signed tokens as (postcard string). Optional: absent until
/// a server first starts on the file; older builds ignore it, so it needs no new format.
pub(crate) const META_ISSUER: &str = "issuer";

/// Every sealed secret of the instance, keyed by a namespaced name (`"tls/self-signed"`).
/// Values are sealed (AAD = table name + key). Keeping every sealed value in this one
/// table is what lets `rekey` re-seal everything in one pass.
pub(crate) const SECRETS_NAME: &str = "secrets.v1";

/// Admin tokens, keyed by token id (16 lowercase hex characters). Values: `AdminTokenRecord`.
pub(crate) const ADMIN_TOKENS: TableDefinition<&str, &[u8]> =
    TableDefinition::new("admin_tokens.v1");

/// Signing keys by `kid` (RFC 7638 thumbprint): public half and life. Values:
/// `SigningKeyRecord`. The private half is sealed in `secrets.v1` as `signing-key/<kid>`.
pub(crate) const SIGNING_KEYS: TableDefinition<&str, &[u8]> =
    TableDefinition::new("signing_keys.v1");

/// Pairing sessions by session id (`ps_…`). Values: `PairingSessionRecord`.
pub(crate) const PAIRING_SESSIONS: TableDefinition<&str, &[u8]> =
    TableDefinition::new("pairing_sessions.v1");

/// Paired devices by device id (`dev_…`). Values: `DeviceRecord`.
pub(crate) const DEVICES: TableDefinition<&str, &[u8]> = TableDefinition::new("devices.v1");

/// Refresh-token families by family id (`fam_…`). Values: `TokenFamilyRecord`.
pub(crate) const TOKEN_FAMILIES: TableDefinition<&str, &[u8]> =
    TableDefinition::new("token_families.v1");

/// Refresh tokens by the lowercase hex SHA-256 of the token text. Values:
/// `RefreshTokenRecord`.
pub(crate) const REFRESH_TOKENS: TableDefinition<&str, &[u8]> =
    TableDefinition::new("refresh_tokens.v1");

/// The revocation journal: refresh-token families revoked through `POST /v1/revoke`,
/// appended in time order and folded into their `TOKEN_FAMILIES` rows later, in batches
/// sorted by family. Keyed by the revocation time (16 lowercase hex digits of the
/// milliseconds), `/`, and the family id, so that appends land on the table's last page.
/// Values: `FamilyRevocationRecord`.
pub(crate) const FAMILY_REVOCATIONS: TableDefinition<&str, &[u8]> =
    TableDefinition::new("family_revocations.v1");

/// Access tokens revoked one by one, by `jti`. Values: `RevokedTokenRecord`.
pub(crate) const REVOKED_TOKENS: TableDefinition<&str, &[u8]> =
    TableDefinition::new("revoked_tokens.v1");

/// Registered API clients by client id (`cli_…`). Values: `ClientRecord`.
pub(crate) const CLIENTS: TableDefinition<&str, &[u8]> = TableDefinition::new("clients.v1");

/// Rate-limit windows, written behind (about once a second and at stop) so that a
/// restart does not reset anyone's budget. Keyed by 36 lowercase hex characters: the
/// policy number and the 17-byte subject key. Values: `RateWindowRecord`.
pub(crate) const RATE_WINDOWS: TableDefinition<&str, &[u8]> =
    TableDefinition::new("rate_windows.v1");

/// The audit log: one row per event, keyed by its sequence number (1, 2, …; never
/// reused). Values: a 32-byte HMAC-SHA256 tag followed by an `AuditEntryRecord`; the
/// chain and its key are described in `schema/data-file.md`.
pub(crate) const AUDIT_EVENTS: TableDefinition<u64, &[u8]> =
    TableDefinition::new(AUDIT_EVENTS_NAME);
pub(crate) const AUDIT_EVENTS_NAME: &str = "audit_events.v1";

/// The audit log's pruning checkpoint (one row, key `AUDIT_CHECKPOINT_KEY`): where the
/// remaining log starts and the tag of the last record pruned. Values:
/// `AuditCheckpointRecord`.
pub(crate) const AUDIT_CHECKPOINT: TableDefinition<&str, &[u8]> =
    TableDefinition::new(AUDIT_CHECKPOINT_NAME);
pub(crate) const AUDIT_CHECKPOINT_NAME: &str = "audit_checkpoint.v1";
pub(crate) const AUDIT_CHECKPOINT_KEY: &str = "checkpoint";

/// Bans from brute-force lockout, written through. Keyed by the subject's text form
/// (`ip:203.0.113.7`, `ip:2001:db8:1:2::/64`). Values: `BanRecord`.
pub(crate) const BANS: TableDefinition<&str, &[u8]> = TableDefinition::new("bans.v1");

/// Scheduled jobs: each job's last run, its outcome and its next run, keyed by the job's
/// name (`rotate_keys`). Values: `JobStateRecord`.
pub(crate) const JOBS: TableDefinition<&str, &[u8]> = TableDefinition::new("jobs.v1");

/// Index: which token families a device holds, so revoking a device reads its own
/// families and no others. Keys: the device id, `/`, the family id (`dev_…/fam_…`).
/// Values: empty.
pub(crate) const DEVICE_FAMILIES: TableDefinition<&str, &[u8]> =
    TableDefinition::new("device_families.v1");

/// Index: devices in listing order, so a page of `/v1/devices` reads only that page.
/// Keys: the pairing time (16 lowercase hex digits of the milliseconds), `/`, the device
/// id. Values: empty.
pub(crate) const DEVICES_BY_AGE: TableDefinition<&str, &[u8]> =
    TableDefinition::new("devices_by_age.v1");

/// Device authorization grants (RFC 8628) by grant id (`dg_…`). Values:
/// `DeviceGrantRecord`.
pub(crate) const DEVICE_GRANTS: TableDefinition<&str, &[u8]> =
    TableDefinition::new("device_grants.v1");

/// Index: grants by user code, so an operator's typed code finds its grant. Keys: the
/// lowercase hex SHA-256 of the normalised user code, `/`, the grant id. Values: empty.
pub(crate) const DEVICE_GRANT_CODES: TableDefinition<&str, &[u8]> =
    TableDefinition::new("device_grant_codes.v1");

/// Token families bound to a device's key (DPoP, RFC 9449), by family id (`fam_…`).
/// Values: `FamilyBindingRecord`. A family without a row is not bound.
pub(crate) const FAMILY_BINDINGS: TableDefinition<&str, &[u8]> =
    TableDefinition::new("family_bindings.v1");

/// Status-list indices whose access tokens are revoked (their bit is 1), keyed by the
/// index as 16 lowercase hex digits, so that one list's rows (2^20 indices) share a
/// prefix of 11. Values: `StatusRevokedRecord`.
pub(crate) const STATUS_REVOKED: TableDefinition<&str, &[u8]> =
    TableDefinition::new("status_revoked.v1");

/// The status-list allocation counter: one row, key `STATUS_ALLOCATION_KEY`. Values:
/// `StatusAllocationRecord`.
pub(crate) const STATUS_ALLOCATION: TableDefinition<&str, &[u8]> =
    TableDefinition::new("status_allocation.v1");

/// Names of every table this format version has, for backups, counts and checks.
pub const ALL_TABLES: &[&str] = &[
    "meta",
    "secrets.v1",
    "admin_tokens.v1",
    "signing_keys.v1",
    "pairing_sessions.v1",
    "devices.v1",
    "token_families.v1",
    "refresh_tokens.v1",
    "revoked_tokens.v1",
    "clients.v1",
    "rate_windows.v1",
    "audit_events.v1",
    "audit_checkpoint.v1",
    "bans.v1",
    "jobs.v1",
    "family_revocations.v1",
    "device_families.v1",
    "devices_by_age.v1",
    "device_grants.v1",
    "device_grant_codes.v1",
    "family_bindings.v1",
    "status_revoked.v1",
    "status_allocation.v1",
];

/// Creates every table of the format that `tx` does not have yet, each with its key
/// type (all are `&str`-keyed except the audit log).
pub(crate) fn create_missing(tx: &redb::WriteTransaction) -> Result<(), redb::TableError> {
    for name in ALL_TABLES {
        if *name == "audit_events.v1" {
            tx.open_table(AUDIT_EVENTS)?;
        } else {
            tx.open_table(TableDefinition::<&str, &[u8]>::new(name))?;
        }
    }
    Ok(())
}

/// The plaintext sealed into `META_MASTER_KEY_CHECK`.
pub const MASTER_KEY_CHECK_PLAINTEXT: &[u8] = b"gatehouse master key check v1";
