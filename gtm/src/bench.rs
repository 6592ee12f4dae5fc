//! `gtm bench`: GXID throughput and per-call latency with C concurrent callers sharing
//! one client (as a CN with many sessions would), measured in the same run beside the
//! ceiling of the transport: a no-op RPC, streamed the same way and unary.

use std::time::{Duration, Instant};

use crate::client::{ClientError, ClientOptions, GtmClient};

#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub clients: usize,
    /// Time spent on GXIDs; the no-ops get as much each.
    pub duration: Duration,
    /// GXIDs per call.
    pub count: u64,
    /// Messages in flight on the client's stream.
    pub in_flight: usize,
    /// The three measurements alternate this many times (the machine's load moves).
    pub rounds: u32,
}

/// What one kind of call is measured on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lane {
    /// NextGxidStream through the client's stream.
    Gxid,
    /// PingStream through the same stream machinery: the ceiling.
    StreamPing,
    /// One unary Ping RPC per call.
    UnaryPing,
}

/// Latencies in nanoseconds, in log-linear buckets: 64 per power of two, so a
/// percentile is off by less than 1/64 (1.6 %) and memory does not grow with calls.
#[derive(Debug, Clone)]
pub struct Histogram {
    buckets: Vec<u64>,
    count: u64,
    max: u64,
}

const SUB: u64 = 64;
const SUB_BITS: u32 = 6;

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            buckets: vec![0; ((64 - SUB_BITS as usize) + 1) * SUB as usize],
            count: 0,
            max: 0,
        }
    }
}

impl Histogram {
    fn index(v: u64) -> usize {
        if v < SUB {
            return v as usize;
        }
        let e = 63 - v.leading_zeros(); // >= SUB_BITS
        let sub = (v >> (e - SUB_BITS)) & (SUB - 1);
        ((e - SUB_BITS + 1) as u64 * SUB + sub) as usize
    }

    /// The smallest value of bucket `i`.
    fn floor(i: usize) -> u64 {
        let i = i as u64;
        if i < SUB {
            return i;
        }
        let e = i / SUB - 1 + SUB_BITS as u64;
        (SUB + i % SUB) << (e - SUB_BITS as u64)
    }

    pub fn record(&mut self, d: Duration) {
        let v = d.as_nanos().min(u64::MAX as u128) as u64;
        self.buckets[Self::index(v)] += 1;
        self.count += 1;
        self.max = self.max.max(v);
    }

    pub fn merge(&mut self, other: &Histogram) {
        for (a, b) in self.buckets.iter_mut().zip(&other.buckets) {
            *a += b;
        }
        self.count += other.count;
        self.max = self.max.max(other.max);
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    /// The `p` quantile (0..=1), as the lower bound of its bucket.
    pub fn percentile(&self, p: f64) -> Duration {
        if self.count == 0 {
            return Duration::ZERO;
        }
        let rank = ((self.count as f64 - 1.0) * p.clamp(0.0, 1.0)).round() as u64;
        let mut seen = 0;
        for (i, n) in self.buckets.iter().enumerate() {
            seen += n;
            if seen > rank {
                return Duration::from_nanos(Self::floor(i).min(self.max));
            }
        }
        Duration::from_nanos(self.max)
    }

    pub fn max(&self) -> Duration {
        Duration::from_nanos(self.max)
    }
}

/// The calls of one lane, over every round.
#[derive(Debug, Clone, Default)]
pub struct Figures {
    pub latency: Histogram,
    pub errors: u64,
    pub first_error: Option<String>,
    pub elapsed: Duration,
}

impl Figures {
    pub fn calls(&self) -> u64 {
        self.latency.count()
    }

    /// Calls per second times GXIDs per call.
    pub fn per_sec(&self, count: u64) -> f64 {
        (self.calls() * count) as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    fn merge(&mut self, other: Figures) {
        self.latency.merge(&other.latency);
        self.errors += other.errors;
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
        self.elapsed += other.elapsed;
    }
}

#[derive(Debug, Clone)]
pub struct BenchReport {
    pub clients: usize,
    pub count: u64,
    /// NextGxid over the stream.
    pub gxid: Figures,
    /// The streamed no-op: the ceiling.
    pub ceiling: Figures,
    /// The unary no-op.
    pub unary: Figures,
}

impl BenchReport {
    pub fn gxids_per_sec(&self) -> f64 {
        self.gxid.per_sec(self.count)
    }

    pub fn ceiling_per_sec(&self) -> f64 {
        self.ceiling.per_sec(self.count)
    }

    /// GXIDs/s over the streamed no-op's rate.
    pub fn ratio(&self) -> f64 {
        self.gxids_per_sec() / self.ceiling_per_sec().max(1e-9)
    }
}

fn us(d: Duration) -> String {
    format!("{:.1}us", d.as_secs_f64() * 1e6)
}

fn quotient(a: Duration, b: Duration) -> f64 {
    a.as_secs_f64() / b.as_secs_f64().max(1e-12)
}

impl std::fmt::Display for BenchReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let g = &self.gxid;
        let (c, u) = (&self.ceiling, &self.unary);
        let p50 = g.latency.percentile(0.50);
        write!(
            f,
            "clients={} calls={} gxids={} elapsed={:.2}s gxids/s={:.0} p50={} p99={} max={} errors={} \
             ceiling_per_s={:.0} ceiling_p50={} ceiling_p99={} unary_per_s={:.0} unary_p50={} unary_p99={} \
             ratio={:.2} p50_ratio={:.2} p50_vs_unary={:.2}",
            self.clients,
            g.calls(),
            g.calls() * self.count,
            g.elapsed.as_secs_f64(),
            self.gxids_per_sec(),
            us(p50),
            us(g.latency.percentile(0.99)),
            us(g.latency.max()),
            g.errors,
            self.ceiling_per_sec(),
            us(c.latency.percentile(0.50)),
            us(c.latency.percentile(0.99)),
            u.per_sec(self.count),
            us(u.latency.percentile(0.50)),
            us(u.latency.percentile(0.99)),
            self.ratio(),
            quotient(p50, c.latency.percentile(0.50)),
            quotient(p50, u.latency.percentile(0.50)),
        )?;
        let errors = c.errors + u.errors;
        if errors > 0 {
            write!(f, " noop_errors={errors}")?;
        }
        if let Some(e) = g
            .first_error
            .as_ref()
            .or(c.first_error.as_ref())
            .or(u.first_error.as_ref())
        {
            write!(f, " first_error={e:?}")?;
        }
        Ok(())
    }
}

async fn call(client: &GtmClient, lane: Lane, count: u64) -> Result<(), ClientError> {
    match lane {
        Lane::Gxid => client.next_gxid(count).await.map(|_| ()),
        Lane::StreamPing => client.ping(count).await.map(|_| ()),
        Lane::UnaryPing => client.ping_unary(count).await.map(|_| ()),
    }
}

/// `clients` callers call `lane` back to back for `duration`.
async fn measure(
    client: &GtmClient,
    lane: Lane,
    clients: usize,
    count: u64,
    duration: Duration,
) -> Figures {
    let started = Instant::now();
    let deadline = started + duration;
    let mut tasks = Vec::with_capacity(clients);
    for _ in 0..clients.max(1) {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            let mut f = Figures::default();
            let mut t = Instant::now();
            while t < deadline {
                let result = call(&client, lane, count).await;
                let now = Instant::now();
                match result {
                    Ok(()) => f.latency.record(now - t),
                    // The client already waited its failover timeout: one error per
                    // such wait at most, no spinning on a dead pair.
                    Err(e) => {
                        f.errors += 1;
                        f.first_error.get_or_insert_with(|| e.to_string());
                    }
                }
                t = now;
            }
            f
        }));
    }
    let mut all = Figures::default();
    for t in tasks {
        if let Ok(f) = t.await {
            all.merge(f);
        }
    }
    all.elapsed = started.elapsed();
    all
}

/// Runs the benchmark against the pair at `endpoints`: GXIDs, the streamed no-op and
/// the unary no-op, alternating for `rounds` rounds with the same callers.
pub async fn run(endpoints: Vec<String>, opts: BenchOptions) -> Result<BenchReport, ClientError> {
    let client = GtmClient::connect_with(
        endpoints,
        ClientOptions {
            max_in_flight: opts.in_flight,
            ..ClientOptions::default()
        },
    )
    .await?;
    // Warm-up: connection and stream set-up and the first reservation are not measured.
    for lane in [Lane::Gxid, Lane::StreamPing, Lane::UnaryPing] {
        call(&client, lane, opts.count).await?;
    }
    let rounds = opts.rounds.max(1);
    let slice = opts.duration / rounds;
    let mut report = BenchReport {
        clients: opts.clients,
        count: opts.count,
        gxid: Figures::default(),
        ceiling: Figures::default(),
        unary: Figures::default(),
    };
    let mut lanes = [Lane::StreamPing, Lane::Gxid, Lane::UnaryPing];
    for _ in 0..rounds {
        // Each lane takes each place in the order in turn: no lane always follows
        // the unary one (which leaves the connection with many closed streams).
        lanes.rotate_left(1);
        for lane in lanes {
            let f = measure(&client, lane, opts.clients, opts.count, slice).await;
            match lane {
                Lane::Gxid => report.gxid.merge(f),
                Lane::StreamPing => report.ceiling.merge(f),
                Lane::UnaryPing => report.unary.merge(f),
            }
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_percentiles_are_within_two_percent() {
        let mut h = Histogram::default();
        for v in 1..=100_000u64 {
            h.record(Duration::from_nanos(v * 10));
        }
        for (p, exact) in [(0.5, 500_000.0), (0.99, 990_000.0), (0.01, 10_000.0)] {
            let got = h.percentile(p).as_nanos() as f64;
            assert!((got - exact).abs() / exact < 0.02, "p{p}: {got} vs {exact}");
        }
        assert_eq!(h.max(), Duration::from_nanos(1_000_000));
        assert_eq!(h.count(), 100_000);
    }

    #[test]
    fn histogram_buckets_cover_every_value() {
        for v in [
            0u64,
            1,
            63,
            64,
            65,
            127,
            128,
            1 << 20,
            (1 << 40) + 12345,
            u64::MAX,
        ] {
            let i = Histogram::index(v);
            let lo = Histogram::floor(i);
            assert!(lo <= v, "{v}: bucket {i} starts at {lo}");
            assert!(v - lo <= v / 64, "{v}: bucket {i} starts at {lo}");
            assert!(i < Histogram::default().buckets.len());
        }
    }

    #[test]
    fn merged_histograms_count_both() {
        let (mut a, mut b) = (Histogram::default(), Histogram::default());
        a.record(Duration::from_micros(10));
        b.record(Duration::from_micros(30));
        b.record(Duration::from_micros(30));
        a.merge(&b);
        assert_eq!(a.count(), 3);
        let p50 = a.percentile(0.5).as_nanos() as f64;
        assert!((p50 - 30_000.0).abs() < 30_000.0 / 64.0, "{p50}");
        let p0 = a.percentile(0.0).as_nanos() as f64;
        assert!((p0 - 10_000.0).abs() < 10_000.0 / 64.0, "{p0}");
    }
}
