//! Typed access to the tables inside one transaction.
//!
//! `ReadTx` and `WriteTx` are the only way the rest of the crate touches a table: they
//! take and return domain records, seal and open secrets, and turn every redb or
//! decoding failure into a `StoreError` that names the table and key. No redb type
//! leaves this module. Each record table is one `Records<T>` constant (its table and its
//! codec), used through `get`, `all`, `put`, `delete` and `retain`.

use redb::{ReadableTable, ReadableTableMetadata, TableDefinition, TableHandle as _};

use super::StoreError;
use super::audit_chain::{self, AuditFilter, AuditPage, ChainKey, ChainReport, HeadCache, Pruned};
use super::records::AuditEntry;
use super::records::{
    self, AcmeAccount, AcmeCertificate, AdminToken, AdminUser, Ban, Client, DecodeError, Device,
    FamilyRevocation, JobState, PairingSession, RateWindow, RefreshToken, RevokedToken,
    SelfSignedCert, SigningKey, SigningKeyPrivate, TokenFamily,
};
use super::seal::Sealer;
use super::tables::{self, SECRETS};

/// The name of the self-signed certificate in the secrets table.
pub(crate) const SECRET_SELF_SIGNED: &str = "tls/self-signed";

type Def = TableDefinition<'static, &'static str, &'static [u8]>;

/// A table of versioned records of one type: where they live and how they are coded.
pub struct Records<T: 'static> {
    table: Def,
    name: &'static str,
    encode: fn(&T) -> Vec<u8>,
    decode: fn(&[u8]) -> Result<T, DecodeError>,
}

impl<T> std::fmt::Debug for Records<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Records({})", self.name)
    }
}

macro_rules! records_table {
    ($(#[$doc:meta])* $vis:vis $const:ident: $ty:ty = $table:path, $name:literal, $enc:path, $dec:path) => {
        $(#[$doc])*
        $vis static $const: Records<$ty> = Records {
            table: $table,
            name: $name,
            encode: $enc,
            decode: $dec,
        };
    };
}

records_table!(pub(crate) ADMIN_TOKENS: AdminToken = tables::ADMIN_TOKENS, "admin_tokens.v1",
    records::encode_admin_token, records::decode_admin_token);
records_table!(pub SIGNING_KEYS: SigningKey = tables::SIGNING_KEYS, "signing_keys.v1",
    records::encode_signing_key, records::decode_signing_key);
records_table!(pub PAIRING_SESSIONS: PairingSession = tables::PAIRING_SESSIONS, "pairing_sessions.v1",
    records::encode_pairing_session, records::decode_pairing_session);
records_table!(pub DEVICES: Device = tables::DEVICES, "devices.v1",
    records::encode_device, records::decode_device);
records_table!(pub TOKEN_FAMILIES: TokenFamily = tables::TOKEN_FAMILIES, "token_families.v1",
    records::encode_token_family, records::decode_token_family);
records_table!(
    /// Keyed by the lowercase hex SHA-256 of the token text.
    pub REFRESH_TOKENS: RefreshToken = tables::REFRESH_TOKENS, "refresh_tokens.v1",
    records::encode_refresh_token, records::decode_refresh_token);
records_table!(
    /// Keyed by `family_revocation_key`: time order, so appends share the last page.
    pub FAMILY_REVOCATIONS: FamilyRevocation = tables::FAMILY_REVOCATIONS, "family_revocations.v1",
    records::encode_family_revocation, records::decode_family_revocation);
records_table!(pub REVOKED_TOKENS: RevokedToken = tables::REVOKED_TOKENS, "revoked_tokens.v1",
    records::encode_revoked_token, records::decode_revoked_token);
records_table!(pub CLIENTS: Client = tables::CLIENTS, "clients.v1",
    records::encode_client, records::decode_client);
records_table!(pub RATE_WINDOWS: RateWindow = tables::RATE_WINDOWS, "rate_windows.v1",
    records::encode_rate_window, records::decode_rate_window);
records_table!(
    /// Keyed by the subject's text form (`ip:203.0.113.7`).
    pub BANS: Ban = tables::BANS, "bans.v1",
    records::encode_ban, records::decode_ban);
records_table!(
    /// Keyed by the job's name.
    pub JOBS: JobState = tables::JOBS, "jobs.v1",
    records::encode_job_state, records::decode_job_state);

/// A set of keys without values: a secondary index kept beside its records, written in
/// the same transaction as the records it indexes. Keys are `/`-joined parts chosen so
/// that key order is the order the index is read in.
pub struct Index {
    table: Def,
    name: &'static str,
}

impl std::fmt::Debug for Index {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Index({})", self.name)
    }
}

/// Each device's token families: keys from `device_family_key`.
pub static DEVICE_FAMILIES: Index = Index {
    table: tables::DEVICE_FAMILIES,
    name: "device_families.v1",
};

/// Devices by pairing time: keys from `device_age_key`.
pub static DEVICES_BY_AGE: Index = Index {
    table: tables::DEVICES_BY_AGE,
    name: "devices_by_age.v1",
};

/// The `DEVICE_FAMILIES` key of one family of one device.
pub fn device_family_key(device: &str, family: &str) -> String {
    format!("{device}/{family}")
}

/// The `DEVICES_BY_AGE` key of a device paired at `created_at_ms`: fixed-width hex, so
/// that key order is time order (then id order).
pub fn device_age_key(created_at_ms: u64, device: &str) -> String {
    format!("{created_at_ms:016x}/{device}")
}

/// The keys of `index` that start with `prefix` and sort after `after` (every one when
/// `after` is `None`), at most `max`, in key order.
fn index_keys(
    table: &impl ReadableTable<&'static str, &'static [u8]>,
    prefix: &str,
    after: Option<&str>,
    max: usize,
) -> Result<Vec<String>, StoreError> {
    use std::ops::Bound;
    let start = match after {
        Some(after) if after >= prefix => Bound::Excluded(after),
        _ => Bound::Included(prefix),
    };
    let mut out = Vec::new();
    for row in table.range::<&str>((start, Bound::Unbounded))? {
        let (key, _) = row?;
        let key = key.value();
        if !key.starts_with(prefix) || out.len() == max {
            break;
        }
        out.push(key.to_string());
    }
    Ok(out)
}

/// A read-only view of the data file at one point in time.
pub struct ReadTx<'a> {
    pub(super) tx: &'a redb::ReadTransaction,
    pub(super) sealer: &'a Sealer,
    pub(super) chain: &'a ChainKey,
}

/// A write transaction handed to a job of the group-commit writer.
pub struct WriteTx<'a> {
    pub(super) tx: &'a redb::WriteTransaction,
    pub(super) sealer: &'a Sealer,
    pub(super) chain: &'a ChainKey,
    pub(super) audit_head: HeadCache,
    /// The audit table, opened at the first append and kept open for the rest of the
    /// transaction: a batch of the group-commit writer appends dozens of events, and
    /// opening a table looks it up and closing it writes its root back, each time.
    pub(super) audit_events: std::cell::RefCell<Option<redb::Table<'a, u64, &'static [u8]>>>,
}

impl<'a> WriteTx<'a> {
    pub(super) fn new(
        tx: &'a redb::WriteTransaction,
        sealer: &'a Sealer,
        chain: &'a ChainKey,
    ) -> Self {
        Self {
            tx,
            sealer,
            chain,
            audit_head: HeadCache::default(),
            audit_events: std::cell::RefCell::new(None),
        }
    }
}

impl std::fmt::Debug for ReadTx<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ReadTx")
    }
}

impl std::fmt::Debug for WriteTx<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WriteTx")
    }
}

fn decode_err(table: &'static str, key: &str, err: impl std::fmt::Display) -> StoreError {
    StoreError::Decode {
        table,
        key: key.to_string(),
        reason: err.to_string(),
    }
}

fn get_from<T>(
    records: &Records<T>,
    table: &impl ReadableTable<&'static str, &'static [u8]>,
    key: &str,
) -> Result<Option<T>, StoreError> {
    match table.get(key)? {
        None => Ok(None),
        Some(value) => (records.decode)(value.value())
            .map(Some)
            .map_err(|e| decode_err(records.name, key, e)),
    }
}

fn all_from<T>(
    records: &Records<T>,
    table: &impl ReadableTable<&'static str, &'static [u8]>,
) -> Result<Vec<(String, T)>, StoreError> {
    first_from(records, table, usize::MAX)
}

fn first_from<T>(
    records: &Records<T>,
    table: &impl ReadableTable<&'static str, &'static [u8]>,
    max: usize,
) -> Result<Vec<(String, T)>, StoreError> {
    let mut out = Vec::new();
    for row in table.iter()?.take(max) {
        let (key, value) = row?;
        let key = key.value().to_string();
        let record =
            (records.decode)(value.value()).map_err(|e| decode_err(records.name, &key, e))?;
        out.push((key, record));
    }
    Ok(out)
}

fn open_secret(
    sealer: &Sealer,
    table: &impl ReadableTable<&'static str, &'static [u8]>,
    name: &str,
) -> Result<Option<Vec<u8>>, StoreError> {
    let Some(sealed) = table.get(name)?.map(|v| v.value().to_vec()) else {
        return Ok(None);
    };
    sealer
        .open(SECRETS.name(), name.as_bytes(), &sealed)
        .map(Some)
        .map_err(|source| StoreError::SealedValue {
            table: "secrets.v1",
            key: name.to_string(),
            source,
        })
}

fn decode_secret<T>(
    plain: Option<Vec<u8>>,
    name: &str,
    decode: fn(&[u8]) -> Result<T, DecodeError>,
) -> Result<Option<T>, StoreError> {
    plain
        .map(|plain| decode(&plain).map_err(|e| decode_err("secrets.v1", name, e)))
        .transpose()
}

/// The name under which a signing key's private half is sealed.
fn signing_key_secret(kid: &str) -> String {
    format!("signing-key/{kid}")
}

/// A short, stable id of a string (16 hex digits of its SHA-256) for secret names.
fn short_id(text: &str) -> String {
    let hash = ring::digest::digest(&ring::digest::SHA256, text.as_bytes());
    data_encoding::HEXLOWER.encode(&hash.as_ref()[..8])
}

const ADMIN_USER_PREFIX: &str = "admin-user/";

fn admin_user_secret(name: &str) -> String {
    format!("{ADMIN_USER_PREFIX}{name}")
}

/// Every sealed admin user, by name.
fn acme_account_in(
    sealer: &Sealer,
    table: &impl ReadableTable<&'static str, &'static [u8]>,
    directory: &str,
) -> Result<Option<AcmeAccount>, StoreError> {
    let name = acme_account_secret(directory);
    let plain = open_secret(sealer, table, &name)?;
    Ok(decode_secret(plain, &name, records::decode_acme_account)?
        .filter(|account| account.directory == directory))
}

fn acme_certificate_in(
    sealer: &Sealer,
    table: &impl ReadableTable<&'static str, &'static [u8]>,
    directory: &str,
    domains: &[String],
) -> Result<Option<AcmeCertificate>, StoreError> {
    let name = acme_cert_secret(directory, domains);
    let plain = open_secret(sealer, table, &name)?;
    let mut wanted = domains.to_vec();
    wanted.sort();
    Ok(
        decode_secret(plain, &name, records::decode_acme_certificate)?
            .filter(|cert| cert.directory == directory && cert.domains == wanted),
    )
}

fn admin_users_in(
    sealer: &Sealer,
    table: &impl ReadableTable<&'static str, &'static [u8]>,
) -> Result<Vec<AdminUser>, StoreError> {
    let mut names = Vec::new();
    for row in table.range(ADMIN_USER_PREFIX..)? {
        let (key, _) = row?;
        let key = key.value();
        if !key.starts_with(ADMIN_USER_PREFIX) {
            break;
        }
        names.push(key.to_string());
    }
    let mut users = Vec::new();
    for name in names {
        let plain = open_secret(sealer, table, &name)?;
        if let Some(user) = decode_secret(plain, &name, records::decode_admin_user)? {
            users.push(user);
        }
    }
    Ok(users)
}

fn acme_account_secret(directory: &str) -> String {
    format!("acme/account/{}", short_id(directory))
}

/// All certificates from one directory share the prefix, so storing a new one can drop
/// those for other name sets.
fn acme_cert_prefix(directory: &str) -> String {
    format!("acme/cert/{}/", short_id(directory))
}

fn acme_cert_secret(directory: &str, domains: &[String]) -> String {
    let mut sorted = domains.to_vec();
    sorted.sort();
    format!(
        "{}{}",
        acme_cert_prefix(directory),
        short_id(&sorted.join(","))
    )
}

impl ReadTx<'_> {
    fn table(
        &self,
        def: Def,
    ) -> Result<redb::ReadOnlyTable<&'static str, &'static [u8]>, StoreError> {
        Ok(self.tx.open_table(def)?)
    }

    /// One record by key.
    pub fn get<T>(&self, records: &Records<T>, key: &str) -> Result<Option<T>, StoreError> {
        get_from(records, &self.table(records.table)?, key)
    }

    /// Every record of a table, in key order.
    pub fn all<T>(&self, records: &Records<T>) -> Result<Vec<(String, T)>, StoreError> {
        all_from(records, &self.table(records.table)?)
    }

    /// The first `max` records of a table, in key order.
    pub fn first<T>(
        &self,
        records: &Records<T>,
        max: usize,
    ) -> Result<Vec<(String, T)>, StoreError> {
        first_from(records, &self.table(records.table)?, max)
    }

    /// Keys of an index that start with `prefix`, after `after`, at most `max`.
    pub fn index_keys(
        &self,
        index: &Index,
        prefix: &str,
        after: Option<&str>,
        max: usize,
    ) -> Result<Vec<String>, StoreError> {
        index_keys(&self.table(index.table)?, prefix, after, max)
    }

    pub fn admin_token(&self, id: &str) -> Result<Option<AdminToken>, StoreError> {
        self.get(&ADMIN_TOKENS, id)
    }

    pub fn admin_tokens(&self) -> Result<Vec<(String, AdminToken)>, StoreError> {
        self.all(&ADMIN_TOKENS)
    }

    pub fn self_signed_cert(&self) -> Result<Option<SelfSignedCert>, StoreError> {
        let plain = open_secret(self.sealer, &self.table(SECRETS)?, SECRET_SELF_SIGNED)?;
        decode_secret(plain, SECRET_SELF_SIGNED, records::decode_self_signed)
    }

    pub fn signing_key_private(&self, kid: &str) -> Result<Option<SigningKeyPrivate>, StoreError> {
        let name = signing_key_secret(kid);
        let plain = open_secret(self.sealer, &self.table(SECRETS)?, &name)?;
        decode_secret(plain, &name, records::decode_signing_key_private)
    }

    /// The admin user `name`, if there is one.
    pub fn admin_user(&self, name: &str) -> Result<Option<AdminUser>, StoreError> {
        let key = admin_user_secret(name);
        let plain = open_secret(self.sealer, &self.table(SECRETS)?, &key)?;
        decode_secret(plain, &key, records::decode_admin_user)
    }

    /// Every admin user, by name.
    pub fn admin_users(&self) -> Result<Vec<AdminUser>, StoreError> {
        admin_users_in(self.sealer, &self.table(SECRETS)?)
    }

    /// The ACME account for `directory`, if one was created.
    pub fn acme_account(&self, directory: &str) -> Result<Option<AcmeAccount>, StoreError> {
        acme_account_in(self.sealer, &self.table(SECRETS)?, directory)
    }

    /// The certificate from `directory` for exactly `domains` (in any order), if stored.
    pub fn acme_certificate(
        &self,
        directory: &str,
        domains: &[String],
    ) -> Result<Option<AcmeCertificate>, StoreError> {
        acme_certificate_in(self.sealer, &self.table(SECRETS)?, directory, domains)
    }

    /// Row counts of every table, for backups, `doctor` and tests.
    pub fn table_counts(&self) -> Result<Vec<(&'static str, u64)>, StoreError> {
        let mut out = Vec::new();
        for name in tables::ALL_TABLES {
            let def: TableDefinition<&str, &[u8]> = TableDefinition::new(name);
            out.push((*name, self.tx.open_untyped_table(def)?.len()?));
        }
        Ok(out)
    }
}

impl WriteTx<'_> {
    /// Records the issuer tokens are now signed as (`meta.issuer`).
    pub fn set_issuer(&self, issuer: &str) -> Result<(), StoreError> {
        let bytes = super::records::encode(&issuer);
        self.tx
            .open_table(tables::META)?
            .insert(tables::META_ISSUER, bytes.as_slice())?;
        Ok(())
    }

    fn table(&self, def: Def) -> Result<redb::Table<'_, &'static str, &'static [u8]>, StoreError> {
        Ok(self.tx.open_table(def)?)
    }

    /// One record by key, as this transaction sees it.
    pub fn get<T>(&self, records: &Records<T>, key: &str) -> Result<Option<T>, StoreError> {
        get_from(records, &self.table(records.table)?, key)
    }

    pub fn all<T>(&self, records: &Records<T>) -> Result<Vec<(String, T)>, StoreError> {
        all_from(records, &self.table(records.table)?)
    }

    /// Inserts or replaces one record.
    pub fn put<T>(&self, records: &Records<T>, key: &str, value: &T) -> Result<(), StoreError> {
        let bytes = (records.encode)(value);
        self.table(records.table)?.insert(key, bytes.as_slice())?;
        Ok(())
    }

    /// Removes one record; whether it was there.
    pub fn delete<T>(&self, records: &Records<T>, key: &str) -> Result<bool, StoreError> {
        Ok(self.table(records.table)?.remove(key)?.is_some())
    }

    /// Removes every record for which `keep` is false; returns how many went. A row that
    /// does not decode is an error, never silently dropped.
    pub fn retain<T>(
        &self,
        records: &Records<T>,
        mut keep: impl FnMut(&str, &T) -> bool,
    ) -> Result<u64, StoreError> {
        let mut table = self.table(records.table)?;
        let mut doomed = Vec::new();
        for row in table.iter()? {
            let (key, value) = row?;
            let key = key.value();
            let record =
                (records.decode)(value.value()).map_err(|e| decode_err(records.name, key, e))?;
            if !keep(key, &record) {
                doomed.push(key.to_string());
            }
        }
        for key in &doomed {
            table.remove(key.as_str())?;
        }
        Ok(doomed.len() as u64)
    }

    /// Keys of an index that start with `prefix`, after `after`, at most `max`, as this
    /// transaction sees them.
    pub fn index_keys(
        &self,
        index: &Index,
        prefix: &str,
        after: Option<&str>,
        max: usize,
    ) -> Result<Vec<String>, StoreError> {
        index_keys(&self.table(index.table)?, prefix, after, max)
    }

    /// Adds a key to an index (a no-op when it is there).
    pub fn index_insert(&self, index: &Index, key: &str) -> Result<(), StoreError> {
        self.table(index.table)?.insert(key, [].as_slice())?;
        Ok(())
    }

    /// Removes a key from an index; whether it was there.
    pub fn index_remove(&self, index: &Index, key: &str) -> Result<bool, StoreError> {
        Ok(self.table(index.table)?.remove(key)?.is_some())
    }

    pub fn admin_token(&self, id: &str) -> Result<Option<AdminToken>, StoreError> {
        self.get(&ADMIN_TOKENS, id)
    }

    pub fn admin_tokens(&self) -> Result<Vec<(String, AdminToken)>, StoreError> {
        self.all(&ADMIN_TOKENS)
    }

    pub fn put_admin_token(&self, id: &str, token: &AdminToken) -> Result<(), StoreError> {
        self.put(&ADMIN_TOKENS, id, token)
    }

    pub fn self_signed_cert(&self) -> Result<Option<SelfSignedCert>, StoreError> {
        let plain = open_secret(self.sealer, &self.table(SECRETS)?, SECRET_SELF_SIGNED)?;
        decode_secret(plain, SECRET_SELF_SIGNED, records::decode_self_signed)
    }

    pub fn put_self_signed_cert(&self, cert: &SelfSignedCert) -> Result<(), StoreError> {
        self.put_secret(SECRET_SELF_SIGNED, &records::encode_self_signed(cert))
    }

    pub fn signing_key_private(&self, kid: &str) -> Result<Option<SigningKeyPrivate>, StoreError> {
        let name = signing_key_secret(kid);
        let plain = open_secret(self.sealer, &self.table(SECRETS)?, &name)?;
        decode_secret(plain, &name, records::decode_signing_key_private)
    }

    /// The admin user `name`, if there is one.
    pub fn admin_user(&self, name: &str) -> Result<Option<AdminUser>, StoreError> {
        let key = admin_user_secret(name);
        let plain = open_secret(self.sealer, &self.table(SECRETS)?, &key)?;
        decode_secret(plain, &key, records::decode_admin_user)
    }

    /// Every admin user, by name.
    pub fn admin_users(&self) -> Result<Vec<AdminUser>, StoreError> {
        admin_users_in(self.sealer, &self.table(SECRETS)?)
    }

    pub fn put_admin_user(&self, user: &AdminUser) -> Result<(), StoreError> {
        self.put_secret(
            &admin_user_secret(&user.name),
            &records::encode_admin_user(user),
        )
    }

    /// Removes the admin user `name`; false if there was none.
    pub fn delete_admin_user(&self, name: &str) -> Result<bool, StoreError> {
        let key = admin_user_secret(name);
        Ok(self.table(SECRETS)?.remove(key.as_str())?.is_some())
    }

    /// The ACME account for `directory`, if one was created.
    pub fn acme_account(&self, directory: &str) -> Result<Option<AcmeAccount>, StoreError> {
        acme_account_in(self.sealer, &self.table(SECRETS)?, directory)
    }

    /// The certificate from `directory` for exactly `domains` (in any order), if stored.
    pub fn acme_certificate(
        &self,
        directory: &str,
        domains: &[String],
    ) -> Result<Option<AcmeCertificate>, StoreError> {
        acme_certificate_in(self.sealer, &self.table(SECRETS)?, directory, domains)
    }

    pub fn put_acme_account(&self, account: &AcmeAccount) -> Result<(), StoreError> {
        self.put_secret(
            &acme_account_secret(&account.directory),
            &records::encode_acme_account(account),
        )
    }

    /// Stores a new certificate and drops any other from the same directory (kept for
    /// a name set no longer configured).
    pub fn put_acme_certificate(&self, cert: &AcmeCertificate) -> Result<(), StoreError> {
        let name = acme_cert_secret(&cert.directory, &cert.domains);
        let prefix = acme_cert_prefix(&cert.directory);
        let stale: Vec<String> = {
            let table = self.table(SECRETS)?;
            let mut names = Vec::new();
            for row in table.range(prefix.as_str()..)? {
                let (key, _) = row?;
                let key = key.value();
                if !key.starts_with(&prefix) {
                    break;
                }
                if key != name {
                    names.push(key.to_string());
                }
            }
            names
        };
        let mut table = self.table(SECRETS)?;
        for key in stale {
            table.remove(key.as_str())?;
        }
        drop(table);
        self.put_secret(&name, &records::encode_acme_certificate(cert))
    }

    pub fn put_signing_key_private(
        &self,
        kid: &str,
        key: &SigningKeyPrivate,
    ) -> Result<(), StoreError> {
        self.put_secret(
            &signing_key_secret(kid),
            &records::encode_signing_key_private(key),
        )
    }

    /// Destroys a signing key's private half (revocation, retirement).
    pub fn delete_signing_key_private(&self, kid: &str) -> Result<bool, StoreError> {
        let name = signing_key_secret(kid);
        Ok(self.table(SECRETS)?.remove(name.as_str())?.is_some())
    }

    fn put_secret(&self, name: &str, plaintext: &[u8]) -> Result<(), StoreError> {
        let sealed = self
            .sealer
            .seal(SECRETS.name(), name.as_bytes(), plaintext)
            .map_err(|source| StoreError::SealedValue {
                table: "secrets.v1",
                key: name.to_string(),
                source,
            })?;
        self.table(SECRETS)?.insert(name, sealed.as_slice())?;
        Ok(())
    }
}

/// The audit log, through the chain's own functions (`audit_chain.rs`).
impl<'a> WriteTx<'a> {
    /// Runs `f` on the audit table, opened once per transaction (see `WriteTx`).
    fn with_audit_events<R>(
        &self,
        f: impl FnOnce(&mut redb::Table<'a, u64, &'static [u8]>) -> Result<R, StoreError>,
    ) -> Result<R, StoreError> {
        let mut slot = self.audit_events.borrow_mut();
        let table = match &mut *slot {
            Some(table) => table,
            None => slot.insert(self.tx.open_table(tables::AUDIT_EVENTS)?),
        };
        f(table)
    }

    /// Appends one event to the audit log; sets its `prev` and returns its sequence
    /// number. Durable when the transaction commits.
    pub fn append_audit(&self, entry: &mut AuditEntry) -> Result<u64, StoreError> {
        let cached = *self.audit_head.borrow();
        let (seq, next) = self.with_audit_events(|events| {
            let head = match cached {
                Some(head) => head,
                None => audit_chain::head(self.tx, events)?,
            };
            audit_chain::append(self.chain, events, head, entry)
        })?;
        *self.audit_head.borrow_mut() = Some(next);
        Ok(seq)
    }

    /// Removes up to `max` of the oldest records from before `before_ms` and moves the
    /// pruning checkpoint past them.
    pub fn prune_audit(&self, before_ms: u64, max: u64) -> Result<Pruned, StoreError> {
        // Pruning leaves the head where it is; only an emptied log reads it from the new
        // checkpoint, which says the same.
        self.with_audit_events(|events| {
            audit_chain::prune(self.tx, self.chain, events, before_ms, max)
        })
    }
}

impl ReadTx<'_> {
    /// The issuer the server last announced (`meta.issuer`), if a server ever started.
    pub fn issuer(&self) -> Result<Option<String>, StoreError> {
        let meta = self.tx.open_table(tables::META)?;
        let Some(bytes) = meta.get(tables::META_ISSUER)? else {
            return Ok(None);
        };
        let issuer = super::records::decode(bytes.value()).map_err(|err| StoreError::Decode {
            table: "meta",
            key: tables::META_ISSUER.into(),
            reason: err.to_string(),
        })?;
        Ok(Some(issuer))
    }

    /// Up to `limit` entries after `after` that pass `filter`, looking at no more than
    /// `scan` rows; the caller continues from `next`.
    pub fn audit_page(
        &self,
        after: u64,
        limit: usize,
        scan: usize,
        filter: AuditFilter<'_>,
    ) -> Result<AuditPage, StoreError> {
        audit_chain::page(self.tx, after, limit, scan, filter)
    }

    /// The newest `count` entries, oldest first (for `audit tail`).
    pub fn audit_last(&self, count: usize) -> Result<Vec<(u64, AuditEntry)>, StoreError> {
        audit_chain::last(self.tx, count)
    }

    /// How many records the log holds now.
    pub fn audit_len(&self) -> Result<u64, StoreError> {
        audit_chain::len(self.tx)
    }

    /// Walks the whole log and checks every tag and link.
    pub fn audit_verify(
        &self,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<ChainReport, StoreError> {
        audit_chain::verify(self.tx, self.chain, progress)
    }
}
