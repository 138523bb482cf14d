//! `strangler rollout run`: every route with a plan, each step gated on evidence.

use std::process::ExitCode;

use strangler_router::RouterConfig;

use crate::control::Controller;
use crate::*;

pub fn rollout_exit(ends: &[rollout::End]) -> ExitCode {
    if ends.contains(&rollout::End::RolledBack) {
        ExitCode::from(1)
    } else if ends.iter().all(|e| *e == rollout::End::Completed) {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(2)
    }
}

pub async fn rollout_all(
    config: RouterConfig,
    actor: Option<String>,
    dry_run: bool,
) -> anyhow::Result<ExitCode> {
    let controller = Controller::new(config, actor)?;
    let source = rollout::Collector::new(
        &controller.config().control.collector_url,
        std::time::Duration::from_secs(15),
    )
    .map_err(anyhow::Error::msg)?;
    let plans: Vec<(String, strangler_model::rollout::RolloutPlan)> = controller
        .config()
        .routes
        .iter()
        .filter_map(|r| r.rollout.clone().map(|p| (r.name.to_string(), p)))
        .collect();
    if plans.is_empty() {
        anyhow::bail!("no route has a [route.rollout] plan");
    }
    let runs = plans
        .iter()
        .map(|(route, plan)| rollout::run(&controller, &source, route, plan, dry_run));
    let mut ends = Vec::new();
    for (result, (route, _)) in futures::future::join_all(runs)
        .await
        .into_iter()
        .zip(&plans)
    {
        match result {
            Ok(end) => ends.push(end),
            Err(e) => {
                eprintln!("{route}: rollout stopped: {e:#}");
                ends.push(rollout::End::Held);
            }
        }
    }
    Ok(rollout_exit(&ends))
}

/// `strangler rollout run`.
pub fn run(
    config: &std::path::Path,
    actor: Option<String>,
    dry_run: bool,
) -> anyhow::Result<ExitCode> {
    let config = RouterConfig::load(config)?;
    super::runtime(false)?.block_on(rollout_all(config, actor, dry_run))
}
