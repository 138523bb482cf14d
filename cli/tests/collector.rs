//! The collector against a real ClickHouse, fed by the real OTLP exporter.

mod support;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use opentelemetry::trace::{
    SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState,
};
use opentelemetry::{InstrumentationScope, KeyValue};
use opentelemetry_otlp::{WithExportConfig, WithTonicConfig};
use opentelemetry_sdk::trace::{SpanData, SpanEvents, SpanExporter as _, SpanLinks};
use prost::Message;
use serde_json::Value;
use strangler_testkit::ClickHouse;
use support::{Collector, ch_client};

/// A span as the SDK hands it to exporters.
fn span(
    trace: u128,
    id: u64,
    route: &str,
    backend: &str,
    duration_ms: u64,
    status: i64,
) -> SpanData {
    let start = SystemTime::now() - Duration::from_secs(5);
    SpanData {
        span_context: SpanContext::new(
            TraceId::from(trace),
            SpanId::from(id),
            TraceFlags::SAMPLED,
            false,
            TraceState::default(),
        ),
        parent_span_id: SpanId::INVALID,
        parent_span_is_remote: false,
        span_kind: SpanKind::Server,
        name: format!("GET /api/{route}").into(),
        start_time: start,
        end_time: start + Duration::from_millis(duration_ms),
        attributes: vec![
            KeyValue::new("strangler.route", route.to_string()),
            KeyValue::new("strangler.backend", backend.to_string()),
            KeyValue::new("strangler.decision", "flag"),
            KeyValue::new("http.request.method", "GET"),
            KeyValue::new("http.response.status_code", status),
            KeyValue::new("list", opentelemetry::Value::Array(vec![1i64, 2].into())),
        ],
        dropped_attributes_count: 0,
        events: SpanEvents::default(),
        links: SpanLinks::default(),
        status: if status >= 500 {
            Status::error("upstream failed")
        } else {
            Status::Unset
        },
        instrumentation_scope: InstrumentationScope::builder("test").build(),
    }
}

fn grpc_exporter(url: &str) -> opentelemetry_otlp::SpanExporter {
    opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(url)
        .with_compression(opentelemetry_otlp::Compression::Gzip)
        .with_timeout(Duration::from_secs(10))
        .build()
        .expect("grpc exporter")
}

fn http_exporter(url: &str) -> opentelemetry_otlp::SpanExporter {
    opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_endpoint(url)
        .with_timeout(Duration::from_secs(10))
        .build()
        .expect("http exporter")
}

#[derive(Debug, clickhouse::Row, serde::Deserialize)]
struct Stored {
    trace_id: String,
    span_id: String,
    name: String,
    kind: String,
    status_code: String,
    service: String,
    route: String,
    backend: String,
    decision: String,
    http_method: String,
    http_status: u16,
    duration_ns: u64,
    attr_keys: Vec<String>,
    attr_values: Vec<String>,
}

#[tokio::test]
async fn spans_from_the_otlp_exporter_over_grpc_and_http_arrive_with_all_fields() {
    let ch = ClickHouse::start().await.expect("clickhouse");
    let collector = Collector::start(&ch.http_url(), "").await;
    collector.wait_ready().await;
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name("test-service")
        .build();
    let mut grpc = grpc_exporter(&collector.grpc_url());
    grpc.set_resource(&resource);
    grpc.export(vec![span(0xaa, 1, "orders", "new", 12, 200)])
        .await
        .expect("grpc export");
    let mut http = http_exporter(&collector.http_url("/v1/traces"));
    http.set_resource(&resource);
    http.export(vec![span(0xbb, 2, "orders", "legacy", 30, 503)])
        .await
        .expect("http export");

    let rows: Vec<Stored> = ch_client(&ch)
        .query("SELECT trace_id, span_id, name, kind, status_code, service, route, backend, decision, http_method, http_status, duration_ns, attr_keys, attr_values FROM strangler.spans ORDER BY trace_id")
        .fetch_all()
        .await
        .expect("select");
    assert_eq!(rows.len(), 2, "{rows:?}\n{}", collector.log());
    let (a, b) = (&rows[0], &rows[1]);
    assert_eq!(a.trace_id, format!("{:032x}", 0xaa));
    assert_eq!(a.span_id, format!("{:016x}", 1));
    assert_eq!(
        (
            a.name.as_str(),
            a.kind.as_str(),
            a.route.as_str(),
            a.backend.as_str()
        ),
        ("GET /api/orders", "server", "orders", "new")
    );
    assert_eq!(
        (a.decision.as_str(), a.http_method.as_str(), a.http_status),
        ("flag", "GET", 200)
    );
    assert_eq!(a.duration_ns, 12_000_000);
    assert_eq!(
        a.service, "test-service",
        "service.name comes from the exporter's resource"
    );
    let list = a
        .attr_keys
        .iter()
        .position(|k| k == "list")
        .expect("list attribute");
    assert_eq!(a.attr_values[list], "[1,2]");
    assert_eq!(
        (b.backend.as_str(), b.http_status, b.status_code.as_str()),
        ("legacy", 503, "error")
    );
    assert!(
        collector
            .metric("strangler_collector_spans_written_total")
            .await
            >= 2
    );
}

#[tokio::test]
async fn compare_reports_the_percentiles_of_a_known_distribution() {
    let ch = ClickHouse::start().await.expect("clickhouse");
    let collector = Collector::start(&ch.http_url(), "").await;
    collector.wait_ready().await;
    let exporter = grpc_exporter(&collector.grpc_url());
    // Legacy: 1..=1000 ms, every 10th a 500. New: twice as slow, no errors.
    let mut batch = Vec::new();
    for i in 1..=1000u64 {
        batch.push(span(
            u128::from(i),
            i,
            "orders",
            "legacy",
            i,
            if i % 10 == 0 { 500 } else { 200 },
        ));
        batch.push(span(u128::from(i) + 10_000, i, "orders", "new", 2 * i, 200));
    }
    for chunk in batch.chunks(500) {
        exporter.export(chunk.to_vec()).await.expect("export");
    }
    let doc: Value = reqwest::get(collector.web_url("/api/route?route=orders&since=1h"))
        .await
        .expect("route")
        .json()
        .await
        .expect("json");
    let side = |name: &str| {
        doc["route_sides"]
            .as_array()
            .and_then(|s| s.iter().find(|s| s["backend"] == name))
            .cloned()
            .unwrap_or_else(|| panic!("no {name} side in {doc}"))
    };
    let (legacy, new) = (side("legacy"), side("new"));
    assert_eq!(legacy["requests"], 1000);
    assert_eq!(legacy["errors"], 100);
    assert_eq!(new["errors"], 0);
    let ms = |v: &Value, i: usize| v[["p50_ms", "p95_ms", "p99_ms"][i]].as_f64().unwrap_or(0.0);
    for (i, want) in [(0, 500.0), (1, 950.0), (2, 990.0)] {
        let got = ms(&legacy, i);
        assert!(
            (got - want).abs() <= want * 0.02,
            "legacy p{i}: {got} ms, want {want}"
        );
        let got = ms(&new, i);
        assert!(
            (got - 2.0 * want).abs() <= 2.0 * want * 0.02,
            "new p{i}: {got} ms, want {}",
            2.0 * want
        );
    }
    assert!(
        doc["route_traffic"]
            .as_array()
            .is_some_and(|s| !s.is_empty()),
        "{doc}"
    );

    let trace = format!("{:032x}", 7u128);
    let t: Value = reqwest::get(collector.web_url(&format!("/api/trace/{trace}")))
        .await
        .expect("trace")
        .json()
        .await
        .expect("json");
    assert_eq!(t["spans"].as_array().map(Vec::len), Some(1), "{t}");
    let missing = reqwest::get(collector.web_url("/api/trace/nothex"))
        .await
        .expect("trace");
    assert_eq!(missing.status().as_u16(), 400);
}

#[tokio::test]
async fn malformed_otlp_gets_a_clear_error_and_the_collector_keeps_serving() {
    let ch = ClickHouse::start().await.expect("clickhouse");
    let collector = Collector::start(&ch.http_url(), "max_body_bytes = 100000\n").await;
    let client = reqwest::Client::new();
    let post = |ct: &str, body: Vec<u8>| {
        client
            .post(collector.http_url("/v1/traces"))
            .header("content-type", ct.to_string())
            .body(body)
            .send()
    };
    let garbage = post("application/x-protobuf", vec![0xff, 0xff, 0xff, 0x01])
        .await
        .expect("post");
    assert_eq!(garbage.status().as_u16(), 400);
    assert!(
        garbage
            .text()
            .await
            .unwrap_or_default()
            .contains("not an OTLP")
    );
    assert_eq!(
        post("text/plain", b"hi".to_vec())
            .await
            .expect("post")
            .status()
            .as_u16(),
        415
    );
    assert_eq!(
        post("application/json", b"{\"resourceSpans\": [".to_vec())
            .await
            .expect("post")
            .status()
            .as_u16(),
        400
    );
    // Oversized: refused before it is read (the server may close the connection while
    // the client is still sending, which is how every proxy behaves).
    let oversized = reqwest::Client::new()
        .post(collector.http_url("/v1/traces"))
        .header("content-type", "application/x-protobuf")
        .body(vec![0u8; 200_000])
        .send()
        .await;
    match oversized {
        Ok(r) => assert_eq!(r.status().as_u16(), 413),
        Err(e) => assert!(e.is_request(), "{e}"),
    }
    // A small gzip body that inflates past the limit is refused after decompression.
    let bomb = {
        use std::io::Write;
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        gz.write_all(&vec![0u8; 1_000_000]).expect("gzip");
        gz.finish().expect("gzip")
    };
    let r = client
        .post(collector.http_url("/v1/traces"))
        .header("content-type", "application/x-protobuf")
        .header("content-encoding", "gzip")
        .body(bomb)
        .send()
        .await
        .expect("post");
    assert_eq!(r.status().as_u16(), 413);
    let bad_gzip = client
        .post(collector.http_url("/v1/traces"))
        .header("content-type", "application/x-protobuf")
        .header("content-encoding", "gzip")
        .body(vec![1, 2, 3])
        .send()
        .await
        .expect("post");
    assert_eq!(bad_gzip.status().as_u16(), 400);
    // A zero trace id is a client error, over HTTP and gRPC.
    let zero = serde_json::json!({"resourceSpans": [{"scopeSpans": [{"spans": [{
        "traceId": "00000000000000000000000000000000", "spanId": "0102030405060708", "name": "x",
        "startTimeUnixNano": "1", "endTimeUnixNano": "2"}]}]}]});
    let r = post("application/json", zero.to_string().into_bytes())
        .await
        .expect("post");
    assert_eq!(r.status().as_u16(), 400);
    assert!(r.text().await.unwrap_or_default().contains("trace_id"));
    let ok = serde_json::json!({"resourceSpans": [{"scopeSpans": [{"spans": [{
        "traceId": "0102030405060708090a0b0c0d0e0f10", "spanId": "0102030405060708", "name": "json",
        "startTimeUnixNano": "1700000000000000000", "endTimeUnixNano": "1700000000001000000",
        "attributes": [{"key": "b", "value": {"bytesValue": "3q0="}}, {"key": "kv", "value": {"kvlistValue": {"values": [{"key": "x", "value": {"doubleValue": 1.5}}]}}}]}]}]}]});
    let r = post("application/json", ok.to_string().into_bytes())
        .await
        .expect("post");
    assert_eq!(r.status().as_u16(), 200, "{:?}", r.text().await);
    // Metrics over OTLP/HTTP: JSON (and protobuf) stored once acknowledged; garbage
    // is a 400 that says what it expected; logs are not stored, and say so.
    let metrics_post = |content_type: &'static str, body: Vec<u8>| {
        client
            .post(collector.http_url("/v1/metrics"))
            .header("content-type", content_type)
            .body(body)
            .send()
    };
    let gauge = serde_json::json!({"resourceMetrics": [{"scopeMetrics": [{"metrics": [{
        "name": "queue.depth", "gauge": {"dataPoints": [{"asInt": "7",
        "timeUnixNano": "1700000000000000000"}]}}]}]}]});
    let r = metrics_post("application/json", gauge.to_string().into_bytes())
        .await
        .expect("post");
    assert_eq!(r.status().as_u16(), 200, "{:?}", r.text().await);
    let r = metrics_post("application/x-protobuf", b"\xff\xff".to_vec())
        .await
        .expect("post");
    assert_eq!(r.status().as_u16(), 400);
    assert!(
        r.text()
            .await
            .unwrap_or_default()
            .contains("ExportMetricsServiceRequest")
    );
    let logs_signal = client
        .post(collector.http_url("/v1/logs"))
        .header("content-type", "application/x-protobuf")
        .body(Vec::<u8>::new())
        .send()
        .await
        .expect("post");
    assert_eq!(logs_signal.status().as_u16(), 501);
    assert!(
        collector
            .metric("strangler_collector_requests_malformed_total")
            .await
            >= 6
    );
    let mut zero_span = span(1, 1, "orders", "new", 1, 200);
    zero_span.span_context = SpanContext::new(
        TraceId::INVALID,
        SpanId::from(1),
        TraceFlags::SAMPLED,
        false,
        TraceState::default(),
    );
    let err = grpc_exporter(&collector.grpc_url())
        .export(vec![zero_span])
        .await
        .expect_err("invalid trace id");
    assert!(
        err.to_string().contains("trace_id") || err.to_string().contains("InvalidArgument"),
        "{err}"
    );
}

#[tokio::test]
async fn a_full_queue_answers_with_retryable_errors_instead_of_dropping() {
    let ch = ClickHouse::start().await.expect("clickhouse");
    // A tiny queue and a slow batch: exports hold their place for 2 s.
    let collector =
        Collector::start(&ch.http_url(), "queue_capacity = 10\nbatch_size = 1000\n").await;
    std::fs::write(
        &collector.config,
        std::fs::read_to_string(&collector.config)
            .expect("read")
            .replace("batch_timeout_ms = 200", "batch_timeout_ms = 2000"),
    )
    .expect("write");
    let mut collector = collector;
    collector.kill();
    collector.spawn().await;
    collector.wait_ready().await;
    let request = |first: u64| {
        let spans: Vec<_> = (0..5u64)
            .map(|i| opentelemetry_proto::tonic::trace::v1::Span {
                trace_id: vec![7; 16],
                span_id: (first + i + 1).to_be_bytes().to_vec(),
                name: "x".into(),
                start_time_unix_nano: 1_700_000_000_000_000_000,
                end_time_unix_nano: 1_700_000_000_000_000_100,
                ..Default::default()
            })
            .collect();
        opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest {
            resource_spans: vec![opentelemetry_proto::tonic::trace::v1::ResourceSpans {
                scope_spans: vec![opentelemetry_proto::tonic::trace::v1::ScopeSpans {
                    spans,
                    ..Default::default()
                }],
                ..Default::default()
            }],
        }
        .encode_to_vec()
    };
    let client = reqwest::Client::new();
    let mut tasks = Vec::new();
    for k in 0..6u64 {
        let client = client.clone();
        let url = collector.http_url("/v1/traces");
        let body = request(k * 100);
        tasks.push(tokio::spawn(async move {
            let r = client
                .post(url)
                .header("content-type", "application/x-protobuf")
                .body(body)
                .send()
                .await
                .expect("post");
            (
                r.status().as_u16(),
                r.headers()
                    .get("retry-after")
                    .map(|v| v.to_str().unwrap_or("").to_string()),
            )
        }));
    }
    let mut accepted = 0;
    let mut refused = 0;
    for t in tasks {
        match t.await.expect("join") {
            (200, _) => accepted += 1,
            (429, Some(retry)) => {
                assert_eq!(retry, "1");
                refused += 1;
            }
            other => panic!("unexpected answer {other:?}"),
        }
    }
    assert_eq!(accepted, 2, "10 spans of queue take two exports of 5");
    assert_eq!(refused, 4);
    assert_eq!(
        collector
            .metric("strangler_collector_spans_rejected_total")
            .await,
        20
    );
    // Everything accepted is stored: at once, or — when the insert was slow on a
    // loaded machine and the batch went to the spool before the ack — by the replay.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let stored: u64 = ch_client(&ch)
            .query("SELECT count() FROM strangler.spans FINAL")
            .fetch_one()
            .await
            .expect("count");
        if stored == 10 {
            break;
        }
        assert!(stored < 10, "stored {stored} spans, more than accepted");
        assert!(
            std::time::Instant::now() < deadline,
            "accepted spans never stored: {stored}/10"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Sends batches of 50 spans with unique ids over gRPC until told to stop; records the
/// ids of every acknowledged span.
async fn load(
    url: String,
    first_id: u64,
    acked: Arc<Mutex<HashSet<u64>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> (u64, u64) {
    let exporter = grpc_exporter(&url);
    let (mut ok, mut failed) = (0, 0);
    let mut next = first_id;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let ids: Vec<u64> = (next..next + 50).collect();
        next += 50;
        let batch: Vec<SpanData> = ids
            .iter()
            .map(|&id| span(u128::from(id), id, "orders", "new", 1, 200))
            .collect();
        match exporter.export(batch).await {
            Ok(()) => {
                ok += 1;
                acked.lock().expect("lock").extend(ids);
            }
            Err(_) => {
                failed += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (ok, failed)
}

#[tokio::test]
async fn no_acknowledged_span_is_lost_or_stored_twice_across_a_clickhouse_outage_and_a_kill() {
    let outage = Duration::from_secs(
        std::env::var("STRANGLER_OUTAGE_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(60),
    );
    let mut ch = ClickHouse::start().await.expect("clickhouse");
    let mut collector = Collector::start(&ch.http_url(), "").await;
    collector.wait_ready().await;
    let acked = Arc::new(Mutex::new(HashSet::new()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut loader = tokio::spawn(load(
        collector.grpc_url(),
        1,
        Arc::clone(&acked),
        Arc::clone(&stop),
    ));

    tokio::time::sleep(Duration::from_secs(2)).await;
    ch.stop();
    let down = Instant::now();
    tokio::time::sleep(outage / 2).await;
    // Crash the collector mid-outage: its spool must survive it.
    collector.kill();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let first = (&mut loader).await.expect("loader");
    collector.spawn().await;
    let stop2 = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let loader2 = tokio::spawn(load(
        collector.grpc_url(),
        1 << 40,
        Arc::clone(&acked),
        Arc::clone(&stop2),
    ));
    tokio::time::sleep(outage.saturating_sub(down.elapsed())).await;
    ch.restart().await.expect("clickhouse back");
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop2.store(true, std::sync::atomic::Ordering::Relaxed);
    let second = loader2.await.expect("loader");
    let acked: HashSet<u64> = acked.lock().expect("lock").clone();
    assert!(
        acked.len() > 500,
        "the load acknowledged only {} spans ({first:?}, {second:?})",
        acked.len()
    );

    let client = ch_client(&ch);
    let spool = collector.dir.path().join("strangler-spool");
    let pending = |dir: &std::path::Path| -> Vec<String> {
        std::fs::read_dir(dir)
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    // Span batches (and JSON ones an older collector wrote).
                    .filter(|n| n.ends_with(".spans.rowbinary") || n.ends_with(".batch.json"))
                    .collect()
            })
            .unwrap_or_default()
    };
    let drain_deadline = Instant::now() + Duration::from_secs(30);
    while !pending(&spool).is_empty() {
        assert!(
            Instant::now() < drain_deadline,
            "the spool did not drain: {:?}\n{}",
            pending(&spool),
            collector.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let ids: Vec<String> = client
        .query("SELECT DISTINCT span_id FROM strangler.spans")
        .fetch_all()
        .await
        .expect("ids");
    let stored: HashSet<u64> = ids
        .iter()
        .filter_map(|h| u64::from_str_radix(h, 16).ok())
        .collect();
    let missing: Vec<_> = acked.difference(&stored).take(10).collect();
    assert!(
        missing.is_empty(),
        "{} acknowledged spans missing, e.g. {missing:?}\n{}",
        acked.difference(&stored).count(),
        collector.log()
    );
    let total: u64 = client
        .query("SELECT count() FROM strangler.spans FINAL")
        .fetch_one()
        .await
        .expect("count");
    assert_eq!(total as usize, stored.len(), "a span is stored twice");
    assert!(
        collector
            .metric("strangler_collector_spans_replayed_total")
            .await
            > 0,
        "the spool was used and replayed"
    );
    eprintln!(
        "outage {outage:?}: {} spans acknowledged ({first:?} and {second:?} ok/failed batches), all stored once",
        acked.len()
    );
}

#[tokio::test]
async fn the_routers_aggregates_arrive_as_metric_points_with_exact_counts_across_an_outage() {
    let mut ch = ClickHouse::start().await.expect("clickhouse");
    let collector = Collector::start(&ch.http_url(), "").await;
    collector.wait_ready().await;
    let legacy = support::Upstream::start("legacy").await;
    let new = support::Upstream::start("new").await;
    let telemetry = format!(
        "[telemetry]\nmetrics_endpoint = \"{}\"\nmetrics_interval_ms = 200\n",
        collector.grpc_url()
    );
    let router = support::Router::start(
        &support::route_config(legacy.addr, new.addr, &telemetry),
        &[(
            "flags.json",
            &support::flags_doc("strangler.orders", true, 50),
        )],
        &[],
    )
    .await;
    router.get_orders_as_users(30, |_| async {}).await;
    let db = ch_client(&ch);
    let sum = |sql: &'static str| {
        let db = db.clone();
        async move { db.query(sql).fetch_one::<f64>().await.unwrap_or(-1.0) }
    };
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let requests = sum("SELECT sum(value) FROM strangler.metric_points WHERE name = 'strangler.requests' AND has(attr_values, 'orders')").await;
        if (requests - 30.0).abs() < f64::EPSILON {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{requests} of 30 requests stored as metric points\n{}",
            collector.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The latency histograms carry every request too, with their buckets.
    let counted = sum("SELECT toFloat64(sum(count)) FROM strangler.metric_points WHERE name = 'strangler.request.duration' AND kind = 'exponential_histogram' AND has(attr_values, 'orders')").await;
    assert!((counted - 30.0).abs() < f64::EPSILON, "{counted}");
    let buckets = sum("SELECT toFloat64(sum(arraySum(bucket_counts))) FROM strangler.metric_points WHERE name = 'strangler.request.duration' AND has(attr_values, 'orders')").await;
    assert!((buckets - 30.0).abs() < f64::EPSILON, "{buckets}");

    // ClickHouse goes away: the collector spools the points and acknowledges them
    // (the router's exports keep succeeding), then stores them once it is back.
    ch.stop();
    router.get_orders_as_users(20, |_| async {}).await;
    support::wait_until(Duration::from_secs(10), "points spooled", || async {
        collector
            .metric("strangler_collector_metric_points_spooled_total")
            .await
            > 0
    })
    .await;
    ch.restart().await.expect("clickhouse back");
    let db = ch_client(&ch);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let requests = db
            .query("SELECT sum(value) FROM strangler.metric_points WHERE name = 'strangler.requests' AND has(attr_values, 'orders')")
            .fetch_one::<f64>()
            .await
            .unwrap_or(-1.0);
        if (requests - 50.0).abs() < f64::EPSILON {
            break;
        }
        assert!(
            requests <= 50.0 && Instant::now() < deadline,
            "{requests} of 50 requests stored after the outage\n{}",
            collector.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // (Counted just after the replayed rows are in and their spool files gone.)
    support::wait_until(Duration::from_secs(5), "the replay counted", || async {
        collector
            .metric("strangler_collector_metric_points_replayed_total")
            .await
            > 0
    })
    .await;
    assert!(
        !router.log().contains("metrics export to"),
        "every export was acknowledged (stored or spooled):\n{}",
        router.log()
    );
    // Every count lands in route_stats once: the views see the same 50. An insert's
    // rows become visible in the source table a moment before its materialized
    // views' parts do (ClickHouse commits them one after the other), so wait for
    // them, then check nothing more arrives (no count twice).
    let counted = || orders_counted(&db);
    support::wait_until(
        Duration::from_secs(10),
        "route_stats counting all 50",
        || async { counted().await >= 50.0 },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let counted = counted().await;
    assert!((counted - 50.0).abs() < f64::EPSILON, "{counted}");
}

/// Regression test for a bug the soak found (#23): an export stored in ClickHouse
/// whose acknowledgement was lost (the collector SIGKILLed while ClickHouse
/// finished the insert) came again from the router carrying the same counts plus
/// newer ones, and was counted twice. The router now sends such an export again
/// unchanged, marked as a retry; the collector skips a retry it already holds and
/// stores one it does not.
#[tokio::test]
async fn a_retried_metrics_export_is_counted_once_whether_or_not_it_was_stored() {
    use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_client::MetricsServiceClient;
    use strangler_model::{Backend, Reason};
    use strangler_router::stats::export::{Baseline, mark_retry, request};
    use strangler_router::stats::{Key, Role, Stats};

    let ch = ClickHouse::start().await.expect("clickhouse");
    let collector = Collector::start(&ch.http_url(), "").await;
    collector.wait_ready().await;
    let stats = Stats::default();
    let orders = stats.route("orders");
    let key = Key {
        backend: Backend::Legacy,
        reason: Reason::Flag,
        role: Role::Primary,
        status: 200,
    };
    let retry = |mut r| {
        mark_retry(&mut r);
        r
    };
    let mut client = MetricsServiceClient::connect(collector.grpc_url())
        .await
        .expect("connect");
    // Stored, and its answer (as far as the router knows) lost: it comes again.
    for _ in 0..7 {
        orders.record(key, false, Duration::from_millis(3));
    }
    let (first, next) = request(&stats, &Baseline::default(), "strangler-router", "soak-1");
    // As the router does: again until acknowledged (a retry waits while the
    // collector's spool drains, as it does just after a start).
    let export = async |client: &mut MetricsServiceClient<_>, r| {
        let deadline = Instant::now() + Duration::from_secs(10);
        while let Err(e) = client.export(Clone::clone(&r)).await {
            assert!(Instant::now() < deadline, "never acknowledged: {e}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    export(&mut client, first.clone()).await;
    export(&mut client, retry(first)).await;
    // Never arrived the first time: the retry is stored.
    for _ in 0..5 {
        orders.record(key, false, Duration::from_millis(3));
    }
    let (second, _) = request(&stats, &next, "strangler-router", "soak-1");
    export(&mut client, retry(second)).await;

    let db = ch_client(&ch);
    let counted = || orders_counted(&db);
    support::wait_until(Duration::from_secs(10), "12 requests counted", || async {
        counted().await >= 12.0
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let n = counted().await;
    assert!(
        (n - 12.0).abs() < f64::EPSILON,
        "{n} requests counted, 12 made"
    );
    assert!(
        collector
            .metric("strangler_collector_metric_points_duplicate_total")
            .await
            > 0,
        "the duplicate was recognised\n{}",
        collector.log()
    );
}

/// Requests `route_stats` counts for the route `orders` (-1 when the query fails).
async fn orders_counted(db: &clickhouse::Client) -> f64 {
    db.query("SELECT toFloat64(sum(requests)) FROM strangler.route_stats WHERE route = 'orders'")
        .fetch_one::<f64>()
        .await
        .unwrap_or(-1.0)
}
