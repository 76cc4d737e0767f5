//! The message bus: AMQP names (DESIGN §3), the publisher adapters use, and the router's
//! transactional link (take a batch, then publish assignments and acknowledge inputs in one
//! step that a crash cannot split).

pub mod amqp;

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
}

/// One message taken from the router queue.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// Opaque handle for [`RouterLink::commit`].
    pub tag: u64,
    pub body: Vec<u8>,
    /// True when the bus handed this message out before (a consumer died or gave it back).
    pub redelivered: bool,
}

/// What becomes of a delivery when the batch commits.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// Publish this assignment to its agent queue, and acknowledge the delivery.
    Assign(Assignment),
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
}

/// A commit in flight: resolves once the bus has made the batch durable.
pub type PendingCommit = futures::future::BoxFuture<'static, Result<(), BusError>>;

/// The router's side of the bus.
#[async_trait]
pub trait RouterLink: Send {
    /// Waits for at least one delivery, then takes whatever else is ready, up to `max`.
    async fn next_batch(&mut self, max: usize) -> Result<Vec<Delivery>, BusError>;

    /// Takes only deliveries already at hand, up to `max`; empty if none.
    fn ready_batch(&mut self, max: usize) -> Result<Vec<Delivery>, BusError>;

    /// Publishes every assignment, dead-letters, and acknowledges every delivery of the batch,
    /// as one step: after a crash either all of it happened or the deliveries come back. The
    /// step completes when the returned future resolves; nothing else may be committed before.
    async fn commit(&mut self, outcomes: Vec<(u64, Outcome)>) -> Result<PendingCommit, BusError>;

    /// Drops the current session after an error (its deliveries return to the queue) and
    /// waits for a new one.
    async fn reset(&mut self) -> Result<(), BusError>;
}
