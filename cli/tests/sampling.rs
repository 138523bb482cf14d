//! Sampling changes no number: the same paced traffic through a router tracing every
//! request and one at the default sampling (0.01) gives the same counts, error
//! rates, p99 (within the histogram's bound) and rollout verdicts, because every
//! view counts from the router's aggregates. A file of its own: it runs two
//! collectors, two routers, ClickHouse and Unleash, which would crowd the other
//! rollout tests on a small machine.

mod support;

use std::path::PathBuf;
use std::process::Output;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use strangler_testkit::{ClickHouse, Unleash, unleash};
use support::{Collector, Handler, Reply, Router, Upstream, strangler_bin};

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Both sides sleep 40 ms on every 20th request (the p99 lies among those) and 1 ms
/// otherwise; the new side fails every 10th request it serves. Which request is
/// which comes from its path (`/api/orders/N`), so two routers given the same
/// requests see the same answers.
fn paced_handler(new: bool) -> Handler {
    Arc::new(move |parts| {
        let n: u64 = parts
            .uri
            .path()
            .rsplit('/')
            .next()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let shadow = parts.headers.contains_key("x-strangler-shadow");
        Reply {
            status: if new && !shadow && n % 10 == 3 {
                500
            } else {
                200
            },
            content_type: "application/json",
            body: format!("{{\"n\":{n}}}"),
            delay: Duration::from_millis(if n % 20 == 7 { 40 } else { 1 }),
        }
    })
}

/// The report lines a verdict rests on: per side, requests and errors (not the
/// p99's decimals or the seconds in the window), each gate's outcome, the decision.
fn verdict_lines(report: &str) -> Vec<String> {
    report
        .lines()
        .filter_map(|l| {
            let t = l.trim_start();
            if t.starts_with("legacy ") || t.starts_with("new ") {
                Some(t.split(", p99").next().unwrap_or(t).to_string())
            } else if t.starts_with('→') {
                Some(t.to_string())
            } else if l.starts_with("  ") && !t.is_empty() && !t.starts_with('[') {
                // A gate: name and outcome, not the numbers behind it.
                Some(t.split_whitespace().take(2).collect::<Vec<_>>().join(" "))
            } else {
                None
            }
        })
        .collect()
}

#[tokio::test]
async fn counts_error_rates_p99_and_rollout_verdicts_are_the_same_at_sample_ratio_1_and_0_01() {
    let (ch, unleash) = tokio::join!(ClickHouse::start(), Unleash::start());
    let (ch, unleash) = (ch.expect("clickhouse"), unleash.expect("unleash"));
    // One collector per router, each in its own database.
    let full = Collector::start(&ch.http_url(), "database = \"full\"\n").await;
    let sampled = Collector::start(&ch.http_url(), "database = \"sampled\"\n").await;
    full.wait_ready().await;
    sampled.wait_ready().await;
    let (legacy, _) = Upstream::start_with(paced_handler(false)).await;
    let (new, _) = Upstream::start_with(paced_handler(true)).await;
    let plan = "[route.rollout]\nsteps = [\"25%\", \"100%\"]\nmin_step_s = 1\nmin_requests = 50\ninterval_s = 1\nsettle_ms = 500\nmax_step_s = 15\nmax_error_rate_increase = 0.02\nmax_p99_ratio = 3\np99_slack_ms = 50\nmin_match_rate = 0.95\n";
    let body = |collector: &Collector, sampling: &str| {
        format!(
            "[flags]\nsource = \"unleash\"\nurl = \"{}\"\npoll_interval_ms = 200\n\n[telemetry]\notlp_endpoint = \"{grpc}\"\nmetrics_endpoint = \"{grpc}\"\nmetrics_interval_ms = 200\n{sampling}\n\n[legacy]\nupstream = \"{}\"\n\n[[route]]\nname = \"orders\"\nmatch = {{ prefix = \"/api/orders\" }}\nsticky = \"header:x-user-id\"\nnew = \"{}\"\n{plan}",
            unleash.api_url(),
            legacy.addr,
            new.addr,
            grpc = collector.grpc_url(),
        )
    };
    let env = [("UNLEASH_CLIENT_TOKEN", unleash::CLIENT_TOKEN)];
    // Every span at 1.0; the default (0.01, as metrics are exported) on the other.
    let router_full = Router::start(&body(&full, "sample_ratio = 1.0"), &[], &env).await;
    let router_sampled = Router::start(&body(&sampled, ""), &[], &env).await;
    // Two control configs over both routers, one per collector, sharing one history.
    let dir = tempfile::tempdir().expect("tempdir");
    let control = |name: &str, collector: &Collector| {
        let path = dir.path().join(name);
        std::fs::write(
            &path,
            format!(
                "{}\n[control]\nrouters = [\"{}\", \"{}\"]\ntimeout_ms = 3000\ncollector_url = \"{}\"\n",
                body(collector, ""),
                router_full.admin_url(""),
                router_sampled.admin_url(""),
                collector.web_url("")
            ),
        )
        .expect("write control config");
        path
    };
    let (control_full, control_sampled) = (
        control("full.toml", &full),
        control("sampled.toml", &sampled),
    );
    let cli = |config: &PathBuf, args: &[&str]| {
        std::process::Command::new(strangler_bin())
            .args(args)
            .arg("--config")
            .arg(config)
            .env("STRANGLER_ADMIN_TOKEN", &router_full.token)
            .env("UNLEASH_ADMIN_TOKEN", unleash::ADMIN_TOKEN)
            .env("STRANGLER_ACTOR", "sampling-test")
            .output()
            .expect("run strangler")
    };
    let out = cli(&control_full, &["route", "canary", "orders", "25", "--yes"]);
    assert!(out.status.success(), "{}", text(&out));
    // Both routers take the new percentage (Unleash polled every 200 ms), and the
    // flip lies in an export interval of its own, before the traffic.
    tokio::time::sleep(Duration::from_millis(1_500)).await;

    // The same paced requests through both routers: request N as user uN to each.
    const REQUESTS: u64 = 800;
    let workers: Vec<_> = (0..4u64)
        .map(|w| {
            let (a, b) = (router_full.url(""), router_sampled.url(""));
            tokio::spawn(async move {
                let client = reqwest::Client::new();
                let mut tick = tokio::time::interval(Duration::from_millis(20));
                let mut statuses = Vec::new();
                for n in (w..REQUESTS).step_by(4) {
                    tick.tick().await;
                    let get = |base: &str| {
                        client
                            .get(format!("{base}/api/orders/{n}"))
                            .header("x-user-id", format!("u{n}"))
                            .send()
                    };
                    let (ra, rb) = tokio::join!(get(&a), get(&b));
                    statuses.push((
                        ra.map(|r| r.status().as_u16()).unwrap_or(0),
                        rb.map(|r| r.status().as_u16()).unwrap_or(0),
                    ));
                }
                statuses
            })
        })
        .collect();
    let mut statuses = Vec::new();
    for w in workers {
        statuses.extend(w.await.expect("worker"));
    }
    assert_eq!(statuses.len() as u64, REQUESTS);
    assert!(
        statuses.iter().all(|(a, b)| a == b),
        "the two routers answered alike"
    );

    // Wait until both collectors count every request (the last export is 200 ms away).
    let client = reqwest::Client::new();
    let sides = |collector: &Collector| {
        let (client, url) = (
            client.clone(),
            collector.web_url("/api/route?route=orders&since=1h"),
        );
        async move {
            let doc: Value = client
                .get(url)
                .send()
                .await
                .expect("api")
                .json()
                .await
                .expect("json");
            doc["route_sides"].as_array().cloned().unwrap_or_default()
        }
    };
    let served = |rows: &[Value]| -> u64 {
        rows.iter()
            .filter(|r| r["shadow"] == 0)
            .map(|r| r["requests"].as_u64().unwrap_or(0))
            .sum()
    };
    support::wait_until(
        Duration::from_secs(20),
        "both collectors count every request",
        || async {
            served(&sides(&full).await) == REQUESTS && served(&sides(&sampled).await) == REQUESTS
        },
    )
    .await;
    let (a, b) = (sides(&full).await, sides(&sampled).await);
    assert_eq!(a.len(), b.len(), "{a:?}\n{b:?}");
    for (x, y) in a.iter().zip(&b) {
        for column in ["backend", "shadow", "requests", "errors"] {
            assert_eq!(x[column], y[column], "{column}: {x} vs {y}");
        }
        let (pa, pb) = (
            x["p99_ms"].as_f64().expect("p99"),
            y["p99_ms"].as_f64().expect("p99"),
        );
        // Two routers timing their own requests to the same upstream: both land in
        // the cluster of 40 ms answers, give or take this machine's scheduling (the
        // exact bound is checked below, at 1.0, against every span).
        assert!((pa - pb).abs() <= 0.25 * pa, "p99 {pa} vs {pb} ms");
    }
    // The overview agrees too (error rates, fallbacks, shares).
    let overview = |collector: &Collector| {
        let (client, url) = (client.clone(), collector.web_url("/api/overview?since=1h"));
        async move {
            let doc: Value = client
                .get(url)
                .send()
                .await
                .expect("api")
                .json()
                .await
                .expect("json");
            doc["overview_routes"][0].clone()
        }
    };
    let (oa, ob) = (overview(&full).await, overview(&sampled).await);
    for column in [
        "legacy_requests",
        "new_requests",
        "legacy_error_rate",
        "new_error_rate",
        "new_fallbacks",
        "new_share",
    ] {
        assert_eq!(oa[column], ob[column], "{column}: {oa} vs {ob}");
    }
    // The new side's 500s were retried on legacy (GETs): fallbacks, in its error rate.
    let fallbacks = oa["new_fallbacks"].as_u64().unwrap_or(0);
    assert!(fallbacks > 0, "{oa}");
    assert!(oa["new_error_rate"].as_f64() > Some(0.05), "{oa}");

    // At 1.0 every request has a span, so the exact p99 is known: the aggregates'
    // p99 lies within one bucket (2^(1/32), 2.2 %) of it, plus the microsecond the
    // router rounds to: half a bucket from reading a bucket at its middle, and the
    // rest from the two quantile functions picking neighbouring ranks, which can
    // sit in neighbouring buckets (one run measured 1.21 %).
    let db = support::ch_client(&ch);
    for x in &a {
        let backend = x["backend"].as_str().unwrap_or("");
        let exact: f64 = db
            .query("SELECT quantileExact(0.99)(duration_ns) / 1e6 FROM full.spans WHERE route = 'orders' AND backend = ? AND shadow = ?")
            .bind(backend)
            .bind(x["shadow"].as_u64().unwrap_or(0))
            .fetch_one()
            .await
            .expect("exact p99");
        let p99 = x["p99_ms"].as_f64().unwrap_or(0.0);
        assert!(
            (p99 - exact).abs() <= 0.022 * exact + 0.002,
            "{backend}: aggregates' p99 {p99} ms vs exact {exact} ms"
        );
    }
    // The sampled router stored a fraction of the spans (every fallback among
    // them), and still counted everything.
    let stored = |database: &'static str| {
        let db = db.clone();
        async move {
            db.query(&format!(
                "SELECT count() FROM {database}.spans WHERE route = 'orders' AND shadow = 0"
            ))
            .fetch_one::<u64>()
            .await
            .expect("spans")
        }
    };
    let (all_spans, sample) = (stored("full").await, stored("sampled").await);
    assert_eq!(all_spans, REQUESTS);
    assert!(
        sample >= fallbacks && sample < REQUESTS / 4,
        "{sample} spans of {REQUESTS} stored at 0.01 ({fallbacks} fallbacks)"
    );

    // The rollout controller reaches the same verdict from either collector.
    let report = |config: &PathBuf| {
        let out = cli(config, &["route", "rollout", "orders", "--dry-run"]);
        text(&out)
    };
    let (ra, rb) = (report(&control_full), report(&control_sampled));
    let (va, vb) = (verdict_lines(&ra), verdict_lines(&rb));
    assert!(va.iter().any(|l| l.starts_with('→')), "{ra}");
    assert_eq!(va, vb, "\n1.0:\n{ra}\n0.01:\n{rb}");
    println!("1.0:\n{ra}\n0.01:\n{rb}");
}
