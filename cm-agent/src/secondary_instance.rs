//! One DN secondary on this host: our `dn_replicator serve` started detached (own
//! session, so it outlives the agent), found again through its pid file, probed over
//! its Replicator gRPC service, and given the CMServer's secondary assignment as
//! Replicator orders in the CMServer's term. Output goes to
//! `<base_dir>/<name>.replicator.log`, its pid to `<base_dir>/<name>.replicator.pid`.

use std::path::Path;
use std::time::Duration;

use ha_common::config::ClusterConfig;
use ha_common::lsn::format_lsn;
use ha_common::proto::cm::{Assignment, SecondaryFacts, SecondaryMode};
use ha_common::proto::replicator::replicator_client::ReplicatorClient;
use ha_common::proto::replicator::{
    ReplicatorState, ReplicatorStatus, StatusRequest, StopOrder, StreamOrder,
};

use crate::detached::Detached;
use crate::error::{AgentError, Result};

const PROGRAM: &str = "dn_replicator";

#[derive(Debug)]
pub struct SecondaryInstance {
    pub name: String,
    pub url: String,
    /// The `dn_replicator serve` process (pid file, adoption, start, stop).
    process: Detached,
}

impl SecondaryInstance {
    pub fn from_config(
        cfg: &ClusterConfig,
        name: &str,
        config_path: &Path,
    ) -> Result<SecondaryInstance> {
        let r = cfg.find(name).ok_or_else(|| {
            AgentError::Instance(format!("{name} is not an instance of the config"))
        })?;
        let mut process = Detached::serve(cfg, PROGRAM, name, config_path);
        // `<name>.replicator.{pid,log}` (not `.dn_replicator.`): the names running
        // clusters, operators and tests already know.
        process.pid_file = process.base_dir.join(format!("{name}.replicator.pid"));
        process.log_file = process.base_dir.join(format!("{name}.replicator.log"));
        Ok(SecondaryInstance {
            name: name.to_owned(),
            url: format!("http://{}", cfg.endpoint(r.instance)),
            process,
        })
    }

    /// The pid of the running dn_replicator of this instance, if any.
    pub fn pid(&mut self) -> Option<u32> {
        self.process.pid()
    }

    /// Starts `dn_replicator serve` detached, unless it already runs (then nothing to
    /// do); fails if the binary is missing or it exits at once.
    pub async fn start(&mut self) -> Result<()> {
        if self.pid().is_some() {
            return Ok(());
        }
        self.process.start().await
    }

    /// SIGTERM, then SIGKILL after `grace`.
    pub async fn stop(&mut self, grace: Duration) -> Result<()> {
        self.process.stop(grace).await
    }

    async fn client(
        &self,
        timeout: Duration,
    ) -> Result<ReplicatorClient<tonic::transport::Channel>> {
        let channel =
            ha_common::tls::endpoint(&self.url, ha_common::tls::CertRole::Replicator, timeout)
                .map_err(|e| {
                    AgentError::Probe(format!("{}: bad endpoint {}: {e}", self.name, self.url))
                })?
                .timeout(timeout)
                .connect()
                .await
                .map_err(|e| {
                    AgentError::Probe(format!("{}: connect {}: {e}", self.name, self.url))
                })?;
        Ok(ReplicatorClient::new(channel))
    }

    fn rpc_error(&self, what: &str, e: tonic::Status) -> AgentError {
        AgentError::Probe(format!("{}: {what}: {}", self.name, e.message()))
    }

    pub async fn probe(&self, timeout: Duration) -> Result<ReplicatorStatus> {
        let mut c = self.client(timeout).await?;
        let s = c
            .status(StatusRequest {})
            .await
            .map_err(|e| self.rpc_error("status", e))?;
        Ok(s.into_inner())
    }

    /// Relays the assignment (in `term`) when the secondary does not already do what
    /// it says; returns the status after the order, None when nothing was needed.
    pub async fn relay(
        &self,
        term: u64,
        a: &Assignment,
        current: &ReplicatorStatus,
        timeout: Duration,
    ) -> Result<Option<ReplicatorStatus>> {
        let Some(order) = needed_order(term, a, current) else {
            return Ok(None);
        };
        let mut c = self.client(timeout).await?;
        let st = match order {
            Needed::Stream(o) => c.stream(o).await.map_err(|e| self.rpc_error("stream", e))?,
            Needed::Stop(o) => c.stop(o).await.map_err(|e| self.rpc_error("stop", e))?,
        };
        Ok(Some(st.into_inner()))
    }
}

/// The order the assignment calls for, given the secondary's status.
#[derive(Debug, Clone, PartialEq)]
pub enum Needed {
    Stream(StreamOrder),
    Stop(StopOrder),
}

pub fn needed_order(term: u64, a: &Assignment, cur: &ReplicatorStatus) -> Option<Needed> {
    let state = cur.state();
    let behind = cur.term < term;
    match a.secondary_mode() {
        SecondaryMode::Unspecified => None,
        SecondaryMode::SecondaryStream => {
            let same = state == ReplicatorState::Streaming && cur.upstream == a.secondary_upstream;
            (!same || behind).then(|| {
                Needed::Stream(StreamOrder {
                    term,
                    upstream_name: a.secondary_upstream.clone(),
                    upstream_host: a.primary_address.clone(),
                    upstream_port: a.primary_port,
                    start_lsn: a.secondary_start_lsn,
                })
            })
        }
        SecondaryMode::SecondaryHold => {
            let cut = matches!(state, ReplicatorState::Holding | ReplicatorState::Idle);
            (!cut || behind).then_some(Needed::Stop(StopOrder {
                term,
                discard: false,
            }))
        }
        SecondaryMode::SecondaryIdle => (state != ReplicatorState::Idle
            || cur.bytes_kept > 0
            || behind)
            .then_some(Needed::Stop(StopOrder {
                term,
                discard: true,
            })),
    }
}

/// The report's view of a status.
pub fn facts(s: &ReplicatorStatus) -> SecondaryFacts {
    SecondaryFacts {
        state: state_name(s.state()).to_owned(),
        term: s.term,
        upstream: s.upstream.clone(),
        connected: s.connected,
        timeline: s.timeline,
        start_lsn: s.start_lsn,
        flush_lsn: s.flush_lsn,
        bytes_kept: s.bytes_kept,
    }
}

fn state_name(s: ReplicatorState) -> &'static str {
    match s {
        ReplicatorState::Idle => "idle",
        ReplicatorState::Streaming => "streaming",
        ReplicatorState::Holding => "holding",
        ReplicatorState::StateUnspecified => "unknown",
    }
}

/// "streaming from dn1_h1, flush 0/3000148, 1.2 MB kept" for status.
pub fn describe(s: &ReplicatorStatus) -> String {
    let mut out = match s.state() {
        ReplicatorState::Streaming if s.connected => format!("streaming from {}", s.upstream),
        ReplicatorState::Streaming => format!("connecting to {}", s.upstream),
        other => state_name(other).to_owned(),
    };
    if s.state() != ReplicatorState::Idle || s.bytes_kept > 0 {
        out.push_str(&format!(
            ", flush {}, {:.1} MB kept",
            format_lsn(s.flush_lsn),
            s.bytes_kept as f64 / (1 << 20) as f64
        ));
    }
    if !s.last_error.is_empty() {
        out.push_str(&format!(", error: {}", s.last_error));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assign(mode: SecondaryMode, up: &str) -> Assignment {
        Assignment {
            instance: "dn1_h3".into(),
            run: true,
            secondary_mode: mode as i32,
            secondary_upstream: up.into(),
            primary_address: "127.0.0.1".into(),
            primary_port: 6501,
            secondary_start_lsn: 0x100,
            ..Assignment::default()
        }
    }

    fn status(state: ReplicatorState, term: u64, up: &str, kept: u64) -> ReplicatorStatus {
        ReplicatorStatus {
            state: state as i32,
            term,
            upstream: up.into(),
            bytes_kept: kept,
            ..ReplicatorStatus::default()
        }
    }

    #[test]
    fn orders_follow_the_assignment_only_when_needed() {
        let a = assign(SecondaryMode::SecondaryStream, "dn1_h1");
        let idle = status(ReplicatorState::Idle, 0, "", 0);
        let Some(Needed::Stream(o)) = needed_order(3, &a, &idle) else {
            panic!("stream expected")
        };
        assert_eq!((o.term, o.upstream_port, o.start_lsn), (3, 6501, 0x100));
        let streaming = status(ReplicatorState::Streaming, 3, "dn1_h1", 10);
        assert_eq!(needed_order(3, &a, &streaming), None);
        assert!(
            needed_order(4, &a, &streaming).is_some(),
            "a newer term is passed on"
        );
        let other = assign(SecondaryMode::SecondaryStream, "dn1_h2");
        assert!(needed_order(3, &other, &streaming).is_some());
        let hold = assign(SecondaryMode::SecondaryHold, "");
        assert_eq!(
            needed_order(3, &hold, &streaming),
            Some(Needed::Stop(StopOrder {
                term: 3,
                discard: false
            }))
        );
        // An idle one only learns the term (so that its report proves the fence).
        assert!(needed_order(3, &hold, &idle).is_some());
        assert_eq!(
            needed_order(3, &hold, &status(ReplicatorState::Idle, 3, "", 0)),
            None
        );
        let go_idle = assign(SecondaryMode::SecondaryIdle, "");
        assert_eq!(
            needed_order(3, &go_idle, &status(ReplicatorState::Holding, 3, "", 5)),
            Some(Needed::Stop(StopOrder {
                term: 3,
                discard: true
            }))
        );
        assert_eq!(needed_order(0, &go_idle, &idle), None);
        assert_eq!(
            needed_order(3, &assign(SecondaryMode::Unspecified, ""), &idle),
            None
        );
    }

    #[tokio::test]
    async fn missing_binary_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = crate::detached::config_without_binaries(dir.path());
        let mut s = SecondaryInstance::from_config(&cfg, "dn1_h3", Path::new("t.toml")).unwrap();
        let e = s.start().await.unwrap_err().to_string();
        assert!(e.contains("dn_replicator binary not found"), "{e}");
        assert!(s.pid().is_none());
        assert_eq!(s.url, "http://127.0.0.1:6503");
    }

    #[test]
    fn describes_what_it_does() {
        let mut s = status(ReplicatorState::Streaming, 3, "dn1_h1", 3 << 20);
        s.connected = true;
        s.flush_lsn = 0x3000148;
        assert_eq!(
            describe(&s),
            "streaming from dn1_h1, flush 0/3000148, 3.0 MB kept"
        );
        assert_eq!(describe(&status(ReplicatorState::Idle, 3, "", 0)), "idle");
    }
}
