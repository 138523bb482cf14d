//! Checking mappings against both schemas, and the SQL each table is applied with.
//!
//! Changed rows reach the target as text arrays (pgoutput's text format is each
//! type's output function, which its input function reads back exactly), are cast
//! to the source column types, and pass through the mapping's own expressions in
//! one `INSERT … SELECT … FROM unnest(…) ON CONFLICT DO UPDATE` per table and batch.

use std::collections::BTreeSet;

use tokio_postgres::Client;

use crate::error::CheckError;
use crate::mapping::{Mapping, Output};

/// A column as the catalog describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    /// Name.
    pub name: String,
    /// `format_type()` of its type.
    pub type_sql: String,
    /// The type changed rows are cast to: the column's type when it is a built-in
    /// type, `text` for enums, domains and other user types (which the other
    /// database may not have).
    pub cast: String,
    /// NOT NULL.
    pub not_null: bool,
    /// Has a default (or is generated/identity).
    pub has_default: bool,
}

/// A table as the catalog describes it.
#[derive(Debug, Clone)]
pub struct Table {
    /// Schema.
    pub schema: String,
    /// Name.
    pub name: String,
    /// Columns in order.
    pub columns: Vec<Column>,
    /// Primary key columns in key order.
    pub key: Vec<String>,
    /// `d`efault, `f`ull, `i`ndex or `n`othing.
    pub replica_identity: char,
}

impl Table {
    fn column(&self, name: &str) -> Option<&Column> {
        self.columns.iter().find(|c| c.name == name)
    }

    /// `"schema"."name"`.
    pub fn quoted(&self) -> String {
        format!("{}.{}", ident(&self.schema), ident(&self.name))
    }
}

/// Quotes an identifier for PostgreSQL.
pub fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Splits `schema.table` (default schema `public`).
pub fn split_name(name: &str) -> (String, String) {
    match name.split_once('.') {
        Some((s, t)) => (s.to_string(), t.to_string()),
        None => ("public".to_string(), name.to_string()),
    }
}

/// Reads a table's columns, key and replica identity; `None` when it does not exist.
pub async fn describe(
    client: &Client,
    side: &'static str,
    schema: &str,
    name: &str,
) -> Result<Option<Table>, CheckError> {
    let db = |source| CheckError::Db { side, source };
    let rel = client
        .query_opt(
            "SELECT c.oid, c.relreplident::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p')",
            &[&schema, &name],
        )
        .await
        .map_err(db)?;
    let Some(rel) = rel else {
        return Ok(None);
    };
    let oid: u32 = rel.get(0);
    let ident_kind: String = rel.get(1);
    let rows = client
        .query(
            "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod), \
                    (t.typtype = 'b' AND tn.nspname = 'pg_catalog') \
                      OR (t.typcategory = 'A' AND et.typtype = 'b' AND etn.nspname = 'pg_catalog'), \
                    a.attnotnull, a.atthasdef OR a.attidentity <> '' OR a.attgenerated <> '' \
             FROM pg_attribute a \
             JOIN pg_type t ON t.oid = a.atttypid JOIN pg_namespace tn ON tn.oid = t.typnamespace \
             LEFT JOIN pg_type et ON et.oid = t.typelem LEFT JOIN pg_namespace etn ON etn.oid = et.typnamespace \
             WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum",
            &[&oid],
        )
        .await
        .map_err(db)?;
    let columns = rows
        .iter()
        .map(|r| {
            let type_sql: String = r.get(1);
            let builtin: bool = r.get(2);
            Column {
                name: r.get(0),
                cast: if builtin {
                    type_sql.clone()
                } else {
                    "text".into()
                },
                type_sql,
                not_null: r.get(3),
                has_default: r.get(4),
            }
        })
        .collect();
    let key = client
        .query(
            "SELECT a.attname::text FROM pg_index i \
             JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey::int2[]) \
             WHERE i.indrelid = $1 AND i.indisprimary \
             ORDER BY array_position(i.indkey::int2[], a.attnum)",
            &[&oid],
        )
        .await
        .map_err(db)?
        .iter()
        .map(|r| r.get(0))
        .collect();
    Ok(Some(Table {
        schema: schema.to_string(),
        name: name.to_string(),
        columns,
        key,
        replica_identity: ident_kind.chars().next().unwrap_or('d'),
    }))
}

/// Everything needed to move one table: checked mapping, both tables, and SQL.
#[derive(Debug, Clone)]
pub struct TablePlan {
    /// The mapping (with `*` expanded).
    pub mapping: Mapping,
    /// The source table.
    pub source: Table,
    /// The target table.
    pub target: Table,
    /// Source columns carried in each change, in parameter order: the key first,
    /// then the other columns the mapping reads.
    pub carried: Vec<Column>,
    /// Insert-or-update of changed rows (one text[] parameter per carried column).
    pub upsert_sql: String,
    /// Removal of rows whose new version the filter rejects (same parameters).
    pub filtered_out_sql: Option<String>,
    /// Removal by source key (one text[] parameter per source key column).
    pub delete_sql: String,
    /// The snapshot load run on the target.
    pub copy_in_sql: String,
    /// For sinks that are not PostgreSQL: the mapped target rows (as text, in
    /// `mapping.outputs` order) of the changed rows the filter keeps, computed by
    /// PostgreSQL from the carried values (one text[] parameter per carried column).
    pub values_sql: String,
    /// Target keys (text) of changed rows the filter rejects (same parameters).
    pub filtered_out_keys_sql: Option<String>,
    /// Target keys (text) of deleted rows (one text[] parameter per source key column).
    pub delete_keys_sql: String,
    /// For conflict detection: per carried row, its source key (text), whether the
    /// filter keeps it (`true`/`false`), and the mapped target row (text,
    /// `mapping.outputs` order).
    pub rows_sql: String,
    /// [`TablePlan::rows_sql`] without the casts to the target's types (for a MySQL
    /// target, whose types PostgreSQL does not have).
    pub rows_text_sql: String,
    /// The target's current rows (text, `mapping.outputs` order) for target keys
    /// given as text (one text[] parameter per target key column).
    pub current_sql: String,
    /// How conflicts are resolved (set from the config after checking).
    pub conflict: crate::conflict::Policy,
    /// The same writes for large batches: through a staging table loaded by COPY.
    pub stage: StageSql,
    /// When the mapping only copies columns, each to a target column of the same
    /// type, with no filter: inserted rows can be COPYed straight into the target.
    pub direct_copy: Option<DirectCopy>,
}

/// A COPY of carried values straight into the target table.
#[derive(Debug, Clone)]
pub struct DirectCopy {
    /// `COPY target (columns) FROM STDIN` (text format).
    pub sql: String,
    /// Per target column in that statement, the carried column it takes.
    pub columns: Vec<usize>,
}

/// A PostgreSQL target's writes of a large batch of one table: the changed rows are
/// loaded by binary COPY into a temporary table of text columns (the carried
/// columns, then whether the row was deleted), and applied by set-based statements
/// that run the mapping over it, as [`TablePlan::upsert_sql`] does over arrays.
#[derive(Debug, Clone)]
pub struct StageSql {
    /// The staging table (`pg_temp.…`).
    pub table: String,
    /// Creates the session's staging table when missing (emptied at each commit).
    pub create: String,
    /// Loads it: `COPY … FROM STDIN (FORMAT binary)`, carried columns then the kind.
    pub copy_in: String,
    /// Plain insert of the rows the batch inserted: no conflict handling, so it
    /// fails if one is already there (then [`StageSql::upsert`] runs instead).
    pub insert: String,
    /// Insert-or-update of the rows the batch changed (not inserted).
    pub upsert_changed: String,
    /// Insert-or-update of every row present.
    pub upsert: String,
    /// Removal of rows whose new version the filter rejects.
    pub filtered_out: Option<String>,
    /// Removal of the rows deleted.
    pub delete: String,
}

/// The staging table's column saying what became of each row (a name no source
/// column is likely to have): one of the `STAGE_*` values.
const STAGE_KIND: &str = "strangler$kind";
/// Staged row kind: present, and absent before the batch (inserted by it).
pub const STAGE_INSERTED: i16 = 0;
/// Staged row kind: present, and possibly present before (updated by the batch).
pub const STAGE_CHANGED: i16 = 1;
/// Staged row kind: deleted (only its key is staged).
pub const STAGE_DELETED: i16 = 2;

impl TablePlan {
    /// The source key columns.
    pub fn source_key(&self) -> &[String] {
        &self.source.key
    }

    /// The plan with conflict policy `policy`; refused when the source does not send
    /// each change's whole old row, which detecting a conflict compares with.
    pub fn with_conflict(
        mut self,
        policy: Option<&crate::conflict::Policy>,
    ) -> Result<Self, CheckError> {
        let policy = policy.cloned().unwrap_or_default();
        if policy.detects() && self.source.replica_identity != 'f' {
            return Err(CheckError::Schema {
                target: self.mapping.target.clone(),
                message: format!(
                    "a conflict policy compares the target with each change's old row; run \
                     ALTER TABLE {} REPLICA IDENTITY FULL on the source so PostgreSQL sends it",
                    self.source.quoted()
                ),
            });
        }
        self.conflict = policy;
        Ok(self)
    }
}

/// Checks `mapping` against both databases and builds its SQL. Verifies, before any
/// row moves: both tables exist, the source has a primary key and a replica identity
/// that sends it, every column read exists, every output has a target column, the
/// target key is produced from the source key alone (so a delete can find its row),
/// required target columns are filled, and the target accepts the statement's types
/// (it is prepared there).
pub async fn check(
    mapping: &Mapping,
    source_db: &Client,
    target_db: &Client,
) -> Result<TablePlan, CheckError> {
    let fail = |message: String| CheckError::Schema {
        target: mapping.target.clone(),
        message,
    };
    let source = describe(
        source_db,
        "source",
        &mapping.source_schema,
        &mapping.source_table,
    )
    .await?
    .ok_or_else(|| {
        fail(format!(
            "source table {}.{} does not exist",
            mapping.source_schema, mapping.source_table
        ))
    })?;
    let plan = check_with(mapping, source, target_db).await?;
    let snapshot = format!(
        "SELECT * FROM ({}) AS m LIMIT 0",
        select_on_source(&plan, None)
    );
    prepare_all(source_db, [&snapshot], mapping, "the source").await?;
    Ok(plan)
}

/// Type-checks statements now rather than at the first row: `db` parses and plans
/// each, and a refusal names `who` and the mapping's target.
pub(crate) async fn prepare_all(
    db: &Client,
    statements: impl IntoIterator<Item = &String>,
    mapping: &Mapping,
    who: &str,
) -> Result<(), CheckError> {
    for sql in statements {
        db.prepare(sql).await.map_err(|e| CheckError::Schema {
            target: mapping.target.clone(),
            message: format!(
                "{who} rejects the mapping: {}",
                e.as_db_error()
                    .map_or_else(|| e.to_string(), |d| d.message().to_string())
            ),
        })?;
    }
    Ok(())
}

/// The checks and SQL of [`check`] for a source table described elsewhere (a MySQL
/// source: its rows reach the target as text and the mapping runs there).
pub async fn check_with(
    mapping: &Mapping,
    source: Table,
    target_db: &Client,
) -> Result<TablePlan, CheckError> {
    let fail = |message: String| CheckError::Schema {
        target: mapping.target.clone(),
        message,
    };
    let (ts, tn) = split_name(&mapping.target);
    let target = describe(target_db, "target", &ts, &tn)
        .await?
        .ok_or_else(|| fail(format!("target table {ts}.{tn} does not exist")))?;
    let plan = check_tables(mapping, source, target)?;
    let statements = [
        Some(&plan.upsert_sql),
        plan.filtered_out_sql.as_ref(),
        Some(&plan.delete_sql),
    ];
    prepare_all(
        target_db,
        statements.into_iter().flatten(),
        mapping,
        "the target",
    )
    .await?;
    Ok(plan)
}

/// The schema checks of [`check`] on two described tables, and the plan's SQL.
pub fn check_tables(
    mapping: &Mapping,
    source: Table,
    target: Table,
) -> Result<TablePlan, CheckError> {
    let fail = |message: String| CheckError::Schema {
        target: mapping.target.clone(),
        message,
    };
    if source.key.is_empty() {
        return Err(fail(format!(
            "source table {} has no primary key; add one (rows are matched by key)",
            source.quoted()
        )));
    }
    if source.replica_identity == 'n' || source.replica_identity == 'i' {
        return Err(fail(format!(
            "source table {} has REPLICA IDENTITY {}; use DEFAULT (the primary key) or FULL",
            source.quoted(),
            if source.replica_identity == 'n' {
                "NOTHING"
            } else {
                "USING INDEX"
            }
        )));
    }
    if target.key.is_empty() {
        return Err(fail(format!(
            "target table {} has no primary key; upserts need one",
            target.quoted()
        )));
    }
    let mut mapping = mapping.clone();
    if mapping.wildcard {
        mapping.outputs = source
            .columns
            .iter()
            .map(|c| Output {
                column: c.name.clone(),
                sql: ident(&c.name),
                reads: BTreeSet::from([c.name.clone()]),
            })
            .collect();
    }
    for read in mapping.reads() {
        if source.column(&read).is_none() {
            return Err(fail(format!(
                "column {read} does not exist in source table {} (it has: {})",
                source.quoted(),
                source
                    .columns
                    .iter()
                    .map(|c| c.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
    }
    for o in &mapping.outputs {
        if target.column(&o.column).is_none() {
            return Err(fail(format!(
                "target table {} has no column {} (it has: {})",
                target.quoted(),
                o.column,
                target
                    .columns
                    .iter()
                    .map(|c| c.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
    }
    for k in &target.key {
        let Some(o) = mapping.outputs.iter().find(|o| &o.column == k) else {
            return Err(fail(format!(
                "the mapping does not produce target key column {k}; the primary key must be carried"
            )));
        };
        if let Some(r) = o.reads.iter().find(|r| !source.key.contains(r)) {
            return Err(fail(format!(
                "target key column {k} is computed from {r}, which is not in the source key ({}): a deleted row could not be found",
                source.key.join(", ")
            )));
        }
    }
    for c in &target.columns {
        if c.not_null && !c.has_default && !mapping.outputs.iter().any(|o| o.column == c.name) {
            return Err(fail(format!(
                "target column {} is NOT NULL without a default and the mapping does not fill it",
                c.name
            )));
        }
    }
    let mut carried: Vec<Column> = Vec::new();
    for name in source.key.iter().chain(mapping.reads().iter()) {
        if !carried.iter().any(|c| &c.name == name)
            && let Some(col) = source.column(name)
        {
            carried.push(col.clone());
        }
    }
    Ok(build(mapping, source, target, carried))
}

fn qualifier(mapping: &Mapping) -> String {
    // Expressions may say `orders.total` or use the alias written in the mapping;
    // the derived table gets the same name.
    alias_of(&mapping.sql).unwrap_or_else(|| mapping.source_table.clone())
}

fn alias_of(sql: &str) -> Option<String> {
    use sqlparser::ast::{SetExpr, Statement, TableFactor};
    let stmts =
        sqlparser::parser::Parser::parse_sql(&sqlparser::dialect::PostgreSqlDialect {}, sql)
            .ok()?;
    let Some(Statement::Query(q)) = stmts.first() else {
        return None;
    };
    let SetExpr::Select(s) = q.body.as_ref() else {
        return None;
    };
    match &s.from.first()?.relation {
        TableFactor::Table { alias: Some(a), .. } => Some(a.name.value.clone()),
        _ => None,
    }
}

/// The mapping's SELECT over the real source table (the snapshot query).
impl TablePlan {
    /// The snapshot's COPY of the source rows in `range`'s pages, or of all rows.
    pub fn copy_out_range(&self, range: Option<Pages>) -> String {
        format!("COPY ({}) TO STDOUT", select_on_source(self, range))
    }

    /// The snapshot's SELECT on the source (the body of [`Self::copy_out_range`]).
    pub fn select_range(&self, range: Option<Pages>) -> String {
        select_on_source(self, range)
    }

    /// The target's columns in the order the COPY writes them, as a SELECT that
    /// describes their types.
    pub fn target_columns_sql(&self) -> String {
        let cols = self
            .mapping
            .outputs
            .iter()
            .map(|o| ident(&o.column))
            .collect::<Vec<_>>()
            .join(", ");
        format!("SELECT {cols} FROM {} LIMIT 0", self.target.quoted())
    }
}

/// A range of a source table's pages that one snapshot copy reads (by `ctid`):
/// pages `from` up to `to`, or to the end when `to` is `None` (pages added since
/// the size was read still belong to the last range).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pages {
    /// First page.
    pub from: u64,
    /// First page after the range; `None`: the table's end.
    pub to: Option<u64>,
}

impl Pages {
    /// `count` ranges covering a table of `pages` pages (the last one open-ended).
    pub fn split(pages: u64, count: u64) -> Vec<Pages> {
        let count = count.max(1);
        let step = pages.div_ceil(count).max(1);
        (0..count)
            .map(|k| Pages {
                from: k * step,
                to: (k + 1 < count).then_some((k + 1) * step),
            })
            .collect()
    }
}

fn select_on_source(plan: &TablePlan, range: Option<Pages>) -> String {
    let m = &plan.mapping;
    let cols = m
        .outputs
        .iter()
        .map(|o| format!("{} AS {}", o.sql, ident(&o.column)))
        .collect::<Vec<_>>()
        .join(", ");
    let q = ident(&qualifier(m));
    let mut conditions: Vec<String> = m.filter.iter().map(|f| format!("({})", f.sql)).collect();
    if let Some(pages) = range {
        // A TID range scan reads only these pages.
        if pages.from > 0 {
            conditions.push(format!("{q}.ctid >= '({},0)'::tid", pages.from));
        }
        if let Some(to) = pages.to {
            conditions.push(format!("{q}.ctid < '({to},0)'::tid"));
        }
    }
    let filter = if conditions.is_empty() {
        String::new()
    } else {
        format!(" WHERE {}", conditions.join(" AND "))
    };
    format!("SELECT {cols} FROM {} AS {q}{filter}", plan.source.quoted())
}

/// A [`DirectCopy`] when every output is a carried column of the target column's
/// type, unchanged, and no filter drops rows.
fn direct_copy(
    mapping: &Mapping,
    target: &Table,
    carried: &[Column],
    out_cols: &str,
) -> Option<DirectCopy> {
    if mapping.filter.is_some() {
        return None;
    }
    let q = ident(&qualifier(mapping));
    let columns = mapping
        .outputs
        .iter()
        .map(|o| {
            let [read] = o.reads.iter().collect::<Vec<_>>()[..] else {
                return None;
            };
            let plain = o.sql == ident(read) || o.sql == format!("{q}.{}", ident(read));
            let i = carried.iter().position(|c| &c.name == read)?;
            let c = &carried[i];
            let same = target.column(&o.column).is_some_and(|t| {
                let want = type_family(&t.type_sql);
                want == type_family(&c.type_sql) || want == type_family(&c.cast)
            });
            (plain && same).then_some(i)
        })
        .collect::<Option<Vec<usize>>>()?;
    Some(DirectCopy {
        sql: format!("COPY {} ({out_cols}) FROM STDIN", target.quoted()),
        columns,
    })
}

/// A type name reduced to what decides how its text is read: aliases to one name,
/// the type modifier dropped (a value that does not fit fails on either path),
/// `varchar` and `text` together (strings either way; `char(n)` pads, and stays
/// apart).
fn type_family(type_sql: &str) -> String {
    let t = type_sql.trim().to_ascii_lowercase();
    let base = match t.split_once('(') {
        Some((head, rest)) => format!(
            "{}{}",
            head.trim_end(),
            rest.split_once(')').map_or("", |(_, tail)| tail)
        ),
        None => t.clone(),
    };
    match base.trim() {
        "int" | "int4" | "integer" => "integer",
        "int8" | "bigint" => "bigint",
        "int2" | "smallint" => "smallint",
        "decimal" | "numeric" => "numeric",
        "float8" | "double precision" => "double precision",
        "float4" | "real" => "real",
        "bool" | "boolean" => "boolean",
        "text" | "varchar" | "character varying" => "text",
        "timestamp" | "timestamp without time zone" => "timestamp",
        "timestamptz" | "timestamp with time zone" => "timestamptz",
        "time" | "time without time zone" => "time",
        "timetz" | "time with time zone" => "timetz",
        other => return other.to_string(),
    }
    .to_string()
}

/// The session's staging table for `target` (a temporary table: one per session,
/// named from the target so two plans never share one).
fn stage_table(target: &Table) -> String {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (&target.schema, &target.name).hash(&mut h);
    format!("strangler_stage_{:016x}", h.finish())
}

fn build(mapping: Mapping, source: Table, target: Table, carried: Vec<Column>) -> TablePlan {
    let q = ident(&qualifier(&mapping));
    // The changed rows, cast to their source types, read from the staging table.
    let stage_name = stage_table(&target);
    let staged = |cols: &[&Column], kinds: &str| {
        let casts = cols
            .iter()
            .map(|c| format!("{}::{} AS {}", ident(&c.name), c.cast, ident(&c.name)))
            .collect::<Vec<_>>()
            .join(", ");
        format!(
            "(SELECT {casts} FROM pg_temp.{stage_name} WHERE {} {kinds}) AS {q}",
            ident(STAGE_KIND)
        )
    };
    let stage_present = format!("<> {STAGE_DELETED}");
    let unnest = |cols: &[&Column]| {
        let params = (1..=cols.len())
            .map(|i| format!("${i}::text[]"))
            .collect::<Vec<_>>()
            .join(", ");
        let names = cols
            .iter()
            .map(|c| ident(&c.name))
            .collect::<Vec<_>>()
            .join(", ");
        let casts = cols
            .iter()
            .map(|c| format!("{}::{} AS {}", ident(&c.name), c.cast, ident(&c.name)))
            .collect::<Vec<_>>()
            .join(", ");
        format!("(SELECT {casts} FROM unnest({params}) AS u({names})) AS {q}")
    };
    let all: Vec<&Column> = carried.iter().collect();
    let out_cols = mapping
        .outputs
        .iter()
        .map(|o| ident(&o.column))
        .collect::<Vec<_>>()
        .join(", ");
    let out_exprs = mapping
        .outputs
        .iter()
        .map(|o| o.sql.clone())
        .collect::<Vec<_>>()
        .join(", ");
    let filter = mapping
        .filter
        .as_ref()
        .map(|f| format!(" WHERE {}", f.sql))
        .unwrap_or_default();
    let key_cols = target
        .key
        .iter()
        .map(|k| ident(k))
        .collect::<Vec<_>>()
        .join(", ");
    let updates: Vec<String> = mapping
        .outputs
        .iter()
        .filter(|o| !target.key.contains(&o.column))
        .map(|o| format!("{c} = EXCLUDED.{c}", c = ident(&o.column)))
        .collect();
    let conflict = if updates.is_empty() {
        "DO NOTHING".to_string()
    } else {
        format!("DO UPDATE SET {}", updates.join(", "))
    };
    let insert_from = |rows: String| {
        format!(
            "INSERT INTO {} ({out_cols}) SELECT {out_exprs} FROM {rows}{filter}",
            target.quoted()
        )
    };
    let upsert_from =
        |rows: String| format!("{} ON CONFLICT ({key_cols}) {conflict}", insert_from(rows));
    let upsert_sql = upsert_from(unnest(&all));
    let key_exprs = |alias: &str| {
        target
            .key
            .iter()
            .filter_map(|k| mapping.outputs.iter().find(|o| &o.column == k))
            .map(|o| format!("{} AS {}", o.sql, ident(&format!("{alias}{}", o.column))))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let key_match = target
        .key
        .iter()
        .map(|k| format!("t.{} = d.{}", ident(k), ident(&format!("k_{k}"))))
        .collect::<Vec<_>>()
        .join(" AND ");
    let filtered_out_from = |rows: String| {
        mapping.filter.as_ref().map(|f| {
            format!(
                "DELETE FROM {} AS t USING (SELECT {} FROM {rows} WHERE NOT coalesce(({}), false)) AS d WHERE {key_match}",
                target.quoted(),
                key_exprs("k_"),
                f.sql
            )
        })
    };
    let filtered_out_sql = filtered_out_from(unnest(&all));
    let key_columns: Vec<&Column> = source
        .key
        .iter()
        .filter_map(|k| carried.iter().find(|c| &c.name == k))
        .collect();
    let delete_from = |rows: String| {
        format!(
            "DELETE FROM {} AS t USING (SELECT {} FROM {rows}) AS d WHERE {key_match}",
            target.quoted(),
            key_exprs("k_"),
        )
    };
    let delete_sql = delete_from(unnest(&key_columns));
    let stage_columns = carried
        .iter()
        .map(|c| format!("{} text", ident(&c.name)))
        .chain(std::iter::once(format!("{} smallint", ident(STAGE_KIND))))
        .collect::<Vec<_>>()
        .join(", ");
    let stage = StageSql {
        table: format!("pg_temp.{stage_name}"),
        create: format!(
            "CREATE TEMP TABLE IF NOT EXISTS {stage_name} ({stage_columns}) ON COMMIT DELETE ROWS"
        ),
        copy_in: format!("COPY pg_temp.{stage_name} FROM STDIN (FORMAT binary)"),
        insert: insert_from(staged(&all, &format!("= {STAGE_INSERTED}"))),
        upsert_changed: upsert_from(staged(&all, &format!("= {STAGE_CHANGED}"))),
        upsert: upsert_from(staged(&all, &stage_present)),
        filtered_out: filtered_out_from(staged(&all, &stage_present)),
        delete: delete_from(staged(&key_columns, &format!("= {STAGE_DELETED}"))),
    };
    let copy_in_sql = format!("COPY {} ({out_cols}) FROM STDIN", target.quoted());
    let as_text = mapping
        .outputs
        .iter()
        .map(|o| format!("({})::text AS {}", o.sql, ident(&o.column)))
        .collect::<Vec<_>>()
        .join(", ");
    let key_text = target
        .key
        .iter()
        .filter_map(|k| mapping.outputs.iter().find(|o| &o.column == k))
        .map(|o| format!("({})::text AS {}", o.sql, ident(&o.column)))
        .collect::<Vec<_>>()
        .join(", ");
    let values_sql = format!("SELECT {as_text} FROM {}{filter}", unnest(&all));
    let filtered_out_keys_sql = mapping.filter.as_ref().map(|f| {
        format!(
            "SELECT {key_text} FROM {} WHERE NOT coalesce(({}), false)",
            unnest(&all),
            f.sql
        )
    });
    let delete_keys_sql = format!("SELECT {key_text} FROM {}", unnest(&key_columns));
    let src_keys = source
        .key
        .iter()
        .enumerate()
        .map(|(i, k)| format!("{q}.{}::text AS strangler_k{i}", ident(k)))
        .collect::<Vec<_>>()
        .join(", ");
    let keep = mapping.filter.as_ref().map_or_else(
        || "true".to_string(),
        |f| format!("coalesce(({}), false)", f.sql),
    );
    // Cast to the target's column types first, so the text compares with what the
    // target holds (`12.3000` from an expression vs `12.30` in a numeric(12,2)).
    let as_target_text = mapping
        .outputs
        .iter()
        .map(|o| {
            let ty = target
                .columns
                .iter()
                .find(|c| c.name == o.column)
                .map_or("text", |c| c.type_sql.as_str());
            format!("(({})::{ty})::text AS {}", o.sql, ident(&o.column))
        })
        .collect::<Vec<_>>()
        .join(", ");
    let rows_sql = format!(
        "SELECT {src_keys}, ({keep})::text AS strangler_keep, {as_target_text} FROM {}",
        unnest(&all)
    );
    let rows_text_sql = format!(
        "SELECT {src_keys}, ({keep})::text AS strangler_keep, {as_text} FROM {}",
        unnest(&all)
    );
    let current_cols = mapping
        .outputs
        .iter()
        .map(|o| format!("t.{}::text", ident(&o.column)))
        .collect::<Vec<_>>()
        .join(", ");
    let tkey_params = (1..=target.key.len())
        .map(|i| format!("${i}::text[]"))
        .collect::<Vec<_>>()
        .join(", ");
    let tkey_names = (0..target.key.len())
        .map(|i| format!("k{i}"))
        .collect::<Vec<_>>()
        .join(", ");
    let tkey_match = target
        .key
        .iter()
        .enumerate()
        .map(|(i, k)| format!("t.{}::text = k.k{i}", ident(k)))
        .collect::<Vec<_>>()
        .join(" AND ");
    let current_sql = format!(
        "SELECT {current_cols} FROM {} AS t JOIN unnest({tkey_params}) AS k({tkey_names}) ON {tkey_match}",
        target.quoted()
    );
    let direct_copy = direct_copy(&mapping, &target, &carried, &out_cols);
    TablePlan {
        direct_copy,
        stage,
        rows_text_sql,
        rows_sql,
        current_sql,
        conflict: crate::conflict::Policy::Off,
        values_sql,
        filtered_out_keys_sql,
        delete_keys_sql,
        mapping,
        source,
        target,
        carried,
        upsert_sql,
        filtered_out_sql,
        delete_sql,
        copy_in_sql,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_ranges_cover_the_table_once_and_the_last_is_open_ended() {
        let ranges = Pages::split(10, 4);
        assert_eq!(
            ranges,
            vec![
                Pages {
                    from: 0,
                    to: Some(3)
                },
                Pages {
                    from: 3,
                    to: Some(6)
                },
                Pages {
                    from: 6,
                    to: Some(9)
                },
                Pages { from: 9, to: None },
            ]
        );
        assert_eq!(Pages::split(0, 1), vec![Pages { from: 0, to: None }]);
        assert_eq!(Pages::split(5, 0), vec![Pages { from: 0, to: None }]);
    }

    #[test]
    fn type_families_see_through_aliases_and_modifiers_but_not_across_kinds() {
        assert_eq!(
            type_family("timestamp(3) without time zone"),
            type_family("timestamp(3)")
        );
        assert_eq!(type_family("numeric(12,2)"), type_family("NUMERIC"));
        assert_eq!(type_family("character varying(16)"), type_family("text"));
        assert_eq!(type_family("int4"), type_family("integer"));
        assert_ne!(type_family("timestamp"), type_family("timestamptz"));
        assert_ne!(type_family("boolean"), type_family("text"));
        assert_ne!(type_family("character(3)"), type_family("text"));
        assert_ne!(type_family("integer"), type_family("bigint"));
    }
}
