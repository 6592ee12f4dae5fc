//! The primary CMServer's arbitration at run time: every tick it asks
//! [`crate::arbiter::decide`] for a plan, persists the plan's state FIRST, then queues
//! its orders (in the persisted term) for the agents' next Report replies; outcomes
//! come back in agents' reports. Also the shared bookkeeping of operator operations
//! (which group is busy) and the status notes.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ha_common::proto::cm::{ClusterStatus, Order, OrderKind, OrderOutcome};
use ha_common::ClusterConfig;

use crate::arbiter::{self, Memory, GTM_PAIR};
use crate::cadence::{self, FAST_REPORT_MS};
use crate::order_book::OrderBook;
use crate::reports::Reports;
use crate::state::{ClusterState, StateError, StateFile};

/// An order kind is not repeated by the level rules for this long after its outcome.
const ORDER_COOLDOWN: Duration = Duration::from_secs(3);
/// Fast reports are asked for orders issued less than this long ago.
const FAST_REPORT_WINDOW: Duration = Duration::from_secs(30);

#[derive(Debug, Default)]
struct EngineState {
    memory: Memory,
    book: OrderBook,
    notes: BTreeMap<String, String>,
    /// DN groups / the GTM pair with an operator operation running.
    busy: BTreeSet<String>,
    /// The tenure (term won as primary) the memory, orders and notes belong to.
    tenure: u64,
    /// Busy groups the arbiter failed over anyway (their primary was lost): their
    /// operation stops at its next step.
    preempted: BTreeSet<String>,
    /// The CMServer's own latest successful probe of instances whose agent is silent.
    outside: std::collections::HashMap<String, arbiter::SeenFromOutside>,
    /// GTM leases granted in this tenure: instance → when the latest one ends.
    gtm_leases: std::collections::HashMap<String, Instant>,
    /// Hosts asked for fast reports, as of the last tick (see [`crate::cadence`]).
    hurried: std::collections::HashSet<String>,
}

/// Arbitration state shared by the Report handler, the tick and the operations.
#[derive(Debug, Default)]
pub struct Engine {
    inner: Mutex<EngineState>,
}

/// Streams a persisted but not yet installed state to the standby CMServer (bounded).
pub type Replicate<'a> =
    Box<dyn Fn(ClusterState) -> Pin<Box<dyn Future<Output = ()> + Send + 'a>> + Send + Sync + 'a>;

/// What arbitration works on (borrowed from the service).
pub struct Ctx<'a> {
    /// The tenure as primary this context belongs to.
    pub tenure: u64,
    /// Whether this CMServer is still primary in that tenure: checked before every
    /// decision is persisted and while an operation waits, so that nothing decided in
    /// an earlier tenure (or after primacy was lost) is acted on.
    pub still_primary: Box<dyn Fn() -> bool + Send + Sync + 'a>,
    pub cfg: &'a ClusterConfig,
    pub file: &'a StateFile,
    pub state: &'a tokio::sync::Mutex<ClusterState>,
    pub reports: &'a Mutex<Reports>,
    pub engine: &'a Engine,
    /// Streams a new state to the standby CMServer (bounded). Called after the change
    /// is persisted and BEFORE it is installed (with the state lock held), so that no
    /// agent can be told of a change — in an assignment or an order — that the
    /// standby CMServer does not have: a takeover never acts on older roles than an
    /// agent has already seen.
    pub replicate: Replicate<'a>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Marks a group busy while an operation runs; released on drop.
pub struct Busy<'a> {
    engine: &'a Engine,
    key: String,
}

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        let mut st = lock(&self.engine.inner);
        st.busy.remove(&self.key);
        st.preempted.remove(&self.key);
    }
}

impl Engine {
    pub fn new() -> Engine {
        Engine::default()
    }

    /// Starts tenure `tenure` if it is new: timers, orders in flight and notes of an
    /// earlier tenure are forgotten (a CMServer re-elected after a short absence must
    /// give every instance a full timeout of grace again, and not resend orders that
    /// a primary in between may have overtaken). Operations of the earlier tenure
    /// notice by themselves ([`Ctx::still_primary`]) and stop.
    /// Order ids come from the tenure's persisted block (`first_order_id`).
    pub fn enter_tenure(&self, tenure: u64, first_order_id: u64) {
        let mut st = lock(&self.inner);
        if st.tenure != tenure {
            tracing::info!(
                tenure,
                first_order_id,
                "new tenure: arbitration starts afresh"
            );
            st.tenure = tenure;
            st.memory = Memory {
                tenure_started: Some(Instant::now()),
                ..Memory::default()
            };
            st.gtm_leases.clear();
            st.hurried.clear();
            st.book = OrderBook::starting_at(first_order_id);
            st.notes.clear();
        }
    }

    /// The GTM lease for GTM `instance`, which asked for it (RenewGtmLease, see
    /// `gtm_lease.rs`): how long from now. Recorded, so that neither the arbiter nor
    /// an operation promotes another GTM before it ends. Call under the state lock (a
    /// tick holds it from its decision until the new roles are installed). The
    /// healthy observation is the arbiter's, or the CMServer's own probe of the GTM as
    /// primary while its agent is silent (restarting): the lease then runs on.
    pub fn grant_gtm_lease(
        &self,
        cfg: &ClusterConfig,
        state: &ClusterState,
        instance: &str,
    ) -> Result<Duration, String> {
        let now = Instant::now();
        let mut st = lock(&self.inner);
        let seen = st.memory.healthy_at.get(instance).copied();
        let outside = st
            .outside
            .get(instance)
            .filter(|o| {
                o.role == ha_common::proto::cm::MemberRole::Primary
                    && now.saturating_duration_since(o.at) < cfg.timing.agent_timeout()
            })
            .map(|o| o.at);
        let healthy = seen.max(outside);
        let (left, end) = crate::gtm_lease::grant(cfg, state, instance, |_| healthy, now)?;
        let e = st.gtm_leases.entry(instance.to_owned()).or_insert(end);
        *e = (*e).max(end);
        Ok(left)
    }

    /// When the last GTM lease granted to `instance` in this tenure ends; a new tenure
    /// counts an earlier primary's as ending `gtm_failover_timeout` after it began
    /// (only with `gtm.require_lease`: without it no GTM holds a lease).
    pub fn gtm_lease_end(&self, cfg: &ClusterConfig, instance: &str) -> Option<Instant> {
        let st = lock(&self.inner);
        let earlier = st
            .memory
            .tenure_started
            .filter(|_| cfg.gtm.require_lease)
            .map(|t| t + cfg.timing.gtm_failover_timeout());
        [st.gtm_leases.get(instance).copied(), earlier]
            .into_iter()
            .flatten()
            .max()
    }

    /// Stops sending order `id` (see [`OrderBook::withdraw`]).
    pub fn withdraw(&self, id: u64) {
        lock(&self.inner).book.withdraw(id);
    }

    /// Outcomes from an agent's report.
    pub fn on_outcomes(&self, outcomes: &[OrderOutcome]) {
        if !outcomes.is_empty() {
            lock(&self.inner).book.record(outcomes, Instant::now());
        }
    }

    /// Orders to put in the Report reply to `host`.
    pub fn orders_for(&self, host: &str) -> Vec<Order> {
        lock(&self.inner).book.for_host(host)
    }

    /// `next_report_ms` for the Report reply to `host`: fast for the hosts the last
    /// tick hurried (see [`crate::cadence`]) and for a host with an order in flight
    /// (issued since that tick), else 0 (every heartbeat).
    pub fn next_report_ms(&self, host: &str) -> u32 {
        let st = lock(&self.inner);
        if st.hurried.contains(host)
            || st
                .book
                .has_fresh_pending_for(host, Instant::now(), FAST_REPORT_WINDOW)
        {
            FAST_REPORT_MS
        } else {
            0
        }
    }

    /// Queues an order for the agent of `host`; returns its id.
    /// Moves the pending orders into a new term (see [`OrderBook::restamp`]).
    pub fn restamp(&self, term: u64) {
        lock(&self.inner).book.restamp(term);
    }

    pub fn issue(&self, host: &str, order: Order) -> u64 {
        lock(&self.inner).book.issue(host, order, Instant::now())
    }

    pub fn outcome(&self, id: u64) -> Option<OrderOutcome> {
        lock(&self.inner).book.outcome(id)
    }

    /// The CMServer itself saw `name` answer as `role` at `at` (its agent is silent).
    pub fn saw_from_outside(
        &self,
        name: &str,
        role: ha_common::proto::cm::MemberRole,
        at: Instant,
    ) {
        lock(&self.inner)
            .outside
            .insert(name.to_owned(), arbiter::SeenFromOutside { at, role });
    }

    /// Records that the arbiter failed busy group `key` over.
    pub fn mark_preempted(&self, key: &str) {
        lock(&self.inner).preempted.insert(key.to_owned());
    }

    /// Whether the arbiter failed `key` over while its operation ran.
    pub fn is_preempted(&self, key: &str) -> bool {
        lock(&self.inner).preempted.contains(key)
    }

    /// Marks `key` (a DN group name or `GTM_PAIR`) busy; Err if it already is.
    pub fn begin(&self, key: &str) -> Result<Busy<'_>, String> {
        let mut st = lock(&self.inner);
        if !st.busy.insert(key.to_owned()) {
            return Err(format!("another operation on {key} is running"));
        }
        st.preempted.remove(key);
        Ok(Busy {
            engine: self,
            key: key.to_owned(),
        })
    }

    /// Sets a status note (operations report progress/failure there).
    pub fn note(&self, key: &str, text: String) {
        lock(&self.inner).notes.insert(key.to_owned(), text);
    }

    /// Adds the arbiter's notes to a status: DN group details and the GTM primary's
    /// row (degraded while running alone). CN rows: [`crate::ddl_set::annotate`].
    pub fn annotate(&self, status: &mut ClusterStatus) {
        let notes = lock(&self.inner).notes.clone();
        for g in &mut status.dn_groups {
            if let Some(n) = notes.get(&g.name) {
                append(&mut g.detail, n);
            }
        }
        if let Some(n) = notes.get(GTM_PAIR) {
            if let Some(row) = status.gtm.iter_mut().find(|r| r.role == "primary") {
                if n.starts_with("degraded") && row.state == crate::status::states::NORMAL {
                    row.state = crate::status::states::DEGRADED.into();
                }
                append(&mut row.detail, n);
            }
        }
    }
}

fn append(detail: &mut String, note: &str) {
    if detail.contains(note) {
        return;
    }
    if !detail.is_empty() {
        detail.push_str("; ");
    }
    detail.push_str(note);
}

/// Persists `state` (durable when this returns).
pub async fn persist(file: &StateFile, state: &ClusterState) -> Result<(), StateError> {
    let file = file.clone();
    let to_write = state.clone();
    tokio::task::spawn_blocking(move || file.persist(&to_write))
        .await
        .map_err(|e| StateError::Write {
            path: std::path::PathBuf::from("<persist task>"),
            source: std::io::Error::other(e.to_string()),
        })?
}

/// The host whose agent runs `instance`.
pub fn host_of<'a>(cfg: &'a ClusterConfig, instance: &str) -> Option<&'a str> {
    cfg.find(instance).map(|r| r.instance.host.as_str())
}

/// An order of `kind` for `instance` in `term` (id assigned when issued).
pub fn order(term: u64, instance: &str, kind: OrderKind) -> Order {
    Order {
        id: 0,
        term,
        instance: instance.to_owned(),
        kind: kind as i32,
        ..Order::default()
    }
}

/// One arbitration round (call on the primary only).
pub async fn tick(cx: &Ctx<'_>) {
    let now = Instant::now();
    let mut state = cx.state.lock().await;
    cx.engine.enter_tenure(cx.tenure, state.order_id_base);
    let reports = lock(cx.reports).clone();
    let (memory, busy, recent, outside, gtm_leases) = {
        let mut st = lock(&cx.engine.inner);
        st.book.expire(now);
        (
            st.memory.clone(),
            st.busy.clone(),
            st.book.recent(now, ORDER_COOLDOWN),
            st.outside.clone(),
            st.gtm_leases.clone(),
        )
    };
    let plan = arbiter::decide(&arbiter::Input {
        cfg: cx.cfg,
        state: &state,
        reports: &reports,
        now,
        memory: &memory,
        busy: &busy,
        recent: &recent,
        outside: &outside,
        gtm_leases: &gtm_leases,
    });
    let ordered = lock(&cx.engine.inner)
        .book
        .freshly_ordered(now, FAST_REPORT_WINDOW);
    let hurried = cadence::hurried_hosts(&cadence::Input {
        cfg: cx.cfg,
        state: &state,
        reports: &reports,
        busy: &busy,
        ordered: &ordered,
        now,
    });
    {
        let mut st = lock(&cx.engine.inner);
        st.hurried = hurried;
        st.memory = plan.memory;
        // Notes of busy groups belong to their operation.
        let kept: BTreeMap<String, String> = st
            .notes
            .iter()
            .filter(|(k, _)| busy.contains(*k))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        st.notes = plan.notes;
        st.notes.extend(kept);
    }
    if !(cx.still_primary)() {
        // Primacy lost while deciding: a deposed CMServer decides nothing.
        return;
    }
    if !plan.preempted.is_empty() {
        // Under the state lock: an operation's next role change sees it first.
        tracing::warn!(groups = ?plan.preempted, "a lost primary preempts the running operation");
        for g in &plan.preempted {
            cx.engine.mark_preempted(g);
        }
    }
    let mut term = state.term.0;
    if let Some(mut next) = plan.state {
        next.version = state.version + 1;
        for c in plan.role_changes {
            next.record_role_change(c);
        }
        if let Err(e) = persist(cx.file, &next).await {
            // Nothing is ordered from a decision that is not durable.
            tracing::error!("cannot persist the arbiter's decision: {e}");
            return;
        }
        if next.term != state.term {
            tracing::warn!(
                from = state.term.0,
                to = next.term.0,
                "new term: roles changed"
            );
        }
        term = next.term.0;
        (cx.replicate)(next.clone()).await;
        // Still under the state lock: no reply has carried the new term yet.
        cx.engine.restamp(term);
        *state = next;
        drop(state);
    } else {
        drop(state);
    }
    for o in plan.orders {
        let Some(host) = host_of(cx.cfg, &o.instance) else {
            continue;
        };
        let mut order = order(term, &o.instance, o.kind);
        order.run_alone = o.run_alone;
        cx.engine.issue(host, order);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ha_common::proto::cm::{DnGroupStatus, InstanceStatus};

    #[test]
    fn notes_reach_the_status_and_busy_groups_are_exclusive() {
        let e = Engine::new();
        e.note("dn1", "primary dn1_h1 lost 12 s; no failover: x".into());
        e.note(
            GTM_PAIR,
            "degraded: gtm1 runs alone (standby gtm2 lost)".into(),
        );
        let mut s = ClusterStatus {
            dn_groups: vec![DnGroupStatus {
                name: "dn1".into(),
                detail: "primary dn1_h1 is unknown".into(),
                ..Default::default()
            }],
            gtm: vec![InstanceStatus {
                name: "gtm1".into(),
                role: "primary".into(),
                state: "normal".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        e.annotate(&mut s);
        assert!(s.dn_groups[0].detail.ends_with("no failover: x"));
        assert_eq!(s.gtm[0].state, "degraded");
        // A new tenure forgets the earlier one's orders, timers and notes.
        let id = e.issue("h2", order(3, "dn1_h2", OrderKind::Promote));
        assert_eq!(e.orders_for("h2").len(), 1);
        lock(&e.inner)
            .memory
            .healthy_at
            .insert("dn1_h1".into(), Instant::now());
        e.enter_tenure(5, id + 1000);
        assert!(e.orders_for("h2").is_empty() && e.outcome(id).is_none());
        assert!(lock(&e.inner).memory.healthy_at.is_empty());
        assert!(lock(&e.inner).notes.is_empty());
        let next = e.issue("h2", order(5, "dn1_h2", OrderKind::Promote));
        assert_eq!(next, id + 1000, "order ids come from the tenure's block");
        e.enter_tenure(5, 1);
        assert_eq!(e.orders_for("h2").len(), 1, "same tenure: kept");
        let b = e.begin("dn1").unwrap();
        assert!(e.begin("dn1").is_err());
        assert_eq!(
            e.next_report_ms("h2"),
            FAST_REPORT_MS,
            "h2 has an order in flight"
        );
        assert_eq!(e.next_report_ms("h3"), 0);
        drop(b);
        assert!(e.begin("dn1").is_ok());
    }

    fn running_local() -> (ClusterConfig, ClusterState) {
        let cfg = crate::state::tests::local_config();
        let mut state = ClusterState::initial(&cfg);
        state.set_run(None, true).unwrap();
        (cfg, state)
    }

    #[test]
    fn a_gtm_whose_agent_is_silent_keeps_its_lease_from_the_cmservers_own_probe() {
        let (cfg, state) = running_local();
        let e = Engine::new();
        e.enter_tenure(2, 1);
        assert!(
            e.grant_gtm_lease(&cfg, &state, "gtm1").is_err(),
            "never seen"
        );
        let long_ago = Instant::now() - Duration::from_millis(2900);
        lock(&e.inner)
            .memory
            .healthy_at
            .insert("gtm1".into(), long_ago);
        assert!(e.grant_gtm_lease(&cfg, &state, "gtm1").is_err(), "too old");
        // The CMServer's own probe answered as primary just now: a full lease.
        e.saw_from_outside(
            "gtm1",
            ha_common::proto::cm::MemberRole::Primary,
            Instant::now(),
        );
        let left = e.grant_gtm_lease(&cfg, &state, "gtm1").expect("a lease");
        assert!(left > Duration::from_millis(2500), "{left:?}");
        // Recorded: the arbiter and operations wait for it.
        let end = e.gtm_lease_end(&cfg, "gtm1").unwrap();
        assert!(end >= Instant::now() + Duration::from_millis(2500));
        // As a standby it gives nothing.
        e.saw_from_outside(
            "gtm2",
            ha_common::proto::cm::MemberRole::Standby,
            Instant::now(),
        );
        assert!(e.grant_gtm_lease(&cfg, &state, "gtm2").is_err());
    }

    #[test]
    fn the_wait_for_an_earlier_tenures_gtm_lease_only_with_require_lease() {
        let (mut cfg, _) = running_local();
        let e = Engine::new();
        e.enter_tenure(2, 1);
        let end = e.gtm_lease_end(&cfg, "gtm1").expect("the earlier tenure's");
        assert!(end > Instant::now() + Duration::from_millis(2500));
        cfg.gtm.require_lease = false;
        assert_eq!(e.gtm_lease_end(&cfg, "gtm1"), None, "no lease, no wait");
    }
}
