//! `/webhooks/{channel_id}`: size limit, then the channel's adapter.

use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use switchboard_channel::{WebhookRequest, WebhookResponse};

use super::AppState;

pub async fn handle(
    State(state): State<Arc<AppState>>,
    Path(channel_id): Path<String>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let Some(channel) = state.channels.get(&channel_id) else {
        return reply(WebhookResponse::error(
            StatusCode::NOT_FOUND,
            "unknown_channel",
            format!("no channel `{channel_id}` is configured"),
        ));
    };
    let limit = channel.max_body_bytes;
    let declared = headers
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|length| length > DRAIN_LIMIT) {
        return too_large(limit, false);
    }
    let body = match read_limited(body, limit).await {
        Ok(body) => body,
        Err(drained) => return too_large(limit, drained),
    };
    let request = WebhookRequest {
        method,
        headers,
        query: uri.query().map(str::to_owned),
        body,
    };
    let kind = channel.context.channel().kind.clone();
    let response = channel.adapter.handle(&channel.context, request).await;
    let outcome = if response.status.is_success() {
        "accepted"
    } else {
        "refused"
    };
    metrics::counter!("switchboard_messages_received_total", "channel_kind" => kind, "outcome" => outcome)
        .increment(1);
    reply(response)
}

/// An oversized body is still read (and dropped) up to this size, so the client can read the
/// 413 and keep its connection; past it the connection is closed.
const DRAIN_LIMIT: usize = 8 * 1024 * 1024;
/// Longest wait for the next piece of a body.
const READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The body if it fits in `limit`; otherwise `Err(drained)`: whether it was read to its end.
async fn read_limited(body: Body, limit: usize) -> Result<bytes::Bytes, bool> {
    use futures::StreamExt;
    let mut stream = body.into_data_stream();
    let mut buffer = bytes::BytesMut::new();
    let mut total = 0usize;
    loop {
        let chunk = match tokio::time::timeout(READ_TIMEOUT, stream.next()).await {
            Ok(Some(Ok(chunk))) => chunk,
            Ok(None) => break,
            Ok(Some(Err(_))) | Err(_) => return Err(false),
        };
        total = total.saturating_add(chunk.len());
        if total > DRAIN_LIMIT {
            return Err(false);
        }
        if total <= limit {
            buffer.extend_from_slice(&chunk);
        }
    }
    if total > limit {
        Err(true)
    } else {
        Ok(buffer.freeze())
    }
}

fn too_large(limit: usize, drained: bool) -> Response {
    let mut response = reply(WebhookResponse::error(
        StatusCode::PAYLOAD_TOO_LARGE,
        "body_too_large",
        format!("the body is larger than this channel's limit of {limit} bytes"),
    ));
    if !drained {
        // The rest of the body was not read: the connection cannot carry another request.
        response.headers_mut().insert(
            axum::http::header::CONNECTION,
            axum::http::HeaderValue::from_static("close"),
        );
    }
    response
}

fn reply(response: WebhookResponse) -> Response {
    (response.status, Json(response.body)).into_response()
}
