//! `strangler cdc verify` for a MySQL/MariaDB source.

use std::time::{Duration, Instant};

use mysql_async::Conn;
use mysql_async::prelude::Queryable;
use tokio_postgres::Client;

use crate::config::CdcConfig;
use crate::error::CdcError;
use crate::mysql::{mysql_conn, mysql_error, snapshot_text};
use crate::ops::verify::TableReport;
use crate::pg::connect;
use crate::plan::TablePlan;
use crate::sink::postgres::read_checkpoint;
use crate::source::mysql::{binlog_end, snapshot_error};

/// `strangler cdc verify` for a MySQL/MariaDB source: waits until the target's
/// checkpoint reaches the binlog position of the moment it starts (up to `wait`),
/// then maps every source row through the mapping on the target (the same SQL the
/// stream uses) and compares with the target's rows by target key. Rows that
/// differ are compared up to three more times, a second apart, so rows changing
/// during the run are reported only if they stay different. Whole tables are held
/// in memory: meant for tables up to a few million rows.
pub async fn verify_mysql(
    config: &CdcConfig,
    wait: Duration,
) -> Result<Vec<TableReport>, CdcError> {
    let mut conn = mysql_conn(&config.source).await?;
    let target = connect(&config.target, "target").await?;
    let src = crate::source::mysql::prepare(config, &mut conn, &target).await?;
    if let Some(goal) = binlog_end(&mut conn).await? {
        let deadline = Instant::now() + wait;
        loop {
            let at = read_checkpoint(&target, &config.slot).await?;
            if at.is_some_and(|(a, _)| a >= goal.checkpoint()) || Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let mut reports = Vec::new();
    for (t, plan) in src.plans.iter().enumerate() {
        let started = Instant::now();
        let mut report = compare_table(&mut conn, &target, plan, &src, t).await?;
        for _ in 0..3 {
            if report.clean() {
                break;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
            report = compare_table(&mut conn, &target, plan, &src, t).await?;
        }
        report.seconds = started.elapsed().as_secs_f64();
        reports.push(report);
    }
    Ok(reports)
}

async fn compare_table(
    conn: &mut Conn,
    target: &Client,
    plan: &TablePlan,
    src: &crate::source::mysql::Tables,
    t: usize,
) -> Result<TableReport, CdcError> {
    use std::collections::BTreeMap;
    let (sql, convs) = crate::source::mysql::source_select(plan, src, t);
    let tkey = |row: &[Option<String>]| -> String {
        plan.target
            .key
            .iter()
            .filter_map(|k| plan.mapping.outputs.iter().position(|o| &o.column == k))
            .map(|i| {
                row.get(i)
                    .cloned()
                    .flatten()
                    .unwrap_or_else(|| "NULL".into())
            })
            .collect::<Vec<_>>()
            .join(",")
    };
    let mut expected: BTreeMap<String, Vec<Option<String>>> = BTreeMap::new();
    let mut result = conn.query_iter(sql).await.map_err(mysql_error)?;
    let mut chunk: Vec<Vec<Option<String>>> = Vec::new();
    loop {
        let row = result.next().await.map_err(mysql_error)?;
        let done = row.is_none();
        if let Some(row) = row {
            chunk.push(
                row.unwrap()
                    .iter()
                    .zip(&convs)
                    .map(|(v, c)| snapshot_text(v, c))
                    .collect(),
            );
        }
        if chunk.len() >= 5_000 || (done && !chunk.is_empty()) {
            let rows: Vec<&Vec<Option<String>>> = chunk.iter().collect();
            for row in crate::sink::settle::map_rows(target, &plan.rows_sql, plan, &rows)
                .await?
                .into_values()
                .flatten()
            {
                expected.insert(tkey(&row), row);
            }
            chunk.clear();
        }
        if done {
            break;
        }
    }
    let cols = plan
        .mapping
        .outputs
        .iter()
        .map(|o| format!("{}::text", crate::plan::ident(&o.column)))
        .collect::<Vec<_>>()
        .join(", ");
    let mut actual: BTreeMap<String, Vec<Option<String>>> = BTreeMap::new();
    for r in target
        .query(&format!("SELECT {cols} FROM {}", plan.target.quoted()), &[])
        .await
        .map_err(|e| snapshot_error(plan, e))?
    {
        let row: Vec<Option<String>> = (0..r.len()).map(|i| r.get(i)).collect();
        actual.insert(tkey(&row), row);
    }
    let key_names = plan.target.key.join(",");
    let named = |k: &String| format!("{key_names}={k}");
    Ok(TableReport {
        table: plan.target.quoted(),
        source_rows: expected.len() as i64,
        target_rows: actual.len() as i64,
        missing: expected
            .keys()
            .filter(|k| !actual.contains_key(*k))
            .map(named)
            .collect(),
        extra: actual
            .keys()
            .filter(|k| !expected.contains_key(*k))
            .map(named)
            .collect(),
        different: expected
            .iter()
            .filter(|(k, v)| actual.get(*k).is_some_and(|a| a != *v))
            .map(|(k, _)| named(k))
            .collect(),
        ranges_compared: 0,
        seconds: 0.0,
    })
}
