//! `strangler`: one binary that runs strangler's services and operates routes.
//!
//! The CLI owns the user-facing edge: argument parsing (clap), turning library
//! errors into readable messages and exit codes, and wiring the router, collector
//! and CDC libraries into long-running processes.

mod control;
#[cfg(feature = "demo")]
mod demo;
mod output;
mod rollout;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{CommandFactory, Parser, Subcommand, ValueEnum};
use strangler_router::RouterConfig;

use control::Controller;
use control::lifecycle::{Percent, State};

// glibc malloc showed up at ~18% of the router's CPU under load (bench/router.sh);
// mimalloc's per-thread heaps cut that substantially.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Migrate a monolith to new services one route at a time.
#[derive(Debug, Parser)]
#[command(name = "strangler", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run and operate the router.
    Router {
        #[command(subcommand)]
        command: RouterCommand,
    },
    /// Work with configuration files.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Move routes between legacy and new: shadow, canary, promote, rollback.
    Route(RouteArgs),
    /// Old vs new for a route over a time window, from the traces the collector stored:
    /// the dashboard route page's numbers. (`strangler route compare` shows the routers'
    /// live counters instead.)
    Compare {
        /// The route.
        route: String,
        /// The window: 15m, 1h, 7d, …
        #[arg(long, default_value = "1h")]
        since: String,
        /// The collector's web address.
        #[arg(
            long,
            env = "STRANGLER_COLLECTOR_URL",
            default_value = "http://127.0.0.1:8686"
        )]
        collector: String,
        /// How many differing paths and samples to show.
        #[arg(long, default_value_t = 10)]
        top: usize,
        /// Output format.
        #[arg(long, short, value_enum, default_value = "table")]
        output: Output,
    },
    /// Run the rollout plans of every route that has one, side by side.
    Rollout {
        #[command(subcommand)]
        command: RolloutCommand,
    },
    /// Run the OTLP collector that stores traces in ClickHouse, or print its schema.
    Collector {
        #[command(subcommand)]
        command: CollectorCommand,
    },
    /// Keep the new database in sync with the legacy one (PostgreSQL logical replication).
    Cdc {
        #[command(subcommand)]
        command: CdcCommand,
    },
    /// Print shell completions (bash, zsh, fish, elvish, powershell).
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    #[cfg(feature = "demo")]
    /// Run the example end to end: a monolith, a new service, traffic, a flip and a rollback.
    Demo {
        /// Only start the stack (no shadow/canary/promote/rollback walk-through).
        #[arg(long)]
        no_walkthrough: bool,
        /// Stop everything after the walk-through instead of waiting for Ctrl-C.
        #[arg(long)]
        exit: bool,
    },
}

/// How results are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    /// Aligned columns for people.
    Table,
    /// JSON for scripts.
    Json,
}

#[derive(Debug, clap::Args)]
struct RouteArgs {
    /// The router config (routes, flag source, routers' admin URLs under [control]).
    #[arg(
        long,
        short,
        global = true,
        env = "STRANGLER_CONFIG",
        default_value = "strangler.toml"
    )]
    config: PathBuf,
    /// Output format.
    #[arg(long, short, global = true, value_enum, default_value = "table")]
    output: Output,
    /// Who is making the change, for the history (default: the OS user).
    #[arg(long, global = true, env = "STRANGLER_ACTOR")]
    actor: Option<String>,
    /// Why, for the history.
    #[arg(long, global = true)]
    reason: Option<String>,
    /// Do not ask for confirmation when a move skips a stage.
    #[arg(long, short, global = true)]
    yes: bool,
    #[command(subcommand)]
    command: RouteCommand,
}

#[derive(Debug, Subcommand)]
enum RouteCommand {
    /// Every route with its state, rollout, overrides and live numbers from the routers.
    List,
    /// One route in detail.
    Status {
        /// The route.
        route: String,
    },
    /// Legacy answers; the new service gets shadow copies (turns on the `<flag>.shadow` toggle).
    Shadow {
        /// The route.
        route: String,
    },
    /// Send PERCENT % of users (sticky) to the new service.
    Canary {
        /// The route.
        route: String,
        /// 0-100.
        percent: Percent,
    },
    /// Send everyone to the new service (100 %).
    Promote {
        /// The route.
        route: String,
    },
    /// Mark the legacy path unused (the new service keeps 100 %).
    Retire {
        /// The route.
        route: String,
    },
    /// Back to legacy now: disables the toggle and pushes a `legacy` override to every router.
    Rollback {
        /// The route (or --all).
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        route: Option<String>,
        /// Every route in the config.
        #[arg(long)]
        all: bool,
    },
    /// Learn legacy's own noise: send N requests to legacy twice and report which JSON
    /// paths and headers differ, as ignore rules to paste into the route's config.
    Calibrate {
        /// The route.
        route: String,
        /// Pairs to collect on each router.
        #[arg(long, default_value_t = 100)]
        requests: u64,
        /// Give up waiting after this many seconds (traffic drives calibration).
        #[arg(long, default_value_t = 120)]
        wait_secs: u64,
    },
    /// Old vs new for a route: match rate, differing paths, shadow errors, sample mismatches.
    Compare {
        /// The route.
        route: String,
        /// How many differing paths and samples to show.
        #[arg(long, default_value_t = 10)]
        top: usize,
    },
    /// Run the route's `[route.rollout]` plan: step by step, each step gated on the
    /// collector's evidence (error rate, p99, answers matching, custom SQL); a failing
    /// gate rolls back to legacy, missing evidence holds. Exit 0 completed, 1 rolled
    /// back, 2 held.
    Rollout {
        /// The route.
        route: String,
        /// Evaluate the current step once and change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// The recorded changes of a route.
    History {
        /// The route.
        route: String,
    },
    /// Go back to the state recorded in history entry N.
    Restore {
        /// The route.
        route: String,
        /// The entry number from `strangler route history`.
        #[arg(long = "to")]
        to: usize,
    },
}

#[derive(Debug, Subcommand)]
enum RouterCommand {
    /// Start the router in the foreground (SIGTERM for a graceful stop, SIGHUP to reload,
    /// SIGQUIT to hand the sockets to a router started with --upgrade).
    Run {
        /// The router config file.
        #[arg(
            long,
            short,
            env = "STRANGLER_CONFIG",
            default_value = "strangler.toml"
        )]
        config: PathBuf,
        /// Graceful binary upgrade: take over the listening sockets of the running
        /// router with the same config. Start this, then send the old one SIGQUIT; it
        /// stops accepting and finishes its in-flight requests.
        #[arg(long)]
        upgrade: bool,
    },
}

#[derive(Debug, Subcommand)]
enum RolloutCommand {
    /// Watch every route with a `[route.rollout]` plan until each completes, rolls
    /// back or holds. Exit 0 if all completed, 1 if any rolled back, else 2.
    Run {
        /// The router config.
        #[arg(
            long,
            short,
            env = "STRANGLER_CONFIG",
            default_value = "strangler.toml"
        )]
        config: PathBuf,
        /// Evaluate each route's current step once and change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Who is acting (recorded in the history).
        #[arg(long, env = "STRANGLER_ACTOR")]
        actor: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
enum CollectorCommand {
    /// Start the collector in the foreground (SIGTERM or Ctrl-C to stop).
    Run {
        /// A collector config file (TOML); every key has a default.
        #[arg(long, short, env = "STRANGLER_COLLECTOR_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Print the ClickHouse DDL the collector applies at start.
    Schema {
        /// The database name.
        #[arg(long, default_value = "strangler")]
        database: String,
    },
}

#[derive(Debug, Subcommand)]
enum CdcCommand {
    /// Snapshot the mapped tables (first run), then stream changes until SIGTERM/Ctrl-C.
    /// Restarts resume from the position stored in the target.
    Run {
        /// The CDC config (source, target, [[map]] sections).
        #[arg(long, short, env = "STRANGLER_CDC_CONFIG", default_value = "cdc.toml")]
        config: PathBuf,
        /// Drop the slot and checkpoint, truncate the mapped target tables, copy again.
        #[arg(long)]
        resnapshot: bool,
    },
    /// Check every mapping against both schemas; moves no row, creates no slot.
    Check {
        /// The CDC config.
        #[arg(long, short, env = "STRANGLER_CDC_CONFIG", default_value = "cdc.toml")]
        config: PathBuf,
    },
    /// Compare source and target through the mappings (key-range checksums, bisected
    /// to rows); exits 1 on a difference. Waits for the target to catch up first.
    Verify {
        /// The CDC config.
        #[arg(long, short, env = "STRANGLER_CDC_CONFIG", default_value = "cdc.toml")]
        config: PathBuf,
        /// Output format.
        #[arg(long, short, value_enum, default_value = "table")]
        output: Output,
        /// How long to wait for the target to apply up to the source's position.
        #[arg(long, default_value = "30")]
        wait_secs: u64,
    },
    /// Copy one target table again while `strangler cdc run` keeps streaming the
    /// others (asks the running process through the target database and waits).
    Resnapshot {
        /// The CDC config.
        #[arg(long, short, env = "STRANGLER_CDC_CONFIG", default_value = "cdc.toml")]
        config: PathBuf,
        /// The target table (`table` or `schema.table`).
        #[arg(long)]
        table: String,
        /// How long to wait for the running CDC to do it.
        #[arg(long, default_value = "600")]
        wait_secs: u64,
    },
    /// Print PostgreSQL DDL for a MySQL/MariaDB database's tables (from SHOW CREATE
    /// TABLE); what does not translate is listed as NOTE comments.
    Schema {
        /// The MySQL/MariaDB database (`mysql://user:pass@host:3306/db`).
        #[arg(long)]
        from: String,
        /// The target dialect (only `postgres`).
        #[arg(long, default_value = "postgres")]
        to: String,
        /// Only these tables (comma-separated); default all base tables.
        #[arg(long, value_delimiter = ',')]
        tables: Vec<String>,
        /// Also run the DDL on this PostgreSQL database, in one transaction.
        #[arg(long)]
        apply: Option<String>,
    },
    /// Slot, applied position and lag.
    Status {
        /// The CDC config.
        #[arg(long, short, env = "STRANGLER_CDC_CONFIG", default_value = "cdc.toml")]
        config: PathBuf,
        /// Output format.
        #[arg(long, short, value_enum, default_value = "table")]
        output: Output,
    },
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Validate a router config without starting anything; prints what is wrong with line numbers.
    Check {
        /// The router config file.
        file: PathBuf,
    },
}

/// Services log strangler's own information (reloads, breaker changes, progress)
/// and every crate's warnings and errors; dependencies' info lines stay out.
const SERVICE_LOG: &str =
    "warn,strangler=info,strangler_router=info,strangler_collector=info,strangler_cdc=info";
/// One-shot commands and the demo: warnings and errors only, so their output is
/// what the user asked for.
const QUIET_LOG: &str = "warn";

/// Logging to stderr: `STRANGLER_LOG`, else `RUST_LOG`, else `default`.
fn init_logging(json: bool, default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("STRANGLER_LOG")
        .or_else(|_| tracing_subscriber::EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

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

fn rollout_exit(ends: &[rollout::End]) -> ExitCode {
    if ends.contains(&rollout::End::RolledBack) {
        ExitCode::from(1)
    } else if ends.iter().all(|e| *e == rollout::End::Completed) {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(2)
    }
}

async fn rollout_all(
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

fn route(args: RouteArgs) -> anyhow::Result<ExitCode> {
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
            return Ok(rollout_exit(&[end]));
        }
        RouteCommand::History { route } => {
            controller.route(route)?;
            let entries = controller.history().for_route(route)?;
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
            let state = controller.recorded_state(route, *to)?;
            vec![(route.clone(), state, format!("restore #{to}"))]
        }
    };
    // Forward moves may ask first; a rollback never asks.
    for (route, to, _) in &moves {
        if *to != State::Legacy {
            let r = controller.route(route)?;
            let from = controller.current_state(r).await?;
            confirm(from, *to, route, args.yes)?;
        } else {
            controller.route(route)?;
        }
    }
    let outcomes =
        futures::future::join_all(moves.iter().map(|(route, to, action)| {
            controller.transition(route, *to, action, args.reason.clone())
        }))
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

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Router {
            command: RouterCommand::Run { config, upgrade },
        } => {
            let parsed = RouterConfig::load(&config)?;
            init_logging(parsed.telemetry.json_logs, SERVICE_LOG);
            strangler_router::run(&config, strangler_router::RunOptions { upgrade })
                .with_context(|| format!("starting the router from {}", config.display()))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Config {
            command: ConfigCommand::Check { file },
        } => {
            let config = RouterConfig::load(&file)?;
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
        Command::Route(args) => route(args),
        Command::Rollout {
            command:
                RolloutCommand::Run {
                    config,
                    dry_run,
                    actor,
                },
        } => {
            let config = RouterConfig::load(&config)?;
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            runtime.block_on(rollout_all(config, actor, dry_run))
        }
        Command::Compare {
            route,
            since,
            collector,
            top,
            output,
        } => {
            strangler_collector::web::parse_window(&since).map_err(anyhow::Error::msg)?;
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            // Long windows aggregate days of spans: more time than a rollout's reads.
            let client = rollout::Collector::new(&collector, std::time::Duration::from_secs(30))
                .map_err(anyhow::Error::msg)?;
            let doc = runtime
                .block_on(client.route(&route, &since))
                .map_err(anyhow::Error::msg)?;
            output::stored_compare(&doc, top, output == Output::Json)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Collector {
            command: CollectorCommand::Run { config },
        } => {
            let config = strangler_collector::CollectorConfig::load(config.as_deref())?;
            init_logging(false, SERVICE_LOG);
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            runtime.block_on(strangler_collector::run(config))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Collector {
            command: CollectorCommand::Schema { database },
        } => {
            print!(
                "{}",
                strangler_collector::store::clickhouse::schema_sql(&database)
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Cdc { command } => cdc_command(command),
        Command::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "strangler",
                &mut std::io::stdout(),
            );
            Ok(ExitCode::SUCCESS)
        }
        #[cfg(feature = "demo")]
        Command::Demo {
            no_walkthrough,
            exit,
        } => {
            init_logging(false, QUIET_LOG);
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            runtime.block_on(demo::run(!no_walkthrough, exit))?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("strangler: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn cdc_command(command: CdcCommand) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    match command {
        CdcCommand::Run { config, resnapshot } => {
            let config = strangler_cdc::CdcConfig::load(&config)?;
            init_logging(false, SERVICE_LOG);
            runtime.block_on(async {
                let stop = strangler_cdc::CancellationToken::new();
                let on_signal = stop.clone();
                tokio::spawn(async move {
                    let mut term =
                        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                            .ok();
                    tokio::select! {
                        _ = tokio::signal::ctrl_c() => {}
                        Some(()) = async { match term.as_mut() { Some(t) => t.recv().await, None => std::future::pending().await } } => {}
                    }
                    tracing::info!("stopping after the current transaction");
                    on_signal.cancel();
                });
                strangler_cdc::run::run(
                    &config,
                    strangler_cdc::run::RunOptions {
                        resnapshot,
                        stop: Some(stop),
                        observe: None,
                    },
                )
                .await
            })?;
            Ok(ExitCode::SUCCESS)
        }
        CdcCommand::Check { config } => {
            let config = strangler_cdc::CdcConfig::load(&config)?;
            let plans = runtime.block_on(strangler_cdc::check(&config))?;
            for p in &plans {
                println!(
                    "ok  {}.{} -> {}  ({} columns, key {})",
                    p.source.schema,
                    p.source.name,
                    p.target.quoted(),
                    p.mapping.outputs.len(),
                    p.target.key.join(", ")
                );
                match p.mapping.reverse(&p.source.key) {
                    strangler_cdc::mapping::Reverse::Derived(sql) => {
                        println!("    reverse (derived): {sql}")
                    }
                    strangler_cdc::mapping::Reverse::Explicit(why) => {
                        println!("    reverse: write it explicitly ({why})")
                    }
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        CdcCommand::Verify {
            config,
            output,
            wait_secs,
        } => {
            let config = strangler_cdc::CdcConfig::load(&config)?;
            let reports = runtime.block_on(strangler_cdc::verify::verify(
                &config,
                std::time::Duration::from_secs(wait_secs),
            ))?;
            let clean = reports.iter().all(|r| r.clean());
            match output {
                Output::Json => println!(
                    "{}",
                    serde_json::to_string_pretty(
                        &serde_json::json!({ "clean": clean, "tables": reports })
                    )?
                ),
                Output::Table => {
                    for r in &reports {
                        let verdict = if r.clean() { "clean" } else { "DIFFERENT" };
                        println!(
                            "{verdict:<9} {}  source {} rows, target {} rows, {} ranges, {:.2} s",
                            r.table, r.source_rows, r.target_rows, r.ranges_compared, r.seconds
                        );
                        let show = |what: &str, keys: &[String]| {
                            if !keys.is_empty() {
                                let head: Vec<&str> =
                                    keys.iter().take(20).map(String::as_str).collect();
                                println!(
                                    "  {what} ({}): {}{}",
                                    keys.len(),
                                    head.join(", "),
                                    if keys.len() > 20 { ", …" } else { "" }
                                );
                            }
                        };
                        show("missing in target", &r.missing);
                        show("only in target", &r.extra);
                        show("different", &r.different);
                    }
                }
            }
            Ok(if clean {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        CdcCommand::Resnapshot {
            config,
            table,
            wait_secs,
        } => {
            let config = strangler_cdc::CdcConfig::load(&config)?;
            let rows = runtime.block_on(strangler_cdc::resnapshot::request(
                &config,
                &table,
                std::time::Duration::from_secs(wait_secs),
            ))?;
            println!("re-copied {table}: {rows} rows; streaming continues");
            Ok(ExitCode::SUCCESS)
        }
        CdcCommand::Schema {
            from,
            to,
            tables,
            apply,
        } => {
            if to != "postgres" {
                anyhow::bail!("--to {to:?}: only postgres is supported");
            }
            let t = runtime.block_on(strangler_cdc::schema::from_mysql(&from, &tables))?;
            print!("{}", t.script());
            if let Some(url) = apply {
                runtime.block_on(async {
                    let (client, connection) =
                        tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
                    tokio::spawn(connection);
                    client
                        .batch_execute(&format!("BEGIN;\n{}COMMIT;", t.script()))
                        .await
                        .map_err(|e| {
                            anyhow::anyhow!(
                                "applying to {url}: {}",
                                e.as_db_error()
                                    .map_or_else(|| e.to_string(), |d| d.message().to_string())
                            )
                        })
                })?;
                eprintln!("applied {} statements", t.statements.len());
            }
            Ok(ExitCode::SUCCESS)
        }
        CdcCommand::Status { config, output } => {
            let config = strangler_cdc::CdcConfig::load(&config)?;
            let s = runtime.block_on(strangler_cdc::run::status(&config))?;
            match output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&s)?),
                Output::Table => {
                    let or = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
                    println!(
                        "slot          {} ({})",
                        s.slot,
                        if !s.slot_exists {
                            "missing"
                        } else if s.slot_active {
                            "active"
                        } else {
                            "inactive"
                        }
                    );
                    println!("source        {}", s.source_lsn);
                    println!("confirmed     {}", or(&s.confirmed_lsn));
                    println!("applied       {}", or(&s.applied_lsn));
                    println!(
                        "lag           {}",
                        s.lag_bytes.map_or("-".into(), |b| format!("{b} bytes"))
                    );
                    println!(
                        "retained WAL  {}",
                        s.retained_bytes
                            .map_or("-".into(), |b| format!("{b} bytes"))
                    );
                    println!(
                        "checkpoint    {}",
                        s.checkpoint_age_seconds
                            .map_or("-".into(), |a| format!("{a:.1} s ago"))
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
