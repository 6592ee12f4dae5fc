//! Real network faults for local clusters run with `cm_ctl local up --netns`: each
//! host in its own network namespace on a bridge; cutting a host's link, cutting two
//! hosts from each other (nftables in both), dropping one direction, healing; and
//! running test clients inside a host's namespace. Needs root, `ip` and `nft`.

use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{bail, Context, Result};
pub use cm_ctl::netns::{Namespace, Network};

/// Every namespace, bridge and link the harness makes starts with this.
pub const PREFIX_ROOT: &str = "mpph";

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A fresh network prefix for this process (`mpph<pid><n>`) and the /24 its hosts
/// use (`10.x.y.0`, drawn from the same numbers so that concurrent test runs in one
/// namespace do not overlap).
pub fn fresh_prefix() -> (String, [u8; 3]) {
    let n = NEXT.fetch_add(1, Ordering::Relaxed) % 10;
    let pid = std::process::id();
    let key = pid.wrapping_mul(10).wrapping_add(n);
    let b = 64 + ((key >> 8) % 160) as u8;
    let c = (key & 0xff) as u8;
    (format!("{PREFIX_ROOT}{pid}{n}"), [10, b, c])
}

/// The pid in a harness prefix (`mpph<pid><n>...`), if it is one.
fn owner_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(PREFIX_ROOT)?;
    let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
    if digits.len() < 2 {
        return None;
    }
    digits[..digits.len() - 1].parse().ok()
}

/// Removes namespaces and bridges left behind by harness runs whose process is gone
/// (a test killed before its guard ran).
pub fn sweep_leftovers() {
    let dead = |name: &str| owner_pid(name).is_some_and(|pid| !crate::pid_alive(pid));
    if let Ok(entries) = std::fs::read_dir("/run/netns") {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if dead(&name) {
                let _ = cm_ctl::netns::ip(&["netns", "delete", &name]);
            }
        }
    }
    let out = Command::new("ip")
        .args(["-o", "link", "show", "type", "bridge"])
        .output();
    if let Ok(out) = out {
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            // "12: mpph1234br: <...>"
            let Some(name) = line.split(':').nth(1).map(str::trim) else {
                continue;
            };
            let name = name.split('@').next().unwrap_or(name);
            if name.ends_with("br") && dead(name) {
                let _ = cm_ctl::netns::ip(&["link", "delete", name]);
            }
        }
    }
}

/// Runs `nft -f -` with `script` inside namespace `ns`.
fn nft_in(ns: &str, script: &str) -> Result<()> {
    use std::io::Write;
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns, "nft", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("run nft (apt-get install nftables)")?;
    child
        .stdin
        .take()
        .context("nft stdin")?
        .write_all(script.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "nft in {ns} failed: {}\n{script}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Network faults on a netns-mode cluster's [`Network`].
pub trait Faults {
    fn net(&self) -> &Network;

    /// Cuts `host` off from every other host (and from the test's own namespace):
    /// the bridge's end of its link goes down. Its own processes still reach each
    /// other on its address.
    fn isolate(&self, host: &str) -> Result<()> {
        Ok(cm_ctl::netns::ip(&[
            "link",
            "set",
            &self.net().link(host),
            "down",
        ])?)
    }

    /// Drops every packet between `a` and `b` (both directions, in both namespaces);
    /// other hosts still reach both.
    fn cut(&self, a: &str, b: &str) -> Result<()> {
        self.drop_one_way(a, b)?;
        self.drop_one_way(b, a)
    }

    /// Drops the packets `from` sends to `to` (only that direction), in `from`'s
    /// namespace (output) and `to`'s (input).
    fn drop_one_way(&self, from: &str, to: &str) -> Result<()> {
        let net = self.net();
        let (fa, ta) = (address(net, from)?, address(net, to)?);
        let table = format!("mpp_drop_{from}_{to}");
        nft_in(
            &net.namespace(from),
            &format!(
                "table ip {table} {{\n  chain out {{\n    type filter hook output priority 0;\n    ip daddr {ta} drop\n  }}\n}}\n"
            ),
        )?;
        nft_in(
            &net.namespace(to),
            &format!(
                "table ip {table} {{\n  chain inp {{\n    type filter hook input priority 0;\n    ip saddr {fa} drop\n  }}\n}}\n"
            ),
        )
    }

    /// Undoes [`Faults::isolate`] of `host`.
    fn rejoin(&self, host: &str) -> Result<()> {
        Ok(cm_ctl::netns::ip(&[
            "link",
            "set",
            &self.net().link(host),
            "up",
        ])?)
    }

    /// Undoes [`Faults::drop_one_way`] of `from` to `to`.
    fn undrop(&self, from: &str, to: &str) -> Result<()> {
        let net = self.net();
        let table = format!("mpp_drop_{from}_{to}");
        for h in [from, to] {
            nft_in(&net.namespace(h), &format!("delete table ip {table}\n"))?;
        }
        Ok(())
    }

    /// Undoes [`Faults::cut`] of `a` and `b`.
    fn uncut(&self, a: &str, b: &str) -> Result<()> {
        self.undrop(a, b)?;
        self.undrop(b, a)
    }

    /// Undoes every fault: every link up, every drop table removed.
    fn heal(&self) -> Result<()> {
        let net = self.net();
        for (h, _) in &net.hosts {
            cm_ctl::netns::ip(&["link", "set", &net.link(h), "up"])?;
            let ns = net.namespace(h);
            let out = Command::new("ip")
                .args(["netns", "exec", &ns, "nft", "list", "tables"])
                .output()
                .context("run nft")?;
            for line in String::from_utf8_lossy(&out.stdout).lines() {
                if let Some(t) = line.strip_prefix("table ip ") {
                    if t.starts_with("mpp_drop_") {
                        nft_in(&ns, &format!("delete table ip {t}\n"))?;
                    }
                }
            }
        }
        Ok(())
    }
}

fn address(net: &Network, host: &str) -> Result<std::net::Ipv4Addr> {
    net.address(host)
        .with_context(|| format!("host {host} is not in the network"))
}

/// Runs `make()`'s future on a thread of its own inside `host`'s namespace (a
/// single-threaded runtime there: every socket it opens lives in that namespace);
/// `None` runs it in the test's own namespace.
pub async fn in_host<T, F, Fut>(net: &Network, host: Option<&str>, make: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<T>>,
{
    crate::workload::Reach::host(net, host).run(make).await
}

/// Starts `make()`'s future on a thread inside `host`'s namespace (`None`: the
/// test's own) and returns at once; join the handle for its result.
pub fn spawn_in_host<T, F, Fut>(
    net: &Network,
    host: Option<&str>,
    make: F,
) -> Result<std::thread::JoinHandle<Result<T>>>
where
    T: Send + 'static,
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<T>>,
{
    crate::workload::Reach::host(net, host).spawn(make)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_name_their_owner_and_fit_interface_names() {
        let (p, net) = fresh_prefix();
        assert_eq!(owner_pid(&p), Some(std::process::id()));
        assert_eq!(owner_pid(&format!("{p}-h1")), Some(std::process::id()));
        assert_eq!(owner_pid(&format!("{p}br")), Some(std::process::id()));
        assert_eq!(owner_pid("mpp-partitions"), None);
        assert!(format!("{p}br").len() <= 15, "{p}");
        assert_eq!(net[0], 10);
        assert!(net[1] >= 64);
    }
}
