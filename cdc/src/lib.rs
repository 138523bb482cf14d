//! strangler's change data capture owns keeping the legacy database and the new
//! service's database in sync while routes move: a source (PostgreSQL pgoutput,
//! MySQL/MariaDB binlog), mappings written as SQL, sinks, checkpoints that are
//! acknowledged only after the sink commits, verification and reverse sync.
