//! The agent library's error type: every failure names the instance or file it is about.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Config(#[from] ha_common::ConfigError),
    #[error("config {config}: --node {node:?} is not a [[host]] name (hosts: {known})")]
    UnknownHost {
        config: PathBuf,
        node: String,
        known: String,
    },
    #[error("OS user {0:?} does not exist (cluster.os_user): create it or name another")]
    NoSuchUser(String),
    #[error("looking up OS user {user:?}: {source}")]
    UserLookup { user: String, source: nix::Error },
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{program} failed ({status}): {output}")]
    Command {
        program: String,
        status: String,
        output: String,
    },
    #[error("cannot run {program}: {source}")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Probe(String),
    #[error("corrupt state file {path}: {why} (left as it is)")]
    CorruptState { path: PathBuf, why: String },
    #[error("{path}: the PostgreSQL OS user (uid {uid}) cannot run it: {problem}")]
    NotRunnable {
        path: PathBuf,
        uid: u32,
        problem: String,
    },
    #[error("{0}")]
    Instance(String),
}

impl AgentError {
    pub fn io(what: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        AgentError::Io {
            what,
            path: path.into(),
            source,
        }
    }
}

pub type Result<T, E = AgentError> = std::result::Result<T, E>;
