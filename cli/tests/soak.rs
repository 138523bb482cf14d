//! Soak under combined faults (#23): the example's stack as separate processes — the
//! legacy shop and the orders service on their own PostgreSQL clusters, CDC both
//! ways, two routers reading their flags from a real Unleash, the collector and
//! ClickHouse — under paced customer traffic through both routers, while a seeded
//! schedule injects a fault every few seconds:
//! - SIGKILL and restart of a router, the orders service, the legacy shop, a CDC
//!   direction, the collector or Unleash;
//! - a restart of either PostgreSQL or of ClickHouse;
//! - a stall (SIGSTOP, then SIGCONT a few seconds later) of the orders service or
//!   of a whole database (the postmaster and every backend);
//! - a compound one: a rollback while Unleash is down (it reaches only the
//!   routers' overrides), and a router restarted before Unleash is back;
//! - a route move from the CLI (canary, promote, rollback, restore), or a rollout
//!   controller (`strangler route rollout`) started to drive the route through its
//!   plan on the collector's evidence, rolling back on a failing gate and stopping
//!   when an operator moves the route under it.
//!
//! The generator is a client that, like a load balancer, tries the other router
//! when one does not answer: a read when its connection fails or breaks (safe to
//! send twice), a write only when the connection was refused (never sent). It logs
//! each request's outcome, and the checker then requires:
//! - **writes**: every order acknowledged to the generator exists in both databases
//!   once CDC caught up, and `strangler cdc verify` is clean;
//! - **reads**: no read failed outside the legacy side's own outages (the shop or
//!   its database down: nothing can serve them then); failures are printed by the
//!   fault they fell in and by kind;
//! - **telemetry**: the requests the collector counts (the routers export per-route
//!   aggregates every second, delta against what the collector acknowledged) are no
//!   more than the routers were sent, and no fewer than they answered minus those a
//!   SIGKILLed router answered in its last, unacknowledged export window;
//! - **routing**: no request served by the new side after a rollback returned (the
//!   CLI's, when the command exits; a controller's, when its history entry is
//!   written) and before the next forward move began (a CLI move's start, a
//!   controller's start); both routers agree for every user at the end;
//! - it prints RSS of the routers, the collector and CDC per process instance (a
//!   restart starts a new one): first and last sample of the longest-lived.
//!
//! `SOAK_SECONDS` (default 60 here) and `SOAK_SEED` (default 3 here) set the run;
//! `bench/soak.sh` runs it longer in release mode.

mod support;

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use strangler_testkit::{ClickHouse, Postgres, Unleash, free_port, unleash};
use support::strangler_bin;

const TOKEN: &str = "soak-admin-token";
const CDC: &str = include_str!("../../examples/legacy-monolith/cdc.toml");
const CDC_REVERSE: &str = include_str!("../../examples/legacy-monolith/cdc-reverse.toml");
/// The routers export their aggregates this often.
const METRICS_INTERVAL: Duration = Duration::from_secs(1);
/// The rollout controller's plan: short steps, gates loose enough that only a
/// failing new side (killed, stalled) rolls it back.
const PLAN: &str = "[route.rollout]\nsteps = [\"25%\", \"50%\", \"100%\"]\nmin_step_s = 2\nmin_requests = 20\ninterval_s = 1\nsettle_ms = 1000\nmax_step_s = 30\nmax_error_rate_increase = 0.2\nmax_p99_ratio = 10\np99_slack_ms = 500\n";
/// The actor the controller records its moves as.
const CONTROLLER: &str = "soak-rollout";

fn addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port().expect("port").port()))
}

fn bin(name: &str) -> PathBuf {
    let path = Path::new(strangler_bin()).with_file_name(name);
    assert!(
        path.exists(),
        "{} is missing: build the example's binaries (cargo build -p strangler-example)",
        path.display()
    );
    path
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// One restartable process of the stack.
struct Proc {
    name: &'static str,
    program: PathBuf,
    args: Vec<String>,
    env: Vec<(&'static str, String)>,
    log: PathBuf,
    child: Option<Child>,
    /// Starts so far (a restart begins a new instance).
    instance: u32,
    /// RSS samples, KiB, by instance.
    rss: Vec<(u32, u64)>,
}

impl Proc {
    fn new(name: &'static str, program: PathBuf, args: &[&str], dir: &Path) -> Self {
        Self {
            name,
            program,
            args: args.iter().map(|s| s.to_string()).collect(),
            env: Vec::new(),
            log: dir.join(format!("{name}.log")),
            child: None,
            instance: 0,
            rss: Vec::new(),
        }
    }

    fn start(&mut self) {
        let log = std::fs::File::options()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log");
        self.instance += 1;
        self.child = Some(
            Command::new(&self.program)
                .args(&self.args)
                .env("STRANGLER_ADMIN_TOKEN", TOKEN)
                .env("UNLEASH_CLIENT_TOKEN", unleash::CLIENT_TOKEN)
                .env("UNLEASH_ADMIN_TOKEN", unleash::ADMIN_TOKEN)
                .env("STRANGLER_LOG", "warn")
                .envs(self.env.iter().map(|(k, v)| (*k, v.as_str())))
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("log"))
                .stderr(log)
                .spawn()
                .unwrap_or_else(|e| panic!("{}: {e}", self.name)),
        );
    }

    fn pid(&self) -> Option<Pid> {
        self.child
            .as_ref()
            .and_then(|c| i32::try_from(c.id()).ok())
            .map(Pid::from_raw)
    }

    fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    fn signal(&self, signal: Signal) {
        if let Some(pid) = self.pid() {
            let _ = kill(pid, signal);
        }
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn sample_rss(&mut self) {
        if let Some(c) = &self.child {
            let kib = rss_kib(c.id());
            if kib > 0 {
                self.rss.push((self.instance, kib));
            }
        }
    }

    /// `NAME: instance I of N, first → last KiB over S samples`, for the instance
    /// with the most samples.
    fn rss_report(&self) -> String {
        let mut best: Option<(u32, usize)> = None;
        for i in 1..=self.instance {
            let n = self.rss.iter().filter(|(j, _)| *j == i).count();
            if best.is_none_or(|(_, m)| n > m) {
                best = Some((i, n));
            }
        }
        let Some((i, n)) = best else {
            return format!("{}: no samples", self.name);
        };
        let mine: Vec<u64> = self
            .rss
            .iter()
            .filter(|(j, _)| *j == i)
            .map(|(_, k)| *k)
            .collect();
        format!(
            "{}: instance {i} of {} — {} KiB -> {} KiB over {n} samples (max {} KiB)",
            self.name,
            self.instance,
            mine.first().copied().unwrap_or(0),
            mine.last().copied().unwrap_or(0),
            mine.iter().max().copied().unwrap_or(0)
        )
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.signal(Signal::SIGCONT);
        self.kill();
    }
}

/// A process and its children (a PostgreSQL postmaster and its backends), from /proc.
fn process_tree(root: u32) -> Vec<Pid> {
    let mut tree = vec![root];
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for e in entries.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            // Field 4 of /proc/PID/stat, after the parenthesised command name.
            let ppid = std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| {
                    s.rsplit_once(')')
                        .and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok())
                });
            if ppid == Some(root) {
                tree.push(pid);
            }
        }
    }
    tree.into_iter()
        .filter_map(|p| i32::try_from(p).ok())
        .map(Pid::from_raw)
        .collect()
}

async fn wait_http(url: &str, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !reqwest::get(url)
        .await
        .is_ok_and(|r| r.status().is_success())
    {
        assert!(Instant::now() < deadline, "{what} never answered {url}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One request the generator made.
#[derive(Debug, Clone)]
struct Outcome {
    at: Instant,
    done: Instant,
    write: bool,
    /// `Some(side)` when answered 2xx (the `x-served-by` header), else `None`.
    served_by: Option<String>,
    error: Option<String>,
    /// The router that answered (any status).
    answered_by: Option<usize>,
    /// Routers that may have counted it without answering (a broken connection or
    /// a timeout after the request was sent).
    maybe_counted_by: Vec<usize>,
}

/// A fault: when it began and ended, and what it was.
#[derive(Debug, Clone)]
struct Fault {
    began: Instant,
    ended: Instant,
    kind: String,
}

fn cli(dir: &Path, args: &[&str]) -> std::process::Output {
    Command::new(strangler_bin())
        .args(args)
        .current_dir(dir)
        .env("STRANGLER_ADMIN_TOKEN", TOKEN)
        .env("UNLEASH_ADMIN_TOKEN", unleash::ADMIN_TOKEN)
        .env("STRANGLER_ACTOR", "soak")
        .stdin(Stdio::null())
        .output()
        .expect("strangler")
}

/// The route's history entries, as `strangler route history -o json` prints them.
fn history(dir: &Path) -> Vec<Value> {
    let out = cli(
        dir,
        &[
            "route",
            "--config",
            "strangler.toml",
            "history",
            "orders",
            "-o",
            "json",
        ],
    );
    serde_json::from_slice(&out.stdout).unwrap_or_default()
}

/// Requests the collector counts for the route (served, not shadow copies), read
/// from ClickHouse.
async fn collector_count(ch_url: &str) -> Option<u64> {
    let text = reqwest::Client::new()
        .post(ch_url)
        .body("SELECT sum(requests) FROM strangler.route_stats WHERE route = 'orders' AND shadow = 0 FORMAT TabSeparated")
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    text.trim().parse().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stack_under_a_fault_every_few_seconds_loses_no_order_and_honours_every_rollback() {
    let seconds: u64 = std::env::var("SOAK_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    // Seed 3's first minute draws a router, Unleash and shop kill, the compound
    // rollback, a controller, a restore and a database stall.
    let seed: u64 = std::env::var("SOAK_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let dir = tempfile::tempdir().expect("dir");
    let d = dir.path();
    // History entries carry wall-clock times; requests carry Instants.
    let (epoch_instant, epoch_wall) = (Instant::now(), SystemTime::now());
    let instant_of = |wall: SystemTime| -> Instant {
        match wall.duration_since(epoch_wall) {
            Ok(after) => epoch_instant + after,
            Err(e) => epoch_instant
                .checked_sub(e.duration())
                .unwrap_or(epoch_instant),
        }
    };

    // Databases, ClickHouse, Unleash.
    let (legacy_pg, orders_pg, ch, flags) = tokio::join!(
        Postgres::start(),
        Postgres::start(),
        ClickHouse::start(),
        Unleash::start()
    );
    let (mut legacy_pg, mut orders_pg, mut ch, mut flags) = (
        legacy_pg.expect("pg"),
        orders_pg.expect("pg"),
        ch.expect("clickhouse"),
        flags.expect("unleash"),
    );
    legacy_pg.create_database("legacy").await.expect("db");
    orders_pg.create_database("orders").await.expect("db");
    let (legacy_url, orders_url) = (legacy_pg.url("legacy"), orders_pg.url("orders"));

    // The shop and the orders service.
    let (shop_at, orders_at) = (addr(), addr());
    let mut shop = Proc::new(
        "legacy-shop",
        bin("legacy-shop"),
        &[
            "--db",
            &legacy_url,
            "--listen",
            &shop_at.to_string(),
            "--seed",
        ],
        d,
    );
    shop.start();
    let mut orders = Proc::new(
        "orders-service",
        bin("orders-service"),
        &[
            "--db",
            &orders_url,
            "--listen",
            &orders_at.to_string(),
            "--compat",
        ],
        d,
    );
    orders.start();
    wait_http(&format!("http://{shop_at}/health"), "the shop").await;
    wait_http(&format!("http://{orders_at}/health"), "the orders service").await;

    // CDC both ways.
    let fill = |t: &str| {
        t.replace("postgres://postgres@127.0.0.1:5433/legacy", &legacy_url)
            .replace("postgres://postgres@127.0.0.1:5434/orders", &orders_url)
    };
    std::fs::write(d.join("cdc.toml"), fill(CDC)).expect("cdc config");
    std::fs::write(d.join("cdc-reverse.toml"), fill(CDC_REVERSE)).expect("cdc config");
    let strangler = PathBuf::from(strangler_bin());
    let mut forward = Proc::new(
        "cdc-forward",
        strangler.clone(),
        &[
            "cdc",
            "run",
            "--config",
            &d.join("cdc.toml").display().to_string(),
        ],
        d,
    );
    forward.start();
    let orders_db = orders_pg.connect("orders").await.expect("orders db");
    let deadline = Instant::now() + Duration::from_secs(90);
    while orders_db
        .query_one("SELECT count(*) FROM strangler.cdc_checkpoint", &[])
        .await
        .map_or(0, |r| r.get::<_, i64>(0))
        < 1
    {
        assert!(
            Instant::now() < deadline,
            "the forward snapshot did not finish"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut reverse = Proc::new(
        "cdc-reverse",
        strangler.clone(),
        &[
            "cdc",
            "run",
            "--config",
            &d.join("cdc-reverse.toml").display().to_string(),
        ],
        d,
    );
    reverse.start();

    // The collector.
    let (grpc, http, web) = (addr(), addr(), addr());
    std::fs::write(
        d.join("collector.toml"),
        format!(
            "grpc_listen = \"{grpc}\"\nhttp_listen = \"{http}\"\nweb_listen = \"{web}\"\nclickhouse_url = \"{}\"\n",
            ch.http_url()
        ),
    )
    .expect("collector config");
    let mut collector = Proc::new(
        "collector",
        strangler.clone(),
        &[
            "collector",
            "run",
            "--config",
            &d.join("collector.toml").display().to_string(),
        ],
        d,
    );
    collector.start();
    wait_http(&format!("http://{web}/ready"), "the collector").await;

    // Two routers on Unleash, and the operators' config naming both.
    let route = format!(
        "[[route]]\nname = \"orders\"\nmatch = {{ prefix = \"/api/orders\" }}\nnew = \"{orders_at}\"\nsticky = \"header:x-user-id\"\nhealth_path = \"/health\"\n"
    );
    let flags_section = format!(
        "[flags]\nsource = \"unleash\"\nurl = \"{}\"\npoll_interval_ms = 200\n",
        flags.api_url()
    );
    let mut routers = Vec::new();
    let mut router_urls = Vec::new();
    let mut admin_urls = Vec::new();
    for i in 0..2 {
        let (listen, admin) = (addr(), addr());
        let file = d.join(format!("router-{i}.toml"));
        std::fs::write(
            &file,
            format!(
                "[server]\nlisten = \"{listen}\"\n[legacy]\nupstream = \"{shop_at}\"\n{flags_section}[admin]\nlisten = \"{admin}\"\n\
                 [telemetry]\notlp_endpoint = \"http://{grpc}\"\nmetrics_endpoint = \"http://{grpc}\"\nmetrics_interval_ms = {}\n\n{route}",
                METRICS_INTERVAL.as_millis()
            ),
        )
        .expect("router config");
        let mut p = Proc::new(
            if i == 0 { "router-0" } else { "router-1" },
            strangler.clone(),
            &["router", "run", "--config", &file.display().to_string()],
            d,
        );
        p.start();
        routers.push(p);
        router_urls.push(format!("http://{listen}"));
        admin_urls.push(format!("http://{admin}"));
    }
    for a in &admin_urls {
        wait_http(&format!("{a}/ready"), "a router").await;
    }
    std::fs::write(
        d.join("strangler.toml"),
        format!(
            "{flags_section}[control]\nrouters = [{}]\ncollector_url = \"http://{web}\"\n[telemetry]\notlp_endpoint = \"http://{grpc}\"\n[legacy]\nupstream = \"{shop_at}\"\n\n{route}{PLAN}",
            admin_urls
                .iter()
                .map(|u| format!("\"{u}\""))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    )
    .expect("operators' config");
    let mut controller = Proc::new(
        "rollout-controller",
        strangler.clone(),
        &[
            "route",
            "--config",
            &d.join("strangler.toml").display().to_string(),
            "rollout",
            "orders",
        ],
        d,
    );
    controller.env.push(("STRANGLER_ACTOR", CONTROLLER.into()));

    // Paced traffic: 4 customers at a time, reads and (one in five) order writes.
    let outcomes: Arc<Mutex<Vec<Outcome>>> = Arc::default();
    let acked_orders: Arc<Mutex<Vec<i64>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    for worker in 0..4u64 {
        let (outcomes, acked, stop, urls) = (
            Arc::clone(&outcomes),
            Arc::clone(&acked_orders),
            Arc::clone(&stop),
            router_urls.clone(),
        );
        workers.push(tokio::spawn(async move {
            let client = reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .build()
                .expect("client");
            let mut n = worker;
            while !stop.load(Ordering::Relaxed) {
                n += 4;
                let user = n % 40 + 1;
                let write = n % 5 == 0;
                // A load balancer: this request's router first, the other if it
                // does not answer at all (a refused connection, not an error reply).
                let first = usize::from(n % 2 == 1);
                let mut outcome = Outcome {
                    at: Instant::now(),
                    done: Instant::now(),
                    write,
                    served_by: None,
                    error: None,
                    answered_by: None,
                    maybe_counted_by: Vec::new(),
                };
                for attempt in 0..2 {
                    let router = (first + attempt) % 2;
                    let base = &urls[router];
                    let request = if write {
                        client
                            .post(format!("{base}/api/orders"))
                            .json(&json!({"customer_id": user, "items": [{"product_id": n % 20 + 1, "qty": 1}]}))
                    } else {
                        client.get(format!("{base}/api/orders?customer_id={user}"))
                    };
                    match request.header("x-user-id", user.to_string()).send().await {
                        Ok(r) => {
                            outcome.answered_by = Some(router);
                            let side = r
                                .headers()
                                .get("x-served-by")
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or("")
                                .to_string();
                            if r.status().is_success() {
                                if write {
                                    let body: Value = r.json().await.unwrap_or_default();
                                    if let Some(id) = body["id"].as_i64()
                                            && let Ok(mut a) = acked.lock()
                                    {
                                        a.push(id);
                                    }
                                }
                                outcome.served_by = Some(side);
                                outcome.error = None;
                            } else {
                                outcome.error = Some(format!("{} from {side}", r.status()));
                            }
                            break;
                        }
                        // As a load balancer: a refused connection for any request,
                        // a broken one for a read (safe to send twice).
                        Err(e) if attempt == 0 && (e.is_connect() || !write) => {
                            if !e.is_connect() {
                                outcome.maybe_counted_by.push(router);
                            }
                            outcome.error = Some(format!("{e}"));
                        }
                        Err(e) => {
                            if !e.is_connect() {
                                outcome.maybe_counted_by.push(router);
                            }
                            outcome.error = Some(e.to_string());
                            break;
                        }
                    }
                }
                outcome.done = Instant::now();
                if let Ok(mut o) = outcomes.lock() {
                    o.push(outcome);
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
        }));
    }

    // The fault schedule.
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let started = Instant::now();
    let mut faults: Vec<Fault> = Vec::new();
    // Rollbacks that returned, and the moments a forward move could begin.
    let mut rollbacks_returned: Vec<Instant> = Vec::new();
    let mut forward_begins: Vec<Instant> = Vec::new();
    // SIGKILLs of each router, and when the collector was away.
    let mut router_kills: Vec<(usize, Instant)> = Vec::new();
    let mut collector_away: Vec<(Instant, Instant)> = Vec::new();
    while started.elapsed() < Duration::from_secs(seconds) {
        tokio::time::sleep(Duration::from_millis(rng.random_range(2_000..5_000))).await;
        for p in routers
            .iter_mut()
            .chain([&mut collector, &mut forward, &mut reverse])
        {
            p.sample_rss();
        }
        let began = Instant::now();
        let kind = match rng.random_range(0..17) {
            0 => {
                let i = rng.random_range(0..2);
                routers[i].kill();
                router_kills.push((i, Instant::now()));
                tokio::time::sleep(Duration::from_millis(1_000)).await;
                routers[i].start();
                wait_http(&format!("{}/ready", admin_urls[i]), "a restarted router").await;
                format!("kill router-{i}")
            }
            1 => {
                orders.kill();
                tokio::time::sleep(Duration::from_millis(1_000)).await;
                orders.start();
                "kill orders-service".into()
            }
            2 => {
                shop.kill();
                tokio::time::sleep(Duration::from_millis(500)).await;
                shop.start();
                "kill legacy-shop".into()
            }
            3 => {
                let p = if rng.random_bool(0.5) {
                    &mut forward
                } else {
                    &mut reverse
                };
                p.kill();
                tokio::time::sleep(Duration::from_millis(1_000)).await;
                p.start();
                format!("kill {}", p.name)
            }
            4 => {
                collector.kill();
                tokio::time::sleep(Duration::from_millis(1_000)).await;
                collector.start();
                wait_http(&format!("http://{web}/ready"), "the restarted collector").await;
                collector_away.push((began, Instant::now()));
                "kill collector".into()
            }
            5 => {
                flags.kill();
                tokio::time::sleep(Duration::from_millis(1_000)).await;
                flags.restart().await.expect("Unleash back");
                "kill unleash".into()
            }
            6 => {
                ch.restart().await.expect("ClickHouse back");
                "restart clickhouse".into()
            }
            7 => {
                if rng.random_bool(0.5) {
                    legacy_pg.restart().await.expect("legacy PostgreSQL back");
                    "restart postgres-legacy".into()
                } else {
                    orders_pg.restart().await.expect("orders PostgreSQL back");
                    "restart postgres-orders".into()
                }
            }
            8 => {
                orders.signal(Signal::SIGSTOP);
                tokio::time::sleep(Duration::from_millis(rng.random_range(1_000..3_000))).await;
                orders.signal(Signal::SIGCONT);
                "stall orders-service".into()
            }
            9 => {
                let (pg, name) = if rng.random_bool(0.5) {
                    (&legacy_pg, "postgres-legacy")
                } else {
                    (&orders_pg, "postgres-orders")
                };
                let tree = pg.pid().map(process_tree).unwrap_or_default();
                for p in &tree {
                    let _ = kill(*p, Signal::SIGSTOP);
                }
                tokio::time::sleep(Duration::from_millis(rng.random_range(1_000..3_000))).await;
                for p in &tree {
                    let _ = kill(*p, Signal::SIGCONT);
                }
                format!("stall {name}")
            }
            11 => {
                // Compound: a rollback while Unleash is down reaches only the
                // routers (exit 2); a router restarts before Unleash is back and
                // must keep the rollback (its overrides file), not follow the
                // stale flags once Unleash answers again.
                flags.kill();
                let out = cli(
                    d,
                    &["route", "--config", "strangler.toml", "rollback", "orders"],
                );
                let code = out.status.code();
                if matches!(code, Some(0 | 2)) {
                    rollbacks_returned.push(Instant::now());
                }
                let i = rng.random_range(0..2);
                routers[i].kill();
                router_kills.push((i, Instant::now()));
                tokio::time::sleep(Duration::from_millis(500)).await;
                routers[i].start();
                // Not ready without flags; alive is enough here.
                wait_http(&format!("{}/health", admin_urls[i]), "a restarted router").await;
                tokio::time::sleep(Duration::from_millis(1_000)).await;
                flags.restart().await.expect("Unleash back");
                wait_http(&format!("{}/ready", admin_urls[i]), "a restarted router").await;
                format!(
                    "rollback-unleash-down (exit {}, router-{i} restarted)",
                    code.map_or("signal".into(), |c| c.to_string())
                )
            }
            10 => {
                if controller.running() {
                    "rollout controller (already running)".into()
                } else {
                    forward_begins.push(Instant::now());
                    controller.start();
                    "rollout controller (started)".into()
                }
            }
            _ => {
                let mut args: Vec<String> = match rng.random_range(0..10) {
                    0..3 => vec!["rollback".into(), "orders".into()],
                    3 => vec!["canary".into(), "orders".into(), "25".into()],
                    4 => vec!["canary".into(), "orders".into(), "50".into()],
                    5 | 6 => vec!["promote".into(), "orders".into()],
                    _ => {
                        // Back to a state recorded earlier (any entry of the route).
                        let entries = history(d);
                        if entries.is_empty() {
                            vec!["rollback".into(), "orders".into()]
                        } else {
                            let e = &entries[rng.random_range(0..entries.len())];
                            vec![
                                "restore".into(),
                                "orders".into(),
                                "--to".into(),
                                e["number"].as_u64().unwrap_or(1).to_string(),
                                format!("({})", e["to"]["state"].as_str().unwrap_or("?")),
                            ]
                        }
                    }
                };
                // A restore's target state, for the checker (not an argument).
                let target = if args[0] == "restore" {
                    args.pop().unwrap_or_default()
                } else {
                    String::new()
                };
                let to_legacy = args[0] == "rollback" || target == "(legacy)";
                if !to_legacy {
                    forward_begins.push(Instant::now());
                }
                let mut all: Vec<&str> = vec!["route", "--config", "strangler.toml"];
                all.extend(args.iter().map(String::as_str));
                all.push("--yes");
                let out = cli(d, &all);
                // 0: done; 2: took effect in part (a router or Unleash did not
                // confirm) — a rollback's overrides still hold on every router that
                // answered; 1: nothing changed.
                let code = out.status.code();
                if to_legacy && matches!(code, Some(0 | 2)) {
                    rollbacks_returned.push(Instant::now());
                }
                format!(
                    "route {}{} (exit {})",
                    args.join(" "),
                    if target.is_empty() {
                        String::new()
                    } else {
                        format!(" {target}")
                    },
                    code.map_or("signal".into(), |c| c.to_string())
                )
            }
        };
        faults.push(Fault {
            began,
            ended: Instant::now(),
            kind,
        });
    }
    // End on legacy, everything running.
    let out = cli(
        d,
        &["route", "--config", "strangler.toml", "rollback", "orders"],
    );
    assert!(out.status.success(), "final rollback: {out:?}");
    rollbacks_returned.push(Instant::now());
    // The controller, if it runs, sees the rollback and stops.
    let deadline = Instant::now() + Duration::from_secs(10);
    while controller.running() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let controller_left_running = controller.running();
    controller.kill();
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        let _ = w.await;
    }
    for p in routers
        .iter_mut()
        .chain([&mut collector, &mut forward, &mut reverse])
    {
        p.sample_rss();
    }

    // Writes: every acknowledged order in both databases once CDC caught up.
    let acked: Vec<i64> = acked_orders.lock().expect("lock").clone();
    let legacy_db = legacy_pg.connect("legacy").await.expect("legacy db");
    // The databases may have restarted since: a fresh connection.
    let orders_db = orders_pg.connect("orders").await.expect("orders db");
    let deadline = Instant::now() + Duration::from_secs(120);
    let (mut missing_legacy, mut missing_orders);
    loop {
        let present = async |db: &tokio_postgres::Client, table: &str| -> HashSet<i64> {
            db.query(
                &format!("SELECT id FROM {table} WHERE id = ANY($1)"),
                &[&acked],
            )
            .await
            .map(|rows| rows.iter().map(|r| r.get::<_, i64>(0)).collect())
            .unwrap_or_default()
        };
        let (l, o) = (
            present(&legacy_db, "orders").await,
            present(&orders_db, "orders_v2").await,
        );
        missing_legacy = acked.iter().filter(|id| !l.contains(id)).count();
        missing_orders = acked.iter().filter(|id| !o.contains(id)).count();
        if (missing_legacy == 0 && missing_orders == 0) || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let verify = cli(d, &["cdc", "verify", "--config", "cdc.toml"]);

    // Reads: each failure by the fault it fell in (or the latest before it).
    let outcomes = outcomes.lock().expect("lock").clone();
    let mut failed_by_fault: BTreeMap<String, u64> = BTreeMap::new();
    let mut samples: BTreeMap<String, String> = BTreeMap::new();
    for o in outcomes.iter().filter(|o| o.error.is_some()) {
        let cause = faults.iter().rev().find(|f| f.began <= o.done).map_or(
            "(before any fault)".to_string(),
            |f| {
                let mut words = f.kind.split(" (").next().unwrap_or(&f.kind).split(' ');
                let (a, b) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
                let settled = o.at > f.ended + Duration::from_secs(5);
                format!("{a} {b}{}", if settled { " (5 s after)" } else { "" })
            },
        );
        let cause = format!("{cause}, {}", if o.write { "write" } else { "read" });
        samples
            .entry(cause.clone())
            .or_insert_with(|| o.error.clone().unwrap_or_default());
        *failed_by_fault.entry(cause).or_default() += 1;
    }

    // Routing: the controller's rollbacks, from the history (second resolution:
    // taken as returned at the end of the recorded second).
    let entries = history(d);
    let mut controller_moves: BTreeMap<String, u64> = BTreeMap::new();
    for e in entries.iter().filter(|e| e["actor"] == CONTROLLER) {
        let action = e["action"].as_str().unwrap_or("?").to_string();
        *controller_moves.entry(action).or_default() += 1;
        if e["to"]["state"] == "legacy"
            && let Some(at) = e["at"]
                .as_str()
                .and_then(|t| humantime::parse_rfc3339(t).ok())
        {
            rollbacks_returned.push(instant_of(at) + Duration::from_secs(1));
        }
    }
    // Served by the new side after a rollback returned, before the next forward move.
    let mut after_rollback = 0;
    let mut after_rollback_samples = Vec::new();
    for returned in &rollbacks_returned {
        let until = forward_begins.iter().filter(|f| *f > returned).min();
        for o in outcomes
            .iter()
            .filter(|o| o.at > *returned && until.is_none_or(|u| o.at < *u))
            .filter(|o| o.served_by.as_deref() == Some("orders-service"))
        {
            after_rollback += 1;
            if after_rollback_samples.len() < 5 {
                after_rollback_samples.push(format!(
                    "{:.1} s into the run, {:.1} s after a rollback returned",
                    o.at.duration_since(started).as_secs_f64(),
                    o.at.duration_since(*returned).as_secs_f64()
                ));
            }
        }
    }
    // Both routers agree for every user at the end (these requests count too).
    let client = reqwest::Client::new();
    let mut disagree = 0;
    let mut probes_answered = [0u64; 2];
    for user in 1..=40 {
        let mut sides = Vec::new();
        for (i, base) in router_urls.iter().enumerate() {
            let side = client
                .get(format!("{base}/api/orders?customer_id={user}"))
                .header("x-user-id", user.to_string())
                .send()
                .await
                .ok()
                .map(|r| {
                    probes_answered[i] += 1;
                    r.headers()
                        .get("x-served-by")
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_string)
                });
            sides.push(side.flatten());
        }
        disagree += usize::from(sides[0] != sides[1]);
    }

    // Telemetry: what the routers answered, less what a SIGKILLed router answered
    // in its last export window (from the last acknowledged export, at most an
    // interval and the export itself before the kill, or since the collector came
    // back), must all be counted; nothing beyond what the routers were sent.
    let answered: u64 = outcomes.iter().filter(|o| o.answered_by.is_some()).count() as u64
        + probes_answered.iter().sum::<u64>();
    let reached = answered
        + outcomes
            .iter()
            .map(|o| o.maybe_counted_by.len() as u64)
            .sum::<u64>();
    let at_risk = outcomes
        .iter()
        .filter(|o| {
            o.answered_by.is_some_and(|r| {
                router_kills.iter().any(|(i, killed)| {
                    let mut from = killed.checked_sub(METRICS_INTERVAL * 3).unwrap_or(*killed);
                    for (away, back) in &collector_away {
                        if *back >= from && *away <= *killed {
                            from = from.min(*away);
                        }
                    }
                    *i == r && o.done >= from && o.done <= *killed
                })
            })
        })
        .count() as u64;
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut counted = None;
    let mut last_change = Instant::now();
    loop {
        let now = collector_count(&ch.http_url()).await;
        if now != counted {
            counted = now;
            last_change = Instant::now();
        }
        let n = counted.unwrap_or(0);
        // Settled: everything answered is in, or nothing new for a few export intervals.
        if n >= answered
            || (n >= answered.saturating_sub(at_risk)
                && last_change.elapsed() > METRICS_INTERVAL * 5)
            || Instant::now() > deadline
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let counted = counted.unwrap_or(0);
    let telemetry_lost = answered.saturating_sub(at_risk).saturating_sub(counted);
    let telemetry_extra = counted.saturating_sub(reached);
    if telemetry_lost + telemetry_extra > 0 {
        // Where the difference is: points stored twice (same router instance and
        // interval start), and requests counted from spans instead of aggregates.
        for sql in [
            "SELECT instance, start_ns, groupArray(time_ns), groupArray(value) FROM strangler.metric_points \
             WHERE name = 'strangler.requests' GROUP BY instance, start_ns, attr_values HAVING count() > 1 LIMIT 10 FORMAT TabSeparated",
            "SELECT count() FROM strangler.spans WHERE route = 'orders' AND indexOf(resource_keys, 'strangler.counted') = 0 FORMAT TabSeparated",
        ] {
            let text = match reqwest::Client::new()
                .post(ch.http_url())
                .body(sql)
                .send()
                .await
            {
                Ok(r) => r.text().await.unwrap_or_default(),
                Err(e) => e.to_string(),
            };
            println!("telemetry diagnosis: {sql}\n{text}");
        }
        if let Ok(r) = reqwest::get(format!("http://{web}/metrics")).await {
            for line in r.text().await.unwrap_or_default().lines() {
                if line.starts_with("strangler_collector_metric_points") {
                    println!("  collector: {line}");
                }
            }
        }
    }

    for p in routers.iter_mut() {
        p.sample_rss();
    }
    let mut by_kind: BTreeMap<String, u64> = BTreeMap::new();
    for f in &faults {
        // Restores by kind, not by the entry they went back to.
        let kind = f.kind.split(" (").next().unwrap_or(&f.kind);
        let kind = kind.split(" --to").next().unwrap_or(kind);
        *by_kind.entry(kind.to_string()).or_default() += 1;
    }
    let writes = outcomes.iter().filter(|o| o.write).count();
    let failed = outcomes.iter().filter(|o| o.error.is_some()).count();
    let failed_reads = outcomes
        .iter()
        .filter(|o| o.error.is_some() && !o.write)
        .count();
    println!("soak: seed {seed}, {seconds} s, {} faults", faults.len());
    for (k, n) in &by_kind {
        println!("  fault {k}: {n}");
    }
    println!(
        "requests {} (writes {writes}, orders acknowledged {}), failed {failed} (reads {failed_reads})",
        outcomes.len(),
        acked.len()
    );
    for (k, n) in &failed_by_fault {
        println!(
            "  failed in/after {k}: {n} (e.g. {})",
            samples.get(k).map_or("", String::as_str)
        );
    }
    println!(
        "writes: acknowledged orders missing in legacy {missing_legacy}, in orders {missing_orders}; cdc verify exit {:?}",
        verify.status.code()
    );
    println!(
        "telemetry: routers answered {answered} (sent at most {reached}); the collector counts {counted}; \
         at risk in killed routers' last export window {at_risk}; lost beyond that {telemetry_lost}; counted beyond what was sent {telemetry_extra}"
    );
    println!(
        "routing: rollbacks returned {} ({} by the controller); controller moves {controller_moves:?}; \
         served by new after a rollback returned: {after_rollback} {after_rollback_samples:?}; routers disagreeing at the end: {disagree} of 40 users",
        rollbacks_returned.len(),
        entries
            .iter()
            .filter(|e| e["actor"] == CONTROLLER && e["to"]["state"] == "legacy")
            .count()
    );
    for p in [&routers[0], &routers[1], &collector, &forward, &reverse] {
        println!("  rss {}", p.rss_report());
    }
    println!(
        "soak_seconds={seconds} seed={seed} faults={} requests={} failed={failed} failed_reads={failed_reads} orders={} lost_writes={} \
         telemetry_lost={telemetry_lost} telemetry_extra={telemetry_extra} new_after_rollback={after_rollback} routers_disagree={disagree}",
        faults.len(),
        outcomes.len(),
        acked.len(),
        missing_legacy.max(missing_orders)
    );
    if !verify.status.success() {
        // What differs, from both databases, for the first keys verify names.
        let text = String::from_utf8_lossy(&verify.stdout).to_string();
        let ids: Vec<i64> = text
            .lines()
            .filter(|l| l.trim_start().starts_with("different"))
            .flat_map(|l| {
                l.split(':')
                    .nth(1)
                    .unwrap_or("")
                    .split(',')
                    .map(str::trim)
                    .map(str::to_string)
                    .collect::<Vec<_>>()
            })
            .filter_map(|t| t.parse().ok())
            .take(6)
            .collect();
        for id in &ids {
            let l = legacy_db
                .query("SELECT order_id, product_id, qty, price_cents FROM order_items WHERE order_id = $1 ORDER BY product_id", &[id])
                .await
                .map(|rows| rows.iter().map(|r| format!("({}, {}, {}, {})", r.get::<_, i64>(0), r.get::<_, i32>(1), r.get::<_, i32>(2), r.get::<_, i32>(3))).collect::<Vec<_>>())
                .unwrap_or_default();
            let o = orders_db
                .query("SELECT order_id, product_id, qty, unit_price::text FROM order_lines WHERE order_id = $1 ORDER BY product_id", &[id])
                .await
                .map(|rows| rows.iter().map(|r| format!("({}, {}, {}, {})", r.get::<_, i64>(0), r.get::<_, i32>(1), r.get::<_, i32>(2), r.get::<_, String>(3))).collect::<Vec<_>>())
                .unwrap_or_default();
            println!("  order {id}: legacy order_items {l:?}; orders order_lines {o:?}");
        }
    }
    let goals_hold = acked.len() > 10
        && (missing_legacy, missing_orders) == (0, 0)
        && verify.status.success()
        && after_rollback == 0
        && telemetry_lost + telemetry_extra == 0
        && disagree == 0;
    if !goals_hold {
        // The processes' logs, for whoever reads the failure.
        println!("logs kept in {}", dir.keep().display());
    }
    assert!(
        acked.len() > 10,
        "the generator placed only {} orders",
        acked.len()
    );
    assert_eq!(
        (missing_legacy, missing_orders),
        (0, 0),
        "acknowledged orders lost"
    );
    assert!(
        verify.status.success(),
        "cdc verify: {}{}",
        String::from_utf8_lossy(&verify.stdout),
        String::from_utf8_lossy(&verify.stderr)
    );
    assert_eq!(after_rollback, 0, "requests served by new after a rollback");
    assert!(
        !controller_left_running,
        "the rollout controller did not stop after the final rollback"
    );
    // Reads fail only while the legacy side itself is down (nothing can serve
    // them); a router, the new service, CDC, Unleash or the collector failing
    // costs none.
    let stray: Vec<_> = failed_by_fault
        .iter()
        .filter(|(k, _)| {
            k.ends_with(", read")
                && !k.starts_with("kill legacy-shop")
                && !k.starts_with("restart postgres-legacy")
        })
        .collect();
    assert!(
        stray.is_empty(),
        "reads failed outside the legacy side's outages: {stray:?}"
    );
    assert_eq!(telemetry_lost, 0, "requests the collector never counted");
    assert_eq!(
        telemetry_extra, 0,
        "the collector counts more requests than were sent"
    );
    assert_eq!(disagree, 0, "routers disagree at the end");
    drop(shop);
}
