//! Mappings written as SQL: one `SELECT … FROM legacy_table [WHERE …]` per target
//! table, parsed with `sqlparser` (PostgreSQL dialect) and checked against a closed
//! list of what is supported. The expressions are not evaluated here: the same
//! SQL runs on the source for the snapshot (`COPY (SELECT …) TO STDOUT`) and on the
//! target over each batch of changed rows, so both phases compute exactly what
//! PostgreSQL computes.

use std::collections::BTreeSet;
use std::ops::ControlFlow;

use sqlparser::ast::{
    BinaryOperator, Expr, FunctionArguments, GroupByExpr, ObjectNamePart, SelectItem, SetExpr,
    Spanned, Statement, TableFactor, UnaryOperator,
};
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;

/// Functions a mapping may call: deterministic, row-local, present in every
/// PostgreSQL. Anything else (now(), random(), aggregates, subqueries) would make
/// the snapshot and the stream disagree, so it is refused.
pub const FUNCTIONS: &[&str] = &[
    "abs",
    "btrim",
    "ceil",
    "coalesce",
    "concat",
    "concat_ws",
    "date_trunc",
    "floor",
    "greatest",
    "initcap",
    "least",
    "left",
    "length",
    "lower",
    "lpad",
    "ltrim",
    "md5",
    "nullif",
    "replace",
    "right",
    "round",
    "rpad",
    "rtrim",
    "split_part",
    "substr",
    "to_char",
    "trim",
    "trunc",
    "upper",
];

/// A mapping the parser or the checks refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("mapping for {target}: line {line}, column {column}: {message}")]
pub struct MappingError {
    /// The target table the mapping is for.
    pub target: String,
    /// 1-based line in the mapping's SQL (0 when not known).
    pub line: u64,
    /// 1-based column.
    pub column: u64,
    /// What is wrong and what is supported.
    pub message: String,
}

/// One output column of a mapping.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    /// The target column it fills.
    pub column: String,
    /// The expression, as SQL over the source table's columns.
    pub sql: String,
    /// Source columns it reads.
    pub reads: BTreeSet<String>,
}

/// A parsed and checked mapping.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapping {
    /// Target table (`schema.table` or `table`).
    pub target: String,
    /// Source table schema (`public` unless written).
    pub source_schema: String,
    /// Source table name.
    pub source_table: String,
    /// `SELECT *`: every source column, same names (expanded against the schema).
    pub wildcard: bool,
    /// Output columns in order.
    pub outputs: Vec<Output>,
    /// The row filter, as SQL, and the columns it reads.
    pub filter: Option<Output>,
    /// The mapping as written.
    pub sql: String,
}

impl Mapping {
    /// Parses `sql` as the mapping for `target`.
    pub fn parse(target: &str, sql: &str) -> Result<Self, MappingError> {
        let err = |line: u64, column: u64, message: String| MappingError {
            target: target.to_string(),
            line,
            column,
            message,
        };
        let at = |span: sqlparser::tokenizer::Span, message: String| {
            err(span.start.line, span.start.column, message)
        };
        let statements = Parser::parse_sql(&PostgreSqlDialect {}, sql).map_err(|e| {
            let text = e.to_string();
            let (line, column) = position_in(&text);
            err(line, column, text)
        })?;
        let [statement] = statements.as_slice() else {
            return Err(err(
                1,
                1,
                format!(
                    "expected exactly one SELECT, found {} statements",
                    statements.len()
                ),
            ));
        };
        let Statement::Query(query) = statement else {
            return Err(err(
                1,
                1,
                "expected SELECT … FROM legacy_table [WHERE …]".into(),
            ));
        };
        if query.with.is_some()
            || query.order_by.is_some()
            || query.limit_clause.is_some()
            || query.fetch.is_some()
            || !query.locks.is_empty()
        {
            return Err(at(
                query.span(),
                "WITH, ORDER BY, LIMIT, OFFSET, FETCH and FOR UPDATE are not supported in a mapping"
                    .into(),
            ));
        }
        let SetExpr::Select(select) = query.body.as_ref() else {
            return Err(at(
                query.body.span(),
                "UNION, VALUES and nested queries are not supported: one plain SELECT per target table"
                    .into(),
            ));
        };
        if select.distinct.is_some()
            || select.having.is_some()
            || !matches!(&select.group_by, GroupByExpr::Expressions(e, m) if e.is_empty() && m.is_empty())
            || select.into.is_some()
            || !select.named_window.is_empty()
            || select.qualify.is_some()
        {
            return Err(at(
                select.span(),
                "DISTINCT, GROUP BY, HAVING, INTO and WINDOW are not supported: a mapping maps one source row to at most one target row"
                    .into(),
            ));
        }
        let [from] = select.from.as_slice() else {
            return Err(at(
                select.span(),
                "exactly one source table in FROM is required".into(),
            ));
        };
        if !from.joins.is_empty() {
            return Err(at(
                from.joins[0].relation.span(),
                "joins are not supported: map each legacy table to its own target table".into(),
            ));
        }
        let TableFactor::Table {
            name, alias, args, ..
        } = &from.relation
        else {
            return Err(at(from.relation.span(), "FROM must name a table".into()));
        };
        if args.is_some() {
            return Err(at(name.span(), "table functions are not supported".into()));
        }
        let parts: Vec<String> = name
            .0
            .iter()
            .filter_map(|p| match p {
                ObjectNamePart::Identifier(i) => Some(fold(i)),
                ObjectNamePart::Function(_) => None,
            })
            .collect();
        let (source_schema, source_table) = match parts.as_slice() {
            [t] => ("public".to_string(), t.clone()),
            [s, t] => (s.clone(), t.clone()),
            _ => {
                return Err(at(
                    name.span(),
                    "the source table is `table` or `schema.table`".into(),
                ));
            }
        };
        let qualifiers: Vec<String> = match alias {
            Some(a) => vec![fold(&a.name)],
            None => vec![source_table.clone()],
        };

        let mut wildcard = false;
        let mut outputs = Vec::new();
        for item in &select.projection {
            match item {
                SelectItem::Wildcard(opts) => {
                    if opts.opt_exclude.is_some()
                        || opts.opt_except.is_some()
                        || opts.opt_rename.is_some()
                        || opts.opt_replace.is_some()
                    {
                        return Err(at(item.span(), "only a plain * is supported".into()));
                    }
                    wildcard = true;
                }
                SelectItem::QualifiedWildcard(..) => {
                    return Err(at(item.span(), "write * instead of table.*".into()));
                }
                SelectItem::UnnamedExpr(expr) => {
                    let column = match expr {
                        Expr::Identifier(i) => fold(i),
                        Expr::CompoundIdentifier(parts) => {
                            parts.last().map(fold).unwrap_or_default()
                        }
                        other => {
                            return Err(at(
                                other.span(),
                                format!("`{other}` needs a name: write `{other} AS target_column`"),
                            ));
                        }
                    };
                    outputs.push(output(target, expr, column, &qualifiers)?);
                }
                SelectItem::ExprWithAlias { expr, alias } => {
                    outputs.push(output(target, expr, fold(alias), &qualifiers)?);
                }
            }
        }
        if wildcard && !outputs.is_empty() {
            return Err(err(
                1,
                1,
                "`*` cannot be combined with other columns; list the columns instead".into(),
            ));
        }
        let mut seen = BTreeSet::new();
        for o in &outputs {
            if !seen.insert(o.column.clone()) {
                return Err(err(
                    1,
                    1,
                    format!("target column {} is set twice", o.column),
                ));
            }
        }
        let filter = match &select.selection {
            Some(expr) => Some(output(target, expr, String::new(), &qualifiers)?),
            None => None,
        };
        Ok(Self {
            target: target.to_string(),
            source_schema,
            source_table,
            wildcard,
            outputs,
            filter,
            sql: sql.to_string(),
        })
    }

    /// Every source column any output or the filter reads.
    pub fn reads(&self) -> BTreeSet<String> {
        self.outputs
            .iter()
            .chain(self.filter.as_ref())
            .flat_map(|o| o.reads.iter().cloned())
            .collect()
    }
}

/// Checks an expression against the supported subset and collects the columns it reads.
fn output(
    target: &str,
    expr: &Expr,
    column: String,
    qualifiers: &[String],
) -> Result<Output, MappingError> {
    let mut reads = BTreeSet::new();
    let flow = sqlparser::ast::visit_expressions(expr, |e| {
        let refuse = |message: String| {
            let span = e.span();
            ControlFlow::Break(MappingError {
                target: target.to_string(),
                line: span.start.line,
                column: span.start.column,
                message,
            })
        };
        match e {
            Expr::Identifier(i) => {
                reads.insert(fold(i));
            }
            Expr::CompoundIdentifier(parts) => match parts.as_slice() {
                [q, c] if qualifiers.contains(&fold(q)) => {
                    reads.insert(fold(c));
                }
                _ => {
                    return refuse(format!(
                        "`{e}`: columns are `column` or `{}.column`",
                        qualifiers.first().map_or("table", String::as_str)
                    ));
                }
            },
            Expr::Value(_)
            | Expr::TypedString { .. }
            | Expr::Nested(_)
            | Expr::Cast { .. }
            | Expr::IsNull(_)
            | Expr::IsNotNull(_)
            | Expr::IsTrue(_)
            | Expr::IsFalse(_)
            | Expr::IsNotTrue(_)
            | Expr::IsNotFalse(_)
            | Expr::IsDistinctFrom(..)
            | Expr::IsNotDistinctFrom(..)
            | Expr::InList { .. }
            | Expr::Between { .. }
            | Expr::Like { .. }
            | Expr::ILike { .. }
            | Expr::Case { .. }
            | Expr::Trim { .. }
            | Expr::Substring { .. }
            | Expr::Extract { .. }
            | Expr::Ceil { .. }
            | Expr::Floor { .. } => {}
            Expr::BinaryOp { op, .. } => {
                use BinaryOperator as B;
                if !matches!(
                    op,
                    B::Plus
                        | B::Minus
                        | B::Multiply
                        | B::Divide
                        | B::Modulo
                        | B::StringConcat
                        | B::Gt
                        | B::Lt
                        | B::GtEq
                        | B::LtEq
                        | B::Eq
                        | B::NotEq
                        | B::And
                        | B::Or
                ) {
                    return refuse(format!(
                        "operator {op} is not supported (supported: + - * / % || = <> < <= > >= AND OR)"
                    ));
                }
            }
            Expr::UnaryOp { op, .. } => {
                if !matches!(
                    op,
                    UnaryOperator::Minus | UnaryOperator::Plus | UnaryOperator::Not
                ) {
                    return refuse(format!("operator {op} is not supported"));
                }
            }
            Expr::Function(f) => {
                let name = f.name.to_string().to_ascii_lowercase();
                if !FUNCTIONS.contains(&name.as_str()) {
                    return refuse(format!(
                        "function {name}() is not supported in a mapping (supported: {})",
                        FUNCTIONS.join(", ")
                    ));
                }
                if f.over.is_some() || f.filter.is_some() || !f.within_group.is_empty() {
                    return refuse(format!(
                        "{name}(): OVER, FILTER and WITHIN GROUP are not supported"
                    ));
                }
                if let FunctionArguments::Subquery(_) = f.args {
                    return refuse(format!("{name}(): subqueries are not supported"));
                }
            }
            Expr::Subquery(_) | Expr::Exists { .. } | Expr::InSubquery { .. } => {
                return refuse("subqueries are not supported: a mapping reads one row".into());
            }
            other => {
                return refuse(format!(
                    "`{other}` is not supported in a mapping (supported: columns, literals, casts, arithmetic, comparisons, AND/OR/NOT, IS [NOT] NULL, IN (list), BETWEEN, LIKE, CASE, and the functions {})",
                    FUNCTIONS.join(", ")
                ));
            }
        }
        ControlFlow::Continue(())
    });
    if let ControlFlow::Break(e) = flow {
        return Err(e);
    }
    Ok(Output {
        column,
        sql: expr.to_string(),
        reads,
    })
}

/// An identifier as PostgreSQL resolves it: unquoted names fold to lower case.
fn fold(ident: &sqlparser::ast::Ident) -> String {
    match ident.quote_style {
        Some(_) => ident.value.clone(),
        None => ident.value.to_lowercase(),
    }
}

/// Pulls "Line: X, Column: Y" out of a sqlparser error message.
fn position_in(message: &str) -> (u64, u64) {
    let number_after = |key: &str| {
        message.find(key).and_then(|i| {
            message[i + key.len()..]
                .trim_start()
                .split(|c: char| !c.is_ascii_digit())
                .next()
                .and_then(|n| n.parse().ok())
        })
    };
    (
        number_after("Line:").unwrap_or(0),
        number_after("Column:").unwrap_or(0),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renames_transforms_and_a_filter_are_understood() {
        let m = Mapping::parse(
            "shop.orders",
            "SELECT id, customer_id AS buyer, total_cents / 100.0 AS total, lower(email) AS email\n\
             FROM orders WHERE status <> 'draft'",
        )
        .expect("valid");
        assert_eq!(m.source_schema, "public");
        assert_eq!(m.source_table, "orders");
        let cols: Vec<_> = m.outputs.iter().map(|o| o.column.as_str()).collect();
        assert_eq!(cols, ["id", "buyer", "total", "email"]);
        assert_eq!(m.outputs[2].sql, "total_cents / 100.0");
        assert_eq!(
            m.reads().into_iter().collect::<Vec<_>>(),
            ["customer_id", "email", "id", "status", "total_cents"]
        );
        assert_eq!(
            m.filter.as_ref().map(|f| f.sql.as_str()),
            Some("status <> 'draft'")
        );
    }

    #[test]
    fn unsupported_constructs_are_refused_with_their_position() {
        let cases = [
            (
                "SELECT id, now() AS at FROM t",
                1,
                12,
                "function now() is not supported",
            ),
            (
                "SELECT id\nFROM t\nWHERE id IN (SELECT id FROM u)",
                3,
                7,
                "subqueries",
            ),
            (
                "SELECT a.id FROM t a JOIN u b ON a.id = b.id",
                1,
                27,
                "joins are not supported",
            ),
            ("SELECT id, price * 2 FROM t", 1, 12, "needs a name"),
            ("SELECT id FROM t ORDER BY id", 1, 1, "ORDER BY"),
            (
                "SELECT count(*) AS n FROM t",
                1,
                8,
                "function count() is not supported",
            ),
            (
                "SELECT id, x.y AS z FROM t",
                1,
                12,
                "columns are `column` or `t.column`",
            ),
            ("SELECT id, id AS id FROM t", 1, 1, "set twice"),
            ("DELETE FROM t", 1, 1, "expected SELECT"),
        ];
        for (sql, line, column, needle) in cases {
            let e = Mapping::parse("x", sql).expect_err(sql);
            assert!(e.message.contains(needle), "{sql}: {e}");
            assert_eq!((e.line, e.column), (line, column), "{sql}: {e}");
        }
    }

    #[test]
    fn syntax_errors_carry_the_parsers_position() {
        let e = Mapping::parse("x", "SELECT id,\nFROM t").expect_err("syntax");
        assert_eq!(e.line, 2, "{e}");
        assert!(e.to_string().starts_with("mapping for x: line 2"), "{e}");
    }

    #[test]
    fn star_and_qualified_columns_and_casts_parse() {
        let m = Mapping::parse("t2", "SELECT * FROM legacy.items").expect("star");
        assert!(m.wildcard);
        assert_eq!(m.source_schema, "legacy");
        let m = Mapping::parse(
            "t2",
            "SELECT o.id, CAST(o.total AS numeric(12,2)) AS total, o.created::date AS day, \
             coalesce(nullif(trim(o.note), ''), 'none') AS note FROM orders o",
        )
        .expect("qualified");
        assert_eq!(m.outputs.len(), 4);
        assert!(m.reads().contains("note"));
    }
}

/// How a forward mapping's target row maps back to its source row, when it can.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reverse {
    /// The reverse mapping, as SQL over the target table.
    Derived(String),
    /// Why it must be written by hand.
    Explicit(String),
}

/// The source column an output writes back to, and the expression over the
/// target column that recovers it; `Err` says why it cannot be inverted.
fn invert(expr: &Expr, target_column: &str) -> Result<(String, String), String> {
    use sqlparser::ast::{BinaryOperator as B, Value as V};
    let t = format!("\"{}\"", target_column.replace('"', "\"\""));
    let literal = |e: &Expr| match e {
        Expr::Value(v) => match &v.value {
            V::Number(n, _) if n.parse::<f64>().is_ok_and(|x| x != 0.0) => Some(n.clone()),
            _ => None,
        },
        _ => None,
    };
    let column = |e: &Expr| match e {
        Expr::Identifier(i) => Some(fold(i)),
        Expr::CompoundIdentifier(parts) => parts.last().map(fold),
        _ => None,
    };
    let mut e = expr;
    while let Expr::Nested(inner) = e {
        e = inner;
    }
    if let Some(c) = column(e) {
        return Ok((c, t));
    }
    match e {
        // A cast is undone by the assignment cast into the source column.
        Expr::Cast { expr, .. } => invert(expr, target_column),
        Expr::BinaryOp { left, op, right } => {
            let (col, k, col_on_left) = match (
                column(left),
                literal(right),
                column(right),
                literal(left),
            ) {
                (Some(c), Some(k), _, _) => (c, k, true),
                (_, _, Some(c), Some(k)) => (c, k, false),
                _ => {
                    return Err(format!(
                        "`{e}` combines more than one column or a non-constant; only `col op constant` inverts"
                    ));
                }
            };
            let back = match (op, col_on_left) {
                (B::Multiply, _) => format!("{t} / {k}"),
                (B::Divide, true) => format!("{t} * {k}"),
                (B::Plus, _) => format!("{t} - {k}"),
                (B::Minus, true) => format!("{t} + {k}"),
                (B::Minus, false) => format!("{k} - {t}"),
                _ => return Err(format!("`{e}` is not invertible")),
            };
            Ok((col, format!("({back})")))
        }
        Expr::Function(f) => Err(format!("{}() is not invertible", f.name)),
        other => Err(format!("`{other}` is not invertible")),
    }
}

impl Mapping {
    /// Derives the reverse mapping (target table back to the source table) when
    /// every output is invertible (a column, a cast, or `col op constant` with
    /// `+`, `-`, `*` or `/`) and every source key column is recovered; otherwise
    /// says which output prevents it, so `strangler cdc check` can ask for an
    /// explicit one.
    pub fn reverse(&self, source_key: &[String]) -> Reverse {
        if self.wildcard {
            return Reverse::Derived(format!("SELECT * FROM {}", self.target));
        }
        let dialect = PostgreSqlDialect {};
        let mut items = Vec::new();
        let mut recovered = BTreeSet::new();
        for o in &self.outputs {
            let expr = match Parser::new(&dialect)
                .try_with_sql(&o.sql)
                .and_then(|mut p| p.parse_expr())
            {
                Ok(e) => e,
                Err(e) => return Reverse::Explicit(format!("{}: {e}", o.sql)),
            };
            match invert(&expr, &o.column) {
                Ok((source_col, back)) => {
                    if !recovered.insert(source_col.clone()) {
                        return Reverse::Explicit(format!(
                            "source column {source_col} is produced twice"
                        ));
                    }
                    items.push(format!("{back} AS \"{}\"", source_col.replace('"', "\"\"")));
                }
                Err(why) => {
                    return Reverse::Explicit(format!("{} AS {}: {why}", o.sql, o.column));
                }
            }
        }
        if let Some(k) = source_key.iter().find(|k| !recovered.contains(*k)) {
            return Reverse::Explicit(format!("source key column {k} is not recovered"));
        }
        Reverse::Derived(format!("SELECT {} FROM {}", items.join(", "), self.target))
    }
}

#[cfg(test)]
mod reverse_tests {
    use super::*;

    fn reverse(sql: &str) -> Reverse {
        Mapping::parse("orders_v2", sql)
            .expect("mapping")
            .reverse(&["id".to_string()])
    }

    #[test]
    fn renames_casts_and_constant_arithmetic_are_inverted() {
        assert_eq!(
            reverse("SELECT id, customer_id AS buyer_id, total_cents / 100.0 AS total, created::date AS day, qty + 1 AS q FROM orders"),
            Reverse::Derived(
                "SELECT \"id\" AS \"id\", \"buyer_id\" AS \"customer_id\", (\"total\" * 100.0) AS \"total_cents\", \"day\" AS \"created\", (\"q\" - 1) AS \"qty\" FROM orders_v2"
                    .into()
            )
        );
    }

    #[test]
    fn what_cannot_be_inverted_is_named() {
        let Reverse::Explicit(why) = reverse("SELECT id, lower(email) AS email FROM orders") else {
            panic!("lower() is not invertible");
        };
        assert!(why.contains("lower() is not invertible"), "{why}");
        let Reverse::Explicit(why) = reverse("SELECT id, a + b AS c FROM orders") else {
            panic!("two columns");
        };
        assert!(why.contains("more than one column"), "{why}");
        let Reverse::Explicit(why) = reverse("SELECT customer_id AS id FROM orders") else {
            panic!("key");
        };
        assert!(why.contains("source key column id"), "{why}");
    }
}
