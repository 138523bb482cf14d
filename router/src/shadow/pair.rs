//! A shadow pair's life: planned when the request arrives, its copy sent once the
//! request body is in, compared after the client has its answer, and the result
//! recorded on the route and the primary span.

use std::sync::Arc;

use opentelemetry::KeyValue;
use opentelemetry::trace::{Span as _, Status};
use pingora::http::RequestHeader;
use strangler_model::names::{attr, diff, event, mismatch, span as span_name};
use strangler_model::{Backend, Reason};

use super::compare::{Captured, Verdict, compare, differences};
use super::{CopyRequest, SHADOW_HEADER, Sample, now_secs, sample_body, send_copy};
use crate::proxy::headers::copy_headers;
use crate::routing::decide::sticky_key;
use crate::routing::{Route, Snapshot};
use crate::state::RouterState;
use crate::stats::{Key, PairOutcome, Role};

/// A primary request paired with a copy to the other side (or, when calibrating,
/// to legacy again).
pub struct Pair {
    route: Arc<Route>,
    calibration: bool,
    shadow_backend: Backend,
    /// Why the primary went where it went (the copy counts under the same reason).
    reason: Reason,
    /// Waiting for the request body; `None` once the copy is on its way.
    copy: Option<CopyRequest>,
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
    result: Option<tokio::sync::oneshot::Receiver<Result<Captured, String>>>,
    /// What the client is getting.
    pub primary: Captured,
    pair_id: String,
    request_line: String,
}

/// The primary request's span as the comparison gets it.
// Moved once per pair, into the comparison task; boxing the span would cost an
// allocation on every traced request with a pair instead.
#[allow(clippy::large_enum_variant)]
pub enum PrimarySpan {
    /// The request was traced: the comparison adds its result and ends the span.
    Live(opentelemetry_sdk::trace::Span),
    /// The request was not sampled: a span is built only if the pair differs and
    /// the route's mismatch allowance (`per_minute`) is not spent.
    Deferred {
        /// The trace the request would have had, for samples.
        trace_id: opentelemetry::trace::TraceId,
        /// Builds the span with the request's ids, start and attributes.
        build: Box<dyn FnOnce() -> opentelemetry_sdk::trace::Span + Send>,
        /// Mismatch spans allowed per route and minute.
        per_minute: u32,
    },
}

impl PrimarySpan {
    fn trace_id(&self) -> String {
        match self {
            Self::Live(span) => span.span_context().trace_id().to_string(),
            Self::Deferred { trace_id, .. } => trace_id.to_string(),
        }
    }
}

/// Whether a request gets a copy.
pub enum Plan {
    /// No copy.
    None,
    /// A copy, to send once the request body is complete.
    AwaitBody(Pair),
    /// A copy of a request without a body: send it now.
    SendNow(Pair),
}

/// Decides whether this request gets a copy, and prepares it.
pub fn plan(
    state: &RouterState,
    snapshot: &Snapshot,
    route: &Arc<Route>,
    req: &RequestHeader,
    ctx: &crate::proxy::RequestCtx,
    span: Option<&mut opentelemetry_sdk::trace::Span>,
) -> Plan {
    let shadow = &route.config.shadow;
    let shadows = &route.state.shadow;
    if !shadow.methods.contains(&req.method) || req.headers.contains_key(SHADOW_HEADER) {
        return Plan::None;
    }
    let (primary, reason, client_ip) = (ctx.backend(), ctx.reason(), ctx.client.ip.as_deref());
    let calibration = primary == Backend::Legacy && shadows.take_calibration_slot();
    let shadow_backend = if calibration {
        Backend::Legacy
    } else {
        let sampled = shadow
            .percent
            .is_some_and(|p| rand::random_range(0..100u8) < p);
        let toggled = sampled || {
            let key = sticky_key(&route.config.sticky, &req.headers, client_ip);
            let context = crate::flags::context_for(&route.config.sticky, key.as_deref());
            state.flags.evaluate(&shadow.flag, &context).enabled
        };
        if !toggled {
            return Plan::None;
        }
        primary.other()
    };
    let declared = req
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    let chunked = req.headers.contains_key(http::header::TRANSFER_ENCODING);
    let permit = if declared.is_some_and(|n| n > shadow.max_body_bytes) {
        shadows.skipped();
        None
    } else {
        shadows.acquire().ok()
    };
    let Some(permit) = permit else {
        if !calibration {
            route.stats.record_pair(primary, PairOutcome::Skipped, &[]);
        }
        if let Some(span) = span {
            crate::proxy::span::skipped(span);
        }
        return Plan::None;
    };
    let target = match shadow_backend {
        Backend::Legacy => snapshot.config.legacy.addr,
        Backend::New => route.config.new_upstream.addr,
    };
    let path_and_query = req
        .uri
        .path_and_query()
        .map_or_else(|| req.uri.path().to_string(), |p| p.as_str().to_string());
    let mut headers = copy_headers(&req.headers);
    if !headers.iter().any(|(k, _)| k == "host")
        && let Some(authority) = req.uri.authority()
    {
        headers.push(("host".into(), authority.to_string()));
    }
    let pair = Pair {
        route: Arc::clone(route),
        calibration,
        shadow_backend,
        reason,
        copy: Some(CopyRequest {
            method: req.method.clone(),
            path_and_query: path_and_query.clone(),
            headers,
            body: Vec::new(),
            upstream: target,
            timeout: shadow.timeout,
            max_body_bytes: shadow.max_body_bytes,
        }),
        permit: Some(permit),
        result: None,
        primary: Captured::default(),
        pair_id: format!("{:016x}", rand::random::<u64>()),
        request_line: format!("{} {path_and_query}", req.method),
    };
    if declared.unwrap_or(0) == 0 && !chunked {
        Plan::SendNow(pair)
    } else {
        Plan::AwaitBody(pair)
    }
}

impl Pair {
    /// Adds a chunk of the request body to the copy; `false` when the body grew past
    /// the limit (the pair is then dropped and counted as skipped).
    pub fn push_request_body(&mut self, chunk: &[u8]) -> bool {
        let Some(copy) = self.copy.as_mut() else {
            return true;
        };
        if copy.body.len() + chunk.len() > copy.max_body_bytes {
            self.route.state.shadow.skipped();
            if !self.calibration {
                self.route.stats.record_pair(
                    self.shadow_backend.other(),
                    PairOutcome::Skipped,
                    &[],
                );
            }
            return false;
        }
        copy.body.extend_from_slice(chunk);
        true
    }

    /// Whether the copy still waits for the request body.
    pub fn awaiting_body(&self) -> bool {
        self.copy.is_some()
    }

    /// Adds a chunk of the primary's response body, up to the limit.
    pub fn push_response_body(&mut self, chunk: &[u8]) {
        if self.primary.truncated {
            return;
        }
        if self.primary.body.len() + chunk.len() > self.route.config.shadow.max_body_bytes {
            self.primary.truncated = true;
            self.primary.body = Vec::new();
        } else {
            self.primary.body.extend_from_slice(chunk);
        }
    }

    /// Sends the prepared copy in its own task.
    pub fn send(&mut self, state: &RouterState, parent: Option<&opentelemetry_sdk::trace::Span>) {
        let Some(copy) = self.copy.take() else {
            return;
        };
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.result = Some(rx);
        let permit = self.permit.take();
        let mut attributes = vec![
            KeyValue::new(attr::ROUTE, self.route.config.name.to_string()),
            KeyValue::new(attr::BACKEND, self.shadow_backend.as_str()),
            KeyValue::new(attr::SHADOW, true),
            KeyValue::new(attr::PAIR_ID, self.pair_id.clone()),
            KeyValue::new(attr::HTTP_METHOD, copy.method.to_string()),
        ];
        if self.calibration {
            attributes.push(KeyValue::new(attr::CALIBRATION, true));
        }
        let span = parent.map(|parent| {
            state.telemetry.start_child_span(
                format!(
                    "{}{}",
                    span_name::SHADOW_PREFIX,
                    self.request_line.split('?').next().unwrap_or("")
                ),
                parent,
                opentelemetry::trace::SpanKind::Client,
                attributes,
            )
        });
        let trace_headers = span
            .as_ref()
            .map(|s| state.telemetry.propagation_headers(s).into_iter().collect())
            .unwrap_or_default();
        let client = state.shadows.client.clone();
        // Calibration copies (legacy against itself) are not traffic of the route.
        let stats = (!self.calibration).then(|| Arc::clone(&self.route.stats));
        let key = Key {
            backend: self.shadow_backend,
            reason: self.reason,
            role: Role::Shadow,
            status: 0,
        };
        state.shadows.spawn(async move {
            let _permit = permit;
            let started = std::time::Instant::now();
            let result = send_copy(&client, copy, trace_headers).await;
            if let Some(stats) = stats {
                let status = result.as_ref().map_or(0, |r| r.status);
                let key = Key { status, ..key };
                stats.record(key, status == 0 || status >= 500, started.elapsed());
            }
            if let Some(mut span) = span {
                match &result {
                    Ok(r) => {
                        span.set_attribute(KeyValue::new(attr::HTTP_STATUS, i64::from(r.status)))
                    }
                    Err(e) => span.set_status(Status::error(e.clone())),
                }
                span.end();
            }
            let _ = tx.send(result);
        });
    }

    /// The client has its answer (`status` > 0): compare in the background and end
    /// the primary span there. Otherwise the pair is skipped and the span ends now.
    pub fn finish(
        self,
        state: &Arc<RouterState>,
        status: u16,
        primary_backend: Backend,
        span: PrimarySpan,
    ) {
        if status > 0 && self.result.is_some() {
            state
                .shadows
                .spawn(compare_and_record(self, span, primary_backend));
            return;
        }
        if !self.calibration {
            self.route.state.shadow.skipped();
            self.route
                .stats
                .record_pair(self.shadow_backend.other(), PairOutcome::Skipped, &[]);
        }
        // An unsampled request's skipped pair is no reason for a span.
        if let PrimarySpan::Live(mut span) = span {
            if !self.calibration {
                crate::proxy::span::skipped(&mut span);
            }
            span.end();
        }
    }
}

/// Waits for the copy, compares, records, and ends the primary span.
async fn compare_and_record(pair: Pair, primary: PrimarySpan, primary_backend: Backend) {
    let trace_id = primary.trace_id();
    let shadows = &pair.route.state.shadow;
    let wait = pair.route.config.shadow.timeout + std::time::Duration::from_secs(1);
    let shadow = match pair.result {
        Some(rx) => match tokio::time::timeout(wait, rx).await {
            Ok(Ok(result)) => result,
            _ => Err("no answer".to_string()),
        },
        None => Err("not sent".to_string()),
    };
    let verdict = shadow
        .as_ref()
        .ok()
        .map(|s| compare(&pair.primary, s, &pair.route.config.shadow.rules));
    let mismatch = matches!(verdict, Some(Verdict::Mismatch(_)));
    let span = match primary {
        PrimarySpan::Live(span) => Some(span),
        PrimarySpan::Deferred {
            build, per_minute, ..
        } => (mismatch && !pair.calibration && pair.route.state.mismatch_spans.take(per_minute))
            .then(build),
    };
    if pair.calibration {
        shadows.record_calibration(verdict.as_ref());
        if let Some(mut span) = span {
            span.set_attribute(KeyValue::new(attr::PAIR_ID, pair.pair_id.clone()));
            span.end();
        }
        return;
    }
    let (label, outcome, paths) = match &verdict {
        None => (diff::ERROR, PairOutcome::Error, Vec::new()),
        Some(Verdict::Match) => (diff::MATCH, PairOutcome::Match, Vec::new()),
        Some(Verdict::Mismatch(p)) => (diff::MISMATCH, PairOutcome::Mismatch, p.clone()),
        Some(Verdict::Skipped(_)) => (diff::SKIPPED, PairOutcome::Skipped, Vec::new()),
    };
    pair.route
        .stats
        .record_pair(primary_backend, outcome, &paths);
    let differences = match (&verdict, &shadow) {
        (Some(Verdict::Mismatch(p)), Ok(s)) => differences(&pair.primary, s, p),
        _ => Vec::new(),
    };
    let sample = || Sample {
        at: now_secs(),
        request: pair.request_line.clone(),
        pair_id: pair.pair_id.clone(),
        trace_id: trace_id.clone(),
        primary_backend: primary_backend.as_str().to_string(),
        paths: paths.clone(),
        differences: differences.clone(),
        primary_status: pair.primary.status,
        primary_body: sample_body(&pair.primary.body),
        shadow_status: shadow.as_ref().map_or(0, |s| s.status),
        shadow_body: match &shadow {
            Ok(s) => sample_body(&s.body),
            Err(e) => e.clone(),
        },
    };
    let Some(mut span) = span else {
        shadows.record(verdict.as_ref(), sample);
        return;
    };
    span.set_attribute(KeyValue::new(attr::PAIR_ID, pair.pair_id.clone()));
    span.set_attribute(KeyValue::new(attr::DIFF, label));
    if !paths.is_empty() {
        span.set_attribute(KeyValue::new(attr::DIFF_PATHS, paths.join(",")));
    }
    if label == diff::MISMATCH {
        let s = sample();
        span.add_event(
            event::MISMATCH,
            vec![
                KeyValue::new(mismatch::REQUEST, s.request.clone()),
                KeyValue::new(mismatch::PRIMARY_STATUS, i64::from(s.primary_status)),
                KeyValue::new(mismatch::PRIMARY_BODY, s.primary_body.clone()),
                KeyValue::new(mismatch::SHADOW_STATUS, i64::from(s.shadow_status)),
                KeyValue::new(mismatch::SHADOW_BODY, s.shadow_body.clone()),
                KeyValue::new(
                    mismatch::DIFFERENCES,
                    serde_json::to_string(&s.differences).unwrap_or_default(),
                ),
            ],
        );
    }
    shadows.record(verdict.as_ref(), sample);
    span.end();
}
