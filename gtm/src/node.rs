//! One GTM instance's behaviour, independent of gRPC: role and term, GXID allocation
//! with block reservations synced to the standby, 2PC decisions, and the standby side
//! of the pair's sync (reservations, decision pushes, snapshots, promotion).

use std::ops::Range;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use ha_common::proto::gtm as pb;
use tokio::sync::{watch, RwLock};

use crate::control_file::{ControlData, ControlError, ControlFile, PersistedRole};
use crate::decisions::{Decision, DecisionError, DecisionStore};
use crate::fast_lane::FastLane;
use crate::lease::{self, LeaseState};
use crate::replication::PeerLink;
use crate::reservation::{AllocError, Reservation, Step};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Primary,
    Standby,
}

impl Role {
    fn persisted(self) -> PersistedRole {
        match self {
            Role::Primary => PersistedRole::Primary,
            Role::Standby => PersistedRole::Standby,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Primary => "primary",
            Role::Standby => "standby",
        }
    }
}

/// Errors of GTM operations; each maps to one gRPC status code (see `server.rs`).
#[derive(Debug, Clone, thiserror::Error)]
pub enum GtmError {
    /// Clients move on to another endpoint on this one (the message prefix matters).
    #[error("not primary: {node} is {role}{detail}")]
    NotPrimary {
        node: String,
        role: &'static str,
        detail: String,
    },
    #[error("not standby: {node} is the primary of term {term}")]
    NotStandby { node: String, term: u64 },
    #[error("stale term: {node} is at term {own}, the request carries term {got}")]
    StaleTerm { node: String, own: u64, got: u64 },
    #[error("standby {standby} did not acknowledge within {waited_ms} ms ({last}); not handing out GXIDs/decisions it has not persisted (order `gtm run-alone` to continue without it)")]
    StandbyUnavailable {
        standby: String,
        waited_ms: u64,
        last: String,
    },
    /// A primary whose lease lapsed (or never came): clients move on and retry, as
    /// from a standby, until a primary with a lease answers.
    #[error("not primary: {node} holds no primary lease ({why})")]
    NoLease { node: String, why: String },
    #[error("{0}")]
    NotReady(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("storage failure: {0}")]
    Storage(String),
}

impl From<ControlError> for GtmError {
    fn from(e: ControlError) -> Self {
        GtmError::Storage(e.to_string())
    }
}

impl From<DecisionError> for GtmError {
    fn from(e: DecisionError) -> Self {
        match e {
            DecisionError::Conflict { .. } => GtmError::Conflict(e.to_string()),
            other => GtmError::Storage(other.to_string()),
        }
    }
}

impl From<AllocError> for GtmError {
    fn from(e: AllocError) -> Self {
        GtmError::InvalidArgument(e.to_string())
    }
}

/// Most GXIDs one NextGxid may ask for (keeps boundary arithmetic far from overflow).
pub const MAX_GXIDS_PER_REQUEST: u64 = 1 << 32;

/// Why a data dir could not be opened: the node refuses to start.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(transparent)]
    Control(#[from] ControlError),
    #[error(transparent)]
    Decisions(#[from] DecisionError),
}

/// Static settings of a node.
#[derive(Debug, Clone)]
pub struct NodeSettings {
    pub name: String,
    pub block_size: u64,
    pub sync_timeout: Duration,
    /// Hand out GXIDs and record decisions only under an unexpired lease (see
    /// [`crate::lease`]), renewed from the primary CMServer (`renew.rs`); the agent
    /// asks for it when `gtm.require_lease` is set (the default).
    pub require_lease: bool,
}

struct State {
    role: Role,
    term: u64,
    /// Copy of the persisted boundary (the control file is behind a blocking mutex).
    boundary: u64,
    ready: bool,
    attached: bool,
    run_alone: bool,
    last_error: String,
    alloc: Option<Reservation>,
    /// Bumped on every role change, so a reservation finishing after one does not
    /// touch the new allocator.
    epoch: u64,
}

/// The outcome of the latest reservation, for callers waiting on it.
#[derive(Debug, Clone, Default)]
struct ReserveEvent {
    error: Option<GtmError>,
}

pub struct Node {
    pub settings: NodeSettings,
    peer: Option<PeerLink>,
    st: Mutex<State>,
    control: Arc<Mutex<ControlFile>>,
    pub(crate) decisions: DecisionStore,
    /// Primary: every write that must reach the standby holds it shared across its
    /// sync and local persist; a snapshot for the standby (or a full re-push) holds it
    /// exclusively, so that nothing slips between the copy and the attach.
    gate: RwLock<()>,
    /// Role and term changes hold it exclusively; sync handlers on the standby hold it
    /// shared across their term check and persist, so that a promotion never reads a
    /// boundary that a stale primary's reservation raises right after.
    role_lock: RwLock<()>,
    reserve_events: watch::Sender<ReserveEvent>,
    /// The hot path: grants within the current block without the lock (see
    /// [`FastLane`]); open only while primary, closed around every change of `st`
    /// that concerns allocation.
    lane: FastLane,
    /// The lease's state machine; its deadline mirrored in `lease_until` (monotonic
    /// ns) for the lock-free hot path.
    lease: Mutex<LeaseState>,
    lease_until: AtomicU64,
    /// Wakes the renewal loop (`renew.rs`) at once: a grant found no lease, or this
    /// GTM was just promoted (its lease must not wait for the next round).
    pub lease_wanted: watch::Sender<u64>,
    /// Prometheus counters (atomics: one relaxed add per grant).
    pub counters: GtmCounters,
}

/// What the GTM counts for /metrics.
#[derive(Clone, Default)]
pub struct GtmCounters {
    /// GXIDs handed out by this node as primary.
    pub handed_out: ha_common::metrics::prometheus_client::metrics::counter::Counter,
    /// Blocks reserved durably (standby first, then here).
    pub reservations: ha_common::metrics::prometheus_client::metrics::counter::Counter,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Node {
    /// Opens the data dir (control file + decision log) and builds the node in `role`.
    pub fn open(
        settings: NodeSettings,
        data_dir: &Path,
        config_role: Role,
        peer: Option<PeerLink>,
    ) -> Result<(Arc<Node>, ControlData), OpenError> {
        let control = ControlFile::open_or_create(data_dir, Some(config_role.persisted()))?;
        let decisions = DecisionStore::open(data_dir)?;
        let data = control.data();
        let role = match data.role {
            Some(PersistedRole::Primary) => Role::Primary,
            Some(PersistedRole::Standby) => Role::Standby,
            None => config_role,
        };
        let alloc = (role == Role::Primary)
            .then(|| Reservation::starting_at(data.boundary, settings.block_size));
        let node = Node {
            peer,
            st: Mutex::new(State {
                role,
                term: data.term,
                boundary: data.boundary,
                ready: false,
                attached: false,
                run_alone: role == Role::Primary && data.run_alone,
                last_error: String::new(),
                alloc,
                epoch: 0,
            }),
            control: Arc::new(Mutex::new(control)),
            decisions,
            gate: RwLock::new(()),
            role_lock: RwLock::new(()),
            reserve_events: watch::channel(ReserveEvent::default()).0,
            lane: FastLane::default(),
            lease: Mutex::new(LeaseState::default()),
            lease_until: AtomicU64::new(0),
            lease_wanted: watch::channel(0).0,
            counters: GtmCounters::default(),
            settings,
        };
        node.reopen_lane(&lock(&node.st));
        Ok((Arc::new(node), data))
    }

    pub fn name(&self) -> &str {
        &self.settings.name
    }

    pub fn peer(&self) -> Option<&PeerLink> {
        self.peer.as_ref()
    }

    pub fn role(&self) -> Role {
        lock(&self.st).role
    }

    pub fn term(&self) -> u64 {
        lock(&self.st).term
    }

    pub(crate) fn is_attached(&self) -> bool {
        lock(&self.st).attached
    }

    pub(crate) fn is_ready(&self) -> bool {
        lock(&self.st).ready
    }

    pub(crate) fn set_last_error(&self, e: String) {
        lock(&self.st).last_error = e;
    }

    fn not_primary(&self, st: &State) -> GtmError {
        GtmError::NotPrimary {
            node: self.settings.name.clone(),
            role: st.role.as_str(),
            detail: if st.last_error.is_empty() {
                String::new()
            } else {
                format!(" ({})", st.last_error)
            },
        }
    }

    /// Durably updates the control file (on a blocking thread: it fsyncs) and mirrors
    /// the result in memory.
    async fn persist(
        &self,
        f: impl FnOnce(ControlData) -> ControlData + Send + 'static,
    ) -> Result<ControlData, GtmError> {
        let control = self.control.clone();
        let data = tokio::task::spawn_blocking(move || {
            let mut cf = lock(&control);
            let new = f(cf.data());
            if new != cf.data() {
                cf.persist(new)?;
            }
            Ok::<_, ControlError>(new)
        })
        .await
        .map_err(|e| GtmError::Storage(format!("control file writer panicked: {e}")))??;
        let mut st = lock(&self.st);
        st.boundary = st.boundary.max(data.boundary);
        st.term = st.term.max(data.term);
        Ok(data)
    }

    pub fn status(&self) -> pb::GtmStatus {
        let st = lock(&self.st);
        pb::GtmStatus {
            name: self.settings.name.clone(),
            role: match st.role {
                Role::Primary => pb::Role::Primary,
                Role::Standby => pb::Role::Standby,
            } as i32,
            term: st.term,
            boundary: st.boundary,
            next_gxid: st
                .alloc
                .as_ref()
                .map(|a| a.next().max(self.lane.peek_next().unwrap_or(0)))
                .unwrap_or(0),
            ready: st.ready,
            standby_attached: st.attached,
            run_alone: st.run_alone,
            decisions: self.decisions.len() as u64,
            last_error: st.last_error.clone(),
            lease_required: self.settings.require_lease,
            lease_ms_left: self
                .lease_until
                .load(SeqCst)
                .saturating_sub(ha_common::clock::monotonic_ns())
                / 1_000_000,
        }
    }

    // ---------------------------------------------------------------- lease

    /// `Ok` while GXIDs may be handed out as far as the lease goes (always, without
    /// `--require-lease`). One atomic load and one clock read on the hot path.
    fn check_lease(&self) -> Result<(), GtmError> {
        if !self.settings.require_lease {
            return Ok(());
        }
        let now = ha_common::clock::monotonic_ns();
        if now < self.lease_until.load(SeqCst) {
            return Ok(());
        }
        self.want_lease();
        let mut l = lock(&self.lease);
        *l = l.transition(lease::Event::Tick { now }).unwrap_or(*l);
        Err(GtmError::NoLease {
            node: self.settings.name.clone(),
            why: l.why_not(now),
        })
    }

    /// The primary CMServer answered the renewal this GTM sent at `sent_at_ns` (its own
    /// clock) with a promise of `valid_for_ms` (in any role: a standby assigned
    /// primary holds it the moment it is promoted).
    pub fn renew_lease(
        &self,
        cm_term: u64,
        valid_for_ms: u64,
        sent_at_ns: u64,
    ) -> Result<(), GtmError> {
        let now = ha_common::clock::monotonic_ns();
        let confirmed = lease::deadline(sent_at_ns, valid_for_ms, now).and_then(|until| {
            let mut l = lock(&self.lease);
            *l = l.transition(lease::Event::Renewed {
                cm_term,
                until,
                now,
            })?;
            self.lease_until.store(l.until(), SeqCst);
            Ok(())
        });
        confirmed.map_err(|e| match e {
            lease::LeaseError::StaleTerm { .. } => GtmError::StaleTerm {
                node: self.settings.name.clone(),
                own: lock(&self.lease).cm_term,
                got: cm_term,
            },
            other => GtmError::InvalidArgument(other.to_string()),
        })
    }

    /// Asks the renewal loop for a renewal now.
    pub fn want_lease(&self) {
        self.lease_wanted.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// The primary role is gone, and with it whatever was promised to it.
    fn revoke_lease(&self) {
        let mut l = lock(&self.lease);
        *l = l.transition(lease::Event::Revoke).unwrap_or(*l);
        self.lease_until.store(0, SeqCst);
    }

    // ---------------------------------------------------------------- primary side

    /// Hands out `count` contiguous GXIDs, reserving blocks as needed. Callers that
    /// arrive during a reservation wait for it (bounded by the sync timeout).
    pub async fn next_gxid(self: &Arc<Self>, count: u64) -> Result<(Range<u64>, u64), GtmError> {
        let out = self.grant(count).await;
        if let Ok((r, _)) = &out {
            self.counters.handed_out.inc_by(r.end - r.start);
        }
        out
    }

    async fn grant(self: &Arc<Self>, count: u64) -> Result<(Range<u64>, u64), GtmError> {
        if count > MAX_GXIDS_PER_REQUEST {
            return Err(GtmError::InvalidArgument(format!(
                "count {count} is above the limit of {MAX_GXIDS_PER_REQUEST} GXIDs per request"
            )));
        }
        self.check_lease()?;
        if let Some(grant) = self.lane.try_grant(count) {
            return Ok(grant);
        }
        // Bounded: each round either grants, or waits for / performs one reservation.
        for _ in 0..64 {
            let mut events = self.reserve_events.subscribe();
            let (step, term, epoch) = {
                let mut st = lock(&self.st);
                if st.role != Role::Primary {
                    return Err(self.not_primary(&st));
                }
                self.close_lane(&mut st);
                let (term, epoch) = (st.term, st.epoch);
                let Some(alloc) = st.alloc.as_mut() else {
                    return Err(self.not_primary(&st));
                };
                let step = alloc.allocate(count);
                self.reopen_lane(&st);
                (step?, term, epoch)
            };
            match step {
                Step::Grant(r) => {
                    // Again: a reservation may have taken up to the sync timeout.
                    self.check_lease()?;
                    return Ok((r, term));
                }
                Step::GrantAndPrefetch(r, boundary) => {
                    let me = self.clone();
                    tokio::spawn(async move {
                        let _ = me.reserve(boundary, epoch).await;
                    });
                    self.check_lease()?;
                    return Ok((r, term));
                }
                Step::Reserve(boundary) => self.reserve(boundary, epoch).await?,
                Step::Wait => {
                    let wait = self.settings.sync_timeout + Duration::from_secs(1);
                    match tokio::time::timeout(wait, events.changed()).await {
                        Ok(Ok(())) => {
                            if let Some(e) = events.borrow_and_update().error.clone() {
                                return Err(e);
                            }
                        }
                        Ok(Err(_)) | Err(_) => {
                            return Err(GtmError::StandbyUnavailable {
                                standby: self.peer_name(),
                                waited_ms: wait.as_millis() as u64,
                                last: "reservation in flight did not finish".into(),
                            })
                        }
                    }
                }
            }
        }
        Err(GtmError::Storage(
            "allocation did not settle after 64 reservations".into(),
        ))
    }

    /// Takes the lane back into the state machine (under `st`'s lock): what it
    /// handed out is no longer the allocator's to give.
    fn close_lane(&self, st: &mut State) {
        if let Some(reached) = self.lane.close() {
            if let Some(a) = st.alloc.as_mut() {
                a.granted_up_to(reached);
            }
        }
    }

    /// Opens the lane on what the allocator may hand out without deciding anything,
    /// while primary (under `st`'s lock, the lane closed).
    fn reopen_lane(&self, st: &State) {
        if st.role != Role::Primary {
            return;
        }
        if let Some(a) = &st.alloc {
            let (next, end) = a.lane();
            self.lane.open(next, end, st.term);
        }
    }

    fn peer_name(&self) -> String {
        self.peer
            .as_ref()
            .map(|p| p.name.clone())
            .unwrap_or_else(|| "(none configured)".into())
    }

    /// Reserves up to `boundary`: the standby persists it first, then this node; only
    /// then may allocation use it. Wakes every waiter with the outcome.
    async fn reserve(self: &Arc<Self>, boundary: u64, epoch: u64) -> Result<(), GtmError> {
        let res = self.reserve_durably(boundary).await;
        {
            let mut st = lock(&self.st);
            if st.epoch == epoch {
                self.close_lane(&mut st);
                if let Some(a) = st.alloc.as_mut() {
                    match &res {
                        Ok(()) => a.reserved(boundary),
                        Err(_) => a.reserve_failed(),
                    }
                }
                self.reopen_lane(&st);
            }
            if let Err(e) = &res {
                st.last_error = e.to_string();
            }
        }
        if let Err(e) = &res {
            tracing::warn!(boundary, "reservation failed: {e}");
        }
        self.reserve_events.send_replace(ReserveEvent {
            error: res.clone().err(),
        });
        res
    }

    async fn reserve_durably(self: &Arc<Self>, boundary: u64) -> Result<(), GtmError> {
        let _gate = self.gate.read().await;
        let term = self.primary_term()?;
        self.sync_to_standby(term, |peer| async move {
            peer.reserve_block(term, boundary).await
        })
        .await?;
        // The order matters: if we crash here the standby is ahead, which is safe.
        self.persist(move |d| ControlData {
            boundary: d.boundary.max(boundary),
            ..d
        })
        .await?;
        self.counters.reservations.inc();
        Ok(())
    }

    /// `Ok` while this node is primary (a stream of GXID requests may be opened).
    pub fn check_primary(&self) -> Result<(), GtmError> {
        self.primary_term().map(|_| ())
    }

    fn primary_term(&self) -> Result<u64, GtmError> {
        let st = lock(&self.st);
        if st.role != Role::Primary {
            return Err(self.not_primary(&st));
        }
        Ok(st.term)
    }

    /// Sends one sync message to the standby and waits for its acknowledgement, for at
    /// most the sync timeout (retrying while the standby is unreachable). Running alone,
    /// a detached standby is skipped and a failing one is detached after one attempt.
    async fn sync_to_standby<F, Fut>(self: &Arc<Self>, term: u64, call: F) -> Result<(), GtmError>
    where
        F: Fn(PeerLink) -> Fut,
        Fut: std::future::Future<Output = Result<pb::SyncAck, tonic::Status>>,
    {
        let (run_alone, attached) = {
            let st = lock(&self.st);
            (st.run_alone, st.attached)
        };
        let Some(peer) = self.peer.clone() else {
            return if run_alone {
                Ok(())
            } else {
                Err(GtmError::StandbyUnavailable {
                    standby: self.peer_name(),
                    waited_ms: 0,
                    last: "no standby configured".into(),
                })
            };
        };
        if run_alone && !attached {
            return Ok(());
        }
        let timeout = self.settings.sync_timeout;
        let deadline = Instant::now() + timeout;
        let mut backoff = Duration::from_millis(20);
        let mut last;
        loop {
            let remaining = deadline
                .saturating_duration_since(Instant::now())
                .max(Duration::from_millis(1));
            match tokio::time::timeout(remaining, call(peer.clone())).await {
                Ok(Ok(ack)) if !ack.rejected => {
                    lock(&self.st).attached = true;
                    return Ok(());
                }
                Ok(Ok(ack)) => {
                    if ack.term > term || ack.role == pb::Role::Primary as i32 {
                        let reason =
                            format!("standby {} rejected our sync: {}", peer.name, ack.reason);
                        self.step_down(ack.term, reason).await;
                        return Err(self.not_primary(&lock(&self.st)));
                    }
                    last = format!("rejected: {}", ack.reason);
                }
                Ok(Err(status)) => last = status.message().to_string(),
                Err(_) => last = "timed out".into(),
            }
            lock(&self.st).attached = false;
            if run_alone {
                tracing::warn!("standby {} lost ({last}); running alone", peer.name);
                return Ok(());
            }
            if Instant::now() + backoff >= deadline {
                return Err(GtmError::StandbyUnavailable {
                    standby: peer.name.clone(),
                    waited_ms: timeout.as_millis() as u64,
                    last,
                });
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_millis(200));
        }
    }

    /// Leaves the primary role because a peer has a higher term (or is primary): stop
    /// serving clients, then catch up from the peer as a standby.
    pub(crate) async fn step_down(self: &Arc<Self>, peer_term: u64, reason: String) {
        let _roles = self.role_lock.write().await;
        let term = {
            let mut st = lock(&self.st);
            if st.role == Role::Primary {
                tracing::error!("stepping down: {reason}");
            }
            self.close_lane(&mut st);
            st.role = Role::Standby;
            st.run_alone = false;
            st.alloc = None;
            st.ready = false;
            st.attached = false;
            st.epoch += 1;
            st.term = st.term.max(peer_term);
            st.last_error = format!("stepped down: {reason}");
            st.term
        };
        self.revoke_lease();
        if let Err(e) = self
            .persist(move |d| ControlData {
                term: d.term.max(term),
                role: Some(PersistedRole::Standby),
                run_alone: false,
                ..d
            })
            .await
        {
            tracing::error!("cannot persist step-down: {e}");
        }
    }

    /// Records a 2PC decision durably on the standby and here (concurrently).
    pub async fn record_decision(
        self: &Arc<Self>,
        gxid: u64,
        d: Decision,
    ) -> Result<u64, GtmError> {
        if gxid == 0 {
            return Err(GtmError::InvalidArgument(
                "GXID 0 is not a valid transaction".into(),
            ));
        }
        let term = self.primary_term()?;
        self.check_lease()?;
        self.decisions.claim(gxid, d)?;
        let _gate = self.gate.read().await;
        let records = [(gxid, d)];
        let push =
            self.sync_to_standby(
                term,
                |peer| async move { peer.replicate(term, &records).await },
            );
        let local = self.decisions.append(&records);
        let (pushed, logged) = tokio::join!(push, local);
        pushed?;
        logged?;
        // Only now may GetDecision answer it: before, a failover could forget it.
        self.decisions.confirm(gxid);
        Ok(term)
    }

    pub fn get_decision(&self, gxid: u64) -> Result<(Option<Decision>, u64), GtmError> {
        let term = self.primary_term()?;
        Ok((self.decisions.get(gxid), term))
    }

    /// The whole state for a new or returning standby. Marks the standby attached while
    /// no write is in flight, so every later write goes to it as well.
    pub async fn snapshot(
        self: &Arc<Self>,
        standby_term: u64,
        standby: &str,
    ) -> Result<pb::GtmSnapshot, GtmError> {
        let own = self.primary_term()?;
        if standby_term > own {
            self.step_down(
                standby_term,
                format!("standby {standby} has term {standby_term}"),
            )
            .await;
            return Err(self.not_primary(&lock(&self.st)));
        }
        let _gate = self.gate.write().await;
        let mut st = lock(&self.st);
        if st.role != Role::Primary {
            return Err(self.not_primary(&st));
        }
        st.attached = true;
        tracing::info!(standby, boundary = st.boundary, "standby copies our state");
        Ok(pb::GtmSnapshot {
            term: st.term,
            boundary: st.boundary,
            decisions: to_records(&self.decisions.all()),
        })
    }

    /// Pushes the whole state to a detached standby (it may have missed writes while we
    /// ran alone); on success it is attached again.
    pub(crate) async fn push_full_state(self: &Arc<Self>) -> Result<(), GtmError> {
        let Some(peer) = self.peer.clone() else {
            return Ok(());
        };
        let timeout = self.settings.sync_timeout;
        // Probe first, without the gate: holding it while a dead peer times out would
        // stall every write of a primary running alone.
        match tokio::time::timeout(timeout, peer.status()).await {
            Ok(Ok(_)) => {}
            Ok(Err(s)) => {
                return Err(GtmError::StandbyUnavailable {
                    standby: peer.name.clone(),
                    waited_ms: 0,
                    last: s.message().to_string(),
                })
            }
            Err(_) => {
                return Err(GtmError::StandbyUnavailable {
                    standby: peer.name.clone(),
                    waited_ms: timeout.as_millis() as u64,
                    last: "status probe timed out".into(),
                })
            }
        }
        let _gate = self.gate.write().await;
        let (term, boundary) = {
            let st = lock(&self.st);
            if st.role != Role::Primary {
                return Ok(());
            }
            (st.term, st.boundary)
        };
        let check =
            |r: Result<Result<pb::SyncAck, tonic::Status>, tokio::time::error::Elapsed>| match r {
                Ok(Ok(ack)) if !ack.rejected => Ok(None),
                Ok(Ok(ack)) => Ok(Some(ack)),
                Ok(Err(s)) => Err(s.message().to_string()),
                Err(_) => Err("timed out".to_string()),
            };
        let mut rejected =
            check(tokio::time::timeout(timeout, peer.reserve_block(term, boundary)).await);
        if matches!(rejected, Ok(None)) {
            let all = self.decisions.all();
            rejected = check(tokio::time::timeout(timeout, peer.replicate(term, &all)).await);
        }
        match rejected {
            Ok(None) => {
                let mut st = lock(&self.st);
                if !st.attached {
                    tracing::info!("standby {} attached", peer.name);
                }
                st.attached = true;
                Ok(())
            }
            Ok(Some(ack)) => {
                if ack.term > term || ack.role == pb::Role::Primary as i32 {
                    drop(_gate);
                    self.step_down(
                        ack.term,
                        format!("peer {} rejected our sync: {}", peer.name, ack.reason),
                    )
                    .await;
                }
                Err(GtmError::NotStandby {
                    node: peer.name.clone(),
                    term: ack.term,
                })
            }
            Err(last) => Err(GtmError::StandbyUnavailable {
                standby: peer.name.clone(),
                waited_ms: timeout.as_millis() as u64,
                last,
            }),
        }
    }

    // ---------------------------------------------------------------- standby side

    /// A sync message is acceptable if it comes from our term or later, and we are a
    /// standby (a primary seeing a higher term steps down first).
    async fn accept_sync(self: &Arc<Self>, term: u64, what: &str) {
        let (role, own) = {
            let st = lock(&self.st);
            (st.role, st.term)
        };
        if role == Role::Primary && term > own {
            self.step_down(term, format!("{what} from a primary of term {term}"))
                .await;
        }
    }

    fn reject(&self, reason: String) -> pb::SyncAck {
        let st = lock(&self.st);
        pb::SyncAck {
            term: st.term,
            rejected: true,
            reason,
            role: match st.role {
                Role::Primary => pb::Role::Primary,
                Role::Standby => pb::Role::Standby,
            } as i32,
        }
    }

    fn check_sync_term(&self, term: u64) -> Option<pb::SyncAck> {
        let (role, own) = {
            let st = lock(&self.st);
            (st.role, st.term)
        };
        if term < own {
            return Some(self.reject(format!(
                "stale term {term}: {} is at term {own}",
                self.settings.name
            )));
        }
        if role == Role::Primary {
            return Some(self.reject(format!(
                "{} is the primary of term {own}",
                self.settings.name
            )));
        }
        None
    }

    fn ack(&self) -> pb::SyncAck {
        pb::SyncAck {
            term: self.term(),
            rejected: false,
            reason: String::new(),
            role: pb::Role::Standby as i32,
        }
    }

    /// Standby: persist the primary's new boundary (never lowering ours).
    pub async fn on_reserve_block(
        self: &Arc<Self>,
        term: u64,
        boundary: u64,
    ) -> Result<pb::SyncAck, GtmError> {
        self.accept_sync(term, "ReserveBlock").await;
        let _roles = self.role_lock.read().await;
        if let Some(rej) = self.check_sync_term(term) {
            return Ok(rej);
        }
        self.persist(move |d| ControlData {
            term: d.term.max(term),
            boundary: d.boundary.max(boundary),
            ..d
        })
        .await?;
        Ok(self.ack())
    }

    /// Standby: log the primary's decisions durably.
    pub async fn on_replicate(
        self: &Arc<Self>,
        term: u64,
        records: &[(u64, Decision)],
    ) -> Result<pb::SyncAck, GtmError> {
        self.accept_sync(term, "ReplicateDecisions").await;
        let _roles = self.role_lock.read().await;
        if let Some(rej) = self.check_sync_term(term) {
            return Ok(rej);
        }
        if term > self.term() {
            self.persist(move |d| ControlData {
                term: d.term.max(term),
                ..d
            })
            .await?;
        }
        self.decisions.merge(records)?;
        // Log them all, not only the new ones: an identical concurrent push may not be
        // durable yet, and duplicates in the log are harmless.
        self.decisions.append(records).await?;
        Ok(self.ack())
    }

    /// Standby: merge a snapshot of the primary (max boundary and term, union of
    /// decisions); afterwards the standby is ready.
    pub(crate) async fn apply_snapshot(
        self: &Arc<Self>,
        snap: pb::GtmSnapshot,
    ) -> Result<(), GtmError> {
        let _roles = self.role_lock.read().await;
        if self.role() != Role::Standby {
            return Ok(());
        }
        let records = from_records(&snap.decisions)?;
        let fresh = self.decisions.merge(&records)?;
        self.decisions.append(&fresh).await?;
        let (term, boundary) = (snap.term, snap.boundary);
        self.persist(move |d| ControlData {
            term: d.term.max(term),
            boundary: d.boundary.max(boundary),
            ..d
        })
        .await?;
        let mut st = lock(&self.st);
        st.ready = true;
        st.last_error.clear();
        tracing::info!(
            boundary = st.boundary,
            term = st.term,
            decisions = records.len(),
            "standby is ready"
        );
        Ok(())
    }

    // ---------------------------------------------------------------- orders

    /// Promotes this standby; `term` 0 means own term + 1.
    pub async fn promote(
        self: &Arc<Self>,
        term: u64,
        run_alone: bool,
    ) -> Result<pb::GtmStatus, GtmError> {
        let _roles = self.role_lock.write().await;
        let new_term = {
            let mut st = lock(&self.st);
            if st.role == Role::Primary && (term == 0 || term <= st.term) {
                st.run_alone |= run_alone;
                drop(st);
                return Ok(self.status());
            }
            let new_term = match term {
                0 => st.term + 1,
                t if t > st.term => t,
                t => {
                    return Err(GtmError::StaleTerm {
                        node: self.settings.name.clone(),
                        own: st.term,
                        got: t,
                    })
                }
            };
            if st.role == Role::Standby && !st.ready {
                return Err(GtmError::NotReady(format!(
                    "{} has not copied the primary's state yet (not ready); promoting it could reuse GXIDs",
                    self.settings.name
                )));
            }
            new_term
        };
        let data = self
            .persist(move |d| ControlData {
                term: new_term,
                role: Some(PersistedRole::Primary),
                run_alone: d.run_alone || run_alone,
                ..d
            })
            .await?;
        {
            let mut st = lock(&self.st);
            self.close_lane(&mut st);
            st.role = Role::Primary;
            st.term = new_term;
            st.alloc = Some(Reservation::starting_at(
                data.boundary,
                self.settings.block_size,
            ));
            st.epoch += 1;
            self.reopen_lane(&st);
            st.attached = false;
            st.run_alone |= run_alone;
            st.last_error.clear();
        }
        tracing::info!(
            term = new_term,
            boundary = data.boundary,
            run_alone,
            "promoted to primary"
        );
        if self.settings.require_lease && self.check_lease().is_err() {
            tracing::info!("promoted without a lease yet: renewing it now");
        }
        Ok(self.status())
    }

    /// Demotes this instance to standby (it then copies the primary's state).
    pub async fn demote(self: &Arc<Self>, term: u64) -> Result<pb::GtmStatus, GtmError> {
        let own = self.term();
        if term < own {
            return Err(GtmError::StaleTerm {
                node: self.settings.name.clone(),
                own,
                got: term,
            });
        }
        self.step_down(term, format!("demoted by an order of term {term}"))
            .await;
        Ok(self.status())
    }

    /// The run-alone order; durable (gtm.control) before it takes effect, so that a
    /// restarted primary keeps obeying it.
    pub async fn set_run_alone(
        self: &Arc<Self>,
        term: u64,
        run_alone: bool,
    ) -> Result<pb::GtmStatus, GtmError> {
        let own = self.term();
        if term < own {
            return Err(GtmError::StaleTerm {
                node: self.settings.name.clone(),
                own,
                got: term,
            });
        }
        self.persist(move |d| ControlData { run_alone, ..d })
            .await?;
        lock(&self.st).run_alone = run_alone;
        tracing::info!(run_alone, "run-alone order");
        Ok(self.status())
    }

    /// At start: a primary whose peer is already primary with an equal or higher term
    /// (the peer was promoted while we were down) becomes a standby instead.
    pub async fn yield_to_newer_primary(self: &Arc<Self>, peer_status: &pb::GtmStatus) {
        let own = self.term();
        if self.role() == Role::Primary
            && peer_status.role == pb::Role::Primary as i32
            && peer_status.term >= own
        {
            self.step_down(
                peer_status.term,
                format!(
                    "peer {} is already primary of term {}",
                    peer_status.name, peer_status.term
                ),
            )
            .await;
        }
    }
}

pub fn to_records(list: &[(u64, Decision)]) -> Vec<pb::DecisionRecord> {
    list.iter()
        .map(|(g, d)| pb::DecisionRecord {
            gxid: *g,
            decision: decision_to_pb(*d) as i32,
        })
        .collect()
}

pub fn from_records(list: &[pb::DecisionRecord]) -> Result<Vec<(u64, Decision)>, GtmError> {
    list.iter()
        .map(|r| Ok((r.gxid, decision_from_pb(r.decision)?)))
        .collect()
}

pub fn decision_to_pb(d: Decision) -> pb::Decision {
    match d {
        Decision::Commit => pb::Decision::Commit,
        Decision::Abort => pb::Decision::Abort,
    }
}

pub fn decision_from_pb(code: i32) -> Result<Decision, GtmError> {
    match pb::Decision::try_from(code) {
        Ok(pb::Decision::Commit) => Ok(Decision::Commit),
        Ok(pb::Decision::Abort) => Ok(Decision::Abort),
        _ => Err(GtmError::InvalidArgument(format!(
            "decision must be COMMIT or ABORT, got code {code}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(dir: &Path, role: Role) -> Arc<Node> {
        let settings = NodeSettings {
            name: "g".into(),
            block_size: 100,
            sync_timeout: Duration::from_millis(100),
            require_lease: false,
        };
        Node::open(settings, dir, role, None).unwrap().0
    }

    fn snap(term: u64, boundary: u64) -> pb::GtmSnapshot {
        pb::GtmSnapshot {
            term,
            boundary,
            decisions: to_records(&[(7, Decision::Commit)]),
        }
    }

    #[tokio::test]
    async fn standby_fences_stale_terms_and_never_lowers_its_boundary() {
        let base = tempfile::tempdir().unwrap();
        let n = node(&base.path().join("g"), Role::Standby);
        assert!(!n.on_reserve_block(0, 500).await.unwrap().rejected);
        assert!(!n.on_reserve_block(0, 300).await.unwrap().rejected);
        assert_eq!(n.status().boundary, 500);
        // Not ready yet: promotion is refused.
        assert!(matches!(
            n.promote(0, false).await,
            Err(GtmError::NotReady(_))
        ));
        n.apply_snapshot(snap(2, 400)).await.unwrap();
        assert_eq!(
            (n.term(), n.status().boundary, n.status().decisions),
            (2, 500, 1)
        );
        let ack = n.on_reserve_block(1, 900).await.unwrap();
        assert!(ack.rejected && ack.term == 2, "{ack:?}");
        assert_eq!(n.status().boundary, 500);
        // An explicit promotion term must be above ours; 0 means ours + 1.
        assert!(matches!(
            n.promote(2, false).await,
            Err(GtmError::StaleTerm { .. })
        ));
        let s = n.promote(0, true).await.unwrap();
        assert_eq!((s.term, s.role), (3, pb::Role::Primary as i32));
        // The promoted standby continues from its persisted boundary.
        let (r, term) = n.next_gxid(5).await.unwrap();
        assert_eq!((r, term), (500..505, 3));
        // A sync message of our own term to a primary is rejected as such.
        let ack = n.on_reserve_block(3, 10_000).await.unwrap();
        assert!(
            ack.rejected && ack.role == pb::Role::Primary as i32,
            "{ack:?}"
        );
        // An order from a lower term is rejected.
        assert!(matches!(
            n.set_run_alone(2, false).await,
            Err(GtmError::StaleTerm { .. })
        ));
        // A sync from a higher term makes the primary step down and accept it.
        let ack = n.on_reserve_block(4, 10_000).await.unwrap();
        assert!(!ack.rejected, "{ack:?}");
        assert_eq!(
            (n.role(), n.term(), n.status().boundary),
            (Role::Standby, 4, 10_000)
        );
        assert!(matches!(
            n.next_gxid(1).await,
            Err(GtmError::NotPrimary { .. })
        ));
    }

    #[tokio::test]
    async fn a_decision_not_durable_on_both_members_is_not_answered() {
        let base = tempfile::tempdir().unwrap();
        let n = node(&base.path().join("g"), Role::Primary);
        // No standby (and not alone): the decision cannot be made durable there.
        assert!(matches!(
            n.record_decision(5, Decision::Commit).await,
            Err(GtmError::StandbyUnavailable { .. })
        ));
        assert_eq!(
            n.get_decision(5).unwrap().0,
            None,
            "answered a decision a failover could forget"
        );
        // The conflicting decision is still refused; a successful retry answers it.
        assert!(matches!(
            n.record_decision(5, Decision::Abort).await,
            Err(GtmError::Conflict(_))
        ));
        n.set_run_alone(0, true).await.unwrap();
        n.record_decision(5, Decision::Commit).await.unwrap();
        assert_eq!(n.get_decision(5).unwrap().0, Some(Decision::Commit));
    }

    #[tokio::test]
    async fn primary_without_standby_waits_then_refuses_unless_alone() {
        let base = tempfile::tempdir().unwrap();
        let dir = base.path().join("g");
        let n = node(&dir, Role::Primary);
        let e = n.next_gxid(1).await.unwrap_err();
        assert!(matches!(e, GtmError::StandbyUnavailable { .. }), "{e}");
        assert!(matches!(
            n.record_decision(3, Decision::Abort).await,
            Err(GtmError::StandbyUnavailable { .. })
        ));
        n.set_run_alone(0, true).await.unwrap();
        let (r, _) = n.next_gxid(10).await.unwrap();
        assert_eq!(r, 1..11);
        n.record_decision(11, Decision::Commit).await.unwrap();
        n.record_decision(11, Decision::Commit).await.unwrap();
        assert!(matches!(
            n.record_decision(11, Decision::Abort).await,
            Err(GtmError::Conflict(_))
        ));
        let boundary = n.status().boundary;
        assert!(boundary >= 11);
        drop(n);
        // Restarted: still alone (the order is durable), continues from the persisted
        // boundary, above everything handed out.
        let n = node(&dir, Role::Primary);
        assert!(n.status().run_alone, "run-alone did not survive a restart");
        let (r, _) = n.next_gxid(1).await.unwrap();
        assert_eq!(r.start, boundary);
        assert_eq!(n.get_decision(11).unwrap().0, Some(Decision::Commit));
    }
}
