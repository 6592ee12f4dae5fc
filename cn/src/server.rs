//! `cn serve`: loads the config and catalog, starts the gRPC service, the topology
//! loop and the resolver, and accepts PostgreSQL clients until SIGTERM.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use gtm::{ClientOptions, GtmClient};
use ha_common::config::InstanceKind;
use ha_common::proto::cn::coordinator_server::CoordinatorServer;
use ha_common::ClusterConfig;
use tokio::net::TcpListener;

use crate::catalog::{Catalog, CatalogStore};
use crate::node::Node;
use crate::rpc::CoordinatorService;
use crate::session::{Handlers, Session};

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("{0}")]
    Config(#[from] ha_common::ConfigError),
    #[error("{0}")]
    Catalog(#[from] crate::catalog::CatalogError),
    #[error("{config}: no [[cn]] named {name:?}")]
    UnknownCn { config: String, name: String },
    #[error("cannot create {path}: {source}")]
    StateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: String,
        source: std::io::Error,
    },
    #[error("GTM client: {0}")]
    Gtm(String),
    #[error("{0}")]
    Users(#[from] ha_common::dn_auth::DnAuthError),
}

/// How often the in-doubt resolver runs.
pub const RESOLVE_INTERVAL: Duration = Duration::from_secs(3);

pub async fn serve(
    config: PathBuf,
    name: &str,
    base_dir: Option<PathBuf>,
) -> Result<(), ServeError> {
    let mut cfg = ClusterConfig::load(&config)?;
    if let Some(b) = base_dir {
        cfg.cluster.base_dir = b;
    }
    let me = match cfg.find(name) {
        Some(r) if r.kind == InstanceKind::Coordinator => r.instance.clone(),
        _ => {
            return Err(ServeError::UnknownCn {
                config: config.display().to_string(),
                name: name.to_owned(),
            })
        }
    };
    ha_common::tls::init(&cfg, ha_common::tls::CertRole::Cn, Some(&me.host))
        .map_err(ha_common::ConfigError::from)?;
    let state_dir = cfg.cluster.base_dir.join(name);
    std::fs::create_dir_all(&state_dir).map_err(|source| ServeError::StateDir {
        path: state_dir.clone(),
        source,
    })?;
    // The users' passwords first: a missing password file stops the CN at start.
    let auth = crate::node::UserAuth::new(&cfg)?;
    let store = CatalogStore::new(&state_dir);
    let groups: Vec<String> = cfg.dn_groups.iter().map(|g| g.name.clone()).collect();
    let catalog = match store.load()? {
        Some(c) => c,
        None => {
            let c = Catalog::new(groups);
            store.save(&c)?;
            c
        }
    };
    let gtm_endpoints = cfg.gtm.instances.iter().map(|g| cfg.endpoint(g)).collect();
    let gtm = GtmClient::connect_with(gtm_endpoints, ClientOptions::default())
        .await
        .map_err(|e| ServeError::Gtm(e.to_string()))?;
    let address = cfg.address_of(&me).to_owned();
    let node = Arc::new(Node::new(name, cfg.clone(), state_dir, catalog, gtm, auth));

    let rpc_addr = format!("{address}:{}", me.rpc_port());
    let rpc_listener = TcpListener::bind(&rpc_addr)
        .await
        .map_err(|source| ServeError::Listen {
            addr: rpc_addr.clone(),
            source,
        })?;
    let pg_addr = format!("{address}:{}", me.port());
    let listener = TcpListener::bind(&pg_addr)
        .await
        .map_err(|source| ServeError::Listen {
            addr: pg_addr.clone(),
            source,
        })?;

    let svc = CoordinatorServer::with_interceptor(
        CoordinatorService { node: node.clone() },
        ha_common::tls::deny_restore,
    );
    tokio::spawn(async move {
        let incoming = ha_common::tls::incoming(rpc_listener);
        if let Err(e) = ha_common::tls::server()
            .add_service(svc)
            .serve_with_incoming(incoming)
            .await
        {
            tracing::error!("gRPC service stopped: {e}");
        }
    });
    // Finish what an earlier life left prepared before taking new work.
    let n = crate::two_phase::resolve_once(&node).await;
    if n > 0 {
        tracing::info!(finished = n, "resolver at start");
    }
    tokio::spawn(crate::topology::run(node.clone()));
    let resolver_node = node.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(RESOLVE_INTERVAL).await;
            crate::two_phase::resolve_once(&resolver_node).await;
        }
    });

    serve_http(&node, me.metrics_port().map(|p| format!("{address}:{p}"))).await;
    tracing::info!(%pg_addr, %rpc_addr, "cn {name} serving");
    let shutdown = ha_common::shutdown::signal();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => {
                tracing::info!("cn {name}: stopping");
                return Ok(());
            }
            accepted = listener.accept() => {
                let Ok((socket, _)) = accepted else { continue };
                let _ = socket.set_nodelay(true);
                let handlers = Arc::new(Handlers { session: Session::new(node.clone()) });
                tokio::spawn(async move {
                    let _ = pgwire::tokio::process_socket(socket, None, handlers).await;
                });
            }
        }
    }
}

/// /metrics (accepting, DDL and 2PC counts, in-doubt transactions) and `GET /health`:
/// 200 only while the CN accepts clients (a load balancer's check).
async fn serve_http(node: &Arc<Node>, endpoint: Option<String>) {
    use ha_common::metrics::{handler, HttpReply};
    let mut reg = ha_common::metrics::registry();
    let own = ha_common::metrics::InstanceMetrics::register(&mut reg);
    node.counters.register(&mut reg);
    let n = node.clone();
    let hook: ha_common::metrics::ScrapeHook = Arc::new(move || {
        let state = if n.is_accepting() {
            "accepting"
        } else {
            "not_accepting"
        };
        own.set_state(&n.name, state);
        own.set_role(&n.name, "primary");
        own.set_term(
            &n.name,
            n.cm_term.load(std::sync::atomic::Ordering::Relaxed),
        );
        Box::pin(async {})
    });
    let n = node.clone();
    ha_common::metrics::HttpServer::new(reg)
        .before_scrape(hook)
        .route(
            "/health",
            handler(move || {
                let n = n.clone();
                async move {
                    if n.is_accepting() {
                        HttpReply::text(200, format!("{} accepts clients\n", n.name))
                    } else {
                        HttpReply::text(503, format!("{} does not accept clients now\n", n.name))
                    }
                }
            }),
        )
        .spawn_at(&node.name, endpoint)
        .await;
}
