//! Shared by the cluster_failover* tests: a writer that commits single rows through
//! whichever member of a DN group is primary and records every acknowledged id, and
//! small status helpers.

#![allow(dead_code)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use mpp_ha_tests::{connect, member_state, status_member, wait_for, LocalCluster};

/// The port of the member of `ports` that accepts writes (not in recovery), if any.
pub async fn writable(ports: &[u16]) -> Option<(u16, tokio_postgres::Client)> {
    for &port in ports {
        let Ok(c) = connect(port, Duration::from_millis(800)).await else {
            continue;
        };
        let q = tokio::time::timeout(
            Duration::from_millis(800),
            c.query_one("SELECT pg_is_in_recovery()", &[]),
        )
        .await;
        if let Ok(Ok(row)) = q {
            if !row.get::<_, bool>(0) {
                return Some((port, c));
            }
        }
    }
    None
}

/// One acknowledged commit.
#[derive(Debug, Clone, Copy)]
pub struct Ack {
    pub id: i64,
    pub port: u16,
    pub at: Instant,
}

/// A task inserting ids 1, 2, 3… one row per transaction into `t` through the
/// group's current primary, reconnecting as needed. An id is recorded only when its
/// commit was acknowledged; a commit with no answer within `commit_timeout` is left
/// unknown (never recorded) and the connection dropped.
pub struct Writer {
    pub acks: Arc<Mutex<Vec<Ack>>>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Writer {
    pub fn start(ports: Vec<u16>, commit_timeout: Duration) -> Writer {
        let acks = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (a, s) = (acks.clone(), stop.clone());
        let task = tokio::spawn(async move {
            let mut next: i64 = 1;
            let mut conn: Option<(u16, tokio_postgres::Client)> = None;
            // Bounded: at most this many attempts (the tests stop it long before).
            for _ in 0..1_000_000 {
                if s.load(Ordering::Relaxed) {
                    break;
                }
                let Some((port, client)) = conn.take() else {
                    conn = writable(&ports).await;
                    if conn.is_none() {
                        tokio::time::sleep(Duration::from_millis(20)).await;
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
                // Error or no answer: unknown outcome, not recorded; reconnect.
                if let Ok(Ok(1)) = r {
                    a.lock().unwrap().push(Ack {
                        id,
                        port,
                        at: Instant::now(),
                    });
                    conn = Some((port, client));
                }
            }
        });
        Writer { acks, stop, task }
    }

    pub fn count(&self) -> usize {
        self.acks.lock().unwrap().len()
    }

    pub fn acks(&self) -> Vec<Ack> {
        self.acks.lock().unwrap().clone()
    }

    /// The first ack after `t`.
    pub fn first_after(&self, t: Instant) -> Option<Ack> {
        self.acks.lock().unwrap().iter().find(|a| a.at > t).copied()
    }

    pub async fn stop(self) -> Vec<Ack> {
        self.stop.store(true, Ordering::Relaxed);
        let _ = tokio::time::timeout(Duration::from_secs(10), self.task).await;
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
}

/// Checks that every acknowledged id is in `t` on the member at `port`.
pub async fn assert_all_present(port: u16, acks: &[Ack]) -> Result<usize> {
    let c = connect(port, Duration::from_secs(5)).await?;
    let rows = c.query("SELECT id FROM t", &[]).await?;
    let present: std::collections::HashSet<i64> = rows.iter().map(|r| r.get(0)).collect();
    let missing: Vec<i64> = acks
        .iter()
        .map(|a| a.id)
        .filter(|id| !present.contains(id))
        .collect();
    if !missing.is_empty() {
        bail!(
            "{} acknowledged commits lost on port {port}: {:?}",
            missing.len(),
            &missing[..missing.len().min(20)]
        );
    }
    Ok(present.len())
}

/// The role string of member `name` in status ("" if absent).
pub fn role_of(status: &serde_json::Value, name: &str) -> String {
    status_member(status, name)
        .and_then(|m| m["role"].as_str())
        .unwrap_or("")
        .to_owned()
}

/// Waits until every (name, role, state) holds in `cm_ctl status` (state "": any).
pub async fn wait_layout(
    c: &LocalCluster,
    want: &[(&str, &str, &str)],
    timeout: Duration,
) -> Result<serde_json::Value> {
    wait_for("the expected layout", timeout, || async {
        let s = c.status()?;
        let off: Vec<String> = want
            .iter()
            .filter(|(n, r, st)| {
                role_of(&s, n) != *r || (!st.is_empty() && member_state(&s, n) != *st)
            })
            .map(|(n, _, _)| {
                let m = status_member(&s, n).cloned().unwrap_or_default();
                format!("{n} is {} {} ({})", m["role"], m["state"], m["detail"])
            })
            .collect();
        if off.is_empty() {
            Ok(Some(s))
        } else {
            let groups: Vec<String> = s["dn_groups"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|g| format!("{}: {} {}", g["name"], g["state"], g["detail"]))
                .collect();
            bail!("{}; groups: {}", off.join(", "), groups.join("; "))
        }
    })
    .await
}

/// The DN group state string of `group`.
pub fn group_of(status: &serde_json::Value, group: &str) -> (String, String) {
    status["dn_groups"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|g| g["name"] == group)
        .map(|g| {
            (
                g["state"].as_str().unwrap_or("").to_owned(),
                g["detail"].as_str().unwrap_or("").to_owned(),
            )
        })
        .unwrap_or_default()
}

/// Creates table `t` on the group's primary at `port`.
pub async fn create_table(port: u16) -> Result<()> {
    let c = connect(port, Duration::from_secs(5)).await?;
    c.batch_execute("CREATE TABLE t (id bigint PRIMARY KEY)")
        .await?;
    Ok(())
}

/// `gtm next --config …`: one fresh GXID.
pub fn next_gxid(c: &LocalCluster) -> Result<u64> {
    let config = c.config.display().to_string();
    let out = mpp_ha_tests::run_bin("gtm", &["next", "--config", &config]);
    if !out.success {
        bail!("gtm next failed: {}", out.stderr.trim());
    }
    out.stdout.trim().parse().context("gtm next output")
}
