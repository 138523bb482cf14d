//! strangler's collector owns the trace pipeline: OTLP receivers (gRPC and HTTP),
//! a bounded queue that pushes back instead of dropping, batching into ClickHouse,
//! a disk spool while ClickHouse is away, schema migrations, and the old-vs-new
//! comparison queries the CLI and the web dashboard ask.

pub mod config;
pub mod metric_model;
pub mod metric_writer;
pub mod metrics;
pub mod model;
pub mod pipeline;
pub mod query;
pub mod receive;
pub mod rowbinary;
pub mod server;
pub mod spool;
pub mod store;
pub mod web;

pub use config::CollectorConfig;
pub use server::run;
