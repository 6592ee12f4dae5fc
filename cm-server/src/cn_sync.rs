//! The CMServer's half of `CmServer.CnSync`: what a CN routes by (the DN primaries of
//! the current term) and the DDL set, and the primary's round that applies the DDL
//! set's rules ([`crate::ddl_set`]) and persists their changes before anybody sees them.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::Instant;

use ha_common::config::{ClusterConfig, InstanceKind};
use ha_common::proto::cm::{CnPeer, CnPhase, CnSyncRequest, DnPrimary, MemberRole};

use crate::arbitration::{persist, Ctx};
use crate::assignments::current_primary;
use crate::ddl_set::{self, CnSeen, DdlSet};
use crate::reports::Reports;
use crate::state::ClusterState;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CnSyncError {
    #[error("CnSync from {0:?}, which is not a [[cn]] of the config")]
    UnknownCn(String),
}

/// The DDL set's memory and the latest notes, shared by the CnSync handler, the
/// periodic round and the status.
#[derive(Debug, Default)]
pub struct CnBook {
    inner: Mutex<(ddl_set::Memory, BTreeMap<String, String>)>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl CnBook {
    /// Records what a CN said (primary and standby alike, so that a new primary knows).
    pub fn record(
        &self,
        cfg: &ClusterConfig,
        req: &CnSyncRequest,
        now: Instant,
    ) -> Result<(), CnSyncError> {
        if !cfg.cns.iter().any(|c| c.name == req.cn) {
            return Err(CnSyncError::UnknownCn(req.cn.clone()));
        }
        let phase = CnPhase::try_from(req.phase).unwrap_or(CnPhase::Unspecified);
        lock(&self.inner).0.seen.insert(
            req.cn.clone(),
            CnSeen {
                at: now,
                phase,
                catalog_version: req.catalog_version,
                catalog_prepared: req.catalog_prepared,
            },
        );
        Ok(())
    }

    pub fn memory(&self) -> ddl_set::Memory {
        lock(&self.inner).0.clone()
    }

    pub fn notes(&self) -> BTreeMap<String, String> {
        lock(&self.inner).1.clone()
    }
}

/// Per CN with a fresh agent report: alive and answering its probe. An agent that
/// cannot run CNs (`unsupported`) says nothing either way.
pub fn agent_verdicts(
    cfg: &ClusterConfig,
    reports: &Reports,
    now: Instant,
) -> HashMap<String, bool> {
    cfg.cns
        .iter()
        .filter_map(|c| {
            let rep = reports.fresh(&c.name, now, cfg.timing.agent_timeout())?;
            (!rep.unsupported).then(|| (c.name.clone(), rep.process_alive && rep.responding))
        })
        .collect()
}

/// Applies the DDL set's rules once (primary only); a changed set is persisted and
/// streamed to the standby CMServer before it is installed.
pub async fn round(cx: &Ctx<'_>, book: &CnBook) {
    let now = Instant::now();
    let mut state = cx.state.lock().await;
    let agent_ok = agent_verdicts(cx.cfg, &lock(cx.reports), now);
    let cns: Vec<String> = cx.cfg.cns.iter().map(|c| c.name.clone()).collect();
    let plan = {
        let guard = lock(&book.inner);
        ddl_set::decide(&ddl_set::Input {
            cns: &cns,
            set: &state.ddl_set,
            memory: &guard.0,
            agent_ok: &agent_ok,
            now,
            timeout: cx.cfg.timing.cn_failover_timeout(),
        })
    };
    if let Some(set) = plan.set.clone() {
        let mut next = state.clone();
        next.ddl_set = set;
        if let Err(e) = persist(cx.file, &next).await {
            tracing::error!("cannot persist the DDL set: {e}");
            return;
        }
        (cx.replicate)(next.clone()).await;
        for cn in &plan.removed {
            tracing::warn!(
                cn,
                why = plan.notes.get(cn).map(String::as_str),
                "CN taken out of the DDL set"
            );
        }
        for cn in &plan.admitted {
            tracing::info!(
                cn,
                catalog_version = next.ddl_set.catalog_version,
                "CN admitted to the DDL set"
            );
        }
        *state = next;
    }
    drop(state);
    let mut guard = lock(&book.inner);
    // CnSyncs that arrived meanwhile are newer than the plan's copy.
    let seen = std::mem::take(&mut guard.0.seen);
    guard.0 = plan.memory;
    for (cn, s) in seen {
        let keep = guard.0.seen.get(&cn).is_none_or(|old| old.at <= s.at);
        if keep {
            guard.0.seen.insert(cn, s);
        }
    }
    guard.1 = plan.notes;
}

/// Every DN group's current primary; `available` only while its agent reports it
/// alive, answering and running as primary.
pub fn dn_primaries(
    cfg: &ClusterConfig,
    state: &ClusterState,
    reports: &Reports,
    now: Instant,
) -> Vec<DnPrimary> {
    let mut out = Vec::new();
    for g in &cfg.dn_groups {
        let Some(any) = g.members.first() else {
            continue;
        };
        let r = ha_common::config::InstanceRef {
            kind: InstanceKind::DnMember,
            instance: any,
            group: Some(g),
        };
        let Some(p) = current_primary(cfg, state, r) else {
            out.push(DnPrimary {
                group: g.name.clone(),
                available: false,
                ..Default::default()
            });
            continue;
        };
        let available = reports
            .fresh(&p.name, now, cfg.timing.agent_timeout())
            .is_some_and(|rep| {
                rep.process_alive && rep.responding && rep.role == MemberRole::Primary as i32
            });
        out.push(DnPrimary {
            group: g.name.clone(),
            instance: p.name.clone(),
            address: cfg.address_of(p).to_owned(),
            port: u32::from(p.port()),
            available,
        });
    }
    out
}

/// The members of the DDL set with where to reach them.
pub fn ddl_peers(cfg: &ClusterConfig, set: &DdlSet, memory: &ddl_set::Memory) -> Vec<CnPeer> {
    cfg.cns
        .iter()
        .filter(|c| set.contains(&c.name))
        .map(|c| CnPeer {
            name: c.name.clone(),
            address: cfg.address_of(c).to_owned(),
            port: u32::from(c.port()),
            rpc_port: u32::from(c.rpc_port()),
            catalog_version: memory
                .seen
                .get(&c.name)
                .map_or(set.catalog_version, |s| s.catalog_version),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::tests::local_config;
    use ha_common::proto::cm::InstanceReport;

    fn primary_report(name: &str, alive: bool) -> InstanceReport {
        InstanceReport {
            name: name.into(),
            process_alive: alive,
            responding: alive,
            role: MemberRole::Primary as i32,
            ..Default::default()
        }
    }

    #[test]
    fn dn_primaries_follow_the_state_and_say_when_a_group_has_no_writable_primary() {
        let cfg = local_config();
        let mut state = ClusterState::initial(&cfg);
        let mut reports = Reports::new();
        let now = Instant::now();
        for (host, inst) in [
            ("h1", primary_report("dn1_h1", true)),
            ("h2", primary_report("dn2_h2", false)),
        ] {
            reports.record_host(&cfg, host, vec![inst], now);
        }
        let list = dn_primaries(&cfg, &state, &reports, now);
        assert_eq!(list.len(), 2);
        assert_eq!(
            (
                list[0].group.as_str(),
                list[0].instance.as_str(),
                list[0].port,
                list[0].available
            ),
            ("dn1", "dn1_h1", 6501, true)
        );
        assert_eq!(list[0].address, "127.0.0.1");
        assert_eq!(
            (list[1].instance.as_str(), list[1].available),
            ("dn2_h2", false)
        );
        // A failover assigned dn1_h2: not available until it reports as primary.
        state
            .set_role("dn1_h1", crate::state::AssignedRole::Standby)
            .unwrap();
        state
            .set_role("dn1_h2", crate::state::AssignedRole::Primary)
            .unwrap();
        let list = dn_primaries(&cfg, &state, &reports, now);
        assert_eq!(
            (list[0].instance.as_str(), list[0].port, list[0].available),
            ("dn1_h2", 6502, false)
        );
    }

    #[test]
    fn an_unknown_cn_is_refused_and_recorded_nowhere() {
        let cfg = local_config();
        let book = CnBook::default();
        let req = CnSyncRequest {
            cn: "cn9".into(),
            ..Default::default()
        };
        assert_eq!(
            book.record(&cfg, &req, Instant::now()),
            Err(CnSyncError::UnknownCn("cn9".into()))
        );
        assert!(book.memory().seen.is_empty());
    }
}
