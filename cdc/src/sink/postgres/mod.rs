//! PostgreSQL as the target: batches applied in one transaction with the
//! checkpoint (`strangler.cdc_checkpoint`), large ones through a per-session
//! staging table loaded by binary COPY and written by set-based statements that
//! run each mapping, a large source transaction applied in parts that commit
//! together, and the snapshot's table preparation.

pub mod conflict;
pub mod deferred;
pub mod requests;

use async_trait::async_trait;
use tokio_postgres::Client;
use tokio_postgres::types::ToSql;

use crate::batch::{Batch, TableChanges};
use crate::error::{ApplyError, CdcError};
use crate::model::{Applied, Before, Key, Lsn, Values};
use crate::pg::{db_message, execute, transpose};
use crate::plan::{TablePlan, ident};
use crate::sink::Sink;

/// Schema and table of the checkpoint kept in the target.
pub const CHECKPOINT_TABLE: &str = "strangler.cdc_checkpoint";

/// A PostgreSQL target.
pub struct PgSink(pub Client, pub Session);

impl PgSink {
    /// A sink writing through `client`.
    pub fn new(client: Client) -> Self {
        Self(client, Session::default())
    }
}

#[async_trait]
impl Sink for PgSink {
    async fn apply(
        &mut self,
        batch: &mut Batch,
        plans: &[TablePlan],
        slot: &str,
    ) -> Result<Applied, ApplyError> {
        apply_batch(batch, &mut self.0, plans, slot, &mut self.1).await
    }

    async fn read_checkpoint(
        &mut self,
        slot: &str,
    ) -> Result<Option<(Lsn, Option<String>)>, ApplyError> {
        read_checkpoint(&self.0, slot).await
    }

    async fn write_checkpoint(
        &mut self,
        slot: &str,
        lsn: Lsn,
        gtid: Option<&str>,
    ) -> Result<(), ApplyError> {
        write_checkpoint(&self.0, slot, lsn, gtid).await
    }

    async fn forget_checkpoint(&mut self, slot: &str) -> Result<(), ApplyError> {
        self.0
            .execute(
                &format!("DELETE FROM {CHECKPOINT_TABLE} WHERE slot = $1"),
                &[&slot],
            )
            .await
            .map(drop)
            .map_err(ApplyError::Checkpoint)
    }

    async fn begin_snapshot(&mut self, slot: &str, plans: &[TablePlan]) -> Result<(), CdcError> {
        // Emptied together (foreign keys between them), so page ranges of one table
        // can load in parallel.
        let tables: Vec<String> = plans.iter().map(|p| p.target.quoted()).collect();
        self.0
            .batch_execute(&format!("TRUNCATE {}", tables.join(", ")))
            .await
            .map_err(|e| CdcError::Snapshot {
                table: tables.join(", "),
                message: db_message(&e),
            })?;
        let deferred = deferred::set_aside(&self.0, slot, &tables).await?;
        if deferred != deferred::Deferred::default() {
            tracing::info!(
                keys = deferred.keys,
                indexes = deferred.indexes,
                foreign_keys = deferred.foreign_keys,
                "keys, indexes and foreign keys set aside until the snapshot is loaded"
            );
        }
        Ok(())
    }

    async fn end_snapshot(&mut self, slot: &str) -> Result<(), CdcError> {
        let started = std::time::Instant::now();
        let built = deferred::restore(&self.0, slot).await?;
        if built != deferred::Deferred::default() {
            tracing::info!(
                keys = built.keys,
                indexes = built.indexes,
                foreign_keys = built.foreign_keys,
                seconds = started.elapsed().as_secs_f64(),
                "keys, indexes and foreign keys built"
            );
        }
        Ok(())
    }

    fn applies_parts(&self) -> bool {
        true
    }
}

/// Applies the batch to a PostgreSQL target: in the target transaction `open`
/// says is already begun (an earlier part of the same source transaction), or a
/// new one. A whole batch commits with the checkpoint; a part of a source
/// transaction still being received ([`Batch::open`]) leaves the transaction
/// open for the next part, so a large transaction is applied while it is still
/// being decoded and yet lands atomically. On an error the transaction is rolled
/// back (nothing of it is kept: the stream resumes from the checkpoint).
pub async fn apply_batch(
    batch: &mut Batch,
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
    let result = apply_open(batch, target, plans, slot, session).await;
    if result.is_err() && session.in_transaction {
        session.in_transaction = false;
        let _ = target.batch_execute("ROLLBACK").await;
    }
    let applied = result?;
    if !batch.open {
        target
            .batch_execute("COMMIT")
            .await
            .map_err(|e| rejected("the target", "", &e))?;
        session.in_transaction = false;
    }
    batch.reset();
    Ok(applied)
}

async fn apply_open(
    batch: &mut Batch,
    target: &mut Client,
    plans: &[TablePlan],
    slot: &str,
    session: &mut Session,
) -> Result<Applied, ApplyError> {
    let mut written = 0u64;
    let mut conflicts = 0u64;
    for (t, plan) in plans.iter().enumerate() {
        let table = plan.target.quoted();
        let mut changes = batch.take_table(t);
        if changes.truncated {
            target
                .batch_execute(&format!("TRUNCATE {table}"))
                .await
                .map_err(|e| rejected(&table, "", &e))?;
        }
        if plan.conflict.detects() {
            conflicts += conflict::resolve(&*target, plan, &mut changes).await?;
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
            let mut inserted: Vec<&Values> = Vec::new();
            let mut changed: Vec<&Values> = Vec::new();
            for (k, v) in &present {
                if matches!(before.get(k), Some(Some(Before::Absent))) {
                    inserted.push(v);
                } else {
                    changed.push(v);
                }
            }
            let (n, deletes) = apply_staged(&*target, plan, &deleted, &inserted, &changed).await;
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
    if !batch.open
        && let Some(end) = &batch.end
    {
        write_checkpoint(&*target, slot, end.checkpoint(), end.gtid()).await?;
    }
    Ok(Applied {
        rows: written,
        conflicts,
    })
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
            // A row already there, or a value the target reads differently from
            // text than the mapping's cast does: the staging path decides.
            Err(e) if e.as_db_error().is_some() => {
                tracing::debug!(table = %plan.target.quoted(), "direct COPY refused ({e}); staging instead");
            }
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

fn rejected(table: &str, key: &str, e: &tokio_postgres::Error) -> ApplyError {
    ApplyError::Rejected {
        table: table.to_string(),
        key: key.to_string(),
        message: db_message(e),
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
            requests::REQUESTS_DDL
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
    gtid: Option<&str>,
) -> Result<(), ApplyError> {
    target
        .execute(
            &format!(
                "INSERT INTO {CHECKPOINT_TABLE} (slot, lsn, gtid, updated_at) VALUES ($1, $2::text::pg_lsn, $3, now()) \
                 ON CONFLICT (slot) DO UPDATE SET lsn = EXCLUDED.lsn, gtid = coalesce(EXCLUDED.gtid, {CHECKPOINT_TABLE}.gtid), updated_at = now()"
            ),
            &[&slot, &lsn.to_string(), &gtid],
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
            // 55006 object_in_use: "replication origin … is already active for PID …".
            // (Matched by code: the error's Display is only "db error", so the text
            // match this replaced never fired and a quick restart stopped the run.)
            Err(e)
                if attempts < 50
                    && e.code() == Some(&tokio_postgres::error::SqlState::OBJECT_IN_USE) =>
            {
                attempts += 1;
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            Err(e) => return Err(ApplyError::Checkpoint(e)),
        }
    }
}

/// The position applied for `slot`, if any.
pub async fn read_checkpoint(
    target: &Client,
    slot: &str,
) -> Result<Option<(Lsn, Option<String>)>, ApplyError> {
    let row = target
        .query_opt(
            &format!("SELECT lsn::text, gtid FROM {CHECKPOINT_TABLE} WHERE slot = $1"),
            &[&slot],
        )
        .await
        .map_err(ApplyError::Checkpoint)?;
    Ok(row.and_then(|r| {
        let lsn = r.get::<_, String>(0).parse().ok()?;
        Some((lsn, r.get::<_, Option<String>>(1)))
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_text_escapes_backslash_tab_newline_and_carriage_return_only() {
        let mut buf = bytes::BytesMut::new();
        copy_text(&mut buf, "a\\b\tc\nd\re é\\N");
        assert_eq!(&buf[..], "a\\\\b\\tc\\nd\\re é\\\\N".as_bytes());
        let mut plain = bytes::BytesMut::new();
        copy_text(&mut plain, "plain text, 'quoted' and \"double\"");
        assert_eq!(&plain[..], b"plain text, 'quoted' and \"double\"");
    }
}
