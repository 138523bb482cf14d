//! Batches of whole source transactions, reduced to the last state of each row and
//! applied to the target in one transaction together with the checkpoint.

use std::collections::HashMap;
use std::time::Instant;

use pg_walstream::{ColumnValue, RowData};
use tokio_postgres::Client;
use tokio_postgres::types::ToSql;

use crate::lsn::Lsn;
use crate::plan::{TablePlan, ident};

/// Schema and table of the checkpoint kept in the target.
pub const CHECKPOINT_TABLE: &str = "strangler.cdc_checkpoint";

/// Why a batch could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// The target refused a row or the connection failed.
    #[error("applying to {table}{key}: {message}")]
    Rejected {
        /// Target table.
        table: String,
        /// The row's source key when one row is to blame (`" (key id=7)"`).
        key: String,
        /// The database's message.
        message: String,
    },
    /// The target's connection went away mid-batch (nothing of the batch is kept:
    /// it is retried from the checkpoint).
    #[error("applying to {table}: lost the connection: {message}")]
    Lost {
        /// Target table.
        table: String,
        /// The driver's message.
        message: String,
    },
    /// A change cannot be applied safely.
    #[error("{0}")]
    Unsafe(String),
    /// A row changed on both sides and the mapping's policy is to stop.
    #[error(
        "conflict on {table} key {key}: changed on both sides; incoming {incoming}, target has {current}. \
         Resolve it by hand (or set the mapping's conflict policy), then start again"
    )]
    Conflict {
        /// Target table.
        table: String,
        /// The target key.
        key: String,
        /// The incoming version.
        incoming: String,
        /// The target's version.
        current: String,
    },
    /// The checkpoint could not be written or read.
    #[error("checkpoint: {0}")]
    Checkpoint(#[source] tokio_postgres::Error),
}

/// A row's source key values (text; `None` is NULL).
pub type Key = Vec<Option<String>>;
/// Carried column values of a row.
pub type Values = Vec<Option<String>>;

/// What a row ends up as after the batch.
#[derive(Debug, Clone)]
enum Final {
    /// Present with these carried values (in `TablePlan::carried` order).
    Row(Vec<Option<String>>),
    /// Present, but some carried columns were not sent (unchanged TOAST values
    /// without a FULL replica identity): only what can be computed is updated.
    Partial(Vec<Option<Option<String>>>),
    /// Gone.
    Deleted,
}

/// What applying a batch did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Applied {
    /// Rows written.
    pub rows: u64,
    /// Conflicts found (and resolved by the mappings' policies).
    pub conflicts: u64,
}

/// One table's changes in a batch, reduced to each row's last state.
#[derive(Debug, Default)]
pub struct TableChanges {
    /// The source table was truncated first.
    pub truncated: bool,
    /// Source keys of rows gone.
    pub deleted: Vec<Key>,
    /// Rows present: source key and carried values (`TablePlan::carried` order).
    pub present: Vec<(Key, Values)>,
    /// Rows present but with unsent (unchanged TOAST) values (`None` = not sent).
    pub partial: Vec<(Key, Vec<Option<Option<String>>>)>,
    /// Each changed row as it was before the batch (`None`: unknown).
    pub before: HashMap<Key, Option<Before>>,
}

/// A row before a batch's changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Before {
    /// It did not exist.
    Absent,
    /// Its carried values.
    Row(Values),
}

/// Changes of whole transactions waiting to be applied.
#[derive(Debug, Default)]
pub struct Batch {
    /// Per plan: source key → final state. Only the last state of a row matters
    /// to the target once the batch commits atomically.
    rows: Vec<HashMap<Vec<Option<String>>, Final>>,
    /// Per plan: source key → the row as it was before the batch's first change to
    /// it (`None`: not known, e.g. no full old row), for conflict detection.
    before: Vec<HashMap<Key, Option<Before>>>,
    truncated: Vec<bool>,
    /// Changes received (before reduction).
    pub changes: usize,
    /// Changes per plan (before reduction), for rows/s by table.
    pub changes_by_table: Vec<u64>,
    /// Transactions in the batch.
    pub transactions: usize,
    /// End of the last whole transaction in the batch.
    pub end_lsn: Lsn,
    /// When its first commit arrived (for the linger).
    pub first_commit: Option<Instant>,
    /// Commit time of the first transaction (for lag in seconds).
    pub first_commit_time: Option<std::time::SystemTime>,
    /// MariaDB source: the GTID position after the batch's last transaction, kept
    /// with the checkpoint.
    pub gtid: Option<String>,
}

impl Batch {
    /// An empty batch for `tables` plans.
    pub fn new(tables: usize) -> Self {
        Self {
            rows: vec![HashMap::new(); tables],
            before: vec![HashMap::new(); tables],
            truncated: vec![false; tables],
            changes_by_table: vec![0; tables],
            ..Self::default()
        }
    }

    /// Nothing to apply.
    pub fn is_empty(&self) -> bool {
        self.transactions == 0
    }

    fn key_of(plan: &TablePlan, data: &RowData) -> Result<Vec<Option<String>>, ApplyError> {
        plan.source_key()
            .iter()
            .map(|k| match data.get(k) {
                Some(v) => Ok(text(v)),
                None => Err(ApplyError::Unsafe(format!(
                    "a change to {} arrived without its key column {k}",
                    plan.source.quoted()
                ))),
            })
            .collect()
    }

    /// An inserted row.
    pub fn insert(&mut self, t: usize, plan: &TablePlan, data: &RowData) -> Result<(), ApplyError> {
        let key = Self::key_of(plan, data)?;
        let values = plan
            .carried
            .iter()
            .map(|c| data.get(&c.name).and_then(text))
            .collect();
        self.changes += 1;
        self.changes_by_table[t] += 1;
        self.before[t]
            .entry(key.clone())
            .or_insert(Some(Before::Absent));
        self.rows[t].insert(key, Final::Row(values));
        Ok(())
    }

    /// The carried values of a whole old row, when the server sent all of them.
    fn whole(plan: &TablePlan, old: &RowData) -> Option<Before> {
        plan.carried
            .iter()
            .map(|c| old.get(&c.name).map(text))
            .collect::<Option<Vec<_>>>()
            .map(Before::Row)
    }

    /// An updated row; `old` is the old key (or whole old row with REPLICA IDENTITY FULL)
    /// when the server sent one.
    pub fn update(
        &mut self,
        t: usize,
        plan: &TablePlan,
        old: Option<&RowData>,
        new: &RowData,
    ) -> Result<(), ApplyError> {
        let key = Self::key_of(plan, new)?;
        self.changes += 1;
        self.changes_by_table[t] += 1;
        if let Some(old) = old {
            let old_key = Self::key_of(plan, old)?;
            if old_key != key {
                self.before[t]
                    .entry(old_key.clone())
                    .or_insert_with(|| Self::whole(plan, old));
                self.before[t]
                    .entry(key.clone())
                    .or_insert(Some(Before::Absent));
                self.rows[t].insert(old_key, Final::Deleted);
            } else {
                self.before[t]
                    .entry(key.clone())
                    .or_insert_with(|| Self::whole(plan, old));
            }
        } else {
            self.before[t].entry(key.clone()).or_insert(None);
        }
        let previous = self.rows[t].get(&key).cloned();
        let mut values: Vec<Option<Option<String>>> = Vec::with_capacity(plan.carried.len());
        for (i, c) in plan.carried.iter().enumerate() {
            // A column missing from the new tuple is an unchanged TOAST value: take it
            // from the old tuple (FULL identity) or an earlier change in this batch.
            let v = match new.get(&c.name) {
                Some(v) => Some(text(v)),
                None => match (old.and_then(|o| o.get(&c.name)), &previous) {
                    (Some(v), _) => Some(text(v)),
                    (None, Some(Final::Row(prev))) => prev.get(i).cloned(),
                    (None, Some(Final::Partial(prev))) => prev.get(i).cloned().flatten(),
                    _ => None,
                },
            };
            values.push(v);
        }
        let state = if values.iter().all(Option::is_some) {
            Final::Row(values.into_iter().flatten().collect())
        } else {
            Final::Partial(values)
        };
        self.rows[t].insert(key, state);
        Ok(())
    }

    /// A deleted row (`old` holds at least the key).
    pub fn delete(&mut self, t: usize, plan: &TablePlan, old: &RowData) -> Result<(), ApplyError> {
        let key = Self::key_of(plan, old)?;
        self.changes += 1;
        self.changes_by_table[t] += 1;
        self.before[t]
            .entry(key.clone())
            .or_insert_with(|| Self::whole(plan, old));
        self.rows[t].insert(key, Final::Deleted);
        Ok(())
    }

    /// The source table was truncated: earlier changes in the batch no longer matter.
    pub fn truncate(&mut self, t: usize) {
        self.changes += 1;
        self.rows[t].clear();
        self.before[t].clear();
        self.truncated[t] = true;
    }

    /// A transaction ended at `end`.
    pub fn commit(&mut self, end: Lsn, at: Option<std::time::SystemTime>) {
        self.transactions += 1;
        self.end_lsn = end;
        self.first_commit.get_or_insert_with(Instant::now);
        if self.first_commit_time.is_none() {
            self.first_commit_time = at;
        }
    }

    /// Takes table `t`'s reduced changes out of the batch (for a sink other than
    /// PostgreSQL; [`Batch::apply`] does the same internally).
    pub fn take_table(&mut self, t: usize) -> TableChanges {
        let mut out = TableChanges {
            truncated: std::mem::take(&mut self.truncated[t]),
            before: std::mem::take(&mut self.before[t]),
            ..TableChanges::default()
        };
        for (key, state) in std::mem::take(&mut self.rows[t]) {
            match state {
                Final::Deleted => out.deleted.push(key),
                Final::Row(values) => out.present.push((key, values)),
                Final::Partial(values) => out.partial.push((key, values)),
            }
        }
        out
    }

    /// Empties the batch after it was applied elsewhere.
    pub fn reset(&mut self) {
        let tables = self.rows.len();
        *self = Batch::new(tables);
    }

    /// Applies everything in one target transaction, with the checkpoint; returns
    /// the rows written.
    pub async fn apply(
        &mut self,
        target: &mut Client,
        plans: &[TablePlan],
        slot: &str,
    ) -> Result<Applied, ApplyError> {
        let tx = target
            .transaction()
            .await
            .map_err(|e| rejected("the target", "", &e))?;
        let mut written = 0u64;
        let mut conflicts = 0u64;
        for (t, plan) in plans.iter().enumerate() {
            let table = plan.target.quoted();
            if self.truncated[t] {
                tx.batch_execute(&format!("TRUNCATE {table}"))
                    .await
                    .map_err(|e| rejected(&table, "", &e))?;
            }
            let mut changes = self.take_table(t);
            if plan.conflict.detects() {
                conflicts += crate::conflict::resolve(&tx, plan, &mut changes).await?;
            }
            let TableChanges {
                deleted,
                present,
                partial,
                ..
            } = changes;
            if !deleted.is_empty() {
                let columns = transpose(plan.source_key().len(), deleted.iter());
                written += execute(&tx, &plan.delete_sql, &columns)
                    .await
                    .map_err(|e| rejected(&table, "", &e))?;
            }
            if !present.is_empty() {
                let columns = transpose(plan.carried.len(), present.iter().map(|(_, v)| v));
                let n = execute(&tx, &plan.upsert_sql, &columns).await;
                match n {
                    Ok(n) => written += n,
                    Err(e) => {
                        // Name the row: the transaction is aborted, so roll it back
                        // and replay the rows one by one in a fresh one.
                        drop(tx);
                        let key = blame(target, plan, &present).await;
                        return Err(rejected(&table, &key, &e));
                    }
                }
                if let Some(sql) = &plan.filtered_out_sql {
                    written += execute(&tx, sql, &columns)
                        .await
                        .map_err(|e| rejected(&table, "", &e))?;
                }
            }
            for (_, values) in partial {
                written += apply_partial(&tx, plan, &values).await?;
            }
        }
        write_checkpoint(&tx, slot, self.end_lsn).await?;
        if let Some(gtid) = &self.gtid {
            tx.execute(
                &format!("UPDATE {CHECKPOINT_TABLE} SET gtid = $2 WHERE slot = $1"),
                &[&slot, gtid],
            )
            .await
            .map_err(ApplyError::Checkpoint)?;
        }
        tx.commit()
            .await
            .map_err(|e| rejected("the target", "", &e))?;
        let tables = self.rows.len();
        *self = Batch::new(tables);
        Ok(Applied {
            rows: written,
            conflicts,
        })
    }
}

fn text(v: &ColumnValue) -> Option<String> {
    match v {
        ColumnValue::Null => None,
        other => Some(String::from_utf8_lossy(other.as_bytes()).into_owned()),
    }
}

/// Rows of text values as one array per column: the `text[]` parameters the
/// mapping SQL (`unnest($1::text[], …)`) takes.
pub(crate) fn transpose<'a>(
    width: usize,
    rows: impl IntoIterator<Item = &'a Vec<Option<String>>>,
) -> Vec<Vec<Option<String>>> {
    let mut columns = vec![Vec::new(); width];
    for row in rows {
        for (i, v) in row.iter().enumerate().take(width) {
            columns[i].push(v.clone());
        }
    }
    columns
}

/// Runs mapping SQL with `text[]` parameters and returns every column as text.
pub(crate) async fn text_rows(
    db: &impl tokio_postgres::GenericClient,
    sql: &str,
    columns: &[Vec<Option<String>>],
) -> Result<Vec<Vec<Option<String>>>, tokio_postgres::Error> {
    let params: Vec<&(dyn ToSql + Sync)> =
        columns.iter().map(|c| c as &(dyn ToSql + Sync)).collect();
    Ok(db
        .query(sql, &params)
        .await?
        .iter()
        .map(|r| {
            (0..r.len())
                .map(|i| r.get::<_, Option<String>>(i))
                .collect()
        })
        .collect())
}

/// Runs mapping SQL with `text[]` parameters; rows affected.
pub(crate) async fn execute(
    tx: &tokio_postgres::Transaction<'_>,
    sql: &str,
    columns: &[Vec<Option<String>>],
) -> Result<u64, tokio_postgres::Error> {
    let params: Vec<&(dyn ToSql + Sync)> =
        columns.iter().map(|c| c as &(dyn ToSql + Sync)).collect();
    tx.execute(sql, &params).await
}

fn rejected(table: &str, key: &str, e: &tokio_postgres::Error) -> ApplyError {
    let message = match e.as_db_error() {
        Some(d) => match d.detail() {
            Some(detail) => format!("{} ({detail})", d.message()),
            None => d.message().to_string(),
        },
        None => e.to_string(),
    };
    ApplyError::Rejected {
        table: table.to_string(),
        key: key.to_string(),
        message,
    }
}

/// Finds the first row the target rejects, for the error message; the batch is
/// failing anyway, so the extra statements cost nothing that matters.
async fn blame(target: &mut Client, plan: &TablePlan, rows: &[(Key, Values)]) -> String {
    let Ok(tx) = target.transaction().await else {
        return String::new();
    };
    let tx = &tx;
    for (key, values) in rows {
        let columns = transpose(plan.carried.len(), std::iter::once(values));
        if tx.batch_execute("SAVEPOINT strangler_blame").await.is_err() {
            return String::new();
        }
        let failed = execute(tx, &plan.upsert_sql, &columns).await.is_err();
        let _ = tx
            .batch_execute("ROLLBACK TO SAVEPOINT strangler_blame")
            .await;
        if failed {
            let pairs = plan
                .source_key()
                .iter()
                .zip(key)
                .map(|(k, v)| format!("{k}={}", v.as_deref().unwrap_or("NULL")))
                .collect::<Vec<_>>()
                .join(", ");
            return format!(" (source key {pairs})");
        }
    }
    String::new()
}

/// An update whose unchanged TOAST columns were not sent: update only the target
/// columns computable from what was sent; the others keep their values.
async fn apply_partial(
    tx: &tokio_postgres::Transaction<'_>,
    plan: &TablePlan,
    values: &[Option<Option<String>>],
) -> Result<u64, ApplyError> {
    let table = plan.target.quoted();
    let known: Vec<usize> = (0..plan.carried.len())
        .filter(|i| values[*i].is_some())
        .collect();
    let known_names: Vec<&str> = known
        .iter()
        .map(|i| plan.carried[*i].name.as_str())
        .collect();
    if let Some(f) = &plan.mapping.filter
        && f.reads.iter().any(|r| !known_names.contains(&r.as_str()))
    {
        return Err(ApplyError::Unsafe(format!(
            "{}: an update left a large column unsent (unchanged TOAST) that the mapping's filter reads; \
             set REPLICA IDENTITY FULL on the source table so the old value is sent",
            plan.source.quoted()
        )));
    }
    let settable: Vec<_> = plan
        .mapping
        .outputs
        .iter()
        .filter(|o| !plan.target.key.contains(&o.column))
        .filter(|o| o.reads.iter().all(|r| known_names.contains(&r.as_str())))
        .collect();
    if settable.is_empty() {
        return Ok(0);
    }
    let q = ident(&plan.source.name);
    let params = (1..=known.len())
        .map(|i| format!("${i}::text[]"))
        .collect::<Vec<_>>()
        .join(", ");
    let names = known_names
        .iter()
        .map(|n| ident(n))
        .collect::<Vec<_>>()
        .join(", ");
    let casts = known
        .iter()
        .map(|i| {
            let c = &plan.carried[*i];
            format!("{}::{} AS {}", ident(&c.name), c.cast, ident(&c.name))
        })
        .collect::<Vec<_>>()
        .join(", ");
    let sets = settable
        .iter()
        .map(|o| {
            format!(
                "{} = d.{}",
                ident(&o.column),
                ident(&format!("v_{}", o.column))
            )
        })
        .collect::<Vec<_>>()
        .join(", ");
    let selected = settable
        .iter()
        .map(|o| format!("{} AS {}", o.sql, ident(&format!("v_{}", o.column))))
        .chain(plan.target.key.iter().filter_map(|k| {
            plan.mapping
                .outputs
                .iter()
                .find(|o| &o.column == k)
                .map(|o| format!("{} AS {}", o.sql, ident(&format!("k_{k}"))))
        }))
        .collect::<Vec<_>>()
        .join(", ");
    let key_match = plan
        .target
        .key
        .iter()
        .map(|k| format!("t.{} = d.{}", ident(k), ident(&format!("k_{k}"))))
        .collect::<Vec<_>>()
        .join(" AND ");
    let filter = plan
        .mapping
        .filter
        .as_ref()
        .map(|f| format!(" WHERE {}", f.sql))
        .unwrap_or_default();
    let sql = format!(
        "UPDATE {table} AS t SET {sets} FROM (SELECT {selected} FROM (SELECT {casts} FROM unnest({params}) AS u({names})) AS {q}{filter}) AS d WHERE {key_match}"
    );
    let columns: Vec<Vec<Option<String>>> = known
        .iter()
        .map(|i| vec![values[*i].clone().flatten()])
        .collect();
    execute(tx, &sql, &columns)
        .await
        .map_err(|e| rejected(&table, "", &e))
}

/// Creates the checkpoint table in the target when missing.
pub async fn ensure_checkpoint_table(target: &Client) -> Result<(), ApplyError> {
    target
        .batch_execute(&format!(
            "CREATE SCHEMA IF NOT EXISTS strangler; \
             CREATE TABLE IF NOT EXISTS {CHECKPOINT_TABLE} (slot text PRIMARY KEY, lsn pg_lsn NOT NULL, updated_at timestamptz NOT NULL DEFAULT now()); \
             ALTER TABLE {CHECKPOINT_TABLE} ADD COLUMN IF NOT EXISTS gtid text; \
             {}",
            crate::resnapshot::REQUESTS_DDL
        ))
        .await
        .map_err(ApplyError::Checkpoint)
}

/// Records `lsn` as applied for `slot`: inside a batch's transaction, or on its own
/// (the snapshot's consistent point, a stream that starts without a snapshot).
pub async fn write_checkpoint(
    target: &impl tokio_postgres::GenericClient,
    slot: &str,
    lsn: Lsn,
) -> Result<(), ApplyError> {
    target
        .execute(
            &format!(
                "INSERT INTO {CHECKPOINT_TABLE} (slot, lsn, updated_at) VALUES ($1, $2::text::pg_lsn, now()) \
                 ON CONFLICT (slot) DO UPDATE SET lsn = EXCLUDED.lsn, updated_at = now()"
            ),
            &[&slot, &lsn.to_string()],
        )
        .await
        .map(drop)
        .map_err(ApplyError::Checkpoint)
}

/// Tags this session's transactions with replication origin `name` (created when
/// missing), so the opposite direction's stream can tell them apart and skip them.
pub async fn tag_origin(target: &Client, name: &str) -> Result<(), ApplyError> {
    target
        .execute(
            "SELECT pg_replication_origin_create($1) WHERE NOT EXISTS (SELECT 1 FROM pg_replication_origin WHERE roname = $1)",
            &[&name],
        )
        .await
        .map_err(ApplyError::Checkpoint)?;
    // A previous session of ours may still hold it for a moment after a restart.
    let mut attempts = 0;
    loop {
        match target
            .execute("SELECT pg_replication_origin_session_setup($1)", &[&name])
            .await
        {
            Ok(_) => return Ok(()),
            Err(e) if attempts < 50 && e.to_string().contains("already active") => {
                attempts += 1;
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            Err(e) => return Err(ApplyError::Checkpoint(e)),
        }
    }
}

/// The position applied for `slot`, if any.
pub async fn read_checkpoint(target: &Client, slot: &str) -> Result<Option<Lsn>, ApplyError> {
    let row = target
        .query_opt(
            &format!("SELECT lsn::text FROM {CHECKPOINT_TABLE} WHERE slot = $1"),
            &[&slot],
        )
        .await
        .map_err(ApplyError::Checkpoint)?;
    Ok(row.and_then(|r| r.get::<_, String>(0).parse().ok()))
}
