//! Test harness: runs the real `switchboard` binary against the real RabbitMQ on loopback, each
//! test under its own AMQP prefix and data directory.
#![allow(dead_code, unused_macros)]

/// Runs a scenario on both buses, as two tests.
macro_rules! on_both_buses {
    ($($scenario:ident),* $(,)?) => {$(
        mod $scenario {
            #[tokio::test]
            async fn rabbitmq() {
                super::$scenario(super::Backend::Amqp).await;
            }
            #[tokio::test]
            async fn embedded() {
                super::$scenario(super::Backend::Embedded).await;
            }
        }
    )*};
}

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use lapin::options::{
    BasicGetOptions, BasicPublishOptions, ExchangeDeleteOptions, QueueDeleteOptions,
};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use serde_json::Value;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

pub const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
pub const AMQP_ADDR: &str = "127.0.0.1:5672";

/// A unique prefix per test run.
pub fn prefix(test: &str) -> String {
    let nonce = uuid::Uuid::new_v4().simple().to_string();
    format!("sbt-{test}-{}", &nonce[..8])
}

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Connects to RabbitMQ or fails the test with a clear message (never skips).
pub async fn rabbit() -> Connection {
    match Connection::connect(AMQP_URL, ConnectionProperties::default()).await {
        Ok(connection) => connection,
        Err(error) => panic!(
            "RabbitMQ is required at {AMQP_URL} for this test and is not reachable ({error}). \
             Start it with `rabbitmq-server -detached` (.ci/run does)."
        ),
    }
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Which bus a daemon runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Amqp,
    Embedded,
}

pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789";

/// The agent queues of the shipped `routing-rules/`, in file order.
pub const QUEUES: &[&str] = &[
    "general",
    "billing",
    "technical",
    "support-es",
    "support-fr",
    "sales",
    "vip",
    "escalations",
];

/// How a daemon is configured.
pub struct DaemonConfig {
    pub backend: Backend,
    pub prefix: String,
    pub amqp_url: String,
    pub rules: PathBuf,
    pub channels: String,
    pub extra: String,
    pub env: Vec<(String, String)>,
    /// `[store] url`; default: an SQLite file in the daemon's directory.
    pub store_url: Option<String>,
    /// Extra keys of the `[bus]` section (e.g. `partitions = 4`).
    pub bus_extra: String,
}

impl DaemonConfig {
    pub fn new(prefix: &str) -> Self {
        Self::on(Backend::Amqp, prefix)
    }

    pub fn on(backend: Backend, prefix: &str) -> Self {
        Self {
            backend,
            prefix: prefix.to_owned(),
            amqp_url: AMQP_URL.to_owned(),
            rules: repo().join("routing-rules"),
            channels: "[[channels]]\nid = \"chat\"\nkind = \"webchat\"\n".to_owned(),
            extra: String::new(),
            env: Vec::new(),
            store_url: None,
            bus_extra: String::new(),
        }
    }
}

/// A running daemon; killed (SIGKILL) when dropped.
pub struct Daemon {
    pub backend: Backend,
    pub prefix: String,
    pub dir: tempfile::TempDir,
    pub port: u16,
    pub config_path: PathBuf,
    pub child: Option<Child>,
    pub env: Vec<(String, String)>,
    pub http: reqwest::Client,
}

impl Daemon {
    /// Writes the config and starts the daemon; waits until it listens.
    pub async fn start(config: DaemonConfig) -> Daemon {
        let dir = tempfile::tempdir().expect("temp dir");
        let port = free_port();
        let config_path = dir.path().join("switchboard.toml");
        let url = match config.backend {
            Backend::Amqp => format!("url = \"{}\"\n", config.amqp_url),
            Backend::Embedded => String::new(),
        };
        let text = format!(
            "[bus]\n{url}prefix = \"{}\"\nconfirm_timeout = \"2s\"\n{}\n\n[store]\nurl = \"{}\"\n\n[http]\nlisten = \"127.0.0.1:{port}\"\nadmin_token = \"{ADMIN_TOKEN}\"\n\n[routing]\nrules = \"{}\"\n\n[daemon]\nshutdown_timeout = \"5s\"\n\n{}\n{}\n",
            config.prefix,
            config.bus_extra,
            config.store_url.clone().unwrap_or_else(|| format!(
                "sqlite://{}",
                dir.path().join("switchboard.db").display()
            )),
            config.rules.display(),
            config.extra,
            config.channels,
        );
        std::fs::write(&config_path, text).expect("write config");
        let mut daemon = Daemon {
            backend: config.backend,
            prefix: config.prefix.clone(),
            dir,
            port,
            config_path,
            child: None,
            env: config.env,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(20))
                .build()
                .expect("http client"),
        };
        daemon.spawn().await;
        daemon
    }

    /// (Re)starts the process with the same config and data.
    pub async fn spawn(&mut self) {
        self.spawn_with_env(&[]).await;
    }

    pub async fn spawn_with_env(&mut self, extra_env: &[(&str, &str)]) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("daemon.log"))
            .expect("log file");
        let mut command = Command::new(env!("CARGO_BIN_EXE_switchboard"));
        command
            .arg("run")
            .arg("-c")
            .arg(&self.config_path)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log);
        for (k, v) in &self.env {
            command.env(k, v);
        }
        for (k, v) in extra_env {
            command.env(k, v);
        }
        self.child = Some(command.spawn().expect("spawn switchboard"));
        self.wait_listening().await;
    }

    async fn wait_listening(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if TcpStream::connect(("127.0.0.1", self.port)).await.is_ok() {
                return;
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!(
                    "switchboard exited during start ({status}):\n{}",
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("switchboard did not listen within 20 s:\n{}", self.log());
    }

    /// Waits until `/readyz` says the bus and the store are up.
    pub async fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(response) = self.http.get(self.url("/readyz")).send().await
                && response.status() == 200
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("switchboard was not ready within 30 s:\n{}", self.log());
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("daemon.log")).unwrap_or_default()
    }

    pub async fn post(&self, channel: &str, body: &str) -> (u16, Value) {
        self.post_with(channel, body.as_bytes().to_vec(), &[]).await
    }

    pub async fn post_with(
        &self,
        channel: &str,
        body: Vec<u8>,
        headers: &[(&str, String)],
    ) -> (u16, Value) {
        let mut request = self
            .http
            .post(self.url(&format!("/webhooks/{channel}")))
            .body(body);
        for (name, value) in headers {
            request = request.header(*name, value);
        }
        let response = request.send().await.expect("POST");
        let status = response.status().as_u16();
        let body = response.json().await.unwrap_or(Value::Null);
        (status, body)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid().to_string())
            .status()
            .expect("kill");
        assert!(status.success());
    }

    /// SIGKILL, and wait for the process to be gone.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Waits for the process to exit by itself (e.g. a failpoint abort).
    pub async fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            let child = self.child.as_mut().expect("running");
            if let Some(status) = child.try_wait().expect("try_wait") {
                self.child = None;
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "switchboard did not exit:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGTERM and wait for a clean exit.
    pub async fn stop(&mut self) -> std::process::ExitStatus {
        self.signal("TERM");
        self.wait_exit(Duration::from_secs(15)).await
    }
}

impl Daemon {
    /// A request to `/api/v1…` with the admin token.
    pub fn api(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, self.url(path))
            .bearer_auth(ADMIN_TOKEN)
    }

    /// `POST /api/v1/queues/{queue}/claim`: `(status, body)`.
    pub async fn claim(&self, queue: &str, wait: f64, lease: f64) -> (u16, Value) {
        let response = self
            .http
            .post(self.url(&format!(
                "/api/v1/queues/{queue}/claim?wait={wait}&lease={lease}"
            )))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .expect("claim");
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    pub async fn ack(&self, assignment_id: &str) -> u16 {
        self.http
            .post(self.url(&format!("/api/v1/assignments/{assignment_id}/ack")))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .expect("ack")
            .status()
            .as_u16()
    }

    /// Takes the assignments of agent queue `queue`, in the order the bus hands them out, until
    /// `count` arrived or `within` passed; then waits a little for any extra (duplicate) one.
    /// `(AMQP priority, assignment event)`.
    pub async fn assignments(
        &self,
        queue: &str,
        count: usize,
        within: Duration,
    ) -> Vec<(u8, Value)> {
        match self.backend {
            Backend::Amqp => {
                let rabbit = rabbit().await;
                collect(
                    &rabbit,
                    &format!("{}.queue.{queue}", self.prefix),
                    count,
                    within,
                )
                .await
            }
            Backend::Embedded => {
                let deadline = Instant::now() + within;
                // Like the AMQP drain: let them all arrive, then take them in the bus's order.
                while self.depth(queue).await < count && Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                let mut out = Vec::new();
                loop {
                    let wait = if out.len() < count && Instant::now() < deadline {
                        1.0
                    } else {
                        0.3
                    };
                    let (status, claimed) = self.claim(queue, wait, 30.0).await;
                    match status {
                        200 => {
                            let id = claimed["assignment_id"].as_str().expect("assignment_id");
                            assert_eq!(self.ack(id).await, 200);
                            let priority = claimed["priority"].as_u64().expect("priority") as u8;
                            out.push((priority, claimed["assignment"].clone()));
                        }
                        204 if out.len() >= count || Instant::now() >= deadline => break,
                        204 => {}
                        other => panic!("claim answered {other}: {claimed}"),
                    }
                }
                out
            }
        }
    }

    /// Starts capturing lifecycle events: on RabbitMQ a queue `<p>.test-events` bound to
    /// `<p>.events` (call after the daemon declared its topology); the embedded bus keeps them.
    pub async fn capture_events(&self) {
        if self.backend == Backend::Amqp {
            let rabbit = rabbit().await;
            let channel = rabbit.create_channel().await.expect("channel");
            let queue = format!("{}.test-events", self.prefix);
            channel
                .queue_declare(
                    queue.as_str().into(),
                    lapin::options::QueueDeclareOptions::default(),
                    lapin::types::FieldTable::default(),
                )
                .await
                .expect("declare the events queue");
            channel
                .queue_bind(
                    queue.as_str().into(),
                    format!("{}.events", self.prefix).as_str().into(),
                    "#".into(),
                    lapin::options::QueueBindOptions::default(),
                    lapin::types::FieldTable::default(),
                )
                .await
                .expect("bind the events queue");
        }
    }

    /// Lifecycle events so far (CloudEvents), oldest first; see [`Daemon::capture_events`].
    pub async fn events(&self) -> Vec<Value> {
        match self.backend {
            Backend::Amqp => drain(&rabbit().await, &format!("{}.test-events", self.prefix))
                .await
                .into_iter()
                .map(|(_, event)| event)
                .collect(),
            Backend::Embedded => {
                let response = self
                    .http
                    .get(self.url("/api/v1/events?limit=1000"))
                    .bearer_auth(ADMIN_TOKEN)
                    .send()
                    .await
                    .expect("events");
                assert_eq!(response.status().as_u16(), 200);
                let body: Value = response.json().await.expect("events JSON");
                body["events"]
                    .as_array()
                    .expect("events list")
                    .iter()
                    .map(|e| e["event"].clone())
                    .collect()
            }
        }
    }

    /// Waits until agent queue `queue` holds at least `count` messages; false at the deadline.
    pub async fn wait_depth(&self, queue: &str, count: usize, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        loop {
            if self.depth(queue).await >= count {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Messages in agent queue `queue` (ready or leased), without taking them.
    pub async fn depth(&self, queue: &str) -> usize {
        let name = format!("{}.queue.{queue}", self.prefix);
        self.queue_depth(&name).await
    }

    /// Messages in any bus queue, by full name.
    pub async fn queue_depth(&self, name: &str) -> usize {
        match self.backend {
            Backend::Amqp => depth(&rabbit().await, name).await,
            Backend::Embedded => {
                let url = format!(
                    "sqlite://{}?mode=ro",
                    self.dir.path().join("switchboard.db").display()
                );
                let pool = sqlx::SqlitePool::connect(&url)
                    .await
                    .expect("open the daemon's database");
                let count: i64 =
                    sqlx::query_scalar("SELECT count(*) FROM bus_messages WHERE queue = ?")
                        .bind(name)
                        .fetch_one(&pool)
                        .await
                        .expect("count");
                pool.close().await;
                count as usize
            }
        }
    }

    /// `/metrics` as text.
    pub async fn metrics(&self) -> String {
        self.http
            .get(self.url("/metrics"))
            .send()
            .await
            .expect("GET /metrics")
            .text()
            .await
            .expect("metrics text")
    }

    /// Removes what the test declared on RabbitMQ (nothing to do for the embedded bus).
    pub async fn cleanup(&self, queues: &[&str]) {
        if self.backend == Backend::Amqp {
            cleanup(&rabbit().await, &self.prefix, queues).await;
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// The messages of a queue, taken off it: `(AMQP priority, JSON body)`.
pub async fn drain(connection: &Connection, queue: &str) -> Vec<(u8, Value)> {
    let channel = connection.create_channel().await.expect("channel");
    let mut out = Vec::new();
    loop {
        let got = channel
            .basic_get(queue.into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap_or_else(|e| panic!("basic.get on {queue}: {e}"));
        let Some(message) = got else { break };
        let priority = message.delivery.properties.priority().unwrap_or(0);
        let body = serde_json::from_slice(&message.delivery.data).expect("JSON body");
        out.push((priority, body));
    }
    let _ = channel.close(200, "done".into()).await;
    out
}

/// Waits until `queue` holds `count` messages (or the deadline), then drains it. Afterwards it
/// waits a little longer to catch any extra (duplicate) message.
pub async fn collect(
    connection: &Connection,
    queue: &str,
    count: usize,
    within: Duration,
) -> Vec<(u8, Value)> {
    let deadline = Instant::now() + within;
    loop {
        let depth = depth(connection, queue).await;
        if depth >= count || Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    drain(connection, queue).await
}

pub async fn depth(connection: &Connection, queue: &str) -> usize {
    let channel = connection.create_channel().await.expect("channel");
    let declared = channel
        .queue_declare(
            queue.into(),
            lapin::options::QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            Default::default(),
        )
        .await
        .unwrap_or_else(|e| panic!("queue {queue} should exist: {e}"));
    let _ = channel.close(200, "done".into()).await;
    declared.message_count() as usize
}

/// Publishes raw bytes to an exchange (for poison-message tests).
pub async fn publish_raw(connection: &Connection, exchange: &str, key: &str, body: &[u8]) {
    publish_with(connection, exchange, key, body, BasicProperties::default()).await;
}

/// Publishes `body` with `properties` (headers, …) and waits for the broker's confirm.
pub async fn publish_with(
    connection: &Connection,
    exchange: &str,
    key: &str,
    body: &[u8],
    properties: BasicProperties,
) {
    let channel = connection.create_channel().await.expect("channel");
    channel
        .confirm_select(Default::default())
        .await
        .expect("confirm");
    channel
        .basic_publish(
            exchange.into(),
            key.into(),
            BasicPublishOptions::default(),
            body,
            properties,
        )
        .await
        .expect("publish")
        .await
        .expect("confirm");
}

/// Deletes everything a test declared under its prefix.
pub async fn cleanup(connection: &Connection, prefix: &str, queues: &[&str]) {
    let channel = connection.create_channel().await.expect("channel");
    for queue in queues
        .iter()
        .map(|q| format!("{prefix}.queue.{q}"))
        .chain(["router", "dead"].iter().map(|q| format!("{prefix}.{q}")))
    {
        let _ = channel
            .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
    for queue in ["test-events"] {
        let _ = channel
            .queue_delete(
                format!("{prefix}.{queue}").as_str().into(),
                QueueDeleteOptions::default(),
            )
            .await;
    }
    for exchange in ["inbound", "assign", "outbound", "events", "dlx", "expired"] {
        let _ = channel
            .exchange_delete(
                format!("{prefix}.{exchange}").as_str().into(),
                ExchangeDeleteOptions::default(),
            )
            .await;
    }
}

/// A TCP proxy in front of RabbitMQ that a test can take down (closing every connection and
/// refusing new ones) and bring back, as a broker outage would.
pub struct Proxy {
    pub port: u16,
    down: Arc<AtomicBool>,
    generation: Arc<std::sync::Mutex<CancellationToken>>,
    stop: CancellationToken,
}

impl Proxy {
    pub async fn start(upstream: &str) -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let upstream: SocketAddr = upstream.parse().expect("upstream");
        let down = Arc::new(AtomicBool::new(false));
        let generation = Arc::new(std::sync::Mutex::new(CancellationToken::new()));
        let stop = CancellationToken::new();
        let (d, g, s) = (down.clone(), generation.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    () = s.cancelled() => break,
                    accepted = listener.accept() => accepted,
                };
                let Ok((mut client, _)) = accepted else {
                    continue;
                };
                if d.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                let token = g.lock().unwrap().clone();
                tokio::spawn(async move {
                    let Ok(mut server) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    tokio::select! {
                        () = token.cancelled() => {}
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                    }
                });
            }
        });
        Proxy {
            port,
            down,
            generation,
            stop,
        }
    }

    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
        if down {
            let mut generation = self.generation.lock().unwrap();
            generation.cancel();
            *generation = CancellationToken::new();
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.cancel();
        self.generation.lock().unwrap().cancel();
    }
}

/// The `external_id` of each assignment, in order.
pub fn external_ids(assignments: &[(u8, Value)]) -> Vec<String> {
    assignments
        .iter()
        .map(|(_, event)| {
            event["data"]["message"]["external_id"]
                .as_str()
                .expect("an assignment names its message")
                .to_owned()
        })
        .collect()
}

/// A webchat body.
pub fn chat(message_id: &str, visitor: &str, text: &str) -> String {
    serde_json::json!({"message_id": message_id, "customer": {"id": visitor}, "text": text})
        .to_string()
}

pub fn write_rules(dir: &Path, files: &[(&str, &str)]) {
    std::fs::create_dir_all(dir).expect("rules dir");
    for (name, text) in files {
        std::fs::write(dir.join(name), text).expect("write rule file");
    }
}
