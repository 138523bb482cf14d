//! The dashboards against a real ClickHouse and collector filled with known spans:
//! the JSON API, the Grafana dashboard's SQL, `strangler compare`, route changes
//! announced by the real CLI against a real router, and the web page in headless
//! Chromium (playwright-core).

mod support;

use std::path::PathBuf;
use std::time::Duration;

use serde_json::Value;
use strangler_collector::query::now_secs;
use strangler_dashboards::query::{Params, expand};
use strangler_testkit::ClickHouse;
use support::known::{export, known};
use support::{Collector, Router, Upstream, ch_client, flags_doc, strangler_bin, wait_until};

async fn get_json(url: String) -> Value {
    let r = reqwest::get(&url).await.expect("api");
    let status = r.status();
    let doc: Value = r.json().await.expect("json");
    assert!(status.is_success(), "{url}: {status} {doc}");
    doc
}

fn cli(dir: &std::path::Path, args: &[&str]) -> std::process::Output {
    std::process::Command::new(strangler_bin())
        .args(args)
        .current_dir(dir)
        .env("STRANGLER_ADMIN_TOKEN", "test-admin-token")
        .env("STRANGLER_ACTOR", "dashboard-test")
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run strangler")
}

fn row<'a>(rows: &'a Value, key: &str, value: &str) -> &'a Value {
    rows.as_array()
        .and_then(|r| r.iter().find(|x| x[key] == value))
        .unwrap_or_else(|| panic!("no row with {key} = {value} in {rows}"))
}

fn close(got: &Value, want: f64) {
    let g = got.as_f64().unwrap_or(f64::NAN);
    assert!((g - want).abs() < 1e-6, "got {got}, want {want}");
}

fn playwright_core() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("STRANGLER_PLAYWRIGHT_CORE") {
        return Some(PathBuf::from(p));
    }
    let home = std::env::var_os("HOME")?;
    let p = PathBuf::from(home)
        .join(".cache/strangler/playwright-core-1.64.1/node_modules/playwright-core");
    p.exists().then_some(p)
}

#[tokio::test]
async fn the_dashboards_show_known_traffic_in_the_api_grafana_cli_and_a_real_browser() {
    let ch = ClickHouse::start().await.expect("clickhouse");
    let collector = Collector::start(&ch.http_url(), "").await;
    collector.wait_ready().await;
    let client = ch_client(&ch);

    // Route changes come from the real CLI, flipping a real router and announcing
    // each change to the collector.
    let (legacy, new) = (
        Upstream::start("legacy").await,
        Upstream::start("new").await,
    );
    let body = format!(
        "[flags]\nsource = \"file\"\nfile = \"flags.json\"\n\n[telemetry]\notlp_endpoint = \"{}\"\n\n[legacy]\nupstream = \"{}\"\n\n[[route]]\nname = \"orders\"\nmatch = {{ prefix = \"/api/orders\" }}\nnew = \"{}\"\n",
        collector.grpc_url(),
        legacy.addr,
        new.addr
    );
    let flags = flags_doc("strangler.orders", false, 0);
    let router = Router::start(&body, &[("flags.json", &flags)], &[]).await;
    let control = format!(
        "{body}\n[control]\nrouters = [\"{}\"]\ntimeout_ms = 2000\n",
        router.admin_url("")
    );
    let dir = router.dir.path();
    std::fs::write(dir.join("control.toml"), control).expect("write control config");
    for args in [
        &[
            "route",
            "shadow",
            "orders",
            "--yes",
            "--reason",
            "first look",
        ][..],
        &["route", "canary", "orders", "25", "--yes"][..],
    ] {
        let out = cli(dir, &[args, &["--config", "control.toml"]].concat());
        assert!(
            out.status.success() && out.stderr.is_empty(),
            "{args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    let known = known();
    let total = known.spans.len() as u64;
    export(&collector.grpc_url(), known.spans).await;
    wait_until(Duration::from_secs(30), "the known spans stored", || {
        let client = client.clone();
        async move {
            client
                .query("SELECT count() FROM strangler.spans WHERE name != 'strangler.route.change'")
                .fetch_one::<u64>()
                .await
                .is_ok_and(|n| n >= total)
        }
    })
    .await;

    // The overview API: the numbers the known traffic implies.
    let base = collector.web_url("");
    let api = |path: &str| get_json(format!("{base}{path}"));
    let overview = api("/api/overview?since=1h").await;
    let orders = row(&overview["overview_routes"], "route", "orders");
    assert_eq!(orders["legacy_requests"], 410, "{orders}");
    assert_eq!(orders["new_requests"], 100, "{orders}");
    assert_eq!(orders["new_fallbacks"], 10, "{orders}");
    close(&orders["new_share"], 100.0 / 510.0);
    close(&orders["legacy_error_rate"], 8.0 / 410.0);
    // The new side's 10 errors plus its 10 failures legacy answered, of 300 + 10.
    close(&orders["new_error_rate"], 20.0 / 310.0);
    close(&orders["match_rate"], 0.75);
    assert_eq!(orders["state"], "canary 25%", "{orders}");
    let p99 = orders["new_p99_ms"].as_f64().expect("new p99");
    assert!((29.0..31.5).contains(&p99), "new p99 {p99}");
    let catalog = row(&overview["overview_routes"], "route", "catalog");
    assert!(catalog["new_share"].as_f64() == Some(0.0), "{catalog}");
    assert!(
        catalog["match_rate"].is_null(),
        "no pairs → null, not NaN: {catalog}"
    );
    let burndown = overview["overview_burndown"].as_array().expect("burndown");
    let (legacy_n, all_n) = (610.0, 710.0);
    assert!(!burndown.is_empty());
    // Every bucket's share lies in [0, 1]; over the window, 600 of 700 on legacy.
    assert!(
        burndown
            .iter()
            .all(|p| (0.0..=1.0).contains(&p["legacy_share"].as_f64().unwrap_or(-1.0)))
    );
    let traffic: u64 = client
        .query("SELECT toUInt64(sum(requests)) FROM strangler.route_stats WHERE backend = 'legacy' AND shadow = 0")
        .fetch_one()
        .await
        .expect("traffic");
    assert_eq!(traffic as f64 / all_n, legacy_n / all_n);

    let route = api("/api/route?route=orders&since=1h").await;
    let changes = route["route_changes"].as_array().expect("changes");
    assert_eq!(changes.len(), 2, "{route}");
    assert_eq!(changes[0]["to_state"], "shadow");
    assert_eq!(changes[0]["reason"], "first look");
    assert_eq!(changes[1]["to_state"], "canary 25%");
    assert_eq!(changes[1]["text"], "shadow → canary 25%");
    let paths = &route["route_diff_paths"];
    assert_eq!(row(paths, "path", "/total")["mismatches"], 50);
    assert_eq!(row(paths, "path", "/currency")["mismatches"], 10);
    let sample = &route["route_mismatches"][0];
    assert_eq!(sample["primary_status"], 200);
    assert!(
        sample["primary_body"]
            .as_str()
            .is_some_and(|b| b.contains("\"12.30\""))
            && sample["shadow_body"]
                .as_str()
                .is_some_and(|b| b.contains("12.3}")),
        "{sample}"
    );
    let shadow = route["route_sides"]
        .as_array()
        .and_then(|s| s.iter().find(|x| x["backend"] == "new" && x["shadow"] == 1))
        .expect("shadow side");
    assert_eq!(shadow["requests"], 200);
    let trace = api(&format!("/api/trace/{}", known.mismatch_trace)).await;
    assert_eq!(trace["spans"].as_array().map(Vec::len), Some(2), "{trace}");
    let bad = reqwest::get(collector.web_url("/api/route?route=orders&since=2w"))
        .await
        .expect("bad window");
    assert_eq!(bad.status().as_u16(), 400);
    let unknown = reqwest::get(collector.web_url("/api/query/drop_table?since=1h"))
        .await
        .expect("unknown query");
    assert_eq!(unknown.status().as_u16(), 404);

    // Custom rollout gates run read-only: a write is refused and changes nothing.
    let http = reqwest::Client::new();
    let gate = |sql: &str| {
        http.post(collector.web_url("/api/gate"))
            .json(&serde_json::json!({"sql": sql, "route": "orders", "from": now_secs() - 3_600}))
            .send()
    };
    let r = gate("SELECT count() AS value FROM ${database}.spans WHERE route = '${route}' AND $__timeFilter(start_time)")
        .await
        .expect("gate");
    assert_eq!(r.status().as_u16(), 200);
    let doc: Value = r.json().await.expect("json");
    assert!(
        doc["rows"][0]["value"].as_u64() >= Some(total - 200),
        "{doc}"
    );
    for bad in [
        "DROP TABLE ${database}.spans",
        "INSERT INTO ${database}.route_events (route) VALUES ('x')",
        "SELECT $__bogus",
    ] {
        let r = gate(bad).await.expect("gate");
        assert_eq!(r.status().as_u16(), 400, "{bad}");
    }
    assert!(
        client
            .query("SELECT count() FROM strangler.spans")
            .fetch_one::<u64>()
            .await
            .is_ok_and(|n| n >= total),
        "the spans table is still there"
    );

    // The Grafana dashboard as committed: parses, and every SQL in it (panels,
    // variables, annotations) runs on this ClickHouse after macro substitution.
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../dashboards/grafana/strangler.json"
    ))
    .expect("read the Grafana dashboard");
    let dashboard: Value = serde_json::from_str(&text).expect("the Grafana JSON parses");
    let all = strangler_dashboards::grafana::all_sql(&dashboard);
    assert!(all.len() >= 13, "{} queries", all.len());
    let now = now_secs();
    let mut params = Params::window("strangler", now, 3_600, 120);
    params.route = Some("orders".into());
    params.trace_id = Some(known.mismatch_trace.clone());
    for (place, sql) in &all {
        let e = expand(sql, &params).unwrap_or_else(|err| panic!("{place}: {err}"));
        let mut q = client.query(&e.sql);
        for v in &e.binds {
            q = q.bind(v.as_str());
        }
        let rows = q
            .fetch_bytes("JSONEachRow")
            .expect("query")
            .collect()
            .await
            .unwrap_or_else(|err| panic!("{place} fails on ClickHouse: {err}\n{}", e.sql));
        assert!(!rows.is_empty(), "{place} returns no rows for known data");
    }

    // The CLI prints the route page's numbers.
    let out = cli(
        dir,
        &[
            "compare",
            "orders",
            "--since",
            "1h",
            "--collector",
            &base,
            "--output",
            "json",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: Value = serde_json::from_slice(&out.stdout).expect("compare json");
    assert_eq!(doc["route_sides"], route["route_sides"]);
    assert_eq!(doc["route_diff_paths"], route["route_diff_paths"]);
    let out = cli(
        dir,
        &["compare", "orders", "--since", "1h", "--collector", &base],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("200 compared, 150 match (75.0 %), 50 differ") && text.contains("/total"),
        "{text}"
    );
    assert!(text.contains("shadow → canary 25%"), "{text}");
    let out = cli(
        dir,
        &[
            "compare",
            "orders",
            "--since",
            "1h",
            "--collector",
            "http://127.0.0.1:9",
        ],
    );
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("is it running?"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The page in a real browser.
    let Some(playwright) = playwright_core() else {
        panic!("playwright-core is not installed: run scripts/install-deps.sh");
    };
    let shots = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("dashboard-screenshots");
    std::fs::create_dir_all(&shots).expect("screenshot dir");
    let out = tokio::process::Command::new("node")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../dashboards/browser/check.cjs"
        ))
        .env("PLAYWRIGHT_CORE", &playwright)
        .env("DASHBOARD_URL", &base)
        .env("SCREENSHOT_DIR", &shots)
        .env("ROUTE", "orders")
        .output();
    let out = tokio::time::timeout(Duration::from_secs(120), out)
        .await
        .expect("the browser run finishes")
        .expect("node runs");
    assert!(
        out.status.success(),
        "browser run failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let seen: Value = serde_json::from_slice(&out.stdout).expect("browser report");
    println!("screenshots in {}", shots.display());
    assert_eq!(seen["errors"], serde_json::json!([]), "{seen}");
    let cells = &seen["overview"]
        .as_array()
        .and_then(|r| r.iter().find(|x| x["route"] == "orders"))
        .expect("orders row")["cells"];
    assert_eq!(cells["state"], "canary 25%");
    assert!(
        cells["new_share"]
            .as_str()
            .is_some_and(|c| c.contains("410") && c.contains("100") && c.contains("20 %")),
        "{cells}"
    );
    assert_eq!(cells["legacy_error_rate"], "1.95 %");
    assert_eq!(cells["new_error_rate"], "6.45 %");
    assert_eq!(cells["match_rate"], "75.0 %");
    assert_eq!(cells["requests"], "510");
    assert!(
        seen["overview"]
            .as_array()
            .is_some_and(|r| r.len() == 2 && r.iter().all(|x| x["sparkline"] == true)),
        "{seen}"
    );
    assert!(seen["burndownPoints"].as_u64().is_some_and(|n| n > 0));
    assert_eq!(
        seen["sortedByRequests"],
        serde_json::json!(["orders", "catalog"])
    );
    // The shadow copy sits inside its request on the waterfall.
    let widths: Vec<f64> = seen["trace"]
        .as_array()
        .expect("trace rows")
        .iter()
        .filter_map(|r| r["width"].as_str()?.trim_end_matches('%').parse().ok())
        .collect();
    assert!(
        widths.len() == 2 && widths[0] > 99.0 && widths[1] > 10.0,
        "{widths:?}"
    );
    let chart = |id: &str| {
        seen["route"]["charts"]
            .as_array()
            .and_then(|c| c.iter().find(|x| x["id"] == id))
            .cloned()
            .unwrap_or_else(|| panic!("no chart {id}: {seen}"))
    };
    for id in ["c-traffic", "c-errors", "c-latency"] {
        let c = chart(id);
        assert!(
            c["points"]["legacy"].as_u64().is_some_and(|n| n > 0),
            "{id}: {c}"
        );
        assert!(
            c["points"]["new"].as_u64().is_some_and(|n| n > 0),
            "{id}: {c}"
        );
        let markers: Vec<&str> = c["markers"]
            .as_array()
            .expect("markers")
            .iter()
            .filter_map(Value::as_str)
            .collect();
        assert_eq!(markers, ["shadow", "canary 25%"], "{id}: {c}");
    }
    assert!(
        seen["route"]["matchRate"]
            .as_str()
            .is_some_and(|t| t.contains("75.0 %")),
        "{seen}"
    );
    assert!(
        seen["route"]["diffPaths"][0]
            .as_str()
            .is_some_and(|t| t.starts_with("/total")),
        "{seen}"
    );
    let pair = &seen["route"]["samples"][0];
    assert!(
        pair[0].as_str().is_some_and(|b| b.contains("\"12.30\""))
            && pair[1].as_str().is_some_and(|b| b.contains("12.3}")),
        "{seen}"
    );
    // The differing value is highlighted in both bodies, and listed legacy → new.
    let marked = &seen["route"]["marked"][0];
    assert_eq!(marked[0], serde_json::json!(["\"12.30\""]), "{seen}");
    assert_eq!(marked[1], serde_json::json!(["12.3"]), "{seen}");
    assert!(
        seen["route"]["differences"]
            .as_array()
            .is_some_and(|d| d.iter().any(|l| l == "/total: \"12.30\" → 12.3")),
        "{seen}"
    );
    // Which route next: legacy's traffic by endpoint template, with its route.
    assert!(
        seen["legacyEndpoints"]
            .as_array()
            .is_some_and(|rows| rows.iter().any(|r| r
                .as_str()
                .is_some_and(|r| r.starts_with("/api/orders/{id} | GET |")
                    && r.contains("orders (on legacy)")))),
        "{seen}"
    );
    assert_eq!(seen["route"]["changes"].as_array().map(Vec::len), Some(2));
    assert_eq!(seen["trace"].as_array().map(Vec::len), Some(2), "{seen}");
    assert!(
        seen["emptyRoute"]
            .as_str()
            .is_some_and(|t| t.contains("No traffic on this route"))
    );
    assert_eq!(seen["emptyCharts"], 3);
    let narrow = &seen["narrow"];
    assert!(
        narrow["scrollWidth"].as_u64() <= narrow["width"].as_u64(),
        "{narrow}"
    );
    for shot in ["overview.png", "route.png", "trace.png", "route-narrow.png"] {
        assert!(
            shots.join(shot).metadata().is_ok_and(|m| m.len() > 10_000),
            "{shot}"
        );
    }
    drop(router);

    // With a token, the page and its assets load but the data needs the token.
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("token"), "s3cret\n").expect("token");
    let secured = Collector::start_in(dir, &ch.http_url(), "web_token_file = \"token\"\n").await;
    let http = reqwest::Client::new();
    for (path, token, want) in [
        ("/", None, 200),
        ("/assets/app.js", None, 200),
        ("/health", None, 200),
        ("/api/overview?since=1h", None, 401),
        ("/metrics", None, 401),
        ("/api/overview?since=1h", Some("wrong"), 401),
        ("/api/overview?since=1h", Some("s3cret"), 200),
    ] {
        let mut r = http.get(secured.web_url(path));
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        let status = r.send().await.expect("request").status().as_u16();
        assert_eq!(status, want, "{path} with {token:?}");
    }
}
