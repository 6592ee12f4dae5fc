//! The heartbeat to the CMServers: every interval the agent sends one report (every
//! instance's latest observation plus the outcomes of finished orders) to every
//! configured CMServer. Only the primary answers with assignments and orders; the
//! others answer an error, which is ignored. Replies and orders from a term lower
//! than the highest seen are ignored or rejected.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use ha_common::config::ClusterConfig;
use ha_common::proto::cm::cm_server_client::CmServerClient;
use ha_common::proto::cm::{AgentReport, InstanceReport, Order, OrderOutcome, ReportReply};
use ha_common::Term;
use tokio::sync::{mpsc, watch};
use tonic::transport::{Channel, Endpoint};

use crate::error::{AgentError, Result};
use crate::supervisor::Desired;

/// How many finished orders are remembered (so that a resent order is not run twice).
const REMEMBERED_ORDERS: usize = 1024;

/// The report loop's side of one supervisor task.
pub struct InstanceHandle {
    pub name: String,
    pub desired: watch::Sender<Option<Desired>>,
    pub orders: mpsc::Sender<Order>,
    pub report: watch::Receiver<InstanceReport>,
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
}

impl Reporter {
    pub fn new(cfg: &ClusterConfig, host: &str, timeout: Duration) -> Result<Reporter> {
        let mut servers = Vec::new();
        for ep in cfg.cm_server_endpoints() {
            let channel = Endpoint::from_shared(format!("http://{ep}"))
                .map_err(|e| AgentError::Instance(format!("CMServer endpoint {ep}: {e}")))?
                .connect_timeout(timeout)
                .timeout(timeout)
                .connect_lazy();
            servers.push((ep, CmServerClient::new(channel)));
        }
        Ok(Reporter {
            host: host.to_owned(),
            servers,
            state: ReportState::default(),
        })
    }

    /// One heartbeat. Returns whether some CMServer accepted the report.
    pub async fn cycle(
        &mut self,
        instances: &[InstanceHandle],
        outcomes: &mut mpsc::UnboundedReceiver<OrderOutcome>,
    ) -> bool {
        while let Ok(o) = outcomes.try_recv() {
            self.state.finished(o);
        }
        let report = AgentReport {
            host: self.host.clone(),
            term: self.state.term.0,
            instances: instances
                .iter()
                .map(|h| h.report.borrow().clone())
                .collect(),
            outcomes: self.state.pending.clone(),
            // Filled in by the CMServer-pair lease (next change).
            lease: None,
        };
        let calls = self.servers.iter().map(|(ep, client)| {
            let mut client = client.clone();
            let req = report.clone();
            async move { (ep.clone(), client.report(req).await) }
        });
        let results = futures::future::join_all(calls).await;
        let mut best: Option<ReportReply> = None;
        for (ep, r) in results {
            match r {
                Ok(reply) => {
                    let reply = reply.into_inner();
                    if best.as_ref().is_none_or(|b| reply.term > b.term) {
                        best = Some(reply);
                    }
                }
                Err(status) => {
                    tracing::debug!(server = %ep, "report not taken: {}", status.message())
                }
            }
        }
        let Some(reply) = best else {
            return false;
        };
        // Delivered: drop the outcomes that were in this report.
        let sent: Vec<u64> = report.outcomes.iter().map(|o| o.order_id).collect();
        self.state.pending.retain(|o| !sent.contains(&o.order_id));

        let by_name: HashMap<&str, &InstanceHandle> =
            instances.iter().map(|h| (h.name.as_str(), h)).collect();
        let local = |n: &str| by_name.contains_key(n);
        let Some(plan) = self.state.plan(&reply, &local) else {
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

#[cfg(test)]
mod tests {
    use super::*;
    use ha_common::proto::cm::{Assignment, OrderKind};

    fn order(id: u64, term: u64, instance: &str) -> Order {
        Order {
            id,
            term,
            instance: instance.into(),
            kind: OrderKind::Start as i32,
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
        });
        s.pending.clear(); // delivered once
        let p = s
            .plan(&reply(1, vec![order(9, 1, "dn1_h1")]), &local)
            .unwrap();
        assert!(p.orders.is_empty());
        assert_eq!(s.pending.len(), 1, "outcome re-sent");
    }
}
