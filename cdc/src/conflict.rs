//! Conflicts: a row changed on both sides within the lag window. A stream notices
//! one when the target row is no longer what the change's *before* image says it
//! was (the target was written locally since the last sync), and resolves it by the
//! mapping's policy. Every conflict is counted and logged with the key and both
//! versions.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use strangler_model::{History, HistoryError, Invalid, State};

use crate::apply::{ApplyError, Before, Key, TableChanges, Values, text_rows, transpose};
use crate::plan::TablePlan;

/// How a mapping resolves a conflict.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Policy {
    /// No detection: the incoming change is applied (the default).
    #[default]
    Off,
    /// The incoming change wins.
    Source,
    /// The target's row stays.
    Target,
    /// The version with the later value in this target column wins (ties: incoming).
    Newer(String),
    /// The side that owns the route wins, from the route's lifecycle state.
    Owner(Arc<Owner>),
    /// The stream stops and reports.
    Stop,
}

/// Which side owns a route, from `strangler route` history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    /// The route.
    pub route: String,
    /// The route history file (`control.history_file` of the router config).
    pub history_file: PathBuf,
    /// Whether this stream's source is the legacy database.
    pub legacy_is_source: bool,
}

/// Which version wins.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Winner {
    /// The incoming change.
    Source,
    /// The target's row.
    Target,
}

impl Policy {
    /// Parses `source`, `target`, `stop`, `owner` or `newer:<column>`.
    pub fn parse(text: &str, owner: Option<&Arc<Owner>>) -> Result<Self, Invalid> {
        Ok(match text.trim() {
            "off" | "" => Self::Off,
            "source" => Self::Source,
            "target" => Self::Target,
            "stop" => Self::Stop,
            "owner" => Self::Owner(Arc::clone(owner.ok_or(Invalid::from(
                "conflict = \"owner\" needs a [conflicts] section with route and history_file",
            ))?)),
            other => match other.strip_prefix("newer:") {
                Some(col) if !col.trim().is_empty() => Self::Newer(col.trim().to_string()),
                _ => {
                    return Err(Invalid(format!(
                        "conflict = {other:?}: expected \"source\", \"target\", \"stop\", \"owner\" or \"newer:<column>\""
                    )));
                }
            },
        })
    }

    /// Whether conflicts are looked for at all.
    pub fn detects(&self) -> bool {
        *self != Self::Off
    }
}

impl Owner {
    /// The side that owns the route now: legacy until the route serves at least half
    /// of its users from the new service (canary ≥ 50 %, new, retired).
    pub fn winner(&self) -> Result<Winner, HistoryError> {
        let new_owns = History::new(&self.history_file)
            .last_state(&self.route)?
            .is_some_and(State::new_owns);
        Ok(if new_owns != self.legacy_is_source {
            Winner::Source
        } else {
            Winner::Target
        })
    }
}

type Mapped = Vec<Option<String>>;

fn query_error(e: tokio_postgres::Error) -> ApplyError {
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
pub(crate) fn settle(
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
        let winner = match settle(plan, tkey, new.as_ref(), now)? {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policies_parse_and_bad_ones_say_what_is_expected() {
        assert_eq!(Policy::parse("stop", None), Ok(Policy::Stop));
        assert_eq!(
            Policy::parse("newer:updated_at", None),
            Ok(Policy::Newer("updated_at".into()))
        );
        assert!(Policy::parse("owner", None).is_err());
        assert!(
            Policy::parse("newest", None)
                .expect_err("refused")
                .to_string()
                .contains("newer:<column>")
        );
    }

    /// The history is written by the CLI (`strangler route …`) through
    /// `strangler_model::History`; the policy reads it back through the same type.
    #[test]
    fn the_owner_follows_the_routes_last_state_in_the_history_the_cli_writes() {
        use strangler_model::{Entry, Percent};
        let dir = tempfile::tempdir().expect("tempdir");
        let history_file = dir.path().join("h.jsonl");
        let owner = Owner {
            route: "orders".into(),
            history_file: history_file.clone(),
            legacy_is_source: true,
        };
        assert_eq!(
            owner.winner().ok(),
            Some(Winner::Source),
            "no history: legacy owns"
        );
        let history = History::new(&history_file);
        let write = |route: &str, from: State, to: State| {
            history
                .append(&Entry::now("alice", route, from, to, "test"))
                .expect("append");
        };
        let canary = |p: u8| State::Canary {
            percent: Percent::try_from(p).expect("percent"),
        };
        write("orders", State::Shadow, canary(25));
        write("other", State::Legacy, State::New);
        assert_eq!(
            owner.winner().ok(),
            Some(Winner::Source),
            "25 %: legacy owns"
        );
        write("orders", canary(25), canary(50));
        assert_eq!(
            owner.winner().ok(),
            Some(Winner::Target),
            "half the users on new: new owns, the target (new) wins"
        );
        write("orders", canary(50), State::Legacy);
        assert_eq!(
            owner.winner().ok(),
            Some(Winner::Source),
            "the last entry counts (rolled back)"
        );
        std::fs::write(&history_file, "{\"route\":\"orders\"}\n").expect("write");
        assert!(
            owner.winner().is_err(),
            "a line that is not an entry is an error, not a silent legacy"
        );
    }
}
