//! Prometheus metrics (`/metrics` on the admin API): the router's own counters and
//! gauges in a registry, and the per-route request aggregates of [`crate::stats`].

use std::sync::Arc;

use prometheus::{Encoder, IntCounter, IntGauge, Opts, Registry, TextEncoder};

use crate::stats::Stats;

/// The router's Prometheus metrics in their own registry.
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Registry,
    /// Per-route request aggregates, recorded lock-free by requests.
    pub stats: Arc<Stats>,
    /// Spans dropped because the export queue was full.
    pub spans_dropped: IntCounter,
    /// Spans handed to the exporter.
    pub spans_exported: IntCounter,
    /// Spans the exporter failed to send.
    pub spans_failed: IntCounter,
    /// Connections closed because their request headers did not arrive in time.
    pub slow_clients: IntCounter,
    flag_age: IntGauge,
    flag_errors: IntGauge,
    breaker_open: prometheus::IntGaugeVec,
}

fn must<T>(r: prometheus::Result<T>) -> T {
    // Metric definitions are static; a failure is a programming error caught by the tests.
    match r {
        Ok(v) => v,
        Err(e) => panic!("invalid metric definition: {e}"),
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Creates and registers all metrics.
    pub fn new() -> Self {
        let registry = Registry::new();
        let spans_dropped = must(IntCounter::new(
            "strangler_spans_dropped_total",
            "Spans dropped because the export queue was full",
        ));
        let spans_exported = must(IntCounter::new(
            "strangler_spans_exported_total",
            "Spans sent to the OTLP endpoint",
        ));
        let spans_failed = must(IntCounter::new(
            "strangler_spans_export_failed_total",
            "Spans the OTLP exporter could not send",
        ));
        let slow_clients = must(IntCounter::new(
            "strangler_slow_clients_total",
            "Connections closed with 408 because request headers did not arrive in time",
        ));
        let flag_age = must(IntGauge::new(
            "strangler_flag_source_age_seconds",
            "Seconds since flags were last read successfully (-1 before the first read)",
        ));
        let flag_errors = must(IntGauge::new(
            "strangler_flag_source_failing",
            "1 while the flag source is failing",
        ));
        let breaker_open = must(prometheus::IntGaugeVec::new(
            Opts::new(
                "strangler_breaker_open",
                "1 while the route's circuit breaker keeps the new service out",
            ),
            &["route"],
        ));
        for c in [
            Box::new(spans_dropped.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(spans_exported.clone()),
            Box::new(spans_failed.clone()),
            Box::new(slow_clients.clone()),
            Box::new(flag_age.clone()),
            Box::new(flag_errors.clone()),
            Box::new(breaker_open.clone()),
        ] {
            must(registry.register(c));
        }
        Self {
            registry,
            stats: Arc::new(Stats::default()),
            spans_dropped,
            spans_exported,
            spans_failed,
            slow_clients,
            flag_age,
            flag_errors,
            breaker_open,
        }
    }

    /// Updates the flag freshness gauges (called at scrape time).
    pub fn set_flag_freshness(&self, age_ms: Option<u64>, failing: bool) {
        self.flag_age
            .set(age_ms.map_or(-1, |ms| i64::try_from(ms / 1000).unwrap_or(i64::MAX)));
        self.flag_errors.set(i64::from(failing));
    }

    /// Sets a route's breaker gauge (called at scrape time).
    pub fn set_breaker_open(&self, route: &str, open: bool) {
        self.breaker_open
            .with_label_values(&[route])
            .set(i64::from(open));
    }

    /// The text exposition format.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        let mut aggregates = String::new();
        self.stats.render_prometheus(&mut aggregates);
        out.extend_from_slice(aggregates.as_bytes());
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_render_in_prometheus_text_format_with_the_route_aggregates() {
        use std::time::Duration;

        use strangler_model::{Backend, Reason};

        use crate::stats::{Key, Role};

        let m = Metrics::new();
        m.spans_dropped.inc();
        m.stats.route("orders").record(
            Key {
                backend: Backend::New,
                reason: Reason::Flag,
                role: Role::Primary,
                status: 200,
            },
            false,
            Duration::from_millis(3),
        );
        let text = String::from_utf8(m.render()).expect("utf8");
        assert!(text.contains("strangler_spans_dropped_total 1"), "{text}");
        assert!(
            text.contains(
                r#"strangler_requests_total{backend="new",route="orders",status_class="2xx"} 1"#
            ),
            "{text}"
        );
        assert!(
            text.contains("strangler_request_duration_seconds_bucket"),
            "{text}"
        );
    }
}
