//! The durable cluster state: the term, each instance's assigned role and the
//! operator's desired run state, sealed in one crash-safe file.
//!
//! `ClusterState` is the one thing a standby CMServer needs to take over (`pair.rs`
//! streams it there), so every change goes through an explicit mutation method and is
//! persisted before anybody is told about it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ha_common::config::{ClusterConfig, InstanceKind};
use ha_common::durable::{write_atomic, Envelope, EnvelopeError};
use ha_common::proto::cm::MemberRole;
use ha_common::{Role, Term};
use serde::{Deserialize, Serialize};

/// Identity of the CMServer state file.
pub const STATE_ENVELOPE: Envelope = Envelope {
    magic: *b"CMST",
    version: 1,
    what: "CMServer state",
};

/// Order ids one tenure as primary may use (see [`ClusterState::order_id_base`]).
pub const ORDER_ID_BLOCK: u64 = 1 << 32;

/// File name of the state file inside the CMServer's instance dir.
pub const STATE_FILE_NAME: &str = "cluster_state";

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot read CMServer state file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write CMServer state file {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "CMServer state file is unusable: {0}; move it away only if you know the cluster's roles"
    )]
    Corrupt(#[from] EnvelopeError),
    #[error("CMServer state file {path}: bad content: {message}")]
    BadContent { path: PathBuf, message: String },
    #[error("unknown instance {0:?}")]
    UnknownInstance(String),
    #[error("{0} is a CMServer: it is not started or stopped through the cluster state")]
    NotManaged(String),
}

/// A role the CMServer assigns to a GTM or DN member.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AssignedRole {
    Primary,
    Standby,
    Secondary,
}

impl From<Role> for AssignedRole {
    fn from(r: Role) -> Self {
        match r {
            Role::Primary => AssignedRole::Primary,
            Role::Standby => AssignedRole::Standby,
            Role::Secondary => AssignedRole::Secondary,
        }
    }
}

impl AssignedRole {
    pub fn as_str(self) -> &'static str {
        match self {
            AssignedRole::Primary => "primary",
            AssignedRole::Standby => "standby",
            AssignedRole::Secondary => "secondary",
        }
    }

    pub fn to_proto(self) -> MemberRole {
        match self {
            AssignedRole::Primary => MemberRole::Primary,
            AssignedRole::Standby => MemberRole::Standby,
            AssignedRole::Secondary => MemberRole::Secondary,
        }
    }
}

/// What the CMServer wants of one instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceState {
    /// The current role (GTM and DN members); None for CNs.
    pub role: Option<AssignedRole>,
    /// The operator's wish: `cm_ctl start` sets it, `cm_ctl stop` clears it.
    pub run: bool,
}

/// Everything the CMServer decides, in one serialisable value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterState {
    pub term: Term,
    /// Bumped on every persisted change (by whichever CMServer is primary; the
    /// standby takes the primary's). Agents remember the newest version a primary
    /// showed them and refuse their lease to a CMServer whose state is older, so a
    /// CMServer that missed a change can never act on the older state.
    #[serde(default)]
    pub version: u64,
    /// Order ids of the current tenure start here: each new tenure as primary
    /// reserves the next block of [`ORDER_ID_BLOCK`] (persisted before it acts), so
    /// no primary ever reuses an id an agent remembers as done.
    #[serde(default)]
    pub order_id_base: u64,
    /// Every instance an agent runs (GTMs, CNs, DN members), by name. CMServers are
    /// not in it: they are run by systemd (or `cm_ctl local up`), not by agents.
    pub instances: BTreeMap<String, InstanceState>,
    /// Per DN group: the standby its primary's LAST healthy report showed as the
    /// synchronous standby (sync, streaming); absent when it showed none. The arbiter
    /// fails over only to it (see [`crate::arbiter`]): a hung primary reports no
    /// replicas, and a new CMServer primary must know it too, so it is durable.
    #[serde(default)]
    pub last_sync_standby: BTreeMap<String, String>,
    /// What the CMServer knows about GXIDs the GTM primary may have handed out without
    /// its standby (see [`GtmAlone`]).
    #[serde(default)]
    pub gtm: GtmAlone,
    /// Per DN group: what its secondary (dn_replicator) must do (see
    /// [`crate::secondary`]); absent = idle. Durable: after a CMServer failover the
    /// new primary must not let a fenced secondary stream from an old primary again.
    #[serde(default)]
    pub secondary: BTreeMap<String, SecondaryPlan>,
    /// The CNs that take part in DDL and the catalog version they hold
    /// (see [`crate::ddl_set`]).
    #[serde(default)]
    pub ddl_set: crate::ddl_set::DdlSet,
    /// The last primary changes (oldest first, at most [`ROLE_CHANGES_KEPT`]), for the
    /// status page and `GET /cluster`. Durable and streamed with the rest, so a standby
    /// CMServer that takes over shows the failovers its predecessor made.
    #[serde(default)]
    pub role_changes: Vec<RoleChange>,
}

/// How many role changes [`ClusterState::role_changes`] keeps: enough for an
/// operator's last incidents, small enough to stream with every state change.
pub const ROLE_CHANGES_KEPT: usize = 20;

/// One primary change, as the status shows it (see the proto's `RoleChange`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoleChange {
    pub at_unix_ms: u64,
    /// DN group name, or "gtm".
    pub group: String,
    /// failover | switchover | operator_failover
    pub kind: String,
    pub from: String,
    pub to: String,
    pub term: u64,
    pub reason: String,
    pub duration_ms: u64,
}

impl RoleChange {
    pub fn to_proto(&self) -> ha_common::proto::cm::RoleChange {
        ha_common::proto::cm::RoleChange {
            at_unix_ms: self.at_unix_ms,
            group: self.group.clone(),
            kind: self.kind.clone(),
            from: self.from.clone(),
            to: self.to.clone(),
            term: self.term,
            reason: self.reason.clone(),
            duration_ms: self.duration_ms,
        }
    }
}

/// Milliseconds since the Unix epoch now (0 if the clock is before it).
pub fn unix_ms_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The GTM pair's run-alone record. A GTM primary running alone reserves blocks its
/// standby never persists, so the standby's boundary no longer bounds the GXIDs
/// handed out: promoting it could hand them out again. The CMServer therefore
/// persists (and streams to the standby CMServer) that a primary runs alone BEFORE
/// it orders it to, or promotes a GTM (a promoted GTM runs alone), and clears it only
/// once the primary runs with its standby attached again.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GtmAlone {
    /// A GTM primary may be running alone: no standby qualifies for promotion.
    pub run_alone: bool,
    /// The highest boundary a GTM primary reported while it (may have) run alone:
    /// a standby below it has missed GXIDs even if the flag was cleared since.
    pub primary_boundary: u64,
}

/// What a DN group's secondary is told to do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "mode")]
pub enum SecondaryPlan {
    /// Connected to nobody, holding nothing.
    Idle,
    /// The synchronous partner of `upstream` (the group's primary), keeping WAL from
    /// no later than `start_lsn`.
    Stream { upstream: String, start_lsn: u64 },
    /// Fenced: cut from every upstream, keeping its WAL for a standby's catch-up.
    Hold,
}

impl ClusterState {
    /// A new cluster: term 1, the config's roles, nothing running until `cm_ctl start`.
    pub fn initial(cfg: &ClusterConfig) -> ClusterState {
        let mut s = ClusterState {
            term: Term(1),
            version: 0,
            order_id_base: 0,
            instances: BTreeMap::new(),
            last_sync_standby: BTreeMap::new(),
            gtm: GtmAlone::default(),
            secondary: BTreeMap::new(),
            ddl_set: Default::default(),
            role_changes: Vec::new(),
        };
        s.reconcile(cfg);
        s
    }

    /// Brings the instance list in line with the config: instances added to the config
    /// get their configured role (stopped), removed ones are forgotten. Roles and run
    /// states of known instances are kept. Returns whether anything changed.
    pub fn reconcile(&mut self, cfg: &ClusterConfig) -> bool {
        let mut changed = false;
        let managed: Vec<_> = cfg
            .all_refs()
            .into_iter()
            .filter(|r| r.kind != InstanceKind::CmServer)
            .collect();
        for r in &managed {
            let configured = r.instance.role().map(AssignedRole::from);
            let entry = self.instances.entry(r.instance.name.clone());
            if let std::collections::btree_map::Entry::Vacant(v) = entry {
                v.insert(InstanceState {
                    role: configured,
                    run: false,
                });
                changed = true;
            }
        }
        let before = self.instances.len();
        self.instances
            .retain(|name, _| managed.iter().any(|r| &r.instance.name == name));
        changed || before != self.instances.len()
    }

    pub fn get(&self, name: &str) -> Option<&InstanceState> {
        self.instances.get(name)
    }

    pub fn role_of(&self, name: &str) -> Option<AssignedRole> {
        self.instances.get(name).and_then(|i| i.role)
    }

    pub fn should_run(&self, name: &str) -> bool {
        self.instances.get(name).is_some_and(|i| i.run)
    }

    /// Sets the desired run state of one instance (`Some(name)`) or of all
    /// (`None`); returns the names affected. Unknown names change nothing.
    pub fn set_run(&mut self, target: Option<&str>, run: bool) -> Result<Vec<String>, StateError> {
        match target {
            Some(name) => {
                let inst = self
                    .instances
                    .get_mut(name)
                    .ok_or_else(|| StateError::UnknownInstance(name.to_owned()))?;
                inst.run = run;
                Ok(vec![name.to_owned()])
            }
            None => {
                for inst in self.instances.values_mut() {
                    inst.run = run;
                }
                Ok(self.instances.keys().cloned().collect())
            }
        }
    }

    /// Assigns a role (failover/switchover, next issues). Callers bump the term with it.
    pub fn set_role(&mut self, name: &str, role: AssignedRole) -> Result<(), StateError> {
        let inst = self
            .instances
            .get_mut(name)
            .ok_or_else(|| StateError::UnknownInstance(name.to_owned()))?;
        inst.role = Some(role);
        Ok(())
    }

    /// Starts a new term (a new leader or a role change); returns it.
    /// Remembers `change` (stamped now if it has no time), dropping the oldest beyond
    /// [`ROLE_CHANGES_KEPT`].
    pub fn record_role_change(&mut self, mut change: RoleChange) {
        if change.at_unix_ms == 0 {
            change.at_unix_ms = unix_ms_now();
        }
        self.role_changes.push(change);
        let extra = self.role_changes.len().saturating_sub(ROLE_CHANGES_KEPT);
        self.role_changes.drain(..extra);
    }

    pub fn bump_term(&mut self) -> Term {
        self.term = self.term.next();
        self.term
    }

    /// The serialised payload (JSON inside the sealed envelope).
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).expect("ClusterState serialises")
    }

    pub fn from_bytes(path: &Path, bytes: &[u8]) -> Result<ClusterState, StateError> {
        serde_json::from_slice(bytes).map_err(|e| StateError::BadContent {
            path: path.to_owned(),
            message: e.to_string(),
        })
    }
}

/// The state file on disk.
#[derive(Debug, Clone)]
pub struct StateFile {
    path: PathBuf,
}

impl StateFile {
    /// `<dir>/cluster_state`.
    pub fn in_dir(dir: &Path) -> StateFile {
        StateFile {
            path: dir.join(STATE_FILE_NAME),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The persisted state; None if there is no file yet. A damaged file is an error
    /// that names it, never a silently fresh state.
    pub fn load(&self) -> Result<Option<ClusterState>, StateError> {
        let bytes = match std::fs::read(&self.path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(StateError::Read {
                    path: self.path.clone(),
                    source,
                })
            }
        };
        let payload = STATE_ENVELOPE.open(&self.path, &bytes)?;
        ClusterState::from_bytes(&self.path, payload).map(Some)
    }

    /// Atomically replaces the file with `state` (durable when this returns).
    pub fn persist(&self, state: &ClusterState) -> Result<(), StateError> {
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir).map_err(|source| StateError::Write {
                path: self.path.clone(),
                source,
            })?;
        }
        write_atomic(&self.path, &STATE_ENVELOPE.seal(&state.to_bytes())).map_err(|source| {
            StateError::Write {
                path: self.path.clone(),
                source,
            }
        })
    }

    /// Loads the state, or creates the initial one for `cfg`; either way reconciled
    /// with the config and persisted if that changed anything.
    pub fn load_or_init(&self, cfg: &ClusterConfig) -> Result<ClusterState, StateError> {
        match self.load()? {
            Some(mut s) => {
                if s.reconcile(cfg) {
                    self.persist(&s)?;
                }
                Ok(s)
            }
            None => {
                let s = ClusterState::initial(cfg);
                self.persist(&s)?;
                Ok(s)
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn local_config() -> ClusterConfig {
        ClusterConfig::parse(
            include_str!("../../configs/local.toml"),
            Path::new("local.toml"),
        )
        .expect("local.toml parses")
    }

    #[test]
    fn initial_state_has_the_configured_roles_and_runs_nothing() {
        let s = ClusterState::initial(&local_config());
        assert_eq!(s.term, Term(1));
        assert_eq!(s.role_of("dn1_h1"), Some(AssignedRole::Primary));
        assert_eq!(s.role_of("dn1_h2"), Some(AssignedRole::Standby));
        assert_eq!(s.role_of("dn1_h3"), Some(AssignedRole::Secondary));
        assert_eq!(s.role_of("gtm2"), Some(AssignedRole::Standby));
        assert_eq!(s.get("cn1").unwrap().role, None);
        assert!(s.get("cms1").is_none(), "CMServers are not agent-managed");
        assert!(s.instances.values().all(|i| !i.run));
    }

    #[test]
    fn set_run_one_and_all() {
        let mut s = ClusterState::initial(&local_config());
        assert_eq!(s.set_run(None, true).unwrap().len(), s.instances.len());
        assert_eq!(s.set_run(Some("dn1_h2"), false).unwrap(), vec!["dn1_h2"]);
        assert!(!s.should_run("dn1_h2"));
        assert!(s.should_run("dn1_h1"));
        let before = s.clone();
        assert!(matches!(
            s.set_run(Some("nope"), false),
            Err(StateError::UnknownInstance(_))
        ));
        assert_eq!(s, before, "an unknown name changes nothing");
    }

    #[test]
    fn persist_and_load_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let file = StateFile::in_dir(dir.path());
        let cfg = local_config();
        assert!(file.load().unwrap().is_none());
        let mut s = file.load_or_init(&cfg).unwrap();
        s.set_run(Some("gtm1"), true).unwrap();
        s.set_role("dn1_h2", AssignedRole::Primary).unwrap();
        s.bump_term();
        file.persist(&s).unwrap();
        assert_eq!(file.load_or_init(&cfg).unwrap(), s);
    }

    #[test]
    fn a_flipped_byte_refuses_to_load_and_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = StateFile::in_dir(dir.path());
        file.load_or_init(&local_config()).unwrap();
        let mut bytes = std::fs::read(file.path()).unwrap();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0x20;
        std::fs::write(file.path(), &bytes).unwrap();
        let e = file.load_or_init(&local_config()).unwrap_err().to_string();
        assert!(e.contains(&file.path().display().to_string()), "{e}");
        assert!(e.contains("checksum"), "{e}");
    }

    #[test]
    fn role_changes_keep_the_newest_and_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let file = StateFile::in_dir(dir.path());
        let mut s = ClusterState::initial(&local_config());
        for i in 0..(ROLE_CHANGES_KEPT as u64 + 5) {
            s.record_role_change(RoleChange {
                term: i,
                kind: "failover".into(),
                ..Default::default()
            });
        }
        assert_eq!(s.role_changes.len(), ROLE_CHANGES_KEPT);
        assert_eq!(s.role_changes[0].term, 5, "the oldest are dropped");
        assert!(s.role_changes.iter().all(|c| c.at_unix_ms > 0), "stamped");
        file.persist(&s).unwrap();
        assert_eq!(file.load().unwrap(), Some(s));
    }

    #[test]
    fn reconcile_adds_and_forgets_instances() {
        let cfg = local_config();
        let mut s = ClusterState::initial(&cfg);
        s.instances.remove("cn2");
        s.instances.insert(
            "ghost".into(),
            InstanceState {
                role: None,
                run: true,
            },
        );
        assert!(s.reconcile(&cfg));
        assert!(s.get("cn2").is_some() && s.get("ghost").is_none());
        assert!(!s.reconcile(&cfg));
    }
}
