//! Token status lists (draft-ietf-oauth-status-list): which access tokens are revoked,
//! published as signed lists of one bit per token, for apps that verify tokens offline
//! from the JWKS and would otherwise never see a revocation.
//!
//! Every access token gets an index of its own. A node hands indices out of a block of
//! `BLOCK` that it reserves first by advancing the counter in `status_allocation.v1`
//! (durably, in a serializable transaction on PostgreSQL), so an index is never handed out
//! twice: not after a restart (the rest of the block is lost, never reused), not by
//! another node. Index `n` is bit `n mod 2^20` of list `n >> 20`; the token says so in
//! `status.status_list {idx, uri}`.
//!
//! A token family's row keeps the indices of its access tokens that may still be
//! presented (`TokenFamily::status`). Revoking a token, a family or a device writes a
//! `status_revoked.v1` row for each index concerned, in the revocation's own
//! transaction (`mark_in`), and the journal fold writes them again from the family row,
//! which catches a token issued by a refresh that raced the revocation on another node.
//! A list is built from its rows (one prefix read), compressed with zlib as the format
//! requires, signed by the key ring as a `statuslist+jwt`, and served from memory until
//! this node commits anything (after `REBUILD_GAP` at least) or `REBUILD_AFTER` has
//! passed: a revocation shows at once on the node that made it, within a second on any
//! other. The rows go once their tokens have expired (`prune`).

use std::collections::HashMap;
use std::io::Write;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::clock::{SharedClock, millis};
use crate::error_kind::{Classify, ErrorKind};
use crate::jwt::{StatusListRef, TokenStatus};
use crate::keys::{KeyError, KeyRing};
use crate::store::records::{StatusAllocation, StatusRevoked, StatusSlot};
use crate::store::{
    ReadTx, STATUS_ALLOCATION, STATUS_ALLOCATION_KEY, STATUS_LIST_INDEX_BITS, STATUS_REVOKED,
    Store, StoreError, WriteTx, status_index_key, status_list_prefix,
};

/// Indices in one list: 2^20, so a list is 128 KiB before compression (a few hundred
/// bytes while little is revoked) and a verifier learns nothing from which list a token
/// names but that it was issued among a million others.
pub const LIST_LEN: u64 = 1 << STATUS_LIST_INDEX_BITS;

/// Indices a node reserves at a time: one durable write per this many access tokens.
const BLOCK: u64 = 1024;

/// A built list is served at most this long before it is built again: the bound on how
/// late another node's revocation shows, with the time a build takes...
pub const REBUILD_AFTER: Duration = Duration::from_millis(500);

/// ...and at least this long, however much this node writes meanwhile: a commit on this
/// node (it may have been a revocation) makes the next fetch after it build the list.
pub const REBUILD_GAP: Duration = Duration::from_millis(50);

/// The longest `tokens.leeway` a configuration may set (5 minutes), in ms.
const MAX_LEEWAY_MS: u64 = 300_000;

/// The `typ` of a status list token (draft-ietf-oauth-status-list section 5.1).
pub const STATUS_LIST_TYP: &str = "statuslist+jwt";

/// The media type it is served as (section 8.2 of the draft).
pub const STATUS_LIST_MEDIA_TYPE: &str = "application/statuslist+jwt";

#[derive(Debug, thiserror::Error)]
pub enum StatusListError {
    /// No index of this list has been handed out: there is nothing to say about it.
    #[error("no status list {0}: no token names it")]
    UnknownList(u64),
    #[error("the status list index space is exhausted")]
    Exhausted,
    #[error("cannot compress the status list: {0}")]
    Compress(std::io::Error),
    #[error("building the status list was interrupted: {0}")]
    Interrupted(String),
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl Classify for StatusListError {
    fn kind(&self) -> ErrorKind {
        match self {
            Self::UnknownList(_) => ErrorKind::NotFound,
            Self::Exhausted | Self::Compress(_) | Self::Interrupted(_) => ErrorKind::Internal,
            Self::Key(err) => err.kind(),
            Self::Store(err) => err.kind(),
        }
    }
}

/// One access token's place across every list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct StatusIndex(u64);

impl StatusIndex {
    pub fn new(index: u64) -> Self {
        Self(index)
    }

    pub fn get(self) -> u64 {
        self.0
    }

    /// The list it is in.
    pub fn list(self) -> u64 {
        self.0 >> STATUS_LIST_INDEX_BITS
    }

    /// Its bit within that list (`idx` in the token).
    pub fn idx(self) -> u64 {
        self.0 & (LIST_LEN - 1)
    }

    /// Where a token's claim says its bit lives, if the claim is one of ours: `uri` ends
    /// in `/v1/statuslists/<list>` (the issuer before it may have changed since).
    pub fn of_claim(claim: &TokenStatus) -> Option<Self> {
        let list = claim.status_list.uri.rsplit_once('/')?.1;
        if list.is_empty() || list.len() > 20 || !list.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let list: u64 = list.parse().ok()?;
        let idx = claim.status_list.idx;
        (idx < LIST_LEN && list < (1 << (64 - STATUS_LIST_INDEX_BITS)))
            .then_some(Self((list << STATUS_LIST_INDEX_BITS) | idx))
    }

    /// The family row's note of a token holding this index until `expires_at_ms`.
    pub fn slot(self, expires_at_ms: u64) -> StatusSlot {
        StatusSlot {
            index: self.0,
            expires_at_ms,
        }
    }
}

/// Sets the bits of `slots` (in a revocation's transaction): one row per index whose
/// token may still be presented with the longest leeway a server allows, kept until
/// `prune` finds it expired beyond the configured one.
pub(crate) fn mark_in(
    tx: &WriteTx<'_>,
    slots: &[StatusSlot],
    now_ms: u64,
) -> Result<(), StoreError> {
    let live = |slot: &&StatusSlot| slot.expires_at_ms.saturating_add(MAX_LEEWAY_MS) > now_ms;
    for slot in slots.iter().filter(live) {
        tx.put(
            &STATUS_REVOKED,
            &status_index_key(slot.index),
            &StatusRevoked {
                expires_at_ms: slot.expires_at_ms,
                revoked_at_ms: now_ms,
            },
        )?;
    }
    Ok(())
}

/// The places a family row keeps, with `new` added and those whose tokens can no longer
/// be presented (expired beyond `leeway_ms`) dropped: what a refresh writes back.
pub(crate) fn keep_live(
    slots: &[StatusSlot],
    new: Option<StatusSlot>,
    now_ms: u64,
    leeway_ms: u64,
) -> Vec<StatusSlot> {
    slots
        .iter()
        .copied()
        .filter(|slot| slot.expires_at_ms.saturating_add(leeway_ms) > now_ms)
        .chain(new)
        .collect()
}

/// A signed list as served, and when it was built.
#[derive(Debug, Clone)]
pub struct ServedList {
    /// The compact JWS (`statuslist+jwt`).
    pub token: Arc<str>,
    /// How long a verifier may keep it before fetching it again (`ttl`, `max-age`).
    pub ttl: Duration,
    /// When it was built (real time: the injected clock may stand still in tests).
    built_at: Instant,
    /// The store's commit count it was built after.
    commits: u64,
}

/// The claims of a status list token (section 5.1 of the draft).
#[derive(Debug, Serialize)]
struct ListClaims<'a> {
    sub: &'a str,
    iat: u64,
    exp: u64,
    ttl: u64,
    status_list: ListBits,
}

#[derive(Debug, Serialize)]
struct ListBits {
    bits: u8,
    /// base64url (no padding) of the zlib-compressed byte array.
    lst: String,
}

/// What a list says and how it is served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusListSettings {
    /// `<issuer>/v1/statuslists/`: a list's URI is this and its number.
    pub uri_base: String,
    /// `ttl` and `Cache-Control: max-age`.
    pub ttl: Duration,
    /// How long a list token is valid (`exp - iat`): no token it speaks for lives longer.
    pub valid_for: Duration,
    /// The clock skew verifiers are told to allow (`tokens.leeway`): a revoked token's
    /// bit stays set until its `exp` plus this.
    pub leeway: Duration,
}

/// Index allocation and the lists themselves.
#[derive(Debug)]
pub struct StatusLists {
    store: Store,
    clock: SharedClock,
    keys: Arc<KeyRing>,
    settings: StatusListSettings,
    /// The rest of this node's block: handed out in order.
    block: tokio::sync::Mutex<Range<u64>>,
    /// Built lists by number, each served until `REBUILD_AFTER` has passed.
    built: Mutex<HashMap<u64, ServedList>>,
    /// Held while a list is built, so that a burst of fetches builds it once and takes
    /// one blocking thread.
    building: tokio::sync::Mutex<()>,
    /// The allocation counter as this node last knew it: lists below it exist.
    known_next: AtomicU64,
    /// When `check_known` last read the counter from the store.
    counter_read_at: Mutex<Option<Instant>>,
}

/// The allocation counter: the first index no node has reserved (0 before any).
fn next_index(tx: &ReadTx<'_>) -> Result<u64, StoreError> {
    Ok(tx
        .get(&STATUS_ALLOCATION, STATUS_ALLOCATION_KEY)?
        .map_or(0, |row| row.next_index))
}

/// How many lists exist when `next` is the first index not reserved.
fn lists_below(next: u64) -> u64 {
    if next == 0 {
        0
    } else {
        ((next - 1) >> STATUS_LIST_INDEX_BITS) + 1
    }
}

impl StatusLists {
    pub fn new(
        store: Store,
        clock: SharedClock,
        keys: Arc<KeyRing>,
        settings: StatusListSettings,
    ) -> Self {
        Self {
            store,
            clock,
            keys,
            settings,
            block: tokio::sync::Mutex::new(0..0),
            built: Mutex::default(),
            building: tokio::sync::Mutex::new(()),
            known_next: AtomicU64::new(0),
            counter_read_at: Mutex::new(None),
        }
    }

    /// A fresh index for an access token about to be issued. Reserves a new block first
    /// when this node's is spent (one durable write per `BLOCK` tokens).
    pub async fn allocate(&self) -> Result<StatusIndex, StatusListError> {
        let mut block = self.block.lock().await;
        if block.is_empty() {
            *block = self.reserve().await?;
            self.known_next.fetch_max(block.end, Ordering::AcqRel);
        }
        let index = block.start;
        block.start += 1;
        Ok(StatusIndex(index))
    }

    /// Advances the shared counter by `BLOCK` and returns the indices it passed over.
    async fn reserve(&self) -> Result<Range<u64>, StatusListError> {
        let now = self.clock.now_ms();
        let reserved = self
            .store
            .write(move |tx| {
                let next = next_index(tx)?;
                let Some(end) = next.checked_add(BLOCK) else {
                    return Ok::<_, StoreError>(None);
                };
                tx.put(
                    &STATUS_ALLOCATION,
                    STATUS_ALLOCATION_KEY,
                    &StatusAllocation {
                        next_index: end,
                        reserved_at_ms: now,
                    },
                )?;
                Ok(Some(next..end))
            })
            .await?;
        reserved.ok_or(StatusListError::Exhausted)
    }

    /// The `status` claim of the token holding `index`.
    pub fn claim(&self, index: StatusIndex) -> TokenStatus {
        TokenStatus {
            status_list: StatusListRef {
                idx: index.idx(),
                uri: self.uri(index.list()),
            },
        }
    }

    fn uri(&self, list: u64) -> String {
        format!("{}{list}", self.settings.uri_base)
    }

    /// List `list`, signed, as a verifier gets it: the one in memory while it is fresh
    /// (`fresh`), else built again on a blocking thread by one caller at a time, while
    /// the others get the one in memory if it is younger than `REBUILD_AFTER`, or wait
    /// for the build. Unknown when no index of it has been reserved yet.
    pub async fn serve(self: &Arc<Self>, list: u64) -> Result<ServedList, StatusListError> {
        if let Some(fresh) = self.fresh(list) {
            return Ok(fresh);
        }
        self.check_known(list)?;
        let _one_build = match self.building.try_lock() {
            Ok(guard) => guard,
            Err(_) => {
                if let Some(recent) = self.recent(list) {
                    return Ok(recent);
                }
                self.building.lock().await
            }
        };
        if let Some(fresh) = self.fresh(list) {
            return Ok(fresh);
        }
        let this = self.clone();
        let served = tokio::task::spawn_blocking(move || this.build(list))
            .await
            .map_err(|e| StatusListError::Interrupted(e.to_string()))??;
        let mut built = self.built.lock().unwrap_or_else(|p| p.into_inner());
        // Lists nobody asks for any more are not kept.
        built.retain(|_, old| old.built_at.elapsed() < REBUILD_AFTER * 4);
        built.insert(list, served.clone());
        Ok(served)
    }

    /// Whether list `list` may exist: below the lists this node knows of, or, at most
    /// every `REBUILD_GAP`, below the lists the shared counter says exist (another node
    /// may have started one). A made-up number costs no store read most of the time.
    fn check_known(&self, list: u64) -> Result<(), StatusListError> {
        if list < lists_below(self.known_next.load(Ordering::Acquire)) {
            return Ok(());
        }
        {
            let mut checked = self
                .counter_read_at
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if checked.is_some_and(|at| at.elapsed() < REBUILD_GAP) {
                return Err(StatusListError::UnknownList(list));
            }
            *checked = Some(Instant::now());
        }
        let next = self.store.read(next_index)?;
        self.known_next.fetch_max(next, Ordering::AcqRel);
        if list < lists_below(next) {
            Ok(())
        } else {
            Err(StatusListError::UnknownList(list))
        }
    }

    /// List `list` as last built, if younger than `REBUILD_AFTER` (served while another
    /// caller builds it again).
    fn recent(&self, list: u64) -> Option<ServedList> {
        self.last_built(list, |served| served.built_at.elapsed() < REBUILD_AFTER)
    }

    /// List `list` as last built, if it may still be served: younger than `REBUILD_GAP`,
    /// or younger than `REBUILD_AFTER` with nothing committed on this node since. No I/O.
    fn fresh(&self, list: u64) -> Option<ServedList> {
        let commits = self.store.commits();
        self.last_built(list, |served| {
            let age = served.built_at.elapsed();
            age < REBUILD_GAP || (age < REBUILD_AFTER && served.commits == commits)
        })
    }

    fn last_built(&self, list: u64, usable: impl Fn(&ServedList) -> bool) -> Option<ServedList> {
        self.built
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&list)
            .filter(|served| usable(served))
            .cloned()
    }

    /// Reads the list's revoked indices, sets their bits, compresses and signs.
    fn build(&self, list: u64) -> Result<ServedList, StatusListError> {
        // Read before the rows: a commit after this count makes the list stale.
        let commits = self.store.commits();
        let now = self.clock.now_ms();
        let prefix = status_list_prefix(list);
        // `serve` has checked that the list exists (`check_known`).
        let rows = self
            .store
            .read(|tx| tx.prefixed(&STATUS_REVOKED, &prefix, None, usize::MAX))?;
        let mut bytes = vec![0u8; usize::try_from(LIST_LEN / 8).unwrap_or(0)];
        for (key, row) in &rows {
            // A token expired beyond the leeway a verifier allows is refused for its
            // `exp`: its bit says nothing more, and the row only waits for the prune.
            if row
                .expires_at_ms
                .saturating_add(millis(self.settings.leeway))
                <= now
            {
                continue;
            }
            let Some(low) = key.get(prefix.len()..) else {
                continue;
            };
            let Ok(idx) = usize::from_str_radix(low, 16) else {
                continue;
            };
            if let Some(byte) = bytes.get_mut(idx / 8) {
                // Index 0 is the least significant bit of the first byte (section 4.1).
                *byte |= 1 << (idx % 8);
            }
        }
        let lst = data_encoding::BASE64URL_NOPAD.encode(&compress(&bytes)?);
        let iat = now / 1000;
        let uri = self.uri(list);
        let claims = ListClaims {
            sub: &uri,
            iat,
            exp: iat + self.settings.valid_for.as_secs(),
            ttl: self.settings.ttl.as_secs(),
            status_list: ListBits { bits: 1, lst },
        };
        let token = self.keys.sign_typed(&claims, STATUS_LIST_TYP)?;
        Ok(ServedList {
            token: token.into(),
            ttl: self.settings.ttl,
            built_at: Instant::now(),
            commits,
        })
    }

    /// Deletes the rows of tokens expired beyond `leeway`; for the scheduler.
    pub(crate) async fn prune(&self, leeway: Duration) -> Result<u64, StoreError> {
        let cutoff = self.clock.now_ms().saturating_sub(millis(leeway));
        self.store
            .write(move |tx| tx.retain(&STATUS_REVOKED, |_, row| row.expires_at_ms > cutoff))
            .await
    }
}

/// zlib (RFC 1950) at the default level: a list of zeros shrinks to a few hundred bytes.
fn compress(bytes: &[u8]) -> Result<Vec<u8>, StatusListError> {
    let mut encoder = flate2::write::ZlibEncoder::new(
        Vec::with_capacity(bytes.len() / 16),
        flate2::Compression::default(),
    );
    encoder
        .write_all(bytes)
        .map_err(StatusListError::Compress)?;
    encoder.finish().map_err(StatusListError::Compress)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_index_splits_into_list_and_bit_and_back() {
        let index = StatusIndex::new((3 << STATUS_LIST_INDEX_BITS) | 77);
        assert_eq!((index.list(), index.idx()), (3, 77));
        let claim = TokenStatus {
            status_list: StatusListRef {
                idx: 77,
                uri: "https://auth.example/v1/statuslists/3".into(),
            },
        };
        assert_eq!(StatusIndex::of_claim(&claim), Some(index));
        for (idx, uri) in [
            (LIST_LEN, "https://a/v1/statuslists/3"),
            (1, "https://a/v1/statuslists/"),
            (1, "https://a/v1/statuslists/-3"),
            (1, "https://a/v1/statuslists/3x"),
            (1, "https://a/v1/statuslists/99999999999999999999"),
        ] {
            let claim = TokenStatus {
                status_list: StatusListRef {
                    idx,
                    uri: uri.into(),
                },
            };
            assert_eq!(StatusIndex::of_claim(&claim), None, "{uri} {idx}");
        }
    }

    #[test]
    fn live_slots_are_kept_and_the_new_one_added() {
        let old = StatusSlot {
            index: 1,
            expires_at_ms: 1_000,
        };
        let live = StatusSlot {
            index: 2,
            expires_at_ms: 5_000,
        };
        let new = StatusSlot {
            index: 9,
            expires_at_ms: 9_000,
        };
        assert_eq!(
            keep_live(&[old, live], Some(new), 2_000, 500),
            vec![live, new]
        );
        assert_eq!(keep_live(&[old], None, 1_400, 500), vec![old]);
    }

    #[test]
    fn zlib_output_inflates_to_the_input() {
        let mut bytes = vec![0u8; 1 << 17];
        bytes[0] = 0b1000_0001;
        bytes[70_000] = 4;
        let packed = compress(&bytes).unwrap_or_default();
        assert!(packed.len() < 1024, "{}", packed.len());
        let mut inflated = Vec::new();
        let mut decoder = flate2::read::ZlibDecoder::new(packed.as_slice());
        std::io::Read::read_to_end(&mut decoder, &mut inflated).unwrap_or_default();
        assert_eq!(inflated, bytes);
    }
}
