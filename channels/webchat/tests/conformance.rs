//! The SDK's conformance checks, run against the web chat adapter.

use http::StatusCode;
use switchboard_channel::signature::sign_sha256_header;
use switchboard_channel::testing::{Conformance, check_conformance};
use switchboard_channel::{ChannelRef, WebhookRequest};
use switchboard_webchat::{Config, SIGNATURE_HEADER};

const BODY: &str = include_str!("fixtures/design-example.json");

fn channel() -> ChannelRef {
    ChannelRef {
        id: "site-chat".into(),
        kind: "webchat".into(),
    }
}

fn signed(secret: &str, body: &str) -> WebhookRequest {
    WebhookRequest::post(body.to_owned()).with_header(
        SIGNATURE_HEADER,
        &sign_sha256_header(secret.as_bytes(), body.as_bytes()),
    )
}

#[tokio::test]
async fn unsigned_channel_conforms() {
    let adapter = Config::default().build();
    let message = check_conformance(
        &adapter,
        Conformance {
            channel: channel(),
            valid: WebhookRequest::post(BODY),
            invalid: vec![
                (
                    "invalid JSON",
                    WebhookRequest::post("{nope"),
                    StatusCode::BAD_REQUEST,
                ),
                (
                    "missing text",
                    WebhookRequest::post(r#"{"customer": {"id": "v"}}"#),
                    StatusCode::BAD_REQUEST,
                ),
                (
                    "empty text",
                    WebhookRequest::post(r#"{"customer": {"id": "v"}, "text": ""}"#),
                    StatusCode::BAD_REQUEST,
                ),
            ],
        },
    )
    .await;
    assert_eq!(message.channel.kind, "webchat");
    assert_eq!(message.external_id, "m-1");
}

#[tokio::test]
async fn signed_channel_conforms() {
    let adapter = Config {
        secret: Some("s3cret".into()),
        ..Config::default()
    }
    .build();
    check_conformance(
        &adapter,
        Conformance {
            channel: channel(),
            valid: signed("s3cret", BODY),
            invalid: vec![
                (
                    "unsigned",
                    WebhookRequest::post(BODY),
                    StatusCode::UNAUTHORIZED,
                ),
                (
                    "wrong secret",
                    signed("guess", BODY),
                    StatusCode::UNAUTHORIZED,
                ),
                (
                    "body changed after signing",
                    WebhookRequest::post(BODY.replace("invoice", "refund")).with_header(
                        SIGNATURE_HEADER,
                        &sign_sha256_header(b"s3cret", BODY.as_bytes()),
                    ),
                    StatusCode::UNAUTHORIZED,
                ),
            ],
        },
    )
    .await;
}
