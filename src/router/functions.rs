//! The CEL environment rules are compiled against: the standard library, with `matches` backed
//! by a cache of compiled regular expressions (the standard one compiles the pattern on every
//! call, which costs more than the rest of a decision).

use std::collections::HashMap;
use std::sync::{Arc, OnceLock, RwLock};

use cel::ExecutionError;
use cel::common::types::{CelBool, CelString};
use regex::Regex;

/// Patterns kept compiled; past this the cache starts over (patterns come from rule files, so
/// this is only reached by rules that build patterns from message data).
const CACHE_LIMIT: usize = 4096;

/// The environment every rule set compiles against.
pub fn environment() -> cel::Env {
    let mut env = cel::Env::stdlib();
    // The two registrations cannot collide: the build leaves out the standard `matches`.
    cel::add_member_overload!(env, fn matches: (CelString, CelString) -> Result<CelBool>)
        .expect("`matches` is not registered twice");
    cel::add_overload!(env, fn matches: (CelString, CelString) -> Result<CelBool>, id = "matches")
        .expect("`matches` is not registered twice");
    env
}

fn matches(text: &CelString<'_>, pattern: &CelString<'_>) -> Result<CelBool, ExecutionError> {
    let regex = compiled(pattern.inner()).map_err(|error| ExecutionError::FunctionError {
        function: "matches".to_owned(),
        message: format!(
            "'{}' is not a valid regular expression: {error}",
            pattern.inner()
        ),
    })?;
    Ok(CelBool::from(regex.is_match(text.inner())))
}

/// Compiles `pattern`, once.
pub fn compiled(pattern: &str) -> Result<Arc<Regex>, regex::Error> {
    static CACHE: OnceLock<RwLock<HashMap<String, Arc<Regex>>>> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    if let Some(regex) = cache
        .read()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .get(pattern)
    {
        return Ok(regex.clone());
    }
    let regex = Arc::new(Regex::new(pattern)?);
    let mut cache = cache
        .write()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if cache.len() >= CACHE_LIMIT {
        cache.clear();
    }
    cache.insert(pattern.to_owned(), regex.clone());
    Ok(regex)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eval(expression: &str) -> Result<cel::Value, String> {
        let env = Arc::new(environment());
        let program = env.compile(expression).map_err(|e| e.to_string())?;
        let context = cel::Context::with_env(env);
        program.execute(&context).map_err(|e| e.to_string())
    }

    #[test]
    fn matches_works_as_member_and_as_function() {
        assert_eq!(
            eval(r#"'I want a REFUND'.matches('(?i)refund')"#),
            Ok(cel::Value::Bool(true))
        );
        assert_eq!(
            eval(r#"matches('hello', '^h.*o$')"#),
            Ok(cel::Value::Bool(true))
        );
        assert_eq!(
            eval(r#"'hello'.matches('^x')"#),
            Ok(cel::Value::Bool(false))
        );
    }

    #[test]
    fn invalid_pattern_is_an_evaluation_error() {
        let error = eval(r#"'x'.matches('(')"#).unwrap_err();
        assert!(error.contains("not a valid regular expression"), "{error}");
    }

    #[test]
    fn patterns_are_compiled_once() {
        let a = compiled("abc+").unwrap();
        let b = compiled("abc+").unwrap();
        assert!(Arc::ptr_eq(&a, &b));
    }
}
