#!/usr/bin/env bash
# Tools some tests drive besides the browser: socat (a pty pair for the Modbus RTU test),
# systemd-analyze (verifies the unit files), ss from iproute2 (which worker of
# `cloud-api serve` holds a connection) and pgbouncer (the API behind a transaction pooler). Installed with apt-get when missing and we are root
# on Debian/Ubuntu, so those tests run instead of skipping; otherwise says what to install.
set -euo pipefail

missing=()
command -v socat >/dev/null 2>&1 || missing+=(socat)
command -v systemd-analyze >/dev/null 2>&1 || missing+=(systemd)
command -v ss >/dev/null 2>&1 || missing+=(iproute2)
command -v pgbouncer >/dev/null 2>&1 || [ -x /usr/sbin/pgbouncer ] || missing+=(pgbouncer)
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing ${missing[*]} (apt-get) for the tests" >&2
  # Not fatal: without these tools their tests skip, the rest of the suite still runs.
  { DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      "${missing[@]}" >/dev/null; } || echo "could not install ${missing[*]}" >&2
else
  echo "optional test tools missing (their tests will skip): install ${missing[*]}" >&2
fi
