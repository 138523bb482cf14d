//! The disk spool: batches that could not be stored wait here, in order, until the
//! store is back. A batch is acknowledged to its exporter once it is in the store
//! or fsynced here, so an acknowledged span survives a ClickHouse outage and a
//! collector crash.

use std::marker::PhantomData;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::model::SpanRow;

/// Why the spool could not take or give back a batch.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    /// It holds `max_bytes` already.
    #[error("spool {dir} is full ({used} of {max} bytes)")]
    Full {
        /// The directory.
        dir: PathBuf,
        /// Bytes used.
        used: u64,
        /// The limit.
        max: u64,
    },
    /// A file operation failed.
    #[error("spool {path}: {message}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What happened.
        message: String,
    },
}

/// Spooled batches merged for one replay insert.
#[derive(Debug)]
pub struct Merged<R = SpanRow> {
    /// The files the rows came from, removed once the insert succeeds.
    pub files: Vec<PathBuf>,
    /// The rows, oldest first.
    pub rows: Vec<R>,
}

/// A directory of numbered batch files of rows `R` (spans, or metric points).
#[derive(Debug)]
pub struct Spool<R = SpanRow> {
    dir: PathBuf,
    max_bytes: u64,
    used: AtomicU64,
    next: AtomicU64,
    rows: PhantomData<fn() -> R>,
}

const SUFFIX: &str = ".batch.json";
/// Span batches as the RowBinary rows the insert sends, after [`ENCODED_MAGIC`] and
/// the row count.
const ENCODED_SUFFIX: &str = ".spans.rowbinary";
/// What every encoded batch file starts with (a format version, so a later change
/// is recognised rather than sent to ClickHouse as rows).
const ENCODED_MAGIC: &[u8; 8] = b"STRRB001";

/// Spooled span batches merged for one replay insert.
#[derive(Debug)]
pub struct MergedEncoded {
    /// The files the rows came from, removed once the insert succeeds.
    pub files: Vec<PathBuf>,
    /// The rows, oldest first.
    pub spans: crate::rowbinary::Encoded,
}

impl<R: Serialize + DeserializeOwned> Spool<R> {
    /// Opens (or creates) the spool in `dir`, counting what a previous run left.
    pub fn open(dir: &Path, max_bytes: u64) -> Result<Self, SpoolError> {
        let io = |path: &Path, e: std::io::Error| SpoolError::Io {
            path: path.to_path_buf(),
            message: e.to_string(),
        };
        std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
        let mut used = 0;
        let mut next = 0;
        for entry in std::fs::read_dir(dir).map_err(|e| io(dir, e))? {
            let entry = entry.map_err(|e| io(dir, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(n) = name
                .strip_suffix(SUFFIX)
                .or_else(|| name.strip_suffix(ENCODED_SUFFIX))
                .and_then(|n| n.parse::<u64>().ok())
            {
                used += entry.metadata().map(|m| m.len()).unwrap_or(0);
                next = next.max(n + 1);
            } else if name.ends_with(".tmp") {
                // A write that never finished was never acknowledged.
                let _ = std::fs::remove_file(entry.path());
            }
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            max_bytes,
            used: AtomicU64::new(used),
            next: AtomicU64::new(next),
            rows: PhantomData,
        })
    }

    /// Bytes held.
    pub fn used_bytes(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    /// Writes a batch durably (temp file, fsync, rename, fsync of the directory).
    pub fn push(&self, rows: &[R]) -> Result<(), SpoolError> {
        let bytes = serde_json::to_vec(rows).map_err(|e| SpoolError::Io {
            path: self.dir.clone(),
            message: e.to_string(),
        })?;
        self.write_file(SUFFIX, &[&bytes])
    }

    /// Writes `parts` as one new batch file, durably.
    fn write_file(&self, suffix: &str, parts: &[&[u8]]) -> Result<(), SpoolError> {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        let used = self.used.load(Ordering::Relaxed);
        if used + len as u64 > self.max_bytes {
            return Err(SpoolError::Full {
                dir: self.dir.clone(),
                used,
                max: self.max_bytes,
            });
        }
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let path = self.dir.join(format!("{n:020}{suffix}"));
        let tmp = self.dir.join(format!("{n:020}.tmp"));
        let io = |e: std::io::Error| SpoolError::Io {
            path: path.clone(),
            message: e.to_string(),
        };
        {
            use std::io::Write;
            let mut file = std::fs::File::create(&tmp).map_err(io)?;
            for part in parts {
                file.write_all(part).map_err(io)?;
            }
            file.sync_all().map_err(io)?;
        }
        std::fs::rename(&tmp, &path).map_err(io)?;
        if let Ok(dir) = std::fs::File::open(&self.dir) {
            let _ = dir.sync_all();
        }
        self.used.fetch_add(len as u64, Ordering::Relaxed);
        Ok(())
    }

    /// The oldest batches, merged up to about `max_rows` rows, with their files (so
    /// a long outage replays in a few large inserts rather than one per export).
    pub fn oldest_merged(&self, max_rows: usize) -> Result<Option<Merged<R>>, SpoolError> {
        let mut paths = Vec::new();
        let mut rows = Vec::new();
        for name in self.names()? {
            if !rows.is_empty() && rows.len() >= max_rows {
                break;
            }
            let path = self.dir.join(&name);
            match self.read_batch(&path) {
                Ok(batch) => {
                    rows.extend(batch);
                    paths.push(path);
                }
                // A corrupt file was moved aside; report it once the good ones are in.
                Err(e) if paths.is_empty() => return Err(e),
                Err(e) => {
                    tracing::error!("{e}");
                    break;
                }
            }
        }
        Ok((!paths.is_empty()).then_some(Merged { files: paths, rows }))
    }

    fn names(&self) -> Result<Vec<String>, SpoolError> {
        let io = |e: std::io::Error| SpoolError::Io {
            path: self.dir.clone(),
            message: e.to_string(),
        };
        let mut names: Vec<String> = std::fs::read_dir(&self.dir)
            .map_err(io)?
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(SUFFIX) || n.ends_with(ENCODED_SUFFIX))
            .collect();
        names.sort();
        Ok(names)
    }

    fn read_batch(&self, path: &Path) -> Result<Vec<R>, SpoolError> {
        let bytes = std::fs::read(path).map_err(|e| SpoolError::Io {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        serde_json::from_slice(&bytes).map_err(|e| {
            let _ = std::fs::rename(path, path.with_extension("bad"));
            self.used.fetch_sub(bytes.len() as u64, Ordering::Relaxed);
            SpoolError::Io {
                path: path.to_path_buf(),
                message: format!("corrupt batch (moved aside as .bad): {e}"),
            }
        })
    }

    /// Removes a batch once it is stored.
    pub fn remove(&self, path: &Path) -> Result<(), SpoolError> {
        let len = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
        std::fs::remove_file(path).map_err(|e| SpoolError::Io {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        self.used
            .fetch_sub(len.min(self.used_bytes()), Ordering::Relaxed);
        Ok(())
    }
}

impl Spool<SpanRow> {
    /// Writes encoded span rows durably, as they are (no re-encoding).
    pub fn push_encoded(&self, spans: &crate::rowbinary::Encoded) -> Result<(), SpoolError> {
        let header = [ENCODED_MAGIC.as_slice(), &(spans.rows as u64).to_le_bytes()].concat();
        let mut parts: Vec<&[u8]> = vec![&header];
        parts.extend(spans.chunks.iter().map(|c| c.as_ref()));
        self.write_file(ENCODED_SUFFIX, &parts)
    }

    /// The oldest span batches merged up to about `max_rows` rows, with their files:
    /// encoded batches as they are, JSON batches an older collector left encoded now.
    pub fn oldest_encoded(&self, max_rows: usize) -> Result<Option<MergedEncoded>, SpoolError> {
        let mut files = Vec::new();
        let mut spans = crate::rowbinary::Encoded::default();
        for name in self.names()? {
            if !spans.is_empty() && spans.rows >= max_rows {
                break;
            }
            let path = self.dir.join(&name);
            let batch = if name.ends_with(ENCODED_SUFFIX) {
                self.read_encoded(&path)
            } else {
                self.read_batch(&path)
                    .map(|rows| crate::rowbinary::Encoded::from_rows(&rows))
            };
            match batch {
                Ok(batch) => {
                    spans.append(batch);
                    files.push(path);
                }
                Err(e) if files.is_empty() => return Err(e),
                Err(e) => {
                    tracing::error!("{e}");
                    break;
                }
            }
        }
        Ok((!files.is_empty()).then_some(MergedEncoded { files, spans }))
    }

    fn read_encoded(&self, path: &Path) -> Result<crate::rowbinary::Encoded, SpoolError> {
        let bytes = std::fs::read(path).map_err(|e| SpoolError::Io {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        let header = ENCODED_MAGIC.len() + 8;
        let rows = bytes
            .get(..header)
            .filter(|h| h.starts_with(ENCODED_MAGIC))
            .and_then(|h| h[ENCODED_MAGIC.len()..].try_into().ok())
            .map(u64::from_le_bytes);
        match rows {
            Some(rows) if rows > 0 && bytes.len() > header => {
                let mut bytes = bytes;
                let body = bytes.split_off(header);
                Ok(crate::rowbinary::Encoded::one(
                    body,
                    usize::try_from(rows).unwrap_or(usize::MAX),
                ))
            }
            _ => Err(self.set_aside(path, bytes.len(), "not an encoded span batch")),
        }
    }

    /// Moves a batch the store refused as malformed out of the replay order (as
    /// `.bad`, for a person to look at), so it does not block every batch after it.
    pub fn set_aside_refused(&self, path: &Path) -> SpoolError {
        let len = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
        self.set_aside(
            path,
            usize::try_from(len).unwrap_or(0),
            "refused by the store",
        )
    }

    fn set_aside(&self, path: &Path, len: usize, why: &str) -> SpoolError {
        let _ = std::fs::rename(path, path.with_extension("bad"));
        self.used
            .fetch_sub((len as u64).min(self.used_bytes()), Ordering::Relaxed);
        SpoolError::Io {
            path: path.to_path_buf(),
            message: format!("{why} (moved aside as .bad)"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(n: usize, tag: &str) -> Vec<SpanRow> {
        (0..n)
            .map(|i| SpanRow {
                span_id: format!("{tag}{i}"),
                ..SpanRow::default()
            })
            .collect()
    }

    #[test]
    fn batches_replay_in_order_merged_and_survive_a_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let spool = Spool::open(dir.path(), 1 << 20).expect("open");
        for tag in ["a", "b", "c"] {
            spool.push(&rows(2, tag)).expect("push");
        }
        drop(spool);
        // A write interrupted before its rename was never acknowledged: dropped at open.
        std::fs::write(dir.path().join("00000000000000000099.tmp"), b"half").expect("write");
        let spool: Spool = Spool::open(dir.path(), 1 << 20).expect("reopen");
        assert!(spool.used_bytes() > 0);
        let merged = spool.oldest_merged(3).expect("read").expect("some");
        assert_eq!(merged.files.len(), 2);
        let ids: Vec<&str> = merged.rows.iter().map(|r| r.span_id.as_str()).collect();
        assert_eq!(ids, ["a0", "a1", "b0", "b1"]);
        for f in &merged.files {
            spool.remove(f).expect("remove");
        }
        let rest = spool.oldest_merged(100).expect("read").expect("some");
        assert_eq!(rest.rows.len(), 2);
        spool
            .push(&rows(1, "d"))
            .expect("push after reopen keeps numbering");
        let all = spool.oldest_merged(100).expect("read").expect("some");
        assert_eq!(all.rows.last().map(|r| r.span_id.as_str()), Some("d0"));
    }

    #[test]
    fn encoded_batches_replay_as_written_after_json_batches_an_older_collector_left() {
        use crate::rowbinary::Encoded;
        let dir = tempfile::tempdir().expect("tempdir");
        let spool: Spool = Spool::open(dir.path(), 1 << 20).expect("open");
        spool.push(&rows(2, "old")).expect("json batch");
        let new = Encoded::from_rows(&rows(3, "new"));
        spool.push_encoded(&new).expect("encoded batch");
        drop(spool);
        let spool: Spool = Spool::open(dir.path(), 1 << 20).expect("reopen");
        let merged = spool.oldest_encoded(100).expect("read").expect("some");
        assert_eq!(merged.files.len(), 2);
        assert_eq!(merged.spans.rows, 5);
        let mut want = Encoded::from_rows(&rows(2, "old"));
        want.append(new);
        let flat = |e: &Encoded| {
            e.chunks
                .iter()
                .flat_map(|c| c.to_vec())
                .collect::<Vec<u8>>()
        };
        assert_eq!(flat(&merged.spans), flat(&want));
        // A file that is not an encoded batch is set aside, not sent as rows.
        std::fs::write(
            dir.path().join("00000000000000000050.spans.rowbinary"),
            b"junk",
        )
        .expect("write");
        for f in &merged.files {
            spool.remove(f).expect("remove");
        }
        assert!(spool.oldest_encoded(100).is_err());
        assert!(dir.path().join("00000000000000000050.spans.bad").exists());
        assert!(spool.oldest_encoded(100).expect("read").is_none());
    }

    #[test]
    fn a_full_spool_refuses_instead_of_growing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let spool = Spool::open(dir.path(), 600).expect("open");
        spool.push(&rows(1, "a")).expect("first fits");
        let err = loop {
            if let Err(e) = spool.push(&rows(1, "b")) {
                break e;
            }
        };
        assert!(matches!(err, SpoolError::Full { .. }), "{err}");
    }
}
