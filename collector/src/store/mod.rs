//! Where spans are stored.

pub mod clickhouse;

use async_trait::async_trait;

use crate::rowbinary::Encoded;

/// Why a store call failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The store could not be reached or refused the write; try again later.
    #[error("span store unavailable: {0}")]
    Unavailable(String),
    /// The store is reachable but its schema is still being created; try again
    /// shortly (expected for a moment after every start, so not worth a warning).
    #[error("span store not ready: the schema is still being migrated")]
    Migrating,
    /// A query or schema statement is wrong; retrying will not help.
    #[error("span store rejected the statement: {0}")]
    Rejected(String),
}

impl StoreError {
    /// Whether the same call may succeed later.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Unavailable(_) | Self::Migrating)
    }
}

/// A durable home for spans.
///
/// Contract: `insert` returns `Ok` only once every row is durably stored; on `Err`
/// any subset may have been stored (callers retry, and the table deduplicates
/// identical rows). Calls may run concurrently.
#[async_trait]
pub trait SpanStore: Send + Sync + 'static {
    /// Stores span rows (RowBinary, in the `spans` column order).
    async fn insert(&self, spans: &Encoded) -> Result<(), StoreError>;
    /// Whether the store answers.
    async fn ping(&self) -> bool;
}
