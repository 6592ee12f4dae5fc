//! The operator's role changes, run by the primary CMServer for cm_ctl: switchover
//! (planned, zero loss, no rewind), manual failover (refused when it could lose
//! acknowledged commits unless forced), build (rebuild a standby). Each marks its
//! group busy (the arbiter leaves it alone), persists role changes before ordering,
//! and answers when done or failed, with the reason on one line.

use std::time::{Duration, Instant};

use ha_common::config::{InstanceKind, Role};
use ha_common::lsn::format_lsn;
use ha_common::proto::cm::{
    BuildRequest, FailoverRequest, InstanceReport, MemberRole, OperationReply, Order, OrderKind,
    OrderOutcome, SwitchoverRequest,
};
use tonic::Status;

use crate::arbiter::{liveness_problem, sync_problem, GTM_PAIR};
use crate::arbitration::{host_of, order, persist, Ctx};
use crate::state::AssignedRole;

/// How long one order may take (pg_ctl's own limit is 120 s).
const ORDER_TIMEOUT: Duration = Duration::from_secs(150);
/// How long a rebuild may take.
const BUILD_TIMEOUT: Duration = Duration::from_secs(3600);
/// Default wait for the old primary to stream again after a switchover.
const DEFAULT_SWITCHOVER_TIMEOUT: Duration = Duration::from_secs(60);

/// A standby named by the operator, with its group (or the GTM pair).
struct Target {
    standby: String,
    primary: String,
    /// DN group name or `GTM_PAIR`.
    group: String,
    is_gtm: bool,
}

fn resolve(cx: &Ctx<'_>, name: &str, state: &crate::state::ClusterState) -> Result<Target, Status> {
    let r = cx
        .cfg
        .find(name)
        .ok_or_else(|| Status::not_found(format!("unknown instance {name:?}")))?;
    let (group, members, is_gtm) = match (r.kind, r.group) {
        (InstanceKind::DnMember, Some(g)) => (g.name.clone(), &g.members, false),
        (InstanceKind::Gtm, _) => (GTM_PAIR.to_owned(), &cx.cfg.gtm.instances, true),
        _ => {
            return Err(Status::invalid_argument(format!(
                "{name} is not a DN member or a GTM: it has no standby role"
            )))
        }
    };
    if r.instance.role() == Some(Role::Secondary) {
        return Err(Status::failed_precondition(format!(
            "{name} is a DN secondary (WAL only): it cannot become primary"
        )));
    }
    match state.role_of(name) {
        Some(AssignedRole::Standby) => {}
        Some(role) => {
            return Err(Status::failed_precondition(format!(
                "{name} is the {} of {group}, not a standby",
                role.as_str()
            )))
        }
        None => {
            return Err(Status::failed_precondition(format!(
                "{name} has no role assigned"
            )))
        }
    }
    let primary = members
        .iter()
        .find(|m| state.role_of(&m.name) == Some(AssignedRole::Primary))
        .map(|m| m.name.clone())
        .ok_or_else(|| Status::failed_precondition(format!("{group} has no primary assigned")))?;
    Ok(Target {
        standby: name.to_owned(),
        primary,
        group,
        is_gtm,
    })
}

fn fresh(cx: &Ctx<'_>, name: &str) -> Option<InstanceReport> {
    let reports = cx.reports.lock().unwrap_or_else(|p| p.into_inner());
    reports
        .fresh(name, Instant::now(), cx.cfg.timing.agent_timeout())
        .cloned()
}

fn responding_as(r: Option<&InstanceReport>, role: MemberRole) -> bool {
    r.is_some_and(|r| r.process_alive && r.responding && r.role == role as i32)
}

/// Issues an order in the current term and waits for its outcome.
async fn run_order(
    cx: &Ctx<'_>,
    instance: &str,
    kind: OrderKind,
    min_lsn: u64,
    timeout: Duration,
) -> Result<OrderOutcome, String> {
    run_order_with(cx, instance, kind, timeout, |o| o.min_lsn = min_lsn).await
}

/// Issues an order (`set` fills its kind-specific fields) and waits for its outcome.
async fn run_order_with(
    cx: &Ctx<'_>,
    instance: &str,
    kind: OrderKind,
    timeout: Duration,
    set: impl FnOnce(&mut Order),
) -> Result<OrderOutcome, String> {
    let term = cx.state.lock().await.term.0;
    let host = host_of(cx.cfg, instance).ok_or_else(|| format!("{instance} has no host"))?;
    let mut o = order(term, instance, kind);
    set(&mut o);
    let group = group_of(cx, instance);
    if let Some(why) = stopped(cx, &group) {
        return Err(why);
    }
    let id = cx.engine.issue(host, o);
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(out) = cx.engine.outcome(id) {
            return if out.ok { Ok(out) } else { Err(out.message) };
        }
        if let Some(why) = stopped(cx, &group) {
            cx.engine.withdraw(id);
            return Err(why);
        }
        if Instant::now() >= deadline {
            // Taken back: the operation ends without it, and a late agent must not
            // carry it out after the roles were changed back.
            cx.engine.withdraw(id);
            return Err(format!(
                "no outcome from the agent of {host} within {} s",
                timeout.as_secs()
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Why an operation stopped when its CMServer lost primacy (or its tenure ended).
const NOT_PRIMARY: &str = "this CMServer is no longer primary: the operation stopped";

/// The DN group (or `GTM_PAIR`) of `instance`.
fn group_of(cx: &Ctx<'_>, instance: &str) -> String {
    match cx.cfg.find(instance) {
        Some(r) if r.kind == InstanceKind::Gtm => GTM_PAIR.to_owned(),
        Some(r) => r.group.map(|g| g.name.clone()).unwrap_or_default(),
        None => String::new(),
    }
}

/// Why the operation on `group` must stop now: this CMServer lost primacy (or was
/// re-elected: a new tenure), or the arbiter failed the group over (its primary
/// was lost). None: go on.
fn stopped(cx: &Ctx<'_>, group: &str) -> Option<String> {
    if !(cx.still_primary)() {
        return Some(NOT_PRIMARY.to_owned());
    }
    if cx.engine.is_preempted(group) {
        return Some(format!(
            "the primary of {group} was lost: the arbiter failed it over, the operation stopped"
        ));
    }
    None
}

/// Why an operation changes roles, for the state's history: `kind` (switchover,
/// operator_failover), a reason, and when the operation started.
struct Why<'a> {
    kind: &'a str,
    reason: String,
    started: Instant,
}

/// Persists `new` as primary and `old` as standby of their group in a new term.
async fn swap_roles(
    cx: &Ctx<'_>,
    t: &Target,
    old: &str,
    new: &str,
    why: Why<'_>,
) -> Result<u64, Status> {
    let mut guard = cx.state.lock().await;
    if let Some(why) = stopped(cx, &t.group) {
        // A deposed CMServer must not change roles in a term above the real
        // primary's, nor an operation undo the arbiter's failover.
        return Err(Status::aborted(why));
    }
    let mut next = guard.clone();
    next.set_role(old, AssignedRole::Standby)
        .and_then(|_| next.set_role(new, AssignedRole::Primary))
        .map_err(|e| Status::internal(e.to_string()))?;
    next.bump_term();
    next.version += 1;
    next.last_sync_standby.remove(&t.group);
    next.record_role_change(crate::state::RoleChange {
        group: if t.is_gtm {
            "gtm".to_owned()
        } else {
            t.group.clone()
        },
        kind: why.kind.to_owned(),
        from: old.to_owned(),
        to: new.to_owned(),
        term: next.term.0,
        reason: why.reason,
        duration_ms: why.started.elapsed().as_millis() as u64,
        ..Default::default()
    });
    if t.is_gtm {
        // A promoted GTM runs alone until its old primary has resynced.
        next.gtm.run_alone = true;
    }
    persist(cx.file, &next)
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    // The standby CMServer gets the new roles before any agent can see them.
    (cx.replicate)(next.clone()).await;
    cx.engine.restamp(next.term.0);
    *guard = next;
    let term = guard.term.0;
    drop(guard);
    tracing::warn!(
        term,
        primary = new,
        standby = old,
        "roles changed by an operation"
    );
    Ok(term)
}

fn reply(cx_term: u64, message: String) -> OperationReply {
    OperationReply {
        ok: true,
        message,
        term: cx_term,
    }
}

/// Planned switchover: stop the primary cleanly (its walsenders hand the standby
/// everything up to the shutdown checkpoint), check the standby received beyond that
/// checkpoint (the agent refuses PROMOTE otherwise), promote it, and let the old
/// primary start as its standby (no rewind needed: nothing diverged).
pub async fn switchover(cx: &Ctx<'_>, req: SwitchoverRequest) -> Result<OperationReply, Status> {
    let state = cx.state.lock().await.clone();
    let t = resolve(cx, &req.instance, &state)?;
    if t.is_gtm {
        return gtm_switchover(cx, &t, &state).await;
    }
    let _busy = cx
        .engine
        .begin(&t.group)
        .map_err(Status::failed_precondition)?;
    let (p, s) = (t.primary.clone(), t.standby.clone());
    let prep = fresh(cx, &p);
    if !responding_as(prep.as_ref(), MemberRole::Primary) {
        return Err(Status::failed_precondition(format!(
            "primary {p} is not running and responding: use failover"
        )));
    }
    if !responding_as(fresh(cx, &s).as_ref(), MemberRole::Standby) {
        return Err(Status::failed_precondition(format!(
            "{s} is not running and responding as a standby"
        )));
    }
    let in_sync = prep.as_ref().is_some_and(|r| {
        r.replicas
            .iter()
            .any(|x| x.application_name == s && x.state == "streaming" && x.sync_state == "sync")
    });
    if !in_sync {
        return Err(Status::failed_precondition(format!(
            "{s} is not the synchronous, streaming standby of {p}: wait until it is in sync"
        )));
    }
    let started = Instant::now();
    cx.engine
        .note(&t.group, format!("switchover to {s}: stopping {p}"));
    let stopped = match run_order(cx, &p, OrderKind::Stop, 0, ORDER_TIMEOUT).await {
        Ok(o) if o.lsn != 0 => o,
        other => {
            let why = match other {
                Ok(_) => "its last checkpoint LSN is unknown".to_owned(),
                Err(e) => e,
            };
            let _ = run_order(cx, &p, OrderKind::Start, 0, ORDER_TIMEOUT).await;
            cx.engine.note(&t.group, String::new());
            return Err(Status::aborted(format!(
                "switchover aborted, {p} restarted as primary: could not stop it cleanly: {why}"
            )));
        }
    };
    let stop_ms = started.elapsed().as_millis();
    let why = Why {
        kind: "switchover",
        reason: format!("operator switchover: {p} stopped cleanly"),
        started,
    };
    let term = swap_roles(cx, &t, &p, &s, why).await?;
    cx.engine.note(
        &t.group,
        format!(
            "switchover to {s}: {p} stopped at {}; promoting {s}",
            format_lsn(stopped.lsn)
        ),
    );
    // The standby may still be flushing the last bytes: retry briefly.
    let mut last = String::new();
    let promote_deadline = Instant::now() + Duration::from_secs(5);
    let mut promoted = false;
    while Instant::now() < promote_deadline {
        match run_order(cx, &s, OrderKind::Promote, stopped.lsn, ORDER_TIMEOUT).await {
            Ok(_) => {
                promoted = true;
                break;
            }
            Err(e) => last = e,
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let promoted_ms = started.elapsed().as_millis();
    if !promoted {
        // Back to the old layout: the old primary has everything.
        let why = Why {
            kind: "switchover",
            reason: format!("switchover undone: {s} was not promoted: {last}"),
            started,
        };
        let _ = swap_roles(cx, &t, &s, &p, why).await;
        cx.engine.note(&t.group, String::new());
        return Err(Status::aborted(format!(
            "switchover aborted, {p} stays primary: {s} was not promoted: {last}"
        )));
    }
    let timeout = match req.timeout_ms {
        0 => DEFAULT_SWITCHOVER_TIMEOUT,
        ms => Duration::from_millis(ms),
    };
    let deadline = Instant::now() + timeout;
    loop {
        let synced = fresh(cx, &s).is_some_and(|r| {
            r.role == MemberRole::Primary as i32
                && r.replicas.iter().any(|x| {
                    x.application_name == p && x.state == "streaming" && x.sync_state == "sync"
                })
        });
        if synced {
            break;
        }
        if Instant::now() >= deadline {
            cx.engine.note(&t.group, String::new());
            return Ok(reply(
                term,
                format!(
                    "switchover done: {s} is primary (term {term}); {p} does not stream from it yet"
                ),
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    cx.engine.note(&t.group, String::new());
    Ok(reply(
        term,
        format!(
            "switchover done: {s} is primary, {p} its synchronous standby (term {term}; \
             {p} stopped after {stop_ms} ms, {s} promoted after {promoted_ms} ms, in sync after {} ms)",
            started.elapsed().as_millis()
        ),
    ))
}

/// Manual failover to a standby: refused without `force` when it could lose
/// acknowledged commits (the same rule as the arbiter's), and always when the
/// standby cannot be promoted (not running, GTM not ready).
pub async fn failover(cx: &Ctx<'_>, req: FailoverRequest) -> Result<OperationReply, Status> {
    let started = Instant::now();
    let state = cx.state.lock().await.clone();
    let t = resolve(cx, &req.instance, &state)?;
    if t.is_gtm {
        return gtm_failover(cx, &t, &state, req.force).await;
    }
    let _busy = cx
        .engine
        .begin(&t.group)
        .map_err(Status::failed_precondition)?;
    let (p, s) = (t.primary.clone(), t.standby.clone());
    let srep = fresh(cx, &s);
    if let Some(why) = sync_problem(&state, &t.group, &s) {
        if !req.force {
            return Err(Status::failed_precondition(format!(
                "refused: {why}: failing over could lose acknowledged commits (--force to accept)"
            )));
        }
        tracing::warn!(standby = %s, "forced failover: {why}");
    }
    if let Some(why) = liveness_problem(&state, srep.as_ref(), &s) {
        return Err(Status::failed_precondition(format!("refused: {why}")));
    }
    if !responding_as(srep.as_ref(), MemberRole::Standby) {
        return Err(Status::failed_precondition(format!(
            "refused: {s} is not running and responding as a standby"
        )));
    }
    let why = Why {
        kind: "operator_failover",
        reason: if req.force {
            "operator failover (forced)".to_owned()
        } else {
            "operator failover".to_owned()
        },
        started,
    };
    let term = swap_roles(cx, &t, &p, &s, why).await?;
    match run_order(cx, &s, OrderKind::Promote, 0, ORDER_TIMEOUT).await {
        Ok(o) => Ok(reply(
            term,
            format!(
                "failover done: {s} is primary of {} (term {term}); {p} will rejoin as its standby ({})",
                t.group, o.message
            ),
        )),
        Err(e) => Err(Status::aborted(format!(
            "{s} is assigned primary (term {term}) but its promotion failed: {e}; the arbiter retries"
        ))),
    }
}

/// The GTM standby's boundary from its fresh report, if it runs, responds as a
/// standby and is ready (has copied its primary's state); else why it cannot be
/// promoted at all.
fn gtm_candidate(cx: &Ctx<'_>, t: &Target) -> Result<u64, Status> {
    let (p, s) = (&t.primary, &t.standby);
    let srep = fresh(cx, s);
    if !responding_as(srep.as_ref(), MemberRole::Standby) {
        return Err(Status::failed_precondition(format!(
            "refused: {s} is not running and responding as a standby"
        )));
    }
    match srep.and_then(|r| r.gtm) {
        Some(f) if f.ready => Ok(f.boundary),
        _ => Err(Status::failed_precondition(format!(
            "refused: {s} is not ready (has not copied {p}'s state): promoting it could reuse GXIDs"
        ))),
    }
}

/// Fences the GTM primary `p` (DEMOTE: it stops handing out GXIDs and becomes a
/// standby) so that there is never a moment with two GTM primaries.
async fn fence_gtm(cx: &Ctx<'_>, p: &str) -> Result<(), String> {
    run_order(cx, p, OrderKind::Demote, 0, ORDER_TIMEOUT)
        .await
        .map(|_| ())
}

/// Promotes GTM standby `t.standby` after its primary was fenced (or is lost): new
/// roles and term persisted first, then PROMOTE (running alone).
async fn promote_gtm(
    cx: &Ctx<'_>,
    t: &Target,
    what: &str,
    risk: &str,
    fenced: bool,
    started: Instant,
) -> Result<OperationReply, Status> {
    let (p, s) = (&t.primary, &t.standby);
    let why = Why {
        kind: if what == "switchover" {
            "switchover"
        } else {
            "operator_failover"
        },
        reason: if fenced {
            format!("operator {what}: {p} demoted first{risk}")
        } else {
            format!("operator {what}: {p} unreachable{risk}")
        },
        started,
    };
    let term = swap_roles(cx, t, p, s, why).await?;
    // Not demoted first (unreachable): it may hold a lease this CMServer (or an
    // earlier primary) granted; the new roles stop its renewals, so wait it out.
    if !fenced {
        if let Some(end) = cx.engine.gtm_lease_end(cx.cfg, p) {
            let left = end.saturating_duration_since(Instant::now());
            if !left.is_zero() {
                cx.engine.note(
                    &t.group,
                    format!(
                        "{what}: waiting {} ms for {p}'s GTM lease to run out",
                        left.as_millis()
                    ),
                );
                tokio::time::sleep(left).await;
            }
        }
    }
    match run_order(cx, s, OrderKind::Promote, 0, ORDER_TIMEOUT).await {
        Ok(o) => Ok(reply(
            term,
            format!(
                "{what} done: {s} is primary of the GTM pair (term {term}); {p} will rejoin as its standby ({}){risk}",
                o.message
            ),
        )),
        Err(e) => Err(Status::aborted(format!(
            "{s} is assigned primary (term {term}) but its promotion failed: {e}; the arbiter retries"
        ))),
    }
}

/// Planned GTM switchover: only while the standby is attached (every boundary the
/// primary used is persisted on it) and nobody runs alone; the primary is demoted
/// first (it stops handing out GXIDs), then the standby is promoted.
async fn gtm_switchover(
    cx: &Ctx<'_>,
    t: &Target,
    state: &crate::state::ClusterState,
) -> Result<OperationReply, Status> {
    let _busy = cx
        .engine
        .begin(&t.group)
        .map_err(Status::failed_precondition)?;
    let (p, s) = (&t.primary, &t.standby);
    let prep = fresh(cx, p);
    if !responding_as(prep.as_ref(), MemberRole::Primary) {
        return Err(Status::failed_precondition(format!(
            "primary {p} is not running and responding: use failover"
        )));
    }
    gtm_candidate(cx, t)?;
    let facts = prep.and_then(|r| r.gtm).unwrap_or_default();
    if state.gtm.run_alone || facts.run_alone || !facts.standby_attached {
        return Err(Status::failed_precondition(format!(
            "{s} is not attached to {p} (or {p} runs alone): wait until the GTM pair is normal"
        )));
    }
    let started = Instant::now();
    cx.engine
        .note(&t.group, format!("switchover to {s}: demoting {p}"));
    if let Err(e) = fence_gtm(cx, p).await {
        cx.engine.note(&t.group, String::new());
        return Err(Status::aborted(format!(
            "switchover aborted: {p} could not be demoted: {e}; {s} not promoted"
        )));
    }
    let r = promote_gtm(cx, t, "switchover", "", true, started).await;
    cx.engine.note(&t.group, String::new());
    r
}

/// Manual GTM failover: refused unless the standby's boundary is above every GXID
/// the primary may have handed out (as the arbiter's rule), or `force`d, which
/// prints the risk. A primary that still responds is demoted first.
async fn gtm_failover(
    cx: &Ctx<'_>,
    t: &Target,
    state: &crate::state::ClusterState,
    force: bool,
) -> Result<OperationReply, Status> {
    let started = Instant::now();
    let _busy = cx
        .engine
        .begin(&t.group)
        .map_err(Status::failed_precondition)?;
    let (p, s) = (&t.primary, &t.standby);
    let boundary = gtm_candidate(cx, t)?;
    let mut risk = String::new();
    if let Some(why) = crate::arbiter::gtm_gxid_problem(&state.gtm, p, s, boundary) {
        if !force {
            return Err(Status::failed_precondition(format!(
                "refused: {why}; GXIDs handed out twice break transactions (--force to accept)"
            )));
        }
        tracing::warn!(standby = %s, "forced GTM failover: {why}");
        risk = format!("; FORCED, at this risk: {why}");
    }
    let fenced = responding_as(fresh(cx, p).as_ref(), MemberRole::Primary);
    if fenced {
        if let Err(e) = fence_gtm(cx, p).await {
            return Err(Status::aborted(format!(
                "failover aborted: {p} still runs as primary and could not be demoted: {e}; {s} not promoted"
            )));
        }
    } else if state.gtm.run_alone {
        risk.push_str(&format!(
            "; {p} is unreachable and ran alone: if it still runs, it may hand out GXIDs until it learns the new term"
        ));
    }
    promote_gtm(cx, t, "failover", &risk, fenced, started).await
}

/// Rebuilds a DN standby from its primary over the data-unit build channel: the
/// primary's agent serves the build (BUILD_SOURCE, answers with its address), then the
/// standby's agent copies from it (REBUILD; incremental unless `full`).
pub async fn build(cx: &Ctx<'_>, req: BuildRequest) -> Result<OperationReply, Status> {
    let state = cx.state.lock().await.clone();
    let t = resolve(cx, &req.instance, &state)?;
    if t.is_gtm {
        return Err(Status::invalid_argument(format!(
            "{} is a GTM: a GTM standby copies its primary by itself",
            t.standby
        )));
    }
    let _busy = cx
        .engine
        .begin(&t.group)
        .map_err(Status::failed_precondition)?;
    if host_of(cx.cfg, &t.standby).is_none() {
        return Err(Status::internal("no host"));
    }
    let started = Instant::now();
    cx.engine.note(
        &t.group,
        format!("rebuilding {} from {}", t.standby, t.primary),
    );
    let full = req.full;
    let result = match run_order(cx, &t.primary, OrderKind::BuildSource, 0, ORDER_TIMEOUT).await {
        Ok(src) if !src.address.is_empty() => {
            run_order_with(cx, &t.standby, OrderKind::Rebuild, BUILD_TIMEOUT, |o| {
                o.build_source = src.address.clone();
                o.full = full;
            })
            .await
        }
        Ok(_) => Err(format!("{} served no build source address", t.primary)),
        Err(e) => Err(format!("{} cannot serve the build: {e}", t.primary)),
    };
    cx.engine.note(&t.group, String::new());
    let term = cx.state.lock().await.term.0;
    match result {
        Ok(o) => {
            tracing::info!(
                "build of {} done in {:.1} s",
                t.standby,
                started.elapsed().as_secs_f64()
            );
            Ok(reply(term, o.message))
        }
        Err(e) => Err(Status::aborted(format!(
            "build of {} failed: {e}",
            t.standby
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arbitration::Engine;
    use crate::reports::Reports;
    use crate::state::tests::local_config;
    use crate::state::{ClusterState, StateFile};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};

    struct Fixture {
        cfg: ha_common::ClusterConfig,
        file: StateFile,
        state: tokio::sync::Mutex<ClusterState>,
        reports: Mutex<Reports>,
        engine: Engine,
        primary: Arc<AtomicBool>,
        _dir: tempfile::TempDir,
    }

    impl Fixture {
        fn new() -> Fixture {
            let dir = tempfile::tempdir().unwrap();
            let cfg = local_config();
            let file = StateFile::in_dir(dir.path());
            let state = file.load_or_init(&cfg).unwrap();
            Fixture {
                cfg,
                file,
                state: tokio::sync::Mutex::new(state),
                reports: Mutex::new(Reports::new()),
                engine: Engine::new(),
                primary: Arc::new(AtomicBool::new(true)),
                _dir: dir,
            }
        }

        fn cx(&self) -> Ctx<'_> {
            let primary = self.primary.clone();
            Ctx {
                tenure: 1,
                still_primary: Box::new(move || primary.load(Ordering::SeqCst)),
                cfg: &self.cfg,
                file: &self.file,
                state: &self.state,
                reports: &self.reports,
                engine: &self.engine,
                replicate: Box::new(|_| Box::pin(async {})),
            }
        }
    }

    fn dn1_target() -> Target {
        Target {
            standby: "dn1_h2".into(),
            primary: "dn1_h1".into(),
            group: "dn1".into(),
            is_gtm: false,
        }
    }

    #[tokio::test]
    async fn an_order_that_times_out_is_withdrawn() {
        let f = Fixture::new();
        let cx = f.cx();
        let e = run_order(
            &cx,
            "dn1_h2",
            OrderKind::Promote,
            0,
            Duration::from_millis(100),
        )
        .await
        .unwrap_err();
        assert!(e.contains("no outcome"), "{e}");
        // Nothing is sent any more, not even after a term change.
        f.engine.restamp(7);
        assert!(
            f.engine.orders_for("h2").is_empty(),
            "a late agent would promote"
        );
    }

    #[tokio::test]
    async fn an_operation_stops_the_moment_its_cmserver_is_not_primary() {
        let f = Fixture::new();
        let cx = f.cx();
        let flip = f.primary.clone();
        let waiter = run_order(&cx, "dn1_h2", OrderKind::Promote, 0, ORDER_TIMEOUT);
        let deposer = async {
            tokio::time::sleep(Duration::from_millis(100)).await;
            assert_eq!(f.engine.orders_for("h2").len(), 1);
            flip.store(false, Ordering::SeqCst);
        };
        let (r, ()) = tokio::time::timeout(Duration::from_secs(5), async {
            tokio::join!(waiter, deposer)
        })
        .await
        .expect("the operation noticed within its poll interval");
        assert_eq!(r.unwrap_err(), NOT_PRIMARY);
        assert!(f.engine.orders_for("h2").is_empty());
        // No role change from a deposed CMServer (it could depose the real primary).
        let before = f.state.lock().await.clone();
        let e = swap_roles(&cx, &dn1_target(), "dn1_h1", "dn1_h2", test_why())
            .await
            .unwrap_err();
        assert!(e.message().contains("no longer primary"), "{e}");
        assert_eq!(*f.state.lock().await, before);
        assert_eq!(f.file.load().unwrap().unwrap(), before, "nothing persisted");
    }

    fn test_why() -> Why<'static> {
        Why {
            kind: "switchover",
            reason: "test".to_owned(),
            started: Instant::now(),
        }
    }

    #[tokio::test]
    async fn an_operation_role_change_is_recorded_with_why_and_how_long() {
        let f = Fixture::new();
        let cx = f.cx();
        let why = Why {
            kind: "switchover",
            reason: "operator switchover: dn1_h1 stopped cleanly".to_owned(),
            started: Instant::now() - Duration::from_millis(1500),
        };
        let term = swap_roles(&cx, &dn1_target(), "dn1_h1", "dn1_h2", why)
            .await
            .unwrap();
        let persisted = f.file.load().unwrap().unwrap();
        let c = persisted.role_changes.last().expect("recorded");
        assert_eq!(
            (
                c.group.as_str(),
                c.kind.as_str(),
                c.from.as_str(),
                c.to.as_str(),
                c.term
            ),
            ("dn1", "switchover", "dn1_h1", "dn1_h2", term)
        );
        assert!(c.reason.contains("stopped cleanly"), "{}", c.reason);
        assert!(c.duration_ms >= 1500 && c.at_unix_ms > 0, "{c:?}");
    }

    #[tokio::test]
    async fn a_preempted_operation_changes_no_roles() {
        let f = Fixture::new();
        let cx = f.cx();
        let _busy = f.engine.begin("dn1").unwrap();
        f.engine.mark_preempted("dn1");
        let before = f.state.lock().await.clone();
        let e = swap_roles(&cx, &dn1_target(), "dn1_h2", "dn1_h1", test_why())
            .await
            .unwrap_err();
        assert!(e.message().contains("failed it over"), "{e}");
        assert_eq!(*f.state.lock().await, before);
        let e = run_order(&cx, "dn1_h1", OrderKind::Start, 0, ORDER_TIMEOUT)
            .await
            .unwrap_err();
        assert!(e.contains("failed it over"), "{e}");
    }
}
