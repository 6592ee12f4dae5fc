//! One PostgreSQL DN instance on this host: creating its data (initdb or
//! pg_basebackup), configuring it for its DN group, starting and stopping it with
//! pg_ctl, watching its postmaster and probing it over TCP.
//!
//! Every PostgreSQL tool runs as the config's `os_user` ([`OsUser`]): never as root.

use std::path::{Path, PathBuf};
use std::time::Duration;

use ha_common::config::{ClusterConfig, DnGroup, Role};
use ha_common::dn_auth::{self, DnRole, PasswordFiles};
use ha_common::lsn::parse_lsn;
use ha_common::proto::cm::ReplicaState;

use crate::error::{AgentError, Result};
use crate::os_tools;
use crate::os_user::OsUser;
use crate::process;

/// Our settings live in this file inside the data dir, included from postgresql.conf.
pub const SETTINGS_FILE: &str = "mpp_ha.conf";
const INCLUDE_LINE: &str = "include_if_exists = 'mpp_ha.conf'";
/// The database superuser created by initdb. Only the agent uses it, on the instance's
/// own Unix socket (pg_hba trusts nothing else); TCP clients log in as the
/// [`DnRole`]s with their passwords.
pub const SUPERUSER: &str = "postgres";
/// The libpq password file (in the instance dir, the OS user's, 0600) that
/// primary_conninfo, pg_basebackup and pg_rewind read the replication password from.
pub const PGPASS_FILE: &str = "pgpass";
/// A Unix socket path longer than this (sun_path less its NUL) cannot be bound.
const MAX_SOCKET_PATH: usize = 107;
/// pg_ctl's own wait limit (seconds) for start, stop and promote.
const PG_CTL_TIMEOUT_S: &str = "120";

/// Where a standby streams from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    pub host: String,
    pub port: u16,
}

/// What the agent writes into `mpp_ha.conf` for one instance in one role.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgSettings {
    pub instance: String,
    pub listen_address: String,
    pub port: u16,
    /// Names of the other members of the group, in the order they should be preferred
    /// as the synchronous standby (full copies first, then the secondary).
    pub sync_standbys: Vec<String>,
    /// Some for a standby: its primary.
    pub upstream: Option<Upstream>,
    /// A standby's `restore_command`: fetch WAL from the group's secondary (what it
    /// lacks when its primary is gone, the partial last segment included).
    pub restore_command: Option<String>,
    /// `wal_sender_timeout` (and the standby's `wal_receiver_timeout`): a link that
    /// silently drops packets (a partition, not a refused connection) must end the
    /// replication connection within the failover timeout, or the primary's
    /// `pg_stat_replication` keeps showing the lost standby as synchronous for
    /// PostgreSQL's default minute, nobody moves the stream to the secondary, and every
    /// commit hangs that long (issue 9 §3 c).
    pub replication_timeout_ms: u64,
    /// The instance dir: its Unix socket (the agent's superuser access) and the
    /// password file a standby's primary_conninfo names.
    pub instance_dir: PathBuf,
}

impl PgSettings {
    /// The settings of `instance` in `group`; `upstream` makes it a standby.
    pub fn for_member(
        cfg: &ClusterConfig,
        group: &DnGroup,
        instance: &str,
        upstream: Option<Upstream>,
    ) -> Result<PgSettings> {
        let me = group
            .members
            .iter()
            .find(|m| m.name == instance)
            .ok_or_else(|| {
                AgentError::Instance(format!(
                    "{instance} is not a member of DN group {}",
                    group.name
                ))
            })?;
        Ok(PgSettings {
            instance: instance.to_owned(),
            listen_address: cfg.address_of(me).to_owned(),
            port: me.port(),
            sync_standbys: sync_standby_order(group, instance),
            restore_command: upstream
                .as_ref()
                .and_then(|_| restore_from_secondary(cfg, group, &me.host)),
            upstream,
            replication_timeout_ms: u64::try_from(cfg.timing.dn_failover_timeout().as_millis())
                .unwrap_or(u64::MAX),
            instance_dir: cfg.instance_dir(instance),
        })
    }

    pub fn is_standby(&self) -> bool {
        self.upstream.is_some()
    }
}

/// The other members of `group` as seen from `me`: the full copies (primary/standby
/// members) first, the secondary (WAL-only) last, each in config order. When `me` is
/// the primary that is "standby, then secondary"; after a failover the former
/// primary comes first in the new primary's list.
pub fn sync_standby_order(group: &DnGroup, me: &str) -> Vec<String> {
    let others = || group.members.iter().filter(move |m| m.name != me);
    others()
        .filter(|m| m.role() != Some(Role::Secondary))
        .chain(others().filter(|m| m.role() == Some(Role::Secondary)))
        .map(|m| m.name.clone())
        .collect()
}

/// The program of a standby's `restore_command`.
const RESTORE_TOOL: &str = "dn_replicator";

/// `dn_replicator restore-wal` from the group's secondary, if it has one, for a
/// member on `host`.
pub fn restore_from_secondary(cfg: &ClusterConfig, group: &DnGroup, host: &str) -> Option<String> {
    let sec = group
        .members
        .iter()
        .find(|m| m.role() == Some(Role::Secondary))?;
    // `|| exit 1`: a missing binary (shell status 127) or any failure must read as "not
    // available" to recovery, which treats 127 and above as fatal. The copy in
    // `<base_dir>/bin` (see [`os_tools`]): the OS user may not reach `bin_dir`.
    // With TLS on it presents its host's `restore` certificate, the OS user's own.
    let tls = if cfg.tls.enabled {
        format!(" --tls-dir {} --host {host}", cfg.tls_dir().display())
    } else {
        String::new()
    };
    Some(format!(
        "{} restore-wal --from {}{tls} %f %p || exit 1",
        os_tools::installed_path(cfg, RESTORE_TOOL).display(),
        cfg.endpoint(sec)
    ))
}

/// Quotes a value for postgresql.conf.
fn conf_quote(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

/// `primary_conninfo` for a standby named `application_name` (the name its primary
/// lists in `synchronous_standby_names`): the replication role, its password from
/// `passfile` (never the password itself: postgresql.conf is readable by more tools).
pub fn primary_conninfo(upstream: &Upstream, application_name: &str, passfile: &Path) -> String {
    format!(
        "host={} port={} user={} passfile={} application_name={application_name}",
        upstream.host,
        upstream.port,
        DnRole::Replication.name(),
        passfile.display()
    )
}

/// The text of `mpp_ha.conf`.
pub fn render_settings(s: &PgSettings) -> String {
    let names: Vec<String> = s.sync_standbys.iter().map(|n| format!("\"{n}\"")).collect();
    let sync = if names.is_empty() {
        String::new()
    } else {
        format!("FIRST 1 ({})", names.join(", "))
    };
    let role = if s.is_standby() { "standby" } else { "primary" };
    let mut out = format!(
        "# Written by cm_agent for {name} ({role}). Do not edit: the agent rewrites it.\n\
         listen_addresses = {listen}\n\
         port = {port}\n\
         # The only socket is in the instance dir (the OS user's, 0750): the agent's\n\
         # superuser access, trusted by pg_hba; every TCP login needs a SCRAM password.\n\
         unix_socket_directories = {socket_dir}\n\
         password_encryption = 'scram-sha-256'\n\
         cluster_name = {name_q}\n\
         wal_level = replica\n\
         hot_standby = on\n\
         wal_log_hints = on\n\
         synchronous_commit = on\n\
         synchronous_standby_names = {sync}\n\
         max_wal_senders = 10\n\
         # CNs commit DDL and multi-group transactions by two-phase commit.\n\
         max_prepared_transactions = 100\n\
         max_replication_slots = 10\n\
         wal_keep_size = '256MB'\n\
         hot_standby_feedback = on\n\
         # A silently dropping link ends replication within the failover timeout (the\n\
         # sender asks for a reply after half of it).\n\
         wal_sender_timeout = {repl_timeout}\n\
         wal_receiver_timeout = {repl_timeout}\n\
         # Logs go to the file pg_ctl -l names (<instance_dir>/postgresql.log).\n\
         logging_collector = off\n\
         log_destination = 'stderr'\n\
         log_line_prefix = '%m [%p] '\n",
        name = s.instance,
        listen = conf_quote(&s.listen_address),
        port = s.port,
        name_q = conf_quote(&s.instance),
        sync = conf_quote(&sync),
        repl_timeout = s.replication_timeout_ms,
        socket_dir = conf_quote(&s.instance_dir.display().to_string()),
    );
    if let Some(up) = &s.upstream {
        out.push_str(&format!(
            "primary_conninfo = {}\nrecovery_target_timeline = 'latest'\n",
            conf_quote(&primary_conninfo(
                up,
                &s.instance,
                &s.instance_dir.join(PGPASS_FILE)
            ))
        ));
        if let Some(rc) = &s.restore_command {
            out.push_str(&format!("restore_command = {}\n", conf_quote(rc)));
        }
    }
    out
}

/// The text of pg_hba.conf: the database superuser by trust on the instance's own
/// Unix socket only (its directory is the OS user's: the agent and the OS user reach
/// it), other roles on that socket with SCRAM passwords (a CN on the same host), SCRAM
/// passwords for every TCP connection from loopback and the cluster's hosts,
/// replication included; nothing else connects.
pub fn render_hba(addresses: &[String]) -> String {
    let mut out = format!(
        "# Written by cm_agent. Do not edit: the agent rewrites it.\n\
         # Trust only on the local socket (in the instance dir, reachable by the OS user\n\
         # and the agent); every TCP login needs a SCRAM-SHA-256 password\n\
         # ({repl}, {mon}, {admin}: see [dn_auth] in the config).\n\
         local   all          {SUPERUSER}            trust\n\
         # The other roles on the same socket with their passwords: a CN on this host\n\
         # reaches its DN without the loopback TCP stack.\n\
         local   all          all                 scram-sha-256\n\
         host    all          all   127.0.0.1/32  scram-sha-256\n\
         host    replication  all   127.0.0.1/32  scram-sha-256\n\
         host    all          all   ::1/128       scram-sha-256\n\
         host    replication  all   ::1/128       scram-sha-256\n",
        repl = DnRole::Replication.name(),
        mon = DnRole::Monitor.name(),
        admin = DnRole::Admin.name(),
    );
    let mut seen = std::collections::BTreeSet::new();
    for a in addresses {
        let cidr = match a.parse::<std::net::IpAddr>() {
            Ok(ip) if ip.is_loopback() => continue,
            Ok(std::net::IpAddr::V4(ip)) => format!("{ip}/32"),
            Ok(std::net::IpAddr::V6(ip)) => format!("{ip}/128"),
            Err(_) => a.clone(),
        };
        if seen.insert(cidr.clone()) {
            out.push_str(&format!(
                "host    all          all   {cidr}  scram-sha-256\n"
            ));
            out.push_str(&format!(
                "host    replication  all   {cidr}  scram-sha-256\n"
            ));
        }
    }
    out
}

/// The SQL that makes (or brings up to date) the [`DnRole`]s on a primary, with
/// `passwords` in [`DnRole::ALL`] order. Idempotent.
pub fn roles_sql(passwords: &[String; 3]) -> String {
    let [repl, mon, admin] = DnRole::ALL.map(DnRole::name);
    let lit = |r: DnRole| dn_auth::sql_literal(&passwords[r as usize]);
    let mut sql = String::from("DO $$ BEGIN\n");
    for r in DnRole::ALL {
        sql.push_str(&format!(
            "  IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{0}') THEN CREATE ROLE {0}; END IF;\n",
            r.name()
        ));
    }
    sql.push_str("END $$;\n");
    sql.push_str(&format!(
        "ALTER ROLE {repl} WITH LOGIN REPLICATION NOSUPERUSER PASSWORD {};\n\
         ALTER ROLE {mon} WITH LOGIN NOREPLICATION NOSUPERUSER PASSWORD {};\n\
         GRANT pg_monitor TO {mon};\n\
         GRANT EXECUTE ON FUNCTION pg_catalog.pg_control_checkpoint() TO {mon};\n\
         ALTER ROLE {admin} WITH LOGIN SUPERUSER PASSWORD {};\n",
        lit(DnRole::Replication),
        lit(DnRole::Monitor),
        lit(DnRole::Admin),
    ));
    // pg_rewind as a non-superuser (its documented grants), and the build source's
    // backup on its own session (dn_replicator::build_source).
    for f in [
        "pg_ls_dir(text, boolean, boolean)",
        "pg_stat_file(text, boolean)",
        "pg_read_binary_file(text)",
        "pg_read_binary_file(text, bigint, bigint, boolean)",
        "pg_backup_start(text, boolean)",
        "pg_backup_stop(boolean)",
    ] {
        sql.push_str(&format!(
            "GRANT EXECUTE ON FUNCTION pg_catalog.{f} TO {repl};\n"
        ));
    }
    sql
}

/// What a probe of a running instance found.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PgProbe {
    pub in_recovery: bool,
    pub timeline: u32,
    /// Primary: pg_current_wal_lsn().
    pub current_lsn: u64,
    /// Primary: pg_current_wal_flush_lsn(); standby: the receive LSN.
    pub flush_lsn: u64,
    /// Standby: pg_last_wal_receive_lsn().
    pub receive_lsn: u64,
    /// Standby: pg_last_wal_replay_lsn().
    pub replay_lsn: u64,
    /// Primary: pg_stat_replication.
    pub replicas: Vec<ReplicaState>,
}

/// One PostgreSQL instance of a DN group, placed on this host.
#[derive(Debug, Clone)]
pub struct PgInstance {
    pub name: String,
    pub instance_dir: PathBuf,
    pub data_dir: PathBuf,
    pub log_file: PathBuf,
    pub address: String,
    pub port: u16,
    pub pg_bin_dir: PathBuf,
    pub os_user: OsUser,
    /// Addresses trusted in pg_hba.conf (every host of the cluster).
    pub trusted_addresses: Vec<String>,
    /// The `restore_command`'s program as built (`<bin_dir>/dn_replicator`) and the
    /// copy the OS user runs (`<base_dir>/bin/dn_replicator`).
    pub restore_tool: (PathBuf, PathBuf),
    /// The DN roles' password files (read when used).
    pub passwords: PasswordFiles,
}

impl PgInstance {
    /// The instance named `name` in `cfg` (a DN group member).
    pub fn from_config(cfg: &ClusterConfig, name: &str, os_user: OsUser) -> Result<PgInstance> {
        let r = cfg
            .find(name)
            .filter(|r| r.group.is_some())
            .ok_or_else(|| {
                AgentError::Instance(format!("{name} is not a DN group member of the config"))
            })?;
        let instance_dir = cfg.instance_dir(name);
        Ok(PgInstance {
            name: name.to_owned(),
            data_dir: instance_dir.join("data"),
            log_file: instance_dir.join("postgresql.log"),
            instance_dir,
            address: cfg.address_of(r.instance).to_owned(),
            port: r.instance.port(),
            pg_bin_dir: cfg.cluster.pg_bin_dir.clone(),
            os_user,
            trusted_addresses: cfg.hosts.iter().map(|h| h.address.clone()).collect(),
            restore_tool: (
                cfg.bin_dir().join(RESTORE_TOOL),
                os_tools::installed_path(cfg, RESTORE_TOOL),
            ),
            passwords: PasswordFiles::for_config(cfg),
        })
    }

    fn tool(&self, name: &str) -> PathBuf {
        self.pg_bin_dir.join(name)
    }

    /// Whether the data dir holds a cluster. pg_basebackup copies global/pg_control
    /// last, so a half-copied dir does not count.
    pub fn has_data(&self) -> bool {
        self.data_dir.join("PG_VERSION").exists()
            && self.data_dir.join("global/pg_control").exists()
    }

    /// Whether the data dir is set up to start as a standby.
    pub fn configured_as_standby(&self) -> bool {
        self.data_dir.join("standby.signal").exists()
    }

    /// Creates the instance dir owned by the OS user (the data dir goes below it).
    pub fn prepare_dirs(&self) -> Result<()> {
        if let Some(base) = self.instance_dir.parent() {
            if !base.exists() {
                std::fs::create_dir_all(base)
                    .map_err(|e| AgentError::io("create directory", base, e))?;
            }
        }
        self.os_user.create_owned_dir(&self.instance_dir, 0o750)
    }

    /// Removes a data dir left half-made (no pg_control) by an interrupted initdb or
    /// pg_basebackup, which would otherwise refuse the non-empty directory.
    fn clear_partial_data(&self) -> Result<()> {
        if self.data_dir.exists() && !self.has_data() {
            tracing::warn!(instance = %self.name, "removing the half-made data dir {}", self.data_dir.display());
            std::fs::remove_dir_all(&self.data_dir)
                .map_err(|e| AgentError::io("remove", &self.data_dir, e))?;
        }
        Ok(())
    }

    /// Runs a PostgreSQL tool as the OS user; its output is returned, or in the error.
    async fn run(&self, tool: &str, args: &[&str]) -> Result<String> {
        let program = self.tool(tool);
        let mut cmd = self.os_user.command(&program, &self.instance_dir);
        cmd.args(args)
            .env("LC_ALL", "C")
            .env_remove("PGDATA")
            .env_remove("PGPASSWORD")
            // pg_basebackup and pg_rewind log in as the replication role.
            .env("PGPASSFILE", self.pgpass_path());
        // pg_ctl starts the postmaster: keep it out of the agent's process group so
        // that signals aimed at the agent never reach it.
        cmd.process_group(0);
        tracing::debug!(instance = %self.name, "{} {}", program.display(), args.join(" "));
        let out = cmd.output().await.map_err(|source| AgentError::Spawn {
            program: program.display().to_string(),
            source,
        })?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if out.status.success() {
            Ok(text)
        } else {
            Err(AgentError::Command {
                program: format!("{tool} ({})", self.name),
                status: out.status.to_string(),
                output: last_lines(&text, 6),
            })
        }
    }

    fn data_arg(&self) -> String {
        self.data_dir.display().to_string()
    }

    /// The libpq password file of this instance.
    pub fn pgpass_path(&self) -> PathBuf {
        self.instance_dir.join(PGPASS_FILE)
    }

    /// Writes the libpq password file (replication role) from the password files,
    /// owned by the OS user, 0600 (libpq ignores a more open one).
    pub fn write_pgpass(&self) -> Result<()> {
        let pw = self.password(DnRole::Replication)?;
        let text = dn_auth::pgpass_line(DnRole::Replication, &pw);
        let path = self.pgpass_path();
        if std::fs::read_to_string(&path).ok().as_deref() != Some(text.as_str()) {
            self.write_owned(&path, &text)?;
        }
        Ok(())
    }

    fn password(&self, role: DnRole) -> Result<String> {
        self.passwords
            .read(role)
            .map_err(|e| AgentError::Instance(format!("{}: {e}", self.name)))
    }

    /// The socket dir must fit a Unix socket path, or PostgreSQL refuses to start.
    fn check_socket_path(&self) -> Result<()> {
        let sock = self.instance_dir.join(format!(".s.PGSQL.{}", self.port));
        let len = sock.as_os_str().len();
        if len > MAX_SOCKET_PATH {
            return Err(AgentError::Instance(format!(
                "{}: the socket path {} is {len} bytes, more than a Unix socket allows ({MAX_SOCKET_PATH}): use a shorter base_dir",
                self.name,
                sock.display()
            )));
        }
        Ok(())
    }

    /// Makes the [`DnRole`]s (or brings their passwords and rights up to date) on this
    /// running primary, as the superuser on its own socket. `synchronous_commit =
    /// local`: a primary just started has no synchronous standby yet, and the roles
    /// reach standbys with the WAL (or their base backup) all the same.
    pub async fn ensure_roles(&self, timeout: Duration) -> Result<()> {
        let passwords = [
            self.password(DnRole::Replication)?,
            self.password(DnRole::Monitor)?,
            self.password(DnRole::Admin)?,
        ];
        let mut socket = tokio_postgres::Config::new();
        socket
            .host_path(&self.instance_dir)
            .port(self.port)
            .user(SUPERUSER)
            .dbname("postgres")
            .application_name("cm_agent")
            .connect_timeout(timeout);
        // A server started before DN auth (no socket yet, pg_hba still trusting TCP)
        // is reached as the superuser over TCP, so that it gets its roles before our
        // pg_hba is loaded.
        let mut tcp = socket.clone();
        tcp.host(&self.address);
        let err =
            |e: String| AgentError::Instance(format!("{}: creating the DN roles: {e}", self.name));
        let work = async {
            let (client, conn) = match socket.connect(tokio_postgres::NoTls).await {
                Ok(c) => c,
                Err(e) => tcp.connect(tokio_postgres::NoTls).await.map_err(|_| e)?,
            };
            tokio::spawn(async move {
                let _ = conn.await;
            });
            client
                .batch_execute(&format!(
                    "SET synchronous_commit = local;\nBEGIN;\n{}COMMIT;",
                    roles_sql(&passwords)
                ))
                .await
        };
        tokio::time::timeout(timeout, work)
            .await
            .map_err(|_| err(format!("timed out after {timeout:?}")))?
            .map_err(|e| err(e.to_string()))
    }

    /// A new primary: initdb with checksums, superuser `postgres`, trust only on the
    /// local socket and SCRAM passwords over TCP (our pg_hba.conf replaces initdb's).
    pub async fn initdb(&self) -> Result<()> {
        self.prepare_dirs()?;
        self.clear_partial_data()?;
        let data = self.data_arg();
        self.run(
            "initdb",
            &[
                "--data-checksums",
                "-D",
                &data,
                "-U",
                SUPERUSER,
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                // Every DN of the cluster must sort text the same way.
                "--locale=C",
                "--encoding=UTF8",
            ],
        )
        .await?;
        Ok(())
    }

    /// A new standby: a copy of `upstream` (WAL streamed during the copy).
    pub async fn basebackup(&self, upstream: &Upstream) -> Result<()> {
        self.prepare_dirs()?;
        self.clear_partial_data()?;
        self.write_pgpass()?;
        let data = self.data_arg();
        let port = upstream.port.to_string();
        let result = self
            .run(
                "pg_basebackup",
                &[
                    "-D",
                    &data,
                    "-h",
                    &upstream.host,
                    "-p",
                    &port,
                    "-U",
                    DnRole::Replication.name(),
                    "-X",
                    "stream",
                    "-R",
                    "--checkpoint=fast",
                    "--no-password",
                ],
            )
            .await;
        if result.is_err() {
            // Never leave a partial copy behind: the next attempt starts over.
            let _ = self.clear_partial_data();
        }
        result.map(|_| ())
    }

    /// Writes our settings (`mpp_ha.conf`, pg_hba.conf, standby.signal) for `settings`.
    /// Returns whether `mpp_ha.conf` or pg_hba.conf changed (a running server then
    /// needs a reload).
    pub fn configure(&self, settings: &PgSettings) -> Result<bool> {
        if settings.restore_command.is_some() {
            // Before PostgreSQL may call it: a copy the OS user can run (a clear error
            // here, not "Permission denied" in the server log and a standby that never
            // catches up from the secondary).
            let (source, copy) = &self.restore_tool;
            os_tools::install(source, copy, self.os_user.ids())?;
        }
        let conf = self.data_dir.join("postgresql.conf");
        let text = std::fs::read_to_string(&conf).map_err(|e| AgentError::io("read", &conf, e))?;
        if !text.lines().any(|l| l.trim() == INCLUDE_LINE) {
            let mut new = text;
            if !new.ends_with('\n') {
                new.push('\n');
            }
            new.push_str("\n# mpp-ha: the agent's settings for this instance.\n");
            new.push_str(INCLUDE_LINE);
            new.push('\n');
            self.write_owned(&conf, &new)?;
        }
        // pg_basebackup -R wrote a primary_conninfo without our application_name:
        // ours (in mpp_ha.conf) must be the only one.
        let auto = self.data_dir.join("postgresql.auto.conf");
        if let Ok(text) = std::fs::read_to_string(&auto) {
            if text
                .lines()
                .any(|l| l.trim_start().starts_with("primary_conninfo"))
            {
                let kept: String = text
                    .lines()
                    .filter(|l| !l.trim_start().starts_with("primary_conninfo"))
                    .map(|l| format!("{l}\n"))
                    .collect();
                self.write_owned(&auto, &kept)?;
            }
        }
        self.check_socket_path()?;
        self.write_pgpass()?;
        let hba = self.data_dir.join("pg_hba.conf");
        let hba_text = render_hba(&self.trusted_addresses);
        let mut changed = false;
        if std::fs::read_to_string(&hba).ok().as_deref() != Some(hba_text.as_str()) {
            self.write_owned(&hba, &hba_text)?;
            changed = true;
        }
        let signal = self.data_dir.join("standby.signal");
        if settings.is_standby() {
            if !signal.exists() {
                self.write_owned(&signal, "")?;
            }
        } else if signal.exists() {
            std::fs::remove_file(&signal).map_err(|e| AgentError::io("remove", &signal, e))?;
        }
        let path = self.data_dir.join(SETTINGS_FILE);
        let new = render_settings(settings);
        if std::fs::read_to_string(&path).ok().as_deref() != Some(new.as_str()) {
            self.write_owned(&path, &new)?;
            changed = true;
        }
        Ok(changed)
    }

    /// Writes a file atomically (temp file + rename), owned by the OS user, mode 0600.
    fn write_owned(&self, path: &Path, text: &str) -> Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let tmp = path.with_extension("mpp_ha_tmp");
        std::fs::write(&tmp, text).map_err(|e| AgentError::io("write", &tmp, e))?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| AgentError::io("chmod", &tmp, e))?;
        self.os_user.chown(&tmp)?;
        std::fs::rename(&tmp, path).map_err(|e| AgentError::io("rename", path, e))
    }

    /// The postmaster's pid if one is running on this data dir (postmaster.pid names
    /// a live postgres whose working directory is this data dir, see
    /// [`process::postmaster_of`]).
    pub fn postmaster_pid(&self) -> Option<u32> {
        process::postmaster_of(&self.data_dir)
    }

    pub fn is_running(&self) -> bool {
        self.postmaster_pid().is_some()
    }

    /// Starts it (pg_ctl -w): returns once it accepts connections. Refuses if a
    /// postmaster already runs on the data dir.
    pub async fn start(&self) -> Result<()> {
        if let Some(pid) = self.postmaster_pid() {
            return Err(AgentError::Instance(format!(
                "{}: a postmaster (pid {pid}) already runs on {}",
                self.name,
                self.data_dir.display()
            )));
        }
        // A postmaster.pid naming a dead process or a pid reused by another program
        // would make postgres refuse to start: it is stale, since no postgres runs.
        let pid_file = self.data_dir.join("postmaster.pid");
        if pid_file.exists() {
            let _ = std::fs::remove_file(&pid_file);
        }
        let data = self.data_arg();
        let log = self.log_file.display().to_string();
        self.run(
            "pg_ctl",
            &[
                "start",
                "-D",
                &data,
                "-w",
                "-t",
                PG_CTL_TIMEOUT_S,
                "-l",
                &log,
            ],
        )
        .await
        .map_err(|e| AgentError::Instance(format!("{e}; log: {}", self.log_tail(5))))?;
        Ok(())
    }

    /// Stops it with a fast shutdown (no-op if not running).
    pub async fn stop(&self) -> Result<()> {
        if !self.is_running() {
            return Ok(());
        }
        let data = self.data_arg();
        match self
            .run(
                "pg_ctl",
                &[
                    "stop",
                    "-D",
                    &data,
                    "-w",
                    "-t",
                    PG_CTL_TIMEOUT_S,
                    "-m",
                    "fast",
                ],
            )
            .await
        {
            Ok(_) => Ok(()),
            Err(_) if !self.is_running() => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Rereads the config files of a running server.
    pub async fn reload(&self) -> Result<()> {
        let data = self.data_arg();
        self.run("pg_ctl", &["reload", "-D", &data])
            .await
            .map(|_| ())
    }

    /// Promotes a standby and waits until it accepts writes.
    pub async fn promote(&self) -> Result<()> {
        let data = self.data_arg();
        self.run(
            "pg_ctl",
            &["promote", "-D", &data, "-w", "-t", PG_CTL_TIMEOUT_S],
        )
        .await
        .map(|_| ())
    }

    /// Rewinds a stopped former primary onto `upstream`'s history (a no-op when it
    /// did not diverge). pg_rewind copies the source's config files: configure again after.
    ///
    /// Refused while another tool still works on this data dir (a pg_rewind started
    /// by an agent that was killed outlives it: never two tools on one data dir). A
    /// rewind that was interrupted leaves a marker (`rewind.in_progress`): the data
    /// dir is then half-rewound and unusable, so it is rebuilt from `upstream`
    /// instead (pg_basebackup, the old data moved aside).
    pub async fn rewind(&self, upstream: &Upstream) -> Result<String> {
        let marker = self.instance_dir.join(REWIND_MARKER);
        let plan = rewind_plan(marker.exists(), tool_running_in(&self.instance_dir));
        match plan {
            RewindPlan::Wait(pid, tool) => {
                return Err(AgentError::Instance(format!(
                    "{}: {tool} (pid {pid}) still works on {}: not starting another tool on it",
                    self.name,
                    self.data_dir.display()
                )))
            }
            RewindPlan::Rebuild => {
                // Only against a primary: a standby may still be on the old timeline.
                self.require_primary_upstream(upstream).await?;
                tracing::warn!(instance = %self.name, "an interrupted pg_rewind left {} half-rewound: rebuilding it", self.data_dir.display());
                let aside = self.move_data_aside()?;
                self.basebackup(upstream).await?;
                remove_durably(&marker)?;
                return Ok(format!(
                    "rebuilt: an interrupted pg_rewind had left the data dir unusable (moved to {})",
                    aside.map(|p| p.display().to_string()).unwrap_or_default()
                ));
            }
            RewindPlan::Rewind => {}
        }
        // pg_rewind reads the source's timeline from its control file, which a freshly
        // promoted server updates only at its first checkpoint: without one it sees
        // "the same timeline; no rewind required" and a diverged former primary could
        // never follow. Ask for that checkpoint first; and only a source that runs as
        // primary has the new timeline (a standby caught between the failover decision
        // and its promotion would answer "no rewind required" and our recovery would
        // then write past the fork point).
        self.require_primary_upstream(upstream).await?;
        self.checkpoint_upstream(upstream).await?;
        let data = self.data_arg();
        self.write_pgpass()?;
        let source = format!(
            "host={} port={} user={} dbname=postgres",
            upstream.host,
            upstream.port,
            DnRole::Replication.name()
        );
        let target = format!("--target-pgdata={data}");
        let source = format!("--source-server={source}");
        write_durably(&marker, b"pg_rewind\n")?;
        let out = self.run("pg_rewind", &[&target, &source]).await;
        if out.is_ok() {
            remove_durably(&marker)?;
        }
        out
    }

    /// Errs unless `upstream` runs as a primary (not in recovery).
    pub async fn require_primary_upstream(&self, upstream: &Upstream) -> Result<()> {
        let purpose = |host: &str, port: u16| {
            format!("checking that {host}:{port} is primary before pg_rewind")
        };
        let in_recovery = self
            .on_upstream(
                upstream,
                purpose,
                Duration::from_secs(10),
                |db| async move {
                    let row = db.query_one("SELECT pg_is_in_recovery()", &[]).await?;
                    row.try_get::<_, bool>(0)
                },
            )
            .await?;
        if in_recovery {
            return Err(AgentError::Instance(format!(
                "{}: {}: it is still a standby (not promoted yet): not rewinding against its old timeline",
                self.name,
                purpose(&upstream.host, upstream.port)
            )));
        }
        Ok(())
    }

    /// Connects to `upstream` as the admin role and runs `work` on the session, both
    /// within `timeout`; an error names this instance and `purpose(host, port)`.
    async fn on_upstream<T, F, Fut>(
        &self,
        upstream: &Upstream,
        purpose: impl Fn(&str, u16) -> String,
        timeout: Duration,
        work: F,
    ) -> Result<T>
    where
        F: FnOnce(tokio_postgres::Client) -> Fut,
        Fut: std::future::Future<Output = std::result::Result<T, tokio_postgres::Error>>,
    {
        let mut config = tokio_postgres::Config::new();
        config
            .host(&upstream.host)
            .port(upstream.port)
            .user(DnRole::Admin.name())
            .password(self.password(DnRole::Admin)?)
            .dbname("postgres")
            .application_name("cm_agent")
            .connect_timeout(Duration::from_secs(5));
        let session = async {
            let (client, conn) = config.connect(tokio_postgres::NoTls).await?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            work(client).await
        };
        let what = |e: String| {
            AgentError::Instance(format!(
                "{}: {}: {e}",
                self.name,
                purpose(&upstream.host, upstream.port)
            ))
        };
        tokio::time::timeout(timeout, session)
            .await
            .map_err(|_| what("timed out".into()))?
            .map_err(|e| what(e.to_string()))
    }

    /// The LSN of the last checkpoint in pg_control (pg_controldata). After a clean
    /// stop it is the shutdown checkpoint: the end of everything this server wrote.
    pub async fn checkpoint_lsn(&self) -> Result<u64> {
        let data = self.data_arg();
        let out = self.run("pg_controldata", &["-D", &data]).await?;
        parse_checkpoint_lsn(&out).ok_or_else(|| {
            AgentError::Instance(format!(
                "{}: no \"Latest checkpoint location\" in pg_controldata output",
                self.name
            ))
        })
    }

    /// Runs CHECKPOINT on `upstream` (a restartpoint on a standby), so that its
    /// control file names its current timeline.
    pub async fn checkpoint_upstream(&self, upstream: &Upstream) -> Result<()> {
        let purpose =
            |host: &str, port: u16| format!("CHECKPOINT on {host}:{port} before pg_rewind");
        self.on_upstream(
            upstream,
            purpose,
            Duration::from_secs(60),
            |db| async move { db.batch_execute("CHECKPOINT").await },
        )
        .await
    }

    /// Moves the data dir aside (`data.old`, replacing an older one) before a rebuild.
    pub fn move_data_aside(&self) -> Result<Option<PathBuf>> {
        if !self.data_dir.exists() {
            return Ok(None);
        }
        let old = self.instance_dir.join("data.old");
        if old.exists() {
            std::fs::remove_dir_all(&old).map_err(|e| AgentError::io("remove", &old, e))?;
        }
        std::fs::rename(&self.data_dir, &old)
            .map_err(|e| AgentError::io("rename", &self.data_dir, e))?;
        Ok(Some(old))
    }

    /// The last lines of its server log.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log_file).unwrap_or_default();
        last_lines(&text, lines)
    }

    /// Connects over TCP as the monitoring role (within `timeout`): the probes.
    pub async fn connect(&self, timeout: Duration) -> Result<tokio_postgres::Client> {
        let mut config = tokio_postgres::Config::new();
        config
            .host(&self.address)
            .port(self.port)
            .user(DnRole::Monitor.name())
            .password(self.password(DnRole::Monitor)?)
            .dbname("postgres")
            .application_name("cm_agent")
            .connect_timeout(timeout);
        let (client, conn) = tokio::time::timeout(timeout, config.connect(tokio_postgres::NoTls))
            .await
            .map_err(|_| {
                AgentError::Probe(format!(
                    "{}: connect timed out after {timeout:?}",
                    self.name
                ))
            })?
            .map_err(|e| AgentError::Probe(format!("{}: connect: {e}", self.name)))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(client)
    }

    /// Asks the server for its role, timeline, LSNs and replicas (within `timeout`).
    pub async fn probe(&self, timeout: Duration) -> Result<PgProbe> {
        tokio::time::timeout(timeout, self.probe_inner(timeout))
            .await
            .map_err(|_| {
                AgentError::Probe(format!("{}: probe timed out after {timeout:?}", self.name))
            })?
    }

    async fn probe_inner(&self, timeout: Duration) -> Result<PgProbe> {
        let client = self.connect(timeout).await?;
        let q = |e: tokio_postgres::Error| AgentError::Probe(format!("{}: query: {e}", self.name));
        let row = client
            .query_one(
                "SELECT pg_is_in_recovery(), (SELECT timeline_id FROM pg_control_checkpoint())",
                &[],
            )
            .await
            .map_err(q)?;
        let mut probe = PgProbe {
            in_recovery: row.try_get(0).map_err(q)?,
            timeline: row
                .try_get::<_, Option<i32>>(1)
                .map_err(q)?
                .unwrap_or(0)
                .max(0) as u32,
            ..PgProbe::default()
        };
        let lsn = |s: Option<String>| s.as_deref().and_then(parse_lsn).unwrap_or(0);
        if probe.in_recovery {
            let row = client
                .query_one(
                    "SELECT pg_last_wal_receive_lsn()::text, pg_last_wal_replay_lsn()::text",
                    &[],
                )
                .await
                .map_err(q)?;
            probe.receive_lsn = lsn(row.try_get(0).map_err(q)?);
            probe.replay_lsn = lsn(row.try_get(1).map_err(q)?);
            probe.flush_lsn = probe.receive_lsn;
        } else {
            let row = client
                .query_one(
                    "SELECT pg_current_wal_lsn()::text, pg_current_wal_flush_lsn()::text",
                    &[],
                )
                .await
                .map_err(q)?;
            probe.current_lsn = lsn(row.try_get(0).map_err(q)?);
            probe.flush_lsn = lsn(row.try_get(1).map_err(q)?);
            let rows = client
                .query(
                    "SELECT application_name, state, sync_state, write_lsn::text, \
                     flush_lsn::text, replay_lsn::text FROM pg_stat_replication \
                     ORDER BY application_name",
                    &[],
                )
                .await
                .map_err(q)?;
            for r in rows {
                let text = |i: usize| -> Result<String> {
                    Ok(r.try_get::<_, Option<String>>(i)
                        .map_err(q)?
                        .unwrap_or_default())
                };
                probe.replicas.push(ReplicaState {
                    application_name: text(0)?,
                    state: text(1)?,
                    sync_state: text(2)?,
                    write_lsn: lsn(Some(text(3)?)),
                    flush_lsn: lsn(Some(text(4)?)),
                    replay_lsn: lsn(Some(text(5)?)),
                });
            }
        }
        Ok(probe)
    }
}

/// "Latest checkpoint location:           0/3000148" from pg_controldata's output.
pub fn parse_checkpoint_lsn(controldata: &str) -> Option<u64> {
    controldata.lines().find_map(|l| {
        let rest = l.strip_prefix("Latest checkpoint location:")?;
        parse_lsn(rest.trim())
    })
}

fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(n)..].join(" | ")
}

/// Marker file (in the instance dir) present while pg_rewind runs on the data dir.
pub const REWIND_MARKER: &str = "rewind.in_progress";

/// The tools that rewrite a data dir; they run with the instance dir as cwd.
const DATA_DIR_TOOLS: [&str; 3] = ["pg_rewind", "pg_basebackup", "initdb"];

/// What to do when a former primary must be rewound.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RewindPlan {
    /// A tool (pid, name) still works on the data dir: wait for it.
    Wait(u32, String),
    /// A previous pg_rewind was interrupted: the data dir is half-rewound.
    Rebuild,
    Rewind,
}

/// The rule: never a second tool on one data dir; an interrupted rewind (marker
/// left, no tool running) means a rebuild.
pub fn rewind_plan(marker: bool, running: Option<(u32, String)>) -> RewindPlan {
    match (running, marker) {
        (Some((pid, tool)), _) => RewindPlan::Wait(pid, tool),
        (None, true) => RewindPlan::Rebuild,
        (None, false) => RewindPlan::Rewind,
    }
}

/// A data-dir tool (pg_rewind, pg_basebackup, initdb) running in `instance_dir`
/// (perhaps started by an agent that died since).
pub fn tool_running_in(instance_dir: &Path) -> Option<(u32, String)> {
    let dir = std::fs::canonicalize(instance_dir).ok()?;
    let entries = std::fs::read_dir("/proc").ok()?;
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .find_map(|pid| {
            let args = process::cmdline(pid)?;
            let name = ha_common::process::program_name(&args)?;
            if !DATA_DIR_TOOLS.contains(&name.as_str()) || !process::alive(pid) {
                return None;
            }
            (ha_common::process::cwd(pid)? == dir).then_some((pid, name))
        })
}

fn write_durably(path: &Path, bytes: &[u8]) -> Result<()> {
    ha_common::durable::write_atomic(path, bytes).map_err(|e| AgentError::io("write", path, e))
}

fn remove_durably(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(AgentError::io("remove", path, e)),
    }
    if let Some(dir) = path.parent() {
        ha_common::durable::fsync_dir(dir).map_err(|e| AgentError::io("fsync", dir, e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_two_tools_and_an_interrupted_rewind_rebuilds() {
        let tool = Some((42, "pg_rewind".to_owned()));
        assert_eq!(
            rewind_plan(true, tool.clone()),
            RewindPlan::Wait(42, "pg_rewind".into())
        );
        assert_eq!(
            rewind_plan(false, tool),
            RewindPlan::Wait(42, "pg_rewind".into())
        );
        assert_eq!(rewind_plan(true, None), RewindPlan::Rebuild);
        assert_eq!(rewind_plan(false, None), RewindPlan::Rewind);
    }

    #[test]
    fn a_tool_left_running_by_a_dead_agent_is_found() {
        let base = tempfile::tempdir().unwrap();
        let (bin, inst, other) = (
            base.path().join("bin"),
            base.path().join("dn1_h1"),
            base.path().join("dn2_h1"),
        );
        for d in [&bin, &inst, &other] {
            std::fs::create_dir(d).unwrap();
        }
        let exe = bin.join("pg_rewind");
        std::fs::copy("/bin/sleep", &exe).unwrap();
        let mut elsewhere = std::process::Command::new(&exe)
            .arg("30")
            .current_dir(&other)
            .spawn()
            .unwrap();
        let found_elsewhere = tool_running_in(&inst);
        let mut here = std::process::Command::new(&exe)
            .arg("30")
            .current_dir(&inst)
            .spawn()
            .unwrap();
        // spawn may return while the exec is still setting up the new arguments.
        let mut found = None;
        for _ in 0..200 {
            found = tool_running_in(&inst);
            if found.is_some() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        for c in [&mut elsewhere, &mut here] {
            let _ = c.kill();
            let _ = c.wait();
        }
        assert_eq!(found_elsewhere, None);
        assert_eq!(found, Some((here.id(), "pg_rewind".to_owned())));
        assert_eq!(tool_running_in(&inst), None);
    }

    fn cfg() -> ClusterConfig {
        ClusterConfig::parse(
            include_str!("../../configs/local.toml"),
            Path::new("local.toml"),
        )
        .unwrap()
    }

    fn group<'a>(cfg: &'a ClusterConfig, name: &str) -> &'a DnGroup {
        cfg.dn_groups.iter().find(|g| g.name == name).unwrap()
    }

    #[test]
    fn primary_prefers_its_standby_then_the_secondary() {
        let cfg = cfg();
        let s = PgSettings::for_member(&cfg, group(&cfg, "dn1"), "dn1_h1", None).unwrap();
        let text = render_settings(&s);
        assert!(
            text.contains(r#"synchronous_standby_names = 'FIRST 1 ("dn1_h2", "dn1_h3")'"#),
            "{text}"
        );
        assert!(text.contains("port = 6501"), "{text}");
        assert!(text.contains("listen_addresses = '127.0.0.1'"), "{text}");
        let inst = cfg.instance_dir("dn1_h1");
        assert!(
            text.contains(&format!("unix_socket_directories = '{}'", inst.display())),
            "the only socket is in the instance dir: {text}"
        );
        assert!(
            text.contains("password_encryption = 'scram-sha-256'"),
            "{text}"
        );
        assert!(!text.contains("primary_conninfo"), "{text}");
        // A silently dropped standby stops counting as synchronous within the
        // failover timeout (3 s in local.toml), not PostgreSQL's default minute.
        assert!(text.contains("wal_sender_timeout = 3000\n"), "{text}");
        assert!(text.contains("wal_receiver_timeout = 3000\n"), "{text}");
    }

    #[test]
    fn secondary_listed_first_in_config_still_comes_last() {
        let cfg = cfg();
        let mut g = group(&cfg, "dn2").clone();
        g.members.rotate_right(1); // dn2_h1 (secondary) first
        assert_eq!(g.members[0].name, "dn2_h1");
        assert_eq!(sync_standby_order(&g, "dn2_h2"), ["dn2_h3", "dn2_h1"]);
    }

    #[test]
    fn promoted_standby_prefers_the_former_primary() {
        let cfg = cfg();
        assert_eq!(
            sync_standby_order(group(&cfg, "dn1"), "dn1_h2"),
            ["dn1_h1", "dn1_h3"]
        );
    }

    #[test]
    fn standby_gets_primary_conninfo_with_its_application_name() {
        let cfg = cfg();
        let up = Upstream {
            host: "127.0.0.1".into(),
            port: 6501,
        };
        let s = PgSettings::for_member(&cfg, group(&cfg, "dn1"), "dn1_h2", Some(up)).unwrap();
        let text = render_settings(&s);
        assert!(
            text.contains(&format!(
                "primary_conninfo = 'host=127.0.0.1 port=6501 user=mpp_replication passfile={} application_name=dn1_h2'",
                cfg.instance_dir("dn1_h2").join("pgpass").display()
            )),
            "{text}"
        );
        assert!(text.contains("port = 6502"), "{text}");
        assert!(
            text.contains(&format!(
                "dn_replicator restore-wal --from 127.0.0.1:6503 --tls-dir {} --host h2 %f %p || exit 1'",
                cfg.tls_dir().display()
            )),
            "the standby fetches what it lacks from the secondary, with the restore certificate: {text}"
        );
        // The copy below the base dir, which the OS user can reach; not bin_dir.
        let copy = cfg.cluster.base_dir.join("bin/dn_replicator");
        assert!(
            text.contains(&format!(
                "restore_command = '{} restore-wal",
                copy.display()
            )),
            "{text}"
        );
        let p = PgSettings::for_member(&cfg, group(&cfg, "dn1"), "dn1_h1", None).unwrap();
        assert!(!render_settings(&p).contains("restore_command"));
    }

    #[test]
    fn non_member_is_refused() {
        let cfg = cfg();
        assert!(PgSettings::for_member(&cfg, group(&cfg, "dn1"), "dn2_h2", None).is_err());
    }

    #[test]
    fn a_half_made_data_dir_is_not_data_and_is_cleared() {
        let dir = tempfile::tempdir().unwrap();
        let text = include_str!("../../configs/local.toml").replace(
            "base_dir = \"/tmp/mpp-ha\"",
            &format!("base_dir = {:?}", dir.path().display().to_string()),
        );
        let cfg = ClusterConfig::parse(&text, Path::new("t.toml")).unwrap();
        let pg = PgInstance::from_config(&cfg, "dn1_h2", OsUser::current()).unwrap();
        std::fs::create_dir_all(pg.data_dir.join("global")).unwrap();
        std::fs::write(pg.data_dir.join("PG_VERSION"), "15\n").unwrap();
        assert!(!pg.has_data(), "no pg_control yet");
        pg.clear_partial_data().unwrap();
        assert!(!pg.data_dir.exists());
        std::fs::create_dir_all(pg.data_dir.join("global")).unwrap();
        std::fs::write(pg.data_dir.join("PG_VERSION"), "15\n").unwrap();
        std::fs::write(pg.data_dir.join("global/pg_control"), "x").unwrap();
        assert!(pg.has_data());
        pg.clear_partial_data().unwrap();
        assert!(pg.data_dir.exists(), "a complete data dir is never removed");
    }

    #[test]
    fn checkpoint_lsn_is_read_from_pg_controldata() {
        let out = "pg_control version number:            1300\n\
                   Latest checkpoint location:           0/3000148\n\
                   Latest checkpoint's REDO location:    0/3000110\n";
        assert_eq!(parse_checkpoint_lsn(out), Some(0x3000148));
        assert_eq!(parse_checkpoint_lsn("nothing"), None);
    }

    #[test]
    fn conf_values_are_quoted() {
        assert_eq!(conf_quote("it's"), "'it''s'");
    }

    #[test]
    fn hba_trusts_only_the_local_socket_and_asks_tcp_for_scram_passwords() {
        let text = render_hba(&[
            "127.0.0.1".into(),
            "10.0.0.5".into(),
            "10.0.0.5".into(),
            "db3".into(),
        ]);
        let rules: Vec<Vec<&str>> = text
            .lines()
            .filter(|l| !l.trim_start().starts_with('#') && !l.trim().is_empty())
            .map(|l| l.split_whitespace().collect())
            .collect();
        // Exactly one trust rule: the superuser on the local socket.
        let trusted: Vec<&Vec<&str>> = rules.iter().filter(|r| r.contains(&"trust")).collect();
        assert_eq!(
            trusted,
            [&vec!["local", "all", "postgres", "trust"]],
            "{text}"
        );
        // Every TCP rule wants a SCRAM password.
        for r in rules.iter().filter(|r| r[0] == "host") {
            assert_eq!(r.last(), Some(&"scram-sha-256"), "{text}");
        }
        for (db, addr) in [
            ("all", "127.0.0.1/32"),
            ("replication", "127.0.0.1/32"),
            ("all", "::1/128"),
            ("replication", "::1/128"),
            ("all", "10.0.0.5/32"),
            ("replication", "10.0.0.5/32"),
            ("all", "db3"),
            ("replication", "db3"),
        ] {
            let n = rules
                .iter()
                .filter(|r| r[0] == "host" && r[1] == db && r[3] == addr)
                .count();
            assert_eq!(n, 1, "one {db} rule for {addr}: {text}");
        }
        // Other roles on the local socket only with a password (a CN on this host).
        let local: Vec<&Vec<&str>> = rules.iter().filter(|r| r[0] == "local").collect();
        assert_eq!(
            local,
            [
                &vec!["local", "all", "postgres", "trust"],
                &vec!["local", "all", "all", "scram-sha-256"]
            ],
            "{text}"
        );
        // Loopback cluster addresses are not listed twice; nothing else connects.
        assert_eq!(rules.len(), 10, "{text}");
    }

    #[test]
    fn roles_sql_makes_each_role_idempotently_with_its_rights() {
        let sql = roles_sql(&["r'1".into(), "m2".into(), "a3".into()]);
        for r in DnRole::ALL {
            assert!(
                sql.contains(&format!("WHERE rolname = '{}') THEN CREATE ROLE", r.name())),
                "{sql}"
            );
        }
        assert!(
            sql.contains(
                "ALTER ROLE mpp_replication WITH LOGIN REPLICATION NOSUPERUSER PASSWORD 'r''1'"
            ),
            "passwords are quoted: {sql}"
        );
        assert!(sql.contains("GRANT pg_monitor TO mpp_monitor"), "{sql}");
        assert!(
            sql.contains("ALTER ROLE mpp_admin WITH LOGIN SUPERUSER PASSWORD 'a3'"),
            "{sql}"
        );
        assert!(
            sql.contains("pg_read_binary_file(text, bigint, bigint, boolean) TO mpp_replication"),
            "pg_rewind's grants: {sql}"
        );
    }
}
