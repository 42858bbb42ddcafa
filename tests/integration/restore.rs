//! Online backups and restores: a backup taken under a write load restores to a
//! consistent state, and a restore refuses a backup it cannot trust with the data file
//! left exactly as it was.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use gatehouse::audit::Origin;
use gatehouse::backup::{self, BackupError};
use gatehouse::clock::FixedClock;
use gatehouse::store::seal::MasterKey;
use gatehouse::store::{DEVICES, REFRESH_TOKENS, Store, TOKEN_FAMILIES};

use crate::helpers::{self, TEST_NOW_MS};

fn key_of(dir: &Path) -> MasterKey {
    MasterKey::load(&dir.join("gatehouse.redb.key")).unwrap()
}

/// Every device has its family and refresh token, every family and refresh token its
/// device, and every row of every table decodes.
fn assert_consistent(store: &Store) -> usize {
    let devices = store.read(|tx| tx.all(&DEVICES)).unwrap();
    let families = store.read(|tx| tx.all(&TOKEN_FAMILIES)).unwrap();
    let refresh = store.read(|tx| tx.all(&REFRESH_TOKENS)).unwrap();
    for (id, _) in &devices {
        assert!(
            families.iter().any(|(_, f)| &f.device_id == id),
            "device {id} has no token family"
        );
        assert!(
            refresh.iter().any(|(_, r)| &r.device_id == id),
            "device {id} has no refresh token"
        );
    }
    for (id, family) in &families {
        assert!(
            devices.iter().any(|(d, _)| *d == family.device_id),
            "family {id} names a missing device"
        );
    }
    for (_, token) in &refresh {
        assert!(families.iter().any(|(f, _)| *f == token.family_id));
    }
    devices.len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_taken_under_a_write_load_restores_to_a_consistent_state() {
    let app = helpers::spawn_app_with(&[("GATEHOUSE_RATELIMIT_PAIRING", "off")]).await;
    for _ in 0..5 {
        app.pair_device().await;
    }
    // Pairings (device, family and refresh token in one write each) go on throughout.
    let stop = Arc::new(AtomicBool::new(false));
    let mut load = tokio::task::JoinSet::new();
    for _ in 0..4 {
        let services = app.running.services.clone();
        let stop = stop.clone();
        load.spawn(async move {
            let mut paired = 0u32;
            while !stop.load(Ordering::Relaxed) {
                let session = services
                    .pairing
                    .create(None, None, None, &Origin::operator())
                    .await
                    .unwrap();
                let device = serde_json::from_value(serde_json::json!({
                    "name": "load", "platform": "ios", "app_version": "1"
                }))
                .unwrap();
                let origin = Origin::request([127, 0, 0, 1].into(), None);
                services
                    .pairing
                    .pair(
                        &session.session_id.to_string(),
                        &session.secret,
                        &device,
                        None,
                        &origin,
                    )
                    .await
                    .unwrap();
                paired += 1;
            }
            paired
        });
    }
    tokio::time::sleep(std::time::Duration::from_millis(150)).await;
    let dest = app.data_path().with_file_name("backup.redb");
    let report = app
        .running
        .services
        .backups
        .create(&dest, &Origin::operator(), Box::new(|_, _| {}))
        .await
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    stop.store(true, Ordering::Relaxed);
    let paired: u32 = load.join_all().await.into_iter().sum();
    assert!(paired > 0, "the load ran");
    assert!(report.rows > 0);
    let live_devices = app
        .running
        .services
        .store
        .read(|tx| tx.all(&DEVICES))
        .unwrap()
        .len();
    let key = key_of(app.data_path().parent().unwrap());
    let _source_dir = app.stop().await;

    // Restored onto a new host (no data file there yet) with the same key.
    let target = tempfile::tempdir().unwrap();
    let data = target.path().join("gatehouse.redb");
    let clock = FixedClock::new(TEST_NOW_MS);
    let restored = backup::restore(&data, &key, &dest, None, &clock, &mut |_, _| {}).unwrap();
    assert_eq!(restored.replaced_kept_at, None);
    let (store, _) = Store::open(&data, &key, &clock).unwrap();
    let devices = assert_consistent(&store);
    assert!(devices >= 5, "the devices before the backup are there");
    assert!(
        devices < live_devices,
        "the snapshot predates later pairings ({devices} of {live_devices})"
    );
    let counts = store.read(|tx| tx.table_counts()).unwrap();
    assert_eq!(counts.len(), gatehouse::store::ALL_TABLES.len());
    store.close();
    drop(store);

    // A server on the restored file: the chain verifies and the restore is recorded.
    std::fs::copy(
        target.path().join("gatehouse.redb"),
        target.path().join("copy.redb"),
    )
    .unwrap();
    std::fs::write(target.path().join("gatehouse.redb.key"), key.to_text()).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(
        target.path().join("gatehouse.redb.key"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    let app = helpers::spawn_app_in(target, &[]).await;
    let services = &app.running.services;
    let report = services.audit.verify_report(&mut |_, _| {}).unwrap();
    assert!(report.ok, "{report:?}");
    let restored_events = services
        .audit
        .query(&gatehouse::audit::Query {
            kind: Some("backup.restored".into()),
            limit: 10,
            ..Default::default()
        })
        .unwrap();
    assert_eq!(restored_events.events.len(), 1);
    app.stop().await;
}

fn sha256_hex(path: &Path) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, &std::fs::read(path).unwrap());
    data_encoding::HEXLOWER.encode(digest.as_ref())
}

/// The SHA-256 of the data file, and the names in its directory.
fn snapshot(dir: &Path) -> (String, Vec<String>) {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    (sha256_hex(&dir.join("gatehouse.redb")), names)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_refuses_a_foreign_key_a_truncated_backup_and_a_held_file_changing_nothing() {
    // A backup of one instance, sealed under its key.
    let source = helpers::spawn_app().await;
    source.pair_device().await;
    let backups = tempfile::tempdir().unwrap();
    let good = backups.path().join("good.redb");
    source
        .running
        .services
        .backups
        .create(&good, &Origin::operator(), Box::new(|_, _| {}))
        .await
        .unwrap();
    let source_key = key_of(source.data_path().parent().unwrap());
    source.stop().await;
    let truncated = backups.path().join("truncated.redb");
    let bytes = std::fs::read(&good).unwrap();
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let garbage = backups.path().join("garbage.redb");
    std::fs::write(&garbage, b"not a data file at all").unwrap();

    // Another instance, with its own key, stopped.
    let target = helpers::spawn_app().await;
    let dir = target.stop().await;
    let data = dir.path().join("gatehouse.redb");
    let key = key_of(dir.path());
    let clock = FixedClock::new(TEST_NOW_MS);
    let before = snapshot(dir.path());

    let refused = [
        (good.as_path(), None, "sealed under another key"),
        (truncated.as_path(), Some(&source_key), "truncated"),
        (garbage.as_path(), Some(&source_key), "not a data file"),
    ];
    for (file, backup_key, why) in refused {
        let err =
            backup::restore(&data, &key, file, backup_key, &clock, &mut |_, _| {}).expect_err(why);
        assert!(matches!(err, BackupError::BadBackup { .. }), "{why}: {err}");
        assert!(
            err.to_string().contains("nothing was changed"),
            "{why}: {err}"
        );
        assert_eq!(
            snapshot(dir.path()),
            before,
            "{why}: the directory is untouched"
        );
    }

    // While a process holds the data file, nothing happens either (the holder itself may
    // write to it, so only the directory is compared).
    {
        let (held, _) = Store::open(&data, &key, &clock).unwrap();
        let err = backup::restore(
            &data,
            &key,
            &good,
            Some(&source_key),
            &clock,
            &mut |_, _| {},
        )
        .expect_err("held");
        assert!(matches!(err, BackupError::InUse(_)), "{err}");
        assert_eq!(snapshot(dir.path()).1, before.1);
        held.close();
    }
    let before = snapshot(dir.path());
    assert_eq!(snapshot(dir.path()).0, before.0);

    // With the backup's key it is restored, re-sealed under the current key.
    let report = backup::restore(
        &data,
        &key,
        &good,
        Some(&source_key),
        &clock,
        &mut |_, _| {},
    )
    .unwrap();
    assert!(report.resealed);
    let kept = report.replaced_kept_at.expect("the old file is kept");
    assert_eq!(sha256_hex(&kept), before.0);
    let (store, _) = Store::open(&data, &key, &clock).unwrap();
    assert_eq!(store.read(|tx| tx.all(&DEVICES)).unwrap().len(), 1);
    store.close();
    assert!(!dir.path().join("gatehouse.redb.restoring").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_downloaded_backup_opens_with_the_servers_key_and_leaves_nothing_behind() {
    let app = helpers::spawn_app().await;
    app.pair_device().await;
    let response = app
        .client()
        .post(app.url("/v1/backup"))
        .bearer_auth(app.admin_token())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["content-type"],
        "application/octet-stream"
    );
    let bytes = response.bytes().await.unwrap();
    let unauthorized = app
        .client()
        .post(app.url("/v1/backup"))
        .send()
        .await
        .unwrap();
    assert_eq!(unauthorized.status(), 401);
    let backups = app.data_path().with_file_name("backups");
    assert_eq!(
        std::fs::read_dir(&backups).unwrap().count(),
        0,
        "the streamed file is gone from the backup directory"
    );
    let key = key_of(app.data_path().parent().unwrap());
    let downloaded = app.data_path().with_file_name("downloaded.redb");
    std::fs::write(&downloaded, &bytes).unwrap();
    let info = backup::check(&downloaded, &key).unwrap();
    assert!(
        info.counts.contains(&("devices.v1".to_string(), 1)),
        "{info:?}"
    );
    let created = app
        .running
        .services
        .audit
        .query(&gatehouse::audit::Query {
            kind: Some("backup.created".into()),
            limit: 10,
            ..Default::default()
        })
        .unwrap();
    assert_eq!(created.events.len(), 1);
    assert!(created.events[0].actor.starts_with("admin:"));
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_and_restore_through_the_cli() {
    use crate::binary::{Server, gatehouse, run, run_ok, serve_cmd};
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("gatehouse.redb");
    let backup_file = dir.path().join("nightly.redb");
    // Online: the running server writes the backup.
    let server = Server::start_ok(serve_cmd(&data));
    let mut cmd = gatehouse(&data);
    cmd.arg("backup").arg(&backup_file);
    let done = run_ok(cmd);
    assert!(done.stdout.contains("nightly.redb"), "{}", done.stdout);
    // A restore is refused while the server runs, and changes nothing.
    let mut cmd = gatehouse(&data);
    cmd.arg("restore").arg(&backup_file);
    let refused = run(cmd);
    assert!(!refused.status.success());
    assert!(
        refused.stderr.contains("stop the service"),
        "{}",
        refused.stderr
    );
    server.stop_ok();
    // Stopped: restored, the old file kept, and a second backup refuses to overwrite.
    let mut cmd = gatehouse(&data);
    cmd.arg("restore").arg(&backup_file);
    let done = run_ok(cmd);
    assert!(done.stdout.contains("kept at"), "{}", done.stdout);
    let mut cmd = gatehouse(&data);
    cmd.arg("backup").arg(&backup_file);
    let again = run(cmd);
    assert!(
        !again.status.success(),
        "an existing backup is never overwritten"
    );
    let mut cmd = gatehouse(&data);
    cmd.args(["audit", "search", "--type", "backup.*", "--json"]);
    let events = run_ok(cmd).stdout;
    // The restored log is the snapshot's (taken before `backup.created` was written),
    // then the restore's own record.
    assert!(events.contains("backup.restored"), "{events}");
    assert!(!events.contains("backup.created"), "{events}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_restore_a_token_whose_family_is_not_in_the_file_is_inactive() {
    let listen = format!("127.0.0.1:{}", helpers::free_port());
    let env = [("GATEHOUSE_LISTEN", listen.as_str())];
    let app = helpers::spawn_app_with(&env).await;
    let kept = app.pair_device().await;
    let backups = tempfile::tempdir().unwrap();
    let file = backups.path().join("before.redb");
    app.running
        .services
        .backups
        .create(&file, &Origin::operator(), Box::new(|_, _| {}))
        .await
        .unwrap();
    // Paired after the backup: the restored file knows neither its device nor its family.
    let lost = app.pair_device().await;
    assert_eq!(app.introspect(&lost.access_token).await["active"], true);
    let dir = app.stop().await;
    let data = dir.path().join("gatehouse.redb");
    let clock = FixedClock::new(TEST_NOW_MS);
    backup::restore(
        &data,
        &key_of(dir.path()),
        &file,
        None,
        &clock,
        &mut |_, _| {},
    )
    .unwrap();

    let app = helpers::spawn_app_in(dir, &env).await;
    let admin = app.create_admin_token().await;
    assert_eq!(
        app.introspect_as(&admin, &lost.access_token).await,
        serde_json::json!({"active": false}),
        "a family missing from the restored file makes its access tokens inactive"
    );
    assert_eq!(
        app.introspect_as(&admin, &kept.access_token).await["active"],
        true
    );
    let refreshed = app
        .client()
        .post(app.url("/v1/token"))
        .form(&[
            ("grant_type", "refresh_token"),
            ("refresh_token", lost.refresh_token.as_str()),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(refreshed.status(), 400, "its refresh token is unknown too");
    // A device paired after the restore is known at once.
    let fresh = app.pair_device_as(&admin).await;
    assert_eq!(
        app.introspect_as(&admin, &fresh.access_token).await["active"],
        true
    );
    app.stop().await;
}

/// A download is whole even when the request carried a body the server never reads (an
/// HTTP/1.1 client that writes it all first), and one cancelled halfway leaves no file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_download_is_whole_despite_an_unread_body_and_a_cancelled_one_leaves_nothing() {
    let app = helpers::spawn_app_with(&[("GATEHOUSE_RATELIMIT_PAIRING", "off")]).await;
    let admin = app.admin_token();
    // A backup of a few hundred KiB, as in the field.
    for _ in 0..400 {
        app.open_pairing_session().await;
    }
    let http1 = {
        let cert = app.running.tls.as_ref().unwrap().cert_der().clone();
        reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_der(&cert).unwrap())
            .http1_only()
            .build()
            .unwrap()
    };
    let unread = vec![b'x'; 60 * 1024];
    for round in 0..16 {
        let response = http1
            .post(app.url("/v1/backup"))
            .bearer_auth(&admin)
            .body(unread.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let announced: usize = response.headers()["content-length"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        let body = response.bytes().await.expect("the whole body arrives");
        assert_eq!(body.len(), announced, "round {round}");
        assert!(
            announced > 64 * 1024,
            "a backup bigger than the unread body"
        );
    }

    // Read the head and a few bytes, then hang up.
    let mut response = app
        .client()
        .post(app.url("/v1/backup"))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let _ = response.chunk().await.unwrap();
    drop(response);
    let backups = app.data_path().with_file_name("backups");
    let mut left = Vec::new();
    for _ in 0..50 {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        left = std::fs::read_dir(&backups)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        if left.is_empty() {
            break;
        }
    }
    assert!(left.is_empty(), "left behind: {left:?}");
    app.stop().await;
}
