//! How often each agent reports: every heartbeat, or every [`FAST_REPORT_MS`] for the
//! hosts whose reports decide something soon.
//!
//! An order reaches an agent only in the reply to its next report, and an outcome
//! comes back only with the report after that. At the steady heartbeat a failover
//! order decided just after the standby's agent reported waits a whole heartbeat on
//! top of `dn_failover_timeout`. So the hosts of a group whose primary looks doubtful
//! (its agent late, or reported unhealthy), of a group or pair under an operation,
//! and of a group with an order in flight are asked to report fast — and only those:
//! asking every agent (what the CMServer did before) turned one failover at 1,000
//! hosts into 10,000 reports a second for half a minute, and the reports that carry
//! the decision queued behind them.

use std::collections::{BTreeSet, HashSet};
use std::time::{Duration, Instant};

use ha_common::proto::cm::MemberRole;
use ha_common::ClusterConfig;

use crate::arbiter::GTM_PAIR;
use crate::reports::Reports;
use crate::state::{AssignedRole, ClusterState};

/// The interval agents are asked to report at while their reports are awaited (ms).
pub const FAST_REPORT_MS: u32 = 100;

/// An agent this much later than its heartbeat is "late": its groups are watched
/// before the failover timer can run out (at the default 1 s heartbeat and 3 s
/// timeouts this leaves 1.5 s for the group's other agents to switch to fast reports,
/// which takes at most one of their heartbeats).
const LATE_HEARTBEATS: f64 = 1.5;

/// What the cadence is decided from (one arbitration tick's view).
pub struct Input<'a> {
    pub cfg: &'a ClusterConfig,
    pub state: &'a ClusterState,
    pub reports: &'a Reports,
    /// DN groups and `GTM_PAIR` with an operation running.
    pub busy: &'a BTreeSet<String>,
    /// Instances with an order in flight.
    pub ordered: &'a BTreeSet<String>,
    pub now: Instant,
}

/// The hosts to ask for fast reports: every member's host of each watched DN group
/// and of the GTM pair when it is watched.
pub fn hurried_hosts(input: &Input<'_>) -> HashSet<String> {
    let late_after = input
        .cfg
        .timing
        .heartbeat_interval()
        .mul_f64(LATE_HEARTBEATS);
    let mut hosts = HashSet::new();
    let groups = input
        .cfg
        .dn_groups
        .iter()
        .map(|g| (g.name.as_str(), &g.members[..]))
        .chain(std::iter::once((GTM_PAIR, &input.cfg.gtm.instances[..])));
    for (name, members) in groups {
        let watched = input.busy.contains(name)
            || members.iter().any(|m| input.ordered.contains(&m.name))
            || members
                .iter()
                .filter(|m| input.state.role_of(&m.name) == Some(AssignedRole::Primary))
                .any(|p| doubtful(input, &p.name, &p.host, late_after));
        if watched {
            hosts.extend(members.iter().map(|m| m.host.clone()));
        }
    }
    hosts
}

/// Whether primary `name` on `host` may be failing: its agent is late, or its latest
/// report does not show it alive, answering and primary. A host never heard from (a
/// CMServer just started) is not doubtful: every agent would be hurried at once.
fn doubtful(input: &Input<'_>, name: &str, host: &str, late_after: Duration) -> bool {
    let Some(seen) = input.reports.host_seen(host) else {
        return false;
    };
    if input.now.saturating_duration_since(seen) > late_after {
        return true;
    }
    input.reports.latest(name).is_some_and(|o| {
        let r = &o.report;
        !(r.process_alive && r.responding && r.role == MemberRole::Primary as i32)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::tests::local_config;
    use ha_common::proto::cm::InstanceReport;

    fn healthy_primary(name: &str) -> InstanceReport {
        InstanceReport {
            name: name.into(),
            process_alive: true,
            responding: true,
            role: MemberRole::Primary as i32,
            ..Default::default()
        }
    }

    fn report(reports: &mut Reports, cfg: &ClusterConfig, host: &str, at: Instant) {
        let instances = cfg
            .instances_on_host(host)
            .into_iter()
            .map(|r| healthy_primary(&r.instance.name))
            .collect();
        reports.record_host(cfg, host, instances, at);
    }

    fn hurried(
        cfg: &ClusterConfig,
        reports: &Reports,
        busy: &[&str],
        ordered: &[&str],
        now: Instant,
    ) -> Vec<String> {
        let state = ClusterState::initial(cfg);
        let busy = busy.iter().map(|s| s.to_string()).collect();
        let ordered = ordered.iter().map(|s| s.to_string()).collect();
        let mut v: Vec<String> = hurried_hosts(&Input {
            cfg,
            state: &state,
            reports,
            busy: &busy,
            ordered: &ordered,
            now,
        })
        .into_iter()
        .collect();
        v.sort();
        v
    }

    fn hosts_of(cfg: &ClusterConfig, names: &[&str]) -> Vec<String> {
        let mut v: Vec<String> = names
            .iter()
            .flat_map(|n| {
                cfg.dn_groups
                    .iter()
                    .filter(move |g| g.name == *n)
                    .flat_map(|g| g.members.iter().map(|m| m.host.clone()))
            })
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        v.sort();
        v
    }

    #[test]
    fn quiet_cluster_hurries_nobody() {
        let cfg = local_config();
        let t0 = Instant::now();
        let mut r = Reports::new();
        assert!(
            hurried(&cfg, &r, &[], &[], t0).is_empty(),
            "never heard from"
        );
        for h in &cfg.hosts {
            report(&mut r, &cfg, &h.name, t0);
        }
        let soon = t0 + Duration::from_millis(1400);
        assert!(hurried(&cfg, &r, &[], &[], soon).is_empty());
    }

    #[test]
    fn a_late_agent_hurries_its_primaries_groups_only() {
        let cfg = local_config();
        let t0 = Instant::now();
        let mut r = Reports::new();
        for h in &cfg.hosts {
            report(&mut r, &cfg, &h.name, t0);
        }
        // Everybody but h1 reports again; h1 is 1.6 heartbeats late.
        let later = t0 + Duration::from_millis(1600);
        for h in cfg.hosts.iter().filter(|h| h.name != "h1") {
            report(&mut r, &cfg, &h.name, later);
        }
        let state = ClusterState::initial(&cfg);
        let mut expect: BTreeSet<String> = BTreeSet::new();
        for g in &cfg.dn_groups {
            let p = g
                .members
                .iter()
                .find(|m| state.role_of(&m.name) == Some(AssignedRole::Primary));
            if p.is_some_and(|p| p.host == "h1") {
                expect.extend(g.members.iter().map(|m| m.host.clone()));
            }
        }
        if cfg
            .gtm
            .instances
            .iter()
            .any(|m| m.host == "h1" && state.role_of(&m.name) == Some(AssignedRole::Primary))
        {
            expect.extend(cfg.gtm.instances.iter().map(|m| m.host.clone()));
        }
        assert!(!expect.is_empty(), "local config has a primary on h1");
        let got: BTreeSet<String> = hurried(&cfg, &r, &[], &[], later).into_iter().collect();
        assert_eq!(got, expect);
    }

    #[test]
    fn an_unhealthy_primary_hurries_its_group() {
        let cfg = local_config();
        let t0 = Instant::now();
        let mut r = Reports::new();
        let g = &cfg.dn_groups[0];
        let state = ClusterState::initial(&cfg);
        let p = g
            .members
            .iter()
            .find(|m| state.role_of(&m.name) == Some(AssignedRole::Primary))
            .unwrap();
        let mut dead = healthy_primary(&p.name);
        dead.process_alive = false;
        r.record_host(&cfg, &p.host, vec![dead], t0);
        assert_eq!(hurried(&cfg, &r, &[], &[], t0), hosts_of(&cfg, &[&g.name]));
    }

    #[test]
    fn an_operation_or_an_order_hurries_its_group() {
        let cfg = local_config();
        let t0 = Instant::now();
        let r = Reports::new();
        let g = &cfg.dn_groups[0];
        assert_eq!(
            hurried(&cfg, &r, &[&g.name], &[], t0),
            hosts_of(&cfg, &[&g.name])
        );
        let member = g.members[1].name.as_str();
        assert_eq!(
            hurried(&cfg, &r, &[], &[member], t0),
            hosts_of(&cfg, &[&g.name])
        );
        let gtm_hosts: BTreeSet<String> =
            cfg.gtm.instances.iter().map(|m| m.host.clone()).collect();
        let got: BTreeSet<String> = hurried(&cfg, &r, &[GTM_PAIR], &[], t0)
            .into_iter()
            .collect();
        assert_eq!(got, gtm_hosts);
    }
}
