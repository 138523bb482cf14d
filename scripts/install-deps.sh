#!/usr/bin/env bash
# Installs what strangler's build, tests and demo need on a Debian machine.
# Idempotent: each step checks first, so a second run takes a second or two.
set -euo pipefail

CACHE_DIR="${STRANGLER_CACHE:-$HOME/.cache/strangler}"
UNLEASH_VERSION="7.5.1"
PLAYWRIGHT_VERSION="1.64.1"
# Current ClickHouse in process (PyPI chdb-core): the collector's schema and
# dashboard queries are checked on it as well as on Debian's 18.16.
CHDB_VERSION="26.9.0"

log() { printf '[install-deps] %s\n' "$*" >&2; }

need_apt=()
# Map each binary the tests or the build look for to the Debian package that ships it.
check_bin() { # binary package
  if ! command -v "$1" >/dev/null 2>&1 && [ ! -e "$1" ]; then need_apt+=("$2"); fi
}
check_bin cmake cmake
check_bin /usr/sbin/clickhouse-server clickhouse-server
check_bin /usr/sbin/mariadbd mariadb-server
check_bin /usr/bin/mariadb mariadb-client
check_bin /usr/lib/postgresql/15/bin/initdb postgresql-15
check_bin /usr/bin/psql postgresql-client-15
check_bin /usr/bin/chromium chromium
check_bin node nodejs
check_bin npm npm
check_bin pkg-config pkg-config
check_bin /usr/include/postgresql/libpq-fe.h libpq-dev
check_bin /usr/share/zookeeper/bin/zkServer.sh zookeeper
if ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then need_apt+=(python3-venv); fi
if [ "${STRANGLER_BENCH:-0}" = 1 ]; then
  check_bin /usr/sbin/nginx nginx
  check_bin /usr/sbin/haproxy haproxy
  check_bin wrk wrk
fi

if [ "${#need_apt[@]}" -gt 0 ]; then
  log "installing Debian packages: ${need_apt[*]}"
  SUDO=""
  [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  export DEBIAN_FRONTEND=noninteractive
  # Packages must not start their system services: the tests start their own servers.
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null
    $SUDO chmod +x /usr/sbin/policy-rc.d
    remove_policy=1
  fi
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
  if [ "${remove_policy:-0}" = 1 ]; then $SUDO rm -f /usr/sbin/policy-rc.d; fi
fi

# npm packages into version-named directories of a cache outside the clone.
npm_into() { # dir package version
  if [ ! -f "$1/node_modules/$2/package.json" ]; then
    log "installing $2@$3 into $1"
    mkdir -p "$1"
    [ -f "$1/package.json" ] || echo '{"name":"strangler-npm-deps","private":true}' > "$1/package.json"
    (cd "$1" && npm install --no-audit --no-fund --loglevel=error "$2@$3" >/dev/null)
  fi
}
UNLEASH_DIR="$CACHE_DIR/unleash-$UNLEASH_VERSION"
npm_into "$UNLEASH_DIR" unleash-server "$UNLEASH_VERSION"
# playwright-core drives Debian's chromium in the dashboard's browser test (no browser
# download: the test points it at /usr/bin/chromium).
PLAYWRIGHT_DIR="$CACHE_DIR/playwright-core-$PLAYWRIGHT_VERSION"
npm_into "$PLAYWRIGHT_DIR" playwright-core "$PLAYWRIGHT_VERSION"
# chdb-core into a virtual environment of its own in the same cache.
CHDB_DIR="$CACHE_DIR/chdb-core-$CHDB_VERSION"
if ! "$CHDB_DIR/bin/python" -c 'import chdb' >/dev/null 2>&1; then
  log "installing chdb-core==$CHDB_VERSION into $CHDB_DIR"
  rm -rf "$CHDB_DIR"
  python3 -m venv "$CHDB_DIR"
  "$CHDB_DIR/bin/pip" install --quiet --disable-pip-version-check "chdb-core==$CHDB_VERSION"
fi
log "ok (unleash in $UNLEASH_DIR, playwright-core in $PLAYWRIGHT_DIR, chdb in $CHDB_DIR)"
