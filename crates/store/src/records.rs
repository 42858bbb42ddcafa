//! Versioned records stored in the data file, encoded with postcard.
//!
//! Every stored value is an enum whose variants are the record's versions. Variants are
//! only ever appended (postcard encodes the variant index), never reordered or removed
//! while a released format may hold them. Only this module knows the old versions: it
//! decodes any of them and upgrades to the current struct, which is what the rest of the
//! crate sees.

use serde::{Deserialize, Serialize};

/// Why a stored value could not be decoded.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct DecodeError(String);

/// Encodes any record with postcard (used by migrations and by fixture builders).
pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    // Invariant: postcard serialisation into a Vec fails only for types serde cannot
    // represent (e.g. maps with non-string keys in some formats); our records have none.
    #[allow(clippy::expect_used)]
    postcard::to_stdvec(value).expect("records are always serialisable")
}

/// Decodes one whole record; trailing bytes are an error.
pub fn decode<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, DecodeError> {
    let (value, rest) =
        postcard::take_from_bytes(bytes).map_err(|err| DecodeError(err.to_string()))?;
    if !rest.is_empty() {
        return Err(DecodeError(format!("{} trailing bytes", rest.len())));
    }
    Ok(value)
}

// ---------------------------------------------------------------------------------------
// Admin tokens (`admin_tokens.v1`)

/// An admin token as the rest of the crate sees it (current version: 2).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdminToken {
    pub name: String,
    /// SHA-256 of the token's secret part; the secret itself is never stored.
    pub secret_hash: [u8; 32],
    pub created_at_ms: u64,
    pub last_used_at_ms: Option<u64>,
    /// Revoked tokens are kept so that `admin-token list` and the audit trail can name them.
    pub revoked_at_ms: Option<u64>,
}

/// Format 1 stored no use or revocation times (revocation deleted the row).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdminTokenV1 {
    pub name: String,
    pub secret_hash: [u8; 32],
    pub created_at_ms: u64,
}

#[derive(Debug, Serialize, Deserialize)]
pub enum AdminTokenRecord {
    V1(AdminTokenV1),
    V2(AdminToken),
}

impl AdminTokenRecord {
    pub fn into_current(self) -> AdminToken {
        match self {
            Self::V1(v1) => AdminToken {
                name: v1.name,
                secret_hash: v1.secret_hash,
                created_at_ms: v1.created_at_ms,
                last_used_at_ms: None,
                revoked_at_ms: None,
            },
            Self::V2(current) => current,
        }
    }
}

pub(crate) fn encode_admin_token(token: &AdminToken) -> Vec<u8> {
    // Serialise the current variant without cloning the struct.
    #[derive(Serialize)]
    enum Borrowed<'a> {
        #[allow(dead_code)]
        V1(()),
        V2(&'a AdminToken),
    }
    encode(&Borrowed::V2(token))
}

pub(crate) fn decode_admin_token(bytes: &[u8]) -> Result<AdminToken, DecodeError> {
    decode::<AdminTokenRecord>(bytes).map(AdminTokenRecord::into_current)
}

// ---------------------------------------------------------------------------------------
// Sealed secrets (`secrets.v1`): the plaintext inside each seal is one of these.

/// The self-signed certificate served when no domain is configured.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SelfSignedCert {
    pub cert_der: Vec<u8>,
    /// PKCS#8 DER of the certificate's private key.
    pub key_der: Vec<u8>,
    /// The DNS names and IP addresses in the certificate, as text.
    pub names: Vec<String>,
    pub created_at_ms: u64,
    pub not_after_ms: u64,
}

#[derive(Debug, Serialize, Deserialize)]
pub enum SelfSignedCertRecord {
    V1(SelfSignedCert),
}

/// An admin user of the web UI (`admin-user/<name>` in `secrets.v1`): sealed, so a
/// stolen data file gives no password hash to guess at.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdminUser {
    pub name: String,
    /// argon2id, PHC string form.
    pub password_hash: String,
    pub created_at_ms: u64,
    pub password_changed_at_ms: u64,
}

#[derive(Debug, Serialize, Deserialize)]
pub enum AdminUserRecord {
    V1(AdminUser),
}

/// An ACME account: its key, per directory (`acme/account/<id>` in `secrets.v1`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AcmeAccount {
    pub directory: String,
    pub contact: Vec<String>,
    /// PKCS#8 DER of the account's ECDSA P-256 key.
    pub key_pkcs8: Vec<u8>,
    pub created_at_ms: u64,
    /// The External Account Binding key id the account was registered with, if any.
    pub eab_kid: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
pub enum AcmeAccountRecord {
    V1(AcmeAccount),
}

/// A certificate an ACME CA issued (`acme/cert/<id>` in `secrets.v1`): kept so a restart
/// or a restored backup serves it at once, with no new order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AcmeCertificate {
    pub directory: String,
    /// The names ordered, sorted.
    pub domains: Vec<String>,
    /// PEM: the private key, then the chain (leaf first).
    pub pem: Vec<u8>,
    pub issued_at_ms: u64,
    pub not_after_ms: u64,
}

#[derive(Debug, Serialize, Deserialize)]
pub enum AcmeCertificateRecord {
    V1(AcmeCertificate),
}

/// Who orders the certificate for one directory and name set, so that the nodes sharing a
/// database place one order at a time (`acme/order/<id>/<names-id>` in `secrets.v1`).
/// Nothing in it is secret: it is sealed because it lives beside the certificate it
/// guards, and a new kind of row there needs no format change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AcmeOrderLease {
    pub directory: String,
    /// The names ordered, sorted.
    pub domains: Vec<String>,
    /// The node that holds the lease (its host name and a random id per process).
    pub holder: String,
    pub taken_at_ms: u64,
    /// From then on any node may take the lease; until then only its holder orders.
    pub expires_at_ms: u64,
    /// Orders that failed in a row, on whichever node: the backoff is the cluster's.
    pub failures_in_row: u32,
    /// The last failure's error, cut to 400 characters.
    pub last_error: Option<String>,
    /// After a failure: when the holder tries again.
    pub retry_at_ms: Option<u64>,
}

#[derive(Debug, Serialize, Deserialize)]
pub enum AcmeOrderLeaseRecord {
    V1(AcmeOrderLease),
}

/// The TLS-ALPN-01 challenge certificate for one name while an order waits on its
/// validation (`acme/challenge/<name>` in `secrets.v1`), so that whichever node the CA
/// connects to can answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AcmeChallenge {
    pub directory: String,
    /// The DNS name validated (lowercase); the certificate names only it.
    pub name: String,
    /// The self-signed challenge certificate (DER) carrying the acmeIdentifier extension.
    pub cert_der: Vec<u8>,
    /// PKCS#8 DER of its ECDSA P-256 key, made for this challenge alone.
    pub key_pkcs8: Vec<u8>,
    pub created_at_ms: u64,
    /// No node answers with it after this, even if the order never removed it.
    pub expires_at_ms: u64,
}

#[derive(Debug, Serialize, Deserialize)]
pub enum AcmeChallengeRecord {
    V1(AcmeChallenge),
}

// ---------------------------------------------------------------------------------------
// Signing keys (`signing_keys.v1`; private halves sealed in `secrets.v1`)

/// A signing key's algorithm. Stored as the variant index: append only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum StoredKeyAlgorithm {
    Ed25519,
    EcdsaP256,
}

/// Where a key is in its life. Retired keys are deleted, so there is no variant for them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum StoredKeyState {
    Next,
    Active,
    Retiring,
    Revoked,
}

/// The public half and life of a signing key, keyed by its `kid`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SigningKey {
    pub algorithm: StoredKeyAlgorithm,
    /// Ed25519: the 32-byte key; P-256: the 65-byte uncompressed point.
    pub public_key: Vec<u8>,
    pub state: StoredKeyState,
    pub created_at_ms: u64,
    pub activated_at_ms: Option<u64>,
    pub retiring_at_ms: Option<u64>,
    pub revoked_at_ms: Option<u64>,
    /// Retiring and revoked keys: when no token they signed can be valid any more, and
    /// the row may go.
    pub verify_until_ms: Option<u64>,
}

#[derive(Debug, Serialize, Deserialize)]
pub enum SigningKeyRecord {
    V1(SigningKey),
}

/// The private half of a signing key, sealed under `signing-key/<kid>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SigningKeyPrivate {
    /// PKCS#8 DER as ring generates it.
    pub pkcs8: Vec<u8>,
}

#[derive(Debug, Serialize, Deserialize)]
pub enum SigningKeyPrivateRecord {
    V1(SigningKeyPrivate),
}

// ---------------------------------------------------------------------------------------
// Pairing sessions (`pairing_sessions.v1`)

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PairingSession {
    /// What the operator called the device-to-be.
    pub name: Option<String>,
    /// SHA-256 of the one-time secret; the secret itself is never stored.
    pub secret_hash: [u8; 32],
    pub created_at_ms: u64,
    pub expires_at_ms: u64,
    /// Who made it: an admin token id, or `"cli"`.
    pub created_by: String,
    pub claimed_at_ms: Option<u64>,
    /// The device that claimed it (text id).
    pub device_id: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
pub enum PairingSessionRecord {
    V1(PairingSession),
}

// ---------------------------------------------------------------------------------------
// Device authorization grants (`device_grants.v1`)

/// One RFC 8628 device authorization request and what became of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceGrant {
    /// SHA-256 of the device code's secret part; the secret itself is never stored.
    pub secret_hash: [u8; 32],
    /// SHA-256 of the normalised user code (also the key of its index row).
    pub user_code_hash: [u8; 32],
    /// The `client_id` the device sent, if any: shown to the operator, never trusted.
    pub client_id: Option<String>,
    /// The client address the request came from.
    pub requested_from: String,
    pub created_at_ms: u64,
    pub expires_at_ms: u64,
    /// The polling interval the device must keep, in seconds (raised by `slow_down`).
    pub interval_secs: u32,
    pub last_poll_ms: Option<u64>,
    pub state: DeviceGrantState,
}

/// Where a device grant stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeviceGrantState {
    /// Waiting for an operator.
    Pending,
    /// Approved: the device exists; its first tokens wait for the device's next poll.
    Approved {
        device_id: String,
        /// Who approved: an admin token id, a user, or `"cli"`.
        by: String,
        at_ms: u64,
    },
    Denied {
        by: String,
        at_ms: u64,
    },
    /// The device took its tokens: the code is spent.
    Issued {
        device_id: String,
        family_id: String,
        at_ms: u64,
    },
}

#[derive(Debug, Serialize, Deserialize)]
pub enum DeviceGrantRecord {
    V1(DeviceGrant),
}

// ---------------------------------------------------------------------------------------
// Devices (`devices.v1`)

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Device {
    pub name: String,
    pub platform: String,
    pub app_version: String,
    pub created_at_ms: u64,
    pub last_seen_ms: u64,
    /// The client address the pairing came from.
    pub paired_from: String,
    /// The pairing session it claimed (text id).
    pub pairing_session: String,
    pub revoked_at_ms: Option<u64>,
}

#[derive(Debug, Serialize, Deserialize)]
pub enum DeviceRecord {
    V1(Device),
}

// ---------------------------------------------------------------------------------------
// Refresh-token families (`token_families.v1`) and refresh tokens (`refresh_tokens.v1`)

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenFamily {
    pub device_id: String,
    pub created_at_ms: u64,
    /// How many refresh tokens the family has had (the first is 1).
    pub generation: u32,
    /// When the current refresh token expires; the family is spent after that.
    pub refresh_expires_at_ms: u64,
    pub revoked_at_ms: Option<u64>,
    /// Why it was revoked, for operators: `"reuse"`, `"revoked"`, `"device revoked"`.
    pub revoke_reason: Option<String>,
    /// The status-list places of the family's access tokens that may still be presented
    /// (older ones are dropped whenever the row is written): revoking the family sets
    /// their bits.
    pub status: Vec<StatusSlot>,
}

/// Where one access token's revocation bit lives, and until when it matters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusSlot {
    /// The token's index across every status list (list = index >> 20).
    pub index: u64,
    /// The token's own `exp`, in milliseconds.
    pub expires_at_ms: u64,
}

/// Formats 3 to 10 stored no status-list places.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenFamilyV1 {
    pub device_id: String,
    pub created_at_ms: u64,
    pub generation: u32,
    pub refresh_expires_at_ms: u64,
    pub revoked_at_ms: Option<u64>,
    pub revoke_reason: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
pub enum TokenFamilyRecord {
    V1(TokenFamilyV1),
    V2(TokenFamily),
}

impl TokenFamilyRecord {
    pub fn into_current(self) -> TokenFamily {
        match self {
            Self::V1(v1) => TokenFamily {
                device_id: v1.device_id,
                created_at_ms: v1.created_at_ms,
                generation: v1.generation,
                refresh_expires_at_ms: v1.refresh_expires_at_ms,
                revoked_at_ms: v1.revoked_at_ms,
                revoke_reason: v1.revoke_reason,
                status: Vec::new(),
            },
            Self::V2(current) => current,
        }
    }
}

pub(crate) fn encode_token_family(family: &TokenFamily) -> Vec<u8> {
    #[derive(Serialize)]
    enum Borrowed<'a> {
        #[allow(dead_code)]
        V1(()),
        V2(&'a TokenFamily),
    }
    encode(&Borrowed::V2(family))
}

pub(crate) fn decode_token_family(bytes: &[u8]) -> Result<TokenFamily, DecodeError> {
    decode::<TokenFamilyRecord>(bytes).map(TokenFamilyRecord::into_current)
}

/// The key a token family is bound to (DPoP): every refresh of the family needs a proof
/// signed by it, and every access token of the family names it (`cnf.jkt`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FamilyBinding {
    /// The key's RFC 7638 SHA-256 thumbprint, base64url (43 characters).
    pub jkt: String,
    pub bound_at_ms: u64,
}

#[derive(Debug, Serialize, Deserialize)]
pub enum FamilyBindingRecord {
    V1(FamilyBinding),
}

/// One refresh token, keyed by the hex SHA-256 of its text.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefreshToken {
    pub family_id: String,
    pub device_id: String,
    pub issued_at_ms: u64,
    pub expires_at_ms: u64,
    /// Set when it was exchanged: presenting it again is reuse.
    pub spent_at_ms: Option<u64>,
}

#[derive(Debug, Serialize, Deserialize)]
pub enum RefreshTokenRecord {
    V1(RefreshToken),
}

// ---------------------------------------------------------------------------------------
// The revocation journal (`family_revocations.v1`)

/// A family revoked and not yet folded into its `TokenFamily` row.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FamilyRevocation {
    pub family_id: String,
    pub revoked_at_ms: u64,
    /// As `TokenFamily::revoke_reason`.
    pub reason: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub enum FamilyRevocationRecord {
    V1(FamilyRevocation),
}

// ---------------------------------------------------------------------------------------
// Revoked access tokens (`revoked_tokens.v1`)

/// An access token revoked by its `jti`; the row goes once the token has expired.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevokedToken {
    pub device_id: String,
    /// The token's own `exp`, in milliseconds.
    pub expires_at_ms: u64,
    pub revoked_at_ms: u64,
}

#[derive(Debug, Serialize, Deserialize)]
pub enum RevokedTokenRecord {
    V1(RevokedToken),
}

// ---------------------------------------------------------------------------------------
// Token status lists (`status_revoked.v1`, `status_allocation.v1`)

/// A status-list index whose token is revoked (its bit is 1), keyed by the index; the
/// row goes once the token has expired.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusRevoked {
    /// The token's own `exp`, in milliseconds.
    pub expires_at_ms: u64,
    pub revoked_at_ms: u64,
}

#[derive(Debug, Serialize, Deserialize)]
pub enum StatusRevokedRecord {
    V1(StatusRevoked),
}

/// The next status-list index no node has reserved: indices below it are handed out (or
/// lost with a stopped node's block), never again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusAllocation {
    pub next_index: u64,
    pub reserved_at_ms: u64,
}

#[derive(Debug, Serialize, Deserialize)]
pub enum StatusAllocationRecord {
    V1(StatusAllocation),
}

// ---------------------------------------------------------------------------------------
// API clients (`clients.v1`)

/// A registered client that may call `/v1/introspect` with HTTP Basic credentials.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Client {
    pub name: String,
    pub secret_hash: [u8; 32],
    pub created_at_ms: u64,
    pub revoked_at_ms: Option<u64>,
}

#[derive(Debug, Serialize, Deserialize)]
pub enum ClientRecord {
    V1(Client),
}

// ---------------------------------------------------------------------------------------
// Rate-limit windows (`rate_windows.v1`)

/// One subject's GCRA state under one policy: its theoretical arrival time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RateWindow {
    pub tat_us: u64,
}

#[derive(Debug, Serialize, Deserialize)]
pub enum RateWindowRecord {
    V1(RateWindow),
}

// ---------------------------------------------------------------------------------------
// Audit log (`audit_events.v1`, `audit_checkpoint.v1`)

/// One audit event as stored. The chain fields (`prev`, and the tag in front of the
/// encoded record) are set by the store when it appends; see `store::audit_chain`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    pub time_ms: u64,
    /// The event type, e.g. `device.revoked` (`schema/audit-events.md`).
    pub kind: String,
    pub severity: String,
    /// `admin:<token id>`, `device:<id>`, `client:<id>`, `system` or `anonymous`.
    pub actor: String,
    pub source: Option<String>,
    pub request_id: Option<String>,
    pub outcome: String,
    /// The device the event concerns, if any (the `device` filter of the query).
    pub device: Option<String>,
    /// A compact JSON object.
    pub details: String,
    /// The tag of the previous record (zeros for the first record of a new log).
    pub prev: [u8; 32],
}

/// Version 1 is a record of the data file's one chain, where a record's place is its
/// sequence number. Version 2 is a record of one node's own chain (PostgreSQL, where
/// several nodes append at once): the chain, the place in it, and the other chains'
/// places the record binds (`NodeRecord::heads`).
#[derive(Debug, Serialize, Deserialize)]
pub enum AuditEntryRecord {
    V1(AuditEntry),
    V2(NodeRecord),
}

/// An audit record of one node's chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// The chain: a random number a node draws when it starts one.
    pub chain: u64,
    /// The record's place in its chain (1, 2, …); `entry.prev` is the tag of the one
    /// before.
    pub n: u64,
    /// Other chains' places this record vouches for (a checkpoint): each chain named
    /// must hold at least that many records up to here. Empty for an ordinary record.
    pub heads: Vec<ChainPlace>,
    pub entry: AuditEntry,
}

/// A chain and a place in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChainPlace {
    pub chain: u64,
    pub n: u64,
}

/// A decoded audit row's record: the event and, for a node's chain, where it sits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodedAuditEntry {
    Single(AuditEntry),
    Node(NodeRecord),
}

impl DecodedAuditEntry {
    pub fn entry(&self) -> &AuditEntry {
        match self {
            Self::Single(entry) => entry,
            Self::Node(record) => &record.entry,
        }
    }

    pub fn into_entry(self) -> AuditEntry {
        match self {
            Self::Single(entry) => entry,
            Self::Node(record) => record.entry,
        }
    }
}

pub(crate) fn encode_audit_entry(value: &AuditEntry) -> Vec<u8> {
    #[derive(Serialize)]
    enum Borrowed<'a> {
        V1(&'a AuditEntry),
    }
    encode(&Borrowed::V1(value))
}

pub(crate) fn encode_audit_node_record(value: &NodeRecord) -> Vec<u8> {
    #[derive(Serialize)]
    enum Borrowed<'a> {
        #[allow(dead_code)]
        V1(&'a AuditEntry),
        V2(&'a NodeRecord),
    }
    encode(&Borrowed::V2(value))
}

pub(crate) fn decode_audit_record(bytes: &[u8]) -> Result<DecodedAuditEntry, DecodeError> {
    decode::<AuditEntryRecord>(bytes).map(|record| match record {
        AuditEntryRecord::V1(entry) => DecodedAuditEntry::Single(entry),
        AuditEntryRecord::V2(record) => DecodedAuditEntry::Node(record),
    })
}

/// Where the audit log starts after pruning, tagged with the chain key.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AuditCheckpoint {
    /// The sequence number of the first record that was kept.
    pub next_seq: u64,
    /// The tag of the last record pruned: the `prev` the first kept record must carry.
    pub prev: [u8; 32],
    /// How many records have been pruned in all.
    pub pruned: u64,
    /// The time of the newest record pruned.
    pub pruned_through_ms: u64,
    /// Where each node's chain goes on after pruning (empty for a data file's one chain).
    pub chains: Vec<ChainStart>,
    /// HMAC-SHA256 under the chain key over the fields above.
    pub tag: [u8; 32],
}

/// Where a node's chain goes on after pruning: the place of its first kept record and
/// the tag that record must carry as `prev`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChainStart {
    pub chain: u64,
    pub next_n: u64,
    pub prev: [u8; 32],
}

/// The checkpoint of a data file's one chain.
#[derive(Debug, Serialize, Deserialize)]
pub struct AuditCheckpointV1 {
    pub next_seq: u64,
    pub prev: [u8; 32],
    pub pruned: u64,
    pub pruned_through_ms: u64,
    pub tag: [u8; 32],
}

/// The checkpoint of a log with node chains.
#[derive(Debug, Serialize, Deserialize)]
pub struct AuditCheckpointV2 {
    pub next_seq: u64,
    pub prev: [u8; 32],
    pub pruned: u64,
    pub pruned_through_ms: u64,
    pub chains: Vec<ChainStart>,
    pub tag: [u8; 32],
}

/// Version 1 is written while no node chain was pruned, so a data file's checkpoint
/// reads as it always did.
#[derive(Debug, Serialize, Deserialize)]
pub enum AuditCheckpointRecord {
    V1(AuditCheckpointV1),
    V2(AuditCheckpointV2),
}

pub(crate) fn encode_audit_checkpoint(cp: &AuditCheckpoint) -> Vec<u8> {
    if cp.chains.is_empty() {
        encode(&AuditCheckpointRecord::V1(AuditCheckpointV1 {
            next_seq: cp.next_seq,
            prev: cp.prev,
            pruned: cp.pruned,
            pruned_through_ms: cp.pruned_through_ms,
            tag: cp.tag,
        }))
    } else {
        encode(&AuditCheckpointRecord::V2(AuditCheckpointV2 {
            next_seq: cp.next_seq,
            prev: cp.prev,
            pruned: cp.pruned,
            pruned_through_ms: cp.pruned_through_ms,
            chains: cp.chains.clone(),
            tag: cp.tag,
        }))
    }
}

pub(crate) fn decode_audit_checkpoint(bytes: &[u8]) -> Result<AuditCheckpoint, DecodeError> {
    Ok(match decode::<AuditCheckpointRecord>(bytes)? {
        AuditCheckpointRecord::V1(cp) => AuditCheckpoint {
            next_seq: cp.next_seq,
            prev: cp.prev,
            pruned: cp.pruned,
            pruned_through_ms: cp.pruned_through_ms,
            chains: Vec::new(),
            tag: cp.tag,
        },
        AuditCheckpointRecord::V2(cp) => AuditCheckpoint {
            next_seq: cp.next_seq,
            prev: cp.prev,
            pruned: cp.pruned,
            pruned_through_ms: cp.pruned_through_ms,
            chains: cp.chains,
            tag: cp.tag,
        },
    })
}

/// The last record of one node's chain (`audit_checkpoint.v1`, key `head/<chain>`):
/// what a checkpoint record binds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChainHead {
    pub n: u64,
    pub time_ms: u64,
}

#[derive(Debug, Serialize, Deserialize)]
pub enum ChainHeadRecord {
    V1(ChainHead),
}

// ---------------------------------------------------------------------------------------
// Bans (`bans.v1`)

/// A lockout ban on one subject. Kept after it ends (while `offences` still counts
/// toward a longer next ban) and pruned once that memory has lapsed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ban {
    pub since_ms: u64,
    pub until_ms: u64,
    /// How many bans this subject has earned in a row (1 for the first).
    pub offences: u32,
    /// Which secret check failed last, e.g. `admin_token`.
    pub reason: String,
    /// Set when an admin lifted the ban early.
    pub lifted_at_ms: Option<u64>,
}

#[derive(Debug, Serialize, Deserialize)]
pub enum BanRecord {
    V1(Ban),
}

// ---------------------------------------------------------------------------------------
// Scheduled jobs (`jobs.v1`)

/// What the scheduler remembers of one job.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct JobState {
    /// When the last run started, and how long it took.
    pub last_started_ms: Option<u64>,
    pub last_duration_ms: Option<u64>,
    /// `success` or `failure`.
    pub last_outcome: Option<String>,
    pub last_error: Option<String>,
    pub last_success_ms: Option<u64>,
    /// When the job is due next (a scheduled time, or a retry after a failure).
    pub next_run_ms: Option<u64>,
    /// Failed runs in a row (0 after a success); sets the retry backoff.
    pub failures: u32,
}

#[derive(Debug, Serialize, Deserialize)]
pub enum JobStateRecord {
    V1(JobState),
}

/// Encoding and decoding of the single-version records above, one pair per record.
macro_rules! single_version_codec {
    ($($encode:ident, $decode:ident, $record:ident, $current:ident;)*) => {$(
        pub(crate) fn $encode(value: &$current) -> Vec<u8> {
            #[derive(Serialize)]
            enum Borrowed<'a> {
                V1(&'a $current),
            }
            encode(&Borrowed::V1(value))
        }

        pub(crate) fn $decode(bytes: &[u8]) -> Result<$current, DecodeError> {
            decode::<$record>(bytes).map(|$record::V1(v)| v)
        }
    )*};
}

single_version_codec! {
    encode_signing_key, decode_signing_key, SigningKeyRecord, SigningKey;
    encode_signing_key_private, decode_signing_key_private, SigningKeyPrivateRecord, SigningKeyPrivate;
    encode_pairing_session, decode_pairing_session, PairingSessionRecord, PairingSession;
    encode_device, decode_device, DeviceRecord, Device;
    encode_device_grant, decode_device_grant, DeviceGrantRecord, DeviceGrant;
    encode_family_binding, decode_family_binding, FamilyBindingRecord, FamilyBinding;
    encode_refresh_token, decode_refresh_token, RefreshTokenRecord, RefreshToken;
    encode_revoked_token, decode_revoked_token, RevokedTokenRecord, RevokedToken;
    encode_status_revoked, decode_status_revoked, StatusRevokedRecord, StatusRevoked;
    encode_status_allocation, decode_status_allocation, StatusAllocationRecord, StatusAllocation;
    encode_family_revocation, decode_family_revocation, FamilyRevocationRecord, FamilyRevocation;
    encode_client, decode_client, ClientRecord, Client;
    encode_rate_window, decode_rate_window, RateWindowRecord, RateWindow;
    encode_self_signed, decode_self_signed, SelfSignedCertRecord, SelfSignedCert;
    encode_chain_head, decode_chain_head, ChainHeadRecord, ChainHead;
    encode_ban, decode_ban, BanRecord, Ban;
    encode_job_state, decode_job_state, JobStateRecord, JobState;
    encode_admin_user, decode_admin_user, AdminUserRecord, AdminUser;
    encode_acme_account, decode_acme_account, AcmeAccountRecord, AcmeAccount;
    encode_acme_certificate, decode_acme_certificate, AcmeCertificateRecord, AcmeCertificate;
    encode_acme_order_lease, decode_acme_order_lease, AcmeOrderLeaseRecord, AcmeOrderLease;
    encode_acme_challenge, decode_acme_challenge, AcmeChallengeRecord, AcmeChallenge;
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn admin_token_round_trip(name in ".{0,80}", hash in any::<[u8; 32]>(), created in any::<u64>(),
                                  used in any::<Option<u64>>(), revoked in any::<Option<u64>>()) {
            let token = AdminToken { name, secret_hash: hash, created_at_ms: created,
                                     last_used_at_ms: used, revoked_at_ms: revoked };
            prop_assert_eq!(decode_admin_token(&encode_admin_token(&token)).unwrap(), token);
        }

        #[test]
        fn self_signed_round_trip(cert in proptest::collection::vec(any::<u8>(), 0..300),
                                  key in proptest::collection::vec(any::<u8>(), 0..100),
                                  names in proptest::collection::vec(".{0,20}", 0..4),
                                  created in any::<u64>(), after in any::<u64>()) {
            let c = SelfSignedCert { cert_der: cert, key_der: key, names,
                                     created_at_ms: created, not_after_ms: after };
            prop_assert_eq!(decode_self_signed(&encode_self_signed(&c)).unwrap(), c);
        }

        #[test]
        fn acme_lease_and_challenge_round_trip(holder in ".{0,40}", names in proptest::collection::vec(".{0,20}", 0..4),
                                               times in any::<[u64; 3]>(), failures in any::<u32>(),
                                               error in proptest::option::of(".{0,40}"), retry in any::<Option<u64>>(),
                                               der in proptest::collection::vec(any::<u8>(), 0..200)) {
            let lease = AcmeOrderLease { directory: "https://ca.test/dir".into(), domains: names, holder,
                                         taken_at_ms: times[0], expires_at_ms: times[1], failures_in_row: failures,
                                         last_error: error, retry_at_ms: retry };
            prop_assert_eq!(decode_acme_order_lease(&encode_acme_order_lease(&lease)).unwrap(), lease);
            let challenge = AcmeChallenge { directory: "https://ca.test/dir".into(), name: "a.test".into(),
                                            cert_der: der.clone(), key_pkcs8: der, created_at_ms: times[2],
                                            expires_at_ms: times[0] };
            prop_assert_eq!(decode_acme_challenge(&encode_acme_challenge(&challenge)).unwrap(), challenge);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode_admin_token(&bytes);
            let _ = decode_self_signed(&bytes);
            let _ = decode_signing_key(&bytes);
            let _ = decode_pairing_session(&bytes);
            let _ = decode_device(&bytes);
            let _ = decode_token_family(&bytes);
            let _ = decode_refresh_token(&bytes);
            let _ = decode_revoked_token(&bytes);
            let _ = decode_client(&bytes);
            let _ = decode_acme_order_lease(&bytes);
            let _ = decode_acme_challenge(&bytes);
        }

        #[test]
        fn signing_key_round_trip(public in proptest::collection::vec(any::<u8>(), 0..70),
                                  state in 0u8..4, ed in any::<bool>(), times in any::<[Option<u64>; 4]>(),
                                  created in any::<u64>()) {
            let key = SigningKey {
                algorithm: if ed { StoredKeyAlgorithm::Ed25519 } else { StoredKeyAlgorithm::EcdsaP256 },
                public_key: public,
                state: [StoredKeyState::Next, StoredKeyState::Active, StoredKeyState::Retiring,
                        StoredKeyState::Revoked][usize::from(state)],
                created_at_ms: created,
                activated_at_ms: times[0], retiring_at_ms: times[1], revoked_at_ms: times[2],
                verify_until_ms: times[3],
            };
            prop_assert_eq!(decode_signing_key(&encode_signing_key(&key)).unwrap(), key);
        }

        #[test]
        fn device_and_session_round_trip(name in ".{0,40}", platform in ".{0,20}", times in any::<[u64; 4]>(),
                                         revoked in any::<Option<u64>>(), hash in any::<[u8; 32]>()) {
            let device = Device { name: name.clone(), platform: platform.clone(), app_version: "1.0".into(),
                                  created_at_ms: times[0], last_seen_ms: times[1], paired_from: "::1".into(),
                                  pairing_session: "ps_x".into(), revoked_at_ms: revoked };
            prop_assert_eq!(decode_device(&encode_device(&device)).unwrap(), device);
            let session = PairingSession { name: Some(name), secret_hash: hash, created_at_ms: times[2],
                                           expires_at_ms: times[3], created_by: platform,
                                           claimed_at_ms: revoked, device_id: None };
            prop_assert_eq!(decode_pairing_session(&encode_pairing_session(&session)).unwrap(), session);
        }

        #[test]
        fn device_grant_round_trip(hashes in any::<[[u8; 32]; 2]>(), times in any::<[u64; 4]>(),
                                   interval in any::<u32>(), client in proptest::option::of(".{0,64}"),
                                   last in any::<Option<u64>>(), state in 0u8..4, text in ".{0,40}") {
            let state = match state {
                0 => DeviceGrantState::Pending,
                1 => DeviceGrantState::Approved { device_id: text.clone(), by: "operator".into(), at_ms: times[2] },
                2 => DeviceGrantState::Denied { by: text.clone(), at_ms: times[3] },
                _ => DeviceGrantState::Issued { device_id: text.clone(), family_id: "fam_x".into(), at_ms: times[2] },
            };
            let grant = DeviceGrant { secret_hash: hashes[0], user_code_hash: hashes[1], client_id: client,
                                      requested_from: text, created_at_ms: times[0], expires_at_ms: times[1],
                                      interval_secs: interval, last_poll_ms: last, state };
            prop_assert_eq!(decode_device_grant(&encode_device_grant(&grant)).unwrap(), grant);
        }

        #[test]
        fn family_binding_round_trip(jkt in ".{0,60}", at in any::<u64>()) {
            let binding = FamilyBinding { jkt, bound_at_ms: at };
            prop_assert_eq!(decode_family_binding(&encode_family_binding(&binding)).unwrap(), binding);
        }

        #[test]
        fn token_records_round_trip(times in any::<[u64; 4]>(), spent in any::<Option<u64>>(), generation in any::<u32>(),
                                    reason in proptest::option::of(".{0,20}")) {
            let status = vec![StatusSlot { index: times[2], expires_at_ms: times[3] }; (generation % 3) as usize];
            let family = TokenFamily { device_id: "dev_x".into(), created_at_ms: times[0], generation,
                                       refresh_expires_at_ms: times[1], revoked_at_ms: spent, revoke_reason: reason,
                                       status };
            prop_assert_eq!(decode_token_family(&encode_token_family(&family)).unwrap(), family.clone());
            let v1 = TokenFamilyV1 { device_id: family.device_id.clone(), created_at_ms: family.created_at_ms,
                                     generation, refresh_expires_at_ms: family.refresh_expires_at_ms,
                                     revoked_at_ms: spent, revoke_reason: family.revoke_reason.clone() };
            let upgraded = decode_token_family(&encode(&TokenFamilyRecord::V1(v1))).unwrap();
            prop_assert_eq!(upgraded, TokenFamily { status: Vec::new(), ..family });
            let bit = StatusRevoked { expires_at_ms: times[0], revoked_at_ms: times[1] };
            prop_assert_eq!(decode_status_revoked(&encode_status_revoked(&bit)).unwrap(), bit);
            let next = StatusAllocation { next_index: times[2], reserved_at_ms: times[3] };
            prop_assert_eq!(decode_status_allocation(&encode_status_allocation(&next)).unwrap(), next);
            let refresh = RefreshToken { family_id: "fam_x".into(), device_id: "dev_x".into(),
                                         issued_at_ms: times[2], expires_at_ms: times[3], spent_at_ms: spent };
            prop_assert_eq!(decode_refresh_token(&encode_refresh_token(&refresh)).unwrap(), refresh);
            let revoked = RevokedToken { device_id: "dev_x".into(), expires_at_ms: times[0], revoked_at_ms: times[1] };
            prop_assert_eq!(decode_revoked_token(&encode_revoked_token(&revoked)).unwrap(), revoked);
            let client = Client { name: "c".into(), secret_hash: [3; 32], created_at_ms: times[2], revoked_at_ms: spent };
            prop_assert_eq!(decode_client(&encode_client(&client)).unwrap(), client);
        }
    }

    #[test]
    fn v1_admin_token_upgrades() {
        let v1 = AdminTokenV1 {
            name: "ops".into(),
            secret_hash: [7; 32],
            created_at_ms: 5,
        };
        let bytes = encode(&AdminTokenRecord::V1(v1));
        let current = decode_admin_token(&bytes).unwrap();
        assert_eq!(current.name, "ops");
        assert_eq!(current.revoked_at_ms, None);
    }

    #[test]
    fn borrowed_encoding_matches_owned_enum() {
        let token = AdminToken {
            name: "a".into(),
            secret_hash: [1; 32],
            created_at_ms: 1,
            last_used_at_ms: None,
            revoked_at_ms: Some(3),
        };
        assert_eq!(
            encode_admin_token(&token),
            encode(&AdminTokenRecord::V2(token.clone()))
        );
    }

    #[test]
    fn trailing_bytes_are_rejected() {
        let token = AdminToken {
            name: "a".into(),
            secret_hash: [1; 32],
            created_at_ms: 1,
            last_used_at_ms: None,
            revoked_at_ms: None,
        };
        let mut bytes = encode_admin_token(&token);
        bytes.push(0);
        assert!(decode_admin_token(&bytes).is_err());
    }
}
