use serde_json::json;
use switchboard_channel::{ChannelRef, NormalizedMessage, Sender};
use time::OffsetDateTime;

use super::*;
use crate::router::rules::RuleSet;

const QUEUES: &str = r#"
[[queue]]
name = "general"
default = true
languages = ["*"]

[[queue]]
name = "billing"
skills = ["billing"]
languages = ["en", "de"]

[[queue]]
name = "billing-vip"
skills = ["billing", "vip"]
languages = ["en"]

[[queue]]
name = "billing-2"
skills = ["billing"]
languages = ["en"]

[[queue]]
name = "escalations"
skills = ["legal"]
"#;

fn set(rules: &str) -> RuleSet {
    RuleSet::from_sources(&[
        ("q.toml".into(), QUEUES.into()),
        ("r.toml".into(), rules.into()),
    ])
    .unwrap_or_else(|d| panic!("{d}"))
}

fn message(text: &str) -> NormalizedMessage {
    NormalizedMessage {
        message_id: NormalizedMessage::stable_id("chat", text),
        channel: ChannelRef {
            id: "chat".into(),
            kind: "webchat".into(),
        },
        external_id: text.into(),
        thread_key: None,
        sender: Sender {
            kind: "email".into(),
            address: "dana@example.com".into(),
            name: None,
        },
        subject: None,
        text: text.into(),
        attachments: vec![],
        received_at: OffsetDateTime::UNIX_EPOCH,
        auto_submitted: false,
        metadata: Default::default(),
    }
}

struct Case {
    now: OffsetDateTime,
    message: NormalizedMessage,
    customer: CustomerView,
    conversation: ConversationView,
    signals: Signals,
}

impl Case {
    fn new(text: &str) -> Self {
        let message = message(text);
        let signals = Signals::from_message(&message);
        Case {
            now: OffsetDateTime::now_utc(),
            message,
            customer: CustomerView::default(),
            conversation: ConversationView::default(),
            signals,
        }
    }

    fn tier(mut self, tier: &str) -> Self {
        self.customer.attributes.insert("tier".into(), json!(tier));
        self
    }

    fn decide(&self, rules: &RuleSet) -> Decision {
        self.decide_with_load(rules, &|_| 0)
    }

    fn decide_with_load(&self, rules: &RuleSet, load: &dyn Fn(&str) -> u64) -> Decision {
        let input = Input {
            now: self.now,
            message: &self.message,
            customer: &self.customer,
            conversation: &self.conversation,
            signals: &self.signals,
        };
        decide(rules, &input, load)
    }
}

#[test]
fn no_rules_routes_to_default_with_zero_urgency() {
    let d = Case::new("hello").decide(&set(""));
    assert_eq!(d.queue, "general");
    assert_eq!((d.urgency, d.priority), (0, 0));
    assert_eq!(d.explanation.urgency["total"], 0);
    assert!(d.explanation.queue_reason.contains("default"));
}

#[test]
fn matching_rule_requires_skill_and_adds_urgency() {
    let rules = set(r#"
[[rule]]
id = "refunds"
when = 'message.text.matches("(?i)refund")'
require_skills = ["billing"]
urgency = 10
tags = ["money"]
"#);
    let d = Case::new("I want a REFUND").decide(&rules);
    assert_eq!(d.queue, "billing", "{:?}", d.explanation);
    assert_eq!(d.urgency, 10);
    assert_eq!(d.priority, 1);
    assert_eq!(d.skills, vec!["billing"]);
    assert_eq!(d.tags, vec!["money"]);
    assert_eq!(d.explanation.rules.len(), 1);
    assert_eq!(&*d.explanation.rules[0].id, "refunds");
    assert_eq!(&*d.explanation.rules[0].file, "r.toml");
    assert_eq!(d.explanation.rules[0].line, 2);
    assert!(d.explanation.rules[0].effect.contains("urgency +10"));
    assert_eq!(d.explanation.urgency["rule:refunds"], 10);
    assert_eq!(
        &*d.explanation.skill_match["escalations"],
        "rejected: lacks skill billing"
    );

    let d = Case::new("hello").decide(&rules);
    assert_eq!(d.queue, "general");
    assert_eq!(
        d.explanation.not_matched.iter().collect::<Vec<_>>(),
        ["refunds"]
    );
}

#[test]
fn rule_without_when_always_matches() {
    let d = Case::new("x").decide(&set("[[rule]]\nid = \"base\"\nurgency = 5\n"));
    assert_eq!(d.urgency, 5);
}

#[test]
fn urgency_sums_and_clamps() {
    let rules = set(r#"
[[rule]]
id = "a"
urgency = 70
[[rule]]
id = "b"
urgency = 60
"#);
    let d = Case::new("x").decide(&rules);
    assert_eq!(d.urgency, 100);
    assert_eq!(d.priority, 9, "priority is capped at 9");
    assert_eq!(d.explanation.urgency["rule:a"], 70);
    assert_eq!(d.explanation.urgency["total"], 100);

    let d = Case::new("x").decide(&set("[[rule]]\nid = \"calm\"\nurgency = -20\n"));
    assert_eq!((d.urgency, d.priority), (0, 0), "negative sums clamp to 0");
}

#[test]
fn priority_is_urgency_over_ten() {
    assert_eq!(priority_of(0), 0);
    assert_eq!(priority_of(9), 0);
    assert_eq!(priority_of(10), 1);
    assert_eq!(priority_of(55), 5);
    assert_eq!(priority_of(99), 9);
    assert_eq!(priority_of(100), 9);
}

#[test]
fn customer_attributes_are_visible_to_cel() {
    let rules = set(r#"
[[rule]]
id = "vip"
when = 'has(customer.attributes.tier) && customer.attributes.tier == "vip"'
urgency = 30
"#);
    assert_eq!(Case::new("x").tier("vip").decide(&rules).urgency, 30);
    assert_eq!(Case::new("x").tier("basic").decide(&rules).urgency, 0);
    assert_eq!(Case::new("x").decide(&rules).urgency, 0);
}

#[test]
fn route_to_is_a_hard_route_and_first_one_wins() {
    let rules = set(r#"
[[rule]]
id = "legal"
when = 'message.text.contains("lawyer")'
route_to = "escalations"
urgency = 50
[[rule]]
id = "also-billing"
when = 'message.text.contains("lawyer")'
route_to = "billing"
require_skills = ["billing"]
"#);
    let d = Case::new("my lawyer will call").decide(&rules);
    assert_eq!(d.queue, "escalations");
    assert_eq!(d.explanation.queue_reason, "hard route by rule `legal`");
    assert!(d.explanation.rules[1].effect.contains("ignored"));
}

#[test]
fn stop_ends_evaluation() {
    let rules = set(r#"
[[rule]]
id = "first"
urgency = 10
stop = true
[[rule]]
id = "second"
urgency = 10
"#);
    let d = Case::new("x").decide(&rules);
    assert_eq!(d.urgency, 10);
    assert_eq!(d.explanation.rules.len(), 1);
    assert!(
        d.explanation.not_matched.is_empty(),
        "`second` was never evaluated"
    );
}

#[test]
fn closest_skill_match_wins_then_lighter_load() {
    let rules = set("[[rule]]\nid = \"b\"\nrequire_skills = [\"billing\"]\n");
    // billing, billing-2 have no extra skill; billing-vip has one. Equal load: file order.
    assert_eq!(Case::new("x").decide(&rules).queue, "billing");
    let d = Case::new("x").decide_with_load(&rules, &|q| if q == "billing" { 5 } else { 1 });
    assert_eq!(d.queue, "billing-2");
    assert!(
        d.explanation.queue_reason.contains("lightest load of 2"),
        "{}",
        d.explanation.queue_reason
    );

    let rules = set("[[rule]]\nid = \"v\"\nrequire_skills = [\"billing\", \"vip\"]\n");
    assert_eq!(Case::new("x").decide(&rules).queue, "billing-vip");
}

#[test]
fn language_is_checked_before_skills() {
    let rules = set("[[rule]]\nid = \"b\"\nrequire_skills = [\"billing\"]\n");
    let mut case = Case::new("x");
    case.signals.language = "de".into();
    let d = case.decide(&rules);
    assert_eq!(d.queue, "billing", "only `billing` serves German");
    assert_eq!(
        &*d.explanation.skill_match["billing-2"],
        "rejected: does not serve language de"
    );
    assert_eq!(d.language.as_deref(), Some("de"));

    case.signals.language = "fr".into();
    let d = case.decide(&rules);
    assert_eq!(d.queue, "general", "no French billing queue: default");
    assert!(
        d.explanation.queue_reason.contains("no queue is eligible"),
        "{}",
        d.explanation.queue_reason
    );
}

#[test]
fn evaluation_errors_count_as_not_matched_and_are_explained() {
    let rules = set(r#"
[[rule]]
id = "broken"
when = 'customer.attributes.tier == "vip"'
urgency = 30
[[rule]]
id = "not-bool"
when = '1 + 1'
"#);
    let d = Case::new("x").decide(&rules);
    assert_eq!(d.urgency, 0);
    assert_eq!(d.explanation.errors.len(), 2);
    assert_eq!(d.explanation.errors[0].id, "broken");
    assert!(d.explanation.errors[1].error.contains("true or false"));
}

#[test]
fn signals_and_message_fields_are_visible_to_cel() {
    let rules = set(r#"
[[rule]]
id = "shouting"
when = 'signals.caps_ratio > 0.5 && signals.exclamations >= 2'
urgency = 15
[[rule]]
id = "email-sender"
when = 'message.kind == "email" && message.channel == "webchat" && message.sender.endsWith("@example.com")'
urgency = 1
[[rule]]
id = "returning"
when = 'conversation.new == false && conversation.message_count > 2'
urgency = 2
"#);
    let mut case = Case::new("WHERE IS MY ORDER!!");
    let d = case.decide(&rules);
    assert_eq!(d.urgency, 16, "{:?}", d.explanation);
    case.conversation.message_count = 3;
    assert_eq!(case.decide(&rules).urgency, 18);
    assert_eq!(Case::new("where is my order").decide(&rules).urgency, 1);
}

#[test]
fn signals_from_message_text() {
    let s = Signals::from_message(&message("HELP me!!!"));
    assert!((s.caps_ratio - 4.0 / 6.0).abs() < 1e-9);
    assert_eq!(s.exclamations, 3);
    assert_eq!(Signals::from_message(&message("123")).caps_ratio, 0.0);
}

#[test]
fn signal_weights_add_explained_urgency_terms() {
    let rules = RuleSet::from_sources(&[
        (
            "q.toml".into(),
            "[[queue]]\nname = \"general\"\ndefault = true\nlanguages = [\"en\", \"de\"]\n".into(),
        ),
        (
            "signals.toml".into(),
            "[keywords]\nen = [\"urgent\"]\nde = [\"dringend\"]\n\n[signals]\nurgent_keyword = 15\nnegative_sentiment = 20\nrepeat_contact = 5\n".into(),
        ),
    ])
    .unwrap_or_else(|d| panic!("{d}"));
    let mut case =
        Case::new("This is urgent and honestly the worst, terrible service I have ever had.");
    case.customer.contacts_last_24h = 3;
    case.signals = rules
        .model
        .compute(&case.message, case.customer.contacts_last_24h);
    assert_eq!(case.signals.language, "en");
    let d = case.decide(&rules);
    let terms = &d.explanation.urgency;
    assert_eq!(terms["signal:urgent_keywords"], 15);
    assert_eq!(terms["signal:repeat_contacts"], 10);
    assert!(terms["signal:negative_sentiment"] > 10, "{terms:?}");
    assert_eq!(i64::from(d.urgency), terms["total"]);
    assert_eq!(
        terms["total"],
        terms["signal:urgent_keywords"]
            + terms["signal:repeat_contacts"]
            + terms["signal:negative_sentiment"]
    );
    assert_eq!(d.language.as_deref(), Some("en"));
}

#[test]
fn signal_tables_are_validated() {
    let errors = RuleSet::from_sources(&[
        (
            "q.toml".into(),
            "[[queue]]\nname = \"general\"\ndefault = true\nlanguages = [\"en\", \"klingon\"]\n"
                .into(),
        ),
        ("a.toml".into(), "[signals]\nurgent_keyword = 1\n".into()),
        ("b.toml".into(), "[signals]\nshoutin = 1\n".into()),
    ])
    .unwrap_err()
    .to_string();
    assert!(
        errors.contains("b.toml:2:1: unknown field `shoutin`"),
        "{errors}"
    );
    assert!(errors.contains("language `klingon`"), "{errors}");
}

/// Queue names become AMQP names, which end at 255 bytes.
#[test]
fn a_queue_name_is_at_most_64_bytes() {
    let queues = |name: &str| {
        vec![(
            "q.toml".to_owned(),
            format!("[[queue]]\nname = \"{name}\"\ndefault = true\n"),
        )]
    };
    let errors = RuleSet::from_sources(&queues(&"q".repeat(65)))
        .unwrap_err()
        .to_string();
    assert!(errors.contains("must be 1 to 64"), "{errors}");
    assert!(RuleSet::from_sources(&queues(&"q".repeat(64))).is_ok());
}

/// A file that does not parse is reported once: its queues are not also reported missing.
#[test]
fn an_unreadable_file_is_its_only_error() {
    let errors = RuleSet::from_sources(&[(
        "a.toml".into(),
        "[[queue]]\nname = \"general\"\ndefault = true\n\n[[test]]\nname = \"t\"\ntext = \"hi\"\nexpect.queue = \"general\"\ncolour = \"blue\"\n"
            .into(),
    )])
    .unwrap_err();
    let text = errors.to_string();
    assert!(text.contains("unknown field `colour`"), "{text}");
    assert!(!text.contains("no [[queue]]"), "{text}");
    assert_eq!(text.lines().count(), 1, "{text}");
}

#[test]
fn a_closed_queue_hands_over_to_its_after_hours_queue_or_keeps_waiting() {
    let rules = RuleSet::from_sources(&[(
        "q.toml".into(),
        r#"
[[queue]]
name = "general"
default = true

[[queue]]
name = "sales"
skills = ["sales"]
hours = {timezone = "America/New_York", mon = "09:00-18:00", tue = "09:00-18:00"}
after_hours = "general"

[[queue]]
name = "legal"
skills = ["legal"]
hours = {timezone = "UTC", mon = "09:00-17:00"}

[[rule]]
id = "buy"
when = 'message.text.contains("buy")'
require_skills = ["sales"]

[[rule]]
id = "sue"
when = 'message.text.contains("sue")'
route_to = "legal"
"#
        .into(),
    )])
    .unwrap_or_else(|d| panic!("{d}"));
    let mut case = Case::new("I want to buy");
    case.now = time::macros::datetime!(2026-11-23 15:00 UTC); // Monday 10:00 in New York
    let d = case.decide(&rules);
    assert_eq!((d.queue.as_str(), d.outside_hours), ("sales", false));
    assert_eq!(d.explanation.business_hours, None);

    case.now = time::macros::datetime!(2026-11-22 15:00 UTC); // Sunday
    let d = case.decide(&rules);
    assert_eq!((d.queue.as_str(), d.outside_hours), ("general", true));
    assert_eq!(
        d.explanation.business_hours.as_deref(),
        Some("`sales` is closed: after-hours queue `general`")
    );

    let mut case = Case::new("I will sue");
    case.now = time::macros::datetime!(2026-11-24 10:00 UTC); // Tuesday: legal is closed
    let d = case.decide(&rules);
    assert_eq!(
        (d.queue.as_str(), d.outside_hours),
        ("legal", true),
        "no after_hours: it waits"
    );
    assert!(d.explanation.business_hours.unwrap().contains("waits"));
}

#[test]
fn hours_problems_are_load_errors() {
    let errors = RuleSet::from_sources(&[(
        "q.toml".into(),
        "[[queue]]\nname = \"general\"\ndefault = true\nhours = {timezone = \"Nowhere/City\", mon = \"9 to 5\"}\nafter_hours = \"night\"\n".into(),
    )])
    .unwrap_err()
    .to_string();
    assert!(
        errors.contains("q.toml:4:9: queue `general`: hours: `Nowhere/City`"),
        "{errors}"
    );
    assert!(errors.contains("mon = `9 to 5`"), "{errors}");
    assert!(
        errors.contains("after_hours names queue `night`, which no [[queue]] defines"),
        "{errors}"
    );
}

#[test]
fn proficiency_then_preferred_skills_choose_among_eligible_queues() {
    let rules = RuleSet::from_sources(&[(
        "q.toml".into(),
        r#"
[[queue]]
name = "general"
default = true

[[queue]]
name = "billing-junior"
skills = ["billing:2", "spanish"]

[[queue]]
name = "billing-senior"
skills = [{name = "billing", level = 5}]

[[queue]]
name = "billing-es"
skills = ["billing:5", "spanish:4"]

[[rule]]
id = "refund"
when = 'message.text.contains("refund")'
require_skills = ["billing"]

[[rule]]
id = "spanish"
when = 'message.text.contains("reembolso")'
prefer_skills = ["spanish"]
"#
        .into(),
    )])
    .unwrap_or_else(|d| panic!("{d}"));
    let d = Case::new("refund please").decide(&rules);
    assert_eq!(
        d.queue, "billing-senior",
        "highest proficiency, then fewest other skills"
    );
    assert_eq!(
        &*d.explanation.skill_match["billing-junior"],
        "eligible (proficiency 2 required, 0 preferred)"
    );
    let d = Case::new("refund please, reembolso").decide(&rules);
    assert_eq!(
        d.queue, "billing-es",
        "the preferred skill breaks the tie at level 5"
    );
    assert!(d.explanation.rules[1].effect.contains("prefers spanish"));
    let d = Case::new("reembolso").decide(&rules);
    assert_eq!(
        d.queue, "billing-es",
        "a preference alone moves it off the default queue"
    );
    let d = Case::new("hello").decide(&rules);
    assert_eq!(d.queue, "general");
}

#[test]
fn skill_levels_are_validated() {
    let errors = RuleSet::from_sources(&[(
        "q.toml".into(),
        "[[queue]]\nname = \"general\"\ndefault = true\nskills = [\"a:9\", \"b:x\", {name = \"c\", level = 0}]\n\n[[rule]]\nid = \"r\"\nprefer_skills = [\"nope\"]\n".into(),
    )])
    .unwrap_err()
    .to_string();
    assert!(
        errors.contains("skill `a`: level 9 is not between 1 and 5"),
        "{errors}"
    );
    assert!(errors.contains("skill `b:x`"), "{errors}");
    assert!(errors.contains("skill `c`: level 0"), "{errors}");
    assert!(
        errors.contains("rule `r` names skill `nope`, which no queue has"),
        "{errors}"
    );
}

#[test]
fn misspelled_variables_are_load_errors_but_comprehension_variables_are_not() {
    let errors = RuleSet::from_sources(&[(
        "r.toml".into(),
        "[[queue]]\nname = \"general\"\ndefault = true\n\n[[rule]]\nid = \"typo\"\nwhen = 'mesage.text.contains(\"x\") || signal.language == \"de\"'\n".into(),
    )])
    .unwrap_err()
    .to_string();
    assert!(
        errors.contains("r.toml:7:8: rule `typo`: `when` uses `mesage`, which is not a variable"),
        "{errors}"
    );
    assert!(errors.contains("uses `signal`,"), "{errors}");

    let ok = RuleSet::from_sources(&[(
        "r.toml".into(),
        "[[queue]]\nname = \"general\"\ndefault = true\n\n[[rule]]\nid = \"any\"\nwhen = 'customer.identities.exists(i, i.kind == \"email\") && signals.urgent_keywords.all(k, size(k) > 0)'\n".into(),
    )]);
    assert!(ok.is_ok(), "{:?}", ok.err());
}
