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
