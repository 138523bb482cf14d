//! Collector throughput: spans/s end to end (OTLP gRPC and HTTP into ClickHouse),
//! the collector's CPU seconds and peak memory, and beside it, in the same run,
//! `clickhouse-client` inserting the same rows from a Native-format file (the limit
//! the server sets). Run through `bench/collector.sh`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};
use prost::Message;
use strangler_testkit::{ClickHouse, free_port};

const REQUESTS: usize = 400;
const SPANS_PER_REQUEST: usize = 1_000;
const CONCURRENCY: usize = 32;

fn kv(key: &str, value: &str) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(value.into())),
        }),
        ..Default::default()
    }
}

fn request(n: usize) -> ExportTraceServiceRequest {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let spans = (0..SPANS_PER_REQUEST)
        .map(|i| {
            let id = (n * SPANS_PER_REQUEST + i + 1) as u64;
            let backend = if id.is_multiple_of(3) {
                "new"
            } else {
                "legacy"
            };
            Span {
                trace_id: [id.to_be_bytes(), 7u64.to_be_bytes()].concat(),
                span_id: id.to_be_bytes().to_vec(),
                name: "GET /api/orders/{id}".into(),
                kind: 2,
                start_time_unix_nano: now - 1_000_000_000 + id,
                end_time_unix_nano: now - 1_000_000_000 + id + 1_000_000 + (id % 5_000) * 1_000,
                attributes: vec![
                    kv("http.request.method", "GET"),
                    kv("http.route", "/api/orders/{id}"),
                    kv("url.path", &format!("/api/orders/{}", id % 10_000)),
                    kv("server.address", "shop.example"),
                    kv("client.address", "10.1.2.3"),
                    kv("http.response.status_code", "200"),
                    kv("strangler.route", "orders"),
                    kv("strangler.backend", backend),
                    kv("strangler.decision", "flag"),
                    kv("strangler.flag", "strangler.orders"),
                    kv("strangler.upstream", "10.0.0.7:4000"),
                ],
                ..Default::default()
            }
        })
        .collect();
    ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(Resource {
                attributes: vec![kv("service.name", "strangler-router")],
                ..Default::default()
            }),
            scope_spans: vec![ScopeSpans {
                spans,
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
}

fn proc_cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let ticks: u64 = fields.get(11).and_then(|v| v.parse().ok()).unwrap_or(0)
        + fields.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
    ticks as f64 / 100.0
}

fn peak_rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

fn strangler_bin() -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    exe.parent()
        .and_then(Path::parent)
        .map(|d| d.join("strangler"))
        .unwrap_or_default()
}

async fn count(ch: &clickhouse::Client, table: &str) -> u64 {
    ch.query(&format!("SELECT count() FROM strangler.{table}"))
        .fetch_one::<u64>()
        .await
        .unwrap_or(0)
}

#[tokio::main]
async fn main() {
    let ch = ClickHouse::start().await.expect("clickhouse");
    let client = clickhouse::Client::default()
        .with_url(ch.http_url())
        .with_validation(false);
    let dir = tempfile::tempdir().expect("tempdir");
    let (grpc, http, web) = (
        free_port().expect("port"),
        free_port().expect("port"),
        free_port().expect("port"),
    );
    let config = dir.path().join("collector.toml");
    std::fs::write(
        &config,
        format!(
            "grpc_listen = \"127.0.0.1:{}\"\nhttp_listen = \"127.0.0.1:{}\"\nweb_listen = \"127.0.0.1:{}\"\nclickhouse_url = \"{}\"\nqueue_capacity = 200000\ncompression = \"none\"\n",
            grpc.port(), http.port(), web.port(), ch.http_url()
        ),
    )
    .expect("config");
    let mut collector = Command::new(strangler_bin())
        .args(["collector", "run", "--config"])
        .arg(&config)
        .env("STRANGLER_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn collector");
    let pid = collector.id();
    let deadline = Instant::now() + Duration::from_secs(30);
    while client
        .query("SELECT count() FROM strangler.schema_migrations WHERE version = 20")
        .fetch_one::<u64>()
        .await
        .is_err()
    {
        assert!(Instant::now() < deadline, "collector never migrated");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("encoding {REQUESTS} requests of {SPANS_PER_REQUEST} spans...");
    let bodies: Arc<Vec<Vec<u8>>> =
        Arc::new((0..REQUESTS).map(|n| request(n).encode_to_vec()).collect());
    let total = (REQUESTS * SPANS_PER_REQUEST) as u64;
    let cpu_before = proc_cpu_seconds(pid);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for worker in 0..CONCURRENCY {
        let bodies = Arc::clone(&bodies);
        let grpc_url = format!("http://127.0.0.1:{}", grpc.port());
        let http_url = format!("http://127.0.0.1:{}/v1/traces", http.port());
        tasks.push(tokio::spawn(async move {
            let mut grpc = TraceServiceClient::connect(grpc_url)
                .await
                .expect("grpc connect")
                .max_encoding_message_size(64 << 20);
            let http = reqwest::Client::new();
            let mut n = worker;
            while n < bodies.len() {
                // Half the workers speak gRPC, half HTTP; refused exports are retried.
                loop {
                    let ok = if worker % 2 == 0 {
                        let req =
                            ExportTraceServiceRequest::decode(&bodies[n][..]).expect("decode");
                        grpc.export(req).await.is_ok()
                    } else {
                        http.post(&http_url)
                            .header("content-type", "application/x-protobuf")
                            .body(bodies[n].clone())
                            .send()
                            .await
                            .is_ok_and(|r| r.status().is_success())
                    };
                    if ok {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                n += CONCURRENCY;
            }
        }));
    }
    for t in tasks {
        t.await.expect("worker");
    }
    let acked = started.elapsed();
    while count(&client, "spans").await < total {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let stored = started.elapsed();
    let cpu = proc_cpu_seconds(pid) - cpu_before;
    let rss = peak_rss_mib(pid);
    let _ = collector.kill();
    let _ = collector.wait();

    // The reference: the same rows from a Native file through clickhouse-client.
    let file = dir.path().join("spans.native");
    let port = ch.tcp_port().to_string();
    let out = std::fs::File::create(&file).expect("file");
    let status = Command::new("clickhouse-client")
        .args([
            "--port",
            &port,
            "--query",
            "SELECT * FROM strangler.spans FORMAT Native",
        ])
        .stdout(out)
        .status()
        .expect("clickhouse-client (apt-get install clickhouse-client)");
    assert!(status.success(), "export to Native failed");
    client
        .query("CREATE TABLE strangler.spans_ref AS strangler.spans")
        .execute()
        .await
        .expect("ref table");
    let input = std::fs::File::open(&file).expect("file");
    let t0 = Instant::now();
    let status = Command::new("clickhouse-client")
        .args([
            "--port",
            &port,
            "--query",
            "INSERT INTO strangler.spans_ref FORMAT Native",
        ])
        .stdin(input)
        .status()
        .expect("clickhouse-client");
    let raw = t0.elapsed();
    assert!(status.success(), "raw insert failed");
    assert_eq!(count(&client, "spans_ref").await, total);

    let e2e = total as f64 / stored.as_secs_f64();
    let raw_rate = total as f64 / raw.as_secs_f64();
    println!(
        "{total} spans ({REQUESTS} exports of {SPANS_PER_REQUEST}, {CONCURRENCY} concurrent, half gRPC half HTTP), ClickHouse 18.16 on the same machine\n"
    );
    println!(
        "collector end to end   {e2e:>10.0} spans/s   (all acknowledged after {:.2} s, all in ClickHouse after {:.2} s)",
        acked.as_secs_f64(),
        stored.as_secs_f64()
    );
    println!(
        "collector CPU          {cpu:>10.2} s          {:>10.0} spans per CPU-second",
        total as f64 / cpu.max(0.01)
    );
    println!("collector peak RSS     {rss:>10.1} MiB");
    println!(
        "clickhouse-client      {raw_rate:>10.0} rows/s    (Native file, {:.2} s)",
        raw.as_secs_f64()
    );
    println!("\nend to end / raw insert: {:.2}x", e2e / raw_rate);
}
