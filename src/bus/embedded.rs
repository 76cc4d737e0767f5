//! The embedded bus for single-node mode: every queue lives in the store's SQLite file
//! (`bus_messages`), with the AMQP bus's semantics:
//! - publish is durable: the insert is committed before the publisher is told "confirmed"
//!   (concurrent publishes are grouped into one commit by a publisher task);
//! - consumption is at-least-once: taking a message leases it until acknowledged (deleted), and
//!   an expired lease makes it ready again; a restart releases the router's leases at once;
//! - higher priority first, FIFO within a priority;
//! - after `delivery_limit` deliveries a message moves to `<p>.dead` with the reason;
//! - the router's commit (publish assignments + dead letters + acknowledge inputs) is one
//!   SQLite transaction, so a crash cannot split it;
//! - consumers wait on an in-process notification, woken by the commit that made work ready,
//!   or at the moment the next lease expires; no polling;
//! - an assignment published with an SLA (`expires_at`) that is still waiting when it passes
//!   moves back to the router queue with `x-first-death-reason: expired`, as RabbitMQ's
//!   per-message TTL + dead-lettering does; the router overflows it. A claimed (leased)
//!   assignment is picked up and does not expire unless its lease runs out;
//! - lifecycle events go to `bus_events` (newest 10,000 kept).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use serde_json::{Value, json};
use sqlx::{Row, SqlitePool};
use switchboard_channel::{CloudEvent, NormalizedMessage, PublishError};
use time::OffsetDateTime;
use tokio::sync::{Notify, mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use super::{
    Assignment, BusError, Delivery, Event, Outcome, PendingCommit, REASON_HEADER, RouterLink,
    Topology,
};
use crate::config::BusConfig;

/// How long the router holds a message it took before it is handed out again (only reached if
/// the router stalls; a crash releases the leases at the next start).
const ROUTER_LEASE: Duration = Duration::from_secs(30);
/// Publishes grouped into one commit at most.
const PUBLISH_BATCH: usize = 512;
/// Lifecycle events kept in `bus_events`.
const EVENTS_KEPT: i64 = 10_000;
/// The expiry sweeper looks at least this often (it also wakes at the next known deadline).
const EXPIRY_TICK: Duration = Duration::from_secs(1);

pub fn now_ms() -> i64 {
    i64::try_from(OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX)
}

/// A message taken from a queue, leased to the taker.
#[derive(Debug, Clone)]
pub struct Leased {
    pub id: i64,
    pub lease_id: String,
    pub priority: u8,
    pub body: String,
    /// Deliveries before this one.
    pub previous_attempts: i64,
    pub lease_expires_ms: i64,
    /// Headers as a JSON object (reasons set by dead-lettering and expiry).
    pub headers: String,
}

/// A lifecycle event read back from `bus_events`.
#[derive(Debug, Clone)]
pub struct StoredEvent {
    pub id: i64,
    pub ty: String,
    pub key: String,
    pub body: String,
}

#[derive(Clone)]
pub struct EmbeddedBus {
    shared: Arc<Shared>,
    publish_tx: mpsc::Sender<PublishRequest>,
}

struct Shared {
    pool: SqlitePool,
    topology: Topology,
    config: BusConfig,
    wakers: Mutex<HashMap<String, Arc<Notify>>>,
    /// Woken when an assignment with an SLA was committed (the sweeper recomputes its wait).
    expiry: Notify,
}

struct PublishRequest {
    body: String,
    reply: oneshot::Sender<Result<(), PublishError>>,
}

impl EmbeddedBus {
    /// Starts the embedded bus on the store's pool. Leases held by a previous process on the
    /// router queue are released (one process owns the file in single-node mode).
    pub async fn start(
        pool: SqlitePool,
        config: &BusConfig,
        tracker: &TaskTracker,
        cancel: CancellationToken,
    ) -> Result<Self, BusError> {
        let shared = Arc::new(Shared {
            pool,
            topology: Topology::new(&config.prefix),
            config: config.clone(),
            wakers: Mutex::new(HashMap::new()),
            expiry: Notify::new(),
        });
        let released = sqlx::query(
            "UPDATE bus_messages SET visible_at = ?, lease_id = NULL
             WHERE queue = ? AND lease_id IS NOT NULL",
        )
        .bind(now_ms())
        .bind(shared.topology.router())
        .execute(&shared.pool)
        .await
        .map_err(store_error)?
        .rows_affected();
        if released > 0 {
            info!(
                released,
                "Released router leases left by the previous process."
            );
        }
        let (publish_tx, publish_rx) = mpsc::channel(PUBLISH_BATCH * 4);
        tracker.spawn(run_publisher(shared.clone(), publish_rx, cancel.clone()));
        tracker.spawn(run_expiry(shared.clone(), cancel));
        Ok(Self { shared, publish_tx })
    }

    pub fn topology(&self) -> &Topology {
        &self.shared.topology
    }

    pub async fn is_ready(&self) -> bool {
        sqlx::query("SELECT 1")
            .execute(&self.shared.pool)
            .await
            .is_ok()
    }

    /// Publishes a normalized message to the router queue; returns once committed.
    pub async fn publish_inbound(&self, message: &NormalizedMessage) -> Result<(), PublishError> {
        let event = CloudEvent::message_received(message.clone());
        let body = serde_json::to_string(&event).map_err(|error| {
            PublishError::Rejected(format!("cannot encode the message: {error}"))
        })?;
        super::ask_publisher(
            &self.publish_tx,
            |reply| PublishRequest { body, reply },
            self.shared.config.confirm_timeout,
            "the store did not commit",
        )
        .await
    }

    pub fn router_link(&self) -> EmbeddedRouterLink {
        EmbeddedRouterLink {
            shared: self.shared.clone(),
            lease_id: uuid::Uuid::new_v4().to_string(),
            held: HashMap::new(),
        }
    }

    /// Takes the highest-priority message of agent queue `queue`, waiting up to `wait` for one,
    /// leased for `lease`.
    pub async fn claim(
        &self,
        queue: &str,
        wait: Duration,
        lease: Duration,
        cancel: &CancellationToken,
    ) -> Result<Option<Leased>, BusError> {
        let name = self.shared.topology.agent_queue(queue);
        let deadline = tokio::time::Instant::now() + wait;
        let lease_id = uuid::Uuid::new_v4().to_string();
        let lease_ms = i64::try_from(lease.as_millis()).unwrap_or(i64::MAX);
        loop {
            let waker = self.shared.waker(&name);
            let notified = waker.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let mut taken = self.shared.take(&name, &lease_id, lease_ms, 1).await?;
            if let Some(leased) = taken.pop() {
                return Ok(Some(leased));
            }
            let wake_at = self.shared.next_visible(&name).await?;
            let sleep_until = match wake_at {
                Some(at) => deadline.min(instant_at(at)),
                None => deadline,
            };
            if tokio::time::Instant::now() >= deadline {
                return Ok(None);
            }
            tokio::select! {
                () = cancel.cancelled() => return Ok(None),
                () = &mut notified => {}
                () = tokio::time::sleep_until(sleep_until) => {}
            }
        }
    }

    /// Acknowledges a claimed assignment. `Ok(false)` if the lease is unknown or expired.
    pub async fn ack(&self, lease_id: &str) -> Result<bool, BusError> {
        let deleted = sqlx::query("DELETE FROM bus_messages WHERE lease_id = ? AND visible_at > ?")
            .bind(lease_id)
            .bind(now_ms())
            .execute(&self.shared.pool)
            .await
            .map_err(store_error)?
            .rows_affected();
        Ok(deleted == 1)
    }

    /// Lifecycle events with an id above `after`, oldest first, at most `limit`.
    pub async fn events(&self, after: i64, limit: u32) -> Result<Vec<StoredEvent>, BusError> {
        let rows = sqlx::query(
            "SELECT id, type, routing_key, body FROM bus_events WHERE id > ? ORDER BY id LIMIT ?",
        )
        .bind(after)
        .bind(i64::from(limit))
        .fetch_all(&self.shared.pool)
        .await
        .map_err(store_error)?;
        Ok(rows
            .iter()
            .map(|row| StoredEvent {
                id: row.get("id"),
                ty: row.get("type"),
                key: row.get("routing_key"),
                body: row.get("body"),
            })
            .collect())
    }

    /// Messages waiting (ready or leased) in each agent queue of `queues`.
    pub async fn depths(&self, queues: &[String]) -> Result<HashMap<String, u64>, BusError> {
        let mut depths = HashMap::new();
        for queue in queues {
            let count: i64 =
                sqlx::query_scalar("SELECT count(*) FROM bus_messages WHERE queue = ?")
                    .bind(self.shared.topology.agent_queue(queue))
                    .fetch_one(&self.shared.pool)
                    .await
                    .map_err(store_error)?;
            depths.insert(queue.clone(), u64::try_from(count).unwrap_or_default());
        }
        Ok(depths)
    }
}

fn store_error(error: sqlx::Error) -> BusError {
    BusError::Store(error.to_string())
}

/// The tokio instant at Unix millisecond `at`.
fn instant_at(at: i64) -> tokio::time::Instant {
    let delta = at.saturating_sub(now_ms()).max(0);
    tokio::time::Instant::now() + Duration::from_millis(u64::try_from(delta).unwrap_or(0))
}

impl Shared {
    fn waker(&self, queue: &str) -> Arc<Notify> {
        self.wakers
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .entry(queue.to_owned())
            .or_default()
            .clone()
    }

    fn wake(&self, queue: &str) {
        self.waker(queue).notify_waiters();
    }

    /// Leases up to `max` ready messages of `queue`, highest priority first; messages past the
    /// delivery limit move to the dead queue instead.
    async fn take(
        &self,
        queue: &str,
        lease_id: &str,
        lease_ms: i64,
        max: usize,
    ) -> Result<Vec<Leased>, BusError> {
        let now = now_ms();
        let mut tx = self
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(store_error)?;
        let rows = sqlx::query(
            "UPDATE bus_messages SET lease_id = ?1, visible_at = ?2, attempts = attempts + 1
             WHERE id IN (SELECT id FROM bus_messages WHERE queue = ?3 AND visible_at <= ?4
                          ORDER BY priority DESC, id LIMIT ?5)
             RETURNING id, priority, body, attempts, headers",
        )
        .bind(lease_id)
        .bind(now.saturating_add(lease_ms))
        .bind(queue)
        .bind(now)
        .bind(i64::try_from(max).unwrap_or(i64::MAX))
        .fetch_all(&mut *tx)
        .await
        .map_err(store_error)?;
        let limit = i64::from(self.config.delivery_limit);
        let mut taken = Vec::with_capacity(rows.len());
        let mut poisoned = Vec::new();
        for row in rows {
            let attempts: i64 = row.get("attempts");
            let id: i64 = row.get("id");
            if attempts > limit {
                poisoned.push(id);
                continue;
            }
            taken.push(Leased {
                id,
                lease_id: lease_id.to_owned(),
                priority: u8::try_from(row.get::<i64, _>("priority")).unwrap_or(0),
                body: row.get("body"),
                previous_attempts: attempts - 1,
                lease_expires_ms: now.saturating_add(lease_ms),
                headers: row.get("headers"),
            });
        }
        if !poisoned.is_empty() {
            let reason = format!("delivered {limit} times without being acknowledged");
            let headers =
                json!({ REASON_HEADER: reason, "x-switchboard-queue": queue }).to_string();
            sqlx::query(
                "UPDATE bus_messages SET queue = ?1, headers = ?2, lease_id = NULL, visible_at = ?3, attempts = 0
                 WHERE id IN (SELECT value FROM json_each(?4))",
            )
            .bind(self.topology.dead())
            .bind(headers)
            .bind(now)
            .bind(serde_json::to_string(&poisoned).unwrap_or_default())
            .execute(&mut *tx)
            .await
            .map_err(store_error)?;
            warn!(count = poisoned.len(), %queue, "Messages past the delivery limit moved to the dead queue.");
            metrics::counter!("switchboard_dead_letters_total")
                .increment(u64::try_from(poisoned.len()).unwrap_or_default());
        }
        tx.commit().await.map_err(store_error)?;
        taken.sort_by_key(|l| (std::cmp::Reverse(l.priority), l.id));
        Ok(taken)
    }

    /// When the next leased message of `queue` becomes ready again, if any.
    async fn next_visible(&self, queue: &str) -> Result<Option<i64>, BusError> {
        sqlx::query_scalar(
            "SELECT min(visible_at) FROM bus_messages WHERE queue = ? AND visible_at > ?",
        )
        .bind(queue)
        .bind(now_ms())
        .fetch_one(&self.pool)
        .await
        .map_err(store_error)
    }
}

/// Groups concurrent publishes into one commit each.
/// Moves assignments whose SLA passed while they waited back to the router queue, marked
/// `x-first-death-reason: expired` (RabbitMQ's TTL dead-lettering, in SQL). Sleeps until the
/// next deadline, a new assignment with an SLA, or [`EXPIRY_TICK`].
async fn run_expiry(shared: Arc<Shared>, cancel: CancellationToken) {
    let router = shared.topology.router();
    loop {
        let now = now_ms();
        let moved = sqlx::query(
            "UPDATE bus_messages
             SET headers = json_object('x-first-death-reason', 'expired',
                                       'x-first-death-queue', queue),
                 queue = ?1, priority = 0, expires_at = NULL, attempts = 0, lease_id = NULL,
                 visible_at = ?2
             WHERE expires_at IS NOT NULL AND expires_at <= ?2 AND visible_at <= ?2",
        )
        .bind(&router)
        .bind(now)
        .execute(&shared.pool)
        .await;
        let next = match moved {
            Ok(done) => {
                if done.rows_affected() > 0 {
                    debug!(
                        count = done.rows_affected(),
                        "Assignments past their SLA handed back to the router."
                    );
                    shared.wake(&router);
                }
                // A leased assignment expires only once its lease ran out.
                sqlx::query_scalar::<_, Option<i64>>(
                    "SELECT min(max(expires_at, visible_at)) FROM bus_messages
                     WHERE expires_at IS NOT NULL",
                )
                .fetch_one(&shared.pool)
                .await
                .ok()
                .flatten()
            }
            Err(error) => {
                warn!(%error, "Cannot move expired assignments; retrying.");
                None
            }
        };
        let tick = tokio::time::Instant::now() + EXPIRY_TICK;
        let wake_at = next.map_or(tick, |at| instant_at(at).min(tick));
        tokio::select! {
            () = cancel.cancelled() => break,
            () = shared.expiry.notified() => {}
            () = tokio::time::sleep_until(wake_at) => {}
        }
    }
}

async fn run_publisher(
    shared: Arc<Shared>,
    mut requests: mpsc::Receiver<PublishRequest>,
    cancel: CancellationToken,
) {
    let router = shared.topology.router();
    loop {
        let first = tokio::select! {
            () = cancel.cancelled() => break,
            request = requests.recv() => match request {
                Some(request) => request,
                None => break,
            },
        };
        let mut batch = vec![first];
        while batch.len() < PUBLISH_BATCH {
            match requests.try_recv() {
                Ok(request) => batch.push(request),
                Err(_) => break,
            }
        }
        batch.retain(|r| !r.reply.is_closed());
        if batch.is_empty() {
            continue;
        }
        let bodies: Vec<&str> = batch.iter().map(|r| r.body.as_str()).collect();
        let now = now_ms();
        let result = sqlx::query(
            "INSERT INTO bus_messages (queue, priority, body, visible_at, created_at)
             SELECT ?1, 0, value, ?2, ?2 FROM json_each(?3)",
        )
        .bind(&router)
        .bind(now)
        .bind(serde_json::to_string(&bodies).unwrap_or_default())
        .execute(&shared.pool)
        .await;
        let reply = match result {
            Ok(_) => {
                shared.wake(&router);
                Ok(())
            }
            Err(error) => {
                warn!(%error, "Embedded bus could not store published messages.");
                Err(PublishError::Unavailable(format!(
                    "the store failed: {error}"
                )))
            }
        };
        for request in batch {
            let _ = request.reply.send(reply.clone());
        }
    }
    while let Ok(request) = requests.try_recv() {
        let _ = request.reply.send(Err(PublishError::Unavailable(
            "the bus is shutting down".into(),
        )));
    }
}

/// The router's link to the embedded router queue.
pub struct EmbeddedRouterLink {
    shared: Arc<Shared>,
    lease_id: String,
    /// Messages taken and not yet committed: id → body.
    held: HashMap<u64, String>,
}

impl EmbeddedRouterLink {
    async fn take(&mut self, max: usize) -> Result<Vec<Delivery>, BusError> {
        let lease_ms = i64::try_from(ROUTER_LEASE.as_millis()).unwrap_or(i64::MAX);
        let router = self.shared.topology.router();
        let taken = self
            .shared
            .take(&router, &self.lease_id, lease_ms, max)
            .await?;
        Ok(taken
            .into_iter()
            .map(|leased| {
                let tag = u64::try_from(leased.id).unwrap_or_default();
                self.held.insert(tag, leased.body.clone());
                let death_reason = serde_json::from_str::<Value>(&leased.headers)
                    .ok()
                    .and_then(|headers| {
                        headers
                            .get("x-first-death-reason")
                            .and_then(Value::as_str)
                            .map(str::to_owned)
                    });
                Delivery {
                    tag,
                    body: leased.body.into_bytes(),
                    redelivered: leased.previous_attempts > 0,
                    death_reason,
                }
            })
            .collect())
    }
}

#[async_trait]
impl RouterLink for EmbeddedRouterLink {
    async fn next_batch(&mut self, max: usize) -> Result<Vec<Delivery>, BusError> {
        let router = self.shared.topology.router();
        loop {
            let waker = self.shared.waker(&router);
            let notified = waker.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let batch = self.take(max).await?;
            if !batch.is_empty() {
                return Ok(batch);
            }
            match self.shared.next_visible(&router).await? {
                Some(at) => {
                    tokio::select! {
                        () = &mut notified => {}
                        () = tokio::time::sleep_until(instant_at(at)) => {}
                    }
                }
                None => notified.await,
            }
        }
    }

    async fn ready_batch(&mut self, max: usize) -> Result<Vec<Delivery>, BusError> {
        self.take(max).await
    }

    async fn commit(&mut self, outcomes: Vec<(u64, Outcome)>) -> Result<PendingCommit, BusError> {
        let topology = &self.shared.topology;
        let now = now_ms();
        let mut assignments = Vec::new();
        let mut events = Vec::new();
        let mut dead = Vec::new();
        let mut ids = Vec::with_capacity(outcomes.len());
        let mut queues = Vec::new();
        let mut expiring = false;
        let mut assign = |assignment: &Assignment| {
            let name = topology.agent_queue(&assignment.queue);
            if !queues.contains(&name) {
                queues.push(name.clone());
            }
            let expires_at = assignment.expires_ms.map(|ms| {
                expiring = true;
                now.saturating_add(i64::try_from(ms).unwrap_or(i64::MAX))
            });
            assignments.push(json!({
                "queue": name,
                "priority": assignment.priority,
                "body": assignment.body,
                "expires_at": expires_at,
            }));
        };
        for (tag, outcome) in &outcomes {
            ids.push(*tag);
            match outcome {
                Outcome::Assign(assignment) => assign(assignment),
                Outcome::Escalate { assignment, event } => {
                    assign(assignment);
                    let Event { key, ty, body, .. } = event;
                    events.push(json!({"type": ty, "key": key, "body": body}));
                }
                Outcome::Dead(reason) => {
                    let body = self.held.get(tag).cloned().unwrap_or_default();
                    let headers =
                        json!({ REASON_HEADER: reason, "x-switchboard-queue": topology.router() });
                    dead.push(json!({"body": body, "headers": headers.to_string()}));
                }
                Outcome::Ack => {}
            }
        }
        let mut tx = self
            .shared
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(store_error)?;
        // Acknowledge first: if any lease was lost (expired and taken again), nothing happens.
        let acked = sqlx::query(
            "DELETE FROM bus_messages WHERE lease_id = ?1 AND id IN (SELECT value FROM json_each(?2))",
        )
        .bind(&self.lease_id)
        .bind(serde_json::to_string(&ids).unwrap_or_default())
        .execute(&mut *tx)
        .await
        .map_err(store_error)?
        .rows_affected();
        if acked != u64::try_from(ids.len()).unwrap_or(u64::MAX) {
            // Dropping the transaction rolls it back.
            return Err(BusError::Store(format!(
                "{} of {} router leases were lost before the commit",
                ids.len() as u64 - acked,
                ids.len()
            )));
        }
        if !assignments.is_empty() {
            sqlx::query(
                "INSERT INTO bus_messages (queue, priority, body, expires_at, visible_at, created_at)
                 SELECT value ->> 'queue', value ->> 'priority', value ->> 'body',
                        value ->> 'expires_at', ?1, ?1
                 FROM json_each(?2)",
            )
            .bind(now)
            .bind(Value::Array(assignments).to_string())
            .execute(&mut *tx)
            .await
            .map_err(store_error)?;
        }
        if !dead.is_empty() {
            sqlx::query(
                "INSERT INTO bus_messages (queue, priority, body, headers, visible_at, created_at)
                 SELECT ?1, 0, value ->> 'body', value ->> 'headers', ?2, ?2 FROM json_each(?3)",
            )
            .bind(topology.dead())
            .bind(now)
            .bind(Value::Array(dead).to_string())
            .execute(&mut *tx)
            .await
            .map_err(store_error)?;
        }
        if !events.is_empty() {
            sqlx::query(
                "INSERT INTO bus_events (type, routing_key, body, created_at)
                 SELECT value ->> 'type', value ->> 'key', value ->> 'body', ?1 FROM json_each(?2)",
            )
            .bind(now)
            .bind(Value::Array(events).to_string())
            .execute(&mut *tx)
            .await
            .map_err(store_error)?;
            sqlx::query("DELETE FROM bus_events WHERE id <= (SELECT max(id) FROM bus_events) - ?")
                .bind(EVENTS_KEPT)
                .execute(&mut *tx)
                .await
                .map_err(store_error)?;
        }
        tx.commit().await.map_err(store_error)?;
        for (tag, _) in &outcomes {
            self.held.remove(tag);
        }
        if expiring {
            self.shared.expiry.notify_one();
        }
        for queue in &queues {
            self.shared.wake(queue);
        }
        debug!(count = outcomes.len(), "Embedded router batch committed.");
        Ok(Box::pin(std::future::ready(Ok(()))))
    }

    async fn reset(&mut self) -> Result<(), BusError> {
        // Give back what this link held, so it is redelivered now rather than at lease expiry.
        let released = sqlx::query(
            "UPDATE bus_messages SET visible_at = ?, lease_id = NULL WHERE lease_id = ?",
        )
        .bind(now_ms())
        .bind(&self.lease_id)
        .execute(&self.shared.pool)
        .await
        .map_err(store_error)?
        .rows_affected();
        self.held.clear();
        if released > 0 {
            self.shared.wake(&self.shared.topology.router());
        }
        self.lease_id = uuid::Uuid::new_v4().to_string();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::SqliteStore;

    async fn bus(delivery_limit: u32) -> (tempfile::TempDir, EmbeddedBus, CancellationToken) {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&format!("sqlite://{}", dir.path().join("b.db").display()))
            .await
            .unwrap();
        let config = BusConfig {
            delivery_limit,
            ..BusConfig::default()
        };
        let cancel = CancellationToken::new();
        let bus = EmbeddedBus::start(
            store.pool().clone(),
            &config,
            &TaskTracker::new(),
            cancel.clone(),
        )
        .await
        .unwrap();
        (dir, bus, cancel)
    }

    async fn put(bus: &EmbeddedBus, queue: &str, priority: u8, body: &str) {
        sqlx::query("INSERT INTO bus_messages (queue, priority, body, visible_at, created_at) VALUES (?, ?, ?, ?, ?)")
            .bind(bus.topology().agent_queue(queue))
            .bind(i64::from(priority))
            .bind(body)
            .bind(now_ms())
            .bind(now_ms())
            .execute(&bus.shared.pool)
            .await
            .unwrap();
        bus.shared.wake(&bus.topology().agent_queue(queue));
    }

    #[tokio::test]
    async fn higher_priority_first_then_fifo() {
        let (_dir, bus, cancel) = bus(5).await;
        for (priority, body) in [(1, "a"), (5, "b"), (1, "c"), (9, "d"), (5, "e")] {
            put(&bus, "q", priority, body).await;
        }
        let mut order = Vec::new();
        while let Some(leased) = bus
            .claim("q", Duration::ZERO, Duration::from_secs(60), &cancel)
            .await
            .unwrap()
        {
            order.push(leased.body);
        }
        assert_eq!(order, ["d", "b", "e", "a", "c"]);
    }

    #[tokio::test]
    async fn past_the_delivery_limit_a_message_goes_to_the_dead_queue_with_its_reason() {
        let (_dir, bus, cancel) = bus(2).await;
        put(&bus, "q", 0, "poison").await;
        for attempt in 1..=2 {
            let leased = bus
                .claim("q", Duration::ZERO, Duration::from_millis(1), &cancel)
                .await
                .unwrap()
                .unwrap_or_else(|| panic!("delivery {attempt}"));
            assert_eq!(leased.previous_attempts, attempt - 1);
            tokio::time::sleep(Duration::from_millis(5)).await; // the lease runs out
        }
        assert!(
            bus.claim("q", Duration::ZERO, Duration::from_secs(1), &cancel)
                .await
                .unwrap()
                .is_none()
        );
        let row = sqlx::query("SELECT body, headers FROM bus_messages WHERE queue = ?")
            .bind(bus.topology().dead())
            .fetch_one(&bus.shared.pool)
            .await
            .unwrap();
        assert_eq!(row.get::<String, _>("body"), "poison");
        let headers: Value = serde_json::from_str(&row.get::<String, _>("headers")).unwrap();
        assert_eq!(
            headers[REASON_HEADER],
            "delivered 2 times without being acknowledged"
        );
    }

    #[tokio::test]
    async fn a_waiting_claim_wakes_when_a_lease_expires_and_when_work_arrives() {
        let (_dir, bus, cancel) = bus(5).await;
        put(&bus, "q", 0, "first").await;
        let held = bus
            .claim("q", Duration::ZERO, Duration::from_millis(300), &cancel)
            .await
            .unwrap()
            .unwrap();
        let started = Instant::now();
        let again = bus
            .claim(
                "q",
                Duration::from_secs(5),
                Duration::from_secs(60),
                &cancel,
            )
            .await
            .unwrap()
            .unwrap();
        let waited = started.elapsed();
        assert_eq!(again.body, "first");
        assert!(
            waited >= Duration::from_millis(250) && waited < Duration::from_secs(2),
            "{waited:?}"
        );
        assert!(
            !bus.ack(&held.lease_id).await.unwrap(),
            "the expired lease cannot ack"
        );
        assert!(bus.ack(&again.lease_id).await.unwrap());

        let waiter = {
            let bus = bus.clone();
            let cancel = cancel.clone();
            tokio::spawn(async move {
                let leased = bus
                    .claim(
                        "q",
                        Duration::from_secs(5),
                        Duration::from_secs(60),
                        &cancel,
                    )
                    .await;
                (leased, Instant::now())
            })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        put(&bus, "q", 0, "second").await;
        let put_at = Instant::now();
        let (leased, woke) = waiter.await.unwrap();
        assert_eq!(leased.unwrap().unwrap().body, "second");
        assert!(woke.duration_since(put_at) < Duration::from_millis(500));
    }

    use std::time::Instant;
}
