//! The documentation names only what exists: every test HARDENING.md cites as the proof of
//! a defence (`path/file.rs::test_name`) is a test in that file.

use std::path::Path;

/// Every `path.rs::name` in backticks in `text`.
fn cited_tests(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for quoted in text.split('`').skip(1).step_by(2) {
        if let Some((path, name)) = quoted.split_once(".rs::") {
            let name: String = name
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() && !path.contains(' ') {
                out.push((format!("{path}.rs"), name));
            }
        }
    }
    out
}

#[test]
fn every_test_hardening_md_cites_exists() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(root.join("HARDENING.md")).unwrap();
    let cited = cited_tests(&text);
    assert!(cited.len() > 50, "found only {} citations", cited.len());
    let mut missing = Vec::new();
    for (path, name) in &cited {
        let source = std::fs::read_to_string(root.join(path)).unwrap_or_default();
        let defined = ["fn ", "async fn "]
            .iter()
            .any(|prefix| source.contains(&format!("{prefix}{name}(")));
        if !defined {
            missing.push(format!("{path}::{name}"));
        }
    }
    assert!(
        missing.is_empty(),
        "HARDENING.md cites tests that do not exist: {missing:#?}"
    );
}

#[test]
fn the_citation_reader_finds_paths_and_names() {
    let found = cited_tests(
        "| x | y | `tests/integration/http.rs::a_body_over_the_limit_is_413_json` (413), \
         `src/config/tests.rs::zero_config_defaults` |",
    );
    assert_eq!(
        found,
        [
            (
                "tests/integration/http.rs".to_string(),
                "a_body_over_the_limit_is_413_json".to_string()
            ),
            (
                "src/config/tests.rs".to_string(),
                "zero_config_defaults".to_string()
            ),
        ]
    );
}

/// The README's five-minute quickstart works as printed: its shell blocks (all but the
/// one that starts the server) run in order with bash against a real server, with only
/// the port and the pasted bootstrap token substituted.
#[test]
fn the_readme_quickstart_runs_as_printed() {
    use crate::binary::{Server, gatehouse};
    for tool in ["curl", "openssl"] {
        if !crate::helpers::tool_available(
            "the_readme_quickstart_runs_as_printed",
            tool,
            &["--version"],
            &format!("the Debian package {tool}"),
        ) {
            return;
        }
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let section = readme
        .split("## Five minutes with gatehouse")
        .nth(1)
        .and_then(|rest| rest.split("\n## ").next())
        .expect("the README has its quickstart");
    let blocks: Vec<&str> = section
        .split("```sh\n")
        .skip(1)
        .filter_map(|b| b.split("```").next())
        .collect();
    assert!(blocks.len() >= 4, "{blocks:?}");
    assert_eq!(blocks[0].trim(), "cargo run --release -- serve");
    let placeholder = "ADMIN=gha_paste_the_bootstrap_token_here";
    assert!(section.contains(placeholder));

    let dir = tempfile::tempdir().unwrap();
    let port = crate::helpers::free_port();
    let mut cmd = gatehouse(&dir.path().join("gatehouse.redb"));
    cmd.args(["serve", "--listen", &format!("127.0.0.1:{port}")]);
    let server = Server::start_ok(cmd);
    let token = server.bootstrap_token.clone().expect("a first start");
    let script = blocks[1..]
        .join("\n")
        .replace("127.0.0.1:8443", &format!("127.0.0.1:{port}"))
        .replace(placeholder, &format!("ADMIN={token}"));
    let out = std::process::Command::new("bash")
        .args(["-euo", "pipefail", "-c", &script])
        .current_dir(dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the quickstart failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pin = server.pin.clone().expect("a pin");
    assert!(
        stdout.contains(&format!("sha256/{pin}")),
        "the printed pin check: {stdout}"
    );
    assert!(stdout.contains("\"keys\""), "the JWKS: {stdout}");
    assert!(stdout.contains("\"active\":true"), "{stdout}");
    assert!(
        stdout.trim_end().ends_with("{\"active\":false}"),
        "{stdout}"
    );
    drop(server);
}
