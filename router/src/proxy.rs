//! The pingora `ProxyHttp` implementation: the request's life as phases.
//!
//! `request_filter` matches the route and decides the side, `upstream_peer` picks
//! the upstream, `upstream_request_filter` adds proxy and trace headers, and
//! `logging` records metrics and ends the span. The decisions themselves live in
//! [`crate::decide`] and [`crate::route`], testable without a socket.

use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use opentelemetry::KeyValue;
use opentelemetry::trace::{Span as _, Status};
use pingora::http::RequestHeader;
use pingora::prelude::*;
use pingora::upstreams::peer::HttpPeer;

use crate::breaker::Admit;
use crate::compare::{Captured, Verdict, compare};
use crate::config::{RouteConfig, Timeouts, UpstreamAddr};
use crate::decide::{Backend, Decision, Reason, decide, sticky_key};
use crate::flags::context_for;
use crate::shadow::{CopyRequest, Sample, copy_headers, now_secs, sample_body, send_copy};
use crate::state::RouterState;

/// A primary request paired with a copy to the other side (or, when calibrating,
/// to legacy again).
pub struct Pair {
    route: Arc<RouteConfig>,
    calibration: bool,
    shadow_backend: Backend,
    /// Waiting for the request body; `None` once the copy is on its way.
    copy: Option<CopyRequest>,
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
    result: Option<tokio::sync::oneshot::Receiver<Result<Captured, String>>>,
    primary: Captured,
    pair_id: String,
    request_line: String,
}

/// What the router knows about one request between phases.
pub struct RequestCtx {
    started: Instant,
    route: Option<Arc<RouteConfig>>,
    decision: Decision,
    upstream: Option<(UpstreamAddr, Timeouts)>,
    span: Option<opentelemetry_sdk::trace::Span>,
    client_ip: Option<String>,
    pair: Option<Pair>,
    fallback: bool,
    /// The request was sent to the new service (its outcome feeds the breaker).
    tried_new: bool,
    /// The breaker kept this request off the new service.
    breaker_open: bool,
    /// The peer is a trusted proxy, so its X-Forwarded-For is kept.
    peer_trusted: bool,
    /// Delays for retrying connect failures, created at the first failure.
    backoff: Option<backon::ExponentialBackoff>,
    /// Wait this long before the next connect attempt.
    retry_delay: Option<std::time::Duration>,
}

/// The router's proxy logic.
pub struct StranglerProxy {
    state: Arc<RouterState>,
}

impl StranglerProxy {
    /// A proxy over shared router state.
    pub fn new(state: Arc<RouterState>) -> Self {
        Self { state }
    }
}

const VIA: &str = "1.1 strangler";

#[async_trait]
impl ProxyHttp for StranglerProxy {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> Self::CTX {
        RequestCtx {
            started: Instant::now(),
            route: None,
            decision: Decision {
                backend: Backend::Legacy,
                reason: Reason::Default,
                variant: None,
            },
            upstream: None,
            span: None,
            client_ip: None,
            pair: None,
            fallback: false,
            tried_new: false,
            breaker_open: false,
            peer_trusted: false,
            backoff: None,
            retry_delay: None,
        }
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut Self::CTX) -> Result<bool> {
        let config = self.state.config();
        if let Some((status, why)) = over_limit(session.req_header(), &config.limits) {
            let _ = session
                .respond_error_with_body(status, bytes::Bytes::from(format!("{why}\n")))
                .await;
            return Ok(true);
        }
        // Slow bodies: each read waits at most this long (headers have their own
        // total deadline in the connection guard).
        session.set_read_timeout(Some(config.limits.body_timeout));
        let peer = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip());
        ctx.peer_trusted =
            peer.is_some_and(|ip| config.trusted_proxies.iter().any(|n| n.contains(&ip)));
        ctx.client_ip = match peer {
            Some(ip) if ctx.peer_trusted => Some(
                client_from_forwarded(
                    session.req_header().headers.get("x-forwarded-for"),
                    &config.trusted_proxies,
                )
                .unwrap_or(ip)
                .to_string(),
            ),
            other => other.map(|ip| ip.to_string()),
        };
        let req = session.req_header();
        let table = self.state.table();
        let route = table
            .find(&req.method, req.uri.path(), &req.headers)
            .cloned();
        if let Some(route) = &route {
            ctx.decision = decide(
                route,
                &self.state.overrides,
                &self.state.flags,
                &req.headers,
                ctx.client_ip.as_deref(),
            );
            // An overridden route goes where the operator said; otherwise an open
            // breaker keeps the new service out of the path.
            if ctx.decision.backend == Backend::New && ctx.decision.reason != Reason::Override {
                match self.state.breaker(route).admit() {
                    Admit::No => {
                        ctx.decision.backend = Backend::Legacy;
                        ctx.decision.reason = Reason::Fallback;
                        ctx.breaker_open = true;
                    }
                    Admit::Yes | Admit::Probe => ctx.tried_new = true,
                }
            } else if ctx.decision.backend == Backend::New {
                ctx.tried_new = true;
            }
        }
        ctx.upstream = Some(match (&route, ctx.decision.backend) {
            (Some(r), Backend::New) => (r.new_upstream.clone(), r.new_timeouts),
            _ => (config.legacy.clone(), config.legacy_timeouts),
        });
        let route_text = route.as_ref().map(|r| r.path_text.as_str());
        let name = match route_text {
            Some(t) => format!("{} {t}", req.method),
            None => req.method.to_string(),
        };
        let mut attributes = vec![
            KeyValue::new("http.request.method", req.method.to_string()),
            KeyValue::new("url.path", req.uri.path().to_string()),
            KeyValue::new("url.scheme", self.scheme()),
        ];
        if let Some(q) = req.uri.query() {
            attributes.push(KeyValue::new("url.query", q.to_string()));
        }
        if let Some(host) = req
            .headers
            .get(http::header::HOST)
            .and_then(|h| h.to_str().ok())
            .or(req.uri.host())
        {
            attributes.push(KeyValue::new("server.address", host.to_string()));
        }
        if let Some(ip) = &ctx.client_ip {
            attributes.push(KeyValue::new("client.address", ip.clone()));
        }
        if let Some(ua) = req
            .headers
            .get(http::header::USER_AGENT)
            .and_then(|h| h.to_str().ok())
        {
            attributes.push(KeyValue::new("user_agent.original", ua.to_string()));
        }
        attributes.push(KeyValue::new(
            "network.protocol.version",
            match req.version {
                http::Version::HTTP_2 => "2",
                http::Version::HTTP_10 => "1.0",
                _ => "1.1",
            },
        ));
        if let Some(r) = &route {
            attributes.push(KeyValue::new("http.route", r.path_text.clone()));
            attributes.push(KeyValue::new("strangler.route", r.name.to_string()));
            attributes.push(KeyValue::new("strangler.flag", r.flag.clone()));
        }
        ctx.span = Some(
            self.state
                .telemetry
                .start_server_span(name, &req.headers, attributes),
        );
        ctx.route = route;
        if let Some(route) = ctx.route.clone() {
            self.plan_pair(session, ctx, route);
        }
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
        if let Some(copy) = pair.copy.as_mut() {
            if let Some(chunk) = body {
                if copy.body.len() + chunk.len() > copy.max_body_bytes {
                    // Too big to buffer: no copy for this request.
                    self.state.shadows.skipped(pair.route.name.as_str());
                    ctx.pair = None;
                    return Ok(());
                }
                copy.body.extend_from_slice(chunk);
            }
            if end_of_stream {
                self.send_pair(ctx);
            }
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
        Ok(())
    }

    fn upstream_response_body_filter(
        &self,
        _session: &mut Session,
        _body: &mut Option<bytes::Bytes>,
        end_of_stream: bool,
        ctx: &mut Self::CTX,
    ) -> Result<Option<std::time::Duration>> {
        if let Some((
            _,
            Timeouts {
                total: Some(total), ..
            },
        )) = &ctx.upstream
            && !end_of_stream
            && ctx.started.elapsed() > *total
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
        if let (Some(pair), Some(chunk)) = (ctx.pair.as_mut(), body.as_ref())
            && !pair.primary.truncated
        {
            if pair.primary.body.len() + chunk.len() > pair.route.shadow.max_body_bytes {
                pair.primary.truncated = true;
                pair.primary.body = Vec::new();
            } else {
                pair.primary.body.extend_from_slice(chunk);
            }
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
        if ctx.fallback {
            // The new service could not be reached: this retry goes to legacy.
            let config = self.state.config();
            ctx.upstream = Some((config.legacy.clone(), config.legacy_timeouts));
            ctx.decision.backend = Backend::Legacy;
            ctx.decision.reason = Reason::Fallback;
        }
        let Some((upstream, timeouts)) = &ctx.upstream else {
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
        let idempotent = is_idempotent(ctx, &session.req_header().method);
        if ctx.decision.backend == Backend::New && !ctx.fallback && idempotent {
            self.begin_fallback(ctx);
            e.set_retry(true);
            return e;
        }
        // Any method may be retried on the same upstream: it never saw the request.
        let retry = self.state.config().retry;
        let backoff = ctx.backoff.get_or_insert_with(|| {
            backon::BackoffBuilder::build(
                backon::ExponentialBuilder::default()
                    .with_min_delay(retry.backoff)
                    .with_max_delay(retry.backoff.saturating_mul(16))
                    .with_max_times(retry.connect_retries as usize)
                    .with_jitter(),
            )
        });
        match backoff.next() {
            Some(delay) => {
                ctx.retry_delay = Some(delay);
                e.set_retry(true);
            }
            None => e.set_retry(false),
        }
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
        let idempotent = is_idempotent(ctx, &session.req_header().method);
        if !idempotent || session.as_ref().retry_buffer_truncated() {
            e.set_retry(false);
        } else if ctx.decision.backend == Backend::New
            && !ctx.fallback
            && session.response_written().is_none()
        {
            // The new service failed (reset, read timeout, or a 5xx turned into an error
            // below) before anything reached the client: serve this read from legacy.
            self.begin_fallback(ctx);
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
        if status >= 500
            && ctx.decision.backend == Backend::New
            && !ctx.fallback
            && is_idempotent(ctx, &session.req_header().method)
        {
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
        let code = error_status(e);
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
        strip_hop_by_hop(upstream_request);
        // X-Forwarded-For is appended to only when it came from a trusted proxy;
        // from anyone else it is replaced, so clients cannot forge their address.
        let peer = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip().to_string());
        if let Some(peer) = peer {
            let prior = upstream_request
                .headers
                .get("x-forwarded-for")
                .and_then(|v| v.to_str().ok())
                .filter(|_| ctx.peer_trusted)
                .map(str::to_string);
            let forwarded = match prior {
                Some(prior) => format!("{prior}, {peer}"),
                None => peer,
            };
            upstream_request.insert_header("x-forwarded-for", forwarded)?;
        }
        upstream_request.insert_header("x-forwarded-proto", self.scheme())?;
        let host = session
            .req_header()
            .headers
            .get(http::header::HOST)
            .and_then(|h| h.to_str().ok())
            .map(str::to_string)
            .or_else(|| session.req_header().uri.authority().map(|a| a.to_string()));
        if let Some(host) = host {
            upstream_request.insert_header("x-forwarded-host", host.as_str())?;
            if upstream_request.headers.get(http::header::HOST).is_none() {
                // HTTP/2 clients send :authority; HTTP/1.1 upstreams need Host.
                upstream_request.insert_header(http::header::HOST, host.as_str())?;
            }
        }
        let via = match upstream_request
            .headers
            .get(http::header::VIA)
            .and_then(|v| v.to_str().ok())
        {
            Some(prior) => format!("{prior}, {VIA}"),
            None => VIA.to_string(),
        };
        upstream_request.insert_header(http::header::VIA, via)?;
        if let Some(span) = &ctx.span {
            for (k, v) in self.state.telemetry.propagation_headers(span) {
                upstream_request.insert_header(k, v)?;
            }
        }
        Ok(())
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut Self::CTX) {
        let status = session.response_written().map_or(0, |r| r.status.as_u16());
        let failed = e.is_some() || status >= 500 || status == 0;
        let route_name = ctx.route.as_ref().map_or("", |r| r.name.as_str());
        let backend = ctx.decision.backend;
        self.state.metrics.observe(
            if route_name.is_empty() {
                "(legacy)"
            } else {
                route_name
            },
            backend,
            ctx.decision.reason,
            status,
            failed,
            ctx.started.elapsed().as_secs_f64(),
        );
        if !route_name.is_empty() {
            self.state.windows.get(route_name, backend).record(failed);
        }
        if ctx.tried_new
            && let Some(route) = &ctx.route
        {
            // A fallback means the new service failed this request.
            let new_failed = ctx.fallback || (backend == Backend::New && failed);
            if let Some(state) = self.state.breaker(route).record(!new_failed) {
                tracing::warn!(
                    route = route_name,
                    ?state,
                    "circuit breaker for the new service changed"
                );
            }
        }
        if let Some(mut span) = ctx.span.take() {
            span.set_attribute(KeyValue::new("strangler.backend", backend.as_str()));
            if ctx.breaker_open {
                span.set_attribute(KeyValue::new("strangler.breaker", "open"));
            }
            span.set_attribute(KeyValue::new(
                "strangler.decision",
                ctx.decision.reason.as_str(),
            ));
            if let Some(v) = &ctx.decision.variant {
                span.set_attribute(KeyValue::new("strangler.flag.variant", v.clone()));
            }
            if let Some((u, _)) = &ctx.upstream {
                span.set_attribute(KeyValue::new("strangler.upstream", u.authority.clone()));
            }
            if status > 0 {
                span.set_attribute(KeyValue::new(
                    "http.response.status_code",
                    i64::from(status),
                ));
            }
            if let Some(e) = e {
                span.set_attribute(KeyValue::new("error.type", e.etype().as_str().to_string()));
                span.set_status(Status::error(e.to_string()));
            } else if status >= 500 {
                span.set_attribute(KeyValue::new("error.type", status.to_string()));
                span.set_status(Status::error(format!("HTTP {status}")));
            }
            match ctx.pair.take() {
                Some(pair) if status > 0 && pair.result.is_some() => {
                    // The client has its response; the comparison finishes the span later.
                    let trace_id = span.span_context().trace_id().to_string();
                    self.state.shadows.spawn(finish_pair(
                        Arc::clone(&self.state),
                        pair,
                        span,
                        backend,
                        trace_id,
                    ));
                }
                Some(pair) => {
                    if !pair.calibration {
                        self.state.shadows.skipped(pair.route.name.as_str());
                        span.set_attribute(KeyValue::new("strangler.diff", "skipped"));
                    }
                    span.end();
                }
                None => span.end(),
            }
        }
    }
}

/// The client's address behind trusted proxies: the rightmost X-Forwarded-For entry
/// that is not itself a trusted proxy.
fn client_from_forwarded(
    header: Option<&http::HeaderValue>,
    trusted: &[ipnet::IpNet],
) -> Option<std::net::IpAddr> {
    let list = header?.to_str().ok()?;
    let addrs: Vec<std::net::IpAddr> = list
        .split(',')
        .filter_map(|a| a.trim().parse().ok())
        .collect();
    addrs
        .iter()
        .rev()
        .find(|ip| !trusted.iter().any(|n| n.contains(*ip)))
        .or_else(|| addrs.first())
        .copied()
}

/// The first limit a request breaks, as the status to answer and why.
fn over_limit(req: &RequestHeader, limits: &crate::config::Limits) -> Option<(u16, String)> {
    let target = req.uri.path_and_query().map_or(0, |p| p.as_str().len());
    if target > limits.max_uri_bytes {
        return Some((
            414,
            format!(
                "request target of {target} bytes exceeds {}",
                limits.max_uri_bytes
            ),
        ));
    }
    if req.headers.len() > limits.max_headers {
        return Some((
            431,
            format!(
                "{} header fields exceed {}",
                req.headers.len(),
                limits.max_headers
            ),
        ));
    }
    let bytes: usize = req
        .headers
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len())
        .sum();
    if bytes > limits.max_header_bytes {
        return Some((
            431,
            format!(
                "{bytes} bytes of headers exceed {}",
                limits.max_header_bytes
            ),
        ));
    }
    let declared = req
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if let Some(n) = declared
        && n > limits.max_body_bytes
    {
        return Some((
            413,
            format!("a body of {n} bytes exceeds {}", limits.max_body_bytes),
        ));
    }
    None
}

/// Hop-by-hop headers (RFC 9110 §7.6.1) that must not be forwarded, plus any the
/// client names in `Connection`. `Upgrade`/`Connection: upgrade` stay for WebSockets.
fn strip_hop_by_hop(request: &mut RequestHeader) {
    let named: Vec<String> = request
        .headers
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .filter(|t| !t.is_empty() && t != "upgrade" && t != "keep-alive" && t != "close")
        .collect();
    for name in named {
        request.remove_header(name.as_str());
    }
    for name in [
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "proxy-authorization",
    ] {
        request.remove_header(name);
    }
}

/// The status a client gets for a request the router could not complete: 504 when
/// an upstream timed out, 408 when the client was too slow, 502 for other upstream
/// failures, 400 for other client errors, 0 when the client is gone.
fn error_status(e: &Error) -> u16 {
    use pingora::{ErrorSource, ErrorType as T};
    match (e.esource(), e.etype()) {
        (_, T::HTTPStatus(code)) => *code,
        (ErrorSource::Upstream, T::ConnectTimedout | T::ReadTimedout | T::WriteTimedout) => 504,
        (ErrorSource::Upstream, _) => 502,
        (ErrorSource::Downstream, T::ReadTimedout) => 408,
        (ErrorSource::Downstream, T::WriteError | T::ReadError | T::ConnectionClosed) => 0,
        (ErrorSource::Downstream, _) => 400,
        (ErrorSource::Internal | ErrorSource::Unset, _) => 500,
    }
}

/// Requests safe to send twice: only these are retried on legacy. GET, HEAD and
/// OPTIONS, plus the methods the route declares.
fn is_idempotent(ctx: &RequestCtx, method: &http::Method) -> bool {
    match &ctx.route {
        Some(route) => route.idempotent_methods.contains(method),
        None => matches!(
            *method,
            http::Method::GET | http::Method::HEAD | http::Method::OPTIONS
        ),
    }
}

impl StranglerProxy {
    /// The client-facing scheme: the listener terminates TLS or it does not.
    fn scheme(&self) -> &'static str {
        if self.state.tls.is_some() {
            "https"
        } else {
            "http"
        }
    }

    /// Marks the request for one retry on legacy.
    fn begin_fallback(&self, ctx: &mut RequestCtx) {
        ctx.fallback = true;
        if let Some(pair) = ctx.pair.take() {
            // Its copy went to legacy too; comparing legacy with legacy says nothing.
            self.state.shadows.skipped(pair.route.name.as_str());
        }
    }

    /// Decides whether this request gets a copy, and prepares it.
    fn plan_pair(&self, session: &Session, ctx: &mut RequestCtx, route: Arc<RouteConfig>) {
        let req = session.req_header();
        let shadow = &route.shadow;
        if !shadow.methods.contains(&req.method)
            || req.headers.contains_key(crate::shadow::SHADOW_HEADER)
        {
            return;
        }
        let config = self.state.config();
        let primary = ctx.decision.backend;
        let calibration = primary == Backend::Legacy
            && self
                .state
                .shadows
                .take_calibration_slot(route.name.as_str());
        let shadow_backend = if calibration {
            Backend::Legacy
        } else {
            let sampled = shadow
                .percent
                .is_some_and(|p| rand::random_range(0..100u8) < p);
            let toggled = sampled || {
                let key = sticky_key(&route.sticky, &req.headers, ctx.client_ip.as_deref());
                let context = context_for(&route.sticky, key.as_deref());
                self.state.flags.evaluate(&shadow.flag, &context).enabled
            };
            if !toggled {
                return;
            }
            match primary {
                Backend::Legacy => Backend::New,
                Backend::New => Backend::Legacy,
            }
        };
        let declared = req
            .headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok());
        let chunked = req.headers.contains_key(http::header::TRANSFER_ENCODING);
        if declared.is_some_and(|n| n > shadow.max_body_bytes) {
            self.state.shadows.skipped(route.name.as_str());
            if let Some(span) = ctx.span.as_mut() {
                span.set_attribute(KeyValue::new("strangler.diff", "skipped"));
            }
            return;
        }
        let permit = match self
            .state
            .shadows
            .acquire(route.name.as_str(), shadow.max_concurrent)
        {
            Ok(p) => p,
            Err(_) => {
                if let Some(span) = ctx.span.as_mut() {
                    span.set_attribute(KeyValue::new("strangler.diff", "skipped"));
                }
                return;
            }
        };
        let target = match shadow_backend {
            Backend::Legacy => config.legacy.addr,
            Backend::New => route.new_upstream.addr,
        };
        let path_and_query = req
            .uri
            .path_and_query()
            .map_or_else(|| req.uri.path().to_string(), |p| p.as_str().to_string());
        let mut headers = copy_headers(&req.headers);
        if !headers.iter().any(|(k, _)| k == "host")
            && let Some(authority) = req.uri.authority()
        {
            headers.push(("host".into(), authority.to_string()));
        }
        ctx.pair = Some(Pair {
            route: Arc::clone(&route),
            calibration,
            shadow_backend,
            copy: Some(CopyRequest {
                method: req.method.clone(),
                path_and_query: path_and_query.clone(),
                headers,
                body: Vec::new(),
                upstream: target,
                timeout: shadow.timeout,
                max_body_bytes: shadow.max_body_bytes,
            }),
            permit: Some(permit),
            result: None,
            primary: Captured::default(),
            pair_id: format!("{:016x}", rand::random::<u64>()),
            request_line: format!("{} {path_and_query}", req.method),
        });
        if declared.unwrap_or(0) == 0 && !chunked {
            self.send_pair(ctx);
        }
    }

    /// Sends the prepared copy in its own task.
    fn send_pair(&self, ctx: &mut RequestCtx) {
        let Some(pair) = ctx.pair.as_mut() else {
            return;
        };
        let Some(copy) = pair.copy.take() else {
            return;
        };
        let (tx, rx) = tokio::sync::oneshot::channel();
        pair.result = Some(rx);
        let permit = pair.permit.take();
        let mut attributes = vec![
            KeyValue::new("strangler.route", pair.route.name.to_string()),
            KeyValue::new("strangler.backend", pair.shadow_backend.as_str()),
            KeyValue::new("strangler.shadow", true),
            KeyValue::new("strangler.pair_id", pair.pair_id.clone()),
            KeyValue::new("http.request.method", copy.method.to_string()),
        ];
        if pair.calibration {
            attributes.push(KeyValue::new("strangler.calibration", true));
        }
        let span = ctx.span.as_ref().map(|parent| {
            self.state.telemetry.start_child_span(
                format!(
                    "shadow {}",
                    pair.request_line.split('?').next().unwrap_or("")
                ),
                parent,
                opentelemetry::trace::SpanKind::Client,
                attributes,
            )
        });
        let trace_headers = span
            .as_ref()
            .map(|s| {
                self.state
                    .telemetry
                    .propagation_headers(s)
                    .into_iter()
                    .collect()
            })
            .unwrap_or_default();
        let client = self.state.shadows.client.clone();
        self.state.shadows.spawn(async move {
            let _permit = permit;
            let result = send_copy(&client, copy, trace_headers).await;
            if let Some(mut span) = span {
                match &result {
                    Ok(r) => span.set_attribute(KeyValue::new(
                        "http.response.status_code",
                        i64::from(r.status),
                    )),
                    Err(e) => span.set_status(Status::error(e.clone())),
                }
                span.end();
            }
            let _ = tx.send(result);
        });
    }
}

/// Waits for the copy, compares, records, and ends the primary span.
async fn finish_pair(
    state: Arc<RouterState>,
    pair: Pair,
    mut span: opentelemetry_sdk::trace::Span,
    primary_backend: Backend,
    trace_id: String,
) {
    let route = pair.route.name.to_string();
    let wait = pair.route.shadow.timeout + std::time::Duration::from_secs(1);
    let shadow = match pair.result {
        Some(rx) => match tokio::time::timeout(wait, rx).await {
            Ok(Ok(result)) => result,
            _ => Err("no answer".to_string()),
        },
        None => Err("not sent".to_string()),
    };
    let verdict = shadow
        .as_ref()
        .ok()
        .map(|s| compare(&pair.primary, s, &pair.route.shadow.rules));
    span.set_attribute(KeyValue::new("strangler.pair_id", pair.pair_id.clone()));
    if pair.calibration {
        state.shadows.record_calibration(&route, verdict.as_ref());
        span.end();
        return;
    }
    let (label, paths) = match &verdict {
        None => ("error", Vec::new()),
        Some(Verdict::Match) => ("match", Vec::new()),
        Some(Verdict::Mismatch(p)) => ("mismatch", p.clone()),
        Some(Verdict::Skipped(_)) => ("skipped", Vec::new()),
    };
    span.set_attribute(KeyValue::new("strangler.diff", label));
    if !paths.is_empty() {
        span.set_attribute(KeyValue::new("strangler.diff.paths", paths.join(",")));
    }
    let sample = || Sample {
        at: now_secs(),
        request: pair.request_line.clone(),
        pair_id: pair.pair_id.clone(),
        trace_id: trace_id.clone(),
        primary_backend: primary_backend.as_str().to_string(),
        paths: paths.clone(),
        primary_status: pair.primary.status,
        primary_body: sample_body(&pair.primary.body),
        shadow_status: shadow.as_ref().map_or(0, |s| s.status),
        shadow_body: match &shadow {
            Ok(s) => sample_body(&s.body),
            Err(e) => e.clone(),
        },
    };
    if label == "mismatch" {
        let s = sample();
        span.add_event(
            "strangler.mismatch",
            vec![
                KeyValue::new("request", s.request.clone()),
                KeyValue::new("primary.status", i64::from(s.primary_status)),
                KeyValue::new("primary.body", s.primary_body.clone()),
                KeyValue::new("shadow.status", i64::from(s.shadow_status)),
                KeyValue::new("shadow.body", s.shadow_body.clone()),
            ],
        );
    }
    state.shadows.record(&route, verdict.as_ref(), sample);
    span.end();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeouts_map_to_504_or_408_by_who_was_slow() {
        let err = |t: ErrorType, s: pingora::ErrorSource| {
            let mut e = Error::new(t);
            e.esource = s;
            error_status(&e)
        };
        use pingora::ErrorSource::{Downstream, Upstream};
        assert_eq!(err(ErrorType::ReadTimedout, Upstream), 504);
        assert_eq!(err(ErrorType::ConnectTimedout, Upstream), 504);
        assert_eq!(err(ErrorType::ConnectRefused, Upstream), 502);
        assert_eq!(err(ErrorType::ReadTimedout, Downstream), 408);
        assert_eq!(err(ErrorType::ConnectionClosed, Downstream), 0);
        assert_eq!(err(ErrorType::InvalidHTTPHeader, Downstream), 400);
        assert_eq!(err(ErrorType::HTTPStatus(503), Upstream), 503);
    }

    #[test]
    fn limits_answer_414_431_and_413() {
        let limits = crate::config::Limits {
            max_uri_bytes: 10,
            max_headers: 2,
            max_header_bytes: 40,
            max_body_bytes: 5,
            header_timeout: std::time::Duration::from_secs(1),
            body_timeout: std::time::Duration::from_secs(1),
            drain: std::time::Duration::from_secs(1),
        };
        let req = |uri: &str, headers: &[(&str, &str)]| {
            let mut r = RequestHeader::build("GET", uri.as_bytes(), None).expect("request");
            for (k, v) in headers {
                r.append_header(k.to_string(), *v).expect("header");
            }
            r
        };
        assert_eq!(over_limit(&req("/ok", &[]), &limits), None);
        assert_eq!(
            over_limit(&req("/0123456789", &[]), &limits).map(|x| x.0),
            Some(414)
        );
        assert_eq!(
            over_limit(&req("/", &[("a", "1"), ("b", "2"), ("c", "3")]), &limits).map(|x| x.0),
            Some(431)
        );
        let long = "x".repeat(50);
        assert_eq!(
            over_limit(&req("/", &[("a", long.as_str())]), &limits).map(|x| x.0),
            Some(431)
        );
        assert_eq!(
            over_limit(&req("/", &[("content-length", "6")]), &limits).map(|x| x.0),
            Some(413)
        );
    }

    #[test]
    fn hop_by_hop_headers_and_those_named_in_connection_are_dropped() {
        let mut r = RequestHeader::build("GET", b"/", None).expect("request");
        for (k, v) in [
            ("connection", "keep-alive, X-Secret"),
            ("x-secret", "1"),
            ("te", "trailers"),
            ("upgrade", "websocket"),
            ("x-kept", "1"),
        ] {
            r.append_header(k, v).expect("header");
        }
        strip_hop_by_hop(&mut r);
        assert!(r.headers.get("x-secret").is_none());
        assert!(r.headers.get("te").is_none());
        assert!(
            r.headers.get("upgrade").is_some(),
            "WebSocket upgrades pass"
        );
        assert!(r.headers.get("x-kept").is_some());
    }

    #[test]
    fn the_client_is_the_rightmost_untrusted_forwarded_address() {
        let trusted: Vec<ipnet::IpNet> = vec!["10.0.0.0/8".parse().expect("net")];
        let header = |v: &str| http::HeaderValue::from_str(v).expect("header");
        let ip = |s: &str| Some(s.parse::<std::net::IpAddr>().expect("ip"));
        assert_eq!(
            client_from_forwarded(
                Some(&header("198.51.100.1, 203.0.113.9, 10.0.0.2")),
                &trusted
            ),
            ip("203.0.113.9")
        );
        assert_eq!(
            client_from_forwarded(Some(&header("10.0.0.5, 10.0.0.2")), &trusted),
            ip("10.0.0.5")
        );
        assert_eq!(
            client_from_forwarded(Some(&header("garbage, 203.0.113.9")), &trusted),
            ip("203.0.113.9")
        );
        assert_eq!(client_from_forwarded(None, &trusted), None);
    }
}
