//! Running the collector: migrations, the pipeline, the receivers and the web port.

use std::sync::Arc;

use tonic::codec::CompressionEncoding;

use crate::config::CollectorConfig;
use crate::metrics::Metrics;
use crate::pipeline::Pipeline;
use crate::receive::grpc::{GrpcReceiver, TraceServer};
use crate::receive::http::{HttpReceiver, router as otlp_http_router};
use crate::spool::{Spool, SpoolError};
use crate::store::StoreError;
use crate::store::clickhouse::ClickHouseStore;
use crate::web::{WebState, router as web_router};

/// Why the collector stopped or could not start.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// A port is taken.
    #[error("cannot listen on {addr}")]
    Listen {
        /// The address.
        addr: std::net::SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The spool directory is unusable.
    #[error(transparent)]
    Spool(#[from] SpoolError),
    /// A server failed.
    #[error("{0} server failed: {1}")]
    Server(&'static str, String),
}

/// Runs the collector until SIGINT or SIGTERM. ClickHouse being down at start is not
/// fatal: spans are spooled and the schema is applied once it answers.
pub async fn run(config: CollectorConfig) -> Result<(), RunError> {
    let metrics = Metrics::new();
    let store = Arc::new(ClickHouseStore::new(
        &config.clickhouse_url,
        &config.database,
        config.user.as_deref(),
        config.password.as_deref(),
        config.compress,
        config.cluster.as_deref(),
    ));
    let spool = Arc::new(Spool::open(&config.spool_dir, config.spool_max_bytes)?);
    if spool.used_bytes() > 0 {
        tracing::info!(
            bytes = spool.used_bytes(),
            "spool holds batches from a previous run; they will be replayed"
        );
    }
    let grpc = tokio::net::TcpListener::bind(config.grpc_listen)
        .await
        .map_err(|source| RunError::Listen {
            addr: config.grpc_listen,
            source,
        })?;
    let http = tokio::net::TcpListener::bind(config.http_listen)
        .await
        .map_err(|source| RunError::Listen {
            addr: config.http_listen,
            source,
        })?;
    let web = tokio::net::TcpListener::bind(config.web_listen)
        .await
        .map_err(|source| RunError::Listen {
            addr: config.web_listen,
            source,
        })?;

    // Migrate in the background: the receivers and the spool work without ClickHouse.
    let migrator = Arc::clone(&store);
    tokio::spawn(async move {
        loop {
            match migrator.migrate().await {
                Ok(applied) => {
                    tracing::info!(?applied, "ClickHouse schema up to date");
                    return;
                }
                Err(StoreError::Rejected(e)) => {
                    tracing::error!("ClickHouse rejected a migration, fix it and restart: {e}");
                    return;
                }
                Err(e) => {
                    tracing::warn!("ClickHouse not ready for migrations, retrying in 2 s: {e}");
                    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
                }
            }
        }
    });

    let pipeline = Pipeline::start(store.clone(), spool, config.pipeline, metrics.clone());
    let grpc_service = TraceServer::new(
        GrpcReceiver::new(pipeline.clone(), metrics.clone()),
        config.max_body_bytes,
    );
    // Metric points spool next to the spans, in a folder of their own.
    let metric_spool = Arc::new(Spool::open(
        &config.spool_dir.join("metrics"),
        config.spool_max_bytes,
    )?);
    let metrics_writer = crate::metric_writer::MetricsWriter::start(
        Arc::clone(&store),
        metric_spool,
        metrics.clone(),
        config.pipeline.insert_timeout,
    );
    let metrics_service = opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::MetricsServiceServer::new(
        crate::receive::grpc::GrpcMetricsReceiver::new(metrics_writer.clone()),
    )
    .accept_compressed(CompressionEncoding::Gzip)
    .send_compressed(CompressionEncoding::Gzip)
    .max_decoding_message_size(config.max_body_bytes);
    let grpc_server = tonic::transport::Server::builder()
        .add_service(grpc_service)
        .add_service(metrics_service)
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(grpc),
            shutdown(),
        );
    let http_app = otlp_http_router(HttpReceiver {
        pipeline,
        metrics_writer,
        metrics: metrics.clone(),
        max_body_bytes: config.max_body_bytes,
    });
    let http_server = axum::serve(http, http_app).with_graceful_shutdown(shutdown());
    let web_server = axum::serve(
        web,
        web_router(WebState {
            store,
            metrics,
            token: config.web_token.as_deref().map(Arc::from),
        }),
    )
    .with_graceful_shutdown(shutdown());
    tracing::info!(
        grpc = %config.grpc_listen,
        http = %config.http_listen,
        web = %config.web_listen,
        clickhouse = %config.clickhouse_url,
        "strangler collector running"
    );
    let (g, h, w) = tokio::join!(
        grpc_server,
        http_server.into_future(),
        web_server.into_future()
    );
    g.map_err(|e| RunError::Server("gRPC", e.to_string()))?;
    h.map_err(|e| RunError::Server("OTLP/HTTP", e.to_string()))?;
    w.map_err(|e| RunError::Server("web", e.to_string()))?;
    Ok(())
}

async fn shutdown() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
