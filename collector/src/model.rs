//! The span row stored in ClickHouse, and its conversion from OTLP.

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use opentelemetry_proto::tonic::trace::v1::status::StatusCode;
use serde::{Deserialize, Serialize};
use strangler_model::names::attr;

/// One span as a ClickHouse row. Field order is the column order of the `spans` table.
#[derive(Debug, Clone, Default, PartialEq, clickhouse::Row, Serialize, Deserialize)]
pub struct SpanRow {
    /// Start, seconds since the epoch (`DateTime`, for partitioning and time filters).
    pub start_time: u32,
    /// Start, nanoseconds since the epoch.
    pub start_time_ns: u64,
    /// End, nanoseconds since the epoch.
    pub end_time_ns: u64,
    /// `end - start`, nanoseconds (0 when the end is before the start).
    pub duration_ns: u64,
    /// 32 lowercase hex characters.
    pub trace_id: String,
    /// 16 lowercase hex characters.
    pub span_id: String,
    /// Empty for a root span.
    pub parent_span_id: String,
    /// Span name.
    pub name: String,
    /// `server`, `client`, `internal`, `producer`, `consumer` or `unspecified`.
    pub kind: String,
    /// `unset`, `ok` or `error`.
    pub status_code: String,
    /// Status message.
    pub status_message: String,
    /// `service.name` of the resource.
    pub service: String,
    /// `strangler.route`.
    pub route: String,
    /// `strangler.backend`.
    pub backend: String,
    /// `strangler.decision`.
    pub decision: String,
    /// `strangler.diff`.
    pub diff: String,
    /// `strangler.diff.paths`.
    pub diff_paths: String,
    /// `strangler.pair_id`.
    pub pair_id: String,
    /// 1 on a shadow copy (`strangler.shadow`).
    pub shadow: u8,
    /// `http.request.method`.
    pub http_method: String,
    /// `http.response.status_code`, 0 when absent.
    pub http_status: u16,
    /// Resource attribute keys.
    pub resource_keys: Vec<String>,
    /// Resource attribute values, as strings.
    pub resource_values: Vec<String>,
    /// Span attribute keys.
    pub attr_keys: Vec<String>,
    /// Span attribute values, as strings.
    pub attr_values: Vec<String>,
    /// Instrumentation scope name.
    pub scope_name: String,
    /// Events as a JSON array (name, time, attributes).
    pub events_json: String,
    /// Links as a JSON array (trace id, span id, attributes).
    pub links_json: String,
}

/// Why a request's spans cannot be stored.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum InvalidSpan {
    /// A trace id that is not 16 bytes or is all zeros.
    #[error("span {index}: trace_id must be 16 bytes and not all zero (got {len} bytes)")]
    TraceId {
        /// Position in the request.
        index: usize,
        /// Length seen.
        len: usize,
    },
    /// A span id that is not 8 bytes or is all zeros.
    #[error("span {index}: span_id must be 8 bytes and not all zero (got {len} bytes)")]
    SpanId {
        /// Position in the request.
        index: usize,
        /// Length seen.
        len: usize,
    },
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 0xf) as usize] as char);
    }
    s
}

/// Like [`value_to_string`], but moves a string value out instead of copying it.
fn value_into_string(value: Option<AnyValue>) -> String {
    match value {
        Some(AnyValue {
            value: Some(any_value::Value::StringValue(s)),
        }) => s,
        other => value_to_string(other.as_ref()),
    }
}

/// The string form of any OTLP value: strings as is, numbers and booleans in their
/// usual text, bytes as hex, arrays and key/value lists as JSON.
pub fn value_to_string(value: Option<&AnyValue>) -> String {
    match value.and_then(|v| v.value.as_ref()) {
        None => String::new(),
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::BoolValue(b)) => b.to_string(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(any_value::Value::DoubleValue(d)) => d.to_string(),
        Some(any_value::Value::BytesValue(b)) => hex(b),
        Some(other) => value_to_json(Some(other)).to_string(),
    }
}

fn value_to_json(value: Option<&any_value::Value>) -> serde_json::Value {
    use serde_json::Value as J;
    match value {
        None => J::Null,
        Some(any_value::Value::StringValue(s)) => J::String(s.clone()),
        Some(any_value::Value::BoolValue(b)) => J::Bool(*b),
        Some(any_value::Value::IntValue(i)) => J::from(*i),
        Some(any_value::Value::DoubleValue(d)) => {
            serde_json::Number::from_f64(*d).map_or(J::String(d.to_string()), J::Number)
        }
        Some(any_value::Value::BytesValue(b)) => J::String(hex(b)),
        Some(any_value::Value::ArrayValue(a)) => J::Array(
            a.values
                .iter()
                .map(|v| value_to_json(v.value.as_ref()))
                .collect(),
        ),
        Some(any_value::Value::KvlistValue(kv)) => J::Object(
            kv.values
                .iter()
                .map(|kv| {
                    (
                        kv.key.clone(),
                        value_to_json(kv.value.as_ref().and_then(|v| v.value.as_ref())),
                    )
                })
                .collect(),
        ),
        // Newer OTLP value kinds we do not know keep a readable form.
        #[allow(unreachable_patterns)]
        Some(other) => J::String(format!("{other:?}")),
    }
}

fn attrs(list: Vec<KeyValue>) -> (Vec<String>, Vec<String>) {
    let mut keys = Vec::with_capacity(list.len());
    let mut values = Vec::with_capacity(list.len());
    for kv in list {
        keys.push(kv.key);
        values.push(value_into_string(kv.value));
    }
    (keys, values)
}

fn find<'a>(keys: &'a [String], values: &'a [String], key: &str) -> Option<&'a str> {
    keys.iter()
        .position(|k| k == key)
        .map(|i| values[i].as_str())
}

pub(crate) fn attrs_json(list: &[KeyValue]) -> serde_json::Value {
    serde_json::Value::Object(
        list.iter()
            .map(|kv| {
                (
                    kv.key.clone(),
                    value_to_json(kv.value.as_ref().and_then(|v| v.value.as_ref())),
                )
            })
            .collect(),
    )
}

/// Turns an OTLP export request into rows, rejecting the request if any span has
/// an invalid identity (the OTLP spec makes that a client error). Takes the request
/// by value so decoded strings move into the rows instead of being copied.
pub fn rows_from_request(request: ExportTraceServiceRequest) -> Result<Vec<SpanRow>, InvalidSpan> {
    let index = crate::rowbinary::validate(&request)?;
    let mut rows = Vec::with_capacity(index);
    for rs in request.resource_spans {
        let (resource_keys, resource_values) =
            rs.resource.map(|r| attrs(r.attributes)).unwrap_or_default();
        let service = find(&resource_keys, &resource_values, "service.name")
            .unwrap_or("")
            .to_string();
        for ss in rs.scope_spans {
            let scope_name = ss.scope.map(|s| s.name).unwrap_or_default();
            for span in ss.spans {
                let events: Vec<serde_json::Value> = span
                    .events
                    .iter()
                    .map(|e| serde_json::json!({"name": e.name, "time_ns": e.time_unix_nano, "attributes": attrs_json(&e.attributes)}))
                    .collect();
                let links: Vec<serde_json::Value> = span
                    .links
                    .iter()
                    .map(|l| serde_json::json!({"trace_id": hex(&l.trace_id), "span_id": hex(&l.span_id), "attributes": attrs_json(&l.attributes)}))
                    .collect();
                let (attr_keys, attr_values) = attrs(span.attributes);
                let get = |k: &str| find(&attr_keys, &attr_values, k).unwrap_or("").to_string();
                let (status_code, status_message) = match span.status {
                    Some(s) => (
                        match StatusCode::try_from(s.code).unwrap_or(StatusCode::Unset) {
                            StatusCode::Ok => "ok",
                            StatusCode::Error => "error",
                            StatusCode::Unset => "unset",
                        },
                        s.message,
                    ),
                    None => ("unset", String::new()),
                };
                rows.push(SpanRow {
                    start_time: u32::try_from(span.start_time_unix_nano / 1_000_000_000)
                        .unwrap_or(u32::MAX),
                    start_time_ns: span.start_time_unix_nano,
                    end_time_ns: span.end_time_unix_nano,
                    duration_ns: span
                        .end_time_unix_nano
                        .saturating_sub(span.start_time_unix_nano),
                    trace_id: hex(&span.trace_id),
                    span_id: hex(&span.span_id),
                    parent_span_id: hex(&span.parent_span_id),
                    name: span.name,
                    kind: match SpanKind::try_from(span.kind).unwrap_or(SpanKind::Unspecified) {
                        SpanKind::Server => "server",
                        SpanKind::Client => "client",
                        SpanKind::Internal => "internal",
                        SpanKind::Producer => "producer",
                        SpanKind::Consumer => "consumer",
                        SpanKind::Unspecified => "unspecified",
                    }
                    .into(),
                    status_code: status_code.into(),
                    status_message,
                    service: service.clone(),
                    route: get(attr::ROUTE),
                    backend: get(attr::BACKEND),
                    decision: get(attr::DECISION),
                    diff: get(attr::DIFF),
                    diff_paths: get(attr::DIFF_PATHS),
                    pair_id: get(attr::PAIR_ID),
                    shadow: u8::from(get(attr::SHADOW) == "true"),
                    http_method: get(attr::HTTP_METHOD),
                    http_status: get(attr::HTTP_STATUS).parse().unwrap_or(0),
                    resource_keys: resource_keys.clone(),
                    resource_values: resource_values.clone(),
                    attr_keys,
                    attr_values,
                    scope_name: scope_name.clone(),
                    events_json: if events.is_empty() {
                        "[]".into()
                    } else {
                        serde_json::Value::Array(events).to_string()
                    },
                    links_json: if links.is_empty() {
                        "[]".into()
                    } else {
                        serde_json::Value::Array(links).to_string()
                    },
                });
            }
        }
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use opentelemetry_proto::tonic::common::v1::{ArrayValue, KeyValueList};
    use opentelemetry_proto::tonic::resource::v1::Resource;
    use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span, Status};

    use super::*;

    fn kv(key: &str, value: any_value::Value) -> KeyValue {
        KeyValue {
            key: key.into(),
            value: Some(AnyValue { value: Some(value) }),
            ..Default::default()
        }
    }

    fn request(span: Span) -> ExportTraceServiceRequest {
        ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(Resource {
                    attributes: vec![kv(
                        "service.name",
                        any_value::Value::StringValue("router".into()),
                    )],
                    ..Default::default()
                }),
                scope_spans: vec![ScopeSpans {
                    spans: vec![span],
                    ..Default::default()
                }],
                ..Default::default()
            }],
        }
    }

    fn span() -> Span {
        Span {
            trace_id: vec![0x4b; 16],
            span_id: vec![0x01; 8],
            name: "GET /api/orders".into(),
            kind: SpanKind::Server as i32,
            start_time_unix_nano: 1_700_000_000_000_000_000,
            end_time_unix_nano: 1_700_000_000_002_500_000,
            status: Some(Status {
                code: StatusCode::Error as i32,
                message: "boom".into(),
            }),
            attributes: vec![
                kv(attr::ROUTE, any_value::Value::StringValue("orders".into())),
                kv(attr::BACKEND, any_value::Value::StringValue("new".into())),
                kv(attr::SHADOW, any_value::Value::BoolValue(true)),
                kv(attr::HTTP_STATUS, any_value::Value::IntValue(503)),
                kv("bytes", any_value::Value::BytesValue(vec![0xde, 0xad])),
                kv(
                    "list",
                    any_value::Value::ArrayValue(ArrayValue {
                        values: vec![
                            AnyValue {
                                value: Some(any_value::Value::IntValue(1)),
                            },
                            AnyValue {
                                value: Some(any_value::Value::StringValue("x".into())),
                            },
                        ],
                    }),
                ),
                kv(
                    "map",
                    any_value::Value::KvlistValue(KeyValueList {
                        values: vec![kv("a", any_value::Value::DoubleValue(1.5))],
                    }),
                ),
            ],
            ..Default::default()
        }
    }

    #[test]
    fn spans_become_rows_with_promoted_strangler_attributes() {
        let rows = rows_from_request(request(span())).expect("valid");
        let r = &rows[0];
        assert_eq!(r.trace_id, "4b".repeat(16));
        assert_eq!(r.span_id, "01".repeat(8));
        assert_eq!(r.duration_ns, 2_500_000);
        assert_eq!(r.start_time, 1_700_000_000);
        assert_eq!(
            (
                r.route.as_str(),
                r.backend.as_str(),
                r.shadow,
                r.http_status
            ),
            ("orders", "new", 1, 503)
        );
        assert_eq!(
            (r.kind.as_str(), r.status_code.as_str(), r.service.as_str()),
            ("server", "error", "router")
        );
        let value =
            |k: &str| r.attr_values[r.attr_keys.iter().position(|x| x == k).expect(k)].clone();
        assert_eq!(value("bytes"), "dead");
        assert_eq!(value("list"), r#"[1,"x"]"#);
        assert_eq!(value("map"), r#"{"a":1.5}"#);
    }

    /// Random mutations of valid protobuf and JSON requests through the whole decode
    /// path: decoding may fail, converting what decodes may reject it, nothing panics.
    #[test]
    fn mutated_requests_never_panic_the_decode_path() {
        use prost::Message;
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
        let valid = request(span());
        let proto = valid.encode_to_vec();
        let json = serde_json::to_vec(&valid).expect("json");
        let mut decoded = 0;
        for round in 0..20_000 {
            let mut bytes = if round % 2 == 0 {
                proto.clone()
            } else {
                json.clone()
            };
            for _ in 0..rng.random_range(1..8) {
                match rng.random_range(0..4) {
                    0 if !bytes.is_empty() => {
                        let i = rng.random_range(0..bytes.len());
                        bytes[i] ^= 1 << rng.random_range(0..8);
                    }
                    1 if !bytes.is_empty() => {
                        let n = rng.random_range(0..bytes.len());
                        bytes.truncate(n);
                    }
                    2 => {
                        let i = rng.random_range(0..=bytes.len());
                        bytes.insert(i, rng.random());
                    }
                    _ if !bytes.is_empty() => {
                        let i = rng.random_range(0..bytes.len());
                        bytes[i] = rng.random();
                    }
                    _ => {}
                }
            }
            let parsed = if round % 2 == 0 {
                ExportTraceServiceRequest::decode(&bytes[..]).ok()
            } else {
                serde_json::from_slice::<ExportTraceServiceRequest>(&bytes).ok()
            };
            if let Some(request) = parsed {
                decoded += 1;
                let _ = rows_from_request(request);
            }
        }
        assert!(
            decoded > 100,
            "the mutations should leave some requests decodable ({decoded})"
        );
    }

    #[test]
    fn invalid_ids_are_rejected_with_the_span_index() {
        let mut bad = span();
        bad.trace_id = vec![0; 16];
        assert_eq!(
            rows_from_request(request(bad)),
            Err(InvalidSpan::TraceId { index: 0, len: 16 })
        );
        let mut bad = span();
        bad.span_id = vec![1, 2, 3];
        assert_eq!(
            rows_from_request(request(bad)),
            Err(InvalidSpan::SpanId { index: 0, len: 3 })
        );
    }
}
