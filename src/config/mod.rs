//! The daemon's configuration: a TOML file, `SWITCHBOARD__SECTION__KEY` environment overrides
//! and `${VAR}` interpolation. Loading is pure ([`load`]) and reports every problem it can find
//! with the file, line and key; connecting to anything happens later, in `app`.
//!
//! The doc comments on these fields are the user documentation: `deploy/switchboard.example.toml`
//! repeats them.

pub(crate) mod load;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use load::{Loaded, Problem, Problems, load, load_text};

/// Where the configuration file is looked for when `-c` is not given, in order.
pub const DEFAULT_PATHS: &[&str] = &["switchboard.toml", "/etc/switchboard/switchboard.toml"];

/// The longest `[bus] prefix` and channel id: with a queue name (at most 64 bytes) or a
/// channel kind they make AMQP names and routing keys, which end at 255 bytes.
const MAX_PREFIX: usize = 64;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Config {
    pub bus: BusConfig,
    pub store: StoreConfig,
    pub http: HttpConfig,
    pub routing: RoutingConfig,
    pub daemon: DaemonConfig,
    pub log: LogConfig,
    pub channels: Vec<ChannelConfig>,
}

/// Most router partitions `[bus] partitions` may ask for.
pub const MAX_PARTITIONS: u16 = 256;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct BusConfig {
    /// AMQP URL of RabbitMQ, e.g. `amqp://guest:guest@127.0.0.1:5672/%2f`. Absent: the embedded
    /// durable bus inside the store (single-node mode).
    pub url: Option<String>,
    /// Prefix of every exchange and queue name.
    pub prefix: String,
    /// How many unacknowledged messages a consumer holds at once.
    pub prefetch: u16,
    /// How long a webhook waits for the broker's confirm before answering 503.
    #[serde(with = "duration")]
    pub confirm_timeout: Duration,
    /// Deliveries of one router message before it is dead-lettered as poison.
    pub delivery_limit: u32,
    /// 0: one router queue `<p>.router`. N > 0: the router input is split by customer key
    /// through a consistent-hash exchange into `<p>.router.0` … `<p>.router.<N-1>`, each with a
    /// single active consumer, so several `switchboard run` processes share the work.
    pub partitions: u16,
}

impl Default for BusConfig {
    fn default() -> Self {
        Self {
            url: None,
            prefix: "switchboard".to_owned(),
            prefetch: 512,
            confirm_timeout: Duration::from_secs(5),
            delivery_limit: 20,
            partitions: 0,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct StoreConfig {
    /// `sqlite://PATH` (created if missing), or `postgres://USER:PASSWORD@HOST/DB` (also
    /// `postgresql://…`; the database must exist, the schema is migrated at start) for several
    /// daemons sharing one store. PostgreSQL needs a RabbitMQ `[bus] url`: the embedded bus
    /// lives in SQLite.
    pub url: String,
    /// Customers the SQLite store keeps in memory for routing (identities, attributes, current
    /// conversation, history, contact times); 0 reads the database for every batch. A
    /// PostgreSQL store keeps none: other nodes write the same rows.
    pub cache_customers: usize,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            url: "sqlite://switchboard.db".to_owned(),
            cache_customers: crate::store::DEFAULT_CACHE_CUSTOMERS,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct HttpConfig {
    /// Address the webhook, health, metrics and API server listens on.
    pub listen: SocketAddr,
    /// Bearer token for `/api/v1`. Absent: the API answers 401 to everyone.
    pub admin_token: Option<String>,
    /// Largest accepted webhook body, in bytes (a channel may lower or raise it).
    pub max_body_bytes: usize,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            admin_token: None,
            max_body_bytes: 256 * 1024,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct RoutingConfig {
    /// Directory of routing rule files (`*.toml`, loaded in lexical order). Relative paths are
    /// taken from the directory of the config file.
    pub rules: PathBuf,
    /// Reload the rules when a file in the directory changes. Off: only SIGHUP reloads.
    pub watch: bool,
    /// A customer writing within this long after their conversation was closed reopens it;
    /// later, a new conversation starts.
    #[serde(with = "duration")]
    pub reopen_window: Duration,
    /// Earlier messages of the customer (every channel) each assignment carries in
    /// `context.history`.
    pub history: usize,
}

impl Default for RoutingConfig {
    fn default() -> Self {
        Self {
            rules: PathBuf::from("routing-rules"),
            watch: true,
            reopen_window: crate::store::DEFAULT_REOPEN_WINDOW,
            history: crate::store::DEFAULT_HISTORY,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct DaemonConfig {
    /// On SIGTERM/SIGINT, how long in-flight work may take to finish before the daemon exits.
    #[serde(with = "duration")]
    pub shutdown_timeout: Duration,
}

impl Default for DaemonConfig {
    fn default() -> Self {
        Self {
            shutdown_timeout: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct LogConfig {
    /// `tracing` filter, e.g. `info` or `switchboard=debug,lapin=warn`. `RUST_LOG` wins.
    pub level: String,
    /// `text` for people, `json` for log pipelines.
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: "info".to_owned(),
            format: LogFormat::Text,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// One `[[channels]]` entry: an adapter instance.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChannelConfig {
    /// Instance id: the webhook path `/webhooks/{id}`, the AMQP routing key and the store key.
    pub id: String,
    /// Adapter kind: `webchat`, …
    pub kind: String,
    /// Overrides `[http] max_body_bytes` for this channel.
    #[serde(default)]
    pub max_body_bytes: Option<usize>,
    /// The adapter's own keys (see the adapter's documentation).
    #[serde(flatten)]
    pub options: toml::Table,
}

impl Config {
    /// Pure checks of values that deserialized fine; every problem as `(key path, message)`.
    /// Adapter keys are checked by `channels::validate`.
    pub fn validate(&self) -> Vec<(String, String)> {
        let mut problems = Vec::new();
        if let Some(url) = &self.bus.url
            && !(url.starts_with("amqp://") || url.starts_with("amqps://"))
        {
            problems.push((
                "bus.url".to_owned(),
                "must start with amqp:// or amqps://".to_owned(),
            ));
        }
        let prefix_ok = !self.bus.prefix.is_empty()
            && self.bus.prefix.len() <= MAX_PREFIX
            && self
                .bus
                .prefix
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        if !prefix_ok {
            problems.push((
                "bus.prefix".to_owned(),
                format!("must be 1 to {MAX_PREFIX} ASCII letters, digits, '-', '_' or '.'"),
            ));
        }
        if self.bus.prefetch == 0 {
            problems.push(("bus.prefetch".to_owned(), "must be at least 1".to_owned()));
        }
        if self.bus.delivery_limit == 0 {
            problems.push((
                "bus.delivery_limit".to_owned(),
                "must be at least 1".to_owned(),
            ));
        }
        if self.bus.partitions > MAX_PARTITIONS {
            problems.push((
                "bus.partitions".to_owned(),
                format!("must be at most {MAX_PARTITIONS}"),
            ));
        }
        if self.bus.url.is_none() && self.bus.partitions > 0 {
            problems.push((
                "bus.partitions".to_owned(),
                "needs [bus] url: partitions are RabbitMQ queues shared by several nodes"
                    .to_owned(),
            ));
        }
        let sqlite = self.store.url.starts_with("sqlite:");
        if self.bus.url.is_some() && self.bus.partitions > 0 && sqlite {
            problems.push((
                "store.url".to_owned(),
                "must be postgres://… with [bus] partitions: the nodes that share the partitions                  must share one store, and a SQLite file is one node's (a node with its own file                  would take partitions and start its customers over)"
                    .to_owned(),
            ));
        }
        if self.bus.url.is_none() && !sqlite {
            problems.push((
                "store.url".to_owned(),
                "must be sqlite://PATH when [bus] url is not set: the embedded bus lives in \
                 SQLite (a postgres:// store needs a RabbitMQ [bus] url)"
                    .to_owned(),
            ));
        } else if !sqlite && !crate::store::is_postgres(&self.store.url) {
            problems.push((
                "store.url".to_owned(),
                "must be sqlite://PATH, postgres://… or postgresql://…".to_owned(),
            ));
        }
        if matches!(&self.http.admin_token, Some(token) if token.len() < 16) {
            problems.push((
                "http.admin_token".to_owned(),
                "is shorter than 16 characters: use a long random token".to_owned(),
            ));
        }
        if self.http.max_body_bytes == 0 {
            problems.push((
                "http.max_body_bytes".to_owned(),
                "must be at least 1".to_owned(),
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for (index, channel) in self.channels.iter().enumerate() {
            let valid_id = !channel.id.is_empty()
                && channel.id.len() <= MAX_PREFIX
                && channel
                    .id
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_'));
            if !valid_id {
                problems.push((
                    format!("channels.{index}.id"),
                    format!("must be 1 to {MAX_PREFIX} ASCII letters, digits, '-' or '_'"),
                ));
            }
            if !seen.insert(channel.id.as_str()) {
                problems.push((
                    format!("channels.{index}.id"),
                    format!("`{}` is used by another channel", channel.id),
                ));
            }
            if channel.max_body_bytes == Some(0) {
                problems.push((
                    format!("channels.{index}.max_body_bytes"),
                    "must be at least 1".to_owned(),
                ));
            }
        }
        problems
    }

    /// The rules directory, resolved against the config file's directory.
    pub fn rules_dir(&self, config_dir: Option<&Path>) -> PathBuf {
        match config_dir {
            Some(dir) if self.routing.rules.is_relative() => dir.join(&self.routing.rules),
            _ => self.routing.rules.clone(),
        }
    }
}

/// Durations written as `"10s"`, `"15m"`, `"1h 30m"`.
pub mod duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(value: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&humantime::format_duration(*value).to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(deserializer)?;
        humantime::parse_duration(&text).map_err(|error| {
            serde::de::Error::custom(format!(
                "`{text}` is not a duration like \"10s\" or \"15m\": {error}"
            ))
        })
    }
}

#[cfg(test)]
mod tests;
