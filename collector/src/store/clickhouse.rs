//! The ClickHouse span store: schema migrations and RowBinary inserts.
//!
//! The schema works on Debian's ClickHouse 18.16 and on current releases: no
//! DateTime64, Map, LowCardinality, TTL or codecs; times as `DateTime` plus
//! nanosecond integers; attributes as parallel `Array(String)` columns.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use async_trait::async_trait;

use super::{SpanStore, StoreError};
use crate::model::SpanRow;

/// The `route_stats` row of each span (the feed of migration 15 and the backfill of
/// migration 14: one text, so the two count alike).
macro_rules! span_route_stats {
    () => {
        "    start_time AS time,
    route,
    backend,
    shadow,
    toUInt8(decision = 'fallback' AND shadow = 0) AS fallback,
    -- The router's histogram buckets: (2^(i/32), 2^((i+1)/32)] microseconds.
    toInt16(if(duration_ns < 2000, -1, least(863, ceil(log2(intDiv(duration_ns, 1000)) * 32) - 1))) AS bucket,
    toUInt64(1) AS requests,
    toUInt64(http_status >= 500 OR status_code = 'error') AS errors,
    toUInt64(1) AS hits,
    toUInt64(diff = 'match') AS diff_match,
    toUInt64(diff = 'mismatch') AS diff_mismatch
FROM {db}.spans
WHERE (route != '' OR (kind = 'server' AND shadow = 0 AND backend != ''))
    AND indexOf(resource_keys, 'strangler.counted') = 0"
    };
}

/// The `route_stats` columns every router metric point shares (migrations 16, 17).
macro_rules! metric_route_stats_columns {
    () => {
        "    toDateTime(intDiv(start_ns, 1000000000)) AS time,
    -- The router counts requests no route matched under (legacy).
    if(attr_values[indexOf(attr_keys, 'strangler.route')] = '(legacy)', '', attr_values[indexOf(attr_keys, 'strangler.route')]) AS route,
    attr_values[indexOf(attr_keys, 'strangler.backend')] AS backend,
    toUInt8(attr_values[indexOf(attr_keys, 'strangler.role')] = 'shadow') AS shadow,
    toUInt8(attr_values[indexOf(attr_keys, 'strangler.decision')] = 'fallback' AND shadow = 0) AS fallback,
"
    };
}

/// Versioned, idempotent migrations. Append only: never edit a released step.
pub const MIGRATIONS: &[(u32, &str, &str)] = &[
    (
        1,
        "spans table",
        "CREATE TABLE IF NOT EXISTS {db}.spans (
    start_time DateTime,
    start_time_ns UInt64,
    end_time_ns UInt64,
    duration_ns UInt64,
    trace_id String,
    span_id String,
    parent_span_id String,
    name String,
    kind String,
    status_code String,
    status_message String,
    service String,
    route String,
    backend String,
    decision String,
    diff String,
    diff_paths String,
    pair_id String,
    shadow UInt8,
    http_method String,
    http_status UInt16,
    resource_keys Array(String),
    resource_values Array(String),
    attr_keys Array(String),
    attr_values Array(String),
    scope_name String,
    events_json String,
    links_json String
) ENGINE = ReplacingMergeTree
PARTITION BY toDate(start_time)
ORDER BY (route, backend, start_time, trace_id, span_id)",
    ),
    (
        2,
        "trace id index",
        "CREATE TABLE IF NOT EXISTS {db}.trace_index (
    trace_id String,
    day Date
) ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(day)
ORDER BY (trace_id, day)",
    ),
    (
        3,
        "trace id index feed",
        "CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.trace_index_mv TO {db}.trace_index
AS SELECT trace_id, toDate(start_time) AS day FROM {db}.spans",
    ),
    (
        4,
        "per-minute aggregates",
        "CREATE TABLE IF NOT EXISTS {db}.route_minute (
    minute DateTime,
    route String,
    backend String,
    shadow UInt8,
    requests AggregateFunction(count),
    errors AggregateFunction(sum, UInt64),
    latency AggregateFunction(quantiles(0.5, 0.95, 0.99), UInt64),
    diff_match AggregateFunction(sum, UInt64),
    diff_mismatch AggregateFunction(sum, UInt64)
) ENGINE = AggregatingMergeTree
PARTITION BY toDate(minute)
ORDER BY (route, backend, shadow, minute)",
    ),
    (
        5,
        "per-minute aggregates feed",
        "CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.route_minute_mv TO {db}.route_minute
AS SELECT
    toStartOfMinute(start_time) AS minute,
    route,
    backend,
    shadow,
    countState() AS requests,
    sumState(toUInt64(http_status >= 500 OR status_code = 'error')) AS errors,
    quantilesState(0.5, 0.95, 0.99)(duration_ns) AS latency,
    sumState(toUInt64(diff = 'match')) AS diff_match,
    sumState(toUInt64(diff = 'mismatch')) AS diff_mismatch
FROM {db}.spans
WHERE route != ''
GROUP BY minute, route, backend, shadow",
    ),
    (
        6,
        "route lifecycle changes",
        "CREATE TABLE IF NOT EXISTS {db}.route_events (
    at DateTime,
    at_ns UInt64,
    route String,
    from_state String,
    to_state String,
    action String,
    actor String,
    reason String
) ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(at)
ORDER BY (route, at, at_ns, to_state, action)",
    ),
    (
        7,
        "route lifecycle changes feed",
        // The CLI reports each change as a span named strangler.route.change with no
        // strangler.route attribute, so it never counts as a request.
        "CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.route_events_mv TO {db}.route_events
AS SELECT
    start_time AS at,
    start_time_ns AS at_ns,
    attr_values[indexOf(attr_keys, 'strangler.change.route')] AS route,
    attr_values[indexOf(attr_keys, 'strangler.change.from')] AS from_state,
    attr_values[indexOf(attr_keys, 'strangler.change.to')] AS to_state,
    attr_values[indexOf(attr_keys, 'strangler.change.action')] AS action,
    attr_values[indexOf(attr_keys, 'strangler.change.actor')] AS actor,
    attr_values[indexOf(attr_keys, 'strangler.change.reason')] AS reason
FROM {db}.spans
WHERE name = 'strangler.route.change'",
    ),
    (
        8,
        "all router traffic per minute",
        "CREATE TABLE IF NOT EXISTS {db}.traffic_minute (
    minute DateTime,
    backend String,
    requests AggregateFunction(count)
) ENGINE = AggregatingMergeTree
PARTITION BY toDate(minute)
ORDER BY (backend, minute)",
    ),
    (
        9,
        "all router traffic per minute feed",
        // Every request the router answered, routed or not: the burndown's denominator.
        "CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.traffic_minute_mv TO {db}.traffic_minute
AS SELECT
    toStartOfMinute(start_time) AS minute,
    backend,
    countState() AS requests
FROM {db}.spans
WHERE kind = 'server' AND shadow = 0 AND backend != ''
GROUP BY minute, backend",
    ),
    (
        10,
        "fallbacks per minute",
        "CREATE TABLE IF NOT EXISTS {db}.fallback_minute (
    minute DateTime,
    route String,
    fallbacks AggregateFunction(count)
) ENGINE = AggregatingMergeTree
PARTITION BY toDate(minute)
ORDER BY (route, minute)",
    ),
    (
        11,
        "fallbacks per minute feed",
        // A request the router gave the new side and served from legacy after the new
        // side failed: in route_minute it is a legacy success, so the dashboards
        // add these to the new side's failures.
        "CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.fallback_minute_mv TO {db}.fallback_minute
AS SELECT
    toStartOfMinute(start_time) AS minute,
    route,
    countState() AS fallbacks
FROM {db}.spans
WHERE decision = 'fallback' AND shadow = 0 AND route != ''
GROUP BY minute, route",
    ),
    (
        12,
        "metric points",
        // OTLP metrics, one row per data point (the router's route aggregates and any
        // other service's sums, gauges and histograms).
        "CREATE TABLE IF NOT EXISTS {db}.metric_points (
    time DateTime,
    time_ns UInt64,
    start_ns UInt64,
    service String,
    instance String,
    name String,
    unit String,
    kind String,
    temporality String,
    attr_keys Array(String),
    attr_values Array(String),
    value Float64,
    count UInt64,
    sum Float64,
    scale Int32,
    zero_count UInt64,
    bucket_offset Int32,
    bucket_counts Array(UInt64),
    explicit_bounds Array(Float64)
) ENGINE = MergeTree
PARTITION BY toDate(time)
ORDER BY (name, time, instance)",
    ),
    (
        13,
        "route counts",
        // What every view counts: requests, errors, latency buckets and shadow-pair
        // outcomes per second, route, side, role and fallback, fed both by spans
        // (one row each) and by the router's aggregates (a row per sum and per
        // histogram bucket). A router that exports aggregates marks its resource
        // `strangler.counted`, so a request is counted once whichever way it came.
        // Latency is kept as the router's exponential buckets (bucket i holds
        // (2^(i/32), 2^((i+1)/32)] µs): percentiles are read within 1.1 %.
        "CREATE TABLE IF NOT EXISTS {db}.route_stats (
    time DateTime,
    route String,
    backend String,
    shadow UInt8,
    fallback UInt8,
    bucket Int16,
    requests UInt64,
    errors UInt64,
    hits UInt64,
    diff_match UInt64,
    diff_mismatch UInt64
) ENGINE = SummingMergeTree((requests, errors, hits, diff_match, diff_mismatch))
PARTITION BY toDate(time)
ORDER BY (route, backend, shadow, fallback, time, bucket)",
    ),
    (
        14,
        "route counts from the spans stored so far",
        // Runs while inserts are refused (the store is migrating), so an empty table
        // means this has not run yet: a rerun after a crash adds nothing twice.
        concat!(
            "INSERT INTO {db}.route_stats\nSELECT\n",
            span_route_stats!(),
            "\n    AND (SELECT count() FROM {db}.route_stats) = 0"
        ),
    ),
    (
        15,
        "route counts feed from spans",
        concat!(
            "CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.route_stats_spans_mv TO {db}.route_stats\nAS SELECT\n",
            span_route_stats!()
        ),
    ),
    (
        16,
        "route counts feed from the router's sums",
        concat!(
            "CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.route_stats_sums_mv TO {db}.route_stats\nAS SELECT\n",
            metric_route_stats_columns!(),
            "    toInt16(-1) AS bucket,
    toUInt64(if(name = 'strangler.requests', value, 0)) AS requests,
    toUInt64(if(name = 'strangler.errors', value, 0)) AS errors,
    toUInt64(0) AS hits,
    toUInt64(if(name = 'strangler.shadow.pairs' AND attr_values[indexOf(attr_keys, 'strangler.outcome')] = 'match', value, 0)) AS diff_match,
    toUInt64(if(name = 'strangler.shadow.pairs' AND attr_values[indexOf(attr_keys, 'strangler.outcome')] = 'mismatch', value, 0)) AS diff_mismatch
FROM {db}.metric_points
WHERE name IN ('strangler.requests', 'strangler.errors', 'strangler.shadow.pairs')"
        ),
    ),
    (
        17,
        "route counts feed from the router's latency histograms",
        concat!(
            "CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.route_stats_buckets_mv TO {db}.route_stats\nAS SELECT\n",
            metric_route_stats_columns!(),
            "    toInt16(bucket_offset + i - 1) AS bucket,
    toUInt64(0) AS requests,
    toUInt64(0) AS errors,
    n AS hits,
    toUInt64(0) AS diff_match,
    toUInt64(0) AS diff_mismatch
FROM {db}.metric_points
ARRAY JOIN bucket_counts AS n, arrayEnumerate(bucket_counts) AS i
WHERE name = 'strangler.request.duration' AND kind = 'exponential_histogram' AND scale = 5 AND n > 0"
        ),
    ),
    // The per-minute tables these fed are no longer read (route_stats counts the same
    // and the aggregates too); their feeds would only slow every insert down. The
    // tables stay, with their history, for dashboards a user built on them.
    (18, "retire the per-minute feed", "DROP TABLE IF EXISTS {db}.route_minute_mv"),
    (19, "retire the traffic feed", "DROP TABLE IF EXISTS {db}.traffic_minute_mv"),
    (20, "retire the fallback feed", "DROP TABLE IF EXISTS {db}.fallback_minute_mv"),
];
/// The name of the span the CLI sends for each route lifecycle change.
pub use strangler_model::names::span::ROUTE_CHANGE as ROUTE_CHANGE_SPAN;

/// The DDL of every migration for `database`, as `strangler collector schema` prints it.
pub fn schema_sql(database: &str) -> String {
    let mut out = format!("CREATE DATABASE IF NOT EXISTS {database};\n\n");
    for (version, what, sql) in MIGRATIONS {
        out.push_str(&format!(
            "-- migration {version}: {what}\n{};\n\n",
            sql.replace("{db}", database)
        ));
    }
    out
}

/// Spans in ClickHouse over HTTP (RowBinary inserts).
#[derive(Clone)]
pub struct ClickHouseStore {
    client: clickhouse::Client,
    /// The same connection settings bound to the database, for inserts (the crate
    /// quotes `db.table` as one name, so the database goes in the session instead).
    in_database: clickhouse::Client,
    database: String,
    /// Set once every migration has run. Until then inserts are refused as
    /// retryable (so they go to the spool): a span written before a materialized
    /// view exists never reaches that view's table, and would be missing from the
    /// route events and minute aggregates for good.
    migrated: Arc<AtomicBool>,
}

/// A ClickHouse error as a store error: a refused statement is not worth retrying.
pub(crate) fn unavailable(e: clickhouse::error::Error) -> StoreError {
    match &e {
        clickhouse::error::Error::BadResponse(message) => StoreError::Rejected(message.clone()),
        _ => StoreError::Unavailable(e.to_string()),
    }
}

impl ClickHouseStore {
    /// A store for `database` at `url` (`http://host:8123`).
    pub fn new(
        url: &str,
        database: &str,
        user: Option<&str>,
        password: Option<&str>,
        compress: bool,
    ) -> Self {
        // 18.16 does not send the column types the crate validates rows against.
        let mut client = clickhouse::Client::default()
            .with_url(url)
            .with_validation(false)
            .with_compression(if compress {
                clickhouse::Compression::Lz4
            } else {
                clickhouse::Compression::None
            });
        if let Some(user) = user {
            client = client.with_user(user);
        }
        if let Some(password) = password {
            client = client.with_password(password);
        }
        Self {
            in_database: client.clone().with_database(database),
            client,
            database: database.to_string(),
            migrated: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Whether every migration has been applied by this process.
    pub fn is_migrated(&self) -> bool {
        self.migrated.load(Ordering::Acquire)
    }

    /// The database name.
    pub fn database(&self) -> &str {
        &self.database
    }

    /// The underlying client, for queries.
    pub fn client(&self) -> &clickhouse::Client {
        &self.client
    }

    /// Creates the database and applies missing migrations, in order. Safe to run
    /// from several collectors at once: every statement is `IF NOT EXISTS`.
    pub async fn migrate(&self) -> Result<Vec<u32>, StoreError> {
        let db = &self.database;
        self.client
            .query(&format!("CREATE DATABASE IF NOT EXISTS {db}"))
            .execute()
            .await
            .map_err(unavailable)?;
        self.client
            .query(&format!(
                "CREATE TABLE IF NOT EXISTS {db}.schema_migrations (version UInt32, description String, applied DateTime DEFAULT now()) ENGINE = MergeTree ORDER BY version"
            ))
            .execute()
            .await
            .map_err(unavailable)?;
        let done: Vec<u32> = self
            .client
            .query(&format!(
                "SELECT DISTINCT version FROM {db}.schema_migrations"
            ))
            .fetch_all()
            .await
            .map_err(unavailable)?;
        let mut applied = Vec::new();
        for (version, description, sql) in MIGRATIONS {
            if done.contains(version) {
                continue;
            }
            self.client
                .query(&sql.replace("{db}", db))
                .execute()
                .await
                .map_err(unavailable)?;
            self.client
                .query(&format!(
                    "INSERT INTO {db}.schema_migrations (version, description) VALUES (?, ?)"
                ))
                .bind(*version)
                .bind(*description)
                .execute()
                .await
                .map_err(unavailable)?;
            tracing::info!(version, description, "applied ClickHouse migration");
            applied.push(*version);
        }
        self.migrated.store(true, Ordering::Release);
        Ok(applied)
    }
}

impl ClickHouseStore {
    /// Stores metric points (`Ok` only once every row is stored).
    pub async fn insert_metrics(
        &self,
        rows: &[crate::metric_model::MetricRow],
    ) -> Result<(), StoreError> {
        if !self.is_migrated() {
            return Err(StoreError::Migrating);
        }
        let mut insert = self
            .in_database
            .insert::<crate::metric_model::MetricRow>("metric_points")
            .await
            .map_err(unavailable)?;
        for row in rows {
            insert.write(row).await.map_err(unavailable)?;
        }
        insert.end().await.map_err(unavailable)
    }
}

#[async_trait]
impl SpanStore for ClickHouseStore {
    async fn insert(&self, rows: &[SpanRow]) -> Result<(), StoreError> {
        if !self.is_migrated() {
            return Err(StoreError::Migrating);
        }
        let mut insert = self
            .in_database
            .insert::<SpanRow>("spans")
            .await
            .map_err(unavailable)?;
        for row in rows {
            insert.write(row).await.map_err(unavailable)?;
        }
        insert.end().await.map_err(unavailable)
    }

    async fn ping(&self) -> bool {
        self.is_migrated()
            && self
                .client
                .query("SELECT 1")
                .fetch_one::<u8>()
                .await
                .is_ok()
    }
}

#[cfg(test)]
mod names_tests {
    use strangler_model::names::attr;

    use super::*;

    /// Migrations are frozen SQL text, so the names they read are spelled there;
    /// this keeps them equal to the one definition the CLI writes with.
    #[test]
    fn the_route_events_migration_reads_the_names_the_cli_writes() {
        let sql = schema_sql("strangler");
        assert!(sql.contains(&format!("name = '{ROUTE_CHANGE_SPAN}'")));
        for key in [
            attr::CHANGE_ROUTE,
            attr::CHANGE_FROM,
            attr::CHANGE_TO,
            attr::CHANGE_ACTION,
            attr::CHANGE_ACTOR,
            attr::CHANGE_REASON,
        ] {
            assert!(
                sql.contains(&format!("indexOf(attr_keys, '{key}')")),
                "{key}"
            );
        }
    }
}

#[cfg(test)]
mod readiness_tests {
    use super::*;

    #[tokio::test]
    async fn an_unmigrated_store_refuses_inserts_as_retryable_and_is_not_ready() {
        // Nothing listens on port 9 of loopback; the refusal must come before any request.
        let store = ClickHouseStore::new("http://127.0.0.1:9", "strangler", None, None, false);
        let err = store
            .insert(&[SpanRow::default()])
            .await
            .expect_err("refused before migration");
        assert!(err.is_retryable(), "{err}");
        assert!(matches!(err, StoreError::Migrating), "{err}");
        assert!(!store.ping().await);
    }
}
