//! The pingora `ProxyHttp` implementation: a request's life as phases, each short
//! and delegating.
//!
//! | phase | what | where |
//! |---|---|---|
//! | `request_filter` | limits, client, route, decision, span, shadow plan | [`headers`], [`crate::routing`], [`span`], [`crate::shadow::pair`] |
//! | `request_body_filter` | body into the shadow copy | [`crate::shadow::pair`] |
//! | `upstream_peer` | the upstream of the current [`Attempt`] | [`ctx`] |
//! | `upstream_request_filter` | hop-by-hop out, forwarding and trace headers in | [`headers`] |
//! | `fail_to_connect`, `error_while_proxy`, `upstream_response_filter` | retry, fallback | [`retry`] |
//! | `response_filter`, `response_body_filter` | primary answer for the comparison | [`crate::shadow::pair`] |
//! | `logging` | metrics, windows, breaker, span end, comparison | here, [`span`] |

pub mod ctx;
pub mod headers;
pub mod retry;
pub mod span;

use std::sync::Arc;

use async_trait::async_trait;
use pingora::http::RequestHeader;
use pingora::prelude::*;
use pingora::upstreams::peer::HttpPeer;
use strangler_model::Backend;

pub use ctx::{Attempt, RequestCtx, Trace};

use crate::routing::Route;
use crate::routing::breaker::Admit;
use crate::routing::decide::{decide_forced, forced_side};
use crate::shadow::pair::{self, Plan, PrimarySpan};
use crate::state::RouterState;
use crate::stats::{Key, Role};
use crate::telemetry::{Head, Telemetry};

/// The router's proxy logic.
pub struct StranglerProxy {
    state: Arc<RouterState>,
}

impl StranglerProxy {
    /// A proxy over shared router state.
    pub fn new(state: Arc<RouterState>) -> Self {
        Self { state }
    }

    /// The client-facing scheme: the listener terminates TLS or it does not.
    fn scheme(&self) -> &'static str {
        if self.state.tls.is_some() {
            "https"
        } else {
            "http"
        }
    }

    /// Who the client is: the peer, or behind trusted proxies the rightmost
    /// untrusted `X-Forwarded-For` entry.
    fn identify_client(&self, session: &Session, ctx: &mut RequestCtx) {
        let Some(snapshot) = &ctx.snapshot else {
            return;
        };
        let trusted = &snapshot.config.trusted_proxies;
        let peer = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip());
        ctx.client.peer_trusted = peer.is_some_and(|ip| trusted.iter().any(|n| n.contains(&ip)));
        ctx.client.ip = match peer {
            Some(ip) if ctx.client.peer_trusted => Some(
                headers::client_from_forwarded(
                    session.req_header().headers.get("x-forwarded-for"),
                    trusted,
                )
                .unwrap_or(ip)
                .to_string(),
            ),
            other => other.map(|ip| ip.to_string()),
        };
    }

    /// Override > flag > default, then the breaker: an open breaker keeps the new
    /// service out of the path unless an operator forced it.
    fn route_and_decide(&self, req: &RequestHeader, ctx: &mut RequestCtx) {
        let Some(snapshot) = &ctx.snapshot else {
            return;
        };
        let Some(route) = snapshot
            .table
            .find(&req.method, req.uri.path(), &req.headers)
            .cloned()
        else {
            return;
        };
        let forced = forced_side(
            &snapshot.config.trusted_testers,
            &req.headers,
            ctx.client.ip.as_deref(),
        );
        ctx.decision = decide_forced(
            &route.config,
            &self.state.overrides,
            &self.state.flags,
            &req.headers,
            ctx.client.ip.as_deref(),
            forced,
        );
        ctx.attempt = match ctx.decision.backend {
            Backend::Legacy => Attempt::Legacy,
            Backend::New if ctx.decision.reason == strangler_model::Reason::Override => {
                Attempt::New
            }
            Backend::New => match route.state.breaker.admit() {
                Admit::No => Attempt::BreakerOpen,
                Admit::Yes | Admit::Probe => Attempt::New,
            },
        };
        ctx.route = Some(route);
    }

    /// A request span's name and its attributes known on arrival (built only for a
    /// request that gets a span, now or at its end).
    fn span_start(
        &self,
        req: &RequestHeader,
        route: Option<&Route>,
        ctx: &RequestCtx,
    ) -> (String, Vec<opentelemetry::KeyValue>) {
        (
            span::name(req, route),
            span::request_attributes(req, route, ctx.client.ip.as_deref(), self.scheme()),
        )
    }

    /// Records the request's outcome on the route: last-minute window and breaker.
    fn record_outcome(&self, ctx: &RequestCtx, failed: bool) {
        let Some(route) = &ctx.route else {
            return;
        };
        route.state.window(ctx.backend()).record(failed);
        if ctx.attempt.tried_new() {
            // A fallback means the new service failed this request.
            let new_failed = ctx.attempt == Attempt::Fallback || failed;
            if let Some(state) = route.state.breaker.record(!new_failed) {
                tracing::warn!(
                    route = route.name(),
                    ?state,
                    "circuit breaker for the new service changed"
                );
            }
        }
    }
}

#[async_trait]
impl ProxyHttp for StranglerProxy {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> Self::CTX {
        RequestCtx::new()
    }

    async fn early_request_filter(
        &self,
        session: &mut Session,
        _ctx: &mut Self::CTX,
    ) -> Result<()> {
        // HTTP/1.1 pipelining (RFC 9112 §9.3.2): answer every request of a pipelined
        // burst, in order, one after the other. Without this pingora answers the
        // first and drops the rest when the connection closes. pingora carries the
        // setting over to the next request on a reused connection.
        session.as_downstream_mut().set_pipelining_enabled(true);
        Ok(())
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut Self::CTX) -> Result<bool> {
        let snapshot = self.state.snapshot();
        if let Some((status, why)) =
            headers::over_limit(session.req_header(), &snapshot.config.limits)
        {
            let _ = session
                .respond_error_with_body(status, bytes::Bytes::from(format!("{why}\n")))
                .await;
            return Ok(true);
        }
        // Slow bodies: each read waits at most this long (headers have their own
        // total deadline in the connection guard).
        session.set_read_timeout(Some(snapshot.config.limits.body_timeout));
        ctx.snapshot = Some(Arc::clone(&snapshot));
        self.identify_client(session, ctx);
        let req = session.req_header();
        self.route_and_decide(req, ctx);
        let route = ctx.route.as_deref();
        // Sampled or not is decided now, before any span, attribute or id string exists.
        let mut trace = match self
            .state
            .telemetry
            .head(&req.headers, snapshot.config.telemetry.sample_ratio)
        {
            Head::Sample(parent) => {
                let (name, attributes) = self.span_start(req, route, ctx);
                Trace::Live(
                    self.state
                        .telemetry
                        .start_server_span(name, &parent, attributes),
                )
            }
            Head::Defer(deferred) => Trace::Deferred(deferred),
        };
        if let Some(route) = &ctx.route {
            match pair::plan(&self.state, &snapshot, route, req, ctx, trace.live_mut()) {
                Plan::None => {}
                Plan::AwaitBody(p) => ctx.pair = Some(p),
                Plan::SendNow(mut p) => {
                    p.send(&self.state, trace.live());
                    ctx.pair = Some(p);
                }
            }
        }
        ctx.trace = Some(trace);
        Ok(false)
    }

    async fn request_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<bytes::Bytes>,
        end_of_stream: bool,
        ctx: &mut Self::CTX,
    ) -> Result<()> {
        let Some(pair) = ctx.pair.as_mut() else {
            return Ok(());
        };
        if !pair.awaiting_body() {
            return Ok(());
        }
        if let Some(chunk) = body
            && !pair.push_request_body(chunk)
        {
            // Too big to buffer: no copy for this request.
            ctx.pair = None;
            return Ok(());
        }
        if end_of_stream {
            pair.send(&self.state, ctx.trace.as_ref().and_then(Trace::live));
        }
        Ok(())
    }

    async fn response_filter(
        &self,
        _session: &mut Session,
        upstream_response: &mut pingora::http::ResponseHeader,
        ctx: &mut Self::CTX,
    ) -> Result<()> {
        if let Some(pair) = ctx.pair.as_mut() {
            pair.primary.status = upstream_response.status.as_u16();
            pair.primary.headers = upstream_response
                .headers
                .iter()
                .filter_map(|(k, v)| Some((k.as_str().to_string(), v.to_str().ok()?.to_string())))
                .collect();
        }
        // After the pair took the primary's headers: the pin is the router's, not
        // the upstream's, and must not count as a difference.
        // The session's pin: the side the decision chose (a fallback or an open
        // breaker is momentary and does not move the pin).
        if let Some(side) = ctx.decision.set_pin
            && let Some(pin) = ctx.route.as_ref().and_then(|r| r.config.pin.as_ref())
        {
            upstream_response.append_header(
                http::header::SET_COOKIE,
                format!(
                    "{}={}; Path=/; Max-Age={}; HttpOnly; SameSite=Lax",
                    pin.cookie,
                    side.as_str(),
                    pin.ttl.as_secs()
                ),
            )?;
        }
        Ok(())
    }

    fn upstream_response_body_filter(
        &self,
        _session: &mut Session,
        _body: &mut Option<bytes::Bytes>,
        end_of_stream: bool,
        ctx: &mut Self::CTX,
    ) -> Result<Option<std::time::Duration>> {
        if let Some((_, timeouts)) = ctx.upstream()
            && let Some(total) = timeouts.total
            && !end_of_stream
            && ctx.started.elapsed() > total
        {
            return Err(Error::explain(
                ErrorType::ReadTimedout,
                format!("the upstream's answer took longer than the total timeout of {total:?}"),
            ));
        }
        Ok(None)
    }

    fn response_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<bytes::Bytes>,
        _end_of_stream: bool,
        ctx: &mut Self::CTX,
    ) -> Result<Option<std::time::Duration>> {
        if let (Some(pair), Some(chunk)) = (ctx.pair.as_mut(), body.as_ref()) {
            pair.push_response_body(chunk);
        }
        Ok(None)
    }

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        ctx: &mut Self::CTX,
    ) -> Result<Box<HttpPeer>> {
        if let Some(delay) = ctx.retry_delay.take() {
            tokio::time::sleep(delay).await;
        }
        let Some((upstream, timeouts)) = ctx.upstream() else {
            return Err(Error::explain(
                ErrorType::InternalError,
                "no upstream chosen",
            ));
        };
        let mut peer = HttpPeer::new(upstream.addr, false, upstream.host.clone());
        peer.options.connection_timeout = Some(timeouts.connect);
        peer.options.read_timeout = Some(match timeouts.total {
            // No single read may outlast what is left of the total.
            Some(total) => {
                let left = total.saturating_sub(ctx.started.elapsed());
                if left.is_zero() {
                    return Err(Error::explain(
                        ErrorType::ConnectTimedout,
                        format!("total timeout of {total:?} spent before connecting"),
                    ));
                }
                timeouts.read.min(left)
            }
            None => timeouts.read,
        });
        peer.options.write_timeout = Some(timeouts.write);
        peer.options.idle_timeout = Some(timeouts.idle);
        Ok(Box::new(peer))
    }

    fn fail_to_connect(
        &self,
        session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut Self::CTX,
        mut e: Box<Error>,
    ) -> Box<Error> {
        // Nothing was sent yet, so an idempotent request can safely go to legacy instead.
        if retry::may_fall_back(ctx, &session.req_header().method) {
            retry::begin_fallback(ctx);
            e.set_retry(true);
            return e;
        }
        // Any method may be retried on the same upstream: it never saw the request.
        let policy = ctx
            .snapshot
            .as_ref()
            .map_or_else(|| self.state.config().retry, |s| s.config.retry);
        e.set_retry(retry::retry_connect(ctx, policy));
        e
    }

    fn error_while_proxy(
        &self,
        peer: &HttpPeer,
        session: &mut Session,
        e: Box<Error>,
        ctx: &mut Self::CTX,
        client_reused: bool,
    ) -> Box<Error> {
        let mut e = e.more_context(format!("Peer: {peer}"));
        let method = &session.req_header().method;
        if !retry::is_idempotent(ctx.route.as_deref(), method)
            || session.as_ref().retry_buffer_truncated()
        {
            e.set_retry(false);
        } else if retry::may_fall_back(ctx, method) && session.response_written().is_none() {
            // The new service failed (reset, read timeout, or a 5xx turned into an error
            // below) before anything reached the client: serve this read from legacy.
            retry::begin_fallback(ctx);
            e.set_retry(true);
        } else {
            e.retry.decide_reuse(client_reused);
        }
        e
    }

    async fn upstream_response_filter(
        &self,
        session: &mut Session,
        upstream_response: &mut pingora::http::ResponseHeader,
        ctx: &mut Self::CTX,
    ) -> Result<()> {
        let status = upstream_response.status.as_u16();
        if status >= 500 && retry::may_fall_back(ctx, &session.req_header().method) {
            // Turned into a retryable error; error_while_proxy sends the retry to legacy.
            return Err(Error::explain(
                ErrorType::HTTPStatus(status),
                format!("the new service answered {status}"),
            ));
        }
        Ok(())
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        _ctx: &mut Self::CTX,
    ) -> pingora::proxy::FailToProxy {
        let code = retry::error_status(e);
        if code > 0 {
            let _ = session.respond_error(code).await;
        }
        pingora::proxy::FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream_request: &mut RequestHeader,
        ctx: &mut Self::CTX,
    ) -> Result<()> {
        headers::strip_hop_by_hop(upstream_request);
        let peer = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip());
        headers::add_forwarding(
            upstream_request,
            session.req_header(),
            peer,
            ctx.client.peer_trusted,
            self.scheme(),
        )?;
        match &ctx.trace {
            Some(Trace::Live(span)) => {
                for (k, v) in self.state.telemetry.propagation_headers(span) {
                    // W3C: an empty `tracestate` is left out, not sent blank.
                    if !v.is_empty() {
                        upstream_request.insert_header(k, v)?;
                    }
                }
            }
            Some(Trace::Deferred(deferred)) => {
                upstream_request
                    .insert_header("traceparent", Telemetry::deferred_traceparent(deferred))?;
            }
            None => {}
        }
        Ok(())
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut Self::CTX) {
        let status = session.response_written().map_or(0, |r| r.status.as_u16());
        let failed = e.is_some() || status >= 500 || status == 0;
        let key = Key {
            backend: ctx.backend(),
            reason: ctx.reason(),
            role: Role::Primary,
            status,
        };
        let latency = ctx.started.elapsed();
        match (&ctx.route, &ctx.snapshot) {
            (Some(route), _) => route.stats.record(key, failed, latency),
            (None, Some(snapshot)) => snapshot.unrouted.record(key, failed, latency),
            // Refused before routing (over a limit).
            (None, None) => self.state.snapshot().unrouted.record(key, failed, latency),
        }
        self.record_outcome(ctx, failed);
        let Some(trace) = ctx.trace.take() else {
            return;
        };
        let telemetry = &self.state.telemetry;
        let span = match trace {
            Trace::Live(span) => Some(span),
            Trace::Deferred(deferred) => {
                let config = ctx
                    .snapshot
                    .as_ref()
                    .map_or_else(|| self.state.config(), |s| Arc::clone(&s.config));
                // Not sampled on arrival; these outcomes get a span regardless.
                let keep = failed
                    || matches!(ctx.attempt, Attempt::Fallback | Attempt::BreakerOpen)
                    || latency >= config.telemetry.slow;
                let req = session.req_header();
                let route = ctx.route.as_deref();
                if keep {
                    let (name, attributes) = self.span_start(req, route, ctx);
                    Some(telemetry.start_deferred(&deferred, name, attributes))
                } else if let Some(pair) = ctx.pair.take() {
                    // Only a differing pair makes this request worth a span now.
                    let (name, attributes) = self.span_start(req, route, ctx);
                    let finish = span::finish_values(ctx, status, e);
                    let state = Arc::clone(&self.state);
                    let trace_id = deferred.trace_id;
                    let build = Box::new(move || {
                        let mut span = state.telemetry.start_deferred(&deferred, name, attributes);
                        span::apply(&mut span, finish);
                        span
                    });
                    pair.finish(
                        &self.state,
                        status,
                        ctx.backend(),
                        PrimarySpan::Deferred {
                            trace_id,
                            build,
                            per_minute: config.telemetry.mismatch_spans_per_minute,
                        },
                    );
                    None
                } else {
                    None
                }
            }
        };
        if let Some(mut span) = span {
            span::apply(&mut span, span::finish_values(ctx, status, e));
            match ctx.pair.take() {
                // The client has its answer; the comparison finishes the span later.
                Some(pair) => {
                    pair.finish(&self.state, status, ctx.backend(), PrimarySpan::Live(span))
                }
                None => {
                    use opentelemetry::trace::Span as _;
                    span.end();
                }
            }
        }
    }
}
