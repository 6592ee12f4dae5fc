//! Shared by the cluster_failover* tests: the workload's writer on loopback (commits
//! single rows through whichever member of a DN group is primary, records every
//! acknowledged id), and small status helpers.

#![allow(dead_code)]

use std::time::Duration;

use anyhow::{bail, Context, Result};
pub use mpp_ha_tests::workload::{self, Ack, Member, Reach};
use mpp_ha_tests::{member_state, status_member, wait_for, LocalCluster};

/// The group's writer on loopback: the members known by their ports, ids 1, 2, 3…
/// (the shared [`mpp_ha_tests::workload::Writer`], reached from the test's own
/// namespace), stopped without blocking the test's runtime.
pub struct Writer(workload::Writer);

impl Writer {
    pub fn start(ports: Vec<u16>, commit_timeout: Duration) -> Writer {
        let members = ports.into_iter().map(Member::local).collect();
        Writer(
            workload::Writer::start(&Reach::here(), members, 1, commit_timeout)
                .expect("start the writer's thread"),
        )
    }

    pub async fn stop(self) -> Vec<Ack> {
        self.0.stop_async().await
    }
}

impl std::ops::Deref for Writer {
    type Target = workload::Writer;
    fn deref(&self) -> &workload::Writer {
        &self.0
    }
}

/// Checks that every acknowledged id is in `t` exactly once on the member at `port`.
pub async fn assert_all_present(port: u16, acks: &[Ack]) -> Result<usize> {
    workload::assert_all_present(&Reach::here(), &Member::local(port), acks).await
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
    workload::create_table(&Reach::here(), &Member::local(port)).await
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
