//! The config file as written: serde types that mirror the TOML, unknown keys
//! refused. Validation turns them into the types of [`super`].

use std::path::PathBuf;

use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    #[serde(default)]
    pub(super) server: RawServer,
    pub(super) legacy: RawUpstream,
    #[serde(default)]
    pub(super) flags: RawFlags,
    #[serde(default)]
    pub(super) admin: RawAdmin,
    #[serde(default)]
    pub(super) telemetry: RawTelemetry,
    #[serde(default)]
    pub(super) control: strangler_model::control::RawControl,
    #[serde(default, rename = "route")]
    pub(super) routes: Vec<RawRoute>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawServer {
    pub(super) listen: Option<String>,
    pub(super) threads: Option<usize>,
    pub(super) trusted_proxies: Option<Vec<String>>,
    pub(super) trusted_testers: Option<Vec<String>>,
    pub(super) max_uri_bytes: Option<usize>,
    pub(super) max_headers: Option<usize>,
    pub(super) max_header_bytes: Option<usize>,
    pub(super) max_body_bytes: Option<u64>,
    pub(super) header_timeout_ms: Option<u64>,
    pub(super) body_timeout_ms: Option<u64>,
    pub(super) drain_ms: Option<u64>,
    pub(super) connect_retries: Option<u32>,
    pub(super) retry_backoff_ms: Option<u64>,
    pub(super) tls_cert: Option<PathBuf>,
    pub(super) tls_key: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawUpstream {
    pub(super) upstream: String,
    pub(super) connect_timeout_ms: Option<u64>,
    pub(super) read_timeout_ms: Option<u64>,
    pub(super) write_timeout_ms: Option<u64>,
    pub(super) idle_timeout_ms: Option<u64>,
    pub(super) total_timeout_ms: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawFlags {
    pub(super) source: Option<String>,
    pub(super) file: Option<PathBuf>,
    pub(super) url: Option<String>,
    pub(super) token_env: Option<String>,
    pub(super) poll_interval_ms: Option<u64>,
    pub(super) app_name: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAdmin {
    pub(super) listen: Option<String>,
    pub(super) token_env: Option<String>,
    pub(super) token_file: Option<PathBuf>,
    pub(super) overrides_file: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTelemetry {
    pub(super) otlp_endpoint: Option<String>,
    pub(super) service_name: Option<String>,
    pub(super) log_format: Option<String>,
    pub(super) queue_size: Option<usize>,
    pub(super) sample_ratio: Option<f64>,
    pub(super) slow_ms: Option<u64>,
    pub(super) mismatch_spans_per_minute: Option<u32>,
    pub(super) metrics_endpoint: Option<String>,
    pub(super) metrics_interval_ms: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRoute {
    pub(super) name: String,
    #[serde(rename = "match")]
    pub(super) matcher: RawMatch,
    pub(super) new: String,
    pub(super) flag: Option<String>,
    pub(super) sticky: Option<String>,
    pub(super) pin: Option<String>,
    pub(super) pin_ttl_s: Option<u64>,
    pub(super) shadow: Option<RawShadow>,
    pub(super) breaker_failures: Option<u32>,
    pub(super) breaker_open_ms: Option<u64>,
    pub(super) breaker_error_rate: Option<u8>,
    pub(super) breaker_min_requests: Option<u32>,
    pub(super) breaker_window_ms: Option<u64>,
    pub(super) health_path: Option<String>,
    pub(super) health_interval_ms: Option<u64>,
    pub(super) health_failures: Option<u32>,
    pub(super) idempotent_methods: Option<Vec<String>>,
    pub(super) connect_timeout_ms: Option<u64>,
    pub(super) read_timeout_ms: Option<u64>,
    pub(super) write_timeout_ms: Option<u64>,
    pub(super) idle_timeout_ms: Option<u64>,
    pub(super) total_timeout_ms: Option<u64>,
    pub(super) rollout: Option<strangler_model::rollout::RawRollout>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawShadow {
    pub(super) percent: Option<u8>,
    pub(super) methods: Option<Vec<String>>,
    pub(super) max_body_bytes: Option<usize>,
    pub(super) timeout_ms: Option<u64>,
    pub(super) max_concurrent: Option<usize>,
    pub(super) ignore: Option<Vec<String>>,
    pub(super) ignore_headers: Option<Vec<String>>,
    pub(super) array_sets: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawMatch {
    pub(super) prefix: Option<String>,
    pub(super) path: Option<String>,
    #[serde(default)]
    pub(super) methods: Vec<String>,
    pub(super) header: Option<String>,
    pub(super) header_value: Option<String>,
}
