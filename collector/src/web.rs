//! The collector's own HTTP endpoints (default 127.0.0.1:8686): health, readiness,
//! metrics and the JSON query API.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::Deserialize;

use crate::metrics::Metrics;
use crate::query;
use crate::store::SpanStore;
use crate::store::clickhouse::ClickHouseStore;

/// What the endpoints need.
#[derive(Clone)]
pub struct WebState {
    /// ClickHouse.
    pub store: Arc<ClickHouseStore>,
    /// Counters.
    pub metrics: Metrics,
}

#[derive(Debug, Deserialize)]
struct CompareParams {
    route: String,
    since: Option<String>,
}

/// Parses `15m`, `1h`, `7d`, `90s` or plain seconds.
pub fn parse_window(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let (number, unit) = text.split_at(
        text.find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len()),
    );
    let n: u64 = number
        .parse()
        .map_err(|_| format!("window {text:?}: expected e.g. 15m, 1h, 7d"))?;
    let factor = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3_600,
        "d" => 86_400,
        _ => return Err(format!("window {text:?}: unit must be s, m, h or d")),
    };
    n.checked_mul(factor)
        .filter(|s| *s > 0)
        .ok_or_else(|| format!("window {text:?} is out of range"))
}

fn error(status: StatusCode, message: String) -> Response {
    (status, axum::Json(serde_json::json!({ "error": message }))).into_response()
}

/// The router for the web port.
pub fn router(state: WebState) -> axum::Router {
    axum::Router::new()
        .route("/health", get(|| async { "ok\n" }))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .route("/api/compare", get(compare))
        .route("/api/trace/{trace_id}", get(trace))
        .with_state(state)
}

async fn ready(State(state): State<WebState>) -> Response {
    if state.store.ping().await {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "ClickHouse unreachable (spans are being spooled)\n",
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

async fn compare(State(state): State<WebState>, Query(params): Query<CompareParams>) -> Response {
    let since = match parse_window(params.since.as_deref().unwrap_or("1h")) {
        Ok(s) => s,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    match query::compare(&state.store, &params.route, since).await {
        Ok(c) => axum::Json(c).into_response(),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

async fn trace(State(state): State<WebState>, Path(trace_id): Path<String>) -> Response {
    let id = trace_id.to_ascii_lowercase();
    if id.len() != 32 || !id.chars().all(|c| c.is_ascii_hexdigit()) {
        return error(
            StatusCode::BAD_REQUEST,
            format!("trace id {trace_id:?} must be 32 hex characters"),
        );
    }
    match query::trace(&state.store, &id).await {
        Ok(spans) if spans.is_empty() => {
            error(StatusCode::NOT_FOUND, format!("no spans for trace {id}"))
        }
        Ok(spans) => {
            axum::Json(serde_json::json!({ "trace_id": id, "spans": spans })).into_response()
        }
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
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
