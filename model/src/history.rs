//! The route history: every lifecycle change, appended as one JSON line to a file
//! next to the config. Entries are numbered from 1 in file order. The CLI writes it
//! and reads it back; CDC's `owner` conflict policy reads it through the same type.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::lifecycle::State;

/// A rollout controller's hold on one route ([`History::lease`]); released when
/// dropped.
#[derive(Debug)]
pub struct Lease {
    _file: File,
}

/// Why a rollout lease was not taken.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    /// Another controller holds it.
    #[error("another rollout controller is running for {route}: {holder}")]
    Held {
        /// The route.
        route: String,
        /// Who holds it, as it wrote itself down.
        holder: String,
    },
    /// The lease file could not be used.
    #[error(transparent)]
    History(#[from] HistoryError),
}

/// The history could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    /// Opening, reading, locking, writing or syncing the file failed.
    #[error("route history {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A line is not an entry (written by something else, or cut short).
    #[error("route history {path}: line {line}: {source}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// 1-based line.
        line: usize,
        /// What serde said.
        #[source]
        source: serde_json::Error,
    },
}

/// One recorded change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// 1-based position in the history (all routes), filled in on read.
    #[serde(skip)]
    pub number: usize,
    /// RFC 3339 UTC time of the change.
    pub at: String,
    /// Who: `--actor`, or the OS user.
    pub actor: String,
    /// The route.
    pub route: String,
    /// State before.
    pub from: State,
    /// State after.
    pub to: State,
    /// The command that made it (`canary`, `rollback`, `restore #3`, …).
    pub action: String,
    /// Why, if given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The numbers an automated rollout decided on, if it made the change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub evidence: Option<serde_json::Value>,
}

/// The history file.
#[derive(Debug, Clone)]
pub struct History {
    path: PathBuf,
}

impl Entry {
    /// A change made now by `actor`, without a reason or evidence (set them on the
    /// result when there are some); numbered when read back.
    pub fn now(actor: &str, route: &str, from: State, to: State, action: &str) -> Self {
        Self {
            number: 0,
            at: now_rfc3339(),
            actor: actor.to_string(),
            route: route.to_string(),
            from,
            to,
            action: action.to_string(),
            reason: None,
            evidence: None,
        }
    }
}

impl History {
    /// The history at `path`.
    pub fn new(path: &Path) -> Self {
        Self {
            path: path.to_path_buf(),
        }
    }

    /// Every entry, numbered.
    pub fn read(&self) -> Result<Vec<Entry>, HistoryError> {
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
                    path: self.path.clone(),
                    line: i + 1,
                    source,
                })?;
            entry.number = entries.len() + 1;
            entries.push(entry);
        }
        Ok(entries)
    }

    /// Entries for one route.
    pub fn for_route(&self, route: &str) -> Result<Vec<Entry>, HistoryError> {
        Ok(self
            .read()?
            .into_iter()
            .filter(|e| e.route == route)
            .collect())
    }

    /// The route's last recorded state.
    pub fn last_state(&self, route: &str) -> Result<Option<State>, HistoryError> {
        Ok(self.for_route(route)?.last().map(|e| e.to))
    }

    /// Appends an entry (one `write` of one line, under a lock, then fsync).
    pub fn append(&self, entry: &Entry) -> Result<(), HistoryError> {
        let line = self.line(entry)?;
        let mut file = self.locked()?;
        self.write_line(&mut file, &line)
    }

    /// `entry` as the line the file holds.
    fn line(&self, entry: &Entry) -> Result<String, HistoryError> {
        let mut line = serde_json::to_string(entry).map_err(|source| HistoryError::Corrupt {
            path: self.path.clone(),
            line: 0,
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

    /// Under the history's lock: reads `route`'s entries, asks `decide` whether to
    /// append `entry` after them, and appends it if so. Returns whether it did and
    /// the route's entries as read (without `entry`). Moves that must not miss each
    /// other (a forward move and a rollback) check and write in one step this way.
    pub fn append_if(
        &self,
        entry: &Entry,
        decide: impl FnOnce(&[Entry]) -> bool,
    ) -> Result<(bool, Vec<Entry>), HistoryError> {
        let line = self.line(entry)?;
        let mut file = self.locked()?;
        let entries = self.for_route(&entry.route)?;
        if !decide(&entries) {
            return Ok((false, entries));
        }
        self.write_line(&mut file, &line)?;
        Ok((true, entries))
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

    /// Tries to take `route`'s move lock (a file beside the history) once: forward
    /// moves of one route run one at a time. `None`: another move holds it.
    pub fn try_move_lock(&self, route: &str) -> Result<Option<Lease>, HistoryError> {
        let file = self.beside(&format!("move-{route}.lock"))?;
        match file.try_lock() {
            Ok(()) => Ok(Some(Lease { _file: file })),
            Err(std::fs::TryLockError::WouldBlock) => Ok(None),
            Err(std::fs::TryLockError::Error(e)) => Err(self.io(e)),
        }
    }

    /// Where it is kept.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Takes the rollout lease of `route` for `holder` (who, where, since when):
    /// an exclusive lock on a file next to the history, held until the [`Lease`] is
    /// dropped — or the process ends, whatever way: the operating system releases
    /// it, so a crashed controller never leaves a stale lease behind. A second
    /// controller for the route is refused and told who holds it.
    pub fn lease(&self, route: &str, holder: &str) -> Result<Lease, LeaseError> {
        let mut file = self.beside(&format!("rollout-{route}.lease"))?;
        match file.try_lock() {
            Ok(()) => {
                file.set_len(0).map_err(|e| self.io(e))?;
                self.write_line(&mut file, holder)?;
                Ok(Lease { _file: file })
            }
            Err(std::fs::TryLockError::WouldBlock) => {
                let mut text = String::new();
                let _ = std::io::Read::read_to_string(&mut file, &mut text);
                let holder = text.trim();
                Err(LeaseError::Held {
                    route: route.to_string(),
                    holder: if holder.is_empty() {
                        "(starting)".to_string()
                    } else {
                        holder.to_string()
                    },
                })
            }
            Err(std::fs::TryLockError::Error(e)) => Err(self.io(e).into()),
        }
    }

    fn io(&self, source: std::io::Error) -> HistoryError {
        HistoryError::Io {
            path: self.path.clone(),
            source,
        }
    }
}

/// The current time as RFC 3339 UTC, seconds precision.
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lifecycle::Percent;

    fn entry(route: &str, from: State, to: State) -> Entry {
        Entry::now("alice", route, from, to, "test")
    }

    #[test]
    fn entries_are_numbered_in_order_and_filtered_by_route() {
        let dir = tempfile::tempdir().expect("tempdir");
        let h = History::new(&dir.path().join("h.jsonl"));
        assert_eq!(h.last_state("orders").expect("read"), None);
        let canary = State::Canary {
            percent: Percent::try_from(10).expect("pct"),
        };
        h.append(&entry("orders", State::Legacy, State::Shadow))
            .expect("append");
        h.append(&entry("users", State::Legacy, State::New))
            .expect("append");
        h.append(&entry("orders", State::Shadow, canary))
            .expect("append");
        let all = h.read().expect("read");
        assert_eq!(
            all.iter().map(|e| e.number).collect::<Vec<_>>(),
            vec![1, 2, 3]
        );
        let orders = h.for_route("orders").expect("read");
        assert_eq!(orders.len(), 2);
        assert_eq!(orders[1].number, 3);
        assert_eq!(h.last_state("orders").expect("read"), Some(canary));
    }

    #[test]
    fn a_corrupt_line_is_reported_with_its_number() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("h.jsonl");
        std::fs::write(&path, "{not json}\n").expect("write");
        let err = History::new(&path).read().expect_err("corrupt");
        assert!(err.to_string().contains("line 1"), "{err}");
    }

    #[test]
    fn a_second_rollout_lease_on_a_route_is_refused_and_named_until_the_first_is_dropped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let history = History::new(&dir.path().join("h.jsonl"));
        let first = history
            .lease("orders", "alice (pid 1)")
            .expect("first lease");
        match history.lease("orders", "bob (pid 2)") {
            Err(LeaseError::Held { holder, .. }) => assert_eq!(holder, "alice (pid 1)"),
            other => panic!("expected Held, got {other:?}"),
        }
        let _other_route = history
            .lease("payments", "bob (pid 2)")
            .expect("another route");
        drop(first);
        let _again = history
            .lease("orders", "bob (pid 2)")
            .expect("after the first ended");
    }
}
