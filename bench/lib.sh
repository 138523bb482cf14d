# Shared by the bench scripts: a work directory removed at exit, background
# processes killed at exit, free loopback ports, and waiting for a port to open.
# Source it after `cd` to the repository root; it sets WORK (prefix in $1).

WORK="$(mktemp -d "/tmp/${1:-strangler-bench}.XXXXXX")"
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
# Waits up to 10 s for 127.0.0.1:PORT; on failure shows the tail of the work dir's logs.
wait_port() {
  for _ in $(seq 1 100); do (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0; sleep 0.1; done
  echo "port $1 never opened; logs:" >&2
  tail -n 20 "$WORK"/*.log "$WORK"/*/error.log >&2 2>/dev/null
  return 1
}
