//! Requests and errors of the last minute per route and backend: what the admin
//! API's route status and `strangler route status` show. Lock-free.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

const WINDOW_SECONDS: usize = 60;

/// Requests and errors in the last 60 seconds, one slot per second, lock-free.
#[derive(Debug)]
pub struct MinuteWindow {
    slots: [Slot; WINDOW_SECONDS],
}

#[derive(Debug, Default)]
struct Slot {
    second: AtomicU64,
    requests: AtomicU64,
    errors: AtomicU64,
}

impl Default for MinuteWindow {
    fn default() -> Self {
        Self {
            slots: std::array::from_fn(|_| Slot::default()),
        }
    }
}

fn now_second() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl MinuteWindow {
    /// Counts one request at second `now`.
    pub fn record_at(&self, now: u64, failed: bool) {
        let slot = &self.slots[(now % WINDOW_SECONDS as u64) as usize];
        let seen = slot.second.load(Ordering::Acquire);
        if seen != now
            && slot
                .second
                .compare_exchange(seen, now, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            // First request in this second: the slot held an older second's counts.
            slot.requests.store(0, Ordering::Release);
            slot.errors.store(0, Ordering::Release);
        }
        slot.requests.fetch_add(1, Ordering::AcqRel);
        if failed {
            slot.errors.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// Counts one request now.
    pub fn record(&self, failed: bool) {
        self.record_at(now_second(), failed);
    }

    /// (requests, errors) in the 60 seconds up to `now`.
    pub fn totals_at(&self, now: u64) -> (u64, u64) {
        self.slots
            .iter()
            .filter(|s| {
                now.saturating_sub(s.second.load(Ordering::Acquire)) < WINDOW_SECONDS as u64
            })
            .fold((0, 0), |(r, e), s| {
                (
                    r + s.requests.load(Ordering::Acquire),
                    e + s.errors.load(Ordering::Acquire),
                )
            })
    }

    /// (requests, errors) in the last minute.
    pub fn totals(&self) -> (u64, u64) {
        self.totals_at(now_second())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minute_window_forgets_requests_older_than_a_minute() {
        let w = MinuteWindow::default();
        w.record_at(1_000, false);
        w.record_at(1_000, true);
        w.record_at(1_030, false);
        assert_eq!(w.totals_at(1_030), (3, 1));
        assert_eq!(w.totals_at(1_059), (3, 1));
        assert_eq!(w.totals_at(1_061), (1, 0));
        // Reusing a slot a minute later starts it from zero.
        w.record_at(1_060, false);
        assert_eq!(w.totals_at(1_060), (2, 0));
    }
}
