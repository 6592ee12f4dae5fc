//! The config of a simulated cluster of N hosts: a CMServer pair, a GTM pair and
//! N×2/3 DN groups (primary, standby, secondary on three consecutive hosts).
//!
//! Every host gets its own loopback address (127.10.x.y), so DN ports repeat freely;
//! only the two CMServers listen (nothing listens on the DN or GTM ports: the
//! simulated agents report them, and a CMServer probing one from outside finds it
//! dead at once, as it would a lost host).

use std::fmt::Write;
use std::path::Path;

/// Name of host `i` (0-based).
pub fn host(i: usize) -> String {
    format!("h{}", i + 1)
}

/// Loopback address of host `i`.
pub fn address(i: usize) -> String {
    let n = i + 1;
    format!("127.{}.{}.{}", 10 + n / 65536, (n / 256) % 256, n % 256)
}

/// Where a DN group's three members live (host indexes): primary, standby, secondary.
pub fn placement(group: usize, hosts: usize) -> [usize; 3] {
    [group % hosts, (group + 1) % hosts, (group + 2) % hosts]
}

/// How many DN groups a cluster of `hosts` hosts gets.
pub fn groups(hosts: usize) -> usize {
    (hosts * 2 / 3).max(1)
}

/// Name of the DN member of `group` on host `h`.
pub fn member(group: usize, h: usize) -> String {
    format!("dn{}_{}", group + 1, host(h))
}

/// The config text (default timings) for `hosts` hosts; the CMServers listen on
/// `port_base + 1` and `port_base + 2` of hosts h1 and h2.
pub fn config_text(hosts: usize, port_base: u16, base_dir: &Path) -> String {
    let mut t = String::new();
    let _ = writeln!(
        t,
        "[cluster]\nname = \"scale{hosts}\"\nbase_dir = {:?}\nos_user = \"postgres\"\n[tls]\nenabled = false\n",
        base_dir.display().to_string()
    );
    for i in 0..hosts {
        let _ = writeln!(
            t,
            "[[host]]\nname = \"{}\"\naddress = \"{}\"\n",
            host(i),
            address(i)
        );
    }
    for (k, h) in [0usize, 1].iter().enumerate() {
        let _ = writeln!(
            t,
            "[[cm_server]]\nname = \"cms{}\"\nhost = \"{}\"\nport = {}\n",
            k + 1,
            host(*h),
            port_base + 1 + k as u16
        );
    }
    t.push_str("[gtm]\n\n");
    for (k, role) in ["primary", "standby"].iter().enumerate() {
        let _ = writeln!(
            t,
            "[[gtm.instance]]\nname = \"gtm{}\"\nhost = \"{}\"\nport = {}\nrole = \"{role}\"\n",
            k + 1,
            host(k),
            port_base + 11 + k as u16
        );
    }
    for g in 0..groups(hosts) {
        let _ = writeln!(t, "[[dn_group]]\nname = \"dn{}\"\n", g + 1);
        for (k, (h, role)) in placement(g, hosts)
            .into_iter()
            .zip(["primary", "standby", "secondary"])
            .enumerate()
        {
            let _ = writeln!(
                t,
                "[[dn_group.member]]\nname = \"{}\"\nhost = \"{}\"\nport = {}\nrole = \"{role}\"\n",
                member(g, h),
                host(h),
                20000 + g * 3 + k
            );
        }
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_generated_config_is_valid_at_every_size() {
        for n in [3, 10, 100, 1000] {
            let text = config_text(n, 50000, Path::new("/tmp/x"));
            let cfg = ha_common::ClusterConfig::parse(&text, Path::new("gen.toml"))
                .unwrap_or_else(|e| panic!("{n} hosts: {e}"));
            assert_eq!(cfg.hosts.len(), n);
            assert_eq!(cfg.dn_groups.len(), groups(n));
        }
    }
}
