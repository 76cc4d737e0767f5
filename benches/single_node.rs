//! Single-node mode end to end: web chat posts → embedded bus → router → claimable in an agent
//! queue, through the real daemon binary with no broker.
//!
//! `cargo bench --bench single_node`. Environment: `BENCH_MESSAGES` (default 20000),
//! `BENCH_RUNS` (3), `BENCH_CLIENTS` (concurrent HTTP clients, 32).

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

async fn run(total: usize, clients: usize) -> (f64, f64) {
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = dir.path().join("sb.toml");
    let db = dir.path().join("sb.db");
    let rules = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("routing-rules");
    std::fs::write(
        &config,
        format!(
            "[store]\nurl = \"sqlite://{}\"\n[http]\nlisten = \"127.0.0.1:{port}\"\n[routing]\nrules = \"{}\"\n[[channels]]\nid = \"chat\"\nkind = \"webchat\"\n",
            db.display(),
            rules.display()
        ),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .args(["run", "-c", config.to_str().unwrap()])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let http = reqwest::Client::new();
    let ready = format!("http://127.0.0.1:{port}/readyz");
    for _ in 0..200 {
        if http
            .get(&ready)
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}?mode=ro", db.display()))
        .await
        .unwrap();

    let url = Arc::new(format!("http://127.0.0.1:{port}/webhooks/chat"));
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (http, url, next) = (http.clone(), url.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    break;
                }
                let text = if i.is_multiple_of(3) { "I need a refund" } else { "hello there" };
                let body = serde_json::json!({"message_id": format!("m-{i}"), "customer": {"id": format!("v-{}", i % 1000)}, "text": text});
                let response = http.post(url.as_str()).body(body.to_string()).send().await.unwrap();
                assert_eq!(response.status(), 200);
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let accepted = started.elapsed();
    loop {
        let claimable: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM bus_messages WHERE queue LIKE 'switchboard.queue.%'",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        if claimable as usize >= total {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let routed = started.elapsed();
    let _ = Command::new("kill").arg(child.id().to_string()).status();
    let _ = child.wait();
    (
        total as f64 / accepted.as_secs_f64(),
        total as f64 / routed.as_secs_f64(),
    )
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn main() {
    let total = env_usize("BENCH_MESSAGES", 20_000);
    let runs = env_usize("BENCH_RUNS", 3);
    let clients = env_usize("BENCH_CLIENTS", 32);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let mut accepted = Vec::new();
        let mut end_to_end = Vec::new();
        for run_no in 1..=runs {
            let (a, e) = run(total, clients).await;
            println!("run {run_no}: {total} messages, {clients} clients: accepted {a:.0} msg/s, webhook→claimable {e:.0} msg/s");
            accepted.push(a);
            end_to_end.push(e);
        }
        println!(
            "median of {runs} runs: accepted {:.0} msg/s, webhook→routed→claimable {:.0} msg/s",
            median(accepted),
            median(end_to_end)
        );
    });
}
