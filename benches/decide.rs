//! The pure decision core: decisions per second on one core with 200 rules and 20 queues
//! (signals included), and the time to load and validate 1,000 rules.
//!
//! `cargo bench --bench decide` (`BENCH_RUNS`, default 3; `BENCH_TEXT_BYTES`: each message's
//! text repeated to at least this many bytes, as in a long email; default 0, the short texts).

use std::time::Instant;

use switchboard::router::decide::{ConversationView, CustomerView, Input, decide};
use switchboard::router::rules::RuleSet;
use switchboard_channel::{ChannelRef, NormalizedMessage, Sender};

const LANGUAGES: [&str; 4] = ["en", "de", "es", "fr"];
const TOPICS: [&str; 5] = ["billing", "technical", "sales", "legal", "account"];

/// 20 queues (5 topics × 4 languages), `rules` rules in the styles real rule sets use, and the
/// signal weights and lexicon on.
fn rule_set(rules: usize) -> Vec<(String, String)> {
    let mut queues =
        String::from("[[queue]]\nname = \"general\"\ndefault = true\nlanguages = [\"*\"]\n\n");
    for (t, topic) in TOPICS.iter().enumerate() {
        for language in LANGUAGES {
            if t == 0 && language == "en" {
                continue; // 19 + general = 20 queues
            }
            queues.push_str(&format!(
                "[[queue]]\nname = \"{topic}-{language}\"\nskills = [\"{topic}\"]\nlanguages = [\"{language}\"]\n\n"
            ));
        }
    }
    queues.push_str(
        "[[queue]]\nname = \"billing-any\"\nskills = [\"billing\"]\nlanguages = [\"*\"]\n\n",
    );
    queues.push_str("[keywords]\nen = [\"urgent\", \"asap\", \"immediately\"]\nde = [\"dringend\", \"sofort\"]\nes = [\"urgente\"]\nfr = [\"urgent\"]\n\n[signals]\nnegative_sentiment = 20\nurgent_keyword = 10\nshouting = 10\nexclamations = 5\nrepeat_contact = 5\n");
    let mut text = String::new();
    for i in 0..rules {
        let topic = TOPICS[i % TOPICS.len()];
        let when = match i % 4 {
            0 => format!("message.text.matches(\"(?i)\\\\b(word{i}|term{i}|{topic}{i})\\\\b\")"),
            1 => format!("message.text.contains(\"phrase {i}\")"),
            2 => {
                format!("has(customer.attributes.tier) && customer.attributes.tier == \"tier{i}\"")
            }
            _ => format!(
                "signals.sentiment < -0.{} && message.channel == \"webchat\"",
                1 + i % 8
            ),
        };
        text.push_str(&format!(
            "[[rule]]\nid = \"r{i}\"\nwhen = '{when}'\nurgency = {}\nrequire_skills = [\"{topic}\"]\n\n",
            i % 7
        ));
    }
    vec![
        ("10-queues.toml".into(), queues),
        ("20-rules.toml".into(), text),
    ]
}

/// `BENCH_TEXT_BYTES`: 0 (the short texts as they are) unless set.
fn text_bytes() -> usize {
    std::env::var("BENCH_TEXT_BYTES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn message(i: usize) -> NormalizedMessage {
    let texts = [
        "I was charged twice for my subscription, please refund me asap",
        "Hallo, meine Rechnung ist falsch, bitte dringend korrigieren",
        "Hola, la aplicación no funciona desde ayer, es urgente",
        "Bonjour, je voudrais acheter la version entreprise pour mon équipe",
        "WHERE IS MY ORDER?? this is the worst service ever!!",
    ];
    let base = texts[i % texts.len()];
    let bytes = text_bytes();
    let mut text = base.to_owned();
    while text.len() < bytes {
        text.push(' ');
        text.push_str(base);
    }
    NormalizedMessage {
        message_id: NormalizedMessage::stable_id("c", &i.to_string()),
        channel: ChannelRef {
            id: "c".into(),
            kind: "webchat".into(),
        },
        external_id: i.to_string(),
        thread_key: None,
        sender: Sender {
            kind: "webchat".into(),
            address: format!("v{i}"),
            name: None,
        },
        subject: None,
        text,
        attachments: vec![],
        received_at: time::OffsetDateTime::UNIX_EPOCH,
        auto_submitted: false,
        metadata: Default::default(),
    }
}

/// One decision with the signals already computed.
fn decide_one(
    rules: &RuleSet,
    message: &NormalizedMessage,
    customer: &CustomerView,
    conversation: &ConversationView,
    signals: &switchboard::router::decide::Signals,
) -> switchboard::router::decide::Decision {
    let input = Input {
        now: time::OffsetDateTime::UNIX_EPOCH,
        message,
        customer,
        conversation,
        signals,
    };
    decide(rules, &input, &|_| 0)
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn main() {
    let runs: usize = std::env::var("BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let rules = RuleSet::from_sources(&rule_set(200)).unwrap_or_else(|d| panic!("{d}"));
    // Long texts: fewer distinct messages and iterations, so a run stays in seconds.
    let n = (20_000 * 1024 / text_bytes().max(1024)).max(200);
    let messages: Vec<NormalizedMessage> = (0..n.min(1000)).map(message).collect();
    let customer = CustomerView {
        contacts_last_24h: 2,
        ..CustomerView::default()
    };
    let conversation = ConversationView::default();
    let mut rates = Vec::new();
    for run in 1..=runs {
        let started = Instant::now();
        for i in 0..n {
            let message = &messages[i % messages.len()];
            let signals = rules.model.compute(message, customer.contacts_last_24h);
            std::hint::black_box(decide_one(
                &rules,
                message,
                &customer,
                &conversation,
                &signals,
            ));
        }
        let rate = n as f64 / started.elapsed().as_secs_f64();
        println!("run {run}: {rate:.0} decisions/s (200 rules, 20 queues, signals on, one thread)");
        rates.push(rate);
    }
    println!("median: {:.0} decisions/s", median(rates));

    // Where the time goes: the signals alone, and the rules + queue choice alone.
    let started = Instant::now();
    for i in 0..n {
        let message = &messages[i % messages.len()];
        std::hint::black_box(rules.model.compute(message, customer.contacts_last_24h));
    }
    let signals_rate = n as f64 / started.elapsed().as_secs_f64();
    let signals: Vec<_> = messages
        .iter()
        .map(|m| rules.model.compute(m, customer.contacts_last_24h))
        .collect();
    let started = Instant::now();
    for i in 0..n {
        let (message, signals) = (&messages[i % messages.len()], &signals[i % messages.len()]);
        std::hint::black_box(decide_one(
            &rules,
            message,
            &customer,
            &conversation,
            signals,
        ));
    }
    let decide_rate = n as f64 / started.elapsed().as_secs_f64();
    println!(
        "breakdown: signals alone {signals_rate:.0}/s ({:.1} µs each), rules + queue choice alone {decide_rate:.0}/s ({:.1} µs each)",
        1e6 / signals_rate,
        1e6 / decide_rate
    );

    let sources = rule_set(1000);
    let mut loads = Vec::new();
    for run in 1..=runs {
        let started = Instant::now();
        let set = RuleSet::from_sources(&sources).unwrap_or_else(|d| panic!("{d}"));
        let ms = started.elapsed().as_secs_f64() * 1000.0;
        println!(
            "run {run}: loaded and validated {} rules in {ms:.1} ms",
            set.rules.len()
        );
        loads.push(ms);
    }
    println!("median: {:.1} ms to load 1,000 rules", median(loads));
}
