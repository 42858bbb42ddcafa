//! Keeping this node's mirrors in step with the other nodes on a shared database.
//!
//! The store's change feed (`Store::follow`, PostgreSQL only) says which rows of the
//! mirrored tables another node wrote; each goes to the service that mirrors its table:
//! revocations, devices and token families to the revocation list, signing keys to the
//! key ring, bans to the lockout, admin tokens and API clients to their registries. After a break in the feed everything is reloaded. A
//! data file has no other writer, so this does nothing there.

use std::sync::Arc;

use tokio::sync::mpsc;

use crate::admin_tokens::AdminTokens;
use crate::clients::Clients;
use crate::keys::KeyRing;
use crate::ratelimit::Lockout;
use crate::revocation::RevocationList;
use crate::store::{Change, Followed, StoreError};

/// The mirrors another node's changes update.
#[derive(Debug, Clone)]
pub(crate) struct Mirrors {
    pub(crate) revocations: Arc<RevocationList>,
    pub(crate) keys: Arc<KeyRing>,
    pub(crate) lockout: Arc<Lockout>,
    pub(crate) admin_tokens: AdminTokens,
    pub(crate) clients: Clients,
}

/// Applies the feed until it ends or `stopped` resolves. A change that cannot be
/// applied (the database went away between the notice and the read) makes the next
/// round a full reload, so no change is ever skipped.
pub(crate) async fn follow_changes(
    mirrors: Mirrors,
    mut feed: mpsc::Receiver<Followed>,
    stopped: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(stopped);
    let mut owed_reload = false;
    loop {
        let next = tokio::select! {
            biased;
            () = &mut stopped => return,
            next = feed.recv() => next,
        };
        let Some(followed) = next else { return };
        let work = mirrors.clone();
        let reload = owed_reload || followed == Followed::Resync;
        let applied = tokio::task::spawn_blocking(move || match followed {
            _ if reload => reload_all(&work),
            Followed::Changes(changes) => apply_all(&work, &changes),
            Followed::Resync => reload_all(&work),
        })
        .await;
        owed_reload = match applied {
            Ok(Ok(())) => false,
            Ok(Err(err)) => {
                tracing::warn!(error = %err, "could not apply another node's changes; reloading at the next one");
                true
            }
            Err(err) => {
                tracing::error!(error = %err, "applying another node's changes panicked");
                true
            }
        };
    }
}

fn apply_all(mirrors: &Mirrors, changes: &[Change]) -> Result<(), String> {
    let mut keys_changed = false;
    for change in changes {
        match change.table.as_str() {
            "revoked_tokens.v1" | "token_families.v1" | "family_revocations.v1" | "devices.v1" => {
                mirrors
                    .revocations
                    .apply_change(&change.table, &change.key, change.value.as_deref())
                    .map_err(|err| err.to_string())?;
            }
            "signing_keys.v1" => keys_changed = true,
            "bans.v1" => mirrors
                .lockout
                .apply_change(&change.key, change.value.as_deref())
                .map_err(|err| err.to_string())?,
            "admin_tokens.v1" => mirrors
                .admin_tokens
                .apply_change(&change.key, change.value.as_deref())
                .map_err(|err| err.to_string())?,
            "clients.v1" => mirrors
                .clients
                .apply_change(&change.key, change.value.as_deref())
                .map_err(|err| err.to_string())?,
            _ => {}
        }
    }
    if keys_changed {
        mirrors.keys.reload().map_err(|err| err.to_string())?;
    }
    Ok(())
}

fn reload_all(mirrors: &Mirrors) -> Result<(), String> {
    let store_err = |err: StoreError| err.to_string();
    mirrors.revocations.reload().map_err(store_err)?;
    mirrors.lockout.reload().map_err(store_err)?;
    mirrors.admin_tokens.reload().map_err(store_err)?;
    mirrors.clients.reload().map_err(store_err)?;
    mirrors.keys.reload().map_err(|err| err.to_string())?;
    tracing::info!(
        "reloaded the revocation list, bans, keys, admin tokens and clients after a break in the change feed"
    );
    Ok(())
}
