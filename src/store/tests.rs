//! Every test of the store runs on SQLite and on PostgreSQL (`store::tests::sqlite::…` and
//! `store::tests::postgres::…`, see [`on_both_backends`]). Each test gets its own database: a
//! temporary SQLite file, or a fresh PostgreSQL schema (dropped afterwards) on the server named
//! by `SWITCHBOARD_TEST_POSTGRES_URL` (default `postgres://postgres@127.0.0.1:5432/test`). An
//! unreachable server fails the PostgreSQL tests; they never pass without it.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;
use sqlx::Connection as _;
use switchboard_channel::{ChannelRef, NormalizedMessage, Sender};
use time::OffsetDateTime;

use super::*;
use crate::router::decide::Identity;

const DAY_MS: i64 = 24 * 60 * 60 * 1000;

const DEFAULT_POSTGRES_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

#[derive(Debug, Clone, Copy)]
enum Backend {
    Sqlite,
    Postgres,
    /// SQLite without its customer cache: every batch reads the database.
    SqliteUncached,
}

/// Generates `mod sqlite` and `mod postgres`, each with one `#[tokio::test]` per named test
/// function (`async fn NAME(backend: Backend)`). A function left out of the list is dead code,
/// which the lints refuse.
macro_rules! on_both_backends {
    ($($test:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test]
                async fn $test() {
                    super::$test(super::Backend::Sqlite).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test]
                async fn $test() {
                    super::$test(super::Backend::Postgres).await;
                }
            )*
        }
    };
}

on_both_backends!(
    same_sender_same_customer_and_conversation,
    later_messages_in_a_batch_see_earlier_ones,
    the_agent_of_a_conversation_is_its_next_messages_previous_agent,
    a_recorded_message_returns_its_decision_and_is_not_decided_again,
    a_batch_marks_earlier_decisions_published,
    attributes_merge_and_persist,
    attributes_patch_merges_and_null_removes,
    a_merge_past_the_attribute_limit_keeps_both_and_a_patch_can_trim,
    channels_used_accumulate_without_duplicates,
    contacts_last_24h_forgets_old_messages,
    a_closed_conversation_reopens_within_the_window_and_not_after,
    each_decision_sees_the_customers_latest_messages_on_every_channel,
    listed_identities_link_to_the_senders_customer_but_never_move,
    a_conversation_shows_its_messages_and_decisions,
    two_nodes_racing_agree_on_new_customers_and_duplicates,
    a_verified_identity_merges_two_customers,
    an_unverified_identity_only_suggests_a_merge,
    a_suggestion_follows_its_customers_through_merges,
    an_explicit_merge_moves_everything_and_is_audited,
    merges_racing_other_writes_leave_one_survivor_and_lose_nothing,
    linking_an_identity_refuses_another_customers,
    a_reply_in_a_thread_continues_its_conversation,
    another_stores_writes_reach_every_later_batch,
);

/// One test's store, and the place it lives in (removed when dropped, after the store).
struct TestStore {
    store: Arc<dyn Store>,
    url: String,
    _dir: Option<tempfile::TempDir>,
    schema: Option<PgSchema>,
}

impl TestStore {
    async fn open(backend: Backend) -> Self {
        Self::with(backend, DEFAULT_REOPEN_WINDOW, DEFAULT_HISTORY).await
    }

    async fn with(backend: Backend, reopen_window: Duration, history: usize) -> Self {
        let (url, dir, schema) = match backend {
            Backend::Sqlite | Backend::SqliteUncached => {
                let dir = tempfile::tempdir().unwrap();
                let url = format!("sqlite://{}", dir.path().join("s.db").display());
                (url, Some(dir), None)
            }
            Backend::Postgres => {
                let schema = PgSchema::create().await;
                (schema.url.clone(), None, Some(schema))
            }
        };
        let store: Arc<dyn Store> = match backend {
            Backend::SqliteUncached => Arc::new(
                SqliteStore::open(&url)
                    .await
                    .unwrap()
                    .with_reopen_window(reopen_window)
                    .with_history(history)
                    .with_cache(0),
            ),
            _ => open(&url, reopen_window, history).await.unwrap(),
        };
        Self {
            store,
            url,
            _dir: dir,
            schema,
        }
    }

    /// Another store on the same database, as a second node would open it.
    async fn another(&self) -> Arc<dyn Store> {
        open(&self.url, DEFAULT_REOPEN_WINDOW, DEFAULT_HISTORY)
            .await
            .unwrap()
    }
}

impl std::ops::Deref for TestStore {
    type Target = dyn Store;

    fn deref(&self) -> &Self::Target {
        &*self.store
    }
}

/// A fresh schema in the test database; the store connects with it as its `search_path`.
struct PgSchema {
    admin_url: String,
    name: String,
    url: String,
}

impl PgSchema {
    async fn create() -> Self {
        let admin_url = std::env::var("SWITCHBOARD_TEST_POSTGRES_URL")
            .unwrap_or_else(|_| DEFAULT_POSTGRES_URL.to_owned());
        let mut admin = sqlx::PgConnection::connect(&admin_url)
            .await
            .unwrap_or_else(|error| {
                panic!(
                    "PostgreSQL for the store tests is unreachable at {admin_url} ({error}): \
                     start it (.ci/run does) or set SWITCHBOARD_TEST_POSTGRES_URL"
                )
            });
        let name = format!("sb_test_{}", uuid::Uuid::new_v4().simple());
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {name}")))
            .execute(&mut admin)
            .await
            .unwrap();
        let _ = admin.close().await;
        let separator = if admin_url.contains('?') { '&' } else { '?' };
        // Named after the schema, so the teardown can find the test's connections.
        let url = format!(
            "{admin_url}{separator}application_name={name}&options=-c%20search_path%3D{name}"
        );
        Self {
            admin_url,
            name,
            url,
        }
    }
}

impl Drop for PgSchema {
    /// Drops the schema from a thread of its own: `Drop` cannot await, and it also runs when
    /// the test panicked.
    fn drop(&mut self) {
        let admin_url = self.admin_url.clone();
        let name = self.name.clone();
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async {
                let mut admin = sqlx::PgConnection::connect(&admin_url).await?;
                // A connection the test left in a transaction would hold its locks until the
                // test's runtime ends, after this.
                sqlx::query(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                     WHERE application_name = $1",
                )
                .bind(&name)
                .execute(&mut admin)
                .await?;
                sqlx::query(sqlx::AssertSqlSafe(format!("DROP SCHEMA {name} CASCADE")))
                    .execute(&mut admin)
                    .await?;
                admin.close().await?;
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
            })
        })
        .join();
        if let Ok(Err(error)) = dropped {
            eprintln!("could not drop the test schema {}: {error}", self.name);
        }
    }
}

pub(super) fn message(id: &str, sender: &str, kind: &str) -> NormalizedMessage {
    NormalizedMessage {
        message_id: NormalizedMessage::stable_id("chat", id),
        channel: ChannelRef {
            id: "chat".into(),
            kind: kind.into(),
        },
        external_id: id.into(),
        thread_key: None,
        sender: Sender {
            kind: "webchat".into(),
            address: sender.into(),
            name: None,
        },
        subject: None,
        text: "hi".into(),
        attachments: vec![],
        received_at: OffsetDateTime::UNIX_EPOCH,
        auto_submitted: false,
        metadata: Default::default(),
    }
}

/// Routes `messages` through the store with a decide step that records what it saw.
async fn route(
    store: &impl std::ops::Deref<Target = dyn Store>,
    messages: &[NormalizedMessage],
    now_ms: i64,
) -> (Vec<RouteOutcome>, Vec<Resolved>) {
    let seen = Mutex::new(Vec::new());
    let decide =
        |message: &NormalizedMessage, _: &serde_json::value::RawValue, resolved: &Resolved| {
            seen.lock().unwrap().push(resolved.clone());
            Routed {
                queue: "general".into(),
                urgency: 12,
                priority: 1,
                assignment: format!("{{\"for\": \"{}\"}}", message.external_id),
            }
        };
    let outcomes = store
        .route_batch(messages, now_ms, &[], &decide)
        .await
        .unwrap();
    (outcomes, seen.into_inner().unwrap())
}

async fn same_sender_same_customer_and_conversation(backend: Backend) {
    let store = TestStore::open(backend).await;
    let (_, seen) = route(&store, &[message("m-1", "visitor-1", "webchat")], 1_000).await;
    let a = &seen[0];
    assert!(a.conversation.new);
    assert_eq!(a.customer.contacts_last_24h, 1);

    let (_, seen) = route(&store, &[message("m-2", "visitor-1", "webchat")], 2_000).await;
    let b = &seen[0];
    assert_eq!(a.customer.id, b.customer.id);
    assert_eq!(a.conversation.id, b.conversation.id);
    assert!(!b.conversation.new);
    assert_eq!(b.conversation.message_count, 1);
    assert_eq!(b.customer.contacts_last_24h, 2);
    assert_eq!(b.customer.open_conversations, 1);
    assert_eq!(b.customer.channels_used, vec!["webchat"]);
    assert_eq!(
        b.customer.identities,
        vec![Identity {
            kind: "webchat".into(),
            address: "visitor-1".into()
        }]
    );

    let (_, seen) = route(&store, &[message("m-3", "visitor-2", "webchat")], 3_000).await;
    assert_ne!(seen[0].customer.id, a.customer.id);
    assert_ne!(seen[0].conversation.id, a.conversation.id);
}

/// The agent who claimed a conversation's assignment is its next assignment's
/// `previous_agent`, through a reopen; a new conversation starts without one.
async fn the_agent_of_a_conversation_is_its_next_messages_previous_agent(backend: Backend) {
    let store = TestStore::with(backend, Duration::from_secs(3_600), DEFAULT_HISTORY).await;
    let (_, seen) = route(&store, &[message("m-1", "visitor-1", "webchat")], 1_000).await;
    let conversation = seen[0].conversation.id.clone();
    assert_eq!(seen[0].customer.previous_agent, None);
    assert!(store.assign_agent(&conversation, "alice").await.unwrap());
    assert!(
        !store
            .assign_agent("no-such-conversation", "alice")
            .await
            .unwrap()
    );

    let (_, seen) = route(&store, &[message("m-2", "visitor-1", "webchat")], 2_000).await;
    assert_eq!(seen[0].conversation.id, conversation);
    assert_eq!(seen[0].customer.previous_agent.as_deref(), Some("alice"));
    let record = store.conversation(&conversation).await.unwrap().unwrap();
    assert_eq!(record.agent_id.as_deref(), Some("alice"));

    // Closed and reopened within the window: still alice's.
    store
        .close_conversation(&conversation, 3_000)
        .await
        .unwrap();
    let (_, seen) = route(&store, &[message("m-3", "visitor-1", "webchat")], 4_000).await;
    assert_eq!(seen[0].conversation.id, conversation);
    assert_eq!(seen[0].customer.previous_agent.as_deref(), Some("alice"));

    // Closed for longer than the window: a new conversation, no agent yet.
    store
        .close_conversation(&conversation, 5_000)
        .await
        .unwrap();
    let (_, seen) = route(&store, &[message("m-4", "visitor-1", "webchat")], 3_700_000).await;
    assert_ne!(seen[0].conversation.id, conversation);
    assert_eq!(seen[0].customer.previous_agent, None);
}

async fn later_messages_in_a_batch_see_earlier_ones(backend: Backend) {
    let store = TestStore::open(backend).await;
    let batch = [message("m-1", "v", "webchat"), message("m-2", "v", "email")];
    let (outcomes, seen) = route(&store, &batch, 1_000).await;
    assert_eq!(outcomes.len(), 2);
    assert!(seen[0].conversation.new);
    assert!(!seen[1].conversation.new);
    assert_eq!(seen[1].conversation.message_count, 1);
    assert_eq!(seen[1].customer.contacts_last_24h, 2);
}

async fn a_recorded_message_returns_its_decision_and_is_not_decided_again(backend: Backend) {
    let store = TestStore::open(backend).await;
    let m = message("m-1", "visitor-1", "webchat");
    assert_eq!(store.decision("chat", "m-1").await.unwrap(), None);
    let (outcomes, _) = route(&store, std::slice::from_ref(&m), 1_000).await;
    assert_eq!(
        outcomes,
        vec![RouteOutcome::New {
            queue: "general".into(),
            priority: 1,
            assignment: "{\"for\": \"m-1\"}".into()
        }]
    );

    let (outcomes, seen) = route(&store, std::slice::from_ref(&m), 2_000).await;
    assert!(seen.is_empty(), "decide was not called again");
    let expected = StoredDecision {
        assignment: "{\"for\": \"m-1\"}".into(),
        queue: "general".into(),
        priority: 1,
        published: false,
    };
    assert_eq!(outcomes, vec![RouteOutcome::Existing(expected.clone())]);
    assert_eq!(store.decision("chat", "m-1").await.unwrap(), Some(expected));

    store
        .mark_published(&[("chat".into(), "m-1".into())])
        .await
        .unwrap();
    assert!(
        store
            .decision("chat", "m-1")
            .await
            .unwrap()
            .unwrap()
            .published
    );

    let (_, seen) = route(&store, &[message("m-2", "visitor-1", "webchat")], 3_000).await;
    assert_eq!(
        seen[0].conversation.message_count, 1,
        "the duplicate did not count"
    );
}

/// Keys handed to `route_batch` as published are marked in its transaction, whatever the
/// batch itself holds.
async fn a_batch_marks_earlier_decisions_published(backend: Backend) {
    let store = TestStore::open(backend).await;
    route(&store, &[message("m-1", "visitor-1", "webchat")], 1_000).await;
    route(&store, &[message("m-2", "visitor-2", "webchat")], 1_500).await;
    let published = |id: &'static str| {
        let store = &store;
        async move { store.decision("chat", id).await.unwrap().unwrap().published }
    };
    assert!(!published("m-1").await && !published("m-2").await);

    let decide = |_: &NormalizedMessage, _: &serde_json::value::RawValue, _: &Resolved| Routed {
        queue: "general".into(),
        urgency: 0,
        priority: 0,
        assignment: "{}".into(),
    };
    let marks = [("chat".to_owned(), "m-1".to_owned())];
    store
        .route_batch(
            &[message("m-3", "visitor-1", "webchat")],
            2_000,
            &marks,
            &decide,
        )
        .await
        .unwrap();
    assert!(published("m-1").await, "marked with the batch");
    assert!(!published("m-2").await && !published("m-3").await);

    // A batch that only repeats a recorded message still marks; marking twice is harmless.
    let marks = [
        ("chat".to_owned(), "m-1".to_owned()),
        ("chat".to_owned(), "m-2".to_owned()),
    ];
    let outcomes = store
        .route_batch(
            &[message("m-3", "visitor-1", "webchat")],
            3_000,
            &marks,
            &decide,
        )
        .await
        .unwrap();
    assert!(matches!(outcomes[..], [RouteOutcome::Existing(_)]));
    assert!(published("m-1").await && published("m-2").await);
}

async fn attributes_merge_and_persist(backend: Backend) {
    let store = TestStore::open(backend).await;
    let mut m = message("m-1", "visitor-1", "webchat");
    m.metadata
        .insert("attributes".into(), json!({"tier": "vip", "plan": "pro"}));
    let (_, seen) = route(&store, &[m], 1_000).await;
    assert_eq!(seen[0].customer.attributes["tier"], "vip");

    let mut next = message("m-2", "visitor-1", "webchat");
    next.metadata
        .insert("attributes".into(), json!({"plan": "enterprise"}));
    let (_, seen) = route(&store, &[next], 2_000).await;
    assert_eq!(
        seen[0].customer.attributes["tier"], "vip",
        "kept from before"
    );
    assert_eq!(seen[0].customer.attributes["plan"], "enterprise", "updated");

    // A null removes one, as through the API.
    let mut last = message("m-3", "visitor-1", "webchat");
    last.metadata
        .insert("attributes".into(), json!({"tier": null}));
    let (_, seen) = route(&store, &[last], 3_000).await;
    assert_eq!(
        seen[0].customer.attributes,
        *json!({"plan": "enterprise"}).as_object().unwrap()
    );
    let stored = store.customer(&seen[0].customer.id).await.unwrap().unwrap();
    assert_eq!(stored.attributes, seen[0].customer.attributes);

    // Past the size limit: a message's attributes are left out (it is still routed), a patch
    // is refused, and nothing changes.
    let huge = "x".repeat(switchboard_channel::envelope::MAX_ATTRIBUTES_BYTES);
    let mut big = message("m-4", "visitor-1", "webchat");
    big.metadata
        .insert("attributes".into(), json!({"note": huge}));
    let (outcomes, seen) = route(&store, &[big], 4_000).await;
    assert_eq!(outcomes.len(), 1);
    assert_eq!(seen[0].customer.attributes, stored.attributes);
    let patch = json!({"note": huge}).as_object().unwrap().clone();
    let refused = store.patch_attributes(&stored.id, &patch).await;
    assert!(
        matches!(refused, Err(StoreError::AttributesTooLarge { .. })),
        "{refused:?}"
    );
    let after = store.customer(&stored.id).await.unwrap().unwrap();
    assert_eq!(after.attributes, stored.attributes);
}

/// A merge keeps both customers' attributes even past the limit; from there a patch that does
/// not grow them is accepted (so they can be trimmed), one that grows them is not.
async fn a_merge_past_the_attribute_limit_keeps_both_and_a_patch_can_trim(backend: Backend) {
    let store = TestStore::open(backend).await;
    let limit = switchboard_channel::envelope::MAX_ATTRIBUTES_BYTES;
    let most = "x".repeat(limit * 9 / 10);
    let mut ids = Vec::new();
    for (i, (visitor, key)) in [("visitor-a", "a"), ("visitor-b", "b")].iter().enumerate() {
        let (_, seen) = route(
            &store,
            &[message(&format!("m-{i}"), visitor, "webchat")],
            1_000,
        )
        .await;
        let id = seen[0].customer.id.clone();
        let patch = json!({ *key: most }).as_object().unwrap().clone();
        store.patch_attributes(&id, &patch).await.unwrap().unwrap();
        ids.push(id);
    }
    assert!(matches!(
        store.merge(&ids[0], &ids[1], 2_000).await.unwrap(),
        MergeOutcome::Merged { .. }
    ));
    let merged = store.customer(&ids[0]).await.unwrap().unwrap();
    assert_eq!(merged.attributes.len(), 2, "both kept");

    let grow = json!({"tier": "vip"}).as_object().unwrap().clone();
    let refused = store.patch_attributes(&ids[0], &grow).await;
    assert!(
        matches!(refused, Err(StoreError::AttributesTooLarge { .. })),
        "{refused:?}"
    );
    // Smaller, though still past the limit: accepted.
    let shorter = "x".repeat(limit / 2);
    let trim = json!({ "b": shorter }).as_object().unwrap().clone();
    let trimmed = store
        .patch_attributes(&ids[0], &trim)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(trimmed.attributes["b"], shorter.as_str());
    assert!(serde_json::to_string(&trimmed.attributes).unwrap().len() > limit);
    let trim = json!({"b": null, "tier": "vip"})
        .as_object()
        .unwrap()
        .clone();
    let trimmed = store
        .patch_attributes(&ids[0], &trim)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        trimmed.attributes,
        *json!({"a": most, "tier": "vip"}).as_object().unwrap()
    );
}

async fn channels_used_accumulate_without_duplicates(backend: Backend) {
    let store = TestStore::open(backend).await;
    for (i, kind) in ["webchat", "email", "webchat"].iter().enumerate() {
        route(
            &store,
            &[message(&format!("m-{i}"), "visitor-1", kind)],
            1_000,
        )
        .await;
    }
    let (_, seen) = route(&store, &[message("m-9", "visitor-1", "webchat")], 2_000).await;
    assert_eq!(seen[0].customer.channels_used, vec!["webchat", "email"]);
}

async fn contacts_last_24h_forgets_old_messages(backend: Backend) {
    let store = TestStore::open(backend).await;
    route(&store, &[message("m-1", "visitor-1", "webchat")], 0).await;
    let (_, seen) = route(
        &store,
        &[message("m-2", "visitor-1", "webchat")],
        DAY_MS + 1,
    )
    .await;
    assert_eq!(seen[0].customer.contacts_last_24h, 1);
}

#[tokio::test]
async fn sqlite_unwritable_location_is_a_clear_error() {
    let error = SqliteStore::open("sqlite:///proc/nope/s.db")
        .await
        .err()
        .unwrap();
    assert!(
        error
            .to_string()
            .contains("cannot open the store at sqlite:///proc/nope/s.db"),
        "{error}"
    );
}

/// The router's decisions are stored packed (see `sqlite::pack_assignment`) and read back as
/// the JSON that was decided.
#[tokio::test]
async fn sqlite_stores_assignments_packed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.db");
    let store: Arc<dyn Store> = Arc::new(
        SqliteStore::open(&format!("sqlite://{}", path.display()))
            .await
            .unwrap(),
    );
    route(&store, &[message("m1", "dana", "webchat")], 1_000).await;
    let decision = store.decision("chat", "m1").await.unwrap().unwrap();
    assert_eq!(decision.assignment, r#"{"for": "m1"}"#);
    let mut connection = sqlx::SqliteConnection::connect(&format!("sqlite://{}", path.display()))
        .await
        .unwrap();
    let kind: String = sqlx::query_scalar("SELECT typeof(assignment) FROM decisions")
        .fetch_one(&mut connection)
        .await
        .unwrap();
    assert_eq!(kind, "blob");
    store.close().await;
}

async fn a_closed_conversation_reopens_within_the_window_and_not_after(backend: Backend) {
    let store = TestStore::with(backend, Duration::from_secs(72 * 3600), DEFAULT_HISTORY).await;
    let hour = 60 * 60 * 1000;
    let (_, seen) = route(&store, &[message("m-1", "visitor-1", "webchat")], hour).await;
    let first = seen[0].conversation.id.clone();

    // Closed, then the customer writes again 2 hours later: the same conversation, open again.
    let closed = store
        .close_conversation(&first, 2 * hour)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(closed.status, "closed");
    assert_eq!(closed.closed_at, Some(2 * hour));
    let (_, seen) = route(&store, &[message("m-2", "visitor-1", "email")], 4 * hour).await;
    assert_eq!(seen[0].conversation.id, first, "reopened within the window");
    assert!(!seen[0].conversation.new);
    assert_eq!(seen[0].customer.channels_used, ["webchat", "email"]);
    let reopened = store.conversation(&first).await.unwrap().unwrap();
    assert_eq!(reopened.status, "open");
    assert_eq!(reopened.closed_at, None);
    assert_eq!(reopened.message_count, 2);
    assert_eq!(reopened.messages.len(), 2);
    assert_eq!(reopened.decisions.len(), 2);

    // Closed again, and the customer comes back 73 hours later: a new conversation.
    store.close_conversation(&first, 5 * hour).await.unwrap();
    let (_, seen) = route(&store, &[message("m-3", "visitor-1", "webchat")], 78 * hour).await;
    assert_ne!(
        seen[0].conversation.id, first,
        "outside the window: a new conversation"
    );
    assert!(seen[0].conversation.new);
    let old = store.conversation(&first).await.unwrap().unwrap();
    assert_eq!(old.status, "closed");
    assert_eq!(old.message_count, 2);
    assert!(store.conversation("nope").await.unwrap().is_none());
    assert!(
        store
            .close_conversation("nope", hour)
            .await
            .unwrap()
            .is_none()
    );
}

async fn each_decision_sees_the_customers_latest_messages_on_every_channel(backend: Backend) {
    let store = TestStore::with(backend, DEFAULT_REOPEN_WINDOW, 2).await;
    let with_text = |id: &str, kind: &str, text: &str| {
        let mut m = message(id, "visitor-1", kind);
        m.text = text.into();
        m
    };
    let (_, seen) = route(&store, &[with_text("m-1", "webchat", "first")], 1_000).await;
    assert!(
        seen[0].history.is_empty(),
        "nothing before the first message"
    );
    assert_eq!(seen[0].conversation_opened_at, 1_000);

    // Two in one batch: the second sees the first.
    let (_, seen) = route(
        &store,
        &[
            with_text("m-2", "email", "second"),
            with_text("m-3", "webchat", "third"),
        ],
        2_000,
    )
    .await;
    let texts =
        |h: &[std::sync::Arc<HistoryEntry>]| h.iter().map(|e| field(e, "text")).collect::<Vec<_>>();
    assert_eq!(texts(&seen[0].history), ["first"]);
    assert_eq!(texts(&seen[1].history), ["first", "second"]);
    assert_eq!(field(&seen[1].history[1], "channel"), "email");
    assert_eq!(field(&seen[1].history[0], "at"), "1970-01-01T00:00:01Z");

    // From the store, capped at 2, oldest first.
    let (_, seen) = route(&store, &[with_text("m-4", "webchat", "fourth")], 3_000).await;
    assert_eq!(texts(&seen[0].history), ["second", "third"]);
    assert_eq!(seen[0].conversation_opened_at, 1_000);

    // Another customer sees only their own.
    let (_, seen) = route(&store, &[message("m-5", "visitor-2", "webchat")], 4_000).await;
    assert!(seen[0].history.is_empty());
}

async fn listed_identities_link_to_the_senders_customer_but_never_move(backend: Backend) {
    let store = TestStore::open(backend).await;
    let listing = |id: &str, sender: &str, email: &str| {
        let mut m = message(id, sender, "webchat");
        m.metadata.insert(
            "identities".into(),
            json!([{"kind": "webchat", "address": sender}, {"kind": "email", "address": email}]),
        );
        m
    };
    // A new visitor with an email: one customer, both identities.
    let (_, seen) = route(
        &store,
        &[listing("m-1", "visitor-a", "a@example.com")],
        1_000,
    )
    .await;
    let a = seen[0].customer.id.clone();
    let found = store
        .customer_by_identity("email", "a@example.com")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(found.id, a);
    assert_eq!(found.identities.len(), 2);
    // The first decision lists them as every later one will (the store's order).
    let first: Vec<(&str, &str)> = seen[0]
        .customer
        .identities
        .iter()
        .map(|i| (i.kind.as_str(), i.address.as_str()))
        .collect();
    assert_eq!(
        first,
        [("email", "a@example.com"), ("webchat", "visitor-a")]
    );
    let stored: Vec<(&str, &str)> = found
        .identities
        .iter()
        .map(|i| (i.kind.as_str(), i.address.as_str()))
        .collect();
    assert_eq!(stored, first);

    // Another known visitor who types a's email: stays themself; the email stays with a.
    let (_, seen) = route(&store, &[message("m-2", "visitor-b", "webchat")], 2_000).await;
    let b = seen[0].customer.id.clone();
    assert_ne!(a, b);
    let (_, seen) = route(
        &store,
        &[listing("m-3", "visitor-b", "a@example.com")],
        3_000,
    )
    .await;
    assert_eq!(seen[0].customer.id, b);
    let found = store
        .customer_by_identity("email", "a@example.com")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        found.id, a,
        "an identity never moves to another customer by itself"
    );
}

async fn attributes_patch_merges_and_null_removes(backend: Backend) {
    let store = TestStore::open(backend).await;
    let mut m = message("m-1", "visitor-1", "webchat");
    m.metadata
        .insert("attributes".into(), json!({"tier": "vip", "plan": "pro"}));
    let (_, seen) = route(&store, &[m], 1_000).await;
    let id = seen[0].customer.id.clone();

    let patch = json!({"plan": null, "seats": 12, "tags": ["a", "b"]});
    let patched = store
        .patch_attributes(&id, patch.as_object().unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        Value::Object(patched.attributes),
        json!({"tier": "vip", "seats": 12, "tags": ["a", "b"]})
    );
    let (_, seen) = route(&store, &[message("m-2", "visitor-1", "webchat")], 2_000).await;
    assert_eq!(
        seen[0].customer.attributes["seats"], 12,
        "the router sees it"
    );
    assert!(
        store
            .patch_attributes("nope", &Map::new())
            .await
            .unwrap()
            .is_none()
    );
}

async fn a_conversation_shows_its_messages_and_decisions(backend: Backend) {
    let store = TestStore::open(backend).await;
    let mut first = message("m-1", "visitor-1", "webchat");
    first.text = "first".into();
    first
        .metadata
        .insert("attributes".into(), json!({"plan": "pro", "n": 1.5}));
    let mut second = message("m-2", "visitor-1", "email");
    second.text = "second".into();
    let (_, seen) = route(&store, &[first.clone(), second.clone()], 5_000).await;
    let id = seen[0].conversation.id.clone();

    let record = store.conversation(&id).await.unwrap().unwrap();
    assert_eq!(record.customer_id, seen[0].customer.id);
    assert_eq!(record.status, "open");
    assert_eq!(record.channels, ["webchat", "email"]);
    assert_eq!(record.queue.as_deref(), Some("general"));
    assert_eq!(record.message_count, 2);
    assert_eq!((record.opened_at, record.last_activity_at), (5_000, 5_000));
    let mut expected = serde_json::to_value(&first).unwrap();
    expected["direction"] = json!("inbound");
    expected["stored_at"] = json!(5_000);
    assert_eq!(record.messages[0], expected, "the envelope as received");
    assert_eq!(record.messages[1]["text"], "second");
    assert_eq!(
        record.decisions,
        [
            json!({"queue": "general", "urgency": 12, "priority": 1, "decided_at": 5_000,
                   "message_id": null, "explanation": null}),
            json!({"queue": "general", "urgency": 12, "priority": 1, "decided_at": 5_000,
                   "message_id": null, "explanation": null}),
        ]
    );

    let customer = store.customer(&record.customer_id).await.unwrap().unwrap();
    assert_eq!(
        Value::Object(customer.attributes),
        json!({"plan": "pro", "n": 1.5})
    );
    assert_eq!((customer.created_at, customer.last_seen_at), (5_000, 5_000));
    assert!(store.customer("nope").await.unwrap().is_none());
    assert!(
        store
            .customer_by_identity("webchat", "nobody")
            .await
            .unwrap()
            .is_none()
    );
    store.ping().await.unwrap();
}

/// Two nodes route at once: the same new sender in both batches, and one message in both (a
/// redelivery racing its first delivery). One customer, one conversation, one decision.
async fn two_nodes_racing_agree_on_new_customers_and_duplicates(backend: Backend) {
    let one = TestStore::open(backend).await;
    let two = one.another().await;
    for round in 0..8 {
        let sender = format!("racer-{round}");
        let duplicate = message(&format!("dup-{round}"), &sender, "webchat");
        let a = [
            message(&format!("a-{round}"), &sender, "webchat"),
            duplicate.clone(),
        ];
        let b = [message(&format!("b-{round}"), &sender, "email"), duplicate];
        let ((outcomes_a, seen_a), (outcomes_b, seen_b)) =
            tokio::join!(route(&one, &a, 1_000), route(&two, &b, 1_000));
        let customers: std::collections::HashSet<_> = seen_a
            .iter()
            .chain(&seen_b)
            .map(|r| &r.customer.id)
            .collect();
        assert_eq!(customers.len(), 1, "round {round}: one customer");
        let conversations: std::collections::HashSet<_> = seen_a
            .iter()
            .chain(&seen_b)
            .map(|r| &r.conversation.id)
            .collect();
        assert_eq!(conversations.len(), 1, "round {round}: one conversation");
        let new = [&outcomes_a[1], &outcomes_b[1]]
            .iter()
            .filter(|o| matches!(o, RouteOutcome::New { .. }))
            .count();
        assert_eq!(new, 1, "round {round}: the duplicate is decided once");
        let conversation = one
            .conversation(customers_conversation(&seen_a, &seen_b))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(conversation.message_count, 3, "round {round}");
    }
    two.close().await;
}

/// Two stores on one database (two nodes, or two daemons on one SQLite file): whatever one
/// wrote, the other's next batch sees, cache or not.
async fn another_stores_writes_reach_every_later_batch(backend: Backend) {
    let one = TestStore::open(backend).await;
    let two = one.another().await;
    let (_, seen) = route(&one, &[message("m-1", "dana", "webchat")], 1_000).await;
    let dana = seen[0].customer.id.clone();
    let conversation = seen[0].conversation.id.clone();
    let (_, seen) = route(&two, &[message("m-2", "dana", "email")], 2_000).await;
    assert_eq!(seen[0].customer.id, dana);
    let patch = json!({"tier": "gold"});
    two.patch_attributes(&dana, patch.as_object().unwrap())
        .await
        .unwrap();
    let (_, seen) = route(&one, &[message("m-3", "dana", "sms")], 3_000).await;
    let after = &seen[0];
    assert_eq!(after.conversation.id, conversation);
    assert_eq!(after.conversation.message_count, 2, "m-2 counted");
    assert_eq!(after.customer.contacts_last_24h, 3);
    assert_eq!(after.customer.attributes.get("tier"), Some(&json!("gold")));
    assert_eq!(after.customer.channels_used, ["webchat", "email", "sms"]);
    let texts: Vec<String> = after.history.iter().map(|h| field(h, "channel")).collect();
    assert_eq!(texts, ["webchat", "email"]);
    two.close_conversation(&conversation, 4_000).await.unwrap();
    let (_, seen) = route(&one, &[message("m-4", "dana", "webchat")], 5_000).await;
    assert_eq!(
        seen[0].conversation.id, conversation,
        "reopened: within the window"
    );
    assert_eq!(seen[0].customer.open_conversations, 1);
    two.close().await;
}

fn customers_conversation<'a>(a: &'a [Resolved], b: &'a [Resolved]) -> &'a str {
    &a.iter().chain(b).next().unwrap().conversation.id
}

#[tokio::test]
async fn an_unknown_url_scheme_names_both_supported_forms() {
    let error = open("mysql://user:secret@host/db", DEFAULT_REOPEN_WINDOW, 1)
        .await
        .err()
        .unwrap();
    let text = error.to_string();
    assert!(matches!(error, StoreError::Unsupported(_)), "{text}");
    assert!(
        text.contains("sqlite://PATH")
            && text.contains("postgres://")
            && text.contains("postgresql://"),
        "{text}"
    );
    assert!(!text.contains("secret"), "no password in errors: {text}");
}

#[tokio::test]
async fn postgres_unreachable_server_is_a_clear_error() {
    let error = PgStore::open("postgresql://postgres:secret@127.0.0.1:1/test")
        .await
        .err()
        .unwrap();
    let text = error.to_string();
    assert!(matches!(error, StoreError::Open { .. }), "{text}");
    assert!(
        text.starts_with("cannot open the store at postgresql://…@127.0.0.1:1/test: "),
        "{text}"
    );
    assert!(!text.contains("secret"), "no password in errors: {text}");
    // `switchboard run` reports the whole chain of causes: each is named once.
    let chain = crate::telemetry::report(&anyhow::Error::new(error));
    assert_eq!(chain.matches("refused").count(), 1, "{chain}");

    let error = PgStore::open("postgres://127.0.0.1:port/test")
        .await
        .err()
        .unwrap();
    assert!(matches!(error, StoreError::Open { .. }), "{error}");
}

/// PostgreSQL's own refusal reads as it is, without the "at line N" (of PostgreSQL's C source)
/// sqlx appends.
#[tokio::test]
async fn postgres_refusing_the_database_is_a_clear_error() {
    let admin_url = std::env::var("SWITCHBOARD_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| DEFAULT_POSTGRES_URL.to_owned());
    let (base, query) = admin_url.split_once('?').unwrap_or((&admin_url, ""));
    let (server, _) = base.rsplit_once('/').unwrap();
    let url = format!("{server}/sb_no_such_database?{query}");
    let error = PgStore::open(&url).await.err().unwrap();
    let text = error.to_string();
    assert!(
        text.ends_with(
            "error returned from database: database \"sb_no_such_database\" does not exist"
        ),
        "{text}"
    );
}

/// The pool does not ping a connection on every acquire; one the server cut while it sat idle
/// (a restart, an administrator) is pinged, found dead and replaced before a batch uses it.
#[tokio::test]
async fn postgres_replaces_a_connection_cut_while_idle() {
    let store = TestStore::open(Backend::Postgres).await;
    route(&store, &[message("m-1", "visitor-1", "webchat")], 1_000).await;

    let schema = store.schema.as_ref().unwrap();
    let mut admin = sqlx::PgConnection::connect(&schema.admin_url)
        .await
        .unwrap();
    let cut: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                               WHERE application_name = $1) AS t",
    )
    .bind(&schema.name)
    .fetch_one(&mut admin)
    .await
    .unwrap();
    assert!(cut >= 1, "the store's connection was cut");
    admin.close().await.unwrap();

    tokio::time::sleep(super::postgres::PING_IF_IDLE_FOR + Duration::from_millis(200)).await;
    let (outcomes, seen) = route(&store, &[message("m-2", "visitor-1", "webchat")], 2_000).await;
    assert_eq!(outcomes.len(), 1);
    assert_eq!(seen[0].conversation.message_count, 1, "{seen:?}");
}

/// sqlx 0.9.0 opens TCP connections with Nagle's algorithm on, and a router batch's INSERT then
/// waited ~40 ms for the server's delayed ACK; the store turns it off on each connection.
#[tokio::test]
async fn postgres_connections_have_nagle_off() {
    let test = TestStore::open(Backend::Postgres).await;
    let store = PgStore::open(&test.url).await.unwrap();
    let port = store.client_port().await.unwrap().unwrap_or_else(|| {
        panic!(
            "the test needs PostgreSQL over TCP, not a Unix socket: {}",
            test.url
        )
    });
    assert_eq!(super::nodelay::nodelay_of_local_port(port), Some(true));
}

/// A history entry carries at most [`HISTORY_TEXT_BYTES`] of its message's text, cut between
/// words and marked; a shorter text is whole and unmarked.
#[test]
fn a_long_text_is_cut_in_its_history_entry() {
    let short = super::HistoryEntry::new("email", "Where is my order?", "2026-11-23T10:00:00Z");
    assert_eq!(
        serde_json::from_str::<Value>(short.json()).unwrap(),
        json!({"channel": "email", "text": "Where is my order?", "at": "2026-11-23T10:00:00Z"})
    );
    let long_text = "Grüße aus Köln, ".repeat(500);
    let long = super::HistoryEntry::new("email", &long_text, "2026-11-23T10:00:00Z");
    let entry: Value = serde_json::from_str(long.json()).unwrap();
    assert_eq!(entry["truncated"], true);
    let text = entry["text"].as_str().unwrap();
    assert!(text.len() <= super::HISTORY_TEXT_BYTES, "{}", text.len());
    assert!(
        text.len() > super::HISTORY_TEXT_BYTES - 20,
        "{}",
        text.len()
    );
    let kept = text.strip_suffix('…').unwrap();
    assert!(long_text.starts_with(kept));
    assert!(
        long_text[kept.len()..].starts_with(' '),
        "cut between words: {:?}",
        &kept[kept.len() - 12..]
    );
}

/// One scenario on both backends: every outcome, everything each decision saw and every
/// record read back are the same (ids aside, which are random).
#[tokio::test]
async fn both_backends_give_the_same_results() {
    let sqlite = scenario(Backend::Sqlite).await;
    let postgres = scenario(Backend::Postgres).await;
    assert_eq!(sqlite, postgres);
}

/// The SQLite store's customer cache changes nothing: the same scenario (API writes between
/// batches included) gives the same decisions' inputs and records with and without it.
#[tokio::test]
async fn sqlite_cache_gives_what_the_database_gives() {
    let cached = scenario(Backend::Sqlite).await;
    let uncached = scenario(Backend::SqliteUncached).await;
    assert_eq!(cached, uncached);
}

/// Without the cache every history comes from SQLite's read statement, which has the history
/// length written into it.
#[tokio::test]
async fn sqlite_uncached_reads_each_customers_latest_messages() {
    each_decision_sees_the_customers_latest_messages_on_every_channel(Backend::SqliteUncached)
        .await;
}

async fn scenario(backend: Backend) -> Value {
    let store = TestStore::with(backend, Duration::from_secs(3600), 3).await;
    let listing = |id: &str, sender: &str, kind: &str, extra: Value| {
        let mut m = message(id, sender, kind);
        m.text = format!("text of {id}");
        m.metadata.insert("identities".into(), extra);
        m.metadata.insert(
            "attributes".into(),
            json!({"last": id, "nested": {"k": [1, 2.5, null]}}),
        );
        m
    };
    // (now, batch): a conversation closes after the second and third batches; the fourth
    // comes within the reopen window, the fifth after it and a day later.
    let hour = 3_600_000;
    let batches = [
        (
            1_000,
            vec![
                listing(
                    "m-1",
                    "dana",
                    "webchat",
                    json!([{"kind": "email", "address": "dana@x"}]),
                ),
                listing("m-2", "eli", "webchat", json!([])),
                listing(
                    "m-3",
                    "dana",
                    "email",
                    json!([{"kind": "phone", "address": "+1555"}]),
                ),
            ],
        ),
        (
            2_000,
            vec![
                listing("m-4", "dana", "sms", json!([])),
                listing("m-1", "dana", "webchat", json!([])),
                listing(
                    "m-5",
                    "fay",
                    "webchat",
                    json!([{"kind": "email", "address": "dana@x"}]),
                ),
            ],
        ),
        (
            3_000,
            vec![
                listing("m-6", "eli", "email", json!([])),
                listing("m-7", "dana", "webchat", json!([])),
            ],
        ),
        (hour / 2, vec![listing("m-8", "dana", "email", json!([]))]),
        (
            30 * hour,
            vec![
                listing("m-9", "dana", "webchat", json!([])),
                listing("m-2", "eli", "webchat", json!([])),
                listing("m-10", "eli", "webchat", json!([])),
            ],
        ),
    ];
    // Ids are random: each shows as its order of appearance.
    let mut ids: Vec<String> = Vec::new();
    let mut conversations: Vec<String> = Vec::new();
    let mut summary = Vec::new();
    for (round, (now, batch)) in batches.iter().enumerate() {
        let (outcomes, seen) = route(&store, batch, *now).await;
        if round == 1 {
            store
                .mark_published(&[("chat".into(), "m-4".into())])
                .await
                .unwrap();
        }
        if round == 1 || round == 3 {
            let conversation = seen[0].conversation.id.clone();
            store.close_conversation(&conversation, *now).await.unwrap();
        }
        // API writes between batches: the next batch sees each of them.
        if round == 0 {
            let dana = seen[0].customer.id.clone();
            let patch = json!({"tier": "gold", "last": null});
            store
                .patch_attributes(&dana, patch.as_object().unwrap())
                .await
                .unwrap();
        }
        if round == 2 {
            let (eli, dana) = (seen[0].customer.id.clone(), seen[1].customer.id.clone());
            store
                .link_identity(&dana, "phone", "+1777", *now)
                .await
                .unwrap();
            store
                .patch_attributes(&eli, json!({"tier": "silver"}).as_object().unwrap())
                .await
                .unwrap();
        }
        for r in &seen {
            if !conversations.contains(&r.conversation.id) {
                conversations.push(r.conversation.id.clone());
            }
        }
        let seen: Vec<Value> = seen
            .iter()
            .map(|r| {
                json!({
                    "customer": label(&mut ids, &r.customer.id),
                    "attributes": r.customer.attributes,
                    "identities": r.customer.identities,
                    "contacts_last_24h": r.customer.contacts_last_24h,
                    "open_conversations": r.customer.open_conversations,
                    "previous_agent": r.customer.previous_agent,
                    "channels_used": r.customer.channels_used,
                    "conversation": label(&mut ids, &r.conversation.id),
                    "new": r.conversation.new,
                    "age": r.conversation.age,
                    "message_count": r.conversation.message_count,
                    "history": r.history,
                    "opened_at": r.conversation_opened_at,
                })
            })
            .collect();
        summary.push(json!({"outcomes": format!("{outcomes:?}"), "seen": seen}));
    }
    for key in ["m-1", "m-4", "m-7", "m-10", "none"] {
        summary.push(json!(format!(
            "{:?}",
            store.decision("chat", key).await.unwrap()
        )));
    }
    for (kind, address) in [("webchat", "dana"), ("email", "dana@x"), ("webchat", "fay")] {
        let Some(mut customer) = store.customer_by_identity(kind, address).await.unwrap() else {
            summary.push(Value::Null);
            continue;
        };
        let customer_id = std::mem::take(&mut customer.id);
        customer.id = label(&mut ids, &customer_id);
        summary.push(serde_json::to_value(&customer).unwrap());
        for id in &conversations {
            let Some(mut record) = store.conversation(id).await.unwrap() else {
                continue;
            };
            if record.customer_id == customer_id {
                record.id = label(&mut ids, &record.id);
                record.customer_id = customer.id.clone();
                summary.push(serde_json::to_value(&record).unwrap());
            }
        }
    }
    Value::Array(summary)
}

/// `id`'s position among the ids seen so far, as `id-N`.
fn label(ids: &mut Vec<String>, id: &str) -> String {
    let position = ids.iter().position(|known| known == id).unwrap_or_else(|| {
        ids.push(id.to_owned());
        ids.len() - 1
    });
    format!("id-{position}")
}

/// A message from `sender` listing `email` as its customer's, verified or not.
fn with_email(id: &str, sender: &str, email: &str, verified: bool) -> NormalizedMessage {
    let mut m = message(id, sender, "webchat");
    m.metadata.insert(
        "identities".into(),
        json!([{"kind": "email", "address": email, "verified": verified}]),
    );
    m
}

async fn a_verified_identity_merges_two_customers(backend: Backend) {
    let store = TestStore::open(backend).await;
    // Dana by email (with a plan), then as an anonymous chat visitor (with a tier).
    let mut first = message("m-1", "dana@example.com", "email");
    first.sender.kind = "email".into();
    first
        .metadata
        .insert("attributes".into(), json!({"plan": "pro", "tier": "gold"}));
    let (_, seen) = route(&store, &[first], 1_000).await;
    let dana = seen[0].customer.id.clone();
    let dana_conversation = seen[0].conversation.id.clone();
    let mut second = message("m-2", "visitor-9", "webchat");
    second.metadata.insert(
        "attributes".into(),
        json!({"tier": "silver", "locale": "de"}),
    );
    let (_, seen) = route(&store, &[second], 2_000).await;
    let visitor = seen[0].customer.id.clone();
    assert_ne!(dana, visitor);

    // The visitor logs in: the site vouches for the email. One customer from now on.
    let (_, seen) = route(
        &store,
        &[with_email("m-3", "visitor-9", "dana@example.com", true)],
        3_000,
    )
    .await;
    let merged = &seen[0];
    assert_eq!(
        merged.customer.id, visitor,
        "the sender's customer survives"
    );
    let identities: Vec<_> = merged
        .customer
        .identities
        .iter()
        .map(|i| i.address.as_str())
        .collect();
    assert!(identities.contains(&"dana@example.com") && identities.contains(&"visitor-9"));
    assert_eq!(merged.customer.attributes["plan"], "pro", "gaps filled");
    assert_eq!(
        merged.customer.attributes["tier"], "silver",
        "the survivor wins a conflict"
    );
    assert_eq!(merged.customer.contacts_last_24h, 3);
    let texts: Vec<String> = merged.history.iter().map(|h| field(h, "channel")).collect();
    assert_eq!(
        texts,
        ["email", "webchat"],
        "both customers' messages, oldest first"
    );

    // Both ids now lead to one record; the email writes into the same conversation.
    let via_old = store.customer(&dana).await.unwrap().unwrap();
    assert_eq!(via_old.id, visitor);
    let (_, seen) = route(
        &store,
        &[{
            let mut m = message("m-4", "dana@example.com", "email");
            m.sender.kind = "email".into();
            m
        }],
        4_000,
    )
    .await;
    assert_eq!(seen[0].customer.id, visitor);
    assert_eq!(seen[0].conversation.id, merged.conversation.id);
    let audit = store.merges(&visitor).await.unwrap();
    assert_eq!(audit.len(), 1, "{audit:?}");
    assert_eq!(audit[0]["status"], "merged");
    assert_eq!(audit[0]["reason"], "verified identity");
    assert_eq!(audit[0]["from_customer"], dana.as_str());
    assert_eq!(audit[0]["identity"]["address"], "dana@example.com");
    assert_eq!(
        audit[0]["detail"]["attribute_conflicts"]["tier"]["dropped"],
        "gold"
    );
    // Dana's old conversation was closed and moved; its message is the survivor's now.
    assert_ne!(dana_conversation, merged.conversation.id);
    let old = store
        .conversation(&dana_conversation)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(old.customer_id, visitor);
    assert_eq!(old.status, "closed");
}

async fn an_unverified_identity_only_suggests_a_merge(backend: Backend) {
    let store = TestStore::open(backend).await;
    let (_, seen) = route(
        &store,
        &[with_email("m-1", "visitor-a", "a@example.com", false)],
        1_000,
    )
    .await;
    let a = seen[0].customer.id.clone();
    let (_, seen) = route(&store, &[message("m-2", "visitor-b", "webchat")], 2_000).await;
    let b = seen[0].customer.id.clone();
    // b types a's email, unverified, twice: one suggestion, nothing moves.
    for (id, at) in [("m-3", 3_000), ("m-4", 4_000)] {
        let (_, seen) = route(
            &store,
            &[with_email(id, "visitor-b", "a@example.com", false)],
            at,
        )
        .await;
        assert_eq!(seen[0].customer.id, b);
    }
    let owner = store
        .customer_by_identity("email", "a@example.com")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(owner.id, a, "the email stays with a");
    let suggestions = store.merges(&b).await.unwrap();
    assert_eq!(suggestions.len(), 1, "{suggestions:?}");
    assert_eq!(suggestions[0]["status"], "suggested");
    assert_eq!(suggestions[0]["reason"], "unverified identity");
    assert_eq!(suggestions[0]["into_customer"], b.as_str());
    assert_eq!(suggestions[0]["from_customer"], a.as_str());
    assert_eq!(store.merges(&a).await.unwrap(), suggestions);
}

/// A suggestion names customers that may be merged into others later: it then names their
/// survivor, and ends when the two it names become one. A survivor's history shows the merges
/// of the customers it absorbed, and an absorbed id answers with its survivor's history.
async fn a_suggestion_follows_its_customers_through_merges(backend: Backend) {
    let store = TestStore::open(backend).await;
    let (_, seen) = route(
        &store,
        &[with_email("m-1", "visitor-a", "a@example.com", false)],
        1_000,
    )
    .await;
    let a = seen[0].customer.id.clone();
    let (_, seen) = route(&store, &[message("m-2", "visitor-b", "webchat")], 2_000).await;
    let b = seen[0].customer.id.clone();
    let (_, seen) = route(&store, &[message("m-3", "visitor-c", "webchat")], 3_000).await;
    let c = seen[0].customer.id.clone();
    // b types a's email, unverified: "merge a into b?"
    route(
        &store,
        &[with_email("m-4", "visitor-b", "a@example.com", false)],
        4_000,
    )
    .await;

    // a is merged into c: the suggestion now asks to merge c into b.
    assert!(matches!(
        store.merge(&c, &a, 5_000).await.unwrap(),
        MergeOutcome::Merged { .. }
    ));
    let history = store.merges(&c).await.unwrap();
    assert_eq!(
        status_into_from(&history),
        [
            ("suggested", b.as_str(), c.as_str()),
            ("merged", c.as_str(), a.as_str())
        ]
    );
    assert_eq!(history[0]["identity"]["address"], "a@example.com");
    assert_eq!(
        store.merges(&a).await.unwrap(),
        history,
        "a answers with c's"
    );

    // c is merged into b: the two the suggestion named are one, so it is gone.
    assert!(matches!(
        store.merge(&b, &c, 6_000).await.unwrap(),
        MergeOutcome::Merged { .. }
    ));
    let history = store.merges(&b).await.unwrap();
    assert_eq!(
        status_into_from(&history),
        [
            ("merged", c.as_str(), a.as_str()),
            ("merged", b.as_str(), c.as_str())
        ]
    );
    assert_eq!(store.merges(&a).await.unwrap(), history);
}

/// Each audit entry's status, survivor and absorbed customer.
fn status_into_from(history: &[Value]) -> Vec<(&str, &str, &str)> {
    history
        .iter()
        .map(|m| {
            (
                m["status"].as_str().unwrap(),
                m["into_customer"].as_str().unwrap(),
                m["from_customer"].as_str().unwrap(),
            )
        })
        .collect()
}

async fn an_explicit_merge_moves_everything_and_is_audited(backend: Backend) {
    let store = TestStore::open(backend).await;
    let mut first = message("m-1", "visitor-a", "webchat");
    first
        .metadata
        .insert("attributes".into(), json!({"tier": "gold"}));
    let (_, seen) = route(&store, &[first], 1_000).await;
    let a = seen[0].customer.id.clone();
    let a_conversation = seen[0].conversation.id.clone();
    let (_, seen) = route(&store, &[message("m-2", "visitor-b", "webchat")], 2_000).await;
    let b = seen[0].customer.id.clone();
    let b_conversation = seen[0].conversation.id.clone();

    assert_eq!(
        store.merge(&a, &a, 3_000).await.unwrap(),
        MergeOutcome::Same
    );
    assert_eq!(
        store.merge(&a, "nobody", 3_000).await.unwrap(),
        MergeOutcome::Unknown("nobody".into())
    );
    let MergeOutcome::Merged { customer, merge_id } = store.merge(&a, &b, 3_000).await.unwrap()
    else {
        panic!("merged");
    };
    assert_eq!(customer.id, a);
    assert_eq!(customer.attributes["tier"], "gold");
    assert_eq!(customer.identities.len(), 2);
    assert_eq!(
        store.merge(&a, &b, 4_000).await.unwrap(),
        MergeOutcome::AlreadyMerged {
            customer: b.clone(),
            into: a.clone()
        }
    );
    // The other way round: b is a's already.
    assert_eq!(
        store.merge(&b, &a, 4_000).await.unwrap(),
        MergeOutcome::AlreadyMerged {
            customer: b.clone(),
            into: a.clone()
        }
    );
    // a's conversation continues; b's is closed and a's now.
    let kept = store.conversation(&a_conversation).await.unwrap().unwrap();
    assert_eq!(kept.status, "open");
    let closed = store.conversation(&b_conversation).await.unwrap().unwrap();
    assert_eq!(
        (closed.customer_id.as_str(), closed.status.as_str()),
        (a.as_str(), "closed")
    );
    // b's next message lands in a's conversation, with both histories.
    let (_, seen) = route(&store, &[message("m-3", "visitor-b", "webchat")], 5_000).await;
    assert_eq!(seen[0].customer.id, a);
    assert_eq!(seen[0].conversation.id, a_conversation);
    assert_eq!(seen[0].history.len(), 2);
    let audit = store.merges(&b).await.unwrap();
    assert_eq!(audit.len(), 1);
    assert_eq!(audit[0]["id"], merge_id.as_str());
    assert_eq!(audit[0]["reason"], "api");
    assert_eq!(audit[0]["detail"]["identities"][0]["address"], "visitor-b");
}

/// Two nodes' writes racing a merge of the same customers: opposite merges, a chain of merges,
/// and a link or an attribute patch on the customer being absorbed. Each ends with every id
/// answering one survivor that holds every identity and attribute, and the router still
/// routing its senders (a tombstone pointing at itself would hold its batches forever).
async fn merges_racing_other_writes_leave_one_survivor_and_lose_nothing(backend: Backend) {
    let one = TestStore::open(backend).await;
    let two = one.another().await;
    let mut now = 1_000;
    for round in 0..6 {
        let mut ids = Vec::new();
        for name in ["x", "y", "z"] {
            now += 1;
            let m = message(
                &format!("{name}-{round}"),
                &format!("{name}-{round}"),
                "webchat",
            );
            let (_, seen) = route(&one, &[m], now).await;
            ids.push(seen[0].customer.id.clone());
        }
        let [x, y, z] = [&ids[0], &ids[1], &ids[2]];

        // Opposite merges: one merges, the other finds it done.
        let (a, b) = tokio::join!(one.merge(x, y, now), two.merge(y, x, now));
        let merged = [a.unwrap(), b.unwrap()]
            .iter()
            .filter(|o| matches!(o, MergeOutcome::Merged { .. }))
            .count();
        assert_eq!(merged, 1, "round {round}: one of two opposite merges");
        // A chain: z absorbs the survivor while it is linked an identity and patched.
        let survivor = one.customer(x).await.unwrap().unwrap().id;
        let email = format!("racer-{round}@example.com");
        let patch = json!({"plan": "pro"}).as_object().unwrap().clone();
        let (merged, linked, patched) = tokio::join!(
            two.merge(z, &survivor, now),
            one.link_identity(&survivor, "email", &email, now),
            one.patch_attributes(&survivor, &patch),
        );
        assert!(matches!(merged.unwrap(), MergeOutcome::Merged { .. }));
        assert!(matches!(linked.unwrap(), LinkOutcome::Linked(_)));
        assert!(patched.unwrap().is_some());

        let z_record = one.customer(z).await.unwrap().unwrap();
        for id in [x, y, z] {
            assert_eq!(
                one.customer(id).await.unwrap().unwrap().id,
                z_record.id,
                "round {round}: every id answers the survivor"
            );
        }
        let mut addresses: Vec<&str> = z_record
            .identities
            .iter()
            .map(|i| i.address.as_str())
            .collect();
        addresses.sort_unstable();
        let expected = [
            email.clone(),
            format!("x-{round}"),
            format!("y-{round}"),
            format!("z-{round}"),
        ];
        assert_eq!(addresses, expected, "round {round}");
        assert_eq!(z_record.attributes.get("plan"), Some(&json!("pro")));
        for name in ["x", "y", "z"] {
            now += 1;
            let m = message(
                &format!("{name}-{round}-again"),
                &format!("{name}-{round}"),
                "webchat",
            );
            let (_, seen) = route(&two, &[m], now).await;
            assert_eq!(seen[0].customer.id, z_record.id, "round {round}: {name}");
        }
    }
    two.close().await;
}

async fn linking_an_identity_refuses_another_customers(backend: Backend) {
    let store = TestStore::open(backend).await;
    let (_, seen) = route(&store, &[message("m-1", "visitor-a", "webchat")], 1_000).await;
    let a = seen[0].customer.id.clone();
    let (_, seen) = route(&store, &[message("m-2", "visitor-b", "webchat")], 2_000).await;
    let b = seen[0].customer.id.clone();
    let LinkOutcome::Linked(record) = store
        .link_identity(&a, "email", "a@example.com", 3_000)
        .await
        .unwrap()
    else {
        panic!("linked");
    };
    assert!(
        record
            .identities
            .iter()
            .any(|i| i.address == "a@example.com")
    );
    // Again: nothing changes.
    assert!(matches!(
        store
            .link_identity(&a, "email", "a@example.com", 3_000)
            .await
            .unwrap(),
        LinkOutcome::Linked(_)
    ));
    assert_eq!(
        store
            .link_identity(&b, "email", "a@example.com", 4_000)
            .await
            .unwrap(),
        LinkOutcome::Taken {
            customer_id: a.clone()
        }
    );
    assert_eq!(
        store
            .link_identity("nobody", "email", "x@example.com", 4_000)
            .await
            .unwrap(),
        LinkOutcome::UnknownCustomer
    );
    // The next email from that address is a's.
    let mut m = message("m-3", "a@example.com", "email");
    m.sender.kind = "email".into();
    let (_, seen) = route(&store, &[m], 5_000).await;
    assert_eq!(seen[0].customer.id, a);
}

async fn a_reply_in_a_thread_continues_its_conversation(backend: Backend) {
    let store = TestStore::open(backend).await;
    let hour = 60 * 60 * 1000;
    let in_thread = |id: &str, sender: &str, thread: &str| {
        let mut m = message(id, sender, "email");
        m.thread_key = Some(thread.to_owned());
        m
    };
    let (_, seen) = route(&store, &[in_thread("m-1", "dana", "thread-1")], hour).await;
    let first = seen[0].conversation.id.clone();
    store.close_conversation(&first, 2 * hour).await.unwrap();

    // A week later, a new subject: a new conversation.
    let (_, seen) = route(&store, &[in_thread("m-2", "dana", "thread-2")], 170 * hour).await;
    let second = seen[0].conversation.id.clone();
    assert_ne!(second, first);

    // A reply in the first thread goes back to the first conversation, reopened; the next
    // message of the second thread to the second, in the same batch.
    let (_, seen) = route(
        &store,
        &[
            in_thread("m-3", "dana", "thread-1"),
            in_thread("m-4", "dana", "thread-2"),
        ],
        171 * hour,
    )
    .await;
    assert_eq!(seen[0].conversation.id, first, "the thread's conversation");
    assert_eq!(seen[0].conversation.message_count, 1);
    assert_eq!(
        seen[0].customer.open_conversations, 2,
        "reopened beside the second"
    );
    assert_eq!(seen[1].conversation.id, second);
    assert_eq!(seen[1].conversation.message_count, 1);
    assert_eq!(seen[1].customer.open_conversations, 2);
    let reopened = store.conversation(&first).await.unwrap().unwrap();
    assert_eq!(
        (reopened.status.as_str(), reopened.message_count),
        ("open", 2)
    );
    let other = store.conversation(&second).await.unwrap().unwrap();
    assert_eq!(other.message_count, 2, "both conversations written");

    // Someone else replying in Dana's thread stays in their own conversation.
    let (_, seen) = route(&store, &[in_thread("m-5", "sam", "thread-1")], 172 * hour).await;
    assert_ne!(seen[0].conversation.id, first);

    // Both closed, the first the latest active: a reply in the second thread reopens the
    // second alone, and the first (which a message outside any thread would have reopened)
    // stays closed.
    store.close_conversation(&second, 173 * hour).await.unwrap();
    let (_, seen) = route(&store, &[message("m-6", "dana", "email")], 173 * hour + 1).await;
    assert_eq!(seen[0].conversation.id, first);
    store.close_conversation(&first, 174 * hour).await.unwrap();
    let (_, seen) = route(&store, &[in_thread("m-7", "dana", "thread-2")], 175 * hour).await;
    assert_eq!(seen[0].conversation.id, second);
    assert_eq!(seen[0].customer.open_conversations, 1);
    let other = store.conversation(&first).await.unwrap().unwrap();
    assert_eq!(other.status, "closed");
}

/// A field of a history entry's JSON.
fn field(entry: &HistoryEntry, name: &str) -> String {
    let value: Value = serde_json::from_str(entry.json()).expect("history entry JSON");
    value[name].as_str().expect("a string field").to_owned()
}
