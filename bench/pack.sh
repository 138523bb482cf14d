#!/usr/bin/env bash
# Packs the router benchmark's programs into one folder that runs on another x86-64
# Linux machine without installing anything there: the release `strangler`,
# `otlp_sink` and `bare_pingora`, plus nginx, haproxy and wrk from this machine,
# each with every shared library it loads, the C library and its loader included
# (the other machine's may be older). Each program is started through the packed
# loader by a small wrapper script, so nothing on that machine's own library path
# changes: its python3, ps and taskset keep their own libraries.
#
#   bench/pack.sh DEST            # after a release build (bench/router.sh builds one)
#   BIN_DIR=DEST PATH=DEST/path:$PATH bench/router.sh    # on the other machine
#
# The libraries go to DEST/libs, not DEST/lib: bench/router.sh puts DEST/lib on
# LD_LIBRARY_PATH, which would hand this machine's C library to the other machine's
# programs.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST="${1:?usage: bench/pack.sh DEST}"
TARGET="${CARGO_TARGET_DIR:-target}/release"
mkdir -p "$DEST/real" "$DEST/libs" "$DEST/path"

pack() { # program-path wrapper-path
  local src=$1 wrapper=$2 name
  name=$(basename "$src")
  cp "$src" "$DEST/real/$name"
  strip "$DEST/real/$name" 2>/dev/null || true
  ldd "$src" | awk '/=> \// { print $3 } /^\s*\/.*ld-linux/ { print $1 }' | while read -r lib; do
    cp -L "$lib" "$DEST/libs/" 2>/dev/null || true
  done
  local rel
  rel=$(realpath --relative-to="$(dirname "$wrapper")" "$DEST")
  cat > "$wrapper" <<SH
#!/bin/sh
D="\$(dirname "\$(readlink -f "\$0")")/$rel"
exec "\$D/libs/ld-linux-x86-64.so.2" --library-path "\$D/libs" "\$D/real/$name" "\$@"
SH
  chmod +x "$wrapper"
}

pack "$TARGET/strangler" "$DEST/strangler"
pack "$TARGET/examples/otlp_sink" "$DEST/otlp_sink"
pack "$TARGET/examples/bare_pingora" "$DEST/bare_pingora"
for tool in nginx haproxy wrk; do
  pack "$(command -v "$tool")" "$DEST/path/$tool"
done
du -sh "$DEST"
