//! What systemd is told, under `Type=notify`: `READY=1` once the server accepts
//! connections (not when the process starts), watchdog pings while it is healthy,
//! `RELOADING=1` around a certificate reload and `STOPPING=1` when it drains.
//!
//! Outside systemd (`NOTIFY_SOCKET` unset) every call does nothing. The protocol itself
//! is the `sd-notify` crate's.

use std::time::Duration;

use sd_notify::NotifyState;

use crate::store::Store;

fn send(states: &[NotifyState<'_>]) {
    if let Err(err) = sd_notify::notify(false, states) {
        tracing::warn!(error = %err, "cannot notify systemd");
    }
}

/// The server accepts connections; `status` is shown by `systemctl status`.
pub(crate) fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// A reload (of certificate files) begins; `reloaded` ends it.
pub(crate) fn reloading() {
    send(&[NotifyState::Reloading]);
}

pub(crate) fn reloaded() {
    send(&[NotifyState::Ready]);
}

/// The server drains and stops.
pub(crate) fn stopping() {
    send(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
}

/// With `WatchdogSec=` set, pings systemd at half the interval for as long as the data
/// file's writer is healthy. A wedged runtime or a failed writer stops the pings, and
/// systemd restarts the service. Returns `None` without a watchdog.
pub(crate) fn watchdog(store: Store) -> Option<tokio::task::JoinHandle<()>> {
    let mut usec = 0;
    if !sd_notify::watchdog_enabled(false, &mut usec) || usec == 0 {
        return None;
    }
    let every = Duration::from_micros(usec / 2);
    tracing::info!(every = ?every, "systemd watchdog enabled");
    Some(tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            if store.is_healthy() {
                send(&[NotifyState::Watchdog]);
            } else {
                tracing::error!("the data file cannot be written: no more watchdog pings");
            }
        }
    }))
}
