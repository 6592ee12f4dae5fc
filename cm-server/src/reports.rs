//! The latest report about every instance, with when its facts were observed: what
//! the agents last told us, kept in memory only (a restarted CMServer knows again
//! within one heartbeat).
//!
//! An agent re-sends its latest observation of an instance every heartbeat, also
//! while the next probe hangs (up to the probe timeout), and says how old it is
//! (`observed_ms_ago`). Health, failover timers and an instance's freshness are timed
//! from that observation time (arrival minus age), so a stale "healthy" never looks
//! fresh. Whether the agent itself is alive is timed from arrival (`host_seen`,
//! `Observed::received`).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use ha_common::proto::cm::{AgentReport, InstanceReport};
use ha_common::ClusterConfig;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ReportError {
    #[error("report from unknown host {0:?}")]
    UnknownHost(String),
}

/// A reported age above this is treated as this (a bogus value must not reach
/// before the monotonic clock's origin; any such observation is long stale anyway).
pub const MAX_OBSERVATION_AGE: Duration = Duration::from_secs(3600);

/// One instance's latest report.
#[derive(Debug, Clone)]
pub struct Observed {
    pub host: String,
    /// When the agent observed these facts: arrival minus the reported age.
    pub at: Instant,
    /// When the report arrived.
    pub received: Instant,
    pub report: InstanceReport,
}

/// When a report that arrived at `received` was observed.
fn observed_at(received: Instant, observed_ms_ago: u64) -> Instant {
    let age = Duration::from_millis(observed_ms_ago).min(MAX_OBSERVATION_AGE);
    received.checked_sub(age).unwrap_or(received)
}

/// Latest report per instance and latest heartbeat per host.
#[derive(Debug, Default, Clone)]
pub struct Reports {
    instances: HashMap<String, Observed>,
    hosts: HashMap<String, Instant>,
}

impl Reports {
    pub fn new() -> Reports {
        Reports::default()
    }

    /// Records an agent's heartbeat received at `now`. Instances that are not
    /// configured on the reporting host are ignored and returned (for a warning).
    pub fn record(
        &mut self,
        cfg: &ClusterConfig,
        report: AgentReport,
        now: Instant,
    ) -> Result<Vec<String>, ReportError> {
        if cfg.host(&report.host).is_none() {
            return Err(ReportError::UnknownHost(report.host));
        }
        let mut ignored = Vec::new();
        for inst in report.instances {
            let belongs = cfg
                .find(&inst.name)
                .is_some_and(|r| r.instance.host == report.host);
            if !belongs {
                ignored.push(inst.name);
                continue;
            }
            self.instances.insert(
                inst.name.clone(),
                Observed {
                    host: report.host.clone(),
                    at: observed_at(now, inst.observed_ms_ago),
                    received: now,
                    report: inst,
                },
            );
        }
        self.hosts.insert(report.host, now);
        Ok(ignored)
    }

    /// The latest report about `name`, however old.
    pub fn latest(&self, name: &str) -> Option<&Observed> {
        self.instances.get(name)
    }

    /// The latest report about `name` if its observation is younger than `timeout`
    /// at `now`.
    pub fn fresh(&self, name: &str, now: Instant, timeout: Duration) -> Option<&InstanceReport> {
        self.instances
            .get(name)
            .filter(|o| now.saturating_duration_since(o.at) <= timeout)
            .map(|o| &o.report)
    }

    /// When the agent of `host` last reported.
    pub fn host_seen(&self, host: &str) -> Option<Instant> {
        self.hosts.get(host).copied()
    }

    /// Tests: records a report of `instances` from `host`'s agent at `at`; returns the
    /// instances ignored as not configured there.
    #[cfg(test)]
    pub fn record_host(
        &mut self,
        cfg: &ClusterConfig,
        host: &str,
        instances: Vec<InstanceReport>,
        at: Instant,
    ) -> Vec<String> {
        self.record(
            cfg,
            AgentReport {
                host: host.into(),
                instances,
                ..Default::default()
            },
            at,
        )
        .expect("a configured host")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::tests::local_config;

    fn inst(name: &str) -> InstanceReport {
        InstanceReport {
            name: name.into(),
            process_alive: true,
            ..Default::default()
        }
    }

    #[test]
    fn keeps_the_latest_report_and_ignores_foreign_instances() {
        let cfg = local_config();
        let mut r = Reports::new();
        let t0 = Instant::now();
        let ignored = r
            .record(
                &cfg,
                AgentReport {
                    host: "h1".into(),
                    instances: vec![inst("dn1_h1"), inst("dn1_h2")],
                    ..Default::default()
                },
                t0,
            )
            .unwrap();
        assert_eq!(ignored, vec!["dn1_h2"], "dn1_h2 lives on h2");
        assert!(r.latest("dn1_h2").is_none());
        assert!(r.fresh("dn1_h1", t0, Duration::from_secs(3)).is_some());
        let later = t0 + Duration::from_secs(4);
        assert!(r.fresh("dn1_h1", later, Duration::from_secs(3)).is_none());
        assert!(r.latest("dn1_h1").is_some());
        assert_eq!(r.host_seen("h1"), Some(t0));
    }

    #[test]
    fn a_report_is_recorded_with_its_observation_time() {
        let cfg = local_config();
        let mut r = Reports::new();
        let t0 = Instant::now() + Duration::from_secs(7200);
        let mut old = inst("dn1_h1");
        old.observed_ms_ago = 2500;
        let mut bogus = inst("gtm1");
        bogus.observed_ms_ago = u64::MAX;
        let report = AgentReport {
            host: "h1".into(),
            instances: vec![old, bogus],
            ..Default::default()
        };
        assert!(r.record(&cfg, report, t0).unwrap().is_empty());
        let o = r.latest("dn1_h1").unwrap();
        assert_eq!(o.at, t0 - Duration::from_millis(2500));
        assert_eq!(o.received, t0);
        // The agent is alive even though its observation is old.
        assert_eq!(r.host_seen("h1"), Some(t0));
        let timeout = Duration::from_secs(3);
        assert!(r.fresh("dn1_h1", t0, timeout).is_some());
        let later = t0 + Duration::from_millis(600);
        assert!(r.fresh("dn1_h1", later, timeout).is_none(), "3.1 s old");
        // A bogus age is capped, not an underflow.
        assert_eq!(r.latest("gtm1").unwrap().at, t0 - MAX_OBSERVATION_AGE);
        assert!(r.fresh("gtm1", t0, timeout).is_none());
    }

    #[test]
    fn unknown_host_is_rejected() {
        let cfg = local_config();
        let e = Reports::new()
            .record(
                &cfg,
                AgentReport {
                    host: "h9".into(),
                    ..Default::default()
                },
                Instant::now(),
            )
            .unwrap_err();
        assert_eq!(e, ReportError::UnknownHost("h9".into()));
    }
}
