"""The installed distribution's version, as both sides report it (`--version`, agent status)."""

from __future__ import annotations

import importlib.metadata

DISTRIBUTION = "factory-edge-gateway"

try:
    VERSION = importlib.metadata.version(DISTRIBUTION)
except importlib.metadata.PackageNotFoundError:  # running from a source tree
    VERSION = "0+unknown"
