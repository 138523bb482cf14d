//! MySQL/MariaDB as the target, for the reverse direction (new → legacy): the
//! mapping runs on the PostgreSQL source (it is PostgreSQL SQL), the mapped rows
//! are written to MySQL with the checkpoint (`strangler_cdc_checkpoint`) in one
//! MySQL transaction, under a server id of its own so the forward stream skips
//! them.

use mysql_async::prelude::Queryable;
use mysql_async::{Conn, Value};
use tokio_postgres::Client;

use crate::batch::Batch;
use crate::config::CdcConfig;
use crate::error::{ApplyError, CdcError, CheckError};
use crate::model::{Applied, Lsn};
use crate::mysql::{MysqlFailure, describe, mysql_conn, mysql_error, q, value_text};
use crate::pg::connect;
use crate::pg::text_rows;
use crate::plan::TablePlan;
use crate::sink::Sink;
use crate::sink::settle::{Candidates, Settle, drop_changes, log, map_rows, settle, target_key};

/// How a mapped value (PostgreSQL text) is written into a MySQL column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Render {
    Plain,
    /// `tinyint(1)`/`bit(1)`: PostgreSQL's `true`/`false` become 1/0.
    Bool,
    /// `datetime`/`timestamp`: the UTC offset PostgreSQL prints is dropped (both
    /// sessions run in UTC).
    DateTime,
    /// Binary columns: PostgreSQL's `\x…` hex becomes bytes.
    Binary,
}

fn into_kind(column_type: &str) -> Render {
    let t = column_type.to_ascii_lowercase();
    if t.starts_with("tinyint(1)") || t.starts_with("bit(1)") {
        Render::Bool
    } else if t.starts_with("datetime") || t.starts_with("timestamp") {
        Render::DateTime
    } else if t.contains("binary") || t.contains("blob") {
        Render::Binary
    } else {
        Render::Plain
    }
}

fn to_mysql(v: Option<&str>, kind: Render) -> Value {
    let Some(v) = v else {
        return Value::NULL;
    };
    match kind {
        Render::Plain => Value::Bytes(v.as_bytes().to_vec()),
        Render::Bool => Value::Bytes(
            match v {
                "true" | "t" => "1",
                "false" | "f" => "0",
                other => other,
            }
            .as_bytes()
            .to_vec(),
        ),
        Render::DateTime => {
            // `2026-11-27 02:31:23.123+00` or `…+00:00`
            let cut = v
                .rfind(['+', '-'])
                .filter(|i| *i > 10 && v[..*i].contains(':'))
                .unwrap_or(v.len());
            Value::Bytes(v.as_bytes()[..cut].to_vec())
        }
        Render::Binary => match v.strip_prefix("\\x") {
            Some(hex) => Value::Bytes(
                (0..hex.len() / 2)
                    .filter_map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok())
                    .collect(),
            ),
            None => Value::Bytes(v.as_bytes().to_vec()),
        },
    }
}

/// The checkpoint table a MySQL target keeps (in its own database).
pub const MYSQL_CHECKPOINT_TABLE: &str = "strangler_cdc_checkpoint";

/// A MySQL/MariaDB target (the reverse direction: new service → legacy). The
/// mapping's expressions are PostgreSQL SQL, so PostgreSQL (the source) computes
/// each batch's target rows from the carried values; the rows are then written with
/// `INSERT … ON DUPLICATE KEY UPDATE` in one MySQL transaction with the checkpoint.
/// The session runs with `server_id` set to the stream's own id, so a forward
/// stream reading this binlog (`ignore_server_ids`) skips what it wrote.
pub struct MySqlSink {
    conn: Conn,
    eval: Client,
    kinds: Vec<Vec<Render>>,
}

/// A server id for an origin name (stable, away from small hand-picked ids).
pub fn server_id_for(origin: &str) -> u32 {
    1_000_000
        + origin
            .bytes()
            .fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(u32::from(b)))
            % 1_000_000
}

impl MySqlSink {
    /// Connects, checks every mapping (PostgreSQL source table → MySQL target table)
    /// and prepares the session; returns the sink and the plans.
    pub async fn connect(
        config: &CdcConfig,
        source: &Client,
    ) -> Result<(Self, Vec<TablePlan>), CdcError> {
        let mut conn = mysql_conn(&config.target).await?;
        let server_id = config
            .target_server_id
            .unwrap_or_else(|| server_id_for(&config.origin));
        conn.query_drop(format!("SET SESSION server_id = {server_id}"))
            .await
            .map_err(|e| {
                mysql_error(format!(
                    "setting the session's server_id (needs SUPER or BINLOG ADMIN): {e}"
                ))
            })?;
        conn.query_drop(format!(
            "CREATE TABLE IF NOT EXISTS {MYSQL_CHECKPOINT_TABLE} (slot VARCHAR(64) PRIMARY KEY, lsn VARCHAR(32) NOT NULL, \
             updated_at TIMESTAMP(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6) ON UPDATE CURRENT_TIMESTAMP(6))"
        ))
        .await
        .map_err(mysql_error)?;
        let db: Option<String> = conn
            .query_first("SELECT DATABASE()")
            .await
            .map_err(mysql_error)?;
        let db = db.unwrap_or_default();
        let eval = connect(&config.source, "source").await?;
        eval.batch_execute("SET TimeZone = 'UTC'")
            .await
            .map_err(CdcError::Source)?;
        let mut plans = Vec::new();
        let mut kinds = Vec::new();
        for mapping in &config.mappings {
            let fail = |message: String| {
                CdcError::Check(CheckError::Schema {
                    target: mapping.target.clone(),
                    message,
                })
            };
            let source_table = crate::plan::describe(
                source,
                "source",
                &mapping.source_schema,
                &mapping.source_table,
            )
            .await?
            .ok_or_else(|| {
                fail(format!(
                    "source table {}.{} does not exist",
                    mapping.source_schema, mapping.source_table
                ))
            })?;
            let (ts, tn) = match mapping.target.split_once('.') {
                Some((s, t)) => (s.to_string(), t.to_string()),
                None => (db.clone(), mapping.target.clone()),
            };
            let (target, _) = describe(&mut conn, &ts, &tn)
                .await?
                .ok_or_else(|| fail(format!("target table {ts}.{tn} does not exist")))?;
            let plan = crate::plan::check_tables(mapping, source_table, target)?
                .with_conflict(config.conflicts.get(plans.len()))?;
            let statements = [
                Some(&plan.rows_text_sql),
                Some(&plan.values_sql),
                plan.filtered_out_keys_sql.as_ref(),
                Some(&plan.delete_keys_sql),
            ];
            crate::plan::prepare_all(
                &eval,
                statements.into_iter().flatten(),
                mapping,
                "PostgreSQL",
            )
            .await?;
            kinds.push(
                plan.mapping
                    .outputs
                    .iter()
                    .map(|o| {
                        plan.target
                            .columns
                            .iter()
                            .find(|c| c.name == o.column)
                            .map_or(Render::Plain, |c| into_kind(&c.type_sql))
                    })
                    .collect(),
            );
            plans.push(plan);
        }
        Ok((Self { conn, eval, kinds }, plans))
    }
}

/// Runs mapping SQL on the PostgreSQL source for a MySQL target; rows as text.
async fn eval_pg(
    eval: &Client,
    sql: &str,
    columns: &[Vec<Option<String>>],
) -> Result<Vec<Vec<Option<String>>>, ApplyError> {
    text_rows(eval, sql, columns)
        .await
        .map_err(|e| ApplyError::Rejected {
            table: "(mapping on the source)".into(),
            key: String::new(),
            message: e.to_string(),
        })
}

/// Conflict detection and resolution for a MySQL target, inside its transaction: a
/// row whose target version is no longer the change's mapped old row (compared by
/// MySQL itself, `<=>` per column, so its own types decide equality) was changed on
/// both sides. Returns how many; drops the incoming change where the target wins.
/// The bookkeeping and the policy are `conflict`'s; only the reads are MySQL's.
async fn resolve_mysql(
    tx: &mut mysql_async::Transaction<'_>,
    eval: &Client,
    plan: &TablePlan,
    kinds: &[Render],
    ch: &mut crate::batch::TableChanges,
) -> Result<u64, ApplyError> {
    use crate::conflict::Winner;
    let c = Candidates::of(ch);
    if c.keys.is_empty() {
        return Ok(0);
    }
    let incoming = map_rows(eval, &plan.rows_text_sql, plan, &c.incoming).await?;
    let expected = map_rows(eval, &plan.rows_text_sql, plan, &c.before).await?;
    let table = format!("{}.{}", q(&plan.target.schema), q(&plan.target.name));
    let key_match = plan
        .target
        .key
        .iter()
        .map(|k| format!("{} = ?", q(k)))
        .collect::<Vec<_>>()
        .join(" AND ");
    let cols: Vec<String> = plan.mapping.outputs.iter().map(|o| q(&o.column)).collect();
    let same_sql = format!(
        "SELECT {} FROM {table} WHERE {key_match}",
        cols.iter()
            .map(|c| format!("{c} <=> ?"))
            .collect::<Vec<_>>()
            .join(" AND ")
    );
    let mut skip = Vec::new();
    let mut found = 0u64;
    for k in &c.keys {
        let was = expected.get(*k).cloned().flatten();
        let new = incoming.get(*k).cloned().flatten();
        let Some(basis) = was.as_ref().or(new.as_ref()) else {
            continue;
        };
        let tkey = target_key(plan, basis);
        let key_params: Vec<Value> = tkey
            .iter()
            .map(|v| to_mysql(v.as_deref(), Render::Plain))
            .collect();
        let same = match &was {
            Some(row) => {
                let mut params: Vec<Value> = row
                    .iter()
                    .zip(kinds)
                    .map(|(v, kind)| to_mysql(v.as_deref(), *kind))
                    .collect();
                params.extend(key_params.iter().cloned());
                let r: Option<Option<i64>> = tx
                    .exec_first(&same_sql, params)
                    .await
                    .map_err(|e| sink_error(&table, e))?;
                r.flatten() == Some(1)
            }
            None => {
                let r: Option<i64> = tx
                    .exec_first(
                        format!("SELECT 1 FROM {table} WHERE {key_match}"),
                        key_params.clone(),
                    )
                    .await
                    .map_err(|e| sink_error(&table, e))?;
                r.is_none()
            }
        };
        if same {
            continue;
        }
        found += 1;
        let current: Option<Vec<Option<String>>> = tx
            .exec_first::<mysql_async::Row, _, _>(
                format!("SELECT {} FROM {table} WHERE {key_match}", cols.join(", ")),
                key_params.clone(),
            )
            .await
            .map_err(|e| sink_error(&table, e))?
            .map(|r| {
                r.unwrap()
                    .iter()
                    .map(|v| (*v != Value::NULL).then(|| value_text(v)))
                    .collect()
            });
        let winner = match settle(plan, &tkey, new.as_ref(), current.as_ref()).await? {
            Settle::Winner(w) => w,
            Settle::Newer(i) => {
                // `newer:` on MySQL: the incoming value against the column, by MySQL's types.
                let incoming_value = new.as_ref().and_then(|r| r.get(i).cloned().flatten());
                let mut params = vec![to_mysql(
                    incoming_value.as_deref(),
                    kinds.get(i).copied().unwrap_or(Render::Plain),
                )];
                params.extend(key_params.iter().cloned());
                let r: Option<Option<i64>> = tx
                    .exec_first(
                        format!("SELECT ? >= {} FROM {table} WHERE {key_match}", cols[i]),
                        params,
                    )
                    .await
                    .map_err(|e| sink_error(&table, e))?;
                if r.flatten() == Some(0) {
                    Winner::Target
                } else {
                    Winner::Source
                }
            }
        };
        log(plan, &tkey, new.as_ref(), current.as_ref(), winner);
        if winner == Winner::Target {
            skip.push((*k).clone());
        }
    }
    drop_changes(ch, &skip);
    Ok(found)
}

fn sink_error(table: &str, e: mysql_async::Error) -> ApplyError {
    if e.lost_connection() {
        return ApplyError::Lost {
            table: table.to_string(),
            message: e.to_string(),
        };
    }
    ApplyError::Rejected {
        table: table.to_string(),
        key: String::new(),
        message: e.to_string(),
    }
}

#[async_trait::async_trait]
impl Sink for MySqlSink {
    async fn apply(
        &mut self,
        batch: &mut Batch,
        plans: &[TablePlan],
        slot: &str,
    ) -> Result<Applied, ApplyError> {
        let Self { conn, eval, kinds } = self;
        let mut tx = conn
            .start_transaction(mysql_async::TxOpts::default())
            .await
            .map_err(|e| sink_error("the target", e))?;
        // Per table: conflicts first (reading the target inside the transaction),
        // then the target rows (computed by PostgreSQL), then all writes.
        let mut work = Vec::new();
        let mut conflicts = 0u64;
        for (t, plan) in plans.iter().enumerate() {
            let mut ch = batch.take_table(t);
            if !ch.partial.is_empty() {
                return Err(ApplyError::Unsafe(format!(
                    "{}: an update left a large column unsent (unchanged TOAST); set REPLICA IDENTITY FULL on it \
                     so a MySQL target gets whole rows",
                    plan.source.quoted()
                )));
            }
            if plan.conflict.detects() {
                conflicts += resolve_mysql(&mut tx, eval, plan, &kinds[t], &mut ch).await?;
            }
            let deleted = if ch.deleted.is_empty() {
                Vec::new()
            } else {
                eval_pg(
                    eval,
                    &plan.delete_keys_sql,
                    &crate::pg::transpose(plan.source_key().len(), ch.deleted.iter()),
                )
                .await?
            };
            let (present, filtered_out) = if ch.present.is_empty() {
                (Vec::new(), Vec::new())
            } else {
                let carried =
                    crate::pg::transpose(plan.carried.len(), ch.present.iter().map(|(_, v)| v));
                let present = eval_pg(eval, &plan.values_sql, &carried).await?;
                let gone = match &plan.filtered_out_keys_sql {
                    Some(sql) => eval_pg(eval, sql, &carried).await?,
                    None => Vec::new(),
                };
                (present, gone)
            };
            work.push((ch.truncated, deleted, present, filtered_out));
        }
        let mut written = 0u64;
        for ((plan, kinds), (truncated, deleted, present, filtered_out)) in
            plans.iter().zip(kinds.iter()).zip(work)
        {
            let table = format!("{}.{}", q(&plan.target.schema), q(&plan.target.name));
            if truncated {
                // TRUNCATE would commit the transaction in MySQL.
                tx.query_drop(format!("DELETE FROM {table}"))
                    .await
                    .map_err(|e| sink_error(&table, e))?;
            }
            let key_match = plan
                .target
                .key
                .iter()
                .map(|k| format!("{} = ?", q(k)))
                .collect::<Vec<_>>()
                .join(" AND ");
            let delete = format!("DELETE FROM {table} WHERE {key_match}");
            for key in deleted.iter().chain(&filtered_out) {
                let params: Vec<Value> = key
                    .iter()
                    .map(|v| to_mysql(v.as_deref(), Render::Plain))
                    .collect();
                tx.exec_drop(&delete, params)
                    .await
                    .map_err(|e| sink_error(&table, e))?;
                written += tx.affected_rows();
            }
            if !present.is_empty() {
                let cols: Vec<&str> = plan
                    .mapping
                    .outputs
                    .iter()
                    .map(|o| o.column.as_str())
                    .collect();
                let updates: Vec<String> = cols
                    .iter()
                    .filter(|c| !plan.target.key.iter().any(|k| k == *c))
                    .map(|c| format!("{0} = VALUES({0})", q(c)))
                    .collect();
                let sql = format!(
                    "INSERT INTO {table} ({}) VALUES ({}) ON DUPLICATE KEY UPDATE {}",
                    cols.iter().map(|c| q(c)).collect::<Vec<_>>().join(", "),
                    vec!["?"; cols.len()].join(", "),
                    if updates.is_empty() {
                        format!("{0} = {0}", q(cols[0]))
                    } else {
                        updates.join(", ")
                    }
                );
                for row in &present {
                    let params: Vec<Value> = row
                        .iter()
                        .zip(kinds)
                        .map(|(v, k)| to_mysql(v.as_deref(), *k))
                        .collect();
                    tx.exec_drop(&sql, params).await.map_err(|e| {
                        if e.lost_connection() {
                            return sink_error(&table, e);
                        }
                        let key = plan
                            .target
                            .key
                            .iter()
                            .filter_map(|k| cols.iter().position(|c| c == k).map(|i| (k, &row[i])))
                            .map(|(k, v)| format!("{k}={}", v.as_deref().unwrap_or("NULL")))
                            .collect::<Vec<_>>()
                            .join(", ");
                        ApplyError::Rejected {
                            table: table.clone(),
                            key: format!(" (target key {key})"),
                            message: e.to_string(),
                        }
                    })?;
                    written += 1;
                }
            }
        }
        tx.exec_drop(
            format!(
                "INSERT INTO {MYSQL_CHECKPOINT_TABLE} (slot, lsn) VALUES (?, ?) ON DUPLICATE KEY UPDATE lsn = VALUES(lsn)"
            ),
            (
                slot,
                batch
                    .end
                    .as_ref()
                    .map(|p| p.checkpoint())
                    .unwrap_or_default()
                    .to_string(),
            ),
        )
        .await
        .map_err(|e| sink_error(MYSQL_CHECKPOINT_TABLE, e))?;
        tx.commit().await.map_err(|e| sink_error("the target", e))?;
        batch.reset();
        Ok(Applied {
            rows: written,
            conflicts,
        })
    }

    async fn read_checkpoint(
        &mut self,
        slot: &str,
    ) -> Result<Option<(Lsn, Option<String>)>, ApplyError> {
        let lsn: Option<String> = self
            .conn
            .exec_first(
                format!("SELECT lsn FROM {MYSQL_CHECKPOINT_TABLE} WHERE slot = ?"),
                (slot,),
            )
            .await
            .map_err(|e| sink_error(MYSQL_CHECKPOINT_TABLE, e))?;
        Ok(lsn.and_then(|l| l.parse().ok()).map(|l| (l, None)))
    }

    async fn write_checkpoint(
        &mut self,
        slot: &str,
        lsn: Lsn,
        _gtid: Option<&str>,
    ) -> Result<(), ApplyError> {
        self.conn
            .exec_drop(
                format!(
                    "INSERT INTO {MYSQL_CHECKPOINT_TABLE} (slot, lsn) VALUES (?, ?) ON DUPLICATE KEY UPDATE lsn = VALUES(lsn)"
                ),
                (slot, lsn.to_string()),
            )
            .await
            .map_err(|e| sink_error(MYSQL_CHECKPOINT_TABLE, e))
    }

    async fn forget_checkpoint(&mut self, slot: &str) -> Result<(), ApplyError> {
        self.conn
            .exec_drop(
                format!("DELETE FROM {MYSQL_CHECKPOINT_TABLE} WHERE slot = ?"),
                (slot,),
            )
            .await
            .map_err(|e| sink_error(MYSQL_CHECKPOINT_TABLE, e))
    }
}
