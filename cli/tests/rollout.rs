//! `strangler route rollout` against a real router, collector, ClickHouse and Unleash:
//! a healthy new service goes through every step, one that fails once it serves
//! users is rolled back, one that answers differently is held at shadow, and with
//! the collector gone the rollout holds instead of promoting.

mod support;

use std::path::PathBuf;
use std::process::Output;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;
use strangler_testkit::{ClickHouse, Unleash, unleash};
use support::{Collector, Handler, Reply, Router, Upstream, load_paced, strangler_bin, totals};

/// How the new service behaves.
#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum New {
    /// Answers exactly like legacy.
    Healthy = 0,
    /// Answers shadow copies like legacy, but 500 to every request it serves itself.
    FailsWhenServing = 1,
    /// Answers with a different body.
    Differs = 2,
}

fn legacy_handler() -> Handler {
    Arc::new(|parts| Reply {
        status: 200,
        content_type: "application/json",
        body: format!("{{\"path\":\"{}\",\"total\":\"12.30\"}}", parts.uri.path()),
        delay: Duration::ZERO,
    })
}

fn new_handler(mode: New) -> Handler {
    let mode = Arc::new(AtomicU8::new(mode as u8));
    Arc::new(move |parts| {
        let shadow = parts.headers.contains_key("x-strangler-shadow");
        let m = mode.load(Ordering::Relaxed);
        let (status, total) = match m {
            1 if !shadow => (500, "\"12.30\""),
            2 => (200, "12.3"),
            _ => (200, "\"12.30\""),
        };
        Reply {
            status,
            content_type: "application/json",
            body: format!("{{\"path\":\"{}\",\"total\":{total}}}", parts.uri.path()),
            delay: Duration::ZERO,
        }
    })
}

const PLAN: &str = "[route.rollout]\nsteps = [\"shadow\", \"25%\", \"100%\"]\nmin_step_s = 2\nmin_requests = 80\ninterval_s = 1\nsettle_ms = 2500\nmax_step_s = 15\nmax_error_rate_increase = 0.05\nmax_p99_ratio = 3\np99_slack_ms = 50\nmin_match_rate = 0.95\n[[route.rollout.gate]]\nname = \"new-side 404s\"\nsql = \"SELECT countIf(http_status = 404) / greatest(count(), 1) AS value FROM ${database}.spans WHERE route = '${route}' AND backend = 'new' AND $__timeFilter(start_time)\"\nmax = 0.01\n";

/// One stack at a time: each runs ClickHouse, Unleash, a collector and a router
/// under paced load, and four at once on a 2-core machine starve the shadow copies
/// and the upstreams the verdicts are about (seconds-long p99s), which tests the
/// machine rather than the rollout.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

struct Stack {
    _ch: ClickHouse,
    collector: Option<Collector>,
    _unleash: Unleash,
    _legacy: Upstream,
    _new: Upstream,
    router: Router,
    config: PathBuf,
    _dir: tempfile::TempDir,
    // Last: released once everything above is stopped.
    _turn: tokio::sync::MutexGuard<'static, ()>,
}

impl Stack {
    async fn start(mode: New) -> Self {
        let turn = ONE_AT_A_TIME.lock().await;
        let (ch, unleash) = tokio::join!(ClickHouse::start(), Unleash::start());
        let (ch, unleash) = (ch.expect("clickhouse"), unleash.expect("unleash"));
        let collector = Collector::start(&ch.http_url(), "").await;
        collector.wait_ready().await;
        let (legacy, _) = Upstream::start_with(legacy_handler()).await;
        let (new, _) = Upstream::start_with(new_handler(mode)).await;
        let body = format!(
            "[flags]\nsource = \"unleash\"\nurl = \"{}\"\npoll_interval_ms = 200\n\n[telemetry]\notlp_endpoint = \"{}\"\n\n[legacy]\nupstream = \"{}\"\n\n[[route]]\nname = \"orders\"\nmatch = {{ prefix = \"/api/orders\" }}\nsticky = \"header:x-user-id\"\nnew = \"{}\"\n{PLAN}",
            unleash.api_url(),
            collector.grpc_url(),
            legacy.addr,
            new.addr
        );
        let router = Router::start(
            &body,
            &[],
            &[("UNLEASH_CLIENT_TOKEN", unleash::CLIENT_TOKEN)],
        )
        .await;
        let dir = tempfile::tempdir().expect("tempdir");
        let config = dir.path().join("control.toml");
        std::fs::write(
            &config,
            format!(
                "{body}\n[control]\nrouters = [\"{}\"]\ntimeout_ms = 3000\ncollector_url = \"{}\"\n",
                router.admin_url(""),
                collector.web_url("")
            ),
        )
        .expect("write control config");
        Self {
            _ch: ch,
            collector: Some(collector),
            _unleash: unleash,
            _legacy: legacy,
            _new: new,
            router,
            config,
            _dir: dir,
            _turn: turn,
        }
    }

    /// Runs `strangler route rollout orders` under steady traffic; returns its output
    /// and how long it took.
    async fn rollout(&self, extra: &[&str]) -> (Output, Duration) {
        let stop = Arc::new(AtomicBool::new(false));
        // At most 100 requests a second per worker: enough evidence per step without
        // saturating a 2-core machine (which would make every latency and shadow
        // timeout a property of the test, not of the services).
        let loaders = load_paced(
            self.router.url("/api/orders/1"),
            3,
            Arc::clone(&stop),
            Some(Duration::from_millis(10)),
        );
        let started = Instant::now();
        let mut cmd = tokio::process::Command::new(strangler_bin());
        cmd.args(["route", "rollout", "orders", "--config"])
            .arg(&self.config)
            .args(extra)
            .env("STRANGLER_ADMIN_TOKEN", &self.router.token)
            .env("UNLEASH_ADMIN_TOKEN", unleash::ADMIN_TOKEN)
            .env("STRANGLER_ACTOR", "rollout-test")
            .kill_on_drop(true);
        let out = tokio::time::timeout(Duration::from_secs(150), cmd.output())
            .await
            .expect("the rollout ends by itself")
            .expect("run strangler");
        let took = started.elapsed();
        stop.store(true, Ordering::Relaxed);
        let (sent, ok, errors) = totals(loaders).await;
        // Whatever the new service does, users get answers (fallback, rollback).
        assert!(sent > 0);
        assert!(
            errors.len() as u64 <= sent / 100,
            "{} of {sent} requests failed for users ({ok} ok): {:?}",
            errors.len(),
            &errors[..errors.len().min(5)]
        );
        (out, took)
    }

    fn history(&self) -> Vec<Value> {
        let path = self.config.with_file_name("strangler.history.jsonl");
        std::fs::read_to_string(&path)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn moves(history: &[Value]) -> Vec<(String, String)> {
    history
        .iter()
        .map(|e| {
            (
                e["action"].as_str().unwrap_or("").to_string(),
                match e["to"]["state"].as_str().unwrap_or("") {
                    "canary" => format!("canary {}", e["to"]["percent"]),
                    s => s.to_string(),
                },
            )
        })
        .collect()
}

#[tokio::test]
async fn a_healthy_new_service_goes_through_every_step() {
    let stack = Stack::start(New::Healthy).await;
    let (out, took) = stack.rollout(&[]).await;
    let log = text(&out);
    assert_eq!(out.status.code(), Some(0), "{log}");
    assert!(log.contains("rollout complete at 100%"), "{log}");
    let history = stack.history();
    assert_eq!(
        moves(&history),
        vec![
            ("rollout start".to_string(), "shadow".to_string()),
            ("rollout advance".to_string(), "canary 25".to_string()),
            ("rollout advance".to_string(), "new".to_string()),
        ],
        "{log}"
    );
    // Every advance carries the evidence it was decided on.
    for e in &history[1..] {
        assert_eq!(e["evidence"]["decision"], "advance", "{e}");
        assert!(e["evidence"]["evidence"]["new"]["served"].is_u64(), "{e}");
    }
    println!("healthy rollout through 3 steps took {took:?}");
}

#[tokio::test]
async fn a_new_service_failing_at_25_percent_is_rolled_back_within_an_interval() {
    let stack = Stack::start(New::FailsWhenServing).await;
    let (out, _) = stack.rollout(&[]).await;
    let log = text(&out);
    assert_eq!(out.status.code(), Some(1), "{log}");
    let history = stack.history();
    let m = moves(&history);
    assert_eq!(
        m,
        vec![
            ("rollout start".to_string(), "shadow".to_string()),
            ("rollout advance".to_string(), "canary 25".to_string()),
            ("rollout rollback".to_string(), "legacy".to_string()),
        ],
        "{log}"
    );
    let rollback = &history[2];
    let reason = rollback["reason"].as_str().unwrap_or("");
    assert!(
        reason.starts_with("at 25%: error rate failed"),
        "the history says why: {rollback}"
    );
    assert_eq!(rollback["evidence"]["decision"], "rollback");
    assert!(rollback["evidence"]["evidence"]["new"]["errors"].as_u64() > Some(0));
    // From the step's first evaluation to the rollback: at most one interval (1 s)
    // after the settle time, plus the evidence's trip through the collector.
    let at = |e: &Value| humantime::parse_rfc3339(e["at"].as_str().unwrap_or("")).expect("time");
    let step = at(&history[1]);
    let back = at(rollback);
    let waited = back.duration_since(step).unwrap_or_default();
    assert!(
        waited <= Duration::from_millis(2_500 + 1_000 + 3_000),
        "rolled back {waited:?} after the step began:\n{log}"
    );
    // The route really is back on legacy at the router.
    let client = reqwest::Client::new();
    for user in 0..20 {
        let r = client
            .get(stack.router.url("/api/orders/2"))
            .header("x-user-id", format!("after-{user}"))
            .send()
            .await
            .expect("request");
        assert_eq!(r.status().as_u16(), 200);
    }
    let status: Value = client
        .get(stack.router.admin_url("/routes/orders"))
        .bearer_auth(&stack.router.token)
        .send()
        .await
        .expect("status")
        .json()
        .await
        .expect("json");
    assert_eq!(status["override"], "legacy", "{status}");
}

#[tokio::test]
async fn a_new_service_whose_answers_differ_is_held_at_shadow() {
    let stack = Stack::start(New::Differs).await;
    let (out, _) = stack.rollout(&[]).await;
    let log = text(&out);
    assert_eq!(out.status.code(), Some(2), "{log}");
    assert!(log.contains("answers match failed"), "{log}");
    assert!(log.contains("held at shadow"), "{log}");
    assert_eq!(
        moves(&stack.history()),
        vec![("rollout start".to_string(), "shadow".to_string())],
        "{log}"
    );
}

#[tokio::test]
async fn with_the_collector_down_the_rollout_holds_and_never_promotes() {
    let mut stack = Stack::start(New::Healthy).await;
    // A dry run reports without changing anything.
    let (out, _) = stack.rollout(&["--dry-run"]).await;
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("dry run"), "{}", text(&out));
    assert!(stack.history().is_empty());

    drop(stack.collector.take());
    let (out, _) = stack.rollout(&[]).await;
    let log = text(&out);
    assert_eq!(out.status.code(), Some(2), "{log}");
    assert!(log.contains("cannot read evidence"), "{log}");
    assert!(log.contains("no evidence could be read"), "{log}");
    assert_eq!(
        moves(&stack.history()),
        vec![("rollout start".to_string(), "shadow".to_string())],
        "{log}"
    );
}
