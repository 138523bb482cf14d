//! A throwaway MariaDB server with the binary log on (ROW format, GTIDs) for CDC tests.

use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use mysql_async::prelude::Queryable;
use nix::sys::signal::Signal;
use nix::unistd::Uid;
use tempfile::TempDir;

use crate::error::{Result, client_err, io_err};
use crate::port::{PortLease, free_port};
use crate::process::{ServerProcess, find_binary, run_setup};

const SERVER: &str = "mariadb";
const INSTALL: &str = "sudo apt-get install mariadb-server";
const READY_DEADLINE: Duration = Duration::from_secs(60);
/// The account tests use: all privileges, including REPLICATION SLAVE for binlog reading.
pub const USER: &str = "strangler";
/// Its password.
pub const PASSWORD: &str = "strangler";

static DATABASE_COUNTER: AtomicU32 = AtomicU32::new(0);

/// A MariaDB server of its own for a test, binlog in ROW format with full row images
/// and GTIDs, server id 1. Stopped and removed on drop.
#[derive(Debug)]
pub struct MariaDb {
    process: Option<ServerProcess>,
    port: PortLease,
    dir: TempDir,
}

impl MariaDb {
    /// Installs a fresh data directory and starts the server.
    pub async fn start() -> Result<Self> {
        let install_db = find_binary(
            &[
                "/usr/bin/mariadb-install-db",
                "mariadb-install-db",
                "mysql_install_db",
            ],
            INSTALL,
        )?;
        let dir = tempfile::Builder::new()
            .prefix("strangler-mariadb-")
            .tempdir()
            .map_err(io_err("creating a temp dir"))?;
        for sub in ["data", "tmp", "binlog"] {
            std::fs::create_dir_all(dir.path().join(sub))
                .map_err(io_err(format!("creating {sub} dir")))?;
        }
        let mut cmd = tokio::process::Command::new(install_db);
        // The bootstrap server's temporary tables go to TMPDIR (default /tmp), named
        // by its thread ids: two installs at once (tests in parallel) can remove each
        // other's files and fail. Each gets its own.
        cmd.env("TMPDIR", dir.path().join("tmp"));
        cmd.arg("--no-defaults")
            .arg(format!("--datadir={}", dir.path().join("data").display()))
            .args([
                "--auth-root-authentication-method=normal",
                "--skip-test-db",
                "--skip-name-resolve",
            ]);
        if Uid::effective().is_root() {
            cmd.arg("--user=root");
        }
        run_setup(cmd).await?;
        let init = dir.path().join("init.sql");
        std::fs::write(
            &init,
            format!(
                "CREATE USER IF NOT EXISTS '{USER}'@'%' IDENTIFIED BY '{PASSWORD}';\n\
                 GRANT ALL PRIVILEGES ON *.* TO '{USER}'@'%' WITH GRANT OPTION;\n"
            ),
        )
        .map_err(io_err("writing init.sql"))?;
        let mut db = Self {
            process: None,
            port: free_port()?,
            dir,
        };
        db.start_server().await?;
        Ok(db)
    }

    async fn start_server(&mut self) -> Result<()> {
        let mariadbd = find_binary(
            &["/usr/sbin/mariadbd", "mariadbd", "/usr/sbin/mysqld"],
            INSTALL,
        )?;
        let root = self.dir.path();
        let mut cmd = Command::new(mariadbd);
        cmd.arg("--no-defaults")
            .arg(format!("--datadir={}", root.join("data").display()))
            .arg(format!("--socket={}", root.join("mysqld.sock").display()))
            .arg(format!("--pid-file={}", root.join("mysqld.pid").display()))
            .arg(format!("--tmpdir={}", root.join("tmp").display()))
            .arg(format!(
                "--log-bin={}",
                root.join("binlog/mariadb-bin").display()
            ))
            .arg(format!("--init-file={}", root.join("init.sql").display()))
            .arg(format!("--port={}", self.port.port()))
            .args([
                "--bind-address=127.0.0.1",
                "--skip-name-resolve",
                "--server-id=1",
                "--binlog-format=ROW",
                "--binlog-row-image=FULL",
                "--log-slave-updates=ON",
                "--gtid-strict-mode=ON",
                "--innodb-buffer-pool-size=64M",
                "--innodb-log-file-size=32M",
                // Durability is not under test; start and commit speed is.
                "--innodb-flush-log-at-trx-commit=2",
                "--sync-binlog=0",
                "--character-set-server=utf8mb4",
                "--collation-server=utf8mb4_unicode_ci",
            ]);
        if Uid::effective().is_root() {
            cmd.arg("--user=root");
        }
        let log_path = root.join("mariadb.log");
        let mut process = ServerProcess::spawn(SERVER, cmd, &log_path, Signal::SIGTERM)?;
        let url = self.url("mysql");
        process
            .wait_ready(READY_DEADLINE, || {
                let url = url.clone();
                async move {
                    match mysql_async::Opts::from_url(&url) {
                        Ok(opts) => match mysql_async::Conn::new(opts).await {
                            Ok(conn) => {
                                let _ = conn.disconnect().await;
                                true
                            }
                            Err(_) => false,
                        },
                        Err(_) => false,
                    }
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

    /// A `mysql://` URL for `database` as the test user.
    pub fn url(&self, database: &str) -> String {
        format!(
            "mysql://{USER}:{PASSWORD}@127.0.0.1:{}/{database}",
            self.port()
        )
    }

    /// Opens a connection to `database`.
    pub async fn connect(&self, database: &str) -> Result<mysql_async::Conn> {
        let opts = mysql_async::Opts::from_url(&self.url(database))
            .map_err(client_err(SERVER, "parsing the URL"))?;
        mysql_async::Conn::new(opts)
            .await
            .map_err(client_err(SERVER, format!("connecting to {database}")))
    }

    /// Creates a database with a name no other call in this process returns, and gives the name.
    pub async fn fresh_database(&self, prefix: &str) -> Result<String> {
        let n = DATABASE_COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!("{prefix}_{n}");
        let mut conn = self.connect("mysql").await?;
        conn.query_drop(format!("CREATE DATABASE `{}`", name.replace('`', "``")))
            .await
            .map_err(client_err(SERVER, format!("creating database {name}")))?;
        let _ = conn.disconnect().await;
        Ok(name)
    }

    /// Stops the server cleanly; [`MariaDb::restart`] brings it back.
    pub fn stop(&mut self) {
        if let Some(mut process) = self.process.take() {
            process.stop();
        }
    }

    /// Starts the server again on the same port and data directory.
    pub async fn restart(&mut self) -> Result<()> {
        self.stop();
        self.start_server().await
    }
}

impl Drop for MariaDb {
    fn drop(&mut self) {
        self.stop();
    }
}
