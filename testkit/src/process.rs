//! A server child process with its log in a file, readiness waiting and clean shutdown.

use std::fs::File;
use std::future::Future;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::error::{Result, TestkitError, io_err};

/// How often readiness probes run; short because start-up time is what tests wait on.
const PROBE_INTERVAL: Duration = Duration::from_millis(50);
/// How long a server gets to shut down on its own before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(10);
/// How much of a log a failure message shows.
const LOG_TAIL_BYTES: u64 = 6_000;

/// A running server process whose stdout and stderr go to a log file.
#[derive(Debug)]
pub struct ServerProcess {
    name: &'static str,
    child: Option<Child>,
    log_path: PathBuf,
    stop_signal: Signal,
    /// Sent when `stop_signal` did not stop it in time, before SIGKILL.
    escalate: Option<Signal>,
}

impl ServerProcess {
    /// Spawns `command` with its output appended to `log_path`.
    ///
    /// `stop_signal` is what asks this kind of server for a fast, clean shutdown.
    pub fn spawn(
        name: &'static str,
        mut command: Command,
        log_path: &Path,
        stop_signal: Signal,
    ) -> Result<Self> {
        let log = File::options()
            .create(true)
            .append(true)
            .open(log_path)
            .map_err(io_err(format!("opening {}", log_path.display())))?;
        let log_err = log
            .try_clone()
            .map_err(io_err("duplicating the log handle"))?;
        command
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log_err));
        let child = command
            .spawn()
            .map_err(io_err(format!("spawning {name} ({command:?})")))?;
        Ok(Self {
            name,
            child: Some(child),
            log_path: log_path.to_path_buf(),
            stop_signal,
            escalate: None,
        })
    }

    /// Sends `signal` when the stop signal did not stop the server in time, before
    /// killing it (PostgreSQL: SIGQUIT, its immediate shutdown).
    pub fn escalate_with(mut self, signal: Signal) -> Self {
        self.escalate = Some(signal);
        self
    }

    /// The OS process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Where the server's log is.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The last few kilobytes of the server's log.
    pub fn log_tail(&self) -> String {
        read_tail(&self.log_path, LOG_TAIL_BYTES)
    }

    /// Errors when the process has exited.
    pub fn check_alive(&mut self) -> Result<()> {
        let Some(child) = self.child.as_mut() else {
            return Err(self.exited("stopped".into()));
        };
        match child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => Err(self.exited(status.to_string())),
            Err(e) => Err(self.exited(format!("unknown: {e}"))),
        }
    }

    fn exited(&self, status: String) -> TestkitError {
        TestkitError::Exited {
            server: self.name,
            status,
            log_path: self.log_path.clone(),
            log: self.log_tail(),
        }
    }

    /// Polls `probe` until it returns true, the process dies, or `deadline` passes.
    pub async fn wait_ready<F, Fut>(&mut self, deadline: Duration, mut probe: F) -> Result<()>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = bool>,
    {
        let started = Instant::now();
        loop {
            if probe().await {
                return Ok(());
            }
            self.check_alive()?;
            if started.elapsed() > deadline {
                return Err(TestkitError::NotReady {
                    server: self.name,
                    waited: started.elapsed(),
                    log_path: self.log_path.clone(),
                    log: self.log_tail(),
                });
            }
            tokio::time::sleep(PROBE_INTERVAL).await;
        }
    }

    /// Asks the server to stop, waits for it, and kills it if it does not.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        if let Ok(pid) = i32::try_from(child.id()) {
            let _ = kill(Pid::from_raw(pid), self.stop_signal);
        }
        let wait = |child: &mut Child, grace: Duration| {
            let started = Instant::now();
            while started.elapsed() < grace {
                match child.try_wait() {
                    Ok(Some(_)) | Err(_) => return true,
                    Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
            false
        };
        if wait(&mut child, STOP_GRACE) {
            return;
        }
        // A server whose clean stop hangs (PostgreSQL's waits on its walsenders) gets
        // its own abrupt stop first, which also ends its child processes; killing
        // only the parent would leave them holding its resources (shared memory),
        // and the next start on that data directory would fail.
        if let Some(signal) = self.escalate
            && let Ok(pid) = i32::try_from(child.id())
        {
            tracing::warn!(
                server = self.name,
                "did not stop in {STOP_GRACE:?}; sending {signal}"
            );
            let _ = kill(Pid::from_raw(pid), signal);
            if wait(&mut child, STOP_GRACE) {
                return;
            }
        }
        tracing::warn!(
            server = self.name,
            "did not stop in {STOP_GRACE:?}; killing it"
        );
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Kills the server at once, like a crash or a power cut.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Runs a set-up command to completion, returning an error with its output when it fails.
pub async fn run_setup(mut command: tokio::process::Command) -> Result<()> {
    let shown = format!("{:?}", command.as_std());
    let output = command
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(io_err(format!("running {shown}")))?;
    if output.status.success() {
        return Ok(());
    }
    Err(TestkitError::SetupCommand {
        command: shown,
        status: output.status.to_string(),
        output: format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ),
    })
}

/// Finds an executable among `candidates`, or says how to install it.
pub fn find_binary(candidates: &[&str], install: &str) -> Result<PathBuf> {
    for candidate in candidates {
        let path = Path::new(candidate);
        if path.is_absolute() {
            if path.is_file() {
                return Ok(path.to_path_buf());
            }
        } else if let Some(found) = search_path(candidate) {
            return Ok(found);
        }
    }
    Err(TestkitError::MissingBinary {
        binary: candidates.join(" or "),
        install: install.to_string(),
    })
}

fn search_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

fn read_tail(path: &Path, bytes: u64) -> String {
    let Ok(mut file) = File::open(path) else {
        return format!("(no log at {})", path.display());
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = file.seek(SeekFrom::Start(len.saturating_sub(bytes)));
    let mut buf = Vec::new();
    let _ = file.read_to_end(&mut buf);
    String::from_utf8_lossy(&buf).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_binary_names_the_install_command() {
        let err = find_binary(&["/nonexistent/strangler-x"], "apt-get install strangler-x")
            .expect_err("must be missing");
        let text = err.to_string();
        assert!(text.contains("/nonexistent/strangler-x"), "{text}");
        assert!(text.contains("apt-get install strangler-x"), "{text}");
    }

    #[tokio::test]
    async fn a_server_that_exits_during_startup_reports_its_log() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("log");
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo boom: bad config >&2; exit 3"]);
        let mut proc = ServerProcess::spawn("fake", cmd, &log, Signal::SIGTERM).expect("spawn");
        let err = proc
            .wait_ready(Duration::from_secs(5), || async { false })
            .await
            .expect_err("must fail");
        let text = err.to_string();
        assert!(text.contains("fake exited"), "{text}");
        assert!(text.contains("boom: bad config"), "{text}");
    }

    #[tokio::test]
    async fn a_server_that_never_gets_ready_times_out_with_its_log() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("log");
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo still starting; sleep 30"]);
        let mut proc = ServerProcess::spawn("slow", cmd, &log, Signal::SIGTERM).expect("spawn");
        let err = proc
            .wait_ready(Duration::from_millis(300), || async { false })
            .await
            .expect_err("must time out");
        assert!(matches!(err, TestkitError::NotReady { .. }));
        assert!(err.to_string().contains("still starting"));
        let started = Instant::now();
        drop(proc);
        assert!(started.elapsed() < STOP_GRACE, "sh must stop on SIGTERM");
    }
}
