//! From receivers to the store: a bounded queue (counted in spans), batching by size
//! and time, several inserts in flight, the spool when the store fails, and an
//! acknowledgement to each export only once its spans are durable.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};

use crate::metrics::Metrics;
use crate::rowbinary::Encoded;
use crate::spool::Spool;
use crate::store::{SpanStore, StoreError};

/// Batching and queue settings.
#[derive(Debug, Clone, Copy)]
pub struct PipelineConfig {
    /// Spans per insert.
    pub batch_size: usize,
    /// The longest a span waits for its batch to fill.
    pub batch_timeout: Duration,
    /// A batch is also sent once no export has arrived for this long: exporters wait
    /// for their acknowledgement, so waiting longer for a full batch only adds latency.
    pub batch_linger: Duration,
    /// Spans accepted but not yet durable; beyond it receivers push back.
    pub queue_capacity: usize,
    /// Concurrent inserts.
    pub inserts_in_flight: usize,
    /// An insert taking longer is abandoned and its batch spooled.
    pub insert_timeout: Duration,
}

/// Why an export was not accepted.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SubmitError {
    /// The queue is full: retry later.
    #[error("the collector's queue is full ({queued} spans); retry later")]
    Busy {
        /// Spans queued now.
        queued: usize,
    },
    /// Neither the store nor the spool could take the spans: retry later.
    #[error("spans could not be stored: {0}")]
    Unavailable(String),
    /// More spans in one request than the queue holds.
    #[error("{spans} spans in one request exceeds the queue capacity of {capacity}")]
    TooLarge {
        /// Spans in the request.
        spans: usize,
        /// The capacity.
        capacity: usize,
    },
}

struct Job {
    spans: Encoded,
    ack: oneshot::Sender<Result<(), String>>,
    _permit: OwnedSemaphorePermit,
}

/// The receivers' handle on the pipeline.
#[derive(Clone)]
pub struct Pipeline {
    tx: mpsc::UnboundedSender<Job>,
    permits: Arc<Semaphore>,
    capacity: usize,
    metrics: Metrics,
}

impl Pipeline {
    /// Starts the writer and the spool replayer on the current runtime.
    pub fn start(
        store: Arc<dyn SpanStore>,
        spool: Arc<Spool>,
        config: PipelineConfig,
        metrics: Metrics,
    ) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let healthy = Arc::new(AtomicBool::new(true));
        tokio::spawn(writer(
            rx,
            Arc::clone(&store),
            Arc::clone(&spool),
            config,
            metrics.clone(),
            Arc::clone(&healthy),
        ));
        tokio::spawn(replayer(
            store,
            spool,
            metrics.clone(),
            healthy,
            config.insert_timeout,
            config.batch_size,
        ));
        Self {
            tx,
            permits: Arc::new(Semaphore::new(config.queue_capacity)),
            capacity: config.queue_capacity,
            metrics,
        }
    }

    /// Spans accepted and not yet durable.
    pub fn queued(&self) -> usize {
        self.capacity - self.permits.available_permits()
    }

    /// Queues rows and waits until they are stored or spooled.
    pub async fn submit(&self, spans: Encoded) -> Result<(), SubmitError> {
        let n = spans.rows;
        if n == 0 {
            return Ok(());
        }
        self.metrics.received.inc_by(n as u64);
        if n > self.capacity {
            self.metrics.rejected.inc_by(n as u64);
            return Err(SubmitError::TooLarge {
                spans: n,
                capacity: self.capacity,
            });
        }
        let permit = match u32::try_from(n)
            .ok()
            .and_then(|k| Arc::clone(&self.permits).try_acquire_many_owned(k).ok())
        {
            Some(p) => p,
            None => {
                self.metrics.rejected.inc_by(n as u64);
                return Err(SubmitError::Busy {
                    queued: self.queued(),
                });
            }
        };
        let (ack, done) = oneshot::channel();
        self.tx
            .send(Job {
                spans,
                ack,
                _permit: permit,
            })
            .map_err(|_| SubmitError::Unavailable("the writer stopped".into()))?;
        match done.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(SubmitError::Unavailable(e)),
            Err(_) => Err(SubmitError::Unavailable("the writer stopped".into())),
        }
    }
}

async fn writer(
    mut rx: mpsc::UnboundedReceiver<Job>,
    store: Arc<dyn SpanStore>,
    spool: Arc<Spool>,
    config: PipelineConfig,
    metrics: Metrics,
    healthy: Arc<AtomicBool>,
) {
    let in_flight = Arc::new(Semaphore::new(config.inserts_in_flight.max(1)));
    while let Some(first) = rx.recv().await {
        let mut count = first.spans.rows;
        let mut jobs = vec![first];
        let deadline = tokio::time::Instant::now() + config.batch_timeout;
        while count < config.batch_size {
            tokio::select! {
                job = rx.recv() => match job {
                    Some(job) => { count += job.spans.rows; jobs.push(job); }
                    None => break,
                },
                _ = tokio::time::sleep(config.batch_linger) => break,
                _ = tokio::time::sleep_until(deadline) => break,
            }
        }
        let Ok(slot) = Arc::clone(&in_flight).acquire_owned().await else {
            return;
        };
        let (store, spool, metrics, healthy) = (
            Arc::clone(&store),
            Arc::clone(&spool),
            metrics.clone(),
            Arc::clone(&healthy),
        );
        let timeout = config.insert_timeout;
        tokio::spawn(async move {
            let _slot = slot;
            write_batch(jobs, store.as_ref(), &spool, &metrics, &healthy, timeout).await;
        });
    }
}

async fn write_batch(
    jobs: Vec<Job>,
    store: &dyn SpanStore,
    spool: &Spool,
    metrics: &Metrics,
    healthy: &AtomicBool,
    timeout: Duration,
) {
    let mut spans = Encoded::default();
    let mut acks = Vec::with_capacity(jobs.len());
    let mut permits = Vec::with_capacity(jobs.len());
    for job in jobs {
        spans.append(job.spans);
        acks.push(job.ack);
        permits.push(job._permit);
    }
    let n = spans.rows as u64;
    // While the store is known to be down, go straight to the spool instead of
    // waiting for every batch to time out.
    let stored = if healthy.load(Ordering::Acquire) {
        match tokio::time::timeout(timeout, store.insert(&spans)).await {
            Ok(Ok(())) => true,
            Ok(Err(StoreError::Migrating)) => {
                tracing::debug!("the store is still migrating; spooling {n} spans");
                healthy.store(false, Ordering::Release);
                false
            }
            Ok(Err(e)) => {
                tracing::warn!("insert of {n} spans failed, spooling: {e}");
                healthy.store(false, Ordering::Release);
                false
            }
            Err(_) => {
                tracing::warn!("insert of {n} spans timed out after {timeout:?}, spooling");
                healthy.store(false, Ordering::Release);
                false
            }
        }
    } else {
        false
    };
    let result = if stored {
        metrics.written.inc_by(n);
        Ok(())
    } else {
        match spool.push_encoded(&spans) {
            Ok(()) => {
                metrics.spooled.inc_by(n);
                metrics
                    .spool_bytes
                    .set(i64::try_from(spool.used_bytes()).unwrap_or(i64::MAX));
                Ok(())
            }
            Err(e) => {
                tracing::error!("{n} spans neither stored nor spooled, exporters will retry: {e}");
                metrics.failed.inc_by(n);
                Err(e.to_string())
            }
        }
    };
    for ack in acks {
        let _ = ack.send(result.clone());
    }
    drop(permits);
    spans.recycle();
}

/// How often the spool is checked while the store is down.
const REPLAY_INTERVAL: Duration = Duration::from_millis(500);

async fn replayer(
    store: Arc<dyn SpanStore>,
    spool: Arc<Spool>,
    metrics: Metrics,
    healthy: Arc<AtomicBool>,
    timeout: Duration,
    batch_size: usize,
) {
    loop {
        tokio::time::sleep(REPLAY_INTERVAL).await;
        if !healthy.load(Ordering::Acquire)
            && tokio::time::timeout(timeout, store.ping())
                .await
                .unwrap_or(false)
        {
            tracing::info!("span store is back; replaying the spool");
            healthy.store(true, Ordering::Release);
        }
        if !healthy.load(Ordering::Acquire) {
            continue;
        }
        loop {
            let crate::spool::MergedEncoded {
                files: paths,
                spans,
            } = match spool.oldest_encoded(batch_size) {
                Ok(Some(batch)) => batch,
                Ok(None) => break,
                // Ends this round: retrying at once would spin (a directory that
                // cannot be read stays so); a corrupt batch was moved aside, so the
                // next round goes on past it.
                Err(e) => {
                    metrics.spool_errors.inc();
                    tracing::error!("{e}; replay paused until the next round");
                    break;
                }
            };
            match tokio::time::timeout(timeout, store.insert(&spans)).await {
                Ok(Ok(())) => {
                    for path in &paths {
                        if let Err(e) = spool.remove(path) {
                            tracing::error!(
                                "replayed batch could not be removed (it will be replayed again; the table deduplicates): {e}"
                            );
                        }
                    }
                    metrics.replayed.inc_by(spans.rows as u64);
                    metrics
                        .spool_bytes
                        .set(i64::try_from(spool.used_bytes()).unwrap_or(i64::MAX));
                    spans.recycle();
                }
                // Refused as malformed: retrying cannot help, and the batch would
                // hold up every batch behind it.
                Ok(Err(StoreError::Rejected(e))) => {
                    for path in &paths {
                        tracing::error!("{}: {e}", spool.set_aside_refused(path));
                    }
                    metrics
                        .spool_bytes
                        .set(i64::try_from(spool.used_bytes()).unwrap_or(i64::MAX));
                }
                _ => {
                    healthy.store(false, Ordering::Release);
                    break;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use async_trait::async_trait;

    use super::*;
    use crate::model::SpanRow;

    /// A store that refuses everything until it is made ready, like ClickHouse
    /// while the collector's migrations are still running.
    #[derive(Default)]
    struct NotReadyYet {
        ready: AtomicBool,
        spans: Mutex<Encoded>,
    }

    #[async_trait]
    impl SpanStore for NotReadyYet {
        async fn insert(&self, spans: &Encoded) -> Result<(), StoreError> {
            if !self.ready.load(Ordering::Acquire) {
                return Err(StoreError::Migrating);
            }
            self.spans
                .lock()
                .map_err(|_| StoreError::Unavailable("poisoned".into()))?
                .append(spans.clone());
            Ok(())
        }
        async fn ping(&self) -> bool {
            self.ready.load(Ordering::Acquire)
        }
    }

    /// Regression: a spool directory that cannot be read (removed under a running
    /// collector) made the replayer retry in a tight loop, logging an error each
    /// time (gigabytes of log, a core busy). Now a failed read ends the round.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_spool_that_cannot_be_read_is_retried_each_round_not_in_a_tight_loop() {
        let dir = tempfile::tempdir().expect("tempdir");
        let spool_dir = dir.path().join("spool");
        let spool = Arc::new(Spool::open(&spool_dir, 1 << 20).expect("spool"));
        let store = Arc::new(NotReadyYet::default());
        store.ready.store(true, Ordering::Release);
        let metrics = Metrics::new();
        let _pipeline = Pipeline::start(
            Arc::clone(&store) as Arc<dyn SpanStore>,
            Arc::clone(&spool),
            PipelineConfig {
                batch_size: 100,
                batch_timeout: Duration::from_millis(20),
                batch_linger: Duration::from_millis(5),
                queue_capacity: 1_000,
                inserts_in_flight: 1,
                insert_timeout: Duration::from_secs(5),
            },
            metrics.clone(),
        );
        std::fs::remove_dir_all(&spool_dir).expect("remove the spool directory");
        tokio::time::sleep(REPLAY_INTERVAL * 3).await;
        let errors = metrics.spool_errors.get();
        assert!(
            (1..=4).contains(&errors),
            "{errors} failed reads in three replay rounds"
        );
    }

    #[tokio::test]
    async fn spans_accepted_before_the_store_is_ready_are_spooled_and_replayed_once_it_is() {
        let dir = tempfile::tempdir().expect("tempdir");
        let spool = Arc::new(Spool::open(dir.path(), 1 << 20).expect("spool"));
        let store = Arc::new(NotReadyYet::default());
        let config = PipelineConfig {
            batch_size: 100,
            batch_timeout: Duration::from_millis(20),
            batch_linger: Duration::from_millis(5),
            queue_capacity: 1_000,
            inserts_in_flight: 2,
            insert_timeout: Duration::from_secs(5),
        };
        let pipeline = Pipeline::start(
            Arc::clone(&store) as Arc<dyn SpanStore>,
            Arc::clone(&spool),
            config,
            Metrics::new(),
        );
        let rows: Vec<SpanRow> = (0..3)
            .map(|i| SpanRow {
                name: format!("early-{i}"),
                ..SpanRow::default()
            })
            .collect();
        // Acknowledged (durable in the spool) although the store refuses writes.
        pipeline
            .submit(Encoded::from_rows(&rows))
            .await
            .expect("accepted");
        assert!(store.spans.lock().expect("lock").is_empty());
        assert!(spool.used_bytes() > 0);

        store.ready.store(true, Ordering::Release);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while store.spans.lock().expect("lock").rows < rows.len() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the spool was not replayed"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let stored: Vec<u8> = store
            .spans
            .lock()
            .expect("lock")
            .chunks
            .iter()
            .flat_map(|c| c.to_vec())
            .collect();
        assert_eq!(stored, Encoded::from_rows(&rows).chunks[0].to_vec());
        assert_eq!(spool.used_bytes(), 0);
    }
}
