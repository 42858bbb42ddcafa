//! The loader's tests: layers, precedence, derived defaults, checks and the docs.

#![allow(clippy::unwrap_used)]
use super::*;

fn env(pairs: &[(&str, &str)]) -> Env {
    Env(pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect())
}

fn with_file(text: &str) -> (tempfile::TempDir, Flags) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gatehouse.toml");
    std::fs::write(&path, text).unwrap();
    (
        dir,
        Flags {
            config: Some(path),
            ..Flags::default()
        },
    )
}

#[test]
fn zero_config_defaults() {
    let c = Config::load(&Flags::default(), &Env::default()).unwrap();
    assert_eq!(c.server.listen.to_string(), "127.0.0.1:8443");
    assert_eq!(c.tls_mode, TlsMode::SelfSigned);
    assert_eq!(c.data_path, PathBuf::from("gatehouse.redb"));
    assert_eq!(c.master_key.path, PathBuf::from("gatehouse.redb.key"));
    assert_eq!(c.master_key.origin, KeyOrigin::BesideDataFile);
    assert_eq!(c.admin_socket, PathBuf::from("gatehouse.redb.sock"));
    assert_eq!(c.server.max_body_bytes, 65536);
}

#[test]
fn systemd_directories() {
    let e = env(&[
        ("STATE_DIRECTORY", "/var/lib/gatehouse"),
        (
            "CREDENTIALS_DIRECTORY",
            "/run/credentials/gatehouse.service",
        ),
    ]);
    let c = Config::load(&Flags::default(), &e).unwrap();
    assert_eq!(
        c.data_path,
        PathBuf::from("/var/lib/gatehouse/gatehouse.redb")
    );
    assert_eq!(
        c.master_key.path,
        PathBuf::from("/run/credentials/gatehouse.service/master-key")
    );
    assert_eq!(c.master_key.origin, KeyOrigin::SystemdCredential);
}

#[test]
fn precedence_flag_over_env_over_file() {
    let (_dir, flags) = with_file("[server]\nlisten = \"127.0.0.1:1001\"\nmax_headers = 20\n");
    let e = env(&[
        ("GATEHOUSE_LISTEN", "127.0.0.1:1002"),
        ("GATEHOUSE_MAX_HEADERS", "30"),
    ]);
    let c = Config::load(&flags, &e).unwrap();
    assert_eq!(c.server.listen.port(), 1002);
    assert_eq!(c.server.max_headers, 30);
    let flags = flags.with("--listen", "127.0.0.1:1003");
    let c = Config::load(&flags, &e).unwrap();
    assert_eq!(c.server.listen.port(), 1003);
    let c = Config::load(&flags, &Env::default()).unwrap();
    assert_eq!(c.server.max_headers, 20);
}

#[test]
fn unknown_file_key_is_named() {
    let (_dir, flags) = with_file("[server]\nlisen = \"127.0.0.1:1\"\n");
    let err = Config::load(&flags, &Env::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("server.lisen"), "{err}");
    assert!(err.contains("server.listen"), "{err}");
}

#[test]
fn unknown_section_and_top_level_key() {
    for text in ["[srever]\nlisten = \"x\"\n", "colour = \"blue\"\n"] {
        let (_dir, flags) = with_file(text);
        let err = Config::load(&flags, &Env::default()).unwrap_err();
        assert!(matches!(err, ConfigError::UnknownKey { .. }), "{err}");
    }
}

#[test]
fn unknown_env_is_named() {
    let err = Config::load(&Flags::default(), &env(&[("GATEHOUSE_LISTN", "x")]))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("GATEHOUSE_LISTN") && err.contains("GATEHOUSE_LISTEN"),
        "{err}"
    );
}

#[test]
fn bad_values_name_key_and_allowed() {
    let cases = [
        ("[tls]\nmode = \"maybe\"\n", "tls.mode", "self-signed"),
        (
            "[server]\nmax_body_bytes = 10\n",
            "server.max_body_bytes",
            "between 1024",
        ),
        (
            "[server]\nheader_read_timeout = \"forever\"\n",
            "server.header_read_timeout",
            "duration",
        ),
        (
            "[server]\nlisten = \"localhost\"\n",
            "server.listen",
            "IP:PORT",
        ),
        ("[log]\nformat = \"xml\"\n", "log.format", "json"),
        (
            "[server]\nmax_headers = true\n",
            "server.max_headers",
            "whole number",
        ),
    ];
    for (text, key, allowed) in cases {
        let (_dir, flags) = with_file(text);
        let err = Config::load(&flags, &Env::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains(key) && err.contains(allowed), "{text}: {err}");
    }
}

#[test]
fn syntax_error_names_file() {
    let (_dir, flags) = with_file("[server\n");
    let err = Config::load(&flags, &Env::default()).unwrap_err();
    assert!(matches!(err, ConfigError::FileSyntax { .. }));
}

#[test]
fn tls_off_only_on_loopback() {
    let flags = Flags::default().with("--tls", "off");
    assert!(Config::load(&flags, &Env::default()).is_ok());
    let flags = Flags::default()
        .with("--tls", "off")
        .with("--listen", "[::1]:8080");
    assert!(Config::load(&flags, &Env::default()).is_ok());
    let flags = Flags::default()
        .with("--tls", "off")
        .with("--listen", "0.0.0.0:8080");
    let err = Config::load(&flags, &Env::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("loopback"), "{err}");
}

#[test]
fn a_domain_means_acme_on_443_with_the_redirect_on_80() {
    let c = Config::load(
        &Flags::default(),
        &env(&[("GATEHOUSE_DOMAIN", "Auth.Example.com., b.example.com")]),
    )
    .unwrap();
    assert_eq!(c.tls_mode, TlsMode::Acme);
    assert_eq!(c.tls.domains, ["auth.example.com", "b.example.com"]);
    assert_eq!(c.server.listen, "[::]:443".parse().unwrap());
    assert_eq!(c.server.http_listen, Some("[::]:80".parse().unwrap()));
    assert_eq!(c.tls.acme.directory, values::LETSENCRYPT);
    assert_eq!(
        crate::services::issuer(&c, c.server.listen),
        "https://auth.example.com"
    );
    // Another port: no redirect by default, and the issuer names the port.
    let flags = Flags::default()
        .with("--listen", "127.0.0.1:5001")
        .with("--domain", "a.example")
        .with("--acme-email", "ops@example.com")
        .with("--acme-directory", "letsencrypt-staging");
    let c = Config::load(&flags, &Env::default()).unwrap();
    assert_eq!(c.server.http_listen, None);
    assert_eq!(c.tls.acme.contact, ["mailto:ops@example.com"]);
    assert_eq!(c.tls.acme.directory, values::LETSENCRYPT_STAGING);
    assert_eq!(
        crate::services::issuer(&c, c.server.listen),
        "https://a.example:5001"
    );
    // A file may list the names.
    let (_dir, flags) = with_file("[tls]\ndomains = [\"x.example\", \"y.example\"]\n");
    let c = Config::load(&flags, &Env::default()).unwrap();
    assert_eq!(c.tls.domains, ["x.example", "y.example"]);
}

#[test]
fn bad_tls_settings_are_refused_with_a_reason() {
    let cases: &[(&[(&str, &str)], &str)] = &[
        (
            &[("GATEHOUSE_DOMAIN", "*.example.com")],
            "not a domain name",
        ),
        (&[("GATEHOUSE_DOMAIN", "192.0.2.1")], "not a domain name"),
        (&[("GATEHOUSE_DOMAIN", "localhost")], "not a domain name"),
        (&[("GATEHOUSE_DOMAIN", "a..example")], "not a domain name"),
        (&[("GATEHOUSE_DOMAIN", "-a.example")], "not a domain name"),
        (&[("GATEHOUSE_DOMAIN", " , ")], "at least one domain"),
        (&[("GATEHOUSE_TLS", "acme")], "needs a domain"),
        (&[("GATEHOUSE_TLS", "files")], "needs tls.cert_file"),
        (
            &[
                ("GATEHOUSE_TLS", "files"),
                ("GATEHOUSE_TLS_CERT_FILE", "/x.pem"),
            ],
            "needs tls.cert_file",
        ),
        (
            &[("GATEHOUSE_TLS_CERT_FILE", "/x.pem")],
            "only with tls.mode",
        ),
        (
            &[("GATEHOUSE_ACME_DIRECTORY", "http://ca.example/dir")],
            "https URL",
        ),
        (&[("GATEHOUSE_ACME_EMAIL", "not-an-address")], "email"),
        (&[("GATEHOUSE_ACME_EMAIL", "a@b")], "email"),
        (&[("GATEHOUSE_ACME_RETRY", "0s")], "between"),
        (&[("GATEHOUSE_HTTP_LISTEN", "port80")], "IP:PORT"),
        (
            &[
                ("GATEHOUSE_CORS_ALLOWED_ORIGINS", "*"),
                ("GATEHOUSE_CORS_ALLOW_CREDENTIALS", "true"),
            ],
            "refused with cors.allow_credentials",
        ),
        (
            &[("GATEHOUSE_CORS_ALLOWED_ORIGINS", "https://app.example.com/")],
            "not an origin",
        ),
        (
            &[("GATEHOUSE_CORS_ALLOWED_ORIGINS", "app.example.com")],
            "not an origin",
        ),
        (
            &[("GATEHOUSE_CORS_ALLOW_CREDENTIALS", "yes")],
            "allowed values",
        ),
        (&[("GATEHOUSE_SESSION_IDLE", "10s")], "between"),
        (&[("GATEHOUSE_ACME_EAB_KID", "kid-1")], "needs both"),
        (
            &[("GATEHOUSE_ACME_EAB_KEY_FILE", "/etc/gatehouse/eab.key")],
            "needs both",
        ),
        (
            &[
                ("GATEHOUSE_TLS", "off"),
                ("GATEHOUSE_HTTP_LISTEN", "127.0.0.1:8080"),
            ],
            "tls.mode is \"off\"",
        ),
        (&[("GATEHOUSE_HTTP_LISTEN", "127.0.0.1:8443")], "are both"),
    ];
    for (vars, expected) in cases {
        let err = Config::load(&Flags::default(), &env(vars))
            .unwrap_err()
            .to_string();
        assert!(err.contains(expected), "{vars:?}: {err}");
    }
    let many: Vec<String> = (0..101).map(|i| format!("n{i}.example")).collect();
    let err = Config::load(
        &Flags::default(),
        &env(&[("GATEHOUSE_DOMAIN", &many.join(","))]),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("at most 100"), "{err}");
}

#[test]
fn the_packaged_file_loads_and_shows_every_setting_in_its_section() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/gatehouse.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    let flags = Flags {
        config: Some(path),
        ..Flags::default()
    };
    let c = Config::load(&flags, &Env::default()).unwrap();
    assert_eq!(c.data_path, Path::new("/var/lib/gatehouse/gatehouse.redb"));
    assert_eq!(c.admin_socket, Path::new("/run/gatehouse/admin.sock"));
    let mut section = String::new();
    let mut shown = std::collections::BTreeSet::new();
    for line in text.lines() {
        let line = line.trim();
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = format!("{name}.");
        } else if let Some((key, _)) = line.trim_start_matches('#').split_once(" = ") {
            shown.insert(format!("{section}{key}"));
        }
    }
    for s in SETTINGS {
        assert!(
            shown.contains(s.key),
            "{} is not in packaging/gatehouse.toml",
            s.key
        );
    }
}

#[test]
fn a_data_path_named_above_the_file_brings_its_own_socket() {
    let (_dir, flags) = with_file(
        "data = \"/var/lib/gatehouse/gatehouse.redb\"\n[admin]\nsocket = \"/run/g.sock\"\n",
    );
    let c = Config::load(&flags, &Env::default()).unwrap();
    assert_eq!(c.admin_socket, Path::new("/run/g.sock"));
    let flags = flags.with("--data", "/tmp/drill/x.redb");
    let c = Config::load(&flags, &Env::default()).unwrap();
    assert_eq!(c.admin_socket, Path::new("/tmp/drill/x.redb.sock"));
    let c = Config::load(
        &flags,
        &env(&[("GATEHOUSE_ADMIN_SOCKET", "/run/other.sock")]),
    )
    .unwrap();
    assert_eq!(c.admin_socket, Path::new("/run/other.sock"));
}

#[test]
fn a_systemd_credential_outranks_a_key_file_named_in_the_file_only() {
    let (_dir, flags) = with_file("master_key_file = \"/etc/gatehouse/master-key\"\n");
    let c = Config::load(&flags, &env(&[("CREDENTIALS_DIRECTORY", "/run/creds")])).unwrap();
    assert_eq!(c.master_key.path, Path::new("/run/creds/master-key"));
    assert_eq!(c.master_key.origin, KeyOrigin::SystemdCredential);
    let c = Config::load(&flags, &Env::default()).unwrap();
    assert_eq!(c.master_key.path, Path::new("/etc/gatehouse/master-key"));
    assert_eq!(c.master_key.origin, KeyOrigin::Configured);
    // Named in the environment, it outranks the credential.
    let c = Config::load(
        &flags,
        &env(&[
            ("CREDENTIALS_DIRECTORY", "/run/creds"),
            ("GATEHOUSE_MASTER_KEY_FILE", "/k"),
        ]),
    )
    .unwrap();
    assert_eq!(c.master_key.path, Path::new("/k"));
}

#[test]
fn long_socket_path_is_refused() {
    let flags = Flags::default().with("--data", format!("/{}/gatehouse.redb", "d".repeat(120)));
    assert!(matches!(
        Config::load(&flags, &Env::default()),
        Err(ConfigError::Invalid(_))
    ));
}

#[test]
fn every_setting_has_a_distinct_key_and_env() {
    let mut keys: Vec<_> = SETTINGS.iter().map(|s| s.key).collect();
    let mut envs: Vec<_> = SETTINGS.iter().map(|s| s.env).collect();
    keys.sort_unstable();
    envs.sort_unstable();
    keys.dedup();
    envs.dedup();
    assert_eq!(keys.len(), SETTINGS.len());
    assert_eq!(envs.len(), SETTINGS.len());
    assert!(SETTINGS.iter().all(|s| s.env.starts_with("GATEHOUSE_")));
}

#[test]
fn config_reference_documents_every_setting() {
    let doc = include_str!("../../schema/config.md");
    for s in SETTINGS {
        let row = doc
            .lines()
            .find(|l| l.starts_with(&format!("| `{}` |", s.key)))
            .unwrap_or_else(|| panic!("schema/config.md has no row for {}", s.key));
        assert!(row.contains(&format!("`{}`", s.env)), "{}: {row}", s.env);
        match s.flag {
            Some(flag) => assert!(row.contains(&format!("`{flag}")), "{flag}: {row}"),
            None => assert!(row.contains("| — |"), "{} has no flag: {row}", s.key),
        }
        if let Builtin::Value(default) = s.default {
            assert!(row.contains(default), "{}: default {default}: {row}", s.key);
        }
    }
}

#[test]
fn every_built_in_default_is_accepted_by_its_own_parser() {
    let mut config = Config::default();
    for s in SETTINGS {
        if let Builtin::Value(text) = s.default {
            assert!(s.apply(&mut config, text).is_ok(), "{}: {text}", s.key);
        }
        assert!(!s.describe().is_empty() && !s.doc.is_empty(), "{}", s.key);
    }
}

#[test]
fn each_value_says_which_layer_it_came_from() {
    let (_dir, flags) = with_file("[server]\nmax_headers = 20\n");
    let flags = flags.with("--listen", "127.0.0.1:1003");
    let c = Config::load(&flags, &env(&[("GATEHOUSE_LOG", "debug")])).unwrap();
    assert!(matches!(c.origin_of("server.max_headers"), Layer::File(_)));
    assert_eq!(c.origin_of("server.listen"), &Layer::Flag("--listen"));
    assert_eq!(c.origin_of("log.level"), &Layer::Env("GATEHOUSE_LOG"));
    assert_eq!(c.origin_of("server.idle_timeout"), &Layer::Default);
}

#[test]
fn toml_values_in_their_natural_type_are_read_as_the_setting_says() {
    let (_dir, flags) = with_file(
        "[cors]\nallow_credentials = false\nallowed_origins = [\"https://a.example\"]\n\
         [server]\nmax_headers = 20\n",
    );
    let c = Config::load(&flags, &Env::default()).unwrap();
    assert!(!c.cors.allow_credentials);
    assert_eq!(c.cors.allowed_origins, ["https://a.example"]);
    assert_eq!(c.server.max_headers, 20);
    // A boolean where a number is wanted, and a float: refused, with no Rust debug text.
    for (text, key) in [
        ("[server]\nmax_headers = true\n", "server.max_headers"),
        ("[server]\nmax_headers = 20.5\n", "server.max_headers"),
        (
            "[cors]\nallow_credentials = 1979-05-27\n",
            "cors.allow_credentials",
        ),
    ] {
        let (_dir, flags) = with_file(text);
        let err = Config::load(&flags, &Env::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains(key), "{err}");
        for debug in ["Boolean(", "Float(", "Datetime(", "Integer("] {
            assert!(!err.contains(debug), "{err}");
        }
    }
}

#[test]
fn a_mistyped_key_suggests_the_nearest_known_one() {
    let (_dir, flags) = with_file("[server]\nlisen = \"127.0.0.1:1\"\n");
    let err = Config::load(&flags, &Env::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("did you mean `server.listen`"), "{err}");
    let err = Config::load(&Flags::default(), &env(&[("GATEHOUSE_ACME_EMAL", "a@b.c")]))
        .unwrap_err()
        .to_string();
    assert!(err.contains("did you mean `GATEHOUSE_ACME_EMAIL`"), "{err}");
    // Nothing close: no guess.
    let (_dir, flags) = with_file("colour = \"blue\"\n");
    let err = Config::load(&flags, &Env::default())
        .unwrap_err()
        .to_string();
    assert!(!err.contains("did you mean"), "{err}");
}

#[test]
fn upstreams_are_parsed_with_clear_refusals() {
    assert_eq!(
        super::values::upstream_url("http://127.0.0.1:3000"),
        Ok(super::values::Upstream::Tcp("127.0.0.1:3000".into()))
    );
    assert_eq!(
        super::values::upstream_url("http://[::1]:8080/"),
        Ok(super::values::Upstream::Tcp("[::1]:8080".into()))
    );
    assert_eq!(
        super::values::upstream_url("unix:/run/app.sock"),
        Ok(super::values::Upstream::Unix("/run/app.sock".into()))
    );
    for bad in [
        "https://127.0.0.1:3000",
        "http://127.0.0.1",
        "http://127.0.0.1:3000/api",
        "http://u:p@127.0.0.1:3000",
        "unix:relative.sock",
        "127.0.0.1:3000",
        "",
    ] {
        assert!(super::values::upstream_url(bad).is_err(), "{bad}");
    }
}
