//! Waiting for the cluster to reach what was asked: every instance (or one) running
//! normally, or stopped. Bounded by a deadline; a timeout names what is still pending.

use std::time::{Duration, Instant};

use ha_common::proto::cm::{ClusterStatus, InstanceStatus};
use ha_common::ClusterConfig;

use crate::client::Primary;
use crate::error::CtlError;

/// What a wait is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Goal {
    /// normal (or not_implemented: the project cannot run it yet, nothing to wait for).
    Running,
    /// stopped (or not_implemented).
    Stopped,
}

impl Goal {
    fn reached(self, state: &str) -> bool {
        match self {
            Goal::Running => matches!(state, "normal" | "not_implemented"),
            Goal::Stopped => matches!(state, "stopped" | "not_implemented"),
        }
    }
}

/// Every agent-run instance of a status: GTMs, CNs, DN members.
pub fn instances(status: &ClusterStatus) -> impl Iterator<Item = &InstanceStatus> {
    status
        .gtm
        .iter()
        .chain(&status.cn)
        .chain(status.dn_groups.iter().flat_map(|g| &g.members))
}

/// The instances (all, or just `only`) that have not reached `goal`, described. For
/// the whole cluster running, every DN group must be normal too (its standby
/// synchronous), since until then a commit on its primary would wait.
pub fn pending(status: &ClusterStatus, only: Option<&str>, goal: Goal) -> Vec<String> {
    let groups = status
        .dn_groups
        .iter()
        .filter(|_| only.is_none() && goal == Goal::Running)
        .filter(|g| g.state != "normal")
        .map(|g| format!("dn group {} is {} ({})", g.name, g.state, g.detail));
    instances(status)
        .filter(|i| only.is_none_or(|n| i.name == n))
        .filter(|i| !goal.reached(&i.state))
        .map(|i| {
            if i.detail.is_empty() {
                format!("{} is {}", i.name, i.state)
            } else {
                format!("{} is {} ({})", i.name, i.state, i.detail)
            }
        })
        .chain(groups)
        .collect()
}

/// Polls the primary CMServer until `pending` is empty, for at most `timeout`.
pub async fn wait_for(
    cfg: &ClusterConfig,
    only: Option<&str>,
    goal: Goal,
    timeout: Duration,
    what: &str,
) -> Result<ClusterStatus, CtlError> {
    let deadline = Instant::now() + timeout;
    let mut last;
    loop {
        match Primary::find(cfg).await {
            Ok(mut primary) => match primary.status().await {
                Ok(status) => {
                    let left = pending(&status, only, goal);
                    if left.is_empty() {
                        return Ok(status);
                    }
                    last = left.join("; ");
                }
                Err(e) => last = e.to_string(),
            },
            Err(e) => last = e.to_string(),
        }
        if Instant::now() >= deadline {
            return Err(CtlError::Timeout {
                what: what.to_owned(),
                secs: timeout.as_secs(),
                pending: last,
            });
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ha_common::proto::cm::DnGroupStatus;

    fn row(name: &str, state: &str) -> InstanceStatus {
        InstanceStatus {
            name: name.into(),
            state: state.into(),
            ..Default::default()
        }
    }

    #[test]
    fn pending_ignores_what_the_project_cannot_run() {
        let s = ClusterStatus {
            role_changes: vec![],
            agents: vec![],
            gtm: vec![row("gtm1", "normal")],
            cn: vec![row("cn1", "not_implemented")],
            dn_groups: vec![DnGroupStatus {
                name: "dn1".into(),
                members: vec![row("dn1_h1", "normal"), row("dn1_h2", "starting")],
                state: "degraded".into(),
                detail: "standby dn1_h2 is starting".into(),
            }],
            cm_servers: vec![row("cms2", "down")],
            term: 1,
        };
        assert_eq!(
            pending(&s, None, Goal::Running),
            vec![
                "dn1_h2 is starting",
                "dn group dn1 is degraded (standby dn1_h2 is starting)"
            ]
        );
        assert!(pending(&s, Some("dn1_h1"), Goal::Running).is_empty());
        assert_eq!(pending(&s, None, Goal::Stopped).len(), 3);
    }
}
