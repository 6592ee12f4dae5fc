//! The secondary's state machine: idle (connected to nobody, holding nothing),
//! streaming from the primary of term T, or holding (cut from every upstream, keeping
//! its WAL to serve a standby's catch-up). [`transition`] is the one transition
//! function; every order goes through it, and orders of a term older than the highest
//! accepted are refused, so a deposed CMServer can never re-point the secondary.

use serde::{Deserialize, Serialize};

use crate::receiver::Upstream;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SecondaryState {
    Idle,
    Streaming {
        term: u64,
        upstream: String,
        host: String,
        port: u16,
        start_lsn: u64,
    },
    Holding {
        term: u64,
    },
}

impl SecondaryState {
    pub fn name(&self) -> &'static str {
        match self {
            SecondaryState::Idle => "idle",
            SecondaryState::Streaming { .. } => "streaming",
            SecondaryState::Holding { .. } => "holding",
        }
    }

    pub fn upstream(&self) -> Option<Upstream> {
        match self {
            SecondaryState::Streaming {
                upstream,
                host,
                port,
                ..
            } => Some(Upstream {
                name: upstream.clone(),
                host: host.clone(),
                port: *port,
            }),
            _ => None,
        }
    }
}

/// An order from the CMServer (through the agent).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Order {
    Stream {
        term: u64,
        upstream: Upstream,
        start_lsn: u64,
    },
    /// Cut the upstream; `discard` deletes every byte kept (idle).
    Stop { term: u64, discard: bool },
}

impl Order {
    pub fn term(&self) -> u64 {
        match self {
            Order::Stream { term, .. } | Order::Stop { term, .. } => *term,
        }
    }
}

/// What the runtime must do to carry out a transition, in this order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Effects {
    /// Abort the receiver (close its socket) before anything else.
    pub cut_upstream: bool,
    /// Delete every WAL byte kept.
    pub discard: bool,
    /// Start a receiver for the new state's upstream.
    pub start_upstream: bool,
}

const NOTHING: Effects = Effects {
    cut_upstream: false,
    discard: false,
    start_upstream: false,
};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("order of term {order} refused: term {accepted} already accepted")]
    StaleTerm { order: u64, accepted: u64 },
}

/// The durable part: the highest term accepted and the state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Durable {
    pub term: u64,
    pub state: SecondaryState,
}

impl Default for Durable {
    fn default() -> Self {
        Durable {
            term: 0,
            state: SecondaryState::Idle,
        }
    }
}

/// The one transition function.
pub fn transition(cur: &Durable, order: &Order) -> Result<(Durable, Effects), Refused> {
    let term = order.term();
    if term < cur.term {
        return Err(Refused::StaleTerm {
            order: term,
            accepted: cur.term,
        });
    }
    let streaming = matches!(cur.state, SecondaryState::Streaming { .. });
    let (state, effects) = match (&cur.state, order) {
        // The same upstream again (the agent repeats level-triggered orders): keep the
        // stream and what it kept; only the term moves up.
        (
            SecondaryState::Streaming {
                upstream,
                host,
                port,
                start_lsn,
                ..
            },
            Order::Stream { upstream: up, .. },
        ) if *upstream == up.name && *host == up.host && *port == up.port => (
            SecondaryState::Streaming {
                term,
                upstream: upstream.clone(),
                host: host.clone(),
                port: *port,
                start_lsn: *start_lsn,
            },
            NOTHING,
        ),
        (
            _,
            Order::Stream {
                upstream,
                start_lsn,
                ..
            },
        ) => (
            SecondaryState::Streaming {
                term,
                upstream: upstream.name.clone(),
                host: upstream.host.clone(),
                port: upstream.port,
                start_lsn: *start_lsn,
            },
            Effects {
                cut_upstream: streaming,
                discard: false,
                start_upstream: true,
            },
        ),
        (_, Order::Stop { discard: true, .. }) => (
            SecondaryState::Idle,
            Effects {
                cut_upstream: streaming,
                discard: cur.state != SecondaryState::Idle,
                start_upstream: false,
            },
        ),
        (SecondaryState::Idle, Order::Stop { discard: false, .. }) => {
            (SecondaryState::Idle, NOTHING)
        }
        (_, Order::Stop { discard: false, .. }) => (
            SecondaryState::Holding { term },
            Effects {
                cut_upstream: streaming,
                discard: false,
                start_upstream: false,
            },
        ),
    };
    Ok((Durable { term, state }, effects))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn up(name: &str) -> Upstream {
        Upstream {
            name: name.into(),
            host: "127.0.0.1".into(),
            port: 5432,
        }
    }

    fn stream(term: u64, name: &str) -> Order {
        Order::Stream {
            term,
            upstream: up(name),
            start_lsn: 0x100,
        }
    }

    fn streaming(term: u64, name: &str) -> Durable {
        transition(&Durable::default(), &stream(term, name))
            .unwrap()
            .0
    }

    #[test]
    fn idle_to_streaming_starts_the_upstream() {
        let (d, e) = transition(&Durable::default(), &stream(3, "dn1_h1")).unwrap();
        assert_eq!(d.term, 3);
        assert_eq!(d.state.upstream(), Some(up("dn1_h1")));
        assert_eq!(
            e,
            Effects {
                cut_upstream: false,
                discard: false,
                start_upstream: true
            }
        );
    }

    #[test]
    fn the_same_stream_order_again_changes_nothing() {
        let cur = streaming(3, "dn1_h1");
        let (d, e) = transition(&cur, &stream(4, "dn1_h1")).unwrap();
        assert_eq!(e, NOTHING);
        assert_eq!(d.term, 4);
    }

    #[test]
    fn a_new_upstream_cuts_the_old_one_first() {
        let cur = streaming(3, "dn1_h1");
        let (d, e) = transition(&cur, &stream(4, "dn1_h2")).unwrap();
        assert!(e.cut_upstream && e.start_upstream && !e.discard);
        assert_eq!(d.state.upstream(), Some(up("dn1_h2")));
    }

    #[test]
    fn an_older_term_is_refused() {
        let cur = streaming(5, "dn1_h2");
        assert_eq!(
            transition(&cur, &stream(4, "dn1_h1")),
            Err(Refused::StaleTerm {
                order: 4,
                accepted: 5
            })
        );
        assert!(transition(
            &cur,
            &Order::Stop {
                term: 4,
                discard: true
            }
        )
        .is_err());
    }

    #[test]
    fn streaming_to_holding_cuts_and_keeps() {
        let (d, e) = transition(
            &streaming(3, "dn1_h1"),
            &Order::Stop {
                term: 3,
                discard: false,
            },
        )
        .unwrap();
        assert_eq!(d.state, SecondaryState::Holding { term: 3 });
        assert!(e.cut_upstream && !e.discard && !e.start_upstream);
    }

    #[test]
    fn streaming_to_idle_cuts_and_discards() {
        let (d, e) = transition(
            &streaming(3, "dn1_h1"),
            &Order::Stop {
                term: 3,
                discard: true,
            },
        )
        .unwrap();
        assert_eq!(d.state, SecondaryState::Idle);
        assert!(e.cut_upstream && e.discard);
    }

    #[test]
    fn holding_to_idle_discards_and_holding_to_streaming_resumes() {
        let hold = Durable {
            term: 3,
            state: SecondaryState::Holding { term: 3 },
        };
        let (_, e) = transition(
            &hold,
            &Order::Stop {
                term: 3,
                discard: true,
            },
        )
        .unwrap();
        assert!(e.discard && !e.cut_upstream);
        let (d, e) = transition(&hold, &stream(4, "dn1_h2")).unwrap();
        assert!(e.start_upstream && !e.cut_upstream && !e.discard);
        assert_eq!(d.state.name(), "streaming");
    }

    #[test]
    fn idle_stays_idle() {
        for discard in [true, false] {
            let (d, e) =
                transition(&Durable::default(), &Order::Stop { term: 1, discard }).unwrap();
            assert_eq!(d.state, SecondaryState::Idle);
            assert_eq!(e, NOTHING);
        }
    }
}
