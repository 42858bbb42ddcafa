//! Secrets at rest: AES-256-GCM (ring) under a key derived from the master key.
//!
//! This module owns the master key (its file format, where it may be created, the
//! permission rules) and the sealed-value format. It knows nothing of tables: callers
//! pass the table name and row key, which are bound into the AEAD's associated data so
//! a sealed value copied to another row, or another table, fails to open.
//!
//! Sealed value layout (version 1): `0x01 ‖ nonce (12 bytes, random) ‖ ciphertext ‖ tag (16)`.
//! The AEAD key is HKDF-SHA256(master key, salt "gatehouse/seal", info "aes-256-gcm/v1"),
//! so the raw master key is never used directly and can later derive other keys.

use std::fmt;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::hkdf;
use ring::rand::{SecureRandom, SystemRandom};

/// Length of a master key in bytes (256 bits).
pub const MASTER_KEY_LEN: usize = 32;
const SEAL_FORMAT_V1: u8 = 1;
const TAG_LEN: usize = 16;
const AAD_DOMAIN: &[u8] = b"gatehouse/seal/v1\0";

/// Errors of the master key and of sealing.
#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error("master key file {path} does not exist")]
    KeyFileMissing { path: PathBuf },
    #[error("cannot read master key file {path}: {source}")]
    KeyFileUnreadable {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "master key file {path} is readable by group or others (mode {mode:o}); \
         refusing to use it. Fix with: chmod 600 {path}"
    )]
    KeyFileExposed { path: PathBuf, mode: u32 },
    #[error(
        "master key file {path} is not a gatehouse master key: {reason} \
         (expected 64 hexadecimal characters, as written by gatehouse)"
    )]
    KeyFileMalformed { path: PathBuf, reason: String },
    #[error("cannot create master key file {path}: {source}")]
    KeyFileCreate {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the system random number generator failed")]
    Random,
    #[error("sealed value is malformed ({0})")]
    Malformed(&'static str),
    #[error("sealed value does not open: sealed under another master key, moved or edited")]
    DoesNotOpen,
}

/// The 256-bit master key. Its `Debug` output never shows the key.
pub struct MasterKey([u8; MASTER_KEY_LEN]);

impl fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MasterKey({})", self.fingerprint())
    }
}

impl MasterKey {
    /// A fresh random key.
    pub fn generate() -> Result<Self, SealError> {
        let mut bytes = [0u8; MASTER_KEY_LEN];
        SystemRandom::new()
            .fill(&mut bytes)
            .map_err(|_| SealError::Random)?;
        Ok(Self(bytes))
    }

    /// Parses the key file text: 64 hex digits, surrounding whitespace ignored.
    pub fn from_text(text: &str) -> Result<Self, String> {
        let trimmed = text.trim();
        if trimmed.len() != MASTER_KEY_LEN * 2 {
            return Err(format!(
                "found {} characters after trimming whitespace",
                trimmed.len()
            ));
        }
        let decoded = data_encoding::HEXLOWER_PERMISSIVE
            .decode(trimmed.as_bytes())
            .map_err(|_| "it contains characters that are not hexadecimal".to_string())?;
        let mut bytes = [0u8; MASTER_KEY_LEN];
        bytes.copy_from_slice(&decoded);
        Ok(Self(bytes))
    }

    /// The key file text: 64 lowercase hex digits and a newline.
    pub fn to_text(&self) -> String {
        let mut text = data_encoding::HEXLOWER.encode(&self.0);
        text.push('\n');
        text
    }

    /// A short, non-secret name for this key (for logs and `doctor`): 8 bytes of
    /// HKDF output under a label of its own, so it reveals nothing about the key.
    pub fn fingerprint(&self) -> String {
        let mut out = [0u8; 8];
        derive(&self.0, b"fingerprint/v1", &mut out);
        data_encoding::HEXLOWER.encode(&out)
    }

    /// Reads a key file, refusing one that group or others may read.
    pub fn load(path: &Path) -> Result<Self, SealError> {
        let meta = match fs::metadata(path) {
            Ok(meta) => meta,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                return Err(SealError::KeyFileMissing {
                    path: path.to_path_buf(),
                });
            }
            Err(source) => {
                return Err(SealError::KeyFileUnreadable {
                    path: path.to_path_buf(),
                    source,
                });
            }
        };
        let mode = meta.mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(SealError::KeyFileExposed {
                path: path.to_path_buf(),
                mode,
            });
        }
        // A key file is 65 bytes; anything much larger is not one, and is not read whole.
        if meta.size() > 1024 {
            return Err(SealError::KeyFileMalformed {
                path: path.to_path_buf(),
                reason: format!("it is {} bytes long", meta.size()),
            });
        }
        let text = fs::read_to_string(path).map_err(|source| SealError::KeyFileUnreadable {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_text(&text).map_err(|reason| SealError::KeyFileMalformed {
            path: path.to_path_buf(),
            reason,
        })
    }

    /// Writes a new random key to `path`, which must not exist, with mode 0600, fsynced.
    pub fn create_file(path: &Path) -> Result<Self, SealError> {
        let key = Self::generate()?;
        key.write_new_file(path)?;
        Ok(key)
    }

    /// Writes this key to a new file (mode 0600, fsynced); fails if the file exists.
    pub fn write_new_file(&self, path: &Path) -> Result<(), SealError> {
        let create_err = |source| SealError::KeyFileCreate {
            path: path.to_path_buf(),
            source,
        };
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(create_err)?;
        // The mode passed to open() is filtered by the umask; make sure it is exactly 0600.
        file.set_permissions(fs::Permissions::from_mode(0o600))
            .map_err(create_err)?;
        file.write_all(self.to_text().as_bytes())
            .map_err(create_err)?;
        file.sync_all().map_err(create_err)?;
        sync_parent_dir(path).map_err(create_err)?;
        Ok(())
    }
}

/// Fsyncs the directory holding `path`, so a created or renamed entry survives a crash.
pub fn sync_parent_dir(path: &Path) -> std::io::Result<()> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    fs::File::open(parent)?.sync_all()
}

struct Len(usize);
impl hkdf::KeyType for Len {
    fn len(&self) -> usize {
        self.0
    }
}

fn derive(master: &[u8; MASTER_KEY_LEN], info: &[u8], out: &mut [u8]) {
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, b"gatehouse/seal").extract(master);
    let infos = [info];
    // Invariant: HKDF-SHA256 can expand up to 255 * 32 bytes; we ask for at most 32.
    #[allow(clippy::expect_used)]
    prk.expand(&infos, Len(out.len()))
        .and_then(|okm| okm.fill(out))
        .expect("HKDF output length is within bounds");
}

/// Seals and opens values under one master key.
pub struct Sealer {
    key: LessSafeKey,
    fingerprint: String,
    rng: SystemRandom,
}

impl fmt::Debug for Sealer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Sealer({})", self.fingerprint)
    }
}

impl Sealer {
    pub fn new(master: &MasterKey) -> Self {
        let mut key_bytes = [0u8; 32];
        derive(&master.0, b"aes-256-gcm/v1", &mut key_bytes);
        // Invariant: AES-256-GCM takes exactly 32 key bytes, which is what we derived.
        #[allow(clippy::expect_used)]
        let unbound = UnboundKey::new(&AES_256_GCM, &key_bytes).expect("32-byte AES-256 key");
        key_bytes.fill(0);
        Self {
            key: LessSafeKey::new(unbound),
            fingerprint: master.fingerprint(),
            rng: SystemRandom::new(),
        }
    }

    /// The fingerprint of the master key this sealer uses.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// Seals `plaintext` for the row `key` of `table`.
    pub fn seal(&self, table: &str, key: &[u8], plaintext: &[u8]) -> Result<Vec<u8>, SealError> {
        let mut nonce_bytes = [0u8; NONCE_LEN];
        self.rng
            .fill(&mut nonce_bytes)
            .map_err(|_| SealError::Random)?;
        let mut out = Vec::with_capacity(1 + NONCE_LEN + plaintext.len() + TAG_LEN);
        out.push(SEAL_FORMAT_V1);
        out.extend_from_slice(&nonce_bytes);
        let mut body = plaintext.to_vec();
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce_bytes),
                Aad::from(aad(table, key)),
                &mut body,
            )
            .map_err(|_| SealError::Random)?;
        out.extend_from_slice(&body);
        Ok(out)
    }

    /// Opens a value sealed for the row `key` of `table`.
    pub fn open(&self, table: &str, key: &[u8], sealed: &[u8]) -> Result<Vec<u8>, SealError> {
        let (&version, rest) = sealed.split_first().ok_or(SealError::Malformed("empty"))?;
        if version != SEAL_FORMAT_V1 {
            return Err(SealError::Malformed("unknown sealed-value version"));
        }
        if rest.len() < NONCE_LEN + TAG_LEN {
            return Err(SealError::Malformed("shorter than nonce and tag"));
        }
        let (nonce, body) = rest.split_at(NONCE_LEN);
        let mut nonce_bytes = [0u8; NONCE_LEN];
        nonce_bytes.copy_from_slice(nonce);
        let mut buf = body.to_vec();
        let plain = self
            .key
            .open_in_place(
                Nonce::assume_unique_for_key(nonce_bytes),
                Aad::from(aad(table, key)),
                &mut buf,
            )
            .map_err(|_| SealError::DoesNotOpen)?;
        Ok(plain.to_vec())
    }
}

/// Associated data: a domain label, the table name, a separator, the row key. Table
/// names never contain NUL, so the encoding is unambiguous.
fn aad(table: &str, key: &[u8]) -> Vec<u8> {
    let mut aad = Vec::with_capacity(AAD_DOMAIN.len() + table.len() + 1 + key.len());
    aad.extend_from_slice(AAD_DOMAIN);
    aad.extend_from_slice(table.as_bytes());
    aad.push(0);
    aad.extend_from_slice(key);
    aad
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn sealer() -> Sealer {
        Sealer::new(&MasterKey::generate().unwrap())
    }

    #[test]
    fn round_trip() {
        let s = sealer();
        let sealed = s.seal("secrets.v1", b"tls", b"hello").unwrap();
        assert_eq!(s.open("secrets.v1", b"tls", &sealed).unwrap(), b"hello");
    }

    #[test]
    fn nonce_is_fresh_per_seal() {
        let s = sealer();
        let a = s.seal("t", b"k", b"same").unwrap();
        let b = s.seal("t", b"k", b"same").unwrap();
        assert_ne!(a, b);
    }

    #[test]
    fn moved_to_another_row_or_table_fails() {
        let s = sealer();
        let sealed = s.seal("secrets.v1", b"row-a", b"x").unwrap();
        assert!(matches!(
            s.open("secrets.v1", b"row-b", &sealed),
            Err(SealError::DoesNotOpen)
        ));
        assert!(matches!(
            s.open("other.v1", b"row-a", &sealed),
            Err(SealError::DoesNotOpen)
        ));
    }

    #[test]
    fn another_key_fails() {
        let sealed = sealer().seal("t", b"k", b"x").unwrap();
        assert!(matches!(
            sealer().open("t", b"k", &sealed),
            Err(SealError::DoesNotOpen)
        ));
    }

    #[test]
    fn every_flipped_bit_is_detected() {
        let s = sealer();
        let sealed = s.seal("t", b"k", b"payload").unwrap();
        for i in 0..sealed.len() * 8 {
            let mut bad = sealed.clone();
            bad[i / 8] ^= 1 << (i % 8);
            assert!(
                s.open("t", b"k", &bad).is_err(),
                "bit {i} flip went unnoticed"
            );
        }
    }

    #[test]
    fn malformed_inputs_are_errors_not_panics() {
        let s = sealer();
        for bad in [&b""[..], &[1u8][..], &[2u8; 40][..], &[1u8; 28][..]] {
            assert!(s.open("t", b"k", bad).is_err());
        }
    }

    #[test]
    fn key_text_round_trip_and_rejects() {
        let k = MasterKey::generate().unwrap();
        let back = MasterKey::from_text(&format!("  {}  ", k.to_text())).unwrap();
        assert_eq!(k.fingerprint(), back.fingerprint());
        assert!(MasterKey::from_text("abc").is_err());
        assert!(MasterKey::from_text(&"zz".repeat(32)).is_err());
    }

    #[test]
    fn key_file_permissions() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        let k = MasterKey::create_file(&path).unwrap();
        let mode = fs::metadata(&path).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(
            MasterKey::load(&path).unwrap().fingerprint(),
            k.fingerprint()
        );
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            MasterKey::load(&path),
            Err(SealError::KeyFileExposed { .. })
        ));
        assert!(matches!(
            MasterKey::create_file(&path),
            Err(SealError::KeyFileCreate { .. })
        ));
        assert!(matches!(
            MasterKey::load(&dir.path().join("none")),
            Err(SealError::KeyFileMissing { .. })
        ));
    }
}
