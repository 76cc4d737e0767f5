//! The rows a batch reads before deciding, as the stores' read statements return them: one
//! JSON document per batch (SQLite's statement, PostgreSQL's `switchboard_batch_reads`), each
//! kind of row an array in it.

use serde::Deserialize;
use serde_json::{Map, Value};

use super::batch::LoadedConversation;

/// An array of rows; PostgreSQL's `json_agg` of no rows is null.
pub(super) fn rows<'de, D, T>(deserializer: D) -> Result<Vec<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Ok(Option::<Vec<T>>::deserialize(deserializer)?.unwrap_or_default())
}

/// One of the batch's identities, stored, and its customer.
#[derive(Deserialize)]
pub(super) struct KnownRow {
    pub(super) kind: String,
    pub(super) address: String,
    pub(super) id: String,
    pub(super) attributes: Map<String, Value>,
    /// Set when the customer was merged away (PostgreSQL reads identities before it locks
    /// their customers).
    pub(super) merged_into: Option<String>,
}

/// One of a known customer's identities.
#[derive(Deserialize)]
pub(super) struct IdentityRow {
    pub(super) customer_id: String,
    pub(super) kind: String,
    pub(super) address: String,
    pub(super) created_at: i64,
}

/// A known customer's conversation that may continue (or a reply thread's).
#[derive(Deserialize)]
pub(super) struct ConversationRow {
    pub(super) id: String,
    pub(super) customer_id: String,
    pub(super) open: bool,
    pub(super) channels: Vec<String>,
    pub(super) message_count: i64,
    pub(super) opened_at: i64,
    pub(super) agent_id: Option<String>,
    pub(super) queue: Option<String>,
}

impl ConversationRow {
    /// The customer, whether the conversation is open, and the conversation.
    pub(super) fn split(self) -> (String, bool, LoadedConversation) {
        let loaded = LoadedConversation {
            id: self.id,
            channels: self.channels,
            message_count: self.message_count,
            opened_at: self.opened_at,
            agent_id: self.agent_id,
            queue: self.queue,
        };
        (self.customer_id, self.open, loaded)
    }
}

/// One of a known customer's latest messages.
#[derive(Deserialize)]
pub(super) struct HistoryRow {
    pub(super) customer_id: String,
    pub(super) channel: Option<String>,
    pub(super) text: Option<String>,
    pub(super) received_at: i64,
}

/// The conversation of a reply thread's latest message.
#[derive(Deserialize)]
pub(super) struct ThreadRow {
    pub(super) channel_id: String,
    pub(super) thread_key: String,
    #[serde(flatten)]
    pub(super) conversation: ConversationRow,
}
