//! Shared by the cluster_partition* tests: the workload's clients run inside a host's
//! network namespace (`mpp_ha_tests::workload`), a CMServer's answer, and a sampler of
//! writable DN and GTM primaries in rounds.

// Each test binary includes this file and uses a part of it.
#![allow(dead_code, unused_imports)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Result;
use mpp_ha_tests::netns::Network;
use mpp_ha_tests::wait_for;
pub use mpp_ha_tests::workload::{
    assert_all_present, create_table, duplicates, probe_commit, take_gxid, Ack, Member, Reach,
    Writer,
};

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
        Duration::from_millis(500),
    ) {
        Ok(ep) => ep.timeout(Duration::from_secs(1)),
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
pub type GtmMember = Member;

/// The cluster's GTM pair as clients see it.
pub fn gtm_members(c: &mpp_ha_tests::LocalCluster) -> Vec<GtmMember> {
    c.cfg
        .gtm
        .instances
        .iter()
        .map(|i| Member::of(c, &i.name))
        .collect()
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
        let thread = Reach::host(net, Some(host)).spawn(move || async move {
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
                        let acked = probe_commit(&m, id, Duration::from_secs(1)).await;
                        (g, m, id, acked.is_some())
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
                    for (g, m, id, acked) in dn {
                        if acked {
                            by_group.entry(g).or_default().push(m.name.clone());
                            o.acks.push(Ack {
                                id,
                                member: m.name,
                                port: m.port,
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
