//! Real servers for strangler's tests.
//!
//! testkit owns starting PostgreSQL 15 (logical replication on), MariaDB (binlog in
//! ROW format with GTIDs), ClickHouse (one server, or a replicated cluster with its
//! ZooKeeper) and an Unleash server from the machine's own
//! binaries, each in a temporary directory on a free 127.0.0.1 port. A `start()`
//! returns only once the server answers a real client request (or fails with the
//! server's log), and dropping the handle stops the server and removes its files.
//! Ports are leased through lock files so test binaries running at once never share
//! one. A missing binary is an error that names the package to install.

mod error;

pub mod clickhouse;
pub mod mariadb;
pub mod port;
pub mod postgres;
pub mod process;
pub mod unleash;
pub mod zookeeper;

pub use clickhouse::{ClickHouse, ClickHouseCluster};
pub use error::{Result, TestkitError};
pub use mariadb::MariaDb;
pub use port::{PortLease, free_port};
pub use postgres::Postgres;
pub use unleash::Unleash;
pub use zookeeper::ZooKeeper;
