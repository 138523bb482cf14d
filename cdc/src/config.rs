//! `cdc.toml`: where to read, where to write, and the mappings.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::mapping::Mapping;

/// Why a config could not be used (the error every strangler config shares).
pub use strangler_model::ConfigError;

/// Default replication slot and publication name.
pub const DEFAULT_NAME: &str = "strangler_cdc";
/// Rows per applied batch (whole transactions are never split; a batch closes at
/// the first commit past this).
pub const DEFAULT_BATCH_ROWS: usize = 5_000;
/// Longest a received commit waits to be applied: bounds the lag added by batching.
pub const DEFAULT_BATCH_MS: u64 = 20;
/// Tables above this many rows are copied in page ranges.
pub const DEFAULT_SPLIT_ROWS: i64 = 200_000;
/// Heartbeat interval on an idle source.
pub const DEFAULT_HEARTBEAT_MS: u64 = 10_000;
/// Tables copied at once during the snapshot.
pub const DEFAULT_SNAPSHOT_PARALLELISM: usize = 4;

/// Which database an endpoint is, decided once from its URL: `mysql://` and
/// `mariadb://` are MySQL/MariaDB, anything else PostgreSQL (`postgres://`,
/// `postgresql://` or a libpq key/value string).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// PostgreSQL.
    Postgres,
    /// MySQL or MariaDB.
    MySql,
}

impl Kind {
    /// The kind `url` names.
    pub fn of(url: &str) -> Self {
        if url.starts_with("mysql://") || url.starts_with("mariadb://") {
            Kind::MySql
        } else {
            Kind::Postgres
        }
    }
}

/// A validated CDC configuration.
#[derive(Debug, Clone)]
pub struct CdcConfig {
    /// The file it came from.
    pub path: PathBuf,
    /// Source (legacy) connection URL.
    pub source: String,
    /// The source's kind of database, from its URL's scheme.
    pub source_kind: Kind,
    /// Target (new) connection URL.
    pub target: String,
    /// The target's kind of database, from its URL's scheme.
    pub target_kind: Kind,
    /// Replication slot on the source.
    pub slot: String,
    /// Publication on the source (created for the mapped tables when missing).
    pub publication: String,
    /// Rows per batch.
    pub batch_rows: usize,
    /// Batch linger.
    pub batch_linger: Duration,
    /// Tables copied in parallel.
    pub snapshot_parallelism: usize,
    /// Tables estimated above this many rows are copied as `snapshot_parallelism`
    /// ranges of their pages in parallel.
    pub split_rows: i64,
    /// With no commit of ours for this long, a heartbeat is written on the source so
    /// the slot (and the checkpoint) move past unrelated WAL.
    pub heartbeat: Duration,
    /// The mappings, one per target table.
    pub mappings: Vec<Mapping>,
    /// Copy the mapped tables before streaming (off for a reverse direction whose
    /// target already holds the data).
    pub snapshot: bool,
    /// Replication origin the applying session tags its transactions with.
    pub origin: String,
    /// Transactions whose origin starts with this are not applied (they were
    /// written by strangler's other direction); empty applies everything.
    pub ignore_origin_prefix: String,
    /// MySQL/MariaDB source: binlog events written under these server ids are not
    /// applied (a reverse stream's MySQL sink writes under its own id).
    pub ignore_server_ids: Vec<u32>,
    /// MySQL/MariaDB target: the session's `server_id` (default: derived from `origin`).
    pub target_server_id: Option<u32>,
    /// Each mapping's conflict policy (same order as `mappings`).
    pub conflicts: Vec<crate::conflict::Policy>,
    /// Where `/metrics` is served (off when unset).
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// OTLP/gRPC endpoint for one span per applied batch (off when unset).
    pub otlp_endpoint: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    source: RawSource,
    target: RawTarget,
    #[serde(default)]
    apply: RawApply,
    #[serde(default, rename = "map")]
    maps: Vec<RawMap>,
    #[serde(default)]
    observe: RawObserve,
    conflicts: Option<RawConflicts>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConflicts {
    route: String,
    history: Option<String>,
    history_file: Option<PathBuf>,
    legacy: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawObserve {
    metrics_listen: Option<String>,
    otlp_endpoint: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSource {
    url: String,
    slot: Option<String>,
    publication: Option<String>,
    ignore_origin_prefix: Option<String>,
    #[serde(default)]
    ignore_server_ids: Vec<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTarget {
    url: String,
    origin: Option<String>,
    server_id: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawApply {
    batch_rows: Option<usize>,
    batch_ms: Option<u64>,
    snapshot_parallelism: Option<usize>,
    heartbeat_ms: Option<u64>,
    split_rows: Option<i64>,
    snapshot: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMap {
    target: String,
    conflict: Option<String>,
    sql: Option<String>,
    sql_file: Option<PathBuf>,
}

impl CdcConfig {
    /// Reads and validates a config file, mappings included.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        Self::parse(&ConfigError::read(path)?, path)
    }

    /// Validates config text; `path` names it in errors and anchors relative paths.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let raw: Raw = ConfigError::parse_toml(text, path)?;
        let invalid = |message: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            message,
        };
        let name_ok = |n: &str| {
            !n.is_empty()
                && n.len() <= 63
                && n.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        };
        let slot = raw.source.slot.unwrap_or_else(|| DEFAULT_NAME.into());
        let publication = raw
            .source
            .publication
            .unwrap_or_else(|| DEFAULT_NAME.into());
        for (what, n) in [("source.slot", &slot), ("source.publication", &publication)] {
            if !name_ok(n) {
                return Err(invalid(format!(
                    "{what} = {n:?}: lower-case letters, digits and _ only, at most 63"
                )));
            }
        }
        if raw.maps.is_empty() {
            return Err(invalid(
                "no [[map]] sections: add one per target table, e.g.\n[[map]]\ntarget = \"orders\"\nsql = \"SELECT id, total_cents FROM orders\"".into(),
            ));
        }
        let metrics_listen = match &raw.observe.metrics_listen {
            Some(a) => Some(a.parse().map_err(|_| {
                invalid(format!(
                    "observe.metrics_listen = {a:?} must be an IP:port such as 127.0.0.1:9187"
                ))
            })?),
            None => None,
        };
        let base = path.parent().unwrap_or(Path::new("."));
        let owner = match &raw.conflicts {
            None => None,
            Some(c) => Some(std::sync::Arc::new(crate::conflict::Owner::new(
                c.route.clone(),
                match (&c.history, &c.history_file) {
                    (Some(text), None) => strangler_model::Location::parse(text, base)
                        .map_err(|e| invalid(format!("conflicts.{}", e.0)))?,
                    (None, Some(file)) => strangler_model::Location::File(base.join(file)),
                    _ => {
                        return Err(invalid(
                            "conflicts: set history (the routers' [control] history: a file or postgres:// URL) or history_file, one of them".to_string(),
                        ));
                    }
                },
                match c.legacy.as_str() {
                    "source" => true,
                    "target" => false,
                    other => {
                        return Err(invalid(format!(
                            "conflicts.legacy = {other:?}: \"source\" or \"target\" (which side of this stream is the legacy database)"
                        )));
                    }
                },
            ))),
        };
        let mut mappings: Vec<Mapping> = Vec::new();
        let mut conflicts = Vec::new();
        for m in raw.maps {
            conflicts.push(
                crate::conflict::Policy::parse(
                    m.conflict.as_deref().unwrap_or("off"),
                    owner.as_ref(),
                )
                .map_err(|e| invalid(format!("map {}: {e}", m.target)))?,
            );
            let sql = match (m.sql, m.sql_file) {
                (Some(sql), None) => sql,
                (None, Some(file)) => {
                    let file = base.join(file);
                    std::fs::read_to_string(&file).map_err(|source| ConfigError::Read {
                        path: file.clone(),
                        source,
                    })?
                }
                _ => {
                    return Err(invalid(format!(
                        "map {}: give exactly one of sql or sql_file",
                        m.target
                    )));
                }
            };
            let mapping = Mapping::parse(&m.target, &sql).map_err(|source| ConfigError::Part {
                path: path.to_path_buf(),
                source: Box::new(source),
            })?;
            if mappings.iter().any(|o| o.target == mapping.target) {
                return Err(invalid(format!("two mappings write {}", mapping.target)));
            }
            if mappings.iter().any(|o| {
                o.source_schema == mapping.source_schema && o.source_table == mapping.source_table
            }) {
                return Err(invalid(format!(
                    "{}.{} is mapped twice; one source table feeds one target table",
                    mapping.source_schema, mapping.source_table
                )));
            }
            mappings.push(mapping);
        }
        let origin = raw
            .target
            .origin
            .clone()
            .unwrap_or_else(|| format!("strangler_{slot}"));
        Ok(Self {
            path: path.to_path_buf(),
            source_kind: Kind::of(&raw.source.url),
            source: raw.source.url,
            target_kind: Kind::of(&raw.target.url),
            target: raw.target.url,
            slot,
            publication,
            batch_rows: raw.apply.batch_rows.unwrap_or(DEFAULT_BATCH_ROWS).max(1),
            batch_linger: Duration::from_millis(raw.apply.batch_ms.unwrap_or(DEFAULT_BATCH_MS)),
            snapshot_parallelism: raw
                .apply
                .snapshot_parallelism
                .unwrap_or(DEFAULT_SNAPSHOT_PARALLELISM)
                .clamp(1, 64),
            split_rows: raw.apply.split_rows.unwrap_or(DEFAULT_SPLIT_ROWS).max(1),
            heartbeat: Duration::from_millis(
                raw.apply
                    .heartbeat_ms
                    .unwrap_or(DEFAULT_HEARTBEAT_MS)
                    .max(100),
            ),
            mappings,
            snapshot: raw.apply.snapshot.unwrap_or(true),
            origin,
            ignore_origin_prefix: raw
                .source
                .ignore_origin_prefix
                .unwrap_or_else(|| "strangler_".into()),
            metrics_listen,
            otlp_endpoint: raw.observe.otlp_endpoint,
            ignore_server_ids: raw.source.ignore_server_ids,
            conflicts,
            target_server_id: raw.target.server_id,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "[source]\nurl = \"postgres://a@127.0.0.1/legacy\"\n[target]\nurl = \"postgres://a@127.0.0.1/new\"\n\n[[map]]\ntarget = \"orders\"\nsql = \"SELECT id, total_cents / 100.0 AS total FROM orders WHERE status <> 'draft'\"\n";

    #[test]
    fn endpoints_are_told_apart_by_their_scheme() {
        assert_eq!(Kind::of("mysql://u@h/db"), Kind::MySql);
        assert_eq!(Kind::of("mariadb://u@h/db"), Kind::MySql);
        assert_eq!(Kind::of("postgres://u@h/db"), Kind::Postgres);
        assert_eq!(Kind::of("host=127.0.0.1 dbname=x"), Kind::Postgres);
    }

    #[test]
    fn a_minimal_config_gets_defaults() {
        let c = CdcConfig::parse(GOOD, Path::new("cdc.toml")).expect("valid");
        assert_eq!(c.slot, DEFAULT_NAME);
        assert_eq!(c.batch_rows, DEFAULT_BATCH_ROWS);
        assert_eq!(c.mappings[0].source_table, "orders");
    }

    #[test]
    fn bad_configs_say_where_and_what() {
        let e = CdcConfig::parse(
            &GOOD.replace("[target]", "[target]\nbogus = 1"),
            Path::new("c.toml"),
        )
        .expect_err("unknown key");
        assert!(e.to_string().starts_with("c.toml:4:"), "{e}");
        let e = CdcConfig::parse(
            &GOOD.replace("total_cents / 100.0", "random()"),
            Path::new("c.toml"),
        )
        .expect_err("bad mapping");
        assert!(
            e.to_string().contains("function random() is not supported"),
            "{e}"
        );
        let e = CdcConfig::parse(
            &format!("{GOOD}\n[[map]]\ntarget = \"orders\"\nsql = \"SELECT id FROM x\"\n"),
            Path::new("c.toml"),
        )
        .expect_err("twice");
        assert!(e.to_string().contains("two mappings write orders"), "{e}");
        let e = CdcConfig::parse(
            &GOOD.replace(
                "url = \"postgres://a@127.0.0.1/legacy\"",
                "url = \"x\"\nslot = \"Bad-Name\"",
            ),
            Path::new("c.toml"),
        )
        .expect_err("slot");
        assert!(e.to_string().contains("source.slot"), "{e}");
    }
}
