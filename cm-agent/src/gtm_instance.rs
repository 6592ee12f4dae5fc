//! One GTM instance on this host: our `gtm` binary started as a detached process
//! (own session, so it outlives the agent), found again through its pid file, and
//! probed and ordered over the GTM's gRPC protocol. Its output goes to
//! `<base_dir>/<name>.gtm.log`, its pid to `<base_dir>/<name>.gtm.pid`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use ha_common::config::ClusterConfig;
use ha_common::proto::gtm::gtm_client::GtmClient;
use ha_common::proto::gtm::{
    DemoteRequest, GtmStatus, PromoteRequest, SetRunAloneRequest, StatusRequest,
};

use crate::detached::Detached;
use crate::error::{AgentError, Result};

#[derive(Debug)]
pub struct GtmInstance {
    pub name: String,
    pub instance_dir: PathBuf,
    pub pid_file: PathBuf,
    pub log_file: PathBuf,
    /// `http://address:port`.
    pub url: String,
    pub binary: PathBuf,
    pub config_path: PathBuf,
    pub base_dir: PathBuf,
    /// The `gtm serve` process (pid file, adoption, start, stop).
    process: Detached,
}

impl GtmInstance {
    /// The GTM instance `name` of `cfg`; `config_path` is handed to `gtm serve`.
    pub fn from_config(cfg: &ClusterConfig, name: &str, config_path: &Path) -> Result<GtmInstance> {
        let inst = cfg
            .gtm
            .instances
            .iter()
            .find(|i| i.name == name)
            .ok_or_else(|| {
                AgentError::Instance(format!("{name} is not a GTM instance of the config"))
            })?;
        // The pid file and log live beside the data dir, not in it: the gtm creates
        // its data dir itself (atomically, with its control file) and refuses to start
        // on an existing dir without one, so the agent must not create it first.
        let mut process = Detached::serve(cfg, "gtm", name, config_path);
        // Invariant 3 under partitions: with `gtm.require_lease` (the default) an
        // agent-run GTM hands out GXIDs only under the primary CMServer's lease, which
        // it renews from the CMServer itself (RenewGtmLease): an agent restart does
        // not pause it.
        if cfg.gtm.require_lease {
            process.extra_args.push("--require-lease".to_owned());
        }
        Ok(GtmInstance {
            name: name.to_owned(),
            pid_file: process.pid_file.clone(),
            log_file: process.log_file.clone(),
            instance_dir: cfg.instance_dir(name),
            url: format!("http://{}", cfg.endpoint(inst)),
            binary: process.binary.clone(),
            config_path: config_path.to_owned(),
            base_dir: process.base_dir.clone(),
            process,
        })
    }

    /// The pid of the running gtm of this instance, if any.
    pub fn pid(&mut self) -> Option<u32> {
        self.process.pid()
    }

    /// Starts `gtm serve` detached: its own session, stdout/stderr appended to
    /// `<name>.gtm.log`, its pid in `<name>.gtm.pid`. Fails if the binary is missing or it exits at once.
    pub async fn start(&mut self) -> Result<()> {
        self.process.start().await
    }

    /// Stops it (SIGTERM, then SIGKILL after `grace`).
    pub async fn stop(&mut self, grace: Duration) -> Result<()> {
        self.process.stop(grace).await
    }

    async fn client(&self, timeout: Duration) -> Result<GtmClient<tonic::transport::Channel>> {
        let endpoint = ha_common::tls::endpoint(&self.url, ha_common::tls::CertRole::Gtm, timeout)
            .map_err(|e| {
                AgentError::Probe(format!("{}: bad endpoint {}: {e}", self.name, self.url))
            })?
            .timeout(timeout);
        let channel = endpoint
            .connect()
            .await
            .map_err(|e| AgentError::Probe(format!("{}: connect {}: {e}", self.name, self.url)))?;
        Ok(GtmClient::new(channel))
    }

    fn rpc_error(&self, what: &str, e: tonic::Status) -> AgentError {
        AgentError::Probe(format!("{}: {what}: {}", self.name, e.message()))
    }

    /// The GTM's own view of itself (Status RPC).
    pub async fn probe(&self, timeout: Duration) -> Result<GtmStatus> {
        let mut c = self.client(timeout).await?;
        let status = c
            .status(StatusRequest {})
            .await
            .map_err(|e| self.rpc_error("status", e))?;
        Ok(status.into_inner())
    }

    /// Promote RPC. The GTM pair's term is its own counter (not the CMServer's, whose
    /// fencing the agent applies before the order gets here): term 0 asks the GTM for
    /// its own term + 1, which is above its old primary's. The new primary runs alone:
    /// the arbiter promotes a GTM standby when its primary (the only possible standby)
    /// is gone. A standby that is not `ready` refuses.
    pub async fn promote(&self, timeout: Duration) -> Result<GtmStatus> {
        let mut c = self.client(timeout).await?;
        let s = c
            .promote(PromoteRequest {
                term: 0,
                run_alone: true,
            })
            .await
            .map_err(|e| self.rpc_error("promote", e))?;
        Ok(s.into_inner())
    }

    /// Demote RPC in the GTM's own current term (see [`GtmInstance::promote`]).
    pub async fn demote(&self, timeout: Duration) -> Result<GtmStatus> {
        let term = self.probe(timeout).await?.term;
        let mut c = self.client(timeout).await?;
        let s = c
            .demote(DemoteRequest { term })
            .await
            .map_err(|e| self.rpc_error("demote", e))?;
        Ok(s.into_inner())
    }

    /// SetRunAlone RPC in the GTM's own current term.
    pub async fn set_run_alone(&self, run_alone: bool, timeout: Duration) -> Result<GtmStatus> {
        let term = self.probe(timeout).await?.term;
        let mut c = self.client(timeout).await?;
        let s = c
            .set_run_alone(SetRunAloneRequest { term, run_alone })
            .await
            .map_err(|e| self.rpc_error("set run-alone", e))?;
        Ok(s.into_inner())
    }

    pub fn log_tail(&self, lines: usize) -> String {
        self.process.log_tail(lines)
    }
}

/// "term 3, boundary 8000, ready" for status.
pub fn describe(status: &GtmStatus) -> String {
    use ha_common::proto::gtm::Role;
    let mut parts = vec![
        format!("term {}", status.term),
        format!("boundary {}", status.boundary),
    ];
    match Role::try_from(status.role) {
        Ok(Role::Primary) => {
            parts.push(format!("next gxid {}", status.next_gxid));
            parts.push(
                if status.standby_attached {
                    "standby attached"
                } else {
                    "no standby"
                }
                .to_owned(),
            );
            if status.run_alone {
                parts.push("running alone".to_owned());
            }
        }
        _ => parts.push(if status.ready { "ready" } else { "not ready" }.to_owned()),
    }
    if !status.last_error.is_empty() {
        parts.push(format!("error: {}", status.last_error));
    }
    parts.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use ha_common::proto::gtm::Role;

    #[test]
    fn describes_a_standby_and_a_primary() {
        let s = GtmStatus {
            role: Role::Standby as i32,
            term: 3,
            boundary: 8000,
            ready: true,
            ..GtmStatus::default()
        };
        assert_eq!(describe(&s), "term 3, boundary 8000, ready");
        let p = GtmStatus {
            role: Role::Primary as i32,
            term: 4,
            boundary: 10000,
            next_gxid: 8001,
            standby_attached: true,
            ..GtmStatus::default()
        };
        assert_eq!(
            describe(&p),
            "term 4, boundary 10000, next gxid 8001, standby attached"
        );
    }

    #[tokio::test]
    async fn missing_binary_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = crate::detached::config_without_binaries(dir.path());
        let mut g = GtmInstance::from_config(&cfg, "gtm1", Path::new("t.toml")).unwrap();
        let e = g.start().await.unwrap_err().to_string();
        assert!(e.contains("gtm binary not found"), "{e}");
        assert!(g.pid().is_none());
    }
}
