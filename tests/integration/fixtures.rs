//! The fixtures of formats 3 and later: data files as those gatehouse versions wrote them,
//! with a signing key ring, a device, a token family, a refresh token, a revoked access
//! token, an API client and an open pairing session (from format 4, a rate-limit
//! window; from format 5, an audit log with its chain key and a lockout ban; from format 6, a
//! job's state; from format 7, a family revocation in the journal). A newer build must open
//! them (migrating if needed) and keep every one of
//! them working. (Formats 1 and 2 are in `store.rs`.)

use std::path::{Path, PathBuf};

use gatehouse::audit::{Event, Origin};
use gatehouse::clock::FixedClock;
use gatehouse::store::Store;
use gatehouse::store::records::{
    self, AdminToken, AdminTokenRecord, Client, ClientRecord, Device, DeviceRecord, PairingSession,
    PairingSessionRecord, RefreshToken, RefreshTokenRecord, RevokedToken, RevokedTokenRecord,
    SigningKey, SigningKeyPrivate, SigningKeyPrivateRecord, SigningKeyRecord, StoredKeyAlgorithm,
    StoredKeyState, TokenFamilyRecord, TokenFamilyV1,
};
use gatehouse::store::seal::{MasterKey, Sealer};
use gatehouse::store::{ALL_TABLES, FORMAT_VERSION};
use redb::TableDefinition;
use ring::signature::KeyPair as _;

use crate::helpers::{self, TEST_NOW_MS};

const DEVICE: &str = "dev_d1d1d1d1d1d1d1d1d1d1d1d1d1d1d1d1";
const FAMILY: &str = "fam_f1f1f1f1f1f1f1f1f1f1f1f1f1f1f1f1";
const CLIENT: &str = "cli_c1c1c1c1c1c1c1c1c1c1c1c1c1c1c1c1";
const SESSION: &str = "ps_b1b1b1b1b1b1b1b1b1b1b1b1b1b1b1b1";
const REVOKED_JTI: &str = "a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1";
const GRANT: &str = "dg_c1c1c1c1c1c1c1c1c1c1c1c1c1c1c1c1";
const HOUR_MS: u64 = 3_600_000;

fn b64(bytes: &[u8]) -> String {
    data_encoding::BASE64URL_NOPAD.encode(bytes)
}

fn refresh_token() -> String {
    format!("ghr_{}", b64(&[0x33; 32]))
}

fn client_secret() -> String {
    format!("ghc_{}", b64(&[0x44; 32]))
}

fn pairing_secret() -> String {
    b64(&[0x55; 32])
}

fn sha256(text: &str) -> [u8; 32] {
    ring::digest::digest(&ring::digest::SHA256, text.as_bytes())
        .as_ref()
        .try_into()
        .unwrap()
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn raw(name: &str) -> TableDefinition<'_, &'static str, &'static [u8]> {
    TableDefinition::new(name)
}

/// RFC 7638 thumbprint of an Ed25519 public key: the key's `kid`.
fn kid_of(public: &[u8]) -> String {
    let canonical = format!(r#"{{"crv":"Ed25519","kty":"OKP","x":"{}"}}"#, b64(public));
    b64(ring::digest::digest(&ring::digest::SHA256, canonical.as_bytes()).as_ref())
}

/// Builds `tests/fixtures/format-v3.redb` the way a format-3 gatehouse wrote it. Run once
/// with `cargo test -- --ignored write_format_v3_fixture`; the committed file is the
/// fixture, this is its recipe.
#[test]
#[ignore = "regenerates the committed fixture"]
fn write_format_v3_fixture() {
    write_fixture(3);
}

/// Builds `tests/fixtures/format-v4.redb`: the format-3 content, plus the pairing window
/// of 127.0.0.1 with nine of its ten attempts spent.
#[test]
#[ignore = "regenerates the committed fixture"]
fn write_format_v4_fixture() {
    write_fixture(4);
}

/// Builds `tests/fixtures/format-v5.redb`: the format-4 content, then opened by the
/// format-5 store (which makes the audit chain key) and given three chained audit
/// records and a ban of 192.0.2.7 through the store's own writer.
#[test]
#[ignore = "regenerates the committed fixture"]
fn write_format_v5_fixture() {
    write_fixture_with_rows(5, format5_rows);
}

/// Builds `tests/fixtures/format-v6.redb`: the format-5 content (three audit records
/// and a ban), plus the stored state of the `backup` job: one failure in a row, due
/// again an hour after the fixture's time.
#[test]
#[ignore = "regenerates the committed fixture"]
fn write_format_v6_fixture() {
    write_fixture_with_rows(6, format6_rows);
}

/// Builds `tests/fixtures/format-v7.redb`: the format-6 content, plus the revocation of
/// the fixture's token family in the revocation journal (not yet folded into its row).
#[test]
#[ignore = "regenerates the committed fixture"]
fn write_format_v7_fixture() {
    write_fixture_with_rows(7, format7_rows);
}

/// Builds `tests/fixtures/format-v8.redb`: the format-7 content, with the fixture's
/// device in the pairing-time index and its token family in the device's family index.
#[test]
#[ignore = "regenerates the committed fixture"]
fn write_format_v8_fixture() {
    write_fixture_with_rows(8, format7_rows);
}

/// Builds `tests/fixtures/format-v9.redb`: the format-8 fixture as a format-9 build left
/// it (step 8 → 9 only makes two empty tables), plus a pending device grant (RFC 8628),
/// asked by `fixture-tv` from 192.0.2.9 and valid for an hour after the fixture's time,
/// with its row in the user-code index. Written raw, as the format-8 content was.
#[test]
#[ignore = "regenerates the committed fixture"]
fn write_format_v9_fixture() {
    let path = fixtures().join("format-v9.redb");
    let key_path = fixtures().join("format-v9.key");
    std::fs::copy(fixtures().join("format-v8.redb"), &path).unwrap();
    std::fs::copy(fixtures().join("format-v8.key"), &key_path).unwrap();
    let grant = records::DeviceGrant {
        secret_hash: sha256("fixture device code secret"),
        user_code_hash: sha256("BCDFGHJK"),
        client_id: Some("fixture-tv".into()),
        requested_from: "192.0.2.9".into(),
        created_at_ms: TEST_NOW_MS,
        expires_at_ms: TEST_NOW_MS + HOUR_MS,
        interval_secs: 5,
        last_poll_ms: None,
        state: records::DeviceGrantState::Pending,
    };
    let db = redb::Database::open(&path).unwrap();
    let tx = db.begin_write().unwrap();
    {
        let mut grants = tx.open_table(raw("device_grants.v1")).unwrap();
        let value = records::encode(&records::DeviceGrantRecord::V1(grant.clone()));
        grants.insert(GRANT, value.as_slice()).unwrap();
        let mut codes = tx.open_table(raw("device_grant_codes.v1")).unwrap();
        let key = gatehouse::store::device_grant_code_key(&grant.user_code_hash, GRANT);
        codes.insert(key.as_str(), [].as_slice()).unwrap();
        let mut meta = tx.open_table(raw("meta")).unwrap();
        meta.insert("format_version", 9u32.to_le_bytes().as_slice())
            .unwrap();
    }
    tx.commit().unwrap();
}

/// Builds `tests/fixtures/format-v10.redb`: the format-9 fixture as a format-10 build
/// left it (step 9 → 10 only makes the bindings table), with its token family bound to a
/// key (DPoP). Its family row stays a version-1 record, as every format-10 row is.
/// Written raw, as the format-9 content was.
#[test]
#[ignore = "regenerates the committed fixture"]
fn write_format_v10_fixture() {
    let path = fixtures().join("format-v10.redb");
    let key_path = fixtures().join("format-v10.key");
    std::fs::copy(fixtures().join("format-v9.redb"), &path).unwrap();
    std::fs::copy(fixtures().join("format-v9.key"), &key_path).unwrap();
    let binding = records::FamilyBinding {
        jkt: FIXTURE_JKT.into(),
        bound_at_ms: TEST_NOW_MS,
    };
    let db = redb::Database::open(&path).unwrap();
    let tx = db.begin_write().unwrap();
    {
        let mut bindings = tx.open_table(raw("family_bindings.v1")).unwrap();
        let value = records::encode(&records::FamilyBindingRecord::V1(binding));
        bindings.insert(FAMILY, value.as_slice()).unwrap();
        let mut meta = tx.open_table(raw("meta")).unwrap();
        meta.insert("format_version", 10u32.to_le_bytes().as_slice())
            .unwrap();
    }
    tx.commit().unwrap();
}

/// The key the format-10 fixture's family is bound to (an RFC 7638 thumbprint's shape).
const FIXTURE_JKT: &str = "0ZcOCORZNYy-DWpqq30jZyJGHTN0d2HglBV3uiguA4I";

/// `write_fixture(format)`, then the rows `rows` writes through the store's own writer
/// (the formats whose rows need the store: the audit chain, the job state, the journal).
fn write_fixture_with_rows(
    format: u32,
    rows: fn(&gatehouse::store::WriteTx<'_>) -> Result<(), gatehouse::store::StoreError>,
) {
    write_fixture(format);
    let path = fixtures().join(format!("format-v{format}.redb"));
    let key = MasterKey::load(&fixtures().join(format!("format-v{format}.key"))).unwrap();
    let (store, _) = Store::open(&path, &key, &FixedClock::new(TEST_NOW_MS)).unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    runtime.block_on(async {
        store.write(rows).await.unwrap();
    });
    store.close();
}

/// What format 7 added: the revocation of the fixture's token family in the revocation
/// journal (not yet folded into its row).
fn format7_rows(tx: &gatehouse::store::WriteTx<'_>) -> Result<(), gatehouse::store::StoreError> {
    format6_rows(tx)?;
    let entry = records::FamilyRevocation {
        family_id: FAMILY.into(),
        revoked_at_ms: TEST_NOW_MS - 1000,
        reason: "revoked".into(),
    };
    let family = gatehouse::ids::FamilyId::parse(FAMILY).unwrap();
    let key = gatehouse::revocation::journal_key(entry.revoked_at_ms, &family);
    tx.put(&gatehouse::store::FAMILY_REVOCATIONS, &key, &entry)
}

/// What format 6 added: the stored state of the `backup` job.
fn format6_rows(tx: &gatehouse::store::WriteTx<'_>) -> Result<(), gatehouse::store::StoreError> {
    format5_rows(tx)?;
    let job = records::JobState {
        last_started_ms: Some(TEST_NOW_MS - HOUR_MS),
        last_duration_ms: Some(12),
        last_outcome: Some("failure".into()),
        last_error: Some("disk full".into()),
        last_success_ms: None,
        next_run_ms: Some(TEST_NOW_MS + HOUR_MS),
        failures: 1,
    };
    tx.put(&gatehouse::store::JOBS, "backup", &job)
}

/// What format 5 added to the fixture: three chained audit records and a ban.
fn format5_rows(tx: &gatehouse::store::WriteTx<'_>) -> Result<(), gatehouse::store::StoreError> {
    let origin = Origin::operator();
    for (kind, n) in [
        ("pairing.created", 1),
        ("device.renamed", 2),
        ("key.rotated", 3),
    ] {
        let event = Event::new(kind).device(DEVICE).detail("n", n);
        gatehouse::audit::append(tx, &origin, &event, TEST_NOW_MS + n)?;
    }
    let ban = records::Ban {
        since_ms: TEST_NOW_MS,
        until_ms: TEST_NOW_MS + HOUR_MS,
        offences: 2,
        reason: "admin_token".into(),
        lifted_at_ms: None,
    };
    tx.put(&gatehouse::store::BANS, FIXTURE_BAN, &ban)
}

/// The ban in the format-5 fixture (not the tests' own address).
const FIXTURE_BAN: &str = "ip:192.0.2.7";

/// Tables each fixture format has (the audit log, keyed by number, is made apart).
fn tables_of(format: u32) -> impl Iterator<Item = &'static str> {
    ALL_TABLES.iter().copied().filter(move |n| {
        let since = match *n {
            "meta" | "audit_events.v1" => u32::MAX,
            "rate_windows.v1" => 4,
            "audit_checkpoint.v1" | "bans.v1" => 5,
            "jobs.v1" => 6,
            "family_revocations.v1" => 7,
            "device_families.v1" | "devices_by_age.v1" => 8,
            "device_grants.v1" | "device_grant_codes.v1" => 9,
            "family_bindings.v1" => 10,
            "status_revoked.v1" | "status_allocation.v1" => 11,
            _ => 3,
        };
        format >= since
    })
}

/// The stored key of 127.0.0.1's pairing window: policy 0, tag 1 (IPv4), the address.
fn loopback_pairing_window() -> String {
    let mut key = [0u8; 18];
    key[1] = 1;
    key[2..6].copy_from_slice(&[127, 0, 0, 1]);
    data_encoding::HEXLOWER.encode(&key)
}

fn write_fixture(format: u32) {
    let path = fixtures().join(format!("format-v{format}.redb"));
    let key_path = fixtures().join(format!("format-v{format}.key"));
    let _ = std::fs::remove_file(&path);
    let _ = std::fs::remove_file(&key_path);
    let key = MasterKey::create_file(&key_path).unwrap();
    let sealer = Sealer::new(&key);
    let seal =
        |name: &str, plain: &[u8]| sealer.seal("secrets.v1", name.as_bytes(), plain).unwrap();
    let db = redb::Database::create(&path).unwrap();
    let tx = db.begin_write().unwrap();
    {
        helpers::write_fixture_base(&tx, &sealer, format, 0x44);
        for name in tables_of(format) {
            tx.open_table(raw(name)).unwrap();
        }
        if format >= 5 {
            tx.open_table(redb::TableDefinition::<u64, &[u8]>::new("audit_events.v1"))
                .unwrap();
        }
        let mut secrets = tx.open_table(raw("secrets.v1")).unwrap();

        let mut keys = tx.open_table(raw("signing_keys.v1")).unwrap();
        let rng = ring::rand::SystemRandom::new();
        for state in [StoredKeyState::Active, StoredKeyState::Next] {
            let pkcs8 = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
            let pair = ring::signature::Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap();
            let public = pair.public_key().as_ref().to_vec();
            let kid = kid_of(&public);
            let record = SigningKeyRecord::V1(SigningKey {
                algorithm: StoredKeyAlgorithm::Ed25519,
                public_key: public,
                state,
                created_at_ms: TEST_NOW_MS,
                activated_at_ms: (state == StoredKeyState::Active).then_some(TEST_NOW_MS),
                retiring_at_ms: None,
                revoked_at_ms: None,
                verify_until_ms: None,
            });
            keys.insert(kid.as_str(), records::encode(&record).as_slice())
                .unwrap();
            let name = format!("signing-key/{kid}");
            let private = records::encode(&SigningKeyPrivateRecord::V1(SigningKeyPrivate {
                pkcs8: pkcs8.as_ref().to_vec(),
            }));
            secrets
                .insert(name.as_str(), seal(&name, &private).as_slice())
                .unwrap();
        }

        let admin = AdminTokenRecord::V2(AdminToken {
            name: "fixture".into(),
            secret_hash: [2; 32],
            created_at_ms: TEST_NOW_MS,
            last_used_at_ms: None,
            revoked_at_ms: None,
        });
        tx.open_table(raw("admin_tokens.v1"))
            .unwrap()
            .insert("1122334455667788", records::encode(&admin).as_slice())
            .unwrap();
        let device = DeviceRecord::V1(Device {
            name: "Fixture phone".into(),
            platform: "android".into(),
            app_version: "1.0".into(),
            created_at_ms: TEST_NOW_MS,
            last_seen_ms: TEST_NOW_MS,
            paired_from: "127.0.0.1".into(),
            pairing_session: "ps_00000000000000000000000000000000".into(),
            revoked_at_ms: None,
        });
        tx.open_table(raw("devices.v1"))
            .unwrap()
            .insert(DEVICE, records::encode(&device).as_slice())
            .unwrap();
        let family = TokenFamilyRecord::V1(TokenFamilyV1 {
            device_id: DEVICE.into(),
            created_at_ms: TEST_NOW_MS,
            generation: 1,
            refresh_expires_at_ms: TEST_NOW_MS + 24 * HOUR_MS,
            revoked_at_ms: None,
            revoke_reason: None,
        });
        tx.open_table(raw("token_families.v1"))
            .unwrap()
            .insert(FAMILY, records::encode(&family).as_slice())
            .unwrap();
        let refresh = RefreshTokenRecord::V1(RefreshToken {
            family_id: FAMILY.into(),
            device_id: DEVICE.into(),
            issued_at_ms: TEST_NOW_MS,
            expires_at_ms: TEST_NOW_MS + 24 * HOUR_MS,
            spent_at_ms: None,
        });
        let refresh_key = data_encoding::HEXLOWER.encode(&sha256(&refresh_token()));
        tx.open_table(raw("refresh_tokens.v1"))
            .unwrap()
            .insert(refresh_key.as_str(), records::encode(&refresh).as_slice())
            .unwrap();
        let revoked = RevokedTokenRecord::V1(RevokedToken {
            device_id: DEVICE.into(),
            expires_at_ms: TEST_NOW_MS + HOUR_MS,
            revoked_at_ms: TEST_NOW_MS,
        });
        tx.open_table(raw("revoked_tokens.v1"))
            .unwrap()
            .insert(REVOKED_JTI, records::encode(&revoked).as_slice())
            .unwrap();
        let client = ClientRecord::V1(Client {
            name: "fixture api".into(),
            secret_hash: sha256(&client_secret()),
            created_at_ms: TEST_NOW_MS,
            revoked_at_ms: None,
        });
        tx.open_table(raw("clients.v1"))
            .unwrap()
            .insert(CLIENT, records::encode(&client).as_slice())
            .unwrap();
        let session = PairingSessionRecord::V1(PairingSession {
            name: Some("fixture session".into()),
            secret_hash: sha256(&pairing_secret()),
            created_at_ms: TEST_NOW_MS,
            expires_at_ms: TEST_NOW_MS + HOUR_MS,
            created_by: "cli".into(),
            claimed_at_ms: None,
            device_id: None,
        });
        tx.open_table(raw("pairing_sessions.v1"))
            .unwrap()
            .insert(SESSION, records::encode(&session).as_slice())
            .unwrap();
        if format >= 8 {
            tx.open_table(raw("device_families.v1"))
                .unwrap()
                .insert(format!("{DEVICE}/{FAMILY}").as_str(), [].as_slice())
                .unwrap();
            tx.open_table(raw("devices_by_age.v1"))
                .unwrap()
                .insert(
                    format!("{TEST_NOW_MS:016x}/{DEVICE}").as_str(),
                    [].as_slice(),
                )
                .unwrap();
        }
        if format >= 4 {
            // Nine of ten attempts spent: the TAT runs 54 s ahead of now.
            let window = records::RateWindowRecord::V1(records::RateWindow {
                tat_us: (TEST_NOW_MS + 54_000) * 1000,
            });
            tx.open_table(raw("rate_windows.v1"))
                .unwrap()
                .insert(
                    loopback_pairing_window().as_str(),
                    records::encode(&window).as_slice(),
                )
                .unwrap();
        }
    }
    tx.commit().unwrap();
}

/// A private copy of the format-3 fixture in `dir`, with its key beside it.
fn fixture_copy(dir: &Path) -> PathBuf {
    fixture_copy_of(3, dir)
}

fn fixture_copy_of(format: u32, dir: &Path) -> PathBuf {
    let path = helpers::copy_into(
        &fixtures().join(format!("format-v{format}.redb")),
        dir,
        "gatehouse.redb",
    );
    let key_path = dir.join("gatehouse.redb.key");
    std::fs::copy(fixtures().join(format!("format-v{format}.key")), &key_path).unwrap();
    use std::os::unix::fs::PermissionsExt;
    for p in [&path, &key_path] {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    path
}

/// A copy of the format-`format` fixture in `dir`, opened by this build: migrated from
/// `format` to the current format in one report (or not at all when it is current).
fn open_migrated(format: u32, dir: &Path) -> Store {
    let path = fixture_copy_of(format, dir);
    let key = MasterKey::load(&dir.join("gatehouse.redb.key")).unwrap();
    let (store, report) = Store::open(&path, &key, &FixedClock::new(TEST_NOW_MS)).unwrap();
    match report.migrated {
        None => assert_eq!(FORMAT_VERSION, format),
        Some(m) => assert_eq!((m.from, m.to), (format, FORMAT_VERSION)),
    }
    store
}

#[test]
fn format_v3_fixture_opens_at_the_current_format() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_migrated(3, dir.path());
    assert_eq!(store.info().format_version, FORMAT_VERSION);
    assert_eq!(store.info().instance_id, "44".repeat(16));
    let counts = store.read(|tx| tx.table_counts()).unwrap();
    for (table, rows) in [
        ("signing_keys.v1", 2),
        ("devices.v1", 1),
        ("token_families.v1", 1),
        ("refresh_tokens.v1", 1),
        ("revoked_tokens.v1", 1),
        ("clients.v1", 1),
        ("pairing_sessions.v1", 1),
        ("admin_tokens.v1", 1),
    ] {
        assert!(counts.contains(&(table, rows)), "{table}: {counts:?}");
    }
    store.close();
}

#[tokio::test]
async fn a_server_on_the_format_v3_fixture_keeps_its_keys_devices_tokens_and_clients() {
    let dir = tempfile::tempdir().unwrap();
    fixture_copy(dir.path());
    let app = helpers::spawn_app_in(dir, &[]).await;
    let services = &app.running.services;
    assert!(
        app.running.bootstrap_token.is_none(),
        "the fixture has an admin token"
    );
    let admin = app.create_admin_token().await;
    let client = app.client();

    // The stored ring is used as it is: no new keys at start.
    let kids: Vec<String> = services.keys.list().into_iter().map(|k| k.kid).collect();
    assert_eq!(kids.len(), 2);
    let jwks: serde_json::Value = client
        .get(app.url("/.well-known/jwks.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    for kid in &kids {
        assert!(
            jwks.to_string().contains(kid.as_str()),
            "{kid} not published"
        );
    }

    // The stored refresh token refreshes, and the new access token verifies.
    let response = client
        .post(app.url("/v1/token"))
        .form(&[
            ("grant_type", "refresh_token"),
            ("refresh_token", &refresh_token()),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let pair: helpers::PairedDevice = response.json().await.unwrap();
    assert_eq!(pair.device_id, DEVICE);
    let verified = services.tokens.verify(&pair.access_token).unwrap();
    assert!(kids.contains(&verified.kid));

    // The stored client introspects with its secret.
    let answer: serde_json::Value = client
        .post(app.url("/v1/introspect"))
        .basic_auth(CLIENT, Some(client_secret()))
        .form(&[("token", pair.access_token.as_str())])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(answer["active"], true);
    assert_eq!(answer["sub"], DEVICE);

    // The stored revocation is in the in-memory list; the stored device is listed.
    assert_eq!(services.revocations.counts().0, 1);
    let devices: serde_json::Value = client
        .get(app.url("/v1/devices"))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(devices["devices"][0]["name"], "Fixture phone");

    // The stored pairing session pairs a second device.
    let response = client
        .post(app.url("/v1/pair"))
        .json(&serde_json::json!({
            "session_id": SESSION,
            "secret": pairing_secret(),
            "device": {"name": "Second", "platform": "ios", "app_version": "2.0"},
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    app.stop().await;
}

#[tokio::test]
async fn a_server_on_the_format_v4_fixture_keeps_its_rate_windows() {
    let dir = tempfile::tempdir().unwrap();
    let path = fixture_copy_of(4, dir.path());
    {
        let key = MasterKey::load(&dir.path().join("gatehouse.redb.key")).unwrap();
        let (store, report) = Store::open(&path, &key, &FixedClock::new(TEST_NOW_MS)).unwrap();
        match report.migrated {
            None => assert_eq!(FORMAT_VERSION, 4),
            Some(m) => assert_eq!((m.from, m.to), (4, FORMAT_VERSION)),
        }
        let counts = store.read(|tx| tx.table_counts()).unwrap();
        assert!(counts.contains(&("rate_windows.v1", 1)), "{counts:?}");
        store.close();
    }
    let app = helpers::spawn_app_in(dir, &[]).await;
    let attempt = || async {
        app.client()
            .post(app.url("/v1/pair"))
            .json(&serde_json::json!({
                "session_id": SESSION, "secret": "wrong",
                "device": {"name": "x", "platform": "ios", "app_version": "1"},
            }))
            .send()
            .await
            .unwrap()
            .status()
    };
    // The stored window leaves 127.0.0.1 one attempt of ten.
    assert_eq!(attempt().await, 401);
    assert_eq!(attempt().await, 429);
    app.stop().await;
}

#[tokio::test]
async fn a_server_on_the_format_v5_fixture_keeps_its_audit_log_and_bans() {
    let dir = tempfile::tempdir().unwrap();
    let path = fixture_copy_of(5, dir.path());
    {
        let key = MasterKey::load(&dir.path().join("gatehouse.redb.key")).unwrap();
        let (store, report) = Store::open(&path, &key, &FixedClock::new(TEST_NOW_MS)).unwrap();
        match report.migrated {
            None => assert_eq!(FORMAT_VERSION, 5),
            Some(m) => assert_eq!((m.from, m.to), (5, FORMAT_VERSION)),
        }
        let counts = store.read(|tx| tx.table_counts()).unwrap();
        assert!(counts.contains(&("audit_events.v1", 3)), "{counts:?}");
        assert!(counts.contains(&("bans.v1", 1)), "{counts:?}");
        store.close();
    }
    let app = helpers::spawn_app_in(dir, &[]).await;
    let services = &app.running.services;
    // The stored chain still verifies, with the records this start added after it.
    let report = services.audit.verify_report(&mut |_, _| {}).unwrap();
    assert!(report.ok, "{report:?}");
    assert_eq!(report.first_seq, Some(1));
    assert!(report.records > 3, "{report:?}");
    let page = services
        .audit
        .query(&gatehouse::audit::Query {
            device: Some(DEVICE.into()),
            limit: 10,
            ..Default::default()
        })
        .unwrap();
    let kinds: Vec<&str> = page.events.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(kinds, ["pairing.created", "device.renamed", "key.rotated"]);
    // The ban is still in force for its address, and not for anyone else.
    let bans = services.lockout.list();
    assert_eq!(bans.len(), 1, "{bans:?}");
    assert_eq!(
        (bans[0].key.as_str(), bans[0].offences, bans[0].active),
        (FIXTURE_BAN, 2, true)
    );
    assert!(services.lockout.banned([192, 0, 2, 7].into()).is_some());
    assert!(services.lockout.banned([127, 0, 0, 1].into()).is_none());
    app.stop().await;
}

#[tokio::test]
async fn a_server_on_the_format_v6_fixture_keeps_its_job_state() {
    let dir = tempfile::tempdir().unwrap();
    fixture_copy_of(6, dir.path());
    let app = helpers::spawn_app_in(dir, &[("GATEHOUSE_JOBS_BACKUP", "0 0 4 * * *")]).await;
    let services = &app.running.services;
    let jobs = services.jobs.list().unwrap();
    let backup = jobs.iter().find(|j| j.name == "backup").unwrap();
    assert_eq!(backup.last_outcome.as_deref(), Some("failure"));
    assert_eq!(backup.last_error.as_deref(), Some("disk full"));
    assert_eq!(backup.failures, 1);
    // Its retry time is still ahead, so the start did not move it.
    assert_eq!(
        backup.next_run.as_deref(),
        Some(gatehouse::clock::format_rfc3339(TEST_NOW_MS + HOUR_MS).as_str())
    );
    let report = services.audit.verify_report(&mut |_, _| {}).unwrap();
    assert!(report.ok, "{report:?}");
    app.stop().await;
}

#[tokio::test]
async fn a_server_on_the_format_v7_fixture_refuses_the_journaled_family_and_folds_it() {
    let dir = tempfile::tempdir().unwrap();
    fixture_copy_of(7, dir.path());
    let app = helpers::spawn_app_in(dir, &[]).await;
    let services = &app.running.services;
    let family = gatehouse::ids::FamilyId::parse(FAMILY).unwrap();
    assert!(services.revocations.journaled().contains(&family));

    let refused = || async {
        let response = app
            .client()
            .post(app.url("/v1/token"))
            .form(&[
                ("grant_type", "refresh_token"),
                ("refresh_token", refresh_token().as_str()),
            ])
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 400, "the journaled family is refused");
    };
    refused().await;

    let folded = services.revocations.fold_journal().await.unwrap();
    assert_eq!((folded.entries, folded.families_marked), (1, 1));
    let row = services
        .store
        .read(|tx| tx.get(&gatehouse::store::TOKEN_FAMILIES, FAMILY))
        .unwrap()
        .unwrap();
    assert_eq!(row.revoked_at_ms, Some(TEST_NOW_MS - 1000));
    assert_eq!(row.revoke_reason.as_deref(), Some("revoked"));
    assert!(services.revocations.journaled().is_empty());
    refused().await;
    let report = services.audit.verify_report(&mut |_, _| {}).unwrap();
    assert!(report.ok, "{report:?}");
    app.stop().await;
}

#[test]
fn format_v8_fixture_opens_at_the_current_format_with_its_indexes() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_migrated(8, dir.path());
    let counts = store.read(|tx| tx.table_counts()).unwrap();
    for (table, rows) in [
        ("devices.v1", 1),
        ("token_families.v1", 1),
        ("device_families.v1", 1),
        ("devices_by_age.v1", 1),
        ("family_revocations.v1", 1),
    ] {
        assert!(counts.contains(&(table, rows)), "{table}: {counts:?}");
    }
    store.close();
}

/// A format-9 file keeps its pending device grant through the migration to format 10: an
/// operator approves it by its user code, and the new table of bindings is there, empty.
#[tokio::test]
async fn a_server_on_the_format_v9_fixture_approves_its_waiting_device_grant() {
    let dir = tempfile::tempdir().unwrap();
    fixture_copy_of(9, dir.path());
    let app = helpers::spawn_app_in(dir, &[]).await;
    let admin = app.create_admin_token().await;
    let approved = app
        .client()
        .post(app.url("/v1/device_grants/approve"))
        .bearer_auth(&admin)
        .json(&serde_json::json!({"user_code": "bcdf-ghjk"}))
        .send()
        .await
        .unwrap();
    assert_eq!(approved.status(), 200);
    let view: serde_json::Value = approved.json().await.unwrap();
    assert_eq!(view["id"], GRANT);
    assert_eq!(view["client_id"], "fixture-tv");
    assert_eq!(view["status"], "approved");
    let counts = app
        .running
        .services
        .store
        .read(|tx| tx.table_counts())
        .unwrap();
    assert!(counts.contains(&("family_bindings.v1", 0)), "{counts:?}");
    app.stop().await;
}

/// A format-10 file opens at the current format with its version-1 family row read as
/// having no status-list places, its binding kept, and the status-list tables there,
/// empty; the first token a server on it issues starts the index space at 0.
#[tokio::test]
async fn a_server_on_the_format_v10_fixture_keeps_its_binding_and_starts_its_status_lists() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_migrated(10, dir.path());
    let (family, binding) = store
        .read(|tx| {
            Ok::<_, gatehouse::store::StoreError>((
                tx.get(&gatehouse::store::TOKEN_FAMILIES, FAMILY)?,
                tx.get(&gatehouse::store::FAMILY_BINDINGS, FAMILY)?,
            ))
        })
        .unwrap();
    let family = family.expect("the family row");
    assert_eq!(family.device_id, DEVICE);
    assert!(family.status.is_empty());
    assert_eq!(binding.expect("the binding").jkt, FIXTURE_JKT);
    let counts = store.read(|tx| tx.table_counts()).unwrap();
    for table in ["status_revoked.v1", "status_allocation.v1"] {
        assert!(counts.contains(&(table, 0)), "{table}: {counts:?}");
    }
    store.close();

    let dir = tempfile::tempdir().unwrap();
    fixture_copy_of(10, dir.path());
    let app = helpers::spawn_app_in(dir, &[]).await;
    let admin = app.create_admin_token().await;
    let device = app.pair_device_as(&admin).await;
    let place = crate::status_list::place_of(&device.access_token);
    assert_eq!(place.idx, 0);
    assert!(place.uri.ends_with("/v1/statuslists/0"), "{place:?}");
    app.stop().await;
}

/// The format 7 → 8 step fills both indexes from the rows a format-6 file holds: the
/// device is listed, and revoking it revokes its family, found through the new index.
#[tokio::test]
async fn a_migrated_format_v6_fixture_lists_its_device_and_revokes_its_family() {
    let dir = tempfile::tempdir().unwrap();
    fixture_copy_of(6, dir.path());
    let app = helpers::spawn_app_in(dir, &[]).await;
    let admin = app.create_admin_token().await;
    let listed: serde_json::Value = app
        .client()
        .get(app.url("/v1/devices"))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(listed["devices"][0]["id"], DEVICE, "{listed}");
    let response = app
        .client()
        .delete(app.url(&format!("/v1/devices/{DEVICE}")))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let row = app
        .running
        .services
        .store
        .read(|tx| tx.get(&gatehouse::store::TOKEN_FAMILIES, FAMILY))
        .unwrap()
        .unwrap();
    assert_eq!(row.revoke_reason.as_deref(), Some("device revoked"));
    app.stop().await;
}
