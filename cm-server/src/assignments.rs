//! What each agent should do with the instances on its host: run or not, in which
//! role, and for standbys where their primary is. Level-triggered: repeated on every
//! heartbeat, computed from the cluster state alone.

use ha_common::config::{ClusterConfig, InstanceKind, InstanceRef};
use ha_common::proto::cm::{Assignment, MemberRole};

use crate::state::{AssignedRole, ClusterState, SecondaryPlan};
use ha_common::proto::cm::SecondaryMode;

/// The assignments for every agent-run instance on `host`.
pub fn for_host(cfg: &ClusterConfig, state: &ClusterState, host: &str) -> Vec<Assignment> {
    cfg.instances_on_host(host)
        .into_iter()
        .filter(|r| r.kind != InstanceKind::CmServer)
        .map(|r| assignment(cfg, state, r))
        .collect()
}

fn assignment(cfg: &ClusterConfig, state: &ClusterState, r: InstanceRef<'_>) -> Assignment {
    let name = &r.instance.name;
    let role = state.role_of(name);
    let mut a = Assignment {
        instance: name.clone(),
        run: state.should_run(name),
        role: role.map_or(MemberRole::RoleUnspecified, AssignedRole::to_proto) as i32,
        primary_address: String::new(),
        primary_port: 0,
        ..Assignment::default()
    };
    if role == Some(AssignedRole::Secondary) {
        secondary_assignment(cfg, state, r, &mut a);
    } else if role == Some(AssignedRole::Standby) {
        if let Some(primary) = current_primary(cfg, state, r) {
            a.primary_address = cfg.address_of(primary).to_owned();
            a.primary_port = u32::from(primary.port());
        }
    }
    a
}

/// A secondary's mode and upstream from its group's [`SecondaryPlan`].
fn secondary_assignment(
    cfg: &ClusterConfig,
    state: &ClusterState,
    r: InstanceRef<'_>,
    a: &mut Assignment,
) {
    let Some(g) = r.group else { return };
    match state.secondary.get(&g.name) {
        None | Some(SecondaryPlan::Idle) => a.set_secondary_mode(SecondaryMode::SecondaryIdle),
        Some(SecondaryPlan::Hold) => a.set_secondary_mode(SecondaryMode::SecondaryHold),
        Some(SecondaryPlan::Stream {
            upstream,
            start_lsn,
        }) => {
            let Some(up) = g.members.iter().find(|m| &m.name == upstream) else {
                a.set_secondary_mode(SecondaryMode::SecondaryHold);
                return;
            };
            a.set_secondary_mode(SecondaryMode::SecondaryStream);
            a.secondary_upstream = upstream.clone();
            a.secondary_start_lsn = *start_lsn;
            a.primary_address = cfg.address_of(up).to_owned();
            a.primary_port = u32::from(up.port());
        }
    }
}

/// The member that currently holds the primary role in `r`'s pair (GTM) or group (DN).
pub fn current_primary<'a>(
    cfg: &'a ClusterConfig,
    state: &ClusterState,
    r: InstanceRef<'a>,
) -> Option<&'a ha_common::config::Instance> {
    let peers: &[ha_common::config::Instance] = match (r.kind, r.group) {
        (InstanceKind::DnMember, Some(g)) => &g.members,
        (InstanceKind::Gtm, _) => &cfg.gtm.instances,
        _ => return None,
    };
    peers
        .iter()
        .find(|m| state.role_of(&m.name) == Some(AssignedRole::Primary))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::tests::local_config;

    #[test]
    fn standbys_are_told_where_their_primary_is() {
        let cfg = local_config();
        let mut state = ClusterState::initial(&cfg);
        state.set_run(None, true).unwrap();
        let h2 = for_host(&cfg, &state, "h2");
        let names: Vec<_> = h2.iter().map(|a| a.instance.as_str()).collect();
        assert_eq!(names, ["gtm2", "cn2", "dn1_h2", "dn2_h2"], "no CMServer");
        let dn1_h2 = &h2[2];
        assert!(dn1_h2.run);
        assert_eq!(dn1_h2.role, MemberRole::Standby as i32);
        assert_eq!(dn1_h2.primary_address, "127.0.0.1");
        assert_eq!(dn1_h2.primary_port, 6501);
        let dn2_h2 = &h2[3];
        assert_eq!(dn2_h2.role, MemberRole::Primary as i32);
        assert_eq!(dn2_h2.primary_port, 0);
        assert_eq!(h2[0].primary_port, 7101, "GTM standby points at gtm1");
        assert_eq!(h2[1].role, MemberRole::RoleUnspecified as i32);
    }

    #[test]
    fn the_secondary_is_told_its_plan() {
        let cfg = local_config();
        let mut state = ClusterState::initial(&cfg);
        state.set_run(None, true).unwrap();
        let sec = |state: &ClusterState| {
            for_host(&cfg, state, "h3")
                .into_iter()
                .find(|a| a.instance == "dn1_h3")
                .unwrap()
        };
        assert_eq!(sec(&state).secondary_mode(), SecondaryMode::SecondaryIdle);
        state.secondary.insert(
            "dn1".into(),
            SecondaryPlan::Stream {
                upstream: "dn1_h1".into(),
                start_lsn: 0x3000000,
            },
        );
        let a = sec(&state);
        assert_eq!(a.secondary_mode(), SecondaryMode::SecondaryStream);
        assert_eq!(
            (a.secondary_upstream.as_str(), a.primary_port),
            ("dn1_h1", 6501)
        );
        assert_eq!(a.secondary_start_lsn, 0x3000000);
        state.secondary.insert("dn1".into(), SecondaryPlan::Hold);
        assert_eq!(sec(&state).secondary_mode(), SecondaryMode::SecondaryHold);
    }

    #[test]
    fn a_stopped_instance_is_assigned_not_to_run_and_follows_role_changes() {
        let cfg = local_config();
        let mut state = ClusterState::initial(&cfg);
        state.set_run(None, true).unwrap();
        state.set_run(Some("dn1_h2"), false).unwrap();
        state.set_role("dn1_h1", AssignedRole::Standby).unwrap();
        state.set_role("dn1_h2", AssignedRole::Primary).unwrap();
        let h1 = for_host(&cfg, &state, "h1");
        let dn1_h1 = h1.iter().find(|a| a.instance == "dn1_h1").unwrap();
        assert_eq!(dn1_h1.primary_port, 6502);
        let h2 = for_host(&cfg, &state, "h2");
        assert!(!h2.iter().find(|a| a.instance == "dn1_h2").unwrap().run);
    }
}
