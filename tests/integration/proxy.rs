//! gatehouse behind a reverse proxy on the same host (a real Caddy): with
//! `server.trusted_proxies`, bans, lockout, audit and limits apply to the client the proxy
//! forwarded, not to the proxy; health probes answer banned addresses; `/metrics` wants
//! the admin unless the real client is on loopback; one address cannot hold every
//! connection.
//!
//! Distinct clients are distinct loopback addresses (127.0.0.2, 127.0.0.3: all of
//! 127.0.0.0/8 is loopback on Linux), each bound as the client's source address.

use std::net::{IpAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::Value;

use crate::helpers::{self, TestApp};

/// A Caddy reverse proxy on a free loopback port, in front of `upstream`.
struct Caddy {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Caddy {
    fn start(upstream: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = helpers::free_port();
        let caddyfile = dir.path().join("Caddyfile");
        std::fs::write(
            &caddyfile,
            format!(
                "{{\n  admin off\n  auto_https off\n}}\n\
                 http://127.0.0.1:{port} {{\n  reverse_proxy {upstream}\n}}\n"
            ),
        )
        .unwrap();
        let child = Command::new("caddy")
            .args(["run", "--adapter", "caddyfile", "--config"])
            .arg(&caddyfile)
            .env("HOME", dir.path())
            .env("XDG_DATA_HOME", dir.path())
            .env("XDG_CONFIG_HOME", dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("caddy starts");
        let caddy = Self {
            child,
            port,
            _dir: dir,
        };
        for _ in 0..100 {
            if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return caddy;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("caddy did not listen on port {port}");
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }
}

impl Drop for Caddy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A client whose connections come from `source`.
fn client_from(source: &str) -> reqwest::Client {
    reqwest::Client::builder()
        .local_address(source.parse::<IpAddr>().unwrap())
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

fn caddy_available(test: &str) -> bool {
    helpers::tool_available(test, "caddy", &["version"], "the Debian package caddy")
}

/// A server with TLS off on loopback (the proxy's side), trusting 127.0.0.1.
async fn behind_proxy(extra: &[(&str, &str)]) -> TestApp {
    let mut env = vec![
        ("GATEHOUSE_TLS", "off"),
        ("GATEHOUSE_TRUSTED_PROXIES", "127.0.0.1/32"),
        ("GATEHOUSE_LOCKOUT_MAX_FAILURES", "3"),
    ];
    env.extend_from_slice(extra);
    helpers::spawn_app_with(&env).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_caddy_a_ban_falls_on_the_client_not_on_the_proxy() {
    if !caddy_available("behind_caddy_a_ban_falls_on_the_client_not_on_the_proxy") {
        return;
    }
    let app = behind_proxy(&[]).await;
    let caddy = Caddy::start(&app.running.local_addr.to_string());
    let attacker = client_from("127.0.0.2");
    let bystander = client_from("127.0.0.3");
    let admin = app.admin_token();

    // Wrong admin tokens from one client, through the proxy, until it is banned.
    let mut banned = false;
    for _ in 0..6 {
        let response = attacker
            .get(caddy.url("/v1/status"))
            .bearer_auth("gha_wrong")
            .send()
            .await
            .unwrap();
        if response.status() == StatusCode::TOO_MANY_REQUESTS {
            let body: Value = response.json().await.unwrap();
            assert_eq!(body["error"], "banned", "{body}");
            banned = true;
            break;
        }
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    }
    assert!(banned, "three failures ban the client");

    // The ban names the client, and everyone else goes on.
    let bans: Value = bystander
        .get(caddy.url("/v1/ratelimit/bans"))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let keys: Vec<&str> = bans["bans"]
        .as_array()
        .expect("bans")
        .iter()
        .filter_map(|b| b["key"].as_str())
        .collect();
    assert_eq!(keys, ["ip:127.0.0.2"], "{bans}");
    let status = bystander
        .get(caddy.url("/v1/status"))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap();
    assert_eq!(
        status.status(),
        StatusCode::OK,
        "another client is not banned"
    );
    let jwks = bystander
        .get(caddy.url("/.well-known/jwks.json"))
        .send()
        .await
        .unwrap();
    assert_eq!(jwks.status(), StatusCode::OK);

    // The banned client is still told whether the server is up.
    for probe in ["/healthz", "/readyz"] {
        let response = attacker.get(caddy.url(probe)).send().await.unwrap();
        assert_eq!(
            response.status(),
            StatusCode::OK,
            "{probe} answers a banned address"
        );
    }
    let refused = attacker
        .get(caddy.url("/.well-known/jwks.json"))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);

    // The audit trail names the client as the source of the failures.
    let failures = app.audit_events("login.failed");
    assert!(!failures.is_empty());
    for event in &failures {
        assert_eq!(event.source.as_deref(), Some("127.0.0.2"), "{event:?}");
    }
    drop(caddy);
    app.stop().await;
}

/// Without `server.trusted_proxies`, forwarding headers are ignored: a client cannot
/// choose its address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarding_headers_from_an_untrusted_peer_are_ignored() {
    let app = helpers::spawn_app_with(&[("GATEHOUSE_LOCKOUT_MAX_FAILURES", "2")]).await;
    for forged in ["198.51.100.1", "198.51.100.2", "198.51.100.3"] {
        let response = app
            .client()
            .get(app.url("/v1/status"))
            .bearer_auth("gha_wrong")
            .header("X-Forwarded-For", forged)
            .header("Forwarded", format!("for={forged}"))
            .send()
            .await
            .unwrap();
        assert!(
            matches!(
                response.status(),
                StatusCode::UNAUTHORIZED | StatusCode::TOO_MANY_REQUESTS
            ),
            "{}",
            response.status()
        );
    }
    let bans = app
        .running
        .services
        .lockout
        .banned("127.0.0.1".parse().unwrap());
    assert!(
        bans.is_some(),
        "the peer itself was banned, whatever it claimed"
    );
    app.stop().await;
}

/// `/metrics` is open to a loopback client only: not to a remote client forwarded by a
/// trusted proxy, and not to a loopback peer that forwards for someone undeclared.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_need_the_admin_unless_the_real_client_is_on_loopback() {
    let app = behind_proxy(&[]).await;
    let get = |xff: Option<&str>, token: Option<&str>| {
        let mut request = reqwest::Client::new().get(app.url("/metrics"));
        if let Some(xff) = xff {
            request = request.header("X-Forwarded-For", xff);
        }
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        request.send()
    };
    let status = |r: reqwest::Result<reqwest::Response>| r.unwrap().status();
    assert_eq!(
        status(get(None, None).await),
        StatusCode::OK,
        "a local scraper"
    );
    assert_eq!(
        status(get(Some("198.51.100.7"), None).await),
        StatusCode::UNAUTHORIZED,
        "a remote client through the trusted proxy"
    );
    assert_eq!(
        status(get(Some("198.51.100.7"), Some(&app.admin_token())).await),
        StatusCode::OK
    );
    assert_eq!(
        status(get(Some("127.0.0.1"), None).await),
        StatusCode::OK,
        "a loopback client through the trusted proxy"
    );
    app.stop().await;

    // A loopback peer that is not declared as a proxy but forwards for someone.
    let app = helpers::spawn_app_with(&[("GATEHOUSE_TLS", "off")]).await;
    let response = reqwest::Client::new()
        .get(app.url("/metrics"))
        .header("X-Forwarded-For", "198.51.100.7")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    app.stop().await;
}

/// Opens a plain TCP connection from `source` and says whether the server serves it
/// (a request on it is answered) or closed it at once.
async fn answered(source: &str, port: u16) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(format!("{source}:0").parse().unwrap()).unwrap();
    let mut stream = socket
        .connect(format!("127.0.0.1:{port}").parse().unwrap())
        .await
        .unwrap();
    if stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .is_err()
    {
        return false;
    }
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut buf)).await;
    read.is_ok() && buf.starts_with(b"HTTP/1.1 200")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_cannot_hold_every_connection() {
    let app = helpers::spawn_app_with(&[
        ("GATEHOUSE_TLS", "off"),
        ("GATEHOUSE_MAX_CONNECTIONS_PER_IP", "3"),
    ])
    .await;
    let port = app.running.local_addr.port();
    let held: Vec<TcpStream> = (0..3)
        .map(|_| TcpStream::connect(("127.0.0.1", port)).unwrap())
        .collect();
    // Let the server account for them.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let fourth = answered("127.0.0.1", port).await;
    assert!(
        !fourth,
        "a fourth connection from the same address is closed"
    );
    let other = answered("127.0.0.2", port).await;
    assert!(other, "another address is served");
    drop(held);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let again = answered("127.0.0.1", port).await;
    assert!(again, "closed connections give their places back");
    app.stop().await;
}
