//! The collector's TOML configuration; every key optional, unknown keys rejected.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::pipeline::PipelineConfig;

/// OTLP/gRPC on loopback by default; set `0.0.0.0:4317` to take spans from other hosts.
pub const DEFAULT_GRPC_LISTEN: &str = "127.0.0.1:4317";
/// OTLP/HTTP.
pub const DEFAULT_HTTP_LISTEN: &str = "127.0.0.1:4318";
/// Health, metrics, query API and dashboard.
pub const DEFAULT_WEB_LISTEN: &str = "127.0.0.1:8686";
/// Env var holding the web port's bearer token, unless `web_token_env` names another
/// (the same scheme as the router's admin API).
pub const DEFAULT_WEB_TOKEN_ENV: &str = "STRANGLER_COLLECTOR_TOKEN";
/// ClickHouse's HTTP interface.
pub const DEFAULT_CLICKHOUSE_URL: &str = "http://127.0.0.1:8123";
/// ClickHouse wants few, large inserts (each insert makes a part); 10k spans is a few MB.
pub const DEFAULT_BATCH_SIZE: usize = 10_000;
/// An exporter waits for its acknowledgement at most about this long plus the insert.
pub const DEFAULT_BATCH_TIMEOUT_MS: u64 = 1_000;
/// Exporters block on their acknowledgement, so once exports stop arriving for this
/// long the batch goes: under load they arrive continuously and batches stay large.
pub const DEFAULT_BATCH_LINGER_MS: u64 = 20;
/// About ten full batches: absorbs bursts, bounds memory to roughly 100-200 MB.
pub const DEFAULT_QUEUE_CAPACITY: usize = 100_000;
/// Two inserts overlap network and server time without flooding ClickHouse with parts.
pub const DEFAULT_INSERTS_IN_FLIGHT: usize = 2;
/// Below OTLP exporters' usual 10 s timeout, so a slow insert is spooled before the exporter gives up.
pub const DEFAULT_INSERT_TIMEOUT_MS: u64 = 5_000;
/// 1 GiB of spooled spans: about an hour of a busy router fleet's traffic.
pub const DEFAULT_SPOOL_MAX_BYTES: u64 = 1 << 30;
/// Larger than any sane exporter batch (the OTLP gRPC default limit is 4 MiB).
pub const DEFAULT_MAX_BODY_BYTES: usize = 16 << 20;

/// A configuration error (the one shared by every strangler config file).
pub use strangler_model::ConfigError;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    grpc_listen: Option<SocketAddr>,
    http_listen: Option<SocketAddr>,
    web_listen: Option<SocketAddr>,
    clickhouse_url: Option<String>,
    database: Option<String>,
    user: Option<String>,
    password_env: Option<String>,
    compression: Option<String>,
    batch_size: Option<usize>,
    batch_timeout_ms: Option<u64>,
    batch_linger_ms: Option<u64>,
    queue_capacity: Option<usize>,
    inserts_in_flight: Option<usize>,
    insert_timeout_ms: Option<u64>,
    spool_dir: Option<PathBuf>,
    spool_max_bytes: Option<u64>,
    max_body_bytes: Option<usize>,
    web_token_env: Option<String>,
    web_token_file: Option<PathBuf>,
    cluster: Option<String>,
}

/// A validated collector configuration.
#[derive(Debug, Clone)]
pub struct CollectorConfig {
    /// OTLP/gRPC address.
    pub grpc_listen: SocketAddr,
    /// OTLP/HTTP address.
    pub http_listen: SocketAddr,
    /// Web/query/metrics address.
    pub web_listen: SocketAddr,
    /// ClickHouse HTTP URL.
    pub clickhouse_url: String,
    /// Database name.
    pub database: String,
    /// ClickHouse user.
    pub user: Option<String>,
    /// ClickHouse password (from the env var `password_env` names).
    pub password: Option<String>,
    /// LZ4-compress inserts (worth it over a network, wasted CPU on one machine).
    pub compress: bool,
    /// Batching and queue.
    pub pipeline: PipelineConfig,
    /// Spool directory.
    pub spool_dir: PathBuf,
    /// Spool size limit.
    pub spool_max_bytes: u64,
    /// Request body limit.
    pub max_body_bytes: usize,
    /// Bearer token for the web port's API and metrics; required unless it is on loopback.
    pub web_token: Option<String>,
    /// The ClickHouse cluster (a `remote_servers` name) to create the schema on:
    /// replicated local tables on every server, distributed tables over them.
    pub cluster: Option<String>,
}

impl CollectorConfig {
    /// Defaults, or a file's values over them.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let (raw, base, shown) = match path {
            None => (
                Raw::default(),
                PathBuf::from("."),
                PathBuf::from("(defaults)"),
            ),
            Some(path) => {
                let text = ConfigError::read(path)?;
                let raw: Raw = ConfigError::parse_toml(&text, path)?;
                (
                    raw,
                    path.parent().unwrap_or(Path::new(".")).to_path_buf(),
                    path.to_path_buf(),
                )
            }
        };
        let invalid = |message: String| ConfigError::Invalid {
            path: shown.clone(),
            message,
        };
        let parse = |s: &str| s.parse::<SocketAddr>().map_err(|e| invalid(e.to_string()));
        let database = raw.database.unwrap_or_else(|| "strangler".into());
        if database.is_empty()
            || !database
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_')
        {
            return Err(invalid(format!(
                "database {database:?} must be letters, digits and _"
            )));
        }
        let pipeline = PipelineConfig {
            batch_size: raw.batch_size.unwrap_or(DEFAULT_BATCH_SIZE).max(1),
            batch_timeout: Duration::from_millis(
                raw.batch_timeout_ms.unwrap_or(DEFAULT_BATCH_TIMEOUT_MS),
            ),
            batch_linger: Duration::from_millis(
                raw.batch_linger_ms.unwrap_or(DEFAULT_BATCH_LINGER_MS),
            ),
            queue_capacity: raw.queue_capacity.unwrap_or(DEFAULT_QUEUE_CAPACITY).max(1),
            inserts_in_flight: raw
                .inserts_in_flight
                .unwrap_or(DEFAULT_INSERTS_IN_FLIGHT)
                .max(1),
            insert_timeout: Duration::from_millis(
                raw.insert_timeout_ms.unwrap_or(DEFAULT_INSERT_TIMEOUT_MS),
            ),
        };
        let password = match raw.password_env {
            Some(env) => Some(
                std::env::var(&env)
                    .map_err(|_| invalid(format!("password_env {env} is not set")))?,
            ),
            None => None,
        };
        let compress = match raw.compression.as_deref().unwrap_or("lz4") {
            "lz4" => true,
            "none" => false,
            other => {
                return Err(invalid(format!(
                    "compression = {other:?}: expected \"lz4\" or \"none\""
                )));
            }
        };
        let web_listen = raw
            .web_listen
            .map_or_else(|| parse(DEFAULT_WEB_LISTEN), Ok)?;
        let web_token = match (&raw.web_token_file, &raw.web_token_env) {
            (Some(_), Some(_)) => {
                return Err(invalid(
                    "set web_token_file or web_token_env, not both".into(),
                ));
            }
            (Some(file), None) => {
                let file = base.join(file);
                let text = std::fs::read_to_string(&file)
                    .map_err(|e| invalid(format!("web_token_file {}: {e}", file.display())))?;
                let token = text.trim().to_string();
                if token.is_empty() {
                    return Err(invalid(format!(
                        "web_token_file {} is empty",
                        file.display()
                    )));
                }
                Some(token)
            }
            (None, env) => {
                let env = env.as_deref().unwrap_or(DEFAULT_WEB_TOKEN_ENV);
                std::env::var(env).ok().filter(|t| !t.trim().is_empty())
            }
        };
        if web_token.is_none() && !web_listen.ip().is_loopback() {
            return Err(invalid(format!(
                "web_listen = {web_listen} is not a loopback address and no token is set \
                 (set {DEFAULT_WEB_TOKEN_ENV} or web_token_file); refusing to expose the trace data unauthenticated"
            )));
        }
        let cluster = match raw.cluster {
            Some(c)
                if c.is_empty() || !c.chars().all(|ch| ch.is_ascii_alphanumeric() || ch == '_') =>
            {
                return Err(invalid(format!(
                    "cluster {c:?} must be a remote_servers name: letters, digits and _"
                )));
            }
            other => other,
        };
        Ok(Self {
            web_token,
            compress,
            cluster,
            grpc_listen: raw
                .grpc_listen
                .map_or_else(|| parse(DEFAULT_GRPC_LISTEN), Ok)?,
            http_listen: raw
                .http_listen
                .map_or_else(|| parse(DEFAULT_HTTP_LISTEN), Ok)?,
            web_listen,
            clickhouse_url: raw
                .clickhouse_url
                .unwrap_or_else(|| DEFAULT_CLICKHOUSE_URL.into()),
            database,
            user: raw.user,
            password,
            pipeline,
            spool_dir: base.join(
                raw.spool_dir
                    .unwrap_or_else(|| PathBuf::from("strangler-spool")),
            ),
            spool_max_bytes: raw.spool_max_bytes.unwrap_or(DEFAULT_SPOOL_MAX_BYTES),
            max_body_bytes: raw.max_body_bytes.unwrap_or(DEFAULT_MAX_BODY_BYTES),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<CollectorConfig, ConfigError> {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("collector.toml");
        std::fs::write(&path, text).expect("write");
        std::fs::write(dir.path().join("token"), "s3cret\n").expect("write");
        CollectorConfig::load(Some(&path))
    }

    #[test]
    fn a_web_port_off_loopback_needs_a_token() {
        let e =
            load("web_listen = \"0.0.0.0:8686\"\nweb_token_env = \"STRANGLER_TEST_UNSET_TOKEN\"\n")
                .expect_err("refused");
        assert!(e.to_string().contains("no token is set"), "{e}");
        let c = load("web_listen = \"0.0.0.0:8686\"\nweb_token_file = \"token\"\n").expect("loads");
        assert_eq!(c.web_token.as_deref(), Some("s3cret"));
        let c = load("").expect("loads");
        assert!(c.web_listen.ip().is_loopback());
    }

    #[test]
    fn unknown_keys_are_refused_with_their_line() {
        let e = load("batch_size = 10\nwebb_listen = \"x\"\n").expect_err("refused");
        assert!(e.to_string().contains(":2:1: "), "{e}");
    }
}
