#!/usr/bin/env bash
# CDC benchmark: strangler's snapshot vs `pg_dump | psql`, and its streaming apply
# rate and lag vs PostgreSQL's own logical replication (CREATE SUBSCRIPTION), on the
# same tables between the same two PostgreSQL 15 servers in one run.
# Env: STRANGLER_BENCH_ROWS (300000 per table), STRANGLER_BENCH_BACKLOG (200000),
#      STRANGLER_BENCH_RATE (5000 rows/s), STRANGLER_BENCH_SECONDS (15),
#      STRANGLER_BENCH_PARALLELISM (4: strangler's snapshot copies at once).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p strangler-cdc --example cdc_bench
STRANGLER_LOG="${STRANGLER_LOG:-warn}" RUST_LOG="${RUST_LOG:-warn}" \
  "${CARGO_TARGET_DIR:-target}/release/examples/cdc_bench"
