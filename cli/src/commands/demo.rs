//! `strangler demo` (feature `demo`).

use std::process::ExitCode;

use crate::{QUIET_LOG, demo, init_logging};

/// The example end to end; quiet logging so the walk-through is what shows.
pub fn run(walkthrough: bool, exit: bool) -> anyhow::Result<ExitCode> {
    init_logging(false, QUIET_LOG);
    super::runtime(true)?.block_on(demo::run(walkthrough, exit))?;
    Ok(ExitCode::SUCCESS)
}
