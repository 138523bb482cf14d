#!/usr/bin/env bash
# Soak under combined faults: the example's stack as processes (shop, orders service,
# two PostgreSQL clusters, CDC both ways, two routers on Unleash, collector,
# ClickHouse, a rollout controller now and then) under paced traffic while a seeded
# schedule injects a fault every few seconds; the checker's figures (writes, reads,
# telemetry, routing, RSS) end with one name=value line. SOAK_SECONDS (default 600) and
# SOAK_SEED (default 1) set the run. See cli/tests/soak.rs for what is covered.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-deps.sh
export SOAK_SECONDS="${SOAK_SECONDS:-600}" SOAK_SEED="${SOAK_SEED:-1}"
cargo build --release --locked -p strangler-cli -p strangler-example >&2
exec cargo test --release --locked -p strangler-cli --test soak -- --nocapture
