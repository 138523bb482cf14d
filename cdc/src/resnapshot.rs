//! Re-copying one table while the stream keeps running (`strangler cdc resnapshot`).
//!
//! The running `strangler cdc run` polls `strangler.cdc_requests` in the target.
//! For a request it applies what it has buffered, creates a temporary slot with
//! an exported snapshot, empties and copies the table inside that snapshot in one
//! target transaction, and from then on skips that table's changes committed at or
//! before the temporary slot's consistent point (they are in the copy). Other
//! tables keep streaming once the copy is done.

use std::time::Duration;

use pg_walstream::{LogicalReplicationStream, ReplicationSlotOptions, ReplicationStreamConfig};
use tokio_postgres::Client;

use crate::config::CdcConfig;
use crate::lsn::Lsn;
use crate::plan::{TablePlan, split_name};
use crate::run::CdcError;

/// The request table's DDL.
pub const REQUESTS_DDL: &str = "CREATE TABLE IF NOT EXISTS strangler.cdc_requests (
    id bigserial PRIMARY KEY, slot text NOT NULL, target_table text NOT NULL,
    requested_at timestamptz NOT NULL DEFAULT now(), done_at timestamptz, rows bigint, error text)";

/// The oldest open request for `slot`: (id, plan index if mapped, table name).
pub(crate) async fn next_request(
    control: &Client,
    slot: &str,
    plans: &[TablePlan],
) -> Option<(i64, Option<usize>, String)> {
    let row = control
        .query_opt(
            "SELECT id, target_table FROM strangler.cdc_requests WHERE slot = $1 AND done_at IS NULL ORDER BY id LIMIT 1",
            &[&slot],
        )
        .await
        .ok()
        .flatten()?;
    let name: String = row.get(1);
    let (schema, table) = split_name(&name);
    let index = plans
        .iter()
        .position(|p| p.target.schema == schema && p.target.name == table);
    Some((row.get(0), index, name))
}

/// Records how a request ended.
pub(crate) async fn finish_request(control: &Client, id: i64, outcome: &Result<u64, CdcError>) {
    let (rows, error) = match outcome {
        Ok(rows) => (Some(i64::try_from(*rows).unwrap_or(i64::MAX)), None),
        Err(e) => (None, Some(e.to_string())),
    };
    if let Err(e) = control
        .execute(
            "UPDATE strangler.cdc_requests SET done_at = now(), rows = $2, error = $3 WHERE id = $1",
            &[&id, &rows, &error],
        )
        .await
    {
        tracing::warn!("cannot record the re-snapshot outcome: {e}");
    }
}

/// Copies `plan`'s table in a fresh exported snapshot; returns the rows and the
/// snapshot's position.
pub(crate) async fn copy_while_streaming(
    config: &CdcConfig,
    plan: &TablePlan,
) -> Result<(u64, Lsn), CdcError> {
    let source = crate::run::connect(&config.source, "source").await?;
    let slot = format!("{}_resnap_{}", config.slot, std::process::id());
    let stream_config = ReplicationStreamConfig::builder(&slot, &config.publication)
        .with_protocol_version(1)
        .with_slot_options(ReplicationSlotOptions {
            temporary: true,
            snapshot: Some("export".into()),
            ..ReplicationSlotOptions::default()
        });
    // Temporary: it disappears with this connection, whatever happens below.
    let mut stream =
        LogicalReplicationStream::new(&crate::run::replication_url(&config.source), stream_config)
            .await?;
    stream.ensure_replication_slot().await?;
    let snapshot = stream
        .exported_snapshot_name()
        .map(str::to_string)
        .ok_or_else(|| CdcError::Snapshot {
            table: plan.target.quoted(),
            message: "the source exported no snapshot".into(),
        })?;
    let at = crate::run::slot_position(&source, &slot)
        .await?
        .ok_or_else(|| CdcError::Snapshot {
            table: plan.target.quoted(),
            message: format!("temporary slot {slot} vanished"),
        })?;
    let rows = crate::run::copy_whole_table(config, plan, &snapshot).await?;
    drop(stream);
    Ok((rows, at))
}

/// Files a request and waits for the running CDC to finish it; returns the rows copied.
pub async fn request(config: &CdcConfig, table: &str, wait: Duration) -> Result<u64, CdcError> {
    crate::mysql::refuse(config, "cdc resnapshot")?;
    let target = crate::run::connect(&config.target, "target").await?;
    crate::apply::ensure_checkpoint_table(&target).await?;
    let id: i64 = target
        .query_one(
            "INSERT INTO strangler.cdc_requests (slot, target_table) VALUES ($1, $2) RETURNING id",
            &[&config.slot, &table],
        )
        .await
        .map_err(CdcError::Source)?
        .get(0);
    let deadline = std::time::Instant::now() + wait;
    loop {
        let row = target
            .query_one(
                "SELECT done_at IS NOT NULL, rows, error FROM strangler.cdc_requests WHERE id = $1",
                &[&id],
            )
            .await
            .map_err(CdcError::Source)?;
        if row.get::<_, bool>(0) {
            return match row.get::<_, Option<String>>(2) {
                Some(error) => Err(CdcError::Snapshot {
                    table: table.to_string(),
                    message: error,
                }),
                None => Ok(u64::try_from(row.get::<_, Option<i64>>(1).unwrap_or(0)).unwrap_or(0)),
            };
        }
        if std::time::Instant::now() >= deadline {
            return Err(CdcError::Snapshot {
                table: table.to_string(),
                message: format!(
                    "request {id} is still waiting; is `strangler cdc run` running for slot {}? (it stays queued)",
                    config.slot
                ),
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
