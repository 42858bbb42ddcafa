//! The token authority: issues access and refresh tokens, verifies, refreshes, revokes
//! and introspects them.
//!
//! Access tokens are JWTs (RFC 9068 profile) signed by the key ring's active key and
//! valid `access_ttl`. Refresh tokens are opaque (`ghr_` + 256 random bits), stored only
//! as SHA-256, valid `refresh_ttl`, and rotated on every use: each one belongs to a
//! family (one per pairing), and presenting a spent one revokes the whole family with
//! every access token it produced, since either the legitimate app or a thief holds a
//! copy and we cannot tell which.
//!
//! `verify` is the one check of a presented access token (RFC 8725): strict parsing
//! (`jwt::parse`), `typ`, a `kid` we hold, the algorithm pinned by that key, the key's
//! state, the signature, `iss` and `aud` exactly, `exp`/`nbf`/`iat` against the injected
//! clock with bounded leeway, then the revocation list. A bounded cache of tokens whose
//! signature already verified skips only the signature; every other check runs on every
//! call. This module must not know HTTP.

use std::collections::HashMap;
use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;

use crate::audit::{self, Actor, Event, Origin, Severity};
use crate::clock::{SharedClock, millis};
use crate::dpop::Jkt;
use crate::error_kind::{Classify, ErrorKind};
use crate::ids::{DeviceId, FamilyId, RandomError, Secret, TokenId};
use crate::jwt::{self, ACCESS_TOKEN_TYP, AccessClaims, Confirmation, Malformed};
use crate::keys::{KeyError, KeyRing};
use crate::ratelimit::{Limited, PolicyId, RateLimits, Subject};
use crate::revocation::{Refusal, RevocationList};
use crate::status_list::{self, StatusIndex, StatusListError, StatusLists};
use crate::store::records::{FamilyBinding, RefreshToken, StatusSlot, TokenFamily};
use crate::store::{
    DEVICE_FAMILIES, DEVICES, FAMILY_BINDINGS, REFRESH_TOKENS, Store, StoreError, TOKEN_FAMILIES,
    WriteTx, device_family_key,
};

/// Refresh tokens read `ghr_<43 base64url characters>`.
pub(crate) const REFRESH_PREFIX: &str = "ghr_";

/// The most access tokens one family may hold that can still be presented: each has a
/// status-list place in the family's row, rewritten at every refresh and read at its
/// revocation, so the row must stay small whatever the refresh rate limit allows.
/// (One refresh a second for a 15-minute token is 900.)
pub const MAX_LIVE_ACCESS_TOKENS: usize = 1024;

/// Fixed settings of the authority.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenSettings {
    pub issuer: String,
    pub audience: String,
    pub access_ttl: Duration,
    pub(crate) refresh_ttl: Duration,
    pub leeway: Duration,
    /// Pairing and the device code grant refuse a request without a DPoP proof.
    pub(crate) require_dpop: bool,
    /// The identity tokens were signed with until this start changed it, if it did.
    pub(crate) previous: Option<PreviousIdentity>,
}

/// The issuer (and audience) of the last start, when this start changed them: a server
/// moved to another port or address, or was given a domain. Access tokens it issued
/// before the change stay valid for the rest of their short life, so that no paired app
/// is cut off mid-session; refresh tokens never name an issuer and keep working.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreviousIdentity {
    pub(crate) issuer: String,
    /// The audience that changed with it (it was derived from the issuer), if any.
    pub(crate) audience: Option<String>,
    /// When the change was recorded (ms): only tokens issued before it are accepted.
    pub(crate) changed_at_ms: u64,
}

/// Records `issuer` as the data file's issuer (`meta.issuer`) and, when the file named
/// another one, audits `tokens.issuer_changed` in the same commit and returns what it
/// was. `audience_follows` says the audience is derived from the issuer (not set), so it
/// changed with it.
pub(crate) async fn record_issuer(
    store: &Store,
    clock: &SharedClock,
    issuer: &str,
    audience_follows: bool,
) -> Result<Option<PreviousIdentity>, StoreError> {
    let remembered = store.read(|tx| tx.issuer())?;
    if remembered.as_deref() == Some(issuer) {
        return Ok(None);
    }
    let now = clock.now_ms();
    let to = issuer.to_string();
    let from = remembered.clone();
    store
        .write(move |tx| {
            tx.set_issuer(&to)?;
            if let Some(from) = &from {
                let event = Event::new("tokens.issuer_changed")
                    .severity(Severity::Notice)
                    .detail("from", from.clone())
                    .detail("to", to.clone());
                audit::append(tx, &Origin::system(), &event, now)?;
            }
            Ok::<_, StoreError>(())
        })
        .await?;
    Ok(remembered.map(|from| PreviousIdentity {
        audience: audience_follows.then(|| from.clone()),
        issuer: from,
        changed_at_ms: now,
    }))
}

impl TokenSettings {
    /// How long after its issue a token may still be presented: lifetime plus leeway.
    pub fn access_window(&self) -> Duration {
        self.access_ttl + self.leeway
    }
}

/// Why an access token was refused. The client sees one "invalid token" whatever the
/// reason (no oracle); the reason goes to the debug log and the counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    Malformed(Malformed),
    WrongType,
    UnknownKey,
    AlgorithmMismatch,
    KeyNotUsable,
    BadSignature,
    WrongIssuer,
    WrongAudience,
    Expired,
    NotYetValid,
    IssuedInFuture,
    /// `exp - iat` is longer than this server's access-token lifetime plus leeway: no
    /// token it issued lives that long.
    LifetimeTooLong,
    /// The token's family has no row in the data file: pruned, or issued by a newer file
    /// than the one restored.
    UnknownFamily,
    Revoked,
}

impl Rejection {
    /// A short stable name for logs and metrics.
    pub(crate) fn code(&self) -> &'static str {
        match self {
            Self::Malformed(_) => "malformed",
            Self::WrongType => "wrong_typ",
            Self::UnknownKey => "unknown_kid",
            Self::AlgorithmMismatch => "alg_mismatch",
            Self::KeyNotUsable => "key_not_usable",
            Self::BadSignature => "bad_signature",
            Self::WrongIssuer => "wrong_iss",
            Self::WrongAudience => "wrong_aud",
            Self::Expired => "expired",
            Self::NotYetValid => "not_yet_valid",
            Self::IssuedInFuture => "iat_in_future",
            Self::LifetimeTooLong => "lifetime_too_long",
            Self::UnknownFamily => "unknown_family",
            Self::Revoked => "revoked",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// Every failed refresh (unknown, expired, spent, revoked): one answer, no oracle.
    #[error("the refresh token is invalid, expired or revoked")]
    InvalidGrant,
    /// The family is bound to a key (DPoP) and the request has no proof by it.
    #[error(
        "this refresh token is bound to a key (DPoP): send a DPoP proof signed by the key it \
         was issued to"
    )]
    DpopKey,
    #[error("too many refreshes for this device")]
    RateLimited(Box<Limited>),
    /// The family holds `MAX_LIVE_ACCESS_TOKENS` access tokens that may still be
    /// presented: the next one waits until the oldest expires (seconds).
    #[error(
        "this device holds {MAX_LIVE_ACCESS_TOKENS} access tokens that have not expired yet; \
         refresh less often (retry in {0} s)"
    )]
    Crowded(u64),
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error(transparent)]
    Random(#[from] RandomError),
    #[error(transparent)]
    StatusList(#[from] StatusListError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl Classify for TokenError {
    fn kind(&self) -> ErrorKind {
        match self {
            Self::InvalidGrant | Self::DpopKey => ErrorKind::Invalid,
            Self::RateLimited(_) | Self::Crowded(_) => ErrorKind::RateLimited,
            Self::Key(err) => err.kind(),
            Self::Random(_) => ErrorKind::Internal,
            Self::StatusList(err) => err.kind(),
            Self::Store(err) => err.kind(),
        }
    }

    fn code(&self) -> &'static str {
        match self {
            // RFC 6749 section 5.2 names this code.
            Self::InvalidGrant => "invalid_grant",
            // RFC 9449 section 5.
            Self::DpopKey => "invalid_dpop_proof",
            other => other.kind().code(),
        }
    }
}

/// A verified access token.
#[derive(Debug, Clone)]
pub struct Verified {
    pub claims: AccessClaims,
    pub kid: String,
}

/// What `/v1/pair` and `/v1/token` answer.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct TokenPair {
    pub(crate) device_id: DeviceId,
    pub(crate) access_token: String,
    pub(crate) refresh_token: String,
    /// `Bearer`, or `DPoP` for a family bound to the device's key.
    pub(crate) token_type: String,
    pub(crate) expires_in: u64,
}

/// An RFC 7662 introspection answer. Inactive answers carry `active: false` only.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub(crate) struct Introspection {
    pub(crate) active: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) token_type: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) iss: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) aud: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) sub: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) exp: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) nbf: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) iat: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) jti: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) sid: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) scope: Option<String>,
    /// The key a DPoP-bound token is bound to (RFC 9449 section 6.2).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) cnf: Option<Confirmation>,
}

/// A new refresh-token family, generated outside the write transaction that stores it
/// (a transaction may run twice; its randomness must not change between runs).
#[derive(Debug, Clone)]
pub struct NewFamily {
    pub family: FamilyId,
    pub refresh: Secret,
    /// The key the family is bound to (DPoP), if the device presented a proof.
    pub binding: Option<Jkt>,
    /// The access token answered with the family, when one is (its status-list place is
    /// written with the family's row).
    pub first: Option<NextAccess>,
}

impl NewFamily {
    pub fn generate() -> Result<Self, RandomError> {
        Ok(Self {
            family: FamilyId::generate()?,
            refresh: Secret::generate(REFRESH_PREFIX)?,
            binding: None,
            first: None,
        })
    }
}

/// An access token about to be issued: its status-list index and its issue time, fixed
/// before the transaction that records them in its family's row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NextAccess {
    pub index: Option<StatusIndex>,
    pub issued_at_ms: u64,
}

impl NextAccess {
    /// Its family row's note of it (its `exp`, whole seconds as in the token).
    fn slot(&self, access_ttl: Duration) -> Option<StatusSlot> {
        let exp_s = self.issued_at_ms / 1000 + access_ttl.as_secs();
        self.index
            .map(|index| index.slot(exp_s.saturating_mul(1000)))
    }
}

fn hash_key(secret_hash: &[u8; 32]) -> String {
    data_encoding::HEXLOWER.encode(secret_hash)
}

/// What the refresh transaction decided.
enum RefreshOutcome {
    Rotated {
        device: DeviceId,
        family: FamilyId,
        binding: Option<Jkt>,
    },
    /// The family is bound to a key the request did not prove it holds.
    Unbound,
    /// The family holds `MAX_LIVE_ACCESS_TOKENS`; the oldest leaves in this many seconds.
    Crowded(u64),
    Reused {
        device: String,
        family: FamilyId,
    },
    Refused(&'static str),
}

// ---------------------------------------------------------------------------------------
// The cache of verified signatures

const CACHE_SHARDS: usize = 16;
const CACHE_PER_SHARD: usize = 1024;

#[derive(Debug)]
struct CachedToken {
    token: Box<str>,
    verified: Verified,
}

/// Tokens whose signature has been verified, keyed by a hash of their signature
/// segment. Bounded: a full shard forgets its oldest entry (first in, first out), and
/// tokens are cached when first verified, so the oldest entries are also the first to
/// expire. A hit is confirmed by comparing the whole token, so a valid signature grafted
/// onto other claims never hits.
#[derive(Debug, Default)]
struct VerifiedCache {
    shards: [Mutex<CacheShard>; CACHE_SHARDS],
}

#[derive(Debug, Default)]
struct CacheShard {
    entries: HashMap<u64, CachedToken>,
    /// Keys in insertion order, one per entry.
    order: std::collections::VecDeque<u64>,
}

impl VerifiedCache {
    fn key(token: &str) -> u64 {
        let signature = token.rsplit_once('.').map_or(token, |(_, s)| s);
        let mut hasher = DefaultHasher::new();
        signature.hash(&mut hasher);
        hasher.finish()
    }

    fn shard(&self, key: u64) -> std::sync::MutexGuard<'_, CacheShard> {
        #[allow(clippy::cast_possible_truncation)] // the low bits pick a shard
        let index = (key as usize) % CACHE_SHARDS;
        self.shards[index].lock().unwrap_or_else(|p| p.into_inner())
    }

    fn get(&self, token: &str) -> Option<Verified> {
        let key = Self::key(token);
        let shard = self.shard(key);
        shard
            .entries
            .get(&key)
            .filter(|c| &*c.token == token)
            .map(|c| c.verified.clone())
    }

    fn insert(&self, token: &str, verified: &Verified) {
        let key = Self::key(token);
        let mut shard = self.shard(key);
        let entry = CachedToken {
            token: token.into(),
            verified: verified.clone(),
        };
        if shard.entries.insert(key, entry).is_some() {
            return;
        }
        shard.order.push_back(key);
        while shard.entries.len() > CACHE_PER_SHARD {
            let Some(oldest) = shard.order.pop_front() else {
                break;
            };
            shard.entries.remove(&oldest);
        }
    }
}

// ---------------------------------------------------------------------------------------
// The authority

/// How long a front-door assertion is valid: long enough for the app to check it on
/// arrival, short enough that a copy is of no use later.
const ASSERTION_LIFETIME: Duration = Duration::from_secs(30);

/// Families in `TokenAuthority::newest` before expired entries are swept (then at each
/// doubling).
const NEWEST_SWEEP_AT: usize = 4096;

#[derive(Debug)]
pub struct TokenAuthority {
    store: Store,
    clock: SharedClock,
    keys: Arc<KeyRing>,
    revocations: Arc<RevocationList>,
    /// Where each access token's revocation bit is published.
    status: Arc<StatusLists>,
    settings: TokenSettings,
    /// The `refresh` policy is spent per device before each grant.
    limits: Arc<RateLimits>,
    cache: VerifiedCache,
    /// Each family's newest access token (its id and `exp`), for the families holding
    /// one that has not expired: a relayed socket stays open past its token's expiry
    /// while its family has a newer one.
    newest: Mutex<HashMap<FamilyId, (TokenId, u64)>>,
}

impl TokenAuthority {
    pub(crate) fn new(
        store: Store,
        clock: SharedClock,
        keys: Arc<KeyRing>,
        revocations: Arc<RevocationList>,
        status: Arc<StatusLists>,
        settings: TokenSettings,
        limits: Arc<RateLimits>,
    ) -> Self {
        Self {
            store,
            clock,
            keys,
            revocations,
            status,
            limits,
            settings,
            cache: VerifiedCache::default(),
            newest: Mutex::default(),
        }
    }

    pub fn settings(&self) -> &TokenSettings {
        &self.settings
    }

    /// The status lists this authority's tokens name.
    pub fn status_lists(&self) -> &Arc<StatusLists> {
        &self.status
    }

    /// The next access token's status-list index and issue time (now).
    pub async fn next_access(&self) -> Result<NextAccess, TokenError> {
        let index = self.status.allocate().await?;
        Ok(NextAccess {
            index: Some(index),
            issued_at_ms: self.clock.now_ms(),
        })
    }

    /// A new family, bound to `binding` (the key of a device's DPoP proof) when there is
    /// one, and the first access token answered with it (its place is written with the
    /// family's row).
    pub(crate) async fn new_family(
        &self,
        binding: Option<Jkt>,
    ) -> Result<(NewFamily, NextAccess), TokenError> {
        let first = self.next_access().await?;
        let family = NewFamily {
            binding,
            first: Some(first),
            ..NewFamily::generate()?
        };
        Ok((family, first))
    }

    /// Signs a new access token for a device and family, bound to `binding` (DPoP) when
    /// the family is, at the time and status-list index of `next`.
    pub fn issue_access(
        &self,
        device: DeviceId,
        family: FamilyId,
        binding: Option<&Jkt>,
        next: NextAccess,
    ) -> Result<String, TokenError> {
        let now_s = next.issued_at_ms / 1000;
        let claims = AccessClaims {
            iss: self.settings.issuer.clone(),
            aud: self.settings.audience.clone(),
            sub: device,
            exp: now_s + self.settings.access_ttl.as_secs(),
            nbf: now_s,
            iat: now_s,
            jti: TokenId::generate()?,
            sid: family,
            scope: None,
            cnf: binding.map(|jkt| Confirmation { jkt: jkt.clone() }),
            status: next.index.map(|index| self.status.claim(index)),
        };
        let token = self.keys.sign(&claims)?;
        self.note_issued(family, claims.jti, claims.exp);
        Ok(token)
    }

    fn note_issued(&self, family: FamilyId, jti: TokenId, exp_s: u64) {
        let mut newest = self.newest.lock().unwrap_or_else(|p| p.into_inner());
        // Entries of expired tokens say nothing any more; they go in bulk when the map
        // reaches a power of two, so a sweep costs O(1) per issue.
        if newest.len() >= NEWEST_SWEEP_AT && newest.len().is_power_of_two() {
            let now_s = self.clock.now_ms() / 1000;
            newest.retain(|_, (_, exp)| *exp > now_s);
        }
        newest.insert(family, (jti, exp_s));
    }

    /// A front-door assertion for the app at `audience`: who passed (`subject`), which
    /// request (`method`, `path`, `request_id`), valid for `ASSERTION_LIFETIME`.
    pub(crate) fn assertion(
        &self,
        audience: String,
        subject: Option<String>,
        method: &str,
        path: &str,
        request_id: &str,
    ) -> Result<String, TokenError> {
        let now_s = self.clock.now_ms() / 1000;
        let claims = jwt::AssertionClaims {
            iss: self.settings.issuer.clone(),
            aud: audience,
            sub: subject,
            iat: now_s,
            exp: now_s + ASSERTION_LIFETIME.as_secs(),
            jti: request_id.to_string(),
            htm: method.to_string(),
            htu: path.to_string(),
        };
        Ok(self.keys.sign_assertion(&claims)?)
    }

    /// Whether a verified token still stands, its expiry aside: its signing key still
    /// verifies, and neither it, its family nor its device is revoked. For a relayed
    /// socket, checked after every change.
    pub(crate) fn stands(&self, verified: &Verified) -> bool {
        let now_ms = self.clock.now_ms();
        let claims = &verified.claims;
        self.keys
            .snapshot()
            .get(&verified.kid)
            .is_some_and(|key| key.verifies_at(now_ms))
            && self
                .revocations
                .check(&claims.jti, &claims.sid, &claims.sub)
                .is_ok()
    }

    /// The newest access token of `verified`'s family, if it is another one than
    /// `verified` and has time left: the device re-authenticated (refreshed its family)
    /// since the token a relayed socket holds. Its id and how long it has left.
    pub(crate) fn family_renewed(&self, verified: &Verified) -> Option<(TokenId, Duration)> {
        let now_ms = self.clock.now_ms();
        let (jti, exp_s) = *self
            .newest
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&verified.claims.sid)?;
        let expires_ms = exp_s.saturating_mul(1000);
        (jti != verified.claims.jti && expires_ms > now_ms)
            .then(|| (jti, Duration::from_millis(expires_ms - now_ms)))
    }

    /// Writes a new family and its first refresh token inside a caller's transaction
    /// (pairing creates the device, the family and the token in one commit).
    pub fn write_family_in(
        &self,
        tx: &WriteTx<'_>,
        new: &NewFamily,
        device: &DeviceId,
        now_ms: u64,
    ) -> Result<(), StoreError> {
        let expires = now_ms.saturating_add(millis(self.settings.refresh_ttl));
        tx.index_insert(
            &DEVICE_FAMILIES,
            &device_family_key(&device.to_string(), &new.family.to_string()),
        )?;
        tx.put(
            &TOKEN_FAMILIES,
            &new.family.to_string(),
            &TokenFamily {
                device_id: device.to_string(),
                created_at_ms: now_ms,
                generation: 1,
                refresh_expires_at_ms: expires,
                revoked_at_ms: None,
                revoke_reason: None,
                status: new
                    .first
                    .and_then(|first| first.slot(self.settings.access_ttl))
                    .into_iter()
                    .collect(),
            },
        )?;
        if let Some(jkt) = &new.binding {
            tx.put(
                &FAMILY_BINDINGS,
                &new.family.to_string(),
                &FamilyBinding {
                    jkt: jkt.as_str().to_string(),
                    bound_at_ms: now_ms,
                },
            )?;
        }
        tx.put(
            &REFRESH_TOKENS,
            &hash_key(&new.refresh.hash()),
            &RefreshToken {
                family_id: new.family.to_string(),
                device_id: device.to_string(),
                issued_at_ms: now_ms,
                expires_at_ms: expires,
                spent_at_ms: None,
            },
        )
    }

    /// Revokes, inside a caller's transaction, every family of `device` that is not
    /// revoked yet (a device paired again gets a new family in the same commit); returns
    /// them for `families_ended` once committed.
    pub(crate) fn end_families_in(
        &self,
        tx: &WriteTx<'_>,
        device: &DeviceId,
        reason: &str,
        now_ms: u64,
    ) -> Result<Vec<FamilyId>, StoreError> {
        let mut ended = Vec::new();
        let prefix = format!("{device}/");
        for key in tx.index_keys(&DEVICE_FAMILIES, &prefix, None, usize::MAX)? {
            let Some(id) = key.strip_prefix(&prefix).and_then(FamilyId::parse) else {
                continue;
            };
            let Some(mut family) = tx.get(&TOKEN_FAMILIES, &id.to_string())? else {
                continue;
            };
            if family.revoked_at_ms.is_none() {
                RevocationList::revoke_family_in(tx, &id, &mut family, reason, now_ms)?;
                ended.push(id);
            }
        }
        Ok(ended)
    }

    /// Mirrors the revocations `end_families_in` committed.
    pub(crate) fn families_ended(&self, families: Vec<FamilyId>) {
        for family in families {
            self.revocations.remember_family(family);
        }
    }

    /// Mirrors a family written by `write_family_in` once its transaction committed.
    pub(crate) fn family_committed(&self, family: FamilyId) {
        self.revocations.family_created(family);
    }

    /// The pair answered to a device: the access token `next` (bound to `binding`, when
    /// the family is) and the given refresh token.
    pub(crate) fn pair_for(
        &self,
        device: DeviceId,
        family: FamilyId,
        refresh: Secret,
        binding: Option<&Jkt>,
        next: NextAccess,
    ) -> Result<TokenPair, TokenError> {
        Ok(TokenPair {
            device_id: device,
            access_token: self.issue_access(device, family, binding, next)?,
            refresh_token: refresh.into_string(),
            token_type: if binding.is_some() { "DPoP" } else { "Bearer" }.into(),
            expires_in: self.settings.access_ttl.as_secs(),
        })
    }

    /// The refresh grant: spends `presented` and returns a new pair. A spent token
    /// revokes its family (durably) and is refused like any invalid one.
    ///
    /// A family bound to a key (DPoP) refreshes only with a proof by that key (`proof`,
    /// the thumbprint of the key of the request's checked proof); without one, or with
    /// another key's, nothing is spent and the answer is `invalid_dpop_proof`.
    pub(crate) async fn refresh(
        &self,
        presented: &str,
        proof: Option<&Jkt>,
        origin: &Origin,
    ) -> Result<TokenPair, TokenError> {
        if !Secret::well_formed(presented, REFRESH_PREFIX) {
            tracing::debug!(reason = "malformed", "refresh refused");
            self.audit_refused(origin, "malformed").await?;
            return Err(TokenError::InvalidGrant);
        }
        let key = hash_key(&crate::ids::secret_hash(presented.as_bytes()));
        // The device's refresh budget is spent before the grant is tried.
        let row = self.store.read(|tx| tx.get(&REFRESH_TOKENS, &key))?;
        let known = row.is_some();
        if let Some(device) = row.and_then(|row| DeviceId::parse(&row.device_id)) {
            self.limits
                .limit(PolicyId::Refresh, &Subject::Device(device))
                .map_err(TokenError::RateLimited)?;
        }
        let origin = origin.clone();
        // Generated outside the transaction, which may run twice.
        let next_refresh = Secret::generate(REFRESH_PREFIX)?;
        let stored_refresh = next_refresh.clone();
        // No index for a token that names no row: the grant fails in any case.
        let next = match known {
            true => self.next_access().await?,
            false => NextAccess {
                index: None,
                issued_at_ms: self.clock.now_ms(),
            },
        };
        let slot = next.slot(self.settings.access_ttl);
        let leeway = millis(self.settings.leeway);
        let now = next.issued_at_ms;
        let refresh_ttl = millis(self.settings.refresh_ttl);
        let journaled = self.revocations.journaled();
        let proof = proof.cloned();
        let outcome = self
            .store
            .write(move |tx| -> Result<RefreshOutcome, StoreError> {
                let refused = |reason: &'static str, device: Option<&str>| {
                    let mut event = Event::failure("token.refresh_failed").detail("reason", reason);
                    if let Some(device) = device {
                        event = event.device(device);
                    }
                    audit::append(tx, &origin, &event, now)?;
                    Ok::<_, StoreError>(RefreshOutcome::Refused(reason))
                };
                let Some(mut token) = tx.get(&REFRESH_TOKENS, &key)? else {
                    return refused("unknown", None);
                };
                let as_device = origin.as_actor(Actor::Device(token.device_id.clone()));
                let device_text = token.device_id.clone();
                let Some(family_id) = FamilyId::parse(&token.family_id) else {
                    return refused("bad family id", Some(&device_text));
                };
                let Some(mut family) = tx.get(&TOKEN_FAMILIES, &token.family_id)? else {
                    return refused("unknown family", Some(&device_text));
                };
                if token.spent_at_ms.is_some() {
                    let device = family.device_id.clone();
                    RevocationList::revoke_family_in(tx, &family_id, &mut family, "reuse", now)?;
                    let event = Event::failure("token.reused")
                        .severity(Severity::High)
                        .device(&device)
                        .detail("family", family_id.to_string())
                        .detail("family_revoked", true);
                    audit::append(tx, &as_device, &event, now)?;
                    return Ok(RefreshOutcome::Reused {
                        device,
                        family: family_id,
                    });
                }
                if family.revoked_at_ms.is_some() || journaled.contains(&family_id) {
                    return refused("family revoked", Some(&device_text));
                }
                if now >= token.expires_at_ms {
                    return refused("expired", Some(&device_text));
                }
                let Some(device_id) = DeviceId::parse(&token.device_id) else {
                    return refused("bad device id", Some(&device_text));
                };
                let Some(mut device) = tx.get(&DEVICES, &token.device_id)? else {
                    return refused("unknown device", Some(&device_text));
                };
                if device.revoked_at_ms.is_some() {
                    return refused("device revoked", Some(&device_text));
                }
                let binding = match tx.get(&FAMILY_BINDINGS, &token.family_id)? {
                    None => None,
                    Some(bound) => {
                        let bound = Jkt::parse(&bound.jkt);
                        if bound.is_none() || bound.as_ref() != proof.as_ref() {
                            let event = Event::failure("token.refresh_failed")
                                .device(&device_text)
                                .detail("reason", "no proof by the bound key");
                            audit::append(tx, &origin, &event, now)?;
                            return Ok(RefreshOutcome::Unbound);
                        }
                        bound
                    }
                };
                let live = status_list::keep_live(&family.status, slot, now, leeway);
                if live.len() > MAX_LIVE_ACCESS_TOKENS {
                    let oldest = live.iter().map(|s| s.expires_at_ms).min().unwrap_or(now);
                    let wait_ms = oldest.saturating_add(leeway).saturating_sub(now);
                    let event = Event::failure("token.refresh_failed")
                        .device(&device_text)
                        .detail("reason", "too many live access tokens");
                    audit::append(tx, &origin, &event, now)?;
                    return Ok(RefreshOutcome::Crowded(wait_ms.div_ceil(1000).max(1)));
                }
                token.spent_at_ms = Some(now);
                tx.put(&REFRESH_TOKENS, &key, &token)?;
                let expires = now.saturating_add(refresh_ttl);
                tx.put(
                    &REFRESH_TOKENS,
                    &hash_key(&stored_refresh.hash()),
                    &RefreshToken {
                        family_id: token.family_id.clone(),
                        device_id: token.device_id.clone(),
                        issued_at_ms: now,
                        expires_at_ms: expires,
                        spent_at_ms: None,
                    },
                )?;
                family.generation = family.generation.saturating_add(1);
                family.refresh_expires_at_ms = expires;
                family.status = live;
                tx.put(&TOKEN_FAMILIES, &token.family_id, &family)?;
                device.last_seen_ms = now;
                tx.put(&DEVICES, &token.device_id, &device)?;
                let event = Event::new("token.refreshed")
                    .device(&device_text)
                    .detail("family", family_id.to_string())
                    .detail("generation", family.generation);
                audit::append(tx, &as_device, &event, now)?;
                Ok(RefreshOutcome::Rotated {
                    device: device_id,
                    family: family_id,
                    binding,
                })
            })
            .await?;
        match outcome {
            RefreshOutcome::Rotated {
                device,
                family,
                binding,
            } => self.pair_for(device, family, next_refresh, binding.as_ref(), next),
            RefreshOutcome::Unbound => Err(TokenError::DpopKey),
            RefreshOutcome::Crowded(retry_after_s) => Err(TokenError::Crowded(retry_after_s)),
            RefreshOutcome::Reused { device, family } => {
                self.revocations.remember_family(family);
                tracing::error!(
                    severity = "high",
                    %family,
                    device = %device,
                    "a spent refresh token was presented again: the whole token family is revoked \
                     (a copy of the token is in someone else's hands, or the app replayed it)"
                );
                Err(TokenError::InvalidGrant)
            }
            RefreshOutcome::Refused(reason) => {
                tracing::debug!(reason, "refresh refused");
                Err(TokenError::InvalidGrant)
            }
        }
    }

    /// Records a refresh refused before any row was looked at.
    async fn audit_refused(&self, origin: &Origin, reason: &'static str) -> Result<(), StoreError> {
        let origin = origin.clone();
        let now = self.clock.now_ms();
        self.store
            .write(move |tx| {
                let event = Event::failure("token.refresh_failed").detail("reason", reason);
                audit::append(tx, &origin, &event, now).map(|_| ())
            })
            .await
    }

    /// Verifies a presented access token (see the module documentation for the order).
    pub fn verify(&self, token: &str) -> Result<Verified, Rejection> {
        let now_ms = self.clock.now_ms();
        let keys = self.keys.snapshot();
        let verified = if let Some(hit) = self.cache.get(token) {
            let key = keys.get(&hit.kid).ok_or(Rejection::UnknownKey)?;
            if !key.verifies_at(now_ms) {
                return Err(Rejection::KeyNotUsable);
            }
            hit
        } else {
            let parsed = jwt::parse(token).map_err(Rejection::Malformed)?;
            if parsed.header.typ != ACCESS_TOKEN_TYP {
                return Err(Rejection::WrongType);
            }
            let key = keys.get(&parsed.header.kid).ok_or(Rejection::UnknownKey)?;
            if parsed.header.alg != key.algorithm.jws_alg() {
                return Err(Rejection::AlgorithmMismatch);
            }
            if !key.verifies_at(now_ms) {
                return Err(Rejection::KeyNotUsable);
            }
            if !key.verify_signature(parsed.signing_input, parsed.signature) {
                return Err(Rejection::BadSignature);
            }
            let verified = Verified {
                claims: parsed.claims,
                kid: key.kid.clone(),
            };
            self.cache.insert(token, &verified);
            verified
        };
        self.check_claims(&verified.claims, now_ms)?;
        Ok(verified)
    }

    fn check_claims(&self, claims: &AccessClaims, now_ms: u64) -> Result<(), Rejection> {
        let at = |seconds: u64| seconds.saturating_mul(1000);
        // Issued under the identity this start replaced, and before the change.
        let earlier = self
            .settings
            .previous
            .as_ref()
            .filter(|p| at(claims.iat) <= p.changed_at_ms);
        if claims.iss != self.settings.issuer && earlier.is_none_or(|p| claims.iss != p.issuer) {
            return Err(Rejection::WrongIssuer);
        }
        if claims.aud != self.settings.audience
            && earlier.is_none_or(|p| p.audience.as_deref() != Some(claims.aud.as_str()))
        {
            return Err(Rejection::WrongAudience);
        }
        let leeway = millis(self.settings.leeway);
        if now_ms >= at(claims.exp).saturating_add(leeway) {
            return Err(Rejection::Expired);
        }
        if at(claims.nbf) > now_ms.saturating_add(leeway) {
            return Err(Rejection::NotYetValid);
        }
        if at(claims.iat) > now_ms.saturating_add(leeway) {
            return Err(Rejection::IssuedInFuture);
        }
        let longest = self
            .settings
            .access_ttl
            .saturating_add(self.settings.leeway)
            .as_secs();
        if claims.exp.saturating_sub(claims.iat) > longest {
            return Err(Rejection::LifetimeTooLong);
        }
        self.revocations
            .check(&claims.jti, &claims.sid, &claims.sub)
            .map_err(|refusal| match refusal {
                Refusal::UnknownFamily => Rejection::UnknownFamily,
                Refusal::Revoked => Rejection::Revoked,
            })
    }

    /// RFC 7662: what the caller may know about `token`. Anything not valid now is
    /// `{"active": false}` and nothing more.
    pub(crate) fn introspect(&self, token: &str) -> Introspection {
        if token.starts_with(REFRESH_PREFIX) {
            return self.introspect_refresh(token);
        }
        match self.verify(token) {
            Ok(Verified { claims, .. }) => Introspection {
                active: true,
                token_type: Some("access_token".into()),
                iss: Some(claims.iss),
                aud: Some(claims.aud),
                sub: Some(claims.sub.to_string()),
                exp: Some(claims.exp),
                nbf: Some(claims.nbf),
                iat: Some(claims.iat),
                jti: Some(claims.jti.to_string()),
                sid: Some(claims.sid.to_string()),
                // This server issues no scope: a claim it never wrote is not repeated.
                scope: None,
                cnf: claims.cnf,
            },
            Err(reason) => {
                tracing::debug!(reason = reason.code(), "introspection: inactive");
                Introspection::default()
            }
        }
    }

    fn introspect_refresh(&self, presented: &str) -> Introspection {
        if !Secret::well_formed(presented, REFRESH_PREFIX) {
            return Introspection::default();
        }
        let key = hash_key(&crate::ids::secret_hash(presented.as_bytes()));
        let now = self.clock.now_ms();
        let found = self.store.read(|tx| {
            let Some(token) = tx.get(&REFRESH_TOKENS, &key)? else {
                return Ok(None);
            };
            let family = tx.get(&TOKEN_FAMILIES, &token.family_id)?;
            Ok::<_, StoreError>(Some((token, family)))
        });
        match found {
            Ok(Some((token, Some(family))))
                if token.spent_at_ms.is_none()
                    && family.revoked_at_ms.is_none()
                    && FamilyId::parse(&token.family_id)
                        .is_some_and(|f| !self.revocations.journaled().contains(&f))
                    && now < token.expires_at_ms
                    && DeviceId::parse(&token.device_id)
                        .is_some_and(|d| !self.revocations.is_device_revoked(&d)) =>
            {
                Introspection {
                    active: true,
                    token_type: Some("refresh_token".into()),
                    iss: Some(self.settings.issuer.clone()),
                    sub: Some(token.device_id),
                    exp: Some(token.expires_at_ms / 1000),
                    iat: Some(token.issued_at_ms / 1000),
                    sid: Some(token.family_id),
                    ..Introspection::default()
                }
            }
            Ok(_) => Introspection::default(),
            Err(err) => {
                tracing::error!(error = %err, "introspection: store read failed");
                Introspection::default()
            }
        }
    }

    /// RFC 7009: revokes `token` if it is one of ours. A refresh token takes its family
    /// (and so every access token from it) with it; an access token is revoked alone.
    /// Unknown, invalid or expired tokens are not an error: there is nothing to revoke.
    /// Durable when this returns.
    pub(crate) async fn revoke(&self, token: &str, origin: &Origin) -> Result<bool, TokenError> {
        if token.starts_with(REFRESH_PREFIX) {
            if !Secret::well_formed(token, REFRESH_PREFIX) {
                return Ok(false);
            }
            let key = hash_key(&crate::ids::secret_hash(token.as_bytes()));
            let Some(row) = self.store.read(|tx| tx.get(&REFRESH_TOKENS, &key))? else {
                return Ok(false);
            };
            let Some(family) = FamilyId::parse(&row.family_id) else {
                return Ok(false);
            };
            return Ok(self
                .revocations
                .revoke_family(family, "revoked", origin)
                .await?);
        }
        match self.verify(token) {
            Ok(Verified { claims, .. }) => {
                self.revocations
                    .revoke_token(
                        claims.jti,
                        claims.sub,
                        claims.exp.saturating_mul(1000),
                        claims.status.as_ref().and_then(StatusIndex::of_claim),
                        origin,
                    )
                    .await?;
                Ok(true)
            }
            Err(Rejection::Revoked) => Ok(false),
            Err(reason) => {
                tracing::debug!(reason = reason.code(), "revoke: not a valid token of ours");
                Ok(false)
            }
        }
    }

    /// Deletes refresh tokens and families that can no longer be used, and revocation
    /// entries whose tokens have expired. For the scheduler.
    pub async fn prune_expired(&self) -> Result<u64, TokenError> {
        // Journaled revocations first, so that their families' rows say when they were
        // revoked and go once their window has passed.
        self.revocations.fold_journal().await?;
        let now = self.clock.now_ms();
        let window = millis(self.settings.access_window());
        let refresh = self
            .store
            .write(move |tx| -> Result<(u64, Vec<FamilyId>), StoreError> {
                let tokens = tx.retain(&REFRESH_TOKENS, |_, t| t.expires_at_ms > now)?;
                // A family is kept while its refresh token lives, and while an access
                // token it issued could still be presented.
                let mut gone = Vec::new();
                let mut deleted = Vec::new();
                let families = tx.retain(&TOKEN_FAMILIES, |id, f| {
                    let keep = f.refresh_expires_at_ms.saturating_add(window) > now
                        && f.revoked_at_ms
                            .is_none_or(|at| at.saturating_add(window) > now);
                    if !keep {
                        gone.push(device_family_key(&f.device_id, id));
                        deleted.extend(FamilyId::parse(id));
                    }
                    keep
                })?;
                for key in &gone {
                    tx.index_remove(&DEVICE_FAMILIES, key)?;
                }
                Ok((tokens + families, deleted))
            })
            .await?;
        let (refresh, deleted) = refresh;
        self.revocations.families_deleted(&deleted);
        let revocations = self.revocations.prune(self.settings.leeway).await?;
        let bits = self.status.prune(self.settings.leeway).await?;
        Ok(refresh + revocations + bits)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn verified(n: u8) -> Verified {
        Verified {
            claims: AccessClaims {
                iss: "i".into(),
                aud: "a".into(),
                sub: DeviceId::from_bytes([n; 16]),
                exp: 1,
                nbf: 1,
                iat: 1,
                jti: TokenId::from_bytes([n; 16]),
                sid: FamilyId::from_bytes([n; 16]),
                scope: None,
                cnf: None,
                status: None,
            },
            kid: "k".into(),
        }
    }

    #[test]
    fn a_full_cache_forgets_its_oldest_entries_and_keeps_caching() {
        let cache = VerifiedCache::default();
        let total = CACHE_SHARDS * CACHE_PER_SHARD * 3;
        let tokens: Vec<String> = (0..total).map(|i| format!("h.p.sig{i}")).collect();
        for token in &tokens {
            cache.insert(token, &verified(1));
        }
        let hits = |range: std::ops::Range<usize>| {
            tokens[range]
                .iter()
                .filter(|t| cache.get(t).is_some())
                .count()
        };
        // The newest tokens are cached (shards fill unevenly, so allow some slack)...
        let newest = CACHE_SHARDS * CACHE_PER_SHARD / 2;
        assert!(hits(total - newest..total) >= newest * 95 / 100);
        // ...and the oldest ones were forgotten.
        assert_eq!(hits(0..newest), 0);
        // New tokens keep being cached after the cache filled up.
        cache.insert("h.p.fresh", &verified(2));
        assert!(cache.get("h.p.fresh").is_some());
        assert!(cache.get("h.x.fresh").is_none(), "whole token must match");
    }
}
