//! The registry of channel adapters: one closed enum, one feature-gated variant per adapter
//! crate, so a new adapter without its match arms does not compile.

use switchboard_channel::{ChannelContext, WebhookRequest, WebhookResponse};

use crate::config::ChannelConfig;

/// Adapter kinds this build supports.
pub const KINDS: &[&str] = &[
    #[cfg(feature = "webchat")]
    "webchat",
];

pub enum ChannelAdapter {
    #[cfg(feature = "webchat")]
    Webchat(switchboard_webchat::Webchat),
}

impl ChannelAdapter {
    /// Builds the adapter of `[[channels]]` entry `index`, or every problem with its key path.
    pub fn from_config(
        index: usize,
        channel: &ChannelConfig,
    ) -> Result<Self, Vec<(String, String)>> {
        let at = |key: &str| format!("channels.{index}.{key}");
        let options = toml::Value::Table(channel.options.clone());
        let located = |problems: Vec<(String, String)>| -> Vec<(String, String)> {
            problems
                .into_iter()
                .map(|(key, message)| (at(&key), message))
                .collect()
        };
        match channel.kind.as_str() {
            #[cfg(feature = "webchat")]
            "webchat" => {
                let config: switchboard_webchat::Config =
                    options.try_into().map_err(|error: toml::de::Error| {
                        vec![(
                            format!("channels.{index}"),
                            format!("({}): {}", channel.kind, error.message().trim()),
                        )]
                    })?;
                let problems = config.validate();
                if problems.is_empty() {
                    Ok(ChannelAdapter::Webchat(config.build()))
                } else {
                    Err(located(problems))
                }
            }
            other => Err(vec![(
                at("kind"),
                format!(
                    "`{other}` is not an adapter kind this build has (available: {})",
                    KINDS.join(", ")
                ),
            )]),
        }
    }

    pub async fn handle(&self, ctx: &ChannelContext, request: WebhookRequest) -> WebhookResponse {
        match self {
            #[cfg(feature = "webchat")]
            ChannelAdapter::Webchat(adapter) => {
                switchboard_channel::Adapter::handle(adapter, ctx, request).await
            }
        }
    }
}

/// Checks every channel entry offline; problems as `(key path, message)`.
pub fn validate(channels: &[ChannelConfig]) -> Vec<(String, String)> {
    channels
        .iter()
        .enumerate()
        .filter_map(|(index, channel)| ChannelAdapter::from_config(index, channel).err())
        .flatten()
        .collect()
}
