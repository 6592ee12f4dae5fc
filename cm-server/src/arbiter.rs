//! Arbitration: which failover, demotion or run-alone order the cluster needs now. A
//! pure function of (config, durable cluster state, latest reports with their ages,
//! now, the arbiter's in-memory timers, orders in flight) to a plan: a new durable
//! state (persisted first), the orders to send (in that state's term), status notes.
//!
//! # DN groups
//! - The primary is *healthy* while its agent reports it alive, responding to the
//!   probe (within the probe timeout) and running as primary. Each healthy report
//!   records, durably, which standby it showed as synchronous (`sync`, `streaming`)
//!   in `ClusterState::last_sync_standby`; a report without one clears it.
//! - Primary not healthy for `dn_failover_timeout` (postmaster down and not restarted,
//!   hung, or agent silent; a postmaster its agent is still restarting gets twice
//!   that) → the group's standby is promoted ONLY IF it was that
//!   synchronous standby (so it holds every acknowledged commit: PostgreSQL
//!   acknowledges a commit only after the sync standby flushed it) and it is itself
//!   alive and responding. Otherwise no failover; the group's status says why.
//!   A primary held stopped by the operator is not failed over.
//! - Order and fencing: the new roles and a new term are persisted first; then
//!   PROMOTE goes to the standby's agent. The old primary cannot commit any more
//!   once the standby is promoted: `synchronous_standby_names` lists only its group
//!   members, and the only one that was streaming (the standby) ends its walreceiver
//!   when promoted, so the old primary's commits wait for an acknowledgement that
//!   never comes. A frozen (SIGSTOPped) primary that resumes may still read flush
//!   acknowledgements the standby sent before its promotion: they cover only WAL the
//!   standby had flushed, which promotion replays, so nothing it acknowledges is lost;
//!   anything newer waits forever. Once the new primary runs as primary, the old one
//!   gets DEMOTE (fast stop: waiting backends are terminated, their clients get an
//!   error, never a success; then pg_rewind discards what it wrote alone, restart as
//!   standby of the new primary). A former primary found stopped is started by its
//!   agent in its assigned role (standby, rewound first) without any order.
//! - Level-triggered repair: a member assigned primary that still runs as a standby
//!   gets PROMOTE again (the CMServer may have died between persisting and ordering).
//!
//! # GTM pair
//! - Primary not healthy for `gtm_failover_timeout` → PROMOTE the standby if it is
//!   responding and `ready` (has the primary's latest boundary; the GTM refuses
//!   otherwise). The agent promotes it running alone, in the GTM's own term counter.
//! - Standby not healthy for `gtm_failover_timeout` while the primary is healthy →
//!   RUN_ALONE on (the pair is "degraded"); once the standby answers `ready` and the
//!   primary has re-attached it, RUN_ALONE off.
//! - A member assigned standby that runs as primary while the assigned primary is
//!   healthy → DEMOTE.
//! - Level-triggered repair as for DN groups: a member assigned primary that still
//!   runs as a standby gets PROMOTE again (e.g. its order was rejected because a DN
//!   failover in a later tick raised the term before the agent got it).
//!
//! # A silent agent is not a dead primary
//! A primary (DN or GTM) whose agent is silent but which answers the CMServer's own
//! probe (`outside.rs`: a query to the DN, the GTM's Status RPC) as primary is
//! healthy as of that probe: restarting `cm-agent.service` costs no failover. Only a
//! primary unreachable or hung as seen from outside its host is failed over. The
//! same holds for a GTM standby (no run-alone for a restarting agent).
//!
//! Single lost heartbeats and slow fsyncs never trigger anything: every timeout is at
//! least two heartbeats (validated in the config), probes do not fsync, and the timers
//! run from the last healthy report, not from one missed one.
//!
//! Every timer runs from when the agent *observed* the instance (the report's arrival
//! minus its `observed_ms_ago`), not from the report's arrival: an agent re-sends its
//! last observation while the next probe hangs (up to the probe timeout), so a hung
//! primary's last "healthy" keeps arriving for a while but ages. A healthy instance's
//! observation is at most about one heartbeat plus a probe old, well below any
//! timeout, so this costs no spurious failover.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::time::{Duration, Instant};

use ha_common::config::{ClusterConfig, DnGroup, Instance, Role};
use ha_common::proto::cm::{GtmFacts, InstanceReport, MemberRole, OrderKind};

use crate::reports::Reports;
use crate::secondary;
use crate::state::{AssignedRole, ClusterState, GtmAlone};

/// The status note key of the GTM pair (DN groups use their name).
pub const GTM_PAIR: &str = "gtm";

/// What the arbiter remembers between ticks (memory only: a new CMServer primary
/// starts with fresh timers, i.e. a full timeout of grace).
#[derive(Debug, Clone, Default)]
pub struct Memory {
    /// When each watched instance was last healthy (or first watched).
    pub healthy_at: HashMap<String, Instant>,
    /// Instances last seen responding as primary.
    pub seen_as_primary: HashSet<String>,
    /// Per DN group: the standby's last flush LSN its primary showed (where a
    /// secondary must start from when the standby is lost).
    pub standby_flush: HashMap<String, u64>,
    /// Standbys first seen unable to follow their primary (see [`stuck_standby`]).
    pub stuck_since: HashMap<String, Instant>,
    /// Primaries last seen being restarted by their agent, until seen healthy: one
    /// just started again may not answer its first probe yet.
    pub was_restarting: HashSet<String>,
    /// When this CMServer's tenure as primary began (set by the engine): no GTM is
    /// promoted within `gtm_failover_timeout` of it, which outlasts every GTM lease an
    /// earlier primary granted (`gtm_lease.rs`).
    pub tenure_started: Option<Instant>,
}

/// The CMServer's own successful probe of an instance whose agent is silent: when it
/// answered, and as what (`outside.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeenFromOutside {
    pub at: Instant,
    pub role: MemberRole,
}

/// One order to send (the term is the plan's state's term).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedOrder {
    pub instance: String,
    pub kind: OrderKind,
    pub run_alone: bool,
}

impl PlannedOrder {
    fn new(instance: &str, kind: OrderKind) -> PlannedOrder {
        PlannedOrder {
            instance: instance.to_owned(),
            kind,
            run_alone: false,
        }
    }
}

/// Everything a decision is made from.
pub struct Input<'a> {
    pub cfg: &'a ClusterConfig,
    pub state: &'a ClusterState,
    pub reports: &'a Reports,
    pub now: Instant,
    pub memory: &'a Memory,
    /// DN groups (by name) and `GTM_PAIR` with an operator operation running:
    /// untouched, except that a DN group whose primary is lost is failed over anyway
    /// (the operation is preempted, see [`Plan::preempted`]).
    pub busy: &'a BTreeSet<String>,
    /// Orders sent recently (in flight or just finished): not sent again.
    pub recent: &'a [(String, OrderKind)],
    /// The CMServer's own probes of instances whose agent is silent.
    pub outside: &'a HashMap<String, SeenFromOutside>,
    /// GTM leases granted in this tenure (`gtm_lease.rs`): instance → when the latest
    /// ends. No GTM standby is promoted while its primary's runs.
    pub gtm_leases: &'a HashMap<String, Instant>,
}

/// What to do.
#[derive(Debug, Clone, Default)]
pub struct Plan {
    /// The new durable state, when it changed: persisted before any order is sent.
    pub state: Option<ClusterState>,
    pub orders: Vec<PlannedOrder>,
    /// Status notes by DN group name or `GTM_PAIR`.
    pub notes: BTreeMap<String, String>,
    pub memory: Memory,
    /// Busy DN groups failed over by this plan: their operation must stop.
    pub preempted: BTreeSet<String>,
    /// The failovers this plan makes, for the state's history (stamped when persisted:
    /// the arbiter reads no wall clock).
    pub role_changes: Vec<crate::state::RoleChange>,
}

struct Ctx<'a> {
    input: &'a Input<'a>,
    next: ClusterState,
    plan: Plan,
    promoted: bool,
}

impl Ctx<'_> {
    fn fresh(&self, name: &str) -> Option<&InstanceReport> {
        self.input
            .reports
            .fresh(name, self.input.now, self.input.cfg.timing.agent_timeout())
    }

    /// Fresh, alive, responding and running in `role`.
    fn healthy_as(&self, name: &str, role: MemberRole) -> Option<&InstanceReport> {
        self.fresh(name)
            .filter(|r| r.process_alive && r.responding && r.role == role as i32)
    }

    /// How long `name` has not been healthy: from the observation of its last healthy
    /// report to its latest observation while that is fresh (what its agent saw, not
    /// when the report happened to arrive: a report carries an observation up to a
    /// heartbeat old), or to now once it is stale (agent silent or stuck); 0 while the
    /// latest one is healthy. Starts its timer now if it was never watched (a new
    /// CMServer primary gives a full timeout of grace).
    fn unhealthy_for(&mut self, name: &str, healthy: bool) -> Duration {
        let now = self.input.now;
        if healthy {
            let at = self
                .input
                .reports
                .latest(name)
                .map_or(now, |o| o.at.min(now));
            let e = self
                .plan
                .memory
                .healthy_at
                .entry(name.to_owned())
                .or_insert(at);
            *e = (*e).max(at);
            return Duration::ZERO;
        }
        let since = *self
            .plan
            .memory
            .healthy_at
            .entry(name.to_owned())
            .or_insert(now);
        let until = match self.input.reports.latest(name) {
            Some(o) if self.fresh(name).is_some() => o.at.min(now),
            _ => now,
        };
        until.saturating_duration_since(since)
    }

    /// While `name`'s agent is silent: when the CMServer itself last saw it answer
    /// as `role` (within the agent timeout).
    fn outside_as(&self, name: &str, role: MemberRole) -> Option<Instant> {
        if self.fresh(name).is_some() {
            return None;
        }
        let o = self.input.outside.get(name)?;
        let recent =
            self.input.now.saturating_duration_since(o.at) < self.input.cfg.timing.agent_timeout();
        (o.role == role && recent).then_some(o.at)
    }

    /// `name` was seen healthy at `at` (its timer restarts from there).
    fn saw_healthy(&mut self, name: &str, at: Instant) {
        let at = at.min(self.input.now);
        let e = self
            .plan
            .memory
            .healthy_at
            .entry(name.to_owned())
            .or_insert(at);
        *e = (*e).max(at);
    }

    fn recently_ordered(&self, name: &str, kind: OrderKind) -> bool {
        self.input
            .recent
            .iter()
            .any(|(n, k)| n == name && *k == kind)
            || self
                .plan
                .orders
                .iter()
                .any(|o| o.instance == name && o.kind == kind)
    }

    fn order(&mut self, name: &str, kind: OrderKind) {
        if !self.recently_ordered(name, kind) {
            self.plan.orders.push(PlannedOrder::new(name, kind));
        }
    }

    fn note(&mut self, key: &str, text: String) {
        self.plan.notes.insert(key.to_owned(), text);
    }

    /// Swaps the roles of `old` (becomes standby) and `new` (becomes primary) in a new
    /// term, once per plan.
    fn swap_roles(&mut self, old: &str, new: &str) {
        let _ = self.next.set_role(old, AssignedRole::Standby);
        let _ = self.next.set_role(new, AssignedRole::Primary);
        if !self.promoted {
            self.next.bump_term();
            self.promoted = true;
        }
    }

    /// Records the failover of `group` from `old` to `new` (after [`Ctx::swap_roles`]).
    fn failed_over(&mut self, group: &str, old: &str, new: &str, why: &str, lost: Duration) {
        self.plan.role_changes.push(crate::state::RoleChange {
            group: group.to_owned(),
            kind: "failover".to_owned(),
            from: old.to_owned(),
            to: new.to_owned(),
            term: self.next.term.0,
            reason: format!("primary {old} lost ({why})"),
            duration_ms: lost.as_millis() as u64,
            ..Default::default()
        });
    }

    /// Why `name` is not a healthy primary (for notes).
    fn why_unhealthy(&self, name: &str, host: &str) -> String {
        match self.fresh(name) {
            None => format!("the agent of {host} is silent"),
            Some(r) if !r.process_alive => "not running".to_owned(),
            Some(r) if !r.responding => "not responding".to_owned(),
            Some(_) => "not running as primary".to_owned(),
        }
    }
}

/// The plan for this moment.
pub fn decide(input: &Input<'_>) -> Plan {
    let mut cx = Ctx {
        input,
        next: input.state.clone(),
        plan: Plan {
            memory: input.memory.clone(),
            ..Plan::default()
        },
        promoted: false,
    };
    for name in input.state.instances.keys() {
        if let Some(r) = cx.fresh(name) {
            if r.process_alive && r.responding {
                if r.role == MemberRole::Primary as i32 {
                    cx.plan.memory.seen_as_primary.insert(name.clone());
                } else {
                    cx.plan.memory.seen_as_primary.remove(name);
                }
            } else if !r.process_alive {
                cx.plan.memory.seen_as_primary.remove(name);
            }
        }
    }
    for g in &input.cfg.dn_groups {
        let busy = input.busy.contains(&g.name);
        dn_group(&mut cx, g, busy);
    }
    if !input.busy.contains(GTM_PAIR) {
        gtm_pair(&mut cx);
    }
    if cx.next != *input.state {
        cx.plan.state = Some(cx.next.clone());
    }
    cx.plan
}

fn assigned<'a>(
    state: &ClusterState,
    members: &'a [Instance],
    role: AssignedRole,
) -> Option<&'a Instance> {
    members
        .iter()
        .find(|m| state.role_of(&m.name) == Some(role))
}

/// The full-copy standby of a group (not the WAL-only secondary).
fn dn_standby<'a>(state: &ClusterState, g: &'a DnGroup) -> Option<&'a Instance> {
    g.members.iter().find(|m| {
        state.role_of(&m.name) == Some(AssignedRole::Standby) && m.role() != Some(Role::Secondary)
    })
}

/// One DN group's rules. A `busy` group (an operator operation runs on it) gets only
/// the failover rule: a lost primary preempts any operation (a switchover begun just
/// before the primary's host died must not hold the group without a primary until
/// its orders time out).
fn dn_group(cx: &mut Ctx<'_>, g: &DnGroup, busy: bool) {
    let state = cx.input.state;
    let Some(p) = assigned(state, &g.members, AssignedRole::Primary) else {
        return;
    };
    let standby = dn_standby(state, g);
    let timeout = cx.input.cfg.timing.dn_failover_timeout();

    // A member assigned primary that still runs as a standby: (re)order PROMOTE.
    if cx.healthy_as(&p.name, MemberRole::Standby).is_some() && state.should_run(&p.name) {
        if busy {
            return;
        }
        cx.order(&p.name, OrderKind::Promote);
        cx.note(
            &g.name,
            format!("promoting {} (assigned primary, runs as standby)", p.name),
        );
        return;
    }

    let healthy = cx.healthy_as(&p.name, MemberRole::Primary).cloned();
    if healthy.is_none() {
        if let Some(at) = cx.outside_as(&p.name, MemberRole::Primary) {
            cx.saw_healthy(&p.name, at);
            cx.note(
                &g.name,
                format!(
                    "the agent of {} is silent; primary {} answers the CMServer itself: no failover",
                    p.host, p.name
                ),
            );
            return;
        }
    }
    let lost = cx.unhealthy_for(&p.name, healthy.is_some());
    if let Some(rep) = &healthy {
        let sync = rep
            .replicas
            .iter()
            .find(|r| r.sync_state == "sync" && r.state == "streaming")
            .map(|r| r.application_name.clone());
        match sync {
            Some(s) => {
                cx.next.last_sync_standby.insert(g.name.clone(), s);
            }
            None => {
                cx.next.last_sync_standby.remove(&g.name);
            }
        }
        // The secondary follows the standby's health even while an operation runs on
        // the group (a standby being rebuilt is not in sync: commits need the secondary).
        secondary_while_healthy(cx, g, &p.name, rep, standby);
        if busy {
            return;
        }
        // Former primaries (assigned standby, still or again primary): DEMOTE.
        for m in &g.members {
            if m.name == p.name || state.role_of(&m.name) != Some(AssignedRole::Standby) {
                continue;
            }
            let Some(r) = cx.fresh(&m.name) else { continue };
            let runs_as_primary = r.process_alive
                && (if r.responding {
                    r.role == MemberRole::Primary as i32
                } else {
                    cx.plan.memory.seen_as_primary.contains(&m.name)
                });
            if runs_as_primary {
                cx.order(&m.name, OrderKind::Demote);
                cx.note(&g.name, format!("demoting the former primary {}", m.name));
            }
        }
        if let Some(s) = standby {
            stuck_standby(cx, g, rep, s);
        }
        cx.plan.memory.was_restarting.remove(&p.name);
        return;
    }
    if !state.should_run(&p.name) {
        cx.note(
            &g.name,
            format!(
                "primary {} is held stopped by the operator: no failover",
                p.name
            ),
        );
        return;
    }
    let rep = cx.fresh(&p.name).cloned();
    if rep.as_ref().is_some_and(restarting) {
        cx.plan.memory.was_restarting.insert(p.name.clone());
    }
    if lost < timeout {
        return;
    }
    // A crashed postmaster its agent is restarting (crash recovery included) is
    // restartable: it gets a second timeout before it counts as lost; so does one
    // just started again that has not answered a probe yet.
    let just_restarted = rep
        .as_ref()
        .is_some_and(|r| r.process_alive && !r.responding)
        && cx.plan.memory.was_restarting.contains(&p.name);
    if lost < timeout * 2 && (rep.as_ref().is_some_and(restarting) || just_restarted) {
        cx.note(
            &g.name,
            format!(
                "primary {} down {} s; its agent is restarting it",
                p.name,
                lost.as_secs()
            ),
        );
        return;
    }
    let why = cx.why_unhealthy(&p.name, &p.host);
    let lost_s = lost.as_secs();
    let Some(s) = standby else {
        cx.note(
            &g.name,
            format!(
                "primary {} lost {lost_s} s ({why}); no failover: no standby",
                p.name
            ),
        );
        return;
    };
    let sec_name = s_name_of_secondary(g);
    let sec_latest = cx.input.reports.latest(&sec_name).map(|o| o.report.clone());
    let sec_fresh = cx.fresh(&sec_name).cloned();
    let s_fresh = cx.fresh(&s.name).cloned();
    // A standby that cannot be promoted anyway (silent, down, held stopped) does not
    // fence the secondary: that would only cost the running group its second copy.
    let gate = if liveness_problem(cx.input.state, s_fresh.as_ref(), &s.name).is_some() {
        secondary::Gate::Usual
    } else {
        secondary::before_promote(
            &mut cx.next,
            g,
            &p.name,
            &s.name,
            sec_latest.as_ref(),
            sec_fresh.as_ref(),
            s_fresh.as_ref(),
        )
    };
    let problem = match &gate {
        secondary::Gate::Wait(why) => Some(match unsafe_candidate(cx, g, s) {
            Some(usual) => format!("{usual}; {why}"),
            None => why.clone(),
        }),
        // The fenced secondary's WAL, replayed by the standby, covers what was acknowledged.
        secondary::Gate::CaughtUp { .. } => {
            liveness_problem(cx.input.state, cx.fresh(&s.name), &s.name)
        }
        secondary::Gate::Usual => unsafe_candidate(cx, g, s),
    };
    if let Some(reason) = problem {
        cx.note(
            &g.name,
            format!(
                "primary {} lost {lost_s} s ({why}); no failover: {reason}",
                p.name
            ),
        );
        return;
    }
    cx.swap_roles(&p.name, &s.name);
    cx.next.last_sync_standby.remove(&g.name);
    if busy {
        cx.plan.preempted.insert(g.name.clone());
    }
    secondary::after_promote(&mut cx.next, g, &s.name, &gate, s_fresh.as_ref());
    cx.order(&s.name, OrderKind::Promote);
    cx.failed_over(&g.name, &p.name, &s.name, &why, lost);
    cx.note(
        &g.name,
        format!(
            "failover: primary {} lost {lost_s} s ({why}); {} promoted in term {}",
            p.name, s.name, cx.next.term
        ),
    );
}

/// The group's secondary rules while its primary `p` is healthy (see
/// [`crate::secondary`]).
fn secondary_while_healthy(
    cx: &mut Ctx<'_>,
    g: &DnGroup,
    p: &str,
    rep: &InstanceReport,
    standby: Option<&Instance>,
) {
    if let Some(s) = standby {
        let f = secondary::standby_flush(rep, &s.name);
        if f != 0 {
            cx.plan.memory.standby_flush.insert(g.name.clone(), f);
        }
    }
    let last = cx
        .plan
        .memory
        .standby_flush
        .get(&g.name)
        .copied()
        .unwrap_or(0);
    if let Some(note) = secondary::while_primary_healthy(
        &mut cx.next,
        g,
        p,
        rep,
        standby.map(|s| s.name.as_str()),
        last,
    ) {
        cx.note(&g.name, note);
    }
}

/// The name of the group's secondary ("" if none).
fn s_name_of_secondary(g: &DnGroup) -> String {
    secondary::secondary_of(g)
        .map(|m| m.name.clone())
        .unwrap_or_default()
}

/// A standby that cannot follow its primary (issue 9 §5.1: e.g. it was rewound
/// against a source still on the old timeline and then wrote past the fork point) is
/// rebuilt: it runs as a standby on an older timeline than the primary and does not
/// appear among the primary's replicas for four failover timeouts, with no order for
/// it in flight (a demotion or rebuild takes its time).
fn stuck_standby(cx: &mut Ctx<'_>, g: &DnGroup, primary: &InstanceReport, s: &Instance) {
    let connected = primary
        .replicas
        .iter()
        .any(|r| r.application_name == s.name);
    let behind = cx
        .healthy_as(&s.name, MemberRole::Standby)
        .is_some_and(|r| r.timeline > 0 && primary.timeline > r.timeline);
    let in_hand = [OrderKind::Demote, OrderKind::Rebuild, OrderKind::Promote]
        .iter()
        .any(|k| cx.recently_ordered(&s.name, *k));
    if !behind || connected || in_hand {
        cx.plan.memory.stuck_since.remove(&s.name);
        return;
    }
    let now = cx.input.now;
    let since = *cx
        .plan
        .memory
        .stuck_since
        .entry(s.name.clone())
        .or_insert(now);
    let stuck = now.saturating_duration_since(since);
    if stuck >= cx.input.cfg.timing.dn_failover_timeout() * 4 {
        cx.order(&s.name, OrderKind::Rebuild);
        cx.plan.memory.stuck_since.remove(&s.name);
        cx.note(
            &g.name,
            format!(
                "{} cannot follow the primary (timeline {} behind, not streaming for {} s): rebuilding it",
                s.name,
                primary.timeline,
                stuck.as_secs()
            ),
        );
    }
}

/// Whether a report says the agent is (re)starting a process that is not up yet.
fn restarting(r: &InstanceReport) -> bool {
    let step = r.detail.split([';', ':']).next().unwrap_or("").trim();
    !r.process_alive && matches!(step, "crashed" | "restarting" | "starting")
}

/// Why promoting standby `s` of group `g` could lose acknowledged commits or cannot
/// work; None when it is safe.
fn unsafe_candidate(cx: &Ctx<'_>, g: &DnGroup, s: &Instance) -> Option<String> {
    candidate_problem(cx.input.state, cx.fresh(&s.name), &g.name, &s.name)
}

/// The safety rule for promoting DN standby `standby` of `group`, given its fresh
/// report (None: its agent is silent). None when safe.
pub fn candidate_problem(
    state: &ClusterState,
    report: Option<&InstanceReport>,
    group: &str,
    standby: &str,
) -> Option<String> {
    sync_problem(state, group, standby).or_else(|| liveness_problem(state, report, standby))
}

/// Why `standby` may lack acknowledged commits of `group` (None: it has them all).
pub fn sync_problem(state: &ClusterState, group: &str, standby: &str) -> Option<String> {
    match state.last_sync_standby.get(group) {
        Some(s) if s == standby => None,
        Some(other) => Some(format!(
            "{standby} was not the synchronous standby ({other} was)"
        )),
        None => Some(format!(
            "{standby} was not the synchronous standby in the primary's last healthy report"
        )),
    }
}

/// Why `standby` cannot be promoted now (None: it runs and responds as a standby).
pub fn liveness_problem(
    state: &ClusterState,
    report: Option<&InstanceReport>,
    standby: &str,
) -> Option<String> {
    if !state.should_run(standby) {
        return Some(format!("{standby} is held stopped by the operator"));
    }
    match report {
        None => Some(format!("the agent of {standby} is silent")),
        Some(r) if !r.process_alive => Some(format!("{standby} is not running")),
        Some(r) if !r.responding => Some(format!("{standby} is not responding")),
        Some(r) if r.role != MemberRole::Standby as i32 => {
            Some(format!("{standby} does not run as a standby"))
        }
        Some(_) => None,
    }
}

fn gtm_pair(cx: &mut Ctx<'_>) {
    let state = cx.input.state;
    let members = &cx.input.cfg.gtm.instances;
    let Some(p) = assigned(state, members, AssignedRole::Primary) else {
        return;
    };
    let s = assigned(state, members, AssignedRole::Standby);
    let timeout = cx.input.cfg.timing.gtm_failover_timeout();

    // A member assigned primary that still runs as a standby: (re)order PROMOTE (the
    // CMServer may have died between persisting and ordering, or the order was
    // rejected because a later failover in another group raised the term first).
    if cx.healthy_as(&p.name, MemberRole::Standby).is_some() && state.should_run(&p.name) {
        cx.order(&p.name, OrderKind::Promote);
        cx.note(
            GTM_PAIR,
            format!("promoting {} (assigned primary, runs as standby)", p.name),
        );
        return;
    }

    let p_healthy = cx.healthy_as(&p.name, MemberRole::Primary).cloned();
    if p_healthy.is_none() {
        if let Some(at) = cx.outside_as(&p.name, MemberRole::Primary) {
            cx.saw_healthy(&p.name, at);
            cx.note(
                GTM_PAIR,
                format!(
                    "the agent of {} is silent; primary {} answers the CMServer itself: no failover",
                    p.host, p.name
                ),
            );
            return;
        }
    }
    let lost = cx.unhealthy_for(&p.name, p_healthy.is_some());
    if let Some(prep) = p_healthy {
        let Some(s) = s else { return };
        let s_rep = cx.fresh(&s.name).cloned();
        let s_outside = cx.outside_as(&s.name, MemberRole::Standby);
        if let Some(at) = s_outside {
            cx.saw_healthy(&s.name, at);
        }
        let s_healthy = s_outside.is_some()
            || s_rep
                .as_ref()
                .is_some_and(|r| r.process_alive && r.responding);
        let s_lost = cx.unhealthy_for(&s.name, s_healthy);
        let facts = prep.gtm.unwrap_or_default();
        record_run_alone(cx, &p.name, &facts);
        if s_rep.as_ref().is_some_and(|r| {
            r.process_alive && r.responding && r.role == MemberRole::Primary as i32
        }) {
            cx.order(&s.name, OrderKind::Demote);
            cx.note(GTM_PAIR, format!("demoting the former primary {}", s.name));
            return;
        }
        let s_ready = s_rep.as_ref().and_then(|r| r.gtm).is_some_and(|f| f.ready) && s_healthy;
        if facts.run_alone {
            if s_ready && facts.standby_attached {
                run_alone(cx, &p.name, false);
            }
            cx.note(
                GTM_PAIR,
                format!("degraded: {} runs alone (standby {} lost)", p.name, s.name),
            );
        } else if s_lost >= timeout {
            run_alone(cx, &p.name, true);
            cx.note(
                GTM_PAIR,
                format!(
                    "degraded: standby {} lost {} s; {} ordered to run alone",
                    s.name,
                    s_lost.as_secs(),
                    p.name
                ),
            );
        }
        return;
    }
    if !state.should_run(&p.name) || lost < timeout {
        return;
    }
    if let Some(left) = cx
        .input
        .memory
        .tenure_started
        .filter(|t| cx.input.cfg.gtm.require_lease && *t + timeout > cx.input.now)
        .map(|t| t + timeout - cx.input.now)
    {
        // Our view of the primary may predate a lease the previous primary CMServer
        // granted it from a newer observation: wait until any such lease has run out.
        cx.note(
            GTM_PAIR,
            format!(
                "primary {} lost; a new primary CMServer waits {} ms more (the previous one's GTM lease) before promoting",
                p.name,
                left.as_millis()
            ),
        );
        return;
    }
    if let Some(left) = cx
        .input
        .gtm_leases
        .get(&p.name)
        .filter(|end| **end > cx.input.now)
        .map(|end| *end - cx.input.now)
    {
        // Its lease came from a newer observation than our timer's (the CMServer's
        // own probe while its agent was silent): it may hand out GXIDs until then.
        cx.note(
            GTM_PAIR,
            format!(
                "primary {} lost; waiting {} ms more for the GTM lease it holds before promoting",
                p.name,
                left.as_millis()
            ),
        );
        return;
    }
    let why = cx.why_unhealthy(&p.name, &p.host);
    let lost_s = lost.as_secs();
    let Some(s) = s else { return };
    let problem = match cx.fresh(&s.name) {
        None => Some(format!("the agent of {} is silent", s.name)),
        Some(r) if !(r.process_alive && r.responding) => {
            Some(format!("{} is not responding", s.name))
        }
        Some(r) if r.role == MemberRole::Primary as i32 => {
            // Already primary (promoted by an earlier order): just record it.
            None
        }
        Some(r) if !r.gtm.is_some_and(|f| f.ready) => Some(format!(
            "{} is not ready (has not copied the primary's state)",
            s.name
        )),
        Some(r) => gtm_gxid_problem(
            &state.gtm,
            &p.name,
            &s.name,
            r.gtm.map_or(0, |f| f.boundary),
        ),
    };
    if let Some(problem) = problem {
        cx.note(
            GTM_PAIR,
            format!(
                "primary {} lost {lost_s} s ({why}); no failover: {problem}",
                p.name
            ),
        );
        return;
    }
    cx.swap_roles(&p.name, &s.name);
    // The promoted GTM runs alone until its old primary has resynced.
    cx.next.gtm.run_alone = true;
    cx.order(&s.name, OrderKind::Promote);
    cx.failed_over("gtm", &p.name, &s.name, &why, lost);
    cx.note(
        GTM_PAIR,
        format!(
            "failover: primary {} lost {lost_s} s ({why}); {} promoted",
            p.name, s.name
        ),
    );
}

/// Keeps the durable run-alone record (`ClusterState::gtm`) true for the healthy
/// primary `name`: set while it runs alone (also when it was ordered to by hand),
/// with the highest boundary it reported meanwhile; cleared once it runs with its
/// standby attached again and no RUN_ALONE order is in flight.
fn record_run_alone(cx: &mut Ctx<'_>, name: &str, facts: &GtmFacts) {
    if facts.run_alone {
        cx.next.gtm.run_alone = true;
    }
    if cx.next.gtm.run_alone {
        cx.next.gtm.primary_boundary = cx.next.gtm.primary_boundary.max(facts.boundary);
        if !facts.run_alone
            && facts.standby_attached
            && !cx.recently_ordered(name, OrderKind::RunAlone)
        {
            cx.next.gtm.run_alone = false;
        }
    }
}

/// Why promoting GTM standby `standby` (persisted boundary `standby_boundary`) could
/// hand out a GXID twice; None when its boundary is above every GXID `primary` may
/// have handed out. While a primary (may have) run alone nobody knows how far it got,
/// whatever the standby says about itself.
pub fn gtm_gxid_problem(
    gtm: &GtmAlone,
    primary: &str,
    standby: &str,
    standby_boundary: u64,
) -> Option<String> {
    let force = format!("`cm_ctl failover --instance {standby} --force` accepts that risk");
    if gtm.run_alone {
        return Some(format!(
            "{primary} ran alone (it reported boundary {}, and may have gone further), so \
             {standby} (boundary {standby_boundary}) may have missed GXIDs it handed out; \
             promoting {standby} could hand out those GXIDs again ({force})",
            gtm.primary_boundary
        ));
    }
    if standby_boundary < gtm.primary_boundary {
        return Some(format!(
            "{standby}'s boundary {standby_boundary} is below {}, which {primary} \
             reported: promoting {standby} could hand out GXIDs again ({force})",
            gtm.primary_boundary
        ));
    }
    None
}

fn run_alone(cx: &mut Ctx<'_>, name: &str, on: bool) {
    if on {
        // Durable before the order goes out (the plan's state is persisted first).
        cx.next.gtm.run_alone = true;
    }
    if cx.recently_ordered(name, OrderKind::RunAlone) {
        return;
    }
    cx.plan.orders.push(PlannedOrder {
        instance: name.to_owned(),
        kind: OrderKind::RunAlone,
        run_alone: on,
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::tests::local_config;
    use ha_common::proto::cm::{InstanceKind as Kind, ReplicaState};
    use ha_common::Term;

    struct World {
        cfg: ClusterConfig,
        state: ClusterState,
        reports: Reports,
        memory: Memory,
        busy: BTreeSet<String>,
        recent: Vec<(String, OrderKind)>,
        outside: HashMap<String, SeenFromOutside>,
        gtm_leases: HashMap<String, Instant>,
        t0: Instant,
    }

    fn dn(name: &str, role: MemberRole) -> InstanceReport {
        InstanceReport {
            name: name.into(),
            kind: Kind::DataNode as i32,
            process_alive: true,
            responding: true,
            role: role as i32,
            ..Default::default()
        }
    }

    fn sync_row(app: &str) -> ReplicaState {
        ReplicaState {
            application_name: app.into(),
            state: "streaming".into(),
            sync_state: "sync".into(),
            ..Default::default()
        }
    }

    fn gtm(name: &str, role: MemberRole, facts: GtmFacts) -> InstanceReport {
        InstanceReport {
            name: name.into(),
            kind: Kind::Gtm as i32,
            process_alive: true,
            responding: true,
            role: role as i32,
            gtm: Some(facts),
            ..Default::default()
        }
    }

    fn ready() -> GtmFacts {
        GtmFacts {
            ready: true,
            ..Default::default()
        }
    }

    fn dn1_primary() -> InstanceReport {
        let mut p = dn("dn1_h1", MemberRole::Primary);
        p.replicas = vec![sync_row("dn1_h2")];
        p
    }

    impl World {
        fn new() -> World {
            let cfg = local_config();
            let mut state = ClusterState::initial(&cfg);
            state.set_run(None, true).unwrap();
            World {
                cfg,
                state,
                reports: Reports::new(),
                memory: Memory::default(),
                busy: BTreeSet::new(),
                recent: Vec::new(),
                outside: HashMap::new(),
                gtm_leases: HashMap::new(),
                t0: Instant::now(),
            }
        }

        /// A healthy cluster reported at `at`.
        fn healthy_at(&mut self, at: Instant) {
            self.report(
                "h1",
                vec![
                    gtm(
                        "gtm1",
                        MemberRole::Primary,
                        GtmFacts {
                            standby_attached: true,
                            ..Default::default()
                        },
                    ),
                    dn1_primary(),
                ],
                at,
            );
            self.report(
                "h2",
                vec![
                    gtm("gtm2", MemberRole::Standby, ready()),
                    dn("dn1_h2", MemberRole::Standby),
                    {
                        let mut p = dn("dn2_h2", MemberRole::Primary);
                        p.replicas = vec![sync_row("dn2_h3")];
                        p
                    },
                ],
                at,
            );
            self.report("h3", vec![dn("dn2_h3", MemberRole::Standby)], at);
        }

        fn report(&mut self, host: &str, instances: Vec<InstanceReport>, at: Instant) {
            self.reports.record_host(&self.cfg, host, instances, at);
        }

        /// Decides at `now` and applies the plan's state and memory.
        fn tick(&mut self, now: Instant) -> Plan {
            let plan = decide(&Input {
                cfg: &self.cfg,
                state: &self.state,
                reports: &self.reports,
                now,
                memory: &self.memory,
                busy: &self.busy,
                recent: &self.recent,
                outside: &self.outside,
                gtm_leases: &self.gtm_leases,
            });
            if let Some(s) = &plan.state {
                self.state = s.clone();
            }
            self.memory = plan.memory.clone();
            plan
        }

        fn at(&self, ms: u64) -> Instant {
            self.t0 + Duration::from_millis(ms)
        }
    }

    fn orders(p: &Plan) -> Vec<(String, OrderKind)> {
        p.orders
            .iter()
            .map(|o| (o.instance.clone(), o.kind))
            .collect()
    }

    fn has(p: &Plan, name: &str, kind: OrderKind) -> bool {
        orders(p).contains(&(name.to_owned(), kind))
    }

    fn secondary_report(state: &str, term: u64, flush: u64) -> InstanceReport {
        let mut r = dn("dn1_h3", MemberRole::Secondary);
        r.kind = Kind::DnSecondary as i32;
        r.secondary = Some(ha_common::proto::cm::SecondaryFacts {
            state: state.into(),
            term,
            flush_lsn: flush,
            bytes_kept: u64::from(flush > 0) * 1000,
            ..Default::default()
        });
        r
    }

    #[test]
    fn a_lost_standby_starts_the_secondary_and_an_unpromotable_one_does_not_fence_it() {
        use crate::state::SecondaryPlan;
        let mut w = World::new();
        let mut p = dn1_primary();
        p.replicas.clear(); // the standby is gone
        p.current_lsn = 0x5000000;
        w.report("h1", vec![p], w.t0);
        w.tick(w.t0);
        assert_eq!(
            w.state.secondary["dn1"],
            SecondaryPlan::Stream {
                upstream: "dn1_h1".into(),
                start_lsn: 0x5000000
            }
        );
        // The primary goes silent too, the standby's agent is silent: no promotion
        // possible, so the secondary keeps streaming (no pointless fence).
        let plan = w.tick(w.at(5000));
        assert!(plan.orders.is_empty());
        assert!(matches!(
            w.state.secondary["dn1"],
            SecondaryPlan::Stream { .. }
        ));
    }

    #[test]
    fn the_standby_catches_up_from_the_fenced_secondary_then_is_promoted() {
        use crate::state::SecondaryPlan;
        let mut w = World::new();
        let mut p = dn1_primary();
        p.replicas = vec![sync_row("dn1_h3")]; // the secondary carries the commits
        w.report("h1", vec![p], w.t0);
        w.report(
            "h3",
            vec![secondary_report("streaming", 1, 0x4000000)],
            w.t0,
        );
        w.tick(w.t0);
        assert_eq!(w.state.last_sync_standby["dn1"], "dn1_h3");
        // The primary is lost; the standby is started again (behind).
        let at = w.at(5000);
        let mut sb = dn("dn1_h2", MemberRole::Standby);
        sb.replay_lsn = 0x1000000;
        w.report("h2", vec![sb.clone()], at);
        w.report("h3", vec![secondary_report("streaming", 1, 0x5000000)], at);
        let plan = w.tick(at);
        assert!(plan.orders.is_empty(), "fence first: {:?}", plan.orders);
        assert_eq!(w.state.secondary["dn1"], SecondaryPlan::Hold);
        // Fenced, but the standby lacks part of the secondary's WAL: wait.
        let at = w.at(6000);
        w.report("h2", vec![sb.clone()], at);
        w.report("h3", vec![secondary_report("holding", 1, 0x5000000)], at);
        let plan = w.tick(at);
        assert!(plan.orders.is_empty());
        assert!(
            plan.notes["dn1"].contains("catching up"),
            "{:?}",
            plan.notes
        );
        // It replayed everything the secondary kept: promoted, and the secondary
        // becomes the new primary's synchronous partner.
        let at = w.at(7000);
        sb.replay_lsn = 0x5000000;
        w.report("h2", vec![sb], at);
        w.report("h3", vec![secondary_report("holding", 1, 0x5000000)], at);
        let plan = w.tick(at);
        assert!(has(&plan, "dn1_h2", OrderKind::Promote), "{:?}", plan.notes);
        assert_eq!(w.state.term, Term(2));
        assert_eq!(
            w.state.secondary["dn1"],
            SecondaryPlan::Stream {
                upstream: "dn1_h2".into(),
                start_lsn: 0x5000000
            }
        );
    }

    #[test]
    fn a_healthy_cluster_needs_nothing_and_remembers_the_sync_standby() {
        let mut w = World::new();
        w.healthy_at(w.t0);
        let p = w.tick(w.at(100));
        assert!(p.orders.is_empty(), "{:?}", p.orders);
        assert_eq!(w.state.last_sync_standby.get("dn1").unwrap(), "dn1_h2");
        assert_eq!(w.state.last_sync_standby.get("dn2").unwrap(), "dn2_h3");
        let again = w.tick(w.at(200));
        assert!(again.state.is_none(), "no change, nothing to persist");
    }

    #[test]
    fn a_silent_primary_is_replaced_by_its_sync_standby_after_the_timeout_only() {
        let mut w = World::new();
        w.healthy_at(w.t0);
        w.tick(w.at(0));
        // h1 goes silent; h2, h3 keep reporting.
        for ms in [1000, 2000, 2900] {
            let at = w.at(ms);
            w.report("h2", vec![dn("dn1_h2", MemberRole::Standby)], at);
            let p = w.tick(at);
            assert!(p.orders.is_empty(), "{ms} ms: {:?}", p.orders);
            assert_eq!(w.state.term, Term(1));
        }
        let at = w.at(3100);
        w.report("h2", vec![dn("dn1_h2", MemberRole::Standby)], at);
        let p = w.tick(at);
        assert!(has(&p, "dn1_h2", OrderKind::Promote), "{:?}", p.orders);
        let s = p.state.expect("new roles persisted first");
        assert_eq!(s.term, Term(2));
        assert_eq!(s.role_of("dn1_h2"), Some(AssignedRole::Primary));
        assert_eq!(s.role_of("dn1_h1"), Some(AssignedRole::Standby));
        assert!(!s.last_sync_standby.contains_key("dn1"));
        assert!(p.notes["dn1"].contains("failover"), "{}", p.notes["dn1"]);
        // The failover is recorded for the history with why and how long the primary was lost.
        let c = &p.role_changes[..];
        assert_eq!(c.len(), 1, "{c:?}");
        assert_eq!(
            (
                c[0].group.as_str(),
                c[0].kind.as_str(),
                c[0].from.as_str(),
                c[0].to.as_str(),
                c[0].term
            ),
            ("dn1", "failover", "dn1_h1", "dn1_h2", 2)
        );
        assert!(c[0].reason.contains("dn1_h1 lost"), "{}", c[0].reason);
        assert!(c[0].duration_ms >= 3000, "{}", c[0].duration_ms);
    }

    /// `r` as re-sent by its agent `age_ms` after observing it.
    fn aged(mut r: InstanceReport, age_ms: u64) -> InstanceReport {
        r.observed_ms_ago = age_ms;
        r
    }

    #[test]
    fn a_hung_primary_fails_over_after_its_last_healthy_observation() {
        let mut w = World::new();
        w.healthy_at(w.t0);
        w.tick(w.t0);
        // The postmaster hangs right after the healthy probe at t0: the next probe
        // starts at 1000 and times out at 3000 (probe timeout 2 s); meanwhile the
        // agent re-sends its last, healthy, observation, aging.
        for ms in [1000, 2000, 2900] {
            let at = w.at(ms);
            w.report("h1", vec![aged(dn1_primary(), ms)], at);
            w.report("h2", vec![dn("dn1_h2", MemberRole::Standby)], at);
            let p = w.tick(at);
            assert!(
                !has(&p, "dn1_h2", OrderKind::Promote),
                "{ms} ms: {:?}",
                p.orders
            );
        }
        let at = w.at(3000);
        let mut hung = dn1_primary();
        hung.responding = false;
        w.report("h1", vec![hung], at);
        w.report("h2", vec![dn("dn1_h2", MemberRole::Standby)], at);
        let p = w.tick(at);
        assert!(
            has(&p, "dn1_h2", OrderKind::Promote),
            "dn_failover_timeout after the last healthy observation (t0), not after \
             the last healthy report's arrival (2900): {:?}",
            p.orders
        );
        assert_eq!(p.state.expect("new roles").term, Term(2));
    }

    #[test]
    fn a_healthy_primary_with_a_normal_observation_age_is_left_alone() {
        let mut w = World::new();
        w.healthy_at(w.t0);
        w.tick(w.t0);
        // Every report carries an observation one heartbeat plus a probe old, and one
        // heartbeat is lost now and then.
        for ms in (1000..=20000).step_by(1000) {
            if ms % 7000 == 0 {
                continue;
            }
            let at = w.at(ms);
            w.report("h1", vec![aged(dn1_primary(), 1050)], at);
            w.report(
                "h2",
                vec![aged(dn("dn1_h2", MemberRole::Standby), 1050)],
                at,
            );
            let p = w.tick(at + Duration::from_millis(900));
            assert!(
                !has(&p, "dn1_h2", OrderKind::Promote),
                "{ms} ms: {:?}",
                p.orders
            );
        }
        assert_eq!(w.state.role_of("dn1_h1"), Some(AssignedRole::Primary));
    }

    #[test]
    fn one_failed_probe_reported_a_heartbeat_late_changes_nothing() {
        let mut w = World::new();
        w.healthy_at(w.t0);
        w.tick(w.t0);
        // dn1_h1 is observed at 10 + 1000 k; each observation arrives a heartbeat
        // later (report just before the next probe, plus delivery): at 1030 + 1000 k.
        // The probe at 1010 fails once.
        for k in 0..6u64 {
            let mut r = dn1_primary();
            r.responding = k != 1;
            let arrival = w.at(1030 + 1000 * k);
            w.report("h1", vec![aged(r, 1020)], arrival);
            w.report(
                "h2",
                vec![aged(dn("dn1_h2", MemberRole::Standby), 1020)],
                arrival,
            );
            for at in [arrival, arrival + Duration::from_millis(999)] {
                let p = w.tick(at);
                assert!(
                    !has(&p, "dn1_h2", OrderKind::Promote),
                    "{k}: {:?}",
                    p.orders
                );
            }
        }
        assert_eq!(w.state.term, Term(1));
    }

    #[test]
    fn one_lost_heartbeat_changes_nothing() {
        let mut w = World::new();
        w.healthy_at(w.t0);
        w.tick(w.t0);
        // The next report is 1.9 s late (a lost heartbeat), then all is well.
        let p = w.tick(w.at(1900));
        assert!(p.orders.is_empty());
        w.healthy_at(w.at(2000));
        for ms in [2500, 4000, 4900] {
            assert!(w.tick(w.at(ms)).orders.is_empty(), "{ms}");
        }
    }

    #[test]
    fn no_failover_to_a_standby_that_was_not_synchronous() {
        let mut w = World::new();
        let mut p = dn1_primary();
        p.replicas[0].sync_state = "async".into();
        w.healthy_at(w.t0);
        w.report("h1", vec![p], w.t0);
        w.tick(w.t0);
        assert!(!w.state.last_sync_standby.contains_key("dn1"));
        let at = w.at(5000);
        w.report("h2", vec![dn("dn1_h2", MemberRole::Standby)], at);
        let plan = w.tick(at);
        assert!(plan.orders.is_empty(), "{:?}", plan.orders);
        assert_eq!(w.state.term, Term(1));
        let note = &plan.notes["dn1"];
        assert!(
            note.contains("primary dn1_h1 lost 5 s")
                && note.contains("no failover: dn1_h2 was not the synchronous standby"),
            "{note}"
        );
    }

    #[test]
    fn a_hung_primary_keeps_its_last_sync_standby_and_fails_over() {
        let mut w = World::new();
        w.healthy_at(w.t0);
        w.tick(w.t0);
        // Hung: alive, not responding, no replica rows — for 3 s.
        for ms in [1000u64, 2000, 3000, 3200] {
            let at = w.at(ms);
            let mut hung = dn("dn1_h1", MemberRole::Primary);
            hung.responding = false;
            w.report("h1", vec![hung], at);
            w.report("h2", vec![dn("dn1_h2", MemberRole::Standby)], at);
            let p = w.tick(at);
            if ms < 3000 {
                assert!(p.orders.is_empty());
                assert_eq!(w.state.last_sync_standby["dn1"], "dn1_h2");
            } else if ms == 3000 {
                assert!(has(&p, "dn1_h2", OrderKind::Promote), "{:?}", p.orders);
                assert!(p.notes["dn1"].contains("not responding"));
            }
        }
        // The new primary runs: the hung old one (still seen as primary) is demoted.
        let at = w.at(4000);
        let mut hung = dn("dn1_h1", MemberRole::Standby); // base report: assigned role
        hung.responding = false;
        w.report("h1", vec![hung], at);
        w.report("h2", vec![dn("dn1_h2", MemberRole::Primary)], at);
        let p = w.tick(at);
        assert!(has(&p, "dn1_h1", OrderKind::Demote), "{:?}", p.orders);
        // Not twice while it is in flight.
        w.recent = vec![("dn1_h1".into(), OrderKind::Demote)];
        assert!(w.tick(w.at(4100)).orders.is_empty());
    }

    #[test]
    fn no_failover_to_a_standby_that_does_not_respond() {
        let mut w = World::new();
        w.healthy_at(w.t0);
        w.tick(w.t0);
        let at = w.at(3500);
        let mut s = dn("dn1_h2", MemberRole::Standby);
        s.responding = false;
        w.report("h2", vec![s], at);
        let p = w.tick(at);
        assert!(p.orders.is_empty());
        assert!(
            p.notes["dn1"].contains("dn1_h2 is not responding"),
            "{}",
            p.notes["dn1"]
        );
    }

    #[test]
    fn a_primary_down_but_restarted_in_time_is_not_failed_over() {
        let mut w = World::new();
        w.healthy_at(w.t0);
        w.tick(w.t0);
        let mut down = dn("dn1_h1", MemberRole::Primary);
        down.process_alive = false;
        down.responding = false;
        w.report("h1", vec![down], w.at(1000));
        w.report("h2", vec![dn("dn1_h2", MemberRole::Standby)], w.at(1000));
        assert!(w.tick(w.at(1000)).orders.is_empty());
        w.healthy_at(w.at(2000));
        assert!(w.tick(w.at(3500)).orders.is_empty());
    }

    #[test]
    fn a_primary_being_restarted_gets_a_second_timeout() {
        let mut w = World::new();
        w.healthy_at(w.t0);
        w.tick(w.t0);
        let mut restarting = dn("dn1_h1", MemberRole::Primary);
        restarting.process_alive = false;
        restarting.responding = false;
        restarting.detail = "restarting".into();
        for ms in [3500u64, 5500] {
            let at = w.at(ms);
            w.report("h1", vec![restarting.clone()], at);
            w.report("h2", vec![dn("dn1_h2", MemberRole::Standby)], at);
            let p = w.tick(at);
            assert!(p.orders.is_empty(), "{ms}: {:?}", p.orders);
            assert!(p.notes["dn1"].contains("restarting it"));
        }
        // Started again, not answering its first probe yet: still within the grace.
        let mut started = dn("dn1_h1", MemberRole::Primary);
        started.responding = false;
        started.detail = "running".into();
        let at = w.at(5800);
        w.report("h1", vec![started], at);
        w.report("h2", vec![dn("dn1_h2", MemberRole::Standby)], at);
        let p = w.tick(at);
        assert!(p.orders.is_empty(), "just restarted: {:?}", p.orders);
        let at = w.at(6100);
        w.report("h1", vec![restarting.clone()], at);
        w.report("h2", vec![dn("dn1_h2", MemberRole::Standby)], at);
        assert!(has(&w.tick(at), "dn1_h2", OrderKind::Promote));
        // A failed restart is not restartable: the plain timeout applies.
        let mut w = World::new();
        w.healthy_at(w.t0);
        w.tick(w.t0);
        let mut failed = restarting;
        failed.detail = "failed: pg_ctl start exited 1".into();
        let at = w.at(3100);
        w.report("h1", vec![failed], at);
        w.report("h2", vec![dn("dn1_h2", MemberRole::Standby)], at);
        assert!(has(&w.tick(at), "dn1_h2", OrderKind::Promote));
    }

    #[test]
    fn an_operator_stopped_primary_and_busy_groups_are_left_alone() {
        let mut w = World::new();
        w.healthy_at(w.t0);
        w.tick(w.t0);
        w.state.set_run(Some("dn1_h1"), false).unwrap();
        let at = w.at(5000);
        w.report("h2", vec![dn("dn1_h2", MemberRole::Standby)], at);
        let p = w.tick(at);
        assert!(!has(&p, "dn1_h2", OrderKind::Promote));
        assert!(p.notes["dn1"].contains("held stopped"));
        w.state.set_run(Some("dn1_h1"), true).unwrap();
        w.busy.insert("dn2".into());
        w.busy.insert(GTM_PAIR.into());
        // Busy groups with a healthy primary: nothing (dn2's primary is healthy).
        w.report(
            "h2",
            vec![{
                let mut p = dn("dn2_h2", MemberRole::Primary);
                p.replicas = vec![sync_row("dn2_h3")];
                p
            }],
            at,
        );
        w.report("h3", vec![dn("dn2_h3", MemberRole::Standby)], at);
        let p = w.tick(at);
        assert!(
            p.orders
                .iter()
                .all(|o| o.instance != "gtm2" && !o.instance.starts_with("dn2")),
            "{:?}",
            p.orders
        );
    }

    #[test]
    fn a_lost_primary_preempts_an_operation_on_its_group() {
        let mut w = World::new();
        w.healthy_at(w.t0);
        w.busy.insert("dn1".into());
        w.tick(w.t0);
        // A switchover began; then h1 died. Its former standby (still running as a
        // standby, in sync at the last healthy report) is promoted anyway.
        let at = w.at(2000);
        w.report("h2", vec![dn("dn1_h2", MemberRole::Standby)], at);
        let p = w.tick(at);
        assert!(
            p.orders.is_empty() && p.preempted.is_empty(),
            "{:?}",
            p.orders
        );
        let at = w.at(3100);
        w.report("h2", vec![dn("dn1_h2", MemberRole::Standby)], at);
        let p = w.tick(at);
        assert!(has(&p, "dn1_h2", OrderKind::Promote), "{:?}", p.orders);
        assert!(p.preempted.contains("dn1"), "the operation must be told");
        assert_eq!(w.state.role_of("dn1_h2"), Some(AssignedRole::Primary));
    }

    #[test]
    fn a_former_primary_running_as_primary_is_demoted_and_promote_is_repeated() {
        let mut w = World::new();
        w.state.set_role("dn1_h1", AssignedRole::Standby).unwrap();
        w.state.set_role("dn1_h2", AssignedRole::Primary).unwrap();
        // The promote did not happen yet (CMServer restarted after persisting).
        w.report("h2", vec![dn("dn1_h2", MemberRole::Standby)], w.t0);
        w.report("h1", vec![dn("dn1_h1", MemberRole::Primary)], w.t0);
        let p = w.tick(w.t0);
        assert!(has(&p, "dn1_h2", OrderKind::Promote), "{:?}", p.orders);
        assert!(
            !has(&p, "dn1_h1", OrderKind::Demote),
            "not before the promotion"
        );
        let mut newp = dn("dn1_h2", MemberRole::Primary);
        newp.timeline = 2;
        w.report("h2", vec![newp], w.at(500));
        let p = w.tick(w.at(500));
        assert!(has(&p, "dn1_h1", OrderKind::Demote), "{:?}", p.orders);
    }

    #[test]
    fn gtm_primary_lost_promotes_a_ready_standby_only() {
        let mut w = World::new();
        w.healthy_at(w.t0);
        w.tick(w.t0);
        let at = w.at(3100);
        w.report(
            "h2",
            vec![gtm("gtm2", MemberRole::Standby, GtmFacts::default())],
            at,
        );
        let p = w.tick(at);
        assert!(p.orders.iter().all(|o| o.instance != "gtm2"));
        assert!(
            p.notes[GTM_PAIR].contains("gtm2 is not ready"),
            "{:?}",
            p.notes
        );
        w.report("h2", vec![gtm("gtm2", MemberRole::Standby, ready())], at);
        let p = w.tick(at);
        assert!(has(&p, "gtm2", OrderKind::Promote), "{:?}", p.orders);
        assert_eq!(w.state.role_of("gtm2"), Some(AssignedRole::Primary));
        assert_eq!(w.state.term, Term(2));
    }

    /// gtm1 lost (healthy at t0, silent since), gtm2 ready at `ms`.
    fn gtm1_lost(w: &mut World, ms: u64) -> Plan {
        let at = w.at(ms);
        w.report("h2", vec![gtm("gtm2", MemberRole::Standby, ready())], at);
        w.tick(at)
    }

    #[test]
    fn a_new_tenure_waits_out_the_previous_gtm_lease_only_with_require_lease() {
        for require_lease in [true, false] {
            let mut w = World::new();
            w.cfg.gtm.require_lease = require_lease;
            w.healthy_at(w.t0);
            // Elected 1 s after gtm1's last healthy report.
            w.memory.tenure_started = Some(w.at(1000));
            w.tick(w.t0);
            let p = gtm1_lost(&mut w, 3100);
            if require_lease {
                assert!(!has(&p, "gtm2", OrderKind::Promote), "{:?}", p.orders);
                assert!(
                    p.notes[GTM_PAIR].contains("waits 900 ms more"),
                    "{:?}",
                    p.notes
                );
                let p = gtm1_lost(&mut w, 4000);
                assert!(has(&p, "gtm2", OrderKind::Promote), "{:?}", p.orders);
            } else {
                assert!(has(&p, "gtm2", OrderKind::Promote), "{:?}", p.orders);
            }
        }
    }

    #[test]
    fn no_gtm_promotion_while_its_primary_holds_a_lease() {
        let mut w = World::new();
        w.healthy_at(w.t0);
        w.tick(w.t0);
        // Granted from the CMServer's own probe at 1000 ms: runs until 3700 ms.
        w.gtm_leases.insert("gtm1".into(), w.at(3700));
        let p = gtm1_lost(&mut w, 3100);
        assert!(!has(&p, "gtm2", OrderKind::Promote), "{:?}", p.orders);
        assert!(
            p.notes[GTM_PAIR].contains("waiting 600 ms more for the GTM lease"),
            "{:?}",
            p.notes
        );
        let p = gtm1_lost(&mut w, 3700);
        assert!(
            has(&p, "gtm2", OrderKind::Promote),
            "{:?} {:?}",
            p.orders,
            p.notes
        );
    }

    #[test]
    fn a_gtm_promote_lost_to_a_later_term_is_ordered_again() {
        let mut w = World::new();
        w.healthy_at(w.t0);
        w.tick(w.t0);
        let at = w.at(3100);
        w.report("h2", vec![gtm("gtm2", MemberRole::Standby, ready())], at);
        assert!(has(&w.tick(at), "gtm2", OrderKind::Promote));
        // The agent rejected it (dn1's failover raised the term meanwhile): gtm2 still
        // runs as a standby, and the order is no longer recent.
        let at = w.at(4100);
        w.report("h2", vec![gtm("gtm2", MemberRole::Standby, ready())], at);
        let p = w.tick(at);
        assert!(has(&p, "gtm2", OrderKind::Promote), "{:?}", p.orders);
        assert!(
            p.notes[GTM_PAIR].contains("promoting gtm2"),
            "{:?}",
            p.notes
        );
        assert_eq!(w.state.role_of("gtm2"), Some(AssignedRole::Primary));
    }

    #[test]
    fn gtm_standby_lost_runs_alone_then_rejoins() {
        let mut w = World::new();
        w.healthy_at(w.t0);
        w.tick(w.t0);
        let primary = |f: GtmFacts| gtm("gtm1", MemberRole::Primary, f);
        let at = w.at(3100);
        w.report("h1", vec![primary(GtmFacts::default())], at);
        let p = w.tick(at);
        let o = p.orders.iter().find(|o| o.instance == "gtm1").unwrap();
        assert_eq!((o.kind, o.run_alone), (OrderKind::RunAlone, true));
        assert!(p.notes[GTM_PAIR].contains("degraded"));
        // Running alone; standby back but not resynced yet: stays alone.
        let alone = GtmFacts {
            run_alone: true,
            ..Default::default()
        };
        let at = w.at(5000);
        w.report("h1", vec![primary(alone)], at);
        w.report(
            "h2",
            vec![gtm("gtm2", MemberRole::Standby, GtmFacts::default())],
            at,
        );
        let p = w.tick(at);
        assert!(p.orders.is_empty(), "{:?}", p.orders);
        assert!(p.notes[GTM_PAIR].contains("runs alone"));
        // Resynced and attached: run-alone off.
        let attached = GtmFacts {
            run_alone: true,
            standby_attached: true,
            ..Default::default()
        };
        w.report("h1", vec![primary(attached)], at);
        w.report("h2", vec![gtm("gtm2", MemberRole::Standby, ready())], at);
        let p = w.tick(at);
        let o = p.orders.iter().find(|o| o.instance == "gtm1").unwrap();
        assert_eq!((o.kind, o.run_alone), (OrderKind::RunAlone, false));
    }

    fn gtm_with_boundary(name: &str, role: MemberRole, mut f: GtmFacts, b: u64) -> InstanceReport {
        f.boundary = b;
        gtm(name, role, f)
    }

    #[test]
    fn a_gtm_standby_that_missed_run_alone_boundaries_is_never_promoted() {
        let mut w = World::new();
        w.healthy_at(w.t0);
        w.tick(w.t0);
        // The standby freezes: run-alone is ordered, and recorded durably first.
        let at = w.at(3100);
        let facts = GtmFacts::default();
        w.report(
            "h1",
            vec![gtm_with_boundary("gtm1", MemberRole::Primary, facts, 4001)],
            at,
        );
        let p = w.tick(at);
        assert!(has(&p, "gtm1", OrderKind::RunAlone), "{:?}", p.orders);
        let persisted = p.state.expect("the run-alone record is persisted first");
        assert!(persisted.gtm.run_alone);
        // Alone, the primary hands out far beyond the standby's boundary.
        let alone = GtmFacts {
            run_alone: true,
            ..Default::default()
        };
        let at = w.at(4000);
        w.report(
            "h1",
            vec![gtm_with_boundary("gtm1", MemberRole::Primary, alone, 40001)],
            at,
        );
        w.tick(at);
        assert_eq!(w.state.gtm.primary_boundary, 40001);
        // The primary freezes; the standby is back and says it is ready.
        for ms in [5000u64, 8000, 20000] {
            let at = w.at(ms);
            w.report(
                "h2",
                vec![gtm_with_boundary(
                    "gtm2",
                    MemberRole::Standby,
                    ready(),
                    4001,
                )],
                at,
            );
            let p = w.tick(at);
            assert!(!has(&p, "gtm2", OrderKind::Promote), "{ms}: {:?}", p.orders);
            assert_eq!(w.state.role_of("gtm1"), Some(AssignedRole::Primary));
            if ms > 5000 {
                let note = &p.notes[GTM_PAIR];
                assert!(
                    note.contains("no failover") && note.contains("gtm1 ran alone"),
                    "{note}"
                );
                assert!(note.contains("--force"), "{note}");
            }
        }
    }

    #[test]
    fn the_run_alone_record_clears_on_resync_and_the_boundary_still_counts() {
        let mut w = World::new();
        w.state.gtm = GtmAlone {
            run_alone: true,
            primary_boundary: 40001,
        };
        w.healthy_at(w.t0);
        // healthy_at reports gtm1 attached and not alone: the record clears...
        w.tick(w.t0);
        assert!(!w.state.gtm.run_alone);
        // ...but not while a RUN_ALONE order is in flight.
        let mut w2 = World::new();
        w2.state.gtm.run_alone = true;
        w2.recent = vec![("gtm1".into(), OrderKind::RunAlone)];
        w2.healthy_at(w2.t0);
        w2.tick(w2.t0);
        assert!(w2.state.gtm.run_alone);
        // A standby below the recorded boundary is still not promoted.
        let at = w.at(3100);
        w.report(
            "h2",
            vec![gtm_with_boundary(
                "gtm2",
                MemberRole::Standby,
                ready(),
                4001,
            )],
            at,
        );
        let p = w.tick(at);
        assert!(!has(&p, "gtm2", OrderKind::Promote), "{:?}", p.orders);
        assert!(p.notes[GTM_PAIR].contains("below 40001"), "{:?}", p.notes);
        // One that has it (resynced) is, and the promoted GTM is recorded alone.
        w.report(
            "h2",
            vec![gtm_with_boundary(
                "gtm2",
                MemberRole::Standby,
                ready(),
                42001,
            )],
            at,
        );
        let p = w.tick(at);
        assert!(has(&p, "gtm2", OrderKind::Promote), "{:?}", p.orders);
        assert!(w.state.gtm.run_alone, "a promoted GTM runs alone");
    }

    #[test]
    fn a_silent_agent_is_not_a_dead_primary_while_the_cmserver_sees_it_answer() {
        let mut w = World::new();
        w.healthy_at(w.t0);
        w.tick(w.t0);
        // h1's agent restarts: silent for 6 s, while dn1_h1 and gtm1 answer the
        // CMServer's own probes.
        for ms in (500..=6000).step_by(500) {
            let at = w.at(ms);
            for (name, role) in [
                ("dn1_h1", MemberRole::Primary),
                ("gtm1", MemberRole::Primary),
            ] {
                w.outside.insert(name.into(), SeenFromOutside { at, role });
            }
            w.report(
                "h2",
                vec![
                    gtm("gtm2", MemberRole::Standby, ready()),
                    dn("dn1_h2", MemberRole::Standby),
                ],
                at,
            );
            let p = w.tick(at);
            assert!(p.orders.is_empty(), "{ms} ms: {:?}", p.orders);
            if ms > 3500 {
                assert!(
                    p.notes["dn1"].contains("answers the CMServer itself"),
                    "{:?}",
                    p.notes
                );
            }
        }
        assert_eq!(w.state.term, Term(1));
        // Unreachable from outside too (probes stop succeeding): failed over once
        // the timeout has run from the last answer.
        let at = w.at(9100);
        w.report(
            "h2",
            vec![
                gtm("gtm2", MemberRole::Standby, ready()),
                dn("dn1_h2", MemberRole::Standby),
            ],
            at,
        );
        let p = w.tick(at);
        assert!(has(&p, "dn1_h2", OrderKind::Promote), "{:?}", p.orders);
        assert!(has(&p, "gtm2", OrderKind::Promote), "{:?}", p.orders);
    }

    #[test]
    fn a_gtm_standby_whose_agent_restarts_costs_no_run_alone() {
        let mut w = World::new();
        w.healthy_at(w.t0);
        w.tick(w.t0);
        for ms in (500..=6000).step_by(500) {
            let at = w.at(ms);
            w.outside.insert(
                "gtm2".into(),
                SeenFromOutside {
                    at,
                    role: MemberRole::Standby,
                },
            );
            w.report(
                "h1",
                vec![
                    gtm(
                        "gtm1",
                        MemberRole::Primary,
                        GtmFacts {
                            standby_attached: true,
                            ..Default::default()
                        },
                    ),
                    dn1_primary(),
                ],
                at,
            );
            let p = w.tick(at);
            assert!(
                !has(&p, "gtm1", OrderKind::RunAlone),
                "{ms} ms: {:?}",
                p.orders
            );
        }
    }

    #[test]
    fn a_standby_that_cannot_follow_the_new_timeline_is_rebuilt() {
        let mut w = World::new();
        w.state.set_role("dn1_h1", AssignedRole::Standby).unwrap();
        w.state.set_role("dn1_h2", AssignedRole::Primary).unwrap();
        let primary = |replicas: Vec<ReplicaState>| {
            let mut p = dn("dn1_h2", MemberRole::Primary);
            p.timeline = 2;
            p.replicas = replicas;
            p
        };
        let standby = |tl: u32| {
            let mut s = dn("dn1_h1", MemberRole::Standby);
            s.timeline = tl;
            s
        };
        // Still on timeline 1, not streaming: rebuilt after 4 failover timeouts.
        for ms in (0..=12000u64).step_by(1000) {
            let at = w.at(ms);
            w.report("h2", vec![primary(vec![])], at);
            w.report("h1", vec![standby(1)], at);
            let p = w.tick(at);
            assert_eq!(
                has(&p, "dn1_h1", OrderKind::Rebuild),
                ms == 12000,
                "{ms}: {:?}",
                p.orders
            );
            if ms == 12000 {
                assert!(p.notes["dn1"].contains("cannot follow"), "{:?}", p.notes);
            }
        }
        // Streaming (catching up after a rewind), or on the same timeline: left alone.
        let mut w2 = World::new();
        w2.state = w.state.clone();
        for ms in (0..=20000u64).step_by(1000) {
            let at = w2.at(ms);
            w2.report("h2", vec![primary(vec![sync_row("dn1_h1")])], at);
            w2.report("h1", vec![standby(1)], at);
            assert!(w2.tick(at).orders.is_empty(), "{ms}");
            w2.report("h2", vec![primary(vec![])], at);
            w2.report("h1", vec![standby(2)], at);
            assert!(w2.tick(at).orders.is_empty(), "{ms}");
        }
    }

    #[test]
    fn a_second_gtm_primary_is_demoted() {
        let mut w = World::new();
        w.healthy_at(w.t0);
        w.report("h2", vec![gtm("gtm2", MemberRole::Primary, ready())], w.t0);
        let p = w.tick(w.t0);
        assert!(has(&p, "gtm2", OrderKind::Demote), "{:?}", p.orders);
    }

    #[test]
    fn the_safety_rule_names_the_reason() {
        let cfg = local_config();
        let mut s = ClusterState::initial(&cfg);
        s.set_run(None, true).unwrap();
        let r = dn("dn1_h2", MemberRole::Standby);
        assert!(candidate_problem(&s, Some(&r), "dn1", "dn1_h2")
            .unwrap()
            .contains("not the synchronous standby"));
        s.last_sync_standby.insert("dn1".into(), "dn1_h2".into());
        assert_eq!(candidate_problem(&s, Some(&r), "dn1", "dn1_h2"), None);
        assert!(candidate_problem(&s, None, "dn1", "dn1_h2")
            .unwrap()
            .contains("silent"));
    }
}
