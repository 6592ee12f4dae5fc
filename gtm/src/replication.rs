//! The GTM pair's sync: the link to the peer instance (primary → standby pushes, standby
//! → primary snapshot) and the background loop that keeps the pair together: a primary
//! re-attaches a lost standby, a new or returning standby copies the primary's state
//! until it succeeds.

use std::sync::Arc;
use std::time::Duration;

use ha_common::proto::gtm as pb;
use pb::gtm_client::GtmClient as RawClient;
use tonic::transport::Channel;

use crate::decisions::Decision;
use crate::node::{to_records, Node, Role};

/// How often the background loop looks at the pair.
const TICK: Duration = Duration::from_millis(200);

/// A lazily connected gRPC link to the other instance of the pair.
#[derive(Clone)]
pub struct PeerLink {
    pub name: String,
    pub endpoint: String,
    client: RawClient<Channel>,
}

/// A lazily connecting channel to `host:port`: creating it never blocks or fails on
/// an unreachable peer; calls fail fast instead (connect timeout).
pub fn lazy_channel(
    endpoint: &str,
    connect_timeout: Duration,
) -> Result<Channel, tonic::transport::Error> {
    Ok(
        ha_common::tls::endpoint(endpoint, ha_common::tls::CertRole::Gtm, connect_timeout)?
            .tcp_nodelay(true)
            .connect_lazy(),
    )
}

impl PeerLink {
    pub fn new(name: &str, endpoint: &str) -> Result<PeerLink, tonic::transport::Error> {
        Ok(PeerLink {
            name: name.to_owned(),
            endpoint: endpoint.to_owned(),
            client: RawClient::new(lazy_channel(endpoint, Duration::from_millis(500))?),
        })
    }

    pub async fn reserve_block(
        &self,
        term: u64,
        boundary: u64,
    ) -> Result<pb::SyncAck, tonic::Status> {
        let mut c = self.client.clone();
        Ok(c.reserve_block(pb::ReserveBlockRequest { term, boundary })
            .await?
            .into_inner())
    }

    pub async fn replicate(
        &self,
        term: u64,
        records: &[(u64, Decision)],
    ) -> Result<pb::SyncAck, tonic::Status> {
        let mut c = self.client.clone();
        let req = pb::ReplicateDecisionsRequest {
            term,
            decisions: to_records(records),
        };
        Ok(c.replicate_decisions(req).await?.into_inner())
    }

    pub async fn snapshot(
        &self,
        term: u64,
        standby: &str,
    ) -> Result<pb::GtmSnapshot, tonic::Status> {
        let mut c = self.client.clone();
        let req = pb::SnapshotRequest {
            term,
            standby: standby.to_owned(),
        };
        Ok(c.snapshot(req).await?.into_inner())
    }

    pub async fn status(&self) -> Result<pb::GtmStatus, tonic::Status> {
        let mut c = self.client.clone();
        Ok(c.status(pb::StatusRequest {}).await?.into_inner())
    }
}

/// Runs for the life of the server: every tick, a standby that is not ready copies the
/// primary's state; a primary whose standby is detached pushes its whole state to it.
pub async fn run(node: Arc<Node>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
    let Some(peer) = node.peer().cloned() else {
        return;
    };
    let timeout = node.settings.sync_timeout;
    let mut last_logged = String::new();
    loop {
        let outcome = match node.role() {
            Role::Standby if !node.is_ready() => {
                match tokio::time::timeout(timeout, peer.snapshot(node.term(), node.name())).await {
                    Ok(Ok(snap)) => node.apply_snapshot(snap).await.map_err(|e| e.to_string()),
                    Ok(Err(s)) => Err(format!("snapshot from {}: {}", peer.name, s.message())),
                    Err(_) => Err(format!("snapshot from {}: timed out", peer.name)),
                }
            }
            Role::Primary if !node.is_attached() => {
                node.push_full_state().await.map_err(|e| e.to_string())
            }
            _ => Ok(()),
        };
        if let Err(e) = outcome {
            if e != last_logged {
                tracing::warn!("pair sync: {e}");
                last_logged = e.clone();
            }
            if node.role() == Role::Standby {
                node.set_last_error(e);
            }
        } else {
            last_logged.clear();
        }
        tokio::select! {
            _ = tokio::time::sleep(TICK) => {}
            _ = shutdown.changed() => return,
        }
    }
}
