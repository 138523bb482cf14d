//! OpenTelemetry: sampled server spans, exported over OTLP/gRPC without ever
//! blocking the request path.
//!
//! Whether a request is traced is decided when it arrives ([`Telemetry::head`]): a
//! sampled request records a span from the start; any other gets only a trace id
//! and span id (for `traceparent` to the upstream) and its start time — no span, no
//! attribute strings, no protobuf. If its outcome calls for a span after all (an
//! error, a fallback, a slow answer, a shadow mismatch) the span is built at the end
//! with those same ids and start time ([`Telemetry::start_deferred`]).
//!
//! Spans go into a bounded lock-free queue; a dedicated thread batches them to the exporter.
//! When the queue is full a span is dropped and counted
//! (`strangler_spans_dropped_total`), never waited for.

use std::cell::Cell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::{
    SpanContext, SpanId, SpanKind, TraceContextExt, TraceFlags, TraceId, Tracer,
    TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{
    IdGenerator, RandomIdGenerator, Sampler, SdkTracer, SdkTracerProvider, Span, SpanData,
    SpanExporter, SpanProcessor,
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

thread_local! {
    /// Ids the next span built on this thread must have (a deferred span keeps the
    /// ids its request already sent upstream in `traceparent`).
    static PRESET_IDS: Cell<Option<(TraceId, SpanId)>> = const { Cell::new(None) };
}

/// Random ids, unless [`PRESET_IDS`] holds the ones to use.
#[derive(Debug, Default)]
struct PresetOrRandomIds(RandomIdGenerator);

impl IdGenerator for PresetOrRandomIds {
    fn new_trace_id(&self) -> TraceId {
        PRESET_IDS
            .with(Cell::get)
            .map_or_else(|| self.0.new_trace_id(), |(t, _)| t)
    }

    fn new_span_id(&self) -> SpanId {
        PRESET_IDS
            .with(Cell::get)
            .map_or_else(|| self.0.new_span_id(), |(_, s)| s)
    }
}

/// What is kept of a request that was not sampled on arrival: enough to build its
/// span later with the ids the upstream already saw.
#[derive(Debug, Clone)]
pub struct Deferred {
    /// The caller's span, when it sent a valid `traceparent`.
    pub parent: Option<SpanContext>,
    /// This request's trace (the caller's, or a new one).
    pub trace_id: TraceId,
    /// This request's span id.
    pub span_id: SpanId,
    /// When the request arrived.
    pub start: SystemTime,
}

/// The decision made when a request arrives.
#[derive(Debug)]
pub enum Head {
    /// Record a span from the start; the context holds the caller's span, if any.
    Sample(Context),
    /// No span unless the outcome asks for one.
    Defer(Deferred),
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
        let mut resource = Resource::builder().with_service_name(config.service_name.clone());
        if config.metrics_endpoint.is_some() {
            // The collector then counts this router's requests from its aggregates
            // and must not count its (sampled) spans a second time.
            resource = resource.with_attribute(KeyValue::new(
                strangler_model::names::attr::COUNTED,
                strangler_model::names::attr::COUNTED_BY_AGGREGATES,
            ));
        }
        let resource = resource.build();
        // The router makes the sampling decision itself (see [`Telemetry::head`]);
        // the SDK records every span it is asked to start.
        let mut builder = SdkTracerProvider::builder()
            .with_resource(resource.clone())
            .with_sampler(Sampler::AlwaysOn)
            .with_id_generator(PresetOrRandomIds::default());
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

    /// Decides whether a request is traced from the start: when the caller's
    /// `traceparent` is sampled, or with probability `ratio`. Without a
    /// `traceparent` and unsampled, this draws two random ids and allocates nothing.
    pub fn head(&self, headers: &http::HeaderMap, ratio: f64) -> Head {
        let parent = headers
            .contains_key("traceparent")
            .then(|| self.propagator.extract(&HeaderExtractor(headers)));
        let parent_span = parent
            .as_ref()
            .map(|cx| cx.span().span_context().clone())
            .filter(SpanContext::is_valid);
        let sampled = parent_span.as_ref().is_some_and(SpanContext::is_sampled)
            || ratio >= 1.0
            || (ratio > 0.0 && rand::random::<f64>() < ratio);
        if sampled {
            return Head::Sample(parent.unwrap_or_default());
        }
        let trace_id = parent_span.as_ref().map_or_else(
            || TraceId::from(rand::random::<u128>() | 1),
            SpanContext::trace_id,
        );
        Head::Defer(Deferred {
            parent: parent_span,
            trace_id,
            span_id: SpanId::from(rand::random::<u64>() | 1),
            start: SystemTime::now(),
        })
    }

    /// Starts a server span under `parent` (the caller's span, if any).
    pub fn start_server_span(
        &self,
        name: String,
        parent: &Context,
        attributes: Vec<KeyValue>,
    ) -> Span {
        self.tracer
            .span_builder(name)
            .with_kind(SpanKind::Server)
            .with_attributes(attributes)
            .start_with_context(&self.tracer, parent)
    }

    /// Builds, at the end of a request, the span it was not given on arrival: the
    /// same trace and span ids its upstream saw, started when the request arrived.
    pub fn start_deferred(
        &self,
        deferred: &Deferred,
        name: String,
        mut attributes: Vec<KeyValue>,
    ) -> Span {
        // Kept for its outcome, not drawn at random: views that estimate shares from
        // spans leave these out (they would over-represent errors and slow requests).
        attributes.push(KeyValue::new(
            strangler_model::names::attr::SAMPLED,
            strangler_model::names::attr::SAMPLED_FOR_OUTCOME,
        ));
        let parent = deferred.parent.clone().map_or_else(Context::new, |sc| {
            Context::new().with_remote_span_context(sc)
        });
        PRESET_IDS.with(|ids| ids.set(Some((deferred.trace_id, deferred.span_id))));
        let span = self
            .tracer
            .span_builder(name)
            .with_kind(SpanKind::Server)
            .with_start_time(deferred.start)
            .with_attributes(attributes)
            .start_with_context(&self.tracer, &parent);
        PRESET_IDS.with(|ids| ids.set(None));
        span
    }

    /// The `traceparent` that makes an unsampled request's (future) span the
    /// upstream's parent, flagged unsampled.
    pub fn deferred_traceparent(deferred: &Deferred) -> String {
        format!(
            "00-{}-{}-{:02x}",
            deferred.trace_id,
            deferred.span_id,
            TraceFlags::default().to_u8()
        )
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
            sample_ratio: 1.0,
            slow: Duration::from_secs(1),
            mismatch_spans_per_minute: 60,
            metrics_endpoint: None,
            metrics_interval: Duration::from_secs(10),
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
        let Head::Sample(parent) = t.head(&headers, 0.0) else {
            panic!("a sampled traceparent is always traced");
        };
        let span = t.start_server_span("GET /x".into(), &parent, vec![]);
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
    fn an_unsampled_request_is_deferred_and_its_late_span_keeps_the_ids_sent_upstream() {
        let t = Telemetry::new(&config(None), &Metrics::new()).expect("telemetry");
        let mut headers = http::HeaderMap::new();
        assert!(matches!(t.head(&headers, 1.0), Head::Sample(_)));
        let Head::Defer(d) = t.head(&headers, 0.0) else {
            panic!("ratio 0 defers");
        };
        assert!(d.parent.is_none());
        let tp = Telemetry::deferred_traceparent(&d);
        assert_eq!(tp, format!("00-{}-{}-00", d.trace_id, d.span_id));
        let span = t.start_deferred(&d, "GET /x".into(), vec![]);
        assert_eq!(span.span_context().trace_id(), d.trace_id);
        assert_eq!(span.span_context().span_id(), d.span_id);
        assert!(span.span_context().is_sampled(), "a late span is exported");
        // The next span gets fresh ids again.
        let other = t.start_server_span("GET /y".into(), &Context::new(), vec![]);
        assert_ne!(other.span_context().span_id(), d.span_id);

        // An unsampled caller: its trace continues, deferred.
        headers.insert(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"
                .parse()
                .expect("v"),
        );
        let Head::Defer(d) = t.head(&headers, 0.0) else {
            panic!("unsampled caller, ratio 0: deferred");
        };
        assert_eq!(d.trace_id.to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
        let span = t.start_deferred(&d, "GET /z".into(), vec![]);
        assert_eq!(span.span_context().trace_id(), d.trace_id);
    }

    #[test]
    fn a_full_queue_drops_and_counts_instead_of_blocking() {
        let metrics = Metrics::new();
        // Nothing listens on port 9: exports fail, and the queue of 4 fills.
        let t = Telemetry::new(&config(Some("http://127.0.0.1:9")), &metrics).expect("telemetry");
        let started = Instant::now();
        for i in 0..2_000 {
            let mut span = t.start_server_span(format!("s{i}"), &Context::new(), vec![]);
            span.end();
        }
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "ending spans must not block"
        );
        assert!(metrics.spans_dropped.get() > 0);
    }
}
