//! The normalized envelope every adapter produces, and the CloudEvents wrapper it travels in.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use time::OffsetDateTime;
use uuid::Uuid;

/// Namespace for the deterministic message ids (UUID v5 over `channel_id \n external_id`).
const MESSAGE_ID_NAMESPACE: Uuid = Uuid::from_u128(0x5b1f_0c1e_93a4_4d7e_9a55_3d1c_2f4e_8a10);

/// Which channel instance a message came through.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChannelRef {
    /// Instance id from the config (`[[channels]] id`).
    pub id: String,
    /// Adapter kind (`webchat`, `email`, …).
    pub kind: String,
}

/// Who wrote the message, as the channel knows them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sender {
    /// Identity kind: `email`, `phone`, `telegram`, `messenger`, `instagram`, `slack`, `x`,
    /// `webchat`.
    pub kind: String,
    /// Normalized address within that kind.
    pub address: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    pub filename: String,
    pub content_type: String,
    pub size: u64,
}

/// The `data` of a `switchboard.message.received` event (DESIGN §3).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NormalizedMessage {
    pub message_id: Uuid,
    pub channel: ChannelRef,
    /// The platform's own id for the message; with the channel id, the deduplication key.
    pub external_id: String,
    #[serde(default)]
    pub thread_key: Option<String>,
    pub sender: Sender,
    #[serde(default)]
    pub subject: Option<String>,
    pub text: String,
    #[serde(default)]
    pub attachments: Vec<Attachment>,
    #[serde(with = "time::serde::rfc3339")]
    pub received_at: OffsetDateTime,
    #[serde(default)]
    pub auto_submitted: bool,
    #[serde(default)]
    pub metadata: Map<String, Value>,
}

impl NormalizedMessage {
    /// The id a message gets from its channel and platform id: the same retry always yields the
    /// same id, so a sender that retries gets the answer it got the first time.
    pub fn stable_id(channel_id: &str, external_id: &str) -> Uuid {
        let mut name = Vec::with_capacity(channel_id.len() + external_id.len() + 1);
        name.extend_from_slice(channel_id.as_bytes());
        name.push(b'\n');
        name.extend_from_slice(external_id.as_bytes());
        Uuid::new_v5(&MESSAGE_ID_NAMESPACE, &name)
    }

    /// The AMQP routing key on `<p>.inbound`: `<kind>.<channel_id>`.
    pub fn routing_key(&self) -> String {
        format!("{}.{}", self.channel.kind, self.channel.id)
    }

    /// The first field holding U+0000 (NUL), if any. PostgreSQL cannot store that character in
    /// text or JSON; adapters refuse it and the router dead-letters such a message, on every
    /// store alike, rather than failing its whole batch.
    pub fn nul_field(&self) -> Option<&'static str> {
        let has_nul = |text: &str| text.contains('\0');
        let fields: [(&'static str, bool); 8] = [
            (
                "channel",
                has_nul(&self.channel.id) || has_nul(&self.channel.kind),
            ),
            ("external_id", has_nul(&self.external_id)),
            (
                "thread_key",
                self.thread_key.as_deref().is_some_and(has_nul),
            ),
            ("sender", {
                has_nul(&self.sender.kind)
                    || has_nul(&self.sender.address)
                    || self.sender.name.as_deref().is_some_and(has_nul)
            }),
            ("subject", self.subject.as_deref().is_some_and(has_nul)),
            ("text", has_nul(&self.text)),
            (
                "attachments",
                self.attachments
                    .iter()
                    .any(|a| has_nul(&a.filename) || has_nul(&a.content_type)),
            ),
            (
                "metadata",
                self.metadata
                    .iter()
                    .any(|(k, v)| has_nul(k) || value_has_nul(v)),
            ),
        ];
        fields
            .into_iter()
            .find_map(|(field, nul)| nul.then_some(field))
    }
}

/// The most a customer's attributes may take, as JSON, in bytes: they travel in every
/// assignment of the customer. Adapters refuse a message whose `attributes` are larger; the
/// store refuses a change that would make them larger.
pub const MAX_ATTRIBUTES_BYTES: usize = 16 * 1024;

/// Whether a JSON value holds U+0000 (NUL) in a string or a key anywhere.
pub fn value_has_nul(value: &Value) -> bool {
    match value {
        Value::String(text) => text.contains('\0'),
        Value::Array(items) => items.iter().any(value_has_nul),
        Value::Object(map) => map
            .iter()
            .any(|(k, v)| k.contains('\0') || value_has_nul(v)),
        _ => false,
    }
}

/// Event types (CloudEvents `type`).
pub mod event_type {
    pub const MESSAGE_RECEIVED: &str = "switchboard.message.received";
    pub const CONVERSATION_ASSIGNED: &str = "switchboard.conversation.assigned";
    pub const CONVERSATION_ESCALATED: &str = "switchboard.conversation.escalated";
    pub const CONVERSATION_CLOSED: &str = "switchboard.conversation.closed";
    pub const REPLY_REQUESTED: &str = "switchboard.reply.requested";
    pub const REPLY_DELIVERED: &str = "switchboard.reply.delivered";
    pub const REPLY_FAILED: &str = "switchboard.reply.failed";
}

/// `content_type` of every AMQP message body.
pub const CLOUDEVENTS_CONTENT_TYPE: &str = "application/cloudevents+json";

/// A CloudEvents 1.0 structured-mode document.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CloudEvent<T> {
    pub specversion: String,
    pub id: String,
    pub source: String,
    #[serde(rename = "type")]
    pub ty: String,
    #[serde(with = "time::serde::rfc3339")]
    pub time: OffsetDateTime,
    pub datacontenttype: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    pub data: T,
}

impl<T> CloudEvent<T> {
    pub fn new(id: impl Into<String>, source: impl Into<String>, ty: &str, data: T) -> Self {
        Self {
            specversion: "1.0".to_owned(),
            id: id.into(),
            source: source.into(),
            ty: ty.to_owned(),
            time: OffsetDateTime::now_utc(),
            datacontenttype: "application/json".to_owned(),
            subject: None,
            data,
        }
    }
}

impl CloudEvent<NormalizedMessage> {
    /// Wraps a normalized message as `switchboard.message.received`.
    pub fn message_received(message: NormalizedMessage) -> Self {
        let source = format!("/channels/{}", message.channel.id);
        let mut event = Self::new(
            message.message_id.to_string(),
            source,
            event_type::MESSAGE_RECEIVED,
            message,
        );
        event.time = event.data.received_at;
        event
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn nul_characters_are_found_in_every_text_field() {
        let clean: NormalizedMessage = serde_json::from_value(serde_json::json!({
            "message_id": "6f1c2a52-1b1e-5c6a-9d65-1f5b8a8f2b11",
            "channel": {"id": "chat", "kind": "webchat"},
            "external_id": "m-1",
            "sender": {"kind": "webchat", "address": "v"},
            "text": "hi",
            "received_at": "2026-11-22T10:00:00Z",
            "metadata": {"attributes": {"tags": ["a", "b"]}}
        }))
        .unwrap();
        assert_eq!(clean.nul_field(), None);
        let mut text = clean.clone();
        text.text = "a\0b".into();
        assert_eq!(text.nul_field(), Some("text"));
        let mut sender = clean.clone();
        sender.sender.address = "\0".into();
        assert_eq!(sender.nul_field(), Some("sender"));
        let mut deep = clean;
        deep.metadata["attributes"]["tags"][1] = serde_json::json!("x\0");
        assert_eq!(deep.nul_field(), Some("metadata"));
    }

    use super::*;

    #[test]
    fn stable_id_depends_on_channel_and_external_id() {
        let a = NormalizedMessage::stable_id("chat", "m-1");
        assert_eq!(a, NormalizedMessage::stable_id("chat", "m-1"));
        assert_ne!(a, NormalizedMessage::stable_id("chat", "m-2"));
        assert_ne!(a, NormalizedMessage::stable_id("chat2", "m-1"));
        // The separator keeps ("ab", "c") and ("a", "bc") apart.
        assert_ne!(
            NormalizedMessage::stable_id("ab", "c"),
            NormalizedMessage::stable_id("a", "bc")
        );
    }

    #[test]
    fn message_round_trips_through_cloudevent_json() {
        let message = NormalizedMessage {
            message_id: NormalizedMessage::stable_id("chat", "m-1"),
            channel: ChannelRef {
                id: "chat".into(),
                kind: "webchat".into(),
            },
            external_id: "m-1".into(),
            thread_key: None,
            sender: Sender {
                kind: "webchat".into(),
                address: "visitor-1".into(),
                name: Some("Dana".into()),
            },
            subject: None,
            text: "hello".into(),
            attachments: vec![],
            received_at: OffsetDateTime::from_unix_timestamp(1_700_000_000).unwrap(),
            auto_submitted: false,
            metadata: Map::new(),
        };
        let event = CloudEvent::message_received(message.clone());
        let json = serde_json::to_value(&event).unwrap();
        assert_eq!(json["specversion"], "1.0");
        assert_eq!(json["type"], "switchboard.message.received");
        assert_eq!(json["data"]["received_at"], "2023-11-14T22:13:20Z");
        let back: CloudEvent<NormalizedMessage> = serde_json::from_value(json).unwrap();
        assert_eq!(back.data, message);
    }
}
