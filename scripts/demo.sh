#!/usr/bin/env bash
# The README's main command: installs what is missing, builds strangler and runs the demo.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null 2>&1; then
  echo "cargo not found: install Rust with rustup (https://rustup.rs), then rerun" >&2
  exit 1
fi
./scripts/install-deps.sh
cargo build --locked -p strangler-cli
exec "${CARGO_TARGET_DIR:-target}/debug/strangler" demo "$@"
