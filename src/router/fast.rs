//! A fast path for the common shapes of `when` expressions: field paths, literals, `&&`, `||`,
//! `!`, comparisons, `has()`, `in` a literal list, `matches`/`contains`/`startsWith`/`endsWith`
//! with a literal argument, `size()`, `double()` and `int()`. Such an expression is compiled
//! once into a [`Node`] tree evaluated directly on the decision's JSON view, without building
//! CEL values for the message, the customer and the signals.
//!
//! The fast path never guesses: wherever CEL could give an error or its semantics differ by
//! type (a missing key, an int compared with a double, a list where a string is expected),
//! evaluation answers "unsure" (`None`) and the caller asks the CEL interpreter, which gives the
//! authoritative answer and error text. `&&` and `||` keep CEL's commutative rules: `false &&
//! <anything>` is false and `true || <anything>` is true, whatever side it is on.

use std::sync::Arc;

use std::cell::OnceCell;

use cel::common::ast::{Expr, LiteralValue, operators};
use regex::Regex;
use serde_json::Value;

use super::decide::Input;

/// A compiled expression.
#[derive(Debug)]
pub enum Node {
    Lit(Lit),
    /// `message.text`, `customer.attributes.tier`, …: a slot of [`Paths`].
    Path(usize),
    /// `has(<path>.<field>)`: the slot of `<path>`, and the field.
    Has(usize, String),
    And(Box<Node>, Box<Node>),
    Or(Box<Node>, Box<Node>),
    Not(Box<Node>),
    Cmp(Cmp, Box<Node>, Box<Node>),
    /// `text.matches(regex)`; with a prefilter `(filter, index)` when the text is a path and
    /// the pattern has required literals (see [`Paths::finish`]).
    Matches(Box<Node>, Arc<Regex>, Option<(usize, usize)>),
    /// `contains`/`startsWith`/`endsWith` a literal; a `contains` on a path shares the
    /// path's literal prefilter `(filter, index)`, as `matches` does.
    Text(TextOp, Box<Node>, String, Option<(usize, usize)>),
    In(Box<Node>, Vec<Lit>),
    /// `x in <path>`, the path holding a list.
    InList(Box<Node>, Box<Node>),
    Size(Box<Node>),
    ToDouble(Box<Node>),
    ToInt(Box<Node>),
    Cond(Box<Node>, Box<Node>, Box<Node>),
}

#[derive(Debug, Clone, PartialEq)]
pub enum Lit {
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Null,
}

#[derive(Debug, Clone, Copy)]
pub enum Cmp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

#[derive(Debug, Clone, Copy)]
pub enum TextOp {
    Contains,
    StartsWith,
    EndsWith,
}

/// A value during evaluation, borrowed from the JSON view where possible.
#[derive(Debug, Clone, PartialEq)]
pub enum V<'a> {
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(&'a str),
    Null,
    Json(&'a Value),
    Map(&'a serde_json::Map<String, Value>),
}

/// The root variables, in the order [`compile`] numbers them.
pub const ROOTS: [&str; 4] = ["message", "customer", "conversation", "signals"];

/// The distinct field paths of a rule set's expressions, each resolved once per decision, and
/// the literal prefilters of their `matches` patterns.
#[derive(Debug, Default)]
pub struct Paths(Vec<(usize, Vec<String>)>, Prefilters);

/// Per text path, one Aho-Corasick automaton over the required literals of every pattern
/// matched against it: one scan per decision tells which patterns can match at all, and only
/// those run their regex (the regex crate's own prefilter runs once per pattern).
#[derive(Debug, Default)]
struct Prefilters {
    /// Patterns' literals per filter, until [`Paths::finish`].
    pending: Vec<(usize, Vec<Vec<Vec<u8>>>)>,
    built: Vec<Prefilter>,
}

#[derive(Debug)]
struct Prefilter {
    slot: usize,
    /// `None` if it could not be built: every pattern then counts as present.
    automaton: Option<aho_corasick::AhoCorasick>,
    /// Automaton pattern → the `matches` patterns that have it as a literal.
    owners: Vec<Vec<usize>>,
    patterns: usize,
}

impl Paths {
    /// Registers a pattern's literals under the filter of `slot`; returns (filter, index).
    fn prefilter(&mut self, slot: usize, literals: Vec<Vec<u8>>) -> (usize, usize) {
        let pending = &mut self.1.pending;
        let filter = match pending.iter().position(|(s, _)| *s == slot) {
            Some(filter) => filter,
            None => {
                pending.push((slot, Vec::new()));
                pending.len() - 1
            }
        };
        pending[filter].1.push(literals);
        (filter, pending[filter].1.len() - 1)
    }

    /// Builds the prefilters once every rule is compiled. A filter that cannot be built is
    /// left out: its patterns then run their regex every time.
    pub fn finish(&mut self) {
        for (slot, patterns) in std::mem::take(&mut self.1.pending) {
            let mut literals: Vec<Vec<u8>> = Vec::new();
            let mut owners: Vec<Vec<usize>> = Vec::new();
            for (index, pattern) in patterns.iter().enumerate() {
                for literal in pattern {
                    let literal = literal.to_ascii_lowercase();
                    match literals.iter().position(|l| *l == literal) {
                        Some(at) => owners[at].push(index),
                        None => {
                            literals.push(literal);
                            owners.push(vec![index]);
                        }
                    }
                }
            }
            // ASCII case folding only widens what is considered present: still sound.
            let built = aho_corasick::AhoCorasick::builder()
                .ascii_case_insensitive(true)
                .build(&literals);
            self.1.built.push(Prefilter {
                slot,
                automaton: built.ok(),
                owners,
                patterns: patterns.len(),
            });
        }
    }

    /// Which patterns of each filter can match this decision's text (`None`: the text is
    /// not a string; the regexes decide).
    fn scan<'a>(&self, slots: &[Option<V<'a>>]) -> Vec<Option<Vec<bool>>> {
        self.1
            .built
            .iter()
            .map(|filter| {
                let Some(V::Str(text)) = &slots[filter.slot] else {
                    return None;
                };
                let automaton = filter.automaton.as_ref()?;
                let mut present = vec![false; filter.patterns];
                for found in automaton.find_overlapping_iter(text.as_bytes()) {
                    for &owner in &filter.owners[found.pattern().as_usize()] {
                        present[owner] = true;
                    }
                }
                Some(present)
            })
            .collect()
    }

    fn intern(&mut self, root: usize, fields: Vec<String>) -> usize {
        let key = (root, fields);
        match self.0.iter().position(|p| *p == key) {
            Some(slot) => slot,
            None => {
                self.0.push(key);
                self.0.len() - 1
            }
        }
    }

    /// What the rules' fast paths evaluate against for `input`.
    pub fn context<'a>(
        &self,
        input: &Input<'a>,
        json: &'a OnceCell<[Value; 4]>,
        build: impl Fn() -> [Value; 4],
    ) -> Ctx<'a> {
        let slots = self.resolve(input, json, build);
        let present = self.scan(&slots);
        Ctx { slots, present }
    }

    /// Every path's value for `input` (`None`: a field is missing or not an object on the
    /// way). The fields the router always has are read from the input directly; anything else
    /// from its JSON view, built by `json` only if needed.
    pub fn resolve<'a>(
        &self,
        input: &Input<'a>,
        json: &'a OnceCell<[Value; 4]>,
        build: impl Fn() -> [Value; 4],
    ) -> Vec<Option<V<'a>>> {
        self.0
            .iter()
            .map(|(root, fields)| match typed(input, *root, fields) {
                Some(value) => value,
                None => {
                    let mut value = &json.get_or_init(&build)[*root];
                    for field in fields {
                        value = value.as_object()?.get(field)?;
                    }
                    Some(self::json(value))
                }
            })
            .collect()
    }

    /// The context for JSON `roots` (the tests' way in).
    #[cfg(test)]
    pub fn context_json<'a>(&self, roots: &'a [Value; 4]) -> Ctx<'a> {
        let slots = self.resolve_json(roots);
        let present = self.scan(&slots);
        Ctx { slots, present }
    }

    /// Every path's value in JSON `roots` (the tests' way in).
    #[cfg(test)]
    pub fn resolve_json<'a>(&self, roots: &'a [Value; 4]) -> Vec<Option<V<'a>>> {
        self.0
            .iter()
            .map(|(root, fields)| {
                let mut value = &roots[*root];
                for field in fields {
                    value = value.as_object()?.get(field)?;
                }
                Some(json(value))
            })
            .collect()
    }
}

/// A decision's values: every path, and which `matches` patterns can match.
pub struct Ctx<'a> {
    slots: Vec<Option<V<'a>>>,
    present: Vec<Option<Vec<bool>>>,
}

impl Ctx<'_> {
    /// The prefilter says this pattern or needle cannot be in the text.
    fn ruled_out(&self, filter: Option<(usize, usize)>) -> bool {
        filter.is_some_and(|(filter, index)| {
            self.present[filter]
                .as_ref()
                .is_some_and(|present| !present[index])
        })
    }
}

/// A path read straight from the input, as its JSON view would give it; outer `None`: not one
/// of these, use the JSON view.
#[allow(clippy::option_option)]
fn typed<'a>(input: &Input<'a>, root: usize, fields: &[String]) -> Option<Option<V<'a>>> {
    let m = input.message;
    let field = |i: usize| fields.get(i).map(String::as_str);
    Some(match (root, field(0), fields.len()) {
        (0, Some(name), 1) => Some(match name {
            "channel" => V::Str(&m.channel.kind),
            "channel_id" => V::Str(&m.channel.id),
            "kind" => V::Str(&m.sender.kind),
            "sender" => V::Str(&m.sender.address),
            "sender_name" => V::Str(m.sender.name.as_deref().unwrap_or_default()),
            "text" => V::Str(&m.text),
            "subject" => V::Str(m.subject.as_deref().unwrap_or_default()),
            "auto_submitted" => V::Bool(m.auto_submitted),
            _ => return None,
        }),
        (1, Some("attributes"), 1) => Some(V::Map(&input.customer.attributes)),
        (1, Some("attributes"), _) => {
            let mut value = input.customer.attributes.get(&fields[1]);
            for name in &fields[2..] {
                value = value.and_then(|v| v.as_object()?.get(name));
            }
            value.map(json)
        }
        (1, Some("id"), 1) => Some(V::Str(&input.customer.id)),
        (1, Some("contacts_last_24h"), 1) => Some(V::Int(input.customer.contacts_last_24h.into())),
        (3, Some(name), 1) => {
            let s = input.signals;
            // Non-finite numbers are `null` in the JSON view: leave them to it.
            let float = |f: f64| f.is_finite().then_some(V::Float(f));
            Some(match name {
                "language" => V::Str(&s.language),
                "language_confidence" => float(s.language_confidence)?,
                "sentiment" => float(s.sentiment)?,
                "caps_ratio" => float(s.caps_ratio)?,
                "exclamations" => V::Int(s.exclamations.into()),
                "attachments" => V::Int(s.attachments.into()),
                "repeat_contacts" => V::Int(s.repeat_contacts.into()),
                _ => return None,
            })
        }
        _ => return None,
    })
}

/// Compiles `expr` to the fast path, or `None` if any part of it is outside the subset. Paths
/// are interned into `paths`, shared by the whole rule set.
pub fn compile(expr: &Expr, paths: &mut Paths) -> Option<Node> {
    Some(match expr {
        Expr::Literal(literal) => Node::Lit(lit(literal)?),
        Expr::Ident(_) | Expr::Select(_) => match expr {
            Expr::Select(select) if select.test => {
                let (root, fields) = path(&select.operand.expr)?;
                Node::Has(paths.intern(root, fields), select.field.clone())
            }
            _ => {
                let (root, fields) = path(expr)?;
                Node::Path(paths.intern(root, fields))
            }
        },
        Expr::List(_) => return None,
        Expr::Call(call) => {
            let args = &call.args;
            match (call.func_name.as_str(), &call.target, args.len()) {
                (operators::LOGICAL_AND, None, 2) => Node::And(
                    Box::new(compile(&args[0].expr, paths)?),
                    Box::new(compile(&args[1].expr, paths)?),
                ),
                (operators::LOGICAL_OR, None, 2) => Node::Or(
                    Box::new(compile(&args[0].expr, paths)?),
                    Box::new(compile(&args[1].expr, paths)?),
                ),
                (operators::LOGICAL_NOT, None, 1) => {
                    Node::Not(Box::new(compile(&args[0].expr, paths)?))
                }
                (operators::NEGATE, None, 1) => match &args[0].expr {
                    Expr::Literal(LiteralValue::Int(i)) => {
                        Node::Lit(Lit::Int(i.inner().checked_neg()?))
                    }
                    Expr::Literal(LiteralValue::Double(d)) => Node::Lit(Lit::Float(-d.inner())),
                    _ => return None,
                },
                (operators::CONDITIONAL, None, 3) => Node::Cond(
                    Box::new(compile(&args[0].expr, paths)?),
                    Box::new(compile(&args[1].expr, paths)?),
                    Box::new(compile(&args[2].expr, paths)?),
                ),
                (op, None, 2) if cmp(op).is_some() => Node::Cmp(
                    cmp(op)?,
                    Box::new(compile(&args[0].expr, paths)?),
                    Box::new(compile(&args[1].expr, paths)?),
                ),
                (operators::IN, None, 2) => {
                    let Expr::List(list) = &args[1].expr else {
                        return Some(Node::InList(
                            Box::new(compile(&args[0].expr, paths)?),
                            Box::new(compile(&args[1].expr, paths)?),
                        ));
                    };
                    if !list.optional_indices.is_empty() {
                        return None;
                    }
                    let items = list
                        .elements
                        .iter()
                        .map(|e| match &e.expr {
                            Expr::Literal(l) => lit(l),
                            _ => None,
                        })
                        .collect::<Option<Vec<_>>>()?;
                    Node::In(Box::new(compile(&args[0].expr, paths)?), items)
                }
                ("matches", Some(target), 1) => {
                    matches(compile(&target.expr, paths)?, &args[0].expr, paths)?
                }
                ("matches", None, 2) => {
                    matches(compile(&args[0].expr, paths)?, &args[1].expr, paths)?
                }
                (name @ ("contains" | "startsWith" | "endsWith"), Some(target), 1) => {
                    let Expr::Literal(LiteralValue::String(needle)) = &args[0].expr else {
                        return None;
                    };
                    let op = match name {
                        "contains" => TextOp::Contains,
                        "startsWith" => TextOp::StartsWith,
                        _ => TextOp::EndsWith,
                    };
                    let text = compile(&target.expr, paths)?;
                    let needle = needle.inner().to_owned();
                    let filter = match (&text, op) {
                        (Node::Path(slot), TextOp::Contains) if !needle.is_empty() => {
                            Some(paths.prefilter(*slot, vec![needle.as_bytes().to_vec()]))
                        }
                        _ => None,
                    };
                    Node::Text(op, Box::new(text), needle, filter)
                }
                ("size", Some(target), 0) => Node::Size(Box::new(compile(&target.expr, paths)?)),
                ("size", None, 1) => Node::Size(Box::new(compile(&args[0].expr, paths)?)),
                ("double", None, 1) => Node::ToDouble(Box::new(compile(&args[0].expr, paths)?)),
                ("int", None, 1) => Node::ToInt(Box::new(compile(&args[0].expr, paths)?)),
                _ => return None,
            }
        }
        _ => return None,
    })
}

fn lit(literal: &LiteralValue) -> Option<Lit> {
    Some(match literal {
        LiteralValue::Boolean(b) => Lit::Bool(*b.inner()),
        LiteralValue::Int(i) => Lit::Int(*i.inner()),
        LiteralValue::Double(d) => Lit::Float(*d.inner()),
        LiteralValue::String(s) => Lit::Str(s.inner().to_owned()),
        LiteralValue::Null => Lit::Null,
        LiteralValue::Bytes(_) | LiteralValue::UInt(_) => return None,
    })
}

fn cmp(op: &str) -> Option<Cmp> {
    Some(match op {
        operators::EQUALS => Cmp::Eq,
        operators::NOT_EQUALS => Cmp::Ne,
        operators::LESS => Cmp::Lt,
        operators::LESS_EQUALS => Cmp::Le,
        operators::GREATER => Cmp::Gt,
        operators::GREATER_EQUALS => Cmp::Ge,
        _ => return None,
    })
}

/// `text.matches("<literal pattern>")`. A pattern that does not compile is left to the
/// interpreter (whose error names it).
fn matches(text: Node, pattern: &Expr, paths: &mut Paths) -> Option<Node> {
    let Expr::Literal(LiteralValue::String(pattern)) = pattern else {
        return None;
    };
    let regex = super::functions::compiled(pattern.inner()).ok()?;
    let filter = match (&text, required_literals(pattern.inner())) {
        (Node::Path(slot), Some(literals)) => Some(paths.prefilter(*slot, literals)),
        _ => None,
    };
    Some(Node::Matches(Box::new(text), regex, filter))
}

/// Literals one of which every match of `pattern` starts with, if the pattern has such a
/// finite set (no empty literal): text containing none of them cannot match.
fn required_literals(pattern: &str) -> Option<Vec<Vec<u8>>> {
    use regex_syntax::hir::literal::{ExtractKind, Extractor};
    let hir = regex_syntax::Parser::new().parse(pattern).ok()?;
    let seq = Extractor::new().kind(ExtractKind::Prefix).extract(&hir);
    let literals: Vec<Vec<u8>> = seq
        .literals()?
        .iter()
        .map(|l| l.as_bytes().to_vec())
        .collect();
    (!literals.is_empty() && literals.iter().all(|l| !l.is_empty())).then_some(literals)
}

/// `message.text` → (0, ["text"]): a root variable followed by field selections.
fn path(expr: &Expr) -> Option<(usize, Vec<String>)> {
    let mut fields = Vec::new();
    let mut expr = expr;
    loop {
        match expr {
            Expr::Ident(name) => {
                let root = ROOTS.iter().position(|r| r == name)?;
                fields.reverse();
                return Some((root, fields));
            }
            Expr::Select(select) if !select.test => {
                fields.push(select.field.clone());
                expr = &select.operand.expr;
            }
            _ => return None,
        }
    }
}

impl Node {
    /// The expression's value as a bool; `None` when only the interpreter can tell (an error,
    /// a non-bool result, a type the fast path does not handle).
    pub fn eval_bool(&self, roots: &Ctx<'_>) -> Option<bool> {
        match self.eval(roots)? {
            V::Bool(b) => Some(b),
            _ => None,
        }
    }

    fn eval<'a>(&'a self, roots: &Ctx<'a>) -> Option<V<'a>> {
        Some(match self {
            Node::Lit(lit) => lit.value(),
            Node::Path(slot) => roots.slots[*slot].clone()?,
            Node::Has(slot, field) => V::Bool(match roots.slots[*slot].as_ref()? {
                V::Map(map) => map.contains_key(field),
                V::Json(Value::Object(map)) => map.contains_key(field),
                _ => return None,
            }),
            // The right side is only evaluated when the left one does not decide.
            Node::And(a, b) => match a.eval_bool(roots) {
                Some(false) => V::Bool(false),
                left => match (left, b.eval_bool(roots)) {
                    (_, Some(false)) => V::Bool(false),
                    (Some(true), Some(true)) => V::Bool(true),
                    _ => return None,
                },
            },
            Node::Or(a, b) => match a.eval_bool(roots) {
                Some(true) => V::Bool(true),
                left => match (left, b.eval_bool(roots)) {
                    (_, Some(true)) => V::Bool(true),
                    (Some(false), Some(false)) => V::Bool(false),
                    _ => return None,
                },
            },
            Node::Not(a) => V::Bool(!a.eval_bool(roots)?),
            Node::Cond(c, a, b) => {
                if c.eval_bool(roots)? {
                    a.eval(roots)?
                } else {
                    b.eval(roots)?
                }
            }
            Node::Cmp(op, a, b) => V::Bool(compare(*op, &a.eval(roots)?, &b.eval(roots)?)?),
            Node::Matches(text, regex, filter) => match text.eval(roots)? {
                V::Str(s) => {
                    let ruled_out = filter.is_some_and(|(filter, index)| {
                        roots.present[filter]
                            .as_ref()
                            .is_some_and(|present| !present[index])
                    });
                    V::Bool(!ruled_out && regex.is_match(s))
                }
                _ => return None,
            },
            Node::Text(op, text, needle, filter) => match text.eval(roots)? {
                V::Str(s) => V::Bool(match op {
                    TextOp::Contains => !roots.ruled_out(*filter) && s.contains(needle.as_str()),
                    TextOp::StartsWith => s.starts_with(needle.as_str()),
                    TextOp::EndsWith => s.ends_with(needle.as_str()),
                }),
                _ => return None,
            },
            Node::In(value, items) => {
                let value = value.eval(roots)?;
                let mut found = false;
                for item in items {
                    if compare(Cmp::Eq, &value, &item.value())? {
                        found = true;
                        break;
                    }
                }
                V::Bool(found)
            }
            Node::InList(value, list) => {
                let value = value.eval(roots)?;
                let V::Json(Value::Array(items)) = list.eval(roots)? else {
                    return None;
                };
                let mut found = false;
                for item in items {
                    if compare(Cmp::Eq, &value, &json(item))? {
                        found = true;
                        break;
                    }
                }
                V::Bool(found)
            }
            Node::Size(value) => match value.eval(roots)? {
                V::Str(s) => V::Int(i64::try_from(s.chars().count()).ok()?),
                V::Json(Value::Array(items)) => V::Int(i64::try_from(items.len()).ok()?),
                V::Json(Value::Object(map)) => V::Int(i64::try_from(map.len()).ok()?),
                V::Map(map) => V::Int(i64::try_from(map.len()).ok()?),
                _ => return None,
            },
            Node::ToDouble(value) => match value.eval(roots)? {
                V::Float(f) => V::Float(f),
                V::Int(i) => V::Float(i as f64),
                _ => return None,
            },
            Node::ToInt(value) => match value.eval(roots)? {
                V::Int(i) => V::Int(i),
                _ => return None,
            },
        })
    }
}

impl Lit {
    fn value(&self) -> V<'_> {
        match self {
            Lit::Bool(b) => V::Bool(*b),
            Lit::Int(i) => V::Int(*i),
            Lit::Float(f) => V::Float(*f),
            Lit::Str(s) => V::Str(s),
            Lit::Null => V::Null,
        }
    }
}

/// JSON → value, as the interpreter's conversion does: whole numbers are ints.
fn json(value: &Value) -> V<'_> {
    match value {
        Value::Null => V::Null,
        Value::Bool(b) => V::Bool(*b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => V::Int(i),
            None => match n.as_f64() {
                Some(f) => V::Float(f),
                None => V::Json(value),
            },
        },
        Value::String(s) => V::Str(s),
        Value::Array(_) | Value::Object(_) => V::Json(value),
    }
}

/// Same-type comparisons only; anything else is for the interpreter.
fn compare(op: Cmp, a: &V<'_>, b: &V<'_>) -> Option<bool> {
    use std::cmp::Ordering;
    let ordering = match (a, b) {
        (V::Int(a), V::Int(b)) => a.cmp(b),
        (V::Float(a), V::Float(b)) => a.partial_cmp(b)?,
        (V::Str(a), V::Str(b)) => a.cmp(b),
        (V::Bool(a), V::Bool(b)) => a.cmp(b),
        (V::Null, V::Null) => Ordering::Equal,
        _ => return None,
    };
    Some(match op {
        Cmp::Eq => ordering == Ordering::Equal,
        Cmp::Ne => ordering != Ordering::Equal,
        // Ordering between bools or nulls: leave it to the interpreter.
        _ if matches!(a, V::Bool(_) | V::Null) => return None,
        Cmp::Lt => ordering == Ordering::Less,
        Cmp::Le => ordering != Ordering::Greater,
        Cmp::Gt => ordering == Ordering::Greater,
        Cmp::Ge => ordering != Ordering::Less,
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use serde_json::{Value, json};

    use super::*;

    /// Inputs with the shapes the router builds: present and missing attributes, ints and
    /// doubles, empty and non-ASCII text.
    fn inputs() -> Vec<[Value; 4]> {
        let message = |text: &str, channel: &str| {
            json!({"channel": channel, "channel_id": "c", "kind": "webchat", "sender": "v",
                   "sender_name": "", "text": text, "subject": "", "attachments": [],
                   "auto_submitted": false, "metadata": {}})
        };
        let signals = |sentiment: f64, exclamations: u32, language: &str| {
            json!({"language": language, "language_confidence": 0.9, "sentiment": sentiment,
                   "urgent_keywords": ["urgent"], "caps_ratio": 0.7, "exclamations": exclamations,
                   "attachments": 0, "repeat_contacts": 2})
        };
        let customer = |attributes: Value| json!({"id": "c-1", "attributes": attributes});
        let conversation = json!({"id": "k", "message_count": 3, "channels": ["email"]});
        vec![
            [
                message("I need a REFUND now!!", "webchat"),
                customer(json!({"tier": "vip", "lifetime_value": 12000, "churn_risk": 0.8})),
                conversation.clone(),
                signals(-0.6, 2, "en"),
            ],
            [
                message("Hola, la aplicación no funciona", "email"),
                customer(json!({})),
                conversation.clone(),
                signals(0.0, 0, "es"),
            ],
            [
                message("", "webchat"),
                customer(json!({"tier": 3, "churn_risk": 1, "lifetime_value": 12000.5})),
                conversation,
                signals(0.4, 5, ""),
            ],
        ]
    }

    const EXPRESSIONS: &[&str] = &[
        r#"message.text.matches("(?i)\\b(refund|reembolso)\\b")"#,
        r#"matches(message.text, "no funciona")"#,
        r#"message.text.contains("REFUND")"#,
        r#"message.text.startsWith("Hola") || message.text.endsWith("!!")"#,
        r#"message.channel == "email" && signals.language == "es""#,
        r#"message.channel != "email""#,
        r#"message.channel in ["email", "sms"]"#,
        r#"has(customer.attributes.tier) && customer.attributes.tier == "vip""#,
        r#"customer.attributes.tier == "vip""#,
        r#"has(customer.attributes.churn_risk) && double(customer.attributes.churn_risk) >= 0.7"#,
        r#"customer.attributes.lifetime_value >= 10000"#,
        r#"customer.attributes.lifetime_value > 10000.0"#,
        r#"signals.sentiment < -0.3 && message.channel == "webchat""#,
        r#"signals.caps_ratio > 0.6 && signals.exclamations >= 2"#,
        r#"signals.exclamations > 1.5"#,
        r#"size(message.text) > 10"#,
        r#"message.text.size() == 0"#,
        r#"size(signals.urgent_keywords) > 0"#,
        r#"!(signals.repeat_contacts < 2)"#,
        r#"signals.repeat_contacts >= 2 ? signals.sentiment < 0.0 : false"#,
        r#"conversation.message_count > 2 && "email" in conversation.channels"#,
        r#"int(signals.exclamations) == 2"#,
        r#"customer.attributes.missing == "x" || true"#,
        r#"customer.attributes.missing == "x" && false"#,
        r#"customer.attributes.missing == "x""#,
        r#"message.text"#,
        r#"signals.language == 1"#,
        r#"-1 < signals.sentiment"#,
    ];

    /// Wherever the fast path answers, the interpreter gives the same boolean.
    #[test]
    fn the_fast_path_agrees_with_the_interpreter() {
        let env = Arc::new(super::super::functions::environment());
        let mut answered = 0;
        for source in EXPRESSIONS {
            let program = env
                .compile(source)
                .unwrap_or_else(|e| panic!("{source}: {e}"));
            let mut paths = Paths::default();
            let node = compile(&program.expression().expr, &mut paths);
            for roots in inputs() {
                let context = cel::Context::with_env(env.clone());
                let mut scope = context.new_inner_scope();
                for (name, value) in ROOTS.iter().zip(&roots) {
                    scope.add_variable_from_value(*name, crate::router::decide::to_cel(value));
                }
                let interpreted = program.execute(&scope);
                let Some(node) = &node else { continue };
                paths.finish();
                let slots = paths.context_json(&roots);
                if let Some(fast) = node.eval_bool(&slots) {
                    answered += 1;
                    assert_eq!(
                        interpreted,
                        Ok(cel::Value::Bool(fast)),
                        "`{source}` on {roots:?}"
                    );
                }
            }
        }
        // Most of the (expression, input) pairs take the fast path.
        assert!(answered >= 60, "only {answered} answered by the fast path");
    }

    #[test]
    fn common_rule_shapes_compile_to_the_fast_path_and_others_do_not() {
        let env = super::super::functions::environment();
        let fast = |source: &str| {
            let program = env.compile(source).unwrap();
            compile(&program.expression().expr, &mut Paths::default()).is_some()
        };
        for source in &EXPRESSIONS[..22] {
            assert!(fast(source), "`{source}` should take the fast path");
        }
        for source in [
            r#"signals.urgent_keywords.exists(k, k == "urgent")"#,
            r#"message.text.matches(customer.attributes.pattern)"#,
            r#"[1, 2].size() == 2"#,
            r#"message.text + "x" == "y""#,
        ] {
            assert!(!fast(source), "`{source}` is for the interpreter");
        }
    }

    #[test]
    fn logic_keeps_cel_error_absorption_and_leaves_errors_to_the_interpreter() {
        let env = super::super::functions::environment();
        let roots = &inputs()[1];
        let eval = |source: &str| {
            let program = env.compile(source).unwrap();
            let mut paths = Paths::default();
            let node = compile(&program.expression().expr, &mut paths).unwrap();
            paths.finish();
            node.eval_bool(&paths.context_json(roots))
        };
        // `customer.attributes.tier` is missing: an error in CEL.
        assert_eq!(eval(r#"customer.attributes.tier == "vip""#), None);
        assert_eq!(
            eval(r#"customer.attributes.tier == "vip" && false"#),
            Some(false)
        );
        assert_eq!(
            eval(r#"false && customer.attributes.tier == "vip""#),
            Some(false)
        );
        assert_eq!(
            eval(r#"customer.attributes.tier == "vip" || true"#),
            Some(true)
        );
        assert_eq!(eval(r#"customer.attributes.tier == "vip" || false"#), None);
        // An int compared with a double: CEL's own rules decide.
        assert_eq!(eval("signals.exclamations > 1.5"), None);
    }

    /// The fields read straight from the input give what the JSON view gives.
    #[test]
    fn typed_paths_agree_with_the_json_view() {
        use crate::router::decide::{ConversationView, CustomerView, Signals};
        use switchboard_channel::{ChannelRef, NormalizedMessage, Sender};

        let env = super::super::functions::environment();
        let mut paths = Paths::default();
        for source in [
            "message.channel",
            "message.channel_id",
            "message.kind",
            "message.sender",
            "message.sender_name",
            "message.text",
            "message.subject",
            "message.auto_submitted",
            "message.metadata",
            "message.nope",
            "customer.attributes",
            "customer.attributes.tier",
            "customer.attributes.nested.level",
            "customer.attributes.missing",
            "customer.id",
            "customer.contacts_last_24h",
            "customer.identities",
            "conversation.id",
            "signals.language",
            "signals.language_confidence",
            "signals.sentiment",
            "signals.caps_ratio",
            "signals.exclamations",
            "signals.attachments",
            "signals.repeat_contacts",
            "signals.urgent_keywords",
            "signals.nope",
        ] {
            let program = env.compile(source).unwrap();
            compile(&program.expression().expr, &mut paths).expect(source);
        }
        let mut message = NormalizedMessage {
            message_id: NormalizedMessage::stable_id("c", "1"),
            channel: ChannelRef {
                id: "site".into(),
                kind: "webchat".into(),
            },
            external_id: "1".into(),
            thread_key: None,
            sender: Sender {
                kind: "email".into(),
                address: "d@example.com".into(),
                name: None,
            },
            subject: None,
            text: "Hola, ¿qué tal?".into(),
            attachments: vec![],
            received_at: time::OffsetDateTime::UNIX_EPOCH,
            auto_submitted: false,
            metadata: Default::default(),
        };
        let mut customer = CustomerView {
            id: "c-1".into(),
            contacts_last_24h: 2,
            ..Default::default()
        };
        let conversation = ConversationView::default();
        let mut signals = Signals {
            language: "es".into(),
            language_confidence: 1.0,
            sentiment: -0.25,
            caps_ratio: 0.0,
            exclamations: 3,
            ..Default::default()
        };
        for round in 0..3 {
            if round == 1 {
                message.sender.name = Some("Dana".into());
                message.subject = Some("Re: order".into());
                message.auto_submitted = true;
                customer.attributes.insert("tier".into(), json!("vip"));
                customer
                    .attributes
                    .insert("nested".into(), json!({"level": 2.5}));
                signals.sentiment = f64::NAN;
                signals.urgent_keywords = vec!["urgent".into()];
            }
            if round == 2 {
                customer.attributes.insert("tier".into(), json!(3));
                signals.sentiment = 1.0;
            }
            let input = crate::router::decide::Input {
                now: time::OffsetDateTime::UNIX_EPOCH,
                message: &message,
                customer: &customer,
                conversation: &conversation,
                signals: &signals,
            };
            let roots = crate::router::decide::json_variables(&input);
            let lazy = OnceCell::new();
            let typed = paths.resolve(&input, &lazy, || {
                crate::router::decide::json_variables(&input)
            });
            let from_json = paths.resolve_json(&roots);
            for (((root, fields), a), b) in paths.0.iter().zip(&typed).zip(&from_json) {
                // A map read directly and the same map through JSON are the same value.
                let same = match (a, b) {
                    (Some(V::Map(m)), Some(V::Json(Value::Object(n)))) => *m == n,
                    _ => a == b,
                };
                assert!(
                    same,
                    "{}.{}: {a:?} vs {b:?} (round {round})",
                    ROOTS[*root],
                    fields.join(".")
                );
            }
        }
    }

    /// The literal prefilter never rules out a text the regex matches.
    #[test]
    fn the_literal_prefilter_agrees_with_the_regex() {
        let patterns = [
            r"(?i)\b(refund|chargeback|invoice)\b",
            r"(?i)rückerstattung|remboursement|prélèvement",
            r"(?i)ÉTÉ",
            r"colou?r",
            r"^Hello",
            r"\d{4,}",
            r"(?i)k",
            r"urgent|",
            r"(?i)\b(down|outage|error|crash(ed)?|broken)\b",
            r"[Pp]anne|ne fonctionne",
        ];
        let texts = [
            "I need a REFUND",
            "Invoice #1234 is wrong",
            "Rückerstattung bitte",
            "RÜCKERSTATTUNG",
            "Un PRÉLÈVEMENT en trop",
            "en été",
            "EN ÉTÉ",
            "the color red",
            "the colour red",
            "Hello there",
            "well, Hello",
            "order 12345",
            "order 12",
            "Kelvin \u{212A}",
            "ok",
            "nothing to see",
            "the site is DOWN",
            "it crashed",
            "crash",
            "Panne générale",
            "",
            "ça ne fonctionne pas",
        ];
        let env = super::super::functions::environment();
        let mut paths = Paths::default();
        let nodes: Vec<(String, Node)> = patterns
            .iter()
            .map(|pattern| {
                let source = format!("message.text.matches({pattern:?})");
                let program = env
                    .compile(&source)
                    .unwrap_or_else(|e| panic!("{source}: {e}"));
                let node = compile(&program.expression().expr, &mut paths).expect("fast path");
                (pattern.to_string(), node)
            })
            .collect();
        let needles = ["REFUND", "refund", "été", "crash", "12 "];
        let contains: Vec<(String, Node)> = needles
            .iter()
            .map(|needle| {
                let source = format!("message.text.contains({needle:?})");
                let program = env.compile(&source).unwrap();
                let node = compile(&program.expression().expr, &mut paths).expect("fast path");
                assert!(
                    matches!(node, Node::Text(_, _, _, Some(_))),
                    "{source} is prefiltered"
                );
                (needle.to_string(), node)
            })
            .collect();
        paths.finish();
        assert!(!paths.1.built.is_empty(), "the patterns share a prefilter");
        let prefiltered = nodes
            .iter()
            .filter(|(_, n)| matches!(n, Node::Matches(_, _, Some(_))))
            .count();
        assert!(prefiltered >= 6, "only {prefiltered} patterns prefiltered");
        for text in texts {
            let roots = [json!({"text": text}), json!({}), json!({}), json!({})];
            let context = paths.context_json(&roots);
            for (needle, node) in &contains {
                assert_eq!(
                    node.eval_bool(&context),
                    Some(text.contains(needle.as_str())),
                    "contains {needle:?} on {text:?}"
                );
            }
            for (pattern, node) in &nodes {
                let expected = Regex::new(pattern).unwrap().is_match(text);
                assert_eq!(
                    node.eval_bool(&context),
                    Some(expected),
                    "`{pattern}` on {text:?}"
                );
            }
        }
    }
}
