//! SQLite store: one file, WAL journal, `synchronous = NORMAL`. In WAL mode NORMAL loses no
//! committed transaction when the process crashes (the WAL is written before commit returns);
//! only an OS crash or power loss can drop the last commits.

use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use std::collections::HashMap;

use async_trait::async_trait;
use serde_json::{Map, Value, json};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{QueryBuilder, Row as _, Sqlite, SqliteConnection};
use switchboard_channel::NormalizedMessage;
use uuid::Uuid;

use super::{
    ConversationRecord, CustomerRecord, DecideFn, HistoryEntry, Resolved, RouteOutcome, Store,
    StoreError, StoredDecision, merged_attributes,
};
use crate::router::decide::{ConversationView, CustomerView, Identity};

const DAY_MS: i64 = 24 * 60 * 60 * 1000;

pub struct SqliteStore {
    pool: SqlitePool,
    path: PathBuf,
    /// A closed conversation the customer writes to again within this long is reopened.
    reopen_window_ms: i64,
    /// Earlier messages each decision sees in `history`.
    history: usize,
}

impl SqliteStore {
    /// Opens (creating if missing) the database and applies migrations. The directory must
    /// exist and be writable.
    pub async fn open(url: &str) -> Result<Self, StoreError> {
        let open_error = |source| StoreError::Open {
            url: url.to_owned(),
            source,
        };
        let path = super::sqlite_path(url)?;
        let dir = match path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let data_dir_problem = if !dir.is_dir() {
            Some("does not exist: create it, or point [store] url elsewhere".to_owned())
        } else {
            let probe = dir.join(format!(".switchboard-write-test-{}", std::process::id()));
            match std::fs::write(&probe, b"") {
                Ok(()) => {
                    let _ = std::fs::remove_file(&probe);
                    None
                }
                Err(error) => Some(format!("is not writable ({error})")),
            }
        };
        if let Some(problem) = data_dir_problem {
            return Err(StoreError::DataDir {
                url: url.to_owned(),
                message: format!("the data directory {} {problem}", dir.display()),
            });
        }
        let options = SqliteConnectOptions::from_str(url)
            .map_err(open_error)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(10))
            .foreign_keys(true)
            // 32 MiB page cache per connection: the hot customer and conversation pages stay
            // in memory instead of being read back through the kernel for every batch.
            .pragma("cache_size", "-32768");
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options)
            .await
            .map_err(open_error)?;
        sqlx::migrate!("src/store/migrations/sqlite")
            .run(&pool)
            .await?;
        let path = std::fs::canonicalize(&path).unwrap_or(path);
        Ok(Self {
            pool,
            path,
            reopen_window_ms: i64::try_from(super::DEFAULT_REOPEN_WINDOW.as_millis())
                .unwrap_or(i64::MAX),
            history: super::DEFAULT_HISTORY,
        })
    }

    /// Sets how long after closing a conversation the customer's next message reopens it.
    #[must_use]
    pub fn with_reopen_window(mut self, window: Duration) -> Self {
        self.reopen_window_ms = i64::try_from(window.as_millis()).unwrap_or(i64::MAX);
        self
    }

    /// Sets how many earlier messages each assignment's context carries.
    #[must_use]
    pub fn with_history(mut self, history: usize) -> Self {
        self.history = history;
        self
    }

    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    /// The database file.
    pub fn path(&self) -> &std::path::Path {
        &self.path
    }
}

#[async_trait]
impl Store for SqliteStore {
    async fn route_batch(
        &self,
        messages: &[NormalizedMessage],
        now_ms: i64,
        decide: &DecideFn<'_>,
    ) -> Result<Vec<RouteOutcome>, StoreError> {
        // IMMEDIATE: take the write lock first, so the reads below stay valid until commit.
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let outcomes = route_in(
            &mut tx,
            messages,
            now_ms,
            self.reopen_window_ms,
            self.history,
            decide,
        )
        .await?;
        tx.commit().await?;
        Ok(outcomes)
    }

    async fn decision(
        &self,
        channel_id: &str,
        external_id: &str,
    ) -> Result<Option<StoredDecision>, StoreError> {
        let mut connection = self.pool.acquire().await?;
        decision(&mut connection, channel_id, external_id).await
    }

    async fn mark_published(&self, keys: &[(String, String)]) -> Result<(), StoreError> {
        if keys.is_empty() {
            return Ok(());
        }
        sqlx::query(
            "INSERT OR IGNORE INTO published_decisions (channel_id, external_id)
             SELECT value ->> 0, value ->> 1 FROM jsonb_each(?)",
        )
        .bind(serde_json::to_string(keys)?)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn customer(&self, id: &str) -> Result<Option<CustomerRecord>, StoreError> {
        let mut connection = self.pool.acquire().await?;
        customer(&mut connection, id).await
    }

    async fn customer_by_identity(
        &self,
        kind: &str,
        address: &str,
    ) -> Result<Option<CustomerRecord>, StoreError> {
        let mut connection = self.pool.acquire().await?;
        let id: Option<String> =
            sqlx::query_scalar("SELECT customer_id FROM identities WHERE kind = ? AND address = ?")
                .bind(kind)
                .bind(address)
                .fetch_optional(&mut *connection)
                .await?;
        match id {
            Some(id) => customer(&mut connection, &id).await,
            None => Ok(None),
        }
    }

    async fn patch_attributes(
        &self,
        id: &str,
        patch: &Map<String, Value>,
    ) -> Result<Option<CustomerRecord>, StoreError> {
        // IMMEDIATE: read-modify-write under the write lock, like the router's batches.
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let Some(current) = customer(&mut tx, id).await? else {
            return Ok(None);
        };
        let mut attributes = current.attributes;
        for (key, value) in patch {
            if value.is_null() {
                attributes.remove(key);
            } else {
                attributes.insert(key.clone(), value.clone());
            }
        }
        sqlx::query("UPDATE customers SET attributes = ? WHERE id = ?")
            .bind(serde_json::to_string(&attributes)?)
            .bind(id)
            .execute(&mut *tx)
            .await?;
        let updated = customer(&mut tx, id).await?;
        tx.commit().await?;
        Ok(updated)
    }

    async fn conversation(&self, id: &str) -> Result<Option<ConversationRecord>, StoreError> {
        let mut connection = self.pool.acquire().await?;
        conversation(&mut connection, id).await
    }

    async fn close_conversation(
        &self,
        id: &str,
        now_ms: i64,
    ) -> Result<Option<ConversationRecord>, StoreError> {
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        sqlx::query(
            "UPDATE conversations SET status = 'closed', closed_at = ?1, last_activity_at = ?1
             WHERE id = ?2 AND status = 'open'",
        )
        .bind(now_ms)
        .bind(id)
        .execute(&mut *tx)
        .await?;
        let record = conversation(&mut tx, id).await?;
        tx.commit().await?;
        Ok(record)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    async fn close(&self) {
        self.pool.close().await;
    }
}

async fn customer(
    connection: &mut SqliteConnection,
    id: &str,
) -> Result<Option<CustomerRecord>, StoreError> {
    let Some(row) =
        sqlx::query("SELECT id, attributes, created_at, last_seen_at FROM customers WHERE id = ?")
            .bind(id)
            .fetch_optional(&mut *connection)
            .await?
    else {
        return Ok(None);
    };
    let identities = sqlx::query(
        "SELECT kind, address FROM identities WHERE customer_id = ? ORDER BY created_at, kind",
    )
    .bind(id)
    .fetch_all(&mut *connection)
    .await?
    .iter()
    .map(|r| Identity {
        kind: r.get("kind"),
        address: r.get("address"),
    })
    .collect();
    Ok(Some(CustomerRecord {
        id: row.get("id"),
        attributes: serde_json::from_str(row.get::<&str, _>("attributes"))?,
        identities,
        created_at: row.get("created_at"),
        last_seen_at: row.get("last_seen_at"),
    }))
}

async fn conversation(
    connection: &mut SqliteConnection,
    id: &str,
) -> Result<Option<ConversationRecord>, StoreError> {
    let Some(row) = sqlx::query(
        "SELECT id, customer_id, status, channels, queue, agent_id, message_count, opened_at,
                last_activity_at, closed_at
         FROM conversations WHERE id = ?",
    )
    .bind(id)
    .fetch_optional(&mut *connection)
    .await?
    else {
        return Ok(None);
    };
    let mut messages = Vec::new();
    for m in sqlx::query(
        "SELECT envelope, direction, received_at FROM messages
         WHERE conversation_id = ? ORDER BY received_at, rowid",
    )
    .bind(id)
    .fetch_all(&mut *connection)
    .await?
    {
        let mut envelope: Value = serde_json::from_str(m.get::<&str, _>("envelope"))?;
        if let Value::Object(fields) = &mut envelope {
            fields.insert("direction".into(), json!(m.get::<String, _>("direction")));
            fields.insert("stored_at".into(), json!(m.get::<i64, _>("received_at")));
        }
        messages.push(envelope);
    }
    let mut decisions = Vec::new();
    for d in sqlx::query(
        "SELECT queue, urgency, priority, decided_at, assignment FROM decisions
         WHERE conversation_id = ? ORDER BY decided_at, rowid",
    )
    .bind(id)
    .fetch_all(&mut *connection)
    .await?
    {
        let assignment: Value = serde_json::from_str(d.get::<&str, _>("assignment"))?;
        decisions.push(json!({
            "queue": d.get::<String, _>("queue"),
            "urgency": d.get::<i64, _>("urgency"),
            "priority": d.get::<i64, _>("priority"),
            "decided_at": d.get::<i64, _>("decided_at"),
            "message_id": assignment["data"]["message"]["message_id"],
            "explanation": assignment["data"]["explanation"],
        }));
    }
    Ok(Some(ConversationRecord {
        id: row.get("id"),
        customer_id: row.get("customer_id"),
        status: row.get("status"),
        channels: serde_json::from_str(row.get::<&str, _>("channels"))?,
        queue: row.get("queue"),
        agent_id: row.get("agent_id"),
        message_count: row.get("message_count"),
        opened_at: row.get("opened_at"),
        last_activity_at: row.get("last_activity_at"),
        closed_at: row.get("closed_at"),
        messages,
        decisions,
    }))
}

async fn decision(
    connection: &mut SqliteConnection,
    channel_id: &str,
    external_id: &str,
) -> Result<Option<StoredDecision>, StoreError> {
    let row = sqlx::query(
        "SELECT assignment, queue, priority, EXISTS (
             SELECT 1 FROM published_decisions p
             WHERE p.channel_id = d.channel_id AND p.external_id = d.external_id
         ) AS published
         FROM decisions d WHERE d.channel_id = ? AND d.external_id = ?",
    )
    .bind(channel_id)
    .bind(external_id)
    .fetch_optional(&mut *connection)
    .await?;
    Ok(row.as_ref().map(stored_decision))
}

/// A customer as the batch sees it: loaded, or created by an earlier message of the batch.
struct CustomerState {
    attributes: Map<String, Value>,
    identities: Vec<Identity>,
    recent: u32,
    open_conversations: u32,
    is_new: bool,
    /// Latest messages, oldest first, at most `history_len`.
    history: std::collections::VecDeque<HistoryEntry>,
}

/// A customer's open conversation as the batch sees it.
struct ConversationState {
    id: String,
    channels: Vec<String>,
    message_count: i64,
    opened_at: i64,
    agent_id: Option<String>,
    queue: Option<String>,
    is_new: bool,
}

/// The whole batch in a fixed number of statements: bulk reads keyed by JSON arrays, the
/// decisions made in order against an in-memory view (so a later message sees an earlier one's
/// customer and conversation), then bulk writes. Each statement is one round trip to the SQLite
/// thread, whatever the batch size.
async fn route_in(
    connection: &mut SqliteConnection,
    messages: &[NormalizedMessage],
    now_ms: i64,
    reopen_window_ms: i64,
    history_len: usize,
    decide: &DecideFn<'_>,
) -> Result<Vec<RouteOutcome>, StoreError> {
    let keys: Vec<[&str; 2]> = messages
        .iter()
        .map(|m| [m.channel.id.as_str(), m.external_id.as_str()])
        .collect();
    let mut existing: HashMap<(String, String), StoredDecision> = HashMap::new();
    for row in sqlx::query(
        "SELECT d.channel_id, d.external_id, d.assignment, d.queue, d.priority,
                p.channel_id IS NOT NULL AS published
         FROM jsonb_each(?) j
         JOIN decisions d ON d.channel_id = j.value ->> 0 AND d.external_id = j.value ->> 1
         LEFT JOIN published_decisions p
           ON p.channel_id = d.channel_id AND p.external_id = d.external_id",
    )
    .bind(serde_json::to_string(&keys)?)
    .fetch_all(&mut *connection)
    .await?
    {
        existing.insert(
            (row.get("channel_id"), row.get("external_id")),
            stored_decision(&row),
        );
    }

    // Every identity the batch's messages carry: their senders and the identities adapters
    // list in `metadata.identities` (a web chat form's email and phone).
    let all_identities: Vec<Vec<(String, String)>> = messages.iter().map(identities_of).collect();
    let senders: Vec<[&str; 2]> = all_identities
        .iter()
        .flatten()
        .map(|(kind, address)| [kind.as_str(), address.as_str()])
        .collect();
    let mut by_identity: HashMap<(String, String), String> = HashMap::new();
    let mut customers: HashMap<String, CustomerState> = HashMap::new();
    for row in sqlx::query(
        "SELECT i.kind, i.address, c.id, c.attributes
         FROM jsonb_each(?) j
         JOIN identities i ON i.kind = j.value ->> 0 AND i.address = j.value ->> 1
         JOIN customers c ON c.id = i.customer_id",
    )
    .bind(serde_json::to_string(&senders)?)
    .fetch_all(&mut *connection)
    .await?
    {
        let id: String = row.get("id");
        by_identity.insert((row.get("kind"), row.get("address")), id.clone());
        if let std::collections::hash_map::Entry::Vacant(entry) = customers.entry(id) {
            let attributes: Map<String, Value> =
                serde_json::from_str(row.get::<&str, _>("attributes"))?;
            entry.insert(CustomerState {
                attributes,
                identities: Vec::new(),
                recent: 0,
                open_conversations: 0,
                is_new: false,
                history: std::collections::VecDeque::new(),
            });
        }
    }
    let known: Vec<&String> = customers.keys().collect();
    let known = serde_json::to_string(&known)?;
    for row in sqlx::query(
        "SELECT customer_id, kind, address FROM identities
         WHERE customer_id IN (SELECT value FROM json_each(?))
         ORDER BY created_at, kind",
    )
    .bind(&known)
    .fetch_all(&mut *connection)
    .await?
    {
        if let Some(customer) = customers.get_mut(row.get::<&str, _>("customer_id")) {
            customer.identities.push(Identity {
                kind: row.get("kind"),
                address: row.get("address"),
            });
        }
    }
    // Each customer's latest open conversation continues; without one, the latest closed
    // within the reopen window does (open ones come first).
    let mut conversations: HashMap<String, ConversationState> = HashMap::new();
    for row in sqlx::query(
        "SELECT id, customer_id, status, channels, message_count, opened_at, agent_id, queue
         FROM conversations
         WHERE customer_id IN (SELECT value FROM json_each(?1))
               AND (status = 'open' OR closed_at > ?2)
         ORDER BY status = 'open' DESC, last_activity_at DESC",
    )
    .bind(&known)
    .bind(now_ms.saturating_sub(reopen_window_ms))
    .fetch_all(&mut *connection)
    .await?
    {
        let customer_id: String = row.get("customer_id");
        let open = row.get::<&str, _>("status") == "open";
        let taken = conversations.contains_key(&customer_id);
        if let Some(customer) = customers.get_mut(&customer_id)
            && (open || !taken)
        {
            customer.open_conversations += 1;
        }
        if taken {
            continue; // an older open one, or a closed one while an open one continues
        }
        let channels: Vec<String> = serde_json::from_str(row.get::<&str, _>("channels"))?;
        conversations.insert(
            customer_id,
            ConversationState {
                id: row.get("id"),
                channels,
                message_count: row.get("message_count"),
                opened_at: row.get("opened_at"),
                agent_id: row.get("agent_id"),
                queue: row.get("queue"),
                is_new: false,
            },
        );
    }
    for row in sqlx::query(
        "SELECT customer_id, count(*) AS n FROM messages
         WHERE customer_id IN (SELECT value FROM json_each(?)) AND received_at > ?
         GROUP BY customer_id",
    )
    .bind(&known)
    .bind(now_ms - DAY_MS)
    .fetch_all(&mut *connection)
    .await?
    {
        if let Some(customer) = customers.get_mut(row.get::<&str, _>("customer_id")) {
            customer.recent = u32::try_from(row.get::<i64, _>("n")).unwrap_or(u32::MAX);
        }
    }

    // The latest messages of each known customer, on every channel.
    if history_len > 0 {
        for row in sqlx::query(
            // Per customer, only its latest rows are read (index on customer, time).
            "SELECT m.customer_id, m.envelope ->> '$.channel.kind' AS channel,
                    m.envelope ->> '$.text' AS text, m.received_at
             FROM json_each(?1) c
             JOIN messages m ON m.rowid IN (
                 SELECT rowid FROM messages WHERE customer_id = c.value
                 ORDER BY received_at DESC, rowid DESC LIMIT ?2)
             ORDER BY m.customer_id, m.received_at, m.rowid",
        )
        .bind(&known)
        .bind(i64::try_from(history_len).unwrap_or(i64::MAX))
        .fetch_all(&mut *connection)
        .await?
        {
            if let Some(customer) = customers.get_mut(row.get::<&str, _>("customer_id")) {
                customer.history.push_back(HistoryEntry {
                    channel: row.get::<Option<String>, _>("channel").unwrap_or_default(),
                    text: row.get::<Option<String>, _>("text").unwrap_or_default(),
                    at: rfc3339(row.get("received_at")),
                });
            }
        }
    }

    // Decide in order.
    let mut outcomes = Vec::with_capacity(messages.len());
    let mut touched: Vec<String> = Vec::new();
    let mut new_identities: Vec<(String, String, String)> = Vec::new();
    let mut rows: Vec<Row<'_>> = Vec::new();
    let mut decided: HashMap<(String, String), StoredDecision> = HashMap::new();
    for (position, message) in messages.iter().enumerate() {
        let key = (message.channel.id.clone(), message.external_id.clone());
        if let Some(stored) = existing.get(&key).or_else(|| decided.get(&key)) {
            outcomes.push(RouteOutcome::Existing(stored.clone()));
            continue;
        }
        // The customer behind the first known identity (the sender's first); a new one if
        // none is known. The message's unknown identities are linked to that customer; one
        // that already belongs to another customer stays there (merging is explicit).
        let identities = &all_identities[position];
        let customer_id = match identities.iter().find_map(|i| by_identity.get(i)) {
            Some(id) => id.clone(),
            None => {
                let id = Uuid::new_v4().to_string();
                customers.insert(
                    id.clone(),
                    CustomerState {
                        attributes: Map::new(),
                        identities: Vec::new(),
                        recent: 0,
                        open_conversations: 0,
                        is_new: true,
                        history: std::collections::VecDeque::new(),
                    },
                );
                id
            }
        };
        let Some(customer) = customers.get_mut(&customer_id) else {
            continue; // inserted just above or loaded
        };
        for identity in identities {
            if by_identity.contains_key(identity) {
                continue;
            }
            by_identity.insert(identity.clone(), customer_id.clone());
            new_identities.push((identity.0.clone(), identity.1.clone(), customer_id.clone()));
            customer.identities.push(Identity {
                kind: identity.0.clone(),
                address: identity.1.clone(),
            });
        }
        customer.attributes = merged_attributes(std::mem::take(&mut customer.attributes), message);
        let conversation = conversations.entry(customer_id.clone()).or_insert_with(|| {
            customer.open_conversations += 1;
            ConversationState {
                id: Uuid::new_v4().to_string(),
                channels: Vec::new(),
                message_count: 0,
                opened_at: now_ms,
                agent_id: None,
                queue: None,
                is_new: true,
            }
        });
        let resolved = Resolved {
            customer: CustomerView {
                id: customer_id.clone(),
                attributes: customer.attributes.clone(),
                identities: customer.identities.clone(),
                contacts_last_24h: customer.recent.saturating_add(1),
                open_conversations: customer.open_conversations.max(1),
                previous_agent: conversation.agent_id.clone(),
                channels_used: with(&conversation.channels, &message.channel.kind),
            },
            conversation: ConversationView {
                id: conversation.id.clone(),
                new: conversation.message_count == 0,
                age: (now_ms - conversation.opened_at).max(0) / 1000,
                message_count: u32::try_from(conversation.message_count).unwrap_or(u32::MAX),
            },
            history: customer.history.iter().cloned().collect(),
            conversation_opened_at: conversation.opened_at,
        };
        let routed = decide(message, &resolved);

        customer.recent = customer.recent.saturating_add(1);
        if history_len > 0 {
            if customer.history.len() >= history_len {
                customer.history.pop_front();
            }
            customer.history.push_back(HistoryEntry {
                channel: message.channel.kind.clone(),
                text: message.text.clone(),
                at: rfc3339(now_ms),
            });
        }
        conversation.message_count += 1;
        if !conversation.channels.contains(&message.channel.kind) {
            conversation.channels.push(message.channel.kind.clone());
        }
        conversation.queue = Some(routed.queue.clone());
        if !touched.contains(&customer_id) {
            touched.push(customer_id.clone());
        }
        rows.push(Row {
            message,
            conversation_id: conversation.id.clone(),
            customer_id: customer_id.clone(),
            envelope: serde_json::to_string(message)?,
            queue: routed.queue.clone(),
            urgency: routed.urgency,
            priority: routed.priority,
            assignment: routed.assignment.clone(),
        });
        let stored = StoredDecision {
            assignment: routed.assignment.clone(),
            queue: routed.queue.clone(),
            priority: routed.priority,
            published: false,
        };
        decided.insert(key, stored);
        outcomes.push(RouteOutcome::New {
            queue: routed.queue,
            priority: routed.priority,
            assignment: routed.assignment,
        });
    }
    if rows.is_empty() {
        return Ok(outcomes);
    }

    // Write in bulk: customers and identities, conversations, messages, decisions.
    let mut new_customers = Vec::new();
    let mut seen_customers = Vec::new();
    let mut new_conversations = Vec::new();
    let mut seen_conversations = Vec::new();
    for customer_id in &touched {
        let (Some(customer), Some(conversation)) =
            (customers.get(customer_id), conversations.get(customer_id))
        else {
            continue;
        };
        let customer_row = json!({
            "id": customer_id,
            "attributes": serde_json::to_string(&customer.attributes)?,
        });
        if customer.is_new {
            new_customers.push(customer_row);
        } else {
            seen_customers.push(customer_row);
        }
        let conversation_row = json!({
            "id": conversation.id,
            "customer_id": customer_id,
            "channels": serde_json::to_string(&conversation.channels)?,
            "queue": conversation.queue,
            "message_count": conversation.message_count,
            "opened_at": conversation.opened_at,
        });
        if conversation.is_new {
            new_conversations.push(conversation_row);
        } else {
            seen_conversations.push(conversation_row);
        }
    }
    if !new_customers.is_empty() {
        sqlx::query(
            "INSERT INTO customers (id, attributes, created_at, last_seen_at)
             SELECT value ->> 'id', value ->> 'attributes', ?1, ?1 FROM jsonb_each(?2)",
        )
        .bind(now_ms)
        .bind(Value::Array(new_customers).to_string())
        .execute(&mut *connection)
        .await?;
    }
    if !new_identities.is_empty() {
        sqlx::query(
            "INSERT INTO identities (kind, address, customer_id, created_at)
             SELECT value ->> 0, value ->> 1, value ->> 2, ?1 FROM jsonb_each(?2)",
        )
        .bind(now_ms)
        .bind(serde_json::to_string(&new_identities)?)
        .execute(&mut *connection)
        .await?;
    }
    if !seen_customers.is_empty() {
        sqlx::query(
            "UPDATE customers SET attributes = j.value ->> 'attributes', last_seen_at = ?1
             FROM jsonb_each(?2) AS j WHERE customers.id = j.value ->> 'id'",
        )
        .bind(now_ms)
        .bind(Value::Array(seen_customers).to_string())
        .execute(&mut *connection)
        .await?;
    }
    if !new_conversations.is_empty() {
        sqlx::query(
            "INSERT INTO conversations (id, customer_id, status, channels, queue, message_count,
                                        opened_at, last_activity_at)
             SELECT value ->> 'id', value ->> 'customer_id', 'open', value ->> 'channels',
                    value ->> 'queue', value ->> 'message_count', value ->> 'opened_at', ?1
             FROM jsonb_each(?2)",
        )
        .bind(now_ms)
        .bind(Value::Array(new_conversations).to_string())
        .execute(&mut *connection)
        .await?;
    }
    if !seen_conversations.is_empty() {
        sqlx::query(
            "UPDATE conversations SET channels = j.value ->> 'channels', queue = j.value ->> 'queue',
                    message_count = j.value ->> 'message_count', last_activity_at = ?1,
                    status = 'open', closed_at = NULL
             FROM jsonb_each(?2) AS j WHERE conversations.id = j.value ->> 'id'",
        )
        .bind(now_ms)
        .bind(Value::Array(seen_conversations).to_string())
        .execute(&mut *connection)
        .await?;
    }
    // The large texts (envelope, assignment) are bound as parameters, not wrapped in JSON:
    // no escaping on our side and no JSON parsing on SQLite's.
    for chunk in rows.chunks(ROWS_PER_INSERT) {
        let mut insert = QueryBuilder::<Sqlite>::new(
            "INSERT INTO messages (channel_id, external_id, message_id, conversation_id, customer_id,
                                   direction, envelope, received_at) ",
        );
        insert.push_values(chunk, |mut values, row| {
            values
                .push_bind(&row.message.channel.id)
                .push_bind(&row.message.external_id)
                .push_bind(row.message.message_id.to_string())
                .push_bind(&row.conversation_id)
                .push_bind(&row.customer_id)
                .push_bind("inbound")
                .push_bind(&row.envelope)
                .push_bind(now_ms);
        });
        insert.build().execute(&mut *connection).await?;
        let mut insert = QueryBuilder::<Sqlite>::new(
            "INSERT INTO decisions (channel_id, external_id, conversation_id, queue, urgency,
                                    priority, assignment, decided_at) ",
        );
        insert.push_values(chunk, |mut values, row| {
            values
                .push_bind(&row.message.channel.id)
                .push_bind(&row.message.external_id)
                .push_bind(&row.conversation_id)
                .push_bind(&row.queue)
                .push_bind(i64::from(row.urgency))
                .push_bind(i64::from(row.priority))
                .push_bind(&row.assignment)
                .push_bind(now_ms);
        });
        insert.build().execute(&mut *connection).await?;
    }
    Ok(outcomes)
}

/// A message's identities, the sender first, then `metadata.identities` (`[{kind, address}]`),
/// without repeats.
fn identities_of(message: &NormalizedMessage) -> Vec<(String, String)> {
    let mut identities = vec![(message.sender.kind.clone(), message.sender.address.clone())];
    let listed = message
        .metadata
        .get("identities")
        .and_then(Value::as_array)
        .into_iter()
        .flatten();
    for entry in listed {
        let (Some(kind), Some(address)) = (
            entry.get("kind").and_then(Value::as_str),
            entry.get("address").and_then(Value::as_str),
        ) else {
            continue;
        };
        let identity = (kind.to_owned(), address.trim().to_owned());
        if !identity.0.is_empty() && !identity.1.is_empty() && !identities.contains(&identity) {
            identities.push(identity);
        }
    }
    identities
}

/// Unix milliseconds → RFC 3339.
fn rfc3339(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

/// Rows per multi-row INSERT (8 parameters each, well under SQLite's limit of 32,766).
const ROWS_PER_INSERT: usize = 256;

/// One routed message, as written.
struct Row<'a> {
    message: &'a NormalizedMessage,
    conversation_id: String,
    customer_id: String,
    envelope: String,
    queue: String,
    urgency: u8,
    priority: u8,
    assignment: String,
}

/// `channels` plus `kind`, if not there yet.
fn with(channels: &[String], kind: &str) -> Vec<String> {
    let mut channels = channels.to_vec();
    if !channels.iter().any(|c| c == kind) {
        channels.push(kind.to_owned());
    }
    channels
}

fn stored_decision(row: &sqlx::sqlite::SqliteRow) -> StoredDecision {
    StoredDecision {
        assignment: row.get("assignment"),
        queue: row.get("queue"),
        priority: u8::try_from(row.get::<i64, _>("priority")).unwrap_or(0),
        published: row.get::<i64, _>("published") != 0,
    }
}
