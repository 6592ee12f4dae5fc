//! `gtm serve`: opens the instance's data dir, decides its starting role, and serves the
//! Gtm gRPC service (client calls, the pair's sync, orders) on the instance's port.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;

use ha_common::config::ClusterConfig;
use ha_common::proto::gtm as pb;
use pb::gtm_server::{Gtm, GtmServer};
use tonic::{Request, Response, Status, Streaming};

use crate::node::{
    decision_from_pb, decision_to_pb, from_records, GtmError, Node, NodeSettings, OpenError, Role,
};
use crate::replication::{self, PeerLink};

/// Metadata key on every error status produced by a GTM (as opposed to a transport
/// failure): clients tell "the GTM said no" from "the GTM is unreachable" by it.
pub const NODE_HEADER: &str = "x-gtm-node";

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Config(#[from] ha_common::ConfigError),
    #[error("config {config}: no GTM instance named {node:?} (known: {known})")]
    UnknownNode {
        config: PathBuf,
        node: String,
        known: String,
    },
    #[error(transparent)]
    Open(#[from] OpenError),
    #[error("cannot resolve {0}: {1}")]
    Resolve(String, std::io::Error),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
    #[error("bad peer endpoint {0}: {1}")]
    Peer(String, tonic::transport::Error),
    #[error("gRPC server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
}

fn to_status(node: &str, e: GtmError) -> Status {
    let code = match &e {
        GtmError::NotPrimary { .. }
        | GtmError::NotStandby { .. }
        | GtmError::StaleTerm { .. }
        | GtmError::NoLease { .. }
        | GtmError::NotReady(_) => tonic::Code::FailedPrecondition,
        GtmError::StandbyUnavailable { .. } => tonic::Code::Unavailable,
        GtmError::Conflict(_) => tonic::Code::AlreadyExists,
        GtmError::InvalidArgument(_) => tonic::Code::InvalidArgument,
        GtmError::Storage(_) => tonic::Code::Internal,
    };
    let mut s = Status::new(code, e.to_string());
    if let Ok(v) = node.parse() {
        s.metadata_mut().insert(NODE_HEADER, v);
    }
    s
}

/// The tonic service: a thin translation onto [`Node`].
pub struct GtmService {
    node: Arc<Node>,
}

impl GtmService {
    pub fn new(node: Arc<Node>) -> GtmService {
        GtmService { node }
    }
    fn err(&self, e: GtmError) -> Status {
        to_status(self.node.name(), e)
    }
}

/// The answers of one client stream, in the order of its messages.
type AnswerStream = Pin<Box<dyn Stream<Item = Result<pb::NextGxidResponse, Status>> + Send>>;

/// Serves one NextGxidStream: each message is answered, in order, before the next one
/// is read (the client pipelines, so the next one is usually already buffered). The
/// first error ends the stream with its status; nothing after it is served.
fn gxid_answers(node: Arc<Node>, inbound: Streaming<pb::NextGxidRequest>) -> AnswerStream {
    Box::pin(futures::stream::unfold(
        Some((node, inbound)),
        |state| async move {
            let (node, mut inbound) = state?;
            // A read error means the client went away: nothing to answer.
            let req = inbound.message().await.ok()??;
            match node.next_gxid(req.count).await {
                Ok((range, term)) => {
                    let answer = pb::NextGxidResponse {
                        first: range.start,
                        count: range.end - range.start,
                        term,
                    };
                    Some((Ok(answer), Some((node, inbound))))
                }
                Err(e) => Some((Err(to_status(node.name(), e)), None)),
            }
        },
    ))
}

/// Serves one PingStream: every message is echoed at once, nothing else is done.
fn ping_answers(inbound: Streaming<pb::NextGxidRequest>) -> AnswerStream {
    Box::pin(futures::stream::unfold(inbound, |mut inbound| async move {
        let req = inbound.message().await.ok()??;
        Some((Ok(ping_answer(req)), inbound))
    }))
}

fn ping_answer(req: pb::NextGxidRequest) -> pb::NextGxidResponse {
    pb::NextGxidResponse {
        first: 0,
        count: req.count,
        term: 0,
    }
}

#[tonic::async_trait]
impl Gtm for GtmService {
    type NextGxidStreamStream = AnswerStream;
    type PingStreamStream = AnswerStream;

    async fn next_gxid_stream(
        &self,
        req: Request<Streaming<pb::NextGxidRequest>>,
    ) -> Result<Response<AnswerStream>, Status> {
        // Refused at once by a standby, so that the client moves on before it sends.
        self.node.check_primary().map_err(|e| self.err(e))?;
        Ok(Response::new(gxid_answers(
            self.node.clone(),
            req.into_inner(),
        )))
    }

    async fn ping(
        &self,
        req: Request<pb::NextGxidRequest>,
    ) -> Result<Response<pb::NextGxidResponse>, Status> {
        Ok(Response::new(ping_answer(req.into_inner())))
    }

    async fn ping_stream(
        &self,
        req: Request<Streaming<pb::NextGxidRequest>>,
    ) -> Result<Response<AnswerStream>, Status> {
        Ok(Response::new(ping_answers(req.into_inner())))
    }

    async fn next_gxid(
        &self,
        req: Request<pb::NextGxidRequest>,
    ) -> Result<Response<pb::NextGxidResponse>, Status> {
        let count = req.into_inner().count;
        let (range, term) = self.node.next_gxid(count).await.map_err(|e| self.err(e))?;
        Ok(Response::new(pb::NextGxidResponse {
            first: range.start,
            count: range.end - range.start,
            term,
        }))
    }

    async fn record_decision(
        &self,
        req: Request<pb::RecordDecisionRequest>,
    ) -> Result<Response<pb::RecordDecisionResponse>, Status> {
        let r = req.into_inner();
        let d = decision_from_pb(r.decision).map_err(|e| self.err(e))?;
        let term = self
            .node
            .record_decision(r.gxid, d)
            .await
            .map_err(|e| self.err(e))?;
        Ok(Response::new(pb::RecordDecisionResponse { term }))
    }

    async fn get_decision(
        &self,
        req: Request<pb::GetDecisionRequest>,
    ) -> Result<Response<pb::GetDecisionResponse>, Status> {
        let (d, term) = self
            .node
            .get_decision(req.into_inner().gxid)
            .map_err(|e| self.err(e))?;
        Ok(Response::new(pb::GetDecisionResponse {
            decision: d.map(decision_to_pb).unwrap_or(pb::Decision::Unspecified) as i32,
            term,
        }))
    }

    async fn status(
        &self,
        _req: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::GtmStatus>, Status> {
        Ok(Response::new(self.node.status()))
    }

    async fn promote(
        &self,
        req: Request<pb::PromoteRequest>,
    ) -> Result<Response<pb::GtmStatus>, Status> {
        let r = req.into_inner();
        let s = self
            .node
            .promote(r.term, r.run_alone)
            .await
            .map_err(|e| self.err(e))?;
        Ok(Response::new(s))
    }

    async fn demote(
        &self,
        req: Request<pb::DemoteRequest>,
    ) -> Result<Response<pb::GtmStatus>, Status> {
        let s = self
            .node
            .demote(req.into_inner().term)
            .await
            .map_err(|e| self.err(e))?;
        Ok(Response::new(s))
    }

    async fn set_run_alone(
        &self,
        req: Request<pb::SetRunAloneRequest>,
    ) -> Result<Response<pb::GtmStatus>, Status> {
        let r = req.into_inner();
        let s = self
            .node
            .set_run_alone(r.term, r.run_alone)
            .await
            .map_err(|e| self.err(e))?;
        Ok(Response::new(s))
    }

    async fn reserve_block(
        &self,
        req: Request<pb::ReserveBlockRequest>,
    ) -> Result<Response<pb::SyncAck>, Status> {
        let r = req.into_inner();
        let ack = self
            .node
            .on_reserve_block(r.term, r.boundary)
            .await
            .map_err(|e| self.err(e))?;
        Ok(Response::new(ack))
    }

    async fn replicate_decisions(
        &self,
        req: Request<pb::ReplicateDecisionsRequest>,
    ) -> Result<Response<pb::SyncAck>, Status> {
        let r = req.into_inner();
        let records = from_records(&r.decisions).map_err(|e| self.err(e))?;
        let ack = self
            .node
            .on_replicate(r.term, &records)
            .await
            .map_err(|e| self.err(e))?;
        Ok(Response::new(ack))
    }

    async fn snapshot(
        &self,
        req: Request<pb::SnapshotRequest>,
    ) -> Result<Response<pb::GtmSnapshot>, Status> {
        let r = req.into_inner();
        let snap = self
            .node
            .snapshot(r.term, &r.standby)
            .await
            .map_err(|e| self.err(e))?;
        Ok(Response::new(snap))
    }
}

/// What `gtm serve` needs.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub config: PathBuf,
    pub node: String,
    pub base_dir: Option<PathBuf>,
    /// Hand out GXIDs only under the primary CMServer's lease, renewed by this GTM
    /// itself (`--require-lease`, `renew.rs`).
    pub require_lease: bool,
}

/// Runs one GTM instance until SIGINT/SIGTERM.
/// The GTM's metrics in `reg`: role and term (set before each scrape), GXIDs handed
/// out, reservations, 2PC decisions recorded. Returns what the scrape hook sets.
pub fn register_metrics(
    reg: &mut ha_common::metrics::prometheus_client::registry::Registry,
    counters: &crate::node::GtmCounters,
) -> (
    ha_common::metrics::InstanceMetrics,
    ha_common::metrics::prometheus_client::metrics::gauge::Gauge,
) {
    let own = ha_common::metrics::InstanceMetrics::register(reg);
    reg.register(
        "gxids_handed_out",
        "GXIDs this GTM handed out as primary",
        counters.handed_out.clone(),
    );
    reg.register(
        "gxid_reservations",
        "GXID blocks this GTM reserved durably (standby first)",
        counters.reservations.clone(),
    );
    let decisions = ha_common::metrics::prometheus_client::metrics::gauge::Gauge::default();
    reg.register(
        "gtm_decisions",
        "2PC decisions recorded on this GTM",
        decisions.clone(),
    );
    (own, decisions)
}

/// Serves /metrics when the GTM has a metrics_port.
async fn serve_metrics(node: &Arc<Node>, endpoint: Option<String>) {
    let mut reg = ha_common::metrics::registry();
    let (own, decisions) = register_metrics(&mut reg, &node.counters);
    let n = node.clone();
    let hook: ha_common::metrics::ScrapeHook = Arc::new(move || {
        let s = n.status();
        own.set_role(n.name(), n.role().as_str());
        own.set_term(n.name(), n.term());
        decisions.set(s.decisions as i64);
        Box::pin(async {})
    });
    ha_common::metrics::HttpServer::new(reg)
        .before_scrape(hook)
        .spawn_at(node.name(), endpoint)
        .await;
}

pub async fn serve(opts: ServeOptions) -> Result<(), ServeError> {
    let cfg = ClusterConfig::load(&opts.config)?.with_base_dir(opts.base_dir.clone());
    let Some(me) = cfg.gtm.instances.iter().find(|i| i.name == opts.node) else {
        return Err(ServeError::UnknownNode {
            config: opts.config.clone(),
            node: opts.node.clone(),
            known: cfg
                .gtm
                .instances
                .iter()
                .map(|i| i.name.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        });
    };
    ha_common::tls::init(&cfg, ha_common::tls::CertRole::Gtm, Some(&me.host))
        .map_err(ha_common::ConfigError::from)?;
    let peer = match cfg.gtm.instances.iter().find(|i| i.name != me.name) {
        Some(p) => {
            let ep = cfg.endpoint(p);
            Some(PeerLink::new(&p.name, &ep).map_err(|e| ServeError::Peer(ep.clone(), e))?)
        }
        None => None,
    };
    let config_role = match me.role() {
        Some(ha_common::Role::Primary) => Role::Primary,
        _ => Role::Standby,
    };
    let settings = NodeSettings {
        name: me.name.clone(),
        block_size: cfg.gtm.block_size,
        sync_timeout: cfg.gtm.sync_timeout(),
        require_lease: opts.require_lease,
    };
    let data_dir = cfg.instance_dir(&me.name);
    let (node, data) = Node::open(settings, &data_dir, config_role, peer.clone())?;
    tracing::info!(
        node = %me.name, dir = %data_dir.display(), term = data.term, boundary = data.boundary,
        role = node.role().as_str(), "opened data dir"
    );

    // Bind before asking the peer, so that a peer starting at the same time can ask us.
    let host = cfg.address_of(me).to_owned();
    let addr_text = format!("{host}:{}", me.port());
    let addr: SocketAddr = tokio::net::lookup_host(&addr_text)
        .await
        .map_err(|e| ServeError::Resolve(addr_text.clone(), e))?
        .next()
        .ok_or_else(|| {
            ServeError::Resolve(addr_text.clone(), std::io::Error::other("no address"))
        })?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| ServeError::Bind {
            addr: addr_text.clone(),
            source,
        })?;

    if node.role() == Role::Primary {
        if let Some(peer) = &peer {
            // Was the peer promoted while we were down? Then we must not be primary.
            let probe = Duration::from_millis(cfg.gtm.sync_timeout_ms.min(1000));
            match tokio::time::timeout(probe, peer.status()).await {
                Ok(Ok(s)) => node.yield_to_newer_primary(&s).await,
                Ok(Err(e)) => tracing::info!(
                    "peer {} not answering ({}); starting as primary",
                    peer.name,
                    e.message()
                ),
                Err(_) => tracing::info!(
                    "peer {} not answering (timeout); starting as primary",
                    peer.name
                ),
            }
        }
    }
    tracing::info!(addr = %addr_text, role = node.role().as_str(), term = node.term(), "GTM serving");

    serve_metrics(&node, me.metrics_port().map(|p| format!("{host}:{p}"))).await;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let renewals = opts.require_lease.then(|| {
        tokio::spawn(crate::renew::run(
            node.clone(),
            cfg.clone(),
            stop_rx.clone(),
        ))
    });
    let bg = tokio::spawn(replication::run(node.clone(), stop_rx));
    let incoming = ha_common::tls::incoming(listener);
    let result = ha_common::tls::server()
        .add_service(GtmServer::with_interceptor(
            GtmService::new(node),
            ha_common::tls::deny_restore,
        ))
        .serve_with_incoming_shutdown(incoming, ha_common::shutdown::signal())
        .await;
    let _ = stop_tx.send(true);
    let _ = bg.await;
    if let Some(r) = renewals {
        let _ = r.await;
    }
    tracing::info!("GTM stopped");
    result.map_err(ServeError::from)
}
