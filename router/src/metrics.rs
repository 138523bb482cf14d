//! Prometheus metrics (`/metrics` on the admin API).

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};

use strangler_model::{Backend, Reason};

/// Latency buckets in seconds: a proxy hop is sub-millisecond, a monolith page can take seconds.
const LATENCY_BUCKETS: &[f64] = &[
    0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// The router's Prometheus metrics in their own registry.
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    errors: IntCounterVec,
    latency: HistogramVec,
    decisions: IntCounterVec,
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
        let requests = must(IntCounterVec::new(
            Opts::new(
                "strangler_requests_total",
                "Requests by route, backend and status class",
            ),
            &["route", "backend", "status_class"],
        ));
        let errors = must(IntCounterVec::new(
            Opts::new(
                "strangler_upstream_errors_total",
                "Requests that failed at the upstream (no response or 5xx)",
            ),
            &["route", "backend"],
        ));
        let latency = must(HistogramVec::new(
            HistogramOpts::new(
                "strangler_request_duration_seconds",
                "Time from request to end of response",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["route", "backend"],
        ));
        let decisions = must(IntCounterVec::new(
            Opts::new("strangler_decisions_total", "Routing decisions by reason"),
            &["route", "backend", "reason"],
        ));
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
            Box::new(requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(errors.clone()),
            Box::new(latency.clone()),
            Box::new(decisions.clone()),
            Box::new(spans_dropped.clone()),
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
            requests,
            errors,
            latency,
            decisions,
            spans_dropped,
            spans_exported,
            spans_failed,
            slow_clients,
            flag_age,
            flag_errors,
            breaker_open,
        }
    }

    /// Records one finished request.
    pub fn observe(
        &self,
        route: &str,
        backend: Backend,
        reason: Reason,
        status: u16,
        failed: bool,
        seconds: f64,
    ) {
        let class = match status {
            0 => "none",
            100..=199 => "1xx",
            200..=299 => "2xx",
            300..=399 => "3xx",
            400..=499 => "4xx",
            _ => "5xx",
        };
        self.requests
            .with_label_values(&[route, backend.as_str(), class])
            .inc();
        self.latency
            .with_label_values(&[route, backend.as_str()])
            .observe(seconds);
        self.decisions
            .with_label_values(&[route, backend.as_str(), reason.as_str()])
            .inc();
        if failed {
            self.errors
                .with_label_values(&[route, backend.as_str()])
                .inc();
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
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_render_in_prometheus_text_format() {
        let m = Metrics::new();
        m.observe("orders", Backend::New, Reason::Flag, 200, false, 0.003);
        m.observe("orders", Backend::Legacy, Reason::Default, 502, true, 0.001);
        let text = String::from_utf8(m.render()).expect("utf8");
        assert!(
            text.contains(
                r#"strangler_requests_total{backend="new",route="orders",status_class="2xx"} 1"#
            ),
            "{text}"
        );
        assert!(
            text.contains(r#"strangler_upstream_errors_total{backend="legacy",route="orders"} 1"#),
            "{text}"
        );
        assert!(
            text.contains("strangler_request_duration_seconds_bucket"),
            "{text}"
        );
    }
}
