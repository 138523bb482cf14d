//! Re-copying one table while the stream keeps running (`strangler cdc resnapshot`).
//!
//! The running `strangler cdc run` polls `strangler.cdc_requests` in the target.
//! For a request it applies what it has buffered, creates a temporary slot with
//! an exported snapshot, empties and copies the table inside that snapshot in one
//! target transaction, and from then on skips that table's changes committed at or
//! before the temporary slot's consistent point (they are in the copy). Other
//! tables keep streaming once the copy is done.

use std::time::Duration;

use crate::config::CdcConfig;
use crate::error::CdcError;
use crate::pg::connect;
use crate::sink::postgres::ensure_checkpoint_table;

/// Files a request and waits for the running CDC to finish it; returns the rows copied.
pub async fn request(config: &CdcConfig, table: &str, wait: Duration) -> Result<u64, CdcError> {
    super::refuse(config, "cdc resnapshot")?;
    let target = connect(&config.target, "target").await?;
    ensure_checkpoint_table(&target).await?;
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
