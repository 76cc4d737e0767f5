//! Liveness, readiness and metrics.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::AppState;

/// Alive: the process answers.
pub async fn healthz() -> Response {
    Json(json!({"status": "ok"})).into_response()
}

/// Ready: the bus is connected and the store answers.
pub async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    let bus = state.bus.is_ready().await;
    let store = state.store.ping().await;
    let body = json!({
        "bus": if bus { "ok".to_owned() } else { "not connected".to_owned() },
        "store": match &store { Ok(()) => "ok".to_owned(), Err(error) => error.to_string() },
    });
    let status = if bus && store.is_ok() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}

pub async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    match &state.metrics {
        Some(handle) => (
            [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
            handle.render(),
        )
            .into_response(),
        None => (StatusCode::NOT_FOUND, "metrics are not enabled").into_response(),
    }
}
