//! Which CMServer of the pair is primary: a lease election in which the agents vote.
//!
//! A pure state machine (no I/O, the clock is an argument); `pair.rs` drives it.
//!
//! - Every agent grants at most one CMServer a lease at a time and says so in every
//!   heartbeat to every CMServer (`AgentReport.lease`: holder, term, time left); see
//!   `cm-agent/src/lease.rs` for the agent's rules.
//! - A CMServer asks for leases by setting `ReportReply.lease_request_term`: as
//!   primary (renewal, every heartbeat) and as candidate.
//! - A follower becomes a candidate when a majority of the hosts report a lease that is
//!   free, expired or its own (so nobody else can hold a majority), and it is not
//!   backing off. Its term is one above every term it knows (its persisted state,
//!   agents' reports, state syncs).
//! - Pre-vote (Raft's, from the agents' reports): only a host heard from recently
//!   counts as free. A host this CMServer cannot hear (cut off from it, but maybe not
//!   from the other CMServer) last reported a lease that merely runs out in our
//!   books; counting it would start campaigns that cannot win and only raise the
//!   terms of the agents that can hear us, so that they later refuse the real
//!   primary's orders (issue 9 §3 c). "Recently" is shorter than a renewed lease's
//!   remaining time, so a silent host's last grant never looks expired while fresh.
//! - A candidate that a majority grants wins: the term is persisted in the state file
//!   (`Elected`, then `confirm`) BEFORE it acts as primary.
//! - A primary stays primary only while a majority of the hosts report an unexpired
//!   lease for it in a term >= the term it won. Expiry is counted conservatively:
//!   min(when the granting request was sent + lease, receipt + time left) - a margin
//!   (each request has an id that the agent echoes in its grant; a lease cannot start
//!   before its request was sent), so the CMServer always believes its lease ends
//!   before the agents do, however late the reports arrive. It steps down the moment
//!   it cannot prove a majority, or when it learns a higher term from another CMServer
//!   or an agent (Raft's rule: an agent in a higher term refuses its renewals and
//!   orders; campaigning again, above that term, brings it back).
//! - Before acting, a newly elected CMServer takes the other's state if that is newer
//!   (`pair.rs`).
//! - Against duels: a candidate that lost (another holder in a term >= its own) backs
//!   off one to two heartbeats; one that timed out backs off a whole lease plus up to
//!   two heartbeats (its partial grants lapse first); on a cold start only the
//!   config's first CMServer may campaign at once, the others wait a lease and two
//!   heartbeats.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use ha_common::proto::cm::LeaseGrant;

/// Where this CMServer stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Not primary; does not campaign before `not_before`.
    Follower { not_before: Instant },
    /// Asking the agents for leases in `term` since `since`.
    Candidate { term: u64, since: Instant },
    /// A majority granted `term`; the term is being persisted. Not acting yet.
    Elected { term: u64 },
    /// Acts as primary; `term` is the term it won.
    Primary { term: u64 },
}

/// Fixed parameters of the election.
#[derive(Debug, Clone)]
pub struct Params {
    pub me: String,
    /// The voters: every configured host (one agent each).
    pub hosts: Vec<String>,
    pub lease: Duration,
    pub heartbeat: Duration,
    /// Whether this is the config's first CMServer (campaigns first on a cold start).
    pub first: bool,
}

impl Params {
    /// Subtracted from every reported lease (transit and clock-rate differences).
    pub fn margin(&self) -> Duration {
        (self.lease / 10).max(Duration::from_millis(50))
    }

    fn majority(&self) -> usize {
        self.hosts.len() / 2 + 1
    }

    /// How long a candidate tries before giving up.
    fn candidate_timeout(&self) -> Duration {
        self.lease + self.heartbeat * 2
    }
}

/// A grant as an agent last reported it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct SeenGrant {
    holder: String,
    term: u64,
    /// Conservative end (receipt + time left - margin): what the holder may rely on.
    until: Instant,
    /// Liberal end (receipt + time left): when others may assume it is gone.
    until_liberal: Instant,
}

/// The election state of one CMServer.
#[derive(Debug, Clone)]
pub struct Election {
    params: Params,
    role: Role,
    /// Highest term known from anywhere (own state, reports, syncs).
    highest: u64,
    grants: HashMap<String, Option<SeenGrant>>,
    /// When each host's latest report arrived (see `fresh`).
    heard: HashMap<String, Instant>,
    rng: u64,
    /// When each of our lease requests was sent, by id (the last two leases' worth).
    requests: std::collections::BTreeMap<u64, Instant>,
    next_request: u64,
}

impl Election {
    /// A CMServer started at `now` whose persisted state is at `persisted_term`.
    /// `seed` feeds the back-off jitter.
    pub fn new(params: Params, persisted_term: u64, now: Instant, seed: u64) -> Election {
        let mut e = Election {
            role: Role::Follower { not_before: now },
            highest: persisted_term,
            grants: HashMap::new(),
            heard: HashMap::new(),
            rng: seed | 1,
            requests: Default::default(),
            // Distinct from a previous incarnation's ids (which are not trusted anyway).
            next_request: (seed >> 20) | 1,
            params,
        };
        if !e.params.first {
            let (lease, heartbeat) = (e.params.lease, e.params.heartbeat);
            let wait = lease + heartbeat * 2 + e.jitter(heartbeat);
            e.role = Role::Follower {
                not_before: now + wait,
            };
        }
        e
    }

    pub fn role(&self) -> Role {
        self.role
    }

    pub fn highest_term(&self) -> u64 {
        self.highest
    }

    /// Acting as primary at `now`: won, persisted, and a majority still proven.
    pub fn is_primary(&self, now: Instant) -> bool {
        match self.role {
            Role::Primary { term } => self.granted_to_me(term, now) >= self.params.majority(),
            _ => false,
        }
    }

    /// Records a lease request sent at `now`; returns its id for `lease_request_id`.
    pub fn issue_request(&mut self, now: Instant) -> u64 {
        let id = self.next_request;
        self.next_request += 1;
        self.requests.insert(id, now);
        let keep = self.params.lease * 2;
        self.requests
            .retain(|_, sent| now.saturating_duration_since(*sent) <= keep);
        id
    }

    /// The term to put in `lease_request_term` of a reply (0: none).
    /// `state_term` is the current term of the cluster state (a primary's arbiter may
    /// have raised it above the term it won).
    pub fn lease_request(&self, state_term: u64) -> u64 {
        match self.role {
            Role::Primary { term } => term.max(state_term),
            Role::Candidate { term, .. } | Role::Elected { term } => term,
            Role::Follower { .. } => 0,
        }
    }

    /// An agent's report: its grant and its highest term, received at `now`. Returns
    /// the term to persist when this report made us `Elected` (see `tick`).
    pub fn on_report(
        &mut self,
        host: &str,
        grant: Option<&LeaseGrant>,
        agent_term: u64,
        state_term: u64,
        now: Instant,
    ) -> Option<u64> {
        let seen = grant.filter(|g| !g.holder.is_empty()).map(|g| {
            let left = Duration::from_millis(g.remaining_ms);
            // Our own lease started no earlier than the request that granted it was
            // sent: that bounds its end whatever the report's transit time. A grant
            // to us from a request we do not know is not counted.
            let end = if g.holder == self.params.me {
                match self.requests.get(&g.request_id) {
                    Some(sent) => (*sent + self.params.lease).min(now + left),
                    None => now,
                }
            } else {
                now + left
            };
            SeenGrant {
                holder: g.holder.clone(),
                term: g.term,
                until: end.checked_sub(self.params.margin()).unwrap_or(now),
                until_liberal: now + left,
            }
        });
        self.highest = self
            .highest
            .max(agent_term)
            .max(seen.as_ref().map_or(0, |g| g.term));
        self.grants.insert(host.to_owned(), seen);
        self.heard.insert(host.to_owned(), now);
        self.tick(state_term, now)
    }

    /// A term learnt from another CMServer (its state sync, or its answer to ours).
    /// Higher than ours: whatever we were, we are a follower now.
    pub fn on_foreign_term(&mut self, term: u64, state_term: u64, now: Instant) {
        self.highest = self.highest.max(term);
        // A peer that streams (or answers) in a candidate's own term won that term.
        let beaten = match self.role {
            Role::Follower { .. } => false,
            Role::Candidate { term: mine, .. } | Role::Elected { term: mine } => term >= mine,
            Role::Primary { term: mine } => term > mine.max(state_term),
        };
        if beaten {
            let back_off = self.params.heartbeat + self.jitter(self.params.heartbeat);
            self.become_follower(now + back_off, &format!("term {term} seen elsewhere"));
        }
    }

    /// The elected term is durable: act as primary (if still proven).
    pub fn confirm(&mut self, term: u64, state_term: u64, now: Instant) -> bool {
        if self.role != (Role::Elected { term }) {
            return false;
        }
        self.set_role(Role::Primary { term }, "term persisted");
        self.tick(state_term, now);
        self.is_primary(now)
    }

    /// Persisting the elected term failed: do not act.
    pub fn persist_failed(&mut self, term: u64, now: Instant) {
        if self.role == (Role::Elected { term }) {
            let back_off = self.params.heartbeat + self.jitter(self.params.heartbeat);
            self.become_follower(now + back_off, "cannot persist the term");
        }
    }

    /// The one place where the role changes with time and reports. Returns the term
    /// to persist when this call made us `Elected`.
    pub fn tick(&mut self, state_term: u64, now: Instant) -> Option<u64> {
        self.highest = self.highest.max(state_term);
        let majority = self.params.majority();
        let (heartbeat, lease) = (self.params.heartbeat, self.params.lease);
        match self.role {
            Role::Follower { not_before } => {
                if now >= not_before && self.free_or_mine(now) >= majority {
                    let term = self.highest + 1;
                    self.highest = term;
                    self.set_role(
                        Role::Candidate { term, since: now },
                        "no other lease holder",
                    );
                }
                None
            }
            Role::Candidate { term, since } => {
                if self.granted_to_me(term, now) >= majority {
                    self.set_role(Role::Elected { term }, "a majority granted the lease");
                    Some(term)
                } else if self.other_holder_at_or_above(term, now) {
                    let back_off = heartbeat + self.jitter(heartbeat);
                    self.become_follower(now + back_off, "another CMServer won");
                    None
                } else if now.saturating_duration_since(since) > self.params.candidate_timeout() {
                    let back_off = lease + self.jitter(heartbeat * 2);
                    self.become_follower(now + back_off, "no majority in time");
                    None
                } else {
                    None
                }
            }
            Role::Elected { .. } => None,
            Role::Primary { term } => {
                if self.granted_to_me(term, now) < majority {
                    let back_off = self.jitter(heartbeat);
                    self.become_follower(now + back_off, "cannot prove a majority of leases");
                } else if self.highest > term.max(state_term) {
                    // Our own leases stay "mine": we campaign again at once, above it.
                    let back_off = self.jitter(heartbeat);
                    let why = format!("an agent is in term {}", self.highest);
                    self.become_follower(now + back_off, &why);
                }
                None
            }
        }
    }

    /// The CMServer that a majority of the hosts report as their lease holder, if any.
    pub fn leader(&self, now: Instant) -> Option<String> {
        let mut count: HashMap<&str, usize> = HashMap::new();
        for g in self.grants.values().flatten() {
            if g.until_liberal > now {
                *count.entry(g.holder.as_str()).or_default() += 1;
            }
        }
        count
            .into_iter()
            .find(|(_, n)| *n >= self.params.majority())
            .map(|(h, _)| h.to_owned())
    }

    /// Hosts whose latest report shows an unexpired lease for us in a term >= `term`.
    fn granted_to_me(&self, term: u64, now: Instant) -> usize {
        self.grants
            .values()
            .flatten()
            .filter(|g| g.holder == self.params.me && g.term >= term && g.until > now)
            .count()
    }

    /// Hosts heard from recently whose latest report shows no lease held by another
    /// CMServer (the pre-vote: they would grant us a lease now).
    fn free_or_mine(&self, now: Instant) -> usize {
        self.grants
            .iter()
            .filter(|(host, _)| self.fresh(host, now))
            .filter(|(_, g)| match g {
                None => true,
                Some(g) => g.holder == self.params.me || g.until_liberal <= now,
            })
            .count()
    }

    /// Whether `host`'s latest report is recent enough to speak for it now: younger
    /// than the least time a renewed lease has left in a report (a lease minus the
    /// heartbeat between renewal and report, minus the margin), and at least one
    /// heartbeat (agents report every heartbeat).
    fn fresh(&self, host: &str, now: Instant) -> bool {
        let p = &self.params;
        let window = p
            .lease
            .saturating_sub(p.heartbeat + p.margin())
            .max(p.heartbeat);
        self.heard
            .get(host)
            .is_some_and(|at| now.saturating_duration_since(*at) < window)
    }

    fn other_holder_at_or_above(&self, term: u64, now: Instant) -> bool {
        self.grants
            .values()
            .flatten()
            .any(|g| g.holder != self.params.me && g.term >= term && g.until_liberal > now)
    }

    fn become_follower(&mut self, not_before: Instant, why: &str) {
        self.set_role(Role::Follower { not_before }, why);
    }

    fn set_role(&mut self, role: Role, why: &str) {
        if self.role != role {
            tracing::info!(node = %self.params.me, from = ?short(self.role), to = ?short(role), "election: {why}");
            self.role = role;
        }
    }

    /// A pseudo-random duration in [0, max) (xorshift; the seed comes from the caller).
    fn jitter(&mut self, max: Duration) -> Duration {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        let frac = (self.rng % 1000) as f64 / 1000.0;
        max.mul_f64(frac)
    }
}

/// A role without its instants, for logs.
fn short(r: Role) -> String {
    match r {
        Role::Follower { .. } => "follower".into(),
        Role::Candidate { term, .. } => format!("candidate(term {term})"),
        Role::Elected { term } => format!("elected(term {term})"),
        Role::Primary { term } => format!("primary(term {term})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HB: Duration = Duration::from_secs(1);
    const LEASE: Duration = Duration::from_secs(3);

    fn params(me: &str, first: bool) -> Params {
        Params {
            me: me.into(),
            hosts: vec!["h1".into(), "h2".into(), "h3".into()],
            lease: LEASE,
            heartbeat: HB,
            first,
        }
    }

    fn grant(holder: &str, term: u64, ms: u64) -> LeaseGrant {
        LeaseGrant {
            holder: holder.into(),
            term,
            remaining_ms: ms,
            request_id: 0,
        }
    }

    const FREE: Option<&LeaseGrant> = None;

    /// A grant to `e` in answer to a request it sends at `t`.
    fn mine(e: &mut Election, term: u64, ms: u64, t: Instant) -> LeaseGrant {
        LeaseGrant {
            holder: e.params.me.clone(),
            term,
            remaining_ms: ms,
            request_id: e.issue_request(t),
        }
    }

    /// cms1 elected in term 2 at `t` (persisted term 1).
    fn primary_at(t: Instant) -> Election {
        let mut e = Election::new(params("cms1", true), 1, t, 7);
        e.on_report("h1", FREE, 1, 1, t);
        assert_eq!(e.role(), Role::Follower { not_before: t });
        e.on_report("h2", FREE, 1, 1, t);
        assert_eq!(e.role(), Role::Candidate { term: 2, since: t });
        assert_eq!(e.lease_request(1), 2);
        let g = mine(&mut e, 2, 3000, t);
        e.on_report("h1", Some(&g), 2, 1, t);
        assert!(matches!(e.role(), Role::Candidate { .. }), "one of three");
        assert_eq!(e.tick(1, t), None);
        let mut e2 = e.clone();
        let g = mine(&mut e2, 2, 3000, t);
        e2.on_report("h2", Some(&g), 2, 1, t);
        assert_eq!(e2.role(), Role::Elected { term: 2 }, "two of three");
        // Same transition through tick's return value, which tells the caller to persist.
        let mut grants = e.clone();
        grants.grants.insert(
            "h2".into(),
            Some(SeenGrant {
                holder: "cms1".into(),
                term: 2,
                until: t + LEASE,
                until_liberal: t + LEASE,
            }),
        );
        assert_eq!(grants.tick(1, t), Some(2));
        assert!(!e2.is_primary(t), "not before the term is persisted");
        assert_eq!(e2.lease_request(1), 2);
        assert!(e2.confirm(2, 2, t));
        assert!(e2.is_primary(t));
        e2
    }

    #[test]
    fn majority_elects_and_the_term_is_persisted_before_acting() {
        let t = Instant::now();
        let e = primary_at(t);
        assert_eq!(e.role(), Role::Primary { term: 2 });
        assert_eq!(e.lease_request(2), 2);
        assert_eq!(e.lease_request(5), 5, "renewals follow the state's term");
    }

    #[test]
    fn a_failed_persist_does_not_make_a_primary() {
        let t = Instant::now();
        let mut e = Election::new(params("cms1", true), 1, t, 7);
        e.on_report("h1", FREE, 1, 1, t);
        e.on_report("h2", FREE, 1, 1, t);
        let g = mine(&mut e, 2, 3000, t);
        e.on_report("h1", Some(&g), 2, 1, t);
        let g = mine(&mut e, 2, 3000, t);
        assert_eq!(e.on_report("h2", Some(&g), 2, 1, t), Some(2));
        assert_eq!(e.role(), Role::Elected { term: 2 });
        e.persist_failed(2, t);
        assert!(matches!(e.role(), Role::Follower { .. }));
        assert!(!e.confirm(2, 2, t), "too late");
        assert!(!e.is_primary(t));
    }

    #[test]
    fn losing_the_majority_steps_down() {
        let t = Instant::now();
        let mut e = primary_at(t);
        // Renewals keep it primary.
        let t1 = t + HB;
        let g = mine(&mut e, 2, 2000, t1);
        e.on_report("h1", Some(&g), 2, 2, t1);
        let g = mine(&mut e, 2, 2000, t1);
        e.on_report("h2", Some(&g), 2, 2, t1);
        assert!(e.is_primary(t1));
        // No more reports: the conservative end (receipt + 2 s - margin) passes.
        let end = t1 + Duration::from_millis(2000) - e.params.margin();
        assert!(e.is_primary(end - Duration::from_millis(1)));
        assert!(
            !e.is_primary(end),
            "not provable any more, even before tick"
        );
        e.tick(2, end);
        assert!(matches!(e.role(), Role::Follower { .. }));
        assert_eq!(e.lease_request(2), 0);
    }

    #[test]
    fn one_agent_reporting_an_empty_lease_costs_the_majority_only_below_two() {
        let t = Instant::now();
        let mut e = primary_at(t);
        e.on_report("h3", FREE, 2, 2, t);
        assert!(e.is_primary(t));
        e.on_report("h2", FREE, 2, 2, t);
        assert!(!e.is_primary(t));
        assert!(matches!(e.role(), Role::Follower { .. }));
    }

    #[test]
    fn a_higher_term_from_the_peer_makes_a_follower() {
        let t = Instant::now();
        let mut e = primary_at(t);
        e.on_foreign_term(2, 2, t);
        assert!(e.is_primary(t), "same term: no change");
        e.on_foreign_term(3, 2, t);
        assert!(matches!(e.role(), Role::Follower { .. }));
        assert_eq!(e.highest_term(), 3);
        // A candidate too.
        let mut c = Election::new(params("cms2", true), 1, t, 9);
        c.on_report("h1", FREE, 1, 1, t);
        c.on_report("h2", FREE, 1, 1, t);
        assert_eq!(c.role(), Role::Candidate { term: 2, since: t });
        c.on_foreign_term(4, 1, t);
        assert!(matches!(c.role(), Role::Follower { .. }));
    }

    #[test]
    fn a_follower_waits_while_another_holds_a_majority_then_campaigns_above_every_term() {
        let t = Instant::now();
        let mut e = Election::new(params("cms2", true), 3, t, 5);
        e.on_report("h1", Some(&grant("cms1", 6, 2000)), 6, 3, t);
        e.on_report("h2", Some(&grant("cms1", 6, 2000)), 6, 3, t);
        e.on_report("h3", FREE, 6, 3, t);
        assert!(matches!(e.role(), Role::Follower { .. }));
        // The holder stops renewing (killed); the leases lapse and the agents, still
        // reporting, say so.
        let later = t + Duration::from_millis(2000);
        e.tick(3, later);
        assert!(
            matches!(e.role(), Role::Follower { .. }),
            "reports from 2 s ago no longer speak for their hosts"
        );
        e.on_report("h1", FREE, 6, 3, later);
        e.on_report("h3", FREE, 6, 3, later);
        assert_eq!(
            e.role(),
            Role::Candidate {
                term: 7,
                since: later
            },
            "one above the highest term seen, not above its own state"
        );
    }

    #[test]
    fn a_candidate_that_sees_another_holder_in_its_term_backs_off() {
        let t = Instant::now();
        let mut e = Election::new(params("cms2", true), 1, t, 5);
        e.on_report("h1", FREE, 1, 1, t);
        e.on_report("h2", FREE, 1, 1, t);
        assert_eq!(e.role(), Role::Candidate { term: 2, since: t });
        e.on_report("h3", Some(&grant("cms1", 2, 3000)), 2, 1, t);
        match e.role() {
            Role::Follower { not_before } => {
                assert!(
                    not_before >= t + HB && not_before < t + HB * 2,
                    "backs off 1-2 heartbeats"
                )
            }
            r => panic!("{r:?}"),
        }
    }

    #[test]
    fn a_candidate_without_a_majority_gives_up_and_lets_its_grants_lapse() {
        let t = Instant::now();
        let mut e = Election::new(params("cms1", true), 1, t, 5);
        e.on_report("h1", FREE, 1, 1, t);
        e.on_report("h2", FREE, 1, 1, t);
        let g = mine(&mut e, 2, 3000, t);
        e.on_report("h1", Some(&g), 2, 1, t);
        let late = t + LEASE + HB * 2 + Duration::from_millis(1);
        e.tick(1, late);
        match e.role() {
            Role::Follower { not_before } => assert!(not_before >= late + LEASE),
            r => panic!("{r:?}"),
        }
    }

    #[test]
    fn on_a_cold_start_only_the_first_cm_server_campaigns_at_once() {
        let t = Instant::now();
        let mut second = Election::new(params("cms2", false), 1, t, 3);
        second.on_report("h1", FREE, 1, 1, t);
        second.on_report("h2", FREE, 1, 1, t);
        assert!(matches!(second.role(), Role::Follower { .. }));
        let later = t + LEASE + HB * 3;
        second.on_report("h1", FREE, 1, 1, later);
        second.on_report("h2", FREE, 1, 1, later);
        assert!(matches!(second.role(), Role::Candidate { .. }));
    }

    #[test]
    fn the_lease_end_is_bounded_by_when_the_request_was_sent_not_by_transit() {
        let t = Instant::now();
        let mut e = primary_at(t);
        // Renewal requests sent at t1; the reports showing the renewals arrive 1.5 s
        // late (a stalled network or process), still claiming 2.9 s left.
        let t1 = t + HB;
        let (g1, g2) = (mine(&mut e, 2, 2900, t1), mine(&mut e, 2, 2900, t1));
        let late = t1 + Duration::from_millis(1500);
        e.on_report("h1", Some(&g1), 2, 2, late);
        e.on_report("h2", Some(&g2), 2, 2, late);
        let end = t1 + LEASE - e.params.margin();
        assert!(e.is_primary(end - Duration::from_millis(1)));
        assert!(
            !e.is_primary(end),
            "the agents' leases started no earlier than t1"
        );
        // A grant naming a request we never sent (or forgot) is not counted.
        let mut f = primary_at(t);
        let forged = LeaseGrant {
            request_id: 424242,
            ..mine(&mut f, 2, 3000, t)
        };
        f.on_report("h1", Some(&forged), 2, 2, t);
        f.on_report("h2", Some(&forged), 2, 2, t);
        assert!(!f.is_primary(t));
    }

    #[test]
    fn a_host_that_cannot_report_to_us_does_not_count_as_free() {
        // h1 and h2 cut apart (issue 9 §3 c): cms2 (on h2) last heard h1 report cms1's
        // lease; h2 reports no lease (cms1 cannot reach it); h3 keeps cms1's lease.
        let t = Instant::now();
        let mut e = Election::new(params("cms2", true), 3, t, 5);
        e.on_report("h1", Some(&grant("cms1", 3, 2000)), 3, 3, t);
        // Bounded: 20 heartbeats, far beyond h1's lease in cms2's books.
        for i in 1..=20u32 {
            let now = t + HB * i;
            e.on_report("h2", FREE, 3, 3, now);
            e.on_report("h3", Some(&grant("cms1", 3, 2000)), 3, 3, now);
            assert!(
                matches!(e.role(), Role::Follower { .. }),
                "heartbeat {i}: campaigned (a term nobody can grant a majority of)"
            );
        }
        assert_eq!(e.highest_term(), 3, "no term raised");
        // h1 reachable again and free: now a majority would grant.
        let now = t + HB * 21;
        e.on_report("h1", FREE, 3, 3, now);
        assert_eq!(
            e.role(),
            Role::Candidate {
                term: 4,
                since: now
            }
        );
    }

    #[test]
    fn a_report_younger_than_a_renewed_lease_speaks_for_its_host() {
        let t = Instant::now();
        let mut e = Election::new(params("cms2", true), 3, t, 5);
        let window = LEASE - HB - e.params.margin();
        e.on_report("h1", FREE, 3, 3, t);
        assert!(e.fresh("h1", t + window - Duration::from_millis(1)));
        assert!(!e.fresh("h1", t + window));
        assert!(!e.fresh("h2", t), "never heard");
        // A renewed lease, reported one heartbeat after its renewal, has more left
        // than the window: a silent host's last grant never looks expired while fresh.
        assert!(LEASE - HB > window);
    }

    #[test]
    fn a_primary_that_sees_an_agent_in_a_higher_term_steps_down_and_campaigns_above_it() {
        let t = Instant::now();
        let mut e = primary_at(t);
        // h3's agent was raised to term 5 by a campaign that failed; it refuses our
        // term-2 renewals and orders.
        let t1 = t + Duration::from_millis(200);
        e.on_report("h3", FREE, 5, 2, t1);
        assert!(matches!(e.role(), Role::Follower { .. }), "{:?}", e.role());
        assert!(!e.is_primary(t1));
        // Our own leases on h1 and h2 still run: we campaign at once above term 5.
        let t2 = t1 + HB;
        let g = mine(&mut e, 2, 2000, t1);
        e.on_report("h1", Some(&g), 2, 2, t2);
        assert_eq!(e.role(), Role::Candidate { term: 6, since: t2 });
        // The agents renew their lease to us in the higher term: elected.
        let (g1, g2) = (mine(&mut e, 6, 3000, t2), mine(&mut e, 6, 3000, t2));
        e.on_report("h1", Some(&g1), 6, 2, t2);
        assert_eq!(e.on_report("h2", Some(&g2), 6, 2, t2), Some(6));
        assert!(e.confirm(6, 6, t2));
        assert!(e.is_primary(t2));
        // Its own higher state term is no reason to step down.
        e.tick(7, t2);
        assert!(e.is_primary(t2));
    }

    #[test]
    fn a_restarted_primary_reclaims_its_own_unexpired_leases_in_a_new_term() {
        let t = Instant::now();
        let mut e = Election::new(params("cms1", true), 4, t, 3);
        e.on_report("h1", Some(&grant("cms1", 4, 2500)), 4, 4, t);
        e.on_report("h2", Some(&grant("cms1", 4, 2500)), 4, 4, t);
        assert_eq!(e.role(), Role::Candidate { term: 5, since: t });
        assert!(!e.is_primary(t), "old-term grants do not count");
    }
}
