//! PostgreSQL store: several daemons share one database (RabbitMQ mode; the embedded bus lives
//! in SQLite). It behaves exactly as the SQLite store: the in-order decisions are the shared
//! [`Batch`]; only loading and writing are PostgreSQL's, in a fixed number of statements per
//! batch keyed by arrays (`unnest`). Everything a batch reads before deciding is one call of
//! `switchboard_batch_reads` (migration 0004), so a batch makes two round trips (`BEGIN`, the
//! call) before its decisions.
//!
//! # Concurrency
//!
//! Two routers may race on the same new identity (two partitions, one customer writing on two
//! channels), and a redelivered message may race with its first delivery on another node. SQLite
//! serializes whole batches with `BEGIN IMMEDIATE`; here a batch runs at READ COMMITTED and
//! first takes a transaction-scoped advisory lock on every message key and every identity it
//! carries (hashed, sorted, so two batches never wait on each other in opposite orders). Every
//! read comes after the locks, so a batch sees whatever the batch before it committed: a
//! redelivery finds the recorded decision, a new identity is created once. The customers found
//! are then row-locked (`FOR NO KEY UPDATE`, in id order), which orders batches that reach one
//! customer through different identities, and `patch_attributes`, against each other; the
//! continuing conversations are row-locked too, which orders `close_conversation`.
//!
//! SERIALIZABLE with retries would also be correct, but it aborts on overlaps it cannot rule
//! out (predicate locks on shared index pages of unrelated customers), and every retry calls the
//! router's decision again; the locks make a conflicting batch wait instead, for one statement.

use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use serde::Deserialize;
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgRow};
use sqlx::types::Json;
use sqlx::{Connection as _, PgConnection, Row as _};
use switchboard_channel::NormalizedMessage;

use super::batch::{Batch, DAY_MS, MergeRow, explicit_merge, merge_entry};
use super::reads::{ConversationRow, HistoryRow, IdentityRow, KnownRow, ThreadRow, rows};
use super::{
    ConversationRecord, CustomerRecord, DecideFn, LinkOutcome, MergeOutcome, RouteOutcome, Store,
    StoreError, StoredDecision,
};
use crate::router::decide::Identity;

/// Connections per process: one per router batch in flight, the rest for the API.
const POOL_SIZE: u32 = 8;

/// A pooled connection idle this long is pinged before it is used.
pub(super) const PING_IF_IDLE_FOR: Duration = Duration::from_secs(1);

/// How long opening the store waits for the server.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

pub struct PgStore {
    pool: PgPool,
    /// A closed conversation the customer writes to again within this long is reopened.
    reopen_window_ms: i64,
    /// Earlier messages each decision sees in `history`.
    history: usize,
}

impl PgStore {
    /// Connects and applies migrations (concurrent starts are safe: the migrator takes an
    /// advisory lock).
    pub async fn open(url: &str) -> Result<Self, StoreError> {
        let open_error = |source| StoreError::Open {
            url: crate::telemetry::redact_url(url),
            source,
        };
        // Every statement here is prepared once per connection and keyed by primary keys or
        // arrays of them: planning it again for each batch's values (PostgreSQL's default for
        // the first executions, and for good when it rates the generic plan no better) cost
        // more than executing it, ~0.5 ms per batch for the context reads alone.
        let options = PgConnectOptions::from_str(url)
            .map_err(open_error)?
            .options([("plan_cache_mode", "force_generic_plan")]);
        // The pool retries a refused connection until its timeout and then reports only the
        // timeout; one plain connection first says what is wrong (refused, password, database).
        let probe = tokio::time::timeout(CONNECT_TIMEOUT, PgConnection::connect_with(&options))
            .await
            .map_err(|_| {
                open_error(sqlx::Error::Io(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no answer within {} s", CONNECT_TIMEOUT.as_secs()),
                )))
            })?
            .map_err(open_error)?;
        let _ = probe.close().await;
        // Over TCP, each new connection gets `TCP_NODELAY`, which sqlx 0.9.0 leaves off.
        let tcp_port = options.get_socket().is_none().then(|| options.get_port());
        let pool = PgPoolOptions::new()
            .max_connections(POOL_SIZE)
            .after_connect(move |_, _| {
                Box::pin(async move {
                    if let Some(port) = tcp_port {
                        let switched = super::nodelay::switch_off_nagle(port);
                        tracing::debug!(switched, "TCP_NODELAY set on new PostgreSQL sockets");
                    }
                    Ok(())
                })
            })
            .acquire_timeout(CONNECT_TIMEOUT)
            // sqlx pings every connection it is given back (off the caller's path) and closes a
            // broken one; pinging again on each acquire cost the router a round trip per batch.
            // A connection idle for a while may have been cut since (a server restart): that
            // one is still pinged, and replaced if it does not answer.
            .test_before_acquire(false)
            .before_acquire(|connection, meta| {
                Box::pin(async move {
                    if meta.idle_for >= PING_IF_IDLE_FOR {
                        connection.ping().await?;
                    }
                    Ok(true)
                })
            })
            .connect_with(options)
            .await
            .map_err(open_error)?;
        sqlx::migrate!("src/store/migrations/postgres")
            .run(&pool)
            .await?;
        Ok(Self {
            pool,
            reopen_window_ms: i64::try_from(super::DEFAULT_REOPEN_WINDOW.as_millis())
                .unwrap_or(i64::MAX),
            history: super::DEFAULT_HISTORY,
        })
    }

    /// The client port of one of the pool's connections, as the server sees it (`None` over a
    /// Unix socket).
    #[cfg(test)]
    pub(super) async fn client_port(&self) -> Result<Option<u16>, StoreError> {
        let port: Option<i32> = sqlx::query_scalar("SELECT inet_client_port()")
            .fetch_one(&self.pool)
            .await?;
        Ok(port.and_then(|port| u16::try_from(port).ok()))
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

    /// One attempt at [`Store::merge`]: `None` when the survivor was merged into another
    /// customer between looking it up and locking it (merging into it then would leave a
    /// tombstone pointing at itself).
    async fn try_merge(
        &self,
        into: &str,
        from: &str,
        now_ms: i64,
    ) -> Result<Option<MergeOutcome>, StoreError> {
        let mut tx = self.pool.begin().await?;
        let given = into;
        let Some(into) = survivor_of(&mut tx, given).await? else {
            return Ok(Some(MergeOutcome::Unknown(given.to_owned())));
        };
        // Both rows locked, in id order like the router's batches lock customers.
        let mut ids = [into.clone(), from.to_owned()];
        ids.sort();
        let locked = sqlx::query(
            "SELECT id, merged_into FROM customers WHERE id = ANY($1) ORDER BY id
             FOR NO KEY UPDATE",
        )
        .bind(&ids[..])
        .fetch_all(&mut *tx)
        .await?;
        let Some(absorbed) = locked.iter().find(|r| r.get::<&str, _>("id") == from) else {
            return Ok(Some(MergeOutcome::Unknown(from.to_owned())));
        };
        let survivor_moved = locked.iter().any(|r| {
            r.get::<&str, _>("id") == into && r.get::<Option<String>, _>("merged_into").is_some()
        });
        if survivor_moved {
            // Merged into another customer since it was looked up: look again.
            tx.rollback().await?;
            return Ok(None);
        }
        if let Some(merged_into) = absorbed.get::<Option<String>, _>("merged_into") {
            return Ok(Some(MergeOutcome::AlreadyMerged {
                customer: from.to_owned(),
                into: merged_into,
            }));
        }
        if into == from {
            // `given` was merged into `from` before: asked the other way round.
            if given != into {
                return Ok(Some(MergeOutcome::AlreadyMerged {
                    customer: given.to_owned(),
                    into,
                }));
            }
            return Ok(Some(MergeOutcome::Same));
        }
        let (Some(survivor), Some(absorbed)) = (
            customer(&mut tx, &into).await?,
            customer(&mut tx, from).await?,
        ) else {
            return Ok(Some(MergeOutcome::Unknown(from.to_owned())));
        };
        // The survivor's open conversation continues; else the absorbed one's.
        let keep: Option<String> = sqlx::query_scalar(
            "SELECT id FROM conversations WHERE customer_id IN ($1, $2) AND status = 'open'
             ORDER BY customer_id = $1 DESC, last_activity_at DESC LIMIT 1",
        )
        .bind(&into)
        .bind(from)
        .fetch_optional(&mut *tx)
        .await?;
        let mut attributes = survivor.attributes;
        let row = explicit_merge(
            &into,
            from,
            &mut attributes,
            &absorbed.attributes,
            &absorbed.identities,
            keep,
        );
        sqlx::query("UPDATE customers SET attributes = $1::jsonb WHERE id = $2")
            .bind(serde_json::to_string(&attributes)?)
            .bind(&into)
            .execute(&mut *tx)
            .await?;
        apply_merge(&mut tx, &row, now_ms).await?;
        let customer = customer(&mut tx, &into).await?;
        tx.commit().await?;
        Ok(Some(match customer {
            Some(customer) => MergeOutcome::Merged {
                customer,
                merge_id: row.id,
            },
            None => MergeOutcome::Unknown(into),
        }))
    }
}

#[async_trait]
impl Store for PgStore {
    async fn route_batch(
        &self,
        messages: &[NormalizedMessage],
        now_ms: i64,
        published: &[(String, String)],
        decide: &DecideFn<'_>,
    ) -> Result<Vec<RouteOutcome>, StoreError> {
        let mut tx = self.pool.begin().await?;
        let outcomes = route_in(
            &mut tx,
            messages,
            published,
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
        let row = sqlx::query(
            "SELECT assignment, queue, priority, EXISTS (
                 SELECT 1 FROM published_decisions p
                 WHERE p.channel_id = d.channel_id AND p.external_id = d.external_id
             ) AS published
             FROM decisions d WHERE d.channel_id = $1 AND d.external_id = $2",
        )
        .bind(channel_id)
        .bind(external_id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.as_ref().map(stored_decision))
    }

    async fn mark_published(&self, keys: &[(String, String)]) -> Result<(), StoreError> {
        if keys.is_empty() {
            return Ok(());
        }
        let mut connection = self.pool.acquire().await?;
        mark_published(&mut connection, keys).await
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
        let id: Option<String> = sqlx::query_scalar(
            "SELECT customer_id FROM identities WHERE kind = $1 AND address = $2",
        )
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
        let mut tx = self.pool.begin().await?;
        // Row-locked like the router's batches lock the customers they load: no lost update,
        // and no merge moves the customer away before the commit.
        let Some(id) = locked_survivor(&mut tx, id).await? else {
            // Now rather than when the pool next tests the connection: it holds a table lock.
            tx.rollback().await?;
            return Ok(None);
        };
        let id = id.as_str();
        let Json(stored) = sqlx::query_scalar::<_, Json<Map<String, Value>>>(
            "SELECT attributes FROM customers WHERE id = $1",
        )
        .bind(id)
        .fetch_one(&mut *tx)
        .await?;
        let mut attributes = stored.clone();
        super::apply_attribute_patch(&mut attributes, patch);
        if let Err(error) = super::check_attributes_size(&stored, &attributes) {
            tx.rollback().await?;
            return Err(error);
        }
        sqlx::query("UPDATE customers SET attributes = $1::jsonb WHERE id = $2")
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
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "UPDATE conversations SET status = 'closed', closed_at = $1, last_activity_at = $1
             WHERE id = $2 AND status = 'open'",
        )
        .bind(now_ms)
        .bind(id)
        .execute(&mut *tx)
        .await?;
        let record = conversation(&mut tx, id).await?;
        tx.commit().await?;
        Ok(record)
    }

    async fn assign_agent(&self, id: &str, agent_id: &str) -> Result<bool, StoreError> {
        let updated = sqlx::query("UPDATE conversations SET agent_id = $1 WHERE id = $2")
            .bind(agent_id)
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(updated.rows_affected() > 0)
    }

    async fn merge(&self, into: &str, from: &str, now_ms: i64) -> Result<MergeOutcome, StoreError> {
        for _ in 0..LOCK_ATTEMPTS {
            if let Some(outcome) = self.try_merge(into, from, now_ms).await? {
                return Ok(outcome);
            }
        }
        Err(StoreError::Retry(format!(
            "customer {into} kept being merged into others while {from} was merged into it"
        )))
    }

    async fn link_identity(
        &self,
        customer_id: &str,
        kind: &str,
        address: &str,
        now_ms: i64,
    ) -> Result<LinkOutcome, StoreError> {
        let mut tx = self.pool.begin().await?;
        // The same lock a router batch takes for this identity.
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(lock_key("identity", kind, address))
            .execute(&mut *tx)
            .await?;
        let Some(customer_id) = locked_survivor(&mut tx, customer_id).await? else {
            return Ok(LinkOutcome::UnknownCustomer);
        };
        let owner: Option<String> = sqlx::query_scalar(
            "SELECT customer_id FROM identities WHERE kind = $1 AND address = $2",
        )
        .bind(kind)
        .bind(address)
        .fetch_optional(&mut *tx)
        .await?;
        match owner {
            Some(owner) if owner != customer_id => {
                return Ok(LinkOutcome::Taken { customer_id: owner });
            }
            Some(_) => {}
            None => {
                sqlx::query(
                    "INSERT INTO identities (kind, address, customer_id, verified, created_at)
                     VALUES ($1, $2, $3, true, $4)",
                )
                .bind(kind)
                .bind(address)
                .bind(&customer_id)
                .bind(now_ms)
                .execute(&mut *tx)
                .await?;
            }
        }
        let record = customer(&mut tx, &customer_id).await?;
        tx.commit().await?;
        Ok(record.map_or(LinkOutcome::UnknownCustomer, LinkOutcome::Linked))
    }

    async fn merges(&self, customer_id: &str) -> Result<Vec<Value>, StoreError> {
        let rows = sqlx::query(
            // The customer (or, for a merged id, its survivor) and every customer merged into
            // it: their whole history, and the suggestions that now name the survivor.
            "WITH survivor AS (SELECT coalesce(merged_into, id) AS id FROM customers WHERE id = $1),
                  family AS (SELECT c.id FROM customers AS c, survivor AS s
                             WHERE c.id = s.id OR c.merged_into = s.id)
             SELECT id, status, into_customer, from_customer, identity_kind, identity_address,
                    reason, detail, created_at
             FROM merges
             WHERE into_customer IN (SELECT id FROM family) OR from_customer IN (SELECT id FROM family)
             ORDER BY created_at, id",
        )
        .bind(customer_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                let identity = match (row.get("identity_kind"), row.get("identity_address")) {
                    (Some(kind), Some(address)) => Some((kind, address)),
                    _ => None,
                };
                Ok(merge_entry(
                    row.get("id"),
                    row.get("status"),
                    row.get("into_customer"),
                    row.get("from_customer"),
                    identity,
                    row.get("reason"),
                    row.try_get::<Json<Value>, _>("detail")?.0,
                    row.get("created_at"),
                ))
            })
            .collect()
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    async fn close(&self) {
        self.pool.close().await;
    }
}

/// How often a write that found its customer merged away between looking it up and locking it
/// looks again. Merges leave no chains (a merge re-points the absorbed customer's tombstones),
/// so one more look is what a race takes; more means merges keep coming.
const LOCK_ATTEMPTS: usize = 8;

/// The customer `id` names (itself, or the one it was merged into), its row locked for the
/// transaction, so no merge moves it away before the commit. A merge committed between the
/// lookup and the lock is followed to its survivor.
async fn locked_survivor(
    connection: &mut PgConnection,
    id: &str,
) -> Result<Option<String>, StoreError> {
    let mut id = id.to_owned();
    for _ in 0..LOCK_ATTEMPTS {
        let merged_into: Option<Option<String>> =
            sqlx::query_scalar("SELECT merged_into FROM customers WHERE id = $1 FOR NO KEY UPDATE")
                .bind(&id)
                .fetch_optional(&mut *connection)
                .await?;
        match merged_into {
            None => return Ok(None),
            Some(None) => return Ok(Some(id)),
            Some(Some(survivor)) => id = survivor,
        }
    }
    Err(StoreError::Retry(format!(
        "customer {id} kept being merged into others"
    )))
}

/// The customer `id` names: itself, or the one it was merged into.
async fn survivor_of(
    connection: &mut PgConnection,
    id: &str,
) -> Result<Option<String>, StoreError> {
    Ok(
        sqlx::query_scalar("SELECT coalesce(merged_into, id) FROM customers WHERE id = $1")
            .bind(id)
            .fetch_optional(&mut *connection)
            .await?,
    )
}

/// Moves customer `row.from`'s identities, conversations (closing its open ones but the one
/// kept) and messages to `row.into`, leaves a tombstone, drops the pair's open suggestions,
/// makes the absorbed customer's other open suggestions name the survivor, and audits the merge.
async fn apply_merge(
    connection: &mut PgConnection,
    row: &MergeRow,
    now_ms: i64,
) -> Result<(), StoreError> {
    sqlx::query(
        "UPDATE conversations SET customer_id = $1,
                closed_at = CASE WHEN status = 'open' AND id IS DISTINCT FROM $3
                                 THEN $4 ELSE closed_at END,
                status = CASE WHEN status = 'open' AND id IS DISTINCT FROM $3
                              THEN 'closed' ELSE status END
         WHERE customer_id = $2",
    )
    .bind(&row.into)
    .bind(&row.from)
    .bind(&row.keep_conversation)
    .bind(now_ms)
    .execute(&mut *connection)
    .await?;
    for statement in [
        "UPDATE identities SET customer_id = $1 WHERE customer_id = $2",
        "UPDATE messages SET customer_id = $1 WHERE customer_id = $2",
        "UPDATE customers SET merged_into = $1 WHERE id = $2 OR merged_into = $2",
        "DELETE FROM merges WHERE status = 'suggested'
           AND ((into_customer = $1 AND from_customer = $2)
             OR (into_customer = $2 AND from_customer = $1))",
        // The absorbed customer's other open suggestions now name the survivor (one the
        // survivor already has for the same customer and identity is not kept twice).
        "DELETE FROM merges WHERE status = 'suggested' AND into_customer = $2 AND EXISTS (
           SELECT 1 FROM merges AS d WHERE d.status = 'suggested' AND d.into_customer = $1
             AND d.from_customer = merges.from_customer
             AND d.identity_kind = merges.identity_kind
             AND d.identity_address = merges.identity_address)",
        "UPDATE merges SET into_customer = $1 WHERE status = 'suggested' AND into_customer = $2",
        "DELETE FROM merges WHERE status = 'suggested' AND from_customer = $2 AND EXISTS (
           SELECT 1 FROM merges AS d WHERE d.status = 'suggested' AND d.from_customer = $1
             AND d.into_customer = merges.into_customer
             AND d.identity_kind = merges.identity_kind
             AND d.identity_address = merges.identity_address)",
        "UPDATE merges SET from_customer = $1 WHERE status = 'suggested' AND from_customer = $2",
    ] {
        sqlx::query(statement)
            .bind(&row.into)
            .bind(&row.from)
            .execute(&mut *connection)
            .await?;
    }
    record_merges(connection, std::slice::from_ref(row), "merged", now_ms).await
}

/// Audit rows; a suggestion already open for the same pair and identity is kept as it is.
async fn record_merges(
    connection: &mut PgConnection,
    rows: &[MergeRow],
    status: &str,
    now_ms: i64,
) -> Result<(), StoreError> {
    for row in rows {
        let (kind, address) = row.identity.clone().unzip();
        sqlx::query(
            "INSERT INTO merges (id, status, into_customer, from_customer, identity_kind,
                                 identity_address, reason, detail, created_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8::jsonb, $9) ON CONFLICT DO NOTHING",
        )
        .bind(&row.id)
        .bind(status)
        .bind(&row.into)
        .bind(&row.from)
        .bind(kind)
        .bind(address)
        .bind(row.reason)
        .bind(row.detail.to_string())
        .bind(now_ms)
        .execute(&mut *connection)
        .await?;
    }
    Ok(())
}

async fn customer(
    connection: &mut PgConnection,
    id: &str,
) -> Result<Option<CustomerRecord>, StoreError> {
    let Some(id) = survivor_of(connection, id).await? else {
        return Ok(None);
    };
    let id = id.as_str();
    let Some(row) =
        sqlx::query("SELECT id, attributes, created_at, last_seen_at FROM customers WHERE id = $1")
            .bind(id)
            .fetch_optional(&mut *connection)
            .await?
    else {
        return Ok(None);
    };
    let identities = sqlx::query(
        "SELECT kind, address FROM identities WHERE customer_id = $1 ORDER BY created_at, kind, address",
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
        attributes: row.try_get::<Json<_>, _>("attributes")?.0,
        identities,
        created_at: row.get("created_at"),
        last_seen_at: row.get("last_seen_at"),
    }))
}

async fn conversation(
    connection: &mut PgConnection,
    id: &str,
) -> Result<Option<ConversationRecord>, StoreError> {
    let Some(row) = sqlx::query(
        "SELECT id, customer_id, status, channels, queue, agent_id, message_count, opened_at,
                last_activity_at, closed_at
         FROM conversations WHERE id = $1",
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
         WHERE conversation_id = $1 ORDER BY received_at, seq",
    )
    .bind(id)
    .fetch_all(&mut *connection)
    .await?
    {
        let Json(mut envelope) = m.try_get::<Json<Value>, _>("envelope")?;
        if let Value::Object(fields) = &mut envelope {
            fields.insert("direction".into(), json!(m.get::<String, _>("direction")));
            fields.insert("stored_at".into(), json!(m.get::<i64, _>("received_at")));
        }
        messages.push(envelope);
    }
    let mut decisions = Vec::new();
    for d in sqlx::query(
        "SELECT queue, urgency, priority, decided_at, assignment FROM decisions
         WHERE conversation_id = $1 ORDER BY decided_at, seq",
    )
    .bind(id)
    .fetch_all(&mut *connection)
    .await?
    {
        let assignment: Value = serde_json::from_str(d.get::<&str, _>("assignment"))?;
        decisions.push(json!({
            "queue": d.get::<String, _>("queue"),
            "urgency": i64::from(d.get::<i16, _>("urgency")),
            "priority": i64::from(d.get::<i16, _>("priority")),
            "decided_at": d.get::<i64, _>("decided_at"),
            "message_id": assignment["data"]["message"]["message_id"],
            "explanation": assignment["data"]["explanation"],
        }));
    }
    Ok(Some(ConversationRecord {
        id: row.get("id"),
        customer_id: row.get("customer_id"),
        status: row.get("status"),
        channels: row.try_get::<Json<_>, _>("channels")?.0,
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

async fn mark_published(
    connection: &mut PgConnection,
    keys: &[(String, String)],
) -> Result<(), StoreError> {
    if keys.is_empty() {
        return Ok(());
    }
    let (channels, externals): (Vec<&str>, Vec<&str>) = keys
        .iter()
        .map(|(channel, external)| (channel.as_str(), external.as_str()))
        .unzip();
    sqlx::query(
        "INSERT INTO published_decisions (channel_id, external_id)
         SELECT * FROM unnest($1::text[], $2::text[])
         ON CONFLICT DO NOTHING",
    )
    .bind(channels)
    .bind(externals)
    .execute(&mut *connection)
    .await?;
    Ok(())
}

/// The whole batch in a fixed number of statements: the locks, bulk reads keyed by arrays,
/// the decisions made in order against an in-memory view ([`Batch`]), then bulk writes.
async fn route_in(
    connection: &mut PgConnection,
    messages: &[NormalizedMessage],
    published: &[(String, String)],
    now_ms: i64,
    reopen_window_ms: i64,
    history_len: usize,
    decide: &DecideFn<'_>,
) -> Result<Vec<RouteOutcome>, StoreError> {
    let mut batch = Batch::new(messages, now_ms, history_len);

    // In one call, `switchboard_batch_reads` (migration 0004): the marks of the router's
    // earlier decisions; the locks, before reading anything (see the module docs); then every
    // read, the customers row-locked first, each query taking its snapshot after the locks
    // before it.
    let mut locks: Vec<i64> = messages
        .iter()
        .map(|m| lock_key("message", &m.channel.id, &m.external_id))
        .chain(
            batch
                .identities()
                .map(|(kind, address)| lock_key("identity", kind, address)),
        )
        .collect();
    locks.sort_unstable();
    locks.dedup();
    let (channels, externals): (Vec<&str>, Vec<&str>) = messages
        .iter()
        .map(|m| (m.channel.id.as_str(), m.external_id.as_str()))
        .unzip();
    let (kinds, addresses): (Vec<String>, Vec<String>) = batch.identities().cloned().unzip();
    let (thread_channels, thread_keys): (Vec<String>, Vec<String>) = batch
        .thread_keys()
        .into_iter()
        .map(|(channel, key)| (channel.to_owned(), key.to_owned()))
        .unzip();
    let (published_channels, published_externals): (Vec<&str>, Vec<&str>) = published
        .iter()
        .map(|(channel, external)| (channel.as_str(), external.as_str()))
        .unzip();
    let Json(reads) = sqlx::query_scalar::<_, Json<BatchReads>>(
        "SELECT switchboard_batch_reads($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
    )
    .bind(published_channels)
    .bind(published_externals)
    .bind(locks)
    .bind(channels)
    .bind(externals)
    .bind(kinds)
    .bind(addresses)
    .bind(now_ms.saturating_sub(reopen_window_ms))
    .bind(now_ms - DAY_MS)
    .bind(i64::try_from(history_len).unwrap_or(i64::MAX))
    .bind(thread_channels)
    .bind(thread_keys)
    .fetch_one(&mut *connection)
    .await?;

    for row in reads.existing {
        batch.existing(
            row.channel_id,
            row.external_id,
            StoredDecision {
                assignment: row.assignment,
                queue: row.queue,
                priority: u8::try_from(row.priority).unwrap_or(0),
                published: row.published,
            },
        );
    }
    for row in reads.known {
        // The customer row was locked after the identity was read: a merge committed in
        // between moved the identity. Give the batch back to be retried on fresh reads.
        if let Some(survivor) = row.merged_into {
            return Err(StoreError::Retry(format!(
                "customer {} was merged into {survivor}",
                row.id
            )));
        }
        let attributes = row.attributes;
        batch.known_identity((row.kind, row.address), row.id, || Ok(attributes))?;
    }
    for row in reads.identities {
        batch.customer_identity(
            &row.customer_id,
            Identity {
                kind: row.kind,
                address: row.address,
            },
            row.created_at,
        );
    }
    for row in reads.conversations {
        let (customer_id, open, loaded) = row.split();
        batch.conversation(customer_id, open, || Ok(loaded))?;
    }
    for row in reads.contacts {
        batch.recent_contacts(&row.customer_id, row.count);
    }
    for row in reads.history {
        batch.history(
            &row.customer_id,
            row.channel.as_deref().unwrap_or_default(),
            row.text.as_deref().unwrap_or_default(),
            row.received_at,
        );
    }
    for row in reads.threads {
        let (customer_id, open, loaded) = row.conversation.split();
        batch.thread(row.channel_id, row.thread_key, customer_id, open, loaded);
    }
    let decided = batch.decide(decide)?;
    if decided.messages.is_empty() {
        return Ok(decided.outcomes);
    }

    // Write in bulk: customers and identities, conversations, messages and decisions. JSON
    // goes in as text and is cast to JSONB by the server.
    if !decided.new_customers.is_empty() {
        let rows = &decided.new_customers;
        sqlx::query(
            "INSERT INTO customers (id, attributes, created_at, last_seen_at)
             SELECT id, attributes::jsonb, $3, $3
             FROM unnest($1::text[], $2::text[]) AS c(id, attributes)",
        )
        .bind(column(rows, |c| c.id.as_str()))
        .bind(column(rows, |c| c.attributes.as_str()))
        .bind(now_ms)
        .execute(&mut *connection)
        .await?;
    }
    if !decided.new_identities.is_empty() {
        let rows = &decided.new_identities;
        sqlx::query(
            "INSERT INTO identities (kind, address, customer_id, created_at)
             SELECT kind, address, customer_id, $4
             FROM unnest($1::text[], $2::text[], $3::text[]) AS i(kind, address, customer_id)",
        )
        .bind(column(rows, |(kind, _, _)| kind.as_str()))
        .bind(column(rows, |(_, address, _)| address.as_str()))
        .bind(column(rows, |(_, _, customer)| customer.as_str()))
        .bind(now_ms)
        .execute(&mut *connection)
        .await?;
    }
    if !decided.seen_customers.is_empty() {
        let rows = &decided.seen_customers;
        sqlx::query(
            "UPDATE customers SET attributes = c.attributes::jsonb, last_seen_at = $3
             FROM unnest($1::text[], $2::text[]) AS c(id, attributes)
             WHERE customers.id = c.id",
        )
        .bind(column(rows, |c| c.id.as_str()))
        .bind(column(rows, |c| c.attributes.as_str()))
        .bind(now_ms)
        .execute(&mut *connection)
        .await?;
    }
    if !decided.new_conversations.is_empty() {
        let rows = &decided.new_conversations;
        sqlx::query(
            "INSERT INTO conversations (id, customer_id, status, channels, queue, message_count,
                                        opened_at, last_activity_at)
             SELECT id, customer_id, 'open', channels::jsonb, queue, message_count, opened_at, $7
             FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::bigint[],
                         $6::bigint[])
                  AS c(id, customer_id, channels, queue, message_count, opened_at)",
        )
        .bind(column(rows, |c| c.id.as_str()))
        .bind(column(rows, |c| c.customer_id.as_str()))
        .bind(column(rows, |c| c.channels.as_str()))
        .bind(column(rows, |c| c.queue.as_deref()))
        .bind(column(rows, |c| c.message_count))
        .bind(column(rows, |c| c.opened_at))
        .bind(now_ms)
        .execute(&mut *connection)
        .await?;
    }
    if !decided.seen_conversations.is_empty() {
        let rows = &decided.seen_conversations;
        sqlx::query(
            "UPDATE conversations SET channels = c.channels::jsonb, queue = c.queue,
                    message_count = c.message_count, last_activity_at = $5,
                    status = 'open', closed_at = NULL
             FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[])
                  AS c(id, channels, queue, message_count)
             WHERE conversations.id = c.id",
        )
        .bind(column(rows, |c| c.id.as_str()))
        .bind(column(rows, |c| c.channels.as_str()))
        .bind(column(rows, |c| c.queue.as_deref()))
        .bind(column(rows, |c| c.message_count))
        .bind(now_ms)
        .execute(&mut *connection)
        .await?;
    }
    // Messages and decisions in one statement: the batch's large texts (envelopes, assignments)
    // go in one request. sqlx 0.9.0 does not set TCP_NODELAY, so a request larger than the
    // socket buffer waits for the server's delayed ACK (about 40 ms) once per request.
    let rows = &decided.messages;
    sqlx::query(
        "WITH m AS (
             INSERT INTO messages (channel_id, external_id, message_id, conversation_id,
                                   customer_id, direction, envelope, received_at, thread_key)
             SELECT channel_id, external_id, message_id, conversation_id, customer_id,
                    'inbound', envelope::jsonb, $11, thread_key
             FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[],
                         $6::text[], $12::text[])
                  AS m(channel_id, external_id, message_id, conversation_id, customer_id,
                       envelope, thread_key)
         )
         INSERT INTO decisions (channel_id, external_id, conversation_id, queue, urgency,
                                priority, assignment, decided_at)
         SELECT channel_id, external_id, conversation_id, queue, urgency, priority, assignment,
                $11
         FROM unnest($1::text[], $2::text[], $4::text[], $7::text[], $8::smallint[],
                     $9::smallint[], $10::text[])
              AS d(channel_id, external_id, conversation_id, queue, urgency, priority,
                   assignment)",
    )
    .bind(column(rows, |r| r.message.channel.id.as_str()))
    .bind(column(rows, |r| r.message.external_id.as_str()))
    .bind(column(rows, |r| r.message.message_id.to_string()))
    .bind(column(rows, |r| r.conversation_id.as_str()))
    .bind(column(rows, |r| r.customer_id.as_str()))
    .bind(column(rows, |r| r.envelope.as_str()))
    .bind(column(rows, |r| r.queue.as_str()))
    .bind(column(rows, |r| i16::from(r.urgency)))
    .bind(column(rows, |r| i16::from(r.priority)))
    .bind(column(rows, |r| r.assignment.as_str()))
    .bind(now_ms)
    .bind(column(rows, |r| r.message.thread_key.as_deref()))
    .execute(&mut *connection)
    .await?;
    for merge in &decided.merges {
        apply_merge(connection, merge, now_ms).await?;
    }
    record_merges(connection, &decided.suggestions, "suggested", now_ms).await?;
    Ok(decided.outcomes)
}

/// One column of `rows`, to bind as an array.
fn column<'r, R, T>(rows: &'r [R], value: impl Fn(&'r R) -> T) -> Vec<T> {
    rows.iter().map(value).collect()
}

/// An advisory lock key for `(kind, a, b)`: the same on every node and every build (std's
/// hasher is neither), so two daemons lock the same key for the same identity.
fn lock_key(kind: &str, a: &str, b: &str) -> i64 {
    let digest = Sha256::new()
        .chain_update(kind)
        .chain_update([0])
        .chain_update(a)
        .chain_update([0])
        .chain_update(b)
        .finalize();
    let mut first = [0; 8];
    first.copy_from_slice(&digest[..8]);
    i64::from_be_bytes(first)
}

fn stored_decision(row: &PgRow) -> StoredDecision {
    StoredDecision {
        assignment: row.get("assignment"),
        queue: row.get("queue"),
        priority: u8::try_from(row.get::<i16, _>("priority")).unwrap_or(0),
        published: row.get("published"),
    }
}

/// What `switchboard_batch_reads` returns (migration 0004): its rows by kind.
#[derive(Deserialize)]
struct BatchReads {
    #[serde(deserialize_with = "rows")]
    existing: Vec<ExistingRow>,
    #[serde(deserialize_with = "rows")]
    known: Vec<KnownRow>,
    #[serde(deserialize_with = "rows")]
    identities: Vec<IdentityRow>,
    #[serde(deserialize_with = "rows")]
    conversations: Vec<ConversationRow>,
    #[serde(deserialize_with = "rows")]
    contacts: Vec<ContactsRow>,
    #[serde(deserialize_with = "rows")]
    history: Vec<HistoryRow>,
    #[serde(deserialize_with = "rows")]
    threads: Vec<ThreadRow>,
}

/// A decision already recorded for one of the batch's messages.
#[derive(Deserialize)]
struct ExistingRow {
    channel_id: String,
    external_id: String,
    assignment: String,
    queue: String,
    priority: i16,
    published: bool,
}

/// How many messages a known customer sent in the last 24 hours.
#[derive(Deserialize)]
struct ContactsRow {
    customer_id: String,
    count: i64,
}
