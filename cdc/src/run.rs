//! Running CDC: check, snapshot inside the slot's exported snapshot, then stream
//! from the slot's position, applying batches of whole transactions.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt, TryStreamExt};
use pg_walstream::{
    CancellationToken, EventType, LogicalReplicationStream, ReplicationError,
    ReplicationSlotOptions, ReplicationStreamConfig, StreamingMode,
};
use tokio_postgres::{Client, NoTls};

use crate::apply::{ApplyError, Batch, ensure_checkpoint_table};
use crate::config::CdcConfig;
use crate::lsn::Lsn;
use crate::plan::{CheckError, TablePlan, ident};

/// Why CDC stopped.
#[derive(Debug, thiserror::Error)]
pub enum CdcError {
    /// A database could not be reached.
    #[error("cannot connect to the {side} database: {source}")]
    Connect {
        /// "source" or "target".
        side: &'static str,
        /// Why.
        #[source]
        source: tokio_postgres::Error,
    },
    /// A mapping does not fit the schemas.
    #[error(transparent)]
    Check(#[from] CheckError),
    /// A query on the source failed.
    #[error("source: {0}")]
    Source(#[source] tokio_postgres::Error),
    /// The replication stream failed.
    #[error("replication: {0}")]
    Replication(#[from] ReplicationError),
    /// Applying to the target failed; the stream stops there.
    #[error(transparent)]
    Apply(#[from] ApplyError),
    /// The snapshot copy of a table failed.
    #[error("snapshot of {table}: {message}")]
    Snapshot {
        /// The target table.
        table: String,
        /// Why.
        message: String,
    },
    /// The Prometheus endpoint could not listen.
    #[error("cannot serve metrics on {addr}: {source}")]
    Metrics {
        /// `[observe] metrics_listen`.
        addr: std::net::SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Creating the slot exported no snapshot to copy in.
    #[error("the source exported no snapshot with the new slot")]
    NoExportedSnapshot,
    /// The task applying batches ended without saying why, or panicked.
    #[error("the applier stopped: {0}")]
    ApplierStopped(String),
    /// Setting the target's keys, indexes and foreign keys aside, or building them back.
    #[error("snapshot keys and indexes: {what}: {message}")]
    Deferred {
        /// The step.
        what: String,
        /// The database's message.
        message: String,
    },
    /// `cdc verify` waited for the stream to reach the source's position in vain.
    #[error(
        "the target has applied up to {applied} but the source is at {goal}; is `strangler cdc run` running?"
    )]
    NotCaughtUp {
        /// The target's checkpoint ("nothing" without one).
        applied: String,
        /// The source's position when verify started.
        goal: Lsn,
    },
    /// A MySQL/MariaDB source or target failed.
    #[error("{message}")]
    MySql {
        /// What happened.
        message: String,
        /// Only the connection was lost (retried with backoff).
        transient: bool,
    },
    /// The command does not support this kind of source yet.
    #[error("{0}")]
    Unsupported(String),
    /// The slot is gone while the target says streaming had started: changes since
    /// the checkpoint are lost, so continuing would leave the target silently behind.
    #[error(
        "replication slot {slot} no longer exists on the source, but the target was applied up to {lsn}: changes after that are lost. \
         Re-copy with `strangler cdc run --resnapshot` (truncates the mapped target tables and copies them again)"
    )]
    SlotLost {
        /// The slot.
        slot: String,
        /// Where the target was.
        lsn: Lsn,
    },
}

pub(crate) async fn connect(url: &str, side: &'static str) -> Result<Client, CdcError> {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .map_err(|source| CdcError::Connect { side, source })?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::warn!("{side} connection closed: {e}");
        }
    });
    Ok(client)
}

/// Checks every mapping against both databases without moving a row.
pub async fn check(config: &CdcConfig) -> Result<Vec<TablePlan>, CdcError> {
    if crate::mysql::is_mysql(&config.source) {
        return crate::mysql::check(config).await;
    }
    let source = connect(&config.source, "source").await?;
    if crate::mysql::is_mysql(&config.target) {
        return Ok(crate::mysql::MySqlSink::connect(config, &source).await?.1);
    }
    let target = connect(&config.target, "target").await?;
    let mut plans = Vec::new();
    for m in &config.mappings {
        plans.push(crate::plan::check(m, &source, &target).await?);
    }
    Ok(plans)
}

/// Options of a run.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Drop the slot and the checkpoint, truncate the targets and copy again.
    pub resnapshot: bool,
    /// Stops the run (after the transaction being received) when cancelled.
    pub stop: Option<CancellationToken>,
    /// Where metrics and spans go; one is made from the config when `None`.
    pub observe: Option<Arc<crate::observe::Observe>>,
}

/// Progress visible to `strangler cdc status` and the metrics.
#[derive(Debug, Default)]
pub struct Progress {
    /// Applied position.
    pub applied: std::sync::atomic::AtomicU64,
    /// Rows applied since start.
    pub rows: std::sync::atomic::AtomicU64,
    /// Transactions applied since start.
    pub transactions: std::sync::atomic::AtomicU64,
    /// Conflicts found (rows changed on both sides) since start.
    pub conflicts: std::sync::atomic::AtomicU64,
}

/// A replication connection string for `url`.
pub(crate) fn replication_url(url: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}replication=database")
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
pub(crate) async fn slot_position(source: &Client, slot: &str) -> Result<Option<Lsn>, CdcError> {
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
            Err(e) if e.to_string().contains("is active") => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(CdcError::Source(e)),
        }
    }
    Ok(())
}

/// Copies one table (or one key range of it) inside the exported snapshot: the
/// mapping runs on the source (`COPY (SELECT …) TO STDOUT`) and streams straight
/// into `COPY … FROM STDIN` on the target. Rows copied are added to `copied` as
/// they pass (COPY text has one row per line).
async fn copy_table(
    config: &CdcConfig,
    plan: &TablePlan,
    snapshot: &str,
    range: Option<(i64, i64)>,
    copied: &std::sync::atomic::AtomicU64,
    truncate_first: bool,
) -> Result<u64, CdcError> {
    let fail = |message: String| CdcError::Snapshot {
        table: plan.target.quoted(),
        message,
    };
    let source = connect(&config.source, "source").await?;
    let mut target = connect(&config.target, "target").await?;
    source
        .batch_execute(&format!(
            "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET TRANSACTION SNAPSHOT '{}'",
            snapshot.replace('\'', "''")
        ))
        .await
        .map_err(|e| fail(format!("cannot enter the exported snapshot: {e}")))?;
    let tx = target
        .transaction()
        .await
        .map_err(|e| fail(e.to_string()))?;
    // Foreign keys between target tables would make parallel copies order-dependent;
    // as PostgreSQL's own apply workers do, skip triggers for this session if allowed.
    let _ = tx
        .batch_execute("SET LOCAL session_replication_role = replica")
        .await;
    if truncate_first {
        tx.batch_execute(&format!("TRUNCATE {}", plan.target.quoted()))
            .await
            .map_err(|e| fail(db_message(&e)))?;
    }
    // Binary COPY when every value already has its target column's type: nothing is
    // printed as text on the source and parsed again on the target.
    let binary = same_types(&source, &tx, plan, range).await;
    let (out_sql, in_sql) = if binary {
        (
            format!("{} (FORMAT binary)", plan.copy_out_range(range)),
            format!("{} (FORMAT binary)", plan.copy_in_sql),
        )
    } else {
        (plan.copy_out_range(range), plan.copy_in_sql.clone())
    };
    let out = source
        .copy_out(&out_sql)
        .await
        .map_err(|e| fail(format!("source: {e}")))?;
    let sink = tx
        .copy_in::<_, bytes::Bytes>(&in_sql)
        .await
        .map_err(|e| fail(format!("target: {e}")))?;
    futures::pin_mut!(out);
    futures::pin_mut!(sink);
    while let Some(chunk) = out
        .try_next()
        .await
        .map_err(|e| fail(format!("source: {e}")))?
    {
        if !binary {
            // Text COPY has one row per line: progress as rows pass.
            let lines = chunk.iter().filter(|b| **b == b'\n').count() as u64;
            copied.fetch_add(lines, std::sync::atomic::Ordering::Relaxed);
        }
        sink.send(chunk)
            .await
            .map_err(|e| fail(format!("target: {}", db_message(&e))))?;
    }
    let rows = sink
        .finish()
        .await
        .map_err(|e| fail(format!("target: {}", db_message(&e))))?;
    if binary {
        copied.fetch_add(rows, std::sync::atomic::Ordering::Relaxed);
    }
    tx.commit().await.map_err(|e| fail(e.to_string()))?;
    let _ = source.batch_execute("COMMIT").await;
    tracing::debug!(table = %plan.target.quoted(), rows, binary, "copy finished");
    Ok(rows)
}

/// Whether the snapshot SELECT's columns have exactly the target columns' types
/// (binary COPY needs that; otherwise text COPY lets the target convert).
async fn same_types(
    source: &Client,
    target: &tokio_postgres::Transaction<'_>,
    plan: &TablePlan,
    range: Option<(i64, i64)>,
) -> bool {
    let (Ok(out), Ok(into)) = (
        source.prepare(&plan.select_range(range)).await,
        target.prepare(&plan.target_columns_sql()).await,
    ) else {
        return false;
    };
    out.columns().len() == into.columns().len()
        && out
            .columns()
            .iter()
            .zip(into.columns())
            .all(|(a, b)| a.type_() == b.type_())
}

/// Copies one table in a snapshot exported by another slot, emptying the target
/// table in the same transaction (re-snapshot while streaming).
pub(crate) async fn copy_whole_table(
    config: &CdcConfig,
    plan: &TablePlan,
    snapshot: &str,
) -> Result<u64, CdcError> {
    let copied = std::sync::atomic::AtomicU64::new(0);
    copy_table(config, plan, snapshot, None, &copied, true).await
}

async fn copy_logged(
    config: &CdcConfig,
    plan: &TablePlan,
    snapshot: String,
    range: Option<(i64, i64)>,
    copied: Arc<std::sync::atomic::AtomicU64>,
) -> Result<(String, u64), CdcError> {
    let t0 = Instant::now();
    let rows = copy_table(config, plan, &snapshot, range, &copied, false).await?;
    tracing::info!(
        table = %plan.target.quoted(),
        rows,
        rows_per_s = rows as f64 / t0.elapsed().as_secs_f64().max(1e-6),
        "snapshot copied"
    );
    Ok((plan.target.quoted(), rows))
}

/// The copies to run: one per table, or key ranges of large integer-keyed tables.
async fn snapshot_pieces(
    source: &Client,
    plans: &[TablePlan],
    parallelism: usize,
    split_rows: i64,
) -> Result<(Vec<(usize, Option<(i64, i64)>)>, u64), CdcError> {
    let mut pieces = Vec::new();
    let mut estimate = 0u64;
    for (i, p) in plans.iter().enumerate() {
        let rows: i64 = source
            .query_one(
                "SELECT greatest(reltuples, 0)::int8 FROM pg_class WHERE oid = $1::text::regclass",
                &[&p.source.quoted()],
            )
            .await
            .map_err(CdcError::Source)?
            .get(0);
        estimate += u64::try_from(rows).unwrap_or(0);
        let split = match p.integer_key() {
            Some(key) if rows > split_rows && parallelism > 1 => {
                let row = source
                    .query_one(
                        &format!(
                            "SELECT min({k})::int8, max({k})::int8 FROM {}",
                            p.source.quoted(),
                            k = ident(key)
                        ),
                        &[],
                    )
                    .await
                    .map_err(CdcError::Source)?;
                match (row.get::<_, Option<i64>>(0), row.get::<_, Option<i64>>(1)) {
                    (Some(lo), Some(hi)) if hi > lo => Some((lo, hi)),
                    _ => None,
                }
            }
            _ => None,
        };
        match split {
            Some((lo, hi)) => {
                // Bounds come from outside the snapshot, so the first and last ranges
                // are open-ended: rows inserted since still fall in one of them.
                let n = parallelism as i64;
                let step = ((hi - lo) / n).max(1);
                let mut at = i64::MIN;
                for k in 1..=n {
                    let end = if k == n { i64::MAX } else { lo + step * k };
                    pieces.push((i, Some((at, end))));
                    at = end;
                }
            }
            None => pieces.push((i, None)),
        }
    }
    Ok((pieces, estimate))
}

/// Shows snapshot progress: a bar on a terminal, a log line every 5 s otherwise.
fn report_progress(
    copied: Arc<std::sync::atomic::AtomicU64>,
    estimate: u64,
) -> tokio::task::JoinHandle<()> {
    use std::io::IsTerminal;
    tokio::spawn(async move {
        let started = Instant::now();
        if std::io::stderr().is_terminal() {
            let bar = indicatif::ProgressBar::new(estimate.max(1));
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "snapshot [{bar:40}] {human_pos}/{human_len} rows  {per_sec}  ETA {eta}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            loop {
                let n = copied.load(std::sync::atomic::Ordering::Relaxed);
                if n > bar.length().unwrap_or(0) {
                    bar.set_length(n);
                }
                bar.set_position(n);
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        } else {
            loop {
                tokio::time::sleep(Duration::from_secs(5)).await;
                let n = copied.load(std::sync::atomic::Ordering::Relaxed);
                let rate = n as f64 / started.elapsed().as_secs_f64().max(1e-6);
                let eta = estimate.saturating_sub(n) as f64 / rate.max(1.0);
                tracing::info!(
                    rows = n,
                    estimate,
                    rows_per_s = rate as u64,
                    eta_s = eta as u64,
                    "snapshot progress"
                );
            }
        }
    })
}

fn db_message(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(d) => match d.detail() {
            Some(detail) => format!("{} ({detail})", d.message()),
            None => d.message().to_string(),
        },
        None => e.to_string(),
    }
}

/// Runs CDC until `options.stop` is cancelled or an error stops it.
pub async fn run(config: &CdcConfig, options: RunOptions) -> Result<(), CdcError> {
    let progress = Arc::new(Progress::default());
    run_with(config, options, progress).await
}

/// [`run`] reporting into `progress`. A lost connection to either database (a
/// restart, a failover, a network blip) is retried with backoff, resuming from the
/// target's checkpoint; anything else stops with the error.
pub async fn run_with(
    config: &CdcConfig,
    mut options: RunOptions,
    progress: Arc<Progress>,
) -> Result<(), CdcError> {
    let observe = match &options.observe {
        Some(o) => Arc::clone(o),
        None => {
            let o = Arc::new(crate::observe::Observe::new(
                config.otlp_endpoint.as_deref(),
            ));
            if let Some(addr) = config.metrics_listen {
                crate::observe::serve(addr, Arc::clone(&o))
                    .await
                    .map_err(|source| CdcError::Metrics { addr, source })?;
            }
            options.observe = Some(Arc::clone(&o));
            o
        }
    };
    if crate::mysql::is_mysql(&config.source) {
        let result = retrying(options, &observe, |options| {
            crate::mysql::run(config, options, Arc::clone(&progress), &observe)
        })
        .await;
        observe.shutdown();
        return result;
    }
    let sampler = tokio::spawn(sample_lag(config.source.clone(), Arc::clone(&observe)));
    let result = retrying(options, &observe, |options| {
        let progress = Arc::clone(&progress);
        async move { run_once(config, &options, progress).await }
    })
    .await;
    sampler.abort();
    observe.shutdown();
    result
}

/// Samples the source's position every second for `strangler_cdc_lag_bytes`.
async fn sample_lag(source_url: String, observe: Arc<crate::observe::Observe>) {
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

/// Runs `attempt` until it ends well or fails for a reason other than a lost
/// connection; a lost connection (either database restarting, a failover, a network
/// blip) is retried with backoff, each attempt resuming from the target's checkpoint.
async fn retrying<F, Fut>(
    mut options: RunOptions,
    observe: &crate::observe::Observe,
    mut attempt: F,
) -> Result<(), CdcError>
where
    F: FnMut(RunOptions) -> Fut,
    Fut: std::future::Future<Output = Result<(), CdcError>>,
{
    let mut backoff = Duration::from_millis(200);
    loop {
        let started = Instant::now();
        match attempt(options.clone()).await {
            Ok(()) => return Ok(()),
            Err(e) if e.is_transient() => {
                observe.errors.with_label_values(&["transient"]).inc();
                if options
                    .stop
                    .as_ref()
                    .is_some_and(CancellationToken::is_cancelled)
                {
                    return Ok(());
                }
                if started.elapsed() > Duration::from_secs(30) {
                    backoff = Duration::from_millis(200);
                }
                tracing::warn!(
                    "{e}; reconnecting in {backoff:?}, resuming from the target's checkpoint"
                );
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
                options.resnapshot = false;
            }
            Err(e) => {
                observe.errors.with_label_values(&["fatal"]).inc();
                return Err(e);
            }
        }
    }
}

impl CdcError {
    /// A lost connection rather than a problem with the data or the setup.
    pub fn is_transient(&self) -> bool {
        fn pg(e: &tokio_postgres::Error) -> bool {
            e.is_closed()
                || e.as_db_error().is_some_and(|d| {
                    let code = d.code().code();
                    code.starts_with("08") || code.starts_with("57P")
                })
                || e.as_db_error().is_none()
        }
        match self {
            CdcError::Connect { .. } => true,
            CdcError::MySql { transient, .. } => *transient,
            CdcError::Source(e) => pg(e),
            CdcError::Replication(e) => matches!(
                e,
                ReplicationError::TransientConnection(_)
                    | ReplicationError::ReplicationConnection(_)
                    | ReplicationError::Io(_)
                    | ReplicationError::Timeout(_)
                    | ReplicationError::Protocol(_)
            ),
            CdcError::Apply(ApplyError::Checkpoint(e)) => pg(e),
            CdcError::Apply(ApplyError::Lost { .. }) => true,
            CdcError::Apply(ApplyError::Rejected { message, .. }) => {
                message.contains("connection closed") || message.contains("terminating connection")
            }
            _ => false,
        }
    }
}

/// The target as a sink, and the checked plans: PostgreSQL, or MySQL/MariaDB for
/// the reverse direction (stream only: its tables already hold the data).
async fn sink_and_plans(
    config: &CdcConfig,
    source: &Client,
) -> Result<(Box<dyn crate::sink::Sink>, Vec<TablePlan>), CdcError> {
    if crate::mysql::is_mysql(&config.target) {
        if config.snapshot {
            return Err(CdcError::Unsupported(
                "a MySQL/MariaDB target is for the reverse direction (new → legacy), whose tables already hold the data: \
                 set [apply] snapshot = false"
                    .into(),
            ));
        }
        let (sink, plans) = crate::mysql::MySqlSink::connect(config, source).await?;
        return Ok((Box::new(sink), plans));
    }
    let target = connect(&config.target, "target").await?;
    // A snapshot killed half-way left keys, indexes and foreign keys set aside: they
    // come back before anything else (the mappings are checked against the keys).
    let restored = crate::deferred::restore(&target, &config.slot).await?;
    if restored != crate::deferred::Deferred::default() {
        tracing::info!(
            keys = restored.keys,
            indexes = restored.indexes,
            foreign_keys = restored.foreign_keys,
            "restored what an interrupted snapshot had set aside"
        );
    }
    let mut plans = Vec::new();
    for (m, policy) in config.mappings.iter().zip(&config.conflicts) {
        plans.push(
            crate::plan::check(m, source, &target)
                .await?
                .with_conflict(Some(policy))?,
        );
    }
    crate::apply::tag_origin(&target, &config.origin).await?;
    ensure_checkpoint_table(&target).await?;
    Ok((Box::new(crate::sink::PgSink::new(target)), plans))
}

async fn run_once(
    config: &CdcConfig,
    options: &RunOptions,
    progress: Arc<Progress>,
) -> Result<(), CdcError> {
    let source = connect(&config.source, "source").await?;
    let (mut target, plans) = sink_and_plans(config, &source).await?;
    ensure_publication(&source, config, &plans).await?;
    if options.resnapshot {
        drop_slot(&source, &config.slot).await?;
        target.forget_checkpoint(&config.slot).await?;
    }
    let checkpoint = target.read_checkpoint(&config.slot).await?;
    let slot = slot_position(&source, &config.slot).await?;
    let stream_config = ReplicationStreamConfig::builder(&config.slot, &config.publication)
        .with_protocol_version(1)
        .with_streaming_mode(StreamingMode::Off)
        // Heartbeat messages (see stream_changes) come through as commits.
        .with_messages(true)
        .with_feedback_interval(Duration::from_secs(1));
    let start = match (checkpoint, slot) {
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
                drop_slot(&source, &config.slot).await?;
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
            let consistent = slot_position(&source, &config.slot)
                .await?
                .unwrap_or_default();
            if !config.snapshot {
                // Stream only (e.g. the reverse direction, whose target already
                // holds the data): changes from the slot's creation on.
                target.write_checkpoint(&config.slot, consistent).await?;
                tracing::info!(lsn = %consistent, "no snapshot (apply.snapshot = false); streaming");
                stream.start(None).await?;
                (stream, consistent)
            } else {
                let started = Instant::now();
                // Empty the targets first, together (foreign keys between them), so key
                // ranges of one table can load in parallel.
                let tables: Vec<String> = plans.iter().map(|p| p.target.quoted()).collect();
                let Some(pg) = target.postgres() else {
                    return Err(CdcError::Unsupported(
                        "only a PostgreSQL target takes a snapshot".into(),
                    ));
                };
                pg.batch_execute(&format!("TRUNCATE {}", tables.join(", ")))
                    .await
                    .map_err(|e| CdcError::Snapshot {
                        table: tables.join(", "),
                        message: db_message(&e),
                    })?;
                let deferred = crate::deferred::set_aside(pg, &config.slot, &tables).await?;
                if deferred != crate::deferred::Deferred::default() {
                    tracing::info!(
                        keys = deferred.keys,
                        indexes = deferred.indexes,
                        foreign_keys = deferred.foreign_keys,
                        "keys, indexes and foreign keys set aside until the snapshot is loaded"
                    );
                }
                let (pieces, estimate) = snapshot_pieces(
                    &source,
                    &plans,
                    config.snapshot_parallelism,
                    config.split_rows,
                )
                .await?;
                let copied = Arc::new(std::sync::atomic::AtomicU64::new(0));
                let reporter = report_progress(Arc::clone(&copied), estimate);
                let copies: Vec<_> = pieces
                    .iter()
                    .map(|(i, range)| {
                        copy_logged(
                            config,
                            &plans[*i],
                            snapshot.clone(),
                            *range,
                            Arc::clone(&copied),
                        )
                    })
                    .collect();
                let results: Vec<Result<(String, u64), CdcError>> = futures::stream::iter(copies)
                    .buffer_unordered(config.snapshot_parallelism)
                    .collect()
                    .await;
                reporter.abort();
                let mut total = 0;
                for r in results {
                    total += r?.1;
                }
                let loaded = started.elapsed();
                if let Some(pg) = target.postgres() {
                    let built = crate::deferred::restore(pg, &config.slot).await?;
                    if built != crate::deferred::Deferred::default() {
                        tracing::info!(
                            keys = built.keys,
                            indexes = built.indexes,
                            foreign_keys = built.foreign_keys,
                            seconds = (started.elapsed() - loaded).as_secs_f64(),
                            "keys, indexes and foreign keys built"
                        );
                    }
                }
                target.write_checkpoint(&config.slot, consistent).await?;
                tracing::info!(
                    rows = total,
                    seconds = started.elapsed().as_secs_f64(),
                    lsn = %consistent,
                    "snapshot complete; streaming"
                );
                stream.start(None).await?;
                (stream, consistent)
            }
        }
    };
    let (mut stream, from) = start;
    progress
        .applied
        .store(from.0, std::sync::atomic::Ordering::Relaxed);
    stream_changes(
        config,
        &source,
        &plans,
        &mut stream,
        target,
        from,
        options.stop.clone(),
        progress,
        options.observe.clone(),
    )
    .await
}

/// The task applying batches to the target, fed through a short queue.
struct Applier {
    queue: Option<tokio::sync::mpsc::Sender<Batch>>,
    task: tokio::task::JoinHandle<Result<(), CdcError>>,
    tables: usize,
    handed: u64,
    applied: Arc<std::sync::atomic::AtomicU64>,
}

impl Applier {
    fn spawn(
        mut target: Box<dyn crate::sink::Sink>,
        plans: Arc<Vec<TablePlan>>,
        config: CdcConfig,
        progress: Arc<Progress>,
        observe: Option<Arc<crate::observe::Observe>>,
        feedback: Arc<pg_walstream::SharedLsnFeedback>,
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
                if let Some(lsn) = applied {
                    feedback.update_applied_lsn(lsn.0);
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

    /// Waits until every batch handed over is committed.
    async fn drain(&mut self) -> Result<(), CdcError> {
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
    async fn hand_over(&mut self, batch: &mut Batch) -> Result<(), CdcError> {
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
    async fn finish(mut self) -> Result<(), CdcError> {
        self.queue = None;
        match self.task.await {
            Ok(result) => result,
            Err(e) => Err(CdcError::ApplierStopped(format!("it panicked: {e}"))),
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

#[allow(clippy::too_many_arguments)]
async fn stream_changes(
    config: &CdcConfig,
    source: &Client,
    plans: &[TablePlan],
    stream: &mut LogicalReplicationStream,
    target: Box<dyn crate::sink::Sink>,
    from: Lsn,
    stop: Option<CancellationToken>,
    progress: Arc<Progress>,
    observe: Option<Arc<crate::observe::Observe>>,
) -> Result<(), CdcError> {
    let by_name: HashMap<(String, String), usize> = plans
        .iter()
        .enumerate()
        .map(|(i, p)| ((p.source.schema.clone(), p.source.name.clone()), i))
        .collect();
    let feedback = Arc::clone(&stream.shared_lsn_feedback);
    // A large source transaction goes to the target in parts of `batch_rows` that
    // commit together, so applying it overlaps decoding it; not with conflict
    // checks, which compare with whole transactions' before images.
    let parts = target.applies_parts() && !plans.iter().any(|p| p.conflict.detects());
    // Applying runs beside reading: while the target commits one batch, the next
    // is decoded. The slot is told only what the applier has committed.
    let mut applier = Applier::spawn(
        target,
        Arc::new(plans.to_vec()),
        config.clone(),
        Arc::clone(&progress),
        observe.clone(),
        Arc::clone(&feedback),
    );
    let ticker = Ticker::start(config.batch_linger.max(Duration::from_millis(5)));
    let mut batch = Batch::new(plans.len());
    let mut in_transaction = false;
    let mut skipping = false;
    // Per table: changes committed at or before this position are already in a
    // re-snapshot taken while streaming, and are skipped.
    let mut copied_until: Vec<u64> = vec![0; plans.len()];
    let mut tx_commit: u64 = 0;
    let mut foreign_origin = false;
    // Re-snapshot requests live in a PostgreSQL target.
    let control = if crate::mysql::is_mysql(&config.target) {
        None
    } else {
        Some(connect(&config.target, "target").await?)
    };
    let mut last_poll = Instant::now();
    let mut last_commit = Instant::now();
    loop {
        if stop.as_ref().is_some_and(CancellationToken::is_cancelled) && !in_transaction {
            if !batch.is_empty() {
                applier.hand_over(&mut batch).await?;
            }
            return applier.finish().await;
        }
        let token = ticker.token();
        let event = match stream.next_event(&token).await {
            Ok(event) => event,
            Err(ReplicationError::Cancelled(_)) => {
                // A tick: apply what lingered, or advance the slot on an idle stream.
                if applier.task.is_finished() {
                    return applier.finish().await;
                }
                if let Some(control) = &control
                    && !in_transaction
                    && last_poll.elapsed() >= Duration::from_millis(500)
                {
                    last_poll = Instant::now();
                    if let Some((id, t, name)) =
                        crate::resnapshot::next_request(control, &config.slot, plans).await
                    {
                        if !batch.is_empty() {
                            applier.hand_over(&mut batch).await?;
                        }
                        applier.drain().await?;
                        let outcome = match t {
                            Some(t) => crate::resnapshot::copy_while_streaming(config, &plans[t])
                                .await
                                .map(|(rows, at)| {
                                    copied_until[t] = at.0;
                                    rows
                                }),
                            None => Err(CdcError::Snapshot {
                                table: name.clone(),
                                message: "no mapping writes this table".into(),
                            }),
                        };
                        crate::resnapshot::finish_request(control, id, &outcome).await;
                        match outcome {
                            Ok(rows) => {
                                tracing::info!(table = %name, rows, "re-snapshot done; streaming continues")
                            }
                            Err(e) => tracing::error!(table = %name, "re-snapshot failed: {e}"),
                        }
                    }
                }
                if !in_transaction {
                    if !batch.is_empty() {
                        applier.hand_over(&mut batch).await?;
                    } else if last_commit.elapsed() >= config.heartbeat {
                        // Nothing of ours committed for a while, but the server may be
                        // writing WAL elsewhere that the slot holds on to. A heartbeat
                        // (a transactional logical message) comes back through the
                        // stream as a commit, which moves the checkpoint and the slot
                        // past everything before it. The stream's own received position
                        // cannot be used: it is the server's WAL end, which may lie past
                        // changes not yet sent.
                        last_commit = Instant::now();
                        if let Err(e) = source
                            .execute(
                                "SELECT pg_logical_emit_message(true, 'strangler_cdc', $1)",
                                &[&config.slot],
                            )
                            .await
                        {
                            tracing::warn!("heartbeat on the source failed: {e}");
                        }
                    }
                }
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        match &event.event_type {
            EventType::Begin { final_lsn, .. } => {
                in_transaction = true;
                tx_commit = final_lsn.value();
                // Committed before the checkpoint we resumed from: already applied
                // (the server resends from the slot's position, which may be older).
                skipping = final_lsn.value() < from.0;
                foreign_origin = false;
            }
            // Written by strangler applying the other direction: applying it back
            // would bounce every change between the databases for ever.
            EventType::Origin { origin_name, .. }
                if !config.ignore_origin_prefix.is_empty()
                    && origin_name.starts_with(config.ignore_origin_prefix.as_str()) =>
            {
                foreign_origin = true;
            }
            _ if foreign_origin && !matches!(&event.event_type, EventType::Commit { .. }) => {}
            EventType::Insert {
                schema,
                table,
                data,
                ..
            } if !skipping => {
                if let Some(&t) = by_name.get(&(schema.to_string(), table.to_string()))
                    && tx_commit > copied_until[t]
                {
                    batch.insert(t, &plans[t], data)?;
                    if parts && batch.changes >= config.batch_rows {
                        batch.open = true;
                        applier.hand_over(&mut batch).await?;
                    }
                }
            }
            EventType::Update {
                schema,
                table,
                old_data,
                new_data,
                ..
            } if !skipping => {
                if let Some(&t) = by_name.get(&(schema.to_string(), table.to_string()))
                    && tx_commit > copied_until[t]
                {
                    batch.update(t, &plans[t], old_data.as_ref(), new_data)?;
                    if parts && batch.changes >= config.batch_rows {
                        batch.open = true;
                        applier.hand_over(&mut batch).await?;
                    }
                }
            }
            EventType::Delete {
                schema,
                table,
                old_data,
                ..
            } if !skipping => {
                if let Some(&t) = by_name.get(&(schema.to_string(), table.to_string()))
                    && tx_commit > copied_until[t]
                {
                    batch.delete(t, &plans[t], old_data)?;
                    if parts && batch.changes >= config.batch_rows {
                        batch.open = true;
                        applier.hand_over(&mut batch).await?;
                    }
                }
            }
            EventType::Truncate { tables, .. } if !skipping => {
                for name in tables {
                    let (s, n) = crate::plan::split_name(name);
                    if let Some(&t) = by_name.get(&(s, n))
                        && tx_commit > copied_until[t]
                    {
                        batch.truncate(t);
                    }
                }
            }
            EventType::Relation {
                namespace,
                relation_name,
                columns,
                ..
            } => {
                if let Some(&t) = by_name.get(&(namespace.to_string(), relation_name.to_string())) {
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
                in_transaction = false;
                last_commit = Instant::now();
                if skipping {
                    skipping = false;
                    continue;
                }
                batch.commit(
                    Lsn(end_lsn.value()),
                    Some(std::time::SystemTime::from(*commit_timestamp)),
                );
                let full = batch.changes >= config.batch_rows;
                let lingered = batch
                    .first_commit
                    .is_some_and(|t| t.elapsed() >= config.batch_linger);
                if full || lingered {
                    applier.hand_over(&mut batch).await?;
                }
            }
            _ => {}
        }
    }
}

pub(crate) async fn apply_batch(
    batch: &mut Batch,
    target: &mut dyn crate::sink::Sink,
    plans: &[TablePlan],
    config: &CdcConfig,
    progress: &Progress,
    observe: Option<&crate::observe::Observe>,
) -> Result<Option<Lsn>, CdcError> {
    use std::sync::atomic::Ordering::Relaxed;
    let end = batch.end_lsn;
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
    if let Some(o) = observe {
        o.batch(started, t0.elapsed(), end.0, txs, &by_table, oldest);
    }
    progress.applied.store(end.0, Relaxed);
    progress.transactions.fetch_add(txs, Relaxed);
    Ok(Some(end))
}

/// Where replication stands, for `strangler cdc status`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Status {
    /// The slot.
    pub slot: String,
    /// Whether the slot exists.
    pub slot_exists: bool,
    /// A walsender is streaming from it.
    pub slot_active: bool,
    /// The source's current WAL position.
    pub source_lsn: String,
    /// Position the slot has confirmed (the source may recycle WAL before it).
    pub confirmed_lsn: Option<String>,
    /// Position applied in the target (its checkpoint).
    pub applied_lsn: Option<String>,
    /// Bytes of source WAL not yet applied.
    pub lag_bytes: Option<u64>,
    /// Bytes of WAL the source retains for the slot.
    pub retained_bytes: Option<u64>,
    /// Seconds since the target's checkpoint last moved.
    pub checkpoint_age_seconds: Option<f64>,
}

/// Reads the slot on the source and the checkpoint on the target.
pub async fn status(config: &CdcConfig) -> Result<Status, CdcError> {
    crate::mysql::refuse(config, "cdc status")?;
    let source = connect(&config.source, "source").await?;
    let target = connect(&config.target, "target").await?;
    let current: String = source
        .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
        .await
        .map_err(CdcError::Source)?
        .get(0);
    let current_lsn: Lsn = current.parse().unwrap_or_default();
    let slot = source
        .query_opt(
            "SELECT active, confirmed_flush_lsn::text, restart_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
            &[&config.slot],
        )
        .await
        .map_err(CdcError::Source)?;
    let checkpoint = target
        .query_opt(
            &format!(
                "SELECT lsn::text, extract(epoch FROM now() - updated_at)::float8 FROM {} WHERE slot = $1",
                crate::apply::CHECKPOINT_TABLE
            ),
            &[&config.slot],
        )
        .await
        .ok()
        .flatten();
    let applied: Option<Lsn> = checkpoint
        .as_ref()
        .and_then(|r| r.get::<_, String>(0).parse().ok());
    let restart: Option<Lsn> = slot
        .as_ref()
        .and_then(|r| r.get::<_, Option<String>>(2))
        .and_then(|s| s.parse().ok());
    Ok(Status {
        slot: config.slot.clone(),
        slot_exists: slot.is_some(),
        slot_active: slot.as_ref().is_some_and(|r| r.get::<_, bool>(0)),
        source_lsn: current,
        confirmed_lsn: slot.as_ref().and_then(|r| r.get::<_, Option<String>>(1)),
        applied_lsn: applied.map(|l| l.to_string()),
        lag_bytes: applied.map(|a| current_lsn.bytes_since(a)),
        retained_bytes: restart.map(|r| current_lsn.bytes_since(r)),
        checkpoint_age_seconds: checkpoint.as_ref().map(|r| r.get::<_, f64>(1)),
    })
}
