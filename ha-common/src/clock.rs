//! The host's CLOCK_MONOTONIC as plain nanoseconds: one clock shared by every process
//! of a host, so that an agent can tell a GTM on its host *when* a promise began.

/// CLOCK_MONOTONIC in nanoseconds (the same clock `std::time::Instant` reads on Linux).
pub fn monotonic_ns() -> u64 {
    use nix::time::{clock_gettime, ClockId};
    // CLOCK_MONOTONIC cannot fail on Linux; 0 would read as "long ago", which makes
    // every lease look expired (safe).
    clock_gettime(ClockId::CLOCK_MONOTONIC)
        .map(|t| (t.tv_sec() as u64).saturating_mul(1_000_000_000) + t.tv_nsec() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    #[test]
    fn it_moves_forward_with_instant() {
        let (a, i) = (super::monotonic_ns(), std::time::Instant::now());
        std::thread::sleep(std::time::Duration::from_millis(5));
        let (b, d) = (super::monotonic_ns(), i.elapsed());
        assert!(b > a && (b - a) as u128 >= d.as_nanos() / 2);
    }
}
