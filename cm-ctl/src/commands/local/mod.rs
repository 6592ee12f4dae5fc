//! `cm_ctl local up|down`: a whole cluster as background processes on one machine:
//! the CMServers and one cm_agent per host, which run everything else.

pub mod down;
pub mod up;

use std::path::{Path, PathBuf};

use ha_common::ClusterConfig;

use crate::error::CtlError;
use crate::processes::Daemon;

/// The daemons `local up` runs: every CMServer, then one agent per host.
pub fn daemons(cfg: &ClusterConfig) -> Vec<Daemon> {
    let cms = cfg.cm_servers.iter().map(|s| Daemon {
        program: "cm_server",
        node: s.name.clone(),
        host: s.host.clone(),
    });
    let agents = cfg.hosts.iter().map(|h| Daemon {
        program: "cm_agent",
        node: h.name.clone(),
        host: h.name.clone(),
    });
    cms.chain(agents).collect()
}

/// `<base_dir>/<node>/<node>.log`.
pub fn log_path(base_dir: &Path, d: &Daemon) -> PathBuf {
    base_dir.join(&d.node).join(format!("{}.log", d.node))
}

/// The base dir as an absolute path (the daemons get it on their command line, which
/// is also how `local` recognises them later).
pub fn absolute_base_dir(cfg: &ClusterConfig) -> Result<PathBuf, CtlError> {
    absolute(&cfg.cluster.base_dir)
}

pub fn absolute(p: &Path) -> Result<PathBuf, CtlError> {
    if p.is_absolute() {
        return Ok(p.to_path_buf());
    }
    let cwd =
        std::env::current_dir().map_err(|e| CtlError::io("find current directory for", p, e))?;
    Ok(cwd.join(p))
}
