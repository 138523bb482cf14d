//! The collector on a replicated ClickHouse cluster (2 shards × 2 replicas, 18.16,
//! replicating through ZooKeeper, all started by the testkit): the schema `ON
//! CLUSTER`, the dashboards' known spans giving the same API numbers as on one
//! server, each trace on one shard, and a replica killed during a steady export.

mod support;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};
use serde_json::Value;
use strangler_testkit::{ClickHouse, ClickHouseCluster};
use support::known::{export, known, s};
use support::{Collector, ch_client};

const CLUSTER: &str = "cluster = \"strangler_cluster\"\n";

async fn get_json(url: &str) -> Value {
    let r = reqwest::get(url).await.expect("api");
    let status = r.status();
    let text = r.text().await.expect("body");
    assert!(status.is_success(), "{url}: {status} {text}");
    serde_json::from_str(&text).expect("json")
}

/// Equal JSON, numbers within a relative 1e-9 (sums of floats may add up in
/// another order on another shard layout).
fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => {
            let (x, y) = (
                x.as_f64().unwrap_or(f64::NAN),
                y.as_f64().unwrap_or(f64::NAN),
            );
            x == y || (x - y).abs() <= 1e-9 * x.abs().max(y.abs())
        }
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(p, q)| same(p, q))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| same(v, w)))
        }
        _ => a == b,
    }
}

async fn scalar(ch: &ClickHouse, sql: &str) -> u64 {
    ch_client(ch)
        .query(sql)
        .fetch_one::<u64>()
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
}

async fn trace_ids(ch: &ClickHouse) -> BTreeSet<String> {
    ch_client(ch)
        .query("SELECT DISTINCT trace_id FROM strangler.spans_local")
        .fetch_all::<String>()
        .await
        .expect("trace ids")
        .into_iter()
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_two_by_two_cluster_the_known_spans_give_one_servers_numbers_and_each_trace_one_shard()
{
    let (cluster, single) = tokio::join!(ClickHouseCluster::start(2, 2), ClickHouse::start());
    let (cluster, single) = (cluster.expect("cluster"), single.expect("clickhouse"));
    let on_cluster = Collector::start(&cluster.server(0, 0).http_url(), CLUSTER).await;
    let on_one = Collector::start(&single.http_url(), "").await;
    tokio::join!(on_cluster.wait_ready(), on_one.wait_ready());

    // The schema is on every server: replicated local tables, distributed tables.
    for server in cluster.servers() {
        let engines = ch_client(server)
            .query(
                "SELECT name, engine FROM system.tables WHERE database = 'strangler' ORDER BY name",
            )
            .fetch_all::<(String, String)>()
            .await
            .expect("tables");
        let engine = |name: &str| {
            engines
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, e)| e.clone())
                .unwrap_or_default()
        };
        assert_eq!(engine("spans"), "Distributed");
        assert_eq!(engine("spans_local"), "ReplicatedReplacingMergeTree");
        assert_eq!(engine("route_stats_local"), "ReplicatedSummingMergeTree");
        assert_eq!(engine("metric_points"), "Distributed");
        assert_eq!(engine("schema_migrations"), "ReplicatedMergeTree");
    }

    let known = known();
    let total = known.spans.len() as u64;
    let trace = known.mismatch_trace.clone();
    let (to_cluster, to_one) = (on_cluster.grpc_url(), on_one.grpc_url());
    tokio::join!(
        export(&to_cluster, known.spans.clone()),
        export(&to_one, known.spans)
    );
    // Acknowledged exports are on the shards (the insert waits for them); the
    // materialized views' parts commit with them.
    // Replication within a shard is asynchronous (an insert is acknowledged once one
    // replica of each shard has it); a read may go to either replica, so compare
    // once both hold the same.
    wait_replicas_equal(&cluster).await;
    assert_eq!(
        scalar(cluster.server(0, 0), "SELECT count() FROM strangler.spans").await,
        total
    );

    let now = strangler_collector::query::now_secs();
    let window = format!("from={}&to={now}", now - 3_600);
    let mut paths = vec![
        format!("/api/overview?{window}"),
        format!("/api/route?route=orders&{window}"),
        format!("/api/trace/{trace}"),
    ];
    for q in strangler_dashboards::query::QUERIES {
        paths.push(format!(
            "/api/query/{}?route=orders&trace_id={trace}&{window}",
            q.name
        ));
    }
    let mut differ = Vec::new();
    for path in &paths {
        let (one_url, cluster_url) = (on_one.web_url(path), on_cluster.web_url(path));
        let (a, b) = tokio::join!(get_json(&one_url), get_json(&cluster_url));
        if !same(&a, &b) {
            differ.push(format!("{path}\none server: {a}\ncluster:    {b}"));
        }
    }
    assert!(differ.is_empty(), "{}", differ.join("\n\n"));
    let overview = get_json(&on_cluster.web_url(&format!("/api/overview?{window}"))).await;
    assert!(overview.to_string().contains("orders"), "{overview}");

    // Each trace lives on one shard, and both shards hold some.
    let (first, second) = tokio::join!(
        trace_ids(cluster.server(0, 0)),
        trace_ids(cluster.server(1, 0))
    );
    assert!(
        !first.is_empty() && !second.is_empty(),
        "both shards hold traces"
    );
    assert!(
        first.is_disjoint(&second),
        "traces on both shards: {:?}",
        first.intersection(&second).take(5).collect::<Vec<_>>()
    );
    let all = scalar(&single, "SELECT uniqExact(trace_id) FROM strangler.spans").await;
    assert_eq!((first.len() + second.len()) as u64, all);
}

/// Waits until both replicas of each shard hold the same number of rows in every
/// local table the collector writes (directly or through its views).
async fn wait_replicas_equal(cluster: &ClickHouseCluster) {
    const TABLES: [&str; 5] = [
        "spans_local",
        "trace_index_local",
        "route_stats_local",
        "route_events_local",
        "metric_points_local",
    ];
    let deadline = Instant::now() + Duration::from_secs(60);
    for shard in 0..2 {
        for table in TABLES {
            let sql = format!("SELECT count() FROM strangler.{table}");
            loop {
                let (a, b) = tokio::join!(
                    scalar(cluster.server(shard, 0), &sql),
                    scalar(cluster.server(shard, 1), &sql)
                );
                if a == b {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "shard {shard} {table}: replicas hold {a} and {b} rows"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// A batch of `n` spans with ids from `first`, each its own trace.
fn batch(first: u64, n: u64) -> ExportTraceServiceRequest {
    let now = strangler_collector::query::now_secs() as u64 * 1_000_000_000;
    let spans = (first..first + n)
        .map(|id| Span {
            trace_id: [id.to_be_bytes(), 42u64.to_be_bytes()].concat(),
            span_id: (id + 1).to_be_bytes().to_vec(),
            name: "GET /api/orders".into(),
            kind: 2,
            start_time_unix_nano: now,
            end_time_unix_nano: now + 1_000_000,
            attributes: vec![
                s("strangler.route", "orders"),
                s(
                    "strangler.backend",
                    if id % 2 == 0 { "new" } else { "legacy" },
                ),
            ],
            ..Default::default()
        })
        .collect();
    ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(Resource {
                attributes: vec![s("service.name", "strangler-router")],
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

/// Whole-table fingerprint of a server's local spans: rows and a sum of hashes.
async fn fingerprint(ch: &ClickHouse) -> (u64, u64) {
    ch_client(ch)
        .query("SELECT count(), sum(cityHash64(span_id)) FROM strangler.spans_local FINAL")
        .fetch_one::<(u64, u64)>()
        .await
        .expect("fingerprint")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_during_a_steady_export_loses_and_doubles_no_acknowledged_span() {
    let mut cluster = ClickHouseCluster::start(2, 2).await.expect("cluster");
    let collector = Collector::start(
        &cluster.server(0, 0).http_url(),
        &format!("{CLUSTER}insert_timeout_ms = 3000\n"),
    )
    .await;
    collector.wait_ready().await;

    // An exporter at a steady pace, retrying a batch until it is acknowledged, as
    // the OpenTelemetry SDKs do.
    const BATCH: u64 = 200;
    let grpc = collector.grpc_url();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let exporter = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut client = TraceServiceClient::connect(grpc).await.expect("connect");
            let mut next = 0u64;
            let mut retries = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match client.export(batch(next, BATCH)).await {
                    Ok(_) => next += BATCH,
                    Err(_) => retries += 1,
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            (next, retries)
        })
    };
    tokio::time::sleep(Duration::from_secs(3)).await;
    cluster.server_mut(1, 1).kill();
    tokio::time::sleep(Duration::from_secs(4)).await;
    cluster
        .server_mut(1, 1)
        .restart()
        .await
        .expect("restart the replica");
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (acked, retries) = exporter.await.expect("exporter");
    assert!(
        acked >= 20 * BATCH,
        "the export kept going: {acked} acknowledged"
    );

    // Everything acknowledged is stored exactly once (FINAL folds a batch the spool
    // replayed after an insert that did land).
    let first = cluster.server(0, 0);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let stored = scalar(first, "SELECT count() FROM strangler.spans FINAL").await;
        if stored == acked {
            break;
        }
        assert!(
            stored < acked && Instant::now() < deadline,
            "{stored} stored for {acked} acknowledged ({retries} retried exports)\n{}",
            collector.log()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let distinct = scalar(first, "SELECT uniqExact(span_id) FROM strangler.spans").await;
    assert_eq!(distinct, acked, "no span lost");
    eprintln!(
        "acknowledged {acked} spans ({retries} exports retried); the collector wrote {}, spooled {}, replayed {}",
        collector
            .metric("strangler_collector_spans_written_total")
            .await,
        collector
            .metric("strangler_collector_spans_spooled_total")
            .await,
        collector
            .metric("strangler_collector_spans_replayed_total")
            .await,
    );

    // Both replicas of each shard hold the same rows once replication caught up.
    for shard in 0..2 {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let (a, b) = tokio::join!(
                fingerprint(cluster.server(shard, 0)),
                fingerprint(cluster.server(shard, 1))
            );
            if a == b && a.0 > 0 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "shard {shard}: replicas differ: {a:?} vs {b:?}"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}
