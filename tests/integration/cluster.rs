//! Several gatehouse nodes on one PostgreSQL database: what one node acknowledges, the
//! others act on — a pairing claimed once across nodes, a revocation refused everywhere
//! within a second, a reused refresh token revoking its family everywhere, keys and bans
//! in step, and the scheduled jobs run by one leader that another replaces. Real nodes
//! (in-process servers, each with its own port, admin socket and caches) on a real
//! PostgreSQL 15 (`postgres.rs`).

use std::time::{Duration, Instant};

use crate::helpers::{TestApp, spawn_app_in};
use crate::postgres::Postgres;

/// How long another node may take to act on a change (the bound).
const PROPAGATION: Duration = Duration::from_secs(1);

/// `count` nodes on `pg`'s database, sharing the first node's master key.
async fn nodes(pg: &Postgres, count: usize, extra: &[(&str, &str)]) -> Vec<TestApp> {
    let password = pg.password_file().display().to_string();
    let url = pg.url();
    // Nodes behind one name sign as one issuer (docs/cluster.md).
    let mut env = vec![
        ("GATEHOUSE_STORAGE", url.as_str()),
        ("GATEHOUSE_STORAGE_PASSWORD_FILE", password.as_str()),
        ("GATEHOUSE_ISSUER", "https://gatehouse.test"),
    ];
    env.extend_from_slice(extra);
    let mut out: Vec<TestApp> = Vec::new();
    for _ in 0..count {
        let dir = tempfile::tempdir().expect("dir");
        if let Some(first) = out.first() {
            std::fs::copy(
                &first.config.master_key.path,
                dir.path().join("gatehouse.redb.key"),
            )
            .expect("the first node's key");
        }
        out.push(spawn_app_in(dir, &env).await);
    }
    out
}

/// Polls `check` until it holds; how long that took. Panics after `within`.
async fn eventually<F, Fut>(within: Duration, what: &str, mut check: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = Instant::now();
    loop {
        if check().await {
            return started.elapsed();
        }
        assert!(started.elapsed() < within, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn refresh(app: &TestApp, token: &str) -> reqwest::Response {
    app.refresh(token).await
}

async fn active_on(app: &TestApp, admin: &str, token: &str) -> bool {
    app.introspect_as(admin, token).await["active"] == true
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pairing_session_from_one_node_is_claimed_once_across_nodes() {
    let Some(pg) = Postgres::start("a_pairing_session_from_one_node_is_claimed_once") else {
        return;
    };
    let nodes = nodes(&pg, 2, &[]).await;
    let (a, b) = (&nodes[0], &nodes[1]);
    let (session_id, secret) = a.open_pairing_session().await;
    let body = serde_json::json!({
        "session_id": session_id,
        "secret": secret,
        "device": {"name": "Pixel", "platform": "android", "app_version": "1.0.0"},
    });
    let claims = (0..8).map(|i| {
        let node = if i % 2 == 0 { a } else { b };
        let client = node.client();
        let url = node.url("/v1/pair");
        let body = body.clone();
        async move {
            client
                .post(url)
                .json(&body)
                .send()
                .await
                .expect("claim")
                .status()
                .as_u16()
        }
    });
    let statuses = futures_util::future::join_all(claims).await;
    let won = statuses.iter().filter(|s| **s == 200).count();
    assert_eq!(won, 1, "exactly one claim wins across nodes: {statuses:?}");
    assert!(
        statuses.iter().all(|s| *s == 200 || (400..500).contains(s)),
        "the others are refused, none fails: {statuses:?}"
    );
    for node in nodes {
        node.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocations_and_reused_refresh_tokens_reach_every_node_within_a_second() {
    let Some(pg) = Postgres::start("revocations_reach_every_node") else {
        return;
    };
    let nodes = nodes(&pg, 3, &[]).await;
    let (a, b, c) = (&nodes[0], &nodes[1], &nodes[2]);
    let admin = a.admin_token();
    let device = a.pair_device().await;
    // A token from a family made on A a moment ago is valid on the others at once,
    // before A's change reaches them (they ask the database).
    for node in [b, c] {
        assert!(active_on(node, &admin, &device.access_token).await);
    }

    // An access token revoked on A is refused by B and C within a second.
    let revoked = a
        .client()
        .post(a.url("/v1/revoke"))
        .bearer_auth(&admin)
        .form(&[("token", device.access_token.as_str())])
        .send()
        .await
        .expect("revoke");
    assert_eq!(revoked.status(), 200);
    for node in [b, c] {
        let took = eventually(
            PROPAGATION,
            "the revocation reaches another node",
            || async { !active_on(node, &admin, &device.access_token).await },
        )
        .await;
        eprintln!("revocation seen by another node after {took:?}");
    }

    // Refresh on A, reuse of the spent token on B: the family is revoked everywhere.
    let refreshed = refresh(a, &device.refresh_token).await;
    assert_eq!(refreshed.status(), 200);
    let pair: serde_json::Value = refreshed.json().await.expect("json");
    let access = pair["access_token"].as_str().expect("access").to_string();
    let next_refresh = pair["refresh_token"].as_str().expect("refresh").to_string();
    for node in [b, c] {
        eventually(
            PROPAGATION,
            "the new access token is valid everywhere",
            || active_on(node, &admin, &access),
        )
        .await;
    }
    let reused = refresh(b, &device.refresh_token).await;
    assert_eq!(reused.status(), 400, "the spent token is refused on B");
    let after = refresh(a, &next_refresh).await;
    assert_eq!(after.status(), 400, "the family is revoked on A too");
    for node in [a, b, c] {
        eventually(
            PROPAGATION,
            "the family's access token is refused",
            || async { !active_on(node, &admin, &access).await },
        )
        .await;
    }
    // Three nodes appended each to its own audit chain; the log verifies whole from
    // any of them.
    let report = c
        .running
        .services
        .audit
        .verify(&mut |_, _| {})
        .expect("audit verify");
    assert!(report.broken.is_none(), "{report:?}");
    for node in nodes {
        node.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_and_bans_from_one_node_apply_on_the_others() {
    let Some(pg) = Postgres::start("keys_and_bans_from_one_node_apply_on_the_others") else {
        return;
    };
    let nodes = nodes(&pg, 2, &[("GATEHOUSE_LOCKOUT_MAX_FAILURES", "3")]).await;
    let (a, b) = (&nodes[0], &nodes[1]);
    let jwks = |node: &TestApp| {
        let client = node.client();
        let url = node.url("/.well-known/jwks.json");
        async move {
            client
                .get(url)
                .send()
                .await
                .expect("jwks")
                .text()
                .await
                .expect("body")
        }
    };
    assert_eq!(jwks(a).await, jwks(b).await, "one key ring");
    a.running
        .services
        .keys
        .rotate(
            gatehouse::keys::Rotation::Now,
            &gatehouse::audit::Origin::operator(),
        )
        .await
        .expect("rotate on A");
    let rotated = jwks(a).await;
    eventually(PROPAGATION, "B serves A's rotated JWKS", || async {
        jwks(b).await == rotated
    })
    .await;
    // A token signed by A's new key is valid on B.
    let device = a.pair_device().await;
    let admin = a.admin_token();
    eventually(PROPAGATION, "B verifies a token from A's new key", || {
        active_on(b, &admin, &device.access_token)
    })
    .await;

    // Failed admin logins on A ban the address (the fourth goes over a budget of
    // three); B refuses it too.
    for _ in 0..4 {
        let refused = a
            .client()
            .get(a.url("/v1/devices"))
            .bearer_auth("gha_0000000000000000_wrong")
            .send()
            .await
            .expect("request");
        assert!([401, 429].contains(&refused.status().as_u16()));
    }
    let ip: std::net::IpAddr = "127.0.0.1".parse().expect("ip");
    assert!(
        a.running.services.lockout.banned(ip).is_some(),
        "A banned it"
    );
    eventually(PROPAGATION, "B bans the address too", || async {
        b.running.services.lockout.banned(ip).is_some()
    })
    .await;
    for node in nodes {
        node.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_node_leads_the_scheduled_jobs_and_another_takes_over_when_it_stops() {
    let Some(pg) = Postgres::start("one_node_leads_the_scheduled_jobs") else {
        return;
    };
    let mut nodes = nodes(&pg, 3, &[]).await;
    let leaders = || async {
        tokio::time::sleep(Duration::from_millis(50)).await;
        true
    };
    eventually(Duration::from_secs(5), "a leader is chosen", || async {
        leaders().await;
        nodes
            .iter()
            .filter(|n| n.running.services.store.is_leader())
            .count()
            == 1
    })
    .await;
    let first = nodes
        .iter()
        .position(|n| n.running.services.store.is_leader())
        .expect("a leader");
    nodes.remove(first).stop().await;
    let took = eventually(Duration::from_secs(5), "another node leads", || async {
        leaders().await;
        nodes
            .iter()
            .filter(|n| n.running.services.store.is_leader())
            .count()
            == 1
    })
    .await;
    eprintln!("a new leader after {took:?}");
    for node in nodes {
        node.stop().await;
    }
}

/// `postgres://…@HOST:PORT` of each server, as one URL that prefers the writable one.
fn failover_url(servers: &[&Postgres]) -> String {
    let hosts: Vec<String> = servers
        .iter()
        .map(|pg| {
            let url = pg.url();
            let after = url.split_once('@').expect("user@").1;
            after.split_once('/').expect("/db").0.to_string()
        })
        .collect();
    format!(
        "postgres://gatehouse@{}/gatehouse?target_session_attrs=read-write",
        hosts.join(",")
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_promoted_mid_load_loses_no_acknowledged_revocation_or_refresh() {
    let Some(primary) = Postgres::start("a_standby_promoted_mid_load") else {
        return;
    };
    let standby = primary.synchronous_standby("a_standby_promoted_mid_load");
    let url = failover_url(&[&primary, &standby]);
    let password = primary.password_file().display().to_string();
    let env = [
        ("GATEHOUSE_STORAGE", url.as_str()),
        ("GATEHOUSE_STORAGE_PASSWORD_FILE", password.as_str()),
        ("GATEHOUSE_ISSUER", "https://gatehouse.test"),
        ("GATEHOUSE_RATELIMIT_PAIRING", "100/1m"),
        ("GATEHOUSE_RATELIMIT_REFRESH", "100/1m"),
    ];
    let node = spawn_app_in(tempfile::tempdir().expect("dir"), &env).await;
    let admin = node.admin_token();
    let mut devices = Vec::new();
    for _ in 0..12 {
        devices.push(node.pair_device().await);
    }

    // Revocations and refreshes run while the primary dies and the standby is promoted.
    let load = {
        let client = node.client();
        let revoke_url = node.url("/v1/revoke");
        let token_url = node.url("/v1/token");
        let admin = admin.clone();
        let devices: Vec<(String, String)> = devices
            .iter()
            .map(|d| (d.access_token.clone(), d.refresh_token.clone()))
            .collect();
        tokio::spawn(async move {
            let mut revoked = Vec::new();
            let mut refreshed = Vec::new();
            for (access, refresh_token) in devices {
                tokio::time::sleep(Duration::from_millis(40)).await;
                let answer = client
                    .post(&revoke_url)
                    .bearer_auth(&admin)
                    .form(&[("token", access.as_str())])
                    .send()
                    .await
                    .expect("revoke");
                if answer.status() == 200 {
                    revoked.push(access);
                }
                let answer = client
                    .post(&token_url)
                    .form(&[
                        ("grant_type", "refresh_token"),
                        ("refresh_token", refresh_token.as_str()),
                    ])
                    .send()
                    .await
                    .expect("refresh");
                if answer.status() == 200 {
                    let pair: serde_json::Value = answer.json().await.expect("json");
                    refreshed.push(pair["refresh_token"].as_str().expect("refresh").to_string());
                }
            }
            (revoked, refreshed)
        })
    };
    tokio::time::sleep(Duration::from_millis(150)).await;
    primary.kill();
    standby.promote();
    let (revoked, refreshed) = load.await.expect("load");
    assert!(
        !revoked.is_empty() && !refreshed.is_empty(),
        "some writes were acknowledged"
    );

    // The node is ready again on the promoted standby, by itself.
    eventually(
        Duration::from_secs(20),
        "ready on the promoted standby",
        || async {
            node.client()
                .get(node.url("/readyz"))
                .send()
                .await
                .is_ok_and(|r| r.status() == 200)
        },
    )
    .await;
    // A node started afresh reads everything from the promoted standby: every
    // acknowledged revocation is there, and every acknowledged refresh.
    let dir = node.stop().await;
    let node = spawn_app_in(dir, &env).await;
    for access in &revoked {
        assert!(
            !active_on(&node, &admin, access).await,
            "a revocation was lost"
        );
    }
    for token in &refreshed {
        assert_eq!(
            refresh(&node, token).await.status(),
            200,
            "a refresh was lost"
        );
    }
    eprintln!(
        "{} revocations and {} refreshes acknowledged across the failover, none lost",
        revoked.len(),
        refreshed.len()
    );
    node.stop().await;
}

/// Every audit row of the database, decoded: sequence number and record.
fn audit_rows(pg: &Postgres) -> Vec<(u64, gatehouse::store::records::AuditEntryRecord)> {
    let text = pg.psql(
        "gatehouse",
        "SELECT seq || ' ' || encode(value, 'hex') FROM gatehouse.audit_events_v1 ORDER BY seq",
    );
    text.lines()
        .filter(|line| !line.is_empty())
        .map(|line| {
            let (seq, hex) = line.split_once(' ').expect("seq and value");
            let bytes = data_encoding::HEXLOWER.decode(hex.as_bytes()).expect("hex");
            let record = gatehouse::store::records::decode(&bytes[32..]).expect("a record");
            (seq.parse().expect("seq"), record)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_node_appends_its_own_audit_chain_and_checkpoints_bind_them() {
    use gatehouse::store::records::AuditEntryRecord;
    let Some(pg) = Postgres::start("each_node_appends_its_own_audit_chain") else {
        return;
    };
    let nodes = nodes(&pg, 2, &[("GATEHOUSE_AUDIT_CHECKPOINT_EVERY", "1s")]).await;
    let mut nodes = nodes.into_iter();
    let (a, b) = (nodes.next().unwrap(), nodes.next().unwrap());
    // Both nodes write at once: neither waits for the other's chain.
    let admin = a.admin_token();
    let (pairs_a, pairs_b) = tokio::join!(
        futures_util::future::join_all((0..5).map(|_| a.pair_device_as(&admin))),
        futures_util::future::join_all((0..5).map(|_| b.pair_device_as(&admin))),
    );
    assert_eq!(pairs_a.len() + pairs_b.len(), 10);
    let data = a.data_path().to_path_buf();
    b.stop().await;

    // Node records only, each of a chain; B's chain is the one whose last record is
    // a `device.paired` that A did not write.
    let rows = audit_rows(&pg);
    let mut chains: std::collections::BTreeMap<u64, (u64, u64)> = Default::default();
    for (seq, record) in &rows {
        let AuditEntryRecord::V2(node) = record else {
            panic!("a node wrote a data file's record at {seq}");
        };
        let last = chains.entry(node.chain).or_insert((0, 0));
        assert_eq!(
            node.n,
            last.0 + 1,
            "places follow on in chain {:x}",
            node.chain
        );
        *last = (node.n, *seq);
    }
    assert!(chains.len() >= 2, "one chain per node: {chains:?}");
    let own_a = a
        .running
        .services
        .store
        .own_audit_chain()
        .expect("A appended");
    let (&chain_b, &(n_b, last_b)) = chains
        .iter()
        .find(|(chain, _)| **chain != own_a)
        .expect("B's chain");

    // The leader (A, now alone) binds B's chain where it ended.
    eventually(
        Duration::from_secs(10),
        "a checkpoint binds B's chain",
        || async {
            audit_rows(&pg).iter().any(|(seq, record)| {
                matches!(record, AuditEntryRecord::V2(node)
                if *seq > last_b
                    && node.entry.kind == "audit.checkpoint"
                    && node.heads.iter().any(|h| h.chain == chain_b && h.n == n_b))
            })
        },
    )
    .await;
    // Pruning the oldest records keeps the rest verifiable. (The test clock stands
    // still, so every record has one time: the count bounds what goes.)
    let pruned = a
        .running
        .services
        .store
        .write(move |tx| tx.prune_audit(u64::MAX, 5))
        .await
        .expect("prune");
    assert_eq!(pruned.removed, 5, "{pruned:?}");
    // Kept: the master key is in A's directory.
    let _dir = a.stop().await;

    // `audit verify` on the database itself, no node running.
    let verify = || {
        let mut cmd = crate::binary::gatehouse(&data);
        cmd.env("GATEHOUSE_STORAGE", pg.url())
            .env("GATEHOUSE_STORAGE_PASSWORD_FILE", pg.password_file())
            .args(["audit", "verify", "--json"]);
        crate::binary::run(cmd)
    };
    let done = verify();
    assert!(done.status.success(), "{}\n{}", done.stdout, done.stderr);
    let report: serde_json::Value = serde_json::from_str(&done.stdout).expect("json");
    assert_eq!(report["ok"], true, "{report}");
    assert!(
        report["chains"].as_array().expect("chains").len() >= 2,
        "{report}"
    );
    assert!(
        report["checkpoints"].as_u64().expect("checkpoints") >= 1,
        "{report}"
    );
    assert_eq!(report["pruned"].as_u64(), Some(pruned.removed), "{report}");

    // B's chain cut short by its last record: nothing links to it any more, but the
    // checkpoint saw it, so verification fails.
    pg.psql(
        "gatehouse",
        &format!("DELETE FROM gatehouse.audit_events_v1 WHERE seq = {last_b}"),
    );
    let done = verify();
    assert!(!done.status.success(), "{}", done.stdout);
    let report: serde_json::Value = serde_json::from_str(&done.stdout).expect("json");
    assert_eq!(report["ok"], false, "{report}");
    let problem = report["problem"].as_str().expect("problem");
    assert!(problem.contains(&format!("{chain_b:016x}")), "{problem}");
    assert!(problem.contains(&format!("saw {n_b} of them")), "{problem}");
}

async fn status_of(app: &TestApp, path: &str, token: Option<&str>) -> u16 {
    let mut request = app.client().get(app.url(path));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    request.send().await.expect("request").status().as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_budgets_are_shared_across_nodes_within_a_flush() {
    let Some(pg) = Postgres::start("rate_limit_budgets_are_shared_across_nodes") else {
        return;
    };
    let nodes = nodes(&pg, 2, &[("GATEHOUSE_RATELIMIT_PER_IP", "10/1m")]).await;
    let (a, b) = (&nodes[0], &nodes[1]);
    // The address spends its whole budget on A.
    for i in 0..10 {
        assert_eq!(
            status_of(a, "/.well-known/jwks.json", None).await,
            200,
            "{i}"
        );
    }
    assert_eq!(status_of(a, "/.well-known/jwks.json", None).await, 429);
    // Once A has flushed (every second), B learns it at its own first flush after the
    // address reaches it: B admits what comes in one flush interval, not a budget.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let started = Instant::now();
    let mut admitted = 0;
    loop {
        match status_of(b, "/.well-known/jwks.json", None).await {
            200 => admitted += 1,
            429 => break,
            other => panic!("unexpected {other}"),
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "B never refused ({admitted} admitted)"
        );
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    // Alone, B would have admitted 10; one flush interval at 400 ms apart is 3 or 4.
    assert!(
        admitted <= 5,
        "B admitted {admitted} after A spent the budget"
    );
    for node in nodes {
        node.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failure_counts_add_up_across_nodes_and_the_ban_applies_everywhere() {
    const WRONG_ADMIN: &str = "gha_0123456789abcdef_not-the-secret";
    let Some(pg) = Postgres::start("failure_counts_add_up_across_nodes") else {
        return;
    };
    let nodes = nodes(&pg, 2, &[("GATEHOUSE_LOCKOUT_MAX_FAILURES", "4")]).await;
    let (a, b) = (&nodes[0], &nodes[1]);
    for _ in 0..3 {
        assert_eq!(status_of(a, "/v1/devices", Some(WRONG_ADMIN)).await, 401);
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // B's first failure is its first for this address; its flush adds A's three.
    assert_eq!(status_of(b, "/v1/devices", Some(WRONG_ADMIN)).await, 401);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // Five in all over two nodes: over the limit of four, on B, which bans.
    assert_eq!(status_of(b, "/v1/devices", Some(WRONG_ADMIN)).await, 401);
    for node in [a, b] {
        eventually(PROPAGATION, "the ban applies", || async {
            status_of(node, "/.well-known/jwks.json", None).await == 429
        })
        .await;
    }
    for node in nodes {
        node.stop().await;
    }
}

/// `POST /v1/introspect` of `token` on `app`, authenticated by `auth`: the status.
async fn introspect_status(
    app: &TestApp,
    auth: impl FnOnce(reqwest::RequestBuilder) -> reqwest::RequestBuilder,
    token: &str,
) -> u16 {
    auth(app.client().post(app.url("/v1/introspect")))
        .form(&[("token", token)])
        .send()
        .await
        .expect("introspection")
        .status()
        .as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_tokens_and_api_clients_from_one_node_apply_on_the_others() {
    let Some(pg) = Postgres::start("admin_tokens_and_api_clients_from_one_node") else {
        return;
    };
    let nodes = nodes(&pg, 2, &[]).await;
    let (a, b) = (&nodes[0], &nodes[1]);
    let device = a.pair_device().await;
    let access = device.access_token.clone();
    let operator = gatehouse::audit::Origin::operator();

    // Made on A, usable on B at once (B asks the database for an id it does not know).
    let admin = a.create_admin_token().await;
    let client = a
        .running
        .services
        .clients
        .create("api", &operator)
        .await
        .expect("client");
    let (id, secret) = (client.client_id.to_string(), client.client_secret.clone());
    assert_eq!(
        introspect_status(b, |r| r.bearer_auth(&admin), &access).await,
        200
    );
    assert_eq!(
        introspect_status(b, |r| r.basic_auth(&id, Some(&secret)), &access).await,
        200
    );

    // Revoked on A, refused on B within a second: B knew them live, and learns of the
    // revocation from the change feed.
    let admin_id = admin.split('_').nth(1).expect("an id").to_string();
    a.running
        .services
        .admin_tokens
        .revoke(&admin_id, &operator)
        .await
        .expect("revoke the token");
    a.running
        .services
        .clients
        .revoke(&id, &operator)
        .await
        .expect("revoke the client");
    eventually(
        PROPAGATION,
        "the revoked admin token is refused on B",
        || async { introspect_status(b, |r| r.bearer_auth(&admin), &access).await == 401 },
    )
    .await;
    eventually(
        PROPAGATION,
        "the revoked client is refused on B",
        || async {
            introspect_status(b, |r| r.basic_auth(&id, Some(&secret)), &access).await == 401
        },
    )
    .await;

    // With the database down, a node still checks the admin tokens and clients it
    // knows, and the device tokens it can verify offline.
    let bootstrap = a.admin_token();
    let client = a
        .running
        .services
        .clients
        .create("api 2", &operator)
        .await
        .expect("client");
    let (id, secret) = (client.client_id.to_string(), client.client_secret.clone());
    eventually(PROPAGATION, "B knows the new client", || async {
        introspect_status(b, |r| r.basic_auth(&id, Some(&secret)), &access).await == 200
    })
    .await;
    pg.stop();
    for node in [a, b] {
        let answer = node.introspect_as(&bootstrap, &access).await;
        assert_eq!(answer["active"], true, "{answer}");
        assert_eq!(
            introspect_status(node, |r| r.basic_auth(&id, Some(&secret)), &access).await,
            200
        );
    }
    pg.restart();
    for node in nodes {
        node.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rekey_is_refused_while_other_nodes_are_connected() {
    use gatehouse::store::seal::MasterKey;
    let Some(pg) = Postgres::start("a_rekey_is_refused_while_other_nodes_are_connected") else {
        return;
    };
    let mut nodes = nodes(&pg, 2, &[]).await.into_iter();
    let (a, b) = (nodes.next().unwrap(), nodes.next().unwrap());
    let new = MasterKey::generate().expect("a key");
    let store = a.running.services.store.clone();
    let Err(refused) = store.rekey(&new).await else {
        panic!("a rekey went ahead with another node connected");
    };
    let text = refused.to_string();
    assert!(text.contains("1 other gatehouse process"), "{text}");
    assert!(text.contains("stop them"), "{text}");
    // Nothing changed: B still works with the key it has.
    b.pair_device_as(&a.admin_token()).await;
    b.stop().await;
    // Alone on the database, the node may rekey (once PostgreSQL has ended the stopped
    // node's backends, which it does a moment after their connections close).
    let started = Instant::now();
    let resealed = loop {
        match store.rekey(&new).await {
            Ok(resealed) => break resealed,
            Err(gatehouse::store::StoreError::OtherNodes { .. })
                if started.elapsed() < Duration::from_secs(10) =>
            {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(err) => panic!("rekey with no other node: {err}"),
        }
    };
    assert!(resealed > 0);
    a.stop().await;
}

/// Asks for a device grant on `node`: its JSON answer.
async fn ask_device_grant(node: &TestApp) -> serde_json::Value {
    let response = node
        .client()
        .post(node.url("/v1/device_authorization"))
        .form(&[("client_id", "kiosk")])
        .send()
        .await
        .expect("ask");
    assert_eq!(response.status(), 200);
    response.json().await.expect("json")
}

/// One poll of `node` with `device_code`: status and body.
async fn poll_device_grant(node: &TestApp, device_code: &str) -> (u16, serde_json::Value) {
    let response = node
        .client()
        .post(node.url("/v1/token"))
        .form(&[
            ("grant_type", "urn:ietf:params:oauth:grant-type:device_code"),
            ("device_code", device_code),
        ])
        .send()
        .await
        .expect("poll");
    let status = response.status().as_u16();
    (status, response.json().await.expect("json"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_grant_asked_on_one_node_is_approved_on_another_and_taken_once() {
    let Some(pg) = Postgres::start("a_device_grant_across_nodes") else {
        return;
    };
    let nodes = nodes(&pg, 3, &[]).await;
    let (a, b, c) = (&nodes[0], &nodes[1], &nodes[2]);
    let admin = a.admin_token();
    let approve = |node: &TestApp, user_code: serde_json::Value| {
        node.client()
            .post(node.url("/v1/device_grants/approve"))
            .bearer_auth(&admin)
            .json(&serde_json::json!({"user_code": user_code}))
            .send()
    };
    let wait = || {
        for node in &nodes {
            node.clock.advance_ms(10_000);
        }
    };

    // Asked on A, approved on B, polled on all three at once: one poll gets the pair.
    let grant = ask_device_grant(a).await;
    let code = grant["device_code"].as_str().expect("code");
    assert_eq!(
        poll_device_grant(c, code).await.1["error"],
        "authorization_pending"
    );
    let approved = approve(b, grant["user_code"].clone())
        .await
        .expect("approve");
    assert_eq!(approved.status(), 200);
    let again = approve(c, grant["user_code"].clone())
        .await
        .expect("approve");
    assert_eq!(again.status(), 409, "decided on B, so decided on C");
    wait();
    let polls =
        futures_util::future::join_all(nodes.iter().map(|n| poll_device_grant(n, code))).await;
    let won: Vec<_> = polls.iter().filter(|(s, _)| *s == 200).collect();
    assert_eq!(won.len(), 1, "{polls:?}");
    for (status, body) in polls.iter().filter(|(s, _)| *s != 200) {
        assert_eq!(
            (*status, body["error"].as_str()),
            (400, Some("invalid_grant"))
        );
    }

    // Taken on C, presented again on A: what it issued is refused on every node.
    let grant = ask_device_grant(b).await;
    let code = grant["device_code"].as_str().expect("code");
    let approved = approve(a, grant["user_code"].clone())
        .await
        .expect("approve");
    assert_eq!(approved.status(), 200);
    wait();
    let (status, pair) = poll_device_grant(c, code).await;
    assert_eq!(status, 200, "{pair}");
    let access = pair["access_token"].as_str().expect("access").to_string();
    for node in [a, b] {
        assert!(active_on(node, &admin, &access).await);
    }
    wait();
    let (status, body) = poll_device_grant(a, code).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_grant"))
    );
    for node in [a, b, c] {
        eventually(
            PROPAGATION,
            "the leaked device code's tokens are refused",
            || async { !active_on(node, &admin, &access).await },
        )
        .await;
    }
    for node in nodes {
        node.stop().await;
    }
}

/// Status-list indices handed out by several nodes never collide (each reserves its own
/// blocks in the database), and a revocation on one node sets the bit in the list every
/// other node serves within a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_list_indices_never_collide_and_bits_show_on_every_node_within_a_second() {
    use crate::status_list::{Place, place_of, wait_for_bit};
    let Some(pg) = Postgres::start("status_list_bits_on_every_node") else {
        return;
    };
    let nodes = nodes(&pg, 2, &[]).await;
    let (a, b) = (&nodes[0], &nodes[1]);
    let admin = a.admin_token();
    let mut places: Vec<Place> = Vec::new();
    let mut devices = Vec::new();
    for node in [a, b, a, b] {
        let device = node.pair_device_as(&admin).await;
        places.push(place_of(&device.access_token));
        // Refreshed on the other node: its token's index comes from that node's block.
        let other = if std::ptr::eq(node, a) { b } else { a };
        let next: serde_json::Value = refresh(other, &device.refresh_token)
            .await
            .json()
            .await
            .expect("json");
        places.push(place_of(
            next["access_token"]
                .as_str()
                .unwrap_or_else(|| panic!("{next}")),
        ));
        let latest = next["refresh_token"].as_str().expect("refresh").to_string();
        devices.push((device, latest));
    }
    let mut indices: Vec<(String, u64)> = places.iter().map(|p| (p.uri.clone(), p.idx)).collect();
    indices.sort();
    indices.dedup();
    assert_eq!(indices.len(), places.len(), "no index twice: {places:?}");
    let (from_a, from_b) = (places[0].idx, places[1].idx);
    assert!(from_a.abs_diff(from_b) >= 1024, "two blocks: {places:?}");

    // An access token revoked on B: its bit on A's list.
    let revoked = b
        .client()
        .post(b.url("/v1/revoke"))
        .form(&[("token", devices[0].0.access_token.as_str())])
        .send()
        .await
        .expect("revoke");
    assert_eq!(revoked.status(), 200);
    let on = |node: &TestApp, place: &Place| Place {
        idx: place.idx,
        uri: node.url(&place.uri[place.uri.find("/v1/").expect("a list URI")..]),
    };
    let took = wait_for_bit(&a.client(), &a.base_url, &on(a, &places[0]), true).await;
    eprintln!("a revocation on B showed in A's list after {took:?}");
    assert!(took < PROPAGATION, "{took:?}");
    // A family revoked on A (its latest refresh token, through the journal): the bits
    // of both of its tokens, one issued by each node, on B's list.
    let revoked = a
        .client()
        .post(a.url("/v1/revoke"))
        .form(&[("token", devices[1].1.as_str())])
        .send()
        .await
        .expect("revoke");
    assert_eq!(revoked.status(), 200);
    for place in [&places[2], &places[3]] {
        let took = wait_for_bit(&b.client(), &b.base_url, &on(b, place), true).await;
        assert!(took < PROPAGATION, "{took:?}");
    }
    let list = crate::status_list::fetch(&b.client(), &b.base_url, &on(b, &places[4]).uri).await;
    assert!(!list.bit(places[4].idx) && !list.bit(places[1].idx));
    for node in nodes {
        node.stop().await;
    }
}
