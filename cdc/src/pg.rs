//! PostgreSQL helpers shared by the PostgreSQL source and sink and the operations:
//! connecting, a database error's message, and running mapping SQL over rows
//! given as one `text[]` parameter per column.

use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, NoTls};

use crate::error::CdcError;

/// Connects to the PostgreSQL database at `url` (`side` names it in errors).
pub async fn connect(url: &str, side: &'static str) -> Result<Client, CdcError> {
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

/// A replication connection string for `url`.
pub(crate) fn replication_url(url: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}replication=database")
}

pub(crate) fn db_message(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(d) => match d.detail() {
            Some(detail) => format!("{} ({detail})", d.message()),
            None => d.message().to_string(),
        },
        None => e.to_string(),
    }
}

/// Rows of text values as one array per column: the `text[]` parameters the
/// mapping SQL (`unnest($1::text[], …)`) takes.
pub(crate) fn transpose<'a>(
    width: usize,
    rows: impl IntoIterator<Item = &'a Vec<Option<String>>>,
) -> Vec<Vec<Option<String>>> {
    let mut columns = vec![Vec::new(); width];
    for row in rows {
        for (i, v) in row.iter().enumerate().take(width) {
            columns[i].push(v.clone());
        }
    }
    columns
}

/// Runs mapping SQL with `text[]` parameters and returns every column as text.
pub(crate) async fn text_rows(
    db: &impl tokio_postgres::GenericClient,
    sql: &str,
    columns: &[Vec<Option<String>>],
) -> Result<Vec<Vec<Option<String>>>, tokio_postgres::Error> {
    let params: Vec<&(dyn ToSql + Sync)> =
        columns.iter().map(|c| c as &(dyn ToSql + Sync)).collect();
    Ok(db
        .query(sql, &params)
        .await?
        .iter()
        .map(|r| {
            (0..r.len())
                .map(|i| r.get::<_, Option<String>>(i))
                .collect()
        })
        .collect())
}

/// Runs mapping SQL with `text[]` parameters; rows affected.
pub(crate) async fn execute(
    tx: &impl tokio_postgres::GenericClient,
    sql: &str,
    columns: &[Vec<Option<String>>],
) -> Result<u64, tokio_postgres::Error> {
    let params: Vec<&(dyn ToSql + Sync)> =
        columns.iter().map(|c| c as &(dyn ToSql + Sync)).collect();
    tx.execute(sql, &params).await
}
