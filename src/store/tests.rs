use std::sync::Mutex;

use serde_json::json;
use switchboard_channel::{ChannelRef, NormalizedMessage, Sender};
use time::OffsetDateTime;

use super::*;
use crate::router::decide::Identity;

const DAY_MS: i64 = 24 * 60 * 60 * 1000;

async fn store() -> (tempfile::TempDir, SqliteStore) {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("s.db").display());
    (dir, SqliteStore::open(&url).await.unwrap())
}

fn message(id: &str, sender: &str, kind: &str) -> NormalizedMessage {
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
    store: &SqliteStore,
    messages: &[NormalizedMessage],
    now_ms: i64,
) -> (Vec<RouteOutcome>, Vec<Resolved>) {
    let seen = Mutex::new(Vec::new());
    let decide = |message: &NormalizedMessage, resolved: &Resolved| {
        seen.lock().unwrap().push(resolved.clone());
        Routed {
            queue: "general".into(),
            urgency: 12,
            priority: 1,
            assignment: format!("{{\"for\": \"{}\"}}", message.external_id),
        }
    };
    let outcomes = store.route_batch(messages, now_ms, &decide).await.unwrap();
    (outcomes, seen.into_inner().unwrap())
}

#[tokio::test]
async fn same_sender_same_customer_and_conversation() {
    let (_dir, store) = store().await;
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

#[tokio::test]
async fn later_messages_in_a_batch_see_earlier_ones() {
    let (_dir, store) = store().await;
    let batch = [message("m-1", "v", "webchat"), message("m-2", "v", "email")];
    let (outcomes, seen) = route(&store, &batch, 1_000).await;
    assert_eq!(outcomes.len(), 2);
    assert!(seen[0].conversation.new);
    assert!(!seen[1].conversation.new);
    assert_eq!(seen[1].conversation.message_count, 1);
    assert_eq!(seen[1].customer.contacts_last_24h, 2);
}

#[tokio::test]
async fn a_recorded_message_returns_its_decision_and_is_not_decided_again() {
    let (_dir, store) = store().await;
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

#[tokio::test]
async fn attributes_merge_and_persist() {
    let (_dir, store) = store().await;
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
}

#[tokio::test]
async fn channels_used_accumulate_without_duplicates() {
    let (_dir, store) = store().await;
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

#[tokio::test]
async fn contacts_last_24h_forgets_old_messages() {
    let (_dir, store) = store().await;
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
async fn unwritable_location_is_a_clear_error() {
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

#[tokio::test]
async fn a_closed_conversation_reopens_within_the_window_and_not_after() {
    let (_dir, store) = store().await;
    let store = store.with_reopen_window(std::time::Duration::from_secs(72 * 3600));
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

#[tokio::test]
async fn each_decision_sees_the_customers_latest_messages_on_every_channel() {
    let (_dir, store) = store().await;
    let store = store.with_history(2);
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
    let texts = |h: &[HistoryEntry]| h.iter().map(|e| e.text.clone()).collect::<Vec<_>>();
    assert_eq!(texts(&seen[0].history), ["first"]);
    assert_eq!(texts(&seen[1].history), ["first", "second"]);
    assert_eq!(seen[1].history[1].channel, "email");
    assert_eq!(seen[1].history[0].at, "1970-01-01T00:00:01Z");

    // From the store, capped at 2, oldest first.
    let (_, seen) = route(&store, &[with_text("m-4", "webchat", "fourth")], 3_000).await;
    assert_eq!(texts(&seen[0].history), ["second", "third"]);
    assert_eq!(seen[0].conversation_opened_at, 1_000);

    // Another customer sees only their own.
    let (_, seen) = route(&store, &[message("m-5", "visitor-2", "webchat")], 4_000).await;
    assert!(seen[0].history.is_empty());
}

#[tokio::test]
async fn listed_identities_link_to_the_senders_customer_but_never_move() {
    let (_dir, store) = store().await;
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
