//! Runs a rule set's `[[test]]` cases through the real decision function.

use serde_json::json;
use switchboard_channel::{ChannelRef, NormalizedMessage, Sender};
use time::OffsetDateTime;

use super::decide::{ConversationView, CustomerView, Decision, Identity, Input, Signals, decide};
use super::rules::{RuleSet, RuleTest};

/// A failed test, ready to print.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TestFailure {
    pub location: String,
    pub name: String,
    pub problems: Vec<String>,
}

impl std::fmt::Display for TestFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: test \"{}\" failed: {}",
            self.location,
            self.name,
            self.problems.join("; ")
        )
    }
}

/// Runs every test; returns `(passed, failures)`.
pub fn run_tests(rules: &RuleSet) -> (usize, Vec<TestFailure>) {
    let mut passed = 0;
    let mut failures = Vec::new();
    for test in &rules.tests {
        let problems = run_one(rules, test);
        if problems.is_empty() {
            passed += 1;
        } else {
            failures.push(TestFailure {
                location: format!("{}:{}", test.file, test.line),
                name: test.name.clone(),
                problems,
            });
        }
    }
    (passed, failures)
}

/// The message a test describes.
pub fn test_message(test: &RuleTest) -> NormalizedMessage {
    let sender = &test.message.sender;
    let kind = if sender.contains('@') {
        "email"
    } else if sender.starts_with('+') {
        "phone"
    } else {
        test.message.channel.as_str()
    };
    let external_id = format!("test:{}", test.name);
    NormalizedMessage {
        message_id: NormalizedMessage::stable_id(&test.message.channel, &external_id),
        channel: ChannelRef {
            id: test.message.channel.clone(),
            kind: test.message.channel.clone(),
        },
        external_id,
        thread_key: None,
        sender: Sender {
            kind: kind.to_owned(),
            address: sender.clone(),
            name: None,
        },
        subject: test.message.subject.clone(),
        text: test.message.text.clone(),
        attachments: Vec::new(),
        received_at: OffsetDateTime::now_utc(),
        auto_submitted: false,
        metadata: Default::default(),
    }
}

/// Decides for `message` without a store: a new conversation of a customer known only by the
/// sender, with `attributes` and `contacts_last_24h`. Used by `[[test]]` and `explain`.
pub fn dry_run(
    rules: &RuleSet,
    now: OffsetDateTime,
    message: &NormalizedMessage,
    attributes: serde_json::Map<String, serde_json::Value>,
    contacts_last_24h: u32,
) -> (Decision, Signals) {
    let customer = CustomerView {
        id: "dry-run".to_owned(),
        attributes,
        identities: vec![Identity {
            kind: message.sender.kind.clone(),
            address: message.sender.address.clone(),
        }],
        contacts_last_24h: contacts_last_24h.max(1),
        open_conversations: 1,
        channels_used: vec![message.channel.kind.clone()],
        ..CustomerView::default()
    };
    let conversation = ConversationView {
        id: "dry-run".to_owned(),
        new: true,
        ..ConversationView::default()
    };
    let signals = rules.model.compute(message, customer.contacts_last_24h);
    let decision = decide(
        rules,
        &Input {
            now,
            message,
            customer: &customer,
            conversation: &conversation,
            signals: &signals,
        },
        &|_| 0,
    );
    (decision, signals)
}

fn run_one(rules: &RuleSet, test: &RuleTest) -> Vec<String> {
    let message = test_message(test);
    let (decision, _) = dry_run(
        rules,
        test.now.unwrap_or_else(OffsetDateTime::now_utc),
        &message,
        test.customer.attributes.clone(),
        test.customer.contacts_last_24h,
    );
    let mut problems = Vec::new();
    let expect = &test.expect;
    if let Some(queue) = &expect.queue
        && &decision.queue != queue
    {
        problems.push(format!(
            "expected queue `{queue}`, got `{}` ({})",
            decision.queue, decision.explanation.queue_reason
        ));
    }
    if let Some(least) = expect.urgency_at_least
        && decision.urgency < least
    {
        problems.push(format!(
            "expected urgency ≥ {least}, got {}",
            decision.urgency
        ));
    }
    if let Some(most) = expect.urgency_at_most
        && decision.urgency > most
    {
        problems.push(format!(
            "expected urgency ≤ {most}, got {}",
            decision.urgency
        ));
    }
    if let Some(language) = &expect.language
        && decision.language.as_deref() != Some(language.as_str())
    {
        problems.push(format!(
            "expected language `{language}`, got {}",
            decision
                .language
                .as_deref()
                .map_or("none".to_owned(), |l| format!("`{l}`"))
        ));
    }
    for tag in &expect.tags {
        if !decision.tags.contains(tag) {
            problems.push(format!(
                "expected tag `{tag}`, got {}",
                json!(decision.tags)
            ));
        }
    }
    for error in &decision.explanation.errors {
        problems.push(format!(
            "rule `{}` failed to evaluate: {}",
            error.id, error.error
        ));
    }
    problems
}
