//! Running PostgreSQL's tools as the unprivileged OS user of the config: PostgreSQL
//! refuses to run as root, and the agent runs as root under systemd.

use std::path::Path;

use nix::unistd::{Gid, Uid, User};
use tokio::process::Command;

use crate::error::{AgentError, Result};

/// Who PostgreSQL runs as. `None` ids mean "as the agent itself" (the agent is not
/// root, so it cannot and need not switch).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OsUser {
    pub name: String,
    ids: Option<(Uid, Gid)>,
}

impl OsUser {
    /// Resolves `cluster.os_user`. As root the user must exist; otherwise the agent
    /// runs everything as itself.
    pub fn resolve(name: &str) -> Result<OsUser> {
        if !nix::unistd::geteuid().is_root() {
            let me = User::from_uid(nix::unistd::geteuid())
                .ok()
                .flatten()
                .map(|u| u.name)
                .unwrap_or_else(|| name.to_owned());
            return Ok(OsUser {
                name: me,
                ids: None,
            });
        }
        let user = User::from_name(name)
            .map_err(|source| AgentError::UserLookup {
                user: name.to_owned(),
                source,
            })?
            .ok_or_else(|| AgentError::NoSuchUser(name.to_owned()))?;
        if user.uid.is_root() {
            return Err(AgentError::Instance(format!(
                "OS user {name:?} has uid 0: PostgreSQL refuses to run as root"
            )));
        }
        Ok(OsUser {
            name: name.to_owned(),
            ids: Some((user.uid, user.gid)),
        })
    }

    /// The agent's own user (tests and non-root runs).
    pub fn current() -> OsUser {
        let uid = nix::unistd::geteuid();
        let name = User::from_uid(uid)
            .ok()
            .flatten()
            .map(|u| u.name)
            .unwrap_or_else(|| uid.to_string());
        OsUser { name, ids: None }
    }

    /// The uid/gid files made for this user get (None: the agent's own).
    pub fn ids(&self) -> Option<(u32, u32)> {
        self.ids.map(|(u, g)| (u.as_raw(), g.as_raw()))
    }

    /// Whether commands run under another uid than the agent's.
    pub fn switches(&self) -> bool {
        self.ids.is_some()
    }

    /// A command that runs `program` as this user, in `cwd` (a directory the user can
    /// enter, so tools do not complain about the agent's working directory).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>, cwd: &Path) -> Command {
        let mut cmd = Command::new(program);
        cmd.current_dir(cwd).stdin(std::process::Stdio::null());
        if let Some((uid, gid)) = self.ids {
            // std drops supplementary groups (setgroups(0)) when root switches uid.
            cmd.uid(uid.as_raw()).gid(gid.as_raw());
            cmd.env("USER", &self.name).env("LOGNAME", &self.name);
            if let Ok(Some(u)) = User::from_uid(uid) {
                cmd.env("HOME", u.dir);
            }
        }
        cmd
    }

    /// Makes `path` (not recursively) owned by this user; nothing to do when the agent
    /// runs as itself.
    pub fn chown(&self, path: &Path) -> Result<()> {
        if let Some((uid, gid)) = self.ids {
            nix::unistd::chown(path, Some(uid), Some(gid)).map_err(|e| {
                AgentError::io("chown", path, std::io::Error::from_raw_os_error(e as i32))
            })?;
        }
        Ok(())
    }

    /// Creates `dir` (and parents) and makes it owned by this user with mode `mode`.
    pub fn create_owned_dir(&self, dir: &Path, mode: u32) -> Result<()> {
        use std::os::unix::fs::PermissionsExt;
        std::fs::create_dir_all(dir).map_err(|e| AgentError::io("create directory", dir, e))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode))
            .map_err(|e| AgentError::io("chmod", dir, e))?;
        self.chown(dir)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_user_is_named_when_root() {
        if !nix::unistd::geteuid().is_root() {
            return;
        }
        let e = OsUser::resolve("no_such_user_mpp_ha")
            .unwrap_err()
            .to_string();
        assert!(e.contains("no_such_user_mpp_ha"), "{e}");
    }

    #[test]
    fn current_user_does_not_switch() {
        assert!(!OsUser::current().switches());
    }
}
