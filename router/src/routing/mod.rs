//! Routing: the route table and, per route, a runtime object built when a config is
//! loaded that holds everything a request needs about its route — the validated
//! config, the circuit breaker, the last-minute windows and the shadow state — so
//! the request path finds it by matching, never through a locked map keyed by name.
//!
//! A config and its table are swapped together as one [`Snapshot`]: a request keeps
//! the snapshot it started with from its first phase to its last.

pub mod breaker;
pub mod decide;
pub mod table;
pub mod window;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use strangler_model::Backend;

use crate::config::{RouteConfig, RouterConfig};
use crate::shadow::ShadowState;
use crate::stats::{RouteStats, Stats, UNROUTED};
pub use breaker::Breaker;
pub use table::RouteTable;
pub use window::MinuteWindow;

/// A route's state that outlives requests: kept across a reload that leaves the
/// route's settings as they were, started afresh when they change.
#[derive(Debug)]
pub struct RouteState {
    /// The new service's circuit breaker.
    pub breaker: Breaker,
    /// Requests and errors of the last minute, legacy and new.
    windows: [MinuteWindow; 2],
    /// Shadow pairs: capacity, results, samples, calibration.
    pub shadow: ShadowState,
    /// Spans kept for unsampled requests whose shadow pair differed, this minute.
    pub mismatch_spans: PerMinute,
}

/// A per-minute allowance, lock-free (a new minute starts a new count; two threads
/// crossing the minute together may each let one extra through).
#[derive(Debug, Default)]
pub struct PerMinute {
    minute: AtomicU64,
    used: AtomicU32,
}

impl PerMinute {
    /// Takes one of `limit` for the current minute; `false` when they are spent.
    pub fn take(&self, limit: u32) -> bool {
        let minute = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() / 60);
        if self.minute.swap(minute, Ordering::AcqRel) != minute {
            self.used.store(0, Ordering::Release);
        }
        self.used.fetch_add(1, Ordering::AcqRel) < limit
    }
}

impl RouteState {
    /// Fresh state for a route.
    pub fn new(route: &RouteConfig) -> Self {
        Self {
            breaker: Breaker::with_rate(
                route.breaker_failures,
                route.breaker_open,
                route.breaker_rate,
            ),
            windows: [MinuteWindow::default(), MinuteWindow::default()],
            shadow: ShadowState::new(route.shadow.max_concurrent),
            mismatch_spans: PerMinute::default(),
        }
    }

    /// The last-minute window of one side.
    pub fn window(&self, backend: Backend) -> &MinuteWindow {
        match backend {
            Backend::Legacy => &self.windows[0],
            Backend::New => &self.windows[1],
        }
    }
}

/// A route as requests see it: its config and its state.
#[derive(Debug)]
pub struct Route {
    /// The validated settings.
    pub config: RouteConfig,
    /// Breaker, windows, shadow state.
    pub state: Arc<RouteState>,
    /// The route's aggregates (kept across every reload: counters never go back).
    pub stats: Arc<RouteStats>,
}

impl Route {
    /// The route's name.
    pub fn name(&self) -> &str {
        self.config.name.as_str()
    }
}

/// One config and the route table built from it, swapped as a unit.
#[derive(Debug)]
pub struct Snapshot {
    /// The validated config.
    pub config: Arc<RouterConfig>,
    /// Its routes, compiled for matching, each with its runtime state.
    pub table: RouteTable,
    /// Where requests no route matches are counted.
    pub unrouted: Arc<RouteStats>,
}

impl Snapshot {
    /// Builds the routes of `config`; a route whose settings equal its namesake's in
    /// `previous` keeps that route's state (breaker, windows, shadow results).
    /// Each route's aggregates come from `stats`, by name.
    pub fn build(config: RouterConfig, previous: Option<&Snapshot>, stats: &Stats) -> Self {
        let routes = config
            .routes
            .iter()
            .map(|route| {
                let kept = previous
                    .and_then(|p| p.table.get(route.name.as_str()))
                    .filter(|old| old.config.same_settings(route))
                    .map(|old| Arc::clone(&old.state));
                Arc::new(Route {
                    config: route.clone(),
                    state: kept.unwrap_or_else(|| Arc::new(RouteState::new(route))),
                    stats: stats.route(route.name.as_str()),
                })
            })
            .collect();
        Self {
            config: Arc::new(config),
            table: RouteTable::new(routes),
            unrouted: stats.route(UNROUTED),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    const BASE: &str = "[legacy]\nupstream = \"127.0.0.1:3000\"\n";

    fn config(routes: &str) -> RouterConfig {
        RouterConfig::parse(&format!("{BASE}{routes}"), Path::new("s.toml")).expect("valid")
    }

    fn route(name: &str, new: &str) -> String {
        format!("[[route]]\nname = \"{name}\"\nmatch.prefix = \"/{name}\"\nnew = \"{new}\"\n")
    }

    #[test]
    fn a_per_minute_allowance_lets_the_limit_through_and_no_more() {
        let cap = PerMinute::default();
        let allowed = (0..100).filter(|_| cap.take(7)).count();
        // Within one minute (a minute boundary in the loop allows at most one more set).
        assert!(allowed == 7 || allowed == 14, "{allowed}");
        assert!(!PerMinute::default().take(0));
    }

    #[test]
    fn route_state_survives_a_reload_that_leaves_the_route_alone_and_resets_when_it_changes() {
        let first = Snapshot::build(
            config(&format!(
                "{}{}",
                route("orders", "127.0.0.1:4000"),
                route("users", "127.0.0.1:5000")
            )),
            None,
            &Stats::default(),
        );
        let orders = first.table.get("orders").expect("orders");
        let users = first.table.get("users").expect("users");
        for _ in 0..orders.config.breaker_failures {
            orders.state.breaker.record(false);
            users.state.breaker.record(false);
        }
        orders.state.window(Backend::New).record(true);
        users.state.window(Backend::New).record(true);
        assert_eq!(
            orders.state.breaker.state(),
            breaker::BreakerState::Open,
            "failures opened it"
        );

        // A reload that changes users' upstream (and adds a comment) but not orders.
        let second = Snapshot::build(
            config(&format!(
                "# reloaded\n{}{}",
                route("orders", "127.0.0.1:4000"),
                route("users", "127.0.0.1:5001")
            )),
            Some(&first),
            &Stats::default(),
        );
        let orders2 = second.table.get("orders").expect("orders");
        let users2 = second.table.get("users").expect("users");
        assert!(Arc::ptr_eq(&orders.state, &orders2.state));
        assert_eq!(orders2.state.breaker.state(), breaker::BreakerState::Open);
        assert_eq!(orders2.state.window(Backend::New).totals().0, 1);
        assert_eq!(users2.state.breaker.state(), breaker::BreakerState::Closed);
        assert_eq!(users2.state.window(Backend::New).totals(), (0, 0));
    }
}
