//! Routing rule files: `[[queue]]`, `[[rule]]` (CEL `when`) and `[[test]]` tables in the `*.toml`
//! files of one directory, loaded in lexical order into an immutable, validated [`RuleSet`].
//! Loading reports every problem as `file:line:col: message`; a set with any problem is refused
//! whole.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use toml::Spanned;

use crate::config::load::LineIndex;

/// One problem in a rule set, with where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    pub file: String,
    pub line: usize,
    pub col: usize,
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}: {}", self.file, self.message)
        } else {
            write!(
                f,
                "{}:{}:{}: {}",
                self.file, self.line, self.col, self.message
            )
        }
    }
}

/// Every problem of a refused rule set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostics(pub Vec<Diagnostic>);

impl fmt::Display for Diagnostics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{d}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Diagnostics {}

/// An agent queue.
#[derive(Debug, Clone)]
pub struct Queue {
    pub name: String,
    /// `name`, shared: every decision's explanation lists every queue.
    pub shared_name: Arc<str>,
    /// What the agents of this queue can do.
    pub skills: Vec<String>,
    /// Proficiency 1–5 per skill (3 when not given).
    pub proficiency: BTreeMap<String, u8>,
    /// Languages served; `"*"` serves any.
    pub languages: Vec<String>,
    /// First-response target.
    pub sla: Option<Duration>,
    /// Next queue when the SLA passes.
    pub overflow: Option<String>,
    /// Urgency points added at each overflow out of this queue.
    pub overflow_urgency: u8,
    pub default: bool,
    /// Opening hours; `None` is always open.
    pub hours: Option<super::hours::Hours>,
    /// Where conversations go while the queue is closed; `None`: they wait in it.
    pub after_hours: Option<String>,
}

/// A compiled rule.
pub struct Rule {
    pub id: String,
    /// `id`, shared: every decision lists the rules that did not match.
    pub shared_id: Arc<str>,
    /// What the explanation says of this rule when it matches, built once: `file`, the
    /// `rule:<id>` urgency term, the effect text, and the effect text when an earlier rule
    /// already routed.
    pub shared_file: Arc<str>,
    pub urgency_term: Arc<str>,
    pub effect: Arc<str>,
    pub effect_route_ignored: Arc<str>,
    pub file: String,
    pub line: usize,
    /// `None`: the rule always matches.
    pub when: Option<cel::Program>,
    /// `when` compiled to the fast path, when it is within its subset (see [`super::fast`]).
    pub fast: Option<super::fast::Node>,
    pub when_source: Option<String>,
    pub urgency: i64,
    pub require_skills: Vec<String>,
    /// Skills that make a queue a better choice, without being required.
    pub prefer_skills: Vec<String>,
    pub route_to: Option<String>,
    pub tags: Vec<String>,
    /// No further rules are evaluated after this one matches.
    pub stop: bool,
}

impl fmt::Debug for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Rule")
            .field("id", &self.id)
            .field("file", &self.file)
            .field("line", &self.line)
            .field("when", &self.when_source)
            .finish_non_exhaustive()
    }
}

/// A `[[test]]` case.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleTest {
    pub name: String,
    pub message: TestMessage,
    #[serde(default)]
    pub customer: TestCustomer,
    pub expect: TestExpect,
    /// The time the test decides at (RFC 3339); default: now.
    #[serde(default)]
    pub clock: Option<String>,
    #[serde(skip)]
    pub now: Option<OffsetDateTime>,
    #[serde(skip)]
    pub file: String,
    #[serde(skip)]
    pub line: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TestMessage {
    /// Channel kind (`email`, `webchat`, …); also used as the channel id.
    pub channel: String,
    /// Sender address; its kind is guessed from its shape (`@` → email, `+` → phone).
    pub sender: String,
    pub text: String,
    #[serde(default)]
    pub subject: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TestCustomer {
    #[serde(default)]
    pub attributes: Map<String, Value>,
    #[serde(default)]
    pub contacts_last_24h: u32,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TestExpect {
    #[serde(default)]
    pub queue: Option<String>,
    #[serde(default)]
    pub urgency_at_least: Option<u8>,
    #[serde(default)]
    pub urgency_at_most: Option<u8>,
    #[serde(default)]
    pub tags: Vec<String>,
    /// The detected language (ISO 639-1).
    #[serde(default)]
    pub language: Option<String>,
}

/// A validated, compiled, immutable set of queues and rules.
pub struct RuleSet {
    pub queues: Vec<Queue>,
    pub rules: Vec<Rule>,
    pub tests: Vec<RuleTest>,
    /// Index into `queues` of the catch-all.
    pub default_queue: usize,
    pub(crate) env: Arc<cel::Env>,
    /// Every rule's id, in order (explanations list rules by index into it).
    pub rule_ids: Arc<[Arc<str>]>,
    /// The field paths the rules' fast paths read (see [`super::fast`]).
    pub(crate) paths: super::fast::Paths,
    /// Language detection, keyword lexicon and signal weights.
    pub model: super::signals::SignalModel,
    /// SHA-256 over the files' names and contents, hex; changes with any edit.
    pub version: String,
    pub loaded_at: OffsetDateTime,
    pub source: PathBuf,
}

impl fmt::Debug for RuleSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RuleSet")
            .field("version", &self.version)
            .field("queues", &self.queues)
            .field("rules", &self.rules)
            .finish_non_exhaustive()
    }
}

impl RuleSet {
    pub fn queue(&self, name: &str) -> Option<&Queue> {
        self.queues.iter().find(|q| q.name == name)
    }

    pub fn default_queue(&self) -> &Queue {
        &self.queues[self.default_queue]
    }

    /// Loads every `*.toml` file of `dir` in lexical order.
    pub fn load_dir(dir: &Path) -> Result<RuleSet, Diagnostics> {
        let fail = |message: String| {
            Diagnostics(vec![Diagnostic {
                file: dir.display().to_string(),
                line: 0,
                col: 0,
                message,
            }])
        };
        let entries = std::fs::read_dir(dir)
            .map_err(|error| fail(format!("cannot read the rules directory: {error}")))?;
        let mut paths: Vec<PathBuf> = entries
            .filter_map(Result::ok)
            .map(|entry| entry.path())
            .filter(|path| path.extension().is_some_and(|ext| ext == "toml") && path.is_file())
            .collect();
        paths.sort();
        let mut files = Vec::with_capacity(paths.len());
        for path in paths {
            let text = std::fs::read_to_string(&path)
                .map_err(|error| fail(format!("cannot read {}: {error}", path.display())))?;
            files.push((path.display().to_string(), text));
        }
        let mut set = Self::from_sources(&files)?;
        set.source = dir.to_path_buf();
        Ok(set)
    }

    /// Builds a set from `(file name, text)` pairs, in the given order.
    pub fn from_sources(files: &[(String, String)]) -> Result<RuleSet, Diagnostics> {
        let env = Arc::new(super::functions::environment());
        let mut diagnostics = Vec::new();
        let mut queues: Vec<(Queue, Location)> = Vec::new();
        let mut queue_refs: Vec<(String, Location, &'static str)> = Vec::new();
        let mut paths = super::fast::Paths::default();
        let mut rules = Vec::new();
        let mut tests = Vec::new();
        let mut keywords: BTreeMap<String, Vec<String>> = BTreeMap::new();
        let mut weights: Option<(super::signals::Weights, Location)> = None;
        let mut hasher = Sha256::new();
        // A file that does not parse adds none of its queues: the checks across files would
        // report what it defines as missing.
        let mut unreadable = false;

        for (file, text) in files {
            // The name, not the path: the same files give the same version wherever they are.
            let name = Path::new(file)
                .file_name()
                .map_or_else(|| file.clone(), |n| n.to_string_lossy().into_owned());
            hasher.update(name.as_bytes());
            hasher.update([0]);
            hasher.update(text.as_bytes());
            hasher.update([0]);
            let lines = LineIndex::new(text);
            let at = |offset: usize| {
                let (line, col) = lines.position(offset);
                Location {
                    file: file.clone(),
                    line,
                    col,
                }
            };
            let parsed: RuleFile = match toml::from_str(text) {
                Ok(parsed) => parsed,
                Err(error) => {
                    let location = at(error.span().map_or(0, |s| s.start));
                    diagnostics.push(location.diagnostic(error.message().trim().to_owned()));
                    unreadable = true;
                    continue;
                }
            };

            for (language, words) in parsed.keywords {
                keywords.entry(language).or_default().extend(words);
            }
            if let Some(spanned) = parsed.signals {
                let location = at(spanned.span().start);
                if let Some((_, first)) = &weights {
                    diagnostics.push(location.diagnostic(format!(
                        "[signals] is already defined at {first}: define the weights once"
                    )));
                } else {
                    weights = Some((spanned.into_inner(), location));
                }
            }

            for spanned in parsed.queue {
                let location = at(spanned.span().start);
                let def = spanned.into_inner();
                let sla_given = def.sla.is_some();
                let sla = match def.sla.map(|s| (humantime::parse_duration(s.get_ref()), s)) {
                    None => None,
                    Some((Ok(duration), _)) => Some(duration),
                    Some((Err(error), s)) => {
                        diagnostics.push(at(s.span().start).diagnostic(format!(
                            "queue `{}`: sla `{}` is not a duration like \"15m\": {error}",
                            def.name,
                            s.get_ref()
                        )));
                        None
                    }
                };
                if let Some(overflow) = &def.overflow {
                    if !sla_given {
                        diagnostics.push(at(overflow.span().start).diagnostic(format!(
                            "queue `{}`: overflow needs an `sla` (the wait after which it applies)",
                            def.name
                        )));
                    }
                    if overflow.get_ref() == &def.name {
                        diagnostics.push(
                            at(overflow.span().start)
                                .diagnostic(format!("queue `{}` overflows to itself", def.name)),
                        );
                    }
                    queue_refs.push((
                        overflow.get_ref().clone(),
                        at(overflow.span().start),
                        "overflow",
                    ));
                }
                if let Some(after_hours) = &def.after_hours {
                    queue_refs.push((
                        after_hours.get_ref().clone(),
                        at(after_hours.span().start),
                        "after_hours",
                    ));
                }
                let hours = match def.hours {
                    None => None,
                    Some(spanned) => {
                        let hours_at = at(spanned.span().start);
                        match spanned.into_inner().build() {
                            Ok(hours) => Some(hours),
                            Err(problems) => {
                                for problem in problems {
                                    diagnostics.push(
                                        hours_at
                                            .diagnostic(format!("queue `{}`: {problem}", def.name)),
                                    );
                                }
                                None
                            }
                        }
                    }
                };
                let mut proficiency = BTreeMap::new();
                for skill in def.skills {
                    match skill.parse() {
                        Ok((name, level)) => {
                            proficiency.insert(name, level);
                        }
                        Err(problem) => diagnostics
                            .push(location.diagnostic(format!("queue `{}`: {problem}", def.name))),
                    }
                }
                if !valid_queue_name(&def.name) {
                    diagnostics.push(location.diagnostic(format!(
                        "queue name `{}` must be 1 to {MAX_QUEUE_NAME} ASCII letters, digits, '-' or '_'",
                        def.name
                    )));
                }
                queues.push((
                    Queue {
                        shared_name: Arc::from(def.name.as_str()),
                        name: def.name,
                        skills: proficiency.keys().cloned().collect(),
                        proficiency,
                        languages: def.languages.unwrap_or_else(|| vec!["*".to_owned()]),
                        sla,
                        overflow: def.overflow.map(Spanned::into_inner),
                        overflow_urgency: def.overflow_urgency,
                        default: def.default,
                        hours,
                        after_hours: def.after_hours.map(Spanned::into_inner),
                    },
                    location,
                ));
            }

            for spanned in parsed.rule {
                let location = at(spanned.span().start);
                let def = spanned.into_inner();
                let (when, when_source) = match def.when {
                    None => (None, None),
                    Some(source) => {
                        let expression_at = at(source.span().start);
                        match env.compile(source.get_ref()) {
                            Ok(program) => {
                                for unknown in unknown_variables(&program, source.get_ref()) {
                                    diagnostics.push(expression_at.diagnostic(format!(
                                        "rule `{}`: `when` uses `{unknown}`, which is not a variable (use message, customer, conversation or signals)",
                                        def.id
                                    )));
                                }
                                (Some(program), Some(source.into_inner()))
                            }
                            Err(errors) => {
                                for error in errors.errors {
                                    diagnostics.push(expression_at.diagnostic(format!(
                                        "rule `{}`: invalid CEL in `when`: {} (at column {} of the expression)",
                                        def.id,
                                        error.msg,
                                        error.pos.1 + 1
                                    )));
                                }
                                (None, None)
                            }
                        }
                    }
                };
                if let Some(target) = &def.route_to {
                    queue_refs.push((
                        target.get_ref().clone(),
                        at(target.span().start),
                        "route_to",
                    ));
                }
                let fast = when.as_ref().and_then(|program| {
                    super::fast::compile(&program.expression().expr, &mut paths)
                });
                let route_to = def.route_to.map(Spanned::into_inner);
                let effect = |route_ignored: bool| -> Arc<str> {
                    let mut effects = Vec::new();
                    if def.urgency != 0 {
                        effects.push(format!("urgency {:+}", def.urgency));
                    }
                    if !def.require_skills.is_empty() {
                        effects.push(format!("requires {}", def.require_skills.join(", ")));
                    }
                    if !def.prefer_skills.is_empty() {
                        effects.push(format!("prefers {}", def.prefer_skills.join(", ")));
                    }
                    if let Some(target) = &route_to {
                        effects.push(if route_ignored {
                            format!("route to {target} (ignored: an earlier rule routed)")
                        } else {
                            format!("route to {target}")
                        });
                    }
                    if !def.tags.is_empty() {
                        effects.push(format!("tags {}", def.tags.join(", ")));
                    }
                    if def.stop {
                        effects.push("stop".to_owned());
                    }
                    if effects.is_empty() {
                        "matched".into()
                    } else {
                        effects.join("; ").into()
                    }
                };
                let (effect, effect_route_ignored) = (effect(false), effect(true));
                rules.push((
                    Rule {
                        shared_id: Arc::from(def.id.as_str()),
                        shared_file: Arc::from(location.file.as_str()),
                        urgency_term: Arc::from(format!("rule:{}", def.id).as_str()),
                        effect,
                        effect_route_ignored,
                        id: def.id,
                        file: location.file.clone(),
                        line: location.line,
                        when,
                        fast,
                        when_source,
                        urgency: def.urgency,
                        require_skills: def.require_skills,
                        prefer_skills: def.prefer_skills,
                        route_to,
                        tags: def.tags,
                        stop: def.stop,
                    },
                    location,
                ));
            }

            for spanned in parsed.test {
                let location = at(spanned.span().start);
                let mut test = spanned.into_inner();
                test.file = location.file.clone();
                test.line = location.line;
                if let Some(clock) = &test.clock {
                    match OffsetDateTime::parse(clock, &time::format_description::well_known::Rfc3339) {
                        Ok(now) => test.now = Some(now),
                        Err(_) => diagnostics.push(location.diagnostic(format!(
                            "test \"{}\": clock `{clock}` is not an RFC 3339 time like \"2026-11-23T20:00:00+01:00\"",
                            test.name
                        ))),
                    }
                }
                if let Some(queue) = &test.expect.queue {
                    queue_refs.push((queue.clone(), location.clone(), "expect.queue"));
                }
                tests.push(test);
            }
        }

        // Cross-file checks.
        let mut names = HashMap::new();
        for (queue, location) in &queues {
            if let Some(first) = names.insert(queue.name.clone(), location.clone()) {
                diagnostics.push(location.diagnostic(format!(
                    "queue `{}` is already defined at {first}",
                    queue.name
                )));
            }
        }
        for (target, location, key) in &queue_refs {
            if !names.contains_key(target) && !unreadable {
                diagnostics.push(location.diagnostic(format!(
                    "{key} names queue `{target}`, which no [[queue]] defines"
                )));
            }
        }
        // An overflow chain must end: a → b → a would bounce a waiting conversation forever.
        let overflow_of: HashMap<&str, &str> = queues
            .iter()
            .filter_map(|(q, _)| q.overflow.as_deref().map(|o| (q.name.as_str(), o)))
            .collect();
        let mut reported = HashSet::new();
        for (queue, location) in &queues {
            let mut chain = vec![queue.name.as_str()];
            let mut next = overflow_of.get(queue.name.as_str()).copied();
            while let Some(step) = next {
                if step == queue.name && chain.len() > 1 {
                    let mut members: Vec<&str> = chain.clone();
                    members.sort_unstable();
                    if reported.insert(members) {
                        chain.push(step);
                        diagnostics.push(
                            location
                                .diagnostic(format!("overflow chain loops: {}", chain.join(" → "))),
                        );
                    }
                    break;
                }
                if chain.contains(&step) {
                    break;
                }
                chain.push(step);
                next = overflow_of.get(step).copied();
            }
        }
        let defaults: Vec<&(Queue, Location)> = queues.iter().filter(|(q, _)| q.default).collect();
        match defaults.as_slice() {
            [_] => {}
            [] if unreadable => {}
            [] => diagnostics.push(Diagnostic {
                file: files
                    .first()
                    .map_or_else(|| "<rules>".to_owned(), |f| f.0.clone()),
                line: 0,
                col: 0,
                message: if queues.is_empty() {
                    "no [[queue]] is defined: add at least one, marked `default = true`".to_owned()
                } else {
                    "no queue is marked `default = true`: exactly one must be".to_owned()
                },
            }),
            [_, extra @ ..] => {
                for (queue, location) in extra {
                    diagnostics.push(location.diagnostic(format!(
                        "queue `{}` is a second `default = true`: exactly one queue is the default",
                        queue.name
                    )));
                }
            }
        }
        let skills: HashSet<&str> = queues
            .iter()
            .flat_map(|(q, _)| q.skills.iter().map(String::as_str))
            .collect();
        let mut ids = HashMap::new();
        for (rule, location) in &rules {
            if let Some(first) = ids.insert(rule.id.clone(), location.clone()) {
                diagnostics.push(
                    location
                        .diagnostic(format!("rule id `{}` is already used at {first}", rule.id)),
                );
            }
            for skill in rule.require_skills.iter().chain(&rule.prefer_skills) {
                if !skills.contains(skill.as_str()) {
                    diagnostics.push(location.diagnostic(format!(
                        "rule `{}` names skill `{skill}`, which no queue has",
                        rule.id
                    )));
                }
            }
        }

        let languages: Vec<String> = queues
            .iter()
            .flat_map(|(q, _)| q.languages.iter().cloned())
            .collect();
        let model = match super::signals::SignalModel::new(
            &languages,
            keywords,
            weights.map(|(w, _)| w).unwrap_or_default(),
        ) {
            Ok(model) => Some(model),
            Err(message) => {
                diagnostics.push(Diagnostic {
                    file: files
                        .first()
                        .map_or_else(|| "<rules>".to_owned(), |f| f.0.clone()),
                    line: 0,
                    col: 0,
                    message,
                });
                None
            }
        };

        let Some(model) = model.filter(|_| diagnostics.is_empty()) else {
            return Err(Diagnostics(diagnostics));
        };
        paths.finish();
        let default_queue = queues
            .iter()
            .position(|(q, _)| q.default)
            .unwrap_or_default();
        Ok(RuleSet {
            rule_ids: rules.iter().map(|(r, _)| r.shared_id.clone()).collect(),
            queues: queues.into_iter().map(|(q, _)| q).collect(),
            rules: rules.into_iter().map(|(r, _)| r).collect(),
            tests,
            default_queue,
            env,
            paths,
            model,
            version: hex::encode(hasher.finalize()),
            loaded_at: OffsetDateTime::now_utc(),
            source: PathBuf::new(),
        })
    }

    /// A set with one catch-all queue, `general`, and no rules: used when no rules directory
    /// exists in single-node mode.
    pub fn builtin() -> RuleSet {
        let source = "[[queue]]\nname = \"general\"\ndefault = true\nlanguages = [\"*\"]\n";
        // The built-in text is a constant known to be valid.
        Self::from_sources(&[("<built-in>".to_owned(), source.to_owned())])
            .expect("the built-in rule set is valid")
    }

    /// Queue names, for declaring one agent queue each.
    pub fn queue_names(&self) -> Vec<String> {
        self.queues.iter().map(|q| q.name.clone()).collect()
    }

    /// A summary for `/api/v1/rules` and logs.
    pub fn summary(&self) -> BTreeMap<&'static str, Value> {
        BTreeMap::from([
            ("version", Value::from(self.version.clone())),
            ("queues", Value::from(self.queues.len())),
            ("rules", Value::from(self.rules.len())),
            ("tests", Value::from(self.tests.len())),
        ])
    }
}

/// The variables a `when` expression may use.
const VARIABLES: &[&str] = &["message", "customer", "conversation", "signals"];

/// Top-level names in `program` that are neither rule variables nor bound by a comprehension
/// macro (`exists(x, …)`): almost always a typo that would make the rule silently never match.
fn unknown_variables(program: &cel::Program, source: &str) -> Vec<String> {
    let mut unknown: Vec<String> = program
        .references()
        .variables()
        .into_iter()
        .filter(|name| !VARIABLES.contains(name))
        .filter(|name| {
            let bound = format!(
                r"\b(all|exists|exists_one|map|filter)\(\s*{}\s*,",
                regex::escape(name)
            );
            !super::functions::compiled(&bound).is_ok_and(|re| re.is_match(source))
        })
        .map(str::to_owned)
        .collect();
    unknown.sort();
    unknown
}

/// The longest queue name: AMQP names (`<prefix>.queue.<name>`) end at 255 bytes.
pub const MAX_QUEUE_NAME: usize = 64;

/// 1 to [`MAX_QUEUE_NAME`] ASCII letters, digits, `-` or `_`.
pub fn valid_queue_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_QUEUE_NAME
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_'))
}

#[derive(Debug, Clone)]
struct Location {
    file: String,
    line: usize,
    col: usize,
}

impl Location {
    fn diagnostic(&self, message: String) -> Diagnostic {
        Diagnostic {
            file: self.file.clone(),
            line: self.line,
            col: self.col,
            message,
        }
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.file, self.line)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleFile {
    /// Urgent keywords per language (ISO 639-1): `en = ["urgent", "asap"]`.
    #[serde(default)]
    keywords: BTreeMap<String, Vec<String>>,
    /// Urgency weights of the signals.
    #[serde(default)]
    signals: Option<Spanned<super::signals::Weights>>,
    #[serde(default)]
    queue: Vec<Spanned<QueueDef>>,
    #[serde(default)]
    rule: Vec<Spanned<RuleDef>>,
    #[serde(default)]
    test: Vec<Spanned<RuleTest>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct QueueDef {
    name: String,
    #[serde(default)]
    skills: Vec<SkillDef>,
    #[serde(default)]
    languages: Option<Vec<String>>,
    #[serde(default)]
    sla: Option<Spanned<String>>,
    #[serde(default)]
    overflow: Option<Spanned<String>>,
    #[serde(default = "default_overflow_urgency")]
    overflow_urgency: u8,
    #[serde(default)]
    default: bool,
    #[serde(default)]
    hours: Option<Spanned<super::hours::HoursDef>>,
    #[serde(default)]
    after_hours: Option<Spanned<String>>,
}

/// `"billing"`, `"billing:4"` or `{name = "billing", level = 4}`.
#[derive(Deserialize)]
#[serde(untagged)]
enum SkillDef {
    Name(String),
    Table { name: String, level: u8 },
}

/// Urgency points an overflow step adds unless the queue says otherwise.
const DEFAULT_OVERFLOW_URGENCY: u8 = 10;

fn default_overflow_urgency() -> u8 {
    DEFAULT_OVERFLOW_URGENCY
}

/// Default proficiency of a skill listed without one.
const DEFAULT_LEVEL: u8 = 3;

impl SkillDef {
    fn parse(self) -> Result<(String, u8), String> {
        let (name, level) = match self {
            SkillDef::Table { name, level } => (name, level),
            SkillDef::Name(text) => match text.split_once(':') {
                None => (text, DEFAULT_LEVEL),
                Some((name, level)) => match level.trim().parse::<u8>() {
                    Ok(level) => (name.trim().to_owned(), level),
                    Err(_) => {
                        return Err(format!(
                            "skill `{text}`: the level after `:` must be 1 to 5"
                        ));
                    }
                },
            },
        };
        if name.is_empty() {
            return Err("a skill needs a name".to_owned());
        }
        if !(1..=5).contains(&level) {
            return Err(format!(
                "skill `{name}`: level {level} is not between 1 and 5"
            ));
        }
        Ok((name, level))
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleDef {
    id: String,
    #[serde(default)]
    when: Option<Spanned<String>>,
    #[serde(default)]
    urgency: i64,
    #[serde(default)]
    require_skills: Vec<String>,
    #[serde(default)]
    prefer_skills: Vec<String>,
    #[serde(default)]
    route_to: Option<Spanned<String>>,
    #[serde(default)]
    tags: Vec<String>,
    #[serde(default)]
    stop: bool,
}
