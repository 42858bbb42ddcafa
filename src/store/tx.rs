//! Typed access to the tables inside one transaction.
//!
//! `ReadTx` and `WriteTx` are the only way the rest of the crate touches a table: they
//! take and return domain records, seal and open secrets, and turn every redb or
//! decoding failure into a `StoreError` that names the table and key. No redb type
//! leaves this module.

use redb::{ReadableTable, ReadableTableMetadata, TableDefinition, TableHandle as _};

use super::StoreError;
use super::records::{self, AdminToken, SelfSignedCert};
use super::seal::Sealer;
use super::tables::{self, ADMIN_TOKENS, SECRETS};

/// The name of the self-signed certificate in the secrets table.
pub const SECRET_SELF_SIGNED: &str = "tls/self-signed";

/// A read-only view of the data file at one point in time.
pub struct ReadTx<'a> {
    pub(super) tx: &'a redb::ReadTransaction,
    pub(super) sealer: &'a Sealer,
}

/// A write transaction handed to a job of the group-commit writer.
pub struct WriteTx<'a> {
    pub(super) tx: &'a redb::WriteTransaction,
    pub(super) sealer: &'a Sealer,
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

fn get_bytes(
    table: &impl ReadableTable<&'static str, &'static [u8]>,
    key: &str,
) -> Result<Option<Vec<u8>>, StoreError> {
    Ok(table.get(key)?.map(|v| v.value().to_vec()))
}

fn admin_token_from(
    table: &impl ReadableTable<&'static str, &'static [u8]>,
    id: &str,
) -> Result<Option<AdminToken>, StoreError> {
    get_bytes(table, id)?
        .map(|bytes| {
            records::decode_admin_token(&bytes).map_err(|e| decode_err("admin_tokens.v1", id, e))
        })
        .transpose()
}

fn admin_tokens_from(
    table: &impl ReadableTable<&'static str, &'static [u8]>,
) -> Result<Vec<(String, AdminToken)>, StoreError> {
    let mut out = Vec::new();
    for row in table.iter()? {
        let (key, value) = row?;
        let id = key.value().to_string();
        let token = records::decode_admin_token(value.value())
            .map_err(|e| decode_err("admin_tokens.v1", &id, e))?;
        out.push((id, token));
    }
    Ok(out)
}

fn open_secret(
    sealer: &Sealer,
    table: &impl ReadableTable<&'static str, &'static [u8]>,
    name: &str,
) -> Result<Option<Vec<u8>>, StoreError> {
    let Some(sealed) = get_bytes(table, name)? else {
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

fn self_signed_from(
    sealer: &Sealer,
    table: &impl ReadableTable<&'static str, &'static [u8]>,
) -> Result<Option<SelfSignedCert>, StoreError> {
    open_secret(sealer, table, SECRET_SELF_SIGNED)?
        .map(|plain| {
            records::decode_self_signed(&plain)
                .map_err(|e| decode_err("secrets.v1", SECRET_SELF_SIGNED, e))
        })
        .transpose()
}

impl ReadTx<'_> {
    fn table(
        &self,
        def: TableDefinition<'static, &'static str, &'static [u8]>,
    ) -> Result<redb::ReadOnlyTable<&'static str, &'static [u8]>, StoreError> {
        Ok(self.tx.open_table(def)?)
    }

    pub fn admin_token(&self, id: &str) -> Result<Option<AdminToken>, StoreError> {
        admin_token_from(&self.table(ADMIN_TOKENS)?, id)
    }

    pub fn admin_tokens(&self) -> Result<Vec<(String, AdminToken)>, StoreError> {
        admin_tokens_from(&self.table(ADMIN_TOKENS)?)
    }

    pub fn self_signed_cert(&self) -> Result<Option<SelfSignedCert>, StoreError> {
        self_signed_from(self.sealer, &self.table(SECRETS)?)
    }

    /// Row counts of every table, for backups, `doctor` and tests.
    pub fn table_counts(&self) -> Result<Vec<(&'static str, u64)>, StoreError> {
        let mut out = Vec::new();
        for name in tables::ALL_TABLES {
            let def: TableDefinition<&str, &[u8]> = TableDefinition::new(name);
            out.push((*name, self.tx.open_table(def)?.len()?));
        }
        Ok(out)
    }
}

impl WriteTx<'_> {
    fn table(
        &self,
        def: TableDefinition<'static, &'static str, &'static [u8]>,
    ) -> Result<redb::Table<'_, &'static str, &'static [u8]>, StoreError> {
        Ok(self.tx.open_table(def)?)
    }

    pub fn admin_token(&self, id: &str) -> Result<Option<AdminToken>, StoreError> {
        admin_token_from(&self.table(ADMIN_TOKENS)?, id)
    }

    pub fn admin_tokens(&self) -> Result<Vec<(String, AdminToken)>, StoreError> {
        admin_tokens_from(&self.table(ADMIN_TOKENS)?)
    }

    pub fn put_admin_token(&self, id: &str, token: &AdminToken) -> Result<(), StoreError> {
        let bytes = records::encode_admin_token(token);
        self.table(ADMIN_TOKENS)?.insert(id, bytes.as_slice())?;
        Ok(())
    }

    pub fn self_signed_cert(&self) -> Result<Option<SelfSignedCert>, StoreError> {
        self_signed_from(self.sealer, &self.table(SECRETS)?)
    }

    pub fn put_self_signed_cert(&self, cert: &SelfSignedCert) -> Result<(), StoreError> {
        self.put_secret(SECRET_SELF_SIGNED, &records::encode_self_signed(cert))
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
