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

use crate::config::{RouteConfig, Timeouts, UpstreamAddr};
use crate::decide::{Backend, Decision, Reason, decide};
use crate::state::RouterState;

/// What the router knows about one request between phases.
pub struct RequestCtx {
    started: Instant,
    route: Option<Arc<RouteConfig>>,
    decision: Decision,
    upstream: Option<(UpstreamAddr, Timeouts)>,
    span: Option<opentelemetry_sdk::trace::Span>,
    client_ip: Option<String>,
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
        }
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut Self::CTX) -> Result<bool> {
        ctx.client_ip = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip().to_string());
        let req = session.req_header();
        let config = self.state.config();
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
            KeyValue::new("url.scheme", "http"),
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
        Ok(false)
    }

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        ctx: &mut Self::CTX,
    ) -> Result<Box<HttpPeer>> {
        let Some((upstream, timeouts)) = &ctx.upstream else {
            return Err(Error::explain(
                ErrorType::InternalError,
                "no upstream chosen",
            ));
        };
        let mut peer = HttpPeer::new(upstream.addr, false, upstream.host.clone());
        peer.options.connection_timeout = Some(timeouts.connect);
        peer.options.read_timeout = Some(timeouts.read);
        peer.options.write_timeout = Some(timeouts.write);
        peer.options.idle_timeout = Some(timeouts.idle);
        Ok(Box::new(peer))
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream_request: &mut RequestHeader,
        ctx: &mut Self::CTX,
    ) -> Result<()> {
        if let Some(ip) = &ctx.client_ip {
            let forwarded = match upstream_request
                .headers
                .get("x-forwarded-for")
                .and_then(|v| v.to_str().ok())
            {
                Some(prior) => format!("{prior}, {ip}"),
                None => ip.clone(),
            };
            upstream_request.insert_header("x-forwarded-for", forwarded)?;
        }
        upstream_request.insert_header("x-forwarded-proto", "http")?;
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
        if let Some(mut span) = ctx.span.take() {
            span.set_attribute(KeyValue::new("strangler.backend", backend.as_str()));
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
            span.end();
        }
    }
}
