//! The supervisor: builds every component from the config, runs them, reloads rules on SIGHUP,
//! and shuts down in order on SIGTERM/SIGINT (stop intake, drain in-flight work to a deadline,
//! close the bus and the store).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;
use arc_swap::ArcSwap;
use switchboard_channel::{ChannelContext, ChannelRef};
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::bus::Bus;
use crate::bus::amqp::AmqpBus;
use crate::bus::embedded::EmbeddedBus;
use crate::channels::ChannelAdapter;
use crate::config::Loaded;
use crate::http::{AppState, ChannelEntry};
use crate::reload::Reloader;
use crate::router::rules::RuleSet;
use crate::router::service::Router;
use crate::store::{self, SqliteStore, Store};
use crate::telemetry::redact_url;

/// Runs the daemon until a termination signal.
pub async fn run(loaded: Loaded, rules_override: Option<PathBuf>) -> anyhow::Result<()> {
    let mut config = loaded.config.clone();
    let zero_config = loaded.path.is_none();
    let metrics = crate::telemetry::init_metrics();

    let rules_dir = rules_override.unwrap_or_else(|| config.rules_dir(loaded.base_dir()));
    let rules = if zero_config && !rules_dir.is_dir() {
        info!(dir = %rules_dir.display(), "No rules directory: using the built-in rule set (one catch-all queue, `general`).");
        RuleSet::builtin()
    } else {
        let rules = RuleSet::load_dir(&rules_dir).map_err(|diagnostics| {
            anyhow::anyhow!("the routing rules are invalid:\n{diagnostics}")
        })?;
        info!(dir = %rules_dir.display(), version = %rules.version, queues = rules.queues.len(), rules = rules.rules.len(), "Routing rules loaded.");
        rules
    };
    let rules = Arc::new(ArcSwap::from_pointee(rules));

    // Intake (HTTP, router) stops first; the bus and the store close after the drain.
    let intake = CancellationToken::new();
    let bus_cancel = CancellationToken::new();
    let intake_tasks = TaskTracker::new();
    let bus_tasks = TaskTracker::new();

    let (store, bus) = match config.bus.url.clone() {
        Some(url) => {
            let store = store::open(
                &config.store.url,
                config.routing.reopen_window,
                config.routing.history,
            )
            .await?;
            let bus = AmqpBus::start(
                &url,
                &config.bus,
                rules.load().queue_names(),
                &bus_tasks,
                bus_cancel.clone(),
            );
            info!(broker = %redact_url(&url), prefix = %config.bus.prefix, store = %redact_url(&config.store.url), "Mode: RabbitMQ bus.");
            (store, Bus::Amqp(bus))
        }
        None => {
            let sqlite = SqliteStore::open(&config.store.url)
                .await?
                .with_reopen_window(config.routing.reopen_window)
                .with_history(config.routing.history)
                .with_cache(config.store.cache_customers);
            let bus = EmbeddedBus::start(
                sqlite.pool().clone(),
                &config.bus,
                &bus_tasks,
                bus_cancel.clone(),
            )
            .await
            .with_context(|| format!("starting the embedded bus in {}", sqlite.path().display()))?;
            info!(data = %sqlite.path().display(), "Mode: single node, embedded bus in the store (no broker).");
            let store: Arc<dyn Store> = Arc::new(sqlite);
            (store, Bus::Embedded(bus))
        }
    };

    if zero_config && config.channels.is_empty() {
        warn!("No config file: serving an unsigned web chat channel at /webhooks/webchat.");
        config.channels.push(crate::config::ChannelConfig {
            id: "webchat".to_owned(),
            kind: "webchat".to_owned(),
            max_body_bytes: None,
            options: toml::Table::new(),
        });
    }
    if zero_config && config.http.admin_token.is_none() {
        config.http.admin_token = Some(admin_token_file(&config.store.url)?);
    }

    let mut channels = HashMap::new();
    for (index, channel) in config.channels.iter().enumerate() {
        let adapter = ChannelAdapter::from_config(index, channel).map_err(|problems| {
            anyhow::anyhow!(
                "channel `{}`: {}",
                channel.id,
                problems
                    .iter()
                    .map(|(k, m)| format!("{k}: {m}"))
                    .collect::<Vec<_>>()
                    .join("; ")
            )
        })?;
        let context = ChannelContext::new(
            ChannelRef {
                id: channel.id.clone(),
                kind: channel.kind.clone(),
            },
            Arc::new(bus.clone()),
        );
        channels.insert(
            channel.id.clone(),
            ChannelEntry {
                adapter,
                context,
                max_body_bytes: channel.max_body_bytes.unwrap_or(config.http.max_body_bytes),
            },
        );
        info!(channel = %channel.id, kind = %channel.kind, path = %format!("/webhooks/{}", channel.id), "Channel ready.");
    }

    let loads = crate::bus::QueueLoads::default();
    intake_tasks.spawn(
        bus.clone()
            .sample_loads(rules.clone(), loads.clone(), intake.clone()),
    );
    let router = Router {
        rules: rules.clone(),
        store: store.clone(),
        loads,
    };
    intake_tasks.spawn(router.run_on_own_thread(bus.router_link(), intake.clone()));

    let reloader = Arc::new(Reloader::new(rules.clone(), rules_dir.clone(), bus.clone()));
    if config.routing.watch
        && rules_dir.is_dir()
        && let Some(watch) = reloader.clone().watch(intake.clone())
    {
        intake_tasks.spawn(watch);
    }

    let state = Arc::new(AppState {
        channels,
        bus: bus.clone(),
        store: store.clone(),
        rules: rules.clone(),
        reloader: reloader.clone(),
        admin_token: config.http.admin_token.clone(),
        metrics,
        shutdown: intake.clone(),
    });
    let listener = tokio::net::TcpListener::bind(config.http.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.http.listen))?;
    info!(listen = %config.http.listen, "HTTP server listening.");
    let server_stop = intake.clone();
    intake_tasks.spawn(async move {
        let server = axum::serve(listener, crate::http::router(state))
            .with_graceful_shutdown(server_stop.cancelled_owned());
        if let Err(error) = server.await {
            error!(%error, "HTTP server failed.");
        }
    });

    wait_for_shutdown(&reloader).await;

    info!(deadline = ?config.daemon.shutdown_timeout, "Shutting down: intake stopped, draining.");
    intake.cancel();
    intake_tasks.close();
    if tokio::time::timeout(config.daemon.shutdown_timeout, intake_tasks.wait())
        .await
        .is_err()
    {
        warn!(
            "In-flight work did not finish before the deadline; unacknowledged messages will be redelivered."
        );
    }
    bus_cancel.cancel();
    bus_tasks.close();
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), bus_tasks.wait()).await;
    store.close().await;
    info!("Stopped.");
    Ok(())
}

/// The API token of a zero-config start: read from, or created in, `admin-token` (mode 0600)
/// beside the SQLite database, or with a PostgreSQL store in `$STATE_DIRECTORY` or else the
/// working directory, so it survives restarts.
fn admin_token_file(store_url: &str) -> anyhow::Result<String> {
    let dir = if store::is_postgres(store_url) {
        std::env::var("STATE_DIRECTORY")
            .ok()
            .and_then(|state| state.split(':').next().map(PathBuf::from))
            .unwrap_or_default()
    } else {
        let database = store::sqlite_path(store_url).context("locating the data directory")?;
        database.parent().map(PathBuf::from).unwrap_or_default()
    };
    let path = dir.join("admin-token");
    if let Ok(token) = std::fs::read_to_string(&path) {
        let token = token.trim().to_owned();
        if token.len() >= 16 {
            let shown = std::fs::canonicalize(&path).unwrap_or(path);
            info!(path = %shown.display(), "API token read (Authorization: Bearer <token>).");
            return Ok(token);
        }
    }
    let token = format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    );
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options
        .open(&path)
        .with_context(|| format!("cannot write the API token to {}", path.display()))?;
    std::io::Write::write_all(&mut file, token.as_bytes())
        .with_context(|| format!("cannot write the API token to {}", path.display()))?;
    let shown = std::fs::canonicalize(&path).unwrap_or(path);
    info!(path = %shown.display(), "API token created (Authorization: Bearer <token>).");
    Ok(token)
}

/// Serves signals until SIGTERM or SIGINT; SIGHUP reloads the rules.
async fn wait_for_shutdown(reloader: &Reloader) {
    let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) else {
        error!("Cannot install signal handlers; stopping.");
        return;
    };
    loop {
        tokio::select! {
            _ = term.recv() => { info!("SIGTERM received."); return; }
            _ = int.recv() => { info!("SIGINT received."); return; }
            _ = hup.recv() => {
                info!("SIGHUP received: reloading the routing rules.");
                reloader.reload().await;
            }
        }
    }
}
