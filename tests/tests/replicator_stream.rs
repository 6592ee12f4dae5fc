//! dn_replicator against a real PostgreSQL 15 primary: it streams with the physical
//! replication protocol as the synchronous partner (commits wait for it and return
//! once it has fsynced), serves the WAL it kept byte-for-byte as `restore-wal`, keeps
//! streaming across a kill -9, refuses an older term, and once cut acknowledges
//! nothing (commits wait) and, idle, deletes what it kept.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use cm_agent::os_user::OsUser;
use cm_agent::postgres::{PgInstance, PgSettings};
use ha_common::proto::replicator::replicator_client::ReplicatorClient;
use ha_common::proto::replicator::{ReplicatorState, StatusRequest, StopOrder, StreamOrder};
use ha_common::ClusterConfig;
use mpp_ha_tests::{
    bin, connect, local_config_text, run_bin, wait_for, write_config, Proc, TestDir,
};

/// The config's layout at base 10000, but dn1_h1 and dn1_h3 (the only two ports
/// this test listens on) moved to 10901/10903: above what a cluster at base 10000
/// uses, so this test runs beside `cluster_secondary`.
const PORT_BASE: u16 = 10000;

fn config_text(dir: &TestDir) -> String {
    local_config_text(PORT_BASE, dir.path())
        .replace("port = 10101\n", "port = 10901\n")
        .replace("port = 10103\n", "port = 10903\n")
}
const PROBE: Duration = Duration::from_secs(5);

struct StopOnDrop(PgInstance);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        let pg = &self.0;
        if pg.is_running() {
            let _ = std::process::Command::new("runuser")
                .args(["-u", &pg.os_user.name, "--"])
                .arg(pg.pg_bin_dir.join("pg_ctl"))
                .args(["stop", "-m", "immediate", "-w", "-D"])
                .arg(&pg.data_dir)
                .status();
        }
    }
}

type Client = ReplicatorClient<tonic::transport::Channel>;

async fn replicator(port: u16) -> Result<Client> {
    wait_for(
        "dn_replicator to answer",
        Duration::from_secs(20),
        || async move {
            Ok(
                match ha_common::tls::endpoint(
                    &format!("127.0.0.1:{port}"),
                    ha_common::tls::CertRole::Replicator,
                    std::time::Duration::from_secs(2),
                ) {
                    Ok(ep) => ep.connect().await.ok().map(ReplicatorClient::new),
                    Err(_) => None,
                },
            )
        },
    )
    .await
}

async fn current_lsn(c: &tokio_postgres::Client) -> Result<u64> {
    let s: String = c
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await?
        .get(0);
    ha_common::lsn::parse_lsn(&s).context("lsn")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicator_streams_as_the_synchronous_partner_and_is_fenced_by_term() -> Result<()> {
    let dir = TestDir::new("replicator-stream");
    let path = write_config(&dir, &config_text(&dir));
    let cfg = ClusterConfig::load(&path)?;
    let user = OsUser::resolve(&cfg.cluster.os_user)?;
    let group = cfg
        .dn_groups
        .iter()
        .find(|g| g.name == "dn1")
        .context("dn1")?;
    let primary = PgInstance::from_config(&cfg, "dn1_h1", user)?;
    let _guard = StopOnDrop(primary.clone());
    primary.initdb().await?;
    primary.configure(&PgSettings::for_member(&cfg, group, "dn1_h1", None)?)?;
    primary.start().await?;
    primary.ensure_roles(Duration::from_secs(10)).await?;
    let sec_port = cfg.find("dn1_h3").context("dn1_h3")?.instance.port();
    assert_eq!((primary.port, sec_port), (10901, 10903));
    let cfg_s = path.display().to_string();
    let args = ["serve", "--config", &cfg_s, "--node", "dn1_h3"];
    let mut rep = Proc::spawn("dn1_h3", &bin("dn_replicator"), &args, dir.path())?;
    let mut c = replicator(sec_port).await?;

    // No synchronous partner yet: a commit waits.
    let db = connect(primary.port, PROBE).await?;
    db.batch_execute("SET synchronous_commit = local; CREATE TABLE t (id int primary key)")
        .await?;
    let db2 = connect(primary.port, PROBE).await?;
    let waiting = tokio::spawn(async move { db2.execute("INSERT INTO t VALUES (0)", &[]).await });
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!waiting.is_finished(), "a commit returned with one copy");

    // The secondary streams from the primary: the waiting commit returns.
    let start = current_lsn(&db).await?;
    let st = c
        .stream(StreamOrder {
            term: 5,
            upstream_name: "dn1_h1".into(),
            upstream_host: "127.0.0.1".into(),
            upstream_port: u32::from(primary.port),
            start_lsn: start,
        })
        .await?
        .into_inner();
    assert_eq!(st.state(), ReplicatorState::Streaming);
    tokio::time::timeout(Duration::from_secs(20), waiting)
        .await
        .with_context(|| {
            format!(
                "commit not acknowledged by the secondary: {}",
                rep.log_tail()
            )
        })???;
    db.batch_execute("SET synchronous_commit = on").await?;
    for i in 1..=200 {
        tokio::time::timeout(
            Duration::from_secs(10),
            db.execute("INSERT INTO t VALUES ($1)", &[&i]),
        )
        .await
        .context("commit through the secondary timed out")??;
    }
    let row = db
        .query_one(
            "SELECT sync_state, flush_lsn::text FROM pg_stat_replication WHERE application_name = 'dn1_h3'",
            &[],
        )
        .await?;
    assert_eq!(row.get::<_, String>(0), "sync");
    let end = current_lsn(&db).await?;
    let st = c.status(StatusRequest {}).await?.into_inner();
    assert!(st.connected, "{st:?}");
    assert!(
        st.flush_lsn >= end,
        "flush {:X} < primary {end:X}",
        st.flush_lsn
    );
    assert!(st.start_lsn <= start && st.bytes_kept > 0, "{st:?}");
    assert_eq!(st.timeline, 1);

    // restore-wal serves the segment as the primary has it (the partial one padded).
    let seg: String = db
        .query_one("SELECT pg_walfile_name(pg_current_wal_lsn())", &[])
        .await?
        .get(0);
    let out_path = dir.path().join("restored");
    let from = format!("127.0.0.1:{sec_port}");
    let out = run_bin(
        "dn_replicator",
        &[
            "restore-wal",
            "--from",
            &from,
            &seg,
            &out_path.display().to_string(),
        ],
    );
    assert!(out.success, "restore-wal: {}", out.stderr);
    let restored = std::fs::read(&out_path)?;
    let original = std::fs::read(primary.data_dir.join("pg_wal").join(&seg))?;
    assert_eq!(restored.len(), original.len());
    let upto = (end % original.len() as u64) as usize;
    assert!(upto > 0);
    assert_eq!(restored[..upto], original[..upto], "kept WAL differs");
    let missing = run_bin(
        "dn_replicator",
        &[
            "restore-wal",
            "--from",
            &from,
            "0000000900000000000000FF",
            &out_path.display().to_string(),
        ],
    );
    assert_eq!(
        missing.code,
        Some(1),
        "not kept: exit 1: {}",
        missing.stderr
    );

    // kill -9 and restart: it resumes streaming in the same term from what it kept.
    rep.kill9();
    let mut rep = Proc::spawn("dn1_h3", &bin("dn_replicator"), &args, dir.path())?;
    let mut c = replicator(sec_port).await?;
    tokio::time::timeout(
        Duration::from_secs(20),
        db.execute("INSERT INTO t VALUES (1000)", &[]),
    )
    .await
    .with_context(|| format!("commit after the secondary's restart: {}", rep.log_tail()))??;
    let st = c.status(StatusRequest {}).await?.into_inner();
    assert_eq!((st.state(), st.term), (ReplicatorState::Streaming, 5));
    assert!(
        st.start_lsn <= start,
        "kept WAL from before the restart: {st:?}"
    );

    // An older term is refused and changes nothing.
    let e = c
        .stop(StopOrder {
            term: 4,
            discard: true,
        })
        .await
        .expect_err("older term accepted");
    assert!(e.message().contains("term"), "{}", e.message());
    assert_eq!(
        c.status(StatusRequest {}).await?.into_inner().state(),
        ReplicatorState::Streaming
    );

    // Hold (fenced): cut at once, nothing acknowledged any more, the WAL kept.
    let st = c
        .stop(StopOrder {
            term: 6,
            discard: false,
        })
        .await?
        .into_inner();
    assert_eq!(st.state(), ReplicatorState::Holding);
    assert!(st.bytes_kept > 0);
    let r = tokio::time::timeout(
        Duration::from_secs(2),
        db.execute("INSERT INTO t VALUES (2000)", &[]),
    )
    .await;
    if r.is_ok() {
        bail!("a commit returned after the secondary was cut off");
    }
    let sent: i64 = primary
        .connect(PROBE)
        .await?
        .query_one(
            "SELECT count(*) FROM pg_stat_replication WHERE application_name = 'dn1_h3'",
            &[],
        )
        .await?
        .get(0);
    assert_eq!(
        sent, 0,
        "the primary still has a walsender for the secondary"
    );

    // Idle: deletes everything.
    let st = c
        .stop(StopOrder {
            term: 6,
            discard: true,
        })
        .await?
        .into_inner();
    assert_eq!((st.state(), st.bytes_kept), (ReplicatorState::Idle, 0));
    let wal_dir = cfg.instance_dir("dn1_h3").join("wal");
    assert_eq!(
        std::fs::read_dir(&wal_dir)?.count(),
        0,
        "{}",
        wal_dir.display()
    );
    rep.kill9();
    Ok(())
}
