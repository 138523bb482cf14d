//! A lock-free latency histogram with OpenTelemetry's base-2 exponential buckets.
//!
//! Scale 5: bucket `i` holds values in `(2^(i/32), 2^((i+1)/32)]` microseconds, so a
//! bucket is 2.2 % wide and a percentile read as the bucket's geometric middle is
//! within 1.1 % of the true value. 865 buckets reach 2^27 µs (134 s); slower requests
//! count in the last one. Recording is three relaxed atomic adds and never allocates.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// OpenTelemetry's exponential-histogram scale of these buckets.
pub const SCALE: i32 = 5;
/// Buckets per doubling (2^SCALE).
const PER_DOUBLING: f64 = 32.0;
/// The OpenTelemetry bucket index of the first bucket (values up to 1 µs).
pub const OFFSET: i32 = -1;
/// Bucket count: 1 µs .. 2^27 µs.
pub const BUCKETS: usize = 27 * 32 + 1;

/// The bucket position of a latency, in microseconds.
pub fn position(micros: u64) -> usize {
    if micros <= 1 {
        return 0;
    }
    // The OpenTelemetry mapping: index = ceil(log2(v) * 2^scale) - 1.
    #[allow(clippy::cast_precision_loss)]
    let log = (micros as f64).log2() * PER_DOUBLING;
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let index = log.ceil() as i64 - 1;
    usize::try_from(index - i64::from(OFFSET))
        .unwrap_or(0)
        .min(BUCKETS - 1)
}

/// The geometric middle of the bucket at `position`, in microseconds.
pub fn middle(position: usize) -> f64 {
    #[allow(clippy::cast_precision_loss, clippy::cast_possible_wrap)]
    let index = position as f64 + f64::from(OFFSET);
    2f64.powf((index + 0.5) / PER_DOUBLING)
}

/// Counts of requests per latency bucket, plus their sum.
pub struct Histogram {
    buckets: Box<[AtomicU64]>,
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl std::fmt::Debug for Histogram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Histogram")
            .field("count", &self.count.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl Default for Histogram {
    fn default() -> Self {
        Self {
            buckets: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            sum_micros: AtomicU64::new(0),
        }
    }
}

/// A histogram's counts at one moment (cumulative since start).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Counts {
    /// Count per bucket position.
    pub buckets: Vec<u64>,
    /// Values recorded.
    pub count: u64,
    /// Their sum, microseconds.
    pub sum_micros: u64,
}

impl Histogram {
    /// Records one latency.
    pub fn record(&self, latency: Duration) {
        let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.buckets[position(micros)].fetch_add(1, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micros.fetch_add(micros, Ordering::Relaxed);
    }

    /// The counts now.
    pub fn counts(&self) -> Counts {
        Counts {
            buckets: self
                .buckets
                .iter()
                .map(|b| b.load(Ordering::Relaxed))
                .collect(),
            count: self.count.load(Ordering::Relaxed),
            sum_micros: self.sum_micros.load(Ordering::Relaxed),
        }
    }
}

impl Counts {
    /// The `q` quantile (0..=1) in microseconds, or `None` when empty.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let total: u64 = self.buckets.iter().sum();
        if total == 0 {
            return None;
        }
        // The rank of the value asked for, 1-based, as a nearest-rank percentile.
        #[allow(
            clippy::cast_precision_loss,
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss
        )]
        let rank = ((q.clamp(0.0, 1.0) * total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (position, n) in self.buckets.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return Some(middle(position));
            }
        }
        None
    }

    /// Requests at or under `micros` (for Prometheus' cumulative `le` buckets): every
    /// bucket whose upper bound is at most `micros`.
    pub fn at_most(&self, micros: f64) -> u64 {
        self.buckets
            .iter()
            .enumerate()
            .take_while(|(position, _)| {
                #[allow(clippy::cast_precision_loss)]
                let upper = 2f64.powf((*position as f64 + f64::from(OFFSET) + 1.0) / PER_DOUBLING);
                upper <= micros * (1.0 + 1e-9)
            })
            .map(|(_, n)| n)
            .sum()
    }

    /// `self - earlier`, bucket by bucket (for delta exports).
    pub fn minus(&self, earlier: &Counts) -> Counts {
        let at = |v: &[u64], i: usize| v.get(i).copied().unwrap_or(0);
        Counts {
            buckets: (0..self.buckets.len())
                .map(|i| at(&self.buckets, i).saturating_sub(at(&earlier.buckets, i)))
                .collect(),
            count: self.count.saturating_sub(earlier.count),
            sum_micros: self.sum_micros.saturating_sub(earlier.sum_micros),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_value_lands_in_the_bucket_whose_bounds_hold_it() {
        for micros in [
            2u64, 3, 10, 99, 100, 101, 1_000, 12_345, 1_000_000, 99_999_999,
        ] {
            let p = position(micros);
            #[allow(clippy::cast_precision_loss)]
            let v = micros as f64;
            let lower = 2f64.powf((p as f64 + f64::from(OFFSET)) / PER_DOUBLING);
            let upper = 2f64.powf((p as f64 + f64::from(OFFSET) + 1.0) / PER_DOUBLING);
            assert!(
                lower < v * (1.0 + 1e-12) && v <= upper * (1.0 + 1e-12),
                "{micros}: ({lower}, {upper}]"
            );
        }
        assert_eq!(position(0), 0);
        assert_eq!(position(u64::MAX), BUCKETS - 1);
    }

    #[test]
    fn percentiles_are_within_two_percent_of_the_exact_ones() {
        let h = Histogram::default();
        // A skewed distribution: 1 ms .. ~1 s.
        let mut values: Vec<u64> = (0..10_000u64).map(|i| 1_000 + i * i / 100).collect();
        for v in &values {
            h.record(Duration::from_micros(*v));
        }
        values.sort_unstable();
        let counts = h.counts();
        for q in [0.5, 0.95, 0.99] {
            #[allow(
                clippy::cast_precision_loss,
                clippy::cast_possible_truncation,
                clippy::cast_sign_loss
            )]
            let exact = values[((q * values.len() as f64).ceil() as usize).max(1) - 1] as f64;
            let estimate = counts.quantile(q).expect("some");
            assert!(
                (estimate - exact).abs() / exact < 0.02,
                "q{q}: {estimate} vs {exact}"
            );
        }
        assert_eq!(counts.count, 10_000);
    }

    #[test]
    fn deltas_subtract_bucket_by_bucket() {
        let h = Histogram::default();
        h.record(Duration::from_millis(5));
        let first = h.counts();
        h.record(Duration::from_millis(5));
        h.record(Duration::from_millis(50));
        let delta = h.counts().minus(&first);
        assert_eq!(delta.count, 2);
        assert_eq!(delta.buckets.iter().sum::<u64>(), 2);
        assert_eq!(delta.sum_micros, 55_000);
        assert_eq!(delta.at_most(10_000.0), 1);
    }
}
