//! Settling conflicts, shared by every sink: which rows of a batch were also
//! changed on the target since their last sync, and which version wins by the
//! mapping's policy ([`crate::conflict::Policy`]).

use std::collections::HashMap;

use crate::batch::TableChanges;
use crate::conflict::{Policy, Winner};
use crate::error::ApplyError;
use crate::model::{Before, Key, Values};
use crate::pg::{text_rows, transpose};
use crate::plan::TablePlan;

pub(crate) type Mapped = Vec<Option<String>>;

pub(crate) fn query_error(e: tokio_postgres::Error) -> ApplyError {
    ApplyError::Rejected {
        table: "(conflict check)".into(),
        key: String::new(),
        message: e.to_string(),
    }
}

/// A conflict check's inputs from one table's changes: the keys whose old row is
/// known, the new versions of those rows and the old ones, to be mapped.
pub(crate) struct Candidates<'a> {
    /// Source keys with a known old row.
    pub keys: Vec<&'a Key>,
    /// Their new versions (carried values), where present.
    pub incoming: Vec<&'a Values>,
    /// Their old versions, where the row existed.
    pub before: Vec<&'a Values>,
}

impl<'a> Candidates<'a> {
    /// The candidates of `changes`.
    pub(crate) fn of(changes: &'a TableChanges) -> Self {
        let present: HashMap<&Key, &Values> = changes.present.iter().map(|(k, v)| (k, v)).collect();
        let mut out = Self {
            keys: Vec::new(),
            incoming: Vec::new(),
            before: Vec::new(),
        };
        for (k, b) in &changes.before {
            let Some(b) = b else { continue };
            out.keys.push(k);
            if let Some(v) = present.get(k) {
                out.incoming.push(v);
            }
            if let Before::Row(v) = b {
                out.before.push(v);
            }
        }
        out
    }
}

/// Maps carried rows through `sql` (`rows_sql` or `rows_text_sql`: source key, keep
/// flag, mapped row) on `db`: source key → the target row the filter keeps, or
/// `None` when it filters the row out.
pub(crate) async fn map_rows(
    db: &impl tokio_postgres::GenericClient,
    sql: &str,
    plan: &TablePlan,
    rows: &[&Values],
) -> Result<HashMap<Key, Option<Mapped>>, ApplyError> {
    if rows.is_empty() {
        return Ok(HashMap::new());
    }
    let keys = plan.source_key().len();
    let columns = transpose(plan.carried.len(), rows.iter().copied());
    Ok(text_rows(db, sql, &columns)
        .await
        .map_err(query_error)?
        .into_iter()
        .map(|mut r| {
            let row = r.split_off(keys + 1);
            let keep = r.pop().flatten().as_deref() == Some("true");
            (r, keep.then_some(row))
        })
        .collect())
}

/// Positions of the target key columns among the mapping's outputs.
pub(crate) fn key_positions(plan: &TablePlan) -> Vec<usize> {
    plan.target
        .key
        .iter()
        .filter_map(|k| plan.mapping.outputs.iter().position(|o| &o.column == k))
        .collect()
}

/// A mapped row's target key.
pub(crate) fn target_key(plan: &TablePlan, row: &Mapped) -> Vec<Option<String>> {
    key_positions(plan)
        .into_iter()
        .map(|i| row.get(i).cloned().flatten())
        .collect()
}

/// `id=7, …` for messages.
pub(crate) fn key_text(plan: &TablePlan, tkey: &[Option<String>]) -> String {
    plan.target
        .key
        .iter()
        .zip(tkey)
        .map(|(c, v)| format!("{c}={}", v.as_deref().unwrap_or("NULL")))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `{col=value, …}` or `no row`, for messages.
pub(crate) fn show(plan: &TablePlan, row: Option<&Mapped>) -> String {
    match row {
        None => "no row".into(),
        Some(r) => {
            let fields: Vec<String> = plan
                .mapping
                .outputs
                .iter()
                .zip(r)
                .map(|(o, v)| format!("{}={}", o.column, v.as_deref().unwrap_or("NULL")))
                .collect();
            format!("{{{}}}", fields.join(", "))
        }
    }
}

/// How a found conflict is settled: a winner now, or (for `newer:<column>`) a
/// comparison of that output column (its index) that only the target can make.
pub(crate) enum Settle {
    /// Decided.
    Winner(Winner),
    /// Compare output `index` of the incoming and the current row.
    Newer(usize),
}

/// Applies `plan.conflict` to one conflict; `stop` becomes the error that stops
/// the stream, naming the key and both versions.
pub(crate) async fn settle(
    plan: &TablePlan,
    tkey: &[Option<String>],
    incoming: Option<&Mapped>,
    current: Option<&Mapped>,
) -> Result<Settle, ApplyError> {
    Ok(match &plan.conflict {
        Policy::Off | Policy::Source => Settle::Winner(Winner::Source),
        Policy::Target => Settle::Winner(Winner::Target),
        Policy::Owner(owner) => Settle::Winner(
            owner
                .winner()
                .await
                .map_err(|e| ApplyError::Unsafe(e.to_string()))?,
        ),
        Policy::Newer(column) => {
            let Some(i) = plan
                .mapping
                .outputs
                .iter()
                .position(|o| &o.column == column)
            else {
                return Err(ApplyError::Unsafe(format!(
                    "conflict = \"newer:{column}\": the mapping for {} has no output column {column}",
                    plan.target.quoted()
                )));
            };
            // A delete has no value, and a row gone on the target none to beat.
            match (
                incoming.and_then(|r| r.get(i).cloned().flatten()),
                current.and_then(|r| r.get(i).cloned().flatten()),
            ) {
                (Some(_), Some(_)) => Settle::Newer(i),
                _ => Settle::Winner(Winner::Source),
            }
        }
        Policy::Stop => {
            return Err(ApplyError::Conflict {
                table: plan.target.quoted(),
                key: key_text(plan, tkey),
                incoming: show(plan, incoming),
                current: show(plan, current),
            });
        }
    })
}

/// Logs a settled conflict.
pub(crate) fn log(
    plan: &TablePlan,
    tkey: &[Option<String>],
    incoming: Option<&Mapped>,
    current: Option<&Mapped>,
    winner: Winner,
) {
    tracing::warn!(
        table = %plan.target.quoted(),
        key = %key_text(plan, tkey),
        incoming = %show(plan, incoming),
        current = %show(plan, current),
        winner = ?winner,
        "conflict: the row changed on both sides"
    );
}

/// Drops the incoming changes of rows whose target version won.
pub(crate) fn drop_changes(changes: &mut TableChanges, skip: &[Key]) {
    if !skip.is_empty() {
        changes.present.retain(|(k, _)| !skip.contains(k));
        changes.deleted.retain(|k| !skip.contains(k));
    }
}
