//! cm_ctl's errors: each one a single line that says what went wrong and what was
//! tried.

use std::path::{Path, PathBuf};

use ha_common::ConfigError;

#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    DnAuth(#[from] ha_common::dn_auth::DnAuthError),
    #[error("no primary CMServer reachable (tried {tried})")]
    NoCmServer { tried: String },
    #[error("unknown instance {name:?}: not in config {config}")]
    UnknownInstance { name: String, config: PathBuf },
    #[error("{name} is a CMServer: cm_ctl start/stop acts on GTM, CN and DN instances")]
    NotManaged { name: String },
    #[error("{what} failed at {endpoint}: {message}")]
    Rpc {
        what: &'static str,
        endpoint: String,
        message: String,
    },
    #[error("timed out after {secs} s waiting for {what}: {pending}")]
    Timeout {
        what: String,
        secs: u64,
        pending: String,
    },
    #[error("cannot {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0} not found: build it (cargo build --workspace --bins) or set cluster.bin_dir")]
    MissingBinary(PathBuf),
    #[error("{0}")]
    Other(String),
}

impl CtlError {
    pub fn io(action: &'static str, path: &Path, source: std::io::Error) -> CtlError {
        CtlError::Io {
            action,
            path: path.to_owned(),
            source,
        }
    }
}
