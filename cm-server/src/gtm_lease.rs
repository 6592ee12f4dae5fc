//! The GTM primary's lease as the primary CMServer grants it (invariant 3 under
//! partitions). The GTM asks for it itself (RenewGtmLease, `gtm/src/renew.rs`) several
//! times per lease; each answer says how long that GTM may hand out GXIDs: until its
//! last healthy observation + `gtm_failover_timeout` − a margin, which is the earliest
//! moment the arbiter could promote its standby (its failover timer runs from that
//! same observation, `arbiter::Memory::healthy_at`). The GTM counts it from when it
//! sent the request (its own clock), so it stops before its standby can be promoted,
//! whether or not it can reach anybody. The observation is the agent's healthy report
//! or, while the agent is silent, the CMServer's own probe (`outside.rs`), so an agent
//! restart does not end the lease; the arbiter never promotes a GTM standby while a
//! lease granted to its primary in this tenure runs (`arbiter::gtm_pair`). A new
//! tenure waits `gtm_failover_timeout` before it promotes a GTM, which outlasts every
//! lease an earlier primary CMServer granted; an operator's failover that could not
//! demote the old primary waits for the lease it granted (`operations::promote_gtm`).
//! Both waits only with `gtm.require_lease` (without it no GTM asks for a lease).

use std::time::{Duration, Instant};

use ha_common::config::ClusterConfig;

use crate::state::{AssignedRole, ClusterState};

/// The lease for GTM `instance`: how long from `now`, and when it ends. `healthy_at`
/// is the latest healthy observation of it (the arbiter's, or the CMServer's own
/// probe). Err: why there is none (said to the GTM).
pub fn grant(
    cfg: &ClusterConfig,
    state: &ClusterState,
    instance: &str,
    healthy_at: impl Fn(&str) -> Option<Instant>,
    now: Instant,
) -> Result<(Duration, Instant), String> {
    if !cfg.gtm.instances.iter().any(|g| g.name == instance) {
        return Err(format!("{instance} is not a GTM of this cluster"));
    }
    if state.role_of(instance) != Some(AssignedRole::Primary) {
        return Err(format!("{instance} is not the assigned GTM primary"));
    }
    if !state.should_run(instance) {
        return Err(format!("{instance} is held stopped by the operator"));
    }
    let timeout = cfg.timing.gtm_failover_timeout();
    let Some(h) = healthy_at(instance) else {
        return Err(format!("no healthy observation of {instance} yet"));
    };
    let end = h + timeout - cfg.timing.gtm_lease_margin();
    match end.checked_duration_since(now) {
        Some(left) if left >= Duration::from_millis(1) => Ok((left, end)),
        _ => Err(format!(
            "{instance} last seen healthy {} ms ago",
            now.saturating_duration_since(h).as_millis()
        )),
    }
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
        let (left, end) = grant(&cfg, &state, "gtm1", |_| Some(t0), now).expect("a lease");
        // timeout 3000 ms, margin 300 ms, observed 800 ms ago.
        assert_eq!(left, Duration::from_millis(1900));
        assert_eq!(end, t0 + Duration::from_millis(2700));
        assert!(end < t0 + cfg.timing.gtm_failover_timeout());
    }

    #[test]
    fn no_lease_without_a_recent_healthy_observation() {
        let cfg = cfg();
        let state = running(&cfg);
        let t0 = Instant::now();
        let none = grant(&cfg, &state, "gtm1", |_| None, t0).unwrap_err();
        assert!(none.contains("no healthy observation"), "{none}");
        let late = t0 + Duration::from_millis(2700);
        let old = grant(&cfg, &state, "gtm1", |_| Some(t0), late).unwrap_err();
        assert!(old.contains("last seen healthy 2700 ms ago"), "{old}");
    }

    #[test]
    fn a_stopped_gtm_gets_none() {
        let cfg = cfg();
        let state = ClusterState::initial(&cfg);
        let t0 = Instant::now();
        let e = grant(&cfg, &state, "gtm1", |_| Some(t0), t0).unwrap_err();
        assert!(e.contains("held stopped"), "{e}");
    }

    #[test]
    fn only_the_assigned_primary_gets_one() {
        let cfg = cfg();
        let mut state = running(&cfg);
        let t0 = Instant::now();
        let e = grant(&cfg, &state, "gtm2", |_| Some(t0), t0).unwrap_err();
        assert!(e.contains("not the assigned GTM primary"), "{e}");
        state.set_role("gtm1", AssignedRole::Standby).unwrap();
        state.set_role("gtm2", AssignedRole::Primary).unwrap();
        assert!(grant(&cfg, &state, "gtm1", |_| Some(t0), t0).is_err());
        assert!(grant(&cfg, &state, "gtm2", |_| Some(t0), t0).is_ok());
        let e = grant(&cfg, &state, "dn1_h1", |_| Some(t0), t0).unwrap_err();
        assert!(e.contains("not a GTM"), "{e}");
    }
}
