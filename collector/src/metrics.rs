//! The collector's Prometheus metrics.

use prometheus::{Encoder, IntCounter, IntGauge, Registry, TextEncoder};

/// Counters for every span's fate: received = written + spooled + rejected + failed (+ queued).
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Registry,
    /// Spans in export requests that parsed.
    pub received: IntCounter,
    /// Spans inserted into the store directly.
    pub written: IntCounter,
    /// Spans written to the spool.
    pub spooled: IntCounter,
    /// Spans moved from the spool into the store.
    pub replayed: IntCounter,
    /// Spans refused with a retryable error because the queue was full.
    pub rejected: IntCounter,
    /// Spans that neither the store nor the spool took (the exporter was told to retry).
    pub failed: IntCounter,
    /// Requests refused as malformed.
    pub malformed: IntCounter,
    /// Times the span spool could not be read for replay (a replay round ends there
    /// and the next one, half a second later, tries again).
    pub spool_errors: IntCounter,
    /// Bytes in the spool.
    pub spool_bytes: IntGauge,
    /// Metric points inserted into the store directly.
    pub points_written: IntCounter,
    /// Metric points written to the spool.
    pub points_spooled: IntCounter,
    /// Metric points moved from the spool into the store.
    pub points_replayed: IntCounter,
    /// Metric points of retried exports the store held already (not stored again).
    pub points_duplicate: IntCounter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

fn counter(registry: &Registry, name: &str, help: &str) -> IntCounter {
    let c = IntCounter::new(name, help).unwrap_or_else(|e| panic!("invalid metric {name}: {e}"));
    registry
        .register(Box::new(c.clone()))
        .unwrap_or_else(|e| panic!("cannot register {name}: {e}"));
    c
}

impl Metrics {
    /// Creates and registers the metrics.
    pub fn new() -> Self {
        let registry = Registry::new();
        let spool_bytes = IntGauge::new(
            "strangler_collector_spool_bytes",
            "Bytes held in the disk spool",
        )
        .unwrap_or_else(|e| panic!("invalid metric: {e}"));
        registry
            .register(Box::new(spool_bytes.clone()))
            .unwrap_or_else(|e| panic!("cannot register: {e}"));
        Self {
            points_written: counter(
                &registry,
                "strangler_collector_metric_points_written_total",
                "OTLP metric points inserted into ClickHouse directly",
            ),
            points_spooled: counter(
                &registry,
                "strangler_collector_metric_points_spooled_total",
                "OTLP metric points written to the spool while ClickHouse was away",
            ),
            points_replayed: counter(
                &registry,
                "strangler_collector_metric_points_replayed_total",
                "OTLP metric points moved from the spool into ClickHouse",
            ),
            points_duplicate: counter(
                &registry,
                "strangler_collector_metric_points_duplicate_total",
                "OTLP metric points of retried exports ClickHouse held already, not stored again",
            ),
            received: counter(
                &registry,
                "strangler_collector_spans_received_total",
                "Spans received",
            ),
            written: counter(
                &registry,
                "strangler_collector_spans_written_total",
                "Spans written to ClickHouse",
            ),
            spooled: counter(
                &registry,
                "strangler_collector_spans_spooled_total",
                "Spans written to the disk spool",
            ),
            replayed: counter(
                &registry,
                "strangler_collector_spans_replayed_total",
                "Spans replayed from the spool",
            ),
            rejected: counter(
                &registry,
                "strangler_collector_spans_rejected_total",
                "Spans refused with a retryable error (queue full)",
            ),
            failed: counter(
                &registry,
                "strangler_collector_spans_failed_total",
                "Spans neither stored nor spooled (exporter told to retry)",
            ),
            malformed: counter(
                &registry,
                "strangler_collector_requests_malformed_total",
                "Export requests refused as malformed",
            ),
            spool_errors: counter(
                &registry,
                "strangler_collector_spool_errors_total",
                "Span spool reads that failed during replay (retried every half second)",
            ),
            spool_bytes,
            registry,
        }
    }

    /// The text exposition format.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        out
    }
}
