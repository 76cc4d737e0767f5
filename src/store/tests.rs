use serde_json::json;
use switchboard_channel::{ChannelRef, NormalizedMessage, Sender};
use time::OffsetDateTime;

use super::*;

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

fn record(message: &NormalizedMessage, resolved: &Resolved) -> Record {
    Record {
        message: message.clone(),
        customer_id: resolved.customer.id.clone(),
        attributes: resolved.customer.attributes.clone(),
        conversation_id: resolved.conversation.id.clone(),
        queue: "general".into(),
        urgency: 12,
        priority: 1,
        assignment: format!("{{\"for\": \"{}\"}}", message.external_id),
    }
}

#[tokio::test]
async fn same_sender_same_customer_and_conversation() {
    let (_dir, store) = store().await;
    let first = message("m-1", "visitor-1", "webchat");
    let a = store.resolve(&first, 1_000).await.unwrap();
    assert!(a.conversation.new);
    assert_eq!(a.customer.contacts_last_24h, 1);
    store.record(&[record(&first, &a)], 1_000).await.unwrap();

    let second = message("m-2", "visitor-1", "webchat");
    let b = store.resolve(&second, 2_000).await.unwrap();
    assert_eq!(a.customer.id, b.customer.id);
    assert_eq!(a.conversation.id, b.conversation.id);
    assert!(!b.conversation.new);
    assert_eq!(b.conversation.message_count, 1);
    assert_eq!(b.customer.contacts_last_24h, 2);
    assert_eq!(b.customer.channels_used, vec!["webchat"]);
    assert_eq!(
        b.customer.identities,
        vec![crate::router::decide::Identity {
            kind: "webchat".into(),
            address: "visitor-1".into()
        }]
    );

    let other = store
        .resolve(&message("m-3", "visitor-2", "webchat"), 3_000)
        .await
        .unwrap();
    assert_ne!(other.customer.id, a.customer.id);
    assert_ne!(other.conversation.id, a.conversation.id);
}

#[tokio::test]
async fn decisions_are_recorded_once_and_marked_published() {
    let (_dir, store) = store().await;
    let m = message("m-1", "visitor-1", "webchat");
    assert_eq!(store.decision("chat", "m-1").await.unwrap(), None);
    let resolved = store.resolve(&m, 1_000).await.unwrap();
    let mut r = record(&m, &resolved);
    store.record(std::slice::from_ref(&r), 1_000).await.unwrap();
    // Recording the same key again changes nothing.
    r.queue = "billing".into();
    r.assignment = "{}".into();
    store.record(&[r], 1_000).await.unwrap();

    let stored = store.decision("chat", "m-1").await.unwrap().unwrap();
    assert_eq!(stored.queue, "general");
    assert_eq!(stored.priority, 1);
    assert_eq!(stored.assignment, "{\"for\": \"m-1\"}");
    assert!(!stored.published);

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

    let again = store
        .resolve(&message("m-2", "visitor-1", "webchat"), 2_000)
        .await
        .unwrap();
    assert_eq!(
        again.conversation.message_count, 1,
        "the duplicate did not count"
    );
}

#[tokio::test]
async fn attributes_merge_and_persist() {
    let (_dir, store) = store().await;
    let mut m = message("m-1", "visitor-1", "webchat");
    m.metadata
        .insert("attributes".into(), json!({"tier": "vip", "plan": "pro"}));
    let resolved = store.resolve(&m, 1_000).await.unwrap();
    assert_eq!(resolved.customer.attributes["tier"], "vip");
    store.record(&[record(&m, &resolved)], 1_000).await.unwrap();

    let mut next = message("m-2", "visitor-1", "webchat");
    next.metadata
        .insert("attributes".into(), json!({"plan": "enterprise"}));
    let resolved = store.resolve(&next, 2_000).await.unwrap();
    assert_eq!(
        resolved.customer.attributes["tier"], "vip",
        "kept from before"
    );
    assert_eq!(
        resolved.customer.attributes["plan"], "enterprise",
        "updated"
    );
}

#[tokio::test]
async fn channels_used_accumulate_without_duplicates() {
    let (_dir, store) = store().await;
    for (i, kind) in ["webchat", "email", "webchat"].iter().enumerate() {
        let m = message(&format!("m-{i}"), "visitor-1", kind);
        let resolved = store.resolve(&m, 1_000).await.unwrap();
        store.record(&[record(&m, &resolved)], 1_000).await.unwrap();
    }
    let resolved = store
        .resolve(&message("m-9", "visitor-1", "webchat"), 2_000)
        .await
        .unwrap();
    assert_eq!(resolved.customer.channels_used, vec!["webchat", "email"]);
}

#[tokio::test]
async fn contacts_last_24h_forgets_old_messages() {
    let (_dir, store) = store().await;
    let m = message("m-1", "visitor-1", "webchat");
    let resolved = store.resolve(&m, 0).await.unwrap();
    store.record(&[record(&m, &resolved)], 0).await.unwrap();
    let later = store
        .resolve(&message("m-2", "visitor-1", "webchat"), DAY_MS_FOR_TEST + 1)
        .await
        .unwrap();
    assert_eq!(later.customer.contacts_last_24h, 1);
}

const DAY_MS_FOR_TEST: i64 = 24 * 60 * 60 * 1000;

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
