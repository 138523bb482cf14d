//! Collector throughput: spans/s end to end (OTLP gRPC and HTTP into ClickHouse),
//! the collector's CPU seconds and peak memory, and beside it, in the same run,
//! `clickhouse-client` inserting the same rows from a Native-format file (the limit
//! the server sets) — on one ClickHouse server, then on a 2-shard × 2-replica
//! cluster (through distributed tables, `insert_distributed_sync` on both sides).
//! Run through `bench/collector.sh`; the last line is `name=value` pairs.

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
use strangler_testkit::{ClickHouse, ClickHouseCluster, free_port};

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
    // On a cluster the distributed table counts every shard.
    ch.query(&format!("SELECT count() FROM strangler.{table}"))
        .fetch_one::<u64>()
        .await
        .unwrap_or(0)
}

/// What one measurement found.
struct Figures {
    spans_per_cpu_s: f64,
    ratio: f64,
    ratio_same_schema: f64,
}

/// A child process killed when dropped.
struct KillOnDrop(std::process::Child);

impl KillOnDrop {
    fn stop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A second copy of the collector's whole schema, in database `db`.
async fn create_schema(client: &clickhouse::Client, db: &str, cluster: Option<&str>) {
    for statement in strangler_collector::store::clickhouse::schema_sql(db, cluster)
        .split(";\n\n")
        .map(str::trim)
        .filter(|s| !s.is_empty())
    {
        client
            .query(statement)
            .execute()
            .await
            .expect("reference schema");
    }
}

/// CPU seconds this process (the load generator) has used.
fn self_cpu_seconds() -> f64 {
    proc_cpu_seconds(std::process::id())
}

/// Inserts the Native file into `table` with clickhouse-client; the time it took.
fn native_insert(port: &str, file: &Path, table: &str) -> Duration {
    file_insert(port, file, table, "Native")
}

/// Inserts `file` (in `format`) into `table` with clickhouse-client; the time it took.
fn file_insert(port: &str, file: &Path, table: &str, format: &str) -> Duration {
    let input = std::fs::File::open(file).expect("file");
    let t0 = Instant::now();
    let status = Command::new("clickhouse-client")
        .args([
            "--port",
            port,
            "--insert_distributed_sync=1",
            "--query",
            &format!("INSERT INTO {table} FORMAT {format}"),
        ])
        .stdin(input)
        .status()
        .expect("clickhouse-client");
    assert!(status.success(), "raw insert into {table} failed");
    t0.elapsed()
}

/// Measures the collector and the reference on the server at `http_url` / `tcp_port`
/// (on a cluster: any one server, with `cluster` its name).
async fn measure(
    label: &str,
    http_url: &str,
    tcp_port: u16,
    cluster: Option<&str>,
    servers: &[u32],
) -> Figures {
    let servers_cpu = || {
        servers
            .iter()
            .map(|pid| proc_cpu_seconds(*pid))
            .sum::<f64>()
    };
    let client = clickhouse::Client::default()
        .with_url(http_url)
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
            "grpc_listen = \"127.0.0.1:{}\"\nhttp_listen = \"127.0.0.1:{}\"\nweb_listen = \"127.0.0.1:{}\"\nclickhouse_url = \"{http_url}\"\nqueue_capacity = 200000\ncompression = \"none\"\n{}{}",
            grpc.port(),
            http.port(),
            web.port(),
            cluster.map_or_else(String::new, |c| format!("cluster = \"{c}\"\n")),
            // Other collector settings to try (e.g. `batch_size = 50000`).
            std::env::var("STRANGLER_BENCH_COLLECTOR").unwrap_or_default()
        ),
    )
    .expect("config");
    let collector = Command::new(strangler_bin())
        .args(["collector", "run", "--config"])
        .arg(&config)
        .env("STRANGLER_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn collector");
    // Killed however this function ends (a failed assertion included): a collector
    // left running after its ClickHouse and spool directory are gone spins logging.
    let mut collector = KillOnDrop(collector);
    let pid = collector.0.id();
    let deadline = Instant::now() + Duration::from_secs(120);
    while client
        .query("SELECT count() FROM strangler.schema_migrations WHERE version = 20")
        .fetch_one::<u64>()
        .await
        .map_or(true, |n| n == 0)
    {
        assert!(Instant::now() < deadline, "collector never migrated");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("[{label}] encoding {REQUESTS} requests of {SPANS_PER_REQUEST} spans...");
    let bodies: Arc<Vec<Vec<u8>>> =
        Arc::new((0..REQUESTS).map(|n| request(n).encode_to_vec()).collect());
    let total = (REQUESTS * SPANS_PER_REQUEST) as u64;
    let cpu_before = proc_cpu_seconds(pid);
    let (load_before, servers_before) = (self_cpu_seconds(), servers_cpu());
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
    // Every export is acknowledged once its rows are stored (on a cluster: on one
    // replica of each shard they touch).
    let acked = started.elapsed();
    while count(&client, "spans").await < total {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let stored = started.elapsed();
    let cpu = proc_cpu_seconds(pid) - cpu_before;
    let (load_cpu, servers_cpu_used) = (
        self_cpu_seconds() - load_before,
        servers_cpu() - servers_before,
    );
    let rss = peak_rss_mib(pid);
    collector.stop();

    // The reference: the same rows from a Native file through clickhouse-client,
    // into a table like `spans` (on a cluster: replicated local tables and a
    // distributed table, inserted through synchronously, as the collector does).
    let file = dir.path().join("spans.native");
    let port = tcp_port.to_string();
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
    let ddl = match cluster {
        None => vec!["CREATE TABLE strangler.spans_ref AS strangler.spans".to_string()],
        Some(c) => vec![
            format!(
                "CREATE TABLE strangler.spans_ref_local ON CLUSTER {c} AS strangler.spans_local \
                 ENGINE = ReplicatedReplacingMergeTree('/clickhouse/tables/{{shard}}/strangler/spans_ref', '{{replica}}') \
                 PARTITION BY toDate(start_time) ORDER BY (route, backend, start_time, trace_id, span_id)"
            ),
            format!(
                "CREATE TABLE strangler.spans_ref ON CLUSTER {c} AS strangler.spans_ref_local \
                 ENGINE = Distributed({c}, strangler, spans_ref_local, cityHash64(trace_id))"
            ),
        ],
    };
    for sql in ddl {
        client.query(&sql).execute().await.expect("ref table");
    }
    let raw = native_insert(&port, &file, "strangler.spans_ref");
    // The insert returned once every shard stored its rows on one replica; a read
    // may go to a replica still fetching them.
    let deadline = Instant::now() + Duration::from_secs(60);
    while count(&client, "spans_ref").await < total {
        assert!(
            Instant::now() < deadline,
            "the reference rows never all arrived"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The same rows into a second copy of the collector's whole schema (spans with
    // the views it feeds): what ClickHouse itself takes for the collector's table.
    create_schema(&client, "strangler_ref", cluster).await;
    let same_schema = native_insert(&port, &file, "strangler_ref.spans");
    // And as RowBinary, the format the collector sends, in one insert.
    let rowbinary = dir.path().join("spans.rowbinary");
    let status = Command::new("clickhouse-client")
        .args([
            "--port",
            &port,
            "--query",
            "SELECT * FROM strangler.spans FORMAT RowBinary",
        ])
        .stdout(std::fs::File::create(&rowbinary).expect("file"))
        .status()
        .expect("clickhouse-client");
    assert!(status.success(), "export to RowBinary failed");
    create_schema(&client, "strangler_rb", cluster).await;
    // Over HTTP, as the collector sends: ClickHouse parses the rows itself.
    let http_insert = async |file: &Path, table: &str, format: &str| {
        let body = std::fs::read(file).expect("file");
        let before = servers_cpu();
        let t0 = Instant::now();
        let r = reqwest::Client::new()
            .post(format!(
                "{http_url}/?insert_distributed_sync=1&query=INSERT%20INTO%20{table}%20FORMAT%20{format}"
            ))
            .body(body)
            .send()
            .await
            .expect("http insert");
        assert!(r.status().is_success(), "{:?}", r.text().await);
        (t0.elapsed(), servers_cpu() - before)
    };
    let (rb, rb_cpu) = http_insert(&rowbinary, "strangler_rb.spans", "RowBinary").await;
    create_schema(&client, "strangler_nat", cluster).await;
    let (nat, nat_cpu) = http_insert(&file, "strangler_nat.spans", "Native").await;
    println!(
        "HTTP, one insert       RowBinary {:.2} s (ClickHouse CPU {rb_cpu:.2} s), Native {:.2} s (ClickHouse CPU {nat_cpu:.2} s), into the collector's schema",
        rb.as_secs_f64(),
        nat.as_secs_f64()
    );

    // On a cluster, stored also waits for replication to the replicas a read
    // happens to hit; acknowledged is when the rows were durable.
    let e2e = total as f64 / if cluster.is_some() { acked } else { stored }.as_secs_f64();
    let raw_rate = total as f64 / raw.as_secs_f64();
    let same_rate = total as f64 / same_schema.as_secs_f64();
    let per_cpu = total as f64 / cpu.max(0.01);
    println!(
        "[{label}] {total} spans ({REQUESTS} exports of {SPANS_PER_REQUEST}, {CONCURRENCY} concurrent, half gRPC half HTTP), ClickHouse 18.16 on the same machine\n"
    );
    println!(
        "collector end to end   {e2e:>10.0} spans/s   (all acknowledged after {:.2} s, all in ClickHouse after {:.2} s)",
        acked.as_secs_f64(),
        stored.as_secs_f64()
    );
    println!("collector CPU          {cpu:>10.2} s          {per_cpu:>10.0} spans per CPU-second");
    println!("collector peak RSS     {rss:>10.1} MiB");
    println!(
        "meanwhile              {servers_cpu_used:>10.2} CPU-s in ClickHouse, {load_cpu:.2} CPU-s in the load generator (this process)"
    );
    println!(
        "clickhouse-client      {raw_rate:>10.0} rows/s    (Native file into a copy of spans without its views, {:.2} s)",
        raw.as_secs_f64()
    );
    println!(
        "clickhouse-client      {same_rate:>10.0} rows/s    (Native file into the collector's schema: spans and its views, {:.2} s)",
        same_schema.as_secs_f64()
    );
    println!(
        "\nend to end / raw insert: {:.2}x (without views), {:.2}x (same schema)\n",
        e2e / raw_rate,
        e2e / same_rate
    );
    Figures {
        spans_per_cpu_s: per_cpu,
        ratio: e2e / raw_rate,
        ratio_same_schema: e2e / same_rate,
    }
}

#[tokio::main]
async fn main() {
    let one = {
        let ch = ClickHouse::start().await.expect("clickhouse");
        let pids: Vec<u32> = ch.pid().into_iter().collect();
        measure("one server", &ch.http_url(), ch.tcp_port(), None, &pids).await
    };
    let cluster = {
        let cluster = ClickHouseCluster::start(2, 2).await.expect("cluster");
        let first = cluster.server(0, 0);
        let pids: Vec<u32> = cluster
            .servers()
            .iter()
            .filter_map(ClickHouse::pid)
            .collect();
        measure(
            "2 shards x 2 replicas",
            &first.http_url(),
            first.tcp_port(),
            Some(ClickHouseCluster::NAME),
            &pids,
        )
        .await
    };
    println!(
        "spans_per_cpu_s={:.0} ratio_vs_clickhouse_client={:.2} ratio_vs_clickhouse_client_same_schema={:.2} cluster_spans_per_cpu_s={:.0} cluster_ratio_vs_clickhouse_client={:.2} cluster_ratio_vs_clickhouse_client_same_schema={:.2}",
        one.spans_per_cpu_s,
        one.ratio,
        one.ratio_same_schema,
        cluster.spans_per_cpu_s,
        cluster.ratio,
        cluster.ratio_same_schema
    );
}
