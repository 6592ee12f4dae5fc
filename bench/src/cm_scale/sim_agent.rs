//! A simulated cm_agent: reports its host's instances to both CMServers every
//! heartbeat over real gRPC, grants its lease with the real agent's lease and reply
//! rules (`cm_agent::lease`, `cm_agent::report::absorb_replies`), and carries out
//! orders by changing what it reports (a promoted standby reports primary on the next
//! timeline, a demoted primary standby, a stopped instance dead, ...). No PostgreSQL.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cm_agent::lease::LeaseState;
use cm_agent::report::{absorb_replies, ReportState};
use ha_common::config::{ClusterConfig, InstanceKind as CfgKind, Role};
use ha_common::proto::cm::cm_server_client::CmServerClient;
use ha_common::proto::cm::{
    AgentReport, GtmFacts, InstanceKind, InstanceReport, MemberRole, Order, OrderKind,
    OrderOutcome, ReplicaState, ReportReply, SecondaryFacts, SecondaryMode,
};
use tonic::transport::Channel;

const LSN: u64 = 0x0300_0148;

/// What every simulated agent shares with the bench.
#[derive(Default)]
pub struct World {
    /// Instances of lost hosts: their peers stop seeing them (a primary's replicas).
    pub dead: Mutex<HashSet<String>>,
    /// Report round-trip times to the CMServer that answered as primary (µs).
    pub latencies: Mutex<Vec<u64>>,
    /// First PROMOTE order received per instance.
    pub promotes: Mutex<HashMap<String, Instant>>,
    /// Per CMServer name: when a reply of it first said primary (the latest tenure).
    pub primary_since: Mutex<HashMap<String, Instant>>,
    /// Last reply with `primary` set, per CMServer name.
    pub primary_seen: Mutex<HashMap<String, Instant>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// One simulated instance.
struct Sim {
    name: String,
    kind: InstanceKind,
    role: MemberRole,
    alive: bool,
    held_stopped: bool,
    timeline: u32,
    /// DN primary: the group's other full-copy member (its synchronous standby).
    peer: Option<String>,
    run_alone: bool,
    secondary_state: &'static str,
}

impl Sim {
    fn report(&self, term: u64, world: &World) -> InstanceReport {
        let mut r = InstanceReport {
            name: self.name.clone(),
            kind: self.kind as i32,
            process_alive: self.alive,
            pid: if self.alive { 4242 } else { 0 },
            responding: self.alive,
            role: self.role as i32,
            timeline: self.timeline,
            term,
            held_stopped: self.held_stopped,
            ..Default::default()
        };
        if !self.alive {
            return r;
        }
        match (self.kind, self.role) {
            (InstanceKind::DataNode, MemberRole::Primary) => {
                r.current_lsn = LSN;
                r.flush_lsn = LSN;
                if let Some(peer) = &self.peer {
                    if !lock(&world.dead).contains(peer) {
                        r.replicas = vec![ReplicaState {
                            application_name: peer.clone(),
                            state: "streaming".into(),
                            sync_state: "sync".into(),
                            write_lsn: LSN,
                            flush_lsn: LSN,
                            replay_lsn: LSN,
                        }];
                    }
                }
            }
            (InstanceKind::DataNode, _) => {
                r.receive_lsn = LSN;
                r.flush_lsn = LSN;
                r.replay_lsn = LSN;
            }
            (InstanceKind::Gtm, role) => {
                r.gtm = Some(GtmFacts {
                    term: 1,
                    ready: role == MemberRole::Standby,
                    standby_attached: role == MemberRole::Primary && !self.run_alone,
                    run_alone: self.run_alone,
                    boundary: 0,
                });
            }
            (InstanceKind::DnSecondary, _) => {
                r.secondary = Some(SecondaryFacts {
                    state: self.secondary_state.into(),
                    term,
                    connected: self.secondary_state == "streaming",
                    timeline: self.timeline,
                    flush_lsn: LSN,
                    ..Default::default()
                });
            }
            _ => {}
        }
        r
    }

    /// Carries out an order at once; its outcome.
    fn apply(&mut self, o: &Order, world: &World) -> OrderOutcome {
        let mut out = OrderOutcome {
            order_id: o.id,
            ok: true,
            ..Default::default()
        };
        match OrderKind::try_from(o.kind).unwrap_or(OrderKind::OrderUnspecified) {
            OrderKind::Promote => {
                lock(&world.promotes)
                    .entry(self.name.clone())
                    .or_insert_with(Instant::now);
                if self.role != MemberRole::Primary {
                    self.role = MemberRole::Primary;
                    self.timeline += 1;
                }
            }
            OrderKind::Demote => self.role = MemberRole::Standby,
            OrderKind::Stop => {
                self.alive = false;
                out.lsn = LSN;
            }
            OrderKind::Start => self.alive = true,
            OrderKind::Rebuild => {
                self.role = MemberRole::Standby;
                self.alive = true;
            }
            OrderKind::RunAlone => self.run_alone = o.run_alone,
            OrderKind::BuildSource => out.address = "127.0.0.1:1".into(),
            OrderKind::OrderUnspecified => {
                out.ok = false;
                out.message = "unknown order".into();
            }
        }
        out
    }
}

/// A simulated agent of one host.
pub struct SimAgent {
    host: String,
    heartbeat: Duration,
    servers: Vec<(String, CmServerClient<Channel>)>,
    instances: Vec<Sim>,
    state: ReportState,
    lease: LeaseState,
    world: Arc<World>,
}

impl SimAgent {
    pub fn new(cfg: &ClusterConfig, host: &str, world: Arc<World>) -> anyhow::Result<SimAgent> {
        let heartbeat = cfg.timing.heartbeat_interval();
        let timeout = heartbeat.mul_f64(0.8);
        let mut servers = Vec::new();
        for s in &cfg.cm_servers {
            let channel =
                tonic::transport::Endpoint::from_shared(format!("http://{}", cfg.endpoint(s)))?
                    .connect_timeout(timeout)
                    .timeout(timeout)
                    .connect_lazy();
            servers.push((s.name.clone(), CmServerClient::new(channel)));
        }
        let mut instances = Vec::new();
        for r in cfg.instances_on_host(host) {
            let (kind, role) = match (r.kind, r.instance.role()) {
                (CfgKind::CmServer, _) | (CfgKind::Coordinator, _) => continue,
                (CfgKind::Gtm, Some(Role::Primary)) => (InstanceKind::Gtm, MemberRole::Primary),
                (CfgKind::Gtm, _) => (InstanceKind::Gtm, MemberRole::Standby),
                (CfgKind::DnMember, Some(Role::Primary)) => {
                    (InstanceKind::DataNode, MemberRole::Primary)
                }
                (CfgKind::DnMember, Some(Role::Secondary)) => {
                    (InstanceKind::DnSecondary, MemberRole::Secondary)
                }
                (CfgKind::DnMember, _) => (InstanceKind::DataNode, MemberRole::Standby),
            };
            let peer = r.group.and_then(|g| {
                g.members
                    .iter()
                    .find(|m| m.name != r.instance.name && m.role() != Some(Role::Secondary))
                    .map(|m| m.name.clone())
            });
            instances.push(Sim {
                name: r.instance.name.clone(),
                kind,
                role,
                alive: true,
                held_stopped: false,
                timeline: 1,
                peer,
                run_alone: false,
                secondary_state: "idle",
            });
        }
        Ok(SimAgent {
            host: host.to_owned(),
            heartbeat,
            servers,
            state: ReportState::default(),
            lease: LeaseState::new(Instant::now(), cfg.timing.cm_lease()),
            instances,
            world,
        })
    }

    /// Reports every heartbeat (sooner when asked) until `stop` says so; the first
    /// report goes out after `offset` (agents of real hosts are not in step).
    pub async fn run(mut self, offset: Duration, stop: tokio::sync::watch::Receiver<bool>) {
        tokio::time::sleep(offset).await;
        // Like the real agent: a fixed-rate ticker (a slow reply does not stretch the
        // cycle), reset to report sooner after a grant or when the primary asks.
        let mut ticker = tokio::time::interval(self.heartbeat);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            if *stop.borrow() {
                return;
            }
            if let Some(soon) = self.cycle().await {
                ticker.reset_after(soon);
            }
        }
    }

    /// One report to every CMServer; returns when to report next if sooner than a
    /// heartbeat.
    async fn cycle(&mut self) -> Option<Duration> {
        let term = self.state.term.0.max(self.lease.highest());
        let now = Instant::now();
        let report = AgentReport {
            host: self.host.clone(),
            term,
            instances: self
                .instances
                .iter()
                .map(|i| i.report(term, &self.world))
                .collect(),
            outcomes: self.state.pending.clone(),
            lease: Some(self.lease.to_proto(now)),
            state_version: self.lease.newest_version(),
        };
        let calls = self.servers.iter().map(|(name, client)| {
            let mut client = client.clone();
            let req = report.clone();
            let name = name.clone();
            async move {
                let t0 = Instant::now();
                let r = client.report(req).await;
                (name, t0.elapsed(), r)
            }
        });
        let results = futures::future::join_all(calls).await;
        let mut replies: Vec<ReportReply> = Vec::new();
        for (name, took, r) in results {
            let Ok(reply) = r else { continue };
            let reply = reply.into_inner();
            if reply.primary {
                let at = Instant::now();
                lock(&self.world.latencies).push(took.as_micros() as u64);
                lock(&self.world.primary_since)
                    .entry(name.clone())
                    .or_insert(at);
                lock(&self.world.primary_seen).insert(name, at);
            }
            replies.push(reply);
        }
        let (best, granted) =
            absorb_replies(&mut self.state, &mut self.lease, replies, Instant::now());
        let Some(reply) = best else {
            return granted.then_some(Duration::ZERO);
        };
        let sent: Vec<u64> = report.outcomes.iter().map(|o| o.order_id).collect();
        self.state.pending.retain(|o| !sent.contains(&o.order_id));
        let names: HashSet<String> = self.instances.iter().map(|i| i.name.clone()).collect();
        let plan = self.state.plan(&reply, &|n: &str| names.contains(n));
        self.lease.observe(self.state.term.0);
        if let Some(plan) = plan {
            for d in plan.assignments {
                let a = d.assignment;
                if let Some(i) = self.instances.iter_mut().find(|i| i.name == a.instance) {
                    i.held_stopped = !a.run;
                    if !a.run {
                        i.alive = false;
                    } else if !i.alive {
                        i.alive = true;
                    }
                    if i.kind == InstanceKind::DnSecondary {
                        i.secondary_state = match SecondaryMode::try_from(a.secondary_mode) {
                            Ok(SecondaryMode::SecondaryStream) => "streaming",
                            Ok(SecondaryMode::SecondaryHold) => "holding",
                            _ => "idle",
                        };
                    }
                }
            }
            for o in plan.orders {
                if let Some(i) = self.instances.iter_mut().find(|i| i.name == o.instance) {
                    let outcome = i.apply(&o, &self.world);
                    self.state.finished(outcome);
                }
            }
            for r in plan.refused {
                self.state.finished(r);
            }
        }
        if granted || !self.state.pending.is_empty() {
            return Some(Duration::ZERO);
        }
        (reply.next_report_ms > 0).then(|| Duration::from_millis(u64::from(reply.next_report_ms)))
    }
}
