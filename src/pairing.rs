//! Pairing sessions: how a phone becomes a device.
//!
//! An operator opens a session (`create`), which yields a one-time secret of 256 random
//! bits, stored only as SHA-256, valid `ttl` (5 minutes by default, 1 hour at most),
//! and a pairing URI that carries everything an app needs (see `schema/pairing-uri.md`).
//! The app presents the session id and secret (`pair`); exactly one presentation can
//! win, because the claim is re-checked and recorded inside the write transaction that
//! also creates the device, its token family and its first refresh token.
//!
//! A wrong secret, an unknown, expired or already used session all fail the same way
//! (`PairingError::Rejected`) after the same work: one read, one SHA-256, one
//! constant-time comparison against the stored hash or a dummy. This module must not
//! know HTTP.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;

use crate::audit::{self, Actor, Event, Origin};
use crate::clock::{SharedClock, format_rfc3339, millis};
use crate::config::PAIRING_MAX_TTL;
use crate::dpop::Jkt;
use crate::error_kind::{Classify, ErrorKind};
use crate::ids::FamilyId;
use crate::ids::{DeviceId, RandomError, Secret, SessionId, hash_matches, secret_hash};
use crate::ratelimit::{FailedCheck, Limited, Lockout, PolicyId, RateLimits, Subject};
use crate::store::records::{Device, PairingSession};
use crate::store::{DEVICES, DEVICES_BY_AGE, PAIRING_SESSIONS, Store, StoreError, device_age_key};
use crate::tokens::{TokenAuthority, TokenError, TokenPair};

/// The shortest session an operator may open.
pub(crate) const MIN_TTL: Duration = Duration::from_secs(30);
/// Longest accepted lengths of the device fields, in characters.
pub(crate) const MAX_DEVICE_NAME: usize = 64;
pub(crate) const MAX_PLATFORM: usize = 32;
pub(crate) const MAX_APP_VERSION: usize = 32;
/// A presented secret longer than this is wrong without being hashed.
const MAX_SECRET_LEN: usize = 128;
/// Expired sessions are kept this long (for `pair` to say "used" or "expired" in the
/// log, and for operators), then pruned.
const KEEP_EXPIRED: Duration = Duration::from_secs(24 * 3600);

#[derive(Debug, thiserror::Error)]
pub enum PairingError {
    /// Wrong secret, unknown, expired or used session: deliberately one variant.
    #[error(
        "pairing failed: the session does not exist, has expired or was already used, or the \
         secret is wrong"
    )]
    Rejected,
    #[error("too many pairing attempts from this address")]
    RateLimited(Box<Limited>),
    /// The caller's address is locked out (only reachable through a WebSocket opened
    /// before the ban: HTTP requests are refused before routing).
    #[error("this address is locked out")]
    Banned(Duration),
    #[error("no such pairing session")]
    UnknownSession,
    #[error("no device with id {0} to pair again")]
    UnknownDevice(String),
    #[error("device {0} is revoked, and a revoked device stays revoked: pair a new device instead")]
    DeviceRevoked(String),
    #[error("the pairing session was already used or has expired")]
    Closed,
    #[error(
        "this session's secret is no longer held (the server restarted since it was opened); \
         open a new session"
    )]
    SecretUnavailable,
    /// The pairing URI would name an address the device cannot reach.
    #[error(
        "no pairing URI can name {0}: {1}. Set tokens.issuer (GATEHOUSE_ISSUER) to the https \
         URL that devices reach this server at, for example https://192.0.2.10:8443"
    )]
    Unreachable(String, &'static str),
    #[error("bad ttl: {0}")]
    BadTtl(String),
    #[error("bad session name: {0}")]
    BadName(String),
    #[error("bad device description: {0}")]
    BadDevice(String),
    #[error(
        "this server binds every device's tokens to its key (tokens.require_dpop): send a DPoP \
         proof with the request"
    )]
    DpopRequired,
    #[error(transparent)]
    Random(#[from] RandomError),
    #[error(transparent)]
    Token(#[from] TokenError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl Classify for PairingError {
    fn kind(&self) -> ErrorKind {
        match self {
            Self::Rejected => ErrorKind::Unauthenticated,
            Self::RateLimited(_) => ErrorKind::RateLimited,
            Self::Banned(_) => ErrorKind::Banned,
            Self::UnknownSession | Self::UnknownDevice(_) => ErrorKind::NotFound,
            Self::DeviceRevoked(_) => ErrorKind::Conflict,
            Self::Closed | Self::SecretUnavailable => ErrorKind::Gone,
            Self::BadTtl(_) | Self::BadName(_) | Self::BadDevice(_) | Self::DpopRequired => {
                ErrorKind::Invalid
            }
            Self::Unreachable(..) => ErrorKind::Conflict,
            Self::Token(err) => err.kind(),
            Self::Random(_) => ErrorKind::Internal,
            Self::Store(err) => err.kind(),
        }
    }

    fn code(&self) -> &'static str {
        match self {
            // The documented code of every failed claim (schema/openapi.yaml).
            Self::Rejected => "pairing_failed",
            Self::Unreachable(..) => "server_unreachable",
            Self::DpopRequired => "invalid_dpop_proof",
            Self::Token(err) => err.code(),
            other => other.kind().code(),
        }
    }
}

/// Where apps reach this server, for the pairing URI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerIdentity {
    /// The base URL (the issuer).
    pub url: String,
    /// `sha256/<base64>` of the certificate's public key, when it is self-signed and an
    /// app must pin it instead of trusting a CA.
    pub pin: Option<String>,
}

impl ServerIdentity {
    /// Refuses to make a pairing URI that no device could use: one naming an unspecified
    /// address (`0.0.0.0`, `[::]`) ever, or a loopback address when the request came from
    /// another host (`requester`: `None` for the local CLI, which may pair an emulator).
    pub(crate) fn reachable_from(&self, requester: Option<IpAddr>) -> Result<(), PairingError> {
        let Some(ip) = self.ip() else {
            return Ok(());
        };
        if ip.is_unspecified() {
            return Err(PairingError::Unreachable(
                self.url.clone(),
                "it is the any-address the server listens on, not an address devices can use",
            ));
        }
        if ip.is_loopback() && requester.is_some_and(|peer| !peer.is_loopback()) {
            return Err(PairingError::Unreachable(
                self.url.clone(),
                "it is a loopback address, reachable only from this host, and the request \
                 came from another",
            ));
        }
        Ok(())
    }

    /// The URL's host when it is an IP address.
    pub(crate) fn ip(&self) -> Option<IpAddr> {
        let uri: http::Uri = self.url.parse().ok()?;
        let host = uri.host()?;
        host.trim_start_matches('[')
            .trim_end_matches(']')
            .parse()
            .ok()
    }
}

/// A session just opened: the only moment its secret exists outside the app.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct NewSession {
    pub session_id: SessionId,
    pub secret: String,
    pub(crate) pairing_uri: String,
    pub(crate) expires_at_ms: u64,
    pub(crate) name: Option<String>,
}

/// What an app says about itself when pairing.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceInfo {
    pub name: String,
    pub platform: String,
    pub app_version: String,
}

/// A device's (or pairing session's) name, trimmed, if it is 1 to 64 characters without
/// control characters; the rule `DeviceInfo` and device renames share.
pub(crate) fn device_name(name: &str) -> Option<String> {
    check_text("name", name, MAX_DEVICE_NAME).ok()
}

fn check_text(field: &str, value: &str, max: usize) -> Result<String, PairingError> {
    let value = value.trim();
    if value.is_empty() || value.chars().count() > max {
        return Err(PairingError::BadDevice(format!(
            "`{field}` must be 1 to {max} characters"
        )));
    }
    if value.chars().any(char::is_control) {
        return Err(PairingError::BadDevice(format!(
            "`{field}` must not contain control characters"
        )));
    }
    // Bidirectional overrides and isolates reorder the text around them, so a name could
    // show an operator something other than what it holds (Trojan Source, CVE-2021-42574).
    if value.chars().any(is_bidi_control) {
        return Err(PairingError::BadDevice(format!(
            "`{field}` must not contain bidirectional control characters (U+202A to U+202E, \
             U+2066 to U+2069)"
        )));
    }
    Ok(value.to_string())
}

fn is_bidi_control(c: char) -> bool {
    matches!(c, '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}')
}

impl DeviceInfo {
    fn validated(&self) -> Result<Self, PairingError> {
        Ok(Self {
            name: check_text("name", &self.name, MAX_DEVICE_NAME)?,
            platform: check_text("platform", &self.platform, MAX_PLATFORM)?,
            app_version: check_text("app_version", &self.app_version, MAX_APP_VERSION)?,
        })
    }
}

/// Percent-encodes a URI query value (RFC 3986 unreserved characters pass).
fn query_value(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `gatehouse://pair?...`: the text a QR code carries (`schema/pairing-uri.md`).
pub fn pairing_uri(
    server: &ServerIdentity,
    session: &SessionId,
    secret: &str,
    expires_at_ms: u64,
) -> String {
    let mut uri = format!(
        "gatehouse://pair?v=1&server={}&session={}&secret={}&exp={}",
        query_value(&server.url),
        session,
        query_value(secret),
        expires_at_ms / 1000
    );
    if let Some(pin) = &server.pin {
        uri.push_str("&pin=");
        uri.push_str(&query_value(pin));
    }
    uri
}

/// What the claim transaction decided.
enum Claim {
    /// Paired; for a device paired again, the families its new one replaced.
    Won(Vec<FamilyId>),
    Lost,
    /// The device to pair again was revoked after the session was opened.
    DeviceRevoked,
}

#[derive(Debug)]
pub struct PairingSessions {
    store: Store,
    clock: SharedClock,
    tokens: Arc<TokenAuthority>,
    default_ttl: Duration,
    server: ServerIdentity,
    /// Every attempt spends from its address's `pairing` budget, whichever door it came
    /// through (REST or WebSocket).
    limits: Arc<RateLimits>,
    /// Wrong secrets count toward a ban of the caller's address.
    lockout: Arc<Lockout>,
    /// Pairing URIs of open sessions this process created, so the admin API can render
    /// their QR codes. Memory only: the data file holds only the secret's hash, so after
    /// a restart an open session's QR code cannot be shown again.
    open_uris: Mutex<HashMap<SessionId, (String, u64)>>,
}

impl PairingSessions {
    pub(crate) fn new(
        store: Store,
        clock: SharedClock,
        tokens: Arc<TokenAuthority>,
        default_ttl: Duration,
        server: ServerIdentity,
        limits: Arc<RateLimits>,
        lockout: Arc<Lockout>,
    ) -> Self {
        Self {
            store,
            clock,
            tokens,
            default_ttl,
            server,
            limits,
            lockout,
            open_uris: Mutex::new(HashMap::new()),
        }
    }

    /// Where the pairing URIs say this server is.
    pub(crate) fn server(&self) -> &ServerIdentity {
        &self.server
    }

    /// Opens a session. Durable when this returns.
    ///
    /// With `again`, the session pairs that existing device again instead of creating a
    /// new one: the app that claims it takes over the device (its id, name and history),
    /// and every other token family of the device is revoked in the same commit. For a
    /// device that can no longer refresh (`needs_pairing`), or a phone replaced.
    pub async fn create(
        &self,
        name: Option<&str>,
        ttl: Option<Duration>,
        again: Option<DeviceId>,
        origin: &Origin,
    ) -> Result<NewSession, PairingError> {
        self.server.reachable_from(origin.source)?;
        let again = match again {
            None => None,
            Some(id) => {
                let device = self
                    .store
                    .read(|tx| tx.get(&DEVICES, &id.to_string()))?
                    .ok_or_else(|| PairingError::UnknownDevice(id.to_string()))?;
                if device.revoked_at_ms.is_some() {
                    return Err(PairingError::DeviceRevoked(id.to_string()));
                }
                Some((id, device.name))
            }
        };
        let ttl = ttl.unwrap_or(self.default_ttl);
        if ttl < MIN_TTL || ttl > PAIRING_MAX_TTL {
            return Err(PairingError::BadTtl(format!(
                "must be between {} and {} seconds",
                MIN_TTL.as_secs(),
                PAIRING_MAX_TTL.as_secs()
            )));
        }
        let name = name
            .map(|n| {
                device_name(n).ok_or_else(|| {
                    PairingError::BadName(format!(
                        "1 to {MAX_DEVICE_NAME} characters without control or bidirectional \
                         control characters"
                    ))
                })
            })
            .transpose()?
            .or_else(|| again.as_ref().map(|(_, name)| name.clone()));
        let again = again.map(|(id, _)| id);
        let id = SessionId::generate()?;
        let secret = Secret::generate("")?;
        let now = self.clock.now_ms();
        let expires_at_ms = now.saturating_add(millis(ttl));
        let record = PairingSession {
            name: name.clone(),
            secret_hash: secret.hash(),
            created_at_ms: now,
            expires_at_ms,
            created_by: origin.actor.to_text(),
            claimed_at_ms: None,
            // Set now for a device paired again; at the claim for a new one.
            device_id: again.map(|d| d.to_string()),
        };
        let key = id.to_string();
        let mut event = Event::new("pairing.created")
            .detail("session_id", key.clone())
            .detail("name", name.clone())
            .detail("expires_at", format_rfc3339(expires_at_ms));
        if let Some(device) = again {
            event = event.device(device).detail("again", true);
        }
        let origin = origin.clone();
        self.store
            .write(move |tx| {
                tx.put(&PAIRING_SESSIONS, &key, &record)?;
                audit::append(tx, &origin, &event, now)?;
                Ok::<_, StoreError>(())
            })
            .await?;
        let uri = pairing_uri(&self.server, &id, secret.as_str(), expires_at_ms);
        {
            let mut open = self.open_uris.lock().unwrap_or_else(|p| p.into_inner());
            open.retain(|_, (_, expires)| *expires > now);
            open.insert(id, (uri.clone(), expires_at_ms));
        }
        Ok(NewSession {
            pairing_uri: uri,
            session_id: id,
            secret: secret.into_string(),
            expires_at_ms,
            name,
        })
    }

    /// A session's record, for the admin UI.
    pub(crate) fn get(&self, id: &SessionId) -> Result<Option<PairingSession>, PairingError> {
        Ok(self
            .store
            .read(|tx| tx.get(&PAIRING_SESSIONS, &id.to_string()))?)
    }

    /// The pairing URI of a session that is still open, for its QR code.
    pub(crate) fn open_uri(&self, id: &SessionId) -> Result<String, PairingError> {
        let session = self.get(id)?.ok_or(PairingError::UnknownSession)?;
        let now = self.clock.now_ms();
        if session.claimed_at_ms.is_some() || now >= session.expires_at_ms {
            return Err(PairingError::Closed);
        }
        let open = self.open_uris.lock().unwrap_or_else(|p| p.into_inner());
        open.get(id)
            .map(|(uri, _)| uri.clone())
            .ok_or(PairingError::SecretUnavailable)
    }

    fn forget_uri(&self, id: &SessionId) {
        self.open_uris
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
    }

    /// Claims a session with its secret: creates the device and returns its tokens,
    /// bound to `binding` (the key of the request's checked DPoP proof) if there is one.
    pub async fn pair(
        &self,
        session_id: &str,
        secret: &str,
        device: &DeviceInfo,
        binding: Option<Jkt>,
        origin: &Origin,
    ) -> Result<TokenPair, PairingError> {
        if binding.is_none() && self.tokens.settings().require_dpop {
            return Err(PairingError::DpopRequired);
        }
        let peer = origin.source.unwrap_or(IpAddr::from([0, 0, 0, 0]));
        if let Some(left) = self.lockout.banned(peer) {
            return Err(PairingError::Banned(left));
        }
        // Counted before anything is looked at, so that guessing costs budget.
        if let Err(limited) = self.limits.limit(PolicyId::Pairing, &Subject::ip(peer)) {
            tracing::debug!(%peer, "pairing refused: rate limited");
            return Err(PairingError::RateLimited(limited));
        }
        let peer = peer.to_string();
        let peer = peer.as_str();
        let device = device.validated()?;
        let now = self.clock.now_ms();
        let session = match SessionId::parse(session_id) {
            Some(id) => self
                .store
                .read(|tx| tx.get(&PAIRING_SESSIONS, &id.to_string()))?
                .map(|s| (id, s)),
            None => None,
        };
        let presented = if secret.len() <= MAX_SECRET_LEN {
            secret_hash(secret.as_bytes())
        } else {
            secret_hash(b"")
        };
        let secret_ok = hash_matches(session.as_ref().map(|(_, s)| &s.secret_hash), &presented)
            && secret.len() <= MAX_SECRET_LEN;
        let Some((session_id, session)) = session else {
            return Err(self.refuse(origin, None, "unknown session", true).await);
        };
        let reason = if !secret_ok {
            Some("wrong secret")
        } else if session.claimed_at_ms.is_some() {
            Some("already used")
        } else if now >= session.expires_at_ms {
            Some("expired")
        } else {
            None
        };
        if let Some(reason) = reason {
            let guessed = !secret_ok;
            return Err(self
                .refuse(origin, Some(&session_id), reason, guessed)
                .await);
        }

        // A session opened to pair a device again names it from the start.
        let again = session.device_id.as_deref().and_then(DeviceId::parse);
        let device_id = match again {
            Some(id) => id,
            None => DeviceId::generate()?,
        };
        let (family, first) = self.tokens.new_family(binding).await?;
        let stored_family = family.clone();
        let tokens = self.tokens.clone();
        let key = session_id.to_string();
        let device_origin = origin.as_actor(Actor::Device(device_id.to_string()));
        let mut claimed = Event::new("pairing.claimed")
            .device(device_id)
            .detail("session_id", key.clone())
            .detail("name", device.name.clone())
            .detail("platform", device.platform.clone());
        if again.is_some() {
            claimed = claimed.detail("again", true);
        }
        let issued = Event::new("token.issued")
            .device(device_id)
            .detail("family", family.family.to_string())
            .detail("grant", "pairing");
        let record = Device {
            name: device.name,
            platform: device.platform,
            app_version: device.app_version,
            created_at_ms: now,
            last_seen_ms: now,
            paired_from: peer.to_string(),
            pairing_session: key.clone(),
            revoked_at_ms: None,
        };
        let claim = self
            .store
            .write(move |tx| -> Result<Claim, StoreError> {
                // Re-checked inside the transaction: of concurrent claims, the first to
                // commit wins and every later one sees it claimed.
                let Some(mut session) = tx.get(&PAIRING_SESSIONS, &key)? else {
                    return Ok(Claim::Lost);
                };
                if session.claimed_at_ms.is_some() || now >= session.expires_at_ms {
                    return Ok(Claim::Lost);
                }
                session.claimed_at_ms = Some(now);
                session.device_id = Some(device_id.to_string());
                let id = device_id.to_string();
                let mut replaced = Vec::new();
                if again.is_some() {
                    let Some(mut existing) = tx.get(&DEVICES, &id)? else {
                        return Ok(Claim::Lost);
                    };
                    if existing.revoked_at_ms.is_some() {
                        return Ok(Claim::DeviceRevoked);
                    }
                    // The operator's name stays; the rest describes the app now.
                    existing.platform.clone_from(&record.platform);
                    existing.app_version.clone_from(&record.app_version);
                    existing.last_seen_ms = now;
                    existing.paired_from.clone_from(&record.paired_from);
                    existing.pairing_session.clone_from(&record.pairing_session);
                    tx.put(&DEVICES, &id, &existing)?;
                    replaced = tokens.end_families_in(tx, &device_id, "paired again", now)?;
                } else {
                    tx.put(&DEVICES, &id, &record)?;
                    tx.index_insert(&DEVICES_BY_AGE, &device_age_key(record.created_at_ms, &id))?;
                }
                tx.put(&PAIRING_SESSIONS, &key, &session)?;
                tokens.write_family_in(tx, &stored_family, &device_id, now)?;
                let claimed = claimed.clone().detail("families_revoked", replaced.len());
                audit::append(tx, &device_origin, &claimed, now)?;
                audit::append(tx, &device_origin, &issued, now)?;
                Ok(Claim::Won(replaced))
            })
            .await?;
        match claim {
            Claim::Won(replaced) => {
                self.forget_uri(&session_id);
                self.tokens.families_ended(replaced);
                self.tokens.family_committed(family.family);
                tracing::info!(%session_id, device = %device_id, peer, "device paired");
                Ok(self.tokens.pair_for(
                    device_id,
                    family.family,
                    family.refresh,
                    family.binding.as_ref(),
                    first,
                )?)
            }
            Claim::Lost => Err(self
                .refuse(origin, Some(&session_id), "claimed concurrently", false)
                .await),
            Claim::DeviceRevoked => Err(self
                .refuse(origin, Some(&session_id), "device revoked", false)
                .await),
        }
    }

    /// Records a refused claim (`pairing.failed`; a wrong secret or unknown session
    /// also counts toward lockout) and gives the one error every refusal shares.
    async fn refuse(
        &self,
        origin: &Origin,
        session_id: Option<&SessionId>,
        reason: &'static str,
        guessed: bool,
    ) -> PairingError {
        tracing::debug!(session_id = ?session_id.map(ToString::to_string), reason, "pairing refused");
        let mut event = Event::failure("pairing.failed").detail("reason", reason);
        if let Some(id) = session_id {
            event = event.detail("session_id", id.to_string());
        }
        let written = if guessed {
            self.lockout
                .record_failure(&self.limits, origin, FailedCheck::PairingSecret, event)
                .await
                .map(|_| ())
        } else {
            let clock = self.clock.clone();
            let origin = origin.clone();
            self.store
                .write(move |tx| audit::append(tx, &origin, &event, clock.now_ms()).map(|_| ()))
                .await
        };
        match written {
            Ok(()) => PairingError::Rejected,
            Err(err) => PairingError::Store(err),
        }
    }

    /// Deletes sessions that expired more than a day ago. For the scheduler.
    pub(crate) async fn prune_expired(&self) -> Result<u64, PairingError> {
        let cutoff = self.clock.now_ms().saturating_sub(millis(KEEP_EXPIRED));
        Ok(self
            .store
            .write(move |tx| tx.retain(&PAIRING_SESSIONS, |_, s| s.expires_at_ms > cutoff))
            .await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairing_uris_never_name_an_address_the_device_cannot_reach() {
        let at = |url: &str| ServerIdentity {
            url: url.into(),
            pin: None,
        };
        let here: Option<IpAddr> = Some("127.0.0.1".parse().unwrap_or(IpAddr::from([0; 4])));
        let elsewhere: Option<IpAddr> = Some(IpAddr::from([192, 0, 2, 7]));
        for url in ["https://0.0.0.0:8443", "https://[::]:8443"] {
            for from in [None, here, elsewhere] {
                assert!(
                    matches!(
                        at(url).reachable_from(from),
                        Err(PairingError::Unreachable(..))
                    ),
                    "{url} from {from:?}"
                );
            }
        }
        for url in ["https://127.0.0.1:8443", "https://[::1]:8443"] {
            assert!(at(url).reachable_from(None).is_ok(), "the local CLI: {url}");
            assert!(at(url).reachable_from(here).is_ok(), "{url} from loopback");
            assert!(
                matches!(
                    at(url).reachable_from(elsewhere),
                    Err(PairingError::Unreachable(..))
                ),
                "{url} from another host"
            );
        }
        for url in ["https://auth.example.com", "https://192.0.2.10:8443"] {
            for from in [None, here, elsewhere] {
                assert!(at(url).reachable_from(from).is_ok(), "{url} from {from:?}");
            }
        }
    }

    #[test]
    fn uri_carries_every_field_encoded() {
        let server = ServerIdentity {
            url: "https://127.0.0.1:8443".into(),
            pin: Some("sha256/ab+c/d=".into()),
        };
        let id = SessionId::from_bytes([1; 16]);
        let uri = pairing_uri(&server, &id, "s3cr-t_", 1_700_000_000_123);
        assert_eq!(
            uri,
            format!(
                "gatehouse://pair?v=1&server=https%3A%2F%2F127.0.0.1%3A8443&session={id}\
                 &secret=s3cr-t_&exp=1700000000&pin=sha256%2Fab%2Bc%2Fd%3D"
            )
        );
    }

    #[test]
    fn device_fields_are_bounded_and_trimmed() {
        let ok = DeviceInfo {
            name: " Ada's phone ".into(),
            platform: "ios".into(),
            app_version: "1.2.3".into(),
        };
        assert_eq!(
            ok.validated().map(|d| d.name).ok(),
            Some("Ada's phone".into())
        );
        for bad in [
            DeviceInfo {
                name: String::new(),
                ..ok.clone()
            },
            DeviceInfo {
                name: "x".repeat(65),
                ..ok.clone()
            },
            DeviceInfo {
                platform: "a\nb".into(),
                ..ok.clone()
            },
            DeviceInfo {
                app_version: " ".into(),
                ..ok.clone()
            },
        ] {
            assert!(matches!(bad.validated(), Err(PairingError::BadDevice(_))));
        }
    }
}
