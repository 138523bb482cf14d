//! Why CDC stops, by kind. Each error knows whether it is transient (a lost
//! connection: the run reconnects and resumes from the target's checkpoint) or
//! not (a problem with the data or the setup: the run stops and says why).

use pg_walstream::ReplicationError;

use crate::model::Lsn;

/// Why CDC stopped.
#[derive(Debug, thiserror::Error)]
pub enum CdcError {
    /// A database could not be reached.
    #[error("cannot connect to the {side} database: {source}")]
    Connect {
        /// "source" or "target".
        side: &'static str,
        /// Why.
        #[source]
        source: tokio_postgres::Error,
    },
    /// A mapping does not fit the schemas.
    #[error(transparent)]
    Check(#[from] CheckError),
    /// A query on the source failed.
    #[error("source: {0}")]
    Source(#[source] tokio_postgres::Error),
    /// The replication stream failed.
    #[error("replication: {0}")]
    Replication(#[from] ReplicationError),
    /// Applying to the target failed; the stream stops there.
    #[error(transparent)]
    Apply(#[from] ApplyError),
    /// The snapshot copy of a table failed.
    #[error("snapshot of {table}: {message}")]
    Snapshot {
        /// The target table.
        table: String,
        /// Why.
        message: String,
    },
    /// The Prometheus endpoint could not listen.
    #[error("cannot serve metrics on {addr}: {source}")]
    Metrics {
        /// `[observe] metrics_listen`.
        addr: std::net::SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Creating the slot exported no snapshot to copy in.
    #[error("the source exported no snapshot with the new slot")]
    NoExportedSnapshot,
    /// The task applying batches ended without saying why, or panicked.
    #[error("the applier stopped: {0}")]
    ApplierStopped(String),
    /// Setting the target's keys, indexes and foreign keys aside, or building them back.
    #[error("snapshot keys and indexes: {what}: {message}")]
    Deferred {
        /// The step.
        what: String,
        /// The database's message.
        message: String,
    },
    /// `cdc verify` waited for the stream to reach the source's position in vain.
    #[error(
        "the target has applied up to {applied} but the source is at {goal}; is `strangler cdc run` running?"
    )]
    NotCaughtUp {
        /// The target's checkpoint ("nothing" without one).
        applied: String,
        /// The source's position when verify started.
        goal: Lsn,
    },
    /// A MySQL/MariaDB source or target failed.
    #[error("{message}")]
    MySql {
        /// What happened.
        message: String,
        /// Only the connection was lost (retried with backoff).
        transient: bool,
    },
    /// The command does not support this kind of source yet.
    #[error("{0}")]
    Unsupported(String),
    /// The slot is gone while the target says streaming had started: changes since
    /// the checkpoint are lost, so continuing would leave the target silently behind.
    #[error(
        "replication slot {slot} no longer exists on the source, but the target was applied up to {lsn}: changes after that are lost. \
         Re-copy with `strangler cdc run --resnapshot` (truncates the mapped target tables and copies them again)"
    )]
    SlotLost {
        /// The slot.
        slot: String,
        /// Where the target was.
        lsn: Lsn,
    },
}

impl CdcError {
    /// A lost connection rather than a problem with the data or the setup.
    pub fn is_transient(&self) -> bool {
        fn pg(e: &tokio_postgres::Error) -> bool {
            e.is_closed()
                || e.as_db_error().is_some_and(|d| {
                    let code = d.code().code();
                    code.starts_with("08") || code.starts_with("57P")
                })
                || e.as_db_error().is_none()
        }
        match self {
            CdcError::Connect { .. } => true,
            CdcError::MySql { transient, .. } => *transient,
            CdcError::Source(e) => pg(e),
            CdcError::Replication(e) => matches!(
                e,
                ReplicationError::TransientConnection(_)
                    | ReplicationError::ReplicationConnection(_)
                    | ReplicationError::Io(_)
                    | ReplicationError::Timeout(_)
                    | ReplicationError::Protocol(_)
            ),
            CdcError::Apply(ApplyError::Checkpoint(e)) => pg(e),
            CdcError::Apply(ApplyError::Lost { .. }) => true,
            CdcError::Apply(ApplyError::Rejected { message, .. }) => {
                message.contains("connection closed") || message.contains("terminating connection")
            }
            _ => false,
        }
    }
}

/// Why a batch could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// The target refused a row or the connection failed.
    #[error("applying to {table}{key}: {message}")]
    Rejected {
        /// Target table.
        table: String,
        /// The row's source key when one row is to blame (`" (key id=7)"`).
        key: String,
        /// The database's message.
        message: String,
    },
    /// The target's connection went away mid-batch (nothing of the batch is kept:
    /// it is retried from the checkpoint).
    #[error("applying to {table}: lost the connection: {message}")]
    Lost {
        /// Target table.
        table: String,
        /// The driver's message.
        message: String,
    },
    /// A change cannot be applied safely.
    #[error("{0}")]
    Unsafe(String),
    /// A row changed on both sides and the mapping's policy is to stop.
    #[error(
        "conflict on {table} key {key}: changed on both sides; incoming {incoming}, target has {current}. \
         Resolve it by hand (or set the mapping's conflict policy), then start again"
    )]
    Conflict {
        /// Target table.
        table: String,
        /// The target key.
        key: String,
        /// The incoming version.
        incoming: String,
        /// The target's version.
        current: String,
    },
    /// The checkpoint could not be written or read.
    #[error("checkpoint: {0}")]
    Checkpoint(#[source] tokio_postgres::Error),
}

/// A mapping that does not fit the databases.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    /// A database could not be queried.
    #[error("{side}: {source}")]
    Db {
        /// "source" or "target".
        side: &'static str,
        /// The error.
        #[source]
        source: tokio_postgres::Error,
    },
    /// The mapping does not fit the schemas.
    #[error("mapping for {target}: {message}")]
    Schema {
        /// The target table.
        target: String,
        /// What does not fit.
        message: String,
    },
}
