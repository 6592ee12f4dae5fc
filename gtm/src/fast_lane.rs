//! The primary's lock-free hot path: GXIDs handed out from the current reserved block
//! with one atomic add. The block's bounds come from the [`Reservation`] state machine
//! (under the node's lock), which takes the lane back (closes it, learning how far it
//! handed out) whenever it has something to decide: a reservation to start or finish,
//! a role or term change.
//!
//! [`Reservation`]: crate::reservation::Reservation

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};

/// The counter's value while closed: far above any GXID, so an add on a closed lane
/// never yields a grantable range (and cannot overflow: each add is at most
/// [`crate::node::MAX_GXIDS_PER_REQUEST`]).
const CLOSED: u64 = 1 << 62;

/// Generation (even: open, odd: closed), next GXID, end of the open range, term.
#[derive(Debug)]
pub(crate) struct FastLane {
    generation: AtomicU64,
    next: AtomicU64,
    end: AtomicU64,
    term: AtomicU64,
}

impl Default for FastLane {
    fn default() -> Self {
        FastLane {
            generation: AtomicU64::new(1),
            next: AtomicU64::new(CLOSED),
            end: AtomicU64::new(0),
            term: AtomicU64::new(0),
        }
    }
}

impl FastLane {
    /// `count` (≥ 1) contiguous GXIDs and the term they belong to, or None: the lane
    /// is closed or too short, and the caller takes the locked path. Values an
    /// unsuccessful add consumed are never handed out (a gap, like a failover's).
    pub(crate) fn try_grant(&self, count: u64) -> Option<(Range<u64>, u64)> {
        let generation = self.generation.load(SeqCst);
        if generation & 1 == 1 || count == 0 {
            return None;
        }
        let end = self.end.load(SeqCst);
        let term = self.term.load(SeqCst);
        let first = self.next.fetch_add(count, SeqCst);
        // Unchanged generation: no close began before the add, so the closer's swap
        // sees this add, and `end`/`term` are the ones of this open period.
        if self.generation.load(SeqCst) != generation {
            return None;
        }
        let last = first.checked_add(count)?;
        (last <= end).then_some((first..last, term))
    }

    /// Closes the lane (only under the node's lock). Returns, if it was open, the end
    /// of what it may have handed out: every grant ended at or below it.
    pub(crate) fn close(&self) -> Option<u64> {
        let generation = self.generation.load(SeqCst);
        if generation & 1 == 1 {
            return None;
        }
        self.generation.store(generation + 1, SeqCst);
        let reached = self.next.swap(CLOSED, SeqCst);
        Some(reached.min(self.end.load(SeqCst)))
    }

    /// Opens the closed lane (only under the node's lock) on `[next, end)` in `term`.
    pub(crate) fn open(&self, next: u64, end: u64, term: u64) {
        let generation = self.generation.load(SeqCst);
        debug_assert!(generation & 1 == 1, "open() on an open lane");
        self.end.store(end, SeqCst);
        self.term.store(term, SeqCst);
        self.next.store(next, SeqCst);
        self.generation.store(generation + 1, SeqCst);
    }

    /// The next GXID the open lane would hand out (for status), None when closed.
    pub(crate) fn peek_next(&self) -> Option<u64> {
        let n = self.next.load(SeqCst);
        (self.generation.load(SeqCst) & 1 == 0 && n < CLOSED).then_some(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn a_closed_lane_grants_nothing() {
        let lane = FastLane::default();
        assert_eq!(lane.try_grant(1), None);
        assert_eq!(lane.close(), None);
        assert_eq!(lane.peek_next(), None);
    }

    #[test]
    fn grants_within_the_range_then_falls_back() {
        let lane = FastLane::default();
        lane.open(100, 110, 7);
        assert_eq!(lane.try_grant(4), Some((100..104, 7)));
        assert_eq!(lane.try_grant(6), Some((104..110, 7)));
        assert_eq!(lane.try_grant(1), None, "the range is used up");
        assert_eq!(lane.try_grant(0), None, "zero is the locked path's error");
        assert_eq!(lane.close(), Some(110), "failed adds are capped at the end");
        assert_eq!(lane.try_grant(1), None, "closed");
    }

    #[test]
    fn close_reports_how_far_it_went_and_reopen_continues() {
        let lane = FastLane::default();
        lane.open(0, 1000, 1);
        lane.try_grant(10).expect("grant");
        assert_eq!(lane.peek_next(), Some(10));
        assert_eq!(lane.close(), Some(10));
        lane.open(10, 2000, 2);
        assert_eq!(lane.try_grant(5), Some((10..15, 2)));
    }

    #[test]
    fn concurrent_grants_are_unique_and_the_close_covers_them_all() {
        let lane = Arc::new(FastLane::default());
        lane.open(1, 200_001, 3);
        let mut threads = Vec::new();
        for _ in 0..4 {
            let lane = lane.clone();
            threads.push(std::thread::spawn(move || {
                let mut got = Vec::new();
                while let Some((r, _)) = lane.try_grant(3) {
                    got.push(r);
                }
                got
            }));
        }
        // Close while they run: nothing granted may lie at or past what close reports.
        std::thread::sleep(std::time::Duration::from_millis(2));
        let reached = lane.close().expect("was open");
        let mut all: Vec<Range<u64>> = threads
            .into_iter()
            .flat_map(|t| t.join().expect("thread"))
            .collect();
        all.sort_by_key(|r| r.start);
        for w in all.windows(2) {
            assert!(w[0].end <= w[1].start, "overlap: {w:?}");
        }
        assert!(
            all.iter().all(|r| r.end <= reached),
            "a grant past {reached}"
        );
        assert!(lane.try_grant(1).is_none());
    }
}
