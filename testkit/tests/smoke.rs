//! One write-and-read-back per real server: proves the harness starts each one.

use std::time::{Duration, Instant};

use mysql_async::prelude::Queryable;
use strangler_testkit::{ClickHouse, MariaDb, Postgres, Unleash};

#[tokio::test]
async fn postgres_stores_a_row_and_has_logical_replication_on() {
    let pg = Postgres::start().await.expect("start postgres");
    let db = pg.fresh_database("smoke").await.expect("database");
    let client = pg.connect(&db).await.expect("connect");
    client
        .batch_execute(
            "CREATE TABLE t (id int PRIMARY KEY, name text); INSERT INTO t VALUES (1, 'legacy');",
        )
        .await
        .expect("write");
    let row = client
        .query_one("SELECT name FROM t WHERE id = 1", &[])
        .await
        .expect("read");
    assert_eq!(row.get::<_, String>(0), "legacy");
    let wal_level: String = client
        .query_one("SHOW wal_level", &[])
        .await
        .expect("show")
        .get(0);
    assert_eq!(wal_level, "logical");
    // A logical slot can really be created, which is what CDC needs.
    client
        .query_one(
            "SELECT lsn::text FROM pg_create_logical_replication_slot('smoke', 'pgoutput')",
            &[],
        )
        .await
        .expect("create a pgoutput slot");
}

#[tokio::test]
async fn postgres_comes_back_after_a_restart_with_its_data() {
    let mut pg = Postgres::start().await.expect("start postgres");
    let client = pg.connect("postgres").await.expect("connect");
    client
        .batch_execute("CREATE TABLE kept (v int); INSERT INTO kept VALUES (42); CHECKPOINT;")
        .await
        .expect("write");
    drop(client);
    pg.restart().await.expect("restart");
    let client = pg.connect("postgres").await.expect("reconnect");
    let v: i32 = client
        .query_one("SELECT v FROM kept", &[])
        .await
        .expect("read")
        .get(0);
    assert_eq!(v, 42);
}

#[tokio::test]
async fn mariadb_stores_a_row_and_logs_it_in_row_format_with_gtids() {
    let db = MariaDb::start().await.expect("start mariadb");
    let name = db.fresh_database("smoke").await.expect("database");
    let mut conn = db.connect(&name).await.expect("connect");
    conn.query_drop("CREATE TABLE t (id INT PRIMARY KEY, name VARCHAR(20))")
        .await
        .expect("create");
    conn.query_drop("INSERT INTO t VALUES (1, 'legacy')")
        .await
        .expect("insert");
    let name_back: Option<String> = conn
        .query_first("SELECT name FROM t WHERE id = 1")
        .await
        .expect("read");
    assert_eq!(name_back.as_deref(), Some("legacy"));
    let format: Option<(String, String)> = conn
        .query_first("SHOW VARIABLES LIKE 'binlog_format'")
        .await
        .expect("binlog_format");
    assert_eq!(format.map(|(_, v)| v).as_deref(), Some("ROW"));
    let gtid: Option<String> = conn
        .query_first("SELECT @@gtid_binlog_pos")
        .await
        .expect("gtid");
    assert!(
        gtid.is_some_and(|g| g.starts_with("0-1-")),
        "the insert must have a GTID"
    );
}

#[derive(Debug, clickhouse::Row, serde::Serialize, serde::Deserialize, PartialEq)]
struct SmokeRow {
    id: u64,
    route: String,
}

#[tokio::test]
async fn clickhouse_stores_a_row_in_a_merge_tree_through_the_clickhouse_crate() {
    let ch = ClickHouse::start().await.expect("start clickhouse");
    // 18.16 does not send the column metadata the crate validates against.
    let client = clickhouse::Client::default()
        .with_url(ch.http_url())
        .with_validation(false);
    client
        .query("CREATE TABLE smoke (id UInt64, route String) ENGINE = MergeTree ORDER BY id")
        .execute()
        .await
        .expect("create table");
    let mut insert = client.insert::<SmokeRow>("smoke").await.expect("insert");
    insert
        .write(&SmokeRow {
            id: 7,
            route: "orders".into(),
        })
        .await
        .expect("write");
    insert.end().await.expect("commit insert");
    let rows = client
        .query("SELECT id, route FROM smoke WHERE id = ?")
        .bind(7u64)
        .fetch_all::<SmokeRow>()
        .await
        .expect("select");
    assert_eq!(
        rows,
        vec![SmokeRow {
            id: 7,
            route: "orders".into()
        }]
    );
}

#[tokio::test]
async fn unleash_toggle_created_through_admin_api_is_seen_through_client_api() {
    let unleash = Unleash::start().await.expect("start unleash");
    unleash
        .create_toggle("strangler.orders")
        .await
        .expect("create toggle");
    unleash
        .add_rollout("strangler.orders", 30)
        .await
        .expect("add rollout");
    unleash
        .set_enabled("strangler.orders", true)
        .await
        .expect("enable");
    // The client API is served from a cache that refreshes on its own; wait on it.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let features = unleash.client_features().await.expect("client features");
        let toggle = features["features"]
            .as_array()
            .and_then(|all| all.iter().find(|f| f["name"] == "strangler.orders"))
            .cloned();
        if let Some(toggle) = toggle
            && toggle["enabled"] == true
        {
            assert_eq!(toggle["strategies"][0]["name"], "flexibleRollout");
            assert_eq!(toggle["strategies"][0]["parameters"]["rollout"], "30");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "toggle never visible: {features}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn all_four_servers_start_together_within_a_minute() {
    let started = Instant::now();
    let (pg, maria, ch, unleash) = tokio::join!(
        timed(Postgres::start()),
        timed(MariaDb::start()),
        timed(ClickHouse::start()),
        timed(Unleash::start()),
    );
    let total = started.elapsed();
    let (_pg, pg_t) = (pg.0.expect("postgres"), pg.1);
    let (_maria, maria_t) = (maria.0.expect("mariadb"), maria.1);
    let (_ch, ch_t) = (ch.0.expect("clickhouse"), ch.1);
    let (_unleash, unleash_t) = (unleash.0.expect("unleash"), unleash.1);
    eprintln!(
        "start-up: postgres {pg_t:?}, mariadb {maria_t:?}, clickhouse {ch_t:?}, \
         unleash (with its postgres) {unleash_t:?}, all together {total:?}"
    );
    assert!(total < Duration::from_secs(60), "took {total:?}");
}

async fn timed<T>(f: impl Future<Output = T>) -> (T, Duration) {
    let started = Instant::now();
    let out = f.await;
    (out, started.elapsed())
}
