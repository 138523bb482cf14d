//! The PostgreSQL source's snapshot: each mapped table (or range of its pages) is
//! copied inside the slot's exported snapshot by `COPY (SELECT <mapping>) TO
//! STDOUT` on the source streamed into `COPY … FROM STDIN` on the target, binary
//! when every column already has its target type.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt, TryStreamExt};
use pg_walstream::{LogicalReplicationStream, ReplicationSlotOptions, ReplicationStreamConfig};
use tokio_postgres::Client;

use crate::config::{CdcConfig, Kind};
use crate::error::CdcError;
use crate::model::Lsn;
use crate::pg::{connect, db_message, replication_url};
use crate::plan::{Pages, TablePlan};
use crate::sink::Sink;

/// Copies every mapped table into the target inside the exported `snapshot`: the
/// target empties its tables and sets their keys, indexes and foreign keys aside,
/// the copies run `config.snapshot_parallelism` at a time (page ranges of large
/// tables in parallel), then the target builds back what it set
/// aside.
pub async fn copy_all(
    config: &CdcConfig,
    source: &Client,
    target: &mut dyn Sink,
    plans: &[TablePlan],
    snapshot: &str,
) -> Result<(), CdcError> {
    if config.target_kind != Kind::Postgres {
        return Err(CdcError::Unsupported(
            "a MySQL/MariaDB target is for the reverse direction (new → legacy), whose tables already hold the data: \
             set [apply] snapshot = false"
                .into(),
        ));
    }
    let started = Instant::now();
    target.begin_snapshot(&config.slot, plans).await?;
    let (pieces, estimate) = snapshot_pieces(
        source,
        plans,
        config.snapshot_parallelism,
        config.split_rows,
    )
    .await?;
    let copied = Arc::new(AtomicU64::new(0));
    let reporter = report_progress(Arc::clone(&copied), estimate);
    let copies: Vec<_> = pieces
        .iter()
        .map(|(i, range)| {
            copy_logged(
                config,
                &plans[*i],
                snapshot.to_string(),
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
    target.end_snapshot(&config.slot).await?;
    tracing::info!(
        rows = total,
        seconds = started.elapsed().as_secs_f64(),
        "snapshot complete; streaming"
    );
    Ok(())
}

/// Bytes gathered into one COPY message to the target.
const COPY_CHUNK: usize = 64 * 1024;

/// Copies one table (or one range of its pages) inside the exported snapshot: the
/// mapping runs on the source (`COPY (SELECT …) TO STDOUT`) and streams straight
/// into `COPY … FROM STDIN` on the target. Rows copied are added to `copied` as
/// they pass (COPY text has one row per line).
async fn copy_table(
    config: &CdcConfig,
    plan: &TablePlan,
    snapshot: &str,
    range: Option<Pages>,
    copied: &AtomicU64,
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
    // The source sends one message per row; they are gathered into 64 KiB
    // messages for the target (a flush per row would cost a write per row).
    let mut buf = bytes::BytesMut::with_capacity(COPY_CHUNK + 16 * 1024);
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
        buf.extend_from_slice(&chunk);
        if buf.len() >= COPY_CHUNK {
            sink.feed(buf.split().freeze())
                .await
                .map_err(|e| fail(format!("target: {}", db_message(&e))))?;
        }
    }
    if !buf.is_empty() {
        sink.feed(buf.split().freeze())
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
    range: Option<Pages>,
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
pub async fn copy_whole_table(
    config: &CdcConfig,
    plan: &TablePlan,
    snapshot: &str,
) -> Result<u64, CdcError> {
    let copied = AtomicU64::new(0);
    copy_table(config, plan, snapshot, None, &copied, true).await
}

async fn copy_logged(
    config: &CdcConfig,
    plan: &TablePlan,
    snapshot: String,
    range: Option<Pages>,
    copied: Arc<AtomicU64>,
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

/// The copies to run: one per table, or, for a table estimated above `split_rows`
/// rows, `parallelism` ranges of its pages, each read by a TID range scan (any
/// table, whatever its key; each page is read once). The estimate is the sum of
/// the tables' row estimates, for the progress bar.
async fn snapshot_pieces(
    source: &Client,
    plans: &[TablePlan],
    parallelism: usize,
    split_rows: i64,
) -> Result<(Vec<(usize, Option<Pages>)>, u64), CdcError> {
    let mut pieces = Vec::new();
    let mut estimate = 0u64;
    for (i, p) in plans.iter().enumerate() {
        let row = source
            .query_one(
                "SELECT greatest(reltuples, 0)::int8, \
                        (pg_relation_size(oid) / current_setting('block_size')::int8)::int8 \
                 FROM pg_class WHERE oid = $1::text::regclass",
                &[&p.source.quoted()],
            )
            .await
            .map_err(CdcError::Source)?;
        let (rows, pages): (i64, i64) = (row.get(0), row.get(1));
        estimate += u64::try_from(rows).unwrap_or(0);
        let pages = u64::try_from(pages).unwrap_or(0);
        if rows > split_rows && parallelism > 1 && pages >= parallelism as u64 {
            for range in Pages::split(pages, parallelism as u64) {
                pieces.push((i, Some(range)));
            }
        } else {
            pieces.push((i, None));
        }
    }
    Ok((pieces, estimate))
}

/// Shows snapshot progress: a bar on a terminal, a log line every 5 s otherwise.
fn report_progress(copied: Arc<AtomicU64>, estimate: u64) -> tokio::task::JoinHandle<()> {
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

/// Copies `plan`'s table in a fresh exported snapshot; returns the rows and the
/// snapshot's position.
pub async fn copy_while_streaming(
    config: &CdcConfig,
    plan: &TablePlan,
) -> Result<(u64, Lsn), CdcError> {
    let source = connect(&config.source, "source").await?;
    let slot = format!("{}_resnap_{}", config.slot, std::process::id());
    let stream_config = ReplicationStreamConfig::builder(&slot, &config.publication)
        .with_protocol_version(1)
        .with_slot_options(ReplicationSlotOptions {
            temporary: true,
            snapshot: Some("export".into()),
            ..ReplicationSlotOptions::default()
        });
    // Temporary: it disappears with this connection, whatever happens below.
    let mut stream =
        LogicalReplicationStream::new(&replication_url(&config.source), stream_config).await?;
    stream.ensure_replication_slot().await?;
    let snapshot = stream
        .exported_snapshot_name()
        .map(str::to_string)
        .ok_or_else(|| CdcError::Snapshot {
            table: plan.target.quoted(),
            message: "the source exported no snapshot".into(),
        })?;
    let at = super::slot_position(&source, &slot)
        .await?
        .ok_or_else(|| CdcError::Snapshot {
            table: plan.target.quoted(),
            message: format!("temporary slot {slot} vanished"),
        })?;
    let rows = copy_whole_table(config, plan, &snapshot).await?;
    drop(stream);
    Ok((rows, at))
}
