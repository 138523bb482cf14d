//! Runs the dashboards' named queries against ClickHouse: the web page, the JSON API
//! and `strangler compare` all read through here, so they show the same numbers.

use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;
use serde_json::Value;
use strangler_dashboards::query::{self, NamedQuery, Params};

use crate::store::StoreError;
use crate::store::clickhouse::ClickHouseStore;

/// About this many points per series, whatever the window.
pub const POINTS: u32 = 120;

/// One query's answer.
#[derive(Debug, Clone, Serialize)]
pub struct Answer {
    /// The named query.
    pub name: &'static str,
    /// Rows as JSON objects, columns by name.
    pub rows: Vec<Value>,
}

/// Why a named query could not be answered.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    /// No query has that name.
    #[error("no dashboard query is called {0:?}")]
    Unknown(String),
    /// Its variables are missing or wrong.
    #[error(transparent)]
    Params(#[from] query::ExpandError),
    /// ClickHouse failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Seconds since the epoch.
pub fn now_secs() -> u32 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u32::try_from(d.as_secs()).unwrap_or(u32::MAX))
}

/// The window of the last `since` seconds in `store`'s database.
pub fn window(store: &ClickHouseStore, since: u64) -> Params {
    Params::window(
        store.database(),
        now_secs(),
        u32::try_from(since).unwrap_or(u32::MAX),
        POINTS,
    )
}

/// Runs the query called `name` with `params`.
pub async fn run(
    store: &ClickHouseStore,
    name: &str,
    params: &Params,
) -> Result<Answer, QueryError> {
    let named: &NamedQuery =
        query::get(name).ok_or_else(|| QueryError::Unknown(name.to_string()))?;
    Ok(Answer {
        name: named.name,
        rows: rows(store, named.sql, params, false).await?,
    })
}

/// Runs SQL a user wrote (a rollout's custom gate) with the same macros, read-only
/// and bounded in time.
pub async fn run_user_sql(
    store: &ClickHouseStore,
    sql: &str,
    params: &Params,
) -> Result<Vec<Value>, QueryError> {
    rows(store, sql, params, true).await
}

async fn rows(
    store: &ClickHouseStore,
    sql: &str,
    params: &Params,
    untrusted: bool,
) -> Result<Vec<Value>, QueryError> {
    let expanded = query::expand(sql, params)?;
    let mut q = store
        .client()
        .query(&expanded.sql)
        // Numbers as JSON numbers (the page and the CLI do arithmetic on them).
        .with_setting("output_format_json_quote_64bit_integers", "0");
    if untrusted {
        // readonly=2: no writes or DDL, settings still allowed (the one above).
        q = q
            .with_setting("readonly", "2")
            .with_setting("max_execution_time", "10")
            .with_setting("max_result_rows", "1000");
    }
    for value in &expanded.binds {
        q = q.bind(value.as_str());
    }
    let bytes = q
        .fetch_bytes("JSONEachRow")
        .map_err(crate::store::clickhouse::unavailable)?
        .collect()
        .await
        .map_err(crate::store::clickhouse::unavailable)?;
    bytes
        .split(|b| *b == b'\n')
        .filter(|line| !line.is_empty())
        .map(serde_json::from_slice::<Value>)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| QueryError::Store(StoreError::Rejected(format!("unreadable row: {e}"))))
}

/// Runs several queries with the same parameters, one after another (a handful of
/// small queries: in turn keeps a dashboard's load on ClickHouse bounded).
pub async fn run_all(
    store: &ClickHouseStore,
    names: &[&str],
    params: &Params,
) -> Result<serde_json::Map<String, Value>, QueryError> {
    let mut out = serde_json::Map::new();
    for name in names {
        let answer = run(store, name, params).await?;
        out.insert(answer.name.to_string(), Value::Array(answer.rows));
    }
    Ok(out)
}
