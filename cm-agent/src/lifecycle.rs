//! The life of one supervised instance as a state machine: every state change goes
//! through [`Lifecycle::apply`], so the allowed transitions are all in this file.
//!
//! ```text
//!  Unknown ──ProcessUp──▶ Running ◀──Started── Starting ◀──StartRequested── Unknown
//!     │                     │  ▲                  ▲                          HeldStopped
//!  NeedsData             ProcessGone  Started     │ DataReady                 Failed
//!     ▼                     ▼         │           │
//!  Initialising ─────────▶ (Starting)  Restarting ◀─StartRequested── Crashed
//!  any ──Hold──▶ HeldStopped ──Release──▶ Unknown;   any attempt ──Fail──▶ Failed{reason}
//! ```

use std::time::{Duration, Instant};

/// Where one instance is in its life, as far as the agent knows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LifecycleState {
    /// Just looked at (agent start, or released from a hold); nothing decided yet.
    Unknown,
    /// Creating its data: initdb for a primary, pg_basebackup for a standby.
    Initialising,
    /// First start (or start after a hold) under way.
    Starting,
    /// Its process is alive.
    Running,
    /// Its process vanished without the agent stopping it.
    Crashed,
    /// Being started again after a crash.
    Restarting,
    /// Kept stopped because the CMServer said run = false (or a STOP order).
    HeldStopped,
    /// The last attempt to initialise or start it failed; retried after a backoff.
    Failed { reason: String },
}

impl LifecycleState {
    /// Short name for logs and status details.
    pub fn name(&self) -> &'static str {
        match self {
            LifecycleState::Unknown => "unknown",
            LifecycleState::Initialising => "initialising",
            LifecycleState::Starting => "starting",
            LifecycleState::Running => "running",
            LifecycleState::Crashed => "crashed",
            LifecycleState::Restarting => "restarting",
            LifecycleState::HeldStopped => "held_stopped",
            LifecycleState::Failed { .. } => "failed",
        }
    }
}

/// Something the supervisor observed or decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LifecycleEvent {
    /// The process was found alive (adopted after an agent restart, or started).
    ProcessUp,
    /// The process is gone although nobody stopped it.
    ProcessGone,
    /// The instance has no data yet: create it.
    NeedsData,
    /// Its data now exists (initdb / basebackup done).
    DataReady,
    /// The agent is about to start it.
    StartRequested,
    /// The start command succeeded.
    Started,
    /// Initialising or starting failed.
    Fail(String),
    /// The CMServer wants it stopped (it was stopped, or found stopped).
    Hold,
    /// The CMServer wants it running again after a hold.
    Release,
}

/// A transition the state machine does not allow (a supervisor bug, logged).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("no transition from {from} on {event:?}")]
pub struct InvalidTransition {
    pub from: &'static str,
    pub event: LifecycleEvent,
}

/// The transition function: the one place that says which state follows which.
pub fn next_state(
    state: &LifecycleState,
    event: &LifecycleEvent,
) -> Result<LifecycleState, InvalidTransition> {
    use LifecycleEvent as E;
    use LifecycleState as S;
    let next = match (state, event) {
        // A live process is running whatever we thought before, except that a held
        // instance stays held until the supervisor has stopped it again.
        (S::HeldStopped, E::ProcessUp) => S::HeldStopped,
        (_, E::ProcessUp) => S::Running,
        (S::Running, E::ProcessGone) => S::Crashed,
        // Already known not to run: nothing changes.
        (S::Unknown | S::Crashed | S::HeldStopped | S::Failed { .. }, E::ProcessGone) => {
            state.clone()
        }
        // From Running: a REBUILD order replaces the data of the instance it stopped.
        (S::Unknown | S::Crashed | S::Failed { .. } | S::Running, E::NeedsData) => S::Initialising,
        (S::Initialising, E::DataReady) => S::Starting,
        (S::Unknown | S::Failed { .. }, E::StartRequested) => S::Starting,
        (S::Crashed, E::StartRequested) => S::Restarting,
        (S::Starting | S::Restarting, E::Started) => S::Running,
        // A failed stop of a held instance keeps it held (the error is reported).
        (S::HeldStopped, E::Fail(_)) => S::HeldStopped,
        (_, E::Fail(reason)) => S::Failed {
            reason: reason.clone(),
        },
        (_, E::Hold) => S::HeldStopped,
        (S::HeldStopped, E::Release) => S::Unknown,
        (_, E::Release) => state.clone(),
        _ => {
            return Err(InvalidTransition {
                from: state.name(),
                event: event.clone(),
            })
        }
    };
    Ok(next)
}

/// Bounded exponential backoff between restart attempts.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    attempts: u32,
    not_before: Option<Instant>,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Backoff {
        Backoff {
            min,
            max,
            attempts: 0,
            not_before: None,
        }
    }

    /// Whether an attempt may be made now.
    pub fn ready(&self, now: Instant) -> bool {
        self.not_before.is_none_or(|t| now >= t)
    }

    /// Records an attempt (or a failure) at `now`: the next one waits min·2^n, at most max.
    pub fn record_attempt(&mut self, now: Instant) {
        let factor = 1u32 << self.attempts.min(16);
        let delay = self.min.saturating_mul(factor).min(self.max);
        self.attempts = self.attempts.saturating_add(1);
        self.not_before = Some(now + delay);
    }

    /// After a stable run: the next failure waits only `min` again.
    pub fn reset(&mut self) {
        self.attempts = 0;
        self.not_before = None;
    }

    pub fn attempts(&self) -> u32 {
        self.attempts
    }
}

/// One instance's state plus its restart backoff.
#[derive(Debug, Clone)]
pub struct Lifecycle {
    state: LifecycleState,
    pub backoff: Backoff,
    running_since: Option<Instant>,
}

/// A run this long counts as stable: the backoff starts over.
const STABLE_RUN: Duration = Duration::from_secs(30);

impl Default for Lifecycle {
    fn default() -> Self {
        Lifecycle::new()
    }
}

impl Lifecycle {
    pub fn new() -> Lifecycle {
        Lifecycle {
            state: LifecycleState::Unknown,
            backoff: Backoff::new(Duration::from_secs(1), Duration::from_secs(10)),
            running_since: None,
        }
    }

    pub fn state(&self) -> &LifecycleState {
        &self.state
    }

    /// Applies an event; an invalid one leaves the state as it was and is returned.
    pub fn apply(&mut self, event: LifecycleEvent) -> Result<&LifecycleState, InvalidTransition> {
        let next = next_state(&self.state, &event)?;
        let now = Instant::now();
        // Each failure and each crash delays the next attempt (observing that a
        // failed instance is still down is not a new failure).
        let setback = matches!(next, LifecycleState::Failed { .. })
            && matches!(event, LifecycleEvent::Fail(_))
            || next == LifecycleState::Crashed && self.state != LifecycleState::Crashed;
        if next == LifecycleState::Running && self.state != LifecycleState::Running {
            self.running_since = Some(now);
        }
        if self.state == LifecycleState::Running && next != LifecycleState::Running {
            if self
                .running_since
                .is_some_and(|t| now.duration_since(t) >= STABLE_RUN)
            {
                self.backoff.reset();
            }
            self.running_since = None;
        }
        if setback {
            self.backoff.record_attempt(now);
        }
        if next != self.state {
            tracing::debug!(from = self.state.name(), to = next.name(), "lifecycle");
        }
        self.state = next;
        Ok(&self.state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use LifecycleEvent as E;
    use LifecycleState as S;

    fn failed() -> S {
        S::Failed {
            reason: "boom".into(),
        }
    }

    fn t(from: S, ev: E) -> S {
        next_state(&from, &ev).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn unknown_adopts_a_live_process() {
        assert_eq!(t(S::Unknown, E::ProcessUp), S::Running);
    }

    #[test]
    fn unknown_without_data_initialises() {
        assert_eq!(t(S::Unknown, E::NeedsData), S::Initialising);
    }

    #[test]
    fn rebuild_of_a_running_instance_initialises() {
        assert_eq!(t(S::Running, E::NeedsData), S::Initialising);
    }

    #[test]
    fn initialised_data_goes_to_starting() {
        assert_eq!(t(S::Initialising, E::DataReady), S::Starting);
    }

    #[test]
    fn unknown_with_data_starts() {
        assert_eq!(t(S::Unknown, E::StartRequested), S::Starting);
    }

    #[test]
    fn starting_succeeds_to_running() {
        assert_eq!(t(S::Starting, E::Started), S::Running);
    }

    #[test]
    fn running_process_gone_is_a_crash() {
        assert_eq!(t(S::Running, E::ProcessGone), S::Crashed);
    }

    #[test]
    fn crashed_start_is_a_restart() {
        assert_eq!(t(S::Crashed, E::StartRequested), S::Restarting);
        assert_eq!(t(S::Restarting, E::Started), S::Running);
    }

    #[test]
    fn crashed_process_seen_alive_again_is_running() {
        assert_eq!(t(S::Crashed, E::ProcessUp), S::Running);
    }

    #[test]
    fn failures_carry_their_reason() {
        for from in [
            S::Unknown,
            S::Initialising,
            S::Starting,
            S::Restarting,
            S::Crashed,
            failed(),
        ] {
            assert_eq!(
                t(from, E::Fail("no disk".into())),
                S::Failed {
                    reason: "no disk".into()
                }
            );
        }
    }

    #[test]
    fn failed_is_retried() {
        assert_eq!(t(failed(), E::StartRequested), S::Starting);
        assert_eq!(t(failed(), E::NeedsData), S::Initialising);
        assert_eq!(t(failed(), E::ProcessUp), S::Running);
    }

    #[test]
    fn hold_from_anywhere_then_release() {
        for from in [S::Unknown, S::Running, S::Crashed, failed(), S::Starting] {
            assert_eq!(t(from, E::Hold), S::HeldStopped);
        }
        assert_eq!(t(S::HeldStopped, E::Release), S::Unknown);
        assert_eq!(t(S::Running, E::Release), S::Running);
    }

    #[test]
    fn held_stays_held_while_alive_or_gone() {
        assert_eq!(t(S::HeldStopped, E::ProcessUp), S::HeldStopped);
        assert_eq!(t(S::HeldStopped, E::ProcessGone), S::HeldStopped);
        assert_eq!(
            t(S::HeldStopped, E::Fail("stop failed".into())),
            S::HeldStopped
        );
    }

    #[test]
    fn invalid_transitions_are_refused() {
        assert!(next_state(&S::Running, &E::DataReady).is_err());
        assert!(next_state(&S::HeldStopped, &E::StartRequested).is_err());
        assert!(next_state(&S::Unknown, &E::Started).is_err());
    }

    #[test]
    fn a_failed_instance_seen_down_again_is_not_a_new_failure() {
        let mut lc = Lifecycle::new();
        lc.apply(E::StartRequested).unwrap();
        lc.apply(E::Fail("refused".into())).unwrap();
        assert_eq!(lc.backoff.attempts(), 1);
        for _ in 0..5 {
            lc.apply(E::ProcessGone).unwrap();
        }
        assert_eq!(
            lc.backoff.attempts(),
            1,
            "the retry must not be pushed back forever"
        );
        lc.apply(E::StartRequested).unwrap();
        lc.apply(E::Fail("refused".into())).unwrap();
        assert_eq!(lc.backoff.attempts(), 2);
    }

    #[test]
    fn crash_arms_the_backoff_and_it_grows_bounded() {
        let mut lc = Lifecycle::new();
        lc.apply(E::ProcessUp).unwrap();
        lc.apply(E::ProcessGone).unwrap();
        assert_eq!(lc.state(), &S::Crashed);
        assert!(!lc.backoff.ready(Instant::now()));
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
        let now = Instant::now();
        for _ in 0..40 {
            b.record_attempt(now);
        }
        assert!(b.ready(now + Duration::from_secs(30)));
        assert!(!b.ready(now + Duration::from_secs(29)));
    }
}
