//! Admin sessions: what a browser holds after signing in to the admin UI.
//!
//! A session is a 256-bit random id in a cookie (`__Host-gatehouse_session`: HttpOnly,
//! Secure, SameSite=Strict, Path=/) plus a CSRF token the page sends back in a header on
//! every change. Sessions live in memory only: a restart signs everyone out, and nothing
//! about them is on disk to steal. Each ends after `admin.session_idle` without use or
//! `admin.session_max` after sign-in, whichever comes first, and at once when its admin
//! token is revoked, its user removed, or its user's password changed. At most
//! `MAX_SESSIONS` exist; the least recently used goes first.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use ring::digest::{SHA256, digest};
use ring::rand::{SecureRandom, SystemRandom};
use serde::Serialize;

use crate::clock::{SharedClock, millis};
use crate::store::Store;

/// Sessions kept at most (about 300 bytes each).
pub(crate) const MAX_SESSIONS: usize = 1024;
pub(crate) const COOKIE: &str = "__Host-gatehouse_session";

/// Who signed in, and how.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "method", rename_all = "snake_case")]
pub(crate) enum SignedIn {
    /// With an admin token, by its id.
    AdminToken { id: String },
    /// With a user name and password.
    Password { user: String },
}

impl SignedIn {
    /// The admin's identity in audit records (`admin:<this>`).
    pub(crate) fn identity(&self) -> String {
        match self {
            Self::AdminToken { id } => id.clone(),
            Self::Password { user } => format!("user:{user}"),
        }
    }
}

#[derive(Debug, Clone)]
struct Session {
    who: SignedIn,
    /// For a password sign-in: SHA-256 of the password hash it matched, so a password
    /// change (a new hash) ends the session.
    password_mark: Option<[u8; 32]>,
    csrf: String,
    created_ms: u64,
    last_ms: u64,
}

/// A live session, as a request sees it.
#[derive(Debug, Clone)]
pub(crate) struct SessionView {
    pub(crate) who: SignedIn,
    pub(crate) csrf: String,
    pub(crate) expires_at_ms: u64,
}

/// A session just made: the cookie value (never stored) and its CSRF token.
#[derive(Debug, Clone)]
pub(crate) struct NewSession {
    pub(crate) cookie: String,
    pub(crate) view: SessionView,
}

#[derive(Debug)]
pub(crate) struct AdminSessions {
    /// Keyed by SHA-256 of the cookie value: the map never holds a usable cookie.
    sessions: Mutex<HashMap<[u8; 32], Session>>,
    clock: SharedClock,
    store: Store,
    idle: Duration,
    max: Duration,
}

fn random_text() -> Option<String> {
    let mut bytes = [0u8; 32];
    SystemRandom::new().fill(&mut bytes).ok()?;
    Some(data_encoding::BASE64URL_NOPAD.encode(&bytes))
}

fn key_of(cookie: &str) -> [u8; 32] {
    let mut key = [0u8; 32];
    key.copy_from_slice(digest(&SHA256, cookie.as_bytes()).as_ref());
    key
}

impl AdminSessions {
    pub(crate) fn new(store: Store, clock: SharedClock, idle: Duration, max: Duration) -> Self {
        Self {
            sessions: Mutex::new(HashMap::new()),
            clock,
            store,
            idle,
            max,
        }
    }

    pub(crate) fn idle(&self) -> Duration {
        self.idle
    }

    pub(crate) fn max(&self) -> Duration {
        self.max
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 32], Session>> {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts a session for `who`; `None` only if the system has no randomness.
    pub(crate) fn start(&self, who: SignedIn) -> Option<NewSession> {
        let cookie = random_text()?;
        let csrf = random_text()?;
        let now = self.clock.now_ms();
        let password_mark = match &who {
            SignedIn::Password { user } => self
                .store
                .read(|tx| tx.admin_user(user))
                .ok()
                .flatten()
                .map(|u| key_of(&u.password_hash)),
            SignedIn::AdminToken { .. } => None,
        };
        let session = Session {
            who,
            password_mark,
            csrf,
            created_ms: now,
            last_ms: now,
        };
        let view = self.view(&session);
        let mut sessions = self.lock();
        if sessions.len() >= MAX_SESSIONS {
            sessions.retain(|_, s| !self.expired(s, now));
        }
        if sessions.len() >= MAX_SESSIONS
            && let Some(oldest) = sessions
                .iter()
                .min_by_key(|(_, s)| s.last_ms)
                .map(|(k, _)| *k)
        {
            sessions.remove(&oldest);
        }
        sessions.insert(key_of(&cookie), session);
        Some(NewSession { cookie, view })
    }

    fn expired(&self, s: &Session, now: u64) -> bool {
        now >= s.last_ms.saturating_add(millis(self.idle))
            || now >= s.created_ms.saturating_add(millis(self.max))
    }

    fn view(&self, s: &Session) -> SessionView {
        SessionView {
            who: s.who.clone(),
            csrf: s.csrf.clone(),
            expires_at_ms: s
                .last_ms
                .saturating_add(millis(self.idle))
                .min(s.created_ms.saturating_add(millis(self.max))),
        }
    }

    /// The live session for `cookie`, its idle timer restarted; `None` if unknown,
    /// expired, or its credential is gone.
    pub(crate) fn check(&self, cookie: &str) -> Option<SessionView> {
        let key = key_of(cookie);
        let now = self.clock.now_ms();
        let session = self.lock().get(&key).cloned()?;
        if self.expired(&session, now) || !self.still_allowed(&session) {
            self.lock().remove(&key);
            return None;
        }
        let mut sessions = self.lock();
        let live = sessions.get_mut(&key)?;
        live.last_ms = now;
        Some(self.view(live))
    }

    /// Whether the credential the session was opened with is still good.
    fn still_allowed(&self, session: &Session) -> bool {
        match &session.who {
            SignedIn::AdminToken { id } => self
                .store
                .read(|tx| tx.admin_token(id))
                .ok()
                .flatten()
                .is_some_and(|t| t.revoked_at_ms.is_none()),
            SignedIn::Password { user } => self
                .store
                .read(|tx| tx.admin_user(user))
                .ok()
                .flatten()
                .is_some_and(|u| session.password_mark == Some(key_of(&u.password_hash))),
        }
    }

    /// Ends the session for `cookie`; true if there was one.
    pub(crate) fn end(&self, cookie: &str) -> bool {
        self.lock().remove(&key_of(cookie)).is_some()
    }
}

/// Whether two secrets are equal, in time that does not depend on where they differ.
pub(crate) fn same_secret(a: &str, b: &str) -> bool {
    use subtle::ConstantTimeEq;
    a.len() == b.len() && bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}

/// `Set-Cookie` for a new session: the browser keeps it at most `max`.
pub(crate) fn set_cookie(cookie: &str, max: Duration) -> String {
    format!(
        "{COOKIE}={cookie}; Path=/; Secure; HttpOnly; SameSite=Strict; Max-Age={}",
        max.as_secs()
    )
}

/// `Set-Cookie` that makes the browser drop the session cookie.
pub(crate) fn clear_cookie() -> String {
    format!("{COOKIE}=; Path=/; Secure; HttpOnly; SameSite=Strict; Max-Age=0")
}

/// The session cookie's value in a `Cookie` header, if present.
pub(crate) fn cookie_value(header: &str) -> Option<&str> {
    header
        .split(';')
        .map(str::trim)
        .find_map(|pair| pair.strip_prefix(COOKIE)?.strip_prefix('='))
        .filter(|v| !v.is_empty() && v.len() <= 64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cookie_is_found_among_others_and_bounded() {
        assert_eq!(
            cookie_value("a=1; __Host-gatehouse_session=abc; b=2"),
            Some("abc")
        );
        assert_eq!(cookie_value("__Host-gatehouse_session="), None);
        assert_eq!(cookie_value("x__Host-gatehouse_session=abc"), None);
        let long = format!("{COOKIE}={}", "a".repeat(65));
        assert_eq!(cookie_value(&long), None);
    }

    #[test]
    fn cookies_carry_every_protection() {
        let c = set_cookie("v", Duration::from_secs(60));
        for part in [
            "__Host-",
            "Path=/",
            "Secure",
            "HttpOnly",
            "SameSite=Strict",
            "Max-Age=60",
        ] {
            assert!(c.contains(part), "{c}");
        }
        assert!(!c.contains("Domain"));
        assert!(clear_cookie().contains("Max-Age=0"));
    }

    #[test]
    fn secrets_compare_whole() {
        assert!(same_secret("abc", "abc"));
        assert!(!same_secret("abc", "abd"));
        assert!(!same_secret("abc", "ab"));
    }
}
