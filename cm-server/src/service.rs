//! The CMServer's gRPC service: agents' heartbeats in, assignments out; cm_ctl's
//! status and start/stop. Also the server's life cycle: load state, bind, tell
//! systemd we are ready, watch the peer CMServer, shut down on SIGTERM.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ha_common::config::InstanceKind;
use ha_common::proto::cm::cm_server_client::CmServerClient;
use ha_common::proto::cm::cm_server_server::{CmServer, CmServerServer};
use ha_common::proto::cm::{
    AgentReport, BuildRequest, ClusterStatus, ClusterStatusRequest, FailoverRequest,
    OperationReply, ReportReply, SetDesiredStateReply, SetDesiredStateRequest, SwitchoverRequest,
    SyncStateReply, SyncStateRequest,
};
use ha_common::ClusterConfig;
use tonic::transport::Endpoint;
use tonic::{Code, Request, Response, Status};

use crate::assignments;
use crate::reports::Reports;
use crate::state::{ClusterState, StateError, StateFile};
use crate::status::{cluster_status, StatusInput};

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("{node:?} is not a [[cm_server]] of config {config}")]
    NotACmServer { node: String, config: PathBuf },
    #[error(transparent)]
    State(#[from] StateError),
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
    /// Until the lease election lands: statically the first `[[cm_server]]`.
    primary: String,
    file: StateFile,
    /// Held across persisting, so that changes reach the disk in order.
    state: tokio::sync::Mutex<ClusterState>,
    reports: Mutex<Reports>,
    peers_seen: Mutex<HashMap<String, Instant>>,
}

impl Shared {
    fn is_primary(&self) -> bool {
        self.node == self.primary
    }

    fn require_primary(&self) -> Result<(), Status> {
        if self.is_primary() {
            Ok(())
        } else {
            Err(Status::failed_precondition(format!(
                "not primary: {}",
                self.primary
            )))
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
        let primary = cfg
            .cm_servers
            .first()
            .map(|s| s.name.clone())
            .unwrap_or_default();
        CmService {
            shared: Arc::new(Shared {
                cfg,
                node: node.to_owned(),
                primary,
                file,
                state: tokio::sync::Mutex::new(state),
                reports: Mutex::new(Reports::new()),
                peers_seen: Mutex::new(HashMap::new()),
            }),
        }
    }

    pub fn is_primary(&self) -> bool {
        self.shared.is_primary()
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

#[tonic::async_trait]
impl CmServer for CmService {
    async fn report(&self, request: Request<AgentReport>) -> Result<Response<ReportReply>, Status> {
        let sh = &self.shared;
        sh.require_primary()?;
        let report = request.into_inner();
        let host = report.host.clone();
        let ignored = lock(&sh.reports)
            .record(&sh.cfg, report, Instant::now())
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        if !ignored.is_empty() {
            tracing::warn!(%host, ?ignored, "report names instances that are not configured on this host");
        }
        let state = sh.state.lock().await;
        Ok(Response::new(ReportReply {
            term: state.term.0,
            assignments: assignments::for_host(&sh.cfg, &state, &host),
            orders: Vec::new(),
            lease_request_term: 0,
            from: sh.node.clone(),
        }))
    }

    async fn get_cluster_status(
        &self,
        _request: Request<ClusterStatusRequest>,
    ) -> Result<Response<ClusterStatus>, Status> {
        let sh = &self.shared;
        sh.require_primary()?;
        let state = sh.state.lock().await.clone();
        let reports = lock(&sh.reports).clone();
        let peers = lock(&sh.peers_seen).clone();
        Ok(Response::new(cluster_status(&StatusInput {
            cfg: &sh.cfg,
            state: &state,
            reports: &reports,
            now: Instant::now(),
            this_node: &sh.node,
            peers_seen: &peers,
        })))
    }

    async fn set_desired_state(
        &self,
        request: Request<SetDesiredStateRequest>,
    ) -> Result<Response<SetDesiredStateReply>, Status> {
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
        if next != *guard {
            let file = sh.file.clone();
            let to_write = next.clone();
            tokio::task::spawn_blocking(move || file.persist(&to_write))
                .await
                .map_err(|e| Status::internal(format!("persist task failed: {e}")))?
                .map_err(|e| Status::unavailable(e.to_string()))?;
            *guard = next;
        }
        tracing::info!(instance = %req.instance, run = req.run, ?names, "desired state set");
        Ok(Response::new(SetDesiredStateReply {
            instances: names,
            term: guard.term.0,
        }))
    }

    async fn sync_state(
        &self,
        _request: Request<SyncStateRequest>,
    ) -> Result<Response<SyncStateReply>, Status> {
        Err(Status::unimplemented(
            "state streaming arrives with the CMServer pair",
        ))
    }

    async fn switchover(
        &self,
        _request: Request<SwitchoverRequest>,
    ) -> Result<Response<OperationReply>, Status> {
        Err(Status::unimplemented("switchover is not implemented yet"))
    }

    async fn failover(
        &self,
        _request: Request<FailoverRequest>,
    ) -> Result<Response<OperationReply>, Status> {
        Err(Status::unimplemented("failover is not implemented yet"))
    }

    async fn build(
        &self,
        _request: Request<BuildRequest>,
    ) -> Result<Response<OperationReply>, Status> {
        Err(Status::unimplemented("build is not implemented yet"))
    }
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
    if service.is_primary() {
        tokio::spawn(watch_peers(service.clone()));
    }
    notify_systemd(&[sd_notify::NotifyState::Ready]);
    let incoming = tonic::transport::server::TcpIncoming::from(listener);
    tonic::transport::Server::builder()
        .add_service(CmServerServer::new(service))
        .serve_with_incoming_shutdown(incoming, shutdown_signal())
        .await?;
    notify_systemd(&[sd_notify::NotifyState::Stopping]);
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

fn notify_systemd(states: &[sd_notify::NotifyState<'_>]) {
    // Outside systemd (no NOTIFY_SOCKET) this does nothing.
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!("sd_notify failed: {e}");
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(e) => {
            tracing::warn!("cannot watch SIGTERM ({e}); stopping on SIGINT only");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
    tracing::info!("shutdown requested");
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

async fn ping(endpoint: &str, timeout: Duration) -> bool {
    let Ok(ep) = Endpoint::from_shared(format!("http://{endpoint}")) else {
        return false;
    };
    let Ok(channel) = ep.connect_timeout(timeout).timeout(timeout).connect().await else {
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

    fn service(dir: &std::path::Path, node: &str) -> CmService {
        let cfg = local_config();
        let file = StateFile::in_dir(dir);
        let state = file.load_or_init(&cfg).unwrap();
        CmService::new(cfg, node, file, state)
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
        let reply = svc
            .set_desired_state(set(true, ""))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(reply.instances.len(), 10);
        svc.set_desired_state(set(false, "dn1_h2")).await.unwrap();

        // A restarted CMServer reads the same wishes back.
        let svc = service(dir.path(), "cms1");
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
                lease: None,
            }))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(reply.term, 1);
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
            .report(Request::new(AgentReport {
                host: "h1".into(),
                ..Default::default()
            }))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition);
        assert_eq!(e.message(), "not primary: cms1");
        let e = svc
            .get_cluster_status(Request::new(ClusterStatusRequest {}))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition);
        let e = svc.set_desired_state(set(true, "")).await.unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition);
    }
}
