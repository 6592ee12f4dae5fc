//! Mutual TLS on a running cluster: the cluster works with TLS on, and a client with no certificate, a certificate from another CA, an expired certificate, plaintext, an agent certificate ordering a failover, or one host's certificate speaking for another host's agent, GTM, CN or CMServer is refused without changing anything.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use ha_common::proto::cm::cm_server_client::CmServerClient;
use ha_common::proto::cm::{
    AgentReport, ClusterStatusRequest, CnSyncRequest, FailoverRequest, RenewGtmLeaseRequest,
    SyncStateRequest,
};
use ha_common::proto::cn::coordinator_client::CoordinatorClient;
use ha_common::proto::cn::CnStatusRequest;
use ha_common::tls::{Ca, CertRole, IssueOptions, TlsMaterial};
use mpp_ha_tests::{status_member, with_tls, LocalCluster};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

const PORT_BASE: u16 = 39000;

/// The primary DN of dn1 and the CMServer term, as `cm_ctl status --json` shows them.
fn snapshot(c: &LocalCluster) -> Result<(String, String)> {
    let s = c.status()?;
    let role = status_member(&s, "dn1_h1")
        .map(|m| m["role"].as_str().unwrap_or("?").to_owned())
        .unwrap_or_default();
    Ok((role, s["term"].to_string()))
}

/// A `GetClusterStatus` call through `ep` to every CMServer; the first answer or the
/// last error.
async fn ask(c: &LocalCluster, tls: Option<ClientTlsConfig>) -> Result<(), String> {
    let mut last = String::new();
    for ep in c.cfg.cm_server_endpoints() {
        let scheme = if tls.is_some() { "https" } else { "http" };
        let mut e = Endpoint::from_shared(format!("{scheme}://{ep}"))
            .map_err(|e| e.to_string())?
            .connect_timeout(Duration::from_secs(2))
            .timeout(Duration::from_secs(3));
        if let Some(t) = tls.clone() {
            e = e.tls_config(t).map_err(|e| e.to_string())?;
        }
        match e.connect().await {
            Err(err) => last = format!("{ep}: connect: {err:?}"),
            Ok(ch) => match CmServerClient::new(ch)
                .get_cluster_status(ClusterStatusRequest {})
                .await
            {
                Ok(_) => return Ok(()),
                Err(s) => last = format!("{ep}: {:?}: {}", s.code(), s.message()),
            },
        }
    }
    Err(last)
}

/// How long each of `n` calls in a row took.
async fn round_trips<F, Fut>(n: usize, mut call: F) -> Result<Vec<Duration>>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<()>>,
{
    let mut took = Vec::with_capacity(n);
    for _ in 0..n {
        let t = std::time::Instant::now();
        call().await?;
        took.push(t.elapsed());
    }
    Ok(took)
}

/// A client of the CMServer at `ep` that presents `material`'s certificate.
async fn cm_server_as(material: &TlsMaterial, ep: &str) -> Result<CmServerClient<Channel>> {
    let t = Duration::from_secs(5);
    mpp_ha_tests::cm_server_as(material, ep, t, t).await
}

fn client_tls(ca: &str, identity: Option<(&str, &str)>) -> ClientTlsConfig {
    let mut t = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .domain_name(CertRole::CmServer.server_name());
    if let Some((cert, key)) = identity {
        t = t.identity(Identity::from_pem(cert, key));
    }
    t
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_cluster_ca_and_an_operator_certificate_get_through() -> Result<()> {
    let c = LocalCluster::with_config_edit("cluster-tls", PORT_BASE, with_tls);
    assert!(c.cfg.tls.enabled);
    c.up(150)?;
    let before = snapshot(&c)?;
    assert_eq!(before.0, "primary", "dn1_h1 starts as primary");
    let dir = c.cfg.tls_dir();
    let ca_pem = std::fs::read_to_string(dir.join("ca.crt"))?;
    let op_cert = std::fs::read_to_string(dir.join("operator.crt"))?;
    let op_key = std::fs::read_to_string(dir.join("operator.key"))?;

    // The operator's own certificate gets an answer: the check below can fail.
    if let Err(e) = ask(&c, Some(client_tls(&ca_pem, Some((&op_cert, &op_key))))).await {
        bail!("the operator certificate was refused: {e}");
    }

    // The GTM primary renews its lease (gtm.require_lease, the default) from the
    // CMServer with its own gtm certificate: GXIDs are handed out.
    let config = c.config.display().to_string();
    let out = mpp_ha_tests::run_bin("gtm", &["next", "--config", &config, "--count", "3"]);
    if !out.success {
        bail!("no GXID with TLS on (GTM lease?): {}", out.stderr.trim());
    }
    // ...and nobody else may renew it: an agent certificate is refused by role.
    let agent = TlsMaterial::load(&c.cfg, CertRole::Agent, Some("h2"))?.expect("tls is on");
    assert!(
        agent.cert_path.ends_with("agent@h2.crt"),
        "h2's own certificate: {:?}",
        agent.cert_path
    );
    for ep in c.cfg.cm_server_endpoints() {
        let mut client = cm_server_as(&agent, &ep).await?;
        let r = client
            .renew_gtm_lease(RenewGtmLeaseRequest {
                instance: "gtm1".into(),
                gtm_term: 0,
            })
            .await;
        match r {
            Err(s) if s.code() == tonic::Code::PermissionDenied => {}
            other => bail!("{ep}: an agent certificate renewing a GTM lease: {other:?}"),
        }
    }

    // Plaintext on a TLS port.
    let e = ask(&c, None).await.expect_err("plaintext must be refused");
    eprintln!("plaintext: {e}");

    // TLS without a client certificate: the server requires one.
    let e = ask(&c, Some(client_tls(&ca_pem, None)))
        .await
        .expect_err("no client certificate must be refused");
    eprintln!("no certificate: {e}");

    // An operator certificate from another CA.
    let opts = IssueOptions::for_config(&c.cfg);
    let other = Ca::generate("intruder", &opts)?;
    let (cert, key) = other.issue(CertRole::Operator, &opts)?;
    let e = ask(&c, Some(client_tls(&ca_pem, Some((&cert, &key)))))
        .await
        .expect_err("a certificate of another CA must be refused");
    eprintln!("other CA: {e}");

    // An expired operator certificate from the cluster CA.
    let ca = Ca::from_files(&dir.join("ca.crt"), &dir.join("ca.key"))?;
    let expired = IssueOptions {
        valid_days: -1,
        backdate_days: 30,
        ..opts.clone()
    };
    let (cert, key) = ca.issue(CertRole::Operator, &expired)?;
    let e = ask(&c, Some(client_tls(&ca_pem, Some((&cert, &key)))))
        .await
        .expect_err("an expired certificate must be refused");
    eprintln!("expired: {e}");

    // A cm_ctl without TLS (a config with [tls] off) ordering a failover.
    let plain = std::fs::read_to_string(&c.config)?.replace("enabled = true", "enabled = false");
    let plain_path = c.dir.path().join("plain.toml");
    std::fs::write(&plain_path, plain)?;
    let out = mpp_ha_tests::run_bin(
        "cm_ctl",
        &[
            "--config",
            &plain_path.display().to_string(),
            "failover",
            "--instance",
            "dn1_h2",
            "--force",
        ],
    );
    assert!(
        !out.success,
        "plaintext cm_ctl failover must fail: {}",
        out.stdout
    );
    eprintln!("plaintext cm_ctl failover: {}", out.stderr.trim());
    // Refused at the handshake, and it says so (not a bare "transport error").
    let err = out.stderr.to_lowercase();
    assert!(
        err.contains("tls") || err.contains("handshake") || err.contains("certificate"),
        "the refusal names TLS: {}",
        out.stderr.trim()
    );

    // The restore certificate (restore_command's, the OS user's): its key is that
    // user's alone, and it is good for reading WAL from a secondary only.
    {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(dir.join("restore@h1.key"))?;
        let os_uid = nix::unistd::User::from_name(&c.cfg.cluster.os_user)?
            .map(|u| u.uid.as_raw())
            .context("the OS user exists")?;
        assert_eq!(meta.uid(), os_uid, "restore@h1.key belongs to the OS user");
        assert_eq!(meta.mode() & 0o777, 0o600, "restore@h1.key is private");
    }
    let restore = TlsMaterial::load_dir_for(&dir, CertRole::Restore, Some("h1"))?;
    for ep in c.cfg.cm_server_endpoints() {
        let mut client = cm_server_as(&restore, &ep).await?;
        match client.get_cluster_status(ClusterStatusRequest {}).await {
            Err(s) if s.code() == tonic::Code::PermissionDenied => {}
            other => bail!("{ep}: a restore certificate reading the status: {other:?}"),
        }
    }

    // An agent certificate (valid, cluster CA) ordering a failover: refused by role.
    let mut refused = 0;
    for ep in c.cfg.cm_server_endpoints() {
        let mut client = cm_server_as(&agent, &ep).await?;
        let r = client
            .failover(FailoverRequest {
                instance: "dn1_h2".into(),
                force: true,
            })
            .await;
        match r {
            Ok(reply) => bail!("an agent certificate ordered a failover: {reply:?}"),
            Err(s) if s.code() == tonic::Code::PermissionDenied => {
                assert!(s.message().contains("operator"), "{}", s.message());
                refused += 1;
            }
            // The standby CMServer may answer "not primary" before looking further.
            Err(s) => eprintln!("{ep}: {:?} {}", s.code(), s.message()),
        }
    }
    assert!(
        refused >= 1,
        "the primary CMServer refused the agent's order by role"
    );

    // Each daemon presents its own host's certificate.
    let log_of =
        |node: &str| mpp_ha_tests::tail(&c.base_dir().join(node).join(format!("{node}.log")), 2000);
    let cms1_log = log_of("cms1");
    assert!(
        cms1_log.contains("cmserver@h1.crt"),
        "cms1 loads cmserver@h1.crt: {cms1_log}"
    );

    // One host's certificate speaking for another host (a stolen key): h2's agent
    // certificate reporting for h1, and h2's GTM, CN and CMServer certificates speaking
    // for gtm1, cn1 and cms1 (all on h1). Refused by every CMServer, naming both hosts,
    // before the request is read.
    let as_h2 = |role| -> Result<TlsMaterial> {
        TlsMaterial::load(&c.cfg, role, Some("h2"))?.context("tls is on")
    };
    let (gtm_cert, cn_cert, cms_cert) = (
        as_h2(CertRole::Gtm)?,
        as_h2(CertRole::Cn)?,
        as_h2(CertRole::CmServer)?,
    );
    for ep in c.cfg.cm_server_endpoints() {
        let report = cm_server_as(&agent, &ep)
            .await?
            .report(AgentReport {
                host: "h1".into(),
                ..Default::default()
            })
            .await
            .map(|_| ());
        let renew = cm_server_as(&gtm_cert, &ep)
            .await?
            .renew_gtm_lease(RenewGtmLeaseRequest {
                instance: "gtm1".into(),
                gtm_term: 0,
            })
            .await
            .map(|_| ());
        let sync = cm_server_as(&cn_cert, &ep)
            .await?
            .cn_sync(CnSyncRequest {
                cn: "cn1".into(),
                ..Default::default()
            })
            .await
            .map(|_| ());
        let state = cm_server_as(&cms_cert, &ep)
            .await?
            .sync_state(SyncStateRequest {
                from: "cms1".into(),
                probe: true,
                ..Default::default()
            })
            .await
            .map(|_| ());
        for (what, r) in [
            ("agent report", report),
            ("GTM lease", renew),
            ("CnSync", sync),
            ("SyncState", state),
        ] {
            match r {
                Err(s) if s.code() == tonic::Code::PermissionDenied => {
                    let m = s.message();
                    assert!(m.contains("\"h2\"") && m.contains("\"h1\""), "{what}: {m}");
                }
                other => bail!("{ep}: {what} with h2's certificate for an h1 instance: {other:?}"),
            }
        }
    }
    mpp_ha_tests::wait_for(
        "the CMServer's log of the refusal",
        Duration::from_secs(10),
        || {
            let logged = ["cms1", "cms2"]
                .iter()
                .all(|cms| log_of(cms).contains("speaking for another"));
            async move { Ok(logged.then_some(())) }
        },
    )
    .await?;

    // A host-less (legacy) agent certificate of the cluster CA still gets through the
    // certificate check: a dir made before certificates named hosts keeps working.
    // It names an unknown host, so the report is refused after the check and changes
    // nothing.
    let (cert, key) = ca.issue(CertRole::Agent, &opts)?;
    let legacy_dir = c.dir.path().join("legacy-tls");
    std::fs::create_dir_all(&legacy_dir)?;
    std::fs::copy(dir.join("ca.crt"), legacy_dir.join("ca.crt"))?;
    std::fs::write(legacy_dir.join("agent.crt"), cert)?;
    std::fs::write(legacy_dir.join("agent.key"), key)?;
    let legacy = TlsMaterial::load_dir_for(&legacy_dir, CertRole::Agent, Some("h1"))?;
    assert_eq!(legacy.host, None, "fell back to agent.crt");
    for ep in c.cfg.cm_server_endpoints() {
        let mut client = cm_server_as(&legacy, &ep).await?;
        match client
            .report(AgentReport {
                host: "no-such-host".into(),
                ..Default::default()
            })
            .await
        {
            Err(s) if s.code() == tonic::Code::InvalidArgument => {
                assert!(s.message().contains("no-such-host"), "{}", s.message())
            }
            other => bail!("{ep}: a legacy agent certificate: {other:?}"),
        }
    }

    // Answers come at once: 20 calls in a row on one connection to a CMServer and to a
    // CN. A small answer on a socket without TCP_NODELAY waits for the ACK of the one
    // before it, which the client delays by ~40 ms: every CnSync and CN-to-CN call of a
    // DDL, and every agent report, took ~40 ms more.
    let operator = TlsMaterial::load(&c.cfg, CertRole::Operator, None)?.context("tls is on")?;
    let cms_ep = &c.cfg.cm_server_endpoints()[0];
    let cms = cm_server_as(&operator, cms_ep).await?;
    let cms_calls = round_trips(20, || {
        let mut cms = cms.clone();
        async move {
            cms.get_cluster_status(ClusterStatusRequest {}).await?;
            Ok(())
        }
    })
    .await?;
    let cn1 = c.cfg.cns.iter().find(|n| n.name == "cn1").context("cn1")?;
    let cn_ep = format!("{}:{}", c.cfg.address_of(cn1), cn1.rpc_port());
    let channel = ha_common::tls::endpoint_with(
        Some(&cn_cert),
        &cn_ep,
        CertRole::Cn,
        Duration::from_secs(2),
    )?
    .timeout(Duration::from_secs(3))
    .connect()
    .await?;
    let cn = CoordinatorClient::new(channel);
    let cn_calls = round_trips(20, || {
        let mut cn = cn.clone();
        async move {
            cn.status(CnStatusRequest::default()).await?;
            Ok(())
        }
    })
    .await?;
    for (who, calls) in [("CMServer", cms_calls), ("CN", cn_calls)] {
        let slow = calls
            .iter()
            .filter(|d| **d >= Duration::from_millis(35))
            .count();
        assert!(
            slow < 10,
            "{who}: {slow} of 20 calls took 35 ms or more: {calls:?}"
        );
    }

    // Nothing changed: same primary, same term.
    let after = snapshot(&c)?;
    assert_eq!(before, after, "refused requests changed the cluster");
    Ok(())
}
