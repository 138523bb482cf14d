//! MariaDB (legacy) → PostgreSQL (new) CDC against real servers from the testkit:
//! a consistent snapshot, the binlog streamed from its exact position under
//! concurrent writes, resume from the checkpoint after a stop, and a schema change on
//! a mapped table stopping the stream with a clear message.

use std::path::Path;
use std::time::{Duration, Instant};

use mysql_async::prelude::Queryable;
use strangler_cdc::CdcConfig;
use strangler_cdc::run::{RunOptions, run};
use strangler_testkit::{MariaDb, Postgres};
use tokio_postgres::Client;

const SOURCE_SCHEMA: &[&str] = &[
    "CREATE TABLE customers (id INT AUTO_INCREMENT PRIMARY KEY, email VARCHAR(200) NOT NULL, name VARCHAR(100) NULL, active TINYINT(1) NOT NULL DEFAULT 1)",
    "CREATE TABLE orders (
        id BIGINT AUTO_INCREMENT PRIMARY KEY,
        customer_id INT NOT NULL,
        total DECIMAL(10,2) NOT NULL,
        status ENUM('draft','placed','paid') NOT NULL,
        note TEXT NULL,
        created DATETIME(3) NOT NULL,
        updated TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP,
        data VARBINARY(16) NULL,
        meta LONGTEXT NULL
    )",
];

const TARGET_SCHEMA: &str = "
CREATE TABLE customers (id int PRIMARY KEY, email text NOT NULL, name text, active boolean NOT NULL);
CREATE TABLE orders_v2 (
    id bigint PRIMARY KEY,
    buyer int NOT NULL,
    total numeric(10,2) NOT NULL,
    status text NOT NULL,
    note text,
    created timestamp(3) NOT NULL,
    updated timestamptz NOT NULL,
    data bytea,
    meta jsonb
);
";

fn config(source: &str, target: &str) -> CdcConfig {
    let text = format!(
        "[source]\nurl = \"{source}\"\nslot = \"shop_forward\"\n[target]\nurl = \"{target}\"\n[apply]\nbatch_ms = 10\n\n\
         [[map]]\ntarget = \"customers\"\nsql = \"SELECT * FROM customers\"\n\n\
         [[map]]\ntarget = \"orders_v2\"\nsql = \"\"\"\n\
         SELECT id, customer_id AS buyer, total, status, note, created, updated, data, meta::jsonb AS meta\n\
         FROM orders WHERE status <> 'draft'\"\"\"\n"
    );
    CdcConfig::parse(&text, Path::new("cdc.toml")).expect("config")
}

/// id, customer, total, status, note, created ms, updated s, data hex, meta.
type SourceRow = (
    i64,
    i32,
    String,
    String,
    Option<String>,
    i64,
    i64,
    Option<String>,
    Option<String>,
);

/// The rows the mapping should produce, read from MariaDB, as comparable text.
async fn source_rows(db: &mut mysql_async::Conn) -> Vec<String> {
    db.query_drop("SET time_zone = '+00:00'").await.expect("tz");
    let rows: Vec<SourceRow> = db
        .query(
            "SELECT id, customer_id, CAST(total AS CHAR), CAST(status AS CHAR), note,
                    CAST(UNIX_TIMESTAMP(created) * 1000 AS SIGNED), UNIX_TIMESTAMP(updated),
                    LOWER(HEX(data)), meta
             FROM orders WHERE status <> 'draft' ORDER BY id",
        )
        .await
        .expect("source rows");
    rows.into_iter()
        .map(
            |(id, c, total, status, note, created, updated, data, meta)| {
                let meta = meta.map(|m| {
                    serde_json::from_str::<serde_json::Value>(&m)
                        .expect("json")
                        .to_string()
                });
                format!("{id}|{c}|{total}|{status}|{note:?}|{created}|{updated}|{data:?}|{meta:?}")
            },
        )
        .collect()
}

async fn target_rows(db: &Client) -> Vec<String> {
    db.query(
        "SELECT id, buyer, total::text, status, note,
                (extract(epoch FROM created) * 1000)::bigint, extract(epoch FROM updated)::bigint,
                encode(data, 'hex'), meta::text
         FROM orders_v2 ORDER BY id",
        &[],
    )
    .await
    .expect("target rows")
    .iter()
    .map(|r| {
        let meta: Option<String> = r.get(8);
        let meta = meta.map(|m| {
            serde_json::from_str::<serde_json::Value>(&m)
                .expect("json")
                .to_string()
        });
        format!(
            "{}|{}|{}|{}|{:?}|{}|{}|{:?}|{:?}",
            r.get::<_, i64>(0),
            r.get::<_, i32>(1),
            r.get::<_, String>(2),
            r.get::<_, String>(3),
            r.get::<_, Option<String>>(4),
            r.get::<_, i64>(5),
            r.get::<_, i64>(6),
            r.get::<_, Option<String>>(7).filter(|s| !s.is_empty()),
            meta
        )
    })
    .collect()
}

async fn wait_equal(source: &mut mysql_async::Conn, target: &Client, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let (s, t) = (source_rows(source).await, target_rows(target).await);
        if s == t {
            return;
        }
        if Instant::now() > deadline {
            let id = |r: &String| r.split('|').next().unwrap_or("").to_string();
            let by_id = |rows: &[String], k: &str| rows.iter().find(|r| id(r) == k).cloned();
            let missing: Vec<_> = s
                .iter()
                .filter(|r| !t.contains(r))
                .take(3)
                .map(|r| (r.clone(), by_id(&t, &id(r))))
                .collect();
            let extra: Vec<_> = t
                .iter()
                .filter(|r| !s.contains(r))
                .take(3)
                .map(|r| (r.clone(), by_id(&s, &id(r))))
                .collect();
            panic!(
                "target differs from the mapped source ({} vs {} rows)\nmissing: {missing:#?}\nextra: {extra:#?}",
                s.len(),
                t.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn seed(db: &mut mysql_async::Conn, customers: u32, orders: u32) {
    for c in 1..=customers {
        db.exec_drop(
            "INSERT INTO customers (email, name, active) VALUES (?, ?, ?)",
            (
                format!("c{c}@example.com"),
                format!("Customer {c}"),
                c % 3 != 0,
            ),
        )
        .await
        .expect("customer");
    }
    for o in 1..=orders {
        db.exec_drop(
            "INSERT INTO orders (customer_id, total, status, note, created, data, meta) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                o % customers + 1,
                format!("{}.{:02}", o * 3, o % 100),
                ["draft", "placed", "paid"][(o % 3) as usize],
                if o % 4 == 0 { None } else { Some(format!("note {o} — é")) },
                format!("2026-11-{:02} 10:{:02}:{:02}.{:03}", 1 + o % 27, o % 60, (o * 7) % 60, o % 1000),
                if o % 5 == 0 { None } else { Some(vec![o as u8, 0u8, 255u8]) },
                if o % 2 == 0 { Some(format!("{{\"n\": {o}, \"tags\": [\"a\"]}}")) } else { None },
            ),
        )
        .await
        .expect("order");
    }
}

/// Writes during the run: inserts, updates (including into and out of the filter),
/// deletes, in multi-statement transactions.
async fn churn(db: &mut mysql_async::Conn, round: u32) {
    let mut tx = db
        .start_transaction(mysql_async::TxOpts::default())
        .await
        .expect("tx");
    tx.exec_drop(
        "INSERT INTO orders (customer_id, total, status, note, created, data) VALUES (?, ?, 'placed', ?, NOW(3), ?)",
        (round % 20 + 1, format!("{round}.50"), format!("live {round}"), vec![round as u8]),
    )
    .await
    .expect("insert");
    tx.exec_drop(
        "UPDATE orders SET total = total + 1, note = CONCAT(COALESCE(note, ''), '+') WHERE id = ?",
        (u64::from(round % 300) + 1,),
    )
    .await
    .expect("update");
    tx.exec_drop(
        "UPDATE orders SET status = IF(status = 'draft', 'paid', 'draft') WHERE id = ?",
        (u64::from(round * 7 % 300) + 1,),
    )
    .await
    .expect("toggle");
    if round.is_multiple_of(5) {
        tx.exec_drop(
            "DELETE FROM orders WHERE id = ?",
            (u64::from(round * 13 % 300) + 1,),
        )
        .await
        .expect("delete");
    }
    tx.commit().await.expect("commit");
}

#[tokio::test]
async fn mariadb_snapshot_then_binlog_under_writes_resumes_and_stops_at_ddl() {
    let (maria, pg) = tokio::join!(MariaDb::start(), Postgres::start());
    let (maria, pg) = (maria.expect("mariadb"), pg.expect("postgres"));
    let db = maria.fresh_database("shop").await.expect("database");
    let mut src = maria.connect(&db).await.expect("connect");
    for ddl in SOURCE_SCHEMA {
        src.query_drop(*ddl).await.expect("source schema");
    }
    seed(&mut src, 20, 300).await;
    let target_db = pg.fresh_database("orders").await.expect("target db");
    let target = pg.connect(&target_db).await.expect("target");
    target
        .batch_execute(TARGET_SCHEMA)
        .await
        .expect("target schema");
    let config = config(&maria.url(&db), &pg.url(&target_db));
    strangler_cdc::check(&config)
        .await
        .expect("the mappings fit both schemas");

    // Snapshot + stream while writes continue.
    let stop = strangler_cdc::CancellationToken::new();
    let options = RunOptions {
        stop: Some(stop.clone()),
        ..RunOptions::default()
    };
    let running = {
        let config = config.clone();
        tokio::spawn(async move { run(&config, options).await })
    };
    let mut writer = maria.connect(&db).await.expect("writer");
    for round in 0..60 {
        churn(&mut writer, round).await;
        if round % 10 == 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    wait_equal(&mut src, &target, Duration::from_secs(30)).await;
    let customers: i64 = target
        .query_one("SELECT count(*) FROM customers WHERE active", &[])
        .await
        .expect("customers")
        .get(0);
    assert_eq!(customers, 14, "TINYINT(1) arrives as boolean");
    let checkpoint: String = target
        .query_one(
            "SELECT lsn::text FROM strangler.cdc_checkpoint WHERE slot = 'shop_forward'",
            &[],
        )
        .await
        .expect("checkpoint")
        .get(0);
    assert!(checkpoint.contains('/'), "{checkpoint}");

    // Stop; write while nothing streams; start again: it resumes from the checkpoint
    // (no snapshot: the target is not truncated, a marker row survives).
    stop.cancel();
    running.await.expect("join").expect("the run stops cleanly");
    target
        .execute(
            "INSERT INTO customers VALUES (9999, 'marker@example.com', NULL, true)",
            &[],
        )
        .await
        .expect("marker");
    for round in 60..90 {
        churn(&mut writer, round).await;
    }
    let stop = strangler_cdc::CancellationToken::new();
    let options = RunOptions {
        stop: Some(stop.clone()),
        ..RunOptions::default()
    };
    let running = {
        let config = config.clone();
        tokio::spawn(async move { run(&config, options).await })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    if running.is_finished() {
        panic!("the resumed run stopped: {:?}", running.await);
    }
    wait_equal(&mut src, &target, Duration::from_secs(30)).await;
    let marker: i64 = target
        .query_one("SELECT count(*) FROM customers WHERE id = 9999", &[])
        .await
        .expect("marker")
        .get(0);
    assert_eq!(marker, 1, "a resumed stream does not copy again");

    // A schema change on a mapped table stops the stream, with the statement named;
    // the writes before it are applied.
    writer
        .query_drop("INSERT INTO orders (customer_id, total, status, created) VALUES (1, 1.00, 'paid', NOW(3))")
        .await
        .expect("insert");
    writer
        .query_drop("ALTER TABLE orders ADD COLUMN coupon VARCHAR(20) NULL")
        .await
        .expect("alter");
    let result = tokio::time::timeout(Duration::from_secs(30), running)
        .await
        .expect("the stream stops by itself")
        .expect("join");
    let message = result
        .expect_err("a schema change stops the stream")
        .to_string();
    assert!(
        message.contains("schema change on mapped table") && message.contains("ADD COLUMN coupon"),
        "{message}"
    );
    wait_equal(&mut src, &target, Duration::from_secs(5)).await;
    let _ = stop;
}
