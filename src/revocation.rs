//! The revocation list: access tokens, refresh-token families and devices that must no
//! longer be accepted, durable in the data file and mirrored in memory.
//!
//! Every check of an access token asks `RevocationList::is_revoked` (one read lock, three
//! hash lookups); nothing there touches the store. Revocations are written durably
//! through the group-commit writer before the caller answers; the in-memory mirror is
//! updated first, so a failed write errs on the side of refusing. The mirror is rebuilt
//! from the data file at start. Entries are pruned once the tokens they name could no
//! longer verify anyway (expired plus leeway). Signing-key revocation lives in `keys`.

use std::collections::{HashMap, HashSet};
use std::sync::RwLock;
use std::time::Duration;

use crate::audit::{self, Event, Origin, Severity};
use crate::clock::{SharedClock, millis};
use crate::ids::{DeviceId, FamilyId, TokenId};
use crate::live::Changes;
use crate::store::records::{RevokedToken, TokenFamily};
use crate::store::{DEVICES, REVOKED_TOKENS, Store, StoreError, TOKEN_FAMILIES, WriteTx};

#[derive(Debug, Default)]
struct Revoked {
    /// jti → the token's own expiry (ms), after which the entry is useless.
    tokens: HashMap<TokenId, u64>,
    /// family → when its last access token expires (ms).
    families: HashMap<FamilyId, u64>,
    /// Revoked devices stay revoked; there are few of them.
    devices: HashSet<DeviceId>,
}

/// What is revoked, and since when it may be forgotten.
#[derive(Debug)]
pub struct RevocationList {
    store: Store,
    clock: SharedClock,
    /// Access-token lifetime plus leeway: how long after a family's revocation one of its
    /// access tokens could still be presented.
    access_window: Duration,
    revoked: RwLock<Revoked>,
    /// Bumped after every revocation, so live connections re-check their tokens.
    changes: Changes,
}

impl RevocationList {
    /// Rebuilds the in-memory mirror from the data file.
    pub fn load(
        store: Store,
        clock: SharedClock,
        access_window: Duration,
        changes: Changes,
    ) -> Result<Self, StoreError> {
        let now = clock.now_ms();
        let window = millis(access_window);
        let mut revoked = Revoked::default();
        store.read(|tx| {
            for (jti, row) in tx.all(&REVOKED_TOKENS)? {
                if let Some(jti) = TokenId::parse(&jti) {
                    revoked.tokens.insert(jti, row.expires_at_ms);
                }
            }
            for (id, family) in tx.all(&TOKEN_FAMILIES)? {
                if let (Some(id), Some(at)) = (FamilyId::parse(&id), family.revoked_at_ms) {
                    let forget_at = at.saturating_add(window);
                    if forget_at > now {
                        revoked.families.insert(id, forget_at);
                    }
                }
            }
            for (id, device) in tx.all(&DEVICES)? {
                if let (Some(id), Some(_)) = (DeviceId::parse(&id), device.revoked_at_ms) {
                    revoked.devices.insert(id);
                }
            }
            Ok::<_, StoreError>(())
        })?;
        Ok(Self {
            store,
            clock,
            access_window,
            revoked: RwLock::new(revoked),
            changes,
        })
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Revoked> {
        self.revoked.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Revoked> {
        self.revoked.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether an access token with these claims has been revoked, by itself, through its
    /// refresh family, or through its device.
    pub fn is_revoked(&self, jti: &TokenId, family: &FamilyId, device: &DeviceId) -> bool {
        let revoked = self.read();
        revoked.tokens.contains_key(jti)
            || revoked.families.contains_key(family)
            || revoked.devices.contains(device)
    }

    pub fn is_device_revoked(&self, device: &DeviceId) -> bool {
        self.read().devices.contains(device)
    }

    /// Revokes one access token; durable when this returns.
    pub async fn revoke_token(
        &self,
        jti: TokenId,
        device: DeviceId,
        expires_at_ms: u64,
        origin: &Origin,
    ) -> Result<(), StoreError> {
        self.write().tokens.insert(jti, expires_at_ms);
        self.changes.bump();
        let row = RevokedToken {
            device_id: device.to_string(),
            expires_at_ms,
            revoked_at_ms: self.clock.now_ms(),
        };
        let key = jti.to_string();
        let event = Event::new("token.revoked")
            .device(device)
            .detail("jti", key.clone())
            .detail("scope", "access_token");
        let origin = origin.clone();
        let now = row.revoked_at_ms;
        self.store
            .write(move |tx| {
                tx.put(&REVOKED_TOKENS, &key, &row)?;
                audit::append(tx, &origin, &event, now)?;
                Ok(())
            })
            .await
    }

    /// Marks a family revoked inside a caller's transaction (refresh-token reuse is
    /// detected inside the refresh transaction). Call `remember_family` once committed.
    pub fn revoke_family_in(
        tx: &WriteTx<'_>,
        family_id: &FamilyId,
        family: &mut TokenFamily,
        reason: &str,
        now_ms: u64,
    ) -> Result<(), StoreError> {
        if family.revoked_at_ms.is_none() {
            family.revoked_at_ms = Some(now_ms);
            family.revoke_reason = Some(reason.to_string());
            tx.put(&TOKEN_FAMILIES, &family_id.to_string(), family)?;
        }
        Ok(())
    }

    /// Mirrors a family revocation committed by `revoke_family_in`.
    pub fn remember_family(&self, family: FamilyId) {
        let forget_at = self
            .clock
            .now_ms()
            .saturating_add(millis(self.access_window));
        self.write().families.insert(family, forget_at);
        self.changes.bump();
    }

    /// Revokes a whole family (its refresh token and every access token); durable when
    /// this returns. Unknown families are ignored: there is nothing to revoke.
    pub async fn revoke_family(
        &self,
        family_id: FamilyId,
        reason: &str,
        origin: &Origin,
    ) -> Result<bool, StoreError> {
        self.remember_family(family_id);
        let now = self.clock.now_ms();
        let reason = reason.to_string();
        let key = family_id.to_string();
        let origin = origin.clone();
        let known = self
            .store
            .write(move |tx| {
                let Some(mut family) = tx.get(&TOKEN_FAMILIES, &key)? else {
                    return Ok::<_, StoreError>(false);
                };
                Self::revoke_family_in(tx, &family_id, &mut family, &reason, now)?;
                let event = Event::new("token.revoked")
                    .device(&family.device_id)
                    .detail("family", key.clone())
                    .detail("scope", "family")
                    .detail("reason", reason.clone());
                audit::append(tx, &origin, &event, now)?;
                Ok(true)
            })
            .await?;
        if !known {
            self.write().families.remove(&family_id);
        }
        Ok(known)
    }

    /// Revokes a device and every family it holds; durable when this returns. `Ok(false)`
    /// when there is no such device.
    pub async fn revoke_device(
        &self,
        device: DeviceId,
        origin: &Origin,
    ) -> Result<bool, StoreError> {
        self.write().devices.insert(device);
        self.changes.bump();
        let now = self.clock.now_ms();
        let key = device.to_string();
        let origin = origin.clone();
        let outcome = self
            .store
            .write(move |tx| {
                let Some(mut record) = tx.get(&DEVICES, &key)? else {
                    return Ok::<_, StoreError>(None);
                };
                if record.revoked_at_ms.is_none() {
                    record.revoked_at_ms = Some(now);
                    tx.put(&DEVICES, &key, &record)?;
                }
                let mut families = Vec::new();
                for (id, mut family) in tx.all(&TOKEN_FAMILIES)? {
                    if family.device_id != key || family.revoked_at_ms.is_some() {
                        continue;
                    }
                    if let Some(family_id) = FamilyId::parse(&id) {
                        Self::revoke_family_in(tx, &family_id, &mut family, "device revoked", now)?;
                        families.push(family_id);
                    }
                }
                let event = Event::new("device.revoked")
                    .severity(Severity::Notice)
                    .device(&key)
                    .detail("name", record.name.clone())
                    .detail("families_revoked", families.len());
                audit::append(tx, &origin, &event, now)?;
                Ok(Some(families))
            })
            .await?;
        match outcome {
            Some(families) => {
                for family in families {
                    self.remember_family(family);
                }
                Ok(true)
            }
            None => {
                self.write().devices.remove(&device);
                Ok(false)
            }
        }
    }

    /// Forgets entries whose tokens can no longer verify: rows of revoked access tokens
    /// past their expiry plus `leeway`, and in-memory family entries past their window.
    pub async fn prune(&self, leeway: Duration) -> Result<u64, StoreError> {
        let cutoff = self.clock.now_ms().saturating_sub(millis(leeway));
        let now = self.clock.now_ms();
        let removed = self
            .store
            .write(move |tx| tx.retain(&REVOKED_TOKENS, |_, row| row.expires_at_ms > cutoff))
            .await?;
        let mut revoked = self.write();
        revoked.tokens.retain(|_, exp| *exp > cutoff);
        revoked.families.retain(|_, forget_at| *forget_at > now);
        Ok(removed)
    }

    /// Sizes of the mirror: (tokens, families, devices).
    pub fn counts(&self) -> (usize, usize, usize) {
        let r = self.read();
        (r.tokens.len(), r.families.len(), r.devices.len())
    }
}
