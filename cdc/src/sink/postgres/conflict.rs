//! Conflict detection on a PostgreSQL target: the batch's rows whose target row
//! is no longer what their before image says, settled by the mapping's policy.

use std::collections::HashMap;

use crate::batch::TableChanges;
use crate::conflict::Winner;
use crate::error::ApplyError;
use crate::model::Key;
use crate::pg::{text_rows, transpose};
use crate::plan::TablePlan;
use crate::sink::settle::{
    Candidates, Mapped, Settle, drop_changes, log, map_rows, query_error, settle, target_key,
};

/// Finds the batch's rows that were also changed on a PostgreSQL target since their
/// last sync, resolves each by `plan.conflict` (dropping the incoming change where
/// the target wins) and returns how many there were. Rows whose before image is not
/// known (no full old row from the source) are not checked.
pub async fn resolve(
    tx: &impl tokio_postgres::GenericClient,
    plan: &TablePlan,
    changes: &mut TableChanges,
) -> Result<u64, ApplyError> {
    let c = Candidates::of(changes);
    if c.keys.is_empty() {
        return Ok(0);
    }
    let incoming = map_rows(tx, &plan.rows_sql, plan, &c.incoming).await?;
    let expected = map_rows(tx, &plan.rows_sql, plan, &c.before).await?;
    // Each checked row's target key: from its old version, else its new one.
    let mut tkeys: HashMap<&Key, Vec<Option<String>>> = HashMap::new();
    for k in &c.keys {
        let row = expected
            .get(*k)
            .cloned()
            .flatten()
            .or_else(|| incoming.get(*k).cloned().flatten());
        if let Some(r) = row {
            tkeys.insert(k, target_key(plan, &r));
        }
    }
    let wanted: Vec<&Vec<Option<String>>> = tkeys.values().collect();
    let current: HashMap<Vec<Option<String>>, Mapped> = if wanted.is_empty() {
        HashMap::new()
    } else {
        text_rows(
            tx,
            &plan.current_sql,
            &transpose(plan.target.key.len(), wanted),
        )
        .await
        .map_err(query_error)?
        .into_iter()
        .map(|row| (target_key(plan, &row), row))
        .collect()
    };
    let mut skip: Vec<Key> = Vec::new();
    let mut found = 0u64;
    for k in &c.keys {
        let Some(tkey) = tkeys.get(*k) else {
            continue;
        };
        let was = expected.get(*k).cloned().flatten();
        let now = current.get(tkey);
        if was.as_ref() == now {
            continue;
        }
        found += 1;
        let new = incoming.get(*k).cloned().flatten();
        let winner = match settle(plan, tkey, new.as_ref(), now).await? {
            Settle::Winner(w) => w,
            Settle::Newer(i) => newer(tx, plan, i, new.as_ref(), now).await?,
        };
        log(plan, tkey, new.as_ref(), now, winner);
        if winner == Winner::Target {
            skip.push((*k).clone());
        }
    }
    drop_changes(changes, &skip);
    Ok(found)
}

/// `newer:<column>` on PostgreSQL: the incoming version wins unless the target's
/// value in output `i` is later (compared as the target column's type).
async fn newer(
    tx: &impl tokio_postgres::GenericClient,
    plan: &TablePlan,
    i: usize,
    incoming: Option<&Mapped>,
    current: Option<&Mapped>,
) -> Result<Winner, ApplyError> {
    let column = &plan.mapping.outputs[i].column;
    let value = |r: Option<&Mapped>| r.and_then(|r| r.get(i).cloned().flatten());
    let cast = plan
        .target
        .columns
        .iter()
        .find(|c| &c.name == column)
        .map_or("text".to_string(), |c| c.type_sql.clone());
    let row = tx
        .query_one(
            &format!("SELECT $1::text::{cast} < $2::text::{cast}"),
            &[&value(incoming), &value(current)],
        )
        .await
        .map_err(|e| ApplyError::Unsafe(format!("comparing {column} values: {e}")))?;
    Ok(if row.get::<_, bool>(0) {
        Winner::Target
    } else {
        Winner::Source
    })
}
