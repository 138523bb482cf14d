//! OTLP metric points into ClickHouse, under the spans' durability rules: an export
//! is acknowledged once its points are stored or fsynced in the spool; while the
//! store is away (down, or still migrating) points go straight to the spool and a
//! replayer moves them in once it is back. Only when both fail is the export
//! refused, as retryable: a delta exporter such as the router's then resends the
//! counts with its next export, so nothing is lost.
//!
//! An export can be stored and its acknowledgement still lost (the collector killed
//! while ClickHouse finished the insert): the router then sends it again unchanged,
//! marked `strangler.export.retry`, and a retry whose first point the store already
//! holds is acknowledged without storing it twice. A retry is never spooled: until
//! ClickHouse is reachable and the spool (where the first attempt may wait) is
//! replayed, it is refused as retryable and the exporter keeps it. Not covered: a
//! first attempt whose insert ClickHouse finishes only after the retry was checked
//! (the retry comes an export interval later).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;

use crate::metric_model::MetricRow;
use crate::metrics::Metrics;
use crate::spool::Spool;
use crate::store::SpanStore;
use crate::store::clickhouse::ClickHouseStore;

/// How often the spool is checked while the store is away.
const REPLAY_INTERVAL: Duration = Duration::from_millis(500);
/// Points per replay insert.
const REPLAY_BATCH: usize = 50_000;

/// Stores metric exports for the gRPC and HTTP receivers.
#[derive(Clone)]
pub struct MetricsWriter {
    store: Arc<ClickHouseStore>,
    spool: Arc<Spool<MetricRow>>,
    metrics: Metrics,
    healthy: Arc<AtomicBool>,
    timeout: Duration,
}

impl MetricsWriter {
    /// A writer to `store`, each insert bounded by `timeout` (keep it below the
    /// exporters' own timeout: an export acknowledged after its exporter gave up
    /// would be sent again), spooling to `spool`. Starts the replayer.
    pub fn start(
        store: Arc<ClickHouseStore>,
        spool: Arc<Spool<MetricRow>>,
        metrics: Metrics,
        timeout: Duration,
    ) -> Self {
        let writer = Self {
            store,
            spool,
            metrics,
            // Until migrated, inserts are refused: start by spooling.
            healthy: Arc::new(AtomicBool::new(false)),
            timeout,
        };
        tokio::spawn(writer.clone().replay());
        writer
    }

    /// Stores one export's points; `Err` (why) when neither the store nor the
    /// spool took them.
    pub async fn write(&self, request: ExportMetricsServiceRequest) -> Result<(), String> {
        let retry = request.resource_metrics.iter().any(|rm| {
            rm.resource.as_ref().is_some_and(|r| {
                r.attributes
                    .iter()
                    .any(|a| a.key == strangler_model::names::attr::EXPORT_RETRY)
            })
        });
        let rows = crate::metric_model::metric_rows_from_request(request);
        if rows.is_empty() {
            return Ok(());
        }
        let n = rows.len() as u64;
        if retry && let Some(first) = rows.first() {
            // Only the store can say whether the first attempt arrived, and only
            // once the spool (where it may wait) is drained: until then the retry
            // is refused as retryable, and the exporter keeps it.
            if !self.healthy.load(Ordering::Acquire) {
                return Err(
                    "a retried export waits until ClickHouse is reachable and the spool replayed"
                        .into(),
                );
            }
            match tokio::time::timeout(self.timeout, self.store.holds_metric_point(first)).await {
                Ok(Ok(true)) => {
                    self.metrics.points_duplicate.inc_by(n);
                    tracing::info!(
                        instance = first.instance.as_str(),
                        "a retried metrics export was stored already; not storing it twice"
                    );
                    return Ok(());
                }
                Ok(Ok(false)) => {}
                Ok(Err(e)) => return Err(format!("checking a retried export: {e}")),
                Err(_) => return Err("checking a retried export took too long".into()),
            }
        }
        let stored = if self.healthy.load(Ordering::Acquire) {
            match tokio::time::timeout(self.timeout, self.store.insert_metrics(&rows)).await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err(format!(
                    "storing {n} metric points took longer than {:?}",
                    self.timeout
                )),
            }
        } else {
            Err("the store is not available".to_string())
        };
        let insert_error = match stored {
            Ok(()) => {
                self.metrics.points_written.inc_by(n);
                return Ok(());
            }
            Err(e) => e,
        };
        if self.healthy.swap(false, Ordering::AcqRel) {
            tracing::warn!(
                "metric points go to the spool until ClickHouse is back: {insert_error}"
            );
        }
        match self.spool.push(&rows) {
            Ok(()) => {
                self.metrics.points_spooled.inc_by(n);
                Ok(())
            }
            Err(e) => Err(format!("{insert_error}; and the spool refused them: {e}")),
        }
    }

    async fn replay(self) {
        loop {
            tokio::time::sleep(REPLAY_INTERVAL).await;
            // The span store's own readiness: reachable and migrated.
            if !self.healthy.load(Ordering::Acquire)
                && !tokio::time::timeout(self.timeout, self.store.ping())
                    .await
                    .unwrap_or(false)
            {
                continue;
            }
            // Drain what waits before taking direct inserts again, oldest first.
            loop {
                let batch = match self.spool.oldest_merged(REPLAY_BATCH) {
                    Ok(Some(batch)) => batch,
                    Ok(None) => {
                        if !self.healthy.swap(true, Ordering::AcqRel) {
                            tracing::debug!("metric points are stored directly again");
                        }
                        break;
                    }
                    Err(e) => {
                        tracing::error!("{e}");
                        break;
                    }
                };
                match tokio::time::timeout(self.timeout, self.store.insert_metrics(&batch.rows))
                    .await
                {
                    Ok(Ok(())) => {
                        for path in &batch.files {
                            if let Err(e) = self.spool.remove(path) {
                                tracing::error!(
                                    "replayed metric batch could not be removed (it would be counted twice): {e}"
                                );
                            }
                        }
                        self.metrics.points_replayed.inc_by(batch.rows.len() as u64);
                    }
                    _ => {
                        self.healthy.store(false, Ordering::Release);
                        break;
                    }
                }
            }
        }
    }
}
