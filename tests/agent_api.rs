//! Agents taking assignments over HTTP (claim / ack, on both buses), and single-node mode's
//! durability: kill -9 with unrouted messages and unacknowledged claims.

#[macro_use]
mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

on_both_buses!(
    claim_ack_and_lease_expiry,
    claim_api_refuses_bad_requests,
    a_burst_is_claimed_highest_priority_first,
    a_long_poll_returns_as_soon_as_an_assignment_arrives,
    a_claim_without_waiting_takes_what_is_ready,
    a_queue_removed_by_a_reload_can_still_be_emptied,
);

async fn claim_ack_and_lease_expiry(backend: Backend) {
    let prefix = prefix("claim");
    let daemon = Daemon::start(DaemonConfig::on(backend, &prefix)).await;
    daemon.wait_ready().await;

    let (status, _) = daemon.claim("billing", 0.0, 30.0).await;
    assert_eq!(status, 204, "nothing to claim yet");
    let (status, _) = daemon
        .post("chat", &chat("m-1", "v-1", "refund please"))
        .await;
    assert_eq!(status, 200);

    let (status, first) = daemon.claim("billing", 5.0, 1.0).await;
    assert_eq!(status, 200, "{first}");
    assert_eq!(first["queue"], "billing");
    assert_eq!(first["redelivered"], false);
    assert_eq!(
        first["assignment"]["type"],
        "switchboard.conversation.assigned"
    );
    assert_eq!(first["assignment"]["data"]["message"]["external_id"], "m-1");
    assert!(first["lease_expires_at"].as_str().is_some());
    let first_id = first["assignment_id"].as_str().unwrap().to_owned();

    // Leased: nobody else gets it; after the lease it comes back, marked redelivered.
    let (status, _) = daemon.claim("billing", 0.0, 30.0).await;
    assert_eq!(status, 204, "a leased assignment is not handed out twice");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (status, again) = daemon.claim("billing", 5.0, 30.0).await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(again["assignment"]["data"]["message"]["external_id"], "m-1");
    assert_eq!(again["redelivered"], true);
    assert_eq!(
        daemon.ack(&first_id).await,
        404,
        "an expired lease cannot ack"
    );
    let again_id = again["assignment_id"].as_str().unwrap();
    assert_eq!(daemon.ack(again_id).await, 200);
    assert_eq!(daemon.ack(again_id).await, 404, "acked once");
    let (status, _) = daemon.claim("billing", 0.5, 30.0).await;
    assert_eq!(status, 204, "the queue is empty after the ack");
    daemon.cleanup(QUEUES).await;
}

async fn claim_api_refuses_bad_requests(backend: Backend) {
    let prefix = prefix("claimbad");
    let daemon = Daemon::start(DaemonConfig::on(backend, &prefix)).await;
    daemon.wait_ready().await;
    let url = daemon.url("/api/v1/queues/general/claim");

    let response = daemon.http.post(&url).send().await.unwrap();
    assert_eq!(response.status(), 401);
    let response = daemon
        .http
        .post(&url)
        .bearer_auth("wrong-token-of-some-length")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    let response = daemon
        .http
        .post(daemon.url("/api/v1/queues/nope/claim"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404);
    // A name no queue can have (AMQP names end at 255 bytes) is unknown, nothing more.
    let response = daemon
        .http
        .post(daemon.url(&format!("/api/v1/queues/{}/claim", "q".repeat(300))))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404);
    for (query, names) in [
        ("wait=-1", "`wait` must be between 0 and 60 seconds"),
        ("wait=999", "`wait` must be between 0 and 60 seconds"),
        ("lease=0", "`lease` must be between 0.001 and 3600 seconds"),
        (
            "lease=0.0004",
            "`lease` must be between 0.001 and 3600 seconds",
        ),
        ("wait=soon", "wait"),
        ("colour=blue", "colour"),
    ] {
        let response = daemon
            .http
            .post(format!("{url}?{query}"))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 400, "{query}");
        let body: serde_json::Value = response.json().await.unwrap();
        let message = body["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(names), "{query}: {body}");
    }
    // An ack takes no parameters; an assignment id is a UUID in any case.
    let ack = |path: String| daemon.http.post(daemon.url(&path)).bearer_auth(ADMIN_TOKEN);
    let response = ack("/api/v1/assignments/x/ack?colour=blue".into())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let (status, _) = daemon.post("chat", &chat("bad-1", "v-bad", "hello")).await;
    assert_eq!(status, 200);
    let (status, claimed) = daemon.claim("general", 5.0, 30.0).await;
    assert_eq!(status, 200, "{claimed}");
    let id = claimed["assignment_id"].as_str().unwrap().to_uppercase();
    let response = ack(format!("/api/v1/assignments/{id}/ack"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let response = daemon
        .http
        .get(daemon.url("/api/v1/rules"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let rules: serde_json::Value = response.json().await.unwrap();
    assert_eq!(rules["queues"], json!(QUEUES));
    daemon.cleanup(QUEUES).await;
}

/// Rules that put everything in `general` with the urgency the text names (`p7` → 70).
fn priority_rules() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let mut rules = String::from("[[queue]]\nname = \"general\"\ndefault = true\n\n");
    for p in 1..10 {
        rules.push_str(&format!(
            "[[rule]]\nid = \"p{p}\"\nwhen = 'message.text == \"p{p}\"'\nurgency = {}\n\n",
            p * 10
        ));
    }
    write_rules(dir.path(), &[("rules.toml", &rules)]);
    dir
}

async fn a_burst_is_claimed_highest_priority_first(backend: Backend) {
    let prefix = prefix("burst");
    let rules = priority_rules();
    let mut config = DaemonConfig::on(backend, &prefix);
    config.rules = rules.path().to_path_buf();
    let daemon = Daemon::start(config).await;
    daemon.wait_ready().await;

    const TOTAL: usize = 100;
    // A fixed, mixed order of priorities (a simple LCG, so the test is repeatable).
    let mut x: u64 = 7;
    let mut sent = Vec::new();
    for i in 0..TOTAL {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let p = (x >> 33) % 10;
        let (status, _) = daemon
            .post(
                "chat",
                &chat(&format!("m-{i:03}"), &format!("v-{i}"), &format!("p{p}")),
            )
            .await;
        assert_eq!(status, 200);
        sent.push(p as u8);
    }
    let claimed = daemon
        .assignments("general", TOTAL, Duration::from_secs(20))
        .await;
    assert_eq!(claimed.len(), TOTAL);
    let order: Vec<(u8, String)> = claimed
        .iter()
        .map(|(priority, event)| {
            (
                *priority,
                event["data"]["message"]["external_id"]
                    .as_str()
                    .unwrap()
                    .to_owned(),
            )
        })
        .collect();
    for pair in order.windows(2) {
        let ((p1, id1), (p2, id2)) = (&pair[0], &pair[1]);
        assert!(
            p1 > p2 || (p1 == p2 && id1 < id2),
            "out of order: {pair:?} in {order:?}"
        );
    }
    let mut expected = sent.clone();
    expected.sort_unstable_by(|a, b| b.cmp(a));
    let priorities: Vec<u8> = order.iter().map(|(p, _)| *p).collect();
    assert_eq!(priorities, expected, "every priority as sent");
    daemon.cleanup(&["general"]).await;
}

/// A reload that drops a queue leaves what the queue holds claimable; once it is empty, the
/// queue is unknown.
async fn a_queue_removed_by_a_reload_can_still_be_emptied(backend: Backend) {
    let prefix = prefix("dropped");
    let rules = tempfile::tempdir().unwrap();
    let general = "[[queue]]\nname = \"general\"\ndefault = true\n";
    let old = "[[queue]]\nname = \"old\"\n\n[[rule]]\nid = \"old\"\nwhen = 'message.text == \"old\"'\nroute_to = \"old\"\n";
    write_rules(
        rules.path(),
        &[("10-general.toml", general), ("20-old.toml", old)],
    );
    let mut config = DaemonConfig::on(backend, &prefix);
    config.rules = rules.path().to_path_buf();
    let daemon = Daemon::start(config).await;
    daemon.wait_ready().await;
    let (status, _) = daemon.post("chat", &chat("d-1", "v-d", "old")).await;
    assert_eq!(status, 200);
    assert!(daemon.wait_depth("old", 1, Duration::from_secs(10)).await);
    let version = |daemon: &Daemon| {
        let request = daemon.api(reqwest::Method::GET, "/api/v1/rules");
        async move {
            let rules: serde_json::Value = request.send().await.unwrap().json().await.unwrap();
            rules["version"].clone()
        }
    };
    let before = version(&daemon).await;
    std::fs::remove_file(rules.path().join("20-old.toml")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while version(&daemon).await == before {
        assert!(Instant::now() < deadline, "not reloaded");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let (status, claimed) = daemon.claim("old", 2.0, 30.0).await;
    assert_eq!(status, 200, "{claimed}");
    assert_eq!(
        claimed["assignment"]["data"]["message"]["external_id"],
        "d-1"
    );
    assert_eq!(
        daemon.ack(claimed["assignment_id"].as_str().unwrap()).await,
        200
    );
    let (status, body) = daemon.claim("old", 0.0, 30.0).await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["error"]["code"], "unknown_queue");
    daemon.cleanup(&["general", "old"]).await;
}

/// `wait=0` answers at once, and 204 only when nothing is ready: every ready assignment is
/// handed out, none handed back to the queue as redelivered on the way.
async fn a_claim_without_waiting_takes_what_is_ready(backend: Backend) {
    let prefix = prefix("claimnow");
    let daemon = Daemon::start(DaemonConfig::on(backend, &prefix)).await;
    daemon.wait_ready().await;
    const READY: usize = 10;
    for round in 0..10 {
        for i in 0..READY {
            let (status, _) = daemon
                .post(
                    "chat",
                    &chat(
                        &format!("m-{round}-{i}"),
                        &format!("v-{i}"),
                        "refund please",
                    ),
                )
                .await;
            assert_eq!(status, 200);
        }
        assert!(
            daemon
                .wait_depth("billing", READY, Duration::from_secs(10))
                .await
        );
        for i in 0..READY {
            let (status, claimed) = daemon.claim("billing", 0.0, 30.0).await;
            assert_eq!(status, 200, "round {round}, claim {i}: {claimed}");
            assert_eq!(claimed["redelivered"], false, "{claimed}");
            let id = claimed["assignment_id"].as_str().unwrap();
            assert_eq!(daemon.ack(id).await, 200);
        }
        let (status, _) = daemon.claim("billing", 0.0, 30.0).await;
        assert_eq!(status, 204, "round {round}: all were taken");
    }
    daemon.cleanup(QUEUES).await;
}

async fn a_long_poll_returns_as_soon_as_an_assignment_arrives(backend: Backend) {
    let prefix = prefix("poll");
    let daemon = std::sync::Arc::new(Daemon::start(DaemonConfig::on(backend, &prefix)).await);
    daemon.wait_ready().await;

    let waiting = {
        let daemon = daemon.clone();
        tokio::spawn(async move {
            let (status, claimed) = daemon.claim("general", 20.0, 30.0).await;
            (status, claimed, Instant::now())
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (status, _) = daemon.post("chat", &chat("m-poll", "v", "hello")).await;
    let posted = Instant::now();
    assert_eq!(status, 200);
    let (status, claimed, returned) = waiting.await.unwrap();
    assert_eq!(status, 200, "{claimed}");
    assert_eq!(
        claimed["assignment"]["data"]["message"]["external_id"],
        "m-poll"
    );
    let latency = returned.duration_since(posted);
    eprintln!("{backend:?}: webhook answered → long-polling claim returned in {latency:?}");
    assert!(latency < Duration::from_secs(1), "{latency:?}");
    daemon.cleanup(QUEUES).await;
}

/// A claim held on a connection that broke is gone (RabbitMQ put the assignment back): its
/// ack answers 404, not a 503 that a client would retry, and the next claim gets it again.
#[tokio::test]
async fn a_claim_lost_with_the_connection_acks_as_unknown() {
    let prefix = prefix("claimlost");
    let proxy = Proxy::start(AMQP_ADDR).await;
    let mut config = DaemonConfig::new(&prefix);
    config.amqp_url = proxy.url();
    let daemon = Daemon::start(config).await;
    daemon.wait_ready().await;
    let (status, _) = daemon
        .post("chat", &chat("lost-1", "v-lost", "hello"))
        .await;
    assert_eq!(status, 200);
    let (status, claimed) = daemon.claim("general", 5.0, 60.0).await;
    assert_eq!(status, 200, "{claimed}");

    proxy.set_down(true);
    tokio::time::sleep(Duration::from_millis(500)).await;
    proxy.set_down(false);
    daemon.wait_ready().await;
    let lost = claimed["assignment_id"].as_str().unwrap();
    assert_eq!(daemon.ack(lost).await, 404);
    let (status, again) = daemon.claim("general", 5.0, 60.0).await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(again["redelivered"], true);
    assert_eq!(
        again["assignment"]["data"]["message"]["external_id"],
        "lost-1"
    );
    assert_eq!(
        daemon.ack(again["assignment_id"].as_str().unwrap()).await,
        200
    );
    daemon.cleanup(QUEUES).await;
}

#[tokio::test]
async fn single_node_kill_9_loses_nothing_and_assigns_nothing_twice() {
    let prefix = prefix("kill9");
    let mut daemon = Daemon::start(DaemonConfig::on(Backend::Embedded, &prefix)).await;
    daemon.wait_ready().await;

    // Part 1: assignments claimed but not acknowledged when the daemon dies.
    for i in 0..5 {
        let (status, _) = daemon
            .post("chat", &chat(&format!("claimed-{i}"), "v-1", "hello"))
            .await;
        assert_eq!(status, 200);
    }
    while daemon.depth("general").await < 5 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut held = Vec::new();
    for _ in 0..3 {
        let (status, claimed) = daemon.claim("general", 2.0, 2.0).await;
        assert_eq!(status, 200, "{claimed}");
        held.push(
            claimed["assignment"]["data"]["message"]["external_id"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }

    // Part 2: messages published (acknowledged to the sender) but not routed yet.
    daemon.kill9();
    daemon
        .spawn_with_env(&[("SWITCHBOARD_FAILPOINT", "router.paused")])
        .await;
    daemon.wait_ready().await;
    for i in 0..50 {
        let (status, _) = daemon
            .post(
                "chat",
                &chat(&format!("unrouted-{i}"), &format!("v-{i}"), "hello"),
            )
            .await;
        assert_eq!(status, 200);
    }
    assert_eq!(
        daemon.queue_depth(&format!("{prefix}.router")).await,
        50,
        "published, not routed"
    );
    daemon.kill9();

    daemon.spawn().await;
    daemon.wait_ready().await;
    tokio::time::sleep(Duration::from_millis(2100)).await; // the claims' leases run out
    let claimed = daemon
        .assignments("general", 55, Duration::from_secs(20))
        .await;
    let mut ids = external_ids(&claimed);
    ids.sort();
    let mut expected: Vec<String> = (0..5)
        .map(|i| format!("claimed-{i}"))
        .chain((0..50).map(|i| format!("unrouted-{i}")))
        .collect();
    expected.sort();
    assert_eq!(ids, expected, "every message exactly once");
    for id in held {
        assert!(ids.contains(&id));
    }
}

/// No config file at all: single-node defaults, an unsigned web chat channel, and the API token
/// in `admin-token` beside the database. Only the port is moved (by environment) so tests can
/// run side by side.
#[tokio::test]
async fn zero_config_start_serves_routes_and_holds_assignments() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .arg("run")
        .current_dir(dir.path())
        .env("SWITCHBOARD__HTTP__LISTEN", format!("127.0.0.1:{port}"))
        .env("RUST_LOG", "info")
        .stderr(std::fs::File::create(dir.path().join("log")).unwrap())
        .spawn()
        .unwrap();
    let http = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{port}");
    let mut ready = false;
    for _ in 0..200 {
        if http
            .get(format!("{base}/readyz"))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
        {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let log = || std::fs::read_to_string(dir.path().join("log")).unwrap_or_default();
    assert!(ready, "{}", log());
    let response = http
        .post(format!("{base}/webhooks/webchat"))
        .body(chat("m-zero", "v", "hello"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let token =
        std::fs::read_to_string(dir.path().join("admin-token")).expect("admin-token written");
    let response = http
        .post(format!("{base}/api/v1/queues/general/claim?wait=5"))
        .bearer_auth(token.trim())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let claimed: serde_json::Value = response.json().await.unwrap();
    assert_eq!(
        claimed["assignment"]["data"]["message"]["external_id"],
        "m-zero"
    );
    assert!(dir.path().join("switchboard.db").is_file());
    let log = log();
    assert!(
        log.contains("Mode: single node, embedded bus in the store (no broker)."),
        "{log}"
    );
    assert!(
        log.contains(
            &dir.path()
                .canonicalize()
                .unwrap()
                .join("switchboard.db")
                .display()
                .to_string()
        ),
        "{log}"
    );
    let _ = child.kill();
    let _ = child.wait();
}

#[tokio::test]
async fn a_missing_data_directory_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .arg("run")
        .current_dir(dir.path())
        .env("STATE_DIRECTORY", "/nonexistent/switchboard-state")
        .env(
            "SWITCHBOARD__HTTP__LISTEN",
            format!("127.0.0.1:{}", free_port()),
        )
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    let said = "switchboard: cannot open the store at sqlite:///nonexistent/switchboard-state/";
    assert_eq!(stderr.matches(said).count(), 1, "said once: {stderr}");
    assert!(
        stderr.contains("the data directory /nonexistent/switchboard-state does not exist"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// A CRM reads a customer and sets attributes over the API; rules see them on the next message.
#[tokio::test]
async fn customers_are_read_and_their_attributes_set_over_the_api() {
    let prefix = prefix("customers");
    let daemon = Daemon::start(DaemonConfig::on(Backend::Embedded, &prefix)).await;
    daemon.wait_ready().await;
    let api = |method: reqwest::Method, path: &str| daemon.api(method, path);

    let (status, _) = daemon
        .post("chat", &chat("m-1", "visitor-9", "I need a refund"))
        .await;
    assert_eq!(status, 200);
    let first = daemon
        .assignments("billing", 1, Duration::from_secs(5))
        .await;
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].1["data"]["urgency"], 10);
    let id = first[0].1["data"]["customer_id"]
        .as_str()
        .unwrap()
        .to_owned();

    let response = api(reqwest::Method::GET, &format!("/api/v1/customers/{id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let customer: serde_json::Value = response.json().await.unwrap();
    assert_eq!(customer["id"], id.as_str());
    assert_eq!(
        customer["identities"],
        json!([{"kind": "webchat", "address": "visitor-9"}])
    );
    let response = api(
        reqwest::Method::GET,
        "/api/v1/customers?identity=webchat:visitor-9",
    )
    .send()
    .await
    .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.json::<serde_json::Value>().await.unwrap()["id"],
        id.as_str()
    );

    // The CRM marks the customer as a VIP; the next message is more urgent.
    let response = api(reqwest::Method::PATCH, &format!("/api/v1/customers/{id}"))
        .json(&json!({"attributes": {"tier": "vip", "lifetime_value": 12000}}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let patched: serde_json::Value = response.json().await.unwrap();
    assert_eq!(patched["attributes"]["tier"], "vip");
    let (status, _) = daemon
        .post("chat", &chat("m-2", "visitor-9", "Another refund question"))
        .await;
    assert_eq!(status, 200);
    let second = daemon
        .assignments("billing", 1, Duration::from_secs(5))
        .await;
    assert_eq!(second.len(), 1);
    let data = &second[0].1["data"];
    assert_eq!(data["customer_id"], id.as_str());
    assert_eq!(
        data["urgency"], 45,
        "refund 10 + vip 30 + second contact today 5: {}",
        data["explanation"]
    );
    assert_eq!(data["explanation"]["urgency"]["rule:vip"], 30);
    assert_eq!(
        data["context"]["customer"]["attributes"]["lifetime_value"],
        12000
    );

    // `null` removes an attribute.
    let response = api(reqwest::Method::PATCH, &format!("/api/v1/customers/{id}"))
        .json(&json!({"attributes": {"tier": null}}))
        .send()
        .await
        .unwrap();
    let patched: serde_json::Value = response.json().await.unwrap();
    assert!(patched["attributes"].get("tier").is_none(), "{patched}");
    assert_eq!(patched["attributes"]["lifetime_value"], 12000);

    // Clear errors.
    for (method, path, body, status, code) in [
        (
            reqwest::Method::GET,
            "/api/v1/customers/nobody".to_owned(),
            None,
            404,
            "unknown_customer",
        ),
        (
            reqwest::Method::GET,
            "/api/v1/customers?identity=nocolon".to_owned(),
            None,
            400,
            "invalid_identity",
        ),
        (
            reqwest::Method::GET,
            "/api/v1/customers?identity=email:nobody@example.com".to_owned(),
            None,
            404,
            "unknown_customer",
        ),
        (
            reqwest::Method::PATCH,
            format!("/api/v1/customers/{id}"),
            Some(json!({"tier": "vip"})),
            400,
            "invalid_body",
        ),
        (
            reqwest::Method::PATCH,
            format!("/api/v1/customers/{id}"),
            Some(json!({"attributes": "vip"})),
            400,
            "invalid_body",
        ),
        (
            reqwest::Method::PATCH,
            "/api/v1/customers/nobody".to_owned(),
            Some(json!({"attributes": {}})),
            404,
            "unknown_customer",
        ),
        (
            reqwest::Method::PATCH,
            format!("/api/v1/customers/{id}"),
            Some(json!({"attributes": {"note": "x".repeat(17 * 1024)}})),
            400,
            "attributes_too_large",
        ),
        // What no store can keep, or no address has, is refused before it reaches the store.
        (
            reqwest::Method::PATCH,
            format!("/api/v1/customers/{id}"),
            Some(json!({"attributes": {"note": {"deep": ["a\u{0}b"]}}})),
            400,
            "invalid_body",
        ),
        (
            reqwest::Method::GET,
            "/api/v1/customers?identity=webchat:%00".to_owned(),
            None,
            400,
            "invalid_identity",
        ),
        (
            reqwest::Method::GET,
            "/api/v1/customers?identity=webchat:visitor-9&limit=1".to_owned(),
            None,
            400,
            "invalid_parameter",
        ),
        (
            reqwest::Method::GET,
            "/api/v1/customers?identity=webchat:visitor-9&identity=webchat:x".to_owned(),
            None,
            400,
            "invalid_parameter",
        ),
        (
            reqwest::Method::POST,
            format!("/api/v1/customers/{id}/identities"),
            Some(json!({"kind": "webchat", "address": "visitor\n10"})),
            400,
            "invalid_identity",
        ),
        (
            reqwest::Method::POST,
            format!("/api/v1/customers/{id}/identities"),
            Some(json!({"kind": "webchat", "address": "v".repeat(257)})),
            400,
            "invalid_identity",
        ),
        (
            reqwest::Method::GET,
            "/api/v1/customers".to_owned(),
            None,
            400,
            "invalid_parameter",
        ),
        // Objects only: serde alone would read a struct from an array of its fields.
        (
            reqwest::Method::POST,
            format!("/api/v1/customers/{id}/identities"),
            Some(json!(["email", "array@example.com"])),
            400,
            "invalid_body",
        ),
        (
            reqwest::Method::PATCH,
            format!("/api/v1/customers/{id}"),
            Some(json!([{"tier": "array"}])),
            400,
            "invalid_body",
        ),
        (
            reqwest::Method::POST,
            format!("/api/v1/customers/{id}/merge"),
            Some(json!([id])),
            400,
            "invalid_body",
        ),
    ] {
        let mut request = api(method.clone(), &path);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status().as_u16(), status, "{method} {path}");
        let body: serde_json::Value = response.json().await.unwrap();
        assert_eq!(body["error"]["code"], code, "{method} {path}: {body}");
    }
    let response = daemon
        .http
        .get(daemon.url(&format!("/api/v1/customers/{id}")))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401, "the customer API needs the token");
    let response = daemon
        .http
        .get(daemon.url(&format!("/api/v1/customers/{id}")))
        .header("authorization", format!("bearer {ADMIN_TOKEN}"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "the scheme's name in any case");
    // A body that is not JSON says so with its own status.
    let response = daemon
        .http
        .patch(daemon.url(&format!("/api/v1/customers/{id}")))
        .bearer_auth(ADMIN_TOKEN)
        .body(r#"{"attributes": {}}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 415);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "unsupported_media_type", "{body}");
    // So does one over the limit. The server answers once it has read past the limit and
    // closes, and a client still sending may never see the answer: this request is written by
    // hand, stops just past the limit, and then reads.
    let address = daemon.url("").trim_start_matches("http://").to_owned();
    let mut stream = tokio::net::TcpStream::connect(&address).await.unwrap();
    let head = format!(
        "PATCH /api/v1/customers/{id} HTTP/1.1\r\nHost: {address}\r\n\
         Authorization: Bearer {ADMIN_TOKEN}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        3 * 1024 * 1024
    );
    tokio::io::AsyncWriteExt::write_all(&mut stream, head.as_bytes())
        .await
        .unwrap();
    // Past the 2 MiB limit, and short of what was announced: then stop and listen.
    tokio::io::AsyncWriteExt::write_all(&mut stream, &vec![b' '; 2 * 1024 * 1024 + 1])
        .await
        .unwrap();
    let mut answer = Vec::new();
    let mut chunk = [0u8; 4096];
    while !String::from_utf8_lossy(&answer).contains("}}") {
        let read = tokio::time::timeout(
            Duration::from_secs(10),
            tokio::io::AsyncReadExt::read(&mut stream, &mut chunk),
        )
        .await
        .unwrap_or_else(|_| panic!("no answer: {}", String::from_utf8_lossy(&answer)))
        .unwrap();
        if read == 0 {
            break;
        }
        answer.extend_from_slice(&chunk[..read]);
    }
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains(r#""code":"body_too_large""#), "{answer}");
    let response = api(reqwest::Method::GET, &format!("/api/v1/customers/{id}"))
        .send()
        .await
        .unwrap();
    let unchanged: serde_json::Value = response.json().await.unwrap();
    assert_eq!(unchanged["attributes"], patched["attributes"]);
    assert_eq!(unchanged["identities"], customer["identities"]);
}

/// The agent who claims an assignment (`?agent=`) is the conversation's next assignment's
/// `previous_agent`, and the conversation's `agent_id`.
#[tokio::test]
async fn a_claiming_agent_is_the_next_assignments_previous_agent() {
    let prefix = prefix("agent");
    let daemon = Daemon::start(DaemonConfig::on(Backend::Embedded, &prefix)).await;
    daemon.wait_ready().await;
    let claim = |agent: &str| {
        daemon
            .http
            .post(daemon.url(&format!(
                "/api/v1/queues/general/claim?wait=5&lease=30&agent={agent}"
            )))
            .bearer_auth(ADMIN_TOKEN)
            .send()
    };

    let (status, _) = daemon
        .post("chat", &chat("m-1", "visitor-7", "Hello"))
        .await;
    assert_eq!(status, 200);
    let response = claim("alice").await.unwrap();
    assert_eq!(response.status(), 200);
    let first: serde_json::Value = response.json().await.unwrap();
    assert_eq!(first["agent"], "alice");
    let data = &first["assignment"]["data"];
    assert_eq!(data["context"]["previous_agent"], serde_json::Value::Null);
    let conversation = data["conversation_id"].as_str().unwrap().to_owned();

    let (status, _) = daemon
        .post("chat", &chat("m-2", "visitor-7", "Still there?"))
        .await;
    assert_eq!(status, 200);
    let response = claim("bob").await.unwrap();
    let second: serde_json::Value = response.json().await.unwrap();
    let data = &second["assignment"]["data"];
    assert_eq!(data["conversation_id"], conversation.as_str());
    assert_eq!(data["context"]["previous_agent"], "alice");
    let response = daemon
        .api(
            reqwest::Method::GET,
            &format!("/api/v1/conversations/{conversation}"),
        )
        .send()
        .await
        .unwrap();
    let record: serde_json::Value = response.json().await.unwrap();
    assert_eq!(record["agent_id"], "bob", "the latest claim's agent");

    for bad in ["%20", "a%0Ab", &"a".repeat(129)] {
        let response = claim(bad).await.unwrap();
        assert_eq!(response.status(), 400, "{bad}");
        let body: serde_json::Value = response.json().await.unwrap();
        assert_eq!(body["error"]["code"], "invalid_parameter");
    }
}

/// A conversation's messages and decisions over the API; a closed conversation reopens when the
/// customer writes again within `[routing] reopen_window` (72 h by default); with a window of
/// 0 s a new conversation starts.
#[tokio::test]
async fn conversations_are_read_and_closed_over_the_api() {
    let prefix = prefix("conversations");
    let daemon = Daemon::start(DaemonConfig::on(Backend::Embedded, &prefix)).await;
    daemon.wait_ready().await;
    let get = |path: String| daemon.api(reqwest::Method::GET, &path).send();

    for (id, text) in [("m-1", "Hello, a question"), ("m-2", "and a second one")] {
        let (status, _) = daemon.post("chat", &chat(id, "visitor-5", text)).await;
        assert_eq!(status, 200);
    }
    let routed = daemon
        .assignments("general", 2, Duration::from_secs(5))
        .await;
    assert_eq!(routed.len(), 2);
    let conversation_id = routed[0].1["data"]["conversation_id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(
        routed[1].1["data"]["conversation_id"],
        conversation_id.as_str()
    );

    let response = get(format!("/api/v1/conversations/{conversation_id}"))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let conversation: serde_json::Value = response.json().await.unwrap();
    assert_eq!(conversation["status"], "open");
    assert_eq!(conversation["channels"], json!(["webchat"]));
    assert_eq!(conversation["message_count"], 2);
    let texts: Vec<&str> = conversation["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["text"].as_str().unwrap())
        .collect();
    assert_eq!(texts, ["Hello, a question", "and a second one"]);
    let decisions = conversation["decisions"].as_array().unwrap();
    assert_eq!(decisions.len(), 2);
    assert_eq!(decisions[0]["queue"], "general");
    assert!(decisions[0]["explanation"]["queue_reason"].is_string());

    let response = daemon
        .http
        .post(daemon.url(&format!("/api/v1/conversations/{conversation_id}/close")))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let closed: serde_json::Value = response.json().await.unwrap();
    assert_eq!(closed["status"], "closed");
    assert!(closed["closed_at"].is_i64());

    let (status, _) = daemon
        .post("chat", &chat("m-3", "visitor-5", "back again"))
        .await;
    assert_eq!(status, 200);
    let next = daemon
        .assignments("general", 1, Duration::from_secs(5))
        .await;
    assert_eq!(next.len(), 1);
    let data = &next[0].1["data"];
    assert_eq!(
        data["customer_id"], routed[0].1["data"]["customer_id"],
        "same customer"
    );
    assert_eq!(
        data["conversation_id"],
        conversation_id.as_str(),
        "reopened within 72 h"
    );
    // The agent sees what the customer already said.
    let history = data["context"]["history"].as_array().expect("history");
    let said: Vec<(&str, &str)> = history
        .iter()
        .map(|h| (h["channel"].as_str().unwrap(), h["text"].as_str().unwrap()))
        .collect();
    assert_eq!(
        said,
        [
            ("webchat", "Hello, a question"),
            ("webchat", "and a second one")
        ]
    );
    assert!(
        data["context"]["open_since"]
            .as_str()
            .is_some_and(|s| s.ends_with('Z'))
    );
    let reopened: serde_json::Value = get(format!("/api/v1/conversations/{conversation_id}"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(reopened["status"], "open");
    assert_eq!(reopened["message_count"], 3);

    // With no reopen window, a closed conversation stays closed.
    let prefix = common::prefix("conversations-0");
    let mut config = DaemonConfig::on(Backend::Embedded, &prefix);
    config
        .env
        .push(("SWITCHBOARD__ROUTING__REOPEN_WINDOW".into(), "0s".into()));
    let strict = Daemon::start(config).await;
    strict.wait_ready().await;
    strict
        .post("chat", &chat("m-1", "visitor-6", "first"))
        .await;
    let first = strict
        .assignments("general", 1, Duration::from_secs(5))
        .await;
    let first_id = first[0].1["data"]["conversation_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let response = strict
        .http
        .post(strict.url(&format!("/api/v1/conversations/{first_id}/close")))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    strict
        .post("chat", &chat("m-2", "visitor-6", "second"))
        .await;
    let second = strict
        .assignments("general", 1, Duration::from_secs(5))
        .await;
    assert_ne!(
        second[0].1["data"]["conversation_id"],
        first_id.as_str(),
        "a new conversation"
    );

    let response = get("/api/v1/conversations/nope".to_owned()).await.unwrap();
    assert_eq!(response.status(), 404);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "unknown_conversation");
}

/// Dana fills the web chat form with her email and phone, then writes from her phone number,
/// then from her email address: one customer, one conversation, and the third assignment lists
/// the first two messages.
#[tokio::test]
async fn one_customer_across_identities_with_the_history_in_context() {
    let prefix = prefix("dana");
    let daemon = Daemon::start(DaemonConfig::on(Backend::Embedded, &prefix)).await;
    daemon.wait_ready().await;
    let posts = [
        json!({"message_id": "d-1", "customer": {"id": "visitor-dana", "email": " Dana@Example.com ",
               "phone": "+1 (555) 123-4567"}, "text": "Where is my order 1234?"}),
        json!({"message_id": "d-2", "customer": {"phone": "+15551234567"},
               "text": "Hello? Still waiting for order 1234"}),
        json!({"message_id": "d-3", "customer": {"email": "dana@example.com"},
               "text": "Any news on order 1234?"}),
    ];
    let mut routed = Vec::new();
    for post in &posts {
        let (status, body) = daemon.post("chat", &post.to_string()).await;
        assert_eq!(status, 200, "{body}");
        // One at a time, so each sees the previous one.
        let mut got = daemon
            .assignments("general", 1, Duration::from_secs(5))
            .await;
        assert_eq!(got.len(), 1);
        routed.push(got.remove(0).1);
    }
    let customer = routed[0]["data"]["customer_id"].as_str().unwrap();
    let conversation = routed[0]["data"]["conversation_id"].as_str().unwrap();
    for assignment in &routed {
        assert_eq!(assignment["data"]["customer_id"], customer, "one customer");
        assert_eq!(
            assignment["data"]["conversation_id"], conversation,
            "one conversation"
        );
    }
    let third = &routed[2]["data"]["context"];
    let said: Vec<(&str, &str)> = third["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| (h["channel"].as_str().unwrap(), h["text"].as_str().unwrap()))
        .collect();
    assert_eq!(
        said,
        [
            ("webchat", "Where is my order 1234?"),
            ("webchat", "Hello? Still waiting for order 1234")
        ]
    );
    let mut identities: Vec<String> = third["customer"]["identities"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            format!(
                "{}:{}",
                i["kind"].as_str().unwrap(),
                i["address"].as_str().unwrap()
            )
        })
        .collect();
    identities.sort();
    assert_eq!(
        identities,
        [
            "email:dana@example.com",
            "phone:+15551234567",
            "webchat:visitor-dana"
        ]
    );
    // The `+` of an E.164 number, encoded or typed as it reads (not taken for a space); the
    // kind in any case.
    for query in [
        "phone:%2B15551234567",
        "phone:+15551234567",
        "phone:+1%20555%20123%204567",
        "PHONE:+15551234567",
        "Email:dana@example.com",
    ] {
        let response = daemon
            .http
            .get(daemon.url(&format!("/api/v1/customers?identity={query}")))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{query}");
        assert_eq!(
            response.json::<serde_json::Value>().await.unwrap()["id"],
            customer,
            "{query}"
        );
    }
}

#[tokio::test]
async fn customers_merge_by_verified_identity_suggest_by_unverified_and_merge_over_the_api() {
    let prefix = prefix("merges");
    let mut config = DaemonConfig::on(Backend::Embedded, &prefix);
    // `chat` takes anyone's word for an email; `site` sits behind the site's login.
    config.channels = "[[channels]]\nid = \"chat\"\nkind = \"webchat\"\n\n[[channels]]\nid = \"site\"\nkind = \"webchat\"\nverified_identities = [\"email\"]\n".to_owned();
    let running = Daemon::start(config).await;
    running.wait_ready().await;
    let daemon = &running;
    let api = |method: reqwest::Method, path: &str| daemon.api(method, path);
    let send = |channel: &'static str, body: serde_json::Value| async move {
        let (status, answer) = daemon.post(channel, &body.to_string()).await;
        assert_eq!(status, 200, "{answer}");
        let mut got = daemon
            .assignments("general", 1, Duration::from_secs(5))
            .await;
        assert_eq!(got.len(), 1);
        got.remove(0).1["data"].clone()
    };
    let get = |path: String| async move {
        let response = daemon
            .api(reqwest::Method::GET, &path)
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        (status, response.json::<serde_json::Value>().await.unwrap())
    };

    let a = send(
        "chat",
        json!({"message_id": "a-1", "customer": {"id": "visitor-a", "email": "a@example.com"},
               "text": "Hello from A", "attributes": {"tier": "gold"}}),
    )
    .await["customer_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let b = send(
        "chat",
        json!({"message_id": "b-1", "customer": {"id": "visitor-b"}, "text": "Hello from B"}),
    )
    .await["customer_id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_ne!(a, b);

    // Unverified: B types A's email. B stays B, the email stays A's, a suggestion is recorded.
    let routed = send(
        "chat",
        json!({"message_id": "b-2", "customer": {"id": "visitor-b", "email": "A@Example.com"},
               "text": "It's me"}),
    )
    .await;
    assert_eq!(routed["customer_id"], b.as_str());
    let (status, owner) = get("/api/v1/customers?identity=email:%20A@EXAMPLE.com".into()).await;
    assert_eq!((status, owner["id"].as_str()), (200, Some(a.as_str())));
    let (_, merges) = get(format!("/api/v1/customers/{b}/merges")).await;
    let merges = merges["merges"].as_array().unwrap().clone();
    assert_eq!(merges.len(), 1, "{merges:?}");
    assert_eq!(merges[0]["status"], "suggested");
    assert_eq!(merges[0]["from_customer"], a.as_str());
    assert_eq!(
        merges[0]["identity"],
        json!({"kind": "email", "address": "a@example.com"})
    );

    // Verified: C logs in on the site with A's email. A merges into C.
    let c = send(
        "site",
        json!({"message_id": "c-1", "customer": {"id": "visitor-c"}, "text": "Hi"}),
    )
    .await["customer_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let routed = send(
        "site",
        json!({"message_id": "c-2", "customer": {"id": "visitor-c", "email": "a@example.com"},
               "text": "Logged in now"}),
    )
    .await;
    assert_eq!(routed["customer_id"], c.as_str());
    assert_eq!(routed["context"]["customer"]["attributes"]["tier"], "gold");
    let history: Vec<&str> = routed["context"]["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["text"].as_str().unwrap())
        .collect();
    assert_eq!(history, ["Hello from A", "Hi"], "A's history came along");
    let (status, via_a) = get(format!("/api/v1/customers/{a}")).await;
    assert_eq!((status, via_a["id"].as_str()), (200, Some(c.as_str())));
    let (_, merges) = get(format!("/api/v1/customers/{c}/merges")).await;
    let merges = merges["merges"].as_array().unwrap().clone();
    assert_eq!(merges.len(), 2, "{merges:?}");
    assert_eq!(merges[1]["status"], "merged");
    assert_eq!(merges[1]["reason"], "verified identity");
    assert_eq!(merges[1]["from_customer"], a.as_str());
    // B's suggestion about A's email is about C now, A being C's.
    assert_eq!(merges[0]["status"], "suggested");
    assert_eq!(
        (
            merges[0]["into_customer"].as_str(),
            merges[0]["from_customer"].as_str()
        ),
        (Some(b.as_str()), Some(c.as_str()))
    );

    // Explicit: an agent merges B into C.
    let merge = |into: &str, body: serde_json::Value| {
        api(
            reqwest::Method::POST,
            &format!("/api/v1/customers/{into}/merge"),
        )
        .json(&body)
    };
    let response = merge(&c, json!({"from": b})).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let merged: serde_json::Value = response.json().await.unwrap();
    assert_eq!(merged["customer"]["id"], c.as_str());
    let addresses: Vec<&str> = merged["customer"]["identities"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["address"].as_str().unwrap())
        .collect();
    for address in ["visitor-a", "a@example.com", "visitor-b", "visitor-c"] {
        assert!(addresses.contains(&address), "{address} in {addresses:?}");
    }
    let (_, merges) = get(format!("/api/v1/customers/{c}/merges")).await;
    let audit = merges["merges"].as_array().unwrap();
    let entry = audit
        .iter()
        .find(|m| m["id"] == merged["merge_id"])
        .expect("the explicit merge is audited");
    assert_eq!(entry["reason"], "api");
    assert_eq!(entry["from_customer"], b.as_str());
    // B's next message is C's.
    let routed = send(
        "chat",
        json!({"message_id": "b-3", "customer": {"id": "visitor-b"}, "text": "Again"}),
    )
    .await;
    assert_eq!(routed["customer_id"], c.as_str());

    for (body, into, status, code) in [
        (json!({"from": b}), c.as_str(), 409, "already_merged"),
        (
            json!({"from": "nobody"}),
            c.as_str(),
            404,
            "unknown_customer",
        ),
        (json!({"from": c}), c.as_str(), 400, "same_customer"),
        // The other way round: B is C's already.
        (json!({"from": c}), b.as_str(), 409, "already_merged"),
        (json!({"form": b}), c.as_str(), 400, "invalid_body"),
        (json!({"from": " "}), c.as_str(), 400, "invalid_body"),
        (json!({"from": c}), "nobody", 404, "unknown_customer"),
    ] {
        let response = merge(into, body.clone()).send().await.unwrap();
        assert_eq!(response.status().as_u16(), status, "{into} {body}");
        let error: serde_json::Value = response.json().await.unwrap();
        assert_eq!(error["error"]["code"], code, "{into} {body}: {error}");
        if into == b {
            assert_eq!(
                error["error"]["message"],
                format!("customer `{b}` was merged into `{c}` already")
            );
        }
    }
    // Ids are UUIDs, in whichever case they are written.
    let (status, upper) = get(format!("/api/v1/customers/{}", c.to_uppercase())).await;
    assert_eq!((status, upper["id"].as_str()), (200, Some(c.as_str())));

    // Linking an identity: normalized, refused when another customer has it.
    let link = |customer: &str, body: serde_json::Value| {
        api(
            reqwest::Method::POST,
            &format!("/api/v1/customers/{customer}/identities"),
        )
        .json(&body)
    };
    let response = link(&c, json!({"kind": "phone", "address": "+1 (555) 000-1111"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let linked: serde_json::Value = response.json().await.unwrap();
    assert!(
        linked["identities"]
            .as_array()
            .unwrap()
            .contains(&json!({"kind": "phone", "address": "+15550001111"}))
    );
    let d = send(
        "chat",
        json!({"message_id": "d-1", "customer": {"id": "visitor-d"}, "text": "Hi"}),
    )
    .await["customer_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let response = link(&d, json!({"kind": "phone", "address": "+15550001111"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 409);
    let taken: serde_json::Value = response.json().await.unwrap();
    assert_eq!(taken["error"]["code"], "identity_taken");
    assert_eq!(taken["error"]["customer_id"], c.as_str());
    for (body, status, code) in [
        (
            json!({"kind": "fax", "address": "1"}),
            400,
            "invalid_identity",
        ),
        (
            json!({"kind": "email", "address": "nope"}),
            400,
            "invalid_identity",
        ),
        (json!({"kind": "email"}), 400, "invalid_body"),
    ] {
        let response = link(&d, body.clone()).send().await.unwrap();
        assert_eq!(response.status().as_u16(), status, "{body}");
        let error: serde_json::Value = response.json().await.unwrap();
        assert_eq!(error["error"]["code"], code, "{body}: {error}");
    }
    let response = link(
        "nobody",
        json!({"kind": "email", "address": "n@example.com"}),
    )
    .send()
    .await
    .unwrap();
    assert_eq!(response.status(), 404);
}
