//! Soak under combined faults (first part of #23): the example's stack as separate
//! processes — the legacy shop and the orders service on their own PostgreSQL
//! clusters, CDC both ways, two routers, the collector and ClickHouse — under paced
//! customer traffic through both routers (a client that, like a load balancer,
//! tries the other router when one does not answer), while a seeded schedule
//! injects a fault every few seconds: SIGKILL and restart of a router, the orders
//! service, the legacy shop, a CDC direction or the collector; a stall
//! (SIGSTOP/SIGCONT) of the orders service; a route move (canary, promote,
//! rollback) from the CLI. A checker then requires: every order acknowledged to the
//! generator exists in both databases once CDC caught up and `strangler cdc verify`
//! is clean; reads fail only while the legacy shop is down (the generator retries a
//! read on the other router when a connection fails or breaks, a write only when it
//! was refused — as a load balancer would); no request served by the new side after
//! a rollback returned and before the next forward move; both routers agree for
//! every user at the end. It prints what it saw (faults by kind, requests, failures
//! by the fault before them and by kind, RSS of routers, collector and CDC).
//!
//! Also restarts of ClickHouse (the collector spools meanwhile) and of either
//! PostgreSQL (CDC resumes from its checkpoint; the shop and the orders service
//! reconnect, as a pool would; reads fail while the legacy database is down).
//!
//! Not covered yet (#23 asks for them): restarts of Unleash (the routers read a flags file here), a rollout
//! controller among the movers, and the telemetry check (requests made vs
//! requests the collector counts).
//!
//! `SOAK_SECONDS` (default 60 here) and `SOAK_SEED` (default 1) set the run;
//! `bench/soak.sh` runs it longer in release mode.

mod support;

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use strangler_testkit::{ClickHouse, Postgres, free_port};
use support::strangler_bin;

const TOKEN: &str = "soak-admin-token";
const CDC: &str = include_str!("../../examples/legacy-monolith/cdc.toml");
const CDC_REVERSE: &str = include_str!("../../examples/legacy-monolith/cdc-reverse.toml");

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

/// One restartable process of the stack.
struct Proc {
    name: &'static str,
    program: PathBuf,
    args: Vec<String>,
    log: PathBuf,
    child: Option<Child>,
}

impl Proc {
    fn new(name: &'static str, program: PathBuf, args: &[&str], dir: &Path) -> Self {
        Self {
            name,
            program,
            args: args.iter().map(|s| s.to_string()).collect(),
            log: dir.join(format!("{name}.log")),
            child: None,
        }
    }

    fn start(&mut self) {
        let log = std::fs::File::options()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log");
        self.child = Some(
            Command::new(&self.program)
                .args(&self.args)
                .env("STRANGLER_ADMIN_TOKEN", TOKEN)
                .env("STRANGLER_LOG", "warn")
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

    fn rss_kib(&self) -> u64 {
        self.child
            .as_ref()
            .and_then(|c| std::fs::read_to_string(format!("/proc/{}/status", c.id())).ok())
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("VmRSS:"))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|v| v.parse().ok())
            })
            .unwrap_or(0)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.signal(Signal::SIGCONT);
        self.kill();
    }
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
    write: bool,
    /// `Some(side)` when answered 2xx (the `x-served-by` header), else `None`.
    served_by: Option<String>,
    error: Option<String>,
}

fn cli(dir: &Path, args: &[&str]) -> std::process::Output {
    Command::new(strangler_bin())
        .args(args)
        .current_dir(dir)
        .env("STRANGLER_ADMIN_TOKEN", TOKEN)
        .env("STRANGLER_ACTOR", "soak")
        .stdin(Stdio::null())
        .output()
        .expect("strangler")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stack_under_a_fault_every_few_seconds_loses_no_order_and_honours_every_rollback() {
    let seconds: u64 = std::env::var("SOAK_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let seed: u64 = std::env::var("SOAK_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    let dir = tempfile::tempdir().expect("dir");
    let d = dir.path();

    // Databases, ClickHouse.
    let (legacy_pg, orders_pg, ch) =
        tokio::join!(Postgres::start(), Postgres::start(), ClickHouse::start());
    let (mut legacy_pg, mut orders_pg, mut ch) = (
        legacy_pg.expect("pg"),
        orders_pg.expect("pg"),
        ch.expect("clickhouse"),
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

    // Two routers on one flags file, and the operators' config naming both.
    std::fs::write(
        d.join("flags.json"),
        include_str!("../../examples/legacy-monolith/flags.json"),
    )
    .expect("flags");
    let route = format!(
        "[[route]]\nname = \"orders\"\nmatch = {{ prefix = \"/api/orders\" }}\nnew = \"{orders_at}\"\nsticky = \"header:x-user-id\"\nhealth_path = \"/health\"\n"
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
                "[server]\nlisten = \"{listen}\"\n[legacy]\nupstream = \"{shop_at}\"\n[flags]\nfile = \"flags.json\"\n[admin]\nlisten = \"{admin}\"\n\
                 [telemetry]\notlp_endpoint = \"http://{grpc}\"\nmetrics_endpoint = \"http://{grpc}\"\n\n{route}"
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
            "[flags]\nfile = \"flags.json\"\n[control]\nrouters = [{}]\n[legacy]\nupstream = \"{shop_at}\"\n\n{route}",
            admin_urls
                .iter()
                .map(|u| format!("\"{u}\""))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    )
    .expect("operators' config");
    let rss_start: Vec<(&str, u64)> = [&routers[0], &routers[1], &collector, &forward, &reverse]
        .iter()
        .map(|p| (p.name, p.rss_kib()))
        .collect();

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
                    write,
                    served_by: None,
                    error: None,
                };
                for attempt in 0..2 {
                    let base = &urls[(first + attempt) % 2];
                    let request = if write {
                        client
                            .post(format!("{base}/api/orders"))
                            .json(&json!({"customer_id": user, "items": [{"product_id": n % 20 + 1, "qty": 1}]}))
                    } else {
                        client.get(format!("{base}/api/orders?customer_id={user}"))
                    };
                    match request.header("x-user-id", user.to_string()).send().await {
                        Ok(r) => {
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
                            outcome.error = Some(format!("{e}"));
                        }
                        Err(e) => {
                            outcome.error = Some(e.to_string());
                            break;
                        }
                    }
                }
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
    let mut faults: Vec<(Instant, String)> = Vec::new();
    // Rollbacks returned at, and the forward moves after them.
    let mut moves: Vec<(Instant, bool)> = Vec::new();
    let mut state = "legacy";
    while started.elapsed() < Duration::from_secs(seconds) {
        tokio::time::sleep(Duration::from_millis(rng.random_range(2_000..5_000))).await;
        let kind = match rng.random_range(0..11) {
            0 => {
                let i = rng.random_range(0..2);
                routers[i].kill();
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
                "kill collector".into()
            }
            9 => {
                ch.restart().await.expect("ClickHouse back");
                "restart clickhouse".into()
            }
            10 => {
                if rng.random_bool(0.5) {
                    legacy_pg.restart().await.expect("legacy PostgreSQL back");
                    "restart postgres-legacy".into()
                } else {
                    orders_pg.restart().await.expect("orders PostgreSQL back");
                    "restart postgres-orders".into()
                }
            }
            5 => {
                orders.signal(Signal::SIGSTOP);
                tokio::time::sleep(Duration::from_millis(rng.random_range(1_000..3_000))).await;
                orders.signal(Signal::SIGCONT);
                "stall orders-service".into()
            }
            _ => {
                let (args, to): (Vec<&str>, &str) = match (state, rng.random_range(0..3)) {
                    ("legacy", _) | ("shadow", 0) => {
                        (vec!["canary", "orders", "25", "--yes"], "canary")
                    }
                    ("canary", 0) => (vec!["promote", "orders", "--yes"], "new"),
                    (_, 1) => (vec!["canary", "orders", "50", "--yes"], "canary"),
                    _ => (vec!["rollback", "orders"], "legacy"),
                };
                let mut all = vec!["route", "--config", "strangler.toml"];
                all.extend(args.iter());
                let out = cli(d, &all);
                if out.status.success() {
                    state = to;
                    moves.push((Instant::now(), to == "legacy"));
                }
                format!(
                    "route {} ({})",
                    args.join(" "),
                    if out.status.success() {
                        "ok"
                    } else {
                        "refused"
                    }
                )
            }
        };
        faults.push((Instant::now(), kind));
    }
    // End on legacy, everything running.
    let out = cli(
        d,
        &["route", "--config", "strangler.toml", "rollback", "orders"],
    );
    assert!(out.status.success(), "final rollback: {out:?}");
    moves.push((Instant::now(), true));
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        let _ = w.await;
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

    // Reads and routing.
    let outcomes = outcomes.lock().expect("lock").clone();
    let mut failed_by_fault: BTreeMap<String, u64> = BTreeMap::new();
    let mut samples: BTreeMap<String, String> = BTreeMap::new();
    for o in outcomes.iter().filter(|o| o.error.is_some()) {
        let cause = faults
            .iter()
            .rev()
            .find(|(at, _)| *at <= o.at + Duration::from_secs(1))
            .map_or("(before any fault)".to_string(), |(_, k)| {
                k.split(' ').take(2).collect::<Vec<_>>().join(" ")
            });
        let cause = format!("{cause}, {}", if o.write { "write" } else { "read" });
        samples
            .entry(cause.clone())
            .or_insert_with(|| o.error.clone().unwrap_or_default());
        *failed_by_fault.entry(cause).or_default() += 1;
    }
    // Served by the new side after a rollback returned, before the next forward move.
    let mut after_rollback = 0;
    for (i, (at, is_rollback)) in moves.iter().enumerate() {
        if !is_rollback {
            continue;
        }
        let until = moves.get(i + 1).map(|(t, _)| *t);
        after_rollback += outcomes
            .iter()
            .filter(|o| o.at > *at && until.is_none_or(|u| o.at < u))
            .filter(|o| o.served_by.as_deref() == Some("orders-service"))
            .count();
    }
    // Both routers agree for every user at the end.
    let client = reqwest::Client::new();
    let mut disagree = 0;
    for user in 1..=40 {
        let mut sides = Vec::new();
        for base in &router_urls {
            let side = client
                .get(format!("{base}/api/orders?customer_id={user}"))
                .header("x-user-id", user.to_string())
                .send()
                .await
                .ok()
                .and_then(|r| {
                    r.headers()
                        .get("x-served-by")
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_string)
                });
            sides.push(side);
        }
        disagree += usize::from(sides[0] != sides[1]);
    }
    let rss_end: Vec<(&str, u64)> = [&routers[0], &routers[1], &collector, &forward, &reverse]
        .iter()
        .map(|p| (p.name, p.rss_kib()))
        .collect();

    let mut by_kind: BTreeMap<String, u64> = BTreeMap::new();
    for (_, k) in &faults {
        *by_kind
            .entry(k.split(" (").next().unwrap_or(k).to_string())
            .or_default() += 1;
    }
    let writes = outcomes.iter().filter(|o| o.write).count();
    let failed = outcomes.iter().filter(|o| o.error.is_some()).count();
    println!("soak: seed {seed}, {seconds} s, {} faults", faults.len());
    for (k, n) in &by_kind {
        println!("  fault {k}: {n}");
    }
    println!(
        "requests {} (writes {writes}, orders acknowledged {}), failed {failed}",
        outcomes.len(),
        acked.len()
    );
    for (k, n) in &failed_by_fault {
        println!(
            "  failed after {k}: {n} (e.g. {})",
            samples.get(k).map_or("", String::as_str)
        );
    }
    println!(
        "writes: acknowledged orders missing in legacy {missing_legacy}, in orders {missing_orders}; cdc verify exit {:?}",
        verify.status.code()
    );
    println!(
        "routing: served by new after a rollback returned: {after_rollback}; routers disagreeing at the end: {disagree} of 40 users"
    );
    for ((name, a), (_, b)) in rss_start.iter().zip(&rss_end) {
        println!("  rss {name}: {a} KiB -> {b} KiB");
    }
    println!(
        "soak_seconds={seconds} seed={seed} faults={} requests={} failed={failed} orders={} lost_writes={} new_after_rollback={after_rollback} routers_disagree={disagree}",
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
    // Reads fail only while the legacy shop itself is down (nothing can serve
    // them); a router, the new service, CDC or the collector failing costs none.
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
        "reads failed outside the legacy shop's outages: {stray:?}"
    );
    assert_eq!(disagree, 0, "routers disagree at the end");
    drop(shop);
}
