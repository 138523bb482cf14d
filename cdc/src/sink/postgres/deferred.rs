//! A snapshot loads the target tables without their keys, indexes and foreign keys
//! and builds them afterwards, as `pg_dump` and `pgcopydb` do: one sort per index at
//! the end costs far less than maintaining every index row by row during `COPY`,
//! and foreign keys are checked once, for the whole table.
//!
//! What is set aside is written down first, in `strangler.cdc_deferred`, in the
//! same transaction that drops it: a snapshot killed half-way leaves the
//! definitions there, and the next run restores them before anything else. Kept
//! during the load: CHECK and NOT NULL (checked per row, cheap), exclusion
//! constraints, the index used as replica identity, and any primary key or unique
//! index that a table outside the snapshot references with a foreign key (dropping
//! it would need that foreign key to go too).

use tokio_postgres::Client;

use crate::error::CdcError;

/// Where set-aside definitions wait.
pub const DEFERRED_TABLE: &str = "strangler.cdc_deferred";

// Record kinds, built back in this order: keys, then indexes, then foreign keys
// (which need the keys they point at).
const KEY: &str = "key";
const INDEX: &str = "index";
const FOREIGN_KEY: &str = "foreign key";

const DDL: &str = "CREATE SCHEMA IF NOT EXISTS strangler; \
     CREATE TABLE IF NOT EXISTS strangler.cdc_deferred (\
         slot text NOT NULL, \
         kind text NOT NULL, \
         table_name text NOT NULL, \
         name text NOT NULL, \
         definition text NOT NULL, \
         PRIMARY KEY (slot, kind, table_name, name))";

fn failed(what: &str, e: &tokio_postgres::Error) -> CdcError {
    let message = match e.as_db_error() {
        Some(d) => d.message().to_string(),
        None => e.to_string(),
    };
    CdcError::Deferred {
        what: what.to_string(),
        message,
    }
}

/// What [`set_aside`] took off and [`restore`] put back.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Deferred {
    /// Primary keys and unique constraints.
    pub keys: usize,
    /// Indexes that back no constraint.
    pub indexes: usize,
    /// Foreign keys.
    pub foreign_keys: usize,
}

/// Records and drops the secondary indexes and foreign keys of `tables` (quoted
/// names), for the snapshot of stream `slot`.
pub async fn set_aside(
    target: &Client,
    slot: &str,
    tables: &[String],
) -> Result<Deferred, CdcError> {
    target
        .batch_execute(DDL)
        .await
        .map_err(|e| failed("creating strangler.cdc_deferred", &e))?;
    target
        .batch_execute("BEGIN")
        .await
        .map_err(|e| failed("setting indexes aside", &e))?;
    let result = set_aside_in_transaction(target, slot, tables).await;
    let end = if result.is_ok() { "COMMIT" } else { "ROLLBACK" };
    target
        .batch_execute(end)
        .await
        .map_err(|e| failed("setting indexes aside", &e))?;
    result
}

async fn set_aside_in_transaction(
    tx: &Client,
    slot: &str,
    tables: &[String],
) -> Result<Deferred, CdcError> {
    // Whether a table outside the snapshot points a foreign key at this one.
    const REFERENCED_FROM_OUTSIDE: &str = "EXISTS (SELECT 1 FROM pg_constraint f
        WHERE f.contype = 'f' AND f.confrelid = t.oid AND NOT f.conrelid = ANY($1::text[]::regclass[]))";
    let keys = tx
        .query(
            &format!(
                "SELECT c.conrelid::regclass::text, quote_ident(c.conname), pg_get_constraintdef(c.oid)
                 FROM pg_constraint c JOIN pg_class t ON t.oid = c.conrelid
                 JOIN pg_index i ON i.indexrelid = c.conindid
                 WHERE c.contype IN ('p', 'u') AND c.conrelid = ANY($1::text[]::regclass[])
                   AND NOT i.indisreplident AND NOT {REFERENCED_FROM_OUTSIDE}
                 ORDER BY 1, 2"
            ),
            &[&tables],
        )
        .await
        .map_err(|e| failed("listing the target's keys", &e))?;
    let indexes = tx
        .query(
            &format!(
                "SELECT i.indrelid::regclass::text, i.indexrelid::regclass::text, pg_get_indexdef(i.indexrelid)
                 FROM pg_index i JOIN pg_class t ON t.oid = i.indrelid
                 WHERE i.indrelid = ANY($1::text[]::regclass[]) AND NOT i.indisreplident
                   AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conindid = i.indexrelid)
                   AND (NOT i.indisunique OR NOT {REFERENCED_FROM_OUTSIDE})
                 ORDER BY 1, 2"
            ),
            &[&tables],
        )
        .await
        .map_err(|e| failed("listing the target's indexes", &e))?;
    let foreign_keys = tx
        .query(
            "SELECT c.conrelid::regclass::text, quote_ident(c.conname), pg_get_constraintdef(c.oid)
             FROM pg_constraint c
             WHERE c.contype = 'f' AND c.conrelid = ANY($1::text[]::regclass[])
             ORDER BY 1, 2",
            &[&tables],
        )
        .await
        .map_err(|e| failed("listing the target's foreign keys", &e))?;
    for (kind, rows) in [
        (KEY, &keys),
        (INDEX, &indexes),
        (FOREIGN_KEY, &foreign_keys),
    ] {
        for row in rows {
            let (table, name, definition): (String, String, String) =
                (row.get(0), row.get(1), row.get(2));
            tx.execute(
                "INSERT INTO strangler.cdc_deferred (slot, kind, table_name, name, definition)
                 VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
                &[&slot, &kind, &table, &name, &definition],
            )
            .await
            .map_err(|e| failed("recording a definition", &e))?;
        }
    }
    // Foreign keys first (they depend on the keys they point at), then keys.
    for row in foreign_keys.iter().chain(&keys) {
        let (table, name): (String, String) = (row.get(0), row.get(1));
        tx.batch_execute(&format!("ALTER TABLE {table} DROP CONSTRAINT {name}"))
            .await
            .map_err(|e| failed(&format!("dropping {name} on {table}"), &e))?;
    }
    for row in &indexes {
        let name: String = row.get(1);
        tx.batch_execute(&format!("DROP INDEX {name}"))
            .await
            .map_err(|e| failed(&format!("dropping index {name}"), &e))?;
    }
    Ok(Deferred {
        keys: keys.len(),
        indexes: indexes.len(),
        foreign_keys: foreign_keys.len(),
    })
}

/// Builds back whatever `slot`'s snapshot set aside: keys, indexes, then foreign
/// keys (checked against the loaded rows). Each is removed from the record once it
/// exists, so an interrupted restore resumes where it stopped.
pub async fn restore(target: &Client, slot: &str) -> Result<Deferred, CdcError> {
    let pending = match target
        .query(
            "SELECT kind, table_name, name, definition FROM strangler.cdc_deferred
             WHERE slot = $1
             ORDER BY CASE kind WHEN 'key' THEN 0 WHEN 'index' THEN 1 ELSE 2 END, table_name, name",
            &[&slot],
        )
        .await
    {
        Ok(rows) => rows,
        // No table yet: nothing was ever set aside.
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE) => {
            return Ok(Deferred::default());
        }
        Err(e) => return Err(failed("reading strangler.cdc_deferred", &e)),
    };
    let mut done = Deferred::default();
    // Index builds may use more memory than a session's default.
    let _ = target
        .batch_execute("SET maintenance_work_mem = '256MB'")
        .await;
    for row in &pending {
        let (kind, table, name, definition): (String, String, String, String) =
            (row.get(0), row.get(1), row.get(2), row.get(3));
        let exists: bool = if kind == INDEX {
            target
                .query_one("SELECT to_regclass($1) IS NOT NULL", &[&name])
                .await
                .map_err(|e| failed("looking up an index", &e))?
                .get(0)
        } else {
            target
                .query_one(
                    "SELECT EXISTS (SELECT 1 FROM pg_constraint
                     WHERE conrelid = $1::text::regclass AND quote_ident(conname) = $2)",
                    &[&table, &name],
                )
                .await
                .map_err(|e| failed("looking up a constraint", &e))?
                .get(0)
        };
        if !exists {
            let sql = if kind == INDEX {
                definition.clone()
            } else {
                format!("ALTER TABLE {table} ADD CONSTRAINT {name} {definition}")
            };
            target
                .batch_execute(&sql)
                .await
                .map_err(|e| failed(&format!("restoring {kind} {name} on {table}"), &e))?;
        }
        target
            .execute(
                "DELETE FROM strangler.cdc_deferred WHERE slot = $1 AND kind = $2 AND table_name = $3 AND name = $4",
                &[&slot, &kind, &table, &name],
            )
            .await
            .map_err(|e| failed("clearing a restored definition", &e))?;
        match kind.as_str() {
            KEY => done.keys += 1,
            INDEX => done.indexes += 1,
            _ => done.foreign_keys += 1,
        }
    }
    let _ = target.batch_execute("RESET maintenance_work_mem").await;
    Ok(done)
}
