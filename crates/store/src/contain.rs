//! redb checks its own invariants with assertions: a damaged file (cut short while it
//! was open, a valid header over random pages) can make it panic while opening or
//! reading. Every redb call that reads a file gatehouse did not just write runs inside
//! `contain`, which turns such a panic into `StoreError::Corrupt` for that path.
//!
//! The default panic hook would still print redb's assertion and a backtrace to stderr,
//! which reads as a crash of gatehouse; while `contain` runs on a thread, the hook
//! installed here stays silent for that thread (the message goes into the error instead)
//! and defers to the previous hook everywhere else.

use std::any::Any;
use std::cell::Cell;
use std::panic::{self, AssertUnwindSafe};
use std::path::Path;
use std::sync::Once;

use crate::StoreError;

thread_local! {
    static CONTAINED: Cell<bool> = const { Cell::new(false) };
}

static HOOK: Once = Once::new();

fn install_hook() {
    HOOK.call_once(|| {
        let previous = panic::take_hook();
        panic::set_hook(Box::new(move |info| {
            if !CONTAINED.with(Cell::get) {
                previous(info);
            }
        }));
    });
}

/// Runs `work` on this thread; a panic inside it becomes `StoreError::Corrupt` for
/// `path`. `work` must own or only read what it touches: after a panic, whatever it was
/// building is dropped, so callers clean up their own files after an error as usual.
pub(crate) fn contain<T>(
    path: &Path,
    work: impl FnOnce() -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    install_hook();
    let outer = CONTAINED.with(|c| c.replace(true));
    let outcome = panic::catch_unwind(AssertUnwindSafe(work));
    CONTAINED.with(|c| c.set(outer));
    outcome.unwrap_or_else(|payload| {
        Err(StoreError::Corrupt {
            path: path.to_path_buf(),
            reason: format!("the storage engine stopped on it: {}", message(&payload)),
        })
    })
}

fn message(payload: &Box<dyn Any + Send>) -> String {
    if let Some(text) = payload.downcast_ref::<&str>() {
        (*text).to_string()
    } else if let Some(text) = payload.downcast_ref::<String>() {
        text.clone()
    } else {
        "an internal check failed".into()
    }
}
