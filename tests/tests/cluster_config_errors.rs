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
