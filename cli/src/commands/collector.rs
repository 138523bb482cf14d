//! `strangler collector run` and `strangler compare` (which reads the collector).

use std::path::Path;
use std::process::ExitCode;

use crate::{Output, SERVICE_LOG, init_logging, output, rollout};

/// Runs the collector until it is stopped.
pub fn run(config: Option<&Path>) -> anyhow::Result<ExitCode> {
    let config = strangler_collector::CollectorConfig::load(config)?;
    init_logging(false, SERVICE_LOG);
    super::runtime(true)?.block_on(strangler_collector::run(config))?;
    Ok(ExitCode::SUCCESS)
}

/// Old vs new for a route over a window, from the stored traces.
pub fn compare(
    route: &str,
    since: &str,
    collector: &str,
    top: usize,
    output: Output,
) -> anyhow::Result<ExitCode> {
    strangler_collector::web::parse_window(since)?;
    let runtime = super::runtime(false)?;
    // Long windows aggregate days of spans: more time than a rollout's reads.
    let client = rollout::Collector::new(collector, std::time::Duration::from_secs(30))
        .map_err(anyhow::Error::msg)?;
    let doc = runtime
        .block_on(client.route(route, since))
        .map_err(anyhow::Error::msg)?;
    output::stored_compare(&doc, top, output == Output::Json)?;
    Ok(ExitCode::SUCCESS)
}
