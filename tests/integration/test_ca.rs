//! A throwaway certificate authority for tests: a root, and leaf certificates it signs,
//! written as PEM files (for pebble's own HTTPS, for `files` mode, for the TLS scan).

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CrlDistributionPoint, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};

pub struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    pub root_der: Vec<u8>,
}

/// One issued certificate, as PEM files.
pub struct Leaf {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub der: Vec<u8>,
}

pub fn pem(label: &str, der: &[u8]) -> String {
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

impl TestCa {
    pub fn new(name: &str) -> Self {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let root = params.self_signed(&key).unwrap();
        Self {
            root_der: root.der().to_vec(),
            issuer: Issuer::new(params, key),
        }
    }

    /// Writes the root as PEM to `path`.
    pub fn write_root(&self, path: &Path) -> PathBuf {
        std::fs::write(path, pem("CERTIFICATE", &self.root_der)).unwrap();
        path.to_path_buf()
    }

    /// Issues a server certificate for `names` (DNS names or IP addresses), valid for
    /// `days` from an hour ago, and writes `<stem>.crt` and `<stem>.key` in `dir`.
    pub fn issue(&self, dir: &Path, stem: &str, names: &[&str], days: i64) -> Leaf {
        let key = KeyPair::generate().unwrap();
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, names[0]);
        params.distinguished_name = dn;
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::hours(1);
        params.not_after = now + time::Duration::days(days);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        // Like a public CA's: scanners rate a certificate with no revocation source HIGH.
        params.crl_distribution_points = vec![CrlDistributionPoint {
            uris: vec!["http://crl.invalid/test-ca.crl".into()],
        }];
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let leaf = Leaf {
            cert: dir.join(format!("{stem}.crt")),
            key: dir.join(format!("{stem}.key")),
            der: cert.der().to_vec(),
        };
        std::fs::write(&leaf.cert, pem("CERTIFICATE", cert.der())).unwrap();
        std::fs::write(&leaf.key, pem("PRIVATE KEY", &key.serialize_der())).unwrap();
        leaf
    }
}
