#!/usr/bin/env bash
# Router throughput and latency, side by side with nginx, haproxy and bare pingora
# (pingora with no strangler logic), in one run, for each worker count asked for.
#
# Same load generator (wrk), same connections, same upstream (nginx, 1 worker) for
# every target. The router runs a matched route whose flag is evaluated for a
# different user on every request (50 % rollout), with telemetry exported to an
# OTLP sink. Prints req/s, p50, p99 per target and the ratios, and ends with one
# line: `strangler/bare_pingora=… strangler/nginx=…` (suffixed `@Nw` per worker
# count when several are measured).
#
#   bench/router.sh                          # 2 workers, 10 s per target
#   WORKERS="1 2 4 8" DURATION=20 bench/router.sh
#   BIN_DIR=/path/bench-bin bench/router.sh  # prebuilt binaries, no cargo
#   BASELINE_BIN=/path/old/strangler bench/router.sh   # adds a "before" row
#   SAMPLE_RATIO=1.0 bench/router.sh         # the router's telemetry.sample_ratio
#
# BIN_DIR holds `strangler`, `otlp_sink` and `bare_pingora` (and, if they are not on
# the machine, nginx/haproxy/wrk are looked up on PATH). On a machine with at least
# 12 cores the load generator, the upstream and the proxy under test get their own
# cores (taskset), so the many-core table is measured the same way.
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION="${DURATION:-10}"
CONNECTIONS="${CONNECTIONS:-50}"
WORKERS="${WORKERS:-2}"
SAMPLE_RATIO="${SAMPLE_RATIO:-}"

if [ -z "${BIN_DIR:-}" ]; then
  STRANGLER_BENCH=1 ./scripts/install-deps.sh
  cargo build --release --locked -p strangler-cli >&2
  cargo build --release --locked -p strangler-router --example otlp_sink --example bare_pingora >&2
  TARGET="${CARGO_TARGET_DIR:-target}/release"
  STRANGLER="${STRANGLER_BIN:-$TARGET/strangler}"
  OTLP_SINK="$TARGET/examples/otlp_sink"
  BARE_PINGORA="$TARGET/examples/bare_pingora"
else
  STRANGLER="${STRANGLER_BIN:-$BIN_DIR/strangler}"
  OTLP_SINK="$BIN_DIR/otlp_sink"
  BARE_PINGORA="$BIN_DIR/bare_pingora"
  [ -d "$BIN_DIR/lib" ] && export LD_LIBRARY_PATH="$BIN_DIR/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
for tool in nginx haproxy wrk; do
  command -v "$tool" >/dev/null || { echo "$tool not found (STRANGLER_BENCH=1 scripts/install-deps.sh installs it)" >&2; exit 1; }
done

source bench/lib.sh strangler-bench

# Core layout: on a big machine wrk gets 4 cores, the upstream 2, each proxy the next
# WORKERS cores; on a small one everything shares.
CORES=$(nproc)
# `$(pin FIRST COUNT) command` runs command on those cores (nothing on a small
# machine); a prefix, not a wrapper function, so `$!` is the command's own pid.
pin() { if [ "$CORES" -ge 12 ]; then echo "taskset -c $1-$(($1 + $2 - 1))"; fi; }
if [ "$CORES" -ge 12 ]; then WRK_THREADS="${WRK_THREADS:-4}"; else WRK_THREADS="${WRK_THREADS:-1}"; fi
PROXY_CORE=6

UP=$(free_port); OTLP=$(free_port)
mkdir -p "$WORK/up"
cat > "$WORK/up/nginx.conf" <<CONF
worker_processes 2; daemon off; pid $WORK/up/nginx.pid; error_log $WORK/up/error.log; user root;
events { worker_connections 4096; }
http { access_log off; client_body_temp_path $WORK/up; proxy_temp_path $WORK/up; fastcgi_temp_path $WORK/up; uwsgi_temp_path $WORK/up; scgi_temp_path $WORK/up;
  server { listen 127.0.0.1:$UP; keepalive_requests 1000000;
    location / { default_type application/json; return 200 '{"side":"upstream","ok":true}'; } } }
CONF
if [ "$CORES" -ge 12 ]; then sed -i 's/worker_processes 2;/worker_processes 2; worker_cpu_affinity 010000 100000;/' "$WORK/up/nginx.conf"; else sed -i 's/worker_processes 2;/worker_processes 1;/' "$WORK/up/nginx.conf"; fi
nginx -p "$WORK/up" -c "$WORK/up/nginx.conf" >"$WORK/up/nginx.out" 2>&1 & PIDS+=($!)
"$OTLP_SINK" "127.0.0.1:$OTLP" >"$WORK/otlp.log" 2>&1 & PIDS+=($!)
wait_port "$UP"; wait_port "$OTLP"
# Where the router under test exports spans and aggregates: the sink, or (in the
# collector-cost phase at the end) a real collector.
TELEMETRY=$OTLP

cat > "$WORK/flags.json" <<JSON
{"version":2,"features":[{"name":"strangler.orders","enabled":true,"strategies":[{"name":"flexibleRollout","parameters":{"rollout":"50","stickiness":"default","groupId":"strangler.orders"}}]}]}
JSON
# Every request carries a different user id so the flag is really evaluated.
cat > "$WORK/users.lua" <<'LUA'
local n = 0
request = function()
  n = n + 1
  return wrk.format("GET", "/api/orders/" .. n, { ["x-user-id"] = "user-" .. (n % 100000) })
end
LUA

start_target() { # name workers -> sets PORT, TPID
  local name=$1 w=$2 dir="$WORK/$1-$2"
  PORT=$(free_port); mkdir -p "$dir"
  case $name in
    nginx)
      cat > "$dir/nginx.conf" <<CONF
worker_processes $w; daemon off; pid $dir/nginx.pid; error_log $dir/error.log; user root;
events { worker_connections 4096; }
http { access_log off; client_body_temp_path $dir; proxy_temp_path $dir; fastcgi_temp_path $dir; uwsgi_temp_path $dir; scgi_temp_path $dir;
  upstream up { server 127.0.0.1:$UP; keepalive 128; }
  server { listen 127.0.0.1:$PORT; keepalive_requests 1000000;
    location / { proxy_pass http://up; proxy_http_version 1.1; proxy_set_header Connection "";
      proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for; } } }
CONF
      $(pin $PROXY_CORE "$w") nginx -p "$dir" -c "$dir/nginx.conf" >"$dir/nginx.out" 2>&1 & TPID=$! ;;
    haproxy)
      cat > "$dir/haproxy.cfg" <<CONF
global
  nbthread $w
  maxconn 4000
defaults
  mode http
  timeout connect 1s
  timeout client 30s
  timeout server 30s
  http-reuse always
  option forwardfor
frontend fe
  bind 127.0.0.1:$PORT
  default_backend be
backend be
  server s1 127.0.0.1:$UP
CONF
      $(pin $PROXY_CORE "$w") haproxy -f "$dir/haproxy.cfg" -db >"$dir/haproxy.log" 2>&1 & TPID=$! ;;
    pingora)
      $(pin $PROXY_CORE "$w") "$BARE_PINGORA" "127.0.0.1:$PORT" "127.0.0.1:$UP" "$w" >"$dir/bare.log" 2>&1 & TPID=$! ;;
    strangler|before)
      local bin=$STRANGLER admin; admin=$(free_port)
      [ "$name" = before ] && bin=$BASELINE_BIN
      cp "$WORK/flags.json" "$dir/flags.json"
      {
        printf '[server]\nlisten = "127.0.0.1:%s"\nthreads = %s\n[admin]\nlisten = "127.0.0.1:%s"\n' "$PORT" "$w" "$admin"
        # Spans and the route aggregates both exported, as the demo and `strangler init` set it up.
        printf '[flags]\nfile = "flags.json"\n[telemetry]\notlp_endpoint = "http://127.0.0.1:%s"\nmetrics_endpoint = "http://127.0.0.1:%s"\n' "$TELEMETRY" "$TELEMETRY"
        [ -n "$SAMPLE_RATIO" ] && [ "$name" = strangler ] && printf 'sample_ratio = %s\n' "$SAMPLE_RATIO"
        printf '[legacy]\nupstream = "127.0.0.1:%s"\n' "$UP"
        printf '[[route]]\nname = "orders"\nmatch = { prefix = "/api/orders" }\nnew = "127.0.0.1:%s"\nsticky = "header:x-user-id"\n' "$UP"
      } > "$dir/strangler.toml"
      STRANGLER_LOG=warn $(pin $PROXY_CORE "$w") "$bin" router run --config "$dir/strangler.toml" >"$dir/router.log" 2>&1 & TPID=$! ;;
  esac
  wait_port "$PORT"
}

measure() { # name workers
  start_target "$1" "$2"
  local out="$WORK/$1-$2.txt"
  $(pin 0 4) wrk -t"$WRK_THREADS" -c"$CONNECTIONS" -d2s -s "$WORK/users.lua" "http://127.0.0.1:$PORT/" >/dev/null 2>&1 || true
  $(pin 0 4) wrk -t"$WRK_THREADS" -c"$CONNECTIONS" -d"${DURATION}s" --latency -s "$WORK/users.lua" "http://127.0.0.1:$PORT/" > "$out"
  if [ "$1" = strangler ]; then ps -o rss= -p "$TPID" | tr -d ' ' > "$WORK/rss-$2"; fi
  # SIGKILL: a graceful drain would only make the next target wait.
  kill -KILL "$TPID" 2>/dev/null || true; wait "$TPID" 2>/dev/null || true
}

TARGETS="strangler nginx haproxy pingora"
[ -n "${BASELINE_BIN:-}" ] && TARGETS="strangler before nginx haproxy pingora"
# COLLECTOR_ONLY=1: just the collector-cost phase below.
if [ "${COLLECTOR_ONLY:-0}" != 1 ]; then
  for w in $WORKERS; do
    for t in $TARGETS; do measure "$t" "$w"; done
  done
  $(pin 0 4) wrk -t"$WRK_THREADS" -c"$CONNECTIONS" -d"${DURATION}s" --latency -s "$WORK/users.lua" "http://127.0.0.1:$UP/" > "$WORK/direct.txt"
fi

# The collector's cost: the router (default sampling) exports to a real collector
# and ClickHouse; the collector's CPU time over the run, and what it received, are
# scaled to 100k req/s of router traffic. Skipped without clickhouse-server.
CH_BIN=$(command -v clickhouse-server || true)
if [ "${COLLECTOR_COST:-1}" = 1 ] && [ -n "$CH_BIN" ]; then
  CH_HTTP=$(free_port); CH_TCP=$(free_port); CG=$(free_port); CHT=$(free_port); CW=$(free_port)
  mkdir -p "$WORK/ch" "$WORK/collector"
  cat > "$WORK/ch/config.xml" <<XML
<?xml version="1.0"?>
<yandex><logger><level>warning</level><console>1</console></logger>
<listen_host>127.0.0.1</listen_host><http_port>$CH_HTTP</http_port><tcp_port>$CH_TCP</tcp_port>
<path>$WORK/ch/data/</path><tmp_path>$WORK/ch/tmp/</tmp_path><user_files_path>$WORK/ch/uf/</user_files_path>
<format_schema_path>$WORK/ch/fs/</format_schema_path><users_config>$WORK/ch/users.xml</users_config>
<default_profile>default</default_profile><default_database>default</default_database>
<mark_cache_size>268435456</mark_cache_size><timezone>UTC</timezone></yandex>
XML
  cat > "$WORK/ch/users.xml" <<XML
<?xml version="1.0"?>
<yandex><profiles><default></default></profiles>
<users><default><password></password><networks><ip>127.0.0.1</ip></networks><profile>default</profile><quota>default</quota></default></users>
<quotas><default></default></quotas></yandex>
XML
  "$CH_BIN" --config-file="$WORK/ch/config.xml" >"$WORK/ch/server.log" 2>&1 & PIDS+=($!)
  wait_port "$CH_HTTP"
  printf 'grpc_listen = "127.0.0.1:%s"\nhttp_listen = "127.0.0.1:%s"\nweb_listen = "127.0.0.1:%s"\nclickhouse_url = "http://127.0.0.1:%s"\nspool_dir = "%s/spool"\n' \
    "$CG" "$CHT" "$CW" "$CH_HTTP" "$WORK/collector" > "$WORK/collector/collector.toml"
  STRANGLER_LOG=warn "$STRANGLER" collector run --config "$WORK/collector/collector.toml" >"$WORK/collector/collector.log" 2>&1 & CPID=$!; PIDS+=($CPID)
  for _ in $(seq 1 300); do curl -sf "http://127.0.0.1:$CW/ready" >/dev/null && break; sleep 0.1; done
  counter() { curl -s "http://127.0.0.1:$CW/metrics" | awk -v n="$1" '$1 == n { print $2 }'; }
  ticks() { awk '{ print $14 + $15 }' "/proc/$CPID/stat"; }
  # The collector's idle cost (timers, replayer), subtracted from the run's below.
  i0=$(ticks); sleep 10; i1=$(ticks)
  TELEMETRY=$CG
  w=$(echo "$WORKERS" | awk '{ print $1 }')
  start_target strangler "$w"
  $(pin 0 4) wrk -t"$WRK_THREADS" -c"$CONNECTIONS" -d2s -s "$WORK/users.lua" "http://127.0.0.1:$PORT/" >/dev/null 2>&1 || true
  sleep 11  # one metrics interval: the warm-up's counts arrive before the measurement
  s0=$(counter strangler_collector_spans_received_total); p0=$(counter strangler_collector_metric_points_written_total)
  q0=$(counter strangler_collector_metric_points_spooled_total); t0=$(ticks); c0=$(date +%s.%N)
  $(pin 0 4) wrk -t"$WRK_THREADS" -c"$CONNECTIONS" -d"${DURATION}s" --latency -s "$WORK/users.lua" "http://127.0.0.1:$PORT/" > "$WORK/collector-run.txt"
  sleep 11  # the run's last aggregates
  s1=$(counter strangler_collector_spans_received_total); p1=$(counter strangler_collector_metric_points_written_total)
  q1=$(counter strangler_collector_metric_points_spooled_total); t1=$(ticks); c1=$(date +%s.%N)
  kill -KILL "$TPID" 2>/dev/null || true; wait "$TPID" 2>/dev/null || true
  echo "$s0 $s1 $p0 $p1 $q0 $q1 $t0 $t1 $c0 $c1 $(getconf CLK_TCK) $i0 $i1" > "$WORK/collector-cost.txt"
fi

python3 - "$WORK" "$DURATION" "$CONNECTIONS" "$WORKERS" "$TARGETS" "$CORES" "${SAMPLE_RATIO:-default}" <<'PY'
import re, sys
work, duration, conns, workers, targets, cores, ratio = sys.argv[1:8]
workers, targets = workers.split(), targets.split()
def parse(path):
    text = open(path).read()
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))
    def lat(p):
        m = re.search(rf"^\s+{p}%\s+([\d.]+)(us|ms|s)\s*$", text, re.M)
        return float(m.group(1)) * {"us": 1, "ms": 1000, "s": 1_000_000}[m.group(2)]
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    err = re.search(r"Socket errors:.*", text)
    return rps, lat(50), lat(99), (f"{bad.group(1)} non-2xx " if bad else "") + (err.group(0) if err else "")
import os
if not os.path.exists(f"{work}/direct.txt"):
    workers = []
direct = parse(f"{work}/direct.txt") if workers else (0, 0, 0, "")
print(f"wrk, {conns} connections, {duration}s per target, {cores} cores, same upstream (nginx); strangler sample_ratio={ratio}")
print(f"direct to the upstream: {direct[0]:.0f} req/s, p50 {direct[1]:.0f} us\n")
final = []
for w in workers:
    rows = {t: parse(f"{work}/{t}-{w}.txt") for t in targets}
    print(f"-- {w} proxy worker(s)")
    print(f"{'target':<10} {'req/s':>10} {'p50 us':>9} {'p99 us':>9}  notes")
    for t, (rps, p50, p99, note) in rows.items():
        print(f"{t:<10} {rps:>10.0f} {p50:>9.0f} {p99:>9.0f}  {note}")
    s, b, g = rows["strangler"], rows["pingora"], rows["nginx"]
    print(f"strangler / bare pingora {s[0]/b[0]:.2f}x  (p50 +{s[1]-b[1]:.0f} us)   / nginx {s[0]/g[0]:.2f}x   / haproxy {s[0]/rows['haproxy'][0]:.2f}x")
    if "before" in rows:
        print(f"strangler / before {s[0]/rows['before'][0]:.2f}x   before / bare pingora {rows['before'][0]/b[0]:.2f}x")
    try:
        rss = int(open(f"{work}/rss-{w}").read().strip())
        print(f"strangler RSS after the run: {rss/1024:.1f} MiB")
    except (OSError, ValueError):
        pass
    print()
    suffix = "" if len(workers) == 1 else f"@{w}w"
    final.append(f"strangler/bare_pingora{suffix}={s[0]/b[0]:.2f} strangler/nginx{suffix}={s[0]/g[0]:.2f}")
    if "before" in rows:
        final.append(f"strangler/before{suffix}={s[0]/rows['before'][0]:.2f}")
try:
    s0, s1, p0, p1, q0, q1, t0, t1, c0, c1, hz, i0, i1 = open(f"{work}/collector-cost.txt").read().split()
    rps = parse(f"{work}/collector-run.txt")[0]
    wall = float(c1) - float(c0)
    requests = rps * float(duration)
    spans = float(s1) - float(s0)
    points = float(p1) - float(p0) + float(q1) - float(q0)
    idle = (float(i1) - float(i0)) / float(hz) / 10.0
    cpu = (float(t1) - float(t0)) / float(hz) - idle * wall
    at_100k = max(cpu, 0.0) / requests * 100_000
    print("-- collector cost (router at the default sampling, exporting to a collector and ClickHouse on this machine)")
    print(f"router {rps:.0f} req/s for {duration} s: the collector received {spans:.0f} spans ({100*spans/requests:.2f} % of requests) "
          f"and {points:.0f} metric points in {wall:.0f} s; its CPU beyond idle ({100*idle:.2f} % of a core) {cpu:.3f} s")
    print(f"while receiving it: {100*max(cpu, 0.0)/wall:.2f} % of a core beyond idle")
    print(f"at 100k req/s of router traffic: {spans/requests*100_000:.0f} spans/s, points ~{points/wall:.1f}/s per router "
          f"(they grow with routes, not traffic); collector CPU scaled linearly from this run {100*at_100k:.2f} % of a core "
          f"(an upper bound: most of it is per export and per insert, which grow with time, not with spans)\n")
    final.append(f"collector_cpu_pct={100*max(cpu, 0.0)/wall:.2f} collector_cpu_at_100k_upper={100*at_100k:.2f}")
except (OSError, ValueError, ZeroDivisionError, AttributeError):
    pass
print(" ".join(final))
PY
