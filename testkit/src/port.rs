//! Free loopback ports that two concurrently running test binaries never share.

use std::fs::{File, TryLockError};
use std::net::TcpListener;
use std::path::PathBuf;

use crate::error::{Result, TestkitError, io_err};

/// A TCP port on 127.0.0.1 reserved for as long as this value lives.
///
/// The kernel hands out a free ephemeral port; an advisory lock on a file named
/// after the port (in a directory shared by all test processes) keeps another
/// test binary from taking the same port between our probe and the server's bind.
#[derive(Debug)]
pub struct PortLease {
    port: u16,
    _lock: File,
}

impl PortLease {
    /// The reserved port number.
    pub fn port(&self) -> u16 {
        self.port
    }
}

fn lock_dir() -> PathBuf {
    std::env::temp_dir().join("strangler-testkit-ports")
}

/// Reserves a free port on 127.0.0.1.
pub fn free_port() -> Result<PortLease> {
    let dir = lock_dir();
    std::fs::create_dir_all(&dir).map_err(io_err(format!("creating {}", dir.display())))?;
    for _ in 0..200 {
        let listener = TcpListener::bind("127.0.0.1:0").map_err(io_err("binding 127.0.0.1:0"))?;
        let port = listener
            .local_addr()
            .map_err(io_err("reading the bound address"))?
            .port();
        drop(listener);
        let path = dir.join(format!("{port}.lock"));
        let file = File::create(&path).map_err(io_err(format!("creating {}", path.display())))?;
        match file.try_lock() {
            Ok(()) => return Ok(PortLease { port, _lock: file }),
            Err(TryLockError::WouldBlock) => continue,
            Err(TryLockError::Error(source)) => {
                return Err(TestkitError::Io {
                    context: format!("locking {}", path.display()),
                    source,
                });
            }
        }
    }
    Err(TestkitError::Io {
        context: "no free loopback port after 200 tries".into(),
        source: std::io::Error::from(std::io::ErrorKind::AddrInUse),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leases_held_at_once_are_distinct() {
        let leases: Vec<_> = (0..20).map(|_| free_port().expect("lease")).collect();
        let mut ports: Vec<u16> = leases.iter().map(PortLease::port).collect();
        ports.sort_unstable();
        ports.dedup();
        assert_eq!(ports.len(), 20);
    }

    #[test]
    fn a_leased_port_is_not_handed_out_again_while_held() {
        let lease = free_port().expect("lease");
        let path = lock_dir().join(format!("{}.lock", lease.port()));
        let other = File::create(&path).expect("open lock file");
        assert!(matches!(other.try_lock(), Err(TryLockError::WouldBlock)));
    }

    #[test]
    fn another_process_cannot_take_a_leased_port() {
        let lease = free_port().expect("lease");
        let path = lock_dir().join(format!("{}.lock", lease.port()));
        // flock(1) from util-linux stands in for a second test binary.
        let status = std::process::Command::new("flock")
            .args(["--nonblock", "--exclusive"])
            .arg(&path)
            .arg("true")
            .status()
            .expect("run flock");
        assert!(
            !status.success(),
            "a second process got the lock on {}",
            path.display()
        );
        drop(lease);
        let status = std::process::Command::new("flock")
            .args(["--nonblock", "--exclusive"])
            .arg(&path)
            .arg("true")
            .status()
            .expect("run flock");
        assert!(status.success(), "a released lease must be free again");
    }
}
