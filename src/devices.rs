//! Device records: what pairing created, as operators see and manage them.
//!
//! A device is created by `pairing` in the same transaction as its first tokens, and
//! revoked through the revocation list, which also revokes every token family the device
//! holds, durably, before `Devices::revoke` returns. `last_seen` is kept in memory as
//! devices are seen (`Devices::seen`) and written in one batch by `flush_last_seen`
//! (every few seconds, and at stop), so a busy device costs no write per request. This
//! module must not know HTTP.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use serde::Serialize;

use crate::audit::{self, Event, Origin};
use crate::clock::{SharedClock, format_rfc3339};
use crate::error_kind::{Classify, ErrorKind};
use crate::ids::{DeviceId, FamilyId};
use crate::revocation::{JournaledFamilies, RevocationList};
use crate::store::records::{Device, TokenFamily};
use crate::store::{
    DEVICE_FAMILIES, DEVICES, DEVICES_BY_AGE, ReadTx, Store, StoreError, TOKEN_FAMILIES,
    device_age_key,
};

/// Longest page of `list`.
pub(crate) const MAX_PAGE: usize = 200;
/// Page size when none is asked for.
pub(crate) const DEFAULT_PAGE: usize = 50;
/// Index keys read at a time while a filtered page is gathered.
const INDEX_CHUNK: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("no device with id {0}")]
    NotFound(String),
    #[error("bad device name: {0}")]
    BadName(String),
    #[error("bad filter: {0}")]
    BadFilter(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl Classify for DeviceError {
    fn kind(&self) -> ErrorKind {
        match self {
            Self::NotFound(_) => ErrorKind::NotFound,
            Self::BadName(_) | Self::BadFilter(_) => ErrorKind::Invalid,
            Self::Store(err) => err.kind(),
        }
    }
}

/// Whether a device can still get tokens and, when it cannot, why.
///
/// A device that is not revoked may still hold no usable token family: its refresh token
/// was presented twice (reuse detection revoked the family), the app revoked it
/// (`POST /v1/revoke`), it expired, or its family was pruned. Such a device can never
/// refresh again; only pairing it again brings it back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Standing {
    Active,
    NeedsPairing(Stranded),
    Revoked,
}

/// Why a device that is not revoked holds no usable token family (from its newest one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stranded {
    /// A spent refresh token was presented again: the whole family was revoked.
    RefreshTokenReused,
    /// The app revoked its own refresh token (RFC 7009), or an operator its family.
    SignedOut,
    /// The refresh token outlived `tokens.refresh_ttl` without being used.
    RefreshExpired,
    /// No family is left (pruned long after it ended, or lost in a restore).
    NoTokens,
}

impl Standing {
    /// The `status` field: `active`, `needs_pairing` or `revoked`.
    pub(crate) fn status(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::NeedsPairing(_) => "needs_pairing",
            Self::Revoked => "revoked",
        }
    }

    /// The `status_reason` field, for `needs_pairing` only.
    pub(crate) fn reason(self) -> Option<&'static str> {
        match self {
            Self::Active | Self::Revoked => None,
            Self::NeedsPairing(Stranded::RefreshTokenReused) => Some("refresh_token_reused"),
            Self::NeedsPairing(Stranded::SignedOut) => Some("signed_out"),
            Self::NeedsPairing(Stranded::RefreshExpired) => Some("refresh_expired"),
            Self::NeedsPairing(Stranded::NoTokens) => Some("no_tokens"),
        }
    }

    fn parse_status(text: &str) -> Option<fn(Self) -> bool> {
        match text {
            "active" => Some(|s| s == Self::Active),
            "needs_pairing" => Some(|s| matches!(s, Self::NeedsPairing(_))),
            "revoked" => Some(|s| s == Self::Revoked),
            _ => None,
        }
    }
}

/// The standing of one device, read from its families inside `tx`.
fn standing(
    tx: &ReadTx<'_>,
    id: &str,
    device: &Device,
    now_ms: u64,
    journaled: &JournaledFamilies,
) -> Result<Standing, StoreError> {
    if device.revoked_at_ms.is_some() {
        return Ok(Standing::Revoked);
    }
    // A device has one family per pairing: this range is a handful of keys.
    let keys = tx.index_keys(&DEVICE_FAMILIES, &format!("{id}/"), None, usize::MAX)?;
    let mut newest: Option<(TokenFamily, bool)> = None;
    for key in keys {
        let Some((_, family_id)) = key.split_once('/') else {
            continue;
        };
        let Some(family) = tx.get(&TOKEN_FAMILIES, family_id)? else {
            continue;
        };
        let journal = FamilyId::parse(family_id).is_some_and(|f| journaled.contains(&f));
        if family.revoked_at_ms.is_none() && !journal && family.refresh_expires_at_ms > now_ms {
            return Ok(Standing::Active);
        }
        if newest
            .as_ref()
            .is_none_or(|(n, _)| family.created_at_ms >= n.created_at_ms)
        {
            newest = Some((family, journal));
        }
    }
    let why = match newest {
        None => Stranded::NoTokens,
        Some((family, _)) if family.revoke_reason.as_deref() == Some("reuse") => {
            Stranded::RefreshTokenReused
        }
        Some((family, journal)) if journal || family.revoked_at_ms.is_some() => Stranded::SignedOut,
        Some(_) => Stranded::RefreshExpired,
    };
    Ok(Standing::NeedsPairing(why))
}

/// A device as the API and the CLI show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct DeviceView {
    pub id: DeviceId,
    pub name: String,
    pub platform: String,
    pub(crate) app_version: String,
    /// `"active"`, `"needs_pairing"` or `"revoked"` (see `Standing`).
    pub status: String,
    /// Why a `needs_pairing` device cannot refresh; `null` otherwise.
    pub status_reason: Option<String>,
    pub(crate) created_at: String,
    pub(crate) last_seen: String,
    pub(crate) paired_from: String,
    pub revoked_at: Option<String>,
}

impl DeviceView {
    fn new(id: DeviceId, d: Device, standing: Standing) -> Self {
        Self {
            id,
            status: standing.status().into(),
            status_reason: standing.reason().map(Into::into),
            name: d.name,
            platform: d.platform,
            app_version: d.app_version,
            created_at: format_rfc3339(d.created_at_ms),
            last_seen: format_rfc3339(d.last_seen_ms),
            paired_from: d.paired_from,
            revoked_at: d.revoked_at_ms.map(format_rfc3339),
        }
    }
}

/// Which devices `list` returns, and from where.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceFilter {
    /// `"active"` or `"revoked"`.
    pub status: Option<String>,
    /// Devices whose name contains this text (case-insensitive).
    pub name: Option<String>,
    /// Devices after this one in the listing order (the `next` of the previous page).
    pub after: Option<DeviceId>,
    pub limit: Option<usize>,
}

/// One page of devices; `next` is the cursor for the following page, if any.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct DevicePage {
    pub devices: Vec<DeviceView>,
    pub(crate) next: Option<DeviceId>,
}

#[derive(Debug, Clone)]
pub struct Devices {
    store: Store,
    clock: SharedClock,
    revocations: Arc<RevocationList>,
    /// Device → when it was last seen, not yet written.
    unwritten_seen: Arc<Mutex<HashMap<DeviceId, u64>>>,
}

impl Devices {
    pub fn new(store: Store, clock: SharedClock, revocations: Arc<RevocationList>) -> Self {
        Self {
            store,
            clock,
            revocations,
            unwritten_seen: Arc::default(),
        }
    }

    /// Notes that a device was just seen (a verified token, a message on its socket).
    pub(crate) fn seen(&self, id: DeviceId) {
        let now = self.clock.now_ms();
        self.unwritten_seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, now);
    }

    /// Writes every pending `last_seen` in one transaction; returns how many devices.
    pub async fn flush_last_seen(&self) -> Result<usize, DeviceError> {
        let pending: Vec<(DeviceId, u64)> = {
            let mut map = self
                .unwritten_seen
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            map.drain().collect()
        };
        if pending.is_empty() {
            return Ok(0);
        }
        let count = pending.len();
        self.store
            .write(move |tx| -> Result<(), StoreError> {
                for (id, at) in &pending {
                    let key = id.to_string();
                    if let Some(mut device) = tx.get(&DEVICES, &key)?
                        && device.last_seen_ms < *at
                    {
                        device.last_seen_ms = *at;
                        tx.put(&DEVICES, &key, &device)?;
                    }
                }
                Ok(())
            })
            .await?;
        Ok(count)
    }

    /// The last-seen time including what is not written yet.
    fn with_unwritten(&self, mut view: DeviceView, record: &Device) -> DeviceView {
        let pending = self
            .unwritten_seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&view.id)
            .copied();
        if let Some(at) = pending.filter(|at| *at > record.last_seen_ms) {
            view.last_seen = format_rfc3339(at);
        }
        view
    }

    pub(crate) fn get(&self, id: &DeviceId) -> Result<Option<DeviceView>, DeviceError> {
        let now = self.clock.now_ms();
        let journaled = self.revocations.journaled();
        let key = id.to_string();
        let found = self.store.read(|tx| {
            let Some(device) = tx.get(&DEVICES, &key)? else {
                return Ok(None);
            };
            let standing = standing(tx, &key, &device, now, &journaled)?;
            Ok::<_, StoreError>(Some((device, standing)))
        })?;
        Ok(found.map(|(d, standing)| {
            self.with_unwritten(DeviceView::new(*id, d.clone(), standing), &d)
        }))
    }

    /// Every device, oldest first (one read).
    pub fn list(&self) -> Result<Vec<DeviceView>, DeviceError> {
        Ok(self
            .oldest_first()?
            .into_iter()
            .map(|(id, d, standing)| {
                self.with_unwritten(DeviceView::new(id, d.clone(), standing), &d)
            })
            .collect())
    }

    /// Every device record with its standing, by pairing time then id: the listing order.
    fn oldest_first(&self) -> Result<Vec<(DeviceId, Device, Standing)>, DeviceError> {
        let now = self.clock.now_ms();
        let journaled = self.revocations.journaled();
        let mut rows = self.store.read(|tx| {
            let mut rows = Vec::new();
            for (key, device) in tx.all(&DEVICES)? {
                if let Some(id) = DeviceId::parse(&key) {
                    let standing = standing(tx, &key, &device, now, &journaled)?;
                    rows.push((id, device, standing));
                }
            }
            Ok::<_, StoreError>(rows)
        })?;
        rows.sort_by(|(a_id, a, _), (b_id, b, _)| {
            a.created_at_ms.cmp(&b.created_at_ms).then(a_id.cmp(b_id))
        });
        Ok(rows)
    }

    /// One page of devices, oldest first, filtered.
    pub fn page(&self, filter: &DeviceFilter) -> Result<DevicePage, DeviceError> {
        let limit = filter.limit.unwrap_or(DEFAULT_PAGE);
        if limit == 0 || limit > MAX_PAGE {
            return Err(DeviceError::BadFilter(format!(
                "limit must be between 1 and {MAX_PAGE}"
            )));
        }
        let wanted = match filter.status.as_deref() {
            None => None,
            Some(text) => Some(Standing::parse_status(text).ok_or_else(|| {
                DeviceError::BadFilter(format!(
                    "status must be \"active\", \"needs_pairing\" or \"revoked\", not {text:?}"
                ))
            })?),
        };
        let needle = filter.name.as_ref().map(|n| n.to_lowercase());
        let now = self.clock.now_ms();
        let journaled = self.revocations.journaled();
        let matches =
            |tx: &ReadTx<'_>, id: &str, d: &Device| -> Result<Option<Standing>, StoreError> {
                if !needle
                    .as_ref()
                    .is_none_or(|n| d.name.to_lowercase().contains(n.as_str()))
                {
                    return Ok(None);
                }
                let standing = standing(tx, id, d, now, &journaled)?;
                Ok(wanted
                    .is_none_or(|wanted| wanted(standing))
                    .then_some(standing))
            };
        let after = filter.after.map(|id| id.to_string());
        // One read, walking the pairing-time index from the cursor until one more match
        // than the page holds (which says whether there is a next page).
        let rows = self.store.read(|tx| {
            let mut cursor = match &after {
                Some(id) => match tx.get(&DEVICES, id)? {
                    Some(device) => Some(device_age_key(device.created_at_ms, id)),
                    None => return Ok(None),
                },
                None => None,
            };
            let mut rows = Vec::new();
            loop {
                let keys = tx.index_keys(&DEVICES_BY_AGE, "", cursor.as_deref(), INDEX_CHUNK)?;
                for key in &keys {
                    let Some(id) = key.split_once('/').and_then(|(_, id)| DeviceId::parse(id))
                    else {
                        continue;
                    };
                    let key = id.to_string();
                    if let Some(device) = tx.get(&DEVICES, &key)?
                        && let Some(standing) = matches(tx, &key, &device)?
                    {
                        rows.push((id, device, standing));
                        if rows.len() > limit {
                            return Ok(Some(rows));
                        }
                    }
                }
                match keys.last() {
                    Some(last) if keys.len() == INDEX_CHUNK => cursor = Some(last.clone()),
                    _ => return Ok(Some(rows)),
                }
            }
        })?;
        let Some(mut rows) = rows else {
            return Err(DeviceError::BadFilter(
                "the `after` cursor names no device".into(),
            ));
        };
        let more = rows.len() > limit;
        rows.truncate(limit);
        let devices: Vec<DeviceView> = rows
            .into_iter()
            .map(|(id, d, standing)| {
                self.with_unwritten(DeviceView::new(id, d.clone(), standing), &d)
            })
            .collect();
        let next = if more {
            devices.last().map(|d| d.id)
        } else {
            None
        };
        Ok(DevicePage { devices, next })
    }

    /// Renames a device; durable when this returns.
    pub async fn rename(
        &self,
        id: &DeviceId,
        name: &str,
        origin: &Origin,
    ) -> Result<DeviceView, DeviceError> {
        let name = crate::pairing::device_name(name).ok_or_else(|| {
            DeviceError::BadName(format!(
                "1 to {} characters without control or bidirectional control characters",
                crate::pairing::MAX_DEVICE_NAME
            ))
        })?;
        let key = id.to_string();
        let origin = origin.clone();
        let now = self.clock.now_ms();
        let found = self
            .store
            .write(move |tx| -> Result<bool, StoreError> {
                let Some(mut device) = tx.get(&DEVICES, &key)? else {
                    return Ok(false);
                };
                let event = Event::new("device.renamed")
                    .device(&key)
                    .detail("from", device.name.clone())
                    .detail("to", name.clone());
                device.name.clone_from(&name);
                tx.put(&DEVICES, &key, &device)?;
                audit::append(tx, &origin, &event, now)?;
                Ok(true)
            })
            .await?;
        if !found {
            return Err(DeviceError::NotFound(id.to_string()));
        }
        self.get(id)?
            .ok_or_else(|| DeviceError::NotFound(id.to_string()))
    }

    /// Revokes a device and all its tokens; durable when this returns. Revoking a
    /// revoked device again is not an error (the answer is the same record).
    pub async fn revoke(&self, id: &DeviceId, origin: &Origin) -> Result<DeviceView, DeviceError> {
        if !self.revocations.revoke_device(*id, origin).await? {
            return Err(DeviceError::NotFound(id.to_string()));
        }
        self.get(id)?
            .ok_or_else(|| DeviceError::NotFound(id.to_string()))
    }
}
