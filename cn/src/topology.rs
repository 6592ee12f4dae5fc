//! Topology and admission: every heartbeat the CN calls `CmServer.CnSync` on the
//! config's CMServers, acts on the primary's reply (highest term), routes to the DN
//! primaries it names, keeps the DDL set, and copies the catalog before it is admitted.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use ha_common::proto::cm::cm_server_client::CmServerClient;
use ha_common::proto::cm::{CnPhase, CnSyncReply, CnSyncRequest};
use ha_common::proto::cn::coordinator_client::CoordinatorClient;
use ha_common::proto::cn::GetCatalogRequest;

use crate::catalog;
use crate::dn::Target;
use crate::node::{Node, Peer};

/// What the CMServers said this round.
enum SyncResult {
    Reply(CnSyncReply),
    /// No CMServer implements CnSync (an older cluster manager): run on the config.
    Unimplemented,
    Unreachable,
}

async fn cn_sync(node: &Node, phase: CnPhase) -> SyncResult {
    let mut best: Option<CnSyncReply> = None;
    let mut unimplemented = 0;
    for cms in &node.cfg.cm_servers {
        let url = format!("http://{}", node.cfg.endpoint(cms));
        let Ok(ep) = ha_common::tls::endpoint(
            &url,
            ha_common::tls::CertRole::CmServer,
            Duration::from_millis(500),
        ) else {
            continue;
        };
        let ep = ep.timeout(node.cfg.timing.probe_timeout());
        let Ok(ch) = ep.connect().await else { continue };
        let req = CnSyncRequest {
            cn: node.name.clone(),
            phase: phase as i32,
            catalog_version: node.catalog_read().version,
            term: node.cm_term.load(Ordering::SeqCst),
            catalog_prepared: !node.catalog_read().prepared.is_empty(),
        };
        match CmServerClient::new(ch).cn_sync(req).await {
            Ok(r) => {
                let r = r.into_inner();
                if r.primary && best.as_ref().is_none_or(|b| r.term >= b.term) {
                    best = Some(r);
                }
            }
            Err(s) if s.code() == tonic::Code::Unimplemented => unimplemented += 1,
            Err(_) => {}
        }
    }
    match best {
        Some(r) => SyncResult::Reply(r),
        None if unimplemented > 0 => SyncResult::Unimplemented,
        None => SyncResult::Unreachable,
    }
}

/// Copies the catalog from the peer with the highest version, if it is newer.
pub async fn copy_catalog_from(node: &Node, peers: &[Peer]) -> Result<bool, String> {
    let mine = node.catalog_read().version;
    let mut best: Option<catalog::Catalog> = None;
    for p in peers {
        let Ok(ep) = ha_common::tls::endpoint(
            &p.rpc,
            ha_common::tls::CertRole::Cn,
            Duration::from_millis(500),
        ) else {
            continue;
        };
        let ep = ep.timeout(Duration::from_secs(5));
        let Ok(ch) = ep.connect().await else { continue };
        let Ok(r) = CoordinatorClient::new(ch)
            .get_catalog(GetCatalogRequest {})
            .await
        else {
            continue;
        };
        let r = r.into_inner();
        let Ok(c) = catalog::decode(&r.catalog) else {
            continue;
        };
        if c.version > mine && best.as_ref().is_none_or(|b| c.version > b.version) {
            best = Some(c);
        }
    }
    let Some(mut newest) = best else {
        return Ok(false);
    };
    // Our own unfinished changes stay for the resolver.
    newest.prepared = node.catalog_read().prepared.clone();
    let v = newest.version;
    node.replace_catalog(newest).map_err(|e| e.to_string())?;
    tracing::info!(version = v, "copied the catalog from a peer CN");
    Ok(true)
}

/// A cluster manager without CnSync: the DN primaries from its status (highest term).
async fn follow_status(node: &Node) {
    let mut best: Option<ha_common::proto::cm::ClusterStatus> = None;
    for cms in &node.cfg.cm_servers {
        let url = format!("http://{}", node.cfg.endpoint(cms));
        let Ok(ep) = ha_common::tls::endpoint(
            &url,
            ha_common::tls::CertRole::CmServer,
            Duration::from_millis(500),
        ) else {
            continue;
        };
        let ep = ep.timeout(node.cfg.timing.probe_timeout());
        let Ok(ch) = ep.connect().await else { continue };
        let req = ha_common::proto::cm::ClusterStatusRequest::default();
        if let Ok(r) = CmServerClient::new(ch).get_cluster_status(req).await {
            let r = r.into_inner();
            if best.as_ref().is_none_or(|b| r.term > b.term) {
                best = Some(r);
            }
        }
    }
    let Some(status) = best else { return };
    let primaries: Vec<Target> = status
        .dn_groups
        .iter()
        .filter_map(|g| {
            let p = g.members.iter().find(|m| m.role == "primary")?;
            let host = node.cfg.host(&p.host)?;
            Some(Target {
                group: g.name.clone(),
                host: host.address.clone(),
                port: p.port as u16,
                // A dead primary fails the connection; a merely slow report must not.
                available: true,
            })
        })
        .collect();
    node.set_primaries(&primaries);
}

fn apply(node: &Node, r: &CnSyncReply) {
    node.cm_term.fetch_max(r.term, Ordering::SeqCst);
    let primaries: Vec<Target> = r
        .dn_primaries
        .iter()
        .map(|p| Target {
            group: p.group.clone(),
            host: p.address.clone(),
            port: p.port as u16,
            available: p.available,
        })
        .collect();
    node.set_primaries(&primaries);
    let peers = r
        .ddl_set
        .iter()
        .filter(|p| p.name != node.name)
        .map(|p| {
            // A CMServer that does not know rpc_port yet sends 0: use the config's.
            let rpc_port = match p.rpc_port {
                0 => node
                    .cfg
                    .cns
                    .iter()
                    .find(|c| c.name == p.name)
                    .map(|c| c.rpc_port() as u32)
                    .unwrap_or(0),
                n => n,
            };
            Peer {
                name: p.name.clone(),
                rpc: format!("http://{}:{}", p.address, rpc_port),
                catalog_version: p.catalog_version,
            }
        })
        .collect();
    node.set_peers(peers);
}

/// One CnSync round now (a DDL coordinator calls it after preparing its own catalog
/// change: the CMServer then admits nobody until the change is finished, so the DDL
/// set in this reply is the one the DDL must prepare on).
pub async fn sync_now(node: &Node) {
    if let SyncResult::Reply(r) = cn_sync(node, CnPhase::CnReady).await {
        apply(node, &r);
    }
}

/// Start-up: catch up with the catalog, then open for clients; afterwards keep syncing.
pub async fn run(node: Arc<Node>) {
    let heartbeat = node.cfg.timing.heartbeat_interval();
    let mut phase = CnPhase::CnStarting;
    loop {
        match cn_sync(&node, phase).await {
            SyncResult::Reply(r) => {
                apply(&node, &r);
                if r.admitted {
                    phase = CnPhase::CnReady;
                    node.set_accepting(true);
                } else {
                    node.set_accepting(false);
                    let peers = node.ddl_peers();
                    let behind = peers
                        .iter()
                        .any(|p| p.catalog_version > node.catalog_read().version);
                    if behind {
                        phase = CnPhase::CnCopyingCatalog;
                        if let Err(e) = copy_catalog_from(&node, &peers).await {
                            tracing::warn!("catalog copy failed: {e}");
                        }
                    }
                    if !peers
                        .iter()
                        .any(|p| p.catalog_version > node.catalog_read().version)
                    {
                        phase = CnPhase::CnReady;
                    }
                }
            }
            SyncResult::Unimplemented => {
                follow_status(&node).await;
                if !node.is_accepting() {
                    let _ = copy_catalog_from(&node, &node.config_peers()).await;
                    node.set_accepting(true);
                    phase = CnPhase::CnReady;
                }
            }
            SyncResult::Unreachable if !node.is_accepting() => {
                // No CMServer to admit us: catch up from the config's peers and serve.
                let _ = copy_catalog_from(&node, &node.config_peers()).await;
                node.set_accepting(true);
                phase = CnPhase::CnReady;
            }
            _ => {}
        }
        tokio::time::sleep(heartbeat).await;
    }
}
