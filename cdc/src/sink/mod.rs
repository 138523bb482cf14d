//! Where changes are written: the seam between the pipeline and a target
//! database. A sink applies a [`Batch`] and its checkpoint in one target
//! transaction, owns that checkpoint, and loads a snapshot when it can. A new
//! target database is a new folder here, implementing [`Sink`].

pub mod mysql;
pub mod postgres;
pub mod settle;

use async_trait::async_trait;

use tokio_postgres::Client;

use crate::batch::Batch;
use crate::config::{CdcConfig, Kind};
use crate::error::{ApplyError, CdcError};
use crate::model::{Applied, Lsn};
use crate::pg::connect;
use crate::plan::TablePlan;

/// A target database.
#[async_trait]
pub trait Sink: Send {
    /// Applies the batch and the checkpoint in one transaction; returns rows written.
    async fn apply(
        &mut self,
        batch: &mut Batch,
        plans: &[TablePlan],
        slot: &str,
    ) -> Result<Applied, ApplyError>;
    /// The position applied for `slot`, if any, and the GTID state kept with it.
    async fn read_checkpoint(
        &mut self,
        slot: &str,
    ) -> Result<Option<(Lsn, Option<String>)>, ApplyError>;
    /// Records `lsn` (and a GTID state) for `slot` on its own: a snapshot's
    /// consistent point, a stream starting without a snapshot.
    async fn write_checkpoint(
        &mut self,
        slot: &str,
        lsn: Lsn,
        gtid: Option<&str>,
    ) -> Result<(), ApplyError>;
    /// Forgets `slot`'s checkpoint (`--resnapshot`).
    async fn forget_checkpoint(&mut self, slot: &str) -> Result<(), ApplyError>;
    /// Whether a source transaction may be applied in parts ([`Batch::open`]) that
    /// commit together: the applier then starts on a large transaction before its
    /// end arrives.
    fn applies_parts(&self) -> bool {
        false
    }
    /// Empties the plans' target tables and sets their keys, indexes and foreign
    /// keys aside (recorded first, so a crash restores them) for a snapshot load.
    async fn begin_snapshot(&mut self, slot: &str, plans: &[TablePlan]) -> Result<(), CdcError> {
        let _ = (slot, plans);
        Err(CdcError::Unsupported(
            "this target does not take a snapshot: set [apply] snapshot = false (its tables must already hold the data)".into(),
        ))
    }
    /// Builds back what [`Sink::begin_snapshot`] set aside.
    async fn end_snapshot(&mut self, slot: &str) -> Result<(), CdcError> {
        let _ = slot;
        Ok(())
    }
}

/// The target as a sink, and the plans checked against `source` (a PostgreSQL
/// source) and the target: PostgreSQL, or MySQL/MariaDB for the reverse direction
/// (stream only: its tables already hold the data).
pub async fn open(
    config: &CdcConfig,
    source: &Client,
) -> Result<(Box<dyn Sink>, Vec<TablePlan>), CdcError> {
    if config.target_kind == Kind::MySql {
        if config.snapshot {
            return Err(CdcError::Unsupported(
                "a MySQL/MariaDB target is for the reverse direction (new → legacy), whose tables already hold the data: \
                 set [apply] snapshot = false"
                    .into(),
            ));
        }
        let (sink, plans) = mysql::MySqlSink::connect(config, source).await?;
        return Ok((Box::new(sink), plans));
    }
    let target = connect(&config.target, "target").await?;
    // A snapshot killed half-way left keys, indexes and foreign keys set aside: they
    // come back before anything else (the mappings are checked against the keys).
    let restored = postgres::deferred::restore(&target, &config.slot).await?;
    if restored != postgres::deferred::Deferred::default() {
        tracing::info!(
            keys = restored.keys,
            indexes = restored.indexes,
            foreign_keys = restored.foreign_keys,
            "restored what an interrupted snapshot had set aside"
        );
    }
    let mut plans = Vec::new();
    for (m, policy) in config.mappings.iter().zip(&config.conflicts) {
        plans.push(
            crate::plan::check(m, source, &target)
                .await?
                .with_conflict(Some(policy))?,
        );
    }
    postgres::tag_origin(&target, &config.origin).await?;
    postgres::ensure_checkpoint_table(&target).await?;
    Ok((Box::new(postgres::PgSink::new(target)), plans))
}
