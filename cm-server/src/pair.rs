//! The CMServer pair at run time: drives the lease election (`election.rs`) from the
//! agents' reports and the clock, persists an elected term before acting on it, and
//! streams the cluster state from the primary to the standby.
//!
//! Streaming: the primary sends `SyncState{term, from, state}` (the whole
//! `ClusterState`, as the state file stores it) to the other CMServer on every state
//! change (`push_state` before the change is installed, or `push`; awaited by whoever
//! changed the state, so the standby has the change before anybody acts on it) and at
//! least every heartbeat. Change pushes hold the state lock, so they are serialised
//! with each other and with changes; the heartbeat push sends a copy without the lock
//! (a thousand agents' reports need it meanwhile), and the standby ignores a copy older
//! than what it has (same term, lower version), so it never goes back to an older
//! state. The standby accepts a state only from a term >=
//! its own, persists it (atomic write) and answers; a reply with a higher term tells a
//! deposed primary to step down. Because the standby records the agents' reports too
//! and holds the streamed state, a new primary arbitrates from the current roles the
//! moment it is elected. Before a newly elected CMServer persists its term and acts, it
//! asks the other for its state (`SyncState{probe}`) and takes it if its term is higher:
//! a CMServer that was down while the other decided things never acts on its old
//! state (as long as the other answers). A returning old primary loads its own (older)
//! state, learns the higher term from the agents' reports (it cannot win while another
//! CMServer holds their leases) and from the new primary's stream, and takes the newer
//! state.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ha_common::config::ClusterConfig;
use ha_common::proto::cm::cm_server_client::CmServerClient;
use ha_common::proto::cm::{LeaseGrant, SyncStateReply, SyncStateRequest};
use ha_common::Term;
use tonic::transport::Channel;
use tonic::Status;

use crate::election::{Election, Params, Role};
use crate::state::{ClusterState, StateFile};

/// How often the clock is applied to the election (stepping down without reports).
const TICK_DIVISOR: u32 = 5;

struct Peer {
    name: String,
    client: CmServerClient<Channel>,
}

/// The pair's shared run-time state.
pub struct Pair {
    node: String,
    heartbeat: Duration,
    election: Mutex<Election>,
    peers: Vec<Peer>,
    /// The peer that streamed to us last, and when (for "not primary: <who>").
    last_sync_from: Mutex<Option<(String, Instant)>>,
    /// The term of the latest tenure as primary (0: never primary). Arbitration and
    /// operations belong to one tenure: a re-elected CMServer starts afresh.
    tenure: std::sync::atomic::AtomicU64,
    /// The newest state version any agent reported having seen from a primary.
    newest_seen: std::sync::atomic::AtomicU64,
}

/// What the report handler needs from the election.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReportVerdict {
    pub primary: bool,
    pub lease_request_term: u64,
    pub lease_request_id: u64,
}

/// Gives up an election won but not yet acted on when `take_office` is dropped
/// before it finished (see there): back to follower, campaigning again after a
/// back-off. A term persisted by a dropped persist is harmless: the next election
/// takes a higher one.
struct Unfinished<'a> {
    pair: &'a Pair,
    term: u64,
    armed: bool,
}

impl Drop for Unfinished<'_> {
    fn drop(&mut self) {
        if self.armed {
            tracing::warn!(
                term = self.term,
                "taking office was interrupted (the report carrying it was dropped): campaigning again"
            );
            lock(&self.pair.election).persist_failed(self.term, Instant::now());
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Whether state `a` is newer than `b`: a higher term, or the same term and a higher
/// version.
fn newer(a: &ClusterState, b: &ClusterState) -> bool {
    (a.term, a.version) > (b.term, b.version)
}

fn seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    h.finish()
}

impl Pair {
    /// The pair as seen by CMServer `node`, whose persisted state is at `persisted_term`.
    pub fn new(cfg: &ClusterConfig, node: &str, persisted_term: Term) -> Pair {
        let heartbeat = cfg.timing.heartbeat_interval();
        let params = Params {
            me: node.to_owned(),
            hosts: cfg.hosts.iter().map(|h| h.name.clone()).collect(),
            lease: cfg.timing.cm_lease(),
            heartbeat,
            first: cfg.cm_servers.first().is_some_and(|s| s.name == node),
        };
        // Change pushes hold the state lock (see `push_state`): keep them short.
        let rpc_timeout = (heartbeat / 4).max(Duration::from_millis(100));
        let peers = cfg
            .cm_servers
            .iter()
            .filter(|s| s.name != node)
            .filter_map(|s| {
                let ep = ha_common::tls::endpoint(
                    &cfg.endpoint(s),
                    ha_common::tls::CertRole::CmServer,
                    rpc_timeout,
                )
                .ok()?;
                let channel = ep.timeout(rpc_timeout).connect_lazy();
                Some(Peer {
                    name: s.name.clone(),
                    client: CmServerClient::new(channel),
                })
            })
            .collect();
        Pair {
            node: node.to_owned(),
            heartbeat,
            election: Mutex::new(Election::new(
                params,
                persisted_term.0,
                Instant::now(),
                seed(),
            )),
            peers,
            last_sync_from: Mutex::new(None),
            tenure: std::sync::atomic::AtomicU64::new(0),
            newest_seen: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// An agent reported having seen state `version` from a primary.
    pub fn saw_version(&self, version: u64) {
        self.newest_seen
            .fetch_max(version, std::sync::atomic::Ordering::SeqCst);
    }

    /// The newest state version agents reported.
    pub fn newest_seen(&self) -> u64 {
        self.newest_seen.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Takes the newest of the peers' states if it is newer than ours (a higher
    /// term, or the same term and a higher version): a CMServer that missed changes
    /// (it was unreachable while the other decided) catches up before it campaigns.
    /// Returns whether ours is now at least as new as every agent has seen.
    pub async fn catch_up(
        &self,
        state: &tokio::sync::Mutex<ClusterState>,
        file: &StateFile,
    ) -> bool {
        let own_term = state.lock().await.term.0;
        let theirs = self.probe_peers(own_term).await;
        let mut guard = state.lock().await;
        let newest = theirs
            .into_iter()
            .filter(|(_, s)| newer(s, &guard))
            .max_by_key(|(_, s)| (s.term, s.version));
        if let Some((peer, s)) = newest {
            let f = file.clone();
            let to_write = s.clone();
            match tokio::task::spawn_blocking(move || f.persist(&to_write)).await {
                Ok(Ok(())) => {
                    tracing::info!(%peer, version = s.version, term = s.term.0, "took the peer's newer state");
                    *guard = s;
                }
                Ok(Err(e)) => tracing::error!("cannot persist the peer's newer state: {e}"),
                Err(e) => tracing::error!("persist task failed: {e}"),
            }
        }
        guard.version >= self.newest_seen()
    }

    /// The term of the latest tenure as primary (see [`Pair::still_primary_in`]).
    pub fn tenure(&self) -> u64 {
        self.tenure.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Whether this CMServer is primary, in the same tenure as `tenure`: something
    /// begun in an earlier tenure (an operation) must stop, even if we are primary
    /// again.
    pub fn still_primary_in(&self, tenure: u64) -> bool {
        self.is_primary() && self.tenure() == tenure
    }

    /// Whether this CMServer acts as primary right now.
    pub fn is_primary(&self) -> bool {
        lock(&self.election).is_primary(Instant::now())
    }

    pub fn role(&self) -> Role {
        lock(&self.election).role()
    }

    /// Who the primary is, as far as we know ("none elected" if nobody proves it).
    pub fn known_primary(&self) -> String {
        let now = Instant::now();
        if let Some(leader) = lock(&self.election).leader(now) {
            return leader;
        }
        match &*lock(&self.last_sync_from) {
            Some((from, at)) if now.saturating_duration_since(*at) <= self.heartbeat * 3 => {
                from.clone()
            }
            _ => "none elected".into(),
        }
    }

    /// The FAILED_PRECONDITION a non-primary answers everything but reports with.
    pub fn not_primary(&self) -> Status {
        Status::failed_precondition(format!("not primary: {}", self.known_primary()))
    }

    /// Feeds an agent's report to the election; if it made us elected, persists the
    /// term first. Returns whether to answer as primary, and the lease request.
    pub async fn on_report(
        &self,
        host: &str,
        grant: Option<&LeaseGrant>,
        agent_term: u64,
        state: &tokio::sync::Mutex<ClusterState>,
        file: &StateFile,
    ) -> ReportVerdict {
        let state_term = state.lock().await.term.0;
        let elected =
            lock(&self.election).on_report(host, grant, agent_term, state_term, Instant::now());
        if let Some(term) = elected {
            self.take_office(term, state, file).await;
        }
        let state_term = state.lock().await.term.0;
        let mut e = lock(&self.election);
        let now = Instant::now();
        let lease_request_term = e.lease_request(state_term);
        ReportVerdict {
            primary: e.is_primary(now),
            lease_request_term,
            // Recorded before the reply leaves: the lease cannot start earlier.
            lease_request_id: if lease_request_term > 0 {
                e.issue_request(now)
            } else {
                0
            },
        }
    }

    /// Elected in `term`: take the peer's state if it is newer than ours (a CMServer
    /// that was down while the other one decided things must not act on its old
    /// state), persist the term in the state file, then act.
    async fn take_office(
        &self,
        term: u64,
        state: &tokio::sync::Mutex<ClusterState>,
        file: &StateFile,
    ) {
        // Taking office runs inside an agent's Report call: when the agent gives up on
        // that call (its own timeout, under load) the future is dropped at an await.
        // Without this guard the election stayed `Elected` for good, neither primary
        // nor campaigning again: the pair had no primary until a restart.
        let mut unfinished = Unfinished {
            pair: self,
            term,
            armed: true,
        };
        self.take_office_inner(term, state, file).await;
        unfinished.armed = false;
    }

    async fn take_office_inner(
        &self,
        term: u64,
        state: &tokio::sync::Mutex<ClusterState>,
        file: &StateFile,
    ) {
        let theirs = self.probe_peers(term).await;
        let mut guard = state.lock().await;
        let mut base = guard.clone();
        for (peer, s) in theirs {
            if newer(&s, &base) {
                tracing::info!(%peer, peer_term = s.term.0, own_term = base.term.0, version = s.version, "taking the peer's newer state before acting");
                base = s;
            }
        }
        if base.version < self.newest_seen() {
            // An agent has seen a newer state than any we could get: acting on ours
            // could undo decisions already made (the up-to-date rule).
            tracing::warn!(
                term,
                version = base.version,
                seen = self.newest_seen(),
                "elected with an older state than agents have seen: not acting"
            );
            lock(&self.election).persist_failed(term, Instant::now());
            return;
        }
        if base.term.0 >= term {
            tracing::warn!(
                term,
                state_term = base.term.0,
                "elected in a term the state already has: not acting"
            );
            let mut e = lock(&self.election);
            e.persist_failed(term, Instant::now());
            e.on_foreign_term(base.term.0, guard.term.0, Instant::now());
            return;
        }
        let mut next = base;
        next.term = Term(term);
        next.version += 1;
        next.order_id_base = next
            .order_id_base
            .saturating_add(crate::state::ORDER_ID_BLOCK);
        let f = file.clone();
        let to_write = next.clone();
        let written = tokio::task::spawn_blocking(move || f.persist(&to_write)).await;
        match written {
            Ok(Ok(())) => {
                *guard = next;
                drop(guard);
                self.tenure.store(term, std::sync::atomic::Ordering::SeqCst);
                let acting = lock(&self.election).confirm(term, term, Instant::now());
                tracing::info!(node = %self.node, term, acting, "CMServer primary");
            }
            Ok(Err(e)) => {
                tracing::error!("cannot persist the elected term {term}: {e}");
                lock(&self.election).persist_failed(term, Instant::now());
            }
            Err(e) => {
                tracing::error!("persist task failed: {e}");
                lock(&self.election).persist_failed(term, Instant::now());
            }
        }
    }

    /// Asks every peer for its state (bounded); returns those that answered.
    async fn probe_peers(&self, term: u64) -> Vec<(String, ClusterState)> {
        let mut out = Vec::new();
        for peer in &self.peers {
            let req = SyncStateRequest {
                term,
                from: self.node.clone(),
                probe: true,
                ..Default::default()
            };
            match peer.client.clone().sync_state(req).await {
                Ok(reply) => {
                    let reply = reply.into_inner();
                    match ClusterState::from_bytes(std::path::Path::new(&peer.name), &reply.state) {
                        Ok(s) => out.push((peer.name.clone(), s)),
                        Err(e) => {
                            tracing::warn!(peer = %peer.name, "bad state in probe reply: {e}")
                        }
                    }
                }
                Err(s) => {
                    tracing::info!(peer = %peer.name, "peer not reachable before taking office: {}", s.message())
                }
            }
        }
        out
    }

    /// The standby's side of `SyncState` (and the answer to a probe).
    pub async fn on_sync(
        &self,
        req: SyncStateRequest,
        state: &tokio::sync::Mutex<ClusterState>,
        file: &StateFile,
    ) -> Result<SyncStateReply, Status> {
        if req.probe {
            let guard = state.lock().await;
            lock(&self.election).on_foreign_term(req.term, guard.term.0, Instant::now());
            return Ok(SyncStateReply {
                term: guard.term.0,
                accepted: false,
                reason: "probe".into(),
                state: guard.to_bytes(),
            });
        }
        let incoming = ClusterState::from_bytes(std::path::Path::new("SyncState"), &req.state)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        if incoming.term.0 != req.term {
            return Err(Status::invalid_argument(format!(
                "SyncState term {} differs from its state's term {}",
                req.term, incoming.term
            )));
        }
        let mut guard = state.lock().await;
        let mine = guard.term.0;
        let reject = |reason: String| SyncStateReply {
            term: mine,
            accepted: false,
            reason,
            state: Vec::new(),
        };
        if req.term < mine {
            return Ok(reject(format!(
                "term {} is older than this CMServer's term {mine}",
                req.term
            )));
        }
        {
            let now = Instant::now();
            let mut e = lock(&self.election);
            e.on_foreign_term(req.term, mine, now);
            if e.is_primary(now) || matches!(e.role(), Role::Elected { .. }) {
                return Ok(reject(format!("{} is primary in term {mine}", self.node)));
            }
        }
        *lock(&self.last_sync_from) = Some((req.from.clone(), Instant::now()));
        if incoming.term == guard.term && incoming.version < guard.version {
            // A heartbeat copy overtaken by a change push (see `push`): already have newer.
            return Ok(SyncStateReply {
                term: req.term,
                accepted: true,
                reason: String::new(),
                state: Vec::new(),
            });
        }
        if *guard != incoming {
            let f = file.clone();
            let to_write = incoming.clone();
            tokio::task::spawn_blocking(move || f.persist(&to_write))
                .await
                .map_err(|e| Status::internal(format!("persist task failed: {e}")))?
                .map_err(|e| Status::unavailable(e.to_string()))?;
            if guard.term != incoming.term {
                tracing::info!(from = %req.from, term = req.term, "took the primary's state");
            }
            *guard = incoming;
        }
        Ok(SyncStateReply {
            term: req.term,
            accepted: true,
            reason: String::new(),
            state: Vec::new(),
        })
    }

    /// Sends a copy of the current state to every peer (if we are primary); returns
    /// when each answered or timed out. The state lock is NOT held meanwhile: a copy
    /// may reach the standby after a newer change push, and the standby ignores it
    /// (same term, lower version). Must not be called with the state lock held.
    pub async fn push(
        &self,
        state: &tokio::sync::Mutex<ClusterState>,
        peers_seen: &Mutex<HashMap<String, Instant>>,
    ) {
        if !self.is_primary() {
            return;
        }
        // A copy, sent without the state lock: at a thousand hosts every report
        // handler needs that lock, and a push waits for the standby (up to its RPC
        // timeout). The standby ignores a copy older than what it has (same term,
        // lower version), so a late heartbeat push never undoes a change push.
        let copy = state.lock().await.clone();
        self.push_state(&copy, peers_seen).await;
    }

    /// Sends `state` to every peer (if we are primary). For a caller that holds the
    /// state lock and has persisted `state` but not yet made it visible: the standby
    /// has a change before any agent is told about it.
    pub async fn push_state(
        &self,
        state: &ClusterState,
        peers_seen: &Mutex<HashMap<String, Instant>>,
    ) {
        if !self.is_primary() {
            return;
        }
        let (term, bytes) = (state.term.0, state.to_bytes());
        // Counted by bench/cm_scale (RUST_LOG=cm_server::pair=debug): the stream's
        // size and rate.
        tracing::debug!(bytes = bytes.len(), version = state.version, "state pushed");
        for peer in &self.peers {
            let req = SyncStateRequest {
                term,
                from: self.node.clone(),
                state: bytes.clone(),
                probe: false,
            };
            match peer.client.clone().sync_state(req).await {
                Ok(reply) => {
                    let reply = reply.into_inner();
                    lock(peers_seen).insert(peer.name.clone(), Instant::now());
                    if !reply.accepted {
                        tracing::warn!(peer = %peer.name, "state sync refused: {}", reply.reason);
                        lock(&self.election).on_foreign_term(reply.term, term, Instant::now());
                    }
                }
                Err(s) => {
                    tracing::debug!(peer = %peer.name, "state sync failed: {}", s.message())
                }
            }
        }
    }

    /// Runs forever: applies the clock to the election several times per heartbeat
    /// and streams the state once per heartbeat while primary.
    pub async fn run(
        &self,
        state: &tokio::sync::Mutex<ClusterState>,
        file: &StateFile,
        peers_seen: &Mutex<HashMap<String, Instant>>,
    ) {
        let tick = (self.heartbeat / TICK_DIVISOR).max(Duration::from_millis(20));
        let mut last_push: Option<Instant> = None;
        let mut last_catch_up: Option<Instant> = None;
        loop {
            tokio::time::sleep(tick).await;
            // Agents have seen a newer state than ours: fetch it (at most once per
            // heartbeat) before we may campaign; agents refuse us their lease meanwhile.
            let behind = state.lock().await.version < self.newest_seen();
            if behind
                && !self.is_primary()
                && last_catch_up.is_none_or(|t| t.elapsed() >= self.heartbeat)
            {
                last_catch_up = Some(Instant::now());
                self.catch_up(state, file).await;
            }
            let state_term = state.lock().await.term.0;
            let elected = lock(&self.election).tick(state_term, Instant::now());
            if let Some(term) = elected {
                self.take_office(term, state, file).await;
            }
            let due = last_push.is_none_or(|t| t.elapsed() >= self.heartbeat);
            if due && self.is_primary() {
                self.push(state, peers_seen).await;
                last_push = Some(Instant::now());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ha_common::proto::cm::LeaseGrant;

    /// cms1 of local.toml with cms2 at `peer_port`.
    fn config(peer_port: u16) -> ClusterConfig {
        let text = include_str!("../../configs/local.toml")
            .replace("port = 7002", &format!("port = {peer_port}"));
        ClusterConfig::parse(&text, std::path::Path::new("local.toml")).expect("config parses")
    }

    fn grant(term: u64, request_id: u64) -> LeaseGrant {
        LeaseGrant {
            holder: "cms1".into(),
            term,
            remaining_ms: 3000,
            request_id,
        }
    }

    #[tokio::test]
    async fn an_interrupted_take_office_campaigns_again_instead_of_staying_elected() {
        // cms2 accepts connections and never answers: the probe before taking office
        // waits its whole RPC timeout, and the report carrying the win is dropped first.
        let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let cfg = config(silent.local_addr().expect("addr").port());
        let dir = tempfile::tempdir().expect("tempdir");
        let file = StateFile::in_dir(dir.path());
        let state = tokio::sync::Mutex::new(ClusterState::initial(&cfg));
        let pair = Pair::new(&cfg, "cms1", Term(1));

        pair.on_report("h1", None, 1, &state, &file).await;
        let v = pair.on_report("h2", None, 1, &state, &file).await;
        assert_eq!(
            v.lease_request_term, 2,
            "a candidate in term 2 asks for leases"
        );
        pair.on_report("h1", Some(&grant(2, v.lease_request_id)), 2, &state, &file)
            .await;
        let g = grant(2, v.lease_request_id);
        let won = pair.on_report("h2", Some(&g), 2, &state, &file);
        let dropped = tokio::time::timeout(Duration::from_millis(50), won).await;
        assert!(
            dropped.is_err(),
            "the report was dropped while taking office"
        );

        assert!(
            matches!(pair.role(), Role::Follower { .. }),
            "after an interrupted take-office the election campaigns again, it is {:?}",
            pair.role()
        );
        assert!(!pair.is_primary());
        assert_eq!(state.lock().await.term, Term(1), "nothing acted on");
        drop(silent);
    }
}
