//! `strangler`: one binary that runs strangler's services and operates routes.
//!
//! The CLI owns the user-facing edge: argument parsing (clap), turning library
//! errors into readable messages and exit codes, and wiring the router, collector
//! and CDC libraries into long-running processes.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use strangler_router::RouterConfig;

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
    /// Run the example end to end: a monolith, a new service, traffic, a flip and a rollback.
    Demo,
}

#[derive(Debug, Subcommand)]
enum RouterCommand {
    /// Start the router in the foreground (SIGTERM for a graceful stop, SIGHUP to reload).
    Run {
        /// The router config file.
        #[arg(
            long,
            short,
            env = "STRANGLER_CONFIG",
            default_value = "strangler.toml"
        )]
        config: PathBuf,
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

fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("STRANGLER_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Router {
            command: RouterCommand::Run { config },
        } => {
            let parsed = RouterConfig::load(&config)?;
            init_logging(parsed.telemetry.json_logs);
            strangler_router::run(&config)
                .with_context(|| format!("starting the router from {}", config.display()))?;
            Ok(())
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
            Ok(())
        }
        Command::Demo => {
            eprintln!(
                "strangler demo: the end-to-end demo is not built yet; it arrives with the \
                 example monolith (see examples/legacy-monolith/README.md)."
            );
            Ok(())
        }
    }
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("strangler: {e:#}");
            ExitCode::FAILURE
        }
    }
}
