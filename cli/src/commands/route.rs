//! `strangler route …`: lifecycle moves, status, history, live comparison and a route's rollout.

use std::process::ExitCode;

use anyhow::Context as _;
use strangler_router::RouterConfig;

use crate::control::Controller;
use crate::control::lifecycle::State;
use crate::*;

/// Exit code when a change took effect only in part (a router or the flag store did not confirm).
const EXIT_PARTIAL: u8 = 2;

fn confirm(from: State, to: State, route: &str, yes: bool) -> anyhow::Result<()> {
    if yes || !from.skips_a_stage_to(to) {
        return Ok(());
    }
    let question = format!("{route} is at {from}; going straight to {to} skips a stage.");
    if !std::io::stdin().is_terminal() {
        anyhow::bail!(
            "{question} Refusing without a terminal to confirm on; pass --yes to do it anyway"
        );
    }
    eprint!("{question} Continue? [y/N] ");
    let mut answer = String::new();
    std::io::stdin().read_line(&mut answer)?;
    if matches!(answer.trim(), "y" | "Y" | "yes") {
        Ok(())
    } else {
        anyhow::bail!("not confirmed; nothing changed")
    }
}

pub fn route(args: RouteArgs) -> anyhow::Result<ExitCode> {
    let config = RouterConfig::load(&args.config)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(route_async(args, config))
}

async fn route_async(args: RouteArgs, config: RouterConfig) -> anyhow::Result<ExitCode> {
    let controller = Controller::new(config, args.actor.clone())?;
    let json = args.output == Output::Json;
    let moves: Vec<(String, State, String)> = match &args.command {
        RouteCommand::List | RouteCommand::Status { .. } => {
            let only = match &args.command {
                RouteCommand::Status { route } => Some(route.as_str()),
                _ => None,
            };
            let views = controller.views(only).await?;
            output::views(&views, json)?;
            return Ok(ExitCode::SUCCESS);
        }
        RouteCommand::Compare { route, top } => {
            controller.route(route)?;
            let replies = controller
                .fleet()
                .get_all(&format!("/routes/{route}/shadow"))
                .await;
            let status = controller
                .fleet()
                .get_all(&format!("/routes/{route}"))
                .await;
            output::compare(route, &replies, &status, *top, json)?;
            return Ok(ExitCode::SUCCESS);
        }
        RouteCommand::Calibrate {
            route,
            requests,
            wait_secs,
        } => {
            controller.route(route)?;
            let started = controller
                .fleet()
                .post_all(
                    &format!("/routes/{route}/calibrate"),
                    serde_json::json!({ "requests": requests }),
                )
                .await;
            for r in started.iter().filter(|r| r.result.is_err()) {
                eprintln!(
                    "router {} {}",
                    r.url,
                    r.result.as_ref().err().map_or("", String::as_str)
                );
            }
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(*wait_secs);
            let replies = loop {
                let replies = controller
                    .fleet()
                    .get_all(&format!("/routes/{route}/calibration"))
                    .await;
                let complete = replies
                    .iter()
                    .all(|r| r.result.as_ref().map_or(true, |d| d["complete"] == true));
                if complete || std::time::Instant::now() >= deadline {
                    break replies;
                }
                tokio::time::sleep(std::time::Duration::from_millis(250)).await;
            };
            output::calibration(route, &replies, json)?;
            return Ok(ExitCode::SUCCESS);
        }
        RouteCommand::Rollout { route, dry_run } => {
            let plan = controller.route(route)?.rollout.clone().ok_or_else(|| {
                anyhow::anyhow!(
                    "route {route} has no [route.rollout] plan in {}",
                    args.config.display()
                )
            })?;
            let source = rollout::Collector::new(
                &controller.config().control.collector_url,
                std::time::Duration::from_secs(15),
            )
            .map_err(anyhow::Error::msg)?;
            let end = rollout::run(&controller, &source, route, &plan, *dry_run).await?;
            return Ok(super::rollout::rollout_exit(&[end]));
        }
        RouteCommand::History { route } => {
            controller.route(route)?;
            let entries = controller.history().for_route(route).await?;
            output::history(&entries, json)?;
            return Ok(ExitCode::SUCCESS);
        }
        RouteCommand::Shadow { route } => vec![(route.clone(), State::Shadow, "shadow".into())],
        RouteCommand::Canary { route, percent } => {
            let to = match percent.get() {
                0 => State::Legacy,
                100 => State::New,
                _ => State::Canary { percent: *percent },
            };
            vec![(route.clone(), to, format!("canary {percent}"))]
        }
        RouteCommand::Promote { route } => vec![(route.clone(), State::New, "promote".into())],
        RouteCommand::Retire { route } => vec![(route.clone(), State::Retired, "retire".into())],
        RouteCommand::Rollback { route, all } => {
            let names = if *all {
                controller.route_names()
            } else {
                route.iter().cloned().collect()
            };
            names
                .into_iter()
                .map(|r| (r, State::Legacy, "rollback".to_string()))
                .collect()
        }
        RouteCommand::Restore { route, to } => {
            controller.route(route)?;
            let state = controller.recorded_state(route, *to).await?;
            vec![(route.clone(), state, format!("restore #{to}"))]
        }
    };
    // Forward moves may ask first, and go ahead only if the route is still where
    // they were decided from; a rollback never asks and never waits.
    let mut expected = Vec::with_capacity(moves.len());
    for (route, to, _) in &moves {
        if *to != State::Legacy {
            let r = controller.route(route)?;
            let from = controller.current_state(r).await?;
            confirm(from, *to, route, args.yes)?;
            expected.push(Some(from));
        } else {
            controller.route(route)?;
            expected.push(None);
        }
    }
    let outcomes = futures::future::join_all(moves.iter().zip(&expected).map(
        |((route, to, action), expected)| {
            controller.transition_expecting(route, *to, action, args.reason.clone(), *expected)
        },
    ))
    .await;
    let mut complete = true;
    let mut done = Vec::new();
    let mut first_error = None;
    for outcome in outcomes {
        match outcome {
            Ok(o) => {
                complete &= o.complete();
                done.push(o);
            }
            Err(e) => {
                complete = false;
                first_error.get_or_insert(e);
            }
        }
    }
    output::outcomes(&done, &controller.store_description(), json)?;
    if let Some(e) = first_error {
        if done.is_empty() {
            return Err(e.into());
        }
        eprintln!("strangler: {e}");
    }
    Ok(if complete {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_PARTIAL)
    })
}
