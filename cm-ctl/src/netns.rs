//! `cm_ctl local --netns PREFIX`: each pretend host in its own Linux network namespace
//! (`PREFIX-<host>`, the host's address on its `eth0`), joined by a bridge (`PREFIXbr`,
//! address `.254` of the hosts' /24) in the namespace that ran `local up`, so that
//! links can be cut for real (see the test harness). Made with `ip`; needs root.

use std::net::Ipv4Addr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::path::PathBuf;
use std::process::Command;

use ha_common::ClusterConfig;

use crate::error::CtlError;

/// Linux limits interface names to 15 bytes (IFNAMSIZ - 1).
const MAX_IFNAME: usize = 15;

/// The planned (or existing) network of a netns-mode local cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Network {
    pub prefix: String,
    /// (host name, its address) in config order.
    pub hosts: Vec<(String, Ipv4Addr)>,
}

impl Network {
    /// Checks that `prefix` and the config's hosts can make a network: a short
    /// alphanumeric prefix, distinct IPv4 host addresses in one /24, none of them the
    /// bridge's `.254`, interface names within Linux's 15 bytes.
    pub fn plan(prefix: &str, cfg: &ClusterConfig) -> Result<Network, CtlError> {
        let bad = |why: String| CtlError::Other(format!("--netns {prefix:?}: {why}"));
        if prefix.is_empty() || !prefix.chars().all(|c| c.is_ascii_alphanumeric()) {
            return Err(bad("the prefix must be letters and digits only".into()));
        }
        let mut hosts = Vec::new();
        for h in &cfg.hosts {
            let addr: Ipv4Addr = h.address.parse().map_err(|_| {
                bad(format!(
                    "host {} in {}: address {:?} is not an IPv4 address",
                    h.name,
                    cfg.source.display(),
                    h.address
                ))
            })?;
            if addr.is_loopback() || addr.octets()[3] == 0 || addr.octets()[3] >= 254 {
                return Err(bad(format!(
                    "host {} in {}: address {addr} cannot be a host on the bridge \
                     (each host needs its own address x.y.z.1-253, e.g. 10.77.0.1)",
                    h.name,
                    cfg.source.display()
                )));
            }
            if let Some((other, _)) = hosts.iter().find(|(_, a)| *a == addr) {
                return Err(bad(format!(
                    "hosts {other} and {} share address {addr} in {}",
                    h.name,
                    cfg.source.display()
                )));
            }
            hosts.push((h.name.clone(), addr));
        }
        let net = Network {
            prefix: prefix.to_owned(),
            hosts,
        };
        if let Some((first, a)) = net.hosts.first() {
            for (h, b) in &net.hosts {
                if a.octets()[..3] != b.octets()[..3] {
                    return Err(bad(format!(
                        "hosts {first} ({a}) and {h} ({b}) are not in one /24"
                    )));
                }
            }
        }
        for name in net.interface_names() {
            if name.len() > MAX_IFNAME {
                return Err(bad(format!(
                    "interface name {name:?} is longer than {MAX_IFNAME} bytes: use a shorter prefix"
                )));
            }
        }
        Ok(net)
    }

    /// `PREFIX-<host>`: the host's network namespace.
    pub fn namespace(&self, host: &str) -> String {
        format!("{}-{host}", self.prefix)
    }

    /// `/run/netns/PREFIX-<host>`.
    pub fn namespace_path(&self, host: &str) -> PathBuf {
        PathBuf::from("/run/netns").join(self.namespace(host))
    }

    /// `PREFIXbr`: the bridge joining the hosts.
    pub fn bridge(&self) -> String {
        format!("{}br", self.prefix)
    }

    /// `PREFIX<host>`: the bridge's end of the host's link (setting it down cuts the
    /// host off from every other host and from the bridge's namespace).
    pub fn link(&self, host: &str) -> String {
        format!("{}{host}", self.prefix)
    }

    /// The bridge's own address: `.254` of the hosts' /24.
    pub fn bridge_address(&self) -> Option<Ipv4Addr> {
        let [a, b, c, _] = self.hosts.first()?.1.octets();
        Some(Ipv4Addr::new(a, b, c, 254))
    }

    pub fn address(&self, host: &str) -> Option<Ipv4Addr> {
        self.hosts.iter().find(|(h, _)| h == host).map(|(_, a)| *a)
    }

    fn interface_names(&self) -> Vec<String> {
        let mut names = vec![self.bridge()];
        names.extend(self.hosts.iter().map(|(h, _)| self.link(h)));
        names
    }

    /// Creates whatever is missing: the bridge (up, with its address), and for each
    /// host its namespace (loopback up) with a veth pair (`eth0` inside, with the
    /// host's address; the other end on the bridge).
    pub fn create(&self) -> Result<(), CtlError> {
        let br = self.bridge();
        if !link_exists(&br) {
            ip(&["link", "add", &br, "type", "bridge"])?;
            if let Some(a) = self.bridge_address() {
                ip(&["addr", "add", &format!("{a}/24"), "dev", &br])?;
            }
        }
        ip(&["link", "set", &br, "up"])?;
        for (host, addr) in &self.hosts {
            let ns = self.namespace(host);
            if !self.namespace_path(host).exists() {
                ip(&["netns", "add", &ns])?;
            }
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
            let link = self.link(host);
            if !link_exists(&link) {
                ip(&[
                    "link", "add", &link, "type", "veth", "peer", "name", "eth0", "netns", &ns,
                ])?;
                ip(&[
                    "-n",
                    &ns,
                    "addr",
                    "add",
                    &format!("{addr}/24"),
                    "dev",
                    "eth0",
                ])?;
            }
            ip(&["link", "set", &link, "master", &br, "up"])?;
            ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
        }
        Ok(())
    }

    /// Whether every host's namespace exists.
    pub fn exists(&self) -> bool {
        self.hosts
            .iter()
            .all(|(h, _)| self.namespace_path(h).exists())
    }

    /// Removes the hosts' links, namespaces and the bridge. Returns what could not
    /// be removed.
    pub fn remove(&self) -> Vec<String> {
        let mut failed = Vec::new();
        for (h, _) in &self.hosts {
            // Explicitly: a namespace outlives its name while sockets of its processes
            // (orphaned TCP connections retrying) still refer to it, and its veth pair
            // with it.
            let link = self.link(h);
            if link_exists(&link) {
                if let Err(e) = ip(&["link", "delete", &link]) {
                    failed.push(e.to_string());
                }
            }
            if self.namespace_path(h).exists() {
                if let Err(e) = ip(&["netns", "delete", &self.namespace(h)]) {
                    failed.push(e.to_string());
                }
            }
        }
        if link_exists(&self.bridge()) {
            if let Err(e) = ip(&["link", "delete", &self.bridge()]) {
                failed.push(e.to_string());
            }
        }
        failed
    }
}

fn link_exists(name: &str) -> bool {
    Command::new("ip")
        .args(["link", "show", "dev", name])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Runs `ip ARGS`; the error names the command and what `ip` said.
pub fn ip(args: &[&str]) -> Result<(), CtlError> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| CtlError::Other(format!("cannot run `ip` (iproute2): {e}")))?;
    if out.status.success() {
        return Ok(());
    }
    Err(CtlError::Other(format!(
        "`ip {}` failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    )))
}

/// An open network namespace, to enter in a child before exec (see
/// [`crate::processes::spawn_detached`]) or in a thread of our own.
#[derive(Debug)]
pub struct Namespace {
    file: std::fs::File,
}

impl Namespace {
    pub fn open(path: &std::path::Path) -> Result<Namespace, CtlError> {
        let file = std::fs::File::open(path).map_err(|e| {
            CtlError::io(
                "open network namespace (create it with `cm_ctl local up --netns`)",
                path,
                e,
            )
        })?;
        Ok(Namespace { file })
    }

    /// Moves the calling thread (only it) into the namespace: sockets it opens from
    /// now on live there.
    pub fn enter(&self) -> std::io::Result<()> {
        nix::sched::setns(self.file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(std::io::Error::from)
    }

    /// The open file's descriptor, for a forked child that enters it with
    /// [`enter_fd`] (valid while `self` lives).
    pub fn raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

/// [`Namespace::enter`] by descriptor: for a `pre_exec` hook, which cannot borrow.
pub fn enter_fd(fd: RawFd) -> std::io::Result<()> {
    // SAFETY: the caller keeps the `Namespace` owning `fd` open across the call.
    let fd = unsafe { BorrowedFd::borrow_raw(fd) };
    nix::sched::setns(fd, nix::sched::CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    /// The shipped local.toml with its hosts' addresses replaced by `addrs`.
    fn cfg(addrs: &[&str]) -> ClusterConfig {
        let mut next = addrs.iter();
        let text: String = include_str!("../../configs/local.toml")
            .lines()
            .map(|l| match l.starts_with("address = ") {
                true => format!("address = \"{}\"\n", next.next().unwrap_or(&"10.77.0.99")),
                false => format!("{l}\n"),
            })
            .collect();
        ClusterConfig::parse(&text, Path::new("t.toml")).expect("valid test config")
    }

    #[test]
    fn plan_names_every_piece_after_the_prefix() {
        let n = Network::plan("mpp", &cfg(&["10.77.0.1", "10.77.0.2", "10.77.0.3"])).unwrap();
        assert_eq!(n.namespace("h1"), "mpp-h1");
        assert_eq!(n.bridge(), "mppbr");
        assert_eq!(n.link("h2"), "mpph2");
        assert_eq!(n.bridge_address(), Some(Ipv4Addr::new(10, 77, 0, 254)));
        assert_eq!(n.address("h2"), Some(Ipv4Addr::new(10, 77, 0, 2)));
        assert_eq!(n.hosts.len(), 3);
    }

    #[test]
    fn plan_refuses_what_cannot_be_a_bridged_network() {
        let err = |addrs: &[&str], prefix: &str| {
            Network::plan(prefix, &cfg(addrs)).unwrap_err().to_string()
        };
        assert!(err(&["127.0.0.1", "127.0.0.1"], "mpp").contains("cannot be a host"));
        assert!(err(&["10.77.0.1", "10.77.0.2", "10.77.0.1"], "mpp").contains("share address"));
        assert!(err(&["10.77.0.1", "10.78.0.2", "10.77.0.3"], "mpp").contains("one /24"));
        assert!(err(&["10.77.0.1", "10.77.0.254"], "mpp").contains("cannot be a host"));
        assert!(err(&["localhost", "10.77.0.2", "10.77.0.3"], "mpp").contains("not an IPv4"));
        assert!(err(&["10.77.0.1", "10.77.0.2", "10.77.0.3"], "a-b").contains("letters and digits"));
        assert!(err(
            &["10.77.0.1", "10.77.0.2", "10.77.0.3"],
            "averyverylongprefix"
        )
        .contains("longer than 15"));
    }
}
