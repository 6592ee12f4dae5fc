//! The cluster's status as `cm_ctl status` shows it: a pure function of the config,
//! the durable state, the latest reports (with their ages) and when the peer CMServer
//! last answered. Truthful by construction: nothing is "normal" without a fresh report
//! that says so.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use ha_common::config::{ClusterConfig, DnGroup, Instance, InstanceKind, InstanceRef};
use ha_common::lsn::format_lsn;
use ha_common::proto::cm::{
    AgentStatus, ClusterStatus, DnGroupStatus, InstanceReport, InstanceStatus, MemberRole,
    ReplicaState,
};

use crate::assignments::current_primary;
use crate::reports::Reports;
use crate::state::{AssignedRole, ClusterState};

/// Instance states, as strings in the status messages.
pub mod states {
    pub const NORMAL: &str = "normal";
    pub const DOWN: &str = "down";
    pub const STARTING: &str = "starting";
    pub const STOPPING: &str = "stopping";
    pub const STOPPED: &str = "stopped";
    pub const UNKNOWN: &str = "unknown";
    pub const DEGRADED: &str = "degraded";
    pub const CATCHING_UP: &str = "catching_up";
    pub const NOT_IMPLEMENTED: &str = "not_implemented";
}
use states::*;

/// Everything the status is computed from.
pub struct StatusInput<'a> {
    pub cfg: &'a ClusterConfig,
    pub state: &'a ClusterState,
    pub reports: &'a Reports,
    pub now: Instant,
    /// The CMServer computing the status (the primary).
    pub this_node: &'a str,
    /// When each other CMServer last answered us.
    pub peers_seen: &'a HashMap<String, Instant>,
}

impl StatusInput<'_> {
    fn timeout(&self) -> Duration {
        self.cfg.timing.agent_timeout()
    }

    fn fresh(&self, name: &str) -> Option<&InstanceReport> {
        self.reports.fresh(name, self.now, self.timeout())
    }
}

/// The whole cluster's status.
pub fn cluster_status(input: &StatusInput<'_>) -> ClusterStatus {
    let cfg = input.cfg;
    let cm_servers = cfg
        .cm_servers
        .iter()
        .map(|s| cm_server_status(input, s))
        .collect();
    let mut gtm = Vec::new();
    let mut cn = Vec::new();
    for r in cfg.all_refs() {
        match r.kind {
            InstanceKind::Gtm => gtm.push(instance_status(input, r)),
            InstanceKind::Coordinator => cn.push(instance_status(input, r)),
            InstanceKind::CmServer | InstanceKind::DnMember => {}
        }
    }
    let dn_groups = cfg
        .dn_groups
        .iter()
        .map(|g| group_status(input, g))
        .collect();
    let mut status = ClusterStatus {
        term: input.state.term.0,
        cm_servers,
        gtm,
        cn,
        dn_groups,
        agents: agent_rows(input),
        role_changes: input
            .state
            .role_changes
            .iter()
            .map(|c| c.to_proto())
            .collect(),
    };
    add_metrics_urls(cfg, &mut status);
    status
}

/// Every row of a daemon that serves metrics gets its URL (operators and Prometheus
/// service discovery read it from `cm_ctl status --json` or `GET /cluster`).
fn add_metrics_urls(cfg: &ClusterConfig, status: &mut ClusterStatus) {
    let rows = status
        .cm_servers
        .iter_mut()
        .chain(status.gtm.iter_mut())
        .chain(status.cn.iter_mut())
        .chain(
            status
                .dn_groups
                .iter_mut()
                .flat_map(|g| g.members.iter_mut()),
        );
    for row in rows {
        if let Some(r) = cfg.find(&row.name) {
            row.metrics_url = cfg.metrics_url(r.instance).unwrap_or_default();
        }
    }
}

/// One row per host's cm_agent: reporting, silent or never heard from.
fn agent_rows(input: &StatusInput<'_>) -> Vec<AgentStatus> {
    input
        .cfg
        .hosts
        .iter()
        .map(|h| {
            let (state, age) = match input.reports.host_seen(&h.name) {
                Some(at) => {
                    let age = input.now.saturating_duration_since(at);
                    let state = if age <= input.timeout() { NORMAL } else { DOWN };
                    (state, age.as_secs_f64())
                }
                None => (UNKNOWN, -1.0),
            };
            AgentStatus {
                host: h.name.clone(),
                state: state.into(),
                metrics_url: input.cfg.agent_metrics_url(h).unwrap_or_default(),
                report_age_s: age,
            }
        })
        .collect()
}

fn base_row(inst: &Instance, role: &str) -> InstanceStatus {
    InstanceStatus {
        name: inst.name.clone(),
        host: inst.host.clone(),
        port: u32::from(inst.port()),
        role: role.to_owned(),
        report_age_s: -1.0,
        ..Default::default()
    }
}

fn cm_server_status(input: &StatusInput<'_>, s: &Instance) -> InstanceStatus {
    if s.name == input.this_node {
        let mut row = base_row(s, "primary");
        row.state = NORMAL.into();
        row.report_age_s = 0.0;
        return row;
    }
    let mut row = base_row(s, "standby");
    match input.peers_seen.get(&s.name) {
        Some(at) => {
            let age = input.now.saturating_duration_since(*at);
            row.report_age_s = age.as_secs_f64();
            if age <= input.timeout() {
                row.state = NORMAL.into();
            } else {
                row.state = DOWN.into();
                row.detail = format!("has not answered for {:.1} s", age.as_secs_f64());
            }
        }
        None => {
            row.state = DOWN.into();
            row.detail = "has not answered yet".into();
        }
    }
    row
}

fn role_label(input: &StatusInput<'_>, r: InstanceRef<'_>) -> &'static str {
    match input.state.role_of(&r.instance.name) {
        Some(role) => role.as_str(),
        None => "active",
    }
}

/// One GTM, CN or DN member.
fn instance_status(input: &StatusInput<'_>, r: InstanceRef<'_>) -> InstanceStatus {
    let name = &r.instance.name;
    let mut row = base_row(r.instance, role_label(input, r));
    let Some(observed) = input.reports.latest(name) else {
        row.state = UNKNOWN.into();
        row.detail = format!("no report from the agent of {} yet", r.instance.host);
        return row;
    };
    let age = input.now.saturating_duration_since(observed.at);
    row.report_age_s = age.as_secs_f64();
    if age > input.timeout() {
        row.state = UNKNOWN.into();
        let heard = input.now.saturating_duration_since(observed.received);
        row.detail = if heard > input.timeout() {
            format!(
                "the agent of {} has been silent for {:.1} s",
                r.instance.host,
                heard.as_secs_f64()
            )
        } else {
            format!(
                "last observed {:.1} s ago (the agent of {} reports, but has not looked at it since)",
                age.as_secs_f64(),
                r.instance.host
            )
        };
        return row;
    }
    let rep = &observed.report;
    row.timeline = rep.timeline;
    let (state, detail) = judge(input, r, rep);
    row.state = state.into();
    row.detail = detail;
    if let Some(f) = rep.secondary.as_ref().filter(|_| rep.responding) {
        fill_secondary(input, r, f, &mut row);
    } else if rep.process_alive && rep.responding && r.kind == InstanceKind::DnMember {
        fill_replication(input, r, rep, &mut row);
    } else if row.detail.is_empty() {
        row.detail = rep.detail.clone();
    }
    row
}

/// The state of an instance with a fresh report.
fn judge(
    input: &StatusInput<'_>,
    r: InstanceRef<'_>,
    rep: &InstanceReport,
) -> (&'static str, String) {
    let name = &r.instance.name;
    if rep.unsupported {
        let why = if rep.detail.is_empty() {
            "not implemented yet".to_owned()
        } else {
            rep.detail.clone()
        };
        return (NOT_IMPLEMENTED, why);
    }
    if !input.state.should_run(name) {
        return if rep.process_alive {
            (
                STOPPING,
                "held stopped by the operator; still running".into(),
            )
        } else {
            (STOPPED, "held stopped by the operator".into())
        };
    }
    if !rep.process_alive {
        // The agent names its step while it creates or starts the instance.
        let step = rep.detail.split(':').next().unwrap_or("").trim();
        if matches!(step, "initialising" | "starting" | "restarting") && rep.last_error.is_empty() {
            return (STARTING, rep.detail.clone());
        }
        let why = [&rep.last_error, &rep.detail]
            .into_iter()
            .find(|s| !s.is_empty())
            .cloned()
            .unwrap_or_else(|| "process not running".into());
        return (DOWN, why);
    }
    if !rep.responding {
        let why = if rep.last_error.is_empty() {
            "running, not answering yet".to_owned()
        } else {
            rep.last_error.clone()
        };
        return (STARTING, why);
    }
    let assigned = input.state.role_of(name);
    if let Some(assigned) = assigned {
        if rep.role != assigned.to_proto() as i32 {
            let observed = MemberRole::try_from(rep.role)
                .map(|r| r.as_str_name().to_ascii_lowercase())
                .unwrap_or_else(|_| format!("role {}", rep.role));
            return (
                DEGRADED,
                format!("runs as {observed}, assigned {}", assigned.as_str()),
            );
        }
    }
    if r.kind == InstanceKind::DnMember && assigned == Some(AssignedRole::Standby) {
        return standby_replication_state(input, r);
    }
    (NORMAL, String::new())
}

/// A DN standby is normal only while its primary reports it as streaming.
fn standby_replication_state(
    input: &StatusInput<'_>,
    r: InstanceRef<'_>,
) -> (&'static str, String) {
    let Some(primary) = current_primary(input.cfg, input.state, r) else {
        return (DEGRADED, "its group has no primary assigned".into());
    };
    let Some(prep) = input.fresh(&primary.name).filter(|p| p.responding) else {
        return (
            DEGRADED,
            format!("its primary {} is not reporting", primary.name),
        );
    };
    match replica_row(prep, &r.instance.name) {
        Some(row) if row.state == "streaming" => (NORMAL, String::new()),
        Some(row) => (
            CATCHING_UP,
            format!("replication from {} is {:?}", primary.name, row.state),
        ),
        None => (
            DEGRADED,
            format!("not replicating from its primary {}", primary.name),
        ),
    }
}

/// The primary's pg_stat_replication row for `standby` (matched by application_name).
fn replica_row<'a>(primary: &'a InstanceReport, standby: &str) -> Option<&'a ReplicaState> {
    primary
        .replicas
        .iter()
        .find(|r| r.application_name == standby)
}

/// A DN secondary: idle or streaming (from whom), flush LSN, bytes kept, and whether
/// its primary counts it as the synchronous partner.
fn fill_secondary(
    input: &StatusInput<'_>,
    r: InstanceRef<'_>,
    f: &ha_common::proto::cm::SecondaryFacts,
    row: &mut InstanceStatus,
) {
    let mut detail = match f.state.as_str() {
        "streaming" if f.connected => format!("streaming from {}", f.upstream),
        "streaming" => format!("connecting to {}", f.upstream),
        other => other.to_owned(),
    };
    if f.state != "idle" || f.bytes_kept > 0 {
        detail.push_str(&format!(
            ", flush {}, {} bytes kept",
            format_lsn(f.flush_lsn),
            f.bytes_kept
        ));
    }
    if f.flush_lsn != 0 {
        row.lsn = format_lsn(f.flush_lsn);
    }
    row.detail = detail;
    if let Some(prep) =
        current_primary(input.cfg, input.state, r).and_then(|p| input.fresh(&p.name))
    {
        if let Some(rr) = replica_row(prep, &r.instance.name) {
            row.sync_state = rr.sync_state.clone();
        }
    }
}

/// LSN, lag and sync state of a responding DN member.
fn fill_replication(
    input: &StatusInput<'_>,
    r: InstanceRef<'_>,
    rep: &InstanceReport,
    row: &mut InstanceStatus,
) {
    if rep.role == MemberRole::Primary as i32 {
        if rep.current_lsn != 0 {
            row.lsn = format_lsn(rep.current_lsn);
        }
        return;
    }
    let own = if rep.replay_lsn != 0 {
        rep.replay_lsn
    } else {
        rep.receive_lsn
    };
    if own != 0 {
        row.lsn = format_lsn(own);
    }
    let Some(primary) = current_primary(input.cfg, input.state, r) else {
        return;
    };
    let Some(prep) = input.fresh(&primary.name) else {
        return;
    };
    let replica = replica_row(prep, &r.instance.name);
    if let Some(rr) = replica {
        row.sync_state = rr.sync_state.clone();
    }
    let applied = replica
        .map(|rr| rr.replay_lsn)
        .filter(|l| *l != 0)
        .unwrap_or(own);
    if prep.current_lsn != 0 && applied != 0 {
        row.lag_bytes = prep.current_lsn.saturating_sub(applied);
    }
}

fn group_status(input: &StatusInput<'_>, g: &DnGroup) -> DnGroupStatus {
    let members: Vec<InstanceStatus> = g
        .members
        .iter()
        .map(|m| {
            instance_status(
                input,
                InstanceRef {
                    kind: InstanceKind::DnMember,
                    instance: m,
                    group: Some(g),
                },
            )
        })
        .collect();
    let (state, detail) = group_state(&members);
    DnGroupStatus {
        name: g.name.clone(),
        members,
        state: state.into(),
        detail,
    }
}

/// normal: primary and standby normal and the standby synchronous.
fn group_state(members: &[InstanceStatus]) -> (&'static str, String) {
    let by_role = |role: &str| members.iter().find(|m| m.role == role);
    let (Some(p), Some(s)) = (by_role("primary"), by_role("standby")) else {
        return (DEGRADED, "no primary or no standby assigned".into());
    };
    let runnable: Vec<_> = members
        .iter()
        .filter(|m| m.state != NOT_IMPLEMENTED)
        .collect();
    if !runnable.is_empty() && runnable.iter().all(|m| m.state == STOPPED) {
        return (STOPPED, "held stopped by the operator".into());
    }
    let mut problems = Vec::new();
    for m in [p, s] {
        if m.state != NORMAL {
            problems.push(format!("{} {} is {}", m.role, m.name, m.state));
        }
    }
    if problems.is_empty() && s.sync_state != "sync" {
        let sync = if s.sync_state.is_empty() {
            "unknown"
        } else {
            &s.sync_state
        };
        problems.push(format!(
            "standby {} is not synchronous (sync_state {sync})",
            s.name
        ));
    }
    if let Some(sec) = members
        .iter()
        .find(|m| m.role == "secondary" && m.sync_state == "sync")
    {
        problems.push(format!(
            "commits go on with two copies through the secondary {}",
            sec.name
        ));
    }
    if problems.is_empty() {
        (NORMAL, String::new())
    } else {
        (DEGRADED, problems.join("; "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::tests::local_config;
    use ha_common::proto::cm::InstanceKind as Kind;

    struct World {
        cfg: ClusterConfig,
        state: ClusterState,
        reports: Reports,
        peers: HashMap<String, Instant>,
        t0: Instant,
    }

    fn dn(name: &str, role: MemberRole, lsn: u64) -> InstanceReport {
        InstanceReport {
            name: name.into(),
            kind: Kind::DataNode as i32,
            process_alive: true,
            pid: 100,
            responding: true,
            role: role as i32,
            timeline: 1,
            current_lsn: if role == MemberRole::Primary { lsn } else { 0 },
            receive_lsn: if role == MemberRole::Primary { 0 } else { lsn },
            replay_lsn: if role == MemberRole::Primary { 0 } else { lsn },
            ..Default::default()
        }
    }

    fn streaming(app: &str, sync: &str, replay: u64) -> ReplicaState {
        ReplicaState {
            application_name: app.into(),
            state: "streaming".into(),
            sync_state: sync.into(),
            write_lsn: replay,
            flush_lsn: replay,
            replay_lsn: replay,
        }
    }

    fn unsupported(name: &str) -> InstanceReport {
        InstanceReport {
            name: name.into(),
            unsupported: true,
            ..Default::default()
        }
    }

    fn gtm(name: &str, role: MemberRole) -> InstanceReport {
        InstanceReport {
            name: name.into(),
            kind: Kind::Gtm as i32,
            process_alive: true,
            responding: true,
            role: role as i32,
            ..Default::default()
        }
    }

    /// A healthy running cluster as the agents would report it.
    fn healthy() -> World {
        let cfg = local_config();
        let mut state = ClusterState::initial(&cfg);
        state.set_run(None, true).unwrap();
        let mut w = World {
            cfg,
            state,
            reports: Reports::new(),
            peers: HashMap::new(),
            t0: Instant::now(),
        };
        let mut dn1_p = dn("dn1_h1", MemberRole::Primary, 0x3000148);
        dn1_p.replicas = vec![streaming("dn1_h2", "sync", 0x3000100)];
        let mut dn2_p = dn("dn2_h2", MemberRole::Primary, 0x5000000);
        dn2_p.replicas = vec![streaming("dn2_h3", "sync", 0x5000000)];
        w.report(
            "h1",
            vec![
                gtm("gtm1", MemberRole::Primary),
                unsupported("cn1"),
                dn1_p,
                unsupported("dn2_h1"),
            ],
        );
        w.report(
            "h2",
            vec![
                gtm("gtm2", MemberRole::Standby),
                unsupported("cn2"),
                dn("dn1_h2", MemberRole::Standby, 0x3000100),
                dn2_p,
            ],
        );
        w.report(
            "h3",
            vec![
                unsupported("dn1_h3"),
                dn("dn2_h3", MemberRole::Standby, 0x5000000),
            ],
        );
        w.peers.insert("cms2".into(), w.t0);
        w
    }

    impl World {
        fn report(&mut self, host: &str, instances: Vec<InstanceReport>) {
            self.report_at(host, instances, self.t0);
        }
        fn report_at(&mut self, host: &str, instances: Vec<InstanceReport>, at: Instant) {
            let ignored = self.reports.record_host(&self.cfg, host, instances, at);
            assert!(ignored.is_empty(), "{ignored:?}");
        }
        fn status_at(&self, now: Instant) -> ClusterStatus {
            cluster_status(&StatusInput {
                cfg: &self.cfg,
                state: &self.state,
                reports: &self.reports,
                now,
                this_node: "cms1",
                peers_seen: &self.peers,
            })
        }
        fn status(&self) -> ClusterStatus {
            self.status_at(self.t0 + Duration::from_millis(500))
        }
    }

    fn member<'a>(s: &'a ClusterStatus, name: &str) -> &'a InstanceStatus {
        s.dn_groups
            .iter()
            .flat_map(|g| &g.members)
            .chain(&s.gtm)
            .chain(&s.cn)
            .chain(&s.cm_servers)
            .find(|m| m.name == name)
            .unwrap_or_else(|| panic!("{name} not in status"))
    }

    fn group<'a>(s: &'a ClusterStatus, name: &str) -> &'a DnGroupStatus {
        s.dn_groups.iter().find(|g| g.name == name).unwrap()
    }

    #[test]
    fn a_healthy_cluster_is_normal_with_lsns_and_lag() {
        let s = healthy().status();
        assert_eq!(s.term, 1);
        for n in [
            "dn1_h1", "dn1_h2", "dn2_h2", "dn2_h3", "gtm1", "gtm2", "cms1", "cms2",
        ] {
            assert_eq!(member(&s, n).state, NORMAL, "{n}: {:?}", member(&s, n));
        }
        for n in ["cn1", "cn2", "dn1_h3", "dn2_h1"] {
            assert_eq!(member(&s, n).state, NOT_IMPLEMENTED, "{n}");
        }
        assert_eq!(group(&s, "dn1").state, NORMAL, "{:?}", group(&s, "dn1"));
        assert_eq!(group(&s, "dn2").state, NORMAL);
        let p = member(&s, "dn1_h1");
        assert_eq!((p.role.as_str(), p.lsn.as_str()), ("primary", "0/3000148"));
        let sb = member(&s, "dn1_h2");
        assert_eq!(sb.role, "standby");
        assert_eq!(sb.lsn, "0/3000100");
        assert_eq!(sb.lag_bytes, 0x48);
        assert_eq!(sb.sync_state, "sync");
        assert_eq!(member(&s, "dn1_h3").role, "secondary");
        assert_eq!(member(&s, "cms1").role, "primary");
        assert_eq!(member(&s, "cms2").role, "standby");
        assert_eq!(member(&s, "cn1").role, "active");
    }

    #[test]
    fn silence_is_unknown_never_normal() {
        let w = healthy();
        let s = w.status_at(w.t0 + Duration::from_secs(4));
        for n in ["dn1_h1", "dn1_h2", "gtm1"] {
            assert_eq!(member(&s, n).state, UNKNOWN, "{n}");
            assert!(member(&s, n).report_age_s >= 4.0);
        }
        assert_eq!(member(&s, "cms2").state, DOWN);
        assert_eq!(group(&s, "dn1").state, DEGRADED);
        let empty = World {
            reports: Reports::new(),
            ..healthy()
        };
        let s = empty.status();
        assert_eq!(member(&s, "dn1_h1").state, UNKNOWN);
        assert_eq!(member(&s, "dn1_h1").report_age_s, -1.0);
    }

    #[test]
    fn an_old_observation_is_unknown_even_if_the_agent_reports() {
        let mut w = healthy();
        let now = w.t0 + Duration::from_secs(5);
        let mut stale = dn("dn1_h2", MemberRole::Standby, 0x3000100);
        stale.observed_ms_ago = 4000;
        w.report_at("h2", vec![stale], now);
        let s = w.status_at(now);
        let m = member(&s, "dn1_h2");
        assert_eq!(m.state, UNKNOWN, "{m:?}");
        assert!((m.report_age_s - 4.0).abs() < 0.01, "{m:?}");
        assert!(m.detail.contains("last observed 4.0 s ago"), "{}", m.detail);
        let silent = member(&s, "dn1_h1");
        assert!(
            silent.detail.contains("silent for 5.0 s"),
            "{}",
            silent.detail
        );
    }

    #[test]
    fn a_dead_process_is_down_and_the_group_degraded() {
        let mut w = healthy();
        let mut dead = dn("dn1_h2", MemberRole::Standby, 0);
        dead.process_alive = false;
        dead.responding = false;
        dead.last_error = "postmaster exited".into();
        w.report("h2", vec![dead]);
        let s = w.status();
        assert_eq!(member(&s, "dn1_h2").state, DOWN);
        assert_eq!(member(&s, "dn1_h2").detail, "postmaster exited");
        let g = group(&s, "dn1");
        assert_eq!(g.state, DEGRADED);
        assert!(g.detail.contains("dn1_h2 is down"), "{}", g.detail);
    }

    #[test]
    fn a_standby_that_does_not_stream_is_not_normal() {
        let mut w = healthy();
        let mut p = dn("dn1_h1", MemberRole::Primary, 0x3000148);
        p.replicas = vec![];
        w.report("h1", vec![p]);
        assert_eq!(member(&w.status(), "dn1_h2").state, DEGRADED);
        let mut p = dn("dn1_h1", MemberRole::Primary, 0x3000148);
        let mut row = streaming("dn1_h2", "async", 0x3000000);
        row.state = "catchup".into();
        p.replicas = vec![row];
        w.report("h1", vec![p]);
        let s = w.status();
        assert_eq!(member(&s, "dn1_h2").state, CATCHING_UP);
        assert_eq!(member(&s, "dn1_h2").lag_bytes, 0x148);
    }

    #[test]
    fn an_async_standby_leaves_the_group_degraded() {
        let mut w = healthy();
        let mut p = dn("dn1_h1", MemberRole::Primary, 0x3000148);
        p.replicas = vec![streaming("dn1_h2", "async", 0x3000148)];
        w.report("h1", vec![p]);
        let s = w.status();
        assert_eq!(member(&s, "dn1_h2").state, NORMAL);
        let g = group(&s, "dn1");
        assert_eq!(g.state, DEGRADED);
        assert!(g.detail.contains("not synchronous"), "{}", g.detail);
    }

    #[test]
    fn wrong_role_is_degraded_and_not_responding_is_starting() {
        let mut w = healthy();
        w.report("h2", vec![gtm("gtm2", MemberRole::Primary)]);
        let mut starting = dn("dn2_h3", MemberRole::Standby, 0);
        starting.responding = false;
        w.report("h3", vec![starting]);
        let s = w.status();
        assert_eq!(member(&s, "gtm2").state, DEGRADED);
        assert!(member(&s, "gtm2").detail.contains("primary"));
        assert_eq!(member(&s, "dn2_h3").state, STARTING);
        let mut initialising = dn("dn2_h3", MemberRole::Standby, 0);
        initialising.process_alive = false;
        initialising.responding = false;
        initialising.detail = "initialising".into();
        w.report("h3", vec![initialising]);
        let s = w.status();
        assert_eq!(member(&s, "dn2_h3").state, STARTING);
        assert_eq!(member(&s, "dn2_h3").detail, "initialising");
    }

    #[test]
    fn operator_stop_is_stopped_not_down() {
        let mut w = healthy();
        w.state.set_run(Some("dn1_h2"), false).unwrap();
        assert_eq!(member(&w.status(), "dn1_h2").state, STOPPING);
        let mut held = dn("dn1_h2", MemberRole::Standby, 0);
        held.process_alive = false;
        held.responding = false;
        held.held_stopped = true;
        w.report("h2", vec![held]);
        let s = w.status();
        assert_eq!(member(&s, "dn1_h2").state, STOPPED);
        assert_eq!(group(&s, "dn1").state, DEGRADED);
    }
}
