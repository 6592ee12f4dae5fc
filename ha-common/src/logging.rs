//! One tracing setup for every binary: human-readable lines (default) or one JSON object per line (`--log-format json` or `MPP_HA_LOG_FORMAT=json`) on stderr, level from `RUST_LOG` (default `info`).
//!
//! Agents and `cm_ctl local up` redirect stderr to log files under the base dir. The
//! environment variable is inherited, so an agent started with it makes every
//! instance it runs log JSON too.

use std::io::IsTerminal;
use std::str::FromStr;

use tracing_subscriber::EnvFilter;

/// The environment variable that picks the format when no flag does.
pub const FORMAT_ENV: &str = "MPP_HA_LOG_FORMAT";

/// How log lines look.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    #[default]
    Text,
    /// One JSON object per line (for log shippers).
    Json,
}

impl FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<LogFormat, String> {
        match s {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(format!(
                "unknown log format {other:?}: expected \"text\" or \"json\""
            )),
        }
    }
}

/// Makes `format` (a `--log-format` flag) the process's `MPP_HA_LOG_FORMAT`, so that
/// `init` and every process this one starts use it. Call from `main` before any
/// thread is started (it changes the environment).
pub fn set_format(format: Option<LogFormat>) {
    if let Some(f) = format {
        let v = match f {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        };
        std::env::set_var(FORMAT_ENV, v);
    }
}

/// Installs the global subscriber in the format of `MPP_HA_LOG_FORMAT` (text if unset).
pub fn init(component: &str) {
    init_with(component, None);
}

/// Installs the global subscriber: `format` (a `--log-format` flag) wins over
/// `MPP_HA_LOG_FORMAT`; an unreadable variable falls back to text with a warning.
pub fn init_with(component: &str, format: Option<LogFormat>) {
    let (from_env, bad_env) = match std::env::var(FORMAT_ENV) {
        Ok(v) => match v.parse::<LogFormat>() {
            Ok(f) => (Some(f), None),
            Err(e) => (None, Some(e)),
        },
        Err(_) => (None, None),
    };
    let format = format.or(from_env).unwrap_or_default();
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    let _ = match format {
        // Colour only on a terminal: log files must stay plain text.
        LogFormat::Text => builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
        LogFormat::Json => builder
            .json()
            .with_current_span(false)
            .with_span_list(false)
            .try_init(),
    };
    if let Some(e) = bad_env {
        tracing::warn!("{FORMAT_ENV}: {e}; logging text");
    }
    tracing::debug!(component, "logging initialised");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_parse_and_bad_ones_are_named() {
        assert_eq!("json".parse::<LogFormat>(), Ok(LogFormat::Json));
        assert_eq!("text".parse::<LogFormat>(), Ok(LogFormat::Text));
        let e = "yaml".parse::<LogFormat>().unwrap_err();
        assert!(e.contains("yaml") && e.contains("json"), "{e}");
    }
}
