//! `gtm bench`: GXID throughput and per-call latency with C concurrent callers sharing
//! one batching client, as a CN with many sessions would.

use std::time::{Duration, Instant};

use crate::client::{ClientError, ClientOptions, GtmClient};

#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub clients: usize,
    pub duration: Duration,
    /// GXIDs per call.
    pub count: u64,
    /// NextGxid RPCs the batcher keeps in flight.
    pub in_flight: usize,
}

#[derive(Debug, Clone)]
pub struct BenchReport {
    pub clients: usize,
    pub calls: u64,
    pub gxids: u64,
    pub errors: u64,
    pub first_error: Option<String>,
    pub elapsed: Duration,
    pub p50: Duration,
    pub p99: Duration,
    pub max: Duration,
}

impl BenchReport {
    pub fn gxids_per_sec(&self) -> f64 {
        self.gxids as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

impl std::fmt::Display for BenchReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "clients={} calls={} gxids={} elapsed={:.2}s gxids/s={:.0} p50={}us p99={}us max={}us errors={}",
            self.clients,
            self.calls,
            self.gxids,
            self.elapsed.as_secs_f64(),
            self.gxids_per_sec(),
            self.p50.as_micros(),
            self.p99.as_micros(),
            self.max.as_micros(),
            self.errors
        )?;
        if let Some(e) = &self.first_error {
            write!(f, " first_error={e}")?;
        }
        Ok(())
    }
}

fn percentile(sorted: &[u32], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    Duration::from_micros(sorted[idx.min(sorted.len() - 1)] as u64)
}

/// Runs the benchmark against the pair at `endpoints`.
pub async fn run(endpoints: Vec<String>, opts: BenchOptions) -> Result<BenchReport, ClientError> {
    let client = GtmClient::connect_with(
        endpoints,
        ClientOptions {
            max_in_flight: opts.in_flight,
            ..ClientOptions::default()
        },
    )
    .await?;
    // One warm-up call: connection set-up and the first reservation are not measured.
    client.next_gxid(1).await?;
    let started = Instant::now();
    let deadline = started + opts.duration;
    let mut tasks = Vec::with_capacity(opts.clients);
    for _ in 0..opts.clients.max(1) {
        let client = client.clone();
        let count = opts.count;
        tasks.push(tokio::spawn(async move {
            let mut lat: Vec<u32> = Vec::with_capacity(1 << 16);
            let (mut errors, mut first_error) = (0u64, None);
            while Instant::now() < deadline {
                let t = Instant::now();
                match client.next_gxid(count).await {
                    Ok(_) => lat.push(t.elapsed().as_micros().min(u32::MAX as u128) as u32),
                    Err(e) => {
                        errors += 1;
                        first_error.get_or_insert_with(|| e.to_string());
                        // Do not spin on a dead pair: the client already waited its
                        // failover timeout, so one error per such wait at most.
                    }
                }
            }
            (lat, errors, first_error)
        }));
    }
    let mut all = Vec::new();
    let (mut errors, mut first_error) = (0, None);
    for t in tasks {
        if let Ok((lat, e, fe)) = t.await {
            all.extend(lat);
            errors += e;
            if first_error.is_none() {
                first_error = fe;
            }
        }
    }
    let elapsed = started.elapsed();
    all.sort_unstable();
    let calls = all.len() as u64;
    Ok(BenchReport {
        clients: opts.clients,
        calls,
        gxids: calls * opts.count,
        errors,
        first_error,
        elapsed,
        p50: percentile(&all, 0.50),
        p99: percentile(&all, 0.99),
        max: percentile(&all, 1.0),
    })
}
