//! MariaDB ↔ PostgreSQL CDC benchmark (run by bench/cdc-mysql.sh), on testkit servers:
//!
//! (a) snapshot rows/s: strangler's consistent snapshot of a MariaDB table into
//!     PostgreSQL vs the hand pipe `mariadb --batch -e SELECT … | psql -c COPY`;
//! (b) streaming rows/s: a backlog of binlog changes applied after a restart;
//! (c) round trip: a row written on the new side (PostgreSQL) until it is readable on
//!     the legacy side (MariaDB) through the reverse stream, p50/p99.
//!
//! STRANGLER_BENCH_ROWS (default 200000), STRANGLER_BENCH_BACKLOG (default 100000),
//! STRANGLER_BENCH_SAMPLES (default 300).

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mysql_async::prelude::Queryable;
use strangler_cdc::pipeline::{Progress, RunOptions, run_with};
use strangler_cdc::{CancellationToken, CdcConfig};
use strangler_testkit::{MariaDb, Postgres};

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

const SOURCE: &str = "CREATE TABLE orders (id BIGINT AUTO_INCREMENT PRIMARY KEY, customer_id INT NOT NULL, \
    total DECIMAL(12,2) NOT NULL, status VARCHAR(16) NOT NULL, note VARCHAR(200) NULL, created DATETIME(3) NOT NULL)";
const TARGET: &str = "CREATE TABLE orders (id bigint PRIMARY KEY, customer_id int NOT NULL, total numeric(12,2) NOT NULL, \
    status text NOT NULL, note text, created timestamp(3) NOT NULL)";

async fn insert_rows(db: &mut mysql_async::Conn, from: u64, n: u64, per_tx: u64) {
    let mut i = 0;
    while i < n {
        let k = per_tx.min(n - i);
        let values: Vec<String> = (0..k)
            .map(|j| {
                let id = from + i + j;
                format!(
                    "({id}, {}, {}.{:02}, 'paid', 'order note {id}', '2026-11-27 10:00:00.{:03}')",
                    id % 1000,
                    id % 5000,
                    id % 100,
                    id % 1000
                )
            })
            .collect();
        db.query_drop(format!(
            "INSERT INTO orders (id, customer_id, total, status, note, created) VALUES {}",
            values.join(",")
        ))
        .await
        .expect("insert");
        i += k;
    }
}

async fn pg_count(db: &tokio_postgres::Client, table: &str) -> i64 {
    db.query_one(&format!("SELECT count(*) FROM {table}"), &[])
        .await
        .map(|r| r.get(0))
        .unwrap_or(-1)
}

/// Runs `config` in the background until `stop`.
fn start(
    config: CdcConfig,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<Result<(), strangler_cdc::CdcError>> {
    tokio::spawn(async move {
        run_with(
            &config,
            RunOptions {
                stop: Some(stop),
                ..RunOptions::default()
            },
            Arc::new(Progress::default()),
        )
        .await
    })
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

#[tokio::main]
async fn main() {
    let rows = env("STRANGLER_BENCH_ROWS", 200_000);
    let backlog = env("STRANGLER_BENCH_BACKLOG", 100_000);
    let samples = env("STRANGLER_BENCH_SAMPLES", 300);
    let (maria, pg) = tokio::join!(MariaDb::start(), Postgres::start());
    let (maria, pg) = (maria.expect("mariadb"), pg.expect("postgres"));
    let db = maria.fresh_database("bench").await.expect("db");
    let mut legacy = maria.connect(&db).await.expect("connect");
    legacy.query_drop(SOURCE).await.expect("schema");
    insert_rows(&mut legacy, 1, rows, 2_000).await;
    let new_db = pg.fresh_database("bench").await.expect("db");
    let new = pg.connect(&new_db).await.expect("connect");
    new.batch_execute(&format!(
        "{TARGET}; {}",
        TARGET.replace("TABLE orders", "TABLE orders_ref")
    ))
    .await
    .expect("target schema");

    // (a) reference: the hand pipe, TSV out of MariaDB into COPY.
    let started = Instant::now();
    let mut dump = Command::new("mariadb")
        .args([
            "--batch",
            "--skip-column-names",
            "--protocol=TCP",
            "-h127.0.0.1",
            &format!("-P{}", maria.port()),
            &format!("-u{}", strangler_testkit::mariadb::USER),
            &format!("-p{}", strangler_testkit::mariadb::PASSWORD),
            &db,
            "-e",
            "SELECT id, customer_id, total, status, IFNULL(note, '\\\\N'), created FROM orders",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .expect("mariadb client");
    let status = Command::new("psql")
        .args([&pg.url(&new_db), "-q", "-c", "\\copy orders_ref FROM STDIN"])
        .stdin(dump.stdout.take().expect("pipe"))
        .status()
        .expect("psql");
    let dumped = dump.wait().expect("mariadb client");
    assert!(
        status.success() && dumped.success(),
        "the reference pipe failed"
    );
    let reference = started.elapsed();
    assert_eq!(pg_count(&new, "orders_ref").await, rows as i64);

    // (a) strangler: consistent snapshot, checkpoint written at its end.
    let config = CdcConfig::parse(
        &format!(
            "[source]\nurl = \"{}\"\nslot = \"bench\"\nignore_server_ids = [4242]\n[target]\nurl = \"{}\"\n[apply]\nbatch_rows = 5000\nbatch_ms = 20\n\n\
             [[map]]\ntarget = \"orders\"\nsql = \"SELECT * FROM orders\"\n",
            maria.url(&db),
            pg.url(&new_db)
        ),
        Path::new("bench.toml"),
    )
    .expect("config");
    let stop = CancellationToken::new();
    let started = Instant::now();
    let run = start(config.clone(), stop.clone());
    while new
        .query_opt(
            "SELECT 1 FROM strangler.cdc_checkpoint WHERE slot = 'bench'",
            &[],
        )
        .await
        .ok()
        .flatten()
        .is_none()
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let snapshot = started.elapsed();
    assert_eq!(pg_count(&new, "orders").await, rows as i64);
    stop.cancel();
    run.await.expect("join").expect("run");

    // (b) a backlog written while the stream is stopped, applied after a restart.
    insert_rows(&mut legacy, rows + 1, backlog, 100).await;
    let stop = CancellationToken::new();
    let started = Instant::now();
    let run = start(config.clone(), stop.clone());
    while pg_count(&new, "orders").await < (rows + backlog) as i64 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let streaming = started.elapsed();

    // (c) reverse stream; rows written in PostgreSQL until readable in MariaDB.
    let reverse = CdcConfig::parse(
        &format!(
            "[source]\nurl = \"{}\"\nslot = \"bench_reverse\"\npublication = \"bench_reverse\"\n[target]\nurl = \"{}\"\nserver_id = 4242\n[apply]\nsnapshot = false\nbatch_ms = 5\n\n\
             [[map]]\ntarget = \"orders\"\nsql = \"SELECT * FROM orders\"\n",
            pg.url(&new_db),
            maria.url(&db)
        ),
        Path::new("reverse.toml"),
    )
    .expect("reverse config");
    let rev = start(reverse, stop.clone());
    tokio::time::sleep(Duration::from_secs(2)).await;
    // The testkit runs PostgreSQL with synchronous_commit = off (fast tests), which
    // holds WAL — and so the stream — up to wal_writer_delay; the application's own
    // session commits as production does.
    new.batch_execute("SET synchronous_commit = on")
        .await
        .expect("synchronous commit");
    let mut probe = maria.connect(&db).await.expect("probe");
    let mut latencies = Vec::new();
    for i in 0..samples {
        let id = 10_000_000 + 2 * i as i64;
        let t0 = Instant::now();
        new.execute(
            "INSERT INTO orders VALUES ($1, 1, 1.00, 'placed', 'from new', now()::timestamp(3))",
            &[&id],
        )
        .await
        .expect("insert on new");
        loop {
            let seen: Option<u8> = probe
                .exec_first("SELECT 1 FROM orders WHERE id = ?", (id,))
                .await
                .expect("probe");
            if seen.is_some() {
                break;
            }
            if t0.elapsed() > Duration::from_secs(10) {
                panic!("row {id} never reached MariaDB");
            }
            tokio::time::sleep(Duration::from_micros(500)).await;
        }
        latencies.push(t0.elapsed().as_secs_f64() * 1000.0);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop.cancel();
    let _ = run.await;
    let _ = rev.await;
    latencies.sort_by(f64::total_cmp);

    let rps = |n: u64, d: Duration| n as f64 / d.as_secs_f64();
    println!("MariaDB 10.11 → PostgreSQL 15, one table, {rows} rows (+{backlog} backlog)");
    println!(
        "snapshot   strangler {:>7.2} s  {:>9.0} rows/s | mariadb --batch | psql COPY {:>6.2} s  {:>9.0} rows/s | ratio {:.2}×",
        snapshot.as_secs_f64(),
        rps(rows, snapshot),
        reference.as_secs_f64(),
        rps(rows, reference),
        reference.as_secs_f64() / snapshot.as_secs_f64()
    );
    println!(
        "streaming  backlog of {backlog} binlog rows (transactions of 100) applied in {:.2} s: {:.0} rows/s",
        streaming.as_secs_f64(),
        rps(backlog, streaming)
    );
    println!(
        "round trip new (PostgreSQL) → legacy (MariaDB), {} single-row writes: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        latencies.len(),
        pct(&latencies, 0.5),
        pct(&latencies, 0.99),
        latencies.last().copied().unwrap_or(f64::NAN)
    );
    // MariaDB has no replication into PostgreSQL of its own to set the apply rate
    // against: it is printed as rows/s.
    println!(
        "snapshot_ratio={:.2} apply_rows_per_s={:.0} lag_p99_ms={:.1}",
        reference.as_secs_f64() / snapshot.as_secs_f64(),
        rps(backlog, streaming),
        pct(&latencies, 0.99)
    );
}
