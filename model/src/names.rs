//! Names on the wire, once: span and event names and attribute keys that the
//! router writes, the CLI announces, and the collector and dashboards read. A key
//! used by two crates is a constant here, never a literal in both.
//!
//! Standard keys follow the OpenTelemetry HTTP semantic conventions; strangler's
//! own start with `strangler.`.

/// Prefix of every route's default Unleash toggle: `strangler.<route>`.
pub const FLAG_PREFIX: &str = "strangler.";
/// Suffix of a route's shadow toggle: `<flag>.shadow`.
pub const SHADOW_FLAG_SUFFIX: &str = ".shadow";

/// Span names.
pub mod span {
    /// The span the CLI sends for every route change; the collector turns it into
    /// a dashboard marker (`route_events`).
    pub const ROUTE_CHANGE: &str = "strangler.route.change";
    /// Prefix of a shadow copy's client span name (`shadow GET /path`).
    pub const SHADOW_PREFIX: &str = "shadow ";
}

/// Span event names.
pub mod event {
    /// Added to a primary span whose shadow answer differed.
    pub const MISMATCH: &str = "strangler.mismatch";
}

/// Attribute keys of the mismatch event.
pub mod mismatch {
    /// `METHOD /path?query` of the pair.
    pub const REQUEST: &str = "request";
    /// The primary's status code.
    pub const PRIMARY_STATUS: &str = "primary.status";
    /// The primary's body (truncated sample).
    pub const PRIMARY_BODY: &str = "primary.body";
    /// The shadow's status code (0: no answer).
    pub const SHADOW_STATUS: &str = "shadow.status";
    /// The shadow's body (truncated sample) or why there is none.
    pub const SHADOW_BODY: &str = "shadow.body";
    /// Both sides' values at each differing path: a JSON array of
    /// `{"path", "primary", "shadow"}`, values as JSON text.
    pub const DIFFERENCES: &str = "differences";
}

/// Attribute keys.
pub mod attr {
    /// OTel: request method.
    pub const HTTP_METHOD: &str = "http.request.method";
    /// OTel: the matched route template.
    pub const HTTP_ROUTE: &str = "http.route";
    /// OTel: response status code.
    pub const HTTP_STATUS: &str = "http.response.status_code";
    /// OTel: request path.
    pub const URL_PATH: &str = "url.path";
    /// OTel: query string.
    pub const URL_QUERY: &str = "url.query";
    /// OTel: client-facing scheme.
    pub const URL_SCHEME: &str = "url.scheme";
    /// OTel: Host / :authority.
    pub const SERVER_ADDRESS: &str = "server.address";
    /// OTel: the client, behind trusted proxies.
    pub const CLIENT_ADDRESS: &str = "client.address";
    /// OTel: User-Agent.
    pub const USER_AGENT: &str = "user_agent.original";
    /// OTel: HTTP version.
    pub const PROTOCOL_VERSION: &str = "network.protocol.version";
    /// OTel: error class.
    pub const ERROR_TYPE: &str = "error.type";
    /// OTel resource: the service.
    pub const SERVICE_NAME: &str = "service.name";

    /// The route that matched.
    pub const ROUTE: &str = "strangler.route";
    /// Resource attribute of a router that exports its aggregates: the collector
    /// counts its requests from those, not from its spans.
    pub const COUNTED: &str = "strangler.counted";
    /// [`COUNTED`]'s value.
    pub const COUNTED_BY_AGGREGATES: &str = "aggregates";
    /// Resource attribute (`"true"`) of a metrics export sent again, unchanged,
    /// because the first attempt was not acknowledged: the receiver may hold it
    /// already, and a collector that does skips it.
    pub const EXPORT_RETRY: &str = "strangler.export.retry";
    /// On a span the router kept for its outcome (an error, a fallback, a slow
    /// request, a differing pair) rather than drew at random.
    pub const SAMPLED: &str = "strangler.sampled";
    /// [`SAMPLED`]'s value.
    pub const SAMPLED_FOR_OUTCOME: &str = "outcome";
    /// `legacy` or `new`.
    pub const BACKEND: &str = "strangler.backend";
    /// `override`, `flag`, `default` or `fallback`.
    pub const DECISION: &str = "strangler.decision";
    /// The route's toggle.
    pub const FLAG: &str = "strangler.flag";
    /// The variant the toggle gave.
    pub const FLAG_VARIANT: &str = "strangler.flag.variant";
    /// The upstream's authority.
    pub const UPSTREAM: &str = "strangler.upstream";
    /// `open` when the breaker kept the request off the new service.
    pub const BREAKER: &str = "strangler.breaker";
    /// True on a shadow copy's span.
    pub const SHADOW: &str = "strangler.shadow";
    /// Links a primary and its shadow.
    pub const PAIR_ID: &str = "strangler.pair_id";
    /// True on a calibration copy (legacy compared with legacy).
    pub const CALIBRATION: &str = "strangler.calibration";
    /// `match`, `mismatch`, `error` or `skipped`.
    pub const DIFF: &str = "strangler.diff";
    /// JSON pointers that differ, comma-separated.
    pub const DIFF_PATHS: &str = "strangler.diff.paths";

    /// Route change: the route.
    pub const CHANGE_ROUTE: &str = "strangler.change.route";
    /// Route change: the state before.
    pub const CHANGE_FROM: &str = "strangler.change.from";
    /// Route change: the state after.
    pub const CHANGE_TO: &str = "strangler.change.to";
    /// Route change: the command.
    pub const CHANGE_ACTION: &str = "strangler.change.action";
    /// Route change: who.
    pub const CHANGE_ACTOR: &str = "strangler.change.actor";
    /// Route change: why.
    pub const CHANGE_REASON: &str = "strangler.change.reason";
}

/// Values of [`attr::DIFF`].
pub mod diff {
    /// Both answers equal under the route's rules.
    pub const MATCH: &str = "match";
    /// They differ.
    pub const MISMATCH: &str = "mismatch";
    /// The shadow side gave no answer.
    pub const ERROR: &str = "error";
    /// Not compared (body too large, no capacity, fallback).
    pub const SKIPPED: &str = "skipped";
}
