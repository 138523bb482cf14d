#!/usr/bin/env bash
# Re-vendors uPlot (the dashboard's chart library) from npm into dashboards/web/vendor.
# The files are committed: the dashboard has no build step, and the collector embeds
# them at compile time. Usage: scripts/vendor-uplot.sh [version]
set -euo pipefail
VERSION="${1:-1.6.32}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
(cd "$WORK" && npm pack --silent "uplot@$VERSION" >/dev/null && tar xzf uplot-*.tgz)
cp "$WORK/package/dist/uPlot.iife.min.js" "$WORK/package/dist/uPlot.min.css" "$ROOT/dashboards/web/vendor/"
cp "$WORK/package/LICENSE" "$ROOT/dashboards/web/vendor/uPlot.LICENSE"
echo "uPlot $VERSION vendored into dashboards/web/vendor; rebuild the collector to embed it."
