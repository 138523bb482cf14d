//! Operations on a configured stream, beside running it: checking the mappings,
//! where replication stands, verifying source against target, re-copying a table.

pub mod resnapshot;
pub mod verify;
pub mod verify_mysql;

use crate::config::{CdcConfig, Kind};
use crate::error::CdcError;
use crate::model::Lsn;
use crate::pg::connect;
use crate::plan::TablePlan;
use crate::sink::postgres::CHECKPOINT_TABLE;

/// Checks every mapping against both databases without moving a row.
pub async fn check(config: &CdcConfig) -> Result<Vec<TablePlan>, CdcError> {
    if config.source_kind == Kind::MySql {
        return crate::source::mysql::check(config).await;
    }
    let source = connect(&config.source, "source").await?;
    if config.target_kind == Kind::MySql {
        return Ok(crate::sink::mysql::MySqlSink::connect(config, &source)
            .await?
            .1);
    }
    let target = connect(&config.target, "target").await?;
    let mut plans = Vec::new();
    for m in &config.mappings {
        plans.push(crate::plan::check(m, &source, &target).await?);
    }
    Ok(plans)
}

/// Refuses `command` for a MySQL source with a clear message (it reads PostgreSQL
/// catalogs or replication slots on the source).
pub fn refuse(config: &CdcConfig, command: &str) -> Result<(), CdcError> {
    if config.source_kind == Kind::MySql {
        return Err(CdcError::Unsupported(format!(
            "`strangler {command}` needs a PostgreSQL source; for a MySQL/MariaDB source use `strangler cdc run --resnapshot` \
             to copy again and `strangler cdc verify` to compare"
        )));
    }
    Ok(())
}

/// Where replication stands, for `strangler cdc status`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Status {
    /// The slot.
    pub slot: String,
    /// Whether the slot exists.
    pub slot_exists: bool,
    /// A walsender is streaming from it.
    pub slot_active: bool,
    /// The source's current WAL position.
    pub source_lsn: String,
    /// Position the slot has confirmed (the source may recycle WAL before it).
    pub confirmed_lsn: Option<String>,
    /// Position applied in the target (its checkpoint).
    pub applied_lsn: Option<String>,
    /// Bytes of source WAL not yet applied.
    pub lag_bytes: Option<u64>,
    /// Bytes of WAL the source retains for the slot.
    pub retained_bytes: Option<u64>,
    /// Seconds since the target's checkpoint last moved.
    pub checkpoint_age_seconds: Option<f64>,
}

/// Reads the slot on the source and the checkpoint on the target.
pub async fn status(config: &CdcConfig) -> Result<Status, CdcError> {
    refuse(config, "cdc status")?;
    let source = connect(&config.source, "source").await?;
    let target = connect(&config.target, "target").await?;
    let current: String = source
        .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
        .await
        .map_err(CdcError::Source)?
        .get(0);
    let current_lsn: Lsn = current.parse().unwrap_or_default();
    let slot = source
        .query_opt(
            "SELECT active, confirmed_flush_lsn::text, restart_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
            &[&config.slot],
        )
        .await
        .map_err(CdcError::Source)?;
    let checkpoint = target
        .query_opt(
            &format!(
                "SELECT lsn::text, extract(epoch FROM now() - updated_at)::float8 FROM {} WHERE slot = $1",
                CHECKPOINT_TABLE
            ),
            &[&config.slot],
        )
        .await
        .ok()
        .flatten();
    let applied: Option<Lsn> = checkpoint
        .as_ref()
        .and_then(|r| r.get::<_, String>(0).parse().ok());
    let restart: Option<Lsn> = slot
        .as_ref()
        .and_then(|r| r.get::<_, Option<String>>(2))
        .and_then(|s| s.parse().ok());
    Ok(Status {
        slot: config.slot.clone(),
        slot_exists: slot.is_some(),
        slot_active: slot.as_ref().is_some_and(|r| r.get::<_, bool>(0)),
        source_lsn: current,
        confirmed_lsn: slot.as_ref().and_then(|r| r.get::<_, Option<String>>(1)),
        applied_lsn: applied.map(|l| l.to_string()),
        lag_bytes: applied.map(|a| current_lsn.bytes_since(a)),
        retained_bytes: restart.map(|r| current_lsn.bytes_since(r)),
        checkpoint_age_seconds: checkpoint.as_ref().map(|r| r.get::<_, f64>(1)),
    })
}
