//! The data-unit build channel against a real PostgreSQL 15 primary: a build whose sink is
//! killed half way resumes from its last acknowledged offset, a unit corrupted on the
//! wire is refused and sent again, garbage on the source's port and from a fake source
//! gets an error and no crash, and the built standby streams, holds the same rows as the
//! primary and passes `pg_checksums`. Then an incremental rebuild of that standby after
//! changes ships only the blocks that differ.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use cm_agent::os_user::OsUser;
use cm_agent::postgres::{PgInstance, PgSettings, Upstream};
use dn_replicator::build_sink::saved_progress;
use dn_replicator::data_unit::{decode, encode, Message};
use ha_common::ClusterConfig;
use mpp_ha_tests::{
    bin, connect, local_config_text, run_bin, wait_for, write_config, Proc, TestDir,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const PORT_BASE: u16 = 12000;
const SOURCE_PORT: u16 = PORT_BASE + 900;
const PROXY_PORT: u16 = PORT_BASE + 901;
const GARBAGE_PORT: u16 = PORT_BASE + 902;
const T: Duration = Duration::from_secs(60);

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

/// Forwards sink <-> source and flips one payload byte of the `nth` data unit it relays.
async fn corrupting_proxy(listener: TcpListener, source: u16, nth: usize) {
    let Ok((mut sink, _)) = listener.accept().await else {
        return;
    };
    let Ok(mut src) = TcpStream::connect(("127.0.0.1", source)).await else {
        return;
    };
    let (mut sink_rd, mut sink_wr) = sink.split();
    let (mut src_rd, mut src_wr) = src.split();
    let up = tokio::io::copy(&mut sink_rd, &mut src_wr);
    let down = async {
        let mut buf = Vec::new();
        let mut chunk = vec![0u8; 64 * 1024];
        let mut seen = 0;
        loop {
            // Relay whole frames, so the one to corrupt can be found.
            while let Ok(Some((msg, used))) = decode(&buf) {
                let mut out = buf[..used].to_vec();
                if let Message::Unit(u) = &msg {
                    seen += 1;
                    if seen == nth && !u.data.is_empty() {
                        let mut bad = u.clone();
                        bad.data[17] ^= 0x40;
                        out.clear();
                        encode(&Message::Unit(bad), &mut out);
                    }
                }
                if sink_wr.write_all(&out).await.is_err() {
                    return;
                }
                buf.drain(..used);
            }
            match src_rd.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    };
    tokio::select! {
        _ = up => {}
        _ = down => {}
    }
}

/// Rows and a content hash of the test table.
async fn fingerprint(port: u16) -> Result<(i64, i64)> {
    let c = connect(port, Duration::from_secs(5)).await?;
    let row = c
        .query_one(
            "SELECT count(*), coalesce(sum(hashtext(id::text || pad)), 0)::int8 FROM t",
            &[],
        )
        .await?;
    Ok((row.get(0), row.get(1)))
}

fn sink_args<'a>(state: &'a str, data: &'a str, source: &'a str) -> Vec<&'a str> {
    vec![
        "build-sink",
        "--source",
        source,
        "--data-dir",
        data,
        "--state-dir",
        state,
        "--owner",
        "postgres",
        "--retry-for",
        "5",
    ]
}

fn pg_checksums(pg: &PgInstance) -> Result<String> {
    let out = std::process::Command::new("runuser")
        .args(["-u", &pg.os_user.name, "--"])
        .arg(pg.pg_bin_dir.join("pg_checksums"))
        .args(["--check", "-D"])
        .arg(&pg.data_dir)
        .output()?;
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    ensure!(out.status.success(), "pg_checksums failed: {text}");
    Ok(text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn build_channel_resumes_refuses_corruption_and_rebuilds_incrementally() -> Result<()> {
    let dir = TestDir::new("build-channel");
    // The test binary plays the agent: the standby's restore_command copy of
    // dn_replicator is installed from target/debug.
    let path = write_config(
        &dir,
        &mpp_ha_tests::with_bin_dir(&local_config_text(PORT_BASE, dir.path())),
    );
    let cfg = ClusterConfig::load(&path)?;
    let user = OsUser::resolve(&cfg.cluster.os_user)?;
    let group = cfg
        .dn_groups
        .iter()
        .find(|g| g.name == "dn1")
        .context("dn1")?;
    let primary = PgInstance::from_config(&cfg, "dn1_h1", user.clone())?;
    let standby = PgInstance::from_config(&cfg, "dn1_h2", user.clone())?;
    let _guard = StopOnDrop(vec![primary.clone(), standby.clone()]);
    let logs = dir.path();

    // A primary with about 40 MB of table data; asynchronous until the standby exists.
    primary.initdb().await?;
    let mut settings = PgSettings::for_member(&cfg, group, "dn1_h1", None)?;
    settings.sync_standbys.clear();
    primary.configure(&settings)?;
    primary.start().await?;
    primary.ensure_roles(T).await?;
    let c = connect(primary.port, T).await?;
    c.batch_execute(
        "CREATE TABLE t (id int PRIMARY KEY, pad text); \
         INSERT INTO t SELECT g, repeat(md5(g::text), 4) FROM generate_series(1, 200000) g;",
    )
    .await?;

    // The source, throttled so that the build takes several seconds.
    let src_port = SOURCE_PORT.to_string();
    let pg_port = primary.port.to_string();
    let data = primary.data_dir.display().to_string();
    let listen = format!("127.0.0.1:{src_port}");
    // The replication role logs in with its password (pg_hba wants one over TCP).
    let pw_file = ha_common::dn_auth::password_file(&cfg, ha_common::dn_auth::DnRole::Replication)
        .display()
        .to_string();
    let mut source = Proc::spawn(
        "source",
        &bin("dn_replicator"),
        &[
            "build-source",
            "--data-dir",
            &data,
            "--pg-port",
            &pg_port,
            "--pg-password-file",
            &pw_file,
            "--listen",
            &listen,
            "--resume-window",
            "30",
            "--max-rate-mb",
            "8",
        ],
        logs,
    )?;
    wait_for("the source listens", T, || async {
        Ok(TcpStream::connect(("127.0.0.1", SOURCE_PORT))
            .await
            .ok()
            .map(|_| ()))
    })
    .await
    .with_context(|| source.log_tail())?;
    // That probe connection sent nothing: the source must still be serving.
    let proxy = TcpListener::bind(("127.0.0.1", PROXY_PORT)).await?;
    tokio::spawn(corrupting_proxy(proxy, SOURCE_PORT, 300));

    // First sink run through the corrupting proxy; killed half way.
    standby.prepare_dirs()?;
    let state = standby.instance_dir.display().to_string();
    let sdata = standby.data_dir.display().to_string();
    let via_proxy = format!("127.0.0.1:{PROXY_PORT}");
    let mut sink = Proc::spawn(
        "sink1",
        &bin("dn_replicator"),
        &sink_args(&state, &sdata, &via_proxy),
        logs,
    )?;
    let (session, _) = wait_for(
        "the sink to acknowledge a third of the units",
        T,
        || async {
            Ok(saved_progress(&standby.instance_dir).filter(|(_, d, _)| *d > 2000))
                .map(|p| p.map(|(s, d, _)| (s, d)))
        },
    )
    .await
    .with_context(|| sink.log_tail())?;
    sink.kill9();
    let (s2, acked, _) = saved_progress(&standby.instance_dir).context("progress after kill")?;
    ensure!(s2 == session);
    ensure!(
        std::fs::read_to_string(&sink.log)?.contains("refused"),
        "the corrupted unit was not refused: {}",
        sink.log_tail()
    );
    ensure!(
        !standby.has_data(),
        "a half-built dir must not look like a cluster"
    );

    // Garbage on the source's port: an error for that connection, no crash.
    let mut g = TcpStream::connect(("127.0.0.1", SOURCE_PORT)).await?;
    g.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await?;
    let mut reply = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), g.read_to_end(&mut reply)).await;
    ensure!(
        source.alive(),
        "garbage killed the source: {}",
        source.log_tail()
    );

    // Second run, direct: resumes from the acknowledged offset, not from zero.
    let direct = format!("127.0.0.1:{SOURCE_PORT}");
    let out = tokio::task::spawn_blocking({
        let (state, sdata, direct) = (state.clone(), sdata.clone(), direct.clone());
        move || run_bin("dn_replicator", &sink_args(&state, &sdata, &direct))
    })
    .await?;
    ensure!(out.success, "resumed sink failed: {}", text(&out));
    ensure!(
        text(&out).contains(&format!("resumed from unit {acked},")),
        "expected a resume from unit {acked}: {}",
        text(&out)
    );
    wait_for("the source to finish", T, || {
        let alive = source.alive();
        async move { Ok((!alive).then_some(())) }
    })
    .await?;
    let src_log = std::fs::read_to_string(&source.log)?;
    ensure!(
        src_log.contains("build session") && src_log.contains("complete"),
        "{src_log}"
    );
    ensure!(standby.has_data());

    // The built standby: streams, same rows, checksums clean.
    let up = Upstream {
        host: "127.0.0.1".into(),
        port: primary.port,
    };
    standby.configure(&PgSettings::for_member(
        &cfg,
        group,
        "dn1_h2",
        Some(up.clone()),
    )?)?;
    standby.start().await?;
    c.batch_execute("INSERT INTO t SELECT g, 'after' FROM generate_series(200001, 201000) g")
        .await?;
    let want = fingerprint(primary.port).await?;
    wait_for("the standby to hold every row", T, || async {
        Ok(fingerprint(standby.port).await.ok().filter(|f| *f == want))
    })
    .await?;
    standby.stop().await?;
    pg_checksums(&standby)?;

    // A fake source answering garbage: the sink fails with one error, changes nothing.
    let fake = TcpListener::bind(("127.0.0.1", GARBAGE_PORT)).await?;
    tokio::spawn(async move {
        if let Ok((mut s, _)) = fake.accept().await {
            let _ = s
                .write_all(&[
                    0x10, 0, 0, 0, 0xee, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15,
                ])
                .await;
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    });
    let garbage = format!("127.0.0.1:{GARBAGE_PORT}");
    let out = tokio::task::spawn_blocking({
        let (state, sdata) = (state.clone(), sdata.clone());
        move || run_bin("dn_replicator", &sink_args(&state, &sdata, &garbage))
    })
    .await?;
    ensure!(!out.success, "garbage accepted: {}", text(&out));
    ensure!(text(&out).contains("unknown message tag"), "{}", text(&out));
    ensure!(standby.has_data(), "a refused source must change nothing");

    // Incremental rebuild after changes on the primary: only what differs travels.
    c.batch_execute("UPDATE t SET pad = 'changed' WHERE id <= 2000; CHECKPOINT")
        .await?;
    let mut source = Proc::spawn(
        "source2",
        &bin("dn_replicator"),
        &[
            "build-source",
            "--data-dir",
            &data,
            "--pg-port",
            &pg_port,
            "--pg-password-file",
            &pw_file,
            "--listen",
            &listen,
        ],
        logs,
    )?;
    let out = tokio::task::spawn_blocking({
        let (state, sdata, direct) = (state.clone(), sdata.clone(), direct.clone());
        move || {
            let mut args = sink_args(&state, &sdata, &direct);
            args.push("--incremental");
            run_bin("dn_replicator", &args)
        }
    })
    .await?;
    ensure!(out.success, "incremental build failed: {}", text(&out));
    let text = text(&out);
    let counts = parse_counts(&text).with_context(|| text.clone())?;
    // Hint bits the primary set without WAL make more blocks differ than the update
    // touched; still, blocks that match must not travel.
    ensure!(
        counts.1 > 0 && counts.2 * 4 > counts.0 && counts.1 + counts.2 <= counts.0,
        "incremental should skip the blocks that match (units, written, unchanged) = {counts:?}: {text}"
    );
    // The primary's own settings came with the copy: make it the standby again.
    standby.configure(&PgSettings::for_member(
        &cfg,
        group,
        "dn1_h2",
        Some(up.clone()),
    )?)?;
    standby.start().await?;
    let want = fingerprint(primary.port).await?;
    wait_for(
        "the incrementally rebuilt standby to hold every row",
        T,
        || async { Ok(fingerprint(standby.port).await.ok().filter(|f| *f == want)) },
    )
    .await?;
    standby.stop().await?;
    pg_checksums(&standby)?;
    source.kill9();
    Ok(())
}

/// (units, written, unchanged) from the sink's last line.
fn parse_counts(text: &str) -> Option<(u64, u64, u64)> {
    let line = text.lines().find(|l| l.contains("complete:"))?;
    let nums: Vec<u64> = line
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .filter_map(|s| s.parse().ok())
        .collect();
    // "build session S complete: U units (W written, X unchanged, ..."
    Some((*nums.get(1)?, *nums.get(2)?, *nums.get(3)?))
}

fn text(out: &mpp_ha_tests::CmdOutput) -> String {
    format!("{}{}", out.stdout, out.stderr)
}
