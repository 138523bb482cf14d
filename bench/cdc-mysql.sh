#!/usr/bin/env bash
# MariaDB ↔ PostgreSQL CDC benchmark: strangler's snapshot of a MariaDB table into
# PostgreSQL vs the hand pipe `mariadb --batch | psql COPY` in the same run, the
# binlog apply rate on a backlog, and the new → legacy round trip (p50/p99).
# Env: STRANGLER_BENCH_ROWS (200000), STRANGLER_BENCH_BACKLOG (100000),
#      STRANGLER_BENCH_SAMPLES (300).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p strangler-cdc --example mysql_bench
STRANGLER_LOG="${STRANGLER_LOG:-warn}" RUST_LOG="${RUST_LOG:-warn}" \
  "${CARGO_TARGET_DIR:-target}/release/examples/mysql_bench"
