//! The history as a PostgreSQL table shared by every operator, CI job, rollout
//! controller and CDC process of a fleet (`[control] history = "postgres://…"`).
//!
//! - `strangler_route_history (id bigserial, route, entry jsonb, recorded_at)`: one
//!   row per change, numbered on read by `id` order, the way the file numbers its
//!   lines. Every write takes one transaction-scoped advisory lock first, so rows
//!   commit in `id` order and a reader never sees a later number before an earlier.
//! - `strangler_route_leases (route, holder, since)`: who holds a route's rollout
//!   lease, for the refusal message; the lease itself is a session advisory lock on
//!   its own connection, released by the server when that connection ends (the
//!   controller exits, is killed, or its host disappears and TCP gives up).
//! - Move locks are session advisory locks too, waited for under `lock_timeout`.
//!
//! Tables are created on first use (under an advisory lock, so two first users do
//! not race on `CREATE TABLE IF NOT EXISTS`).

use std::time::Duration;

use tokio::sync::Mutex;
use tokio_postgres::{Client, NoTls};

use super::{Entry, HistoryError, Hold, Lease, LeaseError};

const SCHEMA: &str = "
    SELECT pg_advisory_xact_lock(hashtext('strangler.history.schema'), 0);
    CREATE TABLE IF NOT EXISTS strangler_route_history (
        id bigserial PRIMARY KEY,
        route text NOT NULL,
        entry jsonb NOT NULL,
        recorded_at timestamptz NOT NULL DEFAULT now()
    );
    CREATE INDEX IF NOT EXISTS strangler_route_history_route
        ON strangler_route_history (route, id);
    CREATE TABLE IF NOT EXISTS strangler_route_leases (
        route text PRIMARY KEY,
        holder text NOT NULL,
        since timestamptz NOT NULL DEFAULT now()
    );";

/// Serializes writers: held for the length of a writing transaction.
const WRITE_LOCK: &str = "SELECT pg_advisory_xact_lock(hashtext('strangler.history'), 0)";

/// The database, and one connection reused by this process's reads and writes.
#[derive(Debug)]
pub(super) struct PgHistory {
    url: String,
    shown: String,
    client: Mutex<Option<Client>>,
    /// Whether this process already made sure the tables exist: once is enough,
    /// later connections (reconnects, move locks, leases) skip it.
    schema_ready: std::sync::atomic::AtomicBool,
}

impl PgHistory {
    pub(super) fn new(url: &str) -> Self {
        Self {
            url: url.to_string(),
            shown: without_password(url),
            client: Mutex::new(None),
            schema_ready: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// The URL without its password.
    pub(super) fn shown(&self) -> &str {
        &self.shown
    }

    fn error(&self, e: &tokio_postgres::Error) -> HistoryError {
        HistoryError::Postgres {
            url: self.shown.clone(),
            message: message(e),
        }
    }

    /// A new connection with the tables in place; the connection's task ends when
    /// the client is dropped (closing the session and its advisory locks).
    async fn connect(&self) -> Result<Client, HistoryError> {
        let (mut client, connection) = tokio_postgres::connect(&self.url, NoTls)
            .await
            .map_err(|e| self.error(&e))?;
        tokio::spawn(async move {
            // Its error surfaces as the client's next call failing.
            let _ = connection.await;
        });
        if !self.schema_ready.load(std::sync::atomic::Ordering::Acquire) {
            let tx = client.transaction().await.map_err(|e| self.error(&e))?;
            tx.batch_execute(SCHEMA).await.map_err(|e| self.error(&e))?;
            tx.commit().await.map_err(|e| self.error(&e))?;
            self.schema_ready
                .store(true, std::sync::atomic::Ordering::Release);
        }
        Ok(client)
    }

    /// Runs `f` on the shared connection, opening it (again) when there is none or
    /// it closed: a database restart between two commands of a long-running process
    /// (a rollout, a CDC stream) costs one reconnect, not an error.
    async fn with_client<T>(
        &self,
        f: impl AsyncFnOnce(&mut Client) -> Result<T, HistoryError>,
    ) -> Result<T, HistoryError> {
        let mut slot = self.client.lock().await;
        if slot.as_ref().is_none_or(Client::is_closed) {
            *slot = Some(self.connect().await?);
        }
        let Some(client) = slot.as_mut() else {
            unreachable!("connected above")
        };
        let result = f(client).await;
        if client.is_closed() {
            *slot = None;
        }
        result
    }

    fn parse(&self, number: i64, text: &str) -> Result<Entry, HistoryError> {
        let mut entry: Entry =
            serde_json::from_str(text).map_err(|source| HistoryError::Corrupt {
                place: format!("{} table strangler_route_history", self.shown),
                at: format!("entry {number}"),
                source,
            })?;
        entry.number = usize::try_from(number).unwrap_or(0);
        Ok(entry)
    }

    fn json(&self, entry: &Entry) -> Result<String, HistoryError> {
        serde_json::to_string(entry).map_err(|source| HistoryError::Corrupt {
            place: self.shown.clone(),
            at: "writing".into(),
            source,
        })
    }

    pub(super) async fn read(&self) -> Result<Vec<Entry>, HistoryError> {
        self.with_client(async |c| {
            let rows = c
                .query(
                    "SELECT row_number() OVER (ORDER BY id), entry::text
                       FROM strangler_route_history ORDER BY id",
                    &[],
                )
                .await
                .map_err(|e| self.error(&e))?;
            self.entries(&rows)
        })
        .await
    }

    pub(super) async fn for_route(&self, route: &str) -> Result<Vec<Entry>, HistoryError> {
        self.with_client(async |c| {
            let rows = c
                .query(FOR_ROUTE, &[&route])
                .await
                .map_err(|e| self.error(&e))?;
            self.entries(&rows)
        })
        .await
    }

    fn entries(&self, rows: &[tokio_postgres::Row]) -> Result<Vec<Entry>, HistoryError> {
        rows.iter()
            .map(|r| self.parse(r.get(0), r.get(1)))
            .collect()
    }

    pub(super) async fn append(&self, entry: &Entry) -> Result<(), HistoryError> {
        self.append_if(entry, |_| true).await.map(|_| ())
    }

    /// One transaction: the write lock, the route's entries, `decide`, the insert.
    pub(super) async fn append_if(
        &self,
        entry: &Entry,
        decide: impl FnOnce(&[Entry]) -> bool,
    ) -> Result<(bool, Vec<Entry>), HistoryError> {
        let json = self.json(entry)?;
        let route = entry.route.as_str();
        self.with_client(async |client| {
            let pg = |e: tokio_postgres::Error| self.error(&e);
            let tx = client.transaction().await.map_err(pg)?;
            tx.execute(WRITE_LOCK, &[]).await.map_err(pg)?;
            let entries = self.entries(&tx.query(FOR_ROUTE, &[&route]).await.map_err(pg)?)?;
            if !decide(&entries) {
                // Dropped, the transaction rolls back and frees the lock.
                return Ok((false, entries));
            }
            tx.execute(
                "INSERT INTO strangler_route_history (route, entry) VALUES ($1, $2::text::jsonb)",
                &[&route, &json],
            )
            .await
            .map_err(pg)?;
            tx.commit().await.map_err(pg)?;
            Ok((true, entries))
        })
        .await
    }

    pub(super) async fn move_lock(
        &self,
        route: &str,
        wait: Duration,
    ) -> Result<Option<Lease>, HistoryError> {
        let client = self.connect().await?;
        let ms = wait.as_millis().clamp(1, i32::MAX as u128);
        client
            .batch_execute(&format!("SET lock_timeout = {ms}"))
            .await
            .map_err(|e| self.error(&e))?;
        match client
            .execute(
                "SELECT pg_advisory_lock(hashtext('strangler.move'), hashtext($1))",
                &[&route],
            )
            .await
        {
            Ok(_) => Ok(Some(Lease(Hold::Postgres(client)))),
            Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::LOCK_NOT_AVAILABLE) => {
                Ok(None)
            }
            Err(e) => Err(self.error(&e)),
        }
    }

    pub(super) async fn lease(&self, route: &str, holder: &str) -> Result<Lease, LeaseError> {
        let client = self.connect().await?;
        let taken: bool = client
            .query_one(
                "SELECT pg_try_advisory_lock(hashtext('strangler.rollout'), hashtext($1))",
                &[&route],
            )
            .await
            .map_err(|e| self.error(&e))?
            .get(0);
        if taken {
            client
                .execute(
                    "INSERT INTO strangler_route_leases (route, holder, since) VALUES ($1, $2, now())
                     ON CONFLICT (route) DO UPDATE SET holder = EXCLUDED.holder, since = EXCLUDED.since",
                    &[&route, &holder],
                )
                .await
                .map_err(|e| self.error(&e))?;
            return Ok(Lease(Hold::Postgres(client)));
        }
        let holder: Option<String> = client
            .query_opt(
                "SELECT holder FROM strangler_route_leases WHERE route = $1",
                &[&route],
            )
            .await
            .map_err(|e| self.error(&e))?
            .map(|r| r.get(0));
        Err(LeaseError::held(route, holder.as_deref().unwrap_or("")))
    }
}

/// A route's entries, numbered among all routes'.
const FOR_ROUTE: &str = "
    SELECT n, entry FROM (
        SELECT row_number() OVER (ORDER BY id) AS n, route, entry::text AS entry
          FROM strangler_route_history
    ) numbered WHERE route = $1 ORDER BY n";

/// What the server said (the database's own message when it sent one).
fn message(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{}: {}", db.severity(), db.message()),
        None => match std::error::Error::source(e) {
            Some(source) => format!("{e}: {source}"),
            None => e.to_string(),
        },
    }
}

/// `postgres://user:secret@host/db` as `postgres://user:***@host/db`, for messages.
pub(super) fn without_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{scheme}://{user}:***@{host}{tail}"),
            None => url.to_string(),
        },
        None => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::without_password;

    #[test]
    fn passwords_are_not_shown_in_messages() {
        assert_eq!(
            without_password("postgres://ops:s3cr%40t@db.shop:5432/strangler?sslmode=disable"),
            "postgres://ops:***@db.shop:5432/strangler?sslmode=disable"
        );
        assert_eq!(
            without_password("postgres://ops@db/x"),
            "postgres://ops@db/x"
        );
        assert_eq!(
            without_password("postgresql://127.0.0.1/x"),
            "postgresql://127.0.0.1/x"
        );
    }
}
