//! Schema translation: MySQL/MariaDB `CREATE TABLE` (as `SHOW CREATE TABLE` prints
//! it) to PostgreSQL DDL, parsed with `sqlparser`'s MySQL dialect. Types, defaults,
//! AUTO_INCREMENT, ON UPDATE CURRENT_TIMESTAMP, keys, indexes and foreign keys are
//! translated; what has no PostgreSQL equivalent is listed in `notes`, never
//! silently dropped.

use sqlparser::ast::{
    ColumnOption, CreateTable, Expr, ReferentialAction, Statement, TableConstraint, Value,
};
use sqlparser::dialect::MySqlDialect;
use sqlparser::parser::Parser;
use sqlparser::tokenizer::Token;

use crate::plan::ident;

/// DDL the translator could not read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot parse the MySQL DDL: {0}")]
pub struct SchemaError(pub String);

/// PostgreSQL DDL for some tables, and what did not carry over.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Translation {
    /// Statements in order: tables, then indexes, foreign keys and triggers.
    pub statements: Vec<String>,
    /// What was not translated (or translated with a loss), one line each.
    pub notes: Vec<String>,
}

impl Translation {
    /// The whole script, notes as comments first.
    pub fn script(&self) -> String {
        let mut out = String::new();
        for n in &self.notes {
            out.push_str(&format!("-- NOTE: {n}\n"));
        }
        for s in &self.statements {
            out.push_str(s);
            out.push_str(";\n");
        }
        out
    }
}

fn bare(name: &sqlparser::ast::ObjectName) -> String {
    name.0
        .last()
        .map(|p| p.to_string().trim_matches('`').to_string())
        .unwrap_or_default()
}

fn col_name(c: &impl std::fmt::Display) -> String {
    c.to_string().trim_matches('`').to_string()
}

/// Translates one MySQL type (as sqlparser prints it) to PostgreSQL.
pub(crate) fn pg_type(
    mysql: &str,
    table: &str,
    column: &str,
    notes: &mut Vec<String>,
) -> (String, Option<String>) {
    let upper = mysql.to_ascii_uppercase();
    let unsigned = upper.contains("UNSIGNED");
    let base = upper.replace(" UNSIGNED", "").replace(" ZEROFILL", "");
    let head = base.split('(').next().unwrap_or("").trim().to_string();
    let args = base
        .find('(')
        .map(|i| base[i..].trim().to_string())
        .unwrap_or_default();
    let check = None;
    let t = match head.as_str() {
        "TINYINT" if args == "(1)" => "boolean".to_string(),
        "TINYINT" => "smallint".into(),
        "SMALLINT" => if unsigned { "integer" } else { "smallint" }.into(),
        "MEDIUMINT" => "integer".into(),
        "INT" | "INTEGER" => if unsigned { "bigint" } else { "integer" }.into(),
        "BIGINT" => {
            if unsigned {
                // Almost always an id (AUTO_INCREMENT, or a key referencing one);
                // bigint keeps identity and foreign keys working.
                notes.push(format!(
                    "{table}.{column}: BIGINT UNSIGNED became bigint; values above 9223372036854775807 would not fit"
                ));
            }
            "bigint".into()
        }
        "DECIMAL" | "NUMERIC" | "DEC" | "FIXED" => format!("numeric{args}"),
        "FLOAT" | "REAL" => "real".into(),
        "DOUBLE" | "DOUBLE PRECISION" => "double precision".into(),
        "BIT" if args.is_empty() || args == "(1)" => "boolean".into(),
        "BIT" => format!("bit varying{args}"),
        "BOOL" | "BOOLEAN" => "boolean".into(),
        "CHAR" | "CHARACTER" => format!("char{args}"),
        "VARCHAR" | "CHARACTER VARYING" => format!("varchar{args}"),
        "TINYTEXT" | "TEXT" | "MEDIUMTEXT" | "LONGTEXT" => "text".into(),
        "BINARY" | "VARBINARY" | "TINYBLOB" | "BLOB" | "MEDIUMBLOB" | "LONGBLOB" => "bytea".into(),
        "DATE" => "date".into(),
        "DATETIME" => format!("timestamp{args}"),
        "TIMESTAMP" => format!("timestamptz{args}"),
        "TIME" => format!("time{args}"),
        "YEAR" => "smallint".into(),
        "JSON" => "jsonb".into(),
        "ENUM" => {
            // ENUM('a','b') keeps its values as a CHECK constraint on text.
            let values = &mysql[mysql.find('(').unwrap_or(0)..];
            return (
                "text".into(),
                Some(format!(
                    "CHECK ({} IN {})",
                    ident(column),
                    values.replace('"', "'")
                )),
            );
        }
        "SET" => {
            notes.push(format!(
                "{table}.{column}: SET{args} became text (comma-separated values, not checked)"
            ));
            "text".into()
        }
        "GEOMETRY" | "POINT" | "LINESTRING" | "POLYGON" => {
            notes.push(format!(
                "{table}.{column}: spatial type {head} became bytea (WKB); use PostGIS for queries"
            ));
            "bytea".into()
        }
        other => {
            notes.push(format!(
                "{table}.{column}: type {mysql} has no translation; kept as text"
            ));
            let _ = other;
            "text".into()
        }
    };
    (t, check)
}

fn pg_default(
    expr: &Expr,
    pg_type: &str,
    table: &str,
    column: &str,
    notes: &mut Vec<String>,
) -> Option<String> {
    let text = expr.to_string().replace('`', "\"");
    let upper = text.to_ascii_uppercase();
    if pg_type == "boolean" && (upper == "B'1'" || upper == "B'0'") {
        return Some(if upper == "B'1'" { "true" } else { "false" }.into());
    }
    if upper.starts_with("CURRENT_TIMESTAMP")
        || upper.starts_with("NOW(")
        || upper == "LOCALTIMESTAMP"
    {
        return Some("CURRENT_TIMESTAMP".into());
    }
    if upper.contains("0000-00-00") {
        notes.push(format!(
            "{table}.{column}: zero-date default {text} dropped (PostgreSQL has no zero date)"
        ));
        return None;
    }
    match expr {
        Expr::Value(v) => match &v.value {
            Value::Null => Some("NULL".into()),
            Value::Boolean(b) => Some(b.to_string()),
            Value::Number(n, _) if pg_type == "boolean" => {
                Some(if n == "0" { "false" } else { "true" }.into())
            }
            Value::Number(n, _) => Some(n.clone()),
            Value::SingleQuotedString(s) | Value::DoubleQuotedString(s) => {
                if pg_type == "boolean" {
                    Some(if s == "0" { "false" } else { "true" }.into())
                } else {
                    Some(format!("'{}'", s.replace('\'', "''")))
                }
            }
            _ => Some(text),
        },
        Expr::UnaryOp { .. } => Some(text),
        _ => {
            notes.push(format!(
                "{table}.{column}: default expression {text} copied as is; check it"
            ));
            Some(text)
        }
    }
}

fn action(a: &ReferentialAction) -> String {
    a.to_string()
}

/// Translates `SHOW CREATE TABLE` output (one or more statements).
pub fn translate(mysql_ddl: &str) -> Result<Translation, SchemaError> {
    let statements =
        Parser::parse_sql(&MySqlDialect {}, mysql_ddl).map_err(|e| SchemaError(e.to_string()))?;
    let mut out = Translation::default();
    let mut after = Vec::new();
    for st in statements {
        let Statement::CreateTable(t) = st else {
            out.notes.push(format!(
                "skipped a statement that is not CREATE TABLE: {}",
                first_line(&st.to_string())
            ));
            continue;
        };
        translate_table(&t, &mut out, &mut after);
    }
    out.statements.extend(after);
    Ok(out)
}

fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or("").chars().take(80).collect()
}

fn translate_table(t: &CreateTable, out: &mut Translation, after: &mut Vec<String>) {
    let table = bare(&t.name);
    let qt = ident(&table);
    let mut lines = Vec::new();
    let mut touch_columns = Vec::new();
    for c in &t.columns {
        let name = col_name(&c.name);
        let (ty, check) = pg_type(&c.data_type.to_string(), &table, &name, &mut out.notes);
        let mut parts = vec![format!("{} {ty}", ident(&name))];
        let mut identity = false;
        for opt in &c.options {
            match &opt.option {
                ColumnOption::NotNull => parts.push("NOT NULL".into()),
                ColumnOption::Null => {}
                ColumnOption::Default(e) => {
                    if let Some(d) = pg_default(e, &ty, &table, &name, &mut out.notes) {
                        parts.push(format!("DEFAULT {d}"));
                    }
                }
                ColumnOption::Unique { is_primary: true, .. } => parts.push("PRIMARY KEY".into()),
                ColumnOption::Unique { is_primary: false, .. } => parts.push("UNIQUE".into()),
                ColumnOption::DialectSpecific(tokens)
                    if tokens.iter().any(|t| matches!(t, Token::Word(w) if w.value.eq_ignore_ascii_case("AUTO_INCREMENT"))) =>
                {
                    identity = true;
                }
                ColumnOption::OnUpdate(e) => {
                    let u = e.to_string().to_ascii_uppercase();
                    if u.starts_with("CURRENT_TIMESTAMP") || u.starts_with("NOW(") {
                        touch_columns.push(name.clone());
                    } else {
                        out.notes.push(format!("{table}.{name}: ON UPDATE {e} not translated"));
                    }
                }
                ColumnOption::Comment(text) => after.push(format!(
                    "COMMENT ON COLUMN {qt}.{} IS '{}'",
                    ident(&name),
                    text.replace('\'', "''")
                )),
                ColumnOption::CharacterSet(_) | ColumnOption::Collation(_) => {}
                // MariaDB shows JSON columns as LONGTEXT CHECK (json_valid(col)).
                ColumnOption::Check(e)
                    if e.to_string().to_ascii_lowercase().starts_with("json_valid(") =>
                {
                    parts[0] = format!("{} jsonb", ident(&name));
                }
                ColumnOption::Check(e) => {
                    parts.push(format!("CHECK ({})", e.to_string().replace('`', "\"")))
                }
                ColumnOption::Generated { .. } => out.notes.push(format!(
                    "{table}.{name}: generated column expression not translated (column kept as a plain {ty})"
                )),
                other => out.notes.push(format!("{table}.{name}: column option {other} not translated")),
            }
        }
        if identity {
            parts.insert(1, "GENERATED BY DEFAULT AS IDENTITY".into());
        }
        if let Some(check) = check {
            parts.push(check);
        }
        lines.push(parts.join(" "));
    }
    for con in &t.constraints {
        match con {
            TableConstraint::PrimaryKey { columns, .. } => lines.push(format!(
                "PRIMARY KEY ({})",
                columns
                    .iter()
                    .map(|c| ident(&col_name(c)))
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
            TableConstraint::Unique {
                name,
                index_name,
                columns,
                ..
            } => {
                let cols = columns
                    .iter()
                    .map(|c| ident(&col_name(c)))
                    .collect::<Vec<_>>()
                    .join(", ");
                match name.as_ref().or(index_name.as_ref()) {
                    Some(n) => lines.push(format!(
                        "CONSTRAINT {} UNIQUE ({cols})",
                        ident(&format!("{table}_{}", col_name(n)))
                    )),
                    None => lines.push(format!("UNIQUE ({cols})")),
                }
            }
            TableConstraint::Index { name, columns, .. } => {
                let cols = columns
                    .iter()
                    .map(|c| ident(&col_name(c)))
                    .collect::<Vec<_>>()
                    .join(", ");
                let index = match name {
                    Some(n) => format!("{table}_{}", col_name(n)),
                    None => format!("{table}_idx_{}", after.len()),
                };
                after.push(format!("CREATE INDEX {} ON {qt} ({cols})", ident(&index)));
            }
            TableConstraint::ForeignKey {
                name,
                columns,
                foreign_table,
                referred_columns,
                on_delete,
                on_update,
                ..
            } => {
                let mut fk = format!(
                    "ALTER TABLE {qt} ADD{} FOREIGN KEY ({}) REFERENCES {} ({})",
                    name.as_ref()
                        .map(|n| format!(" CONSTRAINT {}", ident(&col_name(n))))
                        .unwrap_or_default(),
                    columns
                        .iter()
                        .map(|c| ident(&col_name(c)))
                        .collect::<Vec<_>>()
                        .join(", "),
                    ident(&bare(foreign_table)),
                    referred_columns
                        .iter()
                        .map(|c| ident(&col_name(c)))
                        .collect::<Vec<_>>()
                        .join(", ")
                );
                if let Some(a) = on_delete {
                    fk.push_str(&format!(" ON DELETE {}", action(a)));
                }
                if let Some(a) = on_update {
                    fk.push_str(&format!(" ON UPDATE {}", action(a)));
                }
                after.push(fk);
            }
            TableConstraint::Check { name, expr, .. } => {
                let expr = expr.to_string().replace('`', "\"");
                lines.push(match name {
                    Some(n) => format!("CONSTRAINT {} CHECK ({expr})", ident(&col_name(n))),
                    None => format!("CHECK ({expr})"),
                })
            }
            TableConstraint::FulltextOrSpatial { .. } => out.notes.push(format!(
                "{table}: {} not translated (use a GIN index on to_tsvector(...) or PostGIS)",
                first_line(&con.to_string())
            )),
        }
    }
    out.statements.push(format!(
        "CREATE TABLE {qt} (\n    {}\n)",
        lines.join(",\n    ")
    ));
    for col in touch_columns {
        // ON UPDATE CURRENT_TIMESTAMP: a trigger keeps the column current.
        let func = ident(&format!("{table}_{col}_touch"));
        after.push(format!(
            "CREATE FUNCTION {func}() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN NEW.{} := CURRENT_TIMESTAMP; RETURN NEW; END $$",
            ident(&col)
        ));
        after.push(format!(
            "CREATE TRIGGER {} BEFORE UPDATE ON {qt} FOR EACH ROW EXECUTE FUNCTION {func}()",
            ident(&format!("{table}_{col}_on_update"))
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn types_keys_defaults_and_on_update_translate() {
        let t = translate(
            "CREATE TABLE `orders` (
              `id` int(11) unsigned NOT NULL AUTO_INCREMENT,
              `customer_id` int(11) NOT NULL,
              `total` decimal(10,2) NOT NULL DEFAULT '0.00',
              `paid` tinyint(1) NOT NULL DEFAULT '0',
              `status` enum('new','paid','shipped') NOT NULL DEFAULT 'new',
              `notes` mediumtext,
              `created_at` datetime NOT NULL DEFAULT CURRENT_TIMESTAMP,
              `updated_at` timestamp NOT NULL DEFAULT CURRENT_TIMESTAMP ON UPDATE CURRENT_TIMESTAMP,
              PRIMARY KEY (`id`),
              UNIQUE KEY `uniq_ref` (`customer_id`,`created_at`),
              KEY `by_status` (`status`),
              FULLTEXT KEY `ft_notes` (`notes`),
              CONSTRAINT `fk_customer` FOREIGN KEY (`customer_id`) REFERENCES `customers` (`id`) ON DELETE CASCADE
            ) ENGINE=InnoDB AUTO_INCREMENT=42 DEFAULT CHARSET=utf8mb4",
        )
        .expect("translates");
        let script = t.script();
        for needle in [
            "\"id\" bigint GENERATED BY DEFAULT AS IDENTITY NOT NULL",
            "\"total\" numeric(10,2) NOT NULL DEFAULT '0.00'",
            "\"paid\" boolean NOT NULL DEFAULT false",
            "\"status\" text NOT NULL DEFAULT 'new' CHECK (\"status\" IN ('new', 'paid', 'shipped'))",
            "\"notes\" text",
            "\"created_at\" timestamp NOT NULL DEFAULT CURRENT_TIMESTAMP",
            "\"updated_at\" timestamptz NOT NULL DEFAULT CURRENT_TIMESTAMP",
            "PRIMARY KEY (\"id\")",
            "CONSTRAINT \"orders_uniq_ref\" UNIQUE (\"customer_id\", \"created_at\")",
            "CREATE INDEX \"orders_by_status\" ON \"orders\" (\"status\")",
            "FOREIGN KEY (\"customer_id\") REFERENCES \"customers\" (\"id\") ON DELETE CASCADE",
            "BEFORE UPDATE ON \"orders\"",
        ] {
            assert!(script.contains(needle), "missing {needle} in\n{script}");
        }
        assert!(
            t.notes.iter().any(|n| n.contains("FULLTEXT")),
            "{:?}",
            t.notes
        );
    }
}

/// Why DDL could not be read from MySQL/MariaDB.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The server could not be reached or a query failed.
    #[error("MySQL/MariaDB: {0}")]
    Mysql(#[from] mysql_async::Error),
    /// A table's DDL did not parse.
    #[error(transparent)]
    Parse(#[from] SchemaError),
}

/// Reads `SHOW CREATE TABLE` of `tables` (all base tables when empty) from the
/// database in `url` and translates it.
pub async fn from_mysql(url: &str, tables: &[String]) -> Result<Translation, ReadError> {
    use mysql_async::prelude::Queryable;
    let pool = mysql_async::Pool::new(url);
    let mut conn = pool.get_conn().await?;
    let names: Vec<String> = if tables.is_empty() {
        conn.query("SHOW FULL TABLES WHERE Table_type = 'BASE TABLE'")
            .await?
            .into_iter()
            .map(|(name, _kind): (String, String)| name)
            .collect()
    } else {
        tables.to_vec()
    };
    let mut ddl = String::new();
    for name in &names {
        let row: Option<(String, String)> = conn
            .query_first(format!("SHOW CREATE TABLE `{}`", name.replace('`', "``")))
            .await?;
        if let Some((_, create)) = row {
            ddl.push_str(&create);
            ddl.push_str(";\n");
        }
    }
    drop(conn);
    pool.disconnect().await?;
    // Referenced tables first is not needed: foreign keys come after all tables.
    Ok(translate(&ddl)?)
}
