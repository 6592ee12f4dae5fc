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
    let id = cx.engine.issue(host, o);
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(out) = cx.engine.outcome(id) {
            return if out.ok { Ok(out) } else { Err(out.message) };
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "no outcome from the agent of {host} within {} s",
                timeout.as_secs()
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Persists `new` as primary and `old` as standby of their group in a new term.
async fn swap_roles(cx: &Ctx<'_>, t: &Target, old: &str, new: &str) -> Result<u64, Status> {
    let mut guard = cx.state.lock().await;
    let mut next = guard.clone();
    next.set_role(old, AssignedRole::Standby)
        .and_then(|_| next.set_role(new, AssignedRole::Primary))
        .map_err(|e| Status::internal(e.to_string()))?;
    next.bump_term();
    next.last_sync_standby.remove(&t.group);
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
        return Err(Status::invalid_argument(format!(
            "switchover applies to DN standbys; for {} use failover",
            t.standby
        )));
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
    let term = swap_roles(cx, &t, &p, &s).await?;
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
        let _ = swap_roles(cx, &t, &s, &p).await;
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
    let state = cx.state.lock().await.clone();
    let t = resolve(cx, &req.instance, &state)?;
    let _busy = cx
        .engine
        .begin(&t.group)
        .map_err(Status::failed_precondition)?;
    let (p, s) = (t.primary.clone(), t.standby.clone());
    let srep = fresh(cx, &s);
    if !t.is_gtm {
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
    }
    if !responding_as(srep.as_ref(), MemberRole::Standby) {
        return Err(Status::failed_precondition(format!(
            "refused: {s} is not running and responding as a standby"
        )));
    }
    if t.is_gtm && !srep.as_ref().and_then(|r| r.gtm).is_some_and(|g| g.ready) {
        return Err(Status::failed_precondition(format!(
            "refused: {s} is not ready (has not copied {p}'s state): promoting it could reuse GXIDs"
        )));
    }
    let term = swap_roles(cx, &t, &p, &s).await?;
    match run_order(cx, &s, OrderKind::Promote, 0, ORDER_TIMEOUT).await {
        Ok(o) => Ok(reply(
            term,
            format!(
                "failover done: {s} is primary of {} (term {term}); {p} will rejoin as its standby ({})",
                if t.is_gtm { "the GTM pair" } else { t.group.as_str() },
                o.message
            ),
        )),
        Err(e) => Err(Status::aborted(format!(
            "{s} is assigned primary (term {term}) but its promotion failed: {e}; the arbiter retries"
        ))),
    }
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
