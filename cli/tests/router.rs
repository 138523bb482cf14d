//! The router against real upstreams, a real Unleash server and a real OTLP receiver.

mod support;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::trace::v1::Span;
use reqwest::Method;
use serde_json::{Value, json};
use strangler_testkit::{Unleash, free_port, unleash};
use support::*;
use unleash_api_client::client::{ClientBuilder, FeatureKey};
use unleash_api_client::context::Context;

const USERS: usize = 2_000;

#[derive(Debug, Clone, Copy)]
enum Names {}
impl FeatureKey for Names {
    fn name(self) -> &'static str {
        match self {}
    }
}

/// An Unleash SDK engine as an application would have it, fed `doc`.
fn sdk_with(doc: &str) -> unleash_api_client::Client<Names> {
    let client = ClientBuilder::default()
        .enable_string_features()
        .disable_metric_submission()
        .into_client::<Names>("http://127.0.0.1:1/api/", "app", "app", None)
        .expect("sdk");
    client
        .memoize(serde_json::from_str(doc).expect("features"))
        .expect("memoize");
    client
}

fn sdk_says_new(sdk: &unleash_api_client::Client<Names>, user: &str) -> bool {
    let ctx = Context {
        user_id: Some(user.to_string()),
        ..Context::default()
    };
    sdk.is_enabled_str("strangler.orders", Some(&ctx), false)
}

/// Sends `USERS` distinct users through the router; returns each user's side.
async fn sides(router: &Router, users: usize) -> HashMap<String, String> {
    let client = reqwest::Client::new();
    let mut out = HashMap::with_capacity(users);
    for u in 0..users {
        let user = format!("user-{u}");
        let side = side_for(&client, router, "/api/orders", &user).await;
        out.insert(user, side);
    }
    out
}

fn count_new(sides: &HashMap<String, String>) -> usize {
    sides.values().filter(|s| *s == "new").count()
}

#[tokio::test]
async fn flags_file_splits_users_by_rollout_like_the_sdk_and_each_user_is_sticky() {
    let legacy = Upstream::start("legacy").await;
    let new = Upstream::start("new").await;
    let zero = flags_doc("strangler.orders", true, 0);
    let router = Router::start(
        &route_config(
            legacy.addr,
            new.addr,
            "[flags]\nsource = \"file\"\nfile = \"flags.json\"\n",
        ),
        &[("flags.json", &zero)],
        &[],
    )
    .await;

    let at_zero = sides(&router, 500).await;
    assert_eq!(count_new(&at_zero), 0, "0 % must send everyone to legacy");

    let thirty = flags_doc("strangler.orders", true, 30);
    replace_file(&router.path("flags.json"), &thirty);
    let client = reqwest::Client::new();
    // Find a user who is on new at 30 %; the router must agree within the reload window.
    let sdk = sdk_with(&thirty);
    let probe = (0..)
        .map(|u| format!("user-{u}"))
        .find(|u| sdk_says_new(&sdk, u))
        .expect("some user is in 30 %");
    let took = wait_until(Duration::from_secs(3), "the flags file change", || {
        let client = client.clone();
        let router = &router;
        let probe = probe.clone();
        async move { side_for(&client, router, "/api/orders", &probe).await == "new" }
    })
    .await;
    eprintln!("flags file change applied after {took:?}");
    assert!(
        took < Duration::from_millis(500),
        "file change took {took:?}"
    );

    let at_thirty = sides(&router, USERS).await;
    let on_new = count_new(&at_thirty);
    assert!(
        (500..=700).contains(&on_new),
        "30 % of {USERS} users: got {on_new}"
    );
    for (user, side) in &at_thirty {
        assert_eq!(
            side == "new",
            sdk_says_new(&sdk, user),
            "router and SDK disagree on {user}"
        );
    }
    let again = sides(&router, 300).await;
    for (user, side) in &again {
        assert_eq!(Some(side), at_thirty.get(user), "{user} switched sides");
    }
    assert!(legacy.hits() > 0 && new.hits() > 0);
}

#[tokio::test]
async fn unleash_server_flags_match_the_sdk_and_a_flip_lands_within_one_poll() {
    let unleash = Unleash::start().await.expect("unleash");
    unleash
        .create_toggle("strangler.orders")
        .await
        .expect("toggle");
    let strategy = unleash
        .add_rollout("strangler.orders", 0)
        .await
        .expect("strategy");
    unleash
        .set_enabled("strangler.orders", true)
        .await
        .expect("enable");
    let legacy = Upstream::start("legacy").await;
    let new = Upstream::start("new").await;
    let poll = Duration::from_millis(1_000);
    let flags = format!(
        "[flags]\nsource = \"unleash\"\nurl = \"{}\"\npoll_interval_ms = {}\n",
        unleash.api_url(),
        poll.as_millis()
    );
    let router = Router::start(
        &route_config(legacy.addr, new.addr, &flags),
        &[],
        &[("UNLEASH_CLIENT_TOKEN", unleash::CLIENT_TOKEN)],
    )
    .await;
    // Readiness means flags were read once.
    let client = reqwest::Client::new();
    wait_until(Duration::from_secs(10), "router readiness", || {
        let r = client.get(router.admin_url("/ready")).send();
        async move { r.await.is_ok_and(|r| r.status().is_success()) }
    })
    .await;
    assert_eq!(
        count_new(&sides(&router, 500).await),
        0,
        "0 % must send everyone to legacy"
    );

    unleash
        .set_rollout("strangler.orders", &strategy, 30)
        .await
        .expect("30 %");
    // Wait until the router reports 30 %, then compare every user with the SDK fed the
    // very document the server now serves.
    wait_until(Duration::from_secs(10), "30 % to reach the router", || {
        let router = &router;
        async move {
            let (_, doc) = router.admin(Method::GET, "/routes/orders", None).await;
            doc["flag_state"]["rollout_percent"] == 30
        }
    })
    .await;
    let served = unleash
        .client_features()
        .await
        .expect("features")
        .to_string();
    let sdk = sdk_with(&served);
    let at_thirty = sides(&router, USERS).await;
    let on_new = count_new(&at_thirty);
    assert!(
        (500..=700).contains(&on_new),
        "30 % of {USERS}: got {on_new}"
    );
    for (user, side) in &at_thirty {
        assert_eq!(
            side == "new",
            sdk_says_new(&sdk, user),
            "router and SDK disagree on {user}"
        );
    }

    // The kill switch: turn the toggle off and time how long until new gets nothing.
    let probe = at_thirty
        .iter()
        .find(|(_, s)| *s == "new")
        .map(|(u, _)| u.clone())
        .expect("a user on new");
    unleash
        .set_enabled("strangler.orders", false)
        .await
        .expect("disable");
    let took = wait_until(
        Duration::from_secs(10),
        "the flip to reach the router",
        || {
            let client = client.clone();
            let router = &router;
            let probe = probe.clone();
            async move { side_for(&client, router, "/api/orders", &probe).await == "legacy" }
        },
    )
    .await;
    eprintln!("Unleash flip honoured after {took:?} (poll interval {poll:?})");
    // One interval, plus the time Unleash itself takes to publish the change.
    assert!(
        took <= poll + Duration::from_millis(700),
        "flip took {took:?}"
    );
}

#[tokio::test]
async fn an_admin_override_beats_the_flag_until_cleared() {
    let legacy = Upstream::start("legacy").await;
    let new = Upstream::start("new").await;
    let router = Router::start(
        &route_config(legacy.addr, new.addr, ""),
        &[("flags.json", &flags_doc("strangler.orders", true, 100))],
        &[],
    )
    .await;
    let client = reqwest::Client::new();
    assert_eq!(side_for(&client, &router, "/api/orders", "u1").await, "new");

    let (status, doc) = router
        .admin(
            Method::PUT,
            "/routes/orders/override",
            Some(json!({"backend": "legacy"})),
        )
        .await;
    assert_eq!(status, 200, "{doc}");
    assert_eq!(doc["override"], "legacy");
    for u in 0..50 {
        assert_eq!(
            side_for(&client, &router, "/api/orders", &format!("u{u}")).await,
            "legacy"
        );
    }
    let (_, listed) = router.admin(Method::GET, "/routes", None).await;
    let route = &listed["routes"][0];
    assert_eq!(route["name"], "orders");
    assert_eq!(route["flag_state"]["rollout_percent"], 100);
    assert!(
        route["legacy"]["requests"].as_u64().unwrap_or(0) >= 50,
        "{listed}"
    );

    let (status, _) = router
        .admin(Method::DELETE, "/routes/orders/override", None)
        .await;
    assert_eq!(status, 200);
    assert_eq!(side_for(&client, &router, "/api/orders", "u1").await, "new");

    // Bad admin input: clear errors, nothing changes.
    let (status, doc) = router
        .admin(
            Method::PUT,
            "/routes/orders/override",
            Some(json!({"backend": "sideways"})),
        )
        .await;
    assert_eq!(status, 400, "{doc}");
    let (status, _) = router
        .admin(
            Method::PUT,
            "/routes/nope/override",
            Some(json!({"backend": "new"})),
        )
        .await;
    assert_eq!(status, 404);
    let unauthenticated = client
        .get(router.admin_url("/routes"))
        .send()
        .await
        .expect("request");
    assert_eq!(unauthenticated.status().as_u16(), 401);
    let wrong = client
        .put(router.admin_url("/routes/orders/override"))
        .bearer_auth("wrong")
        .json(&json!({"backend": "legacy"}))
        .send()
        .await
        .expect("request");
    assert_eq!(wrong.status().as_u16(), 401);
    assert_eq!(side_for(&client, &router, "/api/orders", "u1").await, "new");

    let metrics = router.metrics().await;
    assert!(
        metrics.contains(
            r#"strangler_decisions_total{backend="legacy",reason="override",route="orders"}"#
        ),
        "{metrics}"
    );
    assert!(
        metrics.contains("strangler_flag_source_age_seconds"),
        "{metrics}"
    );
}

#[tokio::test]
async fn requests_keep_method_path_query_body_and_get_forwarding_headers() {
    let legacy = Upstream::start("legacy").await;
    let new = Upstream::start("new").await;
    let router = Router::start(
        &route_config(legacy.addr, new.addr, ""),
        &[("flags.json", &flags_doc("strangler.orders", true, 100))],
        &[],
    )
    .await;
    let client = reqwest::Client::new();
    let body = "x".repeat(200_000);
    let r: Value = client
        .post(router.url("/api/orders/42?expand=items&x=1"))
        .header("x-user-id", "u")
        .header("x-forwarded-for", "203.0.113.9")
        .body(body.clone())
        .send()
        .await
        .expect("post")
        .json()
        .await
        .expect("json");
    assert_eq!(r["side"], "new");
    assert_eq!(r["method"], "POST");
    assert_eq!(r["path"], "/api/orders/42");
    assert_eq!(r["query"], "expand=items&x=1");
    assert_eq!(r["body"].as_str().map(str::len), Some(body.len()));
    // The client is not a trusted proxy: its X-Forwarded-For is replaced, not believed.
    assert_eq!(r["headers"]["x-forwarded-for"], "127.0.0.1");
    assert_eq!(r["headers"]["x-forwarded-proto"], "http");
    assert_eq!(
        r["headers"]["x-forwarded-host"],
        format!("127.0.0.1:{}", router.port.port())
    );
    assert!(
        r["headers"]["via"]
            .as_str()
            .is_some_and(|v| v.contains("strangler"))
    );

    // From a trusted proxy the header is kept and appended to.
    let config = std::fs::read_to_string(&router.config_path).expect("config");
    let trusted = config.replacen(
        "threads = 2\n",
        "threads = 2\ntrusted_proxies = [\"127.0.0.0/8\"]\n",
        1,
    );
    replace_file(&router.config_path, &trusted);
    wait_until(Duration::from_secs(3), "the reload", || {
        let router = &router;
        async move { router.log().contains("config reloaded") }
    })
    .await;
    let r: Value = client
        .get(router.url("/api/orders/1"))
        .header("x-forwarded-for", "203.0.113.9")
        .send()
        .await
        .expect("get")
        .json()
        .await
        .expect("json");
    assert_eq!(r["headers"]["x-forwarded-for"], "203.0.113.9, 127.0.0.1");

    // HTTP/2 from the client (cleartext, prior knowledge) reaches the HTTP/1.1 upstream.
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .expect("h2 client");
    let r = h2
        .get(router.url("/home?a=b"))
        .send()
        .await
        .expect("h2 request");
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    let doc: Value = r.json().await.expect("json");
    assert_eq!(doc["side"], "legacy");
    assert_eq!(doc["query"], "a=b");
    assert!(
        doc["headers"]["host"].is_string(),
        "upstream needs a Host header: {doc}"
    );
}

#[tokio::test]
async fn a_dead_new_service_falls_back_to_legacy_for_reads_and_502s_writes() {
    let legacy = Upstream::start("legacy").await;
    // A leased port nobody listens on: connections are refused.
    let dead = free_port().expect("port");
    let dead_addr = format!("127.0.0.1:{}", dead.port()).parse().expect("addr");
    let router = Router::start(
        &route_config(legacy.addr, dead_addr, ""),
        &[("flags.json", &flags_doc("strangler.orders", true, 100))],
        &[],
    )
    .await;
    let client = reqwest::Client::new();
    // A read is retried on legacy: the user sees legacy's answer, not an error.
    let r = client
        .get(router.url("/api/orders/1"))
        .send()
        .await
        .expect("request");
    assert_eq!(r.status().as_u16(), 200);
    let body: Value = r.json().await.expect("json");
    assert_eq!(body["side"], "legacy");
    // A write is never replayed elsewhere: the client gets the upstream error.
    let before = legacy.hits();
    let r = client
        .post(router.url("/api/orders"))
        .body("{}")
        .send()
        .await
        .expect("request");
    assert_eq!(r.status().as_u16(), 502);
    assert_eq!(legacy.hits(), before, "the POST must not reach legacy");
    let r = client.get(router.url("/")).send().await.expect("request");
    assert_eq!(r.status().as_u16(), 200);
    let metrics = router.metrics().await;
    assert!(
        metrics.contains(
            r#"strangler_decisions_total{backend="legacy",reason="fallback",route="orders"} 1"#
        ),
        "{metrics}"
    );
}

#[tokio::test]
async fn reads_that_fail_on_the_new_service_after_sending_fall_back_to_legacy() {
    let legacy = Upstream::start("legacy").await;
    let failing: Handler = std::sync::Arc::new(|parts| {
        let path = parts.uri.path();
        Reply {
            status: if path.ends_with("/fail") { 503 } else { 200 },
            content_type: "application/json",
            body: "{\"side\":\"new\"}".into(),
            delay: if path.ends_with("/hang") {
                Duration::from_secs(5)
            } else {
                Duration::ZERO
            },
        }
    });
    let (new, _) = Upstream::start_with(failing).await;
    let config = format!(
        "[legacy]\nupstream = \"{}\"\n\n[[route]]\nname = \"orders\"\nmatch = {{ prefix = \"/api/orders\" }}\nnew = \"{}\"\nread_timeout_ms = 300\n",
        legacy.addr, new.addr
    );
    let router = Router::start(
        &config,
        &[("flags.json", &flags_doc("strangler.orders", true, 100))],
        &[],
    )
    .await;
    let client = reqwest::Client::new();
    let side = |r: Value| r["side"].as_str().unwrap_or("").to_string();
    let ok: Value = client
        .get(router.url("/api/orders/ok"))
        .send()
        .await
        .expect("get")
        .json()
        .await
        .expect("json");
    assert_eq!(side(ok), "new");
    // 5xx from new → legacy answers.
    let r = client
        .get(router.url("/api/orders/fail"))
        .send()
        .await
        .expect("get");
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(side(r.json().await.expect("json")), "legacy");
    // Read timeout on new → legacy answers.
    let r = client
        .get(router.url("/api/orders/hang"))
        .send()
        .await
        .expect("get");
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(side(r.json().await.expect("json")), "legacy");
    // A write that gets a 5xx is passed through as is and never replayed.
    let before = legacy.hits();
    let r = client
        .post(router.url("/api/orders/fail"))
        .body("{}")
        .send()
        .await
        .expect("post");
    assert_eq!(r.status().as_u16(), 503);
    assert_eq!(legacy.hits(), before);
}

#[tokio::test]
async fn the_breaker_keeps_a_failing_new_service_out_and_lets_it_back_after_a_probe() {
    let legacy = Upstream::start("legacy").await;
    let healthy = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = std::sync::Arc::clone(&healthy);
    let new_handler: Handler = std::sync::Arc::new(move |_| Reply {
        status: if flag.load(std::sync::atomic::Ordering::Relaxed) {
            200
        } else {
            503
        },
        content_type: "application/json",
        body: "{\"side\":\"new\"}".into(),
        delay: Duration::ZERO,
    });
    let (new, _) = Upstream::start_with(new_handler).await;
    let config = format!(
        "[legacy]\nupstream = \"{}\"\n\n[[route]]\nname = \"orders\"\nmatch = {{ prefix = \"/api/orders\" }}\nnew = \"{}\"\nbreaker_failures = 3\nbreaker_open_ms = 500\n",
        legacy.addr, new.addr
    );
    let router = Router::start(
        &config,
        &[("flags.json", &flags_doc("strangler.orders", true, 100))],
        &[],
    )
    .await;
    let client = reqwest::Client::new();
    // Every read is answered (by legacy, after the new service's 503) ...
    for _ in 0..10 {
        let r = client
            .get(router.url("/api/orders/1"))
            .send()
            .await
            .expect("get");
        assert_eq!(r.status().as_u16(), 200);
    }
    // ... and after 3 failures the new service is no longer tried.
    // The 3rd failure is recorded just after its response, so a 4th may slip in.
    let tried = new.hits();
    assert!(
        (3..=4).contains(&tried),
        "the breaker opened after 3 failures ({tried} tries)"
    );
    for _ in 0..10 {
        let r = client
            .get(router.url("/api/orders/1"))
            .send()
            .await
            .expect("get");
        assert_eq!(r.status().as_u16(), 200);
    }
    assert_eq!(
        new.hits(),
        tried,
        "while open, the new service is not tried"
    );
    wait_until(Duration::from_secs(3), "the breaker to report open", || {
        let router = &router;
        async move { router.admin(Method::GET, "/routes/orders", None).await.1["breaker"] == "open" }
    })
    .await;
    let metrics = router.metrics().await;
    assert!(
        metrics.contains(r#"strangler_breaker_open{route="orders"} 1"#),
        "{metrics}"
    );
    // The new service recovers; after the open period one probe closes the breaker.
    healthy.store(true, std::sync::atomic::Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(600)).await;
    let r: Value = client
        .get(router.url("/api/orders/1"))
        .send()
        .await
        .expect("get")
        .json()
        .await
        .expect("json");
    assert_eq!(r["side"], "new", "the probe goes to the new service");
    // The outcome is recorded right after the response is sent.
    wait_until(Duration::from_secs(3), "the breaker to close", || {
        let router = &router;
        async move { router.admin(Method::GET, "/routes/orders", None).await.1["breaker"] == "closed" }
    })
    .await;
    for _ in 0..5 {
        let r: Value = client
            .get(router.url("/api/orders/1"))
            .send()
            .await
            .expect("get")
            .json()
            .await
            .expect("json");
        assert_eq!(r["side"], "new");
    }
}

#[tokio::test]
async fn a_failing_health_check_bypasses_the_new_service_before_users_see_errors() {
    let legacy = Upstream::start("legacy").await;
    let healthy = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let api_calls = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let (flag, calls) = (
        std::sync::Arc::clone(&healthy),
        std::sync::Arc::clone(&api_calls),
    );
    let handler: Handler = std::sync::Arc::new(move |parts| {
        let up = flag.load(std::sync::atomic::Ordering::Relaxed);
        if parts.uri.path() != "/health" {
            calls.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        Reply {
            status: if parts.uri.path() == "/health" && !up {
                503
            } else {
                200
            },
            content_type: "application/json",
            body: "{\"side\":\"new\"}".into(),
            delay: Duration::ZERO,
        }
    });
    let (new, _) = Upstream::start_with(handler).await;
    let config = format!(
        "[legacy]\nupstream = \"{}\"\n\n[[route]]\nname = \"orders\"\nmatch = {{ prefix = \"/api/orders\" }}\nnew = \"{}\"\nhealth_path = \"/health\"\nhealth_interval_ms = 100\nhealth_failures = 2\n",
        legacy.addr, new.addr
    );
    let router = Router::start(
        &config,
        &[("flags.json", &flags_doc("strangler.orders", true, 100))],
        &[],
    )
    .await;
    let client = reqwest::Client::new();
    assert_eq!(side_for(&client, &router, "/api/orders", "u").await, "new");
    healthy.store(false, std::sync::atomic::Ordering::Relaxed);
    wait_until(Duration::from_secs(5), "the breaker to open on failed health checks", || {
        let router = &router;
        async move { router.admin(Method::GET, "/routes/orders", None).await.1["breaker"] == "open" }
    })
    .await;
    let before = api_calls.load(std::sync::atomic::Ordering::Relaxed);
    for i in 0..20 {
        assert_eq!(
            side_for(&client, &router, "/api/orders", &format!("u{i}")).await,
            "legacy"
        );
    }
    assert_eq!(
        api_calls.load(std::sync::atomic::Ordering::Relaxed),
        before,
        "no user request reached the unhealthy service"
    );
    healthy.store(true, std::sync::atomic::Ordering::Relaxed);
    wait_until(
        Duration::from_secs(5),
        "traffic to return to the new service",
        || {
            let (client, router) = (client.clone(), &router);
            async move { side_for(&client, router, "/api/orders", "u").await == "new" }
        },
    )
    .await;
    assert!(new.hits() > 0);
}

#[tokio::test]
async fn killing_the_new_service_under_load_fails_no_read_and_traffic_returns_after_restart() {
    let legacy = Upstream::start("legacy").await;
    let handler: Handler = std::sync::Arc::new(|_| Reply {
        status: 200,
        content_type: "application/json",
        body: "{\"side\":\"new\"}".into(),
        delay: Duration::ZERO,
    });
    let (new, _) = Upstream::start_with(std::sync::Arc::clone(&handler)).await;
    let new_addr = new.addr;
    let config = format!(
        "[legacy]\nupstream = \"{}\"\n\n[[route]]\nname = \"orders\"\nmatch = {{ prefix = \"/api/orders\" }}\nnew = \"{new_addr}\"\nbreaker_failures = 3\nbreaker_open_ms = 300\n",
        legacy.addr
    );
    let router = Router::start(
        &config,
        &[("flags.json", &flags_doc("strangler.orders", true, 100))],
        &[],
    )
    .await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut loaders = Vec::new();
    for worker in 0..4 {
        let (stop, url) = (std::sync::Arc::clone(&stop), router.url("/api/orders/1"));
        loaders.push(tokio::spawn(async move {
            let client = reqwest::Client::new();
            let (mut sent, mut ok, mut failed, mut from_new) = (0u64, 0u64, 0u64, 0u64);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                sent += 1;
                match client
                    .get(&url)
                    .header("x-user-id", format!("w{worker}"))
                    .send()
                    .await
                {
                    Ok(r) if r.status().is_success() => {
                        ok += 1;
                        let v: Value = r.json().await.unwrap_or(Value::Null);
                        from_new += u64::from(v["side"] == "new");
                    }
                    _ => failed += 1,
                }
            }
            (sent, ok, failed, from_new)
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    drop(new); // the new service dies: listener and open connections closed
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    let (_, doc) = router.admin(Method::GET, "/routes/orders", None).await;
    assert_eq!(doc["breaker"], "open", "{doc}");
    let (restarted, _) = Upstream::start_with_at(handler, new_addr).await;
    wait_until(
        Duration::from_secs(5),
        "traffic back on the new service",
        || {
            let router = &router;
            async move {
                router.admin(Method::GET, "/routes/orders", None).await.1["breaker"] == "closed"
            }
        },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut totals = (0, 0, 0, 0);
    for l in loaders {
        let (s, o, f, n) = l.await.expect("loader");
        totals = (totals.0 + s, totals.1 + o, totals.2 + f, totals.3 + n);
    }
    eprintln!(
        "kill new under GET load: sent {}, answered {}, failed {}",
        totals.0, totals.1, totals.2
    );
    assert_eq!(totals.2, 0, "no client request may fail: {totals:?}");
    assert_eq!(totals.0, totals.1);
    assert!(
        restarted.hits() > 0,
        "traffic recovered to the restarted new service"
    );
}

/// 50 config rewrites under 4-way load, alternating two versions that disagree on
/// every part of a request's path. Version A: the route's flag is on, its new
/// service answers 500 (so each request falls back) and legacy is `legacy-a`.
/// Version B: the route's flag is unknown (legacy by default) and legacy is
/// `legacy-b`. A request that mixed them — the new service tried under A, then the
/// fallback sent to B's legacy — would reach `legacy-b` after the failing service.
#[tokio::test]
async fn a_reload_storm_never_mixes_two_config_versions_in_one_request() {
    let failing_saw: Arc<Mutex<std::collections::HashSet<String>>> = Arc::default();
    let seen = Arc::clone(&failing_saw);
    let failing: Handler = Arc::new(move |parts| {
        if let Some(id) = parts.headers.get("x-req-id").and_then(|v| v.to_str().ok()) {
            seen.lock().expect("lock").insert(id.to_string());
        }
        Reply {
            status: 500,
            content_type: "text/plain",
            body: "down".into(),
            delay: Duration::ZERO,
        }
    });
    let (new, _) = Upstream::start_with(failing).await;
    let legacy_a = Upstream::start("legacy-a").await;
    let legacy_b = Upstream::start("legacy-b").await;
    let version = |legacy: std::net::SocketAddr, flag: &str| {
        format!(
            "[legacy]\nupstream = \"{legacy}\"\n\n[[route]]\nname = \"orders\"\nmatch = {{ prefix = \"/api/orders\" }}\nnew = \"{}\"\nflag = \"{flag}\"\nbreaker_failures = 1000000000\n",
            new.addr
        )
    };
    let a = version(legacy_a.addr, "strangler.orders");
    let b = version(legacy_b.addr, "strangler.unknown");
    let router = Router::start(
        &a,
        &[("flags.json", &flags_doc("strangler.orders", true, 100))],
        &[],
    )
    .await;
    let head = {
        let current = std::fs::read_to_string(&router.config_path).expect("config");
        current[..current.find("[legacy]").expect("legacy section")].to_string()
    };
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let outcomes: Arc<Mutex<Vec<(String, u16, String)>>> = Arc::default();
    let mut workers = Vec::new();
    for w in 0..4 {
        let (stop, outcomes, url) = (
            Arc::clone(&stop),
            Arc::clone(&outcomes),
            router.url("/api/orders/1"),
        );
        workers.push(tokio::spawn(async move {
            let client = reqwest::Client::new();
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                n += 1;
                let id = format!("{w}-{n}");
                let (status, side) = match client.get(&url).header("x-req-id", &id).send().await {
                    Ok(r) => {
                        let status = r.status().as_u16();
                        let body: Value = r.json().await.unwrap_or(Value::Null);
                        (status, body["side"].as_str().unwrap_or("").to_string())
                    }
                    Err(e) => (0, e.to_string()),
                };
                outcomes.lock().expect("lock").push((id, status, side));
            }
        }));
    }
    for i in 0..50 {
        let next = if i % 2 == 0 { &b } else { &a };
        replace_file(&router.config_path, &format!("{head}{next}# version {i}\n"));
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(router.pid()),
            nix::sys::signal::Signal::SIGHUP,
        )
        .expect("sighup");
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for w in workers {
        w.await.expect("worker");
    }
    let outcomes = outcomes.lock().expect("lock").clone();
    let failing_saw = failing_saw.lock().expect("lock").clone();
    let by_side = |side: &str| outcomes.iter().filter(|o| o.2 == side).count();
    eprintln!(
        "reload storm: {} requests, {} from legacy-a (version A, after the new service failed), {} from legacy-b (version B), {} reloads logged",
        outcomes.len(),
        by_side("legacy-a"),
        by_side("legacy-b"),
        router.log().matches("config reloaded").count()
    );
    for (id, status, side) in &outcomes {
        assert_eq!(*status, 200, "request {id}: {side}");
        match side.as_str() {
            "legacy-a" => assert!(
                failing_saw.contains(id),
                "request {id} reached version A's legacy without version A's decision (new, then fallback)"
            ),
            "legacy-b" => assert!(
                !failing_saw.contains(id),
                "request {id} was decided by version A (new service tried) but served by version B's legacy"
            ),
            other => panic!("request {id} answered by {other:?}"),
        }
    }
    assert!(
        by_side("legacy-a") > 0 && by_side("legacy-b") > 0,
        "both versions served"
    );
    assert!(router.log().matches("config reloaded").count() >= 25);
}

#[tokio::test]
async fn reloads_under_load_lose_no_request() {
    let legacy = Upstream::start("legacy").await;
    let new = Upstream::start("new").await;
    let router = Router::start(
        &route_config(legacy.addr, new.addr, ""),
        &[("flags.json", &flags_doc("strangler.orders", true, 50))],
        &[],
    )
    .await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let loaders = load(router.url("/api/orders/1"), 4, std::sync::Arc::clone(&stop));
    // Ten reloads (file rewrites and SIGHUPs) while the load runs.
    let config = std::fs::read_to_string(&router.config_path).expect("config");
    for i in 0..10 {
        replace_file(&router.config_path, &format!("{config}\n# reload {i}\n"));
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(router.pid()),
            nix::sys::signal::Signal::SIGHUP,
        )
        .expect("sighup");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (sent, ok, _) = totals(loaders).await;
    eprintln!(
        "reload under load: sent {sent}, answered {ok}, failed {}",
        sent - ok
    );
    assert_eq!(sent, ok);
    assert!(
        router.log().matches("config reloaded").count() >= 10,
        "{}",
        router.log()
    );
}

#[tokio::test]
async fn oversized_requests_get_414_431_or_413_and_others_are_served() {
    let legacy = Upstream::start("legacy").await;
    let new = Upstream::start("new").await;
    let router = Router::start(
        &route_config(legacy.addr, new.addr, ""),
        &[("flags.json", "{\"version\":2,\"features\":[]}")],
        &[],
    )
    .await;
    let client = reqwest::Client::new();
    let long = format!("/api/orders?q={}", "x".repeat(10_000));
    assert_eq!(
        client
            .get(router.url(&long))
            .send()
            .await
            .expect("get")
            .status()
            .as_u16(),
        414
    );
    let mut many = client.get(router.url("/"));
    for i in 0..120 {
        many = many.header(format!("x-h{i}"), "1");
    }
    assert_eq!(many.send().await.expect("get").status().as_u16(), 431);
    let big = client
        .post(router.url("/api/orders"))
        .header("content-length", (100u64 << 20).to_string())
        .body(vec![0u8; 10])
        .send()
        .await;
    if let Ok(r) = big {
        assert_eq!(r.status().as_u16(), 413);
    }
    let before = legacy.hits();
    assert_eq!(
        side_for(&client, &router, "/api/orders", "u").await,
        "legacy"
    );
    assert_eq!(
        legacy.hits(),
        before + 1,
        "refused requests never reached an upstream"
    );
    // Hop-by-hop headers, and those the client names in Connection, stop here.
    let r: Value = client
        .get(router.url("/x"))
        .header("connection", "keep-alive, x-secret")
        .header("x-secret", "1")
        .send()
        .await
        .expect("get")
        .json()
        .await
        .expect("json");
    assert!(r["headers"]["x-secret"].is_null(), "{r}");
}

#[tokio::test]
async fn malformed_http_gets_a_400_and_the_router_keeps_serving() {
    let legacy = Upstream::start("legacy").await;
    let new = Upstream::start("new").await;
    let router = Router::start(
        &route_config(legacy.addr, new.addr, ""),
        &[("flags.json", "{\"version\":2,\"features\":[]}")],
        &[],
    )
    .await;
    let port = router.port.port();
    let response = tokio::task::spawn_blocking(move || {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        s.write_all(b"THIS IS NOT HTTP\r\n\x00\x01\r\n\r\n")
            .expect("write");
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        String::from_utf8_lossy(&out).into_owned()
    })
    .await
    .expect("join");
    assert!(response.starts_with("HTTP/1.1 400"), "got {response:?}");
    let client = reqwest::Client::new();
    assert_eq!(
        side_for(&client, &router, "/api/orders", "u").await,
        "legacy"
    );
}

#[tokio::test]
async fn an_unparsable_flags_file_keeps_the_last_good_flags() {
    let legacy = Upstream::start("legacy").await;
    let new = Upstream::start("new").await;
    let router = Router::start(
        &route_config(legacy.addr, new.addr, ""),
        &[("flags.json", &flags_doc("strangler.orders", true, 100))],
        &[],
    )
    .await;
    let client = reqwest::Client::new();
    assert_eq!(side_for(&client, &router, "/api/orders", "u").await, "new");
    replace_file(
        &router.path("flags.json"),
        "{\"version\": 2, \"features\": [ oops",
    );
    wait_until(
        Duration::from_secs(3),
        "the parse error to be reported",
        || {
            let router = &router;
            async move {
                let (_, doc) = router.admin(Method::GET, "/routes", None).await;
                doc["flags"]["last_error"]
                    .as_str()
                    .is_some_and(|e| e.contains("line 1"))
            }
        },
    )
    .await;
    for u in 0..20 {
        assert_eq!(
            side_for(&client, &router, "/api/orders", &format!("u{u}")).await,
            "new"
        );
    }
}

#[tokio::test]
async fn an_unreachable_unleash_keeps_everything_on_legacy_and_says_so() {
    let legacy = Upstream::start("legacy").await;
    let new = Upstream::start("new").await;
    let dead = free_port().expect("port");
    let flags = format!(
        "[flags]\nsource = \"unleash\"\nurl = \"http://127.0.0.1:{}/api/\"\npoll_interval_ms = 200\n",
        dead.port()
    );
    let router = Router::start(
        &route_config(legacy.addr, new.addr, &flags),
        &[],
        &[("UNLEASH_CLIENT_TOKEN", "x")],
    )
    .await;
    let client = reqwest::Client::new();
    assert_eq!(
        side_for(&client, &router, "/api/orders", "u").await,
        "legacy"
    );
    let ready = client
        .get(router.admin_url("/ready"))
        .send()
        .await
        .expect("ready");
    assert_eq!(ready.status().as_u16(), 503);
    wait_until(Duration::from_secs(5), "the outage to be logged", || {
        let router = &router;
        async move {
            router
                .log()
                .contains("cannot read flags, keeping the last good state")
        }
    })
    .await;
}

#[tokio::test]
async fn config_reload_swaps_routes_without_dropping_requests_and_rejects_bad_files() {
    let legacy = Upstream::start("legacy").await;
    let new = Upstream::start("new").await;
    let without_route = format!("[legacy]\nupstream = \"{}\"\n", legacy.addr);
    let router = Router::start(
        &without_route,
        &[("flags.json", &flags_doc("strangler.orders", true, 100))],
        &[],
    )
    .await;
    let client = reqwest::Client::new();
    assert_eq!(
        side_for(&client, &router, "/api/orders", "u").await,
        "legacy"
    );

    // A slow request is in flight across the reload.
    let slow = tokio::spawn({
        let client = client.clone();
        let url = router.url("/slow");
        async move { client.get(url).send().await.map(|r| r.status().as_u16()) }
    });
    let config = std::fs::read_to_string(&router.config_path).expect("config");
    let with_route = format!(
        "{config}\n[[route]]\nname = \"orders\"\nmatch = {{ prefix = \"/api/orders\" }}\nnew = \"{}\"\n",
        new.addr
    );
    replace_file(&router.config_path, &with_route);
    wait_until(Duration::from_secs(3), "the reloaded route", || {
        let client = client.clone();
        let router = &router;
        async move { side_for(&client, router, "/api/orders", "u").await == "new" }
    })
    .await;
    assert_eq!(
        slow.await
            .expect("join")
            .expect("slow request survived the reload"),
        200
    );

    // A broken file is rejected and the running config stays.
    std::fs::write(&router.config_path, format!("{with_route}\nbogus = 1\n")).expect("write");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(router.pid()),
        nix::sys::signal::Signal::SIGHUP,
    )
    .expect("sighup");
    wait_until(Duration::from_secs(3), "the rejection to be logged", || {
        let router = &router;
        async move { router.log().contains("config reload rejected") }
    })
    .await;
    assert_eq!(side_for(&client, &router, "/api/orders", "u").await, "new");
}

#[derive(Default, Clone)]
struct Receiver {
    spans: Arc<Mutex<Vec<Span>>>,
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().expect("lock");
        for rs in request.into_inner().resource_spans {
            for ss in rs.scope_spans {
                spans.extend(ss.spans);
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

fn attr(span: &Span, key: &str) -> Option<String> {
    span.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
            AnyValue::StringValue(s) => Some(s.clone()),
            AnyValue::IntValue(i) => Some(i.to_string()),
            AnyValue::BoolValue(b) => Some(b.to_string()),
            other => Some(format!("{other:?}")),
        })
}

#[tokio::test]
async fn spans_reach_an_otlp_receiver_with_strangler_attributes_and_the_callers_trace_id() {
    let receiver = Receiver::default();
    let otlp_port = free_port().expect("port");
    let addr = format!("127.0.0.1:{}", otlp_port.port())
        .parse()
        .expect("addr");
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(receiver.clone()))
            .serve(addr),
    );
    let legacy = Upstream::start("legacy").await;
    let new = Upstream::start("new").await;
    let telemetry = format!("[telemetry]\notlp_endpoint = \"http://{addr}\"\n");
    let router = Router::start(
        &route_config(legacy.addr, new.addr, &telemetry),
        &[("flags.json", &flags_doc("strangler.orders", true, 100))],
        &[],
    )
    .await;
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let client = reqwest::Client::new();
    let echoed: Value = client
        .get(router.url("/api/orders/7"))
        .header("x-user-id", "u1")
        .header("traceparent", format!("00-{trace_id}-00f067aa0ba902b7-01"))
        .send()
        .await
        .expect("request")
        .json()
        .await
        .expect("json");
    let upstream_tp = echoed["headers"]["traceparent"]
        .as_str()
        .expect("traceparent reached the upstream");
    assert!(
        upstream_tp.starts_with(&format!("00-{trace_id}-")),
        "{upstream_tp}"
    );

    wait_until(Duration::from_secs(10), "the span at the receiver", || {
        let spans = Arc::clone(&receiver.spans);
        async move { !spans.lock().expect("lock").is_empty() }
    })
    .await;
    let spans = receiver.spans.lock().expect("lock").clone();
    let span = spans
        .iter()
        .find(|s| attr(s, "strangler.route").as_deref() == Some("orders"))
        .expect("the route's span");
    assert_eq!(hex(&span.trace_id), trace_id);
    assert_eq!(hex(&span.parent_span_id), "00f067aa0ba902b7");
    // The upstream's parent is the router's span.
    assert!(upstream_tp.contains(&hex(&span.span_id)));
    assert_eq!(span.name, "GET /api/orders");
    for (key, want) in [
        ("strangler.route", "orders"),
        ("strangler.backend", "new"),
        ("strangler.decision", "flag"),
        ("strangler.flag", "strangler.orders"),
        ("http.request.method", "GET"),
        ("http.route", "/api/orders"),
        ("url.path", "/api/orders/7"),
        ("http.response.status_code", "200"),
    ] {
        assert_eq!(attr(span, key).as_deref(), Some(want), "{key} in {span:?}");
    }
    server.abort();
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn config_check_reports_what_is_wrong_with_line_numbers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("strangler.toml");
    std::fs::write(
        &path,
        "[legacy]\nupstream = \"127.0.0.1:3000\"\n\n[[route]]\nname = \"orders\"\nmatch = { prefix = \"/api/orders\" }\nnew = \"127.0.0.1:4000\"\ncolour = \"blue\"\n",
    )
    .expect("write");
    let out = std::process::Command::new(strangler_bin())
        .args(["config", "check"])
        .arg(&path)
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("strangler.toml:8:"), "{stderr}");
    assert!(stderr.contains("colour"), "{stderr}");

    std::fs::write(&path, "[legacy]\nupstream = \"127.0.0.1:3000\"\n").expect("write");
    let out = std::process::Command::new(strangler_bin())
        .args(["config", "check"])
        .arg(&path)
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("ok (0 routes"));
}

/// Splits a byte stream of HTTP/1.1 responses into (status, body) pairs
/// (Content-Length or chunked bodies).
fn split_responses(mut raw: &[u8]) -> Vec<(u16, String)> {
    let mut out = Vec::new();
    while let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
        let head = String::from_utf8_lossy(&raw[..end]).to_ascii_lowercase();
        let status: u16 = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let mut rest = &raw[end + 4..];
        let mut body = Vec::new();
        if let Some(len) = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse::<usize>().ok())
        {
            let len = len.min(rest.len());
            body.extend_from_slice(&rest[..len]);
            rest = &rest[len..];
        } else if head.contains("transfer-encoding: chunked") {
            while let Some(line_end) = rest.windows(2).position(|w| w == b"\r\n") {
                let size =
                    usize::from_str_radix(String::from_utf8_lossy(&rest[..line_end]).trim(), 16)
                        .unwrap_or(0);
                rest = &rest[line_end + 2..];
                if size == 0 {
                    rest = rest.get(2..).unwrap_or_default();
                    break;
                }
                let size = size.min(rest.len());
                body.extend_from_slice(&rest[..size]);
                rest = rest.get(size + 2..).unwrap_or_default();
            }
        }
        out.push((status, String::from_utf8_lossy(&body).into_owned()));
        raw = rest;
    }
    out
}

/// Writes `bytes` in one write and reads until the router closes the connection.
async fn one_write(port: u16, bytes: Vec<u8>) -> Vec<u8> {
    tokio::task::spawn_blocking(move || {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        s.write_all(&bytes).expect("write");
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        out
    })
    .await
    .expect("join")
}

#[tokio::test]
async fn pipelined_requests_are_all_answered_in_order() {
    let legacy = Upstream::start("legacy").await;
    let new = Upstream::start("new").await;
    let router = Router::start(
        &route_config(legacy.addr, new.addr, ""),
        &[("flags.json", &flags_doc("strangler.orders", true, 50))],
        &[],
    )
    .await;
    for n in [2usize, 10] {
        // n GETs in one write, the last one closing the connection; users alternate
        // so both sides answer within one burst.
        let mut burst = Vec::new();
        for i in 0..n {
            let close = if i + 1 == n {
                "connection: close\r\n"
            } else {
                ""
            };
            burst.extend_from_slice(
                format!("GET /api/orders/{i} HTTP/1.1\r\nhost: shop\r\nx-user-id: user-{i}\r\n{close}\r\n")
                    .as_bytes(),
            );
        }
        let responses = split_responses(&one_write(router.port.port(), burst).await);
        assert_eq!(responses.len(), n, "{n} pipelined GETs: {responses:?}");
        for (i, (status, body)) in responses.iter().enumerate() {
            assert_eq!(*status, 200, "{body}");
            let doc: Value = serde_json::from_str(body).expect("json");
            assert_eq!(
                doc["path"],
                format!("/api/orders/{i}"),
                "response {i} out of order"
            );
        }
    }
}

#[tokio::test]
async fn a_post_and_a_get_in_one_write_get_two_answers() {
    let legacy = Upstream::start("legacy").await;
    let new = Upstream::start("new").await;
    let router = Router::start(
        &route_config(legacy.addr, new.addr, ""),
        &[("flags.json", &flags_doc("strangler.orders", false, 0))],
        &[],
    )
    .await;
    let burst = b"POST /api/orders HTTP/1.1\r\nhost: shop\r\ncontent-type: application/json\r\ncontent-length: 11\r\n\r\n{\"qty\": 12}GET /api/orders/7 HTTP/1.1\r\nhost: shop\r\nconnection: close\r\n\r\n".to_vec();
    let responses = split_responses(&one_write(router.port.port(), burst).await);
    assert_eq!(responses.len(), 2, "{responses:?}");
    let first: Value = serde_json::from_str(&responses[0].1).expect("json");
    let second: Value = serde_json::from_str(&responses[1].1).expect("json");
    assert_eq!(
        (first["method"].as_str(), first["path"].as_str()),
        (Some("POST"), Some("/api/orders"))
    );
    assert_eq!(first["body"], "{\"qty\": 12}");
    assert_eq!(
        (second["method"].as_str(), second["path"].as_str()),
        (Some("GET"), Some("/api/orders/7"))
    );
}

/// Sums the samples of one Prometheus metric whose labels contain every `labels` pair.
fn metric_sum(text: &str, name: &str, labels: &[&str]) -> u64 {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .filter(|l| labels.iter().all(|kv| l.contains(kv)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

#[tokio::test]
async fn unsampled_requests_get_no_span_unless_they_fall_back_or_the_caller_sampled_them() {
    let receiver = Receiver::default();
    let otlp_port = free_port().expect("port");
    let addr = format!("127.0.0.1:{}", otlp_port.port())
        .parse()
        .expect("addr");
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(receiver.clone()))
            .serve(addr),
    );
    let legacy = Upstream::start("legacy").await;
    // Half the users go to a new service nobody listens on: their reads fall back.
    let dead = free_port().expect("port");
    let dead_addr = format!("127.0.0.1:{}", dead.port()).parse().expect("addr");
    let telemetry = format!("[telemetry]\notlp_endpoint = \"http://{addr}\"\nsample_ratio = 0.0\n");
    let router = Router::start(
        &route_config(legacy.addr, dead_addr, &telemetry),
        &[("flags.json", &flags_doc("strangler.orders", true, 50))],
        &[],
    )
    .await;
    let client = reqwest::Client::new();
    let mut unsampled_parents = Vec::new();
    for u in 0..40 {
        let echoed: Value = client
            .get(router.url(&format!("/api/orders/{u}")))
            .header("x-user-id", format!("user-{u}"))
            .send()
            .await
            .expect("request")
            .json()
            .await
            .expect("json");
        // Unsampled requests still carry a traceparent upstream, flagged unsampled.
        let tp = echoed["headers"]["traceparent"]
            .as_str()
            .expect("a traceparent upstream")
            .to_string();
        assert!(tp.starts_with("00-") && tp.ends_with("-00"), "{tp}");
        unsampled_parents.push(tp);
    }
    let sampled_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let r = client
        .get(router.url("/api/orders/sampled"))
        .header("x-user-id", "user-0")
        .header(
            "traceparent",
            format!("00-{sampled_trace}-00f067aa0ba902b7-01"),
        )
        .send()
        .await
        .expect("request");
    assert_eq!(r.status().as_u16(), 200);

    // The router's numbers count every request, whatever was sampled.
    let metrics = router.metrics().await;
    assert_eq!(
        metric_sum(&metrics, "strangler_requests_total", &[r#"route="orders""#]),
        41,
        "{metrics}"
    );
    let fallbacks = metric_sum(
        &metrics,
        "strangler_decisions_total",
        &[r#"route="orders""#, r#"reason="fallback""#],
    );
    assert!(
        fallbacks > 5 && fallbacks < 35,
        "{fallbacks} of 41 fell back at 50 %"
    );

    // Spans: one per fallback and the caller-sampled one, nothing else.
    let expected = usize::try_from(fallbacks).expect("small") + 1;
    let route_spans = |spans: &[Span]| -> Vec<Span> {
        spans
            .iter()
            .filter(|s| attr(s, "strangler.route").as_deref() == Some("orders"))
            .cloned()
            .collect()
    };
    wait_until(Duration::from_secs(10), "the kept spans", || {
        let spans = Arc::clone(&receiver.spans);
        async move { route_spans(&spans.lock().expect("lock")).len() >= expected }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    let spans = route_spans(&receiver.spans.lock().expect("lock"));
    assert_eq!(spans.len(), expected, "{spans:#?}");
    let (caller, fell_back): (Vec<&Span>, Vec<&Span>) = spans
        .iter()
        .partition(|s| hex(&s.trace_id) == sampled_trace);
    assert_eq!(caller.len(), 1);
    for span in fell_back {
        assert_eq!(
            attr(span, "strangler.decision").as_deref(),
            Some("fallback")
        );
        // The late span has the ids the upstream was given, and its real start.
        let tp = format!("00-{}-{}-00", hex(&span.trace_id), hex(&span.span_id));
        assert!(
            unsampled_parents.contains(&tp),
            "{tp} was never sent upstream"
        );
        assert!(span.end_time_unix_nano >= span.start_time_unix_nano);
    }
    server.abort();
}

/// An OTLP metrics receiver that refuses its first export (as a receiver that is
/// down would) and then sums `strangler.requests` per route.
#[derive(Default, Clone)]
struct MetricsReceiver {
    calls: Arc<Mutex<u32>>,
    requests: Arc<Mutex<HashMap<String, i64>>>,
}

impl MetricsReceiver {
    /// Serves this receiver on a free loopback port.
    fn serve(
        &self,
    ) -> (
        std::net::SocketAddr,
        tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
    ) {
        use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::MetricsServiceServer;
        let port = free_port().expect("port");
        let addr = format!("127.0.0.1:{}", port.port()).parse().expect("addr");
        drop(port);
        let server = tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(MetricsServiceServer::new(self.clone()))
                .serve(addr),
        );
        (addr, server)
    }
}

#[tonic::async_trait]
impl opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::MetricsService
    for MetricsReceiver
{
    async fn export(
        &self,
        request: tonic::Request<
            opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest,
        >,
    ) -> Result<
        tonic::Response<
            opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceResponse,
        >,
        tonic::Status,
    > {
        use opentelemetry_proto::tonic::metrics::v1::{metric, number_data_point};
        {
            let mut calls = self.calls.lock().expect("lock");
            *calls += 1;
            if *calls == 1 {
                return Err(tonic::Status::unavailable("not yet"));
            }
        }
        let mut totals = self.requests.lock().expect("lock");
        for rm in request.into_inner().resource_metrics {
            for sm in rm.scope_metrics {
                for m in sm.metrics.iter().filter(|m| m.name == "strangler.requests") {
                    let Some(metric::Data::Sum(sum)) = &m.data else {
                        continue;
                    };
                    for p in &sum.data_points {
                        let route = p
                            .attributes
                            .iter()
                            .find(|kv| kv.key == "strangler.route")
                            .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
                                AnyValue::StringValue(s) => Some(s.clone()),
                                _ => None,
                            })
                            .unwrap_or_default();
                        if let Some(number_data_point::Value::AsInt(n)) = p.value {
                            *totals.entry(route).or_default() += n;
                        }
                    }
                }
            }
        }
        Ok(tonic::Response::new(
            opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceResponse {
                partial_success: None,
            },
        ))
    }
}

#[tokio::test]
async fn route_aggregates_reach_an_otlp_metrics_receiver_as_exact_deltas_even_after_a_refused_export()
 {
    let receiver = MetricsReceiver::default();
    let (addr, server) = receiver.serve();
    let legacy = Upstream::start("legacy").await;
    let new = Upstream::start("new").await;
    let telemetry =
        format!("[telemetry]\nmetrics_endpoint = \"http://{addr}\"\nmetrics_interval_ms = 200\n");
    let router = Router::start(
        &route_config(legacy.addr, new.addr, &telemetry),
        &[("flags.json", &flags_doc("strangler.orders", true, 50))],
        &[],
    )
    .await;
    router
        .get_orders_as_users(25, |u| async move {
            if u == 10 {
                // Let the first (refused) export happen with some counts in it.
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        })
        .await;
    wait_until(
        Duration::from_secs(10),
        "25 requests at the receiver",
        || {
            let totals = Arc::clone(&receiver.requests);
            async move { totals.lock().expect("lock").get("orders").copied() == Some(25) }
        },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(
        receiver
            .requests
            .lock()
            .expect("lock")
            .get("orders")
            .copied(),
        Some(25),
        "no count twice"
    );
    assert!(*receiver.calls.lock().expect("lock") >= 2);
    server.abort();
}

#[tokio::test]
async fn a_graceful_shutdown_exports_the_last_counts() {
    let receiver = MetricsReceiver::default();
    // This receiver takes every export (it refuses only a first call).
    *receiver.calls.lock().expect("lock") = 1;
    let (addr, server) = receiver.serve();
    let legacy = Upstream::start("legacy").await;
    let new = Upstream::start("new").await;
    // An interval no test waits for: only the shutdown export can deliver.
    let telemetry = format!(
        "[telemetry]\nmetrics_endpoint = \"http://{addr}\"\nmetrics_interval_ms = 600000\n"
    );
    let router = Router::start(
        &route_config(legacy.addr, new.addr, &telemetry),
        &[("flags.json", &flags_doc("strangler.orders", true, 50))],
        &[],
    )
    .await;
    router.get_orders_as_users(7, |_| async {}).await;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(router.pid()),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("sigterm");
    // Only the export at shutdown can deliver these (the interval is 10 minutes).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while receiver
        .requests
        .lock()
        .expect("lock")
        .get("orders")
        .copied()
        != Some(7)
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the last counts never arrived: {:?}\n{}",
            receiver.requests.lock().expect("lock"),
            router.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    server.abort();
}

/// `pin = "cookie"`: each session's first answer pins it to its side; while the
/// percentage moves (50 % → 0 %, then 100 %) pinned sessions stay put and new ones
/// follow the flag; an override (what a rollback pushes) moves everyone and re-pins.
#[tokio::test]
async fn pinned_sessions_keep_their_side_while_the_percentage_moves_and_a_rollback_moves_them() {
    let legacy = Upstream::start("legacy").await;
    let new = Upstream::start("new").await;
    let half = flags_doc("strangler.orders", true, 50);
    let config = route_config(
        legacy.addr,
        new.addr,
        "[flags]\nsource = \"file\"\nfile = \"flags.json\"\n",
    ) + "pin = \"cookie\"\npin_ttl_s = 600\n";
    let router = Router::start(&config, &[("flags.json", &half)], &[]).await;
    let client = reqwest::Client::new();
    // Each request: (side, the pin cookie the answer set, if any).
    let ask = |user: String, pin: Option<String>| {
        let client = client.clone();
        let url = router.url("/api/orders/7");
        async move {
            let mut req = client.get(url).header("x-user-id", &user);
            if let Some(pin) = pin {
                req = req.header("cookie", format!("theme=dark; {pin}"));
            }
            let r = req.send().await.expect("request");
            let set = r
                .headers()
                .get("set-cookie")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            let body: Value = r.json().await.expect("json");
            (body["side"].as_str().unwrap_or("?").to_string(), set)
        }
    };
    // First requests at 50 %: every answer pins its side.
    let mut sessions = Vec::new();
    for u in 0..60 {
        let user = format!("user-{u}");
        let (side, set) = ask(user.clone(), None).await;
        let set = set.expect("the first answer sets the pin");
        assert!(
            set.starts_with(&format!("strangler_pin_orders={side};"))
                && set.contains("Max-Age=600")
                && set.contains("HttpOnly"),
            "{set}"
        );
        let cookie = set.split(';').next().unwrap_or_default().to_string();
        sessions.push((user, side, cookie));
    }
    let on_new = sessions.iter().filter(|(_, s, _)| s == "new").count();
    assert!((15..=45).contains(&on_new), "about half on new: {on_new}");

    // 0 %: pinned sessions stay where they were, unpinned ones go to legacy.
    replace_file(
        &router.path("flags.json"),
        &flags_doc("strangler.orders", true, 0),
    );
    wait_until(Duration::from_secs(3), "0 % for new sessions", || {
        let ask = &ask;
        async move { ask("someone-new".into(), None).await.0 == "legacy" }
    })
    .await;
    for (user, side, cookie) in &sessions {
        let (now, set) = ask(user.clone(), Some(cookie.clone())).await;
        assert_eq!(&now, side, "{user} moved while pinned");
        assert_eq!(set, None, "an unchanged pin is not set again");
    }
    // 100 %: the pins still hold (a legacy session finishes on legacy).
    replace_file(
        &router.path("flags.json"),
        &flags_doc("strangler.orders", true, 100),
    );
    wait_until(Duration::from_secs(3), "100 % for new sessions", || {
        let ask = &ask;
        async move { ask("someone-else".into(), None).await.0 == "new" }
    })
    .await;
    for (user, side, cookie) in &sessions {
        assert_eq!(&ask(user.clone(), Some(cookie.clone())).await.0, side);
    }

    // A rollback's override moves every session, pinned or not, and re-pins it.
    let (status, _) = router
        .admin(
            Method::PUT,
            "/routes/orders/override",
            Some(json!({"backend": "legacy"})),
        )
        .await;
    assert_eq!(status, 200);
    for (user, _, cookie) in &sessions {
        let (now, set) = ask(user.clone(), Some(cookie.clone())).await;
        assert_eq!(now, "legacy", "{user} stayed on new past a rollback");
        if cookie.ends_with("=new") {
            assert!(
                set.is_some_and(|s| s.starts_with("strangler_pin_orders=legacy;")),
                "re-pinned to legacy"
            );
        }
    }
}

/// `[server] trusted_testers`: `x-strangler-force: new` from a tester's address
/// reaches the new side at 0 %; from anyone else it is ignored.
#[tokio::test]
async fn a_trusted_tester_reaches_the_new_side_at_zero_percent_and_nobody_else_can() {
    let legacy = Upstream::start("legacy").await;
    let new = Upstream::start("new").await;
    let zero = flags_doc("strangler.orders", true, 0);
    let config = route_config(
        legacy.addr,
        new.addr,
        "[flags]\nsource = \"file\"\nfile = \"flags.json\"\n",
    );
    let client = reqwest::Client::new();
    let side = |router: &Router, force: Option<&'static str>| {
        let mut req = client
            .get(router.url("/api/orders/1"))
            .header("x-user-id", "qa-1");
        if let Some(f) = force {
            req = req.header("x-strangler-force", f);
        }
        async move {
            let body: Value = req
                .send()
                .await
                .expect("request")
                .json()
                .await
                .expect("json");
            body["side"].as_str().unwrap_or("?").to_string()
        }
    };
    let testers = Router::start_server(
        "trusted_testers = [\"127.0.0.1/32\"]",
        &config,
        &[("flags.json", &zero)],
        &[],
    )
    .await;
    assert_eq!(side(&testers, None).await, "legacy");
    assert_eq!(side(&testers, Some("new")).await, "new");
    assert_eq!(side(&testers, Some("sideways")).await, "legacy");
    let others = Router::start_server(
        "trusted_testers = [\"10.9.0.0/16\"]",
        &config,
        &[("flags.json", &zero)],
        &[],
    )
    .await;
    assert_eq!(side(&others, Some("new")).await, "legacy", "not a tester");
}
