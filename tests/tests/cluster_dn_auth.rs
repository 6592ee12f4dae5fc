//! DN authentication (issue 10): after `cm_ctl local up`, a DN port refuses psql without
//! a password and with a wrong one, and takes the role's password from its file; the
//! password files `local up` made are the OS user's, mode 0600, and no config file
//! holds a password.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::process::Command;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use ha_common::dn_auth::{self, DnRole};
use mpp_ha_tests::{connect_with, LocalCluster};

const PORT_BASE: u16 = 40000;

/// `psql -w` (never prompts) to `port` as `user` running `SELECT 1`, with `password`
/// in PGPASSWORD (none: no password at all, not even from a ~/.pgpass): whether it
/// succeeded, and its output.
fn psql(c: &LocalCluster, port: u16, user: &str, password: Option<&str>) -> Result<(bool, String)> {
    let mut cmd = Command::new(c.cfg.cluster.pg_bin_dir.join("psql"));
    cmd.arg("-w")
        .arg(format!(
            "host=127.0.0.1 port={port} user={user} dbname=postgres connect_timeout=10"
        ))
        .args(["-Atc", "SELECT 1"])
        .env_remove("PGPASSWORD")
        .env("PGPASSFILE", "/dev/null");
    if let Some(p) = password {
        cmd.env("PGPASSWORD", p);
    }
    let out = cmd.output().context("run psql")?;
    Ok((
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dn_ports_refuse_logins_without_the_roles_passwords() -> Result<()> {
    let c = LocalCluster::new("cluster-dn-auth", PORT_BASE);
    // The harness made the password files when it wrote the config; `local up` must
    // make them itself on a first start.
    let secrets = dn_auth::dir(&c.cfg);
    std::fs::remove_dir_all(&secrets).with_context(|| format!("remove {}", secrets.display()))?;
    c.up(120)?;

    // The files: the OS user's, 0600, in a directory only it may enter.
    let os_uid = nix::unistd::User::from_name(&c.cfg.cluster.os_user)?
        .context("the OS user")?
        .uid
        .as_raw();
    let dir_meta = std::fs::metadata(&secrets)?;
    ensure!(
        dir_meta.permissions().mode() & 0o777 == 0o700 && dir_meta.uid() == os_uid,
        "{} must be mode 0700 owned by {}",
        secrets.display(),
        c.cfg.cluster.os_user
    );
    let mut passwords = Vec::new();
    for role in DnRole::ALL {
        let file = dn_auth::password_file(&c.cfg, role);
        let meta = std::fs::metadata(&file).with_context(|| format!("{}", file.display()))?;
        ensure!(
            meta.permissions().mode() & 0o777 == 0o600,
            "{} has mode {:o}, not 0600",
            file.display(),
            meta.permissions().mode() & 0o777
        );
        ensure!(
            meta.uid() == os_uid,
            "{} is not owned by the OS user",
            file.display()
        );
        passwords.push((role, dn_auth::read_password(&c.cfg, role)?));
    }
    let admin_pw = dn_auth::read_password(&c.cfg, DnRole::Admin)?;

    for dn in ["dn1_h1", "dn1_h2"] {
        let port = c.port(dn);
        // No password: refused, as the superuser too (trust is only its local socket).
        for user in ["mpp_admin", "postgres"] {
            let (ok, out) = psql(&c, port, user, None)?;
            ensure!(
                !ok && out.contains("no password supplied"),
                "{dn}: psql as {user} without a password must be refused: {out}"
            );
        }
        // A wrong password: refused.
        let (ok, out) = psql(&c, port, "mpp_admin", Some("not-the-password"))?;
        ensure!(
            !ok && out.contains("password authentication failed for user \"mpp_admin\""),
            "{dn}: a wrong password must be refused: {out}"
        );
        let (ok, out) = psql(&c, port, "postgres", Some(&admin_pw))?;
        ensure!(
            !ok && out.contains("password authentication failed"),
            "{dn}: the superuser has no TCP login at all: {out}"
        );
        // Each role's own password: accepted (on the standby too: the roles came with
        // the WAL).
        for (role, pw) in &passwords {
            let (ok, out) = psql(&c, port, role.name(), Some(pw))?;
            ensure!(
                ok && out.trim() == "1",
                "{dn}: {} with its password must log in: {out}",
                role.name()
            );
        }
    }

    // The monitoring role reads but cannot write; the replication role cannot write.
    let port = c.port("dn1_h1");
    let t = Duration::from_secs(5);
    for role in [DnRole::Monitor, DnRole::Replication] {
        let pw = dn_auth::read_password(&c.cfg, role)?;
        let db = connect_with("127.0.0.1", port, role.name(), Some(&pw), t).await?;
        ensure!(
            db.batch_execute("CREATE TABLE not_allowed (id int)")
                .await
                .is_err(),
            "{} must not create tables",
            role.name()
        );
    }

    // No config file holds a password in the clear.
    let cluster_toml = std::fs::read_to_string(&c.config)?;
    let mpp_conf = std::fs::read_to_string(
        c.cfg
            .instance_dir("dn1_h2")
            .join("data")
            .join(cm_agent::postgres::SETTINGS_FILE),
    )?;
    for (_, pw) in &passwords {
        ensure!(
            !cluster_toml.contains(pw.as_str()),
            "the config holds a password"
        );
        ensure!(
            !mpp_conf.contains(pw.as_str()),
            "mpp_ha.conf holds a password: {mpp_conf}"
        );
    }
    ensure!(
        mpp_conf.contains("user=mpp_replication passfile="),
        "the standby streams as the replication role with a password file: {mpp_conf}"
    );
    Ok(())
}
