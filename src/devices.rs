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
use crate::ids::DeviceId;
use crate::revocation::RevocationList;
use crate::store::records::Device;
use crate::store::{DEVICES, DEVICES_BY_AGE, Store, StoreError, device_age_key};

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
            Self::Store(_) => ErrorKind::Internal,
        }
    }
}

/// A device as the API and the CLI show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct DeviceView {
    pub id: DeviceId,
    pub name: String,
    pub platform: String,
    pub(crate) app_version: String,
    /// `"active"` or `"revoked"`.
    pub status: String,
    pub(crate) created_at: String,
    pub(crate) last_seen: String,
    pub(crate) paired_from: String,
    pub revoked_at: Option<String>,
}

impl DeviceView {
    fn new(id: DeviceId, d: Device) -> Self {
        Self {
            id,
            status: if d.revoked_at_ms.is_some() {
                "revoked"
            } else {
                "active"
            }
            .into(),
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
        let record = self.store.read(|tx| tx.get(&DEVICES, &id.to_string()))?;
        Ok(record.map(|d| self.with_unwritten(DeviceView::new(*id, d.clone()), &d)))
    }

    /// Every device, oldest first (one read).
    pub fn list(&self) -> Result<Vec<DeviceView>, DeviceError> {
        Ok(self
            .oldest_first()?
            .iter()
            .map(|(id, d)| self.with_unwritten(DeviceView::new(*id, d.clone()), d))
            .collect())
    }

    /// Every device record, by pairing time then id: the listing order.
    fn oldest_first(&self) -> Result<Vec<(DeviceId, Device)>, DeviceError> {
        let rows = self.store.read(|tx| tx.all(&DEVICES))?;
        let mut rows: Vec<(DeviceId, Device)> = rows
            .into_iter()
            .filter_map(|(id, d)| DeviceId::parse(&id).map(|id| (id, d)))
            .collect();
        rows.sort_by(|(a_id, a), (b_id, b)| {
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
        let revoked = match filter.status.as_deref() {
            None => None,
            Some("active") => Some(false),
            Some("revoked") => Some(true),
            Some(other) => {
                return Err(DeviceError::BadFilter(format!(
                    "status must be \"active\" or \"revoked\", not {other:?}"
                )));
            }
        };
        let needle = filter.name.as_ref().map(|n| n.to_lowercase());
        let matches = |d: &Device| {
            revoked.is_none_or(|r| d.revoked_at_ms.is_some() == r)
                && needle
                    .as_ref()
                    .is_none_or(|n| d.name.to_lowercase().contains(n.as_str()))
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
                    if let Some(device) = tx.get(&DEVICES, &id.to_string())?
                        && matches(&device)
                    {
                        rows.push((id, device));
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
            .iter()
            .map(|(id, d)| self.with_unwritten(DeviceView::new(*id, d.clone()), d))
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
