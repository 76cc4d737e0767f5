//! SQLite store: one file, WAL journal, `synchronous = NORMAL`. In WAL mode NORMAL loses no
//! committed transaction when the process crashes (the WAL is written before commit returns);
//! only an OS crash or power loss can drop the last commits.

use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::Value;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{Row, Sqlite, Transaction};
use switchboard_channel::NormalizedMessage;
use uuid::Uuid;

use super::{Record, Resolved, Store, StoreError, StoredDecision, merged_attributes};
use crate::router::decide::{ConversationView, CustomerView, Identity};

const DAY_MS: i64 = 24 * 60 * 60 * 1000;

pub struct SqliteStore {
    pool: SqlitePool,
}

impl SqliteStore {
    /// Opens (creating if missing) the database and applies migrations.
    pub async fn open(url: &str) -> Result<Self, StoreError> {
        let open_error = |source| StoreError::Open {
            url: url.to_owned(),
            source,
        };
        let options = SqliteConnectOptions::from_str(url)
            .map_err(open_error)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(10))
            .foreign_keys(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options)
            .await
            .map_err(open_error)?;
        sqlx::migrate!("src/store/migrations/sqlite")
            .run(&pool)
            .await?;
        Ok(Self { pool })
    }

    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }
}

#[async_trait]
impl Store for SqliteStore {
    async fn decision(
        &self,
        channel_id: &str,
        external_id: &str,
    ) -> Result<Option<StoredDecision>, StoreError> {
        let row = sqlx::query(
            "SELECT assignment, queue, priority, published FROM decisions
             WHERE channel_id = ? AND external_id = ?",
        )
        .bind(channel_id)
        .bind(external_id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|row| StoredDecision {
            assignment: row.get("assignment"),
            queue: row.get("queue"),
            priority: u8::try_from(row.get::<i64, _>("priority")).unwrap_or(0),
            published: row.get::<i64, _>("published") != 0,
        }))
    }

    async fn resolve(
        &self,
        message: &NormalizedMessage,
        now_ms: i64,
    ) -> Result<Resolved, StoreError> {
        let mut tx = self.pool.begin().await?;
        let customer_id = customer_for(
            &mut tx,
            &message.sender.kind,
            &message.sender.address,
            now_ms,
        )
        .await?;

        let stored: String = sqlx::query_scalar("SELECT attributes FROM customers WHERE id = ?")
            .bind(&customer_id)
            .fetch_one(&mut *tx)
            .await?;
        let attributes = merged_attributes(serde_json::from_str(&stored)?, message);

        let identities = sqlx::query(
            "SELECT kind, address FROM identities WHERE customer_id = ? ORDER BY created_at, kind",
        )
        .bind(&customer_id)
        .fetch_all(&mut *tx)
        .await?
        .into_iter()
        .map(|row| Identity {
            kind: row.get("kind"),
            address: row.get("address"),
        })
        .collect();

        let open = sqlx::query(
            "SELECT id, channels, message_count, opened_at, agent_id FROM conversations
             WHERE customer_id = ? AND status = 'open'
             ORDER BY last_activity_at DESC LIMIT 1",
        )
        .bind(&customer_id)
        .fetch_optional(&mut *tx)
        .await?;
        let open_conversations: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM conversations WHERE customer_id = ? AND status = 'open'",
        )
        .bind(&customer_id)
        .fetch_one(&mut *tx)
        .await?;

        let (conversation, channels_used, previous_agent) = match open {
            Some(row) => {
                let channels: Vec<String> = serde_json::from_str(row.get::<&str, _>("channels"))?;
                let count: i64 = row.get("message_count");
                let opened_at: i64 = row.get("opened_at");
                (
                    ConversationView {
                        id: row.get("id"),
                        new: count == 0,
                        age: (now_ms - opened_at).max(0) / 1000,
                        message_count: u32::try_from(count).unwrap_or(u32::MAX),
                    },
                    channels,
                    row.get::<Option<String>, _>("agent_id"),
                )
            }
            None => {
                let id = Uuid::new_v4().to_string();
                sqlx::query(
                    "INSERT INTO conversations (id, customer_id, status, opened_at, last_activity_at)
                     VALUES (?, ?, 'open', ?, ?)",
                )
                .bind(&id)
                .bind(&customer_id)
                .bind(now_ms)
                .bind(now_ms)
                .execute(&mut *tx)
                .await?;
                (
                    ConversationView {
                        id,
                        new: true,
                        age: 0,
                        message_count: 0,
                    },
                    Vec::new(),
                    None,
                )
            }
        };

        let recent: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM messages WHERE customer_id = ? AND received_at > ?",
        )
        .bind(&customer_id)
        .bind(now_ms - DAY_MS)
        .fetch_one(&mut *tx)
        .await?;
        tx.commit().await?;

        Ok(Resolved {
            customer: CustomerView {
                id: customer_id,
                attributes,
                identities,
                contacts_last_24h: u32::try_from(recent + 1).unwrap_or(u32::MAX),
                open_conversations: u32::try_from(open_conversations.max(1)).unwrap_or(u32::MAX),
                previous_agent,
                channels_used,
            },
            conversation,
        })
    }

    async fn record(&self, records: &[Record], now_ms: i64) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        for record in records {
            let message = &record.message;
            let inserted = sqlx::query(
                "INSERT INTO messages (channel_id, external_id, message_id, conversation_id, customer_id,
                                       direction, envelope, received_at)
                 VALUES (?, ?, ?, ?, ?, 'inbound', ?, ?)
                 ON CONFLICT (channel_id, external_id) DO NOTHING",
            )
            .bind(&message.channel.id)
            .bind(&message.external_id)
            .bind(message.message_id.to_string())
            .bind(&record.conversation_id)
            .bind(&record.customer_id)
            .bind(serde_json::to_string(message)?)
            .bind(now_ms)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if inserted == 0 {
                continue;
            }
            sqlx::query(
                "INSERT INTO decisions (channel_id, external_id, conversation_id, queue, urgency, priority,
                                        assignment, decided_at)
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?)
                 ON CONFLICT (channel_id, external_id) DO NOTHING",
            )
            .bind(&message.channel.id)
            .bind(&message.external_id)
            .bind(&record.conversation_id)
            .bind(&record.queue)
            .bind(i64::from(record.urgency))
            .bind(i64::from(record.priority))
            .bind(&record.assignment)
            .bind(now_ms)
            .execute(&mut *tx)
            .await?;
            sqlx::query(
                "UPDATE conversations SET
                    message_count = message_count + 1,
                    last_activity_at = ?,
                    queue = ?,
                    channels = CASE WHEN EXISTS (SELECT 1 FROM json_each(channels) WHERE value = ?)
                                    THEN channels ELSE json_insert(channels, '$[#]', ?) END
                 WHERE id = ?",
            )
            .bind(now_ms)
            .bind(&record.queue)
            .bind(&message.channel.kind)
            .bind(&message.channel.kind)
            .bind(&record.conversation_id)
            .execute(&mut *tx)
            .await?;
            sqlx::query("UPDATE customers SET attributes = ?, last_seen_at = ? WHERE id = ?")
                .bind(serde_json::to_string(&Value::Object(
                    record.attributes.clone(),
                ))?)
                .bind(now_ms)
                .bind(&record.customer_id)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn mark_published(&self, keys: &[(String, String)]) -> Result<(), StoreError> {
        if keys.is_empty() {
            return Ok(());
        }
        let mut tx = self.pool.begin().await?;
        for (channel_id, external_id) in keys {
            sqlx::query(
                "UPDATE decisions SET published = 1 WHERE channel_id = ? AND external_id = ?",
            )
            .bind(channel_id)
            .bind(external_id)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    async fn close(&self) {
        self.pool.close().await;
    }
}

/// The customer owning identity `(kind, address)`, created with it if new.
async fn customer_for(
    tx: &mut Transaction<'_, Sqlite>,
    kind: &str,
    address: &str,
    now_ms: i64,
) -> Result<String, StoreError> {
    let existing: Option<String> =
        sqlx::query_scalar("SELECT customer_id FROM identities WHERE kind = ? AND address = ?")
            .bind(kind)
            .bind(address)
            .fetch_optional(&mut **tx)
            .await?;
    if let Some(id) = existing {
        return Ok(id);
    }
    let id = Uuid::new_v4().to_string();
    sqlx::query(
        "INSERT INTO customers (id, attributes, created_at, last_seen_at) VALUES (?, '{}', ?, ?)",
    )
    .bind(&id)
    .bind(now_ms)
    .bind(now_ms)
    .execute(&mut **tx)
    .await?;
    sqlx::query(
        "INSERT INTO identities (kind, address, customer_id, created_at) VALUES (?, ?, ?, ?)",
    )
    .bind(kind)
    .bind(address)
    .bind(&id)
    .bind(now_ms)
    .execute(&mut **tx)
    .await?;
    Ok(id)
}
