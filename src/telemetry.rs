//! Logs (tracing) and metrics (Prometheus).

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::EnvFilter;

use crate::config::{LogConfig, LogFormat};

/// PostgreSQL's notices (such as "relation `_sqlx_migrations` already exists" on every start)
/// are not worth an info line; `RUST_LOG` can still ask for them.
const QUIET: &str = "sqlx::postgres::notice=warn";

/// Installs the global log subscriber. `RUST_LOG` overrides `[log] level`.
pub fn init_logging(config: &LogConfig) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(format!("{QUIET},{}", config.level)))
        .unwrap_or_else(|_| EnvFilter::new(format!("{QUIET},info")));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match config.format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// Latency buckets, in seconds: 0.5 ms to 10 s.
const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Installs the global metrics recorder; `None` if one is already installed.
pub fn init_metrics() -> Option<PrometheusHandle> {
    let builder = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".to_owned()), LATENCY_BUCKETS)
        .ok()?;
    let handle = builder.install_recorder().ok()?;
    describe();
    Some(handle)
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_gauge!(
        "switchboard_queue_depth",
        "Assignments waiting in each agent queue (sampled every second)."
    );
    describe_counter!(
        "switchboard_messages_received_total",
        "Webhook requests per channel kind and outcome (accepted, refused)."
    );
    describe_counter!(
        "switchboard_assignments_total",
        "Assignments published per agent queue."
    );
    describe_histogram!(
        "switchboard_routing_latency_seconds",
        "Router batch latency: taken from the router queue to committed assignment."
    );
    describe_counter!(
        "switchboard_publish_failures_total",
        "Publishes the bus did not confirm, per stage."
    );
    describe_counter!(
        "switchboard_bus_reconnects_total",
        "RabbitMQ reconnections."
    );
    describe_counter!(
        "switchboard_dead_letters_total",
        "Poison messages moved to the dead queue."
    );
    describe_counter!(
        "switchboard_duplicates_total",
        "Redelivered or retried messages acknowledged without a second assignment."
    );
    describe_counter!(
        "switchboard_rules_reloads_total",
        "Rule set reloads applied."
    );
    describe_counter!(
        "switchboard_rules_reload_failures_total",
        "Rule set reloads refused (the old set keeps routing)."
    );
}

/// A URL without its user and password, for logs and errors: the user information before `@`,
/// and the value of any query parameter whose name holds `password` (PostgreSQL URLs take
/// `?password=` and `?sslpassword=`).
pub fn redact_url(url: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let mut redacted = match (base.find("://"), base.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}://…@{}", &base[..scheme], &base[at + 1..])
        }
        _ => base.to_owned(),
    };
    if let Some(query) = query {
        redacted.push('?');
        for (i, pair) in query.split('&').enumerate() {
            if i > 0 {
                redacted.push('&');
            }
            match pair.split_once('=') {
                Some((key, _)) if key.to_ascii_lowercase().contains("password") => {
                    redacted.push_str(key);
                    redacted.push_str("=…");
                }
                _ => redacted.push_str(pair),
            }
        }
    }
    redacted
}

/// An error and its causes on one line, each named once: a cause whose text its parent's
/// message already carries (thiserror's `{0}` over a `#[from]`, sqlx over its I/O error) is
/// left out.
pub fn report(error: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in error.chain() {
        let message = cause.to_string();
        if text.contains(&message) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&message);
    }
    text
}

#[cfg(test)]
mod tests {
    use anyhow::Context as _;

    use super::redact_url;

    #[test]
    fn a_redacted_url_keeps_no_password() {
        for (url, redacted) in [
            (
                "postgres://sb:s3cret@db:5432/switchboard",
                "postgres://…@db:5432/switchboard",
            ),
            (
                "postgres://sb@db/switchboard?password=s3cret&sslmode=require",
                "postgres://…@db/switchboard?password=…&sslmode=require",
            ),
            (
                "postgres://db/switchboard?user=sb&Password=s3cret&sslpassword=s3cret",
                "postgres://db/switchboard?user=sb&Password=…&sslpassword=…",
            ),
            (
                "postgres://db/switchboard?user=dana@example.com",
                "postgres://db/switchboard?user=dana@example.com",
            ),
            (
                "amqp://guest:guest@127.0.0.1:5672/%2f",
                "amqp://…@127.0.0.1:5672/%2f",
            ),
            (
                "sqlite:///var/lib/switchboard/switchboard.db",
                "sqlite:///var/lib/switchboard/switchboard.db",
            ),
        ] {
            assert_eq!(redact_url(url), redacted, "{url}");
        }
    }

    #[test]
    fn a_report_names_each_cause_once() {
        let io = std::io::Error::other("connection refused");
        let error = Err::<(), _>(io)
            .context("cannot reach the broker: connection refused")
            .context("starting the bus")
            .unwrap_err();
        assert_eq!(
            super::report(&error),
            "starting the bus: cannot reach the broker: connection refused"
        );
        let error = anyhow::anyhow!("outer").context("context");
        assert_eq!(super::report(&error), "context: outer");
    }
}
