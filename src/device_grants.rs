//! Device authorization grants (RFC 8628): how a device with no camera becomes a device.
//!
//! A bot, a CLI or a TV asks for a grant (`start`) and gets two codes: a device code it
//! keeps (a grant id and a secret of 256 random bits, stored only as SHA-256) and a
//! short user code it shows (8 letters from an alphabet without vowels or look-alikes,
//! `BCDF-GHJK`, stored only as SHA-256 too). An operator types the user code into the
//! admin UI or `gatehouse pair approve`, which creates the device (`approve`), or refuses
//! it (`deny`). Meanwhile the device polls the token endpoint (`poll`): too early is
//! `slow_down` and adds 5 seconds to its interval, then `authorization_pending` until the
//! operator decides; after an approval the first poll takes the device's first token
//! pair, exactly once. A device code presented again after that revokes what it issued:
//! it has leaked.
//!
//! Wrong device codes and wrong user codes count toward the caller's lockout, as wrong
//! pairing secrets do. This module must not know HTTP.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::audit::{self, Actor, Event, Origin, Severity};
use crate::clock::{SharedClock, format_rfc3339, millis};
use crate::dpop::Jkt;
use crate::error_kind::{Classify, ErrorKind};
use crate::ids::{
    DeviceGrantId, DeviceId, RandomError, Secret, hash_matches, random_bytes, secret_hash,
};
use crate::pairing::device_name;
use crate::ratelimit::{FailedCheck, Limited, Lockout, PolicyId, RateLimits, Subject};
use crate::store::records::{Device, DeviceGrant, DeviceGrantState};
use crate::store::{
    DEVICE_GRANT_CODES, DEVICE_GRANTS, DEVICES, DEVICES_BY_AGE, Store, StoreError, WriteTx,
    device_age_key, device_grant_code_key,
};
use crate::tokens::{TokenAuthority, TokenError, TokenPair};

/// The grant type of the token request that polls (RFC 8628 section 3.4).
pub const DEVICE_CODE_GRANT: &str = "urn:ietf:params:oauth:grant-type:device_code";

/// User codes are drawn from these 20 consonants (RFC 8628 section 6.1): no vowels, so
/// no words; no look-alikes such as 0/O or 1/I.
const USER_CODE_ALPHABET: &[u8; 20] = b"BCDFGHJKLMNPQRSTVWXZ";
/// Characters in a user code: 20^8, about 2^34.6 codes.
const USER_CODE_LEN: usize = 8;
/// What `slow_down` adds to a device's interval (RFC 8628 section 3.5).
const SLOW_DOWN: u32 = 5;
/// The longest interval a device is asked to keep, however often it was told to slow down.
const MAX_INTERVAL_SECS: u32 = 300;
/// A presented device code longer than this is wrong without being hashed.
const MAX_DEVICE_CODE_LEN: usize = 160;
/// Grants are kept this long after they expire (for operators and the log), then pruned.
const KEEP_EXPIRED: Duration = Duration::from_secs(24 * 3600);
/// Grants read (and pruned, in one transaction) at a time.
const PRUNE_PAGE: usize = 1024;
/// The platform a device made by a grant is listed with.
const PLATFORM: &str = "device-grant";

#[derive(Debug, thiserror::Error)]
pub enum DeviceGrantError {
    /// RFC 8628 section 3.5: no decision yet; poll again after the interval.
    #[error("the operator has not approved this device yet; poll again after the interval")]
    Pending,
    /// RFC 8628 section 3.5: polled too early; the interval grew to this many seconds.
    #[error("polling too fast: wait at least {0} seconds between requests")]
    SlowDown(u32),
    #[error("the operator denied this device")]
    Denied,
    #[error("the device code has expired; start again with a new device authorization request")]
    Expired,
    /// Unknown, wrong or spent device code: deliberately one variant.
    #[error("the device code is invalid, was already used, or its device was revoked")]
    InvalidGrant,
    /// The typed user code names no grant (or is not a user code at all).
    #[error("no device is waiting with this user code; check the code the device shows")]
    UnknownCode,
    #[error("this device was already {0}; a user code is used once")]
    Decided(&'static str),
    #[error("this user code has expired; the device must start again")]
    CodeExpired,
    #[error("bad device name: {0}")]
    BadName(String),
    #[error("bad client_id: {0}")]
    BadClientId(String),
    #[error(
        "this server binds every device's tokens to its key (tokens.require_dpop): send a DPoP \
         proof with the request"
    )]
    DpopRequired,
    #[error("too many device authorization requests from this address")]
    RateLimited(Box<Limited>),
    #[error("this address is locked out")]
    Banned(Duration),
    #[error(transparent)]
    Random(#[from] RandomError),
    #[error(transparent)]
    Token(#[from] TokenError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl Classify for DeviceGrantError {
    fn kind(&self) -> ErrorKind {
        match self {
            Self::Pending
            | Self::SlowDown(_)
            | Self::Denied
            | Self::Expired
            | Self::InvalidGrant
            | Self::BadName(_)
            | Self::BadClientId(_)
            | Self::DpopRequired => ErrorKind::Invalid,
            Self::UnknownCode => ErrorKind::NotFound,
            Self::Decided(_) => ErrorKind::Conflict,
            Self::CodeExpired => ErrorKind::Gone,
            Self::RateLimited(_) => ErrorKind::RateLimited,
            Self::Banned(_) => ErrorKind::Banned,
            Self::Random(_) => ErrorKind::Internal,
            Self::Token(err) => err.kind(),
            Self::Store(err) => err.kind(),
        }
    }

    fn code(&self) -> &'static str {
        match self {
            // RFC 8628 section 3.5 and RFC 6749 section 5.2 name these codes.
            Self::Pending => "authorization_pending",
            Self::SlowDown(_) => "slow_down",
            Self::Denied => "access_denied",
            Self::Expired => "expired_token",
            Self::InvalidGrant => "invalid_grant",
            Self::BadClientId(_) => "invalid_request",
            Self::DpopRequired => "invalid_dpop_proof",
            Self::UnknownCode => "unknown_user_code",
            Self::Token(err) => err.code(),
            other => other.kind().code(),
        }
    }
}

/// What a device gets from `POST /v1/device_authorization` (RFC 8628 section 3.2).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NewGrant {
    pub device_code: String,
    pub user_code: String,
    pub verification_uri: String,
    pub verification_uri_complete: String,
    pub expires_in: u64,
    pub interval: u64,
}

/// A grant as an operator sees it (never its codes).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrantView {
    pub id: String,
    /// `pending`, `approved`, `denied`, `issued` or `expired`.
    pub status: String,
    pub client_id: Option<String>,
    pub requested_from: String,
    pub created_at: String,
    pub expires_at: String,
    /// The device an approval created.
    pub device_id: Option<String>,
    /// The device's name, once approved.
    pub device_name: Option<String>,
}

/// The settings of the grant.
#[derive(Debug, Clone)]
pub struct GrantSettings {
    /// Where the operator types the user code: the issuer's `/admin/device`.
    pub verification_uri: String,
    /// How long a device code and its user code live.
    pub ttl: Duration,
    /// The polling interval a device starts with.
    pub interval: Duration,
}

#[derive(Debug)]
pub struct DeviceGrants {
    store: Store,
    clock: SharedClock,
    tokens: Arc<TokenAuthority>,
    settings: GrantSettings,
    /// Requests spend from their address's `pairing` budget, as pairing attempts do.
    limits: Arc<RateLimits>,
    /// Wrong device codes and wrong user codes count toward a ban of the caller's address.
    lockout: Arc<Lockout>,
}

/// What the poll transaction decided.
enum Polled {
    Pending,
    SlowDown(u32),
    Issued,
    /// The state changed under the poll (another node, a concurrent poll): try again.
    Changed,
    Gone,
}

impl DeviceGrants {
    pub(crate) fn new(
        store: Store,
        clock: SharedClock,
        tokens: Arc<TokenAuthority>,
        settings: GrantSettings,
        limits: Arc<RateLimits>,
        lockout: Arc<Lockout>,
    ) -> Self {
        Self {
            store,
            clock,
            tokens,
            settings,
            limits,
            lockout,
        }
    }

    /// Opens a grant for a device that asks (RFC 8628 section 3.1). Durable when this
    /// returns.
    pub async fn start(
        &self,
        client_id: Option<&str>,
        origin: &Origin,
    ) -> Result<NewGrant, DeviceGrantError> {
        let peer = origin.source.unwrap_or(IpAddr::from([0, 0, 0, 0]));
        if let Some(left) = self.lockout.banned(peer) {
            return Err(DeviceGrantError::Banned(left));
        }
        if let Err(limited) = self.limits.limit(PolicyId::Pairing, &Subject::ip(peer)) {
            return Err(DeviceGrantError::RateLimited(limited));
        }
        let client_id = client_id
            .map(|id| {
                client_id_text(id).ok_or_else(|| {
                    DeviceGrantError::BadClientId(
                        "1 to 64 printable ASCII characters (RFC 6749's VSCHAR), not starting or \
                         ending with a space"
                            .into(),
                    )
                })
            })
            .transpose()?;
        let id = DeviceGrantId::generate()?;
        let secret = Secret::generate("")?;
        let now = self.clock.now_ms();
        let expires_at_ms = now.saturating_add(millis(self.settings.ttl));
        let interval_secs = u32::try_from(self.settings.interval.as_secs()).unwrap_or(u32::MAX);
        let key = id.to_string();
        // A user code already held by a live grant is drawn again; with at most a few
        // thousand grants open among 2^34 codes, a second draw is rare and a third unseen.
        for _ in 0..8 {
            let user_code = UserCode::generate()?;
            let record = DeviceGrant {
                secret_hash: secret.hash(),
                user_code_hash: user_code.hash(),
                client_id: client_id.clone(),
                requested_from: peer.to_string(),
                created_at_ms: now,
                expires_at_ms,
                interval_secs,
                last_poll_ms: None,
                state: DeviceGrantState::Pending,
            };
            let event = Event::new("pairing.device_requested")
                .detail("grant", key.clone())
                .detail("client_id", client_id.clone())
                .detail("expires_at", format_rfc3339(expires_at_ms));
            let (origin, key) = (origin.clone(), key.clone());
            let code_hash = user_code.hash();
            let stored = self
                .store
                .write(move |tx| {
                    if grant_of(tx, &code_hash)?.is_some() {
                        return Ok::<_, StoreError>(false);
                    }
                    tx.put(&DEVICE_GRANTS, &key, &record)?;
                    tx.index_insert(
                        &DEVICE_GRANT_CODES,
                        &device_grant_code_key(&code_hash, &key),
                    )?;
                    audit::append(tx, &origin, &event, now)?;
                    Ok(true)
                })
                .await?;
            if stored {
                let shown = user_code.display();
                return Ok(NewGrant {
                    device_code: format!("{id}.{}", secret.as_str()),
                    verification_uri_complete: format!(
                        "{}?user_code={shown}",
                        self.settings.verification_uri
                    ),
                    user_code: shown,
                    verification_uri: self.settings.verification_uri.clone(),
                    expires_in: self.settings.ttl.as_secs(),
                    interval: u64::from(interval_secs),
                });
            }
        }
        Err(DeviceGrantError::Store(StoreError::Conflict))
    }

    /// The device's poll (RFC 8628 section 3.4): its first token pair once an operator
    /// approved it, else the error that says why not.
    ///
    /// The tokens are bound to `binding` (the key of the request's checked DPoP proof)
    /// if there is one.
    pub async fn poll(
        &self,
        device_code: &str,
        binding: Option<Jkt>,
        origin: &Origin,
    ) -> Result<TokenPair, DeviceGrantError> {
        let peer = origin.source.unwrap_or(IpAddr::from([0, 0, 0, 0]));
        if let Some(left) = self.lockout.banned(peer) {
            return Err(DeviceGrantError::Banned(left));
        }
        let parsed = parse_device_code(device_code);
        let found = match &parsed {
            Some((id, _)) => self
                .store
                .read(|tx| tx.get(&DEVICE_GRANTS, &id.to_string()))?,
            None => None,
        };
        let presented = match &parsed {
            Some((_, secret)) => secret_hash(secret.as_bytes()),
            None => secret_hash(b""),
        };
        let matches = hash_matches(found.as_ref().map(|g| &g.secret_hash), &presented);
        let (Some((id, _)), Some(grant), true) = (parsed, found, matches) else {
            return Err(self
                .refuse(
                    origin,
                    FailedCheck::DeviceCode,
                    "wrong device code",
                    Event::failure("pairing.device_poll_failed"),
                )
                .await);
        };
        let now = self.clock.now_ms();
        match grant.state {
            DeviceGrantState::Issued { device_id, .. } => self.reused(id, &device_id, origin).await,
            _ if now >= grant.expires_at_ms => Err(DeviceGrantError::Expired),
            DeviceGrantState::Denied { .. } => Err(DeviceGrantError::Denied),
            DeviceGrantState::Pending => match self.note_poll(id, now).await? {
                Polled::SlowDown(interval) => Err(DeviceGrantError::SlowDown(interval)),
                Polled::Gone => Err(DeviceGrantError::InvalidGrant),
                Polled::Pending | Polled::Changed | Polled::Issued => {
                    Err(DeviceGrantError::Pending)
                }
            },
            DeviceGrantState::Approved { device_id, .. } => {
                let device = DeviceId::parse(&device_id).ok_or(DeviceGrantError::InvalidGrant)?;
                if binding.is_none() && self.tokens.settings().require_dpop {
                    return Err(DeviceGrantError::DpopRequired);
                }
                self.issue(id, device, binding, origin, now).await
            }
        }
    }

    /// Records a poll of a pending grant: `slow_down` when it came before the interval.
    async fn note_poll(&self, id: DeviceGrantId, now: u64) -> Result<Polled, DeviceGrantError> {
        let key = id.to_string();
        Ok(self
            .store
            .write(move |tx| {
                let Some(mut grant) = tx.get(&DEVICE_GRANTS, &key)? else {
                    return Ok::<_, StoreError>(Polled::Gone);
                };
                if grant.state != DeviceGrantState::Pending {
                    return Ok(Polled::Changed);
                }
                let early = grant.last_poll_ms.is_some_and(|last| {
                    now < last.saturating_add(u64::from(grant.interval_secs) * 1000)
                });
                grant.last_poll_ms = Some(now);
                let polled = if early {
                    grant.interval_secs = grant
                        .interval_secs
                        .saturating_add(SLOW_DOWN)
                        .min(MAX_INTERVAL_SECS);
                    Polled::SlowDown(grant.interval_secs)
                } else {
                    Polled::Pending
                };
                tx.put(&DEVICE_GRANTS, &key, &grant)?;
                Ok(polled)
            })
            .await?)
    }

    /// Issues an approved grant's first token pair, once: the grant is spent in the
    /// commit that writes the family.
    async fn issue(
        &self,
        id: DeviceGrantId,
        device: DeviceId,
        binding: Option<Jkt>,
        origin: &Origin,
        now: u64,
    ) -> Result<TokenPair, DeviceGrantError> {
        let (family, first) = self.tokens.new_family(binding).await?;
        let stored_family = family.clone();
        let tokens = self.tokens.clone();
        let key = id.to_string();
        let device_origin = origin.as_actor(Actor::Device(device.to_string()));
        let issued = Event::new("token.issued")
            .device(device)
            .detail("family", family.family.to_string())
            .detail("grant", "device_code")
            .detail("device_grant", key.clone());
        let polled = self
            .store
            .write(move |tx| {
                let Some(mut grant) = tx.get(&DEVICE_GRANTS, &key)? else {
                    return Ok::<_, StoreError>(Polled::Gone);
                };
                let DeviceGrantState::Approved { device_id, .. } = &grant.state else {
                    return Ok(Polled::Changed);
                };
                if *device_id != device.to_string() || now >= grant.expires_at_ms {
                    return Ok(Polled::Gone);
                }
                let live = tx
                    .get(&DEVICES, device_id)?
                    .is_some_and(|d| d.revoked_at_ms.is_none());
                if !live {
                    return Ok(Polled::Gone);
                }
                grant.state = DeviceGrantState::Issued {
                    device_id: device_id.clone(),
                    family_id: stored_family.family.to_string(),
                    at_ms: now,
                };
                grant.last_poll_ms = Some(now);
                tx.put(&DEVICE_GRANTS, &key, &grant)?;
                tokens.write_family_in(tx, &stored_family, &device, now)?;
                audit::append(tx, &device_origin, &issued, now)?;
                Ok(Polled::Issued)
            })
            .await?;
        match polled {
            Polled::Issued => {
                self.tokens.family_committed(family.family);
                tracing::info!(grant = %id, %device, "device paired by a device grant");
                Ok(self.tokens.pair_for(
                    device,
                    family.family,
                    family.refresh,
                    family.binding.as_ref(),
                    first,
                )?)
            }
            // Spent by a concurrent poll, expired, or the device revoked meanwhile.
            Polled::Changed | Polled::Gone | Polled::Pending | Polled::SlowDown(_) => {
                Err(DeviceGrantError::InvalidGrant)
            }
        }
    }

    /// A spent device code presented again has leaked: every token family of the device
    /// it made is revoked, as refresh-token reuse revokes its family.
    async fn reused(
        &self,
        id: DeviceGrantId,
        device: &str,
        origin: &Origin,
    ) -> Result<TokenPair, DeviceGrantError> {
        let Some(device) = DeviceId::parse(device) else {
            return Err(DeviceGrantError::InvalidGrant);
        };
        let tokens = self.tokens.clone();
        let now = self.clock.now_ms();
        let event = Event::failure("token.reused")
            .severity(Severity::High)
            .device(device)
            .detail("device_grant", id.to_string())
            .detail("grant", "device_code");
        let origin = origin.clone();
        let ended = self
            .store
            .write(move |tx| {
                let ended = tokens.end_families_in(tx, &device, "device code reused", now)?;
                let event = event.clone().detail("families_revoked", ended.len());
                audit::append(tx, &origin, &event, now)?;
                Ok::<_, StoreError>(ended)
            })
            .await?;
        tracing::warn!(grant = %id, %device, families = ended.len(), "a spent device code was presented again");
        self.tokens.families_ended(ended);
        Err(DeviceGrantError::InvalidGrant)
    }

    /// The grant a user code names, for an operator about to decide.
    pub async fn lookup(
        &self,
        user_code: &str,
        origin: &Origin,
    ) -> Result<GrantView, DeviceGrantError> {
        let (id, grant) = self.find(user_code, origin, "lookup").await?;
        let name = self.device_name_of(&grant)?;
        Ok(view(&id, &grant, name, self.clock.now_ms()))
    }

    /// Approves the grant a user code names: creates its device (named `name`, or after
    /// the client id), whose tokens wait for the device's next poll. Durable when this
    /// returns.
    pub async fn approve(
        &self,
        user_code: &str,
        name: Option<&str>,
        origin: &Origin,
    ) -> Result<GrantView, DeviceGrantError> {
        let name = name
            .map(|n| {
                device_name(n).ok_or_else(|| {
                    DeviceGrantError::BadName(
                        "1 to 64 characters without control or bidirectional control characters"
                            .into(),
                    )
                })
            })
            .transpose()?;
        let (id, grant) = self.find(user_code, origin, "approve").await?;
        let now = self.clock.now_ms();
        undecided(&grant, now)?;
        let name = name
            .or_else(|| grant.client_id.as_deref().and_then(device_name))
            .unwrap_or_else(|| format!("device {}", &id.to_string()[3..11]));
        let device_id = DeviceId::generate()?;
        let key = id.to_string();
        let by = origin.actor.to_text();
        let record = Device {
            name: name.clone(),
            platform: PLATFORM.into(),
            app_version: grant.client_id.clone().unwrap_or_else(|| "-".into()),
            created_at_ms: now,
            last_seen_ms: now,
            paired_from: grant.requested_from.clone(),
            pairing_session: key.clone(),
            revoked_at_ms: None,
        };
        let event = Event::new("pairing.approved")
            .device(device_id)
            .detail("grant", key.clone())
            .detail("name", name.clone())
            .detail("client_id", grant.client_id.clone())
            .detail("requested_from", grant.requested_from.clone());
        let decided = self
            .decide(&id, now, origin, event, move |tx| {
                let id = device_id.to_string();
                tx.put(&DEVICES, &id, &record)?;
                tx.index_insert(&DEVICES_BY_AGE, &device_age_key(now, &id))?;
                Ok(DeviceGrantState::Approved {
                    device_id: id,
                    by: by.clone(),
                    at_ms: now,
                })
            })
            .await?;
        tracing::info!(grant = %id, device = %device_id, "device grant approved");
        Ok(view(&id, &decided, Some(name), now))
    }

    /// Denies the grant a user code names: the device's next poll gets `access_denied`.
    pub async fn deny(
        &self,
        user_code: &str,
        origin: &Origin,
    ) -> Result<GrantView, DeviceGrantError> {
        let (id, grant) = self.find(user_code, origin, "deny").await?;
        let now = self.clock.now_ms();
        undecided(&grant, now)?;
        let key = id.to_string();
        let by = origin.actor.to_text();
        let event = Event::new("pairing.denied")
            .detail("grant", key.clone())
            .detail("client_id", grant.client_id.clone())
            .detail("requested_from", grant.requested_from.clone());
        let decided = self
            .decide(&id, now, origin, event, move |_| {
                Ok(DeviceGrantState::Denied {
                    by: by.clone(),
                    at_ms: now,
                })
            })
            .await?;
        Ok(view(&id, &decided, None, now))
    }

    /// Records an operator's decision on a grant that must still be undecided when the
    /// write runs (checked again inside it): `decision` writes what goes with it and
    /// gives the new state; `event` is audited in the same commit.
    async fn decide(
        &self,
        id: &DeviceGrantId,
        now: u64,
        origin: &Origin,
        event: Event,
        mut decision: impl FnMut(&WriteTx<'_>) -> Result<DeviceGrantState, StoreError> + Send + 'static,
    ) -> Result<DeviceGrant, DeviceGrantError> {
        let key = id.to_string();
        let origin = origin.clone();
        self.store
            .write(move |tx| {
                let Some(mut grant) = tx.get(&DEVICE_GRANTS, &key)? else {
                    return Ok::<_, StoreError>(Err(DeviceGrantError::UnknownCode));
                };
                if let Err(err) = undecided(&grant, now) {
                    return Ok(Err(err));
                }
                grant.state = decision(tx)?;
                tx.put(&DEVICE_GRANTS, &key, &grant)?;
                audit::append(tx, &origin, &event, now)?;
                Ok(Ok(grant))
            })
            .await?
    }

    /// The grant of a typed user code; a code that names none counts toward the
    /// caller's lockout.
    async fn find(
        &self,
        user_code: &str,
        origin: &Origin,
        action: &'static str,
    ) -> Result<(DeviceGrantId, DeviceGrant), DeviceGrantError> {
        let found = match UserCode::parse(user_code) {
            Some(code) => {
                let hash = code.hash();
                self.store.read(|tx| grant_of(tx, &hash))?
            }
            None => None,
        };
        match found {
            Some(found) => Ok(found),
            None => Err(self
                .refuse(
                    origin,
                    FailedCheck::UserCode,
                    "wrong user code",
                    Event::failure("pairing.user_code_failed").detail("action", action),
                )
                .await),
        }
    }

    fn device_name_of(&self, grant: &DeviceGrant) -> Result<Option<String>, DeviceGrantError> {
        let device = match &grant.state {
            DeviceGrantState::Approved { device_id, .. }
            | DeviceGrantState::Issued { device_id, .. } => device_id.clone(),
            DeviceGrantState::Pending | DeviceGrantState::Denied { .. } => return Ok(None),
        };
        Ok(self
            .store
            .read(|tx| tx.get(&DEVICES, &device))?
            .map(|d| d.name))
    }

    /// Records a wrong code (audited, and counted toward the caller's lockout) and gives
    /// the error every such refusal shares.
    async fn refuse(
        &self,
        origin: &Origin,
        check: FailedCheck,
        reason: &'static str,
        event: Event,
    ) -> DeviceGrantError {
        tracing::debug!(reason, "device grant refused");
        let event = event.detail("reason", reason);
        match self
            .lockout
            .record_failure(&self.limits, origin, check, event)
            .await
        {
            Ok(_) => match check {
                FailedCheck::UserCode => DeviceGrantError::UnknownCode,
                _ => DeviceGrantError::InvalidGrant,
            },
            Err(err) => DeviceGrantError::Store(err),
        }
    }

    /// Deletes grants (and their user-code rows) that expired more than a day ago. For
    /// the scheduler.
    pub(crate) async fn prune_expired(&self) -> Result<u64, DeviceGrantError> {
        let cutoff = self.clock.now_ms().saturating_sub(millis(KEEP_EXPIRED));
        let mut pruned = 0;
        let mut after: Option<String> = None;
        // Read a page at a time and delete what it holds in a transaction of its own:
        // anyone may ask for grants, so the table may be large, and neither the memory
        // nor the writer's time may grow with it.
        loop {
            let page = self
                .store
                .read(|tx| tx.prefixed(&DEVICE_GRANTS, "", after.as_deref(), PRUNE_PAGE))?;
            let last_page = page.len() < PRUNE_PAGE;
            after = page.last().map(|(key, _)| key.clone());
            let doomed: Vec<String> = page
                .into_iter()
                .filter(|(_, grant)| grant.expires_at_ms <= cutoff)
                .map(|(key, _)| key)
                .collect();
            if !doomed.is_empty() {
                pruned += self
                    .store
                    .write(move |tx| {
                        let mut gone = 0;
                        for key in &doomed {
                            // Read again inside the transaction: it is the one that counts.
                            let Some(grant) = tx.get(&DEVICE_GRANTS, key)? else {
                                continue;
                            };
                            if grant.expires_at_ms <= cutoff {
                                tx.delete(&DEVICE_GRANTS, key)?;
                                tx.index_remove(
                                    &DEVICE_GRANT_CODES,
                                    &device_grant_code_key(&grant.user_code_hash, key),
                                )?;
                                gone += 1;
                            }
                        }
                        Ok::<_, StoreError>(gone)
                    })
                    .await?;
            }
            if last_page {
                return Ok(pruned);
            }
        }
    }
}

/// The grant whose user code hashes to `hash`, if one holds it.
fn grant_of(
    tx: &crate::store::ReadTx<'_>,
    hash: &[u8; 32],
) -> Result<Option<(DeviceGrantId, DeviceGrant)>, StoreError> {
    let prefix = device_grant_code_key(hash, "");
    for key in tx.index_keys(&DEVICE_GRANT_CODES, &prefix, None, 4)? {
        let Some(id) = key.strip_prefix(&prefix).and_then(DeviceGrantId::parse) else {
            continue;
        };
        if let Some(grant) = tx.get(&DEVICE_GRANTS, &id.to_string())? {
            return Ok(Some((id, grant)));
        }
    }
    Ok(None)
}

/// Whether an operator may still decide on `grant`.
fn undecided(grant: &DeviceGrant, now: u64) -> Result<(), DeviceGrantError> {
    match grant.state {
        DeviceGrantState::Pending if now >= grant.expires_at_ms => {
            Err(DeviceGrantError::CodeExpired)
        }
        DeviceGrantState::Pending => Ok(()),
        DeviceGrantState::Approved { .. } | DeviceGrantState::Issued { .. } => {
            Err(DeviceGrantError::Decided("approved"))
        }
        DeviceGrantState::Denied { .. } => Err(DeviceGrantError::Decided("denied")),
    }
}

fn view(id: &DeviceGrantId, grant: &DeviceGrant, name: Option<String>, now: u64) -> GrantView {
    let (status, device_id) = match &grant.state {
        DeviceGrantState::Pending if now >= grant.expires_at_ms => ("expired", None),
        DeviceGrantState::Pending => ("pending", None),
        DeviceGrantState::Approved { device_id, .. } => ("approved", Some(device_id.clone())),
        DeviceGrantState::Denied { .. } => ("denied", None),
        DeviceGrantState::Issued { device_id, .. } => ("issued", Some(device_id.clone())),
    };
    GrantView {
        id: id.to_string(),
        status: status.into(),
        client_id: grant.client_id.clone(),
        requested_from: grant.requested_from.clone(),
        created_at: format_rfc3339(grant.created_at_ms),
        expires_at: format_rfc3339(grant.expires_at_ms),
        device_id,
        device_name: name,
    }
}

/// A `client_id` as RFC 6749 appendix A.1 allows it (VSCHAR: printable ASCII), 1 to 64
/// characters without a space at either end, so that it shows as it is.
fn client_id_text(id: &str) -> Option<String> {
    let printable = |b: u8| (0x20..=0x7E).contains(&b);
    (!id.is_empty()
        && id.len() <= 64
        && id.bytes().all(printable)
        && !id.starts_with(' ')
        && !id.ends_with(' '))
    .then(|| id.to_string())
}

/// `dg_<hex>.<secret>`: the grant id and the secret, if it has that shape.
fn parse_device_code(code: &str) -> Option<(DeviceGrantId, &str)> {
    if code.len() > MAX_DEVICE_CODE_LEN {
        return None;
    }
    let (id, secret) = code.split_once('.')?;
    Some((DeviceGrantId::parse(id)?, secret))
}

/// A user code: 8 letters of `USER_CODE_ALPHABET`, shown as `BCDF-GHJK`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct UserCode([u8; USER_CODE_LEN]);

impl UserCode {
    fn generate() -> Result<Self, RandomError> {
        let mut code = [0u8; USER_CODE_LEN];
        let mut filled = 0;
        while filled < USER_CODE_LEN {
            // 240 is the largest multiple of 20 below 256: bytes above it are drawn
            // again, so that every letter is equally likely.
            for byte in random_bytes::<16>()? {
                if filled < USER_CODE_LEN && byte < 240 {
                    code[filled] = USER_CODE_ALPHABET[usize::from(byte % 20)];
                    filled += 1;
                }
            }
        }
        Ok(Self(code))
    }

    /// What an operator typed: any case, with or without the dash and spaces.
    fn parse(typed: &str) -> Option<Self> {
        if typed.len() > 32 {
            return None;
        }
        let mut code = [0u8; USER_CODE_LEN];
        let mut n = 0;
        for c in typed.chars() {
            if c == '-' || c == ' ' {
                continue;
            }
            let upper = u8::try_from(c.to_ascii_uppercase()).ok()?;
            if n == USER_CODE_LEN || !USER_CODE_ALPHABET.contains(&upper) {
                return None;
            }
            code[n] = upper;
            n += 1;
        }
        (n == USER_CODE_LEN).then_some(Self(code))
    }

    fn hash(&self) -> [u8; 32] {
        secret_hash(&self.0)
    }

    fn display(&self) -> String {
        let text = String::from_utf8_lossy(&self.0);
        format!("{}-{}", &text[..4], &text[4..])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_codes_are_drawn_from_the_alphabet_and_parse_back_however_typed() {
        for _ in 0..200 {
            let Ok(code) = UserCode::generate() else {
                panic!("the random number generator failed");
            };
            let shown = code.display();
            assert_eq!(shown.len(), 9);
            assert_eq!(&shown[4..5], "-");
            assert!(code.0.iter().all(|c| USER_CODE_ALPHABET.contains(c)));
            assert_eq!(UserCode::parse(&shown), Some(code.clone()));
            assert_eq!(UserCode::parse(&shown.to_lowercase()), Some(code.clone()));
            assert_eq!(
                UserCode::parse(&shown.replace('-', " ")),
                Some(code.clone())
            );
            assert_eq!(UserCode::parse(&shown.replace('-', "")), Some(code));
        }
    }

    #[test]
    fn anything_else_is_not_a_user_code() {
        for typed in [
            "",
            "BCDF-GHJ",
            "BCDF-GHJKL",
            "ABCD-EFGH",
            "BCDF-GHJ0",
            "BCDF-GHJÉ",
            "BCDF_GHJK",
            "BCDF-GHJK-",
            &"B".repeat(40),
        ] {
            let parsed = UserCode::parse(typed);
            // "BCDF-GHJK-" has eight letters and a trailing dash: accepted.
            if typed == "BCDF-GHJK-" {
                assert!(parsed.is_some());
            } else {
                assert_eq!(parsed, None, "{typed:?}");
            }
        }
    }

    #[test]
    fn device_codes_are_a_grant_id_and_a_secret() {
        let Ok(id) = DeviceGrantId::generate() else {
            panic!("the random number generator failed");
        };
        let code = format!("{id}.secret");
        assert_eq!(parse_device_code(&code), Some((id, "secret")));
        assert_eq!(parse_device_code("dg_nothex.secret"), None);
        assert_eq!(parse_device_code(&id.to_string()), None);
        assert_eq!(
            parse_device_code(&format!("{id}.{}", "x".repeat(200))),
            None
        );
    }
}
