//! The domain services of one instance, built together over one store.
//!
//! `app` builds them once for the server; the CLI builds them over a directly opened data
//! file when no server runs. The HTTP layer and the admin socket both call into the same
//! `Services`, so every operation has one implementation wherever it is invoked.

use std::net::SocketAddr;
use std::sync::Arc;

use crate::admin_tokens::AdminTokens;
use crate::admin_users::AdminUsers;
use crate::audit::AuditLog;
use crate::backup::{BackupPolicy, Backups};
use crate::clients::Clients;
use crate::clock::SharedClock;
use crate::config::Rate;
use crate::config::{Config, MasterKeySource, TlsMode};
use crate::device_grants::{DeviceGrants, GrantSettings};
use crate::devices::Devices;
use crate::dpop::Proofs;
use crate::ids::RandomError;
use crate::keys::{KeyError, KeyRing};
use crate::live::{Changes, LiveConnections};
use crate::pairing::{PairingSessions, ServerIdentity};
use crate::ratelimit::{Lockout, LockoutPolicy, Policies, Policy, RateLimits};
use crate::revocation::RevocationList;
use crate::schedule::{JobContext, Scheduler};
use crate::status_list::{StatusListSettings, StatusLists};
use crate::store::{Store, StoreError};
use crate::tokens::{PreviousIdentity, TokenAuthority, TokenSettings};

#[derive(Debug, thiserror::Error)]
pub enum ServicesError {
    #[error("cannot load the signing keys: {0}")]
    Keys(#[from] KeyError),
    #[error("cannot load the revocation list: {0}")]
    Store(#[from] StoreError),
    #[error(transparent)]
    Random(#[from] RandomError),
}

/// Everything a request or a management command may call.
#[derive(Debug, Clone)]
pub struct Services {
    pub store: Store,
    pub clock: SharedClock,
    pub(crate) master_key: MasterKeySource,
    pub admin_tokens: AdminTokens,
    pub admin_users: AdminUsers,
    /// Admin UI sessions (in memory only).
    pub(crate) admin_sessions: Arc<crate::admin_sessions::AdminSessions>,
    pub keys: Arc<KeyRing>,
    pub revocations: Arc<RevocationList>,
    pub tokens: Arc<TokenAuthority>,
    pub pairing: Arc<PairingSessions>,
    pub device_grants: Arc<DeviceGrants>,
    /// DPoP proofs checked, and the ones seen within their window (RFC 9449).
    pub proofs: Arc<Proofs>,
    pub devices: Devices,
    pub clients: Clients,
    /// Bumped on every revocation and key change; live connections watch it.
    pub changes: Changes,
    /// The WebSocket channel's connection caps and message budgets.
    pub live: Arc<LiveConnections>,
    /// Rate limits, counted in memory and written behind.
    pub limits: Arc<RateLimits>,
    /// Failed secret checks and the bans they earn.
    pub lockout: Arc<Lockout>,
    pub audit: AuditLog,
    /// The scheduled jobs (run by the background loop every second; also on demand).
    pub jobs: Arc<Scheduler>,
    /// Online backups: on demand, downloaded and scheduled.
    pub backups: Backups,
    /// What the server's listener serves (set by `app`; none for the offline CLI or with
    /// TLS off).
    pub(crate) tls: Option<Arc<crate::tls::Tls>>,
}

/// The issuer when none is configured: the first domain when there is one, else the
/// listen address (fine on loopback; a server reachable under a name should set
/// `tokens.issuer` or a domain).
pub(crate) fn issuer(config: &Config, local_addr: SocketAddr) -> String {
    if let Some(issuer) = &config.tokens.issuer {
        return issuer.clone();
    }
    if let (Some(domain), false) = (config.tls.domains.first(), config.tls_mode == TlsMode::Off) {
        return match local_addr.port() {
            443 => format!("https://{domain}"),
            port => format!("https://{domain}:{port}"),
        };
    }
    let scheme = match config.tls_mode {
        TlsMode::Off => "http",
        TlsMode::SelfSigned | TlsMode::Acme | TlsMode::Files => "https",
    };
    format!("{scheme}://{local_addr}")
}

/// The key DPoP nonces are made with: the stored one, or a new one stored now (in a
/// transaction, so that nodes starting at once all end up with the same one).
async fn dpop_nonce_key(store: &Store) -> Result<[u8; 32], ServicesError> {
    let fresh: [u8; 32] = crate::ids::random_bytes()?;
    Ok(store
        .write(move |tx| match tx.dpop_nonce_key()? {
            Some(key) => Ok::<_, StoreError>(key),
            None => {
                tx.put_dpop_nonce_key(&fresh)?;
                Ok(fresh)
            }
        })
        .await?)
}

impl Services {
    /// Loads the key ring (creating the first keys on a new instance) and the revocation
    /// list, and wires the rest.
    pub async fn start(
        store: Store,
        clock: SharedClock,
        config: &Config,
        server: ServerIdentity,
        previous: Option<PreviousIdentity>,
    ) -> Result<Self, ServicesError> {
        let settings = TokenSettings {
            previous,
            audience: config
                .tokens
                .audience
                .clone()
                .unwrap_or_else(|| server.url.clone()),
            issuer: server.url.clone(),
            access_ttl: config.tokens.access_ttl,
            refresh_ttl: config.tokens.refresh_ttl,
            leeway: config.tokens.leeway,
            require_dpop: config.tokens.require_dpop,
        };
        let nonce_key = if config.tokens.dpop_nonce {
            Some(dpop_nonce_key(&store).await?)
        } else {
            None
        };
        let changes = Changes::default();
        let keys = Arc::new(
            KeyRing::open(
                store.clone(),
                clock.clone(),
                config.tokens.key_algorithm,
                settings.access_window(),
                changes.clone(),
            )
            .await?,
        );
        let revocations = Arc::new(RevocationList::load(
            store.clone(),
            clock.clone(),
            settings.access_window(),
            changes.clone(),
        )?);
        let policy = |name: &str, rate: Rate| match rate {
            Rate::Off => None,
            Rate::Limit { requests, window } => Some(Policy::new(name, requests, window)),
        };
        let limits = Arc::new(RateLimits::load(
            store.clone(),
            clock.clone(),
            Policies {
                pairing: policy("pairing", config.ratelimit.pairing),
                refresh: policy("refresh", config.ratelimit.refresh),
                introspection: policy("introspection", config.ratelimit.introspection),
                admin_login: policy("admin_login", config.ratelimit.admin_login),
                ws_messages: policy("ws_messages", config.ratelimit.ws_messages),
                per_ip: policy("per_ip", config.ratelimit.per_ip),
                failures: Policy::new(
                    "failures",
                    config.lockout.max_failures,
                    config.lockout.window,
                ),
            },
            config.ratelimit.max_keys,
        )?);
        let lockout = Arc::new(Lockout::load(
            store.clone(),
            clock.clone(),
            LockoutPolicy {
                max_failures: config.lockout.max_failures,
                window: config.lockout.window,
                ban: config.lockout.ban,
                max_ban: config.lockout.max_ban,
            },
        )?);
        let audit = AuditLog::new(store.clone(), clock.clone(), config.audit.retention);
        let status_lists = Arc::new(StatusLists::new(
            store.clone(),
            clock.clone(),
            keys.clone(),
            StatusListSettings {
                uri_base: format!("{}/v1/statuslists/", settings.issuer),
                ttl: config.tokens.status_list_ttl,
                valid_for: settings.access_window(),
                leeway: settings.leeway,
            },
        ));
        let tokens = Arc::new(TokenAuthority::new(
            store.clone(),
            clock.clone(),
            keys.clone(),
            revocations.clone(),
            status_lists,
            settings,
            limits.clone(),
        ));
        let pairing = Arc::new(PairingSessions::new(
            store.clone(),
            clock.clone(),
            tokens.clone(),
            config.tokens.pairing_ttl,
            server,
            limits.clone(),
            lockout.clone(),
        ));
        let device_grants = Arc::new(DeviceGrants::new(
            store.clone(),
            clock.clone(),
            tokens.clone(),
            GrantSettings {
                verification_uri: format!("{}/admin/device", tokens.settings().issuer),
                ttl: config.tokens.device_code_ttl,
                interval: config.tokens.device_poll_interval,
            },
            limits.clone(),
            lockout.clone(),
        ));
        let backups = Backups::new(
            store.clone(),
            audit.clone(),
            clock.clone(),
            BackupPolicy {
                dir: config.backup.dir.clone(),
                keep: config.backup.keep,
            },
        );
        let jobs = Arc::new(Scheduler::new(
            config.jobs.clone(),
            JobContext {
                store: store.clone(),
                keys: keys.clone(),
                audit: audit.clone(),
                tokens: tokens.clone(),
                pairing: pairing.clone(),
                device_grants: device_grants.clone(),
                limits: limits.clone(),
                lockout: lockout.clone(),
                backups: backups.clone(),
            },
            clock.clone(),
        ));
        Ok(Self {
            limits,
            lockout,
            audit,
            jobs,
            backups,
            tls: None,
            proofs: Arc::new(Proofs::new(clock.clone(), config.tokens.leeway, nonce_key)),
            admin_tokens: AdminTokens::load(store.clone(), clock.clone())?,
            admin_users: AdminUsers::new(store.clone(), clock.clone()),
            admin_sessions: Arc::new(crate::admin_sessions::AdminSessions::new(
                store.clone(),
                clock.clone(),
                config.sessions.idle,
                config.sessions.max,
            )),
            devices: Devices::new(store.clone(), clock.clone(), revocations.clone()),
            clients: Clients::load(store.clone(), clock.clone())?,
            master_key: config.master_key.clone(),
            store,
            clock,
            keys,
            revocations,
            tokens,
            pairing,
            device_grants,
            changes,
            live: LiveConnections::new(
                config.ws.max_connections,
                config.ws.max_connections_per_ip,
                config.ws.messages_per_second,
            ),
        })
    }
}
