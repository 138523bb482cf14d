//! `strangler router run`.

use std::path::Path;
use std::process::ExitCode;

use anyhow::Context as _;
use strangler_router::RouterConfig;

use crate::{SERVICE_LOG, init_logging};

/// Runs the router until it is stopped (or hands its sockets to an upgrade).
pub fn run(config: &Path, upgrade: bool) -> anyhow::Result<ExitCode> {
    let parsed = RouterConfig::load(config)?;
    init_logging(parsed.telemetry.json_logs, SERVICE_LOG);
    strangler_router::run(config, strangler_router::RunOptions { upgrade })
        .with_context(|| format!("starting the router from {}", config.display()))?;
    Ok(ExitCode::SUCCESS)
}
