//! Two-phase commit: DDL on every DN primary and every CN of the DDL set, multi-group
//! DML commits, and the in-doubt resolver that finishes what a crash left prepared.
//!
//! The GTM's recorded decision is the commit point: nothing is committed anywhere
//! before `RecordDecision(commit)`, and once it is recorded every participant is
//! committed (by the coordinator, or later by a resolver).

use std::time::{Duration, Instant};

use gtm::client::ClientError;
use gtm::Decision;
use ha_common::proto::cn::coordinator_client::CoordinatorClient;
use ha_common::proto::cn::{FinishCatalogRequest, PrepareCatalogRequest};

use crate::catalog::Change;
use crate::dn::{DnConn, DnError};
use crate::node::{Node, Peer};

/// A prepared transaction of another CN (or one whose CN we cannot tell is alive) is
/// resolved only once it is this old.
pub const ORPHAN_AGE: Duration = Duration::from_secs(10);

/// `mpp_<gxid>_<cn>`: the gxid finds the decision, the CN tells whose it is.
pub fn gid_for(gxid: u64, cn: &str) -> String {
    format!("mpp_{gxid}_{cn}")
}

pub fn parse_gid(gid: &str) -> Option<(u64, &str)> {
    let rest = gid.strip_prefix("mpp_")?;
    let (gxid, cn) = rest.split_once('_')?;
    Some((gxid.parse().ok()?, cn))
}

fn gtm_error(e: ClientError) -> DnError {
    DnError::new("08006", format!("GTM: {e}"))
}

fn group_name(node: &Node, g: usize) -> String {
    node.catalog_read()
        .groups
        .get(g)
        .cloned()
        .unwrap_or_default()
}

async fn rpc_client(peer: &Peer) -> Result<CoordinatorClient<tonic::transport::Channel>, String> {
    let ep = ha_common::tls::endpoint(
        &peer.rpc,
        ha_common::tls::CertRole::Cn,
        Duration::from_secs(2),
    )
    .map_err(|e| e.to_string())?
    .timeout(Duration::from_secs(5));
    let ch = ep
        .connect()
        .await
        .map_err(|e| format!("{}: {e}", peer.name))?;
    Ok(CoordinatorClient::new(ch))
}

async fn prepare_peer(
    peer: &Peer,
    gid: &str,
    base: u64,
    change: &Change,
    term: u64,
) -> Result<(), String> {
    let mut c = rpc_client(peer).await?;
    let r = c
        .prepare_catalog(PrepareCatalogRequest {
            gid: gid.to_owned(),
            base_version: base,
            change: change.encode(),
            cm_term: term,
        })
        .await
        .map_err(|e| format!("{}: {}", peer.name, e.message()))?
        .into_inner();
    if r.ok {
        Ok(())
    } else {
        Err(format!("{}: {}", peer.name, r.message))
    }
}

pub async fn finish_peer(peer: &Peer, gid: &str, commit: bool) -> Result<(), String> {
    let mut c = rpc_client(peer).await?;
    let r = c
        .finish_catalog(FinishCatalogRequest {
            gid: gid.to_owned(),
            commit,
        })
        .await
        .map_err(|e| format!("{}: {}", peer.name, e.message()))?
        .into_inner();
    if r.ok {
        Ok(())
    } else {
        Err(format!("{}: {}", peer.name, r.message))
    }
}

struct InFlight<'a> {
    node: &'a Node,
    gid: String,
}

impl<'a> InFlight<'a> {
    fn new(node: &'a Node, gid: &str) -> InFlight<'a> {
        node.in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(gid.to_owned());
        InFlight {
            node,
            gid: gid.to_owned(),
        }
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.node
            .in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.gid);
    }
}

/// Phase one on one DN: the DDL inside BEGIN ... PREPARE TRANSACTION.
async fn prepare_ddl_on(
    node: &Node,
    g: usize,
    sql: &str,
    gid: &str,
    fault: Option<&str>,
) -> Result<DnConn, (Option<DnConn>, DnError)> {
    let name = group_name(node, g);
    let target = node.target(g).map_err(|e| (None, e))?;
    let mut c = node.pool.get(g, &target).await.map_err(|e| (None, e))?;
    if let Err(e) = c.run(&name, "BEGIN").await {
        return Err((Some(c), e));
    }
    if let Err(e) = c.run(&name, sql).await {
        let _ = c.run(&name, "ROLLBACK").await;
        return Err((Some(c), e));
    }
    if fault == Some("pause_before_prepare") {
        // Test-only: a window in which a test kills a DN primary during phase one.
        tokio::time::sleep(Duration::from_secs(4)).await;
    }
    if let Err(e) = c.run(&name, &format!("PREPARE TRANSACTION '{gid}'")).await {
        let _ = c.run(&name, "ROLLBACK").await;
        return Err((Some(c), e));
    }
    Ok(c)
}

/// A DDL statement by two-phase commit on every DN primary and every CN of the DDL set.
pub async fn run_ddl(node: &Node, sql: &str, change: Change) -> Result<(), DnError> {
    let out = run_ddl_2pc(node, sql, change).await;
    if out.is_ok() {
        node.counters.ddl.inc();
    }
    out
}

async fn run_ddl_2pc(node: &Node, sql: &str, change: Change) -> Result<(), DnError> {
    let _one_at_a_time = node.ddl_lock.lock().await;
    let mut steps = Steps::start();
    let fault = node.take_fault();
    let gxid = node.gtm.next_gxid(1).await.map_err(gtm_error)?.start;
    steps.done("gxid");
    let gid = gid_for(gxid, &node.name);
    let _flight = InFlight::new(node, &gid);
    let base = node.catalog_read().version;
    let groups = crate::router::all_groups(&node.catalog_read());
    // Phase one everywhere: our own catalog first, then (having told the CMServer that
    // a change is prepared, which freezes the DDL set) the DNs and the other CNs.
    let local = node
        .prepare_catalog(&gid, base, change.clone())
        .map_err(|e| DnError::new("XX000", format!("catalog: {e}")));
    steps.done("own catalog prepared");
    crate::topology::sync_now(node).await;
    steps.done("CMServer told");
    let peers = node.ddl_peers();
    let term = node.cm_term.load(std::sync::atomic::Ordering::SeqCst);
    // The DNs and the other CNs at once.
    let on_dns = futures::future::join_all(
        groups
            .iter()
            .map(|g| prepare_ddl_on(node, *g, sql, &gid, fault.as_deref())),
    );
    let on_peers = futures::future::join_all(
        peers
            .iter()
            .map(|p| prepare_peer(p, &gid, base, &change, term)),
    );
    let (dn_results, peer_results) = futures::join!(on_dns, on_peers);
    steps.done("DNs and peers prepared");

    let mut prepared = Vec::new();
    let mut first_error: Option<DnError> = local.err();
    for r in dn_results {
        match r {
            Ok(c) => prepared.push(c),
            Err((c, e)) => {
                if let Some(c) = c {
                    if !c.broken {
                        node.pool.put(c).await;
                    }
                }
                // The DN's own error wins over ours.
                if first_error
                    .as_ref()
                    .is_none_or(|f| f.code.starts_with("XX"))
                {
                    first_error = Some(e);
                }
            }
        }
    }
    for r in &peer_results {
        if let Err(e) = r {
            if first_error.is_none() {
                first_error = Some(DnError::new(
                    "57P01",
                    format!("DDL not done: CN {e} could not prepare the catalog change"),
                ));
            }
        }
    }
    if let Some(err) = first_error {
        abort_ddl(node, gxid, &gid, prepared, &peers).await;
        return Err(err);
    }

    // A CN admitted to the DDL set after we read it would miss this change: re-read the
    // set just before the decision and abort if a member joined that we did not prepare on.
    crate::topology::sync_now(node).await;
    steps.done("DDL set re-read");
    let joined: Vec<String> = node
        .ddl_peers()
        .into_iter()
        .filter(|p| !peers.iter().any(|q| q.name == p.name))
        .map(|p| p.name)
        .collect();
    if !joined.is_empty() {
        abort_ddl(node, gxid, &gid, prepared, &peers).await;
        return Err(DnError::new(
            "40001",
            format!(
                "DDL not done: CN {} joined the DDL set meanwhile; retry",
                joined.join(", ")
            ),
        ));
    }
    if let Err(e) = node.gtm.record_decision(gxid, Decision::Commit).await {
        // The decision may or may not be recorded: the resolver finishes it either way.
        return Err(DnError::new(
            "08007",
            format!("the outcome of this DDL is not known yet ({e}); the resolver will finish it"),
        ));
    }
    steps.done("decision recorded");
    if fault.as_deref() == Some("exit_after_decision") {
        // stderr directly: the log writer may not flush before exit.
        eprintln!("cn: test fault point: exiting after the decision of {gid}, before phase two");
        std::process::exit(3);
    }

    // Phase two, on the DNs and the other CNs at once.
    let ((), finished) = futures::join!(
        finish_prepared_on(node, prepared, &gid, Decision::Commit),
        futures::future::join_all(peers.iter().map(|p| finish_peer(p, &gid, true)))
    );
    for e in finished.into_iter().filter_map(Result::err) {
        tracing::warn!(%gid, "finishing the catalog change on {e} failed; its resolver will");
    }
    steps.done("DNs and peers committed");
    node.finish_catalog(&gid, true)
        .map_err(|e| DnError::new("XX000", format!("catalog: {e}")))?;
    steps.done("own catalog committed");
    tracing::info!(%gid, steps = %steps, "DDL committed");
    Ok(())
}

/// How long each step of a two-phase commit took, for its log line (DDL latency is
/// the sum of rounds to the GTM, the CMServer, the DNs and the other CNs).
struct Steps {
    last: Instant,
    took: Vec<(&'static str, Duration)>,
}

impl Steps {
    fn start() -> Steps {
        Steps {
            last: Instant::now(),
            took: Vec::new(),
        }
    }

    fn done(&mut self, step: &'static str) {
        let now = Instant::now();
        self.took.push((step, now - self.last));
        self.last = now;
    }
}

impl std::fmt::Display for Steps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let total: Duration = self.took.iter().map(|(_, d)| *d).sum();
        write!(f, "{:.1} ms:", total.as_secs_f64() * 1e3)?;
        for (step, d) in &self.took {
            write!(f, " {step} {:.1}", d.as_secs_f64() * 1e3)?;
        }
        Ok(())
    }
}

/// Commits a transaction that wrote on several groups: PREPARE on each, the decision in
/// the GTM, COMMIT PREPARED on each.
pub async fn commit_prepared_txn(node: &Node, conns: Vec<DnConn>) -> Result<(), DnError> {
    let out = commit_2pc(node, conns).await;
    if out.is_ok() {
        node.counters.two_phase_commits.inc();
    }
    out
}

async fn commit_2pc(node: &Node, conns: Vec<DnConn>) -> Result<(), DnError> {
    let gxid = match node.gtm.next_gxid(1).await {
        Ok(r) => r.start,
        Err(e) => {
            for mut c in conns {
                let name = group_name(node, c.group);
                let _ = c.run(&name, "ROLLBACK").await;
            }
            return Err(gtm_error(e));
        }
    };
    let gid = gid_for(gxid, &node.name);
    let _flight = InFlight::new(node, &gid);
    let results = futures::future::join_all(conns.into_iter().map(|mut c| {
        let gid = gid.clone();
        async move {
            let name = group_name(node, c.group);
            let r = c.run(&name, &format!("PREPARE TRANSACTION '{gid}'")).await;
            (c, r)
        }
    }))
    .await;
    let mut first_error = None;
    let mut prepared = Vec::new();
    for (mut c, r) in results {
        match r {
            Ok(_) => prepared.push(c),
            Err(e) => {
                let name = group_name(node, c.group);
                let _ = c.run(&name, "ROLLBACK").await;
                first_error.get_or_insert(e);
            }
        }
    }
    if let Some(e) = first_error {
        let _ = node.gtm.record_decision(gxid, Decision::Abort).await;
        finish_prepared_on(node, prepared, &gid, Decision::Abort).await;
        // No Commit decision is recorded, and only this CN would record it: the
        // transaction surely did not commit anywhere (the resolver rolls back what stays
        // prepared), so a DN lost in phase one is safe to retry.
        return Err(e.not_committed(true));
    }
    if let Err(e) = node.gtm.record_decision(gxid, Decision::Commit).await {
        return Err(DnError::new(
            "08007",
            format!("the outcome of this transaction is not known yet ({e}); the resolver will finish it"),
        ));
    }
    finish_prepared_on(node, prepared, &gid, Decision::Commit).await;
    Ok(())
}

/// A DDL that will not commit: Abort is recorded first, so that no resolver can commit
/// any part, then it is rolled back on the DNs, the other CNs and our own catalog
/// (what fails here is left to the resolvers).
async fn abort_ddl(node: &Node, gxid: u64, gid: &str, prepared: Vec<DnConn>, peers: &[Peer]) {
    let _ = node.gtm.record_decision(gxid, Decision::Abort).await;
    finish_prepared_on(node, prepared, gid, Decision::Abort).await;
    for p in peers {
        let _ = finish_peer(p, gid, false).await;
    }
    let _ = node.finish_catalog(gid, false);
}

/// What finishes prepared transaction `gid` on a DN as `decision` says.
fn finish_prepared_sql(gid: &str, decision: Decision) -> String {
    match decision {
        Decision::Commit => format!("COMMIT PREPARED '{gid}'"),
        Decision::Abort => format!("ROLLBACK PREPARED '{gid}'"),
    }
}

/// Phase two on every prepared group at once, after `decision` is recorded. At once
/// because a row lock is held until its own group's COMMIT PREPARED; in turn, the last
/// group's would also wait for every other group's. A group that fails is left to the
/// resolver; its connection is not pooled.
async fn finish_prepared_on(node: &Node, prepared: Vec<DnConn>, gid: &str, decision: Decision) {
    let sql = finish_prepared_sql(gid, decision);
    let sql = &sql;
    futures::future::join_all(prepared.into_iter().map(|mut c| async move {
        let name = group_name(node, c.group);
        match c.run(&name, sql).await {
            Ok(_) => node.pool.put(c).await,
            Err(e) => {
                tracing::warn!(%gid, group = %name, "{sql} failed ({e}); the resolver will retry")
            }
        }
    }))
    .await;
}

/// The decision for `gxid`: Abort is recorded unless Commit already was (so that the
/// coordinator, if it is still alive, can no longer commit it).
async fn settle(node: &Node, gxid: u64) -> Option<Decision> {
    match node.gtm.record_decision(gxid, Decision::Abort).await {
        Ok(()) => Some(Decision::Abort),
        Err(e) if e.code() == Some(tonic::Code::AlreadyExists) => {
            node.gtm.get_decision(gxid).await.ok().flatten()
        }
        Err(e) => {
            tracing::warn!(gxid, "resolver: GTM unavailable ({e}); will retry");
            None
        }
    }
}

/// One pass of the in-doubt resolver over every DN primary and this CN's catalog.
/// Returns how many prepared transactions it finished.
pub async fn resolve_once(node: &Node) -> usize {
    // In-doubt: prepared on a DN and not being committed by this process right now.
    let (mut in_doubt, mut oldest) = (0i64, 0i64);
    let mut done = 0;
    let groups = crate::router::all_groups(&node.catalog_read());
    for g in groups {
        let name = group_name(node, g);
        let Ok(target) = node.target(g) else { continue };
        let Ok(mut c) = node.pool.get(g, &target).await else {
            continue;
        };
        let rows = match c
            .run(
                &name,
                "SELECT gid, floor(extract(epoch from now() - prepared))::bigint FROM pg_prepared_xacts \
                 WHERE gid LIKE 'mpp\\_%' AND database = current_database()",
            )
            .await
        {
            Ok(a) => a.rows,
            Err(_) => continue,
        };
        for row in rows {
            let (Some(gid), age) = (
                row.first().cloned().flatten(),
                row.get(1).cloned().flatten(),
            ) else {
                continue;
            };
            let Some((gxid, cn)) = parse_gid(&gid) else {
                continue;
            };
            if node
                .in_flight
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .contains(&gid)
            {
                continue;
            }
            let age: u64 = age.and_then(|a| a.parse().ok()).unwrap_or(0);
            in_doubt += 1;
            oldest = oldest.max(age as i64);
            if cn != node.name && age < ORPHAN_AGE.as_secs() {
                continue;
            }
            let Some(decision) = settle(node, gxid).await else {
                continue;
            };
            match c.run(&name, &finish_prepared_sql(&gid, decision)).await {
                Ok(_) => {
                    tracing::info!(%gid, group = %name, ?decision, "resolver finished an in-doubt transaction");
                    done += 1;
                }
                Err(e) => tracing::warn!(%gid, group = %name, "resolver: {e}"),
            }
        }
        node.pool.put(c).await;
    }
    node.counters.in_doubt.set(in_doubt);
    node.counters.in_doubt_oldest_seconds.set(oldest);
    node.counters.resolved.inc_by(done as u64);
    // This CN's own prepared catalog changes.
    let prepared: Vec<String> = node.catalog_read().prepared.keys().cloned().collect();
    for gid in prepared {
        if node
            .in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&gid)
        {
            continue;
        }
        let Some((gxid, cn)) = parse_gid(&gid) else {
            continue;
        };
        let decision = if cn == node.name {
            settle(node, gxid).await
        } else {
            match node.gtm.get_decision(gxid).await {
                Ok(Some(d)) => Some(d),
                Ok(None) => {
                    let first = *node
                        .seen_prepared
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .entry(gid.clone())
                        .or_insert_with(Instant::now);
                    if first.elapsed() >= ORPHAN_AGE {
                        settle(node, gxid).await
                    } else {
                        None
                    }
                }
                Err(_) => None,
            }
        };
        if let Some(d) = decision {
            if node.finish_catalog(&gid, d == Decision::Commit).is_ok() {
                tracing::info!(%gid, ?d, "resolver finished a prepared catalog change");
                node.seen_prepared
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&gid);
                done += 1;
            }
        }
    }
    done
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gid_round_trip() {
        let g = gid_for(42, "cn1");
        assert_eq!(g, "mpp_42_cn1");
        assert_eq!(parse_gid(&g), Some((42, "cn1")));
        assert_eq!(parse_gid("mpp_x_cn1"), None);
        assert_eq!(parse_gid("other"), None);
    }
}
