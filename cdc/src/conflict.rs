//! Conflicts: a row changed on both sides within the lag window. A stream notices
//! one when the target row is no longer what the change's *before* image says it
//! was (the target was written locally since the last sync), and resolves it by the
//! mapping's policy. Every conflict is counted and logged with the key and both
//! versions.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio_postgres::Transaction;
use tokio_postgres::types::ToSql;

use crate::apply::{ApplyError, Before, Key, TableChanges};
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
    pub fn parse(text: &str, owner: Option<&Arc<Owner>>) -> Result<Self, String> {
        Ok(match text.trim() {
            "off" | "" => Self::Off,
            "source" => Self::Source,
            "target" => Self::Target,
            "stop" => Self::Stop,
            "owner" => Self::Owner(Arc::clone(owner.ok_or(
                "conflict = \"owner\" needs a [conflicts] section with route and history_file",
            )?)),
            other => match other.strip_prefix("newer:") {
                Some(col) if !col.trim().is_empty() => Self::Newer(col.trim().to_string()),
                _ => {
                    return Err(format!(
                        "conflict = {other:?}: expected \"source\", \"target\", \"stop\", \"owner\" or \"newer:<column>\""
                    ));
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
    pub fn winner(&self) -> Result<Winner, String> {
        let new_owns = route_on_new(&self.history_file, &self.route)?;
        Ok(if new_owns != self.legacy_is_source {
            Winner::Source
        } else {
            Winner::Target
        })
    }
}

fn route_on_new(history: &Path, route: &str) -> Result<bool, String> {
    let text = match std::fs::read_to_string(history) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(format!("route history {}: {e}", history.display())),
    };
    let last = text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .rfind(|e| e["route"] == route);
    Ok(match last {
        None => false,
        Some(e) => match e["to"]["state"].as_str() {
            Some("new" | "retired") => true,
            Some("canary") => e["to"]["percent"].as_u64().is_some_and(|p| p >= 50),
            _ => false,
        },
    })
}

type Mapped = Vec<Option<String>>;

async fn query(
    tx: &Transaction<'_>,
    sql: &str,
    columns: &[Vec<Option<String>>],
) -> Result<Vec<tokio_postgres::Row>, ApplyError> {
    let params: Vec<&(dyn ToSql + Sync)> =
        columns.iter().map(|c| c as &(dyn ToSql + Sync)).collect();
    tx.query(sql, &params)
        .await
        .map_err(|e| ApplyError::Rejected {
            table: "(conflict check)".into(),
            key: String::new(),
            message: e.to_string(),
        })
}

fn transpose(width: usize, rows: &[&Vec<Option<String>>]) -> Vec<Vec<Option<String>>> {
    let mut out = vec![Vec::new(); width];
    for r in rows {
        for (i, v) in r.iter().enumerate().take(width) {
            out[i].push(v.clone());
        }
    }
    out
}

/// Maps carried rows through the mapping: source key → the target row the filter
/// keeps (or `None` when it filters the row out).
async fn mapped(
    tx: &Transaction<'_>,
    plan: &TablePlan,
    rows: &[&Vec<Option<String>>],
) -> Result<HashMap<Key, Option<Mapped>>, ApplyError> {
    if rows.is_empty() {
        return Ok(HashMap::new());
    }
    let keys = plan.source_key().len();
    let out = query(tx, &plan.rows_sql, &transpose(plan.carried.len(), rows)).await?;
    Ok(out
        .iter()
        .map(|r| {
            let key: Key = (0..keys).map(|i| r.get::<_, Option<String>>(i)).collect();
            let keep: bool = r.get(keys);
            let row: Mapped = (keys + 1..r.len())
                .map(|i| r.get::<_, Option<String>>(i))
                .collect();
            (key, keep.then_some(row))
        })
        .collect())
}

fn target_key(plan: &TablePlan, row: &Mapped) -> Vec<Option<String>> {
    plan.target
        .key
        .iter()
        .filter_map(|k| plan.mapping.outputs.iter().position(|o| &o.column == k))
        .map(|i| row.get(i).cloned().flatten())
        .collect()
}

fn show(plan: &TablePlan, row: Option<&Mapped>) -> String {
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

/// Finds the batch's rows that were also changed on the target since their last
/// sync, resolves each by `plan.conflict` (dropping the incoming change where the
/// target wins) and returns how many there were. Rows whose before image is not
/// known (no full old row from the source) are not checked.
pub async fn resolve(
    tx: &Transaction<'_>,
    plan: &TablePlan,
    changes: &mut TableChanges,
) -> Result<u64, ApplyError> {
    let table = plan.target.quoted();
    let known: Vec<(&Key, &Before)> = changes
        .before
        .iter()
        .filter_map(|(k, b)| b.as_ref().map(|b| (k, b)))
        .collect();
    if known.is_empty() {
        return Ok(0);
    }
    let present: HashMap<&Key, &Vec<Option<String>>> =
        changes.present.iter().map(|(k, v)| (k, v)).collect();
    let incoming_rows: Vec<&Vec<Option<String>>> = known
        .iter()
        .filter_map(|(k, _)| present.get(k).copied())
        .collect();
    let incoming = mapped(tx, plan, &incoming_rows).await?;
    let before_rows: Vec<&Vec<Option<String>>> = known
        .iter()
        .filter_map(|(_, b)| match b {
            Before::Row(v) => Some(v),
            Before::Absent => None,
        })
        .collect();
    let expected = mapped(tx, plan, &before_rows).await?;
    // Each checked row's target key: from its old version, else its new one.
    let mut tkeys: HashMap<&Key, Vec<Option<String>>> = HashMap::new();
    for (k, _) in &known {
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
        query(
            tx,
            &plan.current_sql,
            &transpose(plan.target.key.len(), &wanted),
        )
        .await?
        .iter()
        .map(|r| {
            let row: Mapped = (0..r.len())
                .map(|i| r.get::<_, Option<String>>(i))
                .collect();
            (target_key(plan, &row), row)
        })
        .collect()
    };
    let mut skip: Vec<Key> = Vec::new();
    let mut found = 0u64;
    for (k, _) in &known {
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
        let key_text = plan
            .target
            .key
            .iter()
            .zip(tkey)
            .map(|(c, v)| format!("{c}={}", v.as_deref().unwrap_or("NULL")))
            .collect::<Vec<_>>()
            .join(", ");
        let winner = match &plan.conflict {
            Policy::Off | Policy::Source => Winner::Source,
            Policy::Target => Winner::Target,
            Policy::Owner(owner) => owner.winner().map_err(ApplyError::Unsafe)?,
            Policy::Newer(column) => newer(tx, plan, column, new.as_ref(), now).await?,
            Policy::Stop => {
                return Err(ApplyError::Conflict {
                    table,
                    key: key_text,
                    incoming: show(plan, new.as_ref()),
                    current: show(plan, now),
                });
            }
        };
        tracing::warn!(
            table = %table,
            key = %key_text,
            incoming = %show(plan, new.as_ref()),
            current = %show(plan, now),
            winner = ?winner,
            "conflict: the row changed on both sides"
        );
        if winner == Winner::Target {
            skip.push((*k).clone());
        }
    }
    if !skip.is_empty() {
        changes.present.retain(|(k, _)| !skip.contains(k));
        changes.deleted.retain(|k| !skip.contains(k));
    }
    Ok(found)
}

/// `newer:<column>`: the incoming version wins unless the target's value in
/// `column` is later (a delete has no value and wins).
async fn newer(
    tx: &Transaction<'_>,
    plan: &TablePlan,
    column: &str,
    incoming: Option<&Mapped>,
    current: Option<&Mapped>,
) -> Result<Winner, ApplyError> {
    let Some(i) = plan.mapping.outputs.iter().position(|o| o.column == column) else {
        return Err(ApplyError::Unsafe(format!(
            "conflict = \"newer:{column}\": the mapping for {} has no output column {column}",
            plan.target.quoted()
        )));
    };
    let (Some(new), Some(old)) = (
        incoming.and_then(|r| r.get(i).cloned().flatten()),
        current.and_then(|r| r.get(i).cloned().flatten()),
    ) else {
        return Ok(Winner::Source);
    };
    let cast = plan
        .target
        .columns
        .iter()
        .find(|c| c.name == column)
        .map_or("text".to_string(), |c| c.type_sql.clone());
    let row = tx
        .query_one(
            &format!("SELECT $1::text::{cast} < $2::text::{cast}"),
            &[&new, &old],
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
                .contains("newer:<column>")
        );
    }

    #[test]
    fn the_owner_follows_the_routes_last_recorded_state() {
        let dir = tempfile::tempdir().expect("tempdir");
        let history = dir.path().join("h.jsonl");
        let owner = Owner {
            route: "orders".into(),
            history_file: history.clone(),
            legacy_is_source: true,
        };
        assert_eq!(
            owner.winner(),
            Ok(Winner::Source),
            "no history: legacy owns"
        );
        std::fs::write(
            &history,
            "{\"route\":\"orders\",\"to\":{\"state\":\"canary\",\"percent\":25}}\n\
             {\"route\":\"other\",\"to\":{\"state\":\"new\"}}\n",
        )
        .expect("write");
        assert_eq!(owner.winner(), Ok(Winner::Source));
        std::fs::write(
            &history,
            "{\"route\":\"orders\",\"to\":{\"state\":\"new\"}}\n",
        )
        .expect("write");
        assert_eq!(
            owner.winner(),
            Ok(Winner::Target),
            "new owns: the target (new) wins"
        );
        std::fs::write(
            &history,
            "{\"route\":\"orders\",\"to\":{\"state\":\"new\"}}\n{\"route\":\"orders\",\"to\":{\"state\":\"legacy\"}}\n",
        )
        .expect("write");
        assert_eq!(
            owner.winner(),
            Ok(Winner::Source),
            "the last entry counts (rolled back)"
        );
    }
}
