//! Admin tokens: bearer credentials for the admin API and UI.
//!
//! A token reads `gha_<id>_<secret>`: a 64-bit id (16 hex characters) that names the
//! row, and a 256-bit secret (43 base64url characters). Only SHA-256 of the secret is
//! stored; a 256-bit random secret needs no slow hash. Checks compare hashes in constant
//! time and do the same work for an unknown id as for a known one. This module must not
//! know HTTP: the admin extractor calls `AdminTokens::verify`.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, RwLock};

use crate::error_kind::{Classify, ErrorKind};
use crate::ids::{hash_matches, random_bytes, secret_hash};
use serde::Serialize;

use crate::audit::{self, Event, Origin, Severity};
use crate::clock::SharedClock;
use crate::store::records::AdminToken;
use crate::store::{ADMIN_TOKENS, Store, StoreError};

const PREFIX: &str = "gha_";
const ID_BYTES: usize = 8;
const SECRET_BYTES: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum AdminTokenError {
    /// Deliberately one variant for every failed check: the caller learns nothing more.
    #[error("invalid admin token")]
    Invalid,
    #[error("no admin token with id {0}")]
    NotFound(String),
    #[error("admin token {0} is already revoked")]
    AlreadyRevoked(String),
    #[error(
        "bad token name: {0} (1 to 64 characters; letters, digits, spaces and . _ - @ : / only)"
    )]
    BadName(String),
    #[error("the system random number generator failed")]
    Random,
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl Classify for AdminTokenError {
    fn kind(&self) -> ErrorKind {
        match self {
            Self::Invalid => ErrorKind::Unauthenticated,
            Self::NotFound(_) => ErrorKind::NotFound,
            Self::AlreadyRevoked(_) => ErrorKind::Conflict,
            Self::BadName(_) => ErrorKind::Invalid,
            Self::Random => ErrorKind::Internal,
            Self::Store(err) => err.kind(),
        }
    }
}

/// A token just created: the only moment its secret exists outside the caller.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct IssuedToken {
    pub id: String,
    pub(crate) name: String,
    pub token: String,
}

/// What `admin-token list` shows (never the secret or its hash).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct AdminTokenInfo {
    pub id: String,
    pub name: String,
    pub created_at_ms: u64,
    pub(crate) last_used_at_ms: Option<u64>,
    pub revoked_at_ms: Option<u64>,
}

/// How often a token's last-used time is written, at most.
const LAST_USED_RESOLUTION_MS: u64 = 60_000;
/// A token id and the address it was used from.
type UseKey = (String, Option<IpAddr>);

/// Bound on the (token, address) pairs remembered for that coalescing.
const MAX_TRACKED_USES: usize = 10_000;

/// The admin-token registry over the store.
#[derive(Debug, Clone)]
pub struct AdminTokens {
    store: Store,
    clock: SharedClock,
    /// Token id → the last-used time last written, so that a busy token costs one write
    /// a minute, not one per request.
    /// When each (token, address) last had its use written.
    last_written: Arc<Mutex<HashMap<UseKey, u64>>>,
    /// The secret hash of every token not revoked, by id: a check asks the store only
    /// for an id it does not know (one made a moment ago by another node, or none).
    /// Other nodes' changes arrive through the change feed (`apply_change`).
    live: Arc<RwLock<HashMap<String, [u8; 32]>>>,
}

/// The hashes of the tokens not revoked, by id.
fn live_hashes(tokens: Vec<(String, AdminToken)>) -> HashMap<String, [u8; 32]> {
    tokens
        .into_iter()
        .filter(|(_, t)| t.revoked_at_ms.is_none())
        .map(|(id, t)| (id, t.secret_hash))
        .collect()
}

fn validate_name(name: &str) -> Result<String, AdminTokenError> {
    crate::ids::credential_name(name)
        .ok_or_else(|| AdminTokenError::BadName(format!("{:?}", name.trim())))
}

/// Splits `gha_<id>_<secret>` into the id text and the secret bytes.
fn parse(presented: &str) -> Option<(String, Vec<u8>)> {
    // Bounded before any work: a token is exactly 4 + 16 + 1 + 43 = 64 characters.
    if presented.len() != PREFIX.len() + ID_BYTES * 2 + 1 + 43 {
        return None;
    }
    let rest = presented.strip_prefix(PREFIX)?;
    let (id, secret) = rest.split_once('_')?;
    let id_bytes = data_encoding::HEXLOWER.decode(id.as_bytes()).ok()?;
    if id_bytes.len() != ID_BYTES {
        return None;
    }
    let secret = data_encoding::BASE64URL_NOPAD
        .decode(secret.as_bytes())
        .ok()?;
    (secret.len() == SECRET_BYTES).then(|| (id.to_string(), secret))
}

impl AdminTokens {
    /// The registry, with the live tokens' hashes read into memory.
    pub fn load(store: Store, clock: SharedClock) -> Result<Self, StoreError> {
        let live = live_hashes(store.read(|tx| tx.admin_tokens())?);
        Ok(Self {
            store,
            clock,
            last_written: Arc::default(),
            live: Arc::new(RwLock::new(live)),
        })
    }

    /// Mirrors one token row another node wrote (the change feed, which carries the row:
    /// `None` when removed).
    pub(crate) fn apply_change(&self, id: &str, value: Option<&[u8]>) -> Result<(), StoreError> {
        let token = value
            .map(|value| ADMIN_TOKENS.decode_row(id, value))
            .transpose()?;
        let mut live = self.live.write().unwrap_or_else(|p| p.into_inner());
        match token {
            Some(token) if token.revoked_at_ms.is_none() => {
                live.insert(id.to_string(), token.secret_hash);
            }
            _ => {
                live.remove(id);
            }
        }
        Ok(())
    }

    /// Reads every token again (after a break in the change feed).
    pub(crate) fn reload(&self) -> Result<(), StoreError> {
        let fresh = live_hashes(self.store.read(|tx| tx.admin_tokens())?);
        *self.live.write().unwrap_or_else(|p| p.into_inner()) = fresh;
        Ok(())
    }

    /// Records that token `id` was just used by `origin`: its last-use time and a
    /// `login.succeeded` audit record, written in the background at most once a minute
    /// per token and address. Losing one such write to a crash loses a minute of
    /// precision.
    pub(crate) fn note_used(&self, id: &str, origin: &Origin) {
        let now = self.clock.now_ms();
        {
            let mut written = self.last_written.lock().unwrap_or_else(|p| p.into_inner());
            let key = (id.to_string(), origin.source);
            let due = written
                .get(&key)
                .is_none_or(|at| now.saturating_sub(*at) >= LAST_USED_RESOLUTION_MS);
            if !due {
                return;
            }
            if written.len() >= MAX_TRACKED_USES {
                written.retain(|_, at| now.saturating_sub(*at) < LAST_USED_RESOLUTION_MS);
            }
            written.insert(key, now);
        }
        let store = self.store.clone();
        let id = id.to_string();
        let origin = origin.clone();
        tokio::spawn(async move {
            let event = Event::new("login.succeeded").detail("method", "admin_token");
            let result = store
                .write(move |tx| -> Result<(), StoreError> {
                    if let Some(mut token) = tx.admin_token(&id)? {
                        token.last_used_at_ms = Some(now);
                        tx.put_admin_token(&id, &token)?;
                    }
                    audit::append(tx, &origin, &event, now)?;
                    Ok(())
                })
                .await;
            if let Err(err) = result {
                tracing::warn!(error = %err, "could not record an admin token's last use");
            }
        });
    }

    /// Creates a token and returns its text, which is not stored anywhere.
    pub async fn create(
        &self,
        name: &str,
        origin: &Origin,
    ) -> Result<IssuedToken, AdminTokenError> {
        let name = validate_name(name)?;
        let id: [u8; ID_BYTES] = random_bytes().map_err(|_| AdminTokenError::Random)?;
        let secret: [u8; SECRET_BYTES] = random_bytes().map_err(|_| AdminTokenError::Random)?;
        let id = data_encoding::HEXLOWER.encode(&id);
        let record = AdminToken {
            name: name.clone(),
            secret_hash: secret_hash(&secret),
            created_at_ms: self.clock.now_ms(),
            last_used_at_ms: None,
            revoked_at_ms: None,
        };
        let row_id = id.clone();
        let event = Event::new("admin_token.created")
            .severity(Severity::Notice)
            .detail("id", id.clone())
            .detail("name", name.clone());
        let origin = origin.clone();
        self.store
            .write(move |tx| -> Result<(), AdminTokenError> {
                // 64 random bits collide about never; a collision must still not overwrite.
                if tx.admin_token(&row_id)?.is_some() {
                    return Err(AdminTokenError::Random);
                }
                tx.put_admin_token(&row_id, &record)?;
                audit::append(tx, &origin, &event, record.created_at_ms)?;
                Ok(())
            })
            .await?;
        let token = format!(
            "{PREFIX}{id}_{}",
            data_encoding::BASE64URL_NOPAD.encode(&secret)
        );
        Ok(IssuedToken { id, name, token })
    }

    /// Every token, revoked ones included, oldest first.
    pub(crate) fn list(&self) -> Result<Vec<AdminTokenInfo>, AdminTokenError> {
        let mut tokens: Vec<AdminTokenInfo> = self
            .store
            .read(|tx| tx.admin_tokens())?
            .into_iter()
            .map(|(id, t)| AdminTokenInfo {
                id,
                name: t.name,
                created_at_ms: t.created_at_ms,
                last_used_at_ms: t.last_used_at_ms,
                revoked_at_ms: t.revoked_at_ms,
            })
            .collect();
        tokens.sort_by(|a, b| (a.created_at_ms, &a.id).cmp(&(b.created_at_ms, &b.id)));
        Ok(tokens)
    }

    /// Revokes a token by id; durable before this returns.
    pub async fn revoke(
        &self,
        id: &str,
        origin: &Origin,
    ) -> Result<AdminTokenInfo, AdminTokenError> {
        let id = id.trim().to_ascii_lowercase();
        let now = self.clock.now_ms();
        let row_id = id.clone();
        let origin = origin.clone();
        let token = self
            .store
            .write(move |tx| -> Result<AdminToken, AdminTokenError> {
                let mut token = tx
                    .admin_token(&row_id)?
                    .ok_or_else(|| AdminTokenError::NotFound(row_id.clone()))?;
                if token.revoked_at_ms.is_some() {
                    return Err(AdminTokenError::AlreadyRevoked(row_id.clone()));
                }
                token.revoked_at_ms = Some(now);
                tx.put_admin_token(&row_id, &token)?;
                let event = Event::new("admin_token.revoked")
                    .severity(Severity::Notice)
                    .detail("id", row_id.clone())
                    .detail("name", token.name.clone());
                audit::append(tx, &origin, &event, now)?;
                Ok(token)
            })
            .await?;
        self.live
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
        Ok(AdminTokenInfo {
            id,
            name: token.name,
            created_at_ms: token.created_at_ms,
            last_used_at_ms: token.last_used_at_ms,
            revoked_at_ms: token.revoked_at_ms,
        })
    }

    /// Checks a presented token; returns its id. Every failure is the same `Invalid`.
    pub fn verify(&self, presented: &str) -> Result<String, AdminTokenError> {
        let (id, secret) = match parse(presented) {
            Some(parts) => parts,
            None => (String::new(), vec![0u8; SECRET_BYTES]),
        };
        let presented_hash = secret_hash(&secret);
        let known = self
            .live
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
            .copied();
        let stored = match known {
            Some(hash) => Some(hash),
            None if id.is_empty() => None,
            None => {
                let token = self.store.read(|tx| tx.admin_token(&id))?;
                let hash = token
                    .filter(|t| t.revoked_at_ms.is_none())
                    .map(|t| t.secret_hash);
                if let Some(hash) = hash {
                    self.live
                        .write()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(id.clone(), hash);
                }
                hash
            }
        };
        if hash_matches(stored.as_ref(), &presented_hash) {
            Ok(id)
        } else {
            Err(AdminTokenError::Invalid)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(
            validate_name("  ops laptop ").ok().as_deref(),
            Some("ops laptop")
        );
        assert!(validate_name("").is_err());
        assert!(validate_name("a\u{7}b").is_err());
        assert!(validate_name("<script>").is_err());
        assert!(validate_name(&"x".repeat(65)).is_err());
    }

    #[test]
    fn parse_rejects_malformed_tokens() {
        let good = format!("gha_{}_{}", "0".repeat(16), "A".repeat(43));
        assert!(parse(&good).is_some());
        for bad in [
            String::new(),
            "gha_".into(),
            good.replace("gha_", "ghx_"),
            format!("gha_{}_{}", "0".repeat(15), "A".repeat(44)),
            format!("gha_{}_{}", "Z".repeat(16), "A".repeat(43)),
            format!("gha_{}-{}", "0".repeat(16), "A".repeat(43)),
            format!("gha_{}_{}", "0".repeat(16), "*".repeat(43)),
            "é".repeat(32),
        ] {
            assert!(parse(&bad).is_none(), "{bad:?} parsed");
        }
    }
}
