//! Sends each recorded route change to the collector as a span, so dashboards draw it
//! as a marker (ClickHouse's `route_events` table) and Grafana as an annotation. The
//! history file stays the record; this is a copy, and failing to send it only warns.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span, span::SpanKind};

use super::history::Entry;

use strangler_model::names::attr;
/// The span name the collector turns into a route event.
pub use strangler_model::names::span::ROUTE_CHANGE as ROUTE_CHANGE_SPAN;

fn kv(key: &str, value: &str) -> KeyValue {
    KeyValue {
        key: key.to_string(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(value.to_string())),
        }),
        ..Default::default()
    }
}

/// The export request carrying `entry` (deliberately without `strangler.route`, so
/// the change is never counted as a request).
pub fn request(entry: &Entry, service: &str, at: SystemTime) -> ExportTraceServiceRequest {
    let nanos = u64::try_from(at.duration_since(UNIX_EPOCH).unwrap_or_default().as_nanos())
        .unwrap_or(u64::MAX);
    let mut trace_id = rand::random::<[u8; 16]>();
    trace_id[0] |= 1;
    let mut span_id = rand::random::<[u8; 8]>();
    span_id[0] |= 1;
    let mut attributes = vec![
        kv(attr::CHANGE_ROUTE, &entry.route),
        kv(attr::CHANGE_FROM, &entry.from.to_string()),
        kv(attr::CHANGE_TO, &entry.to.to_string()),
        kv(attr::CHANGE_ACTION, &entry.action),
        kv(attr::CHANGE_ACTOR, &entry.actor),
    ];
    if let Some(reason) = &entry.reason {
        attributes.push(kv(attr::CHANGE_REASON, reason));
    }
    ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(Resource {
                attributes: vec![kv(attr::SERVICE_NAME, service)],
                ..Default::default()
            }),
            scope_spans: vec![ScopeSpans {
                scope: None,
                spans: vec![Span {
                    trace_id: trace_id.to_vec(),
                    span_id: span_id.to_vec(),
                    name: ROUTE_CHANGE_SPAN.to_string(),
                    kind: SpanKind::Internal as i32,
                    start_time_unix_nano: nanos,
                    end_time_unix_nano: nanos,
                    attributes,
                    ..Default::default()
                }],
                schema_url: String::new(),
            }],
            schema_url: String::new(),
        }],
    }
}

/// Sends `entry` to the OTLP/gRPC `endpoint`, giving up after `timeout`.
pub async fn send(
    endpoint: &str,
    entry: &Entry,
    service: &str,
    timeout: Duration,
) -> Result<(), String> {
    let attempt = async {
        let mut client = TraceServiceClient::connect(endpoint.to_string())
            .await
            .map_err(|e| e.to_string())?;
        client
            .export(request(entry, service, SystemTime::now()))
            .await
            .map_err(|e| e.message().to_string())?;
        Ok(())
    };
    tokio::time::timeout(timeout, attempt)
        .await
        .map_err(|_| format!("no answer within {} ms", timeout.as_millis()))?
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::lifecycle::State;

    #[test]
    fn a_change_becomes_one_span_without_a_route_attribute() {
        let entry = Entry {
            number: 0,
            at: "2026-11-27T00:00:00Z".into(),
            actor: "ops".into(),
            route: "orders".into(),
            from: State::Shadow,
            to: State::Legacy,
            action: "rollback".into(),
            reason: Some("5xx".into()),
            evidence: None,
        };
        let r = request(
            &entry,
            "strangler-cli",
            UNIX_EPOCH + Duration::from_secs(10),
        );
        let span = &r.resource_spans[0].scope_spans[0].spans[0];
        assert_eq!(span.name, ROUTE_CHANGE_SPAN);
        assert_eq!(span.start_time_unix_nano, 10_000_000_000);
        let keys: Vec<&str> = span.attributes.iter().map(|a| a.key.as_str()).collect();
        assert!(keys.contains(&"strangler.change.reason"));
        assert!(!keys.contains(&"strangler.route"));
        assert!(span.trace_id.iter().any(|b| *b != 0) && span.span_id.iter().any(|b| *b != 0));
    }
}
