//! MySQL/MariaDB as the legacy source: a consistent snapshot, then the binlog (ROW
//! format) from the snapshot's exact position, read with `mysql_async`'s binlog
//! stream. Rows reach the PostgreSQL target as text ([`Row`]) and the mapping runs
//! there, as for a PostgreSQL source, through the same pipeline and checkpoint.
//!
//! Positions are binlog coordinates. The checkpoint (a `pg_lsn` in the target) holds
//! them as `FILE/OFFSET` in hex: file `mariadb-bin.000003`, offset 0x1a2b is `3/1A2B`.
//! The snapshot's position comes from MariaDB's `binlog_snapshot_file` /
//! `binlog_snapshot_position`, which are consistent with `START TRANSACTION WITH
//! CONSISTENT SNAPSHOT`.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt as _;
use mysql_async::binlog::EventType;
use mysql_async::binlog::events::{EventData, RowsEventData};
use mysql_async::binlog::row::BinlogRow;
use mysql_async::binlog::value::BinlogValue;
use mysql_async::prelude::Queryable;
use mysql_async::{BinlogStream, BinlogStreamRequest, Conn, Value};
use tokio_postgres::Client;

use crate::batch::Batch;
use crate::config::CdcConfig;
use crate::error::{ApplyError, CdcError, CheckError};
use crate::model::{Lsn, Position, Row, binlog_number};
use crate::mysql::{
    Conv, MysqlFailure, describe, epoch_text, hex, mysql_conn, mysql_error, q, snapshot_text,
    value_text,
};
use crate::pg::connect;
use crate::plan::{TablePlan, check_with};
use crate::sink::mysql::server_id_for;
use crate::sink::postgres::{
    CHECKPOINT_TABLE, ensure_checkpoint_table, read_checkpoint, tag_origin, write_checkpoint,
};
use crate::source::{Source, Step};

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
pub(crate) struct Coord {
    /// Binlog file name.
    pub file: String,
    /// Offset.
    pub offset: u64,
}

impl Coord {
    fn number(&self) -> Option<u64> {
        binlog_number(&self.file)
    }

    /// As a checkpoint value: `FILE_NUMBER/OFFSET`.
    pub(crate) fn checkpoint(&self) -> Lsn {
        self.at(None).checkpoint()
    }

    /// The stream position here, with GTID state `gtid`.
    fn at(&self, gtid: Option<String>) -> Position {
        Position::Binlog {
            file: self.file.clone(),
            offset: self.offset,
            gtid,
        }
    }
}

/// The end of the server's binlog now (`None` when binary logging is off).
pub(crate) async fn binlog_end(conn: &mut Conn) -> Result<Option<Coord>, CdcError> {
    let row: Option<mysql_async::Row> = conn
        .query_first("SHOW MASTER STATUS")
        .await
        .map_err(mysql_error)?;
    Ok(row.map(|r| Coord {
        file: r.get(0).unwrap_or_default(),
        offset: r.get(1).unwrap_or(4),
    }))
}

async fn position_of(conn: &mut Conn, lsn: Lsn) -> Result<Coord, CdcError> {
    let number = lsn.0 >> 32;
    let logs: Vec<mysql_async::Row> = conn.query("SHOW BINARY LOGS").await.map_err(mysql_error)?;
    for row in logs {
        let file: String = row.get(0).unwrap_or_default();
        let p = Coord {
            file: file.clone(),
            offset: 0,
        };
        if p.number() == Some(number) {
            return Ok(Coord {
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

pub(crate) struct Tables {
    pub(crate) plans: Vec<TablePlan>,
    pub(crate) convs: Vec<Vec<Conv>>,
    /// Source column order (binlog rows are positional).
    pub(crate) columns: Vec<Vec<Arc<str>>>,
}

pub(crate) async fn prepare(
    config: &CdcConfig,
    conn: &mut Conn,
    target: &Client,
) -> Result<Tables, CdcError> {
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
    Ok(Tables {
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

/// The query reading a mapped table's carried columns from MySQL, and how each
/// value becomes PostgreSQL text.
pub(crate) fn source_select<'a>(
    plan: &TablePlan,
    src: &'a Tables,
    t: usize,
) -> (String, Vec<&'a Conv>) {
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
    src: &Tables,
) -> Result<(Conn, Coord), CdcError> {
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
    let position = Coord {
        file,
        offset: offset.parse().map_err(mysql_error)?,
    };
    let tx = target
        .transaction()
        .await
        .map_err(|e| CdcError::Apply(ApplyError::Checkpoint(e)))?;
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
            crate::sink::postgres::apply_staged(&tx, plan, &[], &refs, &[])
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
    write_checkpoint(&tx, &config.slot, position.checkpoint(), None).await?;
    tx.commit()
        .await
        .map_err(|e| CdcError::Apply(ApplyError::Checkpoint(e)))?;
    let mut conn = conn;
    conn.query_drop("COMMIT").await.map_err(mysql_error)?;
    Ok((conn, position))
}

pub(crate) fn snapshot_error(plan: &TablePlan, e: tokio_postgres::Error) -> CdcError {
    CdcError::Snapshot {
        table: plan.target.quoted(),
        message: e
            .as_db_error()
            .map_or_else(|| e.to_string(), |d| d.message().to_string()),
    }
}

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

fn row_data<'a>(
    row: &BinlogRow,
    names: &'a [Arc<str>],
    convs: &[Conv],
) -> Result<TextRow<'a>, String> {
    let mut values = Vec::with_capacity(names.len());
    for i in 0..names.len() {
        values.push(match row.as_ref(i) {
            Some(v) => Some(binlog_text(v, convs.get(i).unwrap_or(&Conv::Plain))?),
            None => None,
        });
    }
    Ok(TextRow { names, values })
}

/// A binlog row image as text, by column position (`None`: not in the image).
struct TextRow<'a> {
    names: &'a [Arc<str>],
    values: Vec<Option<Option<String>>>,
}

impl Row for TextRow<'_> {
    fn text(&self, name: &str) -> Option<Option<&[u8]>> {
        let i = self.names.iter().position(|n| &**n == name)?;
        self.values
            .get(i)?
            .as_ref()
            .map(|v| v.as_deref().map(str::as_bytes))
    }
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

/// The binlog stream of a MySQL/MariaDB source, started where the target's
/// checkpoint says (after a consistent snapshot when there is none).
pub struct MySqlSource {
    tables: Tables,
    stream: BinlogStream,
    position: Coord,
    gtids: Gtids,
    pending_gtid: Option<(u32, u32, u64)>,
    /// Inside a transaction (BEGIN or rows seen, no commit yet): a batch holds
    /// whole transactions only, so its checkpoint never points into one.
    in_tx: bool,
    default_schema: String,
    mapped: Vec<(String, String)>,
    ignore_server_ids: Vec<u32>,
    tick: Duration,
    resumed_at: Lsn,
}

impl MySqlSource {
    /// Connects to the source, checks the mappings against it and the PostgreSQL
    /// `target`, and opens the binlog stream: from the target's checkpoint (by
    /// GTID when its file is gone), else after a snapshot (`config.snapshot`), else
    /// from the binlog's end. `resnapshot` ignores the checkpoint.
    pub async fn start(
        config: &CdcConfig,
        resnapshot: bool,
        target: &mut Client,
    ) -> Result<Self, CdcError> {
        let mut conn = mysql_conn(&config.source).await?;
        ensure_checkpoint_table(target).await?;
        if !config.origin.is_empty() {
            tag_origin(target, &config.origin).await?;
        }
        let tables = prepare(config, &mut conn, target).await?;
        let checkpoint = if resnapshot {
            None
        } else {
            read_checkpoint(target, &config.slot).await?
        };
        let saved_gtid = checkpoint.as_ref().and_then(|(_, g)| g.clone());
        // Where to start, and whether by GTID (the checkpoint's binlog file is gone,
        // e.g. purged, or another server after a failover, while its GTID is known).
        let mut by_gtid = false;
        let position = match checkpoint {
            Some((lsn, _)) => match (position_of(&mut conn, lsn).await, &saved_gtid) {
                (Ok(p), _) => p,
                (Err(e), Some(gtid)) if !gtid.is_empty() => {
                    tracing::warn!(%gtid, "{e}; resuming by GTID instead");
                    by_gtid = true;
                    Coord {
                        file: String::new(),
                        offset: 4,
                    }
                }
                (Err(e), _) => return Err(e),
            },
            None if config.snapshot => {
                let (returned, p) = snapshot(config, conn, target, &tables).await?;
                conn = returned;
                p
            }
            None => {
                let p = binlog_end(&mut conn)
                    .await?
                    .ok_or_else(|| mysql_error("SHOW MASTER STATUS is empty: is log_bin on?"))?;
                write_checkpoint(&*target, &config.slot, p.checkpoint(), None).await?;
                p
            }
        };
        // The GTID position matching where the stream starts.
        let gtids = match (&saved_gtid, by_gtid || checkpoint.is_some()) {
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
                        &format!("UPDATE {CHECKPOINT_TABLE} SET gtid = $2 WHERE slot = $1"),
                        &[&config.slot, &g],
                    )
                    .await
                    .map_err(|e| CdcError::Apply(ApplyError::Checkpoint(e)))?;
                parse_gtids(&g)
            }
        };
        tracing::info!(file = %position.file, offset = position.offset, "streaming the binlog");
        let default_schema: String = conn
            .query_first("SELECT DATABASE()")
            .await
            .map_err(mysql_error)?
            .unwrap_or_default();
        let mapped: Vec<(String, String)> = tables
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
        let stream = stream_conn
            .get_binlog_stream(request)
            .await
            .map_err(mysql_error)?;
        Ok(Self {
            tables,
            stream,
            resumed_at: position.checkpoint(),
            position,
            gtids,
            pending_gtid: None,
            in_tx: false,
            default_schema,
            mapped,
            ignore_server_ids: config.ignore_server_ids.clone(),
            tick: config.batch_linger.max(Duration::from_millis(5)),
        })
    }

    /// The mappings, checked against the source and the target.
    pub fn plans(&self) -> &[TablePlan] {
        &self.tables.plans
    }

    /// A transaction (or a statement of its own) ended here.
    fn commit(&mut self, batch: &mut Batch, end: u64) {
        self.position.offset = end;
        if let Some((d, sv, sq)) = self.pending_gtid.take() {
            self.gtids.insert(d, (sv, sq));
        }
        batch.commit(self.position.at(Some(format_gtids(&self.gtids))), None);
        self.in_tx = false;
    }
}

#[async_trait]
impl Source for MySqlSource {
    async fn next(&mut self, batch: &mut Batch, _plans: &[TablePlan]) -> Result<Step, CdcError> {
        let event = match tokio::time::timeout(self.tick, self.stream.next()).await {
            Err(_) => return Ok(Step::Idle),
            Ok(None) => return Err(mysql_error(StreamEnded)),
            Ok(Some(event)) => event.map_err(mysql_error)?,
        };
        let header = event.header();
        let end = u64::from(header.log_pos());
        if header.event_type_raw() == MARIADB_GTID_EVENT {
            // seq_no (8 bytes), domain id (4), flags (1); a standalone statement (DDL)
            // has no commit of its own.
            let d = event.data();
            if d.len() >= 13 {
                let seq = u64::from_le_bytes(d[0..8].try_into().unwrap_or([0; 8]));
                let domain = u32::from_le_bytes(d[8..12].try_into().unwrap_or([0; 4]));
                self.pending_gtid = Some((domain, header.server_id(), seq));
                self.in_tx = d[12] & 1 == 0;
            }
            return Ok(Step::Other);
        }
        let Ok(kind) = header.event_type() else {
            return Ok(Step::Other); // other MariaDB-specific events (annotations, GTID lists)
        };
        match kind {
            EventType::ROTATE_EVENT => {
                if let Ok(Some(EventData::RotateEvent(r))) = event.read_data() {
                    let next = Coord {
                        file: r.name().trim_end_matches('\0').to_string(),
                        offset: r.position(),
                    };
                    if next.number().is_some() {
                        self.position = next;
                    } else {
                        tracing::warn!(name = %r.name(), "a rotate event with an unreadable file name; keeping {}", self.position.file);
                    }
                }
                Ok(Step::Other)
            }
            EventType::XID_EVENT => {
                self.commit(batch, end);
                Ok(Step::Commit)
            }
            EventType::QUERY_EVENT => {
                let Ok(Some(EventData::QueryEvent(q))) = event.read_data() else {
                    return Ok(Step::Other);
                };
                let text = q.query();
                let schema = q.schema();
                let schema = if schema.is_empty() {
                    self.default_schema.clone()
                } else {
                    schema.into_owned()
                };
                if text.trim().eq_ignore_ascii_case("BEGIN") {
                    self.in_tx = true;
                    Ok(Step::Other)
                } else if text.trim().eq_ignore_ascii_case("COMMIT") {
                    self.commit(batch, end);
                    Ok(Step::Commit)
                } else if let Ddl::Stop(why) = classify(&text, &schema, &self.mapped) {
                    Ok(Step::Stop(ApplyError::Unsafe(why)))
                } else if !self.in_tx {
                    // A statement of its own outside any mapped table (DDL
                    // elsewhere): the position moves past it.
                    self.commit(batch, end);
                    Ok(Step::Commit)
                } else {
                    Ok(Step::Other)
                }
            }
            EventType::WRITE_ROWS_EVENT
            | EventType::UPDATE_ROWS_EVENT
            | EventType::DELETE_ROWS_EVENT
            | EventType::WRITE_ROWS_EVENT_V1
            | EventType::UPDATE_ROWS_EVENT_V1
            | EventType::DELETE_ROWS_EVENT_V1 => {
                self.in_tx = true;
                if self.ignore_server_ids.contains(&header.server_id()) {
                    // Written by strangler's reverse stream: applying it here would
                    // send it back where it came from.
                    return Ok(Step::Other);
                }
                let Ok(Some(EventData::RowsEvent(rows))) = event.read_data() else {
                    return Ok(Step::Other);
                };
                let Some(tme) = self.stream.get_tme(rows.table_id()) else {
                    return Err(mysql_error("a rows event arrived before its table map"));
                };
                let (db, table) = (tme.database_name(), tme.table_name());
                let tables = &self.tables;
                let Some(t) = tables.plans.iter().position(|p| {
                    p.source.schema.eq_ignore_ascii_case(&db)
                        && p.source.name.eq_ignore_ascii_case(&table)
                }) else {
                    return Ok(Step::Other);
                };
                let plan = &tables.plans[t];
                for pair in rows.rows(tme) {
                    let (before, after) = pair.map_err(mysql_error)?;
                    let conv = |r: &BinlogRow| {
                        row_data(r, &tables.columns[t], &tables.convs[t]).map_err(|e| {
                            CdcError::Apply(ApplyError::Unsafe(format!(
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
                        ) => batch.insert(t, plan, &conv(&a)?)?,
                        (_, Some(b), Some(a)) => {
                            batch.update(t, plan, Some(&conv(&b)?), &conv(&a)?)?;
                        }
                        (_, Some(b), None) => batch.delete(t, plan, &conv(&b)?)?,
                        _ => {}
                    }
                }
                Ok(Step::Change)
            }
            _ => Ok(Step::Other),
        }
    }

    fn in_transaction(&self) -> bool {
        self.in_tx
    }

    fn resumed_at(&self) -> Lsn {
        self.resumed_at
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mysql::labels;

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
