#!/usr/bin/env bash
# The README's test command: installs what the tests need, then runs formatting,
# lints and every test (unit and integration against real servers).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null 2>&1; then
  echo "cargo not found: install Rust with rustup (https://rustup.rs), then rerun" >&2
  exit 1
fi
./scripts/install-deps.sh

echo "== cargo fmt" >&2
cargo fmt --all -- --check
echo "== cargo clippy" >&2
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== cargo test" >&2
cargo test --workspace --locked "$@"
