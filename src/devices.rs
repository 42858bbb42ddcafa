//! Device records: what pairing created, as operators see and manage them.
//!
//! A device is created by `pairing` in the same transaction as its first tokens, and
//! revoked through the revocation list, which also revokes every token family the device
//! holds, durably, before `Devices::revoke` returns. This module must not know HTTP.

use std::sync::Arc;

use serde::Serialize;

use crate::clock::format_rfc3339;
use crate::ids::DeviceId;
use crate::revocation::RevocationList;
use crate::store::records::Device;
use crate::store::{DEVICES, Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("no device with id {0}")]
    NotFound(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A device as the API and the CLI show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct DeviceView {
    pub id: DeviceId,
    pub name: String,
    pub platform: String,
    pub app_version: String,
    /// `"active"` or `"revoked"`.
    pub status: String,
    pub created_at: String,
    pub last_seen: String,
    pub paired_from: String,
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

#[derive(Debug, Clone)]
pub struct Devices {
    store: Store,
    revocations: Arc<RevocationList>,
}

impl Devices {
    pub fn new(store: Store, revocations: Arc<RevocationList>) -> Self {
        Self { store, revocations }
    }

    pub fn get(&self, id: &DeviceId) -> Result<Option<DeviceView>, DeviceError> {
        let record = self.store.read(|tx| tx.get(&DEVICES, &id.to_string()))?;
        Ok(record.map(|d| DeviceView::new(*id, d)))
    }

    /// Every device, oldest first.
    pub fn list(&self) -> Result<Vec<DeviceView>, DeviceError> {
        let rows = self.store.read(|tx| tx.all(&DEVICES))?;
        let mut out: Vec<DeviceView> = rows
            .into_iter()
            .filter_map(|(id, d)| DeviceId::parse(&id).map(|id| DeviceView::new(id, d)))
            .collect();
        out.sort_by(|a, b| a.created_at.cmp(&b.created_at).then(a.id.cmp(&b.id)));
        Ok(out)
    }

    /// Revokes a device and all its tokens; durable when this returns. Revoking a
    /// revoked device again is not an error (the answer is the same record).
    pub async fn revoke(&self, id: &DeviceId) -> Result<DeviceView, DeviceError> {
        if !self.revocations.revoke_device(*id).await? {
            return Err(DeviceError::NotFound(id.to_string()));
        }
        self.get(id)?
            .ok_or_else(|| DeviceError::NotFound(id.to_string()))
    }
}
