#!/usr/bin/env bash
# Refresh the dashboard's charting library from the npm registry: Chart.js's UMD build and its
# license are copied into cloud_api/static/vendor and committed, so the dashboard never loads
# anything from the internet at run time. Run by hand when upgrading; not part of the build.
set -euo pipefail
VERSION="${1:-4.6.1}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DEST="$ROOT/cloud_api/static/vendor"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
(cd "$WORK" && npm pack --silent "chart.js@$VERSION" >/dev/null && tar xzf chart.js-*.tgz)
mkdir -p "$DEST"
cp "$WORK/package/dist/chart.umd.min.js" "$DEST/chart.umd.min.js"
cp "$WORK/package/LICENSE.md" "$DEST/chart.js.LICENSE.md"
{
  echo "chart.js $VERSION (npm), MIT license: chart.js.LICENSE.md"
  (cd "$DEST" && sha256sum chart.umd.min.js)
} >"$DEST/VERSIONS"
cat "$DEST/VERSIONS"
