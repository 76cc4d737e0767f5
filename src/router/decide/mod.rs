//! The pure routing decision: message + customer + conversation + rules → queue, urgency and the
//! explanation. No I/O here, so it is tested exhaustively and explained for free.

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::{Map, Value, json};
use switchboard_channel::NormalizedMessage;

use super::rules::{Queue, RuleSet};

/// What the router knows of the customer when deciding.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CustomerView {
    pub id: String,
    pub attributes: Map<String, Value>,
    pub identities: Vec<Identity>,
    pub contacts_last_24h: u32,
    pub open_conversations: u32,
    pub previous_agent: Option<String>,
    pub channels_used: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Identity {
    pub kind: String,
    pub address: String,
}

/// What the router knows of the conversation when deciding.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ConversationView {
    pub id: String,
    /// True when this message opens the conversation.
    pub new: bool,
    /// Seconds since the conversation opened.
    pub age: i64,
    /// Messages before this one.
    pub message_count: u32,
}

/// Signals computed from the message text.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Signals {
    /// Detected language (ISO 639-1), empty when unknown.
    pub language: String,
    pub language_confidence: f64,
    /// −1 (angry) … 1 (happy); 0 when unknown.
    pub sentiment: f64,
    pub urgent_keywords: Vec<String>,
    /// Share of letters that are upper case, 0–1.
    pub caps_ratio: f64,
    pub exclamations: u32,
    pub attachments: u32,
    /// Earlier contacts by this customer in the last 24 hours.
    pub repeat_contacts: u32,
    /// Letters in the text (for `caps_ratio`'s weight).
    #[serde(skip)]
    pub letters: u32,
}

impl Signals {
    /// The signals that need no model: shape of the text and attachments.
    pub fn from_message(message: &NormalizedMessage) -> Self {
        let (letters, upper) = message
            .text
            .chars()
            .filter(|c| c.is_alphabetic())
            .fold((0u32, 0u32), |(l, u), c| {
                (l + 1, u + u32::from(c.is_uppercase()))
            });
        Signals {
            caps_ratio: if letters == 0 {
                0.0
            } else {
                f64::from(upper) / f64::from(letters)
            },
            exclamations: message
                .text
                .matches('!')
                .count()
                .try_into()
                .unwrap_or(u32::MAX),
            attachments: message.attachments.len().try_into().unwrap_or(u32::MAX),
            letters,
            ..Signals::default()
        }
    }
}

/// Everything the decision reads.
pub struct Input<'a> {
    /// The time of the decision (business hours).
    pub now: time::OffsetDateTime,
    pub message: &'a NormalizedMessage,
    pub customer: &'a CustomerView,
    pub conversation: &'a ConversationView,
    pub signals: &'a Signals,
}

/// The routing decision with its explanation.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Decision {
    pub queue: String,
    pub urgency: u8,
    pub priority: u8,
    pub skills: Vec<String>,
    pub tags: Vec<String>,
    pub language: Option<String>,
    /// The queue chosen was closed, and the conversation waits in it or went to its
    /// `after_hours` queue.
    pub outside_hours: bool,
    pub explanation: Explanation,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Explanation {
    /// Rules that matched, in evaluation order.
    pub rules: Vec<RuleEffect>,
    /// Ids of rules evaluated that did not match.
    pub not_matched: RuleList,
    /// Rules whose `when` failed to evaluate (counted as not matched).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<RuleError>,
    /// Every urgency term (`rule:<id>`), and `total` after clamping to 0–100.
    pub urgency: BTreeMap<std::sync::Arc<str>, i64>,
    /// Per queue: `eligible` or why it was rejected.
    pub skill_match: BTreeMap<std::sync::Arc<str>, std::sync::Arc<str>>,
    /// Why the chosen queue was chosen.
    pub queue_reason: String,
    /// Set when the chosen queue was closed: what happened instead.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub business_hours: Option<String>,
}

/// Some rules of a set, by index: serializes as their ids. Cheaper than a list of ids for the
/// long lists (every rule that did not match) every decision carries.
#[derive(Debug, Clone, Default)]
pub struct RuleList {
    ids: std::sync::Arc<[std::sync::Arc<str>]>,
    indices: Vec<u32>,
}

impl RuleList {
    /// An empty list over a rule set's ids.
    pub fn new(ids: std::sync::Arc<[std::sync::Arc<str>]>) -> Self {
        let capacity = ids.len();
        Self {
            ids,
            indices: Vec::with_capacity(capacity),
        }
    }

    fn push(&mut self, index: usize) {
        if let Ok(index) = u32::try_from(index) {
            self.indices.push(index);
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = &str> {
        self.indices
            .iter()
            .filter_map(|&i| self.ids.get(i as usize).map(|id| &**id))
    }

    pub fn contains(&self, id: &str) -> bool {
        self.iter().any(|i| i == id)
    }

    pub fn len(&self) -> usize {
        self.indices.len()
    }

    pub fn is_empty(&self) -> bool {
        self.indices.is_empty()
    }
}

impl PartialEq for RuleList {
    fn eq(&self, other: &Self) -> bool {
        self.iter().eq(other.iter())
    }
}

impl Serialize for RuleList {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(self.iter())
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RuleEffect {
    pub id: std::sync::Arc<str>,
    pub file: std::sync::Arc<str>,
    pub line: usize,
    pub effect: std::sync::Arc<str>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RuleError {
    pub id: String,
    pub file: String,
    pub line: usize,
    pub error: String,
}

/// Urgency → AMQP priority: `urgency / 10`, at most 9.
pub fn priority_of(urgency: u8) -> u8 {
    (urgency / 10).min(9)
}

/// Decides where a message goes. `load` gives a queue's current load (waiting assignments),
/// used to break ties between equally good queues.
pub fn decide(rules: &RuleSet, input: &Input<'_>, load: &dyn Fn(&str) -> u64) -> Decision {
    let mut explanation = Explanation {
        not_matched: RuleList::new(rules.rule_ids.clone()),
        ..Explanation::default()
    };
    let mut urgency_sum: i64 = 0;
    let mut required: Vec<String> = Vec::new();
    let mut preferred: Vec<String> = Vec::new();
    let mut tags: Vec<String> = Vec::new();
    let mut route_to: Option<(String, String)> = None;

    // Rules within the fast path's subset evaluate on the JSON view; the CEL values are only
    // built when a rule needs the interpreter (or the fast path is unsure).
    let roots = std::cell::OnceCell::new();
    let slots = rules.paths.context(input, &roots, || json_variables(input));
    let root = cel::Context::with_env(rules.env.clone());
    let mut scope: Option<cel::Context<'_, '_>> = None;

    for (index, rule) in rules.rules.iter().enumerate() {
        let fast = rule.fast.as_ref().and_then(|node| node.eval_bool(&slots));
        let matched = match (&rule.when, fast) {
            (None, _) => Ok(true),
            (Some(_), Some(matched)) => Ok(matched),
            (Some(program), None) => {
                let scope = scope.get_or_insert_with(|| {
                    let mut scope = root.new_inner_scope();
                    let roots = roots.get_or_init(|| json_variables(input));
                    for (name, value) in super::fast::ROOTS.iter().zip(roots) {
                        scope.add_variable_from_value(*name, to_cel(value));
                    }
                    scope
                });
                match program.execute(scope) {
                    Ok(cel::Value::Bool(matched)) => Ok(matched),
                    Ok(other) => Err(format!("`when` must give true or false, gave {other:?}")),
                    Err(error) => Err(error.to_string()),
                }
            }
        };
        match matched {
            Ok(true) => {}
            Ok(false) => {
                explanation.not_matched.push(index);
                continue;
            }
            Err(error) => {
                explanation.errors.push(RuleError {
                    id: rule.id.clone(),
                    file: rule.file.clone(),
                    line: rule.line,
                    error,
                });
                explanation.not_matched.push(index);
                continue;
            }
        }
        if rule.urgency != 0 {
            urgency_sum = urgency_sum.saturating_add(rule.urgency);
            explanation
                .urgency
                .insert(rule.urgency_term.clone(), rule.urgency);
        }
        for skill in &rule.require_skills {
            if !required.contains(skill) {
                required.push(skill.clone());
            }
        }
        for skill in &rule.prefer_skills {
            if !preferred.contains(skill) {
                preferred.push(skill.clone());
            }
        }
        let mut effect = &rule.effect;
        if let Some(target) = &rule.route_to {
            if route_to.is_none() {
                route_to = Some((target.clone(), rule.id.clone()));
            } else {
                effect = &rule.effect_route_ignored;
            }
        }
        for tag in &rule.tags {
            if !tags.contains(tag) {
                tags.push(tag.clone());
            }
        }
        explanation.rules.push(RuleEffect {
            id: rule.shared_id.clone(),
            file: rule.shared_file.clone(),
            line: rule.line,
            effect: effect.clone(),
        });
        if rule.stop {
            break;
        }
    }

    for (name, points) in rules.model.urgency_terms(input.signals) {
        urgency_sum = urgency_sum.saturating_add(points);
        explanation.urgency.insert(name.into(), points);
    }
    let urgency = u8::try_from(urgency_sum.clamp(0, 100)).unwrap_or(100);
    explanation
        .urgency
        .insert("total".into(), i64::from(urgency));
    let language = Some(input.signals.language.clone()).filter(|l| !l.is_empty());

    let queue = match route_to {
        Some((target, rule_id)) => {
            explanation.queue_reason = format!("hard route by rule `{rule_id}`");
            target
        }
        None => choose_queue(
            rules,
            &required,
            &preferred,
            language.as_deref(),
            load,
            &mut explanation,
        ),
    };

    let (queue, outside_hours) = apply_hours(rules, queue, input.now, &mut explanation);
    Decision {
        queue,
        outside_hours,
        urgency,
        priority: priority_of(urgency),
        skills: required,
        tags,
        language,
        explanation,
    }
}

/// Among queues serving the language (checked first) and covering the required skills: the
/// highest proficiency in the required skills, then in the preferred ones, then the fewest
/// other skills, then the lighter load, then file order. Nothing eligible → the default.
fn choose_queue<'a>(
    rules: &RuleSet,
    required: &'a [String],
    preferred: &[String],
    language: Option<&'a str>,
    load: &dyn Fn(&str) -> u64,
    explanation: &mut Explanation,
) -> String {
    struct Candidate<'a> {
        queue: &'a Queue,
        required: u32,
        preferred: u32,
        extra: usize,
        load: u64,
    }
    let level =
        |queue: &Queue, skill: &str| u32::from(queue.proficiency.get(skill).copied().unwrap_or(0));
    let mut eligible: Vec<Candidate<'_>> = Vec::new();
    // Verdicts repeat from queue to queue: each text is built once per decision.
    // (kind, language or skill, required proficiency, preferred proficiency)
    type VerdictKey<'k> = (u8, &'k str, u32, u32);
    let mut texts: Vec<(VerdictKey<'a>, std::sync::Arc<str>)> = Vec::new();
    let mut verdict = |key: VerdictKey<'a>| -> std::sync::Arc<str> {
        if let Some((_, text)) = texts.iter().find(|(k, _)| *k == key) {
            return text.clone();
        }
        let text: std::sync::Arc<str> = match key {
            (0, language, ..) => format!("rejected: does not serve language {language}"),
            (1, skill, ..) => format!("rejected: lacks skill {skill}"),
            (2, ..) => "eligible".to_owned(),
            (_, _, required, preferred) => {
                format!("eligible (proficiency {required} required, {preferred} preferred)")
            }
        }
        .into();
        texts.push((key, text.clone()));
        text
    };
    for queue in &rules.queues {
        let verdict = if let Some(language) = language
            && !serves_language(queue, language)
        {
            verdict((0, language, 0, 0))
        } else if let Some(missing) = required.iter().find(|s| !queue.skills.contains(s)) {
            verdict((1, missing, 0, 0))
        } else {
            let candidate = Candidate {
                queue,
                required: required.iter().map(|s| level(queue, s)).sum(),
                preferred: preferred.iter().map(|s| level(queue, s)).sum(),
                extra: queue
                    .skills
                    .iter()
                    .filter(|s| !required.contains(s) && !preferred.contains(s))
                    .count(),
                load: load(&queue.name),
            };
            let text = if required.is_empty() && preferred.is_empty() {
                verdict((2, "", 0, 0))
            } else {
                verdict((3, "", candidate.required, candidate.preferred))
            };
            eligible.push(candidate);
            text
        };
        explanation
            .skill_match
            .insert(queue.shared_name.clone(), verdict);
    }

    let default = rules.default_queue();
    let rank = |c: &Candidate<'_>| {
        (
            std::cmp::Reverse(c.required),
            std::cmp::Reverse(c.preferred),
            c.extra,
            c.load,
        )
    };
    let best = eligible.iter().min_by_key(|c| rank(c));
    let default_eligible = eligible.iter().any(|c| c.queue.default);
    if required.is_empty() && default_eligible && best.is_none_or(|b| b.preferred == 0) {
        explanation.queue_reason = "no skill required: the default queue".to_owned();
        return default.name.clone();
    }
    match best {
        Some(best) => {
            let wanted: Vec<&str> = required
                .iter()
                .chain(preferred)
                .map(String::as_str)
                .collect();
            let ties: Vec<&Candidate<'_>> = eligible
                .iter()
                .filter(|c| {
                    (c.required, c.preferred, c.extra)
                        == (best.required, best.preferred, best.extra)
                })
                .collect();
            explanation.queue_reason = if wanted.is_empty() {
                format!(
                    "no skill required; `{}` serves the language",
                    best.queue.name
                )
            } else if ties.len() > 1 {
                let tie_break = if ties.iter().all(|c| c.load == ties[0].load) {
                    "first in file order"
                } else {
                    "lightest load"
                };
                format!(
                    "best skill match for {}; {tie_break} of {} equal queues",
                    wanted.join(", "),
                    ties.len()
                )
            } else {
                format!("best skill match for {}", wanted.join(", "))
            };
            best.queue.name.clone()
        }
        None => {
            explanation.queue_reason = format!(
                "no queue is eligible (skills: {}; language: {}): the default queue",
                if required.is_empty() {
                    "none".to_owned()
                } else {
                    required.join(", ")
                },
                language.unwrap_or("unknown")
            );
            default.name.clone()
        }
    }
}

/// A closed queue hands over to its `after_hours` queue (one step), or keeps the conversation
/// waiting. Returns the queue and whether it was outside hours.
fn apply_hours(
    rules: &RuleSet,
    chosen: String,
    now: time::OffsetDateTime,
    explanation: &mut Explanation,
) -> (String, bool) {
    let Some(queue) = rules.queue(&chosen) else {
        return (chosen, false);
    };
    match &queue.hours {
        Some(hours) if !hours.is_open(now) => match &queue.after_hours {
            Some(next) => {
                explanation.business_hours =
                    Some(format!("`{chosen}` is closed: after-hours queue `{next}`"));
                (next.clone(), true)
            }
            None => {
                explanation.business_hours = Some(format!(
                    "`{chosen}` is closed: the conversation waits for it to open"
                ));
                (chosen, true)
            }
        },
        _ => (chosen, false),
    }
}

fn serves_language(queue: &Queue, language: &str) -> bool {
    queue.languages.iter().any(|l| l == "*" || l == language)
}

/// The variables rules see, as JSON: `message`, `customer`, `conversation`, `signals` (the
/// order of [`super::fast::ROOTS`]).
pub(crate) fn json_variables(input: &Input<'_>) -> [Value; 4] {
    let m = input.message;
    let message = json!({
        "channel": m.channel.kind,
        "channel_id": m.channel.id,
        "kind": m.sender.kind,
        "sender": m.sender.address,
        "sender_name": m.sender.name.clone().unwrap_or_default(),
        "text": m.text,
        "subject": m.subject.clone().unwrap_or_default(),
        "attachments": m.attachments,
        "auto_submitted": m.auto_submitted,
        "metadata": m.metadata,
    });
    [
        message,
        serde_json::to_value(input.customer).unwrap_or_default(),
        serde_json::to_value(input.conversation).unwrap_or_default(),
        serde_json::to_value(input.signals).unwrap_or_default(),
    ]
}

/// JSON → CEL value. Numbers that are whole become `int` so `urgency > 3` works on either.
pub(crate) fn to_cel(value: &Value) -> cel::Value {
    match value {
        Value::Null => cel::Value::Null,
        Value::Bool(b) => cel::Value::Bool(*b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => cel::Value::Int(i),
            None => cel::Value::Float(n.as_f64().unwrap_or_default()),
        },
        Value::String(s) => cel::Value::String(s.clone().into()),
        Value::Array(items) => {
            cel::Value::List(items.iter().map(to_cel).collect::<Vec<_>>().into())
        }
        Value::Object(map) => {
            let map: std::collections::HashMap<cel::objects::Key, cel::Value> = map
                .iter()
                .map(|(k, v)| (cel::objects::Key::String(k.clone().into()), to_cel(v)))
                .collect();
            cel::Value::Map(map.into())
        }
    }
}

#[cfg(test)]
mod tests;
