//! OTLP/HTTP: `POST /v1/traces` with protobuf or JSON bodies, gzip accepted.

use std::io::Read;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use prost::Message;

use crate::metrics::Metrics;
use crate::model::rows_from_request;
use crate::pipeline::{Pipeline, SubmitError};

/// Shared state of the HTTP receiver.
#[derive(Clone)]
pub struct HttpReceiver {
    /// Where spans go.
    pub pipeline: Pipeline,
    /// Counters.
    pub metrics: Metrics,
    /// Largest body accepted, before and after decompression.
    pub max_body_bytes: usize,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Encoding {
    Protobuf,
    Json,
}

fn plain(status: StatusCode, message: impl Into<String>) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        message.into(),
    )
        .into_response()
}

/// The router for port 4318.
pub fn router(receiver: HttpReceiver) -> axum::Router {
    let max = receiver.max_body_bytes;
    axum::Router::new()
        .route("/v1/traces", post(export))
        .route("/v1/metrics", post(metrics_over_grpc_only))
        .route("/v1/logs", post(not_stored))
        .layer(axum::extract::DefaultBodyLimit::max(max))
        .with_state(receiver)
}

async fn metrics_over_grpc_only() -> Response {
    plain(
        StatusCode::NOT_IMPLEMENTED,
        "strangler's collector takes OTLP metrics over gRPC (port 4317) only, for now",
    )
}

async fn not_stored() -> Response {
    plain(
        StatusCode::NOT_IMPLEMENTED,
        "strangler's collector stores traces only; send metrics and logs elsewhere",
    )
}

async fn export(State(receiver): State<HttpReceiver>, headers: HeaderMap, body: Bytes) -> Response {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    let encoding = match content_type.as_str() {
        "application/x-protobuf" | "application/protobuf" => Encoding::Protobuf,
        "application/json" => Encoding::Json,
        other => {
            receiver.metrics.malformed.inc();
            return plain(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                format!(
                    "content-type {other:?} is not OTLP; use application/x-protobuf or application/json"
                ),
            );
        }
    };
    let body = match headers
        .get(header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
    {
        None | Some("identity") => body.to_vec(),
        Some("gzip") => {
            let mut out = Vec::new();
            let limit = receiver.max_body_bytes as u64 + 1;
            match flate2::read::GzDecoder::new(&body[..])
                .take(limit)
                .read_to_end(&mut out)
            {
                Ok(_) if out.len() > receiver.max_body_bytes => {
                    receiver.metrics.malformed.inc();
                    return plain(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        format!(
                            "decompressed body exceeds {} bytes",
                            receiver.max_body_bytes
                        ),
                    );
                }
                Ok(_) => out,
                Err(e) => {
                    receiver.metrics.malformed.inc();
                    return plain(
                        StatusCode::BAD_REQUEST,
                        format!("body is not valid gzip: {e}"),
                    );
                }
            }
        }
        Some(other) => {
            receiver.metrics.malformed.inc();
            return plain(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                format!("content-encoding {other:?} is not supported; use gzip or none"),
            );
        }
    };
    let request = match encoding {
        Encoding::Protobuf => {
            ExportTraceServiceRequest::decode(&body[..]).map_err(|e| e.to_string())
        }
        Encoding::Json => {
            serde_json::from_slice::<ExportTraceServiceRequest>(&body).map_err(|e| e.to_string())
        }
    };
    let request = match request {
        Ok(r) => r,
        Err(e) => {
            receiver.metrics.malformed.inc();
            return plain(
                StatusCode::BAD_REQUEST,
                format!("not an OTLP ExportTraceServiceRequest: {e}"),
            );
        }
    };
    let rows = match rows_from_request(request) {
        Ok(rows) => rows,
        Err(e) => {
            receiver.metrics.malformed.inc();
            return plain(StatusCode::BAD_REQUEST, e.to_string());
        }
    };
    match receiver.pipeline.submit(rows).await {
        Ok(()) => {
            let response = ExportTraceServiceResponse {
                partial_success: None,
            };
            match encoding {
                Encoding::Protobuf => (
                    StatusCode::OK,
                    [(header::CONTENT_TYPE, "application/x-protobuf")],
                    response.encode_to_vec(),
                )
                    .into_response(),
                Encoding::Json => (
                    StatusCode::OK,
                    [(header::CONTENT_TYPE, "application/json")],
                    "{}",
                )
                    .into_response(),
            }
        }
        Err(e @ (SubmitError::Busy { .. } | SubmitError::Unavailable(_))) => {
            let status = if matches!(e, SubmitError::Busy { .. }) {
                StatusCode::TOO_MANY_REQUESTS
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            let mut response = plain(status, e.to_string());
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            response
        }
        Err(e @ SubmitError::TooLarge { .. }) => {
            plain(StatusCode::PAYLOAD_TOO_LARGE, e.to_string())
        }
    }
}
