use std::path::PathBuf;
use std::time::Duration;

/// Everything that can go wrong while starting or driving a test server.
///
/// Each variant says which server and, where it helps, carries the tail of the
/// server's own log so a failing test shows why without digging in temp dirs.
#[derive(Debug, thiserror::Error)]
pub enum TestkitError {
    /// A binary the server needs is not installed.
    #[error("{binary} not found; install it with `{install}` (or run scripts/install-deps.sh)")]
    MissingBinary {
        /// The path or name that was looked for.
        binary: String,
        /// The command that installs it.
        install: String,
    },
    /// The server process did not answer its readiness probe before the deadline.
    #[error("{server} was not ready after {waited:?}; last lines of its log ({log_path}):\n{log}")]
    NotReady {
        /// Which server.
        server: &'static str,
        /// How long we waited.
        waited: Duration,
        /// Where the full log is (removed when the server handle drops).
        log_path: PathBuf,
        /// The tail of the server log.
        log: String,
    },
    /// The server process exited while it should have been running.
    #[error("{server} exited ({status}); last lines of its log ({log_path}):\n{log}")]
    Exited {
        /// Which server.
        server: &'static str,
        /// Its exit status.
        status: String,
        /// Where the full log is.
        log_path: PathBuf,
        /// The tail of the server log.
        log: String,
    },
    /// A setup command (initdb, mariadb-install-db, …) failed.
    #[error("{command} failed ({status}):\n{output}")]
    SetupCommand {
        /// The command line that failed.
        command: String,
        /// Its exit status.
        status: String,
        /// What it printed.
        output: String,
    },
    /// A file-system or process operation failed.
    #[error("{context}")]
    Io {
        /// What we were doing.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A client call against a running test server failed.
    #[error("{server}: {context}")]
    Client {
        /// Which server.
        server: &'static str,
        /// What we were doing.
        context: String,
        /// The underlying error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// Result alias for testkit operations.
pub type Result<T, E = TestkitError> = std::result::Result<T, E>;

pub(crate) fn io_err(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> TestkitError {
    let context = context.into();
    move |source| TestkitError::Io { context, source }
}

pub(crate) fn client_err<E>(
    server: &'static str,
    context: impl Into<String>,
) -> impl FnOnce(E) -> TestkitError
where
    E: std::error::Error + Send + Sync + 'static,
{
    let context = context.into();
    move |source| TestkitError::Client {
        server,
        context,
        source: Box::new(source),
    }
}
