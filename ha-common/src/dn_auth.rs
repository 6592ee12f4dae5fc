//! DN authentication: the database roles our own programs use to reach the DNs, and
//! the files that hold their SCRAM passwords.
//!
//! pg_hba (written by the agent) trusts only the OS user's local socket; every TCP
//! connection to a DN logs in as one of these roles with a password. The passwords are
//! random, made once per cluster (`cm_ctl local up` or `cm_ctl cert init`), and must be
//! the same on every host (a standby authenticates to whichever member is primary):
//! a production install copies the directory to every host, as it does the TLS dir.
//! Each file holds one password, is owned by the PostgreSQL OS user and mode 0600.

use std::path::{Path, PathBuf};

use crate::ClusterConfig;

/// A role the agent creates on a new primary (replicated to its standbys).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DnRole {
    /// REPLICATION LOGIN (+ the grants pg_rewind and the build source need): standbys'
    /// primary_conninfo, pg_basebackup, pg_rewind, dn_replicator.
    Replication,
    /// pg_monitor: the agents' probes.
    Monitor,
    /// SUPERUSER: the CNs (they run any client's DDL and DML, and COMMIT/ROLLBACK
    /// PREPARED of transactions other sessions prepared, which needs the preparing
    /// role or a superuser) and the agent's CHECKPOINT on a new primary before
    /// pg_rewind (superuser-only in PostgreSQL 15).
    Admin,
}

impl DnRole {
    pub const ALL: [DnRole; 3] = [DnRole::Replication, DnRole::Monitor, DnRole::Admin];

    /// The database role name.
    pub fn name(self) -> &'static str {
        match self {
            DnRole::Replication => "mpp_replication",
            DnRole::Monitor => "mpp_monitor",
            DnRole::Admin => "mpp_admin",
        }
    }

    /// The `[dn_auth]` key naming its password file.
    pub fn key(self) -> &'static str {
        match self {
            DnRole::Replication => "replication_password_file",
            DnRole::Monitor => "monitor_password_file",
            DnRole::Admin => "admin_password_file",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DnAuthError {
    #[error("DN password file {path} ({key}) for role {role}: {problem}")]
    File {
        path: PathBuf,
        key: &'static str,
        role: &'static str,
        problem: String,
    },
    #[error("DN password files: OS user {user:?}: {problem}")]
    OsUser { user: String, problem: String },
    #[error("password file {path} of CN user {user:?} ([[user]] password_file): {problem}")]
    UserFile {
        path: PathBuf,
        user: String,
        problem: String,
    },
    #[error("DN password files: {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The password file of `role` in `cfg` (`[dn_auth] <role>_password_file`, default
/// `<dn_auth.dir>/<role name>.password`).
pub fn password_file(cfg: &ClusterConfig, role: DnRole) -> PathBuf {
    let a = &cfg.dn_auth;
    let explicit = match role {
        DnRole::Replication => &a.replication_password_file,
        DnRole::Monitor => &a.monitor_password_file,
        DnRole::Admin => &a.admin_password_file,
    };
    explicit
        .clone()
        .unwrap_or_else(|| dir(cfg).join(format!("{}.password", role.name())))
}

/// `[dn_auth] dir`, default `<base_dir>/secrets`.
pub fn dir(cfg: &ClusterConfig) -> PathBuf {
    cfg.dn_auth
        .dir
        .clone()
        .unwrap_or_else(|| cfg.cluster.base_dir.join("secrets"))
}

/// The password of `role`: the first line of its file. A missing, unreadable or empty
/// file is one clear error naming the file and the key.
pub fn read_password(cfg: &ClusterConfig, role: DnRole) -> Result<String, DnAuthError> {
    read_password_at(&password_file(cfg, role), role)
}

/// The password files of a config, kept by long-lived clients that read a password
/// when they connect (so a file made after they started is found).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PasswordFiles {
    files: [PathBuf; 3],
}

impl PasswordFiles {
    pub fn for_config(cfg: &ClusterConfig) -> PasswordFiles {
        PasswordFiles {
            files: DnRole::ALL.map(|r| password_file(cfg, r)),
        }
    }

    pub fn path(&self, role: DnRole) -> &Path {
        &self.files[role as usize]
    }

    pub fn read(&self, role: DnRole) -> Result<String, DnAuthError> {
        read_password_at(self.path(role), role)
    }
}

/// The password file of CN user `user` (`[[user]] password_file`, default
/// `<dn_auth.dir>/user_<name>.password`).
pub fn user_password_file(cfg: &ClusterConfig, user: &crate::config::User) -> PathBuf {
    user.password_file
        .clone()
        .unwrap_or_else(|| dir(cfg).join(format!("user_{}.password", user.name)))
}

/// CN user `user`'s password: the deprecated clear `password` if the config has one,
/// else the first line of its password file.
pub fn user_password(
    cfg: &ClusterConfig,
    user: &crate::config::User,
) -> Result<String, DnAuthError> {
    if let Some(p) = &user.password {
        return Ok(p.clone());
    }
    let path = user_password_file(cfg, user);
    first_line(
        &path,
        "missing (`cm_ctl local up` or `cm_ctl cert init --config <file>` makes it; copy it to every CN host)",
    )
    .map_err(|problem| DnAuthError::UserFile {
        path: path.clone(),
        user: user.name.clone(),
        problem,
    })
}

fn read_password_at(path: &Path, role: DnRole) -> Result<String, DnAuthError> {
    first_line(
        path,
        "missing (run `cm_ctl cert init --config <file>` once and copy the files to every host; `cm_ctl local up` makes them for a local cluster)",
    )
    .map_err(|problem| DnAuthError::File {
        path: path.to_owned(),
        key: role.key(),
        role: role.name(),
        problem,
    })
}

/// A password file's password (its first line, trimmed), or what is wrong with the
/// file: `missing` when it does not exist, the I/O error, or "empty".
fn first_line(path: &Path, missing: &str) -> Result<String, String> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            missing.to_owned()
        } else {
            e.to_string()
        }
    })?;
    let pw = text.lines().next().unwrap_or("").trim().to_owned();
    if pw.is_empty() {
        return Err("empty".to_owned());
    }
    Ok(pw)
}

/// Makes the password files of `cfg` that do not exist yet (a random password each),
/// owned by the OS user and mode 0600, in a directory only the OS user may enter;
/// existing files are never changed (every host must keep the cluster's passwords).
/// Returns the files it made.
pub fn init_password_files(cfg: &ClusterConfig) -> Result<Vec<PathBuf>, DnAuthError> {
    let (uid, gid) = os_user_ids(&cfg.cluster.os_user)?;
    let mut made = Vec::new();
    // The DN roles', then each CN user's that has no (deprecated) clear password.
    let files = DnRole::ALL
        .into_iter()
        .map(|role| password_file(cfg, role))
        .chain(
            cfg.users
                .iter()
                .filter(|u| u.password.is_none())
                .map(|u| user_password_file(cfg, u)),
        );
    for path in files {
        if path.exists() {
            continue;
        }
        let io = |p: &Path| {
            let p = p.to_owned();
            move |source| DnAuthError::Io { path: p, source }
        };
        if let Some(parent) = path.parent() {
            if !parent.exists() {
                std::fs::create_dir_all(parent).map_err(io(parent))?;
                set_owner_mode(parent, uid, gid, 0o700)?;
            }
        }
        let pw = random_password().map_err(io(Path::new("/dev/urandom")))?;
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, format!("{pw}\n")).map_err(io(&tmp))?;
        set_owner_mode(&tmp, uid, gid, 0o600)?;
        std::fs::File::open(&tmp)
            .and_then(|f| f.sync_all())
            .map_err(io(&tmp))?;
        std::fs::rename(&tmp, &path).map_err(io(&path))?;
        if let Some(parent) = path.parent() {
            crate::durable::fsync_dir(parent).map_err(io(parent))?;
        }
        made.push(path);
    }
    Ok(made)
}

/// Makes `path` belong to the OS user `os_user` with `mode` (only root can give a
/// file away; a caller that is that user already owns it).
pub fn give_to_os_user(path: &Path, os_user: &str, mode: u32) -> Result<(), DnAuthError> {
    let (uid, gid) = os_user_ids(os_user)?;
    set_owner_mode(path, uid, gid, mode)
}

fn os_user_ids(name: &str) -> Result<(u32, u32), DnAuthError> {
    let err = |problem: String| DnAuthError::OsUser {
        user: name.to_owned(),
        problem,
    };
    let user = nix::unistd::User::from_name(name)
        .map_err(|e| err(e.to_string()))?
        .ok_or_else(|| err("no such OS user".to_owned()))?;
    Ok((user.uid.as_raw(), user.gid.as_raw()))
}

fn set_owner_mode(path: &Path, uid: u32, gid: u32, mode: u32) -> Result<(), DnAuthError> {
    use std::os::unix::fs::PermissionsExt;
    let io = |source| DnAuthError::Io {
        path: path.to_owned(),
        source,
    };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(io)?;
    // Only root can give a file away; a non-root caller that is the OS user already
    // owns what it made.
    if nix::unistd::geteuid().as_raw() != uid {
        std::os::unix::fs::chown(path, Some(uid), Some(gid)).map_err(io)?;
    }
    Ok(())
}

/// 32 hex digits (128 bits) from the kernel's random source.
fn random_password() -> std::io::Result<String> {
    use std::io::Read;
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// A libpq password file line (`~/.pgpass` format) for `role` on any host, port and
/// database; `:` and `\` are escaped as libpq expects.
pub fn pgpass_line(role: DnRole, password: &str) -> String {
    let esc = password.replace('\\', "\\\\").replace(':', "\\:");
    format!("*:*:*:{}:{esc}\n", role.name())
}

/// A SQL string literal.
pub fn sql_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(base: &Path) -> ClusterConfig {
        let text = include_str!("../../configs/local.toml").replace(
            "base_dir = \"/tmp/mpp-ha\"",
            &format!("base_dir = {:?}", base.display().to_string()),
        );
        // As root the files go to local.toml's `postgres`; otherwise to ourselves
        // (only root can give files away).
        if nix::unistd::geteuid().is_root() {
            return ClusterConfig::parse(&text, Path::new("t.toml")).unwrap();
        }
        let me = nix::unistd::User::from_uid(nix::unistd::geteuid())
            .unwrap()
            .unwrap()
            .name;
        let text = text.replace("os_user = \"postgres\"", &format!("os_user = {me:?}"));
        ClusterConfig::parse(&text, Path::new("t.toml")).unwrap()
    }

    #[test]
    fn files_are_made_once_private_and_read_back() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let cfg = cfg(dir.path());
        let made = init_password_files(&cfg).unwrap();
        assert_eq!(
            made.len(),
            4,
            "three DN roles and local.toml's CN user: {made:?}"
        );
        let user = cfg.user("postgres").unwrap();
        let up = user_password_file(&cfg, user);
        assert_eq!(up, dir.path().join("secrets/user_postgres.password"));
        assert_eq!(
            std::fs::metadata(&up).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(user_password(&cfg, user).unwrap().len(), 32);
        let p = password_file(&cfg, DnRole::Replication);
        assert_eq!(p, dir.path().join("secrets/mpp_replication.password"));
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let dmode = std::fs::metadata(p.parent().unwrap())
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(dmode, 0o700);
        let pw = read_password(&cfg, DnRole::Replication).unwrap();
        assert_eq!(pw.len(), 32);
        assert_ne!(pw, read_password(&cfg, DnRole::Monitor).unwrap());
        // A second run keeps every password.
        assert!(init_password_files(&cfg).unwrap().is_empty());
        assert_eq!(read_password(&cfg, DnRole::Replication).unwrap(), pw);
    }

    #[test]
    fn a_missing_or_empty_file_is_one_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = cfg(dir.path());
        let e = read_password(&cfg, DnRole::Monitor)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("monitor_password_file") && e.contains("missing"),
            "{e}"
        );
        std::fs::create_dir_all(dir.path().join("secrets")).unwrap();
        std::fs::write(password_file(&cfg, DnRole::Monitor), "\n").unwrap();
        let e = read_password(&cfg, DnRole::Monitor)
            .unwrap_err()
            .to_string();
        assert!(e.contains("empty"), "{e}");
    }

    #[test]
    fn pgpass_escapes_separators() {
        assert_eq!(
            pgpass_line(DnRole::Replication, r"a:b\c"),
            "*:*:*:mpp_replication:a\\:b\\\\c\n"
        );
        assert_eq!(sql_literal("it's"), "'it''s'");
    }
}
