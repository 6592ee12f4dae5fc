//! Orders in flight: issued by the arbiter or an operation, sent in every Report reply
//! to their agent until its outcome comes back (agents run an order id once and resend
//! its outcome), then kept a little while for whoever waits on it. Memory only: a new
//! CMServer primary re-derives what is needed from the durable state (level rules).

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ha_common::proto::cm::{Order, OrderKind, OrderOutcome};

/// A pending order is given up after this long (its agent is gone, or it hangs).
pub const PENDING_TTL: Duration = Duration::from_secs(300);
/// A finished order's outcome is kept this long.
pub const DONE_TTL: Duration = Duration::from_secs(120);

#[derive(Debug, Clone)]
pub struct Entry {
    pub order: Order,
    pub host: String,
    pub issued: Instant,
    pub outcome: Option<OrderOutcome>,
    pub done_at: Option<Instant>,
}

#[derive(Debug, Clone)]
pub struct OrderBook {
    next_id: u64,
    entries: Vec<Entry>,
}

impl Default for OrderBook {
    fn default() -> Self {
        OrderBook::new()
    }
}

impl OrderBook {
    /// Ids from `first` on (a tenure's block, see `ClusterState::order_id_base`).
    pub fn starting_at(first: u64) -> OrderBook {
        OrderBook {
            next_id: first.max(1),
            entries: Vec::new(),
        }
    }

    /// Ids start at the wall clock in microseconds (only until the first tenure
    /// starts: then they come from the persisted block).
    pub fn new() -> OrderBook {
        let start = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(1);
        OrderBook {
            next_id: start.max(1),
            entries: Vec::new(),
        }
    }

    /// Queues `order` (its id is assigned here) for the agent of `host`.
    pub fn issue(&mut self, host: &str, mut order: Order, now: Instant) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        order.id = id;
        tracing::info!(
            id,
            term = order.term,
            instance = %order.instance,
            kind = OrderKind::try_from(order.kind).map(|k| k.as_str_name()).unwrap_or("?"),
            "order issued"
        );
        self.entries.push(Entry {
            order,
            host: host.to_owned(),
            issued: now,
            outcome: None,
            done_at: None,
        });
        id
    }

    /// The pending orders for `host`.
    pub fn for_host(&self, host: &str) -> Vec<Order> {
        self.entries
            .iter()
            .filter(|e| e.host == host && e.outcome.is_none())
            .map(|e| e.order.clone())
            .collect()
    }

    /// Moves every pending order into `term`. Called when this primary bumps its term,
    /// before any reply carries the new term: an agent that has seen the new term
    /// refuses orders stamped with an older one, and a pending order (decided by this
    /// same primary, whose new state carries that decision over) would otherwise be
    /// refused and wait out its cooldown. Never lowers a term.
    pub fn restamp(&mut self, term: u64) {
        for e in self.entries.iter_mut().filter(|e| e.outcome.is_none()) {
            e.order.term = e.order.term.max(term);
        }
    }

    /// Stops sending order `id` (its operation ended without its outcome): a late
    /// agent must not carry out a decision that was taken back. An agent that
    /// already runs it reports an outcome nobody waits for; the level rules repair
    /// what it did.
    pub fn withdraw(&mut self, id: u64) {
        if let Some(e) = self.entries.iter().find(|e| e.order.id == id) {
            if e.outcome.is_none() {
                tracing::warn!(id, instance = %e.order.instance, "order withdrawn");
            }
        }
        self.entries.retain(|e| e.order.id != id);
    }

    /// Forgets every order (a new tenure as primary: what an earlier tenure ordered
    /// is not resent; ids keep increasing).
    pub fn clear(&mut self) {
        self.entries.clear();
    }

    /// Takes the outcomes an agent reported.
    pub fn record(&mut self, outcomes: &[OrderOutcome], now: Instant) {
        for o in outcomes {
            if let Some(e) = self
                .entries
                .iter_mut()
                .find(|e| e.order.id == o.order_id && e.outcome.is_none())
            {
                if o.ok {
                    tracing::info!(id = o.order_id, instance = %e.order.instance, "order done: {}", o.message);
                } else {
                    tracing::warn!(id = o.order_id, instance = %e.order.instance, "order failed: {}", o.message);
                }
                e.outcome = Some(o.clone());
                e.done_at = Some(now);
            }
        }
    }

    pub fn outcome(&self, id: u64) -> Option<OrderOutcome> {
        self.entries
            .iter()
            .find(|e| e.order.id == id)
            .and_then(|e| e.outcome.clone())
    }

    /// Whether order `id` is still known (pending or recently done).
    pub fn knows(&self, id: u64) -> bool {
        self.entries.iter().any(|e| e.order.id == id)
    }

    /// (instance, kind) of orders pending, or finished less than `cooldown` ago.
    pub fn recent(&self, now: Instant, cooldown: Duration) -> Vec<(String, OrderKind)> {
        self.entries
            .iter()
            .filter(|e| {
                e.done_at
                    .is_none_or(|d| now.saturating_duration_since(d) < cooldown)
            })
            .filter_map(|e| {
                Some((
                    e.order.instance.clone(),
                    OrderKind::try_from(e.order.kind).ok()?,
                ))
            })
            .collect()
    }

    /// Pending orders issued less than `within` ago.
    fn fresh_pending(&self, now: Instant, within: Duration) -> impl Iterator<Item = &Entry> {
        self.entries.iter().filter(move |e| {
            e.outcome.is_none() && now.saturating_duration_since(e.issued) < within
        })
    }

    /// Whether an order for `host` issued less than `within` ago is still pending.
    pub fn has_fresh_pending_for(&self, host: &str, now: Instant, within: Duration) -> bool {
        self.fresh_pending(now, within).any(|e| e.host == host)
    }

    /// The instances with an order issued less than `within` ago still pending.
    pub fn freshly_ordered(
        &self,
        now: Instant,
        within: Duration,
    ) -> std::collections::BTreeSet<String> {
        self.fresh_pending(now, within)
            .map(|e| e.order.instance.clone())
            .collect()
    }

    /// Forgets pending orders older than PENDING_TTL and outcomes older than DONE_TTL.
    pub fn expire(&mut self, now: Instant) {
        self.entries.retain(|e| match e.done_at {
            Some(d) => now.saturating_duration_since(d) < DONE_TTL,
            None => {
                let keep = now.saturating_duration_since(e.issued) < PENDING_TTL;
                if !keep {
                    tracing::warn!(id = e.order.id, instance = %e.order.instance, "order given up: no outcome");
                }
                keep
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn order(instance: &str, kind: OrderKind) -> Order {
        Order {
            term: 3,
            instance: instance.into(),
            kind: kind as i32,
            ..Order::default()
        }
    }

    #[test]
    fn orders_are_resent_until_their_outcome_arrives() {
        let mut b = OrderBook::new();
        let t0 = Instant::now();
        let id = b.issue("h2", order("dn1_h2", OrderKind::Promote), t0);
        let id2 = b.issue("h1", order("dn1_h1", OrderKind::Demote), t0);
        assert!(id2 > id);
        assert_eq!(b.for_host("h2").len(), 1);
        assert_eq!(b.for_host("h2")[0].id, id);
        assert!(b.for_host("h3").is_empty());
        assert_eq!(b.recent(t0, Duration::from_secs(3)).len(), 2);
        b.record(
            &[OrderOutcome {
                order_id: id,
                ok: true,
                message: "promoted".into(),
                lsn: 0,
                ..OrderOutcome::default()
            }],
            t0,
        );
        assert!(b.for_host("h2").is_empty());
        assert!(b.outcome(id).unwrap().ok);
        assert!(b.outcome(id2).is_none());
        let later = t0 + Duration::from_secs(4);
        assert_eq!(
            b.recent(later, Duration::from_secs(3)).len(),
            1,
            "cooled down"
        );
        b.expire(t0 + PENDING_TTL + Duration::from_secs(1));
        assert!(!b.knows(id) && !b.knows(id2));
    }

    #[test]
    fn a_term_bump_restamps_pending_orders_only() {
        let now = Instant::now();
        let mut book = OrderBook::new();
        let mut o = order("gtm2", OrderKind::Promote);
        o.term = 3;
        let pending = book.issue("h2", o.clone(), now);
        let done = book.issue("h1", o, now);
        book.record(
            &[OrderOutcome {
                order_id: done,
                ok: true,
                ..OrderOutcome::default()
            }],
            now,
        );
        book.restamp(4);
        let sent = book.for_host("h2");
        assert_eq!(sent.len(), 1);
        assert_eq!((sent[0].id, sent[0].term), (pending, 4));
        book.restamp(2);
        assert_eq!(book.for_host("h2")[0].term, 4, "a term is never lowered");
    }

    #[test]
    fn a_new_book_never_reuses_ids() {
        let a = OrderBook::new().issue("h1", order("x", OrderKind::Stop), Instant::now());
        std::thread::sleep(Duration::from_millis(2));
        let b = OrderBook::new().issue("h1", order("x", OrderKind::Stop), Instant::now());
        assert!(b > a);
    }
}
