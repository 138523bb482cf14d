#!/usr/bin/env bash
# Primary latency with shadowing at 100 % versus off, with the shadow target equal,
# 10x slower, and down; all in one run with the same load. Prints p50/p99 and the
# ratio to "off".
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION="${DURATION:-8}"
CONNECTIONS="${CONNECTIONS:-20}"
PRIMARY_MS="${PRIMARY_MS:-2}"

STRANGLER_BENCH=1 ./scripts/install-deps.sh
cargo build --release --locked -p strangler-cli >&2
cargo build --release --locked -p strangler-router --example delay_upstream >&2
TARGET="${CARGO_TARGET_DIR:-target}/release"

source bench/lib.sh strangler-shadow-bench

LEGACY=$(free_port); EQUAL=$(free_port); SLOW=$(free_port); DEAD=$(free_port); RTR=$(free_port); ADM=$(free_port)
"$TARGET/examples/delay_upstream" "127.0.0.1:$LEGACY" "$PRIMARY_MS" & PIDS+=($!)
"$TARGET/examples/delay_upstream" "127.0.0.1:$EQUAL" "$PRIMARY_MS" & PIDS+=($!)
"$TARGET/examples/delay_upstream" "127.0.0.1:$SLOW" "$((PRIMARY_MS * 10))" & PIDS+=($!)
for p in $LEGACY $EQUAL $SLOW; do wait_port "$p"; done
echo '{"version":2,"features":[]}' > "$WORK/flags.json"
cat > "$WORK/users.lua" <<'LUA'
local n = 0
request = function()
  n = n + 1
  return wrk.format("GET", "/api/orders/" .. n, { ["x-user-id"] = "user-" .. (n % 100000) })
end
LUA

run() { # name new_port shadow_percent
  cat > "$WORK/strangler.toml" <<TOML
[server]
listen = "127.0.0.1:$RTR"
[admin]
listen = "127.0.0.1:$ADM"
[legacy]
upstream = "127.0.0.1:$LEGACY"
[[route]]
name = "orders"
match = { prefix = "/api/orders" }
new = "127.0.0.1:$2"
[route.shadow]
percent = $3
timeout_ms = 1000
TOML
  STRANGLER_LOG=warn "$TARGET/strangler" router run --config "$WORK/strangler.toml" 2>"$WORK/$1.log" &
  local pid=$!
  wait_port "$RTR"
  wrk -t2 -c"$CONNECTIONS" -d2s -s "$WORK/users.lua" "http://127.0.0.1:$RTR/" >/dev/null 2>&1 || true
  wrk -t2 -c"$CONNECTIONS" -d"${DURATION}s" --latency -s "$WORK/users.lua" "http://127.0.0.1:$RTR/" > "$WORK/$1.txt"
  curl -s "http://127.0.0.1:$ADM/routes/orders/shadow" > "$WORK/$1.json" || true
  kill "$pid"; wait "$pid" 2>/dev/null || true
  sleep 0.5
}
run off "$EQUAL" 0
run equal "$EQUAL" 100
run slow "$SLOW" 100
run down "$DEAD" 100

python3 - "$WORK" "$DURATION" "$CONNECTIONS" "$PRIMARY_MS" <<'PY'
import json, re, sys
work, duration, conns, primary = sys.argv[1:5]
def parse(name):
    text = open(f"{work}/{name}.txt").read()
    def lat(p):
        m = re.search(rf"^\s+{p}%\s+([\d.]+)(us|ms|s)\s*$", text, re.M)
        return float(m.group(1)) * {"us": 1, "ms": 1000, "s": 1_000_000}[m.group(2)]
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    try:
        stats = json.load(open(f"{work}/{name}.json"))
    except Exception:
        stats = {}
    return rps, lat(50), lat(99), int(bad.group(1)) if bad else 0, stats
rows = {n: parse(n) for n in ["off", "equal", "slow", "down"]}
print(f"wrk, {conns} connections, {duration}s each; primary upstream answers in {primary} ms; shadow at 100 %\n")
print(f"{'shadow target':<14} {'req/s':>8} {'p50 us':>8} {'p99 us':>8} {'p99 / off':>9}  non-2xx  pairs (match/mismatch/error/skipped)")
base = rows["off"][2]
for n, (rps, p50, p99, bad, st) in rows.items():
    pairs = "-" if n == "off" else f"{st.get('matches',0)}/{st.get('mismatches',0)}/{st.get('shadow_errors',0)}/{st.get('skipped',0)}"
    label = {"off": "off", "equal": "equal", "slow": "10x slower", "down": "down"}[n]
    print(f"{label:<14} {rps:>8.0f} {p50:>8.0f} {p99:>8.0f} {p99/base:>9.2f}  {bad:>7}  {pairs}")
PY
