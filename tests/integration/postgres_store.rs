//! gatehouse on PostgreSQL (`storage.url`): a node serves from a real database, keeps
//! what it acknowledged across restarts and crashes of the database, seals its secrets
//! there too, and moves between the data file and the database with `storage copy` and
//! `backup`. The database is a real PostgreSQL 15 (`postgres.rs`).

use std::path::Path;
use std::process::Output;

use crate::binary::gatehouse;
use crate::helpers::{spawn_app_in, spawn_app_with};
use crate::postgres::Postgres;

/// The settings that put a test server on `pg`'s database `url`.
fn storage_env(pg: &Postgres, url: &str) -> Vec<(&'static str, String)> {
    vec![
        ("GATEHOUSE_STORAGE", url.to_string()),
        (
            "GATEHOUSE_STORAGE_PASSWORD_FILE",
            pg.password_file().display().to_string(),
        ),
    ]
}

fn as_refs<'a>(env: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    env.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

/// Every key and value gatehouse stored in the database, as text: values in
/// PostgreSQL's `encoding` (`escape` shows text as it is, `hex` every byte).
fn dump(pg: &Postgres, db: &str, encoding: &str) -> String {
    let tables = pg.psql(
        db,
        "SELECT table_name FROM information_schema.tables WHERE table_schema = 'gatehouse' \
         ORDER BY 1",
    );
    let mut out = String::new();
    for table in tables.lines() {
        if table == "changes" {
            // The change feed: table names and keys, no values.
            out.push_str(&pg.psql(db, "SELECT tbl || ' ' || key FROM gatehouse.changes"));
            out.push('\n');
            continue;
        }
        let key = if table == "audit_events_v1" {
            "seq::text"
        } else {
            "key"
        };
        out.push_str(&pg.psql(
            db,
            &format!("SELECT {key} || ' ' || encode(value, '{encoding}') FROM gatehouse.{table}"),
        ));
        out.push('\n');
    }
    out
}

fn run(cmd: &mut std::process::Command) -> Output {
    cmd.output().expect("the gatehouse binary runs")
}

fn text(output: &Output) -> String {
    format!(
        "status {:?}\nstdout: {}\nstderr: {}",
        output.status.code(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

async fn refresh(app: &crate::helpers::TestApp, token: &str) -> reqwest::Response {
    app.refresh(token).await
}

#[tokio::test]
async fn a_node_on_postgres_keeps_what_it_acknowledged_across_restarts_and_a_database_crash() {
    let Some(pg) = Postgres::start("a_node_on_postgres_keeps_what_it_acknowledged") else {
        return;
    };
    let env = storage_env(&pg, &pg.url());
    let app = spawn_app_with(&as_refs(&env)).await;
    assert!(
        !app.data_path().exists(),
        "a node on PostgreSQL makes no data file"
    );
    let ready: serde_json::Value = app
        .client()
        .get(app.url("/readyz"))
        .send()
        .await
        .expect("readyz")
        .json()
        .await
        .expect("json");
    assert_eq!(ready["status"], "ready");

    let device = app.pair_device().await;
    let refreshed = refresh(&app, &device.refresh_token).await;
    assert_eq!(refreshed.status(), 200);
    let pair: serde_json::Value = refreshed.json().await.expect("json");
    let access = pair["access_token"]
        .as_str()
        .expect("access token")
        .to_string();
    let refresh_token = pair["refresh_token"].as_str().expect("refresh").to_string();
    let revoked = app
        .client()
        .post(app.url("/v1/revoke"))
        .bearer_auth(app.admin_token())
        .form(&[("token", access.as_str())])
        .send()
        .await
        .expect("revoke");
    assert_eq!(revoked.status(), 200);
    let admin = app.create_admin_token().await;

    // The rows are in the database, under gatehouse's schema.
    let devices = pg.psql("gatehouse", "SELECT count(*) FROM gatehouse.devices_v1");
    assert_eq!(devices, "1");

    // The database crashes (SIGKILL) and comes back; the node then restarts on it.
    pg.kill();
    pg.restart();
    let dir = app.stop().await;
    let app = spawn_app_in(dir, &as_refs(&env)).await;
    let answer = app.introspect_as(&admin, &access).await;
    assert_eq!(answer["active"], false, "the revocation survived: {answer}");
    let again = refresh(&app, &refresh_token).await;
    assert_eq!(again.status(), 200, "the refreshed family is still live");
    let spent = refresh(&app, &device.refresh_token).await;
    assert_eq!(spent.status(), 400, "the spent refresh token stays spent");
    let listed = app
        .client()
        .get(app.url("/v1/devices"))
        .bearer_auth(&admin)
        .send()
        .await
        .expect("devices");
    let listed: serde_json::Value = listed.json().await.expect("json");
    assert_eq!(listed["devices"].as_array().map(Vec::len), Some(1));
    let verified = app.running.services.audit.verify(&mut |_, _| {});
    let verified = verified.expect("audit verify");
    assert!(verified.broken.is_none(), "{verified:?}");
    assert!(verified.records > 5, "{verified:?}");
    app.stop().await;
}

#[tokio::test]
async fn a_database_dump_reveals_no_secret() {
    let Some(pg) = Postgres::start("a_database_dump_reveals_no_secret") else {
        return;
    };
    let env = storage_env(&pg, &pg.url());
    let app = spawn_app_with(&as_refs(&env)).await;
    let device = app.pair_device().await;
    let bootstrap = app.admin_token();
    let tls_key = app
        .running
        .services
        .store
        .read(|tx| tx.self_signed_cert())
        .expect("read")
        .expect("a self-signed certificate")
        .key_der;
    let tls_key_hex: String = tls_key.iter().map(|b| format!("{b:02x}")).collect();
    let hex = dump(&pg, "gatehouse", "hex");
    assert!(
        !hex.contains(&tls_key_hex[tls_key_hex.len() - 64..]),
        "the dump shows the TLS private key"
    );
    let dump = dump(&pg, "gatehouse", "escape");
    assert!(
        dump.contains("signing-key/"),
        "the dump has the secrets table"
    );
    for (what, secret) in [
        ("refresh token", device.refresh_token.as_str()),
        ("bootstrap admin token", bootstrap.as_str()),
    ] {
        assert!(!dump.contains(secret), "the dump shows the {what}");
    }
    assert!(
        !dump.contains("PRIVATE KEY"),
        "no PEM private key in the dump"
    );
    app.stop().await;
}

// Multi-threaded: the test runs the binary, which talks to the in-process server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_copy_moves_a_data_file_into_postgres_and_backup_brings_it_back() {
    let Some(pg) = Postgres::start("storage_copy_moves_a_data_file_into_postgres") else {
        return;
    };
    // A node on a data file pairs a device, then stops.
    let app = spawn_app_with(&[]).await;
    let device = app.pair_device().await;
    let admin = app.create_admin_token().await;
    let data = app.data_path().to_path_buf();
    let key = app.config.master_key.path.clone();
    let dir = app.stop().await;
    let password = pg.password_file();
    let copy = |from: Option<&Path>, url: &str| {
        let mut cmd = gatehouse(&data);
        cmd.env("GATEHOUSE_STORAGE_PASSWORD_FILE", &password)
            .args(["storage", "copy", "--to", url]);
        if let Some(from) = from {
            cmd.arg("--from").arg(from);
        }
        run(&mut cmd)
    };

    // Refused before anything is written: a password in the URL, a wrong scheme.
    let with_password = pg.url().replace("gatehouse@", "gatehouse:hunter2@");
    let refused = copy(None, &with_password);
    assert_eq!(refused.status.code(), Some(1), "{}", text(&refused));
    assert!(!text(&refused).contains("hunter2"), "{}", text(&refused));
    assert!(text(&refused).contains("password"), "{}", text(&refused));
    let refused = copy(None, "mysql://gatehouse@127.0.0.1/gatehouse");
    assert_ne!(refused.status.code(), Some(0), "{}", text(&refused));
    assert_eq!(
        pg.psql(
            "gatehouse",
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'gatehouse'"
        ),
        "0",
        "a refused copy created nothing"
    );

    let copied = copy(None, &pg.url());
    assert!(copied.status.success(), "{}", text(&copied));
    assert!(text(&copied).contains("rows"), "{}", text(&copied));
    // A second copy into the same database is refused: it holds data now.
    let again = copy(None, &pg.url());
    assert_eq!(again.status.code(), Some(1), "{}", text(&again));
    assert!(
        text(&again).contains("already holds gatehouse data"),
        "{}",
        text(&again)
    );

    // A node on the database serves what the file held.
    let env = storage_env(&pg, &pg.url());
    let app = spawn_app_in(dir, &as_refs(&env)).await;
    assert_eq!(
        app.introspect_as(&admin, &device.access_token).await["active"],
        true
    );
    // `gatehouse backup` against the PostgreSQL node (through its admin socket) writes
    // one data file...
    let backup = app.dir.path().join("from-postgres.redb");
    let made = run(gatehouse(&data)
        .env("GATEHOUSE_STORAGE", pg.url())
        .env("GATEHOUSE_STORAGE_PASSWORD_FILE", &password)
        .arg("backup")
        .arg(&backup));
    assert!(made.status.success(), "{}", text(&made));
    let refreshed = refresh(&app, &device.refresh_token).await;
    assert_eq!(refreshed.status(), 200);
    let _kept = app.stop().await;

    // ...that a single node serves as it is (same master key)...
    let single = tempfile::tempdir().expect("dir");
    std::fs::copy(&backup, single.path().join("gatehouse.redb")).expect("copy backup");
    std::fs::copy(&key, single.path().join("gatehouse.redb.key")).expect("copy key");
    let node = spawn_app_in(single, &[]).await;
    // The backup holds the family as it was before the refresh above.
    let refreshed = refresh(&node, &device.refresh_token).await;
    assert_eq!(refreshed.status(), 200, "the backup's refresh token works");
    node.stop().await;

    // ...and that `storage copy --from` restores into another, empty database.
    let restored_url = pg.create_database("restored");
    let restored = copy(Some(&backup), &restored_url);
    assert!(restored.status.success(), "{}", text(&restored));
    assert_eq!(
        pg.psql(
            "restored",
            "SELECT count(*) FROM gatehouse.devices_v1 UNION ALL \
             SELECT count(*) FROM gatehouse.audit_events_v1 WHERE seq > 0",
        )
        .lines()
        .next(),
        Some("1")
    );
    let dump_restored = dump(&pg, "restored", "escape");
    assert!(!dump_restored.contains(&device.refresh_token));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_loses_its_database_refuses_writes_with_503_and_recovers_by_itself() {
    let Some(pg) = Postgres::start("a_node_that_loses_its_database") else {
        return;
    };
    let env = storage_env(&pg, &pg.url());
    let app = spawn_app_with(&as_refs(&env)).await;
    let device = app.pair_device().await;
    let admin = app.create_admin_token().await;
    let readyz = || async {
        let response = app
            .client()
            .get(app.url("/readyz"))
            .send()
            .await
            .expect("readyz");
        let status = response.status().as_u16();
        (status, response.text().await.expect("body"))
    };

    pg.stop();
    let (status, body) = readyz().await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("the database cannot be reached"), "{body}");
    // A write is refused with a clear 503, never acknowledged.
    let refused = refresh(&app, &device.refresh_token).await;
    assert_eq!(refused.status(), 503);
    let body: serde_json::Value = refused.json().await.expect("json");
    assert_eq!(body["error"], "unavailable", "{body}");
    assert!(
        !body.to_string().contains("127.0.0.1"),
        "the database's address is not shown to callers: {body}"
    );
    // What can be verified offline still is: the device's access token, against the
    // key ring and the revocation mirror in memory (forward authentication)...
    let verified = app
        .client()
        .get(app.url("/v1/authz"))
        .bearer_auth(&device.access_token)
        .send()
        .await
        .expect("authz");
    assert_eq!(verified.status(), 200);
    // ...while a check that needs the database (an admin token's) says so with a 503,
    // and counts no failed login against the caller.
    let introspected = app
        .client()
        .post(app.url("/v1/introspect"))
        .bearer_auth(&admin)
        .form(&[("token", device.access_token.as_str())])
        .send()
        .await
        .expect("introspect");
    assert_eq!(introspected.status(), 503);

    // The database comes back; the node reconnects by itself.
    pg.restart();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let (status, body) = readyz().await;
        if status == 200 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not ready again: {body}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    // The refused refresh changed nothing: the same token refreshes now.
    let refreshed = refresh(&app, &device.refresh_token).await;
    assert_eq!(refreshed.status(), 200);
    let answer = app.introspect_as(&admin, &device.access_token).await;
    assert_eq!(answer["active"], true, "{answer}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_reaches_its_database_over_tls_and_refuses_a_certificate_it_does_not_trust() {
    let Some(pg) = Postgres::start("a_node_reaches_its_database_over_tls") else {
        return;
    };
    let ca = pg.enable_tls();
    let url = format!("{}?sslmode=require", pg.url());
    let mut env = storage_env(&pg, &url);
    env.push(("GATEHOUSE_STORAGE_CA_FILE", ca.display().to_string()));
    let app = spawn_app_in(tempfile::tempdir().expect("dir"), &as_refs(&env)).await;
    app.pair_device().await;
    // Every connection of the node's is encrypted: the writer's, the readers', the
    // change follower's.
    let plain = pg.psql(
        "postgres",
        "SELECT count(*) FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) \
         WHERE a.application_name LIKE 'gatehouse %' AND NOT s.ssl",
    );
    let encrypted = pg.psql(
        "postgres",
        "SELECT count(*) FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) \
         WHERE a.application_name LIKE 'gatehouse %' AND s.ssl",
    );
    assert_eq!(plain, "0");
    assert!(
        encrypted.parse::<u32>().expect("a count") >= 2,
        "{encrypted}"
    );
    let key = app.config.master_key.path.clone();
    let dir = app.stop().await;

    // Without the CA file the server's certificate is checked against Mozilla's roots,
    // which did not sign it: the node does not start, and says why.
    let check = |extra: &[(&str, String)]| {
        let mut cmd = gatehouse(&dir.path().join("gatehouse.redb"));
        cmd.env("GATEHOUSE_STORAGE", &url)
            .env("GATEHOUSE_STORAGE_PASSWORD_FILE", pg.password_file())
            .env("GATEHOUSE_MASTER_KEY_FILE", &key)
            .args(["audit", "verify"]);
        for (name, value) in extra {
            cmd.env(name, value);
        }
        run(&mut cmd)
    };
    let refused = check(&[]);
    assert!(!refused.status.success(), "{}", text(&refused));
    assert!(text(&refused).contains("certificate"), "{}", text(&refused));
    // A CA file that is not one is named.
    let bogus = dir.path().join("bogus.pem");
    std::fs::write(&bogus, "not a certificate").expect("write");
    let refused = check(&[("GATEHOUSE_STORAGE_CA_FILE", bogus.display().to_string())]);
    assert!(!refused.status.success(), "{}", text(&refused));
    assert!(
        text(&refused).contains("storage.ca_file"),
        "{}",
        text(&refused)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_looks_at_the_database_a_node_uses() {
    let Some(pg) = Postgres::start("doctor_looks_at_the_database") else {
        return;
    };
    let ca = pg.enable_tls();
    let url = format!("{}?sslmode=require", pg.url());
    let mut env = storage_env(&pg, &url);
    env.push(("GATEHOUSE_STORAGE_CA_FILE", ca.display().to_string()));
    let doctor = |data: &Path| {
        let mut cmd = gatehouse(data);
        for (name, value) in &env {
            cmd.env(name, value);
        }
        cmd.arg("doctor");
        run(&mut cmd)
    };
    let has = |out: &str, prefix: &str, text: &str| {
        out.lines()
            .any(|l| l.starts_with(prefix) && l.contains(text))
    };
    // Before any node: reachable over TLS, empty.
    let empty = tempfile::tempdir().expect("dir");
    let done = doctor(&empty.path().join("gatehouse.redb"));
    let out = String::from_utf8_lossy(&done.stdout).to_string();
    assert!(has(&out, "ok    database", "(PostgreSQL 15"), "{out}");
    assert!(has(&out, "ok    database", "TLS)"), "{out}");
    assert!(
        has(&out, "warn  database", "no gatehouse tables yet"),
        "{out}"
    );
    assert!(!out.contains("data file"), "{out}");
    // Neither doctor nor any other command sets the empty database up, or makes a key.
    let key = empty.path().join("gatehouse.redb.key");
    let verify = || {
        let mut cmd = gatehouse(&empty.path().join("gatehouse.redb"));
        for (name, value) in &env {
            cmd.env(name, value);
        }
        run(cmd.args(["audit", "verify"]))
    };
    let refused = verify();
    assert!(!refused.status.success(), "{}", text(&refused));
    assert!(!key.exists(), "a command made a master key");
    gatehouse::store::seal::MasterKey::create_file(&key).expect("a key");
    let refused = verify();
    assert!(!refused.status.success(), "{}", text(&refused));
    assert!(
        text(&refused).contains("holds no gatehouse data yet"),
        "{}",
        text(&refused)
    );
    assert_eq!(
        pg.psql(
            "gatehouse",
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'gatehouse'"
        ),
        "0",
        "nothing was set up"
    );

    // With a node running: it is counted, and it leads.
    let app = spawn_app_in(tempfile::tempdir().expect("dir"), &as_refs(&env)).await;
    let data = app.data_path().to_path_buf();
    // Its follower takes the leader lock a moment after the start.
    let started = std::time::Instant::now();
    while !app.running.services.store.is_leader() {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(10),
            "the only node never took the leader lock"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    // The node answers on its admin socket from this runtime's other worker.
    let done = tokio::task::block_in_place(|| doctor(&data));
    let out = String::from_utf8_lossy(&done.stdout).to_string();
    assert!(
        has(
            &out,
            "ok    nodes",
            "1 gatehouse process(es) connected; one leads"
        ),
        "{out}"
    );
    app.stop().await;

    // A database it cannot reach is a failure that names it.
    pg.stop();
    let done = doctor(&empty.path().join("gatehouse.redb"));
    let out = String::from_utf8_lossy(&done.stdout).to_string();
    assert!(!done.status.success(), "{out}");
    assert!(has(&out, "FAIL  database", "cannot be reached"), "{out}");
}

#[tokio::test]
async fn a_database_at_format_8_is_brought_up_to_date_at_start() {
    let Some(pg) = Postgres::start("a_database_at_format_8_is_brought_up_to_date") else {
        return;
    };
    let env = storage_env(&pg, &pg.url());
    let app = spawn_app_with(&as_refs(&env)).await;
    let device = app.pair_device().await;
    let admin = app.create_admin_token().await;
    let dir = app.stop().await;
    // What a format-8 build left: no device grant tables, and its version.
    pg.psql(
        "gatehouse",
        "DROP TABLE gatehouse.device_grants_v1, gatehouse.device_grant_codes_v1; \
         UPDATE gatehouse.meta SET value = '\\x08000000'::bytea WHERE key = 'format_version'",
    );

    let app = spawn_app_in(dir, &as_refs(&env)).await;
    assert_eq!(
        pg.psql(
            "gatehouse",
            "SELECT encode(value, 'hex') FROM gatehouse.meta WHERE key = 'format_version'"
        ),
        format!("{:08x}", gatehouse::store::FORMAT_VERSION.swap_bytes()),
        "the current format is recorded"
    );
    let migrated = app.audit_events("store.migrated");
    assert_eq!(migrated.len(), 1, "{migrated:?}");
    assert_eq!(migrated[0].details["from"], 8);
    assert_eq!(migrated[0].details["to"], gatehouse::store::FORMAT_VERSION);
    // What it held works, and so does what the new tables are for.
    assert_eq!(
        app.introspect_as(&admin, &device.access_token).await["active"],
        true
    );
    let asked = app
        .client()
        .post(app.url("/v1/device_authorization"))
        .form(&[("client_id", "upgraded")])
        .send()
        .await
        .expect("ask");
    assert_eq!(asked.status(), 200);
    app.stop().await;
}
