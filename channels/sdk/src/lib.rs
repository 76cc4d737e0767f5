//! The Switchboard channel SDK: everything a channel adapter needs and nothing of the daemon.
//!
//! # Layout
//! - [`envelope`]: the normalized message and the CloudEvents document it travels in.
//! - [`adapter`]: the [`Adapter`] trait, the webhook request/response, and the
//!   [`ChannelContext`] whose `publish` resolves only once the bus confirmed.
//! - [`identity`]: email and phone normalization, the same for every adapter.
//! - [`signature`]: constant-time HMAC checks.
//! - [`testing`]: an in-memory publisher and the conformance checks every adapter runs.

pub mod adapter;
pub mod envelope;
pub mod identity;
pub mod signature;
pub mod testing;

pub use adapter::{
    Adapter, ChannelContext, PublishError, Published, Publisher, WebhookRequest, WebhookResponse,
};
pub use envelope::{Attachment, ChannelRef, CloudEvent, NormalizedMessage, Sender};
