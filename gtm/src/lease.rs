//! The GTM primary's lease (invariant 3 under partitions): a GTM started with
//! `--require-lease` hands out GXIDs and records decisions only while it holds,
//! recently enough, a promise of the primary CMServer that no other GTM is promoted
//! before a deadline. The GTM renews it itself (`renew.rs`: RenewGtmLease to every
//! CMServer, several times per lease), so its host's agent plays no part and an agent
//! restart does not pause GXIDs. Deadlines are CLOCK_MONOTONIC nanoseconds of this
//! host, begun when the GTM *sent* the renewal that the CMServer answered, so a reply
//! that arrives late (a frozen GTM, a slow network) never stretches a promise.
//! `LeaseState::transition` is the one transition function.

/// Where the lease stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lease {
    /// Never renewed since start, or revoked (stepped down, demoted).
    NoLease,
    /// Confirmed: GXIDs may be handed out before `until` (monotonic ns).
    Held { until: u64 },
    /// Ran out at `at` (monotonic ns) with no newer renewal.
    Expired { at: u64 },
}

/// What can happen to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// The primary CMServer (cluster term `cm_term`) answered a renewal with a promise
    /// running until `until` (the renewal's send time + what it granted, see
    /// [`deadline`]); `now` is when the answer arrived.
    Renewed { cm_term: u64, until: u64, now: u64 },
    /// Time passes (checked whenever a grant finds the lease's deadline behind it).
    Tick { now: u64 },
    /// The GTM stopped being primary: what it was promised as primary is gone.
    Revoke,
}

/// Why a renewal's answer was refused (it changes nothing).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LeaseError {
    #[error("lease renewal of CMServer term {got} refused: term {seen} already seen")]
    StaleTerm { got: u64, seen: u64 },
    #[error("lease renewal sent at {sent_at} ns, after this host's clock ({now} ns): not this host's CLOCK_MONOTONIC")]
    FromAnotherClock { sent_at: u64, now: u64 },
}

/// The lease and the highest CMServer term that renewed one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseState {
    pub lease: Lease,
    pub cm_term: u64,
    /// When the last accepted renewal's answer arrived (monotonic ns; 0 = never).
    pub confirmed_at: u64,
}

impl Default for LeaseState {
    fn default() -> Self {
        LeaseState {
            lease: Lease::NoLease,
            cm_term: 0,
            confirmed_at: 0,
        }
    }
}

impl LeaseState {
    /// The one transition function.
    pub fn transition(self, event: Event) -> Result<LeaseState, LeaseError> {
        match event {
            Event::Renewed {
                cm_term,
                until,
                now,
            } => {
                if cm_term < self.cm_term {
                    return Err(LeaseError::StaleTerm {
                        got: cm_term,
                        seen: self.cm_term,
                    });
                }
                // A promise made earlier within the same CMServer's tenure stays
                // valid (that CMServer promotes nobody before it), so the later of
                // the two deadlines holds; a new tenure waits out every earlier
                // promise before it may promote (cm-server/src/gtm_lease.rs).
                let until = match self.lease {
                    Lease::Held { until: held } => held.max(until),
                    _ => until,
                };
                let lease = if until > now {
                    Lease::Held { until }
                } else {
                    match self.lease {
                        Lease::NoLease => Lease::NoLease,
                        Lease::Expired { at } => Lease::Expired { at },
                        Lease::Held { .. } => Lease::Expired { at: until },
                    }
                };
                Ok(LeaseState {
                    lease,
                    cm_term,
                    confirmed_at: now,
                })
            }
            Event::Tick { now } => Ok(match self.lease {
                Lease::Held { until } if until <= now => LeaseState {
                    lease: Lease::Expired { at: until },
                    ..self
                },
                _ => self,
            }),
            Event::Revoke => Ok(LeaseState {
                lease: Lease::NoLease,
                ..self
            }),
        }
    }

    /// The deadline GXIDs may be handed out before (0: none).
    pub fn until(&self) -> u64 {
        match self.lease {
            Lease::Held { until } => until,
            _ => 0,
        }
    }

    /// Why nothing may be handed out at `now` (for the error a client sees).
    pub fn why_not(&self, now: u64) -> String {
        let ago = |t: u64| format!("{:.1} s ago", now.saturating_sub(t) as f64 / 1e9);
        let word = if self.confirmed_at == 0 {
            "no word from the primary CMServer since this GTM started".to_owned()
        } else {
            format!(
                "no word from the primary CMServer since {}",
                ago(self.confirmed_at)
            )
        };
        match self.lease {
            Lease::NoLease => format!("no lease ({word})"),
            Lease::Held { until } if until > now => "lease held".to_owned(),
            Lease::Held { until } | Lease::Expired { at: until } => {
                format!("lease expired {} ({word})", ago(until))
            }
        }
    }
}

/// The deadline a renewal's answer sets: `sent_at + valid_for`, where `sent_at` is
/// when this GTM sent the renewal, on its own clock (not after `now`).
pub fn deadline(sent_at: u64, valid_for_ms: u64, now: u64) -> Result<u64, LeaseError> {
    if sent_at > now {
        return Err(LeaseError::FromAnotherClock { sent_at, now });
    }
    Ok(sent_at.saturating_add(valid_for_ms.saturating_mul(1_000_000)))
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    fn held(until: u64, cm_term: u64, confirmed_at: u64) -> LeaseState {
        LeaseState {
            lease: Lease::Held { until },
            cm_term,
            confirmed_at,
        }
    }

    fn renewed(cm_term: u64, until: u64, now: u64) -> Event {
        Event::Renewed {
            cm_term,
            until,
            now,
        }
    }

    #[test]
    fn no_lease_renewed_is_held() {
        let s = LeaseState::default()
            .transition(renewed(3, 5 * S, S))
            .unwrap();
        assert_eq!(s, held(5 * S, 3, S));
    }

    #[test]
    fn no_lease_renewed_with_a_past_deadline_stays_without() {
        let s = LeaseState::default()
            .transition(renewed(3, S, 2 * S))
            .unwrap();
        assert_eq!(s.lease, Lease::NoLease);
        assert_eq!(s.until(), 0);
    }

    #[test]
    fn held_renewed_keeps_the_later_deadline() {
        let s = held(5 * S, 3, S);
        assert_eq!(
            s.transition(renewed(3, 7 * S, 2 * S)).unwrap().until(),
            7 * S
        );
        assert_eq!(
            s.transition(renewed(4, 4 * S, 2 * S)).unwrap().until(),
            5 * S
        );
    }

    #[test]
    fn held_renewed_in_an_older_cmserver_term_is_refused() {
        let s = held(5 * S, 3, S);
        assert_eq!(
            s.transition(renewed(2, 9 * S, 2 * S)),
            Err(LeaseError::StaleTerm { got: 2, seen: 3 })
        );
    }

    #[test]
    fn held_past_its_deadline_expires() {
        let s = held(5 * S, 3, S);
        assert_eq!(s.transition(Event::Tick { now: 4 * S }).unwrap(), s);
        let e = s.transition(Event::Tick { now: 5 * S }).unwrap();
        assert_eq!(e.lease, Lease::Expired { at: 5 * S });
        assert!(
            e.why_not(6 * S).contains("lease expired 1.0 s ago"),
            "{}",
            e.why_not(6 * S)
        );
        assert!(e.why_not(6 * S).contains("since 5.0 s ago"));
    }

    #[test]
    fn held_renewed_too_late_expires() {
        let s = held(5 * S, 3, S)
            .transition(renewed(3, 4 * S, 6 * S))
            .unwrap();
        assert_eq!(s.lease, Lease::Expired { at: 5 * S });
    }

    #[test]
    fn expired_renewed_is_held_again() {
        let s = LeaseState {
            lease: Lease::Expired { at: 5 * S },
            cm_term: 3,
            confirmed_at: S,
        };
        assert_eq!(
            s.transition(renewed(4, 9 * S, 6 * S)).unwrap(),
            held(9 * S, 4, 6 * S)
        );
        let stale = s.transition(renewed(4, 5 * S, 6 * S)).unwrap();
        assert_eq!(stale.lease, Lease::Expired { at: 5 * S });
    }

    #[test]
    fn any_lease_revoked_is_none_but_the_term_is_kept() {
        for s in [
            held(5 * S, 3, S),
            LeaseState {
                lease: Lease::Expired { at: S },
                cm_term: 3,
                confirmed_at: S,
            },
        ] {
            let r = s.transition(Event::Revoke).unwrap();
            assert_eq!((r.lease, r.cm_term), (Lease::NoLease, 3));
        }
    }

    #[test]
    fn the_deadline_runs_from_the_send_time_on_this_hosts_clock() {
        assert_eq!(deadline(S, 1500, 2 * S), Ok(S + 1_500_000_000));
        assert!(matches!(
            deadline(3 * S, 1500, 2 * S),
            Err(LeaseError::FromAnotherClock { .. })
        ));
    }
}
