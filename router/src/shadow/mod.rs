//! Shadow copies: sending a request to the other side in the background, and keeping
//! per-route comparison results, mismatch samples and noise calibration.
//!
//! The primary never waits for a copy: copies run in their own tasks with their own
//! timeout, and a per-route semaphore caps how many are in flight; when it is
//! exhausted the pair is skipped and counted.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;
use tokio::sync::Semaphore;

pub mod compare;
pub mod pair;

use compare::{Captured, Verdict};

/// The header every shadow copy carries.
pub const SHADOW_HEADER: &str = "x-strangler-shadow";
/// Mismatch samples kept per route.
const SAMPLES: usize = 20;
/// Bytes of each body kept in a sample.
const SAMPLE_BODY: usize = 4_096;

/// What a copy needs to be sent.
#[derive(Debug, Clone)]
pub struct CopyRequest {
    /// Method.
    pub method: http::Method,
    /// Path and query.
    pub path_and_query: String,
    /// Headers to send (hop-by-hop removed by [`crate::proxy::headers::copy_headers`]).
    pub headers: Vec<(String, String)>,
    /// The request body.
    pub body: Vec<u8>,
    /// Where to send it.
    pub upstream: SocketAddr,
    /// How long it may take.
    pub timeout: Duration,
    /// Largest response body kept for comparison.
    pub max_body_bytes: usize,
}

/// Sends a copy and captures the answer (errors as text).
pub async fn send_copy(
    client: &reqwest::Client,
    request: CopyRequest,
    extra_headers: Vec<(String, String)>,
) -> Result<Captured, String> {
    let url = format!("http://{}{}", request.upstream, request.path_and_query);
    let mut builder = client
        .request(request.method, &url)
        .timeout(request.timeout)
        .header(SHADOW_HEADER, "1");
    for (k, v) in request.headers.iter().chain(extra_headers.iter()) {
        builder = builder.header(k.as_str(), v.as_str());
    }
    if !request.body.is_empty() {
        builder = builder.body(request.body);
    }
    let mut response = builder.send().await.map_err(|e| {
        if e.is_timeout() {
            format!("timed out after {:?}", request.timeout)
        } else if e.is_connect() {
            "connection failed".to_string()
        } else {
            e.to_string()
        }
    })?;
    let status = response.status().as_u16();
    let headers = response
        .headers()
        .iter()
        .filter_map(|(k, v)| Some((k.as_str().to_string(), v.to_str().ok()?.to_string())))
        .collect();
    let mut body = Vec::new();
    let mut truncated = false;
    loop {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                if body.len() + chunk.len() > request.max_body_bytes {
                    truncated = true;
                    break;
                }
                body.extend_from_slice(&chunk);
            }
            Ok(None) => break,
            Err(e) => return Err(format!("reading the body: {e}")),
        }
    }
    Ok(Captured {
        status,
        headers,
        body,
        truncated,
    })
}

/// A mismatching pair kept for people to look at.
#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    /// Seconds since the epoch.
    pub at: u64,
    /// `GET /api/orders/7`.
    pub request: String,
    /// Links the two spans.
    pub pair_id: String,
    /// The trace.
    pub trace_id: String,
    /// Which side answered the client.
    pub primary_backend: String,
    /// What differed.
    pub paths: Vec<String>,
    /// Both sides' values where they differ (the first few paths).
    pub differences: Vec<compare::Difference>,
    /// Primary status.
    pub primary_status: u16,
    /// Primary body, truncated.
    pub primary_body: String,
    /// Shadow status (0 when it failed).
    pub shadow_status: u16,
    /// Shadow body or error, truncated.
    pub shadow_body: String,
}

/// One route's comparison results since the router started.
#[derive(Debug, Default, Clone, Serialize)]
pub struct RouteStats {
    /// Pairs compared (match + mismatch).
    pub compared: u64,
    /// Pairs that matched.
    pub matches: u64,
    /// Pairs that differed.
    pub mismatches: u64,
    /// Copies that failed (connect, timeout, reset).
    pub shadow_errors: u64,
    /// Pairs not compared: cap reached or bodies over the limit.
    pub skipped: u64,
    /// How often each path differed.
    pub paths: HashMap<String, u64>,
    /// The latest mismatches, newest last.
    pub samples: VecDeque<Sample>,
}

/// Learning which paths differ between two legacy answers to the same request.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Calibration {
    /// Pairs wanted.
    pub target: u64,
    /// Pairs compared so far.
    pub done: u64,
    /// Legacy-vs-legacy copies that failed.
    pub errors: u64,
    /// How often each path differed.
    pub paths: HashMap<String, u64>,
}

impl Calibration {
    /// Paths that differed, with their noise rate, most frequent first.
    pub fn suggestions(&self) -> Vec<(String, f64)> {
        let mut out: Vec<(String, f64)> = self
            .paths
            .iter()
            .map(|(p, n)| (p.clone(), *n as f64 / self.done.max(1) as f64))
            .collect();
        out.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        out
    }
}

/// After this many failed copies in a row the shadow target is left alone for
/// [`PAUSE`]: a dead shadow must not cost the router a failed connect per request.
const ERRORS_BEFORE_PAUSE: u32 = 20;
/// How long copies pause before one is tried again.
const PAUSE: Duration = Duration::from_secs(1);

/// Where copies and comparisons run, and the client they are sent with; shared by
/// every route.
#[derive(Debug)]
pub struct Shadows {
    /// The client copies are sent with (pooled keep-alive connections).
    pub client: reqwest::Client,
    /// Copies and comparisons run here, off the proxy's worker threads, so their
    /// work never sits in front of a primary request in a worker's queue.
    runtime: Option<tokio::runtime::Runtime>,
}

impl Drop for Shadows {
    fn drop(&mut self) {
        // Dropping a runtime inside another one panics; let it go in the background.
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

impl Default for Shadows {
    fn default() -> Self {
        Self::new()
    }
}

/// Why a pair will not happen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoCopy {
    /// The concurrency cap is reached.
    AtCapacity,
    /// The shadow target failed repeatedly; copies pause briefly.
    TargetFailing,
}

impl Shadows {
    /// A one-thread runtime for copies (or none if it cannot start, in which case
    /// copies run on the caller's runtime).
    pub fn new() -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("strangler-shadow")
            // SCHED_IDLE: copies use only CPU no primary request wants. Under
            // saturation they slow down, hit the cap and are skipped (and counted).
            .on_thread_start(|| {
                use thread_priority::{
                    NormalThreadSchedulePolicy, ThreadPriority, ThreadSchedulePolicy,
                };
                if let Err(e) = thread_priority::set_thread_priority_and_policy(
                    thread_priority::thread_native_id(),
                    ThreadPriority::Min,
                    ThreadSchedulePolicy::Normal(NormalThreadSchedulePolicy::Idle),
                ) {
                    tracing::debug!("shadow thread keeps normal priority: {e:?}");
                }
            })
            .enable_all()
            .build()
            .map_err(|e| tracing::warn!("no separate runtime for shadow copies: {e}"))
            .ok();
        Self {
            client: reqwest::Client::builder()
                .pool_idle_timeout(Duration::from_secs(60))
                .build()
                .unwrap_or_else(|_| reqwest::Client::new()),
            runtime,
        }
    }

    /// Runs a copy or a comparison in the background.
    pub fn spawn<F>(&self, task: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        match &self.runtime {
            Some(rt) => {
                rt.spawn(task);
            }
            None => {
                tokio::spawn(task);
            }
        }
    }
}

/// Milliseconds since the process's first use of this clock: a pause deadline fits
/// in an atomic.
fn now_ms() -> u64 {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    let start = *START.get_or_init(Instant::now);
    u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// Results, samples and calibration that only the background comparison writes.
#[derive(Debug, Default)]
struct Findings {
    paths: HashMap<String, u64>,
    samples: VecDeque<Sample>,
    calibration: Option<Calibration>,
}

/// One route's shadow state. What a request touches — the cap, the pause, the
/// skip count, whether calibration wants a pair — is atomics; the differing paths,
/// samples and calibration details sit behind a lock that only the comparison
/// task (off the request path) and the admin API take.
#[derive(Debug)]
pub struct ShadowState {
    limit: Arc<Semaphore>,
    compared: AtomicU64,
    matches: AtomicU64,
    mismatches: AtomicU64,
    shadow_errors: AtomicU64,
    skipped: AtomicU64,
    consecutive_errors: AtomicU32,
    /// Copies pause until this [`now_ms`]; 0 when not paused.
    paused_until_ms: AtomicU64,
    /// Calibration pairs still wanted (target minus finished); 0 when not calibrating.
    calibration_open: AtomicU64,
    findings: Mutex<Findings>,
}

impl ShadowState {
    /// Empty state with room for `max_concurrent` copies in flight.
    pub fn new(max_concurrent: usize) -> Self {
        Self {
            limit: Arc::new(Semaphore::new(max_concurrent.max(1))),
            compared: AtomicU64::new(0),
            matches: AtomicU64::new(0),
            mismatches: AtomicU64::new(0),
            shadow_errors: AtomicU64::new(0),
            skipped: AtomicU64::new(0),
            consecutive_errors: AtomicU32::new(0),
            paused_until_ms: AtomicU64::new(0),
            calibration_open: AtomicU64::new(0),
            findings: Mutex::new(Findings::default()),
        }
    }

    fn findings(&self) -> std::sync::MutexGuard<'_, Findings> {
        self.findings.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A slot for one copy, or why not (counted as skipped).
    pub fn acquire(&self) -> Result<tokio::sync::OwnedSemaphorePermit, NoCopy> {
        if now_ms() < self.paused_until_ms.load(Ordering::Acquire) {
            self.skipped();
            return Err(NoCopy::TargetFailing);
        }
        Arc::clone(&self.limit).try_acquire_owned().map_err(|_| {
            self.skipped();
            NoCopy::AtCapacity
        })
    }

    /// Counts a pair that could not be compared.
    pub fn skipped(&self) {
        self.skipped.fetch_add(1, Ordering::Relaxed);
    }

    /// Records a compared pair (or a failed copy, `verdict` = `None`).
    pub fn record(&self, verdict: Option<&Verdict>, sample: impl FnOnce() -> Sample) {
        if verdict.is_none() {
            let errors = self.consecutive_errors.fetch_add(1, Ordering::AcqRel) + 1;
            if errors >= ERRORS_BEFORE_PAUSE {
                self.consecutive_errors.store(0, Ordering::Release);
                self.paused_until_ms.store(
                    now_ms() + u64::try_from(PAUSE.as_millis()).unwrap_or(1_000),
                    Ordering::Release,
                );
            }
        } else {
            self.consecutive_errors.store(0, Ordering::Release);
        }
        match verdict {
            None => {
                self.shadow_errors.fetch_add(1, Ordering::Relaxed);
            }
            Some(Verdict::Match) => {
                self.compared.fetch_add(1, Ordering::Relaxed);
                self.matches.fetch_add(1, Ordering::Relaxed);
            }
            Some(Verdict::Mismatch(paths)) => {
                let sample = sample();
                let mut f = self.findings();
                // `/0/total` and `/1/total` are one difference of every element:
                // counted once per pair as `/*/total` (samples keep the real index).
                let collapsed: std::collections::BTreeSet<String> = paths
                    .iter()
                    .map(|p| crate::stats::collapse_positions(p))
                    .collect();
                for p in collapsed {
                    *f.paths.entry(p).or_default() += 1;
                }
                if f.samples.len() == SAMPLES {
                    f.samples.pop_front();
                }
                f.samples.push_back(sample);
                // Counted under the lock so a reader never sees a count without its paths.
                self.compared.fetch_add(1, Ordering::Relaxed);
                self.mismatches.fetch_add(1, Ordering::Relaxed);
            }
            Some(Verdict::Skipped(_)) => self.skipped(),
        }
    }

    /// The route's results.
    pub fn stats(&self) -> RouteStats {
        let f = self.findings();
        RouteStats {
            compared: self.compared.load(Ordering::Relaxed),
            matches: self.matches.load(Ordering::Relaxed),
            mismatches: self.mismatches.load(Ordering::Relaxed),
            shadow_errors: self.shadow_errors.load(Ordering::Relaxed),
            skipped: self.skipped.load(Ordering::Relaxed),
            paths: f.paths.clone(),
            samples: f.samples.clone(),
        }
    }

    /// Starts (or restarts) calibration for `requests` pairs.
    pub fn start_calibration(&self, requests: u64) {
        let target = requests.max(1);
        let mut f = self.findings();
        f.calibration = Some(Calibration {
            target,
            ..Calibration::default()
        });
        self.calibration_open.store(target, Ordering::Release);
    }

    /// Whether this request should be a calibration pair. Pairs in flight are not
    /// reserved: a few beyond the target may run, and are not counted.
    pub fn take_calibration_slot(&self) -> bool {
        self.calibration_open.load(Ordering::Acquire) > 0
    }

    /// Records a calibration pair.
    pub fn record_calibration(&self, verdict: Option<&Verdict>) {
        let mut f = self.findings();
        if let Some(c) = &mut f.calibration {
            if c.done + c.errors >= c.target {
                return;
            }
            match verdict {
                None | Some(Verdict::Skipped(_)) => c.errors += 1,
                Some(Verdict::Match) => c.done += 1,
                Some(Verdict::Mismatch(paths)) => {
                    c.done += 1;
                    for p in paths {
                        *c.paths.entry(p.clone()).or_default() += 1;
                    }
                }
            }
            self.calibration_open
                .store(c.target - (c.done + c.errors), Ordering::Release);
        }
    }

    /// The calibration, if one was started.
    pub fn calibration(&self) -> Option<Calibration> {
        self.findings().calibration.clone()
    }
}

/// Truncates a body for a sample.
pub fn sample_body(body: &[u8]) -> String {
    let end = body.len().min(SAMPLE_BODY);
    let mut text = String::from_utf8_lossy(&body[..end]).into_owned();
    if body.len() > SAMPLE_BODY {
        text.push('…');
    }
    text
}

/// Seconds since the epoch.
pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_skips_and_counts_instead_of_queueing() {
        let s = ShadowState::new(2);
        let a = s.acquire().expect("first");
        let _b = s.acquire().expect("second");
        assert_eq!(s.acquire().err(), Some(NoCopy::AtCapacity));
        assert_eq!(s.stats().skipped, 1);
        drop(a);
        assert!(s.acquire().is_ok());
    }

    #[test]
    fn a_failing_shadow_target_pauses_copies_briefly() {
        let s = ShadowState::new(10);
        for _ in 0..ERRORS_BEFORE_PAUSE {
            assert!(s.acquire().is_ok());
            s.record(None, || unreachable!());
        }
        assert_eq!(s.acquire().err(), Some(NoCopy::TargetFailing));
        assert_eq!(s.stats().shadow_errors, u64::from(ERRORS_BEFORE_PAUSE));
    }

    #[test]
    fn calibration_collects_noise_rates_until_the_target() {
        let s = ShadowState::new(10);
        assert!(!s.take_calibration_slot());
        s.start_calibration(4);
        for i in 0..6 {
            if s.take_calibration_slot() {
                let paths = if i % 2 == 0 {
                    vec!["/generated_at".to_string()]
                } else {
                    vec![]
                };
                let v = if paths.is_empty() {
                    Verdict::Match
                } else {
                    Verdict::Mismatch(paths)
                };
                s.record_calibration(Some(&v));
            }
        }
        let c = s.calibration().expect("calibration");
        assert!(!s.take_calibration_slot(), "done: no more pairs");
        assert_eq!((c.done, c.target), (4, 4));
        assert_eq!(c.suggestions(), vec![("/generated_at".to_string(), 0.5)]);
    }

    #[test]
    fn mismatches_keep_bounded_samples_and_path_counts() {
        let s = ShadowState::new(10);
        for i in 0..30 {
            s.record(Some(&Verdict::Mismatch(vec!["/a".into()])), || Sample {
                at: i,
                request: format!("GET /{i}"),
                pair_id: String::new(),
                trace_id: String::new(),
                primary_backend: "legacy".into(),
                paths: vec!["/a".into()],
                differences: Vec::new(),
                primary_status: 200,
                primary_body: String::new(),
                shadow_status: 200,
                shadow_body: String::new(),
            });
        }
        s.record(Some(&Verdict::Match), || unreachable!());
        let st = s.stats();
        assert_eq!((st.compared, st.matches, st.mismatches), (31, 1, 30));
        assert_eq!(st.paths.get("/a"), Some(&30));
        assert_eq!(st.samples.len(), SAMPLES);
        assert_eq!(st.samples.back().map(|x| x.at), Some(29));
    }
}
