//! MySQL/MariaDB helpers shared by its source, sink and verify: connecting (in
//! UTC), errors that know whether only the connection was lost, reading a table's
//! columns and key, and MySQL values as the PostgreSQL text the mappings read.

pub mod schema;

use std::time::{Duration, UNIX_EPOCH};

use mysql_async::prelude::Queryable;
use mysql_async::{Conn, Opts, Value};

use crate::error::CdcError;
use crate::plan::{Column, Table};

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
pub(crate) trait MysqlFailure: std::fmt::Display {
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

pub(crate) fn mysql_error(e: impl MysqlFailure) -> CdcError {
    CdcError::MySql {
        message: format!("MySQL source: {e}"),
        transient: e.lost_connection(),
    }
}

pub(crate) fn labels(column_type: &str) -> Vec<String> {
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
        let (pg, _) = schema::pg_type(&column_type, name, &col, &mut notes);
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

pub(crate) fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(2 + bytes.len() * 2);
    s.push_str("\\x");
    for b in bytes {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

pub(crate) fn epoch_text(secs: &str) -> Option<String> {
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
pub(crate) fn snapshot_text(v: &Value, conv: &Conv) -> Option<String> {
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

pub(crate) fn value_text(v: &Value) -> String {
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

pub(crate) fn q(name: &str) -> String {
    format!("`{}`", name.replace('`', "``"))
}

pub(crate) async fn mysql_conn(url: &str) -> Result<Conn, CdcError> {
    let url = url.replacen("mariadb://", "mysql://", 1);
    let opts = Opts::from_url(&url).map_err(mysql_error)?;
    let mut conn = Conn::new(opts).await.map_err(mysql_error)?;
    conn.query_drop("SET time_zone = '+00:00'")
        .await
        .map_err(mysql_error)?;
    Ok(conn)
}
