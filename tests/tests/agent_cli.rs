//! `cm_agent` on bad input: one clear error line and a non-zero exit, nothing started.

use std::process::Command;

use mpp_ha_tests::{bin, local_config_text, write_config, TestDir};

fn run(args: &[&str]) -> (i32, String) {
    let out = Command::new(bin("cm_agent"))
        .args(args)
        .output()
        .expect("run cm_agent");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn agent_cli_missing_config_is_named() {
    let (code, err) = run(&["--config", "/nonexistent/mpp-ha.toml", "--node", "h1"]);
    assert_ne!(code, 0);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("/nonexistent/mpp-ha.toml"), "{err}");
}

#[test]
fn agent_cli_unknown_node_is_named_and_nothing_is_created() {
    let dir = TestDir::new("agent-cli");
    let base = dir.path().join("base");
    // write_config makes the DN password files under base/secrets, as `cm_ctl local
    // up` would: the agent must add nothing to what is there.
    let cfg = write_config(&dir, &local_config_text(26000, &base));
    let before = tree(dir.path());
    let (code, err) = run(&["--config", &cfg.display().to_string(), "--node", "h9"]);
    assert_ne!(code, 0);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains("\"h9\"") && err.contains("h1, h2, h3"),
        "{err}"
    );
    let after = tree(dir.path());
    let created: Vec<_> = after.difference(&before).collect();
    assert!(created.is_empty(), "a rejected agent created {created:?}");
}

/// Every path under `root` (bounded: a test dir holds a handful of files).
fn tree(root: &std::path::Path) -> std::collections::BTreeSet<std::path::PathBuf> {
    let mut out = std::collections::BTreeSet::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).expect("read test dir").flatten() {
            let p = e.path();
            if p.is_dir() {
                todo.push(p.clone());
            }
            out.insert(p);
        }
    }
    out
}

#[test]
fn agent_cli_bad_config_value_is_named() {
    let dir = TestDir::new("agent-cli-bad");
    let text = local_config_text(26000, dir.path()).replacen(
        "heartbeat_interval_ms = 1000",
        "heartbeat_interval_ms = 0",
        1,
    );
    let cfg = write_config(&dir, &text);
    let (code, err) = run(&["--config", &cfg.display().to_string(), "--node", "h1"]);
    assert_ne!(code, 0);
    assert!(err.contains("timing.heartbeat_interval_ms"), "{err}");
}

#[test]
fn agent_cli_missing_flag_fails() {
    let (code, err) = run(&["--config", "x.toml"]);
    assert_ne!(code, 0);
    assert!(err.contains("--node"), "{err}");
}
