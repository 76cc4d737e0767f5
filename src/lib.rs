//! Switchboard: an omnichannel message-routing daemon.
//!
//! # Layout
//! - [`cli`]: `switchboard run | check | explain`.
//! - [`config`]: the TOML config with env overrides and interpolation; pure loading and
//!   validation that reports every problem with file, line and key.
//! - [`app`]: the supervisor: builds the components, handles signals (SIGHUP reloads rules),
//!   shuts down in order.
//! - [`channels`]: the closed registry of channel adapters (crates under `channels/`).
//! - [`bus`]: AMQP topology, the confirmed publisher adapters use, the router's transactional
//!   link.
//! - [`store`]: customers, identities, conversations, messages, decisions (SQLite or
//!   PostgreSQL).
//! - [`router`]: rule sets, the pure decision, rule tests, the routing service.
//! - [`http`]: webhooks, health, metrics, the agent/admin API.
//! - [`reload`]: rule reloads on SIGHUP and on file changes; the last refused reload.
//! - [`telemetry`]: logs and metrics setup.

pub mod app;
pub mod bus;
pub mod channels;
pub mod cli;
pub mod config;
pub mod http;
pub mod reload;
pub mod router;
pub mod store;
pub mod telemetry;

/// mimalloc instead of the system allocator, for the daemon and everything built on this
/// library (tests, benchmarks): the router allocates and frees on several threads per
/// message (envelopes, assignments, rows), where glibc's malloc spent ~5 % of the machine.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
