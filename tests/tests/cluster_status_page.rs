//! The CMServer's status page in a real browser (headless Chromium) on a real local
//! cluster: after dn1's primary host is lost and dn1_h2 (and gtm2) promoted, the page
//! served at `/` of the primary CMServer shows every instance with its role, the new
//! term, and the failover with its reason and duration; a screenshot is kept in the
//! test's artefacts (`target/test-artefacts/cluster_status_page/status.png`).

#[path = "failover_support.rs"]
mod failover_support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use failover_support::*;
use ha_common::metrics::http_get;
use mpp_ha_tests::{kill9, pid_alive, processes_under, wait_for, LocalCluster};

const PORT_BASE: u16 = 47000;
const CHROMIUM: &str = "/usr/bin/chromium";
/// One Chromium run (start, load, 6 s of page time, dump): generous for a loaded machine.
const CHROMIUM_TIMEOUT: Duration = Duration::from_secs(90);

/// Where this test leaves what a human may want to look at after it (kept, unlike the
/// test's own directory): `$MPP_HA_TEST_ARTEFACTS` or `target/test-artefacts`, per test.
fn artefacts_dir(test: &str) -> PathBuf {
    let root = std::env::var_os("MPP_HA_TEST_ARTEFACTS")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/test-artefacts"));
    let dir = root.join(test);
    std::fs::create_dir_all(&dir).expect("create the artefacts dir");
    dir
}

/// Runs headless Chromium on `url` with `extra` arguments and a fresh profile under
/// `work`; its stdout (the DOM with `--dump-dom`). Bounded: on timeout the browser's
/// process group is killed, and any of its processes left (they carry the profile dir
/// on their command line) are killed too.
fn chromium(work: &Path, url: &str, extra: &[&str]) -> Result<String> {
    if !Path::new(CHROMIUM).exists() {
        bail!(
            "{CHROMIUM} is missing: this test needs headless Chromium \
             (as root: apt-get install -y chromium; scripts/check-machine.sh does it)"
        );
    }
    let profile = work.join(format!("chromium-profile-{}", extra.len()));
    let _ = std::fs::remove_dir_all(&profile);
    std::fs::create_dir_all(&profile)?;
    let out_path = work.join("chromium.out");
    let err_path = work.join("chromium.err");
    let mut args = vec![
        "--headless".to_owned(),
        "--no-sandbox".to_owned(),
        "--disable-gpu".to_owned(),
        "--disable-quic".to_owned(),
        "--no-first-run".to_owned(),
        "--disable-background-networking".to_owned(),
        "--disable-component-update".to_owned(),
        "--disable-sync".to_owned(),
        format!("--user-data-dir={}", profile.display()),
        // Page time: the first fetch of /cluster and two refreshes (every 2 s).
        "--virtual-time-budget=6000".to_owned(),
    ];
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    args.push(url.to_owned());
    let mut child = {
        use std::os::unix::process::CommandExt;
        Command::new(CHROMIUM)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&out_path)?)
            .stderr(std::fs::File::create(&err_path)?)
            // Its own process group, so that a hung browser is killed with its children.
            .process_group(0)
            .spawn()
            .with_context(|| format!("start {CHROMIUM}"))?
    };
    let pid = child.id();
    let deadline = Instant::now() + CHROMIUM_TIMEOUT;
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break Some(s);
        }
        if Instant::now() >= deadline {
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    if status.is_none() {
        if let Ok(raw) = i32::try_from(pid) {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(raw),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let _ = child.wait();
    }
    for (p, _) in processes_under(&profile) {
        if pid_alive(p) {
            kill9(p);
        }
    }
    let stderr = std::fs::read_to_string(&err_path).unwrap_or_default();
    let tail: String = stderr.lines().rev().take(15).collect::<Vec<_>>().join("\n");
    match status {
        None => bail!("chromium did not finish within {CHROMIUM_TIMEOUT:?}; stderr:\n{tail}"),
        Some(s) if !s.success() => bail!("chromium exited with {s}; stderr:\n{tail}"),
        Some(_) => Ok(std::fs::read_to_string(&out_path)?),
    }
}

/// The `<tr ...>` element of the dumped DOM whose opening tag contains `marker`, and
/// every such row after it (their text, tags included).
fn rows_with<'a>(dom: &'a str, marker: &str) -> Vec<&'a str> {
    let mut out = Vec::new();
    let mut rest = dom;
    while let Some(i) = rest.find("<tr ") {
        let tail = &rest[i..];
        let end = tail.find("</tr>").map_or(tail.len(), |e| e + 5);
        let row = &tail[..end];
        let open_end = row.find('>').unwrap_or(row.len());
        if row[..open_end].contains(marker) {
            out.push(row);
        }
        rest = &tail[end..];
    }
    out
}

/// The URL of the CMServer that answers `/primary` 200.
async fn primary_cms_url(c: &LocalCluster) -> Result<String> {
    wait_for("a primary CMServer", Duration::from_secs(20), || async {
        let s = c.status()?;
        for row in s["cm_servers"].as_array().into_iter().flatten() {
            let url = row["metrics_url"].as_str().unwrap_or("");
            let Some(addr) = url.strip_prefix("http://") else {
                continue;
            };
            if let Ok((200, _)) = http_get(addr, "/primary", Duration::from_secs(5)).await {
                return Ok(Some(url.to_owned()));
            }
        }
        Ok(None)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_page_shows_instances_term_and_the_failover() -> Result<()> {
    let c = LocalCluster::new("cluster-status-page", PORT_BASE);
    c.up(120)?;

    // h1 is lost: its agent first (so nothing restarts), then dn1's primary and gtm1.
    let agent = c.recorded_pid("cm_agent-h1").expect("agent h1 recorded");
    let pm = c.postmaster_pid("dn1_h1").expect("dn1_h1 runs");
    let gtm1 = c.gtm_pid("gtm1").expect("gtm1 runs");
    kill9(agent);
    kill9(pm);
    kill9(gtm1);
    let s = wait_layout(
        &c,
        &[("dn1_h2", "primary", "normal"), ("gtm2", "primary", "")],
        Duration::from_secs(30),
    )
    .await?;
    let term = s["term"].as_u64().context("term in status")?;
    assert!(term >= 2, "a failover raises the term: {s}");

    let url = primary_cms_url(&c).await?;
    let (code, body) = http_get(
        url.trim_start_matches("http://"),
        "/",
        Duration::from_secs(5),
    )
    .await?;
    assert_eq!(code, 200, "{body}");
    assert!(
        body.contains("<title>mpp-ha cluster status</title>"),
        "{body}"
    );

    let work = c.dir.path().to_path_buf();
    let page = format!("{url}/");
    let dom = chromium(&work, &page, &["--dump-dom"])?;
    let keep = artefacts_dir("cluster_status_page");
    std::fs::write(keep.join("status.html"), &dom)?;

    // Every instance of the config has a row with its role.
    for r in c.cfg.all_refs() {
        let name = &r.instance.name;
        let rows = rows_with(&dom, &format!("data-instance=\"{name}\""));
        assert_eq!(rows.len(), 1, "{name} has one row in the page:\n{dom}");
    }
    let role_in_page = |name: &str, role: &str| {
        rows_with(&dom, &format!("data-instance=\"{name}\""))
            .first()
            .is_some_and(|r| r.contains(&format!(">{role}</td>")))
    };
    for (name, role) in [
        ("dn1_h2", "primary"),
        ("dn1_h1", "standby"),
        ("gtm2", "primary"),
        ("gtm1", "standby"),
        ("dn2_h2", "primary"),
    ] {
        assert!(
            role_in_page(name, role),
            "{name} not {role} in the page:\n{dom}"
        );
    }
    // The term as of the load (it may have risen since `status`, never fallen).
    let shown: u64 = dom
        .split_once("id=\"term\">term ")
        .and_then(|(_, r)| r.split('<').next())
        .and_then(|t| t.parse().ok())
        .with_context(|| format!("no term in the page:\n{dom}"))?;
    assert!(shown >= term, "page shows term {shown}, status said {term}");
    // The failover, with why and how long the primary had been lost.
    let changes = rows_with(&dom, "class=\"change\"");
    let dn1 = changes
        .iter()
        .find(|r| r.contains(">dn1<") && r.contains(">failover<"))
        .with_context(|| format!("no dn1 failover in the page:\n{dom}"))?;
    assert!(
        dn1.contains(">dn1_h1<") && dn1.contains(">dn1_h2<"),
        "from dn1_h1 to dn1_h2: {dn1}"
    );
    assert!(
        dn1.contains("primary dn1_h1 lost ("),
        "the reason is shown: {dn1}"
    );
    assert!(
        dn1.contains(" s</td>"),
        "the duration is shown in seconds: {dn1}"
    );
    assert!(
        changes
            .iter()
            .any(|r| r.contains(">gtm<") && r.contains(">gtm2<")),
        "the GTM failover is listed too:\n{dom}"
    );

    // A screenshot for humans (and a check that the page renders at all).
    let png = keep.join("status.png");
    let _ = std::fs::remove_file(&png);
    let shot = format!("--screenshot={}", png.display());
    chromium(&work, &page, &[&shot, "--window-size=1280,900"])?;
    let bytes = std::fs::read(&png).with_context(|| format!("no screenshot {}", png.display()))?;
    assert!(
        bytes.starts_with(b"\x89PNG") && bytes.len() > 10_000,
        "{} is not a rendered PNG ({} bytes)",
        png.display(),
        bytes.len()
    );
    eprintln!("status page screenshot: {}", png.display());
    drop(c);
    Ok(())
}
