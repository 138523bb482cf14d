//! PostgreSQL → PostgreSQL CDC against two real servers from the testkit.

use std::path::Path;
use std::time::{Duration, Instant};

use strangler_cdc::CdcConfig;
use strangler_cdc::pipeline::{RunOptions, run};
use strangler_testkit::Postgres;
use tokio_postgres::Client;

const SOURCE_SCHEMA: &str = "
CREATE TYPE order_kind AS ENUM ('web', 'phone', 'shop');
CREATE TABLE customers (id serial PRIMARY KEY, email text NOT NULL, name text);
CREATE TABLE orders (
    id bigserial PRIMARY KEY,
    customer_id int NOT NULL,
    total_cents bigint NOT NULL,
    status text NOT NULL,
    email text,
    note text,
    tags text[],
    meta jsonb,
    created timestamptz NOT NULL DEFAULT now(),
    uid uuid,
    data bytea,
    kind order_kind NOT NULL DEFAULT 'web'
);
";

const TARGET_SCHEMA: &str = "
CREATE TABLE customers (id int PRIMARY KEY, email text NOT NULL, name text);
CREATE TABLE orders_v2 (
    id bigint PRIMARY KEY,
    buyer int NOT NULL,
    total numeric(12,2) NOT NULL,
    email text,
    note text,
    tags text[],
    meta jsonb,
    created timestamptz NOT NULL,
    uid uuid,
    data bytea,
    kind text NOT NULL
);
";

fn config(source: &str, target: &str) -> CdcConfig {
    config_with(source, target, "")
}

/// [`config`] with more `[apply]` settings.
fn config_with(source: &str, target: &str, apply: &str) -> CdcConfig {
    let text = format!(
        "[source]\nurl = \"{source}\"\n[target]\nurl = \"{target}\"\n[apply]\nbatch_ms = 10\nsplit_rows = 1000\n{apply}\n\
         [[map]]\ntarget = \"customers\"\nsql = \"SELECT * FROM customers\"\n\n\
         [[map]]\ntarget = \"orders_v2\"\nsql = \"\"\"\n\
         SELECT id, customer_id AS buyer, total_cents / 100.0 AS total, lower(email) AS email,\n\
                note, tags, meta, created, uid, data, kind::text AS kind\n\
         FROM orders WHERE status <> 'draft'\"\"\"\n"
    );
    CdcConfig::parse(&text, Path::new("cdc.toml")).expect("config")
}

/// Runs CDC on its own task until `stop` is cancelled.
fn start(
    config: &CdcConfig,
    stop: &strangler_cdc::CancellationToken,
) -> tokio::task::JoinHandle<Result<(), strangler_cdc::CdcError>> {
    let (config, stop) = (config.clone(), stop.clone());
    tokio::spawn(async move {
        run(
            &config,
            RunOptions {
                stop: Some(stop),
                ..RunOptions::default()
            },
        )
        .await
    })
}

/// The mapped rows as the source defines them, and the target's rows, as text.
async fn mapped_source(db: &Client) -> Vec<String> {
    db.query(
        "SELECT (id, customer_id, (total_cents / 100.0)::numeric(12,2), lower(email), note, tags, meta, created, uid, data, kind::text)::text \
         FROM orders WHERE status <> 'draft' ORDER BY id",
        &[],
    )
    .await
    .expect("source rows")
    .iter()
    .map(|r| r.get(0))
    .collect()
}

async fn target_rows(db: &Client) -> Vec<String> {
    db.query(
        "SELECT (id, buyer, total, email, note, tags, meta, created, uid, data, kind)::text FROM orders_v2 ORDER BY id",
        &[],
    )
    .await
    .expect("target rows")
    .iter()
    .map(|r| r.get(0))
    .collect()
}

async fn customers(db: &Client) -> Vec<String> {
    db.query(
        "SELECT (id, email, name)::text FROM customers ORDER BY id",
        &[],
    )
    .await
    .expect("customers")
    .iter()
    .map(|r| r.get(0))
    .collect()
}

async fn wait_caught_up(source: &Client, target: &Client, slot: &str, timeout: Duration) {
    let goal: String = source
        .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
        .await
        .expect("wal lsn")
        .get(0);
    let deadline = Instant::now() + timeout;
    loop {
        let row = target
            .query_opt(
                "SELECT lsn >= $2::text::pg_lsn FROM strangler.cdc_checkpoint WHERE slot = $1",
                &[&slot, &goal],
            )
            .await;
        if let Ok(Some(r)) = row
            && r.get::<_, bool>(0)
        {
            return;
        }
        // An idle tail (no more of our commits) only moves the checkpoint with the
        // next commit: make one.
        let _ = source
            .execute("UPDATE customers SET name = name WHERE id = 1", &[])
            .await;
        assert!(
            Instant::now() < deadline,
            "target did not catch up to {goal}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Two clusters: `legacy` on the source, `shop` on the target, each connected.
async fn legacy_and_shop() -> (Postgres, Postgres, Client, Client) {
    let (src, tgt) = tokio::join!(Postgres::start(), Postgres::start());
    let (src, tgt) = (src.expect("source pg"), tgt.expect("target pg"));
    src.create_database("legacy").await.expect("db");
    tgt.create_database("shop").await.expect("db");
    let source = src.connect("legacy").await.expect("source");
    let target = tgt.connect("shop").await.expect("target");
    (src, tgt, source, target)
}

async fn seed(db: &Client, customers: i32, orders: i32) {
    db.execute(
        "INSERT INTO customers (email, name) SELECT 'c' || g || '@example.com', 'Customer ' || g FROM generate_series(1, $1) g",
        &[&customers],
    )
    .await
    .expect("customers");
    db.execute(
        "INSERT INTO orders (customer_id, total_cents, status, email, note, tags, meta, uid, data, kind) \
         SELECT g % 50 + 1, g * 37, CASE WHEN g % 10 = 0 THEN 'draft' ELSE 'paid' END, 'Buyer' || g || '@Example.COM', \
                CASE WHEN g % 7 = 0 THEN NULL ELSE 'note ' || g END, ARRAY['a', 'b' || g], jsonb_build_object('n', g, 'x', ARRAY[1,2]), \
                md5(g::text)::uuid, decode(md5(g::text), 'hex'), (ARRAY['web','phone','shop'])[g % 3 + 1]::order_kind \
         FROM generate_series(1, $1) g",
        &[&orders],
    )
    .await
    .expect("orders");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn snapshot_then_stream_under_writes_ends_with_exactly_the_mapped_rows() {
    let (src, tgt, source, target) = legacy_and_shop().await;
    source.batch_execute(SOURCE_SCHEMA).await.expect("schema");
    target.batch_execute(TARGET_SCHEMA).await.expect("schema");
    seed(&source, 100, 5_000).await;
    // Row estimates decide which tables are copied in key ranges (orders: 4 ranges).
    source.batch_execute("ANALYZE").await.expect("analyze");

    let config = config(&src.url("legacy"), &tgt.url("shop"));
    let stop = strangler_cdc::CancellationToken::new();
    let cdc = start(&config, &stop);

    // Writes while the snapshot and then the stream run: inserts, updates (some moving
    // rows in and out of the filter, one changing a key), deletes, all types.
    let writer_db = src.connect("legacy").await.expect("writer");
    for round in 0..40 {
        writer_db
            .batch_execute(&format!(
                "BEGIN;
                 INSERT INTO orders (customer_id, total_cents, status, email, tags, meta, uid, kind)
                   SELECT 7, {round} * 1000 + g, 'paid', 'NEW{round}@X.org', ARRAY['n'], '{{\"r\": {round}}}', gen_random_uuid(), 'shop'
                   FROM generate_series(1, 25) g;
                 UPDATE orders SET total_cents = total_cents + 1, note = 'touched {round}' WHERE id % 97 = {m};
                 UPDATE orders SET status = CASE status WHEN 'draft' THEN 'paid' ELSE 'draft' END WHERE id % 89 = {m};
                 DELETE FROM orders WHERE id % 101 = {m} AND id < 5000;
                 UPDATE customers SET name = 'renamed {round}' WHERE id = {c};
                 COMMIT;",
                m = round % 89,
                c = round + 1
            ))
            .await
            .expect("writes");
        if round == 39 {
            let moved = writer_db
                .execute(
                    "UPDATE orders SET id = 900000, status = 'paid' WHERE id = (SELECT max(id) FROM orders WHERE id < 5000)",
                    &[],
                )
                .await
                .expect("key change");
            assert_eq!(moved, 1);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    wait_caught_up(&source, &target, &config.slot, Duration::from_secs(60)).await;

    // verify while CDC runs: clean; then break the target behind its back and
    // verify names exactly the broken keys.
    let reports = strangler_cdc::ops::verify::verify(&config, Duration::from_secs(30))
        .await
        .expect("verify");
    for r in &reports {
        assert!(r.clean(), "{r:?}");
    }
    let ids: Vec<i64> = target
        .query(
            "SELECT id FROM orders_v2 WHERE id < 5000 ORDER BY id LIMIT 2",
            &[],
        )
        .await
        .expect("ids")
        .iter()
        .map(|r| r.get(0))
        .collect();
    let (a, b) = (ids[0], ids[1]);
    target
        .batch_execute(&format!(
            "UPDATE orders_v2 SET note = 'tampered' WHERE id = {a};
             DELETE FROM orders_v2 WHERE id = {b};
             INSERT INTO orders_v2 (id, buyer, total, created, kind) VALUES (777777, 1, 1, now(), 'web');"
        ))
        .await
        .expect("tamper");
    let reports = strangler_cdc::ops::verify::verify(&config, Duration::from_secs(30))
        .await
        .expect("verify");
    let orders = reports
        .iter()
        .find(|r| r.table.contains("orders_v2"))
        .expect("orders report");
    eprintln!("verify after tampering: {orders:?}");
    assert_eq!(orders.different, [a.to_string()]);
    assert_eq!(orders.missing, [b.to_string()]);
    assert_eq!(orders.extra, ["777777"]);
    assert!(
        reports
            .iter()
            .find(|r| r.table.contains("customers"))
            .is_some_and(|r| r.clean())
    );
    // Put it back so the row-by-row comparison below holds.
    target
        .batch_execute("DELETE FROM orders_v2 WHERE id = 777777")
        .await
        .expect("untamper");
    let touched = source
        .execute(
            &format!("UPDATE orders SET note = note WHERE id IN ({a}, {b})"),
            &[],
        )
        .await
        .expect("re-touch");
    assert_eq!(touched, 2);
    wait_caught_up(&source, &target, &config.slot, Duration::from_secs(60)).await;
    stop.cancel();
    let result = tokio::time::timeout(Duration::from_secs(10), cdc)
        .await
        .expect("cdc stops")
        .expect("cdc task");
    result.expect("cdc ran without error");

    let want = mapped_source(&source).await;
    let got = target_rows(&target).await;
    let only_source: Vec<_> = want.iter().filter(|w| !got.contains(w)).collect();
    let only_target: Vec<_> = got.iter().filter(|g| !want.contains(g)).collect();
    assert_eq!(
        want.len(),
        got.len(),
        "row counts; source only {only_source:?}, target only {only_target:?}"
    );
    assert!(want.len() > 2_000, "{}", want.len());
    for (w, g) in want.iter().zip(&got) {
        assert_eq!(w, g);
    }
    assert_eq!(customers(&source).await, customers(&target).await);
    assert!(
        got.iter().any(|r| r.starts_with("(900000,")),
        "key change applied"
    );
    let old_key_left = got
        .iter()
        .filter(|r| r.starts_with("(4999,") || r.starts_with("(5000,"))
        .count();
    assert!(old_key_left <= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mappings_that_do_not_fit_the_schemas_are_refused_before_any_row_moves() {
    let (src, tgt) = tokio::join!(Postgres::start(), Postgres::start());
    let (src, tgt) = (src.expect("source pg"), tgt.expect("target pg"));
    let source = src.connect("postgres").await.expect("source");
    let target = tgt.connect("postgres").await.expect("target");
    source
        .batch_execute(
            "CREATE TABLE orders (id int PRIMARY KEY, total_cents bigint, email text);
             CREATE TABLE nokey (id int, v text);
             INSERT INTO orders VALUES (1, 100, 'a');",
        )
        .await
        .expect("source schema");
    target
        .batch_execute(
            "CREATE TABLE orders (id int PRIMARY KEY, total numeric, email text, created date NOT NULL);
             CREATE TABLE o2 (id int PRIMARY KEY, total int);
             CREATE TABLE nokey (id int PRIMARY KEY, v text);",
        )
        .await
        .expect("target schema");
    let cases = [
        (
            "orders",
            "SELECT id, totl_cents AS total FROM orders",
            "column totl_cents does not exist in source table",
        ),
        (
            "orders",
            "SELECT id, total_cents AS total, email FROM orders",
            "created is NOT NULL without a default",
        ),
        (
            "o2",
            "SELECT id, email AS total FROM orders",
            "the target rejects the mapping",
        ),
        ("nokey", "SELECT id, v FROM nokey", "has no primary key"),
        (
            "missing",
            "SELECT id FROM orders",
            "target table public.missing does not exist",
        ),
        (
            "o2",
            "SELECT total_cents AS id FROM orders",
            "not in the source key",
        ),
    ];
    for (target_table, sql, needle) in cases {
        let text = format!(
            "[source]\nurl = \"{}\"\n[target]\nurl = \"{}\"\n[[map]]\ntarget = \"{target_table}\"\nsql = \"{sql}\"\n",
            src.url("postgres"),
            tgt.url("postgres")
        );
        let config = CdcConfig::parse(&text, Path::new("cdc.toml")).expect("parses");
        let e = strangler_cdc::check(&config).await.expect_err(sql);
        assert!(e.to_string().contains(needle), "{sql}: {e}");
    }
    let n: i64 = target
        .query_one("SELECT count(*) FROM o2", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(n, 0);
    let slots: i64 = source
        .query_one("SELECT count(*) FROM pg_replication_slots", &[])
        .await
        .expect("slots")
        .get(0);
    assert_eq!(slots, 0, "check creates no slot");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unchanged_toasted_values_are_kept_not_overwritten_with_nulls() {
    let (src, tgt) = tokio::join!(Postgres::start(), Postgres::start());
    let (src, tgt) = (src.expect("source pg"), tgt.expect("target pg"));
    let source = src.connect("postgres").await.expect("source");
    let target = tgt.connect("postgres").await.expect("target");
    source
        .batch_execute(
            "CREATE TABLE docs (id int PRIMARY KEY, title text, body text, version int);
             ALTER TABLE docs ALTER COLUMN body SET STORAGE EXTERNAL;",
        )
        .await
        .expect("source");
    target
        .batch_execute(
            "CREATE TABLE docs (id int PRIMARY KEY, title text, body text, body_size int, version int)",
        )
        .await
        .expect("target");
    let text = format!(
        "[source]\nurl = \"{}\"\n[target]\nurl = \"{}\"\n[apply]\nbatch_ms = 5\n[[map]]\ntarget = \"docs\"\nsql = \"SELECT id, upper(title) AS title, body, length(body) AS body_size, version FROM docs\"\n",
        src.url("postgres"),
        tgt.url("postgres")
    );
    let config = CdcConfig::parse(&text, Path::new("cdc.toml")).expect("config");
    let stop = strangler_cdc::CancellationToken::new();
    let cdc = start(&config, &stop);
    // 40 kB bodies, stored out of line (TOAST); then updates that leave them alone.
    source
        .batch_execute(
            "INSERT INTO docs SELECT g, 'doc ' || g, repeat(md5(g::text), 1250), 1 FROM generate_series(1, 20) g",
        )
        .await
        .expect("insert");
    wait_caught_up(&source, &target, &config.slot, Duration::from_secs(30)).await;
    source
        .batch_execute("UPDATE docs SET title = 'retitled ' || id, version = 2")
        .await
        .expect("update");
    wait_caught_up(&source, &target, &config.slot, Duration::from_secs(30)).await;
    stop.cancel();
    cdc.await.expect("task").expect("cdc");
    let rows = target
        .query(
            "SELECT id, title, md5(body), body_size, version FROM docs ORDER BY id",
            &[],
        )
        .await
        .expect("rows");
    assert_eq!(rows.len(), 20);
    for r in rows {
        let id: i32 = r.get(0);
        let body: Option<String> = r.get(2);
        let want: String = source
            .query_one("SELECT md5(body) FROM docs WHERE id = $1", &[&id])
            .await
            .expect("source body")
            .get(0);
        assert_eq!(r.get::<_, String>(1), format!("RETITLED {id}"));
        assert_eq!(body.as_deref(), Some(want.as_str()), "body of {id} kept");
        assert_eq!(r.get::<_, Option<i32>>(3), Some(40_000));
        assert_eq!(r.get::<_, i32>(4), 2);
    }
}

async fn item_rows(db: &Client) -> Vec<String> {
    db.query(
        "SELECT (id, v, written_on)::text FROM items ORDER BY id",
        &[],
    )
    .await
    .expect("rows")
    .iter()
    .map(|r| r.get::<_, String>(0))
    .collect()
}

async fn applied_log(db: &Client) -> Vec<(i32, i64)> {
    db.query(
        "SELECT id, count(*) FROM apply_log GROUP BY id ORDER BY id",
        &[],
    )
    .await
    .expect("log")
    .iter()
    .map(|r| (r.get::<_, i32>(0), r.get::<_, i64>(1)))
    .collect()
}

const BOTH_SIDES: &str = "
CREATE TABLE items (id int PRIMARY KEY, v text NOT NULL, written_on text NOT NULL);
CREATE TABLE apply_log (id int NOT NULL);
-- Counts only writes made by strangler's apply sessions (they carry an origin).
CREATE FUNCTION log_apply() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN IF pg_replication_origin_session_is_setup() THEN INSERT INTO apply_log VALUES (NEW.id); END IF; RETURN NEW; END $$;
CREATE TRIGGER counted AFTER INSERT OR UPDATE ON items FOR EACH ROW EXECUTE FUNCTION log_apply();
";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn both_directions_at_once_converge_and_no_change_bounces_back() {
    let (a, b) = tokio::join!(Postgres::start(), Postgres::start());
    let (a, b) = (a.expect("legacy pg"), b.expect("new pg"));
    let legacy = a.connect("postgres").await.expect("legacy");
    let new = b.connect("postgres").await.expect("new");
    legacy
        .batch_execute(BOTH_SIDES)
        .await
        .expect("legacy schema");
    new.batch_execute(BOTH_SIDES).await.expect("new schema");
    let direction = |from: &Postgres, to: &Postgres, slot: &str, snapshot: bool| {
        let text = format!(
            "[source]\nurl = \"{}\"\nslot = \"{slot}\"\npublication = \"{slot}\"\n[target]\nurl = \"{}\"\n\
             [apply]\nbatch_ms = 5\nheartbeat_ms = 300\nsnapshot = {snapshot}\n\
             [[map]]\ntarget = \"items\"\nsql = \"SELECT * FROM items\"\n",
            from.url("postgres"),
            to.url("postgres")
        );
        CdcConfig::parse(&text, Path::new("cdc.toml")).expect("config")
    };
    let forward = direction(&a, &b, "fwd", true);
    let reverse = direction(&b, &a, "rev", false);
    let stop = strangler_cdc::CancellationToken::new();
    let spawn = |config: CdcConfig| start(&config, &stop);
    let fwd = spawn(forward.clone());
    // The reverse stream starts once the forward snapshot is done (its checkpoint exists).
    let deadline = Instant::now() + Duration::from_secs(30);
    while new
        .query_opt(
            "SELECT 1 FROM strangler.cdc_checkpoint WHERE slot = 'fwd'",
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
    let rev = spawn(reverse.clone());
    let deadline = Instant::now() + Duration::from_secs(30);
    while legacy
        .query_opt(
            "SELECT 1 FROM strangler.cdc_checkpoint WHERE slot = 'rev'",
            &[],
        )
        .await
        .ok()
        .flatten()
        .is_none()
    {
        assert!(Instant::now() < deadline, "reverse never started");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Users write on both sides at once, each side its own rows.
    let (wa, wb) = (
        a.connect("postgres").await.expect("a"),
        b.connect("postgres").await.expect("b"),
    );
    let on_legacy = tokio::spawn(async move {
        for i in 0..50 {
            wa.batch_execute(&format!(
                "INSERT INTO items VALUES ({i}, 'a{i}', 'legacy'); UPDATE items SET v = v || '+' WHERE id = {i};"
            ))
            .await
            .expect("legacy writes");
        }
    });
    let on_new = tokio::spawn(async move {
        for i in 1000..1050 {
            wb.batch_execute(&format!(
                "INSERT INTO items VALUES ({i}, 'b{i}', 'new'); UPDATE items SET v = v || '+' WHERE id = {i};"
            ))
            .await
            .expect("new writes");
        }
    });
    on_legacy.await.expect("legacy writer");
    on_new.await.expect("new writer");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (l, n) = (item_rows(&legacy).await, item_rows(&new).await);
        if l.len() == 100 && l == n {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no convergence: legacy {} rows, new {}",
            l.len(),
            n.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Let any bounce happen before counting.
    tokio::time::sleep(Duration::from_millis(800)).await;
    stop.cancel();
    fwd.await.expect("fwd task").expect("forward ran");
    rev.await.expect("rev task").expect("reverse ran");

    let on_new_side = applied_log(&new).await;
    let on_legacy_side = applied_log(&legacy).await;
    // Each row was written on one side by an insert and an update (one transaction):
    // the other side applies it once (one upsert of its last state) and its own
    // side never sees it come back.
    assert_eq!(on_new_side.len(), 50, "{on_new_side:?}");
    assert!(
        on_new_side.iter().all(|(id, n)| *id < 1000 && *n == 1),
        "{on_new_side:?}"
    );
    assert_eq!(on_legacy_side.len(), 50, "{on_legacy_side:?}");
    assert!(
        on_legacy_side.iter().all(|(id, n)| *id >= 1000 && *n == 1),
        "{on_legacy_side:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_transaction_larger_than_a_batch_lands_whole_through_staging_copy_and_the_upsert_fallback()
 {
    // The batches' log lines (parts, rows) show with `--nocapture` when it fails.
    let _ = tracing_subscriber::fmt()
        .with_env_filter("strangler_cdc=debug")
        .with_test_writer()
        .try_init();
    let (src, tgt, source, target) = legacy_and_shop().await;
    source.batch_execute(SOURCE_SCHEMA).await.expect("schema");
    target.batch_execute(TARGET_SCHEMA).await.expect("schema");
    seed(&source, 10, 100).await;
    // Parts of 600 changes: each carries hundreds of rows of a table, so they go
    // through the staging table (orders: a transform and a filter) or straight
    // into the target by COPY (customers: `SELECT *`, same types).
    let config = config_with(&src.url("legacy"), &tgt.url("shop"), "batch_rows = 600\n");
    let stop = strangler_cdc::CancellationToken::new();
    let cdc = start(&config, &stop);
    wait_caught_up(&source, &target, &config.slot, Duration::from_secs(60)).await;
    assert_eq!(customers(&target).await, customers(&source).await);

    // A row already in the target under a key the source is about to insert (written
    // there directly): the direct COPY and the plain INSERT both meet it, roll back
    // to their savepoints, and the upsert wins with the source's version.
    target
        .execute(
            "INSERT INTO customers (id, email, name) VALUES (1005, 'stale@example.com', 'stale')",
            &[],
        )
        .await
        .expect("stale row");
    // One source transaction of about 3,000 changes over both tables: inserts (values
    // with a tab, a newline and a backslash, which COPY text must escape), updates,
    // rows the filter drops within the transaction, deletes.
    source
        .batch_execute(
            "BEGIN;
             INSERT INTO customers (id, email, name)
               SELECT g, 'c' || g || '@example.com', 'name ' || g || E'\\t\\\\ \\n end' FROM generate_series(1000, 2000) g;
             INSERT INTO orders (customer_id, total_cents, status, email, note)
               SELECT g % 7, g * 3, CASE WHEN g % 10 = 0 THEN 'draft' ELSE 'paid' END, 'Big' || g || '@X.org', NULL
               FROM generate_series(1, 1500) g;
             UPDATE customers SET name = 'updated' WHERE id BETWEEN 1500 AND 1600;
             DELETE FROM customers WHERE id BETWEEN 1900 AND 1950;
             UPDATE orders SET status = 'draft' WHERE id % 7 = 0;
             DELETE FROM orders WHERE id % 11 = 0;
             COMMIT;",
        )
        .await
        .expect("large transaction");
    wait_caught_up(&source, &target, &config.slot, Duration::from_secs(60)).await;
    assert_eq!(customers(&target).await, customers(&source).await);
    assert_eq!(target_rows(&target).await, mapped_source(&source).await);
    let stale: String = target
        .query_one("SELECT name FROM customers WHERE id = 1005", &[])
        .await
        .expect("row 1005")
        .get(0);
    assert_eq!(stale, "name 1005\t\\ \n end");

    // The target transaction of the parts was committed and closed: small ones apply.
    source
        .execute("UPDATE customers SET name = 'after' WHERE id = 1001", &[])
        .await
        .expect("small change");
    wait_caught_up(&source, &target, &config.slot, Duration::from_secs(30)).await;
    assert_eq!(customers(&target).await, customers(&source).await);
    stop.cancel();
    cdc.await.expect("join").expect("cdc run");
}

/// Regression (found by the soak, tests/soak.rs): verify keyed rows by the first
/// key column only, so on a composite key the rows sharing it folded into one per
/// side and equal tables were reported DIFFERENT. Now: clean when equal, and a
/// tampered row is named by its whole key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_compares_rows_of_a_composite_key_by_the_whole_key() {
    let (src, tgt, source, target) = legacy_and_shop().await;
    source
        .batch_execute(
            "CREATE TABLE items (order_id bigint, product_id int, qty int NOT NULL, price_cents int NOT NULL, PRIMARY KEY (order_id, product_id));
             INSERT INTO items SELECT o, p, p, o * 10 + p FROM generate_series(1, 40) o, generate_series(1, 3) p;",
        )
        .await
        .expect("source");
    target
        .batch_execute(
            "CREATE TABLE lines (order_id bigint, product_id int, qty int NOT NULL, unit_price numeric(10,2) NOT NULL, PRIMARY KEY (order_id, product_id));",
        )
        .await
        .expect("target");
    let config = CdcConfig::parse(
        &format!(
            "[source]\nurl = \"{}\"\n[target]\nurl = \"{}\"\n[apply]\nbatch_ms = 10\n\n\
             [[map]]\ntarget = \"lines\"\nsql = \"SELECT order_id, product_id, qty, price_cents / 100.0 AS unit_price FROM items\"\n",
            src.url("legacy"),
            tgt.url("shop")
        ),
        Path::new("cdc.toml"),
    )
    .expect("config");
    let stop = strangler_cdc::CancellationToken::new();
    let cdc = start(&config, &stop);
    wait_caught_up(&source, &target, &config.slot, Duration::from_secs(60)).await;
    let reports = strangler_cdc::ops::verify::verify(&config, Duration::from_secs(30))
        .await
        .expect("verify");
    assert!(reports[0].clean(), "{:?}", reports[0]);
    assert_eq!(reports[0].source_rows, 120, "every row, not every order");
    target
        .execute(
            "UPDATE lines SET qty = 99 WHERE order_id = 7 AND product_id = 2",
            &[],
        )
        .await
        .expect("tamper");
    let reports = strangler_cdc::ops::verify::verify(&config, Duration::from_secs(30))
        .await
        .expect("verify");
    assert_eq!(reports[0].different, ["(7,2)"], "{:?}", reports[0]);
    stop.cancel();
    cdc.await.expect("join").expect("stops");
}
