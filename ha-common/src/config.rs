//! The cluster config: one TOML file describes every host and instance of a cluster.
//!
//! Every role reads the same file and finds itself by name (`--node`). Loading
//! validates the whole file; an error names the file, the key and what is wrong.
//! See `configs/local.toml` for a documented example of every key.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Default GXID block size (design.md §2: the primary syncs the boundary every 2000 GXIDs).
pub const DEFAULT_GTM_BLOCK_SIZE: u64 = 2000;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// TOML syntax errors, unknown keys, missing keys and wrong types: toml's message
    /// names the key and shows the line.
    #[error("config {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config {path}: {key}: {problem}")]
    Invalid {
        path: PathBuf,
        key: String,
        problem: String,
    },
    /// The `[tls]` files the config names are missing or unusable.
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
}

/// The role an instance is configured with. At run time the CMServer may change it;
/// the config only gives the initial layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Primary,
    Standby,
    Secondary,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Primary => "primary",
            Role::Standby => "standby",
            Role::Secondary => "secondary",
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSection {
    /// A name for the cluster, shown in status.
    pub name: String,
    /// Root of every data dir, socket and log (`--base-dir` overrides it).
    #[serde(default = "default_base_dir")]
    pub base_dir: PathBuf,
    /// The unprivileged OS user PostgreSQL runs as (PostgreSQL refuses root).
    pub os_user: String,
    /// Where initdb, pg_ctl, postgres, pg_basebackup ... live.
    #[serde(default = "default_pg_bin_dir")]
    pub pg_bin_dir: PathBuf,
    /// Where our own binaries (gtm, cn, cm_agent ...) live; default: beside the running one.
    #[serde(default)]
    pub bin_dir: Option<PathBuf>,
}

/// `[tls]`: where the cluster CA and the per-role certificates live (see `ha_common::tls`).
/// On unless the config says `enabled = false` (a config without `[tls]` runs TLS).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSection {
    /// Every gRPC link uses mutual TLS with the cluster CA (default true).
    #[serde(default = "default_tls_enabled")]
    pub enabled: bool,
    /// Holds `ca.crt`, `operator.crt`/`.key` and `<role>@<host>.crt`/`.key` per role and
    /// host (`tls::CertName::for_config`); default `<base_dir>/tls`.
    #[serde(default)]
    pub dir: Option<PathBuf>,
}

/// `[dn_auth]`: where the passwords of the roles our programs use on the DNs live
/// (see `ha_common::dn_auth`). Paths only: a config never holds a password.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DnAuthSection {
    /// Directory of the password files; default `<base_dir>/secrets`.
    #[serde(default)]
    pub dir: Option<PathBuf>,
    /// `mpp_replication`'s password; default `<dir>/mpp_replication.password`.
    #[serde(default)]
    pub replication_password_file: Option<PathBuf>,
    /// `mpp_monitor`'s password; default `<dir>/mpp_monitor.password`.
    #[serde(default)]
    pub monitor_password_file: Option<PathBuf>,
    /// `mpp_admin`'s password; default `<dir>/mpp_admin.password`.
    #[serde(default)]
    pub admin_password_file: Option<PathBuf>,
}

fn default_tls_enabled() -> bool {
    true
}

impl Default for TlsSection {
    fn default() -> Self {
        TlsSection {
            enabled: default_tls_enabled(),
            dir: None,
        }
    }
}

fn default_base_dir() -> PathBuf {
    PathBuf::from("/tmp/mpp-ha")
}

fn default_pg_bin_dir() -> PathBuf {
    PathBuf::from("/usr/lib/postgresql/15/bin")
}

/// Timings of the cluster manager. Defaults are chosen so that one lost heartbeat or a
/// slow fsync never causes a failover.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TimingSection {
    /// How often each agent reports to the CMServer.
    #[serde(default = "default_heartbeat_ms")]
    pub heartbeat_interval_ms: u64,
    /// An agent whose report is older than this is considered silent.
    #[serde(default = "default_agent_timeout_ms")]
    pub agent_timeout_ms: u64,
    /// Time a probe (a query to PostgreSQL, an RPC to a GTM) may take before the
    /// instance counts as not responding.
    #[serde(default = "default_probe_timeout_ms")]
    pub probe_timeout_ms: u64,
    /// A DN primary that is down (and not restartable), hung, or whose agent is silent
    /// for this long is replaced by its synchronous standby.
    #[serde(default = "default_failover_timeout_ms")]
    pub dn_failover_timeout_ms: u64,
    /// The same for the GTM primary (and, for the GTM standby, ordering the primary to
    /// run alone).
    #[serde(default = "default_failover_timeout_ms")]
    pub gtm_failover_timeout_ms: u64,
    /// A CN of the DDL set that is down (it stops calling CnSync, or its agent reports
    /// it dead or not answering) for this long is taken out of the DDL set, so that DDL
    /// goes on without it; it copies the catalog before it is admitted again.
    #[serde(default = "default_failover_timeout_ms")]
    pub cn_failover_timeout_ms: u64,
    /// How long an agent's lease to a CMServer lasts. A CMServer is primary only while a
    /// majority of agents hold an unexpired lease for it; a restarted agent grants
    /// nothing for this long, so two CMServers can never both hold a majority.
    #[serde(default = "default_cm_lease_ms")]
    pub cm_lease_ms: u64,
}

fn default_heartbeat_ms() -> u64 {
    1000
}
fn default_agent_timeout_ms() -> u64 {
    3000
}
fn default_probe_timeout_ms() -> u64 {
    2000
}
fn default_failover_timeout_ms() -> u64 {
    3000
}
fn default_cm_lease_ms() -> u64 {
    3000
}

impl Default for TimingSection {
    fn default() -> Self {
        TimingSection {
            heartbeat_interval_ms: default_heartbeat_ms(),
            agent_timeout_ms: default_agent_timeout_ms(),
            probe_timeout_ms: default_probe_timeout_ms(),
            dn_failover_timeout_ms: default_failover_timeout_ms(),
            gtm_failover_timeout_ms: default_failover_timeout_ms(),
            cn_failover_timeout_ms: default_failover_timeout_ms(),
            cm_lease_ms: default_cm_lease_ms(),
        }
    }
}

impl TimingSection {
    pub fn heartbeat_interval(&self) -> Duration {
        Duration::from_millis(self.heartbeat_interval_ms)
    }
    pub fn agent_timeout(&self) -> Duration {
        Duration::from_millis(self.agent_timeout_ms)
    }
    pub fn probe_timeout(&self) -> Duration {
        Duration::from_millis(self.probe_timeout_ms)
    }
    pub fn dn_failover_timeout(&self) -> Duration {
        Duration::from_millis(self.dn_failover_timeout_ms)
    }
    pub fn gtm_failover_timeout(&self) -> Duration {
        Duration::from_millis(self.gtm_failover_timeout_ms)
    }
    pub fn cn_failover_timeout(&self) -> Duration {
        Duration::from_millis(self.cn_failover_timeout_ms)
    }
    pub fn cm_lease(&self) -> Duration {
        Duration::from_millis(self.cm_lease_ms)
    }
    /// What the GTM primary's lease keeps back from `gtm_failover_timeout` (clock rate
    /// error between hosts, the arbiter's tick): a tenth, at least 50 ms. The lease
    /// ends at (last healthy observation + gtm_failover_timeout − this), strictly
    /// before the earliest moment the CMServer may promote the standby.
    pub fn gtm_lease_margin(&self) -> Duration {
        (self.gtm_failover_timeout() / 10).max(Duration::from_millis(50))
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Host {
    pub name: String,
    /// IP address or DNS name the other roles use to reach this host.
    pub address: String,
    /// The host's cm_agent serves Prometheus metrics here (HTTP); none: no metrics.
    #[serde(default)]
    metrics_port: Option<i64>,
}

impl Host {
    /// Validated at load time to be a TCP port when present.
    pub fn metrics_port(&self) -> Option<u16> {
        self.metrics_port.map(|p| p as u16)
    }
}

/// A server process of ours: a CMServer, a GTM or a CN.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Instance {
    pub name: String,
    pub host: String,
    /// Raw so that validation can say "70000 is not a TCP port" instead of a type error.
    port: i64,
    #[serde(default)]
    role: Option<Role>,
    /// CNs only: the port of the CN's gRPC service (cn.proto `Coordinator`).
    #[serde(default)]
    rpc_port: Option<i64>,
    /// Daemons of ours (CMServer, GTM, CN, DN secondary): the HTTP port of /metrics
    /// (and the health endpoints); none: no HTTP server.
    #[serde(default)]
    metrics_port: Option<i64>,
}

impl Instance {
    /// Validated at load time: always 1..=65535.
    pub fn port(&self) -> u16 {
        self.port as u16
    }
    /// Configured role (GTM and DN members; None for CMServers and CNs).
    pub fn role(&self) -> Option<Role> {
        self.role
    }
    /// CNs: the gRPC port (validated at load time to be present and valid for CNs).
    pub fn rpc_port(&self) -> u16 {
        self.rpc_port.unwrap_or(0) as u16
    }
    /// Validated at load time to be a TCP port when present.
    pub fn metrics_port(&self) -> Option<u16> {
        self.metrics_port.map(|p| p as u16)
    }
}

/// A database user the CNs accept (SCRAM-SHA-256). Its password is one line in
/// `password_file` (default `<dn_auth dir>/user_<name>.password`, owned by the OS user,
/// mode 0600, made with a random password by `cm_ctl local up` / `cm_ctl cert init`
/// when missing; see `dn_auth::user_password`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct User {
    pub name: String,
    /// Deprecated: the password in the clear. Still accepted (the CN warns at start);
    /// use `password_file`.
    #[serde(default)]
    pub password: Option<String>,
    /// The file holding the password (first line).
    #[serde(default)]
    pub password_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GtmSection {
    /// GXIDs per reserved block; the boundary is synced to the standby once per block.
    #[serde(default = "default_block_size")]
    pub block_size: u64,
    /// How long the primary waits for the standby's acknowledgement before it answers
    /// an error (unless it has been ordered to run alone).
    #[serde(default = "default_sync_timeout_ms")]
    pub sync_timeout_ms: u64,
    /// Whether an agent-run GTM primary hands out GXIDs only under the lease the
    /// primary CMServer grants it (`gtm serve --require-lease`; the GTM renews it from
    /// the CMServer itself, RenewGtmLease). It keeps a cut-off GTM primary from
    /// granting after its standby is promoted (invariant 3 under partitions). On by
    /// default; with it off the CMServer does not wait out earlier leases before a GTM
    /// promotion (a new tenure's wait, an operator failover's).
    #[serde(default = "default_require_lease")]
    pub require_lease: bool,
    #[serde(rename = "instance")]
    pub instances: Vec<Instance>,
}

fn default_require_lease() -> bool {
    true
}
fn default_block_size() -> u64 {
    DEFAULT_GTM_BLOCK_SIZE
}
fn default_sync_timeout_ms() -> u64 {
    3000
}

impl GtmSection {
    pub fn sync_timeout(&self) -> Duration {
        Duration::from_millis(self.sync_timeout_ms)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DnGroup {
    pub name: String,
    #[serde(rename = "member")]
    pub members: Vec<Instance>,
}

impl DnGroup {
    pub fn member_with_role(&self, role: Role) -> Option<&Instance> {
        self.members.iter().find(|m| m.role == Some(role))
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    pub cluster: ClusterSection,
    #[serde(default)]
    pub timing: TimingSection,
    #[serde(rename = "host")]
    pub hosts: Vec<Host>,
    #[serde(rename = "cm_server")]
    pub cm_servers: Vec<Instance>,
    pub gtm: GtmSection,
    #[serde(rename = "cn", default)]
    pub cns: Vec<Instance>,
    #[serde(rename = "dn_group", default)]
    pub dn_groups: Vec<DnGroup>,
    /// Users the CNs authenticate clients against (SCRAM-SHA-256).
    #[serde(rename = "user", default)]
    pub users: Vec<User>,
    /// Mutual TLS on every gRPC link (`[tls]`); on when the section is absent.
    #[serde(default)]
    pub tls: TlsSection,
    /// The DN roles' password files (`[dn_auth]`); defaults below the base dir.
    #[serde(default)]
    pub dn_auth: DnAuthSection,
    /// Where the config was read from (for messages).
    #[serde(skip)]
    pub source: PathBuf,
    /// Instances and hosts by name, built on the first lookup (see [`NameIndex`]).
    #[serde(skip)]
    index: std::sync::OnceLock<NameIndex>,
}

/// Where an instance sits in the config.
#[derive(Debug, Clone, Copy)]
enum Slot {
    CmServer(usize),
    Gtm(usize),
    Cn(usize),
    Dn(usize, usize),
}

/// Name lookups in O(1): the CMServer looks up every reported instance and host on
/// every heartbeat, and a linear scan of a thousand hosts' instances per lookup made
/// its cost grow with N² (bench `cm_scale`). Positions, checked on use: a lookup
/// whose slot no longer holds that name, or a config whose instance or host count
/// changed, falls back to the scan. Moving an instance to another host after the
/// first lookup is not detected by `instances_on_host` of its new host: edit a
/// config before using it (every caller does).
#[derive(Debug, Clone, Default)]
struct NameIndex {
    instances: std::collections::HashMap<String, Slot>,
    hosts: std::collections::HashMap<String, usize>,
    by_host: std::collections::HashMap<String, Vec<Slot>>,
    /// Instance and host counts when built (a changed config no longer matches).
    counts: (usize, usize),
}

/// What kind of instance a name refers to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InstanceKind {
    CmServer,
    Gtm,
    Coordinator,
    /// A member of a DN group; its configured role says primary/standby/secondary.
    DnMember,
}

/// An instance found by name, with where it belongs.
#[derive(Debug, Clone, Copy)]
pub struct InstanceRef<'a> {
    pub kind: InstanceKind,
    pub instance: &'a Instance,
    /// The DN group, for DN members.
    pub group: Option<&'a DnGroup>,
}

impl ClusterConfig {
    /// Reads and validates a config file.
    pub fn load(path: impl AsRef<Path>) -> Result<Self, ConfigError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses and validates config text; `path` is only used in messages.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let mut cfg: ClusterConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            // toml's message spans lines (an excerpt with markers): operators get one.
            message: crate::message::one_line(&e.to_string()),
        })?;
        cfg.source = path.to_owned();
        cfg.validate()?;
        Ok(cfg)
    }

    fn invalid(&self, key: impl Into<String>, problem: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            path: self.source.clone(),
            key: key.into(),
            problem: problem.into(),
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.cluster.name.trim().is_empty() {
            return Err(self.invalid("cluster.name", "must not be empty"));
        }
        if self.cluster.os_user.trim().is_empty() {
            return Err(self.invalid("cluster.os_user", "must name an unprivileged OS user"));
        }
        if self.cluster.os_user == "root" {
            return Err(self.invalid("cluster.os_user", "PostgreSQL refuses to run as root"));
        }
        if self.timing.heartbeat_interval_ms == 0 {
            return Err(self.invalid("timing.heartbeat_interval_ms", "must be > 0"));
        }
        if self.timing.agent_timeout_ms < 2 * self.timing.heartbeat_interval_ms {
            return Err(self.invalid(
                "timing.agent_timeout_ms",
                "must be at least twice timing.heartbeat_interval_ms, so one lost heartbeat is not a failure",
            ));
        }
        for (key, v) in [
            (
                "timing.dn_failover_timeout_ms",
                self.timing.dn_failover_timeout_ms,
            ),
            (
                "timing.gtm_failover_timeout_ms",
                self.timing.gtm_failover_timeout_ms,
            ),
            (
                "timing.cn_failover_timeout_ms",
                self.timing.cn_failover_timeout_ms,
            ),
            ("timing.cm_lease_ms", self.timing.cm_lease_ms),
        ] {
            if v < 2 * self.timing.heartbeat_interval_ms {
                return Err(self.invalid(
                    key,
                    format!(
                        "{v} ms is less than two heartbeats ({} ms): one lost heartbeat would cause a failover",
                        2 * self.timing.heartbeat_interval_ms
                    ),
                ));
            }
        }
        // The GTM lease runs (failover timeout − margin) from a healthy observation and
        // is renewed about once a heartbeat from an observation up to a heartbeat old:
        // shorter than 1.5 heartbeats, GXIDs would pause between renewals.
        let lease = self
            .timing
            .gtm_failover_timeout()
            .saturating_sub(self.timing.gtm_lease_margin());
        if lease.as_millis() * 2 < 3 * u128::from(self.timing.heartbeat_interval_ms) {
            return Err(self.invalid(
                "timing.gtm_failover_timeout_ms",
                format!(
                    "{} ms leaves the GTM primary a lease of {} ms (the timeout less a tenth, at least 50 ms), less than 1.5 × timing.heartbeat_interval_ms ({} ms): GXIDs would pause between renewals",
                    self.timing.gtm_failover_timeout_ms,
                    lease.as_millis(),
                    self.timing.heartbeat_interval_ms
                ),
            ));
        }
        if self.gtm.block_size == 0 {
            return Err(self.invalid("gtm.block_size", "must be > 0"));
        }
        if self.hosts.is_empty() {
            return Err(self.invalid("host", "at least one [[host]] is required"));
        }
        let mut host_names = BTreeSet::new();
        for (i, h) in self.hosts.iter().enumerate() {
            if h.name.trim().is_empty() {
                return Err(self.invalid(format!("host[{i}].name"), "must not be empty"));
            }
            if h.address.trim().is_empty() {
                return Err(self.invalid(
                    format!("host[{i}] ({}).address", h.name),
                    "must not be empty",
                ));
            }
            if !host_names.insert(h.name.as_str()) {
                return Err(self.invalid(
                    format!("host[{i}].name"),
                    format!("duplicate host name {:?}", h.name),
                ));
            }
        }

        // Every instance: a unique, safe name, a declared host, a valid port, and no
        // two instances listening on the same address and port.
        let mut names = BTreeSet::new();
        let mut endpoints: BTreeMap<(String, u16), String> = BTreeMap::new();
        for (key, inst) in self.all_instances_with_keys() {
            if inst.name.is_empty()
                || !inst
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
            {
                return Err(self.invalid(
                    format!("{key}.name"),
                    format!(
                        "{:?} must be non-empty ASCII letters, digits, '_' or '-'",
                        inst.name
                    ),
                ));
            }
            if !names.insert(inst.name.clone()) {
                return Err(self.invalid(
                    format!("{key}.name"),
                    format!("duplicate instance name {:?}", inst.name),
                ));
            }
            let Some(host) = self.host(&inst.host) else {
                return Err(self.invalid(
                    format!("{key} ({}).host", inst.name),
                    format!("host {:?} is not declared in any [[host]]", inst.host),
                ));
            };
            if !(1..=65535).contains(&inst.port) {
                return Err(self.invalid(
                    format!("{key} ({}).port", inst.name),
                    format!("{} is not a valid TCP port (1-65535)", inst.port),
                ));
            }
            let ep = (host.address.clone(), inst.port as u16);
            if let Some(other) = endpoints.insert(ep.clone(), inst.name.clone()) {
                return Err(self.invalid(
                    format!("{key} ({}).port", inst.name),
                    format!("{}:{} is already used by {other}", ep.0, ep.1),
                ));
            }
        }

        if self.cm_servers.is_empty() || self.cm_servers.len() > 2 {
            return Err(self.invalid("cm_server", "one or two [[cm_server]] entries are required"));
        }
        for (i, s) in self.cm_servers.iter().enumerate() {
            if s.role.is_some() {
                return Err(self.invalid(
                    format!("cm_server[{i}] ({}).role", s.name),
                    "CMServers have no configured role: the primary is elected",
                ));
            }
        }
        for (i, c) in self.cns.iter().enumerate() {
            if c.role.is_some() {
                return Err(self.invalid(
                    format!("cn[{i}] ({}).role", c.name),
                    "CNs are all active peers and take no role",
                ));
            }
            let key = format!("cn[{i}] ({}).rpc_port", c.name);
            let Some(rpc) = c.rpc_port else {
                return Err(self.invalid(key, "missing (the CN's gRPC port)"));
            };
            if !(1..=65535).contains(&rpc) {
                return Err(self.invalid(key, format!("{rpc} is not a valid TCP port (1-65535)")));
            }
            let ep = (self.address_of(c).to_owned(), rpc as u16);
            if let Some(other) = endpoints.insert(ep.clone(), c.name.clone()) {
                return Err(
                    self.invalid(key, format!("{}:{} is already used by {other}", ep.0, ep.1))
                );
            }
        }
        self.validate_metrics_ports(&mut endpoints)?;
        for (key, inst) in self.all_instances_with_keys() {
            if inst.rpc_port.is_some() && !key.starts_with("cn[") {
                return Err(self.invalid(
                    format!("{key} ({}).rpc_port", inst.name),
                    "only [[cn]] entries have an rpc_port",
                ));
            }
        }
        let mut user_names = BTreeSet::new();
        for (i, u) in self.users.iter().enumerate() {
            if u.name.trim().is_empty() {
                return Err(self.invalid(format!("user[{i}].name"), "must not be empty"));
            }
            if u.password.as_deref() == Some("") {
                return Err(self.invalid(
                    format!("user[{i}] ({}).password", u.name),
                    "must not be empty",
                ));
            }
            if u.password.is_some() && u.password_file.is_some() {
                return Err(self.invalid(
                    format!("user[{i}] ({}).password", u.name),
                    "give password_file only (password, in the clear, is deprecated)",
                ));
            }
            if !user_names.insert(u.name.as_str()) {
                return Err(self.invalid(
                    format!("user[{i}].name"),
                    format!("duplicate user {:?}", u.name),
                ));
            }
        }
        if !self.cns.is_empty() && self.users.is_empty() {
            return Err(self.invalid(
                "user",
                "at least one [[user]] is required when the config has CNs (clients log in as one)",
            ));
        }

        // GTM: one primary, at most one standby, on different hosts.
        let g = &self.gtm.instances;
        if g.is_empty() || g.len() > 2 {
            return Err(self.invalid(
                "gtm.instance",
                "one primary and at most one standby are required",
            ));
        }
        for (i, inst) in g.iter().enumerate() {
            match inst.role {
                Some(Role::Primary) | Some(Role::Standby) => {}
                Some(Role::Secondary) => {
                    return Err(self.invalid(
                        format!("gtm.instance[{i}] ({}).role", inst.name),
                        "must be primary or standby",
                    ))
                }
                None => {
                    return Err(self.invalid(
                        format!("gtm.instance[{i}] ({}).role", inst.name),
                        "missing (primary or standby)",
                    ))
                }
            }
        }
        if g.iter().filter(|i| i.role == Some(Role::Primary)).count() != 1 {
            return Err(self.invalid(
                "gtm.instance",
                "exactly one GTM instance must have role = \"primary\"",
            ));
        }
        if g.len() == 2 && g[0].host == g[1].host {
            return Err(self.invalid(
                "gtm.instance",
                "the GTM primary and standby must be on different hosts",
            ));
        }

        // DN groups: one primary, one standby, at most one secondary, distinct hosts.
        let mut group_names = BTreeSet::new();
        for (gi, group) in self.dn_groups.iter().enumerate() {
            let key = format!("dn_group[{gi}] ({})", group.name);
            if !group_names.insert(group.name.as_str()) || names.contains(&group.name) {
                return Err(self.invalid(format!("{key}.name"), "duplicate name"));
            }
            let mut hosts = BTreeSet::new();
            for (mi, m) in group.members.iter().enumerate() {
                if m.role.is_none() {
                    return Err(self.invalid(
                        format!("{key}.member[{mi}] ({}).role", m.name),
                        "missing (primary, standby or secondary)",
                    ));
                }
                if !hosts.insert(m.host.as_str()) {
                    return Err(self.invalid(
                        format!("{key}.member[{mi}] ({}).host", m.name),
                        "two members of one DN group on one host defeat the point of a group",
                    ));
                }
            }
            let count = |r| group.members.iter().filter(|m| m.role == Some(r)).count();
            if count(Role::Primary) != 1 {
                return Err(self.invalid(
                    format!("{key}.member"),
                    "exactly one member must have role = \"primary\"",
                ));
            }
            if count(Role::Standby) != 1 {
                return Err(self.invalid(
                    format!("{key}.member"),
                    "exactly one member must have role = \"standby\"",
                ));
            }
            if count(Role::Secondary) > 1 {
                return Err(self.invalid(
                    format!("{key}.member"),
                    "at most one member may have role = \"secondary\"",
                ));
            }
        }
        Ok(())
    }

    fn all_instances_with_keys(&self) -> Vec<(String, &Instance)> {
        let mut out = Vec::new();
        for (i, s) in self.cm_servers.iter().enumerate() {
            out.push((format!("cm_server[{i}]"), s));
        }
        for (i, s) in self.gtm.instances.iter().enumerate() {
            out.push((format!("gtm.instance[{i}]"), s));
        }
        for (i, s) in self.cns.iter().enumerate() {
            out.push((format!("cn[{i}]"), s));
        }
        for (gi, g) in self.dn_groups.iter().enumerate() {
            for (mi, m) in g.members.iter().enumerate() {
                out.push((format!("dn_group[{gi}] ({}).member[{mi}]", g.name), m));
            }
        }
        out
    }

    /// A CN user by name.
    pub fn user(&self, name: &str) -> Option<&User> {
        self.users.iter().find(|u| u.name == name)
    }

    pub fn host(&self, name: &str) -> Option<&Host> {
        if let Some(ix) = self.index() {
            if let Some(h) = ix.hosts.get(name).and_then(|&i| self.hosts.get(i)) {
                if h.name == name {
                    return Some(h);
                }
            } else {
                return None;
            }
        }
        self.hosts.iter().find(|h| h.name == name)
    }

    fn instance_count(&self) -> usize {
        self.cm_servers.len()
            + self.gtm.instances.len()
            + self.cns.len()
            + self
                .dn_groups
                .iter()
                .map(|g| g.members.len())
                .sum::<usize>()
    }

    /// The name index, if it still matches the config (see [`NameIndex`]).
    fn index(&self) -> Option<&NameIndex> {
        let ix = self.index.get_or_init(|| {
            let mut ix = NameIndex {
                counts: (self.instance_count(), self.hosts.len()),
                ..NameIndex::default()
            };
            for (i, h) in self.hosts.iter().enumerate() {
                ix.hosts.entry(h.name.clone()).or_insert(i);
            }
            let mut add = |slot: Slot, inst: &Instance| {
                ix.instances.entry(inst.name.clone()).or_insert(slot);
                ix.by_host.entry(inst.host.clone()).or_default().push(slot);
            };
            for (i, s) in self.cm_servers.iter().enumerate() {
                add(Slot::CmServer(i), s);
            }
            for (i, s) in self.gtm.instances.iter().enumerate() {
                add(Slot::Gtm(i), s);
            }
            for (i, s) in self.cns.iter().enumerate() {
                add(Slot::Cn(i), s);
            }
            for (gi, g) in self.dn_groups.iter().enumerate() {
                for (mi, m) in g.members.iter().enumerate() {
                    add(Slot::Dn(gi, mi), m);
                }
            }
            ix
        });
        (ix.counts == (self.instance_count(), self.hosts.len())).then_some(ix)
    }

    fn at(&self, slot: Slot) -> Option<InstanceRef<'_>> {
        let plain = |kind, instance| InstanceRef {
            kind,
            instance,
            group: None,
        };
        match slot {
            Slot::CmServer(i) => self
                .cm_servers
                .get(i)
                .map(|s| plain(InstanceKind::CmServer, s)),
            Slot::Gtm(i) => self
                .gtm
                .instances
                .get(i)
                .map(|s| plain(InstanceKind::Gtm, s)),
            Slot::Cn(i) => self.cns.get(i).map(|s| plain(InstanceKind::Coordinator, s)),
            Slot::Dn(gi, mi) => self.dn_groups.get(gi).and_then(|g| {
                g.members.get(mi).map(|instance| InstanceRef {
                    kind: InstanceKind::DnMember,
                    instance,
                    group: Some(g),
                })
            }),
        }
    }

    /// The address of the host an instance runs on (validated to exist).
    pub fn address_of(&self, inst: &Instance) -> &str {
        self.host(&inst.host)
            .map(|h| h.address.as_str())
            .unwrap_or("127.0.0.1")
    }

    /// `metrics_port`s: valid ports, none shared with any other listener, and only on
    /// instances that are processes of ours (a PostgreSQL DN member has no HTTP server).
    fn validate_metrics_ports(
        &self,
        endpoints: &mut BTreeMap<(String, u16), String>,
    ) -> Result<(), ConfigError> {
        let mut wanted: Vec<(String, String, &str, i64)> = Vec::new();
        for (i, h) in self.hosts.iter().enumerate() {
            if let Some(p) = h.metrics_port {
                let who = format!("the cm_agent of {}", h.name);
                wanted.push((
                    format!("host[{i}] ({}).metrics_port", h.name),
                    who,
                    &h.address,
                    p,
                ));
            }
        }
        for (key, inst) in self.all_instances_with_keys() {
            let Some(p) = inst.metrics_port else { continue };
            let key = format!("{key} ({}).metrics_port", inst.name);
            let is_pg = key.starts_with("dn_group") && inst.role != Some(Role::Secondary);
            if is_pg {
                return Err(self.invalid(
                    key,
                    "a PostgreSQL DN member has no metrics server (only secondaries, run by dn_replicator)",
                ));
            }
            wanted.push((key, inst.name.clone(), self.address_of(inst), p));
        }
        for (key, who, address, p) in wanted {
            if !(1..=65535).contains(&p) {
                return Err(self.invalid(key, format!("{p} is not a valid TCP port (1-65535)")));
            }
            let ep = (address.to_owned(), p as u16);
            if let Some(other) = endpoints.insert(ep.clone(), who) {
                return Err(
                    self.invalid(key, format!("{}:{} is already used by {other}", ep.0, ep.1))
                );
            }
        }
        Ok(())
    }

    /// `http://address:metrics_port` of an instance, if it serves metrics.
    pub fn metrics_url(&self, inst: &Instance) -> Option<String> {
        inst.metrics_port()
            .map(|p| format!("http://{}:{p}", self.address_of(inst)))
    }

    /// `http://address:metrics_port` of a host's cm_agent, if it serves metrics.
    pub fn agent_metrics_url(&self, host: &Host) -> Option<String> {
        host.metrics_port()
            .map(|p| format!("http://{}:{p}", host.address))
    }

    /// `address:port` of an instance.
    pub fn endpoint(&self, inst: &Instance) -> String {
        format!("{}:{}", self.address_of(inst), inst.port())
    }

    /// Finds any instance (CMServer, GTM, CN, DN member) by name.
    pub fn find(&self, name: &str) -> Option<InstanceRef<'_>> {
        if let Some(ix) = self.index() {
            match ix.instances.get(name).and_then(|&slot| self.at(slot)) {
                Some(r) if r.instance.name == name => return Some(r),
                // Unknown, or renamed/moved since the index was built: scan (rare).
                _ => {}
            }
        }
        self.all_refs()
            .into_iter()
            .find(|r| r.instance.name == name)
    }

    /// Every instance placed on `host`, CMServers included.
    pub fn instances_on_host(&self, host: &str) -> Vec<InstanceRef<'_>> {
        if let Some(ix) = self.index() {
            let slots = ix.by_host.get(host).map_or(&[][..], |v| v.as_slice());
            let refs: Vec<InstanceRef<'_>> =
                slots.iter().filter_map(|&slot| self.at(slot)).collect();
            if refs.len() == slots.len() && refs.iter().all(|r| r.instance.host == host) {
                return refs;
            }
        }
        self.all_refs()
            .into_iter()
            .filter(|r| r.instance.host == host)
            .collect()
    }

    /// Every instance of the cluster, in config order.
    pub fn all_refs(&self) -> Vec<InstanceRef<'_>> {
        let mut out = Vec::new();
        for (kind, list) in [
            (InstanceKind::CmServer, &self.cm_servers),
            (InstanceKind::Gtm, &self.gtm.instances),
            (InstanceKind::Coordinator, &self.cns),
        ] {
            out.extend(list.iter().map(|instance| InstanceRef {
                kind,
                instance,
                group: None,
            }));
        }
        for g in &self.dn_groups {
            out.extend(g.members.iter().map(|instance| InstanceRef {
                kind: InstanceKind::DnMember,
                instance,
                group: Some(g),
            }));
        }
        out
    }

    /// The directory that holds everything of one instance (or host-level process,
    /// e.g. an agent named after its host): `<base_dir>/<name>`.
    pub fn instance_dir(&self, name: &str) -> PathBuf {
        self.cluster.base_dir.join(name)
    }

    /// The directory of the cluster CA and the role certificates (`tls.dir`).
    pub fn tls_dir(&self) -> PathBuf {
        match &self.tls.dir {
            Some(dir) => dir.clone(),
            None => self.cluster.base_dir.join("tls"),
        }
    }

    /// Overrides `cluster.base_dir` (the `--base-dir` flag).
    pub fn with_base_dir(mut self, base_dir: Option<PathBuf>) -> Self {
        if let Some(dir) = base_dir {
            self.cluster.base_dir = dir;
        }
        self
    }

    /// The GTM instances' endpoints, primary first (client libraries try them in order).
    pub fn gtm_endpoints(&self) -> Vec<String> {
        let mut list: Vec<&Instance> = self.gtm.instances.iter().collect();
        list.sort_by_key(|i| i.role != Some(Role::Primary));
        list.into_iter().map(|i| self.endpoint(i)).collect()
    }

    /// The CMServers' endpoints, in config order.
    pub fn cm_server_endpoints(&self) -> Vec<String> {
        self.cm_servers.iter().map(|i| self.endpoint(i)).collect()
    }

    /// Where our binaries live: `cluster.bin_dir`, else beside the running executable.
    pub fn bin_dir(&self) -> PathBuf {
        if let Some(dir) = &self.cluster.bin_dir {
            return dir.clone();
        }
        std::env::current_exe()
            .ok()
            .and_then(|p| p.parent().map(Path::to_path_buf))
            .unwrap_or_else(|| PathBuf::from("."))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) const LOCAL: &str = include_str!("../../configs/local.toml");

    #[test]
    fn name_lookups_agree_with_a_scan_and_survive_an_edited_config() {
        let mut cfg = parse(LOCAL).unwrap();
        for r in cfg.all_refs() {
            let found = cfg.find(&r.instance.name).unwrap();
            assert_eq!(found.instance.name, r.instance.name);
            assert_eq!(found.kind, r.kind);
            assert_eq!(found.group.map(|g| &g.name), r.group.map(|g| &g.name));
        }
        assert!(cfg.find("nope").is_none());
        assert!(cfg.host("h9").is_none());
        assert_eq!(cfg.host("h2").unwrap().name, "h2");
        let on_h3: Vec<&str> = cfg
            .instances_on_host("h3")
            .iter()
            .map(|r| r.instance.name.as_str())
            .collect();
        assert_eq!(on_h3, ["dn1_h3", "dn2_h3"]);
        // Edited after the index was built: lookups still tell the truth.
        cfg.dn_groups[0].members[2].name = "dn1_renamed".into();
        cfg.dn_groups[0].members[2].host = "h1".into();
        assert_eq!(cfg.find("dn1_renamed").unwrap().instance.host, "h1");
        assert!(cfg.find("dn1_h3").is_none());
        let on_h3: Vec<&str> = cfg
            .instances_on_host("h3")
            .iter()
            .map(|r| r.instance.name.as_str())
            .collect();
        assert_eq!(on_h3, ["dn2_h3"]);
        cfg.hosts.remove(2);
        assert!(cfg.host("h3").is_none());
    }

    fn parse(text: &str) -> Result<ClusterConfig, ConfigError> {
        ClusterConfig::parse(text, Path::new("test.toml"))
    }

    #[test]
    fn local_config_is_valid_and_has_the_documented_layout() {
        let cfg = parse(LOCAL).expect("configs/local.toml must be valid");
        assert_eq!(cfg.hosts.len(), 3);
        assert_eq!(cfg.cm_servers.len(), 2);
        assert_eq!(cfg.gtm.block_size, 2000);
        assert_eq!(cfg.cluster.os_user, "postgres");
        let gtm1 = cfg.find("gtm1").unwrap();
        assert_eq!(gtm1.instance.host, "h1");
        assert_eq!(gtm1.instance.role(), Some(Role::Primary));
        assert_eq!(
            cfg.find("gtm2").unwrap().instance.role(),
            Some(Role::Standby)
        );
        let dn1 = cfg.dn_groups.iter().find(|g| g.name == "dn1").unwrap();
        assert_eq!(dn1.member_with_role(Role::Primary).unwrap().host, "h1");
        assert_eq!(dn1.member_with_role(Role::Standby).unwrap().host, "h2");
        assert_eq!(dn1.member_with_role(Role::Secondary).unwrap().host, "h3");
        let dn2 = cfg.dn_groups.iter().find(|g| g.name == "dn2").unwrap();
        assert_eq!(dn2.member_with_role(Role::Primary).unwrap().host, "h2");
        assert_eq!(dn2.member_with_role(Role::Standby).unwrap().host, "h3");
        assert_eq!(dn2.member_with_role(Role::Secondary).unwrap().host, "h1");
        assert_eq!(cfg.find("cn1").unwrap().instance.host, "h1");
        assert_eq!(cfg.find("cn2").unwrap().instance.host, "h2");
        assert_eq!(cfg.gtm_endpoints()[0], cfg.endpoint(gtm1.instance));
    }

    fn err(text: &str) -> String {
        parse(text).expect_err("must be rejected").to_string()
    }

    #[test]
    fn bad_port_is_named() {
        let e = err(&LOCAL.replacen("port = 7101", "port = 70000", 1));
        assert!(
            e.contains("gtm.instance[0] (gtm1).port") && e.contains("70000"),
            "{e}"
        );
    }

    #[test]
    fn unknown_host_is_named() {
        let e = err(&LOCAL.replacen("host = \"h3\"", "host = \"h9\"", 1));
        assert!(e.contains("host") && e.contains("\"h9\""), "{e}");
    }

    #[test]
    fn missing_key_is_named() {
        let e = err(&LOCAL.replacen("os_user = \"postgres\"", "", 1));
        assert!(e.contains("os_user"), "{e}");
        assert!(!e.contains('\n'), "one line: {e}");
        assert!(e.contains("test.toml"), "{e}");
    }

    #[test]
    fn unknown_key_is_named() {
        let e = err(&LOCAL.replacen("[cluster]", "[cluster]\nbogus_key = 1", 1));
        assert!(e.contains("bogus_key"), "{e}");
    }

    #[test]
    fn duplicate_port_is_rejected() {
        let e = err(&LOCAL.replacen("port = 7102", "port = 7101", 1));
        assert!(e.contains("already used"), "{e}");
    }

    #[test]
    fn two_gtm_primaries_are_rejected() {
        let e = err(&LOCAL.replacen("role = \"standby\"", "role = \"primary\"", 1));
        assert!(e.contains("primary"), "{e}");
    }

    #[test]
    fn root_os_user_is_rejected() {
        let e = err(&LOCAL.replacen("os_user = \"postgres\"", "os_user = \"root\"", 1));
        assert!(e.contains("cluster.os_user"), "{e}");
    }

    #[test]
    fn missing_file_is_named() {
        let e = ClusterConfig::load("/nonexistent/x.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("/nonexistent/x.toml"), "{e}");
    }

    #[test]
    fn cn_failover_timeout_defaults_and_is_validated() {
        let cfg = parse(LOCAL).unwrap();
        assert_eq!(cfg.timing.cn_failover_timeout_ms, 3000);
        let without = LOCAL.replacen("cn_failover_timeout_ms = 3000", "", 1);
        assert_eq!(parse(&without).unwrap().timing.cn_failover_timeout_ms, 3000);
        let e = err(&LOCAL.replacen(
            "cn_failover_timeout_ms = 3000",
            "cn_failover_timeout_ms = 1500",
            1,
        ));
        assert!(
            e.contains("timing.cn_failover_timeout_ms") && e.contains("two heartbeats"),
            "{e}"
        );
    }

    #[test]
    fn base_dir_override() {
        let cfg = parse(LOCAL)
            .unwrap()
            .with_base_dir(Some("/tmp/other".into()));
        assert_eq!(cfg.instance_dir("gtm1"), Path::new("/tmp/other/gtm1"));
    }

    #[test]
    fn cn_rpc_port_and_users_are_validated() {
        let cfg = parse(LOCAL).unwrap();
        assert_eq!(cfg.cns[0].rpc_port(), 6451);
        let u = cfg.user("postgres").unwrap();
        assert_eq!(
            u.password, None,
            "local.toml holds no password in the clear"
        );
        let e = err(&LOCAL.replacen(
            "name = \"postgres\"\n",
            "name = \"postgres\"\npassword = \"\"\n",
            1,
        ));
        assert!(e.contains("user[0] (postgres).password"), "{e}");
        let e = err(&LOCAL.replacen(
            "name = \"postgres\"\n",
            "name = \"postgres\"\npassword = \"x\"\npassword_file = \"/f\"\n",
            1,
        ));
        assert!(e.contains("password_file only"), "{e}");
        // The deprecated key still parses.
        let old = parse(&LOCAL.replacen(
            "name = \"postgres\"\n",
            "name = \"postgres\"\npassword = \"pw\"\n",
            1,
        ))
        .unwrap();
        assert_eq!(
            old.user("postgres").unwrap().password.as_deref(),
            Some("pw")
        );
        let e = err(&LOCAL.replacen("rpc_port = 6451\n", "", 1));
        assert!(
            e.contains("cn[0] (cn1).rpc_port") && e.contains("missing"),
            "{e}"
        );
        let e = err(&LOCAL.replacen("rpc_port = 6451", "rpc_port = 6402", 1));
        assert!(
            e.contains("rpc_port") && e.contains("already used by cn2"),
            "{e}"
        );
    }
}
