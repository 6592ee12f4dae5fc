//! Bad input to cm_ctl and cm_server: a broken config, a bad flag, a corrupt state
//! file, no CMServer to talk to. Each is one clear error line and a non-zero exit;
//! nothing is started.

use mpp_ha_tests::{local_config_text, run_bin, CmdOutput, TestDir};

const PORT_BASE: u16 = 23500;

fn write(dir: &TestDir, name: &str, text: &str) -> String {
    let p = dir.path().join(name);
    std::fs::write(&p, text).unwrap();
    p.display().to_string()
}

fn assert_fails_naming(out: &CmdOutput, needles: &[&str], what: &str) {
    assert!(!out.success, "{what}: must fail, got {out:?}");
    let err = out.stderr.trim();
    for n in needles {
        assert!(err.contains(n), "{what}: error must name {n:?}: {err}");
    }
}

#[test]
fn cluster_bad_configs_are_refused_by_cm_ctl_and_cm_server() {
    let dir = TestDir::new("cluster-config-errors");
    let base = dir.path().join("cluster");
    let good = local_config_text(PORT_BASE, &base);
    let gtm1_port = format!("port = {}", PORT_BASE + 701);
    assert!(good.contains(&gtm1_port));
    let cases = [
        (
            "bad port",
            good.replacen(&gtm1_port, "port = 70000", 1),
            vec!["gtm.instance[0] (gtm1).port", "70000"],
        ),
        (
            "unknown host",
            good.replacen("host = \"h3\"", "host = \"h9\"", 1),
            vec!["host", "\"h9\""],
        ),
        (
            "missing key",
            good.replacen("os_user = \"postgres\"", "", 1),
            vec!["os_user"],
        ),
    ];
    for (what, text, needles) in cases {
        let path = write(&dir, "bad.toml", &text);
        let mut needles = needles.clone();
        needles.push("bad.toml");
        let out = run_bin("cm_ctl", &["status", "--config", &path]);
        assert_fails_naming(&out, &needles, &format!("cm_ctl status, {what}"));
        assert_eq!(
            out.stderr.trim().lines().count(),
            1,
            "one line: {}",
            out.stderr
        );
        let out = run_bin("cm_server", &["--config", &path, "--node", "cms1"]);
        assert_fails_naming(&out, &needles, &format!("cm_server, {what}"));
    }
    assert!(!base.exists(), "a bad config must create nothing");
}

#[test]
fn cluster_cm_ctl_without_a_cmserver_names_the_endpoints_tried() {
    let dir = TestDir::new("cluster-no-cmserver");
    // CMServer ports in this test's band that nothing listens on (the default ones,
    // PORT_BASE + 601/602, fall into another test's range).
    let text = local_config_text(PORT_BASE, &dir.path().join("cluster"))
        .replacen(&format!("port = {}", PORT_BASE + 601), "port = 23800", 1)
        .replacen(&format!("port = {}", PORT_BASE + 602), "port = 23801", 1);
    let path = write(&dir, "cluster.toml", &text);
    let out = run_bin("cm_ctl", &["status", "--config", &path]);
    let (cms1, cms2) = ("127.0.0.1:23800", "127.0.0.1:23801");
    assert_fails_naming(&out, &["no primary CMServer", cms1, cms2], "status");
    assert_eq!(out.stderr.trim().lines().count(), 1, "{}", out.stderr);

    let out = run_bin("cm_ctl", &["stop", "--instance", "nope", "--config", &path]);
    assert_fails_naming(&out, &["unknown instance \"nope\""], "stop unknown");

    let out = run_bin("cm_ctl", &["status", "--bogus-flag", "--config", &path]);
    assert_fails_naming(&out, &["--bogus-flag"], "bad flag");
}

#[test]
fn cluster_cm_server_refuses_a_corrupt_state_file() {
    let dir = TestDir::new("cluster-corrupt-state");
    let base = dir.path().join("cluster");
    let path = write(&dir, "cluster.toml", &local_config_text(PORT_BASE, &base));
    let state_dir = base.join("cms2");
    std::fs::create_dir_all(&state_dir).unwrap();
    let state = state_dir.join("cluster_state");
    std::fs::write(&state, b"CMST not a real state file at all").unwrap();
    let out = run_bin("cm_server", &["--config", &path, "--node", "cms2"]);
    let name = state.display().to_string();
    assert_fails_naming(&out, &[&name], "corrupt state");

    let out = run_bin("cm_server", &["--config", &path, "--node", "gtm1"]);
    assert_fails_naming(&out, &["\"gtm1\" is not a [[cm_server]]"], "wrong node");
}

/// With TLS on, a CMServer that accepts TCP but never answers (hung, SIGSTOPped: its
/// kernel still completes the TCP handshake) does not hang cm_ctl in the TLS
/// handshake: the connect timeout bounds it, and cm_ctl names both endpoints it tried.
#[test]
fn cluster_cm_ctl_gives_up_on_a_hung_cmserver_with_tls() {
    use std::time::{Duration, Instant};
    let dir = TestDir::new("cluster-hung-cmserver-tls");
    let text = mpp_ha_tests::with_tls(local_config_text(PORT_BASE, &dir.path().join("cluster")))
        .replacen(&format!("port = {}", PORT_BASE + 601), "port = 23802", 1)
        .replacen(&format!("port = {}", PORT_BASE + 602), "port = 23803", 1);
    // Makes the cluster's certificates, as `cm_ctl local up` does.
    let path = mpp_ha_tests::write_config(&dir, &text);
    // Two "hung CMServers": accept, hold, never write.
    for port in [23802u16, 23803] {
        let l = std::net::TcpListener::bind(("127.0.0.1", port)).expect("bind a hung CMServer");
        std::thread::spawn(move || {
            let mut held = Vec::new();
            while let Ok((c, _)) = l.accept() {
                held.push(c);
            }
        });
    }
    let started = Instant::now();
    let mut child = std::process::Command::new(mpp_ha_tests::bin("cm_ctl"))
        .args(["status", "--config", &path.display().to_string()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run cm_ctl");
    let deadline = started + Duration::from_secs(30);
    while child.try_wait().expect("wait for cm_ctl").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("cm_ctl status hung on CMServers that never answer the TLS handshake");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let took = started.elapsed();
    let out = child.wait_with_output().expect("cm_ctl output");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "status must fail: {stderr}");
    for n in ["no primary CMServer", "127.0.0.1:23802", "127.0.0.1:23803"] {
        assert!(stderr.contains(n), "the error names {n:?}: {stderr}");
    }
    assert!(
        took < Duration::from_secs(15),
        "gave up after {took:?}, a few connect timeouts expected"
    );
    eprintln!(
        "cm_ctl gave up on two hung CMServers in {took:?}: {}",
        stderr.trim()
    );
}
