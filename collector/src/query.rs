//! Old-vs-new comparison queries, answered from ClickHouse.

use serde::{Deserialize, Serialize};

use crate::store::StoreError;
use crate::store::clickhouse::ClickHouseStore;

/// One side's numbers over a window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, clickhouse::Row)]
pub struct SideStats {
    /// `legacy` or `new`.
    pub backend: String,
    /// 1 for shadow copies.
    pub shadow: u8,
    /// Requests.
    pub requests: u64,
    /// Requests that failed (5xx or error status).
    pub errors: u64,
    /// p50, p95, p99 latency in nanoseconds.
    pub latency_ns: Vec<f64>,
    /// Shadow pairs whose responses matched.
    pub diff_match: u64,
    /// Shadow pairs whose responses differed.
    pub diff_mismatch: u64,
}

/// A JSON pointer that differed and how often.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, clickhouse::Row)]
pub struct DiffPath {
    /// The path.
    pub path: String,
    /// Mismatches that named it.
    pub count: u64,
}

/// Requests per minute and side.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, clickhouse::Row)]
pub struct SharePoint {
    /// Minute start, seconds since the epoch.
    pub minute: u32,
    /// Side.
    pub backend: String,
    /// Requests.
    pub requests: u64,
}

/// A sample mismatching pair.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, clickhouse::Row)]
pub struct Mismatch {
    /// Links primary and shadow.
    pub pair_id: String,
    /// The trace.
    pub trace_id: String,
    /// When, seconds since the epoch.
    pub start_time: u32,
    /// What differed.
    pub diff_paths: String,
}

/// The comparison of a route's two sides.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Comparison {
    /// The route.
    pub route: String,
    /// Window in seconds.
    pub since_seconds: u64,
    /// Per side (and shadow).
    pub sides: Vec<SideStats>,
    /// Most frequent differing paths.
    pub top_diff_paths: Vec<DiffPath>,
    /// Traffic per minute and side.
    pub share: Vec<SharePoint>,
    /// Recent mismatching pairs.
    pub mismatches: Vec<Mismatch>,
}

/// A stored span, as the trace view needs it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, clickhouse::Row)]
pub struct TraceSpan {
    /// Span id.
    pub span_id: String,
    /// Parent span id.
    pub parent_span_id: String,
    /// Name.
    pub name: String,
    /// Service.
    pub service: String,
    /// Start, ns.
    pub start_time_ns: u64,
    /// Duration, ns.
    pub duration_ns: u64,
    /// Status.
    pub status_code: String,
    /// Route.
    pub route: String,
    /// Side.
    pub backend: String,
    /// Attribute keys.
    pub attr_keys: Vec<String>,
    /// Attribute values.
    pub attr_values: Vec<String>,
}

fn err(e: clickhouse::error::Error) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

/// Compares legacy and new for `route` over the last `since_seconds`.
pub async fn compare(
    store: &ClickHouseStore,
    route: &str,
    since_seconds: u64,
) -> Result<Comparison, StoreError> {
    let db = store.database();
    let client = store.client();
    let sides = client
        .query(&format!(
            "SELECT backend, shadow, toUInt64(countMerge(requests)), toUInt64(sumMerge(errors)),
                    arrayMap(x -> toFloat64(x), quantilesMerge(0.5, 0.95, 0.99)(latency)),
                    toUInt64(sumMerge(diff_match)), toUInt64(sumMerge(diff_mismatch))
             FROM {db}.route_minute
             WHERE route = ? AND minute >= toStartOfMinute(now() - ?)
             GROUP BY backend, shadow ORDER BY backend, shadow"
        ))
        .bind(route)
        .bind(since_seconds)
        .fetch_all::<SideStats>()
        .await
        .map_err(err)?;
    let top_diff_paths = client
        .query(&format!(
            "SELECT path, toUInt64(count()) AS c FROM {db}.spans
             ARRAY JOIN splitByChar(',', diff_paths) AS path
             WHERE route = ? AND diff = 'mismatch' AND path != '' AND start_time >= now() - ?
             GROUP BY path ORDER BY c DESC, path LIMIT 20"
        ))
        .bind(route)
        .bind(since_seconds)
        .fetch_all::<DiffPath>()
        .await
        .map_err(err)?;
    let share = client
        .query(&format!(
            "SELECT toUInt32(minute), backend, toUInt64(countMerge(requests)) FROM {db}.route_minute
             WHERE route = ? AND shadow = 0 AND minute >= toStartOfMinute(now() - ?)
             GROUP BY minute, backend ORDER BY minute, backend"
        ))
        .bind(route)
        .bind(since_seconds)
        .fetch_all::<SharePoint>()
        .await
        .map_err(err)?;
    let mismatches = client
        .query(&format!(
            "SELECT pair_id, trace_id, toUInt32(start_time), diff_paths FROM {db}.spans
             WHERE route = ? AND diff = 'mismatch' AND start_time >= now() - ?
             ORDER BY start_time DESC LIMIT 20"
        ))
        .bind(route)
        .bind(since_seconds)
        .fetch_all::<Mismatch>()
        .await
        .map_err(err)?;
    Ok(Comparison {
        route: route.to_string(),
        since_seconds,
        sides,
        top_diff_paths,
        share,
        mismatches,
    })
}

/// All spans of a trace (deduplicated), oldest first. Uses the trace index to touch
/// only the days the trace has spans in.
pub async fn trace(store: &ClickHouseStore, trace_id: &str) -> Result<Vec<TraceSpan>, StoreError> {
    let db = store.database();
    store
        .client()
        .query(&format!(
            "SELECT span_id, any(parent_span_id), any(name), any(service), min(start_time_ns), any(duration_ns),
                    any(status_code), any(route), any(backend), any(attr_keys), any(attr_values)
             FROM {db}.spans
             WHERE trace_id = ? AND toDate(start_time) IN (SELECT day FROM {db}.trace_index WHERE trace_id = ?)
             GROUP BY span_id ORDER BY min(start_time_ns)"
        ))
        .bind(trace_id)
        .bind(trace_id)
        .fetch_all::<TraceSpan>()
        .await
        .map_err(err)
}
