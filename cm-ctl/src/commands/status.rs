//! `cm_ctl status [--json]`: every CMServer, GTM, CN and DN member with its role,
//! state, LSN and lag, as a table or as JSON.

use ha_common::proto::cm::{ClusterStatus, InstanceStatus};
use ha_common::ClusterConfig;

use crate::client::Primary;
use crate::error::CtlError;

pub async fn run(cfg: &ClusterConfig, json: bool) -> Result<(), CtlError> {
    let mut primary = Primary::find(cfg).await?;
    let status = primary.status().await?;
    if json {
        let text = serde_json::to_string_pretty(&status)
            .map_err(|e| CtlError::Other(format!("cannot serialise status: {e}")))?;
        println!("{text}");
    } else {
        print!("{}", table(&cfg.cluster.name, &primary.name, &status));
    }
    Ok(())
}

/// The human-readable status.
pub fn table(cluster: &str, from: &str, s: &ClusterStatus) -> String {
    let mut rows: Vec<[String; 10]> = vec![[
        "GROUP", "NAME", "HOST", "PORT", "ROLE", "STATE", "LSN", "LAG", "SYNC", "DETAIL",
    ]
    .map(String::from)];
    let mut push = |group: &str, i: &InstanceStatus| {
        rows.push([
            group.to_owned(),
            i.name.clone(),
            i.host.clone(),
            i.port.to_string(),
            i.role.clone(),
            i.state.clone(),
            i.lsn.clone(),
            if i.role == "standby" && !i.lsn.is_empty() {
                i.lag_bytes.to_string()
            } else {
                String::new()
            },
            i.sync_state.clone(),
            i.detail.clone(),
        ]);
    };
    for i in &s.cm_servers {
        push("cm_server", i);
    }
    for i in &s.gtm {
        push("gtm", i);
    }
    for i in &s.cn {
        // A CN has no LSN: its catalog version and DDL set membership say how current it is.
        let mut row = i.clone();
        let facts = format!(
            "catalog v{}, {}",
            i.catalog_version,
            if i.in_ddl_set {
                "in DDL set"
            } else {
                "not in DDL set"
            }
        );
        row.detail = if i.detail.is_empty() {
            facts
        } else {
            format!("{facts}; {}", i.detail)
        };
        push("cn", &row);
    }
    for g in &s.dn_groups {
        for i in &g.members {
            push(&g.name, i);
        }
    }
    let mut widths = [0usize; 10];
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    let mut out = format!(
        "cluster {cluster}, term {}, from CMServer {from}\n\n",
        s.term
    );
    for r in &rows {
        let mut line = String::new();
        for (i, (c, w)) in r.iter().zip(widths).enumerate() {
            if i + 1 == r.len() {
                line.push_str(c);
            } else {
                line.push_str(&format!("{c:<w$}  "));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out.push('\n');
    for g in &s.dn_groups {
        if g.detail.is_empty() {
            out.push_str(&format!("dn group {}: {}\n", g.name, g.state));
        } else {
            out.push_str(&format!(
                "dn group {}: {} ({})\n",
                g.name, g.state, g.detail
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use ha_common::proto::cm::DnGroupStatus;

    #[test]
    fn table_lists_every_instance_and_group() {
        let row = |name: &str, role: &str, state: &str| InstanceStatus {
            name: name.into(),
            host: "h1".into(),
            port: 6501,
            role: role.into(),
            state: state.into(),
            lsn: "0/3000148".into(),
            ..Default::default()
        };
        let s = ClusterStatus {
            role_changes: vec![],
            agents: vec![],
            term: 3,
            cm_servers: vec![row("cms1", "primary", "normal")],
            gtm: vec![row("gtm1", "primary", "normal")],
            cn: vec![InstanceStatus {
                catalog_version: 4,
                in_ddl_set: true,
                ..row("cn1", "active", "normal")
            }],
            dn_groups: vec![DnGroupStatus {
                name: "dn1".into(),
                members: vec![
                    row("dn1_h1", "primary", "normal"),
                    row("dn1_h2", "standby", "normal"),
                ],
                state: "degraded".into(),
                detail: "standby dn1_h2 is not synchronous".into(),
            }],
        };
        let t = table("local", "cms1", &s);
        assert!(t.starts_with("cluster local, term 3, from CMServer cms1"));
        for n in [
            "cms1",
            "gtm1",
            "cn1",
            "dn1_h1",
            "dn1_h2",
            "catalog v4, in DDL set",
        ] {
            assert!(t.contains(n), "{n} missing:\n{t}");
        }
        assert!(t.contains("dn group dn1: degraded (standby dn1_h2 is not synchronous)"));
    }
}
