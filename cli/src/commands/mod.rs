//! One module per command family; `main.rs` parses the arguments and dispatches here.

pub mod cdc;
pub mod collector;
pub mod config;
#[cfg(feature = "demo")]
pub mod demo;
pub mod init;
pub mod rollout;
pub mod route;
pub mod router;
pub mod routes;

use anyhow::Context as _;

/// A runtime for one command: multi-threaded for services, one thread for requests.
pub fn runtime(multi_thread: bool) -> anyhow::Result<tokio::runtime::Runtime> {
    let mut builder = if multi_thread {
        tokio::runtime::Builder::new_multi_thread()
    } else {
        tokio::runtime::Builder::new_current_thread()
    };
    builder
        .enable_all()
        .build()
        .context("starting the async runtime")
}
