//! The route history: every lifecycle change, numbered from 1 in the order it was
//! recorded. The CLI writes it and reads it back, the rollout controller leases
//! routes through it, and CDC's `owner` conflict policy reads it — all through
//! [`History`], whichever store holds it:
//!
//! - a JSON-lines file next to the config (the default, for one operator), or
//! - a PostgreSQL table shared by a fleet's operators, CI jobs and CDC processes
//!   (`[control] history = "postgres://…"`), so `history` and `restore --to N` mean
//!   the same on every machine.
//!
//! Two stores behind one type rather than a trait object: `append_if` takes a
//! closure, and there is nothing a third store would need that these two lack.

mod file;
mod postgres;

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::lifecycle::State;

/// Where a history is kept, as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// A JSON-lines file.
    File(PathBuf),
    /// A PostgreSQL database (its URL), tables created on first use.
    Postgres(String),
}

impl Location {
    /// `postgres://…`/`postgresql://…` is a database; anything else a file path,
    /// relative to `base` (the config's directory).
    pub fn parse(text: &str, base: &Path) -> Result<Self, crate::Invalid> {
        let text = text.trim();
        if text.starts_with("postgres://") || text.starts_with("postgresql://") {
            text.parse::<tokio_postgres::Config>().map_err(|e| {
                crate::Invalid(format!(
                    "history {}: not a PostgreSQL URL: {e}",
                    postgres::without_password(text)
                ))
            })?;
            return Ok(Self::Postgres(text.to_string()));
        }
        if text.is_empty() {
            return Err("history: empty (a file path or a postgres:// URL)".into());
        }
        if text.contains("://") {
            return Err(crate::Invalid(format!(
                "history {text:?}: only files and postgres:// URLs are supported"
            )));
        }
        Ok(Self::File(base.join(text)))
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::File(path) => write!(f, "{}", path.display()),
            Self::Postgres(url) => f.write_str(&postgres::without_password(url)),
        }
    }
}

/// A hold on a route — a rollout controller's lease ([`History::lease`]) or a
/// forward move's lock ([`History::move_lock`]) — released when dropped or when the
/// process ends, whatever way (the OS drops the file lock, the database the
/// session's advisory lock), so a crashed holder never leaves a stale one.
#[derive(Debug)]
pub struct Lease(Hold);

#[derive(Debug)]
enum Hold {
    File(#[allow(dead_code, reason = "held for its lock")] std::fs::File),
    Postgres(tokio_postgres::Client),
}

impl Lease {
    /// Whether the hold is gone without having been dropped: the database session
    /// that held it ended (a restart, a network cut), so another may take it now.
    pub fn lost(&self) -> bool {
        match &self.0 {
            Hold::File(_) => false,
            Hold::Postgres(client) => client.is_closed(),
        }
    }
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
    /// The lease could not be taken or looked up.
    #[error(transparent)]
    History(#[from] HistoryError),
}

impl LeaseError {
    fn held(route: &str, holder: &str) -> Self {
        Self::Held {
            route: route.to_string(),
            holder: if holder.is_empty() {
                "(starting)".to_string()
            } else {
                holder.to_string()
            },
        }
    }
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
    /// The database could not be reached, or refused a statement.
    #[error("route history {url}: {message}")]
    Postgres {
        /// The database URL, without its password.
        url: String,
        /// What the server (or the connection) said.
        message: String,
    },
    /// An entry is not one (written by something else, or cut short).
    #[error("route history {place}: {at}: {source}")]
    Corrupt {
        /// The file or table.
        place: String,
        /// `line N` (file) or `entry N` (table).
        at: String,
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

/// The route history, in whichever store it is kept.
#[derive(Debug)]
pub struct History {
    store: Store,
}

#[derive(Debug)]
enum Store {
    File(file::FileHistory),
    Postgres(Box<postgres::PgHistory>),
}

impl History {
    /// The history kept at `location`; nothing is opened until it is used.
    pub fn new(location: &Location) -> Self {
        Self {
            store: match location {
                Location::File(path) => Store::File(file::FileHistory::new(path)),
                Location::Postgres(url) => Store::Postgres(Box::new(postgres::PgHistory::new(url))),
            },
        }
    }

    /// The history in the JSON-lines file at `path`.
    pub fn file(path: &Path) -> Self {
        Self::new(&Location::File(path.to_path_buf()))
    }

    /// Where it is kept, for messages (a database URL without its password).
    pub fn describe(&self) -> String {
        match &self.store {
            Store::File(f) => f.path().display().to_string(),
            Store::Postgres(p) => p.shown().to_string(),
        }
    }

    /// Every entry, numbered.
    pub async fn read(&self) -> Result<Vec<Entry>, HistoryError> {
        match &self.store {
            Store::File(f) => f.read(),
            Store::Postgres(p) => p.read().await,
        }
    }

    /// Entries for one route (numbered among all routes').
    pub async fn for_route(&self, route: &str) -> Result<Vec<Entry>, HistoryError> {
        match &self.store {
            Store::File(f) => Ok(f.read()?.into_iter().filter(|e| e.route == route).collect()),
            Store::Postgres(p) => p.for_route(route).await,
        }
    }

    /// The route's last recorded state.
    pub async fn last_state(&self, route: &str) -> Result<Option<State>, HistoryError> {
        Ok(self.for_route(route).await?.last().map(|e| e.to))
    }

    /// Appends an entry, durably (the file: one `write` under a lock, then fsync;
    /// the table: one committed insert).
    pub async fn append(&self, entry: &Entry) -> Result<(), HistoryError> {
        match &self.store {
            Store::File(f) => f.append(entry),
            Store::Postgres(p) => p.append(entry).await,
        }
    }

    /// Under the history's write lock: reads `route`'s entries, asks `decide`
    /// whether to append `entry` after them, and appends it if so. Returns whether
    /// it did and the route's entries as read (without `entry`). Moves that must not
    /// miss each other (a forward move and a rollback) check and write in one step
    /// this way.
    pub async fn append_if(
        &self,
        entry: &Entry,
        decide: impl FnOnce(&[Entry]) -> bool,
    ) -> Result<(bool, Vec<Entry>), HistoryError> {
        match &self.store {
            Store::File(f) => f.append_if(entry, decide),
            Store::Postgres(p) => p.append_if(entry, decide).await,
        }
    }

    /// Takes `route`'s move lock, waiting at most `wait`: forward moves of one route
    /// run one at a time, across every machine sharing the history. `None`: another
    /// move held it all that time.
    pub async fn move_lock(
        &self,
        route: &str,
        wait: Duration,
    ) -> Result<Option<Lease>, HistoryError> {
        match &self.store {
            Store::File(f) => f.move_lock(route, wait).await,
            Store::Postgres(p) => p.move_lock(route, wait).await,
        }
    }

    /// Takes the rollout lease of `route` for `holder` (who, where, since when),
    /// held until the [`Lease`] is dropped or the process ends. A second controller
    /// for the route — on this machine or, with a shared history, any other — is
    /// refused and told who holds it.
    pub async fn lease(&self, route: &str, holder: &str) -> Result<Lease, LeaseError> {
        match &self.store {
            Store::File(f) => f.lease(route, holder),
            Store::Postgres(p) => p.lease(route, holder).await,
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

    #[tokio::test]
    async fn entries_are_numbered_in_order_and_filtered_by_route() {
        let dir = tempfile::tempdir().expect("tempdir");
        let h = History::file(&dir.path().join("h.jsonl"));
        assert_eq!(h.last_state("orders").await.expect("read"), None);
        let canary = State::Canary {
            percent: Percent::try_from(10).expect("pct"),
        };
        h.append(&entry("orders", State::Legacy, State::Shadow))
            .await
            .expect("append");
        h.append(&entry("users", State::Legacy, State::New))
            .await
            .expect("append");
        h.append(&entry("orders", State::Shadow, canary))
            .await
            .expect("append");
        let all = h.read().await.expect("read");
        assert_eq!(
            all.iter().map(|e| e.number).collect::<Vec<_>>(),
            vec![1, 2, 3]
        );
        let orders = h.for_route("orders").await.expect("read");
        assert_eq!(orders.len(), 2);
        assert_eq!(orders[1].number, 3);
        assert_eq!(h.last_state("orders").await.expect("read"), Some(canary));
    }

    #[tokio::test]
    async fn a_corrupt_line_is_reported_with_its_number() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("h.jsonl");
        std::fs::write(&path, "{not json}\n").expect("write");
        let err = History::file(&path).read().await.expect_err("corrupt");
        assert!(err.to_string().contains("line 1"), "{err}");
    }

    #[tokio::test]
    async fn a_second_rollout_lease_on_a_route_is_refused_and_named_until_the_first_is_dropped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let history = History::file(&dir.path().join("h.jsonl"));
        let first = history
            .lease("orders", "alice (pid 1)")
            .await
            .expect("first lease");
        match history.lease("orders", "bob (pid 2)").await {
            Err(LeaseError::Held { holder, .. }) => assert_eq!(holder, "alice (pid 1)"),
            other => panic!("expected Held, got {other:?}"),
        }
        let _other_route = history
            .lease("payments", "bob (pid 2)")
            .await
            .expect("another route");
        drop(first);
        let _again = history
            .lease("orders", "bob (pid 2)")
            .await
            .expect("after the first ended");
    }
}
