#!/usr/bin/env bash
# Collector throughput into a real ClickHouse vs clickhouse-client inserting the same rows.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-deps.sh
command -v clickhouse-client >/dev/null || sudo_apt=1
if [ "${sudo_apt:-0}" = 1 ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq clickhouse-client >/dev/null
fi
cargo build --release --locked -p strangler-cli >&2
cargo build --release --locked -p strangler-collector --example collector_bench >&2
exec "${CARGO_TARGET_DIR:-target}/release/examples/collector_bench"
