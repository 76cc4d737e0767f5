//! One million customers in the store: how long resolving a message's identity and
//! conversation takes (with its history), on SQLite and on PostgreSQL, and the daemon's resident
//! memory serving them.
//!
//! `cargo bench --bench customers`. Environment: `BENCH_CUSTOMERS` (default 1000000),
//! `BENCH_SAMPLES` (2000 messages per store), `BENCH_ONLY` (`sqlite`, `postgres` or `rss`),
//! `SWITCHBOARD_TEST_POSTGRES_URL` (default `postgres://postgres@127.0.0.1:5432/test`; a database
//! `sb_bench_customers` is created next to it and dropped afterwards, unless `BENCH_KEEP` is
//! set; so is the SQLite file).
//!
//! Each sample is one `route_batch` of one message from a random existing customer (by email):
//! identity lookup, customer, its open conversation, contacts in the last 24 h, its last 10
//! messages, the decision callback, and the writes and commit of the message and decision. So
//! the figure is an upper bound of resolution alone.

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlx::Connection as _;
use switchboard::store::{self, Resolved, Routed, Store};
use switchboard_channel::{ChannelRef, NormalizedMessage, Sender};

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A small deterministic generator: the same customers every run.
struct Lcg(u64);

impl Lcg {
    fn below(&mut self, n: usize) -> usize {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 33) as usize) % n
    }
}

fn message(sample: usize, customer: usize) -> NormalizedMessage {
    NormalizedMessage {
        message_id: NormalizedMessage::stable_id("bench", &format!("s-{sample}")),
        channel: ChannelRef {
            id: "bench".into(),
            kind: "email".into(),
        },
        external_id: format!("s-{sample}"),
        thread_key: None,
        sender: Sender {
            kind: "email".into(),
            address: format!("user{customer}@example.com"),
            name: None,
        },
        subject: None,
        text: "Any news about my order?".into(),
        attachments: vec![],
        received_at: time::OffsetDateTime::now_utc(),
        auto_submitted: false,
        metadata: Default::default(),
    }
}

fn now_ms() -> i64 {
    i64::try_from(time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000).unwrap()
}

/// Routes `samples` messages one by one. Returns the sorted latencies in ms of resolution
/// (from the call until the store hands the resolved customer and conversation to the
/// decision) and of the whole call (with the writes and the commit).
async fn measure(store: &dyn Store, customers: usize, samples: usize) -> (Vec<f64>, Vec<f64>) {
    let mut random = Lcg(42);
    let resolved_at = std::sync::Mutex::new(Instant::now());
    let decide = |_: &NormalizedMessage, _: &serde_json::value::RawValue, resolved: &Resolved| {
        *resolved_at.lock().unwrap() = Instant::now();
        assert!(
            !resolved.conversation.new,
            "an existing customer's conversation"
        );
        Routed {
            queue: "general".into(),
            urgency: 0,
            priority: 0,
            assignment: format!("{{\"history\": {}}}", resolved.history.len()),
        }
    };
    let mut resolution = Vec::with_capacity(samples);
    let mut whole = Vec::with_capacity(samples);
    for sample in 0..samples {
        let message = message(sample, random.below(customers));
        let started = Instant::now();
        store
            .route_batch(std::slice::from_ref(&message), now_ms(), &[], &decide)
            .await
            .expect("route");
        whole.push(started.elapsed().as_secs_f64() * 1000.0);
        let resolved = *resolved_at.lock().unwrap();
        resolution.push((resolved - started).as_secs_f64() * 1000.0);
    }
    resolution.sort_by(f64::total_cmp);
    whole.sort_by(f64::total_cmp);
    (resolution, whole)
}

fn percentiles(latencies: &[f64]) -> String {
    let at = |q: f64| latencies[((latencies.len() as f64 * q) as usize).min(latencies.len() - 1)];
    format!(
        "p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        at(0.5),
        at(0.99),
        latencies[latencies.len() - 1]
    )
}

fn report(name: &str, customers: usize, seeded: Duration, latencies: &(Vec<f64>, Vec<f64>)) {
    let (resolution, whole) = latencies;
    println!(
        "{name}: {customers} customers (seeded in {:.0} s), {} messages: resolution {}; \
         whole route_batch with writes and commit {}",
        seeded.as_secs_f64(),
        whole.len(),
        percentiles(resolution),
        percentiles(whole),
    );
}

/// Seeds SQLite with `customers` customers, each with an email identity, an open conversation
/// and one earlier message with its (published) decision.
async fn seed_sqlite(path: &std::path::Path, customers: usize) -> Duration {
    let started = Instant::now();
    let url = format!("sqlite://{}", path.display());
    store::SqliteStore::open(&url)
        .await
        .expect("open")
        .close()
        .await;
    let mut connection = sqlx::SqliteConnection::connect(&url)
        .await
        .expect("connect");
    let series = format!(
        "WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i < {})",
        customers - 1
    );
    for statement in [
        "INSERT INTO customers (id, attributes, created_at, last_seen_at)
         SELECT 'c' || i, '{\"tier\": \"standard\"}', 0, 0 FROM n",
        "INSERT INTO identities (kind, address, customer_id, created_at)
         SELECT 'email', 'user' || i || '@example.com', 'c' || i, 0 FROM n",
        "INSERT INTO conversations (id, customer_id, status, channels, message_count, opened_at,
                                    last_activity_at)
         SELECT 'v' || i, 'c' || i, 'open', '[\"email\"]', 1, 0, 0 FROM n",
        "INSERT INTO messages (channel_id, external_id, message_id, conversation_id, customer_id,
                               direction, envelope, received_at)
         SELECT 'seed', 'm' || i, 'mid' || i, 'v' || i, 'c' || i, 'inbound',
                json_object('channel', json_object('id', 'seed', 'kind', 'email'),
                            'text', 'Order ' || i || ' has not arrived'), 0
         FROM n",
        "INSERT INTO decisions (channel_id, external_id, conversation_id, queue, urgency,
                                priority, assignment, decided_at)
         SELECT 'seed', 'm' || i, 'v' || i, 'general', 0, 0, '{\"seeded\": true}', 0 FROM n",
        "INSERT INTO published_decisions (channel_id, external_id) SELECT 'seed', 'm' || i FROM n",
    ] {
        sqlx::query(sqlx::AssertSqlSafe(format!("{series} {statement}")))
            .execute(&mut connection)
            .await
            .expect("seed");
    }
    connection.close().await.expect("close");
    started.elapsed()
}

async fn seed_postgres(url: &str, customers: usize) -> Duration {
    let started = Instant::now();
    store::PgStore::open(url).await.expect("open").close().await;
    let mut connection = sqlx::PgConnection::connect(url).await.expect("connect");
    for statement in [
        "INSERT INTO customers (id, attributes, created_at, last_seen_at)
         SELECT 'c' || i, '{\"tier\": \"standard\"}'::jsonb, 0, 0 FROM n",
        "INSERT INTO identities (kind, address, customer_id, created_at)
         SELECT 'email', 'user' || i || '@example.com', 'c' || i, 0 FROM n",
        "INSERT INTO conversations (id, customer_id, status, channels, message_count, opened_at,
                                    last_activity_at)
         SELECT 'v' || i, 'c' || i, 'open', '[\"email\"]'::jsonb, 1, 0, 0 FROM n",
        "INSERT INTO messages (channel_id, external_id, message_id, conversation_id, customer_id,
                               direction, envelope, received_at)
         SELECT 'seed', 'm' || i, 'mid' || i, 'v' || i, 'c' || i, 'inbound',
                jsonb_build_object('channel', jsonb_build_object('id', 'seed', 'kind', 'email'),
                                   'text', 'Order ' || i || ' has not arrived'), 0
         FROM n",
        "INSERT INTO decisions (channel_id, external_id, conversation_id, queue, urgency,
                                priority, assignment, decided_at)
         SELECT 'seed', 'm' || i, 'v' || i, 'general', 0, 0, '{\"seeded\": true}', 0 FROM n",
        "INSERT INTO published_decisions (channel_id, external_id) SELECT 'seed', 'm' || i FROM n",
    ] {
        let statement = format!(
            "WITH n(i) AS (SELECT generate_series(0, {})) {statement}",
            customers - 1
        );
        sqlx::query(sqlx::AssertSqlSafe(statement))
            .execute(&mut connection)
            .await
            .expect("seed");
    }
    // A store that has been running: statistics, hint bits and the visibility map set by
    // (auto)vacuum, and the seed's writes checkpointed, so the samples do not pay for the
    // bulk load (a checkpoint of the seed's gigabyte of WAL fell in some runs' samples).
    for statement in ["VACUUM ANALYZE", "CHECKPOINT"] {
        sqlx::query(statement)
            .execute(&mut connection)
            .await
            .expect(statement);
    }
    connection.close().await.expect("close");
    started.elapsed()
}

/// The daemon on the seeded SQLite file (single node), `samples` web chat posts from existing
/// customers; its resident memory (now and peak) in MiB.
async fn daemon_rss(db: &std::path::Path, customers: usize, samples: usize) -> (f64, f64) {
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = dir.path().join("sb.toml");
    let rules = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("routing-rules");
    std::fs::write(
        &config,
        format!(
            "[store]\nurl = \"sqlite://{}\"\n[http]\nlisten = \"127.0.0.1:{port}\"\n[routing]\nrules = \"{}\"\n[[channels]]\nid = \"chat\"\nkind = \"webchat\"\n",
            db.display(),
            rules.display()
        ),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .args(["run", "-c", config.to_str().unwrap()])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let http = reqwest::Client::new();
    let ready = format!("http://127.0.0.1:{port}/readyz");
    for _ in 0..400 {
        if http
            .get(&ready)
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let mut random = Lcg(7);
    let url = format!("http://127.0.0.1:{port}/webhooks/chat");
    for sample in 0..samples {
        let customer = random.below(customers);
        let body = serde_json::json!({
            "message_id": format!("r-{sample}"),
            "customer": {"email": format!("user{customer}@example.com")},
            "text": "Where is my order? It has not arrived.",
        });
        let response = http.post(&url).json(&body).send().await.expect("post");
        assert_eq!(response.status(), 200);
    }
    // Let the router catch up before reading the memory.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let status = std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap();
    let kib = |key: &str| {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let rss = (kib("VmRSS:") / 1024.0, kib("VmHWM:") / 1024.0);
    let _ = child.kill();
    let _ = child.wait();
    rss
}

/// The store is driven from a current-thread runtime, as the router drives it in the daemon
/// (`Router::run_on_own_thread`): a statement's hand-off to SQLite's thread and back then costs
/// ~10 µs instead of ~50–100 µs on a multi-thread runtime, and that is the latency the router
/// sees. (Before the fifth session this bench used `#[tokio::main]`, the multi-thread runtime.)
fn main() {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(run());
}

async fn run() {
    let customers = env_usize("BENCH_CUSTOMERS", 1_000_000);
    let samples = env_usize("BENCH_SAMPLES", 2000);
    let only = std::env::var("BENCH_ONLY").unwrap_or_default();
    let mut dir = tempfile::tempdir().unwrap();
    dir.disable_cleanup(std::env::var_os("BENCH_KEEP").is_some());
    let db = dir.path().join("customers.db");

    if only.is_empty() || only == "sqlite" || only == "rss" {
        let seeded = seed_sqlite(&db, customers).await;
        if only != "rss" {
            let store = store::SqliteStore::open(&format!("sqlite://{}", db.display()))
                .await
                .expect("open");
            let latencies = measure(&store, customers, samples).await;
            report("sqlite", customers, seeded, &latencies);
            store.close().await;
        }
        if std::env::var_os("BENCH_KEEP").is_some() {
            println!("kept the SQLite store: {}", db.display());
        }
        if only.is_empty() || only == "rss" {
            let (rss, peak) = daemon_rss(&db, customers, samples).await;
            println!(
                "daemon on the {customers}-customer SQLite store after {samples} messages: RSS {rss:.0} MiB (peak {peak:.0} MiB)"
            );
        }
    }
    if only.is_empty() || only == "postgres" {
        let admin = std::env::var("SWITCHBOARD_TEST_POSTGRES_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
        let base = admin.rsplit_once('/').map_or(admin.as_str(), |(b, _)| b);
        let url = format!("{base}/sb_bench_customers");
        let mut connection = sqlx::PgConnection::connect(&admin)
            .await
            .expect("PostgreSQL");
        for statement in [
            "DROP DATABASE IF EXISTS sb_bench_customers WITH (FORCE)",
            "CREATE DATABASE sb_bench_customers",
        ] {
            sqlx::query(statement)
                .execute(&mut connection)
                .await
                .expect("database");
        }
        let seeded = seed_postgres(&url, customers).await;
        let store: Arc<dyn Store> = Arc::new(store::PgStore::open(&url).await.expect("open"));
        let latencies = measure(store.as_ref(), customers, samples).await;
        report("postgres", customers, seeded, &latencies);
        store.close().await;
        if std::env::var_os("BENCH_KEEP").is_some() {
            println!("kept the database: {url}");
        } else {
            sqlx::query("DROP DATABASE sb_bench_customers WITH (FORCE)")
                .execute(&mut connection)
                .await
                .expect("drop");
        }
    }
}
