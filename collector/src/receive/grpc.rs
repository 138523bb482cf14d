//! OTLP/gRPC `TraceService` and `MetricsService` (gzip accepted).

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse;
use tonic::codec::CompressionEncoding;
use tonic::{Code, Request, Response, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::metrics::Metrics;
use crate::pipeline::{Pipeline, SubmitError};
use crate::rowbinary::encode_protobuf;

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

impl GrpcReceiver {
    /// Stores one export's spans, from the message's bytes.
    async fn export(&self, body: &[u8]) -> Result<(), Status> {
        let spans = encode_protobuf(body).map_err(|e| {
            self.metrics.malformed.inc();
            Status::invalid_argument(e.to_string())
        })?;
        self.pipeline
            .submit(spans)
            .await
            .map_err(|e| status_for(&e))
    }
}

/// The OTLP/gRPC trace service, served without decoding the request into the OTLP
/// types: the codec hands over the message's bytes and the receiver reads them in
/// place into rows ([`encode_protobuf`]). Everything else is tonic's: framing,
/// gzip, the size limit, status codes.
#[derive(Clone)]
pub struct TraceServer {
    receiver: Arc<GrpcReceiver>,
    max_decoding_message_size: usize,
}

impl TraceServer {
    /// The service over `receiver`, refusing messages over `max_decoding_message_size`.
    pub fn new(receiver: GrpcReceiver, max_decoding_message_size: usize) -> Self {
        Self {
            receiver: Arc::new(receiver),
            max_decoding_message_size,
        }
    }
}

impl tonic::server::NamedService for TraceServer {
    const NAME: &'static str = "opentelemetry.proto.collector.trace.v1.TraceService";
}

type BoxFuture<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send + 'static>>;

impl<B> tonic::codegen::Service<http::Request<B>> for TraceServer
where
    B: tonic::codegen::Body + Send + 'static,
    B::Error: Into<tonic::codegen::StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> BoxFuture<Self::Response, Infallible> {
        if req.uri().path() != "/opentelemetry.proto.collector.trace.v1.TraceService/Export" {
            return Box::pin(async move {
                Ok(Status::unimplemented("only TraceService/Export is served").into_http())
            });
        }
        let export = Export(Arc::clone(&self.receiver));
        let max = self.max_decoding_message_size;
        Box::pin(async move {
            let mut grpc = tonic::server::Grpc::new(RawCodec)
                .accept_compressed(CompressionEncoding::Gzip)
                .send_compressed(CompressionEncoding::Gzip)
                .max_decoding_message_size(max);
            Ok(grpc.unary(export, req).await)
        })
    }
}

struct Export(Arc<GrpcReceiver>);

impl tonic::server::UnaryService<Bytes> for Export {
    type Response = ExportTraceServiceResponse;
    type Future = BoxFuture<Response<ExportTraceServiceResponse>, Status>;

    fn call(&mut self, request: Request<Bytes>) -> Self::Future {
        let receiver = Arc::clone(&self.0);
        Box::pin(async move {
            receiver.export(request.get_ref()).await?;
            Ok(Response::new(ExportTraceServiceResponse {
                partial_success: None,
            }))
        })
    }
}

/// Requests as their bytes; responses as protobuf.
#[derive(Debug, Clone, Copy, Default)]
struct RawCodec;

impl tonic::codec::Codec for RawCodec {
    type Encode = ExportTraceServiceResponse;
    type Decode = Bytes;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }

    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl tonic::codec::Decoder for RawCodec {
    type Item = Bytes;
    type Error = Status;

    fn decode(&mut self, buf: &mut tonic::codec::DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        // The message's bytes, without copying them.
        Ok(Some(buf.copy_to_bytes(buf.remaining())))
    }
}

impl tonic::codec::Encoder for RawCodec {
    type Item = ExportTraceServiceResponse;
    type Error = Status;

    fn encode(
        &mut self,
        item: ExportTraceServiceResponse,
        buf: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), Status> {
        prost::Message::encode(&item, buf).map_err(|e| Status::internal(e.to_string()))
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
