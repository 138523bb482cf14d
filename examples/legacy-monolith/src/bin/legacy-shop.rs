//! The legacy shop monolith: `legacy-shop --db postgres://… [--listen 127.0.0.1:3000] [--seed]`.

use clap::Parser;

/// The example's legacy monolith.
#[derive(Debug, Parser)]
struct Args {
    /// Its PostgreSQL database.
    #[arg(long, env = "LEGACY_DATABASE_URL")]
    db: String,
    /// Where it listens.
    #[arg(long, default_value = "127.0.0.1:3000")]
    listen: std::net::SocketAddr,
    /// Create the schema and load the demo data.
    #[arg(long)]
    seed: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    // Reconnects after a database restart, as a pool would.
    let db = strangler_example::Db::connect(&args.db).await?;
    strangler_example::legacy::migrate(&*db.get().await?, args.seed).await?;
    tracing::info!(listen = %args.listen, "legacy shop listening");
    strangler_example::serve(args.listen, strangler_example::legacy::app(db)).await?;
    Ok(())
}
