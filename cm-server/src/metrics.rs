//! The CMServer's Prometheus metrics and HTTP endpoints: its own role and term, the cluster as the primary sees it (role, state, report age, lag per instance; agent heartbeats), failovers and switchovers; `GET /primary` and `GET /cluster`.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use ha_common::metrics::prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use ha_common::metrics::prometheus_client::registry::Registry;
use ha_common::metrics::{labels, CounterFamily, FloatGaugeFamily, GaugeFamily, InstanceMetrics};
use ha_common::proto::cm::ClusterStatus;

/// Cheap to clone: every field is shared.
#[derive(Clone)]
pub struct CmsMetrics {
    pub own: InstanceMetrics,
    cluster_role: GaugeFamily,
    cluster_state: GaugeFamily,
    report_age: FloatGaugeFamily,
    lag: GaugeFamily,
    agent_age: FloatGaugeFamily,
    agent_heartbeats: CounterFamily,
    failovers: CounterFamily,
    last_failover: GaugeFamily,
    switchovers: CounterFamily,
    switchover_seconds: Histogram,
    operator_failover_seconds: Histogram,
    /// Group (or "gtm") -> its primary when last looked: a change that no switchover
    /// explains is a failover.
    primaries: Arc<Mutex<BTreeMap<String, String>>>,
    /// Groups with an operator switchover or failover in flight.
    operating: Arc<Mutex<BTreeSet<String>>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl CmsMetrics {
    pub fn register(registry: &mut Registry) -> CmsMetrics {
        let m = CmsMetrics {
            own: InstanceMetrics::register(registry),
            cluster_role: GaugeFamily::default(),
            cluster_state: GaugeFamily::default(),
            report_age: FloatGaugeFamily::default(),
            lag: GaugeFamily::default(),
            agent_age: FloatGaugeFamily::default(),
            agent_heartbeats: CounterFamily::default(),
            failovers: CounterFamily::default(),
            last_failover: GaugeFamily::default(),
            switchovers: CounterFamily::default(),
            switchover_seconds: Histogram::new(exponential_buckets(0.25, 2.0, 10)),
            operator_failover_seconds: Histogram::new(exponential_buckets(0.25, 2.0, 10)),
            primaries: Arc::default(),
            operating: Arc::default(),
        };
        let r = registry;
        r.register(
            "cluster_instance_role",
            "The primary CMServer's view: 1 for each instance's role",
            m.cluster_role.clone(),
        );
        r.register(
            "cluster_instance_state",
            "The primary CMServer's view: 1 for each instance's state",
            m.cluster_state.clone(),
        );
        r.register(
            "instance_report_age_seconds",
            "Seconds since the last report about an instance (-1: never)",
            m.report_age.clone(),
        );
        r.register(
            "replication_lag_bytes",
            "Bytes a DN standby or secondary is behind its group's primary",
            m.lag.clone(),
        );
        r.register(
            "agent_heartbeat_age_seconds",
            "Seconds since a host's cm_agent last reported (-1: never)",
            m.agent_age.clone(),
        );
        r.register(
            "agent_heartbeats",
            "Reports received from each host's cm_agent",
            m.agent_heartbeats.clone(),
        );
        r.register(
            "failovers",
            "Primary changes of a DN group or the GTM pair that no operator switchover made",
            m.failovers.clone(),
        );
        r.register(
            "last_failover_timestamp_seconds",
            "Unix time of a group's last failover",
            m.last_failover.clone(),
        );
        r.register(
            "switchovers",
            "Operator switchovers by group and outcome",
            m.switchovers.clone(),
        );
        r.register(
            "switchover_duration_seconds",
            "How long operator switchovers took",
            m.switchover_seconds.clone(),
        );
        r.register(
            "operator_failover_duration_seconds",
            "How long operator failovers took",
            m.operator_failover_seconds.clone(),
        );
        m
    }

    /// One agent report arrived.
    pub fn heartbeat(&self, host: &str) {
        self.agent_heartbeats
            .get_or_create(&labels(&[("host", host)]))
            .inc();
    }

    /// An operator switchover/failover of `group` starts: a primary change of the
    /// group while it runs is its work, not a failover.
    pub fn operation_started(&self, group: &str) -> Instant {
        lock(&self.operating).insert(group.to_owned());
        Instant::now()
    }

    /// It ended (`ok`: it changed the primary as asked).
    pub fn operation_ended(&self, group: &str, switchover: bool, ok: bool, started: Instant) {
        lock(&self.operating).remove(group);
        let secs = started.elapsed().as_secs_f64();
        if switchover {
            let outcome = if ok { "done" } else { "refused_or_failed" };
            self.switchovers
                .get_or_create(&labels(&[("group", group), ("outcome", outcome)]))
                .inc();
            if ok {
                self.switchover_seconds.observe(secs);
            }
        } else if ok {
            self.operator_failover_seconds.observe(secs);
        }
    }

    /// This CMServer is a standby: the cluster view is the primary's to export.
    pub fn clear_cluster_view(&self) {
        self.clear_cluster_view_gauges();
        lock(&self.primaries).clear();
    }

    /// Sets the cluster view from a fresh status (the primary only) and counts
    /// primary changes since the last look as failovers.
    pub fn observe(&self, s: &ClusterStatus) {
        self.clear_cluster_view_gauges();
        let mut primaries = BTreeMap::new();
        let groups = std::iter::once(("cm_server", &s.cm_servers))
            .chain(std::iter::once(("gtm", &s.gtm)))
            .chain(std::iter::once(("cn", &s.cn)))
            .chain(s.dn_groups.iter().map(|g| (g.name.as_str(), &g.members)));
        for (group, rows) in groups {
            for r in rows.iter() {
                let l = |k: &str, v: &str| labels(&[("group", group), ("node", &r.name), (k, v)]);
                self.cluster_role.get_or_create(&l("role", &r.role)).set(1);
                self.cluster_state
                    .get_or_create(&l("state", &r.state))
                    .set(1);
                self.report_age
                    .get_or_create(&labels(&[("node", &r.name)]))
                    .set(r.report_age_s);
                if (r.role == "standby" || r.role == "secondary")
                    && group != "gtm"
                    && group != "cm_server"
                    && !r.lsn.is_empty()
                {
                    self.lag
                        .get_or_create(&labels(&[("group", group), ("node", &r.name)]))
                        .set(r.lag_bytes as i64);
                }
                if r.role == "primary" && group != "cm_server" && group != "cn" {
                    primaries.insert(group.to_owned(), r.name.clone());
                }
            }
        }
        for a in &s.agents {
            self.agent_age
                .get_or_create(&labels(&[("host", &a.host)]))
                .set(a.report_age_s);
        }
        let operating = lock(&self.operating).clone();
        let mut last = lock(&self.primaries);
        for (group, now) in &primaries {
            if let Some(before) = last.get(group) {
                if before != now && !operating.contains(group) {
                    self.failovers
                        .get_or_create(&labels(&[("group", group)]))
                        .inc();
                    let unix = SystemTime::now()
                        .duration_since(UNIX_EPOCH)
                        .map(|d| d.as_secs() as i64)
                        .unwrap_or(0);
                    self.last_failover
                        .get_or_create(&labels(&[("group", group)]))
                        .set(unix);
                }
            }
        }
        *last = primaries;
    }

    fn clear_cluster_view_gauges(&self) {
        self.cluster_role.clear();
        self.cluster_state.clear();
        self.report_age.clear();
        self.lag.clear();
        self.agent_age.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ha_common::metrics::{registry, sample, HttpServer};
    use ha_common::proto::cm::{DnGroupStatus, InstanceStatus};

    fn row(name: &str, role: &str) -> InstanceStatus {
        InstanceStatus {
            name: name.into(),
            role: role.into(),
            state: "normal".into(),
            lsn: "0/1".into(),
            lag_bytes: 7,
            ..Default::default()
        }
    }

    fn status(primary: &str, standby: &str) -> ClusterStatus {
        ClusterStatus {
            term: 2,
            dn_groups: vec![DnGroupStatus {
                name: "dn1".into(),
                members: vec![row(primary, "primary"), row(standby, "standby")],
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn a_primary_change_is_a_failover_unless_an_operation_made_it() {
        let mut reg = registry();
        let m = CmsMetrics::register(&mut reg);
        m.observe(&status("a", "b"));
        m.observe(&status("b", "a"));
        let started = m.operation_started("dn1");
        m.observe(&status("a", "b"));
        m.operation_ended("dn1", true, true, started);
        let text = HttpServer::new(reg).scrape().await;
        assert_eq!(
            sample(&text, "mpp_ha_failovers_total", &[("group", "dn1")]),
            Some(1.0),
            "{text}"
        );
        assert_eq!(
            sample(
                &text,
                "mpp_ha_switchovers_total",
                &[("group", "dn1"), ("outcome", "done")]
            ),
            Some(1.0)
        );
        assert_eq!(
            sample(&text, "mpp_ha_replication_lag_bytes", &[("node", "b")]),
            Some(7.0)
        );
        assert_eq!(
            sample(
                &text,
                "mpp_ha_cluster_instance_role",
                &[("node", "a"), ("role", "primary")]
            ),
            Some(1.0)
        );
        assert_eq!(
            sample(
                &text,
                "mpp_ha_cluster_instance_role",
                &[("node", "a"), ("role", "standby")]
            ),
            None
        );
    }
}
