//! The signing-key ring and its rotation state machine.
//!
//! A key is born `next`: published in the JWKS so that apps which cache it learn the key
//! before any token carries it. Rotation makes it `active` (the one key that signs) and
//! turns the previous active key `retiring`: it no longer signs, its private half is
//! destroyed, and it keeps verifying until every token it signed has expired plus the
//! leeway. Then it is retired, which means deleted. `revoke` ends a key at once: its
//! tokens stop verifying here immediately and it leaves the JWKS. There is always one
//! active and one next key; a revoked or promoted one is replaced in the same write.
//!
//! Private keys are sealed in the data file; the parsed ring key pairs live in memory in
//! an immutable `KeySet` snapshot swapped after every durable change, so signing and
//! verifying never touch the store. This module must not know HTTP; the scheduler calls
//! `KeyRing::rotate` and `KeyRing::retire_expired`.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use jsonwebtoken::{Algorithm, DecodingKey};
use ring::rand::SystemRandom;
use ring::signature::{self as sig, KeyPair as _};
use serde::Serialize;

use crate::audit::{self, Event, Origin, Severity};
use crate::clock::{SharedClock, format_rfc3339, millis};
pub(crate) use crate::config::KeyAlgorithm;
use crate::error_kind::{Classify, ErrorKind};
use crate::jwt::{self, AccessClaims};
use crate::live::Changes;
use crate::store::records::{SigningKey, SigningKeyPrivate, StoredKeyAlgorithm, StoredKeyState};
use crate::store::{SIGNING_KEYS, Store, StoreError};

/// How long a next key must have been published before an ordinary rotation may make it
/// active: twice the JWKS `max-age`, so every cache that honours it has refetched.
pub(crate) const NEXT_KEY_MIN_PUBLISHED: Duration = Duration::from_secs(2 * JWKS_MAX_AGE_SECS);

/// The JWKS response's `Cache-Control: max-age`.
pub(crate) const JWKS_MAX_AGE_SECS: u64 = 300;

/// How a key algorithm meets jsonwebtoken and the data file.
impl KeyAlgorithm {
    fn jsonwebtoken(self) -> Algorithm {
        match self {
            Self::Ed25519 => Algorithm::EdDSA,
            Self::EcdsaP256 => Algorithm::ES256,
        }
    }

    fn stored(self) -> StoredKeyAlgorithm {
        match self {
            Self::Ed25519 => StoredKeyAlgorithm::Ed25519,
            Self::EcdsaP256 => StoredKeyAlgorithm::EcdsaP256,
        }
    }

    fn from_stored(stored: StoredKeyAlgorithm) -> Self {
        match stored {
            StoredKeyAlgorithm::Ed25519 => Self::Ed25519,
            StoredKeyAlgorithm::EcdsaP256 => Self::EcdsaP256,
        }
    }
}

/// Where a key is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyState {
    Next,
    Active,
    Retiring,
    Revoked,
}

impl KeyState {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Next => "next",
            Self::Active => "active",
            Self::Retiring => "retiring",
            Self::Revoked => "revoked",
        }
    }
}

impl From<StoredKeyState> for KeyState {
    fn from(s: StoredKeyState) -> Self {
        match s {
            StoredKeyState::Next => Self::Next,
            StoredKeyState::Active => Self::Active,
            StoredKeyState::Retiring => Self::Retiring,
            StoredKeyState::Revoked => Self::Revoked,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("no signing key with kid {0:?}")]
    UnknownKey(String),
    #[error("signing key {0} is already revoked")]
    AlreadyRevoked(String),
    #[error(
        "the next key was published at {published}; apps that cache the JWKS may not have \
         fetched it before {ready}. Rotate after that, or now (`keys rotate --now`, or \
         {{\"now\": true}} over HTTP); tokens signed by the new key may then be refused by \
         apps until they refetch the JWKS"
    )]
    NextKeyTooNew { published: String, ready: String },
    #[error("the key ring has no active key")]
    NoActiveKey,
    #[error("the system random number generator failed")]
    Random,
    #[error("signing key {kid} cannot be used: {reason}")]
    BadKey { kid: String, reason: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl Classify for KeyError {
    fn kind(&self) -> ErrorKind {
        match self {
            Self::UnknownKey(_) => ErrorKind::NotFound,
            Self::AlreadyRevoked(_) | Self::NextKeyTooNew { .. } => ErrorKind::Conflict,
            Self::Store(err) => err.kind(),
            Self::NoActiveKey | Self::Random | Self::BadKey { .. } => ErrorKind::Internal,
        }
    }
}

enum KeySigner {
    Ed25519(sig::Ed25519KeyPair),
    EcdsaP256(sig::EcdsaKeyPair),
}

impl std::fmt::Debug for KeySigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KeySigner(..)")
    }
}

/// One key as held in memory: its record, its parsed verifier and, for next and active
/// keys, its parsed private key.
#[derive(Debug)]
pub(crate) struct LoadedKey {
    pub(crate) kid: String,
    pub(crate) algorithm: KeyAlgorithm,
    pub(crate) record: SigningKey,
    decoding: DecodingKey,
    signer: Option<KeySigner>,
    encoded_header: String,
    /// The header of front-door assertions signed by this key.
    assertion_header: String,
}

impl LoadedKey {
    pub(crate) fn state(&self) -> KeyState {
        self.record.state.into()
    }

    /// Whether a token signed by this key may be accepted at `now_ms`.
    pub(crate) fn verifies_at(&self, now_ms: u64) -> bool {
        match self.record.state {
            StoredKeyState::Active => true,
            StoredKeyState::Retiring => self.record.verify_until_ms.is_some_and(|t| now_ms < t),
            StoredKeyState::Next | StoredKeyState::Revoked => false,
        }
    }

    /// Checks `signature` (base64url) over `signing_input` through jsonwebtoken's crypto
    /// provider, with this key's algorithm pinned: the token's own `alg` plays no part.
    pub(crate) fn verify_signature(&self, signing_input: &str, signature: &str) -> bool {
        crate::jwt::verify_signature(
            signature,
            signing_input.as_bytes(),
            &self.decoding,
            self.algorithm.jsonwebtoken(),
        )
    }

    /// The public key as a JWK (RFC 7517), for the JWKS.
    fn jwk(&self) -> serde_json::Value {
        let b64 = |b: &[u8]| data_encoding::BASE64URL_NOPAD.encode(b);
        let public = &self.record.public_key;
        match self.algorithm {
            KeyAlgorithm::Ed25519 => serde_json::json!({
                "kty": "OKP", "crv": "Ed25519", "x": b64(public),
                "kid": self.kid, "alg": "EdDSA", "use": "sig",
            }),
            KeyAlgorithm::EcdsaP256 => {
                let (x, y) = ec_coordinates(public);
                serde_json::json!({
                    "kty": "EC", "crv": "P-256", "x": b64(x), "y": b64(y),
                    "kid": self.kid, "alg": "ES256", "use": "sig",
                })
            }
        }
    }

    fn info(&self) -> KeyInfo {
        let time = |t: Option<u64>| t.map(format_rfc3339);
        KeyInfo {
            kid: self.kid.clone(),
            alg: self.algorithm.jws_alg().to_string(),
            state: self.state(),
            created_at: format_rfc3339(self.record.created_at_ms),
            activated_at: time(self.record.activated_at_ms),
            retiring_at: time(self.record.retiring_at_ms),
            revoked_at: time(self.record.revoked_at_ms),
            verify_until: time(self.record.verify_until_ms),
        }
    }
}

/// Splits an uncompressed P-256 point (0x04 ‖ x ‖ y).
fn ec_coordinates(point: &[u8]) -> (&[u8], &[u8]) {
    point
        .get(1..)
        .map_or((&[], &[]), |xy| xy.split_at(xy.len() / 2))
}

/// RFC 7638 thumbprint: SHA-256 over the required members in lexicographic order.
fn thumbprint(algorithm: KeyAlgorithm, public: &[u8]) -> String {
    let b64 = |b: &[u8]| data_encoding::BASE64URL_NOPAD.encode(b);
    let canonical = match algorithm {
        KeyAlgorithm::Ed25519 => {
            format!(r#"{{"crv":"Ed25519","kty":"OKP","x":"{}"}}"#, b64(public))
        }
        KeyAlgorithm::EcdsaP256 => {
            let (x, y) = ec_coordinates(public);
            format!(
                r#"{{"crv":"P-256","kty":"EC","x":"{}","y":"{}"}}"#,
                b64(x),
                b64(y)
            )
        }
    };
    b64(ring::digest::digest(&ring::digest::SHA256, canonical.as_bytes()).as_ref())
}

/// A key as `keys list` and `GET /v1/keys` show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct KeyInfo {
    pub kid: String,
    pub alg: String,
    pub state: KeyState,
    pub(crate) created_at: String,
    pub(crate) activated_at: Option<String>,
    pub(crate) retiring_at: Option<String>,
    pub revoked_at: Option<String>,
    pub verify_until: Option<String>,
}

/// An immutable view of the ring, swapped whole after each change.
#[derive(Debug)]
pub(crate) struct KeySet {
    keys: HashMap<String, Arc<LoadedKey>>,
    active: Option<Arc<LoadedKey>>,
    jwks: Arc<str>,
    /// When the first published retiring key stops verifying: from then on the rendered
    /// JWKS is out of date until the set is rebuilt (the `prune_revocations` job retires
    /// such keys, at most an hour later).
    jwks_until_ms: Option<u64>,
}

impl KeySet {
    /// The key named by a token's `kid`; `None` for any name we do not hold (the lookup is
    /// an exact map lookup, so a `kid` is never interpreted as a path or query).
    pub(crate) fn get(&self, kid: &str) -> Option<&Arc<LoadedKey>> {
        self.keys.get(kid)
    }

    /// The JWKS document (RFC 7517 section 5) at `now_ms`: rendered once per change, and
    /// again on the way out once a retiring key in it has stopped verifying, so a key
    /// past its `verify_until` is never published.
    pub(crate) fn jwks(&self, now_ms: u64) -> Arc<str> {
        match self.jwks_until_ms {
            Some(until) if now_ms >= until => render_jwks(self.keys.values(), now_ms).into(),
            _ => self.jwks.clone(),
        }
    }
}

/// Whether `rotate` may promote a next key published only moments ago.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Rotation {
    /// Only once the next key has been published for `NEXT_KEY_MIN_PUBLISHED`.
    Scheduled,
    /// At once (an emergency): apps with a stale JWKS refetch on the unknown `kid`.
    Now,
}

/// What a rotation did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct RotationReport {
    pub activated: String,
    pub retiring: Option<String>,
    pub next: String,
    pub retired: Vec<String>,
}

/// A key about to be written: its record and private half.
struct NewKey {
    kid: String,
    record: SigningKey,
    private: SigningKeyPrivate,
}

fn generate(algorithm: KeyAlgorithm, now_ms: u64) -> Result<NewKey, KeyError> {
    let rng = SystemRandom::new();
    let (pkcs8, public) = match algorithm {
        KeyAlgorithm::Ed25519 => {
            let doc = sig::Ed25519KeyPair::generate_pkcs8(&rng).map_err(|_| KeyError::Random)?;
            let pair =
                sig::Ed25519KeyPair::from_pkcs8(doc.as_ref()).map_err(|_| KeyError::Random)?;
            (doc.as_ref().to_vec(), pair.public_key().as_ref().to_vec())
        }
        KeyAlgorithm::EcdsaP256 => {
            let alg = &sig::ECDSA_P256_SHA256_FIXED_SIGNING;
            let doc = sig::EcdsaKeyPair::generate_pkcs8(alg, &rng).map_err(|_| KeyError::Random)?;
            let pair = sig::EcdsaKeyPair::from_pkcs8(alg, doc.as_ref(), &rng)
                .map_err(|_| KeyError::Random)?;
            (doc.as_ref().to_vec(), pair.public_key().as_ref().to_vec())
        }
    };
    Ok(NewKey {
        kid: thumbprint(algorithm, &public),
        record: SigningKey {
            algorithm: algorithm.stored(),
            public_key: public,
            state: StoredKeyState::Next,
            created_at_ms: now_ms,
            activated_at_ms: None,
            retiring_at_ms: None,
            revoked_at_ms: None,
            verify_until_ms: None,
        },
        private: SigningKeyPrivate { pkcs8 },
    })
}

fn load_key(
    kid: String,
    record: SigningKey,
    private: Option<SigningKeyPrivate>,
) -> Result<LoadedKey, KeyError> {
    let algorithm = KeyAlgorithm::from_stored(record.algorithm);
    let bad = |reason: &str| KeyError::BadKey {
        kid: kid.clone(),
        reason: reason.to_string(),
    };
    let signer = match (&private, algorithm) {
        (None, _) => None,
        (Some(p), KeyAlgorithm::Ed25519) => Some(KeySigner::Ed25519(
            sig::Ed25519KeyPair::from_pkcs8(&p.pkcs8)
                .map_err(|_| bad("private key does not parse"))?,
        )),
        (Some(p), KeyAlgorithm::EcdsaP256) => Some(KeySigner::EcdsaP256(
            sig::EcdsaKeyPair::from_pkcs8(
                &sig::ECDSA_P256_SHA256_FIXED_SIGNING,
                &p.pkcs8,
                &SystemRandom::new(),
            )
            .map_err(|_| bad("private key does not parse"))?,
        )),
    };
    let public_matches = match &signer {
        None => true,
        Some(KeySigner::Ed25519(pair)) => {
            pair.public_key().as_ref() == record.public_key.as_slice()
        }
        Some(KeySigner::EcdsaP256(pair)) => {
            pair.public_key().as_ref() == record.public_key.as_slice()
        }
    };
    if !public_matches || thumbprint(algorithm, &record.public_key) != kid {
        return Err(bad(
            "stored public key does not match its kid or private half",
        ));
    }
    let decoding = match algorithm {
        KeyAlgorithm::Ed25519 => DecodingKey::from_ed_der(&record.public_key),
        KeyAlgorithm::EcdsaP256 => DecodingKey::from_ec_der(&record.public_key),
    };
    Ok(LoadedKey {
        encoded_header: jwt::encoded_header(algorithm.jws_alg(), &kid),
        assertion_header: jwt::encoded_header_of(algorithm.jws_alg(), &kid, jwt::ASSERTION_TYP),
        kid,
        algorithm,
        record,
        decoding,
        signer,
    })
}

/// Listing order: active, next, retiring, revoked.
fn state_rank(state: StoredKeyState) -> u8 {
    match state {
        StoredKeyState::Active => 0,
        StoredKeyState::Next => 1,
        StoredKeyState::Retiring => 2,
        StoredKeyState::Revoked => 3,
    }
}

fn build_set(keys: Vec<LoadedKey>, now_ms: u64) -> KeySet {
    let mut keys: Vec<Arc<LoadedKey>> = keys.into_iter().map(Arc::new).collect();
    // Active first, then next, then retiring: the order apps see in the JWKS.
    keys.sort_by_key(|k| {
        (
            state_rank(k.record.state),
            std::cmp::Reverse(k.record.created_at_ms),
        )
    });
    let jwks = render_jwks(keys.iter(), now_ms);
    let jwks_until_ms = keys
        .iter()
        .filter(|k| k.record.state == StoredKeyState::Retiring && k.verifies_at(now_ms))
        .filter_map(|k| k.record.verify_until_ms)
        .min();
    KeySet {
        jwks_until_ms,
        active: keys
            .iter()
            .find(|k| k.record.state == StoredKeyState::Active && k.signer.is_some())
            .cloned(),
        keys: keys.into_iter().map(|k| (k.kid.clone(), k)).collect(),
        jwks: jwks.into(),
    }
}

/// The JWKS of `keys` at `now_ms`: the next key and every key that verifies, active
/// first, then next, then retiring.
fn render_jwks<'k>(keys: impl Iterator<Item = &'k Arc<LoadedKey>>, now_ms: u64) -> String {
    let mut published: Vec<&Arc<LoadedKey>> = keys
        .filter(|k| k.record.state == StoredKeyState::Next || k.verifies_at(now_ms))
        .collect();
    published.sort_by_key(|k| {
        (
            state_rank(k.record.state),
            std::cmp::Reverse(k.record.created_at_ms),
        )
    });
    let published: Vec<serde_json::Value> = published.iter().map(|k| k.jwk()).collect();
    serde_json::json!({ "keys": published }).to_string()
}

/// The signing keys of the instance.
#[derive(Debug)]
pub struct KeyRing {
    store: Store,
    clock: SharedClock,
    algorithm: KeyAlgorithm,
    /// How long a retiring key keeps verifying: the access-token lifetime plus leeway.
    verify_window: Duration,
    current: RwLock<Arc<KeySet>>,
    /// Bumped after every change, so live connections re-check their tokens.
    changes: Changes,
    /// Serialises changes (rotate, revoke, retire) so each starts from the latest state.
    serial: tokio::sync::Mutex<()>,
}

impl KeyRing {
    /// Loads the ring, making sure there is an active and a next key.
    pub async fn open(
        store: Store,
        clock: SharedClock,
        algorithm: KeyAlgorithm,
        verify_window: Duration,
        changes: Changes,
    ) -> Result<Self, KeyError> {
        let ring = Self {
            store,
            clock,
            algorithm,
            verify_window,
            current: RwLock::new(Arc::new(build_set(Vec::new(), 0))),
            changes,
            serial: tokio::sync::Mutex::new(()),
        };
        {
            let _guard = ring.serial.lock().await;
            ring.ensure_active_and_next().await?;
            ring.reload()?;
        }
        Ok(ring)
    }

    /// The current snapshot.
    pub(crate) fn snapshot(&self) -> Arc<KeySet> {
        match self.current.read() {
            Ok(set) => set.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    fn replace(&self, set: KeySet) {
        let set = Arc::new(set);
        match self.current.write() {
            Ok(mut slot) => *slot = set,
            Err(poisoned) => *poisoned.into_inner() = set,
        }
    }

    /// Re-reads every key from the store into a new snapshot (also when another node
    /// changed one: the change feed).
    pub(crate) fn reload(&self) -> Result<(), KeyError> {
        let rows = self.store.read(|tx| {
            let mut out = Vec::new();
            for (kid, record) in tx.all(&SIGNING_KEYS)? {
                let private = match record.state {
                    StoredKeyState::Next | StoredKeyState::Active => {
                        tx.signing_key_private(&kid)?
                    }
                    StoredKeyState::Retiring | StoredKeyState::Revoked => None,
                };
                out.push((kid, record, private));
            }
            Ok::<_, StoreError>(out)
        })?;
        let keys = rows
            .into_iter()
            .map(|(kid, record, private)| load_key(kid, record, private))
            .collect::<Result<Vec<_>, _>>()?;
        self.replace(build_set(keys, self.clock.now_ms()));
        self.changes.bump();
        Ok(())
    }

    /// Signs `claims` with the active key: the finished compact JWS.
    pub fn sign(&self, claims: &AccessClaims) -> Result<String, KeyError> {
        let set = self.snapshot();
        let key = set.active.as_ref().ok_or(KeyError::NoActiveKey)?;
        Self::sign_input(key, jwt::signing_input(&key.encoded_header, claims))
    }

    /// Signs a front-door assertion with the active key (its own `typ`).
    pub(crate) fn sign_assertion(&self, claims: &jwt::AssertionClaims) -> Result<String, KeyError> {
        let set = self.snapshot();
        let key = set.active.as_ref().ok_or(KeyError::NoActiveKey)?;
        Self::sign_input(key, jwt::signing_input(&key.assertion_header, claims))
    }

    /// Signs any other JWT the server publishes (a token status list) with the active
    /// key, under its own `typ`.
    pub(crate) fn sign_typed(
        &self,
        claims: &impl serde::Serialize,
        typ: &str,
    ) -> Result<String, KeyError> {
        let set = self.snapshot();
        let key = set.active.as_ref().ok_or(KeyError::NoActiveKey)?;
        let header = jwt::encoded_header_of(key.algorithm.jws_alg(), &key.kid, typ);
        Self::sign_input(key, jwt::signing_input(&header, claims))
    }

    fn sign_input(key: &LoadedKey, input: String) -> Result<String, KeyError> {
        let signature = match &key.signer {
            Some(KeySigner::Ed25519(pair)) => pair.sign(input.as_bytes()).as_ref().to_vec(),
            Some(KeySigner::EcdsaP256(pair)) => pair
                .sign(&SystemRandom::new(), input.as_bytes())
                .map_err(|_| KeyError::Random)?
                .as_ref()
                .to_vec(),
            None => return Err(KeyError::NoActiveKey),
        };
        Ok(jwt::finish(input, &signature))
    }

    /// Every key, active first.
    pub fn list(&self) -> Vec<KeyInfo> {
        let set = self.snapshot();
        let mut keys: Vec<&Arc<LoadedKey>> = set.keys.values().collect();
        keys.sort_by_key(|k| {
            (
                state_rank(k.record.state),
                std::cmp::Reverse(k.record.created_at_ms),
            )
        });
        keys.into_iter().map(|k| k.info()).collect()
    }

    /// First start, or a ring left without an active or next key (after a revocation
    /// was interrupted): generate and promote as needed, in one write.
    async fn ensure_active_and_next(&self) -> Result<(), KeyError> {
        let existing = self.store.read(|tx| tx.all(&SIGNING_KEYS))?;
        let writes = repairs(&existing, self.algorithm, self.clock.now_ms())?;
        if writes.is_empty() {
            return Ok(());
        }
        let now = self.clock.now_ms();
        self.store
            .write(move |tx| put_keys(tx, &writes, &Origin::system(), now))
            .await?;
        Ok(())
    }

    /// Promotes the next key, retires the active one into `retiring`, publishes a new
    /// next key and removes keys whose verification window has closed. Durable before it
    /// returns. The scheduler calls this with `Rotation::Scheduled`.
    pub async fn rotate(
        &self,
        mode: Rotation,
        origin: &Origin,
    ) -> Result<RotationReport, KeyError> {
        let _guard = self.serial.lock().await;
        let now = self.clock.now_ms();
        let existing = self.store.read(|tx| tx.all(&SIGNING_KEYS))?;
        let next = existing
            .iter()
            .filter(|(_, k)| k.state == StoredKeyState::Next)
            .max_by_key(|(_, k)| k.created_at_ms)
            .cloned();
        let Some((next_kid, mut next_record)) = next else {
            // Repaired at open; reaching this means a concurrent offline edit.
            return Err(KeyError::NoActiveKey);
        };
        let ready_at = next_record
            .created_at_ms
            .saturating_add(millis(NEXT_KEY_MIN_PUBLISHED));
        if mode == Rotation::Scheduled && now < ready_at {
            return Err(KeyError::NextKeyTooNew {
                published: format_rfc3339(next_record.created_at_ms),
                ready: format_rfc3339(ready_at),
            });
        }
        let verify_until = now.saturating_add(millis(self.verify_window));
        let mut writes: Vec<(String, SigningKey)> = Vec::new();
        let mut retiring = None;
        for (kid, record) in existing
            .iter()
            .filter(|(_, k)| k.state == StoredKeyState::Active)
        {
            let mut record = record.clone();
            record.state = StoredKeyState::Retiring;
            record.retiring_at_ms = Some(now);
            record.verify_until_ms = Some(verify_until);
            writes.push((kid.clone(), record));
            retiring = Some(kid.clone());
        }
        next_record.state = StoredKeyState::Active;
        next_record.activated_at_ms = Some(now);
        writes.push((next_kid.clone(), next_record));
        let new_next = generate(self.algorithm, now)?;
        let new_next_kid = new_next.kid.clone();
        let rotated = Event::new("key.rotated")
            .severity(Severity::Notice)
            .detail("activated", next_kid.clone())
            .detail("retiring", retiring.clone())
            .detail("next", new_next_kid.clone())
            .detail(
                "mode",
                match mode {
                    Rotation::Scheduled => "scheduled",
                    Rotation::Now => "now",
                },
            );
        let generated = Event::new("key.generated")
            .detail("kid", new_next_kid.clone())
            .detail("state", "next");
        let origin = origin.clone();
        let retired = self
            .store
            .write(move |tx| -> Result<Vec<String>, StoreError> {
                audit::append(tx, &origin, &rotated, now)?;
                audit::append(tx, &origin, &generated, now)?;
                for (kid, record) in &writes {
                    tx.put(&SIGNING_KEYS, kid, record)?;
                    if record.state == StoredKeyState::Retiring {
                        // A retiring key never signs again: its private half goes now.
                        tx.delete_signing_key_private(kid)?;
                    }
                }
                tx.put(&SIGNING_KEYS, &new_next.kid, &new_next.record)?;
                tx.put_signing_key_private(&new_next.kid, &new_next.private)?;
                retire_in(tx, now, &origin)
            })
            .await?;
        self.reload()?;
        tracing::info!(activated = %next_kid, retiring = ?retiring, next = %new_next_kid, retired = ?retired, "signing keys rotated");
        Ok(RotationReport {
            activated: next_kid,
            retiring,
            next: new_next_kid,
            retired,
        })
    }

    /// Revokes a key: every token it signed is refused from now on, it leaves the JWKS,
    /// its private half is destroyed, and if it was the active (or next) key, a
    /// replacement takes its place in the same write.
    pub async fn revoke(&self, kid: &str, origin: &Origin) -> Result<KeyInfo, KeyError> {
        let _guard = self.serial.lock().await;
        let now = self.clock.now_ms();
        let mut existing = self.store.read(|tx| tx.all(&SIGNING_KEYS))?;
        let Some((_, record)) = existing.iter_mut().find(|(k, _)| k == kid) else {
            return Err(KeyError::UnknownKey(kid.to_string()));
        };
        if record.state == StoredKeyState::Revoked {
            return Err(KeyError::AlreadyRevoked(kid.to_string()));
        }
        let was = record.state;
        record.state = StoredKeyState::Revoked;
        record.revoked_at_ms = Some(now);
        // Kept (as "revoked") while one of its tokens could otherwise still be valid.
        record.verify_until_ms = Some(now.saturating_add(millis(self.verify_window)));
        let revoked = record.clone();
        // The replacement (a promoted next key, a new next key) goes in the same write,
        // so no crash can leave the ring without an active key.
        let replacements = repairs(&existing, self.algorithm, now)?;
        let kid_owned = kid.to_string();
        let event = Event::new("key.revoked")
            .severity(Severity::High)
            .detail("kid", kid.to_string())
            .detail("was", KeyState::from(was).as_str());
        let origin = origin.clone();
        self.store
            .write(move |tx| -> Result<(), StoreError> {
                tx.put(&SIGNING_KEYS, &kid_owned, &revoked)?;
                tx.delete_signing_key_private(&kid_owned)?;
                audit::append(tx, &origin, &event, now)?;
                put_keys(tx, &replacements, &origin, now)
            })
            .await?;
        self.reload()?;
        tracing::warn!(kid, was = ?KeyState::from(was), "signing key revoked");
        self.snapshot()
            .get(kid)
            .map(|k| k.info())
            .ok_or_else(|| KeyError::UnknownKey(kid.to_string()))
    }

    /// Deletes retiring and revoked keys whose verification window has closed.
    pub async fn retire_expired(&self) -> Result<Vec<String>, KeyError> {
        let _guard = self.serial.lock().await;
        let now = self.clock.now_ms();
        let retired = self
            .store
            .write(move |tx| retire_in(tx, now, &Origin::system()))
            .await?;
        if !retired.is_empty() {
            tracing::info!(retired = ?retired, "signing keys retired");
        }
        self.reload()?;
        Ok(retired)
    }
}

/// A key to write, with its private half when it has one to store.
type KeyWrite = (String, SigningKey, Option<SigningKeyPrivate>);

/// What makes `existing` hold one active and one next key again: promote the newest
/// next key if there is no active one, and generate what is still missing.
fn repairs(
    existing: &[(String, SigningKey)],
    algorithm: KeyAlgorithm,
    now: u64,
) -> Result<Vec<KeyWrite>, KeyError> {
    let has = |state| existing.iter().any(|(_, k)| k.state == state);
    let mut writes = Vec::new();
    let mut next_exists = has(StoredKeyState::Next);
    if !has(StoredKeyState::Active) {
        if let Some((kid, record)) = existing
            .iter()
            .filter(|(_, k)| k.state == StoredKeyState::Next)
            .max_by_key(|(_, k)| k.created_at_ms)
        {
            let mut record = record.clone();
            record.state = StoredKeyState::Active;
            record.activated_at_ms = Some(now);
            writes.push((kid.clone(), record, None));
            next_exists = false;
        } else {
            let mut key = generate(algorithm, now)?;
            key.record.state = StoredKeyState::Active;
            key.record.activated_at_ms = Some(now);
            writes.push((key.kid, key.record, Some(key.private)));
        }
    }
    if !next_exists {
        let key = generate(algorithm, now)?;
        writes.push((key.kid, key.record, Some(key.private)));
    }
    Ok(writes)
}

fn put_keys(
    tx: &crate::store::WriteTx<'_>,
    writes: &[KeyWrite],
    origin: &Origin,
    now: u64,
) -> Result<(), StoreError> {
    for (kid, record, private) in writes {
        tx.put(&SIGNING_KEYS, kid, record)?;
        let state = KeyState::from(record.state).as_str();
        let event = if let Some(private) = private {
            tx.put_signing_key_private(kid, private)?;
            Event::new("key.generated")
        } else {
            Event::new("key.activated")
        };
        audit::append(
            tx,
            origin,
            &event.detail("kid", kid.clone()).detail("state", state),
            now,
        )?;
    }
    Ok(())
}

fn retire_in(
    tx: &crate::store::WriteTx<'_>,
    now: u64,
    origin: &Origin,
) -> Result<Vec<String>, StoreError> {
    let mut retired = Vec::new();
    tx.retain(&SIGNING_KEYS, |kid, key| {
        let done = matches!(
            key.state,
            StoredKeyState::Retiring | StoredKeyState::Revoked
        ) && key.verify_until_ms.is_some_and(|t| t <= now);
        if done {
            retired.push(kid.to_string());
        }
        !done
    })?;
    for kid in &retired {
        tx.delete_signing_key_private(kid)?;
        audit::append(
            tx,
            origin,
            &Event::new("key.retired").detail("kid", kid.clone()),
            now,
        )?;
    }
    Ok(retired)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn thumbprint_matches_rfc_8037_appendix_a3() {
        // RFC 8037 A.3: the thumbprint of the example Ed25519 public key.
        let x = data_encoding::BASE64URL_NOPAD
            .decode(b"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo")
            .unwrap();
        assert_eq!(
            thumbprint(KeyAlgorithm::Ed25519, &x),
            "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k"
        );
    }

    #[test]
    fn generated_keys_load_and_sign_verifiably() {
        // No process-wide jsonwebtoken provider is installed here: verification must not
        // need one.
        for algorithm in [KeyAlgorithm::Ed25519, KeyAlgorithm::EcdsaP256] {
            let new = generate(algorithm, 1).unwrap();
            let mut record = new.record.clone();
            record.state = StoredKeyState::Active;
            let key = load_key(new.kid.clone(), record, Some(new.private.clone())).unwrap();
            let set = build_set(vec![key], 1);
            let key = set.get(&new.kid).unwrap();
            let input = "aGVhZGVy.cGF5bG9hZA";
            let signature = match key.signer.as_ref().unwrap() {
                KeySigner::Ed25519(p) => p.sign(input.as_bytes()).as_ref().to_vec(),
                KeySigner::EcdsaP256(p) => p
                    .sign(&SystemRandom::new(), input.as_bytes())
                    .unwrap()
                    .as_ref()
                    .to_vec(),
            };
            let sig_b64 = data_encoding::BASE64URL_NOPAD.encode(&signature);
            assert!(key.verify_signature(input, &sig_b64), "{algorithm:?}");
            assert!(!key.verify_signature("aGVhZGVy.cGF5bG9hZB", &sig_b64));
            assert!(set.jwks(1).contains(&new.kid));
        }
    }

    #[test]
    fn a_key_whose_kid_does_not_match_is_refused() {
        let new = generate(KeyAlgorithm::Ed25519, 1).unwrap();
        assert!(load_key("other".into(), new.record.clone(), None).is_err());
        let other = generate(KeyAlgorithm::Ed25519, 1).unwrap();
        assert!(load_key(new.kid.clone(), new.record, Some(other.private)).is_err());
    }

    #[test]
    fn retiring_keys_verify_only_inside_their_window() {
        let new = generate(KeyAlgorithm::Ed25519, 1).unwrap();
        let mut record = new.record;
        record.state = StoredKeyState::Retiring;
        record.verify_until_ms = Some(100);
        let key = load_key(new.kid.clone(), record.clone(), None).unwrap();
        assert!(key.verifies_at(99));
        assert!(!key.verifies_at(100));
        let set = build_set(vec![key], 100);
        assert_eq!(&*set.jwks(100), r#"{"keys":[]}"#);
        // A set built while the key still verified stops publishing it the moment its
        // window ends, not when the set is next rebuilt.
        let key = load_key(new.kid.clone(), record, None).unwrap();
        let set = build_set(vec![key], 50);
        assert!(set.jwks(99).contains(&new.kid));
        assert_eq!(&*set.jwks(100), r#"{"keys":[]}"#);
    }
}
