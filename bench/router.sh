#!/usr/bin/env bash
# Router throughput and latency, side by side with nginx and haproxy, in one run.
#
# Same load generator (wrk), same connection count and the same upstream for every
# target; each proxy gets 2 workers/threads. Prints requests/s, p50 and p99 for
# each, and the ratios router/nginx and router/haproxy.
#
#   bench/router.sh              # 10 s per target, 50 connections
#   DURATION=30 CONNECTIONS=100 bench/router.sh
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION="${DURATION:-10}"
CONNECTIONS="${CONNECTIONS:-50}"
THREADS="${WRK_THREADS:-2}"

STRANGLER_BENCH=1 ./scripts/install-deps.sh
cargo build --release --locked -p strangler-cli >&2
cargo build --release --locked -p strangler-router --example otlp_sink --example bare_pingora >&2
TARGET="${CARGO_TARGET_DIR:-target}/release"

source bench/lib.sh strangler-bench

UP=$(free_port); NGX=$(free_port); HAP=$(free_port); RTR=$(free_port); ADM=$(free_port); OTLP=$(free_port); BARE=$(free_port)

# The upstream: nginx answering a small JSON body, 1 worker, the same for every target.
mkdir -p "$WORK/up" "$WORK/ngx"
cat > "$WORK/up/nginx.conf" <<CONF
worker_processes 1; daemon off; pid $WORK/up/nginx.pid; error_log $WORK/up/error.log; user root;
events { worker_connections 4096; }
http { access_log off; client_body_temp_path $WORK/up; proxy_temp_path $WORK/up; fastcgi_temp_path $WORK/up; uwsgi_temp_path $WORK/up; scgi_temp_path $WORK/up;
  server { listen 127.0.0.1:$UP; keepalive_requests 1000000;
    location / { default_type application/json; return 200 '{"side":"upstream","ok":true}'; } } }
CONF
nginx -p "$WORK/up" -c "$WORK/up/nginx.conf" & PIDS+=($!)

cat > "$WORK/ngx/nginx.conf" <<CONF
worker_processes 2; daemon off; pid $WORK/ngx/nginx.pid; error_log $WORK/ngx/error.log; user root;
events { worker_connections 4096; }
http { access_log off; client_body_temp_path $WORK/ngx; proxy_temp_path $WORK/ngx; fastcgi_temp_path $WORK/ngx; uwsgi_temp_path $WORK/ngx; scgi_temp_path $WORK/ngx;
  upstream up { server 127.0.0.1:$UP; keepalive 128; }
  server { listen 127.0.0.1:$NGX; keepalive_requests 1000000;
    location / { proxy_pass http://up; proxy_http_version 1.1; proxy_set_header Connection "";
      proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for; } } }
CONF
nginx -p "$WORK/ngx" -c "$WORK/ngx/nginx.conf" & PIDS+=($!)

cat > "$WORK/haproxy.cfg" <<CONF
global
  nbthread 2
  maxconn 4000
defaults
  mode http
  timeout connect 1s
  timeout client 30s
  timeout server 30s
  http-reuse always
  option forwardfor
frontend fe
  bind 127.0.0.1:$HAP
  default_backend be
backend be
  server s1 127.0.0.1:$UP
CONF
haproxy -f "$WORK/haproxy.cfg" -db >"$WORK/haproxy.log" 2>&1 & PIDS+=($!)

"$TARGET/examples/otlp_sink" "127.0.0.1:$OTLP" 2>"$WORK/otlp.log" & PIDS+=($!)
# pingora with no strangler logic at all: the floor the router is built on.
"$TARGET/examples/bare_pingora" "127.0.0.1:$BARE" "127.0.0.1:$UP" 2>"$WORK/bare.log" & PIDS+=($!)

# The router: the benchmarked path is a matched route whose flag is evaluated per
# request (50 % rollout, sticky by x-user-id) with a span exported per request.
cat > "$WORK/flags.json" <<JSON
{"version":2,"features":[{"name":"strangler.orders","enabled":true,"strategies":[{"name":"flexibleRollout","parameters":{"rollout":"50","stickiness":"default","groupId":"strangler.orders"}}]}]}
JSON
cat > "$WORK/strangler.toml" <<TOML
[server]
listen = "127.0.0.1:$RTR"
threads = 2
[admin]
listen = "127.0.0.1:$ADM"
[flags]
file = "flags.json"
[telemetry]
otlp_endpoint = "http://127.0.0.1:$OTLP"
[legacy]
upstream = "127.0.0.1:$UP"
[[route]]
name = "orders"
match = { prefix = "/api/orders" }
new = "127.0.0.1:$UP"
sticky = "header:x-user-id"
TOML
STRANGLER_LOG=warn "$TARGET/strangler" router run --config "$WORK/strangler.toml" 2>"$WORK/router.log" & PIDS+=($!)

for p in $UP $NGX $HAP $RTR $OTLP $BARE; do wait_port "$p"; done

# Every request carries a different user id so the flag is really evaluated.
cat > "$WORK/users.lua" <<'LUA'
local n = 0
request = function()
  n = n + 1
  return wrk.format("GET", "/api/orders/" .. n, { ["x-user-id"] = "user-" .. (n % 100000) })
end
LUA

run() { # name port
  wrk -t"$THREADS" -c"$CONNECTIONS" -d2s -s "$WORK/users.lua" "http://127.0.0.1:$2/" >/dev/null 2>&1 || true
  wrk -t"$THREADS" -c"$CONNECTIONS" -d"${DURATION}s" --latency -s "$WORK/users.lua" "http://127.0.0.1:$2/" > "$WORK/$1.txt"
}
run direct "$UP"
run strangler "$RTR"
run nginx "$NGX"
run haproxy "$HAP"
run pingora "$BARE"

RSS_KB=$(ps -o rss= -p "$(pgrep -f "strangler router run --config $WORK" | head -1)" | tr -d ' ')
python3 - "$WORK" "$DURATION" "$CONNECTIONS" "$RSS_KB" <<'PY'
import re, sys
work, duration, conns, rss = sys.argv[1:5]
def parse(name):
    text = open(f"{work}/{name}.txt").read()
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))
    def lat(p):
        m = re.search(rf"^\s+{p}%\s+([\d.]+)(us|ms|s)\s*$", text, re.M)
        v, u = float(m.group(1)), m.group(2)
        return v * {"us": 1, "ms": 1000, "s": 1_000_000}[u]
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    errors = re.search(r"Socket errors:.*", text)
    return rps, lat(50), lat(99), int(non2xx.group(1)) if non2xx else 0, errors.group(0) if errors else ""
rows = {n: parse(n) for n in ["direct", "strangler", "nginx", "haproxy", "pingora"]}
print(f"wrk, {conns} connections, {duration}s per target, 2 proxy workers each, same upstream (nginx, 1 worker)\n")
print(f"{'target':<10} {'req/s':>10} {'p50 us':>9} {'p99 us':>9}  notes")
for n, (rps, p50, p99, bad, err) in rows.items():
    note = (f"{bad} non-2xx " if bad else "") + err
    print(f"{n:<10} {rps:>10.0f} {p50:>9.0f} {p99:>9.0f}  {note}")
s, g, h, d = rows["strangler"], rows["nginx"], rows["haproxy"], rows["direct"]
print()
print(f"router / nginx   throughput {s[0]/g[0]:.2f}x   p50 {s[1]/g[1]:.2f}x   p99 {s[2]/g[2]:.2f}x")
print(f"router / haproxy throughput {s[0]/h[0]:.2f}x   p50 {s[1]/h[1]:.2f}x   p99 {s[2]/h[2]:.2f}x")
b = rows["pingora"]
print(f"router / bare pingora throughput {s[0]/b[0]:.2f}x   (what strangler's routing, flags, metrics and spans cost)")
print(f"router p50 added over direct: {s[1]-d[1]:.0f} us   (nginx {g[1]-d[1]:.0f} us, haproxy {h[1]-d[1]:.0f} us)")
print(f"router RSS after the run: {int(rss)/1024:.1f} MiB")
PY
echo "(otlp sink: $(tail -1 "$WORK/otlp.log" 2>/dev/null))"
