//! OTLP/gRPC `TraceService` and `MetricsService` (gzip accepted).

use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::TraceService;
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use tonic::{Code, Request, Response, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::metrics::Metrics;
use crate::model::rows_from_request;
use crate::pipeline::{Pipeline, SubmitError};

/// How long exporters are told to wait before retrying a refused export.
pub const RETRY_AFTER: Duration = Duration::from_secs(1);

/// The gRPC receiver.
pub struct GrpcReceiver {
    pipeline: Pipeline,
    metrics: Metrics,
}

impl GrpcReceiver {
    /// A receiver feeding `pipeline`.
    pub fn new(pipeline: Pipeline, metrics: Metrics) -> Self {
        Self { pipeline, metrics }
    }
}

/// The gRPC status for a refused export. Queue full is `RESOURCE_EXHAUSTED` with a
/// `RetryInfo`, which the OTLP spec makes retryable; a store and spool both down is
/// `UNAVAILABLE`, always retryable.
pub fn status_for(error: &SubmitError) -> Status {
    match error {
        SubmitError::Busy { .. } => Status::with_error_details(
            Code::ResourceExhausted,
            error.to_string(),
            ErrorDetails::with_retry_info(Some(RETRY_AFTER)),
        ),
        SubmitError::Unavailable(_) => Status::unavailable(error.to_string()),
        SubmitError::TooLarge { .. } => Status::invalid_argument(error.to_string()),
    }
}

#[tonic::async_trait]
impl TraceService for GrpcReceiver {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        let rows = rows_from_request(request.into_inner()).map_err(|e| {
            self.metrics.malformed.inc();
            Status::invalid_argument(e.to_string())
        })?;
        self.pipeline
            .submit(rows)
            .await
            .map_err(|e| status_for(&e))?;
        Ok(Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

/// The gRPC metrics receiver (see [`crate::metric_writer::MetricsWriter`]).
pub struct GrpcMetricsReceiver {
    writer: crate::metric_writer::MetricsWriter,
}

impl GrpcMetricsReceiver {
    /// A receiver storing through `writer`.
    pub fn new(writer: crate::metric_writer::MetricsWriter) -> Self {
        Self { writer }
    }
}

#[tonic::async_trait]
impl opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::MetricsService
    for GrpcMetricsReceiver
{
    async fn export(
        &self,
        request: Request<
            opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest,
        >,
    ) -> Result<
        Response<opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceResponse>,
        Status,
    > {
        self.writer
            .write(request.into_inner())
            .await
            .map_err(Status::unavailable)?;
        Ok(Response::new(
            opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceResponse {
                partial_success: None,
            },
        ))
    }
}
