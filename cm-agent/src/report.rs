//! The heartbeat to the CMServers: every interval the agent sends one report (every
//! instance's latest observation, the outcomes of finished orders and the lease it
//! grants, see `lease.rs`) to every configured CMServer. Every CMServer answers; only
//! the one acting as primary (`ReportReply.primary`) sends assignments and orders, and
//! only those are applied. Any reply may ask for this agent's lease. Replies and
//! orders from a term lower than the highest seen (including the term of a lease this
//! agent granted) are ignored or rejected, so a deposed primary is not obeyed.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ha_common::config::ClusterConfig;
use ha_common::proto::cm::cm_server_client::CmServerClient;
use ha_common::proto::cm::{AgentReport, Order, OrderOutcome, ReportReply};
use ha_common::Term;
use tokio::sync::{mpsc, watch};
use tonic::transport::Channel;

use crate::error::{AgentError, Result};
use crate::lease::{Decision, LeaseRecord, LeaseState};
use crate::supervisor::{Desired, Observation};

/// How many finished orders are remembered (so that a resent order is not run twice).
const REMEMBERED_ORDERS: usize = 1024;

/// The report loop's side of one supervisor task.
pub struct InstanceHandle {
    pub name: String,
    pub desired: watch::Sender<Option<Desired>>,
    pub orders: mpsc::Sender<Order>,
    pub report: watch::Receiver<Observation>,
}

/// What one reply asks of this agent, after term checks.
#[derive(Debug, Default, PartialEq)]
pub struct ReplyPlan {
    pub assignments: Vec<Desired>,
    /// Orders to hand to their instance's supervisor.
    pub orders: Vec<Order>,
    /// Orders refused here (stale term, unknown instance), with their outcome.
    pub refused: Vec<OrderOutcome>,
}

/// The agent's memory between heartbeats: the highest CMServer term seen, order
/// outcomes not yet delivered, and which orders were already taken.
#[derive(Debug, Default)]
pub struct ReportState {
    pub term: Term,
    pub pending: Vec<OrderOutcome>,
    /// Order id -> its outcome once finished (None while it runs).
    orders: BTreeMap<u64, Option<OrderOutcome>>,
}

impl ReportState {
    /// Records a finished order's outcome for the next report.
    pub fn finished(&mut self, outcome: OrderOutcome) {
        self.orders.insert(outcome.order_id, Some(outcome.clone()));
        self.pending.push(outcome);
        while self.orders.len() > REMEMBERED_ORDERS {
            self.orders.pop_first();
        }
    }

    /// Decides what to do with a reply. A reply from an older term is ignored as a
    /// whole; a newer one raises the remembered term.
    pub fn plan(&mut self, reply: &ReportReply, local: &dyn Fn(&str) -> bool) -> Option<ReplyPlan> {
        let reply_term = Term(reply.term);
        if !self.term.accepts(reply_term) {
            tracing::debug!(
                reply = reply.term,
                mine = self.term.0,
                "ignoring a reply from an older term"
            );
            return None;
        }
        if reply_term > self.term {
            tracing::info!(from = self.term.0, to = reply.term, "new CMServer term");
            self.term = reply_term;
        }
        let mut plan = ReplyPlan::default();
        for a in &reply.assignments {
            if local(&a.instance) {
                plan.assignments.push(Desired {
                    term: reply.term,
                    assignment: a.clone(),
                });
            }
        }
        for o in &reply.orders {
            let refuse = |message: String| OrderOutcome {
                order_id: o.id,
                ok: false,
                message,
                lsn: 0,
                ..OrderOutcome::default()
            };
            if !self.term.accepts(Term(o.term)) {
                plan.refused.push(refuse(format!(
                    "order {} has term {}, older than term {}: rejected",
                    o.id, o.term, self.term
                )));
                continue;
            }
            if !local(&o.instance) {
                plan.refused.push(refuse(format!(
                    "instance {:?} is not on this host",
                    o.instance
                )));
                continue;
            }
            match self.orders.get(&o.id) {
                // Already done: its outcome may not have reached the primary; send again.
                Some(Some(outcome)) => {
                    if !self.pending.iter().any(|p| p.order_id == o.id) {
                        self.pending.push(outcome.clone());
                    }
                }
                Some(None) => {} // still running
                None => {
                    self.orders.insert(o.id, None);
                    plan.orders.push(o.clone());
                }
            }
        }
        Some(plan)
    }
}

/// Sends reports to every CMServer and applies the primary's replies.
pub struct Reporter {
    host: String,
    servers: Vec<(String, CmServerClient<Channel>)>,
    pub state: ReportState,
    pub lease: LeaseState,
    /// Where the lease record is kept (see `lease.rs`: saved before a grant is reported).
    lease_file: std::path::PathBuf,
    /// Set when this agent granted a new lease: report again at once, so that an
    /// election takes about one round trip instead of a heartbeat.
    prompt: bool,
    /// The primary asked for the next report sooner than a heartbeat (orders in flight).
    pub next_report: Option<Duration>,
    /// Per CMServer: gave no answer at all to its last report (cut off or dead). The
    /// cycle does not wait for a silent one (its report goes out in the background
    /// and clears the flag when answered) and a prompt report skips it, so that an
    /// unreachable CMServer does not delay a lease grant to the other by its RPC
    /// timeout.
    silent: Arc<Vec<AtomicBool>>,
}

/// The agent's lease record: one per host (several hosts' agents may share a base dir
/// in a local cluster).
pub fn lease_file(cfg: &ClusterConfig, host: &str) -> std::path::PathBuf {
    cfg.cluster.base_dir.join(format!("cm_agent-{host}.lease"))
}

impl Reporter {
    pub fn new(cfg: &ClusterConfig, host: &str, timeout: Duration) -> Result<Reporter> {
        let lease_file = lease_file(cfg, host);
        let record = LeaseRecord::load(&lease_file).unwrap_or_else(|e| {
            // The safe default: the startup grace for everybody, as with no record.
            tracing::warn!("{e}; granting no lease for cm_lease after start");
            None
        });
        let lease = match record {
            Some(record) => {
                tracing::info!(holder = %record.holder, term = record.granted_term,
                    "lease record found: the last holder may renew at once");
                LeaseState::restored(Instant::now(), cfg.timing.cm_lease(), record)
            }
            None => LeaseState::new(Instant::now(), cfg.timing.cm_lease()),
        };
        let mut servers = Vec::new();
        for ep in cfg.cm_server_endpoints() {
            let channel =
                ha_common::tls::endpoint(&ep, ha_common::tls::CertRole::CmServer, timeout)
                    .map_err(|e| AgentError::Instance(format!("CMServer endpoint {ep}: {e}")))?
                    .timeout(timeout)
                    .connect_lazy();
            servers.push((ep, CmServerClient::new(channel)));
        }
        let silent = Arc::new(servers.iter().map(|_| AtomicBool::new(false)).collect());
        Ok(Reporter {
            host: host.to_owned(),
            servers,
            state: ReportState::default(),
            lease,
            lease_file,
            prompt: false,
            next_report: None,
            silent,
        })
    }

    /// A report sent right after a grant (see `take_prompt`): only to the CMServers
    /// that answered the last one.
    pub async fn prompt_cycle(
        &mut self,
        instances: &[InstanceHandle],
        outcomes: &mut mpsc::UnboundedReceiver<OrderOutcome>,
    ) -> bool {
        self.cycle_to(instances, outcomes, true).await
    }

    /// Whether the next report should go out now rather than at the next tick.
    pub fn take_prompt(&mut self) -> bool {
        std::mem::take(&mut self.prompt)
    }

    /// One heartbeat. Returns whether some CMServer accepted the report.
    pub async fn cycle(
        &mut self,
        instances: &[InstanceHandle],
        outcomes: &mut mpsc::UnboundedReceiver<OrderOutcome>,
    ) -> bool {
        self.cycle_to(instances, outcomes, false).await
    }

    async fn cycle_to(
        &mut self,
        instances: &[InstanceHandle],
        outcomes: &mut mpsc::UnboundedReceiver<OrderOutcome>,
        skip_silent: bool,
    ) -> bool {
        while let Ok(o) = outcomes.try_recv() {
            self.state.finished(o);
        }
        let now = Instant::now();
        // A grant is on disk before any CMServer can count it (see `lease.rs`).
        let lease = match self.lease.unsaved() {
            None => self.lease.to_proto(now),
            Some(record) => match record.save(&self.lease_file) {
                Ok(()) => {
                    self.lease.saved(record);
                    self.lease.to_proto(now)
                }
                Err(e) => {
                    tracing::error!("{e}: the lease grant is not reported until it is saved");
                    Default::default()
                }
            },
        };
        let report = AgentReport {
            host: self.host.clone(),
            term: self.state.term.0.max(self.lease.highest()),
            instances: instances
                .iter()
                .map(|h| h.report.borrow().to_send(now))
                .collect(),
            outcomes: self.state.pending.clone(),
            lease: Some(lease),
            state_version: self.lease.newest_version(),
        };
        let was_silent: Vec<bool> = self
            .silent
            .iter()
            .map(|f| f.load(Ordering::Relaxed))
            .collect();
        let (awaited, background) = report_targets(&was_silent, skip_silent);
        for i in background {
            let mut client = self.servers[i].1.clone();
            let (req, silent) = (report.clone(), self.silent.clone());
            tokio::spawn(async move {
                let r = client.report(req).await;
                silent[i].store(no_answer(&r), Ordering::Relaxed);
            });
        }
        let calls = awaited.iter().map(|&i| {
            let (ep, client) = &self.servers[i];
            let mut client = client.clone();
            let req = report.clone();
            async move { (i, ep.clone(), client.report(req).await) }
        });
        let results = futures::future::join_all(calls).await;
        let mut replies = Vec::new();
        for (i, ep, r) in results {
            self.silent[i].store(no_answer(&r), Ordering::Relaxed);
            match r {
                Ok(reply) => replies.push(reply.into_inner()),
                Err(status) => {
                    tracing::debug!(server = %ep, "report not taken: {}", status.message())
                }
            }
        }
        let taken = !replies.is_empty();
        let (best, granted) =
            absorb_replies(&mut self.state, &mut self.lease, replies, Instant::now());
        self.prompt |= granted;
        let Some(reply) = best else {
            return taken;
        };
        self.next_report = (reply.next_report_ms > 0)
            .then(|| Duration::from_millis(u64::from(reply.next_report_ms)));
        // Delivered: drop the outcomes that were in this report.
        let sent: Vec<u64> = report.outcomes.iter().map(|o| o.order_id).collect();
        self.state.pending.retain(|o| !sent.contains(&o.order_id));

        let by_name: HashMap<&str, &InstanceHandle> =
            instances.iter().map(|h| (h.name.as_str(), h)).collect();
        let local = |n: &str| by_name.contains_key(n);
        let plan = self.state.plan(&reply, &local);
        self.lease.observe(self.state.term.0);
        let Some(plan) = plan else {
            return true;
        };
        for d in plan.assignments {
            if let Some(h) = by_name.get(d.assignment.instance.as_str()) {
                h.desired.send_if_modified(|cur| {
                    if cur.as_ref() == Some(&d) {
                        false
                    } else {
                        *cur = Some(d.clone());
                        true
                    }
                });
            }
        }
        for o in plan.orders {
            if let Some(h) = by_name.get(o.instance.as_str()) {
                if let Err(e) = h.orders.try_send(o.clone()) {
                    self.state.finished(OrderOutcome {
                        order_id: o.id,
                        ok: false,
                        message: format!("{}: too many orders queued ({e})", o.instance),
                        lsn: 0,
                        ..OrderOutcome::default()
                    });
                }
            }
        }
        for r in plan.refused {
            tracing::warn!(order = r.order_id, "{}", r.message);
            self.state.finished(r);
        }
        true
    }
}

/// Which CMServers (by index; `silent` per CMServer) a report waits for, and which get
/// it in the background without being waited for: the silent ones, unless every one
/// is silent; a prompt report does not go to the silent ones at all.
fn report_targets(silent: &[bool], prompt: bool) -> (Vec<usize>, Vec<usize>) {
    let all: Vec<usize> = (0..silent.len()).collect();
    let (answering, quiet): (Vec<usize>, Vec<usize>) = all.iter().partition(|&&i| !silent[i]);
    if answering.is_empty() {
        return (all, Vec::new());
    }
    if prompt {
        (answering, Vec::new())
    } else {
        (answering, quiet)
    }
}

/// Whether a report got no answer at all (refused, unreachable, timed out), as
/// opposed to a reply or a refusal.
fn no_answer<T>(r: &Result<T, tonic::Status>) -> bool {
    matches!(r, Err(s) if matches!(s.code(), tonic::Code::Unavailable
        | tonic::Code::Cancelled
        | tonic::Code::DeadlineExceeded))
}

/// Takes every CMServer's reply to one report: first every lease request (a lease
/// granted in a term raises the agent's term, so a deposed primary's replies are too
/// old from then on), then picks the reply to apply: the highest-term one from a
/// CMServer acting as primary (`ReportState::plan` still checks its term). Returns it
/// and whether a new lease was granted.
pub fn absorb_replies(
    state: &mut ReportState,
    lease: &mut LeaseState,
    replies: Vec<ReportReply>,
    now: Instant,
) -> (Option<ReportReply>, bool) {
    let mut granted = false;
    let mut best: Option<ReportReply> = None;
    // The primary's state version first: a stale CMServer's request in the same round
    // is then refused (the up-to-date rule, see `lease.rs`).
    for reply in &replies {
        if reply.primary && reply.term >= state.term.0.max(lease.highest()) {
            lease.observe_version(reply.state_version);
        }
    }
    for reply in replies {
        if reply.lease_request_term > 0 {
            let (from, term) = (&reply.from, reply.lease_request_term);
            match lease.request_versioned(
                from,
                term,
                reply.lease_request_id,
                reply.state_version,
                now,
            ) {
                Decision::Granted => {
                    tracing::info!(holder = %from, term, "CMServer lease granted");
                    granted = true;
                }
                Decision::Renewed => {}
                Decision::Refused(why) => {
                    tracing::debug!(%from, term, "lease refused: {why}")
                }
            }
        }
        if reply.primary && best.as_ref().is_none_or(|b| reply.term > b.term) {
            best = Some(reply);
        }
    }
    state.term = state.term.max(Term(lease.highest()));
    (best, granted)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_silent_cmserver_is_not_waited_for() {
        let none: Vec<usize> = Vec::new();
        assert_eq!(
            report_targets(&[false, false], false),
            (vec![0, 1], none.clone())
        );
        assert_eq!(report_targets(&[true, false], false), (vec![1], vec![0]));
        assert_eq!(
            report_targets(&[true, false], true),
            (vec![1], none.clone())
        );
        assert_eq!(
            report_targets(&[false, false], true),
            (vec![0, 1], none.clone())
        );
        // Nobody answered: wait for everyone rather than no one.
        assert_eq!(
            report_targets(&[true, true], true),
            (vec![0, 1], none.clone())
        );
        assert_eq!(report_targets(&[true, true], false), (vec![0, 1], none));
    }

    #[test]
    fn only_transport_failures_count_as_no_answer() {
        assert!(no_answer::<()>(&Err(tonic::Status::unavailable("refused"))));
        assert!(no_answer::<()>(&Err(tonic::Status::cancelled("timeout"))));
        assert!(!no_answer::<()>(&Err(tonic::Status::failed_precondition(
            "not primary"
        ))));
        assert!(!no_answer(&Ok(())));
    }
    use ha_common::proto::cm::{Assignment, OrderKind};

    fn order(id: u64, term: u64, instance: &str) -> Order {
        Order {
            id,
            term,
            instance: instance.into(),
            kind: OrderKind::Start as i32,
            ..Order::default()
        }
    }

    fn reply(term: u64, orders: Vec<Order>) -> ReportReply {
        ReportReply {
            term,
            assignments: vec![
                Assignment {
                    instance: "dn1_h1".into(),
                    run: true,
                    ..Assignment::default()
                },
                Assignment {
                    instance: "elsewhere".into(),
                    run: true,
                    ..Assignment::default()
                },
            ],
            orders,
            ..ReportReply::default()
        }
    }

    fn local(n: &str) -> bool {
        n == "dn1_h1"
    }

    #[test]
    fn only_the_primarys_reply_is_applied_and_a_deposed_primary_is_ignored() {
        let t0 = Instant::now();
        let lease_time = Duration::from_secs(3);
        let mut state = ReportState::default();
        let mut lease = LeaseState::new(t0, lease_time);
        let t = t0 + lease_time; // past the startup grace
        let from = |name: &str, term: u64, primary: bool, ask: u64| ReportReply {
            from: name.into(),
            primary,
            lease_request_term: ask,
            lease_request_id: 1,
            ..reply(term, vec![order(term, term, "dn1_h1")])
        };
        // cms1 primary in term 2; cms2 answers too, without assignments.
        let standby = ReportReply {
            from: "cms2".into(),
            term: 2,
            ..ReportReply::default()
        };
        let (best, granted) = absorb_replies(
            &mut state,
            &mut lease,
            vec![standby.clone(), from("cms1", 2, true, 2)],
            t,
        );
        assert!(granted);
        assert_eq!(best.unwrap().from, "cms1");
        assert_eq!(lease.current(t).unwrap().holder, "cms1");
        // cms2 campaigns in term 3 while cms1's lease runs: refused.
        let t1 = t + Duration::from_secs(1);
        let (best, granted) =
            absorb_replies(&mut state, &mut lease, vec![from("cms2", 2, false, 3)], t1);
        assert!(
            best.is_none() && !granted,
            "a non-primary's reply is not applied"
        );
        // cms1 falls silent; its lease lapses; cms2 wins term 3.
        let t2 = t + lease_time;
        let (_, granted) =
            absorb_replies(&mut state, &mut lease, vec![from("cms2", 2, false, 3)], t2);
        assert!(granted);
        assert_eq!(state.term, Term(3));
        // A late reply of the deposed cms1 (term 2, still claiming primary) is too old.
        let (best, _) = absorb_replies(&mut state, &mut lease, vec![from("cms1", 2, true, 2)], t2);
        assert!(
            state.plan(&best.unwrap(), &local).is_none(),
            "ignored as a whole"
        );
        assert_eq!(
            lease.current(t2).unwrap().holder,
            "cms2",
            "and no lease for it"
        );
        let (best, _) = absorb_replies(&mut state, &mut lease, vec![from("cms2", 3, true, 3)], t2);
        let plan = state.plan(&best.unwrap(), &local).unwrap();
        assert_eq!(plan.orders.len(), 1, "the new primary's orders run");
    }

    #[test]
    fn older_replies_are_ignored_and_terms_only_grow() {
        let mut s = ReportState::default();
        let plan = s.plan(&reply(5, vec![]), &local).unwrap();
        assert_eq!(s.term, Term(5));
        assert_eq!(plan.assignments.len(), 1, "only local instances");
        assert_eq!(plan.assignments[0].term, 5);
        assert!(s.plan(&reply(4, vec![]), &local).is_none());
        assert_eq!(s.term, Term(5));
        assert!(s.plan(&reply(5, vec![]), &local).is_some());
    }

    #[test]
    fn stale_and_foreign_orders_are_refused() {
        let mut s = ReportState::default();
        let plan = s
            .plan(
                &reply(
                    7,
                    vec![
                        order(1, 6, "dn1_h1"),
                        order(2, 7, "gone"),
                        order(3, 7, "dn1_h1"),
                    ],
                ),
                &local,
            )
            .unwrap();
        assert_eq!(plan.orders, vec![order(3, 7, "dn1_h1")]);
        assert_eq!(plan.refused.len(), 2);
        assert!(
            plan.refused[0].message.contains("older than term 7"),
            "{:?}",
            plan.refused
        );
        assert!(plan.refused.iter().all(|o| !o.ok));
    }

    #[test]
    fn a_resent_order_runs_once_and_its_outcome_is_sent_again() {
        let mut s = ReportState::default();
        let p = s
            .plan(&reply(1, vec![order(9, 1, "dn1_h1")]), &local)
            .unwrap();
        assert_eq!(p.orders.len(), 1);
        let p = s
            .plan(&reply(1, vec![order(9, 1, "dn1_h1")]), &local)
            .unwrap();
        assert!(p.orders.is_empty(), "still running: not again");
        s.finished(OrderOutcome {
            order_id: 9,
            ok: true,
            message: "done".into(),
            lsn: 0,
            ..OrderOutcome::default()
        });
        s.pending.clear(); // delivered once
        let p = s
            .plan(&reply(1, vec![order(9, 1, "dn1_h1")]), &local)
            .unwrap();
        assert!(p.orders.is_empty());
        assert_eq!(s.pending.len(), 1, "outcome re-sent");
    }
}
