//! PostgreSQL as the source: a publication for the mapped tables, a logical
//! replication slot whose exported snapshot the first copy runs in, then the
//! slot's `pgoutput` stream from the target's checkpoint. Changes of transactions
//! written by strangler's other direction (their replication origin) are skipped,
//! and a heartbeat moves the slot on an idle stream.

pub mod snapshot;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pg_walstream::{
    CancellationToken, ColumnValue, EventType, LogicalReplicationStream, ReplicationError,
    ReplicationSlotOptions, ReplicationStreamConfig, RowData, StreamingMode,
};
use tokio_postgres::Client;

use crate::batch::Batch;
use crate::config::CdcConfig;
use crate::error::CdcError;
use crate::model::{Lsn, Position, Row};
use crate::observe::Observe;
use crate::pg::{connect, replication_url};
use crate::plan::{TablePlan, ident, split_name};
use crate::sink::Sink;
use crate::source::{Committed, Source, Step};

/// The logical replication stream of a PostgreSQL source (`pgoutput`, decoded by
/// `pg_walstream`), started at the target's checkpoint or after a snapshot
/// taken inside the new slot's exported snapshot.
pub struct PgSource {
    client: Client,
    stream: LogicalReplicationStream,
    by_name: HashMap<(String, String), usize>,
    ticker: Ticker,
    /// Where the stream resumed: transactions committed before it are applied.
    from: Lsn,
    in_transaction: bool,
    skipping: bool,
    foreign_origin: bool,
    tx_commit: u64,
    /// Per table: changes committed at or before this position are already in a
    /// re-snapshot taken while streaming, and are skipped.
    copied_until: Vec<u64>,
    ignore_origin_prefix: String,
    slot: String,
}

impl PgSource {
    /// Prepares the publication and the slot and opens the stream: from the
    /// target's checkpoint, or (without one) from a new slot, after copying the
    /// mapped tables inside its exported snapshot when `config.snapshot` is on.
    /// `resnapshot` drops the slot and the checkpoint first.
    pub async fn start(
        config: &CdcConfig,
        resnapshot: bool,
        client: Client,
        target: &mut dyn Sink,
        plans: &[TablePlan],
    ) -> Result<Self, CdcError> {
        let source = &client;
        ensure_publication(source, config, plans).await?;
        if resnapshot {
            drop_slot(source, &config.slot).await?;
            target.forget_checkpoint(&config.slot).await?;
        }
        let checkpoint = target
            .read_checkpoint(&config.slot)
            .await?
            .map(|(lsn, _)| lsn);
        let slot = slot_position(source, &config.slot).await?;
        let stream_config = ReplicationStreamConfig::builder(&config.slot, &config.publication)
            .with_protocol_version(1)
            .with_streaming_mode(StreamingMode::Off)
            // Heartbeat messages (see `heartbeat`) come through as commits.
            .with_messages(true)
            .with_feedback_interval(Duration::from_secs(1));
        let (stream, from) = match (checkpoint, slot) {
            (Some(lsn), None) => {
                return Err(CdcError::SlotLost {
                    slot: config.slot.clone(),
                    lsn,
                });
            }
            (Some(lsn), Some(_)) => {
                tracing::info!(%lsn, slot = %config.slot, "resuming from the target's checkpoint");
                let mut stream =
                    LogicalReplicationStream::new(&replication_url(&config.source), stream_config)
                        .await?;
                stream.start(Some(lsn.0)).await?;
                (stream, lsn)
            }
            (None, existing) => {
                if existing.is_some() {
                    // A slot without a checkpoint: an earlier snapshot never finished.
                    tracing::warn!(slot = %config.slot, "slot without a finished snapshot; starting over");
                    drop_slot(source, &config.slot).await?;
                }
                let stream_config = stream_config.with_slot_options(ReplicationSlotOptions {
                    snapshot: Some("export".into()),
                    ..ReplicationSlotOptions::default()
                });
                let mut stream =
                    LogicalReplicationStream::new(&replication_url(&config.source), stream_config)
                        .await?;
                stream.ensure_replication_slot().await?;
                let snapshot = stream
                    .exported_snapshot_name()
                    .map(str::to_string)
                    .ok_or(CdcError::NoExportedSnapshot)?;
                let consistent = slot_position(source, &config.slot)
                    .await?
                    .unwrap_or_default();
                if config.snapshot {
                    snapshot::copy_all(config, source, target, plans, &snapshot).await?;
                } else {
                    // Stream only (e.g. the reverse direction, whose target already
                    // holds the data): changes from the slot's creation on.
                    tracing::info!(lsn = %consistent, "no snapshot (apply.snapshot = false); streaming");
                }
                target
                    .write_checkpoint(&config.slot, consistent, None)
                    .await?;
                stream.start(None).await?;
                (stream, consistent)
            }
        };
        Ok(Self {
            client,
            stream,
            by_name: plans
                .iter()
                .enumerate()
                .map(|(i, p)| ((p.source.schema.clone(), p.source.name.clone()), i))
                .collect(),
            ticker: Ticker::start(config.batch_linger.max(Duration::from_millis(5))),
            from,
            in_transaction: false,
            skipping: false,
            foreign_origin: false,
            tx_commit: 0,
            copied_until: vec![0; plans.len()],
            ignore_origin_prefix: config.ignore_origin_prefix.clone(),
            slot: config.slot.clone(),
        })
    }

    /// The plan index of a change's table, unless it is not mapped or its change
    /// is already in a re-snapshot taken while streaming.
    fn table(&self, schema: &str, table: &str) -> Option<usize> {
        self.by_name
            .get(&(schema.to_string(), table.to_string()))
            .copied()
            .filter(|t| self.tx_commit > self.copied_until[*t])
    }
}

impl Row for RowData {
    fn text(&self, name: &str) -> Option<Option<&[u8]>> {
        match self.get(name)? {
            ColumnValue::Null => Some(None),
            v => Some(Some(v.as_bytes())),
        }
    }
}

#[async_trait]
impl Source for PgSource {
    async fn next(&mut self, batch: &mut Batch, plans: &[TablePlan]) -> Result<Step, CdcError> {
        let token = self.ticker.token();
        let event = match self.stream.next_event(&token).await {
            Ok(event) => event,
            Err(ReplicationError::Cancelled(_)) => return Ok(Step::Idle),
            Err(e) => return Err(e.into()),
        };
        if self.foreign_origin && !matches!(&event.event_type, EventType::Commit { .. }) {
            return Ok(Step::Other);
        }
        let skipping = self.skipping;
        match &event.event_type {
            EventType::Begin { final_lsn, .. } => {
                self.in_transaction = true;
                self.tx_commit = final_lsn.value();
                // Committed before the checkpoint we resumed from: already applied
                // (the server resends from the slot's position, which may be older).
                self.skipping = final_lsn.value() < self.from.0;
                self.foreign_origin = false;
            }
            // Written by strangler applying the other direction: applying it back
            // would bounce every change between the databases for ever.
            EventType::Origin { origin_name, .. }
                if !self.ignore_origin_prefix.is_empty()
                    && origin_name.starts_with(self.ignore_origin_prefix.as_str()) =>
            {
                self.foreign_origin = true;
            }
            EventType::Insert {
                schema,
                table,
                data,
                ..
            } if !skipping => {
                if let Some(t) = self.table(schema, table) {
                    batch.insert(t, &plans[t], data)?;
                    return Ok(Step::Change);
                }
            }
            EventType::Update {
                schema,
                table,
                old_data,
                new_data,
                ..
            } if !skipping => {
                if let Some(t) = self.table(schema, table) {
                    let old = old_data.as_ref().map(|o| o as &dyn Row);
                    batch.update(t, &plans[t], old, new_data)?;
                    return Ok(Step::Change);
                }
            }
            EventType::Delete {
                schema,
                table,
                old_data,
                ..
            } if !skipping => {
                if let Some(t) = self.table(schema, table) {
                    batch.delete(t, &plans[t], old_data)?;
                    return Ok(Step::Change);
                }
            }
            EventType::Truncate { tables, .. } if !skipping => {
                for name in tables {
                    let (s, n) = split_name(name);
                    if let Some(t) = self.table(&s, &n) {
                        batch.truncate(t);
                    }
                }
                return Ok(Step::Change);
            }
            EventType::Relation {
                namespace,
                relation_name,
                columns,
                ..
            } => {
                if let Some(&t) = self
                    .by_name
                    .get(&(namespace.to_string(), relation_name.to_string()))
                {
                    let known: Vec<&str> = plans[t]
                        .source
                        .columns
                        .iter()
                        .map(|c| c.name.as_str())
                        .collect();
                    for c in columns {
                        if !known.contains(&c.name.as_ref()) {
                            tracing::warn!(
                                table = %plans[t].source.quoted(),
                                column = %c.name,
                                "column added to a source table; mappings that name it pick it up after a restart, others ignore it"
                            );
                        }
                    }
                }
            }
            EventType::Commit {
                end_lsn,
                commit_timestamp,
                ..
            } => {
                self.in_transaction = false;
                self.foreign_origin = false;
                if skipping {
                    self.skipping = false;
                    return Ok(Step::Other);
                }
                batch.commit(
                    Position::Lsn(Lsn(end_lsn.value())),
                    Some(std::time::SystemTime::from(*commit_timestamp)),
                );
                return Ok(Step::Commit);
            }
            _ => {}
        }
        Ok(Step::Other)
    }

    fn in_transaction(&self) -> bool {
        self.in_transaction
    }

    fn resumed_at(&self) -> Lsn {
        self.from
    }

    fn on_applied(&self) -> Committed {
        let feedback = Arc::clone(&self.stream.shared_lsn_feedback);
        Box::new(move |p: &Position| feedback.update_applied_lsn(p.checkpoint().0))
    }

    async fn heartbeat(&mut self) {
        // Nothing of ours committed for a while, but the server may be writing WAL
        // elsewhere that the slot holds on to. A heartbeat (a transactional logical
        // message) comes back through the stream as a commit, which moves the
        // checkpoint and the slot past everything before it. The stream's own
        // received position cannot be used: it is the server's WAL end, which may
        // lie past changes not yet sent.
        if let Err(e) = self
            .client
            .execute(
                "SELECT pg_logical_emit_message(true, 'strangler_cdc', $1)",
                &[&self.slot],
            )
            .await
        {
            tracing::warn!("heartbeat on the source failed: {e}");
        }
    }

    async fn resnapshot(
        &mut self,
        config: &CdcConfig,
        plans: &[TablePlan],
        t: usize,
    ) -> Result<u64, CdcError> {
        let (rows, at) = snapshot::copy_while_streaming(config, &plans[t]).await?;
        self.copied_until[t] = at.0;
        Ok(rows)
    }
}

async fn ensure_publication(
    source: &Client,
    config: &CdcConfig,
    plans: &[TablePlan],
) -> Result<(), CdcError> {
    let exists = source
        .query_opt(
            "SELECT 1 FROM pg_publication WHERE pubname = $1",
            &[&config.publication],
        )
        .await
        .map_err(CdcError::Source)?
        .is_some();
    let tables: Vec<String> = plans.iter().map(|p| p.source.quoted()).collect();
    if !exists {
        source
            .batch_execute(&format!(
                "CREATE PUBLICATION {} FOR TABLE {}",
                ident(&config.publication),
                tables.join(", ")
            ))
            .await
            .map_err(CdcError::Source)?;
        return Ok(());
    }
    for p in plans {
        let included = source
            .query_opt(
                "SELECT 1 FROM pg_publication_tables WHERE pubname = $1 AND schemaname = $2 AND tablename = $3",
                &[&config.publication, &p.source.schema, &p.source.name],
            )
            .await
            .map_err(CdcError::Source)?
            .is_some();
        if !included {
            source
                .batch_execute(&format!(
                    "ALTER PUBLICATION {} ADD TABLE {}",
                    ident(&config.publication),
                    p.source.quoted()
                ))
                .await
                .map_err(CdcError::Source)?;
        }
    }
    Ok(())
}

/// The slot's position as the source reports it.
pub async fn slot_position(source: &Client, slot: &str) -> Result<Option<Lsn>, CdcError> {
    let row = source
        .query_opt(
            "SELECT coalesce(confirmed_flush_lsn, restart_lsn)::text FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(CdcError::Source)?;
    Ok(row
        .and_then(|r| r.get::<_, Option<String>>(0))
        .and_then(|s| s.parse().ok()))
}

async fn drop_slot(source: &Client, slot: &str) -> Result<(), CdcError> {
    // A walsender that just went away may still hold it for a moment.
    for _ in 0..50 {
        let r = source
            .execute(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await;
        match r {
            Ok(_) => return Ok(()),
            // 55006 object_in_use ("replication slot … is active for PID …"), by code:
            // the error's Display is only "db error".
            Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::OBJECT_IN_USE) => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(CdcError::Source(e)),
        }
    }
    Ok(())
}

/// Samples the source's position every second for `strangler_cdc_lag_bytes`.
pub async fn sample_lag(source_url: String, observe: Arc<Observe>) {
    let mut client = None;
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        if client.is_none() {
            client = connect(&source_url, "source").await.ok();
        }
        let Some(c) = &client else { continue };
        match c
            .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
            .await
        {
            Ok(row) => {
                let here: Lsn = row.get::<_, String>(0).parse().unwrap_or_default();
                let applied = u64::try_from(observe.applied_lsn.get()).unwrap_or(0);
                observe
                    .lag_bytes
                    .set(i64::try_from(here.0.saturating_sub(applied)).unwrap_or(i64::MAX));
            }
            Err(_) => client = None,
        }
    }
}

/// Replaces the token the stream waits with every `tick`, so the loop regains
/// control on an idle stream (to apply a lingering batch and advance the slot).
struct Ticker {
    current: Arc<std::sync::Mutex<CancellationToken>>,
    task: tokio::task::JoinHandle<()>,
}

impl Ticker {
    fn start(tick: Duration) -> Self {
        let current = Arc::new(std::sync::Mutex::new(CancellationToken::new()));
        let shared = Arc::clone(&current);
        let task = tokio::spawn(async move {
            loop {
                tokio::time::sleep(tick).await;
                let old = {
                    let mut guard = shared.lock().unwrap_or_else(|p| p.into_inner());
                    std::mem::replace(&mut *guard, CancellationToken::new())
                };
                old.cancel();
            }
        });
        Self { current, task }
    }

    fn token(&self) -> CancellationToken {
        self.current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl Drop for Ticker {
    fn drop(&mut self) {
        self.task.abort();
    }
}
