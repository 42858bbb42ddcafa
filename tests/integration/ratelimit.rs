//! Rate limits survive a restart: windows are written behind and loaded at start.

use crate::helpers;

async fn attempt(app: &helpers::TestApp) -> reqwest::Response {
    app.client()
        .post(app.url("/v1/pair"))
        .json(&serde_json::json!({
            "session_id": "ps_00000000000000000000000000000000",
            "secret": "wrong",
            "device": {"name": "x", "platform": "ios", "app_version": "1"},
        }))
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn a_pairing_budget_of_ten_a_minute_survives_a_restart() {
    let app = helpers::spawn_app().await;
    for i in 0..8 {
        assert_eq!(attempt(&app).await.status(), 401, "attempt {i}");
    }
    // A restart on the same data file (the clock stands still).
    let dir = app.stop().await;
    let app = helpers::spawn_app_in(dir, &[]).await;
    assert_eq!(attempt(&app).await.status(), 401, "9th");
    assert_eq!(attempt(&app).await.status(), 401, "10th");
    let refused = attempt(&app).await;
    assert_eq!(refused.status(), 429, "11th");
    let headers = refused.headers().clone();
    assert_eq!(headers["retry-after"], "6");
    assert_eq!(headers["ratelimit-policy"], "\"pairing\";q=10;w=60");
    assert_eq!(headers["ratelimit"], "\"pairing\";r=0;t=60");
    let body: serde_json::Value = refused.json().await.unwrap();
    assert_eq!(body["error"], "rate_limited");

    // Six seconds later exactly one more attempt is allowed.
    app.clock.advance_ms(6_000);
    assert_eq!(attempt(&app).await.status(), 401);
    assert_eq!(attempt(&app).await.status(), 429);
    app.stop().await;
}

#[tokio::test]
async fn the_pairing_limit_is_configurable_and_per_address() {
    let app = helpers::spawn_app_with(&[("GATEHOUSE_RATELIMIT_PAIRING", "2/1h")]).await;
    assert_eq!(attempt(&app).await.status(), 401);
    assert_eq!(attempt(&app).await.status(), 401);
    let refused = attempt(&app).await;
    assert_eq!(refused.status(), 429);
    assert_eq!(refused.headers()["retry-after"], "1800");
    // A refused request spends nothing: a real pairing from another address would still
    // be counted separately; from this one it waits like any other.
    let (session, secret) = app.open_pairing_session().await;
    let response = app
        .client()
        .post(app.url("/v1/pair"))
        .json(&serde_json::json!({
            "session_id": session, "secret": secret,
            "device": {"name": "x", "platform": "ios", "app_version": "1"},
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.status(),
        429,
        "the budget applies to good secrets too"
    );
    app.stop().await;
}
