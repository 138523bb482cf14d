//! strangler's collector owns the trace pipeline: OTLP receivers (gRPC and HTTP),
//! batching behind a bounded queue that pushes back instead of dropping, a disk
//! spool while ClickHouse is away, schema migrations and the old-vs-new
//! comparison queries the CLI and the web dashboard ask.
