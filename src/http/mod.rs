//! The HTTP server: webhooks (`/webhooks/{channel_id}`), health (`/healthz`, `/readyz`),
//! Prometheus metrics (`/metrics`) and the admin/agent API (`/api/v1`).

mod api;
mod health;
mod webhook;

use std::collections::HashMap;
use std::sync::Arc;

use arc_swap::ArcSwap;
use axum::Router;
use axum::routing::{get, post};
use metrics_exporter_prometheus::PrometheusHandle;
use switchboard_channel::ChannelContext;
use tokio_util::sync::CancellationToken;

use crate::bus::Bus;
use crate::channels::ChannelAdapter;
use crate::router::rules::RuleSet;
use crate::store::Store;

/// A configured channel, ready to take webhooks.
pub struct ChannelEntry {
    pub adapter: ChannelAdapter,
    pub context: ChannelContext,
    pub max_body_bytes: usize,
}

/// What every handler shares.
pub struct AppState {
    pub channels: HashMap<String, ChannelEntry>,
    pub bus: Bus,
    pub store: Arc<dyn Store>,
    pub rules: Arc<ArcSwap<RuleSet>>,
    pub reloader: Arc<crate::reload::Reloader>,
    pub admin_token: Option<String>,
    pub metrics: Option<PrometheusHandle>,
    /// Cancelled at shutdown: long polls answer at once.
    pub shutdown: CancellationToken,
}

pub fn router(state: Arc<AppState>) -> Router {
    let api = Router::new()
        .route("/queues/{name}/claim", post(api::claim))
        .route("/assignments/{id}/ack", post(api::ack))
        .route("/rules", get(api::rules))
        .route("/events", get(api::events))
        .route("/customers", get(api::find_customer))
        .route(
            "/customers/{id}",
            get(api::get_customer).patch(api::patch_customer),
        )
        .route("/customers/{id}/identities", post(api::link_identity))
        .route("/customers/{id}/merge", post(api::merge_customers))
        .route("/customers/{id}/merges", get(api::customer_merges))
        .route("/conversations/{id}", get(api::get_conversation))
        .route("/conversations/{id}/close", post(api::close_conversation))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            api::require_token,
        ))
        .layer(axum::extract::DefaultBodyLimit::max(api::API_BODY_LIMIT));
    Router::new()
        .nest("/api/v1", api)
        .route(
            "/webhooks/{channel_id}",
            get(webhook::handle).post(webhook::handle),
        )
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route("/metrics", get(health::metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}

async fn not_found(uri: axum::http::Uri) -> axum::response::Response {
    api::error(
        axum::http::StatusCode::NOT_FOUND,
        "not_found",
        format!("no such endpoint: {}", uri.path()),
    )
}

async fn method_not_allowed(
    method: axum::http::Method,
    uri: axum::http::Uri,
) -> axum::response::Response {
    api::error(
        axum::http::StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("{method} is not allowed on {}", uri.path()),
    )
}
