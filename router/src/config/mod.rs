//! The router's TOML configuration: parsed strictly ([`raw`]), validated once
//! section by section ([`validate`]) into [`RouterConfig`]; credentials are read
//! once at start-up ([`secrets`]).
//!
//! Unknown keys are errors; every error names the file, line and column.

mod raw;
pub mod secrets;
mod validate;

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use secrets::Secrets;
pub use strangler_model::control::ControlConfig;
pub use strangler_model::{ConfigError, Invalid, RouteName};

/// Where clients connect by default.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:8080";
/// The admin API stays on loopback unless told otherwise: it can flip production traffic.
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9080";
/// Env var holding the admin bearer token, unless `admin.token_env` names another.
pub const DEFAULT_ADMIN_TOKEN_ENV: &str = "STRANGLER_ADMIN_TOKEN";
/// Env var holding the Unleash client token, unless `flags.token_env` names another.
pub const DEFAULT_UNLEASH_TOKEN_ENV: &str = "UNLEASH_CLIENT_TOKEN";
/// A flip should reach every router within about a second.
pub const DEFAULT_POLL_INTERVAL_MS: u64 = 1_000;
/// Connecting on a LAN takes milliseconds; a second means the upstream is in trouble.
pub const DEFAULT_CONNECT_TIMEOUT_MS: u64 = 1_000;
/// Generous for a monolith's slow pages, but bounded so a hung upstream frees its connection.
pub const DEFAULT_READ_TIMEOUT_MS: u64 = 30_000;
/// Same bound for sending the request body upstream.
pub const DEFAULT_WRITE_TIMEOUT_MS: u64 = 30_000;
/// Idle upstream connections are kept this long for reuse.
pub const DEFAULT_IDLE_TIMEOUT_MS: u64 = 60_000;
/// Matches pingora's own default: one worker thread per core on the 2-core baseline.
pub const DEFAULT_THREADS: usize = 2;

/// A credential: usable as a string, never printed (its `Debug` shows `***`), so a
/// config logged with `{:?}` cannot leak it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a credential.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The credential itself, for a header or a comparison.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// An upstream `host:port` reached over plain HTTP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamAddr {
    /// `host:port` as written.
    pub authority: String,
    /// The host part, used as SNI/Host when needed.
    pub host: String,
    /// The address, resolved when the config is loaded (and again on reload).
    pub addr: std::net::SocketAddr,
}

impl UpstreamAddr {
    /// Parses `host:port` or `http://host:port`.
    pub fn parse(raw: &str) -> Result<Self, Invalid> {
        Self::parse_text(raw).map_err(Invalid)
    }

    fn parse_text(raw: &str) -> Result<Self, String> {
        let trimmed = raw
            .strip_prefix("http://")
            .unwrap_or(raw)
            .trim_end_matches('/');
        if raw.starts_with("https://") {
            return Err(format!(
                "upstream {raw:?}: TLS to upstreams is not supported yet; use http:// or host:port"
            ));
        }
        let Some((host, port)) = trimmed.rsplit_once(':') else {
            return Err(format!("upstream {raw:?} must be host:port"));
        };
        if host.is_empty() || port.parse::<u16>().is_err() || trimmed.contains('/') {
            return Err(format!("upstream {raw:?} must be host:port"));
        }
        use std::net::ToSocketAddrs;
        let bare = host.trim_matches(['[', ']']);
        let listed = port
            .parse::<u16>()
            .map(|p| strangler_model::hosts::lookup(bare, p))
            .unwrap_or_default();
        let addr = match listed.first() {
            Some(a) => *a,
            None => trimmed
                .to_socket_addrs()
                .map_err(|e| format!("upstream {raw:?} does not resolve: {e}"))?
                .next()
                .ok_or_else(|| format!("upstream {raw:?} resolves to no address"))?,
        };
        Ok(Self {
            authority: trimmed.to_string(),
            host: host.trim_matches(['[', ']']).to_string(),
            addr,
        })
    }
}

/// Per-upstream timeouts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// TCP connect.
    pub connect: Duration,
    /// Waiting for each read from the upstream (first byte and between chunks).
    pub read: Duration,
    /// Each write to the upstream.
    pub write: Duration,
    /// How long idle pooled connections are kept.
    pub idle: Duration,
    /// The whole exchange, from sending the request to the last response byte;
    /// `None` leaves only the per-read limit.
    pub total: Option<Duration>,
}

/// Where the stickiness key of a request comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stickiness {
    /// A request header, used as Unleash `userId`.
    Header(String),
    /// A cookie, used as Unleash `sessionId`.
    Cookie(String),
    /// The client IP, used as Unleash `remoteAddress` and as `userId`, so that
    /// default stickiness keeps each address on one side.
    ClientIp,
}

/// A route's session pin (`pin = "cookie"`): the router sets a cookie naming the
/// side that served the session's first request, and later requests of the session
/// go to that side while the route's percentage moves. An override (a rollback, a
/// forced side) and a toggle switched off still move everyone; the breaker and
/// the fallback still apply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pin {
    /// The cookie's name (default `strangler_pin_<route>`).
    pub cookie: String,
    /// How long a pin lasts (the cookie's `Max-Age`).
    pub ttl: Duration,
}

/// A pin lasts this long unless `pin_ttl_s` says otherwise: a working day's session.
pub const DEFAULT_PIN_TTL_S: u64 = 8 * 3600;

impl Stickiness {
    fn parse(raw: &str) -> Result<Self, Invalid> {
        if raw == "ip" {
            return Ok(Self::ClientIp);
        }
        match raw.split_once(':') {
            Some(("header", name)) if !name.is_empty() => {
                Ok(Self::Header(name.to_ascii_lowercase()))
            }
            Some(("cookie", name)) if !name.is_empty() => Ok(Self::Cookie(name.to_string())),
            _ => Err(Invalid(format!(
                "sticky = {raw:?}: expected \"header:NAME\", \"cookie:NAME\" or \"ip\""
            ))),
        }
    }
}

/// How a route's path is matched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathMatch {
    /// The path equals the prefix or continues it at a `/`.
    Prefix(String),
    /// Segments match one by one; `{name}` matches one segment, a final `{*name}` the rest.
    Pattern(Vec<Segment>),
}

/// One segment of a path pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Segment {
    /// Matches exactly this text.
    Literal(String),
    /// Matches any one non-empty segment.
    Param(String),
    /// Matches the rest of the path (last segment only).
    Rest(String),
}

/// Longest request target accepted (414 above): generous for query strings, far
/// below what would let a client pin memory.
pub const DEFAULT_MAX_URI_BYTES: usize = 8 * 1024;
/// Most request headers accepted (431 above).
pub const DEFAULT_MAX_HEADERS: usize = 100;
/// Largest total size of request headers (431 above), as common proxies allow.
pub const DEFAULT_MAX_HEADER_BYTES: usize = 32 * 1024;
/// Largest declared request body (413 above).
pub const DEFAULT_MAX_BODY_BYTES: u64 = 64 * 1024 * 1024;

/// Per-request limits on what a client may send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Request target (path and query) length.
    pub max_uri_bytes: usize,
    /// Number of header fields.
    pub max_headers: usize,
    /// Sum of header name and value lengths.
    pub max_header_bytes: usize,
    /// Declared Content-Length.
    pub max_body_bytes: u64,
    /// A request's headers must be complete this long after their first byte (408 otherwise).
    pub header_timeout: Duration,
    /// Longest wait for each read of a request body.
    pub body_timeout: Duration,
    /// At shutdown or upgrade, idle keep-alive connections are served with
    /// `Connection: close` for this long before being closed.
    pub drain: Duration,
}

/// Keep-alive drain at shutdown: long enough for a busy client to send its next
/// request and learn to reconnect, well inside the 10 s graceful shutdown timeout.
pub const DEFAULT_DRAIN_MS: u64 = 2_000;

/// Request headers must arrive within this (nginx's `client_header_timeout` is 60 s
/// per read; this is total, so a trickling client cannot reset it).
pub const DEFAULT_HEADER_TIMEOUT_MS: u64 = 15_000;
/// Each read of a request body may wait this long.
pub const DEFAULT_BODY_TIMEOUT_MS: u64 = 60_000;
/// Connect failures retried on the same upstream (nothing was sent, so any method is safe).
pub const DEFAULT_CONNECT_RETRIES: u32 = 2;
/// First retry delay; doubled each time, with full jitter.
pub const DEFAULT_RETRY_BACKOFF_MS: u64 = 20;

/// How failed connections are retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Retries after a connect failure.
    pub connect_retries: u32,
    /// Base delay of the exponential backoff.
    pub backoff: Duration,
}

/// How often the new service's health path is checked by default.
pub const DEFAULT_HEALTH_INTERVAL_MS: u64 = 1_000;
/// Consecutive failed checks before the new service counts as down (and passes to be up).
pub const DEFAULT_HEALTH_FAILURES: u32 = 2;

/// An active health check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    /// Path requested on the new service.
    pub path: String,
    /// Time between checks.
    pub interval: Duration,
    /// Consecutive failures that mark it down, and successes that mark it up again.
    pub threshold: u32,
}

/// A validated route.
#[derive(Debug, Clone, PartialEq)]
pub struct RouteConfig {
    /// The route's name.
    pub name: RouteName,
    /// Path matcher.
    pub path: PathMatch,
    /// The matcher as written, reported as `http.route`.
    pub path_text: String,
    /// Methods this route takes; empty means all.
    pub methods: Vec<http::Method>,
    /// Optional header that must be present (and equal `value` when given).
    pub header: Option<(String, Option<String>)>,
    /// The new service.
    pub new_upstream: UpstreamAddr,
    /// Timeouts toward the new service.
    pub new_timeouts: Timeouts,
    /// The Unleash toggle deciding this route.
    pub flag: String,
    /// Where the stickiness key comes from.
    pub sticky: Stickiness,
    /// Session pinning: a cookie keeps a session on the side that served it first
    /// while the percentage moves.
    pub pin: Option<Pin>,
    /// Shadowing and comparison.
    pub shadow: ShadowConfig,
    /// Consecutive failures of the new service that open its circuit breaker.
    pub breaker_failures: u32,
    /// How long the breaker stays open before a probe.
    pub breaker_open: Duration,
    /// Also open the breaker at this error rate over a recent window.
    pub breaker_rate: Option<crate::routing::breaker::ErrorRate>,
    /// Active health check of the new service: `GET` this path; 2xx is healthy.
    pub health: Option<HealthCheck>,
    /// Methods replayed on legacy when the new service fails: GET, HEAD and OPTIONS,
    /// plus what the route declares (say PUT, DELETE).
    pub idempotent_methods: Vec<http::Method>,
    /// The rollout plan `strangler route rollout` follows, if any.
    pub rollout: Option<strangler_model::rollout::RolloutPlan>,
    /// Position in the file, the last tie-breaker.
    pub index: usize,
}

/// Request and response bodies above this are not buffered for a shadow copy:
/// the pair is counted as skipped.
pub const DEFAULT_SHADOW_MAX_BODY_BYTES: usize = 256 * 1024;
/// A shadow answer later than this counts as an error of the shadow side.
pub const DEFAULT_SHADOW_TIMEOUT_MS: u64 = 5_000;
/// Copies in flight per router process; beyond it copies are skipped and counted.
pub const DEFAULT_SHADOW_MAX_CONCURRENT: usize = 256;

/// A route's shadow settings. Shadowing is on while the route's `<flag>.shadow`
/// toggle is enabled for the request (what `strangler route shadow` turns on), or
/// for `percent` % of requests when set here.
#[derive(Debug, Clone, PartialEq)]
pub struct ShadowConfig {
    /// Always shadow this share of requests, toggle or not.
    pub percent: Option<u8>,
    /// Methods that may be copied: GET and HEAD unless the route opts in to more.
    pub methods: Vec<http::Method>,
    /// Largest request or response body buffered for a pair.
    pub max_body_bytes: usize,
    /// How long the copy may take.
    pub timeout: Duration,
    /// Copies in flight at once.
    pub max_concurrent: usize,
    /// Comparison rules.
    pub rules: crate::shadow::compare::Rules,
    /// The toggle that turns shadowing on (`<flag>.shadow`).
    pub flag: String,
}

/// Which flag source the router reads.
#[derive(Debug, Clone)]
pub enum FlagsConfig {
    /// A file in Unleash's client-features format, watched for changes.
    File {
        /// The file.
        path: PathBuf,
    },
    /// An Unleash server, polled.
    Unleash {
        /// The client API URL (`http://host:4242/api/`).
        url: String,
        /// The env var the client token comes from (read by [`Secrets::read`]).
        token_env: String,
        /// Poll interval.
        interval: Duration,
        /// `appName` sent to Unleash.
        app_name: String,
    },
}

/// Telemetry settings.
#[derive(Debug, Clone)]
pub struct TelemetryConfig {
    /// OTLP/gRPC endpoint; spans are not exported when unset.
    pub otlp_endpoint: Option<String>,
    /// `service.name` resource attribute.
    pub service_name: String,
    /// Log as JSON lines instead of plain text.
    pub json_logs: bool,
    /// Spans buffered before new ones are dropped (and counted).
    pub queue_size: usize,
    /// Share of ordinary requests that get a span (0..=1), decided when the request
    /// arrives. Errors, fallbacks, slow requests, shadow mismatches and requests
    /// whose caller sampled its trace always get one.
    pub sample_ratio: f64,
    /// A request slower than this always gets a span.
    pub slow: std::time::Duration,
    /// Spans kept for shadow mismatches per route and minute beyond the sampled ones,
    /// so a route whose every pair differs cannot flood the collector.
    pub mismatch_spans_per_minute: u32,
    /// OTLP/gRPC endpoint for the route aggregates as metrics; unset = not exported.
    pub metrics_endpoint: Option<String>,
    /// How often the aggregates are exported (deltas).
    pub metrics_interval: std::time::Duration,
}

/// The default `telemetry.sample_ratio` when the router exports its aggregates
/// (`metrics_endpoint` set): the views count from the aggregates, so spans are only
/// for looking at examples, and one request in a hundred, plus every error,
/// fallback, slow request and (capped) mismatch, is plenty of examples while the
/// span cost stays a percent of what it was.
pub const DEFAULT_SAMPLE_RATIO: f64 = 0.01;

/// The default `telemetry.sample_ratio` without aggregates: spans are then the only
/// counts the collector gets, and a sample would make every view a sample too.
pub const DEFAULT_SAMPLE_RATIO_WITHOUT_METRICS: f64 = 1.0;

/// Where a credential comes from. Read once, at start-up, by [`Secrets::read`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretSource {
    /// An environment variable (unset or blank: no credential).
    Env(String),
    /// A file holding only the credential (must exist and not be empty).
    File(PathBuf),
}

/// Admin API settings.
#[derive(Debug, Clone)]
pub struct AdminConfig {
    /// Where it listens.
    pub listen: SocketAddr,
    /// Where the bearer token comes from; without one the API stays on loopback.
    pub token: SecretSource,
    /// Where overrides are kept across restarts (`None`: not kept).
    pub overrides_file: Option<PathBuf>,
}

/// TLS termination settings: PEM files, re-read on reload (SIGHUP or a change of the
/// config file or either PEM file).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsConfig {
    /// Certificate chain (PEM), leaf first.
    pub cert: PathBuf,
    /// Private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

/// A validated router configuration.
#[derive(Debug, Clone)]
pub struct RouterConfig {
    /// The file it came from (relative paths in it are relative to its directory).
    pub source: PathBuf,
    /// Client-facing listen address.
    pub listen: SocketAddr,
    /// Worker threads.
    pub threads: usize,
    /// Peers whose `X-Forwarded-For` is believed (load balancers, CDNs). From anyone
    /// else the header is replaced by the peer's address.
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// Clients (their address, after trusted proxies) whose `x-strangler-force:
    /// new|legacy` header picks the side of every route, at any percentage: QA on
    /// the new side at 0 %. An override (a rollback) still wins.
    pub trusted_testers: Vec<ipnet::IpNet>,
    /// Request limits, answered with 414, 431, 413 or 408.
    pub limits: Limits,
    /// Retries of connect failures.
    pub retry: RetryPolicy,
    /// TLS termination on the listener.
    pub tls: Option<TlsConfig>,
    /// The legacy monolith, default for everything.
    pub legacy: UpstreamAddr,
    /// Timeouts toward legacy.
    pub legacy_timeouts: Timeouts,
    /// Routes in file order.
    pub routes: Vec<RouteConfig>,
    /// Flag source.
    pub flags: FlagsConfig,
    /// Admin API.
    pub admin: AdminConfig,
    /// Telemetry.
    pub telemetry: TelemetryConfig,
    /// How the CLI operates routes (ignored by the router itself).
    pub control: ControlConfig,
}

impl RouterConfig {
    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        Self::parse(&ConfigError::read(path)?, path)
    }

    /// Parses and validates config text; `path` is for messages and relative paths.
    /// Reads nothing else: credentials come from [`Secrets::read`].
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let raw: raw::RawConfig = ConfigError::parse_toml(text, path)?;
        validate::validate(raw, path).map_err(|e| ConfigError::invalid(path, e))
    }
}

impl RouteConfig {
    /// Whether two configs of a route say the same thing (its place in the file
    /// aside): a reload keeps the route's breaker, windows and shadow results then.
    pub fn same_settings(&self, other: &RouteConfig) -> bool {
        let mut moved = other.clone();
        moved.index = self.index;
        *self == moved
    }
}

#[cfg(test)]
mod tests {
    use super::validate::parse_pattern;
    use super::*;

    fn parse(text: &str) -> Result<RouterConfig, ConfigError> {
        RouterConfig::parse(text, Path::new("/etc/strangler/strangler.toml"))
    }

    const MINIMAL: &str = r#"
[legacy]
upstream = "127.0.0.1:3000"

[[route]]
name = "orders"
match = { prefix = "/api/orders", methods = ["get", "POST"] }
new = "http://127.0.0.1:4000"
sticky = "cookie:session"
"#;

    #[test]
    fn minimal_config_gets_documented_defaults() {
        let c = parse(MINIMAL).expect("valid");
        assert_eq!(c.listen.to_string(), DEFAULT_LISTEN);
        assert_eq!(c.admin.listen.to_string(), DEFAULT_ADMIN_LISTEN);
        let r = &c.routes[0];
        assert_eq!(r.flag, "strangler.orders");
        assert_eq!(r.new_upstream.authority, "127.0.0.1:4000");
        assert_eq!(r.methods, vec![http::Method::GET, http::Method::POST]);
        assert_eq!(r.sticky, Stickiness::Cookie("session".into()));
        assert_eq!(
            r.new_timeouts.connect,
            Duration::from_millis(DEFAULT_CONNECT_TIMEOUT_MS)
        );
        assert!(
            matches!(&c.flags, FlagsConfig::File { path } if path == Path::new("/etc/strangler/flags.json"))
        );
    }

    #[test]
    fn unknown_route_field_is_rejected_with_line_number() {
        let text = format!("{MINIMAL}colour = \"blue\"\n");
        let err = parse(&text).expect_err("unknown key");
        let msg = err.to_string();
        assert!(msg.contains("strangler.toml:"), "{msg}");
        assert!(msg.contains("colour"), "{msg}");
        let ConfigError::Parse { line, .. } = err else {
            panic!("expected a parse error, got {err:?}");
        };
        assert_eq!(line, 10, "the unknown key's own line");
    }

    #[test]
    fn syntax_error_points_at_its_line() {
        let err =
            parse("[legacy]\nupstream = \"127.0.0.1:3000\"\n[[route]\n").expect_err("bad toml");
        let ConfigError::Parse { line, .. } = err else {
            panic!("expected parse error");
        };
        assert_eq!(line, 3);
    }

    #[test]
    fn duplicate_route_names_are_rejected() {
        let text = format!(
            "{MINIMAL}{}",
            &MINIMAL[MINIMAL.find("[[route]]").expect("route")..]
        );
        let err = parse(&text).expect_err("duplicate");
        assert!(
            err.to_string().contains("route orders: defined twice"),
            "{err}"
        );
    }

    #[test]
    fn bad_values_get_clear_messages() {
        for (bad, needle) in [
            (
                MINIMAL.replace("127.0.0.1:4000", "nowhere"),
                "must be host:port",
            ),
            (
                MINIMAL.replace("cookie:session", "query:x"),
                "expected \"header:NAME\"",
            ),
            (MINIMAL.replace("\"orders\"", "\"Orders!\""), "route name"),
            (
                MINIMAL.replace("\"get\"", "\"G E T\""),
                "not an HTTP method",
            ),
            (
                MINIMAL.replace("prefix = \"/api/orders\"", "path = \"/api/{*rest}/x\""),
                "must be the last segment",
            ),
            (
                MINIMAL.replace("prefix = \"/api/orders\"", "prefix = \"/a\", path = \"/b\""),
                "exactly one of",
            ),
        ] {
            let err = parse(&bad).expect_err(needle);
            assert!(err.to_string().contains(needle), "{needle}: {err}");
        }
    }

    /// Mutation test of the parser: random edits of a full config never panic, and
    /// whatever still parses is a config that compiles into a route table.
    #[test]
    fn mutated_configs_never_panic_the_parser() {
        use rand::{Rng, SeedableRng};
        let full = format!(
            "[server]\nlisten = \"127.0.0.1:8080\"\n[admin]\nlisten = \"127.0.0.1:9080\"\n[flags]\nfile = \"f.json\"\n{MINIMAL}\n[route.shadow]\npercent = 5\nignore = [\"/a/*/b\"]\n\n[[route]]\nname = \"item\"\nmatch = {{ path = \"/api/orders/{{id}}/{{*rest}}\", header = \"x-b\" }}\nnew = \"127.0.0.1:4001\"\n"
        );
        let alphabet: &[u8] = b"[]{}=\"/:*,.#\n abcz019-_";
        // STRANGLER_FUZZ_ITERATIONS / STRANGLER_FUZZ_SEED run it longer (docs/testing.md).
        let (iterations, seed) = crate::fuzz_settings(5_000, 0xc0f1);
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut parsed = 0;
        for _ in 0..iterations {
            let mut bytes = full.clone().into_bytes();
            for _ in 0..rng.random_range(1..6) {
                let i = rng.random_range(0..bytes.len());
                match rng.random_range(0..3) {
                    0 => bytes[i] = alphabet[rng.random_range(0..alphabet.len())],
                    1 => {
                        bytes.remove(i);
                    }
                    _ => bytes.insert(i, alphabet[rng.random_range(0..alphabet.len())]),
                }
            }
            let Ok(text) = String::from_utf8(bytes) else {
                continue;
            };
            if let Ok(config) = RouterConfig::parse(&text, Path::new("fuzz.toml")) {
                parsed += 1;
                let table =
                    crate::routing::Snapshot::build(config, None, &crate::stats::Stats::default())
                        .table;
                let _ = table.find(
                    &http::Method::GET,
                    "/api/orders/1/x",
                    &http::HeaderMap::new(),
                );
            }
        }
        assert!(parsed > 0, "some mutations should still parse");
    }

    #[test]
    fn tokens_never_appear_in_debug_output() {
        let text = format!("[admin]\ntoken_file = \"token\"\n{MINIMAL}");
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("token"), "s3cr3t-admin\n").expect("write");
        let config = RouterConfig::parse(&text, &dir.path().join("strangler.toml")).expect("valid");
        let secrets = Secrets::read(&config).expect("token file");
        assert_eq!(
            secrets.admin_token.as_ref().map(Secret::expose),
            Some("s3cr3t-admin")
        );
        let shown = format!("{config:?} {secrets:?}");
        assert!(!shown.contains("s3cr3t"), "{shown}");
        assert!(shown.contains("***"));
    }

    #[test]
    fn admin_without_token_refuses_non_loopback() {
        let text = format!(
            "[admin]\nlisten = \"0.0.0.0:9080\"\ntoken_env = \"STRANGLER_TEST_UNSET_TOKEN\"\n{MINIMAL}"
        );
        let config = parse(&text).expect("parsing reads no secrets");
        let err = Secrets::read(&config).expect_err("must refuse");
        assert!(err.to_string().contains("refusing"), "{err}");
    }

    #[test]
    fn parsing_reads_no_token_file_but_start_up_does() {
        let dir = tempfile::tempdir().expect("tempdir");
        let text = format!("[admin]\ntoken_file = \"missing\"\n{MINIMAL}");
        let config =
            RouterConfig::parse(&text, &dir.path().join("strangler.toml")).expect("parses");
        let err = Secrets::read(&config).expect_err("missing file");
        assert!(err.to_string().contains("admin.token_file"), "{err}");
    }

    #[test]
    fn patterns_parse_params_and_rest() {
        assert_eq!(
            parse_pattern("/api/orders/{id}/items/{*rest}").expect("valid"),
            vec![
                Segment::Literal("api".into()),
                Segment::Literal("orders".into()),
                Segment::Param("id".into()),
                Segment::Literal("items".into()),
                Segment::Rest("rest".into()),
            ]
        );
        assert!(parse_pattern("/api/or{id}").is_err());
    }
}
