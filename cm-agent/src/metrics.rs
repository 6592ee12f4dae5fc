//! The cm_agent's Prometheus metrics: its report cycles (heartbeats) and their age, and what it observes of each instance it runs (alive, responding, role, LSNs).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use ha_common::metrics::prometheus_client::metrics::gauge::Gauge;
use ha_common::metrics::prometheus_client::registry::Registry;
use ha_common::metrics::{labels, CounterFamily, GaugeFamily, InstanceMetrics};
use ha_common::proto::cm::MemberRole;

use crate::report::InstanceHandle;

#[derive(Clone)]
pub struct AgentMetrics {
    started: Instant,
    /// Milliseconds since `started` of the last report a CMServer accepted (0: none).
    last_accepted_ms: Arc<AtomicU64>,
    reports: CounterFamily,
    last_report_age: Gauge<f64, AtomicU64>,
    alive: GaugeFamily,
    responding: GaugeFamily,
    lsn: GaugeFamily,
    own: InstanceMetrics,
}

impl AgentMetrics {
    pub fn register(reg: &mut Registry) -> AgentMetrics {
        let m = AgentMetrics {
            started: Instant::now(),
            last_accepted_ms: Arc::default(),
            reports: CounterFamily::default(),
            last_report_age: Gauge::default(),
            alive: GaugeFamily::default(),
            responding: GaugeFamily::default(),
            lsn: GaugeFamily::default(),
            own: InstanceMetrics::register(reg),
        };
        reg.register(
            "agent_reports",
            "Heartbeat reports sent, by outcome (accepted by a CMServer or not)",
            m.reports.clone(),
        );
        reg.register(
            "agent_last_report_age_seconds",
            "Seconds since a CMServer last accepted this agent's report (-1: never)",
            m.last_report_age.clone(),
        );
        reg.register(
            "agent_instance_alive",
            "1 while an instance's process runs",
            m.alive.clone(),
        );
        reg.register(
            "agent_instance_responding",
            "1 while an instance answers probes",
            m.responding.clone(),
        );
        reg.register(
            "agent_instance_lsn",
            "An instance's WAL position: current (primary) or flush (standby)",
            m.lsn.clone(),
        );
        m
    }

    /// One report cycle ended.
    pub fn reported(&self, accepted: bool) {
        let outcome = if accepted { "accepted" } else { "not_accepted" };
        self.reports
            .get_or_create(&labels(&[("outcome", outcome)]))
            .inc();
        if accepted {
            let ms = self.started.elapsed().as_millis() as u64;
            self.last_accepted_ms.store(ms.max(1), Ordering::Relaxed);
        }
    }

    /// Before a scrape: the instances as the supervisors last observed them.
    pub fn refresh(
        &self,
        handles: &[(
            String,
            tokio::sync::watch::Receiver<crate::supervisor::Observation>,
        )],
    ) {
        let last = self.last_accepted_ms.load(Ordering::Relaxed);
        let age = if last == 0 {
            -1.0
        } else {
            (self.started.elapsed().as_millis() as u64).saturating_sub(last) as f64 / 1000.0
        };
        self.last_report_age.set(age);
        for (name, rx) in handles {
            let r = rx.borrow().report.clone();
            let l = labels(&[("node", name)]);
            self.alive.get_or_create(&l).set(i64::from(r.process_alive));
            self.responding
                .get_or_create(&l)
                .set(i64::from(r.responding));
            let lsn = if r.current_lsn > 0 {
                r.current_lsn
            } else {
                r.flush_lsn
            };
            self.lsn.get_or_create(&l).set(lsn as i64);
            let role = match MemberRole::try_from(r.role) {
                Ok(MemberRole::Primary) => "primary",
                Ok(MemberRole::Standby) => "standby",
                Ok(MemberRole::Secondary) => "secondary",
                _ => "unknown",
            };
            self.own.set_role(name, role);
            self.own.set_term(name, r.term);
        }
    }
}

/// The handles' names and observation receivers (what a scrape reads).
pub fn observed(
    handles: &[InstanceHandle],
) -> Vec<(
    String,
    tokio::sync::watch::Receiver<crate::supervisor::Observation>,
)> {
    handles
        .iter()
        .map(|h| (h.name.clone(), h.report.clone()))
        .collect()
}
