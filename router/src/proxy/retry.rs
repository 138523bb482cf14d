//! Retries and fallback: what happens when an upstream fails.
//!
//! A connect failure is retried on the same upstream for any method (nothing was
//! sent), with exponential backoff and full jitter. An idempotent request that the
//! new service fails (connect error, reset, timeout, 5xx) before anything reached
//! the client is retried once on legacy: the fallback.

use pingora::prelude::*;

use super::ctx::{Attempt, RequestCtx};
use crate::config::RetryPolicy;
use crate::routing::Route;

/// Requests safe to send twice: only these are retried on legacy. GET, HEAD and
/// OPTIONS, plus the methods the route declares.
pub fn is_idempotent(route: Option<&Route>, method: &http::Method) -> bool {
    match route {
        Some(route) => route.config.idempotent_methods.contains(method),
        None => matches!(
            *method,
            http::Method::GET | http::Method::HEAD | http::Method::OPTIONS
        ),
    }
}

/// Whether a failure of the current attempt may be retried on legacy: the new
/// service was tried, this is not already the fallback, and the method is safe.
pub fn may_fall_back(ctx: &RequestCtx, method: &http::Method) -> bool {
    ctx.attempt == Attempt::New && is_idempotent(ctx.route.as_deref(), method)
}

/// Marks the request for one retry on legacy. Its shadow pair, if any, is dropped:
/// the copy went to legacy too, and comparing legacy with legacy says nothing.
pub fn begin_fallback(ctx: &mut RequestCtx) {
    ctx.attempt = Attempt::Fallback;
    if let (Some(_), Some(route)) = (ctx.pair.take(), &ctx.route) {
        route.state.shadow.skipped();
    }
}

/// After a connect failure that does not fall back: whether to try the same
/// upstream again, and after how long (stored in the context).
pub fn retry_connect(ctx: &mut RequestCtx, policy: RetryPolicy) -> bool {
    let backoff = ctx.backoff.get_or_insert_with(|| {
        backon::BackoffBuilder::build(
            backon::ExponentialBuilder::default()
                .with_min_delay(policy.backoff)
                .with_max_delay(policy.backoff.saturating_mul(16))
                .with_max_times(policy.connect_retries as usize)
                .with_jitter(),
        )
    });
    match backoff.next() {
        Some(delay) => {
            ctx.retry_delay = Some(delay);
            true
        }
        None => false,
    }
}

/// The status a client gets for a request the router could not complete: 504 when
/// an upstream timed out, 408 when the client was too slow, 502 for other upstream
/// failures, 400 for other client errors, 0 when the client is gone.
pub fn error_status(e: &Error) -> u16 {
    use pingora::{ErrorSource, ErrorType as T};
    match (e.esource(), e.etype()) {
        (_, T::HTTPStatus(code)) => *code,
        (ErrorSource::Upstream, T::ConnectTimedout | T::ReadTimedout | T::WriteTimedout) => 504,
        (ErrorSource::Upstream, _) => 502,
        (ErrorSource::Downstream, T::ReadTimedout) => 408,
        (ErrorSource::Downstream, T::WriteError | T::ReadError | T::ConnectionClosed) => 0,
        (ErrorSource::Downstream, _) => 400,
        (ErrorSource::Internal | ErrorSource::Unset, _) => 500,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeouts_map_to_504_or_408_by_who_was_slow() {
        let err = |t: ErrorType, s: pingora::ErrorSource| {
            let mut e = Error::new(t);
            e.esource = s;
            error_status(&e)
        };
        use pingora::ErrorSource::{Downstream, Upstream};
        assert_eq!(err(ErrorType::ReadTimedout, Upstream), 504);
        assert_eq!(err(ErrorType::ConnectTimedout, Upstream), 504);
        assert_eq!(err(ErrorType::ConnectRefused, Upstream), 502);
        assert_eq!(err(ErrorType::ReadTimedout, Downstream), 408);
        assert_eq!(err(ErrorType::ConnectionClosed, Downstream), 0);
        assert_eq!(err(ErrorType::InvalidHTTPHeader, Downstream), 400);
        assert_eq!(err(ErrorType::HTTPStatus(503), Upstream), 503);
    }
}
