//! Web chat and generic API channel: `POST /webhooks/{channel_id}` with a small JSON body.
//!
//! ```json
//! {"message_id": "m-1", "customer": {"id": "visitor-123", "email": "dana@example.com",
//!  "phone": "+15551234567", "name": "Dana"}, "text": "…", "attributes": {"plan": "pro"}}
//! ```
//! With a `secret`, the body must be signed: `X-Switchboard-Signature: sha256=<hex>` is the
//! HMAC-SHA256 of the raw body.

mod convert;

use async_trait::async_trait;
use http::{Method, StatusCode};
use serde::Deserialize;
use serde_json::json;
use switchboard_channel::signature::{SignatureError, verify_sha256_header};
use switchboard_channel::{Adapter, ChannelContext, WebhookRequest, WebhookResponse};

pub use convert::{ConvertError, convert};

/// The header carrying the body's signature.
pub const SIGNATURE_HEADER: &str = "x-switchboard-signature";

/// `[[channels]]` keys of a `kind = "webchat"` channel.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Shared secret for HMAC-SHA256 body signatures. Absent: requests are not signed (fine
    /// behind an authenticating proxy, not on the open internet).
    #[serde(default)]
    pub secret: Option<String>,
}

impl Config {
    /// Offline checks; every problem as `(key, message)`.
    pub fn validate(&self) -> Vec<(String, String)> {
        match &self.secret {
            Some(secret) if secret.is_empty() => vec![(
                "secret".to_owned(),
                "is empty: remove the key to disable signatures, or set a secret".to_owned(),
            )],
            _ => Vec::new(),
        }
    }

    pub fn build(self) -> Webchat {
        Webchat {
            secret: self.secret.map(String::into_bytes),
        }
    }
}

/// The web chat adapter.
#[derive(Debug, Clone)]
pub struct Webchat {
    secret: Option<Vec<u8>>,
}

#[async_trait]
impl Adapter for Webchat {
    fn kind(&self) -> &'static str {
        "webchat"
    }

    async fn handle(&self, ctx: &ChannelContext, request: WebhookRequest) -> WebhookResponse {
        if request.method != Method::POST {
            return WebhookResponse::error(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "web chat accepts POST only",
            );
        }
        if let Some(secret) = &self.secret
            && let Err(error) =
                verify_sha256_header(secret, &request.body, request.header(SIGNATURE_HEADER))
        {
            let message = match error {
                SignatureError::Missing => {
                    format!("this channel requires a signed body: header {SIGNATURE_HEADER}")
                }
                other => other.to_string(),
            };
            return WebhookResponse::error(StatusCode::UNAUTHORIZED, "bad_signature", message);
        }
        let message = match convert(ctx.channel(), &request.body) {
            Ok(message) => message,
            Err(error) => return WebhookResponse::bad_field(error.field(), error.to_string()),
        };
        match ctx.publish(message).await {
            Ok(published) => WebhookResponse::json(
                StatusCode::OK,
                json!({"message_id": published.message_id()}),
            ),
            Err(error) => WebhookResponse::publish_failed(&error),
        }
    }
}
