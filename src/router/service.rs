//! The router service: takes batches from the router queue, resolves customer and conversation,
//! decides, records the decision, then publishes the assignments and acknowledges the batch in
//! one bus commit.
//!
//! Exactly one assignment per message, even across crashes and retried webhooks:
//! - a decision is recorded (keyed by channel id + external id) before anything is published;
//! - a message whose decision exists and was published is only acknowledged;
//! - a message whose decision exists but is not marked published is published again only when
//!   the bus says it is a redelivery (the earlier attempt's commit never happened); a fresh copy
//!   (a retried webhook) is acknowledged, because the original is either committed or will be
//!   redelivered.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use serde::Serialize;
use serde_json::value::RawValue;
use serde_json::{Map, Value};
use switchboard_channel::envelope::event_type;
use switchboard_channel::{CloudEvent, NormalizedMessage};
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, info_span, warn};

use super::decide::{Decision, Identity, Input, decide};
use super::rules::RuleSet;
use crate::bus::{Assignment, Delivery, Outcome, RouterLink};
use crate::store::{Resolved, RouteOutcome, Routed, Store};

/// Largest batch taken from the bus per commit.
pub const MAX_BATCH: usize = 256;

/// Failure points for crash tests: `SWITCHBOARD_FAILPOINT=router.after_record` makes the
/// process abort right after the store commit and before the bus commit, as a crash would.
/// Test-only: nothing sets the variable in production.
fn failpoint(name: &str) {
    if failpoint_armed(name) {
        eprintln!("failpoint {name}: aborting");
        std::process::abort();
    }
}

/// Whether `SWITCHBOARD_FAILPOINT` names this failure point. `router.paused` keeps the router
/// from consuming at all, as a stalled router would (messages pile up, published and unrouted).
fn failpoint_armed(name: &str) -> bool {
    static ARMED: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    let armed = ARMED.get_or_init(|| std::env::var("SWITCHBOARD_FAILPOINT").ok());
    armed.as_deref() == Some(name)
}

/// The `data` of `switchboard.conversation.assigned`.
#[derive(Debug, Clone, Serialize)]
pub struct AssignmentData<'a> {
    pub conversation_id: &'a str,
    pub customer_id: &'a str,
    pub queue: &'a str,
    pub agent_id: Option<String>,
    pub urgency: u8,
    pub priority: u8,
    pub skills: &'a [String],
    pub tags: &'a [String],
    pub language: Option<&'a str>,
    /// The queue was closed when this was decided (see `explanation.business_hours`).
    pub outside_hours: bool,
    /// The normalized message, as JSON.
    pub message: &'a RawValue,
    pub context: Context<'a>,
    pub explanation: &'a super::decide::Explanation,
}

#[derive(Debug, Clone, Serialize)]
pub struct Context<'a> {
    pub customer: ContextCustomer<'a>,
    pub history: &'a [Arc<crate::store::HistoryEntry>],
    /// When the conversation opened (RFC 3339).
    pub open_since: String,
    pub channels_used: &'a [String],
    pub previous_agent: Option<&'a str>,
    pub contacts_last_24h: u32,
}

#[derive(Debug, Clone, Serialize)]
pub struct ContextCustomer<'a> {
    pub attributes: &'a Map<String, Value>,
    pub identities: &'a [Identity],
}

pub struct Router {
    pub rules: Arc<ArcSwap<RuleSet>>,
    pub store: Arc<dyn Store>,
    /// Waiting assignments per agent queue, sampled by the bus: ties go to the lighter queue.
    pub loads: crate::bus::QueueLoads,
}

impl Router {
    /// Runs the router on a thread of its own with a single-threaded runtime, and resolves when
    /// it stopped. The router is one sequential loop of short store round trips; on its own
    /// thread each round trip avoids a cross-thread wake-up, which on a small machine costs
    /// more than the query (measured: ~90 µs vs ~10 µs per SQLite statement).
    pub async fn run_on_own_thread(
        self,
        link: impl RouterLink + 'static,
        cancel: CancellationToken,
    ) {
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        let spawned = std::thread::Builder::new()
            .name("switchboard-router".to_owned())
            .spawn(move || {
                match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime.block_on(self.run(link, cancel)),
                    Err(error) => error!(%error, "Cannot start the router's runtime."),
                }
                let _ = done_tx.send(());
            });
        match spawned {
            Ok(_) => {
                let _ = done_rx.await;
            }
            Err(error) => error!(%error, "Cannot start the router thread."),
        }
    }

    /// Runs until `cancel`; the batch in hand when it fires is finished and committed.
    ///
    /// Batches are pipelined: while the bus commits batch N, batch N+1 (whatever the consumer
    /// already holds) is decided and recorded in the store. Its publish waits for N's commit.
    ///
    /// A store failure keeps the batch in hand and retries it with backoff: giving the
    /// deliveries back would count against the queue's delivery limit, and an outage would turn
    /// healthy messages into dead letters. A bus failure drops the session; the bus redelivers.
    pub async fn run(self, mut link: impl RouterLink, cancel: CancellationToken) {
        if failpoint_armed("router.paused") {
            warn!("Failpoint router.paused: the router does not consume.");
            cancel.cancelled().await;
            return;
        }
        let mut bus_failures = 0u32;
        let mut carried: Option<Carry> = None;
        // Committed assignments not yet marked published in the store (see `commit`).
        let mut unmarked: Vec<(String, String)> = Vec::new();
        loop {
            let batch = match carried.take() {
                Some(Carry::Prepared(prepared)) => Ok(Carry::Prepared(prepared)),
                Some(Carry::Batch(batch)) => Ok(Carry::Batch(batch)),
                None => tokio::select! {
                    () = cancel.cancelled() => break,
                    batch = link.next_batch(MAX_BATCH) => batch.map(Carry::Batch),
                },
            };
            let prepared = match batch {
                Ok(Carry::Prepared(prepared)) => prepared,
                Ok(Carry::Batch(batch)) => match self.prepare_until_stored(&batch, &cancel).await {
                    Some(prepared) => prepared,
                    None => break,
                },
                Err(error) => {
                    if !backoff(&mut bus_failures, &error.to_string(), &mut link, &cancel).await {
                        break;
                    }
                    continue;
                }
            };
            match self
                .commit(&mut link, prepared, &mut unmarked, &cancel)
                .await
            {
                Ok(next) => {
                    bus_failures = 0;
                    carried = next;
                }
                Err(error) => {
                    if !backoff(&mut bus_failures, &error, &mut link, &cancel).await {
                        break;
                    }
                }
            }
        }
        self.mark_published(&mut unmarked).await;
        let _ = link.reset().await;
        info!("Router stopped.");
    }

    /// Prepares a batch, retrying store failures with backoff; `None` once shutting down.
    async fn prepare_until_stored(
        &self,
        batch: &[Delivery],
        cancel: &CancellationToken,
    ) -> Option<Prepared> {
        let mut failures = 0u32;
        loop {
            match self.prepare(batch, &[]).await {
                Ok(prepared) => return Some(prepared),
                Err(error) => {
                    failures = failures.saturating_add(1);
                    let delay = Duration::from_millis(100 * u64::from(failures.min(50)));
                    warn!(%error, retry_in = ?delay, "Router cannot record its batch; holding it and retrying.");
                    metrics::counter!("switchboard_router_store_failures_total").increment(1);
                    tokio::select! {
                        () = cancel.cancelled() => return None,
                        () = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
    }

    /// Commits a prepared batch; meanwhile takes the next one if the consumer holds any (not
    /// once shutting down) and prepares it. Returns what to continue with. An error is a bus
    /// error: the batch in flight was not committed.
    ///
    /// A committed batch's decisions are marked published in the store in the transaction of
    /// the batch prepared while the next commit is in flight (their keys wait in `unmarked`),
    /// or at once when the input is idle: off the critical path (measured: ~8 ms per batch of
    /// 256 on it), and no transaction of their own (~1 ms of the store's time per batch).
    async fn commit(
        &self,
        link: &mut impl RouterLink,
        prepared: Prepared,
        unmarked: &mut Vec<(String, String)>,
        cancel: &CancellationToken,
    ) -> Result<Option<Carry>, String> {
        failpoint("router.after_record");
        let Prepared {
            started,
            outcomes,
            publish_keys,
            queues,
        } = prepared;
        let pending = link.commit(outcomes).await.map_err(|e| e.to_string())?;
        let next = if cancel.is_cancelled() {
            Vec::new()
        } else {
            link.ready_batch(MAX_BATCH)
                .await
                .map_err(|e| e.to_string())?
        };
        let (committed, next) = if next.is_empty() {
            (pending.await, None)
        } else {
            let (committed, prepared) = tokio::join!(pending, async {
                let prepared = self.prepare(&next, unmarked).await;
                if prepared.is_ok() {
                    unmarked.clear();
                }
                prepared
            });
            let carry = match prepared {
                Ok(prepared) => Carry::Prepared(prepared),
                // Retried at the top of the loop, with backoff.
                Err(_) => Carry::Batch(next),
            };
            (committed, Some(carry))
        };
        committed.map_err(|e| e.to_string())?;
        let elapsed = started.elapsed().as_secs_f64();
        for queue in queues {
            metrics::counter!("switchboard_assignments_total", "queue" => queue).increment(1);
            metrics::histogram!("switchboard_routing_latency_seconds").record(elapsed);
        }
        unmarked.extend(publish_keys);
        if next.is_none() {
            self.mark_published(unmarked).await;
        }
        Ok(next)
    }

    /// Marks committed assignments published in the store.
    async fn mark_published(&self, keys: &mut Vec<(String, String)>) {
        if keys.is_empty() {
            return;
        }
        if let Err(error) = self.store.mark_published(keys).await {
            // Harmless: an unmarked decision is only republished on a redelivery, and a
            // committed message is never redelivered.
            warn!(%error, "Could not mark decisions published.");
        }
        keys.clear();
    }

    /// Decides and records a batch in one store transaction; returns what to publish and
    /// acknowledge. A failure leaves the whole batch unacknowledged.
    /// `published`: keys of committed assignments to mark in the same store transaction; they
    /// are marked when this returns `Ok`.
    async fn prepare(
        &self,
        batch: &[Delivery],
        published: &[(String, String)],
    ) -> Result<Prepared, String> {
        let started = Instant::now();
        let mut outcomes: Vec<Option<Outcome>> = vec![None; batch.len()];
        let mut to_route = Vec::new();
        let mut positions = Vec::new();
        let mut keys: HashSet<(String, String), foldhash::fast::RandomState> =
            HashSet::with_capacity_and_hasher(batch.len(), Default::default());
        let rules = self.rules.load_full();
        for (index, delivery) in batch.iter().enumerate() {
            if let Some(reason) = delivery
                .death_reason
                .as_deref()
                .filter(|_| is_assignment(&delivery.body))
            {
                // An assignment handed back by an agent queue (its SLA passed). A dead-lettered
                // inbound message replayed from the dead queue keeps its death headers and
                // takes the normal path.
                outcomes[index] = Some(
                    super::overflow::returned(
                        &rules,
                        &delivery.body,
                        reason,
                        OffsetDateTime::now_utc(),
                    )
                    .unwrap_or_else(dead),
                );
                continue;
            }
            match parse(delivery) {
                Err(reason) => outcomes[index] = Some(dead(reason)),
                Ok(message) => {
                    if keys.insert((message.channel.id.clone(), message.external_id.clone())) {
                        positions.push(index);
                        to_route.push(message);
                    } else {
                        debug!(message_id = %message.message_id, "Duplicate within the batch; acknowledged.");
                        outcomes[index] = Some(Outcome::Ack);
                    }
                }
            }
        }

        let now_ms = i64::try_from(OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000)
            .unwrap_or(i64::MAX);
        let decide_one = |message: &NormalizedMessage, envelope: &RawValue, resolved: &Resolved| {
            route(&rules, &self.loads, message, envelope, resolved)
        };
        let routed = if to_route.is_empty() {
            self.store
                .mark_published(published)
                .await
                .map_err(|error| format!("store: {error}"))?;
            Vec::new()
        } else {
            self.store
                .route_batch(&to_route, now_ms, published, &decide_one)
                .await
                .map_err(|error| format!("store: {error}"))?
        };

        let mut publish_keys = Vec::new();
        let mut queues = Vec::new();
        for ((index, message), result) in positions.into_iter().zip(&to_route).zip(routed) {
            let delivery = &batch[index];
            let _span = info_span!("route", channel = %message.channel.id, message_id = %message.message_id).entered();
            let assignment = match result {
                RouteOutcome::New {
                    queue,
                    priority,
                    assignment,
                } => Some((queue, priority, assignment)),
                RouteOutcome::Existing(stored) if stored.published || !delivery.redelivered => {
                    debug!(
                        published = stored.published,
                        "Duplicate of a routed message; acknowledged."
                    );
                    metrics::counter!("switchboard_duplicates_total").increment(1);
                    None
                }
                RouteOutcome::Existing(stored) => {
                    info!(queue = %stored.queue, "Redelivered before its commit; publishing the recorded assignment.");
                    Some((stored.queue, stored.priority, stored.assignment))
                }
                RouteOutcome::Unreadable(reason) => {
                    outcomes[index] = Some(dead(format!(
                        "its recorded routing decision cannot be read back ({reason}); not routed again"
                    )));
                    continue;
                }
            };
            outcomes[index] = Some(match assignment {
                Some((queue, priority, body)) => {
                    publish_keys.push((message.channel.id.clone(), message.external_id.clone()));
                    queues.push(queue.clone());
                    Outcome::Assign(Assignment {
                        expires_ms: super::overflow::expiry_ms(&rules, &queue),
                        queue,
                        priority,
                        event_id: assignment_event_id(message),
                        body,
                        key: crate::bus::partition_key(&message.sender),
                    })
                }
                None => Outcome::Ack,
            });
        }
        let outcomes = batch
            .iter()
            .zip(outcomes)
            .map(|(delivery, outcome)| (delivery.tag, outcome.unwrap_or(Outcome::Ack)))
            .collect();
        Ok(Prepared {
            started,
            outcomes,
            publish_keys,
            queues,
        })
    }
}

/// What the loop continues with: a batch taken, or one already decided and recorded.
enum Carry {
    Batch(Vec<Delivery>),
    Prepared(Prepared),
}

/// After a bus failure: drop the session (the bus redelivers its messages), wait, go on.
/// False once shutting down.
async fn backoff(
    failures: &mut u32,
    error: &str,
    link: &mut impl RouterLink,
    cancel: &CancellationToken,
) -> bool {
    *failures = failures.saturating_add(1);
    let delay = Duration::from_millis(100 * u64::from((*failures).min(50)));
    // The first failure of a run of them, then every 50th (a broker that stays away, or that
    // was never reached, would otherwise fill the log every 5 s).
    if *failures == 1 || failures.is_multiple_of(50) {
        warn!(%error, failures = *failures, retry_in = ?delay, "Router has no bus session; retrying. Messages it held unacknowledged are redelivered.");
    } else {
        debug!(%error, failures = *failures, retry_in = ?delay, "Router still has no bus session.");
    }
    let _ = link.reset().await;
    tokio::select! {
        () = cancel.cancelled() => false,
        () = tokio::time::sleep(delay) => true,
    }
}

/// A batch decided and recorded, waiting for its bus commit.
struct Prepared {
    started: Instant,
    outcomes: Vec<(u64, Outcome)>,
    publish_keys: Vec<(String, String)>,
    queues: Vec<String>,
}

/// Whether `body` is an assignment event (only asked of dead-lettered deliveries).
fn is_assignment(body: &[u8]) -> bool {
    #[derive(serde::Deserialize)]
    struct Head {
        #[serde(rename = "type")]
        ty: String,
    }
    serde_json::from_slice::<Head>(body)
        .is_ok_and(|head| head.ty == event_type::CONVERSATION_ASSIGNED)
}

fn parse(delivery: &Delivery) -> Result<NormalizedMessage, String> {
    let event: CloudEvent<NormalizedMessage> = serde_json::from_slice(&delivery.body)
        .map_err(|error| format!("not a normalized message event: {error}"))?;
    if event.ty != event_type::MESSAGE_RECEIVED {
        return Err(format!("unexpected event type `{}`", event.ty));
    }
    if let Some(field) = event.data.nul_field() {
        return Err(format!(
            "`{field}` contains U+0000 (NUL), which the store cannot keep"
        ));
    }
    Ok(event.data)
}

/// The pure part of routing one message: signals, decision, assignment JSON.
fn route(
    rules: &RuleSet,
    loads: &crate::bus::QueueLoads,
    message: &NormalizedMessage,
    envelope: &RawValue,
    resolved: &Resolved,
) -> Routed {
    let signals = rules
        .model
        .compute(message, resolved.customer.contacts_last_24h);
    let decision = decide(
        rules,
        &Input {
            now: OffsetDateTime::now_utc(),
            message,
            customer: &resolved.customer,
            conversation: &resolved.conversation,
            signals: &signals,
        },
        &|queue| loads.get(queue),
    );
    for error in &decision.explanation.errors {
        debug!(rule = %error.id, error = %error.error, "Rule failed to evaluate; counted as not matched.");
        metrics::counter!("switchboard_rule_errors_total", "rule" => error.id.clone()).increment(1);
    }
    info!(
        conversation_id = %resolved.conversation.id,
        queue = %decision.queue,
        urgency = decision.urgency,
        "Conversation assigned."
    );
    Routed {
        assignment: assignment_json(message, envelope, resolved, &decision),
        queue: decision.queue,
        urgency: decision.urgency,
        priority: decision.priority,
    }
}

fn dead(reason: String) -> Outcome {
    error!(%reason, "Poison message moved to the dead queue.");
    metrics::counter!("switchboard_dead_letters_total").increment(1);
    Outcome::Dead(reason)
}

/// Assignment event ids derive from the message: a republished assignment keeps its id.
fn assignment_event_id(message: &NormalizedMessage) -> String {
    format!("assign-{}", message.message_id)
}

/// The assignment CloudEvent as JSON; `envelope` is `message` as JSON.
pub fn assignment_json(
    message: &NormalizedMessage,
    envelope: &RawValue,
    resolved: &Resolved,
    decision: &Decision,
) -> String {
    let customer = &resolved.customer;
    let conversation_id = resolved.conversation.id.as_str();
    let open_since = OffsetDateTime::from_unix_timestamp_nanos(
        i128::from(resolved.conversation_opened_at) * 1_000_000,
    )
    .ok()
    .and_then(|t| {
        t.format(&time::format_description::well_known::Rfc3339)
            .ok()
    })
    .unwrap_or_default();
    let data = AssignmentData {
        conversation_id,
        customer_id: &customer.id,
        queue: &decision.queue,
        agent_id: None,
        urgency: decision.urgency,
        priority: decision.priority,
        skills: &decision.skills,
        tags: &decision.tags,
        language: decision.language.as_deref(),
        outside_hours: decision.outside_hours,
        message: envelope,
        context: Context {
            customer: ContextCustomer {
                attributes: &customer.attributes,
                identities: &customer.identities,
            },
            history: &resolved.history,
            open_since,
            channels_used: &customer.channels_used,
            previous_agent: customer.previous_agent.as_deref(),
            contacts_last_24h: customer.contacts_last_24h,
        },
        explanation: &decision.explanation,
    };
    let mut event = CloudEvent::new(
        assignment_event_id(message),
        "/router",
        event_type::CONVERSATION_ASSIGNED,
        data,
    );
    event.subject = Some(conversation_id.to_owned());
    // Serializing plain data structures cannot fail.
    serde_json::to_string(&event).expect("assignment serializes")
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchboard_channel::{ChannelRef, Sender};

    fn message(external_id: &str) -> NormalizedMessage {
        NormalizedMessage {
            message_id: NormalizedMessage::stable_id("chat", external_id),
            channel: ChannelRef {
                id: "chat".into(),
                kind: "webchat".into(),
            },
            external_id: external_id.into(),
            thread_key: None,
            sender: Sender {
                kind: "webchat".into(),
                address: "visitor-1".into(),
                name: None,
            },
            subject: None,
            text: "Where is my order?".into(),
            attachments: vec![],
            received_at: OffsetDateTime::now_utc(),
            auto_submitted: false,
            metadata: Default::default(),
        }
    }

    fn delivery(tag: u64, external_id: &str) -> Delivery {
        Delivery {
            tag,
            body: serde_json::to_vec(&CloudEvent::message_received(message(external_id))).unwrap(),
            redelivered: true,
            death_reason: None,
        }
    }

    #[tokio::test]
    async fn a_message_whose_recorded_decision_is_corrupt_is_dead_lettered_alone() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("t.db").display());
        let store = crate::store::SqliteStore::open(&url).await.unwrap();
        // A recorded decision whose packed assignment is no LZ4 block.
        sqlx::query(
            "INSERT INTO decisions (channel_id, external_id, conversation_id, queue, urgency,
                                    priority, assignment, decided_at)
             VALUES ('chat', 'broken', 'c1', 'general', 0, 1, x'40000000f001', 0)",
        )
        .execute(store.pool())
        .await
        .unwrap();
        let rules_dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("routing-rules");
        let router = Router {
            rules: Arc::new(ArcSwap::from_pointee(
                RuleSet::load_dir(&rules_dir).unwrap(),
            )),
            store: Arc::new(store),
            loads: Default::default(),
        };
        let prepared = router
            .prepare(&[delivery(1, "broken"), delivery(2, "fine")], &[])
            .await
            .unwrap();
        match &prepared.outcomes[..] {
            [(1, Outcome::Dead(reason)), (2, Outcome::Assign(assignment))] => {
                assert!(
                    reason.contains("recorded routing decision cannot be read back"),
                    "{reason}"
                );
                assert!(
                    reason.contains("a stored assignment is corrupt"),
                    "{reason}"
                );
                assert_eq!(assignment.queue, "general");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            prepared.publish_keys,
            [("chat".to_owned(), "fine".to_owned())]
        );
    }

    /// The message and the history entries go into the assignment as JSON made once (by the
    /// store, when each was recorded); the result is the same document as serializing them in
    /// place, escapes included.
    #[test]
    fn an_assignment_embeds_the_recorded_json_of_its_message_and_history() {
        let mut message = message("m-1");
        message.text = "Quote \" and\nnew line, caf\u{e9} \u{1F600}".into();
        let earlier = [
            ("email", "Re: \"invoice\"\t#42", "2026-11-23T08:00:00Z"),
            ("webchat", "\u{7}bell", "2026-11-23T08:01:00Z"),
        ];
        let resolved = Resolved {
            customer: Default::default(),
            conversation: Default::default(),
            history: earlier
                .iter()
                .map(|(channel, text, at)| {
                    Arc::new(crate::store::HistoryEntry::new(channel, text, at))
                })
                .collect(),
            conversation_opened_at: 0,
        };
        let rules_dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("routing-rules");
        let rules = RuleSet::load_dir(&rules_dir).unwrap();
        let envelope = serde_json::value::to_raw_value(&message).unwrap();
        let routed = route(&rules, &Default::default(), &message, &envelope, &resolved);
        let event: Value = serde_json::from_str(&routed.assignment).unwrap();
        assert_eq!(
            event["data"]["message"],
            serde_json::to_value(&message).unwrap()
        );
        let history: Vec<Value> = earlier
            .iter()
            .map(|(channel, text, at)| serde_json::json!({"channel": channel, "text": text, "at": at}))
            .collect();
        assert_eq!(event["data"]["context"]["history"], Value::from(history));
    }
}
