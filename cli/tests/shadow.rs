//! Shadow copies and old-vs-new comparison through the real router.

mod support;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{Value, json};
use support::*;

fn order(id: &str, total_key: &str, extra: Value) -> String {
    let mut doc = json!({"id": id, "status": "paid", "items": [{"sku": "A", "qty": 2}]});
    doc[total_key] = json!(1250);
    if let Value::Object(extra) = extra {
        for (k, v) in extra {
            doc[k] = v;
        }
    }
    doc.to_string()
}

fn id_of(parts: &hyper::http::request::Parts) -> String {
    parts
        .uri
        .path()
        .rsplit('/')
        .next()
        .unwrap_or("")
        .to_string()
}

fn json_reply(body: String, delay: Duration) -> Reply {
    Reply {
        status: 200,
        content_type: "application/json",
        body,
        delay,
    }
}

/// A route shadowed at 100 % through config, plus whatever the test adds.
fn config(legacy: std::net::SocketAddr, new: std::net::SocketAddr, shadow: &str) -> String {
    format!(
        "[legacy]\nupstream = \"{legacy}\"\n\n[[route]]\nname = \"orders\"\nmatch = {{ prefix = \"/api/orders\" }}\nnew = \"{new}\"\n\n[route.shadow]\npercent = 100\n{shadow}"
    )
}

async fn shadow_doc(router: &Router) -> Value {
    router
        .admin(Method::GET, "/routes/orders/shadow", None)
        .await
        .1
}

async fn wait_compared(router: &Router, n: u64) -> Value {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let doc = shadow_doc(router).await;
        let seen = doc["compared"].as_u64().unwrap_or(0)
            + doc["shadow_errors"].as_u64().unwrap_or(0)
            + doc["skipped"].as_u64().unwrap_or(0);
        if seen >= n {
            return doc;
        }
        assert!(
            Instant::now() < deadline,
            "only {seen} of {n} pairs done: {doc}\n{}",
            router.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn get_orders(router: &Router, n: usize) -> Vec<(u16, Duration)> {
    let client = reqwest::Client::new();
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let started = Instant::now();
        let r = client
            .get(router.url(&format!("/api/orders/{i}")))
            .header("x-user-id", format!("u{i}"))
            .send()
            .await
            .expect("request");
        let status = r.status().as_u16();
        let _ = r.bytes().await;
        out.push((status, started.elapsed()));
    }
    out
}

#[tokio::test]
async fn identical_upstreams_match_and_a_renamed_field_shows_exactly_that_path() {
    let same: Handler =
        Arc::new(|p| json_reply(order(&id_of(p), "total_cents", json!({})), Duration::ZERO));
    let (legacy, _) = Upstream::start_with(Arc::clone(&same)).await;
    let (new, new_shadows) = Upstream::start_with(same).await;
    let router = Router::start(
        &config(legacy.addr, new.addr, ""),
        &[("flags.json", "{\"version\":2,\"features\":[]}")],
        &[],
    )
    .await;
    let answers = get_orders(&router, 50).await;
    assert!(answers.iter().all(|(s, _)| *s == 200));
    let doc = wait_compared(&router, 50).await;
    assert_eq!(
        (doc["compared"].as_u64(), doc["matches"].as_u64()),
        (Some(50), Some(50)),
        "{doc}"
    );
    assert_eq!(
        new_shadows.load(Ordering::Relaxed),
        50,
        "copies carry the shadow header"
    );

    // The new service renames a field: exactly those paths differ.
    let legacy_h: Handler =
        Arc::new(|p| json_reply(order(&id_of(p), "total_cents", json!({})), Duration::ZERO));
    let renamed: Handler =
        Arc::new(|p| json_reply(order(&id_of(p), "totalCents", json!({})), Duration::ZERO));
    let (legacy, _) = Upstream::start_with(legacy_h).await;
    let (new, _) = Upstream::start_with(renamed).await;
    let router = Router::start(
        &config(legacy.addr, new.addr, ""),
        &[("flags.json", "{\"version\":2,\"features\":[]}")],
        &[],
    )
    .await;
    get_orders(&router, 20).await;
    let doc = wait_compared(&router, 20).await;
    assert_eq!(doc["mismatches"], 20, "{doc}");
    let paths: Vec<&str> = doc["paths"]
        .as_array()
        .expect("paths")
        .iter()
        .filter_map(|p| p["path"].as_str())
        .collect();
    assert_eq!(paths, vec!["/totalCents", "/total_cents"]);
    let sample = &doc["samples"][0];
    assert!(
        sample["request"]
            .as_str()
            .is_some_and(|r| r.starts_with("GET /api/orders/")),
        "{sample}"
    );
    assert!(
        sample["primary_body"]
            .as_str()
            .is_some_and(|b| b.contains("total_cents"))
    );
    assert!(
        sample["shadow_body"]
            .as_str()
            .is_some_and(|b| b.contains("totalCents"))
    );

    // The CLI reads the same numbers.
    let out = std::process::Command::new(strangler_bin())
        .args(["route", "compare", "orders", "--config"])
        .arg(&router.config_path)
        .env("STRANGLER_ADMIN_TOKEN", &router.token)
        .output()
        .expect("strangler compare");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("20 pairs compared")
            && text.contains("mismatch 100.0 %")
            && text.contains("/totalCents"),
        "{text}"
    );
}

#[tokio::test]
async fn route_compare_shows_both_values_at_the_differing_path_in_10_kb_bodies() {
    // 10 kB orders with many items; the new service prints the total as a number.
    let big = |total: Value| -> Handler {
        Arc::new(move |p| {
            let items: Vec<Value> = (0..120)
                .map(|i| json!({"sku": format!("SKU-{i:04}"), "qty": 1, "price": "1.00"}))
                .collect();
            json_reply(
                json!({"id": id_of(p), "items": items, "total": total}).to_string(),
                Duration::ZERO,
            )
        })
    };
    let (legacy, _) = Upstream::start_with(big(json!("12.30"))).await;
    let (new, _) = Upstream::start_with(big(json!(12.3))).await;
    let router = Router::start(
        &config(legacy.addr, new.addr, ""),
        &[("flags.json", "{\"version\":2,\"features\":[]}")],
        &[],
    )
    .await;
    get_orders(&router, 5).await;
    let doc = wait_compared(&router, 5).await;
    assert_eq!(doc["mismatches"], 5, "{doc}");
    assert!(
        doc["samples"][0]["primary_body"]
            .as_str()
            .is_some_and(|b| b.len() >= 4_000),
        "the bodies are large: {doc}"
    );
    let out = std::process::Command::new(strangler_bin())
        .args(["route", "compare", "orders", "--config"])
        .arg(&router.config_path)
        .env("STRANGLER_ADMIN_TOKEN", &router.token)
        .output()
        .expect("strangler route compare");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("/total: \"12.30\" → 12.3"),
        "the values side by side:\n{text}"
    );
}

#[tokio::test]
async fn calibration_learns_a_volatile_field_which_then_is_ignored() {
    let stamped: Handler = Arc::new(|p| {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        json_reply(
            order(
                &id_of(p),
                "total_cents",
                json!({"generated_at": now.to_string()}),
            ),
            Duration::ZERO,
        )
    });
    let (legacy, _) = Upstream::start_with(Arc::clone(&stamped)).await;
    let (new, _) = Upstream::start_with(stamped).await;
    let router = Router::start(
        &config(legacy.addr, new.addr, ""),
        &[("flags.json", "{\"version\":2,\"features\":[]}")],
        &[],
    )
    .await;
    get_orders(&router, 10).await;
    let doc = wait_compared(&router, 10).await;
    assert_eq!(doc["mismatches"], 10, "the timestamp always differs: {doc}");

    // Calibrate through the CLI while traffic flows.
    let cli = tokio::task::spawn_blocking({
        let config = router.config_path.clone();
        let token = router.token.clone();
        move || {
            std::process::Command::new(strangler_bin())
                .args([
                    "route",
                    "calibrate",
                    "orders",
                    "--requests",
                    "20",
                    "--wait-secs",
                    "30",
                    "--config",
                ])
                .arg(&config)
                .env("STRANGLER_ADMIN_TOKEN", token)
                .output()
                .expect("strangler route calibrate")
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    get_orders(&router, 40).await;
    let out = cli.await.expect("join");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("\"/generated_at\",  # differs in 100.0 % of legacy pairs"),
        "{text}"
    );
    assert!(
        !text.contains("/total_cents"),
        "stable fields are not suggested: {text}"
    );

    // Accept the suggestion into the config; after the reload the pairs match.
    let with_rule = config(legacy.addr, new.addr, "ignore = [\"/generated_at\"]\n");
    let current = std::fs::read_to_string(&router.config_path).expect("config");
    let head = &current[..current.find("[legacy]").expect("legacy section")];
    replace_file(&router.config_path, &format!("{head}{with_rule}"));
    wait_until(Duration::from_secs(5), "the reload", || {
        let router = &router;
        async move { router.log().contains("config reloaded") }
    })
    .await;
    let before = shadow_doc(&router).await["matches"].as_u64().unwrap_or(0);
    get_orders(&router, 10).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let doc = shadow_doc(&router).await;
        if doc["matches"].as_u64().unwrap_or(0) >= before + 10 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "pairs still mismatch after the ignore rule: {doc}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn post_is_not_shadowed_unless_the_route_opts_in() {
    let h: Handler =
        Arc::new(|p| json_reply(order(&id_of(p), "total_cents", json!({})), Duration::ZERO));
    let (legacy, _) = Upstream::start_with(Arc::clone(&h)).await;
    let (new, new_shadows) = Upstream::start_with(Arc::clone(&h)).await;
    let router = Router::start(
        &config(legacy.addr, new.addr, ""),
        &[("flags.json", "{\"version\":2,\"features\":[]}")],
        &[],
    )
    .await;
    let client = reqwest::Client::new();
    for _ in 0..5 {
        let r = client
            .post(router.url("/api/orders"))
            .body("{\"sku\":\"A\"}")
            .send()
            .await
            .expect("post");
        assert_eq!(r.status().as_u16(), 200);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        new_shadows.load(Ordering::Relaxed),
        0,
        "a write must never be copied by default"
    );
    assert_eq!(new.hits(), 0);

    let (legacy2, _) = Upstream::start_with(Arc::clone(&h)).await;
    let (new2, new2_shadows) = Upstream::start_with(h).await;
    let router = Router::start(
        &config(legacy2.addr, new2.addr, "methods = [\"GET\", \"POST\"]\n"),
        &[("flags.json", "{\"version\":2,\"features\":[]}")],
        &[],
    )
    .await;
    let r = client
        .post(router.url("/api/orders/1"))
        .body("{\"sku\":\"A\"}")
        .send()
        .await
        .expect("post");
    assert_eq!(r.status().as_u16(), 200);
    wait_compared(&router, 1).await;
    assert_eq!(
        new2_shadows.load(Ordering::Relaxed),
        1,
        "an explicit opt-in copies POST"
    );
}

#[tokio::test]
async fn a_hanging_slow_or_dead_shadow_does_not_change_the_primary() {
    let fast: Handler = Arc::new(|p| {
        json_reply(
            order(&id_of(p), "total_cents", json!({})),
            Duration::from_millis(5),
        )
    });
    let (legacy, _) = Upstream::start_with(Arc::clone(&fast)).await;
    let none = "{\"version\":2,\"features\":[]}";

    // Baseline: shadowing off.
    let (quiet, _) = Upstream::start_with(Arc::clone(&fast)).await;
    let off = Router::start(
        &format!("[legacy]\nupstream = \"{}\"\n\n[[route]]\nname = \"orders\"\nmatch = {{ prefix = \"/api/orders\" }}\nnew = \"{}\"\n", legacy.addr, quiet.addr),
        &[("flags.json", none)],
        &[],
    )
    .await;
    get_orders(&off, 10).await;
    let baseline = get_orders(&off, 60).await;
    let p50 = |v: &[(u16, Duration)]| {
        let mut d: Vec<Duration> = v.iter().map(|(_, d)| *d).collect();
        d.sort();
        d[d.len() / 2]
    };
    let base = p50(&baseline);

    let hanging: Handler = Arc::new(|_| json_reply("{}".into(), Duration::from_secs(30)));
    let slow: Handler = Arc::new(|p| {
        json_reply(
            order(&id_of(p), "total_cents", json!({})),
            Duration::from_millis(50),
        )
    });
    let (hang, _) = Upstream::start_with(hanging).await;
    let (slow, _) = Upstream::start_with(slow).await;
    let dead = strangler_testkit::free_port().expect("port");
    let dead_addr: std::net::SocketAddr =
        format!("127.0.0.1:{}", dead.port()).parse().expect("addr");
    for (name, target, errors_expected) in [
        ("hanging", hang.addr, true),
        ("10x slower", slow.addr, false),
        ("down", dead_addr, true),
    ] {
        let router = Router::start(
            &config(legacy.addr, target, "timeout_ms = 500\n"),
            &[("flags.json", none)],
            &[],
        )
        .await;
        get_orders(&router, 10).await;
        let answers = get_orders(&router, 60).await;
        assert!(
            answers.iter().all(|(s, _)| *s == 200),
            "{name}: the primary status must not change"
        );
        let p = p50(&answers);
        // Beyond noise would be the shadow's own latency (50 ms, 500 ms timeout, or 30 s).
        assert!(
            p < base + Duration::from_millis(15),
            "{name}: primary p50 {p:?} vs {base:?} without shadowing"
        );
        let doc = wait_compared(&router, 70).await;
        if errors_expected {
            assert!(
                doc["shadow_errors"].as_u64().unwrap_or(0) > 0,
                "{name}: {doc}"
            );
        } else {
            assert_eq!(doc["matches"], 70, "{name}: {doc}");
        }
    }
}

#[tokio::test]
async fn the_concurrency_cap_skips_copies_instead_of_queueing_them() {
    let fast: Handler =
        Arc::new(|p| json_reply(order(&id_of(p), "total_cents", json!({})), Duration::ZERO));
    let slow: Handler = Arc::new(|p| {
        json_reply(
            order(&id_of(p), "total_cents", json!({})),
            Duration::from_millis(1_000),
        )
    });
    let (legacy, _) = Upstream::start_with(fast).await;
    let (new, _) = Upstream::start_with(slow).await;
    let router = Router::start(
        &config(legacy.addr, new.addr, "max_concurrent = 4\n"),
        &[("flags.json", "{\"version\":2,\"features\":[]}")],
        &[],
    )
    .await;
    // 40 concurrent requests while each copy takes a second: at most 4 copies at once.
    let client = reqwest::Client::new();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..40 {
        let client = client.clone();
        let url = router.url(&format!("/api/orders/{i}"));
        tasks.push(tokio::spawn(async move {
            client.get(url).send().await.map(|r| r.status().as_u16())
        }));
    }
    for t in tasks {
        assert_eq!(t.await.expect("join").expect("request"), 200);
    }
    assert!(
        started.elapsed() < Duration::from_millis(900),
        "primaries waited for copies: {:?}",
        started.elapsed()
    );
    let doc = wait_compared(&router, 40).await;
    assert!(doc["skipped"].as_u64().unwrap_or(0) >= 36 - 4, "{doc}");
    assert!(doc["compared"].as_u64().unwrap_or(0) <= 8, "{doc}");
    // The exported aggregates count the skipped copies too.
    let metrics = router.metrics().await;
    let skipped: u64 = metrics
        .lines()
        .find(|l| {
            l.starts_with(r#"strangler_shadow_pairs_total{outcome="skipped",route="orders"}"#)
        })
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0);
    assert!(
        skipped >= 36 - 4,
        "{skipped} skipped in /metrics:\n{metrics}"
    );
}
