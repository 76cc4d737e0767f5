//! SLA overflow: an assignment that waited in its agent queue past the queue's `sla` comes back
//! to the router (RabbitMQ: per-message TTL, dead-lettered through `<p>.expired`; embedded bus:
//! its expiry sweeper) and moves one step along the queue's `overflow` chain, with the queue's
//! `overflow_urgency` added, a `switchboard.conversation.escalated` event, and the step
//! recorded in `explanation.escalations`.
//!
//! The step is a pure function of the returned assignment and the rules: a redelivery (the
//! router crashed before its commit) computes the same step again, and the commit publishes
//! the new assignment, publishes the event and acknowledges the returned one atomically, so a
//! step happens exactly once. The state lives in the broker (or the bus table), so pending SLAs
//! survive a restart of the daemon.

use serde_json::{Map, Value, json};
use switchboard_channel::CloudEvent;
use switchboard_channel::envelope::event_type;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::decide::priority_of;
use super::rules::RuleSet;
use crate::bus::{Assignment, ESCALATED_KEY, Event, Outcome};

/// The SLA to put on an assignment to `queue`, in milliseconds: only when the queue has
/// somewhere to overflow to (an SLA without `overflow` has no step to take).
pub fn expiry_ms(rules: &RuleSet, queue: &str) -> Option<u64> {
    let queue = rules.queue(queue)?;
    queue.overflow.as_ref()?;
    queue
        .sla
        .map(|sla| u64::try_from(sla.as_millis()).unwrap_or(u64::MAX))
}

/// What to do with an assignment an agent queue handed back: `expired` overflows it one
/// step; any other reason (an agent rejected it) is an error for the dead queue.
pub fn returned(
    rules: &RuleSet,
    body: &[u8],
    reason: &str,
    now: OffsetDateTime,
) -> Result<Outcome, String> {
    let event: CloudEvent<Map<String, Value>> = serde_json::from_slice(body)
        .map_err(|error| format!("a returned message is not an assignment event: {error}"))?;
    if event.ty != event_type::CONVERSATION_ASSIGNED {
        return Err(format!(
            "a message came back from an agent queue ({reason}) with type `{}`",
            event.ty
        ));
    }
    let from = event
        .data
        .get("queue")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    if reason != "expired" {
        return Err(format!(
            "assignment {} was {reason} in queue `{from}` by an agent",
            event.id
        ));
    }
    overflow(rules, event, &from, now)
}

fn overflow(
    rules: &RuleSet,
    event: CloudEvent<Map<String, Value>>,
    from: &str,
    now: OffsetDateTime,
) -> Result<Outcome, String> {
    let mut data = event.data;
    let waited = (now - event.time).max(time::Duration::ZERO);
    let message_id = data
        .get("message")
        .and_then(|m| m.get("message_id"))
        .and_then(Value::as_str)
        .ok_or("the returned assignment has no message.message_id")?
        .to_owned();
    let conversation_id = str_field(&data, "conversation_id");
    let customer_id = str_field(&data, "customer_id");
    let key = data
        .get("message")
        .and_then(|m| m.get("sender"))
        .and_then(|s| serde_json::from_value::<switchboard_channel::Sender>(s.clone()).ok())
        .map(|sender| crate::bus::partition_key(&sender))
        .unwrap_or_else(|| customer_id.clone());
    let urgency = data.get("urgency").and_then(Value::as_u64).unwrap_or(0);

    let step_to = rules
        .queue(from)
        .and_then(|q| q.overflow.clone().map(|to| (to, q.overflow_urgency, q.sla)));
    let Some((to, bump, sla)) = step_to else {
        // The rules changed under it: the queue lost its overflow (or is gone). Keep the
        // conversation where it was, without an SLA, rather than dropping it.
        tracing::warn!(queue = %from, %message_id, "An assignment's SLA passed but its queue no longer overflows; re-queued without an SLA.");
        let queue = if rules.queue(from).is_some() {
            from.to_owned()
        } else {
            rules.default_queue().name.clone()
        };
        data.insert("queue".into(), Value::String(queue.clone()));
        let priority = priority_of(u8::try_from(urgency.min(100)).unwrap_or(100));
        let body = assignment_body(&event.id, event.subject, data, now);
        return Ok(Outcome::Assign(Assignment {
            queue,
            priority,
            event_id: event.id,
            body,
            expires_ms: None,
            key,
        }));
    };

    let new_urgency = u8::try_from((urgency + u64::from(bump)).min(100)).unwrap_or(100);
    let priority = priority_of(new_urgency);
    let explanation = data
        .entry("explanation")
        .or_insert_with(|| Value::Object(Map::new()));
    let Value::Object(explanation) = explanation else {
        return Err("the returned assignment's explanation is not an object".into());
    };
    let escalations = explanation
        .entry("escalations")
        .or_insert_with(|| Value::Array(Vec::new()));
    let Value::Array(escalations) = escalations else {
        return Err("the returned assignment's explanation.escalations is not a list".into());
    };
    let step = escalations.len() + 1;
    let at = now.format(&Rfc3339).unwrap_or_default();
    let sla_seconds = sla.map_or(0, |s| s.as_secs());
    escalations.push(json!({
        "step": step,
        "from": from,
        "to": to,
        "sla_seconds": sla_seconds,
        "waited_seconds": waited.whole_seconds(),
        "urgency": format!("+{bump}"),
        "at": at,
    }));
    if let Some(Value::Object(terms)) = explanation.get_mut("urgency") {
        terms.insert(format!("sla:{step}:{from}"), json!(bump));
        terms.insert("total".into(), json!(new_urgency));
    }
    explanation.insert(
        "queue_reason".into(),
        Value::String(format!(
            "overflow from {from}: not picked up within its SLA of {}",
            humantime::format_duration(sla.unwrap_or_default())
        )),
    );
    data.insert("queue".into(), Value::String(to.clone()));
    data.insert("urgency".into(), json!(new_urgency));
    data.insert("priority".into(), json!(priority));

    let base = format!("assign-{message_id}");
    let event_id = format!("{base}-sla{step}");
    let body = assignment_body(&event_id, event.subject.clone(), data, now);
    let escalated = CloudEvent {
        subject: event.subject.clone(),
        time: now,
        ..CloudEvent::new(
            format!("escalated-{message_id}-{step}"),
            "/router",
            event_type::CONVERSATION_ESCALATED,
            json!({
                "conversation_id": conversation_id,
                "customer_id": customer_id,
                "message_id": message_id,
                "step": step,
                "from_queue": from,
                "to_queue": to,
                "sla_seconds": sla_seconds,
                "waited_seconds": waited.whole_seconds(),
                "urgency": new_urgency,
                "priority": priority,
                "assignment_id": event_id,
            }),
        )
    };
    let escalated_id = escalated.id.clone();
    // Serializing plain JSON values cannot fail.
    let escalated_body = serde_json::to_string(&escalated).expect("event serializes");
    metrics::counter!("switchboard_escalations_total", "from" => from.to_owned(), "to" => to.clone())
        .increment(1);
    tracing::info!(from = %from, to = %to, step, %conversation_id, "SLA passed; conversation escalated.");
    Ok(Outcome::Escalate {
        assignment: Assignment {
            expires_ms: expiry_ms(rules, &to),
            queue: to,
            priority,
            event_id,
            body,
            key,
        },
        event: Event {
            key: ESCALATED_KEY.to_owned(),
            event_id: escalated_id,
            ty: event_type::CONVERSATION_ESCALATED.to_owned(),
            body: escalated_body,
        },
    })
}

fn str_field(data: &Map<String, Value>, key: &str) -> String {
    data.get(key)
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned()
}

fn assignment_body(
    id: &str,
    subject: Option<String>,
    data: Map<String, Value>,
    now: OffsetDateTime,
) -> String {
    let mut event = CloudEvent::new(
        id,
        "/router",
        event_type::CONVERSATION_ASSIGNED,
        Value::Object(data),
    );
    event.subject = subject;
    event.time = now;
    // Serializing plain JSON values cannot fail.
    serde_json::to_string(&event).expect("assignment serializes")
}

#[cfg(test)]
mod tests {
    use super::*;

    const SET: &str = r#"
[[queue]]
name = "first"
default = true
sla = "90s"
overflow = "second"
overflow_urgency = 15

[[queue]]
name = "second"
sla = "2m"
overflow = "third"

[[queue]]
name = "third"
"#;

    fn rules(text: &str) -> RuleSet {
        RuleSet::from_sources(&[("q.toml".into(), text.into())]).unwrap_or_else(|d| panic!("{d}"))
    }

    fn load_errors(text: &str) -> String {
        RuleSet::from_sources(&[("q.toml".into(), text.into())])
            .err()
            .map(|d| d.to_string())
            .unwrap_or_default()
    }

    /// An assignment as the router publishes it, assigned `ago` before `now`.
    fn assignment(queue: &str, urgency: u64, ago: time::Duration, now: OffsetDateTime) -> Vec<u8> {
        let mut event = CloudEvent::new(
            "assign-m",
            "/router",
            event_type::CONVERSATION_ASSIGNED,
            json!({
                "conversation_id": "conv-1",
                "customer_id": "cust-1",
                "queue": queue,
                "urgency": urgency,
                "priority": urgency / 10,
                "message": {"message_id": "m"},
                "explanation": {"urgency": {"rule:x": urgency, "total": urgency}, "queue_reason": "default"},
            }),
        );
        event.time = now - ago;
        event.subject = Some("conv-1".into());
        serde_json::to_vec(&event).unwrap()
    }

    fn escalate(rules: &RuleSet, body: &[u8], now: OffsetDateTime) -> (Assignment, Event) {
        match returned(rules, body, "expired", now) {
            Ok(Outcome::Escalate { assignment, event }) => (assignment, event),
            other => panic!("expected an escalation, got {other:?}"),
        }
    }

    #[test]
    fn only_queues_with_an_overflow_put_an_sla_on_their_assignments() {
        let rules = rules(SET);
        assert_eq!(expiry_ms(&rules, "first"), Some(90_000));
        assert_eq!(expiry_ms(&rules, "second"), Some(120_000));
        assert_eq!(expiry_ms(&rules, "third"), None);
        assert_eq!(expiry_ms(&rules, "unknown"), None);
    }

    #[test]
    fn an_expired_assignment_moves_one_step_with_the_bump_the_event_and_the_explanation() {
        let rules = rules(SET);
        let now = OffsetDateTime::now_utc();
        let body = assignment("first", 42, time::Duration::seconds(95), now);
        let (assignment, event) = escalate(&rules, &body, now);
        assert_eq!(assignment.queue, "second");
        assert_eq!(assignment.priority, 5, "42 + 15 = 57");
        assert_eq!(assignment.expires_ms, Some(120_000), "second's own SLA");
        assert_eq!(assignment.event_id, "assign-m-sla1");
        let published: serde_json::Value = serde_json::from_str(&assignment.body).unwrap();
        assert_eq!(published["subject"], "conv-1");
        let data = &published["data"];
        assert_eq!(data["queue"], "second");
        assert_eq!(data["urgency"], 57);
        assert_eq!(data["priority"], 5);
        assert_eq!(data["explanation"]["urgency"]["sla:1:first"], 15);
        assert_eq!(data["explanation"]["urgency"]["total"], 57);
        let step = &data["explanation"]["escalations"][0];
        assert_eq!(step["from"], "first");
        assert_eq!(step["to"], "second");
        assert_eq!(step["sla_seconds"], 90);
        assert_eq!(step["waited_seconds"], 95);
        assert!(
            data["explanation"]["queue_reason"]
                .as_str()
                .unwrap()
                .starts_with("overflow from first"),
        );

        assert_eq!(event.key, "conversation.escalated");
        assert_eq!(event.event_id, "escalated-m-1");
        let event: serde_json::Value = serde_json::from_str(&event.body).unwrap();
        assert_eq!(event["type"], "switchboard.conversation.escalated");
        assert_eq!(event["data"]["from_queue"], "first");
        assert_eq!(event["data"]["to_queue"], "second");
        assert_eq!(event["data"]["step"], 1);
        assert_eq!(event["data"]["conversation_id"], "conv-1");

        // The next step builds on the first: same message, step 2, urgency clamped at 100.
        let mut next: serde_json::Value = serde_json::from_str(&assignment.body).unwrap();
        next["data"]["urgency"] = json!(95);
        next["time"] = json!(now.format(&Rfc3339).unwrap());
        let (assignment, event) = escalate(&rules, &serde_json::to_vec(&next).unwrap(), now);
        assert_eq!(assignment.queue, "third");
        assert_eq!(assignment.priority, 9);
        assert_eq!(
            assignment.expires_ms, None,
            "the end of the chain has no SLA to enforce"
        );
        assert_eq!(assignment.event_id, "assign-m-sla2");
        assert_eq!(event.event_id, "escalated-m-2");
        let data =
            serde_json::from_str::<serde_json::Value>(&assignment.body).unwrap()["data"].clone();
        assert_eq!(data["urgency"], 100);
        assert_eq!(
            data["explanation"]["escalations"].as_array().unwrap().len(),
            2
        );
    }

    #[test]
    fn the_same_returned_assignment_always_gives_the_same_step() {
        let rules = rules(SET);
        let now = OffsetDateTime::now_utc();
        let body = assignment("first", 10, time::Duration::seconds(91), now);
        let (a, e) = escalate(&rules, &body, now);
        let (b, f) = escalate(&rules, &body, now);
        assert_eq!((a.event_id, a.queue, a.body), (b.event_id, b.queue, b.body));
        assert_eq!(e.event_id, f.event_id);
    }

    #[test]
    fn a_rejected_or_foreign_message_is_an_error_for_the_dead_queue() {
        let rules = rules(SET);
        let now = OffsetDateTime::now_utc();
        let body = assignment("first", 10, time::Duration::ZERO, now);
        let error = returned(&rules, &body, "rejected", now).unwrap_err();
        assert!(error.contains("rejected in queue `first`"), "{error}");
        let error = returned(&rules, b"{not json", "expired", now).unwrap_err();
        assert!(error.contains("not an assignment event"), "{error}");
        let received = serde_json::to_vec(&CloudEvent::new(
            "x",
            "/webhooks/chat",
            event_type::MESSAGE_RECEIVED,
            json!({}),
        ))
        .unwrap();
        let error = returned(&rules, &received, "expired", now).unwrap_err();
        assert!(error.contains("switchboard.message.received"), "{error}");
    }

    #[test]
    fn a_queue_that_lost_its_overflow_keeps_the_conversation_without_an_sla() {
        let rules =
            rules("[[queue]]\nname = \"first\"\ndefault = true\n\n[[queue]]\nname = \"other\"\n");
        let now = OffsetDateTime::now_utc();
        let body = assignment("first", 30, time::Duration::seconds(100), now);
        let Ok(Outcome::Assign(assignment)) = returned(&rules, &body, "expired", now) else {
            panic!("expected a plain re-assignment");
        };
        assert_eq!(
            (assignment.queue.as_str(), assignment.expires_ms),
            ("first", None)
        );
        assert_eq!(assignment.priority, 3);
        // A queue removed altogether: the default queue takes it.
        let body = assignment_in_gone_queue(now);
        let Ok(Outcome::Assign(assignment)) = returned(&rules, &body, "expired", now) else {
            panic!("expected a plain re-assignment");
        };
        assert_eq!(assignment.queue, "first");
    }

    fn assignment_in_gone_queue(now: OffsetDateTime) -> Vec<u8> {
        assignment("gone", 0, time::Duration::seconds(5), now)
    }

    #[test]
    fn overflow_problems_are_load_errors() {
        let errors = load_errors(
            "[[queue]]\nname = \"a\"\ndefault = true\noverflow = \"b\"\n\n[[queue]]\nname = \"b\"\nsla = \"1m\"\noverflow = \"a\"\n",
        );
        assert!(
            errors.contains("queue `a`: overflow needs an `sla`"),
            "{errors}"
        );
        assert!(
            errors.contains("overflow chain loops: a → b → a"),
            "{errors}"
        );
        assert_eq!(
            errors.matches("overflow chain loops").count(),
            1,
            "{errors}"
        );
        let errors = load_errors(
            "[[queue]]\nname = \"a\"\ndefault = true\nsla = \"1m\"\noverflow = \"a\"\n",
        );
        assert!(errors.contains("queue `a` overflows to itself"), "{errors}");
        let errors = load_errors(
            "[[queue]]\nname = \"a\"\ndefault = true\nsla = \"1m\"\noverflow = \"nowhere\"\n",
        );
        assert!(
            errors.contains("overflow names queue `nowhere`, which no [[queue]] defines"),
            "{errors}"
        );
        assert!(
            errors.contains("q.toml:5:"),
            "errors carry file:line: {errors}"
        );
    }
}
