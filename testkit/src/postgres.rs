//! A throwaway PostgreSQL 15 server configured for logical replication.

use std::os::unix::fs::chown;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use nix::sys::signal::Signal;
use nix::unistd::{Uid, User};
use tempfile::TempDir;

use crate::error::{Result, TestkitError, client_err, io_err};
use crate::port::{PortLease, free_port};
use crate::process::{ServerProcess, find_binary, run_setup};

const SERVER: &str = "postgresql";
const INSTALL: &str = "sudo apt-get install postgresql-15";
const BIN_DIR: &str = "/usr/lib/postgresql/15/bin";
/// initdb, recovery after a crash and the first checkpoint fit well inside this on a busy 2-core machine.
const READY_DEADLINE: Duration = Duration::from_secs(60);
/// The superuser initdb creates; tests connect as it with trust auth on loopback only.
pub const SUPERUSER: &str = "postgres";

/// A PostgreSQL server of its own for a test: its own data directory, its own port,
/// `wal_level=logical` with room for 20 slots and senders. Stopped and removed on drop.
#[derive(Debug)]
pub struct Postgres {
    process: Option<ServerProcess>,
    port: PortLease,
    dir: TempDir,
    run_as: Option<(u32, u32)>,
}

static DATABASE_COUNTER: AtomicU32 = AtomicU32::new(0);

impl Postgres {
    /// Initialises a cluster in a temporary directory and starts it.
    pub async fn start() -> Result<Self> {
        let initdb = find_binary(&[&format!("{BIN_DIR}/initdb"), "initdb"], INSTALL)?;
        let dir = tempfile::Builder::new()
            .prefix("strangler-pg-")
            .tempdir()
            .map_err(io_err("creating a temp dir"))?;
        // PostgreSQL refuses to run as root; when we are root, run it as the
        // `postgres` user the Debian package creates.
        let run_as = if Uid::effective().is_root() {
            let user = User::from_name(SUPERUSER).ok().flatten().ok_or_else(|| {
                TestkitError::MissingBinary {
                    binary: "OS user `postgres` (PostgreSQL will not run as root)".into(),
                    install: INSTALL.into(),
                }
            })?;
            let ids = (user.uid.as_raw(), user.gid.as_raw());
            chown(dir.path(), Some(ids.0), Some(ids.1))
                .map_err(io_err("handing the temp dir to the postgres user"))?;
            Some(ids)
        } else {
            None
        };
        let mut cmd = tokio::process::Command::new(&initdb);
        cmd.arg("-D").arg(data_dir(dir.path())).args([
            "-U",
            SUPERUSER,
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--locale=C",
            "-N",
        ]);
        if let Some((uid, gid)) = run_as {
            cmd.uid(uid).gid(gid);
        }
        run_setup(cmd).await?;
        let mut pg = Self {
            process: None,
            port: free_port()?,
            dir,
            run_as,
        };
        pg.start_server().await?;
        Ok(pg)
    }

    async fn start_server(&mut self) -> Result<()> {
        let postgres = find_binary(&[&format!("{BIN_DIR}/postgres"), "postgres"], INSTALL)?;
        let mut cmd = Command::new(postgres);
        let port = self.port.port().to_string();
        cmd.arg("-D").arg(data_dir(self.dir.path()));
        cmd.args(["-p", &port, "-k"]).arg(self.dir.path());
        for setting in [
            "listen_addresses=127.0.0.1",
            "wal_level=logical",
            "max_replication_slots=20",
            "max_wal_senders=20",
            "max_connections=200",
            // Durability is not what these tests measure; speed of start and commit is.
            "fsync=off",
            "synchronous_commit=off",
            "full_page_writes=off",
            "shared_buffers=32MB",
            "logging_collector=off",
            "log_min_messages=warning",
        ] {
            cmd.args(["-c", setting]);
        }
        if let Some((uid, gid)) = self.run_as {
            cmd.uid(uid).gid(gid);
        }
        let log_path = self.dir.path().join("postgres.log");
        let mut process = ServerProcess::spawn(SERVER, cmd, &log_path, Signal::SIGINT)?
            .escalate_with(Signal::SIGQUIT);
        let conninfo = self.conninfo("postgres");
        process
            .wait_ready(READY_DEADLINE, || {
                let conninfo = conninfo.clone();
                async move {
                    tokio_postgres::connect(&conninfo, tokio_postgres::NoTls)
                        .await
                        .is_ok()
                }
            })
            .await?;
        self.process = Some(process);
        Ok(())
    }

    /// The TCP port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port.port()
    }

    /// A libpq key/value connection string for `database`.
    pub fn conninfo(&self, database: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user={SUPERUSER} dbname={database}",
            self.port()
        )
    }

    /// A `postgres://` URL for `database`.
    pub fn url(&self, database: &str) -> String {
        format!(
            "postgres://{SUPERUSER}@127.0.0.1:{}/{database}",
            self.port()
        )
    }

    /// Connects to `database`, driving the connection on a background task.
    pub async fn connect(&self, database: &str) -> Result<tokio_postgres::Client> {
        let (client, connection) =
            tokio_postgres::connect(&self.conninfo(database), tokio_postgres::NoTls)
                .await
                .map_err(client_err(SERVER, format!("connecting to {database}")))?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!("test postgres connection ended: {e}");
            }
        });
        Ok(client)
    }

    /// Creates a database named `name`.
    pub async fn create_database(&self, name: &str) -> Result<()> {
        let client = self.connect("postgres").await?;
        client
            .batch_execute(&format!(
                "CREATE DATABASE \"{}\"",
                name.replace('"', "\"\"")
            ))
            .await
            .map_err(client_err(SERVER, format!("creating database {name}")))?;
        Ok(())
    }

    /// Creates a database with a name no other call in this process returns, and gives the name.
    pub async fn fresh_database(&self, prefix: &str) -> Result<String> {
        let n = DATABASE_COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!("{prefix}_{n}");
        self.create_database(&name).await?;
        Ok(name)
    }

    /// The postmaster's OS process id, while it runs (its backends are its children).
    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().and_then(ServerProcess::pid)
    }

    /// Stops the server cleanly (fast shutdown); [`Postgres::restart`] brings it back.
    pub fn stop(&mut self) {
        if let Some(mut process) = self.process.take() {
            process.stop();
        }
    }

    /// Kills the server with no shutdown, as a crash would.
    pub fn crash(&mut self) {
        if let Some(mut process) = self.process.take() {
            process.kill();
        }
    }

    /// Starts the server again on the same port and data directory.
    pub async fn restart(&mut self) -> Result<()> {
        self.stop();
        self.start_server().await
    }

    /// The server's log file.
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("postgres.log")
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.stop();
    }
}

fn data_dir(root: &Path) -> PathBuf {
    root.join("data")
}
