//! Router hop throughput against a raw lapin relay on the same broker, and webhook→assignment
//! latency at a fixed rate through the real daemon.
//!
//! `cargo bench --bench router_hop` (RabbitMQ on 127.0.0.1:5672). Options through the
//! environment: `BENCH_MESSAGES` (default 20000), `BENCH_RUNS` (5), `BENCH_RATE` (1000/s),
//! `BENCH_SECONDS` (10), `BENCH_ONLY` (`hop` or `raw`: profile one side; the ratio is then NaN;
//! `router`: the router and its store over an in-memory link, no broker, see [`router_alone`]),
//! `BENCH_SENDERS` (1000: how many customers the messages come from), `BENCH_RULES` (a rules
//! directory instead of the shipped `routing-rules/`), `BENCH_STORE=none`
//! (diagnostic: the hop with a store that records nothing and resolves every message to a new
//! customer, i.e. the ceiling the bus and the decision leave; not the product's figure) or
//! `BENCH_STORE=postgres://…` (the hop on a PostgreSQL store instead of SQLite),
//! `BENCH_KEEP` (keep the hop's SQLite file and print its path, to look at what was written),
//! `BENCH_THREADS` (also print the hop's CPU and context switches per message by thread of this
//! process),
//! `BENCH_PARTITIONS` (the hop's router input as `[bus] partitions` queues; needs RabbitMQ's
//! consistent-hash plugin);
//! diagnostics of the relay side (not the product's figure, which uses none of them):
//! `BENCH_RELAY_TX` (the relay publishes and acks in an AMQP transaction per batch, as the
//! router does, instead of awaiting confirms), `BENCH_RELAY_PAD` (bytes added to each body
//! the relay publishes, to match the larger assignments), `BENCH_RELAY_PROPS` (`all`, or some of
//! `content_type,message_id,type,timestamp,headers`: publish with the assignment's properties),
//! `BENCH_RELAY_TTL` (milliseconds: a per-message expiration, as an SLA gives an assignment) and
//! `BENCH_RELAY_QV` (the target queue's `x-queue-version`, 1 or 2).
//!
//! Besides the rates, each run reports the CPU time per message of this process (the relay
//! client, or the router with its store) and of the broker (`beam.smp`, read from `/proc`):
//! unlike the rates, which swing ±10% from run to run on this shared 2-core machine, it says
//! where the cost is.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use switchboard::bus::amqp::AmqpBus;
use switchboard::config::BusConfig;
use switchboard::router::rules::RuleSet;
use switchboard::router::service::Router;
use switchboard::store::{PgStore, SqliteStore, Store};
use switchboard_channel::envelope::{CLOUDEVENTS_CONTENT_TYPE, event_type};
use switchboard_channel::{ChannelRef, CloudEvent, NormalizedMessage, Sender};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
const PREFETCH: u16 = 512;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn message(i: usize) -> NormalizedMessage {
    let external_id = format!("bench-{i}");
    NormalizedMessage {
        message_id: NormalizedMessage::stable_id("chat", &external_id),
        channel: ChannelRef {
            id: "chat".into(),
            kind: "webchat".into(),
        },
        external_id,
        thread_key: None,
        sender: Sender {
            kind: "webchat".into(),
            address: format!("visitor-{}", i % env_usize("BENCH_SENDERS", 1000)),
            name: None,
        },
        subject: None,
        text: if i.is_multiple_of(3) {
            "I need a refund for my last invoice".into()
        } else {
            "Where is my order? It has been a week.".into()
        },
        attachments: vec![],
        received_at: time::OffsetDateTime::now_utc(),
        auto_submitted: false,
        metadata: Default::default(),
    }
}

async fn connect() -> Connection {
    Connection::connect(AMQP_URL, ConnectionProperties::default())
        .await
        .expect("RabbitMQ on 127.0.0.1:5672")
}

/// Publishes `bodies` with confirms, pipelined, each with the partition-key header of its
/// sender, as the adapters publish them (body `i` is [`message`]`(i)`).
async fn fill(connection: &Connection, exchange: &str, key: &str, bodies: &[Vec<u8>]) {
    let channel = connection.create_channel().await.unwrap();
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    for (c, chunk) in bodies.chunks(1000).enumerate() {
        for (i, body) in chunk.iter().enumerate() {
            let sender = switchboard::bus::partition_key(&message(c * 1000 + i).sender);
            let mut headers = FieldTable::default();
            headers.insert(
                switchboard::bus::PARTITION_KEY_HEADER.into(),
                lapin::types::AMQPValue::LongString(sender.into()),
            );
            let properties = BasicProperties::default()
                .with_delivery_mode(2)
                .with_headers(headers);
            channel
                .basic_publish(
                    exchange.into(),
                    key.into(),
                    BasicPublishOptions::default(),
                    body,
                    properties,
                )
                .await
                .unwrap();
        }
        channel.wait_for_confirms().await.unwrap();
    }
}

/// CPU time (user + system) a process has used so far, in clock ticks of 10 ms; `None` where
/// `/proc` cannot tell.
fn cpu_ticks(pid: u32) -> Option<u64> {
    cpu_ticks_at(std::path::Path::new(&format!("/proc/{pid}/stat")))
}

fn cpu_ticks_at(path: &std::path::Path) -> Option<u64> {
    let stat = std::fs::read_to_string(path).ok()?;
    // Fields after the command name (which may hold spaces), from field 3 on.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

/// This process's threads: id → (name, CPU ticks, context switches).
fn threads() -> HashMap<u32, (String, u64, u64)> {
    let mut threads = HashMap::new();
    for task in std::fs::read_dir("/proc/self/task")
        .into_iter()
        .flatten()
        .flatten()
    {
        let Some(tid) = task.file_name().to_str().and_then(|t| t.parse().ok()) else {
            continue;
        };
        let name = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        let switches = std::fs::read_to_string(task.path().join("status"))
            .unwrap_or_default()
            .lines()
            .filter(|line| line.contains("ctxt_switches:"))
            .filter_map(|line| line.split_whitespace().nth(1)?.parse::<u64>().ok())
            .sum();
        if let Some(ticks) = cpu_ticks_at(&task.path().join("stat")) {
            threads.insert(tid, (name.trim().to_owned(), ticks, switches));
        }
    }
    threads
}

/// The RabbitMQ server's process (`beam.smp`) on this machine, if there is one.
fn broker_pid() -> Option<u32> {
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .find_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let comm = std::fs::read_to_string(entry.path().join("comm")).ok()?;
            (comm.trim() == "beam.smp").then_some(pid)
        })
}

/// Throughput of one side, and the CPU it cost per message: this process (the relay, or the
/// router with its store) and the broker, in microseconds.
struct Side {
    rate: f64,
    ours_us: f64,
    broker_us: f64,
}

/// Measures CPU from now until [`Meter::finish`].
struct Meter {
    started: Instant,
    threads: HashMap<u32, (String, u64, u64)>,
    ours: Option<u64>,
    broker: Option<(u32, u64)>,
}

impl Meter {
    fn start() -> Self {
        let broker = broker_pid().and_then(|pid| Some((pid, cpu_ticks(pid)?)));
        Self {
            started: Instant::now(),
            threads: threads(),
            ours: cpu_ticks(std::process::id()),
            broker,
        }
    }

    fn finish(self, n: usize) -> Side {
        let elapsed = self.started.elapsed();
        if std::env::var("BENCH_THREADS").is_ok() {
            // Per thread name: (CPU µs, context switches) per message.
            let mut by_name: std::collections::BTreeMap<String, (f64, f64)> = Default::default();
            for (tid, (name, ticks, switches)) in threads() {
                let (ticks_before, switches_before) =
                    self.threads.get(&tid).map_or((0, 0), |(_, t, s)| (*t, *s));
                let entry = by_name.entry(name).or_default();
                entry.0 +=
                    ticks.checked_sub(ticks_before).unwrap_or(ticks) as f64 * 10_000.0 / n as f64;
                entry.1 +=
                    switches.checked_sub(switches_before).unwrap_or(switches) as f64 / n as f64;
            }
            by_name.retain(|_, (us, switches)| *us > 0.0 || *switches > 0.0);
            eprintln!("per message by thread (CPU µs, context switches): {by_name:.2?}");
        }
        let per_message = |before: Option<u64>, after: Option<u64>| match (before, after) {
            (Some(before), Some(after)) => {
                after.saturating_sub(before) as f64 * 10_000.0 / n as f64
            }
            _ => f64::NAN,
        };
        Side {
            rate: n as f64 / elapsed.as_secs_f64(),
            ours_us: per_message(self.ours, cpu_ticks(std::process::id())),
            broker_us: per_message(
                self.broker.map(|(_, ticks)| ticks),
                self.broker.and_then(|(pid, _)| cpu_ticks(pid)),
            ),
        }
    }
}

/// Waits until `queues` hold `total` messages between them. One channel, polled every 10 ms:
/// a channel opened per poll and queue (as this bench first did) is broker work the relay
/// side does not carry, measured against the hop.
async fn wait_depth(connection: &Connection, queues: &[String], total: u32) {
    let channel = connection.create_channel().await.unwrap();
    loop {
        let mut sum = 0;
        for q in queues {
            sum += channel
                .queue_declare(
                    q.as_str().into(),
                    QueueDeclareOptions {
                        passive: true,
                        ..Default::default()
                    },
                    FieldTable::default(),
                )
                .await
                .unwrap()
                .message_count();
        }
        if sum >= total {
            let _ = channel.close(200, "".into()).await;
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn delete_prefix(connection: &Connection, prefix: &str, queues: &[String]) {
    let channel = connection.create_channel().await.unwrap();
    let partitions = (0..env_usize("BENCH_PARTITIONS", 0)).map(|n| format!("{prefix}.router.{n}"));
    for q in queues
        .iter()
        .cloned()
        .chain([format!("{prefix}.router"), format!("{prefix}.dead")])
        .chain(partitions)
    {
        let _ = channel
            .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
    for e in [
        "inbound",
        "assign",
        "outbound",
        "events",
        "dlx",
        "expired",
        "partition",
    ] {
        let _ = channel
            .exchange_delete(format!("{prefix}.{e}").as_str().into(), Default::default())
            .await;
    }
}

/// `BENCH_STORE=none`: decides every message against a fresh customer and records nothing.
struct NoStore;

#[async_trait::async_trait]
impl Store for NoStore {
    async fn route_batch(
        &self,
        messages: &[NormalizedMessage],
        _now_ms: i64,
        _published: &[(String, String)],
        decide: &switchboard::store::DecideFn<'_>,
    ) -> Result<Vec<switchboard::store::RouteOutcome>, switchboard::store::StoreError> {
        Ok(messages
            .iter()
            .map(|message| {
                let resolved = switchboard::store::Resolved {
                    customer: Default::default(),
                    conversation: Default::default(),
                    history: Vec::new(),
                    conversation_opened_at: 0,
                };
                let envelope = serde_json::value::to_raw_value(message).unwrap();
                let routed = decide(message, &envelope, &resolved);
                switchboard::store::RouteOutcome::New {
                    queue: routed.queue,
                    priority: routed.priority,
                    assignment: routed.assignment,
                }
            })
            .collect())
    }
    async fn decision(
        &self,
        _: &str,
        _: &str,
    ) -> Result<Option<switchboard::store::StoredDecision>, switchboard::store::StoreError> {
        Ok(None)
    }
    async fn mark_published(
        &self,
        _: &[(String, String)],
    ) -> Result<(), switchboard::store::StoreError> {
        Ok(())
    }
    async fn customer(
        &self,
        _: &str,
    ) -> Result<Option<switchboard::store::CustomerRecord>, switchboard::store::StoreError> {
        Ok(None)
    }
    async fn customer_by_identity(
        &self,
        _: &str,
        _: &str,
    ) -> Result<Option<switchboard::store::CustomerRecord>, switchboard::store::StoreError> {
        Ok(None)
    }
    async fn patch_attributes(
        &self,
        _: &str,
        _: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<Option<switchboard::store::CustomerRecord>, switchboard::store::StoreError> {
        Ok(None)
    }
    async fn conversation(
        &self,
        _: &str,
    ) -> Result<Option<switchboard::store::ConversationRecord>, switchboard::store::StoreError>
    {
        Ok(None)
    }
    async fn close_conversation(
        &self,
        _: &str,
        _: i64,
    ) -> Result<Option<switchboard::store::ConversationRecord>, switchboard::store::StoreError>
    {
        Ok(None)
    }
    async fn assign_agent(&self, _: &str, _: &str) -> Result<bool, switchboard::store::StoreError> {
        Ok(false)
    }
    async fn merge(
        &self,
        _: &str,
        from: &str,
        _: i64,
    ) -> Result<switchboard::store::MergeOutcome, switchboard::store::StoreError> {
        Ok(switchboard::store::MergeOutcome::Unknown(from.to_owned()))
    }
    async fn link_identity(
        &self,
        _: &str,
        _: &str,
        _: &str,
        _: i64,
    ) -> Result<switchboard::store::LinkOutcome, switchboard::store::StoreError> {
        Ok(switchboard::store::LinkOutcome::UnknownCustomer)
    }
    async fn merges(
        &self,
        _: &str,
    ) -> Result<Vec<serde_json::Value>, switchboard::store::StoreError> {
        Ok(Vec::new())
    }
    async fn ping(&self) -> Result<(), switchboard::store::StoreError> {
        Ok(())
    }
    async fn close(&self) {}
}

/// The router hop: consume normalized message → decide → store → publish assignment → ack.
async fn router_hop(n: usize) -> Side {
    let connection = connect().await;
    let prefix = format!(
        "bench-hop-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let rules_dir =
        std::env::var("BENCH_RULES").map_or_else(|_| repo().join("routing-rules"), PathBuf::from);
    let rules = RuleSet::load_dir(&rules_dir).unwrap();
    let agent_queues: Vec<String> = rules
        .queue_names()
        .iter()
        .map(|q| format!("{prefix}.queue.{q}"))
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let store_url = std::env::var("BENCH_STORE").unwrap_or_default();
    let store: Arc<dyn Store> = if store_url == "none" {
        Arc::new(NoStore)
    } else if store_url.starts_with("postgres") {
        let store = PgStore::open(&store_url).await.unwrap();
        // The messages are the same in every run: start from an empty store, as with SQLite.
        let pool = sqlx::PgPool::connect(&store_url).await.unwrap();
        sqlx::query(
            "TRUNCATE customers, identities, conversations, messages, decisions,
                      published_decisions, merges",
        )
        .execute(&pool)
        .await
        .unwrap();
        pool.close().await;
        Arc::new(store)
    } else {
        Arc::new(
            SqliteStore::open(&format!("sqlite://{}", dir.path().join("b.db").display()))
                .await
                .unwrap(),
        )
    };
    let config = BusConfig {
        prefix: prefix.clone(),
        prefetch: PREFETCH,
        partitions: u16::try_from(env_usize("BENCH_PARTITIONS", 0)).unwrap(),
        ..BusConfig::default()
    };
    let tracker = TaskTracker::new();
    let cancel = CancellationToken::new();
    let bus = AmqpBus::start(
        AMQP_URL,
        &config,
        rules.queue_names(),
        &tracker,
        cancel.clone(),
    );
    assert!(bus.wait_connected(Duration::from_secs(10)).await);

    let bodies: Vec<Vec<u8>> = (0..n)
        .map(|i| serde_json::to_vec(&CloudEvent::message_received(message(i))).unwrap())
        .collect();
    fill(
        &connection,
        &format!("{prefix}.inbound"),
        "webchat.chat",
        &bodies,
    )
    .await;

    let router = Router {
        rules: Arc::new(ArcSwap::from_pointee(rules)),
        store,
        loads: Default::default(),
    };
    let meter = Meter::start();
    let stop = CancellationToken::new();
    let handle = tokio::spawn(router.run_on_own_thread(bus.router_link(), stop.clone()));
    wait_depth(&connection, &agent_queues, n as u32).await;
    let side = meter.finish(n);
    stop.cancel();
    let _ = handle.await;
    cancel.cancel();
    tracker.close();
    tracker.wait().await;
    delete_prefix(&connection, &prefix, &agent_queues).await;
    if std::env::var("BENCH_KEEP").is_ok() {
        eprintln!("the hop's store: {}", dir.keep().join("b.db").display());
    }
    side
}

/// `BENCH_ONLY=router`: the router and its SQLite store alone, over an in-memory link that
/// always holds the next batch and commits at once: no broker, no RabbitMQ needed. Under
/// callgrind its instruction count repeats to ~0.15 % from run to run, where the hop's rate
/// swings by ±10 %: the figure to compare router changes by (PERFORMANCE.md, eighth session).
async fn router_alone(n: usize) -> Side {
    struct MemoryLink {
        bodies: std::collections::VecDeque<Vec<u8>>,
        next_tag: u64,
        committed: usize,
        total: usize,
        done: CancellationToken,
    }
    impl MemoryLink {
        fn take(&mut self, max: usize) -> Vec<switchboard::bus::Delivery> {
            let count = max.min(self.bodies.len());
            self.bodies
                .drain(..count)
                .map(|body| {
                    self.next_tag += 1;
                    switchboard::bus::Delivery {
                        tag: self.next_tag,
                        body,
                        redelivered: false,
                        death_reason: None,
                    }
                })
                .collect()
        }
    }
    #[async_trait::async_trait]
    impl switchboard::bus::RouterLink for MemoryLink {
        async fn next_batch(
            &mut self,
            max: usize,
        ) -> Result<Vec<switchboard::bus::Delivery>, switchboard::bus::BusError> {
            if self.bodies.is_empty() {
                std::future::pending::<()>().await;
            }
            Ok(self.take(max))
        }
        async fn ready_batch(
            &mut self,
            max: usize,
        ) -> Result<Vec<switchboard::bus::Delivery>, switchboard::bus::BusError> {
            Ok(self.take(max))
        }
        async fn commit(
            &mut self,
            outcomes: Vec<(u64, switchboard::bus::Outcome)>,
        ) -> Result<switchboard::bus::PendingCommit, switchboard::bus::BusError> {
            self.committed += outcomes
                .iter()
                .filter(|(_, outcome)| matches!(outcome, switchboard::bus::Outcome::Assign(_)))
                .count();
            if self.committed >= self.total {
                self.done.cancel();
            }
            Ok(Box::pin(async { Ok(()) }))
        }
        async fn reset(&mut self) -> Result<(), switchboard::bus::BusError> {
            Ok(())
        }
    }

    let rules_dir =
        std::env::var("BENCH_RULES").map_or_else(|_| repo().join("routing-rules"), PathBuf::from);
    let rules = RuleSet::load_dir(&rules_dir).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&format!("sqlite://{}", dir.path().join("b.db").display()))
        .await
        .unwrap();
    let done = CancellationToken::new();
    let link = MemoryLink {
        bodies: (0..n)
            .map(|i| serde_json::to_vec(&CloudEvent::message_received(message(i))).unwrap())
            .collect(),
        next_tag: 0,
        committed: 0,
        total: n,
        done: done.clone(),
    };
    let router = Router {
        rules: Arc::new(ArcSwap::from_pointee(rules)),
        store: Arc::new(store),
        loads: Default::default(),
    };
    let meter = Meter::start();
    router.run_on_own_thread(link, done).await;
    let side = meter.finish(n);
    if std::env::var("BENCH_KEEP").is_ok() {
        eprintln!("the router's store: {}", dir.keep().join("b.db").display());
    }
    Side {
        broker_us: f64::NAN,
        ..side
    }
}

/// The raw relay: consume → republish with confirm → ack, no work, same payloads and prefetch,
/// confirms awaited per batch of what the consumer has in hand.
async fn raw_relay(n: usize) -> Side {
    let connection = connect().await;
    let prefix = format!(
        "bench-raw-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let (source, target) = (format!("{prefix}.source"), format!("{prefix}.target"));
    let setup = connection.create_channel().await.unwrap();
    let mut quorum = FieldTable::default();
    quorum.insert(
        "x-queue-type".into(),
        lapin::types::AMQPValue::LongString("quorum".into()),
    );
    setup
        .queue_declare(
            source.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            quorum,
        )
        .await
        .unwrap();
    let mut priority = FieldTable::default();
    priority.insert(
        "x-max-priority".into(),
        lapin::types::AMQPValue::ShortShortUInt(10),
    );
    if let Ok(v) = std::env::var("BENCH_RELAY_QV") {
        priority.insert(
            "x-queue-version".into(),
            lapin::types::AMQPValue::ShortShortUInt(v.parse().unwrap()),
        );
    }
    setup
        .queue_declare(
            target.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            priority,
        )
        .await
        .unwrap();
    let bodies: Vec<Vec<u8>> = (0..n)
        .map(|i| serde_json::to_vec(&CloudEvent::message_received(message(i))).unwrap())
        .collect();
    fill(&connection, "", &source, &bodies).await;

    let channel = connection.create_channel().await.unwrap();
    channel
        .basic_qos(PREFETCH, BasicQosOptions::default())
        .await
        .unwrap();
    let transaction = std::env::var_os("BENCH_RELAY_TX").is_some();
    let pad = vec![b' '; env_usize("BENCH_RELAY_PAD", 0)];
    let props = std::env::var("BENCH_RELAY_PROPS").ok();
    let ttl = std::env::var("BENCH_RELAY_TTL").ok();
    if transaction {
        channel.tx_select().await.unwrap();
    } else {
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
    }
    let mut consumer = channel
        .basic_consume(
            source.as_str().into(),
            "relay".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let meter = Meter::start();
    let mut relayed = 0;
    while relayed < n {
        let first = consumer.next().await.unwrap().unwrap();
        let mut batch = vec![first];
        while let Some(Some(Ok(d))) = futures::FutureExt::now_or_never(consumer.next()) {
            batch.push(d);
        }
        for d in &batch {
            let body: std::borrow::Cow<'_, [u8]> = if pad.is_empty() {
                (&d.data[..]).into()
            } else {
                [&d.data[..], &pad[..]].concat().into()
            };
            channel
                .basic_publish(
                    "".into(),
                    target.as_str().into(),
                    BasicPublishOptions::default(),
                    &body,
                    relay_properties(props.as_deref(), ttl.as_deref()),
                )
                .await
                .unwrap();
        }
        if !transaction {
            channel.wait_for_confirms().await.unwrap();
        }
        let last = batch.last().unwrap().delivery_tag;
        channel
            .basic_ack(last, BasicAckOptions { multiple: true })
            .await
            .unwrap();
        if transaction {
            channel.tx_commit().await.unwrap();
        }
        relayed += batch.len();
    }
    let side = meter.finish(n);
    let _ = setup
        .queue_delete(source.as_str().into(), QueueDeleteOptions::default())
        .await;
    let _ = setup
        .queue_delete(target.as_str().into(), QueueDeleteOptions::default())
        .await;
    side
}

/// What the relay publishes with: by default only what the target queue needs; the
/// diagnostics add what an assignment carries.
fn relay_properties(props: Option<&str>, ttl: Option<&str>) -> BasicProperties {
    let mut properties = BasicProperties::default()
        .with_delivery_mode(2)
        .with_priority(1);
    let has =
        |what: &str| props.is_some_and(|p| p == "all" || p.split(',').any(|token| token == what));
    if has("content_type") {
        properties = properties.with_content_type(CLOUDEVENTS_CONTENT_TYPE.into());
    }
    if has("message_id") {
        properties = properties.with_message_id(uuid::Uuid::new_v4().to_string().into());
    }
    if has("type") {
        properties = properties.with_type(event_type::CONVERSATION_ASSIGNED.into());
    }
    if has("timestamp") {
        properties = properties.with_timestamp(1_795_000_000);
    }
    if has("headers") {
        let mut headers = FieldTable::default();
        headers.insert(
            switchboard::bus::PARTITION_KEY_HEADER.into(),
            lapin::types::AMQPValue::LongString("webchat:visitor-1".into()),
        );
        properties = properties.with_headers(headers);
    }
    if let Some(ms) = ttl {
        properties = properties.with_expiration(ms.into());
    }
    properties
}

/// Webhook → assignment latency through the real daemon at a fixed request rate.
async fn webhook_latency(rate: usize, seconds: usize) -> (f64, f64, f64, usize) {
    let connection = connect().await;
    let prefix = format!(
        "bench-lat-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = dir.path().join("sb.toml");
    std::fs::write(
        &config,
        format!(
            "[bus]\nurl = \"{AMQP_URL}\"\nprefix = \"{prefix}\"\n[store]\nurl = \"sqlite://{}\"\n[http]\nlisten = \"127.0.0.1:{port}\"\n[routing]\nrules = \"{}\"\n[[channels]]\nid = \"chat\"\nkind = \"webchat\"\n",
            dir.path().join("sb.db").display(),
            repo().join("routing-rules").display()
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
    for _ in 0..200 {
        if http
            .get(&ready)
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Consume every agent queue and note when each assignment arrives.
    let queues = RuleSet::load_dir(&repo().join("routing-rules"))
        .unwrap()
        .queue_names();
    let (arrived_tx, mut arrived_rx) = tokio::sync::mpsc::unbounded_channel::<(String, Instant)>();
    for q in &queues {
        let channel = connection.create_channel().await.unwrap();
        let mut consumer = channel
            .basic_consume(
                format!("{prefix}.queue.{q}").as_str().into(),
                "lat".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        let tx = arrived_tx.clone();
        tokio::spawn(async move {
            let _channel = channel;
            while let Some(Ok(d)) = consumer.next().await {
                let v: serde_json::Value = serde_json::from_slice(&d.data).unwrap();
                let id = v["data"]["message"]["external_id"]
                    .as_str()
                    .unwrap()
                    .to_owned();
                let _ = tx.send((id, Instant::now()));
            }
        });
    }

    let total = rate * seconds;
    let url = format!("http://127.0.0.1:{port}/webhooks/chat");
    let mut sent: HashMap<String, Instant> = HashMap::with_capacity(total);
    let interval = Duration::from_secs_f64(1.0 / rate as f64);
    let start = Instant::now();
    let mut requests = Vec::with_capacity(total);
    for i in 0..total {
        let due = start + interval * i as u32;
        tokio::time::sleep_until(due.into()).await;
        let id = format!("lat-{i}");
        let body = serde_json::json!({"message_id": id, "customer": {"id": format!("v{}", i % 500)}, "text": if i.is_multiple_of(3) { "refund please" } else { "hello" }}).to_string();
        sent.insert(id, Instant::now());
        let http = http.clone();
        let url = url.clone();
        requests.push(tokio::spawn(async move {
            http.post(url)
                .body(body)
                .send()
                .await
                .map(|r| r.status().as_u16())
        }));
    }
    let mut failed = 0;
    for r in requests {
        if !matches!(r.await, Ok(Ok(200))) {
            failed += 1;
        }
    }
    let mut latencies = Vec::with_capacity(total);
    let deadline = Instant::now() + Duration::from_secs(30);
    while latencies.len() < total - failed && Instant::now() < deadline {
        if let Ok(Some((id, at))) =
            tokio::time::timeout(Duration::from_secs(1), arrived_rx.recv()).await
            && let Some(sent_at) = sent.get(&id)
        {
            latencies.push(at.duration_since(*sent_at).as_secs_f64() * 1000.0);
        }
    }
    let _ = Command::new("kill").arg(child.id().to_string()).status();
    let _ = child.wait();
    let agent: Vec<String> = queues
        .iter()
        .map(|q| format!("{prefix}.queue.{q}"))
        .collect();
    delete_prefix(&connection, &prefix, &agent).await;
    latencies.sort_by(f64::total_cmp);
    let pct = |p: f64| latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)];
    (pct(0.5), pct(0.99), pct(1.0), latencies.len())
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn main() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let n = env_usize("BENCH_MESSAGES", 20_000);
    let runs = env_usize("BENCH_RUNS", 5);
    let rate = env_usize("BENCH_RATE", 1000);
    let seconds = env_usize("BENCH_SECONDS", 10);
    runtime.block_on(async {
        let mut hops = Vec::new();
        let mut raws = Vec::new();
        let mut ratios = Vec::new();
        let mut cpu: [Vec<f64>; 4] = Default::default();
        let skipped = || Side { rate: f64::NAN, ours_us: f64::NAN, broker_us: f64::NAN };
        for run in 1..=runs {
            let only = std::env::var("BENCH_ONLY").unwrap_or_default();
            let raw = if only == "hop" || only == "router" { skipped() } else { raw_relay(n).await };
            let hop = match only.as_str() {
                "raw" => skipped(),
                "router" => router_alone(n).await,
                _ => router_hop(n).await,
            };
            println!(
                "run {run}: raw relay {:.0} msg/s, router hop {:.0} msg/s, ratio {:.2}; CPU per message: relay {:.0} µs + broker {:.0} µs, hop {:.0} µs + broker {:.0} µs",
                raw.rate, hop.rate, hop.rate / raw.rate, raw.ours_us, raw.broker_us, hop.ours_us, hop.broker_us
            );
            raws.push(raw.rate);
            hops.push(hop.rate);
            ratios.push(hop.rate / raw.rate);
            for (values, value) in cpu.iter_mut().zip([raw.ours_us, raw.broker_us, hop.ours_us, hop.broker_us]) {
                values.push(value);
            }
        }
        println!(
            "median of {runs} runs, {n} messages each: raw relay {:.0} msg/s, router hop {:.0} msg/s, ratio {:.2}",
            median(raws),
            median(hops),
            median(ratios)
        );
        let [relay_us, relay_broker_us, hop_us, hop_broker_us] = cpu.map(median);
        println!(
            "median CPU per message: relay {relay_us:.0} µs + broker {relay_broker_us:.0} µs; router hop {hop_us:.0} µs + broker {hop_broker_us:.0} µs"
        );
        if seconds == 0 {
            return;
        }
        let mut p50s = Vec::new();
        let mut p99s = Vec::new();
        for run in 1..=runs {
            let (p50, p99, max, count) = webhook_latency(rate, seconds).await;
            println!("latency run {run}: {count} assignments at {rate}/s: p50 {p50:.1} ms, p99 {p99:.1} ms, max {max:.1} ms");
            p50s.push(p50);
            p99s.push(p99);
        }
        println!(
            "median of {runs} runs at {rate} msg/s for {seconds} s: webhook→assignment p50 {:.1} ms, p99 {:.1} ms",
            median(p50s),
            median(p99s)
        );
    });
}
