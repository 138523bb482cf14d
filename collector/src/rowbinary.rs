//! Spans straight from OTLP into the `spans` table's RowBinary rows: the one
//! encoding of the hot path. A request is encoded once, in the receiver that
//! decoded it (so on as many cores as there are exporters at once), into one
//! buffer that travels through the queue, the insert and the spool unchanged.
//! Resource attributes are encoded once per resource and copied per span as bytes;
//! promoted attributes are found in one pass; ids are hex-encoded into the buffer.
//!
//! [`crate::model::rows_from_request`] stays the readable definition of a row: a
//! test holds this encoder to it byte for byte.

use std::borrow::Cow;

use bytes::Bytes;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::Status;
use opentelemetry_proto::tonic::trace::v1::span::{Event, Link, SpanKind};
use opentelemetry_proto::tonic::trace::v1::status::StatusCode;
use prost::encoding::{WireType, decode_key, decode_varint};
use strangler_model::names::attr;

use crate::model::{InvalidSpan, SpanRow, attrs_json, hex, value_to_string};

/// The `spans` columns, in the order every encoded row holds them.
pub const SPAN_COLUMNS: &str = "start_time, start_time_ns, end_time_ns, duration_ns, trace_id, span_id, parent_span_id, name, kind, status_code, status_message, service, route, backend, decision, diff, diff_paths, pair_id, shadow, http_method, http_status, resource_keys, resource_values, attr_keys, attr_values, scope_name, events_json, links_json";

/// Span rows in RowBinary, in one or more chunks (a batch of several exports keeps
/// each export's buffer as it is, and is sent as a sequence of chunks).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Encoded {
    /// The rows' bytes, in order.
    pub chunks: Vec<Bytes>,
    /// How many rows they hold.
    pub rows: usize,
}

impl Encoded {
    /// One chunk of `rows` rows.
    pub fn one(bytes: Vec<u8>, rows: usize) -> Self {
        Self {
            chunks: vec![Bytes::from(bytes)],
            rows,
        }
    }

    /// Appends `other`'s chunks (no copy).
    pub fn append(&mut self, other: Self) {
        self.chunks.extend(other.chunks);
        self.rows += other.rows;
    }

    /// Whether it holds no rows.
    pub fn is_empty(&self) -> bool {
        self.rows == 0
    }

    /// Rows encoded from typed rows (spool files an older collector wrote, tests).
    pub fn from_rows(rows: &[SpanRow]) -> Self {
        let mut buf = Vec::with_capacity(rows.len() * 256);
        for row in rows {
            encode_row(row, &mut buf);
        }
        Self::one(buf, rows.len())
    }
}

/// Encoding buffers handed back once their rows are stored or spooled, so the next
/// exports write into memory already mapped rather than fresh pages (the kernel's
/// zeroing of new pages was 8 % of the collector's CPU without it).
static POOL: std::sync::Mutex<Vec<Vec<u8>>> = std::sync::Mutex::new(Vec::new());
/// Buffers kept for reuse; beyond them (a burst), buffers are freed.
const POOL_BUFFERS: usize = 64;
/// Larger buffers (one giant export) are not kept.
const POOL_MAX_CAPACITY: usize = 16 << 20;

/// An empty buffer with room for at least `capacity` bytes, reused when possible.
fn buffer(capacity: usize) -> Vec<u8> {
    let reused = POOL.lock().ok().and_then(|mut pool| pool.pop());
    match reused {
        Some(mut buf) => {
            buf.clear();
            buf.reserve(capacity);
            buf
        }
        None => Vec::with_capacity(capacity),
    }
}

impl Encoded {
    /// Hands the chunks' buffers back for reuse once nothing else holds them (the
    /// insert that sent them has finished).
    pub fn recycle(self) {
        let Ok(mut pool) = POOL.lock() else {
            return;
        };
        for chunk in self.chunks {
            if pool.len() >= POOL_BUFFERS {
                return;
            }
            if let Ok(buf) = chunk.try_into_mut() {
                let buf = Vec::from(buf);
                if buf.capacity() <= POOL_MAX_CAPACITY {
                    pool.push(buf);
                }
            }
        }
    }
}

fn varint(buf: &mut Vec<u8>, mut n: u64) {
    loop {
        let byte = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            buf.push(byte);
            return;
        }
        buf.push(byte | 0x80);
    }
}

fn string(buf: &mut Vec<u8>, s: &str) {
    varint(buf, s.len() as u64);
    buf.extend_from_slice(s.as_bytes());
}

fn hex_string(buf: &mut Vec<u8>, bytes: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    varint(buf, bytes.len() as u64 * 2);
    buf.reserve(bytes.len() * 2);
    for b in bytes {
        buf.push(DIGITS[(b >> 4) as usize]);
        buf.push(DIGITS[(b & 0xf) as usize]);
    }
}

fn strings<'a>(buf: &mut Vec<u8>, items: impl ExactSizeIterator<Item = &'a str>) {
    varint(buf, items.len() as u64);
    for s in items {
        string(buf, s);
    }
}

/// A value's string form, borrowed when it is a string (the common case).
fn text(value: Option<&AnyValue>) -> Cow<'_, str> {
    match value.and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => Cow::Borrowed(s),
        _ => Cow::Owned(value_to_string(value)),
    }
}

/// Writes one [`SpanRow`] (the layout [`SPAN_COLUMNS`] names).
pub fn encode_row(r: &SpanRow, buf: &mut Vec<u8>) {
    buf.extend_from_slice(&r.start_time.to_le_bytes());
    buf.extend_from_slice(&r.start_time_ns.to_le_bytes());
    buf.extend_from_slice(&r.end_time_ns.to_le_bytes());
    buf.extend_from_slice(&r.duration_ns.to_le_bytes());
    for s in [
        &r.trace_id,
        &r.span_id,
        &r.parent_span_id,
        &r.name,
        &r.kind,
        &r.status_code,
        &r.status_message,
        &r.service,
        &r.route,
        &r.backend,
        &r.decision,
        &r.diff,
        &r.diff_paths,
        &r.pair_id,
    ] {
        string(buf, s);
    }
    buf.push(r.shadow);
    string(buf, &r.http_method);
    buf.extend_from_slice(&r.http_status.to_le_bytes());
    for list in [
        &r.resource_keys,
        &r.resource_values,
        &r.attr_keys,
        &r.attr_values,
    ] {
        strings(buf, list.iter().map(String::as_str));
    }
    string(buf, &r.scope_name);
    string(buf, &r.events_json);
    string(buf, &r.links_json);
}

/// Rejects a request with an invalid span identity (the OTLP spec makes that a
/// client error), naming the span's position.
pub(crate) fn validate(request: &ExportTraceServiceRequest) -> Result<usize, InvalidSpan> {
    let mut index = 0;
    for rs in &request.resource_spans {
        for ss in &rs.scope_spans {
            for span in &ss.spans {
                if span.trace_id.len() != 16 || span.trace_id.iter().all(|b| *b == 0) {
                    return Err(InvalidSpan::TraceId {
                        index,
                        len: span.trace_id.len(),
                    });
                }
                if span.span_id.len() != 8 || span.span_id.iter().all(|b| *b == 0) {
                    return Err(InvalidSpan::SpanId {
                        index,
                        len: span.span_id.len(),
                    });
                }
                index += 1;
            }
        }
    }
    Ok(index)
}

/// Positions of the promoted attributes among a span's (the first of each key).
#[derive(Default)]
struct Promoted {
    route: Option<usize>,
    backend: Option<usize>,
    decision: Option<usize>,
    diff: Option<usize>,
    diff_paths: Option<usize>,
    pair_id: Option<usize>,
    shadow: Option<usize>,
    http_method: Option<usize>,
    http_status: Option<usize>,
}

impl Promoted {
    fn find(attributes: &[(&str, Cow<'_, str>)]) -> Self {
        let mut p = Self::default();
        for (i, (key, _)) in attributes.iter().enumerate() {
            let slot = match *key {
                attr::ROUTE => &mut p.route,
                attr::BACKEND => &mut p.backend,
                attr::DECISION => &mut p.decision,
                attr::DIFF => &mut p.diff,
                attr::DIFF_PATHS => &mut p.diff_paths,
                attr::PAIR_ID => &mut p.pair_id,
                attr::SHADOW => &mut p.shadow,
                attr::HTTP_METHOD => &mut p.http_method,
                attr::HTTP_STATUS => &mut p.http_status,
                _ => continue,
            };
            if slot.is_none() {
                *slot = Some(i);
            }
        }
        p
    }
}

/// A span's fields as its row needs them, borrowed from whichever decoding.
struct SpanView<'a, 'b> {
    trace_id: &'a [u8],
    span_id: &'a [u8],
    parent_span_id: &'a [u8],
    name: &'a str,
    kind: i32,
    start: u64,
    end: u64,
    /// Code and message; `None` without a status.
    status: Option<(i32, &'b str)>,
    /// Keys and the values' string forms, in order.
    attrs: &'b [(&'a str, Cow<'a, str>)],
    events_json: &'b str,
    links_json: &'b str,
}

/// A resource's columns, encoded once and copied into each of its spans' rows.
struct ResourceCols {
    keys: Vec<u8>,
    values: Vec<u8>,
    service: String,
}

impl ResourceCols {
    fn new(attributes: &[KeyValue]) -> Self {
        let (mut keys, mut values) = (Vec::new(), Vec::new());
        strings(&mut keys, attributes.iter().map(|kv| kv.key.as_str()));
        let texts: Vec<Cow<'_, str>> = attributes
            .iter()
            .map(|kv| text(kv.value.as_ref()))
            .collect();
        strings(&mut values, texts.iter().map(|t| t.as_ref()));
        let service = attributes
            .iter()
            .position(|kv| kv.key == "service.name")
            .map_or_else(String::new, |i| texts[i].to_string());
        Self {
            keys,
            values,
            service,
        }
    }
}

fn kind_name(kind: i32) -> &'static str {
    match SpanKind::try_from(kind).unwrap_or(SpanKind::Unspecified) {
        SpanKind::Server => "server",
        SpanKind::Client => "client",
        SpanKind::Internal => "internal",
        SpanKind::Producer => "producer",
        SpanKind::Consumer => "consumer",
        SpanKind::Unspecified => "unspecified",
    }
}

fn events_json(events: &[Event]) -> Cow<'static, str> {
    if events.is_empty() {
        return Cow::Borrowed("[]");
    }
    let events: Vec<serde_json::Value> = events
        .iter()
        .map(|e| serde_json::json!({"name": e.name, "time_ns": e.time_unix_nano, "attributes": attrs_json(&e.attributes)}))
        .collect();
    Cow::Owned(serde_json::Value::Array(events).to_string())
}

fn links_json(links: &[Link]) -> Cow<'static, str> {
    if links.is_empty() {
        return Cow::Borrowed("[]");
    }
    let links: Vec<serde_json::Value> = links
        .iter()
        .map(|l| serde_json::json!({"trace_id": hex(&l.trace_id), "span_id": hex(&l.span_id), "attributes": attrs_json(&l.attributes)}))
        .collect();
    Cow::Owned(serde_json::Value::Array(links).to_string())
}

/// Writes one span's row.
fn write_span(buf: &mut Vec<u8>, v: &SpanView<'_, '_>, resource: &ResourceCols, scope_name: &str) {
    buf.extend_from_slice(
        &u32::try_from(v.start / 1_000_000_000)
            .unwrap_or(u32::MAX)
            .to_le_bytes(),
    );
    buf.extend_from_slice(&v.start.to_le_bytes());
    buf.extend_from_slice(&v.end.to_le_bytes());
    buf.extend_from_slice(&v.end.saturating_sub(v.start).to_le_bytes());
    hex_string(buf, v.trace_id);
    hex_string(buf, v.span_id);
    hex_string(buf, v.parent_span_id);
    string(buf, v.name);
    string(buf, kind_name(v.kind));
    match v.status {
        Some((code, message)) => {
            string(
                buf,
                match StatusCode::try_from(code).unwrap_or(StatusCode::Unset) {
                    StatusCode::Ok => "ok",
                    StatusCode::Error => "error",
                    StatusCode::Unset => "unset",
                },
            );
            string(buf, message);
        }
        None => {
            string(buf, "unset");
            string(buf, "");
        }
    }
    string(buf, &resource.service);
    let p = Promoted::find(v.attrs);
    let get = |i: Option<usize>| i.map_or("", |i| v.attrs[i].1.as_ref());
    for i in [
        p.route,
        p.backend,
        p.decision,
        p.diff,
        p.diff_paths,
        p.pair_id,
    ] {
        string(buf, get(i));
    }
    buf.push(u8::from(get(p.shadow) == "true"));
    string(buf, get(p.http_method));
    buf.extend_from_slice(&get(p.http_status).parse::<u16>().unwrap_or(0).to_le_bytes());
    buf.extend_from_slice(&resource.keys);
    buf.extend_from_slice(&resource.values);
    strings(buf, v.attrs.iter().map(|(k, _)| *k));
    strings(buf, v.attrs.iter().map(|(_, t)| t.as_ref()));
    string(buf, scope_name);
    string(buf, v.events_json);
    string(buf, v.links_json);
}

/// Encodes every span of `request` as a row of `spans`, or refuses the whole request
/// when a span's identity is invalid.
pub fn encode_request(request: &ExportTraceServiceRequest) -> Result<Encoded, InvalidSpan> {
    let count = validate(request)?;
    let mut buf = Vec::with_capacity(count * 384);
    let mut attrs: Vec<(&str, Cow<'_, str>)> = Vec::new();
    for rs in &request.resource_spans {
        let resource = ResourceCols::new(rs.resource.as_ref().map_or(&[], |r| &r.attributes));
        for ss in &rs.scope_spans {
            let scope_name = ss.scope.as_ref().map_or("", |s| s.name.as_str());
            for span in &ss.spans {
                attrs.clear();
                attrs.extend(
                    span.attributes
                        .iter()
                        .map(|kv| (kv.key.as_str(), text(kv.value.as_ref()))),
                );
                let (events, links) = (events_json(&span.events), links_json(&span.links));
                let view = SpanView {
                    trace_id: &span.trace_id,
                    span_id: &span.span_id,
                    parent_span_id: &span.parent_span_id,
                    name: &span.name,
                    kind: span.kind,
                    start: span.start_time_unix_nano,
                    end: span.end_time_unix_nano,
                    status: span.status.as_ref().map(|s| (s.code, s.message.as_str())),
                    attrs: &attrs,
                    events_json: &events,
                    links_json: &links,
                };
                write_span(&mut buf, &view, &resource, scope_name);
            }
        }
    }
    Ok(Encoded::one(buf, count))
}

/// Why an export's body was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Refused {
    /// Not a protobuf `ExportTraceServiceRequest`.
    #[error("not an OTLP ExportTraceServiceRequest: {0}")]
    Decode(String),
    /// A span's identity is invalid.
    #[error(transparent)]
    Span(#[from] InvalidSpan),
}

/// Encodes a protobuf `ExportTraceServiceRequest` body: read in place where it has
/// the usual shape ([`encode_wire`]), else decoded into the OTLP types first (which
/// also gives the precise error for a body that is not valid).
pub fn encode_protobuf(body: &[u8]) -> Result<Encoded, Refused> {
    if let Some(encoded) = encode_wire(body) {
        return Ok(encoded);
    }
    let request = <ExportTraceServiceRequest as prost::Message>::decode(body)
        .map_err(|e| Refused::Decode(e.to_string()))?;
    Ok(encode_request(&request)?)
}

/// A container message's single field 1 (if given) and repeated field 2.
type Container<'a> = (Option<&'a [u8]>, Vec<&'a [u8]>);

/// A protobuf message being read in place.
struct Wire<'a> {
    buf: &'a [u8],
}

impl<'a> Wire<'a> {
    fn next(&mut self) -> Option<Option<(u32, WireType)>> {
        if self.buf.is_empty() {
            return Some(None);
        }
        decode_key(&mut self.buf).ok().map(Some)
    }

    fn varint(&mut self) -> Option<u64> {
        decode_varint(&mut self.buf).ok()
    }

    fn bytes(&mut self) -> Option<&'a [u8]> {
        let n = usize::try_from(self.varint()?).ok()?;
        if n > self.buf.len() {
            return None;
        }
        let (field, rest) = self.buf.split_at(n);
        self.buf = rest;
        Some(field)
    }

    fn str(&mut self) -> Option<&'a str> {
        std::str::from_utf8(self.bytes()?).ok()
    }

    fn fixed64(&mut self) -> Option<u64> {
        let (field, rest) = self.buf.split_first_chunk::<8>()?;
        self.buf = rest;
        Some(u64::from_le_bytes(*field))
    }

    fn skip(&mut self, wire: WireType) -> Option<()> {
        match wire {
            WireType::Varint => self.varint().map(drop),
            WireType::SixtyFourBit => {
                self.buf = self.buf.get(8..)?;
                Some(())
            }
            WireType::LengthDelimited => self.bytes().map(drop),
            WireType::ThirtyTwoBit => {
                self.buf = self.buf.get(4..)?;
                Some(())
            }
            WireType::StartGroup | WireType::EndGroup => None,
        }
    }

    /// `ResourceSpans` and `ScopeSpans` have one shape: field 1 a message given at
    /// most once (`None` from here when twice: prost would merge them), field 2 the
    /// repeated messages below, field 3 a `schema_url` string.
    fn container(body: &'a [u8]) -> Option<Container<'a>> {
        let (mut single, mut repeated) = (None, Vec::new());
        let mut w = Wire { buf: body };
        while let Some((tag, wire)) = w.next()? {
            match tag {
                1 => {
                    Wire::expect(wire, WireType::LengthDelimited)?;
                    if single.replace(w.bytes()?).is_some() {
                        return None;
                    }
                }
                2 => {
                    Wire::expect(wire, WireType::LengthDelimited)?;
                    repeated.push(w.bytes()?);
                }
                3 => {
                    Wire::expect(wire, WireType::LengthDelimited)?;
                    w.str()?;
                }
                _ => w.skip(wire)?,
            }
        }
        Some((single, repeated))
    }

    /// The next field must have this wire type (as prost requires of known fields).
    fn expect(wire: WireType, want: WireType) -> Option<()> {
        (wire == want).then_some(())
    }
}

/// Reads a protobuf `ExportTraceServiceRequest` in place and writes its rows, with
/// no allocation per attribute: strings are checked as UTF-8 and copied once, into
/// the rows. `None` when the body is not in the shape this reader handles exactly
/// as prost would (an invalid body, an invalid span id, a field given twice that
/// prost would merge, a string-table reference): the caller decodes it the general
/// way then, so the result never depends on which path took it.
pub fn encode_wire(body: &[u8]) -> Option<Encoded> {
    let mut buf = buffer(body.len() + body.len() / 2);
    let mut rows = 0;
    let mut attrs = Vec::new();
    let mut w = Wire { buf: body };
    while let Some((tag, wire)) = w.next()? {
        if tag == 1 {
            Wire::expect(wire, WireType::LengthDelimited)?;
            rows += resource_spans(w.bytes()?, &mut buf, &mut attrs)?;
        } else {
            w.skip(wire)?;
        }
    }
    Some(Encoded::one(buf, rows))
}

fn resource_spans<'a>(
    body: &'a [u8],
    buf: &mut Vec<u8>,
    attrs: &mut Vec<(&'a str, Cow<'a, str>)>,
) -> Option<usize> {
    let (resource, scopes) = Wire::container(body)?;
    // Once per resource: the general decoder is cheap enough here.
    let resource = match resource {
        Some(bytes) => Some(<Resource as prost::Message>::decode(bytes).ok()?),
        None => None,
    };
    let cols = ResourceCols::new(resource.as_ref().map_or(&[], |r| &r.attributes));
    let mut rows = 0;
    for scope in scopes {
        rows += scope_spans(scope, &cols, buf, attrs)?;
    }
    Some(rows)
}

fn scope_spans<'a>(
    body: &'a [u8],
    resource: &ResourceCols,
    buf: &mut Vec<u8>,
    attrs: &mut Vec<(&'a str, Cow<'a, str>)>,
) -> Option<usize> {
    let (scope, spans) = Wire::container(body)?;
    let scope = match scope {
        Some(bytes) => Some(<InstrumentationScope as prost::Message>::decode(bytes).ok()?),
        None => None,
    };
    let scope_name = scope.as_ref().map_or("", |s| s.name.as_str());
    for span in &spans {
        write_wire_span(span, resource, scope_name, buf, attrs)?;
    }
    Some(spans.len())
}

fn write_wire_span<'a>(
    body: &'a [u8],
    resource: &ResourceCols,
    scope_name: &str,
    buf: &mut Vec<u8>,
    attrs: &mut Vec<(&'a str, Cow<'a, str>)>,
) -> Option<()> {
    attrs.clear();
    let (mut trace_id, mut span_id, mut parent): (&[u8], &[u8], &[u8]) = (&[], &[], &[]);
    let (mut name, mut kind, mut start, mut end) = ("", 0i32, 0u64, 0u64);
    let mut status = None;
    let (mut events, mut links) = (Vec::new(), Vec::new());
    let mut w = Wire { buf: body };
    while let Some((tag, wire)) = w.next()? {
        match tag {
            1 | 2 | 4 | 11 | 13 | 15 => {
                Wire::expect(wire, WireType::LengthDelimited)?;
                let field = w.bytes()?;
                match tag {
                    1 => trace_id = field,
                    2 => span_id = field,
                    4 => parent = field,
                    11 => events.push(<Event as prost::Message>::decode(field).ok()?),
                    13 => links.push(<Link as prost::Message>::decode(field).ok()?),
                    _ => {
                        if status
                            .replace(<Status as prost::Message>::decode(field).ok()?)
                            .is_some()
                        {
                            return None;
                        }
                    }
                }
            }
            3 | 5 => {
                Wire::expect(wire, WireType::LengthDelimited)?;
                let text = w.str()?;
                if tag == 5 {
                    name = text;
                }
            }
            6 | 10 | 12 | 14 => {
                Wire::expect(wire, WireType::Varint)?;
                let v = w.varint()?;
                if tag == 6 {
                    // As prost reads an int32 enum.
                    kind = v as i32;
                }
            }
            7 | 8 => {
                Wire::expect(wire, WireType::SixtyFourBit)?;
                let v = w.fixed64()?;
                if tag == 7 {
                    start = v;
                } else {
                    end = v;
                }
            }
            9 => {
                Wire::expect(wire, WireType::LengthDelimited)?;
                attrs.push(key_value(w.bytes()?)?);
            }
            16 => {
                Wire::expect(wire, WireType::ThirtyTwoBit)?;
                w.skip(wire)?;
            }
            _ => w.skip(wire)?,
        }
    }
    // An invalid identity: the general path reports it with the span's position.
    if trace_id.len() != 16
        || trace_id.iter().all(|b| *b == 0)
        || span_id.len() != 8
        || span_id.iter().all(|b| *b == 0)
    {
        return None;
    }
    let (events, links) = (events_json(&events), links_json(&links));
    let view = SpanView {
        trace_id,
        span_id,
        parent_span_id: parent,
        name,
        kind,
        start,
        end,
        status: status.as_ref().map(|s| (s.code, s.message.as_str())),
        attrs,
        events_json: &events,
        links_json: &links,
    };
    write_span(buf, &view, resource, scope_name);
    Some(())
}

/// A `KeyValue`: its key and its value's string form (borrowed when the value is a
/// string; any other kind is decoded by prost and formatted as the general path does).
fn key_value(body: &[u8]) -> Option<(&str, Cow<'_, str>)> {
    let (mut key, mut value) = ("", None);
    let mut w = Wire { buf: body };
    while let Some((tag, wire)) = w.next()? {
        match tag {
            1 => {
                Wire::expect(wire, WireType::LengthDelimited)?;
                key = w.str()?;
            }
            2 => {
                Wire::expect(wire, WireType::LengthDelimited)?;
                if value.replace(w.bytes()?).is_some() {
                    return None;
                }
            }
            // key_strindex (profiles' string table): not in trace exports.
            3 => return None,
            _ => w.skip(wire)?,
        }
    }
    let Some(value) = value else {
        return Some((key, Cow::Borrowed("")));
    };
    // Only string_value fields (the last one wins, as in prost's oneof)?
    let mut text = None;
    let mut w = Wire { buf: value };
    while let Some((tag, wire)) = w.next()? {
        match tag {
            1 => {
                Wire::expect(wire, WireType::LengthDelimited)?;
                text = Some(w.str()?);
            }
            2..=8 => {
                let any = <AnyValue as prost::Message>::decode(value).ok()?;
                return Some((key, Cow::Owned(value_to_string(Some(&any)))));
            }
            _ => w.skip(wire)?,
        }
    }
    Some((key, Cow::Borrowed(text.unwrap_or(""))))
}

#[cfg(test)]
mod tests {
    use opentelemetry_proto::tonic::common::v1::{ArrayValue, InstrumentationScope, KeyValueList};
    use opentelemetry_proto::tonic::resource::v1::Resource;
    use opentelemetry_proto::tonic::trace::v1::span::{Event, Link};
    use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span, Status};
    use prost::Message;
    use rand::{Rng, SeedableRng};

    use super::*;
    use crate::model::rows_from_request;

    fn kv(key: &str, value: any_value::Value) -> KeyValue {
        KeyValue {
            key: key.into(),
            value: Some(AnyValue { value: Some(value) }),
            ..Default::default()
        }
    }

    fn s(key: &str, v: &str) -> KeyValue {
        kv(key, any_value::Value::StringValue(v.into()))
    }

    fn flat(e: &Encoded) -> Vec<u8> {
        e.chunks.iter().flat_map(|c| c.iter().copied()).collect()
    }

    /// Two resources (one without attributes), scopes with and without a name,
    /// promoted attributes of every kind (and repeated: the first counts), events,
    /// links, statuses, a missing parent, an end before the start.
    fn varied() -> ExportTraceServiceRequest {
        let span = |n: u8| Span {
            trace_id: vec![n; 16],
            span_id: vec![n; 8],
            parent_span_id: if n.is_multiple_of(2) {
                vec![]
            } else {
                vec![n + 1; 8]
            },
            name: format!("GET /api/orders/{n}"),
            kind: i32::from(n % 6),
            start_time_unix_nano: 1_700_000_000_000_000_000 + u64::from(n),
            end_time_unix_nano: if n == 3 { 5 } else { 1_700_000_000_002_500_000 },
            status: (!n.is_multiple_of(3)).then(|| Status {
                code: i32::from(n % 3),
                message: format!("m{n}"),
            }),
            attributes: vec![
                s(attr::ROUTE, "orders"),
                s(
                    attr::BACKEND,
                    if n.is_multiple_of(2) { "new" } else { "legacy" },
                ),
                kv(
                    attr::SHADOW,
                    any_value::Value::BoolValue(n.is_multiple_of(2)),
                ),
                kv(
                    attr::HTTP_STATUS,
                    any_value::Value::IntValue(200 + i64::from(n)),
                ),
                s(attr::HTTP_METHOD, "GET"),
                s(attr::DIFF, "mismatch"),
                s(attr::DIFF_PATHS, "/total,/x"),
                s(attr::PAIR_ID, "p1"),
                s(attr::DECISION, "flag"),
                s(attr::ROUTE, "second-ignored"),
                kv("bytes", any_value::Value::BytesValue(vec![0xde, 0xad])),
                kv("d", any_value::Value::DoubleValue(1.5)),
                kv(
                    "list",
                    any_value::Value::ArrayValue(ArrayValue {
                        values: vec![AnyValue {
                            value: Some(any_value::Value::IntValue(1)),
                        }],
                    }),
                ),
                kv(
                    "map",
                    any_value::Value::KvlistValue(KeyValueList {
                        values: vec![s("a", "b")],
                    }),
                ),
                KeyValue {
                    key: "none".into(),
                    value: None,
                    ..Default::default()
                },
            ],
            events: if n == 1 {
                vec![Event {
                    name: "retry".into(),
                    time_unix_nano: 9,
                    attributes: vec![s("k", "v")],
                    ..Default::default()
                }]
            } else {
                vec![]
            },
            links: if n == 2 {
                vec![Link {
                    trace_id: vec![7; 16],
                    span_id: vec![8; 8],
                    attributes: vec![s("k", "v")],
                    ..Default::default()
                }]
            } else {
                vec![]
            },
            ..Default::default()
        };
        ExportTraceServiceRequest {
            resource_spans: vec![
                ResourceSpans {
                    resource: Some(Resource {
                        attributes: vec![
                            s("service.name", "router"),
                            kv("strangler.counted", any_value::Value::BoolValue(true)),
                        ],
                        ..Default::default()
                    }),
                    scope_spans: vec![
                        ScopeSpans {
                            scope: Some(InstrumentationScope {
                                name: "strangler".into(),
                                ..Default::default()
                            }),
                            spans: (1..4).map(span).collect(),
                            ..Default::default()
                        },
                        ScopeSpans {
                            spans: vec![span(4)],
                            ..Default::default()
                        },
                    ],
                    ..Default::default()
                },
                ResourceSpans {
                    resource: None,
                    scope_spans: vec![ScopeSpans {
                        spans: (5..8).map(span).collect(),
                        ..Default::default()
                    }],
                    ..Default::default()
                },
            ],
        }
    }

    #[test]
    fn the_encoder_writes_exactly_the_rows_the_readable_conversion_defines() {
        let request = varied();
        let encoded = encode_request(&request).expect("valid");
        let rows = rows_from_request(request).expect("valid");
        assert_eq!(encoded.rows, rows.len());
        assert_eq!(flat(&encoded), flat(&Encoded::from_rows(&rows)));
    }

    /// Random mutations of a valid request: whatever still decodes encodes to the
    /// same bytes as the readable conversion, or both refuse it the same way.
    #[test]
    fn mutated_requests_encode_like_the_readable_conversion_or_are_refused_alike() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(0xc0ffee);
        let proto = varied().encode_to_vec();
        let mut compared = 0;
        for _ in 0..5_000 {
            let mut bytes = proto.clone();
            for _ in 0..rng.random_range(1..6) {
                let i = rng.random_range(0..bytes.len());
                bytes[i] = rng.random();
            }
            let Ok(request) = ExportTraceServiceRequest::decode(&bytes[..]) else {
                continue;
            };
            match (encode_request(&request), rows_from_request(request)) {
                (Ok(e), Ok(rows)) => {
                    assert_eq!(flat(&e), flat(&Encoded::from_rows(&rows)));
                    compared += 1;
                }
                (Err(a), Err(b)) => assert_eq!(a, b),
                (a, b) => panic!("disagree: {a:?} vs {:?}", b.map(|r| r.len())),
            }
        }
        assert!(compared > 100, "{compared}");
    }

    #[test]
    fn the_in_place_reader_writes_what_the_general_decoder_and_encoder_write() {
        let body = varied().encode_to_vec();
        let wire = encode_wire(&body).expect("the usual shape is read in place");
        let general = encode_request(&varied()).expect("valid");
        assert_eq!(wire.rows, general.rows);
        assert_eq!(flat(&wire), flat(&general));
        assert_eq!(encode_protobuf(&body).map(|e| flat(&e)), Ok(flat(&general)));
    }

    /// Random mutations of a valid body: the in-place reader either writes exactly
    /// what the general path writes, or leaves the body to it; a body prost
    /// refuses is never accepted in place.
    #[test]
    fn mutated_bodies_are_read_in_place_exactly_like_the_general_path_or_left_to_it() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(0xfeed);
        let proto = varied().encode_to_vec();
        let (mut in_place, mut fell_back) = (0, 0);
        for _ in 0..20_000 {
            let mut bytes = proto.clone();
            for _ in 0..rng.random_range(1..6) {
                match rng.random_range(0..3) {
                    0 => {
                        let i = rng.random_range(0..bytes.len());
                        bytes[i] = rng.random();
                    }
                    1 => {
                        let i = rng.random_range(0..bytes.len());
                        bytes[i] ^= 1 << rng.random_range(0..8);
                    }
                    _ => {
                        let n = rng.random_range(0..bytes.len());
                        bytes.truncate(n.max(1));
                    }
                }
            }
            let decoded = ExportTraceServiceRequest::decode(&bytes[..]);
            match (encode_wire(&bytes), decoded) {
                (Some(wire), Ok(request)) => {
                    let general = encode_request(&request).expect("read in place, so valid");
                    assert_eq!(flat(&wire), flat(&general));
                    in_place += 1;
                }
                (Some(_), Err(e)) => panic!("read in place a body prost refuses: {e}"),
                (None, _) => fell_back += 1,
            }
        }
        assert!(
            in_place > 100 && fell_back > 100,
            "{in_place} in place, {fell_back} fell back"
        );
    }

    #[test]
    fn varints_are_leb128() {
        let mut buf = Vec::new();
        for n in [0u64, 1, 127, 128, 300, 16_384] {
            varint(&mut buf, n);
        }
        assert_eq!(buf, [0, 1, 127, 0x80, 1, 0xac, 2, 0x80, 0x80, 1]);
    }
}
