//! Validation, one function per section: raw TOML types in, validated types out.
//! Pure: nothing here reads the environment or other files (secrets are read once
//! at start-up by [`super::secrets`]).

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use strangler_model::names::SHADOW_FLAG_SUFFIX;
use strangler_model::{Invalid, RouteName};

use super::raw::{RawAdmin, RawConfig, RawFlags, RawRoute, RawTelemetry};
use super::*;

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

/// Checks a parsed file section by section and builds the validated config.
pub(super) fn validate(raw: RawConfig, path: &Path) -> Result<RouterConfig, Invalid> {
    validate_sections(raw, path).map_err(Invalid)
}

fn validate_sections(raw: RawConfig, path: &Path) -> Result<RouterConfig, String> {
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
    let nets = |key: &str, entries: &Option<Vec<String>>| -> Result<Vec<ipnet::IpNet>, String> {
        entries
            .iter()
            .flatten()
            .map(|entry| {
                entry
                    .parse::<ipnet::IpNet>()
                    .or_else(|_| entry.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                    .map_err(|_| {
                        format!("server.{key}: {entry:?} is not an IP address or CIDR range")
                    })
            })
            .collect()
    };
    let trusted_proxies = nets("trusted_proxies", &raw.server.trusted_proxies)?;
    let trusted_testers = nets("trusted_testers", &raw.server.trusted_testers)?;

    let tls = match (&raw.server.tls_cert, &raw.server.tls_key) {
        (Some(cert), Some(key)) => Some(TlsConfig {
            cert: base.join(cert),
            key: base.join(key),
        }),
        (None, None) => None,
        _ => return Err("server.tls_cert and server.tls_key go together".into()),
    };
    let routes = routes(raw.routes)?;
    let flags = flags(&raw.flags, base)?;
    let admin = admin(&raw.admin, base, path)?;
    let control = raw
        .control
        .build(
            &format!("http://{}", admin.listen),
            match &flags {
                FlagsConfig::Unleash { url, .. } => Some(url.as_str()),
                FlagsConfig::File { .. } => None,
            },
            base,
        )
        .map_err(|e| e.0)?;
    Ok(RouterConfig {
        source: path.to_path_buf(),
        listen,
        threads,
        trusted_proxies,
        trusted_testers,
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
        admin,
        telemetry: telemetry(raw.telemetry)?,
        control,
    })
}

/// One `[[route]]`.
fn route(index: usize, r: RawRoute) -> Result<RouteConfig, String> {
    let name = RouteName::new(&r.name).map_err(|e| format!("route #{}: {e}", index + 1))?;
    let ctx = |e: String| format!("route {name}: {e}");
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
                "match needs exactly one of prefix = \"/api/x\" or path = \"/api/x/{id}\"".into(),
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
    let new_upstream = UpstreamAddr::parse(&r.new).map_err(|e| ctx(e.0))?;
    let flag = r.flag.clone().unwrap_or_else(|| name.default_flag());
    let raw_shadow = r.shadow.unwrap_or_default();
    let shadow_methods = match &raw_shadow.methods {
        None => vec![http::Method::GET, http::Method::HEAD],
        Some(list) => {
            let mut out = Vec::new();
            for m in list {
                out.push(
                    http::Method::from_bytes(m.to_ascii_uppercase().as_bytes())
                        .map_err(|_| ctx(format!("shadow.methods: {m:?} is not an HTTP method")))?,
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
     -> Result<Vec<crate::shadow::compare::PointerPattern>, String> {
        list.iter()
            .flatten()
            .map(|p| {
                crate::shadow::compare::PointerPattern::parse(p)
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
        timeout: Duration::from_millis(raw_shadow.timeout_ms.unwrap_or(DEFAULT_SHADOW_TIMEOUT_MS)),
        max_concurrent: raw_shadow
            .max_concurrent
            .unwrap_or(DEFAULT_SHADOW_MAX_CONCURRENT)
            .max(1),
        rules: crate::shadow::compare::Rules {
            ignore_paths: pointers(&raw_shadow.ignore, "ignore")?,
            ignore_headers: raw_shadow
                .ignore_headers
                .iter()
                .flatten()
                .map(|h| h.to_ascii_lowercase())
                .collect(),
            array_sets: pointers(&raw_shadow.array_sets, "array_sets")?,
        },
        flag: format!("{flag}{SHADOW_FLAG_SUFFIX}"),
    };
    let sticky = match &r.sticky {
        Some(s) => Stickiness::parse(s).map_err(|e| ctx(e.0))?,
        None => Stickiness::Header("x-user-id".into()),
    };
    let pin = match r.pin.as_deref() {
        None => {
            if r.pin_ttl_s.is_some() {
                return Err(ctx("pin_ttl_s needs pin = \"cookie\"".into()));
            }
            None
        }
        Some(raw) => {
            let cookie = match raw.split_once(':') {
                None if raw == "cookie" => format!("strangler_pin_{}", name.as_str()),
                Some(("cookie", c))
                    if !c.is_empty()
                        && c.bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') =>
                {
                    c.to_string()
                }
                _ => {
                    return Err(ctx(format!(
                        "pin = {raw:?}: expected \"cookie\" or \"cookie:NAME\" (letters, digits, '_' and '-')"
                    )));
                }
            };
            let ttl = r.pin_ttl_s.unwrap_or(super::DEFAULT_PIN_TTL_S);
            if ttl == 0 {
                return Err(ctx(
                    "pin_ttl_s = 0: a pin must last at least a second".into()
                ));
            }
            Some(super::Pin {
                cookie,
                ttl: Duration::from_secs(ttl),
            })
        }
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
    let mut idempotent_methods = vec![http::Method::GET, http::Method::HEAD, http::Method::OPTIONS];
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
        Some(percent) => Some(crate::routing::breaker::ErrorRate {
            percent,
            min_requests: r
                .breaker_min_requests
                .unwrap_or(crate::routing::breaker::DEFAULT_RATE_MIN_REQUESTS)
                .max(1),
            window: Duration::from_millis(
                r.breaker_window_ms
                    .unwrap_or(crate::routing::breaker::DEFAULT_RATE_WINDOW_MS)
                    .max(100),
            ),
        }),
    };
    let rollout = match r.rollout {
        Some(raw) => Some(raw.build().map_err(|e| ctx(e.0))?),
        None => None,
    };
    Ok(RouteConfig {
        name,
        path,
        path_text,
        methods,
        header,
        new_upstream,
        new_timeouts: timeouts_of!(r),
        flag,
        sticky,
        pin,
        shadow,
        rollout,
        breaker_failures: r
            .breaker_failures
            .unwrap_or(crate::routing::breaker::DEFAULT_FAILURES)
            .max(1),
        breaker_open: Duration::from_millis(
            r.breaker_open_ms
                .unwrap_or(crate::routing::breaker::DEFAULT_OPEN_MS),
        ),
        breaker_rate,
        health,
        idempotent_methods,
        index,
    })
}

/// Every `[[route]]`, in file order; names are unique.
fn routes(raw: Vec<RawRoute>) -> Result<Vec<RouteConfig>, String> {
    let mut names = HashSet::new();
    let mut routes = Vec::with_capacity(raw.len());
    for (index, r) in raw.into_iter().enumerate() {
        let route = route(index, r)?;
        if !names.insert(route.name.clone()) {
            return Err(format!("route {}: defined twice", route.name));
        }
        routes.push(route);
    }
    Ok(routes)
}

/// `[flags]`: where the flags come from. The Unleash client token is not read
/// here but by [`super::secrets::Secrets::read`] at start-up.
fn flags(raw: &RawFlags, base: &Path) -> Result<FlagsConfig, String> {
    Ok(match raw.source.as_deref().unwrap_or("file") {
        "file" => {
            let file = raw
                .file
                .clone()
                .unwrap_or_else(|| PathBuf::from("flags.json"));
            if raw.url.is_some() {
                return Err("flags.url is only used with flags.source = \"unleash\"".into());
            }
            FlagsConfig::File {
                path: base.join(file),
            }
        }
        "unleash" => {
            let url = raw.url.clone().ok_or(
                "flags.source = \"unleash\" needs flags.url (e.g. http://127.0.0.1:4242/api/)",
            )?;
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(format!(
                    "flags.url {url:?} must start with http:// or https://"
                ));
            }
            let env = raw
                .token_env
                .clone()
                .unwrap_or_else(|| DEFAULT_UNLEASH_TOKEN_ENV.into());
            let interval =
                Duration::from_millis(raw.poll_interval_ms.unwrap_or(DEFAULT_POLL_INTERVAL_MS));
            if interval < Duration::from_millis(100) {
                return Err("flags.poll_interval_ms must be at least 100".into());
            }
            FlagsConfig::Unleash {
                url: if url.ends_with('/') {
                    url
                } else {
                    format!("{url}/")
                },
                token_env: env,
                interval,
                app_name: raw
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
    })
}

/// `[admin]`: where the admin API listens, where its token comes from, and where
/// overrides are kept (default `<config name>.overrides.json` beside the config;
/// `""` keeps none).
fn admin(raw: &RawAdmin, base: &Path, config: &Path) -> Result<AdminConfig, String> {
    let listen = socket(
        raw.listen.as_deref().unwrap_or(DEFAULT_ADMIN_LISTEN),
        "admin.listen",
    )?;
    let token = match (&raw.token_file, &raw.token_env) {
        (Some(file), _) => SecretSource::File(base.join(file)),
        (None, env) => SecretSource::Env(
            env.clone()
                .unwrap_or_else(|| DEFAULT_ADMIN_TOKEN_ENV.into()),
        ),
    };
    let overrides_file = match &raw.overrides_file {
        Some(file) if file.as_os_str().is_empty() => None,
        Some(file) => Some(base.join(file)),
        None => {
            let stem = config
                .file_stem()
                .and_then(|s| s.to_str())
                .unwrap_or("strangler");
            Some(base.join(format!("{stem}.overrides.json")))
        }
    };
    Ok(AdminConfig {
        listen,
        token,
        overrides_file,
    })
}

/// `[telemetry]`.
fn telemetry(raw: RawTelemetry) -> Result<TelemetryConfig, String> {
    let json_logs = match raw.log_format.as_deref().unwrap_or("plain") {
        "plain" => false,
        "json" => true,
        other => {
            return Err(format!(
                "telemetry.log_format = {other:?}: expected \"plain\" or \"json\""
            ));
        }
    };
    let sample_ratio = raw
        .sample_ratio
        .unwrap_or(if raw.metrics_endpoint.is_some() {
            super::DEFAULT_SAMPLE_RATIO
        } else {
            super::DEFAULT_SAMPLE_RATIO_WITHOUT_METRICS
        });
    if !(0.0..=1.0).contains(&sample_ratio) {
        return Err(format!(
            "telemetry.sample_ratio = {sample_ratio}: expected a share between 0.0 and 1.0"
        ));
    }
    if sample_ratio < 1.0 && raw.metrics_endpoint.is_none() && raw.otlp_endpoint.is_some() {
        // Not an error (spans as examples only can be what someone wants), but the
        // collector's counts would then be a sample: say so once, at load.
        tracing::warn!(
            "telemetry.sample_ratio = {sample_ratio} without telemetry.metrics_endpoint: \
             the collector counts requests from spans alone, so its numbers will be a sample"
        );
    }
    Ok(TelemetryConfig {
        sample_ratio,
        slow: std::time::Duration::from_millis(raw.slow_ms.unwrap_or(1_000)),
        mismatch_spans_per_minute: raw.mismatch_spans_per_minute.unwrap_or(60),
        metrics_endpoint: raw.metrics_endpoint,
        metrics_interval: std::time::Duration::from_millis(
            raw.metrics_interval_ms.unwrap_or(10_000).max(100),
        ),
        otlp_endpoint: raw.otlp_endpoint,
        service_name: raw
            .service_name
            .unwrap_or_else(|| "strangler-router".into()),
        json_logs,
        queue_size: raw.queue_size.unwrap_or(8_192),
    })
}

pub(super) fn parse_pattern(p: &str) -> Result<Vec<Segment>, String> {
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
