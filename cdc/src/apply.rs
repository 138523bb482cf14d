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
    /// A part of a source transaction still being received: applied inside the
    /// target transaction the next part continues, without a checkpoint.
    pub open: bool,
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

    /// Applies the batch to a PostgreSQL target: in the target transaction `open`
    /// says is already begun (an earlier part of the same source transaction), or a
    /// new one. A whole batch commits with the checkpoint; a part of a source
    /// transaction still being received ([`Batch::open`]) leaves the transaction
    /// open for the next part, so a large transaction is applied while it is still
    /// being decoded and yet lands atomically. On an error the transaction is rolled
    /// back (nothing of it is kept: the stream resumes from the checkpoint).
    pub async fn apply(
        &mut self,
        target: &mut Client,
        plans: &[TablePlan],
        slot: &str,
        session: &mut Session,
    ) -> Result<Applied, ApplyError> {
        if !session.in_transaction {
            target
                .batch_execute("BEGIN")
                .await
                .map_err(|e| rejected("the target", "", &e))?;
            session.in_transaction = true;
        }
        let result = self.apply_open(target, plans, slot, session).await;
        if result.is_err() && session.in_transaction {
            session.in_transaction = false;
            let _ = target.batch_execute("ROLLBACK").await;
        }
        let applied = result?;
        if !self.open {
            target
                .batch_execute("COMMIT")
                .await
                .map_err(|e| rejected("the target", "", &e))?;
            session.in_transaction = false;
        }
        let tables = self.rows.len();
        *self = Batch::new(tables);
        Ok(applied)
    }

    async fn apply_open(
        &mut self,
        target: &mut Client,
        plans: &[TablePlan],
        slot: &str,
        session: &mut Session,
    ) -> Result<Applied, ApplyError> {
        let mut written = 0u64;
        let mut conflicts = 0u64;
        for (t, plan) in plans.iter().enumerate() {
            let table = plan.target.quoted();
            if self.truncated[t] {
                target
                    .batch_execute(&format!("TRUNCATE {table}"))
                    .await
                    .map_err(|e| rejected(&table, "", &e))?;
            }
            let mut changes = self.take_table(t);
            if plan.conflict.detects() {
                conflicts += crate::conflict::resolve(&*target, plan, &mut changes).await?;
            }
            let TableChanges {
                deleted,
                present,
                partial,
                before,
                ..
            } = changes;
            let upserted = if deleted.len() + present.len() >= STAGE_ROWS {
                session.stage(target, t, plan).await?;
                // Rows the batch inserted (absent before its first change) go by
                // plain INSERT, cheaper than an upsert when nothing is in the way.
                let (inserted, changed): (Vec<&(Key, Values)>, Vec<&(Key, Values)>) = present
                    .iter()
                    .partition(|(k, _)| matches!(before.get(k), Some(Some(Before::Absent))));
                let inserted: Vec<&Values> = inserted.into_iter().map(|(_, v)| v).collect();
                let changed: Vec<&Values> = changed.into_iter().map(|(_, v)| v).collect();
                let (n, deletes) =
                    apply_staged(&*target, plan, &deleted, &inserted, &changed).await;
                written += deletes;
                n
            } else {
                if !deleted.is_empty() {
                    let columns = transpose(plan.source_key().len(), deleted.iter());
                    written += execute(&*target, &plan.delete_sql, &columns)
                        .await
                        .map_err(|e| rejected(&table, "", &e))?;
                }
                if present.is_empty() {
                    Ok(0)
                } else {
                    let columns = transpose(plan.carried.len(), present.iter().map(|(_, v)| v));
                    let n = execute(&*target, &plan.upsert_sql, &columns).await;
                    if n.is_ok()
                        && let Some(sql) = &plan.filtered_out_sql
                    {
                        written += execute(&*target, sql, &columns)
                            .await
                            .map_err(|e| rejected(&table, "", &e))?;
                    }
                    n
                }
            };
            match upserted {
                Ok(n) => written += n,
                Err(e) => {
                    // Name the row: the transaction is aborted, so roll it back
                    // and replay the rows one by one in a fresh one.
                    session.in_transaction = false;
                    let _ = target.batch_execute("ROLLBACK").await;
                    let key = blame(target, plan, &present).await;
                    return Err(rejected(&table, &key, &e));
                }
            }
            for (_, values) in partial {
                written += apply_partial(&*target, plan, &values).await?;
            }
        }
        if !self.open {
            write_checkpoint(&*target, slot, self.end_lsn).await?;
            if let Some(gtid) = &self.gtid {
                target
                    .execute(
                        &format!("UPDATE {CHECKPOINT_TABLE} SET gtid = $2 WHERE slot = $1"),
                        &[&slot, gtid],
                    )
                    .await
                    .map_err(ApplyError::Checkpoint)?;
            }
        }
        Ok(Applied {
            rows: written,
            conflicts,
        })
    }
}

/// Rows of one table at which a batch goes through the staging table (binary COPY,
/// then set-based statements) rather than as array parameters of one statement:
/// below it one round trip matters more than throughput.
pub const STAGE_ROWS: usize = 256;

/// A PostgreSQL target session's state between batches.
#[derive(Debug, Default)]
pub struct Session {
    /// A transaction is open: an earlier part of a source transaction was applied.
    pub in_transaction: bool,
    /// Plans whose staging table this session has created.
    staged: Vec<bool>,
}

impl Session {
    /// Creates plan `t`'s staging table in this session when it has not yet.
    async fn stage(
        &mut self,
        target: &Client,
        t: usize,
        plan: &TablePlan,
    ) -> Result<(), ApplyError> {
        if self.staged.len() <= t {
            self.staged.resize(t + 1, false);
        }
        if !self.staged[t] {
            target
                .batch_execute(&plan.stage.create)
                .await
                .map_err(|e| rejected(&plan.target.quoted(), "", &e))?;
            self.staged[t] = true;
        }
        Ok(())
    }
}

/// Loads the changed rows into the staging table by binary COPY (after emptying
/// it): each present row's carried values, each deleted row's key (other columns
/// NULL), and the flag.
pub(crate) async fn stage_rows(
    target: &impl tokio_postgres::GenericClient,
    plan: &TablePlan,
    deleted: &[Key],
    inserted: &[&Values],
    changed: &[&Values],
) -> Result<(), tokio_postgres::Error> {
    use crate::plan::{STAGE_CHANGED, STAGE_DELETED, STAGE_INSERTED};
    use tokio_postgres::binary_copy::BinaryCopyInWriter;
    use tokio_postgres::types::Type;
    let width = plan.carried.len();
    let mut types = vec![Type::TEXT; width];
    types.push(Type::INT2);
    // Emptied first: an earlier part of the same target transaction (a large source
    // transaction, a snapshot's earlier chunk) left its rows there.
    target
        .batch_execute(&format!("TRUNCATE {}", plan.stage.table))
        .await?;
    let sink = target
        .client()
        .copy_in::<_, bytes::Bytes>(&plan.stage.copy_in)
        .await?;
    let writer = BinaryCopyInWriter::new(sink, &types);
    futures::pin_mut!(writer);
    let mut row: Vec<&(dyn ToSql + Sync)> = Vec::with_capacity(width + 1);
    for (rows, kind) in [(inserted, &STAGE_INSERTED), (changed, &STAGE_CHANGED)] {
        for values in rows {
            row.clear();
            row.extend(values.iter().map(|v| v as &(dyn ToSql + Sync)));
            row.push(kind);
            writer.as_mut().write(&row).await?;
        }
    }
    if !deleted.is_empty() {
        let positions: Vec<Option<usize>> = plan
            .carried
            .iter()
            .map(|c| plan.source_key().iter().position(|k| *k == c.name))
            .collect();
        let null: Option<String> = None;
        for key in deleted {
            row.clear();
            row.extend(positions.iter().map(|p| match p.and_then(|i| key.get(i)) {
                Some(v) => v as &(dyn ToSql + Sync),
                None => &null as &(dyn ToSql + Sync),
            }));
            row.push(&STAGE_DELETED);
            writer.as_mut().write(&row).await?;
        }
    }
    writer.finish().await?;
    Ok(())
}

/// Applies one table's large batch: the rows it inserted straight into the target
/// by COPY when the mapping only copies columns of the same types (under a
/// savepoint: if one is already there, they are staged with the rest instead),
/// everything else through the staging table. Returns the present rows written
/// (or why not) and the rows deleted.
pub(crate) async fn apply_staged(
    db: &impl tokio_postgres::GenericClient,
    plan: &TablePlan,
    deleted: &[Key],
    inserted: &[&Values],
    changed: &[&Values],
) -> (Result<u64, tokio_postgres::Error>, u64) {
    let mut written = 0;
    let mut inserted = inserted;
    if !inserted.is_empty()
        && let Some(direct) = &plan.direct_copy
    {
        match copy_direct(db, direct, inserted).await {
            Ok(n) => {
                written += n;
                inserted = &[];
            }
            Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION) => {}
            Err(e) => return (Err(e), 0),
        }
    }
    if deleted.is_empty() && inserted.is_empty() && changed.is_empty() {
        return (Ok(written), 0);
    }
    if let Err(e) = stage_rows(db, plan, deleted, inserted, changed).await {
        return (Err(e), 0);
    }
    let mut removed = 0;
    if !deleted.is_empty() {
        match db.execute(&plan.stage.delete, &[]).await {
            Ok(n) => removed = n,
            Err(e) => return (Err(e), 0),
        }
    }
    let n = write_staged(db, plan, !inserted.is_empty(), !changed.is_empty()).await;
    let n = match (n, &plan.stage.filtered_out) {
        (Ok(n), Some(sql)) if !(inserted.is_empty() && changed.is_empty()) => {
            db.execute(sql, &[]).await.map(|m| n + m)
        }
        (n, _) => n,
    };
    (n.map(|n| n + written), removed)
}

/// COPY of the inserted rows straight into the target (text format, the carried
/// values in the target's column order), under a savepoint that is rolled back if
/// the COPY fails.
async fn copy_direct(
    db: &impl tokio_postgres::GenericClient,
    direct: &crate::plan::DirectCopy,
    rows: &[&Values],
) -> Result<u64, tokio_postgres::Error> {
    db.batch_execute("SAVEPOINT strangler_copy").await?;
    let copied = async {
        use futures::SinkExt as _;
        let sink = db.client().copy_in::<_, bytes::Bytes>(&direct.sql).await?;
        futures::pin_mut!(sink);
        let mut buf = bytes::BytesMut::with_capacity(128 * 1024);
        for values in rows {
            for (i, &c) in direct.columns.iter().enumerate() {
                if i > 0 {
                    buf.extend_from_slice(b"\t");
                }
                match values.get(c).and_then(Option::as_deref) {
                    None => buf.extend_from_slice(b"\\N"),
                    Some(v) => copy_text(&mut buf, v),
                }
            }
            buf.extend_from_slice(b"\n");
            if buf.len() >= 64 * 1024 {
                sink.send(buf.split().freeze()).await?;
            }
        }
        if !buf.is_empty() {
            sink.send(buf.split().freeze()).await?;
        }
        sink.finish().await
    }
    .await;
    match copied {
        Ok(n) => {
            db.batch_execute("RELEASE SAVEPOINT strangler_copy").await?;
            Ok(n)
        }
        Err(e) => {
            db.batch_execute(
                "ROLLBACK TO SAVEPOINT strangler_copy; RELEASE SAVEPOINT strangler_copy",
            )
            .await?;
            Err(e)
        }
    }
}

/// Appends `v` as a COPY text field: backslash, tab, newline and carriage return
/// escaped, everything else as is.
fn copy_text(buf: &mut bytes::BytesMut, v: &str) {
    let bytes = v.as_bytes();
    let mut start = 0;
    for (i, b) in bytes.iter().enumerate() {
        let escaped: &[u8] = match b {
            b'\\' => b"\\\\",
            b'\t' => b"\\t",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            _ => continue,
        };
        buf.extend_from_slice(&bytes[start..i]);
        buf.extend_from_slice(escaped);
        start = i + 1;
    }
    buf.extend_from_slice(&bytes[start..]);
}

/// Writes the staged rows that are present: those the batch inserted by plain
/// INSERT under a savepoint (when one is already in the target after all, e.g.
/// written there directly, the savepoint is rolled back and every present row is
/// upserted instead), those it changed by upsert. Returns the rows written.
pub(crate) async fn write_staged(
    db: &impl tokio_postgres::GenericClient,
    plan: &TablePlan,
    inserted: bool,
    changed: bool,
) -> Result<u64, tokio_postgres::Error> {
    if !inserted {
        return if changed {
            db.execute(&plan.stage.upsert_changed, &[]).await
        } else {
            Ok(0)
        };
    }
    db.batch_execute("SAVEPOINT strangler_insert").await?;
    match db.execute(&plan.stage.insert, &[]).await {
        Ok(n) => {
            db.batch_execute("RELEASE SAVEPOINT strangler_insert")
                .await?;
            let m = if changed {
                db.execute(&plan.stage.upsert_changed, &[]).await?
            } else {
                0
            };
            Ok(n + m)
        }
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION) => {
            db.batch_execute(
                "ROLLBACK TO SAVEPOINT strangler_insert; RELEASE SAVEPOINT strangler_insert",
            )
            .await?;
            db.execute(&plan.stage.upsert, &[]).await
        }
        Err(e) => Err(e),
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
    tx: &impl tokio_postgres::GenericClient,
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
    tx: &impl tokio_postgres::GenericClient,
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
