//! Signals computed from a message before the rules run: detected language (restricted to the
//! languages the queues declare), English sentiment, urgency keywords per language (the
//! `[keywords]` lexicon in the rule files), shape (caps, exclamation marks), attachments, and
//! repeat contacts. `[signals]` weights turn them into urgency points.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use aho_corasick::AhoCorasick;
use serde::{Deserialize, Serialize};
use switchboard_channel::NormalizedMessage;
use vader_sentimental::SentimentIntensityAnalyzer;
use whatlang::{Detector, Lang};

use super::decide::Signals;

/// Below this confidence the language counts as unknown (no language filter on queues).
const MIN_LANGUAGE_CONFIDENCE: f64 = 0.3;

/// Sentiment scores within ±this are neutral (VADER's recommended threshold).
pub const NEUTRAL_SENTIMENT: f64 = 0.05;

/// Language detection and sentiment read a long text's ends, not all of it: the language its
/// first this many bytes, the sentiment its first and its last this many (where a request and
/// its mood usually are). VADER's time grows with the square of the text (measured: 1.4 ms at
/// 4 KiB, 157 ms at 64 KiB), so a body at the default 256 KiB limit held the router for
/// seconds. Keywords and the shape signals still read the whole text.
const READ_WINDOW: usize = 512;

/// `[signals]`: urgency points for each signal. Every weight defaults to 0 (no effect).
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Weights {
    /// Points at sentiment −1, scaled linearly: sentiment −0.5 gives half. Positive sentiment
    /// adds nothing.
    #[serde(default)]
    pub negative_sentiment: i64,
    /// Points per urgent keyword found (each keyword counts once).
    #[serde(default)]
    pub urgent_keyword: i64,
    /// At most this many keywords count.
    #[serde(default = "default_max_keywords")]
    pub max_keywords: u32,
    /// Points when more than half of the letters are capitals (and there are at least 8).
    #[serde(default)]
    pub shouting: i64,
    /// Points when the message has two or more exclamation marks.
    #[serde(default)]
    pub exclamations: i64,
    /// Points per earlier contact in the last 24 hours (at most 3 count).
    #[serde(default)]
    pub repeat_contact: i64,
    /// Points per attachment (at most 3 count): screenshots and invoices come with problems.
    #[serde(default)]
    pub attachment: i64,
}

fn default_max_keywords() -> u32 {
    3
}

/// The language model of a rule set: which languages to tell apart, and the keyword lexicon.
#[derive(Debug, Clone)]
pub struct SignalModel {
    detector: Option<Detector>,
    /// ISO 639-1 → lowercase keywords, and an automaton that finds all of them in one pass
    /// over the text (pattern `i` is keyword `i`).
    keywords: BTreeMap<String, (Vec<String>, AhoCorasick)>,
    pub weights: Weights,
}

impl SignalModel {
    /// `languages`: ISO 639-1 codes the queues declare (`*` is ignored). Unknown codes are
    /// returned as errors.
    pub fn new(
        languages: &[String],
        keywords: BTreeMap<String, Vec<String>>,
        weights: Weights,
    ) -> Result<Self, String> {
        let mut allow = Vec::new();
        for code in languages.iter().filter(|l| l.as_str() != "*") {
            let lang = lang_from_iso1(code)
                .ok_or_else(|| format!("language `{code}` is not one Switchboard can detect (use ISO 639-1 codes such as en, de, es, fr)"))?;
            if !allow.contains(&lang) {
                allow.push(lang);
            }
        }
        for code in keywords.keys() {
            if lang_from_iso1(code).is_none() {
                return Err(format!(
                    "[keywords] language `{code}` is not an ISO 639-1 code Switchboard knows"
                ));
            }
        }
        let keywords = keywords
            .into_iter()
            .map(|(lang, words)| {
                let words: Vec<String> = words.into_iter().map(|w| w.to_lowercase()).collect();
                let matcher = AhoCorasick::new(&words).map_err(|error| {
                    format!("[keywords] {lang}: the lexicon cannot be compiled: {error}")
                })?;
                Ok((lang, (words, matcher)))
            })
            .collect::<Result<_, String>>()?;
        Ok(Self {
            // One language cannot be told apart from anything: detect only between two or more.
            detector: (allow.len() >= 2).then(|| Detector::with_allowlist(allow)),
            keywords,
            weights,
        })
    }

    /// Every signal for `message`; `contacts_last_24h` counts this message.
    pub fn compute(&self, message: &NormalizedMessage, contacts_last_24h: u32) -> Signals {
        let mut signals = Signals::from_message(message);
        signals.repeat_contacts = contacts_last_24h.saturating_sub(1);
        let text: std::borrow::Cow<'_, str> = match &message.subject {
            Some(subject) if !subject.is_empty() => format!("{subject}\n{}", message.text).into(),
            _ => message.text.as_str().into(),
        };
        if let Some(info) = self
            .detector
            .as_ref()
            .and_then(|d| d.detect(head(&text, READ_WINDOW)))
            && info.confidence() >= MIN_LANGUAGE_CONFIDENCE
            && let Some(code) = iso1(info.lang())
        {
            signals.language = code.to_owned();
            signals.language_confidence = info.confidence();
        }
        if signals.language.is_empty() || signals.language == "en" {
            let read: std::borrow::Cow<'_, str> = if text.len() <= 2 * READ_WINDOW {
                text.as_ref().into()
            } else {
                format!("{}\n{}", head(&text, READ_WINDOW), tail(&text, READ_WINDOW)).into()
            };
            signals.sentiment = analyzer().polarity_scores(&read).compound;
        }
        let lowered = text.to_lowercase();
        let lexicons: Vec<&(Vec<String>, AhoCorasick)> = if signals.language.is_empty() {
            self.keywords.values().collect()
        } else {
            self.keywords.get(&signals.language).into_iter().collect()
        };
        for (words, matcher) in lexicons {
            // Every occurrence of every keyword, overlapping ones too, in one pass; a keyword
            // counts when one of its occurrences is a whole word or phrase.
            let mut found = vec![false; words.len()];
            for hit in matcher.find_overlapping_iter(&lowered) {
                if is_whole_word(&lowered, hit.start(), hit.end()) {
                    found[hit.pattern().as_usize()] = true;
                }
            }
            for (keyword, found) in words.iter().zip(found) {
                if found && !signals.urgent_keywords.contains(keyword) {
                    signals.urgent_keywords.push(keyword.clone());
                }
            }
        }
        signals
    }

    /// The urgency terms the signals earn, by name (`signal:<name>`), zero terms left out.
    pub fn urgency_terms(&self, signals: &Signals) -> Vec<(&'static str, i64)> {
        let w = &self.weights;
        let keywords =
            i64::try_from(signals.urgent_keywords.len().min(w.max_keywords as usize)).unwrap_or(0);
        // VADER's own convention: a compound score above −0.05 is neutral. Plain questions
        // score slightly below zero and must not earn points.
        let negativity = if signals.sentiment <= -NEUTRAL_SENTIMENT {
            (-signals.sentiment).clamp(0.0, 1.0)
        } else {
            0.0
        };
        let terms = [
            (
                "signal:negative_sentiment",
                (w.negative_sentiment as f64 * negativity).round() as i64,
            ),
            (
                "signal:urgent_keywords",
                w.urgent_keyword.saturating_mul(keywords),
            ),
            (
                "signal:shouting",
                if signals.shouting() { w.shouting } else { 0 },
            ),
            (
                "signal:exclamations",
                if signals.exclamations >= 2 {
                    w.exclamations
                } else {
                    0
                },
            ),
            (
                "signal:repeat_contacts",
                w.repeat_contact
                    .saturating_mul(i64::from(signals.repeat_contacts.min(3))),
            ),
            (
                "signal:attachments",
                w.attachment
                    .saturating_mul(i64::from(signals.attachments.min(3))),
            ),
        ];
        terms
            .into_iter()
            .filter(|(_, points)| *points != 0)
            .collect()
    }
}

impl Signals {
    /// More than half of at least 8 letters are capitals.
    pub fn shouting(&self) -> bool {
        self.letters >= 8 && self.caps_ratio > 0.5
    }
}

fn analyzer() -> &'static SentimentIntensityAnalyzer<'static> {
    static ANALYZER: OnceLock<SentimentIntensityAnalyzer<'static>> = OnceLock::new();
    ANALYZER.get_or_init(SentimentIntensityAnalyzer::new)
}

/// At most the first `bytes` bytes of `text`, cut between words (within a word only when one
/// word is longer than that).
pub(crate) fn head(text: &str, bytes: usize) -> &str {
    if text.len() <= bytes {
        return text;
    }
    let head = &text[..text.floor_char_boundary(bytes)];
    match head.rfind(char::is_whitespace) {
        Some(space) if space > 0 => &head[..space],
        _ => head,
    }
}

/// At most the last `bytes` bytes of `text`, cut between words like [`head`].
fn tail(text: &str, bytes: usize) -> &str {
    if text.len() <= bytes {
        return text;
    }
    let tail = &text[text.ceil_char_boundary(text.len() - bytes)..];
    match tail
        .find(char::is_whitespace)
        .map(|space| tail[space..].trim_start())
    {
        Some(words) if !words.is_empty() => words,
        _ => tail,
    }
}

/// Whether `haystack[start..end]` stands as a whole word or phrase: no letter or digit just
/// before or after it.
fn is_whole_word(haystack: &str, start: usize, end: usize) -> bool {
    let before = haystack[..start].chars().next_back();
    let after = haystack[end..].chars().next();
    !before.is_some_and(char::is_alphanumeric) && !after.is_some_and(char::is_alphanumeric)
}

/// ISO 639-1 codes of the languages whatlang detects that support teams most often serve.
const LANGUAGES: &[(&str, Lang)] = &[
    ("en", Lang::Eng),
    ("de", Lang::Deu),
    ("es", Lang::Spa),
    ("fr", Lang::Fra),
    ("it", Lang::Ita),
    ("pt", Lang::Por),
    ("nl", Lang::Nld),
    ("sv", Lang::Swe),
    ("da", Lang::Dan),
    ("nb", Lang::Nob),
    ("fi", Lang::Fin),
    ("pl", Lang::Pol),
    ("cs", Lang::Ces),
    ("ro", Lang::Ron),
    ("hu", Lang::Hun),
    ("tr", Lang::Tur),
    ("ru", Lang::Rus),
    ("uk", Lang::Ukr),
    ("el", Lang::Ell),
    ("ar", Lang::Ara),
    ("he", Lang::Heb),
    ("hi", Lang::Hin),
    ("ja", Lang::Jpn),
    ("ko", Lang::Kor),
    ("zh", Lang::Cmn),
    ("vi", Lang::Vie),
    ("th", Lang::Tha),
    ("id", Lang::Ind),
];

pub fn lang_from_iso1(code: &str) -> Option<Lang> {
    LANGUAGES.iter().find(|(c, _)| *c == code).map(|(_, l)| *l)
}

fn iso1(lang: Lang) -> Option<&'static str> {
    LANGUAGES.iter().find(|(_, l)| *l == lang).map(|(c, _)| *c)
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchboard_channel::{ChannelRef, Sender};

    fn message(text: &str) -> NormalizedMessage {
        NormalizedMessage {
            message_id: NormalizedMessage::stable_id("c", text),
            channel: ChannelRef {
                id: "c".into(),
                kind: "webchat".into(),
            },
            external_id: text.into(),
            thread_key: None,
            sender: Sender {
                kind: "webchat".into(),
                address: "v".into(),
                name: None,
            },
            subject: None,
            text: text.into(),
            attachments: vec![],
            received_at: time::OffsetDateTime::UNIX_EPOCH,
            auto_submitted: false,
            metadata: Default::default(),
        }
    }

    fn model() -> SignalModel {
        let languages = ["en", "de", "es", "fr"].map(String::from);
        let keywords = BTreeMap::from([
            (
                "en".to_owned(),
                vec!["urgent".to_owned(), "right now".to_owned()],
            ),
            ("de".to_owned(), vec!["dringend".to_owned()]),
        ]);
        let weights = Weights {
            negative_sentiment: 20,
            urgent_keyword: 10,
            max_keywords: 3,
            shouting: 5,
            exclamations: 3,
            repeat_contact: 4,
            attachment: 2,
        };
        SignalModel::new(&languages, keywords, weights).unwrap()
    }

    #[test]
    fn detects_the_declared_languages() {
        let m = model();
        for (text, lang) in [
            (
                "Hello, I have a question about my order from last week, can you help me?",
                "en",
            ),
            (
                "Hallo, ich habe eine Frage zu meiner Bestellung von letzter Woche.",
                "de",
            ),
            (
                "Hola, tengo una pregunta sobre mi pedido de la semana pasada.",
                "es",
            ),
            (
                "Bonjour, j'ai une question sur ma commande de la semaine dernière.",
                "fr",
            ),
        ] {
            let s = m.compute(&message(text), 1);
            assert_eq!(s.language, lang, "{text}");
            assert!(s.language_confidence >= MIN_LANGUAGE_CONFIDENCE);
        }
    }

    #[test]
    fn no_detection_without_two_declared_languages() {
        let m = SignalModel::new(&["*".to_owned()], BTreeMap::new(), Weights::default()).unwrap();
        assert_eq!(
            m.compute(
                &message("Hallo, ich habe eine Frage zu meiner Bestellung."),
                1
            )
            .language,
            ""
        );
    }

    #[test]
    fn unknown_language_codes_are_refused() {
        assert!(
            SignalModel::new(&["english".to_owned()], BTreeMap::new(), Weights::default()).is_err()
        );
        let bad = BTreeMap::from([("xx".to_owned(), vec!["a".to_owned()])]);
        assert!(SignalModel::new(&[], bad, Weights::default()).is_err());
    }

    #[test]
    fn sentiment_and_its_urgency() {
        let m = model();
        let angry = m.compute(
            &message("This is terrible, the worst service ever. I hate it."),
            1,
        );
        let happy = m.compute(&message("Thank you so much, great service, I love it!"), 1);
        assert!(angry.sentiment < -0.5, "{}", angry.sentiment);
        assert!(happy.sentiment > 0.5, "{}", happy.sentiment);
        let terms = m.urgency_terms(&angry);
        let points = terms
            .iter()
            .find(|(n, _)| *n == "signal:negative_sentiment")
            .unwrap()
            .1;
        assert!((10..=20).contains(&points), "{points}");
        assert!(
            m.urgency_terms(&happy)
                .iter()
                .all(|(n, _)| *n != "signal:negative_sentiment")
        );
        // A plain question scores just below zero (−0.046): neutral, no points.
        let plain = m.compute(&message("What are your opening hours?"), 1);
        assert!(
            plain.sentiment < 0.0 && plain.sentiment > -NEUTRAL_SENTIMENT,
            "{}",
            plain.sentiment
        );
        assert!(
            m.urgency_terms(&plain)
                .iter()
                .all(|(n, _)| *n != "signal:negative_sentiment")
        );
    }

    #[test]
    fn keywords_are_whole_words_of_the_detected_language() {
        let m = model();
        let s = m.compute(
            &message("This is URGENT, please answer right now, my account is locked."),
            1,
        );
        assert_eq!(s.urgent_keywords, vec!["urgent", "right now"]);
        let s = m.compute(
            &message("The insurgent group of words should not count as anything here."),
            1,
        );
        assert!(s.urgent_keywords.is_empty(), "{:?}", s.urgent_keywords);
        let s = m.compute(
            &message("Bitte helfen Sie mir, es ist dringend, mein Konto ist gesperrt."),
            1,
        );
        assert_eq!(s.urgent_keywords, vec!["dringend"]);
        // Lexicon order, whatever the order in the text; each keyword once.
        let s = m.compute(
            &message("Right now, please: it is urgent, urgent, urgent that someone answers."),
            1,
        );
        assert_eq!(s.urgent_keywords, vec!["urgent", "right now"]);
    }

    #[test]
    fn a_keyword_counts_where_it_stands_alone_even_after_a_partial_occurrence() {
        // The first occurrence of "ab ab" starts inside "xab"; the one that stands alone
        // overlaps it.
        let keywords = BTreeMap::from([("en".to_owned(), vec!["AB AB".to_owned()])]);
        let m = SignalModel::new(&["*".to_owned()], keywords, Weights::default()).unwrap();
        let s = m.compute(&message("xab ab ab"), 1);
        assert_eq!(s.urgent_keywords, vec!["ab ab"]);
        let s = m.compute(&message("xab ab abc"), 1);
        assert!(s.urgent_keywords.is_empty(), "{:?}", s.urgent_keywords);
    }

    #[test]
    fn a_long_text_is_read_at_its_ends_for_language_and_mood_and_whole_for_keywords() {
        let m = model();
        let filler =
            "The parcel went to the address on the order and the receipt is in the email. ";
        let mut text = filler.repeat(3000);
        assert!(text.len() > 200 * READ_WINDOW);
        text.insert_str(text.len() / 2, "It is urgent. ");
        text.push_str("This is terrible, the worst service ever. I hate it.");
        let s = m.compute(&message(&text), 1);
        assert_eq!(s.language, "en");
        assert!(
            s.sentiment < -0.5,
            "the angry ending counts: {}",
            s.sentiment
        );
        assert_eq!(s.urgent_keywords, vec!["urgent"], "keywords anywhere");
        // The price of the bound: anger only in the middle of a long text is not read.
        let mut calm = filler.repeat(3000);
        calm.insert_str(
            calm.len() / 2,
            "This is terrible, the worst service ever. I hate it. ",
        );
        let s = m.compute(&message(&calm), 1);
        assert!(s.sentiment.abs() < NEUTRAL_SENTIMENT, "{}", s.sentiment);
        let german = "Ich habe meine Rechnung nicht bekommen und brauche sie für die Buchhaltung. ";
        assert_eq!(m.compute(&message(&german.repeat(3000)), 1).language, "de");
    }

    #[test]
    fn a_long_text_is_cut_between_words_or_at_a_character_boundary() {
        assert_eq!(head("short", 10), "short");
        assert_eq!(head("one two three", 9), "one two");
        assert_eq!(tail("one two three", 9), "three");
        // Two-byte characters with no space: the cut falls inside none of them.
        let accents = "é".repeat(READ_WINDOW);
        assert_eq!(head(&accents, 5), "éé");
        assert_eq!(tail(&accents, 5), "éé");
        let m = model();
        let s = m.compute(&message(&"é".repeat(10 * READ_WINDOW + 1)), 1);
        assert!(s.urgent_keywords.is_empty());
        let s = m.compute(&message(&format!("x{}", "€".repeat(3 * READ_WINDOW))), 1);
        assert!(s.urgent_keywords.is_empty());
    }

    #[test]
    fn shape_and_repeat_contact_terms() {
        let m = model();
        let s = m.compute(&message("WHERE IS MY ORDER!!"), 5);
        assert!(s.shouting());
        assert_eq!(s.repeat_contacts, 4);
        let terms: BTreeMap<_, _> = m.urgency_terms(&s).into_iter().collect();
        assert_eq!(terms["signal:shouting"], 5);
        assert_eq!(terms["signal:exclamations"], 3);
        assert_eq!(
            terms["signal:repeat_contacts"], 12,
            "at most 3 earlier contacts count"
        );
        assert!(
            !m.compute(&message("OK!!"), 1).shouting(),
            "too short to shout"
        );
    }

    #[test]
    fn attachments_earn_points_up_to_three() {
        let m = model();
        let attachment = |name: &str| switchboard_channel::Attachment {
            filename: name.into(),
            content_type: "image/png".into(),
            size: 1000,
        };
        let mut with_two = message("See the screenshots");
        with_two.attachments = vec![attachment("a.png"), attachment("b.png")];
        let s = m.compute(&with_two, 1);
        assert_eq!(s.attachments, 2);
        let terms: BTreeMap<_, _> = m.urgency_terms(&s).into_iter().collect();
        assert_eq!(terms["signal:attachments"], 4);
        let mut with_five = with_two.clone();
        with_five.attachments = (0..5).map(|i| attachment(&format!("{i}.png"))).collect();
        let terms: BTreeMap<_, _> = m
            .urgency_terms(&m.compute(&with_five, 1))
            .into_iter()
            .collect();
        assert_eq!(
            terms["signal:attachments"], 6,
            "at most 3 attachments count"
        );
        let none = m.compute(&message("no files"), 1);
        assert!(
            m.urgency_terms(&none)
                .iter()
                .all(|(n, _)| *n != "signal:attachments")
        );
    }
}
