//! A circuit breaker per route's new service: after repeated failures the route is
//! served from legacy for a while, then one probe request tests the new service.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, Ordering};
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

/// Outcomes over a sliding window, in ten buckets of atomics: a success is counted
/// without taking the breaker's lock.
#[derive(Debug)]
struct Window {
    origin: Instant,
    /// Per bucket: its number since `origin` (`u64::MAX`: empty), successes, failures.
    buckets: [(AtomicU64, AtomicU32, AtomicU32); BUCKETS],
}

impl Window {
    fn new(now: Instant) -> Self {
        Self {
            origin: now,
            buckets: std::array::from_fn(|_| {
                (
                    AtomicU64::new(u64::MAX),
                    AtomicU32::new(0),
                    AtomicU32::new(0),
                )
            }),
        }
    }

    /// Empties every bucket (after the breaker opened on the rate).
    fn clear(&self) {
        for (n, ok, fail) in &self.buckets {
            n.store(u64::MAX, Ordering::Release);
            ok.store(0, Ordering::Release);
            fail.store(0, Ordering::Release);
        }
    }

    /// Adds an outcome and returns (requests, failures) over the window.
    fn add(&self, rule: &ErrorRate, success: bool, now: Instant) -> (u32, u32) {
        let width = (rule.window.as_nanos() / BUCKETS as u128).max(1);
        let n = (now.saturating_duration_since(self.origin).as_nanos() / width) as u64;
        let (number, ok, fail) = &self.buckets[(n % BUCKETS as u64) as usize];
        let seen = number.load(Ordering::Acquire);
        if seen != n
            && number
                .compare_exchange(seen, n, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            // First outcome in this bucket: it held an older bucket's counts.
            ok.store(0, Ordering::Release);
            fail.store(0, Ordering::Release);
        }
        if success {
            ok.fetch_add(1, Ordering::AcqRel);
        } else {
            fail.fetch_add(1, Ordering::AcqRel);
        }
        self.buckets
            .iter()
            .filter(|(b, _, _)| {
                let b = b.load(Ordering::Acquire);
                b != u64::MAX && n.saturating_sub(b) < BUCKETS as u64
            })
            .fold((0, 0), |(r, f), (_, ok, fail)| {
                let (ok, fail) = (ok.load(Ordering::Acquire), fail.load(Ordering::Acquire));
                (r + ok + fail, f + fail)
            })
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

impl BreakerState {
    fn from_u8(v: u8) -> Self {
        match v {
            1 => Self::Open,
            2 => Self::HalfOpen,
            _ => Self::Closed,
        }
    }

    fn as_u8(self) -> u8 {
        match self {
            Self::Closed => 0,
            Self::Open => 1,
            Self::HalfOpen => 2,
        }
    }
}

/// What only changes when the breaker moves between states.
#[derive(Debug)]
struct Inner {
    opened_at: Option<Instant>,
    probe_in_flight: bool,
}

/// One breaker.
///
/// A healthy route costs atomics only: admitting a request while closed and
/// recording a success while closed never take the lock. The lock is taken for a
/// failure, a probe, and every change of state.
#[derive(Debug)]
pub struct Breaker {
    threshold: u32,
    open_for: Duration,
    rate: Option<ErrorRate>,
    /// [`BreakerState`] as a number; written under `inner`'s lock, read without it.
    state: AtomicU8,
    /// Consecutive failures while closed.
    failures: AtomicU32,
    /// The active health check says the service is down: no requests, no probes.
    health_down: AtomicBool,
    window: Window,
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
            state: AtomicU8::new(BreakerState::Closed.as_u8()),
            failures: AtomicU32::new(0),
            health_down: AtomicBool::new(false),
            window: Window::new(Instant::now()),
            inner: Mutex::new(Inner {
                opened_at: None,
                probe_in_flight: false,
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

    fn set_state(&self, state: BreakerState) {
        self.state.store(state.as_u8(), Ordering::Release);
    }

    /// The current state.
    pub fn state(&self) -> BreakerState {
        BreakerState::from_u8(self.state.load(Ordering::Acquire))
    }

    /// Asks whether a request may go to the new service at `now`.
    pub fn admit_at(&self, now: Instant) -> Admit {
        if self.health_down.load(Ordering::Acquire) {
            return Admit::No;
        }
        if self.state() == BreakerState::Closed {
            return Admit::Yes;
        }
        let mut inner = self.lock();
        match self.state() {
            BreakerState::Closed => Admit::Yes,
            BreakerState::Open => {
                if inner
                    .opened_at
                    .is_some_and(|t| now.duration_since(t) >= self.open_for)
                {
                    self.set_state(BreakerState::HalfOpen);
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
        let tripped = |rule: &ErrorRate, (requests, failures): (u32, u32)| {
            requests >= rule.min_requests.max(1)
                && u64::from(failures) * 100 >= u64::from(rule.percent) * u64::from(requests)
        };
        let mut counted = false;
        if success && self.state() == BreakerState::Closed {
            // The common case, counted without the lock. A success resets the
            // consecutive count; it opens the breaker only when it is the request
            // that fills the rate window past its error rate.
            let over = self
                .rate
                .as_ref()
                .is_some_and(|rule| tripped(rule, self.window.add(rule, true, now)));
            self.failures.store(0, Ordering::Release);
            if !over {
                return None;
            }
            counted = true;
        }
        let mut inner = self.lock();
        let before = self.state();
        let rate_tripped = match &self.rate {
            Some(rule) if before == BreakerState::Closed => {
                if counted {
                    true
                } else {
                    tripped(rule, self.window.add(rule, success, now))
                }
            }
            _ => false,
        };
        let open = |inner: &mut Inner| {
            self.set_state(BreakerState::Open);
            inner.opened_at = Some(now);
            inner.probe_in_flight = false;
            self.failures.store(0, Ordering::Release);
        };
        if rate_tripped {
            open(&mut inner);
            self.window.clear();
        } else if success {
            self.failures.store(0, Ordering::Release);
            self.set_state(BreakerState::Closed);
            inner.opened_at = None;
            inner.probe_in_flight = false;
        } else {
            let failures = self.failures.fetch_add(1, Ordering::AcqRel) + 1;
            if before == BreakerState::HalfOpen || failures >= self.threshold {
                open(&mut inner);
            }
        }
        let after = self.state();
        (after != before).then_some(after)
    }

    /// Records now.
    pub fn record(&self, success: bool) -> Option<BreakerState> {
        self.record_at(success, Instant::now())
    }

    /// What the active health check concluded. Down opens the breaker with no probes
    /// until the check passes again; up closes it.
    pub fn set_health(&self, healthy: bool) -> Option<BreakerState> {
        let mut inner = self.lock();
        let before = self.state();
        self.health_down.store(!healthy, Ordering::Release);
        if healthy {
            self.set_state(BreakerState::Closed);
            self.failures.store(0, Ordering::Release);
            inner.opened_at = None;
            inner.probe_in_flight = false;
        } else {
            self.set_state(BreakerState::Open);
            inner.opened_at = Some(Instant::now());
        }
        let after = self.state();
        (after != before).then_some(after)
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
