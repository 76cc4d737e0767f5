//! The backend-independent half of [`Store::route_batch`](super::Store::route_batch).
//!
//! A backend reads what the batch needs in bulk and hands each row to a [`Batch`]; the batch
//! then decides its messages in order against that in-memory view (so a later message sees an
//! earlier one's customer, conversation and history) and returns [`Decided`]: the outcomes and
//! the rows the backend writes back in bulk. Only the SQL differs between backends.

use std::collections::VecDeque;
use std::collections::hash_map::Entry;
use std::sync::Arc;

use serde_json::{Map, Value};
use switchboard_channel::NormalizedMessage;
use uuid::Uuid;

use super::{
    DecideFn, HistoryEntry, Resolved, RouteOutcome, StoreError, StoredDecision, merged_attributes,
};
use crate::router::decide::{ConversationView, CustomerView, Identity};

/// The batch's maps: a few hundred entries that live for one batch, hashed with foldhash
/// instead of SipHash (measured: hashing was ~2 % of the router's instructions). The keys come
/// from messages, but a map this small and short-lived is no target for hash flooding.
pub(super) type HashMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
pub(super) type HashSet<K> = std::collections::HashSet<K, foldhash::fast::RandomState>;

pub(super) const DAY_MS: i64 = 24 * 60 * 60 * 1000;

/// One batch of messages between the backend's bulk reads and its bulk writes.
pub(super) struct Batch<'m> {
    messages: &'m [NormalizedMessage],
    /// Per message: its identities, the sender first (see [`identities_of`]).
    identities: Vec<Vec<(String, String)>>,
    /// Per message, per identity: the adapter marked it verified (the channel vouches for it).
    verified: Vec<Vec<bool>>,
    now_ms: i64,
    history_len: usize,
    existing: HashMap<(String, String), StoredDecision>,
    /// Recorded decisions that cannot be read back, with the reason.
    unreadable: HashMap<(String, String), String>,
    by_identity: HashMap<(String, String), String>,
    customers: HashMap<String, CustomerState>,
    /// By customer id: the conversation the customer's next message continues.
    conversations: HashMap<String, ConversationState>,
    /// By `(channel id, thread key)`: the conversation of that thread's latest message, its
    /// customer, and whether it is open. A reply in the thread continues it (reopening it if
    /// need be).
    threads: HashMap<(String, String), (String, bool, LoadedConversation)>,
    /// Conversations a thread reply took the place of after this batch changed them: still
    /// written.
    parked: Vec<(String, ConversationState)>,
}

/// A customer as the batch sees it: loaded, or created by an earlier message of the batch.
struct CustomerState {
    attributes: Map<String, Value>,
    identities: Vec<Identity>,
    /// When each of `identities` was stored (Unix ms), in the same order.
    identities_created: Vec<i64>,
    recent: u32,
    /// The times (Unix ms) behind `recent`, when the backend read them: what a cached
    /// snapshot needs to count the last 24 hours later.
    contact_times: Option<Vec<i64>>,
    open_conversations: u32,
    is_new: bool,
    /// A reply in a thread made another conversation this customer's current one: the
    /// store's view of "current" is then not the batch's, so no snapshot is taken.
    followed_thread: bool,
    /// Latest messages with their time (Unix ms), oldest first, at most `history_len`.
    history: VecDeque<(i64, Arc<HistoryEntry>)>,
}

impl CustomerState {
    /// Adds an identity where the store lists it (by time stored, then kind and address), so
    /// that this message's decision shows the customer's identities in the order every later
    /// one will.
    fn add_identity(&mut self, identity: Identity, created_at: i64) {
        let new = (
            created_at,
            identity.kind.as_str(),
            identity.address.as_str(),
        );
        let at = self
            .identities_created
            .iter()
            .zip(&self.identities)
            .position(|(&at, existing)| {
                (at, existing.kind.as_str(), existing.address.as_str()) > new
            })
            .unwrap_or(self.identities.len());
        self.identities.insert(at, identity);
        self.identities_created.insert(at, created_at);
    }

    fn new(attributes: Map<String, Value>, is_new: bool) -> Self {
        Self {
            attributes,
            identities: Vec::new(),
            identities_created: Vec::new(),
            recent: 0,
            // A new customer has no earlier contacts.
            contact_times: is_new.then(Vec::new),
            open_conversations: 0,
            is_new,
            followed_thread: false,
            history: VecDeque::new(),
        }
    }
}

/// A customer's open conversation as the batch sees it.
struct ConversationState {
    id: String,
    channels: Vec<String>,
    message_count: i64,
    opened_at: i64,
    agent_id: Option<String>,
    queue: Option<String>,
    is_new: bool,
    /// A message of this batch went to it: it is written back.
    changed: bool,
    /// It was closed: a message reopens it (and it counts among the open conversations).
    closed: bool,
}

impl From<LoadedConversation> for ConversationState {
    fn from(loaded: LoadedConversation) -> Self {
        Self {
            id: loaded.id,
            channels: loaded.channels,
            message_count: loaded.message_count,
            opened_at: loaded.opened_at,
            agent_id: loaded.agent_id,
            queue: loaded.queue,
            is_new: false,
            changed: false,
            closed: false,
        }
    }
}

/// A stored conversation as a backend reads it.
#[derive(Debug, Clone)]
pub(super) struct LoadedConversation {
    pub id: String,
    pub channels: Vec<String>,
    pub message_count: i64,
    pub opened_at: i64,
    pub agent_id: Option<String>,
    pub queue: Option<String>,
}

/// What the batch decided and what the backend writes back.
pub(super) struct Decided<'m> {
    pub outcomes: Vec<RouteOutcome>,
    pub new_customers: Vec<CustomerRow>,
    pub seen_customers: Vec<CustomerRow>,
    /// `(kind, address, customer_id)`.
    pub new_identities: Vec<(String, String, String)>,
    pub new_conversations: Vec<ConversationRow>,
    pub seen_conversations: Vec<ConversationRow>,
    /// One per newly routed message: the message row and its decision row.
    pub messages: Vec<MessageRow<'m>>,
    /// Customers joined by a verified identity, applied after the writes above, in order.
    pub merges: Vec<MergeRow>,
    /// Customers an unverified identity would have joined: recorded for review only.
    pub suggestions: Vec<MergeRow>,
    /// Per customer this batch changed: its state once the writes above are committed, when
    /// it is exactly what the store would read back (see [`CustomerSnapshot`]); `None` when
    /// it is not, and a cached copy must go.
    pub snapshots: Vec<(String, Option<CustomerSnapshot>)>,
}

/// A customer's state after a batch, exactly as the next batch would read it from the store:
/// what the SQLite store's cache keeps (see `cache.rs`).
#[derive(Debug, Clone)]
pub(super) struct CustomerSnapshot {
    pub attributes: Map<String, Value>,
    /// In the store's order: by creation time, kind, address.
    pub identities: Vec<Identity>,
    /// When each identity was stored (Unix ms).
    pub identities_created: Vec<i64>,
    /// Open conversations (the current one included).
    pub open_conversations: u32,
    /// The current (open) conversation.
    pub conversation: LoadedConversation,
    /// Latest messages, oldest first, at most `history_len`.
    pub history: VecDeque<(i64, Arc<HistoryEntry>)>,
    /// Times of the customer's messages in the last 24 hours (older ones are ignored).
    pub contact_times: Vec<i64>,
}

/// Above this many messages in 24 hours a customer is not cached (its snapshot would carry
/// them all); it is read from the store instead.
const MAX_CACHED_CONTACTS: usize = 1024;

/// A merge (or a suggestion of one) to apply and audit.
#[derive(Debug, Clone)]
pub(super) struct MergeRow {
    pub id: String,
    pub into: String,
    pub from: String,
    /// The identity that joined them; none for an explicit merge.
    pub identity: Option<(String, String)>,
    /// `verified identity`, `unverified identity` or `api`.
    pub reason: &'static str,
    /// The conversation the survivor continues: `from`'s other open conversations close.
    pub keep_conversation: Option<String>,
    /// JSON object: what moved and the attribute conflicts.
    pub detail: Value,
}

/// `from`'s attributes under `into`'s: on a conflict the survivor's value stays. Returns the
/// conflicting keys with both values.
pub(super) fn fold_attributes(
    into: &mut Map<String, Value>,
    from: &Map<String, Value>,
) -> Map<String, Value> {
    let mut conflicts = Map::new();
    for (key, value) in from {
        match into.get(key) {
            None => {
                into.insert(key.clone(), value.clone());
            }
            Some(kept) if kept != value => {
                conflicts.insert(
                    key.clone(),
                    serde_json::json!({"kept": kept, "dropped": value}),
                );
            }
            Some(_) => {}
        }
    }
    conflicts
}

/// A customer to insert or update.
#[derive(serde::Serialize)]
pub(super) struct CustomerRow {
    pub id: String,
    /// A JSON object.
    pub attributes: String,
}

/// A conversation to insert, or to update (and reopen, if it was closed).
#[derive(serde::Serialize)]
pub(super) struct ConversationRow {
    pub id: String,
    pub customer_id: String,
    /// A JSON array of channel kinds, in first-use order.
    pub channels: String,
    pub queue: Option<String>,
    pub message_count: i64,
    pub opened_at: i64,
}

/// One routed message, as written: the message and its decision.
pub(super) struct MessageRow<'m> {
    pub message: &'m NormalizedMessage,
    pub conversation_id: String,
    pub customer_id: String,
    /// The message as JSON.
    pub envelope: String,
    pub queue: String,
    pub urgency: u8,
    pub priority: u8,
    pub assignment: String,
}

impl<'m> Batch<'m> {
    pub fn new(messages: &'m [NormalizedMessage], now_ms: i64, history_len: usize) -> Self {
        let (identities, verified) = messages
            .iter()
            .map(|message| identities_of(message).into_iter().unzip())
            .unzip();
        Self {
            messages,
            identities,
            verified,
            now_ms,
            history_len,
            existing: HashMap::default(),
            unreadable: HashMap::default(),
            // Sized for a batch of distinct customers: no rehashing as they are added.
            by_identity: HashMap::with_capacity_and_hasher(messages.len(), Default::default()),
            customers: HashMap::with_capacity_and_hasher(messages.len(), Default::default()),
            conversations: HashMap::with_capacity_and_hasher(messages.len(), Default::default()),
            threads: HashMap::default(),
            parked: Vec::new(),
        }
    }

    /// Every identity the batch's messages carry: their senders and the identities adapters
    /// list in `metadata.identities` (a web chat form's email and phone).
    pub fn identities(&self) -> impl Iterator<Item = &(String, String)> {
        self.identities.iter().flatten()
    }

    /// A decision already recorded for `(channel_id, external_id)`.
    pub fn existing(&mut self, channel_id: String, external_id: String, stored: StoredDecision) {
        self.existing.insert((channel_id, external_id), stored);
    }

    /// A message whose recorded decision cannot be read back, and why.
    pub fn unreadable(&mut self, channel_id: String, external_id: String, reason: String) {
        self.unreadable.insert((channel_id, external_id), reason);
    }

    /// A stored identity and its customer; `attributes` is read once per customer.
    pub fn known_identity(
        &mut self,
        identity: (String, String),
        customer_id: String,
        attributes: impl FnOnce() -> Result<Map<String, Value>, StoreError>,
    ) -> Result<(), StoreError> {
        self.by_identity.insert(identity, customer_id.clone());
        if let Entry::Vacant(entry) = self.customers.entry(customer_id) {
            entry.insert(CustomerState::new(attributes()?, false));
        }
        Ok(())
    }

    /// The ids of the stored customers found by [`Self::known_identity`].
    pub fn known_customers(&self) -> Vec<&String> {
        self.customers.keys().collect()
    }

    /// One of a known customer's identities, in the order the customer shows them.
    pub fn customer_identity(&mut self, customer_id: &str, identity: Identity, created_at: i64) {
        if let Some(customer) = self.customers.get_mut(customer_id) {
            customer.add_identity(identity, created_at);
        }
    }

    /// One of a known customer's conversations that is open or closed within the reopen
    /// window, in the order: open ones first, then the latest activity first. The first
    /// continues; `load` is called for it only.
    pub fn conversation(
        &mut self,
        customer_id: String,
        open: bool,
        load: impl FnOnce() -> Result<LoadedConversation, StoreError>,
    ) -> Result<(), StoreError> {
        let taken = self.conversations.contains_key(&customer_id);
        if let Some(customer) = self.customers.get_mut(&customer_id)
            && (open || !taken)
        {
            customer.open_conversations += 1;
        }
        if taken {
            return Ok(()); // an older open one, or a closed one while an open one continues
        }
        let state = ConversationState {
            closed: !open,
            ..ConversationState::from(load()?)
        };
        self.conversations.insert(customer_id, state);
        Ok(())
    }

    /// The `(channel id, thread key)` of every message of the batch that is in a thread.
    pub fn thread_keys(&self) -> Vec<(&str, &str)> {
        let mut keys: Vec<(&str, &str)> = self
            .messages
            .iter()
            .filter_map(|m| Some((m.channel.id.as_str(), m.thread_key.as_deref()?)))
            .collect();
        keys.sort_unstable();
        keys.dedup();
        keys
    }

    /// The conversation a thread's latest stored message is in, and its customer.
    pub fn thread(
        &mut self,
        channel_id: String,
        thread_key: String,
        customer_id: String,
        open: bool,
        conversation: LoadedConversation,
    ) {
        self.threads
            .insert((channel_id, thread_key), (customer_id, open, conversation));
    }

    /// Makes the conversation of `message`'s thread the customer's current one, when the thread
    /// is known and belongs to this customer.
    fn follow_thread(&mut self, message: &NormalizedMessage, customer_id: &str) {
        let Some(thread_key) = &message.thread_key else {
            return;
        };
        let key = (message.channel.id.clone(), thread_key.clone());
        let Some((owner, _, loaded)) = self.threads.get(&key) else {
            return;
        };
        let current = self.conversations.get(customer_id).map(|c| c.id.as_str());
        if owner != customer_id || current == Some(loaded.id.as_str()) {
            return;
        }
        let id = loaded.id.clone();
        // A version this batch already changed wins over the stored one.
        let state = match self.parked.iter().position(|(_, c)| c.id == id) {
            Some(index) => self.parked.swap_remove(index).1,
            None => match self.threads.remove(&key) {
                Some((_, open, loaded)) => ConversationState {
                    closed: !open,
                    ..ConversationState::from(loaded)
                },
                None => return,
            },
        };
        let reopens = state.closed && !state.changed;
        let previous = self.conversations.insert(customer_id.to_owned(), state);
        if let Some(customer) = self.customers.get_mut(customer_id) {
            customer.followed_thread = true;
            // The thread's conversation is counted open if this reopens it; the one it
            // replaces is not, if it was closed and nothing in this batch reopened it.
            if reopens {
                customer.open_conversations += 1;
            }
            if previous.as_ref().is_some_and(|p| p.closed && !p.changed) {
                customer.open_conversations = customer.open_conversations.saturating_sub(1);
            }
        }
        if let Some(previous) = previous
            && previous.changed
        {
            self.parked.push((customer_id.to_owned(), previous));
        }
    }

    /// The times of a known customer's messages in the 24 hours before now.
    pub fn contact_times(&mut self, customer_id: &str, times: Vec<i64>) {
        if let Some(customer) = self.customers.get_mut(customer_id) {
            customer.recent = u32::try_from(times.len()).unwrap_or(u32::MAX);
            customer.contact_times = (times.len() <= MAX_CACHED_CONTACTS).then_some(times);
        }
    }

    /// A customer as a cache kept it after an earlier batch: every read above at once. A
    /// customer the batch already holds is left as it is.
    pub fn cached(&mut self, customer_id: &str, snapshot: &CustomerSnapshot) {
        if self.customers.contains_key(customer_id) {
            return;
        }
        for identity in &snapshot.identities {
            self.by_identity
                .entry((identity.kind.clone(), identity.address.clone()))
                .or_insert_with(|| customer_id.to_owned());
        }
        let since = self.now_ms - DAY_MS;
        let contact_times: Vec<i64> = snapshot
            .contact_times
            .iter()
            .copied()
            .filter(|at| *at > since)
            .collect();
        self.customers.insert(
            customer_id.to_owned(),
            CustomerState {
                attributes: snapshot.attributes.clone(),
                identities: snapshot.identities.clone(),
                identities_created: snapshot.identities_created.clone(),
                recent: u32::try_from(contact_times.len()).unwrap_or(u32::MAX),
                contact_times: Some(contact_times),
                open_conversations: snapshot.open_conversations,
                is_new: false,
                followed_thread: false,
                history: snapshot.history.clone(),
            },
        );
        self.conversations.insert(
            customer_id.to_owned(),
            ConversationState::from(snapshot.conversation.clone()),
        );
    }

    /// How many messages a known customer sent in the 24 hours before now.
    pub fn recent_contacts(&mut self, customer_id: &str, count: i64) {
        if let Some(customer) = self.customers.get_mut(customer_id) {
            customer.recent = u32::try_from(count).unwrap_or(u32::MAX);
        }
    }

    /// One of a known customer's latest messages; oldest first.
    pub fn history(&mut self, customer_id: &str, channel: &str, text: &str, at_ms: i64) {
        if let Some(customer) = self.customers.get_mut(customer_id) {
            customer.history.push_back((
                at_ms,
                Arc::new(HistoryEntry::new(channel, text, &rfc3339(at_ms))),
            ));
        }
    }

    /// Decides every message in order and collects what to write.
    pub fn decide(mut self, decide: &DecideFn<'_>) -> Result<Decided<'m>, StoreError> {
        let now_ms = self.now_ms;
        let history_len = self.history_len;
        let mut outcomes = Vec::with_capacity(self.messages.len());
        let mut touched: Vec<String> = Vec::new();
        let mut new_identities: Vec<(String, String, String)> = Vec::new();
        let mut rows: Vec<MessageRow<'m>> = Vec::new();
        let mut decided: HashMap<(String, String), StoredDecision> =
            HashMap::with_capacity_and_hasher(self.messages.len(), Default::default());
        let mut merges: Vec<MergeRow> = Vec::new();
        let mut suggestions: Vec<MergeRow> = Vec::new();
        for (position, message) in self.messages.iter().enumerate() {
            let key = (message.channel.id.clone(), message.external_id.clone());
            if let Some(stored) = self.existing.get(&key).or_else(|| decided.get(&key)) {
                outcomes.push(RouteOutcome::Existing(stored.clone()));
                continue;
            }
            if let Some(reason) = self.unreadable.get(&key) {
                outcomes.push(RouteOutcome::Unreadable(reason.clone()));
                continue;
            }
            // The customer behind the first known identity (the sender's first); a new one if
            // none is known. The message's unknown identities are linked to that customer; one
            // that already belongs to another customer stays there (merging is explicit).
            let identities = self.identities[position].clone();
            let customer_id = match identities.iter().find_map(|i| self.by_identity.get(i)) {
                Some(id) => id.clone(),
                None => {
                    let id = Uuid::new_v4().to_string();
                    self.customers
                        .insert(id.clone(), CustomerState::new(Map::new(), true));
                    id
                }
            };
            // An identity of another customer joins the two only when the adapter marked it
            // verified; otherwise it stays there and a suggestion is recorded for review.
            for (index, identity) in identities.iter().enumerate() {
                match self.by_identity.get(identity) {
                    Some(owner) if *owner == customer_id => {}
                    Some(owner) => {
                        let owner = owner.clone();
                        if self.verified[position][index] {
                            merges.push(self.absorb(&customer_id, &owner, identity));
                        } else if !suggestions.iter().any(|s| {
                            s.into == customer_id
                                && s.from == owner
                                && s.identity.as_ref() == Some(identity)
                        }) {
                            suggestions.push(suggestion(&customer_id, &owner, identity));
                        }
                    }
                    None => {
                        self.by_identity
                            .insert(identity.clone(), customer_id.clone());
                        new_identities.push((
                            identity.0.clone(),
                            identity.1.clone(),
                            customer_id.clone(),
                        ));
                        if let Some(customer) = self.customers.get_mut(&customer_id) {
                            customer.add_identity(
                                Identity {
                                    kind: identity.0.clone(),
                                    address: identity.1.clone(),
                                },
                                now_ms,
                            );
                        }
                    }
                }
            }
            let Some(customer) = self.customers.get_mut(&customer_id) else {
                continue; // inserted just above or loaded
            };
            customer.attributes =
                merged_attributes(std::mem::take(&mut customer.attributes), message);
            self.follow_thread(message, &customer_id);
            let Some(customer) = self.customers.get_mut(&customer_id) else {
                continue;
            };
            let conversation = self
                .conversations
                .entry(customer_id.clone())
                .or_insert_with(|| {
                    customer.open_conversations += 1;
                    ConversationState {
                        id: Uuid::new_v4().to_string(),
                        channels: Vec::new(),
                        message_count: 0,
                        opened_at: now_ms,
                        agent_id: None,
                        queue: None,
                        is_new: true,
                        changed: false,
                        closed: false,
                    }
                });
            let resolved = Resolved {
                customer: CustomerView {
                    id: customer_id.clone(),
                    attributes: customer.attributes.clone(),
                    identities: customer.identities.clone(),
                    contacts_last_24h: customer.recent.saturating_add(1),
                    open_conversations: customer.open_conversations.max(1),
                    previous_agent: conversation.agent_id.clone(),
                    channels_used: with(&conversation.channels, &message.channel.kind),
                },
                conversation: ConversationView {
                    id: conversation.id.clone(),
                    new: conversation.message_count == 0,
                    age: (now_ms - conversation.opened_at).max(0) / 1000,
                    message_count: u32::try_from(conversation.message_count).unwrap_or(u32::MAX),
                },
                history: customer
                    .history
                    .iter()
                    .map(|(_, e)| Arc::clone(e))
                    .collect(),
                conversation_opened_at: conversation.opened_at,
            };
            let envelope = serde_json::value::to_raw_value(message)?;
            let routed = decide(message, &envelope, &resolved);

            customer.recent = customer.recent.saturating_add(1);
            if let Some(times) = &mut customer.contact_times {
                times.push(now_ms);
                if times.len() > MAX_CACHED_CONTACTS {
                    customer.contact_times = None;
                }
            }
            if history_len > 0 {
                if customer.history.len() >= history_len {
                    customer.history.pop_front();
                }
                customer.history.push_back((
                    now_ms,
                    Arc::new(HistoryEntry::new(
                        &message.channel.kind,
                        &message.text,
                        &rfc3339(now_ms),
                    )),
                ));
            }
            conversation.changed = true;
            conversation.message_count += 1;
            if !conversation.channels.contains(&message.channel.kind) {
                conversation.channels.push(message.channel.kind.clone());
            }
            conversation.queue = Some(routed.queue.clone());
            if !touched.contains(&customer_id) {
                touched.push(customer_id.clone());
            }
            rows.push(MessageRow {
                message,
                conversation_id: conversation.id.clone(),
                customer_id: customer_id.clone(),
                envelope: Box::<str>::from(envelope).into_string(),
                queue: routed.queue.clone(),
                urgency: routed.urgency,
                priority: routed.priority,
                assignment: routed.assignment.clone(),
            });
            let stored = StoredDecision {
                assignment: routed.assignment.clone(),
                queue: routed.queue.clone(),
                priority: routed.priority,
                published: false,
            };
            decided.insert(key, stored);
            outcomes.push(RouteOutcome::New {
                queue: routed.queue,
                priority: routed.priority,
                assignment: routed.assignment,
            });
        }

        let mut writes = Decided {
            outcomes,
            new_customers: Vec::new(),
            seen_customers: Vec::new(),
            new_identities,
            new_conversations: Vec::new(),
            seen_conversations: Vec::new(),
            messages: rows,
            merges,
            suggestions,
            snapshots: Vec::new(),
        };
        for customer_id in &touched {
            // A customer merged into another in this batch may have handed its conversation
            // over: its row is still written (earlier messages refer to it).
            if let Some(customer) = self.customers.get(customer_id) {
                let customer_row = CustomerRow {
                    id: customer_id.clone(),
                    attributes: serde_json::to_string(&customer.attributes)?,
                };
                if customer.is_new {
                    writes.new_customers.push(customer_row);
                } else {
                    writes.seen_customers.push(customer_row);
                }
            }
        }
        let current = touched
            .iter()
            .filter_map(|customer_id| Some((customer_id, self.conversations.get(customer_id)?)));
        let parked = self.parked.iter().map(|(customer_id, c)| (customer_id, c));
        for (customer_id, conversation) in current.chain(parked) {
            let conversation_row = ConversationRow {
                id: conversation.id.clone(),
                customer_id: customer_id.clone(),
                channels: serde_json::to_string(&conversation.channels)?,
                queue: conversation.queue.clone(),
                message_count: conversation.message_count,
                opened_at: conversation.opened_at,
            };
            if conversation.is_new {
                writes.new_conversations.push(conversation_row);
            } else {
                writes.seen_conversations.push(conversation_row);
            }
        }
        for customer_id in touched {
            let snapshot = self.snapshot(&customer_id);
            writes.snapshots.push((customer_id, snapshot));
        }
        Ok(writes)
    }

    /// `customer_id`'s state after [`Self::decide`], when it is what the store holds once the
    /// batch is committed: not after a thread reply switched conversations, nor without the
    /// contact times. (After a merge in the batch the store drops its whole cache.)
    fn snapshot(&self, customer_id: &str) -> Option<CustomerSnapshot> {
        if !self.parked.is_empty() {
            return None;
        }
        let customer = self.customers.get(customer_id)?;
        if customer.followed_thread {
            return None;
        }
        let conversation = self.conversations.get(customer_id)?;
        // `add_identity` keeps them in the store's order.
        Some(CustomerSnapshot {
            attributes: customer.attributes.clone(),
            identities: customer.identities.clone(),
            identities_created: customer.identities_created.clone(),
            open_conversations: customer.open_conversations.max(1),
            conversation: LoadedConversation {
                id: conversation.id.clone(),
                channels: conversation.channels.clone(),
                message_count: conversation.message_count,
                opened_at: conversation.opened_at,
                agent_id: conversation.agent_id.clone(),
                queue: conversation.queue.clone(),
            },
            history: customer.history.clone(),
            contact_times: customer.contact_times.clone()?,
        })
    }

    /// Folds customer `from` into `into` for the rest of the batch: its identities, attributes
    /// (the survivor's win), contacts and history join the survivor's; its conversation
    /// continues as the survivor's if the survivor has none. `from`'s own state stays, to be
    /// written; the returned row moves it in the store afterwards.
    fn absorb(&mut self, into: &str, from: &str, identity: &(String, String)) -> MergeRow {
        for owner in self.by_identity.values_mut() {
            if owner == from {
                *owner = into.to_owned();
            }
        }
        let (identities, created, attributes, recent, history, open) =
            match self.customers.get(from) {
                Some(absorbed) => (
                    absorbed.identities.clone(),
                    absorbed.identities_created.clone(),
                    absorbed.attributes.clone(),
                    absorbed.recent,
                    absorbed.history.clone(),
                    absorbed.open_conversations,
                ),
                None => Default::default(),
            };
        let moved = !self.conversations.contains_key(into) && self.conversations.contains_key(from);
        if moved && let Some(conversation) = self.conversations.remove(from) {
            self.conversations.insert(into.to_owned(), conversation);
        }
        let keep_conversation = self.conversations.get(into).map(|c| c.id.clone());
        let mut conflicts = Map::new();
        if let Some(survivor) = self.customers.get_mut(into) {
            for (identity, created) in identities.iter().zip(created) {
                if !survivor.identities.contains(identity) {
                    survivor.add_identity(identity.clone(), created);
                }
            }
            conflicts = fold_attributes(&mut survivor.attributes, &attributes);
            survivor.recent = survivor.recent.saturating_add(recent);
            if moved {
                survivor.open_conversations += open;
            }
            let mut joined: Vec<(i64, Arc<HistoryEntry>)> =
                survivor.history.drain(..).chain(history).collect();
            joined.sort_by_key(|(at, _)| *at);
            let skip = joined.len().saturating_sub(self.history_len);
            survivor.history = joined.into_iter().skip(skip).collect();
        }
        MergeRow {
            id: Uuid::new_v4().to_string(),
            into: into.to_owned(),
            from: from.to_owned(),
            identity: Some(identity.clone()),
            reason: "verified identity",
            keep_conversation,
            detail: serde_json::json!({
                "identities": identities,
                "attribute_conflicts": conflicts,
            }),
        }
    }
}

/// The audit row of an explicit (API) merge of `from` into `into`, whose attributes take
/// `from`'s where they have none.
pub(super) fn explicit_merge(
    into: &str,
    from: &str,
    into_attributes: &mut Map<String, Value>,
    from_attributes: &Map<String, Value>,
    from_identities: &[Identity],
    keep_conversation: Option<String>,
) -> MergeRow {
    let conflicts = fold_attributes(into_attributes, from_attributes);
    MergeRow {
        id: Uuid::new_v4().to_string(),
        into: into.to_owned(),
        from: from.to_owned(),
        identity: None,
        reason: "api",
        keep_conversation,
        detail: serde_json::json!({
            "identities": from_identities,
            "attribute_conflicts": conflicts,
        }),
    }
}

/// One entry of a customer's merge history as the API shows it.
#[allow(clippy::too_many_arguments)]
pub(super) fn merge_entry(
    id: String,
    status: String,
    into: String,
    from: String,
    identity: Option<(String, String)>,
    reason: String,
    detail: Value,
    created_at: i64,
) -> Value {
    serde_json::json!({
        "id": id,
        "status": status,
        "into_customer": into,
        "from_customer": from,
        "identity": identity.map(|(kind, address)| serde_json::json!({"kind": kind, "address": address})),
        "reason": reason,
        "detail": detail,
        "created_at": created_at,
    })
}

/// The review suggestion for an unverified identity of `from` seen with customer `into`.
fn suggestion(into: &str, from: &str, identity: &(String, String)) -> MergeRow {
    MergeRow {
        id: Uuid::new_v4().to_string(),
        into: into.to_owned(),
        from: from.to_owned(),
        identity: Some(identity.clone()),
        reason: "unverified identity",
        keep_conversation: None,
        detail: Value::Object(Map::new()),
    }
}

/// A message's identities, the sender first, then `metadata.identities`
/// (`[{kind, address, verified?}]`), without repeats; with whether each is verified (the
/// sender never counts as a verified link to someone else).
fn identities_of(message: &NormalizedMessage) -> Vec<((String, String), bool)> {
    let mut identities = vec![(
        (message.sender.kind.clone(), message.sender.address.clone()),
        false,
    )];
    let listed = message
        .metadata
        .get("identities")
        .and_then(Value::as_array)
        .into_iter()
        .flatten();
    for entry in listed {
        let (Some(kind), Some(address)) = (
            entry.get("kind").and_then(Value::as_str),
            entry.get("address").and_then(Value::as_str),
        ) else {
            continue;
        };
        let identity = (kind.to_owned(), address.trim().to_owned());
        let verified = entry.get("verified").and_then(Value::as_bool) == Some(true);
        if !identity.0.is_empty()
            && !identity.1.is_empty()
            && !identities.iter().any(|(known, _)| *known == identity)
        {
            identities.push((identity, verified));
        }
    }
    identities
}

/// Unix milliseconds → RFC 3339.
fn rfc3339(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

/// `channels` plus `kind`, if not there yet.
fn with(channels: &[String], kind: &str) -> Vec<String> {
    let mut channels = channels.to_vec();
    if !channels.iter().any(|c| c == kind) {
        channels.push(kind.to_owned());
    }
    channels
}
