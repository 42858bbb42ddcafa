//! The management commands of the real binary, both ways they run: offline (no server;
//! the CLI opens the data file itself) and online (a `gatehouse serve` holds the file's
//! lock, so a command that succeeds went through the admin socket). Results are checked
//! through the library as well: tokens verify, revoked ones do not, a rekeyed file opens
//! with the new key only.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use gatehouse::admin_tokens::{AdminTokenInfo, AdminTokens};
use gatehouse::clients::ClientInfo;
use gatehouse::clock::{Clock, SharedClock, SystemClock};
use gatehouse::devices::DeviceView;
use gatehouse::keys::{KeyInfo, KeyState};
use gatehouse::store::Store;
use gatehouse::store::seal::MasterKey;

use crate::binary::{
    Api, Finished, Server, assert_key_refused, gatehouse, healthz_via_pin, key_path, pinned_client,
    run, run_ok, serve_cmd, socket_path, stored_cert,
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
    let tokens = AdminTokens::load(store.clone(), clock).expect("admin tokens");
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

// ---------------------------------------------------------------------------------------
// Keys, clients, devices and pairing from the command line

/// The output of a command that must succeed, as JSON of type `T`.
fn json_of<T: serde::de::DeserializeOwned>(data: &Path, args: &[&str]) -> T {
    let done = run_ok(cli(data, args));
    serde_json::from_str(&done.stdout)
        .unwrap_or_else(|e| panic!("{args:?} printed no valid JSON ({e}):\n{}", done.stdout))
}

fn list_keys(data: &Path) -> Vec<KeyInfo> {
    json_of(data, &["keys", "list", "--json"])
}

fn key_in<'a>(keys: &'a [KeyInfo], kid: &str) -> &'a KeyInfo {
    keys.iter()
        .find(|k| k.kid == kid)
        .unwrap_or_else(|| panic!("key {kid} not listed: {keys:?}"))
}

/// The one key in `state`.
fn only_key(keys: &[KeyInfo], state: KeyState) -> &KeyInfo {
    let found: Vec<&KeyInfo> = keys.iter().filter(|k| k.state == state).collect();
    assert_eq!(found.len(), 1, "one {state:?} key expected: {keys:?}");
    found[0]
}

/// The `kid` header of a JWT (read without verifying; the server verifies).
fn kid_of(token: &str) -> String {
    let header = token.split('.').next().unwrap();
    let header: serde_json::Value = serde_json::from_slice(
        &data_encoding::BASE64URL_NOPAD
            .decode(header.as_bytes())
            .unwrap(),
    )
    .unwrap();
    header["kid"].as_str().unwrap().to_string()
}

/// A new instance: one active and one next key, both EdDSA; the table lists them.
fn fresh_key_ring(data: &Path) -> (String, String) {
    let keys = list_keys(data);
    assert_eq!(keys.len(), 2, "{keys:?}");
    assert!(keys.iter().all(|k| k.alg == "EdDSA"), "{keys:?}");
    let active = only_key(&keys, KeyState::Active).kid.clone();
    let next = only_key(&keys, KeyState::Next).kid.clone();
    assert_ne!(active, next);
    let table = run_ok(cli(data, &["keys", "list"])).stdout;
    let mut lines = table.lines();
    let header = lines.next().unwrap_or_default();
    for column in ["KID", "ALG", "STATE", "CREATED", "UNTIL"] {
        assert!(header.contains(column), "{table}");
    }
    for (kid, state) in [(&active, "active"), (&next, "next")] {
        assert!(
            table
                .lines()
                .any(|l| l.starts_with(kid.as_str()) && l.contains(state) && l.contains("EdDSA")),
            "{kid} {state} not in:\n{table}"
        );
    }
    (active, next)
}

/// `keys rotate` right after the next key was created is refused, names `--now`, and
/// changes nothing; `keys rotate --now` promotes it. Returns the new next key.
fn rotate_round(data: &Path, active: &str, next: &str) -> String {
    let before = list_keys(data);
    let refused = run(cli(data, &["keys", "rotate"]));
    assert_failed(&refused, "--now");
    assert_eq!(refused.status.code(), Some(1), "{refused:?}");
    assert!(refused.stdout.is_empty(), "{}", refused.stdout);
    assert_eq!(
        list_keys(data),
        before,
        "a refused rotation changed the ring"
    );

    let rotated = run_ok(cli(data, &["keys", "rotate", "--now"]));
    let lines: Vec<&str> = rotated.stdout.lines().collect();
    assert_eq!(lines.first(), Some(&format!("active: {next}").as_str()));
    assert_eq!(
        lines.get(1),
        Some(&format!("retiring: {active} (verifies until its tokens expire)").as_str()),
        "{}",
        rotated.stdout
    );
    let new_next = lines
        .get(2)
        .and_then(|l| l.strip_prefix("next: "))
        .unwrap_or_else(|| panic!("no next line: {}", rotated.stdout))
        .to_string();
    assert!(new_next != active && new_next != next);

    let keys = list_keys(data);
    assert_eq!(keys.len(), 3, "{keys:?}");
    assert_eq!(only_key(&keys, KeyState::Active).kid, next);
    assert_eq!(only_key(&keys, KeyState::Next).kid, new_next);
    let retiring = only_key(&keys, KeyState::Retiring);
    assert_eq!(retiring.kid, active);
    assert!(retiring.verify_until.is_some(), "{retiring:?}");
    new_next
}

/// `keys revoke KID`, then the list shows it revoked; revoking it again or an unknown
/// kid fails.
fn revoke_key_round(data: &Path, kid: &str) {
    let done = run_ok(cli(data, &["keys", "revoke", kid]));
    assert_eq!(
        done.stdout,
        format!("revoked signing key {kid}; every token it signed is now refused\n")
    );
    let keys = list_keys(data);
    let revoked = key_in(&keys, kid);
    assert_eq!(revoked.state, KeyState::Revoked, "{keys:?}");
    assert!(revoked.revoked_at.is_some());
    let listed = serde_json::to_value(&keys).unwrap();
    assert!(
        listed
            .as_array()
            .unwrap()
            .iter()
            .any(|k| k["kid"] == kid && k["state"] == "revoked"),
        "{listed}"
    );
    assert_failed(&run(cli(data, &["keys", "revoke", kid])), "already revoked");
    assert_failed(
        &run(cli(data, &["keys", "revoke", "no-such-kid"])),
        "no signing key",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_keys_list_rotate_and_revoke() {
    let dir = tempfile::tempdir().unwrap();
    let first = Server::start_ok(serve_cmd(&dir.path().join("gatehouse.redb")));
    let addr = first.addr;
    let admin = first.bootstrap_token.clone().unwrap();
    first.stop_ok();
    let data = dir.path().join("gatehouse.redb");
    assert!(!socket_path(&data).exists());

    let (active, next) = fresh_key_ring(&data);
    let new_next = rotate_round(&data, &active, &next);
    revoke_key_round(&data, &active);
    assert!(
        !socket_path(&data).exists(),
        "an offline command left a socket"
    );

    // The server signs with the key promoted offline, and publishes neither the revoked
    // key nor any private member.
    let mut cmd = gatehouse(&data);
    cmd.args(["serve", "--listen", &addr.to_string()]);
    let server = Server::start_ok(cmd);
    let api = Api::new(&server, &admin);
    let device = api.pair("offline keys").await;
    assert_eq!(kid_of(&device.access_token), next);
    assert!(api.active(&device.access_token).await);
    let jwks: serde_json::Value = api
        .client
        .get(format!("{}/.well-known/jwks.json", api.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let published: Vec<&str> = jwks["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["kid"].as_str().unwrap())
        .collect();
    assert!(published.contains(&next.as_str()), "{jwks}");
    assert!(published.contains(&new_next.as_str()), "{jwks}");
    assert!(
        !published.contains(&active.as_str()),
        "revoked key published: {jwks}"
    );
    server.stop_ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn online_keys_rotate_and_revoke_go_through_the_admin_socket() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("gatehouse.redb");
    let server = Server::start_ok(serve_cmd(&data));
    let api = Api::new(&server, server.bootstrap_token.as_deref().unwrap());

    let (active, next) = fresh_key_ring(&data);
    let old = api.pair("before rotation").await;
    assert_eq!(kid_of(&old.access_token), active);

    rotate_round(&data, &active, &next);
    // The running server rotated: the old token still verifies (its key is retiring),
    // new tokens carry the promoted key.
    assert!(api.active(&old.access_token).await);
    let new = api.pair("after rotation").await;
    assert_eq!(kid_of(&new.access_token), next);

    revoke_key_round(&data, &active);
    assert_eq!(
        api.introspect(&old.access_token).await,
        serde_json::json!({"active": false}),
        "a token signed by a revoked key is still accepted"
    );
    assert!(api.active(&new.access_token).await);
    healthz_via_pin(&server).await;
    server.stop_ok();
}

/// `clients create --name NAME` prints exactly `client_id=…` and `client_secret=…`.
fn create_client(data: &Path, name: &str) -> (String, String) {
    let done = run_ok(cli(data, &["clients", "create", "--name", name]));
    let lines: Vec<&str> = done.stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{}", done.stdout);
    let id = lines[0]
        .strip_prefix("client_id=")
        .unwrap_or_else(|| panic!("{}", done.stdout));
    let secret = lines[1]
        .strip_prefix("client_secret=")
        .unwrap_or_else(|| panic!("{}", done.stdout));
    assert!(id.starts_with("cli_") && id.len() == 36, "{id}");
    assert!(secret.starts_with("ghc_") && secret.len() == 47, "{secret}");
    assert!(done.stderr.contains("shown only now"), "{}", done.stderr);
    (id.to_string(), secret.to_string())
}

fn list_clients(data: &Path) -> Vec<ClientInfo> {
    json_of(data, &["clients", "list", "--json"])
}

fn client_in<'a>(clients: &'a [ClientInfo], id: &str) -> &'a ClientInfo {
    clients
        .iter()
        .find(|c| c.client_id.to_string() == id)
        .unwrap_or_else(|| panic!("client {id} not listed: {clients:?}"))
}

/// Creates `api` and `batch`, lists them, revokes `batch`. Returns both credentials.
fn clients_round(data: &Path) -> ((String, String), (String, String)) {
    let api = create_client(data, "api");
    let batch = create_client(data, "batch");
    assert_ne!(api.0, batch.0);

    let clients = list_clients(data);
    assert_eq!(clients.len(), 2, "{clients:?}");
    assert_eq!(client_in(&clients, &api.0).name, "api");
    assert_eq!(client_in(&clients, &batch.0).name, "batch");
    assert!(clients.iter().all(|c| c.revoked_at.is_none()));
    let listed = run_ok(cli(data, &["clients", "list", "--json"])).stdout;
    let table = run_ok(cli(data, &["clients", "list"])).stdout;
    for output in [&listed, &table] {
        assert!(
            !output.contains(&api.1) && !output.contains(&batch.1[4..]),
            "a client secret is listed: {output}"
        );
    }
    assert!(
        table
            .lines()
            .any(|l| l.starts_with(api.0.as_str()) && l.contains("api") && l.contains("active")),
        "{table}"
    );

    let revoked = run_ok(cli(data, &["clients", "revoke", &batch.0]));
    assert_eq!(
        revoked.stdout,
        format!("revoked client {} (batch)\n", batch.0)
    );
    let clients = list_clients(data);
    assert!(client_in(&clients, &batch.0).revoked_at.is_some());
    assert!(client_in(&clients, &api.0).revoked_at.is_none());
    assert_failed(
        &run(cli(data, &["clients", "revoke", &batch.0])),
        "already revoked",
    );
    let unknown = format!("cli_{}", "0".repeat(32));
    assert_failed(
        &run(cli(data, &["clients", "revoke", &unknown])),
        "no client",
    );
    let bad = run(cli(data, &["clients", "create", "--name", "<script>"]));
    assert_failed(&bad, "bad client name");
    assert!(bad.stdout.is_empty(), "{}", bad.stdout);
    assert_eq!(
        list_clients(data).len(),
        2,
        "a refused create left a client"
    );
    (api, batch)
}

/// `/v1/introspect` with a client's HTTP Basic credentials: the status.
async fn introspect_as_client(api: &Api, client: &(String, String), token: &str) -> u16 {
    api.client
        .post(format!("{}/v1/introspect", api.url))
        .basic_auth(&client.0, Some(&client.1))
        .form(&[("token", token)])
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_clients_create_list_and_revoke() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("gatehouse.redb");
    let first = Server::start_ok(serve_cmd(&data));
    let admin = first.bootstrap_token.clone().unwrap();
    first.stop_ok();

    let (kept, revoked) = clients_round(&data);
    assert!(!socket_path(&data).exists());

    // The clients registered offline are the server's: the kept one may introspect, the
    // revoked one may not.
    let server = Server::start_ok(serve_cmd(&data));
    let api = Api::new(&server, &admin);
    let device = api.pair("client check").await;
    assert_eq!(
        introspect_as_client(&api, &kept, &device.access_token).await,
        200
    );
    assert_eq!(
        introspect_as_client(&api, &revoked, &device.access_token).await,
        401
    );
    server.stop_ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn online_clients_create_list_and_revoke() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("gatehouse.redb");
    let server = Server::start_ok(serve_cmd(&data));
    let api = Api::new(&server, server.bootstrap_token.as_deref().unwrap());
    let device = api.pair("client check").await;

    let (kept, revoked) = clients_round(&data);
    assert_eq!(
        introspect_as_client(&api, &kept, &device.access_token).await,
        200
    );
    assert_eq!(
        introspect_as_client(&api, &revoked, &device.access_token).await,
        401
    );
    // Created through the socket, usable at once; revoked through it, refused at once.
    let probe = create_client(&data, "probe");
    assert_eq!(
        introspect_as_client(&api, &probe, &device.access_token).await,
        200
    );
    run_ok(cli(&data, &["clients", "revoke", &probe.0]));
    assert_eq!(
        introspect_as_client(&api, &probe, &device.access_token).await,
        401
    );
    assert_eq!(list_clients(&data).len(), 3);
    server.stop_ok();
}

fn list_devices(data: &Path) -> Vec<DeviceView> {
    json_of(data, &["devices", "list", "--json"])
}

fn device_in<'a>(devices: &'a [DeviceView], id: &str) -> &'a DeviceView {
    devices
        .iter()
        .find(|d| d.id.to_string() == id)
        .unwrap_or_else(|| panic!("device {id} not listed: {devices:?}"))
}

/// Devices paired over HTTP with a running binary, listed and revoked through the admin
/// socket; then listed and revoked offline, which the next start honours.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_list_and_revoke_online_and_offline() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("gatehouse.redb");
    let server = Server::start_ok(serve_cmd(&data));
    let addr = server.addr;
    let admin = server.bootstrap_token.clone().unwrap();
    let api = Api::new(&server, &admin);
    let phone = api.pair("phone").await;
    let tablet = api.pair("tablet").await;

    let devices = list_devices(&data);
    assert_eq!(devices.len(), 2, "{devices:?}");
    for (paired, name) in [(&phone, "phone"), (&tablet, "tablet")] {
        let listed = device_in(&devices, &paired.device_id);
        assert_eq!(listed.name, name);
        assert_eq!(listed.platform, "ios");
        assert_eq!(listed.status, "active");
        assert!(listed.revoked_at.is_none());
    }
    let table = run_ok(cli(&data, &["devices", "list"])).stdout;
    assert!(
        table
            .lines()
            .any(|l| l.starts_with(phone.device_id.as_str()) && l.contains("active")),
        "{table}"
    );

    let done = run_ok(cli(&data, &["devices", "revoke", &phone.device_id]));
    assert_eq!(
        done.stdout,
        format!(
            "revoked device {} (phone) and all its tokens\n",
            phone.device_id
        )
    );
    assert_eq!(
        api.introspect(&phone.access_token).await,
        serde_json::json!({"active": false})
    );
    assert!(!api.active(&phone.refresh_token).await);
    let (status, _) = api.refresh(&phone.refresh_token).await;
    assert_eq!(status, 400);
    assert!(api.active(&tablet.access_token).await);
    let devices = list_devices(&data);
    assert_eq!(device_in(&devices, &phone.device_id).status, "revoked");
    assert!(device_in(&devices, &phone.device_id).revoked_at.is_some());
    assert_eq!(device_in(&devices, &tablet.device_id).status, "active");
    // `devices show` prints one device as JSON.
    let shown: gatehouse::devices::DeviceView =
        serde_json::from_str(&run_ok(cli(&data, &["devices", "show", &phone.device_id])).stdout)
            .unwrap();
    assert_eq!(shown.id.to_string(), phone.device_id);
    assert_eq!(shown.status, "revoked");
    assert_failed(
        &run(cli(
            &data,
            &["devices", "show", &format!("dev_{}", "1".repeat(32))],
        )),
        "no device",
    );
    let unknown = format!("dev_{}", "0".repeat(32));
    assert_failed(
        &run(cli(&data, &["devices", "revoke", &unknown])),
        "no device with id",
    );
    assert_failed(
        &run(cli(&data, &["devices", "revoke", "not-a-device"])),
        "no device with id",
    );
    server.stop_ok();

    // Offline: the same list from the file, and a revocation the next start honours.
    let offline = list_devices(&data);
    assert_eq!(device_in(&offline, &phone.device_id).status, "revoked");
    assert_eq!(device_in(&offline, &tablet.device_id).status, "active");
    run_ok(cli(&data, &["devices", "revoke", &tablet.device_id]));
    assert!(!socket_path(&data).exists());
    let mut cmd = gatehouse(&data);
    cmd.args(["serve", "--listen", &addr.to_string()]);
    let server = Server::start_ok(cmd);
    let api = Api::new(&server, &admin);
    assert!(!api.active(&tablet.access_token).await);
    assert!(!api.active(&tablet.refresh_token).await);
    // Introspection still works: a device paired now is active.
    let fresh = api.pair("fresh").await;
    assert!(api.active(&fresh.access_token).await);
    server.stop_ok();
}

/// The query of a `gatehouse://pair?` URI, percent-decoded.
fn pairing_query(uri: &str) -> HashMap<String, String> {
    let query = uri
        .strip_prefix("gatehouse://pair?")
        .unwrap_or_else(|| panic!("not a pairing URI: {uri:?}"));
    query
        .split('&')
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (k.to_string(), percent_decode(v))
        })
        .collect()
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap();
            out.push(u8::from_str_radix(hex, 16).unwrap());
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).unwrap()
}

/// `pair new` prints the QR code (black-on-white ANSI lines), then the URI as the last
/// line.
fn pair_new(data: &Path, args: &[&str]) -> (String, HashMap<String, String>) {
    let mut all = vec!["pair", "new"];
    all.extend_from_slice(args);
    let done = run_ok(cli(data, &all));
    let mut lines: Vec<&str> = done.stdout.lines().collect();
    let uri = lines
        .pop()
        .unwrap_or_else(|| panic!("no output: {:?}", done.stdout));
    assert!(
        lines.len() > 10,
        "no QR code above the URI: {:?}",
        done.stdout
    );
    assert!(
        lines
            .iter()
            .all(|l| l.starts_with("\x1b[30;47m") && l.ends_with("\x1b[0m")),
        "QR lines are not black on white: {:?}",
        done.stdout
    );
    assert!(done.stderr.contains("open until"), "{}", done.stderr);
    (uri.to_string(), pairing_query(uri))
}

/// Claims a pairing session over HTTP: the status of `/v1/pair`.
async fn claim(api: &Api, query: &HashMap<String, String>) -> u16 {
    api.client
        .post(format!("{}/v1/pair", api.url))
        .json(&serde_json::json!({
            "session_id": query["session"],
            "secret": query["secret"],
            "device": {"name": "scanner", "platform": "android", "app_version": "1.0"},
        }))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

fn unix_now() -> u64 {
    SystemClock.now_ms() / 1000
}

/// A TTL outside 30 s to 1 h is refused with the range, and a malformed one too: both are
/// usage errors (exit code 2), however far the command got before the refusal.
fn bad_ttls_refused(data: &Path) {
    for ttl in ["2h", "10s"] {
        let done = run(cli(data, &["pair", "new", "--name", "x", "--ttl", ttl]));
        assert_failed(&done, "bad ttl: must be between 30 and 3600 seconds");
        assert_eq!(done.status.code(), Some(2), "{done:?}");
        assert!(done.stdout.is_empty(), "{}", done.stdout);
    }
    let done = run(cli(data, &["pair", "new", "--ttl", "soon"]));
    assert_failed(&done, "expected a duration such as 5m");
    assert_eq!(done.status.code(), Some(2), "{done:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn online_pair_new_prints_a_uri_a_device_can_claim() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("gatehouse.redb");
    let server = Server::start_ok(serve_cmd(&data));
    let api = Api::new(&server, server.bootstrap_token.as_deref().unwrap());

    let before = unix_now();
    let (uri, query) = pair_new(&data, &["--name", "x", "--ttl", "2m"]);
    let after = unix_now();
    assert_eq!(query["v"], "1", "{uri}");
    assert_eq!(query["server"], server.url, "{uri}");
    assert!(query["session"].starts_with("ps_"), "{uri}");
    assert_eq!(
        query["pin"],
        format!("sha256/{}", server.pin.as_deref().unwrap()),
        "{uri}"
    );
    let exp: u64 = query["exp"].parse().unwrap();
    assert!(
        (before + 120..=after + 120).contains(&exp),
        "exp {exp} is not 2 minutes after {before}..{after}"
    );
    assert_eq!(claim(&api, &query).await, 200, "the printed session claims");
    assert_eq!(claim(&api, &query).await, 401, "a session is claimed once");

    bad_ttls_refused(&data);
    server.stop_ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_pair_new_opens_a_session_the_server_honours() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("gatehouse.redb");
    let first = Server::start_ok(serve_cmd(&data));
    let addr = first.addr;
    let admin = first.bootstrap_token.clone().unwrap();
    first.stop_ok();

    // The CLI names the server by the configured listen address, like `serve` does.
    let mut cmd = cli(&data, &["pair", "new", "--name", "x", "--ttl", "2m"]);
    cmd.env("GATEHOUSE_LISTEN", addr.to_string());
    let done = run_ok(cmd);
    let query = pairing_query(done.stdout.lines().last().unwrap_or_default());
    assert_eq!(
        query["server"],
        format!("https://{addr}"),
        "{}",
        done.stdout
    );
    bad_ttls_refused(&data);
    assert!(!socket_path(&data).exists());

    let mut cmd = gatehouse(&data);
    cmd.args(["serve", "--listen", &addr.to_string()]);
    let server = Server::start_ok(cmd);
    let api = Api::new(&server, &admin);
    assert_eq!(claim(&api, &query).await, 200, "an offline session claims");
    server.stop_ok();
}

/// The pairing URI carries the SPKI pin so that an app can trust a self-signed server
/// (`ServerIdentity::pin`). Opened offline, the URI has no pin although the instance
/// serves its self-signed certificate, which is sealed in the data file the CLI opened.
#[test]
fn offline_pair_new_pins_the_self_signed_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("gatehouse.redb");
    let first = Server::start_ok(serve_cmd(&data));
    let pin = first.pin.clone().unwrap();
    first.stop_ok();
    let (uri, query) = pair_new(&data, &["--ttl", "2m"]);
    assert_eq!(
        query.get("pin").map(String::as_str),
        Some(format!("sha256/{pin}").as_str()),
        "{uri}"
    );
}
