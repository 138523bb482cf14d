//! A circuit breaker per route's new service: after repeated failures the route is
//! served from legacy for a while, then one probe request tests the new service.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Consecutive failures that open the breaker: enough to ignore a blip.
pub const DEFAULT_FAILURES: u32 = 5;
/// How long it stays open before a probe: short, so recovery is quick.
pub const DEFAULT_OPEN_MS: u64 = 5_000;
/// The error-rate rule looks at this much recent history.
pub const DEFAULT_RATE_WINDOW_MS: u64 = 10_000;
/// ...and only once it holds this many requests, so three requests with one error
/// do not count as a 33 % error rate.
pub const DEFAULT_RATE_MIN_REQUESTS: u32 = 20;

/// Opening on an error rate, besides consecutive failures: an intermittently failing
/// service (one request in three) never fails five times in a row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ErrorRate {
    /// Open when at least this percentage of the window's requests failed.
    pub percent: u8,
    /// Requests the window must hold before the rate counts.
    pub min_requests: u32,
    /// Length of the window.
    pub window: Duration,
}

const BUCKETS: usize = 10;

/// Outcomes over a sliding window, in ten buckets.
#[derive(Debug)]
struct Window {
    origin: Instant,
    /// (bucket number since `origin`, successes, failures)
    buckets: [(u64, u32, u32); BUCKETS],
}

impl Window {
    fn new(now: Instant) -> Self {
        Self {
            origin: now,
            buckets: [(u64::MAX, 0, 0); BUCKETS],
        }
    }

    /// Adds an outcome and returns (requests, failures) over the window.
    fn add(&mut self, rule: &ErrorRate, success: bool, now: Instant) -> (u32, u32) {
        let width = (rule.window.as_nanos() / BUCKETS as u128).max(1);
        let n = (now.saturating_duration_since(self.origin).as_nanos() / width) as u64;
        let slot = &mut self.buckets[(n % BUCKETS as u64) as usize];
        if slot.0 != n {
            *slot = (n, 0, 0);
        }
        if success {
            slot.1 += 1;
        } else {
            slot.2 += 1;
        }
        self.buckets
            .iter()
            .filter(|(b, _, _)| *b != u64::MAX && n.saturating_sub(*b) < BUCKETS as u64)
            .fold((0, 0), |(r, f), (_, ok, fail)| (r + ok + fail, f + fail))
    }
}

/// The breaker's state, as the admin API shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BreakerState {
    /// Requests go to the new service.
    Closed,
    /// Requests go to legacy.
    Open,
    /// One probe request is testing the new service.
    HalfOpen,
}

#[derive(Debug)]
struct Inner {
    state: BreakerState,
    failures: u32,
    opened_at: Option<Instant>,
    probe_in_flight: bool,
    /// The active health check says the service is down: no requests, no probes.
    health_down: bool,
    window: Window,
}

/// One breaker.
#[derive(Debug)]
pub struct Breaker {
    threshold: u32,
    open_for: Duration,
    rate: Option<ErrorRate>,
    inner: Mutex<Inner>,
}

/// Whether a request may go to the new service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Yes, normally.
    Yes,
    /// Yes, as the half-open probe.
    Probe,
    /// No: serve from legacy.
    No,
}

impl Breaker {
    /// A closed breaker that opens after `threshold` consecutive failures for `open_for`.
    pub fn new(threshold: u32, open_for: Duration) -> Self {
        Self::with_rate(threshold, open_for, None)
    }

    /// Like [`Breaker::new`], also opening when the error rate over a window reaches `rate`.
    pub fn with_rate(threshold: u32, open_for: Duration, rate: Option<ErrorRate>) -> Self {
        Self {
            threshold: threshold.max(1),
            open_for,
            rate,
            inner: Mutex::new(Inner {
                state: BreakerState::Closed,
                failures: 0,
                opened_at: None,
                probe_in_flight: false,
                health_down: false,
                window: Window::new(Instant::now()),
            }),
        }
    }

    /// The settings it was made with.
    pub fn settings(&self) -> (u32, Duration, Option<ErrorRate>) {
        (self.threshold, self.open_for, self.rate)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The current state.
    pub fn state(&self) -> BreakerState {
        self.lock().state
    }

    /// Asks whether a request may go to the new service at `now`.
    pub fn admit_at(&self, now: Instant) -> Admit {
        let mut inner = self.lock();
        if inner.health_down {
            return Admit::No;
        }
        match inner.state {
            BreakerState::Closed => Admit::Yes,
            BreakerState::Open => {
                if inner
                    .opened_at
                    .is_some_and(|t| now.duration_since(t) >= self.open_for)
                {
                    inner.state = BreakerState::HalfOpen;
                    inner.probe_in_flight = true;
                    Admit::Probe
                } else {
                    Admit::No
                }
            }
            BreakerState::HalfOpen => {
                if inner.probe_in_flight {
                    Admit::No
                } else {
                    inner.probe_in_flight = true;
                    Admit::Probe
                }
            }
        }
    }

    /// Asks now.
    pub fn admit(&self) -> Admit {
        self.admit_at(Instant::now())
    }

    /// Records how a request to the new service went, at `now`. Returns the new state
    /// when it changed.
    pub fn record_at(&self, success: bool, now: Instant) -> Option<BreakerState> {
        let mut inner = self.lock();
        let before = inner.state;
        let rate_tripped = match &self.rate {
            Some(rule) if inner.state == BreakerState::Closed => {
                let (requests, failures) = inner.window.add(rule, success, now);
                requests >= rule.min_requests.max(1)
                    && u64::from(failures) * 100 >= u64::from(rule.percent) * u64::from(requests)
            }
            _ => false,
        };
        if rate_tripped {
            inner.state = BreakerState::Open;
            inner.opened_at = Some(now);
            inner.probe_in_flight = false;
            inner.failures = 0;
            inner.window = Window::new(now);
        } else if success {
            inner.failures = 0;
            inner.state = BreakerState::Closed;
            inner.opened_at = None;
            inner.probe_in_flight = false;
        } else {
            inner.failures += 1;
            if inner.state == BreakerState::HalfOpen || inner.failures >= self.threshold {
                inner.state = BreakerState::Open;
                inner.opened_at = Some(now);
                inner.probe_in_flight = false;
                inner.failures = 0;
            }
        }
        (inner.state != before).then_some(inner.state)
    }

    /// Records now.
    pub fn record(&self, success: bool) -> Option<BreakerState> {
        self.record_at(success, Instant::now())
    }

    /// What the active health check concluded. Down opens the breaker with no probes
    /// until the check passes again; up closes it.
    pub fn set_health(&self, healthy: bool) -> Option<BreakerState> {
        let mut inner = self.lock();
        let before = inner.state;
        inner.health_down = !healthy;
        if healthy {
            inner.state = BreakerState::Closed;
            inner.failures = 0;
            inner.opened_at = None;
            inner.probe_in_flight = false;
        } else {
            inner.state = BreakerState::Open;
            inner.opened_at = Some(Instant::now());
        }
        (inner.state != before).then_some(inner.state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_consecutive_failures_probes_then_closes() {
        let b = Breaker::new(3, Duration::from_secs(5));
        let t0 = Instant::now();
        assert_eq!(b.record_at(false, t0), None);
        assert_eq!(b.record_at(true, t0), None, "a success resets the count");
        b.record_at(false, t0);
        b.record_at(false, t0);
        assert_eq!(b.record_at(false, t0), Some(BreakerState::Open));
        assert_eq!(b.admit_at(t0 + Duration::from_secs(1)), Admit::No);
        assert_eq!(b.admit_at(t0 + Duration::from_secs(5)), Admit::Probe);
        assert_eq!(
            b.admit_at(t0 + Duration::from_secs(5)),
            Admit::No,
            "one probe at a time"
        );
        assert_eq!(
            b.record_at(true, t0 + Duration::from_secs(6)),
            Some(BreakerState::Closed)
        );
        assert_eq!(b.admit_at(t0 + Duration::from_secs(6)), Admit::Yes);
    }

    #[test]
    fn a_failing_health_check_holds_the_breaker_open_without_probes() {
        let b = Breaker::new(5, Duration::from_millis(1));
        assert_eq!(b.set_health(false), Some(BreakerState::Open));
        assert_eq!(
            b.admit_at(Instant::now() + Duration::from_secs(60)),
            Admit::No
        );
        assert_eq!(b.set_health(true), Some(BreakerState::Closed));
        assert_eq!(b.admit(), Admit::Yes);
    }

    #[test]
    fn an_error_rate_opens_a_breaker_that_consecutive_counting_never_would() {
        let rule = ErrorRate {
            percent: 30,
            min_requests: 20,
            window: Duration::from_secs(10),
        };
        let b = Breaker::with_rate(5, Duration::from_secs(5), Some(rule));
        let t0 = Instant::now();
        // One failure in three: never five in a row.
        let mut opened = None;
        for i in 0..30u32 {
            if let Some(s) = b.record_at(i % 3 != 0, t0 + Duration::from_millis(u64::from(i))) {
                opened = Some((i, s));
                break;
            }
        }
        assert_eq!(
            opened,
            Some((19, BreakerState::Open)),
            "opens once 20 requests are seen"
        );
        let plain = Breaker::new(5, Duration::from_secs(5));
        for i in 0..300u32 {
            assert_eq!(plain.record_at(i % 3 != 0, t0), None);
        }
    }

    #[test]
    fn old_failures_leave_the_rate_window() {
        let rule = ErrorRate {
            percent: 50,
            min_requests: 10,
            window: Duration::from_secs(1),
        };
        let b = Breaker::with_rate(100, Duration::from_secs(5), Some(rule));
        let t0 = Instant::now();
        for _ in 0..9 {
            b.record_at(false, t0);
        }
        // Two seconds later those nine failures are out of the window.
        for i in 0..10 {
            assert_eq!(b.record_at(i != 0, t0 + Duration::from_secs(2)), None);
        }
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[test]
    fn a_failed_probe_opens_again() {
        let b = Breaker::new(1, Duration::from_secs(1));
        let t0 = Instant::now();
        b.record_at(false, t0);
        assert_eq!(b.admit_at(t0 + Duration::from_secs(1)), Admit::Probe);
        assert_eq!(
            b.record_at(false, t0 + Duration::from_secs(1)),
            Some(BreakerState::Open),
            "half-open back to open"
        );
        assert_eq!(b.state(), BreakerState::Open);
        assert_eq!(b.admit_at(t0 + Duration::from_millis(1500)), Admit::No);
        assert_eq!(b.admit_at(t0 + Duration::from_secs(2)), Admit::Probe);
    }
}
