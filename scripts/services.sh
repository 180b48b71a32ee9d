#!/usr/bin/env bash
# Make sure PostgreSQL (127.0.0.1:5432) and Mosquitto (127.0.0.1:1883) are running.
# Starts them when installed but stopped; installs them with apt-get when missing and we are
# root on Debian/Ubuntu; otherwise says exactly what to install.
set -euo pipefail

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
wait_port() { for _ in $(seq 1 60); do port_open "$1" && return 0; sleep 0.5; done; return 1; }
can_apt() { [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; }
APT_UPDATED=0
apt_install() {
  if [ "$APT_UPDATED" = 0 ]; then DEBIAN_FRONTEND=noninteractive apt-get update -qq; APT_UPDATED=1; fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

# PostgreSQL
if ! port_open 5432; then
  if ! ls /etc/postgresql/*/main >/dev/null 2>&1; then
    if can_apt; then
      echo "installing PostgreSQL (apt-get install postgresql)"; apt_install postgresql
    else
      echo "PostgreSQL is missing: install it (Debian/Ubuntu: sudo apt-get install postgresql)" >&2
      exit 1
    fi
  fi
  version=$(ls /etc/postgresql | sort -V | tail -n 1)
  echo "starting PostgreSQL $version"
  pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
  wait_port 5432 || { echo "PostgreSQL did not start on 127.0.0.1:5432" >&2; exit 1; }
fi
# The tests and the demo connect as postgres over TCP; the machine's pg_hba uses trust there.
if ! psql -h 127.0.0.1 -U postgres -d postgres -Atc "select 1" >/dev/null 2>&1; then
  echo "cannot connect to PostgreSQL as user postgres on 127.0.0.1:5432 without a password;" >&2
  echo "allow it in pg_hba.conf (host all all 127.0.0.1/32 trust) for the tests" >&2
  exit 1
fi

# Mosquitto
if ! port_open 1883; then
  if ! command -v mosquitto >/dev/null 2>&1; then
    if can_apt; then
      echo "installing Mosquitto (apt-get install mosquitto)"; apt_install mosquitto
    else
      echo "Mosquitto is missing: install it (Debian/Ubuntu: sudo apt-get install mosquitto)" >&2
      exit 1
    fi
  fi
  echo "starting Mosquitto"
  if [ -f /etc/mosquitto/mosquitto.conf ]; then
    mosquitto -d -c /etc/mosquitto/mosquitto.conf
  else
    mosquitto -d -p 1883
  fi
  wait_port 1883 || { echo "Mosquitto did not start on 127.0.0.1:1883" >&2; exit 1; }
fi
echo "services: PostgreSQL and Mosquitto are up"
