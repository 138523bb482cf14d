//! The router's TOML configuration: parsed strictly, validated once into [`RouterConfig`].
//!
//! Unknown keys are errors; every error names the file, line and column.

use std::collections::HashSet;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

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

/// A configuration error with its place in the file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// TOML syntax or a field of the wrong type or name.
    #[error("{path}:{line}:{column}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        column: usize,
        /// What is wrong.
        message: String,
    },
    /// The values parse but do not make a working router.
    #[error("{path}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong, naming the route or section.
        message: String,
    },
}

/// A route's name: lowercase letters, digits, `-` and `_`; it names the flag and the metrics.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RouteName(String);

impl RouteName {
    /// Checks and wraps a route name.
    pub fn new(name: &str) -> Result<Self, String> {
        let ok = !name.is_empty()
            && name.len() <= 64
            && name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
        if ok {
            Ok(Self(name.to_string()))
        } else {
            Err(format!(
                "route name {name:?} must be 1-64 characters of a-z, 0-9, '-' or '_'"
            ))
        }
    }

    /// The name as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for RouteName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
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
    pub fn parse(raw: &str) -> Result<Self, String> {
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
        let addr = trimmed
            .to_socket_addrs()
            .map_err(|e| format!("upstream {raw:?} does not resolve: {e}"))?
            .next()
            .ok_or_else(|| format!("upstream {raw:?} resolves to no address"))?;
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

impl Stickiness {
    fn parse(raw: &str) -> Result<Self, String> {
        if raw == "ip" {
            return Ok(Self::ClientIp);
        }
        match raw.split_once(':') {
            Some(("header", name)) if !name.is_empty() => {
                Ok(Self::Header(name.to_ascii_lowercase()))
            }
            Some(("cookie", name)) if !name.is_empty() => Ok(Self::Cookie(name.to_string())),
            _ => Err(format!(
                "sticky = {raw:?}: expected \"header:NAME\", \"cookie:NAME\" or \"ip\""
            )),
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
#[derive(Debug, Clone)]
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
    /// Shadowing and comparison.
    pub shadow: ShadowConfig,
    /// Consecutive failures of the new service that open its circuit breaker.
    pub breaker_failures: u32,
    /// How long the breaker stays open before a probe.
    pub breaker_open: Duration,
    /// Also open the breaker at this error rate over a recent window.
    pub breaker_rate: Option<crate::breaker::ErrorRate>,
    /// Active health check of the new service: `GET` this path; 2xx is healthy.
    pub health: Option<HealthCheck>,
    /// Methods replayed on legacy when the new service fails: GET, HEAD and OPTIONS,
    /// plus what the route declares (say PUT, DELETE).
    pub idempotent_methods: Vec<http::Method>,
    /// The rollout plan `strangler route rollout` follows, if any.
    pub rollout: Option<crate::plan::RolloutPlan>,
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
#[derive(Debug, Clone)]
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
    pub rules: crate::compare::Rules,
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
        /// The client token; `None` when its env var is unset (the router refuses to
        /// start then, but the CLI can still read the file).
        token: Option<Secret>,
        /// The env var the token comes from, for messages.
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
}

/// Admin API settings.
#[derive(Debug, Clone)]
pub struct AdminConfig {
    /// Where it listens.
    pub listen: SocketAddr,
    /// Bearer token; `None` only on loopback.
    pub token: Option<Secret>,
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

/// Where rollouts read evidence unless `control.collector_url` says otherwise.
pub const DEFAULT_COLLECTOR_URL: &str = "http://127.0.0.1:8686";
/// Env var holding the Unleash admin token the CLI uses, unless `control.unleash_admin_token_env` names another.
pub const DEFAULT_UNLEASH_ADMIN_TOKEN_ENV: &str = "UNLEASH_ADMIN_TOKEN";
/// A rollback waits this long for every router to confirm: long enough for a busy
/// router, short enough that an operator learns quickly which one did not answer.
pub const DEFAULT_CONTROL_TIMEOUT_MS: u64 = 2_000;

/// The route-control settings used by `strangler route …`.
#[derive(Debug, Clone)]
pub struct ControlConfig {
    /// Admin API base URLs of every router (default: this config's own admin address).
    pub routers: Vec<String>,
    /// Unleash base URL for its admin API (default: `flags.url` without `/api/`).
    pub unleash_admin_url: Option<String>,
    /// Env var holding the Unleash admin token.
    pub unleash_admin_token_env: String,
    /// Unleash project holding the toggles.
    pub project: String,
    /// Unleash environment the routers' client token reads.
    pub environment: String,
    /// Where the route history is appended (JSON lines).
    pub history_file: PathBuf,
    /// How long a command waits for each router and Unleash.
    pub timeout: Duration,
    /// The collector's web address, where rollouts read their evidence.
    pub collector_url: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    server: RawServer,
    legacy: RawUpstream,
    #[serde(default)]
    flags: RawFlags,
    #[serde(default)]
    admin: RawAdmin,
    #[serde(default)]
    telemetry: RawTelemetry,
    #[serde(default)]
    control: RawControl,
    #[serde(default, rename = "route")]
    routes: Vec<RawRoute>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawControl {
    routers: Option<Vec<String>>,
    unleash_admin_url: Option<String>,
    unleash_admin_token_env: Option<String>,
    project: Option<String>,
    environment: Option<String>,
    history_file: Option<PathBuf>,
    timeout_ms: Option<u64>,
    collector_url: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    listen: Option<String>,
    threads: Option<usize>,
    trusted_proxies: Option<Vec<String>>,
    max_uri_bytes: Option<usize>,
    max_headers: Option<usize>,
    max_header_bytes: Option<usize>,
    max_body_bytes: Option<u64>,
    header_timeout_ms: Option<u64>,
    body_timeout_ms: Option<u64>,
    drain_ms: Option<u64>,
    connect_retries: Option<u32>,
    retry_backoff_ms: Option<u64>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUpstream {
    upstream: String,
    connect_timeout_ms: Option<u64>,
    read_timeout_ms: Option<u64>,
    write_timeout_ms: Option<u64>,
    idle_timeout_ms: Option<u64>,
    total_timeout_ms: Option<u64>,
}

// No `#[serde(flatten)]`: it would hide the position of an unknown key.
macro_rules! timeouts_of {
    ($raw:expr) => {
        timeouts(
            $raw.connect_timeout_ms,
            $raw.read_timeout_ms,
            $raw.write_timeout_ms,
            $raw.idle_timeout_ms,
            $raw.total_timeout_ms,
        )
    };
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFlags {
    source: Option<String>,
    file: Option<PathBuf>,
    url: Option<String>,
    token_env: Option<String>,
    poll_interval_ms: Option<u64>,
    app_name: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    listen: Option<String>,
    token_env: Option<String>,
    token_file: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTelemetry {
    otlp_endpoint: Option<String>,
    service_name: Option<String>,
    log_format: Option<String>,
    queue_size: Option<usize>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    name: String,
    #[serde(rename = "match")]
    matcher: RawMatch,
    new: String,
    flag: Option<String>,
    sticky: Option<String>,
    shadow: Option<RawShadow>,
    breaker_failures: Option<u32>,
    breaker_open_ms: Option<u64>,
    breaker_error_rate: Option<u8>,
    breaker_min_requests: Option<u32>,
    breaker_window_ms: Option<u64>,
    health_path: Option<String>,
    health_interval_ms: Option<u64>,
    health_failures: Option<u32>,
    idempotent_methods: Option<Vec<String>>,
    connect_timeout_ms: Option<u64>,
    read_timeout_ms: Option<u64>,
    write_timeout_ms: Option<u64>,
    idle_timeout_ms: Option<u64>,
    total_timeout_ms: Option<u64>,
    rollout: Option<crate::plan::RawRollout>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawShadow {
    percent: Option<u8>,
    methods: Option<Vec<String>>,
    max_body_bytes: Option<usize>,
    timeout_ms: Option<u64>,
    max_concurrent: Option<usize>,
    ignore: Option<Vec<String>>,
    ignore_headers: Option<Vec<String>>,
    array_sets: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMatch {
    prefix: Option<String>,
    path: Option<String>,
    #[serde(default)]
    methods: Vec<String>,
    header: Option<String>,
    header_value: Option<String>,
}

impl RouterConfig {
    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses and validates config text; `path` is for messages and relative paths.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| {
            let (line, column) = e
                .span()
                .map(|span| line_col(text, span.start))
                .unwrap_or((1, 1));
            ConfigError::Parse {
                path: path.to_path_buf(),
                line,
                column,
                message: e.message().to_string(),
            }
        })?;
        validate(raw, path).map_err(|message| ConfigError::Invalid {
            path: path.to_path_buf(),
            message,
        })
    }
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

fn timeouts(
    connect: Option<u64>,
    read: Option<u64>,
    write: Option<u64>,
    idle: Option<u64>,
    total: Option<u64>,
) -> Timeouts {
    let ms = |v: Option<u64>, d| Duration::from_millis(v.unwrap_or(d));
    Timeouts {
        connect: ms(connect, DEFAULT_CONNECT_TIMEOUT_MS),
        read: ms(read, DEFAULT_READ_TIMEOUT_MS),
        write: ms(write, DEFAULT_WRITE_TIMEOUT_MS),
        idle: ms(idle, DEFAULT_IDLE_TIMEOUT_MS),
        total: total.map(Duration::from_millis),
    }
}

fn socket(raw: &str, what: &str) -> Result<SocketAddr, String> {
    raw.parse()
        .map_err(|_| format!("{what} = {raw:?} must be an IP:port such as 127.0.0.1:8080"))
}

fn validate(raw: RawConfig, path: &Path) -> Result<RouterConfig, String> {
    let base = path.parent().unwrap_or(Path::new("."));
    let listen = socket(
        raw.server.listen.as_deref().unwrap_or(DEFAULT_LISTEN),
        "server.listen",
    )?;
    let threads = raw.server.threads.unwrap_or(DEFAULT_THREADS);
    if threads == 0 {
        return Err("server.threads must be at least 1".into());
    }
    let legacy = UpstreamAddr::parse(&raw.legacy.upstream).map_err(|e| format!("legacy: {e}"))?;
    let mut trusted_proxies = Vec::new();
    for entry in raw.server.trusted_proxies.iter().flatten() {
        let net = entry
            .parse::<ipnet::IpNet>()
            .or_else(|_| entry.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
            .map_err(|_| {
                format!("server.trusted_proxies: {entry:?} is not an IP address or CIDR range")
            })?;
        trusted_proxies.push(net);
    }

    let tls = match (&raw.server.tls_cert, &raw.server.tls_key) {
        (Some(cert), Some(key)) => Some(TlsConfig {
            cert: base.join(cert),
            key: base.join(key),
        }),
        (None, None) => None,
        _ => return Err("server.tls_cert and server.tls_key go together".into()),
    };
    let mut routes = Vec::with_capacity(raw.routes.len());
    let mut names = HashSet::new();
    for (index, r) in raw.routes.into_iter().enumerate() {
        let name = RouteName::new(&r.name).map_err(|e| format!("route #{}: {e}", index + 1))?;
        let ctx = |e: String| format!("route {name}: {e}");
        if !names.insert(name.clone()) {
            return Err(ctx("defined twice".into()));
        }
        let path_text = r
            .matcher
            .path
            .clone()
            .or_else(|| r.matcher.prefix.clone())
            .unwrap_or_default();
        let path = match (&r.matcher.prefix, &r.matcher.path) {
            (Some(p), None) => {
                if !p.starts_with('/') {
                    return Err(ctx(format!("match.prefix {p:?} must start with '/'")));
                }
                PathMatch::Prefix(p.trim_end_matches('/').to_string())
            }
            (None, Some(p)) => PathMatch::Pattern(parse_pattern(p).map_err(ctx)?),
            _ => {
                return Err(ctx(
                    "match needs exactly one of prefix = \"/api/x\" or path = \"/api/x/{id}\""
                        .into(),
                ));
            }
        };
        let mut methods = Vec::new();
        for m in &r.matcher.methods {
            let method = http::Method::from_bytes(m.to_ascii_uppercase().as_bytes())
                .map_err(|_| ctx(format!("match.methods: {m:?} is not an HTTP method")))?;
            methods.push(method);
        }
        let header = match (&r.matcher.header, &r.matcher.header_value) {
            (Some(h), v) => Some((h.to_ascii_lowercase(), v.clone())),
            (None, Some(_)) => return Err(ctx("match.header_value needs match.header".into())),
            (None, None) => None,
        };
        let new_upstream = UpstreamAddr::parse(&r.new).map_err(ctx)?;
        let flag = r
            .flag
            .clone()
            .unwrap_or_else(|| format!("strangler.{name}"));
        let raw_shadow = r.shadow.unwrap_or_default();
        let shadow_methods = match &raw_shadow.methods {
            None => vec![http::Method::GET, http::Method::HEAD],
            Some(list) => {
                let mut out = Vec::new();
                for m in list {
                    out.push(
                        http::Method::from_bytes(m.to_ascii_uppercase().as_bytes()).map_err(
                            |_| ctx(format!("shadow.methods: {m:?} is not an HTTP method")),
                        )?,
                    );
                }
                out
            }
        };
        if raw_shadow.percent.is_some_and(|p| p > 100) {
            return Err(ctx("shadow.percent must be 0-100".into()));
        }
        let pointers = |list: &Option<Vec<String>>,
                        what: &str|
         -> Result<Vec<crate::compare::PointerPattern>, String> {
            list.iter()
                .flatten()
                .map(|p| {
                    crate::compare::PointerPattern::parse(p)
                        .map_err(|e| ctx(format!("shadow.{what}: {e}")))
                })
                .collect()
        };
        let shadow = ShadowConfig {
            percent: raw_shadow.percent,
            methods: shadow_methods,
            max_body_bytes: raw_shadow
                .max_body_bytes
                .unwrap_or(DEFAULT_SHADOW_MAX_BODY_BYTES),
            timeout: Duration::from_millis(
                raw_shadow.timeout_ms.unwrap_or(DEFAULT_SHADOW_TIMEOUT_MS),
            ),
            max_concurrent: raw_shadow
                .max_concurrent
                .unwrap_or(DEFAULT_SHADOW_MAX_CONCURRENT)
                .max(1),
            rules: crate::compare::Rules {
                ignore_paths: pointers(&raw_shadow.ignore, "ignore")?,
                ignore_headers: raw_shadow
                    .ignore_headers
                    .iter()
                    .flatten()
                    .map(|h| h.to_ascii_lowercase())
                    .collect(),
                array_sets: pointers(&raw_shadow.array_sets, "array_sets")?,
            },
            flag: format!("{flag}.shadow"),
        };
        let sticky = match &r.sticky {
            Some(s) => Stickiness::parse(s).map_err(ctx)?,
            None => Stickiness::Header("x-user-id".into()),
        };
        let health = match &r.health_path {
            None => None,
            Some(p) if !p.starts_with('/') => {
                return Err(ctx(format!("health_path {p:?} must start with '/'")));
            }
            Some(p) => Some(HealthCheck {
                path: p.clone(),
                interval: Duration::from_millis(
                    r.health_interval_ms
                        .unwrap_or(DEFAULT_HEALTH_INTERVAL_MS)
                        .max(50),
                ),
                threshold: r.health_failures.unwrap_or(DEFAULT_HEALTH_FAILURES).max(1),
            }),
        };
        let mut idempotent_methods =
            vec![http::Method::GET, http::Method::HEAD, http::Method::OPTIONS];
        for m in r.idempotent_methods.iter().flatten() {
            let method = http::Method::from_bytes(m.to_ascii_uppercase().as_bytes())
                .map_err(|_| ctx(format!("idempotent_methods: {m:?} is not an HTTP method")))?;
            if method == http::Method::POST || method == http::Method::PATCH {
                return Err(ctx(format!(
                    "idempotent_methods: {method} is not idempotent; replaying it could apply a write twice"
                )));
            }
            if !idempotent_methods.contains(&method) {
                idempotent_methods.push(method);
            }
        }
        let breaker_rate = match r.breaker_error_rate {
            None => {
                if r.breaker_min_requests.is_some() || r.breaker_window_ms.is_some() {
                    return Err(ctx(
                        "breaker_min_requests and breaker_window_ms need breaker_error_rate".into(),
                    ));
                }
                None
            }
            Some(p) if p == 0 || p > 100 => {
                return Err(ctx(format!(
                    "breaker_error_rate = {p}: a percentage from 1 to 100"
                )));
            }
            Some(percent) => Some(crate::breaker::ErrorRate {
                percent,
                min_requests: r
                    .breaker_min_requests
                    .unwrap_or(crate::breaker::DEFAULT_RATE_MIN_REQUESTS)
                    .max(1),
                window: Duration::from_millis(
                    r.breaker_window_ms
                        .unwrap_or(crate::breaker::DEFAULT_RATE_WINDOW_MS)
                        .max(100),
                ),
            }),
        };
        let rollout = match r.rollout {
            Some(raw) => Some(raw.build().map_err(ctx)?),
            None => None,
        };
        routes.push(RouteConfig {
            name,
            path,
            path_text,
            methods,
            header,
            new_upstream,
            new_timeouts: timeouts_of!(r),
            flag,
            sticky,
            shadow,
            rollout,
            breaker_failures: r
                .breaker_failures
                .unwrap_or(crate::breaker::DEFAULT_FAILURES)
                .max(1),
            breaker_open: Duration::from_millis(
                r.breaker_open_ms.unwrap_or(crate::breaker::DEFAULT_OPEN_MS),
            ),
            breaker_rate,
            health,
            idempotent_methods,
            index,
        });
    }

    let flags = match raw.flags.source.as_deref().unwrap_or("file") {
        "file" => {
            let file = raw
                .flags
                .file
                .clone()
                .unwrap_or_else(|| PathBuf::from("flags.json"));
            if raw.flags.url.is_some() {
                return Err("flags.url is only used with flags.source = \"unleash\"".into());
            }
            FlagsConfig::File {
                path: base.join(file),
            }
        }
        "unleash" => {
            let url = raw.flags.url.clone().ok_or(
                "flags.source = \"unleash\" needs flags.url (e.g. http://127.0.0.1:4242/api/)",
            )?;
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(format!(
                    "flags.url {url:?} must start with http:// or https://"
                ));
            }
            let env = raw
                .flags
                .token_env
                .clone()
                .unwrap_or_else(|| DEFAULT_UNLEASH_TOKEN_ENV.into());
            let token = std::env::var(&env)
                .ok()
                .filter(|t| !t.trim().is_empty())
                .map(Secret::new);
            let interval = Duration::from_millis(
                raw.flags
                    .poll_interval_ms
                    .unwrap_or(DEFAULT_POLL_INTERVAL_MS),
            );
            if interval < Duration::from_millis(100) {
                return Err("flags.poll_interval_ms must be at least 100".into());
            }
            FlagsConfig::Unleash {
                url: if url.ends_with('/') {
                    url
                } else {
                    format!("{url}/")
                },
                token,
                token_env: env,
                interval,
                app_name: raw
                    .flags
                    .app_name
                    .clone()
                    .unwrap_or_else(|| "strangler-router".into()),
            }
        }
        other => {
            return Err(format!(
                "flags.source = {other:?}: expected \"file\" or \"unleash\""
            ));
        }
    };

    let admin_listen = socket(
        raw.admin.listen.as_deref().unwrap_or(DEFAULT_ADMIN_LISTEN),
        "admin.listen",
    )?;
    let token = match (&raw.admin.token_file, &raw.admin.token_env) {
        (Some(file), _) => {
            let file = base.join(file);
            let token = std::fs::read_to_string(&file)
                .map_err(|e| format!("admin.token_file {}: {e}", file.display()))?;
            let token = token.trim().to_string();
            if token.is_empty() {
                return Err(format!("admin.token_file {} is empty", file.display()));
            }
            Some(Secret::new(token))
        }
        (None, env) => {
            let env = env
                .clone()
                .unwrap_or_else(|| DEFAULT_ADMIN_TOKEN_ENV.into());
            std::env::var(&env)
                .ok()
                .filter(|t| !t.trim().is_empty())
                .map(Secret::new)
        }
    };
    if token.is_none() && !admin_listen.ip().is_loopback() {
        return Err(format!(
            "admin.listen = {admin_listen} is not a loopback address and no admin token is set \
             (set {DEFAULT_ADMIN_TOKEN_ENV} or admin.token_file); refusing to expose an unauthenticated admin API"
        ));
    }

    let control = {
        let c = &raw.control;
        let routers = match &c.routers {
            Some(list) if list.is_empty() => {
                return Err("control.routers must list at least one admin URL".into());
            }
            Some(list) => list
                .iter()
                .map(|u| u.trim_end_matches('/').to_string())
                .collect(),
            None => vec![format!("http://{admin_listen}")],
        };
        for url in &routers {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(format!(
                    "control.routers: {url:?} must start with http:// or https://"
                ));
            }
        }
        let unleash_admin_url = c.unleash_admin_url.clone().or_else(|| match &flags {
            FlagsConfig::Unleash { url, .. } => Some(
                url.trim_end_matches('/')
                    .trim_end_matches("/api")
                    .to_string(),
            ),
            FlagsConfig::File { .. } => None,
        });
        ControlConfig {
            routers,
            unleash_admin_url: unleash_admin_url.map(|u| u.trim_end_matches('/').to_string()),
            unleash_admin_token_env: c
                .unleash_admin_token_env
                .clone()
                .unwrap_or_else(|| DEFAULT_UNLEASH_ADMIN_TOKEN_ENV.into()),
            project: c.project.clone().unwrap_or_else(|| "default".into()),
            environment: c
                .environment
                .clone()
                .unwrap_or_else(|| "development".into()),
            history_file: base.join(
                c.history_file
                    .clone()
                    .unwrap_or_else(|| PathBuf::from("strangler.history.jsonl")),
            ),
            timeout: Duration::from_millis(c.timeout_ms.unwrap_or(DEFAULT_CONTROL_TIMEOUT_MS)),
            collector_url: c
                .collector_url
                .clone()
                .unwrap_or_else(|| DEFAULT_COLLECTOR_URL.into())
                .trim_end_matches('/')
                .to_string(),
        }
    };

    let json_logs = match raw.telemetry.log_format.as_deref().unwrap_or("plain") {
        "plain" => false,
        "json" => true,
        other => {
            return Err(format!(
                "telemetry.log_format = {other:?}: expected \"plain\" or \"json\""
            ));
        }
    };
    Ok(RouterConfig {
        source: path.to_path_buf(),
        listen,
        threads,
        trusted_proxies,
        limits: Limits {
            max_uri_bytes: raw.server.max_uri_bytes.unwrap_or(DEFAULT_MAX_URI_BYTES),
            max_headers: raw.server.max_headers.unwrap_or(DEFAULT_MAX_HEADERS),
            max_header_bytes: raw
                .server
                .max_header_bytes
                .unwrap_or(DEFAULT_MAX_HEADER_BYTES),
            max_body_bytes: raw.server.max_body_bytes.unwrap_or(DEFAULT_MAX_BODY_BYTES),
            header_timeout: Duration::from_millis(
                raw.server
                    .header_timeout_ms
                    .unwrap_or(DEFAULT_HEADER_TIMEOUT_MS)
                    .max(1),
            ),
            body_timeout: Duration::from_millis(
                raw.server
                    .body_timeout_ms
                    .unwrap_or(DEFAULT_BODY_TIMEOUT_MS)
                    .max(1),
            ),
            drain: Duration::from_millis(
                raw.server.drain_ms.unwrap_or(DEFAULT_DRAIN_MS).min(8_000),
            ),
        },
        retry: RetryPolicy {
            connect_retries: raw
                .server
                .connect_retries
                .unwrap_or(DEFAULT_CONNECT_RETRIES),
            backoff: Duration::from_millis(
                raw.server
                    .retry_backoff_ms
                    .unwrap_or(DEFAULT_RETRY_BACKOFF_MS),
            ),
        },
        tls,
        legacy,
        legacy_timeouts: timeouts_of!(raw.legacy),
        routes,
        flags,
        admin: AdminConfig {
            listen: admin_listen,
            token,
        },
        telemetry: TelemetryConfig {
            otlp_endpoint: raw.telemetry.otlp_endpoint,
            service_name: raw
                .telemetry
                .service_name
                .unwrap_or_else(|| "strangler-router".into()),
            json_logs,
            queue_size: raw.telemetry.queue_size.unwrap_or(8_192),
        },
        control,
    })
}

fn parse_pattern(p: &str) -> Result<Vec<Segment>, String> {
    if !p.starts_with('/') {
        return Err(format!("match.path {p:?} must start with '/'"));
    }
    let parts: Vec<&str> = p
        .trim_matches('/')
        .split('/')
        .filter(|s| !s.is_empty())
        .collect();
    let mut segments = Vec::with_capacity(parts.len());
    for (i, part) in parts.iter().enumerate() {
        let segment = if let Some(inner) = part.strip_prefix('{').and_then(|s| s.strip_suffix('}'))
        {
            if let Some(rest) = inner.strip_prefix('*') {
                if i + 1 != parts.len() {
                    return Err(format!(
                        "match.path {p:?}: {{*{rest}}} must be the last segment"
                    ));
                }
                Segment::Rest(rest.to_string())
            } else if inner.is_empty() || inner.contains(['{', '}']) {
                return Err(format!("match.path {p:?}: bad parameter {part:?}"));
            } else {
                Segment::Param(inner.to_string())
            }
        } else if part.contains(['{', '}']) {
            return Err(format!(
                "match.path {p:?}: a parameter must be a whole segment, like /{{id}}"
            ));
        } else {
            Segment::Literal((*part).to_string())
        };
        segments.push(segment);
    }
    Ok(segments)
}

#[cfg(test)]
mod tests {
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
                let table = crate::route::RouteTable::new(&config.routes);
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
        assert_eq!(
            config.admin.token.as_ref().map(Secret::expose),
            Some("s3cr3t-admin")
        );
        let shown = format!("{config:?}");
        assert!(!shown.contains("s3cr3t"), "{shown}");
        assert!(shown.contains("***"));
    }

    #[test]
    fn admin_without_token_refuses_non_loopback() {
        let text = format!(
            "[admin]\nlisten = \"0.0.0.0:9080\"\ntoken_env = \"STRANGLER_TEST_UNSET_TOKEN\"\n{MINIMAL}"
        );
        let err = parse(&text).expect_err("must refuse");
        assert!(err.to_string().contains("refusing"), "{err}");
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
