//! One task per instance on this host: it applies the CMServer's assignment (start,
//! keep running, restart after a crash, hold stopped), carries out orders, and
//! publishes what it observes for the next report. State changes go through
//! [`crate::lifecycle`].

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ha_common::config::{ClusterConfig, DnGroup, InstanceKind as ConfigKind, InstanceRef, Role};
use ha_common::dn_auth::DnRole;
use ha_common::proto::cm::{
    Assignment, InstanceKind, InstanceReport, MemberRole, Order, OrderOutcome,
};
use tokio::sync::{mpsc, watch};

use crate::cn_instance::{self, CnInstance, CN_STOP_GRACE};
use crate::error::{AgentError, Result};
use crate::gtm_instance::{self, GtmInstance};
use crate::lifecycle::{Lifecycle, LifecycleEvent, LifecycleState};
use crate::os_user::OsUser;
use crate::postgres::{PgInstance, PgSettings, Upstream};
use crate::secondary_instance::{self, SecondaryInstance};
use ha_common::proto::replicator::ReplicatorStatus;

/// What the CMServer wants of one instance, with the term of the reply it came in.
#[derive(Debug, Clone, PartialEq)]
pub struct Desired {
    pub term: u64,
    pub assignment: Assignment,
}

/// The thing being supervised.
#[derive(Debug)]
pub enum Managed {
    Postgres {
        pg: PgInstance,
        group: DnGroup,
    },
    Gtm(GtmInstance),
    /// DN secondary: `dn_replicator serve`, its last status (for relaying orders).
    Secondary {
        inst: SecondaryInstance,
        group: String,
        last: Option<ReplicatorStatus>,
    },
    /// CN: `cn serve`, probed with `Coordinator.Status`.
    Cn(CnInstance),
}

/// How long a GTM gets to stop on SIGTERM before SIGKILL.
const GTM_STOP_GRACE: Duration = Duration::from_secs(10);

pub struct InstanceSupervisor {
    pub name: String,
    pub kind: InstanceKind,
    pub config_role: Option<Role>,
    pub managed: Managed,
    pub lifecycle: Lifecycle,
    pub desired: Option<Desired>,
    /// A STOP order holds the instance stopped until a START order or a changed
    /// assignment (assignments are level-triggered, orders one-shot).
    pub stopped_by_order: bool,
    pub last_error: String,
    /// Role the instance reported itself in at the last successful probe.
    pub observed_role: Option<Role>,
    pub probe_timeout: Duration,
    /// Whether this agent already tried to make the DN roles on a running instance
    /// whose probe failed (a server from before DN auth, adopted; see `observe`).
    roles_tried: bool,
    cfg: Arc<ClusterConfig>,
    report_tx: Option<watch::Sender<Observation>>,
    last_report: InstanceReport,
}

/// A report and when its facts were observed: the report loop re-sends the latest
/// one every heartbeat, stating its age (`observed_ms_ago`), while the next probe
/// may still be hanging.
#[derive(Debug, Clone)]
pub struct Observation {
    pub report: InstanceReport,
    pub at: Instant,
}

impl Observation {
    /// `report`, observed just now.
    pub fn now(report: InstanceReport) -> Observation {
        Observation {
            report,
            at: Instant::now(),
        }
    }

    /// The report to send at `now`, carrying its age.
    pub fn to_send(&self, now: Instant) -> InstanceReport {
        let age = now.saturating_duration_since(self.at).as_millis();
        InstanceReport {
            observed_ms_ago: u64::try_from(age).unwrap_or(u64::MAX),
            ..self.report.clone()
        }
    }
}

/// The channels connecting one supervisor task to the report loop.
pub struct SupervisorChannels {
    pub desired: watch::Receiver<Option<Desired>>,
    pub orders: mpsc::Receiver<Order>,
    pub outcomes: mpsc::UnboundedSender<OrderOutcome>,
    pub report: watch::Sender<Observation>,
}

pub fn member_role(role: Role) -> MemberRole {
    match role {
        Role::Primary => MemberRole::Primary,
        Role::Standby => MemberRole::Standby,
        Role::Secondary => MemberRole::Secondary,
    }
}

fn role_of(m: MemberRole) -> Option<Role> {
    match m {
        MemberRole::Primary => Some(Role::Primary),
        MemberRole::Standby => Some(Role::Standby),
        MemberRole::Secondary => Some(Role::Secondary),
        MemberRole::RoleUnspecified => None,
    }
}

impl InstanceSupervisor {
    /// A supervisor for an instance placed on this host (not a CMServer: those are
    /// started by cm_ctl/systemd). `config_path` is handed to the GTM.
    pub fn new(
        cfg: Arc<ClusterConfig>,
        r: &InstanceRef<'_>,
        os_user: &OsUser,
        config_path: &Path,
    ) -> Result<InstanceSupervisor> {
        let name = r.instance.name.clone();
        let config_role = r.instance.role();
        let (kind, managed) = match (r.kind, config_role) {
            (ConfigKind::DnMember, Some(Role::Secondary)) => (
                InstanceKind::DnSecondary,
                Managed::Secondary {
                    inst: SecondaryInstance::from_config(&cfg, &name, config_path)?,
                    group: r.group.map(|g| g.name.clone()).unwrap_or_default(),
                    last: None,
                },
            ),
            (ConfigKind::DnMember, _) => {
                let group = r.group.cloned().ok_or_else(|| {
                    AgentError::Instance(format!("{name}: DN member without a group"))
                })?;
                let pg = PgInstance::from_config(&cfg, &name, os_user.clone())?;
                (InstanceKind::DataNode, Managed::Postgres { pg, group })
            }
            (ConfigKind::Gtm, _) => (
                InstanceKind::Gtm,
                Managed::Gtm(GtmInstance::from_config(&cfg, &name, config_path)?),
            ),
            (ConfigKind::Coordinator, _) => (
                InstanceKind::Coordinator,
                Managed::Cn(CnInstance::from_config(&cfg, &name, config_path)?),
            ),
            (ConfigKind::CmServer, _) => {
                return Err(AgentError::Instance(format!(
                    "{name}: CMServers are started by cm_ctl/systemd, not by the agent"
                )))
            }
        };
        let probe_timeout = cfg.timing.probe_timeout();
        let mut sup = InstanceSupervisor {
            last_report: InstanceReport::default(),
            name,
            kind,
            config_role,
            managed,
            lifecycle: Lifecycle::new(),
            desired: None,
            stopped_by_order: false,
            last_error: String::new(),
            observed_role: None,
            probe_timeout,
            roles_tried: false,
            cfg,
            report_tx: None,
        };
        sup.last_report = sup.base_report();
        sup.last_report.detail = "agent starting".into();
        Ok(sup)
    }

    /// The cluster config the agent runs with.
    pub fn config(&self) -> Arc<ClusterConfig> {
        self.cfg.clone()
    }

    /// The report published before the first probe.
    pub fn initial_report(&self) -> Observation {
        Observation::now(self.last_report.clone())
    }

    /// The role the CMServer assigned, else the configured one.
    pub fn assigned_role(&self) -> Option<Role> {
        self.desired
            .as_ref()
            .and_then(|d| role_of(d.assignment.role()))
            .or(self.config_role)
    }

    /// Whether the instance should run: None until the CMServer has said.
    pub fn wants_run(&self) -> Option<bool> {
        match &self.desired {
            Some(d) => Some(d.assignment.run && !self.stopped_by_order),
            None if self.stopped_by_order => Some(false),
            None => None,
        }
    }

    /// Takes a new assignment; a changed one ends a hold placed by a STOP order.
    pub fn set_desired(&mut self, desired: Option<Desired>) {
        let changed = matches!((&self.desired, &desired), (Some(old), Some(new)) if old.assignment != new.assignment);
        if changed {
            self.stopped_by_order = false;
        }
        self.desired = desired;
    }

    /// The primary a standby of this DN should follow: the assignment's, else the
    /// configured primary of its group (unless that is itself).
    pub fn upstream(&self) -> Option<Upstream> {
        if let Some(up) = self.assigned_upstream() {
            return Some(up);
        }
        let Managed::Postgres { group, .. } = &self.managed else {
            return None;
        };
        let p = group.member_with_role(Role::Primary)?;
        (p.name != self.name).then(|| Upstream {
            host: self.cfg.address_of(p).to_owned(),
            port: p.port(),
        })
    }

    /// The primary named by the assignment, if it names one.
    pub fn assigned_upstream(&self) -> Option<Upstream> {
        let a = &self.desired.as_ref()?.assignment;
        let port = u16::try_from(a.primary_port).ok().filter(|p| *p != 0)?;
        (!a.primary_address.is_empty()).then(|| Upstream {
            host: a.primary_address.clone(),
            port,
        })
    }

    /// The live process's pid, if any.
    pub fn pid(&mut self) -> Option<u32> {
        match &mut self.managed {
            Managed::Postgres { pg, .. } => pg.postmaster_pid(),
            Managed::Gtm(g) => g.pid(),
            Managed::Cn(c) => c.pid(),
            Managed::Secondary { inst, .. } => inst.pid(),
        }
    }

    /// Applies a lifecycle event; an invalid one is logged (a supervisor bug).
    pub fn event(&mut self, ev: LifecycleEvent) {
        let before = self.lifecycle.state().clone();
        match self.lifecycle.apply(ev) {
            Ok(now) if *now != before => {
                tracing::info!(instance = %self.name, from = before.name(), to = now.name(), "lifecycle");
                self.publish_state();
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(instance = %self.name, "{e}"),
        }
    }

    fn fail(&mut self, e: &AgentError) {
        let msg = e.to_string();
        tracing::warn!(instance = %self.name, "{msg}");
        self.last_error = msg.clone();
        self.event(LifecycleEvent::Fail(msg));
    }

    /// Makes the instance match its assignment. Called every heartbeat and whenever
    /// the assignment changes.
    pub async fn reconcile(&mut self) {
        let pid = self.pid();
        if pid.is_none() && *self.lifecycle.state() == LifecycleState::Running {
            tracing::warn!(instance = %self.name, "process gone: crashed");
            self.last_error = "process exited unexpectedly".into();
        }
        self.event(if pid.is_some() {
            LifecycleEvent::ProcessUp
        } else {
            LifecycleEvent::ProcessGone
        });
        let Some(run) = self.wants_run() else {
            return; // the CMServer has not spoken yet: observe only
        };
        if !run {
            if pid.is_some() {
                tracing::info!(instance = %self.name, "stopping: held stopped by the CMServer");
                if let Err(e) = self.stop_now().await {
                    self.fail(&e);
                }
            }
            self.event(LifecycleEvent::Hold);
            return;
        }
        if *self.lifecycle.state() == LifecycleState::HeldStopped {
            self.event(LifecycleEvent::Release);
        }
        if pid.is_some() {
            if let Err(e) = self.sync_running_config().await {
                tracing::warn!(instance = %self.name, "reconfiguring: {e}");
            }
            self.relay_secondary_order().await;
            return;
        }
        if !self.lifecycle.backoff.ready(Instant::now()) {
            return;
        }
        if let Err(e) = self.start_now().await {
            self.fail(&e);
        }
    }

    /// Creates data if needed, configures and starts the instance in its role.
    pub async fn start_now(&mut self) -> Result<()> {
        if self.pid().is_some() {
            self.event(LifecycleEvent::ProcessUp);
            return Ok(());
        }
        let role = self.assigned_role();
        let upstream = self.upstream();
        let cfg = self.cfg.clone();
        match &mut self.managed {
            Managed::Gtm(_) => {
                self.event(LifecycleEvent::StartRequested);
                if let Managed::Gtm(g) = &mut self.managed {
                    g.start().await?;
                }
                self.started();
                Ok(())
            }
            Managed::Cn(_) => {
                self.event(LifecycleEvent::StartRequested);
                if let Managed::Cn(c) = &mut self.managed {
                    c.start().await?;
                }
                self.started();
                Ok(())
            }
            Managed::Secondary { .. } => {
                self.event(LifecycleEvent::StartRequested);
                if let Managed::Secondary { inst, last, .. } = &mut self.managed {
                    *last = None;
                    inst.start().await?;
                }
                self.started();
                Ok(())
            }
            Managed::Postgres { pg, group } => {
                let pg = pg.clone();
                let group = group.clone();
                let fresh = !pg.has_data();
                if fresh {
                    self.event(LifecycleEvent::NeedsData);
                    if role == Some(Role::Primary) {
                        // A new, empty cluster is right only for the group's first
                        // primary; an empty primary anywhere else would be a lost shard.
                        if self.config_role != Some(Role::Primary) {
                            return Err(AgentError::Instance(format!(
                                "{}: assigned primary but has no data; refusing to initdb \
                                 a member that is not its group's configured primary",
                                self.name
                            )));
                        }
                        tracing::info!(instance = %self.name, "no data: initdb");
                        pg.initdb().await?;
                    } else {
                        let up = upstream.clone().ok_or_else(|| {
                            AgentError::Instance(format!(
                                "{}: standby without a known primary",
                                self.name
                            ))
                        })?;
                        tracing::info!(instance = %self.name, "no data: pg_basebackup from {}:{}", up.host, up.port);
                        pg.basebackup(&up).await?;
                    }
                    self.event(LifecycleEvent::DataReady);
                } else {
                    self.event(LifecycleEvent::StartRequested);
                }
                // A stopped instance starts in its assigned role. A standby follows
                // its primary; a data dir set up as a primary that is now assigned
                // standby is a former primary: rewind it first (a no-op when it did
                // not diverge). A stopped standby's data assigned primary starts as
                // the primary (PostgreSQL ends recovery at startup): the CMServer
                // decided the failover. (A RUNNING standby changes role only by a
                // PROMOTE order: the agent never restarts a running instance.)
                let follow = match role {
                    Some(Role::Primary) => None,
                    _ => Some(upstream.clone().ok_or_else(|| {
                        AgentError::Instance(format!(
                            "{}: standby without a known primary",
                            self.name
                        ))
                    })?),
                };
                if let Some(up) = &follow {
                    if !fresh && !pg.configured_as_standby() {
                        tracing::info!(instance = %self.name, "former primary: pg_rewind from {}:{}", up.host, up.port);
                        let out = pg.rewind(up).await?;
                        tracing::info!(instance = %self.name, "pg_rewind: {}", out.lines().last().unwrap_or("").trim());
                    }
                }
                let settings = PgSettings::for_member(&cfg, &group, &self.name, follow)?;
                pg.configure(&settings)?;
                pg.start().await?;
                if role == Some(Role::Primary) {
                    // Before the first probe (it logs in as the monitoring role) and
                    // before any standby copies it: a fresh primary has only the
                    // superuser; an older one gets the roles on its next start.
                    pg.ensure_roles(self.probe_timeout.max(Duration::from_secs(10)))
                        .await?;
                }
                self.started();
                Ok(())
            }
        }
    }

    fn started(&mut self) {
        tracing::info!(instance = %self.name, "started");
        self.last_error.clear();
        self.event(LifecycleEvent::Started);
    }

    /// Stops the instance (fast shutdown for PostgreSQL, SIGTERM for a GTM).
    pub async fn stop_now(&mut self) -> Result<()> {
        match &mut self.managed {
            Managed::Postgres { pg, .. } => pg.stop().await,
            Managed::Gtm(g) => g.stop(GTM_STOP_GRACE).await,
            Managed::Cn(c) => c.stop(CN_STOP_GRACE).await,
            Managed::Secondary { inst, .. } => inst.stop(GTM_STOP_GRACE).await,
        }
    }

    /// A running DN whose role matches its assignment gets its settings rewritten
    /// (and reloaded) when they changed, e.g. a standby told to follow a new primary.
    async fn sync_running_config(&mut self) -> Result<()> {
        let Managed::Postgres { pg, group } = &self.managed else {
            return Ok(());
        };
        let Some(observed) = self.observed_role else {
            return Ok(());
        };
        if self.desired.is_none() || Some(observed) != self.assigned_role() {
            return Ok(());
        }
        // A running standby is repointed only at a primary the CMServer names.
        let follow = match observed {
            Role::Primary => None,
            _ => match self.assigned_upstream() {
                Some(u) => Some(u),
                None => return Ok(()),
            },
        };
        let settings = PgSettings::for_member(&self.cfg, group, &self.name, follow)?;
        if pg.configure(&settings)? {
            tracing::info!(instance = %self.name, "settings changed: reload");
            pg.reload().await?;
        }
        Ok(())
    }

    /// A running secondary gets the CMServer's secondary assignment as a Replicator
    /// order (in the assignment's term) when its last status differs from it.
    async fn relay_secondary_order(&mut self) {
        let Some(d) = self.desired.clone() else {
            return;
        };
        let timeout = self.probe_timeout;
        let Managed::Secondary { inst, last, .. } = &mut self.managed else {
            return;
        };
        let current = match last.clone() {
            Some(s) => s,
            None => match inst.probe(timeout).await {
                Ok(s) => s,
                Err(_) => return, // not answering yet: the next tick tries again
            },
        };
        match inst.relay(d.term, &d.assignment, &current, timeout).await {
            Ok(Some(s)) => {
                tracing::info!(instance = %self.name, term = d.term, "secondary: {}", secondary_instance::describe(&s));
                *last = Some(s);
            }
            Ok(None) => {}
            Err(e) => {
                // Refused (older term) or unreachable: probe afresh next time.
                *last = None;
                tracing::warn!(instance = %self.name, "secondary order: {e}");
                self.last_error = e.to_string();
            }
        }
    }

    fn base_report(&self) -> InstanceReport {
        let r = InstanceReport {
            name: self.name.clone(),
            kind: self.kind as i32,
            role: self
                .assigned_role()
                .map(member_role)
                .unwrap_or(MemberRole::RoleUnspecified) as i32,
            held_stopped: *self.lifecycle.state() == LifecycleState::HeldStopped,
            last_error: self.last_error.clone(),
            term: self.desired.as_ref().map(|d| d.term).unwrap_or(0),
            ..InstanceReport::default()
        };
        r
    }

    fn state_text(&self) -> String {
        match self.lifecycle.state() {
            LifecycleState::Failed { reason } => format!("failed: {reason}"),
            s => s.name().to_owned(),
        }
    }

    /// Republishes the last report with the current lifecycle state (used while a
    /// long step such as initdb or pg_basebackup runs). The lifecycle state is known
    /// now, but the last probe's answer no longer holds while the agent starts, stops
    /// or rebuilds the instance: it is published as not responding, so that an old
    /// "healthy" cannot pass for a fresh one (the next `observe` tells again).
    fn publish_state(&mut self) {
        let state = self.state_text();
        let r = &mut self.last_report;
        r.held_stopped = *self.lifecycle.state() == LifecycleState::HeldStopped;
        r.last_error = self.last_error.clone();
        r.detail = state;
        r.responding = false;
        if let Some(tx) = &self.report_tx {
            tx.send_replace(Observation::now(r.clone()));
        }
    }

    /// Looks at the instance (pid, probe) and builds its report.
    pub async fn observe(&mut self) -> InstanceReport {
        let mut r = self.base_report();
        let pid = self.pid();
        r.process_alive = pid.is_some();
        r.pid = pid.unwrap_or(0);
        let mut facts = String::new();
        match &self.managed {
            Managed::Postgres { pg, .. } if pid.is_some() => {
                let mut probe = pg.probe(self.probe_timeout).await;
                // Refused as the monitoring role ('role "mpp_monitor" does not exist',
                // or its password): not a hung server, whose probe merely times out.
                let refused_login = probe.as_ref().is_err_and(|e| {
                    e.to_string()
                        .contains(&format!("\"{}\"", DnRole::Monitor.name()))
                });
                if refused_login && !self.roles_tried {
                    // Once per agent: a primary adopted from before DN auth has no
                    // monitoring role yet (and a standby's attempt fails harmlessly).
                    self.roles_tried = true;
                    let pg = pg.clone();
                    if pg.ensure_roles(self.probe_timeout).await.is_ok() {
                        tracing::info!(instance = %self.name, "made the DN roles on a running primary");
                        probe = pg.probe(self.probe_timeout).await;
                    }
                }
                match probe {
                    Ok(p) => {
                        let role = if p.in_recovery {
                            Role::Standby
                        } else {
                            Role::Primary
                        };
                        self.observed_role = Some(role);
                        r.responding = true;
                        r.role = member_role(role) as i32;
                        r.timeline = p.timeline;
                        r.current_lsn = p.current_lsn;
                        r.receive_lsn = p.receive_lsn;
                        r.flush_lsn = p.flush_lsn;
                        r.replay_lsn = p.replay_lsn;
                        r.replicas = p.replicas;
                    }
                    Err(e) => facts = e.to_string(),
                }
            }
            Managed::Secondary { inst, .. } if pid.is_some() => {
                match inst.probe(self.probe_timeout).await {
                    Ok(st) => {
                        self.observed_role = Some(Role::Secondary);
                        r.responding = true;
                        r.role = MemberRole::Secondary as i32;
                        r.flush_lsn = st.flush_lsn;
                        r.timeline = st.timeline;
                        r.secondary = Some(secondary_instance::facts(&st));
                        facts = secondary_instance::describe(&st);
                        if let Managed::Secondary { last, .. } = &mut self.managed {
                            *last = Some(st);
                        }
                    }
                    Err(e) => facts = e.to_string(),
                }
            }
            Managed::Gtm(g) if pid.is_some() => match g.probe(self.probe_timeout).await {
                Ok(s) => {
                    use ha_common::proto::gtm::Role as GtmRole;
                    let role = match GtmRole::try_from(s.role) {
                        Ok(GtmRole::Primary) => Some(Role::Primary),
                        Ok(GtmRole::Standby) => Some(Role::Standby),
                        _ => None,
                    };
                    self.observed_role = role;
                    if let Some(role) = role {
                        r.role = member_role(role) as i32;
                    }
                    r.responding = true;
                    r.gtm = Some(ha_common::proto::cm::GtmFacts {
                        term: s.term,
                        ready: s.ready,
                        standby_attached: s.standby_attached,
                        run_alone: s.run_alone,
                        boundary: s.boundary,
                    });
                    facts = gtm_instance::describe(&s);
                }
                Err(e) => facts = e.to_string(),
            },
            // A CN that answers its Status RPC is responding even before it accepts
            // clients: the CMServer admits it to the DDL set only while its agent
            // sees it alive, and it accepts clients only once admitted. Whether it
            // serves, status tells from CnSync (`ddl_set::annotate`).
            Managed::Cn(c) if pid.is_some() => match c.probe(self.probe_timeout).await {
                Ok(s) => {
                    r.responding = true;
                    facts = cn_instance::describe(&s);
                }
                Err(e) => facts = e.to_string(),
            },
            _ => {}
        }
        if pid.is_none() {
            self.observed_role = None;
        }
        r.detail = if facts.is_empty() {
            self.state_text()
        } else {
            format!("{}; {facts}", self.state_text())
        };
        r
    }

    /// The supervisor task: reconcile and observe every `interval`, at once when the
    /// assignment changes, and carry out orders as they come.
    pub async fn run(mut self, mut ch: SupervisorChannels, interval: Duration) {
        self.report_tx = Some(ch.report.clone());
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut orders_open = true;
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                changed = ch.desired.changed() => {
                    if changed.is_err() {
                        return; // the agent is shutting down
                    }
                }
                order = ch.orders.recv(), if orders_open => match order {
                    Some(order) => {
                        let outcome = crate::orders::execute(&mut self, &order).await;
                        let _ = ch.outcomes.send(outcome);
                    }
                    None => orders_open = false,
                },
            }
            let desired = ch.desired.borrow_and_update().clone();
            self.set_desired(desired);
            self.reconcile().await;
            let report = self.observe().await;
            self.last_report = report.clone();
            ch.report.send_replace(Observation::now(report));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> Arc<ClusterConfig> {
        Arc::new(
            ClusterConfig::parse(
                include_str!("../../configs/local.toml"),
                Path::new("local.toml"),
            )
            .unwrap()
            .with_base_dir(Some("/nonexistent/mpp-ha-unit".into())),
        )
    }

    fn sup(name: &str) -> InstanceSupervisor {
        let cfg = cfg();
        let r = cfg.find(name).unwrap();
        InstanceSupervisor::new(cfg.clone(), &r, &OsUser::current(), Path::new("c.toml")).unwrap()
    }

    fn desired(run: bool, role: MemberRole, addr: &str, port: u32) -> Option<Desired> {
        Some(Desired {
            term: 1,
            assignment: Assignment {
                instance: "x".into(),
                run,
                role: role as i32,
                primary_address: addr.into(),
                primary_port: port,
                ..Assignment::default()
            },
        })
    }

    #[test]
    fn kinds_follow_the_config() {
        assert_eq!(sup("dn1_h1").kind, InstanceKind::DataNode);
        assert_eq!(sup("dn1_h3").kind, InstanceKind::DnSecondary);
        assert_eq!(sup("gtm1").kind, InstanceKind::Gtm);
        assert_eq!(sup("cn1").kind, InstanceKind::Coordinator);
        let cfg = cfg();
        let r = cfg.find("cms1").unwrap();
        assert!(
            InstanceSupervisor::new(cfg.clone(), &r, &OsUser::current(), Path::new("c")).is_err()
        );
    }

    #[test]
    fn nothing_runs_until_told() {
        let mut s = sup("dn1_h1");
        assert_eq!(s.wants_run(), None);
        s.set_desired(desired(true, MemberRole::Primary, "", 0));
        assert_eq!(s.wants_run(), Some(true));
    }

    #[test]
    fn stop_order_holds_until_the_assignment_changes() {
        let mut s = sup("dn1_h1");
        s.set_desired(desired(true, MemberRole::Primary, "", 0));
        s.stopped_by_order = true;
        s.set_desired(desired(true, MemberRole::Primary, "", 0));
        assert_eq!(s.wants_run(), Some(false));
        s.set_desired(desired(true, MemberRole::Standby, "10.0.0.1", 5432));
        assert_eq!(s.wants_run(), Some(true));
    }

    #[test]
    fn upstream_from_assignment_else_config() {
        let mut s = sup("dn1_h2");
        assert_eq!(
            s.upstream(),
            Some(Upstream {
                host: "127.0.0.1".into(),
                port: 6501
            })
        );
        s.set_desired(desired(true, MemberRole::Standby, "10.1.1.1", 7777));
        assert_eq!(
            s.upstream(),
            Some(Upstream {
                host: "10.1.1.1".into(),
                port: 7777
            })
        );
        // The configured primary has no upstream of its own.
        assert_eq!(sup("dn1_h1").upstream(), None);
    }

    #[tokio::test]
    async fn a_data_less_standby_assigned_primary_is_never_initdb_ed() {
        let mut s = sup("dn1_h2");
        s.set_desired(desired(true, MemberRole::Primary, "", 0));
        let e = s.start_now().await.unwrap_err().to_string();
        assert!(e.contains("refusing to initdb"), "{e}");
        assert!(matches!(s.lifecycle.state(), LifecycleState::Initialising));
    }

    #[tokio::test]
    async fn every_kind_is_supervised() {
        for (name, kind) in [
            ("cn1", InstanceKind::Coordinator),
            ("dn1_h3", InstanceKind::DnSecondary),
        ] {
            let r = sup(name).observe().await;
            assert!(!r.unsupported, "{name} is supervised");
            assert!(
                !r.process_alive && !r.responding,
                "{name}: nothing runs yet"
            );
            assert_eq!(r.kind, kind as i32, "{name}");
        }
        let r = sup("dn1_h3").observe().await;
        assert_eq!(r.role, MemberRole::Secondary as i32);
    }
}
