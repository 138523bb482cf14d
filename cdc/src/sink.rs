//! Where changes are written: the seam between the stream and the target database.
//! PostgreSQL applies batches itself ([`crate::apply::Batch::apply`]); other sinks
//! (MySQL/MariaDB, [`crate::mysql::MySqlSink`]) take each table's reduced changes.

use async_trait::async_trait;
use tokio_postgres::Client;

use crate::apply::{ApplyError, Batch, CHECKPOINT_TABLE};
use crate::lsn::Lsn;
use crate::plan::TablePlan;

/// A target database.
#[async_trait]
pub trait Sink: Send {
    /// Applies the batch and the checkpoint in one transaction; returns rows written.
    async fn apply(
        &mut self,
        batch: &mut Batch,
        plans: &[TablePlan],
        slot: &str,
    ) -> Result<crate::apply::Applied, ApplyError>;
    /// The position applied for `slot`, if any.
    async fn read_checkpoint(&mut self, slot: &str) -> Result<Option<Lsn>, ApplyError>;
    /// Records `lsn` for `slot` on its own (a stream starting without a snapshot).
    async fn write_checkpoint(&mut self, slot: &str, lsn: Lsn) -> Result<(), ApplyError>;
    /// Forgets `slot`'s checkpoint (`--resnapshot`).
    async fn forget_checkpoint(&mut self, slot: &str) -> Result<(), ApplyError>;
    /// The PostgreSQL client, when the sink is one (the snapshot copies into it).
    fn postgres(&self) -> Option<&Client> {
        None
    }
    /// Whether a source transaction may be applied in parts ([`Batch::open`]) that
    /// commit together: the applier then starts on a large transaction before its
    /// end arrives.
    fn applies_parts(&self) -> bool {
        false
    }
}

/// A PostgreSQL target.
pub struct PgSink(pub Client, pub crate::apply::Session);

impl PgSink {
    /// A sink writing through `client`.
    pub fn new(client: Client) -> Self {
        Self(client, crate::apply::Session::default())
    }
}

#[async_trait]
impl Sink for PgSink {
    async fn apply(
        &mut self,
        batch: &mut Batch,
        plans: &[TablePlan],
        slot: &str,
    ) -> Result<crate::apply::Applied, ApplyError> {
        batch.apply(&mut self.0, plans, slot, &mut self.1).await
    }

    async fn read_checkpoint(&mut self, slot: &str) -> Result<Option<Lsn>, ApplyError> {
        crate::apply::read_checkpoint(&self.0, slot).await
    }

    async fn write_checkpoint(&mut self, slot: &str, lsn: Lsn) -> Result<(), ApplyError> {
        crate::apply::write_checkpoint(&self.0, slot, lsn).await
    }

    async fn forget_checkpoint(&mut self, slot: &str) -> Result<(), ApplyError> {
        self.0
            .execute(
                &format!("DELETE FROM {CHECKPOINT_TABLE} WHERE slot = $1"),
                &[&slot],
            )
            .await
            .map(drop)
            .map_err(ApplyError::Checkpoint)
    }

    fn postgres(&self) -> Option<&Client> {
        Some(&self.0)
    }

    fn applies_parts(&self) -> bool {
        true
    }
}
