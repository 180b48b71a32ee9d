#!/usr/bin/env bash
# Make sure a headless-capable Chromium is installed for the dashboard test.
# Installs Debian's `chromium` with apt-get when missing and we are root; otherwise says what
# to install. Prints the browser's path on success.
set -euo pipefail

find_browser() {
  for name in "${CHROMIUM:-}" chromium chromium-browser google-chrome; do
    [ -n "$name" ] && command -v "$name" >/dev/null 2>&1 && { command -v "$name"; return 0; }
  done
  return 1
}

if ! find_browser >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing Chromium (apt-get install chromium) for the dashboard test" >&2
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null
  else
    echo "Chromium is missing: install it (Debian/Ubuntu: sudo apt-get install chromium)" >&2
    exit 1
  fi
fi
find_browser
