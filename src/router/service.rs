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
use serde_json::{Map, Value};
use switchboard_channel::envelope::event_type;
use switchboard_channel::{CloudEvent, NormalizedMessage};
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, error, info, info_span, warn};

use super::decide::{Decision, Identity, Input, Signals, decide};
use super::rules::RuleSet;
use crate::bus::{Assignment, Delivery, Outcome, RouterLink};
use crate::store::{Record, Store, StoreError};

/// Largest batch taken from the bus per commit.
pub const MAX_BATCH: usize = 128;

/// Failure points for crash tests: `SWITCHBOARD_FAILPOINT=router.after_record` makes the
/// process abort right after the store commit and before the bus commit, as a crash would.
fn failpoint(name: &str) {
    static ARMED: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    let armed = ARMED.get_or_init(|| std::env::var("SWITCHBOARD_FAILPOINT").ok());
    if armed.as_deref() == Some(name) {
        eprintln!("failpoint {name}: aborting");
        std::process::abort();
    }
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
    pub message: &'a NormalizedMessage,
    pub context: Context<'a>,
    pub explanation: &'a super::decide::Explanation,
}

#[derive(Debug, Clone, Serialize)]
pub struct Context<'a> {
    pub customer: ContextCustomer<'a>,
    pub history: Vec<Value>,
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
}

/// What became of one delivery.
struct Handled {
    outcome: Outcome,
    /// The decision key to mark published once the commit succeeded.
    publish_key: Option<(String, String)>,
    queue: Option<String>,
}

impl Router {
    /// Runs until `cancel`; the batch in hand when it fires is finished and committed.
    pub async fn run(self, mut link: impl RouterLink, cancel: CancellationToken) {
        let mut failures = 0u32;
        loop {
            let batch = tokio::select! {
                () = cancel.cancelled() => break,
                batch = link.next_batch(MAX_BATCH) => batch,
            };
            let result = match batch {
                Ok(batch) => self.handle_batch(&mut link, batch).await,
                Err(error) => Err(error.to_string()),
            };
            match result {
                Ok(()) => failures = 0,
                Err(error) => {
                    failures = failures.saturating_add(1);
                    let delay = Duration::from_millis(100 * u64::from(failures.min(50)));
                    warn!(%error, retry_in = ?delay, "Router could not complete a batch; its messages will be redelivered.");
                    let _ = link.reset().await;
                    tokio::select! {
                        () = cancel.cancelled() => break,
                        () = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
        let _ = link.reset().await;
        info!("Router stopped.");
    }

    async fn handle_batch(
        &self,
        link: &mut impl RouterLink,
        batch: Vec<Delivery>,
    ) -> Result<(), String> {
        let started = Instant::now();
        let mut outcomes = Vec::with_capacity(batch.len());
        let mut publish_keys = Vec::new();
        let mut queues = Vec::new();
        let mut in_batch = HashSet::new();
        let mut store_error = None;
        for delivery in &batch {
            match self.handle(delivery, &mut in_batch).await {
                Ok(handled) => {
                    outcomes.push((delivery.tag, handled.outcome));
                    publish_keys.extend(handled.publish_key);
                    queues.extend(handled.queue);
                }
                Err(error) => {
                    // Leave this and the remaining deliveries unacknowledged: they come back.
                    store_error = Some(error);
                    break;
                }
            }
        }
        failpoint("router.after_record");
        if !outcomes.is_empty() {
            link.commit(outcomes).await.map_err(|e| e.to_string())?;
            let elapsed = started.elapsed().as_secs_f64();
            for queue in queues {
                metrics::counter!("switchboard_assignments_total", "queue" => queue).increment(1);
                metrics::histogram!("switchboard_routing_latency_seconds").record(elapsed);
            }
            if let Err(error) = self.store.mark_published(&publish_keys).await {
                // Harmless: an unmarked decision is only republished on a redelivery, and a
                // committed message is never redelivered.
                warn!(%error, "Could not mark decisions published.");
            }
        }
        match store_error {
            Some(error) => Err(format!("store: {error}")),
            None => Ok(()),
        }
    }

    async fn handle(
        &self,
        delivery: &Delivery,
        in_batch: &mut HashSet<(String, String)>,
    ) -> Result<Handled, StoreError> {
        let event: CloudEvent<NormalizedMessage> = match serde_json::from_slice(&delivery.body) {
            Ok(event) => event,
            Err(error) => return Ok(dead(format!("not a normalized message event: {error}"))),
        };
        if event.ty != event_type::MESSAGE_RECEIVED {
            return Ok(dead(format!("unexpected event type `{}`", event.ty)));
        }
        let message = event.data;
        let key = (message.channel.id.clone(), message.external_id.clone());
        let span =
            info_span!("route", channel = %message.channel.id, message_id = %message.message_id);
        async {
            if !in_batch.insert(key.clone()) {
                debug!("Duplicate within the batch; acknowledged.");
                return Ok(ack());
            }
            if let Some(stored) = self.store.decision(&key.0, &key.1).await? {
                if stored.published || !delivery.redelivered {
                    debug!(published = stored.published, "Duplicate of a routed message; acknowledged.");
                    metrics::counter!("switchboard_duplicates_total").increment(1);
                    return Ok(ack());
                }
                info!(queue = %stored.queue, "Redelivered before its commit; publishing the recorded assignment.");
                return Ok(Handled {
                    outcome: Outcome::Assign(Assignment {
                        queue: stored.queue.clone(),
                        priority: stored.priority,
                        event_id: assignment_event_id(&message),
                        body: stored.assignment,
                    }),
                    publish_key: Some(key),
                    queue: Some(stored.queue),
                });
            }
            let now = OffsetDateTime::now_utc();
            let now_ms = i64::try_from(now.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX);
            let mut resolved = self.store.resolve(&message, now_ms).await?;
            let signals = Signals::from_message(&message);
            let rules = self.rules.load();
            let decision = decide(
                &rules,
                &Input {
                    message: &message,
                    customer: &resolved.customer,
                    conversation: &resolved.conversation,
                    signals: &signals,
                },
                &|_| 0,
            );
            let body = assignment_json(&message, &resolved.customer, &resolved.conversation.id, &decision);
            let attributes = std::mem::take(&mut resolved.customer.attributes);
            let record = Record {
                customer_id: resolved.customer.id.clone(),
                attributes,
                conversation_id: resolved.conversation.id.clone(),
                queue: decision.queue.clone(),
                urgency: decision.urgency,
                priority: decision.priority,
                assignment: body.clone(),
                message: message.clone(),
            };
            self.store.record(std::slice::from_ref(&record), now_ms).await?;
            info!(
                conversation_id = %resolved.conversation.id,
                queue = %decision.queue,
                urgency = decision.urgency,
                "Conversation assigned."
            );
            Ok(Handled {
                outcome: Outcome::Assign(Assignment {
                    queue: decision.queue.clone(),
                    priority: decision.priority,
                    event_id: assignment_event_id(&message),
                    body,
                }),
                publish_key: Some(key),
                queue: Some(decision.queue),
            })
        }
        .instrument(span)
        .await
    }
}

fn ack() -> Handled {
    Handled {
        outcome: Outcome::Ack,
        publish_key: None,
        queue: None,
    }
}

fn dead(reason: String) -> Handled {
    error!(%reason, "Poison message moved to the dead queue.");
    metrics::counter!("switchboard_dead_letters_total").increment(1);
    Handled {
        outcome: Outcome::Dead(reason),
        publish_key: None,
        queue: None,
    }
}

/// Assignment event ids derive from the message: a republished assignment keeps its id.
fn assignment_event_id(message: &NormalizedMessage) -> String {
    format!("assign-{}", message.message_id)
}

/// The assignment CloudEvent as JSON.
pub fn assignment_json(
    message: &NormalizedMessage,
    customer: &super::decide::CustomerView,
    conversation_id: &str,
    decision: &Decision,
) -> String {
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
        message,
        context: Context {
            customer: ContextCustomer {
                attributes: &customer.attributes,
                identities: &customer.identities,
            },
            history: Vec::new(),
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
