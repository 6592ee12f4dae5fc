//! Client workloads of the cluster tests: a writer that commits unique ids through
//! whichever DN member accepts writes and records every acknowledged one, single
//! probes (does this member acknowledge a commit? does this GTM hand out a GXID?),
//! and the checks on what they recorded. Clients reach the members either from the
//! test's own namespace (loopback clusters) or from inside a host's namespace.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::netns::{Namespace, Network};
use crate::{connect_at, wait_for};

/// Where a client runs: the test's own namespace, or inside one host's.
#[derive(Debug, Clone, Default)]
pub struct Reach {
    namespace: Option<PathBuf>,
}

impl Reach {
    /// The test's own namespace (loopback clusters).
    pub fn here() -> Reach {
        Reach::default()
    }

    /// Inside `host`'s namespace of a netns cluster; `None`: the test's own.
    pub fn host(net: &Network, host: Option<&str>) -> Reach {
        Reach {
            namespace: host.map(|h| net.namespace_path(h)),
        }
    }

    /// Starts `make()`'s future on a thread of its own (a single-threaded runtime,
    /// inside the namespace if any: every socket it opens lives there).
    pub fn spawn<T, F, Fut>(&self, make: F) -> Result<std::thread::JoinHandle<Result<T>>>
    where
        T: Send + 'static,
        F: FnOnce() -> Fut + Send + 'static,
        Fut: std::future::Future<Output = Result<T>>,
    {
        let ns = self.namespace.as_deref().map(Namespace::open).transpose()?;
        Ok(std::thread::spawn(move || {
            if let Some(ns) = &ns {
                ns.enter().context("enter the host's namespace")?;
            }
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(make())
        }))
    }

    /// Runs `make()`'s future there and waits for its result without blocking the
    /// caller's runtime.
    pub async fn run<T, F, Fut>(&self, make: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce() -> Fut + Send + 'static,
        Fut: std::future::Future<Output = Result<T>>,
    {
        let handle = self.spawn(make)?;
        tokio::task::spawn_blocking(move || handle.join())
            .await
            .context("join the client thread")?
            .map_err(|_| anyhow::anyhow!("the client thread panicked"))?
    }
}

/// A DN member (or GTM) as a client sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub name: String,
    pub address: String,
    pub port: u16,
}

impl Member {
    pub fn of(c: &crate::LocalCluster, name: &str) -> Member {
        Member {
            name: name.to_owned(),
            address: c.address_of(name),
            port: c.port(name),
        }
    }

    /// A member on loopback known only by its port (named after it).
    pub fn local(port: u16) -> Member {
        Member {
            name: port.to_string(),
            address: "127.0.0.1".into(),
            port,
        }
    }
}

/// One acknowledged commit: id, the member that acknowledged it (and its port), when.
#[derive(Debug, Clone)]
pub struct Ack {
    pub id: i64,
    pub member: String,
    pub port: u16,
    pub at: Instant,
}

/// The first of `members` that accepts writes (not in recovery), connected.
pub async fn writable(members: &[Member]) -> Option<(Member, tokio_postgres::Client)> {
    for m in members {
        let Ok(c) = connect_at(&m.address, m.port, Duration::from_millis(800)).await else {
            continue;
        };
        let q = tokio::time::timeout(
            Duration::from_millis(800),
            c.query_one("SELECT pg_is_in_recovery()", &[]),
        )
        .await;
        if let Ok(Ok(row)) = q {
            if !row.get::<_, bool>(0) {
                return Some((m.clone(), c));
            }
        }
    }
    None
}

/// Inserts ids `first`, `first + 1`, … one row per transaction into `t` through
/// whichever of its members accepts writes, reconnecting as needed; records an id
/// only when its commit was acknowledged (an error or no answer within
/// `commit_timeout`: unknown outcome, not recorded, connection dropped, and the member
/// moves to the end of the list). Dropped
/// without [`Writer::stop`], it stops on its own (not waited for).
pub struct Writer {
    acks: Arc<Mutex<Vec<Ack>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<Result<()>>>,
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

impl Writer {
    pub fn start(
        reach: &Reach,
        members: Vec<Member>,
        first: i64,
        commit_timeout: Duration,
    ) -> Result<Writer> {
        let acks = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (a, s) = (acks.clone(), stop.clone());
        let thread = reach.spawn(move || async move {
            let mut members = members;
            let mut next = first;
            let mut conn: Option<(Member, tokio_postgres::Client)> = None;
            // Bounded: the tests stop it long before.
            for _ in 0..10_000_000 {
                if s.load(Ordering::Relaxed) {
                    break;
                }
                let Some((member, client)) = conn.take() else {
                    conn = writable(&members).await;
                    if conn.is_none() {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    continue;
                };
                let id = next;
                next += 1;
                let r = tokio::time::timeout(
                    commit_timeout,
                    client.execute("INSERT INTO t (id) VALUES ($1)", &[&id]),
                )
                .await;
                if let Ok(Ok(1)) = r {
                    a.lock().unwrap().push(Ack {
                        id,
                        member: member.name.clone(),
                        port: member.port,
                        at: Instant::now(),
                    });
                    conn = Some((member, client));
                } else if let Some(i) = members.iter().position(|m| m.name == member.name) {
                    // Like a client with a multi-host list: after a failed commit try
                    // the others first (a deposed primary cut off from its partners
                    // still looks writable, but its commits hang).
                    let m = members.remove(i);
                    members.push(m);
                }
            }
            Ok(())
        })?;
        Ok(Writer {
            acks,
            stop,
            thread: Some(thread),
        })
    }

    pub fn count(&self) -> usize {
        self.acks.lock().unwrap().len()
    }

    pub fn acks(&self) -> Vec<Ack> {
        self.acks.lock().unwrap().clone()
    }

    /// The first ack after `t`.
    pub fn first_after(&self, t: Instant) -> Option<Ack> {
        self.acks.lock().unwrap().iter().find(|a| a.at > t).cloned()
    }

    /// Waits until at least `n` more commits than now were acknowledged.
    pub async fn wait_more(&self, n: usize, timeout: Duration) -> Result<()> {
        let target = self.count() + n;
        wait_for(&format!("{n} more commits"), timeout, || async {
            Ok((self.count() >= target).then_some(()))
        })
        .await
    }

    /// Stops it (its current commit may take up to the commit timeout); blocking.
    pub fn stop(mut self) -> Vec<Ack> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.acks.lock().unwrap().clone()
    }

    /// [`Writer::stop`] from async code, without blocking the runtime.
    pub async fn stop_async(self) -> Vec<Ack> {
        let acks = self.acks.clone();
        let _ = tokio::task::spawn_blocking(move || self.stop()).await;
        let out = acks.lock().unwrap().clone();
        out
    }
}

/// Every id in `t` on `member` (reached from `reach`), with how often it is there.
pub async fn ids_in_table(
    reach: &Reach,
    member: &Member,
) -> Result<std::collections::HashMap<i64, u64>> {
    let m = member.clone();
    reach
        .run(move || async move {
            let c = connect_at(&m.address, m.port, Duration::from_secs(5)).await?;
            let rows = c
                .query("SELECT id, count(*) FROM t GROUP BY id", &[])
                .await?;
            Ok(rows
                .iter()
                .map(|r| (r.get::<_, i64>(0), r.get::<_, i64>(1) as u64))
                .collect())
        })
        .await
}

/// Invariant 1: every acknowledged id is in `t` on `member` exactly once. Returns
/// the number of distinct ids there.
pub async fn assert_all_present(reach: &Reach, member: &Member, acks: &[Ack]) -> Result<usize> {
    let present = ids_in_table(reach, member).await?;
    let missing: Vec<(i64, String)> = acks
        .iter()
        .filter(|a| !present.contains_key(&a.id))
        .map(|a| (a.id, a.member.clone()))
        .collect();
    if !missing.is_empty() {
        bail!(
            "{} acknowledged commits lost on {}: {:?}",
            missing.len(),
            member.name,
            &missing[..missing.len().min(20)]
        );
    }
    let twice: Vec<i64> = acks
        .iter()
        .filter(|a| present.get(&a.id).is_some_and(|n| *n > 1))
        .map(|a| a.id)
        .collect();
    if !twice.is_empty() {
        bail!(
            "{} acknowledged ids more than once on {}: {:?}",
            twice.len(),
            member.name,
            &twice[..twice.len().min(20)]
        );
    }
    Ok(present.len())
}

/// Creates table `t` (`id bigint NOT NULL`, no key: a duplicated row must show) on
/// `member`, reached from `reach`.
pub async fn create_table(reach: &Reach, member: &Member) -> Result<()> {
    let m = member.clone();
    reach
        .run(move || async move {
            let c = connect_at(&m.address, m.port, Duration::from_secs(5)).await?;
            c.batch_execute("CREATE TABLE t (id bigint NOT NULL)")
                .await?;
            Ok(())
        })
        .await
}

/// Whether `m` is out of recovery and acknowledges a commit of row `id` into `t`
/// within `timeout` ("writable" in the sense of invariant 3: a primary that can ACK a
/// commit; a primary whose synchronous standby is gone cannot). On `true`, also the
/// moments just before the INSERT was sent and when its ACK arrived.
pub async fn probe_commit(m: &Member, id: i64, timeout: Duration) -> Option<(Instant, Instant)> {
    let c = connect_at(&m.address, m.port, timeout).await.ok()?;
    let r = tokio::time::timeout(timeout, async {
        let row = c.query_one("SELECT pg_is_in_recovery()", &[]).await?;
        if row.get::<_, bool>(0) {
            return Ok::<_, tokio_postgres::Error>(None);
        }
        let sent = Instant::now();
        let n = c.execute("INSERT INTO t (id) VALUES ($1)", &[&id]).await?;
        Ok((n == 1).then(|| (sent, Instant::now())))
    })
    .await;
    match r {
        Ok(Ok(x)) => x,
        _ => None,
    }
}

/// Asks the GTM at `address:port` for one GXID (bounded by 1 s); `None` if it
/// hands out none (standby, fenced, cut off).
pub async fn take_gxid(address: &str, port: u16) -> Option<u64> {
    use ha_common::proto::gtm::gtm_client::GtmClient;
    use ha_common::proto::gtm::NextGxidRequest;
    let ep = ha_common::tls::endpoint(
        &format!("{address}:{port}"),
        ha_common::tls::CertRole::Gtm,
        Duration::from_millis(500),
    )
    .ok()?
    .timeout(Duration::from_secs(1));
    let channel = ep.connect().await.ok()?;
    let r = GtmClient::new(channel)
        .next_gxid(NextGxidRequest { count: 1 })
        .await
        .ok()?;
    Some(r.into_inner().first)
}

/// GXIDs that appear more than once.
pub fn duplicates(gxids: &[u64]) -> Vec<u64> {
    let mut seen = std::collections::HashSet::new();
    let mut dup: Vec<u64> = gxids.iter().copied().filter(|g| !seen.insert(*g)).collect();
    dup.sort_unstable();
    dup.dedup();
    dup
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duplicates_lists_each_reused_gxid_once() {
        assert_eq!(duplicates(&[5, 3, 5, 9, 3, 5]), vec![3, 5]);
        assert!(duplicates(&[1, 2, 3]).is_empty());
    }
}
