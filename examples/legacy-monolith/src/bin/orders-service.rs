//! The new orders service: `orders-service --db postgres://… [--listen 127.0.0.1:4000] [--compat]`.

use clap::Parser;

/// The example's new orders service.
#[derive(Debug, Parser)]
struct Args {
    /// Its own PostgreSQL database.
    #[arg(long, env = "ORDERS_DATABASE_URL")]
    db: String,
    /// Where it listens.
    #[arg(long, default_value = "127.0.0.1:4000")]
    listen: std::net::SocketAddr,
    /// The fixed version: money exactly as the legacy shop prints it.
    #[arg(long, env = "ORDERS_COMPAT")]
    compat: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    // Reconnects after a database restart, as a pool would.
    let db = strangler_example::Db::connect(&args.db).await?;
    strangler_example::orders::migrate(&*db.get().await?).await?;
    tracing::info!(listen = %args.listen, compat = args.compat, "orders service listening");
    strangler_example::serve(args.listen, strangler_example::orders::app(db, args.compat)).await?;
    Ok(())
}
