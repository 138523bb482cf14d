//! The ClickHouse span store: schema migrations and RowBinary inserts.
//!
//! The schema works on Debian's ClickHouse 18.16 and on current releases: no
//! DateTime64, Map, LowCardinality, TTL or codecs; times as `DateTime` plus
//! nanosecond integers; attributes as parallel `Array(String)` columns.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use async_trait::async_trait;

use super::{SpanStore, StoreError};
use crate::rowbinary::{Encoded, SPAN_COLUMNS};

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

/// The DDL of every migration for `database`, as `strangler collector schema` prints
/// it: for one server, or (`cluster`) for a replicated cluster.
pub fn schema_sql(database: &str, cluster: Option<&str>) -> String {
    let mut out = match cluster {
        None => format!("CREATE DATABASE IF NOT EXISTS {database};\n\n"),
        Some(c) => format!("CREATE DATABASE IF NOT EXISTS {database} ON CLUSTER {c};\n\n"),
    };
    if let Some(c) = cluster {
        out.push_str(&format!("{};\n\n", migrations_table(database, Some(c))));
    }
    for (version, what, sql) in MIGRATIONS {
        out.push_str(&format!("-- migration {version}: {what}\n"));
        for statement in statements(sql, database, cluster) {
            out.push_str(&statement);
            out.push_str(";\n\n");
        }
    }
    out
}

/// Where the applied migrations are recorded. On a cluster, one replicated table
/// every server holds a replica of (no shard in its path), so any server says what
/// the whole cluster has applied.
fn migrations_table(db: &str, cluster: Option<&str>) -> String {
    match cluster {
        None => format!(
            "CREATE TABLE IF NOT EXISTS {db}.schema_migrations (version UInt32, description String, applied DateTime DEFAULT now()) ENGINE = MergeTree ORDER BY version"
        ),
        Some(c) => format!(
            "CREATE TABLE IF NOT EXISTS {db}.schema_migrations ON CLUSTER {c} (version UInt32, description String, applied DateTime DEFAULT now()) ENGINE = ReplicatedMergeTree('/clickhouse/tables/{db}/schema_migrations', '{{replica}}') ORDER BY version"
        ),
    }
}

/// A migration's statements for `db`: the text itself on one server. On a cluster
/// each table becomes a `Replicated…MergeTree` table `NAME_local` on every server
/// (`ON CLUSTER`, its ZooKeeper path per shard) plus a `Distributed` table `NAME`
/// over them — sharded by trace id where the table has one, so a trace's spans
/// live on one shard — and every materialized view reads and writes the local
/// tables on each server, so its rows stay on the shard of the rows that fed them.
/// Queries and inserts keep using the plain names: they go through the
/// distributed tables.
pub fn statements(sql: &str, db: &str, cluster: Option<&str>) -> Vec<String> {
    let Some(c) = cluster else {
        return vec![sql.replace("{db}", db)];
    };
    let local = |sql: &str| -> String {
        // `FROM {db}.NAME` → `FROM {db}.NAME_local`, for every table a view reads.
        let mut out = String::with_capacity(sql.len() + 16);
        let mut rest = sql;
        while let Some(at) = rest.find("FROM {db}.") {
            let start = at + "FROM {db}.".len();
            let end = rest[start..]
                .find(|ch: char| !(ch.is_ascii_alphanumeric() || ch == '_'))
                .map_or(rest.len(), |n| start + n);
            out.push_str(&rest[..end]);
            out.push_str("_local");
            rest = &rest[end..];
        }
        out.push_str(rest);
        out
    };
    let converted: Vec<String> = if let Some(rest) =
        sql.strip_prefix("CREATE TABLE IF NOT EXISTS {db}.")
    {
        let name_end = rest.find([' ', '(']).unwrap_or(rest.len());
        let name = &rest[..name_end];
        let Some(engine_at) = rest.find(") ENGINE = ") else {
            return vec![format!("-- cannot convert for a cluster: {sql}")];
        };
        let columns = &rest[name_end..=engine_at];
        let after = &rest[engine_at + ") ENGINE = ".len()..];
        let (engine, tail) = after.split_once('\n').unwrap_or((after, ""));
        let (engine_name, args) = match engine.split_once('(') {
            Some((n, a)) => (n.trim(), Some(a.strip_suffix(')').unwrap_or(a))),
            None => (engine.trim(), None),
        };
        let path = format!("'/clickhouse/tables/{{shard}}/{{db}}/{name}', '{{replica}}'");
        let replicated = match args {
            Some(a) if !a.is_empty() => format!("Replicated{engine_name}({path}, {a})"),
            _ => format!("Replicated{engine_name}({path})"),
        };
        let key = if columns.contains("trace_id String") {
            "cityHash64(trace_id)"
        } else {
            "rand()"
        };
        vec![
            format!(
                "CREATE TABLE IF NOT EXISTS {{db}}.{name}_local ON CLUSTER {c}{columns} ENGINE = {replicated}\n{tail}"
            ),
            format!(
                "CREATE TABLE IF NOT EXISTS {{db}}.{name} ON CLUSTER {c} AS {{db}}.{name}_local ENGINE = Distributed({c}, {{db}}, {name}_local, {key})"
            ),
        ]
    } else if let Some(rest) = sql.strip_prefix("CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.") {
        let (name, rest) = rest.split_once(" TO {db}.").unwrap_or((rest, ""));
        let target_end = rest
            .find(|ch: char| !(ch.is_ascii_alphanumeric() || ch == '_'))
            .unwrap_or(rest.len());
        vec![format!(
            "CREATE MATERIALIZED VIEW IF NOT EXISTS {{db}}.{name} ON CLUSTER {c} TO {{db}}.{}_local{}",
            &rest[..target_end],
            local(&rest[target_end..])
        )]
    } else if let Some(table) = sql.strip_prefix("DROP TABLE IF EXISTS ") {
        vec![format!("DROP TABLE IF EXISTS {table} ON CLUSTER {c}")]
    } else {
        // Data statements (the route_stats backfill) run once, through the
        // distributed tables.
        vec![sql.to_string()]
    };
    converted
        .into_iter()
        .map(|s| s.replace("{db}", db))
        .collect()
}

/// Spans in ClickHouse over HTTP (RowBinary inserts).
#[derive(Clone)]
pub struct ClickHouseStore {
    client: clickhouse::Client,
    /// The same connection settings bound to the database, for inserts (the crate
    /// quotes `db.table` as one name, so the database goes in the session instead).
    in_database: clickhouse::Client,
    database: String,
    /// The cluster (`remote_servers` name) the schema spans, if any.
    cluster: Option<String>,
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
        cluster: Option<&str>,
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
        let mut in_database = client.clone().with_database(database);
        if cluster.is_some() {
            // An insert through a Distributed table is acknowledged only once every
            // shard it touched has stored its part (not when the receiving server
            // queued it), so an acknowledged export is on the shards' replicas.
            in_database = in_database.with_setting("insert_distributed_sync", "1");
        }
        Self {
            in_database,
            client,
            database: database.to_string(),
            cluster: cluster.map(str::to_string),
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
        let cluster = self.cluster.as_deref();
        let on_cluster = cluster.map_or_else(String::new, |c| format!(" ON CLUSTER {c}"));
        self.ddl(&format!("CREATE DATABASE IF NOT EXISTS {db}{on_cluster}"))
            .await?;
        self.ddl(&migrations_table(db, cluster)).await?;
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
            for statement in statements(sql, db, cluster) {
                self.ddl(&statement).await?;
            }
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

    /// Runs one schema statement. On a cluster a server that does not finish its
    /// part of `ON CLUSTER` DDL in time (it is down) is a reason to retry, not a
    /// rejected migration: the task waits in ZooKeeper and runs when it is back.
    async fn ddl(&self, sql: &str) -> Result<(), StoreError> {
        match self.client.query(sql).execute().await {
            Err(clickhouse::error::Error::BadResponse(message))
                if self.cluster.is_some()
                    && (message.contains("Code: 159") || message.contains("Watching task")) =>
            {
                Err(StoreError::Unavailable(message))
            }
            other => other.map_err(unavailable),
        }
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

    /// Whether a point of the same series, interval and instance is stored already
    /// (what a retried export that was in fact stored the first time looks like).
    pub async fn holds_metric_point(
        &self,
        row: &crate::metric_model::MetricRow,
    ) -> Result<bool, StoreError> {
        if !self.is_migrated() {
            return Err(StoreError::Migrating);
        }
        // The table's key (name, time, instance) narrows it to a granule.
        let n = self
            .in_database
            .query(
                "SELECT count() FROM metric_points WHERE name = ? AND time = toDateTime(?) \
                 AND instance = ? AND start_ns = ? AND time_ns = ?",
            )
            .bind(row.name.as_str())
            .bind(row.time)
            .bind(row.instance.as_str())
            .bind(row.start_ns)
            .bind(row.time_ns)
            .fetch_one::<u64>()
            .await
            .map_err(unavailable)?;
        Ok(n > 0)
    }
}

#[async_trait]
impl SpanStore for ClickHouseStore {
    async fn insert(&self, spans: &Encoded) -> Result<(), StoreError> {
        if !self.is_migrated() {
            return Err(StoreError::Migrating);
        }
        // The rows are RowBinary already (encoded once, by the receiver): sent as
        // they are, chunk by chunk, with no row-by-row serialization here.
        let mut insert = self.in_database.insert_formatted_with(format!(
            "INSERT INTO spans ({SPAN_COLUMNS}) FORMAT RowBinary"
        ));
        for chunk in &spans.chunks {
            insert.send(chunk.clone()).await.map_err(unavailable)?;
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
        let sql = schema_sql("strangler", None);
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
mod cluster_tests {
    use super::*;

    #[test]
    fn on_a_cluster_every_table_is_replicated_and_distributed_and_every_view_reads_local_tables() {
        let mut tables = 0;
        for (version, _, sql) in MIGRATIONS {
            let out = statements(sql, "strangler", Some("c"));
            let single = statements(sql, "strangler", None);
            assert_eq!(single, vec![sql.replace("{db}", "strangler")], "{version}");
            for statement in &out {
                assert!(
                    !statement.contains("{db}") && !statement.starts_with("--"),
                    "{version}: {statement}"
                );
                if statement.starts_with("CREATE") || statement.starts_with("DROP") {
                    assert!(
                        statement.contains(" ON CLUSTER c"),
                        "{version}: {statement}"
                    );
                }
            }
            if sql.starts_with("CREATE TABLE") {
                tables += 1;
                assert_eq!(out.len(), 2, "{version}");
                assert!(
                    out[0].contains("_local ON CLUSTER c (")
                        && out[0].contains("ENGINE = Replicated"),
                    "{version}: {}",
                    out[0]
                );
                assert!(
                    out[0].contains("'/clickhouse/tables/{shard}/strangler/"),
                    "{}",
                    out[0]
                );
                assert!(
                    out[1].contains("ENGINE = Distributed(c, strangler, "),
                    "{}",
                    out[1]
                );
            }
            if sql.starts_with("CREATE MATERIALIZED VIEW") {
                assert!(
                    out[0].contains("_local\nAS SELECT"),
                    "{version}: {}",
                    out[0]
                );
                assert!(
                    out[0].contains("FROM strangler.spans_local")
                        || out[0].contains("FROM strangler.metric_points_local"),
                    "{version}: {}",
                    out[0]
                );
            }
        }
        assert!(tables >= 8);
        let spans = statements(MIGRATIONS[0].2, "strangler", Some("c"));
        assert!(
            spans[1].ends_with("spans_local, cityHash64(trace_id))"),
            "{}",
            spans[1]
        );
        let summing = statements(MIGRATIONS[12].2, "strangler", Some("c"));
        assert!(
            summing[0].contains("ReplicatedSummingMergeTree('/clickhouse/tables/{shard}/strangler/route_stats', '{replica}', (requests, errors, hits, diff_match, diff_mismatch))"),
            "{}",
            summing[0]
        );
        assert!(
            schema_sql("strangler", Some("c"))
                .starts_with("CREATE DATABASE IF NOT EXISTS strangler ON CLUSTER c;")
        );
    }
}

#[cfg(test)]
mod readiness_tests {
    use super::*;

    #[tokio::test]
    async fn an_unmigrated_store_refuses_inserts_as_retryable_and_is_not_ready() {
        // Nothing listens on port 9 of loopback; the refusal must come before any request.
        let store =
            ClickHouseStore::new("http://127.0.0.1:9", "strangler", None, None, false, None);
        let err = store
            .insert(&Encoded::from_rows(&[crate::model::SpanRow::default()]))
            .await
            .expect_err("refused before migration");
        assert!(err.is_retryable(), "{err}");
        assert!(matches!(err, StoreError::Migrating), "{err}");
        assert!(!store.ping().await);
    }
}
