//! SQLite store: one file, WAL journal, `synchronous = NORMAL`. In WAL mode NORMAL loses no
//! committed transaction when the process crashes (the WAL is written before commit returns);
//! only an OS crash or power loss can drop the last commits.

use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use serde::Deserialize;
use serde_json::{Map, Value, json};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{QueryBuilder, Row as _, Sqlite, SqliteConnection, TypeInfo as _, ValueRef as _};
use switchboard_channel::NormalizedMessage;

use super::batch::{Batch, DAY_MS, HashMap, HashSet, MergeRow, explicit_merge, merge_entry};
use super::cache::CustomerCache;
use super::reads::{ConversationRow, HistoryRow, IdentityRow, KnownRow, ThreadRow};
use super::{
    ConversationRecord, CustomerRecord, DecideFn, LinkOutcome, MergeOutcome, RouteOutcome, Store,
    StoreError, StoredDecision,
};
use crate::router::decide::Identity;

pub struct SqliteStore {
    /// Reads (the API).
    pool: SqlitePool,
    /// Every write of the store, on one connection. In WAL mode a connection drops its whole
    /// page cache when it sees that another connection wrote; with the router's batches, the
    /// published marks and the API's writes on one connection, the router's cache stays warm
    /// (measured: the router's reads went to the kernel for pages on every batch).
    writer: SqlitePool,
    /// What the router's batches read about their customers, as the last batch left it.
    cache: CustomerCache,
    /// `store_generation` as this store's last write left it: when a batch finds another
    /// value, another store on the same file wrote, and the cache is dropped.
    generation: std::sync::atomic::AtomicI64,
    /// Checkpoints the WAL from a reader connection, off the writer's thread.
    checkpointer: tokio::task::JoinHandle<()>,
    /// WAL pages (estimated) written since the checkpointer last ran (see [`checkpoint_wal`]).
    unchecked: std::sync::Arc<std::sync::atomic::AtomicU64>,
    path: PathBuf,
    /// The database file as opened ([`file_identity`]).
    file: Option<(u64, u64)>,
    /// A closed conversation the customer writes to again within this long is reopened.
    reopen_window_ms: i64,
    /// Earlier messages each decision sees in `history`.
    history: usize,
    /// [`READ_BATCH`] for this `history`.
    read_statement: String,
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
            .pragma("cache_size", "-32768")
            // Statement journals (a multi-row INSERT or UPDATE … FROM inside the batch's
            // transaction keeps one, to undo just that statement) spill to a file in /var/tmp
            // past 64 KiB: measured 3.5 KB of temp-file writes per routed message. In memory.
            .pragma("temp_store", "memory");
        // The writer does not checkpoint every ~1,000 pages (a few MiB copied back into the
        // database would stall the router's commit); a background task does it from another
        // connection (measured: a batch of 128's commit 6.3 → 3.4 ms). A checkpoint running
        // beside the writer cannot always let the WAL restart from its beginning, so the
        // writer still checkpoints itself past 16,384 pages (64 MiB): the WAL stays bounded.
        let writer = SqlitePoolOptions::new()
            .test_before_acquire(false)
            .before_acquire(|connection, _| Box::pin(out_of_transaction(connection)))
            .max_connections(1)
            .connect_with(options.clone().pragma("wal_autocheckpoint", "16384"))
            .await
            .map_err(open_error)?;
        sqlx::migrate!("src/store/migrations/sqlite")
            .run(&writer)
            .await?;
        let pool = SqlitePoolOptions::new()
            .test_before_acquire(false)
            .before_acquire(|connection, _| Box::pin(out_of_transaction(connection)))
            .max_connections(4)
            .connect_with(options)
            .await
            .map_err(open_error)?;
        let path = std::fs::canonicalize(&path).unwrap_or(path);
        let file = file_identity(&path);
        let unchecked = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let checkpointer = tokio::spawn(checkpoint_wal(pool.clone(), unchecked.clone()));
        Ok(Self {
            pool,
            writer,
            cache: CustomerCache::new(super::DEFAULT_CACHE_CUSTOMERS),
            generation: std::sync::atomic::AtomicI64::new(-1),
            checkpointer,
            unchecked,
            path,
            file,
            reopen_window_ms: i64::try_from(super::DEFAULT_REOPEN_WINDOW.as_millis())
                .unwrap_or(i64::MAX),
            history: super::DEFAULT_HISTORY,
            read_statement: read_statement(super::DEFAULT_HISTORY),
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
        self.read_statement = read_statement(history);
        self
    }

    /// Keeps at most `customers` customers in memory for routing (0: none, every batch reads
    /// the database).
    #[must_use]
    pub fn with_cache(mut self, customers: usize) -> Self {
        self.cache = CustomerCache::new(customers);
        self
    }

    /// Marks a write of this store in `store_generation` (inside the write's transaction).
    async fn bump_generation(&self, connection: &mut SqliteConnection) -> Result<(), StoreError> {
        let n: i64 = sqlx::query_scalar("UPDATE store_generation SET n = n + 1 RETURNING n")
            .fetch_one(&mut *connection)
            .await?;
        self.generation
            .store(n, std::sync::atomic::Ordering::SeqCst);
        Ok(())
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
        published: &[(String, String)],
        decide: &DecideFn<'_>,
    ) -> Result<Vec<RouteOutcome>, StoreError> {
        // IMMEDIATE: take the write lock first, so the reads below stay valid until commit.
        let mut tx = self.writer.begin_with("BEGIN IMMEDIATE").await?;
        mark_published(&mut tx, published).await?;
        let outcomes = route_in(&mut tx, self, messages, now_ms, decide).await;
        let wrote = |outcomes: &[RouteOutcome]| {
            outcomes
                .iter()
                .any(|outcome| matches!(outcome, RouteOutcome::New { .. }))
        };
        let outcomes = match outcomes {
            Ok(outcomes) if wrote(&outcomes) => match self.bump_generation(&mut tx).await {
                Ok(()) => outcomes,
                Err(error) => {
                    self.cache.clear();
                    return Err(error);
                }
            },
            Ok(outcomes) => outcomes,
            Err(error) => {
                // The cache may already hold this batch's state; the rollback undoes it.
                self.cache.clear();
                return Err(error);
            }
        };
        if let Err(error) = tx.commit().await {
            self.cache.clear();
            return Err(error.into());
        }
        let recorded = outcomes
            .iter()
            .filter(|outcome| matches!(outcome, RouteOutcome::New { .. }))
            .count() as u64;
        self.unchecked.fetch_add(
            PAGES_PER_BATCH + recorded * PAGES_PER_MESSAGE,
            std::sync::atomic::Ordering::Relaxed,
        );
        metrics::gauge!("switchboard_store_cache_customers").set(self.cache.len() as f64);
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
        let mut connection = self.writer.acquire().await?;
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
        let mut tx = self.writer.begin_with("BEGIN IMMEDIATE").await?;
        let Some(current) = customer(&mut tx, id).await? else {
            return Ok(None);
        };
        let mut attributes = current.attributes.clone();
        super::apply_attribute_patch(&mut attributes, patch);
        super::check_attributes_size(&current.attributes, &attributes)?;
        // `current` is the survivor when `id` names a merged customer.
        sqlx::query("UPDATE customers SET attributes = ? WHERE id = ?")
            .bind(serde_json::to_string(&attributes)?)
            .bind(&current.id)
            .execute(&mut *tx)
            .await?;
        let updated = customer(&mut tx, &current.id).await?;
        // Before the commit, while this transaction holds the writer: no batch runs between.
        self.cache.evict(&current.id);
        self.bump_generation(&mut tx).await?;
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
        let mut tx = self.writer.begin_with("BEGIN IMMEDIATE").await?;
        sqlx::query(
            "UPDATE conversations SET status = 'closed', closed_at = ?1, last_activity_at = ?1
             WHERE id = ?2 AND status = 'open'",
        )
        .bind(now_ms)
        .bind(id)
        .execute(&mut *tx)
        .await?;
        let record = conversation(&mut tx, id).await?;
        if let Some(record) = &record {
            self.cache.evict(&record.customer_id);
        }
        self.bump_generation(&mut tx).await?;
        tx.commit().await?;
        Ok(record)
    }

    async fn assign_agent(&self, id: &str, agent_id: &str) -> Result<bool, StoreError> {
        let mut tx = self.writer.begin_with("BEGIN IMMEDIATE").await?;
        let customer: Option<String> = sqlx::query_scalar(
            "UPDATE conversations SET agent_id = ? WHERE id = ? RETURNING customer_id",
        )
        .bind(agent_id)
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(customer) = customer else {
            return Ok(false);
        };
        self.cache.evict(&customer);
        self.bump_generation(&mut tx).await?;
        tx.commit().await?;
        Ok(true)
    }

    async fn merge(&self, into: &str, from: &str, now_ms: i64) -> Result<MergeOutcome, StoreError> {
        let mut tx = self.writer.begin_with("BEGIN IMMEDIATE").await?;
        let given = into;
        let Some(into) = survivor_of(&mut tx, given).await? else {
            return Ok(MergeOutcome::Unknown(given.to_owned()));
        };
        let Some(absorbed) = sqlx::query("SELECT merged_into FROM customers WHERE id = ?")
            .bind(from)
            .fetch_optional(&mut *tx)
            .await?
        else {
            return Ok(MergeOutcome::Unknown(from.to_owned()));
        };
        if let Some(merged_into) = absorbed.get::<Option<String>, _>("merged_into") {
            return Ok(MergeOutcome::AlreadyMerged {
                customer: from.to_owned(),
                into: merged_into,
            });
        }
        if into == from {
            // `given` was merged into `from` before: asked the other way round.
            if given != into {
                return Ok(MergeOutcome::AlreadyMerged {
                    customer: given.to_owned(),
                    into,
                });
            }
            return Ok(MergeOutcome::Same);
        }
        let (Some(survivor), Some(absorbed)) = (
            customer(&mut tx, &into).await?,
            customer(&mut tx, from).await?,
        ) else {
            return Ok(MergeOutcome::Unknown(from.to_owned()));
        };
        // The survivor's open conversation continues; else the absorbed one's.
        let keep: Option<String> = sqlx::query_scalar(
            "SELECT id FROM conversations WHERE customer_id IN (?1, ?2) AND status = 'open'
             ORDER BY customer_id = ?1 DESC, last_activity_at DESC LIMIT 1",
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
        sqlx::query("UPDATE customers SET attributes = ? WHERE id = ?")
            .bind(serde_json::to_string(&attributes)?)
            .bind(&into)
            .execute(&mut *tx)
            .await?;
        apply_merge(&mut tx, &row, now_ms).await?;
        let customer = customer(&mut tx, &into).await?;
        self.cache.clear();
        self.bump_generation(&mut tx).await?;
        tx.commit().await?;
        Ok(match customer {
            Some(customer) => MergeOutcome::Merged {
                customer,
                merge_id: row.id,
            },
            None => MergeOutcome::Unknown(into),
        })
    }

    async fn link_identity(
        &self,
        customer_id: &str,
        kind: &str,
        address: &str,
        now_ms: i64,
    ) -> Result<LinkOutcome, StoreError> {
        let mut tx = self.writer.begin_with("BEGIN IMMEDIATE").await?;
        let Some(customer_id) = survivor_of(&mut tx, customer_id).await? else {
            return Ok(LinkOutcome::UnknownCustomer);
        };
        let owner: Option<String> =
            sqlx::query_scalar("SELECT customer_id FROM identities WHERE kind = ? AND address = ?")
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
                     VALUES (?, ?, ?, 1, ?)",
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
        self.cache.evict(&customer_id);
        self.bump_generation(&mut tx).await?;
        tx.commit().await?;
        Ok(record.map_or(LinkOutcome::UnknownCustomer, LinkOutcome::Linked))
    }

    async fn merges(&self, customer_id: &str) -> Result<Vec<Value>, StoreError> {
        let rows = sqlx::query(
            // The customer (or, for a merged id, its survivor) and every customer merged into
            // it: their whole history, and the suggestions that now name the survivor.
            "WITH survivor AS (SELECT coalesce(merged_into, id) AS id FROM customers WHERE id = ?1),
                  family AS (SELECT c.id FROM customers AS c, survivor AS s
                             WHERE c.id = s.id OR c.merged_into = s.id)
             SELECT id, status, into_customer, from_customer, identity_kind, identity_address,
                    reason, detail, created_at
             FROM merges
             WHERE into_customer IN (SELECT id FROM family) OR from_customer IN (SELECT id FROM family)
             ORDER BY created_at, rowid",
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
                    serde_json::from_str(row.get::<&str, _>("detail"))?,
                    row.get("created_at"),
                ))
            })
            .collect()
    }

    async fn ping(&self) -> Result<(), StoreError> {
        // The open connections keep writing to a file that was deleted or replaced: nothing
        // would say so, and what they write is gone at the next start.
        if file_identity(&self.path) != self.file {
            return Err(StoreError::DataDir {
                url: self.path.display().to_string(),
                message: "the database file was deleted or replaced while the daemon ran: \
                          restart the daemon (it keeps writing to the old file until then)"
                    .to_owned(),
            });
        }
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    async fn close(&self) {
        self.checkpointer.abort();
        self.pool.close().await;
        self.writer.close().await;
    }
}

impl Drop for SqliteStore {
    fn drop(&mut self) {
        self.checkpointer.abort();
    }
}

/// WAL pages a batch writes, estimated (measured with `strace` on the router hop and the
/// customers bench): about eight whatever its size (customers, conversations, index and
/// generation pages), plus about one per message (~4.4 KB).
const PAGES_PER_BATCH: u64 = 8;
const PAGES_PER_MESSAGE: u64 = 1;

/// Whether a pooled connection may be handed out: not if it is still inside a transaction.
/// A transaction dropped after an error is rolled back on the connection's thread; when that
/// rollback fails too (SQLite ends the transaction itself on some I/O errors, as when the disk
/// is full, and the ROLLBACK then fails), sqlx still counts the connection as inside it, and
/// every later `BEGIN` on it fails: the router would retry its batch forever. Such a connection
/// is closed and the pool opens a new one. The check costs nothing when not in a transaction;
/// otherwise a ping first lets a rollback still queued on the connection's thread finish.
async fn out_of_transaction(connection: &mut SqliteConnection) -> Result<bool, sqlx::Error> {
    use sqlx::Connection as _;
    if !connection.is_in_transaction() {
        return Ok(true);
    }
    connection.ping().await?;
    if connection.is_in_transaction() {
        tracing::warn!(
            "A store connection was left inside a failed transaction; opening a new one."
        );
        return Ok(false);
    }
    Ok(true)
}

/// The device and inode of the file at `path`: `None` once it is gone.
fn file_identity(path: &std::path::Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// Estimated WAL pages between two background checkpoints: 32 MiB, half the writer's own
/// threshold. Larger checkpoints copy a page rewritten by many batches once and are rarer, but
/// stall the writes beside them longer. Measured (PERFORMANCE.md, fifth session): at 16 MiB
/// lone-message resolution p99 1.85–2.13 ms, at 32 MiB 1.70–1.77 ms; the webhook p99 at 1,000
/// msg/s was 22 ms with quarter-second checkpoints and 35–40 ms with either.
const CHECKPOINT_AFTER_PAGES: u64 = 8_192;

/// While anything was written, a checkpoint at least this often.
const CHECKPOINT_AT_LEAST_EVERY: Duration = Duration::from_secs(10);

/// Copies the WAL into the database without waiting for readers (`PASSIVE`); the writer
/// restarts the WAL once a checkpoint completed. Looks every quarter second and checkpoints
/// once the batches recorded since the last time wrote about [`CHECKPOINT_AFTER_PAGES`] (or
/// anything, 10 s ago): the work follows the writes. A checkpoint slows the statements running
/// beside it by a few milliseconds (its copy and two fsyncs); every quarter second regardless,
/// it hit ~1 % of lone messages at a low rate (measured: resolution p99 2.7 ms instead of
/// 1.5 ms, `cargo bench --bench customers`), while the router hop at thousands of messages a
/// second checkpoints about as often as before. The writer's own automatic checkpoint (16,384
/// pages) remains the backstop, also for the writes this does not count (the API's).
async fn checkpoint_wal(pool: SqlitePool, unchecked: std::sync::Arc<std::sync::atomic::AtomicU64>) {
    let mut last = tokio::time::Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let pending = unchecked.load(std::sync::atomic::Ordering::Relaxed);
        let due = pending >= CHECKPOINT_AFTER_PAGES
            || (pending > 0 && last.elapsed() >= CHECKPOINT_AT_LEAST_EVERY);
        if !due {
            continue;
        }
        unchecked.fetch_sub(pending, std::sync::atomic::Ordering::Relaxed);
        last = tokio::time::Instant::now();
        if let Err(error) = sqlx::query("PRAGMA wal_checkpoint(PASSIVE)")
            .execute(&pool)
            .await
        {
            tracing::debug!(%error, "WAL checkpoint failed; retried shortly.");
        }
    }
}

/// The customer `id` names: itself, or the one it was merged into.
async fn survivor_of(
    connection: &mut SqliteConnection,
    id: &str,
) -> Result<Option<String>, StoreError> {
    Ok(
        sqlx::query_scalar("SELECT coalesce(merged_into, id) FROM customers WHERE id = ?")
            .bind(id)
            .fetch_optional(&mut *connection)
            .await?,
    )
}

/// Moves customer `row.from`'s identities, conversations (closing its open ones but the one
/// kept) and messages to `row.into`, leaves a tombstone, drops the pair's open suggestions,
/// makes the absorbed customer's other open suggestions name the survivor, and audits the merge.
async fn apply_merge(
    connection: &mut SqliteConnection,
    row: &MergeRow,
    now_ms: i64,
) -> Result<(), StoreError> {
    sqlx::query(
        "UPDATE conversations SET customer_id = ?1,
                closed_at = CASE WHEN status = 'open' AND id IS NOT ?3 THEN ?4 ELSE closed_at END,
                status = CASE WHEN status = 'open' AND id IS NOT ?3 THEN 'closed' ELSE status END
         WHERE customer_id = ?2",
    )
    .bind(&row.into)
    .bind(&row.from)
    .bind(&row.keep_conversation)
    .bind(now_ms)
    .execute(&mut *connection)
    .await?;
    for statement in [
        "UPDATE identities SET customer_id = ?1 WHERE customer_id = ?2",
        "UPDATE messages SET customer_id = ?1 WHERE customer_id = ?2",
        "UPDATE customers SET merged_into = ?1 WHERE id = ?2 OR merged_into = ?2",
        "DELETE FROM merges WHERE status = 'suggested'
           AND ((into_customer = ?1 AND from_customer = ?2)
             OR (into_customer = ?2 AND from_customer = ?1))",
        // The absorbed customer's other open suggestions now name the survivor (one the
        // survivor already has for the same customer and identity is not kept twice).
        "DELETE FROM merges WHERE status = 'suggested' AND into_customer = ?2 AND EXISTS (
           SELECT 1 FROM merges AS d WHERE d.status = 'suggested' AND d.into_customer = ?1
             AND d.from_customer = merges.from_customer
             AND d.identity_kind = merges.identity_kind
             AND d.identity_address = merges.identity_address)",
        "UPDATE merges SET into_customer = ?1 WHERE status = 'suggested' AND into_customer = ?2",
        "DELETE FROM merges WHERE status = 'suggested' AND from_customer = ?2 AND EXISTS (
           SELECT 1 FROM merges AS d WHERE d.status = 'suggested' AND d.from_customer = ?1
             AND d.into_customer = merges.into_customer
             AND d.identity_kind = merges.identity_kind
             AND d.identity_address = merges.identity_address)",
        "UPDATE merges SET from_customer = ?1 WHERE status = 'suggested' AND from_customer = ?2",
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
    connection: &mut SqliteConnection,
    rows: &[MergeRow],
    status: &str,
    now_ms: i64,
) -> Result<(), StoreError> {
    for row in rows {
        let (kind, address) = row.identity.clone().unzip();
        sqlx::query(
            "INSERT INTO merges (id, status, into_customer, from_customer, identity_kind,
                                 identity_address, reason, detail, created_at)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
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
    connection: &mut SqliteConnection,
    id: &str,
) -> Result<Option<CustomerRecord>, StoreError> {
    let Some(id) = survivor_of(connection, id).await? else {
        return Ok(None);
    };
    let id = id.as_str();
    let Some(row) =
        sqlx::query("SELECT id, attributes, created_at, last_seen_at FROM customers WHERE id = ?")
            .bind(id)
            .fetch_optional(&mut *connection)
            .await?
    else {
        return Ok(None);
    };
    let identities = sqlx::query(
        "SELECT kind, address FROM identities WHERE customer_id = ? ORDER BY created_at, kind, address",
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
        // Through the customer's messages (index on customer, time): the router writes that
        // index for every message anyway, and one on conversations would cost a second
        // random page write per message for this one reader.
        "SELECT envelope, direction, received_at FROM messages
         WHERE customer_id = ? AND conversation_id = ? ORDER BY received_at, rowid",
    )
    .bind(row.get::<&str, _>("customer_id"))
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
        "SELECT d.queue, d.urgency, d.priority, d.decided_at, d.assignment
         FROM messages m
         JOIN decisions d ON d.channel_id = m.channel_id AND d.external_id = m.external_id
         WHERE m.customer_id = ? AND m.conversation_id = ?
         ORDER BY d.decided_at, d.rowid",
    )
    .bind(row.get::<&str, _>("customer_id"))
    .bind(id)
    .fetch_all(&mut *connection)
    .await?
    {
        let assignment: Value = serde_json::from_str(&assignment(&d)?)?;
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
    row.as_ref().map(stored_decision).transpose()
}

async fn mark_published(
    connection: &mut SqliteConnection,
    keys: &[(String, String)],
) -> Result<(), StoreError> {
    if keys.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "INSERT OR IGNORE INTO published_decisions (channel_id, external_id)
         SELECT value ->> 0, value ->> 1 FROM jsonb_each(?)",
    )
    .bind(serde_json::to_string(keys)?)
    .execute(&mut *connection)
    .await?;
    Ok(())
}

/// The whole batch in a fixed number of statements: one read of everything the decisions need
/// ([`read_batch`]), the decisions made in order against an in-memory view ([`Batch`]), then
/// bulk writes keyed by JSON arrays. Each statement is one round trip to the SQLite thread,
/// whatever the batch size.
async fn route_in(
    connection: &mut SqliteConnection,
    store: &SqliteStore,
    messages: &[NormalizedMessage],
    now_ms: i64,
    decide: &DecideFn<'_>,
) -> Result<Vec<RouteOutcome>, StoreError> {
    let cache = &store.cache;
    let mut batch = Batch::new(messages, now_ms, store.history);
    let keys: Vec<[&str; 2]> = messages
        .iter()
        .map(|m| [m.channel.id.as_str(), m.external_id.as_str()])
        .collect();
    let threads = batch.thread_keys();
    let threads: Vec<[&str; 2]> = threads.iter().map(|(c, k)| [*c, *k]).collect();
    let read = ReadBatch {
        statement: &store.read_statement,
        keys: &keys,
        threads: &threads,
        reopen_after: now_ms.saturating_sub(store.reopen_window_ms),
        contacts_after: now_ms - DAY_MS,
    };

    // Customers the cache holds come from it whole; the rest from the database.
    let identities: Vec<(String, String)> = batch.identities().cloned().collect();
    let mut hits = Vec::new();
    let mut missing = Vec::new();
    for identity in &identities {
        match cache.lookup(identity) {
            Some((customer_id, snapshot)) => hits.push((identity, customer_id, snapshot)),
            None => missing.push([identity.0.as_str(), identity.1.as_str()]),
        }
    }
    let mut reads = read_batch(connection, &read, &missing).await?;
    if reads.generation != store.generation.load(std::sync::atomic::Ordering::SeqCst) {
        // Another store on this file wrote since our last write (or this is the first): what
        // the cache holds may be stale. Read the customers it served from the database.
        cache.clear();
        if !hits.is_empty() {
            hits.clear();
            let all: Vec<[&str; 2]> = identities
                .iter()
                .map(|(kind, address)| [kind.as_str(), address.as_str()])
                .collect();
            reads = read_batch(connection, &read, &all).await?;
        }
    }
    metrics::counter!("switchboard_store_cache_hits_total").increment(hits.len() as u64);
    metrics::counter!("switchboard_store_cache_misses_total")
        .increment((identities.len() - hits.len()) as u64);

    for row in reads.existing {
        match row.stored_decision() {
            Ok(stored) => batch.existing(row.channel_id, row.external_id, stored),
            // One corrupt row must not stall every batch it lands in: its message is
            // dead-lettered with the reason, the rest of the batch goes on.
            Err(error @ StoreError::CorruptAssignment(_)) => {
                batch.unreadable(row.channel_id, row.external_id, error.to_string());
            }
            Err(error) => return Err(error),
        }
    }
    let mut cached: HashSet<String> = HashSet::default();
    for (identity, customer_id, snapshot) in hits {
        if cached.insert(customer_id.clone()) {
            batch.cached(&customer_id, &snapshot);
        }
        // Known: the attributes come with the snapshot above.
        batch.known_identity(identity.clone(), customer_id, || Ok(Map::new()))?;
    }
    for row in reads.known {
        if !cached.contains(&row.id)
            && let Some(snapshot) = cache.get(&row.id)
        {
            cached.insert(row.id.clone());
            batch.cached(&row.id, &snapshot);
        }
        let attributes = row.attributes;
        batch.known_identity((row.kind, row.address), row.id, || Ok(attributes))?;
    }
    // The statement read every customer of the identities the cache missed; those the cache
    // held after all are served from it (above), the others from these rows.
    let loaded: HashSet<String> = batch
        .known_customers()
        .into_iter()
        .filter(|id| !cached.contains(*id))
        .cloned()
        .collect();
    for row in reads.identities {
        if loaded.contains(&row.customer_id) {
            let identity = Identity {
                kind: row.kind,
                address: row.address,
            };
            batch.customer_identity(&row.customer_id, identity, row.created_at);
        }
    }
    // Each customer's latest open conversation continues; without one, the latest closed
    // within the reopen window does (the statement lists open ones first).
    for row in reads.conversations {
        let (customer_id, open, conversation) = row.split();
        if loaded.contains(&customer_id) {
            batch.conversation(customer_id, open, || Ok(conversation))?;
        }
    }
    for customer_id in &loaded {
        let times = reads.contacts.remove(customer_id).unwrap_or_default();
        batch.contact_times(customer_id, times);
    }
    for row in reads.history {
        if loaded.contains(&row.customer_id) {
            batch.history(
                &row.customer_id,
                row.channel.as_deref().unwrap_or_default(),
                row.text.as_deref().unwrap_or_default(),
                row.received_at,
            );
        }
    }
    // Replies in a thread: the conversation of the thread's latest message.
    for row in reads.threads {
        let (customer_id, open, conversation) = row.conversation.split();
        batch.thread(
            row.channel_id,
            row.thread_key,
            customer_id,
            open,
            conversation,
        );
    }

    let decided = batch.decide(decide)?;
    if decided.messages.is_empty() {
        return Ok(decided.outcomes);
    }

    // Write in bulk: customers and identities, conversations, messages, decisions.
    if !decided.new_customers.is_empty() {
        sqlx::query(
            "INSERT INTO customers (id, attributes, created_at, last_seen_at)
             SELECT value ->> 'id', value ->> 'attributes', ?1, ?1 FROM jsonb_each(?2)",
        )
        .bind(now_ms)
        .bind(serde_json::to_string(&decided.new_customers)?)
        .execute(&mut *connection)
        .await?;
    }
    if !decided.new_identities.is_empty() {
        sqlx::query(
            "INSERT INTO identities (kind, address, customer_id, created_at)
             SELECT value ->> 0, value ->> 1, value ->> 2, ?1 FROM jsonb_each(?2)",
        )
        .bind(now_ms)
        .bind(serde_json::to_string(&decided.new_identities)?)
        .execute(&mut *connection)
        .await?;
    }
    // The updates bind their values (`FROM (VALUES …)`) rather than pass one JSON array: every
    // batch touches most of its customers and conversations again, and taking each value out of
    // JSON took SQLite ~1,000 instructions (callgrind, `BENCH_ONLY=router`).
    for chunk in decided.seen_customers.chunks(ROWS_PER_INSERT) {
        let mut update = QueryBuilder::<Sqlite>::new(
            "UPDATE customers SET attributes = v.column2, last_seen_at = ",
        );
        update.push_bind(now_ms).push(" FROM (");
        update.push_values(chunk, |mut values, row| {
            values.push_bind(&row.id).push_bind(&row.attributes);
        });
        update.push(") AS v WHERE customers.id = v.column1");
        update.build().execute(&mut *connection).await?;
    }
    if !decided.new_conversations.is_empty() {
        sqlx::query(
            "INSERT INTO conversations (id, customer_id, status, channels, queue, message_count,
                                        opened_at, last_activity_at)
             SELECT value ->> 'id', value ->> 'customer_id', 'open', value ->> 'channels',
                    value ->> 'queue', value ->> 'message_count', value ->> 'opened_at', ?1
             FROM jsonb_each(?2)",
        )
        .bind(now_ms)
        .bind(serde_json::to_string(&decided.new_conversations)?)
        .execute(&mut *connection)
        .await?;
    }
    for chunk in decided.seen_conversations.chunks(ROWS_PER_INSERT) {
        let mut update = QueryBuilder::<Sqlite>::new(
            "UPDATE conversations SET channels = v.column2, queue = v.column3,
                    message_count = v.column4, status = 'open', closed_at = NULL,
                    last_activity_at = ",
        );
        update.push_bind(now_ms).push(" FROM (");
        update.push_values(chunk, |mut values, row| {
            values
                .push_bind(&row.id)
                .push_bind(&row.channels)
                .push_bind(&row.queue)
                .push_bind(row.message_count);
        });
        update.push(") AS v WHERE conversations.id = v.column1");
        update.build().execute(&mut *connection).await?;
    }
    // The large texts (envelope, assignment) are bound as parameters, not wrapped in JSON:
    // no escaping on our side and no JSON parsing on SQLite's.
    let mut packer = Packer::default();
    for chunk in decided.messages.chunks(ROWS_PER_INSERT) {
        let mut insert = QueryBuilder::<Sqlite>::new(
            "INSERT INTO messages (channel_id, external_id, message_id, conversation_id, customer_id,
                                   direction, envelope, received_at, thread_key) ",
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
                .push_bind(now_ms)
                .push_bind(&row.message.thread_key);
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
                .push_bind(packer.pack(&row.assignment))
                .push_bind(now_ms);
        });
        insert.build().execute(&mut *connection).await?;
    }
    for merge in &decided.merges {
        apply_merge(connection, merge, now_ms).await?;
    }
    record_merges(connection, &decided.suggestions, "suggested", now_ms).await?;
    // Still inside the transaction (see cache.rs); the caller clears the cache if it fails.
    if decided.merges.is_empty() {
        for (customer_id, snapshot) in decided.snapshots {
            match snapshot {
                Some(snapshot) => cache.put(customer_id, snapshot),
                None => cache.evict(&customer_id),
            }
        }
    } else {
        cache.clear();
    }
    Ok(decided.outcomes)
}

/// What a batch looks up before deciding (see [`read_batch`]).
struct ReadBatch<'a> {
    /// The store's [`read_statement`].
    statement: &'a str,
    /// The batch's messages, `[channel id, external id]`: their recorded decisions.
    keys: &'a [[&'a str; 2]],
    /// `[channel id, thread key]` of the replies: their threads' conversations.
    threads: &'a [[&'a str; 2]],
    /// A conversation closed after this (ms) may reopen.
    reopen_after: i64,
    /// Contacts counted after this (ms).
    contacts_after: i64,
}

/// [`read_batch`]'s document.
#[derive(Deserialize)]
struct SqliteReads {
    /// `store_generation`.
    generation: i64,
    existing: Vec<ExistingRow>,
    known: Vec<KnownRow>,
    identities: Vec<IdentityRow>,
    /// Open ones first, then by latest activity.
    conversations: Vec<ConversationRow>,
    /// Per customer, the times of its messages in the last 24 hours.
    contacts: HashMap<String, Vec<i64>>,
    history: Vec<HistoryRow>,
    threads: Vec<ThreadRow>,
}

/// A decision already recorded for one of the batch's messages.
#[derive(Deserialize)]
struct ExistingRow {
    channel_id: String,
    external_id: String,
    /// A [`Packer::pack`] BLOB, in hex.
    packed: Option<String>,
    /// A plain one (rows written before migration 0008).
    assignment: Option<String>,
    queue: String,
    priority: i64,
    published: bool,
}

impl ExistingRow {
    fn stored_decision(&self) -> Result<StoredDecision, StoreError> {
        let assignment = match (&self.packed, &self.assignment) {
            (Some(packed), _) => unpack_assignment(
                &hex::decode(packed)
                    .map_err(|error| StoreError::CorruptAssignment(error.to_string()))?,
            )?,
            (None, Some(plain)) => plain.clone(),
            (None, None) => {
                return Err(StoreError::CorruptAssignment(
                    "neither a BLOB nor text".to_owned(),
                ));
            }
        };
        Ok(StoredDecision {
            assignment,
            queue: self.queue.clone(),
            priority: u8::try_from(self.priority).unwrap_or(0),
            published: self.published,
        })
    }
}

/// [`read_batch`]'s statement. The history's length is written into it (by
/// [`read_statement`]): with a parameter there, SQLite ran the per-customer `LIMIT` subquery
/// about seven times slower (measured: the whole statement 286 → 40 µs).
const READ_BATCH: &str = "WITH known AS (
        SELECT i.kind, i.address, c.id, c.attributes
        FROM jsonb_each(?2) j
        JOIN identities i ON i.kind = j.value ->> 0 AND i.address = j.value ->> 1
        JOIN customers c ON c.id = i.customer_id),
    ids(id) AS (SELECT DISTINCT id FROM known)
    SELECT json_object(
        'generation', (SELECT n FROM store_generation),
        'existing', (
            SELECT json_group_array(json_object(
                'channel_id', d.channel_id, 'external_id', d.external_id,
                'packed', iif(typeof(d.assignment) = 'blob', hex(d.assignment), NULL),
                'assignment', iif(typeof(d.assignment) = 'text', d.assignment, NULL),
                'queue', d.queue, 'priority', d.priority,
                'published', json(iif(p.channel_id IS NULL, 'false', 'true'))))
            FROM jsonb_each(?1) j
            JOIN decisions d
              ON d.channel_id = j.value ->> 0 AND d.external_id = j.value ->> 1
            LEFT JOIN published_decisions p
              ON p.channel_id = d.channel_id AND p.external_id = d.external_id),
        'known', (
            SELECT json_group_array(json_object(
                'kind', kind, 'address', address, 'id', id,
                'attributes', json(attributes)))
            FROM known),
        'identities', (
            SELECT json_group_array(json_object(
                'customer_id', customer_id, 'kind', kind, 'address', address,
                'created_at', created_at) ORDER BY created_at, kind, address)
            FROM identities WHERE customer_id IN (SELECT id FROM ids)),
        'conversations', (
            SELECT json_group_array(json_object(
                'id', id, 'customer_id', customer_id,
                'open', json(iif(status = 'open', 'true', 'false')),
                'channels', json(channels), 'message_count', message_count,
                'opened_at', opened_at, 'agent_id', agent_id, 'queue', queue)
                ORDER BY status = 'open' DESC, last_activity_at DESC)
            FROM conversations
            WHERE customer_id IN (SELECT id FROM ids)
                  AND (status = 'open' OR closed_at > ?3)),
        'contacts', (
            SELECT coalesce(json_group_object(customer_id, json(times)), '{}')
            FROM (SELECT customer_id, json_group_array(received_at) AS times
                  FROM messages
                  WHERE customer_id IN (SELECT id FROM ids) AND received_at > ?4
                  GROUP BY customer_id)),
        -- Per customer, only its latest rows are read (index on customer, time).
        'history', (
            SELECT json_group_array(json_object(
                'customer_id', m.customer_id,
                'channel', m.envelope ->> '$.channel.kind',
                'text', m.envelope ->> '$.text', 'received_at', m.received_at)
                ORDER BY m.customer_id, m.received_at, m.rowid)
            FROM ids c
            JOIN messages m ON m.rowid IN (
                SELECT rowid FROM messages WHERE customer_id = c.id
                ORDER BY received_at DESC, rowid DESC LIMIT {history_len})),
        'threads', (
            SELECT json_group_array(json_object(
                'channel_id', j.value ->> 0, 'thread_key', j.value ->> 1,
                'id', c.id, 'customer_id', c.customer_id,
                'open', json(iif(c.status = 'open', 'true', 'false')), 'channels', json(c.channels),
                'message_count', c.message_count, 'opened_at', c.opened_at,
                'agent_id', c.agent_id, 'queue', c.queue))
            FROM jsonb_each(?5) j
            JOIN messages m ON m.rowid = (
                SELECT rowid FROM messages
                WHERE channel_id = j.value ->> 0 AND thread_key = j.value ->> 1
                ORDER BY received_at DESC, rowid DESC LIMIT 1)
            JOIN conversations c ON c.id = m.conversation_id))";

/// [`READ_BATCH`] reading `history_len` messages of history per customer.
fn read_statement(history_len: usize) -> String {
    READ_BATCH.replace("{history_len}", &history_len.to_string())
}

/// Everything a batch reads before deciding, in one statement returning one JSON document (a
/// statement is a round trip to the SQLite thread, and so is each row it returns): the store's
/// generation, the batch's recorded decisions, the stored identities the cache missed and
/// their customers, and of those customers their identities, the conversation to continue,
/// contact times and history; and the reply threads' conversations. The batch holds the write
/// lock, so all of it is one state of the database.
///
/// `missing` are the identities (`[kind, address]`) the cache did not serve: their customers
/// are read whole.
async fn read_batch(
    connection: &mut SqliteConnection,
    read: &ReadBatch<'_>,
    missing: &[[&str; 2]],
) -> Result<SqliteReads, StoreError> {
    let document: String = sqlx::query_scalar(sqlx::AssertSqlSafe(read.statement))
        .bind(serde_json::to_string(read.keys)?)
        .bind(serde_json::to_string(missing)?)
        .bind(read.reopen_after)
        .bind(read.contacts_after)
        .bind(serde_json::to_string(read.threads)?)
        .fetch_one(&mut *connection)
        .await?;
    Ok(serde_json::from_str(&document)?)
}

/// Rows per multi-row INSERT (9 parameters each, well under SQLite's limit of 32,766).
const ROWS_PER_INSERT: usize = 256;

fn stored_decision(row: &sqlx::sqlite::SqliteRow) -> Result<StoredDecision, StoreError> {
    Ok(StoredDecision {
        assignment: assignment(row)?,
        queue: row.get("queue"),
        priority: u8::try_from(row.get::<i64, _>("priority")).unwrap_or(0),
        published: row.get::<i64, _>("published") != 0,
    })
}

/// The assignment as `decisions.assignment` stores it: LZ4-compressed (a block with its size
/// in front), as a BLOB. A decision row is the largest thing a batch writes (~2.4 KB of JSON,
/// one row per 4 KiB page); compressed, about three rows share a page.
///
/// The same bytes as `lz4_flex::compress_prepend_size`, which allocates and zeroes a hash table
/// (8 KiB) and a maximum-size output buffer for every call: a third of the packing's
/// instructions (callgrind, `BENCH_ONLY=router`). A packer keeps both between assignments.
#[derive(Default)]
struct Packer {
    table: lz4_flex::block::CompressTable,
    output: Vec<u8>,
}

impl Packer {
    fn pack(&mut self, assignment: &str) -> Vec<u8> {
        let input = assignment.as_bytes();
        let Ok(size) = u32::try_from(input.len()) else {
            // Over 4 GiB, which no assignment reaches (bodies are capped far below): the
            // library's own form, as before the packer.
            return lz4_flex::compress_prepend_size(input);
        };
        let most = lz4_flex::block::get_maximum_output_size(input.len());
        if self.output.len() < most {
            self.output.resize(most, 0);
        }
        match lz4_flex::block::compress_into_with_table(input, &mut self.output, &mut self.table) {
            Ok(written) => {
                let mut packed = Vec::with_capacity(4 + written);
                packed.extend_from_slice(&size.to_le_bytes());
                packed.extend_from_slice(&self.output[..written]);
                packed
            }
            // Only for an output buffer below the maximum size, which this one is not.
            Err(_) => lz4_flex::compress_prepend_size(input),
        }
    }
}

/// The assignment JSON of a `decisions` row: a BLOB is [`Packer::pack`]'s form; TEXT is
/// the plain JSON rows written before migration 0008 hold.
fn assignment(row: &sqlx::sqlite::SqliteRow) -> Result<String, StoreError> {
    let raw = row.try_get_raw("assignment")?;
    if raw.type_info().name() != "BLOB" {
        return Ok(row.try_get("assignment")?);
    }
    unpack_assignment(row.try_get("assignment")?)
}

/// A [`Packer::pack`] BLOB's JSON.
fn unpack_assignment(packed: &[u8]) -> Result<String, StoreError> {
    // The size in front is trusted for the allocation: refuse one that LZ4 (at most 255 bytes
    // out per byte in) could not have produced from this block.
    let claimed = packed
        .first_chunk::<4>()
        .map_or(0, |size| u32::from_le_bytes(*size) as usize);
    if claimed > packed.len().saturating_mul(255) {
        return Err(StoreError::CorruptAssignment(format!(
            "claims {claimed} bytes from a block of {}",
            packed.len()
        )));
    }
    let json = lz4_flex::decompress_size_prepended(packed)
        .map_err(|error| StoreError::CorruptAssignment(error.to_string()))?;
    String::from_utf8(json).map_err(|error| StoreError::CorruptAssignment(error.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn insert_decision(
        store: &SqliteStore,
        external_id: &str,
        assignment: Vec<u8>,
        text: bool,
    ) {
        let insert = "INSERT INTO decisions (channel_id, external_id, conversation_id, queue,
                                             urgency, priority, assignment, decided_at)
                      VALUES ('chat', ?, 'c1', 'general', 10, 1, ?, 0)";
        let query = sqlx::query(insert).bind(external_id);
        let query = if text {
            query.bind(String::from_utf8(assignment).unwrap())
        } else {
            query.bind(assignment)
        };
        query.execute(&store.writer).await.unwrap();
    }

    /// A database file deleted or replaced under the running daemon makes it unready.
    #[tokio::test]
    async fn a_deleted_database_file_is_not_ready() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let store = SqliteStore::open(&format!("sqlite://{}", path.display()))
            .await
            .unwrap();
        store.ping().await.unwrap();
        std::fs::rename(&path, dir.path().join("moved.db")).unwrap();
        let error = store.ping().await.unwrap_err().to_string();
        assert!(error.contains("deleted or replaced"), "{error}");
        std::fs::write(&path, b"").unwrap();
        assert!(store.ping().await.is_err(), "another file in its place");
    }

    /// A transaction SQLite ended by itself (as on a full disk) cannot be rolled back, and
    /// sqlx then counts its connection as still inside it: every later `BEGIN` on it failed,
    /// and the router retried its batch forever. The pool now replaces such a connection.
    #[tokio::test]
    async fn a_connection_left_in_a_failed_transaction_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("t.db").display());
        let store = SqliteStore::open(&url).await.unwrap();
        {
            let mut tx = store.writer.begin_with("BEGIN IMMEDIATE").await.unwrap();
            // SQLite's transaction ends behind sqlx's back; the rollback on drop then fails.
            sqlx::query("ROLLBACK").execute(&mut *tx).await.unwrap();
        }
        for _ in 0..3 {
            let tx = store.writer.begin_with("BEGIN IMMEDIATE").await;
            let mut tx = tx.expect("a connection that can begin");
            sqlx::query("SELECT 1").execute(&mut *tx).await.unwrap();
            tx.commit().await.unwrap();
        }
    }

    #[tokio::test]
    async fn assignments_read_back_packed_plain_and_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("t.db").display());
        let store = SqliteStore::open(&url).await.unwrap();
        let json = r#"{"id":"a","data":{"queue":"general","explanation":{"rules":[]}}}"#;
        insert_decision(&store, "packed", Packer::default().pack(json), false).await;
        // As every row written before migration 0008 holds it.
        insert_decision(&store, "plain", json.as_bytes().to_vec(), true).await;
        insert_decision(&store, "corrupt", vec![0x40, 0, 0, 0, 0xf0, 1], false).await;
        // A size no block of six bytes decompresses to: refused before allocating it.
        insert_decision(&store, "huge", vec![0xf0, 0xff, 0xff, 0xff, 0xf0, 1], false).await;

        for key in ["packed", "plain"] {
            let decision = store.decision("chat", key).await.unwrap().unwrap();
            assert_eq!(decision.assignment, json, "{key}");
        }
        for key in ["corrupt", "huge"] {
            let error = store.decision("chat", key).await.unwrap_err();
            assert!(
                matches!(error, StoreError::CorruptAssignment(_)),
                "{key}: {error}"
            );
            assert!(error.to_string().contains("corrupt"), "{error}");
        }
        let error = store.decision("chat", "huge").await.unwrap_err();
        assert!(
            error.to_string().contains("claims 4294967280 bytes"),
            "{error}"
        );
        // A redelivered message finds the same decisions in the batch's read.
        let decide = |_: &NormalizedMessage,
                      _: &serde_json::value::RawValue,
                      _: &super::super::Resolved|
         -> super::super::Routed {
            panic!("a recorded message is not decided again")
        };
        for key in ["packed", "plain"] {
            let message = super::super::tests::message(key, "dana", "webchat");
            let outcomes = store
                .route_batch(std::slice::from_ref(&message), 1_000, &[], &decide)
                .await
                .unwrap();
            let expected = StoredDecision {
                assignment: json.into(),
                queue: "general".into(),
                priority: 1,
                published: false,
            };
            assert_eq!(outcomes, [RouteOutcome::Existing(expected)], "{key}");
        }
        // A corrupt one is reported for its message alone, and its batch goes on: the other
        // message is decided and recorded.
        for key in ["corrupt", "huge"] {
            let message = super::super::tests::message(key, "dana", "webchat");
            let fresh = super::super::tests::message(&format!("after-{key}"), "dana", "webchat");
            let routed =
                |_: &NormalizedMessage,
                 _: &serde_json::value::RawValue,
                 _: &super::super::Resolved| super::super::Routed {
                    queue: "general".into(),
                    urgency: 0,
                    priority: 1,
                    assignment: "{}".into(),
                };
            let outcomes = store
                .route_batch(&[message, fresh.clone()], 1_000, &[], &routed)
                .await
                .unwrap();
            match &outcomes[..] {
                [RouteOutcome::Unreadable(reason), RouteOutcome::New { .. }] => {
                    assert!(
                        reason.contains("a stored assignment is corrupt"),
                        "{key}: {reason}"
                    );
                }
                other => panic!("{key}: {other:?}"),
            }
            assert!(
                store
                    .decision("chat", &fresh.external_id)
                    .await
                    .unwrap()
                    .is_some()
            );
        }
        let kinds: Vec<String> =
            sqlx::query_scalar("SELECT typeof(assignment) FROM decisions ORDER BY rowid")
                .fetch_all(&store.writer)
                .await
                .unwrap();
        assert_eq!(kinds, ["blob", "text", "blob", "blob", "blob", "blob"]);
        // Packed is what the router writes, and it is smaller.
        let mut packer = Packer::default();
        assert!(packer.pack(&json.repeat(20)).len() < json.len() * 20 / 4);
        // What the packer keeps changes nothing: the library's own size-prefixed block, byte for
        // byte, whether the packer is fresh or packed a longer or another assignment before.
        for text in [
            json.repeat(3),
            json.to_owned(),
            String::new(),
            "é".repeat(999),
        ] {
            let packed = packer.pack(&text);
            assert_eq!(packed, lz4_flex::compress_prepend_size(text.as_bytes()));
            assert_eq!(packed, Packer::default().pack(&text));
            assert_eq!(unpack_assignment(&packed).unwrap(), text);
        }
        store.close().await;
    }
}
