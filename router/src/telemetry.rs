//! OpenTelemetry: one server span per request, exported over OTLP/gRPC without
//! ever blocking the request path.
//!
//! Spans go into a bounded lock-free queue; a dedicated thread batches them to the exporter.
//! When the queue is full a span is dropped and counted
//! (`strangler_spans_dropped_total`), never waited for.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::{SpanKind, TraceContextExt, Tracer, TracerProvider as _};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{
    SdkTracer, SdkTracerProvider, Span, SpanData, SpanExporter, SpanProcessor,
};
use prometheus::IntCounter;

use crate::config::TelemetryConfig;
use crate::metrics::Metrics;

/// Spans per export call: large enough to amortise a gRPC round trip.
const BATCH_SIZE: usize = 512;
/// A span waits at most this long before it is sent.
const BATCH_DELAY: Duration = Duration::from_millis(500);
/// An export that takes longer is abandoned (and its spans counted as failed).
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors setting up telemetry.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The OTLP exporter could not be built.
    #[error("cannot build the OTLP exporter for {endpoint}: {message}")]
    Exporter {
        /// The endpoint.
        endpoint: String,
        /// Why.
        message: String,
    },
    /// The export thread could not start.
    #[error("cannot start the span export thread: {0}")]
    Thread(#[source] std::io::Error),
}

/// The router's tracer, its provider (for flush at shutdown) and the propagator.
#[derive(Debug)]
pub struct Telemetry {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
    propagator: TraceContextPropagator,
    exporting: bool,
}

/// Shared between the processor (producers: request threads) and the export thread.
#[derive(Debug)]
struct Queue {
    spans: crossbeam_queue::ArrayQueue<SpanData>,
    flushes: Mutex<Vec<std::sync::mpsc::Sender<()>>>,
    closed: AtomicBool,
}

/// A span processor with a bounded lock-free queue that drops (and counts) instead
/// of blocking. Producers never wake the export thread (no futex per span); it
/// polls every [`POLL`] and sends when a batch is full or [`BATCH_DELAY`] passed.
#[derive(Debug)]
struct QueueProcessor {
    queue: Arc<Queue>,
    dropped: IntCounter,
}

/// How often the export thread looks at the queue.
const POLL: Duration = Duration::from_millis(20);

impl SpanProcessor for QueueProcessor {
    fn on_start(&self, _span: &mut Span, _cx: &Context) {}

    fn on_end(&self, span: SpanData) {
        if self.queue.spans.push(span).is_err() {
            self.dropped.inc();
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        if self.queue.closed.load(Ordering::Acquire) {
            return Err(OTelSdkError::AlreadyShutdown);
        }
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        self.queue
            .flushes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(done_tx);
        done_rx
            .recv_timeout(EXPORT_TIMEOUT + POLL * 2)
            .map_err(|_| OTelSdkError::Timeout(EXPORT_TIMEOUT))
    }

    fn shutdown_with_timeout(&self, _timeout: Duration) -> OTelSdkResult {
        let result = self.force_flush();
        self.queue.closed.store(true, Ordering::Release);
        result
    }
}

fn export_loop<E: SpanExporter>(
    exporter: E,
    queue: Arc<Queue>,
    runtime: tokio::runtime::Runtime,
    metrics: Metrics,
) {
    let mut oldest: Option<Instant> = None;
    loop {
        std::thread::sleep(POLL);
        let closed = queue.closed.load(Ordering::Acquire);
        let flushes: Vec<_> =
            std::mem::take(&mut *queue.flushes.lock().unwrap_or_else(|p| p.into_inner()));
        if !queue.spans.is_empty() {
            oldest.get_or_insert_with(Instant::now);
        }
        let due = oldest.is_some_and(|t| t.elapsed() >= BATCH_DELAY);
        if queue.spans.len() >= BATCH_SIZE || due || !flushes.is_empty() || closed {
            // Drain everything queued now, in batches.
            while !queue.spans.is_empty() {
                let spans: Vec<SpanData> = std::iter::from_fn(|| queue.spans.pop())
                    .take(BATCH_SIZE)
                    .collect();
                let count = spans.len() as u64;
                let result = runtime.block_on(async {
                    tokio::time::timeout(EXPORT_TIMEOUT, exporter.export(spans)).await
                });
                match result {
                    Ok(Ok(())) => metrics.spans_exported.inc_by(count),
                    Ok(Err(e)) => {
                        metrics.spans_failed.inc_by(count);
                        tracing::warn!("OTLP export of {count} spans failed: {e}");
                    }
                    Err(_) => {
                        metrics.spans_failed.inc_by(count);
                        tracing::warn!(
                            "OTLP export of {count} spans timed out after {EXPORT_TIMEOUT:?}"
                        );
                    }
                }
            }
            oldest = None;
        }
        for done in flushes {
            let _ = done.send(());
        }
        if closed {
            return;
        }
    }
}

impl Telemetry {
    /// Sets up tracing; spans are exported only when `otlp_endpoint` is set, but trace
    /// context is always created and propagated.
    pub fn new(config: &TelemetryConfig, metrics: &Metrics) -> Result<Self, TelemetryError> {
        let resource = Resource::builder()
            .with_service_name(config.service_name.clone())
            .build();
        let mut builder = SdkTracerProvider::builder().with_resource(resource.clone());
        if let Some(endpoint) = &config.otlp_endpoint {
            let err = |message: String| TelemetryError::Exporter {
                endpoint: endpoint.clone(),
                message,
            };
            // The exporter's gRPC channel lives on a small runtime of its own so
            // exporting never competes with pingora's request threads.
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| err(e.to_string()))?;
            let mut exporter = runtime
                .block_on(async {
                    use opentelemetry_otlp::WithExportConfig;
                    opentelemetry_otlp::SpanExporter::builder()
                        .with_tonic()
                        .with_endpoint(endpoint.clone())
                        .with_timeout(EXPORT_TIMEOUT)
                        .build()
                })
                .map_err(|e| err(e.to_string()))?;
            exporter.set_resource(&resource);
            let queue = Arc::new(Queue {
                spans: crossbeam_queue::ArrayQueue::new(config.queue_size.max(1)),
                flushes: Mutex::new(Vec::new()),
                closed: AtomicBool::new(false),
            });
            let worker_metrics = metrics.clone();
            let worker_queue = Arc::clone(&queue);
            std::thread::Builder::new()
                .name("strangler-otlp".into())
                .spawn(move || export_loop(exporter, worker_queue, runtime, worker_metrics))
                .map_err(TelemetryError::Thread)?;
            builder = builder.with_span_processor(QueueProcessor {
                queue,
                dropped: metrics.spans_dropped.clone(),
            });
        }
        let provider = builder.build();
        let tracer = provider.tracer("strangler-router");
        Ok(Self {
            provider,
            tracer,
            propagator: TraceContextPropagator::new(),
            exporting: config.otlp_endpoint.is_some(),
        })
    }

    /// Whether spans leave the process.
    pub fn exporting(&self) -> bool {
        self.exporting
    }

    /// Starts a server span whose parent is the caller's `traceparent`, if any.
    pub fn start_server_span(
        &self,
        name: String,
        headers: &http::HeaderMap,
        attributes: Vec<KeyValue>,
    ) -> Span {
        let parent = self.propagator.extract(&HeaderExtractor(headers));
        self.tracer
            .span_builder(name)
            .with_kind(SpanKind::Server)
            .with_attributes(attributes)
            .start_with_context(&self.tracer, &parent)
    }

    /// Starts a span whose parent is `parent` (same trace), e.g. a shadow copy's client span.
    pub fn start_child_span(
        &self,
        name: String,
        parent: &Span,
        kind: SpanKind,
        attributes: Vec<KeyValue>,
    ) -> Span {
        use opentelemetry::trace::Span as _;
        let cx = Context::new().with_remote_span_context(parent.span_context().clone());
        self.tracer
            .span_builder(name)
            .with_kind(kind)
            .with_attributes(attributes)
            .start_with_context(&self.tracer, &cx)
    }

    /// The W3C headers (`traceparent`, `tracestate`) that make `span` the upstream's parent.
    pub fn propagation_headers(&self, span: &Span) -> HashMap<String, String> {
        use opentelemetry::trace::Span as _;
        let cx = Context::new().with_remote_span_context(span.span_context().clone());
        let mut out = HashMap::new();
        self.propagator.inject_context(&cx, &mut out);
        out
    }

    /// Flushes queued spans; blocks, so call it off the async runtime.
    pub fn flush(&self) {
        let _ = self.provider.force_flush();
    }
}

struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

#[cfg(test)]
mod tests {
    use opentelemetry::trace::Span as _;

    use super::*;

    fn config(endpoint: Option<&str>) -> TelemetryConfig {
        TelemetryConfig {
            otlp_endpoint: endpoint.map(str::to_string),
            service_name: "t".into(),
            json_logs: false,
            queue_size: 4,
        }
    }

    #[test]
    fn incoming_traceparent_becomes_the_parent_and_is_passed_on() {
        let t = Telemetry::new(&config(None), &Metrics::new()).expect("telemetry");
        let mut headers = http::HeaderMap::new();
        headers.insert(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
                .parse()
                .expect("v"),
        );
        let span = t.start_server_span("GET /x".into(), &headers, vec![]);
        assert_eq!(
            span.span_context().trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        let out = t.propagation_headers(&span);
        let tp = out.get("traceparent").expect("traceparent");
        assert!(
            tp.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
            "{tp}"
        );
        assert!(
            !tp.contains("00f067aa0ba902b7"),
            "the upstream's parent is our span, not the caller's"
        );
    }

    #[test]
    fn a_full_queue_drops_and_counts_instead_of_blocking() {
        let metrics = Metrics::new();
        // Nothing listens on port 9: exports fail, and the queue of 4 fills.
        let t = Telemetry::new(&config(Some("http://127.0.0.1:9")), &metrics).expect("telemetry");
        let started = Instant::now();
        for i in 0..2_000 {
            let mut span = t.start_server_span(format!("s{i}"), &http::HeaderMap::new(), vec![]);
            span.end();
        }
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "ending spans must not block"
        );
        assert!(metrics.spans_dropped.get() > 0);
    }
}
