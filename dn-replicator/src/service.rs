//! `dn_replicator serve`: the Replicator gRPC service on the member's configured port.

use ha_common::metrics::prometheus_client::metrics::gauge::Gauge;
use ha_common::tls::{require_role, CertRole};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use ha_common::config::{ClusterConfig, InstanceKind, Role};
use ha_common::proto::replicator as pb;
use pb::replicator_server::{Replicator, ReplicatorServer};
use tonic::{Request, Response, Status};

use crate::node::{Node, NodeError};
use crate::receiver::Upstream;
use crate::secondary::Order;

/// Chunk size of ReadWal (below gRPC's default 4 MiB message limit).
const CHUNK: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Config(#[from] ha_common::ConfigError),
    #[error("config {config}: {node:?} is not a DN member with role = \"secondary\"")]
    NotSecondary { config: PathBuf, node: String },
    #[error(transparent)]
    Node(#[from] NodeError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
    #[error("gRPC server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
}

struct Service {
    node: Arc<Node>,
}

fn to_status(e: NodeError) -> Status {
    match e {
        NodeError::Refused(r) => Status::failed_precondition(r.to_string()),
        other => Status::internal(other.to_string()),
    }
}

type ChunkStream = Pin<Box<dyn Stream<Item = Result<pb::WalChunk, Status>> + Send>>;

/// Who may order a secondary to stream or stop, and read its status: its agent (and
/// an operator's tools).
const ORDERS: &[CertRole] = &[CertRole::Agent, CertRole::Operator];
/// Who may read its WAL: a standby's `restore_command` (the OS user's `restore`
/// certificate, good for nothing else), and its agent and operators.
const READERS: &[CertRole] = &[CertRole::Restore, CertRole::Agent, CertRole::Operator];

#[tonic::async_trait]
impl Replicator for Service {
    async fn stream(
        &self,
        req: Request<pb::StreamOrder>,
    ) -> Result<Response<pb::ReplicatorStatus>, Status> {
        require_role(&req, ORDERS)?;
        let r = req.into_inner();
        let port = u16::try_from(r.upstream_port)
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| {
                Status::invalid_argument(format!("bad upstream port {}", r.upstream_port))
            })?;
        if r.upstream_host.is_empty() || r.upstream_name.is_empty() {
            return Err(Status::invalid_argument(
                "upstream name and host are required",
            ));
        }
        let order = Order::Stream {
            term: r.term,
            upstream: Upstream {
                name: r.upstream_name,
                host: r.upstream_host,
                port,
            },
            start_lsn: r.start_lsn,
        };
        self.node
            .apply(order)
            .await
            .map(Response::new)
            .map_err(to_status)
    }

    async fn stop(
        &self,
        req: Request<pb::StopOrder>,
    ) -> Result<Response<pb::ReplicatorStatus>, Status> {
        require_role(&req, ORDERS)?;
        let r = req.into_inner();
        let order = Order::Stop {
            term: r.term,
            discard: r.discard,
        };
        self.node
            .apply(order)
            .await
            .map(Response::new)
            .map_err(to_status)
    }

    async fn status(
        &self,
        req: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::ReplicatorStatus>, Status> {
        require_role(&req, ORDERS)?;
        Ok(Response::new(self.node.status().await))
    }

    type ReadWalStream = ChunkStream;

    async fn read_wal(
        &self,
        req: Request<pb::ReadWalRequest>,
    ) -> Result<Response<Self::ReadWalStream>, Status> {
        require_role(&req, READERS)?;
        let name = req.into_inner().file_name;
        let node = self.node.clone();
        let data = tokio::task::spawn_blocking(move || node.read_wal(&name).map(|d| (name, d)))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(|e| Status::internal(e.to_string()))?;
        let (name, Some(data)) = data else {
            return Err(Status::not_found(format!("{} is not kept here", data.0)));
        };
        tracing::info!(file = %name, bytes = data.len(), "serving WAL for catch-up");
        let chunks: Vec<Result<pb::WalChunk, Status>> = data
            .chunks(CHUNK)
            .map(|c| Ok(pb::WalChunk { data: c.to_vec() }))
            .collect();
        Ok(Response::new(Box::pin(futures::stream::iter(chunks))))
    }
}

/// The secondary's metrics in `reg`: role/state/term, and the gauges flush LSN, WAL
/// bytes kept, connected (set before each scrape).
pub fn register_metrics(
    reg: &mut ha_common::metrics::prometheus_client::registry::Registry,
) -> (ha_common::metrics::InstanceMetrics, [Gauge; 3]) {
    let own = ha_common::metrics::InstanceMetrics::register(reg);
    let (flush, kept, connected) = (Gauge::default(), Gauge::default(), Gauge::default());
    reg.register(
        "secondary_flush_lsn",
        "End of the WAL this secondary keeps durably",
        flush.clone(),
    );
    reg.register(
        "secondary_wal_bytes_kept",
        "Bytes of WAL this secondary keeps",
        kept.clone(),
    );
    reg.register(
        "secondary_connected",
        "1 while the secondary streams from its upstream",
        connected.clone(),
    );
    (own, [flush, kept, connected])
}

/// /metrics: the secondary's state (idle/streaming/holding), term, WAL kept and its
/// flush position, and whether the replication connection is up.
async fn serve_metrics(node: &Arc<Node>, name: &str, endpoint: Option<String>) {
    let mut reg = ha_common::metrics::registry();
    let (own, [flush, kept, connected]) = register_metrics(&mut reg);
    let (n, me) = (node.clone(), name.to_owned());
    let hook: ha_common::metrics::ScrapeHook = Arc::new(move || {
        let (n, name, own) = (n.clone(), me.clone(), own.clone());
        let (flush, kept, connected) = (flush.clone(), kept.clone(), connected.clone());
        Box::pin(async move {
            let st = n.status().await;
            own.set_role(&name, "secondary");
            own.set_state(
                &name,
                st.state().as_str_name().to_ascii_lowercase().as_str(),
            );
            own.set_term(&name, st.term);
            flush.set(st.flush_lsn as i64);
            kept.set(st.bytes_kept as i64);
            connected.set(i64::from(st.connected));
        })
    });
    ha_common::metrics::HttpServer::new(reg)
        .before_scrape(hook)
        .spawn_at(name, endpoint)
        .await;
}

/// Runs secondary `node` of `config` until SIGINT/SIGTERM.
pub async fn serve(
    config: &std::path::Path,
    node: &str,
    base_dir: Option<PathBuf>,
) -> Result<(), ServeError> {
    let cfg = ClusterConfig::load(config)?.with_base_dir(base_dir);
    let me = cfg
        .find(node)
        .filter(|r| r.kind == InstanceKind::DnMember && r.instance.role() == Some(Role::Secondary))
        .ok_or_else(|| ServeError::NotSecondary {
            config: config.to_owned(),
            node: node.to_owned(),
        })?
        .instance
        .clone();
    ha_common::tls::init(&cfg, ha_common::tls::CertRole::Replicator, Some(&me.host))
        .map_err(ha_common::ConfigError::from)?;
    let dir = cfg.instance_dir(&me.name);
    let password_file =
        ha_common::dn_auth::password_file(&cfg, ha_common::dn_auth::DnRole::Replication);
    let n = Arc::new(Node::open(&me.name, &dir)?.with_password_file(password_file));
    let addr_text = format!("{}:{}", cfg.address_of(&me), me.port());
    let addr: SocketAddr = tokio::net::lookup_host(&addr_text)
        .await
        .map_err(|source| ServeError::Bind {
            addr: addr_text.clone(),
            source,
        })?
        .next()
        .ok_or_else(|| ServeError::Bind {
            addr: addr_text.clone(),
            source: std::io::Error::other("no address"),
        })?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| ServeError::Bind {
            addr: addr_text.clone(),
            source,
        })?;
    n.resume().await;
    let st = n.status().await;
    tracing::info!(node = %me.name, addr = %addr_text, dir = %dir.display(), term = st.term, state = ?st.state(), "dn_replicator serving");
    let metrics_ep = me
        .metrics_port()
        .map(|p| format!("{}:{p}", cfg.address_of(&me)));
    serve_metrics(&n, &me.name, metrics_ep).await;
    let incoming = ha_common::tls::incoming(listener);
    ha_common::tls::server()
        .add_service(ReplicatorServer::new(Service { node: n }))
        .serve_with_incoming_shutdown(incoming, ha_common::shutdown::signal())
        .await?;
    tracing::info!("dn_replicator stopped");
    Ok(())
}
