//! OTLP/HTTP: `POST /v1/traces` and `POST /v1/metrics` with protobuf or JSON
//! bodies, gzip accepted.

use std::io::Read;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use prost::Message;

use crate::metrics::Metrics;
use crate::pipeline::{Pipeline, SubmitError};
use crate::rowbinary::{Refused, encode_protobuf, encode_request};

/// Shared state of the HTTP receiver.
#[derive(Clone)]
pub struct HttpReceiver {
    /// Where spans go.
    pub pipeline: Pipeline,
    /// Where metric points go.
    pub metrics_writer: crate::metric_writer::MetricsWriter,
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
        .route("/v1/metrics", post(export_metrics))
        .route("/v1/logs", post(not_stored))
        .layer(axum::extract::DefaultBodyLimit::max(max))
        .with_state(receiver)
}

async fn not_stored() -> Response {
    plain(
        StatusCode::NOT_IMPLEMENTED,
        "strangler's collector stores traces and metrics only; send logs elsewhere",
    )
}

/// The body's encoding and its bytes, decompressed; or the refusal to send.
fn read_body(
    receiver: &HttpReceiver,
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<(Encoding, Bytes), Box<Response>> {
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
            return Err(Box::new(plain(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                format!(
                    "content-type {other:?} is not OTLP; use application/x-protobuf or application/json"
                ),
            )));
        }
    };
    let body = match headers
        .get(header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
    {
        None | Some("identity") => body.clone(),
        Some("gzip") => {
            let mut out = Vec::new();
            let limit = receiver.max_body_bytes as u64 + 1;
            match flate2::read::GzDecoder::new(&body[..])
                .take(limit)
                .read_to_end(&mut out)
            {
                Ok(_) if out.len() > receiver.max_body_bytes => {
                    receiver.metrics.malformed.inc();
                    return Err(Box::new(plain(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        format!(
                            "decompressed body exceeds {} bytes",
                            receiver.max_body_bytes
                        ),
                    )));
                }
                Ok(_) => Bytes::from(out),
                Err(e) => {
                    receiver.metrics.malformed.inc();
                    return Err(Box::new(plain(
                        StatusCode::BAD_REQUEST,
                        format!("body is not valid gzip: {e}"),
                    )));
                }
            }
        }
        Some(other) => {
            receiver.metrics.malformed.inc();
            return Err(Box::new(plain(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                format!("content-encoding {other:?} is not supported; use gzip or none"),
            )));
        }
    };
    Ok((encoding, body))
}

/// The body as the OTLP message `M` (named `what` in the refusal), in either
/// encoding; a malformed one is counted and refused with a 400 that says why.
fn decode<M: Message + Default + serde::de::DeserializeOwned>(
    receiver: &HttpReceiver,
    headers: &HeaderMap,
    body: &Bytes,
    what: &str,
) -> Result<(Encoding, M), Box<Response>> {
    let (encoding, body) = read_body(receiver, headers, body)?;
    let decoded = match encoding {
        Encoding::Protobuf => M::decode(&body[..]).map_err(|e| e.to_string()),
        Encoding::Json => serde_json::from_slice::<M>(&body).map_err(|e| e.to_string()),
    };
    match decoded {
        Ok(message) => Ok((encoding, message)),
        Err(e) => {
            receiver.metrics.malformed.inc();
            Err(Box::new(plain(
                StatusCode::BAD_REQUEST,
                format!("not an OTLP {what}: {e}"),
            )))
        }
    }
}

/// An empty OTLP export response in the request's encoding.
fn acknowledged(encoding: Encoding, protobuf: Vec<u8>) -> Response {
    match encoding {
        Encoding::Protobuf => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/x-protobuf")],
            protobuf,
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

/// A refusal the exporter should retry after a second.
fn retry_later(status: StatusCode, message: String) -> Response {
    let mut response = plain(status, message);
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    response
}

async fn export_metrics(
    State(receiver): State<HttpReceiver>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (encoding, request) = match decode::<ExportMetricsServiceRequest>(
        &receiver,
        &headers,
        &body,
        "ExportMetricsServiceRequest",
    ) {
        Ok(decoded) => decoded,
        Err(refused) => return *refused,
    };
    match receiver.metrics_writer.write(request).await {
        Ok(()) => acknowledged(
            encoding,
            ExportMetricsServiceResponse {
                partial_success: None,
            }
            .encode_to_vec(),
        ),
        Err(e) => retry_later(StatusCode::SERVICE_UNAVAILABLE, e),
    }
}

async fn export(State(receiver): State<HttpReceiver>, headers: HeaderMap, body: Bytes) -> Response {
    let (encoding, body) = match read_body(&receiver, &headers, &body) {
        Ok(read) => read,
        Err(refused) => return *refused,
    };
    // Protobuf bodies become rows without the OTLP types in between; JSON ones
    // are decoded into them first.
    let encoded = match encoding {
        Encoding::Protobuf => encode_protobuf(&body),
        Encoding::Json => serde_json::from_slice::<ExportTraceServiceRequest>(&body)
            .map_err(|e| Refused::Decode(e.to_string()))
            .and_then(|request| Ok(encode_request(&request)?)),
    };
    let spans = match encoded {
        Ok(spans) => spans,
        Err(e) => {
            receiver.metrics.malformed.inc();
            return plain(StatusCode::BAD_REQUEST, e.to_string());
        }
    };
    match receiver.pipeline.submit(spans).await {
        Ok(()) => acknowledged(
            encoding,
            ExportTraceServiceResponse {
                partial_success: None,
            }
            .encode_to_vec(),
        ),
        Err(e @ SubmitError::Busy { .. }) => {
            retry_later(StatusCode::TOO_MANY_REQUESTS, e.to_string())
        }
        Err(e @ SubmitError::Unavailable(_)) => {
            retry_later(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
        }
        Err(e @ SubmitError::TooLarge { .. }) => {
            plain(StatusCode::PAYLOAD_TOO_LARGE, e.to_string())
        }
    }
}
