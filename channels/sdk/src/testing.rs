//! A conformance harness for adapters: an in-memory publisher and the checks every adapter must
//! pass (publish before acknowledging, no publish on bad input, retries deduplicated, 503 when
//! the bus cannot confirm). Adapters call [`check_conformance`] from their own tests.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use async_trait::async_trait;
use http::StatusCode;

use crate::adapter::{Adapter, ChannelContext, PublishError, Publisher, WebhookRequest};
use crate::envelope::{ChannelRef, NormalizedMessage};

/// A publisher that keeps what it was given, and can be told to behave like a bus that is down.
#[derive(Default)]
pub struct MemoryPublisher {
    messages: Mutex<Vec<NormalizedMessage>>,
    down: AtomicBool,
}

impl MemoryPublisher {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// While `down`, every publish fails with [`PublishError::Unavailable`].
    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }

    pub fn messages(&self) -> Vec<NormalizedMessage> {
        self.messages
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }
}

#[async_trait]
impl Publisher for MemoryPublisher {
    async fn publish(&self, message: &NormalizedMessage) -> Result<(), PublishError> {
        if self.down.load(Ordering::SeqCst) {
            return Err(PublishError::Unavailable("memory publisher is down".into()));
        }
        self.messages
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .push(message.clone());
        Ok(())
    }
}

/// What an adapter supplies to the harness.
pub struct Conformance {
    pub channel: ChannelRef,
    /// A request the adapter must accept and publish exactly one message for.
    pub valid: WebhookRequest,
    /// Requests that must be refused with the given status, publishing nothing.
    pub invalid: Vec<(&'static str, WebhookRequest, StatusCode)>,
}

/// Runs the checks every adapter must pass. Panics with a description of the first failure.
pub async fn check_conformance<A: Adapter>(adapter: &A, case: Conformance) -> NormalizedMessage {
    let publisher = MemoryPublisher::new();
    let ctx = ChannelContext::new(case.channel.clone(), publisher.clone());

    // The bus is down: the platform must be told to retry, and nothing is recorded.
    publisher.set_down(true);
    let response = adapter.handle(&ctx, case.valid.clone()).await;
    assert_eq!(
        response.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "a publish that could not be confirmed must answer 503, got {response:?}"
    );
    assert!(publisher.messages().is_empty());
    publisher.set_down(false);

    for (what, request, status) in case.invalid {
        let response = adapter.handle(&ctx, request).await;
        assert_eq!(response.status, status, "{what}: got {response:?}");
        assert!(
            response.body.get("error").is_some(),
            "{what}: an error answer must carry an `error` object, got {response:?}"
        );
        assert!(
            publisher.messages().is_empty(),
            "{what}: a refused request must publish nothing"
        );
    }

    let first = adapter.handle(&ctx, case.valid.clone()).await;
    assert!(
        first.status.is_success(),
        "the valid request was refused: {first:?}"
    );
    let retry = adapter.handle(&ctx, case.valid).await;
    assert!(
        retry.status.is_success(),
        "the retry was refused: {retry:?}"
    );
    assert_eq!(first.body, retry.body, "a retry must get the same answer");

    let messages = publisher.messages();
    assert_eq!(
        messages.len(),
        1,
        "one valid request, retried, publishes once"
    );
    let message = messages.into_iter().next().expect("length checked above");
    assert_eq!(
        message.channel, case.channel,
        "the envelope names its channel"
    );
    assert!(!message.external_id.is_empty(), "external_id is required");
    assert_eq!(
        message.message_id,
        NormalizedMessage::stable_id(&message.channel.id, &message.external_id),
        "message_id is derived from the channel and external id"
    );
    message
}
