//! A cluster whose TLS dir was made before certificates named hosts (host-less
//! `<role>.crt` files only): its daemons still start with those files, and
//! `cm_ctl cert init` upgrades the dir in place (adds `<role>@<host>` certificates
//! signed by the dir's own CA and rewrites nothing), after which a restarted daemon
//! presents its own host's certificate. No PostgreSQL: one CMServer is enough.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, ensure, Result};
use ha_common::proto::cm::AgentReport;
use ha_common::tls::{Ca, CertRole, IssueOptions, TlsMaterial};
use ha_common::ClusterConfig;
use mpp_ha_tests::{
    bin, cm_server_as, local_config_text, run_bin, tail, wait_for, with_tls, Proc, TestDir,
};

const PORT_BASE: u16 = 44000;

/// Every file of `dir` and its bytes.
fn snapshot(dir: &Path) -> Result<BTreeMap<String, Vec<u8>>> {
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        out.insert(
            e.file_name().to_string_lossy().into_owned(),
            std::fs::read(e.path())?,
        );
    }
    Ok(out)
}

/// The certificate file a daemon's log says it loaded.
fn loaded_certificate(log: &str) -> Option<String> {
    let line = log
        .lines()
        .find(|l| l.contains("TLS: loaded certificate"))?;
    let file = line.split("file=").nth(1)?;
    Path::new(file.trim())
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
}

/// Waits until the CMServer at `ep` answers a call over TLS with `agent`'s
/// certificate: a report for a host that does not exist, which changes nothing.
/// `expect`: InvalidArgument (a host-less certificate passes the certificate check,
/// the host is unknown) or PermissionDenied (a host's certificate speaks for it alone).
async fn answers(ep: &str, agent: &TlsMaterial, cms: &Proc, expect: tonic::Code) -> Result<()> {
    wait_for(
        "the CMServer to answer over TLS",
        Duration::from_secs(30),
        || async {
            let connected =
                cm_server_as(agent, ep, Duration::from_secs(2), Duration::from_secs(3)).await;
            let mut client = match connected {
                Ok(c) => c,
                Err(e) => bail!("connect: {e:?}; log: {}", cms.log_tail()),
            };
            let r = client
                .report(AgentReport {
                    host: "no-such-host".into(),
                    ..Default::default()
                })
                .await;
            match r {
                Err(s) if s.code() == expect => Ok(Some(())),
                other => bail!("{other:?}"),
            }
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_legacy_tls_dir_keeps_working_and_is_upgraded_in_place() -> Result<()> {
    let dir = TestDir::new("tls-legacy-dir");
    let base = dir.path().join("cluster");
    let config = dir.path().join("cluster.toml");
    // Written directly: `write_config` would make a new-style dir.
    std::fs::write(&config, with_tls(local_config_text(PORT_BASE, &base)))?;
    let cfg = ClusterConfig::load(&config)?;
    let tls_dir = cfg.tls_dir();

    // The dir the previous release made: one host-less certificate per role.
    std::fs::create_dir_all(&tls_dir)?;
    let opts = IssueOptions::for_config(&cfg);
    let ca = Ca::generate(&cfg.cluster.name, &opts)?;
    for role in CertRole::ALL {
        let (cert, key) = ca.issue(role, &opts)?;
        std::fs::write(tls_dir.join(format!("{role}.crt")), cert)?;
        std::fs::write(tls_dir.join(format!("{role}.key")), key)?;
    }
    std::fs::write(tls_dir.join("ca.key"), ca.key_pem())?;
    std::fs::write(tls_dir.join("ca.crt"), &ca.cert_pem)?;
    let legacy = snapshot(&tls_dir)?;

    let config_s = config.display().to_string();
    let args = ["--config", config_s.as_str(), "--node", "cms1"];
    let cms1 = cfg
        .cm_servers
        .iter()
        .find(|s| s.name == "cms1")
        .map(|s| cfg.endpoint(s))
        .expect("cms1 in local.toml");
    let agent = TlsMaterial::load_dir(&tls_dir, CertRole::Agent)?;

    // A daemon starts on the legacy dir, with the host-less certificate.
    let cms = Proc::spawn("cms1", &bin("cm_server"), &args, dir.path())?;
    answers(&cms1, &agent, &cms, tonic::Code::InvalidArgument).await?;
    let log = tail(&cms.log, 200);
    ensure!(
        loaded_certificate(&log).as_deref() == Some("cmserver.crt"),
        "cms1 loaded the host-less cmserver.crt: {log}"
    );
    drop(cms);

    // The upgrade: `cm_ctl cert init` adds the per-host certificates from the dir's
    // own CA and rewrites nothing.
    let out = run_bin("cm_ctl", &["--config", &config_s, "cert", "init"]);
    ensure!(out.success, "cm_ctl cert init: {}", out.stderr);
    let upgraded = snapshot(&tls_dir)?;
    for (file, bytes) in &legacy {
        ensure!(upgraded.get(file) == Some(bytes), "{file} was rewritten");
    }
    for file in ["cmserver@h1.crt", "agent@h3.key", "gtm@h2.crt"] {
        ensure!(upgraded.contains_key(file), "{file} was not issued");
    }
    ensure!(
        !upgraded.contains_key("operator@h1.crt"),
        "operators have no host"
    );
    // Again: nothing changes.
    let out = run_bin("cm_ctl", &["--config", &config_s, "cert", "init"]);
    ensure!(out.success, "cm_ctl cert init again: {}", out.stderr);
    ensure!(
        out.stdout.contains("nothing changed"),
        "second cert init: {}",
        out.stdout
    );
    ensure!(
        snapshot(&tls_dir)? == upgraded,
        "a second cert init changed the dir"
    );

    // Restarted, the daemon presents its host's certificate; both kinds of agent
    // certificate get through.
    let cms = Proc::spawn("cms1-upgraded", &bin("cm_server"), &args, dir.path())?;
    answers(&cms1, &agent, &cms, tonic::Code::InvalidArgument).await?;
    let own = TlsMaterial::load_dir_for(&tls_dir, CertRole::Agent, Some("h1"))?;
    ensure!(own.host.as_deref() == Some("h1"), "{own:?}");
    answers(&cms1, &own, &cms, tonic::Code::PermissionDenied).await?;
    let log = tail(&cms.log, 200);
    ensure!(
        loaded_certificate(&log).as_deref() == Some("cmserver@h1.crt"),
        "cms1 loaded cmserver@h1.crt after the upgrade: {log}"
    );
    Ok(())
}
