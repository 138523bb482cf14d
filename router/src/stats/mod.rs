//! Exact per-route aggregates, recorded lock-free on the request path.
//!
//! Every finished request (and every shadow copy) counts in one cell keyed by
//! route × backend × decision reason × primary/shadow × status class: requests,
//! errors and a latency [`Histogram`]. A route's [`RouteStats`] is looked up once,
//! when a config is loaded, and lives as long as the router (counters never go back
//! on a reload); a request only does atomic adds on it. Shadow pairs add compared /
//! matched / differing counts and the most frequent differing JSON paths, with
//! array positions collapsed (`/*/total`), bounded per route.
//!
//! Prometheus' `/metrics` and the OTLP metrics export both read these numbers, so
//! they do not depend on how many spans are sampled.

pub mod export;
pub mod histogram;

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::Duration;

pub use histogram::{Counts, Histogram};
use strangler_model::{Backend, Reason};

/// The name unrouted traffic is counted under.
pub const UNROUTED: &str = "(legacy)";

/// Distinct differing paths remembered per route; more count under [`OTHER_PATHS`].
pub const MAX_PATHS: usize = 32;
/// Where differing paths beyond [`MAX_PATHS`] are counted.
pub const OTHER_PATHS: &str = "(other)";

/// Whether a request is the one the client gets or the shadow copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// The request the client is answered from.
    Primary,
    /// The copy sent to the other side for comparison.
    Shadow,
}

impl Role {
    /// Both roles.
    pub const ALL: [Role; 2] = [Role::Primary, Role::Shadow];

    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Primary => "primary",
            Self::Shadow => "shadow",
        }
    }
}

/// Status classes, in cell order: no response, then 1xx .. 5xx.
pub const CLASSES: [&str; 6] = ["none", "1xx", "2xx", "3xx", "4xx", "5xx"];

/// The class position of a status code (0 when nothing was answered).
pub fn class_of(status: u16) -> usize {
    match status {
        0 => 0,
        100..=199 => 1,
        200..=299 => 2,
        300..=399 => 3,
        400..=499 => 4,
        _ => 5,
    }
}

/// What a shadow pair's comparison found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PairOutcome {
    /// Equal answers.
    Match,
    /// Different answers.
    Mismatch,
    /// The copy failed or never answered.
    Error,
    /// Not compared (body too large, not JSON, the client went away …).
    Skipped,
}

/// One cell's counters.
#[derive(Debug, Default)]
pub struct Cell {
    /// Requests.
    pub requests: AtomicU64,
    /// Requests that failed (no response or 5xx).
    pub errors: AtomicU64,
    /// Their latencies.
    pub latency: Histogram,
}

/// Where a request counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Key {
    /// The side that answered.
    pub backend: Backend,
    /// Why.
    pub reason: Reason,
    /// Primary or shadow copy.
    pub role: Role,
    /// The status sent (0: none).
    pub status: u16,
}

const CELLS: usize = 2 * Reason::ALL.len() * 2 * CLASSES.len();

fn backend_index(b: Backend) -> usize {
    match b {
        Backend::Legacy => 0,
        Backend::New => 1,
    }
}

fn reason_index(r: Reason) -> usize {
    Reason::ALL.iter().position(|x| *x == r).unwrap_or(0)
}

fn role_index(r: Role) -> usize {
    match r {
        Role::Primary => 0,
        Role::Shadow => 1,
    }
}

fn cell_index(backend: Backend, reason: Reason, role: Role, class: usize) -> usize {
    ((backend_index(backend) * Reason::ALL.len() + reason_index(reason)) * 2 + role_index(role))
        * CLASSES.len()
        + class
}

/// Shadow-pair outcome counts under one primary side.
#[derive(Debug, Default)]
struct PairCounts {
    matched: AtomicU64,
    differing: AtomicU64,
    errors: AtomicU64,
    skipped: AtomicU64,
}

impl PairCounts {
    fn snapshot(&self) -> PairSnapshot {
        PairSnapshot {
            matched: self.matched.load(Ordering::Relaxed),
            differing: self.differing.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            skipped: self.skipped.load(Ordering::Relaxed),
            paths: Vec::new(),
        }
    }
}

/// Shadow-pair counts of a route.
#[derive(Debug, Default)]
struct Pairs {
    /// By the primary's side (indexed like [`Backend::ALL`]): the collector counts
    /// a pair where the primary request counts, as it does for a pair's span.
    by_primary: [PairCounts; 2],
    /// Differing paths (array positions collapsed) and how often each differed.
    paths: Mutex<HashMap<String, u64>>,
}

/// One route's aggregates.
#[derive(Debug)]
pub struct RouteStats {
    name: String,
    /// Allocated on first use: most routes only ever fill a few cells.
    cells: Box<[OnceLock<Box<Cell>>]>,
    pairs: Pairs,
}

/// A cell's numbers at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CellSnapshot {
    /// The side.
    pub backend: Backend,
    /// The decision reason.
    pub reason: Reason,
    /// Primary or shadow.
    pub role: Role,
    /// Index into [`CLASSES`].
    pub class: usize,
    /// Requests.
    pub requests: u64,
    /// Failed requests.
    pub errors: u64,
    /// Latencies.
    pub latency: Counts,
}

/// A route's shadow-pair numbers at one moment.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PairSnapshot {
    /// Equal answers.
    pub matched: u64,
    /// Different answers.
    pub differing: u64,
    /// Copies that failed.
    pub errors: u64,
    /// Pairs not compared.
    pub skipped: u64,
    /// Differing paths with their counts, most frequent first.
    pub paths: Vec<(String, u64)>,
}

impl PairSnapshot {
    /// Pairs compared (matched + differing).
    pub fn compared(&self) -> u64 {
        self.matched + self.differing
    }
}

impl RouteStats {
    fn new(name: &str) -> Self {
        Self {
            name: name.to_string(),
            cells: (0..CELLS).map(|_| OnceLock::new()).collect(),
            pairs: Pairs::default(),
        }
    }

    /// The route's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Counts one finished request or shadow copy.
    pub fn record(&self, key: Key, failed: bool, latency: Duration) {
        let index = cell_index(key.backend, key.reason, key.role, class_of(key.status));
        let Some(slot) = self.cells.get(index) else {
            return;
        };
        let cell = slot.get_or_init(Box::default);
        cell.requests.fetch_add(1, Ordering::Relaxed);
        if failed {
            cell.errors.fetch_add(1, Ordering::Relaxed);
        }
        cell.latency.record(latency);
    }

    /// Counts one shadow pair's outcome and, when it differed, its paths. Runs
    /// after the client has its answer, so the lock here is off the request path.
    pub fn record_pair(&self, primary: Backend, outcome: PairOutcome, paths: &[String]) {
        let counts = &self.pairs.by_primary[backend_index(primary)];
        let counter = match outcome {
            PairOutcome::Match => &counts.matched,
            PairOutcome::Mismatch => &counts.differing,
            PairOutcome::Error => &counts.errors,
            PairOutcome::Skipped => &counts.skipped,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        if paths.is_empty() {
            return;
        }
        let mut seen = std::collections::HashSet::new();
        let mut top = self
            .pairs
            .paths
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for path in paths {
            let collapsed = collapse_positions(path);
            // `/0/total` and `/1/total` in one body are one difference.
            if !seen.insert(collapsed.clone()) {
                continue;
            }
            let key = if top.contains_key(&collapsed) || top.len() < MAX_PATHS {
                collapsed
            } else {
                OTHER_PATHS.to_string()
            };
            *top.entry(key).or_insert(0) += 1;
        }
    }

    /// Every used cell's numbers now.
    pub fn cells(&self) -> Vec<CellSnapshot> {
        let mut out = Vec::new();
        for backend in Backend::ALL {
            for reason in Reason::ALL {
                for role in Role::ALL {
                    for class in 0..CLASSES.len() {
                        let index = cell_index(backend, reason, role, class);
                        if let Some(cell) = self.cells.get(index).and_then(OnceLock::get) {
                            out.push(CellSnapshot {
                                backend,
                                reason,
                                role,
                                class,
                                requests: cell.requests.load(Ordering::Relaxed),
                                errors: cell.errors.load(Ordering::Relaxed),
                                latency: cell.latency.counts(),
                            });
                        }
                    }
                }
            }
        }
        out
    }

    /// The shadow-pair numbers now.
    pub fn pairs(&self) -> PairSnapshot {
        let mut paths: Vec<(String, u64)> = self
            .pairs
            .paths
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .map(|(p, n)| (p.clone(), *n))
            .collect();
        paths.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        let mut total = PairSnapshot {
            paths,
            ..PairSnapshot::default()
        };
        for counts in &self.pairs.by_primary {
            let one = counts.snapshot();
            total.matched += one.matched;
            total.differing += one.differing;
            total.errors += one.errors;
            total.skipped += one.skipped;
        }
        total
    }

    /// The shadow-pair counts of pairs whose primary `primary` answered (no paths).
    pub fn pairs_by_primary(&self, primary: Backend) -> PairSnapshot {
        self.pairs.by_primary[backend_index(primary)].snapshot()
    }
}

/// `/3/items/0/price` → `/*/items/*/price`: array positions vary per body, the field
/// that differs does not.
pub fn collapse_positions(path: &str) -> String {
    path.split('/')
        .map(|segment| {
            if !segment.is_empty() && segment.bytes().all(|b| b.is_ascii_digit()) {
                "*"
            } else {
                segment
            }
        })
        .collect::<Vec<_>>()
        .join("/")
}

/// Every route's aggregates, by name. The lock is taken when a config is loaded and
/// when the numbers are read (scrape, export), never by a request.
#[derive(Debug, Default)]
pub struct Stats {
    routes: RwLock<HashMap<String, Arc<RouteStats>>>,
}

impl Stats {
    /// The aggregates of route `name`, created on first use.
    pub fn route(&self, name: &str) -> Arc<RouteStats> {
        if let Some(found) = self
            .routes
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(name)
        {
            return Arc::clone(found);
        }
        let mut routes = self
            .routes
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        Arc::clone(
            routes
                .entry(name.to_string())
                .or_insert_with(|| Arc::new(RouteStats::new(name))),
        )
    }

    /// Every route's aggregates, by name.
    pub fn all(&self) -> Vec<Arc<RouteStats>> {
        let mut all: Vec<_> = self
            .routes
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .values()
            .cloned()
            .collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        all
    }

    /// The Prometheus text exposition of the request aggregates.
    pub fn render_prometheus(&self, out: &mut String) {
        let routes = self.all();
        let snapshots: Vec<(String, Vec<CellSnapshot>, PairSnapshot)> = routes
            .iter()
            .map(|r| (escape(r.name()), r.cells(), r.pairs()))
            .collect();
        let primary = |c: &&CellSnapshot| c.role == Role::Primary;

        header(
            out,
            "strangler_requests_total",
            "counter",
            "Requests by route, backend and status class",
        );
        for (route, cells, _) in &snapshots {
            for backend in Backend::ALL {
                for (class, name) in CLASSES.iter().enumerate() {
                    let n: u64 = cells
                        .iter()
                        .filter(primary)
                        .filter(|c| c.backend == backend && c.class == class)
                        .map(|c| c.requests)
                        .sum();
                    if n > 0 {
                        let _ = writeln!(
                            out,
                            "strangler_requests_total{{backend=\"{}\",route=\"{route}\",status_class=\"{name}\"}} {n}",
                            backend.as_str()
                        );
                    }
                }
            }
        }
        header(
            out,
            "strangler_upstream_errors_total",
            "counter",
            "Requests that failed at the upstream (no response or 5xx)",
        );
        for (route, cells, _) in &snapshots {
            for backend in Backend::ALL {
                let side: Vec<_> = cells
                    .iter()
                    .filter(primary)
                    .filter(|c| c.backend == backend)
                    .collect();
                if !side.is_empty() {
                    let n: u64 = side.iter().map(|c| c.errors).sum();
                    let _ = writeln!(
                        out,
                        "strangler_upstream_errors_total{{backend=\"{}\",route=\"{route}\"}} {n}",
                        backend.as_str()
                    );
                }
            }
        }
        header(
            out,
            "strangler_decisions_total",
            "counter",
            "Routing decisions by reason",
        );
        for (route, cells, _) in &snapshots {
            for backend in Backend::ALL {
                for reason in Reason::ALL {
                    let n: u64 = cells
                        .iter()
                        .filter(primary)
                        .filter(|c| c.backend == backend && c.reason == reason)
                        .map(|c| c.requests)
                        .sum();
                    if n > 0 {
                        let _ = writeln!(
                            out,
                            "strangler_decisions_total{{backend=\"{}\",reason=\"{}\",route=\"{route}\"}} {n}",
                            backend.as_str(),
                            reason.as_str()
                        );
                    }
                }
            }
        }
        for (metric, role, help) in [
            (
                "strangler_request_duration_seconds",
                Role::Primary,
                "Time from request to end of response",
            ),
            (
                "strangler_shadow_duration_seconds",
                Role::Shadow,
                "Time a shadow copy took to answer",
            ),
        ] {
            header(out, metric, "histogram", help);
            for (route, cells, _) in &snapshots {
                for backend in Backend::ALL {
                    let side: Vec<_> = cells
                        .iter()
                        .filter(|c| c.role == role && c.backend == backend)
                        .collect();
                    if side.is_empty() {
                        continue;
                    }
                    let mut merged = Counts::default();
                    for c in &side {
                        merged = add(&merged, &c.latency);
                    }
                    let labels = format!("backend=\"{}\",route=\"{route}\"", backend.as_str());
                    for le in LATENCY_BUCKETS {
                        let _ = writeln!(
                            out,
                            "{metric}_bucket{{{labels},le=\"{le}\"}} {}",
                            merged.at_most(le * 1e6)
                        );
                    }
                    let _ = writeln!(
                        out,
                        "{metric}_bucket{{{labels},le=\"+Inf\"}} {}",
                        merged.count
                    );
                    #[allow(clippy::cast_precision_loss)]
                    let seconds = merged.sum_micros as f64 / 1e6;
                    let _ = writeln!(out, "{metric}_sum{{{labels}}} {seconds}");
                    let _ = writeln!(out, "{metric}_count{{{labels}}} {}", merged.count);
                }
            }
        }
        header(
            out,
            "strangler_shadow_requests_total",
            "counter",
            "Shadow copies by route, backend and status class",
        );
        for (route, cells, _) in &snapshots {
            for c in cells.iter().filter(|c| c.role == Role::Shadow) {
                let _ = writeln!(
                    out,
                    "strangler_shadow_requests_total{{backend=\"{}\",reason=\"{}\",route=\"{route}\",status_class=\"{}\"}} {}",
                    c.backend.as_str(),
                    c.reason.as_str(),
                    CLASSES[c.class],
                    c.requests
                );
            }
        }
        header(
            out,
            "strangler_shadow_pairs_total",
            "counter",
            "Shadow pairs by outcome",
        );
        for (route, _, pairs) in &snapshots {
            for (outcome, n) in [
                ("match", pairs.matched),
                ("mismatch", pairs.differing),
                ("error", pairs.errors),
                ("skipped", pairs.skipped),
            ] {
                if pairs.compared() + pairs.errors + pairs.skipped > 0 {
                    let _ = writeln!(
                        out,
                        "strangler_shadow_pairs_total{{outcome=\"{outcome}\",route=\"{route}\"}} {n}"
                    );
                }
            }
        }
        header(
            out,
            "strangler_shadow_diff_paths_total",
            "counter",
            "Differing shadow pairs by JSON path (array positions as *)",
        );
        for (route, _, pairs) in &snapshots {
            for (path, n) in &pairs.paths {
                let _ = writeln!(
                    out,
                    "strangler_shadow_diff_paths_total{{path=\"{}\",route=\"{route}\"}} {n}",
                    escape(path)
                );
            }
        }
    }
}

/// Prometheus `le` bounds in seconds: a proxy hop is sub-millisecond, a monolith
/// page can take seconds.
pub const LATENCY_BUCKETS: [f64; 14] = [
    0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

fn add(a: &Counts, b: &Counts) -> Counts {
    let len = a.buckets.len().max(b.buckets.len());
    let at = |v: &[u64], i: usize| v.get(i).copied().unwrap_or(0);
    Counts {
        buckets: (0..len)
            .map(|i| at(&a.buckets, i) + at(&b.buckets, i))
            .collect(),
        count: a.count + b.count,
        sum_micros: a.sum_micros + b.sum_micros,
    }
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// A label value in the text format: backslash, quote and newline escaped.
fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(backend: Backend, reason: Reason, role: Role, status: u16) -> Key {
        Key {
            backend,
            reason,
            role,
            status,
        }
    }

    #[test]
    fn each_request_counts_in_exactly_one_cell() {
        let stats = Stats::default();
        let orders = stats.route("orders");
        orders.record(
            key(Backend::New, Reason::Flag, Role::Primary, 200),
            false,
            Duration::from_millis(3),
        );
        orders.record(
            key(Backend::New, Reason::Flag, Role::Primary, 200),
            false,
            Duration::from_millis(4),
        );
        orders.record(
            key(Backend::Legacy, Reason::Fallback, Role::Primary, 502),
            true,
            Duration::from_millis(9),
        );
        orders.record(
            key(Backend::Legacy, Reason::Flag, Role::Shadow, 200),
            false,
            Duration::from_millis(5),
        );
        let cells = orders.cells();
        assert_eq!(cells.len(), 3);
        let new = cells
            .iter()
            .find(|c| c.backend == Backend::New)
            .expect("new");
        assert_eq!((new.requests, new.errors, new.class), (2, 0, 2));
        assert_eq!(new.latency.count, 2);
        let fallback = cells
            .iter()
            .find(|c| c.reason == Reason::Fallback)
            .expect("fallback");
        assert_eq!(
            (fallback.requests, fallback.errors, fallback.class),
            (1, 1, 5)
        );
        // The same name later (a reload) is the same counters.
        assert!(Arc::ptr_eq(&orders, &stats.route("orders")));
    }

    #[test]
    fn differing_paths_collapse_array_positions_and_stay_bounded() {
        let stats = Stats::default();
        let r = stats.route("orders");
        r.record_pair(
            Backend::Legacy,
            PairOutcome::Mismatch,
            &["/0/total".into(), "/1/total".into(), "/2/id".into()],
        );
        r.record_pair(Backend::Legacy, PairOutcome::Mismatch, &["/total".into()]);
        r.record_pair(Backend::Legacy, PairOutcome::Match, &[]);
        let p = r.pairs();
        assert_eq!((p.matched, p.differing, p.compared()), (1, 2, 3));
        assert_eq!(
            p.paths,
            vec![
                ("/*/id".to_string(), 1),
                ("/*/total".to_string(), 1),
                ("/total".to_string(), 1)
            ]
        );
        for i in 0..100 {
            r.record_pair(
                Backend::Legacy,
                PairOutcome::Mismatch,
                &[format!("/field{i}")],
            );
        }
        let p = r.pairs();
        assert_eq!(p.paths.len(), MAX_PATHS + 1);
        assert!(
            p.paths
                .iter()
                .any(|(path, n)| path == OTHER_PATHS && *n == 100 - (MAX_PATHS as u64 - 3))
        );
    }

    #[test]
    fn prometheus_text_keeps_the_metric_names_and_labels() {
        let stats = Stats::default();
        let r = stats.route("orders");
        r.record(
            key(Backend::New, Reason::Flag, Role::Primary, 200),
            false,
            Duration::from_millis(3),
        );
        r.record(
            key(Backend::Legacy, Reason::Default, Role::Primary, 502),
            true,
            Duration::from_millis(1),
        );
        let mut text = String::new();
        stats.render_prometheus(&mut text);
        for line in [
            r#"strangler_requests_total{backend="new",route="orders",status_class="2xx"} 1"#,
            r#"strangler_upstream_errors_total{backend="legacy",route="orders"} 1"#,
            r#"strangler_decisions_total{backend="legacy",reason="default",route="orders"} 1"#,
            r#"strangler_request_duration_seconds_bucket{backend="new",route="orders",le="0.005"} 1"#,
            r#"strangler_request_duration_seconds_bucket{backend="new",route="orders",le="0.0025"} 0"#,
            r#"strangler_request_duration_seconds_count{backend="new",route="orders"} 1"#,
        ] {
            assert!(text.contains(line), "{line} missing:\n{text}");
        }
    }
}
