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
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
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
use tracing::{debug, info, warn};

use super::{
    Assignment, BusError, Delivery, Outcome, PendingCommit, REASON_HEADER, RouterLink, Topology,
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
        channel.basic_qos(1, BasicQosOptions::default()).await?;
        let lease_id = uuid::Uuid::new_v4().to_string();
        let mut consumer = channel
            .basic_consume(
                self.shared.topology.agent_queue(queue).as_str().into(),
                lease_id.as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let delivery = tokio::select! {
            () = cancel.cancelled() => None,
            () = tokio::time::sleep(wait) => None,
            delivery = consumer.next() => delivery,
        };
        let _ = channel
            .basic_cancel(lease_id.as_str().into(), Default::default())
            .await;
        let delivery = match delivery {
            Some(delivery) => delivery?,
            None => {
                let _ = channel.close(200, "nothing to claim".into()).await;
                return Ok(None);
            }
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
                    QueueDeclareOptions {
                        passive: true,
                        ..QueueDeclareOptions::default()
                    },
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
        let properties = event_properties(&event.id, event_type::MESSAGE_RECEIVED);
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
    let mut channel = declare_topology(
        &connection,
        &channel,
        &shared.topology,
        shared.config.delivery_limit,
    )
    .await?;
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
    delivery_limit: u32,
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
        AMQPValue::LongInt(i32::try_from(delivery_limit).unwrap_or(i32::MAX)),
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
                .queue_declare(
                    topology.router().as_str().into(),
                    QueueDeclareOptions {
                        passive: true,
                        ..QueueDeclareOptions::default()
                    },
                    none(),
                )
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
                .queue_declare(
                    name.as_str().into(),
                    QueueDeclareOptions {
                        passive: true,
                        ..QueueDeclareOptions::default()
                    },
                    FieldTable::default(),
                )
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

/// The router's link: one channel in transaction mode that consumes `<p>.router` and publishes
/// assignments, so `tx.commit` makes "publish the assignments + ack the inputs" one step.
pub struct AmqpRouterLink {
    shared: Arc<Shared>,
    session: Option<Session>,
}

struct Session {
    channel: Channel,
    consumer: Consumer,
    /// Bodies of the deliveries in hand, for dead-lettering.
    bodies: HashMap<u64, Vec<u8>>,
}

impl Session {
    fn take(&mut self, delivery: lapin::message::Delivery) -> Delivery {
        self.bodies
            .insert(delivery.delivery_tag, delivery.data.clone());
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
            tag: delivery.delivery_tag,
            body: delivery.data,
            redelivered: delivery.redelivered,
            death_reason,
        }
    }

    /// Deliveries the consumer already holds, without waiting.
    fn ready(&mut self, max: usize) -> Result<Vec<Delivery>, BusError> {
        let mut batch = Vec::new();
        while batch.len() < max {
            match self.consumer.next().now_or_never() {
                Some(Some(delivery)) => {
                    let delivery = self.take(delivery?);
                    batch.push(delivery);
                }
                Some(None) => return Err(BusError::Disconnected),
                None => break,
            }
        }
        Ok(batch)
    }
}

impl AmqpRouterLink {
    async fn session(&mut self) -> Result<&mut Session, BusError> {
        if self.session.is_none() {
            let never = CancellationToken::new();
            let connection =
                tokio::time::timeout(Duration::from_secs(1), self.shared.connected(&never))
                    .await
                    .map_err(|_| BusError::Disconnected)??;
            let channel = connection.create_channel().await?;
            channel
                .basic_qos(self.shared.config.prefetch, BasicQosOptions::default())
                .await?;
            channel.tx_select().await?;
            let consumer = channel
                .basic_consume(
                    self.shared.topology.router().as_str().into(),
                    "switchboard-router".into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await?;
            info!(queue = %self.shared.topology.router(), "Router consuming.");
            self.session = Some(Session {
                channel,
                consumer,
                bodies: HashMap::new(),
            });
        }
        self.session.as_mut().ok_or(BusError::Disconnected)
    }
}

#[async_trait]
impl RouterLink for AmqpRouterLink {
    async fn next_batch(&mut self, max: usize) -> Result<Vec<Delivery>, BusError> {
        let session = self.session().await?;
        let first = session
            .consumer
            .next()
            .await
            .ok_or(BusError::Disconnected)??;
        let mut batch = vec![session.take(first)];
        batch.extend(session.ready(max.saturating_sub(1))?);
        Ok(batch)
    }

    async fn ready_batch(&mut self, max: usize) -> Result<Vec<Delivery>, BusError> {
        match self.session.as_mut() {
            Some(session) => session.ready(max),
            None => Ok(Vec::new()),
        }
    }

    async fn commit(&mut self, outcomes: Vec<(u64, Outcome)>) -> Result<PendingCommit, BusError> {
        let topology = self.shared.topology.clone();
        let session = self.session().await?;
        for (tag, outcome) in &outcomes {
            match outcome {
                Outcome::Assign(assignment) => {
                    publish_assignment(&session.channel, &topology, assignment).await?;
                }
                Outcome::Escalate { assignment, event } => {
                    publish_assignment(&session.channel, &topology, assignment).await?;
                    session
                        .channel
                        .basic_publish(
                            topology.events().as_str().into(),
                            event.key.as_str().into(),
                            BasicPublishOptions::default(),
                            event.body.as_bytes(),
                            event_properties(&event.event_id, &event.ty),
                        )
                        .await?;
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
                        AMQPValue::LongString(topology.router().as_str().into()),
                    );
                    let properties = BasicProperties::default()
                        .with_delivery_mode(2)
                        .with_headers(headers);
                    session
                        .channel
                        .basic_publish(
                            topology.dlx().as_str().into(),
                            "".into(),
                            BasicPublishOptions::default(),
                            &body,
                            properties,
                        )
                        .await?;
                }
                Outcome::Ack => {}
            }
        }
        // A batch is a run of consecutive deliveries, each with an outcome: one cumulative ack
        // covers it (and nothing beyond it, as later deliveries carry higher tags).
        if let Some(last) = outcomes.iter().map(|(tag, _)| *tag).max() {
            session
                .channel
                .basic_ack(last, BasicAckOptions { multiple: true })
                .await?;
        }
        for (tag, _) in &outcomes {
            session.bodies.remove(tag);
        }
        let channel = session.channel.clone();
        Ok(Box::pin(async move { Ok(channel.tx_commit().await?) }))
    }

    async fn reset(&mut self) -> Result<(), BusError> {
        if let Some(session) = self.session.take() {
            let _ = session.channel.close(200, "router reset".into()).await;
        }
        Ok(())
    }
}

/// Publishes an assignment on the router's transactional channel; an SLA becomes the message's
/// TTL, after which the agent queue dead-letters it back to the router.
async fn publish_assignment(
    channel: &Channel,
    topology: &Topology,
    assignment: &Assignment,
) -> Result<(), BusError> {
    let mut properties = event_properties(&assignment.event_id, event_type::CONVERSATION_ASSIGNED)
        .with_priority(assignment.priority);
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
