//! CDC benchmark (run by bench/cdc.sh): the same tables on the same two PostgreSQL
//! servers, strangler side by side with PostgreSQL's own tools.
//!
//! (a) snapshot: `strangler cdc` snapshot vs `pg_dump | psql`;
//! (b) streaming apply rate on a backlog: strangler vs CREATE SUBSCRIPTION;
//! (c) lag p50/p99 at a steady write rate: strangler vs CREATE SUBSCRIPTION;
//! (d) sustained pgbench (scale 10, 4 clients): tps without and with strangler's
//!     CDC streaming the pgbench tables, and the lag while it runs.
//!
//! Ends with one line: `snapshot_ratio=… apply_ratio=… lag_p99_ms=… pgbench_tps_ratio=…`.
//!
//! STRANGLER_BENCH_ROWS (default 300000) rows per table, STRANGLER_BENCH_BACKLOG
//! (default 200000) changes, STRANGLER_BENCH_RATE (default 5000) rows/s for
//! STRANGLER_BENCH_SECONDS (default 15); STRANGLER_BENCH_PGBENCH_SECONDS (default 60,
//! 0 skips (d)) per pgbench run.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use strangler_cdc::pipeline::{Progress, RunOptions, run_with};
use strangler_cdc::{CancellationToken, CdcConfig};
use strangler_testkit::Postgres;
use tokio_postgres::Client;

const BIN: &str = "/usr/lib/postgresql/15/bin";

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

const TABLES: &str = "
CREATE TABLE bench_orders (id bigint PRIMARY KEY, customer_id int NOT NULL, total_cents bigint NOT NULL,
  status text NOT NULL, email text, note text, created timestamptz NOT NULL DEFAULT clock_timestamp());
CREATE TABLE bench_items (id bigint PRIMARY KEY, order_id bigint NOT NULL, sku text NOT NULL, qty int NOT NULL,
  price numeric(12,2) NOT NULL, attrs jsonb);
";

/// Target tables: the same, without the source's default on `created` (the rows
/// bring it). `applied_at` (filled by the target when a row lands) is added after
/// the snapshot, so that the snapshot writes the same columns as `pg_dump | psql`.
fn target_tables() -> String {
    TABLES.replace(
        "created timestamptz NOT NULL DEFAULT clock_timestamp());",
        "created timestamptz NOT NULL);",
    )
}

/// Adds `applied_at` to the target tables (for the lag measurements).
const APPLIED_AT: &str =
    "ALTER TABLE bench_orders ADD COLUMN applied_at timestamptz DEFAULT clock_timestamp();
ALTER TABLE bench_items ADD COLUMN applied_at timestamptz DEFAULT clock_timestamp();";

async fn count(db: &Client, table: &str) -> i64 {
    db.query_one(&format!("SELECT count(*) FROM {table}"), &[])
        .await
        .map(|r| r.get(0))
        .unwrap_or(-1)
}

async fn wait_count(db: &Client, table: &str, want: i64, timeout: Duration) -> Duration {
    let started = Instant::now();
    while count(db, table).await < want {
        assert!(
            started.elapsed() < timeout,
            "{table} never reached {want} rows"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    started.elapsed()
}

async fn write_rows(db: &Client, from: i64, n: i64) {
    db.execute(
        "INSERT INTO bench_orders (id, customer_id, total_cents, status, email, note)
         SELECT g, g % 1000, g * 7, 'paid', 'c' || g || '@example.com', 'note ' || g FROM generate_series($1::bigint, $2::bigint) g",
        &[&from, &(from + n - 1)],
    )
    .await
    .expect("write orders");
}

/// Writes `rate` rows/s in 10 ms ticks for `seconds`, ids from `from`.
async fn steady(db: &Client, from: i64, rate: u64, seconds: u64) -> i64 {
    let per_tick = (rate / 100).max(1) as i64;
    let ticks = seconds * 100;
    let mut id = from;
    let started = Instant::now();
    for t in 0..ticks {
        write_rows(db, id, per_tick).await;
        id += per_tick;
        let due = started + Duration::from_millis(10 * (t + 1));
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            tokio::time::sleep(wait).await;
        }
    }
    id - from
}

async fn lag_percentiles(db: &Client, from: i64) -> (f64, f64) {
    let row = db
        .query_one(
            "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM applied_at - created)),
                    percentile_cont(0.99) WITHIN GROUP (ORDER BY extract(epoch FROM applied_at - created))
             FROM bench_orders WHERE id >= $1",
            &[&from],
        )
        .await
        .expect("lag");
    (
        row.get::<_, Option<f64>>(0).unwrap_or(f64::NAN) * 1000.0,
        row.get::<_, Option<f64>>(1).unwrap_or(f64::NAN) * 1000.0,
    )
}

fn start_cdc(config: &CdcConfig) -> (CancellationToken, tokio::task::JoinHandle<()>) {
    let stop = CancellationToken::new();
    let (config, token) = (config.clone(), stop.clone());
    let task = tokio::spawn(async move {
        if let Err(e) = run_with(
            &config,
            RunOptions {
                stop: Some(token),
                ..RunOptions::default()
            },
            Arc::new(Progress::default()),
        )
        .await
        {
            eprintln!("cdc failed: {e}");
        }
    });
    (stop, task)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let rows = env("STRANGLER_BENCH_ROWS", 300_000) as i64;
    let backlog = env("STRANGLER_BENCH_BACKLOG", 200_000) as i64;
    let rate = env("STRANGLER_BENCH_RATE", 5_000);
    let seconds = env("STRANGLER_BENCH_SECONDS", 15);
    let (src, tgt) = tokio::join!(Postgres::start(), Postgres::start());
    let (src, tgt) = (src.expect("source pg"), tgt.expect("target pg"));
    src.create_database("legacy").await.expect("db");
    for db in ["viadump", "viacdc", "viasub"] {
        tgt.create_database(db).await.expect("db");
    }
    let source = src.connect("legacy").await.expect("source");
    // The test servers run with synchronous_commit off; a walsender only sends WAL
    // that is flushed, so without this every commit would wait for the WAL writer
    // (200 ms) and both replicators would show that delay as lag.
    source
        .batch_execute("SET synchronous_commit = on")
        .await
        .expect("sync commit");
    source.batch_execute(TABLES).await.expect("tables");
    source
        .execute(
            "INSERT INTO bench_orders (id, customer_id, total_cents, status, email, note)
             SELECT g, g % 1000, g * 7, 'paid', 'c' || g || '@example.com', 'note ' || g FROM generate_series(1, $1::bigint) g",
            &[&rows],
        )
        .await
        .expect("load orders");
    source
        .execute(
            "INSERT INTO bench_items SELECT g, g, 'sku-' || (g % 5000), g % 9 + 1, (g % 10000) / 100.0, jsonb_build_object('c', g % 7)
             FROM generate_series(1, $1::bigint) g",
            &[&rows],
        )
        .await
        .expect("load items");
    source
        .batch_execute("VACUUM ANALYZE")
        .await
        .expect("vacuum");
    let via_cdc = tgt.connect("viacdc").await.expect("target");
    let via_sub = tgt.connect("viasub").await.expect("target");
    via_cdc
        .batch_execute(&target_tables())
        .await
        .expect("tables");
    via_sub
        .batch_execute(&target_tables())
        .await
        .expect("tables");
    println!(
        "CDC benchmark: {rows} rows in each of 2 tables, backlog {backlog}, steady {rate} rows/s for {seconds} s"
    );

    // (a) snapshot
    let started = Instant::now();
    let dump = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "{BIN}/pg_dump -h 127.0.0.1 -p {} -U postgres -t bench_orders -t bench_items legacy | {BIN}/psql -q -h 127.0.0.1 -p {} -U postgres -d viadump -v ON_ERROR_STOP=1 >/dev/null",
            src.port(),
            tgt.port()
        ))
        .status()
        .expect("pg_dump | psql");
    assert!(dump.success());
    let dump_time = started.elapsed();

    let config_text = format!(
        "[source]\nurl = \"{}\"\n[target]\nurl = \"{}\"\n[apply]\nheartbeat_ms = 1000\nsnapshot_parallelism = {}\n\
         [[map]]\ntarget = \"bench_orders\"\nsql = \"SELECT * FROM bench_orders\"\n\
         [[map]]\ntarget = \"bench_items\"\nsql = \"SELECT * FROM bench_items\"\n",
        src.url("legacy"),
        tgt.url("viacdc"),
        // Copies at once (tables and key ranges); the default is strangler's own.
        env("STRANGLER_BENCH_PARALLELISM", 4)
    );
    let config = CdcConfig::parse(&config_text, Path::new("bench.toml")).expect("config");
    let started = Instant::now();
    let (stop, task) = start_cdc(&config);
    loop {
        let done = via_cdc
            .query_opt("SELECT 1 FROM strangler.cdc_checkpoint", &[])
            .await
            .ok()
            .flatten()
            .is_some();
        if done {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "snapshot did not finish"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let cdc_time = started.elapsed();
    let total = (rows * 2) as f64;
    println!(
        "(a) snapshot      strangler {:>7.2} s {:>9.0} rows/s | pg_dump|psql {:>7.2} s {:>9.0} rows/s | ratio {:.2}x (goal >= 1.5x)",
        cdc_time.as_secs_f64(),
        total / cdc_time.as_secs_f64(),
        dump_time.as_secs_f64(),
        total / dump_time.as_secs_f64(),
        dump_time.as_secs_f64() / cdc_time.as_secs_f64()
    );

    // (b) backlog apply rate; the subscription's slot exists (disabled) before the writes.
    stop.cancel();
    let _ = task.await;
    for db in [&via_cdc, &via_sub] {
        db.batch_execute(APPLIED_AT).await.expect("applied_at");
    }
    source
        .batch_execute("CREATE PUBLICATION bench_sub FOR TABLE bench_orders, bench_items")
        .await
        .expect("publication");
    via_sub
        .batch_execute(&format!(
            "CREATE SUBSCRIPTION bench_sub CONNECTION 'host=127.0.0.1 port={} user=postgres dbname=legacy' PUBLICATION bench_sub WITH (copy_data = false, enabled = false)",
            src.port()
        ))
        .await
        .expect("subscription");
    write_rows(&source, rows + 1, backlog).await;
    let want_cdc = count(&source, "bench_orders").await;
    let started = Instant::now();
    let (stop, task) = start_cdc(&config);
    wait_count(&via_cdc, "bench_orders", want_cdc, Duration::from_secs(600)).await;
    let cdc_apply = started.elapsed();
    stop.cancel();
    let _ = task.await;
    let started = Instant::now();
    via_sub
        .batch_execute("ALTER SUBSCRIPTION bench_sub ENABLE")
        .await
        .expect("enable");
    wait_count(&via_sub, "bench_orders", backlog, Duration::from_secs(600)).await;
    let sub_apply = started.elapsed();
    println!(
        "(b) backlog apply strangler {:>9.0} rows/s | subscription {:>9.0} rows/s | ratio {:.2}x (goal >= 2x)",
        backlog as f64 / cdc_apply.as_secs_f64(),
        backlog as f64 / sub_apply.as_secs_f64(),
        sub_apply.as_secs_f64() / cdc_apply.as_secs_f64()
    );

    let snapshot_ratio = dump_time.as_secs_f64() / cdc_time.as_secs_f64();
    let apply_ratio = sub_apply.as_secs_f64() / cdc_apply.as_secs_f64();

    // (c) steady-rate lag, one after the other on identical load.
    via_sub
        .batch_execute("ALTER SUBSCRIPTION bench_sub DISABLE")
        .await
        .expect("disable");
    let from = rows + backlog + 1;
    let (stop, task) = start_cdc(&config);
    wait_count(&via_cdc, "bench_orders", want_cdc, Duration::from_secs(60)).await;
    // Two seconds of warm-up (a restarted walsender first re-reads WAL up to where
    // it stopped), then the measured phase.
    let warm = steady(&source, from, rate, 2).await;
    let written = warm + steady(&source, from + warm, rate, seconds).await;
    wait_count(
        &via_cdc,
        "bench_orders",
        want_cdc + written,
        Duration::from_secs(120),
    )
    .await;
    let (cdc_p50, cdc_p99) = lag_percentiles(&via_cdc, from + warm).await;
    stop.cancel();
    let _ = task.await;
    // The subscription catches up on the rows just written (not measured), then
    // measures its own steady phase.
    via_sub
        .batch_execute("ALTER SUBSCRIPTION bench_sub ENABLE")
        .await
        .expect("enable");
    let sub_base = backlog + written;
    wait_count(&via_sub, "bench_orders", sub_base, Duration::from_secs(300)).await;
    let from2 = from + written;
    let warm2 = steady(&source, from2, rate, 2).await;
    let written2 = warm2 + steady(&source, from2 + warm2, rate, seconds).await;
    wait_count(
        &via_sub,
        "bench_orders",
        sub_base + written2,
        Duration::from_secs(120),
    )
    .await;
    let (sub_p50, sub_p99) = lag_percentiles(&via_sub, from2 + warm2).await;
    println!(
        "(c) lag at {rate} rows/s  strangler p50 {cdc_p50:.1} ms p99 {cdc_p99:.1} ms | subscription p50 {sub_p50:.1} ms p99 {sub_p99:.1} ms (goal p99 <= 100 ms)"
    );
    via_sub
        .batch_execute("ALTER SUBSCRIPTION bench_sub DISABLE; ALTER SUBSCRIPTION bench_sub SET (slot_name = NONE); DROP SUBSCRIPTION bench_sub")
        .await
        .ok();

    let pgbench_seconds = env("STRANGLER_BENCH_PGBENCH_SECONDS", 60);
    let mut tps_ratio = f64::NAN;
    if pgbench_seconds > 0 {
        tps_ratio = sustained_pgbench(&src, &tgt, pgbench_seconds).await;
    }
    println!(
        "snapshot_ratio={snapshot_ratio:.2} apply_ratio={apply_ratio:.2} lag_p99_ms={cdc_p99:.1} pgbench_tps_ratio={tps_ratio:.2}"
    );
}

/// pgbench's tps over `seconds` with 4 clients (commits wait for the WAL flush, as
/// on a real server, which is also when a walsender may send them).
fn pgbench(src: &Postgres, seconds: u64) -> f64 {
    let out = Command::new(format!("{BIN}/pgbench"))
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &src.port().to_string(),
            "-U",
            "postgres",
            "-c",
            "4",
            "-j",
            "2",
            "-T",
            &seconds.to_string(),
            "pgb",
        ])
        .env("PGOPTIONS", "-c synchronous_commit=on")
        .output()
        .expect("pgbench");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "pgbench failed: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text.lines()
        .find_map(|l| l.strip_prefix("tps = "))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("pgbench printed no tps")
}

/// (d): pgbench scale 10 on the source, without and then with CDC streaming its
/// accounts, tellers and branches to the target (history has no key and is not
/// mapped). Lag: for each source WAL position sampled every 10 ms, the time until
/// the target's checkpoint reached it. Returns tps with ÷ tps without.
async fn sustained_pgbench(src: &Postgres, tgt: &Postgres, seconds: u64) -> f64 {
    src.create_database("pgb").await.expect("db");
    tgt.create_database("pgbtarget").await.expect("db");
    let init = Command::new(format!("{BIN}/pgbench"))
        .args([
            "-i",
            "-q",
            "-s",
            "10",
            "-h",
            "127.0.0.1",
            "-p",
            &src.port().to_string(),
            "-U",
            "postgres",
            "pgb",
        ])
        .output()
        .expect("pgbench -i");
    assert!(init.status.success(), "pgbench -i failed");
    let schema = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "{BIN}/pg_dump -s -h 127.0.0.1 -p {} -U postgres -t pgbench_accounts -t pgbench_tellers -t pgbench_branches pgb | {BIN}/psql -q -h 127.0.0.1 -p {} -U postgres -d pgbtarget -v ON_ERROR_STOP=1 >/dev/null",
            src.port(),
            tgt.port()
        ))
        .status()
        .expect("schema");
    assert!(schema.success());
    let without = pgbench(src, seconds);

    let config_text = format!(
        "[source]\nurl = \"{}\"\nslot = \"pgb\"\npublication = \"pgb\"\n[target]\nurl = \"{}\"\n[apply]\nheartbeat_ms = 1000\n\
         [[map]]\ntarget = \"pgbench_accounts\"\nsql = \"SELECT * FROM pgbench_accounts\"\n\
         [[map]]\ntarget = \"pgbench_tellers\"\nsql = \"SELECT * FROM pgbench_tellers\"\n\
         [[map]]\ntarget = \"pgbench_branches\"\nsql = \"SELECT * FROM pgbench_branches\"\n",
        src.url("pgb"),
        tgt.url("pgbtarget"),
    );
    let config = CdcConfig::parse(&config_text, Path::new("pgbench.toml")).expect("config");
    let target = tgt.connect("pgbtarget").await.expect("target");
    let source = src.connect("pgb").await.expect("source");
    let (stop, task) = start_cdc(&config);
    let started = Instant::now();
    while target
        .query_opt(
            "SELECT 1 FROM strangler.cdc_checkpoint WHERE slot = 'pgb'",
            &[],
        )
        .await
        .ok()
        .flatten()
        .is_none()
    {
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "pgbench snapshot did not finish"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let lsn = |text: String| text.parse::<strangler_cdc::Lsn>().map(|l| l.0).unwrap_or(0);
    let sampling = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let sampler = {
        let sampling = Arc::clone(&sampling);
        tokio::spawn(async move {
            let mut pending: std::collections::VecDeque<(Instant, u64)> = Default::default();
            let mut lags = Vec::new();
            while sampling.load(std::sync::atomic::Ordering::Relaxed) {
                if let Ok(row) = source
                    .query_one("SELECT pg_current_wal_lsn()::text", &[])
                    .await
                {
                    pending.push_back((Instant::now(), lsn(row.get(0))));
                }
                if let Ok(row) = target
                    .query_one(
                        "SELECT lsn::text FROM strangler.cdc_checkpoint WHERE slot = 'pgb'",
                        &[],
                    )
                    .await
                {
                    let applied = lsn(row.get(0));
                    while pending.front().is_some_and(|(_, at)| *at <= applied) {
                        if let Some((t, _)) = pending.pop_front() {
                            lags.push(t.elapsed().as_secs_f64() * 1000.0);
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            lags
        })
    };
    // pgbench blocks this thread; the CDC run and the sampler have the other.
    let with = tokio::task::block_in_place(|| pgbench(src, seconds));
    sampling.store(false, std::sync::atomic::Ordering::Relaxed);
    let mut lags = sampler.await.expect("sampler");
    stop.cancel();
    let _ = task.await;
    lags.sort_by(f64::total_cmp);
    let pct = |p: f64| {
        lags.get(((lags.len() as f64 - 1.0) * p).round() as usize)
            .copied()
            .unwrap_or(f64::NAN)
    };
    println!(
        "(d) pgbench scale 10, 4 clients, {seconds} s: {without:.0} tps without CDC | {with:.0} tps with CDC streaming ({:.2}x) | lag p50 {:.1} ms p99 {:.1} ms ({} samples)",
        with / without,
        pct(0.5),
        pct(0.99),
        lags.len()
    );
    with / without
}
