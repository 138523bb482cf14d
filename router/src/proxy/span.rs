//! The request span's attributes, in one place: what is known when the request
//! arrives, and what is known when it is done.

use opentelemetry::KeyValue;
use opentelemetry::trace::{Span as _, Status};
use pingora::http::RequestHeader;
use pingora::prelude::*;
use strangler_model::names::{attr, diff};

use super::ctx::{Attempt, RequestCtx};
use crate::routing::Route;

/// The span's name: `METHOD /route/template`, or the method alone off-route.
pub fn name(req: &RequestHeader, route: Option<&Route>) -> String {
    match route {
        Some(r) => format!("{} {}", req.method, r.config.path_text),
        None => req.method.to_string(),
    }
}

/// Attributes known on arrival.
pub fn request_attributes(
    req: &RequestHeader,
    route: Option<&Route>,
    client_ip: Option<&str>,
    scheme: &'static str,
) -> Vec<KeyValue> {
    let mut attributes = vec![
        KeyValue::new(attr::HTTP_METHOD, req.method.to_string()),
        KeyValue::new(attr::URL_PATH, req.uri.path().to_string()),
        KeyValue::new(attr::URL_SCHEME, scheme),
    ];
    if let Some(q) = req.uri.query() {
        attributes.push(KeyValue::new(attr::URL_QUERY, q.to_string()));
    }
    if let Some(host) = req
        .headers
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .or(req.uri.host())
    {
        attributes.push(KeyValue::new(attr::SERVER_ADDRESS, host.to_string()));
    }
    if let Some(ip) = client_ip {
        attributes.push(KeyValue::new(attr::CLIENT_ADDRESS, ip.to_string()));
    }
    if let Some(ua) = req
        .headers
        .get(http::header::USER_AGENT)
        .and_then(|h| h.to_str().ok())
    {
        attributes.push(KeyValue::new(attr::USER_AGENT, ua.to_string()));
    }
    attributes.push(KeyValue::new(
        attr::PROTOCOL_VERSION,
        match req.version {
            http::Version::HTTP_2 => "2",
            http::Version::HTTP_10 => "1.0",
            _ => "1.1",
        },
    ));
    if let Some(r) = route {
        attributes.push(KeyValue::new(attr::HTTP_ROUTE, r.config.path_text.clone()));
        attributes.push(KeyValue::new(attr::ROUTE, r.config.name.to_string()));
        attributes.push(KeyValue::new(attr::FLAG, r.config.flag.clone()));
    }
    attributes
}

/// Marks a span whose shadow pair was not compared.
pub fn skipped(span: &mut opentelemetry_sdk::trace::Span) {
    span.set_attribute(KeyValue::new(attr::DIFF, diff::SKIPPED));
}

/// Attributes (and the status) known when the response is written or the request
/// failed; values, so a span built later gets them too.
pub fn finish_values(
    ctx: &RequestCtx,
    status: u16,
    error: Option<&Error>,
) -> (Vec<KeyValue>, Option<Status>) {
    let mut values = vec![KeyValue::new(attr::BACKEND, ctx.backend().as_str())];
    if ctx.attempt == Attempt::BreakerOpen {
        values.push(KeyValue::new(attr::BREAKER, "open"));
    }
    values.push(KeyValue::new(attr::DECISION, ctx.reason().as_str()));
    if let Some(v) = &ctx.decision.variant {
        values.push(KeyValue::new(attr::FLAG_VARIANT, v.clone()));
    }
    if let Some((u, _)) = ctx.upstream() {
        values.push(KeyValue::new(attr::UPSTREAM, u.authority.clone()));
    }
    if status > 0 {
        values.push(KeyValue::new(attr::HTTP_STATUS, i64::from(status)));
    }
    let mut outcome = None;
    if let Some(e) = error {
        values.push(KeyValue::new(
            attr::ERROR_TYPE,
            e.etype().as_str().to_string(),
        ));
        outcome = Some(Status::error(e.to_string()));
    } else if status >= 500 {
        values.push(KeyValue::new(attr::ERROR_TYPE, status.to_string()));
        outcome = Some(Status::error(format!("HTTP {status}")));
    }
    (values, outcome)
}

/// Sets [`finish_values`] on a span.
pub fn apply(span: &mut opentelemetry_sdk::trace::Span, values: (Vec<KeyValue>, Option<Status>)) {
    let (attributes, status) = values;
    span.set_attributes(attributes);
    if let Some(status) = status {
        span.set_status(status);
    }
}
