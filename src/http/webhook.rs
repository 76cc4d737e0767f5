//! `/webhooks/{channel_id}`: size limit, then the channel's adapter.

use std::sync::Arc;

use axum::Json;
use axum::body::{Body, to_bytes};
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
    if declared.is_some_and(|length| length > limit) {
        return too_large(limit);
    }
    let body = match to_bytes(body, limit).await {
        Ok(body) => body,
        Err(_) => return too_large(limit),
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

fn too_large(limit: usize) -> Response {
    let mut response = reply(WebhookResponse::error(
        StatusCode::PAYLOAD_TOO_LARGE,
        "body_too_large",
        format!("the body is larger than this channel's limit of {limit} bytes"),
    ));
    // The rest of the body is not read: the connection cannot carry another request.
    response.headers_mut().insert(
        axum::http::header::CONNECTION,
        axum::http::HeaderValue::from_static("close"),
    );
    response
}

fn reply(response: WebhookResponse) -> Response {
    (response.status, Json(response.body)).into_response()
}
