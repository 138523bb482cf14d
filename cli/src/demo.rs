//! `strangler demo`: the example shop and its new orders service on private
//! databases, CDC both ways, the router in front (and the collector when
//! ClickHouse is installed), customer traffic, and the route `orders` walked
//! through shadow, a fix, canary 25 %, promote and rollback — each step with the
//! command a user would type and what it shows.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::json;
use strangler_testkit::{ClickHouse, Postgres, free_port};

const CDC: &str = include_str!("../../examples/legacy-monolith/cdc.toml");
const CDC_REVERSE: &str = include_str!("../../examples/legacy-monolith/cdc-reverse.toml");
const TOKEN: &str = "demo-admin-token";

/// What the demo started; dropping it stops everything.
struct Stack {
    _legacy_pg: Postgres,
    _orders_pg: Postgres,
    _clickhouse: Option<ClickHouse>,
    router: Child,
    dir: tempfile::TempDir,
}

impl Drop for Stack {
    fn drop(&mut self) {
        let _ = self.router.kill();
        let _ = self.router.wait();
    }
}

fn addr() -> anyhow::Result<SocketAddr> {
    let lease = free_port().context("finding a free port")?;
    Ok(SocketAddr::from(([127, 0, 0, 1], lease.port())))
}

async fn serve(app: axum::Router, at: SocketAddr) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let task = tokio::spawn(async move {
        if let Err(e) = strangler_example::serve(at, app).await {
            eprintln!("demo: server on {at} stopped: {e}");
        }
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while reqwest::get(format!("http://{at}/health")).await.is_err() {
        if Instant::now() > deadline {
            bail!("nothing answers on {at}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(task)
}

fn cdc_config(
    template: &str,
    legacy: &str,
    orders: &str,
) -> anyhow::Result<strangler_cdc::CdcConfig> {
    let text = template
        .replace("postgres://postgres@127.0.0.1:5433/legacy", legacy)
        .replace("postgres://postgres@127.0.0.1:5434/orders", orders);
    Ok(strangler_cdc::CdcConfig::parse(
        &text,
        Path::new("cdc.toml"),
    )?)
}

fn step(title: &str) {
    println!("\n\x1b[1m== {title}\x1b[0m");
}

/// Runs `strangler ARGS` (this binary) and prints the command and its output.
fn show(dir: &Path, args: &[&str]) -> anyhow::Result<String> {
    println!("$ strangler {}", args.join(" "));
    let out = Command::new(std::env::current_exe()?)
        .args(args)
        .current_dir(dir)
        .env("STRANGLER_ADMIN_TOKEN", TOKEN)
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    print!("{text}");
    // Warnings are part of what a command says; show them whether or not it succeeded.
    print!("{}", String::from_utf8_lossy(&out.stderr));
    Ok(text)
}

/// Customers browsing and ordering through the router until `stop`.
fn traffic(router: String, stop: Arc<AtomicBool>, orders_placed: Arc<AtomicU64>) {
    for worker in 0..3u64 {
        let (router, stop, placed) = (
            router.clone(),
            Arc::clone(&stop),
            Arc::clone(&orders_placed),
        );
        tokio::spawn(async move {
            let client = reqwest::Client::new();
            let mut n = worker;
            while !stop.load(Ordering::Relaxed) {
                n += 3;
                let customer = n % 50 + 1;
                let user = customer.to_string();
                let get = |path: String| {
                    client
                        .get(format!("{router}{path}"))
                        .header("x-user-id", &user)
                        .send()
                };
                let _ = get("/".into()).await;
                let _ = get("/api/products".into()).await;
                let _ = get(format!("/api/orders?customer_id={customer}")).await;
                let _ = get(format!("/api/orders/{}", n % 200 + 1)).await;
                if n % 5 == 0 {
                    let r = client
                        .post(format!("{router}/api/orders"))
                        .header("x-user-id", &user)
                        .json(&json!({"customer_id": customer, "items": [{"product_id": n % 20 + 1, "qty": 1}]}))
                        .send()
                        .await;
                    if r.is_ok_and(|r| r.status().is_success()) {
                        placed.fetch_add(1, Ordering::Relaxed);
                    }
                }
                tokio::time::sleep(Duration::from_millis(30)).await;
            }
        });
    }
}

/// How many of the 50 customers the router sends to the new service now.
async fn customers_on_new(router: &str) -> usize {
    let client = reqwest::Client::new();
    let mut on_new = 0;
    for customer in 1..=50 {
        let served = client
            .get(format!("{router}/api/orders/1"))
            .header("x-user-id", customer.to_string())
            .send()
            .await
            .ok()
            .and_then(|r| {
                r.headers()
                    .get("x-served-by")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string)
            });
        on_new += usize::from(served.as_deref() == Some("orders-service"));
    }
    on_new
}

async fn count(db: &tokio_postgres::Client, sql: &str) -> i64 {
    db.query_one(sql, &[]).await.map(|r| r.get(0)).unwrap_or(-1)
}

/// Runs the demo; `walkthrough` false only starts the stack.
/// `exit` stops after the walk-through instead of waiting for Ctrl-C.
pub async fn run(walkthrough: bool, exit: bool) -> anyhow::Result<()> {
    step("Starting two private PostgreSQL clusters (legacy shop, orders service)");
    let (legacy_pg, orders_pg) = tokio::join!(Postgres::start(), Postgres::start());
    let (legacy_pg, orders_pg) = (legacy_pg?, orders_pg?);
    legacy_pg.create_database("legacy").await?;
    orders_pg.create_database("orders").await?;
    let (legacy_url, orders_url) = (legacy_pg.url("legacy"), orders_pg.url("orders"));
    println!("legacy db {legacy_url}\norders db {orders_url}");
    let legacy_db = strangler_example::connect(&legacy_url).await?;
    let orders_db = strangler_example::connect(&orders_url).await?;
    strangler_example::legacy::migrate(&legacy_db, true).await?;
    strangler_example::orders::migrate(&orders_db).await?;

    step("Starting CDC: legacy → orders (snapshot, then stream), then orders → legacy");
    let stop_cdc = strangler_cdc::CancellationToken::new();
    let forward = cdc_config(CDC, &legacy_url, &orders_url)?;
    let reverse = cdc_config(CDC_REVERSE, &legacy_url, &orders_url)?;
    for (name, config) in [("forward", forward.clone()), ("reverse", reverse.clone())] {
        let stop = stop_cdc.clone();
        let opts = strangler_cdc::pipeline::RunOptions {
            stop: Some(stop),
            ..Default::default()
        };
        tokio::spawn(async move {
            if let Err(e) = strangler_cdc::run(&config, opts).await {
                eprintln!("demo: {name} CDC stopped: {e}");
            }
        });
        if name == "forward" {
            let deadline = Instant::now() + Duration::from_secs(60);
            while count(&orders_db, "SELECT count(*) FROM strangler.cdc_checkpoint").await < 1 {
                if Instant::now() > deadline {
                    bail!("the CDC snapshot did not finish in 60 s");
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            println!(
                "snapshot done: {} orders copied",
                count(&orders_db, "SELECT count(*) FROM orders_v2").await
            );
        }
    }

    step("Starting the legacy shop and the new orders service (v1)");
    let (shop_at, orders_at) = (addr()?, addr()?);
    let shop = serve(strangler_example::legacy::app(legacy_db.clone()), shop_at).await?;
    let fixed = Arc::new(AtomicBool::new(false));
    let orders_task = serve(
        strangler_example::orders::switchable(orders_db.clone(), Arc::clone(&fixed)),
        orders_at,
    )
    .await?;
    println!("legacy shop    http://{shop_at}\norders service http://{orders_at}");

    let clickhouse = match ClickHouse::start().await {
        Ok(ch) => Some(ch),
        Err(e) => {
            println!(
                "ClickHouse is not available ({e}); traces and dashboards are off, everything else runs."
            );
            None
        }
    };
    let dir = tempfile::Builder::new()
        .prefix("strangler-demo-")
        .tempdir()?;
    let mut telemetry = String::new();
    let mut dashboard = None;
    if let Some(ch) = &clickhouse {
        let (grpc, http, web) = (addr()?, addr()?, addr()?);
        std::fs::write(
            dir.path().join("collector.toml"),
            format!(
                "grpc_listen = \"{grpc}\"\nhttp_listen = \"{http}\"\nweb_listen = \"{web}\"\nclickhouse_url = \"{}\"\nspool_dir = \"{}\"\n",
                ch.http_url(),
                dir.path().join("spool").display()
            ),
        )?;
        let config =
            strangler_collector::CollectorConfig::load(Some(&dir.path().join("collector.toml")))?;
        tokio::spawn(async move {
            if let Err(e) = strangler_collector::run(config).await {
                eprintln!("demo: collector stopped: {e}");
            }
        });
        // Route changes are announced to the collector as they happen; wait until
        // its schema is in place so the first one is stored like the rest.
        let deadline = Instant::now() + Duration::from_secs(60);
        while reqwest::get(format!("http://{web}/ready"))
            .await
            .map_or(true, |r| !r.status().is_success())
        {
            if Instant::now() > deadline {
                println!(
                    "the collector is not ready after 60 s; continuing (its spool keeps the traces)"
                );
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        telemetry = format!(
            "[telemetry]\notlp_endpoint = \"http://{grpc}\"\nmetrics_endpoint = \"http://{grpc}\"\n"
        );
        dashboard = Some(format!("http://{web}"));
    }

    step("Starting the router in front of the shop");
    let (listen, admin) = (addr()?, addr()?);
    std::fs::write(
        dir.path().join("flags.json"),
        include_str!("../../examples/legacy-monolith/flags.json"),
    )?;
    std::fs::write(
        dir.path().join("strangler.toml"),
        format!(
            "[server]\nlisten = \"{listen}\"\n[legacy]\nupstream = \"{shop_at}\"\n[flags]\nfile = \"flags.json\"\n[admin]\nlisten = \"{admin}\"\n{telemetry}\n\
             [[route]]\nname = \"orders\"\nmatch = {{ prefix = \"/api/orders\" }}\nnew = \"{orders_at}\"\nsticky = \"header:x-user-id\"\nhealth_path = \"/health\"\n\n[route.shadow]\nignore_headers = [\"x-served-by\"]\n"
        ),
    )?;
    let log = std::fs::File::create(dir.path().join("router.log"))?;
    let router = Command::new(std::env::current_exe()?)
        .args(["router", "run", "--config"])
        .arg(dir.path().join("strangler.toml"))
        .env("STRANGLER_ADMIN_TOKEN", TOKEN)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()?;
    let stack = Stack {
        _legacy_pg: legacy_pg,
        _orders_pg: orders_pg,
        _clickhouse: clickhouse,
        router,
        dir,
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while reqwest::get(format!("http://{admin}/ready"))
        .await
        .map_or(true, |r| !r.status().is_success())
    {
        if Instant::now() > deadline {
            bail!(
                "the router did not get ready; see {}",
                stack.dir.path().join("router.log").display()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let shop_via_router = format!("http://{listen}");
    println!("shop through the router {shop_via_router}   (admin http://{admin}, token {TOKEN})");
    if let Some(d) = &dashboard {
        println!(
            "dashboard              {d}/   (legacy vs new per route; Grafana: dashboards/grafana/strangler.json)"
        );
    }

    step("Customers browse and order (3 of them at a time, through the router)");
    let stop_traffic = Arc::new(AtomicBool::new(false));
    let placed = Arc::new(AtomicU64::new(0));
    traffic(
        shop_via_router.clone(),
        Arc::clone(&stop_traffic),
        Arc::clone(&placed),
    );
    let dir: PathBuf = stack.dir.path().to_path_buf();
    let cfg = ["--config", "strangler.toml"];
    let wait = |secs: u64| tokio::time::sleep(Duration::from_secs(secs));

    if walkthrough {
        step("1. Shadow: legacy answers, the new service gets a copy, answers are compared");
        show(
            &dir,
            &[&["route", "shadow", "orders"][..], &cfg, &["--yes"]].concat(),
        )?;
        wait(6).await;
        show(&dir, &[&["route", "compare", "orders"][..], &cfg].concat())?;
        println!(
            "→ the new service prints \"total\" as a number (12.3) where the shop prints \"12.30\"."
        );

        step("2. Deploy the fixed orders service (--compat) and compare again");
        // The fixed version takes over (in place here, so the router's pooled
        // keep-alive connections do not keep reaching the old one).
        fixed.store(true, Ordering::Relaxed);
        println!("orders service now runs the fixed version (--compat)");
        wait(6).await;
        show(&dir, &[&["route", "compare", "orders"][..], &cfg].concat())?;
        println!(
            "→ pairs since the fix match; the rate climbs as they accumulate (the mismatches above are from before it)."
        );

        step("3. Canary: 25 % of customers (sticky) on the new service");
        show(
            &dir,
            &[&["route", "canary", "orders", "25"][..], &cfg, &["--yes"]].concat(),
        )?;
        wait(6).await;
        show(&dir, &[&["route", "status", "orders"][..], &cfg].concat())?;
        let n = customers_on_new(&shop_via_router).await;
        println!("customers served by the new service: {n}/50 ({} %)", n * 2);

        step("4. Promote: everyone on the new service");
        show(
            &dir,
            &[&["route", "promote", "orders"][..], &cfg, &["--yes"]].concat(),
        )?;
        wait(6).await;
        show(&dir, &[&["route", "status", "orders"][..], &cfg].concat())?;
        let n = customers_on_new(&shop_via_router).await;
        println!("customers served by the new service: {n}/50 ({} %)", n * 2);

        step("5. Rollback: back to legacy on every router, now");
        show(
            &dir,
            &[&["route", "rollback", "orders"][..], &cfg, &["--yes"]].concat(),
        )?;
        stop_traffic.store(true, Ordering::Relaxed);
        wait(3).await;
        show(&dir, &[&["route", "status", "orders"][..], &cfg].concat())?;
        let n = customers_on_new(&shop_via_router).await;
        println!("customers served by the new service: {n}/50 ({} %)", n * 2);
        let in_new = count(
            &orders_db,
            "SELECT count(*) FROM orders_v2 WHERE id >= 1000000",
        )
        .await;
        let in_legacy = count(
            &legacy_db,
            "SELECT count(*) FROM orders WHERE id >= 1000000",
        )
        .await;
        println!(
            "orders placed during the demo: {}; created by the new service: {in_new}; of those in the legacy database: {in_legacy}",
            placed.load(Ordering::Relaxed)
        );

        step("6. Are both databases the same? (strangler cdc verify)");
        match strangler_cdc::ops::verify::verify(&forward, Duration::from_secs(30)).await {
            Ok(reports) => {
                for r in reports {
                    println!(
                        "{:<9} {}  {} rows on each side",
                        if r.clean() { "clean" } else { "DIFFERENT" },
                        r.table,
                        r.source_rows
                    );
                }
            }
            Err(e) => println!("verify: {e}"),
        }

        if let Some(d) = &dashboard {
            step(
                "7. The whole story from the stored traces (strangler compare, as on the dashboard)",
            );
            show(
                &dir,
                &[
                    "compare",
                    "orders",
                    "--since",
                    "15m",
                    "--collector",
                    d.as_str(),
                    "--top",
                    "3",
                ],
            )?;
            println!("→ the same numbers, charts and the flips as markers: {d}/#/route/orders");
        }
    }

    // Stops in dependency order: traffic, CDC and the apps first, so every database
    // connection is closed by its client before the databases go (a database that
    // goes first makes each open connection end in an error).
    let shutdown = async move {
        stop_traffic.store(true, Ordering::Relaxed);
        stop_cdc.cancel();
        shop.abort();
        orders_task.abort();
        let _ = tokio::join!(shop, orders_task);
        drop((legacy_db, orders_db));
        tokio::time::sleep(Duration::from_millis(300)).await;
        drop(stack);
    };
    if exit {
        shutdown.await;
        println!("\ndone.");
        return Ok(());
    }
    step("Running; Ctrl-C stops everything");
    println!(
        "shop: {shop_via_router}   try: curl -H 'x-user-id: 7' {shop_via_router}/api/orders/1"
    );
    println!(
        "route control: cd {} && strangler route list --config strangler.toml",
        dir.display()
    );
    if let Some(d) = &dashboard {
        println!("dashboard: {d}/");
    }
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r?,
        _ = term.recv() => {}
    }
    shutdown.await;
    println!("stopped.");
    Ok(())
}
