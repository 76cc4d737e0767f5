//! The message bus: AMQP names (DESIGN §3), the publisher adapters use, and the router's
//! transactional link (take a batch, then publish assignments and acknowledge inputs in one
//! step that a crash cannot split).

pub mod amqp;
pub mod embedded;

use async_trait::async_trait;

/// Every AMQP name under the configured prefix.
#[derive(Debug, Clone)]
pub struct Topology {
    prefix: String,
}

impl Topology {
    pub fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_owned(),
        }
    }

    pub fn inbound(&self) -> String {
        format!("{}.inbound", self.prefix)
    }
    pub fn router(&self) -> String {
        format!("{}.router", self.prefix)
    }
    /// Partition `n` of the router input (`[bus] partitions` > 0).
    pub fn router_partition(&self, n: u16) -> String {
        format!("{}.router.{n}", self.prefix)
    }
    /// The consistent-hash exchange that splits the router input into partitions.
    pub fn partition(&self) -> String {
        format!("{}.partition", self.prefix)
    }
    pub fn assign(&self) -> String {
        format!("{}.assign", self.prefix)
    }
    pub fn agent_queue(&self, queue: &str) -> String {
        format!("{}.queue.{queue}", self.prefix)
    }
    pub fn outbound(&self) -> String {
        format!("{}.outbound", self.prefix)
    }
    pub fn events(&self) -> String {
        format!("{}.events", self.prefix)
    }
    pub fn dlx(&self) -> String {
        format!("{}.dlx", self.prefix)
    }
    pub fn dead(&self) -> String {
        format!("{}.dead", self.prefix)
    }
    /// Where agent queues dead-letter assignments whose SLA passed: bound to the router queue.
    pub fn expired(&self) -> String {
        format!("{}.expired", self.prefix)
    }
}

/// Routing key of `switchboard.conversation.escalated` on `<p>.events`.
pub const ESCALATED_KEY: &str = "conversation.escalated";

/// Header the partition exchange hashes: the sender identity of an inbound message, and of
/// the message an assignment carries. One sender's messages land in one partition.
pub const PARTITION_KEY_HEADER: &str = "x-switchboard-key";

/// The partition key of a sender: `kind:address`.
pub fn partition_key(sender: &switchboard_channel::Sender) -> String {
    format!("{}:{}", sender.kind, sender.address)
}

/// Header naming why a message was dead-lettered by Switchboard.
pub const REASON_HEADER: &str = "x-switchboard-reason";

#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("the bus is not connected")]
    Disconnected,
    #[error("AMQP error: {0}")]
    Amqp(#[from] lapin::Error),
    #[error("the bus is shutting down")]
    Closed,
    #[error("{0}")]
    Setup(String),
    #[error("embedded bus store error: {0}")]
    Store(String),
}

/// One message taken from the router queue.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// Opaque handle for [`RouterLink::commit`].
    pub tag: u64,
    pub body: Vec<u8>,
    /// True when the bus handed this message out before (a consumer died or gave it back).
    pub redelivered: bool,
    /// Why the message came back from an agent queue (`expired`: its SLA passed, `rejected`:
    /// an agent refused it), from the broker's dead-lettering; `None` for a fresh message.
    pub death_reason: Option<String>,
}

/// What becomes of a delivery when the batch commits.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// Publish this assignment to its agent queue, and acknowledge the delivery.
    Assign(Assignment),
    /// Publish this assignment, publish `event` to `<p>.events`, and acknowledge.
    Escalate {
        assignment: Assignment,
        event: Event,
    },
    /// Acknowledge only (a duplicate already handled).
    Ack,
    /// Move the delivery to the dead queue with this reason.
    Dead(String),
}

/// An assignment ready to publish: the CloudEvent JSON and its routing.
#[derive(Debug, Clone)]
pub struct Assignment {
    pub queue: String,
    pub priority: u8,
    pub event_id: String,
    pub body: String,
    /// The queue's SLA: past this wait in the queue the bus hands the assignment back to the
    /// router (AMQP per-message TTL dead-lettered to `<p>.expired`), which overflows it.
    pub expires_ms: Option<u64>,
    /// Partition key (the message sender's, see [`partition_key`]) for when the assignment
    /// comes back to the router.
    pub key: String,
}

/// A lifecycle event for `<p>.events`.
#[derive(Debug, Clone)]
pub struct Event {
    pub key: String,
    pub event_id: String,
    pub ty: String,
    pub body: String,
}

/// A commit in flight: resolves once the bus has made the batch durable.
pub type PendingCommit = futures::future::BoxFuture<'static, Result<(), BusError>>;

/// The router's side of the bus.
#[async_trait]
pub trait RouterLink: Send {
    /// Waits for at least one delivery, then takes whatever else is ready, up to `max`.
    async fn next_batch(&mut self, max: usize) -> Result<Vec<Delivery>, BusError>;

    /// Takes only deliveries ready now, up to `max`, without waiting; empty if none.
    async fn ready_batch(&mut self, max: usize) -> Result<Vec<Delivery>, BusError>;

    /// Publishes every assignment, dead-letters, and acknowledges every delivery of the batch,
    /// as one step: after a crash either all of it happened or the deliveries come back. The
    /// step completes when the returned future resolves; nothing else may be committed before.
    async fn commit(&mut self, outcomes: Vec<(u64, Outcome)>) -> Result<PendingCommit, BusError>;

    /// Drops the current session after an error (its deliveries return to the queue) and
    /// waits for a new one.
    async fn reset(&mut self) -> Result<(), BusError>;
}

#[async_trait]
impl RouterLink for Box<dyn RouterLink> {
    async fn next_batch(&mut self, max: usize) -> Result<Vec<Delivery>, BusError> {
        (**self).next_batch(max).await
    }
    async fn ready_batch(&mut self, max: usize) -> Result<Vec<Delivery>, BusError> {
        (**self).ready_batch(max).await
    }
    async fn commit(&mut self, outcomes: Vec<(u64, Outcome)>) -> Result<PendingCommit, BusError> {
        (**self).commit(outcomes).await
    }
    async fn reset(&mut self) -> Result<(), BusError> {
        (**self).reset().await
    }
}

/// An assignment taken through the claim API.
#[derive(Debug, Clone)]
pub struct Claimed {
    /// Pass to the ack endpoint; valid until the lease expires.
    pub assignment_id: String,
    pub priority: u8,
    pub redelivered: bool,
    pub lease_expires_ms: i64,
    /// The assignment CloudEvent JSON.
    pub body: String,
}

/// Hands a publish request to a bus's publisher task and waits up to `timeout` for its answer
/// (`late` says what did not happen in time).
pub(crate) async fn ask_publisher<R>(
    publisher: &tokio::sync::mpsc::Sender<R>,
    request: impl FnOnce(
        tokio::sync::oneshot::Sender<Result<(), switchboard_channel::PublishError>>,
    ) -> R,
    timeout: std::time::Duration,
    late: &str,
) -> Result<(), switchboard_channel::PublishError> {
    use switchboard_channel::PublishError;
    let (reply, response) = tokio::sync::oneshot::channel();
    let asked = async {
        publisher
            .send(request(reply))
            .await
            .map_err(|_| PublishError::Unavailable("the bus is shutting down".into()))?;
        response
            .await
            .map_err(|_| PublishError::Unavailable("the publisher stopped".into()))?
    };
    tokio::time::timeout(timeout, asked)
        .await
        .unwrap_or_else(|_| {
            Err(PublishError::Unavailable(format!(
                "{late} within {}",
                humantime::format_duration(timeout)
            )))
        })
}

/// Messages waiting in each agent queue (by rule queue name), sampled every second; what the
/// router breaks skill ties with, and `switchboard_queue_depth`.
#[derive(Clone, Default)]
pub struct QueueLoads(std::sync::Arc<std::sync::RwLock<std::collections::HashMap<String, u64>>>);

impl QueueLoads {
    /// The last sampled depth of `queue`; 0 if unknown.
    pub fn get(&self, queue: &str) -> u64 {
        self.0
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get(queue)
            .copied()
            .unwrap_or(0)
    }

    fn set(&self, depths: std::collections::HashMap<String, u64>) {
        for (queue, depth) in &depths {
            metrics::gauge!("switchboard_queue_depth", "queue" => queue.clone()).set(*depth as f64);
        }
        *self
            .0
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = depths;
    }
}

/// How often queue depths are sampled.
const LOAD_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// The bus the daemon runs on: RabbitMQ, or the embedded bus in the store (single-node mode).
#[derive(Clone)]
pub enum Bus {
    Amqp(amqp::AmqpBus),
    Embedded(embedded::EmbeddedBus),
}

impl Bus {
    pub fn mode(&self) -> &'static str {
        match self {
            Bus::Amqp(_) => "rabbitmq",
            Bus::Embedded(_) => "embedded",
        }
    }

    pub fn topology(&self) -> &Topology {
        match self {
            Bus::Amqp(bus) => bus.topology(),
            Bus::Embedded(bus) => bus.topology(),
        }
    }

    /// Whether the bus can take messages now.
    pub async fn is_ready(&self) -> bool {
        match self {
            Bus::Amqp(bus) => bus.is_connected(),
            Bus::Embedded(bus) => bus.is_ready().await,
        }
    }

    /// Makes sure agent queues exist (AMQP declares them; the embedded bus needs nothing).
    pub async fn declare_agent_queues(&self, names: &[String]) -> Result<(), BusError> {
        match self {
            Bus::Amqp(bus) => bus.declare_agent_queues(names).await,
            Bus::Embedded(_) => Ok(()),
        }
    }

    /// Takes the next assignment of an agent queue (see [`Claimed`]).
    pub async fn claim(
        &self,
        queue: &str,
        wait: std::time::Duration,
        lease: std::time::Duration,
        cancel: &tokio_util::sync::CancellationToken,
    ) -> Result<Option<Claimed>, BusError> {
        match self {
            Bus::Amqp(bus) => bus.claim(queue, wait, lease, cancel).await,
            Bus::Embedded(bus) => {
                Ok(bus
                    .claim(queue, wait, lease, cancel)
                    .await?
                    .map(|leased| Claimed {
                        assignment_id: leased.lease_id,
                        priority: leased.priority,
                        redelivered: leased.previous_attempts > 0,
                        lease_expires_ms: leased.lease_expires_ms,
                        body: leased.body,
                    }))
            }
        }
    }

    /// Acknowledges a claimed assignment; `Ok(false)` if unknown or its lease expired.
    pub async fn ack(&self, assignment_id: &str) -> Result<bool, BusError> {
        match self {
            Bus::Amqp(bus) => bus.ack(assignment_id).await,
            Bus::Embedded(bus) => bus.ack(assignment_id).await,
        }
    }

    /// Whether agent queue `queue` holds assignments (ready or claimed): a queue a reload
    /// removed from the rules keeps what it held until that is claimed. `false` when it cannot
    /// be told (no such queue, or the bus is down).
    pub async fn holds(&self, queue: &str) -> bool {
        let names = [queue.to_owned()];
        let depths = match self {
            Bus::Amqp(bus) => bus.depths(&names).await,
            Bus::Embedded(bus) => bus.depths(&names).await,
        };
        depths.is_ok_and(|depths| depths.get(queue).is_some_and(|&n| n > 0))
    }

    /// Samples the depth of every agent queue of the current rules every second into `loads`,
    /// until `cancel`.
    pub async fn sample_loads(
        self,
        rules: std::sync::Arc<arc_swap::ArcSwap<crate::router::rules::RuleSet>>,
        loads: QueueLoads,
        cancel: tokio_util::sync::CancellationToken,
    ) {
        let mut tick = tokio::time::interval(LOAD_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = cancel.cancelled() => break,
                _ = tick.tick() => {}
            }
            let names = rules.load().queue_names();
            let depths = match &self {
                Bus::Amqp(bus) => bus.depths(&names).await,
                Bus::Embedded(bus) => bus.depths(&names).await,
            };
            match depths {
                Ok(depths) => loads.set(depths),
                Err(error) => tracing::debug!(%error, "Queue depths not sampled."),
            }
        }
    }

    pub fn router_link(&self) -> Box<dyn RouterLink> {
        match self {
            Bus::Amqp(bus) => Box::new(bus.router_link()),
            Bus::Embedded(bus) => Box::new(bus.router_link()),
        }
    }
}

#[async_trait]
impl switchboard_channel::Publisher for Bus {
    async fn publish(
        &self,
        message: &switchboard_channel::NormalizedMessage,
    ) -> Result<(), switchboard_channel::PublishError> {
        let result = match self {
            Bus::Amqp(bus) => bus.publish_inbound(message).await,
            Bus::Embedded(bus) => bus.publish_inbound(message).await,
        };
        if result.is_err() {
            metrics::counter!("switchboard_publish_failures_total", "stage" => "inbound")
                .increment(1);
        }
        result
    }
}
