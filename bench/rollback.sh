#!/usr/bin/env bash
# Rollback latency with two routers under load: `strangler route rollback` (overrides
# + toggle) versus disabling the Unleash toggle alone and waiting for the 1 s poll.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-deps.sh
cargo build --release --locked -p strangler-cli >&2
cargo build --release --locked -p strangler-cli --example rollback_bench >&2
exec "${CARGO_TARGET_DIR:-target}/release/examples/rollback_bench"
