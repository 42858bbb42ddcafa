//! Admin users: a name and a password, for people who sign in to the admin UI.
//!
//! Passwords are hashed with argon2id (19 MiB, 2 passes, 1 lane: OWASP's recommended
//! minimum) and the hash is kept sealed under the master key in `secrets.v1`
//! (`admin-user/<name>`), so a stolen data file does not even give an attacker hashes
//! to guess at. Checking a password for an unknown name does the same work as for a
//! known one, so timing does not tell which names exist. Failed checks feed the
//! `admin_login` rate limit and lockout like any other secret check (in `http`).

use std::sync::OnceLock;

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};

use crate::audit::{self, Event, Origin, Severity};
use crate::clock::{SharedClock, format_rfc3339};
use crate::error_kind::{Classify, ErrorKind};
use crate::store::records::AdminUser;
use crate::store::{Store, StoreError};

/// Shortest password accepted: long enough that online guessing under the lockout is
/// hopeless, short enough for a passphrase of three words.
pub(crate) const MIN_PASSWORD_CHARS: usize = 12;
/// Longest password accepted, in characters (argon2 takes any length; this bounds the
/// work per try, and what the API document can state: at most 1024 bytes of UTF-8).
pub(crate) const MAX_PASSWORD_CHARS: usize = 256;
/// The most bytes a presented password is hashed for at sign-in.
const MAX_PASSWORD_BYTES: usize = 4 * MAX_PASSWORD_CHARS;
/// Password hashes computed at once. Each takes 19 MiB for about 30 ms: a burst of
/// sign-ins waits its turn instead of taking memory without bound.
const CONCURRENT_HASHES: usize = 4;

#[derive(Debug, thiserror::Error)]
pub enum AdminUserError {
    #[error("a user name is 1 to 64 characters: lower-case letters, digits, '.', '_', '-' or '@'")]
    BadName,
    #[error(
        "a password is at least {MIN_PASSWORD_CHARS} characters and at most \
         {MAX_PASSWORD_CHARS} characters, without control characters"
    )]
    BadPassword,
    #[error("there is already an admin user named {0}")]
    Exists(String),
    #[error("no admin user is named {0}")]
    NotFound(String),
    #[error("the user name or password is wrong")]
    Refused,
    #[error("cannot hash the password: {0}")]
    Hash(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl Classify for AdminUserError {
    fn kind(&self) -> ErrorKind {
        match self {
            Self::BadName | Self::BadPassword => ErrorKind::Invalid,
            Self::Exists(_) => ErrorKind::Conflict,
            Self::NotFound(_) => ErrorKind::NotFound,
            Self::Refused => ErrorKind::Unauthenticated,
            Self::Hash(_) => ErrorKind::Internal,
            Self::Store(err) => err.kind(),
        }
    }
}

/// What may be shown about a user (never the hash).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdminUserInfo {
    pub(crate) name: String,
    pub(crate) created_at: String,
    pub(crate) password_changed_at: String,
}

impl From<&AdminUser> for AdminUserInfo {
    fn from(user: &AdminUser) -> Self {
        Self {
            name: user.name.clone(),
            created_at: format_rfc3339(user.created_at_ms),
            password_changed_at: format_rfc3339(user.password_changed_at_ms),
        }
    }
}

pub(crate) fn validate_name(name: &str) -> Result<String, AdminUserError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-' | b'@')
        });
    ok.then(|| name.to_string()).ok_or(AdminUserError::BadName)
}

fn validate_password(password: &str) -> Result<(), AdminUserError> {
    let chars = password.chars().count();
    let ok = (MIN_PASSWORD_CHARS..=MAX_PASSWORD_CHARS).contains(&chars)
        && !password.chars().any(char::is_control);
    ok.then_some(()).ok_or(AdminUserError::BadPassword)
}

fn hasher() -> argon2::Argon2<'static> {
    // argon2id v19 with the crate's defaults: m = 19456 KiB, t = 2, p = 1.
    argon2::Argon2::default()
}

/// An argon2id hash of `password` in PHC form, with a fresh 16-byte salt.
pub(crate) fn hash_password(password: &str) -> Result<String, AdminUserError> {
    let mut salt = [0u8; 16];
    SystemRandom::new()
        .fill(&mut salt)
        .map_err(|_| AdminUserError::Hash("no randomness".into()))?;
    let salt = SaltString::encode_b64(&salt).map_err(|e| AdminUserError::Hash(e.to_string()))?;
    hasher()
        .hash_password(password.as_bytes(), &salt)
        .map(|hash| hash.to_string())
        .map_err(|e| AdminUserError::Hash(e.to_string()))
}

/// Whether `password` matches the PHC `hash` (false for a malformed hash).
pub(crate) fn password_matches(hash: &str, password: &str) -> bool {
    PasswordHash::new(hash).is_ok_and(|parsed| {
        hasher()
            .verify_password(password.as_bytes(), &parsed)
            .is_ok()
    })
}

/// A hash to check against when the name is unknown, so both paths cost the same.
fn dummy_hash() -> &'static str {
    static DUMMY: OnceLock<String> = OnceLock::new();
    DUMMY.get_or_init(|| hash_password("not a password of anyone").unwrap_or_default())
}

/// Runs argon2 computations on blocking threads, a bounded number at once; the others
/// wait their turn (asynchronously, holding no thread).
#[derive(Debug, Clone)]
struct HashLimiter(std::sync::Arc<tokio::sync::Semaphore>);

impl HashLimiter {
    fn new(at_once: usize) -> Self {
        Self(std::sync::Arc::new(tokio::sync::Semaphore::new(at_once)))
    }

    async fn run<R: Send + 'static>(
        &self,
        work: impl FnOnce() -> R + Send + 'static,
    ) -> Result<R, AdminUserError> {
        let _permit = self
            .0
            .acquire()
            .await
            .map_err(|e| AdminUserError::Hash(e.to_string()))?;
        tokio::task::spawn_blocking(work)
            .await
            .map_err(|e| AdminUserError::Hash(e.to_string()))
    }
}

#[derive(Debug, Clone)]
pub struct AdminUsers {
    store: Store,
    clock: SharedClock,
    hashing: HashLimiter,
}

impl AdminUsers {
    pub(crate) fn new(store: Store, clock: SharedClock) -> Self {
        Self {
            store,
            clock,
            hashing: HashLimiter::new(CONCURRENT_HASHES),
        }
    }

    /// Runs `work` (an argon2 computation) on a blocking thread, at most
    /// `CONCURRENT_HASHES` at once.
    async fn hash_limited<R: Send + 'static>(
        &self,
        work: impl FnOnce() -> R + Send + 'static,
    ) -> Result<R, AdminUserError> {
        self.hashing.run(work).await
    }

    /// The name and password checked, and the password's argon2id hash.
    async fn checked_and_hashed(
        &self,
        name: &str,
        password: &str,
    ) -> Result<(String, String), AdminUserError> {
        let name = validate_name(name)?;
        validate_password(password)?;
        let owned = password.to_string();
        let hash = self.hash_limited(move || hash_password(&owned)).await??;
        Ok((name, hash))
    }

    pub(crate) fn list(&self) -> Result<Vec<AdminUserInfo>, AdminUserError> {
        let users = self.store.read(|tx| tx.admin_users())?;
        Ok(users.iter().map(AdminUserInfo::from).collect())
    }

    /// Creates a user; refused if the name is taken.
    pub async fn add(
        &self,
        name: &str,
        password: &str,
        origin: &Origin,
    ) -> Result<AdminUserInfo, AdminUserError> {
        let (name, hash) = self.checked_and_hashed(name, password).await?;
        let now = self.clock.now_ms();
        let user = AdminUser {
            name: name.clone(),
            password_hash: hash,
            created_at_ms: now,
            password_changed_at_ms: now,
        };
        let info = AdminUserInfo::from(&user);
        let event = Event::new("admin_user.created")
            .severity(Severity::Notice)
            .detail("name", name.clone());
        let origin = origin.clone();
        self.store
            .write(move |tx| -> Result<(), AdminUserError> {
                if tx.admin_user(&user.name)?.is_some() {
                    return Err(AdminUserError::Exists(user.name.clone()));
                }
                tx.put_admin_user(&user)?;
                audit::append(tx, &origin, &event, now)?;
                Ok(())
            })
            .await?;
        Ok(info)
    }

    /// Sets a new password.
    pub async fn set_password(
        &self,
        name: &str,
        password: &str,
        origin: &Origin,
    ) -> Result<AdminUserInfo, AdminUserError> {
        let (name, hash) = self.checked_and_hashed(name, password).await?;
        let now = self.clock.now_ms();
        let event = Event::new("admin_user.password_changed")
            .severity(Severity::Notice)
            .detail("name", name.clone());
        let origin = origin.clone();
        self.store
            .write(move |tx| -> Result<AdminUserInfo, AdminUserError> {
                let mut user = tx
                    .admin_user(&name)?
                    .ok_or_else(|| AdminUserError::NotFound(name.clone()))?;
                user.password_hash = hash.clone();
                user.password_changed_at_ms = now;
                tx.put_admin_user(&user)?;
                audit::append(tx, &origin, &event, now)?;
                Ok(AdminUserInfo::from(&user))
            })
            .await
    }

    pub async fn remove(&self, name: &str, origin: &Origin) -> Result<(), AdminUserError> {
        let name = validate_name(name)?;
        let now = self.clock.now_ms();
        let event = Event::new("admin_user.removed")
            .severity(Severity::Notice)
            .detail("name", name.clone());
        let origin = origin.clone();
        self.store
            .write(move |tx| -> Result<(), AdminUserError> {
                if !tx.delete_admin_user(&name)? {
                    return Err(AdminUserError::NotFound(name.clone()));
                }
                audit::append(tx, &origin, &event, now)?;
                Ok(())
            })
            .await
    }

    /// Checks a name and password; `Refused` for an unknown name or a wrong password
    /// alike, after the same amount of work.
    pub(crate) async fn verify(
        &self,
        name: &str,
        password: &str,
    ) -> Result<String, AdminUserError> {
        let user = match validate_name(name) {
            Ok(name) => self.store.read(|tx| tx.admin_user(&name))?,
            Err(_) => None,
        };
        let stored = user.as_ref().map(|u| u.password_hash.clone());
        let password = password.to_string();
        // The dummy hash is made (once) on the blocking thread too.
        let matches = password.len() <= MAX_PASSWORD_BYTES
            && self
                .hash_limited(move || match &stored {
                    Some(hash) => password_matches(hash, &password),
                    None => password_matches(dummy_hash(), &password),
                })
                .await
                .unwrap_or(false);
        match (user, matches) {
            (Some(user), true) => Ok(user.name),
            _ => Err(AdminUserError::Refused),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn hashes_are_argon2id_salted_and_verify() {
        let a = hash_password("correct horse battery").unwrap();
        let b = hash_password("correct horse battery").unwrap();
        assert!(a.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{a}");
        assert_ne!(a, b, "a fresh salt each time");
        assert!(password_matches(&a, "correct horse battery"));
        assert!(!password_matches(&a, "correct horse battery "));
        assert!(!password_matches("not a hash", "x"));
    }

    #[test]
    fn names_and_passwords_are_checked() {
        for good in ["alice", "ops.team", "a@b", "x-1_2"] {
            assert!(validate_name(good).is_ok(), "{good}");
        }
        for bad in ["", "Alice", "a b", "é", &"a".repeat(65), "a/b"] {
            assert!(validate_name(bad).is_err(), "{bad}");
        }
        assert!(validate_password("short").is_err());
        assert!(validate_password("twelve chars").is_ok());
        assert!(validate_password("with\nnewline!!").is_err());
        assert!(validate_password(&"x".repeat(1025)).is_err());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn no_more_than_the_limit_of_hashes_run_at_once() {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicUsize, Ordering};
        let limiter = HashLimiter::new(CONCURRENT_HASHES);
        let running = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..4 * CONCURRENT_HASHES {
            let (limiter, running, most) = (limiter.clone(), running.clone(), most.clone());
            tasks.spawn(async move {
                limiter
                    .run(move || {
                        let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                        most.fetch_max(now, Ordering::SeqCst);
                        // Long enough that every task has asked for its turn meanwhile.
                        std::thread::sleep(std::time::Duration::from_millis(50));
                        running.fetch_sub(1, Ordering::SeqCst);
                    })
                    .await
            });
        }
        let outcomes = tasks.join_all().await;
        assert!(
            outcomes.iter().all(Result::is_ok),
            "every one ran in its turn"
        );
        assert_eq!(outcomes.len(), 4 * CONCURRENT_HASHES);
        assert_eq!(most.load(Ordering::SeqCst), CONCURRENT_HASHES);
    }
}
