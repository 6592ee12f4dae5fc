//! Our binaries that PostgreSQL itself runs as the OS user (the standby's
//! `restore_command` runs `dn_replicator restore-wal`): installed as a copy in
//! `<base_dir>/bin`, root-owned and 0755, because the OS user may not reach the
//! directory the agent's binaries were built or unpacked in (a CI checkout below a
//! 0700 `mktemp -d`, a home directory).

use std::fs::File;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use ha_common::config::ClusterConfig;

use crate::error::{AgentError, Result};

/// The directory below `cluster.base_dir` holding the copies.
const TOOLS_DIR: &str = "bin";

/// Where `program`'s copy lives: `<base_dir>/bin/<program>`. The path the
/// `restore_command` names, known without installing.
pub fn installed_path(cfg: &ClusterConfig, program: &str) -> PathBuf {
    cfg.cluster.base_dir.join(TOOLS_DIR).join(program)
}

/// Copies `source` (`<bin_dir>/<program>`) to `dest` ([`installed_path`]) unless an
/// identical copy (same size and modification time) is already there, and checks that
/// the OS user can run it; `ids` is that user's (uid, gid), None when the agent runs as
/// that user itself (nothing to check: it runs what it can reach). Returns `dest`.
pub fn install(source: &Path, dest: &Path, ids: Option<(u32, u32)>) -> Result<PathBuf> {
    let src_meta = std::fs::metadata(source).map_err(|e| AgentError::io("stat", source, e))?;
    let dir = dest
        .parent()
        .ok_or_else(|| AgentError::Instance(format!("{}: no parent directory", dest.display())))?;
    std::fs::create_dir_all(dir).map_err(|e| AgentError::io("create directory", dir, e))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))
        .map_err(|e| AgentError::io("chmod", dir, e))?;
    if !same_file_content(&src_meta, dest) {
        copy_atomically(source, &src_meta, dest)?;
    }
    if let Some((uid, gid)) = ids {
        if let Some(problem) = blocked_for(dest, uid, gid) {
            return Err(AgentError::NotRunnable {
                path: dest.to_owned(),
                uid,
                problem,
            });
        }
    }
    Ok(dest.to_owned())
}

/// Whether `dest` is already a copy of the file `src` describes: a copy gets the
/// source's modification time, so size + mtime tell a rebuilt binary apart.
fn same_file_content(src: &std::fs::Metadata, dest: &Path) -> bool {
    std::fs::metadata(dest).is_ok_and(|d| {
        d.len() == src.len() && d.mtime() == src.mtime() && d.mtime_nsec() == src.mtime_nsec()
    })
}

/// Copy to a temp file, fsync, mode 0755, the source's mtime, rename over `dest`, fsync
/// the directory. The rename never disturbs a `restore_command` running the old copy
/// (no ETXTBSY), and agents of one machine sharing a base dir use distinct temp names.
fn copy_atomically(source: &Path, src_meta: &std::fs::Metadata, dest: &Path) -> Result<()> {
    let dir = dest.parent().unwrap_or(Path::new("."));
    let name = dest.file_name().and_then(|n| n.to_str()).unwrap_or("tool");
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let result = (|| {
        std::fs::copy(source, &tmp).map_err(|e| AgentError::io("copy to", &tmp, e))?;
        let f = File::options()
            .write(true)
            .open(&tmp)
            .map_err(|e| AgentError::io("open", &tmp, e))?;
        f.set_permissions(std::fs::Permissions::from_mode(0o755))
            .map_err(|e| AgentError::io("chmod", &tmp, e))?;
        if let Ok(mtime) = src_meta.modified() {
            f.set_modified(mtime)
                .map_err(|e| AgentError::io("set mtime", &tmp, e))?;
        }
        f.sync_all().map_err(|e| AgentError::io("fsync", &tmp, e))?;
        std::fs::rename(&tmp, dest).map_err(|e| AgentError::io("rename to", dest, e))?;
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| AgentError::io("fsync", dir, e))
    })();
    match &result {
        Ok(()) => tracing::info!("installed {} (from {})", dest.display(), source.display()),
        Err(_) => {
            let _ = std::fs::remove_file(&tmp);
        }
    }
    result
}

/// Why user `uid` (primary group `gid`; supplementary groups are dropped when the
/// agent switches to it) cannot execute `file`: the first directory on the way it
/// cannot enter, or the file itself. None when it can.
pub fn blocked_for(file: &Path, uid: u32, gid: u32) -> Option<String> {
    let may_x = |m: &std::fs::Metadata| {
        let mode = m.mode();
        uid == 0
            || if m.uid() == uid {
                mode & 0o100 != 0
            } else if m.gid() == gid {
                mode & 0o010 != 0
            } else {
                mode & 0o001 != 0
            }
    };
    let mut dirs: Vec<&Path> = file.ancestors().skip(1).collect();
    dirs.reverse();
    for d in dirs.into_iter().filter(|d| !d.as_os_str().is_empty()) {
        match std::fs::metadata(d) {
            Ok(m) if may_x(&m) => {}
            Ok(m) => {
                return Some(format!(
                    "directory {} (mode {:o}, owner uid {}) is not searchable by it: \
                     give it o+x or choose a cluster.base_dir it can reach",
                    d.display(),
                    m.mode() & 0o7777,
                    m.uid()
                ))
            }
            Err(e) => return Some(format!("directory {}: {e}", d.display())),
        }
    }
    match std::fs::metadata(file) {
        Ok(m) if may_x(&m) => None,
        Ok(m) => Some(format!(
            "the file (mode {:o}, owner uid {}) is not executable by it",
            m.mode() & 0o7777,
            m.uid()
        )),
        Err(e) => Some(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set_mode(p: &Path, mode: u32) {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).expect("chmod");
    }

    /// A uid/gid that owns none of the test's files.
    const OTHER: (u32, u32) = (54321, 54321);

    fn fixture() -> (tempfile::TempDir, PathBuf, PathBuf) {
        let t = tempfile::tempdir().expect("tempdir");
        set_mode(t.path(), 0o755);
        let src = t.path().join("build/dn_replicator");
        std::fs::create_dir_all(src.parent().expect("parent")).expect("mkdir");
        std::fs::write(&src, b"#!/bin/sh\necho v1\n").expect("write");
        set_mode(&src, 0o700);
        let dest = t.path().join("base/bin/dn_replicator");
        (t, src, dest)
    }

    #[test]
    fn installs_a_runnable_copy_from_a_private_build_dir() {
        let (_t, src, dest) = fixture();
        // The build dir is private (a CI clone below a 0700 mktemp -d).
        set_mode(src.parent().expect("parent"), 0o700);
        assert!(blocked_for(&src, OTHER.0, OTHER.1).is_some());
        let got = install(&src, &dest, Some(OTHER)).expect("install");
        assert_eq!(got, dest);
        assert_eq!(std::fs::read(&dest).expect("read"), b"#!/bin/sh\necho v1\n");
        let m = std::fs::metadata(&dest).expect("stat");
        assert_eq!(m.mode() & 0o7777, 0o755);
        assert_eq!(blocked_for(&dest, OTHER.0, OTHER.1), None);
    }

    #[test]
    fn a_changed_binary_is_copied_again_and_an_unchanged_one_is_not() {
        let (_t, src, dest) = fixture();
        install(&src, &dest, None).expect("install");
        let first = std::fs::metadata(&dest).expect("stat").ino();
        install(&src, &dest, None).expect("install again");
        assert_eq!(
            std::fs::metadata(&dest).expect("stat").ino(),
            first,
            "an unchanged source is not copied again"
        );
        // A rebuilt binary: other size, later mtime.
        std::fs::write(&src, b"#!/bin/sh\necho version two\n").expect("write");
        install(&src, &dest, None).expect("install new");
        assert_eq!(
            std::fs::read(&dest).expect("read"),
            b"#!/bin/sh\necho version two\n"
        );
    }

    #[test]
    fn an_unreachable_base_dir_is_a_clear_error() {
        let (t, src, dest) = fixture();
        set_mode(t.path(), 0o700);
        let e = install(&src, &dest, Some(OTHER))
            .expect_err("the OS user cannot reach the copy")
            .to_string();
        set_mode(t.path(), 0o755);
        assert!(e.contains(&dest.display().to_string()), "{e}");
        assert!(e.contains(&t.path().display().to_string()), "{e}");
        assert!(e.contains("not searchable"), "{e}");
        assert!(e.contains("mode 700"), "{e}");
    }

    #[test]
    fn a_missing_source_binary_is_named() {
        let (_t, src, dest) = fixture();
        std::fs::remove_file(&src).expect("rm");
        let e = install(&src, &dest, None).expect_err("missing").to_string();
        assert!(e.contains(&src.display().to_string()), "{e}");
        assert!(!dest.exists());
    }

    #[test]
    fn group_and_owner_bits_count_for_the_right_user() {
        let (t, src, _dest) = fixture();
        let dir = src.parent().expect("parent");
        let m = std::fs::metadata(dir).expect("stat");
        set_mode(dir, 0o710);
        // Group members (by primary gid) may enter, others may not.
        assert_eq!(blocked_for(&src, OTHER.0, m.gid()).map(|_| ()), Some(()));
        set_mode(&src, 0o750);
        assert_eq!(blocked_for(&src, OTHER.0, m.gid()), None);
        assert!(blocked_for(&src, OTHER.0, OTHER.1).is_some());
        drop(t);
    }
}
