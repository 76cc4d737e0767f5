//! Several nodes: `switchboard run` processes sharing one RabbitMQ (router input partitioned by
//! sender through the consistent-hash exchange, one active consumer per partition) and one
//! PostgreSQL store.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use common::*;
use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
use sqlx::Connection as _;

const PARTITIONS: u16 = 4;
const CUSTOMERS: usize = 200;
const PER_CUSTOMER: usize = 10;

/// A fresh PostgreSQL database for one test, dropped at the end.
struct Database {
    admin: String,
    name: String,
    url: String,
}

impl Database {
    async fn create(test: &str) -> Database {
        let admin = std::env::var("SWITCHBOARD_TEST_POSTGRES_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
        let name = format!("sb_{test}_{}", std::process::id());
        let mut connection = admin_connection(&admin).await;
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {name}"
        )))
        .execute(&mut connection)
        .await
        .expect("drop an old test database");
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut connection)
            .await
            .expect("create the test database");
        let base = admin
            .rsplit_once('/')
            .map_or(admin.as_str(), |(base, _)| base);
        let url = format!("{base}/{name}");
        Database { admin, name, url }
    }

    async fn drop_now(&self) {
        if let Ok(mut connection) = sqlx::postgres::PgConnection::connect(&self.admin).await {
            let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            )))
            .execute(&mut connection)
            .await;
        }
    }
}

/// A connection to the maintenance database; a clear failure when PostgreSQL is not there.
async fn admin_connection(url: &str) -> sqlx::postgres::PgConnection {
    sqlx::postgres::PgConnection::connect(url)
        .await
        .unwrap_or_else(|error| {
            panic!(
                "PostgreSQL is needed for this test ({url}: {error}); `.ci/run` starts it, \
                 or set SWITCHBOARD_TEST_POSTGRES_URL"
            )
        })
}

async fn cleanup_partitioned(prefix: &str) {
    let connection = rabbit().await;
    cleanup(&connection, prefix, &["general"]).await;
    let channel = connection.create_channel().await.expect("channel");
    for n in 0..PARTITIONS {
        let _ = channel
            .queue_delete(
                format!("{prefix}.router.{n}").as_str().into(),
                QueueDeleteOptions::default(),
            )
            .await;
    }
    let _ = channel
        .exchange_delete(
            format!("{prefix}.partition").as_str().into(),
            ExchangeDeleteOptions::default(),
        )
        .await;
}

/// A rules directory with one queue, `general`, the default.
fn general_only_rules() -> tempfile::TempDir {
    let rules = tempfile::tempdir().expect("rules dir");
    write_rules(
        rules.path(),
        &[(
            "10-queues.toml",
            "[[queue]]\nname = \"general\"\ndefault = true\n",
        )],
    );
    rules
}

fn node_config(prefix: &str, rules: &std::path::Path, store: &str) -> DaemonConfig {
    let mut config = DaemonConfig::new(prefix);
    config.rules = rules.to_path_buf();
    config.store_url = Some(store.to_owned());
    config.bus_extra = format!("partitions = {PARTITIONS}");
    config
}

/// The sum of a counter's series in a Prometheus scrape.
fn counter_total(metrics: &str, name: &str) -> u64 {
    metrics
        .lines()
        .filter(|line| line.starts_with(name))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// Posts `message` for every customer in `customers`, in sequence order per customer, through
/// node A or B by customer; once A is gone (`a_down`), everything goes to B. A post A did not
/// answer is retried on B with the same `message_id`, as a sender would.
async fn send(
    nodes: Arc<[String; 2]>,
    customers: Vec<usize>,
    sequence: std::ops::Range<usize>,
    a_down: Arc<AtomicBool>,
    sent: Arc<AtomicUsize>,
    pace: Duration,
) {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client");
    for seq in sequence {
        for &customer in &customers {
            let body = chat(
                &format!("c{customer}-m{seq}"),
                &format!("customer-{customer}"),
                &format!("message {seq} from customer {customer}"),
            );
            let mut node = if customer % 2 == 0 && !a_down.load(Ordering::SeqCst) {
                0
            } else {
                1
            };
            let mut attempts = 0;
            loop {
                attempts += 1;
                let answer = http
                    .post(format!("{}/webhooks/chat", nodes[node]))
                    .header("content-type", "application/json")
                    .body(body.clone())
                    .send()
                    .await;
                match answer {
                    Ok(response) if response.status() == 200 => break,
                    Ok(response) if response.status() == 503 && attempts < 50 => {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    Ok(response) => panic!("unexpected {} for {body}", response.status()),
                    Err(_) if node == 0 => node = 1,
                    Err(error) if attempts < 50 => {
                        eprintln!("retrying on B: {error}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    Err(error) => panic!("B does not answer: {error}"),
                }
            }
            sent.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(pace).await;
        }
    }
}

/// Sends `sequence` for all customers with 20 concurrent senders (10 customers each).
async fn send_all(
    nodes: &Arc<[String; 2]>,
    sequence: std::ops::Range<usize>,
    a_down: &Arc<AtomicBool>,
    sent: &Arc<AtomicUsize>,
    pace: Duration,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..20)
        .map(|sender| {
            let customers: Vec<usize> = (0..CUSTOMERS).filter(|c| c % 20 == sender).collect();
            tokio::spawn(send(
                nodes.clone(),
                customers,
                sequence.clone(),
                a_down.clone(),
                sent.clone(),
                pace,
            ))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_nodes_share_the_work_and_a_killed_one_loses_and_reorders_nothing() {
    let prefix = prefix("nodes-two");
    cleanup_partitioned(&prefix).await;
    let database = Database::create("two_nodes").await;
    let rules = general_only_rules();

    let store = database.url.clone();
    let mut a = Daemon::start(node_config(&prefix, rules.path(), &store)).await;
    a.wait_ready().await;
    let b = Daemon::start(node_config(&prefix, rules.path(), &store)).await;
    b.wait_ready().await;
    let nodes: Arc<[String; 2]> = Arc::new([a.url(""), b.url("")]);
    let a_down = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicUsize::new(0));

    // First half, paced over several seconds: A started first and holds every partition;
    // it hands some to B once it sees a second consumer.
    let half = PER_CUSTOMER / 2;
    for sender in send_all(&nodes, 0..half, &a_down, &sent, Duration::from_millis(80)).await {
        sender.await.expect("sender");
    }
    let connection = rabbit().await;
    let queue = format!("{prefix}.queue.general");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while depth(&connection, &queue).await < CUSTOMERS * half
        && tokio::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let by_a = counter_total(&a.metrics().await, "switchboard_assignments_total");
    let by_b = counter_total(&b.metrics().await, "switchboard_assignments_total");
    assert_eq!(
        by_a + by_b,
        (CUSTOMERS * half) as u64,
        "A log:\n{}\nB log:\n{}",
        a.log(),
        b.log()
    );
    assert!(
        by_a > 0 && by_b > 0,
        "both nodes routed part of the first half (A {by_a}, B {by_b})\nA log:\n{}\nB log:\n{}",
        a.log(),
        b.log()
    );

    // Second half: A is killed while it runs.
    let senders = send_all(&nodes, half..PER_CUSTOMER, &a_down, &sent, Duration::ZERO).await;
    while sent.load(Ordering::SeqCst) < CUSTOMERS * half + 300 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    a.kill9();
    a_down.store(true, Ordering::SeqCst);
    for sender in senders {
        sender.await.expect("sender");
    }

    let total = CUSTOMERS * PER_CUSTOMER;
    let assignments = collect(&connection, &queue, total, Duration::from_secs(90)).await;
    let ids = external_ids(&assignments);
    let mut seen: HashMap<&str, usize> = HashMap::new();
    for id in &ids {
        *seen.entry(id.as_str()).or_default() += 1;
    }
    let doubled: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(doubled.is_empty(), "assigned more than once: {doubled:?}");
    assert_eq!(
        seen.len(),
        total,
        "every message assigned\nB log:\n{}",
        b.log()
    );

    // Per customer, in the order sent.
    let mut last: HashMap<String, usize> = HashMap::new();
    for id in &ids {
        let (customer, seq) = id.split_once("-m").expect("c<customer>-m<seq>");
        let seq: usize = seq.parse().expect("sequence number");
        if let Some(previous) = last.insert(customer.to_owned(), seq) {
            assert!(
                seq > previous,
                "{customer}: message {seq} assigned after {previous}\nB log:\n{}",
                b.log()
            );
        }
    }
    // One conversation per customer, every message in it.
    for (_, assignment) in assignments.iter().take(1) {
        let conversation = assignment["data"]["conversation_id"]
            .as_str()
            .expect("conversation id");
        let response = b
            .api(
                reqwest::Method::GET,
                &format!("/api/v1/conversations/{conversation}"),
            )
            .send()
            .await
            .expect("conversation");
        let record: serde_json::Value = response.json().await.expect("JSON");
        assert_eq!(record["message_count"], PER_CUSTOMER as u64, "{record}");
    }

    drop(b);
    cleanup_partitioned(&prefix).await;
    database.drop_now().await;
}

/// PostgreSQL cannot store U+0000: such a message is dead-lettered (on every store alike)
/// instead of failing its batch again and again, and routing goes on.
#[tokio::test]
async fn a_message_postgres_cannot_store_is_dead_lettered_and_routing_goes_on() {
    let prefix = prefix("nodes-nul");
    cleanup_partitioned(&prefix).await;
    let database = Database::create("nul").await;
    let rules = general_only_rules();
    let daemon = Daemon::start(node_config(&prefix, rules.path(), &database.url)).await;
    daemon.wait_ready().await;
    let connection = rabbit().await;

    let event = serde_json::json!({
        "specversion": "1.0", "id": "nul-1", "source": "test", "type": "switchboard.message.received",
        "datacontenttype": "application/json", "time": "2026-11-22T10:00:00Z",
        "data": {
            "message_id": "6f1c2a52-1b1e-5c6a-9d65-1f5b8a8f2b11",
            "channel": {"id": "chat", "kind": "webchat"}, "external_id": "nul-1",
            "sender": {"kind": "webchat", "address": "v-nul"},
            "text": "broken \u{0000} text", "received_at": "2026-11-22T10:00:00Z"
        }
    });
    publish_raw(
        &connection,
        &format!("{prefix}.inbound"),
        "webchat.chat",
        event.to_string().as_bytes(),
    )
    .await;
    let (status, _) = daemon.post("chat", &chat("after-1", "v-ok", "fine")).await;
    assert_eq!(status, 200);
    let routed = collect(
        &connection,
        &format!("{prefix}.queue.general"),
        1,
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(external_ids(&routed), ["after-1"], "{}", daemon.log());
    let dead = collect(
        &connection,
        &format!("{prefix}.dead"),
        1,
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(dead.len(), 1, "{}", daemon.log());
    assert_eq!(dead[0].1["id"], "nul-1");

    drop(daemon);
    cleanup_partitioned(&prefix).await;
    database.drop_now().await;
}

async fn declare_durable(channel: &lapin::Channel, queue: &str) {
    channel
        .queue_declare(
            queue.into(),
            lapin::options::QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            lapin::types::FieldTable::default(),
        )
        .await
        .unwrap_or_else(|e| panic!("declare {queue}: {e}"));
}

/// A partition queue past `[bus] partitions` (left by a run, or made by a node, with more of
/// them) would take a share of the senders with no consumer: the node says so and takes
/// nothing until it is gone.
#[tokio::test]
async fn a_partition_queue_past_the_configured_ones_stops_the_node_with_a_clear_error() {
    let prefix = prefix("nodes-extra");
    cleanup_partitioned(&prefix).await;
    let extra = format!("{prefix}.router.{PARTITIONS}");
    let connection = rabbit().await;
    let channel = connection.create_channel().await.expect("channel");
    declare_durable(&channel, &extra).await;
    let database = Database::create("extra").await;
    let rules = general_only_rules();
    let daemon = Daemon::start(node_config(&prefix, rules.path(), &database.url)).await;
    let expected =
        format!("the partition queue `{extra}` exists, but [bus] partitions = {PARTITIONS}");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !daemon.log().contains(&expected) && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(daemon.log().contains(&expected), "{}", daemon.log());
    let ready = daemon.http.get(daemon.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 503);
    let (status, _) = daemon.post("chat", &chat("x-1", "v-x", "hello")).await;
    assert_eq!(status, 503, "nothing is taken in meanwhile");

    // Once the extra queue is deleted, the node comes up and routes.
    channel
        .queue_delete(extra.as_str().into(), QueueDeleteOptions::default())
        .await
        .expect("delete the extra partition");
    daemon.wait_ready().await;
    let (status, _) = daemon
        .post("chat", &chat("x-2", "v-x", "hello again"))
        .await;
    assert_eq!(status, 200);
    let routed = collect(
        &connection,
        &format!("{prefix}.queue.general"),
        1,
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(routed.len(), 1);
    // The running node's check (every 3 s) finds no extra queue: the broker closes the probe's
    // channel, and the node's connection stays.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let reconnects = counter_total(&daemon.metrics().await, "switchboard_bus_reconnects_total");
    assert_eq!(reconnects, 0, "{}", daemon.log());

    // One appearing while the node runs (another node started with more partitions) is
    // reported on the node's next count: an error in the log and a counter.
    let reported_before = daemon.log().matches(&expected).count();
    declare_durable(&channel, &extra).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let seen = loop {
        let seen = counter_total(
            &daemon.metrics().await,
            "switchboard_router_extra_partitions_seen_total",
        );
        if seen > 0 || std::time::Instant::now() > deadline {
            break seen;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(
        seen > 0,
        "no count of the extra partition: {}",
        daemon.log()
    );
    assert!(
        daemon.log().matches(&expected).count() > reported_before,
        "{}",
        daemon.log()
    );
    channel
        .queue_delete(extra.as_str().into(), QueueDeleteOptions::default())
        .await
        .expect("delete the extra partition again");
    drop(daemon);
    cleanup_partitioned(&prefix).await;
    database.drop_now().await;
}
