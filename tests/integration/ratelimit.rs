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

/// A damaged `rate_windows.v1` row (an empty key, a key of the wrong length, a key that is
/// not hex) is skipped at start; the good window beside it still counts.
#[tokio::test]
async fn damaged_rate_window_rows_are_skipped_at_start() {
    use redb::ReadableTable;
    let app = helpers::spawn_app().await;
    for i in 0..8 {
        assert_eq!(attempt(&app).await.status(), 401, "attempt {i}");
    }
    let data = app.data_path().to_path_buf();
    let dir = app.stop().await;
    {
        let db = redb::Database::open(&data).unwrap();
        let tx = db.begin_write().unwrap();
        {
            let mut table = tx
                .open_table(redb::TableDefinition::<&str, &[u8]>::new("rate_windows.v1"))
                .unwrap();
            let value = table
                .iter()
                .unwrap()
                .next()
                .expect("the pairing window was written at stop")
                .unwrap()
                .1
                .value()
                .to_vec();
            for key in ["", "00", "not hex", "0011"] {
                table.insert(key, value.as_slice()).unwrap();
            }
        }
        tx.commit().unwrap();
    }
    let app = helpers::spawn_app_in(dir, &[]).await;
    assert_eq!(attempt(&app).await.status(), 401, "9th");
    assert_eq!(attempt(&app).await.status(), 401, "10th");
    assert_eq!(attempt(&app).await.status(), 429, "11th");
    app.stop().await;
}
