//! The admin API: route states, overrides, health, readiness and metrics.
//!
//! | method | path | what |
//! |---|---|---|
//! | GET | `/health` | liveness, no token needed |
//! | GET | `/ready` | 200 once flags were read, 503 before; no token needed |
//! | GET | `/metrics` | Prometheus text format |
//! | GET | `/routes` | every route with override, flag state and last-minute counts |
//! | GET | `/routes/{name}` | one route |
//! | PUT | `/routes/{name}/override` | body `{"backend": "legacy" \| "new"}` |
//! | DELETE | `/routes/{name}/override` | clears the override; `?if_version=V` only while its version is `V` (else 409) |
//! | GET | `/routes/{name}/shadow` | comparison results: counts, differing paths, mismatch samples |
//! | POST | `/routes/{name}/calibrate` | body `{"requests": N}`: learn legacy's own noise from N pairs |
//! | GET | `/routes/{name}/calibration` | progress and suggested ignore rules with their noise rates |
//!
//! With a token configured every other endpoint needs `Authorization: Bearer <token>`.

use std::sync::Arc;

use async_trait::async_trait;
use http::{Method, Response, StatusCode};
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use serde::{Deserialize, Serialize};

use crate::flags::{FlagState, Freshness};
use crate::routing::Route;
use crate::routing::breaker::BreakerState;
use crate::state::RouterState;
use strangler_model::Backend;

/// Request bodies above this are refused: the API only takes tiny JSON documents.
const MAX_BODY: usize = 64 * 1024;

/// The admin API application.
pub struct AdminApi {
    state: Arc<RouterState>,
}

impl AdminApi {
    /// The API over shared state.
    pub fn new(state: Arc<RouterState>) -> Self {
        Self { state }
    }
}

/// Per-backend counts over the last minute.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Counts {
    /// Requests.
    pub requests: u64,
    /// Requests that failed (no response or 5xx).
    pub errors: u64,
}

/// A route as the admin API reports it.
#[derive(Debug, Serialize)]
pub struct RouteStatus {
    /// Name.
    pub name: String,
    /// `http.route` as written.
    pub path: String,
    /// The new upstream.
    pub new_upstream: String,
    /// The toggle.
    pub flag: String,
    /// The override, if any.
    #[serde(rename = "override")]
    pub override_backend: Option<Backend>,
    /// The override's version: `DELETE …/override?if_version=V` clears it only
    /// while it is still `V`.
    pub override_version: String,
    /// The toggle's state.
    pub flag_state: FlagState,
    /// The new service's circuit breaker.
    pub breaker: BreakerState,
    /// Last-minute counts for legacy.
    pub legacy: Counts,
    /// Last-minute counts for new.
    pub new: Counts,
}

#[derive(Debug, Serialize)]
struct RoutesDocument {
    routes: Vec<RouteStatus>,
    flags: Freshness,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CalibrateBody {
    requests: u64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct OverrideBody {
    backend: Backend,
}

fn json_response<T: Serialize>(status: StatusCode, body: &T) -> Response<Vec<u8>> {
    let bytes = serde_json::to_vec_pretty(body).unwrap_or_else(|_| b"{}".to_vec());
    respond(status, "application/json", bytes)
}

fn error(status: StatusCode, message: &str) -> Response<Vec<u8>> {
    json_response(status, &serde_json::json!({ "error": message }))
}

fn respond(status: StatusCode, content_type: &str, body: Vec<u8>) -> Response<Vec<u8>> {
    let mut response = Response::new(body);
    *response.status_mut() = status;
    let len = response.body().len();
    let headers = response.headers_mut();
    if let Ok(v) = content_type.parse() {
        headers.insert(http::header::CONTENT_TYPE, v);
    }
    headers.insert(http::header::CONTENT_LENGTH, len.into());
    headers.insert(
        http::header::CACHE_CONTROL,
        http::HeaderValue::from_static("no-store"),
    );
    response
}

/// Compares tokens in time independent of where they differ.
fn token_matches(given: &[u8], expected: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    given.len() == expected.len() && bool::from(given.ct_eq(expected))
}

impl AdminApi {
    fn status_of(&self, runtime: &Route) -> RouteStatus {
        let route = &runtime.config;
        let name = route.name.as_str();
        let counts = |b: Backend| {
            let (requests, errors) = runtime.state.window(b).totals();
            Counts { requests, errors }
        };
        RouteStatus {
            name: name.to_string(),
            path: route.path_text.clone(),
            new_upstream: route.new_upstream.authority.clone(),
            flag: route.flag.clone(),
            override_backend: self.state.overrides.get(name),
            override_version: self.state.overrides.version(name),
            flag_state: self.state.flags.state(&route.flag),
            breaker: runtime.state.breaker.state(),
            legacy: counts(Backend::Legacy),
            new: counts(Backend::New),
        }
    }

    async fn handle(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let method = session.req_header().method.clone();
        let path = session.req_header().uri.path().to_string();
        match (&method, path.as_str()) {
            (&Method::GET, "/health") => {
                return respond(StatusCode::OK, "text/plain", b"ok\n".to_vec());
            }
            (&Method::GET, "/ready") => {
                return if self.state.ready() {
                    respond(StatusCode::OK, "text/plain", b"ready\n".to_vec())
                } else {
                    respond(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "text/plain",
                        b"flags not loaded yet\n".to_vec(),
                    )
                };
            }
            _ => {}
        }
        if let Some(expected) = &self.state.admin_token {
            let given = session
                .req_header()
                .headers
                .get(http::header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .unwrap_or("");
            if !token_matches(given.as_bytes(), expected.expose().as_bytes()) {
                let mut r = error(StatusCode::UNAUTHORIZED, "missing or wrong bearer token");
                r.headers_mut().insert(
                    http::header::WWW_AUTHENTICATE,
                    http::HeaderValue::from_static("Bearer"),
                );
                return r;
            }
        }
        let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
        match (&method, segments.as_slice()) {
            (&Method::GET, ["metrics"]) => {
                let f = self.state.flags.freshness();
                self.state
                    .metrics
                    .set_flag_freshness(f.last_success_age_ms, f.last_error.is_some());
                for route in self.state.snapshot().table.routes() {
                    let open = route.state.breaker.state() != BreakerState::Closed;
                    self.state.metrics.set_breaker_open(route.name(), open);
                }
                respond(
                    StatusCode::OK,
                    "text/plain; version=0.0.4",
                    self.state.metrics.render(),
                )
            }
            (&Method::GET, ["routes"]) => {
                let snapshot = self.state.snapshot();
                let table = &snapshot.table;
                let mut routes: Vec<RouteStatus> =
                    table.routes().iter().map(|r| self.status_of(r)).collect();
                routes.sort_by(|a, b| a.name.cmp(&b.name));
                json_response(
                    StatusCode::OK,
                    &RoutesDocument {
                        routes,
                        flags: self.state.flags.freshness(),
                    },
                )
            }
            (&Method::GET, ["routes", name]) => match self.state.snapshot().table.get(name) {
                Some(r) => json_response(StatusCode::OK, &self.status_of(r)),
                None => error(StatusCode::NOT_FOUND, &format!("no route named {name:?}")),
            },
            (&Method::PUT, ["routes", name, "override"]) => {
                let snapshot = self.state.snapshot();
                let table = &snapshot.table;
                let Some(route) = table.get(name) else {
                    return error(StatusCode::NOT_FOUND, &format!("no route named {name:?}"));
                };
                let body = match read_body(session).await {
                    Ok(b) => b,
                    Err(r) => return r,
                };
                match serde_json::from_slice::<OverrideBody>(&body) {
                    Ok(o) => {
                        self.state.overrides.set(name, Some(o.backend));
                        tracing::info!(
                            route = name,
                            backend = o.backend.as_str(),
                            "override set through the admin API"
                        );
                        json_response(StatusCode::OK, &self.status_of(route))
                    }
                    Err(e) => error(
                        StatusCode::BAD_REQUEST,
                        &format!("body must be {{\"backend\": \"legacy\"|\"new\"}}: {e}"),
                    ),
                }
            }
            (&Method::DELETE, ["routes", name, "override"]) => {
                let snapshot = self.state.snapshot();
                let table = &snapshot.table;
                let Some(route) = table.get(name) else {
                    return error(StatusCode::NOT_FOUND, &format!("no route named {name:?}"));
                };
                // Versions are hex, a dot and digits: nothing to percent-decode.
                let if_version = session.req_header().uri.query().and_then(|q| {
                    q.split('&')
                        .find_map(|kv| kv.strip_prefix("if_version="))
                        .map(str::to_string)
                });
                match if_version {
                    Some(version) => {
                        if let Err(current) = self.state.overrides.clear_if(name, &version) {
                            return error(
                                StatusCode::CONFLICT,
                                &format!(
                                    "the override of {name} changed since version {version} (now {current}): not cleared"
                                ),
                            );
                        }
                    }
                    None => self.state.overrides.set(name, None),
                }
                tracing::info!(route = name, "override cleared through the admin API");
                json_response(StatusCode::OK, &self.status_of(route))
            }
            (&Method::GET, ["routes", name, "shadow"]) => {
                let snapshot = self.state.snapshot();
                let Some(route) = snapshot.table.get(name) else {
                    return error(StatusCode::NOT_FOUND, &format!("no route named {name:?}"));
                };
                let stats = route.state.shadow.stats();
                let mut paths: Vec<(&String, &u64)> = stats.paths.iter().collect();
                paths.sort_by(|a, b| b.1.cmp(a.1).then_with(|| a.0.cmp(b.0)));
                json_response(
                    StatusCode::OK,
                    &serde_json::json!({
                        "route": name,
                        "compared": stats.compared,
                        "matches": stats.matches,
                        "mismatches": stats.mismatches,
                        "shadow_errors": stats.shadow_errors,
                        "skipped": stats.skipped,
                        "paths": paths.iter().map(|(p, n)| serde_json::json!({"path": p, "count": n})).collect::<Vec<_>>(),
                        "samples": stats.samples,
                    }),
                )
            }
            (&Method::POST, ["routes", name, "calibrate"]) => {
                let snapshot = self.state.snapshot();
                let Some(route) = snapshot.table.get(name) else {
                    return error(StatusCode::NOT_FOUND, &format!("no route named {name:?}"));
                };
                let body = match read_body(session).await {
                    Ok(b) => b,
                    Err(r) => return r,
                };
                match serde_json::from_slice::<CalibrateBody>(&body) {
                    Ok(c) if (1..=100_000).contains(&c.requests) => {
                        route.state.shadow.start_calibration(c.requests);
                        tracing::info!(route = name, requests = c.requests, "calibration started");
                        json_response(StatusCode::ACCEPTED, &route.state.shadow.calibration())
                    }
                    Ok(_) => error(StatusCode::BAD_REQUEST, "requests must be 1-100000"),
                    Err(e) => error(
                        StatusCode::BAD_REQUEST,
                        &format!("body must be {{\"requests\": N}}: {e}"),
                    ),
                }
            }
            (&Method::GET, ["routes", name, "calibration"]) => {
                let snapshot = self.state.snapshot();
                let calibration = snapshot
                    .table
                    .get(name)
                    .and_then(|r| r.state.shadow.calibration());
                match calibration {
                    Some(c) => {
                        let suggestions: Vec<serde_json::Value> = c
                        .suggestions()
                        .into_iter()
                        .map(|(path, rate)| serde_json::json!({"path": path, "noise_rate": rate}))
                        .collect();
                        json_response(
                            StatusCode::OK,
                            &serde_json::json!({"target": c.target, "done": c.done, "errors": c.errors, "complete": c.done + c.errors >= c.target, "suggestions": suggestions}),
                        )
                    }
                    None => error(
                        StatusCode::NOT_FOUND,
                        &format!("no calibration started for {name:?}"),
                    ),
                }
            }
            (_, ["routes", ..] | ["metrics"]) => {
                error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed here")
            }
            _ => error(StatusCode::NOT_FOUND, "unknown admin endpoint"),
        }
    }
}

async fn read_body(session: &mut ServerSession) -> Result<Vec<u8>, Response<Vec<u8>>> {
    let mut body = Vec::new();
    loop {
        match session.read_request_body().await {
            Ok(Some(chunk)) => {
                if body.len() + chunk.len() > MAX_BODY {
                    return Err(error(StatusCode::PAYLOAD_TOO_LARGE, "body too large"));
                }
                body.extend_from_slice(&chunk);
            }
            Ok(None) => return Ok(body),
            Err(e) => {
                return Err(error(
                    StatusCode::BAD_REQUEST,
                    &format!("cannot read body: {e}"),
                ));
            }
        }
    }
}

#[async_trait]
impl ServeHttp for AdminApi {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        self.handle(session).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_comparison_needs_an_exact_match() {
        assert!(token_matches(b"secret", b"secret"));
        assert!(!token_matches(b"secret", b"secreT"));
        assert!(!token_matches(b"secre", b"secret"));
        assert!(!token_matches(b"", b"secret"));
    }
}
