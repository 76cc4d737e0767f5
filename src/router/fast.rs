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

use cel::common::ast::{Expr, LiteralValue, operators};
use regex::Regex;
use serde_json::Value;

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
    Matches(Box<Node>, Arc<Regex>),
    Text(TextOp, Box<Node>, String),
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
enum V<'a> {
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(&'a str),
    Null,
    Json(&'a Value),
}

/// The root variables, in the order [`compile`] numbers them.
pub const ROOTS: [&str; 4] = ["message", "customer", "conversation", "signals"];

/// The distinct field paths of a rule set's expressions, each resolved once per decision.
#[derive(Debug, Default)]
pub struct Paths(Vec<(usize, Vec<String>)>);

impl Paths {
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

    /// Every path's value in `roots` (`None`: a field is missing or not an object on the way).
    pub fn resolve<'a>(&self, roots: &'a [Value; 4]) -> Vec<Option<&'a Value>> {
        self.0
            .iter()
            .map(|(root, fields)| {
                let mut value = &roots[*root];
                for field in fields {
                    value = value.as_object()?.get(field)?;
                }
                Some(value)
            })
            .collect()
    }
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
                ("matches", Some(target), 1) => Node::Matches(
                    Box::new(compile(&target.expr, paths)?),
                    regex_arg(&args[0].expr)?,
                ),
                ("matches", None, 2) => Node::Matches(
                    Box::new(compile(&args[0].expr, paths)?),
                    regex_arg(&args[1].expr)?,
                ),
                (name @ ("contains" | "startsWith" | "endsWith"), Some(target), 1) => {
                    let Expr::Literal(LiteralValue::String(needle)) = &args[0].expr else {
                        return None;
                    };
                    let op = match name {
                        "contains" => TextOp::Contains,
                        "startsWith" => TextOp::StartsWith,
                        _ => TextOp::EndsWith,
                    };
                    Node::Text(
                        op,
                        Box::new(compile(&target.expr, paths)?),
                        needle.inner().to_owned(),
                    )
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

/// A literal pattern that compiles; an invalid one is left to the interpreter (whose error
/// names it).
fn regex_arg(expr: &Expr) -> Option<Arc<Regex>> {
    let Expr::Literal(LiteralValue::String(pattern)) = expr else {
        return None;
    };
    super::functions::compiled(pattern.inner()).ok()
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
    pub fn eval_bool(&self, roots: &[Option<&Value>]) -> Option<bool> {
        match self.eval(roots)? {
            V::Bool(b) => Some(b),
            _ => None,
        }
    }

    fn eval<'a>(&'a self, roots: &[Option<&'a Value>]) -> Option<V<'a>> {
        Some(match self {
            Node::Lit(lit) => lit.value(),
            Node::Path(slot) => json(roots[*slot]?),
            Node::Has(slot, field) => V::Bool(roots[*slot]?.as_object()?.contains_key(field)),
            Node::And(a, b) => match (a.eval_bool(roots), b.eval_bool(roots)) {
                (Some(false), _) | (_, Some(false)) => V::Bool(false),
                (Some(true), Some(true)) => V::Bool(true),
                _ => return None,
            },
            Node::Or(a, b) => match (a.eval_bool(roots), b.eval_bool(roots)) {
                (Some(true), _) | (_, Some(true)) => V::Bool(true),
                (Some(false), Some(false)) => V::Bool(false),
                _ => return None,
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
            Node::Matches(text, regex) => match text.eval(roots)? {
                V::Str(s) => V::Bool(regex.is_match(s)),
                _ => return None,
            },
            Node::Text(op, text, needle) => match text.eval(roots)? {
                V::Str(s) => V::Bool(match op {
                    TextOp::Contains => s.contains(needle.as_str()),
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
                let slots = paths.resolve(&roots);
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
            node.eval_bool(&paths.resolve(roots))
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
}
