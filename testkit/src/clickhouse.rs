//! A throwaway ClickHouse server (Debian's 18.16, or any newer one on PATH).

use std::process::Command;
use std::time::Duration;

use nix::sys::signal::Signal;
use tempfile::TempDir;

use crate::error::{Result, io_err};
use crate::port::{PortLease, free_port};
use crate::process::{ServerProcess, find_binary};

const SERVER: &str = "clickhouse";
const INSTALL: &str = "sudo apt-get install clickhouse-server";
const READY_DEADLINE: Duration = Duration::from_secs(60);

/// A ClickHouse server of its own for a test, HTTP and native ports on 127.0.0.1,
/// user `default` without a password. Stopped and removed on drop.
#[derive(Debug)]
pub struct ClickHouse {
    process: Option<ServerProcess>,
    binary: std::path::PathBuf,
    http_port: PortLease,
    tcp_port: PortLease,
    dir: TempDir,
}

impl ClickHouse {
    /// Writes a config for a temporary directory and starts the server.
    pub async fn start() -> Result<Self> {
        let binary = find_binary(
            &[
                "/usr/sbin/clickhouse-server",
                "clickhouse-server",
                "/usr/bin/clickhouse",
            ],
            INSTALL,
        )?;
        let dir = tempfile::Builder::new()
            .prefix("strangler-clickhouse-")
            .tempdir()
            .map_err(io_err("creating a temp dir"))?;
        let http_port = free_port()?;
        let tcp_port = free_port()?;
        let root = dir.path().display().to_string();
        // 18.16 reads `<yandex>`; current releases still accept it.
        let config = format!(
            r#"<?xml version="1.0"?>
<yandex>
    <logger>
        <level>warning</level>
        <console>1</console>
    </logger>
    <listen_host>127.0.0.1</listen_host>
    <http_port>{http}</http_port>
    <tcp_port>{tcp}</tcp_port>
    <path>{root}/data/</path>
    <tmp_path>{root}/tmp/</tmp_path>
    <user_files_path>{root}/user_files/</user_files_path>
    <format_schema_path>{root}/format_schemas/</format_schema_path>
    <users_config>{root}/users.xml</users_config>
    <default_profile>default</default_profile>
    <default_database>default</default_database>
    <mark_cache_size>268435456</mark_cache_size>
    <max_concurrent_queries>100</max_concurrent_queries>
    <timezone>UTC</timezone>
</yandex>
"#,
            http = http_port.port(),
            tcp = tcp_port.port(),
        );
        let users = r#"<?xml version="1.0"?>
<yandex>
    <profiles><default><max_memory_usage>4000000000</max_memory_usage></default></profiles>
    <users>
        <default>
            <password></password>
            <networks><ip>127.0.0.1</ip><ip>::1</ip></networks>
            <profile>default</profile>
            <quota>default</quota>
        </default>
    </users>
    <quotas><default><interval><duration>3600</duration><queries>0</queries><errors>0</errors><result_rows>0</result_rows><read_rows>0</read_rows><execution_time>0</execution_time></interval></default></quotas>
</yandex>
"#;
        std::fs::write(dir.path().join("config.xml"), config)
            .map_err(io_err("writing config.xml"))?;
        std::fs::write(dir.path().join("users.xml"), users).map_err(io_err("writing users.xml"))?;
        let mut ch = Self {
            process: None,
            binary,
            http_port,
            tcp_port,
            dir,
        };
        ch.start_server().await?;
        Ok(ch)
    }

    async fn start_server(&mut self) -> Result<()> {
        let mut cmd = Command::new(&self.binary);
        if cmd.get_program().to_string_lossy().ends_with("/clickhouse") {
            cmd.arg("server");
        }
        cmd.arg(format!(
            "--config-file={}/config.xml",
            self.dir.path().display()
        ));
        cmd.current_dir(self.dir.path());
        let log_path = self.dir.path().join("clickhouse.log");
        let mut process = ServerProcess::spawn(SERVER, cmd, &log_path, Signal::SIGTERM)?;
        let ping = format!("http://127.0.0.1:{}/ping", self.http_port.port());
        let http = reqwest::Client::new();
        process
            .wait_ready(READY_DEADLINE, || {
                let request = http.get(&ping).timeout(Duration::from_secs(2)).send();
                async move { matches!(request.await, Ok(r) if r.status().is_success()) }
            })
            .await?;
        self.process = Some(process);
        Ok(())
    }

    /// Starts the server again (same ports, same data) after [`ClickHouse::stop`].
    pub async fn restart(&mut self) -> Result<()> {
        self.stop();
        self.start_server().await
    }

    /// The HTTP interface's URL, what the `clickhouse` crate connects to.
    pub fn http_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.http_port.port())
    }

    /// The native protocol port.
    pub fn tcp_port(&self) -> u16 {
        self.tcp_port.port()
    }

    /// The directory holding data, config and log.
    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// Stops the server.
    pub fn stop(&mut self) {
        if let Some(mut process) = self.process.take() {
            process.stop();
        }
    }
}

impl Drop for ClickHouse {
    fn drop(&mut self) {
        self.stop();
    }
}
