//! Where changes come from: the seam between a source database and the
//! pipeline. A source opens its stream at the target's checkpoint (copying the
//! tables first when there is none) and turns each event into a change of a
//! [`Batch`]; the pipeline decides when batches go to the sink. A new source
//! database is a new folder here, implementing [`Source`].

pub mod mysql;
pub mod postgres;

use async_trait::async_trait;

use crate::batch::Batch;
use crate::config::CdcConfig;
use crate::error::{ApplyError, CdcError};
use crate::model::{Lsn, Position};
use crate::plan::TablePlan;

/// What one read of the source did.
#[derive(Debug)]
pub enum Step {
    /// A change was added to the batch (inside a source transaction).
    Change,
    /// A transaction ended: [`Batch::commit`] recorded where.
    Commit,
    /// Nothing that reaches the batch (transaction control, metadata, a skipped or
    /// foreign transaction's change).
    Other,
    /// Nothing arrived for a tick (the batch linger): the pipeline may apply a
    /// lingering batch or write a heartbeat.
    Idle,
    /// A change that cannot be applied safely: what is pending is applied, then
    /// the stream stops with this.
    Stop(ApplyError),
}

/// Told each position the target committed, from the applier's task.
pub type Committed = Box<dyn Fn(&Position) + Send + Sync>;

/// A source database's change stream.
#[async_trait]
pub trait Source: Send {
    /// Reads the next event and records what it means in `batch`.
    async fn next(&mut self, batch: &mut Batch, plans: &[TablePlan]) -> Result<Step, CdcError>;
    /// Inside a transaction: nothing may be applied or stopped now.
    fn in_transaction(&self) -> bool;
    /// The checkpoint the stream started from.
    fn resumed_at(&self) -> Lsn;
    /// Where the applier reports committed positions (a PostgreSQL slot lets go
    /// of the WAL before them).
    fn on_applied(&self) -> Committed {
        Box::new(|_: &Position| {})
    }
    /// Idle for `[apply] heartbeat_ms` outside a transaction: a source whose
    /// position only moves with its own changes writes one.
    async fn heartbeat(&mut self) {}
    /// Copies `plans[t]` again while streaming (`strangler cdc resnapshot`); its
    /// changes up to the copy's point are skipped from then on.
    async fn resnapshot(
        &mut self,
        config: &CdcConfig,
        plans: &[TablePlan],
        t: usize,
    ) -> Result<u64, CdcError> {
        let _ = (config, plans, t);
        Err(CdcError::Unsupported(
            "re-copying one table while streaming needs a PostgreSQL source; use `strangler cdc run --resnapshot`".into(),
        ))
    }
}
