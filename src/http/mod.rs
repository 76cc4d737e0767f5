//! The HTTP server: webhooks (`/webhooks/{channel_id}`), health (`/healthz`, `/readyz`),
//! Prometheus metrics (`/metrics`) and the admin/agent API (`/api/v1`).

mod health;
mod webhook;

use std::collections::HashMap;
use std::sync::Arc;

use axum::Router;
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;
use switchboard_channel::ChannelContext;

use crate::bus::amqp::AmqpBus;
use crate::channels::ChannelAdapter;
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
    pub bus: AmqpBus,
    pub store: Arc<dyn Store>,
    pub metrics: Option<PrometheusHandle>,
}

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route(
            "/webhooks/{channel_id}",
            get(webhook::handle).post(webhook::handle),
        )
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route("/metrics", get(health::metrics))
        .with_state(state)
}
