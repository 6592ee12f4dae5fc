//! Test harness: clusters of real processes on loopback.
//!
//! Every test gets its own base dir and its own port range (so tests run side by
//! side), starts our real binaries, waits for conditions with deadlines, and on drop
//! kills exactly the pids it started and removes its directory.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

pub mod nemesis;
pub mod netns;
pub mod workload;

/// The `configs/local.toml` shipped with the project.
pub const LOCAL_CONFIG: &str = include_str!("../../configs/local.toml");

/// Directory holding our built binaries (`target/debug`), found from the test binary's
/// own path (`target/debug/deps/<test>`). The README's test command builds the
/// binaries before running the tests.
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let deps = exe.parent().expect("test binary has a parent dir");
    let dir = if deps.ends_with("deps") {
        deps.parent().expect("target dir").to_path_buf()
    } else {
        deps.to_path_buf()
    };
    dir
}

/// A config text whose `bin_dir` names `target/debug`: for tests in which the test
/// binary itself plays the agent (our binaries are not beside it, in `deps/`), e.g. a
/// standby's `restore_command` copy of dn_replicator is installed from there.
pub fn with_bin_dir(text: &str) -> String {
    text.replacen(
        "# bin_dir = \"/usr/local/bin\"",
        &format!("bin_dir = {:?}", bin_dir().display().to_string()),
        1,
    )
}

/// Path of one of our binaries; fails clearly if it was not built.
pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.exists(),
        "{} not found: build the binaries first (cargo build --workspace --bins)",
        p.display()
    );
    p
}

/// The DN admin role's password file of the cluster this test process wrote last
/// ([`write_config`]): DN ports accept no login without a password (pg_hba), so the
/// tests connect to DNs as that role (a superuser), like the CNs do.
static DN_ADMIN_PASSWORD_FILE: std::sync::Mutex<Option<PathBuf>> = std::sync::Mutex::new(None);

/// The `(user, password)` tests log in to DN ports with: the admin role and its
/// password from the password file of the test's cluster.
pub fn dn_login() -> Result<(String, String)> {
    Ok((
        ha_common::dn_auth::DnRole::Admin.name().to_owned(),
        password_from(&DN_ADMIN_PASSWORD_FILE, "DN admin")?,
    ))
}

/// The first line of the password file recorded in `slot` by [`write_config`].
fn password_from(slot: &std::sync::Mutex<Option<PathBuf>>, what: &str) -> Result<String> {
    let file = slot
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone()
        .with_context(|| {
            format!("no test cluster config written yet (write_config) to take the {what} password from")
        })?;
    let text = std::fs::read_to_string(&file)
        .with_context(|| format!("{what} password file {}", file.display()))?;
    Ok(text.lines().next().unwrap_or("").trim().to_owned())
}

/// Connects to a DN member on loopback as the admin role (see [`dn_login`]);
/// connecting is bounded by `timeout`.
pub async fn connect(port: u16, timeout: Duration) -> Result<tokio_postgres::Client> {
    connect_at("127.0.0.1", port, timeout).await
}

/// Connects to a DN member at `address` as the admin role (bounded by `timeout`).
pub async fn connect_at(
    address: &str,
    port: u16,
    timeout: Duration,
) -> Result<tokio_postgres::Client> {
    let (user, password) = dn_login()?;
    connect_with(address, port, &user, Some(&password), timeout).await
}

/// A client of the CMServer at `ep` presenting `material`'s certificate (a test's
/// choice of role, host or validity), connecting within `connect_timeout` and giving
/// each call `rpc_timeout`.
pub async fn cm_server_as(
    material: &ha_common::tls::TlsMaterial,
    ep: &str,
    connect_timeout: Duration,
    rpc_timeout: Duration,
) -> Result<ha_common::proto::cm::cm_server_client::CmServerClient<tonic::transport::Channel>> {
    let ch = ha_common::tls::endpoint_with(
        Some(material),
        ep,
        ha_common::tls::CertRole::CmServer,
        connect_timeout,
    )?
    .timeout(rpc_timeout)
    .connect()
    .await?;
    Ok(ha_common::proto::cm::cm_server_client::CmServerClient::new(
        ch,
    ))
}

/// Connects to a DN member on loopback with `login` (from [`LocalCluster::dn_login`]).
pub async fn connect_dn_as(
    login: &(String, String),
    port: u16,
    timeout: Duration,
) -> Result<tokio_postgres::Client> {
    connect_with("127.0.0.1", port, &login.0, Some(&login.1), timeout).await
}

/// The first CN user's password file of the cluster this test process wrote last
/// ([`write_config`]; configs/local.toml's `[[user]] postgres`).
static CN_USER_PASSWORD_FILE: std::sync::Mutex<Option<PathBuf>> = std::sync::Mutex::new(None);

/// The `(user, password)` tests log in to CNs with: configs/local.toml's `postgres`
/// user and the password from its file (made by [`prepare_dn_passwords`]).
pub fn cn_login() -> Result<(String, String)> {
    Ok((
        "postgres".to_owned(),
        password_from(&CN_USER_PASSWORD_FILE, "CN user")?,
    ))
}

/// Connects to a CN on loopback as `postgres` with its password (see [`cn_login`]);
/// connecting is bounded by `timeout`.
pub async fn connect_cn(port: u16, timeout: Duration) -> Result<tokio_postgres::Client> {
    let (user, password) = cn_login()?;
    connect_with("127.0.0.1", port, &user, Some(&password), timeout).await
}

/// Connects to `address:port` as `user` (with `password` if given), bounded by `timeout`.
pub async fn connect_with(
    address: &str,
    port: u16,
    user: &str,
    password: Option<&str>,
    timeout: Duration,
) -> Result<tokio_postgres::Client> {
    let mut config = tokio_postgres::Config::new();
    config
        .host(address)
        .port(port)
        .user(user)
        .dbname("postgres")
        .application_name("mpp-ha-test")
        .connect_timeout(timeout);
    if let Some(p) = password {
        config.password(p);
    }
    let (client, conn) = tokio::time::timeout(timeout, config.connect(tokio_postgres::NoTls))
        .await
        .with_context(|| format!("connect to {address}:{port} timed out"))?
        .with_context(|| format!("connect to {address}:{port}"))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

/// A per-test directory, removed (with everything in it) on drop.
pub struct TestDir {
    path: PathBuf,
}

impl TestDir {
    /// `/tmp/mpp-ha-test/<name>-<pid>`, created empty and readable by the
    /// PostgreSQL OS user (PostgreSQL data dirs are created below it by the agent).
    pub fn new(name: &str) -> TestDir {
        let root = Path::new("/tmp/mpp-ha-test");
        std::fs::create_dir_all(root).expect("create /tmp/mpp-ha-test");
        set_mode(root, 0o755);
        let path = root.join(format!("{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("create test dir");
        set_mode(&path, 0o755);
        TestDir { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn set_mode(p: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode));
}

impl Drop for TestDir {
    fn drop(&mut self) {
        if std::env::var_os("MPP_HA_KEEP_TEST_DIRS").is_none() {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// Runs pgbench (PostgreSQL 15's, from PATH) against `port` as user postgres: whether
/// it exited 0, and its stdout and stderr together.
pub fn pgbench_run(port: u16, args: &[&str]) -> Result<(bool, String)> {
    let conn = format!("host=127.0.0.1 port={port} user=postgres dbname=postgres");
    let out = Command::new("pgbench")
        .args(args)
        .arg(&conn)
        .env("PGPASSWORD", cn_login()?.1)
        .output()
        .context("running pgbench")?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok((out.status.success(), text))
}

/// [`pgbench_run`] that must succeed: an error naming the arguments otherwise.
pub fn pgbench(port: u16, args: &[&str]) -> Result<String> {
    let (ok, text) = pgbench_run(port, args)?;
    if !ok {
        bail!("pgbench {args:?} failed:\n{text}");
    }
    Ok(text)
}

/// A count pgbench prints as `<label>: N` (e.g. "number of transactions actually
/// processed", "number of failed transactions").
pub fn pgbench_count(output: &str, label: &str) -> Option<u64> {
    output.lines().find_map(|l| {
        let rest = l.trim().strip_prefix(label)?.strip_prefix(':')?;
        rest.split_whitespace()
            .next()?
            .split('/')
            .next()?
            .parse()
            .ok()
    })
}

/// The transactions pgbench reports as processed (committed, acknowledged).
pub fn pgbench_processed(output: &str) -> Option<u64> {
    pgbench_count(output, "number of transactions actually processed")
}

/// The local.toml layout with every port moved into `[port_base, port_base + 1000)`
/// and the given base dir. Distinct tests use distinct port bases.
pub fn local_config_text(port_base: u16, base_dir: &Path) -> String {
    let mut out = String::new();
    for line in LOCAL_CONFIG.lines() {
        let trimmed = line.trim_start();
        if let Some((key, port)) = port_line(trimmed) {
            // local.toml uses 6401..=7102; map them onto the test's range.
            out.push_str(&format!("{key} = {}\n", port_base + (port - 6400)));
        } else if trimmed.starts_with("base_dir = ") {
            out.push_str(&format!(
                "base_dir = {:?}\n",
                base_dir.display().to_string()
            ));
        } else if trimmed == "enabled = true" || trimmed == "enabled = false" {
            // local.toml's only `enabled` key is `[tls]`'s.
            // Test clusters run plaintext unless a test asks for TLS (`with_tls`):
            // in-process clients of older tests speak plaintext.
            out.push_str(TLS_OFF_LINE);
            out.push('\n');
        } else if trimmed.starts_with("# dir = ") {
            // An explicit [tls] (and [dn_auth]) dir: a daemon started with --base-dir
            // still finds it.
            let sub = if trimmed.contains("secrets") {
                "secrets"
            } else {
                "tls"
            };
            out.push_str(&format!(
                "dir = {:?}\n",
                base_dir.join(sub).display().to_string()
            ));
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// The `[tls]` line `local_config_text` writes.
const TLS_OFF_LINE: &str = "enabled = false # test harness: TLS off";

/// Turns `[tls]` on in a `local_config_text` (for `LocalCluster::with_config_edit`).
pub fn with_tls(text: String) -> String {
    text.replace(TLS_OFF_LINE, "enabled = true")
}

/// `(key, port)` of a line `<something>port = N` (port, rpc_port, ...).
fn port_line(line: &str) -> Option<(&str, u16)> {
    let (key, value) = line.split_once('=')?;
    let key = key.trim();
    if !key.ends_with("port") || key.contains(' ') {
        return None;
    }
    Some((key, value.trim().parse().expect("port in local.toml")))
}

/// Writes a config file for a test cluster into its dir and returns its path. When
/// the config has `[tls] enabled = true` it also makes the cluster's CA and role
/// certificates (as `cm_ctl cert init` does) and loads the operator certificate into
/// this test process, so in-process clients built with `ha_common::tls::endpoint`
/// (and the `gtm` client library) speak TLS to the cluster.
pub fn write_config(dir: &TestDir, text: &str) -> PathBuf {
    let p = dir.path().join("cluster.toml");
    std::fs::write(&p, text).expect("write config");
    if let Ok(cfg) = ha_common::ClusterConfig::parse(text, &p) {
        prepare_tls(&cfg);
        prepare_dn_passwords(&cfg);
    }
    p
}

/// The DN roles' password files for `cfg` (made once, as `cm_ctl local up` does), and
/// this process's DN login ([`dn_login`]) taken from them.
pub fn prepare_dn_passwords(cfg: &ha_common::ClusterConfig) {
    use ha_common::dn_auth;
    dn_auth::init_password_files(cfg).expect("make the test cluster's DN password files");
    *DN_ADMIN_PASSWORD_FILE
        .lock()
        .unwrap_or_else(|p| p.into_inner()) =
        Some(dn_auth::password_file(cfg, dn_auth::DnRole::Admin));
    *CN_USER_PASSWORD_FILE
        .lock()
        .unwrap_or_else(|p| p.into_inner()) = cfg
        .users
        .iter()
        .find(|u| u.name == "postgres")
        .map(|u| dn_auth::user_password_file(cfg, u));
}

/// Certificates for `cfg` when it has TLS on (made once per tls dir), and this
/// process's operator identity.
pub fn prepare_tls(cfg: &ha_common::ClusterConfig) {
    use ha_common::tls;
    if !cfg.tls.enabled {
        return;
    }
    let dir = cfg.tls_dir();
    if !dir.join("ca.crt").exists() {
        tls::init_dir(&dir, cfg, None).expect("make the test cluster's certificates");
        tls::give_restore_identity(&dir, &cfg.cluster.os_user)
            .expect("give the restore certificate to the OS user");
    }
    tls::init(cfg, tls::CertRole::Operator, None).expect("load the operator certificate");
}

/// A process started by a test. Dropping it kills it (SIGKILL, by its pid) and reaps it.
pub struct Proc {
    pub name: String,
    child: Option<Child>,
    pub log: PathBuf,
}

impl Proc {
    /// Starts `bin args...` with stdout and stderr appended to `<log_dir>/<name>.log`.
    pub fn spawn(name: &str, bin: &Path, args: &[&str], log_dir: &Path) -> Result<Proc> {
        let log = log_dir.join(format!("{name}.log"));
        let out = File::options().create(true).append(true).open(&log)?;
        let err = out.try_clone()?;
        let child = Command::new(bin)
            .args(args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("spawn {}", bin.display()))?;
        Ok(Proc {
            name: name.to_owned(),
            child: Some(child),
            log,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// SIGKILL and reap.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Whether it is still running.
    pub fn alive(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// The tail of its log, for failure messages.
    pub fn log_tail(&self) -> String {
        tail(&self.log, 40)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// The last `lines` lines of a file (empty if unreadable).
pub fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Waits until `check` returns Ok(Some(v)), polling every 100 ms, for at most `timeout`.
/// The error names what was awaited and the last reason it was not there yet.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Option<T>>>,
{
    let deadline = Instant::now() + timeout;
    let mut last = String::from("condition not met");
    loop {
        match check().await {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last = format!("{e:#}"),
        }
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}: {last}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_config_moves_every_port_and_the_base_dir() {
        let dir = Path::new("/tmp/x");
        let text = local_config_text(20000, dir);
        let cfg = ha_common::ClusterConfig::parse(&text, Path::new("t.toml")).unwrap();
        for r in cfg.all_refs() {
            let p = r.instance.port();
            assert!(
                (20000..21000).contains(&p),
                "{} kept port {p}",
                r.instance.name
            );
        }
        assert_eq!(cfg.cluster.base_dir, dir);
    }
}

// ---------------------------------------------------------------------------------
// Whole local clusters run by `cm_ctl local up` (the cluster_* tests).

/// Whether `pid` is a live process; a zombie (dead, not yet reaped) is not.
pub fn pid_alive(pid: u32) -> bool {
    ha_common::process::alive(pid)
}

/// CPU time (user + system) `pid` has used so far, in seconds (from /proc/<pid>/stat).
/// Benchmarks measure CPU per operation with it: unlike throughput, it does not depend
/// on what else the machine runs.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The fields after the command name (which may hold spaces) in parentheses:
    // rest[0] is field 3 (state); utime is field 14, stime 15.
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    let tck = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100);
    Some(ticks as f64 / tck as f64)
}

/// SIGKILLs `pid` (no-op if it is gone).
pub fn kill9(pid: u32) {
    if let Ok(raw) = i32::try_from(pid) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(raw),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

fn canonical(p: &Path) -> PathBuf {
    std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf())
}

/// Every live process whose working directory or command line is inside `dir`
/// (postmasters chdir to their data dir; our daemons get the base dir as argument).
pub fn processes_under(dir: &Path) -> Vec<(u32, String)> {
    let dir = canonical(dir);
    let dir_s = dir.display().to_string();
    let me = std::process::id();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if pid == me || !pid_alive(pid) {
            continue;
        }
        let cmd = std::fs::read(format!("/proc/{pid}/cmdline"))
            .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
            .unwrap_or_default();
        let cwd_inside =
            std::fs::read_link(format!("/proc/{pid}/cwd")).is_ok_and(|c| c.starts_with(&dir));
        if cwd_inside || cmd.contains(&dir_s) {
            out.push((pid, cmd.trim().to_owned()));
        }
    }
    out
}

/// The postmasters running from `data_dir`: processes whose working directory is the
/// data dir and whose parent's is not (backends are children of the postmaster).
pub fn postmasters_in(data_dir: &Path) -> Vec<u32> {
    let data_dir = canonical(data_dir);
    let in_dir =
        |pid: u32| std::fs::read_link(format!("/proc/{pid}/cwd")).is_ok_and(|c| c == data_dir);
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| pid_alive(*pid) && in_dir(*pid))
        .filter(|pid| !ha_common::process::parent(*pid).is_some_and(in_dir))
        .collect()
}

/// What a `cm_ctl` run printed and how it ended.
#[derive(Debug)]
pub struct CmdOutput {
    pub success: bool,
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

/// Runs one of our binaries to completion.
pub fn run_bin(name: &str, args: &[&str]) -> CmdOutput {
    let out = Command::new(bin(name))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run {name}: {e}"));
    CmdOutput {
        success: out.status.success(),
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// A whole local cluster in its own dir and port range, run by `cm_ctl local up`.
/// Dropping it (also when the test panics) runs `cm_ctl local down`, then SIGKILLs
/// every recorded pid and any process still running from its dir.
pub struct LocalCluster {
    pub dir: TestDir,
    pub config: PathBuf,
    pub cfg: ha_common::ClusterConfig,
    /// In netns mode (see [`LocalCluster::netns`]): the hosts' namespaces and bridge.
    pub net: Option<netns::Network>,
}

impl LocalCluster {
    /// Connects to a DN member of this cluster on loopback as the admin role, with this
    /// cluster's password (a process running several clusters side by side cannot use
    /// [`connect`], which takes the password of the cluster written last).
    pub async fn connect_dn(&self, port: u16, timeout: Duration) -> Result<tokio_postgres::Client> {
        connect_dn_as(&self.dn_login()?, port, timeout).await
    }

    /// This cluster's DN admin login (role, password), for [`connect_dn_as`] from tasks
    /// that do not borrow the cluster.
    pub fn dn_login(&self) -> Result<(String, String)> {
        use ha_common::dn_auth::{read_password, DnRole};
        Ok((
            DnRole::Admin.name().to_owned(),
            read_password(&self.cfg, DnRole::Admin)?,
        ))
    }

    /// Writes the local.toml layout with ports from `port_base`; starts nothing.
    pub fn new(name: &str, port_base: u16) -> LocalCluster {
        Self::with_config_edit(name, port_base, |text| text)
    }

    /// Like [`LocalCluster::new`], with the config text passed through `edit` first
    /// (e.g. to change `[timing]`).
    pub fn with_config_edit(
        name: &str,
        port_base: u16,
        edit: impl FnOnce(String) -> String,
    ) -> LocalCluster {
        let dir = TestDir::new(name);
        let base = dir.path().join("cluster");
        let config = write_config(&dir, &edit(local_config_text(port_base, &base)));
        let cfg = ha_common::ClusterConfig::load(&config).expect("test config is valid");
        LocalCluster {
            dir,
            config,
            cfg,
            net: None,
        }
    }

    /// A cluster in netns mode: each host gets its own address in a /24 of its own
    /// and `up` runs it with `cm_ctl local up --netns <fresh prefix>`; dropping the
    /// cluster removes the namespaces and bridge (leftovers of dead runs are swept
    /// first). Ports may repeat those of other netns tests.
    pub fn netns(name: &str, port_base: u16, edit: impl FnOnce(String) -> String) -> LocalCluster {
        netns::sweep_leftovers();
        let (prefix, [a, b, c]) = netns::fresh_prefix();
        let mut host = 0;
        let mut c_ = Self::with_config_edit(name, port_base, |text| {
            let text: String = text
                .lines()
                .map(|l| {
                    if l.trim_start().starts_with("address = ") {
                        host += 1;
                        format!("address = \"{a}.{b}.{c}.{host}\"\n")
                    } else {
                        format!("{l}\n")
                    }
                })
                .collect();
            edit(text)
        });
        let net = netns::Network::plan(&prefix, &c_.cfg).expect("netns test network");
        c_.net = Some(net);
        c_
    }

    /// The address of `host`.
    pub fn address(&self, host: &str) -> String {
        self.cfg
            .host(host)
            .map(|h| h.address.clone())
            .unwrap_or_else(|| panic!("host {host} not in config"))
    }

    /// The address of the host `instance` runs on.
    pub fn address_of(&self, instance: &str) -> String {
        let r = self
            .cfg
            .find(instance)
            .unwrap_or_else(|| panic!("{instance} not in config"));
        self.cfg.address_of(r.instance).to_owned()
    }

    pub fn base_dir(&self) -> &Path {
        &self.cfg.cluster.base_dir
    }

    /// `cm_ctl <args> --config <this cluster's config>`.
    pub fn cm_ctl(&self, args: &[&str]) -> CmdOutput {
        let config = self.config.display().to_string();
        let mut all: Vec<&str> = args.to_vec();
        all.extend(["--config", config.as_str()]);
        run_bin("cm_ctl", &all)
    }

    /// `cm_ctl local up`; fails with its output and the daemons' log tails.
    pub fn up(&self, timeout_s: u64) -> Result<CmdOutput> {
        let t = timeout_s.to_string();
        let mut args = vec!["local", "up", "--timeout", &t];
        if let Some(n) = &self.net {
            args.extend(["--netns", n.prefix.as_str()]);
        }
        let out = self.cm_ctl(&args);
        if !out.success {
            // Its error line first: callers that keep only the first lines of
            // this message (the nemesis report) keep the reason.
            bail!(
                "cm_ctl local up failed: {}\n{}\n{}",
                out.stderr.trim(),
                out.stdout,
                self.logs()
            );
        }
        Ok(out)
    }

    /// `cm_ctl local down`.
    pub fn down(&self) -> CmdOutput {
        let mut args = vec!["local", "down", "--timeout", "30"];
        if let Some(n) = &self.net {
            args.extend(["--netns", n.prefix.as_str()]);
        }
        self.cm_ctl(&args)
    }

    /// `cm_ctl status --json`, parsed.
    pub fn status(&self) -> Result<serde_json::Value> {
        let out = self.cm_ctl(&["status", "--json"]);
        if !out.success {
            bail!("cm_ctl status failed: {}", out.stderr.trim());
        }
        serde_json::from_str(&out.stdout).context("status --json is not JSON")
    }

    /// The pids `local up` recorded (`<base>/local/pids`), by key (`cm_agent-h1`).
    pub fn recorded_pids(&self) -> Vec<(String, u32)> {
        let text =
            std::fs::read_to_string(self.base_dir().join("local").join("pids")).unwrap_or_default();
        text.lines()
            .filter_map(|l| {
                let (k, p) = l.split_once(' ')?;
                Some((k.to_owned(), p.trim().parse().ok()?))
            })
            .collect()
    }

    pub fn recorded_pid(&self, key: &str) -> Option<u32> {
        self.recorded_pids()
            .into_iter()
            .find(|(k, _)| k == key)
            .map(|(_, p)| p)
    }

    /// A DN instance's data dir (`<base>/<name>/data`).
    pub fn data_dir(&self, instance: &str) -> PathBuf {
        self.cfg.instance_dir(instance).join("data")
    }

    /// The pid in a DN's `postmaster.pid`, if that process is alive.
    pub fn postmaster_pid(&self, instance: &str) -> Option<u32> {
        let pid =
            ha_common::process::read_pid_file(&self.data_dir(instance).join("postmaster.pid"))?;
        pid_alive(pid).then_some(pid)
    }

    /// The pid in `<base>/<name>.gtm.pid` (written by the agent that started the GTM).
    pub fn gtm_pid(&self, name: &str) -> Option<u32> {
        ha_common::process::read_pid_file(&self.base_dir().join(format!("{name}.gtm.pid")))
    }

    /// Waits until every named instance shows `state` in `cm_ctl status`.
    pub async fn wait_states(&self, names: &[&str], state: &str, timeout: Duration) -> Result<()> {
        let what = format!("{names:?} to be {state}");
        wait_for(&what, timeout, || async {
            let s = self.status()?;
            // With the status's own reason, so that a failure says why.
            let off: Vec<String> = names
                .iter()
                .map(|n| (n, member_state(&s, n)))
                .filter(|(_, st)| st != state)
                .map(|(n, st)| {
                    let detail = status_member(&s, n)
                        .and_then(|m| m["detail"].as_str())
                        .unwrap_or("");
                    format!("{n} is {st} ({detail})")
                })
                .collect();
            if off.is_empty() {
                Ok(Some(()))
            } else {
                bail!("{}", off.join(", "))
            }
        })
        .await
    }

    /// The configured port of an instance.
    pub fn port(&self, instance: &str) -> u16 {
        self.cfg
            .find(instance)
            .unwrap_or_else(|| panic!("{instance} not in config"))
            .instance
            .port()
    }

    /// The tails of every daemon and instance log, for failure messages.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        let Ok(entries) = std::fs::read_dir(self.base_dir()) else {
            return out;
        };
        for e in entries.flatten() {
            let Ok(files) = std::fs::read_dir(e.path()) else {
                continue;
            };
            for f in files.flatten() {
                let p = f.path();
                if p.extension().and_then(|x| x.to_str()) == Some("log") {
                    out.push_str(&format!("----- {}\n{}\n", p.display(), tail(&p, 15)));
                }
            }
        }
        out
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        let _ = self.down();
        for (_, pid) in self.recorded_pids() {
            if pid_alive(pid) {
                kill9(pid);
            }
        }
        for (pid, _) in processes_under(self.base_dir()) {
            kill9(pid);
        }
        if let Some(n) = &self.net {
            // `local down` removed it unless it failed half-way.
            n.remove();
        }
    }
}

impl netns::Faults for LocalCluster {
    fn net(&self) -> &netns::Network {
        self.net
            .as_ref()
            .expect("network faults need LocalCluster::netns")
    }
}

/// In a `status --json` value: the member (any kind) called `name`.
pub fn status_member<'a>(
    status: &'a serde_json::Value,
    name: &str,
) -> Option<&'a serde_json::Value> {
    let lists = ["cm_servers", "gtm", "cn"];
    lists
        .iter()
        .filter_map(|k| status[k].as_array())
        .flatten()
        .chain(
            status["dn_groups"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|g| g["members"].as_array())
                .flatten(),
        )
        .find(|m| m["name"] == name)
}

/// The state string of member `name` ("" if absent).
pub fn member_state(status: &serde_json::Value, name: &str) -> String {
    status_member(status, name)
        .and_then(|m| m["state"].as_str())
        .unwrap_or("")
        .to_owned()
}
