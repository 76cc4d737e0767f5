//! Rule reloads: on SIGHUP and whenever a file in the rules directory changes (debounced). The
//! whole set is loaded and validated; only a valid set is swapped in, atomically. A refused set
//! leaves the previous one routing, and its problems go to the log, to
//! `switchboard_rules_reload_failures_total` and to `GET /api/v1/rules`.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use notify::{RecursiveMode, Watcher};
use serde::Serialize;
use time::OffsetDateTime;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::bus::Bus;
use crate::router::rules::RuleSet;

/// Quiet time after the last change before reloading: editors write a file in several steps.
const DEBOUNCE: Duration = Duration::from_millis(250);

/// The last refused reload, for `/api/v1/rules`.
#[derive(Debug, Clone, Serialize)]
pub struct ReloadFailure {
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    /// Every problem, `file:line:col: message`.
    pub problems: Vec<String>,
}

pub struct Reloader {
    pub rules: Arc<ArcSwap<RuleSet>>,
    pub dir: PathBuf,
    bus: Bus,
    last_failure: Mutex<Option<ReloadFailure>>,
}

impl Reloader {
    pub fn new(rules: Arc<ArcSwap<RuleSet>>, dir: PathBuf, bus: Bus) -> Self {
        Self {
            rules,
            dir,
            bus,
            last_failure: Mutex::new(None),
        }
    }

    pub fn last_failure(&self) -> Option<ReloadFailure> {
        self.last_failure
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    fn set_failure(&self, failure: Option<ReloadFailure>) {
        *self
            .last_failure
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = failure;
    }

    /// Loads and validates the whole rule set; swaps it in only if valid. True if swapped.
    pub async fn reload(&self) -> bool {
        let next = match RuleSet::load_dir(&self.dir) {
            Ok(next) => next,
            Err(diagnostics) => {
                let problems: Vec<String> = diagnostics.0.iter().map(ToString::to_string).collect();
                for problem in &problems {
                    error!(%problem, "Routing rules refused; the previous rules keep routing.");
                }
                self.refuse(problems);
                return false;
            }
        };
        if next.version == self.rules.load().version {
            debug!("Rules directory changed, rule files did not.");
            self.set_failure(None);
            return false;
        }
        // An assignment to a queue the broker does not have would be dropped: new queues must
        // exist before the rules that route to them.
        if let Err(error) = self.bus.declare_agent_queues(&next.queue_names()).await {
            let problem = format!(
                "the agent queues cannot be declared now ({error}); reload again once the bus is back"
            );
            error!(%problem, "Routing rules refused; the previous rules keep routing.");
            self.refuse(vec![problem]);
            return false;
        }
        info!(version = %next.version, queues = next.queues.len(), rules = next.rules.len(), "Routing rules reloaded.");
        metrics::counter!("switchboard_rules_reloads_total").increment(1);
        self.rules.store(Arc::new(next));
        self.set_failure(None);
        true
    }

    fn refuse(&self, problems: Vec<String>) {
        metrics::counter!("switchboard_rules_reload_failures_total").increment(1);
        self.set_failure(Some(ReloadFailure {
            at: OffsetDateTime::now_utc(),
            problems,
        }));
    }

    /// Watches the rules directory (not the files: editors replace files by rename, and
    /// Kubernetes swaps a ConfigMap's `..data` symlink) and reloads after changes settle.
    pub fn watch(
        self: Arc<Self>,
        cancel: CancellationToken,
    ) -> Option<impl std::future::Future<Output = ()>> {
        let (changed_tx, mut changed) = mpsc::channel::<()>(1);
        let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            if event.is_ok_and(|e| !e.kind.is_access()) {
                // Full means a reload is already pending: nothing is lost.
                let _ = changed_tx.try_send(());
            }
        });
        let mut watcher = match watcher {
            Ok(watcher) => watcher,
            Err(error) => {
                warn!(%error, "Cannot watch the rules directory; reload with SIGHUP.");
                return None;
            }
        };
        if let Err(error) = watcher.watch(&watch_target(&self.dir), RecursiveMode::NonRecursive) {
            warn!(%error, dir = %self.dir.display(), "Cannot watch the rules directory; reload with SIGHUP.");
            return None;
        }
        info!(dir = %self.dir.display(), "Watching the rules directory.");
        Some(async move {
            let _watcher = watcher;
            loop {
                tokio::select! {
                    () = cancel.cancelled() => break,
                    event = changed.recv() => if event.is_none() { break },
                }
                // Debounce: wait until nothing changed for a moment.
                while let Ok(Some(())) = tokio::time::timeout(DEBOUNCE, changed.recv()).await {}
                self.reload().await;
            }
        })
    }
}

/// The directory itself; through a symlinked directory, its target.
fn watch_target(dir: &Path) -> PathBuf {
    std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf())
}
