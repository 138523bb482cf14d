//! `strangler`: one binary that runs strangler's services and operates routes.
//!
//! The CLI owns the user-facing edge: argument parsing (clap), turning library
//! errors into readable messages and exit codes, and wiring the router, collector
//! and CDC libraries into long-running processes.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Migrate a monolith to new services one route at a time.
#[derive(Debug, Parser)]
#[command(name = "strangler", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the example end to end: a monolith, a new service, traffic, a flip and a rollback.
    Demo,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Demo => {
            eprintln!(
                "strangler demo: the end-to-end demo is not built yet; it arrives with the \
                 example monolith (see examples/legacy-monolith/README.md)."
            );
            ExitCode::SUCCESS
        }
    }
}
