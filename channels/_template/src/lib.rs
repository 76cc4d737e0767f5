//! Template for a new Switchboard channel adapter. Copy this folder to `channels/<name>/`,
//! rename the crate, and fill in the three marked places. An adapter sees only the SDK crate
//! (`switchboard-channel`); if it needs something from the daemon, the SDK is missing an API.
//!
//! Then register it in the daemon: one feature-gated variant in `src/channels.rs`
//! (`ChannelAdapter`). The match there is exhaustive, so a missing arm is a compile error.

use async_trait::async_trait;
use http::{Method, StatusCode};
use serde::Deserialize;
use serde_json::{Value, json};
use switchboard_channel::{
    Adapter, ChannelContext, ChannelRef, NormalizedMessage, Sender, WebhookRequest, WebhookResponse,
};
use time::OffsetDateTime;

/// `[[channels]]` keys of this adapter. Doc comments here are the user documentation.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// (1) The platform's credentials: a signing secret, a token, …
    #[serde(default)]
    pub secret: Option<String>,
}

impl Config {
    /// Offline checks, every problem as `(key, message)`; `switchboard check` shows them.
    pub fn validate(&self) -> Vec<(String, String)> {
        Vec::new()
    }

    pub fn build(self) -> TemplateAdapter {
        TemplateAdapter { config: self }
    }
}

pub struct TemplateAdapter {
    #[allow(dead_code)] // (1) used by the signature check you add in `handle`
    config: Config,
}

#[async_trait]
impl Adapter for TemplateAdapter {
    fn kind(&self) -> &'static str {
        "template"
    }

    async fn handle(&self, ctx: &ChannelContext, request: WebhookRequest) -> WebhookResponse {
        if request.method != Method::POST {
            return WebhookResponse::error(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "POST only",
            );
        }
        // (2) Verify the platform's signature over `request.body` here; answer 401 on failure.
        let message = match convert(ctx.channel(), &request.body) {
            Ok(message) => message,
            Err((field, problem)) => return WebhookResponse::bad_field(field, problem),
        };
        // Acknowledge upstream only after the bus confirmed: a 503 makes the platform retry.
        match ctx.publish(message).await {
            Ok(published) => WebhookResponse::json(
                StatusCode::OK,
                json!({"message_id": published.message_id()}),
            ),
            Err(error) => WebhookResponse::publish_failed(&error),
        }
    }
}

/// (3) The platform's payload → normalized message. Keep it pure, and test it with golden
/// fixtures recorded from the platform.
pub fn convert(
    channel: &ChannelRef,
    body: &[u8],
) -> Result<NormalizedMessage, (&'static str, String)> {
    let value: Value = serde_json::from_slice(body).map_err(|e| ("body", e.to_string()))?;
    let id = value["id"]
        .as_str()
        .ok_or(("id", "is required".to_owned()))?;
    let from = value["from"]
        .as_str()
        .ok_or(("from", "is required".to_owned()))?;
    let text = value["text"].as_str().filter(|t| !t.trim().is_empty());
    let text = text.ok_or(("text", "is required and must not be empty".to_owned()))?;
    Ok(NormalizedMessage {
        message_id: NormalizedMessage::stable_id(&channel.id, id),
        channel: channel.clone(),
        external_id: id.to_owned(),
        thread_key: None,
        sender: Sender {
            kind: "webchat".into(),
            address: from.to_owned(),
            name: None,
        },
        subject: None,
        text: text.to_owned(),
        attachments: Vec::new(),
        received_at: OffsetDateTime::now_utc(),
        auto_submitted: false,
        metadata: Default::default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchboard_channel::testing::{Conformance, check_conformance};

    #[tokio::test]
    async fn template_conforms() {
        let channel = ChannelRef {
            id: "t".into(),
            kind: "template".into(),
        };
        check_conformance(
            &Config::default().build(),
            Conformance {
                channel,
                valid: WebhookRequest::post(r#"{"id": "1", "from": "u", "text": "hi"}"#),
                invalid: vec![(
                    "no text",
                    WebhookRequest::post(r#"{"id": "1", "from": "u"}"#),
                    StatusCode::BAD_REQUEST,
                )],
            },
        )
        .await;
    }
}
