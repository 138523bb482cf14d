//! The collector's own HTTP endpoints (default 127.0.0.1:8686): health, readiness,
//! metrics, the dashboard page and the JSON query API behind it.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::Deserialize;
use serde_json::Value;
use strangler_dashboards::Params;

use crate::metrics::Metrics;
use crate::query::{self, QueryError};
use crate::store::SpanStore;
use crate::store::StoreError;
use crate::store::clickhouse::ClickHouseStore;

/// What the endpoints need.
#[derive(Clone)]
pub struct WebState {
    /// ClickHouse.
    pub store: Arc<ClickHouseStore>,
    /// Counters.
    pub metrics: Metrics,
    /// Bearer token the API and metrics need; `None` only on loopback.
    pub token: Option<Arc<str>>,
}

#[derive(Debug, Default, Deserialize)]
struct WindowParams {
    route: Option<String>,
    since: Option<String>,
    trace_id: Option<String>,
    /// An exact window instead of `since`: seconds since the epoch (`to` defaults to now).
    from: Option<u32>,
    to: Option<u32>,
}

/// A custom rollout gate: SQL with the dashboards' macros over an exact window.
#[derive(Debug, Deserialize)]
struct GateRequest {
    sql: String,
    route: String,
    from: u32,
    to: Option<u32>,
}

/// Why a time window (`since=`) was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadWindow {
    /// No leading number.
    #[error("window {0:?}: expected e.g. 15m, 1h, 7d")]
    Number(String),
    /// A unit other than s, m, h, d.
    #[error("window {0:?}: unit must be s, m, h or d")]
    Unit(String),
    /// Zero, or too large to count in seconds.
    #[error("window {0:?} is out of range")]
    Range(String),
}

/// Parses `15m`, `1h`, `7d`, `90s` or plain seconds.
pub fn parse_window(text: &str) -> Result<u64, BadWindow> {
    let text = text.trim();
    let (number, unit) = text.split_at(
        text.find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len()),
    );
    let n: u64 = number
        .parse()
        .map_err(|_| BadWindow::Number(text.to_string()))?;
    let factor = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3_600,
        "d" => 86_400,
        _ => return Err(BadWindow::Unit(text.to_string())),
    };
    n.checked_mul(factor)
        .filter(|s| *s > 0)
        .ok_or_else(|| BadWindow::Range(text.to_string()))
}

fn error(status: StatusCode, message: String) -> Response {
    (status, axum::Json(serde_json::json!({ "error": message }))).into_response()
}

/// The router for the web port: health, readiness, the dashboard page and its
/// assets (open), metrics and the JSON API (bearer token when one is set).
pub fn router(state: WebState) -> axum::Router {
    let protected = axum::Router::new()
        .route("/metrics", get(metrics))
        .route("/api/overview", get(overview))
        .route("/api/route", get(route))
        .route("/api/query/{name}", get(named))
        .route("/api/trace/{trace_id}", get(trace))
        .route("/api/gate", axum::routing::post(gate))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            require_token,
        ));
    axum::Router::new()
        .route("/health", get(|| async { "ok\n" }))
        .route("/ready", get(ready))
        .route("/", get(index))
        .route("/assets/{file}", get(asset))
        .merge(protected)
        .with_state(state)
}

/// Compares tokens in time independent of where they differ.
fn token_matches(given: &[u8], expected: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    given.len() == expected.len() && bool::from(given.ct_eq(expected))
}

async fn require_token(
    State(state): State<WebState>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if let Some(expected) = &state.token {
        let given = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if !token_matches(given.as_bytes(), expected.as_bytes()) {
            let mut r = error(
                StatusCode::UNAUTHORIZED,
                "missing or wrong bearer token".into(),
            );
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
            return r;
        }
    }
    next.run(request).await
}

async fn index() -> Response {
    let page = strangler_dashboards::web::INDEX;
    (
        [
            (header::CONTENT_TYPE, page.content_type),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        page.body,
    )
        .into_response()
}

async fn asset(Path(file): Path<String>) -> Response {
    match strangler_dashboards::web::asset(&format!("/assets/{file}")) {
        Some(a) => (
            [
                (header::CONTENT_TYPE, a.content_type),
                (header::CACHE_CONTROL, "no-cache"),
            ],
            a.body,
        )
            .into_response(),
        None => error(StatusCode::NOT_FOUND, format!("no asset {file:?}")),
    }
}

async fn ready(State(state): State<WebState>) -> Response {
    if state.store.ping().await {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            if state.store.is_migrated() {
                "ClickHouse unreachable (spans are being spooled)\n"
            } else {
                "ClickHouse schema not migrated yet (spans are being spooled)\n"
            },
        )
            .into_response()
    }
}

async fn metrics(State(state): State<WebState>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
        .into_response()
}

/// The overview page's queries.
pub const OVERVIEW: &[&str] = &[
    "overview_routes",
    "route_states",
    "overview_sparklines",
    "overview_burndown",
    "legacy_endpoints",
];
/// The route page's queries (and `strangler compare`'s).
pub const ROUTE: &[&str] = &[
    "route_sides",
    "route_traffic",
    "route_errors",
    "route_latency",
    "route_diff_paths",
    "route_mismatches",
    "route_changes",
];

/// The query's parameters, or why the request is bad (a 400).
fn params(state: &WebState, p: &WindowParams) -> Result<Params, String> {
    let since = match p.from {
        Some(from) => {
            let to = p.to.unwrap_or_else(query::now_secs);
            if from > to {
                return Err(format!("from={from} is after to={to}"));
            }
            u64::from(to - from).max(1)
        }
        None => parse_window(p.since.as_deref().unwrap_or("1h")).map_err(|e| e.to_string())?,
    };
    if since > 31 * 86_400 {
        return Err(format!("window of {since} s is longer than 31 days"));
    }
    let mut params = query::window(&state.store, since);
    if let Some(from) = p.from {
        params.from = from;
        params.to = p.to.unwrap_or(params.to);
    }
    params.route = p.route.clone();
    if let Some(id) = &p.trace_id {
        params.trace_id = Some(trace_id(id)?);
    }
    Ok(params)
}

fn trace_id(given: &str) -> Result<String, String> {
    let id = given.to_ascii_lowercase();
    if id.len() != 32 || !id.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(format!("trace id {given:?} must be 32 hex characters"));
    }
    Ok(id)
}

fn answer(params: &Params, result: Result<serde_json::Map<String, Value>, QueryError>) -> Response {
    match result {
        Ok(mut doc) => {
            doc.insert("from".into(), params.from.into());
            doc.insert("to".into(), params.to.into());
            doc.insert("interval_s".into(), params.interval_s.into());
            if let Some(r) = &params.route {
                doc.insert("route".into(), r.clone().into());
            }
            axum::Json(Value::Object(doc)).into_response()
        }
        Err(e) => query_error(e),
    }
}

fn query_error(e: QueryError) -> Response {
    match e {
        QueryError::Unknown(_) => error(StatusCode::NOT_FOUND, e.to_string()),
        QueryError::Params(_) => error(StatusCode::BAD_REQUEST, e.to_string()),
        QueryError::Store(_) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

async fn overview(State(state): State<WebState>, Query(p): Query<WindowParams>) -> Response {
    let params = match params(&state, &p) {
        Ok(p) => p,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    answer(
        &params,
        query::run_all(&state.store, OVERVIEW, &params).await,
    )
}

async fn route(State(state): State<WebState>, Query(p): Query<WindowParams>) -> Response {
    if p.route.as_deref().is_none_or(str::is_empty) {
        return error(StatusCode::BAD_REQUEST, "route= is required".into());
    }
    let params = match params(&state, &p) {
        Ok(p) => p,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    answer(&params, query::run_all(&state.store, ROUTE, &params).await)
}

async fn named(
    State(state): State<WebState>,
    Path(name): Path<String>,
    Query(p): Query<WindowParams>,
) -> Response {
    let params = match params(&state, &p) {
        Ok(p) => p,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    match query::run(&state.store, &name, &params).await {
        Ok(a) => axum::Json(a).into_response(),
        Err(e) => query_error(e),
    }
}

async fn gate(State(state): State<WebState>, axum::Json(g): axum::Json<GateRequest>) -> Response {
    let window = WindowParams {
        route: Some(g.route),
        from: Some(g.from),
        to: g.to,
        ..WindowParams::default()
    };
    let params = match params(&state, &window) {
        Ok(p) => p,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    match query::run_user_sql(&state.store, &g.sql, &params).await {
        Ok(rows) => axum::Json(serde_json::json!({ "rows": rows })).into_response(),
        Err(QueryError::Store(StoreError::Rejected(e))) => error(StatusCode::BAD_REQUEST, e),
        Err(e) => query_error(e),
    }
}

async fn trace(State(state): State<WebState>, Path(given): Path<String>) -> Response {
    let id = match trace_id(&given) {
        Ok(id) => id,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    let mut params = query::window(&state.store, 3_600);
    params.trace_id = Some(id.clone());
    match query::run(&state.store, "trace_spans", &params).await {
        Ok(a) if a.rows.is_empty() => {
            error(StatusCode::NOT_FOUND, format!("no spans for trace {id}"))
        }
        Ok(a) => axum::Json(serde_json::json!({ "trace_id": id, "spans": a.rows })).into_response(),
        Err(e) => query_error(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_parse_with_units() {
        assert_eq!(parse_window("15m"), Ok(900));
        assert_eq!(parse_window("1h"), Ok(3_600));
        assert_eq!(parse_window("7d"), Ok(604_800));
        assert_eq!(parse_window("90"), Ok(90));
        assert!(parse_window("0m").is_err());
        assert!(parse_window("1w").is_err());
        assert!(parse_window("h").is_err());
    }
}
