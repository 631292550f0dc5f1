//! Logging set-up: human-readable text or one JSON object per line, filtered by `RUST_LOG`.

use std::io::IsTerminal;

use clap::{Args, ValueEnum};
use tracing_subscriber::{EnvFilter, fmt, prelude::*};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Args, Debug)]
pub struct LoggingArgs {
    /// Log format (component-base's flag name).
    #[arg(
        long = "logging-format",
        value_enum,
        default_value_t,
        global = true,
        env = "SVCPLANE_LOGGING_FORMAT"
    )]
    pub format: LogFormat,
    /// Log filter in `tracing` directive syntax, e.g. `info,svcplane_controllers=debug`.
    #[arg(long = "log-level", default_value = "info", global = true, env = "RUST_LOG")]
    pub filter: String,
}

pub fn init(args: &LoggingArgs) -> anyhow::Result<()> {
    let filter = EnvFilter::try_new(&args.filter)?;
    let registry = tracing_subscriber::registry().with(filter);
    match args.format {
        LogFormat::Text => registry
            .with(
                fmt::layer()
                    .with_ansi(std::io::stderr().is_terminal())
                    .with_writer(std::io::stderr),
            )
            .try_init()?,
        LogFormat::Json => registry
            .with(
                fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(true)
                    .with_writer(std::io::stderr),
            )
            .try_init()?,
    }
    Ok(())
}
