//! The command line: `switchboard run | check | explain`.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use serde_json::{Value, json};
use switchboard_channel::{ChannelRef, CloudEvent, NormalizedMessage};

use crate::config::{self, Loaded};
use crate::router::check::{dry_run, run_tests};
use crate::router::rules::RuleSet;

#[derive(Debug, Parser)]
#[command(
    name = "switchboard",
    version,
    about = "Omnichannel message-routing daemon"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon.
    Run {
        /// Config file (default: ./switchboard.toml, then /etc/switchboard/switchboard.toml).
        #[arg(short, long)]
        config: Option<PathBuf>,
        /// Rules directory, instead of `[routing] rules`.
        #[arg(long)]
        rules: Option<PathBuf>,
    },
    /// Validate config, channels and routing rules offline, and run the rule tests.
    Check {
        #[arg(short, long)]
        config: Option<PathBuf>,
        #[arg(long)]
        rules: Option<PathBuf>,
    },
    /// Print the routing decision for one message (normalized or web chat JSON; `-` = stdin).
    Explain {
        #[arg(short, long)]
        config: Option<PathBuf>,
        #[arg(long)]
        rules: Option<PathBuf>,
        message: PathBuf,
    },
}

pub fn environment() -> HashMap<String, String> {
    std::env::vars().collect()
}

/// Loads the config or prints every problem.
pub fn load_config(path: Option<&Path>) -> Result<Loaded, ExitCode> {
    config::load(path, &environment()).map_err(|problems| {
        for problem in &problems.0 {
            eprintln!("{problem}");
        }
        ExitCode::FAILURE
    })
}

/// `switchboard check`: every problem as `file:line:col: message`, then the rule tests.
pub fn check(config_path: Option<&Path>, rules_override: Option<&Path>) -> ExitCode {
    let mut ok = true;
    let loaded = match config::load(config_path, &environment()) {
        Ok(loaded) => {
            for problem in loaded.problems(crate::channels::validate(&loaded.config.channels)) {
                println!("{problem}");
                ok = false;
            }
            Some(loaded)
        }
        Err(problems) => {
            for problem in &problems.0 {
                println!("{problem}");
            }
            ok = false;
            None
        }
    };
    let rules_dir = match (rules_override, &loaded) {
        (Some(dir), _) => dir.to_path_buf(),
        (None, Some(loaded)) => loaded.config.rules_dir(loaded.base_dir()),
        (None, None) => PathBuf::from("routing-rules"),
    };
    match RuleSet::load_dir(&rules_dir) {
        Ok(rules) => {
            let (passed, failures) = run_tests(&rules);
            for failure in &failures {
                println!("{failure}");
            }
            println!(
                "rules: {} ({} queues, {} rules, version {})",
                rules_dir.display(),
                rules.queues.len(),
                rules.rules.len(),
                &rules.version[..12]
            );
            println!("{passed} passed, {} failed", failures.len());
            ok &= failures.is_empty();
        }
        Err(diagnostics) => {
            for diagnostic in &diagnostics.0 {
                println!("{diagnostic}");
            }
            ok = false;
        }
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// `switchboard explain`: the decision for one message as JSON; publishes nothing.
pub fn explain(
    config_path: Option<&Path>,
    rules_override: Option<&Path>,
    message: &Path,
) -> ExitCode {
    let loaded = match load_config(config_path) {
        Ok(loaded) => loaded,
        Err(code) => return code,
    };
    let rules_dir = rules_override
        .map(Path::to_path_buf)
        .unwrap_or_else(|| loaded.config.rules_dir(loaded.base_dir()));
    let rules = match RuleSet::load_dir(&rules_dir) {
        Ok(rules) => rules,
        Err(diagnostics) => {
            eprintln!("{diagnostics}");
            return ExitCode::FAILURE;
        }
    };
    let text = if message == Path::new("-") {
        let mut text = String::new();
        if let Err(error) = std::io::stdin().read_to_string(&mut text) {
            eprintln!("cannot read the message from stdin: {error}");
            return ExitCode::FAILURE;
        }
        text
    } else {
        match std::fs::read_to_string(message) {
            Ok(text) => text,
            Err(error) => {
                eprintln!("cannot read {}: {error}", message.display());
                return ExitCode::FAILURE;
            }
        }
    };
    let message = match parse_message(&text) {
        Ok(message) => message,
        Err(error) => {
            eprintln!("{error}");
            return ExitCode::FAILURE;
        }
    };
    let attributes = match message.metadata.get("attributes") {
        Some(Value::Object(attributes)) => attributes.clone(),
        _ => Default::default(),
    };
    let (decision, signals) = dry_run(
        &rules,
        time::OffsetDateTime::now_utc(),
        &message,
        attributes,
        1,
    );
    let output = json!({
        "queue": decision.queue,
        "urgency": decision.urgency,
        "priority": decision.priority,
        "skills": decision.skills,
        "tags": decision.tags,
        "language": decision.language,
        "outside_hours": decision.outside_hours,
        "signals": signals,
        "explanation": decision.explanation,
        // Where the rules that did not match are, for the operator reading this.
        "not_matched_rules": rules
            .rules
            .iter()
            .filter(|r| decision.explanation.not_matched.contains(&r.id))
            .map(|r| json!({"id": r.id, "file": r.file, "line": r.line}))
            .collect::<Vec<_>>(),
        "rules_version": rules.version,
    });
    // A JSON value always pretty-prints. A closed stdout (`| head`) is not an error of ours.
    let text = serde_json::to_string_pretty(&output).expect("JSON prints");
    let _ = writeln!(std::io::stdout(), "{text}");
    ExitCode::SUCCESS
}

/// A normalized message, a `message.received` CloudEvent, or a web chat body.
fn parse_message(text: &str) -> Result<NormalizedMessage, String> {
    if let Ok(event) = serde_json::from_str::<CloudEvent<NormalizedMessage>>(text) {
        return Ok(event.data);
    }
    if let Ok(message) = serde_json::from_str::<NormalizedMessage>(text) {
        return Ok(message);
    }
    let channel = ChannelRef {
        id: "explain".to_owned(),
        kind: "webchat".to_owned(),
    };
    switchboard_webchat::convert(&channel, text.as_bytes(), &Default::default()).map_err(|error| {
        format!("the message is neither a normalized message nor a web chat body: {error}")
    })
}
