//! GTM standby loss with real processes: without its standby the primary never hands
//! out a GXID past the boundary the standby persisted; it waits (bounded) and answers
//! UNAVAILABLE; a restarted standby resyncs and allocation continues above the old
//! GXIDs. Also: a damaged control file makes `gtm serve` refuse to start.

#[path = "gtm_support.rs"]
mod gtm_support;

use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use gtm::control_file::{ControlFile, CONTROL_FILE_NAME};
use gtm::Decision;
use gtm_support::{run_bounded, Pair};
use ha_common::proto::gtm as pb;

const BLOCK: u64 = 100;
const SYNC_TIMEOUT_MS: u64 = 1000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gtm_primary_stops_at_the_standby_boundary_and_resyncs() -> Result<()> {
    let mut pair = Pair::new("gtm_standby_loss", 21100, BLOCK, SYNC_TIMEOUT_MS);
    let client = pair.client().await;
    pair.start_both(&client).await?;

    let mut before = Vec::new();
    for _ in 0..150 {
        before.extend(client.next_gxid(1).await?);
    }
    let decided = before[0];
    client.record_decision(decided, Decision::Abort).await?;

    pair.kill9("gtm2");
    // What the standby has durably persisted: the primary may never go past it.
    let standby_boundary = ControlFile::open_or_create(&pair.data_dir("gtm2"), None)?
        .data()
        .boundary;

    // Allocate until the primary refuses (bounded: far more calls than the blocks allow).
    let mut after_loss = Vec::new();
    let mut refusal = None;
    for _ in 0..(4 * BLOCK) {
        let t = Instant::now();
        match client.next_gxid(1).await {
            Ok(r) => after_loss.extend(r),
            Err(e) => {
                refusal = Some((e, t.elapsed()));
                break;
            }
        }
    }
    let Some((err, waited)) = refusal else {
        anyhow::bail!("the primary kept handing out GXIDs without its standby: {after_loss:?}");
    };
    ensure!(
        err.code() == Some(tonic::Code::Unavailable),
        "unexpected error {err}"
    );
    ensure!(
        err.to_string().contains("standby gtm2"),
        "unclear error: {err}"
    );
    ensure!(
        waited >= Duration::from_millis(SYNC_TIMEOUT_MS / 2)
            && waited < Duration::from_millis(SYNC_TIMEOUT_MS + 3000),
        "waited {waited:?} for a {SYNC_TIMEOUT_MS} ms sync timeout"
    );
    if let Some(max) = after_loss.iter().max() {
        ensure!(
            *max < standby_boundary,
            "GXID {max} handed out past the standby's boundary {standby_boundary}"
        );
    }
    // A decision cannot be recorded without the standby either.
    let e = client
        .record_decision(decided + 1, Decision::Commit)
        .await
        .unwrap_err();
    ensure!(
        e.code() == Some(tonic::Code::Unavailable),
        "decision without standby: {e}"
    );
    let s = client.status(&pair.endpoint("gtm1")).await?;
    ensure!(
        !s.standby_attached && s.last_error.contains("gtm2"),
        "status {s:?}"
    );

    // The standby comes back, copies the primary's state, and allocation continues.
    pair.start("gtm2")?;
    pair.wait_status(&client, "gtm2", "gtm2 ready again", |s| s.ready)
        .await?;
    pair.wait_status(&client, "gtm1", "gtm2 attached again", |s| {
        s.standby_attached
    })
    .await?;
    let old_max = before
        .iter()
        .chain(after_loss.iter())
        .copied()
        .max()
        .unwrap_or(0);
    let mut resumed = Vec::new();
    for _ in 0..(3 * BLOCK) {
        resumed.extend(client.next_gxid(1).await?);
    }
    ensure!(
        resumed.iter().all(|g| *g > old_max),
        "GXIDs after resync not above {old_max}"
    );
    let s2 = client.status(&pair.endpoint("gtm2")).await?;
    ensure!(
        s2.boundary > *resumed.iter().max().unwrap_or(&0),
        "standby boundary {} not ahead",
        s2.boundary
    );
    ensure!(s2.decisions >= 1, "standby lost the decision: {s2:?}");
    ensure!(client.get_decision(decided).await? == Some(Decision::Abort));
    ensure!(
        client.status(&pair.endpoint("gtm1")).await?.role == pb::Role::Primary as i32,
        "gtm1 no longer primary"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gtm_refuses_to_start_on_a_damaged_control_file() -> Result<()> {
    let pair = Pair::new("gtm_bad_control", 21200, BLOCK, SYNC_TIMEOUT_MS);
    let config = pair.config.display().to_string();
    let serve = |node: &str| {
        vec![
            "serve".into(),
            "--config".into(),
            config.clone(),
            "--node".into(),
            node.to_string(),
        ]
    };

    // Corrupt: a valid file with one flipped byte.
    let dir = pair.data_dir("gtm1");
    drop(ControlFile::open_or_create(&dir, None)?);
    let path = dir.join(CONTROL_FILE_NAME);
    let mut bytes = std::fs::read(&path)?;
    bytes[18] ^= 0xff;
    std::fs::write(&path, &bytes)?;
    let (ok, _out, err) = run_bounded(serve("gtm1"), Duration::from_secs(20)).await?;
    ensure!(!ok, "gtm serve started on a corrupt control file");
    ensure!(
        err.contains(&path.display().to_string()) && err.contains("checksum"),
        "unclear error: {err}"
    );

    // Missing: the data dir exists, the file does not.
    let dir2 = pair.data_dir("gtm2");
    std::fs::create_dir_all(&dir2)?;
    let (ok, _out, err) = run_bounded(serve("gtm2"), Duration::from_secs(20)).await?;
    ensure!(!ok, "gtm serve started without a control file");
    ensure!(
        err.contains(CONTROL_FILE_NAME) && err.contains("missing"),
        "unclear error: {err}"
    );

    // Bad flags and unknown nodes: one clear line, non-zero exit.
    let (ok, _out, err) = run_bounded(serve("gtm9"), Duration::from_secs(20)).await?;
    ensure!(!ok && err.contains("gtm9"), "unknown node: {err}");
    let (ok, _out, err) = run_bounded(
        vec!["next".into(), "--count".into(), "x".into()],
        Duration::from_secs(20),
    )
    .await?;
    ensure!(!ok && !err.is_empty(), "bad flags accepted");
    Ok(())
}
