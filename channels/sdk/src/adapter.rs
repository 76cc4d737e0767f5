//! The adapter trait and what the daemon hands an adapter: the request, and a context whose
//! `publish` resolves only once the broker has confirmed.

use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::Bytes;
use http::{HeaderMap, Method, StatusCode};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::envelope::{ChannelRef, NormalizedMessage};

/// An inbound HTTP request for `/webhooks/{channel_id}`, with the whole raw body (signatures are
/// computed over it). The daemon has already enforced the body size limit.
#[derive(Debug, Clone)]
pub struct WebhookRequest {
    pub method: Method,
    pub headers: HeaderMap,
    /// The raw query string, without the `?`.
    pub query: Option<String>,
    pub body: Bytes,
}

impl WebhookRequest {
    pub fn post(body: impl Into<Bytes>) -> Self {
        Self {
            method: Method::POST,
            headers: HeaderMap::new(),
            query: None,
            body: body.into(),
        }
    }

    pub fn with_header(mut self, name: &'static str, value: &str) -> Self {
        if let Ok(value) = value.parse() {
            self.headers.insert(name, value);
        }
        self
    }

    /// A header's value as text, if present and valid ASCII.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// What the adapter answers the platform.
#[derive(Debug, Clone, PartialEq)]
pub struct WebhookResponse {
    pub status: StatusCode,
    pub body: Value,
}

impl WebhookResponse {
    pub fn json(status: StatusCode, body: Value) -> Self {
        Self { status, body }
    }

    /// The error shape every Switchboard endpoint uses:
    /// `{"error": {"code": …, "message": …, "field": …}}`.
    pub fn error(status: StatusCode, code: &str, message: impl Into<String>) -> Self {
        Self::json(
            status,
            json!({"error": {"code": code, "message": message.into()}}),
        )
    }

    /// A 400 naming the offending field.
    pub fn bad_field(field: &str, message: impl Into<String>) -> Self {
        Self::json(
            StatusCode::BAD_REQUEST,
            json!({"error": {"code": "invalid_field", "field": field, "message": message.into()}}),
        )
    }

    /// The answer to a failed publish: 503 so the platform retries, or 500 if the broker
    /// refused the message for good.
    pub fn publish_failed(error: &PublishError) -> Self {
        match error {
            PublishError::Unavailable(reason) => Self::error(
                StatusCode::SERVICE_UNAVAILABLE,
                "bus_unavailable",
                format!("the message bus did not confirm the message ({reason}); retry later"),
            ),
            PublishError::Rejected(reason) => Self::error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "bus_rejected",
                format!("the message bus rejected the message: {reason}"),
            ),
        }
    }
}

/// Why a publish did not succeed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PublishError {
    /// The bus is down or did not confirm in time: the sender should retry.
    #[error("bus unavailable: {0}")]
    Unavailable(String),
    /// The broker negatively acknowledged the message.
    #[error("bus rejected the message: {0}")]
    Rejected(String),
}

/// Where adapters publish: the daemon's bus. `publish` returns only once the message is durable
/// (broker confirm, or committed to the embedded bus).
#[async_trait]
pub trait Publisher: Send + Sync + 'static {
    async fn publish(&self, message: &NormalizedMessage) -> Result<(), PublishError>;
}

/// The outcome of [`ChannelContext::publish`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Published {
    /// The message was handed to the bus and confirmed.
    New(Uuid),
    /// The same message was confirmed recently; nothing was published again.
    Duplicate(Uuid),
}

impl Published {
    pub fn message_id(self) -> Uuid {
        match self {
            Published::New(id) | Published::Duplicate(id) => id,
        }
    }
}

/// What an adapter gets for each request: its channel's identity and the bus.
#[derive(Clone)]
pub struct ChannelContext {
    channel: ChannelRef,
    publisher: Arc<dyn Publisher>,
    recent: Arc<Mutex<RecentIds>>,
}

impl ChannelContext {
    /// How many confirmed message ids each channel remembers to answer retries without
    /// republishing. Older retries are still deduplicated by the router, durably.
    pub const RECENT_IDS: usize = 10_000;

    pub fn new(channel: ChannelRef, publisher: Arc<dyn Publisher>) -> Self {
        Self {
            channel,
            publisher,
            recent: Arc::new(Mutex::new(RecentIds::new(Self::RECENT_IDS))),
        }
    }

    pub fn channel(&self) -> &ChannelRef {
        &self.channel
    }

    /// Publishes a normalized message and resolves once the bus confirmed it. A message whose id
    /// was confirmed recently is not published again.
    pub async fn publish(&self, message: NormalizedMessage) -> Result<Published, PublishError> {
        let id = message.message_id;
        if self.recent_contains(id) {
            return Ok(Published::Duplicate(id));
        }
        self.publisher.publish(&message).await?;
        self.recent
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .insert(id);
        Ok(Published::New(id))
    }

    fn recent_contains(&self, id: Uuid) -> bool {
        self.recent
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .contains(&id)
    }
}

/// A bounded set of recently confirmed ids, oldest evicted first.
struct RecentIds {
    capacity: usize,
    order: VecDeque<Uuid>,
    set: HashSet<Uuid>,
}

impl RecentIds {
    fn new(capacity: usize) -> Self {
        Self {
            capacity,
            order: VecDeque::new(),
            set: HashSet::new(),
        }
    }

    fn contains(&self, id: &Uuid) -> bool {
        self.set.contains(id)
    }

    fn insert(&mut self, id: Uuid) {
        if !self.set.insert(id) {
            return;
        }
        self.order.push_back(id);
        if self.order.len() > self.capacity
            && let Some(old) = self.order.pop_front()
        {
            self.set.remove(&old);
        }
    }
}

/// A channel adapter: turns a platform's webhook into normalized messages.
#[async_trait]
pub trait Adapter: Send + Sync + 'static {
    /// The adapter kind, as written in `[[channels]] kind`.
    fn kind(&self) -> &'static str;

    /// Handles one webhook request: verify, normalize, `ctx.publish`, and answer. It must answer
    /// 2xx only after `publish` resolved, and never panic on any input.
    async fn handle(&self, ctx: &ChannelContext, request: WebhookRequest) -> WebhookResponse;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recent_ids_evicts_oldest() {
        let mut recent = RecentIds::new(2);
        let ids: Vec<Uuid> = (0..3).map(Uuid::from_u128).collect();
        for id in &ids {
            recent.insert(*id);
        }
        assert!(!recent.contains(&ids[0]));
        assert!(recent.contains(&ids[1]));
        assert!(recent.contains(&ids[2]));
    }
}
