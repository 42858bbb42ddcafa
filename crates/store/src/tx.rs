//! Typed access to the tables inside one transaction.
//!
//! `ReadTx` and `WriteTx` are the only way the rest of gatehouse touches a table: they
//! take and return domain records, seal and open secrets, and turn every decoding
//! failure into a `StoreError` that names the table and key. They work on any engine's
//! rows (`rows.rs`). Each record table is one `Records<T>` constant (its table and its
//! codec), used through `get`, `all`, `put`, `delete` and `retain`.

use super::StoreError;
use super::audit_chain::{self, AuditFilter, AuditPage, ChainKey, ChainReport, HeadCache, Pruned};
use super::records::{
    self, AcmeAccount, AcmeCertificate, AcmeChallenge, AcmeOrderLease, AdminToken, AdminUser, Ban,
    Client, DecodeError, Device, DeviceGrant, FamilyBinding, FamilyRevocation, JobState,
    PairingSession, RateWindow, RefreshToken, RevokedToken, SelfSignedCert, SigningKey,
    SigningKeyPrivate, StatusAllocation, StatusRevoked, TokenFamily,
};
use super::records::{AuditEntry, ChainHead, ChainPlace};
use super::rows::{CHUNK, Rows, RowsMut, Scan};
use super::seal::Sealer;
use super::tables;

/// The name of the self-signed certificate in the secrets table.
pub(crate) const SECRET_SELF_SIGNED: &str = "tls/self-signed";

/// The name of the key DPoP nonces are made with (32 raw bytes) in the secrets table.
const SECRET_DPOP_NONCE_KEY: &str = "dpop/nonce-key";

use tables::SECRETS_NAME as SECRETS;

/// A table of versioned records of one type: where they live and how they are coded.
pub struct Records<T: 'static> {
    /// The table's name in `tables.rs`.
    name: &'static str,
    encode: fn(&T) -> Vec<u8>,
    decode: fn(&[u8]) -> Result<T, DecodeError>,
}

impl<T> Records<T> {
    /// Decodes one row's stored bytes (a value the change feed carried, say).
    pub fn decode_row(&self, key: &str, value: &[u8]) -> Result<T, StoreError> {
        (self.decode)(value).map_err(|e| decode_err(self.name, key, e))
    }
}

impl<T> std::fmt::Debug for Records<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Records({})", self.name)
    }
}

macro_rules! records_table {
    ($(#[$doc:meta])* $vis:vis $const:ident: $ty:ty = $name:literal, $enc:path, $dec:path) => {
        $(#[$doc])*
        $vis static $const: Records<$ty> = Records {
            name: $name,
            encode: $enc,
            decode: $dec,
        };
    };
}

records_table!(pub ADMIN_TOKENS: AdminToken = "admin_tokens.v1",
    records::encode_admin_token, records::decode_admin_token);
records_table!(pub SIGNING_KEYS: SigningKey = "signing_keys.v1",
    records::encode_signing_key, records::decode_signing_key);
records_table!(pub PAIRING_SESSIONS: PairingSession = "pairing_sessions.v1",
    records::encode_pairing_session, records::decode_pairing_session);
records_table!(pub DEVICES: Device = "devices.v1",
    records::encode_device, records::decode_device);
records_table!(pub DEVICE_GRANTS: DeviceGrant = "device_grants.v1",
    records::encode_device_grant, records::decode_device_grant);
records_table!(pub TOKEN_FAMILIES: TokenFamily = "token_families.v1",
    records::encode_token_family, records::decode_token_family);
records_table!(
    /// Keyed by the family id; no row: the family is not bound.
    pub FAMILY_BINDINGS: FamilyBinding = "family_bindings.v1",
    records::encode_family_binding, records::decode_family_binding);
records_table!(
    /// Keyed by the lowercase hex SHA-256 of the token text.
    pub REFRESH_TOKENS: RefreshToken = "refresh_tokens.v1",
    records::encode_refresh_token, records::decode_refresh_token);
records_table!(
    /// Keyed by `family_revocation_key`: time order, so appends share the last page.
    pub FAMILY_REVOCATIONS: FamilyRevocation = "family_revocations.v1",
    records::encode_family_revocation, records::decode_family_revocation);
records_table!(pub REVOKED_TOKENS: RevokedToken = "revoked_tokens.v1",
    records::encode_revoked_token, records::decode_revoked_token);
records_table!(
    /// Keyed by `status_index_key`: one list's rows share a prefix (`status_list_prefix`).
    pub STATUS_REVOKED: StatusRevoked = "status_revoked.v1",
    records::encode_status_revoked, records::decode_status_revoked);
records_table!(
    /// One row, keyed `STATUS_ALLOCATION_KEY`.
    pub STATUS_ALLOCATION: StatusAllocation = "status_allocation.v1",
    records::encode_status_allocation, records::decode_status_allocation);
records_table!(pub CLIENTS: Client = "clients.v1",
    records::encode_client, records::decode_client);
records_table!(pub RATE_WINDOWS: RateWindow = "rate_windows.v1",
    records::encode_rate_window, records::decode_rate_window);
records_table!(
    /// Keyed by the subject's text form (`ip:203.0.113.7`).
    pub BANS: Ban = "bans.v1",
    records::encode_ban, records::decode_ban);
records_table!(
    /// Keyed by the job's name.
    pub JOBS: JobState = "jobs.v1",
    records::encode_job_state, records::decode_job_state);

/// A set of keys without values: a secondary index kept beside its records, written in
/// the same transaction as the records it indexes. Keys are `/`-joined parts chosen so
/// that key order is the order the index is read in.
pub struct Index {
    /// The table's name in `tables.rs`.
    name: &'static str,
}

impl std::fmt::Debug for Index {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Index({})", self.name)
    }
}

/// Each device's token families: keys from `device_family_key`.
pub static DEVICE_FAMILIES: Index = Index {
    name: "device_families.v1",
};

/// Devices by pairing time: keys from `device_age_key`.
pub static DEVICES_BY_AGE: Index = Index {
    name: "devices_by_age.v1",
};

/// Device grants by user code: keys from `device_grant_code_key`.
pub static DEVICE_GRANT_CODES: Index = Index {
    name: "device_grant_codes.v1",
};

/// How many indices one token status list holds, as a power of two: list `n` holds the
/// indices `n << 20` to `(n << 20) + 2^20 - 1`.
pub const STATUS_LIST_INDEX_BITS: u32 = 20;

/// The key of the one `STATUS_ALLOCATION` row.
pub const STATUS_ALLOCATION_KEY: &str = "next";

/// The `STATUS_REVOKED` key of a status-list index: 16 lowercase hex digits, so that key
/// order is index order...
pub fn status_index_key(index: u64) -> String {
    format!("{index:016x}")
}

/// ...and every row of list `list` starts with the same 11 (the low 20 bits are the last
/// five digits).
pub fn status_list_prefix(list: u64) -> String {
    format!("{list:011x}")
}

/// The `DEVICE_GRANT_CODES` key of a grant: the user code's hash first, so that a
/// prefix read finds the grant of a typed code.
pub fn device_grant_code_key(user_code_hash: &[u8; 32], grant: &str) -> String {
    let mut key = String::with_capacity(64 + 1 + grant.len());
    for byte in user_code_hash {
        key.push_str(&format!("{byte:02x}"));
    }
    key.push('/');
    key.push_str(grant);
    key
}

/// The `DEVICE_FAMILIES` key of one family of one device.
pub fn device_family_key(device: &str, family: &str) -> String {
    format!("{device}/{family}")
}

/// The `DEVICES_BY_AGE` key of a device paired at `created_at_ms`: fixed-width hex, so
/// that key order is time order (then id order).
pub fn device_age_key(created_at_ms: u64, device: &str) -> String {
    format!("{created_at_ms:016x}/{device}")
}

/// A read-only view of the tables at one point in time. A `WriteTx` dereferences to
/// one, so every read below also runs in a write job and sees its earlier writes.
pub struct ReadTx<'a> {
    pub(super) rows: &'a dyn Rows,
    pub(super) sealer: &'a Sealer,
    pub(super) chain: &'a ChainKey,
}

/// A write transaction handed to a job of the group-commit writer.
pub struct WriteTx<'a> {
    read: ReadTx<'a>,
    rows: &'a dyn RowsMut,
    audit_head: HeadCache,
}

impl<'a> WriteTx<'a> {
    pub(super) fn new(rows: &'a dyn RowsMut, sealer: &'a Sealer, chain: &'a ChainKey) -> Self {
        Self {
            read: ReadTx {
                rows,
                sealer,
                chain,
            },
            rows,
            audit_head: HeadCache::default(),
        }
    }
}

impl<'a> std::ops::Deref for WriteTx<'a> {
    type Target = ReadTx<'a>;

    fn deref(&self) -> &ReadTx<'a> {
        &self.read
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

fn decode_rows<T>(
    records: &Records<T>,
    rows: Vec<(String, Vec<u8>)>,
) -> Result<Vec<(String, T)>, StoreError> {
    rows.into_iter()
        .map(|(key, value)| match (records.decode)(&value) {
            Ok(record) => Ok((key, record)),
            Err(e) => Err(decode_err(records.name, &key, e)),
        })
        .collect()
}

fn decode_secret<T>(
    plain: Option<Vec<u8>>,
    name: &str,
    decode: fn(&[u8]) -> Result<T, DecodeError>,
) -> Result<Option<T>, StoreError> {
    plain
        .map(|plain| decode(&plain).map_err(|e| decode_err(SECRETS, name, e)))
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

/// The order lease of one directory and name set: beside its certificate's name.
fn acme_order_secret(directory: &str, domains: &[String]) -> String {
    let mut sorted = domains.to_vec();
    sorted.sort();
    format!(
        "acme/order/{}/{}",
        short_id(directory),
        short_id(&sorted.join(","))
    )
}

/// A challenge is looked up by the name a validation connection asks for, so the name
/// itself is the key (names are checked against the configured ones before any lookup).
fn acme_challenge_secret(name: &str) -> String {
    format!("acme/challenge/{name}")
}

impl ReadTx<'_> {
    /// One record by key.
    pub fn get<T>(&self, records: &Records<T>, key: &str) -> Result<Option<T>, StoreError> {
        match self.rows.get(records.name, key)? {
            None => Ok(None),
            Some(value) => (records.decode)(&value)
                .map(Some)
                .map_err(|e| decode_err(records.name, key, e)),
        }
    }

    /// The records under `keys`, in their order (one round trip on PostgreSQL).
    pub fn get_many<T>(
        &self,
        records: &Records<T>,
        keys: &[String],
    ) -> Result<Vec<Option<T>>, StoreError> {
        let values = self.rows.get_many(records.name, keys)?;
        keys.iter()
            .zip(values)
            .map(|(key, value)| {
                value
                    .map(|value| {
                        (records.decode)(&value).map_err(|e| decode_err(records.name, key, e))
                    })
                    .transpose()
            })
            .collect()
    }

    /// Every record of a table, in key order.
    pub fn all<T>(&self, records: &Records<T>) -> Result<Vec<(String, T)>, StoreError> {
        self.first(records, usize::MAX)
    }

    /// The first `max` records of a table, in key order.
    pub fn first<T>(
        &self,
        records: &Records<T>,
        max: usize,
    ) -> Result<Vec<(String, T)>, StoreError> {
        decode_rows(records, self.rows.scan(records.name, Scan::first(max))?)
    }

    /// Records whose key starts with `prefix` and sorts after `after` (every one when
    /// `after` is `None`), at most `max`, in key order.
    pub fn prefixed<T>(
        &self,
        records: &Records<T>,
        prefix: &str,
        after: Option<&str>,
        max: usize,
    ) -> Result<Vec<(String, T)>, StoreError> {
        decode_rows(
            records,
            self.rows
                .scan(records.name, Scan::prefix(prefix, after, max))?,
        )
    }

    /// Keys of an index that start with `prefix` and sort after `after` (every one when
    /// `after` is `None`), at most `max`, in key order.
    pub fn index_keys(
        &self,
        index: &Index,
        prefix: &str,
        after: Option<&str>,
        max: usize,
    ) -> Result<Vec<String>, StoreError> {
        let rows = self
            .rows
            .scan(index.name, Scan::prefix(prefix, after, max))?;
        Ok(rows.into_iter().map(|(key, _)| key).collect())
    }

    /// The plaintext of the sealed value `name`.
    fn open_secret(&self, name: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let Some(sealed) = self.rows.get(SECRETS, name)? else {
            return Ok(None);
        };
        self.sealer
            .open(SECRETS, name.as_bytes(), &sealed)
            .map(Some)
            .map_err(|source| StoreError::SealedValue {
                table: SECRETS,
                key: name.to_string(),
                source,
            })
    }

    /// The names of the sealed values that start with `prefix`.
    fn secret_names(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        let rows = self
            .rows
            .scan(SECRETS, Scan::prefix(prefix, None, usize::MAX))?;
        Ok(rows.into_iter().map(|(key, _)| key).collect())
    }

    pub fn admin_token(&self, id: &str) -> Result<Option<AdminToken>, StoreError> {
        self.get(&ADMIN_TOKENS, id)
    }

    pub fn admin_tokens(&self) -> Result<Vec<(String, AdminToken)>, StoreError> {
        self.all(&ADMIN_TOKENS)
    }

    /// The key every node makes and checks DPoP nonces with, once one was made.
    pub fn dpop_nonce_key(&self) -> Result<Option<[u8; 32]>, StoreError> {
        let Some(plain) = self.open_secret(SECRET_DPOP_NONCE_KEY)? else {
            return Ok(None);
        };
        <[u8; 32]>::try_from(plain.as_slice())
            .map(Some)
            .map_err(|_| StoreError::Decode {
                table: SECRETS,
                key: SECRET_DPOP_NONCE_KEY.into(),
                reason: format!("{} bytes where 32 were expected", plain.len()),
            })
    }

    pub fn self_signed_cert(&self) -> Result<Option<SelfSignedCert>, StoreError> {
        let plain = self.open_secret(SECRET_SELF_SIGNED)?;
        decode_secret(plain, SECRET_SELF_SIGNED, records::decode_self_signed)
    }

    pub fn signing_key_private(&self, kid: &str) -> Result<Option<SigningKeyPrivate>, StoreError> {
        let name = signing_key_secret(kid);
        let plain = self.open_secret(&name)?;
        decode_secret(plain, &name, records::decode_signing_key_private)
    }

    /// The admin user `name`, if there is one.
    pub fn admin_user(&self, name: &str) -> Result<Option<AdminUser>, StoreError> {
        let key = admin_user_secret(name);
        let plain = self.open_secret(&key)?;
        decode_secret(plain, &key, records::decode_admin_user)
    }

    /// Every admin user, by name.
    pub fn admin_users(&self) -> Result<Vec<AdminUser>, StoreError> {
        let mut users = Vec::new();
        for name in self.secret_names(ADMIN_USER_PREFIX)? {
            let plain = self.open_secret(&name)?;
            if let Some(user) = decode_secret(plain, &name, records::decode_admin_user)? {
                users.push(user);
            }
        }
        Ok(users)
    }

    /// The ACME account for `directory`, if one was created.
    pub fn acme_account(&self, directory: &str) -> Result<Option<AcmeAccount>, StoreError> {
        let name = acme_account_secret(directory);
        let plain = self.open_secret(&name)?;
        Ok(decode_secret(plain, &name, records::decode_acme_account)?
            .filter(|account| account.directory == directory))
    }

    /// The certificate from `directory` for exactly `domains` (in any order), if stored.
    pub fn acme_certificate(
        &self,
        directory: &str,
        domains: &[String],
    ) -> Result<Option<AcmeCertificate>, StoreError> {
        let name = acme_cert_secret(directory, domains);
        let plain = self.open_secret(&name)?;
        let mut wanted = domains.to_vec();
        wanted.sort();
        Ok(
            decode_secret(plain, &name, records::decode_acme_certificate)?
                .filter(|cert| cert.directory == directory && cert.domains == wanted),
        )
    }

    /// The order lease for `directory` and exactly `domains` (in any order), if one is
    /// stored.
    pub fn acme_order_lease(
        &self,
        directory: &str,
        domains: &[String],
    ) -> Result<Option<AcmeOrderLease>, StoreError> {
        let name = acme_order_secret(directory, domains);
        let plain = self.open_secret(&name)?;
        let mut wanted = domains.to_vec();
        wanted.sort();
        Ok(
            decode_secret(plain, &name, records::decode_acme_order_lease)?
                .filter(|lease| lease.directory == directory && lease.domains == wanted),
        )
    }

    /// The TLS-ALPN-01 challenge stored for `name`, if an order left one.
    pub fn acme_challenge(&self, name: &str) -> Result<Option<AcmeChallenge>, StoreError> {
        let key = acme_challenge_secret(name);
        let plain = self.open_secret(&key)?;
        Ok(decode_secret(plain, &key, records::decode_acme_challenge)?
            .filter(|challenge| challenge.name == name))
    }

    /// Row counts of every table, for backups, `doctor` and tests.
    pub fn table_counts(&self) -> Result<Vec<(&'static str, u64)>, StoreError> {
        let mut out = Vec::new();
        for name in tables::ALL_TABLES {
            out.push((*name, self.rows.count(name)?));
        }
        Ok(out)
    }

    /// The issuer the server last announced (`meta.issuer`), if a server ever started.
    pub fn issuer(&self) -> Result<Option<String>, StoreError> {
        let Some(bytes) = self.rows.get(tables::META_NAME, tables::META_ISSUER)? else {
            return Ok(None);
        };
        let issuer = records::decode(&bytes).map_err(|err| StoreError::Decode {
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
        audit_chain::page(self.rows, after, limit, scan, filter)
    }

    /// The newest `count` entries, oldest first (for `audit tail`).
    pub fn audit_last(&self, count: usize) -> Result<Vec<(u64, AuditEntry)>, StoreError> {
        audit_chain::last(self.rows, count)
    }

    /// How many records the log holds now.
    pub fn audit_len(&self) -> Result<u64, StoreError> {
        self.rows.count(tables::AUDIT_EVENTS_NAME)
    }

    /// Where every node's audit chain stood at its last commit, by chain number (empty
    /// for a data file).
    pub fn audit_chain_heads(&self) -> Result<Vec<(u64, ChainHead)>, StoreError> {
        audit_chain::chain_heads(self.rows)
    }

    /// Walks the whole log and checks every tag and link.
    pub fn audit_verify(
        &self,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<ChainReport, StoreError> {
        audit_chain::verify(self.rows, self.chain, progress)
    }
}

impl WriteTx<'_> {
    /// Records the issuer tokens are now signed as (`meta.issuer`).
    pub fn set_issuer(&self, issuer: &str) -> Result<(), StoreError> {
        let bytes = records::encode(&issuer);
        self.rows
            .put(tables::META_NAME, tables::META_ISSUER, &bytes)
    }

    /// Inserts or replaces one record.
    pub fn put<T>(&self, records: &Records<T>, key: &str, value: &T) -> Result<(), StoreError> {
        self.rows.put(records.name, key, &(records.encode)(value))
    }

    /// Removes one record; whether it was there.
    pub fn delete<T>(&self, records: &Records<T>, key: &str) -> Result<bool, StoreError> {
        self.rows.remove(records.name, key)
    }

    /// Removes every record for which `keep` is false; returns how many went. A row that
    /// does not decode is an error, never silently dropped.
    pub fn retain<T>(
        &self,
        records: &Records<T>,
        mut keep: impl FnMut(&str, &T) -> bool,
    ) -> Result<u64, StoreError> {
        let mut doomed = Vec::new();
        let mut last: Option<String> = None;
        loop {
            let scan = match &last {
                Some(key) => Scan::first(CHUNK).after(key),
                None => Scan::first(CHUNK),
            };
            let chunk = decode_rows(records, self.rows.scan(records.name, scan)?)?;
            let done = chunk.len() < CHUNK;
            for (key, record) in &chunk {
                if !keep(key, record) {
                    doomed.push(key.clone());
                }
            }
            last = chunk.into_iter().next_back().map(|(key, _)| key);
            if done || last.is_none() {
                break;
            }
        }
        for key in &doomed {
            self.rows.remove(records.name, key)?;
        }
        Ok(doomed.len() as u64)
    }

    /// Adds a key to an index (a no-op when it is there).
    pub fn index_insert(&self, index: &Index, key: &str) -> Result<(), StoreError> {
        self.rows.put(index.name, key, &[])
    }

    /// Removes a key from an index; whether it was there.
    pub fn index_remove(&self, index: &Index, key: &str) -> Result<bool, StoreError> {
        self.rows.remove(index.name, key)
    }

    pub fn put_admin_token(&self, id: &str, token: &AdminToken) -> Result<(), StoreError> {
        self.put(&ADMIN_TOKENS, id, token)
    }

    pub fn put_dpop_nonce_key(&self, key: &[u8; 32]) -> Result<(), StoreError> {
        self.put_secret(SECRET_DPOP_NONCE_KEY, key)
    }

    pub fn put_self_signed_cert(&self, cert: &SelfSignedCert) -> Result<(), StoreError> {
        self.put_secret(SECRET_SELF_SIGNED, &records::encode_self_signed(cert))
    }

    pub fn put_admin_user(&self, user: &AdminUser) -> Result<(), StoreError> {
        self.put_secret(
            &admin_user_secret(&user.name),
            &records::encode_admin_user(user),
        )
    }

    /// Removes the admin user `name`; false if there was none.
    pub fn delete_admin_user(&self, name: &str) -> Result<bool, StoreError> {
        self.rows.remove(SECRETS, &admin_user_secret(name))
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
        for stale in self.secret_names(&acme_cert_prefix(&cert.directory))? {
            if stale != name {
                self.rows.remove(SECRETS, &stale)?;
            }
        }
        self.put_secret(&name, &records::encode_acme_certificate(cert))
    }

    pub fn put_acme_order_lease(&self, lease: &AcmeOrderLease) -> Result<(), StoreError> {
        self.put_secret(
            &acme_order_secret(&lease.directory, &lease.domains),
            &records::encode_acme_order_lease(lease),
        )
    }

    /// Removes the order lease of `directory` and `domains`; whether there was one.
    pub fn delete_acme_order_lease(
        &self,
        directory: &str,
        domains: &[String],
    ) -> Result<bool, StoreError> {
        self.rows
            .remove(SECRETS, &acme_order_secret(directory, domains))
    }

    pub fn put_acme_challenge(&self, challenge: &AcmeChallenge) -> Result<(), StoreError> {
        self.put_secret(
            &acme_challenge_secret(&challenge.name),
            &records::encode_acme_challenge(challenge),
        )
    }

    /// Removes the challenge stored for `name`; whether there was one.
    pub fn delete_acme_challenge(&self, name: &str) -> Result<bool, StoreError> {
        self.rows.remove(SECRETS, &acme_challenge_secret(name))
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
        self.rows.remove(SECRETS, &signing_key_secret(kid))
    }

    fn put_secret(&self, name: &str, plaintext: &[u8]) -> Result<(), StoreError> {
        let sealed = self
            .sealer
            .seal(SECRETS, name.as_bytes(), plaintext)
            .map_err(|source| StoreError::SealedValue {
                table: SECRETS,
                key: name.to_string(),
                source,
            })?;
        self.rows.put(SECRETS, name, &sealed)
    }

    /// Appends one event to the audit log and sets its `prev`. Durable when the
    /// transaction commits.
    pub fn append_audit(&self, entry: &mut AuditEntry) -> Result<(), StoreError> {
        self.append_audit_binding(entry, &[])
    }

    /// Appends one event that also vouches for where the other nodes' audit chains
    /// stand (`heads`, from `ReadTx::audit_chain_heads`): a checkpoint. A data file's
    /// one chain needs none, and there it is an ordinary record.
    pub fn append_audit_binding(
        &self,
        entry: &mut AuditEntry,
        heads: &[ChainPlace],
    ) -> Result<(), StoreError> {
        if let Some(head) = self.rows.node_chain()? {
            audit_chain::append_node(self.chain, self.rows, head, entry, heads)?;
            return Ok(());
        }
        let head = match *self.audit_head.borrow() {
            Some(head) => head,
            None => audit_chain::head(self.rows)?,
        };
        let (_, next) = audit_chain::append(self.chain, self.rows, head, entry)?;
        *self.audit_head.borrow_mut() = Some(next);
        Ok(())
    }

    /// Removes up to `max` of the oldest records from before `before_ms` and moves the
    /// pruning checkpoint past them.
    pub fn prune_audit(&self, before_ms: u64, max: u64) -> Result<Pruned, StoreError> {
        // Pruning leaves the head where it is; only an emptied log reads it from the new
        // checkpoint, which says the same.
        audit_chain::prune(self.rows, self.chain, before_ms, max)
    }
}
