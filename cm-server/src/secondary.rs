//! The arbiter's rules for a DN group's secondary (dn_replicator), as pure functions
//! called from [`crate::arbiter::decide`]; they change only the group's
//! [`SecondaryPlan`] in the next state (agents get it as the secondary's assignment).
//!
//! - While the primary is healthy: the secondary streams from it whenever the standby
//!   is not its synchronous standby (lost, stopped, catching up), starting no later
//!   than the standby's last known flush LSN, so commits go on with two copies; once
//!   the standby is back in sync it goes idle and deletes what it kept.
//! - Before a standby is promoted: if the secondary streams (or may still stream) from
//!   the old primary it is fenced first (HOLD: cut from every upstream, WAL kept), and
//!   the promotion waits until its report confirms the cut — otherwise an old primary
//!   cut off from its standby but not from the secondary could get commits
//!   acknowledged that the new primary lacks. A holding secondary's WAL counts: the
//!   standby may be promoted once it has replayed up to the secondary's flush LSN (it
//!   fetches what it lacks from the secondary through its `restore_command`), even if
//!   the secondary, not the standby, was the last synchronous partner.
//! - After a promotion: the secondary streams from the new primary (its synchronous
//!   partner until the old primary rejoins and is in sync), keeping its WAL when it
//!   agrees with the new timeline.

use ha_common::config::{DnGroup, Instance, Role};
use ha_common::lsn::format_lsn;
use ha_common::proto::cm::{InstanceReport, MemberRole, SecondaryFacts};

use crate::state::{ClusterState, SecondaryPlan};

/// The group's secondary member, if it has one.
pub fn secondary_of(g: &DnGroup) -> Option<&Instance> {
    g.members.iter().find(|m| m.role() == Some(Role::Secondary))
}

fn plan<'a>(state: &'a ClusterState, g: &DnGroup) -> &'a SecondaryPlan {
    state.secondary.get(&g.name).unwrap_or(&SecondaryPlan::Idle)
}

fn set(next: &mut ClusterState, g: &DnGroup, p: SecondaryPlan) {
    if p == SecondaryPlan::Idle {
        next.secondary.remove(&g.name);
    } else {
        next.secondary.insert(g.name.clone(), p);
    }
}

/// Whether the primary's report shows `standby` as its synchronous, streaming standby.
pub fn standby_in_sync(primary: &InstanceReport, standby: &str) -> bool {
    primary
        .replicas
        .iter()
        .any(|r| r.application_name == standby && r.state == "streaming" && r.sync_state == "sync")
}

/// The standby's flush LSN as its primary's report shows it (0 if not shown).
pub fn standby_flush(primary: &InstanceReport, standby: &str) -> u64 {
    primary
        .replicas
        .iter()
        .find(|r| r.application_name == standby)
        .map_or(0, |r| r.flush_lsn)
}

/// Primary `p` is healthy (report `rep`): stream from it while `standby` is not in
/// sync, idle once it is. `last_standby_flush`: the standby's last flush LSN known
/// (0 = unknown). Returns a status note when the plan changes.
pub fn while_primary_healthy(
    next: &mut ClusterState,
    g: &DnGroup,
    p: &str,
    rep: &InstanceReport,
    standby: Option<&str>,
    last_standby_flush: u64,
) -> Option<String> {
    let sec = secondary_of(g)?;
    let in_sync = standby.is_some_and(|s| standby_in_sync(rep, s));
    let cur = plan(next, g).clone();
    if in_sync {
        if cur == SecondaryPlan::Idle {
            return None;
        }
        set(next, g, SecondaryPlan::Idle);
        return Some(format!(
            "standby {} is in sync again: secondary {} goes idle",
            standby.unwrap_or_default(),
            sec.name
        ));
    }
    if matches!(&cur, SecondaryPlan::Stream { upstream, .. } if upstream == p) {
        return None;
    }
    let start = match (last_standby_flush, rep.current_lsn) {
        (0, cur) => cur,
        (f, 0) => f,
        (f, cur) => f.min(cur),
    };
    set(
        next,
        g,
        SecondaryPlan::Stream {
            upstream: p.to_owned(),
            start_lsn: start,
        },
    );
    Some(format!(
        "standby {} not in sync: secondary {} streams from {p} from {}",
        standby.unwrap_or("(none)"),
        sec.name,
        format_lsn(start)
    ))
}

/// What the secondary rules say about promoting a standby.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Gate {
    /// The secondary cannot have acknowledged anything: the usual rule applies
    /// (promote only the last synchronous standby).
    Usual,
    /// Not yet: the reason.
    Wait(String),
    /// The secondary is fenced and the standby has replayed everything it kept: the
    /// standby holds every acknowledged commit.
    CaughtUp { secondary_flush: u64 },
}

fn facts(r: Option<&InstanceReport>) -> Option<&SecondaryFacts> {
    r.filter(|r| r.process_alive && r.responding && r.role == MemberRole::Secondary as i32)
        .and_then(|r| r.secondary.as_ref())
}

/// Primary `old` of group `g` is lost and `standby` would be promoted. `sec_latest`:
/// the secondary's latest report of any age; `sec_fresh`: a fresh one;
/// `standby_report`: the standby's fresh report.
pub fn before_promote(
    next: &mut ClusterState,
    g: &DnGroup,
    old: &str,
    standby: &str,
    sec_latest: Option<&InstanceReport>,
    sec_fresh: Option<&InstanceReport>,
    standby_report: Option<&InstanceReport>,
) -> Gate {
    let Some(sec) = secondary_of(g) else {
        return Gate::Usual;
    };
    match plan(next, g).clone() {
        SecondaryPlan::Idle => {
            // Idle as far as its last report goes: it acknowledged nothing since.
            let streams = sec_latest
                .and_then(|r| r.secondary.as_ref())
                .is_some_and(|f| f.state == "streaming");
            if !streams {
                return Gate::Usual;
            }
            set(next, g, SecondaryPlan::Hold);
            Gate::Wait(format!(
                "fencing the secondary {} (it still streamed) before promoting {standby}",
                sec.name
            ))
        }
        SecondaryPlan::Stream { .. } => {
            set(next, g, SecondaryPlan::Hold);
            Gate::Wait(format!(
                "fencing the secondary {} from {old} before promoting {standby}",
                sec.name
            ))
        }
        SecondaryPlan::Hold => {
            let Some(f) = facts(sec_fresh) else {
                return Gate::Wait(format!(
                    "cannot confirm that the secondary {} is cut from {old} (no fresh report)",
                    sec.name
                ));
            };
            if f.state == "streaming" || f.term < next.term.0 {
                return Gate::Wait(format!(
                    "waiting for the secondary {} to confirm it is cut from {old}",
                    sec.name
                ));
            }
            if f.state == "idle" || f.bytes_kept == 0 {
                return Gate::Usual;
            }
            let replayed = standby_report
                .filter(|r| r.process_alive && r.responding)
                .map_or(0, |r| r.replay_lsn.max(r.flush_lsn));
            if replayed < f.flush_lsn {
                return Gate::Wait(format!(
                    "standby {standby} catching up from the secondary {}: replayed {} of {}",
                    sec.name,
                    format_lsn(replayed),
                    format_lsn(f.flush_lsn)
                ));
            }
            Gate::CaughtUp {
                secondary_flush: f.flush_lsn,
            }
        }
    }
}

/// `standby` was just promoted (its report: `standby_report`): the secondary becomes
/// its synchronous partner until the old primary is back in sync.
pub fn after_promote(
    next: &mut ClusterState,
    g: &DnGroup,
    standby: &str,
    gate: &Gate,
    standby_report: Option<&InstanceReport>,
) {
    if secondary_of(g).is_none() {
        return;
    }
    let own = standby_report.map_or(0, |r| {
        [r.replay_lsn, r.flush_lsn, r.receive_lsn]
            .into_iter()
            .filter(|l| *l != 0)
            .min()
            .unwrap_or(0)
    });
    let start = match gate {
        // Keep what the secondary holds: it agrees with the new timeline up to the fork.
        Gate::CaughtUp { secondary_flush } => *secondary_flush,
        _ => own,
    };
    set(
        next,
        g,
        SecondaryPlan::Stream {
            upstream: standby.to_owned(),
            start_lsn: start,
        },
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::tests::local_config;
    use ha_common::proto::cm::ReplicaState;

    fn group() -> DnGroup {
        local_config()
            .dn_groups
            .iter()
            .find(|g| g.name == "dn1")
            .unwrap()
            .clone()
    }

    fn primary(replicas: Vec<ReplicaState>) -> InstanceReport {
        InstanceReport {
            name: "dn1_h1".into(),
            process_alive: true,
            responding: true,
            role: MemberRole::Primary as i32,
            current_lsn: 0x5000000,
            replicas,
            ..InstanceReport::default()
        }
    }

    fn row(app: &str, state: &str, sync: &str, flush: u64) -> ReplicaState {
        ReplicaState {
            application_name: app.into(),
            state: state.into(),
            sync_state: sync.into(),
            flush_lsn: flush,
            ..ReplicaState::default()
        }
    }

    fn sec(state: &str, term: u64, flush: u64, kept: u64) -> InstanceReport {
        InstanceReport {
            name: "dn1_h3".into(),
            process_alive: true,
            responding: true,
            role: MemberRole::Secondary as i32,
            secondary: Some(SecondaryFacts {
                state: state.into(),
                term,
                flush_lsn: flush,
                bytes_kept: kept,
                ..SecondaryFacts::default()
            }),
            ..InstanceReport::default()
        }
    }

    fn standby(replay: u64) -> InstanceReport {
        InstanceReport {
            name: "dn1_h2".into(),
            process_alive: true,
            responding: true,
            role: MemberRole::Standby as i32,
            replay_lsn: replay,
            ..InstanceReport::default()
        }
    }

    fn state() -> ClusterState {
        ClusterState::initial(&local_config())
    }

    /// The gate before promoting dn1_h2 after dn1_h1's loss, with the secondary's
    /// latest and fresh reports and the standby's replay LSN.
    fn promote_dn1_h2(
        s: &mut ClusterState,
        g: &DnGroup,
        latest: Option<&InstanceReport>,
        fresh: Option<&InstanceReport>,
        standby_replay: u64,
    ) -> Gate {
        let standby = standby(standby_replay);
        before_promote(s, g, "dn1_h1", "dn1_h2", latest, fresh, Some(&standby))
    }

    #[test]
    fn a_lost_standby_starts_the_secondary_no_later_than_its_last_flush() {
        let g = group();
        let mut s = state();
        let note = while_primary_healthy(
            &mut s,
            &g,
            "dn1_h1",
            &primary(vec![]),
            Some("dn1_h2"),
            0x4000000,
        );
        assert!(note.unwrap().contains("streams from dn1_h1"));
        assert_eq!(
            s.secondary["dn1"],
            SecondaryPlan::Stream {
                upstream: "dn1_h1".into(),
                start_lsn: 0x4000000
            }
        );
        // Level-triggered: the same again changes nothing (and keeps the start).
        assert!(while_primary_healthy(
            &mut s,
            &g,
            "dn1_h1",
            &primary(vec![]),
            Some("dn1_h2"),
            0x4800000
        )
        .is_none());
        // Unknown flush: the primary's current position.
        let mut s2 = state();
        while_primary_healthy(&mut s2, &g, "dn1_h1", &primary(vec![]), Some("dn1_h2"), 0);
        assert!(matches!(
            s2.secondary["dn1"],
            SecondaryPlan::Stream {
                start_lsn: 0x5000000,
                ..
            }
        ));
    }

    #[test]
    fn a_catching_up_standby_keeps_the_secondary_streaming() {
        let g = group();
        let mut s = state();
        let p = primary(vec![
            row("dn1_h2", "catchup", "potential", 0x1000),
            row("dn1_h3", "streaming", "sync", 0x5000000),
        ]);
        while_primary_healthy(&mut s, &g, "dn1_h1", &p, Some("dn1_h2"), 0x1000);
        assert!(matches!(s.secondary["dn1"], SecondaryPlan::Stream { .. }));
    }

    #[test]
    fn the_standby_back_in_sync_idles_the_secondary() {
        let g = group();
        let mut s = state();
        s.secondary.insert(
            "dn1".into(),
            SecondaryPlan::Stream {
                upstream: "dn1_h1".into(),
                start_lsn: 1,
            },
        );
        let p = primary(vec![row("dn1_h2", "streaming", "sync", 0x5000000)]);
        let note = while_primary_healthy(&mut s, &g, "dn1_h1", &p, Some("dn1_h2"), 0);
        assert!(note.unwrap().contains("goes idle"));
        assert!(!s.secondary.contains_key("dn1"));
        assert!(while_primary_healthy(&mut s, &g, "dn1_h1", &p, Some("dn1_h2"), 0).is_none());
    }

    #[test]
    fn an_idle_secondary_leaves_the_usual_rule() {
        let g = group();
        let mut s = state();
        let idle = sec("idle", 1, 0, 0);
        assert_eq!(
            promote_dn1_h2(&mut s, &g, Some(&idle), Some(&idle), 1),
            Gate::Usual
        );
        assert!(!s.secondary.contains_key("dn1"));
    }

    #[test]
    fn a_streaming_secondary_is_fenced_before_any_promotion() {
        let g = group();
        let mut s = state();
        s.secondary.insert(
            "dn1".into(),
            SecondaryPlan::Stream {
                upstream: "dn1_h1".into(),
                start_lsn: 1,
            },
        );
        let streaming = sec("streaming", 1, 0x5000000, 10);
        let gate = promote_dn1_h2(&mut s, &g, Some(&streaming), Some(&streaming), 0x5000000);
        assert!(
            matches!(gate, Gate::Wait(ref w) if w.contains("fencing")),
            "{gate:?}"
        );
        assert_eq!(s.secondary["dn1"], SecondaryPlan::Hold);
        // Still streaming (the order has not arrived): wait.
        let gate = promote_dn1_h2(&mut s, &g, Some(&streaming), Some(&streaming), 0x5000000);
        assert!(
            matches!(gate, Gate::Wait(ref w) if w.contains("confirm")),
            "{gate:?}"
        );
        // Silent secondary: cannot confirm, no promotion.
        let gate = promote_dn1_h2(&mut s, &g, Some(&streaming), None, 0x5000000);
        assert!(
            matches!(gate, Gate::Wait(ref w) if w.contains("no fresh report")),
            "{gate:?}"
        );
    }

    #[test]
    fn an_idle_plan_with_a_still_streaming_secondary_is_fenced_too() {
        let g = group();
        let mut s = state();
        let streaming = sec("streaming", 1, 0x5000000, 10);
        let gate = promote_dn1_h2(&mut s, &g, Some(&streaming), Some(&streaming), 1);
        assert!(matches!(gate, Gate::Wait(_)));
        assert_eq!(s.secondary["dn1"], SecondaryPlan::Hold);
    }

    #[test]
    fn a_standby_behind_the_fenced_secondary_catches_up_before_promotion() {
        let g = group();
        let mut s = state();
        s.secondary.insert("dn1".into(), SecondaryPlan::Hold);
        let holding = sec("holding", 1, 0x5000000, 10);
        let gate = promote_dn1_h2(&mut s, &g, Some(&holding), Some(&holding), 0x4000000);
        assert!(
            matches!(gate, Gate::Wait(ref w) if w.contains("catching up")),
            "{gate:?}"
        );
        let gate = promote_dn1_h2(&mut s, &g, Some(&holding), Some(&holding), 0x5000000);
        assert_eq!(
            gate,
            Gate::CaughtUp {
                secondary_flush: 0x5000000
            }
        );
        // A hold from an older term than the state's is not a confirmation.
        s.term = ha_common::Term(2);
        let gate = promote_dn1_h2(&mut s, &g, Some(&holding), Some(&holding), 0x5000000);
        assert!(matches!(gate, Gate::Wait(_)));
    }

    #[test]
    fn after_promotion_the_secondary_streams_from_the_new_primary() {
        let g = group();
        let mut s = state();
        after_promote(
            &mut s,
            &g,
            "dn1_h2",
            &Gate::Usual,
            Some(&standby(0x4000000)),
        );
        assert_eq!(
            s.secondary["dn1"],
            SecondaryPlan::Stream {
                upstream: "dn1_h2".into(),
                start_lsn: 0x4000000
            }
        );
        after_promote(
            &mut s,
            &g,
            "dn1_h2",
            &Gate::CaughtUp {
                secondary_flush: 0x5000000,
            },
            Some(&standby(0x5000000)),
        );
        assert!(matches!(
            s.secondary["dn1"],
            SecondaryPlan::Stream {
                start_lsn: 0x5000000,
                ..
            }
        ));
    }
}
