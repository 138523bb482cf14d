//! The task applying batches to the sink, fed through a short queue so that
//! reading the next batch overlaps applying this one.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::batch::Batch;
use crate::config::CdcConfig;
use crate::error::CdcError;
use crate::model::Position;
use crate::observe::Observe;
use crate::pipeline::Progress;
use crate::plan::TablePlan;
use crate::sink::Sink;
use crate::source::Committed;

/// The task applying batches to the target, fed through a short queue.
pub struct Applier {
    queue: Option<tokio::sync::mpsc::Sender<Batch>>,
    task: tokio::task::JoinHandle<Result<(), CdcError>>,
    tables: usize,
    handed: u64,
    applied: Arc<std::sync::atomic::AtomicU64>,
}

impl Applier {
    /// Starts the task applying to `target`; `committed` is told each position
    /// the target committed.
    pub fn spawn(
        mut target: Box<dyn Sink>,
        plans: Arc<Vec<TablePlan>>,
        config: CdcConfig,
        progress: Arc<Progress>,
        observe: Option<Arc<Observe>>,
        committed: Committed,
    ) -> Self {
        let tables = plans.len();
        // Two batches in flight at most: enough to overlap decoding and applying,
        // little enough that memory stays bounded.
        let (queue, mut batches) = tokio::sync::mpsc::channel::<Batch>(2);
        let applied_count = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counter = Arc::clone(&applied_count);
        let task = tokio::spawn(async move {
            while let Some(mut batch) = batches.recv().await {
                let applied = apply_batch(
                    &mut batch,
                    target.as_mut(),
                    &plans,
                    &config,
                    &progress,
                    observe.as_deref(),
                )
                .await?;
                if let Some(position) = applied {
                    committed(&position);
                }
                counter.fetch_add(1, std::sync::atomic::Ordering::Release);
            }
            Ok(())
        });
        Self {
            queue: Some(queue),
            task,
            tables,
            handed: 0,
            applied: applied_count,
        }
    }

    /// The task ended (with an error, or its queue closed).
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }

    /// Waits until every batch handed over is committed.
    pub async fn drain(&mut self) -> Result<(), CdcError> {
        while self.applied.load(std::sync::atomic::Ordering::Acquire) < self.handed {
            if self.task.is_finished() {
                self.queue = None;
                return match (&mut self.task).await {
                    Ok(Err(e)) => Err(e),
                    _ => Err(CdcError::ApplierStopped("its queue closed".into())),
                };
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        Ok(())
    }

    /// Queues the batch (waiting while two are in flight) and leaves an empty one.
    pub async fn hand_over(&mut self, batch: &mut Batch) -> Result<(), CdcError> {
        let full = std::mem::replace(batch, Batch::new(self.tables));
        let sent = match &self.queue {
            Some(q) => q.send(full).await.is_ok(),
            None => false,
        };
        if sent {
            self.handed += 1;
            Ok(())
        } else {
            // The applier stopped: its error is the one to report.
            self.queue = None;
            match (&mut self.task).await {
                Ok(Err(e)) => Err(e),
                Ok(Ok(())) | Err(_) => Err(CdcError::ApplierStopped("its queue closed".into())),
            }
        }
    }

    /// Waits for everything queued to be applied.
    pub async fn finish(mut self) -> Result<(), CdcError> {
        self.queue = None;
        match self.task.await {
            Ok(result) => result,
            Err(e) => Err(CdcError::ApplierStopped(format!("it panicked: {e}"))),
        }
    }
}

async fn apply_batch(
    batch: &mut Batch,
    target: &mut dyn Sink,
    plans: &[TablePlan],
    config: &CdcConfig,
    progress: &Progress,
    observe: Option<&Observe>,
) -> Result<Option<Position>, CdcError> {
    use std::sync::atomic::Ordering::Relaxed;
    let end = batch.end.clone();
    let txs = batch.transactions as u64;
    let started = std::time::SystemTime::now();
    let t0 = Instant::now();
    let oldest = batch.first_commit_time;
    let by_table: Vec<(String, u64)> = plans
        .iter()
        .zip(&batch.changes_by_table)
        .filter(|(_, n)| **n > 0)
        .map(|(p, n)| (p.target.quoted(), *n))
        .collect();
    let open = batch.open;
    let applied = target.apply(batch, plans, &config.slot).await?;
    let rows = applied.rows;
    progress.conflicts.fetch_add(applied.conflicts, Relaxed);
    progress.rows.fetch_add(rows, Relaxed);
    tracing::debug!(
        transactions = txs,
        rows,
        open,
        ms = t0.elapsed().as_secs_f64() * 1000.0,
        "batch applied"
    );
    if open {
        // A part of a transaction: nothing is committed yet, the position stays.
        return Ok(None);
    }
    let Some(end) = end else {
        return Ok(None);
    };
    let at = end.checkpoint().0;
    if let Some(o) = observe {
        o.batch(started, t0.elapsed(), at, txs, &by_table, oldest);
    }
    progress.applied.store(at, Relaxed);
    progress.transactions.fetch_add(txs, Relaxed);
    Ok(Some(end))
}
