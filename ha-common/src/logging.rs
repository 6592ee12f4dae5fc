//! One tracing setup for every binary: human-readable lines on stderr, level from
//! `RUST_LOG` (default `info`). Agents and `cm_ctl local up` redirect stderr to log
//! files under the base dir.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// Installs the global subscriber; `component` prefixes nothing but is logged once so
/// that interleaved logs can be told apart.
pub fn init(component: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour only on a terminal: log files must stay plain text.
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .try_init();
    tracing::debug!(component, "logging initialised");
}
