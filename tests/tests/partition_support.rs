//! Shared by the cluster_partition* tests: a writer that runs inside a host's network
//! namespace (or the test's own), commits single rows with ids unique to it through
//! whichever of its DN members accepts writes, and records every acknowledged id.

#![allow(dead_code)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use mpp_ha_tests::netns::{in_host, spawn_in_host, Network};
use mpp_ha_tests::{connect_at, wait_for};

/// A DN member as a client sees it.
#[derive(Debug, Clone)]
pub struct Member {
    pub name: String,
    pub address: String,
    pub port: u16,
}

impl Member {
    pub fn of(c: &mpp_ha_tests::LocalCluster, name: &str) -> Member {
        Member {
            name: name.to_owned(),
            address: c.address_of(name),
            port: c.port(name),
        }
    }
}

/// One acknowledged commit: id, the member that acknowledged it, when.
#[derive(Debug, Clone)]
pub struct Ack {
    pub id: i64,
    pub member: String,
    pub at: Instant,
}

/// The first of `members` that accepts writes (not in recovery), connected.
async fn writable(members: &[Member]) -> Option<(String, tokio_postgres::Client)> {
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
                return Some((m.name.clone(), c));
            }
        }
    }
    None
}

/// Inserts ids `first`, `first + 1`, … one row per transaction into `t`; records an
/// id only when its commit was acknowledged (no answer within `commit_timeout`:
/// unknown, not recorded, connection dropped).
pub struct Writer {
    acks: Arc<Mutex<Vec<Ack>>>,
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Result<()>>,
}

impl Writer {
    pub fn start(
        net: &Network,
        host: Option<&str>,
        members: Vec<Member>,
        first: i64,
        commit_timeout: Duration,
    ) -> Result<Writer> {
        let acks = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (a, s) = (acks.clone(), stop.clone());
        let thread = spawn_in_host(net, host, move || async move {
            let mut next = first;
            let mut conn: Option<(String, tokio_postgres::Client)> = None;
            // Bounded: the tests stop it long before.
            for _ in 0..1_000_000 {
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
                        member: member.clone(),
                        at: Instant::now(),
                    });
                    conn = Some((member, client));
                }
            }
            Ok(())
        })?;
        Ok(Writer { acks, stop, thread })
    }

    pub fn count(&self) -> usize {
        self.acks.lock().unwrap().len()
    }

    pub fn acks(&self) -> Vec<Ack> {
        self.acks.lock().unwrap().clone()
    }

    /// Waits until at least `n` more commits than now were acknowledged.
    pub async fn wait_more(&self, n: usize, timeout: Duration) -> Result<()> {
        let target = self.count() + n;
        wait_for(&format!("{n} more commits"), timeout, || async {
            Ok((self.count() >= target).then_some(()))
        })
        .await
    }

    /// Stops it (its current commit may take up to the commit timeout).
    pub fn stop(self) -> Vec<Ack> {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.thread.join();
        self.acks.lock().unwrap().clone()
    }
}

/// Checks, from inside `from` (a host: PostgreSQL trusts only the hosts' addresses),
/// that every acknowledged id is in `t` on `member` exactly once (`t.id` is the
/// primary key); returns the row count.
pub async fn assert_all_present(
    net: &Network,
    from: &str,
    member: &Member,
    acks: &[Ack],
) -> Result<usize> {
    let m = member.clone();
    let ids: Vec<i64> = in_host(net, Some(from), move || async move {
        let c = connect_at(&m.address, m.port, Duration::from_secs(5)).await?;
        let rows = c.query("SELECT id FROM t", &[]).await?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    })
    .await?;
    let present: std::collections::HashSet<i64> = ids.into_iter().collect();
    let missing: Vec<(i64, String)> = acks
        .iter()
        .filter(|a| !present.contains(&a.id))
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
    Ok(present.len())
}

/// Creates table `t` on `member`, from inside host `from`.
pub async fn create_table(net: &Network, from: &str, member: &Member) -> Result<()> {
    let m = member.clone();
    in_host(net, Some(from), move || async move {
        let c = connect_at(&m.address, m.port, Duration::from_secs(5)).await?;
        c.batch_execute("CREATE TABLE t (id bigint PRIMARY KEY)")
            .await?;
        Ok(())
    })
    .await
}

/// What one CMServer answers to a status request, asked from the caller's namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CmsAnswer {
    /// It acts as primary, in this term.
    Primary(u64),
    /// It answered, refusing (a standby says "not primary").
    Refused(String),
    /// No answer.
    Unreachable(String),
}

/// Asks the CMServer at `address:port` for the cluster status (bounded by 1 s).
pub async fn ask_cms(address: &str, port: u16) -> CmsAnswer {
    use ha_common::proto::cm::cm_server_client::CmServerClient;
    use ha_common::proto::cm::ClusterStatusRequest;
    let ep = match ha_common::tls::endpoint(
        &format!("{address}:{port}"),
        ha_common::tls::CertRole::CmServer,
    ) {
        Ok(ep) => ep
            .connect_timeout(Duration::from_millis(500))
            .timeout(Duration::from_secs(1)),
        Err(e) => return CmsAnswer::Unreachable(e.to_string()),
    };
    let channel = match ep.connect().await {
        Ok(c) => c,
        Err(e) => return CmsAnswer::Unreachable(e.to_string()),
    };
    match CmServerClient::new(channel)
        .get_cluster_status(ClusterStatusRequest {})
        .await
    {
        Ok(r) => CmsAnswer::Primary(r.into_inner().term),
        Err(s) if s.code() == tonic::Code::Unavailable => {
            CmsAnswer::Unreachable(s.message().to_owned())
        }
        Err(s) => CmsAnswer::Refused(s.message().to_owned()),
    }
}

/// A GTM instance as a client sees it.
#[derive(Debug, Clone)]
pub struct GtmMember {
    pub name: String,
    pub address: String,
    pub port: u16,
}

/// Asks the GTM at `address:port` for one GXID (bounded by 1 s); `None` if it
/// hands out none (standby, fenced, cut off).
pub async fn take_gxid(address: &str, port: u16) -> Option<u64> {
    use ha_common::proto::gtm::gtm_client::GtmClient;
    use ha_common::proto::gtm::NextGxidRequest;
    let ep = ha_common::tls::endpoint(&format!("{address}:{port}"), ha_common::tls::CertRole::Gtm)
        .ok()?
        .connect_timeout(Duration::from_millis(500))
        .timeout(Duration::from_secs(1));
    let channel = ep.connect().await.ok()?;
    let r = GtmClient::new(channel)
        .next_gxid(NextGxidRequest { count: 1 })
        .await
        .ok()?;
    Some(r.into_inner().first)
}

/// What the sampler saw.
#[derive(Debug, Default, Clone)]
pub struct Samples {
    pub rounds: usize,
    /// (round, group, members that each acknowledged a commit in that round).
    pub dual_dn: Vec<(usize, String, Vec<String>)>,
    /// (round, when it ended, GTMs that each handed out a GXID in that round).
    pub dual_gtm: Vec<(usize, Instant, Vec<String>)>,
    /// Every GXID handed out to the sampler.
    pub gxids: Vec<u64>,
    /// The sampler's own acknowledged probe commits (ids from its range).
    pub acks: Vec<Ack>,
}

/// Samples, every round, whether more than one member of a DN group acknowledges a
/// commit (a probe row into `t`, ids from `first_id`) and whether more than one GTM
/// hands out a GXID: at most one writable primary per DN group and per GTM pair.
/// Runs inside `host`'s namespace.
pub struct Sampler {
    samples: Arc<Mutex<Samples>>,
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Result<()>>,
}

impl Sampler {
    pub fn start(
        net: &Network,
        host: &str,
        groups: Vec<(String, Vec<Member>)>,
        gtms: Vec<GtmMember>,
        first_id: i64,
    ) -> Result<Sampler> {
        let samples = Arc::new(Mutex::new(Samples::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (out, s) = (samples.clone(), stop.clone());
        let thread = spawn_in_host(net, Some(host), move || async move {
            let mut next_id = first_id;
            // Bounded: the tests stop it long before.
            for round in 0..100_000 {
                if s.load(Ordering::Relaxed) {
                    break;
                }
                let probes = groups
                    .iter()
                    .flat_map(|(g, members)| members.iter().map(move |m| (g.clone(), m.clone())));
                let mut calls = Vec::new();
                for (g, m) in probes {
                    let id = next_id;
                    next_id += 1;
                    calls.push(async move {
                        let acked = probe_commit(&m, id).await;
                        (g, m.name, id, acked)
                    });
                }
                let gtm_calls = gtms.iter().map(|gm| async move {
                    (gm.name.clone(), take_gxid(&gm.address, gm.port).await)
                });
                let (dn, gtm) = futures::future::join(
                    futures::future::join_all(calls),
                    futures::future::join_all(gtm_calls),
                )
                .await;
                {
                    let mut o = out.lock().unwrap();
                    o.rounds = round + 1;
                    let mut by_group: std::collections::BTreeMap<String, Vec<String>> =
                        Default::default();
                    for (g, name, id, acked) in dn {
                        if acked {
                            by_group.entry(g).or_default().push(name.clone());
                            o.acks.push(Ack {
                                id,
                                member: name,
                                at: Instant::now(),
                            });
                        }
                    }
                    for (g, names) in by_group {
                        if names.len() > 1 {
                            o.dual_dn.push((round, g, names));
                        }
                    }
                    let serving: Vec<String> = gtm
                        .iter()
                        .filter(|(_, x)| x.is_some())
                        .map(|(n, _)| n.clone())
                        .collect();
                    o.gxids.extend(gtm.iter().filter_map(|(_, x)| *x));
                    if serving.len() > 1 {
                        o.dual_gtm.push((round, Instant::now(), serving));
                    }
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Ok(())
        })?;
        Ok(Sampler {
            samples,
            stop,
            thread,
        })
    }

    pub fn rounds(&self) -> usize {
        self.samples.lock().unwrap().rounds
    }

    /// Waits until `n` more rounds were sampled.
    pub async fn wait_rounds(&self, n: usize, timeout: Duration) -> Result<()> {
        let target = self.rounds() + n;
        wait_for(&format!("{n} more sample rounds"), timeout, || async {
            Ok((self.rounds() >= target).then_some(()))
        })
        .await
    }

    pub fn stop(self) -> Samples {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.thread.join();
        self.samples.lock().unwrap().clone()
    }
}

/// Whether `m` is out of recovery and acknowledges a commit of row `id` within 1 s.
async fn probe_commit(m: &Member, id: i64) -> bool {
    let t = Duration::from_millis(500);
    let Ok(c) = connect_at(&m.address, m.port, t).await else {
        return false;
    };
    let r = tokio::time::timeout(Duration::from_secs(1), async {
        let row = c.query_one("SELECT pg_is_in_recovery()", &[]).await?;
        if row.get::<_, bool>(0) {
            return Ok::<bool, tokio_postgres::Error>(false);
        }
        Ok(c.execute("INSERT INTO t (id) VALUES ($1)", &[&id]).await? == 1)
    })
    .await;
    matches!(r, Ok(Ok(true)))
}

/// GXIDs that appear more than once.
pub fn duplicates(gxids: &[u64]) -> Vec<u64> {
    let mut seen = std::collections::HashSet::new();
    let mut dup: Vec<u64> = gxids.iter().copied().filter(|g| !seen.insert(*g)).collect();
    dup.sort_unstable();
    dup.dedup();
    dup
}
