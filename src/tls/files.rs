//! `files` mode: a PEM certificate chain and private key made by someone else (a
//! company CA, certbot, a load balancer's tooling), read at start and again on SIGHUP.
//!
//! A reload that fails (a missing file, a key of another certificate, a half-written
//! file) changes nothing: the previous certificate keeps being served and the failure is
//! logged and audited. A reload never touches open connections.

use std::path::{Path, PathBuf};

use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};

use super::{ServedCert, TlsError};

/// A PEM file is a few kilobytes; anything far larger is a mistake, not a certificate.
const MAX_PEM_BYTES: u64 = 1024 * 1024;

/// Where the certificate and key live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CertFiles {
    pub(crate) cert: PathBuf,
    pub(crate) key: PathBuf,
}

impl CertFiles {
    /// Reads and checks both files: the chain (leaf first), the key (PKCS#8, SEC1 or
    /// PKCS#1), and that the key is the leaf's.
    pub(crate) fn load(&self) -> Result<ServedCert, TlsError> {
        let cert_pem = read_limited(&self.cert)?;
        let key_pem = read_limited(&self.key)?;
        let bad = |path: &Path, reason: String| TlsError::BadFile {
            path: path.to_path_buf(),
            reason,
        };
        let chain = CertificateDer::pem_slice_iter(&cert_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| bad(&self.cert, format!("not a PEM certificate chain: {e}")))?;
        if chain.is_empty() {
            return Err(bad(
                &self.cert,
                "holds no certificate (expected -----BEGIN CERTIFICATE-----)".into(),
            ));
        }
        let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
            bad(
                &self.key,
                format!("holds no usable private key (PKCS#8, SEC1 or PKCS#1 PEM): {e}"),
            )
        })?;
        ServedCert::new(chain, key).map_err(|e| match e {
            TlsError::Rustls(rustls::Error::InconsistentKeys(_)) => bad(
                &self.key,
                format!(
                    "is not the private key of the certificate in {}",
                    self.cert.display()
                ),
            ),
            other => bad(&self.cert, other.to_string()),
        })
    }
}

fn read_limited(path: &Path) -> Result<Vec<u8>, TlsError> {
    let read_err = |source| TlsError::ReadFile {
        path: path.to_path_buf(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(read_err)?;
    if meta.len() > MAX_PEM_BYTES {
        return Err(TlsError::BadFile {
            path: path.to_path_buf(),
            reason: format!("is {} bytes; a PEM file is at most 1 MiB", meta.len()),
        });
    }
    std::fs::read(path).map_err(read_err)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::tls::{generate_self_signed, self_signed_names};

    fn pem(label: &str, der: &[u8]) -> String {
        let body = data_encoding::BASE64.encode(der);
        let lines: Vec<&str> = body
            .as_bytes()
            .chunks(64)
            .map(|c| std::str::from_utf8(c).unwrap())
            .collect();
        format!(
            "-----BEGIN {label}-----\n{}\n-----END {label}-----\n",
            lines.join("\n")
        )
    }

    fn write_pair(dir: &Path, seed: u64) -> (CertFiles, crate::store::records::SelfSignedCert) {
        let names = self_signed_names("127.0.0.1:1".parse().unwrap());
        let cert = generate_self_signed(&names, 1_700_000_000_000 + seed).unwrap();
        let files = CertFiles {
            cert: dir.join(format!("cert{seed}.pem")),
            key: dir.join(format!("key{seed}.pem")),
        };
        std::fs::write(&files.cert, pem("CERTIFICATE", &cert.cert_der)).unwrap();
        std::fs::write(&files.key, pem("PRIVATE KEY", &cert.key_der)).unwrap();
        (files, cert)
    }

    #[test]
    fn a_matching_pair_loads() {
        let dir = tempfile::tempdir().unwrap();
        let (files, cert) = write_pair(dir.path(), 1);
        let served = files.load().unwrap();
        assert_eq!(served.key.cert[0].as_ref(), cert.cert_der.as_slice());
    }

    #[test]
    fn every_bad_input_names_its_file() {
        let dir = tempfile::tempdir().unwrap();
        let (a, _) = write_pair(dir.path(), 1);
        let (b, _) = write_pair(dir.path(), 2);
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "").unwrap();
        let cases = [
            (
                CertFiles {
                    cert: a.cert.clone(),
                    key: b.key.clone(),
                },
                "is not the private key",
            ),
            (
                CertFiles {
                    cert: dir.path().join("missing.pem"),
                    key: a.key.clone(),
                },
                "missing.pem",
            ),
            (
                CertFiles {
                    cert: empty.clone(),
                    key: a.key.clone(),
                },
                "holds no certificate",
            ),
            (
                CertFiles {
                    cert: a.cert.clone(),
                    key: empty.clone(),
                },
                "holds no usable private key",
            ),
            (
                CertFiles {
                    cert: a.key.clone(),
                    key: a.key.clone(),
                },
                "holds no certificate",
            ),
        ];
        for (files, expected) in cases {
            let err = files.load().unwrap_err().to_string();
            assert!(err.contains(expected), "{err}");
        }
    }
}
