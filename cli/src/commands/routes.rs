//! `strangler routes suggest`: which endpoint to move next, from the traffic legacy
//! still serves (the collector's stored traces).

use std::process::ExitCode;

use crate::{Output, output, rollout};

/// Prints the busiest legacy endpoints, grouped into templates.
pub fn suggest(since: &str, collector: &str, top: usize, out: Output) -> anyhow::Result<ExitCode> {
    strangler_collector::web::parse_window(since)?;
    let runtime = super::runtime(false)?;
    let client = rollout::Collector::new(collector, std::time::Duration::from_secs(30))
        .map_err(anyhow::Error::msg)?;
    let doc = runtime
        .block_on(client.overview(since))
        .map_err(anyhow::Error::msg)?;
    let mut list = output::suggestions(&doc);
    list.truncate(top);
    output::route_suggestions(&list, since, out == Output::Json)?;
    Ok(ExitCode::SUCCESS)
}
