//! `strangler cdc` as a process against two real PostgreSQL servers: crash and
//! resume, idle slots, rejected rows, lost slots.

mod support;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use strangler_testkit::Postgres;
use support::{strangler_bin, wait_until};
use tokio_postgres::Client;

struct Pair {
    src: Postgres,
    tgt: Postgres,
    source: Client,
    target: Client,
    dir: tempfile::TempDir,
    metrics: strangler_testkit::PortLease,
}

const TARGET_DDL: &str = "
CREATE TABLE ledger (id bigint PRIMARY KEY, account int NOT NULL, amount_cents bigint NOT NULL CHECK (amount_cents >= 0), note text);
CREATE TABLE apply_log (id bigint NOT NULL);
CREATE FUNCTION log_apply() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN INSERT INTO apply_log VALUES (NEW.id); RETURN NEW; END $$;
CREATE TRIGGER counted AFTER INSERT OR UPDATE ON ledger FOR EACH ROW EXECUTE FUNCTION log_apply();
";

async fn pair() -> Pair {
    let (src, tgt) = tokio::join!(Postgres::start(), Postgres::start());
    let (src, tgt) = (src.expect("source pg"), tgt.expect("target pg"));
    src.create_database("legacy").await.expect("db");
    tgt.create_database("new").await.expect("db");
    let source = src.connect("legacy").await.expect("source");
    let target = tgt.connect("new").await.expect("target");
    source
        .batch_execute(
            "CREATE TABLE events (id bigserial PRIMARY KEY, account int NOT NULL, amount bigint NOT NULL, note text)",
        )
        .await
        .expect("source schema");
    target
        .batch_execute(TARGET_DDL)
        .await
        .expect("target schema");
    let dir = tempfile::tempdir().expect("dir");
    let metrics = strangler_testkit::free_port().expect("port");
    std::fs::write(
        dir.path().join("cdc.toml"),
        format!(
            "[source]\nurl = \"{}\"\n[target]\nurl = \"{}\"\n[apply]\nbatch_ms = 10\nheartbeat_ms = 300\n[observe]\nmetrics_listen = \"127.0.0.1:{}\"\n\n[[map]]\ntarget = \"ledger\"\nsql = \"SELECT id, account, amount AS amount_cents, note FROM events\"\n",
            src.url("legacy"),
            tgt.url("new"),
            metrics.port()
        ),
    )
    .expect("config");
    Pair {
        src,
        tgt,
        source,
        target,
        dir,
        metrics,
    }
}

impl Pair {
    fn cdc(&self, args: &[&str], log: &str) -> Proc {
        let log = std::fs::File::create(self.dir.path().join(log)).expect("log");
        Proc(
            Command::new(strangler_bin())
                .arg("cdc")
                .args(args)
                .arg("--config")
                .arg(self.dir.path().join("cdc.toml"))
                .env("STRANGLER_LOG", "info")
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("log"))
                .stderr(log)
                .spawn()
                .expect("spawn strangler cdc"),
        )
    }

    /// Runs `strangler cdc ARGS --config <the pair's config>` to completion.
    fn cli(&self, args: &[&str]) -> std::process::Output {
        Command::new(strangler_bin())
            .arg("cdc")
            .args(args)
            .arg("--config")
            .arg(self.dir.path().join("cdc.toml"))
            .output()
            .expect("strangler cdc")
    }

    fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default()
    }

    async fn caught_up(&self) -> bool {
        let goal: String = self
            .source
            .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
            .await
            .expect("lsn")
            .get(0);
        // Our last commit ends at or before the current position; compare with the
        // source's own rows instead of LSNs, which move with unrelated WAL.
        let _ = goal;
        let want: i64 = self
            .source
            .query_one("SELECT count(*) FROM events", &[])
            .await
            .expect("count")
            .get(0);
        let got: i64 = self
            .target
            .query_one("SELECT count(*) FROM ledger", &[])
            .await
            .map(|r| r.get(0))
            .unwrap_or(-1);
        want == got
    }
}

/// A `strangler cdc run` process, killed if a test ends (or panics) without stopping it.
struct Proc(Child);

impl std::ops::Deref for Proc {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for Proc {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn stop(mut child: Proc) -> std::process::ExitStatus {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(child.id()).expect("pid")),
        nix::sys::signal::Signal::SIGTERM,
    );
    for _ in 0..200 {
        if let Ok(Some(status)) = child.try_wait() {
            return status;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    child.wait().expect("wait")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_under_writes_then_restart_loses_nothing_and_applies_nothing_twice() {
    let p = pair().await;
    let first = p.cdc(&["run"], "cdc1.log");
    wait_until(Duration::from_secs(20), "slot", || async {
        p.source
            .query_opt("SELECT 1 FROM pg_replication_slots WHERE active", &[])
            .await
            .ok()
            .flatten()
            .is_some()
    })
    .await;
    let writer = {
        let db = p.src.connect("legacy").await.expect("writer");
        tokio::spawn(async move {
            for round in 0..150i64 {
                db.execute(
                    "INSERT INTO events (account, amount, note) SELECT g % 9, $1::bigint * 100 + g, 'r' || $1::bigint FROM generate_series(1, 20) g",
                    &[&round],
                )
                .await
                .expect("insert");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(700)).await;
    let mut first = first;
    first.kill().expect("SIGKILL");
    let _ = first.wait();
    let applied_at_kill: i64 = p
        .target
        .query_one("SELECT count(*) FROM ledger", &[])
        .await
        .expect("count")
        .get(0);
    let second = p.cdc(&["run"], "cdc2.log");
    writer.await.expect("writer");
    wait_until(Duration::from_secs(60), "catch-up after restart", || {
        p.caught_up()
    })
    .await;
    let verify = p.cli(&["verify"]);
    let report = String::from_utf8_lossy(&verify.stdout);
    assert!(
        verify.status.success(),
        "{report}{}",
        String::from_utf8_lossy(&verify.stderr)
    );
    assert!(report.starts_with("clean"), "{report}");
    let status = stop(second);
    assert!(status.success(), "{status}; log:\n{}", p.log("cdc2.log"));
    assert!(
        p.log("cdc2.log")
            .contains("resuming from the target's checkpoint"),
        "{}",
        p.log("cdc2.log")
    );

    let source_rows: Vec<String> = p
        .source
        .query(
            "SELECT (id, account, amount, note)::text FROM events ORDER BY id",
            &[],
        )
        .await
        .expect("source")
        .iter()
        .map(|r| r.get(0))
        .collect();
    let target_rows: Vec<String> = p
        .target
        .query(
            "SELECT (id, account, amount_cents, note)::text FROM ledger ORDER BY id",
            &[],
        )
        .await
        .expect("target")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(source_rows.len(), 3_000);
    assert_eq!(source_rows, target_rows, "no row lost");
    let twice: i64 = p
        .target
        .query_one(
            "SELECT count(*) FROM (SELECT id FROM apply_log GROUP BY id HAVING count(*) > 1) d",
            &[],
        )
        .await
        .expect("dups")
        .get(0);
    let applies: i64 = p
        .target
        .query_one("SELECT count(*) FROM apply_log", &[])
        .await
        .expect("applies")
        .get(0);
    eprintln!(
        "crash test: {} rows, {applied_at_kill} applied when killed, {applies} applies in all, {twice} applied twice",
        source_rows.len()
    );
    assert_eq!(twice, 0, "rows applied twice");
    assert_eq!(applies, 3_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_source_still_advances_the_slot() {
    let p = pair().await;
    let check = p.cli(&["check"]);
    let said = String::from_utf8_lossy(&check.stdout);
    assert!(check.status.success(), "{said}");
    assert!(
        said.contains("reverse (derived): SELECT \"id\" AS \"id\", \"account\" AS \"account\", \"amount_cents\" AS \"amount\", \"note\" AS \"note\" FROM ledger"),
        "{said}"
    );
    p.src.create_database("other").await.expect("other db");
    p.source
        .execute("INSERT INTO events (account, amount) VALUES (1, 1)", &[])
        .await
        .expect("insert");
    let cdc = p.cdc(&["run"], "cdc.log");
    wait_until(Duration::from_secs(30), "first row", || p.caught_up()).await;
    // WAL written elsewhere on the server (another database): nothing for our
    // publication, but the slot must not hold it back.
    let other = p.src.connect("other").await.expect("other");
    other
        .batch_execute(
            "CREATE TABLE noise (x int); INSERT INTO noise SELECT generate_series(1, 20000);",
        )
        .await
        .expect("noise");
    let after: String = p
        .source
        .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
        .await
        .expect("lsn")
        .get(0);
    let took = wait_until(
        Duration::from_secs(20),
        "slot to pass the unrelated WAL",
        || async {
            p.source
                .query_one(
                    "SELECT confirmed_flush_lsn >= $1::text::pg_lsn FROM pg_replication_slots",
                    &[&after],
                )
                .await
                .map(|r| r.get::<_, bool>(0))
                .unwrap_or(false)
        },
    )
    .await;
    eprintln!("idle slot advanced past {after} after {took:?}");
    let status = p.cli(&["status", "--output", "json"]);
    let doc: serde_json::Value = serde_json::from_slice(&status.stdout).expect("json");
    assert_eq!(doc["slot_active"], true, "{doc}");
    assert!(doc["applied_lsn"].is_string(), "{doc}");
    // The first row came with the snapshot; one through the stream:
    p.source
        .execute("INSERT INTO events (account, amount) VALUES (2, 2)", &[])
        .await
        .expect("insert");
    wait_until(Duration::from_secs(30), "streamed row", || p.caught_up()).await;
    let metrics = reqwest::get(format!("http://127.0.0.1:{}/metrics", p.metrics.port()))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    assert!(
        metrics.contains("strangler_cdc_rows_total{table=\"\\\"public\\\".\\\"ledger\\\"\"} 1"),
        "{metrics}"
    );
    for name in [
        "strangler_cdc_lag_bytes",
        "strangler_cdc_lag_milliseconds",
        "strangler_cdc_batches_total",
        "strangler_cdc_applied_lsn",
    ] {
        assert!(metrics.contains(name), "{name} in {metrics}");
    }
    stop(cdc);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_the_target_rejects_stops_the_stream_with_its_key_and_a_lost_slot_is_refused() {
    let p = pair().await;
    let cdc = p.cdc(&["run"], "cdc.log");
    p.source
        .execute(
            "INSERT INTO events (account, amount) VALUES (1, 5), (2, 6)",
            &[],
        )
        .await
        .expect("good rows");
    wait_until(Duration::from_secs(30), "good rows", || p.caught_up()).await;
    p.source
        .execute(
            "INSERT INTO events (id, account, amount) VALUES (77, 3, -1)",
            &[],
        )
        .await
        .expect("row the target refuses");
    let mut cdc = cdc;
    let mut exited = None;
    for _ in 0..200 {
        if let Ok(Some(s)) = cdc.try_wait() {
            exited = Some(s);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let log = p.log("cdc.log");
    let status = exited.unwrap_or_else(|| panic!("still running; log:\n{log}"));
    assert!(!status.success());
    assert!(log.contains("source key id=77"), "{log}");
    assert!(log.contains("ledger_amount_cents_check"), "{log}");
    let n: i64 = p
        .target
        .query_one("SELECT count(*) FROM ledger", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(n, 2, "nothing of the failed transaction was applied");

    // The slot is dropped behind strangler's back: a restart must not carry on as if
    // nothing happened.
    wait_until(Duration::from_secs(10), "slot released", || async {
        p.source
            .query_opt("SELECT 1 FROM pg_replication_slots WHERE NOT active", &[])
            .await
            .ok()
            .flatten()
            .is_some()
    })
    .await;
    p.source
        .execute("SELECT pg_drop_replication_slot('strangler_cdc')", &[])
        .await
        .expect("drop slot");
    let out = p.cli(&["run"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("no longer exists"), "{stderr}");
    let _ = &p.tgt;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_restart_is_ridden_out_and_a_column_added_at_the_source_is_tolerated() {
    let mut p = pair().await;
    let cdc = p.cdc(&["run"], "cdc.log");
    p.source
        .execute(
            "INSERT INTO events (account, amount) SELECT 1, g FROM generate_series(1, 100) g",
            &[],
        )
        .await
        .expect("before");
    wait_until(Duration::from_secs(30), "rows before the restart", || {
        p.caught_up()
    })
    .await;
    p.src.restart().await.expect("restart source");
    p.source = p.src.connect("legacy").await.expect("reconnect");
    p.source
        .batch_execute(
            "INSERT INTO events (account, amount) SELECT 2, g FROM generate_series(1, 100) g;
             ALTER TABLE events ADD COLUMN channel text;
             INSERT INTO events (account, amount, channel) SELECT 3, g, 'web' FROM generate_series(1, 100) g;
             UPDATE events SET note = 'after restart' WHERE account = 1;",
        )
        .await
        .expect("after");
    wait_until(Duration::from_secs(60), "rows after the restart", || {
        p.caught_up()
    })
    .await;
    let notes: i64 = p
        .target
        .query_one(
            "SELECT count(*) FROM ledger WHERE note = 'after restart'",
            &[],
        )
        .await
        .expect("notes")
        .get(0);
    assert_eq!(notes, 100);
    let log = p.log("cdc.log");
    assert!(log.contains("reconnecting"), "{log}");
    // (The reconnect re-read the source schema, so the added column is known; the
    // rows with it arrived — counted above.)
    let mut cdc = cdc;
    assert!(
        matches!(cdc.try_wait(), Ok(None)),
        "cdc exited; log:\n{log}"
    );
    stop(cdc);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_table_is_copied_again_while_streaming_continues() {
    let p = pair().await;
    p.source
        .execute(
            "INSERT INTO events (account, amount) SELECT g % 5, g FROM generate_series(1, 2000) g",
            &[],
        )
        .await
        .expect("seed");
    let cdc = p.cdc(&["run"], "cdc.log");
    wait_until(Duration::from_secs(30), "snapshot", || p.caught_up()).await;
    // The target drifts (someone wrote to it by hand).
    p.target
        .batch_execute("DELETE FROM ledger WHERE id % 10 = 0; UPDATE ledger SET note = 'drift' WHERE id % 7 = 0;")
        .await
        .expect("drift");
    let writer = {
        let db = p.src.connect("legacy").await.expect("writer");
        tokio::spawn(async move {
            for round in 0..60i64 {
                db.batch_execute(&format!(
                    "INSERT INTO events (account, amount) SELECT 9, g FROM generate_series(1, 10) g;
                     UPDATE events SET note = 'round {round}' WHERE id % 50 = {m};
                     DELETE FROM events WHERE id % 97 = {m} AND id < 2000;",
                    m = round % 50
                ))
                .await
                .expect("writes");
                tokio::time::sleep(Duration::from_millis(15)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let out = p.cli(&["resnapshot", "--table", "ledger", "--wait-secs", "60"]);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{said}{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        p.log("cdc.log")
    );
    assert!(said.contains("re-copied ledger"), "{said}");
    writer.await.expect("writer");
    wait_until(Duration::from_secs(60), "catch-up", || p.caught_up()).await;
    let verify = p.cli(&["verify"]);
    let report = String::from_utf8_lossy(&verify.stdout);
    assert!(verify.status.success(), "{report}\n{}", p.log("cdc.log"));
    let mut cdc = cdc;
    assert!(matches!(cdc.try_wait(), Ok(None)), "cdc kept running");
    stop(cdc);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_realistic_mysql_schema_translates_to_ddl_that_postgres_accepts() {
    let (maria, pg) = tokio::join!(strangler_testkit::MariaDb::start(), Postgres::start());
    let (maria, pg) = (maria.expect("mariadb"), pg.expect("postgres"));
    let mut conn = maria.connect("mysql").await.expect("connect");
    {
        use mysql_async::prelude::Queryable;
        conn.query_drop("CREATE DATABASE legacy_shop")
            .await
            .expect("db");
        conn.query_drop("USE legacy_shop").await.expect("use");
        let ddl = include_str!("fixtures/legacy_shop_mysql.sql");
        for statement in ddl.split(";\n").filter(|s| !s.trim().is_empty()) {
            conn.query_drop(statement).await.expect(statement);
        }
    }
    pg.create_database("new_shop").await.expect("pg db");
    let out = Command::new(strangler_bin())
        .args(["cdc", "schema", "--to", "postgres", "--from"])
        .arg(maria.url("legacy_shop"))
        .arg("--apply")
        .arg(pg.url("new_shop"))
        .output()
        .expect("schema");
    let script = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{script}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for note in ["FULLTEXT", "SET(", "spatial type POINT", "BIGINT UNSIGNED"] {
        assert!(
            script.contains(note),
            "note about {note} missing:\n{script}"
        );
    }
    let db = pg.connect("new_shop").await.expect("pg");
    let tables: i64 = db
        .query_one(
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'",
            &[],
        )
        .await
        .expect("tables")
        .get(0);
    assert_eq!(tables, 12, "{script}");
    let fks: i64 = db
        .query_one("SELECT count(*) FROM information_schema.table_constraints WHERE constraint_type = 'FOREIGN KEY'", &[])
        .await
        .expect("fks")
        .get(0);
    assert_eq!(fks, 4);
    // The translated tables work: identity, enum check, ON UPDATE trigger.
    db.batch_execute(
        "INSERT INTO customers (email) VALUES ('a@example.com');
         INSERT INTO orders (customer_id, status) VALUES (1, 'placed');",
    )
    .await
    .expect("inserts");
    let bad = db
        .execute(
            "INSERT INTO orders (customer_id, status) VALUES (1, 'lost')",
            &[],
        )
        .await;
    assert!(bad.is_err(), "enum values are checked");
    let before: String = db
        .query_one("SELECT updated_at::text FROM customers WHERE id = 1", &[])
        .await
        .expect("ts")
        .get(0);
    tokio::time::sleep(Duration::from_millis(20)).await;
    db.execute("UPDATE customers SET name = 'A' WHERE id = 1", &[])
        .await
        .expect("update");
    let after: String = db
        .query_one("SELECT updated_at::text FROM customers WHERE id = 1", &[])
        .await
        .expect("ts")
        .get(0);
    assert_ne!(
        before, after,
        "ON UPDATE CURRENT_TIMESTAMP became a trigger"
    );
}

/// Every index and constraint of the target tables, as PostgreSQL prints them.
async fn declared(target: &Client) -> Vec<String> {
    let mut out: Vec<String> = target
        .query(
            "SELECT indexdef FROM pg_indexes WHERE tablename IN ('ledger', 'accounts')
             UNION ALL
             SELECT conrelid::regclass::text || ' ' || conname || ' ' || pg_get_constraintdef(oid)
             FROM pg_constraint WHERE conrelid IN ('ledger'::regclass, 'accounts'::regclass)",
            &[],
        )
        .await
        .expect("catalog")
        .iter()
        .map(|r| r.get(0))
        .collect();
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_a_snapshot_that_set_indexes_aside_restores_them_exactly_and_verifies_clean()
{
    let (src, tgt) = tokio::join!(Postgres::start(), Postgres::start());
    let (src, tgt) = (src.expect("source pg"), tgt.expect("target pg"));
    src.create_database("legacy").await.expect("db");
    tgt.create_database("new").await.expect("db");
    let source = src.connect("legacy").await.expect("source");
    let target = tgt.connect("new").await.expect("target");
    source
        .batch_execute(
            "CREATE TABLE accounts (id int PRIMARY KEY, name text NOT NULL);
             INSERT INTO accounts SELECT g, 'account ' || g FROM generate_series(0, 99) g;
             CREATE TABLE events (id bigserial PRIMARY KEY, account int NOT NULL, amount bigint NOT NULL, note text);
             INSERT INTO events (account, amount, note)
                 SELECT g % 100, g, CASE WHEN g % 3 = 0 THEN NULL ELSE 'note ' || g END
                 FROM generate_series(1, 400000) g;",
        )
        .await
        .expect("source schema");
    target
        .batch_execute(
            "CREATE TABLE accounts (id int PRIMARY KEY, name text NOT NULL);
             CREATE INDEX accounts_name ON accounts (name);
             CREATE TABLE ledger (id bigint PRIMARY KEY, account int NOT NULL REFERENCES accounts (id),
                 amount_cents bigint NOT NULL CHECK (amount_cents >= 0), note text);
             CREATE INDEX ledger_account ON ledger (account, amount_cents DESC);
             CREATE INDEX ledger_note ON ledger (lower(note)) WHERE note IS NOT NULL;
             CREATE UNIQUE INDEX ledger_amount ON ledger (amount_cents);",
        )
        .await
        .expect("target schema");
    let before = declared(&target).await;
    let dir = tempfile::tempdir().expect("dir");
    let config = dir.path().join("cdc.toml");
    std::fs::write(
        &config,
        format!(
            "[source]\nurl = \"{}\"\n[target]\nurl = \"{}\"\n[apply]\nbatch_ms = 10\n\n\
             [[map]]\ntarget = \"accounts\"\nsql = \"SELECT id, name FROM accounts\"\n\n\
             [[map]]\ntarget = \"ledger\"\nsql = \"SELECT id, account, amount AS amount_cents, note FROM events\"\n",
            src.url("legacy"),
            tgt.url("new"),
        ),
    )
    .expect("config");
    let run = |log: &str| {
        let log = std::fs::File::create(dir.path().join(log)).expect("log");
        Proc(
            Command::new(strangler_bin())
                .args(["cdc", "run", "--config"])
                .arg(&config)
                .env("STRANGLER_LOG", "info")
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("log"))
                .stderr(log)
                .spawn()
                .expect("spawn strangler cdc"),
        )
    };
    let read = |name: &str| std::fs::read_to_string(dir.path().join(name)).unwrap_or_default();
    let first = run("first.log");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !read("first.log").contains("set aside until the snapshot is loaded") {
        assert!(
            std::time::Instant::now() < deadline,
            "the snapshot never set indexes aside:\n{}",
            read("first.log")
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(first); // SIGKILL, mid-copy
    // Killed half-way: both keys, every index (the unique one too) and the foreign
    // key are gone from the target and written down; the CHECK stays.
    let during = declared(&target).await;
    for gone in [
        "ledger_pkey",
        "accounts_pkey",
        "INDEX ledger_account ON",
        "INDEX ledger_note ON",
        "INDEX ledger_amount ON",
        "INDEX accounts_name ON",
        "FOREIGN KEY",
    ] {
        assert!(
            !during.iter().any(|d| d.contains(gone)),
            "{gone}: {during:?}\n{}",
            read("first.log")
        );
    }
    assert!(during.iter().any(|d| d.contains("CHECK")), "{during:?}");
    let pending: i64 = target
        .query_one("SELECT count(*) FROM strangler.cdc_deferred", &[])
        .await
        .expect("deferred")
        .get(0);
    assert_eq!(
        pending, 7,
        "two keys, four indexes and a foreign key set aside"
    );

    let second = run("second.log");
    wait_until(
        Duration::from_secs(60),
        "the second snapshot to finish",
        || async { read("second.log").contains("snapshot complete") },
    )
    .await;
    assert_eq!(declared(&target).await, before, "{}", read("second.log"));
    let pending: i64 = target
        .query_one("SELECT count(*) FROM strangler.cdc_deferred", &[])
        .await
        .expect("deferred")
        .get(0);
    assert_eq!(pending, 0);
    // Writes after the snapshot stream through the rebuilt indexes.
    source
        .batch_execute("INSERT INTO events (account, amount, note) VALUES (7, 400001, 'after')")
        .await
        .expect("write");
    wait_until(Duration::from_secs(20), "the write to stream", || async {
        target
            .query_one("SELECT count(*) FROM ledger WHERE note = 'after'", &[])
            .await
            .map(|r| r.get::<_, i64>(0) == 1)
            .unwrap_or(false)
    })
    .await;
    let verify = Command::new(strangler_bin())
        .args(["cdc", "verify", "--config"])
        .arg(&config)
        .output()
        .expect("verify");
    assert!(
        verify.status.success(),
        "{}{}",
        String::from_utf8_lossy(&verify.stdout),
        String::from_utf8_lossy(&verify.stderr)
    );
    assert!(
        read("second.log").contains("keys, indexes and foreign keys built"),
        "{}",
        read("second.log")
    );
    drop(second);
}
