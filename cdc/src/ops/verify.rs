//! `strangler cdc verify`: are source and target the same, through the mapping?
//!
//! Per table, both sides hash the mapped rows (the source runs the mapping, cast
//! to the target's column types; the target reads its columns) over ranges of the
//! key. Ranges whose counts or hashes differ are split until they are small, then
//! compared row by row. Consistency while traffic continues: the source position
//! is read first and the target must have applied up to it; keys that still differ
//! are compared again (up to three times) so rows changing during the run are not
//! reported as differences unless they stay different.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use tokio_postgres::Client;

use crate::config::CdcConfig;
use crate::error::CdcError;
use crate::model::Lsn;
use crate::pg::connect;
use crate::plan::{TablePlan, ident};
use crate::sink::postgres::read_checkpoint;

/// Ranges at or below this many rows are compared row by row.
const LEAF_ROWS: i64 = 2_000;
/// Ranges a differing range is split into.
const FANOUT: i64 = 16;

/// One table's verdict.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TableReport {
    /// Target table.
    pub table: String,
    /// Rows the mapping yields on the source.
    pub source_rows: i64,
    /// Rows in the target.
    pub target_rows: i64,
    /// Keys present on the source only.
    pub missing: Vec<String>,
    /// Keys present on the target only.
    pub extra: Vec<String>,
    /// Keys on both sides with different values.
    pub different: Vec<String>,
    /// Range checksums computed.
    pub ranges_compared: u64,
    /// Seconds taken.
    pub seconds: f64,
}

impl TableReport {
    /// No difference.
    pub fn clean(&self) -> bool {
        self.missing.is_empty() && self.extra.is_empty() && self.different.is_empty()
    }
}

/// A side's view of a table: SQL producing `(key text, hash text)` rows.
struct Side<'a> {
    client: &'a Client,
    /// `SELECT <key expr> AS k, md5(row(<cols>)::text) AS h FROM … ` with a
    /// `{range}` placeholder for the key condition.
    rows_sql: String,
    /// The key expression: the column's for ranges over a numeric key, a row of
    /// every key column's for a composite key.
    key_expr: String,
}

fn sides<'a>(plan: &TablePlan, source: &'a Client, target: &'a Client) -> (Side<'a>, Side<'a>) {
    let m = &plan.mapping;
    let keys = &plan.target.key;
    let ty = |col: &str| {
        plan.target
            .columns
            .iter()
            .find(|c| c.name == col)
            .map_or_else(|| "text".to_string(), |c| c.type_sql.clone())
    };
    let src_cols = m
        .outputs
        .iter()
        .map(|o| format!("({})::{}", o.sql, ty(&o.column)))
        .collect::<Vec<_>>()
        .join(", ");
    let src_part = |col: &String| {
        m.outputs
            .iter()
            .find(|o| &o.column == col)
            .map(|o| format!("({})::{}", o.sql, ty(&o.column)))
            .unwrap_or_default()
    };
    // Every key column: a composite key compared by its first column alone folded
    // the rows sharing it into one (each side keeping an arbitrary one), and
    // reported equal rows as different.
    let (src_key, tgt_key) = match keys.as_slice() {
        [one] => (src_part(one), ident(one)),
        many => (
            format!(
                "row({})",
                many.iter().map(src_part).collect::<Vec<_>>().join(", ")
            ),
            format!(
                "row({})",
                many.iter().map(|k| ident(k)).collect::<Vec<_>>().join(", ")
            ),
        ),
    };
    let qualifier = m.source_table.clone();
    let filter = m
        .filter
        .as_ref()
        .map(|f| format!("({}) AND ", f.sql))
        .unwrap_or_default();
    let source_rows = format!(
        "SELECT ({src_key})::text AS k, md5(row({src_cols})::text) AS h FROM {} AS {} WHERE {filter}{{range}}",
        plan.source.quoted(),
        ident(&qualifier)
    );
    let tgt_cols = m
        .outputs
        .iter()
        .map(|o| ident(&o.column))
        .collect::<Vec<_>>()
        .join(", ");
    let target_rows = format!(
        "SELECT ({tgt_key})::text AS k, md5(row({tgt_cols})::text) AS h FROM {} WHERE {{range}}",
        plan.target.quoted()
    );
    (
        Side {
            client: source,
            rows_sql: source_rows,
            key_expr: src_key,
        },
        Side {
            client: target,
            rows_sql: target_rows,
            key_expr: tgt_key,
        },
    )
}

impl Side<'_> {
    fn range(&self, lo: i64, hi: i64) -> String {
        format!("({k}) >= {lo} AND ({k}) < {hi}", k = self.key_expr)
    }

    async fn summary(&self, lo: i64, hi: i64) -> Result<(i64, String), tokio_postgres::Error> {
        let sql = format!(
            "SELECT count(*), coalesce(md5(string_agg(h, '' ORDER BY k)), '') FROM ({}) AS r",
            self.rows_sql.replace("{range}", &self.range(lo, hi))
        );
        let row = self.client.query_one(&sql, &[]).await?;
        Ok((row.get(0), row.get(1)))
    }

    async fn rows(
        &self,
        condition: &str,
    ) -> Result<BTreeMap<String, String>, tokio_postgres::Error> {
        let sql = self.rows_sql.replace("{range}", condition);
        Ok(self
            .client
            .query(&sql, &[])
            .await?
            .iter()
            .map(|r| (r.get::<_, Option<String>>(0).unwrap_or_default(), r.get(1)))
            .collect())
    }

    async fn bounds(&self) -> Result<Option<(i64, i64)>, tokio_postgres::Error> {
        let sql = format!(
            "SELECT min(k::numeric)::int8, max(k::numeric)::int8 FROM ({}) AS r",
            self.rows_sql.replace("{range}", "true")
        );
        let row = self.client.query_one(&sql, &[]).await?;
        Ok(
            match (row.get::<_, Option<i64>>(0), row.get::<_, Option<i64>>(1)) {
                (Some(lo), Some(hi)) => Some((lo, hi)),
                _ => None,
            },
        )
    }
}

fn diff(
    source: &BTreeMap<String, String>,
    target: &BTreeMap<String, String>,
    report: &mut TableReport,
) {
    for (k, h) in source {
        match target.get(k) {
            None => report.missing.push(k.clone()),
            Some(t) if t != h => report.different.push(k.clone()),
            Some(_) => {}
        }
    }
    for k in target.keys() {
        if !source.contains_key(k) {
            report.extra.push(k.clone());
        }
    }
}

/// Compares one table.
async fn verify_table(
    plan: &TablePlan,
    source: &Client,
    target: &Client,
) -> Result<TableReport, CdcError> {
    let started = Instant::now();
    let (src, tgt) = sides(plan, source, target);
    let mut report = TableReport {
        table: plan.target.quoted(),
        source_rows: 0,
        target_rows: 0,
        missing: Vec::new(),
        extra: Vec::new(),
        different: Vec::new(),
        ranges_compared: 0,
        seconds: 0.0,
    };
    let numeric_key = plan.target.key.len() == 1
        && plan
            .target
            .columns
            .iter()
            .find(|c| Some(&c.name) == plan.target.key.first())
            .is_some_and(|c| matches!(c.type_sql.as_str(), "integer" | "bigint" | "smallint"));
    if !numeric_key {
        // Composite or non-integer keys: row by row over the whole table.
        let (s, t) = (
            src.rows("true").await.map_err(CdcError::Source)?,
            tgt.rows("true").await.map_err(CdcError::Source)?,
        );
        report.source_rows = s.len() as i64;
        report.target_rows = t.len() as i64;
        diff(&s, &t, &mut report);
    } else {
        let bounds = match (
            src.bounds().await.map_err(CdcError::Source)?,
            tgt.bounds().await.map_err(CdcError::Source)?,
        ) {
            (Some(a), Some(b)) => Some((a.0.min(b.0), a.1.max(b.1))),
            (Some(a), None) | (None, Some(a)) => Some(a),
            (None, None) => None,
        };
        if let Some((lo, hi)) = bounds {
            let mut pending = vec![(lo, hi.saturating_add(1))];
            let mut first = true;
            while let Some((lo, hi)) = pending.pop() {
                let (s, t) = (
                    src.summary(lo, hi).await.map_err(CdcError::Source)?,
                    tgt.summary(lo, hi).await.map_err(CdcError::Source)?,
                );
                report.ranges_compared += 1;
                if first {
                    report.source_rows = s.0;
                    report.target_rows = t.0;
                    first = false;
                }
                if s == t {
                    continue;
                }
                if s.0.max(t.0) <= LEAF_ROWS || hi - lo <= FANOUT {
                    let (sr, tr) = (
                        src.rows(&src.range(lo, hi))
                            .await
                            .map_err(CdcError::Source)?,
                        tgt.rows(&tgt.range(lo, hi))
                            .await
                            .map_err(CdcError::Source)?,
                    );
                    diff(&sr, &tr, &mut report);
                    continue;
                }
                let step = ((hi - lo) / FANOUT).max(1);
                let mut at = lo;
                while at < hi {
                    let end = (at + step).min(hi);
                    pending.push((at, end));
                    at = end;
                }
            }
        }
    }
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

/// Waits until the target's checkpoint reaches the source's current position.
async fn wait_applied(
    config: &CdcConfig,
    source: &Client,
    target: &Client,
    timeout: Duration,
) -> Result<(), CdcError> {
    let goal: Lsn = source
        .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
        .await
        .map_err(CdcError::Source)?
        .get::<_, String>(0)
        .parse()
        .unwrap_or_default();
    // A commit after the goal, so an idle stream moves the checkpoint past it now
    // rather than at its next heartbeat.
    source
        .execute(
            "SELECT pg_logical_emit_message(true, 'strangler_cdc', 'verify')",
            &[],
        )
        .await
        .map_err(CdcError::Source)?;
    let deadline = Instant::now() + timeout;
    loop {
        let applied = read_checkpoint(target, &config.slot)
            .await?
            .map(|(lsn, _)| lsn);
        if applied.is_some_and(|a| a >= goal) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(CdcError::NotCaughtUp {
                applied: applied.map_or("nothing".into(), |a| a.to_string()),
                goal,
            });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Compares every mapped table; differences are re-checked so rows changing
/// during the run are reported only if they stay different.
pub async fn verify(config: &CdcConfig, wait: Duration) -> Result<Vec<TableReport>, CdcError> {
    if config.source_kind == crate::config::Kind::MySql {
        return super::verify_mysql::verify_mysql(config, wait).await;
    }
    let source = connect(&config.source, "source").await?;
    let target = connect(&config.target, "target").await?;
    let mut plans = Vec::new();
    for m in &config.mappings {
        plans.push(crate::plan::check(m, &source, &target).await?);
    }
    let mut reports = Vec::new();
    for plan in &plans {
        wait_applied(config, &source, &target, wait).await?;
        let mut report = verify_table(plan, &source, &target).await?;
        for _ in 0..3 {
            if report.clean() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
            wait_applied(config, &source, &target, wait).await?;
            let (src, tgt) = sides(plan, &source, &target);
            let keys: Vec<String> = report
                .missing
                .iter()
                .chain(&report.extra)
                .chain(&report.different)
                .cloned()
                .collect();
            let list = keys
                .iter()
                .map(|k| format!("'{}'", k.replace('\'', "''")))
                .collect::<Vec<_>>()
                .join(", ");
            let condition = |key_expr: &str| format!("({key_expr})::text IN ({list})");
            let (s, t) = (
                src.rows(&condition(&src.key_expr))
                    .await
                    .map_err(CdcError::Source)?,
                tgt.rows(&condition(&tgt.key_expr))
                    .await
                    .map_err(CdcError::Source)?,
            );
            report.missing.clear();
            report.extra.clear();
            report.different.clear();
            diff(&s, &t, &mut report);
        }
        reports.push(report);
    }
    Ok(reports)
}
