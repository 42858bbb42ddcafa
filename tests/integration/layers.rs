//! The shape of the code, checked: no import cycle between sibling modules anywhere,
//! and calls at the top level flowing one way, from the edges (CLI, HTTP, app) through
//! the wiring (services, schedule) to the domain, the store and the leaves.
//!
//! The module graph is read from the sources: every `crate::…` and `super::…` path in a
//! file is an edge from the file's module to the deepest module the path names (test
//! modules excluded). An edge between two modules is counted between their ancestors
//! that are siblings, so `http::oauth → services` is `http → services` at the top
//! level. `cargo test --test integration layers` is the command that proves it; the
//! store and the clock are crates of their own, so the compiler already keeps them below
//! everything else.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The top-level modules of `src/`, by layer, lowest first. A module may use modules of
/// its own layer or of lower ones; within a layer the only rule is no cycle.
const LAYERS: &[(&str, &[&str])] = &[
    (
        "leaves",
        &[
            "error_kind",
            "ids",
            "config",
            "jwt",
            "dpop",
            "qr",
            "clock",
            "store",
        ],
    ),
    (
        "domain",
        &[
            "audit",
            "admin_tokens",
            "admin_users",
            "admin_sessions",
            "clients",
            "keys",
            "revocation",
            "status_list",
            "live",
            "tokens",
            "pairing",
            "device_grants",
            "devices",
            "ratelimit",
            "backup",
            "tls",
        ],
    ),
    ("wiring", &["services", "schedule", "status"]),
    (
        "edges",
        &[
            "manage",
            "admin_socket",
            "http",
            "front",
            "app",
            "cli",
            "systemd",
            "telemetry",
        ],
    ),
];

type Module = Vec<String>;

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read a source directory") {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs")
            && path.file_name().is_some_and(|n| n != "tests.rs")
        {
            out.push(path);
        }
    }
}

/// `src/a/b.rs` and `src/a/b/mod.rs` are `a::b`; `src/lib.rs` is the crate root.
fn module_of(root: &Path, file: &Path) -> Module {
    let rel = file.strip_prefix(root).expect("under the root");
    let mut parts: Vec<String> = rel
        .with_extension("")
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if parts.last().is_some_and(|p| p == "mod") {
        parts.pop();
    }
    if parts == ["lib"] || parts == ["main"] {
        parts.clear();
    }
    parts
}

/// The code of a file without its unit tests and comment lines.
fn code(text: &str) -> String {
    let body = text
        .split("#[cfg(test)]\nmod tests")
        .next()
        .unwrap_or_default();
    body.lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// Every path that starts with `crate::` or `super::` in `code`, as its segments from
/// the crate root (for `super`, relative to `module`); a `{a, b::c}` group gives one
/// path per item.
fn paths(code: &str, module: &Module) -> Vec<Module> {
    let mut out = Vec::new();
    let bytes: Vec<char> = code.chars().collect();
    let mut i = 0;
    while i < bytes.len() {
        let starts = |word: &str| {
            let w: Vec<char> = word.chars().collect();
            bytes[i..].starts_with(&w) && (i == 0 || !is_ident(bytes[i - 1]))
        };
        let (mut base, skip) = if starts("crate::") {
            (Vec::new(), "crate::".len())
        } else if starts("super::") {
            (
                module[..module.len().saturating_sub(1)].to_vec(),
                "super::".len(),
            )
        } else {
            i += 1;
            continue;
        };
        i += skip;
        loop {
            let start = i;
            while i < bytes.len() && is_ident(bytes[i]) {
                i += 1;
            }
            let segment: String = bytes[start..i].iter().collect();
            if segment == "super" {
                base.pop();
            } else if !segment.is_empty() {
                base.push(segment);
            }
            let group = if bytes[i..].starts_with(&['{']) {
                Some(1)
            } else if bytes[i..].starts_with(&[':', ':', '{']) {
                Some(3)
            } else {
                None
            };
            if let Some(skip) = group {
                i += skip;
                let close = bytes[i..].iter().position(|&c| c == '}').unwrap_or(0);
                let group: String = bytes[i..i + close].iter().collect();
                for item in group.split(',') {
                    let first = item.trim().split("::").next().unwrap_or_default();
                    if !first.is_empty() && first != "self" {
                        let mut path = base.clone();
                        path.push(first.trim().to_string());
                        out.push(path);
                    }
                }
                out.push(base);
                break;
            }
            if bytes[i..].starts_with(&[':', ':']) {
                i += 2;
                continue;
            }
            out.push(base);
            break;
        }
    }
    out
}

/// Edges between sibling modules: (parent, from, to).
fn sibling_edges(root: &Path) -> BTreeSet<(Module, String, String)> {
    let mut files = Vec::new();
    rust_files(root, &mut files);
    let modules: BTreeMap<Module, PathBuf> = files
        .iter()
        .map(|f| (module_of(root, f), f.clone()))
        .collect();
    let deepest = |path: &Module| -> Option<Module> {
        (1..=path.len())
            .rev()
            .map(|n| path[..n].to_vec())
            .find(|m| modules.contains_key(m))
    };
    let mut edges = BTreeSet::new();
    for (module, file) in &modules {
        let text = std::fs::read_to_string(file).expect("read a source file");
        for path in paths(&code(&text), module) {
            let Some(target) = deepest(&path) else {
                continue;
            };
            let common = module
                .iter()
                .zip(&target)
                .take_while(|(a, b)| a == b)
                .count();
            if common == module.len() || common == target.len() {
                continue; // an ancestor or a descendant: not a sibling
            }
            edges.insert((
                module[..common].to_vec(),
                module[common].clone(),
                target[common].clone(),
            ));
        }
    }
    edges
}

/// A cycle among `nodes` under `edges`, if there is one.
fn find_cycle(edges: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        edges: &BTreeMap<String, BTreeSet<String>>,
        stack: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = stack.iter().position(|n| n == node) {
            let mut cycle = stack[at..].to_vec();
            cycle.push(node.to_string());
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        stack.push(node.to_string());
        for next in edges.get(node).into_iter().flatten() {
            if let Some(cycle) = visit(next, edges, stack, done) {
                return Some(cycle);
            }
        }
        stack.pop();
        done.insert(node.to_string());
        None
    }
    let mut done = BTreeSet::new();
    edges
        .keys()
        .find_map(|node| visit(node, edges, &mut Vec::new(), &mut done))
}

fn source_roots() -> Vec<PathBuf> {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    vec![
        manifest.join("src"),
        manifest.join("crates/store/src"),
        manifest.join("crates/clock/src"),
    ]
}

#[test]
fn no_two_sibling_modules_import_each_other_even_through_others() {
    for root in source_roots() {
        let mut levels: BTreeMap<Module, BTreeMap<String, BTreeSet<String>>> = BTreeMap::new();
        for (parent, from, to) in sibling_edges(&root) {
            levels
                .entry(parent)
                .or_default()
                .entry(from)
                .or_default()
                .insert(to);
        }
        for (parent, edges) in &levels {
            assert!(
                find_cycle(edges).is_none(),
                "{}: an import cycle among the modules of `{}`: {}",
                root.display(),
                if parent.is_empty() {
                    "the crate root".to_string()
                } else {
                    parent.join("::")
                },
                find_cycle(edges).unwrap_or_default().join(" -> ")
            );
        }
    }
}

#[test]
fn top_level_calls_flow_from_the_edges_to_the_leaves() {
    let layer_of = |module: &str| {
        LAYERS
            .iter()
            .position(|(_, members)| members.contains(&module))
    };
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&root, &mut files);
    for file in &files {
        let module = module_of(&root, file);
        if let Some(top) = module.first() {
            assert!(
                layer_of(top).is_some(),
                "{top} is in no layer of tests/integration/layers.rs: add it where it belongs \
                 (and to docs/ARCHITECTURE.md)"
            );
        }
    }
    for (parent, from, to) in sibling_edges(&root) {
        if !parent.is_empty() {
            continue;
        }
        let (Some(from_layer), Some(to_layer)) = (layer_of(&from), layer_of(&to)) else {
            continue;
        };
        assert!(
            to_layer <= from_layer,
            "{from} ({}) uses {to} ({}): calls must flow down, from the edges to the leaves",
            LAYERS[from_layer].0,
            LAYERS[to_layer].0
        );
    }
}

#[test]
fn the_checker_sees_a_cycle_and_an_upward_call() {
    let module: Module = vec!["http".into(), "oauth".into()];
    let found = paths(
        "use super::{error::ApiError, AppState};\nuse crate::tokens::X;",
        &module,
    );
    assert!(
        found.contains(&vec!["http".into(), "error".into()]),
        "{found:?}"
    );
    assert!(
        found.contains(&vec!["tokens".into(), "X".into()]),
        "{found:?}"
    );
    let edges: BTreeMap<String, BTreeSet<String>> = [
        ("a".to_string(), BTreeSet::from(["b".to_string()])),
        ("b".to_string(), BTreeSet::from(["c".to_string()])),
        ("c".to_string(), BTreeSet::from(["a".to_string()])),
    ]
    .into_iter()
    .collect();
    assert_eq!(
        find_cycle(&edges),
        Some(vec!["a".into(), "b".into(), "c".into(), "a".into()])
    );
}
