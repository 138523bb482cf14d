//! `strangler`: one binary that runs strangler's services and operates routes.
//!
//! The CLI owns the user-facing edge: argument parsing (clap), turning library
//! errors into readable messages and exit codes, and wiring the router, collector
//! and CDC libraries into long-running processes.

mod commands;
mod control;
#[cfg(feature = "demo")]
mod demo;
mod output;
mod rollout;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand, ValueEnum};

use control::lifecycle::Percent;

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
    /// Across routes: which endpoint to move next.
    Routes {
        #[command(subcommand)]
        command: RoutesCommand,
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
    /// Write a starting strangler.toml, flags.json and collector.toml for a monolith
    /// (every route starts on legacy). Refuses to overwrite without --force.
    Init {
        /// The monolith: http://127.0.0.1:3000 or 127.0.0.1:3000.
        #[arg(long)]
        legacy: String,
        /// The new service that takes routes over.
        #[arg(long)]
        new: Option<String>,
        /// A route to the new service, NAME=PREFIX (e.g. orders=/api/orders); repeatable.
        #[arg(long = "route", value_name = "NAME=PREFIX")]
        routes: Vec<String>,
        /// Read flags from this Unleash server (its client API URL) instead of flags.json.
        #[arg(long)]
        unleash: Option<String>,
        /// Where the router listens.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: String,
        /// Where the router's admin API listens.
        #[arg(long, default_value = "127.0.0.1:9080")]
        admin: String,
        /// The directory to write into.
        #[arg(long, default_value = ".")]
        dir: PathBuf,
        /// Overwrite files that already exist.
        #[arg(long)]
        force: bool,
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

/// `strangler routes …`.
#[derive(Debug, Subcommand)]
enum RoutesCommand {
    /// The traffic legacy still serves, grouped into endpoint templates
    /// (`/api/orders/{id}`): requests/min, share, errors, p50/p99, and whether a route
    /// already covers it. From the collector's stored traces.
    Suggest {
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
        /// How many endpoints to list.
        #[arg(long, default_value_t = 20)]
        top: usize,
        /// Output format.
        #[arg(long, short, value_enum, default_value = "table")]
        output: Output,
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
        /// Print the DDL for this ClickHouse cluster (a `remote_servers` name):
        /// replicated local tables and distributed tables, `ON CLUSTER`.
        #[arg(long)]
        cluster: Option<String>,
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
    /// Validate a config file without starting anything; prints what is wrong with line numbers.
    Check {
        /// The config file.
        file: PathBuf,
        /// What the file configures.
        #[arg(long, value_enum, default_value = "router")]
        kind: ConfigKind,
    },
}

/// Which service a config file is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ConfigKind {
    /// `strangler router run` (also the CLI's `[control]`).
    Router,
    /// `strangler collector run`.
    Collector,
    /// `strangler cdc run`.
    Cdc,
}

/// Services log strangler's own information (reloads, breaker changes, progress)
/// and every crate's warnings and errors; dependencies' info lines stay out.
const SERVICE_LOG: &str =
    "warn,strangler=info,strangler_router=info,strangler_collector=info,strangler_cdc=info";
/// One-shot commands and the demo: warnings and errors only, so their output is
/// what the user asked for.
#[cfg_attr(not(feature = "demo"), allow(dead_code))]
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

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Router {
            command: RouterCommand::Run { config, upgrade },
        } => commands::router::run(&config, upgrade),
        Command::Config {
            command: ConfigCommand::Check { file, kind },
        } => commands::config::check(&file, kind),
        Command::Route(args) => commands::route::route(args),
        Command::Rollout {
            command:
                RolloutCommand::Run {
                    config,
                    dry_run,
                    actor,
                },
        } => commands::rollout::run(&config, actor, dry_run),
        Command::Compare {
            route,
            since,
            collector,
            top,
            output,
        } => commands::collector::compare(&route, &since, &collector, top, output),
        Command::Collector {
            command: CollectorCommand::Run { config },
        } => commands::collector::run(config.as_deref()),
        Command::Collector {
            command: CollectorCommand::Schema { database, cluster },
        } => {
            print!(
                "{}",
                strangler_collector::store::clickhouse::schema_sql(&database, cluster.as_deref())
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Cdc { command } => commands::cdc::run(command),
        Command::Routes {
            command:
                RoutesCommand::Suggest {
                    since,
                    collector,
                    top,
                    output,
                },
        } => commands::routes::suggest(&since, &collector, top, output),
        Command::Init {
            legacy,
            new,
            routes,
            unleash,
            listen,
            admin,
            dir,
            force,
        } => commands::init::run(&commands::init::InitOptions {
            legacy,
            new,
            routes,
            unleash,
            listen,
            admin,
            dir,
            force,
        }),
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
        } => commands::demo::run(!no_walkthrough, exit),
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
