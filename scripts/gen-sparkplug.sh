#!/usr/bin/env bash
# Regenerates agent/floor/sparkplug_b_pb2.py from agent/floor/sparkplug_b.proto with the protoc
# bundled in grpcio-tools (a build-time tool only: the agent needs just `protobuf` at run time).
# The generated module is committed, so neither protoc nor grpcio-tools is needed to run or test.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
tools="$(mktemp -d)"
trap 'rm -rf "$tools"' EXIT
python3 -m pip install -q --target "$tools" "grpcio-tools==1.85.1"
cd "$here/agent/floor"
PYTHONPATH="$tools" python3 -m grpc_tools.protoc -I. --python_out=. --pyi_out=. sparkplug_b.proto
