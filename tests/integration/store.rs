//! The data file: round-trips, migration from a format-1 fixture, refusal of damaged,
//! newer or wrongly keyed files (left byte-identical), sealing bound to its row, the
//! group-commit writer and rekey.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use gatehouse::admin_tokens::AdminTokens;
use gatehouse::clock::{FixedClock, SharedClock};
use gatehouse::store::records::{self, AdminToken, AdminTokenRecord, AdminTokenV1};
use gatehouse::store::seal::{MasterKey, Sealer};
use gatehouse::store::{ALL_TABLES, FORMAT_VERSION};
use gatehouse::store::{Store, StoreError};
use redb::{ReadableTable, TableDefinition};

use crate::helpers::{self, TEST_NOW_MS};

const RAW: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const RAW_SECRETS: TableDefinition<&str, &[u8]> = TableDefinition::new("secrets.v1");
const RAW_ADMIN_TOKENS: TableDefinition<&str, &[u8]> = TableDefinition::new("admin_tokens.v1");

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn clock() -> Arc<FixedClock> {
    Arc::new(FixedClock::new(TEST_NOW_MS))
}

/// A new data file with a key beside it, closed.
fn new_instance(dir: &Path) -> (PathBuf, MasterKey) {
    let path = dir.join("gatehouse.redb");
    let key = MasterKey::generate().unwrap();
    let (store, report) = Store::open(&path, &key, clock().as_ref()).unwrap();
    assert!(report.created);
    store.close();
    drop(store);
    (path, key)
}

fn token(name: &str) -> AdminToken {
    AdminToken {
        name: name.into(),
        secret_hash: [9; 32],
        created_at_ms: 1,
        last_used_at_ms: None,
        revoked_at_ms: None,
    }
}

/// Writes straight into a closed data file, bypassing every gatehouse check.
fn raw_edit(path: &Path, edit: impl FnOnce(&redb::WriteTransaction)) {
    let db = redb::Database::open(path).unwrap();
    let tx = db.begin_write().unwrap();
    edit(&tx);
    tx.commit().unwrap();
}

#[tokio::test]
async fn records_round_trip_across_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let (path, key) = new_instance(dir.path());
    let cert = gatehouse::tls::generate_self_signed(&["localhost".into()], TEST_NOW_MS).unwrap();
    {
        let (store, report) = Store::open(&path, &key, clock().as_ref()).unwrap();
        assert!(!report.created && report.migrated.is_none());
        let stored = cert.clone();
        store
            .write(move |tx| -> Result<(), StoreError> {
                tx.put_admin_token("00000000000000aa", &token("a"))?;
                tx.put_self_signed_cert(&stored)
            })
            .await
            .unwrap();
        store.close();
    }
    let (store, _) = Store::open(&path, &key, clock().as_ref()).unwrap();
    assert_eq!(
        store.read(|tx| tx.admin_token("00000000000000aa")).unwrap(),
        Some(token("a"))
    );
    assert_eq!(
        store.read(|tx| tx.self_signed_cert()).unwrap(),
        Some(cert.clone())
    );
    let counts = store.read(|tx| tx.table_counts()).unwrap();
    assert!(counts.contains(&("admin_tokens.v1", 1)));
    assert_eq!(store.info().format_version, FORMAT_VERSION);
    // The sealed secret is not readable in the file.
    store.close();
    drop(store);
    let bytes = std::fs::read(&path).unwrap();
    assert!(!bytes.windows(16).any(|w| w == &cert.key_der[..16]));
}

/// The change counter counts committed write transactions: a write that fails and rolls
/// back leaves it where it was.
#[tokio::test]
async fn the_change_counter_counts_commits_only() {
    let dir = tempfile::tempdir().unwrap();
    let (path, key) = new_instance(dir.path());
    let (store, _) = Store::open(&path, &key, clock().as_ref()).unwrap();
    let before = store.commits();
    store
        .write(|tx| tx.put_admin_token("00000000000000bb", &token("b")))
        .await
        .unwrap();
    assert_eq!(store.commits(), before + 1);
    let refused = store
        .write(|tx| -> Result<(), StoreError> {
            tx.put_admin_token("00000000000000cc", &token("c"))?;
            Err(StoreError::WriteFailed("refused by the test".into()))
        })
        .await;
    assert!(refused.is_err());
    assert_eq!(
        store.commits(),
        before + 1,
        "a rolled-back write is no change"
    );
    assert_eq!(
        store.read(|tx| tx.admin_token("00000000000000cc")).unwrap(),
        None
    );
    store.close();
}

// ---------------------------------------------------------------------------------------
// The format-1 fixture

const FIXTURE_TOKEN_ID: &str = "0011223344556677";
const FIXTURE_TOKEN_SECRET: [u8; 32] = [7; 32];

fn fixture_token_text() -> String {
    format!(
        "gha_{FIXTURE_TOKEN_ID}_{}",
        data_encoding::BASE64URL_NOPAD.encode(&FIXTURE_TOKEN_SECRET)
    )
}

/// Builds `tests/fixtures/format-v1.redb` the way a format-1 gatehouse wrote it. Run
/// once with `cargo test -- --ignored write_format_v1_fixture`; the committed file is
/// the fixture, this is its recipe.
#[test]
#[ignore = "regenerates the committed fixture"]
fn write_format_v1_fixture() {
    let path = fixtures().join("format-v1.redb");
    let key_path = fixtures().join("format-v1.key");
    let _ = std::fs::remove_file(&path);
    let _ = std::fs::remove_file(&key_path);
    let key = MasterKey::create_file(&key_path).unwrap();
    let sealer = Sealer::new(&key);
    let db = redb::Database::create(&path).unwrap();
    let tx = db.begin_write().unwrap();
    {
        helpers::write_fixture_base(&tx, &sealer, 1, 0x42);
        let mut tokens = tx.open_table(RAW_ADMIN_TOKENS).unwrap();
        let hash: [u8; 32] = ring::digest::digest(&ring::digest::SHA256, &FIXTURE_TOKEN_SECRET)
            .as_ref()
            .try_into()
            .unwrap();
        for (id, name, secret_hash) in [
            (FIXTURE_TOKEN_ID, "bootstrap", hash),
            ("8899aabbccddeeff", "ops", [1; 32]),
        ] {
            let record = AdminTokenRecord::V1(AdminTokenV1 {
                name: name.into(),
                secret_hash,
                created_at_ms: TEST_NOW_MS,
            });
            tokens
                .insert(id, records::encode(&record).as_slice())
                .unwrap();
        }
    }
    tx.commit().unwrap();
}

/// Builds `tests/fixtures/format-v2.redb` the way a format-2 gatehouse wrote it: the
/// same instance as the format-1 fixture, with its tokens as version-2 records (one of
/// them revoked and one used). Run once with
/// `cargo test -- --ignored write_format_v2_fixture`.
#[test]
#[ignore = "regenerates the committed fixture"]
fn write_format_v2_fixture() {
    let path = fixtures().join("format-v2.redb");
    let key_path = fixtures().join("format-v2.key");
    let _ = std::fs::remove_file(&path);
    let _ = std::fs::remove_file(&key_path);
    let key = MasterKey::create_file(&key_path).unwrap();
    let sealer = Sealer::new(&key);
    let db = redb::Database::create(&path).unwrap();
    let tx = db.begin_write().unwrap();
    {
        helpers::write_fixture_base(&tx, &sealer, 2, 0x43);
        let mut tokens = tx.open_table(RAW_ADMIN_TOKENS).unwrap();
        let hash: [u8; 32] = ring::digest::digest(&ring::digest::SHA256, &FIXTURE_TOKEN_SECRET)
            .as_ref()
            .try_into()
            .unwrap();
        for (id, name, secret_hash, used, revoked) in [
            (
                FIXTURE_TOKEN_ID,
                "bootstrap",
                hash,
                Some(TEST_NOW_MS + 5),
                None,
            ),
            (
                "8899aabbccddeeff",
                "ops",
                [1; 32],
                None,
                Some(TEST_NOW_MS + 9),
            ),
        ] {
            let record = AdminTokenRecord::V2(AdminToken {
                name: name.into(),
                secret_hash,
                created_at_ms: TEST_NOW_MS,
                last_used_at_ms: used,
                revoked_at_ms: revoked,
            });
            tokens
                .insert(id, records::encode(&record).as_slice())
                .unwrap();
        }
    }
    tx.commit().unwrap();
}

fn fixture_copy(dir: &Path) -> (PathBuf, MasterKey) {
    let path = helpers::copy_into(&fixtures().join("format-v1.redb"), dir, "gatehouse.redb");
    let key_path = dir.join("gatehouse.redb.key");
    std::fs::write(
        &key_path,
        std::fs::read(fixtures().join("format-v1.key")).unwrap(),
    )
    .unwrap();
    set_mode(&key_path, 0o600);
    set_mode(&path, 0o600);
    (path, MasterKey::load(&key_path).unwrap())
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

#[tokio::test]
async fn format_v1_fixture_migrates_to_current() {
    let dir = tempfile::tempdir().unwrap();
    let (path, key) = fixture_copy(dir.path());
    let (store, report) = Store::open(&path, &key, clock().as_ref()).unwrap();
    let migrated = report.migrated.expect("format 1 is migrated");
    assert_eq!((migrated.from, migrated.to), (1, FORMAT_VERSION));
    assert_eq!(store.info().format_version, FORMAT_VERSION);
    assert_eq!(store.info().instance_id, "42".repeat(16));

    let tokens = store.read(|tx| tx.admin_tokens()).unwrap();
    assert_eq!(tokens.len(), 2);
    assert!(tokens.iter().all(|(_, t)| t.revoked_at_ms.is_none()));
    let shared: SharedClock = clock();
    let admin = AdminTokens::load(store.clone(), shared).expect("admin tokens");
    assert_eq!(
        admin.verify(&fixture_token_text()).unwrap(),
        FIXTURE_TOKEN_ID
    );
    // New code can write to a migrated file.
    admin
        .revoke("8899aabbccddeeff", &gatehouse::audit::Origin::operator())
        .await
        .unwrap();
    store.close();
    drop((store, admin));

    // Rows are stored as version-2 records now, and a second open migrates nothing.
    let db = redb::ReadOnlyDatabase::open(&path).unwrap();
    {
        let tx = redb::ReadableDatabase::begin_read(&db).unwrap();
        let table = tx.open_table(RAW_ADMIN_TOKENS).unwrap();
        for row in table.iter().unwrap() {
            let (_, value) = row.unwrap();
            let record: AdminTokenRecord = records::decode(value.value()).unwrap();
            assert!(matches!(record, AdminTokenRecord::V2(_)));
        }
    }
    drop(db);
    let (store, report) = Store::open(&path, &key, clock().as_ref()).unwrap();
    assert!(report.migrated.is_none());
    assert!(
        store
            .read(|tx| tx.admin_token("8899aabbccddeeff"))
            .unwrap()
            .unwrap()
            .revoked_at_ms
            .is_some()
    );
    store.close();
}

#[tokio::test]
async fn migrated_fixture_serves_its_stored_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let (path, key) = fixture_copy(dir.path());
    let stored = {
        let (store, _) = Store::open(&path, &key, clock().as_ref()).unwrap();
        let cert = store.read(|tx| tx.self_signed_cert()).unwrap().unwrap();
        store.close();
        cert
    };
    let app = helpers::spawn_app_in(dir, &[]).await;
    assert!(
        app.running.bootstrap_token.is_none(),
        "the fixture has tokens"
    );
    assert_eq!(
        app.running.tls.as_ref().unwrap().cert_der(),
        stored.cert_der
    );
    let response = app
        .client()
        .get(format!("{}/healthz", app.base_url))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    app.stop().await;
}

// ---------------------------------------------------------------------------------------
// Files that must be refused and left untouched

fn assert_refused_untouched(path: &Path, key: &MasterKey) -> StoreError {
    let before = std::fs::read(path).unwrap();
    let err = Store::open(path, key, clock().as_ref()).expect_err("must be refused");
    assert_eq!(
        std::fs::read(path).unwrap(),
        before,
        "refused file was modified"
    );
    let dir = path.parent().unwrap();
    for leftover in std::fs::read_dir(dir).unwrap() {
        let name = leftover.unwrap().file_name().into_string().unwrap();
        assert!(
            !name.ends_with(".recovering"),
            "a repair copy was left behind: {name}"
        );
    }
    err
}

#[test]
fn wrong_master_key_is_refused_and_file_byte_identical() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = new_instance(dir.path());
    let other = MasterKey::generate().unwrap();
    let err = assert_refused_untouched(&path, &other);
    assert!(matches!(err, StoreError::WrongMasterKey { .. }), "{err}");
    assert!(err.to_string().contains("master key"));
}

#[test]
fn newer_format_is_refused_and_file_byte_identical() {
    let dir = tempfile::tempdir().unwrap();
    let (path, key) = new_instance(dir.path());
    raw_edit(&path, |tx| {
        tx.open_table(RAW)
            .unwrap()
            .insert("format_version", 99u32.to_le_bytes().as_slice())
            .unwrap();
    });
    let err = assert_refused_untouched(&path, &key);
    assert!(
        matches!(
            err,
            StoreError::NewerFormat {
                found: 99,
                supported: FORMAT_VERSION,
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn truncated_file_is_refused_and_left_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let (path, key) = new_instance(dir.path());
    let whole = std::fs::read(&path).unwrap();
    for keep in [
        0,
        100,
        4096,
        whole.len() / 3,
        whole.len() / 2,
        whole.len() - 1,
    ] {
        std::fs::write(&path, &whole[..keep]).unwrap();
        let err = assert_refused_untouched(&path, &key);
        assert!(
            matches!(
                err,
                StoreError::Corrupt { .. } | StoreError::NotADataFile { .. }
            ),
            "truncated to {keep}: {err}"
        );
    }
}

#[test]
fn garbage_and_foreign_files_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let key = MasterKey::generate().unwrap();
    let path = dir.path().join("gatehouse.redb");
    let mut garbage = vec![0u8; 64 * 1024];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut garbage).unwrap();
    std::fs::write(&path, &garbage).unwrap();
    let err = assert_refused_untouched(&path, &key);
    assert!(matches!(err, StoreError::NotADataFile { .. }), "{err}");

    // A healthy redb file that is not gatehouse's.
    std::fs::remove_file(&path).unwrap();
    {
        let db = redb::Database::create(&path).unwrap();
        let tx = db.begin_write().unwrap();
        tx.open_table(TableDefinition::<u64, u64>::new("other"))
            .unwrap()
            .insert(1, 2)
            .unwrap();
        tx.commit().unwrap();
    }
    let err = assert_refused_untouched(&path, &key);
    assert!(matches!(err, StoreError::NotADataFile { .. }), "{err}");

    // A directory where the file should be.
    let as_dir = dir.path().join("dir.redb");
    std::fs::create_dir(&as_dir).unwrap();
    let err = Store::open(&as_dir, &key, clock().as_ref()).unwrap_err();
    assert!(matches!(err, StoreError::NotADataFile { .. }), "{err}");
}

#[test]
fn damaged_header_is_refused_and_left_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let (path, key) = new_instance(dir.path());
    let mut bytes = std::fs::read(&path).unwrap();
    // The first bytes are redb's magic number and header.
    for b in &mut bytes[..64] {
        *b ^= 0xFF;
    }
    std::fs::write(&path, &bytes).unwrap();
    let err = assert_refused_untouched(&path, &key);
    assert!(
        matches!(
            err,
            StoreError::Corrupt { .. } | StoreError::NotADataFile { .. }
        ),
        "{err}"
    );
}

#[test]
fn a_second_opener_is_refused_while_the_file_is_held() {
    let dir = tempfile::tempdir().unwrap();
    let (path, key) = new_instance(dir.path());
    let (store, _) = Store::open(&path, &key, clock().as_ref()).unwrap();
    let err = Store::open(&path, &key, clock().as_ref()).unwrap_err();
    assert!(matches!(err, StoreError::Locked { .. }), "{err}");
    store.close();
}

#[test]
fn a_failed_creation_leaves_no_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("missing-dir").join("gatehouse.redb");
    let key = MasterKey::generate().unwrap();
    let err = Store::open(&path, &key, clock().as_ref()).unwrap_err();
    assert!(matches!(err, StoreError::Io { .. }), "{err}");
    assert!(!path.exists());
}

#[test]
fn group_readable_data_file_is_warned_about() {
    let dir = tempfile::tempdir().unwrap();
    let (path, key) = new_instance(dir.path());
    set_mode(&path, 0o640);
    let (store, report) = Store::open(&path, &key, clock().as_ref()).unwrap();
    assert!(
        report.warnings.iter().any(|w| w.contains("chmod 600")),
        "{:?}",
        report.warnings
    );
    store.close();
}

#[test]
fn a_new_data_file_is_private() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = new_instance(dir.path());
    assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o777, 0o600);
}

// ---------------------------------------------------------------------------------------
// Crash recovery

/// A file whose last writer died without saving allocator state: redb's read-only mode
/// refuses it, so gatehouse repairs a copy and keeps the original.
#[test]
fn unclean_file_is_repaired_on_a_copy_and_the_original_kept() {
    let dir = tempfile::tempdir().unwrap();
    let (path, key) = new_instance(dir.path());
    let crashed = dir.path().join("crashed.redb");
    {
        // Commit without quick repair, then copy the file while it is still open: the
        // copy is what a crash right after that commit leaves on disk.
        let db = redb::Database::open(&path).unwrap();
        let mut tx = db.begin_write().unwrap();
        tx.set_quick_repair(false);
        tx.open_table(RAW_ADMIN_TOKENS)
            .unwrap()
            .insert(
                "00000000000000bb",
                records::encode(&AdminTokenRecord::V2(token("survivor"))).as_slice(),
            )
            .unwrap();
        tx.commit().unwrap();
        std::fs::copy(&path, &crashed).unwrap();
    }
    let needs_repair = matches!(
        redb::ReadOnlyDatabase::open(&crashed),
        Err(redb::DatabaseError::RepairAborted)
    );
    assert!(
        needs_repair,
        "the simulated crash did not leave an unclean file"
    );
    let original = std::fs::read(&crashed).unwrap();
    let (store, report) = Store::open(&crashed, &key, clock().as_ref()).unwrap();
    let kept = report.recovered_original.expect("recovery reported");
    assert_eq!(std::fs::read(&kept).unwrap(), original);
    assert_eq!(
        store
            .read(|tx| tx.admin_token("00000000000000bb"))
            .unwrap()
            .map(|t| t.name),
        Some("survivor".to_string())
    );
    store.close();
    drop(store);
    // Clean now: a plain read-only open works.
    assert!(redb::ReadOnlyDatabase::open(&crashed).is_ok());
}

#[test]
fn unclean_file_with_wrong_key_is_left_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = new_instance(dir.path());
    let crashed = dir.path().join("crashed.redb");
    {
        let db = redb::Database::open(&path).unwrap();
        let mut tx = db.begin_write().unwrap();
        tx.set_quick_repair(false);
        tx.open_table(RAW_SECRETS).unwrap();
        tx.commit().unwrap();
        std::fs::copy(&path, &crashed).unwrap();
    }
    let err = assert_refused_untouched(&crashed, &MasterKey::generate().unwrap());
    assert!(matches!(err, StoreError::WrongMasterKey { .. }), "{err}");
    assert!(!dir.path().join("crashed.redb.before-recovery").exists());
}

// ---------------------------------------------------------------------------------------
// Sealing and rekey

/// A closed instance whose secrets table holds a self-signed certificate.
async fn instance_with_certificate(dir: &Path) -> (PathBuf, MasterKey) {
    let (path, key) = new_instance(dir);
    let (store, _) = Store::open(&path, &key, clock().as_ref()).unwrap();
    let cert = gatehouse::tls::generate_self_signed(&["localhost".into()], TEST_NOW_MS).unwrap();
    store
        .write(move |tx| tx.put_self_signed_cert(&cert))
        .await
        .unwrap();
    store.close();
    (path, key)
}

#[tokio::test]
async fn sealed_value_moved_to_another_row_does_not_open() {
    let dir = tempfile::tempdir().unwrap();
    let (path, key) = instance_with_certificate(dir.path()).await;
    // Move the master-key check value into the certificate's row: same key, wrong row.
    raw_edit(&path, |tx| {
        let check = tx
            .open_table(RAW)
            .unwrap()
            .get("master_key_check")
            .unwrap()
            .unwrap()
            .value()
            .to_vec();
        tx.open_table(RAW_SECRETS)
            .unwrap()
            .insert("tls/self-signed", check.as_slice())
            .unwrap();
    });
    let (store, _) = Store::open(&path, &key, clock().as_ref()).unwrap();
    let err = store.read(|tx| tx.self_signed_cert()).unwrap_err();
    assert!(
        matches!(err, StoreError::SealedValue { ref key, .. } if key == "tls/self-signed"),
        "{err}"
    );
    store.close();
}

#[tokio::test]
async fn rekey_reseals_everything_and_the_old_key_stops_working() {
    let dir = tempfile::tempdir().unwrap();
    let (path, old) = new_instance(dir.path());
    let new = MasterKey::generate().unwrap();
    let cert = gatehouse::tls::generate_self_signed(&["localhost".into()], TEST_NOW_MS).unwrap();
    {
        let (store, _) = Store::open(&path, &old, clock().as_ref()).unwrap();
        let stored = cert.clone();
        store
            .write(move |tx| tx.put_self_signed_cert(&stored))
            .await
            .unwrap();
        // The certificate and the audit chain key.
        assert_eq!(store.rekey(&new).await.unwrap(), 2);
        assert_eq!(store.master_key_fingerprint(), new.fingerprint());
        // The running store reads with the new key at once.
        assert_eq!(
            store.read(|tx| tx.self_signed_cert()).unwrap(),
            Some(cert.clone())
        );
        store.close();
    }
    let err = assert_refused_untouched(&path, &old);
    assert!(matches!(err, StoreError::WrongMasterKey { .. }));
    let (store, _) = Store::open(&path, &new, clock().as_ref()).unwrap();
    assert_eq!(store.read(|tx| tx.self_signed_cert()).unwrap(), Some(cert));
    store.close();
}

#[tokio::test]
async fn rekey_that_cannot_open_a_row_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (path, key) = instance_with_certificate(dir.path()).await;
    // A sealed value copied to another row of the same table.
    raw_edit(&path, |tx| {
        let mut secrets = tx.open_table(RAW_SECRETS).unwrap();
        let sealed = secrets
            .get("tls/self-signed")
            .unwrap()
            .unwrap()
            .value()
            .to_vec();
        secrets.insert("tls/moved", sealed.as_slice()).unwrap();
    });
    let (store, _) = Store::open(&path, &key, clock().as_ref()).unwrap();
    let err = store
        .rekey(&MasterKey::generate().unwrap())
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::SealedValue { ref key, .. } if key == "tls/moved"),
        "{err}"
    );
    assert_eq!(store.master_key_fingerprint(), key.fingerprint());
    assert!(store.read(|tx| tx.self_signed_cert()).unwrap().is_some());
    store.close();
    drop(store);
    let (store, _) = Store::open(&path, &key, clock().as_ref()).unwrap();
    store.close();
}

// ---------------------------------------------------------------------------------------
// The group-commit writer

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_writes_are_all_durable_and_a_failing_job_harms_none() {
    let dir = tempfile::tempdir().unwrap();
    let (path, key) = new_instance(dir.path());
    let (store, _) = Store::open(&path, &key, clock().as_ref()).unwrap();
    let mut tasks = Vec::new();
    for i in 0..300u32 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            if i % 10 == 0 {
                // Writes, then fails: its write must vanish, its neighbours must not.
                let id = format!("bad{i:013}");
                store
                    .write(move |tx| -> Result<(), StoreError> {
                        tx.put_admin_token(&id, &token("doomed"))?;
                        Err(StoreError::WriteFailed("refused on purpose".into()))
                    })
                    .await
                    .map(|()| false)
            } else {
                let id = format!("{i:016x}");
                store
                    .write(move |tx| tx.put_admin_token(&id, &token("ok")))
                    .await
                    .map(|()| true)
            }
        }));
    }
    let mut ok = 0;
    let mut failed = 0;
    for task in tasks {
        match task.await.unwrap() {
            Ok(true) => ok += 1,
            Err(StoreError::WriteFailed(_)) => failed += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!((ok, failed), (270, 30));
    store.close();
    drop(store);
    let (store, _) = Store::open(&path, &key, clock().as_ref()).unwrap();
    let tokens = store.read(|tx| tx.admin_tokens()).unwrap();
    assert_eq!(tokens.len(), 270);
    assert!(tokens.iter().all(|(_, t)| t.name == "ok"));
    store.close();
}

#[tokio::test]
async fn a_panicking_job_is_an_error_and_the_writer_lives_on() {
    let dir = tempfile::tempdir().unwrap();
    let (path, key) = new_instance(dir.path());
    let (store, _) = Store::open(&path, &key, clock().as_ref()).unwrap();
    let err = store
        .write(|_tx| -> Result<(), StoreError> { panic!("job bug") })
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::JobPanicked), "{err}");
    store
        .write(|tx| tx.put_admin_token("00000000000000cc", &token("after")))
        .await
        .unwrap();
    assert!(store.is_healthy());
    store.close();
    let err = store
        .write(|tx| tx.put_admin_token("00000000000000dd", &token("late")))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::WriterStopped));
}

// ---------------------------------------------------------------------------------------
// The format-2 fixture

/// A copy of the format-2 fixture and its key, laid out as a server expects them.
fn fixture_v2_copy(dir: &Path) -> (PathBuf, MasterKey) {
    let path = helpers::copy_into(&fixtures().join("format-v2.redb"), dir, "gatehouse.redb");
    let key_path = dir.join("gatehouse.redb.key");
    std::fs::write(
        &key_path,
        std::fs::read(fixtures().join("format-v2.key")).unwrap(),
    )
    .unwrap();
    set_mode(&key_path, 0o600);
    set_mode(&path, 0o600);
    (path, MasterKey::load(&key_path).unwrap())
}

/// Tables formats 3 and later added; a migrated format-2 file has them, empty.
const FORMAT_3_TABLES: &[&str] = &[
    "signing_keys.v1",
    "pairing_sessions.v1",
    "devices.v1",
    "token_families.v1",
    "refresh_tokens.v1",
    "revoked_tokens.v1",
    "clients.v1",
    "rate_windows.v1",
];

#[tokio::test]
async fn format_v2_fixture_migrates_to_current_with_empty_token_tables() {
    let dir = tempfile::tempdir().unwrap();
    let (path, key) = fixture_v2_copy(dir.path());
    let (store, report) = Store::open(&path, &key, clock().as_ref()).unwrap();
    let migrated = report.migrated.expect("format 2 is migrated");
    assert_eq!((migrated.from, migrated.to), (2, FORMAT_VERSION));
    assert_eq!(
        migrated.steps.len(),
        (FORMAT_VERSION - 2) as usize,
        "{:?}",
        migrated.steps
    );
    assert_eq!(store.info().format_version, FORMAT_VERSION);
    assert_eq!(store.info().instance_id, "43".repeat(16));
    assert_eq!(store.info().created_at_ms, TEST_NOW_MS);

    // Both admin tokens, with their last use and revocation, unchanged.
    let tokens = store.read(|tx| tx.admin_tokens()).unwrap();
    assert_eq!(tokens.len(), 2);
    let bootstrap = store
        .read(|tx| tx.admin_token(FIXTURE_TOKEN_ID))
        .unwrap()
        .expect("the bootstrap token");
    assert_eq!(bootstrap.name, "bootstrap");
    assert_eq!(bootstrap.created_at_ms, TEST_NOW_MS);
    assert_eq!(bootstrap.last_used_at_ms, Some(TEST_NOW_MS + 5));
    assert_eq!(bootstrap.revoked_at_ms, None);
    let ops = store
        .read(|tx| tx.admin_token("8899aabbccddeeff"))
        .unwrap()
        .expect("the ops token");
    assert_eq!(ops.name, "ops");
    assert_eq!(ops.last_used_at_ms, None);
    assert_eq!(ops.revoked_at_ms, Some(TEST_NOW_MS + 9));
    let shared: SharedClock = clock();
    let admin = AdminTokens::load(store.clone(), shared).expect("admin tokens");
    assert_eq!(
        admin.verify(&fixture_token_text()).unwrap(),
        FIXTURE_TOKEN_ID
    );
    assert!(store.read(|tx| tx.self_signed_cert()).unwrap().is_some());

    let counts = store.read(|tx| tx.table_counts()).unwrap();
    for table in FORMAT_3_TABLES {
        assert!(counts.contains(&(table, 0)), "{table} in {counts:?}");
    }
    assert!(counts.contains(&("admin_tokens.v1", 2)), "{counts:?}");
    // The certificate, and the audit chain key made at the first open of this format.
    assert!(counts.contains(&("secrets.v1", 2)), "{counts:?}");
    assert_eq!(counts.len(), ALL_TABLES.len());
    store.close();
    drop((store, admin));

    // A second open migrates nothing.
    let (store, report) = Store::open(&path, &key, clock().as_ref()).unwrap();
    assert!(report.migrated.is_none());
    assert_eq!(store.read(|tx| tx.admin_tokens()).unwrap(), tokens);
    store.close();
}

#[tokio::test]
async fn a_server_on_the_format_v2_fixture_serves_its_certificate_and_pairs_a_device() {
    let dir = tempfile::tempdir().unwrap();
    let (path, key) = fixture_v2_copy(dir.path());
    // The server itself migrates the file.
    let app = helpers::spawn_app_in(dir, &[]).await;
    assert!(
        app.running.bootstrap_token.is_none(),
        "the fixture has tokens"
    );
    assert_eq!(app.running.store.info().format_version, FORMAT_VERSION);
    let served = app.running.tls.as_ref().unwrap().cert_der();
    let admin = app
        .running
        .services
        .admin_tokens
        .create("after migration", &gatehouse::audit::Origin::operator())
        .await
        .unwrap()
        .token;
    let client = app.client();

    // The fixture's own token still administers.
    let response = client
        .get(app.url("/v1/keys"))
        .bearer_auth(fixture_token_text())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let keys: serde_json::Value = response.json().await.unwrap();
    assert_eq!(keys["keys"].as_array().unwrap().len(), 2, "{keys}");

    let response = client
        .post(app.url("/v1/pairing/sessions"))
        .bearer_auth(&admin)
        .json(&serde_json::json!({"name": "first phone"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    let session: serde_json::Value = response.json().await.unwrap();
    let response = client
        .post(app.url("/v1/pair"))
        .json(&serde_json::json!({
            "session_id": session["session_id"],
            "secret": session["secret"],
            "device": {"name": "Pixel", "platform": "android", "app_version": "1.0.0"},
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let pair: helpers::PairedDevice = response.json().await.unwrap();
    let response = client
        .post(app.url("/v1/introspect"))
        .bearer_auth(&admin)
        .form(&[("token", pair.access_token.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let answer: serde_json::Value = response.json().await.unwrap();
    assert_eq!(answer["active"], true, "{answer}");
    assert_eq!(answer["sub"], pair.device_id.as_str());
    let counts = app.running.store.read(|tx| tx.table_counts()).unwrap();
    assert!(counts.contains(&("devices.v1", 1)), "{counts:?}");
    assert!(counts.contains(&("signing_keys.v1", 2)), "{counts:?}");
    let _dir = app.stop().await;

    // What was served is the certificate the fixture stored, not a new one.
    let (store, report) = Store::open(&path, &key, clock().as_ref()).unwrap();
    assert!(report.migrated.is_none());
    let stored = store.read(|tx| tx.self_signed_cert()).unwrap().unwrap();
    assert_eq!(served, stored.cert_der);
    store.close();
}

/// A data file with some rows in many tables, as a busy server leaves it.
async fn busy_instance(dir: &Path) -> (PathBuf, MasterKey) {
    let (path, key) = new_instance(dir);
    let (store, _) = Store::open(&path, &key, clock().as_ref()).unwrap();
    for round in 0..40u32 {
        store
            .write(move |tx| -> Result<(), StoreError> {
                for i in 0..50u32 {
                    tx.put_admin_token(&format!("{round:08x}{i:08x}"), &token("busy"))?;
                }
                Ok(())
            })
            .await
            .unwrap();
    }
    store.close();
    drop(store);
    (path, key)
}

/// The two damaged files that once panicked inside redb: a copy of a file taken while it
/// was open (as a SIGKILL leaves it) cut in half, and a valid header followed by random
/// bytes. Each is refused with a clear error, left byte-identical, with nothing beside it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_files_that_panicked_inside_redb_are_refused_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let (path, key) = busy_instance(dir.path()).await;
    let healthy = std::fs::read(&path).unwrap();

    // Open (so the file says it was not closed cleanly), copy, cut.
    let unclean = {
        let (store, _) = Store::open(&path, &key, clock().as_ref()).unwrap();
        store
            .write(|tx| tx.put_admin_token("ffffffffffffffff", &token("last")))
            .await
            .unwrap();
        let bytes = std::fs::read(&path).unwrap();
        store.close();
        drop(store);
        bytes
    };
    let rng = ring::rand::SystemRandom::new();
    let mut cases: Vec<(String, Vec<u8>)> = Vec::new();
    for fraction in [2, 3, 4] {
        cases.push((
            format!("unclean file cut to 1/{fraction}"),
            unclean[..unclean.len() / fraction].to_vec(),
        ));
    }
    for header in [512usize, 4096, 8192] {
        for round in 0..4 {
            let mut bytes = healthy[..header.min(healthy.len())].to_vec();
            let mut tail = vec![0u8; healthy.len() - bytes.len()];
            ring::rand::SecureRandom::fill(&rng, &mut tail).unwrap();
            bytes.extend(tail);
            cases.push((format!("{header}-byte header, random tail #{round}"), bytes));
        }
    }
    for (what, bytes) in cases {
        std::fs::write(&path, &bytes).unwrap();
        let opened = std::panic::catch_unwind(|| Store::open(&path, &key, clock().as_ref()));
        let Ok(result) = opened else {
            panic!("{what}: opening panicked");
        };
        let Err(err) = result else {
            // Some random tails leave a file redb can still read: then it must be whole.
            continue;
        };
        assert!(
            matches!(
                err,
                StoreError::Corrupt { .. } | StoreError::NotADataFile { .. }
            ),
            "{what}: {err}"
        );
        assert_eq!(
            std::fs::read(&path).unwrap(),
            bytes,
            "{what}: file modified"
        );
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(
            names,
            ["gatehouse.redb"],
            "{what}: something left beside it"
        );
    }
}
