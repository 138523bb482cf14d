//! Shadow copies: sending a request to the other side in the background, and keeping
//! per-route comparison results, mismatch samples and noise calibration.
//!
//! The primary never waits for a copy: copies run in their own tasks with their own
//! timeout, and a per-route semaphore caps how many are in flight; when it is
//! exhausted the pair is skipped and counted.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde::Serialize;
use tokio::sync::Semaphore;

use crate::compare::{Captured, Verdict};

/// The header every shadow copy carries.
pub const SHADOW_HEADER: &str = "x-strangler-shadow";
/// Mismatch samples kept per route.
const SAMPLES: usize = 20;
/// Bytes of each body kept in a sample.
const SAMPLE_BODY: usize = 4_096;

/// Request headers a copy does not forward (hop-by-hop, or set per connection).
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "content-length",
    "traceparent",
    "tracestate",
];

/// What a copy needs to be sent.
#[derive(Debug, Clone)]
pub struct CopyRequest {
    /// Method.
    pub method: http::Method,
    /// Path and query.
    pub path_and_query: String,
    /// Headers to send (hop-by-hop removed by [`copy_headers`]).
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

/// The headers of a request worth forwarding on a copy.
pub fn copy_headers(headers: &http::HeaderMap) -> Vec<(String, String)> {
    headers
        .iter()
        .filter(|(k, _)| !HOP_BY_HOP.contains(&k.as_str()))
        .filter_map(|(k, v)| Some((k.as_str().to_string(), v.to_str().ok()?.to_string())))
        .collect()
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

#[derive(Debug, Default)]
struct RouteState {
    stats: RouteStats,
    calibration: Option<Calibration>,
    limit: Option<Arc<Semaphore>>,
    consecutive_errors: u32,
    paused_until: Option<std::time::Instant>,
}

/// After this many failed copies in a row the shadow target is left alone for
/// [`PAUSE`]: a dead shadow must not cost the router a failed connect per request.
const ERRORS_BEFORE_PAUSE: u32 = 20;
/// How long copies pause before one is tried again.
const PAUSE: Duration = Duration::from_secs(1);

/// Shadow state for every route.
#[derive(Debug)]
pub struct Shadows {
    routes: Mutex<HashMap<String, RouteState>>,
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
    /// Empty state, with a one-thread runtime for copies (or none if it cannot start,
    /// in which case copies run on the caller's runtime).
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
            routes: Mutex::new(HashMap::new()),
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

    fn with<T>(&self, route: &str, f: impl FnOnce(&mut RouteState) -> T) -> T {
        let mut routes = self.routes.lock().unwrap_or_else(|p| p.into_inner());
        f(routes.entry(route.to_string()).or_default())
    }

    /// A slot for one copy, or why not (counted as skipped).
    pub fn acquire(
        &self,
        route: &str,
        max_concurrent: usize,
    ) -> Result<tokio::sync::OwnedSemaphorePermit, NoCopy> {
        let limit = self.with(route, |s| {
            if s.paused_until
                .is_some_and(|t| std::time::Instant::now() < t)
            {
                s.stats.skipped += 1;
                return None;
            }
            Some(Arc::clone(s.limit.get_or_insert_with(|| {
                Arc::new(Semaphore::new(max_concurrent))
            })))
        });
        let Some(limit) = limit else {
            return Err(NoCopy::TargetFailing);
        };
        limit.try_acquire_owned().map_err(|_| {
            self.with(route, |s| s.stats.skipped += 1);
            NoCopy::AtCapacity
        })
    }

    /// Counts a pair that could not be compared.
    pub fn skipped(&self, route: &str) {
        self.with(route, |s| s.stats.skipped += 1);
    }

    /// Records a compared pair (or a failed copy, `verdict` = `None`).
    pub fn record(&self, route: &str, verdict: Option<&Verdict>, sample: impl FnOnce() -> Sample) {
        self.with(route, |s| {
            if verdict.is_none() {
                s.consecutive_errors += 1;
                if s.consecutive_errors >= ERRORS_BEFORE_PAUSE {
                    s.consecutive_errors = 0;
                    s.paused_until = Some(std::time::Instant::now() + PAUSE);
                }
            } else {
                s.consecutive_errors = 0;
            }
        });
        self.with(route, |s| match verdict {
            None => s.stats.shadow_errors += 1,
            Some(Verdict::Match) => {
                s.stats.compared += 1;
                s.stats.matches += 1;
            }
            Some(Verdict::Mismatch(paths)) => {
                s.stats.compared += 1;
                s.stats.mismatches += 1;
                for p in paths {
                    *s.stats.paths.entry(p.clone()).or_default() += 1;
                }
                if s.stats.samples.len() == SAMPLES {
                    s.stats.samples.pop_front();
                }
                s.stats.samples.push_back(sample());
            }
            Some(Verdict::Skipped(_)) => s.stats.skipped += 1,
        });
    }

    /// The route's results.
    pub fn stats(&self, route: &str) -> RouteStats {
        self.with(route, |s| s.stats.clone())
    }

    /// Starts (or restarts) calibration for `requests` pairs.
    pub fn start_calibration(&self, route: &str, requests: u64) {
        self.with(route, |s| {
            s.calibration = Some(Calibration {
                target: requests.max(1),
                ..Calibration::default()
            });
        });
    }

    /// Whether this request should be a calibration pair (reserves its place).
    pub fn take_calibration_slot(&self, route: &str) -> bool {
        self.with(route, |s| match &mut s.calibration {
            // `done` counts finished pairs; allow a few in flight beyond it.
            Some(c) if c.done + c.errors < c.target => true,
            _ => false,
        })
    }

    /// Records a calibration pair.
    pub fn record_calibration(&self, route: &str, verdict: Option<&Verdict>) {
        self.with(route, |s| {
            if let Some(c) = &mut s.calibration {
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
            }
        });
    }

    /// The calibration, if one was started.
    pub fn calibration(&self, route: &str) -> Option<Calibration> {
        self.with(route, |s| s.calibration.clone())
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
        let s = Shadows::new();
        let a = s.acquire("r", 2).expect("first");
        let _b = s.acquire("r", 2).expect("second");
        assert_eq!(s.acquire("r", 2).err(), Some(NoCopy::AtCapacity));
        assert_eq!(s.stats("r").skipped, 1);
        drop(a);
        assert!(s.acquire("r", 2).is_ok());
    }

    #[test]
    fn a_failing_shadow_target_pauses_copies_briefly() {
        let s = Shadows::new();
        for _ in 0..ERRORS_BEFORE_PAUSE {
            assert!(s.acquire("r", 10).is_ok());
            s.record("r", None, || unreachable!());
        }
        assert_eq!(s.acquire("r", 10).err(), Some(NoCopy::TargetFailing));
        assert_eq!(s.stats("r").shadow_errors, u64::from(ERRORS_BEFORE_PAUSE));
    }

    #[test]
    fn calibration_collects_noise_rates_until_the_target() {
        let s = Shadows::new();
        assert!(!s.take_calibration_slot("r"));
        s.start_calibration("r", 4);
        for i in 0..6 {
            if s.take_calibration_slot("r") {
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
                s.record_calibration("r", Some(&v));
            }
        }
        let c = s.calibration("r").expect("calibration");
        assert_eq!((c.done, c.target), (4, 4));
        assert_eq!(c.suggestions(), vec![("/generated_at".to_string(), 0.5)]);
    }

    #[test]
    fn mismatches_keep_bounded_samples_and_path_counts() {
        let s = Shadows::new();
        for i in 0..30 {
            s.record("r", Some(&Verdict::Mismatch(vec!["/a".into()])), || {
                Sample {
                    at: i,
                    request: format!("GET /{i}"),
                    pair_id: String::new(),
                    trace_id: String::new(),
                    primary_backend: "legacy".into(),
                    paths: vec!["/a".into()],
                    primary_status: 200,
                    primary_body: String::new(),
                    shadow_status: 200,
                    shadow_body: String::new(),
                }
            });
        }
        s.record("r", Some(&Verdict::Match), || unreachable!());
        let st = s.stats("r");
        assert_eq!((st.compared, st.matches, st.mismatches), (31, 1, 30));
        assert_eq!(st.paths.get("/a"), Some(&30));
        assert_eq!(st.samples.len(), SAMPLES);
        assert_eq!(st.samples.back().map(|x| x.at), Some(29));
    }
}
