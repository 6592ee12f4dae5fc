//! What each `dn_replicator` subcommand does (the binary only parses flags).

use std::path::Path;
use std::process::ExitCode;

/// `dn_replicator serve`.
pub fn serve(_config: &Path, _node: &str, _base_dir: Option<&Path>) -> anyhow::Result<ExitCode> {
    anyhow::bail!("the DN secondary is not implemented yet; refusing to start")
}

/// `dn_replicator restore-wal`.
pub fn restore_wal(_from: &str, _file: &str, _path: &Path) -> anyhow::Result<ExitCode> {
    anyhow::bail!("restore-wal is not implemented yet")
}
