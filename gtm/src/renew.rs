//! The GTM renews its primary lease itself (`gtm serve --require-lease`, see
//! [`crate::lease`]): every [`period`] it sends RenewGtmLease to every configured
//! CMServer (a standby CMServer refuses with "not primary", the primary answers how
//! long this GTM may hand out GXIDs), and the deadline runs from when THIS GTM sent the
//! request, on its own CLOCK_MONOTONIC, so neither a slow reply nor another host's
//! clock can stretch it. Its host's agent plays no part: restarting the agent does
//! not pause GXIDs (issue 9 §6).
//!
//! Every role asks: a standby the CMServer has just assigned primary gets its lease
//! before its PROMOTE lands. A grant that finds no lease, and a promotion, ask for a
//! renewal at once (`Node::want_lease`), at most every [`MIN_GAP`].
//!
//! Each request is its own task bounded by [`rpc_timeout`], so an unreachable or
//! hung CMServer (a partition) never delays the renewals sent to the other one.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use ha_common::config::ClusterConfig;
use ha_common::proto::cm::cm_server_client::CmServerClient;
use ha_common::proto::cm::RenewGtmLeaseRequest;
use tokio::sync::watch;
use tokio::time::Instant;
use tonic::transport::Channel;

use crate::node::Node;

/// Renewals asked for by grants (`Node::want_lease`) go out at most this often.
pub const MIN_GAP: Duration = Duration::from_millis(50);

/// How often every CMServer is asked: a sixth of the longest lease the CMServer grants
/// (gtm_failover_timeout − margin), at most half a heartbeat (the CMServer's view of
/// the GTM's health moves once per heartbeat), at least [`MIN_GAP`]. A grant is
/// usually a heartbeat or more shorter than the longest, so several renewals land
/// within each one.
pub fn period(cfg: &ClusterConfig) -> Duration {
    let longest = cfg
        .timing
        .gtm_failover_timeout()
        .saturating_sub(cfg.timing.gtm_lease_margin());
    (longest / 6)
        .min(cfg.timing.heartbeat_interval() / 2)
        .max(MIN_GAP)
}

/// How long one request may take: an answer later than half the longest lease is
/// worth little (the deadline runs from the send time).
pub fn rpc_timeout(cfg: &ClusterConfig) -> Duration {
    let longest = cfg
        .timing
        .gtm_failover_timeout()
        .saturating_sub(cfg.timing.gtm_lease_margin());
    (longest / 2).max(MIN_GAP)
}

/// Renews until `stop` turns true (or its sender goes).
pub async fn run(node: Arc<Node>, cfg: ClusterConfig, mut stop: watch::Receiver<bool>) {
    let timeout = rpc_timeout(&cfg);
    let mut clients: Vec<(String, CmServerClient<Channel>)> = Vec::new();
    for (s, ep) in cfg.cm_servers.iter().zip(cfg.cm_server_endpoints()) {
        match ha_common::tls::endpoint(&ep, ha_common::tls::CertRole::CmServer, timeout) {
            Ok(e) => clients.push((
                s.name.clone(),
                CmServerClient::new(e.timeout(timeout).connect_lazy()),
            )),
            Err(e) => tracing::error!(cm_server = %s.name, "no lease renewals from {ep}: {e}"),
        }
    }
    let period = period(&cfg);
    let last_said = Arc::new(Mutex::new(String::new()));
    let mut wanted = node.lease_wanted.subscribe();
    let mut last_round: Option<Instant> = None;
    loop {
        if *stop.borrow() {
            return;
        }
        let now = Instant::now();
        if let Some(last) = last_round {
            tokio::select! {
                r = stop.changed() => if r.is_err() { return } else { continue },
                _ = tokio::time::sleep_until(last + period) => {}
                r = wanted.changed() => {
                    if r.is_err() {
                        return;
                    }
                    tokio::time::sleep_until((last + MIN_GAP).max(now)).await;
                }
            }
        }
        last_round = Some(Instant::now());
        // Before any request leaves: every answer comes after this on our clock.
        let sent_at_ns = ha_common::clock::monotonic_ns();
        let req = RenewGtmLeaseRequest {
            instance: node.name().to_owned(),
            gtm_term: node.term(),
        };
        for (name, client) in &clients {
            tokio::spawn(renew_from(
                node.clone(),
                name.clone(),
                client.clone(),
                req.clone(),
                sent_at_ns,
                timeout,
                last_said.clone(),
            ));
        }
    }
}

/// One renewal from CMServer `from`.
async fn renew_from(
    node: Arc<Node>,
    from: String,
    mut client: CmServerClient<Channel>,
    req: RenewGtmLeaseRequest,
    sent_at_ns: u64,
    timeout: Duration,
    last_said: Arc<Mutex<String>>,
) {
    let said = match tokio::time::timeout(timeout, client.renew_gtm_lease(req)).await {
        Err(_) => return tracing::debug!(cm_server = %from, "lease renewal timed out"),
        // A standby CMServer: the primary answers the same request.
        Ok(Err(s)) if s.code() == tonic::Code::FailedPrecondition => return,
        Ok(Err(s)) => {
            return tracing::debug!(cm_server = %from, "lease renewal failed: {}", s.message())
        }
        Ok(Ok(r)) => {
            let r = r.into_inner();
            if r.valid_for_ms == 0 {
                format!("primary CMServer {from} grants no lease: {}", r.why)
            } else {
                match node.renew_lease(r.cm_term, r.valid_for_ms, sent_at_ns) {
                    Ok(()) => format!("lease held, renewed by primary CMServer {from}"),
                    Err(e) => format!("renewal from {from} refused: {e}"),
                }
            }
        }
    };
    // Log changes only (renewals run several times a second).
    let mut last = last_said.lock().unwrap_or_else(|p| p.into_inner());
    if *last != said {
        tracing::info!("{said}");
        *last = said;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewals_come_several_times_per_lease() {
        let cfg = ClusterConfig::parse(
            include_str!("../../configs/local.toml"),
            std::path::Path::new("local.toml"),
        )
        .expect("local.toml parses");
        // timeout 3000 ms, margin 300 ms: the longest lease is 2700 ms.
        assert_eq!(period(&cfg), Duration::from_millis(450));
        assert_eq!(rpc_timeout(&cfg), Duration::from_millis(1350));
    }
}
