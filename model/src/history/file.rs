//! The history as a JSON-lines file next to the config: the default, for one
//! operator (or several sharing one machine). Locks and leases are `flock`s on
//! files beside it, released by the operating system however the process ends.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::{Entry, HistoryError, Hold, Lease, LeaseError};

/// The file and what it is kept beside.
#[derive(Debug, Clone)]
pub(super) struct FileHistory {
    path: PathBuf,
}

impl FileHistory {
    pub(super) fn new(path: &Path) -> Self {
        Self {
            path: path.to_path_buf(),
        }
    }

    pub(super) fn path(&self) -> &Path {
        &self.path
    }

    pub(super) fn read(&self) -> Result<Vec<Entry>, HistoryError> {
        let file = match File::open(&self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(self.io(e)),
        };
        let mut entries = Vec::new();
        for (i, line) in BufReader::new(file).lines().enumerate() {
            let line = line.map_err(|e| self.io(e))?;
            if line.trim().is_empty() {
                continue;
            }
            let mut entry: Entry =
                serde_json::from_str(&line).map_err(|source| HistoryError::Corrupt {
                    place: self.path.display().to_string(),
                    at: format!("line {}", i + 1),
                    source,
                })?;
            entry.number = entries.len() + 1;
            entries.push(entry);
        }
        Ok(entries)
    }

    pub(super) fn append(&self, entry: &Entry) -> Result<(), HistoryError> {
        let line = self.line(entry)?;
        let mut file = self.locked()?;
        self.write_line(&mut file, &line)
    }

    pub(super) fn append_if(
        &self,
        entry: &Entry,
        decide: impl FnOnce(&[Entry]) -> bool,
    ) -> Result<(bool, Vec<Entry>), HistoryError> {
        let line = self.line(entry)?;
        let mut file = self.locked()?;
        let entries: Vec<Entry> = self
            .read()?
            .into_iter()
            .filter(|e| e.route == entry.route)
            .collect();
        if !decide(&entries) {
            return Ok((false, entries));
        }
        self.write_line(&mut file, &line)?;
        Ok((true, entries))
    }

    pub(super) async fn move_lock(
        &self,
        route: &str,
        wait: Duration,
    ) -> Result<Option<Lease>, HistoryError> {
        let file = self.beside(&format!("move-{route}.lock"))?;
        let deadline = Instant::now() + wait;
        loop {
            match file.try_lock() {
                Ok(()) => return Ok(Some(Lease(Hold::File(file)))),
                Err(std::fs::TryLockError::WouldBlock) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(std::fs::TryLockError::WouldBlock) => return Ok(None),
                Err(std::fs::TryLockError::Error(e)) => return Err(self.io(e)),
            }
        }
    }

    pub(super) fn lease(&self, route: &str, holder: &str) -> Result<Lease, LeaseError> {
        let mut file = self.beside(&format!("rollout-{route}.lease"))?;
        match file.try_lock() {
            Ok(()) => {
                file.set_len(0).map_err(|e| self.io(e))?;
                self.write_line(&mut file, holder)?;
                Ok(Lease(Hold::File(file)))
            }
            Err(std::fs::TryLockError::WouldBlock) => {
                let mut text = String::new();
                let _ = std::io::Read::read_to_string(&mut file, &mut text);
                Err(LeaseError::held(route, text.trim()))
            }
            Err(std::fs::TryLockError::Error(e)) => Err(self.io(e).into()),
        }
    }

    /// `entry` as the line the file holds.
    fn line(&self, entry: &Entry) -> Result<String, HistoryError> {
        let mut line = serde_json::to_string(entry).map_err(|source| HistoryError::Corrupt {
            place: self.path.display().to_string(),
            at: "writing".into(),
            source,
        })?;
        line.push('\n');
        Ok(line)
    }

    /// The file opened for appending, under its exclusive lock (until dropped).
    fn locked(&self) -> Result<File, HistoryError> {
        let file = File::options()
            .create(true)
            .append(true)
            .open(&self.path)
            .map_err(|e| self.io(e))?;
        file.lock().map_err(|e| self.io(e))?;
        Ok(file)
    }

    /// One `write` of the line, then fsync.
    fn write_line(&self, file: &mut File, line: &str) -> Result<(), HistoryError> {
        file.write_all(line.as_bytes()).map_err(|e| self.io(e))?;
        file.sync_data().map_err(|e| self.io(e))
    }

    /// A file beside the history (`<history file name>.<suffix>`), opened for
    /// reading and writing, created when missing: what the locks and leases lock.
    fn beside(&self, suffix: &str) -> Result<File, HistoryError> {
        let name = format!(
            "{}.{suffix}",
            self.path
                .file_name()
                .map_or_else(|| "strangler.history".into(), |n| n.to_string_lossy())
        );
        File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(self.path.with_file_name(name))
            .map_err(|e| self.io(e))
    }

    fn io(&self, source: std::io::Error) -> HistoryError {
        HistoryError::Io {
            path: self.path.clone(),
            source,
        }
    }
}
