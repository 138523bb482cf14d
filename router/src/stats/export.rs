//! The route aggregates as OTLP metrics, with delta temporality, every
//! `telemetry.metrics_interval_ms`, to `telemetry.metrics_endpoint` (OTLP/gRPC).
//!
//! A delta is taken against the last numbers the receiver *acknowledged*, so an
//! outage of the receiver loses no count. An export that was not acknowledged is
//! sent again unchanged (same interval, same counts), marked
//! `strangler.export.retry`, before anything newer: the receiver may have stored it
//! and then crashed, or its answer may have been lost, and the collector skips a
//! retry it already holds — so a lost acknowledgement counts nothing twice. Only
//! cells that changed are sent.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_client::MetricsServiceClient;
use opentelemetry_proto::tonic::common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value};
use opentelemetry_proto::tonic::metrics::v1::{
    AggregationTemporality, ExponentialHistogram, ExponentialHistogramDataPoint, Metric,
    NumberDataPoint, ResourceMetrics, ScopeMetrics, Sum, exponential_histogram_data_point, metric,
    number_data_point,
};
use opentelemetry_proto::tonic::resource::v1::Resource;
use strangler_model::names::attr;

use super::histogram::{OFFSET, SCALE};
use super::{CLASSES, CellSnapshot, Counts, PairSnapshot, Stats};
use strangler_model::Backend;

/// Metric names.
pub mod name {
    /// Requests (and shadow copies), a delta sum.
    pub const REQUESTS: &str = "strangler.requests";
    /// Failed requests, a delta sum.
    pub const ERRORS: &str = "strangler.errors";
    /// Latency in microseconds, an exponential histogram.
    pub const DURATION: &str = "strangler.request.duration";
    /// Shadow pairs by outcome, a delta sum.
    pub const PAIRS: &str = "strangler.shadow.pairs";
}

/// A cell's identity across snapshots.
type CellKey = (String, &'static str, &'static str, &'static str, usize);

/// What the receiver has acknowledged so far.
#[derive(Debug, Default, Clone)]
pub struct Baseline {
    cells: HashMap<CellKey, (u64, u64, Counts)>,
    pairs: HashMap<(String, &'static str), PairSnapshot>,
    /// When the acknowledged numbers were taken, nanoseconds since the epoch.
    at_ns: u64,
}

fn now_ns() -> u64 {
    u64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    )
    .unwrap_or(u64::MAX)
}

fn kv(key: &str, value: &str) -> KeyValue {
    KeyValue {
        key: key.to_string(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(value.to_string())),
        }),
        ..Default::default()
    }
}

fn sum(name: &str, unit: &str, points: Vec<NumberDataPoint>) -> Metric {
    Metric {
        name: name.to_string(),
        unit: unit.to_string(),
        data: Some(metric::Data::Sum(Sum {
            data_points: points,
            aggregation_temporality: AggregationTemporality::Delta as i32,
            is_monotonic: true,
        })),
        ..Default::default()
    }
}

/// The export request for everything that changed since `baseline`, and the
/// baseline to keep once the receiver acknowledged it.
pub fn request(
    stats: &Stats,
    baseline: &Baseline,
    service: &str,
    instance: &str,
) -> (ExportMetricsServiceRequest, Baseline) {
    let now = now_ns();
    let start = if baseline.at_ns == 0 {
        now
    } else {
        baseline.at_ns
    };
    let mut next = Baseline {
        at_ns: now,
        ..Baseline::default()
    };
    let (mut requests, mut errors, mut durations, mut pairs) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let point = |attributes: Vec<KeyValue>, n: u64| NumberDataPoint {
        attributes,
        start_time_unix_nano: start,
        time_unix_nano: now,
        value: Some(number_data_point::Value::AsInt(
            i64::try_from(n).unwrap_or(i64::MAX),
        )),
        ..Default::default()
    };
    for route in stats.all() {
        for c in route.cells() {
            let CellSnapshot {
                backend,
                reason,
                role,
                class,
                requests: total,
                errors: failed,
                latency,
            } = c;
            let key: CellKey = (
                route.name().to_string(),
                backend.as_str(),
                reason.as_str(),
                role.as_str(),
                class,
            );
            let (seen, seen_errors, seen_latency) =
                baseline
                    .cells
                    .get(&key)
                    .cloned()
                    .unwrap_or((0, 0, Counts::default()));
            let delta = latency.minus(&seen_latency);
            let attributes = vec![
                kv(attr::ROUTE, route.name()),
                kv(attr::BACKEND, backend.as_str()),
                kv(attr::DECISION, reason.as_str()),
                kv("strangler.role", role.as_str()),
                kv("http.response.status_class", CLASSES[class]),
            ];
            if total > seen {
                requests.push(point(attributes.clone(), total - seen));
                durations.push(histogram_point(attributes.clone(), &delta, start, now));
            }
            if failed > seen_errors {
                errors.push(point(attributes, failed - seen_errors));
            }
            next.cells.insert(key, (total, failed, latency));
        }
        for primary in Backend::ALL {
            let p = route.pairs_by_primary(primary);
            let key = (route.name().to_string(), primary.as_str());
            let seen = baseline.pairs.get(&key).cloned().unwrap_or_default();
            for (outcome, now_n, then_n) in [
                ("match", p.matched, seen.matched),
                ("mismatch", p.differing, seen.differing),
                ("error", p.errors, seen.errors),
                ("skipped", p.skipped, seen.skipped),
            ] {
                if now_n > then_n {
                    pairs.push(point(
                        vec![
                            kv(attr::ROUTE, route.name()),
                            // The side that answered the client: the pair counts there.
                            kv(attr::BACKEND, primary.as_str()),
                            kv("strangler.outcome", outcome),
                        ],
                        now_n - then_n,
                    ));
                }
            }
            next.pairs.insert(key, p);
        }
    }
    let mut metrics = Vec::new();
    if !requests.is_empty() {
        metrics.push(sum(name::REQUESTS, "{request}", requests));
    }
    if !errors.is_empty() {
        metrics.push(sum(name::ERRORS, "{request}", errors));
    }
    if !durations.is_empty() {
        metrics.push(Metric {
            name: name::DURATION.to_string(),
            unit: "us".to_string(),
            data: Some(metric::Data::ExponentialHistogram(ExponentialHistogram {
                data_points: durations,
                aggregation_temporality: AggregationTemporality::Delta as i32,
            })),
            ..Default::default()
        });
    }
    if !pairs.is_empty() {
        metrics.push(sum(name::PAIRS, "{pair}", pairs));
    }
    let request = ExportMetricsServiceRequest {
        resource_metrics: if metrics.is_empty() {
            Vec::new()
        } else {
            vec![ResourceMetrics {
                resource: Some(Resource {
                    attributes: vec![
                        kv(attr::SERVICE_NAME, service),
                        kv("service.instance.id", instance),
                    ],
                    ..Default::default()
                }),
                scope_metrics: vec![ScopeMetrics {
                    scope: Some(InstrumentationScope {
                        name: "strangler-router".into(),
                        ..Default::default()
                    }),
                    metrics,
                    schema_url: String::new(),
                }],
                schema_url: String::new(),
            }]
        },
    };
    (request, next)
}

/// One delta histogram point: the non-empty bucket range, OTel-indexed.
fn histogram_point(
    attributes: Vec<KeyValue>,
    delta: &Counts,
    start: u64,
    now: u64,
) -> ExponentialHistogramDataPoint {
    let first = delta.buckets.iter().position(|n| *n > 0).unwrap_or(0);
    let last = delta.buckets.iter().rposition(|n| *n > 0).unwrap_or(first);
    #[allow(clippy::cast_precision_loss)]
    let sum = delta.sum_micros as f64;
    ExponentialHistogramDataPoint {
        attributes,
        start_time_unix_nano: start,
        time_unix_nano: now,
        count: delta.count,
        sum: Some(sum),
        scale: SCALE,
        zero_count: 0,
        positive: Some(exponential_histogram_data_point::Buckets {
            offset: i32::try_from(first).unwrap_or(0) + OFFSET,
            bucket_counts: delta.buckets.get(first..=last).unwrap_or_default().to_vec(),
        }),
        ..Default::default()
    }
}

/// The exporter's side of the conversation with its receiver.
#[derive(Debug, Default)]
struct ExportState {
    /// What the receiver acknowledged.
    baseline: Baseline,
    /// The last export failed (logged once per outage).
    failing: bool,
    /// An export not acknowledged, as it goes again (marked a retry), and the
    /// baseline it leads to.
    unacked: Option<(ExportMetricsServiceRequest, Baseline)>,
}

/// Marks every resource of `request` as sent again ([`attr::EXPORT_RETRY`]).
pub fn mark_retry(request: &mut ExportMetricsServiceRequest) {
    for rm in &mut request.resource_metrics {
        let resource = rm.resource.get_or_insert_with(Resource::default);
        if !resource
            .attributes
            .iter()
            .any(|a| a.key == attr::EXPORT_RETRY)
        {
            resource.attributes.push(kv(attr::EXPORT_RETRY, "true"));
        }
    }
}

/// Sends the aggregates' deltas to one OTLP/gRPC endpoint.
#[derive(Debug)]
pub struct Exporter {
    stats: Arc<Stats>,
    endpoint: String,
    service: String,
    instance: String,
    /// What the receiver acknowledged; the lock also keeps two exports from overlapping.
    acked: std::sync::Mutex<ExportState>,
    /// The gRPC client's runtime, built once (exports never compete with requests).
    runtime: tokio::runtime::Runtime,
}

impl Exporter {
    /// An exporter of `stats` to `endpoint`, as `service` (a random instance id).
    pub fn new(stats: Arc<Stats>, endpoint: String, service: String) -> std::io::Result<Self> {
        Ok(Self {
            stats,
            endpoint,
            service,
            instance: format!("{:016x}", rand::random::<u64>()),
            // The first export's counts start now, when counting starts, not at the
            // first export (the collector dates counts by their interval's start).
            acked: std::sync::Mutex::new(ExportState {
                baseline: Baseline {
                    at_ns: now_ns(),
                    ..Baseline::default()
                },
                ..ExportState::default()
            }),
            runtime: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?,
        })
    }

    /// Sends again the export not acknowledged, if any, then what changed since the
    /// last acknowledged one; blocks (its own runtime), so call it off the async
    /// runtime.
    pub fn export_once(&self) -> Result<(), String> {
        let mut guard = self
            .acked
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let state = &mut *guard;
        loop {
            let (request, next, retry) = match state.unacked.take() {
                Some((request, next)) => (request, next, true),
                None => {
                    let (request, next) =
                        request(&self.stats, &state.baseline, &self.service, &self.instance);
                    if request.resource_metrics.is_empty() {
                        state.baseline.at_ns = next.at_ns;
                        return Ok(());
                    }
                    (request, next, false)
                }
            };
            match self.send(request.clone()) {
                Ok(()) => {
                    state.baseline = next;
                    if state.failing {
                        tracing::info!("metrics export to {} works again", self.endpoint);
                        state.failing = false;
                    }
                    // After a retry, the counts since go now too.
                    if !retry {
                        return Ok(());
                    }
                }
                // Sent again as it is: the baseline does not move.
                Err(e) => {
                    if !state.failing {
                        tracing::warn!(
                            "metrics export to {} failed (it is sent again, unchanged, next time): {e}",
                            self.endpoint
                        );
                        state.failing = true;
                    }
                    let mut again = request;
                    mark_retry(&mut again);
                    state.unacked = Some((again, next));
                    return Err(e);
                }
            }
        }
    }

    /// One export request to the endpoint, within 10 s.
    fn send(&self, request: ExportMetricsServiceRequest) -> Result<(), String> {
        let endpoint = self.endpoint.clone();
        self.runtime.block_on(async {
            let attempt = async {
                let mut client = MetricsServiceClient::connect(endpoint)
                    .await
                    .map_err(|e| e.to_string())?;
                client
                    .export(request)
                    .await
                    .map(drop)
                    .map_err(|e| e.message().to_string())
            };
            tokio::time::timeout(Duration::from_secs(10), attempt)
                .await
                .map_err(|_| "no answer within 10 s".to_string())?
        })
    }
}

/// Exports every `interval` until the process ends, on a thread of its own.
pub fn spawn(exporter: Arc<Exporter>, interval: Duration) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("strangler-metrics".into())
        .spawn(move || {
            loop {
                std::thread::sleep(interval);
                let _ = exporter.export_once();
            }
        })
        .map(|_| ())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use strangler_model::{Backend, Reason};

    use super::*;
    use crate::stats::{Key, Role};

    /// A request the new side answered with 200 because of the flag.
    const SERVED_BY_NEW: Key = Key {
        backend: Backend::New,
        reason: Reason::Flag,
        role: Role::Primary,
        status: 200,
    };

    fn requests_in(r: &ExportMetricsServiceRequest) -> i64 {
        r.resource_metrics
            .iter()
            .flat_map(|rm| &rm.scope_metrics)
            .flat_map(|sm| &sm.metrics)
            .filter(|m| m.name == name::REQUESTS)
            .filter_map(|m| match &m.data {
                Some(metric::Data::Sum(s)) => Some(s.data_points.iter()),
                _ => None,
            })
            .flatten()
            .filter_map(|p| match p.value {
                Some(number_data_point::Value::AsInt(n)) => Some(n),
                _ => None,
            })
            .sum()
    }

    #[test]
    fn deltas_count_from_the_last_acknowledged_export_so_a_failed_one_loses_nothing() {
        let stats = Stats::default();
        let orders = stats.route("orders");
        let key = SERVED_BY_NEW;
        for _ in 0..3 {
            orders.record(key, false, Duration::from_millis(4));
        }
        let (first, acked) = request(&stats, &Baseline::default(), "r", "i");
        assert_eq!(requests_in(&first), 3);
        // Acknowledged: the next delta starts from here.
        orders.record(key, false, Duration::from_millis(4));
        let (second, _not_acked) = request(&stats, &acked, "r", "i");
        assert_eq!(requests_in(&second), 1);
        // The second export failed: the third carries its count too.
        orders.record(key, false, Duration::from_millis(4));
        let (third, _) = request(&stats, &acked, "r", "i");
        assert_eq!(requests_in(&third), 2);
        // Nothing new since an acknowledged export: nothing to send.
        let (_, all) = request(&stats, &acked, "r", "i");
        let (empty, _) = request(&stats, &all, "r", "i");
        assert!(empty.resource_metrics.is_empty());
    }

    #[test]
    fn an_unacknowledged_export_goes_again_unchanged_and_marked_before_newer_counts() {
        let stats = Arc::new(Stats::default());
        let orders = stats.route("orders");
        let key = SERVED_BY_NEW;
        for _ in 0..3 {
            orders.record(key, false, Duration::from_millis(4));
        }
        // Port 1 refuses: the export is not acknowledged.
        let exporter = Exporter::new(Arc::clone(&stats), "http://127.0.0.1:1".into(), "r".into())
            .expect("exporter");
        assert!(exporter.export_once().is_err());
        orders.record(key, false, Duration::from_millis(4));
        assert!(exporter.export_once().is_err());
        let state = exporter.acked.lock().expect("lock");
        let (again, _) = state.unacked.as_ref().expect("kept for the next attempt");
        // The first attempt's three, not the fourth (that goes after it).
        assert_eq!(requests_in(again), 3);
        let marks = again
            .resource_metrics
            .iter()
            .flat_map(|rm| rm.resource.iter().flat_map(|r| &r.attributes))
            .filter(|a| a.key == attr::EXPORT_RETRY)
            .count();
        assert_eq!(
            marks,
            again.resource_metrics.len(),
            "marked once per resource"
        );
    }

    #[test]
    fn the_histogram_point_holds_the_changed_buckets_at_their_otel_index() {
        let stats = Stats::default();
        let r = stats.route("orders");
        let key = Key {
            backend: Backend::Legacy,
            reason: Reason::Default,
            role: Role::Primary,
            status: 200,
        };
        r.record(key, false, Duration::from_micros(1_000));
        r.record(key, false, Duration::from_micros(2_000));
        let (req, _) = request(&stats, &Baseline::default(), "r", "i");
        let metric = req.resource_metrics[0].scope_metrics[0]
            .metrics
            .iter()
            .find(|m| m.name == name::DURATION)
            .expect("histogram");
        let Some(metric::Data::ExponentialHistogram(h)) = &metric.data else {
            panic!("exponential histogram");
        };
        let p = &h.data_points[0];
        assert_eq!((p.count, p.scale), (2, SCALE));
        let buckets = p.positive.as_ref().expect("buckets");
        // 1000 µs: ceil(log2(1000) * 32) - 1 = 318; 2000 µs is 32 buckets later.
        assert_eq!(buckets.offset, 318);
        assert_eq!(buckets.bucket_counts.len(), 33);
        assert_eq!(buckets.bucket_counts.iter().sum::<u64>(), 2);
    }
}
