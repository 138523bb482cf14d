//! The dashboards' known traffic as OTLP spans, and exporting it to a collector:
//! shared by the dashboard test (one ClickHouse) and the cluster test (2 × 2).

use std::time::{SystemTime, UNIX_EPOCH};

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::span::{Event, SpanKind};
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};

pub fn kv(key: &str, value: any_value::Value) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: Some(AnyValue { value: Some(value) }),
        ..Default::default()
    }
}

pub fn s(key: &str, v: &str) -> KeyValue {
    kv(key, any_value::Value::StringValue(v.into()))
}

pub fn i(key: &str, v: i64) -> KeyValue {
    kv(key, any_value::Value::IntValue(v))
}

pub fn b(key: &str, v: bool) -> KeyValue {
    kv(key, any_value::Value::BoolValue(v))
}

/// The known traffic. `orders`: legacy serves 400 (every 50th a 500 → 8), new serves
/// 100 (every 10th a 500 → 10); 200 of legacy's requests were shadowed to new (no
/// errors), 150 matching and 50 differing at /total (10 of those also at /currency);
/// 10 more were the new side's failures that legacy answered (fallbacks).
/// `catalog`: 50 legacy. Unrouted: 150 legacy. Spread over the last ten minutes.
pub struct Known {
    /// The spans.
    pub spans: Vec<Span>,
    /// A trace whose shadow pair differs.
    pub mismatch_trace: String,
}

pub fn known() -> Known {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_nanos() as u64;
    let minute = 60_000_000_000u64;
    let mut spans = Vec::new();
    let mut n: u64 = 0;
    let mut mismatch_trace = String::new();
    let mut next = |route: Option<&str>,
                    backend: &str,
                    ms: u64,
                    status: i64,
                    extra: Vec<KeyValue>,
                    events: Vec<Event>,
                    kind: SpanKind,
                    parent: Option<(u128, u64)>|
     -> (u128, u64, Span) {
        n += 1;
        // A child starts 1 ms after its parent (ids encode the parent's position).
        let (trace, parent_id, start) = match parent {
            Some((trace, parent_id)) => {
                let p = parent_id >> 4;
                (
                    trace,
                    parent_id,
                    now - minute * (1 + p % 9) - p * 1_000 + 1_000_000,
                )
            }
            None => (
                u128::from(n) << 8 | 1,
                0,
                now - minute * (1 + n % 9) - n * 1_000,
            ),
        };
        let id = n << 4 | 1;
        let mut attributes = vec![
            s("strangler.backend", backend),
            s("http.request.method", "GET"),
            i("http.response.status_code", status),
            s("url.path", &format!("/api/{}/{n}", route.unwrap_or("home"))),
        ];
        if let Some(r) = route {
            attributes.push(s("strangler.route", r));
        }
        attributes.extend(extra);
        let span = Span {
            trace_id: trace.to_be_bytes().to_vec(),
            span_id: id.to_be_bytes().to_vec(),
            parent_span_id: if parent_id == 0 {
                Vec::new()
            } else {
                parent_id.to_be_bytes().to_vec()
            },
            name: format!("GET {}", route.unwrap_or("/")),
            kind: kind as i32,
            start_time_unix_nano: start,
            end_time_unix_nano: start + ms * 1_000_000,
            attributes,
            events,
            ..Default::default()
        };
        (trace, id, span)
    };
    for k in 0..400u64 {
        let status = if k % 50 == 0 { 500 } else { 200 };
        let mut extra = Vec::new();
        let mut events = Vec::new();
        if k < 200 {
            extra.push(s("strangler.pair_id", &format!("p{k}")));
            if k < 150 {
                extra.push(s("strangler.diff", "match"));
            } else {
                let paths = if k < 160 {
                    "/total,/currency"
                } else {
                    "/total"
                };
                extra.push(s("strangler.diff", "mismatch"));
                extra.push(s("strangler.diff.paths", paths));
                events.push(Event {
                    name: "strangler.mismatch".into(),
                    time_unix_nano: now - minute,
                    attributes: vec![
                        s("request", &format!("GET /api/orders/{k}")),
                        i("primary.status", 200),
                        s(
                            "primary.body",
                            &format!("{{\"id\":{k},\"total\":\"12.30\"}}"),
                        ),
                        i("shadow.status", 200),
                        s("shadow.body", &format!("{{\"id\":{k},\"total\":12.3}}")),
                        s(
                            "differences",
                            r#"[{"path":"/total","primary":"\"12.30\"","shadow":"12.3"}]"#,
                        ),
                    ],
                    ..Default::default()
                });
            }
        }
        let (trace, id, span) = next(
            Some("orders"),
            "legacy",
            10 + k % 40,
            status,
            extra,
            events,
            SpanKind::Server,
            None,
        );
        if (150..200).contains(&k) && mismatch_trace.is_empty() {
            mismatch_trace = format!("{trace:032x}");
        }
        spans.push(span);
        if k < 200 {
            let (_, _, shadow) = next(
                Some("orders"),
                "new",
                25,
                200,
                vec![
                    b("strangler.shadow", true),
                    s("strangler.pair_id", &format!("p{k}")),
                ],
                Vec::new(),
                SpanKind::Client,
                Some((trace, id)),
            );
            spans.push(shadow);
        }
    }
    for k in 0..100u64 {
        let status = if k % 10 == 0 { 500 } else { 200 };
        let (_, _, span) = next(
            Some("orders"),
            "new",
            30,
            status,
            Vec::new(),
            Vec::new(),
            SpanKind::Server,
            None,
        );
        spans.push(span);
    }
    // Requests the new side failed and legacy then answered (the router's fallback).
    for _ in 0..10 {
        let (_, _, span) = next(
            Some("orders"),
            "legacy",
            12,
            200,
            vec![s("strangler.decision", "fallback")],
            Vec::new(),
            SpanKind::Server,
            None,
        );
        spans.push(span);
    }
    for _ in 0..50 {
        let (_, _, span) = next(
            Some("catalog"),
            "legacy",
            5,
            200,
            Vec::new(),
            Vec::new(),
            SpanKind::Server,
            None,
        );
        spans.push(span);
    }
    for _ in 0..150 {
        let (_, _, span) = next(
            None,
            "legacy",
            3,
            200,
            Vec::new(),
            Vec::new(),
            SpanKind::Server,
            None,
        );
        spans.push(span);
    }
    Known {
        spans,
        mismatch_trace,
    }
}

pub async fn export(grpc: &str, spans: Vec<Span>) {
    let mut client = TraceServiceClient::connect(grpc.to_string())
        .await
        .expect("connect to the collector");
    for chunk in spans.chunks(300) {
        client
            .export(ExportTraceServiceRequest {
                resource_spans: vec![ResourceSpans {
                    resource: Some(Resource {
                        attributes: vec![s("service.name", "strangler-router")],
                        ..Default::default()
                    }),
                    scope_spans: vec![ScopeSpans {
                        spans: chunk.to_vec(),
                        ..Default::default()
                    }],
                    ..Default::default()
                }],
            })
            .await
            .expect("export");
    }
}
