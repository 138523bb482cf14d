//! `strangler routes suggest` from known traffic stored by a real collector in a
//! real ClickHouse: templates, counts, shares, error rates and percentiles exact.

mod support;

use std::time::{Duration, SystemTime};

use opentelemetry::trace::{
    SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState,
};
use opentelemetry::{InstrumentationScope, KeyValue};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::trace::{SpanData, SpanEvents, SpanExporter as _, SpanLinks};
use serde_json::Value;
use strangler_testkit::ClickHouse;
use support::{Collector, strangler_bin};

struct Req<'a> {
    method: &'a str,
    path: String,
    route: Option<&'a str>,
    backend: &'a str,
    shadow: bool,
    ms: u64,
    status: i64,
}

fn span(n: u64, r: &Req<'_>) -> SpanData {
    let start = SystemTime::now() - Duration::from_secs(60);
    let mut attributes = vec![
        KeyValue::new("strangler.backend", r.backend.to_string()),
        KeyValue::new("strangler.decision", "default"),
        KeyValue::new("http.request.method", r.method.to_string()),
        KeyValue::new("url.path", r.path.clone()),
        KeyValue::new("http.response.status_code", r.status),
    ];
    if let Some(route) = r.route {
        attributes.push(KeyValue::new("strangler.route", route.to_string()));
    }
    if r.shadow {
        attributes.push(KeyValue::new("strangler.shadow", true));
    }
    SpanData {
        span_context: SpanContext::new(
            TraceId::from(u128::from(n) + 1),
            SpanId::from(n + 1),
            TraceFlags::SAMPLED,
            false,
            TraceState::default(),
        ),
        parent_span_id: SpanId::INVALID,
        parent_span_is_remote: false,
        span_kind: SpanKind::Server,
        name: r.method.to_string().into(),
        start_time: start,
        end_time: start + Duration::from_millis(r.ms),
        attributes,
        dropped_attributes_count: 0,
        events: SpanEvents::default(),
        links: SpanLinks::default(),
        status: if r.status >= 500 {
            Status::error("upstream failed")
        } else {
            Status::Unset
        },
        instrumentation_scope: InstrumentationScope::builder("test").build(),
    }
}

#[tokio::test]
async fn routes_suggest_groups_legacy_traffic_into_templates_with_exact_numbers() {
    let ch = ClickHouse::start().await.expect("clickhouse");
    let collector = Collector::start(&ch.http_url(), "").await;
    collector.wait_ready().await;
    let get = |path: String, ms: u64| Req {
        method: "GET",
        path,
        route: None,
        backend: "legacy",
        shadow: false,
        ms,
        status: 200,
    };
    let mut reqs = Vec::new();
    // 10 customer pages, 10..19 ms: /customers/{id}.
    for i in 0..10u64 {
        reqs.push(get(format!("/customers/{}", i + 1), 10 + i));
    }
    // 4 orders on a route still on legacy, one 503: /api/orders/{id}.
    for i in 0..4u64 {
        reqs.push(Req {
            route: Some("orders"),
            status: if i == 0 { 503 } else { 200 },
            ..get(format!("/api/orders/{}", 100 + i), 30)
        });
    }
    // 3 files by UUID, GET and POST: /files/{uuid}.
    for (i, method) in ["GET", "POST", "GET"].into_iter().enumerate() {
        reqs.push(Req {
            method,
            ..get(format!("/files/6f1c2b3a-9d4e-4f5a-8b7c-00000000000{i}"), 5)
        });
    }
    // 2 assets by hash and the home page.
    reqs.push(get("/assets/0123456789abcdef0123".into(), 2));
    reqs.push(get("/assets/fedcba9876543210fedc".into(), 2));
    reqs.push(get("/".into(), 8));
    // Not legacy's primary traffic: the new side and a shadow copy to legacy.
    reqs.push(Req {
        backend: "new",
        route: Some("orders"),
        ..get("/api/orders/7".into(), 3)
    });
    reqs.push(Req {
        shadow: true,
        route: Some("orders"),
        ..get("/api/orders/8".into(), 3)
    });
    let spans: Vec<SpanData> = reqs
        .iter()
        .enumerate()
        .map(|(n, r)| span(n as u64, r))
        .collect();
    let mut exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(collector.grpc_url())
        .with_timeout(Duration::from_secs(10))
        .build()
        .expect("exporter");
    exporter.set_resource(
        &opentelemetry_sdk::Resource::builder()
            .with_service_name("strangler-router")
            .build(),
    );
    exporter.export(spans).await.expect("export");

    let out = std::process::Command::new(strangler_bin())
        .args(["routes", "suggest", "--since", "1h", "--output", "json"])
        .args(["--collector", &collector.web_url("")])
        .output()
        .expect("strangler routes suggest");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let list: Vec<Value> = serde_json::from_slice(&out.stdout).expect("json");
    let templates: Vec<&str> = list.iter().filter_map(|s| s["template"].as_str()).collect();
    assert_eq!(
        templates,
        vec![
            "/customers/{id}",
            "/api/orders/{id}",
            "/files/{uuid}",
            "/assets/{hash}",
            "/"
        ],
        "{list:#?}"
    );
    let at = |t: &str| list.iter().find(|s| s["template"] == t).expect(t);
    let close = |v: &Value, want: f64| (v.as_f64().unwrap_or(f64::NAN) - want).abs() < 1e-9;
    let customers = at("/customers/{id}");
    assert_eq!(customers["requests"], 10);
    assert!(close(&customers["share"], 0.5), "{customers}");
    assert!(
        close(&customers["requests_per_min"], 10.0 / 60.0),
        "{customers}"
    );
    assert!(close(&customers["error_rate"], 0.0));
    assert!(close(&customers["p50_ms"], 15.0), "{customers}");
    assert!(close(&customers["p99_ms"], 19.0), "{customers}");
    assert_eq!(customers["covered_by"], serde_json::json!([]));
    let orders = at("/api/orders/{id}");
    assert_eq!(orders["requests"], 4);
    assert!(close(&orders["share"], 0.2));
    assert!(close(&orders["error_rate"], 0.25), "{orders}");
    assert_eq!(orders["covered_by"], serde_json::json!(["orders"]));
    assert_eq!(
        at("/files/{uuid}")["methods"],
        serde_json::json!(["GET", "POST"])
    );
    assert_eq!(at("/assets/{hash}")["requests"], 2);
    assert!(close(&at("/")["share"], 0.05));

    // The table for people names the busiest endpoint no route covers yet.
    let out = std::process::Command::new(strangler_bin())
        .args(["routes", "suggest", "--since", "1h"])
        .args(["--collector", &collector.web_url("")])
        .output()
        .expect("strangler routes suggest");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(
            "busiest endpoint without a route: /customers/{id} (50.0 % of legacy traffic)"
        ),
        "{text}"
    );
    assert!(text.contains("orders (on legacy)"), "{text}");
}
