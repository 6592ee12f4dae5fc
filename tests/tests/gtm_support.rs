//! Shared helpers of the GTM integration tests (included by each `gtm_*` test with
//! `#[path]`): a GTM pair of real `gtm serve` processes on loopback.

#![allow(dead_code)]

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use gtm::{ClientOptions, GtmClient};
use ha_common::proto::gtm as pb;
use ha_common::ClusterConfig;
use mpp_ha_tests::{bin, local_config_text, wait_for, write_config, Proc, TestDir};

pub const NODES: [&str; 2] = ["gtm1", "gtm2"];

/// A GTM pair (gtm1 configured primary, gtm2 standby) with its own dir and ports.
pub struct Pair {
    // Fields drop in order: the processes are killed before their dir is removed (a
    // GTM still running writes its log and state into a removed dir, which was left
    // behind under /tmp/mpp-ha-test).
    procs: Vec<Option<Proc>>,
    pub dir: TestDir,
    pub config: PathBuf,
    pub cfg: ClusterConfig,
}

impl Pair {
    /// Writes the test config with a small block size and sync timeout, starts nothing.
    pub fn new(name: &str, port_base: u16, block_size: u64, sync_timeout_ms: u64) -> Pair {
        Self::with_edit(name, port_base, block_size, sync_timeout_ms, |t| t)
    }

    /// `new` with the config text edited by `edit` (e.g. `mpp_ha_tests::with_tls`).
    pub fn with_edit(
        name: &str,
        port_base: u16,
        block_size: u64,
        sync_timeout_ms: u64,
        edit: impl FnOnce(String) -> String,
    ) -> Pair {
        let dir = TestDir::new(name);
        let text = edit(local_config_text(port_base, dir.path()))
            .replace("block_size = 2000", &format!("block_size = {block_size}"))
            .replace(
                "sync_timeout_ms = 3000",
                &format!("sync_timeout_ms = {sync_timeout_ms}"),
            );
        let config = write_config(&dir, &text);
        let cfg = ClusterConfig::load(&config).expect("test config loads");
        Pair {
            dir,
            config,
            cfg,
            procs: vec![None, None],
        }
    }

    fn index(node: &str) -> usize {
        NODES.iter().position(|n| *n == node).expect("gtm1 or gtm2")
    }

    pub fn endpoint(&self, node: &str) -> String {
        let inst = self
            .cfg
            .gtm
            .instances
            .iter()
            .find(|i| i.name == node)
            .expect("node in config");
        self.cfg.endpoint(inst)
    }

    pub fn data_dir(&self, node: &str) -> PathBuf {
        self.cfg.instance_dir(node)
    }

    pub fn start(&mut self, node: &str) -> Result<()> {
        let config = self.config.display().to_string();
        let p = Proc::spawn(
            node,
            &bin("gtm"),
            &["serve", "--config", &config, "--node", node],
            self.dir.path(),
        )?;
        self.procs[Self::index(node)] = Some(p);
        Ok(())
    }

    /// SIGKILL, by pid.
    pub fn kill9(&mut self, node: &str) {
        if let Some(mut p) = self.procs[Self::index(node)].take() {
            p.kill9();
        }
    }

    /// The pid of `node`'s process, if this pair started it and it was not killed.
    pub fn pid(&self, node: &str) -> Option<u32> {
        self.procs[Self::index(node)].as_ref().map(|p| p.pid())
    }

    pub fn log_tail(&self, node: &str) -> String {
        self.procs[Self::index(node)]
            .as_ref()
            .map(|p| p.log_tail())
            .unwrap_or_default()
    }

    pub async fn client(&self) -> GtmClient {
        GtmClient::connect_with(
            self.cfg.gtm_endpoints(),
            ClientOptions {
                failover_timeout: Duration::from_secs(15),
                ..ClientOptions::default()
            },
        )
        .await
        .expect("client")
    }

    /// Waits until `node` answers Status and `pred` holds.
    pub async fn wait_status(
        &self,
        client: &GtmClient,
        node: &str,
        what: &str,
        pred: impl Fn(&pb::GtmStatus) -> bool,
    ) -> Result<pb::GtmStatus> {
        let ep = self.endpoint(node);
        let r = wait_for(what, Duration::from_secs(15), || {
            let ep = ep.clone();
            let pred = &pred;
            async move {
                let s = client.status(&ep).await?;
                Ok(pred(&s).then_some(s))
            }
        })
        .await;
        r.with_context(|| format!("{node} log:\n{}", self.log_tail(node)))
    }

    /// Starts both and waits until gtm1 is primary with gtm2 attached and ready.
    pub async fn start_both(&mut self, client: &GtmClient) -> Result<()> {
        self.start("gtm1")?;
        self.start("gtm2")?;
        self.wait_status(client, "gtm2", "gtm2 ready", |s| {
            s.ready && s.role == pb::Role::Standby as i32
        })
        .await?;
        self.wait_status(client, "gtm1", "gtm1 primary", |s| {
            s.role == pb::Role::Primary as i32
        })
        .await?;
        Ok(())
    }

    /// Runs the `gtm` CLI to completion (bounded) and returns (success, stdout, stderr).
    pub async fn gtm_cli(&self, args: &[&str]) -> Result<(bool, String, String)> {
        run_bounded(
            args.iter().map(|s| s.to_string()).collect(),
            Duration::from_secs(30),
        )
        .await
    }
}

/// Runs `gtm args…` with a deadline; a process still running at the deadline is killed.
pub async fn run_bounded(args: Vec<String>, timeout: Duration) -> Result<(bool, String, String)> {
    let mut child = tokio::process::Command::new(bin("gtm"))
        .args(&args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("spawn gtm")?;
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let read = |p: Option<tokio::process::ChildStdout>| async move {
        let mut s = String::new();
        if let Some(mut p) = p {
            let _ = tokio::io::AsyncReadExt::read_to_string(&mut p, &mut s).await;
        }
        s
    };
    let read_err = |p: Option<tokio::process::ChildStderr>| async move {
        let mut s = String::new();
        if let Some(mut p) = p {
            let _ = tokio::io::AsyncReadExt::read_to_string(&mut p, &mut s).await;
        }
        s
    };
    let all = async { tokio::join!(child.wait(), read(stdout), read_err(stderr)) };
    match tokio::time::timeout(timeout, all).await {
        Ok((status, out, err)) => Ok((status?.success(), out, err)),
        Err(_) => bail!("gtm {args:?} did not finish within {timeout:?}"),
    }
}
