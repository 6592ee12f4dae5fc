//! The CMServer's gRPC service: agents' heartbeats in, assignments out; cm_ctl's
//! status and start/stop. Also the server's life cycle: load state, bind, tell
//! systemd we are ready, watch the peer CMServer, shut down on SIGTERM.
//!
//! Which CMServer of the pair is primary comes from the lease election (`pair.rs`,
//! `election.rs`). A non-primary answers reports with an OK reply without assignments
//! or orders (with its lease request when campaigning), takes the primary's state
//! through `SyncState`, and answers everything else with FAILED_PRECONDITION
//! "not primary: <known primary>", so that cm_ctl finds the primary.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ha_common::config::InstanceKind;
use ha_common::metrics::HttpReply;
use ha_common::proto::cm::cm_server_client::CmServerClient;
use ha_common::proto::cm::cm_server_server::{CmServer, CmServerServer};
use ha_common::proto::cm::{
    AgentReport, BuildRequest, ClusterStatus, ClusterStatusRequest, CnSyncReply, CnSyncRequest,
    FailoverRequest, OperationReply, RenewGtmLeaseReply, RenewGtmLeaseRequest, ReportReply,
    SetDesiredStateReply, SetDesiredStateRequest, SwitchoverRequest, SyncStateReply,
    SyncStateRequest,
};
use ha_common::tls::CertRole;
use ha_common::ClusterConfig;
use tonic::{Code, Request, Response, Status};

use crate::assignments;
use crate::pair::Pair;
use crate::reports::Reports;
use crate::state::{ClusterState, StateError, StateFile};
use crate::status::{cluster_status, StatusInput};

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("{node:?} is not a [[cm_server]] of config {config}")]
    NotACmServer { node: String, config: PathBuf },
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Tls(#[from] ha_common::tls::TlsError),
    #[error("cannot create {path}: {source}")]
    Dir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot resolve {endpoint} ({name}): {message}")]
    Resolve {
        name: String,
        endpoint: String,
        message: String,
    },
    #[error("cannot listen on {addr} ({name}): {source}")]
    Bind {
        name: String,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("gRPC server failed: {0}")]
    Serve(#[from] tonic::transport::Error),
}

/// What every RPC handler shares.
struct Shared {
    cfg: ClusterConfig,
    node: String,
    /// The lease election and state streaming of the CMServer pair.
    pair: Pair,
    file: StateFile,
    /// Held across persisting, so that changes reach the disk in order.
    state: tokio::sync::Mutex<ClusterState>,
    reports: Mutex<Reports>,
    peers_seen: Mutex<HashMap<String, Instant>>,
    /// Arbitration: orders in flight, timers, operations (`arbitration.rs`).
    engine: crate::arbitration::Engine,
    /// What the CNs said in CnSync, and the DDL set's notes (`cn_sync.rs`).
    cns: crate::cn_sync::CnBook,
    metrics: crate::metrics::CmsMetrics,
    /// Taken by `serve` for the HTTP server (/metrics, /primary, /cluster).
    registry: Mutex<Option<ha_common::metrics::prometheus_client::registry::Registry>>,
    /// Arbitration rounds so far: the systemd watchdog's sign of life.
    progress: Arc<std::sync::atomic::AtomicU64>,
}

impl Shared {
    fn is_primary(&self) -> bool {
        self.pair.is_primary()
    }

    /// The cluster status as this CMServer sees it now (meaningful on the primary).
    async fn status_now(&self) -> ClusterStatus {
        let state = self.state.lock().await.clone();
        let reports = lock(&self.reports).clone();
        let peers = lock(&self.peers_seen).clone();
        let mut status = cluster_status(&StatusInput {
            cfg: &self.cfg,
            state: &state,
            reports: &reports,
            now: Instant::now(),
            this_node: &self.node,
            peers_seen: &peers,
        });
        self.engine.annotate(&mut status);
        crate::ddl_set::annotate(
            &mut status,
            &state.ddl_set,
            &self.cns.memory(),
            &self.cns.notes(),
        );
        status
    }

    /// Brings the metrics up to date (before a scrape, and once per heartbeat so
    /// that no failover goes uncounted between scrapes).
    async fn refresh_metrics(&self) {
        let m = &self.metrics;
        let term = self.state.lock().await.term.0;
        m.own.set_term(&self.node, term);
        if self.is_primary() {
            m.own.set_role(&self.node, "primary");
            m.observe(&self.status_now().await);
        } else {
            m.own.set_role(&self.node, "standby");
            m.clear_cluster_view();
        }
    }

    fn require_primary(&self) -> Result<(), Status> {
        if self.is_primary() {
            Ok(())
        } else {
            Err(self.pair.not_primary())
        }
    }
}

/// The tonic service.
#[derive(Clone)]
pub struct CmService {
    shared: Arc<Shared>,
}

impl CmService {
    /// A service for CMServer `node` with an already loaded state.
    pub fn new(cfg: ClusterConfig, node: &str, file: StateFile, state: ClusterState) -> CmService {
        let pair = Pair::new(&cfg, node, state.term);
        let mut registry = ha_common::metrics::registry();
        let metrics = crate::metrics::CmsMetrics::register(&mut registry);
        CmService {
            shared: Arc::new(Shared {
                cfg,
                node: node.to_owned(),
                pair,
                file,
                state: tokio::sync::Mutex::new(state),
                reports: Mutex::new(Reports::new()),
                peers_seen: Mutex::new(HashMap::new()),
                engine: crate::arbitration::Engine::new(),
                cns: crate::cn_sync::CnBook::default(),
                metrics,
                registry: Mutex::new(Some(registry)),
                progress: Arc::default(),
            }),
        }
    }

    pub fn is_primary(&self) -> bool {
        self.shared.is_primary()
    }

    /// Streams `next` to the standby CMServer (bounded), for a caller that holds the
    /// state lock and has persisted `next` but not yet installed it: no agent can see
    /// a change before the standby has it.
    pub async fn replicate_state(&self, next: &ClusterState) {
        let sh = &self.shared;
        sh.pair.push_state(next, &sh.peers_seen).await;
    }

    /// What arbitration and operations work on; state changes are streamed to the
    /// standby CMServer before any order is sent.
    fn arbitration(&self) -> crate::arbitration::Ctx<'_> {
        let sh = &self.shared;
        let tenure = sh.pair.tenure();
        crate::arbitration::Ctx {
            tenure,
            still_primary: Box::new(move || sh.pair.still_primary_in(tenure)),
            cfg: &sh.cfg,
            file: &sh.file,
            state: &sh.state,
            reports: &sh.reports,
            engine: &sh.engine,
            replicate: Box::new(move |next| {
                Box::pin(async move { self.replicate_state(&next).await })
            }),
        }
    }

    /// Notes that peer CMServer `name` answered at `at`.
    fn peer_seen(&self, name: &str, at: Instant) {
        lock(&self.shared.peers_seen).insert(name.to_owned(), at);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding one of these maps leaves it consistent (single inserts).
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl CmService {
    /// The caller's certificate is `role`'s and, where certificates name their host,
    /// of the host the config gives `instance`: a GTM, CN or CMServer speaks for itself
    /// only, as an agent reports for its own host only. An instance the config does not
    /// know is left to the handler's own error.
    #[allow(clippy::result_large_err)]
    fn require_own_instance<T>(
        &self,
        request: &Request<T>,
        role: CertRole,
        instance: &str,
    ) -> Result<(), Status> {
        match self.shared.cfg.find(instance) {
            Some(r) => ha_common::tls::require_role_on_host(request, &[role], &r.instance.host),
            None => ha_common::tls::require_role(request, &[role]),
        }
    }
}

#[tonic::async_trait]
impl CmServer for CmService {
    async fn report(&self, request: Request<AgentReport>) -> Result<Response<ReportReply>, Status> {
        // An agent reports (and takes the orders and assignments) for its own host
        // only: a certificate issued for another host is refused.
        ha_common::tls::require_role_on_host(
            &request,
            &[ha_common::tls::CertRole::Agent],
            &request.get_ref().host,
        )?;
        let sh = &self.shared;
        let report = request.into_inner();
        let host = report.host.clone();
        sh.metrics.heartbeat(&host);
        let (lease, agent_term) = (report.lease.clone(), report.term);
        let report_version = report.state_version;
        sh.engine.on_outcomes(&report.outcomes);
        // Standby too: a new primary knows the cluster the moment it is elected.
        let ignored = lock(&sh.reports)
            .record(&sh.cfg, report, Instant::now())
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        if !ignored.is_empty() {
            tracing::warn!(%host, ?ignored, "report names instances that are not configured on this host");
        }
        sh.pair.saw_version(report_version);
        let verdict = sh
            .pair
            .on_report(&host, lease.as_ref(), agent_term, &sh.state, &sh.file)
            .await;
        let state = sh.state.lock().await;
        let mut reply = ReportReply {
            term: state.term.0,
            lease_request_term: verdict.lease_request_term,
            lease_request_id: verdict.lease_request_id,
            from: sh.node.clone(),
            ..Default::default()
        };
        reply.state_version = state.version;
        if verdict.primary {
            // A new tenure starts with no orders, timers or notes of an earlier one.
            sh.engine
                .enter_tenure(sh.pair.tenure(), state.order_id_base);
            reply.primary = true;
            reply.assignments = assignments::for_host(&sh.cfg, &state, &host);
            reply.orders = sh.engine.orders_for(&host);
            reply.next_report_ms = sh.engine.next_report_ms(&host);
        }
        Ok(Response::new(reply))
    }

    async fn renew_gtm_lease(
        &self,
        request: Request<RenewGtmLeaseRequest>,
    ) -> Result<Response<RenewGtmLeaseReply>, Status> {
        self.require_own_instance(&request, CertRole::Gtm, &request.get_ref().instance)?;
        let sh = &self.shared;
        sh.require_primary()?;
        let req = request.into_inner();
        // Under the state lock: a tick promoting the GTM standby holds it from its
        // decision until the new roles are installed, so no lease is granted to a GTM
        // primary being replaced.
        let state = sh.state.lock().await;
        // Primacy may have ended while we waited for the lock.
        sh.require_primary()?;
        sh.engine
            .enter_tenure(sh.pair.tenure(), state.order_id_base);
        let (valid_for_ms, why) = match sh.engine.grant_gtm_lease(&sh.cfg, &state, &req.instance) {
            Ok(left) => (left.as_millis() as u64, String::new()),
            Err(why) => (0, why),
        };
        Ok(Response::new(RenewGtmLeaseReply {
            cm_term: state.term.0,
            valid_for_ms,
            from: sh.node.clone(),
            why,
        }))
    }

    async fn get_cluster_status(
        &self,
        _request: Request<ClusterStatusRequest>,
    ) -> Result<Response<ClusterStatus>, Status> {
        let sh = &self.shared;
        sh.require_primary()?;
        Ok(Response::new(sh.status_now().await))
    }

    async fn set_desired_state(
        &self,
        request: Request<SetDesiredStateRequest>,
    ) -> Result<Response<SetDesiredStateReply>, Status> {
        ha_common::tls::require_role(&request, &[ha_common::tls::CertRole::Operator])?;
        let sh = &self.shared;
        sh.require_primary()?;
        let req = request.into_inner();
        let target = if req.instance.is_empty() {
            None
        } else {
            match sh.cfg.find(&req.instance) {
                None => {
                    return Err(Status::not_found(format!(
                        "unknown instance {:?}",
                        req.instance
                    )))
                }
                Some(r) if r.kind == InstanceKind::CmServer => {
                    return Err(Status::invalid_argument(
                        StateError::NotManaged(req.instance.clone()).to_string(),
                    ))
                }
                Some(_) => Some(req.instance.as_str()),
            }
        };
        let mut guard = sh.state.lock().await;
        let mut next = guard.clone();
        let names = next
            .set_run(target, req.run)
            .map_err(|e| Status::not_found(e.to_string()))?;
        let changed = next != *guard;
        if changed {
            next.version += 1;
            let file = sh.file.clone();
            let to_write = next.clone();
            tokio::task::spawn_blocking(move || file.persist(&to_write))
                .await
                .map_err(|e| Status::internal(format!("persist task failed: {e}")))?
                .map_err(|e| Status::unavailable(e.to_string()))?;
            self.replicate_state(&next).await;
            *guard = next;
        }
        let term = guard.term.0;
        drop(guard);
        tracing::info!(instance = %req.instance, run = req.run, ?names, "desired state set");
        Ok(Response::new(SetDesiredStateReply {
            instances: names,
            term,
        }))
    }

    async fn sync_state(
        &self,
        request: Request<SyncStateRequest>,
    ) -> Result<Response<SyncStateReply>, Status> {
        self.require_own_instance(&request, CertRole::CmServer, &request.get_ref().from)?;
        let sh = &self.shared;
        let req = request.into_inner();
        let from = req.from.clone();
        let reply = sh.pair.on_sync(req, &sh.state, &sh.file).await?;
        if sh.cfg.cm_servers.iter().any(|s| s.name == from) {
            self.peer_seen(&from, Instant::now());
        }
        Ok(Response::new(reply))
    }

    async fn switchover(
        &self,
        request: Request<SwitchoverRequest>,
    ) -> Result<Response<OperationReply>, Status> {
        ha_common::tls::require_role(&request, &[ha_common::tls::CertRole::Operator])?;
        self.shared.require_primary()?;
        // Run to the end even if cm_ctl goes away: a half-done role change must not
        // be abandoned midway.
        let svc = self.clone();
        let req = request.into_inner();
        let task = async move {
            let group = operation_group(&svc.shared.cfg, &req.instance);
            let started = svc.shared.metrics.operation_started(&group);
            let out = crate::operations::switchover(&svc.arbitration(), req).await;
            svc.shared
                .metrics
                .operation_ended(&group, true, out.is_ok(), started);
            out
        };
        tokio::spawn(task)
            .await
            .map_err(|e| Status::internal(format!("switchover task failed: {e}")))?
            .map(Response::new)
    }

    async fn failover(
        &self,
        request: Request<FailoverRequest>,
    ) -> Result<Response<OperationReply>, Status> {
        ha_common::tls::require_role(&request, &[ha_common::tls::CertRole::Operator])?;
        self.shared.require_primary()?;
        // Run to the end even if cm_ctl goes away: a half-done role change must not
        // be abandoned midway.
        let svc = self.clone();
        let req = request.into_inner();
        let task = async move {
            let group = operation_group(&svc.shared.cfg, &req.instance);
            let started = svc.shared.metrics.operation_started(&group);
            let out = crate::operations::failover(&svc.arbitration(), req).await;
            svc.shared
                .metrics
                .operation_ended(&group, false, out.is_ok(), started);
            out
        };
        tokio::spawn(task)
            .await
            .map_err(|e| Status::internal(format!("failover task failed: {e}")))?
            .map(Response::new)
    }

    async fn build(
        &self,
        request: Request<BuildRequest>,
    ) -> Result<Response<OperationReply>, Status> {
        ha_common::tls::require_role(&request, &[ha_common::tls::CertRole::Operator])?;
        self.shared.require_primary()?;
        // Run to the end even if cm_ctl goes away: a half-done role change must not
        // be abandoned midway.
        let svc = self.clone();
        let req = request.into_inner();
        let task = async move { crate::operations::build(&svc.arbitration(), req).await };
        tokio::spawn(task)
            .await
            .map_err(|e| Status::internal(format!("build task failed: {e}")))?
            .map(Response::new)
    }

    async fn cn_sync(
        &self,
        request: Request<CnSyncRequest>,
    ) -> Result<Response<CnSyncReply>, Status> {
        self.require_own_instance(&request, CertRole::Cn, &request.get_ref().cn)?;
        let sh = &self.shared;
        let req = request.into_inner();
        // Standby too: a new primary knows the CNs the moment it is elected.
        sh.cns
            .record(&sh.cfg, &req, Instant::now())
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        if !sh.is_primary() {
            // Not authoritative: the CN asks every CMServer and acts on the primary's.
            let term = sh.state.lock().await.term.0;
            return Ok(Response::new(CnSyncReply {
                term,
                primary: false,
                from: sh.node.clone(),
                ..Default::default()
            }));
        }
        // Admission is decided (and persisted) now: a CN that just became READY
        // learns it is admitted in this very reply.
        crate::cn_sync::round(&self.arbitration(), &sh.cns).await;
        let state = sh.state.lock().await.clone();
        let reports = lock(&sh.reports).clone();
        let memory = sh.cns.memory();
        Ok(Response::new(CnSyncReply {
            term: state.term.0,
            primary: true,
            from: sh.node.clone(),
            dn_primaries: crate::cn_sync::dn_primaries(&sh.cfg, &state, &reports, Instant::now()),
            ddl_set: crate::cn_sync::ddl_peers(&sh.cfg, &state.ddl_set, &memory),
            admitted: state.ddl_set.contains(&req.cn),
        }))
    }
}

/// The metrics' group name of an operation's instance: its DN group, or "gtm".
fn operation_group(cfg: &ClusterConfig, instance: &str) -> String {
    match cfg.find(instance) {
        Some(r) => match r.group {
            Some(g) => g.name.clone(),
            None => "gtm".to_owned(),
        },
        None => instance.to_owned(),
    }
}

/// The status page (`GET /` and `GET /status`): static HTML whose script fetches
/// `/cluster` every 2 s. In the binary, so that it needs no files and no build step.
const STATUS_PAGE: &str = include_str!("status_page.html");

/// Serves /metrics, `GET /primary` (200 only on the primary: a load balancer's or
/// Prometheus' check), `GET /cluster` (the `cm_ctl status --json` document; 503 on
/// a standby, which has no current view) and the status page at `/` and `/status`
/// (on a standby it says that it is one).
async fn serve_http(service: &CmService, me: &ha_common::config::Instance) {
    let sh = &service.shared;
    let Some(registry) = lock(&sh.registry).take() else {
        return;
    };
    let endpoint = me
        .metrics_port()
        .map(|p| format!("{}:{p}", sh.cfg.address_of(me)));
    let (s1, s2, s3) = (service.clone(), service.clone(), service.clone());
    let server = ha_common::metrics::HttpServer::new(registry)
        .before_scrape(Arc::new(move || {
            let s = s1.clone();
            Box::pin(async move { s.shared.refresh_metrics().await })
        }))
        .route(
            "/primary",
            ha_common::metrics::handler(move || {
                let s = s2.clone();
                async move {
                    let node = &s.shared.node;
                    if s.is_primary() {
                        HttpReply::text(200, format!("{node} is the primary CMServer\n"))
                    } else {
                        HttpReply::text(503, format!("{node} is not the primary CMServer\n"))
                    }
                }
            }),
        )
        .route(
            "/cluster",
            ha_common::metrics::handler(move || {
                let s = s3.clone();
                async move {
                    if !s.is_primary() {
                        return HttpReply::json(
                            503,
                            format!(
                                "{{\"error\":\"{} is not the primary CMServer\"}}",
                                s.shared.node
                            ),
                        );
                    }
                    match serde_json::to_string_pretty(&s.shared.status_now().await) {
                        Ok(body) => HttpReply::json(200, body),
                        Err(e) => HttpReply::text(500, format!("cannot serialise status: {e}\n")),
                    }
                }
            }),
        );
    let page = || ha_common::metrics::handler(|| async { HttpReply::html(200, STATUS_PAGE) });
    let server = server.route("/", page()).route("/status", page());
    server.spawn_at(&sh.node, endpoint).await;
    // Failovers are counted between scrapes too.
    let s = service.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(s.shared.cfg.timing.heartbeat_interval());
        loop {
            tick.tick().await;
            s.shared.refresh_metrics().await;
        }
    });
}

/// Runs CMServer `node` until SIGTERM or SIGINT.
pub async fn serve(cfg: ClusterConfig, node: &str) -> Result<(), ServerError> {
    let me = cfg
        .cm_servers
        .iter()
        .find(|s| s.name == node)
        .cloned()
        .ok_or_else(|| ServerError::NotACmServer {
            node: node.to_owned(),
            config: cfg.source.clone(),
        })?;
    // Its own host's certificate (as every daemon loads its own, once its instance is
    // known).
    ha_common::tls::init(&cfg, ha_common::tls::CertRole::CmServer, Some(&me.host))?;
    let dir = cfg.instance_dir(node);
    std::fs::create_dir_all(&dir).map_err(|source| ServerError::Dir {
        path: dir.clone(),
        source,
    })?;
    let file = StateFile::in_dir(&dir);
    let state = file.load_or_init(&cfg)?;
    let endpoint = cfg.endpoint(&me);
    let addr = resolve(node, &endpoint).await?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| ServerError::Bind {
            name: node.to_owned(),
            addr,
            source,
        })?;
    let service = CmService::new(cfg.clone(), node, file.clone(), state.clone());
    tracing::info!(
        node,
        %addr,
        term = state.term.0,
        state_file = %file.path().display(),
        primary = service.is_primary(),
        "CMServer listening"
    );
    // Every CMServer may become primary: each watches its peer and runs the election.
    tokio::spawn(watch_peers(service.clone()));
    tokio::spawn(arbitrate(service.clone()));
    tokio::spawn(look_from_outside(service.clone()));
    tokio::spawn(keep_ddl_set(service.clone()));
    serve_http(&service, &me).await;
    let pair_service = service.clone();
    tokio::spawn(async move {
        let sh = &pair_service.shared;
        sh.pair.run(&sh.state, &sh.file, &sh.peers_seen).await;
    });
    let notifier = ha_common::notify::Notifier::from_env();
    notifier.ready();
    let watchdog =
        ha_common::notify::spawn_watchdog(notifier.clone(), service.shared.progress.clone());
    let incoming = ha_common::tls::incoming(listener);
    ha_common::tls::server()
        .add_service(CmServerServer::with_interceptor(
            service,
            ha_common::tls::deny_restore,
        ))
        .serve_with_incoming_shutdown(incoming, ha_common::shutdown::signal())
        .await?;
    notifier.stopping();
    if let Some(w) = watchdog {
        w.abort();
    }
    tracing::info!(node, "CMServer stopped");
    Ok(())
}

async fn resolve(name: &str, endpoint: &str) -> Result<SocketAddr, ServerError> {
    let err = |message: String| ServerError::Resolve {
        name: name.to_owned(),
        endpoint: endpoint.to_owned(),
        message,
    };
    tokio::net::lookup_host(endpoint)
        .await
        .map_err(|e| err(e.to_string()))?
        .next()
        .ok_or_else(|| err("no address".into()))
}

/// The primary asks every other CMServer, once per heartbeat, whether it is alive. A
/// standby answers status requests with FAILED_PRECONDITION: that answer is enough.
async fn watch_peers(service: CmService) {
    let cfg = service.shared.cfg.clone();
    let interval = cfg.timing.heartbeat_interval();
    let peers: Vec<(String, String)> = cfg
        .cm_servers
        .iter()
        .filter(|s| s.name != service.shared.node)
        .map(|s| (s.name.clone(), cfg.endpoint(s)))
        .collect();
    loop {
        for (name, endpoint) in &peers {
            if ping(endpoint, interval.max(Duration::from_millis(500))).await {
                service.peer_seen(name, Instant::now());
            }
        }
        tokio::time::sleep(interval).await;
    }
}

/// The CMServer's own probes of primaries whose agent is silent (`outside.rs`):
/// twice per heartbeat, on the primary only.
async fn look_from_outside(service: CmService) {
    let sh = &service.shared;
    let every = (sh.cfg.timing.heartbeat_interval() / 2).max(Duration::from_millis(50));
    loop {
        tokio::time::sleep(every).await;
        if service.is_primary() {
            let state = sh.state.lock().await.clone();
            let reports = lock(&sh.reports).clone();
            crate::outside::round(&sh.cfg, &state, &reports, &sh.engine).await;
        }
    }
}

/// The arbiter's loop: four rounds per heartbeat, on the primary only.
async fn arbitrate(service: CmService) {
    let every = (service.shared.cfg.timing.heartbeat_interval() / 4).max(Duration::from_millis(50));
    loop {
        tokio::time::sleep(every).await;
        if service.is_primary() {
            crate::arbitration::tick(&service.arbitration()).await;
        }
        // The watchdog pings only while this loop goes round.
        service
            .shared
            .progress
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// The DDL set's rules, every half heartbeat on the primary: members that stopped
/// calling CnSync are taken out even though nobody calls.
async fn keep_ddl_set(service: CmService) {
    let every = (service.shared.cfg.timing.heartbeat_interval() / 2).max(Duration::from_millis(50));
    loop {
        tokio::time::sleep(every).await;
        if service.is_primary() {
            crate::cn_sync::round(&service.arbitration(), &service.shared.cns).await;
        }
    }
}

async fn ping(endpoint: &str, timeout: Duration) -> bool {
    let Ok(ep) = ha_common::tls::endpoint(endpoint, ha_common::tls::CertRole::CmServer, timeout)
    else {
        return false;
    };
    let Ok(channel) = ep.timeout(timeout).connect().await else {
        return false;
    };
    match CmServerClient::new(channel)
        .get_cluster_status(ClusterStatusRequest {})
        .await
    {
        Ok(_) => true,
        Err(s) => s.code() == Code::FailedPrecondition,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::tests::local_config;
    use ha_common::proto::cm::{InstanceReport, MemberRole};

    #[test]
    fn the_status_page_never_parses_cluster_data_as_html() {
        // Values from the cluster (names, reasons, details) reach the DOM only as text.
        for sink in [
            ".innerHTML",
            ".outerHTML",
            "insertAdjacentHTML",
            "document.write",
        ] {
            assert!(!STATUS_PAGE.contains(sink), "status page uses {sink}");
        }
        assert!(STATUS_PAGE.contains("fetch(\"/cluster\""));
        assert!(STATUS_PAGE.contains("setInterval(refresh, 2000)"));
    }

    fn service(dir: &std::path::Path, node: &str) -> CmService {
        let cfg = local_config();
        let file = StateFile::in_dir(dir);
        let state = file.load_or_init(&cfg).unwrap();
        CmService::new(cfg, node, file, state)
    }

    /// Plays the agents of h1..h3 granting every lease asked for, until `svc` answers
    /// as primary; returns its term.
    async fn elect(svc: &CmService) -> u64 {
        use ha_common::proto::cm::LeaseGrant;
        let me = svc.shared.node.clone();
        let mut granted: HashMap<&str, (u64, u64)> = HashMap::new();
        for _round in 0..4 {
            for host in ["h1", "h2", "h3"] {
                let lease = granted.get(host).map(|(term, id)| LeaseGrant {
                    holder: me.clone(),
                    term: *term,
                    remaining_ms: 3000,
                    request_id: *id,
                });
                let reply = svc
                    .report(Request::new(AgentReport {
                        host: host.into(),
                        lease,
                        ..Default::default()
                    }))
                    .await
                    .unwrap()
                    .into_inner();
                if reply.primary {
                    assert!(svc.is_primary());
                    assert_eq!(reply.from, me);
                    return reply.term;
                }
                if reply.lease_request_term > 0 {
                    granted.insert(host, (reply.lease_request_term, reply.lease_request_id));
                }
            }
        }
        panic!("{me} was not elected");
    }

    fn set(run: bool, instance: &str) -> Request<SetDesiredStateRequest> {
        Request::new(SetDesiredStateRequest {
            instance: instance.into(),
            run,
        })
    }

    #[tokio::test]
    async fn desired_state_is_durable_and_reaches_the_agents() {
        let dir = tempfile::tempdir().unwrap();
        let svc = service(dir.path(), "cms1");
        assert_eq!(
            elect(&svc).await,
            2,
            "the elected term is one above the state's"
        );
        let reply = svc
            .set_desired_state(set(true, ""))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(reply.instances.len(), 10);
        svc.set_desired_state(set(false, "dn1_h2")).await.unwrap();

        // A restarted CMServer reads the same wishes back, and the term it was elected
        // in was persisted: the next election is above it.
        let svc = service(dir.path(), "cms1");
        assert_eq!(elect(&svc).await, 3);
        // The primary asks every agent to renew; h2 renews on this request.
        let renewal = svc
            .report(Request::new(AgentReport {
                host: "h1".into(),
                ..Default::default()
            }))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(renewal.lease_request_term, 3);
        let reply = svc
            .report(Request::new(AgentReport {
                host: "h2".into(),
                term: 0,
                instances: vec![InstanceReport {
                    name: "dn1_h2".into(),
                    role: MemberRole::Standby as i32,
                    ..Default::default()
                }],
                outcomes: vec![],
                state_version: 0,
                // Still granting: a report with no lease would cost cms1 its majority.
                lease: Some(ha_common::proto::cm::LeaseGrant {
                    holder: "cms1".into(),
                    term: 3,
                    remaining_ms: 2000,
                    request_id: renewal.lease_request_id,
                }),
            }))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(reply.term, 3);
        assert!(reply.primary);
        let by_name = |n: &str| reply.assignments.iter().find(|a| a.instance == n).unwrap();
        assert!(!by_name("dn1_h2").run, "held stopped across a restart");
        assert!(by_name("dn2_h2").run);
        assert_eq!(by_name("dn1_h2").primary_port, 6501);
        let status = svc
            .get_cluster_status(Request::new(ClusterStatusRequest {}))
            .await
            .unwrap()
            .into_inner();
        let dn1_h2 = &status.dn_groups[0].members[1];
        assert_eq!(
            (dn1_h2.name.as_str(), dn1_h2.state.as_str()),
            ("dn1_h2", "stopped")
        );
    }

    #[tokio::test]
    async fn bad_requests_change_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let svc = service(dir.path(), "cms1");
        elect(&svc).await;
        let before = std::fs::read(dir.path().join("cluster_state")).unwrap();
        let e = svc.set_desired_state(set(false, "nope")).await.unwrap_err();
        assert_eq!(e.code(), Code::NotFound);
        assert!(
            e.message().contains("unknown instance \"nope\""),
            "{}",
            e.message()
        );
        let e = svc.set_desired_state(set(false, "cms2")).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        let e = svc
            .report(Request::new(AgentReport {
                host: "h9".into(),
                ..Default::default()
            }))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        assert_eq!(
            std::fs::read(dir.path().join("cluster_state")).unwrap(),
            before
        );
    }

    #[tokio::test]
    async fn the_standby_points_at_the_primary() {
        let dir = tempfile::tempdir().unwrap();
        let svc = service(dir.path(), "cms2");
        assert!(!svc.is_primary());
        let e = svc
            .get_cluster_status(Request::new(ClusterStatusRequest {}))
            .await
            .unwrap_err();
        assert_eq!(e.message(), "not primary: none elected");
        for host in ["h1", "h2"] {
            let reply = svc
                .report(Request::new(AgentReport {
                    host: host.into(),
                    term: 2,
                    lease: Some(ha_common::proto::cm::LeaseGrant {
                        holder: "cms1".into(),
                        term: 2,
                        remaining_ms: 2000,
                        request_id: 0,
                    }),
                    ..Default::default()
                }))
                .await
                .unwrap()
                .into_inner();
            assert!(!reply.primary);
            assert!(reply.assignments.is_empty() && reply.orders.is_empty());
            assert_eq!(reply.lease_request_term, 0, "cms1 holds the leases");
            assert_eq!(reply.from, "cms2");
        }
        let e = svc
            .get_cluster_status(Request::new(ClusterStatusRequest {}))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition);
        assert_eq!(e.message(), "not primary: cms1");
        let e = svc.set_desired_state(set(true, "")).await.unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition);
    }

    #[tokio::test]
    async fn only_the_primary_renews_a_gtm_lease_and_only_for_its_assigned_primary() {
        let req = |instance: &str| {
            Request::new(RenewGtmLeaseRequest {
                instance: instance.into(),
                gtm_term: 1,
            })
        };
        let dir = tempfile::tempdir().unwrap();
        let svc = service(dir.path(), "cms1");
        let e = svc.renew_gtm_lease(req("gtm1")).await.unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
        assert!(e.message().contains("not primary"), "{}", e.message());
        elect(&svc).await;
        // Elected, but nothing seen healthy yet (and the instances start stopped).
        let r = svc.renew_gtm_lease(req("gtm1")).await.unwrap().into_inner();
        assert_eq!(r.valid_for_ms, 0);
        assert!(!r.why.is_empty() && r.from == "cms1", "{r:?}");
        let r = svc.renew_gtm_lease(req("gtm2")).await.unwrap().into_inner();
        assert_eq!(r.valid_for_ms, 0, "{r:?}");
    }

    fn cn_sync_req(
        cn: &str,
        phase: ha_common::proto::cm::CnPhase,
        version: u64,
    ) -> Request<CnSyncRequest> {
        Request::new(CnSyncRequest {
            cn: cn.into(),
            phase: phase as i32,
            catalog_version: version,
            ..Default::default()
        })
    }

    #[tokio::test]
    async fn cn_sync_answers_topology_and_admits_ready_cns_durably() {
        use ha_common::proto::cm::CnPhase;
        let dir = tempfile::tempdir().unwrap();
        let standby = service(dir.path(), "cms2");
        let reply = standby
            .cn_sync(cn_sync_req("cn1", CnPhase::CnReady, 0))
            .await
            .unwrap()
            .into_inner();
        assert!(!reply.primary, "only the primary answers authoritatively");
        assert!(reply.dn_primaries.is_empty() && reply.ddl_set.is_empty() && !reply.admitted);
        assert_eq!(reply.from, "cms2");
        drop(standby);

        let svc = service(dir.path(), "cms1");
        let term = elect(&svc).await;
        let e = svc
            .cn_sync(cn_sync_req("cn9", CnPhase::CnReady, 0))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        assert!(e.message().contains("cn9"), "{}", e.message());

        let reply = svc
            .cn_sync(cn_sync_req("cn2", CnPhase::CnStarting, 0))
            .await
            .unwrap()
            .into_inner();
        assert!(reply.primary && !reply.admitted);
        assert_eq!(reply.term, term);
        let groups: Vec<_> = reply
            .dn_primaries
            .iter()
            .map(|p| (p.group.as_str(), p.instance.as_str(), p.port, p.available))
            .collect();
        assert_eq!(
            groups,
            [
                ("dn1", "dn1_h1", 6501, false),
                ("dn2", "dn2_h2", 6511, false)
            ],
            "no agent has reported the primaries alive"
        );
        let reply = svc
            .cn_sync(cn_sync_req("cn1", CnPhase::CnReady, 0))
            .await
            .unwrap()
            .into_inner();
        assert!(reply.admitted);
        assert_eq!(reply.ddl_set.len(), 1);
        assert_eq!(
            (reply.ddl_set[0].name.as_str(), reply.ddl_set[0].port),
            ("cn1", 6401)
        );
        let persisted = StateFile::in_dir(dir.path()).load().unwrap().unwrap();
        assert!(persisted.ddl_set.contains("cn1") && !persisted.ddl_set.contains("cn2"));
        let status = svc
            .get_cluster_status(Request::new(ClusterStatusRequest {}))
            .await
            .unwrap()
            .into_inner();
        assert!(status.cn[0].in_ddl_set && !status.cn[1].in_ddl_set);
        assert!(
            status.cn[1].detail.contains("starting"),
            "{}",
            status.cn[1].detail
        );
    }

    fn sync(term: u64, state: &ClusterState) -> Request<SyncStateRequest> {
        Request::new(SyncStateRequest {
            term,
            from: "cms1".into(),
            state: state.to_bytes(),
            probe: false,
        })
    }

    #[tokio::test]
    async fn the_standby_takes_newer_states_only_and_persists_them() {
        let dir = tempfile::tempdir().unwrap();
        let svc = service(dir.path(), "cms2");
        let mut newer = ClusterState::initial(&local_config());
        newer.term = ha_common::Term(4);
        newer.set_run(Some("gtm1"), true).unwrap();
        let reply = svc.sync_state(sync(4, &newer)).await.unwrap().into_inner();
        assert!(reply.accepted, "{}", reply.reason);
        assert_eq!(reply.term, 4);
        assert_eq!(
            StateFile::in_dir(dir.path()).load().unwrap(),
            Some(newer.clone())
        );
        let older = ClusterState::initial(&local_config());
        let reply = svc.sync_state(sync(1, &older)).await.unwrap().into_inner();
        assert!(!reply.accepted);
        assert_eq!(reply.term, 4);
        assert!(reply.reason.contains("older"), "{}", reply.reason);
        assert_eq!(StateFile::in_dir(dir.path()).load().unwrap(), Some(newer));
        // A term that does not match its state is malformed.
        let e = svc.sync_state(sync(9, &older)).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        // A probe (from a newly elected peer) gets the state and changes nothing.
        let reply = svc
            .sync_state(Request::new(SyncStateRequest {
                term: 5,
                from: "cms1".into(),
                probe: true,
                ..Default::default()
            }))
            .await
            .unwrap()
            .into_inner();
        assert!(!reply.accepted);
        assert_eq!(reply.term, 4);
        let path = std::path::Path::new("probe");
        assert_eq!(
            ClusterState::from_bytes(path, &reply.state).unwrap().term.0,
            4
        );
    }

    #[tokio::test]
    async fn a_primary_refuses_its_own_term_and_yields_to_a_higher_one() {
        let dir = tempfile::tempdir().unwrap();
        let svc = service(dir.path(), "cms2");
        // cms2 is not the first CMServer: on a "cold start" it waits before campaigning,
        // so elect a first one instead.
        drop(svc);
        let svc = service(dir.path(), "cms1");
        let term = elect(&svc).await;
        let mut same = svc.shared.state.lock().await.clone();
        same.set_run(None, true).unwrap();
        let reply = svc
            .sync_state(sync(term, &same))
            .await
            .unwrap()
            .into_inner();
        assert!(!reply.accepted);
        assert!(svc.is_primary());
        same.term = ha_common::Term(term + 1);
        let reply = svc
            .sync_state(sync(term + 1, &same))
            .await
            .unwrap()
            .into_inner();
        assert!(reply.accepted, "{}", reply.reason);
        assert!(!svc.is_primary(), "a higher term deposes it");
        let e = svc
            .get_cluster_status(Request::new(ClusterStatusRequest {}))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition);
    }
}
