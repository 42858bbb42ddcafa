//! The route table (`[[routes]]`): each prefix to its app with its own policy (device,
//! admin, public), per-route rates, routes bound to a host, gatehouse's own paths kept,
//! configuration errors, and the per-route metrics and admin view. Real apps on TCP,
//! started by the tests, answer with what they received.

use std::time::Duration;

use axum::extract::Request;
use serde_json::{Value, json};

use crate::helpers::{self, TestApp};

/// An app that answers every request with its own name and what it received.
async fn echo_app(name: &'static str) -> String {
    let router = axum::Router::new().fallback(move |request: Request| async move {
        let headers: serde_json::Map<String, Value> = request
            .headers()
            .iter()
            .map(|(k, v)| (k.to_string(), json!(v.to_str().unwrap_or("?"))))
            .collect();
        axum::Json(json!({
            "app": name,
            "method": request.method().as_str(),
            "path": request.uri().path_and_query().map_or("/", |p| p.as_str()),
            "headers": headers,
        }))
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await });
    format!("http://{addr}")
}

/// A server with `routes` (TOML) in its config file, and the other settings given.
async fn with_routes(routes: &str, env: &[(&str, &str)]) -> TestApp {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("gatehouse.toml");
    std::fs::write(&file, routes).unwrap();
    let file = file.display().to_string();
    let mut env = env.to_vec();
    env.push(("GATEHOUSE_CONFIG", file.as_str()));
    helpers::spawn_app_in(dir, &env).await
}

async fn send(
    gatehouse: &TestApp,
    method: http::Method,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, Value) {
    let mut request = gatehouse.client().request(method, gatehouse.url(path));
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn get(gatehouse: &TestApp, path: &str, headers: &[(&str, &str)]) -> (u16, Value) {
    send(gatehouse, http::Method::GET, path, headers).await
}

/// Each prefix goes to its app, admitted as its route says, and the app learns who
/// called in headers only gatehouse can set.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_route_sends_its_prefix_to_its_app_under_its_own_policy() {
    let api = echo_app("api").await;
    let public = echo_app("public").await;
    let routes = format!(
        r#"
[[routes]]
path = "/api"
upstream = "{api}"
auth = "device"

[[routes]]
path = "/pub/"
upstream = "{public}"
auth = "public"
rate = "3/1m"

[[routes]]
path = "/ops"
upstream = "{api}"
auth = "admin"
"#
    );
    let gatehouse = with_routes(&routes, &[]).await;
    let device = gatehouse.pair_device().await;
    let bearer = format!("Bearer {}", device.access_token);
    let admin = gatehouse.admin_token();
    let admin_bearer = format!("Bearer {admin}");

    // device: a token or nothing reaches the app.
    let (status, body) = get(&gatehouse, "/api/items?x=1", &[]).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("unauthorized"))
    );
    let (status, body) = get(&gatehouse, "/api/items?x=1", &[("authorization", &bearer)]).await;
    assert_eq!(status, 200);
    assert_eq!(body["app"], "api");
    assert_eq!(body["path"], "/api/items?x=1");
    assert_eq!(body["headers"]["x-gatehouse-device-id"], device.device_id);
    // An admin token is not a device's.
    let (status, _) = get(
        &gatehouse,
        "/api/items",
        &[("authorization", &admin_bearer)],
    )
    .await;
    assert_eq!(status, 401);

    // public: anyone, nobody's identity, forged identities removed, limited per address.
    let (status, body) = get(
        &gatehouse,
        "/pub/page",
        &[
            ("x-gatehouse-device-id", "dev_forged"),
            ("x-gatehouse-admin", "root"),
        ],
    )
    .await;
    assert_eq!((status, body["app"].as_str()), (200, Some("public")));
    let seen = body["headers"].as_object().unwrap();
    assert!(!seen.contains_key("x-gatehouse-device-id"), "{seen:?}");
    assert!(!seen.contains_key("x-gatehouse-admin"), "{seen:?}");
    assert_eq!(get(&gatehouse, "/pub", &[]).await.0, 200);
    assert_eq!(get(&gatehouse, "/pub/x", &[]).await.0, 200);
    let (status, body) = get(&gatehouse, "/pub/x", &[]).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (429, Some("rate_limited"))
    );
    // Another route is not charged for this one's budget.
    assert_eq!(
        get(&gatehouse, "/api/x", &[("authorization", &bearer)])
            .await
            .0,
        200
    );

    // admin: an admin token passes, named to the app, and the token itself stays here.
    let (status, _) = get(&gatehouse, "/ops/deploy", &[]).await;
    assert_eq!(status, 401);
    let (status, _) = get(&gatehouse, "/ops/deploy", &[("authorization", &bearer)]).await;
    assert_eq!(status, 401, "a device token is not an admin's");
    let (status, body) = send(
        &gatehouse,
        http::Method::POST,
        "/ops/deploy",
        &[("authorization", &admin_bearer)],
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(body["method"], "POST");
    let seen = body["headers"].as_object().unwrap();
    assert!(!seen.contains_key("authorization"), "{seen:?}");
    assert!(
        seen["x-gatehouse-admin"]
            .as_str()
            .is_some_and(|id| !id.is_empty()),
        "{seen:?}"
    );

    // No route: 404; gatehouse's own paths stay gatehouse's; an ambiguous path goes
    // nowhere.
    let (status, body) = get(&gatehouse, "/elsewhere", &[("authorization", &bearer)]).await;
    assert_eq!((status, body["error"].as_str()), (404, Some("not_found")));
    let (status, body) = get(
        &gatehouse,
        "/v1/status",
        &[("authorization", &admin_bearer)],
    )
    .await;
    assert_eq!(status, 200);
    assert!(body.get("app").is_none(), "{body}");
    let raw = format!(
        "GET /pub/../api/x HTTP/1.1\r\nHost: a\r\nAuthorization: {bearer}\r\nConnection: close\r\n\r\n"
    );
    assert_eq!(raw_status_tls(&gatehouse, &raw).await, 400);

    // Counted per route, and shown to admins.
    let metrics = gatehouse.metrics().await;
    assert!(
        metrics.contains("gatehouse_front_route_responses_total{route=\"/api\",class=\"2xx\"} 2"),
        "{metrics}"
    );
    assert!(
        // The 429, and the ambiguous path under /pub.
        metrics.contains("gatehouse_front_route_responses_total{route=\"/pub\",class=\"4xx\"} 2"),
        "{metrics}"
    );
    assert!(metrics.contains("gatehouse_front_route_duration_seconds_count{route=\"/ops\"} 3"));
    let (status, view) = get(&gatehouse, "/v1/front", &[("authorization", &admin_bearer)]).await;
    assert_eq!(status, 200);
    let listed: Vec<(&str, &str, bool)> = view["routes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["route"].as_str().unwrap(),
                r["auth"].as_str().unwrap(),
                r["reachable"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        listed,
        [
            ("/api", "device", true),
            ("/pub", "public", true),
            ("/ops", "admin", true)
        ]
    );
    assert_eq!(view["routes"][1]["rate"], "3/1m");
    let (status, _) = get(&gatehouse, "/v1/front", &[("authorization", &bearer)]).await;
    assert_eq!(status, 401);

    // The refusals of the route's rate are audited coalesced, under the route's name.
    gatehouse
        .running
        .services
        .limits
        .audit_refusals(&gatehouse.running.services.audit, 0)
        .await
        .unwrap();
    // So are the refused requests: one record per reason, route and address.
    gatehouse
        .running
        .services
        .audit
        .write_refusals(0)
        .await
        .unwrap();
    let mut refused: Vec<(String, String, u64)> = gatehouse
        .audit_events("front.refused")
        .iter()
        .map(|e| {
            (
                e.details["route"].as_str().unwrap().to_string(),
                e.details["reason"].as_str().unwrap().to_string(),
                e.details["refused"].as_u64().unwrap(),
            )
        })
        .collect();
    refused.sort();
    let expected: Vec<(String, String, u64)> = [
        ("/api", "invalid_token", 1),
        ("/api", "no_token", 1),
        ("/ops", "invalid_token", 1),
        ("/ops", "no_token", 1),
        ("/pub", "invalid_request", 1),
    ]
    .iter()
    .map(|(r, why, n)| (r.to_string(), why.to_string(), *n))
    .collect();
    assert_eq!(refused, expected);
    let exceeded = gatehouse.audit_events("ratelimit.exceeded");
    assert!(
        exceeded
            .iter()
            .any(|e| e.details["policy"] == "route /pub" && e.details["refused"] == 1),
        "{exceeded:?}"
    );
    gatehouse.stop().await;
}

/// Sends `raw` over TLS and returns the answer's status code.
async fn raw_status_tls(gatehouse: &TestApp, raw: &str) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tls = crate::ws::tls_stream(gatehouse).await;
    tls.write_all(raw.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut answer)).await;
    let text = String::from_utf8_lossy(&answer);
    text.split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// A route bound to a host takes every path it covers on that host, gatehouse's
/// included, and nothing on any other host.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_bound_to_a_host_takes_that_host_only() {
    let app = echo_app("app").await;
    let routes = format!(
        r#"
[[routes]]
host = "app.example.test"
path = "/"
upstream = "{app}"
auth = "public"
"#
    );
    let gatehouse = with_routes(&routes, &[("GATEHOUSE_LOCKOUT_MAX_FAILURES", "2")]).await;
    let (status, body) = get(
        &gatehouse,
        "/v1/status",
        &[("host", "App.Example.Test:8443")],
    )
    .await;
    assert_eq!((status, body["app"].as_str()), (200, Some("app")));
    assert_eq!(body["path"], "/v1/status");
    assert_eq!(body["headers"]["x-forwarded-host"], "App.Example.Test:8443");
    // On gatehouse's own host, gatehouse answers; other paths there have no route.
    let (status, body) = get(&gatehouse, "/v1/status", &[]).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("unauthorized"))
    );
    let (status, _) = get(&gatehouse, "/anything", &[]).await;
    assert_eq!(status, 404);
    let (status, _) = get(&gatehouse, "/anything", &[("host", "other.example.test")]).await;
    assert_eq!(status, 404);
    // The app's /healthz is the app's: a banned address is refused there, while
    // gatehouse's own probe still answers it.
    let wrong = "Bearer gha_0123456789abcdef_not-the-secret";
    for _ in 0..3 {
        get(&gatehouse, "/v1/status", &[("authorization", wrong)]).await;
    }
    let (status, body) = get(&gatehouse, "/healthz", &[("host", "app.example.test")]).await;
    assert_eq!((status, body["error"].as_str()), (429, Some("banned")));
    assert_eq!(get(&gatehouse, "/healthz", &[]).await.0, 200);
    gatehouse.stop().await;
}

/// An admin route with the admin UI's session cookie: reads pass, a change must come
/// from our own origin, and the cookie never reaches the app.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_route_takes_the_session_cookie_but_not_from_another_site() {
    let app = echo_app("ops").await;
    let routes = format!("[[routes]]\npath = \"/ops\"\nupstream = \"{app}\"\nauth = \"admin\"\n");
    let gatehouse = with_routes(&routes, &[]).await;
    gatehouse
        .running
        .services
        .admin_users
        .add(
            "ann",
            "correct horse battery staple",
            &gatehouse::audit::Origin::system(),
        )
        .await
        .unwrap();
    let signed_in = gatehouse
        .client()
        .post(gatehouse.url("/v1/session"))
        .json(&json!({"username": "ann", "password": "correct horse battery staple"}))
        .send()
        .await
        .unwrap();
    assert_eq!(signed_in.status(), 201);
    let cookie = signed_in
        .headers()
        .get("set-cookie")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .unwrap()
        .to_string();
    let with_app_cookie = format!("theme=dark; {cookie}");
    let (status, body) = get(&gatehouse, "/ops/", &[("cookie", &with_app_cookie)]).await;
    assert_eq!(status, 200);
    assert_eq!(body["headers"]["x-gatehouse-admin"], "user:ann");
    assert_eq!(
        body["headers"]["cookie"], "theme=dark",
        "the app's cookie only"
    );

    let own = format!("https://{}", gatehouse.running.local_addr);
    let (status, _) = send(
        &gatehouse,
        http::Method::POST,
        "/ops/restart",
        &[
            ("cookie", &cookie),
            ("origin", &own),
            ("sec-fetch-site", "same-origin"),
        ],
    )
    .await;
    assert_eq!(status, 200, "a change from our own origin");
    let (status, body) = send(
        &gatehouse,
        http::Method::POST,
        "/ops/restart",
        &[
            ("cookie", &cookie),
            ("origin", "https://evil.example"),
            ("sec-fetch-site", "cross-site"),
        ],
    )
    .await;
    assert_eq!((status, body["error"].as_str()), (403, Some("csrf")));
    assert_eq!(gatehouse.audit_events("csrf.refused").len(), 1);
    gatehouse.stop().await;
}

/// Routes that would shadow gatehouse's paths, or name no app, never start.
#[test]
fn a_route_table_that_shadows_or_names_nothing_is_refused_with_the_reason() {
    for (routes, says) in [
        (
            "[[routes]]\npath = \"/v1/app\"\nupstream = \"http://127.0.0.1:9\"\nauth = \"device\"\n",
            "overlaps /v1",
        ),
        (
            "[[routes]]\npath = \"/api\"\nauth = \"device\"\n",
            "names no upstream",
        ),
        (
            "[[routes]]\npath = \"/api\"\nupstream = \"http://127.0.0.1:9\"\n",
            "`auth` is missing",
        ),
        ("routes = \"/api\"\n", "list of tables"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("gatehouse.toml");
        std::fs::write(&file, routes).unwrap();
        let env = gatehouse::config::Env(
            [("GATEHOUSE_CONFIG".to_string(), file.display().to_string())].into(),
        );
        let flags = gatehouse::config::Flags::default()
            .with("--data", dir.path().join("g.redb").display().to_string());
        let err = gatehouse::config::Config::load(&flags, &env)
            .expect_err(routes)
            .to_string();
        assert!(err.contains(says), "{routes}: {err}");
    }
}

/// A WebSocket on a public route is relayed without a token and names nobody to the
/// app; on a device route of the same table it still needs one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_public_route_relays_websockets_for_anyone() {
    use futures_util::SinkExt;
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let app = crate::front::ws_app(std::sync::Arc::default()).await;
    let routes = format!(
        "[[routes]]\npath = \"/lobby\"\nupstream = \"{app}\"\nauth = \"public\"\n\n\
         [[routes]]\npath = \"/room\"\nupstream = \"{app}\"\nauth = \"device\"\n"
    );
    let gatehouse = with_routes(&routes, &[]).await;
    let open = |path: &'static str| {
        let gatehouse = &gatehouse;
        async move {
            let request = format!("wss://{}{path}", gatehouse.running.local_addr)
                .into_client_request()
                .unwrap();
            let tls = crate::ws::tls_stream(gatehouse).await;
            tokio_tungstenite::client_async(request, tls).await
        }
    };
    let (mut socket, _) = open("/lobby").await.expect("a public socket opens");
    socket.send(Message::text("hello")).await.unwrap();
    let echo = crate::front::next_text(&mut socket).await;
    assert_eq!(echo, "none: hello", "the app was told of no device");
    match open("/room").await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 401);
        }
        other => panic!("expected a 401, got {other:?}"),
    }
    let opened = gatehouse.audit_events("front.socket_opened");
    assert_eq!(opened.len(), 1);
    assert_eq!(opened[0].details["route"], "/lobby");
    assert_eq!(opened[0].actor, "anonymous");
    gatehouse.stop().await;
}
