//! The admin web UI's static files: served under `/admin/` with their types, revalidated
//! on every load, under a strict Content-Security-Policy, and free of inline code that
//! the policy would block.

use crate::helpers;

const UI_CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     img-src 'self' data:; connect-src 'self'; form-action 'self'; \
     frame-ancestors 'none'; base-uri 'none'";

/// `GET path` with a client that trusts the test server.
async fn get(app: &helpers::TestApp, path: &str) -> reqwest::Response {
    app.client().get(app.url(path)).send().await.unwrap()
}

fn header<'a>(response: &'a reqwest::Response, name: &str) -> &'a str {
    response
        .headers()
        .get(name)
        .unwrap_or_else(|| panic!("{name} is set"))
        .to_str()
        .unwrap()
}

#[tokio::test]
async fn the_page_is_html_under_a_strict_policy_without_inline_code() {
    let app = helpers::spawn_app().await;
    let response = get(&app, "/admin/").await;
    assert_eq!(response.status(), 200);
    assert_eq!(
        header(&response, "content-type"),
        "text/html; charset=utf-8"
    );
    assert_eq!(header(&response, "content-security-policy"), UI_CSP);
    assert_eq!(header(&response, "cache-control"), "no-cache");
    assert_eq!(header(&response, "x-frame-options"), "DENY");
    let html = response.text().await.unwrap();
    assert!(html.starts_with("<!doctype html>"), "an HTML document");
    assert!(
        html.contains(r#"<script type="module" src="app.js"></script>"#),
        "the page loads its one module"
    );
    assert!(html.contains(r#"<link rel="stylesheet" href="app.css">"#));
    // Every <script> element is empty (an external file), no style attribute or
    // element, no inline event handler: the policy would block each of them.
    let lower = html.to_ascii_lowercase();
    for (at, _) in lower.match_indices("<script") {
        let open_end = at + lower[at..].find('>').unwrap() + 1;
        assert!(
            lower[open_end..].starts_with("</script>"),
            "a <script> with a body at byte {at}"
        );
    }
    assert!(!lower.contains("style="), "no style attribute");
    assert!(!lower.contains("<style"), "no style element");
    assert!(
        !lower.contains(" onclick=")
            && !lower.contains(" onload=")
            && !lower.contains(" onsubmit=")
    );
    assert!(!lower.contains("javascript:"));
    // Nothing from another origin.
    assert!(!lower.contains("http://") && !lower.contains("https://"));
    app.stop().await;
}

#[tokio::test]
async fn the_script_and_style_sheet_are_served_with_their_types() {
    let app = helpers::spawn_app().await;
    for (path, content_type) in [
        ("/admin/app.js", "text/javascript; charset=utf-8"),
        ("/admin/app.css", "text/css; charset=utf-8"),
    ] {
        let response = get(&app, path).await;
        assert_eq!(response.status(), 200, "{path}");
        assert_eq!(header(&response, "content-type"), content_type, "{path}");
        assert_eq!(
            header(&response, "content-security-policy"),
            UI_CSP,
            "{path}"
        );
        assert_eq!(header(&response, "cache-control"), "no-cache", "{path}");
        assert_eq!(header(&response, "x-content-type-options"), "nosniff");
        let body = response.text().await.unwrap();
        assert!(!body.is_empty(), "{path} has a body");
    }
    let script = get(&app, "/admin/app.js").await.text().await.unwrap();
    // Data reaches the page as text only, and nothing is evaluated.
    for banned in [
        "innerHTML",
        "outerHTML",
        "insertAdjacentHTML",
        "eval(",
        "new Function",
        "document.write",
    ] {
        assert!(!script.contains(banned), "app.js uses {banned}");
    }
    app.stop().await;
}

#[tokio::test]
async fn admin_without_a_slash_redirects_and_other_paths_are_not_found() {
    // Plain HTTP on loopback, and a client that follows no redirect.
    let app = helpers::spawn_app_with(&[("GATEHOUSE_TLS", "off")]).await;
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let response = client.get(app.url("/admin")).send().await.unwrap();
    assert_eq!(response.status(), 308);
    assert_eq!(header(&response, "location"), "/admin/");
    let response = client.get(app.url("/admin/")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(header(&response, "content-security-policy"), UI_CSP);
    let response = client
        .get(app.url("/admin/nothing.js"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404);
    // The API keeps its own, stricter policy.
    let response = client.get(app.url("/healthz")).send().await.unwrap();
    assert_eq!(
        header(&response, "content-security-policy"),
        gatehouse::http::security::API_CSP
    );
    app.stop().await;
}
