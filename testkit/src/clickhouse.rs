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
        let mut ch = Self::prepare()?;
        ch.launch("").await?;
        Ok(ch)
    }

    /// A server not started yet: its binary, directory and ports.
    fn prepare() -> Result<Self> {
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
        Ok(Self {
            process: None,
            binary,
            http_port: free_port()?,
            tcp_port: free_port()?,
            dir,
        })
    }

    /// Writes the config (`extra`: more elements inside `<yandex>`) and starts.
    async fn launch(&mut self, extra: &str) -> Result<()> {
        let root = self.dir.path().display().to_string();
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
{extra}
</yandex>
"#,
            http = self.http_port.port(),
            tcp = self.tcp_port.port(),
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
        std::fs::write(self.dir.path().join("config.xml"), config)
            .map_err(io_err("writing config.xml"))?;
        std::fs::write(self.dir.path().join("users.xml"), users)
            .map_err(io_err("writing users.xml"))?;
        self.start_server().await
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

    /// The server's process id while it runs (to read its CPU time, say).
    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().and_then(ServerProcess::pid)
    }

    /// The native protocol port.
    pub fn tcp_port(&self) -> u16 {
        self.tcp_port.port()
    }

    /// The directory holding data, config and log.
    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// Kills the server at once (SIGKILL), like a crash; [`ClickHouse::restart`]
    /// brings it back with its data.
    pub fn kill(&mut self) {
        if let Some(mut process) = self.process.take() {
            process.kill();
        }
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

/// ClickHouse servers as `shards` × `replicas` of one cluster named
/// [`ClickHouseCluster::NAME`], replicating through a ZooKeeper of their own: every
/// server lists the cluster under `remote_servers` (internal replication: a write
/// goes to one replica per shard and replication copies it), has `shard` and
/// `replica` macros for `Replicated*MergeTree` paths, and runs `ON CLUSTER` DDL.
#[derive(Debug)]
pub struct ClickHouseCluster {
    servers: Vec<ClickHouse>,
    replicas: usize,
    _interserver: Vec<PortLease>,
    // Dropped last: the servers stop before their ZooKeeper does.
    _zookeeper: crate::ZooKeeper,
}

impl ClickHouseCluster {
    /// The cluster's name in `remote_servers`.
    pub const NAME: &'static str = "strangler_cluster";

    /// Starts ZooKeeper and the servers (all at once), returning once every server
    /// answers.
    pub async fn start(shards: usize, replicas: usize) -> Result<Self> {
        let zookeeper = crate::ZooKeeper::start().await?;
        let mut servers = (0..shards * replicas)
            .map(|_| ClickHouse::prepare())
            .collect::<Result<Vec<_>>>()?;
        let mut remote = String::new();
        for shard in 0..shards {
            remote.push_str("<shard><internal_replication>true</internal_replication>");
            for replica in 0..replicas {
                remote.push_str(&format!(
                    "<replica><host>127.0.0.1</host><port>{}</port></replica>",
                    servers[shard * replicas + replica].tcp_port()
                ));
            }
            remote.push_str("</shard>");
        }
        let mut interserver = Vec::new();
        let mut extras = Vec::new();
        for (i, _) in servers.iter().enumerate() {
            let port = free_port()?;
            extras.push(format!(
                r#"    <interserver_http_host>127.0.0.1</interserver_http_host>
    <interserver_http_port>{port}</interserver_http_port>
    <zookeeper><node><host>127.0.0.1</host><port>{zk}</port></node><session_timeout_ms>30000</session_timeout_ms></zookeeper>
    <macros><shard>{shard}</shard><replica>s{shard}r{replica}</replica></macros>
    <remote_servers><{name}>{remote}</{name}></remote_servers>
    <distributed_ddl><path>/clickhouse/task_queue/ddl</path></distributed_ddl>"#,
                port = port.port(),
                zk = zookeeper.port(),
                shard = i / replicas + 1,
                replica = i % replicas + 1,
                name = Self::NAME,
            ));
            interserver.push(port);
        }
        let started = futures::future::join_all(
            servers
                .iter_mut()
                .zip(&extras)
                .map(|(server, extra)| server.launch(extra)),
        )
        .await;
        for result in started {
            result?;
        }
        Ok(Self {
            servers,
            _interserver: interserver,
            replicas,
            _zookeeper: zookeeper,
        })
    }

    /// Every server, shard by shard.
    pub fn servers(&self) -> &[ClickHouse] {
        &self.servers
    }

    /// Replica `replica` of shard `shard` (both from 0).
    pub fn server(&self, shard: usize, replica: usize) -> &ClickHouse {
        &self.servers[shard * self.replicas + replica]
    }

    /// The same, to stop, kill or restart it.
    pub fn server_mut(&mut self, shard: usize, replica: usize) -> &mut ClickHouse {
        &mut self.servers[shard * self.replicas + replica]
    }
}
