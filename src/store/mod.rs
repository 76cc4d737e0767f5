//! The customer context store: customers, identities, conversations, messages and decisions.
//! One trait, [`Store`], with two implementations that behave the same: SQLite (one node, and
//! the embedded bus's home) and PostgreSQL (several nodes sharing one database). Both decide a
//! batch with the shared [`batch`] logic; only their SQL differs.

mod batch;
mod cache;
mod nodelay;
mod postgres;
mod reads;
mod sqlite;

use async_trait::async_trait;
use serde_json::{Map, Value};
use switchboard_channel::NormalizedMessage;

use crate::router::decide::{ConversationView, CustomerView};

pub use cache::DEFAULT_CACHE_CUSTOMERS;
pub use postgres::PgStore;
pub use sqlite::SqliteStore;

/// The store failed; the message stays unacknowledged and is retried.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the store at {url}: {}", describe(source))]
    Open {
        url: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("store migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("store query failed: {}", describe(.0))]
    Query(#[from] sqlx::Error),
    #[error("the batch met a concurrent merge; retried: {0}")]
    Retry(String),
    #[error("stored JSON is corrupt: {0}")]
    Corrupt(#[from] serde_json::Error),
    #[error("a stored assignment is corrupt: {0}")]
    CorruptAssignment(String),
    #[error("unsupported store URL `{0}`: use sqlite://PATH, postgres://… or postgresql://…")]
    Unsupported(String),
    #[error("cannot open the store at {url}: {message}")]
    DataDir { url: String, message: String },
    #[error(
        "the customer's attributes would take {bytes} bytes as JSON, more than the {} allowed",
        switchboard_channel::envelope::MAX_ATTRIBUTES_BYTES
    )]
    AttributesTooLarge { bytes: usize },
}

/// sqlx's text for an error, without the "at line N" it appends to PostgreSQL's errors: that is
/// a line of PostgreSQL's own C source, which a reader takes for a line of their config.
fn describe(error: &sqlx::Error) -> String {
    match error {
        sqlx::Error::Database(database) => {
            format!("error returned from database: {}", database.message())
        }
        other => other.to_string(),
    }
}

/// A decision already recorded for a message key.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredDecision {
    /// The assignment CloudEvent exactly as published (or to be published).
    pub assignment: String,
    pub queue: String,
    pub priority: u8,
    /// True once the assignment publish and the inbound ack were committed on the bus.
    pub published: bool,
}

/// Who wrote and in which conversation, as the router sees it before deciding.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub customer: CustomerView,
    pub conversation: ConversationView,
    /// The customer's latest earlier messages, on every channel, oldest first.
    /// Shared with the batch and the cache: an entry is not copied per message.
    pub history: Vec<std::sync::Arc<HistoryEntry>>,
    /// When the conversation opened (Unix ms).
    pub conversation_opened_at: i64,
}

/// One earlier message in an assignment's `context.history`: `{"channel", "text", "at"}`.
///
/// Kept as that JSON, made once: an entry goes into each of the customer's next N assignments.
#[derive(Debug, Clone)]
pub struct HistoryEntry {
    json: Box<serde_json::value::RawValue>,
}

/// The longest text a history entry carries, in bytes. Every assignment carries up to
/// `[routing] history` entries: ten whole bodies at the web chat's 256 KiB limit made one
/// assignment of 2.6 MB. The whole message stays in the conversation
/// (`GET /api/v1/conversations/{id}`).
pub const HISTORY_TEXT_BYTES: usize = 2048;

impl HistoryEntry {
    /// `channel`: the channel kind (`webchat`, `email`, …); `at`: RFC 3339. A text longer than
    /// [`HISTORY_TEXT_BYTES`] is cut between words, ends with `…`, and the entry says
    /// `"truncated": true`.
    pub fn new(channel: &str, text: &str, at: &str) -> Self {
        #[derive(serde::Serialize)]
        struct Fields<'a> {
            channel: &'a str,
            text: &'a str,
            at: &'a str,
            #[serde(skip_serializing_if = "std::ops::Not::not")]
            truncated: bool,
        }
        let cut;
        let (text, truncated) = if text.len() > HISTORY_TEXT_BYTES {
            cut = format!(
                "{}…",
                crate::router::signals::head(text, HISTORY_TEXT_BYTES - '…'.len_utf8())
            );
            (cut.as_str(), true)
        } else {
            (text, false)
        };
        // Strings and a bool always serialize.
        let json = serde_json::value::to_raw_value(&Fields {
            channel,
            text,
            at,
            truncated,
        })
        .expect("history entry serializes");
        Self { json }
    }

    /// The entry's JSON.
    pub fn json(&self) -> &str {
        self.json.get()
    }
}

impl PartialEq for HistoryEntry {
    fn eq(&self, other: &Self) -> bool {
        self.json() == other.json()
    }
}

impl serde::Serialize for HistoryEntry {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.json.serialize(serializer)
    }
}

/// Earlier messages an assignment carries, unless `[routing] history` says otherwise.
pub const DEFAULT_HISTORY: usize = 10;

/// What the router decided for one message, to record with it.
#[derive(Debug, Clone)]
pub struct Routed {
    pub queue: String,
    pub urgency: u8,
    pub priority: u8,
    /// The assignment CloudEvent JSON.
    pub assignment: String,
}

/// What became of one message in [`Store::route_batch`].
#[derive(Debug, Clone, PartialEq)]
pub enum RouteOutcome {
    /// First time seen: decided and recorded now.
    New {
        queue: String,
        priority: u8,
        assignment: String,
    },
    /// A decision was already recorded for this message key.
    Existing(StoredDecision),
    /// A decision is recorded for this message key but cannot be read back (a corrupt row):
    /// the message is not decided again, and the router dead-letters it with this reason
    /// rather than stall its whole batch.
    Unreadable(String),
}

/// A customer as the API shows it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct CustomerRecord {
    pub id: String,
    pub attributes: Map<String, Value>,
    pub identities: Vec<crate::router::decide::Identity>,
    /// Unix milliseconds.
    pub created_at: i64,
    pub last_seen_at: i64,
}

/// A conversation as the API shows it, with its messages and routing decisions, oldest first.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ConversationRecord {
    pub id: String,
    pub customer_id: String,
    /// `open` or `closed`.
    pub status: String,
    pub channels: Vec<String>,
    pub queue: Option<String>,
    pub agent_id: Option<String>,
    pub message_count: i64,
    /// Unix milliseconds.
    pub opened_at: i64,
    pub last_activity_at: i64,
    pub closed_at: Option<i64>,
    /// Normalized messages (the envelope as received) with `direction` and `received_at`.
    pub messages: Vec<Value>,
    /// `{queue, urgency, priority, decided_at, explanation}` per routed message.
    pub decisions: Vec<Value>,
}

/// What [`Store::merge`] did.
#[derive(Debug, Clone, PartialEq)]
pub enum MergeOutcome {
    /// Merged: the survivor as it is now, and the audit entry's id.
    Merged {
        customer: CustomerRecord,
        merge_id: String,
    },
    /// No customer with this id.
    Unknown(String),
    /// Both ids name the same customer.
    Same,
    /// `customer` (`from`, or the id merged into, when that was `from`'s survivor) was merged
    /// before, into `into`.
    AlreadyMerged { customer: String, into: String },
}

/// What [`Store::link_identity`] did.
#[derive(Debug, Clone, PartialEq)]
pub enum LinkOutcome {
    /// The identity belongs to the customer now (or already did).
    Linked(CustomerRecord),
    /// No customer with this id.
    UnknownCustomer,
    /// Another customer has the identity: merge them explicitly if they are one person.
    Taken { customer_id: String },
}

/// The router's decision step: pure, called inside the store transaction, with the message's
/// JSON as the store records it (so an assignment embeds it without serializing it again).
pub type DecideFn<'a> = dyn Fn(&NormalizedMessage, &serde_json::value::RawValue, &Resolved) -> Routed
    + Send
    + Sync
    + 'a;

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// For each message, in one transaction: if a decision is recorded for its key
    /// `(channel id, external id)`, return it; otherwise find or create the customer behind the
    /// sender and their open conversation, call `decide`, and record the message and the
    /// decision. Messages are handled in order, so a later one sees an earlier one's effects.
    /// `published` are keys of earlier decisions whose assignments have reached the bus: they
    /// are marked in the same transaction, as [`Self::mark_published`] would (one transaction
    /// per batch instead of two).
    async fn route_batch(
        &self,
        messages: &[NormalizedMessage],
        now_ms: i64,
        published: &[(String, String)],
        decide: &DecideFn<'_>,
    ) -> Result<Vec<RouteOutcome>, StoreError>;

    /// The decision recorded for `(channel_id, external_id)`, if any.
    async fn decision(
        &self,
        channel_id: &str,
        external_id: &str,
    ) -> Result<Option<StoredDecision>, StoreError>;

    /// Marks decisions whose assignment reached the bus.
    async fn mark_published(&self, keys: &[(String, String)]) -> Result<(), StoreError>;

    /// The customer with this id, if any.
    async fn customer(&self, id: &str) -> Result<Option<CustomerRecord>, StoreError>;

    /// The customer an identity `(kind, address)` belongs to, if any.
    async fn customer_by_identity(
        &self,
        kind: &str,
        address: &str,
    ) -> Result<Option<CustomerRecord>, StoreError>;

    /// Merges `patch` into the customer's attributes (a `null` value removes the key), in one
    /// transaction with the router's batches; `None` if there is no such customer.
    async fn patch_attributes(
        &self,
        id: &str,
        patch: &Map<String, Value>,
    ) -> Result<Option<CustomerRecord>, StoreError>;

    /// The conversation with this id, its messages and decisions; `None` if there is none.
    async fn conversation(&self, id: &str) -> Result<Option<ConversationRecord>, StoreError>;

    /// Closes a conversation (the customer's next message starts a new one); closing a closed
    /// conversation changes nothing. `None` if there is no such conversation.
    async fn close_conversation(
        &self,
        id: &str,
        now_ms: i64,
    ) -> Result<Option<ConversationRecord>, StoreError>;

    /// Records `agent_id` as the agent handling conversation `id` (an agent claimed one of its
    /// assignments): the next assignment of the conversation names them as
    /// `context.previous_agent`. `false` if there is no such conversation.
    async fn assign_agent(&self, id: &str, agent_id: &str) -> Result<bool, StoreError>;

    /// Merges customer `from` into `into` (explicitly, from the API): `from`'s identities,
    /// conversations and messages move to `into`, its attributes fill the keys `into` lacks
    /// (on a conflict `into`'s value stays), its open conversation closes if `into` has one, and
    /// the merge is audited. One transaction.
    async fn merge(&self, into: &str, from: &str, now_ms: i64) -> Result<MergeOutcome, StoreError>;

    /// Links the identity `(kind, address)` (normalized by the caller) to a customer.
    async fn link_identity(
        &self,
        customer_id: &str,
        kind: &str,
        address: &str,
        now_ms: i64,
    ) -> Result<LinkOutcome, StoreError>;

    /// The merges and open merge suggestions involving a customer, oldest first.
    async fn merges(&self, customer_id: &str) -> Result<Vec<Value>, StoreError>;

    /// Cheap liveness query for `/readyz`.
    async fn ping(&self) -> Result<(), StoreError>;

    async fn close(&self);
}

/// How long after a conversation was closed the customer's next message reopens it, unless
/// `[routing] reopen_window` says otherwise.
pub const DEFAULT_REOPEN_WINDOW: std::time::Duration = std::time::Duration::from_secs(72 * 3600);

/// Opens the store named by `url`.
pub async fn open(
    url: &str,
    reopen_window: std::time::Duration,
    history: usize,
) -> Result<std::sync::Arc<dyn Store>, StoreError> {
    if url.starts_with("sqlite:") {
        Ok(std::sync::Arc::new(
            SqliteStore::open(url)
                .await?
                .with_reopen_window(reopen_window)
                .with_history(history),
        ))
    } else if is_postgres(url) {
        Ok(std::sync::Arc::new(
            PgStore::open(url)
                .await?
                .with_reopen_window(reopen_window)
                .with_history(history),
        ))
    } else {
        Err(StoreError::Unsupported(crate::telemetry::redact_url(url)))
    }
}

/// Whether `url` names a PostgreSQL store (`postgres://…` or `postgresql://…`).
pub fn is_postgres(url: &str) -> bool {
    url.starts_with("postgres://") || url.starts_with("postgresql://")
}

/// The file of an `sqlite:` URL (`sqlite://data/x.db`, `sqlite:///abs/x.db`, `sqlite:x.db`).
pub fn sqlite_path(url: &str) -> Result<std::path::PathBuf, StoreError> {
    let rest = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))
        .ok_or_else(|| StoreError::Unsupported(url.to_owned()))?;
    let path = rest.split('?').next().unwrap_or_default();
    if path.is_empty() || path == ":memory:" {
        return Err(StoreError::Unsupported(url.to_owned()));
    }
    Ok(std::path::PathBuf::from(path))
}

/// Attributes the message carries (`metadata.attributes`) merged over the stored ones, as
/// [`apply_attribute_patch`] merges them. A merge that would take the attributes past
/// [`MAX_ATTRIBUTES_BYTES`](switchboard_channel::envelope::MAX_ATTRIBUTES_BYTES) is left out
/// (the message is routed with the stored ones, and the log says so).
pub(crate) fn merged_attributes(
    stored: Map<String, Value>,
    message: &NormalizedMessage,
) -> Map<String, Value> {
    let Some(Value::Object(update)) = message.metadata.get("attributes") else {
        return stored;
    };
    let mut attributes = stored.clone();
    apply_attribute_patch(&mut attributes, update);
    match check_attributes_size(&stored, &attributes) {
        Ok(()) => attributes,
        Err(error) => {
            tracing::warn!(message_id = %message.message_id, %error, "The message's attributes are not kept.");
            stored
        }
    }
}

/// Refuses patched attributes larger than
/// [`MAX_ATTRIBUTES_BYTES`](switchboard_channel::envelope::MAX_ATTRIBUTES_BYTES) as JSON, unless
/// they are no larger than they were: a merge may leave a customer past the limit (it keeps
/// both customers' attributes), and a patch that trims them must go through.
pub(crate) fn check_attributes_size(
    before: &Map<String, Value>,
    after: &Map<String, Value>,
) -> Result<(), StoreError> {
    let bytes = serde_json::to_string(after)?.len();
    if bytes > switchboard_channel::envelope::MAX_ATTRIBUTES_BYTES
        && bytes > serde_json::to_string(before)?.len()
    {
        return Err(StoreError::AttributesTooLarge { bytes });
    }
    Ok(())
}

/// Sets each attribute of `patch`; a `null` removes it (`PATCH /api/v1/customers/{id}` and the
/// attributes a message carries alike).
pub(crate) fn apply_attribute_patch(
    attributes: &mut Map<String, Value>,
    patch: &Map<String, Value>,
) {
    for (key, value) in patch {
        if value.is_null() {
            attributes.remove(key);
        } else {
            attributes.insert(key.clone(), value.clone());
        }
    }
}

#[cfg(test)]
mod tests;
