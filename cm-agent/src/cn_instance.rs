//! One coordinator (CN) on this host: `cn serve` run detached (pid file, adoption after
//! an agent restart), probed with `Coordinator.Status` on the CN's `rpc_port`. Its
//! output goes to `<base_dir>/<name>.cn.log`, its pid to `<base_dir>/<name>.cn.pid`.

use std::path::Path;
use std::time::Duration;

use ha_common::config::ClusterConfig;
use ha_common::proto::cn::coordinator_client::CoordinatorClient;
use ha_common::proto::cn::{CnStatusReply, CnStatusRequest};

use crate::detached::Detached;
use crate::error::{AgentError, Result};

/// How long a CN gets to stop on SIGTERM (it finishes its sessions) before SIGKILL.
pub const CN_STOP_GRACE: Duration = Duration::from_secs(10);

#[derive(Debug)]
pub struct CnInstance {
    pub name: String,
    /// `http://address:rpc_port` of its Coordinator service.
    pub rpc_url: String,
    process: Detached,
}

impl CnInstance {
    /// The CN `name` of `cfg`; `config_path` is handed to `cn serve`.
    pub fn from_config(cfg: &ClusterConfig, name: &str, config_path: &Path) -> Result<CnInstance> {
        let inst =
            cfg.cns.iter().find(|i| i.name == name).ok_or_else(|| {
                AgentError::Instance(format!("{name} is not a [[cn]] of the config"))
            })?;
        Ok(CnInstance {
            name: name.to_owned(),
            rpc_url: format!("http://{}:{}", cfg.address_of(inst), inst.rpc_port()),
            process: Detached::serve(cfg, "cn", name, config_path),
        })
    }

    pub fn pid_file(&self) -> &Path {
        &self.process.pid_file
    }

    /// The pid of the running `cn serve` of this instance, if any.
    pub fn pid(&mut self) -> Option<u32> {
        self.process.pid()
    }

    pub async fn start(&mut self) -> Result<()> {
        self.process.start().await
    }

    pub async fn stop(&mut self, grace: Duration) -> Result<()> {
        self.process.stop(grace).await
    }

    pub fn log_tail(&self, lines: usize) -> String {
        self.process.log_tail(lines)
    }

    /// The CN's own view of itself (Status RPC).
    pub async fn probe(&self, timeout: Duration) -> Result<CnStatusReply> {
        let endpoint =
            ha_common::tls::endpoint(&self.rpc_url, ha_common::tls::CertRole::Cn, timeout)
                .map_err(|e| {
                    AgentError::Probe(format!("{}: bad endpoint {}: {e}", self.name, self.rpc_url))
                })?
                .timeout(timeout);
        let channel = endpoint.connect().await.map_err(|e| {
            AgentError::Probe(format!("{}: connect {}: {e}", self.name, self.rpc_url))
        })?;
        let reply = CoordinatorClient::new(channel)
            .status(CnStatusRequest {})
            .await
            .map_err(|e| AgentError::Probe(format!("{}: status: {}", self.name, e.message())))?;
        Ok(reply.into_inner())
    }
}

/// "accepting clients, catalog version 4" for status.
pub fn describe(status: &CnStatusReply) -> String {
    let mut parts = vec![
        if status.accepting {
            "accepting clients".to_owned()
        } else {
            "not accepting clients".to_owned()
        },
        format!("catalog version {}", status.catalog_version),
    ];
    if !status.detail.is_empty() {
        parts.push(status.detail.clone());
    }
    parts.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn describes_a_cn() {
        let s = CnStatusReply {
            name: "cn1".into(),
            accepting: false,
            catalog_version: 3,
            detail: "copying the catalog from cn2".into(),
        };
        assert_eq!(
            describe(&s),
            "not accepting clients, catalog version 3, copying the catalog from cn2"
        );
    }

    /// An in-process stand-in for a CN's Coordinator service (unit test only).
    struct FakeCoordinator;

    #[tonic::async_trait]
    impl ha_common::proto::cn::coordinator_server::Coordinator for FakeCoordinator {
        async fn status(
            &self,
            _: tonic::Request<CnStatusRequest>,
        ) -> std::result::Result<tonic::Response<CnStatusReply>, tonic::Status> {
            Ok(tonic::Response::new(CnStatusReply {
                name: "cn1".into(),
                accepting: true,
                catalog_version: 7,
                detail: String::new(),
            }))
        }
        async fn prepare_catalog(
            &self,
            _: tonic::Request<ha_common::proto::cn::PrepareCatalogRequest>,
        ) -> std::result::Result<tonic::Response<ha_common::proto::cn::CatalogReply>, tonic::Status>
        {
            Err(tonic::Status::unimplemented("fake"))
        }
        async fn finish_catalog(
            &self,
            _: tonic::Request<ha_common::proto::cn::FinishCatalogRequest>,
        ) -> std::result::Result<tonic::Response<ha_common::proto::cn::CatalogReply>, tonic::Status>
        {
            Err(tonic::Status::unimplemented("fake"))
        }
        async fn get_catalog(
            &self,
            _: tonic::Request<ha_common::proto::cn::GetCatalogRequest>,
        ) -> std::result::Result<
            tonic::Response<ha_common::proto::cn::GetCatalogReply>,
            tonic::Status,
        > {
            Err(tonic::Status::unimplemented("fake"))
        }
    }

    #[tokio::test]
    async fn probe_asks_the_coordinator_service_and_fails_fast_when_nobody_answers() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(
                    ha_common::proto::cn::coordinator_server::CoordinatorServer::new(
                        FakeCoordinator,
                    ),
                )
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
        );
        let cfg = ClusterConfig::parse(
            include_str!("../../configs/local.toml"),
            Path::new("t.toml"),
        )
        .unwrap();
        let mut cn = CnInstance::from_config(&cfg, "cn1", Path::new("t.toml")).unwrap();
        cn.rpc_url = format!("http://{addr}");
        let s = cn.probe(Duration::from_secs(2)).await.unwrap();
        assert_eq!((s.accepting, s.catalog_version), (true, 7));
        server.abort();
        let _ = server.await;
        let t = std::time::Instant::now();
        let e = cn
            .probe(Duration::from_millis(500))
            .await
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("cn1: "), "{e}");
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "bounded by the probe timeout"
        );
    }

    #[tokio::test]
    async fn missing_binary_is_a_clear_error_and_nothing_runs() {
        let dir = tempfile::tempdir().unwrap();
        let text = include_str!("../../configs/local.toml")
            .replace(
                "base_dir = \"/tmp/mpp-ha\"",
                &format!("base_dir = {:?}", dir.path().display().to_string()),
            )
            .replace(
                "# bin_dir = \"/usr/local/bin\"",
                &format!(
                    "bin_dir = {:?}",
                    dir.path().join("nobin").display().to_string()
                ),
            );
        let cfg = ClusterConfig::parse(&text, Path::new("t.toml")).unwrap();
        let mut cn = CnInstance::from_config(&cfg, "cn1", Path::new("t.toml")).unwrap();
        let e = cn.start().await.unwrap_err().to_string();
        assert!(e.contains("cn binary not found"), "{e}");
        assert!(cn.pid().is_none());
        assert!(!cn.pid_file().exists());
        assert!(CnInstance::from_config(&cfg, "gtm1", Path::new("t.toml")).is_err());
    }
}
