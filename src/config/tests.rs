use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use super::load::interpolate;
use super::*;

fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn load_str(text: &str, vars: &[(&str, &str)]) -> Result<Loaded, Problems> {
    load_text(Some(PathBuf::from("sb.toml")), text, &env(vars))
}

fn problems(text: &str, vars: &[(&str, &str)]) -> Vec<String> {
    load_str(text, vars)
        .expect_err("should be refused")
        .0
        .iter()
        .map(ToString::to_string)
        .collect()
}

#[test]
fn no_file_means_defaults() {
    let loaded = load_text(None, "", &HashMap::new()).unwrap();
    assert_eq!(loaded.config.bus.url, None);
    assert_eq!(loaded.config.bus.prefix, "switchboard");
    assert_eq!(loaded.config.http.listen.to_string(), "127.0.0.1:8080");
    assert_eq!(loaded.config.http.max_body_bytes, 256 * 1024);
}

#[test]
fn reads_sections_and_channels() {
    let loaded = load_str(
        r#"
[bus]
url = "amqp://guest:guest@127.0.0.1:5672/%2f"
prefix = "sb-test"
confirm_timeout = "2s"

[[channels]]
id = "site-chat"
kind = "webchat"
secret = "abc"
"#,
        &[],
    )
    .unwrap();
    let config = loaded.config;
    assert_eq!(config.bus.prefix, "sb-test");
    assert_eq!(config.bus.confirm_timeout, Duration::from_secs(2));
    assert_eq!(config.channels.len(), 1);
    assert_eq!(config.channels[0].options["secret"].as_str(), Some("abc"));
}

#[test]
fn env_overrides_file_and_keeps_types() {
    let loaded = load_str(
        "[bus]\nprefix = \"from-file\"\n[http]\nmax_body_bytes = 10\n",
        &[
            ("SWITCHBOARD__BUS__PREFIX", "from-env"),
            ("SWITCHBOARD__HTTP__MAX_BODY_BYTES", "2048"),
            ("SWITCHBOARD__HTTP__ADMIN_TOKEN", "1234567890123456"),
            ("SWITCHBOARD__BUS__PREFETCH", "16"),
            ("OTHER", "ignored"),
        ],
    )
    .unwrap();
    assert_eq!(loaded.config.bus.prefix, "from-env");
    assert_eq!(loaded.config.http.max_body_bytes, 2048);
    assert_eq!(loaded.config.bus.prefetch, 16);
    // A string key stays a string even when the value looks like a number.
    assert_eq!(
        loaded.config.http.admin_token.as_deref(),
        Some("1234567890123456")
    );
}

#[test]
fn env_reaches_into_a_channel_entry() {
    let loaded = load_str(
        "[[channels]]\nid = \"chat\"\nkind = \"webchat\"\n",
        &[("SWITCHBOARD__CHANNELS__0__SECRET", "from-env")],
    )
    .unwrap();
    assert_eq!(
        loaded.config.channels[0].options["secret"].as_str(),
        Some("from-env")
    );
    let errors = problems(
        "[[channels]]\nid = \"chat\"\nkind = \"webchat\"\n",
        &[("SWITCHBOARD__CHANNELS__3__SECRET", "x")],
    );
    assert!(
        errors[0].contains("env SWITCHBOARD__CHANNELS__3__SECRET"),
        "{errors:?}"
    );
}

#[test]
fn env_overrides_in_a_channel_entry_keep_their_types() {
    let loaded = load_str(
        "[[channels]]\nid = \"chat\"\nkind = \"webchat\"\nsecret = \"s\"\n",
        &[
            ("SWITCHBOARD__CHANNELS__0__MAX_BODY_BYTES", "4096"),
            ("SWITCHBOARD__CHANNELS__0__SECRET", "12345"),
        ],
    )
    .unwrap();
    assert_eq!(loaded.config.channels[0].max_body_bytes, Some(4096));
    assert_eq!(
        loaded.config.channels[0].options["secret"].as_str(),
        Some("12345"),
        "a string in the file stays a string"
    );
}

#[test]
fn env_value_of_the_wrong_type_names_the_variable() {
    let errors = problems("", &[("SWITCHBOARD__BUS__PREFETCH", "lots")]);
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(
        errors[0].starts_with("env SWITCHBOARD__BUS__PREFETCH: `bus.prefetch`"),
        "{errors:?}"
    );
}

#[test]
fn interpolates_variables_in_strings() {
    let loaded = load_str(
        "[http]\nadmin_token = \"${TOKEN}\"\n[bus]\nprefix = \"sb-${ENVIRONMENT}\"\n",
        &[("TOKEN", "0123456789abcdef0123"), ("ENVIRONMENT", "prod")],
    )
    .unwrap();
    assert_eq!(
        loaded.config.http.admin_token.as_deref(),
        Some("0123456789abcdef0123")
    );
    assert_eq!(loaded.config.bus.prefix, "sb-prod");
}

#[test]
fn interpolation_rules() {
    let vars = env(&[("A", "x")]);
    assert_eq!(interpolate("${A}-${A}", &vars).unwrap(), "x-x");
    assert_eq!(
        interpolate("$${A} costs $5", &vars).unwrap(),
        "${A} costs $5"
    );
    assert!(
        interpolate("${MISSING}", &vars)
            .unwrap_err()
            .contains("MISSING is not set")
    );
    assert!(interpolate("${A", &vars).unwrap_err().contains("unclosed"));
    assert!(
        interpolate("${A-B}", &vars)
            .unwrap_err()
            .contains("not a valid")
    );
}

#[test]
fn unset_variable_is_located() {
    let errors = problems("[http]\nadmin_token = \"${NOPE_TOKEN}\"\n", &[]);
    assert_eq!(
        errors,
        vec![
            "sb.toml:2:1: `http.admin_token` uses ${NOPE_TOKEN}, but the environment variable NOPE_TOKEN is not set"
        ]
    );
}

#[test]
fn unknown_keys_are_all_reported_with_positions() {
    let errors = problems(
        "[bus]\nprefx = \"a\"\n\n[htp]\nlisten = \"x\"\n[http]\nlisen = \"y\"\n",
        &[],
    );
    assert_eq!(errors.len(), 3, "{errors:?}");
    assert!(
        errors[0].starts_with("sb.toml:2:1: `bus.prefx` is not a known key"),
        "{errors:?}"
    );
    assert!(
        errors[1].starts_with("sb.toml:4:2: `htp` is not a known key"),
        "{errors:?}"
    );
    assert!(
        errors[2].starts_with("sb.toml:7:1: `http.lisen` is not a known key"),
        "{errors:?}"
    );
}

#[test]
fn wrong_type_names_file_line_and_key() {
    let errors = problems("[bus]\nprefix = \"ok\"\nprefetch = \"many\"\n", &[]);
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(
        errors[0].starts_with("sb.toml:3:1: `bus.prefetch` invalid type"),
        "{errors:?}"
    );
}

#[test]
fn every_type_error_is_reported_with_the_other_problems() {
    let errors = problems(
        "[bus]\nprefetch = \"many\"\nconfirm_timeout = 5\nprefixx = \"x\"\n\n[http]\nmax_body_bytes = true\n\n[[channels]]\nid = 7\nkind = \"webchat\"\n",
        &[],
    );
    assert_eq!(errors.len(), 5, "{errors:?}");
    for expected in [
        "sb.toml:2:1: `bus.prefetch` invalid type",
        "sb.toml:3:1: `bus.confirm_timeout` invalid type",
        "sb.toml:4:1: `bus.prefixx` is not a known key",
        "sb.toml:7:1: `http.max_body_bytes` invalid type",
        "sb.toml:10:1: `channels.0.id` invalid type",
    ] {
        assert!(
            errors.iter().any(|e| e.starts_with(expected)),
            "{expected} missing from {errors:?}"
        );
    }
    assert!(
        !errors.iter().any(|e| e.contains("missing field")),
        "a mistyped required key is not reported missing too: {errors:?}"
    );
}

#[test]
fn missing_required_key_is_reported() {
    let errors = problems("[[channels]]\nkind = \"webchat\"\n", &[]);
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(errors[0].contains("missing field `id`"), "{errors:?}");
    assert!(errors[0].starts_with("sb.toml:1:1"), "{errors:?}");
}

#[test]
fn syntax_error_is_located() {
    let errors = problems("[bus]\nprefix = \n", &[]);
    assert!(errors[0].starts_with("sb.toml:2:"), "{errors:?}");
    assert!(errors[0].contains("invalid TOML"), "{errors:?}");
}

#[test]
fn semantic_problems_are_all_reported() {
    let errors = problems(
        "[bus]\nurl = \"http://nope\"\nprefix = \"\"\n[http]\nadmin_token = \"short\"\n[[channels]]\nid = \"a\"\nkind = \"webchat\"\n[[channels]]\nid = \"a\"\nkind = \"webchat\"\n",
        &[],
    );
    assert_eq!(errors.len(), 4, "{errors:?}");
    assert!(
        errors[0].starts_with("sb.toml:2:1: `bus.url`"),
        "{errors:?}"
    );
    assert!(
        errors[1].starts_with("sb.toml:3:1: `bus.prefix`"),
        "{errors:?}"
    );
    assert!(
        errors[2].starts_with("sb.toml:5:1: `http.admin_token`"),
        "{errors:?}"
    );
    assert!(
        errors[3].starts_with("sb.toml:10:1: `channels.1.id`"),
        "{errors:?}"
    );
}

/// Names of exchanges and queues end at 255 bytes: a longer prefix is refused here rather
/// than failing every declare.
#[test]
fn a_prefix_is_at_most_64_bytes() {
    let long = "p".repeat(65);
    let errors = problems(&format!("[bus]\nprefix = \"{long}\"\n"), &[]);
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(errors[0].contains("must be 1 to 64"), "{errors:?}");
    assert!(load_str(&format!("[bus]\nprefix = \"{}\"\n", &long[1..]), &[]).is_ok());
    let errors = problems(
        &format!("[[channels]]\nid = \"{long}\"\nkind = \"webchat\"\n"),
        &[],
    );
    assert!(
        errors
            .iter()
            .any(|e| e.contains("channels.0.id") && e.contains("1 to 64")),
        "{errors:?}"
    );
}

#[test]
fn shipped_example_config_loads() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("deploy/switchboard.example.toml");
    let loaded = load(
        Some(&path),
        &env(&[
            (
                "SWITCHBOARD_ADMIN_TOKEN",
                "0123456789abcdef0123456789abcdef",
            ),
            ("WEBCHAT_SECRET", "s3cret"),
        ]),
    )
    .unwrap_or_else(|problems| panic!("{problems}"));
    assert!(loaded.config.bus.url.is_some());
    assert!(!loaded.config.channels.is_empty());
}

#[test]
fn state_directory_holds_the_default_database() {
    let loaded = load_text(
        None,
        "",
        &env(&[("STATE_DIRECTORY", "/var/lib/switchboard")]),
    )
    .unwrap();
    assert_eq!(
        loaded.config.store.url,
        "sqlite:///var/lib/switchboard/switchboard.db"
    );
    let loaded = load_str(
        "[store]\nurl = \"sqlite://x.db\"\n",
        &[("STATE_DIRECTORY", "/var/lib/sb")],
    )
    .unwrap();
    assert_eq!(
        loaded.config.store.url, "sqlite://x.db",
        "an explicit url wins"
    );
}

#[test]
fn a_postgres_store_is_accepted_with_a_bus() {
    for url in [
        "postgres://sb@db/switchboard",
        "postgresql://sb:pw@db:5432/switchboard",
    ] {
        let text = format!("[bus]\nurl = \"amqp://localhost\"\n\n[store]\nurl = \"{url}\"\n");
        let loaded = load_str(&text, &[]).unwrap();
        assert_eq!(loaded.config.store.url, url);
    }
}

#[test]
fn an_unknown_store_scheme_is_refused() {
    let errors = problems(
        "[bus]\nurl = \"amqp://localhost\"\n\n[store]\nurl = \"mysql://localhost/x\"\n",
        &[],
    );
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(
        errors[0].starts_with(
            "sb.toml:5:1: `store.url` must be sqlite://PATH, postgres://… or postgresql://…"
        ),
        "{errors:?}"
    );
}

#[test]
fn embedded_bus_needs_sqlite() {
    let errors = problems("[store]\nurl = \"postgres://localhost/x\"\n", &[]);
    assert!(
        errors[0].contains("must be sqlite://PATH when [bus] url is not set")
            && errors[0].contains("needs a RabbitMQ [bus] url"),
        "{errors:?}"
    );
}

#[test]
fn partitions_need_a_shared_postgres_store() {
    let errors = problems(
        "[bus]\nurl = \"amqp://localhost\"\npartitions = 4\n\n[store]\nurl = \"sqlite://x.db\"\n",
        &[],
    );
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(
        errors[0]
            .starts_with("sb.toml:6:1: `store.url` must be postgres://… with [bus] partitions"),
        "{errors:?}"
    );
    let text =
        "[bus]\nurl = \"amqp://localhost\"\npartitions = 4\n\n[store]\nurl = \"postgres://db/x\"\n";
    assert!(load_str(text, &[]).is_ok());
}
