//! The DDL set: which CNs take part in DDL. Kept by the primary CMServer in its
//! durable, streamed cluster state; pure rules decide who is taken out and who is let
//! (back) in, from what the CNs say in `CnSync` and what their agents report.
//!
//! # Rules
//! - The set's catalog version is the highest catalog version any member has reported
//!   as READY (it only grows; it survives the set becoming empty).
//! - A member is *good* while it calls `CnSync` as READY with the set's catalog version
//!   and its agent does not report it dead or not answering. A member not good for
//!   `timing.cn_failover_timeout` is taken out, so DDL goes on without it. The timer of
//!   a member this CMServer has not heard from yet starts when it starts watching (a
//!   new primary gives every member a full timeout of grace).
//! - A CN outside the set is admitted when it calls `CnSync` as READY with exactly the
//!   set's catalog version (it copied the catalog from a member first; with an empty
//!   set, at least the set's version) and no DDL is in flight: every member has
//!   reported, none holds a prepared catalog change (`catalog_prepared`), and all hold
//!   the set's version (none is between a DDL's decision and its phase two).
//!   Admission happens only between DDLs: a DDL prepared on the old set cannot commit
//!   a version the new member misses, except in the window between a member's last
//!   report and its next prepare; there the new member is left behind the set's version
//!   and is taken out again after the timeout (and the coordinator CN re-checks the set
//!   before its decision, see the `cn` crate).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use ha_common::proto::cm::{ClusterStatus, CnPhase};
use serde::{Deserialize, Serialize};

/// The CNs a DDL must reach, durable in the cluster state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DdlSet {
    pub members: BTreeSet<String>,
    /// The highest catalog version a member reported: a CN must hold it to be admitted.
    pub catalog_version: u64,
}

impl DdlSet {
    pub fn contains(&self, cn: &str) -> bool {
        self.members.contains(cn)
    }
}

/// What a CN last said in `CnSync`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CnSeen {
    pub at: Instant,
    pub phase: CnPhase,
    pub catalog_version: u64,
    pub catalog_prepared: bool,
}

impl CnSeen {
    fn ready(&self) -> bool {
        self.phase == CnPhase::CnReady
    }
}

/// The rules' memory (CMServer memory only; a restarted CMServer relearns it within a
/// heartbeat and gives every member a full timeout of grace).
#[derive(Debug, Clone, Default)]
pub struct Memory {
    /// Latest `CnSync` per CN.
    pub seen: HashMap<String, CnSeen>,
    /// When each member was last good (READY at the set's version), or when this
    /// CMServer started watching it if not since: its removal timer's start.
    pub watched_since: HashMap<String, Instant>,
    /// Since when each CN's agent has continuously reported it dead or not answering.
    pub agent_bad_since: HashMap<String, Instant>,
    /// Why each CN this CMServer took out is out (until it is admitted again).
    pub taken_out: HashMap<String, String>,
}

/// Everything the rules decide from.
pub struct Input<'a> {
    /// Configured CN names.
    pub cns: &'a [String],
    pub set: &'a DdlSet,
    pub memory: &'a Memory,
    /// Per CN with a fresh agent report: whether it is alive and answering.
    pub agent_ok: &'a HashMap<String, bool>,
    pub now: Instant,
    pub timeout: Duration,
}

/// The rules' verdict.
#[derive(Debug, Clone, Default)]
pub struct Plan {
    /// The new set, when it changed (persist before anybody is told).
    pub set: Option<DdlSet>,
    pub memory: Memory,
    /// Why a CN is out or waits (status details), by CN name.
    pub notes: BTreeMap<String, String>,
    pub removed: Vec<String>,
    pub admitted: Vec<String>,
}

/// Applies every rule once.
pub fn decide(input: &Input<'_>) -> Plan {
    let now = input.now;
    let mut memory = input.memory.clone();
    let mut set = input.set.clone();
    let mut notes = BTreeMap::new();
    let (mut removed, mut admitted) = (Vec::new(), Vec::new());

    // CNs removed from the config leave the set.
    set.members.retain(|m| input.cns.contains(m));
    memory.seen.retain(|c, _| input.cns.contains(c));

    for cn in input.cns {
        match input.agent_ok.get(cn) {
            Some(false) => {
                memory.agent_bad_since.entry(cn.clone()).or_insert(now);
            }
            _ => {
                memory.agent_bad_since.remove(cn);
            }
        }
    }

    // The set's version: the highest a member reported as READY.
    for m in &set.members {
        if let Some(s) = memory.seen.get(m).filter(|s| s.ready()) {
            set.catalog_version = set.catalog_version.max(s.catalog_version);
        }
    }

    // Removal.
    let members: Vec<String> = set.members.iter().cloned().collect();
    for m in members {
        let watched = *memory.watched_since.entry(m.clone()).or_insert(now);
        let good_sync = memory
            .seen
            .get(&m)
            .filter(|s| s.ready() && s.catalog_version == set.catalog_version)
            .map(|s| s.at);
        let last_good = good_sync.map_or(watched, |at| at.max(watched));
        // Remember it: once a DDL moves the set's version, the member's latest sync is
        // behind until its next one, and its timer must run from when it was last
        // good, not from when watching began (which took out every long-standing
        // member at the first DDL).
        memory.watched_since.insert(m.clone(), last_good);
        let silent = now.saturating_duration_since(last_good);
        let agent_bad = memory
            .agent_bad_since
            .get(&m)
            .map(|since| now.saturating_duration_since(*since));
        let why = if silent > input.timeout {
            Some(match memory.seen.get(&m) {
                Some(s) if s.ready() && s.catalog_version != set.catalog_version => format!(
                    "taken out of the DDL set: its catalog version {} is behind the set's {} for {:.1} s",
                    s.catalog_version,
                    set.catalog_version,
                    silent.as_secs_f64()
                ),
                _ => format!(
                    "taken out of the DDL set: not serving for {:.1} s",
                    silent.as_secs_f64()
                ),
            })
        } else if agent_bad.is_some_and(|d| d > input.timeout) {
            Some(format!(
                "taken out of the DDL set: its agent reports it down or not answering for {:.1} s",
                agent_bad.unwrap_or_default().as_secs_f64()
            ))
        } else {
            None
        };
        if let Some(why) = why {
            set.members.remove(&m);
            memory.watched_since.remove(&m);
            memory.taken_out.insert(m.clone(), why.clone());
            notes.insert(m.clone(), why);
            removed.push(m);
        }
    }

    // Admission, only between DDLs.
    let in_flight = ddl_in_flight(&set, &memory);
    for cn in input.cns {
        if set.contains(cn) {
            continue;
        }
        let Some(s) = memory.seen.get(cn) else {
            notes
                .entry(cn.clone())
                .or_insert_with(|| "not in the DDL set: has not called the CMServer".into());
            continue;
        };
        let fresh = now.saturating_duration_since(s.at) <= input.timeout;
        let note = if !fresh {
            "not in the DDL set: not serving".to_owned()
        } else if !s.ready() {
            format!(
                "not in the DDL set: {} (catalog version {}, the set's is {})",
                phase_label(s.phase),
                s.catalog_version,
                set.catalog_version
            )
        } else if input.agent_ok.get(cn) == Some(&false) {
            "not in the DDL set: its agent reports it down or not answering".to_owned()
        } else if !version_admissible(&set, s.catalog_version) {
            format!(
                "not in the DDL set: catalog version {} differs from the set's {} (it must copy the catalog)",
                s.catalog_version, set.catalog_version
            )
        } else if let Some(why) = &in_flight {
            format!("not in the DDL set yet: waits for {why}")
        } else {
            set.catalog_version = set.catalog_version.max(s.catalog_version);
            set.members.insert(cn.clone());
            memory.watched_since.insert(cn.clone(), now);
            memory.taken_out.remove(cn);
            admitted.push(cn.clone());
            continue;
        };
        let note = match memory.taken_out.get(cn) {
            Some(why) if !notes.contains_key(cn) => format!("{why}; {note}"),
            _ => note,
        };
        notes.entry(cn.clone()).or_insert(note);
    }

    Plan {
        set: (set != *input.set).then_some(set),
        memory,
        notes,
        removed,
        admitted,
    }
}

fn version_admissible(set: &DdlSet, version: u64) -> bool {
    if set.members.is_empty() {
        version >= set.catalog_version
    } else {
        version == set.catalog_version
    }
}

/// Why a DDL may be in flight among the members (None: between DDLs).
fn ddl_in_flight(set: &DdlSet, memory: &Memory) -> Option<String> {
    for m in &set.members {
        match memory.seen.get(m) {
            None => return Some(format!("member {m} to report")),
            Some(s) if s.catalog_prepared => {
                return Some(format!("the DDL prepared on {m} to finish"))
            }
            Some(s) if s.catalog_version != set.catalog_version => {
                return Some(format!(
                    "member {m} to reach catalog version {} (a DDL is finishing)",
                    set.catalog_version
                ))
            }
            Some(_) => {}
        }
    }
    None
}

fn phase_label(phase: CnPhase) -> &'static str {
    match phase {
        CnPhase::CnCopyingCatalog => "copying the catalog",
        CnPhase::CnStarting => "starting",
        CnPhase::CnReady => "ready",
        CnPhase::Unspecified => "phase unknown",
    }
}

/// Fills the CN rows of a status: catalog version (from `CnSync`), membership, and the
/// state: `normal` only for a serving member of the set.
pub fn annotate(
    status: &mut ClusterStatus,
    set: &DdlSet,
    memory: &Memory,
    notes: &BTreeMap<String, String>,
) {
    use crate::status::states::{CATCHING_UP, NORMAL, STARTING};
    for row in &mut status.cn {
        let seen = memory.seen.get(&row.name);
        row.catalog_version = seen.map_or(0, |s| s.catalog_version);
        row.in_ddl_set = set.contains(&row.name);
        // Serving means: a member of the set that says it is READY.
        let ready = seen.is_some_and(CnSeen::ready);
        if row.state == NORMAL && !row.in_ddl_set {
            row.state = CATCHING_UP.into();
        } else if row.state == NORMAL && !ready {
            row.state = STARTING.into();
        }
        if let Some(n) = notes.get(&row.name) {
            if !row.detail.contains(n.as_str()) {
                if !row.detail.is_empty() {
                    row.detail.push_str("; ");
                }
                row.detail.push_str(n);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Duration = Duration::from_secs(3);

    struct World {
        cns: Vec<String>,
        set: DdlSet,
        memory: Memory,
        agent_ok: HashMap<String, bool>,
        t0: Instant,
    }

    impl World {
        fn new(members: &[&str], version: u64) -> World {
            World {
                cns: vec!["cn1".into(), "cn2".into()],
                set: DdlSet {
                    members: members.iter().map(|m| m.to_string()).collect(),
                    catalog_version: version,
                },
                memory: Memory::default(),
                agent_ok: HashMap::new(),
                t0: Instant::now(),
            }
        }

        fn sync(&mut self, cn: &str, at_s: f64, phase: CnPhase, version: u64, prepared: bool) {
            self.memory.seen.insert(
                cn.into(),
                CnSeen {
                    at: self.t0 + Duration::from_secs_f64(at_s),
                    phase,
                    catalog_version: version,
                    catalog_prepared: prepared,
                },
            );
        }

        fn ready(&mut self, cn: &str, at_s: f64, version: u64) {
            self.sync(cn, at_s, CnPhase::CnReady, version, false);
        }

        /// Runs the rules at t0 + `at_s` and keeps the result.
        fn tick(&mut self, at_s: f64) -> Plan {
            let plan = decide(&Input {
                cns: &self.cns,
                set: &self.set,
                memory: &self.memory,
                agent_ok: &self.agent_ok,
                now: self.t0 + Duration::from_secs_f64(at_s),
                timeout: T,
            });
            if let Some(s) = &plan.set {
                self.set = s.clone();
            }
            self.memory = plan.memory.clone();
            plan
        }

        fn members(&self) -> Vec<&str> {
            self.set.members.iter().map(String::as_str).collect()
        }
    }

    #[test]
    fn the_first_ready_cns_of_a_new_cluster_are_admitted() {
        let mut w = World::new(&[], 0);
        w.ready("cn1", 0.0, 0);
        w.sync("cn2", 0.0, CnPhase::CnStarting, 0, false);
        let plan = w.tick(0.1);
        assert_eq!(plan.admitted, ["cn1"]);
        assert!(plan.set.is_some(), "a change to persist");
        assert!(plan.notes["cn2"].contains("starting"), "{:?}", plan.notes);
        w.ready("cn2", 1.0, 0);
        assert_eq!(w.tick(1.1).admitted, ["cn2"]);
        assert_eq!(w.members(), ["cn1", "cn2"]);
        assert!(w.tick(1.2).set.is_none(), "nothing changes");
    }

    #[test]
    fn a_member_silent_for_the_timeout_is_taken_out() {
        let mut w = World::new(&["cn1", "cn2"], 4);
        w.ready("cn1", 0.0, 4);
        w.ready("cn2", 0.0, 4);
        w.tick(0.0);
        w.ready("cn1", 3.0, 4);
        let plan = w.tick(3.0);
        assert!(plan.removed.is_empty(), "3 s is not more than the timeout");
        w.ready("cn1", 3.2, 4);
        let plan = w.tick(3.2);
        assert_eq!(plan.removed, ["cn2"]);
        assert!(plan.notes["cn2"].contains("not serving for 3.2 s"));
        assert_eq!(w.members(), ["cn1"]);
        let plan = w.tick(4.0);
        assert!(
            plan.notes["cn2"].starts_with("taken out of the DDL set: not serving for 3.2 s; "),
            "status keeps saying why: {:?}",
            plan.notes
        );
        assert_eq!(w.set.catalog_version, 4);
    }

    #[test]
    fn a_long_standing_member_is_not_taken_out_by_the_next_ddl() {
        // Both members good for a long while; cn1 then reports a DDL's new version
        // before cn2's next CnSync: cn2 was good a moment ago, so it stays.
        let mut w = World::new(&["cn1", "cn2"], 0);
        for t in 0..=10 {
            w.ready("cn1", f64::from(t), 0);
            w.ready("cn2", f64::from(t), 0);
            assert!(w.tick(f64::from(t)).removed.is_empty());
        }
        w.ready("cn1", 10.5, 1);
        assert!(w.tick(10.5).removed.is_empty(), "{:?}", w.members());
        // Still behind a full timeout after it was last good: out.
        w.ready("cn2", 11.0, 0);
        assert!(w.tick(12.9).removed.is_empty());
        let plan = w.tick(13.1);
        assert_eq!(plan.removed, ["cn2"]);
        assert!(
            plan.notes["cn2"].contains("catalog version 0 is behind the set's 1 for 3.1 s"),
            "{:?}",
            plan.notes
        );
    }

    #[test]
    fn a_member_never_heard_from_gets_a_full_timeout_of_grace() {
        // A new CMServer primary: no CnSync yet from anybody.
        let mut w = World::new(&["cn1", "cn2"], 4);
        w.tick(10.0);
        w.ready("cn1", 11.0, 4);
        assert!(w.tick(12.9).removed.is_empty());
        assert_eq!(w.tick(13.1).removed, ["cn2"]);
    }

    #[test]
    fn a_member_whose_agent_reports_it_down_is_taken_out() {
        // Its CnSync loop still runs, but its Coordinator service does not answer.
        let mut w = World::new(&["cn1", "cn2"], 1);
        w.agent_ok.insert("cn2".into(), false);
        w.ready("cn2", 0.0, 1);
        w.ready("cn1", 0.0, 1);
        w.tick(0.0);
        for t in [1.0, 2.0, 3.0] {
            w.ready("cn2", t, 1);
            w.ready("cn1", t, 1);
            assert!(w.tick(t).removed.is_empty());
        }
        w.ready("cn2", 3.5, 1);
        w.ready("cn1", 3.5, 1);
        let plan = w.tick(3.5);
        assert_eq!(plan.removed, ["cn2"]);
        assert!(plan.notes["cn2"].contains("agent reports"));
    }

    #[test]
    fn a_member_that_stays_behind_the_sets_version_is_taken_out() {
        let mut w = World::new(&["cn1", "cn2"], 5);
        w.ready("cn1", 0.0, 6);
        w.ready("cn2", 0.0, 5);
        w.tick(0.0);
        assert_eq!(w.set.catalog_version, 6, "the highest member version");
        for t in [1.0, 2.0, 3.0, 4.0] {
            w.ready("cn1", t, 6);
            w.ready("cn2", t, 5);
            let plan = w.tick(t);
            if t < 4.0 {
                assert!(plan.removed.is_empty(), "phase two may take a moment");
            } else {
                assert_eq!(plan.removed, ["cn2"]);
                assert!(plan.notes["cn2"].contains("behind the set's 6"));
            }
        }
    }

    #[test]
    fn a_returning_cn_is_admitted_only_with_the_sets_catalog_version() {
        let mut w = World::new(&["cn1"], 7);
        w.ready("cn1", 0.0, 7);
        w.ready("cn2", 0.0, 6);
        let plan = w.tick(0.0);
        assert!(plan.admitted.is_empty());
        assert!(plan.notes["cn2"].contains("must copy the catalog"));
        w.sync("cn2", 0.5, CnPhase::CnCopyingCatalog, 6, false);
        let plan = w.tick(0.5);
        assert!(plan.notes["cn2"].contains("copying the catalog"));
        w.ready("cn2", 1.0, 8);
        assert!(w.tick(1.0).admitted.is_empty(), "ahead is not equal either");
        w.ready("cn2", 1.5, 7);
        assert_eq!(w.tick(1.5).admitted, ["cn2"]);
    }

    #[test]
    fn no_admission_while_a_ddl_is_in_flight() {
        let mut w = World::new(&["cn1"], 3);
        w.sync("cn1", 0.0, CnPhase::CnReady, 3, true);
        w.ready("cn2", 0.0, 3);
        let plan = w.tick(0.0);
        assert!(plan.admitted.is_empty());
        assert!(
            plan.notes["cn2"].contains("prepared on cn1"),
            "{:?}",
            plan.notes
        );
        // The DDL committed on cn1: cn2's copy is now behind, so it is still out.
        w.ready("cn1", 1.0, 4);
        let plan = w.tick(1.0);
        assert!(plan.admitted.is_empty());
        assert!(plan.notes["cn2"].contains("differs from the set's 4"));
        w.ready("cn2", 1.5, 4);
        assert_eq!(w.tick(1.5).admitted, ["cn2"]);
    }

    #[test]
    fn no_admission_while_a_member_is_between_decision_and_phase_two() {
        let mut w = World::new(&["cn1", "cn2"], 3);
        w.cns.push("cn3".into());
        w.ready("cn1", 0.0, 4);
        w.ready("cn2", 0.0, 3);
        w.ready("cn3", 0.0, 4);
        let plan = w.tick(0.0);
        assert!(plan.admitted.is_empty());
        assert!(plan.notes["cn3"].contains("member cn2 to reach catalog version 4"));
        w.ready("cn2", 0.5, 4);
        assert_eq!(w.tick(0.5).admitted, ["cn3"]);
    }

    #[test]
    fn no_admission_while_a_member_has_not_reported() {
        let mut w = World::new(&["cn1"], 2);
        w.ready("cn2", 0.0, 2);
        let plan = w.tick(0.0);
        assert!(plan.admitted.is_empty());
        assert!(plan.notes["cn2"].contains("member cn1 to report"));
        // ... until the silent member is taken out: then cn2 is admitted.
        w.ready("cn2", 3.5, 2);
        let plan = w.tick(3.5);
        assert_eq!(plan.removed, ["cn1"]);
        assert_eq!(plan.admitted, ["cn2"]);
    }

    #[test]
    fn with_an_empty_set_a_cn_at_or_above_the_last_version_is_admitted() {
        let mut w = World::new(&[], 5);
        w.ready("cn1", 0.0, 4);
        assert!(w.tick(0.0).admitted.is_empty(), "it would lose a DDL");
        w.ready("cn1", 0.5, 5);
        assert_eq!(w.tick(0.5).admitted, ["cn1"]);
    }

    #[test]
    fn a_stale_or_down_cn_is_not_admitted_and_unknown_cns_leave() {
        let mut w = World::new(&["ghost"], 1);
        w.ready("cn1", 0.0, 1);
        w.agent_ok.insert("cn1".into(), false);
        let plan = w.tick(0.0);
        assert!(w.set.members.is_empty(), "not configured: out");
        assert!(plan.admitted.is_empty());
        assert!(plan.notes["cn1"].contains("agent reports"));
        w.agent_ok.clear();
        let plan = w.tick(3.5);
        assert!(plan.admitted.is_empty(), "its CnSync is too old");
        assert!(plan.notes["cn1"].contains("not serving"));
        w.ready("cn1", 3.6, 1);
        assert_eq!(w.tick(3.6).admitted, ["cn1"]);
    }

    #[test]
    fn status_rows_show_version_membership_and_state() {
        use ha_common::proto::cm::InstanceStatus;
        let mut w = World::new(&["cn1"], 2);
        w.ready("cn1", 0.0, 2);
        w.sync("cn2", 0.0, CnPhase::CnCopyingCatalog, 1, false);
        let plan = w.tick(0.0);
        let row = |name: &str| InstanceStatus {
            name: name.into(),
            state: "normal".into(),
            ..Default::default()
        };
        let mut status = ClusterStatus {
            cn: vec![row("cn1"), row("cn2")],
            ..Default::default()
        };
        annotate(&mut status, &w.set, &w.memory, &plan.notes);
        let (cn1, cn2) = (&status.cn[0], &status.cn[1]);
        assert_eq!(
            (cn1.state.as_str(), cn1.catalog_version, cn1.in_ddl_set),
            ("normal", 2, true)
        );
        assert_eq!(
            (cn2.state.as_str(), cn2.catalog_version, cn2.in_ddl_set),
            ("catching_up", 1, false)
        );
        assert!(cn2.detail.contains("copying the catalog"), "{}", cn2.detail);
        // A member that restarted and is not READY yet does not serve.
        w.sync("cn1", 1.0, CnPhase::CnStarting, 2, false);
        let mut status = ClusterStatus {
            cn: vec![row("cn1")],
            ..Default::default()
        };
        annotate(&mut status, &w.set, &w.memory, &plan.notes);
        assert_eq!(status.cn[0].state, "starting");
    }
}
