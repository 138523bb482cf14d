//! `strangler cdc run` between a real MariaDB (legacy) and PostgreSQL (new), both
//! directions as processes: SIGKILL both under writes on both sides, restart, and
//! nothing is lost or applied twice.

mod support;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use mysql_async::prelude::Queryable;
use strangler_testkit::{MariaDb, Postgres};
use support::strangler_bin;

/// A `strangler cdc run` process, killed when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn run(dir: &std::path::Path, config: &str, log: &str) -> Proc {
    let log = std::fs::File::options()
        .create(true)
        .append(true)
        .open(dir.join(log))
        .expect("log");
    Proc(
        Command::new(strangler_bin())
            .args(["cdc", "run", "--config"])
            .arg(dir.join(config))
            .env("STRANGLER_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn strangler cdc"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_both_directions_under_writes_on_both_sides_loses_and_doubles_nothing() {
    let (maria, pg) = tokio::join!(MariaDb::start(), Postgres::start());
    let (maria, pg) = (maria.expect("mariadb"), pg.expect("postgres"));
    let db = maria.fresh_database("legacy").await.expect("db");
    let mut legacy = maria.connect(&db).await.expect("legacy");
    for ddl in [
        "CREATE TABLE events (id BIGINT AUTO_INCREMENT PRIMARY KEY, account INT NOT NULL, amount BIGINT NOT NULL, note VARCHAR(50))",
        // Rows written by the reverse stream (even ids), each time one is applied.
        "CREATE TABLE apply_log (id BIGINT NOT NULL)",
        "CREATE TRIGGER counted_insert AFTER INSERT ON events FOR EACH ROW INSERT INTO apply_log VALUES (NEW.id)",
        "CREATE TRIGGER counted_update AFTER UPDATE ON events FOR EACH ROW INSERT INTO apply_log VALUES (NEW.id)",
    ] {
        legacy.query_drop(ddl).await.expect("legacy schema");
    }
    let new_db = pg.fresh_database("new").await.expect("db");
    let new = pg.connect(&new_db).await.expect("new");
    new.batch_execute(
        "CREATE TABLE ledger (id bigint PRIMARY KEY, account int NOT NULL, amount_cents bigint NOT NULL, note text);
         ALTER TABLE ledger REPLICA IDENTITY FULL;
         CREATE TABLE apply_log (id bigint NOT NULL);
         CREATE FUNCTION log_apply() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN INSERT INTO apply_log VALUES (NEW.id); RETURN NEW; END $$;
         CREATE TRIGGER counted AFTER INSERT OR UPDATE ON ledger FOR EACH ROW EXECUTE FUNCTION log_apply();",
    )
    .await
    .expect("new schema");
    let dir = tempfile::tempdir().expect("dir");
    std::fs::write(
        dir.path().join("forward.toml"),
        format!(
            "[source]\nurl = \"{}\"\nslot = \"forward\"\nignore_server_ids = [4242]\n[target]\nurl = \"{}\"\n[apply]\nbatch_ms = 10\n\n\
             [[map]]\ntarget = \"ledger\"\nsql = \"SELECT id, account, amount AS amount_cents, note FROM events\"\n",
            maria.url(&db),
            pg.url(&new_db)
        ),
    )
    .expect("forward config");
    std::fs::write(
        dir.path().join("reverse.toml"),
        format!(
            "[source]\nurl = \"{}\"\nslot = \"reverse\"\npublication = \"reverse\"\n[target]\nurl = \"{}\"\nserver_id = 4242\n[apply]\nbatch_ms = 10\nsnapshot = false\n\n\
             [[map]]\ntarget = \"events\"\nsql = \"SELECT id, account, amount_cents AS amount, note FROM ledger\"\n",
            pg.url(&new_db),
            maria.url(&db)
        ),
    )
    .expect("reverse config");
    let forward = run(dir.path(), "forward.toml", "forward.log");
    let deadline = Instant::now() + Duration::from_secs(30);
    while new
        .query_opt(
            "SELECT 1 FROM strangler.cdc_checkpoint WHERE slot = 'forward'",
            &[],
        )
        .await
        .ok()
        .flatten()
        .is_none()
    {
        assert!(Instant::now() < deadline, "forward never started");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let reverse = run(dir.path(), "reverse.toml", "reverse.log");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let seen: Option<String> = legacy
            .query_first("SELECT lsn FROM strangler_cdc_checkpoint WHERE slot = 'reverse'")
            .await
            .ok()
            .flatten();
        if seen.is_some() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "reverse never started:\n{}",
            std::fs::read_to_string(dir.path().join("reverse.log")).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Writers on both sides: legacy takes odd ids, new even ones.
    let rounds = 100u64;
    let legacy_writer = {
        let mut conn = maria.connect(&db).await.expect("writer");
        tokio::spawn(async move {
            conn.query_drop("SET SESSION auto_increment_increment = 2, auto_increment_offset = 1")
                .await
                .expect("odd ids");
            for round in 0..rounds {
                let values: Vec<String> = (0..20)
                    .map(|g| format!("({}, {}, 'legacy {round}')", g % 9, round * 100 + g))
                    .collect();
                conn.query_drop(format!(
                    "INSERT INTO events (account, amount, note) VALUES {}",
                    values.join(",")
                ))
                .await
                .expect("legacy insert");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    let new_writer = {
        let conn = pg.connect(&new_db).await.expect("writer");
        tokio::spawn(async move {
            for round in 0..rounds as i64 {
                conn.execute(
                    "INSERT INTO ledger SELECT 2000000 + 2 * ($1::bigint * 20 + g), g % 9, $1::bigint * 100 + g, 'new ' || $1::bigint FROM generate_series(0, 19) g",
                    &[&round],
                )
                .await
                .expect("new insert");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(700)).await;
    drop(forward); // SIGKILL
    drop(reverse);
    let forward = run(dir.path(), "forward.toml", "forward.log");
    let reverse = run(dir.path(), "reverse.toml", "reverse.log");
    legacy_writer.await.expect("legacy writer");
    new_writer.await.expect("new writer");

    let total = 2 * 20 * rounds as i64;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let l: i64 = legacy
            .query_first("SELECT count(*) FROM events")
            .await
            .expect("count")
            .unwrap_or(0);
        let n: i64 = new
            .query_one("SELECT count(*) FROM ledger", &[])
            .await
            .expect("count")
            .get(0);
        if l == total && n == total {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "legacy {l}, new {n} of {total}\nforward:\n{}\nreverse:\n{}",
            std::fs::read_to_string(dir.path().join("forward.log")).unwrap_or_default(),
            std::fs::read_to_string(dir.path().join("reverse.log")).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let legacy_rows: Vec<(i64, i32, i64, String)> = legacy
        .query("SELECT id, account, amount, note FROM events ORDER BY id")
        .await
        .expect("legacy rows");
    let new_rows: Vec<(i64, i32, i64, String)> = new
        .query(
            "SELECT id, account, amount_cents, note FROM ledger ORDER BY id",
            &[],
        )
        .await
        .expect("new rows")
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    assert_eq!(legacy_rows, new_rows, "both sides hold the same rows");
    // Each row crossed exactly once: legacy's (odd) into new, new's (even) into legacy.
    let crossed_into_new: Vec<(i64, i64)> = new
        .query(
            "SELECT count(*), count(DISTINCT id) FROM apply_log WHERE id % 2 = 1",
            &[],
        )
        .await
        .expect("new log")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let crossed_into_legacy: Option<(i64, i64)> = legacy
        .query_first("SELECT count(*), count(DISTINCT id) FROM apply_log WHERE id % 2 = 0")
        .await
        .expect("legacy log");
    eprintln!(
        "crash test (MariaDB ↔ PostgreSQL): {total} rows, into new {crossed_into_new:?}, into legacy {crossed_into_legacy:?}"
    );
    assert_eq!(
        crossed_into_new,
        vec![(total / 2, total / 2)],
        "forward: once each"
    );
    assert_eq!(
        crossed_into_legacy,
        Some((total / 2, total / 2)),
        "reverse: once each"
    );
    let forward_log = std::fs::read_to_string(dir.path().join("forward.log")).unwrap_or_default();
    assert!(
        forward_log.contains("streaming the binlog"),
        "{forward_log}"
    );
    drop(forward);
    drop(reverse);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binlog_stream_resumes_across_two_mariadb_restarts_under_writes_losing_and_doubling_nothing()
 {
    let (maria, pg) = tokio::join!(MariaDb::start(), Postgres::start());
    let (mut maria, pg) = (maria.expect("mariadb"), pg.expect("postgres"));
    let db = maria.fresh_database("legacy").await.expect("db");
    let mut legacy = maria.connect(&db).await.expect("legacy");
    legacy
        .query_drop("CREATE TABLE events (id BIGINT AUTO_INCREMENT PRIMARY KEY, account INT NOT NULL, amount BIGINT NOT NULL, note VARCHAR(50))")
        .await
        .expect("legacy schema");
    drop(legacy);
    let new_db = pg.fresh_database("new").await.expect("db");
    let new = pg.connect(&new_db).await.expect("new");
    // Every apply of a row is logged: a row applied twice shows up twice.
    new.batch_execute(
        "CREATE TABLE ledger (id bigint PRIMARY KEY, account int NOT NULL, amount_cents bigint NOT NULL, note text);
         CREATE TABLE apply_log (id bigint NOT NULL);
         CREATE FUNCTION log_apply() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN INSERT INTO apply_log VALUES (NEW.id); RETURN NEW; END $$;
         CREATE TRIGGER counted AFTER INSERT OR UPDATE ON ledger FOR EACH ROW EXECUTE FUNCTION log_apply();",
    )
    .await
    .expect("new schema");
    let dir = tempfile::tempdir().expect("dir");
    std::fs::write(
        dir.path().join("forward.toml"),
        format!(
            "[source]\nurl = \"{}\"\nslot = \"forward\"\n[target]\nurl = \"{}\"\n[apply]\nbatch_ms = 10\n\n\
             [[map]]\ntarget = \"ledger\"\nsql = \"SELECT id, account, amount AS amount_cents, note FROM events\"\n",
            maria.url(&db),
            pg.url(&new_db)
        ),
    )
    .expect("forward config");
    let forward = run(dir.path(), "forward.toml", "forward.log");
    let log = || std::fs::read_to_string(dir.path().join("forward.log")).unwrap_or_default();
    support::wait_until(Duration::from_secs(30), "the stream to start", || async {
        log().contains("streaming the binlog")
    })
    .await;

    // A writer that, like an application behind a pool, retries across the restarts.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (url, stop) = (maria.url(&db), std::sync::Arc::clone(&stop));
        tokio::spawn(async move {
            let opts = mysql_async::Opts::from_url(&url.replacen("mariadb://", "mysql://", 1))
                .expect("url");
            let (mut conn, mut written, mut round) = (None, 0u64, 0u64);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                if conn.is_none() {
                    conn = mysql_async::Conn::new(opts.clone()).await.ok();
                    if conn.is_none() {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                }
                let Some(c) = conn.as_mut() else { continue };
                let values: Vec<String> = (0..10)
                    .map(|g| format!("({}, {}, 'round {round}')", g % 7, round * 10 + g))
                    .collect();
                match c
                    .query_drop(format!(
                        "INSERT INTO events (account, amount, note) VALUES {}",
                        values.join(",")
                    ))
                    .await
                {
                    Ok(()) => written += 10,
                    Err(_) => conn = None,
                }
                round += 1;
                tokio::time::sleep(Duration::from_millis(15)).await;
            }
            written
        })
    };
    for _ in 0..2 {
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        maria.restart().await.expect("mariadb back");
    }
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let written = writer.await.expect("writer");
    assert!(written > 0);

    let mut legacy = maria.connect(&db).await.expect("legacy");
    let legacy_rows: Vec<(i64, i32, i64, String)> = legacy
        .query("SELECT id, account, amount, note FROM events ORDER BY id")
        .await
        .expect("legacy rows");
    // Every acknowledged write is there (and any whose answer a restart swallowed).
    assert!(legacy_rows.len() as u64 >= written);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let n: i64 = new
            .query_one("SELECT count(*) FROM ledger", &[])
            .await
            .expect("count")
            .get(0);
        if n as usize == legacy_rows.len() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "new has {n} of {} rows\n{}",
            legacy_rows.len(),
            log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let new_rows: Vec<(i64, i32, i64, String)> = new
        .query(
            "SELECT id, account, amount_cents, note FROM ledger ORDER BY id",
            &[],
        )
        .await
        .expect("new rows")
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    assert_eq!(legacy_rows, new_rows, "both sides hold the same rows");
    let applied: (i64, i64) = new
        .query_one("SELECT count(*), count(DISTINCT id) FROM apply_log", &[])
        .await
        .map(|r| (r.get(0), r.get(1)))
        .expect("apply log");
    assert_eq!(
        applied,
        (legacy_rows.len() as i64, legacy_rows.len() as i64),
        "each row applied once"
    );
    let text = log();
    assert!(
        text.matches("reconnecting in").count() >= 2,
        "the stream reconnected after each restart:\n{text}"
    );
    eprintln!(
        "MariaDB restarted twice under writes: {} rows, {written} acknowledged, all applied once",
        legacy_rows.len()
    );
    drop(forward);
}
