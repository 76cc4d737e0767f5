//! `switchboard check` and `switchboard explain`, as an operator runs them.

mod common;

use std::process::Command;

use common::{repo, write_rules};

fn switchboard(args: &[&str]) -> (i32, String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .args(args)
        .current_dir(std::env::temp_dir())
        .output()
        .expect("run switchboard");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn check_accepts_the_shipped_rules_and_config() {
    let rules = repo().join("routing-rules");
    let (code, out, err) = switchboard(&["check", "--rules", rules.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains(" passed, 0 failed"), "{out}");

    let config = repo().join("deploy/switchboard.example.toml");
    let output = Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .args(["check", "-c", config.to_str().unwrap()])
        .env(
            "SWITCHBOARD_ADMIN_TOKEN",
            "0123456789abcdef0123456789abcdef",
        )
        .env("WEBCHAT_SECRET", "s3cret")
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{out}");
}

#[test]
fn check_reports_every_rule_problem_with_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    write_rules(
        dir.path(),
        &[
            (
                "10-queues.toml",
                "[[queue]]\nname = \"general\"\ndefault = true\n",
            ),
            (
                "20-rules.toml",
                "[[rule]]\nid = \"broken\"\nwhen = 'message.text.matches(\"x\" &&'\n\n[[rule]]\nid = \"nowhere\"\nroute_to = \"escalations\"\n",
            ),
        ],
    );
    let (code, out, _) = switchboard(&["check", "--rules", dir.path().to_str().unwrap()]);
    assert_eq!(code, 1, "{out}");
    let file = dir.path().join("20-rules.toml").display().to_string();
    let lines: Vec<&str> = out.lines().collect();
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with(&format!("{file}:3:")) && l.contains("invalid CEL")),
        "{out}"
    );
    assert!(
        lines.iter().any(|l| l.starts_with(&format!("{file}:7:"))
            && l.contains("route_to names queue `escalations`, which no [[queue]] defines")),
        "{out}"
    );
}

#[test]
fn check_runs_rule_tests_and_fails_on_a_wrong_expectation() {
    let dir = tempfile::tempdir().unwrap();
    write_rules(
        dir.path(),
        &[(
            "rules.toml",
            r#"
[[queue]]
name = "general"
default = true

[[queue]]
name = "billing"
skills = ["billing"]

[[rule]]
id = "refunds"
when = 'message.text.contains("refund")'
require_skills = ["billing"]

[[test]]
name = "refund to billing"
message = {channel = "email", sender = "a@example.com", text = "refund please"}
expect = {queue = "billing"}

[[test]]
name = "wrong on purpose"
message = {channel = "email", sender = "a@example.com", text = "hello"}
expect = {queue = "billing"}
"#,
        )],
    );
    let (code, out, _) = switchboard(&["check", "--rules", dir.path().to_str().unwrap()]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("1 passed, 1 failed"), "{out}");
    assert!(out.contains("rules.toml:20: test \"wrong on purpose\" failed: expected queue `billing`, got `general`"), "{out}");
}

#[test]
fn check_reports_config_problems_with_file_line_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("sb.toml");
    std::fs::write(
        &config,
        "[bus]\nprefx = \"x\"\n\n[http]\nlisten = 8080\n\n[[channels]]\nid = \"c\"\nkind = \"carrier-pigeon\"\n",
    )
    .unwrap();
    let rules = repo().join("routing-rules");
    let (code, out, _) = switchboard(&[
        "check",
        "-c",
        config.to_str().unwrap(),
        "--rules",
        rules.to_str().unwrap(),
    ]);
    assert_eq!(code, 1, "{out}");
    let path = config.display().to_string();
    assert!(
        out.contains(&format!("{path}:2:1: `bus.prefx` is not a known key")),
        "{out}"
    );
    assert!(
        out.contains(&format!("{path}:5:1: `http.listen` invalid type")),
        "{out}"
    );

    std::fs::write(&config, "[[channels]]\nid = \"c\"\nkind = \"carrier-pigeon\"\n\n[[channels]]\nid = \"d\"\nkind = \"webchat\"\nsecrett = \"x\"\n").unwrap();
    let (code, out, _) = switchboard(&[
        "check",
        "-c",
        config.to_str().unwrap(),
        "--rules",
        rules.to_str().unwrap(),
    ]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(&format!(
            "{path}:3:1: `channels.0.kind` `carrier-pigeon` is not an adapter kind"
        )),
        "{out}"
    );
    assert!(out.contains("unknown field `secrett`"), "{out}");
}

#[test]
fn explain_prints_the_decision_and_publishes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let message = dir.path().join("m.json");
    std::fs::write(
        &message,
        r#"{"message_id": "x", "customer": {"id": "v", "email": "d@example.com"}, "text": "My lawyer will call about the invoice", "attributes": {"tier": "vip"}}"#,
    )
    .unwrap();
    let rules = repo().join("routing-rules");
    let (code, out, err) = switchboard(&[
        "explain",
        "--rules",
        rules.to_str().unwrap(),
        message.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{out}{err}");
    let decision: serde_json::Value = serde_json::from_str(&out).expect("JSON output");
    assert_eq!(decision["queue"], "escalations");
    assert_eq!(
        decision["urgency"], 90,
        "legal 50 + refunds 10 + vip 30: {out}"
    );
    assert_eq!(
        decision["explanation"]["queue_reason"],
        "hard route by rule `legal`"
    );
    let matched: Vec<&str> = decision["explanation"]["rules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap())
        .collect();
    assert_eq!(matched, ["legal", "refunds", "vip"]);
    let skipped = decision["not_matched_rules"]
        .as_array()
        .expect("not_matched_rules");
    assert!(
        skipped.iter().any(|r| r["id"] == "outage"
            && r["file"].as_str().unwrap().ends_with("20-rules.toml")
            && r["line"].as_u64().unwrap() > 0),
        "{out}"
    );

    let (code, _, err) = switchboard(&[
        "explain",
        "--rules",
        rules.to_str().unwrap(),
        "/nonexistent.json",
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("cannot read /nonexistent.json"), "{err}");
}
