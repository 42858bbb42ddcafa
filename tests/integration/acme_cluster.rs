//! ACME with several nodes on one PostgreSQL database: one node orders under the order
//! lease while the others wait, every node serves the certificate it stores, and the
//! CA's TLS-ALPN-01 validation is answered by whichever node it reaches — here, on
//! purpose, a node that did not order. Real nodes on a real PostgreSQL 15 (`postgres.rs`)
//! and a real CA (`pebble.rs`). Also the validation responder's fences, and the lease
//! left behind by a node that stopped.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use gatehouse::clock::Clock;
use gatehouse::store::records::AcmeChallenge;
use gatehouse::tls::acme::{AcmePhase, AcmeSnapshot};

use crate::helpers::{TestApp, free_port, spawn_app_in, spawn_app_in_at, system_now_ms};
use crate::pebble::{DOMAIN, Pebble, acme, audit_kinds, client_for, url, wait_for};
use crate::postgres::Postgres;

/// A node in `acme` mode on `pg`'s database, with `key_from`'s master key (the first node
/// makes one). `acme_env` names the CA.
async fn node(
    pg: &Postgres,
    acme_env: &[(&'static str, String)],
    key_from: Option<&TestApp>,
    now_ms: u64,
) -> TestApp {
    let dir = tempfile::tempdir().unwrap();
    if let Some(first) = key_from {
        std::fs::copy(
            &first.config.master_key.path,
            dir.path().join("gatehouse.redb.key"),
        )
        .unwrap();
    }
    let mut env: Vec<(&str, String)> = vec![
        ("GATEHOUSE_STORAGE", pg.url()),
        (
            "GATEHOUSE_STORAGE_PASSWORD_FILE",
            pg.password_file().display().to_string(),
        ),
        ("GATEHOUSE_ISSUER", format!("https://{DOMAIN}")),
    ];
    env.extend(acme_env.iter().cloned());
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    spawn_app_in_at(dir, &env, now_ms).await
}

/// Polls the nodes' ACME state until `done` holds; panics with their state after `within`.
async fn until(
    nodes: &[&TestApp],
    within: Duration,
    what: &str,
    done: impl Fn(&[AcmeSnapshot]) -> bool,
) {
    let started = Instant::now();
    loop {
        let states: Vec<AcmeSnapshot> = nodes.iter().map(|n| acme(n)).collect();
        if done(&states) {
            return;
        }
        assert!(
            started.elapsed() < within,
            "{what}: not within {within:?}: {states:#?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Rows of the store's sealed-secrets table whose key starts with `prefix`.
fn secrets_named(pg: &Postgres, prefix: &str) -> u64 {
    pg.psql(
        "gatehouse",
        &format!("SELECT count(*) FROM gatehouse.secrets_v1 WHERE key LIKE '{prefix}%';"),
    )
    .trim()
    .parse()
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_node_orders_every_node_serves_and_another_answers_the_validation() {
    let test = "acme_cluster::pebble";
    let Some(pg) = Postgres::start(test) else {
        return;
    };
    let pebble_dir = tempfile::tempdir().unwrap();
    let Some(mut pebble) = Pebble::prepare(test, pebble_dir.path(), None) else {
        return;
    };
    let env = pebble.env();
    let now = system_now_ms();

    // Two nodes, the CA still down: one node takes the lease, fails at the directory and
    // keeps the lease through its backoff; the other waits instead of ordering in turn.
    let a = node(&pg, &env, None, now).await;
    let b = node(&pg, &env, Some(&a), now).await;
    until(
        &[&a, &b],
        Duration::from_secs(30),
        "one node ordering, one waiting",
        |s| {
            let retrying = s.iter().filter(|s| s.phase == AcmePhase::Retrying).count();
            let waiting = s.iter().filter(|s| s.phase == AcmePhase::Waiting).count();
            retrying == 1 && waiting == 1
        },
    )
    .await;
    let (orderer, waiter) = if acme(&a).phase == AcmePhase::Retrying {
        (&a, &b)
    } else {
        (&b, &a)
    };
    let holder = acme(orderer)
        .ordering_node
        .expect("the orderer names itself");
    let waiting = acme(waiter);
    assert_eq!(waiting.orders_started, 0, "{waiting:?}");
    assert_eq!(waiting.ordering_node.as_deref(), Some(holder.as_str()));
    assert!(
        waiting.failures_in_row >= 1,
        "the holder's failures show: {waiting:?}"
    );
    assert!(waiting.last_error.is_some(), "{waiting:?}");
    let unready = waiter
        .client()
        .get(waiter.url("/readyz"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        unready.status(),
        503,
        "no certificate yet on the waiting node"
    );

    // The CA comes up, validating on the port of the node that does NOT order: the
    // challenge must come from the store, not from the orderer's memory.
    pebble.validate_on(waiter.running.local_addr.port());
    wait_for(orderer, "the orderer's certificate", |s| s.issued).await;
    let started = Instant::now();
    wait_for(waiter, "the waiting node's certificate", |s| s.issued).await;
    eprintln!(
        "the waiting node served the new certificate {:?} after the orderer",
        started.elapsed()
    );
    let cert = orderer.running.tls.as_ref().unwrap().cert_der();
    assert_eq!(waiter.running.tls.as_ref().unwrap().cert_der(), cert);

    // Exactly one certificate issued, by one node, in the shared audit log; every failed
    // attempt was that node's too; and pebble saw one order.
    let issued = audit_kinds(waiter, "tls.certificate_issued").await;
    assert_eq!(issued.len(), 1, "{issued:?}");
    assert_eq!(issued[0]["details"]["node"], holder.as_str());
    let failed = audit_kinds(waiter, "tls.certificate_failed").await;
    assert!(!failed.is_empty());
    assert!(
        failed
            .iter()
            .all(|e| e["details"]["node"] == holder.as_str()),
        "only the lease holder ordered: {failed:?}"
    );
    assert_eq!(acme(waiter).orders_started, 0);
    assert_eq!(audit_kinds(waiter, "acme.account_created").await.len(), 1);
    let orders = pebble.log().matches("POST /order-plz").count();
    assert_eq!(orders, 1, "pebble saw one order:\n{}", pebble.log());

    // Both serve it, chained to pebble's root; the lease and the challenges are gone.
    let root = pebble.issuing_root().await;
    for node in [orderer, waiter] {
        let ready = client_for(node, &root)
            .get(url(node, "/readyz"))
            .send()
            .await
            .expect("the served chain leads to pebble's root and names the domain");
        assert_eq!(ready.status(), 200);
        let body: serde_json::Value = ready.json().await.unwrap();
        assert_eq!(body["acme"]["state"], "valid");
    }
    assert_eq!(secrets_named(&pg, "acme/challenge/"), 0);
    assert_eq!(secrets_named(&pg, "acme/order/"), 0);

    // A node started afterwards serves the stored certificate at once and orders nothing.
    let c = node(&pg, &env, Some(&a), now).await;
    assert_eq!(c.running.tls.as_ref().unwrap().cert_der(), cert);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(acme(&c).orders_started, 0);
    assert_eq!(acme(&c).phase, AcmePhase::Valid);
    let ready = client_for(&c, &root)
        .get(url(&c, "/readyz"))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);
    assert_eq!(audit_kinds(&c, "tls.certificate_issued").await.len(), 1);
    assert_eq!(pebble.log().matches("POST /order-plz").count(), 1);
    for node in [a, b, c] {
        node.stop().await;
    }
}

/// An `acme` node whose CA cannot be reached (its orders fail at once) and whose retries
/// wait `retry`.
fn unreachable_ca(retry: &str) -> Vec<(&'static str, String)> {
    vec![
        ("GATEHOUSE_DOMAIN", format!("{DOMAIN},api.{DOMAIN}")),
        (
            "GATEHOUSE_ACME_DIRECTORY",
            format!("https://127.0.0.1:{}/dir", free_port()),
        ),
        ("GATEHOUSE_ACME_RETRY", retry.to_string()),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_left_by_a_stopped_node_is_taken_over_once_it_expires() {
    let Some(pg) = Postgres::start("acme_cluster::takeover") else {
        return;
    };
    let env = unreachable_ca("1h");
    let now = system_now_ms();
    let a = node(&pg, &env, None, now).await;
    wait_for(&a, "a first failed order", |s| s.failures_in_row == 1).await;
    let holder = acme(&a).ordering_node.unwrap();
    let key = a.config.master_key.path.clone();
    let dir = a.stop().await;

    // A's lease holds through its hour of backoff (and a minute's grace): B waits.
    let b_dir = tempfile::tempdir().unwrap();
    std::fs::copy(&key, b_dir.path().join("gatehouse.redb.key")).unwrap();
    drop(dir);
    let mut b_env: Vec<(&str, String)> = vec![
        ("GATEHOUSE_STORAGE", pg.url()),
        (
            "GATEHOUSE_STORAGE_PASSWORD_FILE",
            pg.password_file().display().to_string(),
        ),
    ];
    b_env.extend(env.iter().cloned());
    let b_env: Vec<(&str, &str)> = b_env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let b = spawn_app_in_at(b_dir, &b_env, now).await;
    wait_for(&b, "waiting on the stopped node's lease", |s| {
        s.phase == AcmePhase::Waiting
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let waiting = acme(&b);
    assert_eq!(waiting.orders_started, 0, "{waiting:?}");
    assert_eq!(waiting.ordering_node.as_deref(), Some(holder.as_str()));
    assert_eq!(waiting.failures_in_row, 1);

    // Past the lease's term (the hour, its jitter of up to a tenth, a minute's grace) B
    // takes it over, and the backoff goes on from A's count.
    b.clock.advance_ms(2 * 3600 * 1000);
    wait_for(&b, "the taken-over order", |s| {
        s.orders_started == 1 && s.failures_in_row == 2
    })
    .await;
    // The failure's audit record is committed a moment after the state shows it.
    let mut failed = audit_kinds(&b, "tls.certificate_failed").await;
    for _ in 0..100 {
        if failed.len() >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        failed = audit_kinds(&b, "tls.certificate_failed").await;
    }
    let attempts: Vec<(u64, String)> = failed
        .iter()
        .map(|e| {
            (
                e["details"]["attempt"].as_u64().unwrap(),
                e["details"]["node"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(attempts.len(), 2, "{failed:?}");
    assert_eq!(attempts[0], (1, holder.clone()));
    assert_eq!(attempts[1].0, 2);
    assert_ne!(attempts[1].1, holder, "another node took over");
    let second_delay = failed[1]["details"]["retry_in_seconds"].as_u64().unwrap();
    assert!((7200..=7920).contains(&second_delay), "{failed:?}");
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_data_file_a_lease_left_by_an_earlier_run_is_ignored() {
    let env = unreachable_ca("1h");
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let app = spawn_app_in(tempfile::tempdir().unwrap(), &env).await;
    wait_for(&app, "a first failed order", |s| s.failures_in_row == 1).await;
    let dir = app.stop().await;
    // The same file, a new process: no one else can hold the lease, so it orders at once
    // (and, like any restart of one node, from a fresh count).
    let app = spawn_app_in(dir, &env).await;
    wait_for(&app, "an order at once", |s| s.failures_in_row == 1).await;
    assert_eq!(acme(&app).orders_started, 1);
    assert_eq!(app.audit_events("tls.certificate_failed").len(), 2);
    app.stop().await;
}

/// A client that accepts any certificate and remembers none of it: the tests look at
/// what the server presented, as a CA's validator does, not at who signed it.
#[derive(Debug)]
struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    // A challenge certificate's critical acmeIdentifier extension makes webpki refuse
    // to parse it, so signatures are not checked here; pebble checks them end to end.
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }

    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A TLS handshake with `addr` offering `alpn`, asking for `name` (no SNI when `None`):
/// the leaf the server presented and the protocol it chose, or why it failed.
async fn handshake(
    addr: SocketAddr,
    name: Option<&str>,
    alpn: &[&[u8]],
) -> Result<(Vec<u8>, Option<Vec<u8>>), String> {
    let provider = gatehouse::tls::provider();
    let mut config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    // An IP address as the server name sends no SNI.
    let server_name = match name {
        Some(name) => rustls::pki_types::ServerName::try_from(name.to_string()).unwrap(),
        None => rustls::pki_types::ServerName::IpAddress(addr.ip().into()),
    };
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(server_name, tcp)
        .await
        .map_err(|err| err.to_string())?;
    let (_, connection) = tls.get_ref();
    let leaf = connection
        .peer_certificates()
        .and_then(|certs| certs.first())
        .map(|cert| cert.to_vec())
        .unwrap_or_default();
    Ok((leaf, connection.alpn_protocol().map(<[u8]>::to_vec)))
}

/// A challenge certificate for `name`, made the way a node makes one.
fn challenge_for(name: &str, now_ms: u64, expires_at_ms: u64) -> AcmeChallenge {
    let mut params = rcgen::CertificateParams::new(vec![name.to_string()]).unwrap();
    params.custom_extensions = vec![rcgen::CustomExtension::new_acme_identifier(&[9; 32])];
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let cert = params.self_signed(&key).unwrap();
    AcmeChallenge {
        directory: "https://ca.test/dir".into(),
        name: name.to_string(),
        cert_der: cert.der().to_vec(),
        key_pkcs8: key.serialize_der(),
        created_at_ms: now_ms,
        expires_at_ms,
    }
}

/// What a validation connection can obtain: the challenge stored for the configured name
/// it asks, over `acme-tls/1`, and nothing else — no other name's, none without SNI, none
/// once expired, and a client offering other protocols too is an ordinary client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_validation_connection_gets_only_the_stored_challenge_for_its_name() {
    const ACME_TLS: &[u8] = b"acme-tls/1";
    let env = unreachable_ca("1h");
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let app = spawn_app_in(tempfile::tempdir().unwrap(), &env).await;
    let addr = app.running.local_addr;
    let now = app.clock.now_ms();
    // The node's own order has failed (and cleared what it stored) before the test
    // stores challenges of its own.
    wait_for(&app, "the node's failed order", |s| s.failures_in_row == 1).await;

    // No order open anywhere: no validation is answered.
    let Err(err) = handshake(addr, Some(DOMAIN), &[ACME_TLS]).await else {
        panic!("a validation answered with no challenge stored");
    };
    eprintln!("no challenge: {err}");

    let challenge = challenge_for(DOMAIN, now, now + 600_000);
    let stored = challenge.clone();
    app.running
        .store
        .write(move |tx| tx.put_acme_challenge(&stored))
        .await
        .unwrap();
    let (leaf, alpn) = handshake(addr, Some(DOMAIN), &[ACME_TLS])
        .await
        .expect("the stored challenge is presented");
    assert_eq!(leaf, challenge.cert_der);
    assert_eq!(alpn.as_deref(), Some(ACME_TLS));
    // Names are compared without case, as DNS does.
    let (leaf, _) = handshake(addr, Some("GateHouse.Test"), &[ACME_TLS])
        .await
        .unwrap();
    assert_eq!(leaf, challenge.cert_der);

    // Another configured name with no challenge, a name not configured, no name at all.
    for name in [Some("api.gatehouse.test"), Some("other.test"), None] {
        assert!(
            handshake(addr, name, &[ACME_TLS]).await.is_err(),
            "{name:?} got a challenge"
        );
    }
    // A challenge stored under a name not configured is never looked up.
    let foreign = challenge_for("other.test", now, now + 600_000);
    app.running
        .store
        .write(move |tx| tx.put_acme_challenge(&foreign))
        .await
        .unwrap();
    assert!(
        handshake(addr, Some("other.test"), &[ACME_TLS])
            .await
            .is_err()
    );

    // Offering acme-tls/1 beside another protocol is no validation: the served
    // certificate, never the challenge.
    let (leaf, alpn) = handshake(addr, Some(DOMAIN), &[ACME_TLS, b"http/1.1"])
        .await
        .unwrap();
    assert_ne!(leaf, challenge.cert_der);
    assert_eq!(leaf, app.running.tls.as_ref().unwrap().cert_der());
    assert_eq!(alpn.as_deref(), Some(&b"http/1.1"[..]));

    // An expired challenge (an order that never cleaned up) is not presented.
    app.clock.advance_ms(600_001);
    assert!(handshake(addr, Some(DOMAIN), &[ACME_TLS]).await.is_err());
    app.stop().await;
}
