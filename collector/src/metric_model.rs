//! OTLP metrics as ClickHouse rows: one row per data point, in one generic table
//! (`metric_points`) that works on ClickHouse 18.16 (no Map, no LowCardinality):
//! sums and gauges as `value`, histograms as `count`/`sum` and their buckets.
//! The router's aggregates (`strangler.requests`, `strangler.request.duration`, …)
//! arrive here like any other service's metrics.

use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::metrics::v1::{AggregationTemporality, metric, number_data_point};
use serde::{Deserialize, Serialize};

use crate::model::value_to_string;

/// One data point as a row of `metric_points`. Field order is the column order.
#[derive(Debug, Clone, Default, PartialEq, clickhouse::Row, Serialize, Deserialize)]
pub struct MetricRow {
    /// The point's end, seconds since the epoch.
    pub time: u32,
    /// The point's end, nanoseconds.
    pub time_ns: u64,
    /// The start of the point's interval (deltas) or of the series (cumulative), ns.
    pub start_ns: u64,
    /// `service.name`.
    pub service: String,
    /// `service.instance.id` (one router of a fleet).
    pub instance: String,
    /// The metric's name.
    pub name: String,
    /// Its unit.
    pub unit: String,
    /// `sum`, `gauge`, `histogram` or `exponential_histogram`.
    pub kind: String,
    /// `delta`, `cumulative`, or empty (gauges).
    pub temporality: String,
    /// Point attribute keys.
    pub attr_keys: Vec<String>,
    /// Point attribute values, as text.
    pub attr_values: Vec<String>,
    /// Sums and gauges.
    pub value: f64,
    /// Histograms: values recorded.
    pub count: u64,
    /// Histograms: their sum.
    pub sum: f64,
    /// Exponential histograms: scale.
    pub scale: i32,
    /// Exponential histograms: zero bucket.
    pub zero_count: u64,
    /// Exponential histograms: index of the first positive bucket.
    pub bucket_offset: i32,
    /// Positive buckets (exponential) or per-bound buckets (explicit histograms).
    pub bucket_counts: Vec<u64>,
    /// Explicit histograms' bounds.
    pub explicit_bounds: Vec<f64>,
}

fn temporality(t: i32) -> String {
    match AggregationTemporality::try_from(t) {
        Ok(AggregationTemporality::Delta) => "delta".into(),
        Ok(AggregationTemporality::Cumulative) => "cumulative".into(),
        _ => String::new(),
    }
}

fn attrs(list: &[KeyValue]) -> (Vec<String>, Vec<String>) {
    list.iter()
        .map(|kv| (kv.key.clone(), value_to_string(kv.value.as_ref())))
        .unzip()
}

fn seconds(ns: u64) -> u32 {
    u32::try_from(ns / 1_000_000_000).unwrap_or(u32::MAX)
}

/// Rows for every data point of `request`.
pub fn metric_rows_from_request(request: ExportMetricsServiceRequest) -> Vec<MetricRow> {
    let mut rows = Vec::new();
    for rm in request.resource_metrics {
        let resource = rm.resource.unwrap_or_default();
        let find = |key: &str| {
            resource
                .attributes
                .iter()
                .find(|kv| kv.key == key)
                .map(|kv| value_to_string(kv.value.as_ref()))
                .unwrap_or_default()
        };
        let (service, instance) = (find("service.name"), find("service.instance.id"));
        for sm in rm.scope_metrics {
            for m in sm.metrics {
                let base = MetricRow {
                    service: service.clone(),
                    instance: instance.clone(),
                    name: m.name.clone(),
                    unit: m.unit.clone(),
                    ..MetricRow::default()
                };
                let number = |p: &opentelemetry_proto::tonic::metrics::v1::NumberDataPoint,
                              kind: &str,
                              temporality: String| {
                    let (attr_keys, attr_values) = attrs(&p.attributes);
                    #[allow(clippy::cast_precision_loss)]
                    let value = match p.value {
                        Some(number_data_point::Value::AsInt(i)) => i as f64,
                        Some(number_data_point::Value::AsDouble(d)) => d,
                        None => 0.0,
                    };
                    MetricRow {
                        time: seconds(p.time_unix_nano),
                        time_ns: p.time_unix_nano,
                        start_ns: p.start_time_unix_nano,
                        kind: kind.into(),
                        temporality,
                        attr_keys,
                        attr_values,
                        value,
                        ..base.clone()
                    }
                };
                match m.data {
                    Some(metric::Data::Sum(s)) => {
                        for p in &s.data_points {
                            rows.push(number(p, "sum", temporality(s.aggregation_temporality)));
                        }
                    }
                    Some(metric::Data::Gauge(g)) => {
                        for p in &g.data_points {
                            rows.push(number(p, "gauge", String::new()));
                        }
                    }
                    Some(metric::Data::Histogram(h)) => {
                        for p in h.data_points {
                            let (attr_keys, attr_values) = attrs(&p.attributes);
                            rows.push(MetricRow {
                                time: seconds(p.time_unix_nano),
                                time_ns: p.time_unix_nano,
                                start_ns: p.start_time_unix_nano,
                                kind: "histogram".into(),
                                temporality: temporality(h.aggregation_temporality),
                                attr_keys,
                                attr_values,
                                count: p.count,
                                sum: p.sum.unwrap_or(0.0),
                                bucket_counts: p.bucket_counts,
                                explicit_bounds: p.explicit_bounds,
                                ..base.clone()
                            });
                        }
                    }
                    Some(metric::Data::ExponentialHistogram(h)) => {
                        for p in h.data_points {
                            let (attr_keys, attr_values) = attrs(&p.attributes);
                            let positive = p.positive.unwrap_or_default();
                            rows.push(MetricRow {
                                time: seconds(p.time_unix_nano),
                                time_ns: p.time_unix_nano,
                                start_ns: p.start_time_unix_nano,
                                kind: "exponential_histogram".into(),
                                temporality: temporality(h.aggregation_temporality),
                                attr_keys,
                                attr_values,
                                count: p.count,
                                sum: p.sum.unwrap_or(0.0),
                                scale: p.scale,
                                zero_count: p.zero_count,
                                bucket_offset: positive.offset,
                                bucket_counts: positive.bucket_counts,
                                ..base.clone()
                            });
                        }
                    }
                    // Summaries (legacy Prometheus shape) and empty metrics carry no
                    // point this table keeps.
                    Some(metric::Data::Summary(_)) | None => {}
                }
            }
        }
    }
    rows
}

#[cfg(test)]
mod tests {
    use opentelemetry_proto::tonic::common::v1::{AnyValue, any_value};
    use opentelemetry_proto::tonic::metrics::v1::{
        Gauge, Histogram, HistogramDataPoint, Metric, NumberDataPoint, ResourceMetrics,
        ScopeMetrics, Summary,
    };
    use opentelemetry_proto::tonic::resource::v1::Resource;

    use super::*;

    fn kv(k: &str, v: &str) -> KeyValue {
        KeyValue {
            key: k.into(),
            value: Some(AnyValue {
                value: Some(any_value::Value::StringValue(v.into())),
            }),
            ..Default::default()
        }
    }

    #[test]
    fn every_kind_of_point_becomes_one_row_with_its_service_and_attributes() {
        let metrics = vec![
            Metric {
                name: "queue.depth".into(),
                data: Some(metric::Data::Gauge(Gauge {
                    data_points: vec![NumberDataPoint {
                        attributes: vec![kv("queue", "orders")],
                        time_unix_nano: 2_000_000_000,
                        value: Some(number_data_point::Value::AsDouble(7.5)),
                        ..Default::default()
                    }],
                })),
                ..Default::default()
            },
            Metric {
                name: "http.duration".into(),
                unit: "ms".into(),
                data: Some(metric::Data::Histogram(Histogram {
                    data_points: vec![HistogramDataPoint {
                        count: 3,
                        sum: Some(12.0),
                        bucket_counts: vec![1, 2, 0],
                        explicit_bounds: vec![5.0, 10.0],
                        time_unix_nano: 3_000_000_000,
                        ..Default::default()
                    }],
                    aggregation_temporality: AggregationTemporality::Cumulative as i32,
                })),
                ..Default::default()
            },
            Metric {
                name: "old.summary".into(),
                data: Some(metric::Data::Summary(Summary::default())),
                ..Default::default()
            },
        ];
        let rows = metric_rows_from_request(ExportMetricsServiceRequest {
            resource_metrics: vec![ResourceMetrics {
                resource: Some(Resource {
                    attributes: vec![kv("service.name", "shop"), kv("service.instance.id", "a1")],
                    ..Default::default()
                }),
                scope_metrics: vec![ScopeMetrics {
                    metrics,
                    ..Default::default()
                }],
                schema_url: String::new(),
            }],
        });
        assert_eq!(rows.len(), 2, "the summary has no row");
        assert_eq!(
            (rows[0].kind.as_str(), rows[0].value, rows[0].time),
            ("gauge", 7.5, 2)
        );
        assert_eq!(
            (rows[0].service.as_str(), rows[0].instance.as_str()),
            ("shop", "a1")
        );
        assert_eq!(rows[0].attr_keys, vec!["queue"]);
        assert_eq!(rows[1].kind, "histogram");
        assert_eq!(rows[1].temporality, "cumulative");
        assert_eq!((rows[1].count, rows[1].bucket_counts.len()), (3, 3));
        assert_eq!(rows[1].explicit_bounds, vec![5.0, 10.0]);
    }
}
