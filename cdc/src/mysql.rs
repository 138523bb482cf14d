//! MySQL/MariaDB as the legacy source: a consistent snapshot, then the binlog (ROW
//! format) from the snapshot's exact position, read with `mysql_async`'s binlog
//! stream. Rows reach the PostgreSQL target as text and the mapping runs there, as
//! for a PostgreSQL source, through the same batches and checkpoint.
//!
//! Positions are binlog coordinates. The checkpoint (a `pg_lsn` in the target) holds
//! them as `FILE/OFFSET` in hex: file `mariadb-bin.000003`, offset 0x1a2b is `3/1A2B`.
//! The snapshot's position comes from MariaDB's `binlog_snapshot_file` /
//! `binlog_snapshot_position`, which are consistent with `START TRANSACTION WITH
//! CONSISTENT SNAPSHOT`.

use std::sync::Arc;
use std::time::{Duration, Instant, UNIX_EPOCH};

use futures::StreamExt as _;
use mysql_async::binlog::EventType;
use mysql_async::binlog::events::{EventData, RowsEventData};
use mysql_async::binlog::row::BinlogRow;
use mysql_async::binlog::value::BinlogValue;
use mysql_async::prelude::Queryable;
use mysql_async::{BinlogStreamRequest, Conn, Opts, Value};
use pg_walstream::{ColumnValue, RowData};
use tokio_postgres::Client;

use crate::apply::{ApplyError, Batch, ensure_checkpoint_table, read_checkpoint, write_checkpoint};
use crate::config::CdcConfig;
use crate::lsn::Lsn;
use crate::plan::{CheckError, Column, Table, TablePlan, check_with};
use crate::run::{CdcError, Progress, RunOptions, connect};

/// Whether `url` names a MySQL/MariaDB source.
pub fn is_mysql(url: &str) -> bool {
    url.starts_with("mysql://") || url.starts_with("mariadb://")
}

/// Refuses `command` for a MySQL source with a clear message (it reads PostgreSQL
/// catalogs or replication slots on the source).
pub fn refuse(config: &CdcConfig, command: &str) -> Result<(), CdcError> {
    if is_mysql(&config.source) {
        return Err(CdcError::Unsupported(format!(
            "`strangler {command}` needs a PostgreSQL source; for a MySQL/MariaDB source use `strangler cdc run --resnapshot` \
             to copy again and `strangler cdc verify` to compare"
        )));
    }
    Ok(())
}

/// How a column's MySQL value becomes PostgreSQL text.
#[derive(Debug, Clone, PartialEq)]
pub enum Conv {
    /// As MySQL prints it.
    Plain,
    /// Bytes → `\x…` hex for `bytea`.
    Binary,
    /// Binlog ENUM index → label (1-based; 0 is MySQL's empty "error" value).
    Enum(Vec<String>),
    /// Binlog SET bitmask → comma-separated labels.
    Set(Vec<String>),
    /// TIMESTAMP: UTC (the session runs in UTC; the binlog holds epoch seconds).
    Timestamp,
}

/// A MySQL/MariaDB failure, and whether it only means the connection went away
/// (a restart, a failover, a killed session): the stream then reconnects and
/// resumes from the target's checkpoint, as the PostgreSQL source does.
trait MysqlFailure: std::fmt::Display {
    fn lost_connection(&self) -> bool {
        false
    }
}

impl MysqlFailure for mysql_async::Error {
    fn lost_connection(&self) -> bool {
        use mysql_async::{DriverError, Error};
        match self {
            Error::Io(_) => true,
            Error::Driver(
                DriverError::ConnectionClosed
                | DriverError::PacketOutOfOrder
                | DriverError::PoolDisconnected,
            ) => true,
            // Server shutdown in progress, connection killed, server gone away,
            // lost connection during query, too many connections.
            Error::Server(e) => matches!(e.code, 1053 | 1927 | 2006 | 2013 | 1040),
            _ => false,
        }
    }
}

impl MysqlFailure for &str {}
impl MysqlFailure for String {}
impl MysqlFailure for mysql_async::UrlError {}
impl MysqlFailure for std::num::ParseIntError {}
// A binlog row that does not decode: a problem with the data, not the connection.
impl MysqlFailure for std::io::Error {}

/// The server ended the binlog stream (it is shutting down): reconnect.
struct StreamEnded;

impl std::fmt::Display for StreamEnded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the binlog stream ended")
    }
}

impl MysqlFailure for StreamEnded {
    fn lost_connection(&self) -> bool {
        true
    }
}

fn mysql_error(e: impl MysqlFailure) -> CdcError {
    CdcError::MySql {
        message: format!("MySQL source: {e}"),
        transient: e.lost_connection(),
    }
}

fn labels(column_type: &str) -> Vec<String> {
    // enum('a','b''c') → ["a", "b'c"]
    let inner = column_type
        .find('(')
        .and_then(|i| column_type.rfind(')').map(|j| &column_type[i + 1..j]))
        .unwrap_or("");
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut chars = inner.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\'' if quoted && chars.peek() == Some(&'\'') => {
                cur.push('\'');
                chars.next();
            }
            '\'' => {
                if quoted {
                    out.push(std::mem::take(&mut cur));
                }
                quoted = !quoted;
            }
            _ if quoted => cur.push(c),
            _ => {}
        }
    }
    out
}

/// Reads a MySQL table's columns (with the PostgreSQL type each is cast to on the
/// target, as `strangler cdc schema` translates it) and primary key.
pub async fn describe(
    conn: &mut Conn,
    schema: &str,
    name: &str,
) -> Result<Option<(Table, Vec<Conv>)>, CdcError> {
    let rows: Vec<(String, String, String, String, Option<String>, String)> = conn
        .exec(
            "SELECT COLUMN_NAME, COLUMN_TYPE, DATA_TYPE, IS_NULLABLE, COLUMN_DEFAULT, EXTRA \
             FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = ? AND TABLE_NAME = ? ORDER BY ORDINAL_POSITION",
            (schema, name),
        )
        .await
        .map_err(mysql_error)?;
    if rows.is_empty() {
        return Ok(None);
    }
    let key: Vec<String> = conn
        .exec(
            "SELECT COLUMN_NAME FROM information_schema.KEY_COLUMN_USAGE \
             WHERE TABLE_SCHEMA = ? AND TABLE_NAME = ? AND CONSTRAINT_NAME = 'PRIMARY' ORDER BY ORDINAL_POSITION",
            (schema, name),
        )
        .await
        .map_err(mysql_error)?;
    let mut columns = Vec::new();
    let mut convs = Vec::new();
    for (col, column_type, data_type, nullable, default, extra) in rows {
        let mut notes = Vec::new();
        let (pg, _) = crate::schema::pg_type(&column_type, name, &col, &mut notes);
        let conv = match data_type.to_ascii_lowercase().as_str() {
            "enum" => Conv::Enum(labels(&column_type)),
            "set" => Conv::Set(labels(&column_type)),
            "timestamp" => Conv::Timestamp,
            "binary" | "varbinary" | "tinyblob" | "blob" | "mediumblob" | "longblob" => {
                Conv::Binary
            }
            _ => Conv::Plain,
        };
        columns.push(Column {
            name: col,
            type_sql: column_type,
            cast: pg,
            not_null: nullable == "NO",
            has_default: default.is_some() || extra.contains("auto_increment"),
        });
        convs.push(conv);
    }
    Ok(Some((
        Table {
            schema: schema.to_string(),
            name: name.to_string(),
            columns,
            key,
            // Full row images (binlog_row_image=FULL) carry every column.
            replica_identity: 'f',
        },
        convs,
    )))
}

fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(2 + bytes.len() * 2);
    s.push_str("\\x");
    for b in bytes {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

fn epoch_text(secs: &str) -> Option<String> {
    let (whole, frac) = secs.split_once('.').unwrap_or((secs, "0"));
    let s: u64 = whole.parse().ok()?;
    let micros: u64 = format!("{frac:0<6}")[..6].parse().ok()?;
    Some(
        humantime::format_rfc3339_micros(
            UNIX_EPOCH + Duration::from_secs(s) + Duration::from_micros(micros),
        )
        .to_string(),
    )
}

/// A value from a text-protocol query (the snapshot) as PostgreSQL text.
fn snapshot_text(v: &Value, conv: &Conv) -> Option<String> {
    match v {
        Value::NULL => None,
        Value::Bytes(b) => Some(match conv {
            Conv::Binary => hex(b),
            // The snapshot session runs in UTC.
            Conv::Timestamp => format!("{}+00", String::from_utf8_lossy(b)),
            _ => String::from_utf8_lossy(b).into_owned(),
        }),
        other => Some(value_text(other)),
    }
}

fn value_text(v: &Value) -> String {
    match v {
        Value::NULL => String::new(),
        Value::Bytes(b) => String::from_utf8_lossy(b).into_owned(),
        Value::Int(i) => i.to_string(),
        Value::UInt(u) => u.to_string(),
        Value::Float(f) => f.to_string(),
        Value::Double(d) => d.to_string(),
        Value::Date(y, mo, d, h, mi, s, us) => {
            format!("{y:04}-{mo:02}-{d:02} {h:02}:{mi:02}:{s:02}.{us:06}")
        }
        Value::Time(neg, d, h, mi, s, us) => format!(
            "{}{:02}:{mi:02}:{s:02}.{us:06}",
            if *neg { "-" } else { "" },
            u32::from(*h) + d * 24
        ),
    }
}

/// A binlog value as PostgreSQL text.
fn binlog_text(v: &BinlogValue<'_>, conv: &Conv) -> Result<Option<String>, String> {
    Ok(match v {
        BinlogValue::Value(Value::NULL) => None,
        // SET arrives as its little-endian bitmask bytes.
        BinlogValue::Value(Value::Bytes(b)) if matches!(conv, Conv::Set(_)) => {
            let mask = b
                .iter()
                .rev()
                .fold(0i64, |acc, byte| (acc << 8) | i64::from(*byte));
            return binlog_text(&BinlogValue::Value(Value::Int(mask)), conv);
        }
        BinlogValue::Value(Value::Bytes(b)) => Some(match conv {
            Conv::Binary => hex(b),
            Conv::Timestamp => {
                let text = String::from_utf8_lossy(b);
                epoch_text(&text).ok_or_else(|| format!("unreadable TIMESTAMP {text:?}"))?
            }
            _ => String::from_utf8_lossy(b).into_owned(),
        }),
        BinlogValue::Value(Value::Int(i)) if matches!(conv, Conv::Enum(_) | Conv::Set(_)) => {
            match conv {
                Conv::Enum(l) => Some(
                    usize::try_from(*i)
                        .ok()
                        .and_then(|n| n.checked_sub(1))
                        .and_then(|n| l.get(n))
                        .cloned()
                        .unwrap_or_default(),
                ),
                Conv::Set(l) => Some(
                    l.iter()
                        .enumerate()
                        .filter(|(n, _)| (*i >> n) & 1 == 1)
                        .map(|(_, s)| s.as_str())
                        .collect::<Vec<_>>()
                        .join(","),
                ),
                _ => None,
            }
        }
        BinlogValue::Value(other) => Some(value_text(other)),
        BinlogValue::Jsonb(j) => {
            let json: serde_json::Value = j
                .clone()
                .parse()
                .map_err(|e| format!("unreadable JSON value: {e}"))?
                .into();
            Some(json.to_string())
        }
        BinlogValue::JsonDiff(_) => {
            return Err(
                "a partial JSON update arrived (binlog_row_value_options=PARTIAL_JSON); turn it off so full values are logged"
                    .into(),
            );
        }
    })
}

/// MariaDB's GTID event type (not in `mysql_common`, which knows MySQL's).
const MARIADB_GTID_EVENT: u8 = 0xa2;

/// A MariaDB GTID position: per replication domain, the last server id and sequence.
type Gtids = std::collections::BTreeMap<u32, (u32, u64)>;

/// Parses `0-1-100,1-2-7`.
fn parse_gtids(text: &str) -> Gtids {
    text.split(',')
        .filter_map(|g| {
            let mut parts = g.trim().splitn(3, '-');
            let domain = parts.next()?.parse().ok()?;
            let server = parts.next()?.parse().ok()?;
            let seq = parts.next()?.parse().ok()?;
            Some((domain, (server, seq)))
        })
        .collect()
}

fn format_gtids(g: &Gtids) -> String {
    g.iter()
        .map(|(d, (s, q))| format!("{d}-{s}-{q}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Where the stream is: a binlog file and an offset in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position {
    /// Binlog file name.
    pub file: String,
    /// Offset.
    pub offset: u64,
}

impl Position {
    fn number(&self) -> Option<u64> {
        // `mariadb-bin.000003`; a rotate event's name may carry trailing bytes.
        let digits: String = self
            .file
            .rsplit('.')
            .next()?
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        digits.parse().ok()
    }

    /// As a checkpoint value: `FILE_NUMBER/OFFSET`.
    pub fn lsn(&self) -> Lsn {
        Lsn((self.number().unwrap_or(0) << 32) | (self.offset & 0xffff_ffff))
    }
}

/// The end of the server's binlog now (`None` when binary logging is off).
async fn binlog_end(conn: &mut Conn) -> Result<Option<Position>, CdcError> {
    let row: Option<mysql_async::Row> = conn
        .query_first("SHOW MASTER STATUS")
        .await
        .map_err(mysql_error)?;
    Ok(row.map(|r| Position {
        file: r.get(0).unwrap_or_default(),
        offset: r.get(1).unwrap_or(4),
    }))
}

async fn position_of(conn: &mut Conn, lsn: Lsn) -> Result<Position, CdcError> {
    let number = lsn.0 >> 32;
    let logs: Vec<mysql_async::Row> = conn.query("SHOW BINARY LOGS").await.map_err(mysql_error)?;
    for row in logs {
        let file: String = row.get(0).unwrap_or_default();
        let p = Position {
            file: file.clone(),
            offset: 0,
        };
        if p.number() == Some(number) {
            return Ok(Position {
                file,
                offset: lsn.0 & 0xffff_ffff,
            });
        }
    }
    Err(mysql_error(format!(
        "binlog file number {number} from the checkpoint is no longer on the server (purged?): \
         changes after it are lost; re-copy with `strangler cdc run --resnapshot`"
    )))
}

struct Source {
    plans: Vec<TablePlan>,
    convs: Vec<Vec<Conv>>,
    /// Source column order (binlog rows are positional).
    columns: Vec<Vec<Arc<str>>>,
}

async fn prepare(config: &CdcConfig, conn: &mut Conn, target: &Client) -> Result<Source, CdcError> {
    let db: Option<String> = conn
        .query_first("SELECT DATABASE()")
        .await
        .map_err(mysql_error)?;
    let default_db = db.unwrap_or_default();
    let mut plans = Vec::new();
    let mut convs = Vec::new();
    let mut columns = Vec::new();
    for mapping in &config.mappings {
        // `public.orders` (the mapping default) means the URL's database.
        let schema = if mapping.source_schema == "public" {
            default_db.clone()
        } else {
            mapping.source_schema.clone()
        };
        let (table, conv) = describe(conn, &schema, &mapping.source_table)
            .await?
            .ok_or_else(|| {
                CdcError::Check(CheckError::Schema {
                    target: mapping.target.clone(),
                    message: format!(
                        "source table {schema}.{} does not exist",
                        mapping.source_table
                    ),
                })
            })?;
        columns.push(
            table
                .columns
                .iter()
                .map(|c| Arc::from(c.name.as_str()))
                .collect(),
        );
        plans.push(
            check_with(mapping, table, target)
                .await?
                .with_conflict(config.conflicts.get(plans.len()))?,
        );
        convs.push(conv);
    }
    Ok(Source {
        plans,
        convs,
        columns,
    })
}

/// Checks every mapping against a MySQL source and the target.
pub async fn check(config: &CdcConfig) -> Result<Vec<TablePlan>, CdcError> {
    let mut conn = mysql_conn(&config.source).await?;
    let target = connect(&config.target, "target").await?;
    Ok(prepare(config, &mut conn, &target).await?.plans)
}

async fn mysql_conn(url: &str) -> Result<Conn, CdcError> {
    let url = url.replacen("mariadb://", "mysql://", 1);
    let opts = Opts::from_url(&url).map_err(mysql_error)?;
    let mut conn = Conn::new(opts).await.map_err(mysql_error)?;
    conn.query_drop("SET time_zone = '+00:00'")
        .await
        .map_err(mysql_error)?;
    Ok(conn)
}

/// The query reading a mapped table's carried columns from MySQL, and how each
/// value becomes PostgreSQL text.
fn source_select<'a>(plan: &TablePlan, src: &'a Source, t: usize) -> (String, Vec<&'a Conv>) {
    let names = plan
        .carried
        .iter()
        .map(|c| q(&c.name))
        .collect::<Vec<_>>()
        .join(", ");
    let convs = plan
        .carried
        .iter()
        .map(|c| {
            let i = src.columns[t]
                .iter()
                .position(|n| **n == c.name)
                .unwrap_or(0);
            &src.convs[t][i]
        })
        .collect();
    (
        format!(
            "SELECT {names} FROM {}.{}",
            q(&plan.source.schema),
            q(&plan.source.name)
        ),
        convs,
    )
}

/// Rows per chunk of a MariaDB snapshot: read on one task, loaded on another.
const SNAPSHOT_CHUNK: usize = 20_000;

/// Copies every mapped table from one consistent snapshot and returns the binlog
/// position it is consistent with (and the connection, which the snapshot's reader
/// borrowed). Reading and loading overlap: a task reads the rows from MariaDB and
/// turns them into PostgreSQL text, in chunks, while this one loads each chunk by
/// binary COPY into the plan's staging table and runs the mapping over it into the
/// target table, all in one target transaction with the checkpoint.
async fn snapshot(
    config: &CdcConfig,
    mut conn: Conn,
    target: &mut Client,
    src: &Source,
) -> Result<(Conn, Position), CdcError> {
    conn.query_drop("SET SESSION TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        .await
        .map_err(mysql_error)?;
    conn.query_drop("START TRANSACTION WITH CONSISTENT SNAPSHOT")
        .await
        .map_err(mysql_error)?;
    let status: Vec<(String, String)> = conn
        .query("SHOW STATUS LIKE 'binlog_snapshot_%'")
        .await
        .map_err(mysql_error)?;
    let get = |k: &str| {
        status
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(k))
            .map(|(_, v)| v.clone())
    };
    let (Some(file), Some(offset)) = (get("binlog_snapshot_file"), get("binlog_snapshot_position"))
    else {
        return Err(mysql_error(
            "the server has no binlog_snapshot_file/position status (MariaDB with log_bin on is required for a consistent snapshot)",
        ));
    };
    let position = Position {
        file,
        offset: offset.parse().map_err(mysql_error)?,
    };
    let tx = target
        .transaction()
        .await
        .map_err(|e| CdcError::Apply(crate::apply::ApplyError::Checkpoint(e)))?;
    for plan in &src.plans {
        tx.batch_execute(&format!(
            "TRUNCATE {}; {}",
            plan.target.quoted(),
            plan.stage.create
        ))
        .await
        .map_err(|e| snapshot_error(plan, e))?;
    }
    let jobs: Vec<(String, Vec<Conv>)> = src
        .plans
        .iter()
        .enumerate()
        .map(|(t, plan)| {
            let (sql, convs) = source_select(plan, src, t);
            (sql, convs.into_iter().cloned().collect())
        })
        .collect();
    type Chunk = (usize, Vec<Vec<Option<String>>>);
    let (chunks, mut received) = tokio::sync::mpsc::channel::<Chunk>(2);
    let reader = tokio::spawn(async move {
        let read = async {
            for (t, (sql, convs)) in jobs.iter().enumerate() {
                let mut result = conn.query_iter(sql.as_str()).await.map_err(mysql_error)?;
                let mut chunk = Vec::with_capacity(SNAPSHOT_CHUNK);
                while let Some(row) = result.next().await.map_err(mysql_error)? {
                    let values = row.unwrap();
                    chunk.push(
                        values
                            .iter()
                            .zip(convs)
                            .map(|(v, c)| snapshot_text(v, c))
                            .collect(),
                    );
                    if chunk.len() >= SNAPSHOT_CHUNK {
                        let full =
                            std::mem::replace(&mut chunk, Vec::with_capacity(SNAPSHOT_CHUNK));
                        if chunks.send((t, full)).await.is_err() {
                            return Ok(()); // the loader failed; its error is reported
                        }
                    }
                }
                if !chunk.is_empty() && chunks.send((t, chunk)).await.is_err() {
                    return Ok(());
                }
            }
            Ok::<(), CdcError>(())
        }
        .await;
        drop(chunks);
        (conn, read)
    });
    let mut copied = vec![0u64; src.plans.len()];
    let mut loaded: Result<(), CdcError> = Ok(());
    while let Some((t, rows)) = received.recv().await {
        let plan = &src.plans[t];
        let refs: Vec<&Vec<Option<String>>> = rows.iter().collect();
        let load = async {
            crate::apply::apply_staged(&tx, plan, &[], &refs, &[])
                .await
                .0
                .map_err(|e| snapshot_error(plan, e))
        };
        match load.await {
            Ok(n) => copied[t] += n,
            Err(e) => {
                loaded = Err(e);
                break;
            }
        }
    }
    drop(received);
    let (conn, read) = reader
        .await
        .map_err(|e| CdcError::ApplierStopped(format!("the snapshot reader panicked: {e}")))?;
    read?;
    loaded?;
    for (plan, rows) in src.plans.iter().zip(&copied) {
        tracing::info!(table = %plan.target.quoted(), rows, "snapshot copied");
    }
    write_checkpoint(&tx, &config.slot, position.lsn()).await?;
    tx.commit()
        .await
        .map_err(|e| CdcError::Apply(crate::apply::ApplyError::Checkpoint(e)))?;
    let mut conn = conn;
    conn.query_drop("COMMIT").await.map_err(mysql_error)?;
    Ok((conn, position))
}

fn snapshot_error(plan: &TablePlan, e: tokio_postgres::Error) -> CdcError {
    CdcError::Snapshot {
        table: plan.target.quoted(),
        message: e
            .as_db_error()
            .map_or_else(|| e.to_string(), |d| d.message().to_string()),
    }
}

fn row_data(row: &BinlogRow, names: &[Arc<str>], convs: &[Conv]) -> Result<RowData, String> {
    let mut data = RowData::with_capacity(names.len());
    for (i, name) in names.iter().enumerate() {
        let v = match row.as_ref(i) {
            Some(v) => binlog_text(v, convs.get(i).unwrap_or(&Conv::Plain))?,
            None => continue,
        };
        data.push(
            Arc::clone(name),
            match v {
                None => ColumnValue::Null,
                Some(s) => ColumnValue::Text(s.into_bytes().into()),
            },
        );
    }
    Ok(data)
}

/// What a statement in the binlog means for the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ddl {
    /// Transaction control or a statement on a table we do not map.
    Ignore,
    /// A statement on a mapped table that this stream cannot follow.
    Stop(String),
}

/// Classifies a statement from a binlog QUERY event against the mapped tables.
pub fn classify(query: &str, default_schema: &str, mapped: &[(String, String)]) -> Ddl {
    let q = query.trim();
    let upper = q.to_ascii_uppercase();
    if matches!(
        upper.as_str(),
        "BEGIN" | "COMMIT" | "ROLLBACK" | "XA START" | "XA END"
    ) || upper.starts_with("SAVEPOINT")
        || upper.starts_with("ROLLBACK TO")
        || upper.starts_with("RELEASE SAVEPOINT")
    {
        return Ddl::Ignore;
    }
    use sqlparser::dialect::MySqlDialect;
    let names: Vec<(String, String)> =
        match sqlparser::parser::Parser::parse_sql(&MySqlDialect {}, q) {
            Ok(statements) => {
                let mut out = Vec::new();
                let _ = sqlparser::ast::visit_relations(&statements, |name| {
                    let parts: Vec<String> = name
                        .0
                        .iter()
                        .map(|p| p.to_string().trim_matches('`').to_string())
                        .collect();
                    match parts.as_slice() {
                        [t] => out.push((default_schema.to_string(), t.clone())),
                        [s, t] => out.push((s.clone(), t.clone())),
                        _ => {}
                    }
                    std::ops::ControlFlow::<()>::Continue(())
                });
                out
            }
            Err(_) => {
                // Unparsable: stop if it so much as names a mapped table.
                let lower = q.to_ascii_lowercase();
                return match mapped
                    .iter()
                    .find(|(_, t)| lower.contains(&t.to_ascii_lowercase()))
                {
                    Some((s, t)) => Ddl::Stop(format!(
                        "a statement the stream cannot parse names mapped table {s}.{t}: {q}"
                    )),
                    None => Ddl::Ignore,
                };
            }
        };
    let named = names.iter().find(|n| {
        mapped
            .iter()
            .any(|m| m.0.eq_ignore_ascii_case(&n.0) && m.1.eq_ignore_ascii_case(&n.1))
    });
    // Some statements' tables are not visited as relations (RENAME TABLE, …): for
    // schema statements, any mention of a mapped table as a word counts.
    let ddl = [
        "ALTER", "DROP", "RENAME", "TRUNCATE", "CREATE", "OPTIMIZE", "REPAIR",
    ]
    .iter()
    .any(|k| upper.starts_with(k));
    let mentioned = || {
        let words: Vec<String> = q
            .split(|c: char| !(c.is_alphanumeric() || c == '_' || c == '$'))
            .map(str::to_ascii_lowercase)
            .collect();
        mapped
            .iter()
            .find(|(s, t)| {
                let table = words.contains(&t.to_ascii_lowercase());
                table
                    && (s.eq_ignore_ascii_case(default_schema)
                        || words.contains(&s.to_ascii_lowercase()))
            })
            .cloned()
    };
    match named
        .cloned()
        .or_else(|| if ddl { mentioned() } else { None })
        .as_ref()
    {
        Some((s, t)) => Ddl::Stop(format!(
            "schema change on mapped table {s}.{t} in the binlog: {q}\n\
             The stream stops here so nothing is applied with the wrong shape. Apply the same change to the target and the mapping \
             (`strangler cdc check`), then start again; the checkpoint resumes right before this statement."
        )),
        None => Ddl::Ignore,
    }
}

/// Runs a MySQL/MariaDB → PostgreSQL stream until stopped or an error.
pub async fn run(
    config: &CdcConfig,
    options: RunOptions,
    progress: Arc<Progress>,
    observe: &crate::observe::Observe,
) -> Result<(), CdcError> {
    let mut conn = mysql_conn(&config.source).await?;
    let mut target = connect(&config.target, "target").await?;
    ensure_checkpoint_table(&target).await?;
    if !config.origin.is_empty() {
        crate::apply::tag_origin(&target, &config.origin).await?;
    }
    let src = prepare(config, &mut conn, &target).await?;
    let checkpoint = if options.resnapshot {
        None
    } else {
        read_checkpoint(&target, &config.slot).await?
    };
    let saved_gtid: Option<String> = match checkpoint {
        Some(_) => target
            .query_opt(
                &format!(
                    "SELECT gtid FROM {} WHERE slot = $1",
                    crate::apply::CHECKPOINT_TABLE
                ),
                &[&config.slot],
            )
            .await
            .map_err(|e| CdcError::Apply(ApplyError::Checkpoint(e)))?
            .and_then(|r| r.get::<_, Option<String>>(0)),
        None => None,
    };
    // Where to start, and whether by GTID (the checkpoint's binlog file is gone,
    // e.g. purged, or another server after a failover, while its GTID is known).
    let mut by_gtid = false;
    let mut position = match checkpoint {
        Some(lsn) => match (position_of(&mut conn, lsn).await, &saved_gtid) {
            (Ok(p), _) => p,
            (Err(e), Some(gtid)) if !gtid.is_empty() => {
                tracing::warn!(%gtid, "{e}; resuming by GTID instead");
                by_gtid = true;
                Position {
                    file: String::new(),
                    offset: 4,
                }
            }
            (Err(e), _) => return Err(e),
        },
        None if config.snapshot => {
            let (returned, p) = snapshot(config, conn, &mut target, &src).await?;
            conn = returned;
            p
        }
        None => {
            let p = binlog_end(&mut conn)
                .await?
                .ok_or_else(|| mysql_error("SHOW MASTER STATUS is empty: is log_bin on?"))?;
            write_checkpoint(&target, &config.slot, p.lsn()).await?;
            p
        }
    };
    // The GTID position matching where the stream starts.
    let mut gtids = match (&saved_gtid, by_gtid || checkpoint.is_some()) {
        (Some(g), true) => parse_gtids(g),
        _ => {
            let pos: Option<String> = conn
                .exec_first(
                    "SELECT BINLOG_GTID_POS(?, ?)",
                    (&position.file, position.offset),
                )
                .await
                .map_err(mysql_error)?;
            let g = pos.unwrap_or_default();
            target
                .execute(
                    &format!(
                        "UPDATE {} SET gtid = $2 WHERE slot = $1",
                        crate::apply::CHECKPOINT_TABLE
                    ),
                    &[&config.slot, &g],
                )
                .await
                .map_err(|e| CdcError::Apply(ApplyError::Checkpoint(e)))?;
            parse_gtids(&g)
        }
    };
    let mut pending_gtid: Option<(u32, u32, u64)> = None;
    progress
        .applied
        .store(position.lsn().0, std::sync::atomic::Ordering::Relaxed);
    tracing::info!(file = %position.file, offset = position.offset, "streaming the binlog");
    let default_schema: String = conn
        .query_first("SELECT DATABASE()")
        .await
        .map_err(mysql_error)?
        .unwrap_or_default();
    let mapped: Vec<(String, String)> = src
        .plans
        .iter()
        .map(|p| (p.source.schema.clone(), p.source.name.clone()))
        .collect();
    // A server id of our own, derived from the stream's name.
    let request = BinlogStreamRequest::new(server_id_for(&config.slot))
        .with_filename(position.file.as_bytes())
        .with_pos(position.offset);
    let mut stream_conn = mysql_conn(&config.source).await?;
    // GTID-aware replica: MariaDB sends its GTID events (we keep the position with
    // the checkpoint) instead of rewriting them as BEGIN.
    stream_conn
        .query_drop("SET @mariadb_slave_capability = 4")
        .await
        .map_err(mysql_error)?;
    if by_gtid {
        let state = format_gtids(&gtids);
        stream_conn
            .query_drop(format!(
                "SET @slave_connect_state = '{}'",
                state.replace('\'', "")
            ))
            .await
            .map_err(mysql_error)?;
        stream_conn
            .query_drop("SET @slave_gtid_strict_mode = 1")
            .await
            .map_err(mysql_error)?;
    }
    let mut stream = stream_conn
        .get_binlog_stream(request)
        .await
        .map_err(mysql_error)?;
    let stop = options.stop.clone().unwrap_or_default();
    let mut target = crate::sink::PgSink::new(target);
    let mut batch = Batch::new(src.plans.len());
    // Inside a transaction (BEGIN or rows seen, no commit yet), nothing is applied:
    // a batch holds whole transactions only, so its checkpoint never points into one.
    let mut in_tx = false;
    let mut stopping = false;
    loop {
        if stopping && !in_tx {
            if !batch.is_empty() {
                crate::run::apply_batch(
                    &mut batch,
                    &mut target,
                    &src.plans,
                    config,
                    &progress,
                    Some(observe),
                )
                .await?;
            }
            return Ok(());
        }
        let linger = batch
            .first_commit
            .map(|t| config.batch_linger.saturating_sub(t.elapsed()))
            .unwrap_or(Duration::from_secs(3600));
        let event = tokio::select! {
            _ = stop.cancelled(), if !stopping => {
                // Finish the transaction being received, then stop.
                stopping = true;
                continue;
            }
            _ = tokio::time::sleep(linger), if !batch.is_empty() && !in_tx => {
                crate::run::apply_batch(&mut batch, &mut target, &src.plans, config, &progress, Some(observe)).await?;
                continue;
            }
            e = stream.next() => e,
        };
        let Some(event) = event else {
            return Err(mysql_error(StreamEnded));
        };
        let event = event.map_err(mysql_error)?;
        let header = event.header();
        let end = u64::from(header.log_pos());
        if header.event_type_raw() == MARIADB_GTID_EVENT {
            // seq_no (8 bytes), domain id (4), flags (1); a standalone statement (DDL)
            // has no commit of its own.
            let d = event.data();
            if d.len() >= 13 {
                let seq = u64::from_le_bytes(d[0..8].try_into().unwrap_or([0; 8]));
                let domain = u32::from_le_bytes(d[8..12].try_into().unwrap_or([0; 4]));
                pending_gtid = Some((domain, header.server_id(), seq));
                in_tx = d[12] & 1 == 0;
            }
            continue;
        }
        let Ok(kind) = header.event_type() else {
            continue; // other MariaDB-specific events (annotations, GTID lists)
        };
        match kind {
            EventType::ROTATE_EVENT => {
                if let Ok(Some(EventData::RotateEvent(r))) = event.read_data() {
                    let next = Position {
                        file: r.name().trim_end_matches('\0').to_string(),
                        offset: r.position(),
                    };
                    if next.number().is_some() {
                        position = next;
                    } else {
                        tracing::warn!(name = %r.name(), "a rotate event with an unreadable file name; keeping {}", position.file);
                    }
                }
                continue;
            }
            EventType::XID_EVENT => {
                position.offset = end;
                if let Some((d, sv, sq)) = pending_gtid.take() {
                    gtids.insert(d, (sv, sq));
                }
                batch.commit(position.lsn(), None);
                batch.gtid = Some(format_gtids(&gtids));
                in_tx = false;
            }
            EventType::QUERY_EVENT => {
                let Ok(Some(EventData::QueryEvent(q))) = event.read_data() else {
                    continue;
                };
                let text = q.query();
                let schema = q.schema();
                let schema = if schema.is_empty() {
                    default_schema.clone()
                } else {
                    schema.into_owned()
                };
                if text.trim().eq_ignore_ascii_case("BEGIN") {
                    in_tx = true;
                } else if text.trim().eq_ignore_ascii_case("COMMIT") {
                    position.offset = end;
                    if let Some((d, sv, sq)) = pending_gtid.take() {
                        gtids.insert(d, (sv, sq));
                    }
                    batch.commit(position.lsn(), None);
                    batch.gtid = Some(format_gtids(&gtids));
                    in_tx = false;
                } else if let Ddl::Stop(why) = classify(&text, &schema, &mapped) {
                    if !batch.is_empty() {
                        crate::run::apply_batch(
                            &mut batch,
                            &mut target,
                            &src.plans,
                            config,
                            &progress,
                            Some(observe),
                        )
                        .await?;
                    }
                    return Err(CdcError::Apply(crate::apply::ApplyError::Unsafe(why)));
                } else if !in_tx {
                    // A statement of its own outside any mapped table (DDL
                    // elsewhere): the position moves past it.
                    position.offset = end;
                    if let Some((d, sv, sq)) = pending_gtid.take() {
                        gtids.insert(d, (sv, sq));
                    }
                    batch.commit(position.lsn(), None);
                    batch.gtid = Some(format_gtids(&gtids));
                }
            }
            EventType::WRITE_ROWS_EVENT
            | EventType::UPDATE_ROWS_EVENT
            | EventType::DELETE_ROWS_EVENT
            | EventType::WRITE_ROWS_EVENT_V1
            | EventType::UPDATE_ROWS_EVENT_V1
            | EventType::DELETE_ROWS_EVENT_V1 => {
                in_tx = true;
                if config.ignore_server_ids.contains(&header.server_id()) {
                    // Written by strangler's reverse stream: applying it here would
                    // send it back where it came from.
                    continue;
                }
                let Ok(Some(EventData::RowsEvent(rows))) = event.read_data() else {
                    continue;
                };
                let Some(tme) = stream.get_tme(rows.table_id()) else {
                    return Err(mysql_error("a rows event arrived before its table map"));
                };
                let (db, table) = (tme.database_name(), tme.table_name());
                let Some(t) = src.plans.iter().position(|p| {
                    p.source.schema.eq_ignore_ascii_case(&db)
                        && p.source.name.eq_ignore_ascii_case(&table)
                }) else {
                    continue;
                };
                let plan = &src.plans[t];
                for pair in rows.rows(tme) {
                    let (before, after) = pair.map_err(mysql_error)?;
                    let conv = |r: &BinlogRow| {
                        row_data(r, &src.columns[t], &src.convs[t]).map_err(|e| {
                            CdcError::Apply(crate::apply::ApplyError::Unsafe(format!(
                                "{}: {e}",
                                plan.source.quoted()
                            )))
                        })
                    };
                    match (&rows, before, after) {
                        (
                            RowsEventData::WriteRowsEvent(_) | RowsEventData::WriteRowsEventV1(_),
                            _,
                            Some(a),
                        ) => {
                            batch.insert(t, plan, &conv(&a)?)?;
                        }
                        (_, Some(b), Some(a)) => {
                            batch.update(t, plan, Some(&conv(&b)?), &conv(&a)?)?;
                        }
                        (_, Some(b), None) => batch.delete(t, plan, &conv(&b)?)?,
                        _ => {}
                    }
                }
            }
            _ => continue,
        }
        if !batch.is_empty()
            && !in_tx
            && (batch.changes >= config.batch_rows
                || batch
                    .first_commit
                    .is_some_and(|t: Instant| t.elapsed() >= config.batch_linger))
        {
            crate::run::apply_batch(
                &mut batch,
                &mut target,
                &src.plans,
                config,
                &progress,
                Some(observe),
            )
            .await?;
        }
    }
}

/// `strangler cdc verify` for a MySQL/MariaDB source: waits until the target's
/// checkpoint reaches the binlog position of the moment it starts (up to `wait`),
/// then maps every source row through the mapping on the target (the same SQL the
/// stream uses) and compares with the target's rows by target key. Rows that
/// differ are compared up to three more times, a second apart, so rows changing
/// during the run are reported only if they stay different. Whole tables are held
/// in memory: meant for tables up to a few million rows.
pub async fn verify(
    config: &CdcConfig,
    wait: Duration,
) -> Result<Vec<crate::verify::TableReport>, CdcError> {
    let mut conn = mysql_conn(&config.source).await?;
    let target = connect(&config.target, "target").await?;
    let src = prepare(config, &mut conn, &target).await?;
    if let Some(goal) = binlog_end(&mut conn).await? {
        let deadline = Instant::now() + wait;
        loop {
            let at = read_checkpoint(&target, &config.slot).await?;
            if at.is_some_and(|a| a >= goal.lsn()) || Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let mut reports = Vec::new();
    for (t, plan) in src.plans.iter().enumerate() {
        let started = Instant::now();
        let mut report = compare_table(&mut conn, &target, plan, &src, t).await?;
        for _ in 0..3 {
            if report.clean() {
                break;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
            report = compare_table(&mut conn, &target, plan, &src, t).await?;
        }
        report.seconds = started.elapsed().as_secs_f64();
        reports.push(report);
    }
    Ok(reports)
}

async fn compare_table(
    conn: &mut Conn,
    target: &Client,
    plan: &TablePlan,
    src: &Source,
    t: usize,
) -> Result<crate::verify::TableReport, CdcError> {
    use std::collections::BTreeMap;
    let (sql, convs) = source_select(plan, src, t);
    let tkey = |row: &[Option<String>]| -> String {
        plan.target
            .key
            .iter()
            .filter_map(|k| plan.mapping.outputs.iter().position(|o| &o.column == k))
            .map(|i| {
                row.get(i)
                    .cloned()
                    .flatten()
                    .unwrap_or_else(|| "NULL".into())
            })
            .collect::<Vec<_>>()
            .join(",")
    };
    let mut expected: BTreeMap<String, Vec<Option<String>>> = BTreeMap::new();
    let mut result = conn.query_iter(sql).await.map_err(mysql_error)?;
    let mut chunk: Vec<Vec<Option<String>>> = Vec::new();
    loop {
        let row = result.next().await.map_err(mysql_error)?;
        let done = row.is_none();
        if let Some(row) = row {
            chunk.push(
                row.unwrap()
                    .iter()
                    .zip(&convs)
                    .map(|(v, c)| snapshot_text(v, c))
                    .collect(),
            );
        }
        if chunk.len() >= 5_000 || (done && !chunk.is_empty()) {
            let rows: Vec<&Vec<Option<String>>> = chunk.iter().collect();
            for row in crate::conflict::map_rows(target, &plan.rows_sql, plan, &rows)
                .await?
                .into_values()
                .flatten()
            {
                expected.insert(tkey(&row), row);
            }
            chunk.clear();
        }
        if done {
            break;
        }
    }
    let cols = plan
        .mapping
        .outputs
        .iter()
        .map(|o| format!("{}::text", crate::plan::ident(&o.column)))
        .collect::<Vec<_>>()
        .join(", ");
    let mut actual: BTreeMap<String, Vec<Option<String>>> = BTreeMap::new();
    for r in target
        .query(&format!("SELECT {cols} FROM {}", plan.target.quoted()), &[])
        .await
        .map_err(|e| snapshot_error(plan, e))?
    {
        let row: Vec<Option<String>> = (0..r.len()).map(|i| r.get(i)).collect();
        actual.insert(tkey(&row), row);
    }
    let key_names = plan.target.key.join(",");
    let named = |k: &String| format!("{key_names}={k}");
    Ok(crate::verify::TableReport {
        table: plan.target.quoted(),
        source_rows: expected.len() as i64,
        target_rows: actual.len() as i64,
        missing: expected
            .keys()
            .filter(|k| !actual.contains_key(*k))
            .map(named)
            .collect(),
        extra: actual
            .keys()
            .filter(|k| !expected.contains_key(*k))
            .map(named)
            .collect(),
        different: expected
            .iter()
            .filter(|(k, v)| actual.get(*k).is_some_and(|a| a != *v))
            .map(|(k, _)| named(k))
            .collect(),
        ranges_compared: 0,
        seconds: 0.0,
    })
}

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

fn q(name: &str) -> String {
    format!("`{}`", name.replace('`', "``"))
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
    crate::apply::text_rows(eval, sql, columns)
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
    ch: &mut crate::apply::TableChanges,
) -> Result<u64, ApplyError> {
    use crate::conflict::{self, Candidates, Settle, Winner};
    let c = Candidates::of(ch);
    if c.keys.is_empty() {
        return Ok(0);
    }
    let incoming = conflict::map_rows(eval, &plan.rows_text_sql, plan, &c.incoming).await?;
    let expected = conflict::map_rows(eval, &plan.rows_text_sql, plan, &c.before).await?;
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
        let tkey = conflict::target_key(plan, basis);
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
        let winner = match conflict::settle(plan, &tkey, new.as_ref(), current.as_ref())? {
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
        conflict::log(plan, &tkey, new.as_ref(), current.as_ref(), winner);
        if winner == Winner::Target {
            skip.push((*k).clone());
        }
    }
    conflict::drop_changes(ch, &skip);
    Ok(found)
}

fn sink_error(table: &str, e: mysql_async::Error) -> crate::apply::ApplyError {
    if e.lost_connection() {
        return crate::apply::ApplyError::Lost {
            table: table.to_string(),
            message: e.to_string(),
        };
    }
    crate::apply::ApplyError::Rejected {
        table: table.to_string(),
        key: String::new(),
        message: e.to_string(),
    }
}

#[async_trait::async_trait]
impl crate::sink::Sink for MySqlSink {
    async fn apply(
        &mut self,
        batch: &mut Batch,
        plans: &[TablePlan],
        slot: &str,
    ) -> Result<crate::apply::Applied, crate::apply::ApplyError> {
        use crate::apply::ApplyError;
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
                    &crate::apply::transpose(plan.source_key().len(), ch.deleted.iter()),
                )
                .await?
            };
            let (present, filtered_out) = if ch.present.is_empty() {
                (Vec::new(), Vec::new())
            } else {
                let carried =
                    crate::apply::transpose(plan.carried.len(), ch.present.iter().map(|(_, v)| v));
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
            (slot, batch.end_lsn.to_string()),
        )
        .await
        .map_err(|e| sink_error(MYSQL_CHECKPOINT_TABLE, e))?;
        tx.commit().await.map_err(|e| sink_error("the target", e))?;
        batch.reset();
        Ok(crate::apply::Applied {
            rows: written,
            conflicts,
        })
    }

    async fn read_checkpoint(
        &mut self,
        slot: &str,
    ) -> Result<Option<Lsn>, crate::apply::ApplyError> {
        let lsn: Option<String> = self
            .conn
            .exec_first(
                format!("SELECT lsn FROM {MYSQL_CHECKPOINT_TABLE} WHERE slot = ?"),
                (slot,),
            )
            .await
            .map_err(|e| sink_error(MYSQL_CHECKPOINT_TABLE, e))?;
        Ok(lsn.and_then(|l| l.parse().ok()))
    }

    async fn write_checkpoint(
        &mut self,
        slot: &str,
        lsn: Lsn,
    ) -> Result<(), crate::apply::ApplyError> {
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

    async fn forget_checkpoint(&mut self, slot: &str) -> Result<(), crate::apply::ApplyError> {
        self.conn
            .exec_drop(
                format!("DELETE FROM {MYSQL_CHECKPOINT_TABLE} WHERE slot = ?"),
                (slot,),
            )
            .await
            .map_err(|e| sink_error(MYSQL_CHECKPOINT_TABLE, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enum_and_set_labels_parse_with_quotes() {
        assert_eq!(
            labels("enum('placed','paid','it''s')"),
            vec!["placed", "paid", "it's"]
        );
        assert_eq!(labels("set('a','b')"), vec!["a", "b"]);
    }

    #[test]
    fn binlog_enum_set_and_timestamp_values_become_text() {
        let e = Conv::Enum(vec!["placed".into(), "paid".into()]);
        assert_eq!(
            binlog_text(&BinlogValue::Value(Value::Int(2)), &e),
            Ok(Some("paid".into()))
        );
        let s = Conv::Set(vec!["a".into(), "b".into(), "c".into()]);
        assert_eq!(
            binlog_text(&BinlogValue::Value(Value::Int(5)), &s),
            Ok(Some("a,c".into()))
        );
        assert_eq!(
            binlog_text(
                &BinlogValue::Value(Value::Bytes(b"0.5".to_vec())),
                &Conv::Timestamp
            ),
            Ok(Some("1970-01-01T00:00:00.500000Z".into()))
        );
        assert_eq!(
            binlog_text(
                &BinlogValue::Value(Value::Bytes(vec![0, 255])),
                &Conv::Binary
            ),
            Ok(Some("\\x00ff".into()))
        );
        assert_eq!(
            binlog_text(&BinlogValue::Value(Value::NULL), &Conv::Plain),
            Ok(None)
        );
    }

    #[test]
    fn a_binlog_set_bitmask_becomes_its_labels() {
        let s = Conv::Set(vec!["a".into(), "b".into(), "c".into()]);
        assert_eq!(
            binlog_text(&BinlogValue::Value(Value::Bytes(vec![6])), &s),
            Ok(Some("b,c".into()))
        );
    }

    #[test]
    fn positions_round_trip_through_the_checkpoint_format() {
        let p = Position {
            file: "mariadb-bin.000003".into(),
            offset: 0x1a2b,
        };
        assert_eq!(p.lsn().to_string(), "3/1A2B");
    }

    #[test]
    fn ddl_on_mapped_tables_stops_and_elsewhere_passes() {
        let mapped = vec![("shop".to_string(), "orders".to_string())];
        assert_eq!(classify("BEGIN", "shop", &mapped), Ddl::Ignore);
        assert_eq!(
            classify("CREATE TABLE audit (id int)", "shop", &mapped),
            Ddl::Ignore
        );
        assert!(matches!(
            classify("ALTER TABLE orders ADD COLUMN x int", "shop", &mapped),
            Ddl::Stop(_)
        ));
        assert!(matches!(
            classify(
                "ALTER TABLE `shop`.`orders` DROP COLUMN note",
                "other",
                &mapped
            ),
            Ddl::Stop(_)
        ));
        assert!(matches!(
            classify("TRUNCATE TABLE orders", "shop", &mapped),
            Ddl::Stop(_)
        ));
        assert!(matches!(
            classify("RENAME TABLE orders TO orders_old", "shop", &mapped),
            Ddl::Stop(_)
        ));
        assert_eq!(
            classify("ALTER TABLE orders ADD COLUMN x int", "elsewhere", &mapped),
            Ddl::Ignore
        );
        assert!(matches!(
            classify("OPTIMIZE NO_WRITE_TO_BINLOG orders ???", "shop", &mapped),
            Ddl::Stop(_)
        ));
    }
}
