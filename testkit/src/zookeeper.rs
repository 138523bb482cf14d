//! A throwaway ZooKeeper (Debian's `zookeeper` package, standalone mode): what
//! ClickHouse 18.16 replicates and runs `ON CLUSTER` DDL through.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use nix::sys::signal::Signal;
use tempfile::TempDir;

use crate::error::{Result, io_err};
use crate::port::{PortLease, free_port};
use crate::process::{ServerProcess, find_binary};

const SERVER: &str = "zookeeper";
const INSTALL: &str = "sudo apt-get install zookeeper";
const READY_DEADLINE: Duration = Duration::from_secs(60);

/// A standalone ZooKeeper on 127.0.0.1, data in a temporary directory. Stopped and
/// removed on drop.
#[derive(Debug)]
pub struct ZooKeeper {
    process: Option<ServerProcess>,
    port: PortLease,
    _dir: TempDir,
}

impl ZooKeeper {
    /// Starts it and waits until it answers `srvr` in standalone mode.
    pub async fn start() -> Result<Self> {
        let java = find_binary(
            &["/usr/bin/java", "java"],
            "sudo apt-get install default-jre-headless",
        )?;
        let jar: PathBuf = find_binary(&["/usr/share/java/zookeeper.jar"], INSTALL)?;
        let dir = tempfile::Builder::new()
            .prefix("strangler-zookeeper-")
            .tempdir()
            .map_err(io_err("creating a temp dir"))?;
        let port = free_port()?;
        let mut cmd = Command::new(java);
        // The jar's manifest lists its dependencies' jars; the admin web server is
        // off (it would take port 8080), the four-letter probe allowed.
        cmd.args([
            "-Xmx256m",
            "-Dzookeeper.admin.enableServer=false",
            "-Dzookeeper.4lw.commands.whitelist=srvr,ruok",
            "-cp",
        ])
        .arg(&jar)
        .arg("org.apache.zookeeper.server.ZooKeeperServerMain")
        .arg(port.port().to_string())
        .arg(dir.path().join("data"))
        .current_dir(dir.path());
        let log_path = dir.path().join("zookeeper.log");
        let mut process = ServerProcess::spawn(SERVER, cmd, &log_path, Signal::SIGTERM)?;
        let at = port.port();
        process
            .wait_ready(READY_DEADLINE, || async move {
                tokio::task::spawn_blocking(move || {
                    srvr(at).is_some_and(|s| s.contains("Mode: standalone"))
                })
                .await
                .unwrap_or(false)
            })
            .await?;
        Ok(Self {
            process: Some(process),
            port,
            _dir: dir,
        })
    }

    /// The client port.
    pub fn port(&self) -> u16 {
        self.port.port()
    }

    /// Stops it.
    pub fn stop(&mut self) {
        if let Some(mut process) = self.process.take() {
            process.stop();
        }
    }
}

/// The answer to the `srvr` four-letter command, if any.
fn srvr(port: u16) -> Option<String> {
    let mut stream = TcpStream::connect_timeout(
        &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_secs(1),
    )
    .ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    stream.write_all(b"srvr").ok()?;
    let mut text = String::new();
    stream.read_to_string(&mut text).ok()?;
    Some(text)
}

impl Drop for ZooKeeper {
    fn drop(&mut self) {
        self.stop();
    }
}
