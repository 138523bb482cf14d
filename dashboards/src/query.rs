//! The named queries and the macro expansion the collector and the Grafana test use.

use std::fmt::Write as _;

/// How a query's rows are meant to be drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// A `time` column and numeric series (wide format: one column per series).
    TimeSeries,
    /// Rows to list.
    Table,
}

/// Which page (and Grafana row) a query belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// All routes.
    Overview,
    /// One route (`'${route}'`).
    Route,
    /// One trace (`'${trace_id}'`).
    Trace,
    /// Support queries (variables, states) not drawn as a panel of their own.
    Support,
}

/// One named query.
#[derive(Debug, Clone, Copy)]
pub struct NamedQuery {
    /// Stable name: the API path segment and the file name under `dashboards/sql/`.
    pub name: &'static str,
    /// Panel title.
    pub title: &'static str,
    /// How it is drawn.
    pub shape: Shape,
    /// Where it belongs.
    pub scope: Scope,
    /// Grafana unit of the series (`reqps`, `percentunit`, `ms`, `short`).
    pub unit: &'static str,
    /// The SQL, in the Grafana plugin's macro dialect.
    pub sql: &'static str,
}

macro_rules! named {
    ($name:literal, $title:literal, $shape:ident, $scope:ident, $unit:literal) => {
        NamedQuery {
            name: $name,
            title: $title,
            shape: Shape::$shape,
            scope: Scope::$scope,
            unit: $unit,
            sql: include_str!(concat!("../sql/", $name, ".sql")),
        }
    };
}

/// Every named query, in dashboard order.
pub const QUERIES: &[NamedQuery] = &[
    named!("overview_routes", "Routes", Table, Overview, "short"),
    named!(
        "legacy_endpoints",
        "Which route next? Legacy traffic by endpoint",
        Table,
        Overview,
        "short"
    ),
    named!(
        "overview_burndown",
        "Migration burndown: share of traffic on legacy",
        TimeSeries,
        Overview,
        "percentunit"
    ),
    named!(
        "overview_sparklines",
        "Requests per route",
        TimeSeries,
        Overview,
        "short"
    ),
    named!(
        "route_traffic",
        "Requests per second",
        TimeSeries,
        Route,
        "reqps"
    ),
    named!(
        "route_errors",
        "Error rate",
        TimeSeries,
        Route,
        "percentunit"
    ),
    named!(
        "route_latency",
        "Latency p50 / p95 / p99",
        TimeSeries,
        Route,
        "ms"
    ),
    named!("route_sides", "Totals per side", Table, Route, "short"),
    named!(
        "route_diff_paths",
        "Differences by JSON path",
        Table,
        Route,
        "short"
    ),
    named!(
        "route_mismatches",
        "Sample mismatches",
        Table,
        Route,
        "short"
    ),
    named!(
        "route_changes",
        "Flips and rollbacks",
        Table,
        Route,
        "short"
    ),
    named!(
        "route_evidence",
        "Rollout evidence (exact, from spans)",
        Table,
        Route,
        "short"
    ),
    named!("trace_spans", "Trace", Table, Trace, "short"),
    named!("route_states", "Route states", Table, Support, "short"),
    named!("route_names", "Routes", Table, Support, "short"),
];

/// The query called `name`.
pub fn get(name: &str) -> Option<&'static NamedQuery> {
    QUERIES.iter().find(|q| q.name == name)
}

/// Values for one run of a query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Params {
    /// The ClickHouse database (`${database}`).
    pub database: String,
    /// Window start, seconds since the epoch.
    pub from: u32,
    /// Window end, seconds since the epoch.
    pub to: u32,
    /// Bucket width in seconds (`$__interval_s`).
    pub interval_s: u32,
    /// `${route}`, when the query needs one.
    pub route: Option<String>,
    /// `${trace_id}`, when the query needs one.
    pub trace_id: Option<String>,
}

/// Bucket widths a chart may use: whole minutes (the aggregates are per minute) that
/// read well on an axis.
const STEPS: &[u32] = &[
    60, 120, 300, 600, 900, 1_800, 3_600, 7_200, 10_800, 21_600, 43_200, 86_400,
];

impl Params {
    /// The window `[now - since, now]` with a bucket width giving at most about
    /// `points` points per series.
    pub fn window(database: &str, now: u32, since: u32, points: u32) -> Self {
        let ideal = since / points.max(1);
        let interval_s = STEPS
            .iter()
            .copied()
            .find(|s| *s >= ideal)
            .unwrap_or(86_400);
        Self {
            database: database.to_string(),
            from: now.saturating_sub(since),
            to: now,
            interval_s,
            route: None,
            trace_id: None,
        }
    }
}

/// A query ready to send: `?` placeholders with their values in order, for a client
/// that escapes bound values (the `clickhouse` crate's `bind`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expanded {
    /// SQL with `?` where each bound value goes.
    pub sql: String,
    /// The values, in placeholder order.
    pub binds: Vec<String>,
}

/// Why a query cannot be expanded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExpandError {
    /// A variable the query uses was not given.
    #[error("the query needs a value for ${{{0}}}")]
    Missing(&'static str),
    /// The database name is not a plain identifier.
    #[error("database {0:?} must be letters, digits and _")]
    Database(String),
    /// A macro this expander does not know (a bug in a named query).
    #[error("unknown macro or variable at {0:?}")]
    Unknown(String),
}

/// Replaces the Grafana plugin's macros the named queries use:
/// `$__timeFilter(col)` → `col >= toDateTime(from) AND col <= toDateTime(to)` (as
/// the plugin does), `$__fromTime`, `$__toTime`, `$__interval_s`, `${database}`, and
/// the quoted string variables `'${route}'` and `'${trace_id}'` → a bound `?`.
/// Anything else starting with `$` is refused rather than sent.
pub fn expand(sql: &str, params: &Params) -> Result<Expanded, ExpandError> {
    if params.database.is_empty()
        || !params
            .database
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_')
    {
        return Err(ExpandError::Database(params.database.clone()));
    }
    let mut out = String::with_capacity(sql.len() + 64);
    let mut binds = Vec::new();
    let mut rest = sql;
    while let Some(at) = rest.find(['$', '?']) {
        out.push_str(&rest[..at]);
        rest = &rest[at..];
        // A literal `?` would be taken for a placeholder by the client: double it.
        if let Some(after) = rest.strip_prefix('?') {
            out.push_str("??");
            rest = after;
            continue;
        }
        if let Some(after) = rest.strip_prefix("$__timeFilter(") {
            let Some(close) = after.find(')') else {
                return Err(ExpandError::Unknown(excerpt(rest)));
            };
            let column = after[..close].trim();
            let _ = write!(
                out,
                "{column} >= toDateTime({}) AND {column} <= toDateTime({})",
                params.from, params.to
            );
            rest = &after[close + 1..];
        } else if let Some(after) = rest.strip_prefix("$__fromTime") {
            let _ = write!(out, "toDateTime({})", params.from);
            rest = after;
        } else if let Some(after) = rest.strip_prefix("$__toTime") {
            let _ = write!(out, "toDateTime({})", params.to);
            rest = after;
        } else if let Some(after) = rest.strip_prefix("$__interval_s") {
            let _ = write!(out, "{}", params.interval_s.max(1));
            rest = after;
        } else if let Some(after) = rest.strip_prefix("${database}") {
            out.push_str(&params.database);
            rest = after;
        } else if let Some((name, value, after)) = quoted_variable(&out, rest, params)? {
            out.pop();
            out.push('?');
            binds.push(value.ok_or(ExpandError::Missing(name))?);
            rest = after;
        } else {
            return Err(ExpandError::Unknown(excerpt(rest)));
        }
    }
    out.push_str(rest);
    Ok(Expanded { sql: out, binds })
}

type Quoted<'a> = (&'static str, Option<String>, &'a str);

/// `'${route}'` or `'${trace_id}'` at `rest` (the opening quote already in `out`):
/// the variable's name, its value and the text after the closing quote.
fn quoted_variable<'a>(
    out: &str,
    rest: &'a str,
    params: &Params,
) -> Result<Option<Quoted<'a>>, ExpandError> {
    if !out.ends_with('\'') {
        return Ok(None);
    }
    for (name, value) in [("route", &params.route), ("trace_id", &params.trace_id)] {
        if let Some(after) = rest
            .strip_prefix("${")
            .and_then(|r| r.strip_prefix(name))
            .and_then(|r| r.strip_prefix("}'"))
        {
            return Ok(Some((name, value.clone(), after)));
        }
    }
    Ok(None)
}

fn excerpt(s: &str) -> String {
    s.chars().take(24).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> Params {
        Params {
            database: "strangler".into(),
            from: 1_000,
            to: 4_600,
            interval_s: 60,
            route: Some("orders".into()),
            trace_id: None,
        }
    }

    #[test]
    fn macros_expand_like_the_grafana_plugin_and_variables_are_bound() {
        let e = expand(
            "SELECT count() FROM ${database}.spans WHERE route = '${route}' AND $__timeFilter(start_time) GROUP BY intDiv(x, $__interval_s) HAVING $__fromTime < $__toTime",
            &params(),
        )
        .expect("expands");
        assert_eq!(
            e.sql,
            "SELECT count() FROM strangler.spans WHERE route = ? AND start_time >= toDateTime(1000) AND start_time <= toDateTime(4600) GROUP BY intDiv(x, 60) HAVING toDateTime(1000) < toDateTime(4600)"
        );
        assert_eq!(e.binds, vec!["orders".to_string()]);
    }

    #[test]
    fn a_missing_variable_or_unknown_macro_is_refused() {
        let mut p = params();
        p.route = None;
        assert_eq!(
            expand("WHERE route = '${route}'", &p),
            Err(ExpandError::Missing("route"))
        );
        assert!(matches!(
            expand("WHERE x = $__timeGroup(t, 1m)", &params()),
            Err(ExpandError::Unknown(_))
        ));
        assert!(matches!(
            expand("WHERE x = ${route}", &params()),
            Err(ExpandError::Unknown(_))
        ));
        p.database = "x; DROP".into();
        assert!(matches!(
            expand("SELECT 1", &p),
            Err(ExpandError::Database(_))
        ));
    }

    #[test]
    fn a_literal_question_mark_is_not_taken_for_a_placeholder() {
        let e = expand("SELECT '?' FROM t WHERE r = '${route}'", &params()).expect("expands");
        assert_eq!(e.sql, "SELECT '??' FROM t WHERE r = ?");
    }

    #[test]
    fn every_named_query_expands_with_its_variables() {
        for q in QUERIES {
            let mut p = params();
            p.trace_id = Some("0af7651916cd43dd8448eb211c80319c".into());
            let e = expand(q.sql, &p).unwrap_or_else(|err| panic!("{}: {err}", q.name));
            assert!(!e.sql.contains('$'), "{}: {}", q.name, e.sql);
            let needs_route = q.sql.contains("'${route}'");
            assert_eq!(needs_route, q.scope == Scope::Route, "{}", q.name);
        }
    }

    #[test]
    fn windows_get_whole_minute_buckets_of_about_the_asked_count() {
        let p = Params::window("s", 100_000, 900, 120);
        assert_eq!((p.from, p.to, p.interval_s), (99_100, 100_000, 60));
        let p = Params::window("s", 1_000_000, 7 * 86_400, 120);
        assert_eq!(p.interval_s, 7_200);
        assert!(7 * 86_400 / p.interval_s <= 120);
    }
}
