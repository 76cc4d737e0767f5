use std::process::ExitCode;

use clap::Parser;
use switchboard::cli::{self, Cli, Command};

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { config, rules } => cli::check(config.as_deref(), rules.as_deref()),
        Command::Explain {
            config,
            rules,
            message,
        } => cli::explain(config.as_deref(), rules.as_deref(), &message),
        Command::Run { config, rules } => {
            let loaded = match cli::load_config(config.as_deref()) {
                Ok(loaded) => loaded,
                Err(code) => return code,
            };
            switchboard::telemetry::init_logging(&loaded.config.log);
            let json_logs = loaded.config.log.format == switchboard::config::LogFormat::Json;
            let runtime = match tokio::runtime::Runtime::new() {
                Ok(runtime) => runtime,
                Err(error) => {
                    eprintln!("cannot start the async runtime: {error}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(switchboard::app::run(loaded, rules)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(error) => {
                    // Once on stderr, where the logs go too: as a log record when they are
                    // JSON (for whatever reads them), else as plain text like `check`'s errors.
                    let report = switchboard::telemetry::report(&error);
                    if json_logs {
                        tracing::error!("{report}");
                    } else {
                        eprintln!("switchboard: {report}");
                    }
                    ExitCode::FAILURE
                }
            }
        }
    }
}
