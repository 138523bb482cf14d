//! The database-neutral vocabulary of a CDC stream: where a stream stands
//! ([`Position`]: a PostgreSQL LSN or a MySQL/MariaDB binlog coordinate), a changed
//! row as a source sent it ([`Row`]), a row's key and values as text, and what a
//! batch did to the target. Nothing here knows a database.
use std::fmt;
use std::str::FromStr;

/// A WAL position, shown and parsed as PostgreSQL does (`16/B374D848`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Lsn(pub u64);

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

/// Text that is not `HIGH/LOW` in hex.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not an LSN (expected HEX/HEX such as 0/16B3748)")]
pub struct LsnParseError(String);

impl FromStr for Lsn {
    type Err = LsnParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || LsnParseError(s.to_string());
        let (high, low) = s.trim().split_once('/').ok_or_else(bad)?;
        let high = u32::from_str_radix(high, 16).map_err(|_| bad())?;
        let low = u32::from_str_radix(low, 16).map_err(|_| bad())?;
        Ok(Self((u64::from(high) << 32) | u64::from(low)))
    }
}

impl Lsn {
    /// Bytes between two positions (0 when `earlier` is not earlier).
    pub fn bytes_since(self, earlier: Lsn) -> u64 {
        self.0.saturating_sub(earlier.0)
    }
}

/// Where a stream stands: the end of the last transaction applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Position {
    /// A PostgreSQL WAL position (the end of a commit record).
    Lsn(Lsn),
    /// A MySQL/MariaDB binlog coordinate, with the server's GTID state there when
    /// known (the stream resumes by GTID when the file is gone, e.g. after a
    /// failover).
    Binlog {
        /// Binlog file name (`mariadb-bin.000003`).
        file: String,
        /// Offset in the file.
        offset: u64,
        /// GTID state (`0-1-100,1-2-7`).
        gtid: Option<String>,
    },
}

impl Position {
    /// The value the checkpoint stores (a `pg_lsn`): the LSN itself, or a binlog
    /// coordinate as `FILE_NUMBER/OFFSET` (file `mariadb-bin.000003`, offset 0x1a2b
    /// is `3/1A2B`).
    pub fn checkpoint(&self) -> Lsn {
        match self {
            Position::Lsn(lsn) => *lsn,
            Position::Binlog { file, offset, .. } => {
                Lsn((binlog_number(file).unwrap_or(0) << 32) | (offset & 0xffff_ffff))
            }
        }
    }

    /// The GTID state kept beside the checkpoint, if any.
    pub fn gtid(&self) -> Option<&str> {
        match self {
            Position::Binlog { gtid, .. } => gtid.as_deref(),
            Position::Lsn(_) => None,
        }
    }
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Position::Lsn(lsn) => lsn.fmt(f),
            Position::Binlog { file, offset, .. } => write!(f, "{file}:{offset}"),
        }
    }
}

/// The number of binlog file `name` (`mariadb-bin.000003` → 3; a rotate event's
/// name may carry trailing bytes).
pub fn binlog_number(name: &str) -> Option<u64> {
    let digits: String = name
        .rsplit('.')
        .next()?
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

/// A changed row as the source sent it.
pub trait Row {
    /// Column `name`'s value as text: `None` when the source did not send it (an
    /// unchanged large value), `Some(None)` for NULL.
    fn text(&self, name: &str) -> Option<Option<&[u8]>>;
}

/// A row's source key values (text; `None` is NULL).
pub type Key = Vec<Option<String>>;
/// Carried column values of a row.
pub type Values = Vec<Option<String>>;

/// A row before a batch's changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Before {
    /// It did not exist.
    Absent,
    /// Its carried values.
    Row(Values),
}

/// What applying a batch did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Applied {
    /// Rows written.
    pub rows: u64,
    /// Conflicts found (and resolved by the mappings' policies).
    pub conflicts: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsns_round_trip_through_postgres_text() {
        for text in ["0/0", "0/16B3748", "16/B374D848", "FFFFFFFF/FFFFFFFF"] {
            let lsn: Lsn = text.parse().expect(text);
            assert_eq!(lsn.to_string(), text);
        }
        assert!("16B3748".parse::<Lsn>().is_err());
        assert!("0/xyz".parse::<Lsn>().is_err());
        assert_eq!(Lsn(10).bytes_since(Lsn(4)), 6);
        assert_eq!(Lsn(4).bytes_since(Lsn(10)), 0);
    }

    #[test]
    fn binlog_positions_are_checkpointed_as_file_number_and_offset() {
        let p = Position::Binlog {
            file: "mariadb-bin.000003".into(),
            offset: 0x1a2b,
            gtid: Some("0-1-9".into()),
        };
        assert_eq!(p.checkpoint().to_string(), "3/1A2B");
        assert_eq!(p.gtid(), Some("0-1-9"));
        assert_eq!(binlog_number("mariadb-bin.000012\0\0"), Some(12));
        assert_eq!(binlog_number("nodigits"), None);
        assert_eq!(Position::Lsn(Lsn(7)).checkpoint(), Lsn(7));
    }
}
