//! The collector's whole schema (`strangler collector schema`) and every named
//! dashboard query (`dashboards/sql/`, expanded by the collector's own expander)
//! on current ClickHouse — chdb-core 26.9, the ClickHouse engine in process,
//! installed by `scripts/install-deps.sh` into a cached virtual environment — give
//! the same results as on Debian's ClickHouse 18.16 over the same rows.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use serde::Serialize;
use serde_json::Value;
use strangler_collector::metric_model::MetricRow;
use strangler_collector::model::SpanRow;
use strangler_collector::store::clickhouse::{ROUTE_CHANGE_SPAN, schema_sql};
use strangler_dashboards::query::{Params, QUERIES, expand};
use strangler_testkit::ClickHouse;

/// The chdb version the test runs (and install-deps installs).
const CHDB_VERSION: &str = "26.9.0";
/// A fixed second (2026-05-28) the data set starts at.
const T0: u32 = 1_780_000_020;

fn chdb_python() -> PathBuf {
    if let Ok(p) = std::env::var("STRANGLER_CHDB_PYTHON") {
        return PathBuf::from(p);
    }
    let cache = std::env::var("STRANGLER_CACHE").map_or_else(
        |_| PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/strangler"),
        PathBuf::from,
    );
    cache.join(format!("chdb-core-{CHDB_VERSION}/bin/python"))
}

/// A value as a ClickHouse literal.
fn literal(v: &Value) -> String {
    match v {
        Value::String(s) => format!("'{}'", s.replace('\\', "\\\\").replace('\'', "\\'")),
        Value::Array(items) => format!(
            "[{}]",
            items.iter().map(literal).collect::<Vec<_>>().join(", ")
        ),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => u8::from(*b).to_string(),
        Value::Null => "NULL".into(),
        Value::Object(_) => panic!("no object columns"),
    }
}

/// `INSERT INTO strangler.{table} (columns) VALUES (...), ...` for `rows`.
fn insert_sql<T: Serialize>(table: &str, rows: &[T]) -> String {
    let objects: Vec<serde_json::Map<String, Value>> = rows
        .iter()
        .map(|r| match serde_json::to_value(r).expect("row") {
            Value::Object(m) => m,
            other => panic!("not a row: {other}"),
        })
        .collect();
    let columns: Vec<String> = objects[0].keys().cloned().collect();
    let values: Vec<String> = objects
        .iter()
        .map(|m| {
            format!(
                "({})",
                columns
                    .iter()
                    .map(|c| literal(&m[c]))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })
        .collect();
    format!(
        "INSERT INTO strangler.{table} ({}) VALUES {}",
        columns.join(", "),
        values.join(", ")
    )
}

#[allow(clippy::too_many_arguments)]
fn span(
    i: u32,
    route: &str,
    backend: &str,
    path: &str,
    status: u16,
    decision: &str,
    shadow: u8,
    diff: &str,
) -> SpanRow {
    let start_ns = u64::from(T0 + i * 5) * 1_000_000_000 + u64::from(i) * 1_000;
    let duration_ns = 1_000_000 + u64::from(i) * 37_000 + u64::from(shadow) * 500_000;
    let mut attr_keys = vec!["http.request.method".to_string(), "url.path".to_string()];
    let mut attr_values = vec!["GET".to_string(), path.to_string()];
    if !route.is_empty() {
        attr_keys.push("strangler.route".into());
        attr_values.push(route.into());
    }
    SpanRow {
        start_time: T0 + i * 5,
        start_time_ns: start_ns,
        end_time_ns: start_ns + duration_ns,
        duration_ns,
        trace_id: format!("{:032x}", i + 1),
        span_id: format!("{:016x}", u64::from(i) * 2 + 1 + u64::from(shadow)),
        parent_span_id: String::new(),
        name: format!("GET {path}"),
        kind: "server".into(),
        status_code: if status >= 500 { "error" } else { "unset" }.into(),
        status_message: String::new(),
        service: "strangler-router".into(),
        route: route.into(),
        backend: backend.into(),
        decision: decision.into(),
        diff: diff.into(),
        diff_paths: if diff == "mismatch" { "$.total" } else { "" }.into(),
        pair_id: if diff.is_empty() {
            String::new()
        } else {
            format!("pair-{i}")
        },
        shadow,
        http_method: "GET".into(),
        http_status: status,
        resource_keys: vec!["service.name".into()],
        resource_values: vec!["strangler-router".into()],
        attr_keys,
        attr_values,
        scope_name: "strangler".into(),
        events_json: "[]".into(),
        links_json: "[]".into(),
    }
}

/// Spans of two routes on both sides with errors, fallbacks and shadow pairs (match
/// and mismatch), legacy traffic no route matched, a child span, and two route
/// changes; metric points of a third route sent as the router's aggregates.
fn data_set() -> (Vec<SpanRow>, Vec<MetricRow>) {
    let mut spans = Vec::new();
    for i in 0..120 {
        let backend = if i % 3 == 0 { "new" } else { "legacy" };
        let status = if i % 17 == 0 { 502 } else { 200 };
        let decision = if i % 29 == 0 { "fallback" } else { "flag" };
        spans.push(span(
            i,
            "orders",
            backend,
            &format!("/api/orders/{i}"),
            status,
            decision,
            0,
            "",
        ));
        if i % 10 == 0 {
            let diff = if i % 20 == 0 { "match" } else { "mismatch" };
            let mut copy = span(
                i,
                "orders",
                "new",
                &format!("/api/orders/{i}"),
                200,
                "shadow",
                1,
                diff,
            );
            copy.kind = "client".into();
            spans.push(copy);
        }
    }
    for i in 120..160 {
        spans.push(span(
            i,
            "users",
            "legacy",
            &format!("/api/users/{i}"),
            if i % 13 == 0 { 503 } else { 200 },
            "flag",
            0,
            "",
        ));
    }
    let paths = [
        "/api/products/123",
        "/api/products/9f8e7d6c5b4a39281706f5e4d3c2b1a0",
        "/api/products/8d1c2b3a-1234-4abc-9def-0123456789ab/reviews",
        "/health",
        "/api/cart/77/items/3",
    ];
    for i in 160..220 {
        let path = paths[(i as usize) % paths.len()];
        spans.push(span(
            i,
            "",
            "legacy",
            path,
            if i % 11 == 0 { 500 } else { 200 },
            "",
            0,
            "",
        ));
    }
    // A child of trace 1 (the waterfall's second row).
    let mut child = span(0, "", "", "/api/orders/0", 200, "", 0, "");
    child.span_id = "00000000000000ff".into();
    child.parent_span_id = spans[0].span_id.clone();
    child.kind = "client".into();
    child.name = "upstream".into();
    child.attr_keys.clear();
    child.attr_values.clear();
    spans.push(child);
    for (n, (from, to, action)) in [
        ("legacy", "shadow", "shadow"),
        ("shadow", "canary 25%", "canary"),
    ]
    .into_iter()
    .enumerate()
    {
        let mut change = span(300 + n as u32, "", "", "", 0, "", 0, "");
        change.name = ROUTE_CHANGE_SPAN.into();
        change.kind = "internal".into();
        change.attr_keys = [
            "strangler.change.route",
            "strangler.change.from",
            "strangler.change.to",
            "strangler.change.action",
            "strangler.change.actor",
            "strangler.change.reason",
        ]
        .map(String::from)
        .to_vec();
        change.attr_values = ["orders", from, to, action, "alice", "test"]
            .map(String::from)
            .to_vec();
        change.start_time = T0 + 30 + n as u32 * 60;
        change.start_time_ns = u64::from(change.start_time) * 1_000_000_000;
        spans.push(change);
    }
    let point = |minute: u32, name: &str, kind: &str, value: f64| MetricRow {
        time: T0 + minute * 60,
        time_ns: u64::from(T0 + minute * 60) * 1_000_000_000,
        start_ns: u64::from(T0 + minute * 60 - 60) * 1_000_000_000,
        service: "strangler-router".into(),
        instance: "router-1".into(),
        name: name.into(),
        unit: String::new(),
        kind: kind.into(),
        temporality: "delta".into(),
        attr_keys: ["strangler.route", "strangler.backend", "strangler.role"]
            .map(String::from)
            .to_vec(),
        attr_values: [
            "payments",
            if minute.is_multiple_of(2) {
                "new"
            } else {
                "legacy"
            },
            "primary",
        ]
        .map(String::from)
        .to_vec(),
        value,
        ..MetricRow::default()
    };
    let mut points = Vec::new();
    for minute in 1..6 {
        points.push(point(
            minute,
            "strangler.requests",
            "sum",
            50.0 + f64::from(minute),
        ));
        points.push(point(
            minute,
            "strangler.errors",
            "sum",
            f64::from(minute % 3),
        ));
        points.push(MetricRow {
            count: 35,
            scale: 5,
            bucket_offset: 300 + minute as i32,
            bucket_counts: vec![5, 10, 20],
            ..point(
                minute,
                "strangler.request.duration",
                "exponential_histogram",
                0.0,
            )
        });
    }
    (spans, points)
}

/// `?` placeholders replaced by their values as string literals (what the
/// `clickhouse` crate's `bind` does), `??` by `?`.
fn inline(sql: &str, binds: &[String]) -> String {
    let mut out = String::new();
    let mut binds = binds.iter();
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '?' {
            out.push(c);
        } else if chars.peek() == Some(&'?') {
            chars.next();
            out.push('?');
        } else {
            out.push_str(&literal(&Value::String(
                binds.next().expect("a value for each ?").clone(),
            )));
        }
    }
    out
}

/// The statements of `strangler collector schema`, one by one.
fn schema_statements() -> Vec<String> {
    schema_sql("strangler", None)
        .split(";\n\n")
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

async fn on_18(client: &reqwest::Client, url: &str, sql: &str) -> Result<String, String> {
    let response = client
        .post(url)
        .body(sql.to_string())
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let ok = response.status().is_success();
    let text = response.text().await.map_err(|e| e.to_string())?;
    if ok { Ok(text) } else { Err(text) }
}

/// Rows of TSV output, sorted (ties under a query's ORDER BY may come either way).
fn rows(tsv: &str) -> Vec<Vec<String>> {
    let mut rows: Vec<Vec<String>> = tsv
        .lines()
        .map(|l| l.split('\t').map(str::to_string).collect())
        .collect();
    rows.sort();
    rows
}

/// Cells equal as text, or as numbers within a relative 1e-9 (float printing).
fn same_cell(a: &str, b: &str) -> bool {
    a == b
        || matches!((a.parse::<f64>(), b.parse::<f64>()), (Ok(x), Ok(y))
            if (x - y).abs() <= 1e-9 * x.abs().max(y.abs()).max(1.0))
}

#[tokio::test]
async fn the_schema_and_every_named_query_give_the_same_results_on_current_clickhouse() {
    let python = chdb_python();
    assert!(
        python.exists(),
        "{} is missing: run ./scripts/install-deps.sh (it installs chdb-core {CHDB_VERSION} into a cached virtual environment)",
        python.display()
    );
    let ch = ClickHouse::start().await.expect("clickhouse");
    let url = ch.http_url();
    let http = reqwest::Client::new();

    let (spans, points) = data_set();
    let mut statements = schema_statements();
    statements.push(insert_sql("spans", &spans));
    statements.push(insert_sql("metric_points", &points));
    for sql in &statements {
        if let Err(e) = on_18(&http, &url, sql).await {
            panic!("18.16 refused:\n{sql}\n{e}");
        }
    }

    let params = Params {
        database: "strangler".into(),
        from: T0 - 60,
        to: T0 + 900,
        interval_s: 60,
        route: Some("orders".into()),
        trace_id: Some(spans[0].trace_id.clone()),
    };
    let queries: Vec<(String, String)> = QUERIES
        .iter()
        .map(|q| {
            let e = expand(q.sql, &params).expect("expands");
            (q.name.to_string(), inline(&e.sql, &e.binds))
        })
        .collect();
    let mut old = Vec::new();
    for (name, sql) in &queries {
        let tsv = on_18(&http, &url, &format!("{sql}\nFORMAT TabSeparated"))
            .await
            .unwrap_or_else(|e| panic!("{name} on 18.16: {e}"));
        assert!(
            !tsv.trim().is_empty(),
            "{name}: no rows on 18.16 (the data set must exercise every query)"
        );
        old.push(tsv);
    }

    let job = serde_json::json!({ "statements": statements, "queries": queries });
    let mut child = Command::new(&python)
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/chdb_run.py"))
        .env("TZ", "UTC")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run chdb");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(job.to_string().as_bytes())
        .expect("job");
    let out = child.wait_with_output().expect("chdb");
    assert!(
        out.status.success(),
        "chdb: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let answer: Value = serde_json::from_slice(&out.stdout).expect("chdb's json");
    let version = answer["version"].as_str().unwrap_or("");
    assert!(
        version.starts_with("26.9"),
        "chdb runs ClickHouse {version}"
    );

    let mut problems = Vec::new();
    for (sql, error) in statements
        .iter()
        .zip(answer["statements"].as_array().expect("list"))
    {
        if let Some(e) = error.as_str() {
            problems.push(format!("{version} refused the statement:\n{sql}\n{e}"));
        }
    }
    for ((name, _), old) in queries.iter().zip(&old) {
        let result = &answer["results"][name];
        let Some(new) = result["tsv"].as_str() else {
            problems.push(format!("{name}: {version} refused it: {}", result["error"]));
            continue;
        };
        let (a, b) = (rows(old), rows(new));
        let same = a.len() == b.len()
            && a.iter()
                .zip(&b)
                .all(|(x, y)| x.len() == y.len() && x.iter().zip(y).all(|(p, q)| same_cell(p, q)));
        if !same {
            problems.push(format!(
                "{name}: results differ\n18.16:\n{old}\n{version}:\n{new}"
            ));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n\n"));
}
