#!/usr/bin/env bash
# Install or upgrade the edge agent on a Debian/Ubuntu box with systemd.
#
#   sudo deploy/install-edge.sh                         # from this source tree (needs PyPI)
#   sudo deploy/install-edge.sh --wheelhouse /media/usb/wheelhouse   # air-gapped
#   sudo deploy/install-edge.sh --config my-agent.yaml --cloud-keys cloud.pub
#
# What it does (each step is idempotent; re-running it upgrades in place):
#   1. system user and group `edge-agent` (no login shell, no home outside its state)
#   2. /opt/edge-agent/venv: a dedicated virtual environment; the package is installed or
#      upgraded into it (from PyPI/the source tree, or --wheelhouse with --no-index)
#   3. /etc/edge-agent (0750 root:edge-agent) with agent.yaml (only if missing: an existing
#      configuration is never overwritten) and `environment` for secrets (0640)
#   4. /var/lib/edge-agent (0700 edge-agent): the outbox, checkpoint and keys. An upgrade never
#      touches the outbox or the keys; keys are created only when missing
#   5. the systemd unit (and the serial-port drop-in when agent.yaml has a modbus-rtu
#      connection); daemon-reload, enable, and restart when it was running
#   6. prints the agent's public key for `cloud-api agents enroll`
#
# Options:
#   --wheelhouse DIR   install with pip --no-index --find-links DIR (air-gapped)
#   --package SPEC     what pip installs (default: this source tree)
#   --config FILE      agent.yaml to install on a new box (default: configs/modbus-press-line.yaml)
#   --cloud-keys FILE  the cloud's public keys (`cloud-api keys export`) to install
#   --python PY        interpreter for the venv (default: python3; 3.11 or newer)
#   --root DIR         install under DIR instead of / (staging an image, tests); implies
#                      --no-systemctl, skips user creation and chown
#   --venv DIR         use this existing virtual environment instead of creating and filling
#                      /opt/edge-agent/venv (staging with a prepared venv, tests)
#   --no-systemctl     install the unit but do not call systemctl
#   --dry-run          print every action, change nothing
set -euo pipefail

SRC="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ROOT=""
WHEELHOUSE=""
PACKAGE="$SRC"
CONFIG_SRC="$SRC/configs/modbus-press-line.yaml"
CLOUD_KEYS=""
PYTHON="python3"
VENV_OVERRIDE=""
SYSTEMCTL=1
DRY=0
USER_NAME="edge-agent"

die() { echo "install-edge: $*" >&2; exit 1; }
while [ $# -gt 0 ]; do
  case "$1" in
    --wheelhouse) WHEELHOUSE="$2"; shift 2 ;;
    --package) PACKAGE="$2"; shift 2 ;;
    --config) CONFIG_SRC="$2"; shift 2 ;;
    --cloud-keys) CLOUD_KEYS="$2"; shift 2 ;;
    --python) PYTHON="$2"; shift 2 ;;
    --root) ROOT="$(realpath -m "$2")"; SYSTEMCTL=0; shift 2 ;;
    --venv) VENV_OVERRIDE="$2"; shift 2 ;;
    --no-systemctl) SYSTEMCTL=0; shift ;;
    --dry-run) DRY=1; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed 's/^# \{0,1\}//;$d'; exit 0 ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done

OPT="$ROOT/opt/edge-agent"
VENV="${VENV_OVERRIDE:-$OPT/venv}"
ETC="$ROOT/etc/edge-agent"
STATE="$ROOT/var/lib/edge-agent"
UNIT_DIR="$ROOT/etc/systemd/system"
CONF="$ETC/agent.yaml"

# Every change goes through `run`, so --dry-run shows exactly what a real run would do.
run() {
  echo "+ $*"
  if [ "$DRY" = 0 ]; then "$@"; fi
}
note() { echo "== $*"; }

if [ -z "$ROOT" ] && [ "$DRY" = 0 ] && [ "$(id -u)" != 0 ]; then
  die "run as root (or use --root DIR to stage, --dry-run to see the actions)"
fi
[ -n "$WHEELHOUSE" ] && [ ! -d "$WHEELHOUSE" ] && die "no wheelhouse at $WHEELHOUSE"
[ -n "$CLOUD_KEYS" ] && [ ! -f "$CLOUD_KEYS" ] && die "no cloud key file at $CLOUD_KEYS"

note "1. user $USER_NAME"
if [ -n "$ROOT" ]; then
  echo "   (alternate root: user creation and ownership are left to the target system)"
elif id "$USER_NAME" >/dev/null 2>&1; then
  echo "   exists"
else
  run useradd --system --user-group --home-dir /var/lib/edge-agent --no-create-home \
    --shell /usr/sbin/nologin --comment "factory edge gateway agent" "$USER_NAME"
fi
own() {  # own OWNER:GROUP PATH (skipped under --root)
  if [ -z "$ROOT" ]; then run chown "$1" "$2"; fi
}

note "2. virtual environment $VENV"
if [ -n "$VENV_OVERRIDE" ]; then
  [ -x "$VENV/bin/edge-agent" ] || [ "$DRY" = 1 ] || die "$VENV/bin/edge-agent is missing"
  echo "   using the given environment as is"
else
  run install -d -m 0755 "$OPT"
  if [ ! -x "$VENV/bin/python" ]; then
    run "$PYTHON" -m venv "$VENV"
  fi
  PIP=("$VENV/bin/python" -m pip install --quiet --upgrade)
  if [ -n "$WHEELHOUSE" ]; then
    PIP+=(--no-index --find-links "$WHEELHOUSE")
    [ "$PACKAGE" = "$SRC" ] && PACKAGE="factory-edge-gateway"
  fi
  run "${PIP[@]}" "$PACKAGE"
  # Byte-compile now: the unit's ProtectSystem=strict keeps /opt read-only at run time.
  # The unit runs Python with -OO (PYTHONOPTIMIZE=2), which reads its own .opt-2.pyc files.
  run "$VENV/bin/python" -m compileall -q "$VENV/lib"
  run "$VENV/bin/python" -OO -m compileall -q "$VENV/lib"
fi
AGENT="$VENV/bin/edge-agent"

note "3. configuration $ETC"
run install -d -m 0750 "$ETC"
own "root:$USER_NAME" "$ETC"
if [ -e "$CONF" ]; then
  echo "   $CONF exists: kept as it is"
else
  run install -m 0640 "$CONFIG_SRC" "$CONF"
  if [ -n "$ROOT" ]; then
    # A staged configuration keeps its state inside the staging root.
    run sed -i "s#^\(  state_dir:\) /var/lib/edge-agent#\1 $STATE#" "$CONF"
  fi
  own "root:$USER_NAME" "$CONF"
fi
if [ ! -e "$ETC/environment" ]; then
  if [ "$DRY" = 0 ]; then
    (umask 027 && printf '# Secrets for agent.yaml, e.g.\n# MQTT_PASSWORD=...\n' >"$ETC/environment")
  fi
  echo "+ create $ETC/environment (0640) for secrets"
  own "root:$USER_NAME" "$ETC/environment"
fi

note "4. state $STATE (outbox, checkpoint and keys; never touched by an upgrade)"
run install -d -m 0700 "$STATE"
own "$USER_NAME:$USER_NAME" "$STATE"
if [ "$DRY" = 0 ]; then
  # Secrets the file needs are in $ETC/environment; read them the way systemd will.
  set -a
  # shellcheck disable=SC1091
  . "$ETC/environment"
  set +a
  if ! "$AGENT" validate -c "$CONF"; then
    die "fix $CONF (secrets go in $ETC/environment) and run this installer again; it is idempotent"
  fi
  PUBLIC="$(umask 077 && "$AGENT" keys init -c "$CONF")"
  if [ -n "$CLOUD_KEYS" ]; then
    run "$AGENT" keys install-cloud -c "$CONF" "$CLOUD_KEYS"
  fi
  if [ -z "$ROOT" ]; then
    run chown -R "$USER_NAME:$USER_NAME" "$STATE"
  fi
else
  echo "+ $AGENT validate -c $CONF"
  echo "+ $AGENT keys init -c $CONF   (creates the signing key only when missing)"
  [ -n "$CLOUD_KEYS" ] && echo "+ $AGENT keys install-cloud -c $CONF $CLOUD_KEYS"
  PUBLIC="(printed here by a real run)"
fi

note "5. systemd unit"
run install -d -m 0755 "$UNIT_DIR"
run install -m 0644 "$SRC/systemd/edge-agent.service" "$UNIT_DIR/edge-agent.service"
DROPIN="$UNIT_DIR/edge-agent.service.d/serial.conf"
if [ -e "$CONF" ] && grep -Eq '^[[:space:]-]*type:[[:space:]]*modbus-rtu' "$CONF"; then
  echo "   agent.yaml has a Modbus RTU connection: serial ports are opened to the service"
  run install -d -m 0755 "$UNIT_DIR/edge-agent.service.d"
  run install -m 0644 "$SRC/systemd/edge-agent-serial.conf" "$DROPIN"
elif [ -e "$DROPIN" ]; then
  run rm -f "$DROPIN"
fi
if [ "$SYSTEMCTL" = 1 ] && [ -d /run/systemd/system ]; then
  run systemctl daemon-reload
  run systemctl enable edge-agent.service
  if systemctl is-active --quiet edge-agent.service; then
    run systemctl restart edge-agent.service   # an upgrade: the outbox resumes where it was
  elif [ -n "$CLOUD_KEYS" ] || [ -e "$STATE/keys/cloud-hpke.pub" ]; then
    run systemctl start edge-agent.service
  fi
else
  echo "   systemctl not called; on the target run: systemctl daemon-reload && systemctl enable --now edge-agent"
fi

note "6. enrollment"
echo "agent public key (give it to the cloud operator):"
echo "$PUBLIC"
AGENT_ID="$(sed -n 's/^  id:[[:space:]]*\([^[:space:]#]*\).*/\1/p' "$CONF" 2>/dev/null | head -n 1 || true)"
SITE_ID="$(sed -n 's/^  site:[[:space:]]*\([^[:space:]#]*\).*/\1/p' "$CONF" 2>/dev/null | head -n 1 || true)"
echo "on the cloud: cloud-api agents enroll --agent ${AGENT_ID:-ID} --site ${SITE_ID:-SITE} --public-key signing.pub"
