//! The agent's `postgres` module against a real PostgreSQL 15: initdb a primary as
//! the OS user, basebackup a synchronous standby, replicate a row, probe both, and
//! detect a killed postmaster.

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use cm_agent::os_user::OsUser;
use cm_agent::postgres::{PgInstance, PgSettings, Upstream};
use ha_common::ClusterConfig;
use mpp_ha_tests::{connect, local_config_text, wait_for, write_config, TestDir};

const PORT_BASE: u16 = 24000;
const PROBE: Duration = Duration::from_secs(5);

/// Stops the instances it holds (immediate shutdown) when the test ends, passed or not.
struct StopOnDrop(Vec<PgInstance>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        for pg in &self.0 {
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
}

fn os_user(cfg: &ClusterConfig) -> Result<OsUser> {
    Ok(OsUser::resolve(&cfg.cluster.os_user)?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_postgres_primary_standby_probe_and_crash_detection() -> Result<()> {
    let dir = TestDir::new("agent-postgres");
    // The test binary plays the agent: our binaries (the standby's restore_command
    // needs dn_replicator) are not beside it but in target/debug.
    let text = mpp_ha_tests::with_bin_dir(&local_config_text(PORT_BASE, dir.path()));
    let path = write_config(&dir, &text);
    let cfg = ClusterConfig::load(&path)?;
    let user = os_user(&cfg)?;
    let group = cfg
        .dn_groups
        .iter()
        .find(|g| g.name == "dn1")
        .context("dn1")?;
    let primary = PgInstance::from_config(&cfg, "dn1_h1", user.clone())?;
    let standby = PgInstance::from_config(&cfg, "dn1_h2", user.clone())?;
    let _guard = StopOnDrop(vec![primary.clone(), standby.clone()]);

    // Primary: initdb as the OS user, our settings, start.
    assert!(!primary.has_data());
    primary.initdb().await?;
    assert!(primary.has_data());
    if user.switches() {
        use std::os::unix::fs::MetadataExt;
        let owner = std::fs::metadata(&primary.data_dir)?.uid();
        assert_ne!(owner, 0, "the data dir must not belong to root");
    }
    let settings = PgSettings::for_member(&cfg, group, "dn1_h1", None)?;
    assert!(
        primary.configure(&settings)?,
        "first configure writes the settings"
    );
    assert!(
        !primary.configure(&settings)?,
        "same settings: nothing to reload"
    );
    primary.start().await?;
    // As the agent does on a primary it starts: the roles TCP clients log in as.
    primary.ensure_roles(PROBE * 5).await?;
    primary.ensure_roles(PROBE * 5).await?; // idempotent
    let pid = primary
        .postmaster_pid()
        .context("postmaster pid after start")?;
    assert!(
        primary.start().await.is_err(),
        "a second postmaster must be refused"
    );
    assert_eq!(primary.postmaster_pid(), Some(pid));

    // Standby: a copy of the primary, following it as application_name dn1_h2.
    let up = Upstream {
        host: primary.address.clone(),
        port: primary.port,
    };
    standby.basebackup(&up).await?;
    let s_settings = PgSettings::for_member(&cfg, group, "dn1_h2", Some(up.clone()))?;
    standby.configure(&s_settings)?;
    assert!(standby.configured_as_standby());
    let auto = std::fs::read_to_string(standby.data_dir.join("postgresql.auto.conf"))?;
    assert!(
        !auto.contains("primary_conninfo"),
        "ours is the only primary_conninfo: {auto}"
    );
    standby.start().await?;

    // Synchronous replication: wait until the standby is the sync standby (a commit
    // before that would wait for it).
    let p = wait_for(
        "dn1_h2 to be the synchronous standby",
        Duration::from_secs(60),
        || async {
            let p = primary.probe(PROBE).await?;
            Ok(p.replicas
                .iter()
                .any(|r| {
                    r.application_name == "dn1_h2"
                        && r.sync_state == "sync"
                        && r.state == "streaming"
                })
                .then_some(p))
        },
    )
    .await?;
    assert!(!p.in_recovery);
    assert_eq!(p.timeline, 1);
    assert!(p.current_lsn > 0 && p.flush_lsn > 0, "{p:?}");

    let client = connect(primary.port, PROBE).await?;
    tokio::time::timeout(
        Duration::from_secs(30),
        client.batch_execute(
            "CREATE TABLE t (id int primary key, v text); INSERT INTO t VALUES (1, 'hello');",
        ),
    )
    .await
    .context("commit with a sync standby timed out")??;
    let s_client = connect(standby.port, PROBE).await?;
    let v: String = wait_for(
        "the row on the standby",
        Duration::from_secs(30),
        || async {
            let rows = s_client.query("SELECT v FROM t WHERE id = 1", &[]).await;
            match rows {
                Ok(rows) => Ok(rows.first().map(|r| r.get::<_, String>(0))),
                Err(e) => bail!("{e}"),
            }
        },
    )
    .await?;
    assert_eq!(v, "hello");

    let pp = primary.probe(PROBE).await?;
    let sp = standby.probe(PROBE).await?;
    assert!(sp.in_recovery, "{sp:?}");
    assert_eq!(sp.timeline, 1);
    assert!(sp.receive_lsn > 0 && sp.replay_lsn > 0, "{sp:?}");
    assert!(
        sp.replay_lsn <= pp.current_lsn,
        "standby {sp:?} ahead of primary {pp:?}"
    );
    let r = pp
        .replicas
        .iter()
        .find(|r| r.application_name == "dn1_h2")
        .context("replica row")?;
    assert!(r.flush_lsn > 0 && r.flush_lsn <= pp.current_lsn, "{r:?}");
    drop(client);
    drop(s_client);

    // kill -9 of the postmaster: seen dead (even before anyone reaps it).
    let pid = primary.postmaster_pid().context("primary pid")?;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )?;
    wait_for(
        "the killed postmaster to be seen dead",
        Duration::from_secs(10),
        || async { Ok((!primary.is_running()).then_some(())) },
    )
    .await?;
    assert!(primary.probe(Duration::from_millis(500)).await.is_err());

    // It starts again over the stale postmaster.pid (its orphaned backends may need a
    // moment to exit and release shared memory).
    wait_for(
        "the primary to start again after the crash",
        Duration::from_secs(60),
        || async {
            match primary.start().await {
                Ok(()) => Ok(Some(())),
                Err(e) => bail!("{e}"),
            }
        },
    )
    .await?;
    assert!(primary.is_running());

    // Issue 9 §5.1: a former primary is never rewound against a source that is not
    // primary yet (caught between the failover decision and the promotion it would
    // see the old timeline, "no rewind required", and then write past the fork).
    primary.stop().await?;
    let s_up = Upstream {
        host: standby.address.clone(),
        port: standby.port,
    };
    let e = primary
        .rewind(&s_up)
        .await
        .expect_err("rewound against a standby")
        .to_string();
    assert!(e.contains("still a standby"), "{e}");
    let marker = primary.instance_dir.join(cm_agent::postgres::REWIND_MARKER);
    assert!(!marker.exists(), "no rewind was started");

    // §5.2: a rewind interrupted (agent killed, marker left, no tool running) is
    // not run again on the half-rewound data dir: it is rebuilt from the new primary.
    standby.promote().await?;
    std::fs::write(&marker, "pg_rewind\n")?;
    let out = primary.rewind(&s_up).await?;
    assert!(out.contains("rebuilt"), "{out}");
    assert!(!marker.exists());
    assert!(primary.instance_dir.join("data.old").exists());
    let settings = PgSettings::for_member(&cfg, group, "dn1_h1", Some(s_up.clone()))?;
    primary.configure(&settings)?;
    primary.start().await?;
    let c = connect(primary.port, PROBE).await?;
    let row = c.query_one("SELECT v FROM t WHERE id = 1", &[]).await?;
    assert_eq!(row.get::<_, String>(0), "hello");
    assert!(
        primary.probe(PROBE).await?.in_recovery,
        "rejoined as a standby"
    );
    drop(c);

    standby.stop().await?;
    primary.stop().await?;
    assert!(!standby.is_running() && !primary.is_running());
    standby.stop().await?; // stopping a stopped instance is fine
    Ok(())
}

#[tokio::test]
async fn agent_postgres_rejects_a_non_dn_instance() {
    let cfg = ClusterConfig::parse(
        &local_config_text(PORT_BASE, Path::new("/tmp/x")),
        Path::new("t.toml"),
    )
    .expect("config");
    let e = PgInstance::from_config(&cfg, "gtm1", OsUser::current())
        .unwrap_err()
        .to_string();
    assert!(e.contains("gtm1"), "{e}");
}
