//! The GTM primary's lease as the primary CMServer grants it (invariant 3 under
//! partitions). Each reply to the GTM primary's host carries how long that GTM may hand
//! out GXIDs: until its last healthy observation + `gtm_failover_timeout` − a margin,
//! which is the earliest moment the arbiter could promote its standby (its failover
//! timer runs from that same observation, `arbiter::Memory::healthy_at`). The agent
//! passes it on with the time it sent the report (the GTM's clock), so the GTM stops
//! before its standby can be promoted, whether or not it can reach anybody. A new
//! tenure waits `gtm_failover_timeout` before it promotes a GTM (`arbiter::gtm_pair`),
//! which outlasts every lease an earlier primary CMServer granted; an operator's
//! failover that could not demote the old primary waits for the lease it granted
//! (`operations::promote_gtm`).

use std::time::{Duration, Instant};

use ha_common::config::ClusterConfig;
use ha_common::proto::cm::GtmLeaseGrant;

use crate::state::{AssignedRole, ClusterState};

/// The lease for the GTM primary on `host`, if there is one there and time is left:
/// `healthy_at` is the arbiter's last healthy observation of it.
pub fn grant(
    cfg: &ClusterConfig,
    state: &ClusterState,
    host: &str,
    healthy_at: impl Fn(&str) -> Option<Instant>,
    now: Instant,
) -> Option<(GtmLeaseGrant, Instant)> {
    let p = cfg
        .gtm
        .instances
        .iter()
        .find(|g| g.host == host && state.role_of(&g.name) == Some(AssignedRole::Primary))?;
    if !state.should_run(&p.name) {
        return None;
    }
    let timeout = cfg.timing.gtm_failover_timeout();
    let end = healthy_at(&p.name)? + timeout - cfg.timing.gtm_lease_margin();
    let valid_for = end.checked_duration_since(now)?;
    (valid_for >= Duration::from_millis(1)).then(|| {
        (
            GtmLeaseGrant {
                instance: p.name.clone(),
                valid_for_ms: valid_for.as_millis() as u64,
            },
            end,
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The cluster of local.toml, started (instances start out stopped: a stopped
    /// GTM gets no lease).
    fn running(cfg: &ClusterConfig) -> ClusterState {
        let mut state = ClusterState::initial(cfg);
        state.set_run(None, true).expect("start all");
        state
    }

    fn cfg() -> ClusterConfig {
        ClusterConfig::parse(
            include_str!("../../configs/local.toml"),
            std::path::Path::new("local.toml"),
        )
        .expect("local.toml parses")
    }

    #[test]
    fn the_lease_ends_a_margin_before_the_earliest_promotion() {
        let cfg = cfg();
        let state = running(&cfg);
        let t0 = Instant::now();
        let now = t0 + Duration::from_millis(800);
        let (g, end) = grant(&cfg, &state, "h1", |_| Some(t0), now).expect("a lease");
        assert_eq!(g.instance, "gtm1");
        // timeout 3000 ms, margin 300 ms, observed 800 ms ago.
        assert_eq!(g.valid_for_ms, 1900);
        assert_eq!(end, t0 + Duration::from_millis(2700));
        assert!(end < t0 + cfg.timing.gtm_failover_timeout());
    }

    #[test]
    fn no_lease_without_a_recent_healthy_observation() {
        let cfg = cfg();
        let state = running(&cfg);
        let t0 = Instant::now();
        assert!(grant(&cfg, &state, "h1", |_| None, t0).is_none());
        let late = t0 + Duration::from_millis(2700);
        assert!(grant(&cfg, &state, "h1", |_| Some(t0), late).is_none());
    }

    #[test]
    fn a_stopped_gtm_gets_none() {
        let cfg = cfg();
        let state = ClusterState::initial(&cfg);
        let t0 = Instant::now();
        assert!(grant(&cfg, &state, "h1", |_| Some(t0), t0).is_none());
    }

    #[test]
    fn only_the_assigned_primarys_host_gets_one() {
        let cfg = cfg();
        let mut state = running(&cfg);
        let t0 = Instant::now();
        assert!(
            grant(&cfg, &state, "h2", |_| Some(t0), t0).is_none(),
            "gtm2 is standby"
        );
        state.set_role("gtm1", AssignedRole::Standby).unwrap();
        state.set_role("gtm2", AssignedRole::Primary).unwrap();
        assert!(grant(&cfg, &state, "h1", |_| Some(t0), t0).is_none());
        assert_eq!(
            grant(&cfg, &state, "h2", |_| Some(t0), t0)
                .unwrap()
                .0
                .instance,
            "gtm2"
        );
    }
}
