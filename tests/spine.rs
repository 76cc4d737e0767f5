//! The spine end to end: webhook → bus → router → agent queue. The webhook→assignment
//! scenarios run twice: on the real RabbitMQ, and on the embedded bus (single-node mode).

#[macro_use]
mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

on_both_buses!(
    messages_land_once_in_the_rule_queue_with_priority_by_urgency,
    a_retried_post_yields_exactly_one_assignment_even_across_a_restart,
    a_crash_between_store_commit_and_ack_assigns_exactly_once,
    sigkill_under_load_loses_nothing_and_doubles_nothing,
    bad_inputs_get_clear_errors_and_publish_nothing,
    sighup_reloads_rules_and_a_bad_set_keeps_the_old_one,
);

async fn messages_land_once_in_the_rule_queue_with_priority_by_urgency(backend: Backend) {
    let prefix = prefix("route");
    let daemon = Daemon::start(DaemonConfig::on(backend, &prefix)).await;
    daemon.wait_ready().await;

    let (status, body) = daemon
        .post(
            "chat",
            &chat("m-refund", "visitor-1", "I need a refund please"),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let message_id = body["message_id"].as_str().expect("message_id").to_owned();
    let (status, _) = daemon
        .post(
            "chat",
            &chat("m-hours", "visitor-2", "What are your opening hours?"),
        )
        .await;
    assert_eq!(status, 200);
    let vip = json!({"message_id": "m-vip", "customer": {"id": "visitor-3", "email": "Vip@Example.com"},
                     "text": "REFUND NOW!! CHARGED TWICE", "attributes": {"tier": "vip"}});
    let (status, _) = daemon.post("chat", &vip.to_string()).await;
    assert_eq!(status, 200);
    // A legal threat about an invoice: hard-routed to escalations, not to billing.
    let (status, _) = daemon
        .post(
            "chat",
            &chat(
                "m-legal",
                "visitor-4",
                "My lawyer will hear about this invoice",
            ),
        )
        .await;
    assert_eq!(status, 200);

    let escalations = daemon
        .assignments("escalations", 1, Duration::from_secs(10))
        .await;
    assert_eq!(escalations.len(), 1, "{escalations:?}");
    let legal = &escalations[0].1["data"];
    assert_eq!(legal["message"]["external_id"], "m-legal");
    assert_eq!(
        legal["explanation"]["queue_reason"],
        "hard route by rule `legal`"
    );
    assert_eq!(legal["tags"], json!(["legal"]));
    assert_eq!(legal["urgency"], 60, "legal 50 + refunds 10");
    assert_eq!(escalations[0].0, 6);

    let billing = daemon
        .assignments("billing", 2, Duration::from_secs(10))
        .await;
    let general = daemon
        .assignments("general", 1, Duration::from_secs(5))
        .await;
    assert_eq!(
        billing.len(),
        2,
        "exactly the two billing messages: {billing:?}"
    );
    assert_eq!(
        general.len(),
        1,
        "exactly the one general message: {general:?}"
    );

    // The priority queue hands out the VIP refund first.
    let (vip_priority, vip_event) = &billing[0];
    let (plain_priority, plain_event) = &billing[1];
    assert_eq!(vip_event["data"]["message"]["external_id"], "m-vip");
    assert_eq!(plain_event["data"]["message"]["external_id"], "m-refund");
    assert!(
        vip_priority > plain_priority,
        "{vip_priority} > {plain_priority}"
    );

    let data = &plain_event["data"];
    assert_eq!(plain_event["specversion"], "1.0");
    assert_eq!(plain_event["type"], "switchboard.conversation.assigned");
    assert_eq!(data["queue"], "billing");
    assert_eq!(data["urgency"], 10);
    assert_eq!(data["priority"], 1);
    assert_eq!(*plain_priority, 1, "AMQP priority = urgency / 10");
    assert_eq!(data["message"]["message_id"], message_id.as_str());
    assert_eq!(data["message"]["text"], "I need a refund please");
    assert!(
        data["conversation_id"]
            .as_str()
            .is_some_and(|s| !s.is_empty())
    );
    assert!(data["customer_id"].as_str().is_some_and(|s| !s.is_empty()));
    assert_eq!(data["skills"], json!(["billing"]));
    let rules = data["explanation"]["rules"].as_array().expect("rules");
    assert_eq!(rules.len(), 1);
    assert_eq!(rules[0]["id"], "refunds");
    assert!(
        rules[0]["file"]
            .as_str()
            .unwrap()
            .ends_with("20-rules.toml")
    );
    assert!(rules[0]["line"].as_u64().unwrap() > 0);

    let vip = &vip_event["data"];
    assert_eq!(
        vip["urgency"], 57,
        "refund 10 + vip 30 + shouting 10 + negative sentiment 7: {}",
        vip["explanation"]
    );
    assert_eq!(
        vip["explanation"]["urgency"]["signal:negative_sentiment"],
        7
    );
    assert_eq!(vip["priority"], 5);
    assert_eq!(vip["context"]["customer"]["attributes"]["tier"], "vip");

    let general = &general[0].1["data"];
    assert_eq!(general["queue"], "general");
    assert_eq!(general["urgency"], 0);
    assert!(
        general["explanation"]["rules"]
            .as_array()
            .unwrap()
            .is_empty()
    );

    daemon.cleanup(QUEUES).await;
}

async fn a_retried_post_yields_exactly_one_assignment_even_across_a_restart(backend: Backend) {
    let prefix = prefix("retry");
    let mut daemon = Daemon::start(DaemonConfig::on(backend, &prefix)).await;
    daemon.wait_ready().await;

    let body = chat("m-1", "visitor-1", "hello there");
    let (_, first) = daemon.post("chat", &body).await;
    for _ in 0..3 {
        let (status, again) = daemon.post("chat", &body).await;
        assert_eq!(status, 200);
        assert_eq!(again, first, "a retry gets the same answer");
    }
    // After a restart the in-memory memory of ids is gone; the router's record still holds.
    assert!(
        daemon.stop().await.success(),
        "clean exit on SIGTERM:\n{}",
        daemon.log()
    );
    assert!(
        !daemon.log().contains("ERROR"),
        "a clean shutdown logs no error:\n{}",
        daemon.log()
    );
    daemon.spawn().await;
    daemon.wait_ready().await;
    let (status, again) = daemon.post("chat", &body).await;
    assert_eq!(status, 200);
    assert_eq!(again, first);

    let general = daemon
        .assignments("general", 2, Duration::from_secs(5))
        .await;
    assert_eq!(
        general.len(),
        1,
        "one assignment for one message: {general:?}"
    );
    assert_eq!(
        daemon.queue_depth(&format!("{prefix}.router")).await,
        0,
        "the retries were consumed"
    );
    daemon.cleanup(QUEUES).await;
}

#[tokio::test]
async fn broker_outage_answers_503_and_the_retry_lands_once() {
    let prefix = prefix("outage");
    let proxy = Proxy::start(AMQP_ADDR).await;
    let mut config = DaemonConfig::new(&prefix);
    config.amqp_url = proxy.url();
    let daemon = Daemon::start(config).await;
    daemon.wait_ready().await;

    proxy.set_down(true);
    let body = chat("m-down", "visitor-1", "is anyone there?");
    let started = Instant::now();
    let (status, error) = daemon.post("chat", &body).await;
    let took = started.elapsed();
    assert_eq!(status, 503, "{error}");
    assert!(took < Duration::from_secs(5), "503 took {took:?}");
    assert_eq!(error["error"]["code"], "bus_unavailable");
    let ready = daemon.http.get(daemon.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 503, "not ready while the broker is away");

    let metrics = daemon.metrics().await;
    assert!(
        metrics.contains("switchboard_publish_failures_total{stage=\"inbound\"} 1"),
        "{metrics}"
    );

    proxy.set_down(false);
    daemon.wait_ready().await;
    let (status, accepted) = daemon.post("chat", &body).await;
    assert_eq!(status, 200, "{accepted}");

    let general = daemon
        .assignments("general", 1, Duration::from_secs(10))
        .await;
    assert_eq!(general.len(), 1, "{general:?}");
    assert_eq!(general[0].1["data"]["message"]["external_id"], "m-down");
    daemon.cleanup(QUEUES).await;
}

async fn a_crash_between_store_commit_and_ack_assigns_exactly_once(backend: Backend) {
    let prefix = prefix("crash");
    let mut daemon = Daemon::start(DaemonConfig::on(backend, &prefix)).await;
    daemon.wait_ready().await;
    // Restart with the failpoint armed: the router aborts after recording its decision and
    // before publishing + acknowledging, as a SIGKILL at that instant would.
    daemon.kill9();
    daemon
        .spawn_with_env(&[("SWITCHBOARD_FAILPOINT", "router.after_record")])
        .await;
    daemon.wait_ready().await;
    let (status, _) = daemon
        .post("chat", &chat("m-crash", "visitor-1", "my invoice is wrong"))
        .await;
    assert_eq!(
        status, 200,
        "the webhook is answered once the broker confirmed"
    );
    let status = daemon.wait_exit(Duration::from_secs(10)).await;
    assert!(!status.success(), "the failpoint aborted the daemon");
    assert_eq!(
        daemon.depth("billing").await,
        0,
        "nothing published before the crash"
    );

    daemon.spawn().await;
    daemon.wait_ready().await;
    let billing = daemon
        .assignments("billing", 1, Duration::from_secs(10))
        .await;
    assert_eq!(billing.len(), 1, "{billing:?}");
    assert_eq!(billing[0].1["data"]["message"]["external_id"], "m-crash");
    assert!(
        daemon.log().contains("Redelivered before its commit"),
        "{}",
        daemon.log()
    );
    daemon.cleanup(QUEUES).await;
}

async fn sigkill_under_load_loses_nothing_and_doubles_nothing(backend: Backend) {
    let prefix = prefix("kill");
    let mut daemon = Daemon::start(DaemonConfig::on(backend, &prefix)).await;
    daemon.wait_ready().await;

    const TOTAL: usize = 300;
    let bodies: Vec<String> = (0..TOTAL)
        .map(|i| chat(&format!("m-{i}"), &format!("visitor-{}", i % 17), "hello"))
        .collect();
    let mut accepted = vec![false; TOTAL];
    for (i, body) in bodies.iter().enumerate() {
        if i == TOTAL / 2 {
            daemon.kill9();
            daemon.spawn().await;
            daemon.wait_ready().await;
        }
        let (status, _) = daemon.post("chat", body).await;
        accepted[i] = status == 200;
    }
    // A sender retries what was not acknowledged.
    for (i, body) in bodies.iter().enumerate() {
        if !accepted[i] {
            let (status, answer) = daemon.post("chat", body).await;
            assert_eq!(status, 200, "{answer}");
        }
    }
    let general = daemon
        .assignments("general", TOTAL, Duration::from_secs(30))
        .await;
    let mut ids = external_ids(&general);
    ids.sort();
    let mut unique = ids.clone();
    unique.dedup();
    assert_eq!(unique.len(), ids.len(), "no duplicates");
    assert_eq!(ids.len(), TOTAL, "every message assigned");
    daemon.cleanup(QUEUES).await;
}

async fn bad_inputs_get_clear_errors_and_publish_nothing(backend: Backend) {
    let prefix = prefix("bad");
    let mut config = DaemonConfig::on(backend, &prefix);
    config.channels.push_str(
        "\n[[channels]]\nid = \"signed\"\nkind = \"webchat\"\nsecret = \"s3cret-value\"\n",
    );
    let daemon = Daemon::start(config).await;
    daemon.wait_ready().await;

    type Case<'a> = (
        &'a str,
        &'a str,
        Vec<u8>,
        Vec<(&'a str, String)>,
        u16,
        &'a str,
    );
    let cases: Vec<Case> = vec![
        (
            "invalid JSON",
            "chat",
            b"{not json".to_vec(),
            vec![],
            400,
            "body",
        ),
        (
            "missing text",
            "chat",
            br#"{"customer": {"id": "v"}}"#.to_vec(),
            vec![],
            400,
            "text",
        ),
        (
            "empty text",
            "chat",
            br#"{"customer": {"id": "v"}, "text": "   "}"#.to_vec(),
            vec![],
            400,
            "text",
        ),
        (
            "1 MiB body",
            "chat",
            vec![b' '; 1024 * 1024],
            vec![],
            413,
            "",
        ),
        (
            "wrong signature",
            "signed",
            chat("m-x", "v", "hi").into_bytes(),
            vec![("X-Switchboard-Signature", "sha256=00ff".to_owned())],
            401,
            "",
        ),
        (
            "missing signature",
            "signed",
            chat("m-y", "v", "hi").into_bytes(),
            vec![],
            401,
            "",
        ),
        (
            "unknown channel",
            "nope",
            chat("m-z", "v", "hi").into_bytes(),
            vec![],
            404,
            "",
        ),
    ];
    for (what, channel, body, headers, expected, field) in cases {
        let (status, answer) = daemon.post_with(channel, body, &headers).await;
        assert_eq!(status, expected, "{what}: {answer}");
        assert!(
            answer["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{what}: {answer}"
        );
        if !field.is_empty() {
            assert_eq!(answer["error"]["field"], field, "{what}: {answer}");
        }
    }

    // A correctly signed message on the same channel is accepted, and the daemon still serves.
    let body = chat("m-ok", "v", "hello");
    let signature = signed(b"s3cret-value", body.as_bytes());
    let (status, answer) = daemon
        .post_with(
            "signed",
            body.into_bytes(),
            &[("X-Switchboard-Signature", signature)],
        )
        .await;
    assert_eq!(status, 200, "{answer}");

    let general = daemon
        .assignments("general", 1, Duration::from_secs(5))
        .await;
    assert_eq!(
        general.len(),
        1,
        "only the valid message was published: {general:?}"
    );
    assert_eq!(daemon.queue_depth(&format!("{prefix}.dead")).await, 0);
    daemon.cleanup(QUEUES).await;
}

fn signed(secret: &[u8], body: &[u8]) -> String {
    switchboard_channel::signature::sign_sha256_header(secret, body)
}

#[tokio::test]
async fn poison_messages_go_to_the_dead_queue_with_a_reason() {
    let rabbit = rabbit().await;
    let prefix = prefix("poison");
    let daemon = Daemon::start(DaemonConfig::new(&prefix)).await;
    daemon.wait_ready().await;

    publish_raw(
        &rabbit,
        &format!("{prefix}.inbound"),
        "webchat.chat",
        b"\x00 not an event",
    )
    .await;
    let (status, _) = daemon
        .post("chat", &chat("m-after", "v", "still routing?"))
        .await;
    assert_eq!(status, 200);

    let general = daemon
        .assignments("general", 1, Duration::from_secs(5))
        .await;
    assert_eq!(general.len(), 1, "routing goes on after a poison message");
    let channel = rabbit.create_channel().await.unwrap();
    let dead = channel
        .basic_get(
            format!("{prefix}.dead").as_str().into(),
            lapin::options::BasicGetOptions { no_ack: true },
        )
        .await
        .unwrap()
        .expect("the poison message is in the dead queue");
    assert_eq!(dead.delivery.data, b"\x00 not an event");
    let headers = dead.delivery.properties.headers().clone().expect("headers");
    let reason = headers
        .inner()
        .get("x-switchboard-reason")
        .expect("reason header");
    let lapin::types::AMQPValue::LongString(reason) = reason else {
        panic!("{reason:?}")
    };
    let reason = String::from_utf8_lossy(reason.as_bytes());
    assert!(
        reason.starts_with("not a normalized message event"),
        "{reason}"
    );
    daemon.cleanup(QUEUES).await;
}

async fn sighup_reloads_rules_and_a_bad_set_keeps_the_old_one(backend: Backend) {
    let prefix = prefix("reload");
    let rules = tempfile::tempdir().unwrap();
    let queues = "[[queue]]\nname = \"general\"\ndefault = true\n\n[[queue]]\nname = \"sales\"\nskills = [\"sales\"]\n";
    write_rules(rules.path(), &[("10-queues.toml", queues)]);
    let mut config = DaemonConfig::on(backend, &prefix);
    config.rules = rules.path().to_path_buf();
    config
        .env
        .push(("SWITCHBOARD__ROUTING__WATCH".to_owned(), "false".to_owned()));
    let daemon = Daemon::start(config).await;
    daemon.wait_ready().await;

    daemon
        .post("chat", &chat("m-1", "v", "I want to buy"))
        .await;
    let general = daemon
        .assignments("general", 1, Duration::from_secs(5))
        .await;
    assert_eq!(general.len(), 1);

    let sales_rule = "[[rule]]\nid = \"buy\"\nwhen = 'message.text.contains(\"buy\")'\nrequire_skills = [\"sales\"]\n";
    write_rules(rules.path(), &[("20-rules.toml", sales_rule)]);
    daemon.signal("HUP");
    tokio::time::sleep(Duration::from_millis(500)).await;
    daemon
        .post("chat", &chat("m-2", "v", "I want to buy"))
        .await;
    let sales = daemon.assignments("sales", 1, Duration::from_secs(5)).await;
    assert_eq!(sales.len(), 1, "the reloaded rule routes to sales");

    write_rules(
        rules.path(),
        &[(
            "20-rules.toml",
            "[[rule]]\nid = \"buy\"\nwhen = 'message.text.contains('\n",
        )],
    );
    daemon.signal("HUP");
    tokio::time::sleep(Duration::from_millis(500)).await;
    daemon
        .post("chat", &chat("m-3", "v", "I want to buy"))
        .await;
    let sales = daemon.assignments("sales", 1, Duration::from_secs(5)).await;
    assert_eq!(
        sales.len(),
        1,
        "the broken edit was refused; the old rules still route"
    );
    assert!(
        daemon.log().contains("Routing rules refused"),
        "{}",
        daemon.log()
    );

    let metrics = daemon.metrics().await;
    for name in [
        "switchboard_messages_received_total{channel_kind=\"webchat\",outcome=\"accepted\"} 3",
        "switchboard_assignments_total{queue=\"sales\"} 2",
        "switchboard_routing_latency_seconds_bucket",
        "switchboard_rules_reload_failures_total 1",
    ] {
        assert!(metrics.contains(name), "{name} missing from:\n{metrics}");
    }
    daemon.cleanup(&["general", "sales"]).await;
}

on_both_buses!(editing_a_rule_file_reroutes_within_two_seconds_and_a_broken_edit_is_refused);

async fn editing_a_rule_file_reroutes_within_two_seconds_and_a_broken_edit_is_refused(
    backend: Backend,
) {
    let prefix = prefix("watch");
    let rules = tempfile::tempdir().unwrap();
    let queues = "[[queue]]\nname = \"general\"\ndefault = true\n\n[[queue]]\nname = \"sales\"\nskills = [\"sales\"]\n";
    write_rules(rules.path(), &[("10-queues.toml", queues)]);
    let mut config = DaemonConfig::on(backend, &prefix);
    config.rules = rules.path().to_path_buf();
    let daemon = Daemon::start(config).await;
    daemon.wait_ready().await;
    let api = |path: &str| {
        daemon
            .http
            .get(daemon.url(path))
            .bearer_auth(ADMIN_TOKEN)
            .send()
    };
    let before: serde_json::Value = api("/api/v1/rules").await.unwrap().json().await.unwrap();

    // An editor saving by rename: write a temporary file, then move it into place.
    let rule = "[[rule]]\nid = \"buy\"\nwhen = 'message.text.contains(\"buy\")'\nrequire_skills = [\"sales\"]\n";
    std::fs::write(rules.path().join(".20-rules.toml.tmp"), rule).unwrap();
    std::fs::rename(
        rules.path().join(".20-rules.toml.tmp"),
        rules.path().join("20-rules.toml"),
    )
    .unwrap();
    let edited = Instant::now();
    loop {
        let now: serde_json::Value = api("/api/v1/rules").await.unwrap().json().await.unwrap();
        if now["version"] != before["version"] {
            break;
        }
        assert!(
            edited.elapsed() < Duration::from_secs(2),
            "not reloaded within 2 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!(
        "{backend:?}: rules reloaded {:?} after the edit",
        edited.elapsed()
    );
    daemon
        .post("chat", &chat("m-1", "v", "I want to buy"))
        .await;
    let sales = daemon.assignments("sales", 1, Duration::from_secs(5)).await;
    assert_eq!(sales.len(), 1, "the edited rule routes the next message");

    std::fs::write(
        rules.path().join("20-rules.toml"),
        "[[rule]]\nid = \"buy\"\nwhen = 'message.text.contains('\n",
    )
    .unwrap();
    let broken = Instant::now();
    let failure = loop {
        let now: serde_json::Value = api("/api/v1/rules").await.unwrap().json().await.unwrap();
        if !now["last_error"].is_null() {
            break now;
        }
        assert!(
            broken.elapsed() < Duration::from_secs(2),
            "the broken edit was not noticed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let problems = failure["last_error"]["problems"].as_array().unwrap();
    let file = rules.path().join("20-rules.toml").display().to_string();
    assert!(
        problems
            .iter()
            .any(|p| p.as_str().unwrap().starts_with(&format!("{file}:3:"))),
        "{failure}"
    );
    daemon
        .post("chat", &chat("m-2", "v", "I want to buy"))
        .await;
    let sales = daemon.assignments("sales", 1, Duration::from_secs(5)).await;
    assert_eq!(sales.len(), 1, "the previous rules still route");
    let metrics = daemon.metrics().await;
    assert!(
        metrics.contains("switchboard_rules_reload_failures_total 1"),
        "{metrics}"
    );
    daemon.cleanup(&["general", "sales"]).await;
}

on_both_buses!(a_closed_queue_sends_to_its_after_hours_queue_and_says_so);

async fn a_closed_queue_sends_to_its_after_hours_queue_and_says_so(backend: Backend) {
    let prefix = prefix("hours");
    let rules = tempfile::tempdir().unwrap();
    // `night-shift` has hours but no open day: it is always closed.
    let set = "[[queue]]\nname = \"general\"\ndefault = true\n\n[[queue]]\nname = \"sales\"\nskills = [\"sales\"]\nhours = {timezone = \"Europe/Paris\"}\nafter_hours = \"general\"\n\n[[rule]]\nid = \"buy\"\nwhen = 'message.text.contains(\"buy\")'\nrequire_skills = [\"sales\"]\n";
    write_rules(rules.path(), &[("rules.toml", set)]);
    let mut config = DaemonConfig::on(backend, &prefix);
    config.rules = rules.path().to_path_buf();
    let daemon = Daemon::start(config).await;
    daemon.wait_ready().await;

    let (status, _) = daemon
        .post("chat", &chat("m-1", "v", "I want to buy"))
        .await;
    assert_eq!(status, 200);
    let general = daemon
        .assignments("general", 1, Duration::from_secs(5))
        .await;
    assert_eq!(general.len(), 1);
    let data = &general[0].1["data"];
    assert_eq!(data["queue"], "general");
    assert_eq!(data["outside_hours"], true);
    assert_eq!(
        data["explanation"]["business_hours"],
        "`sales` is closed: after-hours queue `general`"
    );
    assert_eq!(daemon.depth("sales").await, 0);
    daemon.cleanup(&["general", "sales"]).await;
}

on_both_buses!(languages_and_signals_route_and_order_messages);

/// Four languages land in the queue serving each; an angry VIP refund outranks a polite
/// question in the same queue.
async fn languages_and_signals_route_and_order_messages(backend: Backend) {
    let prefix = prefix("lang");
    let rules = tempfile::tempdir().unwrap();
    let mut set = String::from("[[queue]]\nname = \"general\"\ndefault = true\n\n");
    for language in ["en", "de", "es", "fr"] {
        set.push_str(&format!(
            "[[queue]]\nname = \"support-{language}\"\nskills = [\"support\"]\nlanguages = [\"{language}\"]\n\n"
        ));
    }
    set.push_str(
        r#"[keywords]
en = ["refund", "immediately"]

[signals]
negative_sentiment = 20
urgent_keyword = 10

[[rule]]
id = "support"
require_skills = ["support"]

[[rule]]
id = "vip"
when = 'has(customer.attributes.tier) && customer.attributes.tier == "vip"'
urgency = 30
"#,
    );
    write_rules(rules.path(), &[("rules.toml", &set)]);
    let mut config = DaemonConfig::on(backend, &prefix);
    config.rules = rules.path().to_path_buf();
    let daemon = Daemon::start(config).await;
    daemon.wait_ready().await;

    let texts = [
        (
            "en",
            "Hello, could you tell me when my order from last week will arrive?",
        ),
        (
            "de",
            "Hallo, können Sie mir sagen, wann meine Bestellung von letzter Woche ankommt?",
        ),
        (
            "es",
            "Hola, ¿me pueden decir cuándo llegará mi pedido de la semana pasada?",
        ),
        (
            "fr",
            "Bonjour, pouvez-vous me dire quand ma commande de la semaine dernière arrivera ?",
        ),
    ];
    for (language, text) in texts {
        let (status, _) = daemon
            .post(
                "chat",
                &chat(&format!("m-{language}"), &format!("v-{language}"), text),
            )
            .await;
        assert_eq!(status, 200);
    }
    for (language, _) in texts {
        let got = daemon
            .assignments(&format!("support-{language}"), 1, Duration::from_secs(5))
            .await;
        assert_eq!(got.len(), 1, "{language}: {got:?}");
        let data = &got[0].1["data"];
        assert_eq!(data["language"], language);
        assert_eq!(data["message"]["external_id"], format!("m-{language}"));
    }

    // Same queue: the polite question first, then the angry VIP refund; the VIP comes out first.
    let polite = chat(
        "m-polite",
        "v-polite",
        "Hello, could you please tell me how to change my delivery address? Thank you!",
    );
    let angry = json!({"message_id": "m-angry", "customer": {"id": "v-vip"},
        "text": "This is terrible and unacceptable. I want a refund immediately, your service is the worst.",
        "attributes": {"tier": "vip"}})
    .to_string();
    assert_eq!(daemon.post("chat", &polite).await.0, 200);
    assert_eq!(daemon.post("chat", &angry).await.0, 200);
    let got = daemon
        .assignments("support-en", 2, Duration::from_secs(5))
        .await;
    assert_eq!(got.len(), 2);
    assert_eq!(
        got[0].1["data"]["message"]["external_id"], "m-angry",
        "{got:?}"
    );
    let urgency = &got[0].1["data"]["explanation"]["urgency"];
    assert_eq!(urgency["rule:vip"], 30);
    assert_eq!(urgency["signal:urgent_keywords"], 20);
    assert!(
        urgency["signal:negative_sentiment"].as_i64().unwrap() > 10,
        "{urgency}"
    );
    assert!(
        got[0].0 > got[1].0,
        "AMQP priority {} > {}",
        got[0].0,
        got[1].0
    );
    let mut queues = vec!["general"];
    let names: Vec<String> = ["en", "de", "es", "fr"]
        .iter()
        .map(|l| format!("support-{l}"))
        .collect();
    queues.extend(names.iter().map(String::as_str));
    daemon.cleanup(&queues).await;
}

on_both_buses!(equally_skilled_queues_share_the_load);

async fn equally_skilled_queues_share_the_load(backend: Backend) {
    let prefix = prefix("load");
    let rules = tempfile::tempdir().unwrap();
    let set = "[[queue]]\nname = \"general\"\ndefault = true\n\n[[queue]]\nname = \"billing-a\"\nskills = [\"billing\"]\n\n[[queue]]\nname = \"billing-b\"\nskills = [\"billing\"]\n\n[[rule]]\nid = \"refund\"\nwhen = 'message.text.contains(\"refund\")'\nrequire_skills = [\"billing\"]\n";
    write_rules(rules.path(), &[("rules.toml", set)]);
    let mut config = DaemonConfig::on(backend, &prefix);
    config.rules = rules.path().to_path_buf();
    let daemon = Daemon::start(config).await;
    daemon.wait_ready().await;

    assert_eq!(
        daemon.post("chat", &chat("m-1", "v1", "refund")).await.0,
        200
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while daemon.depth("billing-a").await < 1 {
        assert!(
            Instant::now() < deadline,
            "the first refund did not land in billing-a"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Depths are sampled every second; once billing-a's is seen, the tie goes to billing-b.
    let metrics_deadline = Instant::now() + Duration::from_secs(5);
    while !daemon
        .metrics()
        .await
        .contains("switchboard_queue_depth{queue=\"billing-a\"} 1")
    {
        assert!(
            Instant::now() < metrics_deadline,
            "{}",
            daemon.metrics().await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        daemon.post("chat", &chat("m-2", "v2", "refund")).await.0,
        200
    );
    let b = daemon
        .assignments("billing-b", 1, Duration::from_secs(5))
        .await;
    assert_eq!(b.len(), 1);
    assert_eq!(b[0].1["data"]["message"]["external_id"], "m-2");
    let reason = b[0].1["data"]["explanation"]["queue_reason"]
        .as_str()
        .unwrap();
    assert!(
        reason.contains("lightest load of 2 equal queues"),
        "{reason}"
    );
    daemon.cleanup(&["general", "billing-a", "billing-b"]).await;
}

on_both_buses!(an_assignment_not_picked_up_within_its_sla_overflows_step_by_step);

/// `first` (SLA 2 s) overflows to `second` (SLA 2 s), which overflows to `third`: each step
/// adds its queue's urgency bump, is recorded in the explanation and published as
/// `switchboard.conversation.escalated`. The pending SLA survives a SIGKILL of the daemon.
async fn an_assignment_not_picked_up_within_its_sla_overflows_step_by_step(backend: Backend) {
    let prefix = prefix("sla");
    let rules = tempfile::tempdir().unwrap();
    let set = r#"
[[queue]]
name = "first"
default = true
sla = "2s"
overflow = "second"
overflow_urgency = 15

[[queue]]
name = "second"
sla = "2s"
overflow = "third"

[[queue]]
name = "third"

[[rule]]
id = "base"
urgency = 20
"#;
    write_rules(rules.path(), &[("rules.toml", set)]);
    let mut config = DaemonConfig::on(backend, &prefix);
    config.rules = rules.path().to_path_buf();
    let mut daemon = Daemon::start(config).await;
    daemon.wait_ready().await;
    daemon.capture_events().await;

    // Step 1 happens while the daemon is down: the SLA is held by the bus, not by memory.
    let (status, _) = daemon.post("chat", &chat("m-1", "v-1", "hello")).await;
    assert_eq!(status, 200);
    assert!(
        daemon.wait_depth("first", 1, Duration::from_secs(5)).await,
        "the assignment never reached `first`"
    );
    daemon.kill9();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    daemon.spawn().await;
    daemon.wait_ready().await;
    let second = daemon
        .assignments("second", 1, Duration::from_secs(8))
        .await;
    assert_eq!(second.len(), 1, "{}", daemon.log());
    let (priority, event) = &second[0];
    let data = &event["data"];
    assert_eq!(data["queue"], "second");
    assert_eq!(
        data["urgency"], 35,
        "20 from the rule + 15 from first's overflow"
    );
    assert_eq!(*priority, 3);
    assert_eq!(data["priority"], 3);
    let steps = data["explanation"]["escalations"]
        .as_array()
        .expect("escalations");
    assert_eq!(steps.len(), 1);
    assert_eq!(steps[0]["from"], "first");
    assert_eq!(steps[0]["to"], "second");
    assert_eq!(steps[0]["sla_seconds"], 2);
    assert_eq!(data["explanation"]["urgency"]["sla:1:first"], 15);
    assert_eq!(data["explanation"]["urgency"]["total"], 35);
    assert_eq!(daemon.depth("first").await, 0);

    // Two steps in a row, daemon up: first → second → third.
    let (status, _) = daemon.post("chat", &chat("m-2", "v-2", "hello")).await;
    assert_eq!(status, 200);
    assert!(
        daemon.wait_depth("third", 1, Duration::from_secs(10)).await,
        "m-2 never overflowed to `third`: {}",
        daemon.log()
    );
    let third = daemon.assignments("third", 1, Duration::from_secs(2)).await;
    assert_eq!(third.len(), 1);
    let data = &third[0].1["data"];
    assert_eq!(
        data["urgency"], 45,
        "20 + 15 (first) + 10 (second's default bump)"
    );
    let steps = data["explanation"]["escalations"]
        .as_array()
        .expect("escalations");
    let path: Vec<(&str, &str)> = steps
        .iter()
        .map(|s| (s["from"].as_str().unwrap(), s["to"].as_str().unwrap()))
        .collect();
    assert_eq!(path, [("first", "second"), ("second", "third")]);
    assert_eq!(
        daemon.depth("first").await + daemon.depth("second").await,
        0
    );

    let events = daemon.events().await;
    let escalations: Vec<(String, u64, String, String)> = events
        .iter()
        .filter(|e| e["type"] == "switchboard.conversation.escalated")
        .map(|e| {
            let d = &e["data"];
            (
                d["message_id"].as_str().unwrap().to_owned(),
                d["step"].as_u64().unwrap(),
                d["from_queue"].as_str().unwrap().to_owned(),
                d["to_queue"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let m1 = first_message_id(&second[0].1);
    let m2 = first_message_id(&third[0].1);
    assert_eq!(
        escalations,
        [
            (m1, 1, "first".into(), "second".into()),
            (m2.clone(), 1, "first".into(), "second".into()),
            (m2, 2, "second".into(), "third".into()),
        ],
        "exactly one event per step"
    );
    let metrics = daemon.metrics().await;
    assert!(
        metrics.contains("switchboard_escalations_total{from=\"second\",to=\"third\"} 1"),
        "{metrics}"
    );
    daemon.cleanup(&["first", "second", "third"]).await;
}

fn first_message_id(assignment: &serde_json::Value) -> String {
    assignment["data"]["message"]["message_id"]
        .as_str()
        .expect("message_id")
        .to_owned()
}

/// Kubernetes mounts a ConfigMap as `..<timestamp>/` directories, a `..data` symlink to the
/// current one, and per-file symlinks through `..data`; an update swaps `..data` atomically
/// (a new symlink renamed over the old one). The watcher must see that and reload.
#[tokio::test]
async fn a_configmap_style_symlink_swap_reloads_the_rules() {
    let prefix = prefix("configmap");
    let rules = tempfile::tempdir().unwrap();
    let root = rules.path();
    let version = |name: &str, sales_rule: bool| {
        let dir = root.join(name);
        std::fs::create_dir(&dir).unwrap();
        let mut text = String::from(
            "[[queue]]\nname = \"general\"\ndefault = true\n\n[[queue]]\nname = \"sales\"\nskills = [\"sales\"]\n",
        );
        if sales_rule {
            text.push_str("\n[[rule]]\nid = \"buy\"\nwhen = 'message.text.contains(\"buy\")'\nrequire_skills = [\"sales\"]\n");
        }
        std::fs::write(dir.join("rules.toml"), text).unwrap();
    };
    version("..2026_11_22_10_00_00.1", false);
    std::os::unix::fs::symlink("..2026_11_22_10_00_00.1", root.join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/rules.toml", root.join("rules.toml")).unwrap();

    let mut config = DaemonConfig::on(Backend::Embedded, &prefix);
    config.rules = root.to_path_buf();
    let daemon = Daemon::start(config).await;
    daemon.wait_ready().await;
    daemon
        .post("chat", &chat("m-1", "v", "I want to buy"))
        .await;
    assert_eq!(
        daemon
            .assignments("general", 1, Duration::from_secs(5))
            .await
            .len(),
        1,
        "no sales rule yet"
    );

    // The kubelet's update: a new version directory, a new symlink, renamed over `..data`.
    version("..2026_11_22_10_05_00.2", true);
    std::os::unix::fs::symlink("..2026_11_22_10_05_00.2", root.join("..data_tmp")).unwrap();
    std::fs::rename(root.join("..data_tmp"), root.join("..data")).unwrap();
    let swapped = Instant::now();
    loop {
        let response = daemon
            .http
            .get(daemon.url("/api/v1/rules"))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .unwrap();
        let rules: serde_json::Value = response.json().await.unwrap();
        if rules["rules"] == 1 {
            break;
        }
        assert!(
            swapped.elapsed() < Duration::from_secs(2),
            "not reloaded within 2 s of the swap: {}",
            daemon.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    daemon
        .post("chat", &chat("m-2", "v", "I want to buy"))
        .await;
    assert_eq!(
        daemon
            .assignments("sales", 1, Duration::from_secs(5))
            .await
            .len(),
        1,
        "the swapped-in rule routes the next message"
    );
}

/// A message RabbitMQ dead-lettered (past the delivery limit) keeps its death headers when an
/// operator replays it to `<p>.inbound` (docs/OPERATIONS.md): it is routed like any other, not
/// taken for an assignment handed back by an agent queue.
#[tokio::test]
async fn a_replayed_dead_letter_is_routed_normally() {
    let rabbit = rabbit().await;
    let prefix = prefix("replay");
    let daemon = Daemon::start(DaemonConfig::new(&prefix)).await;
    daemon.wait_ready().await;

    let message = serde_json::json!({
        "specversion": "1.0", "id": "00000000-0000-5000-8000-000000000001",
        "source": "/webhooks/chat", "type": "switchboard.message.received",
        "time": "2026-11-22T12:00:00Z", "datacontenttype": "application/json",
        "data": {
            "message_id": "00000000-0000-5000-8000-000000000001",
            "channel": {"id": "chat", "kind": "webchat"}, "external_id": "replayed-1",
            "thread_key": null, "sender": {"kind": "webchat", "address": "v-replay", "name": null},
            "subject": null, "text": "hello again, a replayed message", "attachments": [],
            "received_at": "2026-11-22T12:00:00Z", "auto_submitted": false, "metadata": {}
        }
    });
    let mut headers = lapin::types::FieldTable::default();
    headers.insert(
        "x-first-death-reason".into(),
        lapin::types::AMQPValue::LongString("delivery_limit".into()),
    );
    publish_with(
        &rabbit,
        &format!("{prefix}.inbound"),
        "webchat.chat",
        message.to_string().as_bytes(),
        lapin::BasicProperties::default().with_headers(headers),
    )
    .await;
    let general = daemon
        .assignments("general", 1, Duration::from_secs(5))
        .await;
    assert_eq!(general.len(), 1, "{}", daemon.log());
    assert_eq!(general[0].1["data"]["message"]["external_id"], "replayed-1");
    assert_eq!(daemon.queue_depth(&format!("{prefix}.dead")).await, 0);
    daemon.cleanup(QUEUES).await;
}
