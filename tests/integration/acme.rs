//! ACME against a real CA (`pebble.rs`), one node on a data file: a certificate is
//! ordered, validated by pebble connecting back to gatehouse's HTTPS port, served, kept
//! across restarts and renewed after an outage; External Account Binding.

use std::time::Duration;

use crate::helpers::{free_port, system_now_ms};
use crate::pebble::{DOMAIN, Pebble, acme, audit_kinds, client_for, start_app, url, wait_for};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_from_pebble_is_served_kept_across_restarts_and_survives_an_outage() {
    let test = "acme::pebble";
    let dir = tempfile::tempdir().unwrap();
    let pebble_dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let Some(mut pebble) = Pebble::start(test, pebble_dir.path(), port, None) else {
        return;
    };
    let mut env = pebble.env();
    env.push(("GATEHOUSE_LISTEN", format!("127.0.0.1:{port}")));
    let now = system_now_ms();

    // First start: nothing stored. The self-signed stand-in is served and /readyz says
    // not ready until pebble has validated (connecting back to this port) and issued.
    let app = start_app(dir, &env, now).await;
    let before = app
        .running
        .tls
        .as_ref()
        .unwrap()
        .slot
        .current()
        .info
        .clone();
    assert!(before.is_self_signed(), "the stand-in is self-signed");
    wait_for(&app, "a certificate from pebble", |s| s.issued).await;
    let root = pebble.issuing_root().await;
    let client = client_for(&app, &root);
    let ready = client
        .get(url(&app, "/readyz"))
        .send()
        .await
        .expect("the served chain leads to pebble's root and names the domain");
    assert_eq!(ready.status(), 200);
    let body: serde_json::Value = ready.json().await.unwrap();
    assert_eq!(body["tls"], "acme");
    assert_eq!(body["acme"]["state"], "valid");
    assert_eq!(body["acme"]["issued"], true);
    assert_eq!(body["certificate"]["names"][0], DOMAIN);
    let first = app.running.tls.as_ref().unwrap().cert_der();
    let issued = audit_kinds(&app, "tls.certificate_issued").await;
    assert_eq!(issued.len(), 1, "{issued:?}");
    assert_eq!(audit_kinds(&app, "acme.account_created").await.len(), 1);
    let metrics = client
        .get(url(&app, "/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("gatehouse_acme_certificate_issued 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("gatehouse_acme_certificates_issued_total 1"),
        "{metrics}"
    );

    // Restart: the stored certificate is served at once, with no new order.
    let dir = app.stop().await;
    let app = start_app(dir, &env, now).await;
    assert_eq!(app.running.tls.as_ref().unwrap().cert_der(), first);
    assert!(acme(&app).issued);
    let response = client_for(&app, &root)
        .get(url(&app, "/readyz"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(acme(&app).orders_started, 0, "no order after a restart");
    assert_eq!(audit_kinds(&app, "tls.certificate_issued").await.len(), 1);

    // CA outage: pebble stops, and the clock reaches the renewal date. The current
    // certificate keeps being served; orders fail and are retried with backoff.
    let renew_at = acme(&app).renew_at_ms.expect("a renewal date");
    let dir = app.stop().await;
    pebble.halt();
    let app = start_app(dir, &env, renew_at + 1000).await;
    assert_eq!(app.running.tls.as_ref().unwrap().cert_der(), first);
    wait_for(&app, "three failed orders", |s| s.failures_in_row >= 3).await;
    let snapshot = acme(&app);
    assert!(snapshot.issued, "the CA's certificate is still served");
    assert_eq!(format!("{:?}", snapshot.phase), "Retrying");
    assert!(snapshot.last_error.is_some());
    let failures = audit_kinds(&app, "tls.certificate_failed").await;
    let delays: Vec<u64> = failures
        .iter()
        .map(|e| e["details"]["retry_in_seconds"].as_u64().unwrap())
        .collect();
    assert!(delays.len() >= 3, "{failures:?}");
    assert_eq!(&delays[..3], &[1, 2, 4], "retries double: {failures:?}");
    let client = client_for(&app, &root);
    let ready = client.get(url(&app, "/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 200, "a renewal failing is not an outage");
    let body: serde_json::Value = ready.json().await.unwrap();
    assert_eq!(body["acme"]["state"], "retrying");
    assert!(body["acme"]["failures_in_row"].as_u64().unwrap() >= 3);
    assert!(body["acme"]["last_error"].is_string());
    assert!(body["acme"]["next_attempt"].is_string());
    assert_eq!(app.running.tls.as_ref().unwrap().cert_der(), first);

    // The CA comes back: the next retry renews, and the new certificate is served.
    pebble.resume();
    wait_for(&app, "the renewal", |s| s.certificates_issued == 1).await;
    let renewed = app.running.tls.as_ref().unwrap().cert_der();
    assert_ne!(renewed, first, "a new certificate after the outage");
    let root = pebble.issuing_root().await;
    let ready = client_for(&app, &root)
        .get(url(&app, "/readyz"))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);
    assert_eq!(acme(&app).failures_in_row, 0);
    app.stop().await;
}

/// A CA that demands External Account Binding: without it the account is refused (and
/// retried, audited); with a wrong MAC key too; with the right one a certificate is
/// issued, and the account records the binding's key id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ca_that_demands_external_account_binding_issues_only_with_it() {
    let test = "acme::eab";
    const KID: &str = "kid-1";
    const KEY: &str = "zWNDZM6eQGHWpSRTPal5eIUYFTu7EajVIoguysqZ9wG44nMEtx3MUAsUDkMTQ12W";
    let pebble_dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let Some(pebble) = Pebble::start(test, pebble_dir.path(), port, Some((KID, KEY))) else {
        return;
    };
    let mut env = pebble.env();
    env.push(("GATEHOUSE_LISTEN", format!("127.0.0.1:{port}")));
    let now = system_now_ms();

    // No binding: the CA refuses the account; nothing is issued.
    let dir = tempfile::tempdir().unwrap();
    let app = start_app(dir, &env, now).await;
    wait_for(&app, "a refused order", |s| s.failures_in_row >= 1).await;
    let error = acme(&app).last_error.unwrap();
    assert!(error.contains("externalAccountRequired"), "{error}");
    assert!(!acme(&app).issued);
    let dir = app.stop().await;

    // A wrong MAC key: refused, naming the binding.
    let wrong = pebble_dir.path().join("wrong.key");
    std::fs::write(
        &wrong,
        "b10lLJs8l1GPIzsLP0s6pMt8O0XVGnfTaCeROxQM0BIt2XrJMDHJZBM5NuQmQJQH",
    )
    .unwrap();
    let mut with_wrong = env.clone();
    with_wrong.push(("GATEHOUSE_ACME_EAB_KID", KID.to_string()));
    with_wrong.push(("GATEHOUSE_ACME_EAB_KEY_FILE", wrong.display().to_string()));
    let app = start_app(dir, &with_wrong, now).await;
    wait_for(&app, "a refused binding", |s| s.failures_in_row >= 1).await;
    let error = acme(&app).last_error.unwrap();
    assert!(
        error.contains("refused the account with its external binding"),
        "{error}"
    );
    let dir = app.stop().await;

    // The right binding: the account is registered with it and the order goes through.
    let right = pebble_dir.path().join("right.key");
    std::fs::write(&right, format!("{KEY}\n")).unwrap();
    let mut with_right = env.clone();
    with_right.push(("GATEHOUSE_ACME_EAB_KID", KID.to_string()));
    with_right.push(("GATEHOUSE_ACME_EAB_KEY_FILE", right.display().to_string()));
    let app = start_app(dir, &with_right, now).await;
    wait_for(&app, "a certificate", |s| s.issued).await;
    let root = pebble.issuing_root().await;
    let ready = client_for(&app, &root)
        .get(url(&app, "/readyz"))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);
    let accounts = audit_kinds(&app, "acme.account_created").await;
    assert!(
        accounts.iter().any(|a| a["details"]["eab_kid"] == KID),
        "{accounts:?}"
    );
    app.stop().await;
}
