//! GXID reservation on the primary: a pure state machine that hands out GXIDs from the
//! reserved block in memory and says when the next boundary must be reserved (synced
//! to the standby, then persisted locally) before allocation may continue.

use std::ops::Range;

/// The allocator of a primary. `limit` is the boundary persisted on this node (and on
/// its standby): nothing at or above it may be handed out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reservation {
    next: u64,
    limit: u64,
    block_size: u64,
    /// The boundary of the one reservation in flight, if any.
    in_flight: Option<u64>,
    /// Blocks per reservation: doubled whenever callers had to wait for one, so that
    /// under high demand the sync (two fsyncs on each node) stays ahead of allocation.
    stride: u64,
    /// A caller waited for a prefetch (it did not stay ahead of demand).
    stalled: bool,
    /// The reservation in flight is a prefetch (not one a caller is already waiting on).
    prefetching: bool,
}

/// Most blocks reserved at once (bounds the gap a crash or failover leaves).
pub const MAX_STRIDE: u64 = 64;

/// What the caller of [`Reservation::allocate`] must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Hand these GXIDs out.
    Grant(Range<u64>),
    /// Hand these out, and start reserving `boundary` in the background: the block is
    /// running low and reserving early keeps callers from stalling on the sync.
    GrantAndPrefetch(Range<u64>, u64),
    /// Nothing granted: reserve `boundary` (standby first, then locally), call
    /// [`Reservation::reserved`] and allocate again.
    Reserve(u64),
    /// Nothing granted: another reservation is in flight; wait for it and retry.
    Wait,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AllocError {
    #[error("count must be at least 1")]
    ZeroCount,
    #[error("count {0} is too large")]
    Overflow(u64),
}

impl Reservation {
    /// A primary starting (or promoted) continues from its persisted boundary: it must
    /// reserve before handing out anything, since GXIDs below the boundary may have
    /// been handed out before.
    pub fn starting_at(boundary: u64, block_size: u64) -> Reservation {
        Reservation {
            next: boundary,
            limit: boundary,
            block_size: block_size.max(1),
            in_flight: None,
            stride: 1,
            stalled: false,
            prefetching: false,
        }
    }

    pub fn next(&self) -> u64 {
        self.next
    }

    pub fn limit(&self) -> u64 {
        self.limit
    }

    pub fn in_flight(&self) -> Option<u64> {
        self.in_flight
    }

    pub fn stride(&self) -> u64 {
        self.stride
    }

    /// Tries to allocate `count` contiguous GXIDs.
    pub fn allocate(&mut self, count: u64) -> Result<Step, AllocError> {
        if count == 0 {
            return Err(AllocError::ZeroCount);
        }
        let end = self
            .next
            .checked_add(count)
            .filter(|e| e.checked_add(self.block_size.saturating_mul(4)).is_some())
            .ok_or(AllocError::Overflow(count))?;
        let chunk = self.stride * self.block_size;
        if end <= self.limit {
            let range = self.next..end;
            self.next = end;
            // Prefetch once less than half a reservation is left.
            if self.in_flight.is_none() && self.limit - end < chunk / 2 {
                let boundary = self.limit + chunk;
                self.in_flight = Some(boundary);
                self.prefetching = true;
                return Ok(Step::GrantAndPrefetch(range, boundary));
            }
            return Ok(Step::Grant(range));
        }
        if self.in_flight.is_some() {
            self.stalled |= self.prefetching;
            return Ok(Step::Wait);
        }
        // Enough whole blocks to cover the request, plus half a reservation of headroom
        // so that the next small request does not stall again.
        let needed = end - self.limit + chunk / 2;
        let blocks = needed.div_ceil(self.block_size).max(self.stride);
        let boundary = self.limit + blocks * self.block_size;
        self.in_flight = Some(boundary);
        self.prefetching = false;
        Ok(Step::Reserve(boundary))
    }

    /// The reservation of `boundary` is durable on the standby and here.
    pub fn reserved(&mut self, boundary: u64) {
        self.limit = self.limit.max(boundary);
        if self.in_flight.is_some_and(|b| b <= boundary) {
            self.in_flight = None;
        }
        if std::mem::take(&mut self.stalled) {
            self.stride = (self.stride * 2).min(MAX_STRIDE);
        }
    }

    /// What may be handed out without this state machine (the lock-free lane):
    /// `[next, end)`, ending where `allocate` would have something to decide — the
    /// prefetch mark, or the limit while a reservation is in flight.
    pub fn lane(&self) -> (u64, u64) {
        let end = if self.in_flight.is_some() {
            self.limit
        } else {
            // `allocate` prefetches once `limit - end < chunk / 2`.
            self.limit.saturating_sub(self.stride * self.block_size / 2)
        };
        (self.next, end.max(self.next))
    }

    /// The lane handed out GXIDs below `end` (never past the limit).
    pub fn granted_up_to(&mut self, end: u64) {
        self.next = self.next.max(end.min(self.limit));
    }

    /// The reservation failed: nothing changes but another may be tried.
    pub fn reserve_failed(&mut self) {
        self.in_flight = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_must_reserve_first() {
        let mut r = Reservation::starting_at(5000, 2000);
        assert_eq!(r.allocate(1).unwrap(), Step::Reserve(7000));
        assert_eq!(r.in_flight(), Some(7000));
        // Everybody else waits while it is in flight.
        assert_eq!(r.allocate(1).unwrap(), Step::Wait);
        r.reserved(7000);
        assert_eq!(r.in_flight(), None);
        assert_eq!(r.allocate(3).unwrap(), Step::Grant(5000..5003));
        assert_eq!(r.allocate(1).unwrap(), Step::Grant(5003..5004));
    }

    #[test]
    fn large_request_reserves_whole_blocks() {
        let mut r = Reservation::starting_at(1, 100);
        // 1 + 250 = 251, plus 50 headroom: 300 over the limit = 3 blocks.
        assert_eq!(r.allocate(250).unwrap(), Step::Reserve(301));
        r.reserved(301);
        assert_eq!(r.allocate(250).unwrap(), Step::Grant(1..251));
        assert_eq!(r.limit(), 301);
    }

    #[test]
    fn prefetch_when_block_runs_low() {
        let mut r = Reservation::starting_at(1, 100);
        assert_eq!(r.allocate(1).unwrap(), Step::Reserve(101));
        r.reserved(101);
        assert_eq!(r.allocate(40).unwrap(), Step::Grant(1..41));
        // 101 - 61 = 40 < 50 left: prefetch the next block while granting.
        assert_eq!(r.allocate(20).unwrap(), Step::GrantAndPrefetch(41..61, 201));
        // While the prefetch is in flight, grants continue inside the limit.
        assert_eq!(r.allocate(40).unwrap(), Step::Grant(61..101));
        // Crossing the limit waits for the prefetch.
        assert_eq!(r.allocate(2).unwrap(), Step::Wait);
        r.reserved(201);
        // The caller had to wait for the prefetch: reservations are now two blocks,
        // prefetched when less than one is left.
        assert_eq!(r.stride(), 2);
        assert_eq!(
            r.allocate(2).unwrap(),
            Step::GrantAndPrefetch(101..103, 401)
        );
    }

    #[test]
    fn the_lane_ends_where_allocate_has_something_to_decide() {
        let mut r = Reservation::starting_at(1, 100);
        assert_eq!(r.lane(), (1, 1), "nothing reserved: an empty lane");
        assert_eq!(r.allocate(1).unwrap(), Step::Reserve(101));
        assert_eq!(r.lane(), (1, 1));
        r.reserved(101);
        // Up to the prefetch mark (half a reservation below the limit).
        assert_eq!(r.lane(), (1, 51));
        // The lane handed out up to 51: allocate continues there and prefetches.
        r.granted_up_to(51);
        assert_eq!(r.allocate(1).unwrap(), Step::GrantAndPrefetch(51..52, 201));
        // With the prefetch in flight, the lane runs to the limit.
        assert_eq!(r.lane(), (52, 101));
        // What the lane reports past the limit (failed adds) is capped at it.
        r.granted_up_to(5000);
        assert_eq!(r.lane(), (101, 101));
        assert_eq!(r.allocate(1).unwrap(), Step::Wait);
        r.granted_up_to(10);
        assert_eq!(r.lane(), (101, 101), "next never goes back");
    }

    #[test]
    fn stalls_widen_the_reservation() {
        let mut r = Reservation::starting_at(1, 100);
        assert_eq!(r.allocate(1).unwrap(), Step::Reserve(101));
        r.reserved(101);
        assert_eq!(r.stride(), 1);
        assert_eq!(r.allocate(60).unwrap(), Step::GrantAndPrefetch(1..61, 201));
        assert_eq!(r.allocate(50).unwrap(), Step::Wait);
        r.reserved(201);
        assert_eq!(r.stride(), 2);
        // Now two blocks at a time, prefetched when less than one is left.
        assert_eq!(
            r.allocate(50).unwrap(),
            Step::GrantAndPrefetch(61..111, 401)
        );
        assert_eq!(r.allocate(50).unwrap(), Step::Grant(111..161));
        r.reserved(401);
        assert_eq!(r.stride(), 2, "no stall, no widening");
        for _ in 0..20 {
            let b = r.limit() + 1;
            r.in_flight = Some(b);
            r.prefetching = true;
            r.stalled = true;
            r.reserved(b);
        }
        assert_eq!(r.stride(), MAX_STRIDE);
    }

    #[test]
    fn failed_reservation_allows_retry_and_hands_out_nothing() {
        let mut r = Reservation::starting_at(1, 100);
        assert_eq!(r.allocate(1).unwrap(), Step::Reserve(101));
        r.reserve_failed();
        assert_eq!(r.next(), 1);
        assert_eq!(r.limit(), 1);
        assert_eq!(r.allocate(1).unwrap(), Step::Reserve(101));
    }

    #[test]
    fn zero_and_overflowing_counts_are_errors() {
        let mut r = Reservation::starting_at(1, 100);
        assert_eq!(r.allocate(0), Err(AllocError::ZeroCount));
        assert_eq!(r.allocate(u64::MAX), Err(AllocError::Overflow(u64::MAX)));
        assert_eq!(r.in_flight(), None);
    }

    #[test]
    fn grants_never_reach_the_limit() {
        let mut r = Reservation::starting_at(1, 7);
        let mut last_end = 1;
        for i in 0..1000u64 {
            let count = i % 13 + 1;
            loop {
                match r.allocate(count).unwrap() {
                    Step::Grant(g) | Step::GrantAndPrefetch(g, _) => {
                        assert_eq!(g.start, last_end);
                        assert!(g.end <= r.limit());
                        last_end = g.end;
                        break;
                    }
                    Step::Reserve(b) => r.reserved(b),
                    Step::Wait => {
                        let b = r.in_flight().unwrap();
                        r.reserved(b);
                    }
                }
            }
        }
    }

    /// A crash after the standby persisted a new boundary but before the primary did:
    /// the primary restarts from its own (lower) boundary, which is still above every
    /// GXID it handed out, and its next reservation lands at or above it.
    #[test]
    fn crash_between_standby_and_primary_write_is_safe() {
        let mut primary = Reservation::starting_at(1, 100);
        let Step::Reserve(b) = primary.allocate(1).unwrap() else {
            panic!("must reserve first")
        };
        primary.reserved(b); // both persisted 101
        let mut handed_out = Vec::new();
        loop {
            match primary.allocate(10).unwrap() {
                Step::Grant(g) => handed_out.push(g),
                Step::GrantAndPrefetch(g, _) => {
                    handed_out.push(g);
                    break;
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        // Standby persisted 201, then the primary crashed before persisting it.
        let standby_boundary = 201;
        let primary_persisted = primary.limit();
        assert!(primary_persisted <= standby_boundary);
        let max_handed = handed_out.iter().map(|g| g.end).max().unwrap();
        assert!(max_handed <= primary_persisted);
        let mut restarted = Reservation::starting_at(primary_persisted, 100);
        let Step::Reserve(b2) = restarted.allocate(1).unwrap() else {
            panic!("must reserve after restart")
        };
        restarted.reserved(b2);
        match restarted.allocate(1).unwrap() {
            Step::Grant(g) | Step::GrantAndPrefetch(g, _) => assert!(g.start >= max_handed),
            other => panic!("unexpected {other:?}"),
        }
    }
}
