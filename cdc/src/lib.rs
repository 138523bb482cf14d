//! strangler's change data capture: keeps the new service's database in step with
//! the legacy one while routes move. PostgreSQL logical replication (`pgoutput`,
//! decoded by `pg_walstream`) is read from the legacy database; each mapped table's
//! changes pass through a mapping written as SQL and are applied to the target in
//! whole transactions, idempotently, with the applied position stored in the same
//! target transaction.

pub mod apply;
pub mod config;
pub mod conflict;
pub mod deferred;
pub mod lsn;
pub mod mapping;
pub mod mysql;
pub mod observe;
pub mod plan;
pub mod resnapshot;
pub mod run;
pub mod schema;
pub mod sink;
pub mod verify;

pub use config::CdcConfig;
pub use lsn::Lsn;
pub use pg_walstream::CancellationToken;
pub use run::{CdcError, check, run};
