//! strangler's change data capture: keeps the new service's database in step with
//! the legacy one while routes move.
//!
//! Layers, each importing only those above it in this list:
//!
//! - [`model`]: positions (a PostgreSQL LSN or a binlog coordinate), rows, keys;
//! - [`mapping`]: mappings written as SQL, parsed with sqlparser;
//! - [`error`]: why CDC stops, each error knowing whether it is transient;
//! - [`conflict`]: conflict policies; [`config`]: the validated configuration;
//! - [`plan`]: each mapping checked against both schemas, with its SQL;
//!   [`pg`] and [`mysql`]: helpers for each database;
//! - [`batch`]: whole transactions reduced to each row's last state;
//! - [`source`] (PostgreSQL logical replication, MySQL/MariaDB binlog) and
//!   [`sink`] (PostgreSQL, MySQL/MariaDB): the seams to the databases;
//! - [`pipeline`]: one stream loop for every source and sink, with reconnects;
//! - [`ops`]: check, status, verify, re-snapshot; [`observe`]: metrics and spans.

pub mod batch;
pub mod config;
pub mod conflict;
pub mod error;
pub mod mapping;
pub mod model;
pub mod mysql;
pub mod observe;
pub mod ops;
pub mod pg;
pub mod pipeline;
pub mod plan;
pub mod sink;
pub mod source;

pub use config::CdcConfig;
pub use error::CdcError;
pub use model::Lsn;
pub use ops::{check, status};
pub use pg_walstream::CancellationToken;
pub use pipeline::{Progress, RunOptions, run, run_with};
