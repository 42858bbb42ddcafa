//! The revocation list: access tokens, refresh-token families and devices that must no
//! longer be accepted, durable in the data file and mirrored in memory.
//!
//! Every check of an access token asks `RevocationList::is_revoked` (one read lock, three
//! hash lookups); nothing there touches the store. Revocations are written durably
//! through the group-commit writer before the caller answers; the in-memory mirror is
//! updated first, so a failed write errs on the side of refusing. The mirror is rebuilt
//! from the data file at start. Entries are pruned once the tokens they name could no
//! longer verify anyway (expired plus leeway). Signing-key revocation lives in `keys`.
//!
//! A family revoked through `POST /v1/revoke` is not marked in its row at once (on a data
//! file; on PostgreSQL it is, see `revoke_family`): the revocation is appended to the
//! revocation journal (`family_revocations.v1`, in time
//! order), whose rows share the table's last page, where rewriting a family row copies a
//! page of a large table keyed at random for every revocation. Until the journal is
//! folded into the rows (`fold_journal`: sorted by family, in bounded transactions, when
//! it holds `FOLD_AT` entries, `FOLD_EVERY` after the last fold, and before the daily
//! prune), a family is revoked if its row says so *or* it is in `JournaledFamilies`, the
//! in-memory set the refresh and introspection paths ask. The set is rebuilt from the
//! journal at start; it costs about 20 bytes per journaled family.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use crate::audit::{self, Event, Origin, Severity};
use crate::clock::{SharedClock, millis};
use crate::ids::{DeviceId, FamilyId, TokenId};
use crate::live::Changes;
use crate::status_list::{self, StatusIndex};
use crate::store::records::{FamilyRevocation, RevokedToken, TokenFamily};
use crate::store::{
    DEVICE_FAMILIES, DEVICES, FAMILY_REVOCATIONS, REVOKED_TOKENS, Store, StoreError,
    TOKEN_FAMILIES, WriteTx, device_family_key,
};

/// The journal is folded once it holds this many families (the in-memory set is then
/// about 9 MiB: 16 bytes a family in a hash set at most seven-eighths full)...
pub(crate) const FOLD_AT: usize = 262_144;
/// ...or when this long has passed since the last fold and it holds any.
pub const FOLD_EVERY: Duration = Duration::from_secs(60);
/// A fold reads the journal in rounds of this many entries (oldest first), so that the
/// memory it takes stays bounded (about 200 bytes an entry while a round runs)...
const FOLD_ROUND: usize = 65_536;
/// ...and writes each round in transactions of this many entries: first the families'
/// rows, sorted by family id, so that a transaction touches a run of neighbouring rows;
/// then the journal rows, in key order. Small enough that other writes wait milliseconds.
const FOLD_CHUNK: usize = 1024;

/// The journal key of a revocation: time first (fixed-width hex), so that appends land
/// on the table's last page and a fold reads the oldest first.
pub fn journal_key(revoked_at_ms: u64, family: &FamilyId) -> String {
    format!("{revoked_at_ms:016x}/{family}")
}

/// Families revoked in the journal and not yet folded into their rows. Cheap to clone:
/// write jobs take a handle to ask it inside their transaction.
#[derive(Debug, Clone, Default)]
pub struct JournaledFamilies(Arc<RwLock<HashSet<FamilyId>>>);

impl JournaledFamilies {
    pub fn contains(&self, family: &FamilyId) -> bool {
        self.0
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains(family)
    }

    pub fn len(&self) -> usize {
        self.0.read().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn insert(&self, family: FamilyId) {
        self.0
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(family);
    }

    fn remove_all(&self, families: &[FamilyId]) {
        let mut set = self.0.write().unwrap_or_else(|p| p.into_inner());
        for family in families {
            set.remove(family);
        }
    }
}

/// What one fold of the journal did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Folded {
    /// Journal entries read and removed.
    pub entries: u64,
    /// Family rows newly marked revoked (the others were already, or are gone).
    pub families_marked: u64,
}

#[derive(Debug, Default)]
struct Revoked {
    /// jti → the token's own expiry (ms), after which the entry is useless.
    tokens: HashMap<TokenId, u64>,
    /// family → when its last access token expires (ms).
    families: HashMap<FamilyId, u64>,
    /// Revoked devices stay revoked; there are few of them.
    devices: HashSet<DeviceId>,
    /// Every family that has a row in the data file. An access token names its family,
    /// and a family that is not here was pruned or never existed in this file (a restore
    /// brings back an older file than the one that issued the token): such a token is
    /// refused, since nothing in this file could revoke it.
    existing: HashSet<FamilyId>,
}

/// Why `RevocationList::check` refuses a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// Its family has no row in the data file.
    UnknownFamily,
    /// It, its family or its device is revoked.
    Revoked,
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
    journaled: JournaledFamilies,
    /// When the journal was last folded (ms), for `FOLD_EVERY`; held by the fold that
    /// runs, so that there is one at a time.
    last_fold_ms: tokio::sync::Mutex<u64>,
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
        let journaled = JournaledFamilies::default();
        store.read(|tx| {
            for (jti, row) in tx.all(&REVOKED_TOKENS)? {
                if let Some(jti) = TokenId::parse(&jti) {
                    revoked.tokens.insert(jti, row.expires_at_ms);
                }
            }
            for (id, family) in tx.all(&TOKEN_FAMILIES)? {
                let Some(id) = FamilyId::parse(&id) else {
                    continue;
                };
                revoked.existing.insert(id);
                if let Some(at) = family.revoked_at_ms {
                    let forget_at = at.saturating_add(window);
                    if forget_at > now {
                        revoked.families.insert(id, forget_at);
                    }
                }
            }
            for (_, entry) in tx.all(&FAMILY_REVOCATIONS)? {
                if let Some(id) = FamilyId::parse(&entry.family_id) {
                    journaled.insert(id);
                    let forget_at = entry.revoked_at_ms.saturating_add(window);
                    if forget_at > now {
                        let known = revoked.families.entry(id).or_insert(forget_at);
                        *known = (*known).max(forget_at);
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
            journaled,
            last_fold_ms: tokio::sync::Mutex::new(now),
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

    /// Whether an access token with these claims may be used, as far as this list
    /// knows, under one read lock: its family must have a row in the data file (see
    /// `Revoked::existing`), and neither it, its family nor its device be revoked.
    pub(crate) fn check(
        &self,
        jti: &TokenId,
        family: &FamilyId,
        device: &DeviceId,
    ) -> Result<(), Refusal> {
        match self.check_mirror(jti, family, device) {
            // With several nodes, another one may have made the family a moment ago,
            // before its change reached this one: the store has the last word. (Only a
            // validly signed token gets here, so this read cannot be had for free.)
            Err(Refusal::UnknownFamily) if self.store.is_postgres() => {
                let key = family.to_string();
                match self.store.read(|tx| tx.get(&TOKEN_FAMILIES, &key)) {
                    Ok(row) => {
                        self.apply_family(*family, row);
                        self.changes.bump();
                        self.check_mirror(jti, family, device)
                    }
                    Err(_) => Err(Refusal::UnknownFamily),
                }
            }
            other => other,
        }
    }

    fn check_mirror(
        &self,
        jti: &TokenId,
        family: &FamilyId,
        device: &DeviceId,
    ) -> Result<(), Refusal> {
        let revoked = self.read();
        if !revoked.existing.contains(family) {
            return Err(Refusal::UnknownFamily);
        }
        if revoked.tokens.contains_key(jti)
            || revoked.families.contains_key(family)
            || revoked.devices.contains(device)
        {
            return Err(Refusal::Revoked);
        }
        Ok(())
    }

    /// Mirrors a family row committed by pairing; call before any of its tokens leaves.
    pub(crate) fn family_created(&self, family: FamilyId) {
        self.write().existing.insert(family);
    }

    /// Mirrors family rows deleted by pruning.
    pub(crate) fn families_deleted(&self, families: &[FamilyId]) {
        let mut revoked = self.write();
        for family in families {
            revoked.existing.remove(family);
        }
    }

    pub(crate) fn is_device_revoked(&self, device: &DeviceId) -> bool {
        self.read().devices.contains(device)
    }

    /// The families revoked in the journal: a refresh or an introspection asks it beside
    /// the family row's own `revoked_at_ms`.
    pub fn journaled(&self) -> JournaledFamilies {
        self.journaled.clone()
    }

    /// Mirrors one row another node changed (`schedule::follow` hands on the change
    /// feed, which carries the row as the change left it: `None` when removed) and
    /// brings the list in line with it. Idempotent, so a change seen twice (after a
    /// resync) does no harm.
    pub(crate) fn apply_change(
        &self,
        table: &str,
        key: &str,
        value: Option<&[u8]>,
    ) -> Result<(), StoreError> {
        let window = millis(self.access_window);
        let now = self.clock.now_ms();
        match table {
            "revoked_tokens.v1" => {
                let Some(jti) = TokenId::parse(key) else {
                    return Ok(());
                };
                let row = value
                    .map(|value| REVOKED_TOKENS.decode_row(key, value))
                    .transpose()?;
                let mut revoked = self.write();
                match row {
                    Some(row) => {
                        revoked.tokens.insert(jti, row.expires_at_ms);
                    }
                    None => {
                        revoked.tokens.remove(&jti);
                    }
                }
            }
            "token_families.v1" => {
                let Some(id) = FamilyId::parse(key) else {
                    return Ok(());
                };
                let row = value
                    .map(|value| TOKEN_FAMILIES.decode_row(key, value))
                    .transpose()?;
                self.apply_family(id, row);
            }
            "family_revocations.v1" => {
                // A removed entry was folded into its family's row, a change of its own.
                let Some(entry) = value
                    .map(|value| FAMILY_REVOCATIONS.decode_row(key, value))
                    .transpose()?
                else {
                    return Ok(());
                };
                let Some(id) = FamilyId::parse(&entry.family_id) else {
                    return Ok(());
                };
                self.journaled.insert(id);
                let forget_at = entry.revoked_at_ms.saturating_add(window);
                if forget_at > now {
                    let mut revoked = self.write();
                    let known = revoked.families.entry(id).or_insert(forget_at);
                    *known = (*known).max(forget_at);
                }
            }
            "devices.v1" => {
                let Some(id) = DeviceId::parse(key) else {
                    return Ok(());
                };
                let row = value
                    .map(|value| DEVICES.decode_row(key, value))
                    .transpose()?;
                if row.is_some_and(|device| device.revoked_at_ms.is_some()) {
                    self.write().devices.insert(id);
                }
            }
            _ => return Ok(()),
        }
        self.changes.bump();
        Ok(())
    }

    /// Brings the list in line with a family's row as it now stands (`None`: gone).
    fn apply_family(&self, id: FamilyId, row: Option<TokenFamily>) {
        let window = millis(self.access_window);
        let now = self.clock.now_ms();
        let mut revoked = self.write();
        match row {
            Some(family) => {
                revoked.existing.insert(id);
                if let Some(at) = family.revoked_at_ms {
                    let forget_at = at.saturating_add(window);
                    if forget_at > now {
                        let known = revoked.families.entry(id).or_insert(forget_at);
                        *known = (*known).max(forget_at);
                    }
                    // The row says revoked: the journal need not (as a fold).
                    self.journaled.remove_all(&[id]);
                }
            }
            None => {
                revoked.existing.remove(&id);
                revoked.families.remove(&id);
                self.journaled.remove_all(&[id]);
            }
        }
    }

    /// Rebuilds the whole list from the store (after a break in the change feed).
    pub(crate) fn reload(&self) -> Result<(), StoreError> {
        let fresh = Self::load(
            self.store.clone(),
            self.clock.clone(),
            self.access_window,
            self.changes.clone(),
        )?;
        let loaded = std::mem::take(&mut *fresh.write());
        *self.write() = loaded;
        let families: Vec<FamilyId> = fresh
            .journaled
            .0
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .copied()
            .collect();
        let mut set = self.journaled.0.write().unwrap_or_else(|p| p.into_inner());
        set.clear();
        set.extend(families);
        drop(set);
        self.changes.bump();
        Ok(())
    }

    /// Revokes one access token; durable when this returns.
    pub async fn revoke_token(
        &self,
        jti: TokenId,
        device: DeviceId,
        expires_at_ms: u64,
        index: Option<StatusIndex>,
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
                let slots: Vec<_> = index.map(|i| i.slot(expires_at_ms)).into_iter().collect();
                status_list::mark_in(tx, &slots, now)?;
                audit::append(tx, &origin, &event, now)?;
                Ok(())
            })
            .await
    }

    /// Marks a family revoked inside a caller's transaction (refresh-token reuse is
    /// detected inside the refresh transaction). Call `remember_family` once committed.
    pub(crate) fn revoke_family_in(
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
            status_list::mark_in(tx, &family.status, now_ms)?;
        }
        Ok(())
    }

    /// Mirrors a family revocation committed by `revoke_family_in`.
    pub(crate) fn remember_family(&self, family: FamilyId) {
        let forget_at = self
            .clock
            .now_ms()
            .saturating_add(millis(self.access_window));
        self.write().families.insert(family, forget_at);
        self.changes.bump();
    }

    /// Revokes a whole family (its refresh token and every access token); durable when
    /// this returns. Unknown families are ignored: there is nothing to revoke. The
    /// revocation goes to the journal (see the module docs); a failed write leaves the
    /// family refused in memory until the next start.
    ///
    /// On PostgreSQL the family's row is marked at once instead. A refresh of the family
    /// on another node writes that row too, so of the two serializable transactions one
    /// commits first and the other is retried after it: the refresh is refused, or the
    /// revocation sees (and sets the status-list bit of) the token it issued. A journal
    /// entry conflicts with nothing a refresh writes, and that node learns of it only
    /// through the change feed. (The journal's reason to be, the random page a row
    /// costs in a large redb file, is redb's.)
    pub(crate) async fn revoke_family(
        &self,
        family_id: FamilyId,
        reason: &str,
        origin: &Origin,
    ) -> Result<bool, StoreError> {
        let in_row = self.store.is_postgres();
        self.remember_family(family_id);
        if !in_row {
            self.journaled.insert(family_id);
        }
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
                if in_row {
                    Self::revoke_family_in(tx, &family_id, &mut family, &reason, now)?;
                } else if family.revoked_at_ms.is_none() {
                    let entry = FamilyRevocation {
                        family_id: key.clone(),
                        revoked_at_ms: now,
                        reason: reason.clone(),
                    };
                    tx.put(&FAMILY_REVOCATIONS, &journal_key(now, &family_id), &entry)?;
                    status_list::mark_in(tx, &family.status, now)?;
                }
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
            // No row, so nothing to refuse: a family id is never reused.
            self.write().families.remove(&family_id);
            self.journaled.remove_all(&[family_id]);
        }
        Ok(known)
    }

    /// Folds the journal when it is due: it holds `FOLD_AT` families, or `FOLD_EVERY` has
    /// passed since the last fold and it holds any. `None` when not due (or when another
    /// fold is running).
    pub async fn fold_journal_if_due(&self) -> Result<Option<Folded>, StoreError> {
        let Ok(mut last) = self.last_fold_ms.try_lock() else {
            return Ok(None);
        };
        let pending = self.journaled.len();
        let waited = self.clock.now_ms().saturating_sub(*last);
        if pending < FOLD_AT && (pending == 0 || waited < millis(FOLD_EVERY)) {
            return Ok(None);
        }
        let folded = self.fold_entries().await?;
        *last = self.clock.now_ms();
        Ok(Some(folded))
    }

    /// Marks every journaled family revoked in its row and empties the journal (see
    /// `FOLD_ROUND` and `FOLD_CHUNK`). A crash between the two steps of a round leaves
    /// journal rows whose families are already marked; the next fold removes them.
    pub async fn fold_journal(&self) -> Result<Folded, StoreError> {
        let mut last = self.last_fold_ms.lock().await;
        let folded = self.fold_entries().await?;
        *last = self.clock.now_ms();
        Ok(folded)
    }

    async fn fold_entries(&self) -> Result<Folded, StoreError> {
        let mut folded = Folded::default();
        loop {
            let round = self
                .store
                .read(|tx| tx.first(&FAMILY_REVOCATIONS, FOLD_ROUND))?;
            let last_round = round.len() < FOLD_ROUND;
            let (keys, mut entries): (Vec<String>, Vec<FamilyRevocation>) =
                round.into_iter().unzip();
            // By family, then by time: the earliest revocation is the one a row keeps.
            entries.sort_by(|a, b| {
                (a.family_id.as_str(), a.revoked_at_ms)
                    .cmp(&(b.family_id.as_str(), b.revoked_at_ms))
            });
            for chunk in entries.chunks(FOLD_CHUNK) {
                let chunk = chunk.to_vec();
                let now = self.clock.now_ms();
                let (marked, settled) = self
                    .store
                    .write(move |tx| {
                        let mut marked = 0u64;
                        let mut settled = Vec::with_capacity(chunk.len());
                        for entry in &chunk {
                            if let Some(mut family) = tx.get(&TOKEN_FAMILIES, &entry.family_id)?
                                && family.revoked_at_ms.is_none()
                            {
                                family.revoked_at_ms = Some(entry.revoked_at_ms);
                                family.revoke_reason = Some(entry.reason.clone());
                                tx.put(&TOKEN_FAMILIES, &entry.family_id, &family)?;
                                // Again: a refresh on another node that raced the
                                // revocation may have added a token since.
                                status_list::mark_in(tx, &family.status, now)?;
                                marked += 1;
                            }
                            settled.extend(FamilyId::parse(&entry.family_id));
                        }
                        Ok::<_, StoreError>((marked, settled))
                    })
                    .await?;
                // Each of these rows now says revoked, or is gone: the set need not.
                self.journaled.remove_all(&settled);
                folded.families_marked += marked;
            }
            for chunk in keys.chunks(FOLD_CHUNK) {
                let count = chunk.len() as u64;
                let chunk = chunk.to_vec();
                self.store
                    .write(move |tx| {
                        for key in &chunk {
                            tx.delete(&FAMILY_REVOCATIONS, key)?;
                        }
                        Ok::<_, StoreError>(())
                    })
                    .await?;
                folded.entries += count;
            }
            if last_round {
                return Ok(folded);
            }
        }
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
        let journaled = self.journaled.clone();
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
                // Only this device's families, through the index: the writer's
                // transaction must not read every family of every device.
                let mut families = Vec::new();
                let prefix = device_family_key(&key, "");
                for index_key in tx.index_keys(&DEVICE_FAMILIES, &prefix, None, usize::MAX)? {
                    let id = &index_key[prefix.len()..];
                    let Some(mut family) = tx.get(&TOKEN_FAMILIES, id)? else {
                        continue;
                    };
                    if family.device_id != key || family.revoked_at_ms.is_some() {
                        continue;
                    }
                    if let Some(family_id) = FamilyId::parse(id) {
                        if journaled.contains(&family_id) {
                            continue;
                        }
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
    pub(crate) async fn prune(&self, leeway: Duration) -> Result<u64, StoreError> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn journal_keys_sort_by_time_then_family() {
        let a = FamilyId::from_bytes([0xaa; 16]);
        let b = FamilyId::from_bytes([0x0b; 16]);
        // In time order, and within one millisecond in family order.
        let keys = [
            journal_key(0xfff, &a),
            journal_key(0x1000, &b),
            journal_key(0x1000, &a),
            journal_key(1_795_392_000_000, &a),
            journal_key(u64::MAX, &b),
        ];
        let mut sorted = keys.clone();
        sorted.reverse();
        sorted.sort();
        assert_eq!(
            sorted, keys,
            "fixed-width time first: byte order is time order"
        );
        assert_eq!(
            journal_key(0x1000, &a),
            format!("0000000000001000/fam_{}", "aa".repeat(16))
        );
    }
}
