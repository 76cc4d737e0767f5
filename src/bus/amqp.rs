//! RabbitMQ through lapin. One supervisor task keeps a connection (reconnecting with backoff and
//! re-declaring the topology); one publisher task owns the confirm channel that adapters publish
//! through (confirms pair with the right message only if one task publishes); the router owns its
//! own channel in transaction mode.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use backon::BackoffBuilder;
use futures::{FutureExt, StreamExt};
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeBindOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{
    BasicProperties, Channel, Connection, ConnectionProperties, Consumer, Event, ExchangeKind,
};
use switchboard_channel::envelope::{CLOUDEVENTS_CONTENT_TYPE, event_type};
use switchboard_channel::{CloudEvent, NormalizedMessage, PublishError};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn};

use super::{
    Assignment, BusError, Delivery, Outcome, PARTITION_KEY_HEADER, PendingCommit, REASON_HEADER,
    RouterLink, Topology,
};
use crate::config::BusConfig;

/// How many publish requests may wait for the publisher task before webhooks feel backpressure.
const PUBLISH_QUEUE: usize = 4096;
/// How many requests the publisher sends before waiting for their confirms.
const PUBLISH_BATCH: usize = 256;

/// The AMQP bus: cheap to clone, shared by the HTTP server and the router.
#[derive(Clone)]
pub struct AmqpBus {
    shared: Arc<Shared>,
    publish_tx: mpsc::Sender<PublishRequest>,
    leases: Arc<Mutex<HashMap<String, Lease>>>,
}

/// An assignment taken through the HTTP claim API: its delivery stays unacknowledged on its own
/// channel until acked, or until the lease expires and the channel closes (RabbitMQ requeues it).
struct Lease {
    channel: Channel,
    delivery_tag: u64,
}

struct Shared {
    url: String,
    topology: Topology,
    config: BusConfig,
    connection: watch::Receiver<Option<Arc<Connection>>>,
    agent_queues: Mutex<BTreeSet<String>>,
    /// Cancelled once the publisher task has closed its channel: the supervisor closes the
    /// connection only then (closing both at once makes lapin log errors at every shutdown).
    publisher_done: CancellationToken,
}

struct PublishRequest {
    exchange: String,
    routing_key: String,
    body: Vec<u8>,
    properties: BasicProperties,
    reply: oneshot::Sender<Result<(), PublishError>>,
}

impl AmqpBus {
    /// Starts the connection supervisor and the publisher. Returns at once; the connection is
    /// made in the background and remade whenever it drops.
    pub fn start(
        url: &str,
        config: &BusConfig,
        agent_queues: Vec<String>,
        tracker: &TaskTracker,
        cancel: CancellationToken,
    ) -> Self {
        let (connection_tx, connection_rx) = watch::channel(None);
        let shared = Arc::new(Shared {
            url: url.to_owned(),
            topology: Topology::new(&config.prefix),
            config: config.clone(),
            connection: connection_rx,
            agent_queues: Mutex::new(agent_queues.into_iter().collect()),
            publisher_done: CancellationToken::new(),
        });
        let (publish_tx, publish_rx) = mpsc::channel(PUBLISH_QUEUE);
        tracker.spawn(supervise(shared.clone(), connection_tx, cancel.clone()));
        tracker.spawn(run_publisher(shared.clone(), publish_rx, cancel));
        Self {
            shared,
            publish_tx,
            leases: Arc::default(),
        }
    }

    /// Takes the next assignment of agent queue `queue` (highest priority first), waiting up to
    /// `wait`; it stays leased for `lease`, then returns to the queue unless acknowledged.
    pub async fn claim(
        &self,
        queue: &str,
        wait: Duration,
        lease: Duration,
        cancel: &CancellationToken,
    ) -> Result<Option<super::Claimed>, BusError> {
        let connection = self.shared.current().ok_or(BusError::Disconnected)?;
        let channel = connection.create_channel().await?;
        let lease_id = uuid::Uuid::new_v4().to_string();
        let agent_queue = self.shared.topology.agent_queue(queue);
        // What is ready is taken at once (highest priority first); only an empty queue waits.
        let ready = channel
            .basic_get(agent_queue.as_str().into(), BasicGetOptions::default())
            .await?
            .map(|message| message.delivery);
        let delivery = match ready {
            Some(delivery) => Some(delivery),
            None if wait.is_zero() => None,
            None => wait_for_delivery(&channel, &agent_queue, &lease_id, wait, cancel).await?,
        };
        let Some(delivery) = delivery else {
            let _ = channel.close(200, "nothing to claim".into()).await;
            return Ok(None);
        };
        let claimed = super::Claimed {
            assignment_id: lease_id.clone(),
            priority: delivery.properties.priority().unwrap_or(0),
            redelivered: delivery.redelivered,
            lease_expires_ms: super::embedded::now_ms()
                .saturating_add(i64::try_from(lease.as_millis()).unwrap_or(i64::MAX)),
            body: String::from_utf8_lossy(&delivery.data).into_owned(),
        };
        lock(&self.leases).insert(
            lease_id.clone(),
            Lease {
                channel,
                delivery_tag: delivery.delivery_tag,
            },
        );
        let leases = self.leases.clone();
        tokio::spawn(async move {
            tokio::time::sleep(lease).await;
            let expired = lock(&leases).remove(&lease_id);
            if let Some(expired) = expired {
                debug!(assignment_id = %lease_id, "Claim lease expired; the assignment returns to its queue.");
                let _ = expired.channel.close(200, "lease expired".into()).await;
            }
        });
        Ok(Some(claimed))
    }

    /// Ready messages in each agent queue of `queues` (passive declares on a short-lived channel).
    pub async fn depths(&self, queues: &[String]) -> Result<HashMap<String, u64>, BusError> {
        let connection = self.shared.current().ok_or(BusError::Disconnected)?;
        let channel = connection.create_channel().await?;
        let mut depths = HashMap::new();
        for queue in queues {
            let declared = channel
                .queue_declare(
                    self.shared.topology.agent_queue(queue).as_str().into(),
                    passive(),
                    FieldTable::default(),
                )
                .await;
            match declared {
                Ok(declared) => {
                    depths.insert(queue.clone(), u64::from(declared.message_count()));
                }
                // A missing queue closes the channel: stop here, report what we have.
                Err(_) => break,
            }
        }
        let _ = channel.close(200, "sampled".into()).await;
        Ok(depths)
    }

    /// Acknowledges a claimed assignment; `Ok(false)` if unknown or expired.
    pub async fn ack(&self, assignment_id: &str) -> Result<bool, BusError> {
        let lease = lock(&self.leases).remove(assignment_id);
        let Some(lease) = lease else {
            return Ok(false);
        };
        if !lease.channel.status().connected() {
            // Its channel closed (with a lost connection, say): the broker put the assignment
            // back in its queue.
            return Ok(false);
        }
        lease
            .channel
            .basic_ack(lease.delivery_tag, BasicAckOptions::default())
            .await?;
        let _ = lease.channel.close(200, "acknowledged".into()).await;
        Ok(true)
    }

    pub fn topology(&self) -> &Topology {
        &self.shared.topology
    }

    pub fn is_connected(&self) -> bool {
        self.shared
            .connection
            .borrow()
            .as_ref()
            .is_some_and(|c| c.status().connected())
    }

    /// Waits up to `timeout` for a connection; true if connected.
    pub async fn wait_connected(&self, timeout: Duration) -> bool {
        let mut rx = self.shared.connection.clone();
        tokio::time::timeout(timeout, rx.wait_for(Option::is_some))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Declares agent queues (for a reloaded rule set) now, and on every reconnect.
    pub async fn declare_agent_queues(&self, names: &[String]) -> Result<(), BusError> {
        {
            let mut queues = lock(&self.shared.agent_queues);
            queues.extend(names.iter().cloned());
        }
        let connection = self.shared.current().ok_or(BusError::Disconnected)?;
        let mut channel = connection.create_channel().await?;
        for name in names {
            channel =
                declare_agent_queue(&connection, channel, &self.shared.topology, name).await?;
        }
        let _ = channel.close(200, "declared".into()).await;
        Ok(())
    }

    /// Publishes a normalized message to `<p>.inbound` and waits for the broker's confirm.
    pub async fn publish_inbound(&self, message: &NormalizedMessage) -> Result<(), PublishError> {
        if !self.is_connected() {
            return Err(PublishError::Unavailable(
                "not connected to RabbitMQ".into(),
            ));
        }
        let event = CloudEvent::message_received(message.clone());
        let body = serde_json::to_vec(&event).map_err(|error| {
            PublishError::Rejected(format!("cannot encode the message: {error}"))
        })?;
        let mut headers = FieldTable::default();
        headers.insert(
            PARTITION_KEY_HEADER.into(),
            AMQPValue::LongString(super::partition_key(&message.sender).as_str().into()),
        );
        let properties =
            event_properties(&event.id, event_type::MESSAGE_RECEIVED).with_headers(headers);
        let request = |reply| PublishRequest {
            exchange: self.shared.topology.inbound(),
            routing_key: message.routing_key(),
            body,
            properties,
            reply,
        };
        super::ask_publisher(
            &self.publish_tx,
            request,
            self.shared.config.confirm_timeout,
            "no confirm from RabbitMQ",
        )
        .await
    }

    /// The router's transactional link to `<p>.router` and `<p>.assign`.
    pub fn router_link(&self) -> AmqpRouterLink {
        AmqpRouterLink {
            shared: self.shared.clone(),
            session: None,
        }
    }
}

impl Shared {
    fn current(&self) -> Option<Arc<Connection>> {
        self.connection
            .borrow()
            .as_ref()
            .filter(|c| c.status().connected())
            .cloned()
    }

    /// Waits until a connection is up, or the bus closes.
    async fn connected(&self, cancel: &CancellationToken) -> Result<Arc<Connection>, BusError> {
        let mut rx = self.connection.clone();
        loop {
            if let Some(connection) = self.current() {
                return Ok(connection);
            }
            tokio::select! {
                () = cancel.cancelled() => return Err(BusError::Closed),
                changed = rx.changed() => if changed.is_err() { return Err(BusError::Closed) },
            }
        }
    }
}

/// The first assignment to arrive on `queue` within `wait`, on a consumer of `channel` that
/// takes one at a time. A delivery that crossed the end of the wait (sent before the broker
/// saw the cancel) is still returned rather than handed back to the queue as redelivered.
async fn wait_for_delivery(
    channel: &Channel,
    queue: &str,
    lease_id: &str,
    wait: Duration,
    cancel: &CancellationToken,
) -> Result<Option<lapin::message::Delivery>, BusError> {
    channel.basic_qos(1, BasicQosOptions::default()).await?;
    let mut consumer = channel
        .basic_consume(
            queue.into(),
            lease_id.into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let delivery = tokio::select! {
        () = cancel.cancelled() => None,
        () = tokio::time::sleep(wait) => None,
        delivery = consumer.next() => delivery,
    };
    channel
        .basic_cancel(lease_id.into(), Default::default())
        .await?;
    let delivery = match delivery {
        Some(delivery) => Some(delivery),
        // After the cancel-ok, the consumer holds what was sent before it, then ends.
        None => tokio::time::timeout(Duration::from_secs(1), consumer.next())
            .await
            .ok()
            .flatten(),
    };
    Ok(delivery.transpose()?)
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Properties of every Switchboard message: persistent CloudEvents JSON.
fn event_properties(id: &str, kind: &str) -> BasicProperties {
    BasicProperties::default()
        .with_content_type(CLOUDEVENTS_CONTENT_TYPE.into())
        .with_delivery_mode(2)
        .with_message_id(id.into())
        .with_type(kind.into())
        .with_timestamp(
            u64::try_from(time::OffsetDateTime::now_utc().unix_timestamp()).unwrap_or_default(),
        )
}

/// Keeps one connection up: connect, declare, wait for it to fail, back off, again.
async fn supervise(
    shared: Arc<Shared>,
    connection_tx: watch::Sender<Option<Arc<Connection>>>,
    cancel: CancellationToken,
) {
    let mut backoff = new_backoff();
    loop {
        let attempt = tokio::select! {
            () = cancel.cancelled() => break,
            attempt = connect_and_declare(&shared) => attempt,
        };
        match attempt {
            Ok(connection) => {
                backoff = new_backoff();
                let mut events = connection.events_listener();
                info!(prefix = %shared.config.prefix, "Connected to RabbitMQ.");
                connection_tx.send_replace(Some(connection.clone()));
                let mut watchdog = tokio::time::interval(Duration::from_secs(1));
                loop {
                    tokio::select! {
                        () = cancel.cancelled() => break,
                        event = events.next() => match event {
                            // lapin reports a channel the broker closed here too (a passive
                            // declare of a missing queue, say): the connection stays.
                            Some(Event::Error(error)) if connection.status().connected() => {
                                debug!(%error, "A RabbitMQ channel was closed.");
                            }
                            Some(Event::Error(error)) => {
                                warn!(%error, "RabbitMQ connection failed; reconnecting.");
                                break;
                            }
                            Some(Event::ConnectionBlocked(reason)) => warn!(%reason, "RabbitMQ blocked the connection."),
                            Some(_) => {}
                            None => break,
                        },
                        _ = watchdog.tick() => if !connection.status().connected() {
                            warn!("RabbitMQ connection lost; reconnecting.");
                            break;
                        },
                    }
                }
                connection_tx.send_replace(None);
                if cancel.is_cancelled() {
                    let _ = tokio::time::timeout(
                        Duration::from_secs(2),
                        shared.publisher_done.cancelled(),
                    )
                    .await;
                    let _ = connection
                        .close(200, "switchboard shutting down".into())
                        .await;
                    break;
                }
                metrics::counter!("switchboard_bus_reconnects_total").increment(1);
            }
            Err(error) => {
                let delay = backoff.next().unwrap_or(Duration::from_secs(5));
                warn!(%error, retry_in = ?delay, "Cannot connect to RabbitMQ.");
                tokio::select! {
                    () = cancel.cancelled() => break,
                    () = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
    connection_tx.send_replace(None);
}

fn new_backoff() -> backon::ExponentialBackoff {
    backon::ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(200))
        .with_max_delay(Duration::from_secs(5))
        .with_jitter()
        .without_max_times()
        .build()
}

async fn connect_and_declare(shared: &Shared) -> Result<Arc<Connection>, BusError> {
    let properties = ConnectionProperties::default().with_connection_name("switchboard".into());
    let connection = tokio::time::timeout(
        Duration::from_secs(10),
        Connection::connect(&shared.url, properties),
    )
    .await
    .map_err(|_| BusError::Disconnected)??;
    let channel = connection.create_channel().await?;
    let queues: Vec<String> = lock(&shared.agent_queues).iter().cloned().collect();
    let mut channel = declare_topology(&connection, &channel, &shared.topology, &shared.config)
        .await
        .map_err(|error| explain_missing_plugin(error, shared.config.partitions))?;
    for queue in &queues {
        channel = declare_agent_queue(&connection, channel, &shared.topology, queue).await?;
    }
    let _ = channel.close(200, "declared".into()).await;
    Ok(Arc::new(connection))
}

fn durable() -> ExchangeDeclareOptions {
    ExchangeDeclareOptions {
        durable: true,
        ..ExchangeDeclareOptions::default()
    }
}

/// Declares nothing: asks whether a queue exists, and its counts (the broker closes the
/// channel if it does not).
fn passive() -> QueueDeclareOptions {
    QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    }
}

fn durable_queue() -> QueueDeclareOptions {
    QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    }
}

/// Declares DESIGN §3's exchanges and queues (idempotent).
/// Returns the channel to go on with (a fresh one if the broker closed the first).
async fn declare_topology(
    connection: &Connection,
    channel: &Channel,
    topology: &Topology,
    config: &BusConfig,
) -> Result<Channel, BusError> {
    let none = FieldTable::default;
    for (name, kind) in [
        (topology.inbound(), ExchangeKind::Topic),
        (topology.assign(), ExchangeKind::Direct),
        (topology.outbound(), ExchangeKind::Topic),
        (topology.events(), ExchangeKind::Topic),
        (topology.dlx(), ExchangeKind::Fanout),
        (topology.expired(), ExchangeKind::Fanout),
    ] {
        channel
            .exchange_declare(name.as_str().into(), kind, durable(), none())
            .await?;
    }
    channel
        .queue_declare(topology.dead().as_str().into(), durable_queue(), none())
        .await?;
    channel
        .queue_bind(
            topology.dead().as_str().into(),
            topology.dlx().as_str().into(),
            "".into(),
            QueueBindOptions::default(),
            none(),
        )
        .await?;
    if config.partitions > 0 {
        if let Some(extra) = extra_partition(connection, topology, config.partitions).await? {
            return Err(BusError::Setup(extra_partition_problem(
                &extra,
                config.partitions,
            )));
        }
        declare_partitions(channel, topology, config.partitions).await?;
        return Ok(channel.clone());
    }
    let mut router_args = FieldTable::default();
    router_args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    router_args.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString(topology.dlx().as_str().into()),
    );
    router_args.insert(
        "x-delivery-limit".into(),
        AMQPValue::LongInt(i32::try_from(config.delivery_limit).unwrap_or(i32::MAX)),
    );
    let declared = channel
        .queue_declare(
            topology.router().as_str().into(),
            durable_queue(),
            router_args,
        )
        .await;
    let channel = match declared {
        Ok(_) => channel.clone(),
        // The queue exists with other arguments (say, `delivery_limit` was changed): keep
        // routing on it as it is rather than refusing to start.
        Err(error) if error.to_string().contains("PRECONDITION_FAILED") => {
            warn!(queue = %topology.router(), %error, "The router queue exists with other arguments (was [bus] delivery_limit changed?); using it as it is. To apply the new arguments, drain and delete the queue, or set a RabbitMQ policy.");
            let channel = connection.create_channel().await?;
            channel
                .queue_declare(topology.router().as_str().into(), passive(), none())
                .await?;
            channel
        }
        Err(error) => return Err(error.into()),
    };
    for (exchange, key) in [(topology.inbound(), "#"), (topology.expired(), "")] {
        channel
            .queue_bind(
                topology.router().as_str().into(),
                exchange.as_str().into(),
                key.into(),
                QueueBindOptions::default(),
                none(),
            )
            .await?;
    }
    Ok(channel)
}

/// The partitioned router input: `<p>.inbound` and `<p>.expired` feed the consistent-hash
/// exchange `<p>.partition`, which hashes each message's sender key (header
/// [`PARTITION_KEY_HEADER`]) onto `<p>.router.0` … `<p>.router.<n-1>`, each with one
/// active consumer at a time.
///
/// The partitions are classic durable queues, not quorum queues: measured on RabbitMQ 3.10, a
/// quorum queue with a single active consumer gives the next consumer the *following*
/// messages before the ones the previous consumer held when it closed its channel cleanly
/// (a shutdown, a rebalance), which would reorder a customer's messages; a classic queue
/// returns them in place. Poison messages are dead-lettered by the router itself.
async fn declare_partitions(
    channel: &Channel,
    topology: &Topology,
    partitions: u16,
) -> Result<(), BusError> {
    let mut exchange_args = FieldTable::default();
    exchange_args.insert(
        "hash-header".into(),
        AMQPValue::LongString(PARTITION_KEY_HEADER.into()),
    );
    channel
        .exchange_declare(
            topology.partition().as_str().into(),
            ExchangeKind::Custom("x-consistent-hash".to_owned()),
            durable(),
            exchange_args,
        )
        .await?;
    for (source, key) in [(topology.inbound(), "#"), (topology.expired(), "")] {
        channel
            .exchange_bind(
                topology.partition().as_str().into(),
                source.as_str().into(),
                key.into(),
                ExchangeBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
    }
    for n in 0..partitions {
        let name = topology.router_partition(n);
        let mut args = FieldTable::default();
        args.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
        args.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString(topology.dlx().as_str().into()),
        );
        channel
            .queue_declare(name.as_str().into(), durable_queue(), args)
            .await?;
        // Equal weights: the binding key of a consistent-hash exchange is the weight.
        channel
            .queue_bind(
                name.as_str().into(),
                topology.partition().as_str().into(),
                "1".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
    }
    Ok(())
}

/// `<p>.router.<partitions>`, if it exists: a partition queue past this node's, which an
/// earlier run or another node with more partitions made. It stays bound to `<p>.partition`,
/// so a share of the senders' messages goes to it, and no node of this size consumes it.
async fn extra_partition(
    connection: &Connection,
    topology: &Topology,
    partitions: u16,
) -> Result<Option<String>, BusError> {
    let name = topology.router_partition(partitions);
    let probe = connection.create_channel().await?;
    let declared = probe
        .queue_declare(name.as_str().into(), passive(), FieldTable::default())
        .await;
    match declared {
        Ok(_) => {
            let _ = probe.close(200, "probed".into()).await;
            Ok(Some(name))
        }
        // The broker closed the probe channel: no such queue.
        Err(error) if error.to_string().contains("NOT_FOUND") => Ok(None),
        Err(error) => Err(error.into()),
    }
}

fn extra_partition_problem(extra: &str, partitions: u16) -> String {
    format!(
        "the partition queue `{extra}` exists, but [bus] partitions = {partitions}: an earlier run \
         or another node uses more partitions, and the messages hashed to it would wait with no \
         consumer. Give every node the same [bus] partitions; to lower it, stop the ingest, let \
         the router queues drain, and delete the partition queues from `{extra}` on \
         (rabbitmqctl delete_queue)"
    )
}

/// A partitioned topology needs RabbitMQ's consistent-hash exchange plugin; say so.
fn explain_missing_plugin(error: BusError, partitions: u16) -> BusError {
    let text = error.to_string();
    if partitions > 0 && (text.contains("x-consistent-hash") || text.contains("COMMAND_INVALID")) {
        BusError::Setup(format!(
            "[bus] partitions needs RabbitMQ's consistent-hash exchange: run \
             `rabbitmq-plugins enable rabbitmq_consistent_hash_exchange` ({text})"
        ))
    } else {
        error
    }
}

/// Declares one agent queue and binds it to `<p>.assign`. Returns the channel to go on with
/// (a fresh one if the broker closed this one).
///
/// Agent queues dead-letter to `<p>.expired`, which feeds the router: that is how an
/// assignment whose SLA passed (per-message TTL) comes back to be overflowed.
async fn declare_agent_queue(
    connection: &Connection,
    channel: Channel,
    topology: &Topology,
    queue: &str,
) -> Result<Channel, BusError> {
    let name = topology.agent_queue(queue);
    let mut args = FieldTable::default();
    args.insert("x-max-priority".into(), AMQPValue::ShortShortUInt(10));
    args.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString(topology.expired().as_str().into()),
    );
    let channel = match channel
        .queue_declare(name.as_str().into(), durable_queue(), args)
        .await
    {
        Ok(_) => channel,
        // Declared by an older version, without the dead-letter exchange: keep using it as it
        // is; its SLA overflow does not work until the queue is drained and deleted.
        Err(error) if error.to_string().contains("PRECONDITION_FAILED") => {
            warn!(queue = %name, %error, "The agent queue exists with other arguments; using it as it is. SLA overflow needs its dead-letter exchange: drain and delete the queue to re-create it.");
            let channel = connection.create_channel().await?;
            channel
                .queue_declare(name.as_str().into(), passive(), FieldTable::default())
                .await?;
            channel
        }
        Err(error) => return Err(error.into()),
    };
    channel
        .queue_bind(
            name.as_str().into(),
            topology.assign().as_str().into(),
            queue.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    Ok(channel)
}

/// The only task that publishes on the confirm channel. Sends a batch, then waits for its
/// confirms in order; what was not confirmed when the channel broke is published again on the
/// next channel, as long as its sender still waits.
async fn run_publisher(
    shared: Arc<Shared>,
    mut requests: mpsc::Receiver<PublishRequest>,
    cancel: CancellationToken,
) {
    let _done = shared.publisher_done.clone().drop_guard();
    let mut carried: Vec<PublishRequest> = Vec::new();
    'channels: loop {
        let channel = match open_confirm_channel(&shared, &cancel).await {
            Ok(channel) => channel,
            Err(BusError::Closed) => break,
            Err(error) => {
                debug!(%error, "Publisher channel failed; waiting for the connection.");
                tokio::select! {
                    () = cancel.cancelled() => break,
                    () = tokio::time::sleep(Duration::from_millis(200)) => continue,
                }
            }
        };
        loop {
            let mut batch = std::mem::take(&mut carried);
            batch.retain(|r| !r.reply.is_closed());
            if batch.is_empty() {
                tokio::select! {
                    () = cancel.cancelled() => {
                        // Closed here, before the supervisor closes the connection: a channel
                        // left open makes lapin log an error while the connection closes.
                        let _ = channel.close(200, "switchboard shutting down".into()).await;
                        break 'channels;
                    }
                    request = requests.recv() => match request {
                        Some(request) => batch.push(request),
                        None => break 'channels,
                    },
                }
            }
            while batch.len() < PUBLISH_BATCH {
                match requests.try_recv() {
                    Ok(request) => batch.push(request),
                    Err(_) => break,
                }
            }
            batch.retain(|r| !r.reply.is_closed());

            let mut sent = Vec::with_capacity(batch.len());
            let mut unsent = batch.into_iter();
            let mut broken = false;
            for request in unsent.by_ref() {
                let publish = channel
                    .basic_publish(
                        request.exchange.as_str().into(),
                        request.routing_key.as_str().into(),
                        BasicPublishOptions {
                            mandatory: true,
                            ..BasicPublishOptions::default()
                        },
                        &request.body,
                        request.properties.clone(),
                    )
                    .await;
                match publish {
                    Ok(confirm) => sent.push((request, confirm)),
                    Err(error) => {
                        debug!(%error, "Publish failed; will retry on a new channel.");
                        carried.push(request);
                        broken = true;
                        break;
                    }
                }
            }
            carried.extend(unsent);
            for (request, confirm) in sent {
                if broken {
                    carried.push(request);
                    continue;
                }
                match confirm.await {
                    Ok(confirmation) if confirmation.is_nack() => {
                        let _ = request.reply.send(Err(PublishError::Rejected(
                            "RabbitMQ nacked the message".into(),
                        )));
                    }
                    Ok(confirmation) => {
                        let result = match confirmation.take_message() {
                            Some(returned) => Err(PublishError::Rejected(format!(
                                "no queue is bound for it ({})",
                                returned.reply_text
                            ))),
                            None => Ok(()),
                        };
                        let _ = request.reply.send(result);
                    }
                    Err(error) => {
                        debug!(%error, "Confirm lost; will retry on a new channel.");
                        carried.push(request);
                        broken = true;
                    }
                }
            }
            if broken {
                continue 'channels;
            }
        }
    }
    for request in carried {
        let _ = request.reply.send(Err(PublishError::Unavailable(
            "the bus is shutting down".into(),
        )));
    }
}

async fn open_confirm_channel(
    shared: &Shared,
    cancel: &CancellationToken,
) -> Result<Channel, BusError> {
    let connection = shared.connected(cancel).await?;
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    Ok(channel)
}

/// The router's link. Each router input queue (`<p>.router`, or every partition
/// `<p>.router.<n>`) is consumed on a channel of its own in transaction mode, which also
/// publishes the assignments of that queue's messages: `tx.commit` makes "publish the
/// assignments + ack the inputs" one step per queue.
///
/// With partitions, every node consumes every partition and the broker makes one consumer per
/// partition active. A node that serves more than its share (partitions / nodes consuming)
/// hands some back by closing their channels between batches — nothing of theirs is in flight
/// then, so the next node starts exactly where this one stopped — and re-subscribes as a
/// standby.
pub struct AmqpRouterLink {
    shared: Arc<Shared>,
    session: Option<Session>,
}

/// How often a partitioned router compares its share of active partitions with the others'.
const REBALANCE_EVERY: Duration = Duration::from_secs(3);
/// A partition that delivered within this long counts as active on this node.
const ACTIVE_WITHIN: Duration = Duration::from_secs(6);
/// Delivery tags carry the input's slot in their top bits.
const SLOT_SHIFT: u32 = 48;

struct Session {
    inputs: Vec<Input>,
    /// Bodies of the deliveries in hand, for dead-lettering.
    bodies: HashMap<u64, Vec<u8>>,
    /// Where the next `ready` scan starts, so no input starves the others.
    cursor: usize,
    last_rebalance: std::time::Instant,
}

/// One consumed router queue and its transactional channel.
struct Input {
    queue: String,
    channel: Channel,
    consumer: Consumer,
    last_delivery: Option<std::time::Instant>,
    /// Set while the input is being handed to another node: nothing more is taken from it,
    /// and once its last batch committed its channel is closed (the flag turns true) and it is
    /// consumed again as a standby.
    handing_back: Option<Arc<std::sync::atomic::AtomicBool>>,
}

impl Input {
    async fn open(
        shared: &Shared,
        connection: &Connection,
        queue: String,
    ) -> Result<Self, BusError> {
        let channel = connection.create_channel().await?;
        channel
            .basic_qos(shared.config.prefetch, BasicQosOptions::default())
            .await?;
        channel.tx_select().await?;
        let consumer = channel
            .basic_consume(
                queue.as_str().into(),
                "switchboard-router".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        Ok(Self {
            queue,
            channel,
            consumer,
            last_delivery: None,
            handing_back: None,
        })
    }
}

impl Session {
    fn take(&mut self, slot: usize, delivery: lapin::message::Delivery) -> Delivery {
        let tag = ((slot as u64) << SLOT_SHIFT) | delivery.delivery_tag;
        if let Some(input) = self.inputs.get_mut(slot) {
            input.last_delivery = Some(std::time::Instant::now());
        }
        self.bodies.insert(tag, delivery.data.clone());
        let death_reason = delivery
            .properties
            .headers()
            .as_ref()
            .and_then(|headers| headers.inner().get("x-first-death-reason"))
            .and_then(|value| match value {
                AMQPValue::LongString(text) => Some(text.to_string()),
                AMQPValue::ShortString(text) => Some(text.to_string()),
                _ => None,
            });
        Delivery {
            tag,
            body: delivery.data,
            redelivered: delivery.redelivered,
            death_reason,
        }
    }

    /// Deliveries the consumers already hold, without waiting, taken round the inputs.
    fn ready(&mut self, max: usize) -> Result<Vec<Delivery>, BusError> {
        let mut batch = Vec::new();
        let count = self.inputs.len();
        let mut idle = 0;
        while batch.len() < max && idle < count {
            let slot = self.cursor % count;
            self.cursor = self.cursor.wrapping_add(1);
            if self.inputs[slot].handing_back.is_some() {
                idle += 1;
                continue;
            }
            match self.inputs[slot].consumer.next().now_or_never() {
                Some(Some(delivery)) => {
                    idle = 0;
                    let delivery = self.take(slot, delivery?);
                    batch.push(delivery);
                }
                Some(None) => return Err(BusError::Disconnected),
                None => idle += 1,
            }
        }
        Ok(batch)
    }

    /// Waits for the next delivery on any input.
    async fn next(&mut self) -> Result<Delivery, BusError> {
        let (delivery, slot, _) =
            futures::future::select_all(self.inputs.iter_mut().map(|input| input.consumer.next()))
                .await;
        let delivery = delivery.ok_or(BusError::Disconnected)??;
        Ok(self.take(slot, delivery))
    }
}

fn split_tag(tag: u64) -> (usize, u64) {
    (
        usize::try_from(tag >> SLOT_SHIFT).unwrap_or(usize::MAX),
        tag & ((1 << SLOT_SHIFT) - 1),
    )
}

impl AmqpRouterLink {
    async fn session(&mut self) -> Result<&mut Session, BusError> {
        if self.session.is_none() {
            let never = CancellationToken::new();
            let connection =
                tokio::time::timeout(Duration::from_secs(1), self.shared.connected(&never))
                    .await
                    .map_err(|_| BusError::Disconnected)??;
            let mut inputs = Vec::new();
            for queue in self.input_queues() {
                inputs.push(Input::open(&self.shared, &connection, queue).await?);
            }
            info!(queues = inputs.len(), first = %inputs[0].queue, "Router consuming.");
            self.session = Some(Session {
                inputs,
                bodies: HashMap::new(),
                cursor: 0,
                last_rebalance: std::time::Instant::now(),
            });
        }
        self.session.as_mut().ok_or(BusError::Disconnected)
    }

    /// Consumes again, as a standby, every input whose channel was closed to hand it back.
    /// Closing the channel returned what its consumer held to the queue, in place, and made the
    /// next node's consumer the active one.
    async fn reopen_handed_back(&mut self) -> Result<(), BusError> {
        let Some(session) = self.session.as_mut() else {
            return Ok(());
        };
        for slot in 0..session.inputs.len() {
            let closed = session.inputs[slot]
                .handing_back
                .as_ref()
                .is_some_and(|closed| closed.load(std::sync::atomic::Ordering::SeqCst));
            if closed {
                let connection = self.shared.current().ok_or(BusError::Disconnected)?;
                let queue = session.inputs[slot].queue.clone();
                session.inputs[slot] = Input::open(&self.shared, &connection, queue).await?;
                metrics::counter!("switchboard_router_partitions_handed_back_total").increment(1);
            }
        }
        Ok(())
    }

    fn input_queues(&self) -> Vec<String> {
        let topology = &self.shared.topology;
        match self.shared.config.partitions {
            0 => vec![topology.router()],
            n => (0..n).map(|p| topology.router_partition(p)).collect(),
        }
    }

    /// Marks partitions beyond this node's share to be handed back: nothing more is taken from
    /// them, and [`RouterLink::commit`] closes their channels once what was taken committed.
    async fn rebalance(&mut self) -> Result<(), BusError> {
        self.reopen_handed_back().await?;
        let Some(session) = self.session.as_mut() else {
            return Ok(());
        };
        if session.inputs.len() < 2 || session.last_rebalance.elapsed() < REBALANCE_EVERY {
            return Ok(());
        }
        session.last_rebalance = std::time::Instant::now();
        let connection = self.shared.current().ok_or(BusError::Disconnected)?;
        let probe = connection.create_channel().await?;
        let mut nodes = 1u32;
        for input in &session.inputs {
            let declared = probe
                .queue_declare(
                    input.queue.as_str().into(),
                    passive(),
                    FieldTable::default(),
                )
                .await?;
            nodes = nodes.max(declared.consumer_count());
        }
        let _ = probe.close(200, "counted".into()).await;
        let partitions = self.shared.config.partitions;
        if let Some(extra) = extra_partition(&connection, &self.shared.topology, partitions).await?
        {
            // Another node runs with more partitions: say so on every count. Its extra
            // partitions take a share of the senders, which this node never reads.
            error!("{}", extra_partition_problem(&extra, partitions));
            metrics::counter!("switchboard_router_extra_partitions_seen_total").increment(1);
        }
        let total = session.inputs.len();
        let share = total.div_ceil(nodes as usize);
        let active: Vec<usize> = (0..total)
            .filter(|&slot| {
                session.inputs[slot]
                    .last_delivery
                    .is_some_and(|at| at.elapsed() < ACTIVE_WITHIN)
            })
            .collect();
        if active.len() <= share {
            return Ok(());
        }
        let yielded: Vec<usize> = active[share..].to_vec();
        for &slot in &yielded {
            session.inputs[slot].handing_back = Some(Arc::default());
        }
        info!(
            nodes,
            share,
            handing_back = yielded.len(),
            "Router hands partitions to other nodes."
        );
        metrics::counter!("switchboard_router_partitions_handed_back_total")
            .increment(yielded.len() as u64);
        Ok(())
    }
}

#[async_trait]
impl RouterLink for AmqpRouterLink {
    async fn next_batch(&mut self, max: usize) -> Result<Vec<Delivery>, BusError> {
        loop {
            self.session().await?;
            self.rebalance().await?;
            // Between batches nothing taken is uncommitted: hand back at once.
            let session = self.session().await?;
            for input in &session.inputs {
                if let Some(closed) = &input.handing_back
                    && !closed.swap(true, std::sync::atomic::Ordering::SeqCst)
                {
                    let _ = input
                        .channel
                        .close(200, "handing the partition to another node".into())
                        .await;
                }
            }
            self.reopen_handed_back().await?;
            let session = self.session().await?;
            let first = if session.inputs.len() > 1 {
                // Wake up for the next rebalance even when nothing arrives.
                let wait = REBALANCE_EVERY.saturating_sub(session.last_rebalance.elapsed());
                match tokio::time::timeout(wait, session.next()).await {
                    Ok(delivery) => delivery?,
                    Err(_) => continue,
                }
            } else {
                session.next().await?
            };
            let mut batch = vec![first];
            batch.extend(session.ready(max.saturating_sub(1))?);
            return Ok(batch);
        }
    }

    async fn ready_batch(&mut self, max: usize) -> Result<Vec<Delivery>, BusError> {
        match self.session.as_mut() {
            Some(session) => session.ready(max),
            None => Ok(Vec::new()),
        }
    }

    async fn commit(&mut self, outcomes: Vec<(u64, Outcome)>) -> Result<PendingCommit, BusError> {
        // The previous commit completed: what was taken before this batch is settled.
        self.rebalance().await?;
        let topology = self.shared.topology.clone();
        let session = self.session().await?;
        let mut last_tag: HashMap<usize, u64> = HashMap::new();
        let mut sends: Vec<Sending<'_>> = Vec::with_capacity(outcomes.len() + 1);
        for (tag, outcome) in &outcomes {
            let (slot, delivery_tag) = split_tag(*tag);
            let input = session.inputs.get(slot).ok_or(BusError::Disconnected)?;
            let channel = &input.channel;
            match outcome {
                Outcome::Assign(assignment) => {
                    sends.push(Box::pin(publish_assignment(channel, &topology, assignment)));
                }
                Outcome::Escalate { assignment, event } => {
                    sends.push(Box::pin(publish_assignment(channel, &topology, assignment)));
                    let exchange = topology.events();
                    sends.push(Box::pin(async move {
                        channel
                            .basic_publish(
                                exchange.as_str().into(),
                                event.key.as_str().into(),
                                BasicPublishOptions::default(),
                                event.body.as_bytes(),
                                event_properties(&event.event_id, &event.ty),
                            )
                            .await?;
                        Ok(())
                    }));
                }
                Outcome::Dead(reason) => {
                    let body = session.bodies.get(tag).cloned().unwrap_or_default();
                    let mut headers = FieldTable::default();
                    headers.insert(
                        REASON_HEADER.into(),
                        AMQPValue::LongString(reason.as_str().into()),
                    );
                    headers.insert(
                        "x-switchboard-queue".into(),
                        AMQPValue::LongString(input.queue.as_str().into()),
                    );
                    let properties = BasicProperties::default()
                        .with_delivery_mode(2)
                        .with_headers(headers);
                    let exchange = topology.dlx();
                    sends.push(Box::pin(async move {
                        channel
                            .basic_publish(
                                exchange.as_str().into(),
                                "".into(),
                                BasicPublishOptions::default(),
                                &body,
                                properties,
                            )
                            .await?;
                        Ok(())
                    }));
                }
                Outcome::Ack => {}
            }
            let last = last_tag.entry(slot).or_default();
            *last = (*last).max(delivery_tag);
        }
        // Per input, the batch holds a run of consecutive deliveries, each with an outcome: one
        // cumulative ack covers it (and nothing beyond it, as later deliveries carry higher
        // tags).
        let mut channels = Vec::with_capacity(last_tag.len());
        for (&slot, &last) in &last_tag {
            let channel = &session.inputs[slot].channel;
            sends.push(Box::pin(async move {
                channel
                    .basic_ack(last, BasicAckOptions { multiple: true })
                    .await?;
                Ok(())
            }));
            channels.push(channel.clone());
        }
        send_in_order(sends).await?;
        for (tag, _) in &outcomes {
            session.bodies.remove(tag);
        }
        let handing_back: Vec<(Channel, Arc<std::sync::atomic::AtomicBool>)> = session
            .inputs
            .iter()
            .filter_map(|input| Some((input.channel.clone(), input.handing_back.clone()?)))
            .collect();
        Ok(Box::pin(async move {
            for result in
                futures::future::join_all(channels.iter().map(|channel| channel.tx_commit())).await
            {
                result?;
            }
            // Nothing is taken from these any more and this batch's part of them committed.
            for (channel, closed) in handing_back {
                if !closed.swap(true, std::sync::atomic::Ordering::SeqCst) {
                    let _ = channel
                        .close(200, "handing the partition to another node".into())
                        .await;
                }
            }
            Ok(())
        }))
    }

    async fn reset(&mut self) -> Result<(), BusError> {
        if let Some(session) = self.session.take() {
            for input in session.inputs {
                let _ = input.channel.close(200, "router reset".into()).await;
            }
        }
        Ok(())
    }
}

/// A frame being sent on a channel: resolves once lapin's I/O loop wrote it.
type Sending<'a> =
    std::pin::Pin<Box<dyn Future<Output = Result<(), BusError>> + std::marker::Send + 'a>>;

/// Drives `sends` together. Each is polled first in the order given, which is when lapin
/// queues its frames, so they go out in that order; the I/O loop then writes them in one go
/// instead of one thread round trip each (measured: a batch of 128 assignments took ~10 ms
/// awaited one by one). The first error is returned once all have settled.
async fn send_in_order(mut sends: Vec<Sending<'_>>) -> Result<(), BusError> {
    let mut failure = None;
    std::future::poll_fn(|cx| {
        sends.retain_mut(|send| match send.as_mut().poll(cx) {
            std::task::Poll::Ready(result) => {
                if let Err(error) = result {
                    failure.get_or_insert(error);
                }
                false
            }
            std::task::Poll::Pending => true,
        });
        if sends.is_empty() {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    })
    .await;
    failure.map_or(Ok(()), Err)
}

/// Publishes an assignment on the router's transactional channel; an SLA becomes the message's
/// TTL, after which the agent queue dead-letters it back to the router.
async fn publish_assignment(
    channel: &Channel,
    topology: &Topology,
    assignment: &Assignment,
) -> Result<(), BusError> {
    let mut headers = FieldTable::default();
    headers.insert(
        PARTITION_KEY_HEADER.into(),
        AMQPValue::LongString(assignment.key.as_str().into()),
    );
    let mut properties = event_properties(&assignment.event_id, event_type::CONVERSATION_ASSIGNED)
        .with_priority(assignment.priority)
        .with_headers(headers);
    if let Some(ms) = assignment.expires_ms {
        properties = properties.with_expiration(ms.max(1).to_string().into());
    }
    channel
        .basic_publish(
            topology.assign().as_str().into(),
            assignment.queue.as_str().into(),
            BasicPublishOptions::default(),
            assignment.body.as_bytes(),
            properties,
        )
        .await?;
    Ok(())
}
