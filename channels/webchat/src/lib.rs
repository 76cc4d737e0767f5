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
    /// Identity kinds (`email`, `phone`) this channel's callers have verified, e.g. a chat
    /// widget behind the site's login. A verified identity that belongs to another customer
    /// merges the two; an unverified one only records a merge suggestion. Default: none.
    #[serde(default)]
    pub verified_identities: Vec<String>,
    /// Fold `dana+shop@example.com` to `dana@example.com`. Default: off (not every mail system
    /// treats `+` as a tag).
    #[serde(default)]
    pub fold_plus_addresses: bool,
}

/// How the adapter turns a body into a message.
#[derive(Debug, Clone, Default)]
pub struct Options {
    pub verified_email: bool,
    pub verified_phone: bool,
    pub fold_plus_addresses: bool,
}

impl Config {
    /// Offline checks; every problem as `(key, message)`.
    pub fn validate(&self) -> Vec<(String, String)> {
        let mut problems = Vec::new();
        if matches!(&self.secret, Some(secret) if secret.is_empty()) {
            problems.push((
                "secret".to_owned(),
                "is empty: remove the key to disable signatures, or set a secret".to_owned(),
            ));
        }
        for kind in &self.verified_identities {
            if kind != "email" && kind != "phone" {
                problems.push((
                    "verified_identities".to_owned(),
                    format!("`{kind}` is not an identity this channel takes: use email or phone"),
                ));
            }
        }
        problems
    }

    pub fn build(self) -> Webchat {
        let verified = |kind: &str| self.verified_identities.iter().any(|k| k == kind);
        Webchat {
            options: Options {
                verified_email: verified("email"),
                verified_phone: verified("phone"),
                fold_plus_addresses: self.fold_plus_addresses,
            },
            secret: self.secret.map(String::into_bytes),
        }
    }
}

/// The web chat adapter.
#[derive(Debug, Clone)]
pub struct Webchat {
    secret: Option<Vec<u8>>,
    options: Options,
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
        let message = match convert(ctx.channel(), &request.body, &self.options) {
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
