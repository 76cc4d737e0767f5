//! Reading the config: parse the TOML keeping positions, apply environment overrides and
//! `${VAR}` interpolation, deserialize, validate, and map every problem back to `file:line:col`.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml_edit::{DocumentMut, Item, Value};

use super::Config;

/// Prefix of environment overrides: `SWITCHBOARD__BUS__URL` sets `[bus] url`.
const ENV_PREFIX: &str = "SWITCHBOARD__";

/// A configuration problem with where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// `file:line:col`, `env SWITCHBOARD__X__Y`, or the file alone.
    pub location: String,
    /// Dotted key path (`channels.0.secret`), empty for the document itself.
    pub key: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            write!(f, "{}: {}", self.location, self.message)
        } else {
            write!(f, "{}: `{}` {}", self.location, self.key, self.message)
        }
    }
}

/// Every problem found, in file order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problems(pub Vec<Problem>);

impl fmt::Display for Problems {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, problem) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{problem}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Problems {}

/// A loaded configuration and where it came from.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub config: Config,
    /// The file read, if any (none: built-in defaults plus environment).
    pub path: Option<PathBuf>,
    /// Where a key path was written, for later checks (channels) to report positions.
    pub locations: Locations,
}

impl Loaded {
    /// The directory relative paths in the config are taken from.
    pub fn base_dir(&self) -> Option<&Path> {
        self.path.as_deref().and_then(Path::parent)
    }

    /// Turns `(key, message)` pairs from a later check into located problems.
    pub fn problems(&self, pairs: Vec<(String, String)>) -> Vec<Problem> {
        pairs
            .into_iter()
            .map(|(key, message)| Problem {
                location: self.locations.locate(&key),
                key,
                message,
            })
            .collect()
    }
}

/// Key path → position, plus which keys came from the environment.
#[derive(Debug, Clone, Default)]
pub struct Locations {
    file: String,
    positions: HashMap<String, (usize, usize)>,
    from_env: HashMap<String, String>,
}

impl Locations {
    /// The most precise location known for `key`: the key itself, else its closest parent.
    pub fn locate(&self, key: &str) -> String {
        let mut path = key;
        loop {
            if let Some(var) = self.from_env.get(path) {
                return format!("env {var}");
            }
            if let Some((line, col)) = self.positions.get(path) {
                return format!("{}:{line}:{col}", self.file);
            }
            match path.rfind('.') {
                Some(dot) => path = &path[..dot],
                None => return self.file.clone(),
            }
        }
    }
}

/// Loads the config file at `path` (or, with `None`, the first of the default paths that
/// exists, else built-in defaults) with overrides from `env`.
pub fn load(path: Option<&Path>, env: &HashMap<String, String>) -> Result<Loaded, Problems> {
    let path = match path {
        Some(path) => Some(path.to_path_buf()),
        None => super::DEFAULT_PATHS
            .iter()
            .map(PathBuf::from)
            .find(|candidate| candidate.is_file()),
    };
    let Some(path) = path else {
        return load_text(None, "", env);
    };
    let text = std::fs::read_to_string(&path).map_err(|error| {
        Problems(vec![Problem {
            location: path.display().to_string(),
            key: String::new(),
            message: format!("cannot read the config file: {error}"),
        }])
    })?;
    load_text(Some(path), &text, env)
}

/// Loads a config from its text; `path` names it in problems.
pub fn load_text(
    path: Option<PathBuf>,
    text: &str,
    env: &HashMap<String, String>,
) -> Result<Loaded, Problems> {
    let file = path
        .as_ref()
        .map_or_else(|| "<defaults>".to_owned(), |p| p.display().to_string());
    let lines = LineIndex::new(text);
    let parsed = toml_edit::Document::parse(text.to_owned()).map_err(|error| {
        let location = match error.span() {
            Some(span) => lines.locate(&file, span.start),
            None => file.clone(),
        };
        Problems(vec![Problem {
            location,
            key: String::new(),
            message: format!("invalid TOML: {}", error.message()),
        }])
    })?;

    let mut locations = Locations {
        file: file.clone(),
        ..Locations::default()
    };
    index_table(parsed.as_table(), "", &lines, &mut locations.positions);
    let mut document = parsed.into_mut();
    let mut problems = Vec::new();

    apply_env(&mut document, env, &mut locations, &mut problems);
    // Under systemd (StateDirectory=), the default database lives in the state directory.
    if let Some(state) = env.get("STATE_DIRECTORY").filter(|s| !s.is_empty())
        && document.get("store").and_then(|s| s.get("url")).is_none()
    {
        let dir = state.split(':').next().unwrap_or(state);
        let url = format!("sqlite://{}/switchboard.db", dir.trim_end_matches('/'));
        let _ = set_path(
            document.as_table_mut(),
            &["store".to_owned(), "url".to_owned()],
            Value::from(url),
        );
    }
    interpolate_table(document.as_table_mut(), "", env, &locations, &mut problems);

    // serde stops at the first value of the wrong type: report it, take the key out and try
    // again, so one `check` lists every type error (the key falls back to its default for the
    // semantic checks, which skip keys already reported).
    let mut unknown: Vec<String> = Vec::new();
    let mut removed: Vec<String> = Vec::new();
    let mut config: Option<Config> = None;
    for _ in 0..MAX_TYPE_ERRORS {
        let mut seen = Vec::new();
        let deserializer = toml_edit::de::Deserializer::from(document.clone());
        let mut on_unknown = |path: serde_ignored::Path<'_>| seen.push(ignored_path(&path));
        let ignoring = serde_ignored::Deserializer::new(deserializer, &mut on_unknown);
        let result: Result<Config, _> = serde_path_to_error::deserialize(ignoring);
        for key in seen {
            if !unknown.contains(&key) {
                unknown.push(key);
            }
        }
        let error = match result {
            Ok(parsed) => {
                config = Some(parsed);
                break;
            }
            Err(error) => error,
        };
        let key = error_path(error.path());
        let message = clean_message(&error.inner().to_string());
        // A required key we took out ourselves was already reported as mistyped.
        let missing = message
            .strip_prefix("missing field `")
            .and_then(|rest| rest.split('`').next())
            .map(|field| join(&key, field));
        if missing.as_ref().is_some_and(|m| removed.contains(m)) {
            break;
        }
        problems.push(Problem {
            location: locations.locate(&key),
            message,
            key: key.clone(),
        });
        let segments: Vec<String> = key.split('.').map(str::to_owned).collect();
        if missing.is_some() || key.is_empty() || !remove_path(document.as_table_mut(), &segments) {
            break;
        }
        removed.push(key);
    }
    for key in unknown {
        problems.push(Problem {
            location: locations.locate(&key),
            message: "is not a known key (check the spelling; see deploy/switchboard.example.toml)"
                .to_owned(),
            key,
        });
    }
    if let Some(config) = &config {
        for (key, message) in config.validate() {
            // A value already reported (say, an unset variable) is not judged again.
            if problems.iter().any(|p| p.key == key) {
                continue;
            }
            problems.push(Problem {
                location: locations.locate(&key),
                key,
                message,
            });
        }
    }
    match config {
        Some(config) if problems.is_empty() => Ok(Loaded {
            config,
            path,
            locations,
        }),
        _ => {
            problems.sort_by_key(|p| position_order(&p.location));
            Err(Problems(problems))
        }
    }
}

/// Sort key that keeps file positions in order and everything else after them.
fn position_order(location: &str) -> (usize, usize) {
    let mut parts = location.rsplitn(3, ':');
    let col = parts.next().and_then(|c| c.parse().ok());
    let line = parts.next().and_then(|l| l.parse().ok());
    match (line, col) {
        (Some(line), Some(col)) => (line, col),
        _ => (usize::MAX, 0),
    }
}

/// The toml deserializer's messages end with position text we replace by our own location.
fn clean_message(message: &str) -> String {
    message.trim().lines().next().unwrap_or("").to_owned()
}

/// Records the position of every key and table below `table`.
fn index_table(
    table: &toml_edit::Table,
    prefix: &str,
    lines: &LineIndex,
    out: &mut HashMap<String, (usize, usize)>,
) {
    if let Some(span) = table.span() {
        out.entry(prefix.to_owned())
            .or_insert_with(|| lines.position(span.start));
    }
    for (key, item) in table.iter() {
        let path = join(prefix, key);
        if let Some(span) = table.key(key).and_then(|k| k.span()) {
            out.insert(path.clone(), lines.position(span.start));
        }
        index_item(item, &path, lines, out);
    }
}

fn index_item(
    item: &Item,
    path: &str,
    lines: &LineIndex,
    out: &mut HashMap<String, (usize, usize)>,
) {
    match item {
        Item::Table(table) => index_table(table, path, lines, out),
        Item::ArrayOfTables(array) => {
            for (index, table) in array.iter().enumerate() {
                index_table(table, &join(path, &index.to_string()), lines, out);
            }
        }
        Item::Value(Value::InlineTable(table)) => {
            for (key, value) in table.iter() {
                let child = join(path, key);
                if let Some(span) = table.key(key).and_then(|k| k.span()) {
                    out.insert(child.clone(), lines.position(span.start));
                }
                index_item(&Item::Value(value.clone()), &child, lines, out);
            }
        }
        Item::Value(Value::Array(array)) => {
            for (index, value) in array.iter().enumerate() {
                let child = join(path, &index.to_string());
                if let Some(span) = value.span() {
                    out.insert(child.clone(), lines.position(span.start));
                }
            }
        }
        _ => {}
    }
}

fn join(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.to_owned()
    } else {
        format!("{prefix}.{key}")
    }
}

/// Applies `SWITCHBOARD__SECTION__KEY=value` overrides. A value is typed like the default at
/// that key (a number stays a number), otherwise it is a string.
fn apply_env(
    document: &mut DocumentMut,
    env: &HashMap<String, String>,
    locations: &mut Locations,
    problems: &mut Vec<Problem>,
) {
    let defaults = toml::Value::try_from(Config::default()).ok();
    let mut vars: Vec<(&String, &String)> = env
        .iter()
        .filter(|(name, _)| name.starts_with(ENV_PREFIX))
        .collect();
    vars.sort();
    for (name, raw) in vars {
        let segments: Vec<String> = name[ENV_PREFIX.len()..]
            .split("__")
            .map(str::to_ascii_lowercase)
            .collect();
        if segments.iter().any(String::is_empty) {
            problems.push(Problem {
                location: format!("env {name}"),
                key: String::new(),
                message: "is not of the form SWITCHBOARD__SECTION__KEY".to_owned(),
            });
            continue;
        }
        let key = segments.join(".");
        // Typed like the default at that key; where there is none (channel entries), like the
        // value the file sets there, or as a number for a channel's `max_body_bytes`.
        let typed_like_default = defaults
            .as_ref()
            .and_then(|d| lookup(d, &segments))
            .map(|d| !d.is_str());
        let typed_like_file = || file_value_is_typed(document.as_table(), &segments);
        let channel_number = segments.first().is_some_and(|s| s == "channels")
            && segments.last().is_some_and(|s| s == "max_body_bytes");
        let typed = typed_like_default
            .or_else(typed_like_file)
            .unwrap_or(channel_number);
        let value = if typed {
            raw.parse::<Value>()
                .unwrap_or_else(|_| Value::from(raw.as_str()))
        } else {
            Value::from(raw.as_str())
        };
        match set_path(document.as_table_mut(), &segments, value) {
            Ok(()) => {
                locations.from_env.insert(key, name.clone());
            }
            Err(message) => problems.push(Problem {
                location: format!("env {name}"),
                key,
                message,
            }),
        }
    }
}

fn lookup<'a>(value: &'a toml::Value, segments: &[String]) -> Option<&'a toml::Value> {
    segments
        .iter()
        .try_fold(value, |value, segment| match value {
            toml::Value::Table(table) => table.get(segment),
            toml::Value::Array(array) => array.get(segment.parse::<usize>().ok()?),
            _ => None,
        })
}

/// Sets `segments` (a key path; an index selects a `[[table]]` entry) to `value`.
fn set_path(table: &mut toml_edit::Table, segments: &[String], value: Value) -> Result<(), String> {
    let (first, rest) = segments.split_first().ok_or("names no key")?;
    if rest.is_empty() {
        table.insert(first, Item::Value(value));
        return Ok(());
    }
    match table.entry(first).or_insert(toml_edit::table()) {
        Item::Table(child) => set_path(child, rest, value),
        Item::ArrayOfTables(array) => {
            let (index, rest) = rest.split_first().ok_or("names no key")?;
            let index: usize = index
                .parse()
                .map_err(|_| format!("`{first}` is a list: the next part must be an index"))?;
            let entry = array
                .get_mut(index)
                .ok_or_else(|| format!("`{first}` has no entry {index}"))?;
            if rest.is_empty() {
                Err("names a whole entry: add a key".to_owned())
            } else {
                set_path(entry, rest, value)
            }
        }
        _ => Err(format!("`{first}` is not a table")),
    }
}

/// Whether the file sets a non-string value at `segments` (`None`: it sets nothing there).
fn file_value_is_typed(table: &dyn toml_edit::TableLike, segments: &[String]) -> Option<bool> {
    let (first, rest) = segments.split_first()?;
    let item = table.get(first)?;
    if rest.is_empty() {
        return Some(!item.is_str());
    }
    match item {
        Item::Table(child) => file_value_is_typed(child, rest),
        Item::Value(toml_edit::Value::InlineTable(child)) => file_value_is_typed(child, rest),
        Item::ArrayOfTables(array) => {
            let (index, rest) = rest.split_first()?;
            file_value_is_typed(array.get(index.parse().ok()?)?, rest)
        }
        _ => None,
    }
}

/// Type errors reported by one load at most.
const MAX_TYPE_ERRORS: usize = 32;

/// Removes the key at `segments` (list entries by index); false if there is none.
fn remove_path(table: &mut dyn toml_edit::TableLike, segments: &[String]) -> bool {
    let Some((first, rest)) = segments.split_first() else {
        return false;
    };
    if rest.is_empty() {
        return table.remove(first).is_some();
    }
    match table.get_mut(first) {
        Some(Item::Table(child)) => remove_path(child, rest),
        Some(Item::Value(toml_edit::Value::InlineTable(child))) => remove_path(child, rest),
        Some(Item::ArrayOfTables(array)) => {
            let Some((index, rest)) = rest.split_first() else {
                return false;
            };
            match index.parse::<usize>().ok().and_then(|i| array.get_mut(i)) {
                Some(entry) if !rest.is_empty() => remove_path(entry, rest),
                _ => false,
            }
        }
        _ => false,
    }
}

/// Replaces `${VAR}` in every string value; `$${` writes a literal `${`.
fn interpolate_table(
    table: &mut toml_edit::Table,
    prefix: &str,
    env: &HashMap<String, String>,
    locations: &Locations,
    problems: &mut Vec<Problem>,
) {
    for (key, item) in table.iter_mut() {
        let path = join(prefix, &key);
        interpolate_item(item, &path, env, locations, problems);
    }
}

fn interpolate_item(
    item: &mut Item,
    path: &str,
    env: &HashMap<String, String>,
    locations: &Locations,
    problems: &mut Vec<Problem>,
) {
    match item {
        Item::Table(table) => interpolate_table(table, path, env, locations, problems),
        Item::ArrayOfTables(array) => {
            for (index, table) in array.iter_mut().enumerate() {
                interpolate_table(
                    table,
                    &join(path, &index.to_string()),
                    env,
                    locations,
                    problems,
                );
            }
        }
        Item::Value(value) => interpolate_value(value, path, env, locations, problems),
        Item::None => {}
    }
}

fn interpolate_value(
    value: &mut Value,
    path: &str,
    env: &HashMap<String, String>,
    locations: &Locations,
    problems: &mut Vec<Problem>,
) {
    match value {
        Value::String(text) if text.value().contains('$') => match interpolate(text.value(), env) {
            Ok(expanded) => *value = Value::from(expanded),
            Err(message) => problems.push(Problem {
                location: locations.locate(path),
                key: path.to_owned(),
                message,
            }),
        },
        Value::Array(array) => {
            for (index, value) in array.iter_mut().enumerate() {
                interpolate_value(
                    value,
                    &join(path, &index.to_string()),
                    env,
                    locations,
                    problems,
                );
            }
        }
        Value::InlineTable(table) => {
            for (key, value) in table.iter_mut() {
                interpolate_value(value, &join(path, &key), env, locations, problems);
            }
        }
        _ => {}
    }
}

/// Expands `${VAR}`; an unset variable is an error (a secret silently empty is worse).
pub(crate) fn interpolate(text: &str, env: &HashMap<String, String>) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find('$') {
        out.push_str(&rest[..start]);
        let after = &rest[start..];
        if let Some(escaped) = after.strip_prefix("$${") {
            out.push_str("${");
            rest = escaped;
        } else if let Some(body) = after.strip_prefix("${") {
            let end = body
                .find('}')
                .ok_or_else(|| format!("has an unclosed `${{` in {text:?}"))?;
            let name = &body[..end];
            let valid =
                !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !valid {
                return Err(format!("`${{{name}}}` is not a valid variable name"));
            }
            let value = env.get(name).ok_or_else(|| {
                format!("uses ${{{name}}}, but the environment variable {name} is not set")
            })?;
            out.push_str(value);
            rest = &body[end + 1..];
        } else {
            out.push('$');
            rest = &after[1..];
        }
    }
    out.push_str(rest);
    Ok(out)
}

fn ignored_path(path: &serde_ignored::Path<'_>) -> String {
    use serde_ignored::Path as P;
    match path {
        P::Root => String::new(),
        P::Seq { parent, index } => join(&ignored_path(parent), &index.to_string()),
        P::Map { parent, key } => join(&ignored_path(parent), key),
        P::Some { parent } | P::NewtypeStruct { parent } | P::NewtypeVariant { parent } => {
            ignored_path(parent)
        }
    }
}

fn error_path(path: &serde_path_to_error::Path) -> String {
    use serde_path_to_error::Segment;
    let mut out = String::new();
    for segment in path.iter() {
        let part = match segment {
            Segment::Seq { index } => index.to_string(),
            Segment::Map { key } => key.clone(),
            Segment::Enum { variant } => variant.clone(),
            Segment::Unknown => continue,
        };
        out = join(&out, &part);
    }
    out
}

/// Byte offset → 1-based line and column.
pub(crate) struct LineIndex {
    starts: Vec<usize>,
}

impl LineIndex {
    pub(crate) fn new(text: &str) -> Self {
        let starts = std::iter::once(0)
            .chain(text.match_indices('\n').map(|(i, _)| i + 1))
            .collect();
        Self { starts }
    }

    pub(crate) fn position(&self, offset: usize) -> (usize, usize) {
        let line = self.starts.partition_point(|&start| start <= offset);
        let start = self.starts[line.saturating_sub(1)];
        (line, offset - start + 1)
    }

    fn locate(&self, file: &str, offset: usize) -> String {
        let (line, col) = self.position(offset);
        format!("{file}:{line}:{col}")
    }
}

// Deserializing `Config` through serde_ignored needs `Deserialize`, checked here at compile time.
const _: fn() = || {
    fn assert_deserialize<T: for<'de> Deserialize<'de>>() {}
    assert_deserialize::<Config>();
};
