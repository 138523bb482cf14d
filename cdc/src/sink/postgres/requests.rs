//! Re-snapshot requests (`strangler cdc resnapshot`) wait in the target's
//! `strangler.cdc_requests`; the running stream polls them.

use tokio_postgres::Client;

use crate::error::CdcError;
use crate::plan::{TablePlan, split_name};

/// The request table's DDL.
pub const REQUESTS_DDL: &str = "CREATE TABLE IF NOT EXISTS strangler.cdc_requests (
    id bigserial PRIMARY KEY, slot text NOT NULL, target_table text NOT NULL,
    requested_at timestamptz NOT NULL DEFAULT now(), done_at timestamptz, rows bigint, error text)";

/// The oldest open request for `slot`: (id, plan index if mapped, table name).
pub async fn next_request(
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
pub async fn finish_request(control: &Client, id: i64, outcome: &Result<u64, CdcError>) {
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
