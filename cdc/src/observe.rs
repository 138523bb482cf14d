//! What CDC reports: Prometheus metrics on `/metrics` (lag in bytes and seconds,
//! rows by table, errors) and one OpenTelemetry span per applied batch.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use opentelemetry::KeyValue;
use opentelemetry::trace::{Span as _, Tracer as _, TracerProvider as _};
use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};

/// The metrics and the tracer of one CDC process.
pub struct Observe {
    registry: Registry,
    /// Applied position (bytes into the WAL).
    pub applied_lsn: IntGauge,
    /// Source WAL not yet applied, in bytes (sampled every second).
    pub lag_bytes: IntGauge,
    /// Age of the oldest change not yet applied, in milliseconds (0 when caught up).
    pub lag_ms: IntGauge,
    /// Changes applied, by target table.
    pub rows: IntCounterVec,
    /// Source transactions applied.
    pub transactions: IntCounter,
    /// Batches applied.
    pub batches: IntCounter,
    /// Time to apply one batch.
    pub batch_seconds: Histogram,
    /// Errors by kind (`transient` ones are retried).
    pub errors: IntCounterVec,
    tracer: Option<(
        opentelemetry_sdk::trace::SdkTracerProvider,
        opentelemetry_sdk::trace::SdkTracer,
    )>,
}

impl std::fmt::Debug for Observe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Observe").finish_non_exhaustive()
    }
}

fn must<T>(r: prometheus::Result<T>) -> T {
    // Definitions are static; a failure is a programming error the tests catch.
    match r {
        Ok(v) => v,
        Err(e) => panic!("invalid metric definition: {e}"),
    }
}

impl Observe {
    /// Metrics, and spans exported to `otlp_endpoint` when given.
    pub fn new(otlp_endpoint: Option<&str>) -> Self {
        let registry = Registry::new();
        let applied_lsn = must(IntGauge::new(
            "strangler_cdc_applied_lsn",
            "WAL position applied in the target (bytes)",
        ));
        let lag_bytes = must(IntGauge::new(
            "strangler_cdc_lag_bytes",
            "Source WAL not yet applied in the target (bytes)",
        ));
        let lag_ms = must(IntGauge::new(
            "strangler_cdc_lag_milliseconds",
            "Age of the oldest source commit not yet applied (0 when caught up)",
        ));
        let rows = must(IntCounterVec::new(
            Opts::new(
                "strangler_cdc_rows_total",
                "Changes applied, by target table",
            ),
            &["table"],
        ));
        let transactions = must(IntCounter::new(
            "strangler_cdc_transactions_total",
            "Source transactions applied",
        ));
        let batches = must(IntCounter::new(
            "strangler_cdc_batches_total",
            "Batches applied (each one target transaction)",
        ));
        let batch_seconds = must(Histogram::with_opts(HistogramOpts::new(
            "strangler_cdc_batch_seconds",
            "Time to apply one batch",
        )));
        let errors = must(IntCounterVec::new(
            Opts::new("strangler_cdc_errors_total", "Errors by kind"),
            &["kind"],
        ));
        for c in [
            Box::new(applied_lsn.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(lag_bytes.clone()),
            Box::new(lag_ms.clone()),
            Box::new(rows.clone()),
            Box::new(transactions.clone()),
            Box::new(batches.clone()),
            Box::new(batch_seconds.clone()),
            Box::new(errors.clone()),
        ] {
            must(registry.register(c));
        }
        let tracer = otlp_endpoint.and_then(|endpoint| {
            use opentelemetry_otlp::WithExportConfig;
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint)
                .build();
            match exporter {
                Ok(exporter) => {
                    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
                        .with_batch_exporter(exporter)
                        .with_resource(
                            opentelemetry_sdk::Resource::builder()
                                .with_service_name("strangler-cdc")
                                .build(),
                        )
                        .build();
                    let tracer = provider.tracer("strangler-cdc");
                    Some((provider, tracer))
                }
                Err(e) => {
                    tracing::warn!("no span export to {endpoint}: {e}");
                    None
                }
            }
        });
        Self {
            registry,
            applied_lsn,
            lag_bytes,
            lag_ms,
            rows,
            transactions,
            batches,
            batch_seconds,
            errors,
            tracer,
        }
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8_lossy(&out).into_owned()
    }

    /// Records an applied batch (and its span).
    #[allow(clippy::too_many_arguments)]
    pub fn batch(
        &self,
        started: SystemTime,
        took: Duration,
        end_lsn: u64,
        transactions: u64,
        rows_by_table: &[(String, u64)],
        oldest_commit: Option<SystemTime>,
    ) {
        self.batches.inc();
        self.transactions.inc_by(transactions);
        self.batch_seconds.observe(took.as_secs_f64());
        self.applied_lsn
            .set(i64::try_from(end_lsn).unwrap_or(i64::MAX));
        for (table, n) in rows_by_table {
            self.rows.with_label_values(&[table.as_str()]).inc_by(*n);
        }
        if let Some(at) = oldest_commit {
            let lag = SystemTime::now().duration_since(at).unwrap_or_default();
            self.lag_ms
                .set(i64::try_from(lag.as_millis()).unwrap_or(i64::MAX));
        }
        if let Some((_, tracer)) = &self.tracer {
            let mut span = tracer
                .span_builder("cdc.batch")
                .with_start_time(started)
                .with_attributes(vec![
                    KeyValue::new("strangler.cdc.transactions", transactions as i64),
                    KeyValue::new(
                        "strangler.cdc.rows",
                        rows_by_table.iter().map(|(_, n)| *n as i64).sum::<i64>(),
                    ),
                    KeyValue::new(
                        "strangler.cdc.end_lsn",
                        crate::model::Lsn(end_lsn).to_string(),
                    ),
                ])
                .start(tracer);
            span.end_with_timestamp(started + took);
        }
    }

    /// Caught up: no unapplied change waiting.
    pub fn idle(&self) {
        self.lag_ms.set(0);
    }

    /// Flushes spans before exit.
    pub fn shutdown(&self) {
        if let Some((provider, _)) = &self.tracer {
            let _ = provider.shutdown();
        }
    }
}

/// Serves `GET /metrics` on `addr` until the process ends.
pub async fn serve(addr: SocketAddr, observe: Arc<Observe>) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let observe = Arc::clone(&observe);
            async move { observe.render() }
        }),
    );
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::warn!("metrics server stopped: {e}");
        }
    });
    Ok(())
}
