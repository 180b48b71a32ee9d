#!/usr/bin/env bash
# Tools some tests drive besides the browser: socat (a pty pair for the Modbus RTU test),
# systemd-analyze (verifies the unit files), ss from iproute2 (which worker of
# `cloud-api serve` holds a connection), pgbouncer (the API behind a transaction pooler),
# Node.js with npm (the node-opcua servers of the interoperability and conformance tests) and
# fuse3 (fusermount and libfuse for the power-loss file system of the fault suite).
# Installed with apt-get when missing and we are root
# on Debian/Ubuntu, so those tests run instead of skipping; otherwise says what to install.
# Then the pinned node-opcua (tests/connectors/node_opcua, its committed lock file) and the
# plant-floor clients (tests/floor/node: sparkplug-payload, node-opcua-client) with npm ci.
set -euo pipefail

npm_folder() {
  local folder="$1" marker="$2"
  [ -d "$folder/node_modules/$marker" ] && return 0
  command -v npm >/dev/null 2>&1 || return 0
  echo "installing $marker (npm ci) for the tests" >&2
  (cd "$folder" && npm ci --no-audit --no-fund --loglevel=error) ||
    echo "could not install $marker (npm ci in $folder)" >&2
}

node_opcua() {
  local here
  here="$(dirname "$0")/../tests"
  npm_folder "$here/connectors/node_opcua" node-opcua-server
  npm_folder "$here/floor/node" sparkplug-payload
}

missing=()
command -v socat >/dev/null 2>&1 || missing+=(socat)
command -v systemd-analyze >/dev/null 2>&1 || missing+=(systemd)
command -v ss >/dev/null 2>&1 || missing+=(iproute2)
command -v fusermount3 >/dev/null 2>&1 || missing+=(fuse3)
command -v pgbouncer >/dev/null 2>&1 || [ -x /usr/sbin/pgbouncer ] || missing+=(pgbouncer)
command -v node >/dev/null 2>&1 || missing+=(nodejs)
command -v npm >/dev/null 2>&1 || missing+=(npm)
if [ ${#missing[@]} -eq 0 ]; then
  node_opcua
  exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing ${missing[*]} (apt-get) for the tests" >&2
  # Not fatal: without these tools their tests skip, the rest of the suite still runs.
  { DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      "${missing[@]}" >/dev/null; } || echo "could not install ${missing[*]}" >&2
else
  echo "optional test tools missing (their tests will skip): install ${missing[*]}" >&2
fi
node_opcua
