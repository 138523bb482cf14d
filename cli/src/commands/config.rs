//! `strangler config check`.

use std::path::Path;
use std::process::ExitCode;

use strangler_router::RouterConfig;
use strangler_router::config::Secrets;

/// Validates a router config as the router would at start-up, credentials included.
pub fn check(file: &Path) -> anyhow::Result<ExitCode> {
    let config = RouterConfig::load(file)?;
    Secrets::read(&config)?;
    println!(
        "{}: ok ({} route{}, legacy {}, listening on {})",
        file.display(),
        config.routes.len(),
        if config.routes.len() == 1 { "" } else { "s" },
        config.legacy.authority,
        config.listen
    );
    Ok(ExitCode::SUCCESS)
}
