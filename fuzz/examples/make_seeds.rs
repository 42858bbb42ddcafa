//! Writes the seed corpus of every fuzz target into `fuzz/seeds/<target>/`:
//! inputs of the shapes gatehouse really produces and accepts, built with its own API.
//!
//! Run from the repository root: `cargo run --manifest-path fuzz/Cargo.toml --example make_seeds`.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use gatehouse::ids::{ClientId, DeviceId, FamilyId, SessionId, TokenId};
use gatehouse::dpop::Jkt;
use gatehouse::jwt::{self, AccessClaims};
use gatehouse::store::records::{
    self, AcmeAccount, AcmeAccountRecord, AcmeCertificate, AcmeCertificateRecord, AcmeChallenge,
    AcmeChallengeRecord, AcmeOrderLease, AcmeOrderLeaseRecord, AdminToken,
    AdminTokenRecord, AdminTokenV1, AdminUser, AdminUserRecord, AuditCheckpointRecord,
    AuditCheckpointV1, AuditCheckpointV2, ChainHead, ChainHeadRecord, ChainPlace, ChainStart,
    NodeRecord, AuditEntry, AuditEntryRecord, Ban, BanRecord, Client, ClientRecord,
    Device, DeviceGrant, DeviceGrantRecord, DeviceGrantState, DeviceRecord, FamilyBinding,
    FamilyBindingRecord, FamilyRevocation, FamilyRevocationRecord, JobState, JobStateRecord,
    PairingSession, PairingSessionRecord, RateWindow, RateWindowRecord, RefreshToken,
    RefreshTokenRecord, RevokedToken, RevokedTokenRecord, SelfSignedCert, SelfSignedCertRecord,
    SigningKey, SigningKeyPrivate, SigningKeyPrivateRecord, SigningKeyRecord, StoredKeyAlgorithm,
    StatusAllocation, StatusAllocationRecord, StatusRevoked, StatusRevokedRecord, StatusSlot,
    StoredKeyState, TokenFamily, TokenFamilyRecord, TokenFamilyV1,
};

/// A fixed, made-up 64-byte signature: `parse` only checks its length and encoding.
fn signature(fill: u8) -> [u8; 64] {
    let mut out = [0u8; 64];
    for (i, b) in out.iter_mut().enumerate() {
        *b = fill.wrapping_mul(31).wrapping_add(i as u8);
    }
    out
}

fn claims(scope: Option<&str>) -> AccessClaims {
    AccessClaims {
        iss: "https://auth.example.com".into(),
        aud: "https://auth.example.com".into(),
        sub: DeviceId::from_bytes([0x4a; 16]),
        exp: 1_795_000_900,
        nbf: 1_795_000_000,
        iat: 1_795_000_000,
        jti: TokenId::from_bytes([0x9c; 16]),
        sid: FamilyId::from_bytes([0x17; 16]),
        scope: scope.map(str::to_string),
        cnf: None,
        status: Some(jwt::TokenStatus {
            status_list: jwt::StatusListRef {
                idx: 77,
                uri: "https://auth.example.com/v1/statuslists/1".into(),
            },
        }),
    }
}

fn jwt_parse() -> Vec<(&'static str, Vec<u8>)> {
    let ed = jwt::encoded_header("EdDSA", "k_2026-11-23_a1");
    let es = jwt::encoded_header("ES256", "k2");
    let plain = jwt::finish(jwt::signing_input(&ed, &claims(None)), &signature(1));
    let scoped = jwt::finish(
        jwt::signing_input(&es, &claims(Some("read write"))),
        &signature(2),
    );
    let (header_b64, rest) = plain.split_once('.').unwrap_or_default();

    // The structured form: header JSON, 0xFF, claims JSON (the target base64url-encodes them).
    let header_json = format!(
        r#"{{"alg":"EdDSA","typ":"{}","kid":"k1"}}"#,
        jwt::ACCESS_TOKEN_TYP
    );
    let claims_json = serde_json::to_string(&claims(Some("x"))).unwrap_or_default();
    let mut structured = header_json.clone().into_bytes();
    structured.push(0xFF);
    structured.extend_from_slice(claims_json.as_bytes());
    let mut duplicate = br#"{"alg":"EdDSA","alg":"HS256","typ":"at+jwt","kid":"k1"}"#.to_vec();
    duplicate.push(0xFF);
    duplicate.extend_from_slice(claims_json.as_bytes());

    let mut bound_claims = claims(None);
    bound_claims.cnf = Jkt::parse("0ZcOCORZNYy-DWpqq30jZyJGHTN0d2HglBV3uiguA4I")
        .map(|jkt| jwt::Confirmation { jkt });
    let bound = jwt::finish(jwt::signing_input(&ed, &bound_claims), &signature(3));
    vec![
        ("eddsa", plain.clone().into_bytes()),
        ("eddsa_dpop_bound", bound.into_bytes()),
        ("es256_scope", scoped.into_bytes()),
        ("two_segments", format!("{header_b64}.{rest}").into_bytes()),
        ("four_segments", format!("{plain}.AA").into_bytes()),
        ("padded", format!("{plain}==").into_bytes()),
        ("structured", structured),
        ("duplicate_alg", duplicate),
    ]
}

fn ids() -> Vec<(&'static str, Vec<u8>)> {
    let device = DeviceId::from_bytes([0x0f; 16]).to_string();
    vec![
        ("device", device.clone().into_bytes()),
        (
            "family",
            FamilyId::from_bytes([0xab; 16]).to_string().into_bytes(),
        ),
        (
            "session",
            SessionId::from_bytes([0x3c; 16]).to_string().into_bytes(),
        ),
        (
            "token",
            TokenId::from_bytes([0x01; 16]).to_string().into_bytes(),
        ),
        (
            "client",
            ClientId::from_bytes([0xfe; 16]).to_string().into_bytes(),
        ),
        ("device_json", format!("\"{device}\"").into_bytes()),
        ("device_upper", device.to_uppercase().into_bytes()),
        (
            "refresh_secret",
            b"ghr_U3LmQk0q2H1d1lJ8Jw9c5Yk2v3t6yP0bX4s7nM1aZ8E".to_vec(),
        ),
        (
            "pairing_secret",
            b"gsEMq0dJ5kJ1xX2w3v4u5t6s7r8q9p0o1n2m3l4k5j6".to_vec(),
        ),
    ]
}

fn record_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let admin = AdminToken {
        name: "ops laptop".into(),
        secret_hash: [7; 32],
        created_at_ms: 1_795_000_000_000,
        last_used_at_ms: Some(1_795_000_060_000),
        revoked_at_ms: None,
    };
    let admin_v1 = AdminTokenV1 {
        name: "bootstrap".into(),
        secret_hash: [8; 32],
        created_at_ms: 1_795_000_000_000,
    };
    let cert = SelfSignedCert {
        cert_der: vec![0x30, 0x82, 0x01, 0x0a],
        key_der: vec![0x30, 0x51, 0x02, 0x01],
        names: vec!["localhost".into(), "127.0.0.1".into(), "::1".into()],
        created_at_ms: 1_795_000_000_000,
        not_after_ms: 1_826_536_000_000,
    };
    let key = SigningKey {
        algorithm: StoredKeyAlgorithm::EcdsaP256,
        public_key: vec![4; 65],
        state: StoredKeyState::Retiring,
        created_at_ms: 1,
        activated_at_ms: Some(2),
        retiring_at_ms: Some(3),
        revoked_at_ms: None,
        verify_until_ms: Some(u64::MAX),
    };
    let session = PairingSession {
        name: Some("Ada's phone".into()),
        secret_hash: [9; 32],
        created_at_ms: 10,
        expires_at_ms: 300_010,
        created_by: "cli".into(),
        claimed_at_ms: Some(20),
        device_id: Some(DeviceId::from_bytes([0x4a; 16]).to_string()),
    };
    let device = Device {
        name: "Pixel".into(),
        platform: "android".into(),
        app_version: "1.0".into(),
        created_at_ms: 20,
        last_seen_ms: 30,
        paired_from: "192.0.2.7".into(),
        pairing_session: SessionId::from_bytes([0x3c; 16]).to_string(),
        revoked_at_ms: None,
    };
    let family = TokenFamily {
        device_id: DeviceId::from_bytes([0x4a; 16]).to_string(),
        created_at_ms: 20,
        generation: 3,
        refresh_expires_at_ms: 2_592_000_020,
        revoked_at_ms: Some(40),
        revoke_reason: Some("reuse".into()),
        status: vec![
            StatusSlot {
                index: 1_048_577,
                expires_at_ms: 900_020,
            },
            StatusSlot {
                index: 1_049_601,
                expires_at_ms: 1_800_020,
            },
        ],
    };
    let family_v1 = TokenFamilyV1 {
        device_id: family.device_id.clone(),
        created_at_ms: 20,
        generation: 1,
        refresh_expires_at_ms: 2_592_000_020,
        revoked_at_ms: None,
        revoke_reason: None,
    };
    let refresh = RefreshToken {
        family_id: FamilyId::from_bytes([0x17; 16]).to_string(),
        device_id: DeviceId::from_bytes([0x4a; 16]).to_string(),
        issued_at_ms: 20,
        expires_at_ms: 2_592_000_020,
        spent_at_ms: None,
    };
    let revoked = RevokedToken {
        device_id: DeviceId::from_bytes([0x4a; 16]).to_string(),
        expires_at_ms: 900_000,
        revoked_at_ms: 60_000,
    };
    let client = Client {
        name: "api".into(),
        secret_hash: [5; 32],
        created_at_ms: 70,
        revoked_at_ms: None,
    };
    let admin_user = AdminUser {
        name: "ada".into(),
        password_hash: "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHRzYWx0$TmqXQ5gbAw1jbD3vZGrGvX8bXaOpHrj6o9qKfzoK3bA".into(),
        created_at_ms: 1_795_000_000_000,
        password_changed_at_ms: 1_795_000_500_000,
    };
    let acme_account = AcmeAccount {
        directory: "https://acme-v02.api.letsencrypt.org/directory".into(),
        contact: vec!["mailto:ops@example.com".into()],
        key_pkcs8: vec![0x30, 0x81, 0x87, 0x02, 0x01, 0x00],
        created_at_ms: 1_795_000_000_000,
        eab_kid: Some("kid-1".into()),
    };
    let acme_cert = AcmeCertificate {
        directory: "https://acme-v02.api.letsencrypt.org/directory".into(),
        domains: vec!["api.example.com".into(), "auth.example.com".into()],
        pem: b"-----BEGIN PRIVATE KEY-----\nMC4CAQA=\n-----END PRIVATE KEY-----\n".to_vec(),
        issued_at_ms: 1_795_000_000_000,
        not_after_ms: 1_802_776_000_000,
    };
    let acme_lease = AcmeOrderLease {
        directory: "https://acme-v02.api.letsencrypt.org/directory".into(),
        domains: vec!["api.example.com".into(), "auth.example.com".into()],
        holder: "node-1:5f0c9a1b".into(),
        taken_at_ms: 1_795_000_000_000,
        expires_at_ms: 1_795_000_660_000,
        failures_in_row: 2,
        last_error: Some("the CA could not validate api.example.com".into()),
        retry_at_ms: Some(1_795_000_600_000),
    };
    let acme_challenge = AcmeChallenge {
        directory: "https://acme-v02.api.letsencrypt.org/directory".into(),
        name: "auth.example.com".into(),
        cert_der: vec![0x30, 0x82, 0x01, 0x2c],
        key_pkcs8: vec![0x30, 0x81, 0x87, 0x02, 0x01, 0x00],
        created_at_ms: 1_795_000_000_000,
        expires_at_ms: 1_795_000_600_000,
    };
    let family_revocation = FamilyRevocation {
        family_id: FamilyId::from_bytes([0x17; 16]).to_string(),
        revoked_at_ms: 40,
        reason: "device revoked".into(),
    };
    let audit = AuditEntry {
        time_ms: 1_795_000_102_000,
        kind: "device.revoked".into(),
        severity: "notice".into(),
        actor: "admin:3f0c9a1b2d4e5f60".into(),
        source: Some("203.0.113.7".into()),
        request_id: Some("18a29c0d".into()),
        outcome: "success".into(),
        device: Some(DeviceId::from_bytes([0x4a; 16]).to_string()),
        details: r#"{"name":"Anna's phone","families_revoked":1}"#.into(),
        prev: [0x5d; 32],
    };
    let checkpoint = AuditCheckpointV1 {
        next_seq: 1_001,
        prev: [0x5d; 32],
        pruned: 1_000,
        pruned_through_ms: 1_795_000_000_000,
        tag: [0xc4; 32],
    };
    let node_checkpoint = AuditCheckpointV2 {
        next_seq: 2_001,
        prev: [0x5e; 32],
        pruned: 2_000,
        pruned_through_ms: 1_795_000_000_000,
        chains: vec![ChainStart {
            chain: 0x9a3f_0c1b_2d4e_5f60,
            next_n: 734,
            prev: [0x61; 32],
        }],
        tag: [0xc5; 32],
    };
    let ban = Ban {
        since_ms: 1_795_000_000_000,
        until_ms: 1_795_000_900_000,
        offences: 2,
        reason: "admin_token".into(),
        lifted_at_ms: Some(1_795_000_300_000),
    };
    let job = JobState {
        last_started_ms: Some(1_795_000_000_000),
        last_duration_ms: Some(1_250),
        last_outcome: Some("failure".into()),
        last_error: Some("disk full".into()),
        last_success_ms: Some(1_794_913_600_000),
        next_run_ms: Some(1_795_000_060_000),
        failures: 1,
    };
    vec![
        ("admin_v2", records::encode(&AdminTokenRecord::V2(admin))),
        ("admin_v1", records::encode(&AdminTokenRecord::V1(admin_v1))),
        (
            "self_signed",
            records::encode(&SelfSignedCertRecord::V1(cert)),
        ),
        ("signing_key", records::encode(&SigningKeyRecord::V1(key))),
        (
            "signing_key_private",
            records::encode(&SigningKeyPrivateRecord::V1(SigningKeyPrivate {
                pkcs8: vec![0x30, 0x53, 0x02, 0x01, 0x01],
            })),
        ),
        (
            "pairing_session",
            records::encode(&PairingSessionRecord::V1(session)),
        ),
        ("device", records::encode(&DeviceRecord::V1(device))),
        (
            "device_grant_pending",
            records::encode(&DeviceGrantRecord::V1(DeviceGrant {
                secret_hash: [0x21; 32],
                user_code_hash: [0x22; 32],
                client_id: Some("backup-bot".into()),
                requested_from: "203.0.113.7".into(),
                created_at_ms: 1_795_000_000_000,
                expires_at_ms: 1_795_000_600_000,
                interval_secs: 10,
                last_poll_ms: Some(1_795_000_005_000),
                state: DeviceGrantState::Pending,
            })),
        ),
        (
            "device_grant_issued",
            records::encode(&DeviceGrantRecord::V1(DeviceGrant {
                secret_hash: [0x23; 32],
                user_code_hash: [0x24; 32],
                client_id: None,
                requested_from: "2001:db8::1".into(),
                created_at_ms: 1_795_000_000_000,
                expires_at_ms: 1_795_000_600_000,
                interval_secs: 5,
                last_poll_ms: None,
                state: DeviceGrantState::Issued {
                    device_id: "dev_d1d1d1d1d1d1d1d1d1d1d1d1d1d1d1d1".into(),
                    family_id: "fam_f1f1f1f1f1f1f1f1f1f1f1f1f1f1f1f1".into(),
                    at_ms: 1_795_000_030_000,
                },
            })),
        ),
        (
            "token_family",
            records::encode(&TokenFamilyRecord::V2(family)),
        ),
        (
            "token_family_v1",
            records::encode(&TokenFamilyRecord::V1(family_v1)),
        ),
        (
            "status_revoked",
            records::encode(&StatusRevokedRecord::V1(StatusRevoked {
                expires_at_ms: 1_795_000_900_000,
                revoked_at_ms: 1_795_000_000_000,
            })),
        ),
        (
            "status_allocation",
            records::encode(&StatusAllocationRecord::V1(StatusAllocation {
                next_index: 2048,
                reserved_at_ms: 1_795_000_000_000,
            })),
        ),
        (
            "family_binding",
            records::encode(&FamilyBindingRecord::V1(FamilyBinding {
                jkt: "0ZcOCORZNYy-DWpqq30jZyJGHTN0d2HglBV3uiguA4I".into(),
                bound_at_ms: 1_795_000_000_000,
            })),
        ),
        (
            "refresh_token",
            records::encode(&RefreshTokenRecord::V1(refresh)),
        ),
        (
            "revoked_token",
            records::encode(&RevokedTokenRecord::V1(revoked)),
        ),
        ("client", records::encode(&ClientRecord::V1(client))),
        (
            "admin_user",
            records::encode(&AdminUserRecord::V1(admin_user)),
        ),
        (
            "acme_account",
            records::encode(&AcmeAccountRecord::V1(acme_account)),
        ),
        (
            "acme_certificate",
            records::encode(&AcmeCertificateRecord::V1(acme_cert)),
        ),
        (
            "acme_order_lease",
            records::encode(&AcmeOrderLeaseRecord::V1(acme_lease)),
        ),
        (
            "acme_challenge",
            records::encode(&AcmeChallengeRecord::V1(acme_challenge)),
        ),
        (
            "family_revocation",
            records::encode(&FamilyRevocationRecord::V1(family_revocation)),
        ),
        (
            "rate_window",
            records::encode(&RateWindowRecord::V1(RateWindow {
                tat_us: 1_795_000_000_250_000,
            })),
        ),
        (
            "audit_node_entry",
            records::encode(&AuditEntryRecord::V2(NodeRecord {
                chain: 0x9a3f_0c1b_2d4e_5f60,
                n: 735,
                heads: vec![ChainPlace {
                    chain: 0x11d2_33f4_4a55_6b67,
                    n: 12,
                }],
                entry: audit.clone(),
            })),
        ),
        ("audit_entry", records::encode(&AuditEntryRecord::V1(audit))),
        (
            "audit_node_checkpoint",
            records::encode(&AuditCheckpointRecord::V2(node_checkpoint)),
        ),
        (
            "chain_head",
            records::encode(&ChainHeadRecord::V1(ChainHead {
                n: 735,
                time_ms: 1_795_000_102_000,
            })),
        ),
        (
            "audit_checkpoint",
            records::encode(&AuditCheckpointRecord::V1(checkpoint)),
        ),
        ("ban", records::encode(&BanRecord::V1(ban))),
        ("job_state", records::encode(&JobStateRecord::V1(job))),
    ]
}

fn pairing_input() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        (
            "pixel",
            br#"{"name":"Pixel","platform":"android","app_version":"1.0"}"#.to_vec(),
        ),
        (
            "url_and_pin",
            br#"{"name":"https://auth.example.com:8443","platform":"sha256/6eO5+pyaTORL2KMVe80zdfA9wmyvQeEfLAuZUA+NXmo=","app_version":"gsEMq0dJ5kJ1xX2w3v4u5t6s7r8q9p0o1n2m3l4k5j6"}"#.to_vec(),
        ),
        (
            "escapes",
            "{\"name\":\"Ada\\u2019s \\\"phone\\\" \u{1F4F1}\",\"platform\":\"i\\tOS &=?#%\",\"app_version\":\"\\u0000\"}"
                .as_bytes()
                .to_vec(),
        ),
        (
            "unknown_field",
            br#"{"name":"a","platform":"b","app_version":"c","extra":1}"#.to_vec(),
        ),
    ]
}

fn write(dir: &Path, seeds: Vec<(&'static str, Vec<u8>)>) -> io::Result<()> {
    fs::create_dir_all(dir)?;
    for (name, bytes) in seeds {
        fs::write(dir.join(name), bytes)?;
    }
    Ok(())
}

/// DPoP proofs: the structured form (header JSON, 0xFF, claims JSON) for each key type,
/// and compact ones with a made-up signature.
fn dpop_proof() -> Vec<(&'static str, Vec<u8>)> {
    let okp = r#"{"typ":"dpop+jwt","alg":"EdDSA","jwk":{"kty":"OKP","crv":"Ed25519","x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}}"#;
    let ec = r#"{"typ":"dpop+jwt","alg":"ES256","jwk":{"kty":"EC","crv":"P-256","x":"l8tFrhx-34tV3hRICRDY9zCkDlpBhF42UQUfWVAWBFs","y":"9VE4jf_Ok_o64zbTTlcuNJajHmt6v9TDVrU0CdvGRDA"}}"#;
    let claims = r#"{"jti":"e1j3V_bKic8-LAEB","htm":"POST","htu":"https://auth.example.com/v1/token","iat":1795000000,"ath":"fUHyO2r2Z3DZ53EsNrWBb0xWXoaNy59IiKCAqksmQEo"}"#;
    let structured = |header: &str| {
        let mut out = header.as_bytes().to_vec();
        out.push(0xFF);
        out.extend_from_slice(claims.as_bytes());
        out
    };
    let b64 = data_encoding::BASE64URL_NOPAD;
    let compact = format!(
        "{}.{}.{}",
        b64.encode(okp.as_bytes()),
        b64.encode(claims.as_bytes()),
        b64.encode(&signature(4))
    );
    vec![
        ("structured_okp", structured(okp)),
        ("structured_ec", structured(ec)),
        ("compact_okp", compact.into_bytes()),
    ]
}

fn main() -> io::Result<()> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("seeds");
    write(&root.join("jwt_parse"), jwt_parse())?;
    write(&root.join("ids"), ids())?;
    write(&root.join("records"), record_seeds())?;
    write(&root.join("pairing_input"), pairing_input())?;
    write(&root.join("dpop_proof"), dpop_proof())?;
    println!("seeds written to {}", root.display());
    Ok(())
}
