//! The pipeline between any source and any sink: one stream loop with reconnect
//! and backoff, batching whole transactions, handing them to the applier's task,
//! heartbeats on an idle stream, and re-snapshot requests.

pub mod applier;

use std::sync::Arc;
use std::time::{Duration, Instant};

use pg_walstream::CancellationToken;

use crate::batch::Batch;
use crate::config::{CdcConfig, Kind};
use crate::error::CdcError;
use crate::observe::Observe;
use crate::pg::connect;
use crate::plan::TablePlan;
use crate::sink::Sink;
use crate::sink::postgres::{PgSink, requests};
use crate::source::mysql::MySqlSource;
use crate::source::postgres::PgSource;
use crate::source::{Source, Step};
use applier::Applier;

/// Options of a run.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Drop the slot and the checkpoint, truncate the targets and copy again.
    pub resnapshot: bool,
    /// Stops the run (after the transaction being received) when cancelled.
    pub stop: Option<CancellationToken>,
    /// Where metrics and spans go; one is made from the config when `None`.
    pub observe: Option<Arc<Observe>>,
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

/// Runs CDC until `options.stop` is cancelled or an error stops it.
pub async fn run(config: &CdcConfig, options: RunOptions) -> Result<(), CdcError> {
    let progress = Arc::new(Progress::default());
    run_with(config, options, progress).await
}

/// [`run`] reporting into `progress`. A lost connection to either database (a
/// restart, a failover, a network blip) is retried with backoff, resuming from the
/// target's checkpoint, whatever the source; anything else stops with the error.
pub async fn run_with(
    config: &CdcConfig,
    mut options: RunOptions,
    progress: Arc<Progress>,
) -> Result<(), CdcError> {
    let observe = match &options.observe {
        Some(o) => Arc::clone(o),
        None => {
            let o = Arc::new(Observe::new(config.otlp_endpoint.as_deref()));
            if let Some(addr) = config.metrics_listen {
                crate::observe::serve(addr, Arc::clone(&o))
                    .await
                    .map_err(|source| CdcError::Metrics { addr, source })?;
            }
            options.observe = Some(Arc::clone(&o));
            o
        }
    };
    // `strangler_cdc_lag_bytes` needs the source's WAL position.
    let sampler = (config.source_kind == Kind::Postgres).then(|| {
        tokio::spawn(crate::source::postgres::sample_lag(
            config.source.clone(),
            Arc::clone(&observe),
        ))
    });
    let result = retrying(options, &observe, |options| {
        let progress = Arc::clone(&progress);
        async move { run_once(config, &options, progress).await }
    })
    .await;
    if let Some(s) = sampler {
        s.abort();
    }
    observe.shutdown();
    result
}

/// One attempt: opens the source's stream and the sink, then streams.
async fn run_once(
    config: &CdcConfig,
    options: &RunOptions,
    progress: Arc<Progress>,
) -> Result<(), CdcError> {
    let (mut source, target, plans): (Box<dyn Source>, Box<dyn Sink>, Vec<TablePlan>) =
        match config.source_kind {
            Kind::Postgres => {
                let client = connect(&config.source, "source").await?;
                let (mut target, plans) = crate::sink::open(config, &client).await?;
                let source =
                    PgSource::start(config, options.resnapshot, client, target.as_mut(), &plans)
                        .await?;
                (Box::new(source), target, plans)
            }
            Kind::MySql => {
                if config.target_kind != Kind::Postgres {
                    return Err(CdcError::Unsupported(
                        "a MySQL/MariaDB source streams into a PostgreSQL target".into(),
                    ));
                }
                let mut target = connect(&config.target, "target").await?;
                let source = MySqlSource::start(config, options.resnapshot, &mut target).await?;
                let plans = source.plans().to_vec();
                (Box::new(source), Box::new(PgSink::new(target)), plans)
            }
        };
    progress
        .applied
        .store(source.resumed_at().0, std::sync::atomic::Ordering::Relaxed);
    stream(
        config,
        &plans,
        source.as_mut(),
        target,
        options.stop.clone(),
        progress,
        options.observe.clone(),
    )
    .await
}

/// Runs `attempt` until it ends well or fails for a reason other than a lost
/// connection; a lost connection (either database restarting, a failover, a network
/// blip) is retried with backoff, each attempt resuming from the target's checkpoint.
async fn retrying<F, Fut>(
    mut options: RunOptions,
    observe: &Observe,
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

/// The one stream loop, whatever the source and the sink: whole transactions are
/// gathered into batches (a batch goes when it holds `batch_rows` changes or has
/// lingered `batch_ms`; a larger transaction goes in parts the sink commits
/// together), applied on their own task while the next is read, with a heartbeat
/// on an idle stream and re-snapshot requests served between transactions.
async fn stream(
    config: &CdcConfig,
    plans: &[TablePlan],
    source: &mut dyn Source,
    target: Box<dyn Sink>,
    stop: Option<CancellationToken>,
    progress: Arc<Progress>,
    observe: Option<Arc<Observe>>,
) -> Result<(), CdcError> {
    // A large source transaction goes to the target in parts of `batch_rows` that
    // commit together, so applying it overlaps reading it; not with conflict
    // checks, which compare with whole transactions' before images.
    let parts = target.applies_parts() && !plans.iter().any(|p| p.conflict.detects());
    let mut applier = Applier::spawn(
        target,
        Arc::new(plans.to_vec()),
        config.clone(),
        progress,
        observe,
        source.on_applied(),
    );
    let mut batch = Batch::new(plans.len());
    // Re-snapshot requests wait in a PostgreSQL target.
    let control = if config.target_kind == Kind::Postgres {
        Some(connect(&config.target, "target").await?)
    } else {
        None
    };
    let mut last_poll = Instant::now();
    let mut last_commit = Instant::now();
    loop {
        if stop.as_ref().is_some_and(CancellationToken::is_cancelled) && !source.in_transaction() {
            if !batch.is_empty() {
                applier.hand_over(&mut batch).await?;
            }
            return applier.finish().await;
        }
        match source.next(&mut batch, plans).await? {
            Step::Change => {
                if parts && batch.changes >= config.batch_rows {
                    batch.open = true;
                    applier.hand_over(&mut batch).await?;
                }
            }
            Step::Commit => {
                last_commit = Instant::now();
                let full = batch.changes >= config.batch_rows;
                let lingered = batch
                    .first_commit
                    .is_some_and(|t| t.elapsed() >= config.batch_linger);
                if full || lingered {
                    applier.hand_over(&mut batch).await?;
                }
            }
            Step::Other => {}
            Step::Stop(why) => {
                if !batch.is_empty() && !source.in_transaction() {
                    applier.hand_over(&mut batch).await?;
                }
                applier.drain().await?;
                return Err(CdcError::Apply(why));
            }
            Step::Idle => {
                if applier.is_finished() {
                    return applier.finish().await;
                }
                if source.in_transaction() {
                    continue;
                }
                if let Some(control) = &control
                    && last_poll.elapsed() >= Duration::from_millis(500)
                {
                    last_poll = Instant::now();
                    if let Some((id, t, name)) =
                        requests::next_request(control, &config.slot, plans).await
                    {
                        if !batch.is_empty() {
                            applier.hand_over(&mut batch).await?;
                        }
                        applier.drain().await?;
                        let outcome = match t {
                            Some(t) => source.resnapshot(config, plans, t).await,
                            None => Err(CdcError::Snapshot {
                                table: name.clone(),
                                message: "no mapping writes this table".into(),
                            }),
                        };
                        requests::finish_request(control, id, &outcome).await;
                        match outcome {
                            Ok(rows) => {
                                tracing::info!(table = %name, rows, "re-snapshot done; streaming continues")
                            }
                            Err(e) => tracing::error!(table = %name, "re-snapshot failed: {e}"),
                        }
                    }
                }
                if !batch.is_empty() {
                    applier.hand_over(&mut batch).await?;
                } else if last_commit.elapsed() >= config.heartbeat {
                    last_commit = Instant::now();
                    source.heartbeat().await;
                }
            }
        }
    }
}
