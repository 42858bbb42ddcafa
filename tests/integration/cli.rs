//! The management commands of the real binary, both ways they run: offline (no server;
//! the CLI opens the data file itself) and online (a `gatehouse serve` holds the file's
//! lock, so a command that succeeds went through the admin socket). Results are checked
//! through the library as well: tokens verify, revoked ones do not, a rekeyed file opens
//! with the new key only.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use gatehouse::admin_tokens::{AdminTokenInfo, AdminTokens};
use gatehouse::clock::{Clock, SharedClock, SystemClock};
use gatehouse::store::Store;
use gatehouse::store::seal::MasterKey;

use crate::binary::{
    Finished, Server, assert_key_refused, gatehouse, healthz_via_pin, key_path, pinned_client, run,
    run_ok, serve_cmd, socket_path, stored_cert,
};
use crate::helpers;

fn cli(data: &Path, args: &[&str]) -> Command {
    let mut cmd = gatehouse(data);
    cmd.args(args);
    cmd
}

/// `admin-token create --name NAME`: stdout must be exactly the token and a newline.
fn create_token(data: &Path, name: &str) -> String {
    let done = run_ok(cli(data, &["admin-token", "create", "--name", name]));
    let token = done
        .stdout
        .strip_suffix('\n')
        .unwrap_or_else(|| panic!("stdout does not end with a newline: {:?}", done.stdout));
    assert!(
        !token.contains('\n'),
        "stdout is not one line: {:?}",
        done.stdout
    );
    assert!(
        token.starts_with("gha_") && token.len() == 64,
        "not a token: {token:?}"
    );
    token.to_string()
}

/// The id part of a token (`gha_<id>_<secret>`).
fn token_id(token: &str) -> &str {
    &token[4..20]
}

fn list_tokens(data: &Path) -> Vec<AdminTokenInfo> {
    let done = run_ok(cli(data, &["admin-token", "list", "--json"]));
    serde_json::from_str(&done.stdout)
        .unwrap_or_else(|e| panic!("list --json is not a token list ({e}): {}", done.stdout))
}

fn find<'a>(tokens: &'a [AdminTokenInfo], id: &str) -> &'a AdminTokenInfo {
    tokens
        .iter()
        .find(|t| t.id == id)
        .unwrap_or_else(|| panic!("token {id} not listed: {tokens:?}"))
}

fn assert_failed(done: &Finished, needle: &str) {
    assert!(!done.status.success(), "must fail: {done:?}");
    assert!(
        done.stderr.contains(needle),
        "stderr lacks {needle:?}: {}",
        done.stderr
    );
}

/// Opens the closed data file with its default key and checks each presented token.
fn verify_tokens(data: &Path, presented: &[&str]) -> Vec<bool> {
    let key = MasterKey::load(&key_path(data)).unwrap();
    let clock: SharedClock = Arc::new(SystemClock);
    let (store, _) = Store::open(data, &key, clock.as_ref()).unwrap();
    let tokens = AdminTokens::new(store.clone(), clock);
    let verdicts = presented.iter().map(|t| tokens.verify(t).is_ok()).collect();
    store.close();
    verdicts
}

/// The create / list / revoke round on `data`, offline or online. Returns the kept token
/// and the revoked one.
fn token_round(data: &Path, bootstrap_id: &str) -> (String, String) {
    let ops = create_token(data, "ops");
    let temp = create_token(data, "ci runner");
    assert_ne!(ops, temp);

    let tokens = list_tokens(data);
    assert_eq!(tokens.len(), 3, "{tokens:?}");
    let bootstrap = find(&tokens, bootstrap_id);
    assert_eq!(bootstrap.name, "bootstrap");
    assert_eq!(find(&tokens, token_id(&ops)).name, "ops");
    assert_eq!(find(&tokens, token_id(&temp)).name, "ci runner");
    assert!(tokens.iter().all(|t| t.revoked_at_ms.is_none()));
    // The list never shows a secret.
    let listed = run_ok(cli(data, &["admin-token", "list", "--json"])).stdout;
    assert!(!listed.contains(&ops[21..]) && !listed.contains(&temp[21..]));
    let table = run_ok(cli(data, &["admin-token", "list"])).stdout;
    assert!(
        table.contains(token_id(&ops)) && table.contains("active"),
        "{table}"
    );

    let revoked = run_ok(cli(data, &["admin-token", "revoke", token_id(&temp)]));
    assert!(
        revoked.stdout.contains(token_id(&temp)),
        "{}",
        revoked.stdout
    );
    let tokens = list_tokens(data);
    assert!(find(&tokens, token_id(&temp)).revoked_at_ms.is_some());
    assert!(find(&tokens, token_id(&ops)).revoked_at_ms.is_none());
    assert!(find(&tokens, bootstrap_id).revoked_at_ms.is_none());

    let again = run(cli(data, &["admin-token", "revoke", token_id(&temp)]));
    assert_failed(&again, "already revoked");
    let unknown = run(cli(data, &["admin-token", "revoke", "0123456789abcdef"]));
    assert_failed(&unknown, "no admin token with id 0123456789abcdef");

    let bad = run(cli(data, &["admin-token", "create", "--name", "<x>"]));
    assert_failed(&bad, "bad token name");
    assert!(bad.stdout.is_empty(), "{}", bad.stdout);
    assert_eq!(list_tokens(data).len(), 3, "a refused create left a token");
    (ops, temp)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_admin_tokens_create_list_and_revoke() {
    let app = helpers::spawn_app().await;
    let data = app.data_path().to_path_buf();
    assert_eq!(app.config.master_key.path, key_path(&data));
    let bootstrap = app.running.bootstrap_token.clone().expect("fresh instance");
    let created_at = app.clock.now_ms();
    let dir = app.stop().await;
    // The bootstrap token was made by the in-process server, on its fixed clock.
    let listed = list_tokens(&data);
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(find(&listed, &bootstrap.id).created_at_ms, created_at);
    assert!(!socket_path(&data).exists(), "no server may be listening");

    let (ops, revoked) = token_round(&data, &bootstrap.id);
    assert!(
        !socket_path(&data).exists(),
        "an offline command left a socket"
    );

    assert_eq!(
        verify_tokens(&data, &[&ops, &bootstrap.token, &revoked]),
        [true, true, false],
        "created and bootstrap tokens verify; the revoked one does not"
    );
    drop(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn online_admin_tokens_go_through_the_admin_socket() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("gatehouse.redb");
    let server = Server::start_ok(serve_cmd(&data));
    let bootstrap = server.bootstrap_token.clone().expect("fresh instance");
    assert!(socket_path(&data).exists());

    let (ops, revoked) = token_round(&data, token_id(&bootstrap));
    // The server kept serving throughout.
    healthz_via_pin(&server).await;
    server.stop_ok();

    assert_eq!(
        verify_tokens(&data, &[&ops, &bootstrap, &revoked]),
        [true, true, false],
        "tokens created through the socket verify; the one revoked through it does not"
    );
}

#[test]
fn a_command_without_a_data_file_fails_and_creates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("absent.redb");
    for args in [
        &["admin-token", "list"][..],
        &["admin-token", "list", "--json"][..],
        &["admin-token", "create", "--name", "ops"][..],
        &["admin-token", "revoke", "0123456789abcdef"][..],
    ] {
        let done = run(cli(&data, args));
        assert_failed(&done, "no data file");
        assert!(done.stdout.is_empty(), "{args:?}: {}", done.stdout);
    }
    let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert!(left.is_empty(), "files were created: {left:?}");
}

/// A mistyped `--data` must not leave a fresh, unused key file behind.
#[test]
fn rekey_without_a_data_file_fails_and_creates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("absent.redb");
    let new_file = dir.path().join("new.key");
    let done = run(cli(
        &data,
        &["rekey", "--new-key-file", new_file.to_str().unwrap()],
    ));
    assert_failed(&done, "no data file");
    let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert!(left.is_empty(), "files were created: {left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_rekey_replaces_the_default_key_file() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("gatehouse.redb");
    let server = Server::start_ok(serve_cmd(&data));
    let cert = healthz_via_pin(&server).await;
    server.stop_ok();
    let old_text = std::fs::read_to_string(key_path(&data)).unwrap();
    let old_key = MasterKey::from_text(&old_text).unwrap();

    let new_file = dir.path().join("new.key");
    let new_arg = new_file.to_str().unwrap();
    let done = run_ok(cli(&data, &["rekey", "--new-key-file", new_arg]));
    assert!(done.stdout.contains("re-sealed"), "{}", done.stdout);
    assert!(
        done.stdout.contains(&format!(
            "{} now holds the new key",
            key_path(&data).display()
        )),
        "{}",
        done.stdout
    );
    assert_eq!(
        std::fs::metadata(&new_file).unwrap().mode() & 0o777,
        0o600,
        "a created key file must be private"
    );
    let new_text = std::fs::read_to_string(&new_file).unwrap();
    assert_ne!(new_text, old_text);
    assert_eq!(
        std::fs::read_to_string(key_path(&data)).unwrap(),
        new_text,
        "the default key file does not hold the new key"
    );
    assert_eq!(
        std::fs::metadata(key_path(&data)).unwrap().mode() & 0o777,
        0o600
    );
    assert!(!dir.path().join("gatehouse.redb.key.new").exists());

    // The same key again is refused, and the key file stays.
    let same = run(cli(&data, &["rekey", "--new-key-file", new_arg]));
    assert_failed(&same, "already in use");
    assert_eq!(std::fs::read_to_string(key_path(&data)).unwrap(), new_text);

    let server = Server::start_ok(serve_cmd(&data));
    assert!(server.bootstrap_token.is_none());
    assert_eq!(
        healthz_via_pin(&server).await,
        cert,
        "the certificate changed across rekey"
    );
    server.stop_ok();
    assert_eq!(stored_cert(&data), cert);
    assert_key_refused(&data, &old_key);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn online_rekey_keeps_serving_and_the_next_start_uses_the_new_key() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("gatehouse.redb");
    let server = Server::start_ok(serve_cmd(&data));
    let (client, verifier) = pinned_client(&server);
    let healthz = format!("{}/healthz", server.url);
    assert_eq!(client.get(&healthz).send().await.unwrap().status(), 200);
    let cert = verifier.seen().unwrap();
    let old_key = MasterKey::from_text(&std::fs::read_to_string(key_path(&data)).unwrap()).unwrap();

    let new_file = dir.path().join("new.key");
    let done = run_ok(cli(
        &data,
        &["rekey", "--new-key-file", new_file.to_str().unwrap()],
    ));
    assert!(done.stdout.contains("re-sealed"), "{}", done.stdout);
    assert_eq!(
        std::fs::read_to_string(key_path(&data)).unwrap(),
        std::fs::read_to_string(&new_file).unwrap(),
        "the server did not replace its default key file"
    );
    // Still serving, on the old connection and on new ones; management still works.
    assert_eq!(client.get(&healthz).send().await.unwrap().status(), 200);
    assert_eq!(healthz_via_pin(&server).await, cert);
    let token = create_token(&data, "after rekey");
    let stopped = server.stop_ok();
    assert!(
        !stopped.stderr.contains("ERROR"),
        "errors logged: {}",
        stopped.stderr
    );

    let server = Server::start_ok(serve_cmd(&data));
    assert_eq!(healthz_via_pin(&server).await, cert);
    server.stop_ok();
    assert_key_refused(&data, &old_key);
    assert_eq!(verify_tokens(&data, &[&token]), [true]);
}
