//! What the router knows about one request between phases.

use std::sync::Arc;
use std::time::{Duration, Instant};

use strangler_model::{Backend, Reason};

use crate::config::{Timeouts, UpstreamAddr};
use crate::routing::decide::Decision;
use crate::routing::{Route, Snapshot};
use crate::shadow::pair::Pair;

/// Where this request is being sent, and why it is not where the decision said.
/// One value instead of a flag per case: each phase moves it forward, never back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attempt {
    /// Legacy serves, as decided.
    Legacy,
    /// The new service serves; its outcome feeds the breaker.
    New,
    /// The decision said new, but the route's breaker is open: legacy serves.
    BreakerOpen,
    /// The new service failed before answering; this request is retried on legacy.
    /// Counts as a failure of the new service.
    Fallback,
}

impl Attempt {
    /// The side being tried.
    pub fn backend(self) -> Backend {
        match self {
            Self::New => Backend::New,
            Self::Legacy | Self::BreakerOpen | Self::Fallback => Backend::Legacy,
        }
    }

    /// Whether the new service saw (or was meant to see) the request: its outcome is
    /// the breaker's to record.
    pub fn tried_new(self) -> bool {
        matches!(self, Self::New | Self::Fallback)
    }
}

/// The client as the router sees it.
#[derive(Debug, Default)]
pub struct Client {
    /// Its address: the peer's, or from `X-Forwarded-For` behind trusted proxies.
    pub ip: Option<String>,
    /// The peer is a trusted proxy, so its `X-Forwarded-For` is kept.
    pub peer_trusted: bool,
}

/// Per-request state.
pub struct RequestCtx {
    /// When the request arrived.
    pub started: Instant,
    /// The config and routes this request uses from start to end, whatever reloads.
    pub snapshot: Option<Arc<Snapshot>>,
    /// The matched route, if any.
    pub route: Option<Arc<Route>>,
    /// Who asked.
    pub client: Client,
    /// What the decision said (never rewritten; see [`RequestCtx::attempt`]).
    pub decision: Decision,
    /// Where the request goes now.
    pub attempt: Attempt,
    /// The request's span, or what it is built from if the outcome asks for one.
    pub trace: Option<Trace>,
    /// The shadow pair, when this request is copied.
    pub pair: Option<Pair>,
    /// Delays for retrying connect failures, created at the first failure.
    pub backoff: Option<backon::ExponentialBackoff>,
    /// Wait this long before the next connect attempt.
    pub retry_delay: Option<Duration>,
}

impl RequestCtx {
    /// A request that has just arrived.
    pub fn new() -> Self {
        Self {
            started: Instant::now(),
            snapshot: None,
            route: None,
            client: Client::default(),
            decision: Decision::legacy(Reason::Default),
            attempt: Attempt::Legacy,
            trace: None,
            pair: None,
            backoff: None,
            retry_delay: None,
        }
    }

    /// The side serving the request now.
    pub fn backend(&self) -> Backend {
        self.attempt.backend()
    }

    /// Why that side: the decision's reason, or `fallback` when the router sent the
    /// request to legacy against the decision.
    pub fn reason(&self) -> Reason {
        match self.attempt {
            Attempt::BreakerOpen | Attempt::Fallback => Reason::Fallback,
            Attempt::Legacy | Attempt::New => self.decision.reason,
        }
    }

    /// The upstream for the current attempt and its timeouts.
    pub fn upstream(&self) -> Option<(&UpstreamAddr, Timeouts)> {
        let config = &self.snapshot.as_ref()?.config;
        Some(match (&self.route, self.backend()) {
            (Some(route), Backend::New) => (&route.config.new_upstream, route.config.new_timeouts),
            _ => (&config.legacy, config.legacy_timeouts),
        })
    }
}

/// A request's tracing: a span recording since it arrived, or, for a request not
/// sampled on arrival, the ids and start time a span can be built from at the end.
pub enum Trace {
    /// Sampled: the span.
    Live(opentelemetry_sdk::trace::Span),
    /// Not sampled (yet).
    Deferred(crate::telemetry::Deferred),
}

impl Trace {
    /// The span, when the request was sampled.
    pub fn live(&self) -> Option<&opentelemetry_sdk::trace::Span> {
        match self {
            Self::Live(span) => Some(span),
            Self::Deferred(_) => None,
        }
    }

    /// The span, mutably, when the request was sampled.
    pub fn live_mut(&mut self) -> Option<&mut opentelemetry_sdk::trace::Span> {
        match self {
            Self::Live(span) => Some(span),
            Self::Deferred(_) => None,
        }
    }
}

impl Default for RequestCtx {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fallback_or_an_open_breaker_serves_legacy_and_says_fallback() {
        let mut ctx = RequestCtx::new();
        ctx.decision = Decision {
            backend: Backend::New,
            reason: Reason::Flag,
            variant: None,
            set_pin: None,
        };
        ctx.attempt = Attempt::New;
        assert_eq!((ctx.backend(), ctx.reason()), (Backend::New, Reason::Flag));
        assert!(ctx.attempt.tried_new());
        ctx.attempt = Attempt::Fallback;
        assert_eq!(
            (ctx.backend(), ctx.reason()),
            (Backend::Legacy, Reason::Fallback)
        );
        assert!(ctx.attempt.tried_new(), "the new service failed this one");
        ctx.attempt = Attempt::BreakerOpen;
        assert_eq!(
            (ctx.backend(), ctx.reason()),
            (Backend::Legacy, Reason::Fallback)
        );
        assert!(!ctx.attempt.tried_new());
    }
}
