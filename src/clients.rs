//! Registered API clients: the resource servers that may call `/v1/introspect` with
//! HTTP Basic credentials (`client_secret_basic`, as RFC 7662 callers usually do).
//!
//! A client id reads `cli_<32 hex>`, a secret `ghc_<43 base64url>` (256 random bits),
//! stored only as SHA-256. Checks compare in constant time and do the same work for an
//! unknown id as for a known one. The hashes of the clients not revoked are also held in
//! memory (read at start, kept by `create` and `revoke`), so that a check reads nothing
//! from the data file. This module must not know HTTP.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use crate::audit::{self, Event, Origin, Severity};
use crate::error_kind::{Classify, ErrorKind};
use serde::Serialize;

use crate::clock::{SharedClock, format_rfc3339};
use crate::ids::{ClientId, RandomError, Secret, hash_matches, secret_hash};
use crate::store::records::Client;
use crate::store::{CLIENTS, Store, StoreError};

const SECRET_PREFIX: &str = "ghc_";

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Every failed check: one variant, the caller learns nothing more.
    #[error("invalid client credentials")]
    Invalid,
    #[error("no client with id {0}")]
    NotFound(String),
    #[error("client {0} is already revoked")]
    AlreadyRevoked(String),
    #[error(
        "bad client name: {0:?} (1 to 64 characters; letters, digits, spaces and . _ - @ : / only)"
    )]
    BadName(String),
    #[error(transparent)]
    Random(#[from] RandomError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl Classify for ClientError {
    fn kind(&self) -> ErrorKind {
        match self {
            Self::Invalid => ErrorKind::Unauthenticated,
            Self::NotFound(_) => ErrorKind::NotFound,
            Self::AlreadyRevoked(_) => ErrorKind::Conflict,
            Self::BadName(_) => ErrorKind::Invalid,
            Self::Random(_) => ErrorKind::Internal,
            Self::Store(err) => err.kind(),
        }
    }
}

/// A client just registered: the only moment its secret exists outside the caller.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct NewClient {
    pub client_id: ClientId,
    pub client_secret: String,
    pub(crate) name: String,
}

/// A client as listed (never its secret or hash).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct ClientInfo {
    pub client_id: ClientId,
    pub name: String,
    pub(crate) created_at: String,
    pub revoked_at: Option<String>,
}

fn info(id: ClientId, c: &Client) -> ClientInfo {
    ClientInfo {
        client_id: id,
        name: c.name.clone(),
        created_at: format_rfc3339(c.created_at_ms),
        revoked_at: c.revoked_at_ms.map(format_rfc3339),
    }
}

#[derive(Debug, Clone)]
pub struct Clients {
    store: Store,
    clock: SharedClock,
    /// The secret hash of every client not revoked, by id.
    live: Arc<RwLock<HashMap<ClientId, [u8; 32]>>>,
}

impl Clients {
    /// The clients of the data file, their live hashes read into memory.
    pub(crate) fn load(store: Store, clock: SharedClock) -> Result<Self, StoreError> {
        let rows = store.read(|tx| tx.all(&CLIENTS))?;
        let live = rows
            .iter()
            .filter(|(_, c)| c.revoked_at_ms.is_none())
            .filter_map(|(id, c)| ClientId::parse(id).map(|id| (id, c.secret_hash)))
            .collect();
        Ok(Self {
            store,
            clock,
            live: Arc::new(RwLock::new(live)),
        })
    }

    /// Mirrors one client row another node wrote (the change feed, which carries the
    /// row: `None` when removed), so a client made or revoked there is known here.
    pub(crate) fn apply_change(&self, key: &str, value: Option<&[u8]>) -> Result<(), StoreError> {
        let Some(id) = ClientId::parse(key) else {
            return Ok(());
        };
        let client = value
            .map(|value| CLIENTS.decode_row(key, value))
            .transpose()?;
        let mut live = self.live.write().unwrap_or_else(|p| p.into_inner());
        match client {
            Some(client) if client.revoked_at_ms.is_none() => {
                live.insert(id, client.secret_hash);
            }
            _ => {
                live.remove(&id);
            }
        }
        Ok(())
    }

    /// Reads every client again (after a break in the change feed).
    pub(crate) fn reload(&self) -> Result<(), StoreError> {
        let fresh = Self::load(self.store.clone(), self.clock.clone())?;
        let live = std::mem::take(&mut *fresh.live.write().unwrap_or_else(|p| p.into_inner()));
        *self.live.write().unwrap_or_else(|p| p.into_inner()) = live;
        Ok(())
    }

    pub async fn create(&self, name: &str, origin: &Origin) -> Result<NewClient, ClientError> {
        let name = crate::ids::credential_name(name)
            .ok_or_else(|| ClientError::BadName(name.trim().to_string()))?;
        let id = ClientId::generate()?;
        let secret = Secret::generate(SECRET_PREFIX)?;
        let record = Client {
            name: name.clone(),
            secret_hash: secret.hash(),
            created_at_ms: self.clock.now_ms(),
            revoked_at_ms: None,
        };
        let key = id.to_string();
        let event = Event::new("client.created")
            .severity(Severity::Notice)
            .detail("client_id", key.clone())
            .detail("name", name.clone());
        let origin = origin.clone();
        self.store
            .write(move |tx| {
                tx.put(&CLIENTS, &key, &record)?;
                audit::append(tx, &origin, &event, record.created_at_ms)?;
                Ok::<_, StoreError>(())
            })
            .await?;
        self.live
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, secret.hash());
        Ok(NewClient {
            client_id: id,
            client_secret: secret.into_string(),
            name,
        })
    }

    pub(crate) fn list(&self) -> Result<Vec<ClientInfo>, ClientError> {
        let rows = self.store.read(|tx| tx.all(&CLIENTS))?;
        let mut out: Vec<ClientInfo> = rows
            .iter()
            .filter_map(|(id, c)| ClientId::parse(id).map(|id| info(id, c)))
            .collect();
        out.sort_by(|a, b| a.created_at.cmp(&b.created_at));
        Ok(out)
    }

    pub async fn revoke(&self, id: &str, origin: &Origin) -> Result<ClientInfo, ClientError> {
        let origin = origin.clone();
        let client_id = ClientId::parse(id).ok_or_else(|| ClientError::NotFound(id.to_string()))?;
        let now = self.clock.now_ms();
        let key = client_id.to_string();
        let outcome = self
            .store
            .write(
                move |tx| -> Result<Result<Client, ClientError>, StoreError> {
                    let Some(mut client) = tx.get(&CLIENTS, &key)? else {
                        return Ok(Err(ClientError::NotFound(key.clone())));
                    };
                    if client.revoked_at_ms.is_some() {
                        return Ok(Err(ClientError::AlreadyRevoked(key.clone())));
                    }
                    client.revoked_at_ms = Some(now);
                    tx.put(&CLIENTS, &key, &client)?;
                    let event = Event::new("client.revoked")
                        .severity(Severity::Notice)
                        .detail("client_id", key.clone())
                        .detail("name", client.name.clone());
                    audit::append(tx, &origin, &event, now)?;
                    Ok(Ok(client))
                },
            )
            .await??;
        self.live
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&client_id);
        Ok(info(client_id, &outcome))
    }

    /// Checks a client id and secret; `Ok(id)` only for a registered, unrevoked client.
    pub(crate) fn verify(&self, client_id: &str, secret: &str) -> Result<ClientId, ClientError> {
        let id = ClientId::parse(client_id);
        let known = id.and_then(|id| {
            self.live
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .get(&id)
                .copied()
        });
        // With several nodes, another may have made the client a moment ago, before its
        // change reached this one: the store has the last word on an id not known here.
        let stored = match (known, id) {
            (None, Some(id)) if self.store.is_postgres() => {
                let key = id.to_string();
                let hash = self
                    .store
                    .read(|tx| tx.get(&CLIENTS, &key))?
                    .filter(|c| c.revoked_at_ms.is_none())
                    .map(|c| c.secret_hash);
                if let Some(hash) = hash {
                    self.live
                        .write()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(id, hash);
                }
                hash
            }
            (known, _) => known,
        };
        let presented = secret_hash(secret.as_bytes());
        let matches =
            hash_matches(stored.as_ref(), &presented) && Secret::well_formed(secret, SECRET_PREFIX);
        match id {
            Some(id) if matches => Ok(id),
            _ => Err(ClientError::Invalid),
        }
    }
}
